//! Rotary position embedding (rotate-half / NeoX convention, as Llama and the published
//! sparse-attention code use), computed from explicit positions so that it also serves
//! block-level RoPE (SeerAttention's gate) and compressed tokens (NSA).

use burn::tensor::{Tensor, TensorData};

use crate::error::{Result, param_err};

/// Applies RoPE to `x: [batch, heads, seq, dim]`, row `s` rotated by angle
/// `positions[s] * theta^(-2i/dim)` for frequency pair `i`.
pub fn apply_rope(x: Tensor<4>, positions: &[usize], theta: f64) -> Result<Tensor<4>> {
    let [b, h, s, d] = x.dims();
    if d % 2 != 0 {
        return param_err("head_dim", format!("RoPE needs an even head dimension, got {d}"));
    }
    if positions.len() != s {
        return param_err("positions", format!("{} positions for a sequence of {s}", positions.len()));
    }
    let half = d / 2;
    let mut cos = Vec::with_capacity(s * d);
    let mut sin = Vec::with_capacity(s * d);
    for &p in positions {
        for _ in 0..2 {
            for i in 0..half {
                let inv_freq = theta.powf(-2.0 * i as f64 / d as f64);
                let angle = p as f64 * inv_freq;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
    }
    let device = x.device();
    let dtype = x.dtype();
    let cos = Tensor::<2>::from_data(TensorData::new(cos, [s, d]), (&device, dtype)).reshape([1, 1, s, d]);
    let sin = Tensor::<2>::from_data(TensorData::new(sin, [s, d]), (&device, dtype)).reshape([1, 1, s, d]);
    let x1 = x.clone().slice([0..b, 0..h, 0..s, 0..half]);
    let x2 = x.clone().slice([0..b, 0..h, 0..s, half..d]);
    let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
    Ok(x * cos.expand([b, h, s, d]) + rotated * sin.expand([b, h, s, d]))
}

/// Positions `start, start + 1, ..` for a sequence of `len` tokens.
pub fn positions(start: usize, len: usize) -> Vec<usize> {
    (start..start + len).collect()
}
