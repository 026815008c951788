use burn::config::Config;
use burn::module::Module;
use burn::tensor::{Device, Tensor};

use super::{AttnGate, seer_attention_target, seer_gate_loss, seer_select_threshold, seer_select_topk};
use crate::attention::{AttentionOptions, attention};
use crate::block_sparse::{BlockSelection, block_sparse_attention};
use crate::coverage::{BlockCoverage, selection_coverage};
use crate::projection::{HeadLayout, QkvProjection};

/// How the gate pools the tokens of a block (per channel).
#[derive(Config, Debug, Copy, PartialEq, Eq)]
pub enum GatePool {
    /// Mean over the block's tokens (a partial last block over its real tokens).
    Avg,
    /// Maximum over the block's tokens.
    Max,
    /// Minimum over the block's tokens.
    Min,
}

/// How a [`SeerAttention`] layer computes its output.
#[derive(Config, Debug, Copy, PartialEq, Eq)]
pub enum SeerMode {
    /// Post-training distillation: the output is dense attention and only the gate learns,
    /// from the dense attention map (freeze the rest with [`SeerAttention::freeze_base`]).
    Distill,
    /// The output is block-sparse attention over the gate's selection; the gate keeps
    /// learning from the dense map through its loss.
    Sparse,
}

/// Configuration of [`SeerAttention`]; gate defaults are the published ones.
#[derive(Config, Debug)]
pub struct SeerAttentionConfig {
    /// Model width.
    pub d_model: usize,
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads. Default: `n_heads`.
    pub n_kv_heads: Option<usize>,
    /// Per-head width. Default: `d_model / n_heads`.
    pub head_dim: Option<usize>,
    /// Tokens per gate block (query and key). Default: 64.
    #[config(default = 64)]
    pub block_size: usize,
    /// Gate hidden width. Default: 128.
    #[config(default = 128)]
    pub gate_hidden: usize,
    /// One gate key map per kv head, shared by its GQA group (the published gate's layout
    /// when it maps queries too), instead of one per query head. Default: `false`.
    #[config(default = false)]
    pub gate_kv_head_keys: bool,
    /// How the gate pools queries per block. Default: average (the published `Qavg`).
    #[config(default = "vec![GatePool::Avg]")]
    pub gate_q_pool: Vec<GatePool>,
    /// How the gate pools keys per block, concatenated in this order. Default: max, min,
    /// average (the published `Kmaxminavg`).
    #[config(default = "vec![GatePool::Max, GatePool::Min, GatePool::Avg]")]
    pub gate_k_pool: Vec<GatePool>,
    /// Keep blocks with gate probability above this. Default: 1e-3.
    #[config(default = 1e-3)]
    pub threshold: f64,
    /// Keep the top-k blocks per query block instead of thresholding. Default: none.
    pub top_k: Option<usize>,
    /// Fraction of leading query blocks left out of the gate loss. Default: 0.25 (published).
    #[config(default = 0.25)]
    pub loss_skip_fraction: f64,
    /// Output mode. Default: [`SeerMode::Sparse`].
    #[config(default = "SeerMode::Sparse")]
    pub mode: SeerMode,
    /// Apply RoPE to q and k. Default: `true`.
    #[config(default = true)]
    pub rope: bool,
    /// RoPE base (also used by the gate's block RoPE). Default: `10000`.
    #[config(default = 10000.0)]
    pub rope_theta: f64,
}

impl SeerAttentionConfig {
    /// Builds the layer; fails with an error naming the bad field.
    pub fn init(&self, device: &Device) -> crate::error::Result<SeerAttention> {
        let layout = HeadLayout::new(self.d_model, self.n_heads, self.n_kv_heads.unwrap_or(self.n_heads), self.head_dim)?;
        if let Some(k) = self.top_k {
            crate::error::check_positive("top_k", k)?;
        }
        if !(0.0..1.0).contains(&self.loss_skip_fraction) {
            return crate::error::param_err("loss_skip_fraction", format!("must be in [0, 1), got {}", self.loss_skip_fraction));
        }
        Ok(SeerAttention {
            proj: QkvProjection::new(&layout, self.rope, self.rope_theta, device)?,
            gate: AttnGate::with_pooling(
                layout.n_heads,
                if self.gate_kv_head_keys { layout.n_kv_heads } else { layout.n_heads },
                layout.head_dim,
                self.block_size,
                self.gate_hidden,
                self.rope_theta,
                &self.gate_q_pool,
                &self.gate_k_pool,
                device,
            )?,
            threshold: self.threshold,
            top_k: self.top_k.unwrap_or(0),
            loss_skip_fraction: self.loss_skip_fraction,
            sparse: self.mode == SeerMode::Sparse,
        })
    }
}

/// SeerAttention layer: projections, RoPE, the AttnGate and block-sparse attention.
#[derive(Module, Debug)]
pub struct SeerAttention {
    /// q/k/v/o projections.
    pub proj: QkvProjection,
    /// The learned block gate.
    pub gate: AttnGate,
    threshold: f64,
    top_k: usize,
    loss_skip_fraction: f64,
    sparse: bool,
}

impl SeerAttention {
    /// The current mode.
    pub fn mode(&self) -> SeerMode {
        if self.sparse { SeerMode::Sparse } else { SeerMode::Distill }
    }

    /// Switches the output mode (e.g. distil first, then run sparse).
    pub fn with_mode(mut self, mode: SeerMode) -> Self {
        self.sparse = mode == SeerMode::Sparse;
        self
    }

    /// Stops gradients into the projections so that only the gate trains.
    pub fn freeze_base(mut self) -> Self {
        self.proj = self.proj.no_grad();
        self
    }

    /// `x: [batch, seq, d_model] -> [batch, seq, d_model]`.
    pub fn forward(&self, x: Tensor<3>) -> crate::error::Result<Tensor<3>> {
        Ok(self.run(x, false)?.0)
    }

    /// Output and the gate's KL loss (a scalar) against the dense attention map.
    pub fn forward_with_gate_loss(&self, x: Tensor<3>) -> crate::error::Result<(Tensor<3>, Tensor<1>)> {
        let (out, loss) = self.run(x, true)?;
        Ok((out, loss.expect("loss requested")))
    }

    fn run(&self, x: Tensor<3>, with_loss: bool) -> crate::error::Result<(Tensor<3>, Option<Tensor<1>>)> {
        let (q_raw, k_raw, v) = self.proj.project(x)?;
        let q = self.proj.rope(q_raw.clone())?;
        let k = self.proj.rope(k_raw.clone())?;
        // The gate learns only from its own loss: its inputs are detached.
        let logits = self.gate.logits(q_raw.detach(), k_raw.detach())?;
        let bs = self.gate.block_size();
        let opts = AttentionOptions::causal();
        let mut loss = None;
        let out = if self.sparse {
            let selection = self.select(logits.clone())?;
            if with_loss {
                let (target, _) = seer_attention_target(q.clone().detach(), k.clone().detach(), v.clone().detach(), bs, None)?;
                loss = Some(self.loss(logits, target)?);
            }
            block_sparse_attention(q, k, v, &selection, &opts)?.output
        } else if with_loss {
            let (target, dense) = seer_attention_target(q, k, v, bs, None)?;
            loss = Some(self.loss(logits, target)?);
            dense.output
        } else {
            attention(q, k, v, &opts)?.output
        };
        Ok((self.proj.merge(out), loss))
    }

    /// The gate's blocks: top-k when `top_k > 0`, else the threshold rule.
    fn select(&self, logits: Tensor<4>) -> crate::error::Result<BlockSelection> {
        let bs = self.gate.block_size();
        if self.top_k > 0 { seer_select_topk(logits, self.top_k, bs) } else { seer_select_threshold(logits, self.threshold, bs) }
    }

    /// The pairs this layer attends for `x` in sparse mode, in `block`-token cells: the
    /// blocks the gate picks for each query block, cut to the causal keys (in distillation
    /// mode too, where training runs dense: the map shows what the gate would pick); see
    /// [`crate::coverage`].
    pub fn block_coverage(&self, x: Tensor<3>, block: usize) -> crate::error::Result<BlockCoverage> {
        let s = x.dims()[1];
        let (q_raw, k_raw, _) = self.proj.project(x)?;
        let selection = self.select(self.gate.logits(q_raw, k_raw)?)?;
        selection_coverage(&selection, self.proj.n_heads(), s, 0, block)
    }

    fn loss(&self, logits: Tensor<4>, target: Tensor<4>) -> crate::error::Result<Tensor<1>> {
        let nq = logits.dims()[2];
        let skip = (nq as f64 * self.loss_skip_fraction).floor() as usize;
        seer_gate_loss(logits, target, skip)
    }
}
