//! NSA's compressed branch on the attention engine (queries split by position modulo the
//! stride, one causal call per run of residues) against its definition, the masked softmax
//! over the `[seq_q, n_cmp]` score matrix: outputs, LSE and the gradients of q, k_cmp and
//! v_cmp, in f64 on Flex, over strides that do and do not divide the window, seq_q shorter
//! and longer than seq_k, and sequences too short for any compressed token to be visible.

use burn::tensor::Tensor;
use burn_sparse_attn::nsa::{NsaParams, nsa_compressed_attention, nsa_compressed_attention_reference, num_compressed};
use sparse_attn_tests::*;

#[allow(clippy::too_many_arguments)]
fn case(b: usize, hq: usize, hkv: usize, sq: usize, sk: usize, d: usize, block: usize, stride: usize, seed: u64) {
    let p = NsaParams { compress_block: block, compress_stride: stride, select_block: block.max(stride), ..NsaParams::default() };
    let nc = num_compressed(sk, block, stride);
    let mut rng = Rng::new(seed);
    let q = rng.normals(b * hq * sq * d, 1.0);
    let k = rng.normals(b * hkv * nc * d, 1.0);
    let v = rng.normals(b * hkv * nc * d, 1.0);
    let w = rng.normals(b * hq * sq * d, 1.0);
    let device = ad_dev();
    let mut results = Vec::new();
    for engine in [true, false] {
        let qt = tensor(q.clone(), [b, hq, sq, d], &device).require_grad();
        let kt = tensor(k.clone(), [b, hkv, nc, d], &device).require_grad();
        let vt = tensor(v.clone(), [b, hkv, nc, d], &device).require_grad();
        let f = if engine { nsa_compressed_attention } else { nsa_compressed_attention_reference };
        let out = f(qt.clone(), kt.clone(), vt.clone(), sk, &p).unwrap();
        let loss: Tensor<1> = (out.output.clone() * tensor(w.clone(), [b, hq, sq, d], &device)).sum();
        let grads = loss.backward();
        results.push((
            values(out.output),
            values(out.lse),
            values(qt.grad(&grads).unwrap()),
            values(kt.grad(&grads).unwrap()),
            values(vt.grad(&grads).unwrap()),
        ));
    }
    let what = format!("b{b} hq{hq} hkv{hkv} sq{sq} sk{sk} d{d} block{block} stride{stride}");
    let (e, r) = (&results[0], &results[1]);
    assert_close(&format!("{what} o"), &e.0, &r.0, 1e-12, 1e-12);
    for (i, (a, want)) in e.1.iter().zip(&r.1).enumerate() {
        if want.is_infinite() {
            assert_eq!(a, want, "{what} lse[{i}] of a row without compressed tokens");
        } else {
            assert!((a - want).abs() <= 1e-12 * want.abs().max(1.0), "{what} lse[{i}]: {a} vs {want}");
        }
    }
    assert_close(&format!("{what} dq"), &e.2, &r.2, 1e-11, 1e-12);
    assert_close(&format!("{what} dk_cmp"), &e.3, &r.3, 1e-11, 1e-12);
    assert_close(&format!("{what} dv_cmp"), &e.4, &r.4, 1e-11, 1e-12);
}

#[test]
fn defaults_shape_window_twice_the_stride() {
    case(1, 4, 2, 150, 150, 8, 32, 16, 1);
}

#[test]
fn stride_not_dividing_the_window() {
    case(2, 2, 1, 40, 40, 4, 5, 2, 2);
    case(1, 3, 3, 23, 23, 4, 7, 3, 3);
}

#[test]
fn stride_equal_to_the_window() {
    case(1, 2, 1, 33, 33, 4, 4, 4, 4);
}

#[test]
fn fewer_queries_than_keys() {
    // Query positions start at 19 and 20 (not multiples of the stride).
    case(1, 2, 2, 13, 32, 4, 4, 2, 5);
    case(1, 4, 1, 1, 61, 8, 8, 4, 6);
}

#[test]
fn more_queries_than_keys() {
    // The first rows sit at negative positions and see nothing.
    case(1, 2, 1, 30, 17, 4, 4, 3, 7);
}

#[test]
fn no_visible_compressed_token_for_most_rows() {
    // One compressed token, visible to the last 2 queries only.
    case(1, 2, 1, 9, 9, 4, 8, 8, 8);
}

/// `TrailingWindow::Partial` (flash-linear-attention's `mean_pooling` count) by hand: the
/// extra token is the mean of the keys after the last complete window's successor start.
#[test]
fn trailing_partial_window_means_by_hand() {
    use burn_sparse_attn::nsa::{TrailingWindow, compress_mean_with, num_compressed_with};
    let device = dev();
    let x = |s: usize| tensor((0..s).map(|t| t as f64).collect(), [1, 1, s, 1], &device);
    for (s, block, stride, want) in [
        (10, 4, 4, vec![1.5, 5.5, 8.5]),
        (3, 4, 4, vec![1.0]),
        (8, 4, 4, vec![1.5, 5.5]),
        (10, 4, 2, vec![1.5, 3.5, 5.5, 7.5]),
        (11, 4, 2, vec![1.5, 3.5, 5.5, 7.5, 9.0]),
    ] {
        assert_eq!(num_compressed_with(s, block, stride, TrailingWindow::Partial), want.len(), "count s {s} l {block} d {stride}");
        let got = values(compress_mean_with(x(s), block, stride, TrailingWindow::Partial).unwrap());
        assert_close(&format!("s {s} l {block} d {stride}"), &got, &want, 1e-12, 1e-12);
        let dropped = values(compress_mean_with(x(s), block, stride, TrailingWindow::Drop).unwrap_or_else(|_| tensor(vec![], [1, 1, 0, 1], &device)));
        assert_eq!(dropped.len(), num_compressed_with(s, block, stride, TrailingWindow::Drop));
    }
}

/// NSA with the trailing partial token appended to k_cmp / v_cmp gives the same output and
/// selection as without it: no query can see it.
#[test]
fn trailing_partial_token_changes_nothing() {
    use burn_sparse_attn::nsa::{NsaInputs, nsa_attention};
    let (b, hq, hkv, s, d) = (1, 4, 2, 27, 4);
    let p = NsaParams { compress_block: 4, compress_stride: 4, select_block: 4, top_n: 3, window: 5, ..NsaParams::default() };
    let nc = num_compressed(s, 4, 4);
    let mut rng = Rng::new(77);
    let device = dev();
    let q = rng.normals(b * hq * s * d, 1.0);
    let kv: Vec<Vec<f64>> = (0..4).map(|_| rng.normals(b * hkv * s * d, 1.0)).collect();
    let kc = rng.normals(b * hkv * (nc + 1) * d, 1.0);
    let vc = rng.normals(b * hkv * (nc + 1) * d, 1.0);
    let gates: Vec<f64> = (0..b * hq * s * 3).map(|_| rng.uniform()).collect();
    let run = |n: usize| {
        // The first n compressed tokens of each head.
        let cut = |src: &[f64]| -> Vec<f64> { (0..b * hkv).flat_map(|h| src[h * (nc + 1) * d..(h * (nc + 1) + n) * d].to_vec()).collect() };
        let inputs = NsaInputs {
            q: tensor(q.clone(), [b, hq, s, d], &device),
            k_cmp: tensor(cut(&kc), [b, hkv, n, d], &device),
            v_cmp: tensor(cut(&vc), [b, hkv, n, d], &device),
            k_slc: tensor(kv[0].clone(), [b, hkv, s, d], &device),
            v_slc: tensor(kv[1].clone(), [b, hkv, s, d], &device),
            k_win: tensor(kv[2].clone(), [b, hkv, s, d], &device),
            v_win: tensor(kv[3].clone(), [b, hkv, s, d], &device),
            gates: tensor(gates.clone(), [b, hq, s, 3], &device),
        };
        let out = nsa_attention(inputs, &p).unwrap();
        (values(out.output), ints(out.selection.indices))
    };
    let (o_complete, sel_complete) = run(nc);
    let (o_partial, sel_partial) = run(nc + 1);
    assert_close("output", &o_partial, &o_complete, 1e-12, 1e-12);
    assert_eq!(sel_partial, sel_complete, "selection");
}
