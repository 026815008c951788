//! `AttentionMethod::block_coverage`: the attended pairs each layer reports agree with what
//! its configuration forces (all pairs when the budget covers the sequence, MoBA's own
//! block alone at top-1, DMA's `min(t + 1, window)` keys per query, NSA within its budget).

use burn::tensor::{DType, Tensor};
use burn_sparse_attn::{
    AttentionMethod, AttentionMethodConfig, BlockCoverage, DenseAttentionConfig, DmaAttentionConfig, MobaAttentionConfig,
    NsaAttentionConfig, SeerAttentionConfig,
};
use sparse_attn_tests::*;

const D_MODEL: usize = 16;
const SEQ: usize = 48;

fn layer(cfg: AttentionMethodConfig) -> AttentionMethod {
    cfg.init(&dev()).unwrap()
}

fn coverage(cfg: AttentionMethodConfig, block: usize) -> BlockCoverage {
    let x: Tensor<3> = Rng::new(700).randn([2, SEQ, D_MODEL], 1.0, &dev()).cast(DType::F32);
    layer(cfg).block_coverage(x, block).unwrap()
}

/// Causal pairs of `seq` queries when each sees at most `keys` keys.
fn capped_pairs(seq: usize, keys: usize) -> f64 {
    (0..seq).map(|t| (t + 1).min(keys)).sum::<usize>() as f64
}

fn all_pairs(seq: usize) -> f64 {
    (seq * (seq + 1) / 2) as f64
}

#[test]
fn a_budget_that_covers_the_sequence_attends_every_causal_pair() {
    let n_blocks = SEQ / 8;
    for cfg in [
        AttentionMethodConfig::Dense(DenseAttentionConfig::new(D_MODEL, 4)),
        AttentionMethodConfig::Moba(MobaAttentionConfig::new(D_MODEL, 4).with_block_size(8).with_top_k(n_blocks)),
        AttentionMethodConfig::Seer(SeerAttentionConfig::new(D_MODEL, 4).with_block_size(8).with_gate_hidden(8).with_top_k(Some(n_blocks))),
        AttentionMethodConfig::Nsa(
            NsaAttentionConfig::new(D_MODEL, 4).with_compress_block(8).with_compress_stride(4).with_select_block(8).with_top_n(n_blocks).with_window(4),
        ),
        AttentionMethodConfig::Dma(DmaAttentionConfig::new(D_MODEL, 4).with_window(SEQ)),
    ] {
        let name = cfg.name();
        let c = coverage(cfg, 8);
        assert_eq!((c.heads, c.q_blocks, c.k_blocks, c.block), (4, 6, 6, 8), "{name}");
        assert!((c.attended - 1.0).abs() < 1e-12, "{name}: {}", c.attended);
        for (i, f) in c.mean_over_heads().into_iter().enumerate() {
            let (q, k) = (i / 6, i % 6);
            if k > q { assert!(f.is_nan(), "{name}: cell {q},{k} above the diagonal") } else { assert_eq!(f, 1.0, "{name}: cell {q},{k}") }
        }
    }
}

#[test]
fn moba_top_one_attends_only_its_own_block() {
    let c = coverage(AttentionMethodConfig::Moba(MobaAttentionConfig::new(D_MODEL, 4).with_block_size(8).with_top_k(1)), 8);
    for h in 0..4 {
        for q in 0..6 {
            for k in 0..q {
                assert_eq!(c.at(h, q, k), 0.0, "head {h} cell {q},{k}");
            }
            assert_eq!(c.at(h, q, q), 1.0, "head {h} diagonal {q}");
        }
    }
    let diagonal: f64 = (0..6).map(|_| (8 * 9 / 2) as f64).sum();
    assert!((c.attended - diagonal / all_pairs(SEQ)).abs() < 1e-12, "{}", c.attended);
}

#[test]
fn dma_keeps_window_keys_per_query() {
    for window in [1, 5, 20] {
        let c = coverage(AttentionMethodConfig::Dma(DmaAttentionConfig::new(D_MODEL, 4).with_window(window)), 16);
        let want = capped_pairs(SEQ, window) / all_pairs(SEQ);
        assert!((c.attended - want).abs() < 1e-12, "window {window}: {} vs {want}", c.attended);
    }
}

#[test]
fn nsa_attends_at_least_its_window_and_at_most_its_budget() {
    let (block, top_n, window) = (8, 2, 4);
    let cfg = NsaAttentionConfig::new(D_MODEL, 4)
        .with_compress_block(8)
        .with_compress_stride(4)
        .with_select_block(block)
        .with_top_n(top_n)
        .with_window(window);
    let c = coverage(AttentionMethodConfig::Nsa(cfg), 8);
    let low = capped_pairs(SEQ, window) / all_pairs(SEQ);
    let high = capped_pairs(SEQ, top_n * block + window) / all_pairs(SEQ);
    assert!(c.attended > low && c.attended <= high + 1e-12, "{low} < {} <= {high}", c.attended);
    // Every query's own 4 most recent keys are attended: the diagonal cells are at least
    // that share.
    for q in 0..6 {
        let diag = (0..8).map(|r: usize| (r + 1).min(window)).sum::<usize>() as f32 / 36.0;
        assert!(c.at(0, q, q) >= diag - 1e-6, "cell {q},{q}: {}", c.at(0, q, q));
    }
}

#[test]
fn a_zero_block_is_an_error_naming_it() {
    let x: Tensor<3> = Rng::new(1).randn([1, 8, D_MODEL], 1.0, &dev()).cast(DType::F32);
    let e = layer(AttentionMethodConfig::Dense(DenseAttentionConfig::new(D_MODEL, 4))).block_coverage(x, 0).unwrap_err();
    assert!(e.to_string().contains("block"), "{e}");
}
