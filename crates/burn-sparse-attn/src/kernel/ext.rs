//! Burn backend extension around the CubeCL attention kernels.
//!
//! One op, `sparse_attn_forward -> (O, LSE)`, and its backward `sparse_attn_backward ->
//! (dQ, dK, dV, dBias)`. Optional inputs (bias, keep threshold, block schedule) are passed
//! as 1-element placeholders flagged absent in [`KernelParams`], which keeps the op signature
//! fixed for Fusion. Only O is differentiable; the LSE leaves as an untracked tensor and is
//! kept in the backward state, so attentions over disjoint key sets merged by LSE still
//! back-propagate exactly.

use burn::backend::autodiff::{

    checkpoint::{base::Checkpointer, strategy::CheckpointStrategy},
    grads::Gradients,
    ops::{Backward, Ops, OpsKind},
};
use burn::backend::fusion::custom::TensorSpec;
use burn::backend::{Autodiff, Dispatch, backend_extension};
use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::tensor::{DType, Int, Shape, Tensor};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::{CubeBackend, tensor::CubeTensor};
use sparse_attn_kernels as sak;

use crate::attention::{AttentionOptions, AttentionOutput, AttnDims, KeyBias};
use crate::block_sparse::BlockSelection;
use crate::error::{Result, SparseAttnError};

/// Host-side description of one kernel call (everything that is not a tensor).
#[derive(Debug, Clone, PartialEq)]
pub struct KernelParams {
    dims: [usize; 6],
    scale: f32,
    causal: bool,
    window: usize,
    bias_heads: usize,
    has_threshold: bool,
    sel_heads: usize,
    capacity: usize,
    query_block: usize,
    key_block: usize,
    /// The `key_pos` input holds the keys' sequence positions (gathered keys).
    gathered_keys: bool,
    /// The `key_pos` input holds packed sequences' visibility intervals instead
    /// ([`sak::SegmentBounds::bounds`]; never together with gathered keys).
    segments: bool,
    /// The bias is one value per (query, key) pair, `[b, bias_heads, sq, sk]`.
    pair_bias: bool,
}

impl KernelParams {
    fn problem(&self) -> sak::AttnProblem {
        let [batch, heads_q, heads_kv, seq_q, seq_k, head_dim] = self.dims;
        sak::AttnProblem {
            batch,
            heads_q,
            heads_kv,
            seq_q,
            seq_k,
            head_dim,
            scale: self.scale,
            causal: self.causal,
            window: (self.window > 0).then_some(self.window),
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn fwd_meta(q: &TensorSpec, _k: &TensorSpec, _v: &TensorSpec, _b: &TensorSpec, _tv: &TensorSpec, _ti: &TensorSpec, _ix: &TensorSpec, _kp: &TensorSpec, p: &KernelParams) -> (TensorSpec, TensorSpec) {
    let [b, hq, _, sq, _, _] = p.dims;
    (q.clone(), TensorSpec::new(Shape::from(vec![b, hq, sq]), DType::F32))
}

#[allow(clippy::too_many_arguments)]
fn bwd_meta(
    q: &TensorSpec,
    k: &TensorSpec,
    v: &TensorSpec,
    _o: &TensorSpec,
    _lse: &TensorSpec,
    _d_o: &TensorSpec,
    bias: &TensorSpec,
    _tv: &TensorSpec,
    _ti: &TensorSpec,
    _ix: &TensorSpec,
    _kp: &TensorSpec,
    _p: &KernelParams,
) -> (TensorSpec, TensorSpec, TensorSpec, TensorSpec) {
    (q.clone(), k.clone(), v.clone(), bias.clone())
}

/// The attention kernels as a Burn backend extension.
#[backend_extension(Autodiff, Cube, Fusion)]
pub trait SparseAttnBackend: burn::backend::Backend {
    /// Forward: `(O [b, hq, sq, d], LSE f32 [b, hq, sq])`.
    #[allow(clippy::too_many_arguments)]
    #[fusion(meta = fwd_meta)]
    fn sparse_attn_forward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        thr_value: FloatTensor<Self>,
        thr_index: IntTensor<Self>,
        indices: IntTensor<Self>,
        key_pos: IntTensor<Self>,
        params: KernelParams,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);

    /// Backward: `(dQ, dK, dV, dBias)`; dBias has the bias placeholder's shape when absent.
    #[allow(clippy::too_many_arguments)]
    #[fusion(meta = bwd_meta)]
    fn sparse_attn_backward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        o: FloatTensor<Self>,
        lse: FloatTensor<Self>,
        d_o: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        thr_value: FloatTensor<Self>,
        thr_index: IntTensor<Self>,
        indices: IntTensor<Self>,
        key_pos: IntTensor<Self>,
        params: KernelParams,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);
}

pub(super) fn attn_dtype(dtype: DType) -> sak::AttnDtype {
    match dtype {
        DType::F32 => sak::AttnDtype::F32,
        DType::F16 => sak::AttnDtype::F16,
        DType::BF16 => sak::AttnDtype::BF16,
        other => panic!("sparse attention kernel: dtype {other:?} was not rejected by validation"),
    }
}

/// `t`, copied to a contiguous layout when it is not (the kernels take row-major buffers).
pub(super) fn contiguous(t: CubeTensor) -> CubeTensor {
    if t.is_contiguous() { t } else { into_contiguous(t) }
}

fn output(like: &CubeTensor, shape: Vec<usize>, handle: sak::Handle, dtype: DType) -> CubeTensor {
    CubeTensor::new_contiguous(like.client.clone(), like.device.clone(), Shape::from(shape), handle, dtype)
}

struct Prepared {
    q: CubeTensor,
    k: CubeTensor,
    v: CubeTensor,
    bias: Option<sak::KeyBias>,
    schedule: Option<sak::BlockSchedule>,
    bias_tensor: CubeTensor,
    key_pos: Option<sak::Handle>,
    segments: Option<sak::SegmentBounds>,
}

impl Prepared {
    /// The kernels' view of the prepared buffers.
    fn inputs(&self) -> sak::AttnInputs<'_> {
        sak::AttnInputs {
            q: &self.q.handle,
            k: &self.k.handle,
            v: &self.v.handle,
            bias: self.bias.as_ref(),
            schedule: self.schedule.as_ref(),
            key_positions: self.key_pos.as_ref(),
            segments: self.segments.as_ref(),
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn prepare(
    q: CubeTensor,
    k: CubeTensor,
    v: CubeTensor,
    bias: CubeTensor,
    thr_value: CubeTensor,
    thr_index: CubeTensor,
    indices: CubeTensor,
    key_pos: CubeTensor,
    p: &KernelParams,
) -> Prepared {
    let q = contiguous(q);
    let k = contiguous(k);
    let v = contiguous(v);
    let bias = contiguous(bias);
    let bias_spec = (p.bias_heads > 0).then(|| sak::KeyBias {
        values: bias.handle.clone(),
        heads: p.bias_heads,
        threshold: p.has_threshold.then(|| (contiguous(thr_value).handle.clone(), contiguous(thr_index).handle.clone())),
        pairwise: p.pair_bias,
    });
    let schedule = (p.sel_heads > 0).then(|| sak::BlockSchedule {
        indices: contiguous(indices).handle.clone(),
        sel_heads: p.sel_heads,
        capacity: p.capacity,
        query_block: p.query_block,
        key_block: p.key_block,
    });
    let key_pos = contiguous(key_pos);
    let segments = p.segments.then(|| sak::SegmentBounds { bounds: key_pos.handle.clone(), seq_q: p.dims[3], seq_k: p.dims[4] });
    let key_pos = p.gathered_keys.then(|| key_pos.handle.clone());
    Prepared { q, k, v, bias: bias_spec, schedule, bias_tensor: bias, key_pos, segments }
}

impl SparseAttnBackend for CubeBackend {
    fn sparse_attn_forward(
        q: CubeTensor,
        k: CubeTensor,
        v: CubeTensor,
        bias: CubeTensor,
        thr_value: CubeTensor,
        thr_index: CubeTensor,
        indices: CubeTensor,
        key_pos: CubeTensor,
        params: KernelParams,
    ) -> (CubeTensor, CubeTensor) {
        let dtype = q.dtype;
        let prep = prepare(q, k, v, bias, thr_value, thr_index, indices, key_pos, &params);
        let inputs = prep.inputs();
        let (o, lse) = sak::attention_forward(&prep.q.client, &params.problem(), attn_dtype(dtype), &inputs)
            .unwrap_or_else(|e| panic!("sparse attention forward kernel: {e}"));
        let [b, hq, _, sq, _, d] = params.dims;
        (output(&prep.q, vec![b, hq, sq, d], o, dtype), output(&prep.q, vec![b, hq, sq], lse, DType::F32))
    }

    fn sparse_attn_backward(
        q: CubeTensor,
        k: CubeTensor,
        v: CubeTensor,
        o: CubeTensor,
        lse: CubeTensor,
        d_o: CubeTensor,
        bias: CubeTensor,
        thr_value: CubeTensor,
        thr_index: CubeTensor,
        indices: CubeTensor,
        key_pos: CubeTensor,
        params: KernelParams,
    ) -> (CubeTensor, CubeTensor, CubeTensor, CubeTensor) {
        let dtype = q.dtype;
        let prep = prepare(q, k, v, bias, thr_value, thr_index, indices, key_pos, &params);
        let o = contiguous(o);
        let lse = contiguous(lse);
        let d_o = contiguous(d_o);
        let inputs = prep.inputs();
        let grads = sak::attention_backward(&prep.q.client, &params.problem(), attn_dtype(dtype), &inputs, &o.handle, &lse.handle, &d_o.handle)
            .unwrap_or_else(|e| panic!("sparse attention backward kernel: {e}"));
        let [b, hq, hkv, sq, sk, d] = params.dims;
        let dbias_shape = match params.pair_bias {
            true => vec![b, params.bias_heads, sq, sk],
            false => vec![b, params.bias_heads, sk],
        };
        let dbias = match grads.dbias {
            Some(h) => output(&prep.q, dbias_shape, h, dtype),
            None => prep.bias_tensor.clone(),
        };
        (
            output(&prep.q, vec![b, hq, sq, d], grads.dq, dtype),
            output(&prep.q, vec![b, hkv, sk, d], grads.dk, dtype),
            output(&prep.q, vec![b, hkv, sk, d], grads.dv, dtype),
            dbias,
        )
    }
}

#[derive(Debug)]
struct SparseAttnBackwardOp;

#[derive(Debug, Clone)]
struct BackwardState<B: burn::backend::Backend> {
    q: FloatTensor<B>,
    k: FloatTensor<B>,
    v: FloatTensor<B>,
    o: FloatTensor<B>,
    lse: FloatTensor<B>,
    bias: FloatTensor<B>,
    thr_value: FloatTensor<B>,
    thr_index: IntTensor<B>,
    indices: IntTensor<B>,
    key_pos: IntTensor<B>,
    params: KernelParams,
}

impl<B: SparseAttnBackend> Backward<B, 4> for SparseAttnBackwardOp {
    type State = BackwardState<B>;

    fn backward(self, ops: Ops<Self::State, 4>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let d_o = grads.consume::<B>(&ops.node);
        let s = ops.state;
        let (dq, dk, dv, dbias) = B::sparse_attn_backward(s.q, s.k, s.v, s.o, s.lse, d_o, s.bias, s.thr_value, s.thr_index, s.indices, s.key_pos, s.params.clone());
        let [pq, pk, pv, pb] = ops.parents;
        for (parent, grad) in [(pq, dq), (pk, dk), (pv, dv)] {
            if let Some(node) = parent {
                grads.register::<B>(node.id, grad);
            }
        }
        if let (Some(node), true) = (pb, s.params.bias_heads > 0) {
            grads.register::<B>(node.id, dbias);
        }
    }
}

impl<B: SparseAttnBackend, C: CheckpointStrategy> SparseAttnBackend for Autodiff<B, C> {
    fn sparse_attn_forward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        thr_value: FloatTensor<Self>,
        thr_index: IntTensor<Self>,
        indices: IntTensor<Self>,
        key_pos: IntTensor<Self>,
        params: KernelParams,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let nodes = [q.node(), k.node(), v.node(), bias.node()];
        let (qp, kp, vp, bp) = (q.into_primitive(), k.into_primitive(), v.into_primitive(), bias.into_primitive());
        let tv = thr_value.into_primitive();
        let (o, lse) = B::sparse_attn_forward(qp.clone(), kp.clone(), vp.clone(), bp.clone(), tv.clone(), thr_index.clone(), indices.clone(), key_pos.clone(), params.clone());
        let lse_out = <Self as burn::backend::AutodiffBackend>::from_inner(lse.clone());
        let out = match SparseAttnBackwardOp.prepare::<C>(nodes).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let state = BackwardState::<B> {
                    q: qp,
                    k: kp,
                    v: vp,
                    o: o.clone(),
                    lse,
                    bias: bp,
                    thr_value: tv,
                    thr_index,
                    indices,
                    key_pos,
                    params,
                };
                prep.finish(state, o)
            }
            OpsKind::UnTracked(prep) => prep.finish(o),
        };
        (out, lse_out)
    }

    fn sparse_attn_backward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        o: FloatTensor<Self>,
        lse: FloatTensor<Self>,
        d_o: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        thr_value: FloatTensor<Self>,
        thr_index: IntTensor<Self>,
        indices: IntTensor<Self>,
        key_pos: IntTensor<Self>,
        params: KernelParams,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        // Second-order gradients are not supported: the backward runs on plain tensors.
        let (dq, dk, dv, db) = B::sparse_attn_backward(
            q.into_primitive(),
            k.into_primitive(),
            v.into_primitive(),
            o.into_primitive(),
            lse.into_primitive(),
            d_o.into_primitive(),
            bias.into_primitive(),
            thr_value.into_primitive(),
            thr_index,
            indices,
            key_pos,
            params,
        );
        let wrap = <Self as burn::backend::AutodiffBackend>::from_inner;
        (wrap(dq), wrap(dk), wrap(dv), wrap(db))
    }
}

/// Whether the attention kernels take the register-fragment path (CUDA tensor cores, f16 or
/// bf16) for `q`'s device, dtype and head dimension.
pub(crate) fn fragment_path(q: &Tensor<4>) -> bool {
    let dtype = q.dtype();
    if !matches!(dtype, DType::F16 | DType::BF16) {
        return false;
    }
    match q.device().without_autodiff().as_dispatch() {
        burn::backend::DispatchDevice::Cube(cube) => sak::kernel_path(&cube.client(), attn_dtype(dtype), q.dims()[3]) == sak::KernelPath::Fragment,
        _ => false,
    }
}

/// Whether `device` (or the device an autodiff device wraps) is a CubeCL device.
pub(crate) fn is_cube_device(device: &burn::tensor::Device) -> bool {
    matches!(device.clone().without_autodiff().as_dispatch(), burn::backend::DispatchDevice::Cube(_))
}

fn unsupported(arg: &'static str, detail: String) -> SparseAttnError {
    SparseAttnError::Unsupported { arg, detail }
}

/// Validated call of the kernel through the extension.
#[allow(clippy::too_many_arguments)]
pub(crate) fn attention(
    q: &Tensor<4>,
    k: &Tensor<4>,
    v: &Tensor<4>,
    bias: Option<&KeyBias>,
    selection: Option<&BlockSelection>,
    key_pos: Option<&Tensor<3, Int>>,
    segments: Option<&sak::VarlenBounds>,
    opts: &AttentionOptions,
    dims: &AttnDims,
) -> Result<AttentionOutput> {
    let dtype = check_dtypes(q, k, v)?;
    let bias = bias.map(|b| BiasArg { values: cast_to(b.values.clone(), dtype).into_dispatch(), heads: b.values.dims()[1], keep: b.keep.as_ref(), pair: false });
    call(q, k, v, bias, selection, key_pos, segments, opts, dims)
}

/// q, k and v share one dtype the kernels take on this device; returns it.
fn check_dtypes(q: &Tensor<4>, k: &Tensor<4>, v: &Tensor<4>) -> Result<DType> {
    let dtype = q.dtype();
    if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16) {
        return Err(unsupported("q.dtype", format!("the attention kernels take f32, f16 or bf16, got {dtype:?}")));
    }
    for (arg, t) in [("k.dtype", k.dtype()), ("v.dtype", v.dtype())] {
        if t != dtype {
            return Err(unsupported(arg, format!("must equal q's dtype {dtype:?}, got {t:?}")));
        }
    }
    if let burn::backend::DispatchDevice::Cube(cube) = q.device().without_autodiff().as_dispatch() {
        let client = cube.client();
        sak::supports(&client, attn_dtype(dtype)).map_err(|e| unsupported("q.dtype", e.to_string()))?;
    }
    Ok(dtype)
}

/// `t` in `dtype` (the bias is added to scores in the attention dtype).
fn cast_to<const D: usize>(t: Tensor<D>, dtype: DType) -> Tensor<D> {
    if t.dtype() != dtype { t.cast(dtype) } else { t }
}

/// The bias as the kernel call takes it: a per-key `[b, hb, sk]` or per-pair `[b, hb, sq, sk]`
/// tensor (any rank through the dispatch layer) with its heads and keep rule.
struct BiasArg<'a> {
    values: burn::tensor::DispatchTensor,
    heads: usize,
    keep: Option<&'a crate::attention::KeepThreshold>,
    pair: bool,
}

/// Attention with one bias per (query, key) pair, `bias: [b, hb, sq, sk]` (`hb` = kv or
/// query heads), optionally with a per-row keep rule on each row's own bias: the kernels'
/// portable path on every Cube device. Gradients reach q, k, v and the bias.
pub(crate) fn attention_pair_bias(
    q: &Tensor<4>,
    k: &Tensor<4>,
    v: &Tensor<4>,
    bias: &Tensor<4>,
    keep: Option<&crate::attention::KeepThreshold>,
    opts: &AttentionOptions,
    dims: &AttnDims,
) -> Result<AttentionOutput> {
    let dtype = check_dtypes(q, k, v)?;
    let arg = BiasArg { values: cast_to(bias.clone(), dtype).into_dispatch(), heads: bias.dims()[1], keep, pair: true };
    call(q, k, v, Some(arg), None, None, None, opts, dims)
}

#[allow(clippy::too_many_arguments)]
fn call(
    q: &Tensor<4>,
    k: &Tensor<4>,
    v: &Tensor<4>,
    bias: Option<BiasArg>,
    selection: Option<&BlockSelection>,
    key_pos: Option<&Tensor<3, Int>>,
    segments: Option<&sak::VarlenBounds>,
    opts: &AttentionOptions,
    dims: &AttnDims,
) -> Result<AttentionOutput> {
    let dtype = q.dtype();
    let device = q.device();
    let placeholder = || Tensor::<1>::zeros([1], (&device, dtype));
    let int_placeholder = || Tensor::<1, Int>::zeros([1], &device).cast(DType::I32);
    let pair_bias = bias.as_ref().is_some_and(|b| b.pair);
    let (bias_t, thr_v, thr_i, bias_heads, has_thr) = match bias {
        Some(b) => {
            let (tv, ti, has) = match b.keep {
                Some(keep) => (keep.value.clone().detach().cast(DType::F32).into_dispatch(), keep.index.clone().cast(DType::I32).into_dispatch(), true),
                None => (placeholder().into_dispatch(), int_placeholder().into_dispatch(), false),
            };
            (b.values, tv, ti, b.heads, has)
        }
        None => (placeholder().into_dispatch(), placeholder().into_dispatch(), int_placeholder().into_dispatch(), 0, false),
    };
    let (indices, sel_heads, capacity, query_block, key_block) = match selection {
        Some(s) => {
            let [_, hs, _, c] = s.indices.dims();
            (s.indices.clone().cast(DType::I32).into_dispatch(), hs, c, s.query_block, s.key_block)
        }
        None => (int_placeholder().into_dispatch(), 0, 0, 1, 1),
    };
    let params = KernelParams {
        dims: [dims.batch, dims.heads_q, dims.heads_kv, dims.seq_q, dims.seq_k, dims.head_dim],
        scale: opts.scale_for(dims.head_dim) as f32,
        causal: opts.causal,
        window: opts.window.unwrap_or(0),
        bias_heads,
        has_threshold: has_thr,
        sel_heads,
        capacity,
        query_block,
        key_block,
        gathered_keys: key_pos.is_some(),
        segments: segments.is_some(),
        pair_bias,
    };
    let key_pos = match (key_pos, segments) {
        (Some(kp), _) => kp.clone().cast(DType::I32).into_dispatch(),
        (None, Some(sb)) => {
            let packed: Vec<i32> = sb.packed();
            let n = packed.len();
            Tensor::<1, Int>::from_data(burn::tensor::TensorData::new(packed, [n]), &device).cast(DType::I32).into_dispatch()
        }
        (None, None) => int_placeholder().into_dispatch(),
    };
    let (o, lse) = <Dispatch as SparseAttnBackend>::sparse_attn_forward(
        q.clone().into_dispatch(),
        k.clone().into_dispatch(),
        v.clone().into_dispatch(),
        bias_t,
        thr_v,
        thr_i,
        indices,
        key_pos,
        params,
    );
    let lse: Tensor<3> = Tensor::from_dispatch(lse);
    let lse = if lse.dtype() != dtype { lse.cast(dtype) } else { lse };
    Ok(AttentionOutput { output: Tensor::from_dispatch(o), lse })
}
