use burn::config::Config;
use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::tensor::activation::sigmoid;
use burn::tensor::{Device, Int, Tensor};

use super::{
    Compressor, CompressorConfig, CompressorKind, NsaBlocks, NsaInputs, NsaOutput, NsaParams, nsa_attention_varlen, nsa_attention_with,
};
use crate::coverage::{BlockCoverage, selection_coverage};
use crate::error::shape_err;
use crate::varlen::VarLen;
use crate::projection::{HeadLayout, QkvProjection};

/// Configuration of [`NsaAttention`]; defaults are the NSA paper's.
#[derive(Config, Debug)]
pub struct NsaAttentionConfig {
    /// Model width.
    pub d_model: usize,
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads; one block selection is made per kv head. Default: `n_heads`.
    pub n_kv_heads: Option<usize>,
    /// Per-head width. Default: `d_model / n_heads`.
    pub head_dim: Option<usize>,
    /// Compression window `l`. Default: 32.
    #[config(default = 32)]
    pub compress_block: usize,
    /// Compression stride `d`. Default: 16.
    #[config(default = 16)]
    pub compress_stride: usize,
    /// Hidden width of the compression MLPs. Default: `4 * head_dim`.
    pub compress_hidden: Option<usize>,
    /// The compressor of keys and values. Default: the MLP (the NSA paper's).
    #[config(default = "CompressorKind::Mlp")]
    pub compressor: CompressorKind,
    /// Selection block `l'`. Default: 64.
    #[config(default = 64)]
    pub select_block: usize,
    /// Selected blocks per query, forced ones included. Default: 16.
    #[config(default = 16)]
    pub top_n: usize,
    /// Sliding window; `0` turns the window branch off (no window projections, no window
    /// attention). Default: 512.
    #[config(default = 512)]
    pub window: usize,
    /// Leading selection blocks always selected. Default: 1.
    #[config(default = 1)]
    pub forced_initial: usize,
    /// Most recent selection blocks always selected (current one included). Default: 2.
    #[config(default = 2)]
    pub forced_local: usize,
    /// One k/v projection for all three branches instead of one per branch. Default: `false`.
    #[config(default = false)]
    pub shared_kv: bool,
    /// Apply RoPE to q and k. Default: `true`.
    #[config(default = true)]
    pub rope: bool,
    /// RoPE base. Default: `10000`.
    #[config(default = 10000.0)]
    pub rope_theta: f64,
}

impl NsaAttentionConfig {
    /// The functional hyper-parameters of this configuration.
    pub fn params(&self) -> NsaParams {
        NsaParams {
            compress_block: self.compress_block,
            compress_stride: self.compress_stride,
            select_block: self.select_block,
            top_n: self.top_n,
            window: self.window,
            scale: None,
            forced_initial: self.forced_initial,
            forced_local: self.forced_local,
        }
    }

    /// Extra key/value projections of the packed input projection: the compression
    /// branch's k and v, then the window branch's (none when shared; no window ones with
    /// `window = 0`).
    fn branch_projections(&self) -> usize {
        match (self.shared_kv, self.window) {
            (true, _) => 0,
            (false, 0) => 2,
            (false, _) => 4,
        }
    }

    /// Builds the layer; fails with an error naming the bad field.
    pub fn init(&self, device: &Device) -> crate::error::Result<NsaAttention> {
        let layout = HeadLayout::new(self.d_model, self.n_heads, self.n_kv_heads.unwrap_or(self.n_heads), self.head_dim)?;
        self.params().validate()?;
        let compressor = CompressorConfig {
            kind: self.compressor,
            block: self.compress_block,
            head_dim: layout.head_dim,
            heads: layout.n_kv_heads,
            hidden: self.compress_hidden,
        };
        Ok(NsaAttention {
            proj: QkvProjection::with_branches(&layout, self.branch_projections(), self.rope, self.rope_theta, device)?,
            compress_key: compressor.init(device)?,
            compress_value: compressor.init(device)?,
            gate: LinearConfig::new(self.d_model, 3 * layout.n_heads).init(device),
            compress_block: self.compress_block,
            compress_stride: self.compress_stride,
            select_block: self.select_block,
            top_n: self.top_n,
            window: self.window,
            forced_initial: self.forced_initial,
            forced_local: self.forced_local,
        })
    }
}

/// NSA layer: compression, selection and window branches mixed by per-head sigmoid gates.
#[derive(Module, Debug)]
pub struct NsaAttention {
    /// Query and output projections, the selection branch's k/v (all branches' when shared)
    /// and, unless shared, the compression branch's k/v then the window branch's k/v (none
    /// with `window = 0`) as extra branches of the same packed input projection.
    pub proj: QkvProjection,
    /// Compressor of the keys.
    pub compress_key: Compressor,
    /// Compressor of the values.
    pub compress_value: Compressor,
    /// `d_model -> 3 * n_heads` gate logits.
    pub gate: Linear,
    compress_block: usize,
    compress_stride: usize,
    select_block: usize,
    top_n: usize,
    window: usize,
    forced_initial: usize,
    forced_local: usize,
}

impl NsaAttention {
    fn params(&self) -> NsaParams {
        NsaParams {
            compress_block: self.compress_block,
            compress_stride: self.compress_stride,
            select_block: self.select_block,
            top_n: self.top_n,
            window: self.window,
            scale: None,
            forced_initial: self.forced_initial,
            forced_local: self.forced_local,
        }
    }

    /// `x: [batch, seq, d_model] -> [batch, seq, d_model]`.
    pub fn forward(&self, x: Tensor<3>) -> crate::error::Result<Tensor<3>> {
        self.forward_with(x, NsaBlocks::Computed, None)
    }

    /// [`Self::forward`] with the selection branch's blocks chosen by `blocks` (computed, or
    /// given per token and kv head as `[batch, n_kv_heads, seq, n]`) and optionally at most
    /// `counts: [batch, n_kv_heads, seq]` blocks per query, as [`super::nsa_attention_with`]
    /// (flash-linear-attention's `block_indices` / `block_counts`).
    pub fn forward_with(&self, x: Tensor<3>, blocks: NsaBlocks, counts: Option<Tensor<3, Int>>) -> crate::error::Result<Tensor<3>> {
        Ok(self.proj.merge(self.run(x, blocks, counts)?.output))
    }

    /// The pairs this layer attends for `x`, in `block`-token cells: the selected blocks of
    /// each query's GQA group and its sliding window, cut to the causal keys (the compressed
    /// branch, which reads every visible compressed token, is not counted); see
    /// [`crate::coverage`].
    pub fn block_coverage(&self, x: Tensor<3>, block: usize) -> crate::error::Result<BlockCoverage> {
        let s = x.dims()[1];
        let out = self.run(x, NsaBlocks::Computed, None)?;
        selection_coverage(&out.selection, self.proj.n_heads(), s, self.window, block)
    }

    /// The three branches and the selection for `x` (heads not merged).
    fn run(&self, x: Tensor<3>, blocks: NsaBlocks, counts: Option<Tensor<3, Int>>) -> crate::error::Result<NsaOutput> {
        let [b, s, _] = x.dims();
        let (q, k, v, branches) = self.proj.project_with_branches(x.clone())?;
        let hkv = self.proj.n_kv_heads();
        let hq = self.proj.n_heads();
        let mut branches = branches.into_iter();
        let mut branch = |shared: &Tensor<4>| branches.next().unwrap_or_else(|| shared.clone());
        let (k_cmp_raw, v_cmp_raw) = (branch(&k), branch(&v));
        let (k_win, v_win) = (branch(&k), branch(&v));
        let params = self.params();
        let n_cmp = super::num_compressed(s, self.compress_block, self.compress_stride);
        let d = self.proj.head_dim();
        // Compression reads pre-RoPE keys; each compressed key is then rotated at the
        // position of its window's first key, as the published implementation does.
        let (k_cmp, v_cmp) = if n_cmp == 0 {
            let z = Tensor::<4>::zeros([b, hkv, 0, d], (&x.device(), x.dtype()));
            (z.clone(), z)
        } else {
            let kc = self.compress_key.forward(k_cmp_raw, self.compress_stride)?;
            let pos: Vec<usize> = (0..n_cmp).map(|i| i * self.compress_stride).collect();
            (self.proj.rope_at(kc, &pos)?, self.compress_value.forward(v_cmp_raw, self.compress_stride)?)
        };
        let gates = sigmoid(crate::rows::grouped_linear(&self.gate, x)).reshape([b, s, hq, 3]).swap_dims(1, 2);
        let inputs = NsaInputs {
            q: self.proj.rope(q)?,
            k_cmp,
            v_cmp,
            k_slc: self.proj.rope(k)?,
            v_slc: v,
            // The window branch is off with `window = 0`: its keys are never read.
            k_win: if self.window == 0 { k_win } else { self.proj.rope(k_win)? },
            v_win,
            gates,
        };
        nsa_attention_with(inputs, &params, blocks, counts)
    }

    /// [`Self::forward`] on a packed batch `x: [batch, total, d_model]` whose sequences sit
    /// at `varlen` (self-attention boundaries, [`VarLen::new`]): every sequence is compressed,
    /// selected and windowed on its own, with RoPE positions restarting at each sequence, as
    /// if it were run alone ([`super::nsa_attention_varlen`]).
    pub fn forward_varlen(&self, x: Tensor<3>, varlen: &VarLen) -> crate::error::Result<Tensor<3>> {
        let [b, s, _] = x.dims();
        if varlen.cu_seqlens_q() != varlen.cu_seqlens_k() {
            return shape_err("varlen", "a self-attention layer needs the same boundaries for queries and keys (VarLen::new)");
        }
        if varlen.total_q() != s {
            return shape_err("varlen", format!("covers {} tokens, x has {s}", varlen.total_q()));
        }
        let (q, k, v, branches) = self.proj.project_with_branches(x.clone())?;
        let hq = self.proj.n_heads();
        let mut branches = branches.into_iter();
        let mut branch = |shared: &Tensor<4>| branches.next().unwrap_or_else(|| shared.clone());
        let (k_cmp_raw, v_cmp_raw) = (branch(&k), branch(&v));
        let (k_win, v_win) = (branch(&k), branch(&v));
        let cu = varlen.cu_seqlens_k();
        let stride = self.compress_stride;
        // As in `forward`: each compressed key rotated at its window's first key, counted
        // from its own sequence's start.
        let cmp_pos: Vec<usize> = cu
            .windows(2)
            .flat_map(|w| (0..super::num_compressed(w[1] - w[0], self.compress_block, stride)).map(move |i| i * stride))
            .collect();
        let k_cmp = self.compress_key.forward_varlen(k_cmp_raw, cu, stride)?;
        let k_cmp = if cmp_pos.is_empty() { k_cmp } else { self.proj.rope_at(k_cmp, &cmp_pos)? };
        let v_cmp = self.compress_value.forward_varlen(v_cmp_raw, cu, stride)?;
        let gates = sigmoid(crate::rows::grouped_linear(&self.gate, x)).reshape([b, s, hq, 3]).swap_dims(1, 2);
        let pos = varlen.positions_q();
        let inputs = NsaInputs {
            q: self.proj.rope_at(q, &pos)?,
            k_cmp,
            v_cmp,
            k_slc: self.proj.rope_at(k, &pos)?,
            v_slc: v,
            k_win: if self.window == 0 { k_win } else { self.proj.rope_at(k_win, &pos)? },
            v_win,
            gates,
        };
        Ok(self.proj.merge(nsa_attention_varlen(inputs, varlen, &self.params(), NsaBlocks::Computed, None)?.output))
    }
}
