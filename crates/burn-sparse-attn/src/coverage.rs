//! Which (query, key) pairs a layer attends, counted per pair of blocks: the picture of a
//! sparse method's selection that a heat map draws.
//!
//! A [`BlockCoverage`] splits the causal `seq x seq` map of one layer into `block x block`
//! cells and gives, per query head and cell, the fraction of the cell's causal pairs that the
//! method attends, averaged over the batch. Dense attention covers every causal pair (1.0
//! below the diagonal); a sparse method shows where its routing or selection looks. The
//! counts come from each method's own selection (`AttentionMethod::block_coverage`): NSA's
//! selected blocks together with its sliding window (its compressed branch reads every visible
//! compressed token and is not drawn), MoBA's routed blocks, SeerAttention's gated blocks, and
//! the keys dynamic-mask attention keeps. Everything is counted on the host: this is a
//! diagnostic, not a training-time op.

use burn::tensor::{Int, Tensor};

use crate::block_sparse::BlockSelection;
use crate::error::{Result, check_positive, shape_err};

/// Attended fraction of each block pair of a self-attention map, per query head.
#[derive(Debug, Clone, PartialEq)]
pub struct BlockCoverage {
    /// Tokens per cell side.
    pub block: usize,
    /// Query heads.
    pub heads: usize,
    /// Cells along the query axis (`ceil(seq / block)`).
    pub q_blocks: usize,
    /// Cells along the key axis (`ceil(seq / block)`).
    pub k_blocks: usize,
    /// `[heads, q_blocks, k_blocks]`, row-major: attended causal pairs over causal pairs of the
    /// cell, in `[0, 1]`; NaN for cells without causal pairs (above the diagonal).
    pub fraction: Vec<f32>,
    /// Over the whole map and every head: attended causal pairs over causal pairs.
    pub attended: f64,
}

impl BlockCoverage {
    /// The fraction of cell (`q_block`, `k_block`) of `head`.
    pub fn at(&self, head: usize, q_block: usize, k_block: usize) -> f32 {
        self.fraction[(head * self.q_blocks + q_block) * self.k_blocks + k_block]
    }

    /// The map averaged over the heads, `[q_blocks, k_blocks]` row-major (NaN above the
    /// diagonal).
    pub fn mean_over_heads(&self) -> Vec<f32> {
        let cells = self.q_blocks * self.k_blocks;
        (0..cells)
            .map(|c| (0..self.heads).map(|h| self.fraction[h * cells + c]).sum::<f32>() / self.heads.max(1) as f32)
            .collect()
    }
}

/// Counts attended causal pairs of a `seq x seq` self-attention map into cells.
pub(crate) struct CoverageCounter {
    seq: usize,
    block: usize,
    heads: usize,
    cells: usize,
    batches: usize,
    counts: Vec<u64>,
    spans: Vec<(usize, usize)>,
}

impl CoverageCounter {
    /// A counter for `heads` query heads of a `seq`-token map in `block`-token cells.
    pub(crate) fn new(seq: usize, heads: usize, block: usize) -> Result<Self> {
        check_positive("block", block)?;
        check_positive("seq", seq)?;
        let cells = seq.div_ceil(block);
        Ok(Self { seq, block, heads, cells, batches: 0, counts: vec![0; heads * cells * cells], spans: Vec::new() })
    }

    /// Starts counting one more batch element.
    pub(crate) fn next_batch(&mut self) {
        self.batches += 1;
    }

    /// Query `row` of `head` attends the keys of `spans` (half-open, any order, may overlap):
    /// their union, cut to the causal keys `0..=row`, is counted once.
    pub(crate) fn add_row(&mut self, head: usize, row: usize, spans: impl IntoIterator<Item = (usize, usize)>) {
        let limit = row + 1;
        self.spans.clear();
        self.spans.extend(spans.into_iter().map(|(lo, hi)| (lo.min(limit), hi.min(limit))).filter(|(lo, hi)| lo < hi));
        self.spans.sort_unstable();
        let base = (head * self.cells + row / self.block) * self.cells;
        let mut end = 0;
        for i in 0..self.spans.len() {
            let (lo, hi) = self.spans[i];
            let lo = lo.max(end);
            if lo >= hi {
                continue;
            }
            end = hi;
            let mut key = lo;
            while key < hi {
                let cell_end = ((key / self.block + 1) * self.block).min(hi);
                self.counts[base + key / self.block] += (cell_end - key) as u64;
                key = cell_end;
            }
        }
    }

    /// Query `row` of `head` attends exactly the keys `kept` (each once, any order).
    pub(crate) fn add_keys(&mut self, head: usize, row: usize, kept: impl IntoIterator<Item = usize>) {
        let base = (head * self.cells + row / self.block) * self.cells;
        for key in kept.into_iter().filter(|&k| k <= row) {
            self.counts[base + key / self.block] += 1;
        }
    }

    /// The fractions: each cell's count over its causal pairs times the batch elements.
    pub(crate) fn finish(self) -> BlockCoverage {
        let n = self.cells;
        let mut causal = vec![0u64; n * n];
        for row in 0..self.seq {
            let qb = row / self.block;
            for kb in 0..=qb {
                let lo = kb * self.block;
                causal[qb * n + kb] += ((row + 1).min(lo + self.block) - lo) as u64;
            }
        }
        let batches = self.batches.max(1) as u64;
        let mut attended = 0u64;
        let fraction = self
            .counts
            .iter()
            .enumerate()
            .map(|(i, &c)| {
                attended += c;
                let pairs = causal[i % (n * n)] * batches;
                if pairs == 0 { f32::NAN } else { (c as f64 / pairs as f64) as f32 }
            })
            .collect();
        let all_pairs = (self.seq * (self.seq + 1) / 2) as u64 * batches * self.heads as u64;
        BlockCoverage {
            block: self.block,
            heads: self.heads,
            q_blocks: n,
            k_blocks: n,
            fraction,
            attended: attended as f64 / all_pairs.max(1) as f64,
        }
    }
}

/// Host copy of an int tensor.
pub(crate) fn host_ints<const D: usize>(t: Tensor<D, Int>) -> Vec<i64> {
    t.into_data().convert::<i64>().try_to_vec::<i64>().expect("an int tensor converts to i64")
}

/// Host copy of a float tensor.
pub(crate) fn host_floats<const D: usize>(t: Tensor<D>) -> Vec<f64> {
    t.into_data().convert::<f64>().try_to_vec::<f64>().expect("a float tensor converts to f64")
}

/// Dense causal attention: every causal pair, or each query's `window` most recent keys
/// (`window = 0`: no window).
pub(crate) fn causal_coverage(batch: usize, heads: usize, seq: usize, window: usize, block: usize) -> Result<BlockCoverage> {
    let mut counter = CoverageCounter::new(seq, heads, block)?;
    for _ in 0..batch {
        counter.next_batch();
        for h in 0..heads {
            for row in 0..seq {
                let lo = if window == 0 { 0 } else { (row + 1).saturating_sub(window) };
                counter.add_row(h, row, [(lo, seq)]);
            }
        }
    }
    Ok(counter.finish())
}

/// The coverage of a causal self-attention block selection (`seq_q = seq_k = seq`) over
/// `heads_q` query heads, with each query's `window` most recent keys added (0: none).
pub(crate) fn selection_coverage(selection: &BlockSelection, heads_q: usize, seq: usize, window: usize, block: usize) -> Result<BlockCoverage> {
    let [b, sel_heads, rows, cap] = selection.indices.dims();
    if sel_heads == 0 || heads_q % sel_heads != 0 {
        return shape_err("selection.indices", format!("{sel_heads} selection heads do not divide {heads_q} query heads"));
    }
    if rows != seq.div_ceil(selection.query_block.max(1)) {
        return shape_err("selection.indices", format!("{rows} rows do not cover {seq} queries in blocks of {}", selection.query_block));
    }
    let idx = host_ints(selection.indices.clone());
    let group = heads_q / sel_heads;
    let kb = selection.key_block;
    let mut counter = CoverageCounter::new(seq, heads_q, block)?;
    for bi in 0..b {
        counter.next_batch();
        for h in 0..heads_q {
            let sh = h / group;
            for t in 0..seq {
                let r = t / selection.query_block;
                let list = &idx[((bi * sel_heads + sh) * rows + r) * cap..][..cap];
                let blocks = list.iter().filter(|&&i| i >= 0).map(|&i| (i as usize * kb, ((i as usize + 1) * kb).min(seq)));
                let win = (window > 0).then(|| ((t + 1).saturating_sub(window), t + 1));
                counter.add_row(h, t, blocks.chain(win));
            }
        }
    }
    Ok(counter.finish())
}

/// The coverage of dynamic-mask attention's keep rule: query `t` attends key `j <= t` when
/// `bias[j] > value[t]`, or `bias[j] == value[t]` and `j >= index[t]` (the threshold of
/// `dma_keep_threshold`, per kv head, shared by its query heads).
pub(crate) fn keep_coverage(bias: Tensor<3>, value: Tensor<3>, index: Tensor<3, Int>, heads_q: usize, block: usize) -> Result<BlockCoverage> {
    let [b, hb, sk] = bias.dims();
    let sq = value.dims()[2];
    if sq != sk {
        return shape_err("bias", format!("coverage needs self-attention: {sq} queries but {sk} keys"));
    }
    if hb == 0 || heads_q % hb != 0 {
        return shape_err("bias", format!("{hb} bias heads do not divide {heads_q} query heads"));
    }
    let (bias, value, index) = (host_floats(bias), host_floats(value), host_ints(index));
    let group = heads_q / hb;
    let mut counter = CoverageCounter::new(sq, heads_q, block)?;
    let mut kept = Vec::new();
    for bi in 0..b {
        counter.next_batch();
        for g in 0..hb {
            let keys = &bias[(bi * hb + g) * sk..][..sk];
            for t in 0..sq {
                let row = (bi * hb + g) * sq + t;
                let (thr, tie) = (value[row], index[row]);
                kept.clear();
                kept.extend((0..=t).filter(|&j| keys[j] > thr || (keys[j] == thr && j as i64 >= tie)));
                for h in g * group..(g + 1) * group {
                    counter.add_keys(h, t, kept.iter().copied());
                }
            }
        }
    }
    Ok(counter.finish())
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Device, TensorData};

    #[test]
    fn dense_covers_every_causal_pair_and_nothing_above_the_diagonal() {
        let c = causal_coverage(2, 3, 10, 0, 4).unwrap();
        assert_eq!((c.q_blocks, c.k_blocks, c.heads), (3, 3, 3));
        for h in 0..3 {
            for q in 0..3 {
                for k in 0..3 {
                    let f = c.at(h, q, k);
                    if k > q { assert!(f.is_nan()) } else { assert_eq!(f, 1.0, "cell {q},{k}") }
                }
            }
        }
        assert_eq!(c.attended, 1.0);
        // A window of one key is the diagonal: 10 of 55 pairs.
        let w = causal_coverage(1, 1, 10, 1, 4).unwrap();
        assert!((w.attended - 10.0 / 55.0).abs() < 1e-9 && w.at(0, 1, 0) == 0.0);
    }

    /// One query head attends block 0 only, the other its own 2-key window: counted by hand.
    #[test]
    fn selection_and_window_are_counted_once_per_pair() {
        let device = Device::flex();
        // seq 6, key blocks of 2, per token; head 0 picks block 0 (and a duplicate, and -1).
        let mut idx = Vec::new();
        for _ in 0..6 {
            idx.extend([0i64, 0, -1]);
        }
        let sel = BlockSelection::per_token(Tensor::from_data(TensorData::new(idx, [1, 1, 6, 3]), &device), 2);
        // Two query heads share the list; the window of 2 keys adds the diagonal.
        let c = selection_coverage(&sel, 2, 6, 2, 3).unwrap();
        // Cell (0,0): rows 0..3, causal pairs 1+2+3 = 6; block 0 gives keys {0,1}∩causal:
        // rows 0:1, 1:2, 2:2 -> 5; window adds key 2 for row 2 -> 6.
        assert_eq!(c.at(0, 0, 0), 1.0);
        // Cell (1,0): rows 3..6 x keys 0..3 (9 pairs): block 0 gives 2 per row (6); window
        // (t-1, t) never reaches keys < 3 except row 3's key 2 -> 7.
        assert!((c.at(1, 1, 0) - 7.0 / 9.0).abs() < 1e-6, "{}", c.at(1, 1, 0));
        // Cell (1,1): rows 3..6, causal pairs 1+2+3 = 6; window gives rows 3:1, 4:2, 5:2 -> 5.
        assert!((c.at(0, 1, 1) - 5.0 / 6.0).abs() < 1e-6);
        assert!(c.at(0, 0, 1).is_nan());
        let total = (6.0 + 7.0 + 5.0) / 21.0;
        assert!((c.attended - total).abs() < 1e-9, "{}", c.attended);
    }

    #[test]
    fn keep_rule_counts_kept_keys_with_ties_at_the_index() {
        let device = Device::flex();
        // 4 keys with biases 1, 3, 3, 0; every row's threshold is 3 with ties kept from key 2.
        let bias = Tensor::<3>::from_data(TensorData::new(vec![1.0f32, 3.0, 3.0, 0.0], [1, 1, 4]), &device);
        let value = Tensor::<3>::from_data(TensorData::new(vec![3.0f32; 4], [1, 1, 4]), &device);
        let index = Tensor::<3, Int>::from_data(TensorData::new(vec![2i64; 4], [1, 1, 4]), &device);
        let c = keep_coverage(bias, value, index, 1, 4).unwrap();
        // Only key 2 is kept, by rows 2 and 3: 2 of 10 causal pairs.
        assert!((c.attended - 0.2).abs() < 1e-9);
        assert!((c.at(0, 0, 0) - 0.2).abs() < 1e-6);
    }

    #[test]
    fn bad_shapes_name_the_argument() {
        let device = Device::flex();
        let sel = BlockSelection::per_token(Tensor::<4, Int>::zeros([1, 3, 5, 1], &device), 2);
        let err = selection_coverage(&sel, 4, 5, 0, 2).unwrap_err().to_string();
        assert!(err.contains("selection.indices"), "{err}");
        assert!(CoverageCounter::new(4, 1, 0).is_err());
    }
}
