//! Dynamic-mask attention's keep threshold on the device: for each query row, the
//! `window`-th largest `(bias, key index)` pair among its visible keys, which the attention
//! kernels read as the keep rule `bias > thr || (bias == thr && j >= thr_index)`.
//!
//! The visible keys of consecutive rows are growing prefixes (causal) or all keys, so one
//! walk per (batch, head) over the keys in order keeps the `window` largest pairs seen so
//! far in a min-heap and reads each row's threshold off its top: `O(seq_k log window)` work
//! per head with the heap in shared memory, every head in its own cube. It replaces a copy of
//! the bias to the host and the same walk there.

use crate::launch::buf;
use crate::plan::grid;
use crate::*;
use cubecl::prelude::*;

/// Largest window [`keep_threshold`] takes (the heap of one head lives in shared memory).
pub const MAX_KEEP_WINDOW: usize = 4096;

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
    if window == 0 || window > MAX_KEEP_WINDOW {
        return Err(KernelError::InvalidArgument { arg: "window", msg: format!("must be in 1..={MAX_KEEP_WINDOW}, got {window}") });
    }
    check_size("bias", bias, heads * seq_k, 4)?;
    let value = alloc(client, heads * seq_q, 4);
    let index = alloc(client, heads * seq_q, 4);
    if heads == 0 || seq_q == 0 {
        return Ok((value, index));
    }
    keep_threshold_kernel::launch(
        client,
        grid(client, heads),
        CubeDim::new_1d(1),
        buf(bias, heads * seq_k),
        buf(&value, heads * seq_q),
        buf(&index, heads * seq_q),
        heads as u32,
        seq_q as u32,
        seq_k as u32,
        window as u32,
        f32::NEG_INFINITY,
        window.next_power_of_two(),
        causal,
    );
    Ok((value, index))
}

/// `(va, ia)` orders before `(vb, ib)`: smaller bias, or equal bias and smaller index.
#[cube]
fn before(va: f32, ia: i32, vb: f32, ib: i32) -> bool {
    va < vb || (va == vb && ia < ib)
}

/// One cube (one unit) per head: the keys in order into a min-heap of at most `window`
/// pairs; after the keys a row sees, its threshold is the heap's top when it saw more than
/// `window`.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn keep_threshold_kernel(
    bias: &[f32],
    value: &mut [f32],
    index: &mut [i32],
    heads: u32,
    seq_q: u32,
    seq_k: u32,
    window: u32,
    neg_inf: f32,
    #[comptime] slots: usize,
    #[comptime] causal: bool,
) {
    let head = crate::kernels::cube_linear();
    let mut hv = Shared::<[f32]>::new_slice(slots);
    let mut hi = Shared::<[i32]>::new_slice(slots);
    if head < heads as usize && UNIT_POS == 0 {
        let sq = seq_q as usize;
        let sk = seq_k as usize;
        let w = window as usize;
        let base = head * sk;
        let mut len = 0usize;
        let mut seen = 0usize;
        for i in 0..sq {
            let mut visible = sk;
            if causal {
                visible = clamp(i as i32 + sk as i32 - sq as i32 + 1, 0i32, sk as i32) as usize;
            }
            while seen < visible {
                let v = bias[base + seen];
                let j = seen as i32;
                if len < w {
                    // Push and sift up.
                    let mut c = len;
                    len += 1;
                    loop {
                        if c == 0 {
                            break;
                        }
                        let p = (c - 1) / 2;
                        if before(v, j, hv[p], hi[p]) {
                            hv[c] = hv[p];
                            hi[c] = hi[p];
                            c = p;
                        } else {
                            break;
                        }
                    }
                    hv[c] = v;
                    hi[c] = j;
                } else if before(hv[0], hi[0], v, j) {
                    // Replace the smallest and sift down.
                    let mut c = 0usize;
                    loop {
                        let l = 2 * c + 1;
                        if l >= len {
                            break;
                        }
                        let mut m = l;
                        if l + 1 < len && before(hv[l + 1], hi[l + 1], hv[l], hi[l]) {
                            m = l + 1;
                        }
                        if before(hv[m], hi[m], v, j) {
                            hv[c] = hv[m];
                            hi[c] = hi[m];
                            c = m;
                        } else {
                            break;
                        }
                    }
                    hv[c] = v;
                    hi[c] = j;
                }
                seen += 1;
            }
            if visible <= w {
                value[head * sq + i] = neg_inf;
                index[head * sq + i] = 0;
            } else {
                value[head * sq + i] = hv[0];
                index[head * sq + i] = hi[0];
            }
        }
    }
}
