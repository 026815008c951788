//! SeerAttention's distillation target on the device: for every head, query block and key
//! block, the largest causal attention probability `exp(scale q.k - lse)` of the block pair,
//! from the queries, the keys and the dense attention's LSE. The `seq x seq` probabilities
//! are never stored: memory is the `[batch, heads, query blocks, key blocks]` result (the
//! caller normalises its rows).
//!
//! - [`fn@seer_block_max_fragment_kernel`] (CUDA, f16/bf16, blocks of 64): a cube of 4 planes
//!   holds one query block in A fragments and walks the key blocks up to the diagonal:
//!   `S = Q K^T` on the tensor cores, the masked probabilities' maximum per lane, then over
//!   the plane and the cube, written once per block pair.
//! - [`fn@seer_block_max_mma_kernel`] (cooperative matrices: CUDA f32 as TF32, Vulkan/Metal
//!   where the device reports them; blocks of 16, 32, 48 or 64): the same walk with `S`
//!   computed by `cmma` into shared memory, then scanned by every unit of the cube.
//! - [`fn@seer_block_max_scalar_kernel`] (every runtime, any block size): one cube per block
//!   pair, one unit per query row, f32 dot products; the portable path and the oracle of the
//!   tensor-core kernels.

use crate::caps::{MmaSpec, mma_spec};
use crate::fragment::{V2, V8, fast_exp, load_a, product_abt};
use crate::mma::mma_tile;
use crate::plan::{MMA_SMEM_SLACK, mma_max_planes, mma_smem_limit};
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

/// Which kernel [`seer_block_max`] runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockMaxPath {
    /// [`fn@seer_block_max_fragment_kernel`] (register fragments).
    Fragment,
    /// [`fn@seer_block_max_mma_kernel`] (cooperative matrices; f32 inputs multiply in TF32).
    TensorCore,
    /// [`fn@seer_block_max_scalar_kernel`].
    Scalar,
}

/// The kernel [`seer_block_max`] picks for this device, dtype and problem (16-byte aligned
/// inputs assumed for the fragment kernel).
pub fn block_max_path(client: &Client, dtype: AttnDtype, p: &BlockMaxProblem) -> BlockMaxPath {
    if p.block == FRAGMENT_BLOCK && crate::caps::fragment_supported(client, dtype, p.head_dim) {
        BlockMaxPath::Fragment
    } else if mma_block_max_spec(client, dtype, p).is_some() {
        BlockMaxPath::TensorCore
    } else {
        BlockMaxPath::Scalar
    }
}

/// The cooperative-matrix spec when that kernel can run `p`: a block of whole planes (16
/// rows each, at most 4) and Q, K and S tiles within the shared memory budget.
fn mma_block_max_spec(client: &Client, dtype: AttnDtype, p: &BlockMaxProblem) -> Option<MmaSpec> {
    let spec = mma_spec(client, dtype, p.head_dim)?;
    let planes = p.block / 16;
    if !p.block.is_multiple_of(16) || planes == 0 || planes > mma_max_planes(client, &spec) {
        return None;
    }
    let bytes = spec.op_size * 2 * p.block * (p.head_dim + 8) + 4 * p.block * (p.block + 4) + 4 * (p.block + 4 * p.block) + MMA_SMEM_SLACK;
    (bytes <= mma_smem_limit(client)).then_some(spec)
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
    let mut path = block_max_path(client, dtype, p);
    if path == BlockMaxPath::Fragment && !crate::caps::vector_aligned(&[q, k]) {
        path = if mma_block_max_spec(client, dtype, p).is_some() { BlockMaxPath::TensorCore } else { BlockMaxPath::Scalar };
    }
    let frag = path == BlockMaxPath::Fragment;
    let spec = if path == BlockMaxPath::TensorCore { mma_block_max_spec(client, dtype, p) } else { None };
    match dtype {
        AttnDtype::F16 if frag => launch_fragment::<f16>(client, p, q, k, lse, &out),
        AttnDtype::BF16 if frag => launch_fragment::<bf16>(client, p, q, k, lse, &out),
        AttnDtype::F16 if spec.is_some() => launch_mma::<f16, f16>(client, p, spec.unwrap(), q, k, lse, &out),
        AttnDtype::BF16 if spec.is_some() => launch_mma::<bf16, bf16>(client, p, spec.unwrap(), q, k, lse, &out),
        AttnDtype::F32 if spec.is_some() => launch_mma::<f32, cubecl::tf32>(client, p, spec.unwrap(), q, k, lse, &out),
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

fn launch_mma<F: Float + CubeElement, M: Float>(
    client: &Client,
    p: &BlockMaxProblem,
    spec: MmaSpec,
    q: &Handle,
    k: &Handle,
    lse: &Handle,
    out: &Handle,
) {
    let (nq, nk) = p.blocks();
    let planes = p.block / 16;
    seer_block_max_mma_kernel::launch::<F, M>(
        client,
        grid(client, p.batch * p.heads_q * nq),
        CubeDim::new_2d(spec.plane as u32, planes as u32),
        buf(q, p.batch * p.heads_q * p.seq_q * p.head_dim),
        buf(k, p.batch * p.heads_kv * p.seq_k * p.head_dim),
        buf(lse, p.batch * p.heads_q * p.seq_q),
        buf(out, p.batch * p.heads_q * nq * nk),
        args(p),
        planes,
        p.head_dim,
        spec.mk,
    );
}

/// Runtime arguments of the kernels (see [`BlockMaxProblem`]).
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

/// One cube per (batch, head, query block) of `16 * planes` rows, the block: Q staged once in
/// the operand type `M`, then for each key block up to the diagonal `S = Q K^T` by
/// cooperative matrices (plane `p` computes rows `16 p ..`) into shared memory, which every
/// unit scans for the masked probabilities' maximum; the cube's maximum is written once per
/// block pair. Same masks and `-inf` rule as the scalar kernel.
#[cube(launch)]
pub fn seer_block_max_mma_kernel<F: Float, M: Float>(
    q: &[F],
    k: &[F],
    lse: &[f32],
    out: &mut [f32],
    a: BlockMaxArgs,
    #[comptime] planes: usize,
    #[comptime] head_dim: usize,
    #[comptime] mk: usize,
) {
    let bq = comptime!(planes * 16);
    // Row strides padded by 16 bytes (operands) and 4 f32 (scores), as in `crate::mma`.
    let ld = comptime!(head_dim + 8);
    let ls = comptime!(planes * 16 + 4);
    let u = UNIT_POS as usize;
    let nu = CUBE_DIM as usize;
    let pl = UNIT_POS_Y as usize;
    let cid = cube_linear();
    let n_cubes = (a.batch * a.heads_q * a.n_qb) as usize;

    let mut q_s = Shared::<[M]>::new_aligned_slice(bq * ld, 32usize);
    let mut k_s = Shared::<[M]>::new_aligned_slice(bq * ld, 32usize);
    let mut s_s = Shared::<[f32]>::new_aligned_slice(bq * ls, 32usize);
    let mut lse_s = Shared::<[f32]>::new_slice(bq);
    let mut red = Shared::<[f32]>::new_slice(comptime!(planes * 64));

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
        let qrow0 = (b * a.heads_q as usize + h) * sq;
        let kv_base = (b * a.heads_kv as usize + hk) * sk;

        let mut idx = u;
        while idx < bq * head_dim {
            let r = idx / head_dim;
            let mut val = 0.0f32;
            if t_first + r < t_end {
                val = f32::cast_from(q[(qrow0 + t_first) * head_dim + idx]);
            }
            q_s[r * ld + idx % head_dim] = M::cast_from(val);
            idx += nu;
        }
        // Rows past the sequence or without a visible key are skipped by their LSE.
        let mut r = u;
        while r < bq {
            let mut l = comptime!(-3.0e38f32).runtime();
            if t_first + r < t_end {
                l = lse[qrow0 + t_first + r];
            }
            lse_s[r] = l;
            r += nu;
        }
        let out_base = ((b * a.heads_q as usize + h) * a.n_qb as usize + qb) * a.n_kb as usize;

        for kb in 0..a.n_kb as usize {
            let j_first = kb * bq;
            if pos_hi < j_first as i32 {
                // Past the diagonal: no pair of the block is visible.
                if u == 0 {
                    out[out_base + kb] = 0.0f32;
                }
            } else {
                let mut idx2 = u;
                while idx2 < bq * head_dim {
                    let r = idx2 / head_dim;
                    let mut val = 0.0f32;
                    if j_first + r < sk {
                        val = f32::cast_from(k[(kv_base + j_first) * head_dim + idx2]);
                    }
                    k_s[r * ld + idx2 % head_dim] = M::cast_from(val);
                    idx2 += nu;
                }
                sync_cube();
                for n in 0..planes {
                    mma_tile::<M>(&q_s, pl * 16 * ld, ld as u32, &k_s, n * 16 * ld, ld as u32, &mut s_s, pl * 16 * ls + n * 16, ls as u32, head_dim, mk, true, false);
                }
                sync_cube();
                let mut m = 0.0f32;
                let mut e = u;
                while e < bq * bq {
                    let r = e / bq;
                    let j = j_first + e % bq;
                    let l = lse_s[r];
                    if l > -1.0e30f32 && j < sk && j as i32 <= a.pos0 + (t_first + r) as i32 {
                        m = max(m, f32::exp(s_s[r * ls + e % bq] * a.scale - l));
                    }
                    e += nu;
                }
                red[u] = m;
                sync_cube();
                if u == 0 {
                    let mut best = 0.0f32;
                    for x in 0..nu {
                        best = max(best, red[x]);
                    }
                    out[out_base + kb] = best;
                }
                // Every unit is done with this key tile, the scores and the reduction slots.
                sync_cube();
            }
        }
    }
}
