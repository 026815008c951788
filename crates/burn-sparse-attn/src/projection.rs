//! The q/k/v/o projections and RoPE shared by every attention module.

use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::tensor::{Device, Tensor};

use crate::error::{Result, check_positive, param_err};
use crate::rope::{apply_rope, positions};

/// Head layout of an attention module, validated once at `init`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HeadLayout {
    /// Model width.
    pub d_model: usize,
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads (divides `n_heads`).
    pub n_kv_heads: usize,
    /// Per-head width.
    pub head_dim: usize,
}

impl HeadLayout {
    /// Validates the head counts; `head_dim = None` means `d_model / n_heads`.
    pub fn new(d_model: usize, n_heads: usize, n_kv_heads: usize, head_dim: Option<usize>) -> Result<Self> {
        check_positive("d_model", d_model)?;
        check_positive("n_heads", n_heads)?;
        check_positive("n_kv_heads", n_kv_heads)?;
        if !n_heads.is_multiple_of(n_kv_heads) {
            return param_err("n_kv_heads", format!("must divide n_heads ({n_heads}), got {n_kv_heads}"));
        }
        let head_dim = match head_dim {
            Some(d) => d,
            None if d_model.is_multiple_of(n_heads) => d_model / n_heads,
            None => {
                return param_err("head_dim", format!("d_model ({d_model}) is not divisible by n_heads ({n_heads}); set head_dim"));
            }
        };
        check_positive("head_dim", head_dim)?;
        Ok(Self { d_model, n_heads, n_kv_heads, head_dim })
    }
}

/// q, k, v and output projections with optional RoPE.
#[derive(Module, Debug)]
pub struct QkvProjection {
    /// `d_model -> n_heads * head_dim`.
    pub query: Linear,
    /// `d_model -> n_kv_heads * head_dim`.
    pub key: Linear,
    /// `d_model -> n_kv_heads * head_dim`.
    pub value: Linear,
    /// `n_heads * head_dim -> d_model`.
    pub output: Linear,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    rope_theta: f64,
    use_rope: bool,
}

impl QkvProjection {
    /// Creates the four projections (no biases, as in Llama-style models).
    pub fn new(layout: &HeadLayout, use_rope: bool, rope_theta: f64, device: &Device) -> Result<Self> {
        if use_rope && !layout.head_dim.is_multiple_of(2) {
            return param_err("head_dim", format!("RoPE needs an even head_dim, got {}", layout.head_dim));
        }
        let lin = |i, o| LinearConfig::new(i, o).with_bias(false).init(device);
        Ok(Self {
            query: lin(layout.d_model, layout.n_heads * layout.head_dim),
            key: lin(layout.d_model, layout.n_kv_heads * layout.head_dim),
            value: lin(layout.d_model, layout.n_kv_heads * layout.head_dim),
            output: lin(layout.n_heads * layout.head_dim, layout.d_model),
            n_heads: layout.n_heads,
            n_kv_heads: layout.n_kv_heads,
            head_dim: layout.head_dim,
            rope_theta,
            use_rope,
        })
    }

    /// `[b, s, heads * head_dim] -> [b, heads, s, head_dim]`.
    pub fn split_heads(&self, x: Tensor<3>, heads: usize) -> Tensor<4> {
        let [b, s, _] = x.dims();
        x.reshape([b, s, heads, self.head_dim]).swap_dims(1, 2)
    }

    /// Checks `x: [batch, seq, d_model]`.
    pub fn check_input(&self, x: &Tensor<3>) -> Result<()> {
        let [_, _, d] = x.dims();
        let want = self.query.weight.dims()[0];
        if d != want {
            return crate::error::shape_err("x", format!("last dim must be d_model = {want}, got {d}"));
        }
        Ok(())
    }

    /// Projects to q, k, v WITHOUT RoPE (SeerAttention's gate and NSA's compression read these).
    pub fn project(&self, x: Tensor<3>) -> Result<(Tensor<4>, Tensor<4>, Tensor<4>)> {
        self.check_input(&x)?;
        let q = self.split_heads(self.query.forward(x.clone()), self.n_heads);
        let k = self.split_heads(self.key.forward(x.clone()), self.n_kv_heads);
        let v = self.split_heads(self.value.forward(x), self.n_kv_heads);
        Ok((q, k, v))
    }

    /// RoPE at positions `0..seq` (identity when RoPE is off).
    pub fn rope(&self, x: Tensor<4>) -> Result<Tensor<4>> {
        if !self.use_rope {
            return Ok(x);
        }
        let s = x.dims()[2];
        apply_rope(x, &positions(0, s), self.rope_theta)
    }

    /// RoPE at explicit positions (identity when RoPE is off).
    pub fn rope_at(&self, x: Tensor<4>, pos: &[usize]) -> Result<Tensor<4>> {
        if !self.use_rope {
            return Ok(x);
        }
        apply_rope(x, pos, self.rope_theta)
    }

    /// Projects and applies RoPE to q and k.
    pub fn qkv(&self, x: Tensor<3>) -> Result<(Tensor<4>, Tensor<4>, Tensor<4>)> {
        let (q, k, v) = self.project(x)?;
        Ok((self.rope(q)?, self.rope(k)?, v))
    }

    /// `[b, heads, s, head_dim] -> [b, s, d_model]` through the output projection.
    pub fn merge(&self, o: Tensor<4>) -> Tensor<3> {
        let [b, h, s, d] = o.dims();
        self.output.forward(o.swap_dims(1, 2).reshape([b, s, h * d]))
    }

    /// Query heads.
    pub fn n_heads(&self) -> usize {
        self.n_heads
    }

    /// Key/value heads.
    pub fn n_kv_heads(&self) -> usize {
        self.n_kv_heads
    }

    /// Per-head width.
    pub fn head_dim(&self) -> usize {
        self.head_dim
    }

    /// RoPE base.
    pub fn rope_theta(&self) -> f64 {
        self.rope_theta
    }

    /// Whether RoPE is applied.
    pub fn uses_rope(&self) -> bool {
        self.use_rope
    }
}
