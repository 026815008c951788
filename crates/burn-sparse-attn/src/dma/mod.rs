//! Dynamic Mask Attention (DMA, 2025): a content-aware additive bias computed from the values,
//! `bias[b, h, j] = A_h * softplus(dt_proj(V_j))` per kv head `h` and key `j`, broadcast over
//! queries; each query keeps its `window` visible keys with the largest bias (selection on
//! the detached bias) and attends to them with scores `scale * q.k + bias`.
//!
//! The bias formula is the current flash-dmattn one (`A * softplus(..)`, `A` initialised to
//! 0); the older Doge models used `exp(A * softplus(..))`. Ties at the selection threshold
//! are broken towards the more recent key (published code leaves tie order to `torch.topk`).

mod module;
mod packed;
mod pairwise;

pub use module::{DmaAttention, DmaAttentionConfig};
pub use packed::{dma_attention_varlen, dma_keep_threshold_varlen};
pub use pairwise::{dma_attention_pairwise, dma_keep_mask_pairwise, dma_keep_threshold_pairwise};

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use burn::nn::Linear;
use burn::tensor::activation::softplus;
use burn::tensor::{Bool, Int, Tensor, TensorData};

use crate::attention::{AttentionOptions, AttentionOutput, KeepThreshold, KeyBias, attention_core, validate_qkv};
use crate::error::{Result, check_positive, shape_err};

/// Hyper-parameters of DMA attention.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DmaParams {
    /// Keys kept per query (`keep_window_size`). Default 2048.
    pub window: usize,
    /// Softmax scale; `None` means `1/sqrt(head_dim)`.
    pub scale: Option<f64>,
    /// Causal (bottom-right aligned) visibility, as in a decoder; `false` lets every query see
    /// every key (the keep rule then picks the same top-`window` keys for every row). Default
    /// `true`.
    pub causal: bool,
}

impl Default for DmaParams {
    fn default() -> Self {
        Self { window: 2048, scale: None, causal: true }
    }
}

/// The DMA bias `A * softplus(dt_proj(V))`: `v: [b, hkv, sk, d]`, `dt_proj: hkv*d -> hkv`,
/// `a: [hkv]`; returns `[b, hkv, sk]`.
pub fn dma_bias(v: Tensor<4>, dt_proj: &Linear, a: Tensor<1>) -> Result<Tensor<3>> {
    let [b, h, sk, d] = v.dims();
    let [din, dout] = dt_proj.weight.dims();
    if din != h * d || dout != h {
        return shape_err("dt_proj", format!("expected weight [{}, {h}] for v {:?}, got [{din}, {dout}]", h * d, v.dims()));
    }
    if a.dims() != [h] {
        return shape_err("a", format!("expected [{h}], got {:?}", a.dims()));
    }
    let flat = v.swap_dims(1, 2).reshape([b, sk, h * d]);
    let dt = softplus(crate::rows::grouped_linear(dt_proj, flat), 1.0);
    Ok(crate::rows::scale_columns(dt, a).swap_dims(1, 2))
}

/// Per-row keep rule for DMA's top-`window` selection over each query's visible keys.
///
/// `bias: [b, hb, sk]`; query `i` sees the keys `0..=i + sk - seq_q` when `causal`, all keys
/// otherwise. No `seq_q x seq_k` tensor: on Cube devices a kernel ranks every key against
/// the others, all keys in parallel, and no data goes to the host; elsewhere one walk over
/// the keys per head with a heap of the `window` largest ([`dma_keep_threshold_host`]).
/// The selection is not differentiable.
pub fn dma_keep_threshold(bias: &Tensor<3>, seq_q: usize, window: usize, causal: bool) -> Result<KeepThreshold> {
    check_positive("window", window)?;
    if let Some((value, index)) = crate::kernel::try_keep_threshold(bias, seq_q, window, causal) {
        let value = if value.dtype() != bias.dtype() { value.cast(bias.dtype()) } else { value };
        return Ok(KeepThreshold { value, index });
    }
    dma_keep_threshold_host(bias, seq_q, window, causal)
}

/// [`dma_keep_threshold`] on the host (the bias is copied there): the path on Flex, and the
/// oracle of the kernel's tests.
pub fn dma_keep_threshold_host(bias: &Tensor<3>, seq_q: usize, window: usize, causal: bool) -> Result<KeepThreshold> {
    check_positive("window", window)?;
    let sk = bias.dims()[2];
    host_thresholds(bias, &[0, seq_q], &[0, sk], window, causal)
}

/// The keep rule of every row of a packed batch (sequences `cu_q[s]..cu_q[s + 1]` of rows
/// and `cu_k[s]..cu_k[s + 1]` of keys; one sequence for an unpacked call), on the host:
/// per (batch, head) and sequence one walk over its keys with a heap of the `window`
/// largest, so a row ranks only its own sequence's visible keys.
pub(crate) fn host_thresholds(bias: &Tensor<3>, cu_q: &[usize], cu_k: &[usize], window: usize, causal: bool) -> Result<KeepThreshold> {
    let [b, h, sk] = bias.dims();
    let seq_q = cu_q[cu_q.len() - 1];
    let device = bias.device();
    let values: Vec<f64> = bias.clone().detach().into_data().convert::<f64>().try_to_vec::<f64>().expect("bias data as f64");
    let mut thr_v = Vec::with_capacity(b * h * seq_q);
    let mut thr_i = Vec::with_capacity(b * h * seq_q);
    for row in 0..b * h {
        for s in 0..cu_q.len() - 1 {
            let (k0, k1) = (cu_k[s], cu_k[s + 1]);
            let (lq, lk) = (cu_q[s + 1] - cu_q[s], k1 - k0);
            let keys = &values[row * sk + k0..row * sk + k1];
            // Min-heap of the `window` largest (value, index) pairs seen so far; f64 holds
            // every supported dtype exactly, so the threshold equals one of the bias values.
            let mut heap: BinaryHeap<Reverse<(OrdF64, usize)>> = BinaryHeap::new();
            let mut seen = 0usize;
            for i in 0..lq {
                let visible = if causal { (i as i64 + lk as i64 - lq as i64 + 1).clamp(0, lk as i64) as usize } else { lk };
                while seen < visible {
                    heap.push(Reverse((OrdF64(keys[seen]), k0 + seen)));
                    if heap.len() > window {
                        heap.pop();
                    }
                    seen += 1;
                }
                if visible <= window {
                    thr_v.push(f64::NEG_INFINITY);
                    thr_i.push(0i64);
                } else {
                    let Reverse((OrdF64(v), j)) = *heap.peek().expect("non-empty heap");
                    thr_v.push(v);
                    thr_i.push(j as i64);
                }
            }
        }
    }
    let value = Tensor::<3>::from_data(TensorData::new(thr_v, [b, h, seq_q]), (&device, bias.dtype()));
    let index = Tensor::<3, Int>::from_data(TensorData::new(thr_i, [b, h, seq_q]), &device);
    Ok(KeepThreshold { value, index })
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct OrdF64(f64);
impl Eq for OrdF64 {}
impl PartialOrd for OrdF64 {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for OrdF64 {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&other.0)
    }
}

/// DMA attention: keeps each query's top-`window` visible keys by bias (causal or all keys,
/// per `params.causal`) and attends with the bias added to the scores. Gradients reach q, k,
/// v and the bias. On CUDA in f16/bf16 the kept keys are gathered: each tile of 64 queries
/// walks only the key blocks (of a bias-dependent key order) that hold keys it keeps, so the
/// cost follows `seq x window` instead of `seq^2`.
pub fn dma_attention(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, bias: Tensor<3>, params: &DmaParams) -> Result<AttentionOutput> {
    let dims = validate_qkv(&q, &k, &v)?;
    let keep = dma_keep_threshold(&bias, dims.seq_q, params.window, params.causal)?;
    let bias = KeyBias { values: bias, keep: Some(keep) };
    let opts = AttentionOptions { causal: params.causal, window: None, scale: params.scale };
    crate::attention::validate_bias(&bias, &dims)?;
    if let Some(out) = crate::kernel::try_gathered_dma(&q, &k, &v, &bias, &opts, &dims) {
        return out;
    }
    attention_core(q, k, v, Some(&bias), None, None, &opts)
}

/// The keys DMA attends to, as a mask `[b, hb, seq_q, seq_k]` (true = kept): visible to the
/// query (causal, bottom-right aligned, or every key) and among its top `window` by bias,
/// ties to the more recent key. For inspection and tests: it materialises `seq_q x seq_k`,
/// which the attention itself never does.
pub fn dma_keep_mask(bias: &Tensor<3>, seq_q: usize, window: usize, causal: bool) -> Result<Tensor<4, Bool>> {
    let keep = dma_keep_threshold(bias, seq_q, window, causal)?;
    let [b, h, sk] = bias.dims();
    let device = bias.device();
    let values = bias.clone().detach().reshape([b, h, 1, sk]).expand([b, h, seq_q, sk]);
    let thr = keep.value.reshape([b, h, seq_q, 1]).expand([b, h, seq_q, sk]);
    let thr_i = keep.index.reshape([b, h, seq_q, 1]).expand([b, h, seq_q, sk]);
    let key = Tensor::<1, Int>::arange(0..sk as i64, &device).reshape([1, 1, 1, sk]).expand([b, h, seq_q, sk]);
    let kept = values.clone().greater(thr.clone()).bool_or(values.equal(thr).bool_and(key.clone().greater_equal(thr_i)));
    if !causal {
        return Ok(kept);
    }
    let pos = (Tensor::<1, Int>::arange(0..seq_q as i64, &device) + (sk as i64 - seq_q as i64))
        .reshape([1, 1, seq_q, 1])
        .expand([b, h, seq_q, sk]);
    Ok(kept.bool_and(key.lower_equal(pos)))
}
