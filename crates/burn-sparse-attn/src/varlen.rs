//! Packed variable-length batches (FlashAttention's varlen convention).
//!
//! Sequences of different lengths are concatenated along the token axis instead of padded
//! to the longest: `q` is `[batch, heads_q, total_q, head_dim]` where sequence `s` holds the
//! rows `cu_seqlens_q[s] .. cu_seqlens_q[s + 1]`, and likewise `k`, `v` with
//! `cu_seqlens_k`. A row attends only to keys of its own sequence; the causal mask (aligned
//! bottom-right per sequence) and the window of [`AttentionOptions`] apply within each
//! sequence. Every batch entry and head is packed the same way (FlashAttention's varlen
//! functions take batch 1).
//!
//! The sparse methods take packed batches too: [`block_sparse_attention_varlen`] (block
//! numbers local to each sequence, as flash-linear-attention's varlen NSA counts them),
//! [`moba_attention_varlen`] (MoBA's own `moba_attn_varlen` semantics: blocks and routing
//! per sequence) and [`dma_attention_varlen`] (each row keeps its top keys among its own
//! sequence's). Each equals the unpacked op on every sequence alone, in one launch.
//!
//! The boundaries are host values, as a data loader has them; the kernels receive
//! per-row and per-key visibility intervals built from them (`O(total)` integers, uploaded
//! once per call). On Cube devices the kernels run every sequence in one launch; elsewhere
//! the tensor-op reference applies the same rule as a mask (a `total_q x total_k` mask: the
//! CPU path is for tests and small packs).
//!
//! Costs to know: packed calls run on the kernels' portable path (the tensor-core passes do
//! not take the intervals yet), except causal self-packed block selections, which need no
//! intervals; DMA's packed keep threshold is found on the host (the bias is read back once
//! per call); NSA's packed selection scores with tensor ops (chunked by sequence), not with
//! the fused block-score kernel; and block-sparse packs are laid out block-aligned, which
//! pads every sequence to a whole number of blocks (see [`block_sparse_attention_varlen`]).

pub use crate::block_sparse::{block_sparse_attention_varlen, packed_selection_rows};
pub use crate::dma::{dma_attention_varlen, dma_keep_threshold_varlen};
pub use crate::moba::moba_attention_varlen;

use burn::tensor::{Bool, Int, Tensor, TensorData};
use sparse_attn_kernels::{KernelError, VarlenBounds, varlen_bounds};

use crate::attention::{AttentionOptions, AttentionOutput, AttnDims, attention_core};
use crate::error::{Result, SparseAttnError, shape_err};

/// The sequence boundaries of a packed batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VarLen {
    cu_seqlens_q: Vec<usize>,
    cu_seqlens_k: Vec<usize>,
}

pub(crate) fn boundary_error(e: KernelError) -> SparseAttnError {
    match e {
        KernelError::InvalidArgument { arg, msg } | KernelError::Unsupported { arg, msg } => {
            SparseAttnError::Param { arg, detail: msg }
        }
    }
}

impl VarLen {
    /// Self-attention packing: queries and keys share the boundaries `cu_seqlens`
    /// (`[0, len_0, len_0 + len_1, ..., total]`).
    pub fn new(cu_seqlens: Vec<usize>) -> Result<Self> {
        Self::cross(cu_seqlens.clone(), cu_seqlens)
    }

    /// Separate boundaries for queries and keys (the same number of sequences), e.g. new
    /// tokens of each sequence against its cached keys.
    pub fn cross(cu_seqlens_q: Vec<usize>, cu_seqlens_k: Vec<usize>) -> Result<Self> {
        sparse_attn_kernels::varlen::check_cu_seqlens("cu_seqlens_q", &cu_seqlens_q).map_err(boundary_error)?;
        sparse_attn_kernels::varlen::check_cu_seqlens("cu_seqlens_k", &cu_seqlens_k).map_err(boundary_error)?;
        if cu_seqlens_q.len() != cu_seqlens_k.len() {
            return Err(SparseAttnError::Param {
                arg: "cu_seqlens_k",
                detail: format!("has {} sequences, cu_seqlens_q has {}", cu_seqlens_k.len() - 1, cu_seqlens_q.len() - 1),
            });
        }
        Ok(Self { cu_seqlens_q, cu_seqlens_k })
    }

    /// Boundaries of the query rows.
    pub fn cu_seqlens_q(&self) -> &[usize] {
        &self.cu_seqlens_q
    }

    /// Boundaries of the keys.
    pub fn cu_seqlens_k(&self) -> &[usize] {
        &self.cu_seqlens_k
    }

    /// Number of packed sequences.
    pub fn num_sequences(&self) -> usize {
        self.cu_seqlens_q.len() - 1
    }

    /// Total query rows (the packed `seq_q`).
    pub fn total_q(&self) -> usize {
        self.cu_seqlens_q[self.cu_seqlens_q.len() - 1]
    }

    /// Total keys (the packed `seq_k`).
    pub fn total_k(&self) -> usize {
        self.cu_seqlens_k[self.cu_seqlens_k.len() - 1]
    }

    /// Each query row's position within its own sequence (`0, 1, ..` from every sequence
    /// start): the positions RoPE takes in a packed batch.
    pub fn positions_q(&self) -> Vec<usize> {
        self.cu_seqlens_q.windows(2).flat_map(|w| 0..w[1] - w[0]).collect()
    }

    /// As [`Self::positions_q`] for the keys.
    pub fn positions_k(&self) -> Vec<usize> {
        self.cu_seqlens_k.windows(2).flat_map(|w| 0..w[1] - w[0]).collect()
    }

    /// Checks the totals against a problem's lengths.
    pub(crate) fn validate(&self, dims: &AttnDims) -> Result<()> {
        if self.total_q() != dims.seq_q {
            return shape_err("cu_seqlens_q", format!("ends at {}, but q has {} rows", self.total_q(), dims.seq_q));
        }
        if self.total_k() != dims.seq_k {
            return shape_err("cu_seqlens_k", format!("ends at {}, but k has {} rows", self.total_k(), dims.seq_k));
        }
        Ok(())
    }

    /// The per-row and per-key visibility intervals under `opts` (causal, window).
    pub(crate) fn bounds(&self, opts: &AttentionOptions) -> Result<VarlenBounds> {
        varlen_bounds(&self.cu_seqlens_q, &self.cu_seqlens_k, opts.causal, opts.window).map_err(boundary_error)
    }
}

/// The visibility mask `[batch, heads_q, seq_q, seq_k]` of a packed batch, built on the
/// device from integer comparisons (as every mask of the reference).
pub fn varlen_mask(bounds: &VarlenBounds, dims: &AttnDims, device: &burn::tensor::Device) -> Tensor<4, Bool> {
    let (sq, sk) = (dims.seq_q, dims.seq_k);
    let column = |values: Vec<i64>| Tensor::<1, Int>::from_data(TensorData::new(values, [sq]), device).reshape([sq, 1]).expand([sq, sk]);
    let lo = column(bounds.row_keys.iter().step_by(2).map(|&x| x as i64).collect());
    let hi = column(bounds.row_keys.iter().skip(1).step_by(2).map(|&x| x as i64).collect());
    let key = Tensor::<1, Int>::arange(0..sk as i64, device).reshape([1, sk]).expand([sq, sk]);
    let visible = key.clone().greater_equal(lo).bool_and(key.lower(hi));
    visible.unsqueeze::<4>().expand([dims.batch, dims.heads_q, sq, sk])
}

/// Dense attention over a packed batch: each row attends to the keys of its own sequence
/// (see the module doc), under `opts`' causal mask and window within the sequence.
///
/// `q: [batch, heads_q, total_q, head_dim]`, `k`, `v: [batch, heads_kv, total_k, head_dim]`
/// with `total_q = varlen.total_q()`, `total_k = varlen.total_k()`. Returns the output and
/// the LSE (`-inf` for rows that see no key, e.g. the rows of an empty key sequence);
/// differentiable in q, k and v.
pub fn attention_varlen(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, varlen: &VarLen, opts: &AttentionOptions) -> Result<AttentionOutput> {
    attention_core(q, k, v, None, None, Some(varlen), opts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boundaries_are_checked_with_their_names() {
        let e = VarLen::new(vec![0, 5, 3]).unwrap_err().to_string();
        assert!(e.contains("cu_seqlens_q") && e.contains("must not decrease"), "{e}");
        let e = VarLen::cross(vec![0, 4], vec![0, 2, 4]).unwrap_err().to_string();
        assert!(e.contains("cu_seqlens_k"), "{e}");
        let e = VarLen::new(vec![3, 5]).unwrap_err().to_string();
        assert!(e.contains("start at 0"), "{e}");
        let v = VarLen::new(vec![0, 2, 7]).unwrap();
        assert_eq!((v.num_sequences(), v.total_q(), v.total_k()), (2, 7, 7));
        assert_eq!(v.positions_q(), vec![0, 1, 0, 1, 2, 3, 4]);
    }
}
