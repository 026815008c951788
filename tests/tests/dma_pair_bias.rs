//! DMA with a bias per (query, key) `[b, hb, seq_q, seq_k]` (`dma_attention_pairwise`): the keep
//! mask against a plain-loop top-`window` with ties, the output and LSE against naive f64
//! attention, the gradients of q, k, v and the bias against finite differences, the per-key
//! bias as the special case of a bias constant over queries, the per-row threshold the
//! kernels take (it keeps exactly the mask's keys), and the errors.

use burn::tensor::Tensor;
use burn_sparse_attn::dma::{DmaParams, dma_attention, dma_attention_pairwise, dma_keep_mask, dma_keep_mask_pairwise, dma_keep_threshold_pairwise};
use sparse_attn_tests::*;

/// Plain-loop keep rule of one row: the `window` largest visible `(value, key)` pairs, ties to
/// the more recent key.
fn naive_keep_row(row: &[f64], visible: &dyn Fn(usize) -> bool, window: usize) -> Vec<bool> {
    let mut cand: Vec<(f64, usize)> = (0..row.len()).filter(|&j| visible(j)).map(|j| (row[j], j)).collect();
    cand.sort_by(|a, b| b.0.total_cmp(&a.0).then(b.1.cmp(&a.1)));
    let mut keep = vec![false; row.len()];
    for &(_, j) in cand.iter().take(window) {
        keep[j] = true;
    }
    keep
}

/// A bias with many ties: values from a small set.
fn tied_bias(rng: &mut Rng, n: usize) -> Vec<f64> {
    (0..n).map(|_| [-1.0, 0.0, 0.5, 2.0][rng.below(4)]).collect()
}

fn bools(t: Tensor<4, burn::tensor::Bool>) -> Vec<bool> {
    t.into_data().convert::<bool>().try_to_vec::<bool>().expect("bool data")
}

#[test]
fn keep_mask_matches_plain_loop_with_ties() {
    let device = dev();
    for (seed, causal, sq, sk, window) in [(1u64, true, 7usize, 9usize, 3usize), (2, false, 5, 8, 4), (3, true, 6, 6, 1), (4, true, 4, 10, 20)] {
        let mut rng = Rng::new(seed);
        let (b, hb) = (2, 3);
        let bias = tied_bias(&mut rng, b * hb * sq * sk);
        let got = bools(dma_keep_mask_pairwise(&tensor(bias.clone(), [b, hb, sq, sk], &device), window, causal).unwrap());
        let dims = Dims::new(b, hb, hb, sq, sk, 1);
        for r in 0..b * hb {
            for i in 0..sq {
                let row = &bias[(r * sq + i) * sk..(r * sq + i + 1) * sk];
                let want = naive_keep_row(row, &|j| naive_visible(&dims, causal, None, i, j), window);
                let g = &got[(r * sq + i) * sk..(r * sq + i + 1) * sk];
                assert_eq!(g, &want[..], "seed {seed}: row {r}/{i} of bias {row:?}");
            }
        }
    }
}

/// The kernels' form of the rule, `(value, index)` per row, keeps exactly the keys of
/// [`dma_keep_mask_pairwise`]: `visible && (bias > value || (bias == value && j >= index))`,
/// with many ties, short rows, `window >= seq_k`, causal and not.
#[test]
fn keep_threshold_keeps_the_mask_keys() {
    let device = dev();
    for (seed, causal, sq, sk, window) in [(21u64, true, 7usize, 9usize, 3usize), (22, false, 5, 8, 4), (23, true, 6, 6, 1), (24, true, 4, 10, 20), (25, false, 6, 7, 7)] {
        let mut rng = Rng::new(seed);
        let (b, hb) = (2, 3);
        let bias = tied_bias(&mut rng, b * hb * sq * sk);
        let t = tensor(bias.clone(), [b, hb, sq, sk], &device);
        let mask = bools(dma_keep_mask_pairwise(&t, window, causal).unwrap());
        let thr = dma_keep_threshold_pairwise(&t, window, causal).unwrap();
        let value: Vec<f64> = thr.value.into_data().convert::<f64>().try_to_vec().unwrap();
        let index: Vec<i64> = thr.index.into_data().convert::<i64>().try_to_vec().unwrap();
        let dims = Dims::new(b, hb, hb, sq, sk, 1);
        for r in 0..b * hb {
            for i in 0..sq {
                let row = r * sq + i;
                for j in 0..sk {
                    let bj = bias[row * sk + j];
                    let kept = naive_visible(&dims, causal, None, i, j) && (bj > value[row] || (bj == value[row] && j as i64 >= index[row]));
                    assert_eq!(kept, mask[row * sk + j], "seed {seed}: row {r}/{i} key {j}, threshold ({}, {})", value[row], index[row]);
                }
            }
        }
    }
}

#[test]
fn output_and_lse_match_naive_attention() {
    let device = dev();
    for (seed, d, hb_is_q, causal, window) in [
        (10u64, Dims::new(1, 4, 2, 6, 8, 3), false, true, 3usize),
        (11, Dims::new(2, 2, 1, 5, 5, 4), true, false, 2),
        (12, Dims::new(1, 2, 2, 8, 6, 2), false, true, 4), // seq_q > seq_k: the first rows see nothing
    ] {
        let mut rng = Rng::new(seed);
        let hb = if hb_is_q { d.hq } else { d.hkv };
        let q = rng.normals(d.q_shape().iter().product(), 1.0);
        let k = rng.normals(d.kv_shape().iter().product(), 1.0);
        let v = rng.normals(d.kv_shape().iter().product(), 1.0);
        let bias = tied_bias(&mut rng, d.b * hb * d.sq * d.sk);
        let params = DmaParams { window, scale: None, causal };
        let out = dma_attention_pairwise(
            tensor(q.clone(), d.q_shape(), &device),
            tensor(k.clone(), d.kv_shape(), &device),
            tensor(v.clone(), d.kv_shape(), &device),
            tensor(bias.clone(), [d.b, hb, d.sq, d.sk], &device),
            &params,
        )
        .unwrap();
        let bh = |b: usize, h: usize| b * hb + h / (d.hq / hb);
        let kept = |b: usize, h: usize, i: usize| {
            let r = bh(b, h);
            let row = &bias[(r * d.sq + i) * d.sk..(r * d.sq + i + 1) * d.sk];
            naive_keep_row(row, &|j| naive_visible(&d, causal, None, i, j), window)
        };
        let (want, want_lse) = naive_attention_pair_bias(
            &d,
            &q,
            &k,
            &v,
            default_scale(d.d),
            &|b, h, i, j| naive_visible(&d, causal, None, i, j) && kept(b, h, i)[j],
            &|b, h, i, j| bias[(bh(b, h) * d.sq + i) * d.sk + j],
        );
        assert_close("output", &values(out.output), &want, 1e-12, 1e-12);
        let lse = values(out.lse);
        for (x, (g, w)) in lse.iter().zip(&want_lse).enumerate() {
            assert!((g == w) || (g - w).abs() <= 1e-12 * (1.0 + w.abs()), "lse[{x}]: {g} vs {w}");
        }
    }
}

#[test]
fn per_key_bias_is_the_special_case() {
    // A pair bias constant over queries is the per-key bias: same keep mask, output, LSE and
    // input gradients; its gradient summed over queries is the per-key bias gradient.
    let ad = ad_dev();
    for (seed, causal) in [(20u64, true), (21, false)] {
        let mut rng = Rng::new(seed);
        let d = Dims::new(1, 4, 2, 6, 7, 3);
        let params = DmaParams { window: 3, scale: None, causal };
        let q = tensor(rng.normals(d.q_shape().iter().product(), 1.0), d.q_shape(), &ad).require_grad();
        let k = tensor(rng.normals(d.kv_shape().iter().product(), 1.0), d.kv_shape(), &ad).require_grad();
        let v = tensor(rng.normals(d.kv_shape().iter().product(), 1.0), d.kv_shape(), &ad).require_grad();
        let kb = rng.normals(d.b * d.hkv * d.sk, 1.0);
        let key_bias = tensor(kb.clone(), [d.b, d.hkv, d.sk], &ad).require_grad();
        let pb: Vec<f64> = (0..d.b * d.hkv).flat_map(|r| (0..d.sq).flat_map(|_| kb[r * d.sk..(r + 1) * d.sk].to_vec()).collect::<Vec<_>>()).collect();
        let pair_bias = tensor(pb, [d.b, d.hkv, d.sq, d.sk], &ad).require_grad();
        let w = tensor(rng.normals(d.q_shape().iter().product(), 1.0), d.q_shape(), &ad);

        assert_eq!(
            bools(dma_keep_mask(&key_bias, d.sq, 3, causal).unwrap()),
            bools(dma_keep_mask_pairwise(&pair_bias, 3, causal).unwrap()),
            "keep masks"
        );
        let a = dma_attention(q.clone(), k.clone(), v.clone(), key_bias.clone(), &params).unwrap();
        let b = dma_attention_pairwise(q.clone(), k.clone(), v.clone(), pair_bias.clone(), &params).unwrap();
        assert_close("lse", &values(b.lse.clone()), &values(a.lse.clone()), 1e-12, 1e-12);
        let ga = (a.output * w.clone()).sum().backward();
        let gb = (b.output * w).sum().backward();
        for (name, x) in [("q", &q), ("k", &k), ("v", &v)] {
            assert_close(name, &values(x.grad(&gb).unwrap()), &values(x.grad(&ga).unwrap()), 1e-11, 1e-12);
        }
        let db_pair: Tensor<4> = pair_bias.grad(&gb).unwrap();
        let db_summed = db_pair.sum_dim(2).reshape([d.b, d.hkv, d.sk]);
        assert_close("dbias", &values(db_summed), &values(key_bias.grad(&ga).unwrap()), 1e-11, 1e-12);
    }
}

#[test]
fn grads_q_k_v_bias_against_finite_differences() {
    for (seed, causal, hb_is_q) in [(30u64, true, false), (31, false, true)] {
        let mut rng = Rng::new(seed);
        let d = Dims::new(1, 2, 1, 5, 6, 3);
        let hb = if hb_is_q { d.hq } else { d.hkv };
        let nq: usize = d.q_shape().iter().product();
        let nk: usize = d.kv_shape().iter().product();
        // Distinct bias values away from each other, so the finite differences never cross a
        // keep-threshold tie.
        let mut bias: Vec<f64> = (0..d.b * hb * d.sq * d.sk).map(|x| x as f64 * 0.37).collect();
        for i in (1..bias.len()).rev() {
            bias.swap(i, rng.below(i + 1));
        }
        let inputs = vec![rng.normals(nq, 1.0), rng.normals(nk, 1.0), rng.normals(nk, 1.0), bias];
        let w = rng.normals(nq, 1.0);
        let params = DmaParams { window: 3, scale: None, causal };
        grad_check(&format!("dma pair bias, causal {causal}"), &["q", "k", "v", "bias"], &inputs, &[true; 4], FdConfig::default(), |x| {
            let out = dma_attention_pairwise(
                x[0].clone().reshape(d.q_shape()),
                x[1].clone().reshape(d.kv_shape()),
                x[2].clone().reshape(d.kv_shape()),
                x[3].clone().reshape([d.b, hb, d.sq, d.sk]),
                &params,
            )
            .unwrap();
            (out.output * tensor(w.clone(), d.q_shape(), &x[0].device())).sum()
        });
    }
}

#[test]
fn errors_name_the_argument() {
    let device = dev();
    let mut rng = Rng::new(40);
    let d = Dims::new(1, 4, 2, 5, 6, 3);
    let r = |rng: &mut Rng, s: [usize; 4]| tensor(rng.normals(s.iter().product(), 1.0), s, &device);
    let (q, k, v) = (r(&mut rng, d.q_shape()), r(&mut rng, d.kv_shape()), r(&mut rng, d.kv_shape()));
    let p = |w: usize| DmaParams { window: w, scale: None, causal: true };
    assert!(dma_attention_pairwise(q.clone(), k.clone(), v.clone(), r(&mut rng, [1, 2, 5, 6]), &p(2)).is_ok());
    assert!(dma_attention_pairwise(q.clone(), k.clone(), v.clone(), r(&mut rng, [1, 4, 5, 6]), &p(2)).is_ok());
    for (what, shape) in [("heads", [1, 3, 5, 6]), ("seq_q", [1, 2, 6, 6]), ("seq_k", [1, 2, 5, 5]), ("batch", [2, 2, 5, 6])] {
        assert_shape_err(what, dma_attention_pairwise(q.clone(), k.clone(), v.clone(), r(&mut rng, shape), &p(2)), &["bias"]);
    }
    assert_param_err("window 0", dma_attention_pairwise(q, k, v, r(&mut rng, [1, 2, 5, 6]), &p(0)), &["window"]);
    assert_param_err("mask window 0", dma_keep_mask_pairwise(&r(&mut rng, [1, 2, 5, 6]), 0, true), &["window"]);
}
