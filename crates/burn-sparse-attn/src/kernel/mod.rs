//! Dispatch to the CubeCL kernels on Cube devices (CUDA, wgpu, Vulkan, Metal).
//!
//! The kernels live in the Burn-free `sparse-attn-kernels` crate; `ext` wires them into
//! Burn as a backend extension with a hand-written autodiff backward. On other devices (Flex)
//! the tensor-op reference runs instead, so every public op works everywhere.

#[cfg(feature = "cube")]
mod ext;
#[cfg(feature = "cube")]
mod keep;
#[cfg(feature = "cube")]
mod key_order;
#[cfg(feature = "cube")]
mod nsa_scores;
#[cfg(feature = "cube")]
mod seer_target;
#[cfg(feature = "cube")]
mod topk;

use burn::tensor::{Int, Tensor};

use crate::attention::{AttentionOptions, AttentionOutput, AttnDims, KeyBias};
use crate::block_sparse::BlockSelection;
use crate::error::Result;

/// Which implementation attention ops use on a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttentionImpl {
    /// The CubeCL flash-attention kernels.
    Kernel,
    /// The tensor-op reference (materialises `seq_q x seq_k` scores).
    Reference,
}

/// The implementation that attention ops pick for tensors on `device`, given the
/// `SPARSE_ATTN_FORCE_REFERENCE=1` override (useful to compare kernel and reference).
pub fn attention_impl(device: &burn::tensor::Device) -> AttentionImpl {
    if std::env::var("SPARSE_ATTN_FORCE_REFERENCE").is_ok_and(|v| v == "1") {
        return AttentionImpl::Reference;
    }
    #[cfg(feature = "cube")]
    if ext::is_cube_device(device) {
        return AttentionImpl::Kernel;
    }
    let _ = device;
    AttentionImpl::Reference
}

/// Runs the attention kernel when `q` lives on a device that has one; `Ok(None)` tells the
/// caller to use the tensor-op reference instead.
#[allow(unused_variables, clippy::too_many_arguments)]
pub(crate) fn try_attention(
    q: &Tensor<4>,
    k: &Tensor<4>,
    v: &Tensor<4>,
    bias: Option<&KeyBias>,
    selection: Option<&BlockSelection>,
    segments: Option<&sparse_attn_kernels::VarlenBounds>,
    opts: &AttentionOptions,
    dims: &AttnDims,
) -> Result<Option<AttentionOutput>> {
    if attention_impl(&q.device()) == AttentionImpl::Reference {
        return Ok(None);
    }
    #[cfg(feature = "cube")]
    {
        return ext::attention(q, k, v, bias, selection, None, segments, opts, dims).map(Some);
    }
    #[allow(unreachable_code)]
    Ok(None)
}

/// Indices of the `k` largest values along the last dimension (descending; `-1` where fewer
/// than `k` values are above `-inf`), detached: the routers' top-k. A kernel that reads each
/// row once on Cube devices; Burn's `topk_with_indices` elsewhere (ties may be ordered
/// differently there: the kernel keeps equal values in index order).
pub(crate) fn topk_indices(scores: Tensor<4>, k: usize) -> Tensor<4, Int> {
    #[cfg(feature = "cube")]
    if attention_impl(&scores.device()) == AttentionImpl::Kernel && k <= sparse_attn_kernels::MAX_TOPK {
        return topk::row_topk(scores, k);
    }
    let (vals, idx) = scores.detach().topk_with_indices(k, 3);
    idx.mask_fill(vals.equal_elem(f64::NEG_INFINITY), -1)
}

/// DMA's keep threshold `(value, index)`, both `[b, h, seq_q]`, computed by a kernel on Cube
/// devices; `None` elsewhere, where
/// the caller's host walk runs.
#[allow(unused_variables)]
pub(crate) fn try_keep_threshold(bias: &Tensor<3>, seq_q: usize, window: usize, causal: bool) -> Option<(Tensor<3>, Tensor<3, Int>)> {
    #[cfg(feature = "cube")]
    if attention_impl(&bias.device()) == AttentionImpl::Kernel {
        return Some(keep::keep_threshold(bias, seq_q, window, causal));
    }
    None
}

/// Whether a pairwise bias runs on the kernels for these queries (a Cube device, not f64).
pub(crate) fn pair_bias_on_device(q: &Tensor<4>) -> bool {
    cfg!(feature = "cube") && attention_impl(&q.device()) == AttentionImpl::Kernel && !matches!(q.dtype(), burn::tensor::DType::F64)
}

/// Attention with a bias per (query, key) pair on the kernels (see
/// [`crate::dma::dma_attention_pairwise`]); only called where [`pair_bias_on_device`] holds.
#[allow(unused_variables)]
pub(crate) fn attention_pair_bias(
    q: &Tensor<4>,
    k: &Tensor<4>,
    v: &Tensor<4>,
    bias: &Tensor<4>,
    keep: Option<&crate::attention::KeepThreshold>,
    opts: &crate::attention::AttentionOptions,
    dims: &crate::attention::AttnDims,
) -> crate::error::Result<crate::attention::AttentionOutput> {
    #[cfg(feature = "cube")]
    return ext::attention_pair_bias(q, k, v, bias, keep, opts, dims);
    #[allow(unreachable_code)]
    {
        unreachable!("pair_bias_on_device is false without the cube feature")
    }
}

/// Whether [`nsa_block_scores`] runs for queries on this device (a Cube device, not f64).
pub(crate) fn nsa_scores_on_device(q: &Tensor<4>) -> bool {
    cfg!(feature = "cube") && attention_impl(&q.device()) == AttentionImpl::Kernel && !matches!(q.dtype(), burn::tensor::DType::F64)
}

/// NSA's selection-block scores with the selection rule folded in, `[b, hkv, rows, n_sel]`
/// f32, for query rows `row0..row0 + rows`, computed by one kernel (no `seq x n_cmp`
/// probabilities). Only where [`nsa_scores_on_device`] holds.
#[allow(unused_variables)]
pub(crate) fn nsa_block_scores(
    q: &Tensor<4>,
    k_cmp: &Tensor<4>,
    lse: &Tensor<3>,
    seq_k: usize,
    row0: usize,
    rows: usize,
    params: &crate::nsa::NsaParams,
) -> Tensor<4> {
    #[cfg(feature = "cube")]
    return nsa_scores::block_scores(q, k_cmp, lse, seq_k, row0, rows, params);
    #[allow(unreachable_code)]
    {
        unreachable!("nsa_block_scores without a Cube backend")
    }
}

/// Query rows per tile and keys per block of DMA's gathered walk.
#[cfg(feature = "cube")]
const GATHER_TILE: usize = 64;

/// DMA with the kept keys gathered (`SPARSE_ATTN_DMA_GATHER=0` turns it off): the keys are
/// walked in the order `sparse_attn_kernels::key_order` builds from the bias and its keep
/// threshold, and each query tile visits only the key blocks of that order holding a key it
/// keeps, so the cost follows `seq x window` whatever the bias looks like. `None` (the
/// caller's dense walk runs) off the fragment path (CUDA f16/bf16), with a sliding window,
/// without a threshold, or with one bias per query head.
#[allow(unused_variables)]
pub(crate) fn try_gathered_dma(q: &Tensor<4>, k: &Tensor<4>, v: &Tensor<4>, bias: &KeyBias, opts: &AttentionOptions, dims: &AttnDims) -> Option<Result<AttentionOutput>> {
    #[cfg(feature = "cube")]
    {
        let keep = bias.keep.as_ref()?;
        let usable = attention_impl(&q.device()) == AttentionImpl::Kernel
            && std::env::var("SPARSE_ATTN_DMA_GATHER").map_or(true, |v| v != "0")
            && opts.window.is_none()
            && bias.values.dims()[1] == dims.heads_kv
            && ext::fragment_path(q);
        if !usable {
            return None;
        }
        let (perm, lists) = key_order::key_order(&bias.values, &keep.value, &keep.index, dims.seq_q, GATHER_TILE, GATHER_TILE, opts.causal);
        let selection = BlockSelection::per_query_block(lists, GATHER_TILE, GATHER_TILE);
        return Some(ext::attention(q, k, v, Some(bias), Some(&selection), Some(&perm), None, opts, dims));
    }
    #[allow(unreachable_code)]
    None
}

/// SeerAttention's block maxima of the causal probabilities `exp(scale q.k - lse)`,
/// `[b, hq, ceil(sq / block), ceil(sk / block)]` f32, by one kernel on Cube devices (the
/// `seq x seq` probabilities never stored); `None` elsewhere (the caller's chunked tensor ops
/// run).
#[allow(unused_variables)]
pub(crate) fn try_seer_block_max(q: &Tensor<4>, k: &Tensor<4>, lse: &Tensor<3>, block: usize, scale: f64) -> Option<Tensor<4>> {
    #[cfg(feature = "cube")]
    if attention_impl(&q.device()) == AttentionImpl::Kernel && !matches!(q.dtype(), burn::tensor::DType::F64) {
        return Some(seer_target::block_max(q, k, lse, block, scale));
    }
    None
}
