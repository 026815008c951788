//! NSA compressors besides the MLP ([`super::CompressionMlp`], the default): each maps a
//! window of `block` keys (or values) of one kv head to one token, after adding a learned
//! intra-block position embedding per kv head. They are the other choices of the published
//! implementations:
//!
//! - [`MeanPosCompressor`]: the mean of the window (mean pooling, with the embedding);
//! - [`AttentionPoolCompressor`]: weighted pooling with learned per-head weights, the weights
//!   a softmax over the window's positions of `y W_h` per feature (`W_h` starts as the
//!   identity);
//! - [`HeadLinearCompressor`]: a per-head linear map of the flattened window (a grouped
//!   convolution with kernel and stride `block` in the published code), with a bias.
//!
//! [`Compressor`] holds any of the four; [`CompressorKind`] picks one in a config.

use burn::config::Config;
use burn::module::{Module, Param};
use burn::nn::Initializer;
use burn::tensor::activation::softmax;
use burn::tensor::{Device, Tensor};

use super::compression::{CompressionMlp, CompressionMlpConfig, compression_windows, no_windows};
use crate::error::{check_positive, shape_err};



/// Which compressor an NSA layer uses.
#[derive(Config, Debug, Copy, PartialEq, Eq)]
pub enum CompressorKind {
    /// Position embedding, flatten, `Linear -> GELU -> Linear` ([`CompressionMlp`]).
    Mlp,
    /// Mean of the window plus a position embedding ([`MeanPosCompressor`]).
    MeanPos,
    /// Softmax-weighted pooling with learned per-head weights ([`AttentionPoolCompressor`]).
    AttentionPool,
    /// Per-head linear map of the flattened window ([`HeadLinearCompressor`]).
    HeadLinear,
}

/// Sizes of a compressor.
#[derive(Config, Debug)]
pub struct CompressorConfig {
    /// Which compressor.
    pub kind: CompressorKind,
    /// Keys per window `l`.
    pub block: usize,
    /// Per-head width.
    pub head_dim: usize,
    /// Kv heads (each has its own weights, except the MLP's, which all heads share).
    pub heads: usize,
    /// Hidden width of the MLP. Default: `4 * head_dim`.
    pub hidden: Option<usize>,
}

impl CompressorConfig {
    /// Builds the compressor; fails on zero sizes.
    pub fn init(&self, device: &Device) -> crate::error::Result<Compressor> {
        check_positive("compress_block", self.block)?;
        check_positive("head_dim", self.head_dim)?;
        check_positive("n_kv_heads", self.heads)?;
        let (l, d, h) = (self.block, self.head_dim, self.heads);
        let pos_emb = || Initializer::Normal { mean: 0.0, std: 0.02 }.init([h, l, d], device);
        Ok(match self.kind {
            CompressorKind::Mlp => Compressor::Mlp(CompressionMlpConfig { block: l, head_dim: d, hidden: self.hidden }.init(device)?),
            CompressorKind::MeanPos => Compressor::MeanPos(MeanPosCompressor { pos_emb: pos_emb() }),
            CompressorKind::AttentionPool => {
                let eye = Tensor::<2>::eye(d, device).unsqueeze::<3>().expand([h, d, d]);
                Compressor::AttentionPool(AttentionPoolCompressor { pos_emb: pos_emb(), weight: Param::from_tensor(eye) })
            }
            CompressorKind::HeadLinear => {
                let fan_in = l * d;
                let bound = 1.0 / (fan_in as f64).sqrt();
                Compressor::HeadLinear(HeadLinearCompressor {
                    pos_emb: pos_emb(),
                    weight: Initializer::Uniform { min: -bound, max: bound }.init([h, fan_in, d], device),
                    bias: Initializer::Uniform { min: -bound, max: bound }.init([h, d], device),
                })
            }
        })
    }
}

/// Any of the NSA compressors.
#[derive(Module, Debug)]
pub enum Compressor {
    /// See [`CompressionMlp`].
    Mlp(CompressionMlp),
    /// See [`MeanPosCompressor`].
    MeanPos(MeanPosCompressor),
    /// See [`AttentionPoolCompressor`].
    AttentionPool(AttentionPoolCompressor),
    /// See [`HeadLinearCompressor`].
    HeadLinear(HeadLinearCompressor),
}

impl Compressor {
    /// `[b, h, s, d] -> [b, h, n, d]` for windows every `stride` keys; no token (`n = 0`)
    /// for a sequence shorter than one window, as in [`Self::forward_varlen`].
    pub fn forward(&self, x: Tensor<4>, stride: usize) -> crate::error::Result<Tensor<4>> {
        if let Some(empty) = no_windows(&x, self.block(), stride)? {
            return Ok(empty);
        }
        match self {
            Compressor::Mlp(m) => m.forward(x, stride),
            Compressor::MeanPos(m) => m.forward(x, stride),
            Compressor::AttentionPool(m) => m.forward(x, stride),
            Compressor::HeadLinear(m) => m.forward(x, stride),
        }
    }

    /// Keys (or values) per window.
    pub fn block(&self) -> usize {
        match self {
            Compressor::Mlp(m) => m.pos_emb.dims()[0],
            Compressor::MeanPos(m) => m.pos_emb.dims()[1],
            Compressor::AttentionPool(m) => m.pos_emb.dims()[1],
            Compressor::HeadLinear(m) => m.pos_emb.dims()[1],
        }
    }

    /// [`Self::forward`] on a packed batch `[b, h, total, d]` (sequences at `cu_seqlens`):
    /// each sequence's complete windows, packed in order (`[b, h, n_total, d]`,
    /// [`super::nsa_compressed_cu_seqlens`] with [`super::TrailingWindow::Drop`]), equal to
    /// the compressor on every sequence alone.
    ///
    /// Every compressor works on windows starting at multiples of the stride, so the
    /// sequences are laid out (one gather) each from a multiple of the stride with zero rows
    /// between them; the compressor runs once over that layout and the windows that lie
    /// inside a sequence are kept (one more gather); the few that straddle two are dropped.
    pub fn forward_varlen(&self, x: Tensor<4>, cu_seqlens: &[usize], stride: usize) -> crate::error::Result<Tensor<4>> {
        check_positive("compress_stride", stride)?;
        sparse_attn_kernels::varlen::check_cu_seqlens("cu_seqlens", cu_seqlens).map_err(crate::varlen::boundary_error)?;
        if stride > self.block() {
            return crate::error::param_err("compress_stride", format!("must not exceed the window ({}), got {stride}", self.block()));
        }
        let [b, h, total, d] = x.dims();
        if cu_seqlens[cu_seqlens.len() - 1] != total {
            return shape_err("cu_seqlens", format!("ends at {}, but x has {total} rows", cu_seqlens[cu_seqlens.len() - 1]));
        }
        let block = self.block();
        let (mut gather, mut keep) = (Vec::new(), Vec::new());
        for w in cu_seqlens.windows(2) {
            let (start, len) = (gather.len(), w[1] - w[0]);
            gather.extend((w[0]..w[1]).map(|r| r as i64));
            // Row `total` of the extended input is the zero row.
            gather.resize(start + len.next_multiple_of(stride), total as i64);
            keep.extend((0..super::num_compressed(len, block, stride)).map(|i| (start / stride + i) as i64));
        }
        let device = x.device();
        if keep.is_empty() {
            return Ok(Tensor::zeros([b, h, 0, d], (&device, x.dtype())));
        }
        // Enough zero rows after the last sequence for its windows to exist.
        let laid = gather.len().max(block);
        gather.resize(laid, total as i64);
        let zero = Tensor::<4>::zeros([b, h, 1, d], (&device, x.dtype()));
        let index = |v: Vec<i64>| Tensor::<1, burn::tensor::Int>::from_data(burn::tensor::TensorData::new(v.clone(), [v.len()]), &device);
        let aligned = Tensor::cat(vec![x, zero], 2).select(2, index(gather));
        Ok(self.forward(aligned, stride)?.select(2, index(keep)))
    }
}

/// The windows of `x` with the per-head position embedding added: `[b, h, n, block, d]`.
fn embedded_windows(x: Tensor<4>, pos_emb: &Param<Tensor<3>>, stride: usize) -> crate::error::Result<Tensor<5>> {
    let [h, block, d] = pos_emb.dims();
    let [b, hx, _, dx] = x.dims();
    if hx != h || dx != d {
        return shape_err("x", format!("[.., {hx}, .., {dx}] does not match the compressor's {h} heads of width {d}"));
    }
    let w = compression_windows(x, block, stride)?;
    let n = w.dims()[2];
    Ok(w + pos_emb.val().reshape([1, h, 1, block, d]).expand([b, h, n, block, d]))
}

/// Mean of the window after a per-head intra-block position embedding.
#[derive(Module, Debug)]
pub struct MeanPosCompressor {
    /// `[heads, block, head_dim]`.
    pub pos_emb: Param<Tensor<3>>,
}

impl MeanPosCompressor {
    /// `[b, h, s, d] -> [b, h, n, d]`.
    pub fn forward(&self, x: Tensor<4>, stride: usize) -> crate::error::Result<Tensor<4>> {
        let y = embedded_windows(x, &self.pos_emb, stride)?;
        let [b, h, n, _, d] = y.dims();
        Ok(y.mean_dim(3).reshape([b, h, n, d]))
    }
}

/// Softmax-weighted pooling: with `y` the embedded window, `token = sum_t softmax_t(y W_h) * y`
/// per feature.
#[derive(Module, Debug)]
pub struct AttentionPoolCompressor {
    /// `[heads, block, head_dim]`.
    pub pos_emb: Param<Tensor<3>>,
    /// `[heads, head_dim, head_dim]`, starting as the identity.
    pub weight: Param<Tensor<3>>,
}

impl AttentionPoolCompressor {
    /// `[b, h, s, d] -> [b, h, n, d]`.
    pub fn forward(&self, x: Tensor<4>, stride: usize) -> crate::error::Result<Tensor<4>> {
        let y = embedded_windows(x, &self.pos_emb, stride)?;
        let [b, h, n, l, d] = y.dims();
        let w = self.weight.val().unsqueeze::<4>().expand([b, h, d, d]);
        let logits = y.clone().reshape([b, h, n * l, d]).matmul(w).reshape([b, h, n, l, d]);
        let weights = softmax(logits, 3);
        Ok((weights * y).sum_dim(3).reshape([b, h, n, d]))
    }
}

/// Per-head linear map of the flattened embedded window, with a bias.
#[derive(Module, Debug)]
pub struct HeadLinearCompressor {
    /// `[heads, block, head_dim]`.
    pub pos_emb: Param<Tensor<3>>,
    /// `[heads, block * head_dim, head_dim]`.
    pub weight: Param<Tensor<3>>,
    /// `[heads, head_dim]`.
    pub bias: Param<Tensor<2>>,
}

impl HeadLinearCompressor {
    /// `[b, h, s, d] -> [b, h, n, d]`.
    pub fn forward(&self, x: Tensor<4>, stride: usize) -> crate::error::Result<Tensor<4>> {
        let y = embedded_windows(x, &self.pos_emb, stride)?;
        let [b, h, n, l, d] = y.dims();
        let w = self.weight.val().unsqueeze::<4>().expand([b, h, l * d, d]);
        let bias = self.bias.val().reshape([1, h, 1, d]).expand([b, h, n, d]);
        Ok(y.reshape([b, h, n, l * d]).matmul(w) + bias)
    }
}
