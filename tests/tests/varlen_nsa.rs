//! NSA on packed variable-length batches, on Flex in f64: `nsa_attention_varlen` equals
//! `nsa_attention_with` on every sequence alone (its rows, its keys, its compressed tokens
//! from `compress_mean_varlen`), for the output, each branch's LSE, the chosen blocks (local
//! numbers, as sets) and the gradients of q, k, v and the gates, to 1e-12. Sequences include
//! an empty one, ones shorter than a compression window, uneven lengths and cross lengths.

use burn::tensor::{Int, Tensor};
use burn_sparse_attn::nsa::{
    NsaBlocks, NsaInputs, NsaParams, TrailingWindow, compress_mean_varlen, compress_mean_with, nsa_attention_varlen, nsa_attention_with,
    nsa_compressed_attention, nsa_compressed_attention_varlen, nsa_compressed_cu_seqlens, num_compressed_with,
};
use burn_sparse_attn::varlen::VarLen;
use sparse_attn_tests::*;

const B: usize = 2;
const HQ: usize = 4;
const HKV: usize = 2;
const D: usize = 8;

/// Small NSA sizes where selection is not all forced: windows of 4 every 2, blocks of 4,
/// 4 blocks per query of which block 0 and the two most recent are forced.
fn params(window: usize) -> NsaParams {
    NsaParams { compress_block: 4, compress_stride: 2, select_block: 4, top_n: 4, window, ..NsaParams::default() }
}

/// `compress_mean_with` on one sequence (no tokens when it has no window at all).
fn compress_one(x: Tensor<4>, block: usize, stride: usize, trailing: TrailingWindow) -> Tensor<4> {
    let [b, h, s, _] = x.dims();
    let out = compress_mean_with(x, block, stride, trailing).unwrap();
    assert_eq!(out.dims()[..3], [b, h, num_compressed_with(s, block, stride, trailing)]);
    out
}

fn sorted_lists(ids: &[i64], cap: usize, row: usize) -> Vec<i64> {
    let mut x: Vec<i64> = ids[row * cap..(row + 1) * cap].iter().copied().filter(|&e| e >= 0).collect();
    x.sort();
    x.dedup();
    x
}

/// Runs packed NSA once (shared K/V for the three branches, mean-pooled compression) and
/// each sequence alone, with the same upstream gradient, and compares everything.
fn packed_nsa_equals_separate(name: &str, cu_q: &[usize], cu_k: &[usize], params: &NsaParams) {
    let device = ad_dev();
    let mut rng = Rng::new(11);
    let (tq, tk) = (cu_q[cu_q.len() - 1], cu_k[cu_k.len() - 1]);
    let q = rng.randn([B, HQ, tq, D], 1.0, &device).require_grad();
    let k = rng.randn([B, HKV, tk, D], 1.0, &device).require_grad();
    let v = rng.randn([B, HKV, tk, D], 1.0, &device).require_grad();
    let gates = burn::tensor::activation::sigmoid(rng.randn([B, HQ, tq, 3], 1.0, &device)).detach().require_grad();
    let d_o = rng.randn([B, HQ, tq, D], 1.0, &device);
    let varlen = VarLen::cross(cu_q.to_vec(), cu_k.to_vec()).unwrap();
    let (l, st) = (params.compress_block, params.compress_stride);
    let inputs = |q: &Tensor<4>, k: &Tensor<4>, v: &Tensor<4>, k_cmp: Tensor<4>, v_cmp: Tensor<4>, gates: Tensor<4>| NsaInputs {
        q: q.clone(),
        k_cmp,
        v_cmp,
        k_slc: k.clone(),
        v_slc: v.clone(),
        k_win: k.clone(),
        v_win: v.clone(),
        gates,
    };
    let k_cmp = compress_mean_varlen(k.clone(), cu_k, l, st, TrailingWindow::Drop).unwrap();
    let v_cmp = compress_mean_varlen(v.clone(), cu_k, l, st, TrailingWindow::Drop).unwrap();
    let out = nsa_attention_varlen(inputs(&q, &k, &v, k_cmp, v_cmp, gates.clone()), &varlen, params, NsaBlocks::Computed, None).unwrap();
    let g = (out.output.clone() * d_o.clone()).sum().backward();
    let (gq, gk, gv, gg) = (values(q.grad(&g).unwrap()), values(k.grad(&g).unwrap()), values(v.grad(&g).unwrap()), values(gates.grad(&g).unwrap()));
    let [_, _, _, cap] = out.selection.indices.dims();
    let lists = ints(out.selection.indices.clone());
    for s in 0..cu_q.len() - 1 {
        let (qa, qb, ka, kb) = (cu_q[s], cu_q[s + 1], cu_k[s], cu_k[s + 1]);
        if qa == qb || ka == kb {
            continue;
        }
        let what = |x: &str| format!("{name}: sequence {s} ({qa}..{qb} x {ka}..{kb}) {x}");
        let (q1, k1, v1) = (seq_rows(&q, qa, qb).detach().require_grad(), seq_rows(&k, ka, kb).detach().require_grad(), seq_rows(&v, ka, kb).detach().require_grad());
        let g1 = gates.clone().slice([0..B, 0..HQ, qa..qb, 0..3]).detach().require_grad();
        let k_cmp1 = compress_one(k1.clone(), l, st, TrailingWindow::Drop);
        let v_cmp1 = compress_one(v1.clone(), l, st, TrailingWindow::Drop);
        let one = nsa_attention_with(inputs(&q1, &k1, &v1, k_cmp1, v_cmp1, g1.clone()), params, NsaBlocks::Computed, None).unwrap();
        assert_close(&what("o"), &values(seq_rows(&out.output, qa, qb)), &values(one.output.clone()), 1e-12, 1e-12);
        for (branch, packed, alone) in [("cmp", &out.compressed, &one.compressed), ("slc", &out.selected, &one.selected), ("win", &out.window, &one.window)] {
            let a = values(packed.lse.clone().slice([0..B, 0..HQ, qa..qb]));
            for (x, y) in a.iter().zip(&values(alone.lse.clone())) {
                assert!(x == y || (x - y).abs() < 1e-12, "{}: {x} vs {y}", what(&format!("{branch} lse")));
            }
        }
        let [_, _, _, c1] = one.selection.indices.dims();
        let want = ints(one.selection.indices.clone());
        for h in 0..B * HKV {
            for t in 0..qb - qa {
                assert_eq!(
                    sorted_lists(&lists, cap, h * tq + qa + t),
                    sorted_lists(&want, c1, h * (qb - qa) + t),
                    "{}",
                    what(&format!("blocks of (batch x head) {h}, token {t}"))
                );
            }
        }
        let gr = (one.output * seq_rows(&d_o, qa, qb)).sum().backward();
        assert_close(&what("dq"), &flat_rows(&gq, B * HQ, tq, D, qa, qb), &values(q1.grad(&gr).unwrap()), 1e-12, 1e-12);
        assert_close(&what("dk"), &flat_rows(&gk, B * HKV, tk, D, ka, kb), &values(k1.grad(&gr).unwrap()), 1e-12, 1e-12);
        assert_close(&what("dv"), &flat_rows(&gv, B * HKV, tk, D, ka, kb), &values(v1.grad(&gr).unwrap()), 1e-12, 1e-12);
        assert_close(&what("dgates"), &flat_rows(&gg, B * HQ, tq, 3, qa, qb), &values(g1.grad(&gr).unwrap()), 1e-12, 1e-12);
    }
}

#[test]
fn nsa_self_packing_equals_nsa_per_sequence() {
    // 18, 0, 3 (shorter than a window: no compressed token), 1, 25 and 9 tokens.
    let cu = [0, 18, 18, 21, 22, 47, 56];
    packed_nsa_equals_separate("window 5", &cu, &cu, &params(5));
    packed_nsa_equals_separate("window off", &cu, &cu, &params(0));
    // Every sequence shorter than a compression window: no compressed token in the pack.
    let short = [0, 3, 5, 5, 6];
    packed_nsa_equals_separate("no compressed token", &short, &short, &params(2));
}

#[test]
fn nsa_cross_packing_equals_nsa_per_sequence() {
    // More keys than queries (positions bottom-right), and one sequence with fewer.
    packed_nsa_equals_separate("cross", &[0, 5, 9, 21], &[0, 17, 19, 30], &params(3));
}

/// Given local lists and per-row counts: the packed call drops the same entries and attends
/// to the same blocks as each sequence alone.
#[test]
fn nsa_packed_given_blocks_and_counts() {
    let device = dev();
    let p = params(3);
    let cu = [0, 13, 30];
    let varlen = VarLen::new(cu.to_vec()).unwrap();
    let mut rng = Rng::new(4);
    let q = rng.randn([1, HQ, 30, D], 1.0, &device);
    let k = rng.randn([1, HKV, 30, D], 1.0, &device);
    let gates = rng.randn([1, HQ, 30, 3], 0.5, &device);
    let mut lists = Vec::new();
    let mut counts = Vec::new();
    for _ in 0..HKV {
        for s in 0..2 {
            for _ in 0..cu[s + 1] - cu[s] {
                let nb = (cu[s + 1] - cu[s]).div_ceil(4);
                lists.extend((0..3).map(|_| rng.below(nb) as i64));
                counts.push(rng.below(4) as i64);
            }
        }
    }
    let idx = int_tensor(lists, [1, HKV, 30, 3], &device);
    let cnt = int_tensor(counts, [1, HKV, 30], &device);
    let kc = compress_mean_varlen(k.clone(), &cu, 4, 2, TrailingWindow::Drop).unwrap();
    let nsa_in = |q: Tensor<4>, k: Tensor<4>, kc: Tensor<4>, g: Tensor<4>| NsaInputs { q, k_cmp: kc.clone(), v_cmp: kc, k_slc: k.clone(), v_slc: k.clone(), k_win: k.clone(), v_win: k, gates: g };
    let out = nsa_attention_varlen(nsa_in(q.clone(), k.clone(), kc, gates.clone()), &varlen, &p, NsaBlocks::Given(idx.clone()), Some(cnt.clone())).unwrap();
    for s in 0..2 {
        let (a, b) = (cu[s], cu[s + 1]);
        let k1 = seq_rows(&k, a, b);
        let kc1 = compress_one(k1.clone(), 4, 2, TrailingWindow::Drop);
        let idx1: Tensor<4, Int> = idx.clone().slice([0..1, 0..HKV, a..b, 0..3]);
        let cnt1: Tensor<3, Int> = cnt.clone().slice([0..1, 0..HKV, a..b]);
        let g1 = gates.clone().slice([0..1, 0..HQ, a..b, 0..3]);
        let one = nsa_attention_with(nsa_in(seq_rows(&q, a, b), k1, kc1, g1), &p, NsaBlocks::Given(idx1), Some(cnt1)).unwrap();
        assert_close(&format!("given blocks, sequence {s}"), &values(seq_rows(&out.output, a, b)), &values(one.output), 1e-12, 1e-12);
    }
}

/// Mean pooling per sequence, with and without the trailing partial windows, and the
/// compressed boundaries; the compressed branch alone with partial tokens present.
#[test]
fn packed_compression_is_per_sequence_compression() {
    let device = dev();
    let cu = [0, 9, 9, 12, 27];
    let mut rng = Rng::new(8);
    let x = rng.randn([1, 2, 27, D], 1.0, &device);
    let q = rng.randn([1, 2, 27, D], 1.0, &device);
    let p = params(3);
    for trailing in [TrailingWindow::Drop, TrailingWindow::Partial] {
        let packed = compress_mean_varlen(x.clone(), &cu, 4, 2, trailing).unwrap();
        let cu_c = nsa_compressed_cu_seqlens(&cu, &p, trailing);
        assert_eq!(packed.dims()[2], cu_c[4], "{trailing:?}");
        let cmp = nsa_compressed_attention_varlen(q.clone(), packed.clone(), packed.clone(), &VarLen::new(cu.to_vec()).unwrap(), &p).unwrap();
        for s in 0..4 {
            let (a, b) = (cu[s], cu[s + 1]);
            assert_eq!(cu_c[s + 1] - cu_c[s], num_compressed_with(b - a, 4, 2, trailing), "{trailing:?} sequence {s}");
            if a == b {
                continue;
            }
            let one = compress_one(seq_rows(&x, a, b), 4, 2, trailing);
            assert_close(&format!("{trailing:?} sequence {s}"), &values(seq_rows(&packed, cu_c[s], cu_c[s + 1])), &values(one.clone()), 1e-12, 1e-12);
            let alone = nsa_compressed_attention(seq_rows(&q, a, b), one.clone(), one, b - a, &p).unwrap();
            assert_close(&format!("{trailing:?} compressed branch, sequence {s}"), &values(seq_rows(&cmp.output, a, b)), &values(alone.output), 1e-12, 1e-12);
        }
    }
    // Sequence 0 (9 keys): windows at 0, 2, 4; the partial one covers keys 6..9.
    assert_eq!(nsa_compressed_cu_seqlens(&cu, &p, TrailingWindow::Drop), vec![0, 3, 3, 3, 9]);
    assert_eq!(nsa_compressed_cu_seqlens(&cu, &p, TrailingWindow::Partial), vec![0, 4, 4, 5, 12]);
}

#[test]
fn packed_nsa_names_bad_arguments() {
    let device = dev();
    let p = params(3);
    let cu = vec![0, 10, 20];
    let varlen = VarLen::new(cu.clone()).unwrap();
    let q = Tensor::<4>::zeros([1, 2, 20, 4], &device);
    let k = Tensor::<4>::zeros([1, 2, 20, 4], &device);
    let gates = Tensor::<4>::zeros([1, 2, 20, 3], &device);
    let kc = Tensor::<4>::zeros([1, 2, 5, 4], &device); // 4 + 4 expected
    let inputs = NsaInputs { q, k_cmp: kc.clone(), v_cmp: kc, k_slc: k.clone(), v_slc: k.clone(), k_win: k.clone(), v_win: k.clone(), gates };
    let e = nsa_attention_varlen(inputs.clone(), &varlen, &p, NsaBlocks::Computed, None).unwrap_err();
    assert!(e.to_string().contains("k_cmp"), "{e}");
    let good = NsaInputs { k_cmp: compress_mean_varlen(k.clone(), &cu, 4, 2, TrailingWindow::Drop).unwrap(), v_cmp: compress_mean_varlen(k, &cu, 4, 2, TrailingWindow::Drop).unwrap(), ..inputs };
    let blocks = NsaBlocks::Given(Tensor::<4, Int>::zeros([1, 2, 19, 2], &device));
    let e = nsa_attention_varlen(good.clone(), &varlen, &p, blocks, None).unwrap_err();
    assert!(e.to_string().contains("blocks"), "{e}");
    let e = nsa_attention_varlen(good, &VarLen::new(vec![0, 10, 21]).unwrap(), &p, NsaBlocks::Computed, None).unwrap_err();
    assert!(e.to_string().contains("cu_seqlens"), "{e}");
    let e = compress_mean_varlen(Tensor::<4>::zeros([1, 1, 7, 4], &device), &[0, 3, 8], 4, 2, TrailingWindow::Drop).unwrap_err();
    assert!(e.to_string().contains("cu_seqlens"), "{e}");
}

/// The layer on a packed batch (`NsaAttention::forward_varlen`) equals the layer on every
/// sequence alone, for each compressor (their windows laid out per sequence), with separate
/// and shared K/V and RoPE positions restarting per sequence; in f64 with random weights.
#[test]
fn nsa_layer_on_packed_batch_equals_separate_sequences() {
    use burn_sparse_attn::nsa::{CompressorKind, NsaAttentionConfig};
    let device = dev();
    let cu = vec![0, 11, 14, 14, 33];
    let x = Rng::new(6).randn([1, 33, 16], 1.0, &device);
    let varlen = VarLen::new(cu.clone()).unwrap();
    for (kind, shared, window) in [
        (CompressorKind::Mlp, false, 4),
        (CompressorKind::MeanPos, true, 0),
        (CompressorKind::AttentionPool, false, 3),
        (CompressorKind::HeadLinear, true, 5),
    ] {
        let cfg = NsaAttentionConfig::new(16, 4)
            .with_n_kv_heads(Some(2))
            .with_compress_block(4)
            .with_compress_stride(2)
            .with_select_block(4)
            .with_top_n(4)
            .with_window(window)
            .with_compressor(kind)
            .with_shared_kv(shared);
        let layer = randomize_params(module_to_f64(cfg.init(&device).unwrap()), 3, 0.3);
        let packed = values(layer.forward_varlen(x.clone(), &varlen).unwrap());
        for s in 0..cu.len() - 1 {
            let (a, b) = (cu[s], cu[s + 1]);
            if a == b {
                continue;
            }
            let one = values(layer.forward(x.clone().slice([0..1, a..b, 0..16])).unwrap());
            assert_close(&format!("{kind:?} shared {shared}: sequence {s}"), &packed[a * 16..b * 16], &one, 1e-12, 1e-12);
        }
    }
    let layer = NsaAttentionConfig::new(16, 4).init(&device).unwrap();
    let e = layer.forward_varlen(x.clone(), &VarLen::new(vec![0, 4, 19]).unwrap()).unwrap_err();
    assert!(e.to_string().contains("varlen"), "{e}");
}
