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
///
/// q, k and v (and any extra key/value-width branches a method needs, such as NSA's
/// compression and window keys and values) come from one packed input projection. Its one
/// weight gradient (`x^T dy`, a matmul whose inner dimension is every token of the batch) is
/// far cheaper than one per branch: on the H200 at 32k tokens each `512 x 128` weight
/// gradient took 5.9 ms with Burn's untuned matmul, as long as a `512 x 1365` one
/// (`docs/results/toy-lm-h200.md`). The packed weight is initialised as the separate ones
/// would be (the same fan-in).
#[derive(Module, Debug)]
pub struct QkvProjection {
    /// `d_model -> (n_heads + (2 + branches) * n_kv_heads) * head_dim`: q, then k, v, then
    /// the extra branches, each `n_kv_heads * head_dim` wide.
    pub in_proj: Linear,
    /// `n_heads * head_dim -> d_model`.
    pub output: Linear,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    branches: usize,
    rope_theta: f64,
    use_rope: bool,
}

impl QkvProjection {
    /// Creates the input and output projections (no biases, as in Llama-style models).
    pub fn new(layout: &HeadLayout, use_rope: bool, rope_theta: f64, device: &Device) -> Result<Self> {
        Self::with_branches(layout, 0, use_rope, rope_theta, device)
    }

    /// Like [`QkvProjection::new`], with `branches` extra key/value-width outputs of the input
    /// projection (read with [`QkvProjection::project_with_branches`]).
    pub fn with_branches(layout: &HeadLayout, branches: usize, use_rope: bool, rope_theta: f64, device: &Device) -> Result<Self> {
        if use_rope && !layout.head_dim.is_multiple_of(2) {
            return param_err("head_dim", format!("RoPE needs an even head_dim, got {}", layout.head_dim));
        }
        let lin = |i, o| LinearConfig::new(i, o).with_bias(false).init(device);
        let width = (layout.n_heads + (2 + branches) * layout.n_kv_heads) * layout.head_dim;
        Ok(Self {
            in_proj: lin(layout.d_model, width),
            output: lin(layout.n_heads * layout.head_dim, layout.d_model),
            n_heads: layout.n_heads,
            n_kv_heads: layout.n_kv_heads,
            head_dim: layout.head_dim,
            branches,
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
        let want = self.in_proj.weight.dims()[0];
        if d != want {
            return crate::error::shape_err("x", format!("last dim must be d_model = {want}, got {d}"));
        }
        Ok(())
    }

    /// Projects to q, k, v WITHOUT RoPE (SeerAttention's gate and NSA's compression read these).
    pub fn project(&self, x: Tensor<3>) -> Result<(Tensor<4>, Tensor<4>, Tensor<4>)> {
        let (q, k, v, _) = self.project_with_branches(x)?;
        Ok((q, k, v))
    }

    /// Projects to q, k, v and the extra branches (`[b, n_kv_heads, s, head_dim]` each), all
    /// without RoPE.
    pub fn project_with_branches(&self, x: Tensor<3>) -> Result<(Tensor<4>, Tensor<4>, Tensor<4>, Vec<Tensor<4>>)> {
        self.check_input(&x)?;
        let kv = self.n_kv_heads * self.head_dim;
        let mut sizes = vec![self.n_heads * self.head_dim, kv, kv];
        sizes.extend(std::iter::repeat_n(kv, self.branches));
        let mut parts = crate::rows::grouped_linear(&self.in_proj, x).split_with_sizes(sizes, 2).into_iter();
        let mut next = |heads| self.split_heads(parts.next().expect("one part per size"), heads);
        let (q, k, v) = (next(self.n_heads), next(self.n_kv_heads), next(self.n_kv_heads));
        let branches = (0..self.branches).map(|_| next(self.n_kv_heads)).collect();
        Ok((q, k, v, branches))
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
        crate::rows::grouped_linear(&self.output, o.swap_dims(1, 2).reshape([b, s, h * d]))
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
