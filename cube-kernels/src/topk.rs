//! Row top-k for the routers: the indices of the `k` largest values of each row, as the
//! `-1`-padded index lists the block schedules take.
//!
//! MoBA's router, NSA's block selection and SeerAttention's gate each end in a top-k over a
//! short row (tens to a few thousand blocks) for every query (or query block) and head.
//! One unit per row keeps its best `k` in a sorted local list while it reads the row once:
//! `O(n)` reads per row and `O(k)` work only when a value enters the list.

use crate::launch::buf;
use crate::plan::per_unit_launch;
use crate::*;
use cubecl::prelude::*;

/// Largest `k` [`row_topk`] takes (its lists live in each unit's local memory).
pub const MAX_TOPK: usize = 1024;

/// Indices of the `k` largest values of each row of `values` (f32, `rows x n`, row-major),
/// as i32 `rows x k`: in descending order of value, ties to the lower index; `-inf` and NaN
/// are never chosen, and rows with fewer than `k` other values are padded with `-1`.
pub fn row_topk(client: &Client, values: &Handle, rows: usize, n: usize, k: usize) -> Result<Handle, KernelError> {
    if k == 0 || k > MAX_TOPK {
        return Err(KernelError::InvalidArgument { arg: "k", msg: format!("must be in 1..={MAX_TOPK}, got {k}") });
    }
    check_size("values", values, rows * n, 4)?;
    let out = alloc(client, rows * k, 4);
    if rows == 0 {
        return Ok(out);
    }
    let (count, dim) = per_unit_launch(client, rows);
    row_topk_kernel::launch(client, count, dim, buf(values, rows * n), buf(&out, rows * k), rows as u32, n as u32, f32::NEG_INFINITY, k);
    Ok(out)
}

/// One unit per row: insertion into a sorted list of `k` (value, index) pairs; a value enters
/// only when strictly greater than the list's last, so equal values keep index order.
#[cube(launch)]
pub fn row_topk_kernel(values: &[f32], out: &mut [i32], rows: u32, n: u32, neg_inf: f32, #[comptime] k: usize) {
    let row = crate::kernels::unit_linear();
    if row < rows as usize {
        let n = n as usize;
        let base = row * n;
        let mut best_v = Array::<f32>::new(k);
        let mut best_i = Array::<i32>::new(k);
        for x in 0..k {
            best_v[x] = neg_inf;
            best_i[x] = -1;
        }
        for j in 0..n {
            let v = values[base + j];
            if v > best_v[comptime!(k - 1)] {
                let mut p = comptime!(k - 1).runtime();
                loop {
                    if p == 0 {
                        break;
                    }
                    if v > best_v[p - 1] {
                        best_v[p] = best_v[p - 1];
                        best_i[p] = best_i[p - 1];
                        p -= 1;
                    } else {
                        break;
                    }
                }
                best_v[p] = v;
                best_i[p] = j as i32;
            }
        }
        for x in 0..k {
            out[row * k + x] = best_i[x];
        }
    }
}
