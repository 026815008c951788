//! NSA on packed variable-length batches (FlashAttention's varlen convention, see
//! [`crate::varlen`]): every sequence gets its own compression windows, its own compressed
//! tokens, its own selection blocks (numbered from 0 at its start) and its own window, as if
//! it were run alone, in one call for the whole pack.
//!
//! - Compressed tokens are packed like the keys: sequence `s` holds
//!   [`nsa_compressed_cu_seqlens`]`[s] .. [s + 1]` of `k_cmp` / `v_cmp`, its windows never
//!   crossing into another sequence ([`compress_mean_varlen`] builds them by mean pooling).
//! - The compressed branch is one attention call whose per-row key interval is the row's
//!   visible compressed tokens of its own sequence (NSA's rule `i * stride + block - 1 <= t`
//!   with `t` the row's position in its sequence).
//! - Selection scores the blocks of each row's own sequence (the compression probabilities
//!   on the overlap weights, block-diagonal over sequences), forced blocks counted from each
//!   sequence's start; the lists hold block numbers local to the sequence, as
//!   flash-linear-attention's varlen NSA counts them. The selection and window branches are
//!   [`block_sparse_attention_varlen`] and [`attention_varlen`].

use burn::tensor::{Int, Tensor, TensorData};
use sparse_attn_kernels::VarlenBounds;

use super::compression::{TrailingWindow, num_compressed, num_compressed_with};
use super::selection::group_scores;
use super::{NsaBlocks, NsaInputs, NsaOutput, NsaParams, apply_counts, given_blocks, nsa_combine, rename_kv, window_off};
use crate::attention::reference::scores;
use crate::attention::{AttentionOptions, AttentionOutput, attention_in_bounds, validate_qkv};
use crate::block_sparse::{BlockSelection, block_sparse_attention_varlen};
use crate::error::{Result, check_positive, shape_err};
use crate::varlen::{VarLen, attention_varlen};

/// Boundaries of the packed compressed tokens: sequence `s` of keys `cu_seqlens_k[s] ..
/// cu_seqlens_k[s + 1]` has [`num_compressed_with`] of its length tokens, packed in order.
pub fn nsa_compressed_cu_seqlens(cu_seqlens_k: &[usize], params: &NsaParams, trailing: TrailingWindow) -> Vec<usize> {
    let mut cu = vec![0];
    for w in cu_seqlens_k.windows(2) {
        let n = num_compressed_with(w[1] - w[0], params.compress_block, params.compress_stride, trailing);
        cu.push(cu[cu.len() - 1] + n);
    }
    cu
}

/// Mean-pooling compression of a packed tensor `[b, h, total, d]` (sequences at
/// `cu_seqlens`), each sequence's windows of `block` keys `stride` apart taken inside it:
/// `[b, h, n_total, d]` packed as [`nsa_compressed_cu_seqlens`] says. With
/// [`TrailingWindow::Partial`] a sequence's leftover keys make one more token (their mean).
/// Equals [`super::compress_mean_with`] on every sequence alone.
pub fn compress_mean_varlen(x: Tensor<4>, cu_seqlens: &[usize], block: usize, stride: usize, trailing: TrailingWindow) -> Result<Tensor<4>> {
    check_positive("compress_block", block)?;
    check_positive("compress_stride", stride)?;
    sparse_attn_kernels::varlen::check_cu_seqlens("cu_seqlens", cu_seqlens).map_err(crate::varlen::boundary_error)?;
    if stride > block {
        return crate::error::param_err("compress_stride", format!("must not exceed compress_block ({block}), got {stride}"));
    }
    let [b, h, total, d] = x.dims();
    let end = cu_seqlens[cu_seqlens.len() - 1];
    if end != total {
        return shape_err("cu_seqlens", format!("ends at {end}, but x has {total} rows"));
    }
    // Every token as `block` gathered rows with weights (1 / keys pooled; 0 on padding).
    let (mut index, mut weight) = (Vec::new(), Vec::new());
    for w in cu_seqlens.windows(2) {
        let (start, len) = (w[0], w[1] - w[0]);
        let complete = num_compressed(len, block, stride);
        for i in 0..num_compressed_with(len, block, stride, trailing) {
            let first = i * stride;
            let keys = if i < complete { block } else { len - first };
            for j in 0..block {
                index.push((start + first + j.min(keys - 1)) as i64);
                weight.push(if j < keys { 1.0 / keys as f64 } else { 0.0 });
            }
        }
    }
    let n = index.len() / block;
    let device = x.device();
    if n == 0 {
        return Ok(Tensor::zeros([b, h, 0, d], (&device, x.dtype())));
    }
    let index = Tensor::<1, Int>::from_data(TensorData::new(index, [n * block]), &device);
    let weight = Tensor::<1>::from_data(TensorData::new(weight, [n * block]), (&device, x.dtype())).reshape([1, 1, n, block, 1]);
    let windows = x.select(2, index).reshape([b, h, n, block, d]);
    Ok((windows * weight.expand([b, h, n, block, d])).sum_dim(3).reshape([b, h, n, d]))
}

/// The packed compressed tokens' layout for `varlen`: `(cu_cmp, complete)`, `complete[s]`
/// the tokens of sequence `s` that some query can see (the trailing partial one never is).
/// `n_cmp` must be the complete windows of every sequence or those plus the partial ones.
fn compressed_layout(arg: &'static str, n_cmp: usize, varlen: &VarLen, params: &NsaParams) -> Result<(Vec<usize>, Vec<usize>)> {
    let cu_k = varlen.cu_seqlens_k();
    let drop = nsa_compressed_cu_seqlens(cu_k, params, TrailingWindow::Drop);
    let partial = nsa_compressed_cu_seqlens(cu_k, params, TrailingWindow::Partial);
    let complete: Vec<usize> = drop.windows(2).map(|w| w[1] - w[0]).collect();
    let (d_total, p_total) = (drop[drop.len() - 1], partial[partial.len() - 1]);
    if n_cmp == d_total {
        Ok((drop, complete))
    } else if n_cmp == p_total {
        Ok((partial, complete))
    } else {
        let expected = if d_total == p_total { format!("{d_total}") } else { format!("{d_total} (complete windows) or {p_total} (with each sequence's trailing partial one)") };
        shape_err(arg, format!("{n_cmp} compressed tokens, expected {expected} for the packed sequences (nsa_compressed_cu_seqlens)"))
    }
}

/// Row `t` of a sequence with `lq` queries and `lk` keys sits at key position `t + lk - lq`;
/// it sees its sequence's first `visible_compressed(..)` compressed tokens.
fn visible_compressed(pos: i64, complete: usize, params: &NsaParams) -> usize {
    let (l, d) = (params.compress_block as i64, params.compress_stride as i64);
    if pos < l - 1 { 0 } else { (((pos - (l - 1)) / d + 1) as usize).min(complete) }
}

/// NSA's compressed-token visibility as per-row and per-token intervals of the pack.
fn compressed_bounds(varlen: &VarLen, cu_cmp: &[usize], complete: &[usize], params: &NsaParams) -> VarlenBounds {
    let cu_q = varlen.cu_seqlens_q();
    let cu_k = varlen.cu_seqlens_k();
    let (total_q, total_c) = (varlen.total_q(), cu_cmp[cu_cmp.len() - 1]);
    let mut row_keys = vec![0i32; 2 * total_q];
    let mut key_rows = vec![0i32; 2 * total_c];
    let (l, d) = (params.compress_block as i64, params.compress_stride as i64);
    for s in 0..varlen.num_sequences() {
        let (lq, lk) = (cu_q[s + 1] - cu_q[s], cu_k[s + 1] - cu_k[s]);
        let off = lk as i64 - lq as i64;
        for t in 0..lq {
            let r = cu_q[s] + t;
            row_keys[2 * r] = cu_cmp[s] as i32;
            row_keys[2 * r + 1] = (cu_cmp[s] + visible_compressed(t as i64 + off, complete[s], params)) as i32;
        }
        for i in 0..cu_cmp[s + 1] - cu_cmp[s] {
            // Token i is seen from position i * d + l - 1 on; the partial token by no row.
            let first = if i < complete[s] { (i as i64 * d + l - 1 - off).clamp(0, lq as i64) as usize } else { lq };
            let c = cu_cmp[s] + i;
            key_rows[2 * c] = (cu_q[s] + first) as i32;
            key_rows[2 * c + 1] = cu_q[s + 1] as i32;
        }
    }
    VarlenBounds { row_keys, key_rows }
}

/// NSA's compressed branch on a packed batch: each row attends to the compressed tokens of
/// its own sequence whose window has ended at its position (`k_cmp`, `v_cmp` packed as
/// [`nsa_compressed_cu_seqlens`], with or without the trailing partial tokens). Rows that
/// see no token give 0 and LSE `-inf`. Equals [`super::nsa_compressed_attention`] on every
/// sequence alone, in one call.
pub fn nsa_compressed_attention_varlen(q: Tensor<4>, k_cmp: Tensor<4>, v_cmp: Tensor<4>, varlen: &VarLen, params: &NsaParams) -> Result<AttentionOutput> {
    params.validate()?;
    let [b, hq, tq, d] = q.dims();
    if tq != varlen.total_q() {
        return shape_err("cu_seqlens_q", format!("ends at {}, but q has {tq} rows", varlen.total_q()));
    }
    let (cu_cmp, complete) = compressed_layout("k_cmp", k_cmp.dims()[2], varlen, params)?;
    if cu_cmp[cu_cmp.len() - 1] == 0 {
        let device = q.device();
        return Ok(AttentionOutput {
            output: Tensor::zeros([b, hq, tq, d], (&device, q.dtype())),
            lse: Tensor::full([b, hq, tq], f64::NEG_INFINITY, (&device, q.dtype())),
        });
    }
    let bounds = compressed_bounds(varlen, &cu_cmp, &complete, params);
    let opts = AttentionOptions { causal: false, window: None, scale: params.scale };
    attention_in_bounds(q, k_cmp, v_cmp, None, None, Some(&bounds), &opts).map_err(|e| rename_kv(e, "k_cmp", "v_cmp"))
}

/// Score elements one chunk of the packed selection holds (as the unpacked selection).
const CHUNK_SCORES: usize = 1 << 27;

/// The per-row facts selection needs, host side: each row's position in its sequence, the
/// packed numbers of its sequence's first selection block and compressed token, and its
/// sequence's block count.
struct SelectionRows {
    pos: Vec<i64>,
    first_block: Vec<i64>,
    n_blocks: Vec<i64>,
    cmp_lo: Vec<i64>,
    cmp_hi: Vec<i64>,
}

/// NSA's selection on a packed batch: lists `[b, heads_kv, total_q, min(top_n, max blocks)]`
/// of block numbers local to each row's sequence, chosen among that sequence's blocks only.
///
/// Rows are scored in chunks that follow the sequences: a chunk holds whole consecutive
/// sequences (or part of one long sequence) and scores them only against their own
/// compressed tokens and blocks, so the work and memory are those of the sequences' own
/// score matrices, never `total x total`.
#[allow(clippy::too_many_arguments)]
fn select_packed(q: Tensor<4>, k_cmp: Tensor<4>, lse_cmp: Tensor<3>, varlen: &VarLen, cu_cmp: &[usize], complete: &[usize], params: &NsaParams, budget: usize) -> Result<Tensor<4, Int>> {
    let [b, hq, tq, d] = q.dims();
    let hkv = k_cmp.dims()[1];
    let ls = params.select_block;
    let cu_k = varlen.cu_seqlens_k();
    let n_sel: Vec<usize> = cu_k.windows(2).map(|w| (w[1] - w[0]).div_ceil(ls)).collect();
    let cu_sel: Vec<usize> = std::iter::once(0)
        .chain(n_sel.iter().scan(0, |acc, n| {
            *acc += n;
            Some(*acc)
        }))
        .collect();
    let cap = params.top_n.min(n_sel.iter().copied().max().unwrap_or(0)).max(1);
    let rows = rows_of(varlen, cu_cmp, complete, &cu_sel, &n_sel, params);
    let scale = params.scale.unwrap_or(1.0 / (d as f64).sqrt());
    let device = q.device();
    let mut lists = Vec::new();
    for chunk in selection_chunks(varlen.cu_seqlens_q(), cu_cmp, &cu_sel, b * hq, b * hkv, budget) {
        let (t0, t1) = (chunk.rows.start, chunk.rows.end);
        let (c0, c1) = (cu_cmp[chunk.seqs.start], cu_cmp[chunk.seqs.end]);
        let (j0, j1) = (cu_sel[chunk.seqs.start], cu_sel[chunk.seqs.end]);
        let (n, nc, nj) = (t1 - t0, c1 - c0, (j1 - j0).max(1));
        let scores = if nc == 0 {
            // No compressed token: only forced blocks can be told apart.
            Tensor::<4>::zeros([b, hkv, n, nj], (&device, q.dtype()))
        } else {
            let qc = q.clone().slice([0..b, 0..hq, t0..t1, 0..d]).detach();
            let kc = k_cmp.clone().slice([0..b, 0..hkv, c0..c1, 0..d]).detach();
            let cdims = crate::attention::AttnDims { batch: b, heads_q: hq, heads_kv: hkv, seq_q: n, seq_k: nc, head_dim: d };
            let sc = scores(qc, kc, scale, &cdims);
            let lse = lse_cmp.clone().slice([0..b, 0..hq, t0..t1]).detach().cast(sc.dtype()).reshape([b, hq, n, 1]);
            let empty = lse.clone().equal_elem(f64::NEG_INFINITY);
            let lse = lse.mask_fill(empty, 0.0).expand([b, hq, n, nc]);
            let column = |v: &[i64]| {
                let local: Vec<i64> = v[t0..t1].iter().map(|x| x - c0 as i64).collect();
                Tensor::<1, Int>::from_data(TensorData::new(local, [n]), &device).reshape([n, 1]).expand([n, nc])
            };
            let (_, i) = crate::grid::row_col(n, nc, 0, &device);
            let visible = i.clone().greater_equal(column(&rows.cmp_lo)).bool_and(i.lower(column(&rows.cmp_hi)));
            let p = (sc - lse).exp().mask_fill(visible.unsqueeze::<4>().expand([b, hq, n, nc]).bool_not(), 0.0);
            // Overlap weights of the chunk's sequences, block-diagonal: [nc, nj].
            let mut w = vec![0f32; nc * nj];
            for s in chunk.seqs.clone() {
                let one = super::nsa_overlap_weights(complete[s], n_sel[s], params);
                for i in 0..complete[s] {
                    for j in 0..n_sel[s] {
                        w[(cu_cmp[s] - c0 + i) * nj + cu_sel[s] - j0 + j] = one[i * n_sel[s] + j];
                    }
                }
            }
            let w = Tensor::<2>::from_data(TensorData::new(w, [nc, nj]), (&device, q.dtype()));
            group_scores(p, hkv, &w)
        };
        lists.push(choose(scores, &rows, t0, j0, cap, params));
    }
    if lists.is_empty() {
        return Ok(Tensor::<4, Int>::full([b, hkv, tq, cap], -1, &device));
    }
    Ok(crate::grid::cat_rows(lists))
}

/// Rows `rows` of the pack, lying in sequences `seqs`, scored together.
struct SelectionChunk {
    rows: std::ops::Range<usize>,
    seqs: std::ops::Range<usize>,
}

/// Chunks of whole consecutive sequences whose scores (probabilities over their compressed
/// tokens for `prob_heads`, block scores for `score_heads`) fit `budget` values; a sequence
/// too long for one chunk is split by rows. Sequences without queries add no rows.
fn selection_chunks(cu_q: &[usize], cu_cmp: &[usize], cu_sel: &[usize], prob_heads: usize, score_heads: usize, budget: usize) -> Vec<SelectionChunk> {
    let ns = cu_q.len() - 1;
    let cost = |a: usize, e: usize| (cu_q[e] - cu_q[a]) * (prob_heads * (cu_cmp[e] - cu_cmp[a]) + score_heads * (cu_sel[e] - cu_sel[a]).max(1));
    let mut chunks = Vec::new();
    let mut s = 0;
    while s < ns {
        if cu_q[s + 1] == cu_q[s] {
            s += 1;
            continue;
        }
        let mut e = s + 1;
        while e < ns && cost(s, e + 1) <= budget {
            e += 1;
        }
        if e > s + 1 || cost(s, e) <= budget {
            chunks.push(SelectionChunk { rows: cu_q[s]..cu_q[e], seqs: s..e });
        } else {
            let per_row = cost(s, e) / (cu_q[e] - cu_q[s]);
            for (t0, t1) in crate::grid::row_chunks(cu_q[e] - cu_q[s], (budget / per_row.max(1)).max(1)) {
                chunks.push(SelectionChunk { rows: cu_q[s] + t0..cu_q[s] + t1, seqs: s..e });
            }
        }
        s = e;
    }
    chunks
}

fn rows_of(varlen: &VarLen, cu_cmp: &[usize], complete: &[usize], cu_sel: &[usize], n_sel: &[usize], params: &NsaParams) -> SelectionRows {
    let (cu_q, cu_k) = (varlen.cu_seqlens_q(), varlen.cu_seqlens_k());
    let mut r = SelectionRows { pos: vec![], first_block: vec![], n_blocks: vec![], cmp_lo: vec![], cmp_hi: vec![] };
    for s in 0..varlen.num_sequences() {
        let (lq, lk) = (cu_q[s + 1] - cu_q[s], cu_k[s + 1] - cu_k[s]);
        for t in 0..lq {
            let pos = t as i64 + lk as i64 - lq as i64;
            r.pos.push(pos);
            r.first_block.push(cu_sel[s] as i64);
            r.n_blocks.push(n_sel[s] as i64);
            r.cmp_lo.push(cu_cmp[s] as i64);
            r.cmp_hi.push((cu_cmp[s] + visible_compressed(pos, complete[s], params)) as i64);
        }
    }
    r
}

/// Top-`cap` blocks of the rows starting at `t0` from block scores `[b, hkv, rows, nj]`
/// over the pack's blocks `j0 .. j0 + nj`: only the row's own sequence's blocks that start at
/// or before it, its forced blocks (counted from the sequence's start) first; returned as
/// local block numbers, `-1` padded to `cap`.
fn choose(scores: Tensor<4>, rows: &SelectionRows, t0: usize, j0: usize, cap: usize, params: &NsaParams) -> Tensor<4, Int> {
    let [b, hkv, n, nj] = scores.dims();
    let device = scores.device();
    // Each row's offset from a chunk column to its sequence's local block number.
    let shift: Vec<i64> = rows.first_block[t0..t0 + n].iter().map(|f| j0 as i64 - f).collect();
    let column = |v: &[i64]| Tensor::<1, Int>::from_data(TensorData::new(v.to_vec(), [n]), &device).reshape([n, 1]).expand([n, nj]);
    let pos = column(&rows.pos[t0..t0 + n]);
    let (_, j) = crate::grid::row_col(n, nj, 0, &device);
    let local = j + column(&shift);
    let ls = params.select_block as i64;
    let own = local.clone().greater_equal_elem(0).bool_and(local.clone().lower(column(&rows.n_blocks[t0..t0 + n])));
    let allowed = own.clone().bool_and((local.clone() * ls).lower_equal(pos.clone()));
    let cur = pos.clone().clamp_min(0).div_scalar(ls);
    let initial = local.clone().lower_elem(params.forced_initial as i64);
    let recent = local.clone().lower_equal(cur.clone()).bool_and(local.greater(cur - params.forced_local as i64));
    let forced = own.bool_and(pos.greater_equal_elem(0)).bool_and(initial.bool_or(recent));
    let add = Tensor::<2>::zeros([n, nj], (&device, scores.dtype()))
        .mask_fill(allowed.bool_not(), f64::NEG_INFINITY)
        .mask_fill(forced, f64::INFINITY);
    let masked = scores.detach() + add.unsqueeze::<4>().expand([b, hkv, n, nj]);
    let k = cap.min(nj);
    let chosen = crate::kernel::topk_indices(masked, k);
    let shift = Tensor::<1, Int>::from_data(TensorData::new(shift, [n]), &device).reshape([1, 1, n, 1]).expand([b, hkv, n, k]);
    let none = chosen.clone().lower_elem(0);
    let local = (chosen + shift).mask_fill(none, -1);
    if k == cap {
        return local;
    }
    Tensor::cat(vec![local, Tensor::<4, Int>::full([b, hkv, n, cap - k], -1, &device)], 3)
}

/// The full NSA forward on a packed batch: [`super::nsa_attention_with`] for sequences
/// concatenated along the token axis (see the module doc). `inputs.k_cmp` / `v_cmp` are the
/// packed compressed tokens ([`nsa_compressed_cu_seqlens`], e.g. from
/// [`compress_mean_varlen`] or a compressor run on each sequence's windows); `Given` block
/// lists and the returned selection hold block numbers local to each row's sequence; `counts`
/// are per packed row. Equals the unpacked op on every sequence alone, output and gradients.
pub fn nsa_attention_varlen(inputs: NsaInputs, varlen: &VarLen, params: &NsaParams, blocks: NsaBlocks, counts: Option<Tensor<3, Int>>) -> Result<NsaOutput> {
    params.validate()?;
    let NsaInputs { q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates } = inputs;
    let dims = validate_qkv(&q, &k_slc, &v_slc).map_err(|e| rename_kv(e, "k_slc", "v_slc"))?;
    validate_qkv(&q, &k_win, &v_win).map_err(|e| rename_kv(e, "k_win", "v_win"))?;
    varlen.validate(&dims)?;
    let want = [dims.batch, dims.heads_q, dims.seq_q, 3];
    if gates.dims() != want {
        return shape_err("gates", format!("expected {want:?}, got {:?}", gates.dims()));
    }
    let (cu_cmp, complete) = compressed_layout("k_cmp", k_cmp.dims()[2], varlen, params)?;
    if cu_cmp[cu_cmp.len() - 1] > 0 {
        validate_qkv(&q, &k_cmp, &v_cmp).map_err(|e| rename_kv(e, "k_cmp", "v_cmp"))?;
    }
    let compressed = nsa_compressed_attention_varlen(q.clone(), k_cmp.clone(), v_cmp, varlen, params)?;
    let indices = match blocks {
        NsaBlocks::Computed => select_packed(q.clone(), k_cmp, compressed.lse.clone(), varlen, &cu_cmp, &complete, params, CHUNK_SCORES)?,
        NsaBlocks::Given(indices) => given_blocks(indices, &dims)?,
    };
    let selection = BlockSelection::per_token(apply_counts(indices, counts)?, params.select_block);
    let opts = AttentionOptions { causal: true, window: None, scale: params.scale };
    let selected = block_sparse_attention_varlen(q.clone(), k_slc, v_slc, &selection, varlen, &opts)?;
    let window = if params.window == 0 { window_off(&q) } else { attention_varlen(q, k_win, v_win, varlen, &opts.with_window(params.window))? };
    let output = nsa_combine(&compressed.output, &selected.output, &window.output, gates)?;
    Ok(NsaOutput { output, compressed, selected, window, selection })
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{DType, Device, Distribution};

    /// Chunks of single rows, of a few sequences and of the whole pack choose the same lists
    /// (chunks follow the sequences; a long one is split by rows).
    #[test]
    fn chunking_does_not_change_the_selection() {
        let device = Device::flex();
        let params = NsaParams { compress_block: 4, compress_stride: 2, select_block: 4, top_n: 4, window: 3, ..NsaParams::default() };
        let varlen = VarLen::new(vec![0, 18, 18, 21, 22, 47, 56]).unwrap();
        let dist = Distribution::Normal(0.0, 1.0);
        let q = Tensor::<4>::random([2, 4, 56, 8], dist, (&device, DType::F64));
        let k = Tensor::<4>::random([2, 2, 56, 8], dist, (&device, DType::F64));
        let kc = compress_mean_varlen(k, varlen.cu_seqlens_k(), 4, 2, TrailingWindow::Drop).unwrap();
        let (cu_cmp, complete) = compressed_layout("k_cmp", kc.dims()[2], &varlen, &params).unwrap();
        let lse = nsa_compressed_attention_varlen(q.clone(), kc.clone(), kc.clone(), &varlen, &params).unwrap().lse;
        let run = |budget| select_packed(q.clone(), kc.clone(), lse.clone(), &varlen, &cu_cmp, &complete, &params, budget).unwrap().into_data();
        let whole = run(usize::MAX / 2);
        for budget in [1, 300, 2000, 20_000] {
            assert_eq!(run(budget), whole, "budget {budget}");
        }
        let n = selection_chunks(varlen.cu_seqlens_q(), &cu_cmp, &[0, 5, 5, 6, 7, 14, 17], 8, 4, 2000).len();
        assert!(n > 1 && n < 56, "{n} chunks");
    }
}
