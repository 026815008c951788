//! `#[cube]` building blocks of the key-major backward (dK, dV, dbias) shared by the
//! portable kernel ([`crate::kernels::attn_keys_kernel`]) and the cooperative-matrix one
//! ([`crate::mma::mma_keys_kernel`]): which keys and query heads a cube owns, how a query
//! row chunk is laid out and staged, and the cube-wide OR that skips a chunk (the
//! query-major kernels skip key tiles with it too).

use crate::args::KeysArgs;
use crate::kernels::{NEG_BIG, slot_query};
use cubecl::prelude::*;

/// What a key-major cube owns: split `z` of key tile `t` of kv head `hk` in batch `b`,
/// and where its outputs go.
#[derive(CubeType, Clone, Copy)]
pub(crate) struct KeyCube {
    /// Whether the cube has work (grids are rounded up).
    pub(crate) valid: bool,
    /// Its split: every `n_split`-th chunk of query rows from chunk `z`, written to its
    /// own f32 partial sums (reduced by `sum_partials_kernel`), so hot key blocks and long
    /// GQA groups are spread over several cubes without atomics.
    pub(crate) z: usize,
    /// Its key tile (dense: keys `[t * keys, ...)`; blocks: sub-tile of a key block).
    pub(crate) t: usize,
    pub(crate) hk: usize,
    pub(crate) b: usize,
    /// Offsets of its split's dK/dV and dbias partials.
    pub(crate) kv_out: usize,
    pub(crate) bias_out: usize,
    /// Query heads per kv head, per schedule head and per bias head.
    pub(crate) group: usize,
    pub(crate) g_sel: usize,
    pub(crate) g_b: usize,
}

/// The [`KeyCube`] of linear cube `cid`: `cid = ((z * B + b) * Hkv + hk) * n_key_tiles + t`.
#[cube]
pub(crate) fn key_cube(a: &KeysArgs, cid: usize, #[comptime] head_dim: usize) -> KeyCube {
    let n_batch = a.n_batch as usize;
    let heads_kv = a.heads_kv as usize;
    let heads_q = a.heads_q as usize;
    let n_kt = a.n_key_tiles as usize;
    let per_split = n_batch * heads_kv * n_kt;
    let z = cid / per_split;
    KeyCube {
        valid: cid < per_split * a.n_split as usize,
        z,
        t: cid % n_kt,
        hk: (cid / n_kt) % heads_kv,
        b: (cid % per_split) / (n_kt * heads_kv),
        kv_out: z * n_batch * heads_kv * a.seq_k as usize * head_dim,
        bias_out: z * n_batch * a.heads_b as usize * a.seq_k as usize,
        group: heads_q / heads_kv,
        g_sel: heads_q / a.heads_s as usize,
        g_b: heads_q / a.heads_b as usize,
    }
}

/// Query slots per staged chunk of `tile_q` rows: all of them, or with a block schedule
/// whole schedule rows of `qb` queries (a row never straddles two chunks).
#[cube]
pub(crate) fn chunk_slots(qb: usize, #[comptime] tile_q: usize, #[comptime] blocks: bool) -> usize {
    let mut spc = tile_q.runtime();
    if blocks && qb <= tile_q {
        spc = (tile_q / qb) * qb;
    }
    spc
}

/// Where a chunk's query rows come from: the walk of one query head over its slots.
#[derive(CubeType, Clone, Copy)]
pub(crate) struct ChunkRows {
    /// The walk (see `key_pieces::head_walk`): inverted-list base, first slot, slot count.
    pub(crate) rows_base: usize,
    pub(crate) qa: usize,
    pub(crate) n_slots: usize,
    /// Slots per chunk ([`chunk_slots`]) and queries per schedule row.
    pub(crate) spc: usize,
    pub(crate) qb: usize,
    pub(crate) seq_q: usize,
    /// First row of the query head in the `[B, Hq, Sq]` row-indexed inputs (LSE, delta),
    /// and of its bias head in the threshold's `[B, Hb, Sq]`.
    pub(crate) row0: usize,
    pub(crate) thr_row0: usize,
}

/// The [`ChunkRows`] of one query head's walk (arguments in field order).
#[cube]
#[allow(clippy::too_many_arguments)]
pub(crate) fn chunk_rows(
    rows_base: usize,
    qa: usize,
    n_slots: usize,
    spc: usize,
    qb: usize,
    seq_q: usize,
    row0: usize,
    thr_row0: usize,
) -> ChunkRows {
    ChunkRows { rows_base, qa, n_slots, spc, qb, seq_q, row0, thr_row0 }
}

/// Stages chunk `ch`'s row metadata in shared memory, `nu` units striding from `u`: each
/// slot's query (`-1` for none), its LSE (`NEG_BIG` for none) and delta, and with a keep
/// threshold the row's threshold value and index. Ends with a cube barrier.
#[cube]
#[allow(clippy::too_many_arguments)]
pub(crate) fn stage_chunk_rows(
    inv_rows: &[i32],
    lse: &[f32],
    delta: &[f32],
    thr_v: &[f32],
    thr_i: &[i32],
    qi_s: &mut [i32],
    lse_s: &mut [f32],
    dl_s: &mut [f32],
    tv_s: &mut [f32],
    ti_s: &mut [i32],
    rows: &ChunkRows,
    ch: usize,
    u: usize,
    nu: usize,
    #[comptime] tile_q: usize,
    #[comptime] has_thr: bool,
    #[comptime] blocks: bool,
) {
    let mut x = u;
    while x < tile_q {
        let slot = ch * rows.spc + x;
        let mut qi = comptime!(-1i32).runtime();
        if x < rows.spc && slot < rows.n_slots {
            qi = slot_query(inv_rows, rows.rows_base, slot, rows.qb, rows.qa, rows.seq_q, blocks);
        }
        qi_s[x] = qi;
        lse_s[x] = comptime!(NEG_BIG).runtime();
        dl_s[x] = 0.0f32;
        if qi >= 0 {
            let row = rows.row0 + qi as usize;
            lse_s[x] = lse[row];
            dl_s[x] = delta[row];
            if has_thr {
                tv_s[x] = thr_v[rows.thr_row0 + qi as usize];
                ti_s[x] = thr_i[rows.thr_row0 + qi as usize];
            }
        }
        x += nu;
    }
    sync_cube();
}

/// Cube-wide OR of every unit's `any` through `flag_s` (`n` flags, one per unit; no plane
/// ops, which the portable path may not have). Holds a cube barrier.
#[cube]
pub(crate) fn any_in_cube(flag_s: &mut [u32], any: bool, u: usize, n: usize) -> bool {
    if any {
        flag_s[u] = 1u32;
    } else {
        flag_s[u] = 0u32;
    }
    sync_cube();
    let mut cube_any = false;
    for y in 0..n {
        if flag_s[y] != 0u32 {
            cube_any = true;
        }
    }
    cube_any
}
