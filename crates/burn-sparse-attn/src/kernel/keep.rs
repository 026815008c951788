//! DMA's keep threshold on the device (`sparse_attn_kernels::keep_threshold`), wired into
//! Burn as a backend extension: no copy of the bias to the host, no device sync. The
//! threshold is not differentiable: the autodiff backend forwards to the inner one.

use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::fusion::custom::TensorSpec;
use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::backend::{Autodiff, Dispatch, backend_extension};
use burn::tensor::{DType, Int, Shape, Tensor};
use burn_cubecl::{CubeBackend, tensor::CubeTensor};
use sparse_attn_kernels as sak;

/// One threshold call: `[batch, heads, seq_k]` bias, `seq_q` queries, `window` keys kept.
#[derive(Debug, Clone, PartialEq)]
pub struct KeepParams {
    batch: usize,
    heads: usize,
    seq_q: usize,
    seq_k: usize,
    window: usize,
    causal: bool,
}

fn keep_meta(_bias: &TensorSpec, p: &KeepParams) -> (TensorSpec, TensorSpec) {
    let shape = Shape::from(vec![p.batch, p.heads, p.seq_q]);
    (TensorSpec::new(shape.clone(), DType::F32), TensorSpec::new(shape, DType::I32))
}

/// The keep-threshold kernel as a Burn backend extension.
#[backend_extension(Autodiff, Cube, Fusion)]
pub trait KeepThresholdBackend: burn::backend::Backend {
    /// `(value f32, index i32)`, both `[batch, heads, seq_q]`; see [`sak::keep_threshold`].
    #[fusion(meta = keep_meta)]
    fn keep_threshold(bias: FloatTensor<Self>, params: KeepParams) -> (FloatTensor<Self>, IntTensor<Self>);
}

impl KeepThresholdBackend for CubeBackend {
    fn keep_threshold(bias: CubeTensor, p: KeepParams) -> (CubeTensor, CubeTensor) {
        let bias = super::ext::contiguous(bias);
        let (value, index) = sak::keep_threshold(&bias.client, &bias.handle, p.batch * p.heads, p.seq_q, p.seq_k, p.window, p.causal)
            .unwrap_or_else(|e| panic!("keep-threshold kernel: {e}"));
        let shape = Shape::from(vec![p.batch, p.heads, p.seq_q]);
        let out = |h, dtype| CubeTensor::new_contiguous(bias.client.clone(), bias.device.clone(), shape.clone(), h, dtype);
        (out(value, DType::F32), out(index, DType::I32))
    }
}

impl<B: KeepThresholdBackend, C: CheckpointStrategy> KeepThresholdBackend for Autodiff<B, C> {
    fn keep_threshold(bias: FloatTensor<Self>, p: KeepParams) -> (FloatTensor<Self>, IntTensor<Self>) {
        let (value, index) = B::keep_threshold(bias.into_primitive(), p);
        (<Self as burn::backend::AutodiffBackend>::from_inner(value), index)
    }
}

/// The keep threshold of `bias [b, h, seq_k]` for `seq_q` queries on a Cube device:
/// `(value [b, h, seq_q]` in f32, `index` i32`)`.
pub(crate) fn keep_threshold(bias: &Tensor<3>, seq_q: usize, window: usize, causal: bool) -> (Tensor<3>, Tensor<3, Int>) {
    let [batch, heads, seq_k] = bias.dims();
    let p = KeepParams { batch, heads, seq_q, seq_k, window, causal };
    let values = bias.clone().detach().cast(DType::F32);
    let (v, i) = <Dispatch as KeepThresholdBackend>::keep_threshold(values.into_dispatch(), p);
    (Tensor::from_dispatch(v), Tensor::from_dispatch(i))
}
