//! Index grids built on the device, for the masks the routing and selection steps apply to
//! `[queries, blocks]` score tables: building them with integer comparisons on the device
//! keeps host work and uploads out of every forward, and gives every mask the same bool
//! representation (see `attention::reference::position_mask`).

use burn::tensor::{DType, Device, Int, Tensor};

/// `(rows, cols)`, both `[n_rows, n_cols]`: `rows[r][c] = r + row_offset`, `cols[r][c] = c`.
pub(crate) fn row_col(n_rows: usize, n_cols: usize, row_offset: i64, device: &Device) -> (Tensor<2, Int>, Tensor<2, Int>) {
    let rows = (Tensor::<1, Int>::arange(0..n_rows as i64, device) + row_offset).reshape([n_rows, 1]).expand([n_rows, n_cols]);
    let cols = Tensor::<1, Int>::arange(0..n_cols as i64, device).reshape([1, n_cols]).expand([n_rows, n_cols]);
    (rows, cols)
}

/// Keys in each of the `n_blocks` blocks of `block` keys over `len` keys (the last may be
/// partial), as floats of `dtype`: `min(block, len - i * block)`.
pub(crate) fn block_counts(n_blocks: usize, block: usize, len: usize, device: &Device, dtype: DType) -> Tensor<1> {
    (Tensor::<1, Int>::arange(0..n_blocks as i64, device) * -(block as i64) + len as i64).clamp_max(block as i64).float().cast(dtype)
}

/// Row indices of `n` windows of `block` keys, `stride` apart, flattened window-major:
/// `i * stride + t` for window `i` and offset `t`.
pub(crate) fn window_indices(n: usize, block: usize, stride: usize, device: &Device) -> Tensor<1, Int> {
    let starts = (Tensor::<1, Int>::arange(0..n as i64, device) * stride as i64).reshape([n, 1]).expand([n, block]);
    let offsets = Tensor::<1, Int>::arange(0..block as i64, device).reshape([1, block]).expand([n, block]);
    (starts + offsets).reshape([n * block])
}

/// Consecutive row ranges `[t0, t1)` of at most `rows` rows covering `len` rows: the query
/// chunks of the routers and of Seer's target.
pub(crate) fn row_chunks(len: usize, rows: usize) -> impl Iterator<Item = (usize, usize)> {
    let rows = rows.max(1);
    (0..len).step_by(rows).map(move |t0| (t0, (t0 + rows).min(len)))
}

/// The per-chunk results of [`row_chunks`] joined along the row dimension (2).
pub(crate) fn cat_rows<K: burn::tensor::kind::Basic>(mut parts: Vec<Tensor<4, K>>) -> Tensor<4, K> {
    if parts.len() == 1 { parts.pop().expect("one part") } else { Tensor::cat(parts, 2) }
}
