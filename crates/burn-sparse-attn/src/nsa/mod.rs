//! NSA (Native Sparse Attention, DeepSeek 2025): three branches per query and head, mixed
//! by sigmoid gates,
//! `o_t = g_cmp * Attn(q_t, K_cmp, V_cmp) + g_slc * Attn(q_t, K_slc, V_slc) + g_win * Attn(q_t, K_win, V_win)`.
//!
//! - **Compression** ([`compression`]): windows of `compress_block = 32` keys taken every
//!   `compress_stride = 16` are mapped to one key (and one value) by a learnable MLP with an
//!   intra-block position embedding (or by mean pooling, as flash-linear-attention does).
//!   Compressed token `i` is visible to the query at key position `t` only when its whole
//!   window is in the past: `i * stride + block - 1 <= t`.
//! - **Selection** ([`selection`]): the compression attention probabilities are summed onto
//!   selection blocks of `select_block = 64` keys by spatial overlap (weight = keys shared /
//!   stride), summed over the query heads of a GQA group, and the `top_n = 16` best blocks
//!   are kept per kv head, with block 0 and the two most recent blocks always kept (they count
//!   toward `top_n`). Keys after the query are masked inside the selected blocks.
//! - **Sliding window** of the `window = 512` most recent keys, the query's own included.
//!
//! Each branch has its own keys and values as in the paper; [`NsaAttentionConfig::shared_kv`]
//! shares one pair across branches, as several implementations do.

pub mod compression;
mod compressed;
pub mod compressors;
mod module;
mod packed;
pub mod selection;

pub use compressors::{AttentionPoolCompressor, Compressor, CompressorConfig, CompressorKind, HeadLinearCompressor, MeanPosCompressor};
pub use compression::{CompressionMlp, CompressionMlpConfig, TrailingWindow, compress_mean, compress_mean_with, num_compressed, num_compressed_with};
pub use module::{NsaAttention, NsaAttentionConfig};
pub use packed::{compress_mean_varlen, nsa_attention_varlen, nsa_compressed_attention_varlen, nsa_compressed_cu_seqlens};
pub use selection::{nsa_block_scores_from_probs, nsa_overlap_weights, nsa_select, nsa_selection_scores};

use burn::tensor::{Int, Tensor};

use crate::attention::{AttentionOptions, AttentionOutput, attention, validate_qkv};
use crate::block_sparse::{BlockSelection, block_sparse_attention};
use crate::error::{Result, check_positive, param_err, shape_err};

/// Hyper-parameters of NSA; defaults are the paper's.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NsaParams {
    /// Keys per compression window `l`. Default 32.
    pub compress_block: usize,
    /// Stride between compression windows `d`. Default 16.
    pub compress_stride: usize,
    /// Keys per selection block `l'`. Default 64.
    pub select_block: usize,
    /// Selected blocks per query `n`, forced ones included. Default 16.
    pub top_n: usize,
    /// Sliding window `w`: the `w` most recent keys. `0` turns the window branch off (it is
    /// not computed, its output is 0 and its gate has no effect), as flash-linear-attention's
    /// `window_size = 0`. Default 512.
    pub window: usize,
    /// Softmax scale of every branch; `None` means `1/sqrt(head_dim)`.
    pub scale: Option<f64>,
    /// Leading selection blocks every query selects (once it can see them), counted in
    /// `top_n`. Default 1 (block 0, as the paper).
    pub forced_initial: usize,
    /// Most recent selection blocks every query selects (its current block and the ones
    /// before it), counted in `top_n`. Default 2 (as the paper). 0 and 0 give plain top-n.
    pub forced_local: usize,
}

impl Default for NsaParams {
    fn default() -> Self {
        Self {
            compress_block: 32,
            compress_stride: 16,
            select_block: 64,
            top_n: 16,
            window: 512,
            scale: None,
            forced_initial: 1,
            forced_local: 2,
        }
    }
}

impl NsaParams {
    /// Checks every size.
    pub fn validate(&self) -> Result<()> {
        check_positive("compress_block", self.compress_block)?;
        check_positive("compress_stride", self.compress_stride)?;
        check_positive("select_block", self.select_block)?;
        check_positive("top_n", self.top_n)?;
        if self.compress_stride > self.compress_block {
            return param_err(
                "compress_stride",
                format!("must not exceed compress_block ({}), got {}", self.compress_block, self.compress_stride),
            );
        }
        Ok(())
    }
}

/// Keys and values of the three branches (pass the same tensors three times for shared KV).
#[derive(Debug, Clone)]
pub struct NsaInputs {
    /// Queries `[b, hq, sq, d]`.
    pub q: Tensor<4>,
    /// Compressed keys `[b, hkv, n_cmp, d]` (see [`compression`]).
    pub k_cmp: Tensor<4>,
    /// Compressed values `[b, hkv, n_cmp, d]`.
    pub v_cmp: Tensor<4>,
    /// Keys of the selection branch `[b, hkv, sk, d]`.
    pub k_slc: Tensor<4>,
    /// Values of the selection branch.
    pub v_slc: Tensor<4>,
    /// Keys of the window branch `[b, hkv, sk, d]`.
    pub k_win: Tensor<4>,
    /// Values of the window branch.
    pub v_win: Tensor<4>,
    /// Gates after the sigmoid, `[b, hq, sq, 3]` in the order (compression, selection, window).
    pub gates: Tensor<4>,
}

/// Everything NSA computes, for inspection and tests.
#[derive(Debug, Clone)]
pub struct NsaOutput {
    /// Gated sum of the branches `[b, hq, sq, d]`.
    pub output: Tensor<4>,
    /// Compression branch.
    pub compressed: AttentionOutput,
    /// Selection branch.
    pub selected: AttentionOutput,
    /// Window branch.
    pub window: AttentionOutput,
    /// Per-token selection shared by the query heads of each GQA group.
    pub selection: BlockSelection,
}

/// Attention of the queries over the compressed tokens, with NSA's visibility rule
/// (`i * stride + block - 1 <= t`). Rows that see no compressed token give 0 and LSE `-inf`.
pub fn nsa_compressed_attention(
    q: Tensor<4>,
    k_cmp: Tensor<4>,
    v_cmp: Tensor<4>,
    seq_k: usize,
    params: &NsaParams,
) -> Result<AttentionOutput> {
    if let Some(empty) = check_compressed_inputs(&q, &k_cmp, &v_cmp, seq_k, params)? {
        return Ok(empty);
    }
    compressed::compressed_attention_on_engine(q, k_cmp, v_cmp, seq_k, params)
}

/// The checks both versions of the compressed branch make; `Some(zeros, -inf LSE)` when
/// there is no compressed token at all.
fn check_compressed_inputs(q: &Tensor<4>, k_cmp: &Tensor<4>, v_cmp: &Tensor<4>, seq_k: usize, params: &NsaParams) -> Result<Option<AttentionOutput>> {
    params.validate()?;
    let [b, hq, sq, d] = q.dims();
    let n_cmp = k_cmp.dims()[2];
    if n_cmp == 0 {
        let device = q.device();
        return Ok(Some(AttentionOutput {
            output: Tensor::zeros([b, hq, sq, d], (&device, q.dtype())),
            lse: Tensor::full([b, hq, sq], f64::NEG_INFINITY, (&device, q.dtype())),
        }));
    }
    check_compressed_count("k_cmp", n_cmp, seq_k, params)?;
    validate_qkv(q, k_cmp, v_cmp)?;
    Ok(None)
}

/// [`nsa_compressed_attention`] as one masked softmax over a `[seq_q, n_cmp]` score matrix:
/// the definition, kept as the oracle for the engine version (tests) and for inspection.
pub fn nsa_compressed_attention_reference(
    q: Tensor<4>,
    k_cmp: Tensor<4>,
    v_cmp: Tensor<4>,
    seq_k: usize,
    params: &NsaParams,
) -> Result<AttentionOutput> {
    if let Some(empty) = check_compressed_inputs(&q, &k_cmp, &v_cmp, seq_k, params)? {
        return Ok(empty);
    }
    let [b, hq, sq, d] = q.dims();
    let n_cmp = k_cmp.dims()[2];
    let device = q.device();
    let dims = validate_qkv(&q, &k_cmp, &v_cmp)?;
    let mask = selection::compressed_visibility(sq, seq_k, n_cmp, params, &device);
    let mask = mask.unsqueeze::<4>().expand([b, hq, sq, n_cmp]);
    let scale = params.scale.unwrap_or(1.0 / (d as f64).sqrt());
    Ok(crate::attention::reference::masked_attention(q, k_cmp, v_cmp, Some(mask), None, scale, &dims))
}

/// Where the selection branch's blocks come from.
#[derive(Debug, Clone)]
#[allow(clippy::large_enum_variant)] // built once per call
pub enum NsaBlocks {
    /// Scored from the compression branch and chosen by [`nsa_select`] (NSA itself).
    Computed,
    /// Given per-token lists of selection-block indices `[b, heads_kv, seq_q, n]` (`-1`
    /// padded, any order; out-of-range entries are ignored), e.g. from another router or a
    /// reference implementation. The compression branch still runs for its output.
    Given(Tensor<4, Int>),
}

/// The full NSA forward on precomputed branch inputs.
pub fn nsa_attention(inputs: NsaInputs, params: &NsaParams) -> Result<NsaOutput> {
    nsa_attention_with(inputs, params, NsaBlocks::Computed, None)
}

/// [`nsa_attention`] with the selection's source chosen by `blocks`, and optionally a number
/// of blocks per query `counts: [b, heads_kv, seq_q]` (as flash-linear-attention's
/// `block_counts`): list entries at or past a query's count are dropped. Computed lists are
/// ordered by score (forced blocks first), so a count keeps the best blocks.
pub fn nsa_attention_with(inputs: NsaInputs, params: &NsaParams, blocks: NsaBlocks, counts: Option<Tensor<3, Int>>) -> Result<NsaOutput> {
    params.validate()?;
    let NsaInputs { q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates } = inputs;
    let dims = validate_qkv(&q, &k_slc, &v_slc).map_err(|e| rename_kv(e, "k_slc", "v_slc"))?;
    validate_qkv(&q, &k_win, &v_win).map_err(|e| rename_kv(e, "k_win", "v_win"))?;
    let want = [dims.batch, dims.heads_q, dims.seq_q, 3];
    if gates.dims() != want {
        return shape_err("gates", format!("expected {want:?}, got {:?}", gates.dims()));
    }
    let compressed = nsa_compressed_attention(q.clone(), k_cmp.clone(), v_cmp, dims.seq_k, params)
        .map_err(|e| rename_kv(e, "k_cmp", "v_cmp"))?;
    let indices = match blocks {
        NsaBlocks::Computed => selection::select_in_chunks(q.clone(), k_cmp, compressed.lse.clone(), dims.seq_k, params)?.indices,
        NsaBlocks::Given(indices) => given_blocks(indices, &dims)?,
    };
    let selection = BlockSelection::per_token(apply_counts(indices, counts)?, params.select_block);
    let opts = AttentionOptions { causal: true, window: None, scale: params.scale };
    let selected = block_sparse_attention(q.clone(), k_slc, v_slc, &selection, &opts)?;
    let window = if params.window == 0 { window_off(&q) } else { attention(q, k_win, v_win, &opts.with_window(params.window))? };
    let output = nsa_combine(&compressed.output, &selected.output, &window.output, gates)?;
    Ok(NsaOutput { output, compressed, selected, window, selection })
}

/// Given per-token block lists, checked against the problem: `[b, heads_kv, seq_q, n >= 1]`.
fn given_blocks(indices: Tensor<4, Int>, dims: &crate::attention::AttnDims) -> Result<Tensor<4, Int>> {
    let [b, h, s, n] = indices.dims();
    if [b, h, s] != [dims.batch, dims.heads_kv, dims.seq_q] || n == 0 {
        return shape_err("blocks", format!("expected [{}, {}, {}, n >= 1], got {:?}", dims.batch, dims.heads_kv, dims.seq_q, indices.dims()));
    }
    Ok(indices)
}

/// Lists with the entries at or past each query's `counts` (`[b, h, s]`) dropped.
fn apply_counts(indices: Tensor<4, Int>, counts: Option<Tensor<3, Int>>) -> Result<Tensor<4, Int>> {
    let Some(counts) = counts else { return Ok(indices) };
    let [b, h, s, n] = indices.dims();
    if counts.dims() != [b, h, s] {
        return shape_err("counts", format!("expected [{b}, {h}, {s}], got {:?}", counts.dims()));
    }
    let slot = Tensor::<1, Int>::arange(0..n as i64, &counts.device()).reshape([1, 1, 1, n]).expand([b, h, s, n]);
    let past = slot.greater_equal(counts.reshape([b, h, s, 1]).expand([b, h, s, n]));
    Ok(indices.mask_fill(past, -1))
}

/// The window branch switched off (`window = 0`): output 0, LSE `-inf`.
fn window_off(q: &Tensor<4>) -> AttentionOutput {
    let [b, hq, sq, d] = q.dims();
    AttentionOutput {
        output: Tensor::zeros([b, hq, sq, d], (&q.device(), q.dtype())),
        lse: Tensor::full([b, hq, sq], f64::NEG_INFINITY, (&q.device(), q.dtype())),
    }
}

/// `g[..0] * o_cmp + g[..1] * o_slc + g[..2] * o_win` for gates `[b, hq, sq, 3]`.
pub fn nsa_combine(o_cmp: &Tensor<4>, o_slc: &Tensor<4>, o_win: &Tensor<4>, gates: Tensor<4>) -> Result<Tensor<4>> {
    let [b, h, s, d] = o_slc.dims();
    if gates.dims() != [b, h, s, 3] {
        return shape_err("gates", format!("expected {:?}, got {:?}", [b, h, s, 3], gates.dims()));
    }
    let g = |i: usize| gates.clone().slice([0..b, 0..h, 0..s, i..i + 1]).expand([b, h, s, d]);
    Ok(o_cmp.clone() * g(0) + o_slc.clone() * g(1) + o_win.clone() * g(2))
}

/// Names the branch's tensors in errors raised by the shared q/k/v validation.
fn rename_kv(e: crate::SparseAttnError, k_name: &'static str, v_name: &'static str) -> crate::SparseAttnError {
    match e {
        crate::SparseAttnError::Shape { arg: "k", detail } => crate::SparseAttnError::Shape { arg: k_name, detail },
        crate::SparseAttnError::Shape { arg: "v", detail } => crate::SparseAttnError::Shape { arg: v_name, detail },
        other => other,
    }
}

/// The compressed-token count must be that of complete windows or that with the trailing
/// partial window ([`TrailingWindow`]); the partial token is never visible, so both give the
/// same attention and selection.
pub(crate) fn check_compressed_count(arg: &'static str, n_cmp: usize, seq_k: usize, params: &NsaParams) -> Result<()> {
    let (l, d) = (params.compress_block, params.compress_stride);
    let complete = num_compressed(seq_k, l, d);
    let partial = num_compressed_with(seq_k, l, d, TrailingWindow::Partial);
    if n_cmp != complete && n_cmp != partial {
        let expected = if partial == complete { format!("{complete}") } else { format!("{complete} (complete windows) or {partial} (with the trailing partial one)") };
        return shape_err(arg, format!("{n_cmp} compressed tokens, expected {expected} for seq_k = {seq_k}"));
    }
    Ok(())
}
