//! A small decoder-only transformer whose attention layer is picked per block.
//!
//! `embedding -> N x [RMSNorm -> attention -> +, RMSNorm -> SwiGLU MLP -> +] -> RMSNorm -> head`.
//! Each attention layer comes from `burn-sparse-attn` and applies its own q/k/v/o projections
//! and RoPE; the head is tied to the embedding or a separate linear layer.

use burn::module::{Initializer, Module};
use burn::nn::{Embedding, EmbeddingConfig, Linear, LinearConfig, RmsNorm, RmsNormConfig, SwiGlu, SwiGluConfig};
use burn::tensor::{Device, Int, Tensor};
use burn_sparse_attn::{
    AttentionMethod, AttentionMethodConfig, DenseAttentionConfig, DmaAttentionConfig, MobaAttentionConfig, NsaAttentionConfig,
    SeerAttentionConfig, SeerMode,
};

use crate::AppResult;
use crate::config::{Method, RunConfig, SeerModeOption};
use crate::data::VOCAB_SIZE;

/// The library config of `method`'s attention layer from the run's method options.
pub fn attention_config(method: Method, cfg: &RunConfig) -> AttentionMethodConfig {
    let m = &cfg.model;
    let (d, h, kv, theta) = (m.d_model, m.heads, Some(m.kv_heads()), m.rope_theta);
    match method {
        Method::Dense => {
            let window = (cfg.dense.window > 0).then_some(cfg.dense.window);
            AttentionMethodConfig::Dense(DenseAttentionConfig::new(d, h).with_n_kv_heads(kv).with_window(window).with_rope_theta(theta))
        }
        Method::Moba => {
            let o = &cfg.moba;
            AttentionMethodConfig::Moba(
                MobaAttentionConfig::new(d, h).with_n_kv_heads(kv).with_block_size(o.block_size).with_top_k(o.top_k).with_rope_theta(theta),
            )
        }
        Method::Nsa => {
            let o = &cfg.nsa;
            AttentionMethodConfig::Nsa(
                NsaAttentionConfig::new(d, h)
                    .with_n_kv_heads(kv)
                    .with_compress_block(o.compress_block)
                    .with_compress_stride(o.compress_stride)
                    .with_compress_hidden((o.compress_hidden > 0).then_some(o.compress_hidden))
                    .with_select_block(o.select_block)
                    .with_top_n(o.top_n)
                    .with_window(o.window)
                    .with_shared_kv(o.shared_kv)
                    .with_rope_theta(theta),
            )
        }
        Method::Seer => {
            let o = &cfg.seer;
            let mode = match o.mode {
                SeerModeOption::Distill => SeerMode::Distill,
                SeerModeOption::Sparse => SeerMode::Sparse,
            };
            AttentionMethodConfig::Seer(
                SeerAttentionConfig::new(d, h)
                    .with_n_kv_heads(kv)
                    .with_block_size(o.block_size)
                    .with_gate_hidden(o.gate_hidden)
                    .with_threshold(o.threshold)
                    .with_top_k((o.top_k > 0).then_some(o.top_k))
                    .with_loss_skip_fraction(o.loss_skip_fraction)
                    .with_mode(mode)
                    .with_rope_theta(theta),
            )
        }
        Method::Dma => AttentionMethodConfig::Dma(DmaAttentionConfig::new(d, h).with_n_kv_heads(kv).with_window(cfg.dma.window).with_rope_theta(theta)),
    }
}

/// `RMSNorm -> attention -> residual, RMSNorm -> SwiGLU -> residual`.
#[derive(Module, Debug)]
pub struct Block {
    /// Pre-attention norm.
    pub attn_norm: RmsNorm,
    /// The attention layer.
    pub attn: AttentionMethod,
    /// Pre-MLP norm.
    pub mlp_norm: RmsNorm,
    /// Gated up-projection.
    pub mlp: SwiGlu,
    /// Down-projection.
    pub down: Linear,
}

impl Block {
    fn forward(&self, x: Tensor<3>, with_gate_loss: bool) -> AppResult<(Tensor<3>, Option<Tensor<1>>)> {
        let h = self.attn_norm.forward(x.clone());
        let (a, gate_loss) = if with_gate_loss {
            let out = self.attn.forward_with_aux(h)?;
            (out.output, out.aux_loss)
        } else {
            (self.attn.forward(h)?, None)
        };
        let x = x + a;
        let x = x.clone() + self.down.forward(self.mlp.forward(self.mlp_norm.forward(x)));
        Ok((x, gate_loss))
    }
}

/// Output of a forward pass.
#[derive(Debug, Clone)]
pub struct LmOutput {
    /// `[batch, seq, vocab]`.
    pub logits: Tensor<3>,
    /// Sum of the SeerAttention gate losses (when asked for and present).
    pub gate_loss: Option<Tensor<1>>,
}

/// The toy language model.
#[derive(Module, Debug)]
pub struct ToyLm {
    /// Token embedding `[vocab, d_model]`.
    pub embedding: Embedding,
    /// Transformer blocks.
    pub blocks: Vec<Block>,
    /// Final norm.
    pub norm: RmsNorm,
    /// Untied output head (`None` when tied to the embedding).
    pub head: Option<Linear>,
}

impl ToyLm {
    /// A freshly initialised model (seed the device first for reproducibility).
    pub fn new(cfg: &RunConfig, device: &Device) -> AppResult<Self> {
        cfg.validate()?;
        let m = &cfg.model;
        let d = m.d_model;
        let lin = |i, o| LinearConfig::new(i, o).with_bias(false).init(device);
        let blocks = m
            .layer_methods()
            .into_iter()
            .map(|method| {
                Ok(Block {
                    attn_norm: RmsNormConfig::new(d).init(device),
                    attn: attention_config(method, cfg).init(device)?,
                    mlp_norm: RmsNormConfig::new(d).init(device),
                    mlp: SwiGluConfig::new(d, m.mlp_hidden()).init(device),
                    down: lin(m.mlp_hidden(), d),
                })
            })
            .collect::<AppResult<Vec<_>>>()?;
        Ok(Self {
            embedding: EmbeddingConfig::new(VOCAB_SIZE, d).with_initializer(Initializer::Normal { mean: 0.0, std: 0.02 }).init(device),
            blocks,
            norm: RmsNormConfig::new(d).init(device),
            head: (!m.tie_embeddings).then(|| lin(d, VOCAB_SIZE)),
        })
    }

    /// `tokens: [batch, seq]` to logits `[batch, seq, vocab]`; with `with_gate_loss` the
    /// SeerAttention layers also return their gate losses (summed).
    pub fn forward(&self, tokens: Tensor<2, Int>, with_gate_loss: bool) -> AppResult<LmOutput> {
        let mut x = self.embedding.forward(tokens);
        let mut gate_loss: Option<Tensor<1>> = None;
        for block in &self.blocks {
            let (y, loss) = block.forward(x, with_gate_loss)?;
            x = y;
            gate_loss = match (gate_loss, loss) {
                (Some(a), Some(b)) => Some(a + b),
                (a, b) => a.or(b),
            };
        }
        let x = self.norm.forward(x);
        let logits = match &self.head {
            Some(head) => head.forward(x),
            None => {
                let [b, s, d] = x.dims();
                let w = self.embedding.weight.val(); // [vocab, d]
                x.reshape([b * s, d]).matmul(w.transpose()).reshape([b, s, VOCAB_SIZE])
            }
        };
        Ok(LmOutput { logits, gate_loss })
    }

    /// SeerAttention distillation: only the gates keep requiring gradients.
    pub fn freeze_all_but_gates(self) -> Self {
        Self {
            embedding: self.embedding.no_grad(),
            blocks: self
                .blocks
                .into_iter()
                .map(|b| Block {
                    attn_norm: b.attn_norm.no_grad(),
                    attn: b.attn.freeze_all_but_gates(),
                    mlp_norm: b.mlp_norm.no_grad(),
                    mlp: b.mlp.no_grad(),
                    down: b.down.no_grad(),
                })
                .collect(),
            norm: self.norm.no_grad(),
            head: self.head.map(|h| h.no_grad()),
        }
    }

    /// Whether any block has a SeerAttention gate.
    pub fn has_gates(&self) -> bool {
        self.blocks.iter().any(|b| b.attn.has_aux_loss())
    }

    /// Parameters that currently require gradients.
    pub fn trainable_params(&self) -> usize {
        struct Count(usize);
        impl burn::module::ModuleVisitor for Count {
            fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<Tensor<D>>) {
                if param.is_require_grad() {
                    self.0 += param.shape().num_elements();
                }
            }
        }
        let mut c = Count(0);
        self.visit(&mut c);
        c.0
    }
}
