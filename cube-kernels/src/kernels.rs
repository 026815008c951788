//! The `#[cube]` kernels (portable path: no plane ops, no cmma, no atomics).
//!
//! Conventions shared by every kernel here:
//! - buffers are flat, contiguous, row-major slices; offsets are computed by hand;
//! - grids may be larger than 65535 cubes, so every kernel linearises its cube position
//!   (`CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X`) and ignores cubes past the end;
//! - all accumulation is in f32, whatever the storage type `F`;
//! - an absent optional input (bias, threshold, schedule) is passed as a 1-element dummy
//!   buffer together with a `#[comptime]` flag that disables every read of it.

use cubecl::prelude::*;
use crate::args::{KeysArgs, RowsArgs};
use crate::key_pieces::{head_walk, key_tile};
use crate::row_walk::{entry_tiles, row_entries, row_stats};
use crate::key_walk::{any_in_cube, chunk_rows, chunk_slots, key_cube, stage_chunk_rows};

/// Finite stand-in for -inf inside kernels. WGSL has no infinity literal, and its
/// arithmetic on infinities is indeterminate, so masked scores and the initial running max
/// use this value and are skipped explicitly; a true -inf (for the LSE of an empty row)
/// only ever arrives as a runtime scalar and is stored, never computed with.
pub const NEG_BIG: f32 = -1.0e30;

/// Linear cube index over a 2-D grid (x fastest).
#[cube]
pub(crate) fn cube_linear() -> usize {
    (CUBE_POS_Y as usize) * (CUBE_COUNT_X as usize) + (CUBE_POS_X as usize)
}

/// Linear unit index over a 2-D grid of 1-D cubes: the item of one-unit-per-item kernels.
#[cube]
pub(crate) fn unit_linear() -> usize {
    cube_linear() * (CUBE_DIM as usize) + UNIT_POS as usize
}

/// The bound of a per-unit loop over `n` (head dim, tile, cube size): `n` itself, a constant
/// GPU compilers unroll, or on a software device (`rolled`) the same value read at run time.
/// Mesa's llvmpipe fully unrolls short constant loops, nested ones too: the head-dim-32 dQ
/// kernel took minutes to compile that way and takes about a second with runtime bounds
/// (docs/testing.md §5).
#[cube]
pub(crate) fn loop_bound(#[comptime] n: usize, rt: u32, #[comptime] rolled: bool) -> usize {
    if rolled { rt as usize } else { n.runtime() }
}

/// Head dims per iteration of the portable kernels' head-dim loops: 4 on a software
/// device, 1 elsewhere. llvmpipe counts every loop iteration of an invocation against one
/// limit of 65 535 and silently leaves the loop past it (its `looplimiter`): head-dim loops
/// nested in a walk over key tiles reach it after about 15 tiles at head dim 64 when each
/// iteration takes one dim; four per iteration give four times the walk.
pub(crate) fn dim_step(head_dim: usize, rolled: bool) -> usize {
    if rolled && head_dim.is_multiple_of(4) { 4 } else { 1 }
}

/// Whether query `i` may see key `j`: causal (bottom-right aligned, `off = Sk - Sq`)
/// `j <= i + off`, window `j > i + off - w`.
#[cube]
pub(crate) fn pair_visible(
    i: usize,
    j: usize,
    off: i32,
    w: i32,
    #[comptime] causal: bool,
    #[comptime] windowed: bool,
) -> bool {
    let d = i as i32 + off - j as i32;
    let mut ok = true;
    if causal {
        ok = d >= 0;
    }
    if windowed {
        ok = ok && d < w;
    }
    ok
}

/// Keys `[lo, hi)` of entry `e` of a query-major walk: a block list's entry clipped to the
/// cube's visible range `[klo, khi)` (empty, `hi <= lo`, for an unused `-1` slot or a block
/// outside it); without a block list, the one pseudo-entry that is the whole range.
#[cube]
#[allow(clippy::too_many_arguments)]
pub(crate) fn entry_keys(
    sched: &[i32],
    list_base: usize,
    e: usize,
    klo: i32,
    khi: i32,
    key_block: usize,
    seq_k: usize,
    #[comptime] blocks: bool,
) -> (i32, i32) {
    let mut lo = klo;
    let mut hi = khi;
    if blocks {
        let kb = sched[list_base + e];
        if kb >= 0 {
            lo = max(lo, kb * key_block as i32);
            hi = min(hi, min((kb + 1) * key_block as i32, seq_k as i32));
        } else {
            hi = lo;
        }
    }
    (lo, hi)
}

/// Whether some pair of queries in `[qlo, qhi]` and keys in `[klo, khi]` (inclusive) is
/// visible. `d = i + off - j` covers every integer of `[qlo+off-khi, qhi+off-klo]`.
#[cube]
pub(crate) fn range_visible(
    qlo: usize,
    qhi: usize,
    klo: usize,
    khi: usize,
    off: i32,
    w: i32,
    #[comptime] causal: bool,
    #[comptime] windowed: bool,
) -> bool {
    let dmin = qlo as i32 + off - khi as i32;
    let dmax = qhi as i32 + off - klo as i32;
    let mut ok = true;
    if causal {
        ok = dmax >= 0;
    }
    if windowed {
        ok = ok && dmin < w;
    }
    ok
}

/// The query of slot `slot` in a key tile's walk over query rows: dense, the `slot`-th query
/// from `qa`; blocks, query `slot % qb` of the `slot / qb`-th schedule row of the inverted
/// list at `rows_base` (`-1` past the end of the sequence).
#[cube]
pub(crate) fn slot_query(
    inv_rows: &[i32],
    rows_base: usize,
    slot: usize,
    qb: usize,
    qa: usize,
    seq_q: usize,
    #[comptime] blocks: bool,
) -> i32 {
    let mut qi = comptime!(-1i32).runtime();
    if blocks {
        // `qa` skips the slots a walk leaves out at its start (see `key_pieces::head_walk`).
        let sl = qa + slot;
        let rr = inv_rows[rows_base + sl / qb] as usize;
        let qq = rr * qb + sl % qb;
        if qq < seq_q {
            qi = qq as i32;
        }
    } else {
        qi = (qa + slot) as i32;
    }
    qi
}

/// Dynamic-mask keep rule: `bias > thr || (bias == thr && j >= thr_idx)`.
#[cube]
pub(crate) fn key_kept(bias: f32, j: usize, thr: f32, thr_idx: i32) -> bool {
    bias > thr || (bias == thr && j as i32 >= thr_idx)
}

// ---------------------------------------------------------------------------------------
// Schedule preparation
// ---------------------------------------------------------------------------------------

/// One unit per index list: copy the valid entries (`0 <= idx < nkb`) of `indices` into
/// `clean`, sorted ascending with duplicates removed, padded with -1. Out-of-range entries
/// are ignored. Insertion sort in global memory: lists are short (tens to a few hundred).
#[cube(launch)]
pub fn sanitize_schedule_kernel(
    indices: &[i32],
    clean: &mut [i32],
    n_lists: u32,
    cap: u32,
    nkb: u32,
) {
    let l = unit_linear();
    if l < n_lists as usize {
        let c = cap as usize;
        let base = l * c;
        let mut n = 0usize;
        for e in 0..c {
            let v = indices[base + e];
            if v >= 0 && v < nkb as i32 {
                let mut dup = false;
                for t in 0..n {
                    if clean[base + t] == v {
                        dup = true;
                    }
                }
                if !dup {
                    let mut k = n;
                    loop {
                        if k == 0 {
                            break;
                        }
                        let prev = clean[base + k - 1];
                        if prev < v {
                            break;
                        }
                        clean[base + k] = prev;
                        k -= 1;
                    }
                    clean[base + k] = v;
                    n += 1;
                }
            }
        }
        for e in n..c {
            clean[base + e] = -1i32;
        }
    }
}

/// Inverted schedule: exclusive prefix sum of the per-block counts of each
/// (batch, selection head), one unit each; `offsets` has `nkb + 1` entries per list.
#[cube(launch)]
pub fn prefix_sum_kernel(counts: &[i32], offsets: &mut [i32], n_lists: u32, nkb: u32) {
    let l = unit_linear();
    if l < n_lists as usize {
        let nk = nkb as usize;
        let mut acc = 0i32;
        for kb in 0..nk {
            offsets[l * (nk + 1) + kb] = acc;
            acc += counts[l * nk + kb];
        }
        offsets[l * (nk + 1) + nk] = acc;
    }
}

/// Backward preprocessing: `delta[row] = sum_d dO[row, d] * O[row, d]` (f32).
///
/// `lanes` units share a row and read its elements `lane, lane + lanes, ...`, so that
/// neighbouring units read neighbouring addresses; their partial sums meet in shared memory.
/// (With one unit per row the units of a plane read addresses `head_dim` elements apart: 1.06
/// ms at 16k, Hq 64, d 128 on the H200, where the rows are 268 MB.) A cube holds
/// `units / lanes` rows.
#[cube(launch)]
pub fn delta_kernel<F: Float>(
    d_o: &[F],
    o: &[F],
    delta: &mut [f32],
    n_rows: u32,
    #[comptime] head_dim: usize,
    #[comptime] units: usize,
    #[comptime] lanes: usize,
) {
    let u = UNIT_POS as usize;
    let lane = u % lanes;
    let row = cube_linear() * (units / lanes) + u / lanes;
    let mut part = Shared::<[f32]>::new_slice(units);
    let mut acc = 0.0f32;
    if row < n_rows as usize {
        let base = row * head_dim;
        let mut d = lane;
        while d < head_dim {
            acc += f32::cast_from(d_o[base + d]) * f32::cast_from(o[base + d]);
            d += lanes;
        }
    }
    part[u] = acc;
    sync_cube();
    if lane == 0 && row < n_rows as usize {
        let mut sum = 0.0f32;
        for l in 0..lanes {
            sum += part[u + l];
        }
        delta[row] = sum;
    }
}

/// `out[i] = sum_z parts[z * n + i]` in `F`: reduces (or, with one split, converts) the f32
/// partial dK / dV / dbias of the key-major pass. One unit per element.
#[cube(launch)]
pub fn sum_partials_kernel<F: Float>(parts: &[f32], out: &mut [F], n: u32, n_split: u32) {
    let i = unit_linear();
    if i < n as usize {
        let mut acc = 0.0f32;
        for z in 0..n_split as usize {
            acc += parts[z * n as usize + i];
        }
        out[i] = F::cast_from(acc);
    }
}

/// `out[o] = sum_g parts[(o / inner) * group + g) * inner + o % inner]` in `F`: the pairwise
/// bias gradient, dS per query head summed over the `group` query heads of each bias head
/// (`inner = Sq * Sk`). One unit per output element.
#[cube(launch)]
pub fn sum_head_groups_kernel<F: Float>(parts: &[f32], out: &mut [F], n: u32, group: u32, inner: u32) {
    let o = unit_linear();
    if o < n as usize {
        let inn = inner as usize;
        let g = group as usize;
        let base = (o / inn) * g * inn + o % inn;
        let mut acc = 0.0f32;
        for x in 0..g {
            acc += parts[base + x * inn];
        }
        out[o] = F::cast_from(acc);
    }
}

/// `buf[i] = 0` for `i < n`. One unit per element.
#[cube(launch)]
pub fn zero_f32_kernel(buf: &mut [f32], n: u32) {
    let i = unit_linear();
    if i < n as usize {
        buf[i] = 0.0f32;
    }
}

// ---------------------------------------------------------------------------------------
// Query-major kernel: forward, and dQ of the backward
// ---------------------------------------------------------------------------------------

/// Query-major attention: one unit per query row (its q row and accumulator in local
/// arrays), K/V tiles of `tile_k` keys staged through shared memory by the whole cube.
///
/// Cubes: a "row group" is a set of (query head, query) rows that share one list of key
/// tiles: `group_heads` consecutive query heads x the queries `[r*query_block, ...)` of one
/// schedule row `r` (dense: `group_heads = 1`, `query_block` = the cube width). A group is
/// split into `n_chunks` cubes of `CUBE_DIM` rows. Linear cube id =
/// `((b * n_groups_h + gh) * n_row_blocks + r) * n_chunks + chunk`.
///
/// The key tiles: dense: `[klo, khi)`, the union of the visible ranges of the cube's rows,
/// in tiles of `tile_k`; blocks: every (sanitized, ascending) selected block of the
/// group's list, cut into tiles of `tile_k` and clipped to the same union range. Before a
/// tile is loaded each unit checks whether its row keeps any key of it (masks and
/// dynamic-mask threshold); the cube skips the tile when no row does.
///
/// `backward = false`: writes `out = O` (in `F`) and `lse`. `backward = true`: reads
/// `lse` and `delta`, `d_o`, writes `out = dQ`.
#[cube(launch)]
pub fn attn_rows_kernel<F: Float>(
    q: &[F],
    k: &[F],
    v: &[F],
    bias: &[F],
    thr_v: &[f32],
    thr_i: &[i32],
    sched: &[i32],
    d_o: &[F],
    delta: &[f32],
    lse: &mut [f32],
    out: &mut [F],
    a: RowsArgs,
    #[comptime] units: usize,
    #[comptime] head_dim: usize,
    #[comptime] tile_k: usize,
    #[comptime] causal: bool,
    #[comptime] windowed: bool,
    #[comptime] has_bias: bool,
    #[comptime] has_thr: bool,
    #[comptime] blocks: bool,
    #[comptime] backward: bool,
    seg_bounds: &[i32],
    #[comptime] segmented: bool,
    #[comptime] pair_bias: bool,
    #[comptime] rolled: bool,
) {
    let off = a.off;
    let w = a.w;
    let scale = a.scale;
    let neg_inf = a.neg_inf;
    let n_batch = a.n_batch as usize;
    let heads_q = a.heads_q as usize;
    let heads_kv = a.heads_kv as usize;
    let seq_q = a.seq_q as usize;
    let seq_k = a.seq_k as usize;
    let heads_b = a.heads_b as usize;
    let gh = a.group_heads as usize;
    let qb = a.query_block as usize;
    let n_rb = a.n_row_blocks as usize;
    let n_chunks = a.n_chunks as usize;
    let cap = a.cap as usize;
    let key_block = a.key_block as usize;
    let n_gh = heads_q / gh;

    // Per-unit loop bounds (constants unless `rolled`: see `loop_bound`); head-dim loops
    // take `d_step` dims per iteration (see `dim_step`).
    let d_step = comptime!(dim_step(head_dim, rolled));
    let n_d = loop_bound(comptime!(head_dim / d_step), a.loop_dim / comptime!(d_step as u32), rolled);
    let n_t = loop_bound(tile_k, a.loop_tile, rolled);
    let n_u = loop_bound(units, CUBE_DIM, rolled);
    let u = UNIT_POS as usize;
    let cid = cube_linear();
    let n_cubes = n_batch * n_gh * n_rb * n_chunks;

    let mut k_s = Shared::<[f32]>::new_slice(tile_k * head_dim);
    let mut v_s = Shared::<[f32]>::new_slice(tile_k * head_dim);
    let mut flag_s = Shared::<[u32]>::new_slice(units);

    if cid < n_cubes {
        let chunk = cid % n_chunks;
        let r = (cid / n_chunks) % n_rb;
        let g = (cid / (n_chunks * n_rb)) % n_gh;
        let b = cid / (n_chunks * n_rb * n_gh);

        // This group's rows: heads [g*gh, (g+1)*gh) x queries [q0, q0 + nq).
        let q0 = r * qb;
        let nq = min(qb, seq_q - q0);
        let n_group_rows = gh * nq;
        let f0 = chunk * units;
        let f1 = min(f0 + units, n_group_rows) - 1;
        // Union query range of the cube (uniform).
        let mut cq_lo = q0;
        let mut cq_hi = q0 + nq - 1;
        if f0 / nq == f1 / nq {
            cq_lo = q0 + f0 % nq;
            cq_hi = q0 + f1 % nq;
        }
        // Union visible key range [klo, khi).
        let mut klo = 0i32;
        let mut khi = seq_k as i32;
        if causal {
            khi = min(khi, cq_hi as i32 + off + 1);
        }
        if windowed {
            klo = max(klo, cq_lo as i32 + off - w + 1);
        }
        if segmented {
            // Packed sequences: the intervals are nondecreasing, so the first and last row
            // of the cube bound the keys of all of them.
            klo = max(klo, seg_bounds[2 * cq_lo]);
            khi = min(khi, seg_bounds[2 * cq_hi + 1]);
        }

        // This unit's row.
        let flat = f0 + u;
        let row_valid = flat < n_group_rows;
        let mut h = g * gh;
        let mut i = q0;
        if row_valid {
            h = g * gh + flat / nq;
            i = q0 + flat % nq;
        }
        let hk = h / (heads_q / heads_kv);
        let hb = h / (heads_q / heads_b);
        let row = (b * heads_q + h) * seq_q + i;
        let kv_base = (b * heads_kv + hk) * seq_k * head_dim;
        // A pairwise bias has a row per query: the row's `bias_base + j` is its own bias.
        let mut bias_base = (b * heads_b + hb) * seq_k;
        if pair_bias {
            bias_base = ((b * heads_b + hb) * seq_q + i) * seq_k;
        }

        let mut q_r = Array::<f32>::new(head_dim);
        let mut acc = Array::<f32>::new(head_dim);
        let mut do_r = Array::<f32>::new(head_dim);
        let mut sc = Array::<f32>::new(tile_k);
        for d4 in 0..n_d {
            #[unroll]
            for dz in 0..d_step {
                let d = d4 * d_step + dz;
                acc[d] = 0.0f32;
                q_r[d] = 0.0f32;
                do_r[d] = 0.0f32;
            }
        }
        let st = row_stats(thr_v, thr_i, lse, delta, (b * heads_b + hb) * seq_q + i, row, row_valid, has_thr, backward);
        let (row_thr, row_thr_i, lse_row, delta_row, row_active) = (st.thr, st.thr_i, st.lse, st.delta, st.active);
        // Packed sequences: the row's interval `[lo, hi)` as its own causal offset and
        // window (`j <= i + off` and `j > i + off - w`), so the mask below is the causal +
        // window one, with no extra comparison per pair.
        let mut off_r = off;
        let mut w_r = w;
        if segmented {
            // `i` is a valid row even for units past the end (the cube's first row).
            let seg_lo = seg_bounds[2 * i];
            let seg_hi = seg_bounds[2 * i + 1];
            off_r = seg_hi - 1 - i as i32;
            w_r = seg_hi - seg_lo;
        }
        let mut m_run = comptime!(NEG_BIG).runtime();
        let mut l_run = 0.0f32;
        if row_valid {
            for d4 in 0..n_d {
                #[unroll]
                for dz in 0..d_step {
                    let d = d4 * d_step + dz;
                    q_r[d] = f32::cast_from(q[row * head_dim + d]);
                }
            }
            if backward {
                for d4 in 0..n_d {
                    #[unroll]
                    for dz in 0..d_step {
                        let d = d4 * d_step + dz;
                        do_r[d] = f32::cast_from(d_o[row * head_dim + d]);
                    }
                }
            }
        }

        let (n_entries, list_base) = row_entries(b, n_gh, g, n_rb, r, cap, blocks);
        for e in 0..n_entries {
            // Key range of this entry, clipped to the union visible range.
            let (e_lo, e_hi) = entry_keys(sched, list_base, e, klo, khi, key_block, seq_k, blocks);
            let n_tiles = entry_tiles(e_lo, e_hi, tile_k);
            for t in 0..n_tiles {
                let t0 = e_lo as usize + t * tile_k;
                let t1 = min(t0 + tile_k, e_hi as usize);
                // Per-row scores' masks, and whether this row keeps any key of the tile.
                let mut any_kept = false;
                for kk in 0..n_t {
                    let j = t0 + kk;
                    let mut keep = false;
                    if row_active && j < t1 {
                        keep = pair_visible(i, j, off_r, w_r, causal, windowed);
                        if has_thr && keep {
                            let bj = f32::cast_from(bias[bias_base + j]);
                            keep = key_kept(bj, j, row_thr, row_thr_i);
                        }
                    }
                    if keep {
                        sc[kk] = 0.0f32;
                        any_kept = true;
                    } else {
                        sc[kk] = NEG_BIG;
                    }
                }
                let cube_any = any_in_cube(&mut flag_s, any_kept, u, n_u);
                sync_cube();
                if cube_any {
                    // Stage K and V (f32) for keys [t0, t1); zero past the end.
                    let n_el = tile_k * head_dim;
                    let mut idx = u;
                    while idx < n_el {
                        let kk = idx / head_dim;
                        let d = idx % head_dim;
                        if t0 + kk < t1 {
                            let g_idx = kv_base + (t0 + kk) * head_dim + d;
                            k_s[idx] = f32::cast_from(k[g_idx]);
                            v_s[idx] = f32::cast_from(v[g_idx]);
                        } else {
                            k_s[idx] = 0.0f32;
                            v_s[idx] = 0.0f32;
                        }
                        idx += units;
                    }
                    sync_cube();
                    if any_kept {
                        // Scores.
                        let mut t_max = comptime!(NEG_BIG).runtime();
                        for kk in 0..n_t {
                            if sc[kk] == 0.0f32 {
                                let mut dot = 0.0f32;
                                for d4 in 0..n_d {
                                    #[unroll]
                                    for dz in 0..d_step {
                                        let d = d4 * d_step + dz;
                                        dot += q_r[d] * k_s[kk * head_dim + d];
                                    }
                                }
                                let mut s = dot * scale;
                                if has_bias {
                                    s += f32::cast_from(bias[bias_base + t0 + kk]);
                                }
                                sc[kk] = s;
                                t_max = max(t_max, s);
                            } else {
                                sc[kk] = NEG_BIG;
                            }
                        }
                        if backward {
                            for kk in 0..n_t {
                                let s = sc[kk];
                                if s > NEG_BIG {
                                    let p = (s - lse_row).exp();
                                    let mut dp = 0.0f32;
                                    for d4 in 0..n_d {
                                        #[unroll]
                                        for dz in 0..d_step {
                                            let d = d4 * d_step + dz;
                                            dp += do_r[d] * v_s[kk * head_dim + d];
                                        }
                                    }
                                    let ds = p * (dp - delta_row) * scale;
                                    for d4 in 0..n_d {
                                        #[unroll]
                                        for dz in 0..d_step {
                                            let d = d4 * d_step + dz;
                                            acc[d] += ds * k_s[kk * head_dim + d];
                                        }
                                    }
                                }
                            }
                        } else {
                            // Online softmax, one rescale per tile.
                            let m_new = max(m_run, t_max);
                            let corr = (m_run - m_new).exp();
                            l_run *= corr;
                            for d4 in 0..n_d {
                                #[unroll]
                                for dz in 0..d_step {
                                    let d = d4 * d_step + dz;
                                    acc[d] *= corr;
                                }
                            }
                            for kk in 0..n_t {
                                let s = sc[kk];
                                if s > NEG_BIG {
                                    let p = (s - m_new).exp();
                                    l_run += p;
                                    for d4 in 0..n_d {
                                        #[unroll]
                                        for dz in 0..d_step {
                                            let d = d4 * d_step + dz;
                                            acc[d] += p * v_s[kk * head_dim + d];
                                        }
                                    }
                                }
                            }
                            m_run = m_new;
                        }
                    }
                    sync_cube();
                }
            }
        }

        if row_valid {
            if backward {
                for d4 in 0..n_d {
                    #[unroll]
                    for dz in 0..d_step {
                        let d = d4 * d_step + dz;
                        out[row * head_dim + d] = F::cast_from(acc[d]);
                    }
                }
            } else {
                if l_run > 0.0f32 {
                    let inv = 1.0f32 / l_run;
                    for d4 in 0..n_d {
                        #[unroll]
                        for dz in 0..d_step {
                            let d = d4 * d_step + dz;
                            out[row * head_dim + d] = F::cast_from(acc[d] * inv);
                        }
                    }
                    lse[row] = m_run + l_run.ln();
                } else {
                    for d4 in 0..n_d {
                        #[unroll]
                        for dz in 0..d_step {
                            let d = d4 * d_step + dz;
                            out[row * head_dim + d] = F::cast_from(0.0f32);
                        }
                    }
                    lse[row] = neg_inf;
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Key-major kernel: dK, dV, dbias
// ---------------------------------------------------------------------------------------

/// Key-major backward: one unit per key (its k, v rows and the dk, dv accumulators in
/// local arrays); the cube owns `CUBE_DIM` consecutive keys of one (batch, kv head) and
/// walks, for every query head of the GQA group, the query rows that attend to them, in
/// chunks of `tile_q` rows staged through shared memory (q, dO, lse, delta, threshold).
///
/// Dense: the rows are the union range of queries that can see the tile. Blocks: the
/// rows of the inverted schedule of (batch, selection head, key block) (`inv_off` /
/// `inv_rows`, CSR), each row standing for the queries `[r*query_block, ...)`.
/// A chunk where no (row, key) pair is visible and kept is skipped (cube-wide OR).
///
/// Linear cube id = `(b * heads_kv + hk) * n_key_tiles + t`; blocks: `t = kb * n_sub + sub`.
/// `dbias[b, hb, j]` is written when the last query head of bias head `hb` is done (bias
/// heads never straddle kv groups: validated on the host).
#[cube(launch)]
pub fn attn_keys_kernel<F: Float>(
    q: &[F],
    k: &[F],
    v: &[F],
    bias: &[F],
    thr_v: &[f32],
    thr_i: &[i32],
    inv_off: &[i32],
    inv_rows: &[i32],
    d_o: &[F],
    lse: &[f32],
    delta: &[f32],
    dk: &mut [f32],
    dv: &mut [f32],
    dbias: &mut [f32],
    a: KeysArgs,
    #[comptime] units: usize,
    #[comptime] head_dim: usize,
    #[comptime] tile_q: usize,
    #[comptime] causal: bool,
    #[comptime] windowed: bool,
    #[comptime] has_bias: bool,
    #[comptime] has_thr: bool,
    #[comptime] blocks: bool,
    seg_bounds: &[i32],
    #[comptime] segmented: bool,
    #[comptime] pair_bias: bool,
    #[comptime] rolled: bool,
) {
    let off = a.off;
    let w = a.w;
    let scale = a.scale;
    // n_key_tiles: dense ceil(Sk / units); blocks nkb * n_sub.
    let heads_q = a.heads_q as usize;
    let heads_kv = a.heads_kv as usize;
    let seq_q = a.seq_q as usize;
    let seq_k = a.seq_k as usize;
    let heads_b = a.heads_b as usize;
    let heads_s = a.heads_s as usize;
    let qb = a.query_block as usize;
    let n_rb = a.n_row_blocks as usize;
    let cap = a.cap as usize;
    let key_block = a.key_block as usize;
    let n_sub = a.n_sub as usize;
    let n_kt = a.n_key_tiles as usize;
    let n_split = a.n_split as usize;

    // Per-unit loop bounds (constants unless `rolled`: see `loop_bound`); head-dim loops
    // take `d_step` dims per iteration (see `dim_step`).
    let d_step = comptime!(dim_step(head_dim, rolled));
    let n_d = loop_bound(comptime!(head_dim / d_step), a.loop_dim / comptime!(d_step as u32), rolled);
    let n_t = loop_bound(tile_q, a.loop_tile, rolled);
    let n_u = loop_bound(units, CUBE_DIM, rolled);
    let u = UNIT_POS as usize;
    let cid = cube_linear();

    let mut q_s = Shared::<[f32]>::new_slice(tile_q * head_dim);
    let mut do_s = Shared::<[f32]>::new_slice(tile_q * head_dim);
    let mut qi_s = Shared::<[i32]>::new_slice(tile_q);
    let mut lse_s = Shared::<[f32]>::new_slice(tile_q);
    let mut dl_s = Shared::<[f32]>::new_slice(tile_q);
    let mut tv_s = Shared::<[f32]>::new_slice(tile_q);
    let mut ti_s = Shared::<[i32]>::new_slice(tile_q);
    let mut flag_s = Shared::<[u32]>::new_slice(units);

    let kc = key_cube(&a, cid, head_dim);
    if kc.valid {
        let (z, t, hk, b) = (kc.z, kc.t, kc.hk, kc.b);
        let (kv_out, bias_out, group, g_sel, g_b) = (kc.kv_out, kc.bias_out, kc.group, kc.g_sel, kc.g_b);

        // The cube's keys [t0, t1).
        let (kb, t0, t1) = key_tile(t, n_sub, units, key_block, seq_k, blocks);
        let j = t0 + u;
        let key_valid = j < t1;
        let kv_base = (b * heads_kv + hk) * seq_k * head_dim;

        let mut k_r = Array::<f32>::new(head_dim);
        let mut v_r = Array::<f32>::new(head_dim);
        let mut dk_r = Array::<f32>::new(head_dim);
        let mut dv_r = Array::<f32>::new(head_dim);
        for d4 in 0..n_d {
            #[unroll]
            for dz in 0..d_step {
                let d = d4 * d_step + dz;
                k_r[d] = 0.0f32;
                v_r[d] = 0.0f32;
                dk_r[d] = 0.0f32;
                dv_r[d] = 0.0f32;
            }
        }
        if key_valid {
            for d4 in 0..n_d {
                #[unroll]
                for dz in 0..d_step {
                    let d = d4 * d_step + dz;
                    k_r[d] = f32::cast_from(k[kv_base + j * head_dim + d]);
                    v_r[d] = f32::cast_from(v[kv_base + j * head_dim + d]);
                }
            }
        }
        let mut db_acc = 0.0f32;
        // Packed sequences: the rows `[lo, hi)` that see this key, as the key's own causal
        // offset and window (`qi >= lo` is `qi + off_k - j >= 0`, `qi < hi` is
        // `qi + off_k - j < w_k`), as in the query-major kernel.
        let mut off_k = off;
        let mut w_k = w;
        if segmented && key_valid {
            let seg_lo = seg_bounds[2 * (seq_q + j)];
            let seg_hi = seg_bounds[2 * (seq_q + j) + 1];
            off_k = j as i32 - seg_lo;
            w_k = seg_hi - seg_lo;
        }

        for hh in 0..group {
            let h = hk * group + hh;
            let hb = h / g_b;
            let bias_base = (b * heads_b + hb) * seq_k;
            let mut bias_j = 0.0f32;
            if has_bias && key_valid && !pair_bias {
                bias_j = f32::cast_from(bias[bias_base + j]);
            }
            // A pairwise bias: row `qi`'s bias of this key is at `pair_base + qi * seq_k`.
            let pair_base = (b * heads_b + hb) * seq_q * seq_k + j;
            // Query slots of this head: dense: queries [qa, qa + n_slots);
            // blocks: rows of the inverted list, query_block slots each, from slot qa.
            let spc = chunk_slots(qb, tile_q, blocks);
            let bs = b * heads_s + h / g_sel;
            let (rows_base, qa_w, n_slots_w) =
                head_walk(inv_off, inv_rows, bs, kb, n_kt / n_sub, n_rb, cap, qb, t0, t1, seq_q, off, w, blocks, causal, windowed);
            let mut qa = qa_w;
            let mut n_slots = n_slots_w;
            if segmented && !blocks && n_slots > 0 {
                // Packed sequences without a schedule: only the rows of the tile's
                // sequences (with one, the slots index the inverted list, and each pair is
                // checked against its key's interval below).
                let lo = max(qa as i32, seg_bounds[2 * (seq_q + t0)]);
                let hi = min((qa + n_slots) as i32, seg_bounds[2 * (seq_q + t1 - 1) + 1]);
                qa = max(lo, 0i32) as usize;
                n_slots = 0usize;
                if hi > lo {
                    n_slots = (hi - lo) as usize;
                }
            }
            let n_ch = n_slots.div_ceil(spc);
            let rows = chunk_rows(rows_base, qa, n_slots, spc, qb, seq_q, (b * heads_q + h) * seq_q, (b * heads_b + hb) * seq_q);
            let mut ch = z;
            while ch < n_ch {
                stage_chunk_rows(
                    inv_rows, lse, delta, thr_v, thr_i, &mut qi_s, &mut lse_s, &mut dl_s, &mut tv_s, &mut ti_s, &rows, ch, u,
                    units, tile_q, has_thr, blocks,
                );
                // Does this key pair with any row of the chunk? (masks, threshold, lse)
                let mut any = false;
                if key_valid {
                    for x2 in 0..n_t {
                        let qi = qi_s[x2];
                        if qi >= 0 {
                            let mut keep = lse_s[x2] > NEG_BIG;
                            keep = keep && pair_visible(qi as usize, j, off_k, w_k, causal, windowed);
                            if has_thr && keep {
                                let mut bij = bias_j;
                                if pair_bias {
                                    bij = f32::cast_from(bias[pair_base + qi as usize * seq_k]);
                                }
                                keep = key_kept(bij, j, tv_s[x2], ti_s[x2]);
                            }
                            if keep {
                                any = true;
                            }
                        }
                    }
                }
                if any_in_cube(&mut flag_s, any, u, n_u) {
                    let n_el = tile_q * head_dim;
                    let mut idx = u;
                    while idx < n_el {
                        let x3 = idx / head_dim;
                        let d = idx % head_dim;
                        let qi = qi_s[x3];
                        if qi >= 0 {
                            let g_idx = ((b * heads_q + h) * seq_q + qi as usize) * head_dim + d;
                            q_s[idx] = f32::cast_from(q[g_idx]);
                            do_s[idx] = f32::cast_from(d_o[g_idx]);
                        } else {
                            q_s[idx] = 0.0f32;
                            do_s[idx] = 0.0f32;
                        }
                        idx += units;
                    }
                    sync_cube();
                    if any {
                        for x4 in 0..n_t {
                            let qi = qi_s[x4];
                            if qi >= 0 {
                                let lse_i = lse_s[x4];
                                let mut keep = lse_i > NEG_BIG;
                                keep = keep
                                    && pair_visible(qi as usize, j, off_k, w_k, causal, windowed);
                                let mut bij = bias_j;
                                if pair_bias && keep {
                                    bij = f32::cast_from(bias[pair_base + qi as usize * seq_k]);
                                }
                                if has_thr && keep {
                                    keep = key_kept(bij, j, tv_s[x4], ti_s[x4]);
                                }
                                if keep {
                                    let mut dot = 0.0f32;
                                    let mut dp = 0.0f32;
                                    for d4 in 0..n_d {
                                        #[unroll]
                                        for dz in 0..d_step {
                                            let d = d4 * d_step + dz;
                                            dot += q_s[x4 * head_dim + d] * k_r[d];
                                            dp += do_s[x4 * head_dim + d] * v_r[d];
                                        }
                                    }
                                    let mut s = dot * scale;
                                    if has_bias {
                                        s += bij;
                                    }
                                    let p = (s - lse_i).exp();
                                    let ds = p * (dp - dl_s[x4]);
                                    if pair_bias {
                                        // Each (head, row, key) is walked once: dS goes to
                                        // its own f32 slot (zeroed beforehand), summed over
                                        // the bias head's query heads afterwards.
                                        dbias[((b * heads_q + h) * seq_q + qi as usize) * seq_k + j] = ds;
                                    } else {
                                        db_acc += ds;
                                    }
                                    let dss = ds * scale;
                                    for d4 in 0..n_d {
                                        #[unroll]
                                        for dz in 0..d_step {
                                            let d = d4 * d_step + dz;
                                            dv_r[d] += p * do_s[x4 * head_dim + d];
                                            dk_r[d] += dss * q_s[x4 * head_dim + d];
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
                sync_cube();
                ch += n_split;
            }
            if has_bias && !pair_bias && (h + 1) % g_b == 0 {
                if key_valid {
                    dbias[bias_out + bias_base + j] = db_acc;
                }
                db_acc = 0.0f32;
            }
        }

        if key_valid {
            for d4 in 0..n_d {
                #[unroll]
                for dz in 0..d_step {
                    let d = d4 * d_step + dz;
                    dk[kv_out + kv_base + j * head_dim + d] = dk_r[d];
                    dv[kv_out + kv_base + j * head_dim + d] = dv_r[d];
                }
            }
        }
    }
}
