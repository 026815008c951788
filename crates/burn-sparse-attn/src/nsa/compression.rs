//! NSA's compression: overlapping windows of keys (or values) mapped to one token each.

use burn::config::Config;
use burn::module::{Module, Param};
use burn::nn::{Initializer, Linear, LinearConfig};
use burn::tensor::activation::gelu;
use burn::tensor::{Device, Int, Tensor, TensorData};

use crate::error::{check_positive, param_err, shape_err};


/// Number of complete windows of `block` keys, `stride` apart, in `seq` keys.
pub fn num_compressed(seq: usize, block: usize, stride: usize) -> usize {
    if seq < block || stride == 0 { 0 } else { (seq - block) / stride + 1 }
}

/// Gathers the windows: `[b, h, s, d] -> [b, h, n, block, d]`.
pub fn compression_windows(x: Tensor<4>, block: usize, stride: usize) -> crate::error::Result<Tensor<5>> {
    check_positive("compress_block", block)?;
    check_positive("compress_stride", stride)?;
    let [b, h, s, d] = x.dims();
    let n = num_compressed(s, block, stride);
    if n == 0 {
        return param_err("compress_block", format!("sequence of {s} is shorter than one window of {block}"));
    }
    let idx: Vec<i64> = (0..n).flat_map(|i| (0..block).map(move |t| (i * stride + t) as i64)).collect();
    let idx = Tensor::<1, Int>::from_data(TensorData::new(idx, [n * block]), &x.device());
    Ok(x.select(2, idx).reshape([b, h, n, block, d]))
}

/// Mean-pooling compression (flash-linear-attention's choice): `[b, h, s, d] -> [b, h, n, d]`.
pub fn compress_mean(x: Tensor<4>, block: usize, stride: usize) -> crate::error::Result<Tensor<4>> {
    let w = compression_windows(x, block, stride)?;
    let [b, h, n, _, d] = w.dims();
    Ok(w.mean_dim(3).reshape([b, h, n, d]))
}

/// Configuration of [`CompressionMlp`].
#[derive(Config, Debug)]
pub struct CompressionMlpConfig {
    /// Keys per window `l`.
    pub block: usize,
    /// Per-head width.
    pub head_dim: usize,
    /// Hidden width of the MLP. Default: `4 * head_dim`.
    pub hidden: Option<usize>,
}

impl CompressionMlpConfig {
    /// Builds the MLP (shared by all kv heads); fails on zero sizes.
    pub fn init(&self, device: &Device) -> crate::error::Result<CompressionMlp> {
        check_positive("compress_block", self.block)?;
        check_positive("head_dim", self.head_dim)?;
        let hidden = self.hidden.unwrap_or(4 * self.head_dim);
        check_positive("compress_hidden", hidden)?;
        Ok(CompressionMlp {
            pos_emb: Initializer::Normal { mean: 0.0, std: 0.02 }.init([self.block, self.head_dim], device),
            fc1: LinearConfig::new(self.block * self.head_dim, hidden).init(device),
            fc2: LinearConfig::new(hidden, self.head_dim).init(device),
        })
    }
}

/// NSA's learnable compression `phi`: window + intra-block position embedding, flattened,
/// `Linear -> GELU -> Linear` to one token.
#[derive(Module, Debug)]
pub struct CompressionMlp {
    /// Intra-block position embedding `[block, head_dim]`.
    pub pos_emb: Param<Tensor<2>>,
    /// `block * head_dim -> hidden`.
    pub fc1: Linear,
    /// `hidden -> head_dim`.
    pub fc2: Linear,
}

impl CompressionMlp {
    /// `[b, h, s, d] -> [b, h, n, d]` for windows of `pos_emb.len()` keys every `stride`.
    pub fn forward(&self, x: Tensor<4>, stride: usize) -> crate::error::Result<Tensor<4>> {
        let [block, d] = self.pos_emb.dims();
        let [b, h, _, dx] = x.dims();
        if dx != d {
            return shape_err("x", format!("head_dim {dx} differs from the compression MLP's {d}"));
        }
        let w = compression_windows(x, block, stride)?;
        let n = w.dims()[2];
        let pe = self.pos_emb.val().reshape([1, 1, 1, block, d]).expand([b, h, n, block, d]);
        let flat = (w + pe).reshape([b, h, n, block * d]);
        Ok(self.fc2.forward(gelu(self.fc1.forward(flat))))
    }
}
