//! NSA's selection-block scores on the device, from the queries, the compressed keys and the
//! compressed branch's LSE, without materialising the compression probabilities.
//!
//! The score of selection block `j` for query `t` of kv head `hk` is
//! `sum_{h in group(hk)} sum_i w(i, j) exp(scale q_h . kc_i - lse_h(t))` over the compressed
//! tokens `i` visible to `t` (`i * stride + block - 1 <= pos(t)`), with the overlap weight
//! `w(i, j)` = keys shared by window `i` and block `j`, divided by the stride. The output
//! carries the selection rule as offsets the row top-k reads directly: `-inf` on blocks that
//! start after the query, `+inf` on the forced blocks (the first `forced_initial`, the
//! `forced_local` most recent).
//!
//! Two kernels compute the same values:
//! - [`fn@nsa_scores_fragment_kernel`] (CUDA, f16/bf16): a cube of 4 planes takes 64 rows (the
//!   GQA group's heads of `64 / group` consecutive queries), keeps Q in A fragments, and walks
//!   the selection blocks in tiles of `J` blocks whose overlapping compressed keys fit one
//!   64-row K tile: `S = Q Kc^T` on the tensor cores, the probabilities into shared memory,
//!   then each (query, block) of the tile is summed over the group's heads and the block's
//!   windows and written once. Memory traffic is the K tiles and the block scores.
//! - [`fn@nsa_scores_mma_kernel`] (cooperative matrices: CUDA f32 as TF32, Vulkan/Metal where
//!   the device reports them): the same cube, tiles and sums, with `S` computed by `cmma`
//!   into shared memory and turned into probabilities there.
//! - [`fn@nsa_scores_scalar_kernel`] (every runtime): one unit per (query, block), dot products
//!   in f32; the portable path and the oracle of the tensor-core kernels' GPU tests.

use crate::caps::{MmaSpec, mma_spec};
use crate::fragment::{V2, V8, fast_exp, load_a, product_abt};
use crate::mma::mma_tile;
use crate::plan::{MMA_SMEM_SLACK, mma_max_planes, mma_smem_limit};
use crate::kernels::{cube_linear, unit_linear};
use crate::launch::buf;
use crate::plan::{grid, per_unit_launch};
use crate::*;
use cubecl::prelude::*;

/// Shape of one block-score call (a chunk of `rows` query rows starting at `row0`).
#[derive(Clone, Debug, PartialEq)]
pub struct BlockScoreProblem {
    /// Batch size.
    pub batch: usize,
    /// Query heads (a multiple of `heads_kv`).
    pub heads_q: usize,
    /// Key/value heads: one score row per kv head (shared by its GQA group).
    pub heads_kv: usize,
    /// Head dimension.
    pub head_dim: usize,
    /// Query rows of the `q` and `lse` tensors.
    pub seq_q: usize,
    /// First query row scored.
    pub row0: usize,
    /// Query rows scored (`row0 + rows <= seq_q`).
    pub rows: usize,
    /// Key position of query row 0 (`seq_k - seq_q` for bottom-right aligned queries).
    pub pos0: i64,
    /// Compressed tokens.
    pub n_cmp: usize,
    /// Keys per compression window.
    pub compress_block: usize,
    /// Stride between compression windows.
    pub compress_stride: usize,
    /// Keys per selection block.
    pub select_block: usize,
    /// Selection blocks (`ceil(seq_k / select_block)`).
    pub n_sel: usize,
    /// Leading blocks always selected.
    pub forced_initial: usize,
    /// Most recent blocks always selected (current block included).
    pub forced_local: usize,
    /// Score scale.
    pub scale: f32,
}

/// Which kernel [`nsa_block_scores`] runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockScorePath {
    /// [`fn@nsa_scores_fragment_kernel`].
    Fragment,
    /// [`fn@nsa_scores_mma_kernel`] (f32 inputs multiply in TF32).
    TensorCore,
    /// [`fn@nsa_scores_scalar_kernel`].
    Scalar,
}

/// Rows (GQA heads x queries) of one fragment cube.
const CUBE_ROWS: usize = 64;

/// Blocks per tile of the fragment kernel: the most blocks whose overlapping compressed
/// tokens always fit in one 64-row K tile, or 0 when not even one block does.
pub fn blocks_per_tile(p: &BlockScoreProblem) -> usize {
    let mut best = 0;
    for jt in 1..=CUBE_ROWS {
        let fits = (0..p.n_sel.min(4 * p.compress_stride * p.select_block + 1)).all(|j0| {
            let (lo, hi) = overlap_range(j0, jt, p);
            hi.saturating_sub(lo) <= CUBE_ROWS
        });
        if !fits {
            break;
        }
        best = jt;
    }
    best
}

/// Compressed tokens `lo..hi` (unclipped by `n_cmp`) overlapping blocks `j0..j0 + n`.
fn overlap_range(j0: usize, n: usize, p: &BlockScoreProblem) -> (usize, usize) {
    let (l, d, ls) = (p.compress_block as i64, p.compress_stride as i64, p.select_block as i64);
    let a = j0 as i64 * ls - l + 1;
    let lo = if a <= 0 { 0 } else { (a + d - 1) / d };
    let hi = ((j0 + n) as i64 * ls - 1) / d + 1;
    (lo as usize, hi as usize)
}

/// The kernel [`nsa_block_scores`] picks for this device, dtype and problem.
pub fn block_score_path(client: &Client, dtype: AttnDtype, p: &BlockScoreProblem) -> BlockScorePath {
    let group = p.heads_q / p.heads_kv.max(1);
    if group > CUBE_ROWS || blocks_per_tile(p) == 0 {
        BlockScorePath::Scalar
    } else if crate::caps::fragment_supported(client, dtype, p.head_dim) {
        BlockScorePath::Fragment
    } else if mma_scores_spec(client, dtype, p).is_some() {
        BlockScorePath::TensorCore
    } else {
        BlockScorePath::Scalar
    }
}

/// The cooperative-matrix spec when that kernel fits here: 4 planes, Q and K tiles of 64
/// rows, the 64 x 64 scores.
fn mma_scores_spec(client: &Client, dtype: AttnDtype, p: &BlockScoreProblem) -> Option<MmaSpec> {
    let spec = mma_spec(client, dtype, p.head_dim)?;
    let bytes = spec.op_size * 2 * CUBE_ROWS * (p.head_dim + 8) + 4 * CUBE_ROWS * (CUBE_ROWS + 4) + MMA_SMEM_SLACK;
    (mma_max_planes(client, &spec) >= CUBE_ROWS / 16 && bytes <= mma_smem_limit(client)).then_some(spec)
}

/// Selection-block scores f32 `[batch, heads_kv, rows, n_sel]` (see the [module docs](self))
/// of `q` (`[batch, heads_q, seq_q, head_dim]`, `dtype`), `k_cmp` (`[batch, heads_kv, n_cmp,
/// head_dim]`, `dtype`) and `lse` (f32 `[batch, heads_q, seq_q]`; `-inf` rows count as 0).
pub fn nsa_block_scores(
    client: &Client,
    dtype: AttnDtype,
    p: &BlockScoreProblem,
    q: &Handle,
    k_cmp: &Handle,
    lse: &Handle,
) -> Result<Handle, KernelError> {
    if p.heads_kv == 0 || !p.heads_q.is_multiple_of(p.heads_kv) {
        return Err(crate::invalid("heads_kv", format!("must divide heads_q ({}), got {}", p.heads_q, p.heads_kv)));
    }
    if p.row0 + p.rows > p.seq_q {
        return Err(crate::invalid("rows", format!("row0 + rows = {} exceeds seq_q = {}", p.row0 + p.rows, p.seq_q)));
    }
    for (arg, v) in [("compress_block", p.compress_block), ("compress_stride", p.compress_stride), ("select_block", p.select_block), ("head_dim", p.head_dim)] {
        if v == 0 {
            return Err(crate::invalid(arg, "must be positive"));
        }
    }
    crate::caps::supports(client, dtype)?;
    check_size("q", q, p.batch * p.heads_q * p.seq_q * p.head_dim, dtype.size())?;
    check_size("k_cmp", k_cmp, p.batch * p.heads_kv * p.n_cmp * p.head_dim, dtype.size())?;
    check_size("lse", lse, p.batch * p.heads_q * p.seq_q, 4)?;
    let total = p.batch * p.heads_kv * p.rows * p.n_sel;
    let out = alloc(client, total, 4);
    if total == 0 {
        return Ok(out);
    }
    let path = block_score_path(client, dtype, p);
    let aligned = crate::caps::vector_aligned(&[q, k_cmp]);
    let spec = if path == BlockScorePath::TensorCore || (path == BlockScorePath::Fragment && !aligned) {
        mma_scores_spec(client, dtype, p)
    } else {
        None
    };
    match dtype {
        AttnDtype::F32 if spec.is_some() => launch_mma::<f32, cubecl::tf32>(client, p, spec.unwrap(), q, k_cmp, lse, &out),
        AttnDtype::F16 if spec.is_some() => launch_mma::<f16, f16>(client, p, spec.unwrap(), q, k_cmp, lse, &out),
        AttnDtype::BF16 if spec.is_some() => launch_mma::<bf16, bf16>(client, p, spec.unwrap(), q, k_cmp, lse, &out),
        AttnDtype::F32 => launch_scalar::<f32>(client, p, q, k_cmp, lse, &out),
        AttnDtype::F16 if path == BlockScorePath::Fragment && aligned => launch_fragment::<f16>(client, p, q, k_cmp, lse, &out),
        AttnDtype::BF16 if path == BlockScorePath::Fragment && aligned => launch_fragment::<bf16>(client, p, q, k_cmp, lse, &out),
        AttnDtype::F16 => launch_scalar::<f16>(client, p, q, k_cmp, lse, &out),
        AttnDtype::BF16 => launch_scalar::<bf16>(client, p, q, k_cmp, lse, &out),
    }
    Ok(out)
}

/// Integer arguments shared by both kernels, in one order.
fn int_args(p: &BlockScoreProblem) -> [u32; 13] {
    [
        p.batch as u32,
        p.heads_q as u32,
        p.heads_kv as u32,
        p.seq_q as u32,
        p.row0 as u32,
        p.rows as u32,
        p.n_cmp as u32,
        p.compress_block as u32,
        p.compress_stride as u32,
        p.select_block as u32,
        p.n_sel as u32,
        p.forced_initial as u32,
        p.forced_local as u32,
    ]
}

fn launch_scalar<F: Float + CubeElement>(client: &Client, p: &BlockScoreProblem, q: &Handle, k: &Handle, lse: &Handle, out: &Handle) {
    let total = p.batch * p.heads_kv * p.rows * p.n_sel;
    let (count, dim) = per_unit_launch(client, total);
    let a = int_args(p);
    nsa_scores_scalar_kernel::launch::<F>(
        client,
        count,
        dim,
        buf(q, p.batch * p.heads_q * p.seq_q * p.head_dim),
        buf(k, p.batch * p.heads_kv * p.n_cmp * p.head_dim),
        buf(lse, p.batch * p.heads_q * p.seq_q),
        buf(out, total),
        ScoreArgsLaunch::new(a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7], a[8], a[9], a[10], a[11], a[12], p.pos0 as i32, p.scale, f32::INFINITY),
        p.head_dim as u32,
    );
}

fn launch_fragment<F: Float + CubeElement>(client: &Client, p: &BlockScoreProblem, q: &Handle, k: &Handle, lse: &Handle, out: &Handle) {
    let group = p.heads_q / p.heads_kv;
    let per_cube = (CUBE_ROWS / group).max(1);
    let n_cubes = p.batch * p.heads_kv * p.rows.div_ceil(per_cube);
    let vr = p.head_dim / 8;
    let a = int_args(p);
    nsa_scores_fragment_kernel::launch::<F>(
        client,
        grid(client, n_cubes),
        CubeDim::new_2d(32, (CUBE_ROWS / 16) as u32),
        buf(q, p.batch * p.heads_q * p.seq_q * vr),
        buf(k, p.batch * p.heads_kv * p.n_cmp * vr),
        buf(lse, p.batch * p.heads_q * p.seq_q),
        buf(out, p.batch * p.heads_kv * p.rows * p.n_sel),
        ScoreArgsLaunch::new(a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7], a[8], a[9], a[10], a[11], a[12], p.pos0 as i32, p.scale, f32::INFINITY),
        blocks_per_tile(p) as u32,
        p.head_dim,
    );
}

fn launch_mma<F: Float + CubeElement, M: Float>(
    client: &Client,
    p: &BlockScoreProblem,
    spec: MmaSpec,
    q: &Handle,
    k: &Handle,
    lse: &Handle,
    out: &Handle,
) {
    let group = p.heads_q / p.heads_kv;
    let per_cube = (CUBE_ROWS / group).max(1);
    let n_cubes = p.batch * p.heads_kv * p.rows.div_ceil(per_cube);
    let a = int_args(p);
    nsa_scores_mma_kernel::launch::<F, M>(
        client,
        grid(client, n_cubes),
        CubeDim::new_2d(spec.plane as u32, (CUBE_ROWS / 16) as u32),
        buf(q, p.batch * p.heads_q * p.seq_q * p.head_dim),
        buf(k, p.batch * p.heads_kv * p.n_cmp * p.head_dim),
        buf(lse, p.batch * p.heads_q * p.seq_q),
        buf(out, p.batch * p.heads_kv * p.rows * p.n_sel),
        ScoreArgsLaunch::new(a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7], a[8], a[9], a[10], a[11], a[12], p.pos0 as i32, p.scale, f32::INFINITY),
        blocks_per_tile(p) as u32,
        p.head_dim,
        spec.mk,
    );
}

/// The runtime arguments of the kernels (see [`BlockScoreProblem`]).
#[derive(CubeLaunch, CubeType)]
pub struct ScoreArgs {
    batch: u32,
    heads_q: u32,
    heads_kv: u32,
    seq_q: u32,
    row0: u32,
    rows: u32,
    n_cmp: u32,
    cmp_block: u32,
    cmp_stride: u32,
    sel_block: u32,
    n_sel: u32,
    forced_initial: u32,
    forced_local: u32,
    pos0: i32,
    scale: f32,
    /// `+inf`, passed in rather than spelled as a kernel constant.
    inf: f32,
}

/// Compressed tokens `lo..hi` overlapping selection block `j` (clipped to `0..n_cmp`).
#[cube]
fn block_windows(j: u32, a: &ScoreArgs) -> (u32, u32) {
    let start = (j * a.sel_block) as i32 - a.cmp_block as i32 + 1;
    let mut lo = 0u32;
    if start > 0 {
        lo = (start as u32 + a.cmp_stride - 1) / a.cmp_stride;
    }
    let hi = min(((j + 1) * a.sel_block - 1) / a.cmp_stride + 1, a.n_cmp);
    (lo, hi)
}

/// Keys shared by window `i` and block `j`, over the stride.
#[cube]
fn overlap_weight(i: u32, j: u32, a: &ScoreArgs) -> f32 {
    let w0 = i * a.cmp_stride;
    let w1 = w0 + a.cmp_block;
    let b0 = j * a.sel_block;
    let b1 = b0 + a.sel_block;
    let shared = min(w1, b1) as i32 - max(w0, b0) as i32;
    f32::cast_from(max(shared, 0i32)) / f32::cast_from(a.cmp_stride)
}

/// Whether compressed token `i` is visible at key position `pos`.
#[cube]
fn window_visible(i: u32, pos: i32, a: &ScoreArgs) -> bool {
    ((i * a.cmp_stride + a.cmp_block) as i32) - 1 <= pos
}

/// The selection rule on top of a block's score: `-inf` after the query, `+inf` on forced
/// blocks (forced wins), the score otherwise.
#[cube]
fn rule_offset(score: f32, j: u32, pos: i32, a: &ScoreArgs) -> f32 {
    let mut s = score;
    if pos < 0 || (j * a.sel_block) as i32 > pos {
        s = -a.inf;
    }
    if pos >= 0 {
        let cur = pos / a.sel_block as i32;
        let jj = j as i32;
        if jj < a.forced_initial as i32 || (jj <= cur && jj + a.forced_local as i32 > cur) {
            s = a.inf;
        }
    }
    s
}

/// The selection blocks `j0 .. j0 + jt` of queries `t_first .. t_end` a score cube is on,
/// and the compressed tokens `c_lo .. c_hi` staged for them (`busy`: any staged).
#[derive(CubeType)]
struct ScoreTile {
    j0: u32,
    jt: u32,
    t_first: usize,
    t_end: usize,
    c_lo: u32,
    c_hi: u32,
    busy: bool,
}

/// Each (query, block) of a tensor-core cube's tile: the probabilities of the group's heads
/// (`p_s`, flat row `tl * g + h` at `stride`, column `i - c_lo`) summed over the heads and
/// the block's windows through the overlap weights, then the selection rule; written once.
/// Units `u, u + nu, ..` take the items.
#[cube]
#[allow(clippy::too_many_arguments)]
fn write_tile_scores(p_s: &[f32], stride: usize, out: &mut [f32], a: &ScoreArgs, tile: &ScoreTile, b: usize, hk: usize, g: usize, u: usize, nu: usize) {
    let jt = tile.jt as usize;
    let n_items = (tile.t_end - tile.t_first) * jt;
    let mut it = u;
    while it < n_items {
        let tl = it / jt;
        let j = tile.j0 + (it % jt) as u32;
        let t = tile.t_first + tl;
        if j < a.n_sel {
            let pos = a.pos0 + (a.row0 as usize + t) as i32;
            let mut score = 0.0f32;
            if tile.busy {
                let (lo, hi) = block_windows(j, a);
                for i in lo..min(hi, tile.c_hi) {
                    let w = overlap_weight(i, j, a);
                    let col = (i - tile.c_lo) as usize;
                    let mut sum = 0.0f32;
                    for h in 0..g {
                        sum += p_s[(tl * g + h) * stride + col];
                    }
                    score += w * sum;
                }
            }
            out[((b * a.heads_kv as usize + hk) * a.rows as usize + t) * a.n_sel as usize + j as usize] = rule_offset(score, j, pos, a);
        }
        it += nu;
    }
}

/// One unit per output (batch, kv head, row, block).
#[cube(launch)]
pub fn nsa_scores_scalar_kernel<F: Float>(q: &[F], k: &[F], lse: &[f32], out: &mut [f32], a: ScoreArgs, head_dim: u32) {
    let idx = unit_linear();
    let total = (a.batch * a.heads_kv * a.rows * a.n_sel) as usize;
    if idx < total {
        let d = head_dim as usize;
        let j = (idx % a.n_sel as usize) as u32;
        let t = (idx / a.n_sel as usize) % a.rows as usize;
        let bh = idx / (a.n_sel * a.rows) as usize;
        let b = bh / a.heads_kv as usize;
        let hk = bh % a.heads_kv as usize;
        let g = (a.heads_q / a.heads_kv) as usize;
        let qi = a.row0 as usize + t;
        let pos = a.pos0 + qi as i32;
        let mut score = 0.0f32;
        if pos >= 0 && (j * a.sel_block) as i32 <= pos {
            let (lo, hi) = block_windows(j, &a);
            for h in 0..g {
                let qh = hk * g + h;
                let row = (b * a.heads_q as usize + qh) * a.seq_q as usize + qi;
                let mut l = lse[row];
                if l < -1.0e30f32 {
                    l = 0.0f32;
                }
                for i in lo..hi {
                    if window_visible(i, pos, &a) {
                        let kb = ((b * a.heads_kv as usize + hk) * a.n_cmp as usize + i as usize) * d;
                        let mut dot = 0.0f32;
                        for x in 0..d {
                            dot += f32::cast_from(q[row * d + x]) * f32::cast_from(k[kb + x]);
                        }
                        score += overlap_weight(i, j, &a) * f32::exp(dot * a.scale - l);
                    }
                }
            }
        }
        out[idx] = rule_offset(score, j, pos, &a);
    }
}

/// 4 planes, 64 rows (heads of the group outer per query, `64 / group` queries), tiles of
/// `jt` selection blocks; see the [module docs](self).
#[cube(launch)]
pub fn nsa_scores_fragment_kernel<F: Float>(
    q: &[Vector<F, V8>],
    k: &[Vector<F, V8>],
    lse: &[f32],
    out: &mut [f32],
    a: ScoreArgs,
    jt: u32,
    #[comptime] head_dim: usize,
) {
    let bq = comptime!(CUBE_ROWS);
    let nu = comptime!(CUBE_ROWS * 2);
    let vr = comptime!(head_dim / 8);
    let sr = comptime!(head_dim / 8 + 1);
    let dk = comptime!(head_dim / 16);
    let kn = comptime!(CUBE_ROWS / 8);

    let lane = UNIT_POS_X as usize;
    let pl = UNIT_POS_Y as usize;
    let u = pl * 32 + lane;
    let g = (a.heads_q / a.heads_kv) as usize;
    let per_cube = max(bq / g, 1usize);
    let n_tc = (a.rows as usize + per_cube - 1) / per_cube;
    let cid = cube_linear();
    let n_cubes = (a.batch * a.heads_kv) as usize * n_tc;

    let mut q_s = Shared::<[Vector<F, V8>]>::new_aligned_slice(bq * sr, 16usize);
    let mut k_s = Shared::<[Vector<F, V8>]>::new_aligned_slice(bq * sr, 16usize);
    let mut p_s = Shared::<[f32]>::new_slice(bq * bq);

    if cid < n_cubes {
        let tc = cid % n_tc;
        let bh = cid / n_tc;
        let b = bh / a.heads_kv as usize;
        let hk = bh % a.heads_kv as usize;
        let t_first = tc * per_cube;
        let t_end = min(t_first + per_cube, a.rows as usize);
        let pos_hi = a.pos0 + (a.row0 as usize + t_end - 1) as i32;
        let zero8 = Vector::<F, V8>::cast_from(F::from_int(0));

        // Q rows: flat row f is query t_first + f / g, head hk * g + f % g.
        #[unroll]
        for it in 0..comptime!((CUBE_ROWS * vr).div_ceil(CUBE_ROWS * 2)) {
            let idx = it * nu + u;
            if idx < bq * vr {
                let f = idx / vr;
                let c = idx % vr;
                let t = t_first + f / g;
                let mut val = zero8;
                if f / g < per_cube && t < t_end {
                    let qh = hk * g + f % g;
                    val = q[((b * a.heads_q as usize + qh) * a.seq_q as usize + a.row0 as usize + t) * vr + c];
                }
                q_s[f * sr + c] = val;
            }
        }
        // The two rows this lane holds in the score fragments, their LSE and position.
        let quad = lane / 4;
        let tq = lane % 4;
        let f0 = pl * 16 + quad;
        let f1 = f0 + 8;
        let t0 = t_first + f0 / g;
        let t1 = t_first + f1 / g;
        let ok0 = f0 / g < per_cube && t0 < t_end;
        let ok1 = f1 / g < per_cube && t1 < t_end;
        let pos_r0 = a.pos0 + (a.row0 as usize + t0) as i32;
        let pos_r1 = a.pos0 + (a.row0 as usize + t1) as i32;
        let mut lse0 = 0.0f32;
        let mut lse1 = 0.0f32;
        if ok0 {
            lse0 = lse[(b * a.heads_q as usize + hk * g + f0 % g) * a.seq_q as usize + a.row0 as usize + t0];
        }
        if ok1 {
            lse1 = lse[(b * a.heads_q as usize + hk * g + f1 % g) * a.seq_q as usize + a.row0 as usize + t1];
        }
        if lse0 < -1.0e30f32 {
            lse0 = 0.0f32;
        }
        if lse1 < -1.0e30f32 {
            lse1 = 0.0f32;
        }
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
        let kv_base = (b * a.heads_kv as usize + hk) * a.n_cmp as usize;

        let mut j0 = 0u32;
        while j0 < a.n_sel {
            let (c_lo, _) = block_windows(j0, &a);
            let (_, hi_last) = block_windows(min(j0 + jt, a.n_sel) - 1, &a);
            // Windows visible to the cube's last query bound the staged range.
            let mut c_hi = 0u32;
            if pos_hi + 1 >= a.cmp_block as i32 {
                c_hi = min(hi_last, ((pos_hi + 1 - a.cmp_block as i32) as u32) / a.cmp_stride + 1);
            }
            let busy = pos_hi >= 0 && (j0 * a.sel_block) as i32 <= pos_hi && c_hi > c_lo;
            if busy {
                #[unroll]
                for it in 0..comptime!((CUBE_ROWS * vr).div_ceil(CUBE_ROWS * 2)) {
                    let idx = it * nu + u;
                    if idx < bq * vr {
                        let r = idx / vr;
                        let c = idx % vr;
                        let ci = c_lo as usize + r;
                        let mut val = zero8;
                        if ci < c_hi as usize {
                            val = k[(kv_base + ci) * vr + c];
                        }
                        k_s[r * sr + c] = val;
                    }
                }
                sync_cube();
                product_abt::<F>(&q_frag, &k_s, 0usize, &mut s_acc, kn, dk, sr);
                #[unroll]
                for n in 0..kn {
                    let r0 = s_acc[2 * n];
                    let r1 = s_acc[2 * n + 1];
                    #[unroll]
                    for x in 0..2usize {
                        let cc = n * 8 + tq * 2 + x;
                        let ci = c_lo + cc as u32;
                        let mut p0 = 0.0f32;
                        let mut p1 = 0.0f32;
                        if ok0 && ci < c_hi && window_visible(ci, pos_r0, &a) {
                            p0 = fast_exp(r0.extract(x) * a.scale - lse0);
                        }
                        if ok1 && ci < c_hi && window_visible(ci, pos_r1, &a) {
                            p1 = fast_exp(r1.extract(x) * a.scale - lse1);
                        }
                        p_s[f0 * bq + cc] = p0;
                        p_s[f1 * bq + cc] = p1;
                    }
                }
                sync_cube();
            }
            let tile = ScoreTile { j0, jt, t_first, t_end, c_lo, c_hi, busy };
            write_tile_scores(&p_s, bq, out, &a, &tile, b, hk, g, u, nu);
            if busy {
                sync_cube();
            }
            j0 += jt;
        }
    }
}

/// The cube of [`fn@nsa_scores_fragment_kernel`] (64 rows: the group's heads of `64 / group`
/// consecutive queries; tiles of `jt` selection blocks) on cooperative matrices: Q and each
/// range of compressed keys staged in the operand type `M`, `S = Q Kc^T` by `cmma` into
/// shared memory (plane `p` computes rows `16 p ..`), turned into probabilities in place by
/// every unit, then summed per (query, block) exactly as the fragment kernel does.
#[cube(launch)]
pub fn nsa_scores_mma_kernel<F: Float, M: Float>(
    q: &[F],
    k: &[F],
    lse: &[f32],
    out: &mut [f32],
    a: ScoreArgs,
    jt: u32,
    #[comptime] head_dim: usize,
    #[comptime] mk: usize,
) {
    let bq = comptime!(CUBE_ROWS);
    let ld = comptime!(head_dim + 8);
    let ls = comptime!(CUBE_ROWS + 4);
    let u = UNIT_POS as usize;
    let nu = CUBE_DIM as usize;
    let pl = UNIT_POS_Y as usize;
    let g = (a.heads_q / a.heads_kv) as usize;
    let per_cube = max(bq / g, 1usize);
    let n_tc = (a.rows as usize + per_cube - 1) / per_cube;
    let cid = cube_linear();
    let n_cubes = (a.batch * a.heads_kv) as usize * n_tc;

    let mut q_s = Shared::<[M]>::new_aligned_slice(bq * ld, 32usize);
    let mut k_s = Shared::<[M]>::new_aligned_slice(bq * ld, 32usize);
    let mut p_s = Shared::<[f32]>::new_aligned_slice(bq * ls, 32usize);

    if cid < n_cubes {
        let tc = cid % n_tc;
        let bh = cid / n_tc;
        let b = bh / a.heads_kv as usize;
        let hk = bh % a.heads_kv as usize;
        let t_first = tc * per_cube;
        let t_end = min(t_first + per_cube, a.rows as usize);
        let pos_hi = a.pos0 + (a.row0 as usize + t_end - 1) as i32;

        // Q rows: flat row f is query t_first + f / g, head hk * g + f % g.
        let mut idx = u;
        while idx < bq * head_dim {
            let f = idx / head_dim;
            let c = idx % head_dim;
            let t = t_first + f / g;
            let mut val = 0.0f32;
            if f / g < per_cube && t < t_end {
                let qh = hk * g + f % g;
                val = f32::cast_from(q[((b * a.heads_q as usize + qh) * a.seq_q as usize + a.row0 as usize + t) * head_dim + c]);
            }
            q_s[f * ld + c] = M::cast_from(val);
            idx += nu;
        }
        let kv_base = (b * a.heads_kv as usize + hk) * a.n_cmp as usize;

        let mut j0 = 0u32;
        while j0 < a.n_sel {
            let (c_lo, _) = block_windows(j0, &a);
            let (_, hi_last) = block_windows(min(j0 + jt, a.n_sel) - 1, &a);
            // Windows visible to the cube's last query bound the staged range.
            let mut c_hi = 0u32;
            if pos_hi + 1 >= a.cmp_block as i32 {
                c_hi = min(hi_last, ((pos_hi + 1 - a.cmp_block as i32) as u32) / a.cmp_stride + 1);
            }
            let busy = pos_hi >= 0 && (j0 * a.sel_block) as i32 <= pos_hi && c_hi > c_lo;
            if busy {
                let mut idx2 = u;
                while idx2 < bq * head_dim {
                    let r = idx2 / head_dim;
                    let ci = c_lo as usize + r;
                    let mut val = 0.0f32;
                    if ci < c_hi as usize {
                        val = f32::cast_from(k[(kv_base + ci) * head_dim + idx2 % head_dim]);
                    }
                    k_s[r * ld + idx2 % head_dim] = M::cast_from(val);
                    idx2 += nu;
                }
                sync_cube();
                for n in 0..comptime!(CUBE_ROWS / 16) {
                    mma_tile::<M>(&q_s, pl * 16 * ld, ld as u32, &k_s, n * 16 * ld, ld as u32, &mut p_s, pl * 16 * ls + n * 16, ls as u32, head_dim, mk, true, false);
                }
                sync_cube();
                // Scores to probabilities in place: row f's LSE (0 for rows without one),
                // masked to the windows the row's query sees.
                let mut e = u;
                while e < bq * bq {
                    let f = e / bq;
                    let cc = e % bq;
                    let t = t_first + f / g;
                    let ci = c_lo + cc as u32;
                    let mut pv = 0.0f32;
                    if f / g < per_cube && t < t_end && ci < c_hi {
                        let pos = a.pos0 + (a.row0 as usize + t) as i32;
                        if window_visible(ci, pos, &a) {
                            let mut l = lse[(b * a.heads_q as usize + hk * g + f % g) * a.seq_q as usize + a.row0 as usize + t];
                            if l < -1.0e30f32 {
                                l = 0.0f32;
                            }
                            pv = f32::exp(p_s[f * ls + cc] * a.scale - l);
                        }
                    }
                    p_s[f * ls + cc] = pv;
                    e += nu;
                }
                sync_cube();
            }
            let tile = ScoreTile { j0, jt, t_first, t_end, c_lo, c_hi, busy };
            write_tile_scores(&p_s, ls, out, &a, &tile, b, hk, g, u, nu);
            if busy {
                sync_cube();
            }
            j0 += jt;
        }
    }
}
