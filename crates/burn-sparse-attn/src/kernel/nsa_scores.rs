//! NSA's selection-block scores on the device (`sparse_attn_kernels::nsa_block_scores`),
//! wired into Burn as a backend extension: the compression probabilities are never
//! materialised. The scores only feed the top-k, so they are not differentiable: the
//! autodiff backend forwards to the inner one.

use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::fusion::custom::TensorSpec;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Dispatch, backend_extension};
use burn::tensor::{DType, Shape, Tensor};
use burn_cubecl::{CubeBackend, tensor::CubeTensor};
use sparse_attn_kernels as sak;

use crate::nsa::NsaParams;

/// One block-score call: the kernel's problem (a chunk of query rows).
#[derive(Debug, Clone, PartialEq)]
pub struct ScoreParams(sak::BlockScoreProblem);

fn scores_meta(_q: &TensorSpec, _k: &TensorSpec, _lse: &TensorSpec, p: &ScoreParams) -> TensorSpec {
    let p = &p.0;
    TensorSpec::new(Shape::from(vec![p.batch, p.heads_kv, p.rows, p.n_sel]), DType::F32)
}

/// The block-score kernel as a Burn backend extension.
#[backend_extension(Autodiff, Cube, Fusion)]
pub trait NsaScoresBackend: burn::backend::Backend {
    /// f32 `[b, hkv, rows, n_sel]` block scores with the selection rule's offsets; see
    /// [`sak::nsa_block_scores`].
    #[fusion(meta = scores_meta)]
    fn nsa_block_scores(q: FloatTensor<Self>, k_cmp: FloatTensor<Self>, lse: FloatTensor<Self>, params: ScoreParams) -> FloatTensor<Self>;
}

impl NsaScoresBackend for CubeBackend {
    fn nsa_block_scores(q: CubeTensor, k_cmp: CubeTensor, lse: CubeTensor, p: ScoreParams) -> CubeTensor {
        let (q, k_cmp, lse) = (super::ext::contiguous(q), super::ext::contiguous(k_cmp), super::ext::contiguous(lse));
        let dtype = super::ext::attn_dtype(q.dtype);
        let handle = sak::nsa_block_scores(&q.client, dtype, &p.0, &q.handle, &k_cmp.handle, &lse.handle)
            .unwrap_or_else(|e| panic!("NSA block-score kernel: {e}"));
        let shape = Shape::from(vec![p.0.batch, p.0.heads_kv, p.0.rows, p.0.n_sel]);
        CubeTensor::new_contiguous(q.client.clone(), q.device.clone(), shape, handle, DType::F32)
    }
}

impl<B: NsaScoresBackend, C: CheckpointStrategy> NsaScoresBackend for Autodiff<B, C> {
    fn nsa_block_scores(q: FloatTensor<Self>, k_cmp: FloatTensor<Self>, lse: FloatTensor<Self>, p: ScoreParams) -> FloatTensor<Self> {
        let out = B::nsa_block_scores(q.into_primitive(), k_cmp.into_primitive(), lse.into_primitive(), p);
        <Self as burn::backend::AutodiffBackend>::from_inner(out)
    }
}

/// Block scores `[b, hkv, rows, n_sel]` (f32, detached) of query rows `row0..row0 + rows`
/// of `q [b, hq, seq_q, d]`, from `k_cmp [b, hkv, n_cmp, d]` and the compressed LSE
/// `[b, hq, seq_q]`, with NSA's selection rule folded in (`-inf` after the query, `+inf` on
/// forced blocks). Arguments are checked by the caller.
pub(crate) fn block_scores(q: &Tensor<4>, k_cmp: &Tensor<4>, lse: &Tensor<3>, seq_k: usize, row0: usize, rows: usize, params: &NsaParams) -> Tensor<4> {
    let [batch, heads_q, seq_q, head_dim] = q.dims();
    let [_, heads_kv, n_cmp, _] = k_cmp.dims();
    let p = sak::BlockScoreProblem {
        batch,
        heads_q,
        heads_kv,
        head_dim,
        seq_q,
        row0,
        rows,
        pos0: seq_k as i64 - seq_q as i64,
        n_cmp,
        compress_block: params.compress_block,
        compress_stride: params.compress_stride,
        select_block: params.select_block,
        n_sel: seq_k.div_ceil(params.select_block),
        forced_initial: params.forced_initial,
        forced_local: params.forced_local,
        scale: params.scale.unwrap_or(1.0 / (head_dim as f64).sqrt()) as f32,
    };
    let k_cmp = if k_cmp.dtype() != q.dtype() { k_cmp.clone().detach().cast(q.dtype()) } else { k_cmp.clone().detach() };
    let lse = lse.clone().detach().cast(DType::F32);
    let out = <Dispatch as NsaScoresBackend>::nsa_block_scores(q.clone().detach().into_dispatch(), k_cmp.into_dispatch(), lse.into_dispatch(), ScoreParams(p));
    Tensor::from_dispatch(out)
}
