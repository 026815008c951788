use burn::config::Config;
use burn::module::{Module, Param};
use burn::nn::{Linear, LinearConfig};
use burn::tensor::{Device, Tensor};

use super::{DmaParams, dma_attention, dma_bias, dma_keep_threshold};
use crate::coverage::{BlockCoverage, keep_coverage};
use crate::error::check_positive;
use crate::projection::{HeadLayout, QkvProjection};

/// Configuration of [`DmaAttention`]. Defaults follow flash-dmattn.
#[derive(Config, Debug)]
pub struct DmaAttentionConfig {
    /// Model width.
    pub d_model: usize,
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads. Default: `n_heads`.
    pub n_kv_heads: Option<usize>,
    /// Per-head width. Default: `d_model / n_heads`.
    pub head_dim: Option<usize>,
    /// Keys kept per query (`keep_window_size`). Default: 2048.
    #[config(default = 2048)]
    pub window: usize,
    /// Apply RoPE to q and k. Default: `true`.
    #[config(default = true)]
    pub rope: bool,
    /// RoPE base. Default: `10000`.
    #[config(default = 10000.0)]
    pub rope_theta: f64,
}

impl DmaAttentionConfig {
    /// Builds the layer; fails with an error naming the bad field.
    pub fn init(&self, device: &Device) -> crate::error::Result<DmaAttention> {
        let layout = HeadLayout::new(self.d_model, self.n_heads, self.n_kv_heads.unwrap_or(self.n_heads), self.head_dim)?;
        check_positive("window", self.window)?;
        let hkv = layout.n_kv_heads;
        Ok(DmaAttention {
            proj: QkvProjection::new(&layout, self.rope, self.rope_theta, device)?,
            dt_proj: LinearConfig::new(hkv * layout.head_dim, hkv).with_bias(false).init(device),
            a: Param::from_tensor(Tensor::zeros([hkv], device)),
            window: self.window,
        })
    }
}

/// Dynamic-mask attention layer: projections, the value-driven bias, top-w keys per query.
#[derive(Module, Debug)]
pub struct DmaAttention {
    /// q/k/v/o projections.
    pub proj: QkvProjection,
    /// `heads_kv * head_dim -> heads_kv` projection of the values.
    pub dt_proj: Linear,
    /// Per-kv-head bias amplitude `A`, initialised to 0.
    pub a: Param<Tensor<1>>,
    window: usize,
}

impl DmaAttention {
    /// `x: [batch, seq, d_model] -> [batch, seq, d_model]`.
    pub fn forward(&self, x: Tensor<3>) -> crate::error::Result<Tensor<3>> {
        let (q, k, v) = self.proj.qkv(x)?;
        let bias = dma_bias(v.clone(), &self.dt_proj, self.a.val())?;
        let params = DmaParams { window: self.window, scale: None, causal: true };
        Ok(self.proj.merge(dma_attention(q, k, v, bias, &params)?.output))
    }

    /// The pairs this layer attends for `x`, in `block`-token cells: the keys the keep rule
    /// keeps for each query (at most `window`); see [`crate::coverage`].
    pub fn block_coverage(&self, x: Tensor<3>, block: usize) -> crate::error::Result<BlockCoverage> {
        let s = x.dims()[1];
        let (_, _, v) = self.proj.qkv(x)?;
        let bias = dma_bias(v, &self.dt_proj, self.a.val())?;
        let keep = dma_keep_threshold(&bias, s, self.window, true)?;
        keep_coverage(bias, keep.value, keep.index, self.proj.n_heads(), block)
    }
}
