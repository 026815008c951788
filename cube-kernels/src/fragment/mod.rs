//! The register-fragment path (CUDA, f16/bf16): FlashAttention-2's recipe written with
//! CubeCL's manual MMA (`mma.sync.m16n8k16`, `ldmatrix`).
//!
//! A cube is `planes` planes of 32 lanes; plane `p` owns 16 consecutive rows of the cube's
//! tile (query rows in [`forward`] and [`dq`], keys in [`dkdv`]). Operand tiles are staged
//! in shared memory with 16-byte loads, row stride padded by one 16-byte vector so the eight
//! rows an `ldmatrix` reads fall on eight different 4-bank groups. Products land in
//! accumulator fragments that stay in registers for the whole pass (the running output, dQ,
//! dK, dV); the softmax runs on the score fragments (the four lanes of a quad hold one row
//! and combine with two plane shuffles); and probabilities or score gradients become the A
//! operand of the next product in registers: the m16n8k16 accumulator layout of two
//! adjacent 8-column tiles is exactly the layout of one A fragment, so P and dS never go
//! through shared memory.
//!
//! That fragment layout (lane `l` holds rows `l / 4` and `l / 4 + 8`, columns `2 (l % 4)` and
//! `+1` of every 8-wide accumulator tile) is the one PTX defines for m16n8k16, which is why
//! this path is only picked on CUDA ([`crate::kernel_path`]). Masks, bias, the dynamic-mask
//! threshold and the block-schedule walks are the same rules as the other paths, so every
//! path visits the same keys.

#[allow(missing_docs)]
pub mod dkdv;
#[allow(missing_docs)]
pub mod dq;
#[allow(missing_docs)]
pub mod forward;
mod rows;

use crate::args::RowsArgs;
use crate::kernels::{NEG_BIG, entry_keys, key_kept, pair_visible};
use cubecl::cmma::{MatrixIdent, MmaDefinition};
use cubecl::prelude::barrier::copy_async;
use cubecl::prelude::*;

/// 16 bytes of f16/bf16: one `ldmatrix` row, one global load.
pub type V8 = Const<8>;
/// Two 16-bit operands or two f32 accumulators: one fragment register.
pub type V2 = Const<2>;

/// Compile-time shape and mask flags of a fragment kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FragmentConfig {
    /// Planes (of 32 lanes, 16 rows each) per cube.
    pub planes: usize,
    /// Head dimension (a multiple of 16).
    pub head_dim: usize,
    /// Depth of the staged tile on the other side: keys per K/V tile in the query-major
    /// kernels, query rows per Q/dO tile in the key-major one (a multiple of 16).
    pub tile: usize,
    /// Bottom-right causal mask.
    pub causal: bool,
    /// Sliding window.
    pub windowed: bool,
    /// Additive per-key bias.
    pub has_bias: bool,
    /// Dynamic-mask keep threshold (implies `has_bias`).
    pub has_thr: bool,
    /// Block schedule walked per row (query-major kernels) or per key tile (key-major).
    pub blocks: bool,
    /// Query-major kernels only: the cube takes one selected key block and the query rows
    /// that selected it, gathered from the inverted schedule (`gathered_cube`), and
    /// writes a partial result per (row, list slot) for `crate::gather` to merge. Set with
    /// `blocks = false`: the walk is then the block's own key range.
    pub gathered: bool,
    /// Gathered keys: walk slot `j` is key row `kpos[j]` of k, v and the bias, and its
    /// gradients go to that row (see [`crate::AttnInputs::key_positions`]); masks and the keep
    /// rule read the row as the key's position. The walks are those of a non-causal problem
    /// (`causal` is false).
    pub key_pos: bool,
    /// With `key_pos`: the causal mask applies to the positions.
    pub pos_causal: bool,
    /// Query-major kernels with `key_pos` only: each K/V stage also holds its keys'
    /// positions and, with a bias, their biases (`stage_key_meta`), so the per-element
    /// mask and keep rule read shared memory instead of two dependent gathers from global
    /// memory per element. Needs one bias row per cube: the bias has one head per kv head.
    pub staged_keys: bool,
}

impl FragmentConfig {
    /// What the query-major cube decode reads of this configuration.
    pub fn walk(&self) -> RowsWalk {
        RowsWalk { planes: self.planes, causal: self.causal, windowed: self.windowed, gathered: self.gathered }
    }
}

/// Compile-time flags of the query-major cube decode (`rows_cube`), shared by the fragment
/// and cooperative-matrix kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RowsWalk {
    /// Planes (16 rows each) per cube.
    pub planes: usize,
    /// Bottom-right causal mask.
    pub causal: bool,
    /// Sliding window.
    pub windowed: bool,
    /// One selected key block per cube, with the rows that selected it
    /// ([`FragmentConfig::gathered`]).
    pub gathered: bool,
}

/// The m16n8k16 definition with f32 accumulators.
#[cube]
pub(crate) fn mma_def<F: Float>() -> MmaDefinition<F, F, f32> {
    MmaDefinition::<F, F, f32>::new(16usize, 8usize, 16usize)
}

/// Max over the four lanes of a quad (the lanes that hold one fragment row).
#[cube]
pub(crate) fn quad_max(x: f32) -> f32 {
    let a = max(x, plane_shuffle_xor(x, 1u32));
    max(a, plane_shuffle_xor(a, 2u32))
}

/// Sum over the four lanes of a quad.
#[cube]
pub(crate) fn quad_sum(x: f32) -> f32 {
    let a = x + plane_shuffle_xor(x, 1u32);
    a + plane_shuffle_xor(a, 2u32)
}

/// A fragment (16 rows x 16 columns) of a row-major staged tile: rows `row0..row0 + 16`,
/// columns from 8-wide vector `vcol0` (two vectors).
#[cube]
pub(crate) fn load_a<F: Float>(s: &[Vector<F, V8>], row0: usize, vcol0: usize, #[comptime] sr: usize) -> Array<Vector<F, V2>> {
    let lane = UNIT_POS_X as usize;
    let at = (row0 + lane % 16) * sr + vcol0 + lane / 16;
    mma_def::<F>().load_matrix::<Vector<F, V8>, V2>(&s[at..at + 1], MatrixIdent::A, 4usize, false)
}

/// Two B fragments of a row-major staged `X` whose rows are the k dimension: k rows
/// `row0..row0 + 16`, output columns of vectors `vcol0` and `vcol0 + 1` (fragment `h` in
/// registers `2 h`, `2 h + 1`). Used for `P V`-shaped products (transposing `ldmatrix`).
#[cube]
pub(crate) fn load_b<F: Float>(s: &[Vector<F, V8>], row0: usize, vcol0: usize, #[comptime] sr: usize) -> Array<Vector<F, V2>> {
    let lane = UNIT_POS_X as usize;
    let at = (row0 + lane % 16) * sr + vcol0 + lane / 16;
    mma_def::<F>().load_matrix::<Vector<F, V8>, V2>(&s[at..at + 1], MatrixIdent::B, 4usize, true)
}

/// `acc[2 n .. 2 n + 2] += a * b[2 h .. 2 h + 2]` on one 16 x 8 accumulator tile.
#[cube]
pub(crate) fn mma_into<F: Float>(
    a: &Array<Vector<F, V2>>,
    b4: &Array<Vector<F, V2>>,
    #[comptime] h: usize,
    acc: &mut Array<Vector<f32, V2>>,
    #[comptime] n: usize,
) {
    let mut b_tmp = Array::<Vector<F, V2>>::new(2usize);
    let mut c_tmp = Array::<Vector<f32, V2>>::new(2usize);
    b_tmp[0] = b4[2 * h];
    b_tmp[1] = b4[2 * h + 1];
    c_tmp[0] = acc[2 * n];
    c_tmp[1] = acc[2 * n + 1];
    mma_def::<F>().execute_inplace(a, &b_tmp, &mut c_tmp);
    acc[2 * n] = c_tmp[0];
    acc[2 * n + 1] = c_tmp[1];
}

/// Two B fragments of `X^T` for one k-step: columns `row0..row0 + 8` (registers 0, 1) and
/// `row0 + 8..row0 + 16` (registers 2, 3), k from vector `vcol0` (two vectors).
#[cube]
pub(crate) fn load_bt_pair<F: Float>(s: &[Vector<F, V8>], row0: usize, vcol0: usize, #[comptime] sr: usize) -> Array<Vector<F, V2>> {
    let lane = UNIT_POS_X as usize;
    let at = (row0 + (lane / 16) * 8 + lane % 8) * sr + vcol0 + (lane / 8) % 2;
    mma_def::<F>().load_matrix::<Vector<F, V8>, V2>(&s[at..at + 1], MatrixIdent::B, 4usize, false)
}

/// `acc[0 .. 2 * tiles] = A X^T` for the A fragments `a_frags` (k-step `s` at `4 s`, `ksteps`
/// of them) and a staged `X` whose rows `row0 + 8 n ..` give accumulator tile `n`.
///
/// The MMA and `ldmatrix` instructions are emitted as volatile assembly, so the order written
/// here is the order they issue in: k-steps outer and tiles inner keeps `tiles` independent
/// accumulator chains in flight, and every B fragment of a k-step is loaded before its MMAs.
#[cube]
pub(crate) fn product_abt<F: Float>(
    a_frags: &Array<Vector<F, V2>>,
    x_s: &[Vector<F, V8>],
    row0: usize,
    acc: &mut Array<Vector<f32, V2>>,
    #[comptime] tiles: usize,
    #[comptime] ksteps: usize,
    #[comptime] sr: usize,
) {
    let zero = Vector::<f32, V2>::cast_from(0.0f32);
    let pairs = comptime!(tiles / 2);
    #[unroll]
    for n in 0..tiles {
        acc[2 * n] = zero;
        acc[2 * n + 1] = zero;
    }
    let mut a_tmp = Array::<Vector<F, V2>>::new(4usize);
    let mut b_all = Array::<Vector<F, V2>>::new(comptime!(4 * pairs));
    #[unroll]
    for s in 0..ksteps {
        #[unroll]
        for n2 in 0..pairs {
            let b4 = load_bt_pair::<F>(x_s, row0 + n2 * 16, s * 2, sr);
            #[unroll]
            for x in 0..4usize {
                b_all[n2 * 4 + x] = b4[x];
            }
        }
        #[unroll]
        for x in 0..4usize {
            a_tmp[x] = a_frags[s * 4 + x];
        }
        #[unroll]
        for n in 0..tiles {
            mma_into::<F>(&a_tmp, &b_all, n, acc, n);
        }
    }
}

/// `A X^T` as [`product_abt`], with the A operand read from a staged tile (rows `a_row0..`)
/// instead of registers.
#[cube]
pub(crate) fn product_abt_staged<F: Float>(
    a_s: &[Vector<F, V8>],
    a_row0: usize,
    x_s: &[Vector<F, V8>],
    row0: usize,
    acc: &mut Array<Vector<f32, V2>>,
    #[comptime] tiles: usize,
    #[comptime] ksteps: usize,
    #[comptime] sr: usize,
) {
    let mut a_frags = Array::<Vector<F, V2>>::new(comptime!(4 * ksteps));
    #[unroll]
    for s in 0..ksteps {
        let regs = load_a::<F>(a_s, a_row0, s * 2, sr);
        #[unroll]
        for x in 0..4usize {
            a_frags[s * 4 + x] = regs[x];
        }
    }
    product_abt::<F>(&a_frags, x_s, row0, acc, tiles, ksteps, sr);
}

/// `out += P X` for probabilities held in accumulator layout (`p[2 n]`, `p[2 n + 1]` for
/// 8-wide tile `n`, `ptiles` of them) converted to A fragments in registers, and a staged
/// `X` whose rows are the k dimension (rows `row0..`), `otiles` 8-wide output tiles.
#[cube]
pub(crate) fn product_pb<F: Float>(
    p: &Array<Vector<f32, V2>>,
    x_s: &[Vector<F, V8>],
    row0: usize,
    out: &mut Array<Vector<f32, V2>>,
    #[comptime] ptiles: usize,
    #[comptime] otiles: usize,
    #[comptime] sr: usize,
) {
    let ksteps = comptime!(ptiles / 2);
    let pairs = comptime!(otiles / 2);
    let mut a_all = Array::<Vector<F, V2>>::new(comptime!(4 * ksteps));
    // A registers of k-step kk: (row g, k 0-7), (row g+8, k 0-7), (row g, k 8-15),
    // (row g+8, k 8-15), i.e. the accumulator registers of tiles 2 kk and 2 kk + 1.
    #[unroll]
    for kk in 0..ksteps {
        #[unroll]
        for x in 0..4usize {
            let src = p[4 * kk + x];
            let mut dst = Vector::<F, V2>::empty();
            dst.insert(0usize, F::cast_from(src.extract(0usize)));
            dst.insert(1usize, F::cast_from(src.extract(1usize)));
            a_all[4 * kk + x] = dst;
        }
    }
    let mut a_tmp = Array::<Vector<F, V2>>::new(4usize);
    let mut b_cur = Array::<Vector<F, V2>>::new(4usize);
    let mut b_nxt = Array::<Vector<F, V2>>::new(4usize);
    // Volatile assembly issues in program order: the B fragments of step `i + 1` are loaded
    // before the MMAs of step `i`, which write two independent output tiles.
    let first = load_b::<F>(x_s, row0, 0usize, sr);
    #[unroll]
    for x in 0..4usize {
        b_cur[x] = first[x];
    }
    #[unroll]
    for i in 0..comptime!(ksteps * pairs) {
        let kk = comptime!(i / pairs);
        let n2 = comptime!(i % pairs);
        if comptime!(i + 1 < ksteps * pairs) {
            let nxt = load_b::<F>(x_s, row0 + comptime!((i + 1) / pairs) * 16, comptime!(((i + 1) % pairs) * 2), sr);
            #[unroll]
            for x in 0..4usize {
                b_nxt[x] = nxt[x];
            }
        }
        #[unroll]
        for x in 0..4usize {
            a_tmp[x] = a_all[4 * kk + x];
        }
        #[unroll]
        for h in 0..2usize {
            mma_into::<F>(&a_tmp, &b_cur, h, out, n2 * 2 + h);
        }
        #[unroll]
        for x in 0..4usize {
            b_cur[x] = b_nxt[x];
        }
    }
}

/// `exp(x)` with the hardware's base-2 approximation (`ex2.approx`, about 2 ulp), as
/// FlashAttention computes its softmax; the precise `expf` costs several times the
/// instructions in the loop the tensor cores wait on. CUDA only, like this path.
#[cube]
#[allow(clippy::approx_constant)] // log2(e), spelled out for the kernel expansion
pub(crate) fn fast_exp(x: f32) -> f32 {
    let y = x * 1.442_695_f32;
    let out: f32;
    gpu_asm!("ex2.approx.ftz.f32 {o}, {i};", o = out(_) out, i = in(_) y, options(nomem));
    out
}

/// Starts the asynchronous 16-byte copy (`cp.async`) of `src[gi]` into `dst[at]`, or stores
/// zeros there when `valid` is false. Completion is tracked by the stage's barrier.
#[cube]
pub(crate) fn copy_vec_async<F: Float>(src: &[Vector<F, V8>], gi: usize, dst: &mut [Vector<F, V8>], at: usize, valid: bool) {
    if valid {
        copy_async(&src[gi..gi + 1], &mut dst[at..at + 1], 8u32);
    } else {
        dst[at] = Vector::<F, V8>::cast_from(F::from_int(0));
    }
}

/// The first entry at or after `e` of a query-major walk whose key range is not empty, with
/// that range: dense walks have one entry (`klo..khi`), block walks one per schedule entry
/// (the block clipped to `klo..khi`; `-1` entries are empty). Returns `n_entries` when none.
#[cube]
#[allow(clippy::too_many_arguments)]
pub(crate) fn seek_entry(
    sched: &[i32],
    list_base: usize,
    e: usize,
    n_entries: usize,
    klo: i32,
    khi: i32,
    key_block: usize,
    seq_k: usize,
    #[comptime] blocks: bool,
) -> (usize, i32, i32) {
    let mut at = e;
    let mut lo = klo;
    let mut hi = khi;
    loop {
        if at >= n_entries {
            break;
        }
        let (elo, ehi) = entry_keys(sched, list_base, at, klo, khi, key_block, seq_k, blocks);
        lo = elo;
        hi = ehi;
        if hi > lo {
            break;
        }
        at += 1;
    }
    (at, lo, hi)
}

/// Whether every (row, key) pair of a key tile is attended before the keep rule: a full tile,
/// every row of the cube valid, no threshold, and the tile inside the causal and window
/// bounds of every row (`cq_lo..=cq_hi`). Interior tiles skip the per-element masks.
#[cube]
#[allow(clippy::too_many_arguments)]
pub(crate) fn tile_interior(
    t0: usize,
    t1: usize,
    f0: usize,
    n_group_rows: usize,
    cq_lo: usize,
    cq_hi: usize,
    off: i32,
    w: i32,
    #[comptime] cfg: FragmentConfig,
) -> bool {
    let mut ok = t1 - t0 == cfg.tile && f0 + cfg.planes * 16 <= n_group_rows && !cfg.has_thr && !cfg.key_pos;
    if cfg.causal {
        ok = ok && (t1 as i32 - 1) <= cq_lo as i32 + off;
    }
    if cfg.windowed {
        ok = ok && (t0 as i32) > cq_hi as i32 + off - w;
    }
    ok
}

/// The score of one accumulator element after scale, mask, bias and keep rule (`NEG_BIG`
/// when the pair is not attended), with the key's position and bias read from global memory
/// (`bias_j` is read only when the config has a bias and the pair is visible).
#[cube]
#[allow(clippy::too_many_arguments)]
pub(crate) fn masked_score<F: Float>(
    acc: f32,
    row_ok: bool,
    i: usize,
    j: usize,
    t1: usize,
    bias: &[F],
    bias_base: usize,
    kpos: &[i32],
    kp_base: usize,
    thr: f32,
    thr_i: i32,
    off: i32,
    w: i32,
    scale: f32,
    #[comptime] cfg: FragmentConfig,
) -> f32 {
    // The key's sequence position: its row, or its gathered position (`kp_base`: the kv
    // head's first key row; read only for rows inside the tile).
    let mut jp = j;
    if cfg.key_pos && j < t1 {
        jp = kpos[kp_base + j] as usize;
    }
    let visible = row_ok && j < t1 && pair_visible(i, jp, off, w, cfg.causal || cfg.pos_causal, cfg.windowed);
    let mut bj = 0.0f32;
    if cfg.has_bias && visible {
        bj = f32::cast_from(bias[bias_base + jp]);
    }
    kept_score(acc, visible, jp, bj, thr, thr_i, scale, cfg)
}

/// [`masked_score`] for a staged tile of gathered keys: the key's position and bias come from
/// the stage's slot `slot` ([`stage_key_meta`]); `in_tile` is false past the tile's last key.
#[cube]
#[allow(clippy::too_many_arguments)]
pub(crate) fn staged_score(
    acc: f32,
    row_ok: bool,
    i: usize,
    slot: usize,
    in_tile: bool,
    kp_s: &[i32],
    bias_s: &[f32],
    thr: f32,
    thr_i: i32,
    off: i32,
    w: i32,
    scale: f32,
    #[comptime] cfg: FragmentConfig,
) -> f32 {
    let jp = kp_s[slot] as usize;
    let visible = row_ok && in_tile && pair_visible(i, jp, off, w, cfg.causal || cfg.pos_causal, cfg.windowed);
    let mut bj = 0.0f32;
    if cfg.has_bias {
        bj = bias_s[slot];
    }
    kept_score(acc, visible, jp, bj, thr, thr_i, scale, cfg)
}

/// The common tail of [`masked_score`] and [`staged_score`]: scale, bias and keep rule of a
/// visible pair at key position `jp` with bias `bj`.
#[cube]
#[allow(clippy::too_many_arguments)]
fn kept_score(acc: f32, visible: bool, jp: usize, bj: f32, thr: f32, thr_i: i32, scale: f32, #[comptime] cfg: FragmentConfig) -> f32 {
    let mut s = comptime!(NEG_BIG).runtime();
    if visible {
        let mut sv = acc * scale;
        let mut keep = true;
        if cfg.has_bias {
            sv += bj;
            if cfg.has_thr {
                keep = key_kept(bj, jp, thr, thr_i);
            }
        }
        if keep {
            s = sv;
        }
    }
    s
}

/// Writes the positions of keys `t0..t1` of a gathered-key walk (slots `t0..t1` of `kpos`
/// from `kp_base`) and, with a bias, their biases (from the bias row at `bias_base`) into
/// stage slots `row0..row0 + tile`; slots past `t1` get position 0 and are masked by
/// `in_tile`. Plain shared stores, ordered before the stage's readers by the same barrier
/// and cube sync as the stage's K/V copies.
#[cube]
#[allow(clippy::too_many_arguments)]
pub(crate) fn stage_key_meta<F: Float>(
    kpos: &[i32],
    bias: &[F],
    kp_s: &mut [i32],
    bias_s: &mut [f32],
    kp_base: usize,
    bias_base: usize,
    t0: usize,
    t1: usize,
    row0: usize,
    u: usize,
    #[comptime] cfg: FragmentConfig,
) {
    let nu = comptime!(cfg.planes * 32);
    #[unroll]
    for it in 0..comptime!(cfg.tile.div_ceil(cfg.planes * 32)) {
        let kr = it * nu + u;
        if kr < cfg.tile {
            let mut jp = 0i32;
            let mut bj = 0.0f32;
            if t0 + kr < t1 {
                jp = kpos[kp_base + t0 + kr];
                if cfg.has_bias {
                    bj = f32::cast_from(bias[bias_base + jp as usize]);
                }
            }
            kp_s[row0 + kr] = jp;
            if cfg.has_bias {
                bias_s[row0 + kr] = bj;
            }
        }
    }
}

/// Cubes of a query-major fragment pass: `(batch, list group, row group, chunk)`, or
/// `(batch, list group, tile)` when gathered (`n_chunks` then counts tiles per list).
#[cube]
pub(crate) fn rows_cube_count(a: &RowsArgs, #[comptime] cfg: RowsWalk) -> usize {
    let n_gh = (a.heads_q / a.group_heads) as usize;
    let mut n = a.n_batch as usize * n_gh * a.n_row_blocks as usize * a.n_chunks as usize;
    if cfg.gathered {
        n = a.n_batch as usize * n_gh * a.n_chunks as usize;
    }
    n
}

/// The query rows a query-major fragment cube takes and the keys it may walk (both passes
/// number cubes alike).
#[derive(CubeType)]
pub(crate) struct RowsCube {
    /// Batch.
    pub b: usize,
    /// Group of `group_heads` query heads (one schedule list per schedule row).
    pub g: usize,
    /// Row group (schedule row); 0 when gathered.
    pub r: usize,
    /// First query of the row group, and its length (gathered: 0 and 1).
    pub q0: usize,
    pub nq: usize,
    /// Flat rows of the cube's group (`group_heads * nq`; gathered: of its key block).
    pub n_group_rows: usize,
    /// The cube's first flat row.
    pub f0: usize,
    /// Bounds on the cube's query indices.
    pub cq_lo: usize,
    pub cq_hi: usize,
    /// Gathered: offset of the block's rows in the inverted schedule, and the block.
    pub rows_base: usize,
    pub kbg: usize,
    /// Keys `klo..khi` the masks leave to the walk.
    pub klo: i32,
    pub khi: i32,
}

/// Decodes cube `cid` of a query-major fragment pass (see [`RowsCube`]).
#[cube]
pub(crate) fn rows_cube(
    cid: usize,
    a: &RowsArgs,
    work_off: &[i32],
    inv_off: &[i32],
    inv_rows: &[i32],
    #[comptime] cfg: RowsWalk,
) -> RowsCube {
    let seq_q = a.seq_q as usize;
    let seq_k = a.seq_k as usize;
    let gh = a.group_heads as usize;
    let qb = a.query_block as usize;
    let n_rb = a.n_row_blocks as usize;
    let n_chunks = a.n_chunks as usize;
    let key_block = a.key_block as usize;
    let n_gh = a.heads_q as usize / gh;
    let bq = comptime!(cfg.planes * 16);
    let mut b = cid / (n_chunks * n_rb * n_gh);
    let mut g = (cid / (n_chunks * n_rb)) % n_gh;
    let mut r = (cid / n_chunks) % n_rb;
    let mut q0 = r * qb;
    let mut nq = min(qb, seq_q - q0);
    let mut n_group_rows = gh * nq;
    let mut f0 = (cid % n_chunks) * bq;
    let mut cq_lo = q0;
    let mut cq_hi = q0 + nq - 1;
    let mut rows_base = 0usize;
    let mut kbg = 0usize;
    if cfg.gathered {
        b = cid / (n_chunks * n_gh);
        g = (cid / n_chunks) % n_gh;
        r = 0usize;
        q0 = 0usize;
        nq = 1usize;
        let (kb_c, f0_c, nf_c, rb_c, lo_c, hi_c) = gathered_cube(
            work_off,
            inv_off,
            inv_rows,
            b * n_gh + g,
            cid % n_chunks,
            a.n_kb as usize,
            n_rb,
            a.cap as usize,
            gh * qb,
            qb,
            seq_q,
            bq,
        );
        kbg = kb_c;
        f0 = f0_c;
        n_group_rows = nf_c;
        rows_base = rb_c;
        cq_lo = lo_c;
        cq_hi = hi_c;
    } else {
        let f1 = min(f0 + bq, n_group_rows) - 1;
        if f0 / nq == f1 / nq {
            cq_lo = q0 + f0 % nq;
            cq_hi = q0 + f1 % nq;
        }
    }
    let mut klo = 0i32;
    let mut khi = seq_k as i32;
    if cfg.gathered {
        // The selected block only; a cube past its list's tiles walks nothing.
        klo = (kbg * key_block) as i32;
        khi = min((kbg + 1) * key_block, seq_k) as i32;
        if n_group_rows == 0 {
            khi = klo;
        }
    }
    if cfg.causal {
        khi = min(khi, cq_hi as i32 + a.off + 1);
    }
    if cfg.windowed {
        klo = max(klo, cq_lo as i32 + a.off - a.w + 1);
    }
    RowsCube { b, g, r, q0, nq, n_group_rows, f0, cq_lo, cq_hi, rows_base, kbg, klo, khi }
}

/// The work of a gathered query-major cube: cube `cid` is tile `t` of list `bs`
/// (`bs = b * n_lists + g`), where the list's tiles run over its key blocks in order
/// (`work_off[bs]`, `n_kb + 1` prefix entries) and each block's tiles over the rows that
/// selected it (`inv_off` / `inv_rows`, the inverted schedule), `per_entry = gh * qb` flat
/// rows per schedule row, `bq` flat rows per tile.
///
/// Returns `(kb, f0, n_flat, rows_base, cq_lo, cq_hi)`: the key block, the tile's first
/// flat row, the block's number of flat rows (0 for a cube past the list's last tile), the
/// offset of the block's rows in `inv_rows`, and bounds on the tile's query indices (rows
/// are ascending in the inverted schedule).
#[cube]
#[allow(clippy::too_many_arguments)]
pub(crate) fn gathered_cube(
    work_off: &[i32],
    inv_off: &[i32],
    inv_rows: &[i32],
    bs: usize,
    t: usize,
    n_kb: usize,
    n_rb: usize,
    cap: usize,
    per_entry: usize,
    qb: usize,
    seq_q: usize,
    bq: usize,
) -> (usize, usize, usize, usize, usize, usize) {
    let wb = bs * (n_kb + 1);
    let mut kb = 0usize;
    let mut f0 = 0usize;
    let mut n_flat = 0usize;
    let mut rows_base = 0usize;
    let mut cq_lo = 0usize;
    let mut cq_hi = 0usize;
    if (t as i32) < work_off[wb + n_kb] {
        // Largest kb with work_off[kb] <= t (blocks without rows have empty ranges).
        let mut lo = 0usize;
        let mut hi = n_kb;
        while hi - lo > 1 {
            let mid = (lo + hi) / 2;
            if work_off[wb + mid] as usize <= t {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        kb = lo;
        let o0 = inv_off[wb + kb] as usize;
        let o1 = inv_off[wb + kb + 1] as usize;
        rows_base = bs * n_rb * cap + o0;
        n_flat = (o1 - o0) * per_entry;
        f0 = (t - work_off[wb + kb] as usize) * bq;
        let f1 = min(f0 + bq, n_flat) - 1;
        cq_lo = inv_rows[rows_base + f0 / per_entry] as usize * qb;
        cq_hi = min(inv_rows[rows_base + f1 / per_entry] as usize * qb + qb, seq_q) - 1;
    }
    (kb, f0, n_flat, rows_base, cq_lo, cq_hi)
}

/// Query head, query index and schedule row of flat row `flat` of a query-major cube, and
/// whether it exists. Row groups: flat rows run over the group's `gh` heads, `nq` queries
/// each, from query `q0` of schedule row `r`. Gathered: over the entries of the inverted
/// list at `rows_base`, `gh * qb` flat rows per entry (heads outer, queries inner).
#[cube]
#[allow(clippy::too_many_arguments)]
pub(crate) fn flat_row(
    inv_rows: &[i32],
    flat: usize,
    n_flat: usize,
    g: usize,
    gh: usize,
    q0: usize,
    nq: usize,
    r: usize,
    rows_base: usize,
    qb: usize,
    seq_q: usize,
    #[comptime] gathered: bool,
) -> (bool, usize, usize, usize) {
    let mut ok = flat < n_flat;
    let mut h = g * gh;
    let mut i = q0;
    let mut srow = r;
    if ok {
        if gathered {
            let per = gh * qb;
            srow = inv_rows[rows_base + flat / per] as usize;
            let rem = flat % per;
            h = g * gh + rem / qb;
            i = srow * qb + rem % qb;
            ok = i < seq_q;
        } else {
            h = g * gh + flat / nq;
            i = q0 + flat % nq;
        }
    }
    (ok, h, i, srow)
}

/// Position of key block `kb` in the sanitized list at `list_base` (`cap` entries).
#[cube]
pub(crate) fn list_slot(sched: &[i32], list_base: usize, cap: usize, kb: usize) -> usize {
    let mut slot = 0usize;
    for e in 0..cap {
        if sched[list_base + e] == kb as i32 {
            slot = e;
        }
    }
    slot
}
