//! Block schedules on the device: sanitizing the lists, and inverting them into per-key-block
//! CSR row lists for the key-major pass (host side and the inversion's kernels).

use crate::*;
use cubecl::prelude::*;
use crate::launch::buf;
use crate::plan::{grid, mask_params, per_unit_launch};
use crate::kernels::{cube_linear, range_visible, unit_linear};

// ---------------------------------------------------------------------------------------
// Schedules
// ---------------------------------------------------------------------------------------

/// A schedule after sanitizing: every list sorted ascending, unique, valid, `-1`-padded.
pub(crate) struct CleanSchedule {
    pub(crate) clean: Handle,
    pub(crate) n_rows: usize,
    pub(crate) nkb: usize,
    /// Its inversion, built on first use: the gathered dQ pass and the key-major pass of one
    /// backward share it.
    inverted: std::cell::OnceCell<Inverted>,
}

impl CleanSchedule {
    /// The inverted schedule ([`invert`]), built once per sanitized schedule.
    pub(crate) fn inverted(&self, client: &Client, p: &AttnProblem, s: &BlockSchedule) -> &Inverted {
        self.inverted.get_or_init(|| invert(client, p, s, self))
    }
}

pub(crate) fn sanitize(client: &Client, p: &AttnProblem, s: &BlockSchedule) -> CleanSchedule {
    let n_rows = p.seq_q.div_ceil(s.query_block);
    let nkb = p.seq_k.div_ceil(s.key_block);
    let n_lists = p.batch * s.sel_heads * n_rows;
    let len = n_lists * s.capacity;
    let clean = client.empty(len * 4);
    let (count, dim) = per_unit_launch(client, n_lists);
    kernels::sanitize_schedule_kernel::launch(
        client,
        count,
        dim,
        buf(&s.indices, len),
        buf(&clean, len),
        n_lists as u32,
        s.capacity as u32,
        nkb as u32,
    );
    CleanSchedule { clean, n_rows, nkb, inverted: std::cell::OnceCell::new() }
}

/// The inverted schedule in CSR form: for each (batch, sel head, key block) the rows that
/// selected it (and can see it), ascending.
pub(crate) struct Inverted {
    pub(crate) offsets: Handle,
    pub(crate) rows: Handle,
}

/// Rows per chunk of the O(pairs) inversion and the most chunks per list (bounds the
/// `nkb x chunks` count table).
const CHUNK_ROWS: usize = 64;
const MAX_CHUNKS: usize = 1024;
/// Key blocks counted per launch: one i32 counter each in a cube's shared memory.
const BLOCKS_PER_SEGMENT: usize = 4096;

/// Inverts a sanitized schedule in `O(pairs + lists x blocks x chunks)`: each cube walks a
/// chunk of consecutive schedule rows in order and counts (then places) its entries per key
/// block in shared counters. A row's entries are distinct blocks, so the units of a cube,
/// one per entry, never touch the same counter in one step; rows follow each other in order,
/// which keeps every block's row list ascending without atomics. More than
/// `BLOCKS_PER_SEGMENT` key blocks are counted in segments, one launch each.
fn invert(client: &Client, p: &AttnProblem, s: &BlockSchedule, cs: &CleanSchedule) -> Inverted {
    let n_bs = p.batch * s.sel_heads;
    let nkb = cs.nkb;
    let chunk_rows = CHUNK_ROWS.max(cs.n_rows.div_ceil(MAX_CHUNKS));
    let n_chunks = cs.n_rows.div_ceil(chunk_rows);
    let hist_len = n_bs * nkb * n_chunks;
    let hist = client.empty(hist_len.max(1) * 4);
    let counts = client.empty((n_bs * nkb).max(1) * 4);
    let offsets = client.empty(n_bs * (nkb + 1) * 4);
    let rows_len = n_bs * cs.n_rows * s.capacity;
    let rows = client.empty(rows_len.max(1) * 4);
    let (off, w, windowed) = mask_params(p);
    let hw = &client.properties().hardware;
    let max_units = (hw.max_units_per_cube as usize).min(hw.max_cube_dim.0 as usize).max(1);
    let units = s.capacity.next_power_of_two().clamp(32, 256).min(max_units);
    let slots = nkb.min(BLOCKS_PER_SEGMENT).next_power_of_two();
    for fill in [false, true] {
        if fill {
            let (count, dim) = per_unit_launch(client, n_bs * nkb);
            chunk_scan_kernel::launch(
                client,
                count,
                dim,
                buf(&hist, hist_len),
                buf(&counts, n_bs * nkb),
                (n_bs * nkb) as u32,
                n_chunks as u32,
            );
            let (count, dim) = per_unit_launch(client, n_bs);
            kernels::prefix_sum_kernel::launch(
                client,
                count,
                dim,
                buf(&counts, n_bs * nkb),
                buf(&offsets, n_bs * (nkb + 1)),
                n_bs as u32,
                nkb as u32,
            );
        }
        for seg in (0..nkb).step_by(BLOCKS_PER_SEGMENT) {
            let seg_len = (nkb - seg).min(BLOCKS_PER_SEGMENT);
            chunk_invert_kernel::launch(
                client,
                grid(client, n_bs * n_chunks),
                CubeDim::new_1d(units as u32),
                buf(&cs.clean, rows_len),
                buf(&hist, hist_len),
                buf(&offsets, n_bs * (nkb + 1)),
                buf(&rows, rows_len),
                (n_bs * n_chunks) as u32,
                n_chunks as u32,
                chunk_rows as u32,
                nkb as u32,
                seg as u32,
                seg_len as u32,
                cs.n_rows as u32,
                s.capacity as u32,
                s.query_block as u32,
                s.key_block as u32,
                p.seq_q as u32,
                p.seq_k as u32,
                off,
                w,
                slots,
                p.causal,
                windowed,
                fill,
            );
        }
    }
    Inverted { offsets, rows }
}

/// One cube per (list, chunk of schedule rows). Counting (`fill = false`): writes the
/// chunk's number of rows per key block to `hist[list][block][chunk]`. Filling: `hist`
/// holds each chunk's start inside its block's row list (after [`chunk_scan_kernel`]) and
/// `offsets` the CSR offsets; writes the rows. Only key blocks `seg..seg + seg_len` are
/// handled (counter `kb - seg`).
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn chunk_invert_kernel(
    clean: &[i32],
    hist: &mut [i32],
    offsets: &[i32],
    rows: &mut [i32],
    n_items: u32,
    n_chunks: u32,
    chunk_rows: u32,
    nkb: u32,
    seg: u32,
    seg_len: u32,
    n_rows: u32,
    cap: u32,
    query_block: u32,
    key_block: u32,
    seq_q: u32,
    seq_k: u32,
    off: i32,
    w: i32,
    #[comptime] slots: usize,
    #[comptime] causal: bool,
    #[comptime] windowed: bool,
    #[comptime] fill: bool,
) {
    let mut cnt_s = Shared::<[i32]>::new_slice(slots);
    let item = cube_linear();
    let u = UNIT_POS as usize;
    let nu = CUBE_DIM as usize;
    if item < n_items as usize {
        let nc = n_chunks as usize;
        let nk = nkb as usize;
        let nr = n_rows as usize;
        let c = cap as usize;
        let bq = query_block as usize;
        let bk = key_block as usize;
        let bs = item / nc;
        let chunk = item % nc;
        let r0 = chunk * chunk_rows as usize;
        let r1 = min(r0 + chunk_rows as usize, nr);
        let sg = seg as usize;
        let sl = seg_len as usize;
        let mut x = u;
        while x < sl {
            cnt_s[x] = 0;
            x += nu;
        }
        sync_cube();
        for r in r0..r1 {
            let qlo = r * bq;
            let qhi = min(qlo + bq, seq_q as usize) - 1;
            let mut e = u;
            while e < c {
                let kb = clean[(bs * nr + r) * c + e];
                if kb >= sg as i32 && kb < (sg + sl) as i32 {
                    let kbu = kb as usize;
                    let klo = kbu * bk;
                    let khi = min(klo + bk, seq_k as usize) - 1;
                    if range_visible(qlo, qhi, klo, khi, off, w, causal, windowed) {
                        if fill {
                            let at = offsets[bs * (nk + 1) + kbu] + hist[(bs * nk + kbu) * nc + chunk] + cnt_s[kbu - sg];
                            rows[bs * nr * c + at as usize] = r as i32;
                        }
                        cnt_s[kbu - sg] += 1;
                    }
                }
                e += nu;
            }
            sync_cube();
        }
        if !fill {
            let mut x = u;
            while x < sl {
                hist[(bs * nk + sg + x) * nc + chunk] = cnt_s[x];
                x += nu;
            }
        }
    }
}

/// Exclusive scan of each (list, block)'s chunk counts in place; the total goes to
/// `counts`. One unit per (list, block).
#[cube(launch)]
pub fn chunk_scan_kernel(hist: &mut [i32], counts: &mut [i32], n_items: u32, n_chunks: u32) {
    let item = unit_linear();
    if item < n_items as usize {
        let nc = n_chunks as usize;
        let mut acc = 0i32;
        for ch in 0..nc {
            let v = hist[item * nc + ch];
            hist[item * nc + ch] = acc;
            acc += v;
        }
        counts[item] = acc;
    }
}
