//! DMA with a bias per (query, key): `bias [batch, heads_b, seq_q, seq_k]`, as Burn's own
//! `attention` takes an `attn_bias` and as flash-dmattn accepts a full bias/mask. Each row
//! keeps its `window` visible keys with the largest bias of that row (ties to the more recent
//! key, as for the per-key bias) and attends with `scale * q.k + bias[i, j]`.
//!
//! The keep rule is computed on the device with tensor ops (a top-k for the row's
//! `window`-th value, then a count from the right among the keys tied with it), with no host
//! copy. On Cube devices the attention runs on the kernels' portable path with the bias read
//! per (query, key) and the rule as a per-row threshold ([`dma_keep_threshold_pairwise`]),
//! without a `seq_q x seq_k` score tensor; elsewhere (Flex) as tensor ops.

use burn::tensor::{Bool, Int, Tensor};

use crate::attention::reference::{masked_attention, position_mask};
use crate::attention::{AttentionOptions, AttentionOutput, AttnDims, KeepThreshold, validate_qkv};
use crate::error::{Result, check_positive, shape_err};

use super::DmaParams;

/// Checks `bias` against q's shape: `[batch, heads_b, seq_q, seq_k]` with `heads_b` equal to
/// `heads_kv` or `heads_q` (as for the per-key bias).
fn validate_pair_bias(bias: &Tensor<4>, dims: &AttnDims) -> Result<()> {
    let [b, hb, sq, sk] = bias.dims();
    if b != dims.batch || sq != dims.seq_q || sk != dims.seq_k || (hb != dims.heads_kv && hb != dims.heads_q) {
        return shape_err(
            "bias",
            format!(
                "expected [batch={}, heads_kv={} or heads_q={}, seq_q={}, seq_k={}], got {:?}",
                dims.batch, dims.heads_kv, dims.heads_q, dims.seq_q, dims.seq_k,
                bias.dims()
            ),
        );
    }
    Ok(())
}

/// The keys each row of a per-pair bias keeps, `[b, hb, seq_q, seq_k]` (true = kept): visible
/// (causal, bottom-right aligned, or every key) and among the row's top `window` by bias, ties
/// to the more recent key. Rows with at most `window` visible keys keep all of them. Not
/// differentiable (the bias is detached).
pub fn dma_keep_mask_pairwise(bias: &Tensor<4>, window: usize, causal: bool) -> Result<Tensor<4, Bool>> {
    check_positive("window", window)?;
    let [b, hb, sq, sk] = bias.dims();
    let visible = visible_keys(b, hb, sq, sk, causal, &bias.device());
    let Some(rule) = row_rule(bias, window, visible.clone()) else {
        return Ok(visible);
    };
    let full = |t: Tensor<4>| t.expand([b, hb, sq, sk]);
    let values = bias.clone().detach();
    let positions = Tensor::<1, Int>::arange(0..sk as i64, &bias.device()).reshape([1, 1, 1, sk]).expand([b, hb, sq, sk]);
    let tie_kept = values.clone().equal(full(rule.value.clone())).bool_and(positions.greater_equal(rule.index.expand([b, hb, sq, sk])));
    let kept = values.greater(full(rule.value)).bool_or(tie_kept).bool_or(rule.short.expand([b, hb, sq, sk]));
    Ok(kept.bool_and(visible))
}

/// [`dma_keep_mask_pairwise`] as the kernels' per-row threshold: key `j` is kept by row `i`
/// iff it is visible and `bias[i, j] > value[i]`, or `bias[i, j] == value[i]` and `j >=
/// index[i]` (`value`, `index`: `[b, hb, seq_q]`; `-inf` keeps every visible key, for rows
/// that see at most `window` keys). Tensor ops on the device, the bias detached.
pub fn dma_keep_threshold_pairwise(bias: &Tensor<4>, window: usize, causal: bool) -> Result<KeepThreshold> {
    check_positive("window", window)?;
    let [b, hb, sq, sk] = bias.dims();
    let device = bias.device();
    let visible = visible_keys(b, hb, sq, sk, causal, &device);
    let Some(rule) = row_rule(bias, window, visible) else {
        return Ok(KeepThreshold {
            value: Tensor::<3>::full([b, hb, sq], f64::NEG_INFINITY, (&device, burn::tensor::DType::F32)),
            index: Tensor::<3, Int>::zeros([b, hb, sq], &device),
        });
    };
    let value = rule.value.cast(burn::tensor::DType::F32).mask_fill(rule.short.clone(), f64::NEG_INFINITY);
    let index = rule.index.mask_fill(rule.short, 0);
    Ok(KeepThreshold { value: value.reshape([b, hb, sq]), index: index.reshape([b, hb, sq]) })
}

/// Each row's keep rule, `[b, hb, sq, 1]` each: its `window`-th largest visible bias (in the
/// bias dtype), the leftmost tied key kept at that value (the tied keys kept are the `window -
/// above` most recent), and whether the row sees at most `window` keys (then it keeps them
/// all). `None` when `window >= seq_k` (every row keeps every visible key).
struct RowRule {
    value: Tensor<4>,
    index: Tensor<4, Int>,
    short: Tensor<4, Bool>,
}

fn row_rule(bias: &Tensor<4>, window: usize, visible: Tensor<4, Bool>) -> Option<RowRule> {
    let [b, hb, sq, sk] = bias.dims();
    if window >= sk {
        return None;
    }
    let device = bias.device();
    let n_visible: Tensor<4, Int> = visible.clone().int().sum_dim(3);
    // The row's `window`-th largest visible value; invisible keys rank last.
    let ranked = bias.clone().detach().mask_fill(visible.clone().bool_not(), f64::NEG_INFINITY);
    let value = ranked.clone().topk(window, 3).slice([0..b, 0..hb, 0..sq, window - 1..window]);
    let full = value.clone().expand([b, hb, sq, sk]);
    let above = ranked.clone().greater(full.clone()).bool_and(visible.clone());
    let tied = ranked.equal(full).bool_and(visible);
    // Count the tied keys from the right (a key's count includes itself): the first
    // `window - above` of them are kept.
    let n_above: Tensor<4, Int> = above.int().sum_dim(3);
    let room = n_above.mul_scalar(-1).add_scalar(window as i64).expand([b, hb, sq, sk]);
    let from_right = tied.clone().int().flip([3]).cumsum(3).flip([3]);
    let kept_tied = tied.bool_and(from_right.lower_equal(room));
    let positions = Tensor::<1, Int>::arange(0..sk as i64, &device).reshape([1, 1, 1, sk]).expand([b, hb, sq, sk]);
    let index = positions.mask_fill(kept_tied.bool_not(), sk as i64).min_dim(3);
    Some(RowRule { value, index, short: n_visible.lower_equal_elem(window as i64) })
}

/// Keys visible to each row: causal (bottom-right aligned) or every key.
fn visible_keys(b: usize, hb: usize, sq: usize, sk: usize, causal: bool, device: &burn::tensor::Device) -> Tensor<4, Bool> {
    let dims = AttnDims { batch: b, heads_q: hb, heads_kv: hb, seq_q: sq, seq_k: sk, head_dim: 1 };
    let opts = AttentionOptions { causal, window: None, scale: None };
    // Every key visible: built from an integer comparison like the other masks, so all masks
    // share one bool representation.
    position_mask(&dims, &opts, device).unwrap_or_else(|| Tensor::<4, Int>::zeros([b, hb, sq, sk], device).equal_elem(0))
}

/// DMA attention with a bias per (query, key) `[batch, heads_b, seq_q, seq_k]` (`heads_b` =
/// `heads_kv` or `heads_q`): each row keeps its top-`window` visible keys by its own bias
/// row ([`dma_keep_mask_pairwise`]) and attends with the bias added to the scores. Gradients
/// reach q, k, v and the bias. Tensor ops on every backend (see the module docs); the
/// per-key bias of [`super::dma_attention`] runs on the kernels.
pub fn dma_attention_pairwise(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, bias: Tensor<4>, params: &DmaParams) -> Result<AttentionOutput> {
    let dims = validate_qkv(&q, &k, &v)?;
    validate_pair_bias(&bias, &dims)?;
    if crate::kernel::pair_bias_on_device(&q) {
        // The rule on the bias as the kernel adds it (in the attention dtype), so ties match.
        let bias = if bias.dtype() != q.dtype() { bias.cast(q.dtype()) } else { bias };
        let keep = dma_keep_threshold_pairwise(&bias, params.window, params.causal)?;
        let opts = AttentionOptions { causal: params.causal, window: None, scale: params.scale };
        return crate::kernel::attention_pair_bias(&q, &k, &v, &bias, Some(&keep), &opts, &dims);
    }
    let keep = dma_keep_mask_pairwise(&bias, params.window, params.causal)?;
    let [b, hb, sq, sk] = bias.dims();
    let per = dims.heads_q / hb;
    let to_heads_q = |x: Tensor<4>| x.reshape([b, hb, 1, sq, sk]).expand([b, hb, per, sq, sk]).reshape([b, dims.heads_q, sq, sk]);
    let keep = keep.int().reshape([b, hb, 1, sq, sk]).expand([b, hb, per, sq, sk]).reshape([b, dims.heads_q, sq, sk]).greater_elem(0);
    let opts = AttentionOptions { causal: params.causal, window: None, scale: params.scale };
    let mask = match position_mask(&dims, &opts, &q.device()) {
        Some(m) => m.bool_and(keep),
        None => keep,
    };
    Ok(masked_attention(q, k, v, Some(mask), Some(to_heads_q(bias)), opts.scale_for(dims.head_dim), &dims))
}
