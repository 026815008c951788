//! Dense attention (the baseline every sparse method is checked against) and the options,
//! outputs and shape rules shared by all attention ops of the crate.
//!
//! Layout is `[batch, heads, seq, head_dim]` for q, k, v and the output, as Burn's
//! `attention` and PyTorch SDPA. Key/value heads may be fewer than query heads (GQA/MQA):
//! query head `h` reads kv head `h / (heads_q / heads_kv)`. Causal masks are aligned to the
//! bottom-right corner when `seq_q != seq_k` (query `i` sits at key position
//! `i + seq_k - seq_q`).

mod module;
pub mod reference;

pub use module::{DenseAttention, DenseAttentionConfig};

use burn::tensor::{Int, Tensor};

use crate::block_sparse::BlockSelection;
use crate::varlen::VarLen;
use crate::error::{Result, param_err, shape_err};

/// Masking and scaling shared by every attention op.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttentionOptions {
    /// Causal masking, bottom-right aligned. Default `true`.
    pub causal: bool,
    /// Sliding window: a query sees only the `w` most recent key positions up to its own
    /// position (its own included). `None` (default) means no window.
    pub window: Option<usize>,
    /// Softmax scale; `None` (default) means `1 / sqrt(head_dim)`.
    pub scale: Option<f64>,
}

impl Default for AttentionOptions {
    fn default() -> Self {
        Self { causal: true, window: None, scale: None }
    }
}

impl AttentionOptions {
    /// Causal attention with the default scale and no window.
    pub fn causal() -> Self {
        Self::default()
    }

    /// Full (non-causal) attention.
    pub fn full() -> Self {
        Self { causal: false, ..Self::default() }
    }

    /// Sets the sliding window size.
    pub fn with_window(mut self, window: usize) -> Self {
        self.window = Some(window);
        self
    }

    /// Sets the softmax scale.
    pub fn with_scale(mut self, scale: f64) -> Self {
        self.scale = Some(scale);
        self
    }

    /// The scale to use for a given head dimension.
    pub fn scale_for(&self, head_dim: usize) -> f64 {
        self.scale.unwrap_or(1.0 / (head_dim as f64).sqrt())
    }

    /// Whether key position `key` is visible from key-aligned query position `pos`
    /// (`pos = query_index + seq_k - seq_q`).
    pub fn visible(&self, pos: i64, key: i64) -> bool {
        if self.causal && key > pos {
            return false;
        }
        match self.window {
            Some(w) => key > pos - w as i64,
            None => true,
        }
    }
}

/// Output of an attention op: the attention output and the per-row log-sum-exp.
#[derive(Debug, Clone)]
pub struct AttentionOutput {
    /// `[batch, heads_q, seq_q, head_dim]`. Rows with no visible key are 0.
    pub output: Tensor<4>,
    /// `[batch, heads_q, seq_q]`, natural log of the softmax denominator of the scaled
    /// (and biased) scores; `-inf` for rows with no visible key. It carries no gradient.
    pub lse: Tensor<3>,
}

/// An additive per-key bias, broadcast over queries (dynamic-mask attention).
#[derive(Debug, Clone)]
pub struct KeyBias {
    /// `[batch, heads_b, seq_k]` with `heads_b` equal to `heads_kv` or `heads_q`; query head
    /// `h` uses bias head `h / (heads_q / heads_b)`. Differentiable.
    pub values: Tensor<3>,
    /// Optional per-row keep rule (see [`KeepThreshold`]).
    pub keep: Option<KeepThreshold>,
}

/// Per-row keep rule on the bias: key `j` stays visible to row `i` only if
/// `bias[j] > value[i]`, or `bias[j] == value[i]` and `j >= index[i]`.
///
/// This is how a per-query top-w selection over a prefix of keys is expressed without a
/// `seq_q x seq_k` mask: see [`crate::dma::dma_keep_threshold`].
#[derive(Debug, Clone)]
pub struct KeepThreshold {
    /// `[batch, heads_b, seq_q]`; `-inf` keeps every visible key.
    pub value: Tensor<3>,
    /// `[batch, heads_b, seq_q]`, key index that breaks ties at the threshold value.
    pub index: Tensor<3, Int>,
}

/// Sizes of a validated attention problem.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttnDims {
    /// Batch size.
    pub batch: usize,
    /// Query heads.
    pub heads_q: usize,
    /// Key/value heads.
    pub heads_kv: usize,
    /// Query length.
    pub seq_q: usize,
    /// Key length.
    pub seq_k: usize,
    /// Head dimension.
    pub head_dim: usize,
}

impl AttnDims {
    /// Query heads per kv head.
    pub fn group(&self) -> usize {
        self.heads_q / self.heads_kv
    }

    /// Key position of query row `i` (bottom-right alignment).
    pub fn query_pos(&self, i: usize) -> i64 {
        i as i64 + self.seq_k as i64 - self.seq_q as i64
    }
}

/// Checks q, k, v against each other and returns the problem sizes.
pub fn validate_qkv(q: &Tensor<4>, k: &Tensor<4>, v: &Tensor<4>) -> Result<AttnDims> {
    let [b, hq, sq, d] = q.dims();
    let [bk, hkv, sk, dk] = k.dims();
    if k.dims() != v.dims() {
        return shape_err("v", format!("must have the shape of k {:?}, got {:?}", k.dims(), v.dims()));
    }
    if bk != b {
        return shape_err("k", format!("batch {bk} differs from q's batch {b}"));
    }
    if dk != d {
        return shape_err("k", format!("head_dim {dk} differs from q's head_dim {d}"));
    }
    if d == 0 {
        return shape_err("q", "head_dim must be at least 1");
    }
    if hkv == 0 || hq % hkv != 0 {
        return shape_err(
            "k",
            format!("heads_kv ({hkv}) must divide heads_q ({hq}) for grouped-query attention"),
        );
    }
    if b == 0 || sk == 0 {
        return shape_err("k", format!("batch and seq_k must be non-empty, got {:?}", k.dims()));
    }
    Ok(AttnDims { batch: b, heads_q: hq, heads_kv: hkv, seq_q: sq, seq_k: sk, head_dim: d })
}

pub(crate) fn validate_options(opts: &AttentionOptions) -> Result<()> {
    if opts.window == Some(0) {
        return param_err("window", "must be at least 1 (it includes the query's own position)");
    }
    if let Some(s) = opts.scale
        && !s.is_finite()
    {
        return param_err("scale", format!("must be finite, got {s}"));
    }
    Ok(())
}

pub(crate) fn validate_bias(bias: &KeyBias, dims: &AttnDims) -> Result<()> {
    let [b, hb, sk] = bias.values.dims();
    if b != dims.batch || sk != dims.seq_k || (hb != dims.heads_kv && hb != dims.heads_q) {
        return shape_err(
            "bias",
            format!(
                "expected [batch={}, heads_kv={} or heads_q={}, seq_k={}], got {:?}",
                dims.batch, dims.heads_kv, dims.heads_q, dims.seq_k, bias.values.dims()
            ),
        );
    }
    if let Some(keep) = &bias.keep {
        let want = [b, hb, dims.seq_q];
        if keep.value.dims() != want {
            return shape_err("keep.value", format!("expected {want:?}, got {:?}", keep.value.dims()));
        }
        if keep.index.dims() != want {
            return shape_err("keep.index", format!("expected {want:?}, got {:?}", keep.index.dims()));
        }
    }
    Ok(())
}

/// Dense attention: softmax over every key allowed by `opts` (causal, window).
///
/// Returns the output and the LSE. Runs the CubeCL kernel on Cube devices (when the crate
/// is built with a GPU feature) and the tensor-op [`mod@reference`] elsewhere.
pub fn attention(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, opts: &AttentionOptions) -> Result<AttentionOutput> {
    attention_core(q, k, v, None, None, None, opts)
}

/// Dense attention with an additive per-key bias (and optionally a per-row keep rule).
pub fn attention_with_bias(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    bias: &KeyBias,
    opts: &AttentionOptions,
) -> Result<AttentionOutput> {
    attention_core(q, k, v, Some(bias), None, None, opts)
}

/// Validates everything, then runs the kernel where one is available and the reference
/// otherwise. Every attention op of the crate funnels through here.
pub(crate) fn attention_core(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    bias: Option<&KeyBias>,
    selection: Option<&BlockSelection>,
    varlen: Option<&VarLen>,
    opts: &AttentionOptions,
) -> Result<AttentionOutput> {
    // `attention_in_bounds` validates the problem; only the packing needs its sizes here.
    let bounds = match varlen {
        Some(vl) => {
            vl.validate(&validate_qkv(&q, &k, &v)?)?;
            validate_options(opts)?;
            if selection.is_some() {
                // A selection's key blocks follow each sequence's own start: see
                // `block_sparse_attention_varlen`, which lays the sequences out for that.
                return param_err("varlen", "use block_sparse_attention_varlen for packed sequences with a block selection");
            }
            Some(vl.bounds(opts)?)
        }
        None => None,
    };
    attention_in_bounds(q, k, v, bias, selection, bounds.as_ref(), opts)
}

/// [`attention_core`] with the packed sequences given as visibility intervals over the
/// rows and keys of q and k (which then replace `opts`' causal mask and window).
pub(crate) fn attention_in_bounds(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    bias: Option<&KeyBias>,
    selection: Option<&BlockSelection>,
    bounds: Option<&sparse_attn_kernels::VarlenBounds>,
    opts: &AttentionOptions,
) -> Result<AttentionOutput> {
    let dims = validate_qkv(&q, &k, &v)?;
    validate_options(opts)?;
    if let Some(bias) = bias {
        validate_bias(bias, &dims)?;
    }
    if let Some(sel) = selection {
        sel.validate(&dims)?;
    }
    if let Some(out) = crate::kernel::try_attention(&q, &k, &v, bias, selection, bounds, opts, &dims)? {
        return Ok(out);
    }
    let visibility = bounds.map(|b| crate::varlen::varlen_mask(b, &dims, &q.device()));
    Ok(reference::reference_attention(q, k, v, bias, selection, visibility, opts))
}
