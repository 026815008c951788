//! Row top-k on the device for the routers (MoBA, NSA's selection, SeerAttention's top-k),
//! wired into Burn as a backend extension around `sparse_attn_kernels::row_topk`. The
//! indices are not differentiable: the autodiff backend forwards to the inner one.

use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::fusion::custom::TensorSpec;
use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::backend::{Autodiff, Dispatch, backend_extension};
use burn::tensor::{DType, Int, Shape, Tensor};
use burn_cubecl::{CubeBackend, tensor::CubeTensor};
use sparse_attn_kernels as sak;

/// Shape of one top-k call: `rows` rows of `n` values, `k` kept, output `[.., k]`.
#[derive(Debug, Clone, PartialEq)]
pub struct TopkParams {
    out_shape: Vec<usize>,
    rows: usize,
    n: usize,
    k: usize,
}

fn topk_meta(_values: &TensorSpec, p: &TopkParams) -> TensorSpec {
    TensorSpec::new(Shape::from(p.out_shape.clone()), DType::I32)
}

/// The row top-k kernel as a Burn backend extension.
#[backend_extension(Autodiff, Cube, Fusion)]
pub trait RowTopkBackend: burn::backend::Backend {
    /// Indices (i32) of the `k` largest f32 values along the last dimension; see
    /// [`sak::row_topk`].
    #[fusion(meta = topk_meta)]
    fn row_topk_indices(values: FloatTensor<Self>, params: TopkParams) -> IntTensor<Self>;
}

impl RowTopkBackend for CubeBackend {
    fn row_topk_indices(values: CubeTensor, p: TopkParams) -> CubeTensor {
        let values = super::ext::contiguous(values);
        let handle = sak::row_topk(&values.client, &values.handle, p.rows, p.n, p.k).unwrap_or_else(|e| panic!("row top-k kernel: {e}"));
        CubeTensor::new_contiguous(values.client.clone(), values.device.clone(), Shape::from(p.out_shape), handle, DType::I32)
    }
}

impl<B: RowTopkBackend, C: CheckpointStrategy> RowTopkBackend for Autodiff<B, C> {
    fn row_topk_indices(values: FloatTensor<Self>, p: TopkParams) -> IntTensor<Self> {
        B::row_topk_indices(values.into_primitive(), p)
    }
}

/// `k` (at most [`sak::MAX_TOPK`]) largest of the last dimension of `scores` on a Cube
/// device, detached, as `-1`-padded i32 lists (ties to the lower index; `-inf` never kept).
pub(crate) fn row_topk(scores: Tensor<4>, k: usize) -> Tensor<4, Int> {
    let [a, b, c, n] = scores.dims();
    let p = TopkParams { out_shape: vec![a, b, c, k], rows: a * b * c, n, k };
    let values = scores.detach().cast(DType::F32);
    Tensor::from_dispatch(<Dispatch as RowTopkBackend>::row_topk_indices(values.into_dispatch(), p))
}
