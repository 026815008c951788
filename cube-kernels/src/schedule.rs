//! Block schedules on the device: sanitizing the lists, and inverting them into per-key-block
//! CSR row lists for the key-major pass.

use crate::*;
use cubecl::prelude::*;
use crate::launch::buf;
use crate::plan::{grid, mask_params, per_unit_launch};

// ---------------------------------------------------------------------------------------
// Schedules
// ---------------------------------------------------------------------------------------

/// A schedule after sanitizing: every list sorted ascending, unique, valid, `-1`-padded.
pub(crate) struct CleanSchedule {
    pub(crate) clean: Handle,
    pub(crate) n_rows: usize,
    pub(crate) nkb: usize,
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
    CleanSchedule { clean, n_rows, nkb }
}

/// The inverted schedule in CSR form: for each (batch, sel head, key block) the rows that
/// selected it (and can see it), ascending.
pub(crate) struct Inverted {
    pub(crate) offsets: Handle,
    pub(crate) rows: Handle,
}

pub(crate) fn invert(client: &Client, p: &AttnProblem, s: &BlockSchedule, cs: &CleanSchedule) -> Inverted {
    let n_bs = p.batch * s.sel_heads;
    let n_items = n_bs * cs.nkb;
    let counts = client.empty(n_items * 4);
    let offsets = client.empty(n_bs * (cs.nkb + 1) * 4);
    // Capacity: each row lists a block at most once, so R*C rows per (batch, sel head).
    let rows_len = n_bs * cs.n_rows * s.capacity;
    let rows = client.empty(rows_len * 4);
    let (off, w, windowed) = mask_params(p);
    let clean_len = n_bs * cs.n_rows * s.capacity;
    for fill in [false, true] {
        if fill {
            let (count, dim) = per_unit_launch(client, n_bs);
            kernels::prefix_sum_kernel::launch(
                client,
                count,
                dim,
                buf(&counts, n_items),
                buf(&offsets, n_bs * (cs.nkb + 1)),
                n_bs as u32,
                cs.nkb as u32,
            );
        }
        let hw = &client.properties().hardware;
        let units = 128.min(hw.max_units_per_cube as usize).min(hw.max_cube_dim.0 as usize).max(1);
        kernels::invert_schedule_kernel::launch(
            client,
            grid(client, n_items),
            CubeDim::new_1d(units as u32),
            buf(&cs.clean, clean_len),
            buf(&counts, n_items),
            buf(&offsets, n_bs * (cs.nkb + 1)),
            buf(&rows, rows_len),
            n_items as u32,
            cs.nkb as u32,
            cs.n_rows as u32,
            s.capacity as u32,
            s.query_block as u32,
            s.key_block as u32,
            p.seq_q as u32,
            p.seq_k as u32,
            off,
            w,
            units,
            p.causal,
            windowed,
            fill,
        );
    }
    Inverted { offsets, rows }
}
