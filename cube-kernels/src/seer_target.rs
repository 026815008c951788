//! SeerAttention's distillation target on the device: for every head, query block and key
//! block, the largest causal attention probability `exp(scale q.k - lse)` of the block pair,
//! from the queries, the keys and the dense attention's LSE. The `seq x seq` probabilities
//! are never stored: memory is the `[batch, heads, query blocks, key blocks]` result (the
//! caller normalises its rows).
//!
//! - [`seer_block_max_fragment_kernel`] (CUDA, f16/bf16, blocks of 64): a cube of 4 planes
//!   holds one query block in A fragments and walks the key blocks up to the diagonal:
//!   `S = Q K^T` on the tensor cores, the masked probabilities' maximum per lane, then over
//!   the plane and the cube, written once per block pair.
//! - [`seer_block_max_scalar_kernel`] (every runtime, any block size): one cube per block
//!   pair, one unit per query row, f32 dot products; the portable path and the oracle of the
//!   fragment kernel.

use crate::fragment::{V2, V8, fast_exp, load_a, product_abt};
use crate::kernels::cube_linear;
use crate::launch::buf;
use crate::plan::grid;
use crate::*;
use cubecl::prelude::*;

/// Shape of one target call.
#[derive(Clone, Debug, PartialEq)]
pub struct BlockMaxProblem {
    /// Batch size.
    pub batch: usize,
    /// Query heads (a multiple of `heads_kv`).
    pub heads_q: usize,
    /// Key/value heads.
    pub heads_kv: usize,
    /// Queries (bottom-right aligned with the keys).
    pub seq_q: usize,
    /// Keys.
    pub seq_k: usize,
    /// Head dimension.
    pub head_dim: usize,
    /// Queries and keys per block.
    pub block: usize,
    /// Score scale.
    pub scale: f32,
}

impl BlockMaxProblem {
    fn blocks(&self) -> (usize, usize) {
        (self.seq_q.div_ceil(self.block), self.seq_k.div_ceil(self.block))
    }
}

/// Block size of the fragment kernel (one key tile, one cube of query rows).
const FRAGMENT_BLOCK: usize = 64;

/// Whether [`seer_block_max`] takes the fragment kernel here.
pub fn block_max_uses_fragment(client: &Client, dtype: AttnDtype, p: &BlockMaxProblem) -> bool {
    p.block == FRAGMENT_BLOCK && crate::caps::fragment_supported(client, dtype, p.head_dim)
}

/// The block maxima f32 `[batch, heads_q, ceil(seq_q / block), ceil(seq_k / block)]` of the
/// causal probabilities of `q` (`[batch, heads_q, seq_q, head_dim]`), `k` (`[batch, heads_kv,
/// seq_k, head_dim]`) under the row LSE `lse` (f32 `[batch, heads_q, seq_q]`; `-inf` rows
/// give 0); see the [module docs](self).
pub fn seer_block_max(client: &Client, dtype: AttnDtype, p: &BlockMaxProblem, q: &Handle, k: &Handle, lse: &Handle) -> Result<Handle, KernelError> {
    if p.heads_kv == 0 || !p.heads_q.is_multiple_of(p.heads_kv) {
        return Err(crate::invalid("heads_kv", format!("must divide heads_q ({}), got {}", p.heads_q, p.heads_kv)));
    }
    if p.block == 0 || p.head_dim == 0 {
        return Err(crate::invalid(if p.block == 0 { "block" } else { "head_dim" }, "must be positive"));
    }
    crate::caps::supports(client, dtype)?;
    check_size("q", q, p.batch * p.heads_q * p.seq_q * p.head_dim, dtype.size())?;
    check_size("k", k, p.batch * p.heads_kv * p.seq_k * p.head_dim, dtype.size())?;
    check_size("lse", lse, p.batch * p.heads_q * p.seq_q, 4)?;
    let (nq, nk) = p.blocks();
    let total = p.batch * p.heads_q * nq * nk;
    let out = alloc(client, total, 4);
    if total == 0 {
        return Ok(out);
    }
    let frag = block_max_uses_fragment(client, dtype, p) && crate::caps::vector_aligned(&[q, k]);
    match dtype {
        AttnDtype::F16 if frag => launch_fragment::<f16>(client, p, q, k, lse, &out),
        AttnDtype::BF16 if frag => launch_fragment::<bf16>(client, p, q, k, lse, &out),
        AttnDtype::F32 => launch_scalar::<f32>(client, p, q, k, lse, &out),
        AttnDtype::F16 => launch_scalar::<f16>(client, p, q, k, lse, &out),
        AttnDtype::BF16 => launch_scalar::<bf16>(client, p, q, k, lse, &out),
    }
    Ok(out)
}

fn args(p: &BlockMaxProblem) -> BlockMaxArgsLaunch {
    let (nq, nk) = p.blocks();
    BlockMaxArgsLaunch::new(
        p.batch as u32,
        p.heads_q as u32,
        p.heads_kv as u32,
        p.seq_q as u32,
        p.seq_k as u32,
        nq as u32,
        nk as u32,
        p.block as u32,
        p.seq_k as i32 - p.seq_q as i32,
        p.scale,
    )
}

fn launch_scalar<F: Float + CubeElement>(client: &Client, p: &BlockMaxProblem, q: &Handle, k: &Handle, lse: &Handle, out: &Handle) {
    let (nq, nk) = p.blocks();
    let total = p.batch * p.heads_q * nq * nk;
    let units = p.block.min(SCALAR_UNITS).min(client.properties().hardware.max_units_per_cube as usize).max(1);
    seer_block_max_scalar_kernel::launch::<F>(
        client,
        grid(client, total),
        CubeDim::new_1d(units as u32),
        buf(q, p.batch * p.heads_q * p.seq_q * p.head_dim),
        buf(k, p.batch * p.heads_kv * p.seq_k * p.head_dim),
        buf(lse, p.batch * p.heads_q * p.seq_q),
        buf(out, total),
        args(p),
        p.head_dim as u32,
        units,
    );
}

fn launch_fragment<F: Float + CubeElement>(client: &Client, p: &BlockMaxProblem, q: &Handle, k: &Handle, lse: &Handle, out: &Handle) {
    let (nq, nk) = p.blocks();
    let vr = p.head_dim / 8;
    seer_block_max_fragment_kernel::launch::<F>(
        client,
        grid(client, p.batch * p.heads_q * nq),
        CubeDim::new_2d(32, (FRAGMENT_BLOCK / 16) as u32),
        buf(q, p.batch * p.heads_q * p.seq_q * vr),
        buf(k, p.batch * p.heads_kv * p.seq_k * vr),
        buf(lse, p.batch * p.heads_q * p.seq_q),
        buf(out, p.batch * p.heads_q * nq * nk),
        args(p),
        p.head_dim,
    );
}

/// Runtime arguments of both kernels (see [`BlockMaxProblem`]).
#[derive(CubeLaunch, CubeType)]
pub struct BlockMaxArgs {
    batch: u32,
    heads_q: u32,
    heads_kv: u32,
    seq_q: u32,
    seq_k: u32,
    n_qb: u32,
    n_kb: u32,
    block: u32,
    /// Key position of query 0 (`seq_k - seq_q`).
    pos0: i32,
    scale: f32,
}

/// Units per cube of the scalar kernel (one per query row of the block, strided).
const SCALAR_UNITS: usize = 64;

/// One cube per (batch, head, query block, key block), one unit per query row (strided):
/// each unit's maximum over its rows' visible keys, then the cube's maximum. Per-unit loops
/// stay short (`rows x block x head_dim / units`), which software rasterisers that cap a
/// loop's total iterations (llvmpipe stops at 65 535) need.
#[cube(launch)]
pub fn seer_block_max_scalar_kernel<F: Float>(q: &[F], k: &[F], lse: &[f32], out: &mut [f32], a: BlockMaxArgs, head_dim: u32, #[comptime] units: usize) {
    let idx = cube_linear();
    let total = (a.batch * a.heads_q * a.n_qb * a.n_kb) as usize;
    let mut red = Shared::<[f32]>::new_slice(units);
    if idx < total {
        let d = head_dim as usize;
        let kb = idx % a.n_kb as usize;
        let qb = (idx / a.n_kb as usize) % a.n_qb as usize;
        let bh = idx / (a.n_kb * a.n_qb) as usize;
        let b = bh / a.heads_q as usize;
        let h = bh % a.heads_q as usize;
        let hk = h / (a.heads_q / a.heads_kv) as usize;
        let bs = a.block as usize;
        let u = UNIT_POS as usize;
        let mut best = 0.0f32;
        let t_end = min((qb + 1) * bs, a.seq_q as usize);
        let j0 = kb * bs;
        let j1 = min(j0 + bs, a.seq_k as usize);
        let mut t = qb * bs + u;
        while t < t_end {
            let row = (b * a.heads_q as usize + h) * a.seq_q as usize + t;
            let l = lse[row];
            let pos = a.pos0 + t as i32;
            if l > -1.0e30f32 {
                for jj in 0..j1 - j0 {
                    let j = j0 + jj;
                    if j as i32 <= pos {
                        let kr = ((b * a.heads_kv as usize + hk) * a.seq_k as usize + j) * d;
                        let mut dot = 0.0f32;
                        for x in 0..d {
                            dot += f32::cast_from(q[row * d + x]) * f32::cast_from(k[kr + x]);
                        }
                        best = max(best, f32::exp(dot * a.scale - l));
                    }
                }
            }
            t += units;
        }
        red[u] = best;
        sync_cube();
        if u == 0 {
            let mut m = 0.0f32;
            for x in 0..units {
                m = max(m, red[x]);
            }
            out[idx] = m;
        }
    }
}

/// 4 planes hold one query block (64 rows) of one head; see the [module docs](self).
#[cube(launch)]
pub fn seer_block_max_fragment_kernel<F: Float>(
    q: &[Vector<F, V8>],
    k: &[Vector<F, V8>],
    lse: &[f32],
    out: &mut [f32],
    a: BlockMaxArgs,
    #[comptime] head_dim: usize,
) {
    let bq = comptime!(FRAGMENT_BLOCK);
    let nu = comptime!(FRAGMENT_BLOCK * 2);
    let vr = comptime!(head_dim / 8);
    let sr = comptime!(head_dim / 8 + 1);
    let dk = comptime!(head_dim / 16);
    let kn = comptime!(FRAGMENT_BLOCK / 8);

    let lane = UNIT_POS_X as usize;
    let pl = UNIT_POS_Y as usize;
    let u = pl * 32 + lane;
    let cid = cube_linear();
    let n_cubes = (a.batch * a.heads_q * a.n_qb) as usize;

    let mut q_s = Shared::<[Vector<F, V8>]>::new_aligned_slice(bq * sr, 16usize);
    let mut k_s = Shared::<[Vector<F, V8>]>::new_aligned_slice(bq * sr, 16usize);
    let mut red = Shared::<[f32]>::new_slice(4usize);

    if cid < n_cubes {
        let qb = cid % a.n_qb as usize;
        let bh = cid / a.n_qb as usize;
        let b = bh / a.heads_q as usize;
        let h = bh % a.heads_q as usize;
        let hk = h / (a.heads_q / a.heads_kv) as usize;
        let sq = a.seq_q as usize;
        let sk = a.seq_k as usize;
        let t_first = qb * bq;
        let t_end = min(t_first + bq, sq);
        let pos_hi = a.pos0 + (t_end - 1) as i32;
        let zero8 = Vector::<F, V8>::cast_from(F::from_int(0));
        let qrow0 = (b * a.heads_q as usize + h) * sq;
        let kv_base = (b * a.heads_kv as usize + hk) * sk;

        #[unroll]
        for it in 0..comptime!((FRAGMENT_BLOCK * vr).div_ceil(FRAGMENT_BLOCK * 2)) {
            let idx = it * nu + u;
            if idx < bq * vr {
                let r = idx / vr;
                let c = idx % vr;
                let mut val = zero8;
                if t_first + r < t_end {
                    val = q[(qrow0 + t_first + r) * vr + c];
                }
                q_s[r * sr + c] = val;
            }
        }
        let quad = lane / 4;
        let tq = lane % 4;
        let t0 = t_first + pl * 16 + quad;
        let t1 = t0 + 8;
        let mut ok0 = t0 < t_end;
        let mut ok1 = t1 < t_end;
        let mut lse0 = 0.0f32;
        let mut lse1 = 0.0f32;
        if ok0 {
            lse0 = lse[qrow0 + t0];
            ok0 = lse0 > -1.0e30f32;
        }
        if ok1 {
            lse1 = lse[qrow0 + t1];
            ok1 = lse1 > -1.0e30f32;
        }
        let pos0 = a.pos0 + t0 as i32;
        let pos1 = a.pos0 + t1 as i32;
        sync_cube();
        let mut q_frag = Array::<Vector<F, V2>>::new(comptime!(4 * dk));
        #[unroll]
        for s in 0..dk {
            let regs = load_a::<F>(&q_s, pl * 16, s * 2, sr);
            #[unroll]
            for x in 0..4usize {
                q_frag[s * 4 + x] = regs[x];
            }
        }
        let mut s_acc = Array::<Vector<f32, V2>>::new(comptime!(2 * kn));
        let out_base = ((b * a.heads_q as usize + h) * a.n_qb as usize + qb) * a.n_kb as usize;

        for kb in 0..a.n_kb as usize {
            let j_first = kb * bq;
            if pos_hi < j_first as i32 {
                // Past the diagonal: no pair of the block is visible.
                if u == 0 {
                    out[out_base + kb] = 0.0f32;
                }
            } else {
                #[unroll]
                for it in 0..comptime!((FRAGMENT_BLOCK * vr).div_ceil(FRAGMENT_BLOCK * 2)) {
                    let idx = it * nu + u;
                    if idx < bq * vr {
                        let r = idx / vr;
                        let c = idx % vr;
                        let mut val = zero8;
                        if j_first + r < sk {
                            val = k[(kv_base + j_first + r) * vr + c];
                        }
                        k_s[r * sr + c] = val;
                    }
                }
                sync_cube();
                product_abt::<F>(&q_frag, &k_s, 0usize, &mut s_acc, kn, dk, sr);
                let mut m = 0.0f32;
                #[unroll]
                for n in 0..kn {
                    let r0 = s_acc[2 * n];
                    let r1 = s_acc[2 * n + 1];
                    #[unroll]
                    for x in 0..2usize {
                        let j = j_first + n * 8 + tq * 2 + x;
                        if ok0 && j < sk && j as i32 <= pos0 {
                            m = max(m, fast_exp(r0.extract(x) * a.scale - lse0));
                        }
                        if ok1 && j < sk && j as i32 <= pos1 {
                            m = max(m, fast_exp(r1.extract(x) * a.scale - lse1));
                        }
                    }
                }
                let pm = plane_max(m);
                if lane == 0 {
                    red[pl] = pm;
                }
                sync_cube();
                if u == 0 {
                    out[out_base + kb] = max(max(red[0], red[1]), max(red[2], red[3]));
                }
                // Every plane is done with this key tile and the reduction slots.
                sync_cube();
            }
        }
    }
}
