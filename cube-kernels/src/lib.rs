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
//! gets `o = 0`, `lse = -inf` and zero gradients. See [`mod@reference`] for an executable
//! definition in f64.
//!
//! # Kernels
//! See `README.md` of this crate for the full design. In short: a query-major kernel
//! computes the forward and dQ; a key-major kernel computes dK, dV and dbias; block
//! schedules are sanitized (sorted, deduplicated) and inverted into a CSR on the device for
//! the key-major pass. Three implementations of these passes, picked per call by
//! [`kernel_path`]: register fragments on CUDA for f16/bf16 ([`fragment`]: `mma.sync`,
//! `ldmatrix`, `cp.async`), cooperative matrices ([`mma`]: `cmma` fragments, one plane per 16
//! rows) where the device reports them for the dtype, and a portable one ([`kernels`]: one
//! unit per row, no plane ops, no cmma) everywhere else. None uses atomics.
//!
//! # Layout
//! This file holds the public API (problem and input types, errors, the four entry points).
//! `caps` reads what the device reports and picks the path; `validate` checks a call's
//! arguments; `plan` sizes tiles and grids for each path; `args` groups the passes' runtime arguments; `schedule` sanitizes and inverts
//! block schedules on the device; `launch` binds buffers and launches the passes. The kernels
//! themselves: [`kernels`] (portable), [`mma`] (cooperative matrices), [`fragment`]
//! (register fragments, CUDA).
//!
//! Kernels are compiled at first use for each combination of dtype, head dim, tile sizes
//! and mask flags, and cached by CubeCL for the life of the client (on CUDA the first call
//! of each variant pays an NVRTC compile of a few hundred ms).

#![warn(missing_docs)]

#[allow(missing_docs)] // the derives add undocumented launch types
pub mod args;
#[allow(missing_docs, clippy::manual_is_multiple_of)]
pub mod kernels;
#[allow(missing_docs, clippy::manual_is_multiple_of)]
pub mod mma;
#[allow(clippy::manual_is_multiple_of)]
pub mod fragment;
pub mod reference;
pub mod host;
mod caps;
mod gather;
pub use gather::GATHER_ENV;
#[allow(missing_docs)]
pub mod topk;
#[allow(missing_docs)]
pub mod keep;
#[allow(missing_docs)]
pub mod nsa_scores;
#[allow(missing_docs)]
pub mod key_order;
#[allow(missing_docs)]
pub mod seer_target;
#[allow(missing_docs)]
pub mod key_pieces;
mod key_walk;
mod row_walk;
pub use keep::keep_threshold;
pub use topk::{MAX_TOPK, row_topk};
pub use key_order::{KeyOrder, key_last_rows, key_order};
pub use seer_target::{BlockMaxPath, BlockMaxProblem, block_max_path, seer_block_max};
pub use nsa_scores::{BlockScorePath, BlockScoreProblem, block_score_path, nsa_block_scores};
mod launch;
mod loop_budget;
mod plan;
mod schedule;
mod validate;
pub mod varlen;
pub use varlen::{SegmentBounds, VarlenBounds, varlen_bounds};

pub use caps::{KERNEL_PATH_ENV, KernelPath, describe, kernel_path, supports};
use launch::{backward_impl, rows_pass};
use schedule::sanitize;
use validate::{check_size, validate};

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

/// Additive per-key bias (or one bias per (query, key) pair), optionally with a per-row keep
/// threshold (dynamic-mask attention).
#[derive(Clone, Debug)]
pub struct KeyBias {
    /// `[B, heads, Sk]` in the attention dtype; `[B, heads, Sq, Sk]` when [`Self::pairwise`].
    pub values: Handle,
    /// `Hb`: bias head of query head `h` is `h / (Hq / Hb)`; `Hb` must divide `Hq` and be a
    /// multiple of `Hkv` (usually `Hkv` or `Hq`).
    pub heads: usize,
    /// `(thr_value: f32 [B, Hb, Sq], thr_index: i32 [B, Hb, Sq])`: a visible key `j` is kept
    /// for row `i` iff `bias_j > thr_value[i] || (bias_j == thr_value[i] && j >= thr_index[i])`.
    /// `(-inf, 0)` keeps everything. Key tiles with no kept key are skipped. With a pairwise
    /// bias, `bias_j` is the row's own `bias[i, j]`.
    pub threshold: Option<(Handle, Handle)>,
    /// One bias per (query, key) pair (`values` is `[B, heads, Sq, Sk]`), as Burn's own
    /// `attention` takes an `attn_bias`: score `scale q.k + bias[i, j]`, and `dbias` is
    /// `[B, heads, Sq, Sk]` (dS summed over the query heads of each bias head). The bias is
    /// `Sq x Sk` per head, so this runs on the portable kernels on every device; not combined
    /// with a block schedule, gathered keys or packed sequences (an error names `bias`).
    pub pairwise: bool,
}

impl KeyBias {
    /// Elements of `values` (and of the bias gradient) for `problem`.
    pub fn elems(&self, problem: &AttnProblem) -> usize {
        let per_head = if self.pairwise { problem.seq_q * problem.seq_k } else { problem.seq_k };
        problem.batch * self.heads * per_head
    }
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
    /// Gathered keys: i32 `[B, Hkv, Sk]`, a permutation of `0..Sk` per (batch, kv head).
    /// The walks (and the schedule's key blocks) run over slots; slot `s` reads key row
    /// `key_positions[s]` of k, v and the bias, writes its dK, dV and dbias there, and that
    /// row is the key's position for the causal mask and the keep rule. So a caller lays the
    /// keys out in any order without copying them (DMA's gathered order, [`fn@key_order`]), and
    /// each query tile's keys fill few key blocks. Not a permutation: rows outside it get no
    /// gradient. Needs a block schedule, no window, and the fragment path (CUDA, f16/bf16);
    /// elsewhere an error names this argument.
    pub key_positions: Option<&'a Handle>,
    /// Packed variable-length sequences ([`varlen`]): the per-row and per-key visibility
    /// intervals, which then replace the problem's own causal mask and window (fold those
    /// into the intervals with [`varlen_bounds`]). The batch dimension stays: every batch
    /// entry and head is packed the same way. Not combined with a block schedule, gathered
    /// keys or a keep threshold (an error names this argument); runs on the portable
    /// kernels on every device for now.
    pub segments: Option<&'a SegmentBounds>,
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
    /// `[B, Hb, Sk]` (`[B, Hb, Sq, Sk]` for a pairwise bias), present iff a bias was given.
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

/// Allocate `elems` elements of `elem_size` bytes (uninitialized).
pub(crate) fn alloc(client: &Client, elems: usize, elem_size: usize) -> Handle {
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
    let clean = inputs.schedule.map(|sch| sanitize(client, &launch::walk_problem(problem, inputs).0, sch));
    match dtype {
        AttnDtype::F32 => rows_pass::<f32, tf32>(client, problem, dtype, inputs, clean.as_ref(), None, lse, o),
        AttnDtype::F16 => rows_pass::<f16, f16>(client, problem, dtype, inputs, clean.as_ref(), None, lse, o),
        AttnDtype::BF16 => rows_pass::<bf16, bf16>(client, problem, dtype, inputs, clean.as_ref(), None, lse, o),
    }
}

/// Backward attention (FlashAttention-2 style). `o` and `lse` are used as given (they may be
/// merged values over several disjoint key sets). Returns dq, dk, dv and, when a bias was
/// given, dbias `[B, Hb, Sk]` (sum of dS over the queries and query heads of each bias head;
/// `[B, Hb, Sq, Sk]` for a pairwise bias).
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
        dbias: inputs.bias.map(|b| alloc(client, b.elems(p), es)),
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
        (Some(b), Some(db)) => check_size("grads.dbias", db, b.elems(p), es)?,
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
