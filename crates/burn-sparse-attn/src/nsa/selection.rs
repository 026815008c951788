//! NSA's block selection: compression probabilities mapped onto selection blocks by overlap.

use burn::tensor::{Bool, Device, Tensor, TensorData};

use super::{NsaParams, num_compressed};
use crate::attention::reference::scores;
use crate::attention::validate_qkv;
use crate::block_sparse::BlockSelection;
use crate::error::{Result, shape_err};

/// Overlap weights `[n_cmp, n_sel]` (row-major) from compressed tokens to selection blocks:
/// keys shared by window `i` (`[i*stride, i*stride + block)`) and selection block `j`
/// (`[j*select_block, (j+1)*select_block)`), divided by the stride.
///
/// With the defaults (32, 16, 64) block `j` gets weights 1, 2, 2, 2, 1 from compressed tokens
/// `4j-1 ..= 4j+3`: the spatial overlap used by published implementations. The paper's Eq. 9
/// writes the same weights at `4j-4 ..= 4j`, which maps windows onto the wrong block.
pub fn nsa_overlap_weights(n_cmp: usize, n_sel: usize, params: &NsaParams) -> Vec<f32> {
    let (l, d, ls) = (params.compress_block, params.compress_stride, params.select_block);
    let mut w = vec![0f32; n_cmp * n_sel];
    for i in 0..n_cmp {
        let (a0, a1) = (i * d, i * d + l);
        for j in 0..n_sel {
            let (b0, b1) = (j * ls, (j + 1) * ls);
            let shared = a1.min(b1).saturating_sub(a0.max(b0));
            w[i * n_sel + j] = shared as f32 / d as f32;
        }
    }
    w
}

/// Visibility `[sq, n_cmp]` of compressed tokens: `i * stride + block - 1 <= t`.
pub(crate) fn compressed_visibility(sq: usize, seq_k: usize, n_cmp: usize, params: &NsaParams, device: &Device) -> Tensor<2, Bool> {
    let (pos, i) = crate::grid::row_col(sq, n_cmp, seq_k as i64 - sq as i64, device);
    (i * params.compress_stride as i64 + (params.compress_block as i64 - 1)).lower_equal(pos)
}

/// Selection-block scores `[b, hkv, sq, n_sel]`: compression probabilities
/// `exp(scale * q.k_cmp - lse_cmp)` summed over the query heads of each GQA group, then over
/// the windows overlapping each block with [`nsa_overlap_weights`]. No gradient flows.
pub fn nsa_selection_scores(q: Tensor<4>, k_cmp: Tensor<4>, lse_cmp: Tensor<3>, seq_k: usize, params: &NsaParams) -> Result<Tensor<4>> {
    params.validate()?;
    let [b, hq, sq, d] = q.dims();
    let hkv = k_cmp.dims()[1];
    let n_sel = seq_k.div_ceil(params.select_block);
    let device = q.device();
    let n_cmp = k_cmp.dims()[2];
    if n_cmp == 0 {
        return Ok(Tensor::zeros([b, hkv, sq, n_sel], (&device, q.dtype())));
    }
    if n_cmp != num_compressed(seq_k, params.compress_block, params.compress_stride) {
        return shape_err("k_cmp", format!("{n_cmp} compressed tokens do not match seq_k = {seq_k}"));
    }
    if lse_cmp.dims() != [b, hq, sq] {
        return shape_err("lse_cmp", format!("expected {:?}, got {:?}", [b, hq, sq], lse_cmp.dims()));
    }
    let dims = validate_qkv(&q, &k_cmp, &k_cmp)?;
    let scale = params.scale.unwrap_or(1.0 / (d as f64).sqrt());
    let s = scores(q.detach(), k_cmp.detach(), scale, &dims);
    let lse = lse_cmp.detach().reshape([b, hq, sq, 1]);
    let empty = lse.clone().equal_elem(f64::NEG_INFINITY);
    let lse = lse.mask_fill(empty, 0.0).expand([b, hq, sq, n_cmp]);
    let visible = compressed_visibility(sq, seq_k, n_cmp, params, &device).unsqueeze::<4>().expand([b, hq, sq, n_cmp]);
    let p = (s - lse).exp().mask_fill(visible.bool_not(), 0.0);
    nsa_block_scores_from_probs(p, hkv, seq_k, params)
}

/// Selection-block scores `[b, heads_kv, sq, n_sel]` from a given compression-attention
/// probability map `p_cmp: [b, heads_p, sq, n_cmp]` (the overlap-weighted transform on its
/// own, for maps computed elsewhere): the probabilities are summed over the query heads of
/// each GQA group when `heads_p` is a multiple of `heads_kv` (`heads_p == heads_kv`: already
/// per kv head), then spread onto selection blocks with [`nsa_overlap_weights`]. Detached.
pub fn nsa_block_scores_from_probs(p_cmp: Tensor<4>, heads_kv: usize, seq_k: usize, params: &NsaParams) -> Result<Tensor<4>> {
    params.validate()?;
    let [b, hp, sq, n_cmp] = p_cmp.dims();
    if heads_kv == 0 || hp % heads_kv != 0 {
        return shape_err("p_cmp", format!("heads ({hp}) must be a multiple of heads_kv ({heads_kv})"));
    }
    if n_cmp != num_compressed(seq_k, params.compress_block, params.compress_stride) {
        return shape_err(
            "p_cmp",
            format!("{n_cmp} compressed tokens, expected {} for seq_k = {seq_k}", num_compressed(seq_k, params.compress_block, params.compress_stride)),
        );
    }
    let n_sel = seq_k.div_ceil(params.select_block);
    let (device, dtype) = (p_cmp.device(), p_cmp.dtype());
    if n_cmp == 0 {
        return Ok(Tensor::zeros([b, heads_kv, sq, n_sel], (&device, dtype)));
    }
    let g = hp / heads_kv;
    let p_group = p_cmp.detach().reshape([b, heads_kv, g, sq, n_cmp]).sum_dim(2).reshape([b, heads_kv, sq, n_cmp]);
    let w = Tensor::<2>::from_data(TensorData::new(nsa_overlap_weights(n_cmp, n_sel, params), [n_cmp, n_sel]), (&device, dtype));
    Ok(p_group.matmul(w.unsqueeze::<4>().expand([b, heads_kv, n_cmp, n_sel])))
}

/// Top-`n` selection per query and kv head from block scores `[b, hkv, sq, n_sel]`: blocks
/// starting after the query are excluded, the first `forced_initial` blocks and the query's
/// `forced_local` most recent ones (current block included) are forced in (defaults: block
/// 0, the current and the previous block); the result has capacity `min(top_n, n_sel)` with
/// `-1` padding.
pub fn nsa_select(scores: Tensor<4>, seq_q: usize, seq_k: usize, params: &NsaParams) -> Result<BlockSelection> {
    params.validate()?;
    let [b, hkv, sq, n_sel] = scores.dims();
    if sq != seq_q || n_sel != seq_k.div_ceil(params.select_block) {
        return shape_err("scores", format!("expected [.., .., {seq_q}, {}], got {:?}", seq_k.div_ceil(params.select_block), scores.dims()));
    }
    // Score offsets, built on the device: +inf on forced blocks (the first `forced_initial`,
    // the `forced_local` most recent), 0 on other blocks that start at or before the query,
    // -inf after.
    let ls = params.select_block as i64;
    let device = scores.device();
    let (pos, j) = crate::grid::row_col(sq, n_sel, seq_k as i64 - seq_q as i64, &device);
    let seen = pos.clone().greater_equal_elem(0);
    let cur = pos.clone().clamp_min(0).div_scalar(ls);
    let initial = j.clone().lower_elem(params.forced_initial as i64);
    let local = j.clone().lower_equal(cur.clone()).bool_and(j.clone().greater(cur - params.forced_local as i64));
    let forced = seen.bool_and(initial.bool_or(local));
    let allowed = (j * ls).lower_equal(pos);
    let add = Tensor::<2>::zeros([sq, n_sel], (&device, scores.dtype()))
        .mask_fill(allowed.bool_not(), f64::NEG_INFINITY)
        .mask_fill(forced, f64::INFINITY);
    let masked = scores.detach() + add.unsqueeze::<4>().expand([b, hkv, sq, n_sel]);
    let (vals, idx) = masked.topk_with_indices(params.top_n.min(n_sel), 3);
    let idx = idx.mask_fill(vals.equal_elem(f64::NEG_INFINITY), -1);
    Ok(BlockSelection::per_token(idx, params.select_block))
}
