//! Picking a method from configuration: [`AttentionMethodConfig`] holds any layer's config,
//! [`AttentionMethod`] any layer, with one `init` and one `forward`, so a model (or a test, or
//! the toy-LM example) chooses its attention without matching on methods itself. Adding a
//! method is its folder plus one arm in each enum here.

use burn::config::Config;
use burn::module::Module;
use burn::tensor::{Device, Tensor};

use crate::coverage::BlockCoverage;
use crate::{
    DenseAttention, DenseAttentionConfig, DmaAttention, DmaAttentionConfig, MobaAttention, MobaAttentionConfig, NsaAttention,
    NsaAttentionConfig, SeerAttention, SeerAttentionConfig,
};

/// The configuration of one attention layer of any method.
#[derive(Config, Debug)]
pub enum AttentionMethodConfig {
    /// Dense causal attention (the baseline).
    Dense(DenseAttentionConfig),
    /// Native Sparse Attention.
    Nsa(NsaAttentionConfig),
    /// Mixture of Block Attention.
    Moba(MobaAttentionConfig),
    /// SeerAttention (learned block gate).
    Seer(SeerAttentionConfig),
    /// Dynamic-mask attention.
    Dma(DmaAttentionConfig),
}

impl AttentionMethodConfig {
    /// Builds the layer; fails with an error naming the bad field.
    pub fn init(&self, device: &Device) -> crate::error::Result<AttentionMethod> {
        Ok(match self {
            Self::Dense(c) => AttentionMethod::Dense(c.init(device)?),
            Self::Nsa(c) => AttentionMethod::Nsa(c.init(device)?),
            Self::Moba(c) => AttentionMethod::Moba(c.init(device)?),
            Self::Seer(c) => AttentionMethod::Seer(c.init(device)?),
            Self::Dma(c) => AttentionMethod::Dma(c.init(device)?),
        })
    }

    /// The method's short name: `dense`, `nsa`, `moba`, `seer` or `dma`.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Dense(_) => "dense",
            Self::Nsa(_) => "nsa",
            Self::Moba(_) => "moba",
            Self::Seer(_) => "seer",
            Self::Dma(_) => "dma",
        }
    }
}

/// One attention layer of any method; built by [`AttentionMethodConfig::init`].
#[derive(Module, Debug)]
#[allow(clippy::large_enum_variant)] // one per model block
pub enum AttentionMethod {
    /// Dense causal attention.
    Dense(DenseAttention),
    /// Native Sparse Attention.
    Nsa(NsaAttention),
    /// Mixture of Block Attention.
    Moba(MobaAttention),
    /// SeerAttention.
    Seer(SeerAttention),
    /// Dynamic-mask attention.
    Dma(DmaAttention),
}

/// A layer's output and, for methods that train an auxiliary part (SeerAttention's gate),
/// its loss.
#[derive(Debug, Clone)]
pub struct MethodOutput {
    /// `[batch, seq, d_model]`.
    pub output: Tensor<3>,
    /// The auxiliary loss (a 1-element tensor), when the method has one.
    pub aux_loss: Option<Tensor<1>>,
}

impl AttentionMethod {
    /// `x: [batch, seq, d_model] -> [batch, seq, d_model]`.
    pub fn forward(&self, x: Tensor<3>) -> crate::error::Result<Tensor<3>> {
        match self {
            Self::Dense(a) => a.forward(x),
            Self::Nsa(a) => a.forward(x),
            Self::Moba(a) => a.forward(x),
            Self::Seer(a) => a.forward(x),
            Self::Dma(a) => a.forward(x),
        }
    }

    /// [`Self::forward`] plus the auxiliary loss of methods that have one (SeerAttention's
    /// gate loss, which costs the dense attention target; see `seer`).
    pub fn forward_with_aux(&self, x: Tensor<3>) -> crate::error::Result<MethodOutput> {
        match self {
            Self::Seer(a) => {
                let (output, loss) = a.forward_with_gate_loss(x)?;
                Ok(MethodOutput { output, aux_loss: Some(loss) })
            }
            other => Ok(MethodOutput { output: other.forward(x)?, aux_loss: None }),
        }
    }

    /// Which (query, key) pairs the layer attends for `x: [batch, seq, d_model]`, counted
    /// in `block x block` cells per query head (see [`crate::coverage`]): what a heat map of
    /// the method's selection draws. Runs the layer's selection on the host's count; meant
    /// for diagnostics, not for training steps.
    pub fn block_coverage(&self, x: Tensor<3>, block: usize) -> crate::error::Result<BlockCoverage> {
        match self {
            Self::Dense(a) => a.block_coverage(x, block),
            Self::Nsa(a) => a.block_coverage(x, block),
            Self::Moba(a) => a.block_coverage(x, block),
            Self::Seer(a) => a.block_coverage(x, block),
            Self::Dma(a) => a.block_coverage(x, block),
        }
    }

    /// Whether the method has an auxiliary loss.
    pub fn has_aux_loss(&self) -> bool {
        matches!(self, Self::Seer(_))
    }

    /// Freezes everything but a SeerAttention gate (the distillation recipe); other methods
    /// freeze whole.
    pub fn freeze_all_but_gates(self) -> Self {
        match self {
            Self::Seer(a) => Self::Seer(a.freeze_base()),
            other => other.no_grad(),
        }
    }
}
