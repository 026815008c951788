//! f64 finite-difference checks of every reference's gradients (docs/testing.md section 2: the
//! references' gradients are checked against central finite differences on tiny shapes).
//!
//! Losses are `sum(output * R)` with a fixed random `R`, so every output direction is probed.
//! Routing (MoBA, NSA top-n, Seer, DMA top-w) is piecewise constant: inputs are random
//! normals, far from ties at the scale of the 1e-6 step.

use burn::module::{Param, ParamId};
use burn::nn::Linear;
use burn::tensor::Tensor;
use burn_sparse_attn::attention::{
    AttentionOptions, KeepThreshold, KeyBias, attention, attention_with_bias,
};
use burn_sparse_attn::block_sparse::{BlockSelection, block_sparse_attention, block_sparse_attention_with_bias};
use burn_sparse_attn::dma::{DmaParams, dma_attention, dma_bias};
use burn_sparse_attn::moba::{MobaParams, moba_attention};
use burn_sparse_attn::nsa::{CompressionMlp, NsaInputs, NsaParams, compress_mean, nsa_attention, num_compressed};
use burn_sparse_attn::seer::{AttnGate, seer_attention_target, seer_gate_loss};
use burn_sparse_attn::{
    DenseAttentionConfig, DmaAttentionConfig, MobaAttentionConfig, NsaAttentionConfig, SeerAttentionConfig,
};
use sparse_attn_tests::*;

/// `sum(out * w)` with `w` built on `out`'s device.
fn weighted<const D: usize>(out: Tensor<D>, w: &[f64]) -> Tensor<1> {
    let w = tensor(w.to_vec(), out.dims(), &out.device());
    (out * w).sum()
}

fn r4(t: &Tensor<1>, s: [usize; 4]) -> Tensor<4> {
    t.clone().reshape(s)
}

fn r3(t: &Tensor<1>, s: [usize; 3]) -> Tensor<3> {
    t.clone().reshape(s)
}

fn qkv_inputs(rng: &mut Rng, d: &Dims) -> Vec<Vec<f64>> {
    let nq = d.q_shape().iter().product();
    let nk = d.kv_shape().iter().product();
    vec![rng.normals(nq, 1.0), rng.normals(nk, 1.0), rng.normals(nk, 1.0)]
}

fn fd() -> FdConfig {
    FdConfig::default()
}

// ------------------------------------------------------------------------------------------
// Dense attention
// ------------------------------------------------------------------------------------------

#[test]
fn dense_causal_grads_q_k_v() {
    let mut rng = Rng::new(1);
    let d = Dims::new(2, 2, 2, 5, 5, 3);
    let inputs = qkv_inputs(&mut rng, &d);
    let w = rng.normals(d.q_shape().iter().product(), 1.0);
    grad_check("dense causal", &["q", "k", "v"], &inputs, &[true; 3], fd(), |x| {
        let out = attention(r4(&x[0], d.q_shape()), r4(&x[1], d.kv_shape()), r4(&x[2], d.kv_shape()), &AttentionOptions::causal())
            .unwrap();
        weighted(out.output, &w)
    });
}

#[test]
fn dense_gqa_window_short_queries_bias_grads() {
    // GQA (4 query heads on 2 kv heads), seq_q < seq_k, window 3, per-kv-head bias.
    let mut rng = Rng::new(2);
    let d = Dims::new(1, 4, 2, 3, 6, 4);
    let mut inputs = qkv_inputs(&mut rng, &d);
    inputs.push(rng.normals(d.b * d.hkv * d.sk, 1.0));
    let w = rng.normals(d.q_shape().iter().product(), 1.0);
    let opts = AttentionOptions::causal().with_window(3);
    grad_check("dense gqa window bias", &["q", "k", "v", "bias"], &inputs, &[true; 4], fd(), |x| {
        let bias = KeyBias { values: r3(&x[3], [d.b, d.hkv, d.sk]), keep: None };
        let out = attention_with_bias(r4(&x[0], d.q_shape()), r4(&x[1], d.kv_shape()), r4(&x[2], d.kv_shape()), &bias, &opts)
            .unwrap();
        weighted(out.output, &w)
    });
}

#[test]
fn dense_mqa_long_queries_headwise_bias_keep_scale_grads() {
    // MQA, seq_q > seq_k (the first rows see no key), per-query-head bias with a keep rule,
    // explicit scale.
    let mut rng = Rng::new(3);
    let d = Dims::new(1, 2, 1, 6, 4, 3);
    let mut inputs = qkv_inputs(&mut rng, &d);
    let bias_vals = rng.normals(d.b * d.hq * d.sk, 1.0);
    inputs.push(bias_vals);
    let thr: Vec<f64> = (0..d.b * d.hq * d.sq).map(|_| rng.range(-1.5, 0.0)).collect();
    let idx: Vec<i64> = (0..d.b * d.hq * d.sq).map(|_| rng.below(d.sk) as i64).collect();
    let w = rng.normals(d.q_shape().iter().product(), 1.0);
    let opts = AttentionOptions::causal().with_scale(0.7);
    grad_check("dense mqa keep", &["q", "k", "v", "bias"], &inputs, &[true; 4], fd(), |x| {
        let device = x[0].device();
        let keep = KeepThreshold {
            value: tensor(thr.clone(), [d.b, d.hq, d.sq], &device),
            index: int_tensor(idx.clone(), [d.b, d.hq, d.sq], &device),
        };
        let bias = KeyBias { values: r3(&x[3], [d.b, d.hq, d.sk]), keep: Some(keep) };
        let out = attention_with_bias(r4(&x[0], d.q_shape()), r4(&x[1], d.kv_shape()), r4(&x[2], d.kv_shape()), &bias, &opts)
            .unwrap();
        weighted(out.output, &w)
    });
}

#[test]
fn dense_full_window_grads() {
    // Non-causal with a window: future keys visible, old ones cut.
    let mut rng = Rng::new(4);
    let d = Dims::new(1, 2, 1, 5, 5, 2);
    let inputs = qkv_inputs(&mut rng, &d);
    let w = rng.normals(d.q_shape().iter().product(), 1.0);
    let opts = AttentionOptions::full().with_window(2);
    grad_check("dense full window", &["q", "k", "v"], &inputs, &[true; 3], fd(), |x| {
        let out = attention(r4(&x[0], d.q_shape()), r4(&x[1], d.kv_shape()), r4(&x[2], d.kv_shape()), &opts).unwrap();
        weighted(out.output, &w)
    });
}

// ------------------------------------------------------------------------------------------
// Block-sparse attention
// ------------------------------------------------------------------------------------------

#[test]
fn block_sparse_per_token_kv_head_lists_grads() {
    let mut rng = Rng::new(5);
    let d = Dims::new(1, 4, 2, 7, 7, 3);
    let inputs = qkv_inputs(&mut rng, &d);
    let (kb, cap) = (2usize, 2usize);
    let nkb = d.sk.div_ceil(kb) as i64;
    let idx: Vec<i64> = (0..d.b * d.hkv * d.sq * cap).map(|_| rng.below(nkb as usize + 1) as i64 - 1).collect();
    let w = rng.normals(d.q_shape().iter().product(), 1.0);
    grad_check("block sparse per token", &["q", "k", "v"], &inputs, &[true; 3], fd(), |x| {
        let sel = BlockSelection::per_token(int_tensor(idx.clone(), [d.b, d.hkv, d.sq, cap], &x[0].device()), kb);
        let out = block_sparse_attention(r4(&x[0], d.q_shape()), r4(&x[1], d.kv_shape()), r4(&x[2], d.kv_shape()), &sel, &AttentionOptions::causal())
            .unwrap();
        weighted(out.output, &w)
    });
}

#[test]
fn block_sparse_per_query_block_q_head_lists_bias_grads() {
    let mut rng = Rng::new(6);
    let d = Dims::new(2, 2, 1, 7, 7, 3);
    let mut inputs = qkv_inputs(&mut rng, &d);
    inputs.push(rng.normals(d.b * d.hkv * d.sk, 1.0));
    let (qb, kb, cap) = (3usize, 2usize, 3usize);
    let rows = d.sq.div_ceil(qb);
    let nkb = d.sk.div_ceil(kb);
    let idx: Vec<i64> = (0..d.b * d.hq * rows * cap).map(|_| rng.below(nkb + 1) as i64 - 1).collect();
    let w = rng.normals(d.q_shape().iter().product(), 1.0);
    grad_check("block sparse per query block", &["q", "k", "v", "bias"], &inputs, &[true; 4], fd(), |x| {
        let sel = BlockSelection::per_query_block(int_tensor(idx.clone(), [d.b, d.hq, rows, cap], &x[0].device()), qb, kb);
        let bias = KeyBias { values: r3(&x[3], [d.b, d.hkv, d.sk]), keep: None };
        let out = block_sparse_attention_with_bias(
            r4(&x[0], d.q_shape()),
            r4(&x[1], d.kv_shape()),
            r4(&x[2], d.kv_shape()),
            &sel,
            &bias,
            &AttentionOptions::causal(),
        )
        .unwrap();
        weighted(out.output, &w)
    });
}

// ------------------------------------------------------------------------------------------
// MoBA
// ------------------------------------------------------------------------------------------

#[test]
fn moba_grads_gqa_ragged() {
    let mut rng = Rng::new(7);
    let d = Dims::new(1, 2, 1, 9, 9, 4);
    let inputs = qkv_inputs(&mut rng, &d);
    let w = rng.normals(d.q_shape().iter().product(), 1.0);
    let params = MobaParams { block_size: 2, top_k: 2, scale: None };
    grad_check("moba", &["q", "k", "v"], &inputs, &[true; 3], fd(), |x| {
        let out = moba_attention(r4(&x[0], d.q_shape()), r4(&x[1], d.kv_shape()), r4(&x[2], d.kv_shape()), &params).unwrap();
        weighted(out.attention.output, &w)
    });
}

#[test]
fn moba_grads_short_queries() {
    let mut rng = Rng::new(8);
    let d = Dims::new(1, 2, 2, 4, 9, 3);
    let inputs = qkv_inputs(&mut rng, &d);
    let w = rng.normals(d.q_shape().iter().product(), 1.0);
    let params = MobaParams { block_size: 3, top_k: 2, scale: Some(0.9) };
    grad_check("moba short q", &["q", "k", "v"], &inputs, &[true; 3], fd(), |x| {
        let out = moba_attention(r4(&x[0], d.q_shape()), r4(&x[1], d.kv_shape()), r4(&x[2], d.kv_shape()), &params).unwrap();
        weighted(out.attention.output, &w)
    });
}

// ------------------------------------------------------------------------------------------
// NSA
// ------------------------------------------------------------------------------------------

fn small_nsa_params() -> NsaParams {
    NsaParams { compress_block: 4, compress_stride: 2, select_block: 2, top_n: 4, window: 3, scale: None, ..NsaParams::default() }
}

#[test]
fn nsa_full_forward_grads_all_inputs() {
    let mut rng = Rng::new(9);
    let (b, hq, hkv, s, dh) = (1, 4, 2, 11, 4);
    let p = small_nsa_params();
    let nc = num_compressed(s, p.compress_block, p.compress_stride);
    assert_eq!(nc, 4);
    let qs = [b, hq, s, dh];
    let cs = [b, hkv, nc, dh];
    let ks = [b, hkv, s, dh];
    let gs = [b, hq, s, 3];
    let n = |s: [usize; 4]| s.iter().product::<usize>();
    let inputs = vec![
        rng.normals(n(qs), 1.0),
        rng.normals(n(cs), 1.0),
        rng.normals(n(cs), 1.0),
        rng.normals(n(ks), 1.0),
        rng.normals(n(ks), 1.0),
        rng.normals(n(ks), 1.0),
        rng.normals(n(ks), 1.0),
        (0..n(gs)).map(|_| rng.range(0.1, 0.9)).collect(),
    ];
    let w = rng.normals(n(qs), 1.0);
    let names = ["q", "k_cmp", "v_cmp", "k_slc", "v_slc", "k_win", "v_win", "gates"];
    let cfg = FdConfig { samples: 16, ..fd() };
    grad_check("nsa", &names, &inputs, &[true; 8], cfg, |x| {
        let inputs = NsaInputs {
            q: r4(&x[0], qs),
            k_cmp: r4(&x[1], cs),
            v_cmp: r4(&x[2], cs),
            k_slc: r4(&x[3], ks),
            v_slc: r4(&x[4], ks),
            k_win: r4(&x[5], ks),
            v_win: r4(&x[6], ks),
            gates: r4(&x[7], gs),
        };
        weighted(nsa_attention(inputs, &p).unwrap().output, &w)
    });
}

#[test]
fn nsa_compression_mlp_grads_input_and_params() {
    let mut rng = Rng::new(10);
    let (b, h, s, dh, block, stride, hidden) = (1, 2, 10, 4, 4, 2, 6);
    let nc = num_compressed(s, block, stride);
    let inputs = vec![
        rng.normals(b * h * s * dh, 1.0),
        rng.normals(block * dh, 0.3),
        rng.normals(block * dh * hidden, 0.3),
        rng.normals(hidden, 0.3),
        rng.normals(hidden * dh, 0.3),
        rng.normals(dh, 0.3),
    ];
    let w = rng.normals(b * h * nc * dh, 1.0);
    let names = ["x", "pos_emb", "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"];
    grad_check("compression mlp", &names, &inputs, &[true; 6], fd(), |x| {
        let lin = |wt: &Tensor<1>, bs: &Tensor<1>, i: usize, o: usize| Linear {
            weight: Param::initialized(ParamId::new(), wt.clone().reshape([i, o])),
            bias: Some(Param::initialized(ParamId::new(), bs.clone())),
        };
        let mlp = CompressionMlp {
            pos_emb: Param::initialized(ParamId::new(), x[1].clone().reshape([block, dh])),
            fc1: lin(&x[2], &x[3], block * dh, hidden),
            fc2: lin(&x[4], &x[5], hidden, dh),
        };
        weighted(mlp.forward(r4(&x[0], [b, h, s, dh]), stride).unwrap(), &w)
    });
}

#[test]
fn nsa_compress_mean_grads() {
    let mut rng = Rng::new(11);
    let (b, h, s, dh) = (1, 2, 9, 3);
    let inputs = vec![rng.normals(b * h * s * dh, 1.0)];
    let nc = num_compressed(s, 4, 2);
    let w = rng.normals(b * h * nc * dh, 1.0);
    grad_check("compress mean", &["x"], &inputs, &[true], fd(), |x| weighted(compress_mean(r4(&x[0], [b, h, s, dh]), 4, 2).unwrap(), &w));
}

/// Windows whose block is not a multiple of the stride are cut by an index gather (the others
/// by stride-chunk slices, checked above): its backward scatters into overlapping keys.
#[test]
fn nsa_compress_mean_grads_block_not_multiple_of_stride() {
    let mut rng = Rng::new(12);
    let (b, h, s, dh) = (1, 2, 11, 3);
    let inputs = vec![rng.normals(b * h * s * dh, 1.0)];
    let nc = num_compressed(s, 5, 2);
    let w = rng.normals(b * h * nc * dh, 1.0);
    grad_check("compress mean 5/2", &["x"], &inputs, &[true], fd(), |x| weighted(compress_mean(r4(&x[0], [b, h, s, dh]), 5, 2).unwrap(), &w));
}

fn module_input(rng: &mut Rng, shape: [usize; 3]) -> (Tensor<3>, Vec<f64>) {
    let x = tensor(rng.normals(shape.iter().product(), 1.0), shape, &ad_dev());
    let w = rng.normals(shape.iter().product(), 1.0);
    (x, w)
}

#[test]
fn nsa_module_grads_compression_mlp_gate_and_projections() {
    let mut rng = Rng::new(12);
    let cfg = NsaAttentionConfig::new(8, 2)
        .with_n_kv_heads(Some(1))
        .with_compress_block(4)
        .with_compress_stride(2)
        .with_compress_hidden(Some(8))
        .with_select_block(4)
        .with_top_n(2)
        .with_window(4);
    let m = module_to_f64(randomize_params(cfg.init(&ad_dev()).unwrap(), 120, 0.3));
    let (x, w) = module_input(&mut rng, [1, 10, 8]);
    let paths = [
        "compress_key.Mlp.pos_emb",
        "compress_key.Mlp.fc1.weight",
        "compress_key.Mlp.fc2.bias",
        "compress_value.Mlp.fc1.bias",
        "compress_value.Mlp.fc2.weight",
        "gate.weight",
        "gate.bias",
        // The packed input projection, branch by branch (head dim 4): q, k, v, then the
        // compression branch's k and v, then the window branch's.
        "proj.in_proj.weight[0..8]",
        "proj.in_proj.weight[8..12]",
        "proj.in_proj.weight[12..16]",
        "proj.in_proj.weight[16..20]",
        "proj.in_proj.weight[20..24]",
        "proj.in_proj.weight[24..28]",
        "proj.in_proj.weight[28..32]",
        "proj.output.weight",
    ];
    module_grad_check("nsa module", &m, &paths, FdConfig { samples: 5, ..fd() }, |m| weighted(m.forward(x.clone()).unwrap(), &w));
}

// ------------------------------------------------------------------------------------------
// SeerAttention
// ------------------------------------------------------------------------------------------

fn seer_gate_case(head_dim: usize, hidden: usize, seed: u64) {
    seer_gate_case_keys(head_dim, hidden, seed, false);
}

/// `kv_keys`: the key map has one head per kv head ([`AttnGate::new_kv_keys`]).
fn seer_gate_case_keys(head_dim: usize, hidden: usize, seed: u64, kv_keys: bool) {
    let mut rng = Rng::new(seed);
    let (b, hq, hkv, s, bs) = (1, 2, 1, 7, 2);
    let ad = ad_dev();
    let gate = if kv_keys {
        AttnGate::new_kv_keys(hq, hkv, head_dim, bs, hidden, 10000.0, &ad).unwrap()
    } else {
        AttnGate::new(hq, head_dim, bs, hidden, 10000.0, &ad).unwrap()
    };
    let gate = module_to_f64(gate);
    // Larger weights than the 0.02 init, so that the gate is far from uniform.
    let gate = gate_scaled(gate, &mut rng);
    let q = rng.randn([b, hq, s, head_dim], 1.0, &ad);
    let k = rng.randn([b, hkv, s, head_dim], 1.0, &ad);
    let v = rng.randn([b, hkv, s, head_dim], 1.0, &ad);
    let (target, _) = seer_attention_target(q.clone(), k.clone(), v, bs, None).unwrap();
    let mut paths = vec!["k_proj.weight"];
    if head_dim != hidden {
        paths.push("q_proj.weight");
    }
    module_grad_check("seer gate loss", &gate, &paths, FdConfig { samples: 12, ..fd() }, |g| {
        seer_gate_loss(g.logits(q.clone(), k.clone()).unwrap(), target.clone(), 1).unwrap()
    });
}

fn gate_scaled(gate: AttnGate, rng: &mut Rng) -> AttnGate {
    let mut gate = gate;
    let w = gate.k_proj.weight.val();
    let dims = w.dims();
    let fresh = tensor(rng.normals(dims.iter().product(), 0.5), dims, &w.device()).require_grad();
    gate.k_proj.weight = Param::initialized(ParamId::new(), fresh);
    if let Some(p) = gate.q_proj.as_mut() {
        let w = p.weight.val();
        let dims = w.dims();
        let fresh = tensor(rng.normals(dims.iter().product(), 0.5), dims, &w.device()).require_grad();
        p.weight = Param::initialized(ParamId::new(), fresh);
    }
    gate
}

#[test]
fn seer_gate_loss_grads_wrt_gate_weights() {
    seer_gate_case(4, 6, 13);
}

#[test]
fn seer_gate_loss_grads_without_q_proj() {
    seer_gate_case(4, 4, 14);
}

#[test]
fn seer_gate_loss_grads_with_kv_head_key_maps() {
    // Two query heads share one kv head and its key map: the shared weights' gradient is the
    // sum over the group.
    seer_gate_case_keys(4, 6, 131, true);
}

#[test]
fn seer_module_gate_loss_trains_only_the_gate() {
    let mut rng = Rng::new(15);
    let cfg = SeerAttentionConfig::new(8, 2).with_n_kv_heads(Some(1)).with_block_size(2).with_gate_hidden(6).with_top_k(Some(2));
    let m = module_to_f64(randomize_params(cfg.init(&ad_dev()).unwrap(), 150, 0.3));
    let (x, w) = module_input(&mut rng, [1, 7, 8]);
    module_grad_check("seer module gate loss", &m, &["gate.k_proj.weight", "gate.q_proj.weight"], FdConfig { samples: 8, ..fd() }, |m| {
        m.forward_with_gate_loss(x.clone()).unwrap().1
    });
    // The gate loss reaches no projection, and the sparse output reaches no gate weight.
    let loss = m.forward_with_gate_loss(x.clone()).unwrap().1;
    let grads = loss.backward();
    for (path, g) in module_grads(&m, &grads) {
        if path.starts_with("proj.") {
            assert!(g.is_none_or(|g| g.iter().all(|v| *v == 0.0)), "gate loss leaked into {path}");
        }
    }
    let out = weighted(m.forward(x.clone()).unwrap(), &w);
    let grads = out.backward();
    for (path, g) in module_grads(&m, &grads) {
        if path.starts_with("gate.") {
            assert!(g.is_none_or(|g| g.iter().all(|v| *v == 0.0)), "attention output leaked into {path}");
        } else {
            assert!(g.is_some_and(|g| g.iter().any(|v| *v != 0.0)), "no output gradient for {path}");
        }
    }
    module_grad_check("seer module output", &m, &["proj.in_proj.weight[0..8]", "proj.in_proj.weight[12..16]"], FdConfig { samples: 6, ..fd() }, |m| {
        weighted(m.forward(x.clone()).unwrap(), &w)
    });
}

// ------------------------------------------------------------------------------------------
// DMA
// ------------------------------------------------------------------------------------------

/// DMA attention's gradients for q, k, v and the bias, causal or not.
fn dma_attention_grads(seed: u64, d: Dims, window: usize, causal: bool) {
    let mut rng = Rng::new(seed);
    let mut inputs = qkv_inputs(&mut rng, &d);
    inputs.push(rng.normals(d.b * d.hkv * d.sk, 1.0));
    let w = rng.normals(d.q_shape().iter().product(), 1.0);
    let params = DmaParams { window, scale: None, causal };
    grad_check(&format!("dma attention, causal {causal}"), &["q", "k", "v", "bias"], &inputs, &[true; 4], fd(), |x| {
        let out = dma_attention(
            r4(&x[0], d.q_shape()),
            r4(&x[1], d.kv_shape()),
            r4(&x[2], d.kv_shape()),
            r3(&x[3], [d.b, d.hkv, d.sk]),
            &params,
        )
        .unwrap();
        weighted(out.output, &w)
    });
}

#[test]
fn dma_attention_grads_q_k_v_bias() {
    dma_attention_grads(16, Dims::new(1, 2, 1, 8, 8, 3), 3, true);
}

#[test]
fn dma_non_causal_attention_grads_q_k_v_bias() {
    dma_attention_grads(161, Dims::new(1, 2, 1, 5, 8, 3), 3, false);
}

fn f64_linear(w: &Tensor<1>, i: usize, o: usize) -> Linear {
    Linear { weight: Param::initialized(ParamId::new(), w.clone().reshape([i, o])), bias: None }
}

#[test]
fn dma_bias_grads_v_dt_proj_a() {
    let mut rng = Rng::new(17);
    let (b, h, s, dh) = (1, 2, 6, 3);
    let inputs = vec![rng.normals(b * h * s * dh, 1.0), rng.normals(h * dh * h, 0.5), rng.normals(h, 1.0)];
    let w = rng.normals(b * h * s, 1.0);
    grad_check("dma bias", &["v", "dt_proj.weight", "a"], &inputs, &[true; 3], fd(), |x| {
        weighted(dma_bias(r4(&x[0], [b, h, s, dh]), &f64_linear(&x[1], h * dh, h), x[2].clone()).unwrap(), &w)
    });
}

#[test]
fn dma_end_to_end_grads_through_bias() {
    let mut rng = Rng::new(18);
    let d = Dims::new(1, 4, 2, 8, 8, 3);
    let mut inputs = qkv_inputs(&mut rng, &d);
    inputs.push(rng.normals(d.hkv * d.d * d.hkv, 0.5));
    inputs.push(rng.normals(d.hkv, 1.0));
    let w = rng.normals(d.q_shape().iter().product(), 1.0);
    let params = DmaParams { window: 4, ..DmaParams::default() };
    grad_check("dma end to end", &["q", "k", "v", "dt_proj.weight", "a"], &inputs, &[true; 5], fd(), |x| {
        let v = r4(&x[2], d.kv_shape());
        let bias = dma_bias(v.clone(), &f64_linear(&x[3], d.hkv * d.d, d.hkv), x[4].clone()).unwrap();
        let out = dma_attention(r4(&x[0], d.q_shape()), r4(&x[1], d.kv_shape()), v, bias, &params).unwrap();
        weighted(out.output, &w)
    });
}

#[test]
fn dma_module_grads_dt_proj_and_a() {
    let mut rng = Rng::new(19);
    let ad = ad_dev();
    // Seeded parameters; A (0 at init) gets a random value too, so that the bias matters.
    let m = randomize_params(DmaAttentionConfig::new(8, 2).with_n_kv_heads(Some(1)).with_window(4).init(&ad).unwrap(), 190, 0.3);
    assert!(values(m.a.val())[0] != 0.0);
    let m = module_to_f64(m);
    let (x, w) = module_input(&mut rng, [1, 9, 8]);
    module_grad_check("dma module", &m, &["a", "dt_proj.weight", "proj.in_proj.weight[12..16]", "proj.in_proj.weight[8..12]"], FdConfig { samples: 6, ..fd() }, |m| {
        weighted(m.forward(x.clone()).unwrap(), &w)
    });
}

// ------------------------------------------------------------------------------------------
// Dense and MoBA modules
// ------------------------------------------------------------------------------------------

#[test]
fn dense_and_moba_module_grads() {
    let mut rng = Rng::new(20);
    let ad = ad_dev();
    let dense = module_to_f64(randomize_params(DenseAttentionConfig::new(8, 2).with_n_kv_heads(Some(1)).with_window(Some(4)).init(&ad).unwrap(), 200, 0.3));
    let (x, w) = module_input(&mut rng, [2, 7, 8]);
    // q, k, v of the packed input projection (head dim 4; dense has one kv head, MoBA two).
    let paths = ["proj.in_proj.weight[0..8]", "proj.in_proj.weight[8..12]", "proj.in_proj.weight[12..16]", "proj.output.weight"];
    module_grad_check("dense module", &dense, &paths, FdConfig { samples: 5, ..fd() }, |m| weighted(m.forward(x.clone()).unwrap(), &w));
    let moba = module_to_f64(randomize_params(MobaAttentionConfig::new(8, 2).with_block_size(2).with_top_k(2).init(&ad).unwrap(), 201, 0.3));
    let paths = ["proj.in_proj.weight[0..8]", "proj.in_proj.weight[8..16]", "proj.in_proj.weight[16..24]", "proj.output.weight"];
    module_grad_check("moba module", &moba, &paths, FdConfig { samples: 5, ..fd() }, |m| weighted(m.forward(x.clone()).unwrap(), &w));
}
