//! `#[cube]` building blocks of the query-major passes (forward and dQ) shared by the
//! portable kernel ([`crate::kernels::attn_rows_kernel`]), the cooperative-matrix one
//! ([`crate::mma::mma_rows_kernel`]) and, for the list walk, the register-fragment ones:
//! which schedule list a row group walks, how many key tiles an entry spans, and the
//! per-row statistics (threshold, LSE, delta) a row reads before the walk.

use crate::kernels::NEG_BIG;
use cubecl::prelude::*;

/// The entries a row group walks and where its list starts: with a block schedule the
/// `cap` entries of list `(b, g, r)`; without one, one pseudo-entry covering the cube's
/// visible keys.
#[cube]
pub(crate) fn row_entries(b: usize, n_gh: usize, g: usize, n_rb: usize, r: usize, cap: usize, #[comptime] blocks: bool) -> (usize, usize) {
    let mut n_entries = 1usize;
    let mut list_base = 0usize;
    if blocks {
        n_entries = cap;
        list_base = ((b * n_gh + g) * n_rb + r) * cap;
    }
    (n_entries, list_base)
}

/// Key tiles of `tile_k` keys covering an entry's keys `[e_lo, e_hi)` (none when empty).
#[cube]
pub(crate) fn entry_tiles(e_lo: i32, e_hi: i32, #[comptime] tile_k: usize) -> usize {
    let mut n_tiles = 0usize;
    if e_hi > e_lo {
        n_tiles = ((e_hi - e_lo) as usize).div_ceil(tile_k);
    }
    n_tiles
}

/// What a query row reads before its walk.
#[derive(CubeType, Clone, Copy)]
pub(crate) struct RowStats {
    /// DMA's keep threshold: value and index (`NEG_BIG` and 0 without one).
    pub(crate) thr: f32,
    pub(crate) thr_i: i32,
    /// The backward's forward LSE and `delta = rowsum(dO * O)` (`NEG_BIG` and 0 in the
    /// forward).
    pub(crate) lse: f32,
    pub(crate) delta: f32,
    /// Whether the row walks at all: a valid row, and in the backward one whose LSE is
    /// finite (a row that saw no key has zero gradients).
    pub(crate) active: bool,
}

/// The [`RowStats`] of row `row` (`[B, Hq, Sq]` index; `thr_row` is its `[B, Hb, Sq]` one).
/// `lse` is only read; it is `&mut` because the query-major kernels write it in the forward.
#[cube]
#[allow(clippy::too_many_arguments)]
pub(crate) fn row_stats(
    thr_v: &[f32],
    thr_i: &[i32],
    lse: &mut [f32],
    delta: &[f32],
    thr_row: usize,
    row: usize,
    row_valid: bool,
    #[comptime] has_thr: bool,
    #[comptime] backward: bool,
) -> RowStats {
    let mut st = RowStats {
        thr: comptime!(NEG_BIG).runtime(),
        thr_i: 0i32,
        lse: comptime!(NEG_BIG).runtime(),
        delta: 0.0f32,
        active: row_valid,
    };
    if row_valid {
        if has_thr {
            st.thr = thr_v[thr_row];
            st.thr_i = thr_i[thr_row];
        }
        if backward {
            st.lse = lse[row];
            st.delta = delta[row];
            st.active = st.lse > NEG_BIG;
        }
    }
    st
}
