//! CubeCL flash-attention kernels: dense and block-sparse, forward and backward, with an
//! optional additive per-key bias and a per-row dynamic-mask threshold. No Burn here: the
//! API takes raw [`Handle`]s and a runtime-erased [`Client`], so any CubeCL runtime works
//! (wgpu/WGSL, Vulkan SPIR-V, CUDA, CPU).
//!
//! # Semantics
//! Contiguous row-major tensors: `q [B, Hq, Sq, D]`, `k, v [B, Hkv, Sk, D]`,
//! `o [B, Hq, Sq, D]`, `lse [B, Hq, Sq]` (f32, natural log). Query head `h` reads kv head
//! `h / (Hq / Hkv)`. Score `s_ij = scale * q_i . k_j (+ bias_j)`. Causal masks are
//! bottom-right aligned: query `i` sees key `j` iff `j <= i + (Sk - Sq)`; a window `w`
//! additionally requires `j > i + (Sk - Sq) - w` (the `w` most recent keys, diagonal
//! included; the window bound applies even without `causal`). A row with no visible key
//! gets `o = 0`, `lse = -inf` and zero gradients. See [`reference`] for an executable
//! definition in f64.
//!
//! # Kernels
//! See `README.md` of this crate for the full design. In short: a query-major kernel
//! computes the forward and dQ; a key-major kernel computes dK, dV and dbias; block
//! schedules are sanitized (sorted, deduplicated) and inverted into a CSR on the device for
//! the key-major pass. Two implementations of both passes, picked per call by
//! [`kernel_path`]: tensor cores ([`mma`]: `cmma` fragments, one plane per 16 rows) where the
//! device reports cooperative matrices for the dtype, and a portable one ([`kernels`]: one
//! unit per row, no plane ops, no cmma) everywhere else. Neither uses atomics.
//!
//! Kernels are compiled at first use for each combination of dtype, head dim, tile sizes
//! and mask flags, and cached by CubeCL for the life of the client (on CUDA the first call
//! of each variant pays an NVRTC compile of a few hundred ms).

#![warn(missing_docs)]

#[allow(missing_docs, clippy::manual_is_multiple_of)]
pub mod kernels;
#[allow(missing_docs, clippy::manual_is_multiple_of)]
pub mod mma;
#[allow(clippy::manual_is_multiple_of)]
pub mod fragment;
pub mod reference;
pub mod host;

use cubecl::prelude::*;
pub use cubecl::client::Client;
pub use cubecl::server::Handle;
use cubecl::tf32;
use half::{bf16, f16};

/// Element type of q, k, v, o, dO, dq, dk, dv, bias and dbias. The LSE, `delta`, the
/// threshold values and all accumulators are always f32.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AttnDtype {
    /// 32-bit float.
    F32,
    /// IEEE half precision.
    F16,
    /// bfloat16 (needs runtime support: CUDA, Vulkan SPIR-V with the extension).
    BF16,
}

impl AttnDtype {
    /// Size of one element in bytes.
    pub fn size(self) -> usize {
        match self {
            AttnDtype::F32 => 4,
            AttnDtype::F16 | AttnDtype::BF16 => 2,
        }
    }
}

/// Problem dimensions and mask options.
#[derive(Clone, Debug, PartialEq)]
pub struct AttnProblem {
    /// Batch size `B`.
    pub batch: usize,
    /// Query heads `Hq` (a multiple of `heads_kv`).
    pub heads_q: usize,
    /// Key/value heads `Hkv`.
    pub heads_kv: usize,
    /// Query length `Sq`.
    pub seq_q: usize,
    /// Key length `Sk`.
    pub seq_k: usize,
    /// Head dimension `D` (1..=[`MAX_HEAD_DIM`]).
    pub head_dim: usize,
    /// Score scale (usually `1 / sqrt(D)`).
    pub scale: f32,
    /// Bottom-right aligned causal mask.
    pub causal: bool,
    /// Sliding window: query `i` sees only keys `j > i + (Sk - Sq) - w`. Must be >= 1.
    pub window: Option<usize>,
}

/// A block-sparse schedule: for each (batch, selection head, schedule row) a list of
/// key-block indices, `-1`-padded, in any order; duplicates count once; indices outside
/// `0..ceil(Sk / key_block)` are ignored (never read out of bounds).
#[derive(Clone, Debug)]
pub struct BlockSchedule {
    /// `i32 [B, sel_heads, ceil(Sq / query_block), capacity]`.
    pub indices: Handle,
    /// `Hs`: each selection head serves `Hq / Hs` consecutive query heads; `Hs` must divide
    /// `Hq` and be a multiple of `Hkv` (usually `Hq`, or `Hkv` for GQA-shared lists).
    pub sel_heads: usize,
    /// `C`, entries per list.
    pub capacity: usize,
    /// `Bq`: schedule row `r` covers queries `[r*Bq, min((r+1)*Bq, Sq))`.
    pub query_block: usize,
    /// `Bk`: key block `b` covers keys `[b*Bk, min((b+1)*Bk, Sk))`.
    pub key_block: usize,
}

/// Additive per-key bias, optionally with a per-row keep threshold (dynamic-mask attention).
#[derive(Clone, Debug)]
pub struct KeyBias {
    /// `[B, heads, Sk]` in the attention dtype.
    pub values: Handle,
    /// `Hb`: bias head of query head `h` is `h / (Hq / Hb)`; `Hb` must divide `Hq` and be a
    /// multiple of `Hkv` (usually `Hkv` or `Hq`).
    pub heads: usize,
    /// `(thr_value: f32 [B, Hb, Sq], thr_index: i32 [B, Hb, Sq])`: a visible key `j` is kept
    /// for row `i` iff `bias_j > thr_value[i] || (bias_j == thr_value[i] && j >= thr_index[i])`.
    /// `(-inf, 0)` keeps everything. Key tiles with no kept key are skipped.
    pub threshold: Option<(Handle, Handle)>,
}

/// The inputs of a forward or backward call.
#[derive(Clone, Copy, Debug)]
pub struct AttnInputs<'a> {
    /// `[B, Hq, Sq, D]`.
    pub q: &'a Handle,
    /// `[B, Hkv, Sk, D]`.
    pub k: &'a Handle,
    /// `[B, Hkv, Sk, D]`.
    pub v: &'a Handle,
    /// Optional additive key bias (and threshold).
    pub bias: Option<&'a KeyBias>,
    /// `None` = dense (every key allowed by causal/window), else block-sparse.
    pub schedule: Option<&'a BlockSchedule>,
}

/// Gradients returned by [`attention_backward`].
#[derive(Clone, Debug)]
pub struct AttnGrads {
    /// `[B, Hq, Sq, D]`.
    pub dq: Handle,
    /// `[B, Hkv, Sk, D]`.
    pub dk: Handle,
    /// `[B, Hkv, Sk, D]`.
    pub dv: Handle,
    /// `[B, Hb, Sk]`, present iff a bias was given.
    pub dbias: Option<Handle>,
}

/// Largest supported head dimension (per-unit local arrays hold 4 rows of this size).
pub const MAX_HEAD_DIM: usize = 256;

/// Errors of this crate. Messages name the offending argument.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KernelError {
    /// A shape, parameter or buffer size is invalid.
    InvalidArgument {
        /// The argument (e.g. `"problem.heads_kv"`, `"inputs.q"`).
        arg: &'static str,
        /// What is wrong.
        msg: String,
    },
    /// The combination is valid but this runtime/device or this crate does not support it.
    Unsupported {
        /// The argument (e.g. `"dtype"`, `"problem.head_dim"`).
        arg: &'static str,
        /// Why.
        msg: String,
    },
}

impl std::fmt::Display for KernelError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KernelError::InvalidArgument { arg, msg } => write!(f, "invalid argument `{arg}`: {msg}"),
            KernelError::Unsupported { arg, msg } => write!(f, "unsupported `{arg}`: {msg}"),
        }
    }
}

impl std::error::Error for KernelError {}

fn invalid(arg: &'static str, msg: impl Into<String>) -> KernelError {
    KernelError::InvalidArgument { arg, msg: msg.into() }
}

fn unsupported(arg: &'static str, msg: impl Into<String>) -> KernelError {
    KernelError::Unsupported { arg, msg: msg.into() }
}

fn has_elem(client: &Client, e: ElemType) -> bool {
    client.properties().features.types.elem.contains_key(&e)
}

/// `Ok` when `dtype` can be used on this client's device.
pub fn supports(client: &Client, dtype: AttnDtype) -> Result<(), KernelError> {
    use cubecl::ir::FloatKind;
    let (kind, name) = match dtype {
        AttnDtype::F32 => return Ok(()),
        AttnDtype::F16 => (FloatKind::F16, "f16"),
        AttnDtype::BF16 => (FloatKind::BF16, "bf16"),
    };
    if has_elem(client, ElemType::Float(kind)) {
        Ok(())
    } else {
        Err(unsupported(
            "dtype",
            format!("{name} is not supported by runtime `{}` on device '{}'", client.name(), client.properties().identity.name),
        ))
    }
}

/// Which kernel path [`attention_forward`] / [`attention_backward`] use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelPath {
    /// Portable: no plane ops, no tensor cores, no atomics; f32 arithmetic throughout.
    Portable,
    /// Tensor cores (`cmma`, 16 x 16 fragments, one plane each): products of f16 / bf16
    /// operands, or TF32 for f32 inputs (10-bit mantissa, as cuBLAS and Burn's f32 matmul
    /// on CUDA), accumulated in f32; softmax, masks and bias in f32.
    TensorCore,
    /// Register fragments (CUDA `mma.sync` m16n8k16 + `ldmatrix`, f16/bf16, head dims that
    /// are multiples of 16 up to 128): FlashAttention-2's recipe, with Q, S, P and O (dQ, dK,
    /// dV in the backward) in registers for a whole pass. See [`fragment`].
    Fragment,
}

/// Environment variable that forces a path: `portable`, `tensor-core` or `fragment` (the
/// latter two still fall back when the device cannot run them). Unset: the best path the
/// device supports.
pub const KERNEL_PATH_ENV: &str = "SPARSE_ATTN_KERNEL_PATH";

/// The operand type and fragment depth of the tensor-core path for `dtype`, when the device
/// reports a matching 16 x 16 x k cooperative-matrix configuration with f32 accumulation
/// and a fixed plane size of at least 16 lanes.
#[derive(Clone, Copy, Debug)]
struct MmaSpec {
    /// Fragment depth `k` (16 for f16/bf16, 8 for tf32).
    mk: usize,
    /// Bytes per staged operand.
    op_size: usize,
    /// Lanes per plane.
    plane: usize,
}

fn mma_spec(client: &Client, dtype: AttnDtype, head_dim: usize) -> Option<MmaSpec> {
    use cubecl::ir::FloatKind;
    use cubecl::ir::features::MmaConfig;
    match std::env::var(KERNEL_PATH_ENV).as_deref() {
        Ok("portable") => return None,
        Ok("") | Ok("tensor-core") | Ok("fragment") | Err(_) => {}
        Ok(other) => panic!("{KERNEL_PATH_ENV}={other}: expected `portable`, `tensor-core` or `fragment`"),
    }
    if !head_dim.is_multiple_of(16) {
        return None;
    }
    let p = client.properties();
    let plane = p.hardware.plane_size_max as usize;
    if p.hardware.plane_size_min as usize != plane || !(16..=64).contains(&plane) {
        return None;
    }
    let (kind, mk, op_size) = match dtype {
        AttnDtype::F16 => (FloatKind::F16, 16, 2),
        AttnDtype::BF16 => (FloatKind::BF16, 16, 2),
        AttnDtype::F32 => (FloatKind::TF32, 8, 4),
    };
    let cfg = MmaConfig {
        a_type: ElemType::Float(kind),
        b_type: ElemType::Float(kind),
        cd_type: ElemType::Float(FloatKind::F32),
        m: 16,
        n: 16,
        k: mk as u32,
    };
    p.features.matmul.cmma.contains(&cfg).then_some(MmaSpec { mk, op_size, plane })
}

/// The path [`attention_forward`] and [`attention_backward`] take for `dtype` and
/// `head_dim` on this client (tensor cores need a head dim that is a multiple of 16).
pub fn kernel_path(client: &Client, dtype: AttnDtype, head_dim: usize) -> KernelPath {
    match mma_spec(client, dtype, head_dim) {
        Some(_) if fragment_supported(client, dtype, head_dim) => KernelPath::Fragment,
        Some(_) => KernelPath::TensorCore,
        None => KernelPath::Portable,
    }
}

/// The fragment path reads q, k, v (and dO) as 16-byte vectors: every handle must start on a
/// 16-byte boundary (true of fresh allocations; a view at an odd offset takes another path).
fn vector_aligned(handles: &[&Handle]) -> bool {
    handles.iter().all(|h| h.offset_start.unwrap_or(0).is_multiple_of(16))
}

/// Whether the register-fragment path can run `dtype` / `head_dim` here: CUDA (whose PTX
/// fragment layout the kernels rely on), a plane of 32, f16/bf16 m16n8k16 `mma` with f32
/// accumulators and `ldmatrix`, `head_dim` a multiple of 16 up to 128 (register budget).
fn fragment_supported(client: &Client, dtype: AttnDtype, head_dim: usize) -> bool {
    use cubecl::ir::FloatKind;
    use cubecl::ir::features::MmaConfig;
    if matches!(std::env::var(KERNEL_PATH_ENV).as_deref(), Ok("portable") | Ok("tensor-core")) {
        return false;
    }
    let kind = match dtype {
        AttnDtype::F16 => FloatKind::F16,
        AttnDtype::BF16 => FloatKind::BF16,
        AttnDtype::F32 => return false,
    };
    let p = client.properties();
    let cfg = MmaConfig {
        a_type: ElemType::Float(kind),
        b_type: ElemType::Float(kind),
        cd_type: ElemType::Float(FloatKind::F32),
        m: 16,
        n: 8,
        k: 16,
    };
    client.name().to_ascii_lowercase().contains("cuda")
        && p.hardware.plane_size_min == 32
        && p.hardware.plane_size_max == 32
        && head_dim.is_multiple_of(16)
        && head_dim <= 128
        && p.features.matmul.mma.contains(&cfg)
        && p.features.matmul.ldmatrix.contains(&ElemType::Float(kind))
}

/// One-line capability summary of the client's device, and the chosen path.
pub fn describe(client: &Client) -> String {
    use cubecl::ir::FloatKind;
    let p = client.properties();
    let f = &p.features;
    format!(
        "runtime={} device='{}' fingerprint='{}' plane={:?} plane_size={}..{} f16={} bf16={} cmma_configs={} \
         max_units_per_cube={} max_shared_mem={}B max_bindings={} path(f32,f16,bf16; d=64)={:?},{:?},{:?}",
        client.name(),
        p.identity.name,
        p.identity.fingerprint,
        f.plane,
        p.hardware.plane_size_min,
        p.hardware.plane_size_max,
        has_elem(client, ElemType::Float(FloatKind::F16)),
        has_elem(client, ElemType::Float(FloatKind::BF16)),
        f.matmul.cmma.len(),
        p.hardware.max_units_per_cube,
        p.hardware.max_shared_memory_size,
        p.hardware.max_bindings,
        kernel_path(client, AttnDtype::F32, 64),
        kernel_path(client, AttnDtype::F16, 64),
        kernel_path(client, AttnDtype::BF16, 64),
    )
}

// ---------------------------------------------------------------------------------------
// Validation
// ---------------------------------------------------------------------------------------

fn check_size(arg: &'static str, h: &Handle, elems: usize, elem_size: usize) -> Result<(), KernelError> {
    let need = (elems * elem_size) as u64;
    let have = h.size_in_used();
    if have < need {
        return Err(invalid(arg, format!("buffer has {have} bytes, expected at least {need} ({elems} elements)")));
    }
    Ok(())
}

fn validate(client: &Client, p: &AttnProblem, dtype: AttnDtype, inp: &AttnInputs) -> Result<(), KernelError> {
    supports(client, dtype)?;
    for (v, name) in [
        (p.batch, "problem.batch"),
        (p.heads_q, "problem.heads_q"),
        (p.heads_kv, "problem.heads_kv"),
        (p.seq_q, "problem.seq_q"),
        (p.seq_k, "problem.seq_k"),
        (p.head_dim, "problem.head_dim"),
    ] {
        if v == 0 {
            return Err(invalid(name, "must be >= 1"));
        }
    }
    if !p.heads_q.is_multiple_of(p.heads_kv) {
        return Err(invalid("problem.heads_kv", format!("heads_q = {} is not a multiple of heads_kv = {}", p.heads_q, p.heads_kv)));
    }
    if p.head_dim > MAX_HEAD_DIM {
        return Err(unsupported("problem.head_dim", format!("{} > {MAX_HEAD_DIM}", p.head_dim)));
    }
    if !p.scale.is_finite() {
        return Err(invalid("problem.scale", "must be finite"));
    }
    if p.window == Some(0) {
        return Err(invalid("problem.window", "must be >= 1"));
    }
    for (n, name) in [(p.seq_q, "problem.seq_q"), (p.seq_k, "problem.seq_k")] {
        if n > i32::MAX as usize / 2 {
            return Err(unsupported(name, "too long for 32-bit mask arithmetic"));
        }
    }
    let es = dtype.size();
    let (b, hq, hkv, sq, sk, d) = (p.batch, p.heads_q, p.heads_kv, p.seq_q, p.seq_k, p.head_dim);
    check_size("inputs.q", inp.q, b * hq * sq * d, es)?;
    check_size("inputs.k", inp.k, b * hkv * sk * d, es)?;
    check_size("inputs.v", inp.v, b * hkv * sk * d, es)?;
    if let Some(bias) = inp.bias {
        let hb = bias.heads;
        if hb == 0 || hq % hb != 0 || hb % hkv != 0 {
            return Err(invalid(
                "bias.heads",
                format!("{hb} must divide heads_q = {hq} and be a multiple of heads_kv = {hkv}"),
            ));
        }
        check_size("bias.values", &bias.values, b * hb * sk, es)?;
        if let Some((tv, ti)) = &bias.threshold {
            check_size("bias.threshold.0 (value)", tv, b * hb * sq, 4)?;
            check_size("bias.threshold.1 (index)", ti, b * hb * sq, 4)?;
        }
    }
    if let Some(s) = inp.schedule {
        let hs = s.sel_heads;
        if hs == 0 || hq % hs != 0 || hs % hkv != 0 {
            return Err(invalid(
                "schedule.sel_heads",
                format!("{hs} must divide heads_q = {hq} and be a multiple of heads_kv = {hkv}"),
            ));
        }
        if s.capacity == 0 {
            return Err(invalid("schedule.capacity", "must be >= 1"));
        }
        if s.query_block == 0 {
            return Err(invalid("schedule.query_block", "must be >= 1"));
        }
        if s.key_block == 0 {
            return Err(invalid("schedule.key_block", "must be >= 1"));
        }
        let r = sq.div_ceil(s.query_block);
        check_size("schedule.indices", &s.indices, b * hs * r * s.capacity, 4)?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Planning
// ---------------------------------------------------------------------------------------

/// Tile sizes and cube widths picked from the device properties.
#[derive(Clone, Copy, Debug)]
struct Plan {
    /// Units (query rows) per cube of the query-major kernel.
    rows_units: usize,
    /// Keys per staged K/V tile in the query-major kernel.
    tile_k: usize,
    /// Units (keys) per cube of the key-major kernel.
    keys_units: usize,
    /// Query rows per staged Q/dO tile in the key-major kernel.
    tile_q: usize,
}

/// Storage buffers bound by the largest kernel (`attn_keys_kernel`), metadata included.
const KERNEL_BINDINGS: usize = 15;

const TILE_CHOICES: [usize; 6] = [32, 16, 8, 4, 2, 1];

fn plan(client: &Client, p: &AttnProblem, sched: Option<&BlockSchedule>) -> Result<Plan, KernelError> {
    let hw = &client.properties().hardware;
    // The key-major kernel binds 14 storage buffers (+1 for CubeCL's metadata); WebGPU's
    // default limit is 8, native adapters report 16-31.
    if (hw.max_bindings as usize) < KERNEL_BINDINGS {
        return Err(unsupported(
            "client",
            format!("the device allows {} storage buffers per kernel, these kernels need {KERNEL_BINDINGS}", hw.max_bindings),
        ));
    }
    let max_units = (hw.max_units_per_cube as usize).min(hw.max_cube_dim.0 as usize).max(1);
    // Leave a margin: some compilers add a few shared variables of their own.
    let smem = hw.max_shared_memory_size.saturating_sub(512);
    let d = p.head_dim;
    let rows_units = match sched {
        None => 64.min(max_units),
        Some(s) => (p.heads_q / s.sel_heads * s.query_block).clamp(1, 64).min(max_units),
    };
    let keys_units = match sched {
        None => 32.min(max_units),
        Some(s) => s.key_block.clamp(1, 32).min(max_units),
    };
    let max_tile_k = match sched {
        None => 32,
        Some(s) => s.key_block.next_power_of_two().min(32),
    };
    let tile_k = TILE_CHOICES
        .into_iter()
        .filter(|&t| t <= max_tile_k)
        .find(|&t| 2 * t * d * 4 + rows_units * 4 <= smem)
        .ok_or_else(|| unsupported("problem.head_dim", format!("{d} does not fit in {smem} B of shared memory")))?;
    let tile_q = TILE_CHOICES
        .into_iter()
        .find(|&t| 2 * t * d * 4 + t * 5 * 4 + keys_units * 4 <= smem)
        .ok_or_else(|| unsupported("problem.head_dim", format!("{d} does not fit in {smem} B of shared memory")))?;
    Ok(Plan { rows_units, tile_k, keys_units, tile_q })
}

/// Tile shape of a tensor-core kernel: `planes` planes of 16 rows each, and the depth of the
/// staged tile on the other side (`tile_k` keys or `tile_q` query rows).
#[derive(Clone, Copy, Debug)]
struct MmaPlan {
    planes: usize,
    tile: usize,
}

/// Shared memory a tensor-core cube may use: at most half of a large SM, so two cubes fit.
const MMA_SMEM_BUDGET: usize = 112 * 1024;
/// Slack for the alignment padding of the shared arrays.
const MMA_SMEM_SLACK: usize = 32 * 12;

fn mma_smem_limit(client: &Client) -> usize {
    client.properties().hardware.max_shared_memory_size.saturating_sub(1024).min(MMA_SMEM_BUDGET)
}

fn mma_max_planes(client: &Client, spec: &MmaSpec) -> usize {
    let hw = &client.properties().hardware;
    (hw.max_units_per_cube as usize / spec.plane).min(hw.max_cube_dim.1 as usize).clamp(0, 4)
}

/// Shape of the query-major tensor-core kernel (`backward`: the dQ pass), largest first.
fn mma_rows_plan(
    client: &Client,
    p: &AttnProblem,
    sched: Option<&BlockSchedule>,
    spec: &MmaSpec,
    backward: bool,
) -> Option<MmaPlan> {
    let d = p.head_dim;
    let rows = sched.map_or(64, |s| p.heads_q / s.sel_heads * s.query_block);
    let max_planes = rows.div_ceil(16).clamp(1, 4).min(mma_max_planes(client, spec));
    let max_tile = sched.map_or(64, |s| s.key_block.next_multiple_of(16).clamp(16, 64));
    let limit = mma_smem_limit(client);
    let op = spec.op_size;
    for planes in [4, 2, 1].into_iter().filter(|&x| x <= max_planes) {
        for tile in [64, 32, 16].into_iter().filter(|&t| t <= max_tile) {
            let bq = 16 * planes;
            let (ld, lacc, ls, lp) = (d + 8, d + 4, tile + 4, tile + 8);
            let do_len = if backward { bq * ld } else { 32 };
            let dp_len = if backward { bq * ls } else { 32 };
            let bytes = op * (bq * ld + do_len + 2 * tile * ld + bq * lp)
                + 4 * (bq * lacc + bq * ls + dp_len)
                + 4 * bq
                + 8 * bq * (spec.plane / 16)
                + MMA_SMEM_SLACK;
            if bytes <= limit {
                return Some(MmaPlan { planes, tile });
            }
        }
    }
    None
}

/// Shape of the key-major tensor-core kernel, largest first.
fn mma_keys_plan(client: &Client, p: &AttnProblem, sched: Option<&BlockSchedule>, spec: &MmaSpec) -> Option<MmaPlan> {
    let d = p.head_dim;
    let max_planes = sched
        .map_or(4, |s| s.key_block.div_ceil(16).clamp(1, 4))
        .min(mma_max_planes(client, spec));
    let limit = mma_smem_limit(client);
    let op = spec.op_size;
    for planes in [4, 2, 1].into_iter().filter(|&x| x <= max_planes) {
        for tile in [64, 32, 16] {
            let bk = 16 * planes;
            let (ld, lacc, ls, lp) = (d + 8, d + 4, tile + 4, tile + 8);
            let bytes = op * (2 * bk * ld + 2 * tile * ld + bk * lp)
                + 4 * (2 * bk * lacc + 2 * bk * ls)
                + 20 * tile
                + 8 * bk * (spec.plane / 16)
                + MMA_SMEM_SLACK;
            if bytes <= limit {
                return Some(MmaPlan { planes, tile });
            }
        }
    }
    None
}

/// A grid of `n` cubes, folded into 2-D when `n` exceeds the per-dimension limit.
fn grid(client: &Client, n: usize) -> CubeCount {
    let lim = (client.properties().hardware.max_cube_count.0 as usize).clamp(1, 65535);
    let n = n.max(1);
    let x = n.min(lim);
    let y = n.div_ceil(x);
    CubeCount::Static(x as u32, y as u32, 1)
}

fn per_unit_launch(client: &Client, n_items: usize) -> (CubeCount, CubeDim) {
    let hw = &client.properties().hardware;
    let units = 64.min(hw.max_units_per_cube as usize).min(hw.max_cube_dim.0 as usize).max(1);
    (grid(client, n_items.div_ceil(units)), CubeDim::new_1d(units as u32))
}

fn mask_params(p: &AttnProblem) -> (i32, i32, bool) {
    let off = p.seq_k as i32 - p.seq_q as i32;
    match p.window {
        Some(w) => (off, w.min(i32::MAX as usize / 4) as i32, true),
        None => (off, 0, false),
    }
}

/// Buffer argument over `len` elements of `h`.
fn buf(h: &Handle, len: usize) -> BufferArg {
    // SAFETY: every caller passes a handle whose size was validated to hold `len` elements
    // of the kernel's element type (or a freshly allocated one of that size).
    unsafe { BufferArg::from_raw_parts(h.clone(), len.max(1)) }
}

/// A device buffer filled with zeros, used for absent optional inputs.
fn dummy(client: &Client, bytes: usize) -> Handle {
    client.create_from_slice(&vec![0u8; bytes.max(4)])
}

// ---------------------------------------------------------------------------------------
// Schedules
// ---------------------------------------------------------------------------------------

/// A schedule after sanitizing: every list sorted ascending, unique, valid, `-1`-padded.
struct CleanSchedule {
    clean: Handle,
    n_rows: usize,
    nkb: usize,
}

fn sanitize(client: &Client, p: &AttnProblem, s: &BlockSchedule) -> CleanSchedule {
    let n_rows = p.seq_q.div_ceil(s.query_block);
    let nkb = p.seq_k.div_ceil(s.key_block);
    let n_lists = p.batch * s.sel_heads * n_rows;
    let len = n_lists * s.capacity;
    let clean = client.empty(len * 4);
    let (count, dim) = per_unit_launch(client, n_lists);
    kernels::sanitize_schedule_kernel::launch(
        client,
        count,
        dim,
        buf(&s.indices, len),
        buf(&clean, len),
        n_lists as u32,
        s.capacity as u32,
        nkb as u32,
    );
    CleanSchedule { clean, n_rows, nkb }
}

/// The inverted schedule in CSR form: for each (batch, sel head, key block) the rows that
/// selected it (and can see it), ascending.
struct Inverted {
    offsets: Handle,
    rows: Handle,
}

fn invert(client: &Client, p: &AttnProblem, s: &BlockSchedule, cs: &CleanSchedule) -> Inverted {
    let n_bs = p.batch * s.sel_heads;
    let n_items = n_bs * cs.nkb;
    let counts = client.empty(n_items * 4);
    let offsets = client.empty(n_bs * (cs.nkb + 1) * 4);
    // Capacity: each row lists a block at most once, so R*C rows per (batch, sel head).
    let rows_len = n_bs * cs.n_rows * s.capacity;
    let rows = client.empty(rows_len * 4);
    let (off, w, windowed) = mask_params(p);
    let clean_len = n_bs * cs.n_rows * s.capacity;
    for fill in [false, true] {
        if fill {
            let (count, dim) = per_unit_launch(client, n_bs);
            kernels::prefix_sum_kernel::launch(
                client,
                count,
                dim,
                buf(&counts, n_items),
                buf(&offsets, n_bs * (cs.nkb + 1)),
                n_bs as u32,
                cs.nkb as u32,
            );
        }
        let hw = &client.properties().hardware;
        let units = 128.min(hw.max_units_per_cube as usize).min(hw.max_cube_dim.0 as usize).max(1);
        kernels::invert_schedule_kernel::launch(
            client,
            grid(client, n_items),
            CubeDim::new_1d(units as u32),
            buf(&cs.clean, clean_len),
            buf(&counts, n_items),
            buf(&offsets, n_bs * (cs.nkb + 1)),
            buf(&rows, rows_len),
            n_items as u32,
            cs.nkb as u32,
            cs.n_rows as u32,
            s.capacity as u32,
            s.query_block as u32,
            s.key_block as u32,
            p.seq_q as u32,
            p.seq_k as u32,
            off,
            w,
            units,
            p.causal,
            windowed,
            fill,
        );
    }
    Inverted { offsets, rows }
}

// ---------------------------------------------------------------------------------------
// Forward / backward
// ---------------------------------------------------------------------------------------

/// The bias and threshold buffers as both passes bind them: the caller's, or 1-element
/// placeholders that the kernels' `#[comptime]` flags never read.
struct BiasArgs {
    values: Handle,
    len: usize,
    heads: usize,
    thr_v: Handle,
    thr_i: Handle,
    thr_len: usize,
    has_bias: bool,
    has_thr: bool,
}

impl BiasArgs {
    fn new(client: &Client, p: &AttnProblem, dtype: AttnDtype, inputs: &AttnInputs) -> Self {
        let (values, len, heads) = match inputs.bias {
            Some(b) => (b.values.clone(), p.batch * b.heads * p.seq_k, b.heads),
            None => (dummy(client, dtype.size()), 1, p.heads_kv),
        };
        let (thr_v, thr_i, thr_len) = match inputs.bias.and_then(|b| b.threshold.as_ref()) {
            Some((tv, ti)) => (tv.clone(), ti.clone(), p.batch * heads * p.seq_q),
            None => (dummy(client, 4), dummy(client, 4), 1),
        };
        Self {
            values,
            len,
            heads,
            thr_v,
            thr_i,
            thr_len,
            has_bias: inputs.bias.is_some(),
            has_thr: inputs.bias.is_some_and(|b| b.threshold.is_some()),
        }
    }
}

/// Allocate `elems` elements of `elem_size` bytes (uninitialized).
fn alloc(client: &Client, elems: usize, elem_size: usize) -> Handle {
    client.empty((elems * elem_size).max(4))
}

/// Forward attention; returns `(o [B, Hq, Sq, D] in dtype, lse f32 [B, Hq, Sq])`.
pub fn attention_forward(
    client: &Client,
    problem: &AttnProblem,
    dtype: AttnDtype,
    inputs: &AttnInputs,
) -> Result<(Handle, Handle), KernelError> {
    let p = problem;
    let rows = p.batch * p.heads_q * p.seq_q;
    let o = alloc(client, rows * p.head_dim, dtype.size());
    let lse = alloc(client, rows, 4);
    attention_forward_into(client, p, dtype, inputs, &o, &lse)?;
    Ok((o, lse))
}

/// [`attention_forward`] writing into caller-provided buffers `o` and `lse` (every element
/// is written).
pub fn attention_forward_into(
    client: &Client,
    problem: &AttnProblem,
    dtype: AttnDtype,
    inputs: &AttnInputs,
    o: &Handle,
    lse: &Handle,
) -> Result<(), KernelError> {
    validate(client, problem, dtype, inputs)?;
    let rows = problem.batch * problem.heads_q * problem.seq_q;
    check_size("o", o, rows * problem.head_dim, dtype.size())?;
    check_size("lse", lse, rows, 4)?;
    let clean = inputs.schedule.map(|sch| sanitize(client, problem, sch));
    match dtype {
        AttnDtype::F32 => rows_pass::<f32, tf32>(client, problem, dtype, inputs, clean.as_ref(), None, lse, o),
        AttnDtype::F16 => rows_pass::<f16, f16>(client, problem, dtype, inputs, clean.as_ref(), None, lse, o),
        AttnDtype::BF16 => rows_pass::<bf16, bf16>(client, problem, dtype, inputs, clean.as_ref(), None, lse, o),
    }
}

/// Backward attention (FlashAttention-2 style). `o` and `lse` are used as given (they may be
/// merged values over several disjoint key sets). Returns dq, dk, dv and, when a bias was
/// given, dbias `[B, Hb, Sk]` (sum of dS over the queries and query heads of each bias head).
pub fn attention_backward(
    client: &Client,
    problem: &AttnProblem,
    dtype: AttnDtype,
    inputs: &AttnInputs,
    o: &Handle,
    lse: &Handle,
    d_o: &Handle,
) -> Result<AttnGrads, KernelError> {
    let p = problem;
    let es = dtype.size();
    let grads = AttnGrads {
        dq: alloc(client, p.batch * p.heads_q * p.seq_q * p.head_dim, es),
        dk: alloc(client, p.batch * p.heads_kv * p.seq_k * p.head_dim, es),
        dv: alloc(client, p.batch * p.heads_kv * p.seq_k * p.head_dim, es),
        dbias: inputs.bias.map(|b| alloc(client, p.batch * b.heads * p.seq_k, es)),
    };
    attention_backward_into(client, p, dtype, inputs, o, lse, d_o, &grads)?;
    Ok(grads)
}

/// [`attention_backward`] writing into caller-provided gradient buffers (every element is
/// written). `grads.dbias` must be `Some` iff a bias is given.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward_into(
    client: &Client,
    problem: &AttnProblem,
    dtype: AttnDtype,
    inputs: &AttnInputs,
    o: &Handle,
    lse: &Handle,
    d_o: &Handle,
    grads: &AttnGrads,
) -> Result<(), KernelError> {
    let p = problem;
    validate(client, p, dtype, inputs)?;
    let es = dtype.size();
    let rows = p.batch * p.heads_q * p.seq_q;
    let kv = p.batch * p.heads_kv * p.seq_k * p.head_dim;
    check_size("o", o, rows * p.head_dim, es)?;
    check_size("lse", lse, rows, 4)?;
    check_size("d_o", d_o, rows * p.head_dim, es)?;
    check_size("grads.dq", &grads.dq, rows * p.head_dim, es)?;
    check_size("grads.dk", &grads.dk, kv, es)?;
    check_size("grads.dv", &grads.dv, kv, es)?;
    match (inputs.bias, &grads.dbias) {
        (Some(b), Some(db)) => check_size("grads.dbias", db, p.batch * b.heads * p.seq_k, es)?,
        (None, None) => {}
        (Some(_), None) => return Err(invalid("grads.dbias", "a bias is given, so dbias is required")),
        (None, Some(_)) => return Err(invalid("grads.dbias", "no bias is given, so dbias must be None")),
    }
    match dtype {
        AttnDtype::F32 => backward_impl::<f32, tf32>(client, p, dtype, inputs, o, lse, d_o, grads),
        AttnDtype::F16 => backward_impl::<f16, f16>(client, p, dtype, inputs, o, lse, d_o, grads),
        AttnDtype::BF16 => backward_impl::<bf16, bf16>(client, p, dtype, inputs, o, lse, d_o, grads),
    }
}

#[allow(clippy::too_many_arguments)]
fn backward_impl<F: Float + CubeElement, M: Float>(
    client: &Client,
    p: &AttnProblem,
    dtype: AttnDtype,
    inputs: &AttnInputs,
    o: &Handle,
    lse: &Handle,
    d_o: &Handle,
    grads: &AttnGrads,
) -> Result<(), KernelError> {
    let rows = p.batch * p.heads_q * p.seq_q;
    let d = p.head_dim;
    // 1. delta = rowsum(dO * O).
    let delta = alloc(client, rows, 4);
    let (count, dim) = per_unit_launch(client, rows);
    kernels::delta_kernel::launch::<F>(
        client,
        count,
        dim,
        buf(d_o, rows * d),
        buf(o, rows * d),
        buf(&delta, rows),
        rows as u32,
        d,
    );
    // Both passes walk the same sanitized schedule.
    let clean = inputs.schedule.map(|s| sanitize(client, p, s));
    // 2. dQ (query-major).
    rows_pass::<F, M>(client, p, dtype, inputs, clean.as_ref(), Some((d_o, &delta)), lse, &grads.dq)?;
    // 3. dK, dV, dbias (key-major).
    keys_pass::<F, M>(client, p, dtype, inputs, clean.as_ref(), d_o, lse, &delta, grads)
}

/// The query-major kernel: forward (`bwd = None`, writes `out = O` and `lse`) or dQ
/// (`bwd = Some((dO, delta))`, reads `lse`, writes `out = dQ`).
#[allow(clippy::too_many_arguments)]
fn rows_pass<F: Float + CubeElement, M: Float>(
    client: &Client,
    p: &AttnProblem,
    dtype: AttnDtype,
    inputs: &AttnInputs,
    clean: Option<&CleanSchedule>,
    bwd: Option<(&Handle, &Handle)>,
    lse: &Handle,
    out: &Handle,
) -> Result<(), KernelError> {
    let plan = plan(client, p, inputs.schedule)?;
    let es = dtype.size();
    let d = p.head_dim;
    let rows = p.batch * p.heads_q * p.seq_q;
    let (off, w, windowed) = mask_params(p);
    let mma = mma_spec(client, dtype, d)
        .and_then(|spec| mma_rows_plan(client, p, inputs.schedule, &spec, bwd.is_some()).map(|mp| (spec, mp)));
    let units = mma.map_or(plan.rows_units, |(_, mp)| 16 * mp.planes);

    let bias = BiasArgs::new(client, p, dtype, inputs);

    let sched_dummy;
    // (sched handle, len, group heads, query block, row blocks, chunks, cap, key block)
    let (sched_h, sched_len, gh, qb, n_rb, n_chunks, cap, kb) = match (inputs.schedule, clean) {
        (Some(s), Some(clean)) => {
            let gh = p.heads_q / s.sel_heads;
            let n_chunks = (gh * s.query_block).div_ceil(units);
            let len = p.batch * s.sel_heads * clean.n_rows * s.capacity;
            (&clean.clean, len, gh, s.query_block, clean.n_rows, n_chunks, s.capacity, s.key_block)
        }
        _ => {
            sched_dummy = dummy(client, 4);
            (&sched_dummy, 1, 1, units, p.seq_q.div_ceil(units), 1, 1, 1)
        }
    };
    let n_cubes = p.batch * (p.heads_q / gh) * n_rb * n_chunks;

    let dummy_do;
    let dummy_delta;
    let (do_h, do_len, delta_h, delta_len) = match bwd {
        Some((dh, delta)) => (dh, rows * d, delta, rows),
        None => {
            dummy_do = dummy(client, es);
            dummy_delta = dummy(client, 4);
            (&dummy_do, 1, &dummy_delta, 1)
        }
    };

    // Both paths take the same runtime arguments and mask flags; only the launch, the cube
    // shape and the tiling constants differ.
    macro_rules! launch {
        ($kernel:path, $dim:expr, [$($tiling:expr),*]) => {
            $kernel(
                client,
                grid(client, n_cubes),
                $dim,
                buf(inputs.q, rows * d),
                buf(inputs.k, p.batch * p.heads_kv * p.seq_k * d),
                buf(inputs.v, p.batch * p.heads_kv * p.seq_k * d),
                buf(&bias.values, bias.len),
                buf(&bias.thr_v, bias.thr_len),
                buf(&bias.thr_i, bias.thr_len),
                buf(sched_h, sched_len),
                buf(do_h, do_len),
                buf(delta_h, delta_len),
                buf(lse, rows),
                buf(out, rows * d),
                p.batch as u32,
                p.heads_q as u32,
                p.heads_kv as u32,
                p.seq_q as u32,
                p.seq_k as u32,
                bias.heads as u32,
                gh as u32,
                qb as u32,
                n_rb as u32,
                n_chunks as u32,
                cap as u32,
                kb as u32,
                off,
                w,
                p.scale,
                f32::NEG_INFINITY,
                $($tiling,)*
                p.causal,
                windowed,
                bias.has_bias,
                bias.has_thr,
                inputs.schedule.is_some(),
                bwd.is_some(),
            )
        };
    }
    let aligned = vector_aligned(&[inputs.q, inputs.k, inputs.v]) && bwd.is_none_or(|(dh, _)| vector_aligned(&[dh]));
    if aligned && fragment_supported(client, dtype, d) {
        let cfg = fragment_rows_config(p, inputs, &bias, bwd.is_some());
        let rows_per_cube = 16 * cfg.planes;
        // Dense: row groups of one head, `rows_per_cube` queries each.
        let (qb_f, n_rb_f, n_chunks_f) = match inputs.schedule {
            Some(_) => (qb, n_rb, (gh * qb).div_ceil(rows_per_cube)),
            None => (rows_per_cube, p.seq_q.div_ceil(rows_per_cube), 1),
        };
        let count = grid(client, p.batch * (p.heads_q / gh) * n_rb_f * n_chunks_f);
        let dim = CubeDim::new_2d(32, cfg.planes as u32);
        let kv_len = p.batch * p.heads_kv * p.seq_k * d;
        match bwd {
            None => fragment::forward::fragment_forward_kernel::launch::<F>(
                client,
                count,
                dim,
                buf(inputs.q, rows * d),
                buf(inputs.k, kv_len),
                buf(inputs.v, kv_len),
                buf(&bias.values, bias.len),
                buf(&bias.thr_v, bias.thr_len),
                buf(&bias.thr_i, bias.thr_len),
                buf(sched_h, sched_len),
                buf(lse, rows),
                buf(out, rows * d),
                p.batch as u32,
                p.heads_q as u32,
                p.heads_kv as u32,
                p.seq_q as u32,
                p.seq_k as u32,
                bias.heads as u32,
                gh as u32,
                qb_f as u32,
                n_rb_f as u32,
                n_chunks_f as u32,
                cap as u32,
                kb as u32,
                off,
                w,
                p.scale,
                f32::NEG_INFINITY,
                cfg,
            ),
            Some(_) => fragment::dq::fragment_dq_kernel::launch::<F>(
                client,
                count,
                dim,
                buf(inputs.q, rows * d),
                buf(inputs.k, kv_len),
                buf(inputs.v, kv_len),
                buf(&bias.values, bias.len),
                buf(&bias.thr_v, bias.thr_len),
                buf(&bias.thr_i, bias.thr_len),
                buf(sched_h, sched_len),
                buf(do_h, do_len),
                buf(delta_h, delta_len),
                buf(lse, rows),
                buf(out, rows * d),
                p.batch as u32,
                p.heads_q as u32,
                p.heads_kv as u32,
                p.seq_q as u32,
                p.seq_k as u32,
                bias.heads as u32,
                gh as u32,
                qb_f as u32,
                n_rb_f as u32,
                n_chunks_f as u32,
                cap as u32,
                kb as u32,
                off,
                w,
                p.scale,
                cfg,
            ),
        }
        return Ok(());
    }
    match mma {
        Some((spec, mp)) => launch!(
            mma::mma_rows_kernel::launch::<F, M>,
            CubeDim::new_2d(spec.plane as u32, mp.planes as u32),
            [mp.planes, spec.plane / 16, d, mp.tile, spec.mk, dtype == AttnDtype::BF16]
        ),
        None => launch!(kernels::attn_rows_kernel::launch::<F>, CubeDim::new_1d(units as u32), [units, d, plan.tile_k]),
    }
    Ok(())
}

/// Tile shape of the fragment query-major passes: 4 planes (64 query rows) sharing each K/V
/// tile, fewer planes when a schedule row group is smaller (a per-token list shared by a GQA
/// group of 16 fills one plane); 64-key tiles (32 for dQ above head dim 64, which holds Q, dO,
/// dQ, S and dP fragments at once), no longer than the schedule's key block.
fn fragment_rows_config(p: &AttnProblem, inputs: &AttnInputs, bias: &BiasArgs, backward: bool) -> fragment::FragmentConfig {
    let max_tile = if backward && p.head_dim > 64 { 32 } else { 64 };
    let (planes, tile) = match inputs.schedule {
        None => (4, max_tile),
        Some(s) => {
            let rows = p.heads_q / s.sel_heads * s.query_block;
            (rows.div_ceil(16).clamp(1, 4), s.key_block.next_multiple_of(16).clamp(16, max_tile))
        }
    };
    fragment::FragmentConfig {
        planes,
        head_dim: p.head_dim,
        tile,
        causal: p.causal,
        windowed: p.window.is_some(),
        has_bias: bias.has_bias,
        has_thr: bias.has_thr,
        blocks: inputs.schedule.is_some(),
    }
}

/// Tile shape of the fragment key-major pass: 4 planes (64 keys), fewer for smaller key
/// blocks; query tiles of 32 rows above head dim 64 (dK and dV fragments stay in registers),
/// 64 otherwise.
fn fragment_keys_config(p: &AttnProblem, inputs: &AttnInputs, bias: &BiasArgs) -> fragment::FragmentConfig {
    let planes = inputs.schedule.map_or(4, |s| s.key_block.div_ceil(16).clamp(1, 4));
    fragment::FragmentConfig {
        planes,
        head_dim: p.head_dim,
        tile: if p.head_dim > 64 { 32 } else { 64 },
        causal: p.causal,
        windowed: p.window.is_some(),
        has_bias: bias.has_bias,
        has_thr: bias.has_thr,
        blocks: inputs.schedule.is_some(),
    }
}

/// How many cubes share the query rows of each key tile in the key-major pass. Enough to
/// fill a large GPU (about 1024 cubes) when there are few key tiles (short sequences, few kv
/// heads, long GQA groups), at least 8 with a block schedule, where a few blocks (NSA's
/// forced first block, the local ones) are selected by every query; at most 16, at most the
/// number of row chunks, and at most 256 MiB of f32 partial sums.
fn key_splits(n_cubes: usize, kv_len: usize, max_chunks: usize, blocks: bool) -> usize {
    let mut z = 1024usize.div_ceil(n_cubes.max(1));
    if blocks {
        z = z.max(8);
    }
    let mem_cap = ((256usize << 20) / (8 * kv_len.max(1))).max(1);
    z.clamp(1, 16).min(max_chunks.max(1)).min(mem_cap)
}

#[allow(clippy::too_many_arguments)]
fn keys_pass<F: Float + CubeElement, M: Float>(
    client: &Client,
    p: &AttnProblem,
    dtype: AttnDtype,
    inputs: &AttnInputs,
    clean: Option<&CleanSchedule>,
    d_o: &Handle,
    lse: &Handle,
    delta: &Handle,
    grads: &AttnGrads,
) -> Result<(), KernelError> {
    let plan = plan(client, p, inputs.schedule)?;
    let d = p.head_dim;
    let rows = p.batch * p.heads_q * p.seq_q;
    let kv_len = p.batch * p.heads_kv * p.seq_k * d;
    let (off, w, windowed) = mask_params(p);
    let mma = mma_spec(client, dtype, d)
        .and_then(|spec| mma_keys_plan(client, p, inputs.schedule, &spec).map(|mp| (spec, mp)));
    let bias = BiasArgs::new(client, p, dtype, inputs);
    let frag = (vector_aligned(&[inputs.q, inputs.k, inputs.v, d_o]) && fragment_supported(client, dtype, d))
        .then(|| fragment_keys_config(p, inputs, &bias));
    let units = match (frag, mma) {
        (Some(cfg), _) => 16 * cfg.planes,
        (None, Some((_, mp))) => 16 * mp.planes,
        (None, None) => plan.keys_units,
    };

    let inv;
    let off_dummy;
    let rows_dummy;
    // (offsets, offsets len, rows, rows len, sel heads, query block, row blocks, cap,
    //  key block, n_sub, n_key_tiles)
    let (off_h, off_len, rows_h, rows_len, hs, qb, n_rb, cap, kb, n_sub, n_kt) = match (inputs.schedule, clean) {
        (Some(s), Some(cs)) => {
            inv = invert(client, p, s, cs);
            let n_bs = p.batch * s.sel_heads;
            let n_sub = s.key_block.div_ceil(units);
            (
                &inv.offsets,
                n_bs * (cs.nkb + 1),
                &inv.rows,
                n_bs * cs.n_rows * s.capacity,
                s.sel_heads,
                s.query_block,
                cs.n_rows,
                s.capacity,
                s.key_block,
                n_sub,
                cs.nkb * n_sub,
            )
        }
        _ => {
            off_dummy = dummy(client, 4);
            rows_dummy = dummy(client, 4);
            (&off_dummy, 1, &rows_dummy, 1, p.heads_q, 1, p.seq_q, 1, units, 1, p.seq_k.div_ceil(units))
        }
    };
    let tile_rows = match (frag, mma) {
        (Some(cfg), _) => cfg.tile,
        (None, Some((_, mp))) => mp.tile,
        (None, None) => plan.tile_q,
    };
    let n_split = key_splits(p.batch * p.heads_kv * n_kt, kv_len, p.seq_q.div_ceil(tile_rows), inputs.schedule.is_some());
    let n_cubes = p.batch * p.heads_kv * n_kt * n_split;
    let dk_parts = alloc(client, n_split * kv_len, 4);
    let dv_parts = alloc(client, n_split * kv_len, 4);
    let db_parts = alloc(client, n_split * bias.len, 4);
    // Both paths take the same runtime arguments and mask flags; only the launch, the cube
    // shape and the tiling constants differ.
    macro_rules! launch {
        ($kernel:path, $dim:expr, [$($tiling:expr),*]) => {
            $kernel(
                client,
                grid(client, n_cubes),
                $dim,
                buf(inputs.q, rows * d),
                buf(inputs.k, kv_len),
                buf(inputs.v, kv_len),
                buf(&bias.values, bias.len),
                buf(&bias.thr_v, bias.thr_len),
                buf(&bias.thr_i, bias.thr_len),
                buf(off_h, off_len),
                buf(rows_h, rows_len),
                buf(d_o, rows * d),
                buf(lse, rows),
                buf(delta, rows),
                buf(&dk_parts, n_split * kv_len),
                buf(&dv_parts, n_split * kv_len),
                buf(&db_parts, n_split * bias.len),
                p.batch as u32,
                p.heads_q as u32,
                p.heads_kv as u32,
                p.seq_q as u32,
                p.seq_k as u32,
                bias.heads as u32,
                hs as u32,
                qb as u32,
                n_rb as u32,
                cap as u32,
                kb as u32,
                n_sub as u32,
                n_kt as u32,
                n_split as u32,
                off,
                w,
                p.scale,
                $($tiling,)*
                p.causal,
                windowed,
                bias.has_bias,
                bias.has_thr,
                inputs.schedule.is_some(),
            )
        };
    }
    match (frag, mma) {
        (Some(cfg), _) => fragment::dkdv::fragment_dkdv_kernel::launch::<F>(
            client,
            grid(client, n_cubes),
            CubeDim::new_2d(32, cfg.planes as u32),
            buf(inputs.q, rows * d),
            buf(inputs.k, kv_len),
            buf(inputs.v, kv_len),
            buf(&bias.values, bias.len),
            buf(&bias.thr_v, bias.thr_len),
            buf(&bias.thr_i, bias.thr_len),
            buf(off_h, off_len),
            buf(rows_h, rows_len),
            buf(d_o, rows * d),
            buf(lse, rows),
            buf(delta, rows),
            buf(&dk_parts, n_split * kv_len),
            buf(&dv_parts, n_split * kv_len),
            buf(&db_parts, n_split * bias.len),
            p.batch as u32,
            p.heads_q as u32,
            p.heads_kv as u32,
            p.seq_q as u32,
            p.seq_k as u32,
            bias.heads as u32,
            hs as u32,
            qb as u32,
            n_rb as u32,
            cap as u32,
            kb as u32,
            n_sub as u32,
            n_kt as u32,
            n_split as u32,
            off,
            w,
            p.scale,
            cfg,
        ),
        (None, Some((spec, mp))) => launch!(
            mma::mma_keys_kernel::launch::<F, M>,
            CubeDim::new_2d(spec.plane as u32, mp.planes as u32),
            [mp.planes, spec.plane / 16, d, mp.tile, spec.mk, dtype == AttnDtype::BF16]
        ),
        (None, None) => launch!(kernels::attn_keys_kernel::launch::<F>, CubeDim::new_1d(units as u32), [units, d, plan.tile_q]),
    }
    let mut outs = vec![(&dk_parts, &grads.dk, kv_len), (&dv_parts, &grads.dv, kv_len)];
    if let Some(dbias) = &grads.dbias {
        outs.push((&db_parts, dbias, bias.len));
    }
    for (parts, out, n) in outs {
        let (count, dim) = per_unit_launch(client, n);
        kernels::sum_partials_kernel::launch::<F>(
            client,
            count,
            dim,
            buf(parts, n_split * n),
            buf(out, n),
            n as u32,
            n_split as u32,
        );
    }
    Ok(())
}
