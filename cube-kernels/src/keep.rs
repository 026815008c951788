//! Dynamic-mask attention's keep threshold on the device: for each query row, the
//! `window`-th largest `(bias, key index)` pair among its visible keys, which the attention
//! kernels read as the keep rule `bias > thr || (bias == thr && j >= thr_index)`.
//!
//! The visible keys of consecutive rows are growing prefixes (causal) or all keys, and a
//! row's threshold is the `window`-th largest pair of its prefix. Turned around: key `k` is
//! the threshold of the prefixes `[0, p]` in which exactly `window - 1` keys rank above it,
//! a contiguous range of `p` (the count only grows with `p`), and these ranges partition the
//! prefix ends. So one unit per key counts the earlier keys above it (stopping at `window`:
//! it is then never kept again), then the later ones until its range ends, and writes its
//! key index over its range (`owner`); one unit per row then reads its prefix's owner. The
//! units of a cube take consecutive keys and read the bias through shared-memory tiles. Every
//! entry is written once, without atomics; the work is `O(seq_k)` per key at worst (a key
//! that stays in the top `window` to the end), typically `O(window)`, all keys in parallel.
//! It replaces a walk of the keys through a heap, one unit per head, which left the GPU
//! idle (8-10 ms at 16k keys) and, before it, a copy of the bias to the host.

use crate::launch::buf;
use crate::kernels::unit_linear;
use crate::plan::per_unit_launch;
use crate::*;
use cubecl::prelude::*;

/// The keep threshold of every row: `bias` f32 `[heads, seq_k]` (batch and bias heads
/// flattened), queries `seq_q` (bottom-right aligned when `causal`), `window` keys kept per
/// row. Returns `(value f32 [heads, seq_q], index i32 [heads, seq_q])`; rows that see at most
/// `window` keys get `(-inf, 0)` (keep every visible key).
pub fn keep_threshold(
    client: &Client,
    bias: &Handle,
    heads: usize,
    seq_q: usize,
    seq_k: usize,
    window: usize,
    causal: bool,
) -> Result<(Handle, Handle), KernelError> {
    if window == 0 {
        return Err(KernelError::InvalidArgument { arg: "window", msg: "must be at least 1".into() });
    }
    if seq_k > i32::MAX as usize {
        return Err(KernelError::InvalidArgument { arg: "seq_k", msg: format!("{seq_k} keys do not fit the i32 key indices") });
    }
    check_size("bias", bias, heads * seq_k, 4)?;
    let value = alloc(client, heads * seq_q, 4);
    let index = alloc(client, heads * seq_q, 4);
    if heads == 0 || seq_q == 0 {
        return Ok((value, index));
    }
    let owner = alloc(client, heads * seq_k, 4);
    let hw = &client.properties().hardware;
    let tile = OWNER_TILE.min(hw.max_units_per_cube as usize).min(hw.max_cube_dim.0 as usize).max(1);
    prefix_owner_kernel::launch(
        client,
        crate::plan::grid(client, heads * seq_k.div_ceil(tile)),
        CubeDim::new_1d(tile as u32),
        buf(bias, heads * seq_k),
        buf(&owner, heads * seq_k),
        heads as u32,
        seq_k as u32,
        window as u32,
        tile,
    );
    let (count, dim) = per_unit_launch(client, heads * seq_q);
    row_threshold_kernel::launch(
        client,
        count,
        dim,
        buf(bias, heads * seq_k),
        buf(&owner, heads * seq_k),
        buf(&value, heads * seq_q),
        buf(&index, heads * seq_q),
        heads as u32,
        seq_q as u32,
        seq_k as u32,
        window as u32,
        f32::NEG_INFINITY,
        causal,
    );
    Ok((value, index))
}

/// `(va, ia)` orders before `(vb, ib)`: smaller bias, or equal bias and smaller index.
#[cube]
fn before(va: f32, ia: i32, vb: f32, ib: i32) -> bool {
    va < vb || (va == vb && ia < ib)
}

/// Keys per cube of [`prefix_owner_kernel`], and the bias values staged per step.
const OWNER_TILE: usize = 256;

/// One cube per `tile` consecutive keys of a head, one unit per key `k`: writes `owner[p] =
/// k` for every prefix end `p` whose `window`-th largest pair is `k` (see the module
/// comment). The cube walks the head's bias in tiles staged in shared memory, each unit
/// counting the keys above its own (earlier ones, then later ones) until it knows its range;
/// the walk stops when every unit does.
#[cube(launch)]
pub fn prefix_owner_kernel(bias: &[f32], owner: &mut [i32], heads: u32, seq_k: u32, window: u32, #[comptime] tile: usize) {
    let mut vals = Shared::<[f32]>::new_slice(tile);
    let mut active = Shared::<[u32]>::new_slice(1usize);
    let sk = seq_k as usize;
    let n_tiles = sk.div_ceil(tile);
    let item = crate::kernels::cube_linear();
    let h = item / n_tiles;
    let u = UNIT_POS as usize;
    let k = (item % n_tiles) * tile + u;
    let base = h * sk;
    let w = window as usize;
    let valid = h < heads as usize && k < sk;
    let mut bk = 0.0f32;
    if valid {
        bk = bias[base + k];
    }
    let ki = k as i32;
    // Phase: earlier keys above k (`above`), then later ones (`cnt`) against `need`.
    let mut done = !valid;
    let mut above = 0usize;
    let mut need = 0usize;
    let mut cnt = 0usize;
    let mut first = sk;
    let mut last = sk;
    let mut t = 0usize;
    loop {
        let j0 = t * tile;
        if h >= heads as usize || j0 >= sk {
            break;
        }
        sync_cube();
        if j0 + u < sk {
            vals[u] = bias[base + j0 + u];
        }
        if u == 0 {
            active[0] = 0u32;
        }
        sync_cube();
        let n = min(tile, sk - j0);
        for x in 0..n {
            let j = j0 + x;
            if !done {
                if j < k {
                    if before(bk, ki, vals[x], j as i32) {
                        above += 1;
                        // `window` earlier keys above k: k is in no prefix's top set.
                        done = above >= w;
                    }
                } else if j == k {
                    need = w - 1 - above;
                    if need == 0 {
                        first = k;
                    }
                } else if before(bk, ki, vals[x], j as i32) {
                    cnt += 1;
                    if cnt == need {
                        first = j;
                    }
                    if cnt == need + 1 {
                        last = j - 1;
                        done = true;
                    }
                }
            }
        }
        if !done {
            active[0] = 1u32;
        }
        sync_cube();
        if active[0] == 0u32 {
            break;
        }
        t += 1;
    }
    if valid && first < sk {
        if last == sk {
            last = sk - 1;
        }
        for p in first..last + 1 {
            owner[base + p] = ki;
        }
    }
}

/// One unit per row: the pair of its prefix's owner, or `(-inf, 0)` when the row sees at
/// most `window` keys.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn row_threshold_kernel(
    bias: &[f32],
    owner: &[i32],
    value: &mut [f32],
    index: &mut [i32],
    heads: u32,
    seq_q: u32,
    seq_k: u32,
    window: u32,
    neg_inf: f32,
    #[comptime] causal: bool,
) {
    let x = unit_linear();
    let sq = seq_q as usize;
    let sk = seq_k as usize;
    if x < heads as usize * sq {
        let h = x / sq;
        let i = x % sq;
        let mut visible = sk;
        if causal {
            visible = clamp(i as i32 + sk as i32 - sq as i32 + 1, 0i32, sk as i32) as usize;
        }
        if visible <= window as usize {
            value[x] = neg_inf;
            index[x] = 0;
        } else {
            let k = owner[h * sk + visible - 1];
            value[x] = bias[h * sk + k as usize];
            index[x] = k;
        }
    }
}
