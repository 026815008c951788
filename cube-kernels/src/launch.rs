//! The launches of the three passes (forward or dQ query-major, dK/dV key-major) for every
//! path, and the buffers they bind.

use crate::*;
use cubecl::prelude::*;
use crate::caps::{fragment_supported, mma_spec, vector_aligned};
use crate::plan::*;
use crate::args::{KeysShape, RowsShape};
use crate::gather;
use crate::key_pieces::{self, KeyWalkShape};
use crate::schedule::{CleanSchedule, sanitize};

/// Buffer argument over `len` elements of `h`.
pub(crate) fn buf(h: &Handle, len: usize) -> BufferArg {
    // SAFETY: every caller passes a handle whose size was validated to hold `len` elements
    // of the kernel's element type (or a freshly allocated one of that size).
    unsafe { BufferArg::from_raw_parts(h.clone(), len.max(1)) }
}

/// A device buffer filled with zeros, used for absent optional inputs.
pub(crate) fn dummy(client: &Client, bytes: usize) -> Handle {
    client.create_from_slice(&vec![0u8; bytes.max(4)])
}

/// The bias and threshold buffers as both passes bind them: the caller's, or 1-element
/// placeholders that the kernels' `#[comptime]` flags never read.
pub(crate) struct BiasArgs {
    pub(crate) values: Handle,
    pub(crate) len: usize,
    pub(crate) heads: usize,
    pub(crate) thr_v: Handle,
    pub(crate) thr_i: Handle,
    pub(crate) thr_len: usize,
    pub(crate) has_bias: bool,
    pub(crate) has_thr: bool,
}

impl BiasArgs {
    fn new(client: &Client, p: &AttnProblem, dtype: AttnDtype, inputs: &AttnInputs) -> Self {
        let (values, len, heads) = match inputs.bias {
            Some(b) => (b.values.clone(), b.elems(p), b.heads),
            None => (dummy(client, dtype.size()), 1, p.heads_kv),
        };
        let (thr_v, thr_i, thr_len) = match inputs.bias.and_then(|b| b.threshold.as_ref()) {
            Some((tv, ti)) => (tv.clone(), ti.clone(), p.batch * heads * p.seq_q),
            None => (dummy(client, 4), dummy(client, 4), 1),
        };
        Self {
            values,
            len,
            heads,
            thr_v,
            thr_i,
            thr_len,
            has_bias: inputs.bias.is_some(),
            has_thr: inputs.bias.is_some_and(|b| b.threshold.is_some()),
        }
    }
}


#[allow(clippy::too_many_arguments)]
pub(crate) fn backward_impl<F: Float + CubeElement, M: Float>(
    client: &Client,
    p: &AttnProblem,
    dtype: AttnDtype,
    inputs: &AttnInputs,
    o: &Handle,
    lse: &Handle,
    d_o: &Handle,
    grads: &AttnGrads,
) -> Result<(), KernelError> {
    let rows = p.batch * p.heads_q * p.seq_q;
    let d = p.head_dim;
    // 1. delta = rowsum(dO * O).
    let delta = alloc(client, rows, 4);
    let (count, dim, lanes) = row_lanes_launch(client, rows, d);
    kernels::delta_kernel::launch::<F>(
        client,
        count,
        dim,
        buf(d_o, rows * d),
        buf(o, rows * d),
        buf(&delta, rows),
        rows as u32,
        d,
        dim.num_elems() as usize,
        lanes,
    );
    // Both passes walk the same sanitized schedule.
    let clean = inputs.schedule.map(|s| sanitize(client, &walk_problem(p, inputs).0, s));
    // 2. dQ (query-major).
    rows_pass::<F, M>(client, p, dtype, inputs, clean.as_ref(), Some((d_o, &delta)), lse, &grads.dq)?;
    // 3. dK, dV, dbias (key-major).
    keys_pass::<F, M>(client, p, dtype, inputs, clean.as_ref(), d_o, lse, &delta, grads)
}

/// The mask arguments of both passes, and the packed-sequence intervals (or a placeholder).
/// With packed sequences each row (key) carries its interval as its own causal offset and
/// window in the portable kernels, so both mask flags are on and the shared `off` / `w` are
/// set wide enough never to bind.
pub(crate) struct SegmentArgs {
    pub(crate) bounds: Handle,
    pub(crate) len: usize,
    pub(crate) segmented: bool,
    pub(crate) off: i32,
    pub(crate) w: i32,
    pub(crate) causal: bool,
    pub(crate) windowed: bool,
}

impl SegmentArgs {
    fn new(client: &Client, p: &AttnProblem, inputs: &AttnInputs) -> Self {
        let (off, w, windowed) = mask_params(p);
        match inputs.segments {
            Some(sb) => Self {
                bounds: sb.bounds.clone(),
                len: 2 * (p.seq_q + p.seq_k),
                segmented: true,
                off: p.seq_k as i32,
                w: i32::MAX / 4,
                causal: true,
                windowed: true,
            },
            None => Self { bounds: dummy(client, 8), len: 1, segmented: false, off, w, causal: p.causal, windowed },
        }
    }
}

/// With gathered keys ([`AttnInputs::key_positions`]) every walk is that of the non-causal
/// problem (key rows are not in sequence order); returns that problem and whether the causal
/// mask then applies to the positions.
pub(crate) fn walk_problem(p: &AttnProblem, inputs: &AttnInputs) -> (AttnProblem, bool) {
    if inputs.segments.is_some() {
        // Packed sequences: each row's own interval is its mask (see [`SegmentArgs`]); the
        // pack-wide causal offset and window would cut pairs a sequence sees (a schedule's
        // inversion filters rows by them).
        return (AttnProblem { causal: false, window: None, ..p.clone() }, false);
    }
    if inputs.key_positions.is_some() && p.causal {
        (AttnProblem { causal: false, ..p.clone() }, true)
    } else {
        (p.clone(), false)
    }
}

/// The query-major kernel: forward (`bwd = None`, writes `out = O` and `lse`) or dQ
/// (`bwd = Some((dO, delta))`, reads `lse`, writes `out = dQ`).
#[allow(clippy::too_many_arguments)]
pub(crate) fn rows_pass<F: Float + CubeElement, M: Float>(
    client: &Client,
    p: &AttnProblem,
    dtype: AttnDtype,
    inputs: &AttnInputs,
    clean: Option<&CleanSchedule>,
    bwd: Option<(&Handle, &Handle)>,
    lse: &Handle,
    out: &Handle,
) -> Result<(), KernelError> {
    let (walk, pos_causal) = walk_problem(p, inputs);
    let p = &walk;
    let plan = plan(client, p, inputs.schedule)?;
    let es = dtype.size();
    let d = p.head_dim;
    let rows = p.batch * p.heads_q * p.seq_q;
    // Packed sequences run on the portable kernels only (so far).
    let seg = SegmentArgs::new(client, p, inputs);
    let (off, w, causal, windowed, segmented) = (seg.off, seg.w, seg.causal, seg.windowed, seg.segmented);
    // Small row groups gather the rows that selected each key block on both tensor-core
    // paths (see `gather`); the portable kernels take one list per cube.
    let gather_sched = match (inputs.schedule, clean) {
        (Some(s), Some(cs)) if gather::gathers(p, s) => Some((s, cs)),
        _ => None,
    };
    // A pairwise bias (an `Sq x Sk` input) runs on the portable kernels everywhere.
    let pair = inputs.bias.is_some_and(|b| b.pairwise);
    let mma = mma_spec(client, dtype, d).filter(|_| !segmented && !pair).and_then(|spec| {
        mma_rows_plan(client, p, inputs.schedule, &spec, bwd.is_some(), gather_sched.is_some()).map(|mp| (spec, mp))
    });
    let units = mma.map_or(plan.rows_units, |(_, mp)| 16 * mp.planes);

    let bias = BiasArgs::new(client, p, dtype, inputs);
    let kpos_dummy = dummy(client, 4);
    let (kpos_h, kpos_len) = match inputs.key_positions {
        Some(h) => (h, p.batch * p.heads_kv * p.seq_k),
        None => (&kpos_dummy, 1),
    };

    let sched_dummy;
    // (sched handle, len, group heads, query block, row blocks, chunks, cap, key block)
    let (sched_h, sched_len, gh, qb, n_rb, n_chunks, cap, kb) = match (inputs.schedule, clean) {
        (Some(s), Some(clean)) => {
            let gh = p.heads_q / s.sel_heads;
            let n_chunks = (gh * s.query_block).div_ceil(units);
            let len = p.batch * s.sel_heads * clean.n_rows * s.capacity;
            (&clean.clean, len, gh, s.query_block, clean.n_rows, n_chunks, s.capacity, s.key_block)
        }
        _ => {
            sched_dummy = dummy(client, 4);
            (&sched_dummy, 1, 1, units, p.seq_q.div_ceil(units), 1, 1, 1)
        }
    };
    let n_cubes = p.batch * (p.heads_q / gh) * n_rb * n_chunks;
    let shape = RowsShape {
        n_batch: p.batch,
        heads_q: p.heads_q,
        heads_kv: p.heads_kv,
        seq_q: p.seq_q,
        seq_k: p.seq_k,
        heads_b: bias.heads,
        group_heads: gh,
        query_block: qb,
        n_row_blocks: n_rb,
        n_chunks,
        cap,
        key_block: kb,
        n_kb: 1,
        off,
        w,
        scale: p.scale,
    };

    let dummy_do;
    let dummy_delta;
    let (do_h, do_len, delta_h, delta_len) = match bwd {
        Some((dh, delta)) => (dh, rows * d, delta, rows),
        None => {
            dummy_do = dummy(client, es);
            dummy_delta = dummy(client, 4);
            (&dummy_do, 1, &dummy_delta, 1)
        }
    };

    let aligned = vector_aligned(&[inputs.q, inputs.k, inputs.v]) && bwd.is_none_or(|(dh, _)| vector_aligned(&[dh]));
    let kv_len = p.batch * p.heads_kv * p.seq_k * d;
    if aligned && !segmented && !pair && fragment_supported(client, dtype, d) {
        let mut cfg = fragment_rows_config(p, inputs, &bias, bwd.is_some());
        cfg.pos_causal = pos_causal;
        let gathered = gather_sched.map(|(s, cs)| {
            cfg.planes = 4;
            cfg.blocks = false;
            cfg.gathered = true;
            GatherLaunch::new(client, p, s, cs, 16 * cfg.planes, bwd.is_none())
        });
        let rows_per_cube = 16 * cfg.planes;
        // Dense: row groups of one head, `rows_per_cube` queries each. Gathered: `n_chunks`
        // counts tiles per list.
        let (qb_f, n_rb_f, n_chunks_f) = match (inputs.schedule, &gathered) {
            (Some(_), Some(gl)) => (qb, n_rb, gl.g.max_tiles),
            (Some(_), None) => (qb, n_rb, (gh * qb).div_ceil(rows_per_cube)),
            (None, _) => (rows_per_cube, p.seq_q.div_ceil(rows_per_cube), 1),
        };
        let n_cubes_f = match &gathered {
            Some(_) => p.batch * (p.heads_q / gh) * n_chunks_f,
            None => p.batch * (p.heads_q / gh) * n_rb_f * n_chunks_f,
        };
        let count = grid(client, n_cubes_f);
        let dim = CubeDim::new_2d(32, cfg.planes as u32);
        let gather_dummy = dummy(client, 8);
        let [inv_off_a, inv_rows_a, work_a, part_a, part_lse_a] = GatherLaunch::args(gathered.as_ref(), p, &gather_dummy);
        let n_kb = gathered.as_ref().map_or(1, |gl| gl.cs.nkb);
        let frag_shape = RowsShape { query_block: qb_f, n_row_blocks: n_rb_f, n_chunks: n_chunks_f, n_kb, ..shape };
        match bwd {
            None => fragment::forward::fragment_forward_kernel::launch::<F>(
                client,
                count,
                dim,
                buf(inputs.q, rows * d),
                buf(inputs.k, kv_len),
                buf(inputs.v, kv_len),
                buf(&bias.values, bias.len),
                buf(&bias.thr_v, bias.thr_len),
                buf(&bias.thr_i, bias.thr_len),
                buf(kpos_h, kpos_len),
                buf(sched_h, sched_len),
                inv_off_a,
                inv_rows_a,
                work_a,
                buf(lse, rows),
                buf(out, rows * d),
                part_a,
                part_lse_a,
                frag_shape.arg(),
                cfg,
            ),
            Some(_) => fragment::dq::fragment_dq_kernel::launch::<F>(
                client,
                count,
                dim,
                buf(inputs.q, rows * d),
                buf(inputs.k, kv_len),
                buf(inputs.v, kv_len),
                buf(&bias.values, bias.len),
                buf(&bias.thr_v, bias.thr_len),
                buf(&bias.thr_i, bias.thr_len),
                buf(kpos_h, kpos_len),
                buf(sched_h, sched_len),
                inv_off_a,
                inv_rows_a,
                work_a,
                buf(do_h, do_len),
                buf(delta_h, delta_len),
                buf(lse, rows),
                buf(out, rows * d),
                part_a,
                frag_shape.arg(),
                cfg,
            ),
        }
        if let Some(gl) = &gathered {
            gl.merge::<F>(client, p, out, bwd.is_none().then_some(lse));
        }
        return Ok(());
    }
    match mma {
        Some((spec, mp)) => {
            let gathered = gather_sched.map(|(s, cs)| GatherLaunch::new(client, p, s, cs, 16 * mp.planes, bwd.is_none()));
            let gather_dummy = dummy(client, 8);
            let [inv_off_a, inv_rows_a, work_a, part_a, part_lse_a] = GatherLaunch::args(gathered.as_ref(), p, &gather_dummy);
            let (mma_shape, n_cubes_m) = match &gathered {
                Some(gl) => (
                    RowsShape { n_chunks: gl.g.max_tiles, n_kb: gl.cs.nkb, ..shape },
                    p.batch * (p.heads_q / gh) * gl.g.max_tiles,
                ),
                None => (shape, n_cubes),
            };
            mma::mma_rows_kernel::launch::<F, M>(
                client,
                grid(client, n_cubes_m),
                CubeDim::new_2d(spec.plane as u32, mp.planes as u32),
                buf(inputs.q, rows * d),
                buf(inputs.k, kv_len),
                buf(inputs.v, kv_len),
                buf(&bias.values, bias.len),
                buf(&bias.thr_v, bias.thr_len),
                buf(&bias.thr_i, bias.thr_len),
                buf(sched_h, sched_len),
                inv_off_a,
                inv_rows_a,
                work_a,
                buf(do_h, do_len),
                buf(delta_h, delta_len),
                buf(lse, rows),
                buf(out, rows * d),
                part_a,
                part_lse_a,
                mma_shape.arg(),
                mp.planes,
                spec.plane / 16,
                d,
                mp.tile,
                spec.mk,
                dtype == AttnDtype::BF16,
                p.causal,
                windowed,
                bias.has_bias,
                bias.has_thr,
                inputs.schedule.is_some() && gathered.is_none(),
                gathered.is_some(),
                bwd.is_some(),
            );
            if let Some(gl) = &gathered {
                gl.merge::<F>(client, p, out, bwd.is_none().then_some(lse));
            }
        }
        None => {
            let software = caps::software_device(client);
            if software {
                // The longest walk: every entry's keys, or (dense) the visible keys of a cube.
                let tiles = match inputs.schedule {
                    Some(s) => cap * s.key_block.min(p.seq_k).div_ceil(plan.tile_k),
                    None if windowed => (w.max(0) as usize + units).min(p.seq_k).div_ceil(plan.tile_k),
                    None => p.seq_k.div_ceil(plan.tile_k),
                };
                crate::loop_budget::check_rows_walk(p, tiles, plan.tile_k, units)?;
            }
            kernels::attn_rows_kernel::launch::<F>(
                client,
                grid(client, n_cubes),
                CubeDim::new_1d(units as u32),
                buf(inputs.q, rows * d),
                buf(inputs.k, kv_len),
                buf(inputs.v, kv_len),
                buf(&bias.values, bias.len),
                buf(&bias.thr_v, bias.thr_len),
                buf(&bias.thr_i, bias.thr_len),
                buf(sched_h, sched_len),
                buf(do_h, do_len),
                buf(delta_h, delta_len),
                buf(lse, rows),
                buf(out, rows * d),
                shape.portable_arg(d, plan.tile_k),
                units,
                d,
                plan.tile_k,
                causal,
                windowed,
                bias.has_bias,
                bias.has_thr,
                inputs.schedule.is_some(),
                bwd.is_some(),
                buf(&seg.bounds, seg.len),
                segmented,
                pair,
                software,
            )
        }
    }
    Ok(())
}

/// A gathered query-major pass (see [`gather`]): the inverted schedule it walks, its tile
/// offsets and partial buffers, and the merge after it. Both tensor-core paths use it.
struct GatherLaunch<'a> {
    s: &'a BlockSchedule,
    cs: &'a CleanSchedule,
    inv: &'a crate::schedule::Inverted,
    g: gather::Gathered,
}

impl<'a> GatherLaunch<'a> {
    /// Prepares a pass with `bq` rows per cube (`forward`: partial LSEs too).
    fn new(client: &Client, p: &AttnProblem, s: &'a BlockSchedule, cs: &'a CleanSchedule, bq: usize, forward: bool) -> Self {
        let inv = cs.inverted(client, p, s);
        let g = gather::prepare(client, p, s, cs, inv, bq, forward);
        Self { s, cs, inv, g }
    }

    /// The kernels' gathering buffers (inverted offsets, inverted rows, tile offsets,
    /// partials, partial LSEs), or placeholders over `dummy` when not gathering.
    fn args(this: Option<&Self>, p: &AttnProblem, dummy: &Handle) -> [BufferArg; 5] {
        match this {
            Some(gl) => {
                let n_bs = p.batch * gl.s.sel_heads;
                let slots = p.batch * p.heads_q * p.seq_q * gl.s.capacity;
                [
                    buf(&gl.inv.offsets, n_bs * (gl.cs.nkb + 1)),
                    buf(&gl.inv.rows, n_bs * gl.cs.n_rows * gl.s.capacity),
                    buf(&gl.g.work_off, n_bs * (gl.cs.nkb + 1)),
                    buf(&gl.g.part, slots * p.head_dim),
                    buf(&gl.g.part_lse, if gl.g.has_lse { slots } else { 1 }),
                ]
            }
            None => std::array::from_fn(|_| buf(dummy, 1)),
        }
    }

    /// Merges the partials into `out` (and `lse` for the forward).
    fn merge<F: Float + CubeElement>(&self, client: &Client, p: &AttnProblem, out: &Handle, lse: Option<&Handle>) {
        match lse {
            Some(lse) => gather::merge_forward::<F>(client, p, self.s, self.cs, &self.g, out, lse),
            None => gather::sum_dq::<F>(client, p, self.s, self.cs, &self.g, out),
        }
    }
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn keys_pass<F: Float + CubeElement, M: Float>(
    client: &Client,
    p: &AttnProblem,
    dtype: AttnDtype,
    inputs: &AttnInputs,
    clean: Option<&CleanSchedule>,
    d_o: &Handle,
    lse: &Handle,
    delta: &Handle,
    grads: &AttnGrads,
) -> Result<(), KernelError> {
    let (walk, pos_causal) = walk_problem(p, inputs);
    let p = &walk;
    let plan = plan(client, p, inputs.schedule)?;
    let d = p.head_dim;
    let rows = p.batch * p.heads_q * p.seq_q;
    let kv_len = p.batch * p.heads_kv * p.seq_k * d;
    // Packed sequences run on the portable kernels only (so far).
    let seg = SegmentArgs::new(client, p, inputs);
    let (off, w, causal, windowed, segmented) = (seg.off, seg.w, seg.causal, seg.windowed, seg.segmented);
    // A pairwise bias (an `Sq x Sk` input) runs on the portable kernels everywhere.
    let pair = inputs.bias.is_some_and(|b| b.pairwise);
    let mma = mma_spec(client, dtype, d)
        .filter(|_| !segmented && !pair)
        .and_then(|spec| mma_keys_plan(client, p, inputs.schedule, &spec).map(|mp| (spec, mp)));
    let bias = BiasArgs::new(client, p, dtype, inputs);
    let kpos_dummy = dummy(client, 4);
    let (kpos_h, kpos_len) = match inputs.key_positions {
        Some(h) => (h, p.batch * p.heads_kv * p.seq_k),
        None => (&kpos_dummy, 1),
    };
    let frag = (!segmented && !pair && vector_aligned(&[inputs.q, inputs.k, inputs.v, d_o]) && fragment_supported(client, dtype, d))
        .then(|| fragment::FragmentConfig { pos_causal, ..fragment_keys_config(p, inputs, &bias) });
    let units = match (frag, mma) {
        (Some(cfg), _) => 16 * cfg.planes,
        (None, Some((_, mp))) => 16 * mp.planes,
        (None, None) => plan.keys_units,
    };

    let off_dummy;
    let rows_dummy;
    // (offsets, offsets len, rows, rows len, sel heads, query block, row blocks, cap,
    //  key block, n_sub, n_key_tiles)
    let (off_h, off_len, rows_h, rows_len, hs, qb, n_rb, cap, kb, n_sub, n_kt) = match (inputs.schedule, clean) {
        (Some(s), Some(cs)) => {
            let inv = cs.inverted(client, p, s);
            let n_bs = p.batch * s.sel_heads;
            let n_sub = s.key_block.div_ceil(units);
            (
                &inv.offsets,
                n_bs * (cs.nkb + 1),
                &inv.rows,
                n_bs * cs.n_rows * s.capacity,
                s.sel_heads,
                s.query_block,
                cs.n_rows,
                s.capacity,
                s.key_block,
                n_sub,
                cs.nkb * n_sub,
            )
        }
        _ => {
            off_dummy = dummy(client, 4);
            rows_dummy = dummy(client, 4);
            (&off_dummy, 1, &rows_dummy, 1, p.heads_q, 1, p.seq_q, 1, units, 1, p.seq_k.div_ceil(units))
        }
    };
    let args = KeysShape {
        n_batch: p.batch,
        heads_q: p.heads_q,
        heads_kv: p.heads_kv,
        seq_q: p.seq_q,
        seq_k: p.seq_k,
        heads_b: bias.heads,
        heads_s: hs,
        query_block: qb,
        n_row_blocks: n_rb,
        cap,
        key_block: kb,
        n_sub,
        n_key_tiles: n_kt,
        n_split: 1,
        off,
        w,
        scale: p.scale,
    };
    let tile_rows = match (frag, mma) {
        (Some(cfg), _) => cfg.tile,
        (None, Some((_, mp))) => mp.tile,
        (None, None) => plan.tile_q,
    };
    if let Some(cfg) = frag {
        // Register fragments: the walks cut into pieces of similar length.
        let shape = KeyWalkShape { keys: args, bk: 16 * cfg.planes, tile_q: cfg.tile };
        let sched = match (inputs.schedule, clean) {
            (Some(s), Some(cs)) => Some((cs, cs.inverted(client, p, s))),
            _ => None,
        };
        let pieces = key_pieces::plan_pieces(client, p, &shape, sched, bias.has_bias);
        let db_dummy = dummy(client, 4);
        let (db_out, db_len) = match &grads.dbias {
            Some(h) => (h, p.batch * bias.heads * p.seq_k),
            None => (&db_dummy, 1),
        };
        let part = pieces.max_pieces * shape.bk;
        fragment::dkdv::fragment_dkdv_kernel::launch::<F>(
            client,
            grid(client, pieces.max_pieces),
            CubeDim::new_2d(32, cfg.planes as u32),
            buf(inputs.q, rows * d),
            buf(inputs.k, kv_len),
            buf(inputs.v, kv_len),
            buf(&bias.values, bias.len),
            buf(&bias.thr_v, bias.thr_len),
            buf(&bias.thr_i, bias.thr_len),
            buf(kpos_h, kpos_len),
            buf(off_h, off_len),
            buf(rows_h, rows_len),
            buf(&pieces.first, pieces.n_items + 1),
            buf(&pieces.tile_of, pieces.max_pieces),
            buf(d_o, rows * d),
            buf(lse, rows),
            buf(delta, rows),
            buf(&pieces.dk, part * d),
            buf(&pieces.dv, part * d),
            buf(&pieces.db, if bias.has_bias { part * (bias.heads / p.heads_kv) } else { 1 }),
            buf(&grads.dk, kv_len),
            buf(&grads.dv, kv_len),
            buf(db_out, db_len),
            args.arg(),
            cfg,
        );
        key_pieces::sum_pieces::<F>(client, p, &shape, &pieces, inputs.key_positions, grads, inputs.schedule.is_some());
        return Ok(());
    }
    let mut n_split = key_splits(p.batch * p.heads_kv * n_kt, kv_len, p.seq_q.div_ceil(tile_rows), inputs.schedule.is_some());
    let software = caps::software_device(client);
    if mma.is_none() && software {
        n_split = crate::loop_budget::keys_split(p, p.heads_q / p.heads_kv, p.seq_q.div_ceil(tile_rows), tile_rows, units, n_split)?;
    }
    let n_cubes = p.batch * p.heads_kv * n_kt * n_split;
    let dk_parts = alloc(client, n_split * kv_len, 4);
    let dv_parts = alloc(client, n_split * kv_len, 4);
    // A pairwise bias: dS per (query head, row, key), each written once by the cube of its
    // key (pairs no cube walks stay 0), then summed over each bias head's query heads.
    let db_len = if pair { rows * p.seq_k } else { n_split * bias.len };
    let db_parts = alloc(client, db_len, 4);
    if pair {
        let (count, dim) = per_unit_launch(client, db_len);
        kernels::zero_f32_kernel::launch(client, count, dim, buf(&db_parts, db_len), db_len as u32);
    }
    // Both paths take the same runtime arguments and mask flags; only the launch, the cube
    // shape and the tiling constants differ.
    macro_rules! launch {
        ($kernel:path, $dim:expr, $arg:expr, [$($tiling:expr),*], [$($extra:expr),*]) => {
            $kernel(
                client,
                grid(client, n_cubes),
                $dim,
                buf(inputs.q, rows * d),
                buf(inputs.k, kv_len),
                buf(inputs.v, kv_len),
                buf(&bias.values, bias.len),
                buf(&bias.thr_v, bias.thr_len),
                buf(&bias.thr_i, bias.thr_len),
                buf(off_h, off_len),
                buf(rows_h, rows_len),
                buf(d_o, rows * d),
                buf(lse, rows),
                buf(delta, rows),
                buf(&dk_parts, n_split * kv_len),
                buf(&dv_parts, n_split * kv_len),
                buf(&db_parts, db_len),
                $arg,
                $($tiling,)*
                causal,
                windowed,
                bias.has_bias,
                bias.has_thr,
                inputs.schedule.is_some(),
                $($extra,)*
            )
        };
    }
    match mma {
        Some((spec, mp)) => launch!(
            mma::mma_keys_kernel::launch::<F, M>,
            CubeDim::new_2d(spec.plane as u32, mp.planes as u32),
            KeysShape { n_split, ..args }.arg(),
            [mp.planes, spec.plane / 16, d, mp.tile, spec.mk, dtype == AttnDtype::BF16],
            []
        ),
        None => launch!(
            kernels::attn_keys_kernel::launch::<F>,
            CubeDim::new_1d(units as u32),
            KeysShape { n_split, ..args }.portable_arg(d, plan.tile_q),
            [units, d, plan.tile_q],
            [buf(&seg.bounds, seg.len), segmented, pair, software]
        ),
    }
    let mut outs = vec![(&dk_parts, &grads.dk, kv_len), (&dv_parts, &grads.dv, kv_len)];
    match &grads.dbias {
        Some(dbias) if pair => {
            let (count, dim) = per_unit_launch(client, bias.len);
            kernels::sum_head_groups_kernel::launch::<F>(
                client,
                count,
                dim,
                buf(&db_parts, db_len),
                buf(dbias, bias.len),
                bias.len as u32,
                (p.heads_q / bias.heads) as u32,
                (p.seq_q * p.seq_k) as u32,
            );
        }
        Some(dbias) => outs.push((&db_parts, dbias, bias.len)),
        None => {}
    }
    for (parts, out, n) in outs {
        let (count, dim) = per_unit_launch(client, n);
        kernels::sum_partials_kernel::launch::<F>(
            client,
            count,
            dim,
            buf(parts, n_split * n),
            buf(out, n),
            n as u32,
            n_split as u32,
        );
    }
    Ok(())
}
