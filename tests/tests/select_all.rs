//! Degenerate oracles (docs/testing.md section 2): every method with "select everything" equals
//! dense attention, for the output and the LSE, in f64.

use burn::tensor::Tensor;
use burn_sparse_attn::attention::{AttentionOptions, KeyBias, attention, attention_with_bias};
use burn_sparse_attn::block_sparse::{BlockSelection, block_sparse_attention};
use burn_sparse_attn::dma::{DmaParams, dma_attention};
use burn_sparse_attn::moba::{MobaParams, moba_attention};
use burn_sparse_attn::nsa::{NsaInputs, NsaParams, nsa_attention, num_compressed};
use burn_sparse_attn::seer::{AttnGate, seer_select_threshold, seer_select_topk};
use burn_sparse_attn::{AttentionOutput, DenseAttentionConfig, SeerAttentionConfig};
use sparse_attn_tests::*;

const TOL: f64 = 1e-12;

fn assert_same_attention(what: &str, got: AttentionOutput, want: AttentionOutput) {
    assert_close(&format!("{what} output"), &values(got.output), &values(want.output), TOL, TOL);
    assert_close(&format!("{what} lse"), &values(got.lse), &values(want.lse), TOL, TOL);
}

fn qkv(rng: &mut Rng, d: &Dims) -> (Tensor<4>, Tensor<4>, Tensor<4>) {
    let device = dev();
    (rng.randn(d.q_shape(), 1.0, &device), rng.randn(d.kv_shape(), 1.0, &device), rng.randn(d.kv_shape(), 1.0, &device))
}

// ------------------------------------------------------------------------------------------
// Block-sparse
// ------------------------------------------------------------------------------------------

/// Every block listed once (shuffled), plus padding, a duplicate and out-of-range entries.
fn all_blocks_list(rng: &mut Rng, nkb: usize) -> Vec<i64> {
    let mut list: Vec<i64> = rng.subset(nkb, nkb).into_iter().map(|x| x as i64).collect();
    // Shuffle.
    for i in (1..list.len()).rev() {
        let j = rng.below(i + 1);
        list.swap(i, j);
    }
    list.push(-1);
    list.push(list[0]);
    list.push(nkb as i64 + 2);
    list.push(-5);
    list
}

#[test]
fn block_sparse_all_blocks_per_token_kv_heads_equals_dense() {
    let mut rng = Rng::new(100);
    for (d, kb) in [(Dims::new(2, 4, 2, 7, 7, 3), 2usize), (Dims::new(1, 3, 1, 4, 10, 2), 3), (Dims::new(1, 2, 2, 9, 5, 4), 4)] {
        let (q, k, v) = qkv(&mut rng, &d);
        let nkb = d.sk.div_ceil(kb);
        let cap = nkb + 4;
        let mut idx = Vec::new();
        for _ in 0..d.b * d.hkv * d.sq {
            idx.extend(all_blocks_list(&mut rng, nkb));
        }
        let sel = BlockSelection::per_token(int_tensor(idx, [d.b, d.hkv, d.sq, cap], &dev()), kb);
        for opts in [AttentionOptions::causal(), AttentionOptions::causal().with_window(3), AttentionOptions::full()] {
            let got = block_sparse_attention(q.clone(), k.clone(), v.clone(), &sel, &opts).unwrap();
            let want = attention(q.clone(), k.clone(), v.clone(), &opts).unwrap();
            assert_same_attention(&format!("per-token {d:?} {opts:?}"), got, want);
        }
    }
}

#[test]
fn block_sparse_all_blocks_per_query_block_q_heads_equals_dense() {
    let mut rng = Rng::new(101);
    for (d, qb, kb) in [(Dims::new(1, 4, 2, 7, 7, 3), 3usize, 2usize), (Dims::new(2, 2, 1, 5, 11, 2), 2, 4), (Dims::new(1, 1, 1, 1, 6, 3), 4, 4)] {
        let (q, k, v) = qkv(&mut rng, &d);
        let nkb = d.sk.div_ceil(kb);
        let rows = d.sq.div_ceil(qb);
        let cap = nkb + 4;
        let mut idx = Vec::new();
        for _ in 0..d.b * d.hq * rows {
            idx.extend(all_blocks_list(&mut rng, nkb));
        }
        let sel = BlockSelection::per_query_block(int_tensor(idx, [d.b, d.hq, rows, cap], &dev()), qb, kb);
        for opts in [AttentionOptions::causal(), AttentionOptions::full().with_window(2), AttentionOptions::full().with_scale(0.3)] {
            let got = block_sparse_attention(q.clone(), k.clone(), v.clone(), &sel, &opts).unwrap();
            let want = attention(q.clone(), k.clone(), v.clone(), &opts).unwrap();
            assert_same_attention(&format!("per-query-block {d:?} {opts:?}"), got, want);
        }
    }
}

// ------------------------------------------------------------------------------------------
// MoBA
// ------------------------------------------------------------------------------------------

#[test]
fn moba_top_k_covering_all_blocks_equals_dense_causal() {
    let mut rng = Rng::new(102);
    for (d, bs) in [
        (Dims::new(1, 4, 2, 11, 11, 3), 3usize),
        (Dims::new(2, 2, 1, 5, 11, 4), 2),
        (Dims::new(1, 2, 2, 8, 8, 2), 4),
        (Dims::new(1, 2, 1, 9, 4, 3), 2),
        (Dims::new(1, 1, 1, 1, 7, 3), 3),
    ] {
        let (q, k, v) = qkv(&mut rng, &d);
        let nb = d.sk.div_ceil(bs);
        for top_k in [nb, nb + 3] {
            let params = MobaParams { block_size: bs, top_k, scale: None };
            let got = moba_attention(q.clone(), k.clone(), v.clone(), &params).unwrap().attention;
            let want = attention(q.clone(), k.clone(), v.clone(), &AttentionOptions::causal()).unwrap();
            assert_same_attention(&format!("moba {d:?} bs {bs} top_k {top_k}"), got, want);
        }
        // And with fewer blocks than needed it is really sparse (the oracle can fail).
        if nb > 2 && d.sq > bs * 2 {
            let params = MobaParams { block_size: bs, top_k: 1, scale: None };
            let got = moba_attention(q.clone(), k.clone(), v.clone(), &params).unwrap().attention;
            let want = attention(q.clone(), k.clone(), v.clone(), &AttentionOptions::causal()).unwrap();
            assert_differs("moba top_k 1 vs dense", &values(got.output), &values(want.output), 1e-6);
        }
    }
}

// ------------------------------------------------------------------------------------------
// NSA
// ------------------------------------------------------------------------------------------

#[test]
fn nsa_selection_and_window_covering_everything_equal_dense() {
    let mut rng = Rng::new(103);
    for (b, hq, hkv, sq, sk, dh, params) in [
        (1, 4, 2, 13, 13, 3, NsaParams { compress_block: 4, compress_stride: 2, select_block: 4, top_n: 4, window: 13, scale: None, ..NsaParams::default() }),
        (2, 2, 1, 6, 17, 4, NsaParams { compress_block: 4, compress_stride: 4, select_block: 3, top_n: 9, window: 40, scale: Some(0.6), ..NsaParams::default() }),
        (1, 2, 2, 9, 9, 2, NsaParams { compress_block: 3, compress_stride: 1, select_block: 2, top_n: 5, window: 9, scale: None, ..NsaParams::default() }),
    ] {
        let d = Dims::new(b, hq, hkv, sq, sk, dh);
        let device = dev();
        let nc = num_compressed(sk, params.compress_block, params.compress_stride);
        let q = rng.randn(d.q_shape(), 1.0, &device);
        let k_cmp = rng.randn([b, hkv, nc, dh], 1.0, &device);
        let v_cmp = rng.randn([b, hkv, nc, dh], 1.0, &device);
        let (k_slc, v_slc) = (rng.randn(d.kv_shape(), 1.0, &device), rng.randn(d.kv_shape(), 1.0, &device));
        let (k_win, v_win) = (rng.randn(d.kv_shape(), 1.0, &device), rng.randn(d.kv_shape(), 1.0, &device));
        let gates_v: Vec<f64> = (0..b * hq * sq * 3).map(|_| rng.uniform()).collect();
        let gates = tensor(gates_v.clone(), [b, hq, sq, 3], &device);
        let out = nsa_attention(
            NsaInputs {
                q: q.clone(),
                k_cmp,
                v_cmp,
                k_slc: k_slc.clone(),
                v_slc: v_slc.clone(),
                k_win: k_win.clone(),
                v_win: v_win.clone(),
                gates,
            },
            &params,
        )
        .unwrap();
        let opts = AttentionOptions { causal: true, window: None, scale: params.scale };
        let dense_slc = attention(q.clone(), k_slc, v_slc, &opts).unwrap();
        let dense_win = attention(q.clone(), k_win, v_win, &opts).unwrap();
        assert_same_attention(&format!("nsa selected {d:?}"), out.selected.clone(), dense_slc.clone());
        assert_same_attention(&format!("nsa window {d:?}"), out.window.clone(), dense_win.clone());
        // The gated sum, written out by hand.
        let (oc, os, ow) = (values(out.compressed.output.clone()), values(dense_slc.output), values(dense_win.output));
        let mut want = vec![0.0; oc.len()];
        for r in 0..b * hq * sq {
            for t in 0..dh {
                let i = r * dh + t;
                want[i] = gates_v[r * 3] * oc[i] + gates_v[r * 3 + 1] * os[i] + gates_v[r * 3 + 2] * ow[i];
            }
        }
        assert_close(&format!("nsa combined {d:?}"), &values(out.output), &want, TOL, TOL);
    }
}

// ------------------------------------------------------------------------------------------
// SeerAttention
// ------------------------------------------------------------------------------------------

#[test]
fn seer_threshold_zero_and_top_k_all_equal_dense_functional() {
    let mut rng = Rng::new(104);
    for (d, bs) in [(Dims::new(1, 4, 2, 11, 11, 4), 3usize), (Dims::new(2, 2, 1, 8, 8, 2), 2), (Dims::new(1, 2, 2, 5, 12, 4), 4)] {
        let device = dev();
        let gate = module_to_f64(AttnGate::new(d.hq, d.d, bs, 6, 10000.0, &device).unwrap());
        let (q, k, v) = qkv(&mut rng, &d);
        let logits = gate.logits(q.clone(), k.clone()).unwrap();
        let nk = d.sk.div_ceil(bs);
        let want = attention(q.clone(), k.clone(), v.clone(), &AttentionOptions::causal()).unwrap();
        let sel = seer_select_threshold(logits.clone(), 0.0, bs).unwrap();
        let got = block_sparse_attention(q.clone(), k.clone(), v.clone(), &sel, &AttentionOptions::causal()).unwrap();
        assert_same_attention(&format!("seer threshold 0 {d:?}"), got, want.clone());
        for top_k in [nk, nk + 2] {
            let sel = seer_select_topk(logits.clone(), top_k, bs).unwrap();
            let got = block_sparse_attention(q.clone(), k.clone(), v.clone(), &sel, &AttentionOptions::causal()).unwrap();
            assert_same_attention(&format!("seer top_k {top_k} {d:?}"), got, want.clone());
        }
    }
}

#[test]
fn seer_module_selecting_everything_equals_dense_module() {
    let mut rng = Rng::new(105);
    let device = dev();
    let (d_model, seq, bs) = (16usize, 11usize, 4usize);
    let nk = seq.div_ceil(bs);
    let x = rng.randn([2, seq, d_model], 1.0, &device);
    for (n_kv, top_k, threshold) in [(Some(2), None, 0.0), (Some(1), Some(nk), 1e-3), (None, Some(nk + 1), 0.5)] {
        let seer = module_to_f64(
            SeerAttentionConfig::new(d_model, 4)
                .with_n_kv_heads(n_kv)
                .with_block_size(bs)
                .with_gate_hidden(8)
                .with_threshold(threshold)
                .with_top_k(top_k)
                .init(&device)
                .unwrap(),
        );
        let mut dense = module_to_f64(DenseAttentionConfig::new(d_model, 4).with_n_kv_heads(n_kv).init(&device).unwrap());
        dense.proj = seer.proj.clone();
        let got = values(seer.forward(x.clone()).unwrap());
        let want = values(dense.forward(x.clone()).unwrap());
        assert_close(&format!("seer module {n_kv:?} {top_k:?}"), &got, &want, TOL, TOL);
        let (out, loss) = seer.forward_with_gate_loss(x.clone()).unwrap();
        assert_close("seer module with loss", &values(out), &want, TOL, TOL);
        assert!(scalar(loss).is_finite());
    }
}

// ------------------------------------------------------------------------------------------
// DMA
// ------------------------------------------------------------------------------------------

#[test]
fn dma_window_covering_sequence_equals_dense_with_bias() {
    let mut rng = Rng::new(106);
    for d in [Dims::new(1, 4, 2, 9, 9, 3), Dims::new(2, 2, 1, 4, 10, 2), Dims::new(1, 2, 2, 7, 5, 4)] {
        let device = dev();
        let (q, k, v) = qkv(&mut rng, &d);
        let bias_v = rng.normals(d.b * d.hkv * d.sk, 1.0);
        let bias = tensor(bias_v.clone(), [d.b, d.hkv, d.sk], &device);
        for window in [d.sk, d.sk + 5] {
            let got = dma_attention(q.clone(), k.clone(), v.clone(), bias.clone(), &DmaParams { window, ..DmaParams::default() }).unwrap();
            let want = attention_with_bias(
                q.clone(),
                k.clone(),
                v.clone(),
                &KeyBias { values: bias.clone(), keep: None },
                &AttentionOptions::causal(),
            )
            .unwrap();
            // And against plain loops: scale * q.k + bias over the causal keys.
            let (no, nl) = naive_attention(
                &d,
                &values(q.clone()),
                &values(k.clone()),
                &values(v.clone()),
                default_scale(d.d),
                &|_, _, i, j| naive_visible(&d, true, None, i, j),
                &|b, h, j| bias_v[(b * d.hkv + d.kv_head(h)) * d.sk + j],
            );
            assert_close(&format!("dma naive out {d:?}"), &values(got.output.clone()), &no, TOL, TOL);
            assert_close(&format!("dma naive lse {d:?}"), &values(got.lse.clone()), &nl, TOL, TOL);
            assert_same_attention(&format!("dma window {window} {d:?}"), got, want);
        }
    }
}
