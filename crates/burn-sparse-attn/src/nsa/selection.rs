//! NSA's block selection: compression probabilities mapped onto selection blocks by overlap.

use burn::tensor::{Bool, Device, Int, Tensor, TensorData};

use super::NsaParams;
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
    visibility_from(sq, seq_k as i64 - sq as i64, n_cmp, params, device)
}

/// [`compressed_visibility`] for `rows` queries, the first at position `pos0`.
fn visibility_from(rows: usize, pos0: i64, n_cmp: usize, params: &NsaParams, device: &Device) -> Tensor<2, Bool> {
    let (pos, i) = crate::grid::row_col(rows, n_cmp, pos0, device);
    (i * params.compress_stride as i64 + (params.compress_block as i64 - 1)).lower_equal(pos)
}

/// Score elements one chunk of the selection may hold (the kernel's block scores or the
/// tensor ops' probabilities): 2^27 f32 values (512 MiB), so memory is independent of length.
const CHUNK_SCORES: usize = 1 << 27;

/// [`nsa_selection_scores`] followed by [`nsa_select`], over chunks of queries: the scores
/// of one chunk (`[b, hq, rows, n_cmp]`) live only while its lists are chosen, so memory is
/// `O(seq_q x top_n)` plus one chunk instead of `O(seq_q x n_cmp)`. Same lists as the
/// unchunked pair (the same per-row operations).
pub(crate) fn select_in_chunks(q: Tensor<4>, k_cmp: Tensor<4>, lse_cmp: Tensor<3>, seq_k: usize, params: &NsaParams) -> Result<BlockSelection> {
    let [b, hq, _, _] = q.dims();
    let [_, hkv, n_cmp, _] = k_cmp.dims();
    // A chunk holds the kernel's block scores (`b x hkv x rows x n_sel`) or the tensor ops'
    // probabilities (`b x hq x rows x n_cmp`).
    let per_row = if n_cmp > 0 && crate::kernel::nsa_scores_on_device(&q) { b * hkv * seq_k.div_ceil(params.select_block) } else { b * hq * n_cmp };
    select_in_chunks_of(q, k_cmp, lse_cmp, seq_k, params, CHUNK_SCORES / per_row.max(1))
}

/// [`select_in_chunks`] with `rows` queries per chunk.
fn select_in_chunks_of(q: Tensor<4>, k_cmp: Tensor<4>, lse_cmp: Tensor<3>, seq_k: usize, params: &NsaParams, rows: usize) -> Result<BlockSelection> {
    let [b, hq, sq, d] = q.dims();
    let rows = rows.clamp(1, sq.max(1));
    let pos0 = seq_k as i64 - sq as i64;
    let n_cmp = k_cmp.dims()[2];
    let n_sel = seq_k.div_ceil(params.select_block);
    // On Cube devices one kernel scores each chunk's blocks (probabilities never stored);
    // chunks then hold `batch x heads_kv x rows x n_sel` scores.
    if n_cmp > 0 && crate::kernel::nsa_scores_on_device(&q) {
        let lists = crate::grid::row_chunks(sq, rows)
            .map(|(t0, t1)| {
                let scores = crate::kernel::nsa_block_scores(&q, &k_cmp, &lse_cmp, seq_k, t0, t1 - t0, params);
                crate::kernel::topk_indices(scores, params.top_n.min(n_sel))
            })
            .collect();
        return Ok(BlockSelection::per_token(crate::grid::cat_rows(lists), params.select_block));
    }
    let overlap = (n_cmp > 0).then(|| overlap_tensor(n_cmp, n_sel, params, &q.device(), q.dtype()));
    let mut lists = Vec::with_capacity(sq.div_ceil(rows));
    for (t0, t1) in crate::grid::row_chunks(sq, rows) {
        let qc = q.clone().slice([0..b, 0..hq, t0..t1, 0..d]);
        let lc = lse_cmp.clone().slice([0..b, 0..hq, t0..t1]);
        let scores = scores_from(qc, k_cmp.clone(), lc, pos0 + t0 as i64, seq_k, params, overlap.as_ref())?;
        lists.push(select_from(scores, pos0 + t0 as i64, params));
    }
    Ok(BlockSelection::per_token(crate::grid::cat_rows(lists), params.select_block))
}

/// Selection-block scores `[b, hkv, sq, n_sel]`: compression probabilities
/// `exp(scale * q.k_cmp - lse_cmp)` summed over the query heads of each GQA group, then over
/// the windows overlapping each block with [`nsa_overlap_weights`]. No gradient flows.
pub fn nsa_selection_scores(q: Tensor<4>, k_cmp: Tensor<4>, lse_cmp: Tensor<3>, seq_k: usize, params: &NsaParams) -> Result<Tensor<4>> {
    params.validate()?;
    let [b, hq, sq, _] = q.dims();
    let hkv = k_cmp.dims()[1];
    let n_sel = seq_k.div_ceil(params.select_block);
    let device = q.device();
    let n_cmp = k_cmp.dims()[2];
    if n_cmp == 0 {
        return Ok(Tensor::zeros([b, hkv, sq, n_sel], (&device, q.dtype())));
    }
    super::check_compressed_count("k_cmp", n_cmp, seq_k, params)?;
    if lse_cmp.dims() != [b, hq, sq] {
        return shape_err("lse_cmp", format!("expected {:?}, got {:?}", [b, hq, sq], lse_cmp.dims()));
    }
    validate_qkv(&q, &k_cmp, &k_cmp)?;
    scores_from(q, k_cmp, lse_cmp, seq_k as i64 - sq as i64, seq_k, params, None)
}

/// The scores of [`nsa_selection_scores`] for queries whose first sits at position `pos0`
/// (arguments already checked).
fn scores_from(q: Tensor<4>, k_cmp: Tensor<4>, lse_cmp: Tensor<3>, pos0: i64, seq_k: usize, params: &NsaParams, overlap: Option<&Tensor<2>>) -> Result<Tensor<4>> {
    let n_cmp = k_cmp.dims()[2];
    if n_cmp == 0 {
        let [b, _, sq, _] = q.dims();
        let hkv = k_cmp.dims()[1];
        return Ok(Tensor::zeros([b, hkv, sq, seq_k.div_ceil(params.select_block)], (&q.device(), q.dtype())));
    }
    let dims = validate_qkv(&q, &k_cmp, &k_cmp)?;
    let (b, hq, sq, d, hkv) = (dims.batch, dims.heads_q, dims.seq_q, dims.head_dim, dims.heads_kv);
    let scale = params.scale.unwrap_or(1.0 / (d as f64).sqrt());
    let s = scores(q.detach(), k_cmp.detach(), scale, &dims);
    let lse = lse_cmp.detach().cast(s.dtype()).reshape([b, hq, sq, 1]);
    let empty = lse.clone().equal_elem(f64::NEG_INFINITY);
    let lse = lse.mask_fill(empty, 0.0).expand([b, hq, sq, n_cmp]);
    let visible = visibility_from(sq, pos0, n_cmp, params, &s.device()).unsqueeze::<4>().expand([b, hq, sq, n_cmp]);
    let p = (s - lse).exp().mask_fill(visible.bool_not(), 0.0);
    match overlap {
        Some(w) => Ok(group_scores(p, hkv, w)),
        None => nsa_block_scores_from_probs(p, hkv, seq_k, params),
    }
}

/// `[n_cmp, n_sel]` overlap weights on the device (built once per call, not per chunk).
fn overlap_tensor(n_cmp: usize, n_sel: usize, params: &NsaParams, device: &Device, dtype: burn::tensor::DType) -> Tensor<2> {
    Tensor::<2>::from_data(TensorData::new(nsa_overlap_weights(n_cmp, n_sel, params), [n_cmp, n_sel]), (device, dtype))
}

/// Probabilities `[b, hp, sq, n_cmp]` summed over each GQA group, then spread onto the
/// selection blocks with the overlap weights `w: [n_cmp, n_sel]`.
pub(super) fn group_scores(p_cmp: Tensor<4>, heads_kv: usize, w: &Tensor<2>) -> Tensor<4> {
    let [b, hp, sq, n_cmp] = p_cmp.dims();
    let n_sel = w.dims()[1];
    let g = hp / heads_kv;
    let p_group = p_cmp.detach().reshape([b, heads_kv, g, sq, n_cmp]).sum_dim(2).reshape([b, heads_kv, sq, n_cmp]);
    let w = if w.dtype() != p_group.dtype() { w.clone().cast(p_group.dtype()) } else { w.clone() };
    p_group.matmul(w.unsqueeze::<4>().expand([b, heads_kv, n_cmp, n_sel]))
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
    super::check_compressed_count("p_cmp", n_cmp, seq_k, params)?;
    let n_sel = seq_k.div_ceil(params.select_block);
    let (device, dtype) = (p_cmp.device(), p_cmp.dtype());
    if n_cmp == 0 {
        return Ok(Tensor::zeros([b, heads_kv, sq, n_sel], (&device, dtype)));
    }
    Ok(group_scores(p_cmp, heads_kv, &overlap_tensor(n_cmp, n_sel, params, &device, dtype)))
}

/// Top-`n` selection per query and kv head from block scores `[b, hkv, sq, n_sel]`: blocks
/// starting after the query are excluded, the first `forced_initial` blocks and the query's
/// `forced_local` most recent ones (current block included) are forced in (defaults: block
/// 0, the current and the previous block); the result has capacity `min(top_n, n_sel)` with
/// `-1` padding.
pub fn nsa_select(scores: Tensor<4>, seq_q: usize, seq_k: usize, params: &NsaParams) -> Result<BlockSelection> {
    params.validate()?;
    let [_, _, sq, n_sel] = scores.dims();
    if sq != seq_q || n_sel != seq_k.div_ceil(params.select_block) {
        return shape_err("scores", format!("expected [.., .., {seq_q}, {}], got {:?}", seq_k.div_ceil(params.select_block), scores.dims()));
    }
    Ok(BlockSelection::per_token(select_from(scores, seq_k as i64 - seq_q as i64, params), params.select_block))
}

/// The lists of [`nsa_select`] for queries whose first sits at position `pos0`.
fn select_from(scores: Tensor<4>, pos0: i64, params: &NsaParams) -> Tensor<4, Int> {
    let [b, hkv, sq, n_sel] = scores.dims();
    // Score offsets, built on the device: +inf on forced blocks (the first `forced_initial`,
    // the `forced_local` most recent), 0 on other blocks that start at or before the query,
    // -inf after.
    let ls = params.select_block as i64;
    let device = scores.device();
    let (pos, j) = crate::grid::row_col(sq, n_sel, pos0, &device);
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
    crate::kernel::topk_indices(masked, params.top_n.min(n_sel))
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{DType, Distribution};

    /// Chunks of 1, 3 and 7 queries choose exactly the lists of the whole-sequence pair
    /// `nsa_selection_scores` + `nsa_select`, with seq_q < seq_k so positions are offset.
    #[test]
    fn chunked_selection_equals_whole_sequence() {
        let device = Device::flex();
        let params = NsaParams { compress_block: 4, compress_stride: 2, select_block: 4, top_n: 3, ..NsaParams::default() };
        let (b, hq, hkv, sq, sk, d) = (2, 4, 2, 19, 27, 8);
        let n_cmp = crate::nsa::num_compressed(sk, 4, 2);
        let dist = Distribution::Normal(0.0, 1.0);
        let q = Tensor::<4>::random([b, hq, sq, d], dist, (&device, DType::F64));
        let k_cmp = Tensor::<4>::random([b, hkv, n_cmp, d], dist, (&device, DType::F64));
        let v_cmp = Tensor::<4>::random([b, hkv, n_cmp, d], dist, (&device, DType::F64));
        let lse = crate::nsa::nsa_compressed_attention_reference(q.clone(), k_cmp.clone(), v_cmp, sk, &params).unwrap().lse;
        let scores = nsa_selection_scores(q.clone(), k_cmp.clone(), lse.clone(), sk, &params).unwrap();
        let whole = nsa_select(scores, sq, sk, &params).unwrap().indices.into_data();
        for rows in [1, 3, 7, 100] {
            let chunked = select_in_chunks_of(q.clone(), k_cmp.clone(), lse.clone(), sk, &params, rows).unwrap();
            assert_eq!(chunked.indices.into_data(), whole, "chunks of {rows} rows");
        }
    }

    /// On a Cube device the block-score kernel and the row top-k choose, chunk by chunk, the
    /// lists the tensor ops choose on Flex (as sets; ties at the top-n boundary allowed), with
    /// GQA 4 and seq_q < seq_k. Compiles two small shaders, so CI runs it on software Vulkan.
    #[cfg(feature = "wgpu")]
    #[test]
    fn kernel_selection_equals_tensor_ops() {
        let flex = Device::flex();
        let gpu = Device::wgpu(Default::default());
        let params = NsaParams { compress_block: 8, compress_stride: 4, select_block: 8, top_n: 3, ..NsaParams::default() };
        let (b, hq, hkv, sq, sk, d) = (1, 8, 2, 45, 60, 16);
        let n_cmp = crate::nsa::num_compressed(sk, 8, 4);
        let dist = Distribution::Normal(0.0, 1.0);
        let q = Tensor::<4>::random([b, hq, sq, d], dist, (&flex, DType::F32));
        let k_cmp = Tensor::<4>::random([b, hkv, n_cmp, d], dist, (&flex, DType::F32));
        let lse = crate::nsa::nsa_compressed_attention_reference(q.clone(), k_cmp.clone(), k_cmp.clone(), sk, &params).unwrap().lse;
        let want = select_in_chunks_of(q.clone(), k_cmp.clone(), lse.clone(), sk, &params, 100).unwrap().indices;
        let scores = nsa_selection_scores(q.clone(), k_cmp.clone(), lse.clone(), sk, &params).unwrap();
        let scores: Vec<f32> = scores.into_data().convert::<f32>().try_to_vec::<f32>().unwrap();
        let to = |t: Tensor<4>| Tensor::<4>::from_data(t.into_data(), &gpu);
        let lse_g = Tensor::<3>::from_data(lse.into_data(), &gpu);
        let want: Vec<i64> = want.into_data().convert::<i64>().try_to_vec::<i64>().unwrap();
        let n_sel = sk.div_ceil(8);
        for rows in [7, 100] {
            let got = select_in_chunks_of(to(q.clone()), to(k_cmp.clone()), lse_g.clone(), sk, &params, rows).unwrap().indices;
            let got: Vec<i64> = got.into_data().convert::<i64>().try_to_vec::<i64>().unwrap();
            for (r, (a, w)) in got.chunks(3).zip(want.chunks(3)).enumerate() {
                let only_a: Vec<i64> = a.iter().copied().filter(|x| *x >= 0 && !w.contains(x)).collect();
                let only_w: Vec<i64> = w.iter().copied().filter(|x| *x >= 0 && !a.contains(x)).collect();
                assert_eq!(only_a.len(), only_w.len(), "row {r}: {a:?} vs {w:?}");
                for (&x, &y) in only_a.iter().zip(&only_w) {
                    let (sx, sy) = (scores[r * n_sel + x as usize], scores[r * n_sel + y as usize]);
                    assert!((sx - sy).abs() <= 1e-4 * sy.abs().max(1.0), "row {r}: kernel {a:?} vs reference {w:?}");
                }
            }
        }
    }
}
