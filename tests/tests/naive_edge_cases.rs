//! Edge cases against independent plain-loop implementations (no library reference involved):
//! ragged lengths, GQA and MQA, seq_q != seq_k both ways, single queries, rows with no visible
//! key, sliding windows, per-key bias with and without a keep rule, and each method's routing.

use burn::tensor::Tensor;
use burn_sparse_attn::attention::{AttentionOptions, KeepThreshold, KeyBias, attention, attention_with_bias};
use burn_sparse_attn::block_sparse::{BlockSelection, block_sparse_attention};
use burn_sparse_attn::dma::{DmaParams, dma_attention, dma_keep_mask, dma_keep_threshold};
use burn_sparse_attn::moba::{MobaParams, moba_attention};
use burn_sparse_attn::nsa::{NsaInputs, NsaParams, nsa_attention, num_compressed};
use burn_sparse_attn::rope::apply_rope;
use burn_sparse_attn::seer::{avg_pool, max_pool, min_pool, seer_attention_target, seer_gate_loss, seer_select_threshold, seer_select_topk};
use sparse_attn_tests::*;

const TOL: f64 = 1e-12;

struct Qkv {
    q: Vec<f64>,
    k: Vec<f64>,
    v: Vec<f64>,
}

impl Qkv {
    fn random(rng: &mut Rng, d: &Dims) -> Self {
        Self {
            q: rng.normals(d.q_shape().iter().product(), 1.0),
            k: rng.normals(d.kv_shape().iter().product(), 1.0),
            v: rng.normals(d.kv_shape().iter().product(), 1.0),
        }
    }
    fn tensors(&self, d: &Dims) -> (Tensor<4>, Tensor<4>, Tensor<4>) {
        let device = dev();
        (tensor(self.q.clone(), d.q_shape(), &device), tensor(self.k.clone(), d.kv_shape(), &device), tensor(self.v.clone(), d.kv_shape(), &device))
    }
}

fn no_bias(_: usize, _: usize, _: usize) -> f64 {
    0.0
}

/// Shapes covering ragged lengths, GQA, MQA, seq_q < seq_k, seq_q > seq_k and single queries.
fn edge_dims() -> Vec<Dims> {
    vec![
        Dims::new(2, 4, 2, 7, 7, 3),  // GQA, ragged
        Dims::new(1, 3, 1, 5, 5, 4),  // MQA
        Dims::new(1, 2, 2, 3, 9, 2),  // seq_q < seq_k
        Dims::new(1, 4, 1, 9, 4, 3),  // seq_q > seq_k: the first 5 rows see no key when causal
        Dims::new(2, 2, 1, 1, 11, 4), // a single query (decode)
        Dims::new(1, 1, 1, 1, 1, 2),  // a single key
    ]
}

// ------------------------------------------------------------------------------------------
// Dense attention
// ------------------------------------------------------------------------------------------

#[test]
fn dense_matches_naive_on_edge_shapes() {
    let mut rng = Rng::new(300);
    for d in edge_dims() {
        let x = Qkv::random(&mut rng, &d);
        let (q, k, v) = x.tensors(&d);
        for (causal, window, scale) in [(true, None, None), (true, Some(2), None), (false, None, Some(0.37)), (false, Some(3), None), (true, Some(1), Some(1.3))] {
            let opts = AttentionOptions { causal, window, scale };
            let out = attention(q.clone(), k.clone(), v.clone(), &opts).unwrap();
            let (o, l) = naive_attention(&d, &x.q, &x.k, &x.v, scale.unwrap_or(default_scale(d.d)), &|_, _, i, j| naive_visible(&d, causal, window, i, j), &no_bias);
            let what = format!("{d:?} causal {causal} window {window:?}");
            assert_close(&format!("{what} output"), &values(out.output), &o, TOL, TOL);
            assert_close(&format!("{what} lse"), &values(out.lse), &l, TOL, TOL);
        }
    }
}

#[test]
fn dense_bias_with_and_without_keep_matches_naive() {
    let mut rng = Rng::new(301);
    for d in edge_dims() {
        let x = Qkv::random(&mut rng, &d);
        let (q, k, v) = x.tensors(&d);
        for hb in [d.hkv, d.hq] {
            // Quantised bias values so that the keep rule meets exact ties.
            let bias_v: Vec<f64> = (0..d.b * hb * d.sk).map(|_| (rng.below(5) as f64 - 2.0) * 0.5).collect();
            let bias_of = |b: usize, h: usize, j: usize| bias_v[(b * hb + h / (d.hq / hb)) * d.sk + j];
            // Thresholds: some -inf (keep all), others equal to a bias value of the row, with a
            // random tie index.
            let mut thr = Vec::new();
            let mut tie = Vec::new();
            for b in 0..d.b {
                for h in 0..hb {
                    for _ in 0..d.sq {
                        if rng.below(4) == 0 {
                            thr.push(f64::NEG_INFINITY);
                        } else {
                            thr.push(bias_v[(b * hb + h) * d.sk + rng.below(d.sk)]);
                        }
                        tie.push(rng.below(d.sk + 1) as i64);
                    }
                }
            }
            let device = dev();
            let values_t = tensor(bias_v.clone(), [d.b, hb, d.sk], &device);
            for window in [None, Some(3)] {
                let opts = AttentionOptions { causal: true, window, scale: None };
                // Without keep.
                let out = attention_with_bias(q.clone(), k.clone(), v.clone(), &KeyBias { values: values_t.clone(), keep: None }, &opts).unwrap();
                let (o, l) = naive_attention(&d, &x.q, &x.k, &x.v, default_scale(d.d), &|_, _, i, j| naive_visible(&d, true, window, i, j), &bias_of);
                assert_close(&format!("{d:?} hb {hb} bias output"), &values(out.output), &o, TOL, TOL);
                assert_close(&format!("{d:?} hb {hb} bias lse"), &values(out.lse), &l, TOL, TOL);
                // With keep.
                let keep = KeepThreshold { value: tensor(thr.clone(), [d.b, hb, d.sq], &device), index: int_tensor(tie.clone(), [d.b, hb, d.sq], &device) };
                let out = attention_with_bias(q.clone(), k.clone(), v.clone(), &KeyBias { values: values_t.clone(), keep: Some(keep) }, &opts).unwrap();
                let kept = |b: usize, h: usize, i: usize, j: usize| {
                    let hh = h / (d.hq / hb);
                    let t = thr[(b * hb + hh) * d.sq + i];
                    let ti = tie[(b * hb + hh) * d.sq + i];
                    let bj = bias_of(b, h, j);
                    naive_visible(&d, true, window, i, j) && (bj > t || (bj == t && j as i64 >= ti))
                };
                let (o, l) = naive_attention(&d, &x.q, &x.k, &x.v, default_scale(d.d), &kept, &bias_of);
                assert_close(&format!("{d:?} hb {hb} keep output"), &values(out.output), &o, TOL, TOL);
                assert_close(&format!("{d:?} hb {hb} keep lse"), &values(out.lse), &l, TOL, TOL);
            }
        }
    }
}

// ------------------------------------------------------------------------------------------
// Rows with no visible key
// ------------------------------------------------------------------------------------------

/// Runs `f` on autodiff q, k, v; checks that `empty_rows` (indices into `[b * hq * sq]`) give
/// output exactly 0, LSE -inf and q-gradient exactly 0, and that every gradient is finite.
fn check_empty_rows<F>(what: &str, d: &Dims, x: &Qkv, empty_rows: &[usize], f: F)
where
    F: Fn(Tensor<4>, Tensor<4>, Tensor<4>) -> (Tensor<4>, Option<Tensor<3>>),
{
    assert!(!empty_rows.is_empty(), "{what}: the case must have empty rows");
    let ad = ad_dev();
    let q = tensor(x.q.clone(), d.q_shape(), &ad).require_grad();
    let k = tensor(x.k.clone(), d.kv_shape(), &ad).require_grad();
    let v = tensor(x.v.clone(), d.kv_shape(), &ad).require_grad();
    let (out, lse) = f(q.clone(), k.clone(), v.clone());
    let mut rng = Rng::new(999);
    let w = rng.normals(d.q_shape().iter().product(), 1.0);
    let loss = (out.clone() * tensor(w, d.q_shape(), &ad)).sum();
    let grads = loss.backward();
    let o = values(out);
    let gq = values(q.grad(&grads).expect("q grad"));
    let gk = values(k.grad(&grads).expect("k grad"));
    let gv = values(v.grad(&grads).expect("v grad"));
    for (name, g) in [("q", &gq), ("k", &gk), ("v", &gv)] {
        assert!(g.iter().all(|x| x.is_finite()), "{what}: {name} gradient has NaN/inf");
    }
    assert!(gk.iter().any(|x| *x != 0.0) && gv.iter().any(|x| *x != 0.0), "{what}: k/v gradients vanish entirely");
    let lse = lse.map(values);
    for &r in empty_rows {
        let row = &o[r * d.d..(r + 1) * d.d];
        assert!(row.iter().all(|&x| x == 0.0), "{what}: empty row {r} output {row:?}");
        let grow = &gq[r * d.d..(r + 1) * d.d];
        assert!(grow.iter().all(|&x| x == 0.0), "{what}: empty row {r} q-gradient {grow:?}");
        if let Some(l) = &lse {
            assert_eq!(l[r], f64::NEG_INFINITY, "{what}: empty row {r} lse");
        }
    }
    // The other rows are not all zero.
    let nonempty = (0..d.b * d.hq * d.sq).filter(|r| !empty_rows.contains(r)).count();
    if nonempty > 0 {
        assert!(o.iter().any(|&x| x != 0.0), "{what}: every row is zero");
    }
}

fn rows_where(d: &Dims, pred: impl Fn(usize, usize, usize) -> bool) -> Vec<usize> {
    let mut out = Vec::new();
    for b in 0..d.b {
        for h in 0..d.hq {
            for i in 0..d.sq {
                if pred(b, h, i) {
                    out.push((b * d.hq + h) * d.sq + i);
                }
            }
        }
    }
    out
}

#[test]
fn empty_rows_dense_long_queries() {
    let mut rng = Rng::new(302);
    let d = Dims::new(1, 4, 2, 8, 3, 3);
    let x = Qkv::random(&mut rng, &d);
    let empty = rows_where(&d, |_, _, i| d.pos(i) < 0);
    check_empty_rows("dense sq > sk", &d, &x, &empty, |q, k, v| {
        let o = attention(q, k, v, &AttentionOptions::causal()).unwrap();
        (o.output, Some(o.lse))
    });
}

#[test]
fn empty_rows_block_sparse_padding_and_future_blocks() {
    let mut rng = Rng::new(303);
    let d = Dims::new(1, 2, 1, 6, 6, 3);
    let x = Qkv::random(&mut rng, &d);
    // kb = 2, 3 blocks. Row 1 lists nothing; row 3 lists only the future block 2; the others
    // list their own block.
    let lists: [[i64; 2]; 6] = [[0, -1], [-1, -1], [1, 7], [2, -1], [2, 0], [2, -3]];
    let idx: Vec<i64> = lists.iter().flatten().cloned().collect();
    let empty = rows_where(&d, |_, _, i| i == 1 || i == 3);
    check_empty_rows("block sparse", &d, &x, &empty, |q, k, v| {
        let sel = BlockSelection::per_token(int_tensor(idx.clone(), [1, 1, 6, 2], &q.device()), 2);
        let o = block_sparse_attention(q, k, v, &sel, &AttentionOptions::causal()).unwrap();
        (o.output, Some(o.lse))
    });
}

#[test]
fn empty_rows_keep_threshold_above_every_bias() {
    let mut rng = Rng::new(304);
    let d = Dims::new(1, 2, 2, 5, 5, 2);
    let x = Qkv::random(&mut rng, &d);
    let bias = rng.normals(d.b * d.hkv * d.sk, 1.0);
    // Row 2 of each head: threshold 100 drops every key.
    let thr: Vec<f64> = (0..d.b * d.hkv * d.sq).map(|r| if r % d.sq == 2 { 100.0 } else { f64::NEG_INFINITY }).collect();
    let empty = rows_where(&d, |_, _, i| i == 2);
    check_empty_rows("keep threshold", &d, &x, &empty, |q, k, v| {
        let device = q.device();
        let keep = KeepThreshold { value: tensor(thr.clone(), [1, 2, 5], &device), index: int_tensor(vec![0; 10], [1, 2, 5], &device) };
        let o = attention_with_bias(q, k, v, &KeyBias { values: tensor(bias.clone(), [1, 2, 5], &device), keep: Some(keep) }, &AttentionOptions::causal()).unwrap();
        (o.output, Some(o.lse))
    });
}

#[test]
fn empty_rows_moba_and_dma_long_queries() {
    let mut rng = Rng::new(305);
    let d = Dims::new(1, 2, 1, 7, 4, 3);
    let x = Qkv::random(&mut rng, &d);
    let empty = rows_where(&d, |_, _, i| d.pos(i) < 0);
    check_empty_rows("moba sq > sk", &d, &x, &empty, |q, k, v| {
        let o = moba_attention(q, k, v, &MobaParams { block_size: 2, top_k: 2, scale: None }).unwrap().attention;
        (o.output, Some(o.lse))
    });
    let bias = rng.normals(d.b * d.hkv * d.sk, 1.0);
    check_empty_rows("dma sq > sk", &d, &x, &empty, |q, k, v| {
        let device = q.device();
        let o = dma_attention(q, k, v, tensor(bias.clone(), [1, 1, 4], &device), &DmaParams { window: 2, ..DmaParams::default() }).unwrap();
        (o.output, Some(o.lse))
    });
}

#[test]
fn empty_rows_nsa_compression_branch() {
    // Queries before the first complete window see no compressed token: that branch gives 0
    // (LSE -inf) and no NaN reaches q, k_cmp or v_cmp. Here "k" and "v" are k_cmp and v_cmp.
    let mut rng = Rng::new(306);
    let (s, dh) = (9usize, 3usize);
    let p = NsaParams { compress_block: 4, compress_stride: 2, select_block: 3, top_n: 3, window: 2, scale: None, ..NsaParams::default() };
    let nc = num_compressed(s, 4, 2);
    let d = Dims::new(1, 2, 1, s, nc, dh);
    let x = Qkv::random(&mut rng, &d);
    let ks = rng.normals(s * dh, 1.0);
    let vs = rng.normals(s * dh, 1.0);
    let gates: Vec<f64> = (0..2 * s * 3).map(|_| rng.uniform()).collect();
    // Token c is visible from t when 2c + 3 <= t: rows t < 3 are empty.
    let empty = rows_where(&d, |_, _, i| i < 3);
    check_empty_rows("nsa compression", &d, &x, &empty, |q, k_cmp, v_cmp| {
        let device = q.device();
        let kv = |v: &Vec<f64>| tensor(v.clone(), [1, 1, s, dh], &device);
        let inputs = NsaInputs {
            q,
            k_cmp,
            v_cmp,
            k_slc: kv(&ks),
            v_slc: kv(&vs),
            k_win: kv(&ks),
            v_win: kv(&vs),
            gates: tensor(gates.clone(), [1, 2, s, 3], &device),
        };
        let out = nsa_attention(inputs, &p).unwrap();
        (out.compressed.output, Some(out.compressed.lse))
    });
}

// ------------------------------------------------------------------------------------------
// Block-sparse attention
// ------------------------------------------------------------------------------------------

#[test]
fn block_sparse_matches_naive_random_selections() {
    let mut rng = Rng::new(307);
    for (d, qb, kb) in [
        (Dims::new(2, 4, 2, 7, 7, 3), 1usize, 2usize),
        (Dims::new(1, 4, 2, 7, 7, 3), 3, 2),
        (Dims::new(1, 3, 1, 4, 11, 2), 1, 3),
        (Dims::new(1, 2, 1, 10, 5, 2), 4, 2),
        (Dims::new(1, 2, 2, 1, 9, 4), 1, 4),
    ] {
        let x = Qkv::random(&mut rng, &d);
        let (q, k, v) = x.tensors(&d);
        let nkb = d.sk.div_ceil(kb);
        let rows = d.sq.div_ceil(qb);
        for hs in [d.hq, d.hkv] {
            let cap = 3;
            // Entries in -2 ..= nkb + 1: padding, duplicates and out-of-range included.
            let idx: Vec<i64> = (0..d.b * hs * rows * cap).map(|_| rng.below(nkb + 4) as i64 - 2).collect();
            let sel = BlockSelection { indices: int_tensor(idx.clone(), [d.b, hs, rows, cap], &dev()), key_block: kb, query_block: qb };
            for opts in [AttentionOptions::causal(), AttentionOptions::full(), AttentionOptions::causal().with_window(3)] {
                let out = block_sparse_attention(q.clone(), k.clone(), v.clone(), &sel, &opts).unwrap();
                let visible = |b: usize, h: usize, i: usize, j: usize| {
                    let hsel = h / (d.hq / hs);
                    let r = i / qb;
                    let list = &idx[((b * hs + hsel) * rows + r) * cap..][..cap];
                    naive_visible(&d, opts.causal, opts.window, i, j) && list.contains(&((j / kb) as i64))
                };
                let (o, l) = naive_attention(&d, &x.q, &x.k, &x.v, default_scale(d.d), &visible, &no_bias);
                let what = format!("{d:?} qb {qb} kb {kb} hs {hs} {opts:?}");
                assert_close(&format!("{what} output"), &values(out.output), &o, TOL, TOL);
                assert_close(&format!("{what} lse"), &values(out.lse), &l, TOL, TOL);
            }
        }
    }
}

// ------------------------------------------------------------------------------------------
// MoBA
// ------------------------------------------------------------------------------------------

#[test]
fn moba_matches_naive_routing_and_attention() {
    let mut rng = Rng::new(308);
    for (d, bs, top_k) in [
        (Dims::new(2, 4, 2, 11, 11, 3), 3usize, 2usize),
        (Dims::new(1, 3, 1, 9, 9, 4), 2, 3),
        (Dims::new(1, 2, 2, 4, 13, 3), 3, 2),
        (Dims::new(1, 2, 1, 10, 6, 2), 2, 2),
        (Dims::new(1, 2, 1, 1, 12, 3), 4, 2),
        (Dims::new(1, 1, 1, 5, 5, 2), 8, 3),
    ] {
        let x = Qkv::random(&mut rng, &d);
        let (q, k, v) = x.tensors(&d);
        let out = moba_attention(q, k, v, &MobaParams { block_size: bs, top_k, scale: None }).unwrap();
        let nb = d.sk.div_ceil(bs);
        let cap = out.selection.indices.dims()[3];
        assert_eq!(cap, top_k.min(nb));
        assert_eq!(out.selection.indices.dims(), [d.b, d.hq, d.sq, cap]);
        let idx = ints(out.selection.indices.clone());
        let mut routes = Vec::new();
        for b in 0..d.b {
            for h in 0..d.hq {
                for i in 0..d.sq {
                    let want = naive_moba_blocks(&d, &x.q, &x.k, bs, top_k, b, h, i);
                    let list = &idx[((b * d.hq + h) * d.sq + i) * cap..][..cap];
                    assert_eq!(valid_sorted(list, nb), want, "{d:?} routing of (b {b}, h {h}, i {i}): {list:?}");
                    routes.push(want);
                }
            }
        }
        let visible = |b: usize, h: usize, i: usize, j: usize| naive_visible(&d, true, None, i, j) && routes[(b * d.hq + h) * d.sq + i].contains(&(j / bs));
        let (o, l) = naive_attention(&d, &x.q, &x.k, &x.v, default_scale(d.d), &visible, &no_bias);
        assert_close(&format!("moba {d:?} output"), &values(out.attention.output), &o, TOL, TOL);
        assert_close(&format!("moba {d:?} lse"), &values(out.attention.lse), &l, TOL, TOL);
    }
}

// ------------------------------------------------------------------------------------------
// NSA
// ------------------------------------------------------------------------------------------

/// Naive selection scores `[b, hkv, sq, n_sel]`.
#[allow(clippy::too_many_arguments)]
fn naive_nsa_scores(d: &Dims, q: &[f64], kc: &[f64], nc: usize, p: &NsaParams) -> Vec<f64> {
    let n_sel = d.sk.div_ceil(p.select_block);
    let scale = p.scale.unwrap_or(default_scale(d.d));
    let g = d.hq / d.hkv;
    let mut out = vec![0.0; d.b * d.hkv * d.sq * n_sel];
    for b in 0..d.b {
        for hk in 0..d.hkv {
            for i in 0..d.sq {
                let pos = d.pos(i);
                let vis: Vec<usize> = (0..nc).filter(|&c| ((c * p.compress_stride + p.compress_block) as i64) - 1 <= pos).collect();
                if vis.is_empty() {
                    continue;
                }
                for h in hk * g..(hk + 1) * g {
                    let s: Vec<f64> = vis
                        .iter()
                        .map(|&c| scale * (0..d.d).map(|t| q[d.qi(b, h, i) + t] * kc[((b * d.hkv + hk) * nc + c) * d.d + t]).sum::<f64>())
                        .collect();
                    let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let z: f64 = s.iter().map(|x| (x - m).exp()).sum();
                    for (&c, &sc) in vis.iter().zip(&s) {
                        let prob = (sc - m).exp() / z;
                        for j in 0..n_sel {
                            let (a0, a1) = (c * p.compress_stride, c * p.compress_stride + p.compress_block);
                            let (b0, b1) = (j * p.select_block, (j + 1) * p.select_block);
                            let shared = a1.min(b1).saturating_sub(a0.max(b0));
                            out[((b * d.hkv + hk) * d.sq + i) * n_sel + j] += prob * shared as f64 / p.compress_stride as f64;
                        }
                    }
                }
            }
        }
    }
    out
}

#[test]
fn nsa_matches_naive_three_branches() {
    let mut rng = Rng::new(309);
    for (d, p) in [
        (Dims::new(1, 4, 2, 13, 13, 3), NsaParams { compress_block: 4, compress_stride: 2, select_block: 2, top_n: 4, window: 3, scale: None, ..NsaParams::default() }),
        (Dims::new(2, 2, 1, 5, 14, 2), NsaParams { compress_block: 4, compress_stride: 3, select_block: 3, top_n: 3, window: 5, scale: Some(0.8), ..NsaParams::default() }),
        (Dims::new(1, 2, 2, 1, 17, 4), NsaParams { compress_block: 4, compress_stride: 4, select_block: 4, top_n: 3, window: 4, scale: None, ..NsaParams::default() }),
        (Dims::new(1, 3, 1, 12, 7, 2), NsaParams { compress_block: 3, compress_stride: 2, select_block: 2, top_n: 3, window: 2, scale: None, ..NsaParams::default() }),
        // Window branch off: its output is 0 and it adds nothing to the mix.
        (Dims::new(1, 4, 2, 15, 15, 3), NsaParams { compress_block: 4, compress_stride: 2, select_block: 2, top_n: 3, window: 0, scale: None, ..NsaParams::default() }),
    ] {
        let device = dev();
        let nc = num_compressed(d.sk, p.compress_block, p.compress_stride);
        let n_sel = d.sk.div_ceil(p.select_block);
        let slc = Qkv::random(&mut rng, &d);
        let win = Qkv { q: Vec::new(), k: rng.normals(slc.k.len(), 1.0), v: rng.normals(slc.k.len(), 1.0) };
        let kc = rng.normals(d.b * d.hkv * nc * d.d, 1.0);
        let vc = rng.normals(d.b * d.hkv * nc * d.d, 1.0);
        let gates: Vec<f64> = (0..d.b * d.hq * d.sq * 3).map(|_| rng.uniform()).collect();
        let (q, k_slc, v_slc) = slc.tensors(&d);
        let out = nsa_attention(
            NsaInputs {
                q,
                k_cmp: tensor(kc.clone(), [d.b, d.hkv, nc, d.d], &device),
                v_cmp: tensor(vc.clone(), [d.b, d.hkv, nc, d.d], &device),
                k_slc,
                v_slc,
                k_win: tensor(win.k.clone(), d.kv_shape(), &device),
                v_win: tensor(win.v.clone(), d.kv_shape(), &device),
                gates: tensor(gates.clone(), [d.b, d.hq, d.sq, 3], &device),
            },
            &p,
        )
        .unwrap();
        let scale = p.scale.unwrap_or(default_scale(d.d));
        // Compression branch.
        let dc = Dims { sk: nc, ..d };
        let cmp_vis = |_: usize, _: usize, i: usize, c: usize| ((c * p.compress_stride + p.compress_block) as i64) - 1 <= d.pos(i);
        let qc: Vec<f64> = slc.q.clone();
        let (oc, lc) = {
            // naive_attention computes positions from its own dims; visibility uses d.pos.
            naive_attention(&dc, &qc, &kc, &vc, scale, &cmp_vis, &no_bias)
        };
        assert_close(&format!("nsa {d:?} compressed"), &values(out.compressed.output.clone()), &oc, TOL, TOL);
        assert_close(&format!("nsa {d:?} compressed lse"), &values(out.compressed.lse.clone()), &lc, TOL, TOL);
        // Selection: forced blocks, only past-starting blocks, the right count, and no better
        // candidate left out.
        let scores = naive_nsa_scores(&d, &slc.q, &kc, nc, &p);
        assert_eq!(out.selection.indices.dims()[1], d.hkv);
        let cap = out.selection.indices.dims()[3];
        assert_eq!(cap, p.top_n.min(n_sel));
        let idx = ints(out.selection.indices.clone());
        let mut sets = Vec::new();
        for b in 0..d.b {
            for hk in 0..d.hkv {
                for i in 0..d.sq {
                    let r = (b * d.hkv + hk) * d.sq + i;
                    let set = valid_sorted(&idx[r * cap..(r + 1) * cap], n_sel);
                    let pos = d.pos(i);
                    let allowed: Vec<usize> = (0..n_sel).filter(|&j| (j * p.select_block) as i64 <= pos).collect();
                    let mut forced: Vec<usize> = Vec::new();
                    if pos >= 0 {
                        let cur = pos as usize / p.select_block;
                        forced = vec![0, cur];
                        if cur >= 1 {
                            forced.push(cur - 1);
                        }
                        forced.sort_unstable();
                        forced.dedup();
                    }
                    let what = format!("nsa {d:?} selection (b {b}, hk {hk}, i {i}) = {set:?}");
                    assert!(forced.iter().all(|f| set.contains(f)), "{what}: forced {forced:?} missing");
                    assert!(set.iter().all(|s| allowed.contains(s)), "{what}: future block selected");
                    assert_eq!(set.len(), p.top_n.min(allowed.len()), "{what}: wrong count");
                    let sc = &scores[r * n_sel..(r + 1) * n_sel];
                    let chosen_free: Vec<f64> = set.iter().filter(|s| !forced.contains(s)).map(|&s| sc[s]).collect();
                    if let Some(min_free) = chosen_free.iter().cloned().reduce(f64::min) {
                        for &j in allowed.iter().filter(|j| !set.contains(j)) {
                            assert!(sc[j] <= min_free + 1e-12, "{what}: block {j} ({}) beats a chosen one ({min_free})", sc[j]);
                        }
                    }
                    sets.push(set);
                }
            }
        }
        let slc_vis = |b: usize, h: usize, i: usize, j: usize| {
            naive_visible(&d, true, None, i, j) && sets[(b * d.hkv + d.kv_head(h)) * d.sq + i].contains(&(j / p.select_block))
        };
        let (os, ls) = naive_attention(&d, &slc.q, &slc.k, &slc.v, scale, &slc_vis, &no_bias);
        assert_close(&format!("nsa {d:?} selected"), &values(out.selected.output.clone()), &os, TOL, TOL);
        assert_close(&format!("nsa {d:?} selected lse"), &values(out.selected.lse.clone()), &ls, TOL, TOL);
        let (ow, lw) = naive_attention(&d, &slc.q, &win.k, &win.v, scale, &|_, _, i, j| naive_visible(&d, true, Some(p.window), i, j), &no_bias);
        assert_close(&format!("nsa {d:?} window"), &values(out.window.output.clone()), &ow, TOL, TOL);
        assert_close(&format!("nsa {d:?} window lse"), &values(out.window.lse.clone()), &lw, TOL, TOL);
        let mut want = vec![0.0; ow.len()];
        for r in 0..d.b * d.hq * d.sq {
            for t in 0..d.d {
                let e = r * d.d + t;
                want[e] = gates[r * 3] * oc[e] + gates[r * 3 + 1] * os[e] + gates[r * 3 + 2] * ow[e];
            }
        }
        assert_close(&format!("nsa {d:?} output"), &values(out.output), &want, TOL, TOL);
    }
}

// ------------------------------------------------------------------------------------------
// DMA
// ------------------------------------------------------------------------------------------

/// Naive DMA keep set of a row: the visible (causal) keys, or their top `w` by bias with ties
/// to the more recent key when more than `w` are visible.
fn naive_dma_kept(bias_row: &[f64], pos: i64, w: usize) -> Vec<usize> {
    if pos < 0 {
        return Vec::new();
    }
    let last = (pos as usize).min(bias_row.len() - 1);
    let mut vis: Vec<usize> = (0..=last).collect();
    if vis.len() <= w {
        return vis;
    }
    vis.sort_by(|&a, &b| bias_row[b].total_cmp(&bias_row[a]).then(b.cmp(&a)));
    vis.truncate(w);
    vis.sort_unstable();
    vis
}

fn dma_case(d: &Dims, hb: usize, window: usize, f32_data: bool, quantised: bool, rng: &mut Rng) {
    dma_case_vis(d, hb, window, f32_data, quantised, true, rng);
}

fn dma_case_vis(d: &Dims, hb: usize, window: usize, f32_data: bool, quantised: bool, causal: bool, rng: &mut Rng) {
    let device = dev();
    let round = |v: Vec<f64>| -> Vec<f64> { if f32_data { v.into_iter().map(|x| x as f32 as f64).collect() } else { v } };
    let x = Qkv::random(rng, d);
    let x = Qkv { q: round(x.q), k: round(x.k), v: round(x.v) };
    let bias_v: Vec<f64> = if quantised {
        (0..d.b * hb * d.sk).map(|_| (rng.below(4) as f64 - 1.5) * 0.5).collect()
    } else {
        round(rng.normals(d.b * hb * d.sk, 1.0))
    };
    let mk = |v: &Vec<f64>, s: [usize; 4]| if f32_data { tensor_f32(v.clone(), s, &device) } else { tensor(v.clone(), s, &device) };
    let bias = if f32_data { tensor_f32(bias_v.clone(), [d.b, hb, d.sk], &device) } else { tensor(bias_v.clone(), [d.b, hb, d.sk], &device) };
    let params = DmaParams { window, scale: None, causal };
    let out = dma_attention(mk(&x.q, d.q_shape()), mk(&x.k, d.kv_shape()), mk(&x.v, d.kv_shape()), bias.clone(), &params).unwrap();
    // Without causality every key is visible: the last key position.
    let pos = |i: usize| if causal { d.pos(i) } else { d.sk as i64 - 1 };
    let kept = |b: usize, h: usize, i: usize, j: usize| {
        let hh = h / (d.hq / hb);
        let row = &bias_v[(b * hb + hh) * d.sk..][..d.sk];
        naive_dma_kept(row, pos(i), window).contains(&j)
    };
    // The inspection mask is the same keep set, per bias head.
    let mask: Vec<bool> = dma_keep_mask(&bias, d.sq, window, causal).unwrap().into_data().convert::<bool>().try_to_vec::<bool>().unwrap();
    for b in 0..d.b {
        for hh in 0..hb {
            let row = &bias_v[(b * hb + hh) * d.sk..][..d.sk];
            for i in 0..d.sq {
                let want = naive_dma_kept(row, pos(i), window);
                for j in 0..d.sk {
                    let got = mask[((b * hb + hh) * d.sq + i) * d.sk + j];
                    assert_eq!(got, want.contains(&j), "dma_keep_mask {d:?} causal {causal} b {b} h {hh} i {i} j {j}");
                }
            }
        }
    }
    let bias_of = |b: usize, h: usize, j: usize| bias_v[(b * hb + h / (d.hq / hb)) * d.sk + j];
    let (o, l) = naive_attention(d, &x.q, &x.k, &x.v, default_scale(d.d), &kept, &bias_of);
    let tol = if f32_data { 2e-5 } else { TOL };
    let what = format!("dma {d:?} hb {hb} w {window} f32 {f32_data} quantised {quantised} causal {causal}");
    assert_close(&format!("{what} output"), &values(out.output), &o, tol, tol);
    assert_close(&format!("{what} lse"), &values(out.lse), &l, tol, tol);
}

fn dma_dims() -> Vec<(Dims, usize)> {
    vec![
        (Dims::new(2, 4, 2, 12, 12, 3), 4),
        (Dims::new(1, 2, 1, 5, 13, 2), 3),
        (Dims::new(1, 2, 2, 9, 6, 3), 2),
        (Dims::new(1, 3, 1, 1, 10, 4), 5),
        (Dims::new(1, 1, 1, 7, 7, 2), 1),
    ]
}

#[test]
fn dma_matches_naive_top_w_f32() {
    let mut rng = Rng::new(310);
    for (d, w) in dma_dims() {
        for hb in [d.hkv, d.hq] {
            dma_case(&d, hb, w, true, false, &mut rng);
            dma_case(&d, hb, w, true, true, &mut rng); // ties broken towards the recent key
        }
    }
}

/// `causal: false`: every query sees every key, keeps the same top `w` (ties to the more
/// recent key), and the output matches the naive loop; the inspection mask matches too.
#[test]
fn dma_non_causal_matches_naive_top_w() {
    let mut rng = Rng::new(71);
    for (d, w) in dma_dims() {
        for hb in [d.hkv, d.hq] {
            dma_case_vis(&d, hb, w, false, true, false, &mut rng);
            dma_case_vis(&d, hb, w, true, false, false, &mut rng);
        }
    }
}

#[test]
fn dma_matches_naive_top_w_f64() {
    let mut rng = Rng::new(311);
    for (d, w) in dma_dims() {
        for hb in [d.hkv, d.hq] {
            dma_case(&d, hb, w, false, true, &mut rng);
            dma_case(&d, hb, w, false, false, &mut rng);
        }
    }
}

#[test]
fn dma_keep_threshold_keeps_exactly_w_keys_f64() {
    // Applying the keep rule to f64 biases must keep exactly min(w, visible) keys per row.
    let mut rng = Rng::new(312);
    let device = dev();
    let (h, sq, sk, w) = (3usize, 16usize, 16usize, 5usize);
    let bias_v = rng.normals(h * sk, 1.0);
    let keep = dma_keep_threshold(&tensor(bias_v.clone(), [1, h, sk], &device), sq, w, true).unwrap();
    let thr = values(keep.value);
    let ti = ints(keep.index);
    for hh in 0..h {
        for i in 0..sq {
            let row = &bias_v[hh * sk..(hh + 1) * sk];
            let (t, tix) = (thr[hh * sq + i], ti[hh * sq + i]);
            let kept: Vec<usize> = (0..=i).filter(|&j| row[j] > t || (row[j] == t && j as i64 >= tix)).collect();
            assert_eq!(kept, naive_dma_kept(row, i as i64, w), "head {hh} row {i}: threshold ({t:e}, {tix})");
        }
    }
}

// ------------------------------------------------------------------------------------------
// SeerAttention
// ------------------------------------------------------------------------------------------

#[test]
fn seer_pooling_matches_naive() {
    let mut rng = Rng::new(313);
    let device = dev();
    for (s, block) in [(7usize, 3usize), (8, 4), (5, 8), (1, 2)] {
        let (b, h, dd) = (2usize, 2usize, 3usize);
        let xv = rng.normals(b * h * s * dd, 1.0);
        let x = tensor(xv.clone(), [b, h, s, dd], &device);
        let n = s.div_ceil(block);
        let (mut avg, mut mx, mut mn) = (Vec::new(), Vec::new(), Vec::new());
        for bh in 0..b * h {
            for blk in 0..n {
                for t in 0..dd {
                    let vals: Vec<f64> = (blk * block..((blk + 1) * block).min(s)).map(|i| xv[(bh * s + i) * dd + t]).collect();
                    avg.push(vals.iter().sum::<f64>() / vals.len() as f64);
                    mx.push(vals.iter().cloned().fold(f64::NEG_INFINITY, f64::max));
                    mn.push(vals.iter().cloned().fold(f64::INFINITY, f64::min));
                }
            }
        }
        assert_close("avg pool", &values(avg_pool(x.clone(), block)), &avg, TOL, TOL);
        assert_close("max pool", &values(max_pool(x.clone(), block)), &mx, 0.0, 0.0);
        assert_close("min pool", &values(min_pool(x, block)), &mn, 0.0, 0.0);
    }
}

#[test]
fn seer_target_matches_naive() {
    let mut rng = Rng::new(314);
    for (d, bs) in [(Dims::new(1, 4, 2, 7, 7, 3), 2usize), (Dims::new(2, 2, 1, 4, 9, 2), 3), (Dims::new(1, 1, 1, 5, 5, 2), 8)] {
        let x = Qkv::random(&mut rng, &d);
        let (q, k, v) = x.tensors(&d);
        let (target, dense) = seer_attention_target(q, k, v, bs, None).unwrap();
        let (nq, nk) = (d.sq.div_ceil(bs), d.sk.div_ceil(bs));
        assert_eq!(target.dims(), [d.b, d.hq, nq, nk]);
        let scale = default_scale(d.d);
        let mut want = vec![0.0; d.b * d.hq * nq * nk];
        for b in 0..d.b {
            for h in 0..d.hq {
                let mut pooled = vec![0.0f64; nq * nk];
                for i in 0..d.sq {
                    // Probabilities of row i.
                    let vis: Vec<usize> = (0..d.sk).filter(|&j| naive_visible(&d, true, None, i, j)).collect();
                    let s: Vec<f64> = vis.iter().map(|&j| scale * (0..d.d).map(|t| x.q[d.qi(b, h, i) + t] * x.k[d.ki(b, d.kv_head(h), j) + t]).sum::<f64>()).collect();
                    let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let z: f64 = s.iter().map(|x| (x - m).exp()).sum();
                    for (&j, &sc) in vis.iter().zip(&s) {
                        let p = (sc - m).exp() / z;
                        let e = &mut pooled[(i / bs) * nk + j / bs];
                        *e = e.max(p);
                    }
                }
                for r in 0..nq {
                    let sum: f64 = pooled[r * nk..(r + 1) * nk].iter().sum();
                    for c in 0..nk {
                        want[((b * d.hq + h) * nq + r) * nk + c] = if sum > 0.0 { pooled[r * nk + c] / sum } else { 0.0 };
                    }
                }
            }
        }
        assert_close(&format!("seer target {d:?}"), &values(target), &want, 1e-10, 1e-12);
        let (o, _) = naive_attention(&d, &x.q, &x.k, &x.v, scale, &|_, _, i, j| naive_visible(&d, true, None, i, j), &no_bias);
        assert_close("seer target dense", &values(dense.output), &o, TOL, TOL);
    }
}

#[test]
fn seer_gate_loss_and_selection_match_naive() {
    let mut rng = Rng::new(315);
    let device = dev();
    let (b, h, nq, nk) = (2usize, 2usize, 4usize, 5usize);
    // Block-causal style mask: row r sees blocks 0..=r+1.
    let mut logits = Vec::new();
    let mut target = Vec::new();
    for _ in 0..b * h {
        for r in 0..nq {
            let raw: Vec<f64> = (0..nk).map(|c| if c <= r + 1 { rng.normal() } else { f64::NEG_INFINITY }).collect();
            let t: Vec<f64> = (0..nk).map(|c| if c <= r + 1 && rng.below(3) > 0 { rng.uniform() } else { 0.0 }).collect();
            let s: f64 = t.iter().sum();
            let t: Vec<f64> = if s > 0.0 { t.iter().map(|x| x / s).collect() } else { t };
            logits.extend(raw);
            target.extend(t);
        }
    }
    let lt = tensor(logits.clone(), [b, h, nq, nk], &device);
    let tt = tensor(target.clone(), [b, h, nq, nk], &device);
    for skip in [0usize, 1, 3, 10] {
        let skip_eff = skip.min(nq - 1);
        let mut total = 0.0;
        let mut count = 0usize;
        for bh in 0..b * h {
            for r in skip_eff..nq {
                let row = &logits[(bh * nq + r) * nk..][..nk];
                let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let lz = m + row.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
                for c in 0..nk {
                    let t = target[(bh * nq + r) * nk + c];
                    if t > 0.0 {
                        total += t * (t.ln() - (row[c] - lz));
                    }
                    count += 1;
                }
            }
        }
        let got = scalar(seer_gate_loss(lt.clone(), tt.clone(), skip).unwrap());
        assert!((got - total / count as f64).abs() < 1e-12, "skip {skip}: {got} vs {}", total / count as f64);
    }
    // Threshold and top-k selections.
    for threshold in [0.0, 0.1, 0.3] {
        let sel = seer_select_threshold(lt.clone(), threshold, 4).unwrap();
        assert_eq!((sel.query_block, sel.key_block), (4, 4));
        let idx = ints(sel.indices);
        for r in 0..b * h * nq {
            let row = &logits[r * nk..][..nk];
            let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = row.iter().map(|x| (x - m).exp()).sum();
            let want: Vec<usize> = (0..nk).filter(|&c| (row[c] - m).exp() / z > threshold).collect();
            assert_eq!(valid_sorted(&idx[r * nk..(r + 1) * nk], nk), want, "threshold {threshold} row {r}");
        }
    }
    for top_k in [1usize, 2, 4] {
        let sel = seer_select_topk(lt.clone(), top_k, 4).unwrap();
        let idx = ints(sel.indices);
        for r in 0..b * h * nq {
            let row = &logits[r * nk..][..nk];
            let mut order: Vec<usize> = (0..nk).filter(|&c| row[c].is_finite()).collect();
            order.sort_by(|&a, &c| row[c].total_cmp(&row[a]));
            order.truncate(top_k);
            order.sort_unstable();
            assert_eq!(valid_sorted(&idx[r * top_k..(r + 1) * top_k], nk), order, "top_k {top_k} row {r}");
        }
    }
}

// ------------------------------------------------------------------------------------------
// RoPE
// ------------------------------------------------------------------------------------------

fn naive_rope(x: &[f64], rows: usize, d: usize, pos: &[usize], theta: f64) -> Vec<f64> {
    let half = d / 2;
    let mut out = vec![0.0; x.len()];
    for r in 0..rows {
        let p = pos[r % pos.len()] as f64;
        for i in 0..half {
            let ang = p * theta.powf(-2.0 * i as f64 / d as f64);
            let (s, c) = ang.sin_cos();
            let (a, b) = (x[r * d + i], x[r * d + half + i]);
            out[r * d + i] = a * c - b * s;
            out[r * d + half + i] = b * c + a * s;
        }
    }
    out
}

#[test]
fn rope_matches_naive_f32() {
    let mut rng = Rng::new(316);
    let device = dev();
    let (h, s, d) = (2usize, 5usize, 6usize);
    let xv: Vec<f64> = rng.normals(h * s * d, 1.0).into_iter().map(|x| x as f32 as f64).collect();
    let pos = [0usize, 3, 17, 100, 1000];
    let got = values(apply_rope(tensor_f32(xv.clone(), [1, h, s, d], &device), &pos, 10000.0).unwrap());
    assert_close("rope f32", &got, &naive_rope(&xv, h * s, d, &pos, 10000.0), 1e-4, 1e-5);
}

/// Runs of consecutive positions are built from factored angle tables (`p0 + 64 a` and `c`):
/// f64-accurate in f64, and in f32 within the rounding of the table products even near position
/// 64k, where rounding the angle itself to f32 would be off by ~2e-3 rad.
#[test]
fn rope_consecutive_positions_match_naive() {
    let mut rng = Rng::new(318);
    let device = dev();
    let (h, s, d) = (2usize, 200usize, 8usize);
    for p0 in [0usize, 65_000] {
        let pos: Vec<usize> = (p0..p0 + s).collect();
        let xv = rng.normals(h * s * d, 1.0);
        let got = values(apply_rope(tensor(xv.clone(), [1, h, s, d], &device), &pos, 10000.0).unwrap());
        // Near 65k an angle rounds to f64 at ulp(65536) / 2 = 7e-12 on either side.
        let tol = if p0 == 0 { 1e-12 } else { 2e-10 };
        assert_close("rope f64 consecutive", &got, &naive_rope(&xv, h * s, d, &pos, 10000.0), tol, tol);
        let x32: Vec<f64> = xv.iter().map(|&x| x as f32 as f64).collect();
        let got = values(apply_rope(tensor_f32(x32.clone(), [1, h, s, d], &device), &pos, 10000.0).unwrap());
        assert_close("rope f32 consecutive", &got, &naive_rope(&x32, h * s, d, &pos, 10000.0), 0.0, 5e-6);
    }
}

#[test]
fn rope_matches_naive_f64() {
    // In f64 the rotation must be f64-accurate: the f64 reference is the oracle the kernels'
    // errors are measured against.
    let mut rng = Rng::new(317);
    let device = dev();
    let (h, s, d) = (2usize, 5usize, 6usize);
    let xv = rng.normals(h * s * d, 1.0);
    let pos = [0usize, 3, 17, 100, 1000];
    let got = values(apply_rope(tensor(xv.clone(), [1, h, s, d], &device), &pos, 10000.0).unwrap());
    assert_close("rope f64", &got, &naive_rope(&xv, h * s, d, &pos, 10000.0), 1e-12, 1e-12);
}

// ------------------------------------------------------------------------------------------
// SeerAttention gate logits
// ------------------------------------------------------------------------------------------

/// A gate with one key map per kv head equals a per-query-head gate whose key maps repeat
/// each kv head's weights over its GQA group (the published layout loads without
/// broadcasting), and a kv-head count that does not divide the query heads is an error.
#[test]
fn seer_gate_kv_head_keys_equal_repeated_query_head_keys() {
    use burn::module::{Param, ParamId};
    use burn_sparse_attn::seer::AttnGate;
    let mut rng = Rng::new(320);
    let device = dev();
    let d = Dims::new(2, 4, 2, 9, 9, 4);
    let (bs, hidden) = (3usize, 6usize);
    let kv_gate = randomize_params(module_to_f64(AttnGate::new_kv_keys(d.hq, d.hkv, d.d, bs, hidden, 1e4, &device).unwrap()), 321, 0.5);
    assert_eq!(kv_gate.k_proj.weight.dims(), [d.hkv, 3 * d.d, hidden]);
    let g = d.hq / d.hkv;
    let repeated = kv_gate
        .k_proj
        .weight
        .val()
        .reshape([d.hkv, 1, 3 * d.d, hidden])
        .expand([d.hkv, g, 3 * d.d, hidden])
        .reshape([d.hq, 3 * d.d, hidden]);
    let mut q_gate = module_to_f64(AttnGate::new(d.hq, d.d, bs, hidden, 1e4, &device).unwrap());
    q_gate.q_proj = kv_gate.q_proj.clone();
    q_gate.k_proj.weight = Param::initialized(ParamId::new(), repeated);
    let x = Qkv::random(&mut rng, &d);
    let (q, k, _) = x.tensors(&d);
    let a = values(kv_gate.logits(q.clone(), k.clone()).unwrap());
    let b = values(q_gate.logits(q, k).unwrap());
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(&b) {
        assert!((x == y) || (x - y).abs() < 1e-12, "{x} vs {y}");
    }
    assert!(AttnGate::new_kv_keys(4, 3, 4, 3, 6, 1e4, &device).is_err());
}

#[test]
#[allow(clippy::needless_range_loop)] // the naive loops index several arrays by the same (i, j), as the formula does
fn seer_gate_logits_match_naive() {
    // Pooled q (mean by default) through the per-head q map, pooled k (max | min | mean of the
    // kv head by default) through the per-query-head k map, block RoPE at each block's
    // first-token position, scaled dot product, block-causal -inf mask; then the other
    // published poolings (q by max and mean; k by any of max, min and mean, in any order).
    use burn_sparse_attn::seer::{AttnGate, GatePool};
    use GatePool::{Avg, Max, Min};
    let mut rng = Rng::new(318);
    let theta = 10000.0;
    type Case<'a> = (Dims, usize, usize, &'a [GatePool], &'a [GatePool]);
    let cases: [Case; 6] = [
        (Dims::new(1, 4, 2, 7, 7, 4), 2, 6, &[Avg], &[Max, Min, Avg]),
        (Dims::new(2, 2, 1, 5, 11, 4), 3, 4, &[Avg], &[Max, Min, Avg]),
        (Dims::new(1, 2, 2, 9, 9, 2), 4, 8, &[Avg], &[Max, Min, Avg]),
        (Dims::new(1, 4, 2, 7, 7, 4), 2, 6, &[Max, Avg], &[Avg]),
        (Dims::new(2, 2, 1, 5, 11, 2), 3, 4, &[Max, Avg], &[Min, Max]),
        (Dims::new(1, 2, 2, 9, 9, 4), 4, 8, &[Avg], &[Avg, Min]),
    ];
    for (d, bs, hidden, q_pool, k_pool) in cases {
        let device = dev();
        let gate = AttnGate::with_pooling(d.hq, d.hq, d.d, bs, hidden, theta, q_pool, k_pool, &device).unwrap();
        let gate = randomize_params(module_to_f64(gate), 319, 0.5);
        assert_eq!(gate.q_proj.is_some(), q_pool.len() * d.d != hidden);
        let pool = |kind: GatePool, vals: Vec<f64>| -> f64 {
            match kind {
                Avg => vals.iter().sum::<f64>() / vals.len() as f64,
                Max => vals.into_iter().fold(f64::NEG_INFINITY, f64::max),
                Min => vals.into_iter().fold(f64::INFINITY, f64::min),
            }
        };
        let (nqp, nkp) = (q_pool.len(), k_pool.len());
        let x = Qkv::random(&mut rng, &d);
        let (q, k, _) = x.tensors(&d);
        let got = values(gate.logits(q, k).unwrap());
        let wq = gate.q_proj.as_ref().map(|p| values(p.weight.val()));
        let wk = values(gate.k_proj.weight.val());
        let (nq, nk) = (d.sq.div_ceil(bs), d.sk.div_ceil(bs));
        let off = d.sk - d.sq;
        let rope = |v: &mut Vec<f64>, p: usize| {
            let half = hidden / 2;
            for i in 0..half {
                let ang = p as f64 * theta.powf(-2.0 * i as f64 / hidden as f64);
                let (s, c) = ang.sin_cos();
                let (a, b) = (v[i], v[half + i]);
                v[i] = a * c - b * s;
                v[half + i] = b * c + a * s;
            }
        };
        let mut want = Vec::new();
        for b in 0..d.b {
            for h in 0..d.hq {
                let hk = d.kv_head(h);
                let qg: Vec<Vec<f64>> = (0..nq)
                    .map(|i| {
                        let rows: Vec<usize> = (i * bs..((i + 1) * bs).min(d.sq)).collect();
                        let col = |t: usize| rows.iter().map(|&r| x.q[d.qi(b, h, r) + t]).collect::<Vec<f64>>();
                        let pooled: Vec<f64> = q_pool.iter().flat_map(|&kind| (0..d.d).map(move |t| (kind, t))).map(|(kind, t)| pool(kind, col(t))).collect();
                        let mut g: Vec<f64> = match &wq {
                            Some(w) => (0..hidden).map(|o| (0..nqp * d.d).map(|t| pooled[t] * w[(h * nqp * d.d + t) * hidden + o]).sum()).collect(),
                            None => pooled,
                        };
                        rope(&mut g, i * bs + off);
                        g
                    })
                    .collect();
                let kg: Vec<Vec<f64>> = (0..nk)
                    .map(|j| {
                        let rows: Vec<usize> = (j * bs..((j + 1) * bs).min(d.sk)).collect();
                        let col = |t: usize| rows.iter().map(|&r| x.k[d.ki(b, hk, r) + t]).collect::<Vec<f64>>();
                        let pooled: Vec<f64> = k_pool.iter().flat_map(|&kind| (0..d.d).map(move |t| (kind, t))).map(|(kind, t)| pool(kind, col(t))).collect();
                        let mut g: Vec<f64> = (0..hidden).map(|o| (0..nkp * d.d).map(|t| pooled[t] * wk[(h * nkp * d.d + t) * hidden + o]).sum()).collect();
                        rope(&mut g, j * bs);
                        g
                    })
                    .collect();
                for i in 0..nq {
                    let last = ((i + 1) * bs).min(d.sq) - 1 + off;
                    for j in 0..nk {
                        want.push(if j * bs <= last {
                            (0..hidden).map(|o| qg[i][o] * kg[j][o]).sum::<f64>() / (hidden as f64).sqrt()
                        } else {
                            f64::NEG_INFINITY
                        });
                    }
                }
            }
        }
        // 1e-6: the library's RoPE tables are f32 today (see rope_matches_naive_f64).
        assert_close(&format!("seer gate logits {d:?} q {q_pool:?} k {k_pool:?}"), &got, &want, 1e-6, 1e-6);
    }
}
