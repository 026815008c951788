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
//! [`fn@key_order`] sorts the keys by the tile of their last row, latest first (keys in index
//! order within a tile, keys no row keeps at the end): the keys a tile needs are then the
//! leading run of this order, less the ones it cannot see yet, and each tile's list of key
//! blocks (`tile_block_lists`) is a prefix of the permuted blocks. A sliding-window-like
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
    // Buckets: one per query tile (latest first), one for keys no row keeps. A stable
    // counting sort in parallel: per chunk of keys the count of each bucket, scanned over the
    // chunks of each bucket and over the buckets, then every key placed at its bucket's start
    // + its chunk's offset + its rank among the chunk's keys of the bucket.
    let n_buckets = n_tiles + 1;
    let hw = &client.properties().hardware;
    let chunk = SORT_CHUNK.min(hw.max_units_per_cube as usize).min(hw.max_cube_dim.0 as usize).max(1);
    let n_chunks = seq_k.div_ceil(chunk);
    let hist_len = heads * n_buckets * n_chunks;
    let hist = alloc(client, hist_len, 4);
    let totals = alloc(client, heads * n_buckets, 4);
    let starts = alloc(client, heads * (n_buckets + 1), 4);
    let sort = || SortArgsLaunch::new(heads as u32, seq_k as u32, n_tiles as u32, query_tile as u32, n_chunks as u32);
    let cubes = grid(client, heads * n_chunks);
    let dim = CubeDim::new_1d(chunk as u32);
    chunk_bucket_counts_kernel::launch(client, cubes.clone(), dim, buf(last, heads * seq_k), buf(&hist, hist_len), sort(), chunk);
    let (count, d1) = per_unit_launch(client, heads * n_buckets);
    crate::schedule::chunk_scan_kernel::launch(
        client,
        count,
        d1,
        buf(&hist, hist_len),
        buf(&totals, heads * n_buckets),
        (heads * n_buckets) as u32,
        n_chunks as u32,
    );
    let (count, d1) = per_unit_launch(client, heads);
    kernels::prefix_sum_kernel::launch(
        client,
        count,
        d1,
        buf(&totals, heads * n_buckets),
        buf(&starts, heads * (n_buckets + 1)),
        heads as u32,
        n_buckets as u32,
    );
    chunk_place_kernel::launch(
        client,
        cubes,
        dim,
        buf(last, heads * seq_k),
        buf(&hist, hist_len),
        buf(&starts, heads * (n_buckets + 1)),
        buf(&order.perm, heads * seq_k),
        sort(),
        chunk,
    );
    let blk_tile = alloc(client, heads * nkb, 4);
    let blk_min = alloc(client, heads * nkb, 4);
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

/// Keys per cube of the counting sort (capped by the device's cube size).
const SORT_CHUNK: usize = 256;

/// The shape of the counting sort, shared by its kernels.
#[derive(CubeLaunch, CubeType)]
pub struct SortArgs {
    heads: u32,
    seq_k: u32,
    n_tiles: u32,
    query_tile: u32,
    n_chunks: u32,
}

/// Stages the buckets of cube `(head, chunk)`'s keys in shared memory (`-1` past the end).
/// Returns the key of this unit and the cube's first key index.
#[cube]
fn stage_buckets(last: &[i32], buckets: &mut [i32], a: &SortArgs, #[comptime] chunk: usize) -> (usize, usize) {
    let item = cube_linear();
    let h = item / a.n_chunks as usize;
    let c = item % a.n_chunks as usize;
    let sk = a.seq_k as usize;
    let j = c * chunk + UNIT_POS as usize;
    let mut bk = comptime!(-1i32).runtime();
    if h < a.heads as usize && j < sk {
        bk = bucket(last[h * sk + j], a.n_tiles, a.query_tile) as i32;
    }
    buckets[UNIT_POS as usize] = bk;
    sync_cube();
    (h, c)
}

/// One cube per (head, chunk of keys): `hist[head][bucket][chunk]` = the chunk's number of
/// keys in the bucket; each unit counts buckets `u, u + chunk, ...` over the staged chunk, so
/// every entry is written once.
#[cube(launch)]
pub fn chunk_bucket_counts_kernel(last: &[i32], hist: &mut [i32], a: &SortArgs, #[comptime] chunk: usize) {
    let mut buckets = Shared::<[i32]>::new_slice(chunk);
    let (h, c) = stage_buckets(last, &mut buckets, a, chunk);
    if h < a.heads as usize {
        let nb = a.n_tiles as usize + 1;
        let nc = a.n_chunks as usize;
        let mut x = UNIT_POS as usize;
        while x < nb {
            let mut n = 0i32;
            for y in 0..chunk {
                if buckets[y] == x as i32 {
                    n += 1;
                }
            }
            hist[(h * nb + x) * nc + c] = n;
            x += chunk;
        }
    }
}

/// One cube per (head, chunk of keys): each key's slot in the sorted order, from its
/// bucket's start, its chunk's offset in the bucket (`hist` after the scan) and its rank
/// among the chunk's earlier keys of the bucket.
#[cube(launch)]
pub fn chunk_place_kernel(last: &[i32], hist: &[i32], starts: &[i32], perm: &mut [i32], a: &SortArgs, #[comptime] chunk: usize) {
    let mut buckets = Shared::<[i32]>::new_slice(chunk);
    let (h, c) = stage_buckets(last, &mut buckets, a, chunk);
    let u = UNIT_POS as usize;
    let bk = buckets[u];
    if h < a.heads as usize && bk >= 0 {
        let nb = a.n_tiles as usize + 1;
        let mut rank = 0i32;
        for y in 0..u {
            if buckets[y] == bk {
                rank += 1;
            }
        }
        let b = bk as usize;
        let slot = starts[h * (nb + 1) + b] + hist[(h * nb + b) * a.n_chunks as usize + c] + rank;
        perm[h * a.seq_k as usize + slot as usize] = (c * chunk + u) as i32;
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
