use burn::config::Config;
use burn::module::Module;
use burn::tensor::{Device, Tensor};

use super::{AttentionOptions, attention};

use crate::coverage::{BlockCoverage, causal_coverage};
use crate::error::shape_err;
use crate::projection::{HeadLayout, QkvProjection};
use crate::varlen::{VarLen, attention_varlen};

/// Configuration of [`DenseAttention`], the causal softmax-attention baseline.
#[derive(Config, Debug)]
pub struct DenseAttentionConfig {
    /// Model width.
    pub d_model: usize,
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads (GQA when fewer than `n_heads`). Default: `n_heads`.
    pub n_kv_heads: Option<usize>,
    /// Per-head width. Default: `d_model / n_heads`.
    pub head_dim: Option<usize>,
    /// Optional sliding window. Default: none.
    pub window: Option<usize>,
    /// Apply RoPE to q and k. Default: `true`.
    #[config(default = true)]
    pub rope: bool,
    /// RoPE base. Default: `10000`.
    #[config(default = 10000.0)]
    pub rope_theta: f64,
}

impl DenseAttentionConfig {
    /// Builds the layer; fails with an error naming the bad field.
    pub fn init(&self, device: &Device) -> crate::error::Result<DenseAttention> {
        let layout = HeadLayout::new(self.d_model, self.n_heads, self.n_kv_heads.unwrap_or(self.n_heads), self.head_dim)?;
        let opts = AttentionOptions { causal: true, window: self.window, scale: None };
        super::validate_options(&opts)?;
        Ok(DenseAttention { proj: QkvProjection::new(&layout, self.rope, self.rope_theta, device)?, window: self.window.unwrap_or(0) })
    }
}

/// Causal multi-head (GQA) softmax attention: the baseline of the comparisons.
#[derive(Module, Debug)]
pub struct DenseAttention {
    /// q/k/v/o projections.
    pub proj: QkvProjection,
    window: usize,
}

impl DenseAttention {
    /// `x: [batch, seq, d_model] -> [batch, seq, d_model]`.
    pub fn forward(&self, x: Tensor<3>) -> crate::error::Result<Tensor<3>> {
        let (q, k, v) = self.proj.qkv(x)?;
        let opts = AttentionOptions { causal: true, window: (self.window > 0).then_some(self.window), scale: None };
        Ok(self.proj.merge(attention(q, k, v, &opts)?.output))
    }

    /// The pairs this layer attends for `x`, in `block`-token cells: every causal pair (or
    /// each query's window); see [`crate::coverage`].
    pub fn block_coverage(&self, x: Tensor<3>, block: usize) -> crate::error::Result<BlockCoverage> {
        let [b, s, _] = x.dims();
        causal_coverage(b, self.proj.n_heads(), s, self.window, block)
    }

    /// [`Self::forward`] on a packed batch: `x: [batch, total, d_model]` holds the sequences
    /// of `varlen` back to back (the same boundaries for queries and keys); each token
    /// attends within its own sequence, and RoPE positions restart at every sequence start,
    /// so the result equals running [`Self::forward`] on each sequence alone.
    pub fn forward_varlen(&self, x: Tensor<3>, varlen: &VarLen) -> crate::error::Result<Tensor<3>> {
        let s = x.dims()[1];
        if varlen.cu_seqlens_q() != varlen.cu_seqlens_k() {
            return shape_err("varlen", "a self-attention layer needs the same boundaries for queries and keys (VarLen::new)");
        }
        if varlen.total_q() != s {
            return shape_err("varlen", format!("covers {} tokens, x has {s}", varlen.total_q()));
        }
        let (q, k, v) = self.proj.project(x)?;
        let pos = varlen.positions_q();
        let (q, k) = (self.proj.rope_at(q, &pos)?, self.proj.rope_at(k, &pos)?);
        let opts = AttentionOptions { causal: true, window: (self.window > 0).then_some(self.window), scale: None };
        Ok(self.proj.merge(attention_varlen(q, k, v, varlen, &opts)?.output))
    }
}
