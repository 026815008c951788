use burn::config::Config;
use burn::module::Module;
use burn::tensor::{Device, Tensor};

use super::{MobaParams, moba_attention, moba_select};
use crate::coverage::{BlockCoverage, selection_coverage};

use crate::projection::{HeadLayout, QkvProjection};

/// Configuration of [`MobaAttention`]. Defaults follow the MoBA paper at 8k context.
#[derive(Config, Debug)]
pub struct MobaAttentionConfig {
    /// Model width.
    pub d_model: usize,
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads. Default: `n_heads`.
    pub n_kv_heads: Option<usize>,
    /// Per-head width. Default: `d_model / n_heads`.
    pub head_dim: Option<usize>,
    /// Keys per MoBA block. Default: 512.
    #[config(default = 512)]
    pub block_size: usize,
    /// Blocks attended per query, own block included. Default: 3.
    #[config(default = 3)]
    pub top_k: usize,
    /// Apply RoPE to q and k. Default: `true`.
    #[config(default = true)]
    pub rope: bool,
    /// RoPE base. Default: `10000`.
    #[config(default = 10000.0)]
    pub rope_theta: f64,
}

impl MobaAttentionConfig {
    /// Builds the layer; fails with an error naming the bad field.
    pub fn init(&self, device: &Device) -> crate::error::Result<MobaAttention> {
        let layout = HeadLayout::new(self.d_model, self.n_heads, self.n_kv_heads.unwrap_or(self.n_heads), self.head_dim)?;
        crate::error::check_positive("block_size", self.block_size)?;
        crate::error::check_positive("top_k", self.top_k)?;
        Ok(MobaAttention {
            proj: QkvProjection::new(&layout, self.rope, self.rope_theta, device)?,
            block_size: self.block_size,
            top_k: self.top_k,
        })
    }
}

/// MoBA attention layer: projections, RoPE, parameter-free block routing, sparse attention.
#[derive(Module, Debug)]
pub struct MobaAttention {
    /// q/k/v/o projections.
    pub proj: QkvProjection,
    block_size: usize,
    top_k: usize,
}

impl MobaAttention {
    /// `x: [batch, seq, d_model] -> [batch, seq, d_model]`.
    pub fn forward(&self, x: Tensor<3>) -> crate::error::Result<Tensor<3>> {
        let (q, k, v) = self.proj.qkv(x)?;
        let params = MobaParams { block_size: self.block_size, top_k: self.top_k, scale: None };
        Ok(self.proj.merge(moba_attention(q, k, v, &params)?.attention.output))
    }

    /// The pairs this layer attends for `x`, in `block`-token cells: the routed blocks of
    /// every query head (its own block included), cut to the causal keys; see
    /// [`crate::coverage`].
    pub fn block_coverage(&self, x: Tensor<3>, block: usize) -> crate::error::Result<BlockCoverage> {
        let s = x.dims()[1];
        let (q, k, _) = self.proj.qkv(x)?;
        let selection = moba_select(q, k, self.block_size, self.top_k)?;
        selection_coverage(&selection, self.proj.n_heads(), s, 0, block)
    }
}
