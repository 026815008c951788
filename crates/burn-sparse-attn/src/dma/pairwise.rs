//! DMA with a bias per (query, key): `bias [batch, heads_b, seq_q, seq_k]`, as Burn's own
//! `attention` takes an `attn_bias` and as flash-dmattn accepts a full bias/mask. Each row
//! keeps its `window` visible keys with the largest bias of that row (ties to the more recent
//! key, as for the per-key bias) and attends with `scale * q.k + bias[i, j]`.
//!
//! The bias is `seq_q x seq_k` per head, so this path runs as tensor ops: the scores it
//! materialises are the size of its input. The keep rule is computed on the device (a top-k
//! for the row's `window`-th value, then a count from the right among the keys tied with it),
//! with no host copy.

use burn::tensor::{Bool, Int, Tensor};

use crate::attention::reference::{masked_attention, position_mask};
use crate::attention::{AttentionOptions, AttentionOutput, AttnDims, validate_qkv};
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
    let device = bias.device();
    let values = bias.clone().detach();
    let visible = match causal {
        true => {
            let dims = AttnDims { batch: b, heads_q: hb, heads_kv: hb, seq_q: sq, seq_k: sk, head_dim: 1 };
            position_mask(&dims, &AttentionOptions { causal: true, window: None, scale: None }, &device)
        }
        false => None,
    };
    // Every key visible: built from an integer comparison like the other masks, so all masks
    // share one bool representation.
    let visible = visible.unwrap_or_else(|| Tensor::<4, Int>::zeros([b, hb, sq, sk], &device).equal_elem(0));
    let n_visible: Tensor<4, Int> = visible.clone().int().sum_dim(3);
    if window >= sk {
        return Ok(visible);
    }
    // The row's `window`-th largest visible value; invisible keys rank last.
    let ranked = values.clone().mask_fill(visible.clone().bool_not(), f64::NEG_INFINITY);
    let thr = ranked.clone().topk(window, 3).slice([0..b, 0..hb, 0..sq, window - 1..window]);
    let thr_full = thr.expand([b, hb, sq, sk]);
    let above = ranked.clone().greater(thr_full.clone()).bool_and(visible.clone());
    let tied = ranked.equal(thr_full).bool_and(visible.clone());
    // Among the tied keys, keep the `window - above` most recent: count the tied keys from
    // the right (a key's count includes itself).
    let n_above: Tensor<4, Int> = above.clone().int().sum_dim(3);
    let room = n_above.mul_scalar(-1).add_scalar(window as i64).expand([b, hb, sq, sk]);
    let from_right = tied.clone().int().flip([3]).cumsum(3).flip([3]);
    let kept = above.bool_or(tied.bool_and(from_right.lower_equal(room)));
    // Rows that see at most `window` keys keep all of them.
    let short = n_visible.lower_equal_elem(window as i64).expand([b, hb, sq, sk]);
    Ok(kept.bool_or(short.bool_and(visible.clone())).bool_and(visible))
}

/// DMA attention with a bias per (query, key) `[batch, heads_b, seq_q, seq_k]` (`heads_b` =
/// `heads_kv` or `heads_q`): each row keeps its top-`window` visible keys by its own bias
/// row ([`dma_keep_mask_pairwise`]) and attends with the bias added to the scores. Gradients
/// reach q, k, v and the bias. Tensor ops on every backend (see the module docs); the
/// per-key bias of [`super::dma_attention`] runs on the kernels.
pub fn dma_attention_pairwise(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, bias: Tensor<4>, params: &DmaParams) -> Result<AttentionOutput> {
    let dims = validate_qkv(&q, &k, &v)?;
    validate_pair_bias(&bias, &dims)?;
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
