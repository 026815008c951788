//! Dynamic-mask attention's gathered key order: which keys each query tile needs, laid out so
//! that they fill few key blocks whatever the bias looks like.
//!
//! With a per-key bias, query `t` keeps the visible keys whose `(bias, index)` pair is at or
//! above its threshold `thr(t)` ([`crate::keep`]). The visible sets are growing prefixes, so
//! `thr(t)` never decreases, and the rows that keep key `j` form one interval from the
//! first row that sees it to its *last row* `r(j)` ([`key_last_rows`], a binary search per
//! key; `-1` when no row keeps it). A query tile `[t0, t1]` therefore needs exactly the
//! keys with `r(j) >= t0` that are visible to `t1`.
//!
//! [`key_order`] sorts the keys by the tile of their last row, latest first (keys in index
//! order within a tile, keys no row keeps at the end): the keys a tile needs are then the
//! leading run of this order, less the ones it cannot see yet, and each tile's list of key
//! blocks ([`tile_block_lists`]) is a prefix of the permuted blocks. A sliding-window-like
//! bias gives each tile about `window / key_block` blocks, a random one about twice that,
//! instead of every block before the diagonal.

use crate::kernels::{cube_linear, key_kept, unit_linear};
use crate::launch::buf;
use crate::plan::{grid, per_unit_launch};
use crate::*;
use cubecl::prelude::*;

/// Index lists and summaries of one gathered order, all on the device.
#[derive(Debug)]
pub struct KeyOrder {
    /// i32 `[heads, seq_k]`: slot `s` of the permuted order holds key `perm[s]`.
    pub perm: Handle,
    /// i32 `[heads, ceil(seq_q / query_tile), n_key_blocks]`: per query tile, the permuted
    /// key blocks that hold a key it keeps, ascending, `-1` padded.
    pub lists: Handle,
    /// Key blocks of the permuted order (`ceil(seq_k / key_block)`): the lists' capacity.
    pub n_key_blocks: usize,
}

/// The last query row that keeps each key (`-1` when none): `bias` f32 `[heads, seq_k]`,
/// thresholds f32 / i32 `[heads, seq_q]` from [`crate::keep_threshold`]. Returns i32
/// `[heads, seq_k]`.
#[allow(clippy::too_many_arguments)]
pub fn key_last_rows(
    client: &Client,
    bias: &Handle,
    thr_v: &Handle,
    thr_i: &Handle,
    heads: usize,
    seq_q: usize,
    seq_k: usize,
    causal: bool,
) -> Result<Handle, KernelError> {
    check_size("bias", bias, heads * seq_k, 4)?;
    check_size("thr_v", thr_v, heads * seq_q, 4)?;
    check_size("thr_i", thr_i, heads * seq_q, 4)?;
    let out = alloc(client, heads * seq_k, 4);
    if heads * seq_k == 0 {
        return Ok(out);
    }
    let (count, dim) = per_unit_launch(client, heads * seq_k);
    key_last_rows_kernel::launch(
        client,
        count,
        dim,
        buf(bias, heads * seq_k),
        buf(thr_v, (heads * seq_q).max(1)),
        buf(thr_i, (heads * seq_q).max(1)),
        buf(&out, heads * seq_k),
        heads as u32,
        seq_q as u32,
        seq_k as u32,
        causal,
    );
    Ok(out)
}

/// The gathered order of every head from the keys' last rows `last` (i32 `[heads, seq_k]`,
/// see [`key_last_rows`]), query tiles of `query_tile` rows and key blocks of `key_block`
/// keys; see the [module docs](self).
#[allow(clippy::too_many_arguments)]
pub fn key_order(
    client: &Client,
    last: &Handle,
    heads: usize,
    seq_q: usize,
    seq_k: usize,
    query_tile: usize,
    key_block: usize,
    causal: bool,
) -> Result<KeyOrder, KernelError> {
    for (arg, v) in [("query_tile", query_tile), ("key_block", key_block)] {
        if v == 0 {
            return Err(crate::invalid(arg, "must be positive"));
        }
    }
    check_size("last", last, heads * seq_k, 4)?;
    let n_tiles = seq_q.div_ceil(query_tile);
    let nkb = seq_k.div_ceil(key_block);
    let perm = alloc(client, heads * seq_k, 4);
    let lists = alloc(client, heads * n_tiles * nkb, 4);
    let order = KeyOrder { perm, lists, n_key_blocks: nkb };
    if heads * seq_k == 0 || n_tiles == 0 {
        return Ok(order);
    }
    // Buckets: one per query tile (latest first), one for keys no row keeps. Their counters
    // live in shared memory when they fit (the walk is serial: global counters would cost a
    // round trip to L2 per key), else in a global scratch buffer.
    let n_buckets = n_tiles + 1;
    let shared_slots = if n_buckets <= MAX_SHARED_BUCKETS { n_buckets.next_power_of_two() } else { 0 };
    let counts = alloc(client, if shared_slots > 0 { 1 } else { heads * n_buckets }, 4);
    let blk_tile = alloc(client, heads * nkb, 4);
    let blk_min = alloc(client, heads * nkb, 4);
    key_order_kernel::launch(
        client,
        grid(client, heads),
        CubeDim::new_1d(1),
        buf(last, heads * seq_k),
        buf(&counts, if shared_slots > 0 { 1 } else { heads * n_buckets }),
        buf(&order.perm, heads * seq_k),
        heads as u32,
        seq_k as u32,
        n_tiles as u32,
        query_tile as u32,
        shared_slots.max(1),
        shared_slots > 0,
    );
    let (count, dim) = per_unit_launch(client, heads * nkb);
    block_summary_kernel::launch(
        client,
        count,
        dim,
        buf(last, heads * seq_k),
        buf(&order.perm, heads * seq_k),
        buf(&blk_tile, heads * nkb),
        buf(&blk_min, heads * nkb),
        heads as u32,
        seq_k as u32,
        nkb as u32,
        query_tile as u32,
        key_block as u32,
    );
    let (count, dim) = per_unit_launch(client, heads * n_tiles);
    tile_block_lists_kernel::launch(
        client,
        count,
        dim,
        buf(&blk_tile, heads * nkb),
        buf(&blk_min, heads * nkb),
        buf(&order.lists, heads * n_tiles * nkb),
        heads as u32,
        seq_q as u32,
        seq_k as u32,
        n_tiles as u32,
        nkb as u32,
        query_tile as u32,
        causal,
    );
    Ok(order)
}

/// One unit per (head, key): binary search for the last row whose threshold keeps the key
/// (kept rows are the interval from the first row that sees it).
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn key_last_rows_kernel(
    bias: &[f32],
    thr_v: &[f32],
    thr_i: &[i32],
    last: &mut [i32],
    heads: u32,
    seq_q: u32,
    seq_k: u32,
    #[comptime] causal: bool,
) {
    let idx = unit_linear();
    if idx < (heads * seq_k) as usize {
        let sk = seq_k as usize;
        let sq = seq_q as i32;
        let h = idx / sk;
        let j = idx % sk;
        let bj = bias[idx];
        let mut first = 0i32;
        if causal {
            first = max(j as i32 - (sk as i32 - sq), 0i32);
        }
        let tb = h * seq_q as usize;
        let mut r = comptime!(-1i32).runtime();
        if first < sq && key_kept(bj, j, thr_v[tb + first as usize], thr_i[tb + first as usize]) {
            // Invariant: row `lo` keeps the key; rows past `hi` do not.
            let mut lo = first;
            let mut hi = sq - 1;
            while lo < hi {
                let mid = lo + (hi - lo + 1) / 2;
                if key_kept(bj, j, thr_v[tb + mid as usize], thr_i[tb + mid as usize]) {
                    lo = mid;
                } else {
                    hi = mid - 1;
                }
            }
            r = lo;
        }
        last[idx] = r;
    }
}

/// Bucket of a key: `n_tiles - 1 - tile of its last row` (latest tile first), `n_tiles` for a
/// key no row keeps.
#[cube]
fn bucket(last: i32, n_tiles: u32, query_tile: u32) -> usize {
    let mut b = n_tiles as usize;
    if last >= 0 {
        b = (n_tiles - 1 - last as u32 / query_tile) as usize;
    }
    b
}

/// Largest bucket count whose counters [`key_order_kernel`] keeps in shared memory (32 KiB).
const MAX_SHARED_BUCKETS: usize = 8192;

/// One unit per head: a counting sort of the keys by bucket (stable: index order within a
/// bucket), counters in shared memory (`shared`, `slots` of them) or in `counts`.
#[cube(launch)]
#[allow(clippy::too_many_arguments, unused_assignments)]
pub fn key_order_kernel(
    last: &[i32],
    counts: &mut [i32],
    perm: &mut [i32],
    heads: u32,
    seq_k: u32,
    n_tiles: u32,
    query_tile: u32,
    #[comptime] slots: usize,
    #[comptime] shared: bool,
) {
    let h = cube_linear();
    let mut local = Shared::<[i32]>::new_slice(slots);
    if h < heads as usize && UNIT_POS == 0 {
        let sk = seq_k as usize;
        let nb = n_tiles as usize + 1;
        let mut cb = h * nb;
        if shared {
            cb = 0usize;
        }
        let kb = h * sk;
        for x in 0..nb {
            if shared {
                local[x] = 0;
            } else {
                counts[cb + x] = 0;
            }
        }
        for j in 0..sk {
            let bk = bucket(last[kb + j], n_tiles, query_tile);
            if shared {
                local[bk] += 1;
            } else {
                counts[cb + bk] += 1;
            }
        }
        // Exclusive prefix sum: the first slot of each bucket.
        let mut run = 0i32;
        for x in 0..nb {
            if shared {
                let c = local[x];
                local[x] = run;
                run += c;
            } else {
                let c = counts[cb + x];
                counts[cb + x] = run;
                run += c;
            }
        }
        for j in 0..sk {
            let bk = bucket(last[kb + j], n_tiles, query_tile);
            let mut slot = 0i32;
            if shared {
                slot = local[bk];
                local[bk] = slot + 1;
            } else {
                slot = counts[cb + bk];
                counts[cb + bk] = slot + 1;
            }
            perm[kb + slot as usize] = j as i32;
        }
    }
}

/// One unit per (head, permuted key block): the latest query tile any of its keys reaches
/// (`-1` if none) and its smallest key index.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn block_summary_kernel(
    last: &[i32],
    perm: &[i32],
    blk_tile: &mut [i32],
    blk_min: &mut [i32],
    heads: u32,
    seq_k: u32,
    nkb: u32,
    query_tile: u32,
    key_block: u32,
) {
    let idx = unit_linear();
    if idx < (heads * nkb) as usize {
        let h = idx / nkb as usize;
        let pb = idx % nkb as usize;
        let sk = seq_k as usize;
        let kbs = key_block as usize;
        let kb = h * sk;
        let mut tile = comptime!(-1i32).runtime();
        let mut jmin = sk as i32;
        let s1 = min((pb + 1) * kbs, sk);
        for s in pb * kbs..s1 {
            let j = perm[kb + s];
            let l = last[kb + j as usize];
            if l >= 0 {
                tile = max(tile, l / query_tile as i32);
            }
            jmin = min(jmin, j);
        }
        blk_tile[idx] = tile;
        blk_min[idx] = jmin;
    }
}

/// One unit per (head, query tile): the permuted blocks holding a key the tile keeps (some
/// key's last row in this tile or later, and, when causal, a key the tile's last query
/// sees), in order, `-1` padded. Blocks are ordered by their latest tile, so the walk stops at
/// the first block that ends before the tile.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn tile_block_lists_kernel(
    blk_tile: &[i32],
    blk_min: &[i32],
    lists: &mut [i32],
    heads: u32,
    seq_q: u32,
    seq_k: u32,
    n_tiles: u32,
    nkb: u32,
    query_tile: u32,
    #[comptime] causal: bool,
) {
    let idx = unit_linear();
    if idx < (heads * n_tiles) as usize {
        let h = idx / n_tiles as usize;
        let t = (idx % n_tiles as usize) as i32;
        let n = nkb as usize;
        let t_last = min((t + 1) * query_tile as i32, seq_q as i32) - 1;
        let see = t_last + seq_k as i32 - seq_q as i32;
        let base = idx * n;
        let mut at = 0usize;
        let mut pb = 0usize;
        while pb < n {
            let bt = blk_tile[h * n + pb];
            if bt < t {
                break;
            }
            if !causal || blk_min[h * n + pb] <= see {
                lists[base + at] = pb as i32;
                at += 1;
            }
            pb += 1;
        }
        while at < n {
            lists[base + at] = comptime!(-1i32).runtime();
            at += 1;
        }
    }
}
