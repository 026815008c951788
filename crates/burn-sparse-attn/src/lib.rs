//! Natively trainable sparse attention for Burn.
//!
//! Four methods share one API and one attention engine: [`nsa`] (Native Sparse Attention),
//! [`moba`] (Mixture of Block Attention), [`seer`] (SeerAttention's learned block gate) and
//! [`dma`] (dynamic-mask attention), next to the [`mod@attention`] baseline. Each method has
//! - a layer, `XConfig::new(..).init(&device)?` then `forward(x: [batch, seq, d_model])`;
//! - functional ops on q, k, v for users who bring their own projections.
//!
//! [`AttentionMethodConfig`] / [`AttentionMethod`] pick a method from configuration.
//!
//! All ops use the layout `[batch, heads, seq, head_dim]`, support GQA/MQA, align causal
//! masks bottom-right and return the log-sum-exp next to the output; see `docs/` for the
//! math of each method.

pub mod attention;
pub mod block_sparse;
pub mod coverage;
pub mod dma;
pub mod error;
mod grid;
pub mod kernel;
pub mod method;
pub mod moba;
pub mod nsa;
pub mod projection;
pub mod rope;
pub mod rows;
pub mod seer;
pub mod varlen;

pub use attention::{AttentionOptions, AttentionOutput, DenseAttention, DenseAttentionConfig, KeyBias, attention};
pub use block_sparse::{BlockSelection, block_sparse_attention};
pub use coverage::BlockCoverage;
pub use dma::{DmaAttention, DmaAttentionConfig};
pub use error::{Result, SparseAttnError};
pub use method::{AttentionMethod, AttentionMethodConfig, MethodOutput};
pub use moba::{MobaAttention, MobaAttentionConfig};
pub use nsa::{NsaAttention, NsaAttentionConfig};
pub use seer::{SeerAttention, SeerAttentionConfig, SeerMode};
pub use varlen::{VarLen, attention_varlen};

/// The attention implementation ops pick on `device`: the CubeCL kernels on Cube devices
/// (with a GPU feature compiled in), the tensor-op reference elsewhere.
pub fn kernel_impl_for(device: &burn::tensor::Device) -> kernel::AttentionImpl {
    kernel::attention_impl(device)
}
