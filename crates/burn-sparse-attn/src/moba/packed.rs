//! MoBA over a packed variable-length batch, as the published `moba_attn_varlen` runs it:
//! each sequence is cut into blocks from its own first key, routes among its own blocks
//! only, and the attention of every sequence runs in one launch.

use burn::tensor::{Int, Tensor, TensorData};

use super::{MobaOutput, MobaParams};
use crate::attention::{AttentionOptions, validate_qkv};
use crate::block_sparse::{AlignedPacking, BlockSelection};
use crate::error::Result;
use crate::varlen::VarLen;

/// Routing inputs of each aligned query row: its key position in the aligned key layout,
/// its sequence's first block and whether it sees any key (`pos >= 0` in its sequence).
struct RowRouting {
    pos: Vec<i64>,
    first_block: Vec<i64>,
    sees: Vec<bool>,
}

fn row_routing(varlen: &VarLen, layout: &AlignedPacking, block: usize) -> RowRouting {
    let (cu_q, cu_k) = (varlen.cu_seqlens_q(), varlen.cu_seqlens_k());
    let mut r = RowRouting { pos: vec![0; layout.total_q], first_block: vec![0; layout.total_q], sees: vec![false; layout.total_q] };
    for s in 0..varlen.num_sequences() {
        let (lq, lk) = (cu_q[s + 1] - cu_q[s], cu_k[s + 1] - cu_k[s]);
        for t in 0..lq {
            // Bottom-right causal alignment inside the sequence.
            let local = t as i64 + lk as i64 - lq as i64;
            let at = layout.start_q[s] + t;
            r.pos[at] = layout.start_k[s] as i64 + local;
            r.first_block[at] = (layout.start_k[s] / block) as i64;
            r.sees[at] = local >= 0;
        }
    }
    r
}

/// Mean key of each aligned block over its real keys (gap keys excluded).
fn aligned_block_means(k_al: Tensor<4>, real: &[bool], block: usize) -> Tensor<4> {
    let [b, h, tk, d] = k_al.dims();
    let device = k_al.device();
    let nb = tk / block;
    let weight: Vec<f64> = real.iter().map(|&x| if x { 1.0 } else { 0.0 }).collect();
    let counts: Vec<f64> = weight.chunks(block).map(|c| c.iter().sum::<f64>().max(1.0)).collect();
    let weight = Tensor::<1>::from_data(TensorData::new(weight, [tk]), (&device, k_al.dtype()));
    let counts = Tensor::<1>::from_data(TensorData::new(counts, [nb]), (&device, k_al.dtype()));
    let sums = (k_al * weight.reshape([1, 1, tk, 1]).expand([b, h, tk, d])).reshape([b, h, nb, block, d]).sum_dim(3).reshape([b, h, nb, d]);
    sums / counts.reshape([1, 1, nb, 1]).expand([b, h, nb, d])
}

/// Router score elements one chunk holds (as [`super::moba_select`]).
const CHUNK_SCORES: usize = 1 << 27;

/// Routes every aligned row among its own sequence's blocks: the top `top_k` of
/// `q . mean(K_block)` over complete earlier blocks, the row's own block forced.
fn route(q_al: Tensor<4>, means: &Tensor<4>, routing: &RowRouting, block: usize, top_k: usize, heads_kv: usize) -> Tensor<4, Int> {
    let [b, hq, tq, d] = q_al.dims();
    let nb = means.dims()[2];
    let g = hq / heads_kv;
    let device = q_al.device();
    let rows = (CHUNK_SCORES / (b * hq * nb).max(1)).clamp(1, tq.max(1));
    let column = |values: &[i64], n: usize| Tensor::<1, Int>::from_data(TensorData::new(values.to_vec(), [n]), &device).reshape([n, 1]).expand([n, nb]);
    let bs = block as i64;
    let lists = crate::grid::row_chunks(tq, rows)
        .map(|(t0, t1)| {
            let n = t1 - t0;
            let qc = q_al.clone().detach().slice([0..b, 0..hq, t0..t1, 0..d]);
            let raw = qc.reshape([b, heads_kv, g * n, d]).matmul(means.clone().swap_dims(2, 3)).reshape([b, hq, n, nb]);
            let pos = column(&routing.pos[t0..t1], n);
            let first = column(&routing.first_block[t0..t1], n);
            let sees = column(&routing.sees[t0..t1].iter().map(|&x| x as i64).collect::<Vec<_>>(), n).equal_elem(1);
            let j = Tensor::<1, Int>::arange(0..nb as i64, &device).reshape([1, nb]).expand([n, nb]);
            let own = sees.clone().bool_and(j.clone().equal(pos.clone().clamp_min(0).div_scalar(bs)));
            let candidate = sees.bool_and(j.clone().greater_equal(first)).bool_and(((j + 1) * bs).lower_equal(pos));
            let add = Tensor::<2>::zeros([n, nb], (&device, raw.dtype()))
                .mask_fill(candidate.bool_not(), f64::NEG_INFINITY)
                .mask_fill(own, f64::INFINITY);
            crate::kernel::topk_indices(raw + add.unsqueeze::<4>().expand([b, hq, n, nb]), top_k.min(nb).max(1))
        })
        .collect();
    crate::grid::cat_rows(lists)
}

/// MoBA over a packed batch ([`crate::varlen`]): every sequence is routed and attended on
/// its own (blocks counted from its first key, the last one partial, candidates only among
/// its own complete earlier blocks), all in one launch. Equals [`super::moba_attention`] on
/// each sequence alone. The returned selection has one list per packed query row (rows in
/// packed order) of block numbers local to the row's sequence, `-1` padded.
pub fn moba_attention_varlen(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, varlen: &VarLen, params: &MobaParams) -> Result<MobaOutput> {
    params.validate()?;
    let dims = validate_qkv(&q, &k, &v)?;
    varlen.validate(&dims)?;
    let opts = AttentionOptions { causal: true, window: None, scale: params.scale };
    let block = params.block_size;
    let layout = AlignedPacking::new(varlen, 1, block, &opts)?;
    let routing = row_routing(varlen, &layout, block);
    let k_al = layout.align_k(k.clone());
    let means = aligned_block_means(k_al.detach(), &layout.real_keys(varlen), block);
    let lists = route(layout.align_q(q.clone()), &means, &routing, block, params.top_k, dims.heads_kv);
    let aligned = BlockSelection::per_token(lists, block);
    let attention = layout.attend(q, k, v, None, &aligned, &opts)?;
    // The routing in the caller's terms: packed rows, local block numbers.
    let [b, hq, _, cap] = aligned.indices.dims();
    let tq = dims.seq_q;
    let packed = layout.unalign_q(aligned.indices);
    let first: Vec<i64> = {
        let cu = varlen.cu_seqlens_q();
        (0..varlen.num_sequences()).flat_map(|s| std::iter::repeat_n((layout.start_k[s] / block) as i64, cu[s + 1] - cu[s])).collect()
    };
    let first = Tensor::<1, Int>::from_data(TensorData::new(first, [tq]), &packed.device()).reshape([1, 1, tq, 1]).expand([b, hq, tq, cap]);
    let none = packed.clone().lower_elem(0);
    let local = (packed - first).mask_fill(none, -1);
    Ok(MobaOutput { attention, selection: BlockSelection::per_token(local, block) })
}
