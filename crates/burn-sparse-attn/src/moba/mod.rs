//! MoBA (Mixture of Block Attention, Moonshot 2025): a parameter-free router picks, for each
//! query and query head, the key blocks whose mean key scores highest against the query;
//! attention is one softmax over the union of the chosen blocks.
//!
//! Routing follows the published `moba_naive`: block `i` is a candidate for query `t` only
//! when it ends at or before `t` (complete and strictly before the query's block); the
//! query's own block is always chosen (causal inside) and counts as one of the `top_k`; the
//! last, partial block's score uses the mean of the keys it has. The gate is `q . mean(K)`
//! without the softmax scale, on detached q and k (routing gets no gradient). Under GQA each
//! query head routes on its own, against its kv head's block means, as the reference does
//! after repeating K to the query heads.

mod module;
mod packed;

pub use module::{MobaAttention, MobaAttentionConfig};
pub use packed::moba_attention_varlen;

use burn::tensor::Tensor;

use crate::attention::{AttentionOptions, AttentionOutput, AttnDims, validate_qkv};
use crate::block_sparse::{BlockSelection, block_sparse_attention};
use crate::error::{Result, check_positive};

/// Hyper-parameters of MoBA. Defaults are the paper's 8k-context setting.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MobaParams {
    /// Keys per block. Default 512.
    pub block_size: usize,
    /// Blocks per query, own block included. Default 3.
    pub top_k: usize,
    /// Softmax scale; `None` means `1/sqrt(head_dim)`.
    pub scale: Option<f64>,
}

impl Default for MobaParams {
    fn default() -> Self {
        Self { block_size: 512, top_k: 3, scale: None }
    }
}

impl MobaParams {
    fn validate(&self) -> Result<()> {
        check_positive("block_size", self.block_size)?;
        check_positive("top_k", self.top_k)
    }
}

/// MoBA output: the attention result and the routing, for inspection.
#[derive(Debug, Clone)]
pub struct MobaOutput {
    /// Output and LSE.
    pub attention: AttentionOutput,
    /// Per-token, per-query-head block lists (`-1` padded).
    pub selection: BlockSelection,
}

/// Mean key of each block: `[b, hkv, sk, d] -> [b, hkv, ceil(sk / block), d]`.
pub fn block_mean_keys(k: Tensor<4>, block_size: usize) -> Result<Tensor<4>> {
    check_positive("block_size", block_size)?;
    let [b, h, sk, d] = k.dims();
    let nb = sk.div_ceil(block_size);
    let padded = nb * block_size;
    let device = k.device();
    let kp = if padded > sk {
        Tensor::cat(vec![k.clone(), Tensor::zeros([b, h, padded - sk, d], (&device, k.dtype()))], 2)
    } else {
        k.clone()
    };
    let counts = crate::grid::block_counts(nb, block_size, sk, &device, k.dtype()).reshape([1, 1, nb, 1]);
    Ok(kp.reshape([b, h, nb, block_size, d]).sum_dim(3).reshape([b, h, nb, d]) / counts.expand([b, h, nb, d]))
}

/// Router scores `[b, hq, sq, n_blocks]`: `q . mean(K_block)` on candidate blocks, `+inf` on
/// the query's own block, `-inf` elsewhere. Computed on detached inputs.
pub fn moba_gate_scores(q: Tensor<4>, k: Tensor<4>, block_size: usize) -> Result<Tensor<4>> {
    check_positive("block_size", block_size)?;
    let dims = validate_qkv(&q, &k, &k)?;
    let means = block_mean_keys(k.detach(), block_size)?;
    Ok(gate_scores_from(q, &means, dims.seq_k as i64 - dims.seq_q as i64, block_size, &dims))
}

/// The scores of [`moba_gate_scores`] for queries whose first sits at position `pos0`, from
/// the block means `[b, hkv, n_blocks, d]`.
fn gate_scores_from(q: Tensor<4>, means: &Tensor<4>, pos0: i64, block_size: usize, dims: &AttnDims) -> Tensor<4> {
    let [b, hq, sq, d] = q.dims();
    let (hkv, nb) = (dims.heads_kv, means.dims()[2]);
    let g = hq / hkv;
    let raw = q.detach().reshape([b, hkv, g * sq, d]).matmul(means.clone().swap_dims(2, 3)).reshape([b, hq, sq, nb]);
    // Offsets built on the device: +inf on the query's own block, 0 on complete earlier
    // blocks, -inf elsewhere (later blocks, and everything for rows before the first key).
    let bs = block_size as i64;
    let (pos, j) = crate::grid::row_col(sq, nb, pos0, &raw.device());
    let own = pos.clone().greater_equal_elem(0).bool_and(j.clone().equal(pos.clone().clamp_min(0).div_scalar(bs)));
    let candidate = ((j + 1) * bs).lower_equal(pos);
    let add = Tensor::<2>::zeros([sq, nb], (&raw.device(), raw.dtype()))
        .mask_fill(candidate.bool_not(), f64::NEG_INFINITY)
        .mask_fill(own, f64::INFINITY);
    raw + add.unsqueeze::<4>().expand([b, hq, sq, nb])
}

/// Router score elements (`batch x heads_q x rows x n_blocks`) one chunk of [`moba_select`]
/// holds: 2^27 (512 MiB of f32), so routing memory does not grow with `seq^2`.
const CHUNK_SCORES: usize = 1 << 27;

/// MoBA routing: for every query token and query head, the `top_k` best blocks (own block
/// included), as a per-token [`BlockSelection`] with capacity `min(top_k, n_blocks)`. The
/// router scores are built and reduced chunk by chunk of queries, so memory is
/// `O(seq x top_k)` plus one chunk.
pub fn moba_select(q: Tensor<4>, k: Tensor<4>, block_size: usize, top_k: usize) -> Result<BlockSelection> {
    check_positive("top_k", top_k)?;
    check_positive("block_size", block_size)?;
    let dims = validate_qkv(&q, &k, &k)?;
    let means = block_mean_keys(k.detach(), block_size)?;
    let nb = means.dims()[2];
    let rows = (CHUNK_SCORES / (dims.batch * dims.heads_q * nb).max(1)).clamp(1, dims.seq_q.max(1));
    Ok(select_in_chunks(q, &means, block_size, top_k, &dims, rows))
}

fn select_in_chunks(q: Tensor<4>, means: &Tensor<4>, block_size: usize, top_k: usize, dims: &AttnDims, rows: usize) -> BlockSelection {
    let [b, hq, sq, d] = q.dims();
    let nb = means.dims()[2];
    let pos0 = dims.seq_k as i64 - sq as i64;
    let lists = crate::grid::row_chunks(sq, rows)
        .map(|(t0, t1)| {
            let gate = gate_scores_from(q.clone().slice([0..b, 0..hq, t0..t1, 0..d]), means, pos0 + t0 as i64, block_size, dims);
            crate::kernel::topk_indices(gate, top_k.min(nb))
        })
        .collect();
    BlockSelection::per_token(crate::grid::cat_rows(lists), block_size)
}

/// MoBA attention (causal). Returns the output, its LSE and the routing.
pub fn moba_attention(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, params: &MobaParams) -> Result<MobaOutput> {
    params.validate()?;
    validate_qkv(&q, &k, &v)?;
    let selection = moba_select(q.clone(), k.clone(), params.block_size, params.top_k)?;
    let opts = AttentionOptions { causal: true, window: None, scale: params.scale };
    let attention = block_sparse_attention(q, k, v, &selection, &opts)?;
    Ok(MobaOutput { attention, selection })
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{DType, Device, Distribution};

    /// Chunks of 1, 4 and 9 queries route exactly as the whole sequence (top-k of
    /// [`moba_gate_scores`]), with seq_q < seq_k so positions are offset, under GQA.
    #[test]
    fn chunked_routing_equals_whole_sequence() {
        let device = Device::flex();
        let (b, hq, hkv, sq, sk, d, block, top_k) = (2, 4, 2, 21, 40, 8, 6, 3);
        let dist = Distribution::Normal(0.0, 1.0);
        let q = Tensor::<4>::random([b, hq, sq, d], dist, (&device, DType::F64));
        let k = Tensor::<4>::random([b, hkv, sk, d], dist, (&device, DType::F64));
        let gate = moba_gate_scores(q.clone(), k.clone(), block).unwrap();
        let (vals, idx) = gate.topk_with_indices(top_k, 3);
        let whole = idx.mask_fill(vals.equal_elem(f64::NEG_INFINITY), -1).into_data();
        let dims = validate_qkv(&q, &k, &k).unwrap();
        let means = block_mean_keys(k.clone(), block).unwrap();
        for rows in [1, 4, 9, 100] {
            let chunked = select_in_chunks(q.clone(), &means, block, top_k, &dims, rows);
            assert_eq!(chunked.indices.into_data(), whole, "chunks of {rows} rows");
        }
    }
}
