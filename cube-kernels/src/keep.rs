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
//! key index over its range (`owner`); one unit per row then reads its prefix's owner. Every
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
    let (count, dim) = per_unit_launch(client, heads * seq_k);
    prefix_owner_kernel::launch(
        client,
        count,
        dim,
        buf(bias, heads * seq_k),
        buf(&owner, heads * seq_k),
        heads as u32,
        seq_k as u32,
        window as u32,
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

/// One unit per key `k` of each head: writes `owner[p] = k` for every prefix end `p` whose
/// `window`-th largest pair is `k` (see the module comment).
#[cube(launch)]
pub fn prefix_owner_kernel(bias: &[f32], owner: &mut [i32], heads: u32, seq_k: u32, window: u32) {
    let x = unit_linear();
    let sk = seq_k as usize;
    if x < heads as usize * sk {
        let base = (x / sk) * sk;
        let k = x % sk;
        let w = window as usize;
        let bk = bias[base + k];
        let ki = k as i32;
        // Earlier keys above k; at `window` of them k is out of every prefix's top set.
        let mut above = 0usize;
        let mut j = 0usize;
        loop {
            if j >= k || above >= w {
                break;
            }
            if before(bk, ki, bias[base + j], j as i32) {
                above += 1;
            }
            j += 1;
        }
        if above < w {
            // k is the threshold from the prefix where `window - 1` keys rank above it to the
            // one before the `window`-th.
            let need = w - 1 - above;
            let mut first = sk;
            if need == 0 {
                first = k;
            }
            let mut last = sk - 1;
            let mut cnt = 0usize;
            let mut jj = k + 1;
            loop {
                if jj >= sk {
                    break;
                }
                if before(bk, ki, bias[base + jj], jj as i32) {
                    cnt += 1;
                    if cnt == need {
                        first = jj;
                    }
                    if cnt == need + 1 {
                        last = jj - 1;
                        break;
                    }
                }
                jj += 1;
            }
            if first < sk {
                for p in first..last + 1 {
                    owner[base + p] = ki;
                }
            }
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
