//! Work-balanced split of the key-major backward pass (register-fragment path).
//!
//! The key-major pass gives a cube one key tile and walks every query row that sees it, in
//! chunks of `tile` rows. The work per tile is very uneven: under NSA's schedule the forced
//! first block is selected by every query (`S x group` rows, against about `16 x 64 x group`
//! for an ordinary block), and under a causal mask the first tile sees every row and the
//! last one a few. A fixed number of cubes per tile either leaves one cube walking the whole
//! sequence, the tail of the pass, or multiplies the memory of the f32 partial sums by that
//! number for every tile.
//!
//! Here each tile gets as many cubes ("pieces") as its walk needs: `ceil(chunks / per_piece)`,
//! at least one, where `chunks` counts the row chunks of all its query heads' walks and
//! `per_piece` is set so that the pass has about `TARGET_PIECES` pieces. Piece `z` of `n`
//! takes chunks `[C z / n, C (z + 1) / n)` of the tile's concatenated walk (`C` chunks). Each
//! piece writes f32 partial dK / dV / dbias for its own tile; [`fn@sum_key_pieces_kernel`] then
//! adds a tile's pieces in order, so the result is deterministic and no atomics are used. A
//! tile cut into one piece only (most tiles of short walks, such as MoBA's) writes its
//! gradients directly, and the sum skips it.
//! The partial memory is `(tiles + TARGET_PIECES) x tile keys x D` f32 for dK and for dV.

use crate::args::{KeysArgs, KeysShape};
use crate::kernels::{cube_linear, unit_linear};
use crate::launch::buf;
use crate::plan::per_unit_launch;
use crate::schedule::{CleanSchedule, Inverted};
use crate::*;
use cubecl::prelude::*;

/// About how many pieces a pass is cut into (at least one per key tile): several waves of
/// cubes on a large GPU, so that a long tile's pieces spread over the whole chip.
const TARGET_PIECES: usize = 2048;

/// The shape of a key-major walk, as the piece planner and the kernel both see it: the
/// kernel's runtime arguments plus its tile sizes.
#[derive(Clone, Copy, Debug)]
pub(crate) struct KeyWalkShape {
    /// The key-major kernel's arguments (heads, lengths, schedule shape, masks).
    pub(crate) keys: KeysShape,
    /// Keys per tile (`16 x planes`).
    pub(crate) bk: usize,
    /// Query rows per chunk.
    pub(crate) tile_q: usize,
}

/// The pieces of one key-major pass and their partial-sum buffers.
pub(crate) struct KeyPieces {
    /// Per key tile (`[B, Hkv, n_kt]` flattened) its first piece, plus the total at the end.
    pub(crate) first: Handle,
    /// Per piece the key tile it belongs to (`max_pieces` entries).
    pub(crate) tile_of: Handle,
    /// The grid size: an upper bound on the number of pieces.
    pub(crate) max_pieces: usize,
    /// f32 partials `[max_pieces, bk, D]` of dK and dV, and `[max_pieces, Hb / Hkv, bk]` of
    /// dbias (a placeholder without a bias).
    pub(crate) dk: Handle,
    pub(crate) dv: Handle,
    pub(crate) db: Handle,
    pub(crate) n_items: usize,
}

/// Row chunk size of a walk: a whole number of query blocks per chunk where one fits.
pub(crate) fn slots_per_chunk(shape: &KeyWalkShape, blocks: bool) -> usize {
    if blocks && shape.keys.query_block <= shape.tile_q {
        (shape.tile_q / shape.keys.query_block) * shape.keys.query_block
    } else {
        shape.tile_q
    }
}

/// Plans the pieces of a key-major pass: counts each tile's chunks on the device, sizes the
/// pieces, and allocates the partial buffers.
pub(crate) fn plan_pieces(
    client: &Client,
    p: &AttnProblem,
    shape: &KeyWalkShape,
    sched: Option<(&CleanSchedule, &Inverted)>,
    has_bias: bool,
) -> KeyPieces {
    let n_lists = p.batch * p.heads_kv;
    let n_items = n_lists * shape.keys.n_key_tiles;
    let blocks = sched.is_some();
    let spc = slots_per_chunk(shape, blocks);
    // An upper bound on the chunks of all walks: with a schedule, every head walks every
    // entry of its lists once per sub-tile (plus one partial chunk per block); dense, every
    // head walks every row once per tile.
    let chunks_bound = if blocks {
        let per_head = (shape.keys.n_row_blocks * shape.keys.cap * shape.keys.query_block).div_ceil(spc) + shape.keys.n_key_tiles / shape.keys.n_sub;
        p.batch * p.heads_q * per_head * shape.keys.n_sub
    } else {
        p.batch * p.heads_q * shape.keys.n_key_tiles * p.seq_q.div_ceil(spc)
    };
    let mut per_piece = chunks_bound.div_ceil(TARGET_PIECES).max(1);
    if !blocks {
        // Dense walks: the longest tile (every row of every head of the group) gets the
        // uniform split of the other paths (`key_splits`), shorter ones fewer pieces. Cutting
        // dense tiles finer measured slower on the H200 (16k, d 128: the dK/dV kernel 50.8 ->
        // 57.7 ms with 1.5 pieces per tile).
        let group = p.heads_q / p.heads_kv;
        let longest = group * p.seq_q.div_ceil(spc);
        let kv_len = n_lists * p.seq_k * p.head_dim;
        let n_split = crate::plan::key_splits(n_items, kv_len, p.seq_q.div_ceil(spc), false);
        per_piece = per_piece.max(longest.div_ceil(n_split));
    }
    let max_pieces = n_items + chunks_bound.div_ceil(per_piece);

    let counts = client.empty(n_items.max(1) * 4);
    let local = client.empty(n_lists * (shape.keys.n_key_tiles + 1) * 4);
    let first = client.empty((n_items + 1) * 4);
    let tile_of = client.empty(max_pieces.max(1) * 4);
    let dummy = crate::launch::dummy(client, 4);
    let (inv_off, inv_off_len, inv_rows, inv_rows_len) = match sched {
        Some((cs, inv)) => (
            &inv.offsets,
            p.batch * shape.keys.heads_s * (cs.nkb + 1),
            &inv.rows,
            p.batch * shape.keys.heads_s * cs.n_rows * shape.keys.cap,
        ),
        None => (&dummy, 1, &dummy, 1),
    };
    let (_, _, windowed) = crate::plan::mask_params(p);
    let (count, dim) = per_unit_launch(client, n_items);
    count_chunks_kernel::launch(
        client,
        count,
        dim,
        buf(inv_off, inv_off_len),
        buf(inv_rows, inv_rows_len),
        buf(&counts, n_items),
        n_items as u32,
        shape.bk as u32,
        spc as u32,
        per_piece as u32,
        shape.keys.arg(),
        blocks,
        p.causal,
        windowed,
    );
    let (count, dim) = per_unit_launch(client, n_lists);
    kernels::prefix_sum_kernel::launch(
        client,
        count,
        dim,
        buf(&counts, n_items),
        buf(&local, n_lists * (shape.keys.n_key_tiles + 1)),
        n_lists as u32,
        shape.keys.n_key_tiles as u32,
    );
    let (count, dim) = per_unit_launch(client, n_items);
    piece_index_kernel::launch(
        client,
        count,
        dim,
        buf(&counts, n_items),
        buf(&local, n_lists * (shape.keys.n_key_tiles + 1)),
        buf(&first, n_items + 1),
        buf(&tile_of, max_pieces),
        n_items as u32,
        shape.keys.n_key_tiles as u32,
    );
    let d = p.head_dim;
    let nbh = if has_bias { shape.keys.heads_b / p.heads_kv } else { 0 };
    let part = max_pieces * shape.bk;
    KeyPieces {
        first,
        tile_of,
        max_pieces,
        dk: client.empty(part * d * 4),
        dv: client.empty(part * d * 4),
        db: client.empty((part * nbh).max(1) * 4),
        n_items,
    }
}

/// The walk of query head `h` over key tile `t0..t1` (block `kb` of list `bs` under a
/// schedule): the offset of its rows in `inv_rows`, its first slot (dense walks: its first
/// query; block walks: the first slot of the block's rows that can see the tile), and its
/// number of slots. Shared by the planner and the key-major kernels so all count the same
/// chunks.
///
/// Block walks skip the rows the masks hide from the whole tile: the inverted rows are
/// ascending, so under a causal mask the rows before query `t0 - off` are a prefix (for
/// MoBA's own block, about half of the block's rows for its first sub-tiles) and under a
/// window the rows after `t1 - 1 - off + w - 1` a suffix.
#[cube]
#[allow(clippy::too_many_arguments)]
pub(crate) fn head_walk(
    inv_off: &[i32],
    inv_rows: &[i32],
    bs: usize,
    kb: usize,
    n_kb: usize,
    n_rb: usize,
    cap: usize,
    qb: usize,
    t0: usize,
    t1: usize,
    seq_q: usize,
    off: i32,
    w: i32,
    #[comptime] blocks: bool,
    #[comptime] causal: bool,
    #[comptime] windowed: bool,
) -> (usize, usize, usize) {
    let mut rows_base = 0usize;
    let mut qa = 0usize;
    let mut n_slots = 0usize;
    if blocks {
        // A sub-tile past the end of a short last block has no keys: nothing to walk.
        if t0 < t1 {
            let o0 = inv_off[bs * (n_kb + 1) + kb] as usize;
            let o1 = inv_off[bs * (n_kb + 1) + kb + 1] as usize;
            rows_base = bs * n_rb * cap + o0;
            let n_e = o1 - o0;
            let mut s_lo = 0usize;
            let mut s_hi = n_e * qb;
            if causal && n_e > 0 {
                // First entry whose last query reaches `t0 - off`, then the first slot in it.
                let first_q = t0 as i32 - off;
                let mut lo = 0usize;
                let mut hi = n_e;
                while lo < hi {
                    let mid = (lo + hi) / 2;
                    if inv_rows[rows_base + mid] * qb as i32 + qb as i32 - 1 < first_q {
                        lo = mid + 1;
                    } else {
                        hi = mid;
                    }
                }
                s_lo = lo * qb;
                if lo < n_e {
                    let q_e = inv_rows[rows_base + lo] * qb as i32;
                    s_lo += max(first_q - q_e, 0i32) as usize;
                }
            }
            if windowed && n_e > 0 {
                // One past the last slot whose query is at most `t1 - 1 - off + w - 1`.
                let last_q = (t1 - 1) as i32 - off + w - 1;
                let mut lo = 0usize;
                let mut hi = n_e;
                while lo < hi {
                    let mid = (lo + hi) / 2;
                    if inv_rows[rows_base + mid] * qb as i32 <= last_q {
                        lo = mid + 1;
                    } else {
                        hi = mid;
                    }
                }
                s_hi = lo * qb;
                if lo > 0 {
                    let q_e = inv_rows[rows_base + lo - 1] * qb as i32;
                    s_hi = (lo - 1) * qb + min(last_q - q_e + 1, qb as i32) as usize;
                }
            }
            if s_hi > s_lo {
                qa = s_lo;
                n_slots = s_hi - s_lo;
            }
        }
    } else if t0 < t1 {
        let mut lo = 0i32;
        let mut hi = seq_q as i32;
        if causal {
            lo = max(lo, t0 as i32 - off);
        }
        if windowed {
            hi = min(hi, (t1 - 1) as i32 - off + w);
        }
        if hi > lo {
            qa = lo as usize;
            n_slots = (hi - lo) as usize;
        }
    }
    (rows_base, qa, n_slots)
}

/// The key range `t0..t1` and key block of tile `t` of a list.
#[cube]
pub(crate) fn key_tile(t: usize, n_sub: usize, bk: usize, key_block: usize, seq_k: usize, #[comptime] blocks: bool) -> (usize, usize, usize) {
    let mut kb = 0usize;
    let mut t0 = t * bk;
    let mut t1 = min(t0 + bk, seq_k);
    if blocks {
        kb = t / n_sub;
        let sub = t % n_sub;
        let b_end = min((kb + 1) * key_block, seq_k);
        t0 = min(kb * key_block + sub * bk, b_end);
        t1 = min(t0 + bk, b_end);
    }
    (kb, t0, t1)
}

/// One unit per key tile: `counts[tile] = max(1, ceil(chunks / per_piece))`, where `chunks`
/// sums the row chunks of the walks of every query head of the tile's kv head.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn count_chunks_kernel(
    inv_off: &[i32],
    inv_rows: &[i32],
    counts: &mut [i32],
    n_items: u32,
    bk: u32,
    spc: u32,
    per_piece: u32,
    a: KeysArgs,
    #[comptime] blocks: bool,
    #[comptime] causal: bool,
    #[comptime] windowed: bool,
) {
    let item = unit_linear();
    if item < n_items as usize {
        let n_kt = a.n_key_tiles as usize;
        let heads_kv = a.heads_kv as usize;
        let n_sub = a.n_sub as usize;
        let t = item % n_kt;
        let hk = (item / n_kt) % heads_kv;
        let b = item / (n_kt * heads_kv);
        let (kb, t0, t1) = key_tile(t, n_sub, bk as usize, a.key_block as usize, a.seq_k as usize, blocks);
        let chunks = walk_chunks(inv_off, inv_rows, &a, b, hk, kb, t0, t1, spc as usize, blocks, causal, windowed);
        counts[item] = max(chunks.div_ceil(per_piece as usize), 1) as i32;
    }
}

/// The row chunks of a key tile's walk over all query heads of kv head `hk`.
#[cube]
#[allow(clippy::too_many_arguments)]
pub(crate) fn walk_chunks(
    inv_off: &[i32],
    inv_rows: &[i32],
    a: &KeysArgs,
    b: usize,
    hk: usize,
    kb: usize,
    t0: usize,
    t1: usize,
    spc: usize,
    #[comptime] blocks: bool,
    #[comptime] causal: bool,
    #[comptime] windowed: bool,
) -> usize {
    let heads_q = a.heads_q as usize;
    let heads_s = a.heads_s as usize;
    let group = heads_q / a.heads_kv as usize;
    let g_sel = heads_q / heads_s;
    let n_kb = a.n_key_tiles as usize / a.n_sub as usize;
    let mut chunks = 0usize;
    for hh in 0..group {
        let h = hk * group + hh;
        let bs = b * heads_s + h / g_sel;
        let (_rb, _qa, n_slots) = head_walk(
            inv_off,
            inv_rows,
            bs,
            kb,
            n_kb,
            a.n_row_blocks as usize,
            a.cap as usize,
            a.query_block as usize,
            t0,
            t1,
            a.seq_q as usize,
            a.off,
            a.w,
            blocks,
            causal,
            windowed,
        );
        chunks += n_slots.div_ceil(spc);
    }
    chunks
}

/// One unit per key tile: turns the per-list prefix of piece counts into global first
/// pieces (`first`, the total at the end) and writes the tile of each of its pieces.
#[cube(launch)]
pub fn piece_index_kernel(counts: &[i32], local: &[i32], first: &mut [i32], tile_of: &mut [i32], n_items: u32, n_kt: u32) {
    let item = unit_linear();
    if item < n_items as usize {
        let n_kt = n_kt as usize;
        let l = item / n_kt;
        let mut base = 0i32;
        for ll in 0..l {
            base += local[ll * (n_kt + 1) + n_kt];
        }
        let f = base + local[l * (n_kt + 1) + item % n_kt];
        first[item] = f;
        if item + 1 == n_items as usize {
            first[item + 1] = f + counts[item];
        }
        for x in 0..counts[item] as usize {
            tile_of[f as usize + x] = item as i32;
        }
    }
}

/// Sums the piece partials of key tiles cut into more than one piece into the output (a
/// single piece writes its tile itself). One cube per key tile: a tile of one piece costs
/// its cube one read of `first`, so a pass whose tiles are all single pieces (short walks,
/// such as MoBA's, and dense tiles) pays almost nothing here; the cube's units take `N`
/// consecutive output elements of a key row each (`N = 4` for dK / dV, whose rows are `D`
/// wide: 16-byte loads; `N = 1` for dbias).
/// Output `[lists, n_heads, seq_k, width]` (dK / dV: one head, `width = D`; dbias:
/// `Hb / Hkv` heads, width 1); partials `[piece, n_heads, bk, width]`; `width` counts
/// vectors of `N`. With gathered keys slot `j` goes to row `kpos[j]`.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn sum_key_pieces_kernel<F: Float, N: Size>(
    parts: &[Vector<f32, N>],
    first: &[i32],
    kpos: &[i32],
    out: &mut [Vector<F, N>],
    n_items: u32,
    n_heads: u32,
    seq_k: u32,
    width: u32,
    n_kt: u32,
    n_sub: u32,
    bk: u32,
    key_block: u32,
    #[comptime] blocks: bool,
    #[comptime] key_pos: bool,
) {
    let item = cube_linear();
    if item < n_items as usize {
        let p0 = first[item] as usize;
        let p1 = first[item + 1] as usize;
        if p1 - p0 > 1 {
            let width = width as usize;
            let seq_k = seq_k as usize;
            let n_heads = n_heads as usize;
            let bk = bk as usize;
            let n_kt = n_kt as usize;
            let l = item / n_kt;
            let (_kb, t0, t1) = key_tile(item % n_kt, n_sub as usize, bk, key_block as usize, seq_k, blocks);
            let per_tile = n_heads * bk * width;
            let mut e = UNIT_POS as usize;
            while e < per_tile {
                let c = e % width;
                let r = (e / width) % bk;
                let hl = e / (width * bk);
                let j = t0 + r;
                if j < t1 {
                    let mut acc = Vector::<f32, N>::cast_from(0.0f32);
                    for pc in p0..p1 {
                        acc += parts[((pc * n_heads + hl) * bk + r) * width + c];
                    }
                    let mut row = j;
                    if key_pos {
                        row = kpos[l * seq_k + j] as usize;
                    }
                    let mut o = Vector::<F, N>::empty();
                    #[unroll]
                    for x in 0..N::value() {
                        o.insert(x, F::cast_from(acc.extract(x)));
                    }
                    out[((l * n_heads + hl) * seq_k + row) * width + c] = o;
                }
                e += CUBE_DIM as usize;
            }
        }
    }
}

/// Adds the pieces' partials into dK, dV and (with a bias) dbias.
pub(crate) fn sum_pieces<F: Float + CubeElement>(
    client: &Client,
    p: &AttnProblem,
    shape: &KeyWalkShape,
    pieces: &KeyPieces,
    kpos: Option<&Handle>,
    grads: &AttnGrads,
    blocks: bool,
) {
    let d = p.head_dim;
    let n_lists = p.batch * p.heads_kv;
    let part = pieces.max_pieces * shape.bk;
    let dummy = crate::launch::dummy(client, 4);
    let (kpos_h, kpos_len) = match kpos {
        Some(h) => (h, n_lists * p.seq_k),
        None => (&dummy, 1),
    };
    let mut outs = vec![(&pieces.dk, &grads.dk, 1usize, d, part * d), (&pieces.dv, &grads.dv, 1, d, part * d)];
    if let Some(db) = &grads.dbias {
        let nbh = shape.keys.heads_b / p.heads_kv;
        outs.push((&pieces.db, db, nbh, 1, part * nbh));
    }
    for (parts, out, n_heads, width, parts_len) in outs {
        let n_out = n_lists * n_heads * p.seq_k * width;
        let vec = if width % 4 == 0 { 4 } else { 1 };
        let units = 256.min(client.properties().hardware.max_units_per_cube as usize).max(1);
        sum_key_pieces_kernel::launch::<F>(
            client,
            crate::plan::grid(client, pieces.n_items),
            CubeDim::new_1d(units as u32),
            vec,
            buf(parts, parts_len),
            buf(&pieces.first, pieces.n_items + 1),
            buf(kpos_h, kpos_len),
            buf(out, n_out),
            pieces.n_items as u32,
            n_heads as u32,
            p.seq_k as u32,
            (width / vec) as u32,
            shape.keys.n_key_tiles as u32,
            shape.keys.n_sub as u32,
            shape.bk as u32,
            shape.keys.key_block as u32,
            blocks,
            kpos.is_some(),
        );
    }
}
