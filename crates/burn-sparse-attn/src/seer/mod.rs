//! SeerAttention (Microsoft 2024): a small learned gate (AttnGate) predicts which key blocks
//! matter for each query block; attention then runs block-sparse on the chosen blocks.
//!
//! Following the published prefill gate:
//! - pooling per block of `block_size = 64` tokens on pre-RoPE q and k: Q average-pooled,
//!   K max-, min- and average-pooled, concatenated in that order (the last block partial);
//! - per-query-head linear maps without bias to `gate_hidden = 128` (the Q map exists only
//!   when `head_dim != gate_hidden`, as in the reference; K is mapped per query head from its
//!   kv head's pooled keys);
//! - RoPE on the gate at each block's first-token position;
//! - gate logits `Qg Kg^T / sqrt(gate_hidden)` with a block-causal mask (diagonal included),
//!   shape `[batch, heads_q, n_query_blocks, n_key_blocks]`.
//!
//! Training target: the 2-D max-pooled map of the true causal attention probabilities (max
//! over the rows and columns of each block pair), each row normalised to sum 1; the loss is
//! `KL(target || softmax(gate logits))` averaged over all elements (PyTorch's
//! `KLDivLoss(reduction = "mean")`). Inference keeps blocks whose gate probability is
//! strictly above a threshold, or the top-k per query block.

mod module;

pub use module::{GatePool, SeerAttention, SeerAttentionConfig, SeerMode};

use burn::module::{Module, Param};
use burn::nn::Initializer;
use burn::tensor::activation::log_softmax;
use burn::tensor::{Bool, Device, Int, Tensor};

use crate::attention::reference::{masked_softmax, position_mask, scores};
use crate::attention::{AttentionOptions, AttnDims, validate_qkv};
use crate::block_sparse::BlockSelection;
use crate::error::{Result, check_positive, shape_err};
use crate::rope::apply_rope;

/// Per-head linear map without bias: `[b, h, n, in] -> [b, h, n, out]`.
#[derive(Module, Debug)]
pub struct MultiHeadLinear {
    /// `[heads, in, out]`.
    pub weight: Param<Tensor<3>>,
}

impl MultiHeadLinear {
    /// Normal(0, 0.02) initialisation, as the reference's `initializer_range`.
    pub fn new(heads: usize, d_in: usize, d_out: usize, device: &Device) -> Self {
        Self { weight: Initializer::Normal { mean: 0.0, std: 0.02 }.init([heads, d_in, d_out], device) }
    }

    /// Applies head `h`'s map to `x[:, h]`.
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let [b, h, _, _] = x.dims();
        let [_, i, o] = self.weight.dims();
        x.matmul(self.weight.val().unsqueeze::<4>().expand([b, h, i, o]))
    }
}

fn pad_seq(x: Tensor<4>, block: usize, value: f64) -> Tensor<4> {
    let [b, h, s, d] = x.dims();
    let padded = s.div_ceil(block) * block;
    if padded == s {
        return x;
    }
    let pad = Tensor::<4>::full([b, h, padded - s, d], value, (&x.device(), x.dtype()));
    Tensor::cat(vec![x, pad], 2)
}

/// Average pooling over blocks of the sequence: `[b, h, s, d] -> [b, h, ceil(s/block), d]`.
pub fn avg_pool(x: Tensor<4>, block: usize) -> Tensor<4> {
    let [b, h, s, d] = x.dims();
    let n = s.div_ceil(block);
    let counts = crate::grid::block_counts(n, block, s, &x.device(), x.dtype());
    let sum = pad_seq(x, block, 0.0).reshape([b, h, n, block, d]).sum_dim(3).reshape([b, h, n, d]);
    sum / counts.reshape([1, 1, n, 1]).expand([b, h, n, d])
}

/// Max pooling over blocks of the sequence (padding never wins).
pub fn max_pool(x: Tensor<4>, block: usize) -> Tensor<4> {
    let [b, h, s, d] = x.dims();
    let n = s.div_ceil(block);
    pad_seq(x, block, f64::NEG_INFINITY).reshape([b, h, n, block, d]).max_dim(3).reshape([b, h, n, d])
}

/// Min pooling over blocks of the sequence.
pub fn min_pool(x: Tensor<4>, block: usize) -> Tensor<4> {
    max_pool(x.neg(), block).neg()
}

/// Block-causal visibility `[nq, nk]` of key blocks from query blocks (diagonal included),
/// bottom-right aligned: key block `j` is visible when its first key is visible to the last
/// query of block `i`.
pub fn block_causal_mask(seq_q: usize, seq_k: usize, block: usize, device: &Device) -> Tensor<2, Bool> {
    let (nq, nk) = (seq_q.div_ceil(block), seq_k.div_ceil(block));
    let (i, j) = crate::grid::row_col(nq, nk, 0, device);
    // Key position of the last query of block `i` (bottom-right alignment).
    let last = ((i + 1) * block as i64).clamp_max(seq_q as i64) + (seq_k as i64 - seq_q as i64 - 1);
    (j * block as i64).lower_equal(last)
}

/// The AttnGate parameters.
impl GatePool {
    /// The published defaults: queries by average, keys by max, min and average, in that
    /// order (`Qavg_Kmaxminavg`).
    pub const DEFAULT_Q: [GatePool; 1] = [GatePool::Avg];
    /// See [`GatePool::DEFAULT_Q`].
    pub const DEFAULT_K: [GatePool; 3] = [GatePool::Max, GatePool::Min, GatePool::Avg];

    fn pool(self, x: Tensor<4>, block: usize) -> Tensor<4> {
        match self {
            GatePool::Avg => avg_pool(x, block),
            GatePool::Max => max_pool(x, block),
            GatePool::Min => min_pool(x, block),
        }
    }
}

/// The pooled features of each block: the poolings of `x` concatenated along the channels.
fn pool_concat(x: Tensor<4>, pools: &[GatePool], block: usize) -> Tensor<4> {
    if pools.len() == 1 {
        return pools[0].pool(x, block);
    }
    Tensor::cat(pools.iter().map(|p| p.pool(x.clone(), block)).collect(), 3)
}

#[derive(Module, Debug)]
pub struct AttnGate {
    /// Query map `len(q_pool) * head_dim -> gate_hidden` (absent when they are equal, as in
    /// the reference).
    pub q_proj: Option<MultiHeadLinear>,
    /// Key map `3 * head_dim -> gate_hidden`: one per query head, or one per kv head (shared
    /// by its GQA group, the published layout when queries are mapped too; see
    /// [`AttnGate::new_kv_keys`]).
    pub k_proj: MultiHeadLinear,
    block_size: usize,
    hidden: usize,
    rope_theta: f64,
    #[module(skip)]
    q_pool: Vec<GatePool>,
    #[module(skip)]
    k_pool: Vec<GatePool>,
}

impl AttnGate {
    /// A gate for `heads_q` query heads of width `head_dim`.
    pub fn new(heads_q: usize, head_dim: usize, block_size: usize, hidden: usize, rope_theta: f64, device: &Device) -> Result<Self> {
        Self::with_pooling(heads_q, heads_q, head_dim, block_size, hidden, rope_theta, &GatePool::DEFAULT_Q, &GatePool::DEFAULT_K, device)
    }

    /// A gate with the given poolings: `q_pool` (the published choices: average, or max and
    /// average) and `k_pool` (any of max, min and average, concatenated in the given order),
    /// and `k_heads` key maps (`heads_q`, or `heads_kv` as in [`AttnGate::new_kv_keys`]).
    #[allow(clippy::too_many_arguments)]
    pub fn with_pooling(
        heads_q: usize,
        k_heads: usize,
        head_dim: usize,
        block_size: usize,
        hidden: usize,
        rope_theta: f64,
        q_pool: &[GatePool],
        k_pool: &[GatePool],
        device: &Device,
    ) -> Result<Self> {
        check_positive("block_size", block_size)?;
        check_positive("gate_hidden", hidden)?;
        if !hidden.is_multiple_of(2) {
            return crate::error::param_err("gate_hidden", format!("block RoPE needs an even width, got {hidden}"));
        }
        if q_pool.is_empty() {
            return crate::error::param_err("q_pool", "needs at least one pooling");
        }
        if k_pool.is_empty() {
            return crate::error::param_err("k_pool", "needs at least one pooling");
        }
        if k_heads == 0 || !heads_q.is_multiple_of(k_heads) {
            return crate::error::param_err("heads_kv", format!("must divide heads_q ({heads_q}), got {k_heads}"));
        }
        let q_in = q_pool.len() * head_dim;
        let q_proj = (q_in != hidden).then(|| MultiHeadLinear::new(heads_q, q_in, hidden, device));
        Ok(Self {
            q_proj,
            k_proj: MultiHeadLinear::new(k_heads, k_pool.len() * head_dim, hidden, device),
            block_size,
            hidden,
            rope_theta,
            q_pool: q_pool.to_vec(),
            k_pool: k_pool.to_vec(),
        })
    }

    /// A gate whose key map has one head per kv head (`heads_kv`), shared by the query heads
    /// of its GQA group: the published gate's layout under GQA when it maps queries too, so its
    /// weights load as they are. Equal to a per-query-head map with each kv head's weights
    /// repeated over its group.
    #[allow(clippy::too_many_arguments)]
    pub fn new_kv_keys(
        heads_q: usize,
        heads_kv: usize,
        head_dim: usize,
        block_size: usize,
        hidden: usize,
        rope_theta: f64,
        device: &Device,
    ) -> Result<Self> {
        Self::with_pooling(heads_q, heads_kv, head_dim, block_size, hidden, rope_theta, &GatePool::DEFAULT_Q, &GatePool::DEFAULT_K, device)
    }

    /// Keys per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Gate logits `[b, hq, nq_blocks, nk_blocks]` from pre-RoPE q and k, with `-inf` on
    /// blocks that are not block-causally visible.
    pub fn logits(&self, q: Tensor<4>, k: Tensor<4>) -> Result<Tensor<4>> {
        let dims = validate_qkv(&q, &k, &k)?;
        let AttnDims { batch: b, heads_q: hq, heads_kv: hkv, seq_q, seq_k, head_dim: d } = dims;
        let (nqp, nkp) = (self.q_pool.len(), self.k_pool.len());
        if let Some(p) = &self.q_proj
            && p.weight.dims() != [hq, nqp * d, self.hidden]
        {
            return shape_err("q", format!("gate expects {} heads of width {}, got {:?}", p.weight.dims()[0], p.weight.dims()[1] / nqp, q.dims()));
        }
        let k_heads = self.k_proj.weight.dims()[0];
        if self.q_proj.is_none() && nqp * d != self.hidden {
            return shape_err("q", format!("gate expects width {}, got {:?}", self.hidden / nqp, q.dims()));
        }
        if self.k_proj.weight.dims() != [k_heads, nkp * d, self.hidden] || (k_heads != hq && k_heads != hkv) {
            return shape_err(
                "k",
                format!(
                    "gate expects keys of width {} with {k_heads} query or kv heads, got q {:?}, k {:?}",
                    self.k_proj.weight.dims()[1] / nkp,
                    q.dims(),
                    k.dims()
                ),
            );
        }
        let bs = self.block_size;
        let qp = pool_concat(q, &self.q_pool, bs);
        let qg = match &self.q_proj {
            Some(p) => p.forward(qp),
            None => qp,
        };
        let kp = pool_concat(k, &self.k_pool, bs);
        let kw = nkp * d;
        let nk = kp.dims()[2];
        let g = hq / hkv;
        let h = self.hidden;
        // Per-kv-head key maps run once per kv head and are shared by the group; per-query-head
        // maps read their kv head's pooled keys.
        let kg = if k_heads == hq {
            self.k_proj.forward(kp.reshape([b, hkv, 1, nk, kw]).expand([b, hkv, g, nk, kw]).reshape([b, hq, nk, kw]))
        } else {
            self.k_proj.forward(kp).reshape([b, hkv, 1, nk, h]).expand([b, hkv, g, nk, h]).reshape([b, hq, nk, h])
        };
        let nq = qg.dims()[2];
        let off = seq_k - seq_q.min(seq_k);
        let qpos: Vec<usize> = (0..nq).map(|i| i * bs + off).collect();
        let kpos: Vec<usize> = (0..nk).map(|j| j * bs).collect();
        let qg = apply_rope(qg, &qpos, self.rope_theta)?;
        let kg = apply_rope(kg, &kpos, self.rope_theta)?;
        let logits = qg.matmul(kg.swap_dims(2, 3)).mul_scalar(1.0 / (self.hidden as f64).sqrt());
        let mask = block_causal_mask(seq_q, seq_k, bs, &logits.device()).unsqueeze::<4>().expand([b, hq, nq, nk]);
        Ok(logits.mask_fill(mask.bool_not(), f64::NEG_INFINITY))
    }
}

/// The distillation target `[b, hq, nq_blocks, nk_blocks]`: causal attention probabilities
/// of (post-RoPE) q and k, max-pooled over each block pair, rows normalised to sum 1.
/// Detached. Also returns the dense attention output so one pass serves both.
///
/// The dense output and its LSE come from [`crate::attention::attention`] (the engine, with
/// its gradients); the block maxima of `exp(scale q.k - lse)` then come from one kernel on
/// Cube devices (tensor cores on CUDA f16/bf16 with blocks of 64), or chunk by chunk of query
/// blocks in tensor ops elsewhere; either way memory is the `nq x nk` target (plus one chunk)
/// instead of `O(seq^2)`. [`seer_attention_target_reference`] is the one-pass definition.
pub fn seer_attention_target(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, block_size: usize, scale: Option<f64>) -> Result<(Tensor<4>, crate::AttentionOutput)> {
    check_positive("block_size", block_size)?;
    let dims = validate_qkv(&q, &k, &v)?;
    let opts = AttentionOptions { causal: true, window: None, scale };
    let dense = crate::attention::attention(q.clone(), k.clone(), v, &opts)?;
    let scale = opts.scale_for(dims.head_dim);
    if let Some(pooled) = crate::kernel::try_seer_block_max(&q, &k, &dense.lse, block_size, scale) {
        // Normalised in f32, handed out in q's dtype like the tensor-op path's target.
        return Ok((normalise_rows(pooled).cast(q.dtype()), dense));
    }
    let rows = (TARGET_CHUNK / (dims.batch * dims.heads_q * dims.seq_k).max(1)) / block_size * block_size;
    let target = pooled_target_in_chunks(q.detach(), k.detach(), dense.lse.clone().detach(), block_size, scale, &dims, rows.max(block_size));
    Ok((target, dense))
}

/// Score elements (`batch x heads_q x rows x seq_k`) one chunk of the target holds: 2^27.
const TARGET_CHUNK: usize = 1 << 27;

/// The pooled, row-normalised target from the dense LSE, `rows` queries (a multiple of the
/// block) at a time.
fn pooled_target_in_chunks(q: Tensor<4>, k: Tensor<4>, lse: Tensor<3>, block_size: usize, scale: f64, dims: &AttnDims, rows: usize) -> Tensor<4> {
    let AttnDims { batch: b, heads_q: hq, seq_q, seq_k, head_dim: d, .. } = *dims;
    let nk = seq_k.div_ceil(block_size);
    let pos0 = seq_k as i64 - seq_q as i64;
    let mut chunks = Vec::with_capacity(seq_q.div_ceil(rows));
    for (t0, t1) in crate::grid::row_chunks(seq_q, rows) {
        let n = t1 - t0;
        let cdims = AttnDims { seq_q: n, ..*dims };
        let s = scores(q.clone().slice([0..b, 0..hq, t0..t1, 0..d]), k.clone(), scale, &cdims);
        let l = lse.clone().slice([0..b, 0..hq, t0..t1]).cast(s.dtype()).reshape([b, hq, n, 1]);
        let empty = l.clone().equal_elem(f64::NEG_INFINITY);
        let l = l.mask_fill(empty, 0.0).expand([b, hq, n, seq_k]);
        let (pos, j) = crate::grid::row_col(n, seq_k, pos0 + t0 as i64, &s.device());
        let hidden = j.greater(pos).unsqueeze::<4>().expand([b, hq, n, seq_k]);
        let p = (s - l).exp().mask_fill(hidden, 0.0);
        chunks.push(max_pool_blocks(p, block_size, b, hq, nk));
    }
    normalise_rows(crate::grid::cat_rows(chunks))
}

/// `[b, hq, rows, seq_k]` probabilities to their block maxima `[b, hq, ceil(rows / bs), nk]`
/// (zero padding: probabilities are non-negative).
fn max_pool_blocks(p: Tensor<4>, block_size: usize, b: usize, hq: usize, nk: usize) -> Tensor<4> {
    let [_, _, rows, seq_k] = p.dims();
    let nq = rows.div_ceil(block_size);
    let (device, dtype) = (p.device(), p.dtype());
    let p = if nq * block_size > rows { Tensor::cat(vec![p, Tensor::zeros([b, hq, nq * block_size - rows, seq_k], (&device, dtype))], 2) } else { p };
    let p = if nk * block_size > seq_k {
        Tensor::cat(vec![p, Tensor::zeros([b, hq, nq * block_size, nk * block_size - seq_k], (&device, dtype))], 3)
    } else {
        p
    };
    p.reshape([b * hq, nq, block_size, nk, block_size]).max_dim(4).max_dim(2).reshape([b, hq, nq, nk])
}

/// Each row divided by its sum (rows summing to 0 stay 0).
fn normalise_rows(pooled: Tensor<4>) -> Tensor<4> {
    let dims = pooled.dims();
    let sums = pooled.clone().sum_dim(3);
    let sums = sums.clone().mask_fill(sums.equal_elem(0.0), 1.0);
    pooled / sums.expand(dims)
}

/// [`seer_attention_target`] in one pass over the full `[seq_q, seq_k]` probability matrix
/// (the tensor-op reference attention): the definition, kept as the oracle of its tests.
pub fn seer_attention_target_reference(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, block_size: usize, scale: Option<f64>) -> Result<(Tensor<4>, crate::AttentionOutput)> {
    check_positive("block_size", block_size)?;
    let dims = validate_qkv(&q, &k, &v)?;
    let AttnDims { batch: b, heads_q: hq, seq_k, head_dim: d, .. } = dims;
    let opts = AttentionOptions { causal: true, window: None, scale };
    let mask = position_mask(&dims, &opts, &q.device());
    let (p, lse) = masked_softmax(scores(q, k, opts.scale_for(d), &dims), mask);
    let out = crate::attention::reference::apply_values(p.clone(), v, &dims);
    let nk = seq_k.div_ceil(block_size);
    let pooled = max_pool_blocks(p.detach(), block_size, b, hq, nk);
    Ok((normalise_rows(pooled), crate::AttentionOutput { output: out, lse }))
}

/// `KL(target || softmax(logits))` averaged over all elements, PyTorch's
/// `KLDivLoss(reduction = "mean")`; masked (`-inf`) logits must have target 0.
///
/// `skip_query_blocks` leading query-block rows are left out, as the published training
/// drops the first quarter.
pub fn seer_gate_loss(logits: Tensor<4>, target: Tensor<4>, skip_query_blocks: usize) -> Result<Tensor<1>> {
    if logits.dims() != target.dims() {
        return shape_err("target", format!("expected {:?}, got {:?}", logits.dims(), target.dims()));
    }
    let [b, h, nq, nk] = logits.dims();
    let skip = skip_query_blocks.min(nq.saturating_sub(1));
    let logp = log_softmax(logits, 3).slice([0..b, 0..h, skip..nq, 0..nk]);
    let target = target.detach().slice([0..b, 0..h, skip..nq, 0..nk]);
    let zero = target.clone().equal_elem(0.0);
    let logp = logp.mask_fill(zero.clone(), 0.0);
    let log_t = target.clone().mask_fill(zero.clone(), 1.0).log();
    let kl = (target * (log_t - logp)).mask_fill(zero, 0.0);
    Ok(kl.mean())
}

/// Blocks whose gate probability is strictly above `threshold`, as a per-query-block
/// selection of capacity `n_key_blocks` (`-1` where not kept).
pub fn seer_select_threshold(logits: Tensor<4>, threshold: f64, block_size: usize) -> Result<BlockSelection> {
    check_positive("block_size", block_size)?;
    let [b, h, nq, nk] = logits.dims();
    let probs = burn::tensor::activation::softmax(logits.detach(), 3);
    let keep = probs.greater_elem(threshold);
    let idx = Tensor::<1, Int>::arange(0..nk as i64, &keep.device()).reshape([1, 1, 1, nk]).expand([b, h, nq, nk]);
    let idx = idx.mask_fill(keep.bool_not(), -1);
    Ok(BlockSelection::per_query_block(idx, block_size, block_size))
}

/// The `top_k` highest-scoring visible blocks per query block.
pub fn seer_select_topk(logits: Tensor<4>, top_k: usize, block_size: usize) -> Result<BlockSelection> {
    check_positive("top_k", top_k)?;
    check_positive("block_size", block_size)?;
    let nk = logits.dims()[3];
    let idx = crate::kernel::topk_indices(logits, top_k.min(nk));
    Ok(BlockSelection::per_query_block(idx, block_size, block_size))
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{DType, Distribution};

    /// The chunked target equals the one-pass definition for chunks of one and two blocks and
    /// the whole sequence, with a partial last block and seq_q < seq_k.
    #[test]
    fn chunked_target_equals_one_pass() {
        let device = Device::flex();
        let (b, hq, hkv, sq, sk, d, bs) = (1, 4, 2, 21, 30, 8, 4);
        let dist = Distribution::Normal(0.0, 1.0);
        let q = Tensor::<4>::random([b, hq, sq, d], dist, (&device, DType::F64));
        let k = Tensor::<4>::random([b, hkv, sk, d], dist, (&device, DType::F64));
        let v = Tensor::<4>::random([b, hkv, sk, d], dist, (&device, DType::F64));
        let (want, dense) = seer_attention_target_reference(q.clone(), k.clone(), v, bs, None).unwrap();
        let dims = validate_qkv(&q, &k, &k).unwrap();
        let want: Vec<f64> = want.into_data().convert::<f64>().try_to_vec::<f64>().unwrap();
        for rows in [bs, 2 * bs, 100] {
            let got = pooled_target_in_chunks(q.clone(), k.clone(), dense.lse.clone(), bs, 1.0 / (d as f64).sqrt(), &dims, rows);
            let got: Vec<f64> = got.into_data().convert::<f64>().try_to_vec::<f64>().unwrap();
            for (a, w) in got.iter().zip(&want) {
                assert!((a - w).abs() <= 1e-12, "chunks of {rows} rows: {a} vs {w}");
            }
        }
    }

    /// On a Cube device the block-max kernel gives the reference target (f32, GQA,
    /// seq_q < seq_k, ragged last blocks). Compiles one small shader, so CI runs it on
    /// software Vulkan.
    #[cfg(feature = "wgpu")]
    #[test]
    fn kernel_target_equals_reference() {
        let flex = Device::flex();
        let gpu = Device::wgpu(Default::default());
        let (b, hq, hkv, sq, sk, d, bs) = (1, 4, 2, 45, 70, 16, 16);
        let dist = Distribution::Normal(0.0, 1.0);
        let q = Tensor::<4>::random([b, hq, sq, d], dist, (&flex, DType::F32));
        let k = Tensor::<4>::random([b, hkv, sk, d], dist, (&flex, DType::F32));
        let (want, dense) = seer_attention_target_reference(q.clone(), k.clone(), k.clone(), bs, None).unwrap();
        let to = |t: Tensor<4>| Tensor::<4>::from_data(t.into_data(), &gpu);
        let lse = Tensor::<3>::from_data(dense.lse.into_data(), &gpu);
        let pooled = crate::kernel::try_seer_block_max(&to(q), &to(k), &lse, bs, 1.0 / (d as f64).sqrt()).expect("a Cube device");
        let got: Vec<f32> = normalise_rows(pooled).into_data().convert::<f32>().try_to_vec::<f32>().unwrap();
        let want: Vec<f32> = want.into_data().convert::<f32>().try_to_vec::<f32>().unwrap();
        assert_eq!(got.len(), want.len());
        for (a, w) in got.iter().zip(&want) {
            assert!((a - w).abs() <= 1e-4 * w.abs().max(1e-2), "{a} vs {w}");
        }
    }
}
