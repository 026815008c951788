//! Hand-computed cases: NSA's overlap mapping, compressed-token counts, selection scores and
//! top-n rules; MoBA's routing rules; SeerAttention's pooling, block mask, target and loss;
//! DMA's keep threshold. Every expected value below is worked out by hand in the comments.

use burn::tensor::{Int, Tensor};
use burn_sparse_attn::attention::AttentionOptions;
use burn_sparse_attn::dma::{DmaParams, dma_attention, dma_keep_threshold};
use burn_sparse_attn::moba::{block_mean_keys, moba_gate_scores, moba_select};
use burn_sparse_attn::nsa::{
    NsaBlocks, NsaInputs, NsaParams, nsa_attention, nsa_attention_with, nsa_block_scores_from_probs, nsa_compressed_attention, nsa_overlap_weights, nsa_select, nsa_selection_scores, num_compressed,
};
use burn_sparse_attn::seer::{avg_pool, block_causal_mask, max_pool, min_pool, seer_attention_target, seer_gate_loss};
use sparse_attn_tests::*;

// ------------------------------------------------------------------------------------------
// NSA
// ------------------------------------------------------------------------------------------

/// Block scores from a given probability map: with default NSA shapes (256 keys, 15
/// compressed tokens, 4 blocks), query head 0 puts probability 1 on compressed token 3 and
/// query head 1 (same GQA group) 0.5 on token 5; the group's scores are 1 * w[3] + 0.5 * w[5],
/// i.e. block 0 gets 1 * 1 (token 3 shares its last 16 keys with block 0) and block 1 gets
/// 1 * 1 + 0.5 * 2 = 2. A map given per kv head is used as is.
#[test]
fn nsa_block_scores_from_given_probabilities() {
    let device = dev();
    let p = NsaParams::default();
    let n_cmp = num_compressed(256, 32, 16);
    let mut probs = vec![0.0; 2 * n_cmp];
    probs[3] = 1.0;
    probs[n_cmp + 5] = 0.5;
    let scores = nsa_block_scores_from_probs(tensor(probs.clone(), [1, 2, 1, n_cmp], &device), 1, 256, &p).unwrap();
    assert_eq!(scores.dims(), [1, 1, 1, 4]);
    assert_eq!(values(scores), vec![1.0, 2.0, 0.0, 0.0]);
    let per_kv = nsa_block_scores_from_probs(tensor(probs[..n_cmp].to_vec(), [1, 1, 1, n_cmp], &device), 1, 256, &p).unwrap();
    assert_eq!(values(per_kv), vec![1.0, 1.0, 0.0, 0.0]);
    // Group sums: two kv heads of two query heads each.
    let heads4: Vec<f64> = (0..4).flat_map(|h| (0..n_cmp).map(move |i| if i == 4 { (h + 1) as f64 } else { 0.0 })).collect();
    let two = nsa_block_scores_from_probs(tensor(heads4, [1, 4, 1, n_cmp], &device), 2, 256, &p).unwrap();
    // Token 4 has weight 2 on block 1 only: kv head 0 sums 1 + 2, kv head 1 sums 3 + 4.
    assert_eq!(values(two), vec![0.0, 6.0, 0.0, 0.0, 0.0, 14.0, 0.0, 0.0]);
    // A map with the wrong number of compressed tokens, or heads not a multiple of heads_kv.
    assert!(nsa_block_scores_from_probs(tensor(vec![0.0; 2 * 14], [1, 2, 1, 14], &device), 1, 256, &p).is_err());
    assert!(nsa_block_scores_from_probs(tensor(vec![0.0; 3 * n_cmp], [1, 3, 1, n_cmp], &device), 2, 256, &p).is_err());
}

#[test]
fn nsa_overlap_weights_defaults_are_1_2_2_2_1() {
    let p = NsaParams::default();
    assert_eq!((p.compress_block, p.compress_stride, p.select_block), (32, 16, 64));
    // 256 keys: windows start at 0, 16, .., 224 -> 15 compressed tokens; 4 selection blocks.
    let n_cmp = num_compressed(256, 32, 16);
    assert_eq!(n_cmp, 15);
    let n_sel = 4;
    let w = nsa_overlap_weights(n_cmp, n_sel, &p);
    assert_eq!(w.len(), n_cmp * n_sel);
    for j in 0..n_sel as i64 {
        for i in 0..n_cmp as i64 {
            // Block j = keys [64j, 64j+64). Window i = keys [16i, 16i+32).
            // i = 4j-1 shares 16 keys (weight 1), 4j..=4j+2 share 32 (weight 2), 4j+3 shares 16.
            let want = if i == 4 * j - 1 || i == 4 * j + 3 {
                1.0
            } else if (4 * j..=4 * j + 2).contains(&i) {
                2.0
            } else {
                0.0
            };
            let got = w[i as usize * n_sel + j as usize] as f64;
            assert_eq!(got, want, "overlap weight of compressed token {i} on block {j}");
        }
    }
    // Block 1 reads tokens 3..=7 with weights 1, 2, 2, 2, 1 (the paper's Eq. 9 would put them
    // at 0..=4).
    let block1: Vec<f64> = (0..n_cmp).map(|i| w[i * n_sel + 1] as f64).collect();
    assert_eq!(&block1[3..=7], &[1.0, 2.0, 2.0, 2.0, 1.0]);
    assert!(block1[..3].iter().all(|&x| x == 0.0) && block1[8..].iter().all(|&x| x == 0.0));
}

#[test]
fn nsa_overlap_weights_small_case() {
    // Windows of 4 keys every 2, selection blocks of 4 keys, 12 keys: windows [0,4) [2,6) [4,8)
    // [6,10) [8,12); shared keys / stride:
    let p = NsaParams { compress_block: 4, compress_stride: 2, select_block: 4, top_n: 2, window: 4, scale: None, ..NsaParams::default() };
    let w = nsa_overlap_weights(5, 3, &p);
    #[rustfmt::skip]
    let want = [
        2.0, 0.0, 0.0,
        1.0, 1.0, 0.0,
        0.0, 2.0, 0.0,
        0.0, 1.0, 1.0,
        0.0, 0.0, 2.0,
    ];
    assert_eq!(w.iter().map(|&x| x as f64).collect::<Vec<_>>(), want.to_vec());
}

#[test]
fn nsa_num_compressed_counts_complete_windows() {
    assert_eq!(num_compressed(31, 32, 16), 0);
    assert_eq!(num_compressed(32, 32, 16), 1);
    assert_eq!(num_compressed(47, 32, 16), 1);
    assert_eq!(num_compressed(48, 32, 16), 2);
    assert_eq!(num_compressed(100, 32, 16), 5); // starts 0, 16, 32, 48, 64 (64 + 32 = 96 <= 100)
    assert_eq!(num_compressed(10, 4, 2), 4);
    assert_eq!(num_compressed(11, 4, 2), 4);
    assert_eq!(num_compressed(12, 4, 2), 5);
    assert_eq!(num_compressed(7, 3, 1), 5);
    assert_eq!(num_compressed(0, 3, 1), 0);
}

fn small_params(top_n: usize) -> NsaParams {
    NsaParams { compress_block: 4, compress_stride: 2, select_block: 4, top_n, window: 4, scale: None, ..NsaParams::default() }
}

/// The forced blocks are options: one query at key position 15 (16 keys, blocks of 4: its
/// block is 3) with scores [0.1, 0.9, 0.5, 0.2] and `top_n = 3` selects {0, 2, 3} with the
/// defaults (block 0, current, previous), the plain top-3 {1, 2, 3} with nothing forced, and
/// {0, 1, 3} with two initial and one local block forced.
#[test]
fn nsa_forced_blocks_are_options() {
    let device = dev();
    let scores = tensor(vec![0.1, 0.9, 0.5, 0.2], [1, 1, 1, 4], &device);
    let pick = |forced_initial: usize, forced_local: usize| {
        let p = NsaParams { top_n: 3, select_block: 4, forced_initial, forced_local, ..small_params(3) };
        let sel = nsa_select(scores.clone(), 1, 16, &p).unwrap();
        let mut got = ints(sel.indices);
        got.sort_unstable();
        got
    };
    assert_eq!(pick(1, 2), vec![0, 2, 3]);
    assert_eq!(NsaParams::default().forced_initial, 1);
    assert_eq!(NsaParams::default().forced_local, 2);
    assert_eq!(pick(0, 0), vec![1, 2, 3]);
    assert_eq!(pick(2, 1), vec![0, 1, 3]);
    // Nothing forced and a query that sees only blocks 0 and 1 (position 5): its best block.
    let early = tensor(vec![0.1, 0.9, 0.5, 0.2], [1, 1, 1, 4], &device);
    let p = NsaParams { top_n: 1, select_block: 4, forced_initial: 0, forced_local: 0, ..small_params(1) };
    // seq_q 1, seq_k 16 puts the query at 15; use seq_q 11 rows to reach position 5 instead.
    let rows = Tensor::cat(vec![early; 11], 2);
    let sel = nsa_select(rows, 11, 16, &p).unwrap();
    assert_eq!(ints(sel.indices)[0], 1);
}

/// A given selection equal to the computed one reproduces NSA exactly; per-token counts keep
/// the first entries of each list (count = capacity changes nothing; count 1 equals giving
/// the first column only; count 0 leaves the selection branch empty: output 0).
#[test]
fn nsa_given_selection_and_per_token_counts() {
    let device = dev();
    let mut rng = Rng::new(230);
    let p = small_params(3);
    let (hq, hkv, s, d) = (4usize, 2usize, 14usize, 3usize);
    let nc = num_compressed(s, p.compress_block, p.compress_stride);
    let t = |rng: &mut Rng, shape: [usize; 4]| rng.randn(shape, 1.0, &device);
    let inputs = NsaInputs {
        q: t(&mut rng, [1, hq, s, d]),
        k_cmp: t(&mut rng, [1, hkv, nc, d]),
        v_cmp: t(&mut rng, [1, hkv, nc, d]),
        k_slc: t(&mut rng, [1, hkv, s, d]),
        v_slc: t(&mut rng, [1, hkv, s, d]),
        k_win: t(&mut rng, [1, hkv, s, d]),
        v_win: t(&mut rng, [1, hkv, s, d]),
        gates: t(&mut rng, [1, hq, s, 3]),
    };
    let base = nsa_attention(inputs.clone(), &p).unwrap();
    let given = nsa_attention_with(inputs.clone(), &p, NsaBlocks::Given(base.selection.indices.clone()), None).unwrap();
    assert_eq!(values(given.output.clone()), values(base.output.clone()));
    let full = Tensor::<3, Int>::full([1, hkv, s], 3, &device);
    let counted = nsa_attention_with(inputs.clone(), &p, NsaBlocks::Computed, Some(full)).unwrap();
    assert_eq!(values(counted.output), values(base.output.clone()));
    let one = Tensor::<3, Int>::ones([1, hkv, s], &device);
    let first = nsa_attention_with(inputs.clone(), &p, NsaBlocks::Computed, Some(one)).unwrap();
    let first_col = base.selection.indices.clone().slice([0..1, 0..hkv, 0..s, 0..1]);
    let given_first = nsa_attention_with(inputs.clone(), &p, NsaBlocks::Given(first_col), None).unwrap();
    assert_eq!(values(first.selected.output.clone()), values(given_first.selected.output));
    assert!(ints(first.selection.indices.slice([0..1, 0..hkv, 0..s, 1..3])).iter().all(|&x| x == -1));
    assert_ne!(values(first.selected.output), values(base.selected.output.clone()));
    let zero = Tensor::<3, Int>::zeros([1, hkv, s], &device);
    let none = nsa_attention_with(inputs, &p, NsaBlocks::Computed, Some(zero)).unwrap();
    assert!(values(none.selected.output).iter().all(|&x| x == 0.0));
}

#[test]
fn nsa_selection_scores_uniform_compression_by_hand() {
    // k_cmp = 0: every visible compressed token gets probability 1 / (number visible), for each
    // of the 2 query heads of the single kv head (GQA sums them). Token i is visible at key
    // position t when 2i + 3 <= t. Overlap table (tokens x blocks) from the small case above.
    let device = dev();
    let p = small_params(2);
    let (hq, s, d) = (2usize, 12usize, 3usize);
    let mut rng = Rng::new(200);
    let q = rng.randn([1, hq, s, d], 1.0, &device);
    let k_cmp = tensor(vec![0.0; 5 * d], [1, 1, 5, d], &device);
    let v_cmp = rng.randn([1, 1, 5, d], 1.0, &device);
    let lse = nsa_compressed_attention(q.clone(), k_cmp.clone(), v_cmp, s, &p).unwrap().lse;
    let scores = values(nsa_selection_scores(q, k_cmp, lse, s, &p).unwrap());
    assert_eq!(scores.len(), s * 3);
    let w = [[2.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0, 2.0, 0.0], [0.0, 1.0, 1.0], [0.0, 0.0, 2.0]];
    for t in 0..s {
        let visible: Vec<usize> = (0..5).filter(|&i| 2 * i + 3 <= t).collect();
        for j in 0..3 {
            let want = if visible.is_empty() {
                0.0
            } else {
                hq as f64 * visible.iter().map(|&i| w[i][j]).sum::<f64>() / visible.len() as f64
            };
            let got = scores[t * 3 + j];
            assert!((got - want).abs() < 1e-12, "score of block {j} at t = {t}: got {got}, want {want}");
        }
    }
    // Spot values: t = 5 sees tokens 0, 1 -> [2 * 3/2, 2 * 1/2, 0]; t = 11 sees all five.
    assert!((scores[5 * 3] - 3.0).abs() < 1e-12 && (scores[5 * 3 + 1] - 1.0).abs() < 1e-12);
    assert!((scores[11 * 3 + 1] - 1.6).abs() < 1e-12);
}

#[test]
fn nsa_selection_scores_match_naive() {
    let mut rng = Rng::new(201);
    for (hq, hkv, sq, sk, p) in [
        (4usize, 2usize, 12usize, 12usize, small_params(2)),
        (2, 1, 5, 14, NsaParams { compress_block: 4, compress_stride: 3, select_block: 3, top_n: 2, window: 4, scale: Some(0.4), ..NsaParams::default() }),
    ] {
        let d = 3;
        let device = dev();
        let nc = num_compressed(sk, p.compress_block, p.compress_stride);
        let n_sel = sk.div_ceil(p.select_block);
        let qv = rng.normals(hq * sq * d, 1.0);
        let kv = rng.normals(hkv * nc * d, 1.0);
        let q = tensor(qv.clone(), [1, hq, sq, d], &device);
        let k_cmp = tensor(kv.clone(), [1, hkv, nc, d], &device);
        let v_cmp = rng.randn([1, hkv, nc, d], 1.0, &device);
        let lse = nsa_compressed_attention(q.clone(), k_cmp.clone(), v_cmp, sk, &p).unwrap().lse;
        let got = values(nsa_selection_scores(q, k_cmp, lse, sk, &p).unwrap());
        let scale = p.scale.unwrap_or(default_scale(d));
        let g = hq / hkv;
        for hk in 0..hkv {
            for i in 0..sq {
                let pos = i as i64 + sk as i64 - sq as i64;
                let mut block = vec![0.0; n_sel];
                for h in hk * g..(hk + 1) * g {
                    let vis: Vec<usize> = (0..nc).filter(|&c| (c * p.compress_stride + p.compress_block) as i64 - 1 <= pos).collect();
                    let s: Vec<f64> = vis
                        .iter()
                        .map(|&c| scale * (0..d).map(|t| qv[(h * sq + i) * d + t] * kv[(hk * nc + c) * d + t]).sum::<f64>())
                        .collect();
                    let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let z: f64 = s.iter().map(|x| (x - m).exp()).sum();
                    for (&c, &sc) in vis.iter().zip(&s) {
                        let prob = (sc - m).exp() / z;
                        for (j, bj) in block.iter_mut().enumerate() {
                            let (a0, a1) = (c * p.compress_stride, c * p.compress_stride + p.compress_block);
                            let (b0, b1) = (j * p.select_block, (j + 1) * p.select_block);
                            let shared = a1.min(b1).saturating_sub(a0.max(b0));
                            *bj += prob * shared as f64 / p.compress_stride as f64;
                        }
                    }
                }
                for j in 0..n_sel {
                    let gv = got[(hk * sq + i) * n_sel + j];
                    assert!((gv - block[j]).abs() < 1e-6 * (1.0 + block[j].abs()), "hk {hk} i {i} j {j}: {gv} vs {}", block[j]);
                }
            }
        }
    }
}

#[test]
fn nsa_select_forced_recent_and_future_rules() {
    // select_block 4, 20 keys -> 5 blocks; top_n 4. Query t sits in block cur = t / 4.
    // Forced: block 0, cur, cur - 1. Candidates: blocks starting at or before t (j * 4 <= t).
    let device = dev();
    let p = small_params(4);
    let (s, n_sel) = (20usize, 5usize);
    let base = [0.0, 0.9, 0.5, 0.7, 0.1];
    let mut rows: Vec<[f64; 5]> = vec![base; s];
    rows[5] = [0.0, 0.0, 0.0, 100.0, 0.0]; // future block 3 must not win
    rows[13] = [0.0, 0.0, 0.0, 0.0, 50.0]; // future block 4 must not win; block 1 is the only candidate
    rows[17] = [5.0, 0.1, 0.3, 0.0, 0.0]; // block 2 beats block 1
    rows[18] = [0.0, 0.2, 0.6, 0.0, 0.0]; // block 2 beats block 1
    rows[19] = [0.0, 9.0, 8.0, 0.0, 0.0]; // forced blocks 0, 3, 4 stay although 2 scores higher
    let scores = tensor(rows.iter().flatten().cloned().collect(), [1, 1, s, n_sel], &device);
    let sel = nsa_select(scores, s, s, &p).unwrap();
    assert_eq!(sel.key_block, 4);
    assert_eq!(sel.query_block, 1);
    assert_eq!(sel.indices.dims(), [1, 1, s, 4]);
    let idx = ints(sel.indices);
    let want = |t: usize| -> Vec<usize> {
        match t {
            0..=3 => vec![0],
            4..=7 => vec![0, 1],
            8..=11 => vec![0, 1, 2],
            12..=15 => vec![0, 1, 2, 3],
            17 | 18 => vec![0, 2, 3, 4],
            16 | 19 => vec![0, 1, 3, 4],
            _ => unreachable!(),
        }
    };
    for t in 0..s {
        let list = &idx[t * 4..(t + 1) * 4];
        let valid = valid_sorted(list, n_sel);
        assert_eq!(valid, want(t), "selection of query {t}: {list:?}");
        assert_eq!(list.iter().filter(|&&x| x == -1).count(), 4 - want(t).len(), "padding of query {t}: {list:?}");
    }

    // seq_q = 3 < seq_k = 20: the queries sit at key positions 17, 18, 19.
    let rows = [[0.0, 0.1, 0.3, 0.0, 0.0], [0.0, 0.7, 0.6, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0]];
    let scores = tensor(rows.iter().flatten().cloned().collect(), [1, 1, 3, n_sel], &device);
    let p3 = small_params(4);
    let idx = ints(nsa_select(scores, 3, s, &p3).unwrap().indices);
    assert_eq!(valid_sorted(&idx[0..4], n_sel), vec![0, 2, 3, 4]);
    assert_eq!(valid_sorted(&idx[4..8], n_sel), vec![0, 1, 3, 4]);
    assert_eq!(valid_sorted(&idx[8..12], n_sel).len(), 4);
    assert!(valid_sorted(&idx[8..12], n_sel).starts_with(&[0]) && valid_sorted(&idx[8..12], n_sel).ends_with(&[3, 4]));
}

#[test]
fn nsa_select_per_kv_head() {
    // Two kv heads with different scores pick different blocks.
    let device = dev();
    let p = small_params(3);
    let (s, n_sel) = (20usize, 5usize);
    let mut data = Vec::new();
    for h in 0..2 {
        for _ in 0..s {
            data.extend(if h == 0 { [0.0, 0.9, 0.2, 0.0, 0.0] } else { [0.0, 0.2, 0.9, 0.0, 0.0] });
        }
    }
    let idx = ints(nsa_select(tensor(data, [1, 2, s, n_sel], &device), s, s, &p).unwrap().indices);
    // t = 12: forced {0, 2, 3} fill top_n = 3 for both heads.
    assert_eq!(valid_sorted(&idx[12 * 3..13 * 3], n_sel), vec![0, 2, 3]);
    assert_eq!(valid_sorted(&idx[(s + 12) * 3..(s + 13) * 3], n_sel), vec![0, 2, 3]);
    // With top_n 4 at t = 17 (forced {0, 3, 4}): head 0 adds block 1, head 1 adds block 2.
    let p4 = small_params(4);
    let mut data = Vec::new();
    for h in 0..2 {
        for _ in 0..s {
            data.extend(if h == 0 { [0.0, 0.9, 0.2, 0.0, 0.0] } else { [0.0, 0.2, 0.9, 0.0, 0.0] });
        }
    }
    let idx = ints(nsa_select(tensor(data, [1, 2, s, n_sel], &device), s, s, &p4).unwrap().indices);
    assert_eq!(valid_sorted(&idx[17 * 4..18 * 4], n_sel), vec![0, 1, 3, 4]);
    assert_eq!(valid_sorted(&idx[(s + 17) * 4..(s + 18) * 4], n_sel), vec![0, 2, 3, 4]);
}

#[test]
fn nsa_compressed_attention_visibility_by_hand() {
    // Token i (window [2i, 2i+4)) is visible from key position t when 2i + 3 <= t: rows t < 3
    // see nothing (output 0, LSE -inf); t = 3, 4 see token 0 only (output = v_cmp[0]).
    let device = dev();
    let p = small_params(2);
    let mut rng = Rng::new(202);
    let (s, d) = (10usize, 3usize);
    let q = rng.randn([1, 1, s, d], 1.0, &device);
    let k = rng.randn([1, 1, 4, d], 1.0, &device);
    let vv = rng.normals(4 * d, 1.0);
    let v = tensor(vv.clone(), [1, 1, 4, d], &device);
    let out = nsa_compressed_attention(q, k, v, s, &p).unwrap();
    let o = values(out.output);
    let lse = values(out.lse);
    for t in 0..3 {
        assert_eq!(&o[t * d..(t + 1) * d], &[0.0; 3], "row {t}");
        assert_eq!(lse[t], f64::NEG_INFINITY, "lse row {t}");
    }
    for t in 3..5 {
        assert_close(&format!("row {t}"), &o[t * d..(t + 1) * d], &vv[0..d], 1e-12, 1e-12);
        assert!(lse[t].is_finite());
    }
}

// ------------------------------------------------------------------------------------------
// MoBA
// ------------------------------------------------------------------------------------------

/// Keys of 2 dims in blocks of 2 with means b0 = (1, 0), b1 = (0, 1), b2 = (-1, 0),
/// b3 = (0, -1) and a partial last block b4 = {(5, 5)}.
fn moba_keys() -> Vec<f64> {
    vec![2.0, 1.0, 0.0, -1.0, 1.0, 1.0, -1.0, 1.0, -1.0, 2.0, -1.0, -2.0, 1.0, -1.0, -1.0, -1.0, 5.0, 5.0]
}

fn moba_queries() -> Vec<f64> {
    vec![
        1.0, 1.0, // t0
        -1.0, 0.5, // t1
        0.3, 0.2, // t2
        0.0, -3.0, // t3: the future block 3 would score 3
        1.0, 0.0, // t4: b0 (1) beats b1 (0)
        0.0, 1.0, // t5: b1 (1) beats b0 (0)
        -1.0, 0.0, // t6: b2 (1) beats b1 (0), b0 (-1)
        0.0, 1.0, // t7: b1
        0.0, -1.0, // t8: b3 (1); its own partial block scores -5 but is kept
    ]
}

#[test]
fn moba_block_means_of_ragged_keys() {
    let device = dev();
    let k = tensor(moba_keys(), [1, 1, 9, 2], &device);
    let means = block_mean_keys(k, 2).unwrap();
    assert_eq!(means.dims(), [1, 1, 5, 2]);
    // The last block holds one key: its mean is that key, not half of it.
    assert_eq!(values(means), vec![1.0, 0.0, 0.0, 1.0, -1.0, 0.0, 0.0, -1.0, 5.0, 5.0]);
}

#[test]
fn moba_gate_scores_by_hand() {
    let device = dev();
    let q = tensor(moba_queries(), [1, 1, 9, 2], &device);
    let k = tensor(moba_keys(), [1, 1, 9, 2], &device);
    let g = values(moba_gate_scores(q, k, 2).unwrap());
    let inf = f64::INFINITY;
    let ninf = f64::NEG_INFINITY;
    #[rustfmt::skip]
    let want = [
        inf, ninf, ninf, ninf, ninf,     // t0: own block 0
        inf, ninf, ninf, ninf, ninf,     // t1
        0.3, inf, ninf, ninf, ninf,      // t2: b0 . (0.3, 0.2) = 0.3
        0.0, inf, ninf, ninf, ninf,      // t3: future b3 is -inf
        1.0, 0.0, inf, ninf, ninf,       // t4
        0.0, 1.0, inf, ninf, ninf,       // t5
        -1.0, 0.0, 1.0, inf, ninf,       // t6
        0.0, 1.0, 0.0, inf, ninf,        // t7
        0.0, -1.0, 0.0, 1.0, inf,        // t8: own partial block forced
    ];
    assert_close("moba gate scores", &g, &want, 1e-12, 1e-12);
}

#[test]
fn moba_routing_by_hand() {
    let device = dev();
    let q = tensor(moba_queries(), [1, 1, 9, 2], &device);
    let k = tensor(moba_keys(), [1, 1, 9, 2], &device);
    let sel = moba_select(q.clone(), k.clone(), 2, 2).unwrap();
    assert_eq!(sel.key_block, 2);
    assert_eq!(sel.indices.dims(), [1, 1, 9, 2]);
    let idx = ints(sel.indices);
    let want2: [&[usize]; 9] = [&[0], &[0], &[0, 1], &[0, 1], &[0, 2], &[1, 2], &[2, 3], &[1, 3], &[3, 4]];
    for t in 0..9 {
        assert_eq!(valid_sorted(&idx[t * 2..t * 2 + 2], 5), want2[t].to_vec(), "top_k 2, query {t}: {:?}", &idx[t * 2..t * 2 + 2]);
    }
    // top_k 5 (= all blocks): every complete earlier block plus the own one, never the future.
    let idx = ints(moba_select(q.clone(), k.clone(), 2, 5).unwrap().indices);
    for t in 0..9 {
        let own = t / 2;
        let want: Vec<usize> = (0..=own).collect();
        let list = &idx[t * 5..t * 5 + 5];
        assert_eq!(valid_sorted(list, 5), want, "top_k 5, query {t}: {list:?}");
        assert_eq!(list.iter().filter(|&&x| x == -1).count(), 5 - want.len());
    }
    // top_k 1: only the own block.
    let idx = ints(moba_select(q, k, 2, 1).unwrap().indices);
    assert_eq!(idx, vec![0, 0, 1, 1, 2, 2, 3, 3, 4]);
}

#[test]
fn moba_routing_short_queries_and_gqa() {
    // seq_q = 3 < seq_k = 9: the queries sit at key positions 6, 7, 8 (the last three of
    // moba_queries()). Two query heads share the kv head; head 1 negates the queries.
    let device = dev();
    let qs = moba_queries();
    let mut qv = qs[12..18].to_vec();
    qv.extend(qs[12..18].iter().map(|x| -x));
    let q = tensor(qv, [1, 2, 3, 2], &device);
    let k = tensor(moba_keys(), [1, 1, 9, 2], &device);
    let idx = ints(moba_select(q, k, 2, 2).unwrap().indices);
    // Head 0: as t6, t7, t8 above. Head 1 (negated): t6 q = (1, 0) -> b0 scores 1. (Its t7,
    // q = (0, -1), ties b0 and b2 at 0 and is not checked.)
    assert_eq!(valid_sorted(&idx[0..2], 5), vec![2, 3]);
    assert_eq!(valid_sorted(&idx[2..4], 5), vec![1, 3]);
    assert_eq!(valid_sorted(&idx[4..6], 5), vec![3, 4]);
    assert_eq!(valid_sorted(&idx[6..8], 5), vec![0, 3]);
    // t8 negated q = (0, 1): b1 scores 1, the others 0 or -1.
    assert_eq!(valid_sorted(&idx[10..12], 5), vec![1, 4]);
}

// ------------------------------------------------------------------------------------------
// SeerAttention
// ------------------------------------------------------------------------------------------

#[test]
fn seer_pooling_ragged_by_hand() {
    let device = dev();
    let x = tensor(vec![1.0, 3.0, -2.0, 4.0, 7.0], [1, 1, 5, 1], &device);
    assert_eq!(values(avg_pool(x.clone(), 2)), vec![2.0, 1.0, 7.0]);
    assert_eq!(values(max_pool(x.clone(), 2)), vec![3.0, 4.0, 7.0]);
    assert_eq!(values(min_pool(x.clone(), 2)), vec![1.0, -2.0, 7.0]);
    // Negative values in the partial block: padding must never win the max or min.
    let y = tensor(vec![-1.0, -3.0, -2.0], [1, 1, 3, 1], &device);
    assert_eq!(values(max_pool(y.clone(), 2)), vec![-1.0, -2.0]);
    assert_eq!(values(min_pool(tensor(vec![1.0, 3.0, 2.0], [1, 1, 3, 1], &device), 2)), vec![1.0, 2.0]);
    assert_eq!(values(avg_pool(y, 2)), vec![-2.0, -2.0]);
}

#[test]
fn seer_block_causal_mask_by_hand() {
    let device = dev();
    let m = block_causal_mask(5, 5, 2, &device).into_data().convert::<bool>().try_to_vec::<bool>().unwrap();
    assert_eq!(m, vec![true, false, false, true, true, false, true, true, true]);
    // seq_q = 2, seq_k = 5: one query block whose last query sits at key 4.
    let m = block_causal_mask(2, 5, 2, &device).into_data().convert::<bool>().try_to_vec::<bool>().unwrap();
    assert_eq!(m, vec![true, true, true]);
    // seq_q = 3, seq_k = 7, block 2: query blocks end at keys 5 and 6.
    let m = block_causal_mask(3, 7, 2, &device).into_data().convert::<bool>().try_to_vec::<bool>().unwrap();
    assert_eq!(m, vec![true, true, true, false, true, true, true, true]);
}

#[test]
fn seer_target_by_hand() {
    // k = 0: causal attention is uniform, p[i][j] = 1 / (i + 1) for j <= i. Blocks of 2 over
    // 4 tokens: max-pooled map [[1, 0], [1/3, 1/3]], rows normalised: [[1, 0], [0.5, 0.5]].
    let device = dev();
    let mut rng = Rng::new(203);
    let q = rng.randn([1, 1, 4, 2], 1.0, &device);
    let k = tensor(vec![0.0; 8], [1, 1, 4, 2], &device);
    let v = rng.randn([1, 1, 4, 2], 1.0, &device);
    let (target, dense) = seer_attention_target(q.clone(), k.clone(), v.clone(), 2, None).unwrap();
    assert_close("seer target", &values(target), &[1.0, 0.0, 0.5, 0.5], 1e-12, 1e-12);
    let want = burn_sparse_attn::attention(q, k, v, &AttentionOptions::causal()).unwrap();
    assert_close("seer target dense output", &values(dense.output), &values(want.output), 1e-12, 1e-12);
    // Ragged: 3 tokens, block 2: rows 0..2 -> [[1, 0]], row 2 -> [1/3, 1/3] -> [0.5, 0.5].
    let q = rng.randn([1, 1, 3, 2], 1.0, &device);
    let k = tensor(vec![0.0; 6], [1, 1, 3, 2], &device);
    let v = rng.randn([1, 1, 3, 2], 1.0, &device);
    let (target, _) = seer_attention_target(q, k, v, 2, None).unwrap();
    assert_close("seer ragged target", &values(target), &[1.0, 0.0, 0.5, 0.5], 1e-12, 1e-12);
}

#[test]
fn seer_gate_loss_by_hand() {
    let device = dev();
    // softmax([0, ln 3]) = [1/4, 3/4]; KL([1/2, 1/2] || .) = 1/2 ln 2 + 1/2 ln(2/3), averaged
    // over the 2 elements.
    let logits = tensor(vec![0.0, 3f64.ln()], [1, 1, 1, 2], &device);
    let target = tensor(vec![0.5, 0.5], [1, 1, 1, 2], &device);
    let want = (0.5 * 2f64.ln() + 0.5 * (2.0f64 / 3.0).ln()) / 2.0;
    assert!((scalar(seer_gate_loss(logits.clone(), target, 0).unwrap()) - want).abs() < 1e-12);
    // Zero target entries contribute nothing: KL([1, 0] || [1/4, 3/4]) = ln 4, mean over 2.
    let target = tensor(vec![1.0, 0.0], [1, 1, 1, 2], &device);
    assert!((scalar(seer_gate_loss(logits, target.clone(), 0).unwrap()) - 4f64.ln() / 2.0).abs() < 1e-12);
    // A masked (-inf) logit with a zero target is fine: KL = 0.
    let masked = tensor(vec![0.7, f64::NEG_INFINITY], [1, 1, 1, 2], &device);
    assert_eq!(scalar(seer_gate_loss(masked, target, 0).unwrap()), 0.0);
    // Skipped leading query blocks: row 0 (KL ln 4) skipped, row 1 (KL 0) kept: mean 0 over 2.
    let logits = tensor(vec![0.0, 3f64.ln(), 0.0, 0.0], [1, 1, 2, 2], &device);
    let target = tensor(vec![1.0, 0.0, 0.5, 0.5], [1, 1, 2, 2], &device);
    assert!(scalar(seer_gate_loss(logits.clone(), target.clone(), 1).unwrap()).abs() < 1e-12);
    assert!((scalar(seer_gate_loss(logits, target, 0).unwrap()) - 4f64.ln() / 4.0).abs() < 1e-12);
}

// ------------------------------------------------------------------------------------------
// DMA
// ------------------------------------------------------------------------------------------

#[test]
fn dma_keep_threshold_by_hand() {
    // bias = [0.5, 2, 0.5, -1, 2, 0.5], window 2, causal, seq_q = seq_k = 6.
    // Rows 0, 1 see <= 2 keys: keep all (-inf). Row 2: 2 (key 1) and the most recent 0.5
    // (key 2) -> threshold (0.5, 2). Row 3 adds -1: same. Row 4 adds 2 (key 4): the two 2s ->
    // threshold (2, 1). Row 5 adds 0.5: same.
    let device = dev();
    let bias = tensor(vec![0.5, 2.0, 0.5, -1.0, 2.0, 0.5], [1, 1, 6], &device);
    let keep = dma_keep_threshold(&bias, 6, 2, true).unwrap();
    let ninf = f64::NEG_INFINITY;
    assert_eq!(values(keep.value), vec![ninf, ninf, 0.5, 0.5, 2.0, 2.0]);
    let idx = ints(keep.index);
    assert_eq!(&idx[2..], &[2, 2, 1, 1]);
    // Non-causal: every row sees all 6 keys -> (2, 1).
    let keep = dma_keep_threshold(&bias, 3, 2, false).unwrap();
    assert_eq!(values(keep.value), vec![2.0, 2.0, 2.0]);
    assert_eq!(ints(keep.index), vec![1, 1, 1]);
    // seq_q = 2 < seq_k = 6: rows at key positions 4, 5.
    let keep = dma_keep_threshold(&bias, 2, 3, true).unwrap();
    // Row at 4: top 3 of [0.5, 2, 0.5, -1, 2] = 2 (1), 2 (4), 0.5 (2) -> (0.5, 2).
    // Row at 5 adds 0.5 (key 5), more recent than key 2 -> (0.5, 5).
    assert_eq!(values(keep.value), vec![0.5, 0.5]);
    assert_eq!(ints(keep.index), vec![2, 5]);
}

#[test]
fn dma_attention_keeps_the_hand_picked_keys() {
    // Same bias as above: row 2 attends keys {1, 2}, row 4 keys {1, 4}; compare with plain loops.
    let device = dev();
    let mut rng = Rng::new(204);
    let d = Dims::new(1, 1, 1, 6, 6, 2);
    let bias_v = vec![0.5, 2.0, 0.5, -1.0, 2.0, 0.5];
    let (qv, kv, vv) = (rng.normals(12, 1.0), rng.normals(12, 1.0), rng.normals(12, 1.0));
    let out = dma_attention(
        tensor(qv.clone(), d.q_shape(), &device),
        tensor(kv.clone(), d.kv_shape(), &device),
        tensor(vv.clone(), d.kv_shape(), &device),
        tensor(bias_v.clone(), [1, 1, 6], &device),
        &DmaParams { window: 2, ..DmaParams::default() },
    )
    .unwrap();
    let kept: [&[usize]; 6] = [&[0], &[0, 1], &[1, 2], &[1, 2], &[1, 4], &[1, 4]];
    let (o, l) = naive_attention(&d, &qv, &kv, &vv, default_scale(2), &|_, _, i, j| kept[i].contains(&j), &|_, _, j| bias_v[j]);
    assert_close("dma hand output", &values(out.output), &o, 1e-12, 1e-12);
    assert_close("dma hand lse", &values(out.lse), &l, 1e-12, 1e-12);
}
