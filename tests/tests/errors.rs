//! Bad input returns a `SparseAttnError` naming the offending argument (never a panic).

use burn::nn::LinearConfig;
use burn::tensor::{Int, Tensor};
use burn_sparse_attn::attention::{AttentionOptions, KeepThreshold, KeyBias, attention, attention_with_bias};
use burn_sparse_attn::block_sparse::{BlockSelection, block_sparse_attention};
use burn_sparse_attn::dma::{DmaParams, dma_attention, dma_bias, dma_keep_threshold};
use burn_sparse_attn::moba::{MobaParams, block_mean_keys, moba_attention, moba_gate_scores, moba_select};
use burn_sparse_attn::nsa::compression::compression_windows;
use burn_sparse_attn::nsa::{
    NsaBlocks, nsa_attention_with,
    CompressionMlpConfig, NsaInputs, NsaParams, nsa_attention, nsa_select, nsa_selection_scores, num_compressed,
};
use burn_sparse_attn::rope::apply_rope;
use burn_sparse_attn::seer::{AttnGate, seer_attention_target, seer_gate_loss, seer_select_threshold, seer_select_topk};
use burn_sparse_attn::{
    DenseAttentionConfig, DmaAttentionConfig, MobaAttentionConfig, NsaAttentionConfig, SeerAttentionConfig, SparseAttnError,
};
use sparse_attn_tests::*;

/// Random f32 tensors (the modules and layers built here are f32).
fn r<const D: usize>(rng: &mut Rng, shape: [usize; D]) -> Tensor<D> {
    tensor_f32(rng.normals(shape.iter().product(), 1.0), shape, &dev())
}

// ------------------------------------------------------------------------------------------
// Shared q/k/v validation (dense attention)
// ------------------------------------------------------------------------------------------

#[test]
fn attention_qkv_mismatches_name_k_or_v() {
    let mut rng = Rng::new(400);
    let q = r(&mut rng, [1, 4, 5, 3]);
    let opts = AttentionOptions::causal();
    let ok = (r(&mut rng, [1, 2, 6, 3]), r(&mut rng, [1, 2, 6, 3]));
    assert!(attention(q.clone(), ok.0.clone(), ok.1.clone(), &opts).is_ok());
    let k = r(&mut rng, [2, 2, 6, 3]);
    assert_shape_err("batch of k", attention(q.clone(), k.clone(), k, &opts), &["k"]);
    let k = r(&mut rng, [1, 2, 6, 4]);
    assert_shape_err("head_dim of k", attention(q.clone(), k.clone(), k, &opts), &["k"]);
    let k = r(&mut rng, [1, 3, 6, 3]);
    assert_shape_err("heads_q % heads_kv", attention(q.clone(), k.clone(), k, &opts), &["k"]);
    assert_shape_err("v seq", attention(q.clone(), ok.0.clone(), r(&mut rng, [1, 2, 7, 3]), &opts), &["v"]);
    assert_shape_err("v heads", attention(q.clone(), ok.0.clone(), r(&mut rng, [1, 1, 6, 3]), &opts), &["v"]);
    assert_shape_err("v head_dim", attention(q.clone(), ok.0.clone(), r(&mut rng, [1, 2, 6, 5]), &opts), &["v"]);
    // The message names the argument.
    let e = expect_err("display", attention(q, ok.0, r(&mut rng, [1, 2, 7, 3]), &opts));
    assert!(e.to_string().contains("`v`"), "{e}");
}

#[test]
fn attention_option_errors() {
    let mut rng = Rng::new(401);
    let (q, k, v) = (r(&mut rng, [1, 2, 4, 3]), r(&mut rng, [1, 2, 4, 3]), r(&mut rng, [1, 2, 4, 3]));
    assert_param_err("window 0", attention(q.clone(), k.clone(), v.clone(), &AttentionOptions::causal().with_window(0)), &["window"]);
    assert_param_err("scale nan", attention(q.clone(), k.clone(), v.clone(), &AttentionOptions::causal().with_scale(f64::NAN)), &["scale"]);
    assert_param_err("scale inf", attention(q, k, v, &AttentionOptions::causal().with_scale(f64::INFINITY)), &["scale"]);
}

#[test]
fn attention_bias_and_keep_shape_errors() {
    let mut rng = Rng::new(402);
    let (q, k, v) = (r(&mut rng, [2, 4, 5, 3]), r(&mut rng, [2, 2, 6, 3]), r(&mut rng, [2, 2, 6, 3]));
    let opts = AttentionOptions::causal();
    let run = |bias: KeyBias| attention_with_bias(q.clone(), k.clone(), v.clone(), &bias, &opts);
    let mut rng2 = Rng::new(403);
    let mut bias = |shape: [usize; 3]| KeyBias { values: r(&mut rng2, shape), keep: None };
    assert!(run(bias([2, 2, 6])).is_ok());
    assert!(run(bias([2, 4, 6])).is_ok());
    assert_shape_err("bias heads", run(bias([2, 3, 6])), &["bias"]);
    assert_shape_err("bias seq", run(bias([2, 2, 5])), &["bias"]);
    assert_shape_err("bias batch", run(bias([1, 2, 6])), &["bias"]);
    let keep = |vs: [usize; 3], is: [usize; 3]| KeepThreshold { value: tensor_f32(vec![0.0; vs.iter().product()], vs, &dev()), index: int_tensor(vec![0; is.iter().product()], is, &dev()) };
    let with_keep = |k: KeepThreshold| KeyBias { values: tensor_f32(vec![0.1; 2 * 2 * 6], [2, 2, 6], &dev()), keep: Some(k) };
    assert!(run(with_keep(keep([2, 2, 5], [2, 2, 5]))).is_ok());
    assert_shape_err("keep.value seq", run(with_keep(keep([2, 2, 6], [2, 2, 5]))), &["keep.value"]);
    assert_shape_err("keep.index heads", run(with_keep(keep([2, 2, 5], [2, 4, 5]))), &["keep.index"]);
}

// ------------------------------------------------------------------------------------------
// Block-sparse selections
// ------------------------------------------------------------------------------------------

#[test]
fn block_sparse_selection_errors() {
    let mut rng = Rng::new(404);
    let (q, k, v) = (r(&mut rng, [1, 4, 7, 3]), r(&mut rng, [1, 2, 7, 3]), r(&mut rng, [1, 2, 7, 3]));
    let opts = AttentionOptions::causal();
    let idx = |shape: [usize; 4]| int_tensor(vec![0; shape.iter().product()], shape, &dev());
    let run = |sel: BlockSelection| block_sparse_attention(q.clone(), k.clone(), v.clone(), &sel, &opts);
    assert!(run(BlockSelection::per_token(idx([1, 4, 7, 2]), 2)).is_ok());
    assert!(run(BlockSelection::per_token(idx([1, 2, 7, 2]), 2)).is_ok());
    assert!(run(BlockSelection::per_query_block(idx([1, 4, 3, 2]), 3, 2)).is_ok());
    assert_shape_err("rows per token", run(BlockSelection::per_token(idx([1, 4, 6, 2]), 2)), &["selection.indices"]);
    assert_shape_err("rows per query block", run(BlockSelection::per_query_block(idx([1, 4, 2, 2]), 3, 2)), &["selection.indices"]);
    assert_shape_err("heads", run(BlockSelection::per_token(idx([1, 3, 7, 2]), 2)), &["selection.indices"]);
    assert_shape_err("batch", run(BlockSelection::per_token(idx([2, 4, 7, 2]), 2)), &["selection.indices"]);
    assert_shape_err("capacity 0", run(BlockSelection::per_token(idx([1, 4, 7, 0]), 2)), &["selection.indices"]);
    assert_param_err("key_block 0", run(BlockSelection::per_token(idx([1, 4, 7, 2]), 0)), &["key_block"]);
    assert_param_err("query_block 0", run(BlockSelection::per_query_block(idx([1, 4, 7, 2]), 0, 2)), &["query_block"]);
    let k_bad = r(&mut rng, [1, 2, 7, 4]);
    assert_shape_err("q/k mismatch", block_sparse_attention(q.clone(), k_bad.clone(), k_bad, &BlockSelection::per_token(idx([1, 4, 7, 2]), 2), &opts), &["k"]);
}

// ------------------------------------------------------------------------------------------
// MoBA
// ------------------------------------------------------------------------------------------

#[test]
fn moba_errors() {
    let mut rng = Rng::new(405);
    let (q, k, v) = (r(&mut rng, [1, 2, 8, 4]), r(&mut rng, [1, 1, 8, 4]), r(&mut rng, [1, 1, 8, 4]));
    let p = |block_size, top_k| MobaParams { block_size, top_k, scale: None };
    assert!(moba_attention(q.clone(), k.clone(), v.clone(), &p(2, 2)).is_ok());
    assert_param_err("block 0", moba_attention(q.clone(), k.clone(), v.clone(), &p(0, 2)), &["block_size"]);
    assert_param_err("top_k 0", moba_attention(q.clone(), k.clone(), v.clone(), &p(2, 0)), &["top_k"]);
    let kb = r(&mut rng, [1, 1, 8, 3]);
    assert_shape_err("head_dim", moba_attention(q.clone(), kb.clone(), kb, &p(2, 2)), &["k"]);
    assert_shape_err("v", moba_attention(q.clone(), k.clone(), r(&mut rng, [1, 1, 7, 4]), &p(2, 2)), &["v"]);
    let k3 = r(&mut rng, [1, 3, 8, 4]);
    assert_shape_err("heads", moba_attention(q.clone(), k3.clone(), k3, &p(2, 2)), &["k"]);
    assert_param_err("select top_k 0", moba_select(q.clone(), k.clone(), 2, 0), &["top_k"]);
    assert_param_err("select block 0", moba_select(q.clone(), k.clone(), 0, 2), &["block_size"]);
    assert_param_err("gate block 0", moba_gate_scores(q, k.clone(), 0), &["block_size"]);
    assert_param_err("means block 0", block_mean_keys(k, 0), &["block_size"]);
}

// ------------------------------------------------------------------------------------------
// NSA
// ------------------------------------------------------------------------------------------

fn nsa_ok_params() -> NsaParams {
    NsaParams { compress_block: 4, compress_stride: 2, select_block: 4, top_n: 2, window: 4, scale: None, ..NsaParams::default() }
}

struct NsaCase {
    q: Tensor<4>,
    kc: Tensor<4>,
    vc: Tensor<4>,
    ks: Tensor<4>,
    vs: Tensor<4>,
    kw: Tensor<4>,
    vw: Tensor<4>,
    g: Tensor<4>,
}

impl NsaCase {
    fn new(rng: &mut Rng) -> Self {
        let nc = num_compressed(10, 4, 2);
        Self {
            q: r(rng, [1, 2, 10, 3]),
            kc: r(rng, [1, 1, nc, 3]),
            vc: r(rng, [1, 1, nc, 3]),
            ks: r(rng, [1, 1, 10, 3]),
            vs: r(rng, [1, 1, 10, 3]),
            kw: r(rng, [1, 1, 10, 3]),
            vw: r(rng, [1, 1, 10, 3]),
            g: r(rng, [1, 2, 10, 3]),
        }
    }
    fn inputs(&self) -> NsaInputs {
        NsaInputs {
            q: self.q.clone(),
            k_cmp: self.kc.clone(),
            v_cmp: self.vc.clone(),
            k_slc: self.ks.clone(),
            v_slc: self.vs.clone(),
            k_win: self.kw.clone(),
            v_win: self.vw.clone(),
            gates: self.g.clone(),
        }
    }
}

#[test]
fn nsa_param_errors() {
    let mut rng = Rng::new(406);
    let c = NsaCase::new(&mut rng);
    assert!(nsa_attention(c.inputs(), &nsa_ok_params()).is_ok());
    let run = |p: NsaParams| nsa_attention(c.inputs(), &p);
    let base = nsa_ok_params();
    assert_param_err("compress_block 0", run(NsaParams { compress_block: 0, ..base }), &["compress_block"]);
    assert_param_err("compress_stride 0", run(NsaParams { compress_stride: 0, ..base }), &["compress_stride"]);
    assert_param_err("stride > block", run(NsaParams { compress_stride: 5, ..base }), &["compress_stride"]);
    assert_param_err("select_block 0", run(NsaParams { select_block: 0, ..base }), &["select_block"]);
    assert_param_err("top_n 0", run(NsaParams { top_n: 0, ..base }), &["top_n"]);
    assert_param_err("validate", NsaParams { compress_stride: 8, ..base }.validate(), &["compress_stride"]);
}

#[test]
fn nsa_gates_and_compressed_count_errors() {
    let mut rng = Rng::new(407);
    let c = NsaCase::new(&mut rng);
    let p = nsa_ok_params();
    let mut i = c.inputs();
    i.gates = r(&mut rng, [1, 2, 10, 2]);
    assert_shape_err("gates last dim", nsa_attention(i, &p), &["gates"]);
    let mut i = c.inputs();
    i.gates = r(&mut rng, [1, 1, 10, 3]);
    assert_shape_err("gates heads", nsa_attention(i, &p), &["gates"]);
    let mut i = c.inputs();
    i.k_cmp = r(&mut rng, [1, 1, 3, 3]);
    i.v_cmp = r(&mut rng, [1, 1, 3, 3]);
    assert_shape_err("compressed count", nsa_attention(i, &p), &["k_cmp"]);
    // Functional pieces.
    let lse = r(&mut rng, [1, 2, 10]);
    assert_shape_err("lse shape", nsa_selection_scores(c.q.clone(), c.kc.clone(), r(&mut rng, [1, 2, 9]), 10, &p), &["lse_cmp"]);
    assert_shape_err("k_cmp count", nsa_selection_scores(c.q.clone(), r(&mut rng, [1, 1, 2, 3]), lse, 10, &p), &["k_cmp"]);
    assert_shape_err("scores shape", nsa_select(r(&mut rng, [1, 1, 10, 2]), 10, 10, &p), &["scores"]);
    assert_shape_err("scores rows", nsa_select(r(&mut rng, [1, 1, 9, 3]), 10, 10, &p), &["scores"]);
}

#[test]
fn nsa_given_blocks_and_counts_errors() {
    let mut rng = Rng::new(408);
    let c = NsaCase::new(&mut rng);
    let p = nsa_ok_params();
    let dev = c.q.device();
    let lists = |shape: [usize; 4]| Tensor::<4, Int>::zeros(shape, &dev);
    assert!(nsa_attention_with(c.inputs(), &p, NsaBlocks::Given(lists([1, 1, 10, 2])), None).is_ok());
    assert_shape_err("given lists rows", nsa_attention_with(c.inputs(), &p, NsaBlocks::Given(lists([1, 1, 9, 2])), None), &["blocks"]);
    assert_shape_err("given lists heads", nsa_attention_with(c.inputs(), &p, NsaBlocks::Given(lists([1, 2, 10, 2])), None), &["blocks"]);
    let counts = Tensor::<3, Int>::zeros([1, 1, 9], &dev);
    assert_shape_err("counts shape", nsa_attention_with(c.inputs(), &p, NsaBlocks::Computed, Some(counts)), &["counts"]);
}

#[test]
fn nsa_branch_input_errors_name_the_field() {
    // Each branch's k/v mismatch must name the `NsaInputs` field the caller has to fix.
    let mut rng = Rng::new(408);
    let c = NsaCase::new(&mut rng);
    let p = nsa_ok_params();
    let mut cases: Vec<(&str, NsaInputs)> = Vec::new();
    let mut i = c.inputs();
    i.k_cmp = r(&mut rng, [1, 1, 4, 2]);
    i.v_cmp = r(&mut rng, [1, 1, 4, 2]);
    cases.push(("k_cmp", i));
    let mut i = c.inputs();
    i.v_cmp = r(&mut rng, [1, 1, 4, 2]);
    cases.push(("v_cmp", i));
    let mut i = c.inputs();
    i.k_slc = r(&mut rng, [1, 1, 10, 2]);
    i.v_slc = r(&mut rng, [1, 1, 10, 2]);
    cases.push(("k_slc", i));
    let mut i = c.inputs();
    i.v_slc = r(&mut rng, [1, 1, 9, 3]);
    cases.push(("v_slc", i));
    let mut i = c.inputs();
    i.k_win = r(&mut rng, [1, 1, 10, 2]);
    i.v_win = r(&mut rng, [1, 1, 10, 2]);
    cases.push(("k_win", i));
    let mut i = c.inputs();
    i.v_win = r(&mut rng, [1, 1, 9, 3]);
    cases.push(("v_win", i));
    let mut wrong = Vec::new();
    for (field, inputs) in cases {
        match nsa_attention(inputs, &p) {
            Err(SparseAttnError::Shape { arg, .. }) if arg == field => {}
            Err(e) => wrong.push(format!("bad {field}: got {e:?}")),
            Ok(_) => wrong.push(format!("bad {field}: got Ok")),
        }
    }
    assert!(wrong.is_empty(), "NSA input errors that do not name the field:\n{}", wrong.join("\n"));
}

#[test]
fn nsa_compression_errors() {
    let mut rng = Rng::new(411);
    let x = r(&mut rng, [1, 2, 5, 3]);
    assert_param_err("too short", compression_windows(x.clone(), 8, 2), &["compress_block"]);
    assert_param_err("block 0", compression_windows(x.clone(), 0, 2), &["compress_block"]);
    assert_param_err("stride 0", compression_windows(x.clone(), 4, 0), &["compress_stride"]);
    let mlp = CompressionMlpConfig { block: 4, head_dim: 4, hidden: Some(8) }.init(&dev()).unwrap();
    assert_shape_err("mlp head_dim", mlp.forward(x, 2), &["x"]);
    assert_param_err("mlp block 0", CompressionMlpConfig { block: 0, head_dim: 4, hidden: None }.init(&dev()), &["compress_block"]);
    assert_param_err("mlp head_dim 0", CompressionMlpConfig { block: 4, head_dim: 0, hidden: None }.init(&dev()), &["head_dim"]);
    assert_param_err("mlp hidden 0", CompressionMlpConfig { block: 4, head_dim: 4, hidden: Some(0) }.init(&dev()), &["compress_hidden"]);
}

// ------------------------------------------------------------------------------------------
// SeerAttention
// ------------------------------------------------------------------------------------------

#[test]
fn seer_errors() {
    let mut rng = Rng::new(412);
    let device = dev();
    assert_param_err("gate block 0", AttnGate::new(2, 4, 0, 8, 1e4, &device), &["block_size"]);
    assert_param_err("gate hidden odd", AttnGate::new(2, 4, 2, 7, 1e4, &device), &["gate_hidden"]);
    assert_param_err("gate hidden 0", AttnGate::new(2, 4, 2, 0, 1e4, &device), &["gate_hidden"]);
    use burn_sparse_attn::seer::GatePool;
    assert_param_err("gate q pool empty", AttnGate::with_pooling(2, 2, 4, 2, 8, 1e4, &[], &[GatePool::Avg], &device), &["q_pool"]);
    assert_param_err("gate k pool empty", AttnGate::with_pooling(2, 2, 4, 2, 8, 1e4, &[GatePool::Avg], &[], &device), &["k_pool"]);
    assert_param_err("gate key heads", AttnGate::with_pooling(4, 3, 4, 2, 8, 1e4, &[GatePool::Avg], &[GatePool::Avg], &device), &["heads_kv"]);
    let gate = AttnGate::new(2, 4, 2, 8, 1e4, &device).unwrap();
    let k = r(&mut rng, [1, 1, 6, 4]);
    assert!(gate.logits(r(&mut rng, [1, 2, 6, 4]), k.clone()).is_ok());
    assert_shape_err("gate heads", gate.logits(r(&mut rng, [1, 4, 6, 4]), k.clone()), &["q"]);
    assert_shape_err("gate head_dim", gate.logits(r(&mut rng, [1, 2, 6, 3]), r(&mut rng, [1, 1, 6, 3])), &["q"]);
    assert_shape_err("gate q/k", gate.logits(r(&mut rng, [1, 2, 6, 4]), r(&mut rng, [1, 1, 6, 2])), &["k"]);
    let logits = r(&mut rng, [1, 2, 3, 3]);
    assert_shape_err("loss target", seer_gate_loss(logits.clone(), r(&mut rng, [1, 2, 3, 2]), 0), &["target"]);
    assert_param_err("topk 0", seer_select_topk(logits.clone(), 0, 2), &["top_k"]);
    assert_param_err("topk block 0", seer_select_topk(logits.clone(), 1, 0), &["block_size"]);
    assert_param_err("threshold block 0", seer_select_threshold(logits, 0.1, 0), &["block_size"]);
    let q = r(&mut rng, [1, 2, 6, 4]);
    assert_param_err("target block 0", seer_attention_target(q.clone(), k.clone(), k.clone(), 0, None), &["block_size"]);
    assert_shape_err("target v", seer_attention_target(q, k.clone(), r(&mut rng, [1, 1, 5, 4]), 2, None), &["v"]);
}

// ------------------------------------------------------------------------------------------
// DMA
// ------------------------------------------------------------------------------------------

#[test]
fn dma_errors() {
    let mut rng = Rng::new(413);
    let (q, k, v) = (r(&mut rng, [1, 4, 6, 3]), r(&mut rng, [1, 2, 6, 3]), r(&mut rng, [1, 2, 6, 3]));
    let p = |window| DmaParams { window, ..DmaParams::default() };
    assert!(dma_attention(q.clone(), k.clone(), v.clone(), r(&mut rng, [1, 2, 6]), &p(2)).is_ok());
    assert_param_err("window 0", dma_attention(q.clone(), k.clone(), v.clone(), r(&mut rng, [1, 2, 6]), &p(0)), &["window"]);
    assert_param_err("keep window 0", dma_keep_threshold(&r(&mut rng, [1, 2, 6]), 6, 0, true), &["window"]);
    assert_shape_err("bias heads", dma_attention(q.clone(), k.clone(), v.clone(), r(&mut rng, [1, 3, 6]), &p(2)), &["bias"]);
    assert_shape_err("bias seq", dma_attention(q.clone(), k.clone(), v.clone(), r(&mut rng, [1, 2, 5]), &p(2)), &["bias"]);
    assert_shape_err("bias seq long", dma_attention(q.clone(), k.clone(), v.clone(), r(&mut rng, [1, 2, 9]), &p(2)), &["bias"]);
    assert_shape_err("bias batch", dma_attention(q.clone(), k.clone(), v.clone(), r(&mut rng, [2, 2, 6]), &p(2)), &["bias"]);
    let kb = r(&mut rng, [1, 2, 6, 2]);
    assert_shape_err("q/k", dma_attention(q, kb.clone(), kb, r(&mut rng, [1, 2, 6]), &p(2)), &["k"]);
    let lin = LinearConfig::new(6, 2).with_bias(false).init(&dev());
    assert!(dma_bias(v.clone(), &lin, r(&mut rng, [2])).is_ok());
    let bad = LinearConfig::new(6, 3).with_bias(false).init(&dev());
    assert_shape_err("dt_proj out", dma_bias(v.clone(), &bad, r(&mut rng, [2])), &["dt_proj"]);
    let bad = LinearConfig::new(4, 2).with_bias(false).init(&dev());
    assert_shape_err("dt_proj in", dma_bias(v.clone(), &bad, r(&mut rng, [2])), &["dt_proj"]);
    assert_shape_err("a", dma_bias(v, &lin, r(&mut rng, [3])), &["a"]);
}

// ------------------------------------------------------------------------------------------
// RoPE
// ------------------------------------------------------------------------------------------

#[test]
fn rope_errors() {
    let mut rng = Rng::new(414);
    assert_param_err("odd dim", apply_rope(r(&mut rng, [1, 1, 3, 5]), &[0, 1, 2], 1e4), &["head_dim"]);
    assert_param_err("positions", apply_rope(r(&mut rng, [1, 1, 3, 4]), &[0, 1], 1e4), &["positions"]);
}

// ------------------------------------------------------------------------------------------
// Module configs
// ------------------------------------------------------------------------------------------

/// `init` of each of the five layers for a shared head layout.
fn init_all(d_model: usize, n_heads: usize, n_kv: Option<usize>, head_dim: Option<usize>, rope: bool) -> Vec<(&'static str, Result<(), SparseAttnError>)> {
    let device = dev();
    vec![
        ("dense", DenseAttentionConfig::new(d_model, n_heads).with_n_kv_heads(n_kv).with_head_dim(head_dim).with_rope(rope).init(&device).map(|_| ())),
        ("moba", MobaAttentionConfig::new(d_model, n_heads).with_n_kv_heads(n_kv).with_head_dim(head_dim).with_rope(rope).init(&device).map(|_| ())),
        ("nsa", NsaAttentionConfig::new(d_model, n_heads).with_n_kv_heads(n_kv).with_head_dim(head_dim).with_rope(rope).init(&device).map(|_| ())),
        ("seer", SeerAttentionConfig::new(d_model, n_heads).with_n_kv_heads(n_kv).with_head_dim(head_dim).with_rope(rope).init(&device).map(|_| ())),
        ("dma", DmaAttentionConfig::new(d_model, n_heads).with_n_kv_heads(n_kv).with_head_dim(head_dim).with_rope(rope).init(&device).map(|_| ())),
    ]
}

#[test]
fn config_head_layout_errors() {
    for (name, r) in init_all(16, 4, Some(2), None, true) {
        assert!(r.is_ok(), "{name}: valid GQA config rejected: {r:?}");
    }
    for (name, r) in init_all(16, 4, Some(3), None, true) {
        assert_param_err(&format!("{name} n_kv_heads 3"), r, &["n_kv_heads"]);
    }
    for (name, r) in init_all(16, 4, Some(0), None, true) {
        assert_param_err(&format!("{name} n_kv_heads 0"), r, &["n_kv_heads"]);
    }
    for (name, r) in init_all(16, 0, None, None, true) {
        assert_param_err(&format!("{name} n_heads 0"), r, &["n_heads"]);
    }
    // d_model 12 / 4 heads = head_dim 3: odd, RoPE needs even.
    for (name, r) in init_all(12, 4, None, None, true) {
        assert_param_err(&format!("{name} odd head_dim"), r, &["head_dim"]);
    }
    for (name, r) in init_all(16, 4, None, Some(5), true) {
        assert_param_err(&format!("{name} explicit odd head_dim"), r, &["head_dim"]);
    }
    for (name, r) in init_all(10, 4, None, None, true) {
        assert_param_err(&format!("{name} d_model % n_heads"), r, &["head_dim"]);
    }
    // An odd head_dim is fine without RoPE.
    for (name, r) in init_all(12, 4, None, None, false) {
        assert!(r.is_ok(), "{name}: odd head_dim without RoPE rejected: {r:?}");
    }
}

#[test]
fn config_method_parameter_errors() {
    let device = dev();
    let moba = |b, k| MobaAttentionConfig::new(16, 4).with_block_size(b).with_top_k(k).init(&device);
    assert_param_err("moba block 0", moba(0, 2), &["block_size"]);
    assert_param_err("moba top_k 0", moba(8, 0), &["top_k"]);
    let nsa = || NsaAttentionConfig::new(16, 4);
    assert_param_err("nsa compress_block 0", nsa().with_compress_block(0).init(&device), &["compress_block"]);
    assert_param_err("nsa stride > block", nsa().with_compress_block(8).with_compress_stride(16).init(&device), &["compress_stride"]);
    assert_param_err("nsa select_block 0", nsa().with_select_block(0).init(&device), &["select_block"]);
    assert_param_err("nsa top_n 0", nsa().with_top_n(0).init(&device), &["top_n"]);
    assert_param_err("nsa hidden 0", nsa().with_compress_hidden(Some(0)).init(&device), &["compress_hidden"]);
    let seer = || SeerAttentionConfig::new(16, 4);
    assert_param_err("seer block 0", seer().with_block_size(0).init(&device), &["block_size"]);
    assert_param_err("seer top_k 0", seer().with_top_k(Some(0)).init(&device), &["top_k"]);
    assert_param_err("seer hidden odd", seer().with_gate_hidden(9).init(&device), &["gate_hidden"]);
    assert_param_err("seer skip 1", seer().with_loss_skip_fraction(1.0).init(&device), &["loss_skip_fraction"]);
    assert_param_err("seer skip < 0", seer().with_loss_skip_fraction(-0.1).init(&device), &["loss_skip_fraction"]);
    assert_param_err("dma window 0", DmaAttentionConfig::new(16, 4).with_window(0).init(&device), &["window"]);
    assert_param_err("dense window 0", DenseAttentionConfig::new(16, 4).with_window(Some(0)).init(&device), &["window"]);
}

#[test]
fn module_forward_rejects_wrong_width() {
    let mut rng = Rng::new(415);
    let device = dev();
    let x = r(&mut rng, [1, 8, 12]);
    let cfgs = (16usize, 4usize);
    let (d, h) = cfgs;
    assert_shape_err("dense", DenseAttentionConfig::new(d, h).init(&device).unwrap().forward(x.clone()), &["x"]);
    assert_shape_err("moba", MobaAttentionConfig::new(d, h).with_block_size(4).init(&device).unwrap().forward(x.clone()), &["x"]);
    assert_shape_err(
        "nsa",
        NsaAttentionConfig::new(d, h).with_compress_block(4).with_compress_stride(2).with_select_block(4).init(&device).unwrap().forward(x.clone()),
        &["x"],
    );
    assert_shape_err("seer", SeerAttentionConfig::new(d, h).with_block_size(4).init(&device).unwrap().forward(x.clone()), &["x"]);
    assert_shape_err("dma", DmaAttentionConfig::new(d, h).init(&device).unwrap().forward(x), &["x"]);
}
