//! DMA's gathered key order on the device (`sparse_attn_kernels::key_last_rows` and
//! `key_order`), wired into Burn as a backend extension: the permutation of the keys and the
//! per-query-tile key-block lists the attention then walks. Not differentiable: the autodiff
//! backend forwards to the inner one.

use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::fusion::custom::TensorSpec;
use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::backend::{Autodiff, Dispatch, backend_extension};
use burn::tensor::{DType, Int, Shape, Tensor};
use burn_cubecl::{CubeBackend, tensor::CubeTensor};
use sparse_attn_kernels as sak;

/// One key-order call: `[batch, heads, seq_k]` bias, `seq_q` queries, tiles of `query_tile`
/// queries, blocks of `key_block` keys.
#[derive(Debug, Clone, PartialEq)]
pub struct OrderParams {
    batch: usize,
    heads: usize,
    seq_q: usize,
    seq_k: usize,
    query_tile: usize,
    key_block: usize,
    causal: bool,
}

impl OrderParams {
    fn list_shape(&self) -> Vec<usize> {
        vec![self.batch, self.heads, self.seq_q.div_ceil(self.query_tile), self.seq_k.div_ceil(self.key_block)]
    }
}

fn order_meta(_bias: &TensorSpec, _tv: &TensorSpec, _ti: &TensorSpec, p: &OrderParams) -> (TensorSpec, TensorSpec) {
    (
        TensorSpec::new(Shape::from(vec![p.batch, p.heads, p.seq_k]), DType::I32),
        TensorSpec::new(Shape::from(p.list_shape()), DType::I32),
    )
}

/// The key-order kernels as a Burn backend extension.
#[backend_extension(Autodiff, Cube, Fusion)]
pub trait KeyOrderBackend: burn::backend::Backend {
    /// `(perm i32 [b, h, seq_k], lists i32 [b, h, tiles, key blocks])`; see
    /// [`sak::key_order`].
    #[fusion(meta = order_meta)]
    fn dma_key_order(bias: FloatTensor<Self>, thr_v: FloatTensor<Self>, thr_i: IntTensor<Self>, params: OrderParams) -> (IntTensor<Self>, IntTensor<Self>);
}

impl KeyOrderBackend for CubeBackend {
    fn dma_key_order(bias: CubeTensor, thr_v: CubeTensor, thr_i: CubeTensor, p: OrderParams) -> (CubeTensor, CubeTensor) {
        let (bias, thr_v, thr_i) = (super::ext::contiguous(bias), super::ext::contiguous(thr_v), super::ext::contiguous(thr_i));
        let heads = p.batch * p.heads;
        let client = &bias.client;
        let last = sak::key_last_rows(client, &bias.handle, &thr_v.handle, &thr_i.handle, heads, p.seq_q, p.seq_k, p.causal)
            .unwrap_or_else(|e| panic!("DMA key-order kernel: {e}"));
        let order = sak::key_order(client, &last, heads, p.seq_q, p.seq_k, p.query_tile, p.key_block, p.causal)
            .unwrap_or_else(|e| panic!("DMA key-order kernel: {e}"));
        let out = |shape: Vec<usize>, h| CubeTensor::new_contiguous(bias.client.clone(), bias.device.clone(), Shape::from(shape), h, DType::I32);
        (out(vec![p.batch, p.heads, p.seq_k], order.perm), out(p.list_shape(), order.lists))
    }
}

impl<B: KeyOrderBackend, C: CheckpointStrategy> KeyOrderBackend for Autodiff<B, C> {
    fn dma_key_order(bias: FloatTensor<Self>, thr_v: FloatTensor<Self>, thr_i: IntTensor<Self>, p: OrderParams) -> (IntTensor<Self>, IntTensor<Self>) {
        B::dma_key_order(bias.into_primitive(), thr_v.into_primitive(), thr_i, p)
    }
}

/// `(perm [b, h, seq_k], lists [b, h, ceil(seq_q / query_tile), ceil(seq_k / key_block)])` of
/// DMA's gathered order for `bias [b, h, seq_k]` and its keep threshold.
pub(crate) fn key_order(bias: &Tensor<3>, thr_v: &Tensor<3>, thr_i: &Tensor<3, Int>, seq_q: usize, query_tile: usize, key_block: usize, causal: bool) -> (Tensor<3, Int>, Tensor<4, Int>) {
    let [batch, heads, seq_k] = bias.dims();
    let p = OrderParams { batch, heads, seq_q, seq_k, query_tile, key_block, causal };
    let (perm, lists) = <Dispatch as KeyOrderBackend>::dma_key_order(
        bias.clone().detach().cast(DType::F32).into_dispatch(),
        thr_v.clone().detach().cast(DType::F32).into_dispatch(),
        thr_i.clone().cast(DType::I32).into_dispatch(),
        p,
    );
    (Tensor::from_dispatch(perm), Tensor::from_dispatch(lists))
}
