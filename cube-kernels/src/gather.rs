//! Key-block-outer gathering for the query-major passes of small row groups.
//!
//! A schedule whose lists serve fewer than 16 query rows (one head per token: MoBA, NSA
//! with a small GQA group) would fill one 16-row fragment tile with a single row if each
//! cube took one list. Gathered, a cube takes one selected key block and up to 64 of the
//! rows that selected it (from the inverted schedule, as the key-major pass already walks
//! them), so every product is a dense tile and the work follows the number of selected
//! (row, block) pairs. Each cube writes its rows' partial result to the list slot of its
//! block; a second pass merges a row's slots in list order (the forward: the softmax of
//! the partial LSEs; dQ: the sum), which keeps the result deterministic without atomics.
//!
//! Partial buffers hold `cap` f32 rows per query row: `O(S x cap x D)` per head.

use crate::kernels::{NEG_BIG, cube_linear, range_visible};
use crate::launch::buf;
use crate::plan::{mask_params, per_unit_launch};
use crate::schedule::{CleanSchedule, Inverted};
use crate::*;
use cubecl::prelude::*;

/// Four f32 partials or outputs: one 16-byte load.
type V4 = Const<4>;

/// Rows per list below which the fragment path gathers (one 16-row fragment tile).
const GATHER_BELOW_ROWS: usize = 16;
/// Largest partial buffer (bytes) the gathered passes allocate; above it they fall back to
/// one cube per list.
const MAX_PARTIAL_BYTES: usize = 8 << 30;

/// Set to `0` to turn gathering off, or to `1` to gather lists of any number of rows (for
/// measuring it against one cube per list).
pub const GATHER_ENV: &str = "SPARSE_ATTN_GATHER";

/// Whether the query-major fragment passes of `p` with schedule `s` gather.
pub(crate) fn gathers(p: &AttnProblem, s: &BlockSchedule) -> bool {
    let forced = std::env::var(GATHER_ENV);
    if forced.as_deref().is_ok_and(|v| v == "0") {
        return false;
    }
    let rows_per_list = p.heads_q / s.sel_heads * s.query_block;
    let part_bytes = p.batch * p.heads_q * p.seq_q * s.capacity * p.head_dim * 4;
    let small_groups = rows_per_list < GATHER_BELOW_ROWS || forced.as_deref().is_ok_and(|v| v == "1");
    small_groups && part_bytes <= MAX_PARTIAL_BYTES
}

/// What a gathered launch binds besides the usual arguments.
pub(crate) struct Gathered {
    /// Per list, the first tile of each key block (`nkb + 1` prefix entries).
    pub(crate) work_off: Handle,
    /// Tiles per list the grid provides (an upper bound on every list's count).
    pub(crate) max_tiles: usize,
    /// Partial results, f32 `[B, Hq, Sq, cap, D]`.
    pub(crate) part: Handle,
    /// Partial LSEs, f32 `[B, Hq, Sq, cap]` (forward only; a placeholder for dQ).
    pub(crate) part_lse: Handle,
    /// Whether `part_lse` holds the LSEs (the forward).
    pub(crate) has_lse: bool,
}

/// Tile counts and partial buffers for a gathered pass with `bq` flat rows per cube.
pub(crate) fn prepare(
    client: &Client,
    p: &AttnProblem,
    s: &BlockSchedule,
    cs: &CleanSchedule,
    inv: &Inverted,
    bq: usize,
    forward: bool,
) -> Gathered {
    let n_bs = p.batch * s.sel_heads;
    let per_entry = p.heads_q / s.sel_heads * s.query_block;
    let work_off = client.empty(n_bs * (cs.nkb + 1) * 4);
    let (count, dim) = per_unit_launch(client, n_bs);
    gather_tiles_kernel::launch(
        client,
        count,
        dim,
        buf(&inv.offsets, n_bs * (cs.nkb + 1)),
        buf(&work_off, n_bs * (cs.nkb + 1)),
        n_bs as u32,
        cs.nkb as u32,
        per_entry as u32,
        bq as u32,
    );
    // Each block adds at most one partial tile to the pairs' full ones.
    let max_tiles = (cs.n_rows * s.capacity * per_entry).div_ceil(bq) + cs.nkb;
    let slots = p.batch * p.heads_q * p.seq_q * s.capacity;
    let part = client.empty((slots * p.head_dim * 4).max(4));
    let part_lse = client.empty(if forward { slots * 4 } else { 4 });
    Gathered { work_off, max_tiles, part, part_lse, has_lse: forward }
}

/// Merges the forward's partial results into `o` and `lse`.
pub(crate) fn merge_forward<F: Float + CubeElement>(
    client: &Client,
    p: &AttnProblem,
    s: &BlockSchedule,
    cs: &CleanSchedule,
    g: &Gathered,
    o: &Handle,
    lse: &Handle,
) {
    merge::<F>(client, p, s, cs, g, o, Some(lse));
}

/// Sums the dQ pass's partial results into `dq`.
pub(crate) fn sum_dq<F: Float + CubeElement>(
    client: &Client,
    p: &AttnProblem,
    s: &BlockSchedule,
    cs: &CleanSchedule,
    g: &Gathered,
    dq: &Handle,
) {
    merge::<F>(client, p, s, cs, g, dq, None);
}

fn merge<F: Float + CubeElement>(
    client: &Client,
    p: &AttnProblem,
    s: &BlockSchedule,
    cs: &CleanSchedule,
    g: &Gathered,
    out: &Handle,
    lse: Option<&Handle>,
) {
    let rows = p.batch * p.heads_q * p.seq_q;
    let n = rows * p.head_dim;
    // One unit per 4 elements (head_dim is a multiple of 16 on the fragment path).
    let n_vec = n / 4;
    let slots = rows * s.capacity;
    let (off, w, windowed) = mask_params(p);
    let lse_dummy;
    let lse_h = match lse {
        Some(h) => h,
        None => {
            lse_dummy = client.empty(4);
            &lse_dummy
        }
    };
    let (count, dim) = per_unit_launch(client, n_vec);
    merge_slots_kernel::launch::<F>(
        client,
        count,
        dim,
        buf(&cs.clean, p.batch * s.sel_heads * cs.n_rows * s.capacity),
        buf(&g.part, slots * p.head_dim),
        buf(&g.part_lse, if lse.is_some() { slots } else { 1 }),
        buf(out, n),
        buf(lse_h, if lse.is_some() { rows } else { 1 }),
        n_vec as u32,
        p.heads_q as u32,
        p.seq_q as u32,
        p.seq_k as u32,
        (p.heads_q / s.sel_heads) as u32,
        s.query_block as u32,
        s.key_block as u32,
        cs.n_rows as u32,
        s.capacity as u32,
        off,
        w,
        f32::NEG_INFINITY,
        p.head_dim,
        p.causal,
        windowed,
        lse.is_some(),
    );
}

/// Tiles of each key block of each list: `ceil(rows(kb) * per_entry / bq)`, as an exclusive
/// prefix over the blocks (`nkb + 1` entries). One unit per list.
#[cube(launch)]
pub fn gather_tiles_kernel(inv_off: &[i32], work_off: &mut [i32], n_lists: u32, nkb: u32, per_entry: u32, bq: u32) {
    let l = cube_linear() * (CUBE_DIM as usize) + UNIT_POS as usize;
    if l < n_lists as usize {
        let nk = nkb as usize;
        let base = l * (nk + 1);
        let mut acc = 0i32;
        for kb in 0..nk {
            work_off[base + kb] = acc;
            let flat = (inv_off[base + kb + 1] - inv_off[base + kb]) as u32 * per_entry;
            acc += flat.div_ceil(bq) as i32;
        }
        work_off[base + nk] = acc;
    }
}

/// One unit per four output elements `(row, 4 c .. 4 c + 4)` (16-byte loads of the
/// partials): merges the row's list slots in list order. A
/// slot holds a result when its block is in the list and its range can see the row's
/// schedule row (the inversion's rule). Forward (`softmax`): `lse = log sum exp(lse_e)`,
/// `o = sum exp(lse_e - lse) o_e` over slots with a finite LSE (`0` / `-inf` when none).
/// dQ: the plain sum.
#[cube(launch)]
#[allow(clippy::too_many_arguments, clippy::assign_op_pattern)]
pub fn merge_slots_kernel<F: Float>(
    clean: &[i32],
    part: &[Vector<f32, V4>],
    part_lse: &[f32],
    out: &mut [Vector<F, V4>],
    lse: &mut [f32],
    n: u32,
    heads_q: u32,
    seq_q: u32,
    seq_k: u32,
    group_heads: u32,
    query_block: u32,
    key_block: u32,
    n_rows: u32,
    cap: u32,
    off: i32,
    w: i32,
    neg_inf: f32,
    #[comptime] head_dim: usize,
    #[comptime] causal: bool,
    #[comptime] windowed: bool,
    #[comptime] softmax: bool,
) {
    let hv = comptime!(head_dim / 4);
    let idx = cube_linear() * (CUBE_DIM as usize) + UNIT_POS as usize;
    if idx < n as usize {
        let row = idx / hv;
        let c = idx % hv;
        let sq = seq_q as usize;
        let hq = heads_q as usize;
        let qb = query_block as usize;
        let bk = key_block as usize;
        let cp = cap as usize;
        let i = row % sq;
        let h = (row / sq) % hq;
        let b = row / (sq * hq);
        let n_sel = hq / group_heads as usize;
        let srow = i / qb;
        let list = ((b * n_sel + h / group_heads as usize) * n_rows as usize + srow) * cp;
        let qlo = srow * qb;
        let qhi = min(qlo + qb, sq) - 1;
        let mut m = comptime!(NEG_BIG).runtime();
        if softmax {
            for e in 0..cp {
                let kb = clean[list + e];
                if kb >= 0 {
                    let klo = kb as usize * bk;
                    let khi = min(klo + bk, seq_k as usize) - 1;
                    if range_visible(qlo, qhi, klo, khi, off, w, causal, windowed) {
                        let lv = part_lse[row * cp + e];
                        if lv > NEG_BIG {
                            m = max(m, lv);
                        }
                    }
                }
            }
        }
        let mut total = 0.0f32;
        let mut acc = Vector::<f32, V4>::cast_from(0.0f32);
        for e in 0..cp {
            let kb = clean[list + e];
            if kb >= 0 {
                let klo = kb as usize * bk;
                let khi = min(klo + bk, seq_k as usize) - 1;
                if range_visible(qlo, qhi, klo, khi, off, w, causal, windowed) {
                    let x = part[(row * cp + e) * hv + c];
                    if softmax {
                        let lv = part_lse[row * cp + e];
                        if lv > NEG_BIG {
                            let wgt = (lv - m).exp();
                            total += wgt;
                            acc = acc + x * Vector::<f32, V4>::cast_from(wgt);
                        }
                    } else {
                        acc = acc + x;
                    }
                }
            }
        }
        let mut inv = 1.0f32;
        if softmax {
            inv = 0.0f32;
            let mut lv = neg_inf;
            if total > 0.0f32 {
                inv = 1.0f32 / total;
                lv = m + total.ln();
            }
            if c == 0 {
                lse[row] = lv;
            }
        }
        let mut o = Vector::<F, V4>::empty();
        #[unroll]
        for x in 0..4usize {
            o.insert(x, F::cast_from(acc.extract(x) * inv));
        }
        out[idx] = o;
    }
}
