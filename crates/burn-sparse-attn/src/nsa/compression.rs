//! NSA's compression: overlapping windows of keys (or values) mapped to one token each.

use burn::config::Config;
use burn::module::{Module, Param};
use burn::nn::{Initializer, Linear, LinearConfig};
use burn::tensor::activation::gelu;
use burn::tensor::{Device, Tensor};

use crate::error::{check_positive, param_err, shape_err};


/// Number of complete windows of `block` keys, `stride` apart, in `seq` keys.
pub fn num_compressed(seq: usize, block: usize, stride: usize) -> usize {
    if seq < block || stride == 0 { 0 } else { (seq - block) / stride + 1 }
}

/// What becomes of the keys after the last complete window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TrailingWindow {
    /// Complete windows only: `floor((seq - block) / stride) + 1` of them (the NSA paper's
    /// compression). Default.
    #[default]
    Drop,
    /// One more, partial window from the next stride over the remaining keys, pooled over
    /// the keys it has (flash-linear-attention's `mean_pooling`: `ceil(seq / block)` tokens
    /// when `stride = block`). No query can see it under NSA's visibility rule, so it changes
    /// shapes only; the attention and selection ops accept either count.
    Partial,
}

/// Number of windows of `block` keys, `stride` apart, in `seq` keys, with the trailing
/// partial one when `trailing` is [`TrailingWindow::Partial`] and some keys are left over.
pub fn num_compressed_with(seq: usize, block: usize, stride: usize, trailing: TrailingWindow) -> usize {
    let complete = num_compressed(seq, block, stride);
    let covered = if complete == 0 { 0 } else { (complete - 1) * stride + block };
    match trailing {
        TrailingWindow::Partial if stride > 0 && seq > 0 && (complete == 0 || (covered < seq && complete * stride < seq)) => complete + 1,
        _ => complete,
    }
}

/// [`compress_mean`] with a choice for the trailing keys: with
/// [`TrailingWindow::Partial`] the last token is the mean of the keys from the next window
/// start to the end (`[b, h, s, d] -> [b, h, n, d]`, `n` from [`num_compressed_with`]).
pub fn compress_mean_with(x: Tensor<4>, block: usize, stride: usize, trailing: TrailingWindow) -> crate::error::Result<Tensor<4>> {
    check_positive("compress_block", block)?;
    check_positive("compress_stride", stride)?;
    let [b, h, s, d] = x.dims();
    let complete = num_compressed(s, block, stride);
    let n = num_compressed_with(s, block, stride, trailing);
    if n == complete {
        return compress_mean(x, block, stride);
    }
    let start = complete * stride;
    let partial = x.clone().slice([0..b, 0..h, start..s, 0..d]).mean_dim(2);
    if complete == 0 {
        return Ok(partial);
    }
    Ok(Tensor::cat(vec![compress_mean(x, block, stride)?, partial], 2))
}

/// `Some([b, h, 0, d])` when `x: [b, h, s, d]` holds no complete window of `block` keys:
/// what every compressor returns then (after checking `block` and `stride`).
pub(crate) fn no_windows(x: &Tensor<4>, block: usize, stride: usize) -> crate::error::Result<Option<Tensor<4>>> {
    check_positive("compress_block", block)?;
    check_positive("compress_stride", stride)?;
    let [b, h, s, d] = x.dims();
    Ok((num_compressed(s, block, stride) == 0).then(|| Tensor::zeros([b, h, 0, d], (&x.device(), x.dtype()))))
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
    if block.is_multiple_of(stride) {
        // Window `i` is stride-chunks `i .. i + block / stride`: slices and one concatenation,
        // whose backward is slice assignments, instead of an index gather whose backward is a
        // scatter-add (18 ms per call at 32k tokens on the H200, docs/results/toy-lm-h200.md).
        let m = block / stride;
        let chunks = x.slice([0..b, 0..h, 0..(n + m - 1) * stride, 0..d]).reshape([b, h, n + m - 1, stride, d]);
        let parts: Vec<Tensor<5>> = (0..m).map(|j| chunks.clone().slice([0..b, 0..h, j..j + n, 0..stride, 0..d])).collect();
        return Ok(Tensor::cat(parts, 3));
    }
    let idx = crate::grid::window_indices(n, block, stride, &x.device());
    Ok(x.select(2, idx).reshape([b, h, n, block, d]))
}

/// Mean-pooling compression (flash-linear-attention's choice): `[b, h, s, d] -> [b, h, n, d]`.
/// A sequence shorter than one window has no compressed token (`n = 0`), as in the packed
/// [`super::compress_mean_varlen`].
pub fn compress_mean(x: Tensor<4>, block: usize, stride: usize) -> crate::error::Result<Tensor<4>> {
    if let Some(empty) = no_windows(&x, block, stride)? {
        return Ok(empty);
    }
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
        if block.is_multiple_of(stride) && num_compressed(x.dims()[2], block, stride) > 0 {
            return Ok(self.forward_chunks(x, stride));
        }
        let w = compression_windows(x, block, stride)?;
        let n = w.dims()[2];
        let pe = self.pos_emb.val().reshape([1, 1, 1, block, d]).expand([b, h, n, block, d]);
        let flat = (w + pe).reshape([b, h, n, block * d]);
        Ok(crate::rows::grouped_linear(&self.fc2, gelu(crate::rows::grouped_linear(&self.fc1, flat))))
    }

    /// [`Self::forward`] when the window is `m = block / stride` whole stride-chunks, without
    /// building the windows. Window `i` is chunks `i .. i + m`, so its first layer is
    /// `sum_j chunk_{i+j} W1_j + (pos_emb W1 + b1)` with `W1_j` the rows of `W1` that read
    /// chunk `j` of a window: one product of every chunk with `[W1_0 | .. | W1_{m-1}]`
    /// (`stride * d -> m * hidden`), then `m` shifted slices added. The products have `m`
    /// times more output tiles and an `m` times shorter inner dimension than the windows'
    /// `block * d -> hidden` (Burn's matmul ran that shape at under 10 TFLOP/s on an H200),
    /// and the windows (each key `m` times) are never copied. The second layer runs over the
    /// `n + m - 1` chunk rows (the last `m - 1` are not windows and are dropped after), so
    /// its row count keeps the chunks' powers of two for the weight-gradient split.
    fn forward_chunks(&self, x: Tensor<4>, stride: usize) -> Tensor<4> {
        let [block, d] = self.pos_emb.dims();
        let [b, h, s, _] = x.dims();
        let m = block / stride;
        let n = num_compressed(s, block, stride);
        let n_chunks = n + m - 1;
        let w1 = self.fc1.weight.val();
        let hidden = w1.dims()[1];
        let chunks = x.slice([0..b, 0..h, 0..n_chunks * stride, 0..d]).reshape([b, h, n_chunks, stride * d]);
        let w_cat = w1.clone().reshape([m, stride * d, hidden]).swap_dims(0, 1).reshape([stride * d, m * hidden]);
        let y = crate::rows::linear_rows(chunks, w_cat, None).reshape([b, h, n_chunks, m, hidden]);
        // Row i of the sum is window i for i < n; the rows after are padding.
        let mut first = y.clone().slice([0..b, 0..h, 0..n_chunks, 0..1, 0..hidden]).reshape([b, h, n_chunks, hidden]);
        for j in 1..m {
            let part = y.clone().slice([0..b, 0..h, j..n_chunks, j..j + 1, 0..hidden]).reshape([b, h, n_chunks - j, hidden]);
            let pad = Tensor::<4>::zeros([b, h, j, hidden], (&part.device(), part.dtype()));
            first = first + Tensor::cat(vec![part, pad], 2);
        }
        let mut shift = self.pos_emb.val().reshape([1, block * d]).matmul(w1).reshape([hidden]);
        if let Some(b1) = &self.fc1.bias {
            shift = shift + b1.val();
        }
        let hidden_act = gelu(crate::rows::shift_columns(first, shift));
        crate::rows::grouped_linear(&self.fc2, hidden_act).slice([0..b, 0..h, 0..n, 0..d])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{DType, Device, TensorData};

    fn f64s<const D: usize>(t: Tensor<D>) -> Vec<f64> {
        t.into_data().convert::<f64>().try_to_vec::<f64>().unwrap()
    }

    /// The chunk products give the windows' MLP output and every gradient (input, position
    /// embedding, both layers' weights and biases), in f64, for block = 2 and 4 strides and a
    /// sequence whose tail is not a whole chunk.
    #[test]
    fn chunk_products_equal_the_window_mlp() {
        let device = Device::flex().autodiff();
        for (block, stride, s) in [(8usize, 4usize, 23usize), (8, 2, 20), (4, 4, 17)] {
            let (b, h, d) = (2usize, 3usize, 5usize);
            let dist = burn::tensor::Distribution::Normal(0.0, 1.0);
            let p2 = |shape: [usize; 2]| Param::from_tensor(Tensor::<2>::random(shape, dist, (&device, DType::F64)));
            let p1 = |n: usize| Some(Param::from_tensor(Tensor::<1>::random([n], dist, (&device, DType::F64))));
            let mlp = CompressionMlp {
                pos_emb: p2([block, d]),
                fc1: Linear { weight: p2([block * d, 7]), bias: p1(7) },
                fc2: Linear { weight: p2([7, d]), bias: p1(d) },
            };
            let x = Tensor::<4>::random([b, h, s, d], dist, (&device, DType::F64)).require_grad();
            let n = num_compressed(s, block, stride);
            let w = Tensor::<4>::random([b, h, n, d], dist, (&device, DType::F64));
            // The window formulation, written out.
            let windows = compression_windows(x.clone(), block, stride).unwrap();
            let pe = mlp.pos_emb.val().reshape([1, 1, 1, block, d]).expand([b, h, n, block, d]);
            let want = mlp.fc2.forward(gelu(mlp.fc1.forward((windows + pe).reshape([b, h, n, block * d]))));
            let got = mlp.forward(x.clone(), stride).unwrap();
            let g_want = (want.clone() * w.clone()).sum().backward();
            let g_got = (got.clone() * w).sum().backward();
            let close = |a: Vec<f64>, e: Vec<f64>, what: &str| {
                assert_eq!(a.len(), e.len(), "{what}");
                for (i, (a, e)) in a.iter().zip(&e).enumerate() {
                    assert!((a - e).abs() <= 1e-12 * (1.0 + e.abs()), "{what} [{i}] (block {block}, stride {stride}): {a} vs {e}");
                }
            };
            close(f64s(got), f64s(want), "output");
            close(f64s(x.grad(&g_got).unwrap()), f64s(x.grad(&g_want).unwrap()), "d x");
            let pe = mlp.pos_emb.val();
            close(f64s(pe.grad(&g_got).unwrap()), f64s(pe.grad(&g_want).unwrap()), "d pos_emb");
            for (layer, what) in [(&mlp.fc1, "fc1"), (&mlp.fc2, "fc2")] {
                let (wt, bias) = (layer.weight.val(), layer.bias.as_ref().unwrap().val());
                close(f64s(wt.grad(&g_got).unwrap()), f64s(wt.grad(&g_want).unwrap()), what);
                close(f64s(bias.grad(&g_got).unwrap()), f64s(bias.grad(&g_want).unwrap()), what);
            }
        }
    }

    /// Both ways of building the windows (chunk slices when the block is a multiple of the
    /// stride, an index gather otherwise) give window `i` = keys `i * stride ..
    /// i * stride + block`, with the trailing keys of an incomplete window left out.
    #[test]
    fn windows_are_the_strided_key_ranges() {
        let device = Device::flex();
        let (b, h, s, d) = (1usize, 2usize, 23usize, 3usize);
        let values: Vec<f64> = (0..b * h * s * d).map(|i| i as f64).collect();
        let x = Tensor::<4>::from_data(TensorData::new(values.clone(), [b, h, s, d]), (&device, burn::tensor::DType::F64));
        for (block, stride) in [(32usize, 16usize), (8, 4), (6, 2), (4, 4), (5, 2), (3, 4)] {
            let n = num_compressed(s, block, stride);
            if n == 0 {
                continue;
            }
            let w = compression_windows(x.clone(), block, stride).unwrap();
            assert_eq!(w.dims(), [b, h, n, block, d], "block {block} stride {stride}");
            let got = w.into_data().convert::<f64>().try_to_vec::<f64>().unwrap();
            let mut want = Vec::new();
            for hh in 0..h {
                for i in 0..n {
                    for t in i * stride..i * stride + block {
                        want.extend_from_slice(&values[(hh * s + t) * d..(hh * s + t + 1) * d]);
                    }
                }
            }
            assert_eq!(got, want, "block {block} stride {stride}");
        }
    }
}
