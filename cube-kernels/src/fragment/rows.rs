//! What the query-major fragment passes ([`super::forward`], [`super::dq`]) share: the
//! lane's two rows, the cube's staged query-side rows, and the double-buffered walk over the
//! K/V tiles of a row group's schedule (copies of the next tile start before this tile's
//! products, also across schedule entries).

use super::{FragmentConfig, RowsCube, V2, V8, copy_vec_async, flat_row, load_a, seek_entry, stage_key_meta};
use crate::args::RowsArgs;
use crate::kernels::NEG_BIG;
use cubecl::prelude::barrier::Barrier;
use cubecl::prelude::*;

/// The two rows a lane holds (`quad` and `quad + 8` of its plane's 16) and what the masks
/// read of them.
#[derive(CubeType)]
pub(crate) struct LaneRows {
    /// Whether the row exists (inside the row group; gathered: a row that selected the block).
    pub ok0: bool,
    pub ok1: bool,
    /// Query head and query position.
    pub h0: usize,
    pub h1: usize,
    pub i0: usize,
    pub i1: usize,
    /// Schedule row of a gathered row (its list); unused otherwise.
    pub srow0: usize,
    pub srow1: usize,
    /// Start of the row's bias row (the bias has `heads_b` heads).
    pub bias_base0: usize,
    pub bias_base1: usize,
    /// Dynamic-mask keep threshold and its tie index (`NEG_BIG` / 0 without one).
    pub thr0: f32,
    pub thr1: f32,
    pub thr_i0: i32,
    pub thr_i1: i32,
}

/// The rows of lane `lane` in plane `pl` of cube `c`.
#[cube]
#[allow(clippy::too_many_arguments)]
pub(crate) fn lane_rows(
    c: &RowsCube,
    a: &RowsArgs,
    inv_rows: &[i32],
    thr_v: &[f32],
    thr_i: &[i32],
    pl: usize,
    lane: usize,
    #[comptime] cfg: FragmentConfig,
) -> LaneRows {
    let heads_q = a.heads_q as usize;
    let heads_b = a.heads_b as usize;
    let seq_q = a.seq_q as usize;
    let seq_k = a.seq_k as usize;
    let gh = a.group_heads as usize;
    let qb = a.query_block as usize;
    let b = c.b;
    let flat0 = c.f0 + pl * 16 + lane / 4;
    let (ok0, h0, i0, srow0) = flat_row(inv_rows, flat0, c.n_group_rows, c.g, gh, c.q0, c.nq, c.r, c.rows_base, qb, seq_q, cfg.gathered);
    let (ok1, h1, i1, srow1) = flat_row(inv_rows, flat0 + 8, c.n_group_rows, c.g, gh, c.q0, c.nq, c.r, c.rows_base, qb, seq_q, cfg.gathered);
    let hb0 = h0 / (heads_q / heads_b);
    let hb1 = h1 / (heads_q / heads_b);
    let mut thr0 = comptime!(NEG_BIG).runtime();
    let mut thr1 = comptime!(NEG_BIG).runtime();
    let mut thr_i0 = 0i32;
    let mut thr_i1 = 0i32;
    if cfg.has_thr {
        if ok0 {
            thr0 = thr_v[(b * heads_b + hb0) * seq_q + i0];
            thr_i0 = thr_i[(b * heads_b + hb0) * seq_q + i0];
        }
        if ok1 {
            thr1 = thr_v[(b * heads_b + hb1) * seq_q + i1];
            thr_i1 = thr_i[(b * heads_b + hb1) * seq_q + i1];
        }
    }
    LaneRows {
        ok0,
        ok1,
        h0,
        h1,
        i0,
        i1,
        srow0,
        srow1,
        bias_base0: (b * heads_b + hb0) * seq_k,
        bias_base1: (b * heads_b + hb1) * seq_k,
        thr0,
        thr1,
        thr_i0,
        thr_i1,
    }
}

/// Stages the cube's `16 * planes` rows of `src` (Q or dO; 16-byte loads) into `dst`; rows
/// past the group are zero.
#[cube]
#[allow(clippy::too_many_arguments)]
pub(crate) fn stage_rows<F: Float>(
    src: &[Vector<F, V8>],
    dst: &mut [Vector<F, V8>],
    c: &RowsCube,
    a: &RowsArgs,
    inv_rows: &[i32],
    u: usize,
    #[comptime] cfg: FragmentConfig,
) {
    let vr = comptime!(cfg.head_dim / 8);
    let sr = comptime!(cfg.head_dim / 8 + 1);
    let nu = comptime!(cfg.planes * 32);
    let bq = comptime!(cfg.planes * 16);
    let heads_q = a.heads_q as usize;
    let seq_q = a.seq_q as usize;
    let zero8 = Vector::<F, V8>::cast_from(F::from_int(0));
    #[unroll]
    for it in 0..comptime!((bq * vr).div_ceil(nu)) {
        let idx = it * nu + u;
        if idx < bq * vr {
            let rr = idx / vr;
            let col = idx % vr;
            let (okr, h, i, _) = flat_row(
                inv_rows,
                c.f0 + rr,
                c.n_group_rows,
                c.g,
                a.group_heads as usize,
                c.q0,
                c.nq,
                c.r,
                c.rows_base,
                a.query_block as usize,
                seq_q,
                cfg.gathered,
            );
            let mut val = zero8;
            if okr {
                val = src[((c.b * heads_q + h) * seq_q + i) * vr + col];
            }
            dst[rr * sr + col] = val;
        }
    }
}

/// Plane `pl`'s 16 staged rows as A fragments for the whole pass: k-step `s` is
/// `[4 s .. 4 s + 4]`.
#[cube]
pub(crate) fn rows_fragments<F: Float>(staged: &[Vector<F, V8>], pl: usize, #[comptime] cfg: FragmentConfig) -> Array<Vector<F, V2>> {
    let dk = comptime!(cfg.head_dim / 16);
    let sr = comptime!(cfg.head_dim / 8 + 1);
    let mut frag = Array::<Vector<F, V2>>::new(comptime!(4 * dk));
    #[unroll]
    for s in 0..dk {
        let regs = load_a::<F>(staged, pl * 16, s * 2, sr);
        #[unroll]
        for x in 0..4usize {
            frag[s * 4 + x] = regs[x];
        }
    }
    frag
}

/// Starts the copies of keys `t0..t1` of K and V into the stage at row `row0` (rows past `t1`
/// are zeroed; their scores are masked).
#[cube]
#[allow(clippy::too_many_arguments)]
pub(crate) fn stage_kv<F: Float>(
    k: &[Vector<F, V8>],
    v: &[Vector<F, V8>],
    k_s: &mut [Vector<F, V8>],
    v_s: &mut [Vector<F, V8>],
    kv_base: usize,
    kpos: &[i32],
    t0: usize,
    t1: usize,
    row0: usize,
    u: usize,
    #[comptime] cfg: FragmentConfig,
) {
    let vr = comptime!(cfg.head_dim / 8);
    let sr = comptime!(cfg.head_dim / 8 + 1);
    let nu = comptime!(cfg.planes * 32);
    #[unroll]
    for it in 0..comptime!((cfg.tile * vr).div_ceil(nu)) {
        let idx = it * nu + u;
        if idx < cfg.tile * vr {
            let kr = idx / vr;
            let c = idx % vr;
            let valid = t0 + kr < t1;
            let mut gi = 0usize;
            if valid {
                // Gathered keys: slot `t0 + kr` holds key row `kpos[..]`.
                let mut row = t0 + kr;
                if cfg.key_pos {
                    row = kpos[kv_base / vr + t0 + kr] as usize;
                }
                gi = kv_base + row * vr + c;
            }
            copy_vec_async::<F>(k, gi, k_s, (row0 + kr) * sr + c, valid);
            copy_vec_async::<F>(v, gi, v_s, (row0 + kr) * sr + c, valid);
        }
    }
}

/// Starts the copies of keys `t0..t1` into stage `st` (K, V and, with staged keys, their
/// positions and biases) and has the stage's barrier track them.
#[cube]
#[allow(clippy::too_many_arguments)]
pub(crate) fn stage_tile<F: Float>(
    k: &[Vector<F, V8>],
    v: &[Vector<F, V8>],
    bias: &[F],
    kpos: &[i32],
    k_s: &mut [Vector<F, V8>],
    v_s: &mut [Vector<F, V8>],
    kp_s: &mut [i32],
    bias_s: &mut [f32],
    bar0: &Barrier,
    bar1: &Barrier,
    kv_base: usize,
    key_bias_base: usize,
    t0: usize,
    t1: usize,
    st: usize,
    u: usize,
    #[comptime] cfg: FragmentConfig,
) {
    let vr = comptime!(cfg.head_dim / 8);
    let row0 = st * cfg.tile;
    stage_kv::<F>(k, v, k_s, v_s, kv_base, kpos, t0, t1, row0, u, cfg);
    if cfg.staged_keys {
        stage_key_meta::<F>(kpos, bias, kp_s, bias_s, kv_base / vr, key_bias_base, t0, t1, row0, u, cfg);
    }
    if st == 0 {
        bar0.commit_copy_async();
        let _ = bar0.arrive();
    } else {
        bar1.commit_copy_async();
        let _ = bar1.arrive();
    }
}

/// Waits for stage `st`'s copies; returns both barriers' next phases.
#[cube]
pub(crate) fn wait_tile(bar0: &Barrier, bar1: &Barrier, st: usize, ph0: u32, ph1: u32) -> (u32, u32) {
    let mut p0 = ph0;
    let mut p1 = ph1;
    if st == 0 {
        bar0.wait_parity(p0);
        p0 ^= 1u32;
    } else {
        bar1.wait_parity(p1);
        p1 ^= 1u32;
    }
    (p0, p1)
}

/// Where the walk goes after the tile ending at `t1` of entry `e` (keys up to `hi`): the
/// entry, its end and the next tile's first key (`e == n_entries` when the walk is over).
#[cube]
#[allow(clippy::too_many_arguments)]
pub(crate) fn next_tile(
    sched: &[i32],
    list_base: usize,
    e: usize,
    hi: i32,
    t1: usize,
    n_entries: usize,
    klo: i32,
    khi: i32,
    key_block: usize,
    seq_k: usize,
    #[comptime] blocks: bool,
) -> (usize, i32, usize) {
    let mut e_next = e;
    let mut hi_next = hi;
    let mut t_next = t1;
    if t1 >= hi as usize {
        let (e2, lo2, hi2) = seek_entry(sched, list_base, e + 1, n_entries, klo, khi, key_block, seq_k, blocks);
        e_next = e2;
        hi_next = hi2;
        t_next = lo2 as usize;
    }
    (e_next, hi_next, t_next)
}
