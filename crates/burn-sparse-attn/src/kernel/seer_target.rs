//! SeerAttention's block-max target on the device (`sparse_attn_kernels::seer_block_max`),
//! wired into Burn as a backend extension: the `seq x seq` probabilities are never stored.
//! The target is detached (a distillation label): the autodiff backend forwards to the inner
//! one.

use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::fusion::custom::TensorSpec;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Dispatch, backend_extension};
use burn::tensor::{DType, Shape, Tensor};
use burn_cubecl::{CubeBackend, tensor::CubeTensor};
use sparse_attn_kernels as sak;

/// One target call.
#[derive(Debug, Clone, PartialEq)]
pub struct BlockMaxParams(sak::BlockMaxProblem);

impl BlockMaxParams {
    fn out_shape(&self) -> Vec<usize> {
        let p = &self.0;
        vec![p.batch, p.heads_q, p.seq_q.div_ceil(p.block), p.seq_k.div_ceil(p.block)]
    }
}

fn block_max_meta(_q: &TensorSpec, _k: &TensorSpec, _lse: &TensorSpec, p: &BlockMaxParams) -> TensorSpec {
    TensorSpec::new(Shape::from(p.out_shape()), DType::F32)
}

/// The block-max kernel as a Burn backend extension.
#[backend_extension(Autodiff, Cube, Fusion)]
pub trait SeerTargetBackend: burn::backend::Backend {
    /// f32 `[b, hq, query blocks, key blocks]` block maxima of the causal probabilities; see
    /// [`sak::seer_block_max`].
    #[fusion(meta = block_max_meta)]
    fn seer_block_max(q: FloatTensor<Self>, k: FloatTensor<Self>, lse: FloatTensor<Self>, params: BlockMaxParams) -> FloatTensor<Self>;
}

impl SeerTargetBackend for CubeBackend {
    fn seer_block_max(q: CubeTensor, k: CubeTensor, lse: CubeTensor, p: BlockMaxParams) -> CubeTensor {
        let (q, k, lse) = (super::ext::contiguous(q), super::ext::contiguous(k), super::ext::contiguous(lse));
        let dtype = super::ext::attn_dtype(q.dtype);
        let handle = sak::seer_block_max(&q.client, dtype, &p.0, &q.handle, &k.handle, &lse.handle).unwrap_or_else(|e| panic!("Seer target kernel: {e}"));
        CubeTensor::new_contiguous(q.client.clone(), q.device.clone(), Shape::from(p.out_shape()), handle, DType::F32)
    }
}

impl<B: SeerTargetBackend, C: CheckpointStrategy> SeerTargetBackend for Autodiff<B, C> {
    fn seer_block_max(q: FloatTensor<Self>, k: FloatTensor<Self>, lse: FloatTensor<Self>, p: BlockMaxParams) -> FloatTensor<Self> {
        let out = B::seer_block_max(q.into_primitive(), k.into_primitive(), lse.into_primitive(), p);
        <Self as burn::backend::AutodiffBackend>::from_inner(out)
    }
}

/// Block maxima `[b, hq, ceil(sq / block), ceil(sk / block)]` (f32, detached) of the causal
/// probabilities `exp(scale q.k - lse)`; arguments checked by the caller.
pub(crate) fn block_max(q: &Tensor<4>, k: &Tensor<4>, lse: &Tensor<3>, block: usize, scale: f64) -> Tensor<4> {
    let [batch, heads_q, seq_q, head_dim] = q.dims();
    let [_, heads_kv, seq_k, _] = k.dims();
    let p = sak::BlockMaxProblem { batch, heads_q, heads_kv, seq_q, seq_k, head_dim, block, scale: scale as f32 };
    let k = if k.dtype() != q.dtype() { k.clone().detach().cast(q.dtype()) } else { k.clone().detach() };
    let out = <Dispatch as SeerTargetBackend>::seer_block_max(
        q.clone().detach().into_dispatch(),
        k.into_dispatch(),
        lse.clone().detach().cast(DType::F32).into_dispatch(),
        BlockMaxParams(p),
    );
    Tensor::from_dispatch(out)
}
