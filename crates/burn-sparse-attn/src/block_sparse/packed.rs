//! Block selections over packed variable-length batches.
//!
//! In a packed batch each sequence's key blocks start at the sequence's own first key (block
//! `j` of sequence `s` is keys `cu_k[s] + j * key_block ..`, the last one partial), as in
//! the published varlen kernels: flash-linear-attention's NSA selection and MoBA's chunks.
//! Those blocks do not line up with a grid over the whole pack, which is what the kernels
//! walk. So the library lays the pack out once more, block-aligned: every sequence starts at
//! a multiple of the block (its queries at a multiple of the query block), and the gap after
//! it (fewer than one block) holds rows and keys that belong to no sequence. On that layout
//! a sequence's blocks are grid blocks, the selection's local block numbers become global
//! ones by adding the sequence's first block, and one launch runs every sequence. The copy
//! costs `O(total x head_dim)`; the padding is less than `lcm(query_block, key_block)` rows
//! and keys per sequence under causal self-packing (less than one block otherwise), never the
//! longest sequence. Many sequences much shorter than a block therefore multiply the work:
//! pack them with blocks no longer than the sequences.
//!
//! Causal self-attention packing (`cu_q == cu_k`) needs nothing more: a row's selected
//! blocks are its own sequence's, where the pack-wide causal mask and window are the
//! sequence's own (a gap's keys sit after every row of its sequence). Otherwise the rows and
//! keys of the aligned layout also carry the per-sequence visibility intervals
//! ([`crate::varlen`]), so gap keys are seen by no row of a sequence.

use burn::tensor::{Int, Tensor, TensorData};
use sparse_attn_kernels::{VarlenBounds, varlen_bounds};

use super::BlockSelection;
use crate::attention::{AttentionOptions, AttentionOutput, KeyBias, attention_in_bounds, validate_options, validate_qkv};
use crate::error::{Result, SparseAttnError, check_positive, shape_err};
use crate::varlen::VarLen;

/// Where each sequence of a packed batch sits in the block-aligned layout.
#[derive(Debug, Clone)]
pub(crate) struct AlignedPacking {
    /// Rows of the aligned query layout (a multiple of the query alignment).
    pub(crate) total_q: usize,
    /// Keys of the aligned key layout.
    pub(crate) total_k: usize,
    /// Aligned start of each sequence's queries and keys.
    pub(crate) start_q: Vec<usize>,
    pub(crate) start_k: Vec<usize>,
    /// Aligned query row -> packed row (gap rows read row 0; their results are dropped).
    gather_q: Vec<i64>,
    /// Aligned key -> packed key (gap keys read key 0; nothing sees them).
    gather_k: Vec<i64>,
    /// Packed row -> aligned row.
    scatter_q: Vec<i64>,
    /// Visibility intervals over the aligned layout, unless the pack-wide masks suffice.
    pub(crate) bounds: Option<VarlenBounds>,
}

fn lcm(a: usize, b: usize) -> usize {
    fn gcd(a: usize, b: usize) -> usize {
        if b == 0 { a } else { gcd(b, a % b) }
    }
    a / gcd(a, b) * b
}

impl AlignedPacking {
    /// The layout for `query_block`-row and `key_block`-key blocks under `opts`.
    pub(crate) fn new(varlen: &VarLen, query_block: usize, key_block: usize, opts: &AttentionOptions) -> Result<Self> {
        let (cu_q, cu_k) = (varlen.cu_seqlens_q(), varlen.cu_seqlens_k());
        let shared = opts.causal && cu_q == cu_k;
        // One layout for queries and keys when the pack-wide causal mask is to hold.
        let (align_q, align_k) = if shared {
            let l = lcm(query_block, key_block);
            (l, l)
        } else {
            (query_block, key_block)
        };
        let place = |cu: &[usize], align: usize| -> Vec<usize> {
            let mut starts = Vec::with_capacity(cu.len());
            let mut at = 0;
            for w in cu.windows(2) {
                starts.push(at);
                at += (w[1] - w[0]).div_ceil(align) * align;
            }
            starts.push(at);
            starts
        };
        let (start_q, start_k) = (place(cu_q, align_q), place(cu_k, align_k));
        let n = varlen.num_sequences();
        let (total_q, total_k) = (start_q[n], start_k[n]);
        let gather = |cu: &[usize], start: &[usize], total: usize| -> Vec<i64> {
            let mut g = vec![0i64; total];
            for s in 0..n {
                for t in 0..cu[s + 1] - cu[s] {
                    g[start[s] + t] = (cu[s] + t) as i64;
                }
            }
            g
        };
        let gather_q = gather(cu_q, &start_q, total_q);
        let gather_k = gather(cu_k, &start_k, total_k);
        let mut scatter_q = vec![0i64; varlen.total_q()];
        for s in 0..n {
            for t in 0..cu_q[s + 1] - cu_q[s] {
                scatter_q[cu_q[s] + t] = (start_q[s] + t) as i64;
            }
        }
        let bounds = if shared {
            None
        } else {
            // Each sequence followed by its gap as a sequence of its own (gap rows see only
            // gap keys, which no real row sees).
            let mut aq = vec![0];
            let mut ak = vec![0];
            for s in 0..n {
                aq.extend([start_q[s] + cu_q[s + 1] - cu_q[s], start_q[s + 1]]);
                ak.extend([start_k[s] + cu_k[s + 1] - cu_k[s], start_k[s + 1]]);
            }
            Some(varlen_bounds(&aq, &ak, opts.causal, opts.window).map_err(|e| SparseAttnError::Param {
                arg: "varlen",
                detail: format!("the block-aligned layout of the pack ({} rows, {} keys) is out of the kernels' range: {e}", total_q, total_k),
            })?)
        };
        Ok(Self { total_q, total_k, start_q, start_k, gather_q, gather_k, scatter_q, bounds })
    }

    fn index(values: &[i64], device: &burn::tensor::Device) -> Tensor<1, Int> {
        Tensor::<1, Int>::from_data(TensorData::new(values.to_vec(), [values.len()]), device)
    }

    /// Packed queries `[b, h, total_q, d]` in the aligned layout (differentiable).
    pub(crate) fn align_q(&self, q: Tensor<4>) -> Tensor<4> {
        let device = q.device();
        q.select(2, Self::index(&self.gather_q, &device))
    }

    /// Packed keys (or values, or a per-key tensor on its last axis) in the aligned layout.
    pub(crate) fn align_k<const D: usize>(&self, k: Tensor<D>) -> Tensor<D> {
        let device = k.device();
        k.select(D - 2, Self::index(&self.gather_k, &device))
    }

    /// An aligned per-row tensor back in packed order (rows on axis 2).
    pub(crate) fn unalign_q<const D: usize, K: burn::tensor::kind::Basic>(&self, x: Tensor<D, K>) -> Tensor<D, K> {
        let device = x.device();
        x.select(2, Self::index(&self.scatter_q, &device))
    }

    /// Whether each aligned key is a real key (not a gap), as 0/1 per key.
    pub(crate) fn real_keys(&self, varlen: &VarLen) -> Vec<bool> {
        let cu = varlen.cu_seqlens_k();
        let mut real = vec![false; self.total_k];
        for s in 0..varlen.num_sequences() {
            real[self.start_k[s]..self.start_k[s] + cu[s + 1] - cu[s]].fill(true);
        }
        real
    }

    /// Runs attention on the aligned layout and returns it in packed order.
    pub(crate) fn attend(
        &self,
        q: Tensor<4>,
        k: Tensor<4>,
        v: Tensor<4>,
        bias: Option<&KeyBias>,
        selection: &BlockSelection,
        opts: &AttentionOptions,
    ) -> Result<AttentionOutput> {
        let out = attention_in_bounds(self.align_q(q), self.align_k(k), self.align_k(v), bias, Some(selection), self.bounds.as_ref(), opts)?;
        Ok(AttentionOutput { output: self.unalign_q(out.output), lse: self.unalign_q(out.lse) })
    }
}

/// Query rows of a packed selection: `ceil(len_q / query_block)` per sequence.
pub fn packed_selection_rows(varlen: &VarLen, query_block: usize) -> usize {
    varlen.cu_seqlens_q().windows(2).map(|w| (w[1] - w[0]).div_ceil(query_block.max(1))).sum()
}

/// A packed selection (local block numbers, rows in packed order) on the aligned layout:
/// global block numbers, `-1` for entries outside their sequence's blocks and for gap rows.
fn align_selection(sel: &BlockSelection, varlen: &VarLen, layout: &AlignedPacking) -> BlockSelection {
    let (qb, kb) = (sel.query_block, sel.key_block);
    let (cu_q, cu_k) = (varlen.cu_seqlens_q(), varlen.cu_seqlens_k());
    let rows_al = layout.total_q / qb;
    let mut source = vec![0i64; rows_al];
    let mut first_block = vec![0i64; rows_al];
    let mut n_blocks = vec![0i64; rows_al];
    let mut row0 = 0;
    for s in 0..varlen.num_sequences() {
        let rows = (cu_q[s + 1] - cu_q[s]).div_ceil(qb);
        for r in 0..rows {
            let at = layout.start_q[s] / qb + r;
            source[at] = (row0 + r) as i64;
            first_block[at] = (layout.start_k[s] / kb) as i64;
            n_blocks[at] = (cu_k[s + 1] - cu_k[s]).div_ceil(kb) as i64;
        }
        row0 += rows;
    }
    let device = sel.indices.device();
    let [b, hs, _, cap] = sel.indices.dims();
    let per_row = |values: Vec<i64>| AlignedPacking::index(&values, &device).reshape([1, 1, rows_al, 1]).expand([b, hs, rows_al, cap]);
    let local = sel.indices.clone().select(2, AlignedPacking::index(&source, &device));
    let inside = local.clone().greater_equal_elem(0).bool_and(local.clone().lower(per_row(n_blocks)));
    let global = (local + per_row(first_block)).mask_fill(inside.bool_not(), -1);
    BlockSelection { indices: global, key_block: kb, query_block: qb }
}

/// Checks a packed selection's shape against its batch.
fn validate_packed_selection(sel: &BlockSelection, varlen: &VarLen, batch: usize, heads_q: usize, heads_kv: usize) -> Result<()> {
    check_positive("key_block", sel.key_block)?;
    check_positive("query_block", sel.query_block)?;
    let [b, hs, r, c] = sel.indices.dims();
    let rows = packed_selection_rows(varlen, sel.query_block);
    if b != batch {
        return shape_err("selection.indices", format!("batch {b} differs from q's batch {batch}"));
    }
    if hs != heads_q && hs != heads_kv {
        return shape_err("selection.indices", format!("heads {hs} must equal heads_q ({heads_q}) or heads_kv ({heads_kv})"));
    }
    if r != rows {
        return shape_err(
            "selection.indices",
            format!("rows {r} must be the sum over sequences of ceil(len_q / query_block) = {rows}"),
        );
    }
    if c == 0 {
        return shape_err("selection.indices", "capacity (last dim) must be at least 1");
    }
    Ok(())
}

/// Block-sparse attention over a packed batch ([`crate::varlen`]): each row attends to the
/// blocks of its own sequence its list names, under `opts`' causal mask and window within
/// the sequence.
///
/// `selection.indices` is `[batch, sel_heads, rows, capacity]` where `rows` runs over the
/// sequences in order, `ceil(len_q / query_block)` each ([`packed_selection_rows`]; the
/// packed query rows themselves for per-token lists), and entries are block numbers local to
/// the row's sequence: block `j` is keys `cu_seqlens_k[s] + j * key_block ..` (the last
/// block of a sequence may be partial), as flash-linear-attention's varlen NSA counts them.
/// Entries outside `0..ceil(len_k / key_block)` are ignored like the `-1` padding. One
/// launch covers every sequence (see the module docs for the layout it runs on).
pub fn block_sparse_attention_varlen(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    selection: &BlockSelection,
    varlen: &VarLen,
    opts: &AttentionOptions,
) -> Result<AttentionOutput> {
    let dims = validate_qkv(&q, &k, &v)?;
    validate_options(opts)?;
    varlen.validate(&dims)?;
    validate_packed_selection(selection, varlen, dims.batch, dims.heads_q, dims.heads_kv)?;
    let layout = AlignedPacking::new(varlen, selection.query_block, selection.key_block, opts)?;
    let aligned = align_selection(selection, varlen, &layout);
    layout.attend(q, k, v, None, &aligned, opts)
}
