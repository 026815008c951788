//! Index grids built on the device, for the masks the routing and selection steps apply to
//! `[queries, blocks]` score tables: building them with integer comparisons on the device
//! keeps host work and uploads out of every forward, and gives every mask the same bool
//! representation (see `attention::reference::position_mask`).

use burn::tensor::{Device, Int, Tensor};

/// `(rows, cols)`, both `[n_rows, n_cols]`: `rows[r][c] = r + row_offset`, `cols[r][c] = c`.
pub(crate) fn row_col(n_rows: usize, n_cols: usize, row_offset: i64, device: &Device) -> (Tensor<2, Int>, Tensor<2, Int>) {
    let rows = (Tensor::<1, Int>::arange(0..n_rows as i64, device) + row_offset).reshape([n_rows, 1]).expand([n_rows, n_cols]);
    let cols = Tensor::<1, Int>::arange(0..n_cols as i64, device).reshape([1, n_cols]).expand([n_rows, n_cols]);
    (rows, cols)
}
