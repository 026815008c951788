//! Packed variable-length batches (`attention_varlen`) on Flex in f64: a packed call equals
//! attention over each sequence on its own, for the output, the LSE and the gradients of q,
//! k and v; bad boundaries are errors that name their argument.

use burn::tensor::Tensor;
use burn_sparse_attn::attention::{AttentionOptions, attention};
use burn_sparse_attn::DenseAttentionConfig;
use burn_sparse_attn::varlen::{VarLen, attention_varlen};
use sparse_attn_tests::*;

/// `t[:, :, lo..hi, :]`.
fn rows(t: &Tensor<4>, lo: usize, hi: usize) -> Tensor<4> {
    let [b, h, _, d] = t.dims();
    t.clone().slice([0..b, 0..h, lo..hi, 0..d])
}

/// Packs sequences of query lengths `cu_q` and key lengths `cu_k` (GQA 4 / 2, head dim 8,
/// batch 2), runs `attention_varlen` and, per sequence, `attention` on that sequence's rows
/// alone, with the same upstream gradient; compares everything to 1e-12.
fn packed_equals_separate(cu_q: &[usize], cu_k: &[usize], opts: AttentionOptions) {
    let device = ad_dev();
    let mut rng = Rng::new(11);
    let (tq, tk) = (cu_q[cu_q.len() - 1], cu_k[cu_k.len() - 1]);
    let q = rng.randn([2, 4, tq, 8], 1.0, &device).require_grad();
    let k = rng.randn([2, 2, tk, 8], 1.0, &device).require_grad();
    let v = rng.randn([2, 2, tk, 8], 1.0, &device).require_grad();
    let d_o = rng.randn([2, 4, tq, 8], 1.0, &device);
    let varlen = VarLen::cross(cu_q.to_vec(), cu_k.to_vec()).unwrap();
    let packed = attention_varlen(q.clone(), k.clone(), v.clone(), &varlen, &opts).unwrap();
    let g = (packed.output.clone() * d_o.clone()).sum().backward();
    let (gq, gk, gv) = (values(q.grad(&g).unwrap()), values(k.grad(&g).unwrap()), values(v.grad(&g).unwrap()));
    let (o_all, lse_all) = (packed.output.clone(), packed.lse.clone());
    for s in 0..cu_q.len() - 1 {
        let (qa, qb, ka, kb) = (cu_q[s], cu_q[s + 1], cu_k[s], cu_k[s + 1]);
        if qa == qb {
            continue;
        }
        let what = |x: &str| format!("sequence {s} ({qa}..{qb} x {ka}..{kb}) {x}");
        let q1 = rows(&q, qa, qb).detach().require_grad();
        let o_packed = rows(&o_all, qa, qb);
        let lse_packed = values(lse_all.clone().slice([0..2, 0..4, qa..qb]));
        if ka == kb {
            // No keys: every row is empty.
            assert!(values(o_packed).iter().all(|&x| x == 0.0), "{}", what("o of an empty sequence"));
            assert!(lse_packed.iter().all(|&x| x == f64::NEG_INFINITY), "{}", what("lse"));
            continue;
        }
        let k1 = rows(&k, ka, kb).detach().require_grad();
        let v1 = rows(&v, ka, kb).detach().require_grad();
        let one = attention(q1.clone(), k1.clone(), v1.clone(), &opts).unwrap();
        assert_close(&what("o"), &values(o_packed), &values(one.output.clone()), 1e-12, 1e-12);
        let lse_one = values(one.lse.clone());
        for (a, b) in lse_packed.iter().zip(&lse_one) {
            assert!(a == b || (a - b).abs() < 1e-12, "{}: {a} vs {b}", what("lse"));
        }
        let g1 = (one.output * rows(&d_o, qa, qb)).sum().backward();
        let slice_grad = |full: &[f64], heads: usize, len: usize, lo: usize, hi: usize| -> Vec<f64> {
            let mut out = Vec::new();
            for bh in 0..2 * heads {
                out.extend_from_slice(&full[(bh * len + lo) * 8..(bh * len + hi) * 8]);
            }
            out
        };
        assert_close(&what("dq"), &slice_grad(&gq, 4, tq, qa, qb), &values(q1.grad(&g1).unwrap()), 1e-12, 1e-12);
        assert_close(&what("dk"), &slice_grad(&gk, 2, tk, ka, kb), &values(k1.grad(&g1).unwrap()), 1e-12, 1e-12);
        assert_close(&what("dv"), &slice_grad(&gv, 2, tk, ka, kb), &values(v1.grad(&g1).unwrap()), 1e-12, 1e-12);
    }
}

#[test]
fn causal_packing_equals_separate_sequences() {
    // An empty sequence, a single token, and uneven lengths.
    let cu = [0, 5, 5, 17, 18, 30];
    packed_equals_separate(&cu, &cu, AttentionOptions::causal());
}

#[test]
fn windowed_noncausal_and_cross_lengths_equal_separate_sequences() {
    let cu = [0, 9, 20];
    packed_equals_separate(&cu, &cu, AttentionOptions::causal().with_window(3));
    packed_equals_separate(&cu, &cu, AttentionOptions::full());
    // More keys than queries per sequence (bottom-right causal within each), a sequence
    // with no keys, and one with fewer keys than queries (its first rows see nothing).
    packed_equals_separate(&[0, 3, 5, 12], &[0, 7, 7, 10], AttentionOptions::causal());
}

#[test]
fn bad_boundaries_name_their_argument() {
    let device = dev();
    let q = Tensor::<4>::zeros([1, 2, 10, 4], &device);
    let kv = Tensor::<4>::zeros([1, 2, 10, 4], &device);
    let e = attention_varlen(q.clone(), kv.clone(), kv.clone(), &VarLen::new(vec![0, 4, 9]).unwrap(), &AttentionOptions::causal()).unwrap_err();
    assert!(e.to_string().contains("cu_seqlens_q"), "{e}");
    let short_k = VarLen::cross(vec![0, 4, 10], vec![0, 4, 8]).unwrap();
    let e = attention_varlen(q, kv.clone(), kv, &short_k, &AttentionOptions::causal()).unwrap_err();
    assert!(e.to_string().contains("cu_seqlens_k"), "{e}");
    assert!(VarLen::new(vec![0, 6, 4]).unwrap_err().to_string().contains("must not decrease"));
    assert!(VarLen::new(vec![2, 6]).unwrap_err().to_string().contains("start at 0"));
    assert!(VarLen::cross(vec![0, 3], vec![0, 1, 3]).unwrap_err().to_string().contains("cu_seqlens_k"));
}

/// The dense layer on a packed batch equals the layer on each sequence alone (RoPE positions
/// restart per sequence), and a wrong total is an error naming `varlen`.
#[test]
fn dense_layer_on_packed_batch_equals_separate_sequences() {
    let device = dev();
    let layer = DenseAttentionConfig::new(16, 4).with_n_kv_heads(Some(2)).with_window(Some(6)).init(&device).unwrap();
    let cu = vec![0, 4, 11, 11, 20];
    let x = Rng::new(3).randn([1, 20, 16], 1.0, &device).cast(burn::tensor::DType::F32);
    let packed = values(layer.forward_varlen(x.clone(), &VarLen::new(cu.clone()).unwrap()).unwrap());
    for s in 0..cu.len() - 1 {
        let (a, b) = (cu[s], cu[s + 1]);
        if a == b {
            continue;
        }
        let one = values(layer.forward(x.clone().slice([0..1, a..b, 0..16])).unwrap());
        assert_close(&format!("sequence {s}"), &packed[a * 16..b * 16], &one, 1e-5, 1e-6);
    }
    let e = layer.forward_varlen(x.clone(), &VarLen::new(vec![0, 4, 19]).unwrap()).unwrap_err();
    assert!(e.to_string().contains("varlen"), "{e}");
    let e = layer.forward_varlen(x, &VarLen::cross(vec![0, 4, 20], vec![0, 5, 20]).unwrap()).unwrap_err();
    assert!(e.to_string().contains("varlen"), "{e}");
}
