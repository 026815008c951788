//! DMA over a packed variable-length batch: each row keeps its top-`window` keys among the
//! visible keys of its own sequence, and every sequence attends in one launch.

use burn::tensor::Tensor;

use super::{DmaParams, host_thresholds};
use crate::attention::{AttentionOptions, AttentionOutput, KeepThreshold, KeyBias, attention_core, validate_bias, validate_qkv};
use crate::error::{Result, check_positive, shape_err};
use crate::varlen::VarLen;

/// DMA's keep rule over a packed batch: for each row, the threshold of its top-`window`
/// keys among its own sequence's visible keys (causal within the sequence, or all of them),
/// ties to the more recent key; `bias: [b, hb, total_k]`. Computed on the host (the bias is
/// copied there once per call).
pub fn dma_keep_threshold_varlen(bias: &Tensor<3>, varlen: &VarLen, window: usize, causal: bool) -> Result<KeepThreshold> {
    check_positive("window", window)?;
    if bias.dims()[2] != varlen.total_k() {
        return shape_err("bias", format!("has {} keys, cu_seqlens_k ends at {}", bias.dims()[2], varlen.total_k()));
    }
    host_thresholds(bias, varlen.cu_seqlens_q(), varlen.cu_seqlens_k(), window, causal)
}

/// DMA attention over a packed batch ([`crate::varlen`]): equals [`super::dma_attention`]
/// on each sequence alone (its rows, its keys and its slice of `bias: [b, hb, total_k]`).
/// The attention runs every sequence in one launch; gradients reach q, k, v and the bias.
pub fn dma_attention_varlen(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, bias: Tensor<3>, varlen: &VarLen, params: &DmaParams) -> Result<AttentionOutput> {
    let dims = validate_qkv(&q, &k, &v)?;
    varlen.validate(&dims)?;
    let keep = dma_keep_threshold_varlen(&bias, varlen, params.window, params.causal)?;
    let bias = KeyBias { values: bias, keep: Some(keep) };
    validate_bias(&bias, &dims)?;
    let opts = AttentionOptions { causal: params.causal, window: None, scale: params.scale };
    attention_core(q, k, v, Some(&bias), None, Some(varlen), &opts)
}
