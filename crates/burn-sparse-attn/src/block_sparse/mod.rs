//! Block-sparse attention driven by index lists: the one format behind MoBA, NSA's
//! selection branch, SeerAttention and DMA's skipped tiles.
//!
//! A [`BlockSelection`] holds, for each `(batch, selection head, row)`, a fixed-capacity list
//! of key-block indices padded with `-1`. A row is one query (`query_block = 1`, the
//! per-token granularity of NSA/MoBA) or a block of queries (`query_block > 1`, the
//! per-query-block granularity of SeerAttention). Selection heads are either the query heads
//! (each head its own list) or the kv heads (the query heads of a GQA group share one list).
//! Causal and window masks still apply inside selected blocks; duplicate entries count once;
//! entries outside `0..ceil(seq_k / key_block)` are ignored like the padding.

mod packed;

pub use packed::{block_sparse_attention_varlen, packed_selection_rows};
pub(crate) use packed::AlignedPacking;

use burn::tensor::{Int, Tensor};

use crate::attention::{AttentionOptions, AttentionOutput, AttnDims, KeyBias, attention_core};
use crate::error::{Result, check_positive, shape_err};

/// Key blocks selected per query row; see the [module docs](self).
#[derive(Debug, Clone)]
pub struct BlockSelection {
    /// `[batch, sel_heads, rows, capacity]`, `-1` padded; `sel_heads` is `heads_q` or
    /// `heads_kv`, `rows = ceil(seq_q / query_block)`.
    pub indices: Tensor<4, Int>,
    /// Keys per key block (the last block may be partial).
    pub key_block: usize,
    /// Queries per row: 1 for per-token selections.
    pub query_block: usize,
}

impl BlockSelection {
    /// A per-query-token selection (`query_block = 1`).
    pub fn per_token(indices: Tensor<4, Int>, key_block: usize) -> Self {
        Self { indices, key_block, query_block: 1 }
    }

    /// A per-query-block selection.
    pub fn per_query_block(indices: Tensor<4, Int>, query_block: usize, key_block: usize) -> Self {
        Self { indices, key_block, query_block }
    }

    /// Number of key blocks for `seq_k` keys.
    pub fn num_key_blocks(&self, seq_k: usize) -> usize {
        seq_k.div_ceil(self.key_block.max(1))
    }

    /// Checks the selection against an attention problem.
    pub fn validate(&self, dims: &AttnDims) -> Result<()> {
        check_positive("key_block", self.key_block)?;
        check_positive("query_block", self.query_block)?;
        let [b, hs, r, c] = self.indices.dims();
        if b != dims.batch {
            return shape_err("selection.indices", format!("batch {b} differs from q's batch {}", dims.batch));
        }
        if hs != dims.heads_q && hs != dims.heads_kv {
            return shape_err(
                "selection.indices",
                format!("heads {hs} must equal heads_q ({}) or heads_kv ({})", dims.heads_q, dims.heads_kv),
            );
        }
        let rows = dims.seq_q.div_ceil(self.query_block);
        if r != rows {
            return shape_err(
                "selection.indices",
                format!(
                    "rows {r} must be ceil(seq_q / query_block) = ceil({} / {}) = {rows}",
                    dims.seq_q, self.query_block
                ),
            );
        }
        if c == 0 {
            return shape_err("selection.indices", "capacity (last dim) must be at least 1");
        }
        Ok(())
    }
}

/// Attention restricted to the selected key blocks (plus `opts`' causal/window masks).
///
/// Rows whose selection leaves no visible key return 0 with LSE `-inf`.
pub fn block_sparse_attention(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    selection: &BlockSelection,
    opts: &AttentionOptions,
) -> Result<AttentionOutput> {
    attention_core(q, k, v, None, Some(selection), None, opts)
}

/// [`block_sparse_attention`] with an additive per-key bias and optional keep rule.
pub fn block_sparse_attention_with_bias(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    selection: &BlockSelection,
    bias: &KeyBias,
    opts: &AttentionOptions,
) -> Result<AttentionOutput> {
    attention_core(q, k, v, Some(bias), Some(selection), None, opts)
}
