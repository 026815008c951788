//! Tensor-op reference of every attention variant in the crate.
//!
//! Written with ordinary Burn ops so it runs on every backend and autodiff differentiates
//! it; it materialises `[batch, heads_q, seq_q, seq_k]` scores and is meant as the oracle
//! for the kernels and the fallback on backends without them, not for long sequences.

use burn::tensor::{Bool, Int, Tensor, TensorData};

use super::{AttentionOptions, AttentionOutput, AttnDims, KeyBias};
use crate::block_sparse::BlockSelection;

/// Reference attention over the keys allowed by `opts`, `selection` and `bias.keep`.
///
/// Inputs are assumed validated (see [`super::validate_qkv`]).
pub fn attention_reference(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    bias: Option<&KeyBias>,
    selection: Option<&BlockSelection>,
    opts: &AttentionOptions,
) -> AttentionOutput {
    reference_attention(q, k, v, bias, selection, None, opts)
}

/// [`attention_reference`] with `visibility` (true = visible, `[b, hq, sq, sk]`) in place of
/// `opts`' causal and window mask when given: the packed-sequence mask.
pub(crate) fn reference_attention(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    bias: Option<&KeyBias>,
    selection: Option<&BlockSelection>,
    visibility: Option<Tensor<4, Bool>>,
    opts: &AttentionOptions,
) -> AttentionOutput {
    let dims = super::validate_qkv(&q, &k, &v).expect("attention_reference: invalid q/k/v");
    let mut mask = visibility.or_else(|| position_mask(&dims, opts, &q.device()));
    if let Some(sel) = selection {
        let sel_mask = selection_mask(sel, &dims);
        mask = Some(match mask {
            Some(m) => m.bool_and(sel_mask),
            None => sel_mask,
        });
    }
    let bias_scores = bias.map(|b| expand_key_tensor(b.values.clone(), &dims));
    if let Some(keep) = bias.and_then(|b| b.keep.as_ref().map(|keep| (b, keep))) {
        let keep_mask = keep_mask(keep.0, keep.1, &dims);
        mask = Some(match mask {
            Some(m) => m.bool_and(keep_mask),
            None => keep_mask,
        });
    }
    masked_attention(q, k, v, mask, bias_scores, opts.scale_for(dims.head_dim), &dims)
}

/// Scores `q k^T * scale (+ bias)` of shape `[b, hq, sq, sk]`, computed per kv head so K is
/// never repeated for the query heads of a group.
pub fn scores(q: Tensor<4>, k: Tensor<4>, scale: f64, dims: &AttnDims) -> Tensor<4> {
    let AttnDims { batch: b, heads_q: hq, heads_kv: hkv, seq_q: sq, seq_k: sk, head_dim: d } = *dims;
    let g = hq / hkv;
    q.reshape([b, hkv, g * sq, d])
        .matmul(k.swap_dims(2, 3))
        .reshape([b, hq, sq, sk])
        .mul_scalar(scale)
}

/// `p @ v` for probabilities `[b, hq, sq, sk]` against `v [b, hkv, sk, d]`.
pub fn apply_values(p: Tensor<4>, v: Tensor<4>, dims: &AttnDims) -> Tensor<4> {
    let AttnDims { batch: b, heads_q: hq, heads_kv: hkv, seq_q: sq, seq_k: sk, head_dim: d } = *dims;
    let g = hq / hkv;
    p.reshape([b, hkv, g * sq, sk]).matmul(v).reshape([b, hq, sq, d])
}

/// Softmax of `scores` restricted to `mask` (true = visible), safe for rows with no visible
/// key: such rows get probabilities 0, LSE `-inf` and zero gradients.
///
/// Returns the probabilities `[b, hq, sq, sk]` and the LSE `[b, hq, sq]` (detached).
pub fn masked_softmax(scores: Tensor<4>, mask: Option<Tensor<4, Bool>>) -> (Tensor<4>, Tensor<3>) {
    let s = match mask {
        Some(m) => scores.mask_fill(m.bool_not(), f64::NEG_INFINITY),
        None => scores,
    };
    // The row max only stabilises the exponentials; softmax does not depend on it, so it is
    // detached, and an all-masked row uses 0 instead of -inf to avoid `-inf - -inf`.
    let m = s.clone().detach().max_dim(3);
    let m_safe = m.clone().mask_fill(m.equal_elem(f64::NEG_INFINITY), 0.0);
    let p = (s - m_safe.clone()).exp();
    let l = p.clone().sum_dim(3);
    let empty = l.clone().equal_elem(0.0);
    let l_safe = l.mask_fill(empty.clone(), 1.0);
    let lse = (m_safe + l_safe.clone().log()).mask_fill(empty, f64::NEG_INFINITY);
    let [b, h, sq, _] = lse.dims();
    (p / l_safe, lse.reshape([b, h, sq]).detach())
}

/// Attention over an explicit visibility mask; the core of every reference.
pub fn masked_attention(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    mask: Option<Tensor<4, Bool>>,
    bias: Option<Tensor<4>>,
    scale: f64,
    dims: &AttnDims,
) -> AttentionOutput {
    let mut s = scores(q, k, scale, dims);
    if let Some(bias) = bias {
        s = s + bias;
    }
    let (p, lse) = masked_softmax(s, mask);
    AttentionOutput { output: apply_values(p, v, dims), lse }
}

/// Causal / window mask `[b, hq, sq, sk]`, or `None` when every key is visible.
///
/// Built on the device from integer comparisons, like every other mask of the reference, so
/// all masks share one bool representation (a host-built `Vec<bool>` mask has another one on
/// some backends, and combining the two trips their debug assertions).
pub fn position_mask(dims: &AttnDims, opts: &AttentionOptions, device: &burn::tensor::Device) -> Option<Tensor<4, Bool>> {
    if !opts.causal && opts.window.is_none() {
        return None;
    }
    let (sq, sk) = (dims.seq_q, dims.seq_k);
    // Key-aligned query positions (bottom-right alignment) against key positions.
    let offset = sk as i64 - sq as i64;
    let pos = (Tensor::<1, Int>::arange(0..sq as i64, device) + offset).reshape([sq, 1]).expand([sq, sk]);
    let key = Tensor::<1, Int>::arange(0..sk as i64, device).reshape([1, sk]).expand([sq, sk]);
    let mut visible: Option<Tensor<2, Bool>> = None;
    if opts.causal {
        visible = Some(key.clone().lower_equal(pos.clone()));
    }
    if let Some(w) = opts.window {
        let in_window = key.greater(pos - w as i64);
        visible = Some(match visible {
            Some(m) => m.bool_and(in_window),
            None => in_window,
        });
    }
    let m = visible.expect("causal or window is set");
    Some(m.unsqueeze::<4>().expand([dims.batch, dims.heads_q, sq, sk]))
}

/// Broadcasts a per-key tensor `[b, hb, sk]` (hb = heads_kv or heads_q) to `[b, hq, sq, sk]`.
pub fn expand_key_tensor(values: Tensor<3>, dims: &AttnDims) -> Tensor<4> {
    let [b, hb, sk] = values.dims();
    let per = dims.heads_q / hb;
    values
        .reshape([b, hb, 1, 1, sk])
        .expand([b, hb, per, dims.seq_q, sk])
        .reshape([b, dims.heads_q, dims.seq_q, sk])
}

fn expand_row_tensor<K: burn::tensor::kind::Basic>(values: Tensor<3, K>, dims: &AttnDims) -> Tensor<4, K> {
    let [b, hb, sq] = values.dims();
    let per = dims.heads_q / hb;
    values
        .reshape([b, hb, 1, sq, 1])
        .expand([b, hb, per, sq, dims.seq_k])
        .reshape([b, dims.heads_q, sq, dims.seq_k])
}

fn keep_mask(bias: &KeyBias, keep: &super::KeepThreshold, dims: &AttnDims) -> Tensor<4, Bool> {
    let b = expand_key_tensor(bias.values.clone().detach(), dims);
    let t = expand_row_tensor(keep.value.clone().detach(), dims);
    let ti = expand_row_tensor(keep.index.clone(), dims);
    let j = Tensor::<1, Int>::arange(0..dims.seq_k as i64, &b.device())
        .reshape([1, 1, 1, dims.seq_k])
        .expand([dims.batch, dims.heads_q, dims.seq_q, dims.seq_k]);
    let above = b.clone().greater(t.clone());
    let tie = b.equal(t).bool_and(j.greater_equal(ti));
    above.bool_or(tie)
}

/// Visibility `[b, hq, sq, sk]` implied by a block selection (ignoring causal masks).
pub fn selection_mask(sel: &BlockSelection, dims: &AttnDims) -> Tensor<4, Bool> {
    let device = sel.indices.device();
    let [b, hs, r, c] = sel.indices.dims();
    let nkb = dims.seq_k.div_ceil(sel.key_block);
    let idx = sel.indices.clone();
    // Out-of-range entries are ignored like the -1 padding; shifting by one makes the
    // padding class 0, which is dropped after the one-hot.
    let idx = idx.clone().mask_fill(idx.greater_equal_elem(nkb as i64), -1).clamp_min(-1) + 1;
    let onehot: Tensor<2, Int> = idx.reshape([b * hs * r * c]).one_hot(nkb + 1);
    // Per-block selection counts, kept as integers through the gathers below and compared
    // once at the end, so this mask is a comparison result like every other mask here
    // (gathering a bool tensor changes its storage on some backends).
    let blocks = onehot
        .reshape([b, hs, r, c, nkb + 1])
        .sum_dim(3)
        .reshape([b, hs, r, nkb + 1])
        .slice([0..b, 0..hs, 0..r, 1..nkb + 1]);
    let key_to_block: Vec<i64> = (0..dims.seq_k).map(|j| (j / sel.key_block) as i64).collect();
    let key_to_block = Tensor::<1, Int>::from_data(TensorData::new(key_to_block, [dims.seq_k]), &device);
    let row_of_query: Vec<i64> = (0..dims.seq_q).map(|i| (i / sel.query_block) as i64).collect();
    let row_of_query = Tensor::<1, Int>::from_data(TensorData::new(row_of_query, [dims.seq_q]), &device);
    let mut m = blocks.select(3, key_to_block).select(2, row_of_query);
    if hs != dims.heads_q {
        let g = dims.heads_q / hs;
        let head_map: Vec<i64> = (0..dims.heads_q).map(|h| (h / g) as i64).collect();
        m = m.select(1, Tensor::<1, Int>::from_data(TensorData::new(head_map, [dims.heads_q]), &device));
    }
    m.greater_elem(0)
}
