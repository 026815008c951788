//! Dispatch to the CubeCL kernels on Cube devices.

use burn::tensor::Tensor;

use crate::attention::{AttentionOptions, AttentionOutput, AttnDims, KeyBias};
use crate::block_sparse::BlockSelection;
use crate::error::Result;

/// Runs the attention kernel when `q` lives on a device that has one; `Ok(None)` tells the
/// caller to use the tensor-op reference instead.
#[allow(unused_variables)]
pub(crate) fn try_attention(
    q: &Tensor<4>,
    k: &Tensor<4>,
    v: &Tensor<4>,
    bias: Option<&KeyBias>,
    selection: Option<&BlockSelection>,
    opts: &AttentionOptions,
    dims: &AttnDims,
) -> Result<Option<AttentionOutput>> {
    Ok(None)
}
