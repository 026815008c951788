//! Modules: SafeTensors save/load round trips through burn-store (outputs identical after
//! loading into a freshly initialised module) and GQA/MQA head layouts.

use burn::module::{Module, Param};
use burn::store::{ModuleSnapshot, SafetensorsStore};
use burn::tensor::{DType, Tensor};
use burn_sparse_attn::attention::{AttentionOptions, attention};
use burn_sparse_attn::seer::GatePool;
use burn_sparse_attn::{
    DenseAttention, DenseAttentionConfig, DmaAttention, DmaAttentionConfig, MobaAttention, MobaAttentionConfig, NsaAttention,
    NsaAttentionConfig, SeerAttention, SeerAttentionConfig, SeerMode,
};
use sparse_attn_tests::*;

const D_MODEL: usize = 16;
const SEQ: usize = 13;

fn input(seed: u64) -> Tensor<3> {
    Rng::new(seed).randn([2, SEQ, D_MODEL], 1.0, &dev()).cast(DType::F32)
}

/// Saves `a` to SafeTensors bytes, loads them into `fresh` and checks the outputs are
/// bit-identical (and differed before loading).
fn round_trip<M, F>(what: &str, a: &M, mut fresh: M, forward: F)
where
    M: Module,
    F: Fn(&M, Tensor<3>) -> Tensor<3>,
{
    let x = input(500);
    let want = values(forward(a, x.clone()));
    assert!(want.iter().all(|v| v.is_finite()), "{what}: non-finite output");
    assert_differs(&format!("{what}: fresh module before loading"), &values(forward(&fresh, x.clone())), &want, 1e-6);
    let mut store = SafetensorsStore::from_bytes(None);
    a.save_into(&mut store).unwrap_or_else(|e| panic!("{what}: save failed: {e}"));
    let bytes = store.get_bytes().unwrap();
    let mut store = SafetensorsStore::from_bytes(Some(bytes));
    let result = fresh.load_from(&mut store).unwrap_or_else(|e| panic!("{what}: load failed: {e}"));
    assert!(result.is_success(), "{what}: {result:?}");
    assert!(result.missing.is_empty() && result.unused.is_empty(), "{what}: {result:?}");
    let n_params = module_params(a).len();
    assert_eq!(result.applied.len(), n_params, "{what}: {result:?}");
    let got = values(forward(&fresh, x));
    assert_eq!(got, want, "{what}: outputs differ after the round trip");
    // Every parameter equal, by path.
    let (pa, pb) = (module_params(a), module_params(&fresh));
    for (x, y) in pa.iter().zip(&pb) {
        assert_eq!(x.path, y.path);
        assert_eq!(x.values, y.values, "{what}: parameter {} differs", x.path);
    }
}

fn layouts() -> [Option<usize>; 3] {
    [None, Some(2), Some(1)] // MHA, GQA, MQA with 4 query heads
}

#[test]
fn dense_round_trip() {
    for kv in layouts() {
        let cfg = DenseAttentionConfig::new(D_MODEL, 4).with_n_kv_heads(kv).with_window(Some(5));
        let a = cfg.init(&dev()).unwrap();
        round_trip(&format!("dense {kv:?}"), &a, cfg.init(&dev()).unwrap(), |m: &DenseAttention, x| m.forward(x).unwrap());
    }
}

#[test]
fn moba_round_trip() {
    for kv in layouts() {
        let cfg = MobaAttentionConfig::new(D_MODEL, 4).with_n_kv_heads(kv).with_block_size(4).with_top_k(2);
        let a = cfg.init(&dev()).unwrap();
        round_trip(&format!("moba {kv:?}"), &a, cfg.init(&dev()).unwrap(), |m: &MobaAttention, x| m.forward(x).unwrap());
    }
}

#[test]
fn nsa_round_trip() {
    for kv in layouts() {
        for shared in [false, true] {
            let cfg = NsaAttentionConfig::new(D_MODEL, 4)
                .with_n_kv_heads(kv)
                .with_compress_block(4)
                .with_compress_stride(2)
                .with_select_block(4)
                .with_top_n(2)
                .with_window(4)
                .with_shared_kv(shared);
            let a = cfg.init(&dev()).unwrap();
            // q (4 heads), k and v (kv heads), and unless shared the four branch projections.
            let hkv = kv.unwrap_or(4);
            let branches = if shared { 0 } else { 4 };
            assert_eq!(a.proj.in_proj.weight.dims(), [D_MODEL, (4 + (2 + branches) * hkv) * (D_MODEL / 4)]);
            round_trip(&format!("nsa {kv:?} shared {shared}"), &a, cfg.init(&dev()).unwrap(), |m: &NsaAttention, x| m.forward(x).unwrap());
        }
    }
}

#[test]
fn seer_round_trip() {
    for kv in layouts() {
        for (top_k, mode) in [(Some(2), SeerMode::Sparse), (None, SeerMode::Sparse), (None, SeerMode::Distill)] {
            let cfg = SeerAttentionConfig::new(D_MODEL, 4).with_n_kv_heads(kv).with_block_size(4).with_gate_hidden(8).with_top_k(top_k).with_mode(mode);
            // The per-kv-head gate key maps save, load and run the same way.
            let cfg = cfg.with_gate_kv_head_keys(top_k.is_none() && mode == SeerMode::Sparse);
            // And the other published poolings (queries by max and mean, keys by mean only).
            let cfg = if mode == SeerMode::Distill {
                cfg.with_gate_q_pool(vec![GatePool::Max, GatePool::Avg]).with_gate_k_pool(vec![GatePool::Avg])
            } else {
                cfg
            };
            let k_heads = if cfg.gate_kv_head_keys { kv.unwrap_or(4) } else { 4 };
            assert_eq!(cfg.init(&dev()).unwrap().gate.k_proj.weight.dims()[0], k_heads);
            let a = cfg.init(&dev()).unwrap();
            let what = format!("seer {kv:?} {top_k:?} {mode:?}");
            round_trip(&what, &a, cfg.init(&dev()).unwrap(), |m: &SeerAttention, x| m.forward(x).unwrap());
            // The gate is saved too: its loss is identical after the round trip.
            let mut store = SafetensorsStore::from_bytes(None);
            a.save_into(&mut store).unwrap();
            let mut b = cfg.init(&dev()).unwrap();
            b.load_from(&mut SafetensorsStore::from_bytes(Some(store.get_bytes().unwrap()))).unwrap();
            let la = values(a.forward_with_gate_loss(input(501)).unwrap().1);
            let lb = values(b.forward_with_gate_loss(input(501)).unwrap().1);
            assert_eq!(la, lb, "{what}: gate loss differs after the round trip");
        }
    }
}

#[test]
fn dma_round_trip() {
    for kv in layouts() {
        let cfg = DmaAttentionConfig::new(D_MODEL, 4).with_n_kv_heads(kv).with_window(5);
        let mut a = cfg.init(&dev()).unwrap();
        // A is initialised to 0; give it values so that the bias (and its saving) matters.
        let hkv = kv.unwrap_or(4);
        a.a = Param::from_tensor(tensor_f32(Rng::new(502).normals(hkv, 1.0), [hkv], &dev()));
        round_trip(&format!("dma {kv:?}"), &a, cfg.init(&dev()).unwrap(), |m: &DmaAttention, x| m.forward(x).unwrap());
    }
}

#[test]
fn nsa_round_trip_through_a_file() {
    let cfg = NsaAttentionConfig::new(D_MODEL, 4).with_n_kv_heads(Some(2)).with_compress_block(4).with_compress_stride(2).with_select_block(4).with_top_n(2).with_window(4);
    let a = cfg.init(&dev()).unwrap();
    let path = std::env::temp_dir().join(format!("sparse-attn-tests-nsa-{}.safetensors", std::process::id()));
    let _ = std::fs::remove_file(&path);
    a.save_into(&mut SafetensorsStore::from_file(&path)).unwrap();
    let mut b = cfg.init(&dev()).unwrap();
    let result = b.load_from(&mut SafetensorsStore::from_file(&path)).unwrap();
    let _ = std::fs::remove_file(&path);
    assert!(result.is_success(), "{result:?}");
    let x = input(503);
    assert_eq!(values(a.forward(x.clone()).unwrap()), values(b.forward(x).unwrap()));
}

#[test]
fn loading_into_a_different_head_layout_fails() {
    let a = NsaAttentionConfig::new(D_MODEL, 4).with_n_kv_heads(Some(2)).init(&dev()).unwrap();
    let mut store = SafetensorsStore::from_bytes(None);
    a.save_into(&mut store).unwrap();
    let mut b = NsaAttentionConfig::new(D_MODEL, 4).with_n_kv_heads(Some(1)).init(&dev()).unwrap();
    let r = b.load_from(&mut SafetensorsStore::from_bytes(Some(store.get_bytes().unwrap())));
    assert!(!matches!(r, Ok(ref res) if res.is_success()), "loading GQA-2 weights into a GQA-1 layer must fail");
}

// ------------------------------------------------------------------------------------------
// GQA / MQA layouts
// ------------------------------------------------------------------------------------------

#[test]
fn gqa_layouts_have_the_right_projection_shapes_and_run() {
    let x = input(504);
    for (kv, head_dim) in [(None, None), (Some(2), None), (Some(1), None), (Some(2), Some(6))] {
        let hkv = kv.unwrap_or(4);
        let hd = head_dim.unwrap_or(D_MODEL / 4);
        let dense = DenseAttentionConfig::new(D_MODEL, 4).with_n_kv_heads(kv).with_head_dim(head_dim).init(&dev()).unwrap();
        assert_eq!(dense.proj.in_proj.weight.dims(), [D_MODEL, (4 + 2 * hkv) * hd]);
        assert_eq!(dense.proj.output.weight.dims(), [4 * hd, D_MODEL]);
        let nsa = NsaAttentionConfig::new(D_MODEL, 4).with_n_kv_heads(kv).with_head_dim(head_dim).with_compress_block(4).with_compress_stride(2).with_select_block(4).with_top_n(2).with_window(4).init(&dev()).unwrap();
        assert_eq!(nsa.proj.in_proj.weight.dims(), [D_MODEL, (4 + 6 * hkv) * hd]);
        assert_eq!(nsa.gate.weight.dims(), [D_MODEL, 3 * 4]);
        let seer = SeerAttentionConfig::new(D_MODEL, 4).with_n_kv_heads(kv).with_head_dim(head_dim).with_block_size(4).with_gate_hidden(8).init(&dev()).unwrap();
        assert_eq!(seer.gate.k_proj.weight.dims(), [4, 3 * hd, 8]);
        let dma = DmaAttentionConfig::new(D_MODEL, 4).with_n_kv_heads(kv).with_head_dim(head_dim).with_window(5).init(&dev()).unwrap();
        assert_eq!(dma.dt_proj.weight.dims(), [hkv * hd, hkv]);
        assert_eq!(dma.a.val().dims(), [hkv]);
        let moba = MobaAttentionConfig::new(D_MODEL, 4).with_n_kv_heads(kv).with_head_dim(head_dim).with_block_size(4).with_top_k(2).init(&dev()).unwrap();
        let outs = [
            dense.forward(x.clone()).unwrap(),
            nsa.forward(x.clone()).unwrap(),
            seer.forward(x.clone()).unwrap(),
            dma.forward(x.clone()).unwrap(),
            moba.forward(x.clone()).unwrap(),
        ];
        for (name, o) in ["dense", "nsa", "seer", "dma", "moba"].iter().zip(outs) {
            assert_eq!(o.dims(), [2, SEQ, D_MODEL], "{name} {kv:?}");
            assert!(values(o).iter().all(|v| v.is_finite()), "{name} {kv:?}: non-finite output");
        }
    }
}

#[test]
fn dense_module_gqa_matches_naive() {
    // The layer = projections + RoPE + attention with query head h reading kv head h / group.
    let x = input(505).cast(DType::F64);
    for kv in [Some(2), Some(1)] {
        let m = module_to_f64(DenseAttentionConfig::new(D_MODEL, 4).with_n_kv_heads(kv).init(&dev()).unwrap());
        let (q, k, v) = m.proj.qkv(x.clone()).unwrap();
        let d = Dims::new(2, 4, kv.unwrap(), SEQ, SEQ, 4);
        let (o, _) = naive_attention(&d, &values(q), &values(k), &values(v), default_scale(4), &|_, _, i, j| naive_visible(&d, true, None, i, j), &|_, _, _| 0.0);
        let want = values(m.proj.merge(tensor(o, d.q_shape(), &dev())));
        assert_close(&format!("dense module {kv:?}"), &values(m.forward(x.clone()).unwrap()), &want, 1e-12, 1e-12);
    }
}

#[test]
fn moba_module_with_all_blocks_equals_dense_module() {
    let x = input(506).cast(DType::F64);
    let moba = module_to_f64(MobaAttentionConfig::new(D_MODEL, 4).with_n_kv_heads(Some(2)).with_block_size(4).with_top_k(4).init(&dev()).unwrap());
    let mut dense = module_to_f64(DenseAttentionConfig::new(D_MODEL, 4).with_n_kv_heads(Some(2)).init(&dev()).unwrap());
    dense.proj = moba.proj.clone();
    assert_close("moba module all blocks", &values(moba.forward(x.clone()).unwrap()), &values(dense.forward(x.clone()).unwrap()), 1e-12, 1e-12);
    // Functional cross-check of the dense layer with the functional op.
    let (q, k, v) = dense.proj.qkv(x.clone()).unwrap();
    let o = attention(q, k, v, &AttentionOptions::causal()).unwrap().output;
    assert_close("dense module vs op", &values(dense.forward(x).unwrap()), &values(dense.proj.merge(o)), 0.0, 0.0);
}

// ------------------------------------------------------------------------------------------
// Module-level properties
// ------------------------------------------------------------------------------------------

#[test]
fn dma_module_with_zero_a_is_sliding_window_attention() {
    // A = 0 (its initial value) makes every bias 0: all keys tie and the ties go to the most
    // recent keys, so each query keeps its `window` latest keys: dense attention with a window.
    let x = input(507).cast(DType::F64);
    for kv in [Some(2), None] {
        let dma = module_to_f64(DmaAttentionConfig::new(D_MODEL, 4).with_n_kv_heads(kv).with_window(5).init(&dev()).unwrap());
        assert!(values(dma.a.val()).iter().all(|&a| a == 0.0), "A must start at 0");
        let mut dense = module_to_f64(DenseAttentionConfig::new(D_MODEL, 4).with_n_kv_heads(kv).with_window(Some(5)).init(&dev()).unwrap());
        dense.proj = dma.proj.clone();
        assert_close(&format!("dma A=0 {kv:?}"), &values(dma.forward(x.clone()).unwrap()), &values(dense.forward(x.clone()).unwrap()), 1e-12, 1e-12);
        let mut full = module_to_f64(DenseAttentionConfig::new(D_MODEL, 4).with_n_kv_heads(kv).init(&dev()).unwrap());
        full.proj = dma.proj.clone();
        assert_differs("dma window 5 vs full causal", &values(dma.forward(x.clone()).unwrap()), &values(full.forward(x.clone()).unwrap()), 1e-6);
    }
}

#[test]
fn seer_distill_output_is_dense_and_freeze_base_trains_only_the_gate() {
    let ad = ad_dev();
    let x = Rng::new(508).randn([2, SEQ, D_MODEL], 1.0, &ad);
    let cfg = SeerAttentionConfig::new(D_MODEL, 4).with_n_kv_heads(Some(2)).with_block_size(4).with_gate_hidden(8).with_top_k(Some(1)).with_mode(SeerMode::Distill);
    let seer = module_to_f64(cfg.init(&ad).unwrap());
    assert_eq!(seer.mode(), SeerMode::Distill);
    let mut dense = module_to_f64(DenseAttentionConfig::new(D_MODEL, 4).with_n_kv_heads(Some(2)).init(&ad).unwrap());
    dense.proj = seer.proj.clone();
    let want = values(dense.forward(x.clone()).unwrap());
    assert_close("distill forward", &values(seer.forward(x.clone()).unwrap()), &want, 1e-12, 1e-12);
    let (out, loss) = seer.forward_with_gate_loss(x.clone()).unwrap();
    assert_close("distill forward with loss", &values(out.clone()), &want, 1e-12, 1e-12);
    // The same layer in sparse mode with top-1 is really sparse.
    let sparse = seer.clone().with_mode(SeerMode::Sparse);
    assert_differs("sparse top-1 vs dense", &values(sparse.forward(x.clone()).unwrap()), &want, 1e-6);
    // Unfrozen: the output trains the projections, the loss trains the gate.
    let grads = (out.sum() + loss).backward();
    for (path, g) in module_grads(&seer, &grads) {
        assert!(g.is_some_and(|g| g.iter().any(|v| *v != 0.0)), "unfrozen: no gradient for {path}");
    }
    // Frozen base: only the gate gets gradients.
    let frozen = seer.freeze_base();
    let (out, loss) = frozen.forward_with_gate_loss(x.clone()).unwrap();
    let grads = (out.sum() + loss).backward();
    for (path, g) in module_grads(&frozen, &grads) {
        if path.starts_with("proj.") {
            assert!(g.is_none_or(|g| g.iter().all(|v| *v == 0.0)), "frozen: gradient reached {path}");
        } else {
            assert!(g.is_some_and(|g| g.iter().any(|v| *v != 0.0)), "frozen: no gradient for {path}");
        }
    }
}

#[test]
fn nsa_without_compressed_tokens() {
    // A sequence shorter than one compression window: no compressed token, the layer and the
    // functional op still work (the compression branch is 0).
    let cfg = NsaAttentionConfig::new(D_MODEL, 4).with_n_kv_heads(Some(2)).with_compress_block(8).with_compress_stride(4).with_select_block(4).with_top_n(2).with_window(3);
    let m = cfg.init(&dev()).unwrap();
    let x = Rng::new(509).randn([1, 6, D_MODEL], 1.0, &dev()).cast(DType::F32);
    let out = values(m.forward(x).unwrap());
    assert_eq!(out.len(), 6 * D_MODEL);
    assert!(out.iter().all(|v| v.is_finite()));
}

#[test]
fn nsa_window_branch_off() {
    // `window = 0`: no window projections, and the output does not depend on the window gate.
    let cfg = NsaAttentionConfig::new(D_MODEL, 4).with_n_kv_heads(Some(2)).with_compress_block(8).with_compress_stride(4).with_select_block(4).with_top_n(2).with_window(0);
    let m = cfg.init(&dev()).unwrap();
    // q (4 heads of 8), k, v and the compression branch's k, v (2 kv heads each): no window ones.
    assert_eq!(m.proj.in_proj.weight.dims(), [D_MODEL, (4 + 4 * 2) * (D_MODEL / 4)], "window off: no window projections");
    let x = Rng::new(511).randn([1, 20, D_MODEL], 1.0, &dev()).cast(DType::F32);
    let out = values(m.forward(x).unwrap());
    assert_eq!(out.len(), 20 * D_MODEL);
    assert!(out.iter().all(|v| v.is_finite()));
}

#[test]
fn nsa_layer_takes_given_blocks_and_counts() {
    use burn::tensor::Int;
    use burn_sparse_attn::nsa::NsaBlocks;
    let cfg = NsaAttentionConfig::new(D_MODEL, 4).with_n_kv_heads(Some(2)).with_compress_block(8).with_compress_stride(4).with_select_block(4).with_top_n(3).with_window(5);
    let m = cfg.init(&dev()).unwrap();
    let x = Rng::new(512).randn([1, 24, D_MODEL], 1.0, &dev()).cast(DType::F32);
    // Computed blocks through forward_with are forward itself.
    let a = values(m.forward(x.clone()).unwrap());
    let b = values(m.forward_with(x.clone(), NsaBlocks::Computed, None).unwrap());
    assert_eq!(a, b);
    // An empty given selection equals computed blocks cut to zero per token.
    let empty = Tensor::<4, Int>::full([1, 2, 24, 3], -1, &dev());
    let zero = Tensor::<3, Int>::zeros([1, 2, 24], &dev());
    let given = values(m.forward_with(x.clone(), NsaBlocks::Given(empty), None).unwrap());
    let counted = values(m.forward_with(x.clone(), NsaBlocks::Computed, Some(zero)).unwrap());
    assert_close("empty selection", &given, &counted, 1e-6, 1e-6);
    assert_differs("empty selection vs computed", &given, &a, 1e-4);
    // A given selection of the wrong shape is an error naming it.
    let bad = Tensor::<4, Int>::zeros([1, 4, 24, 3], &dev());
    let e = m.forward_with(x, NsaBlocks::Given(bad), None).unwrap_err();
    assert!(e.to_string().contains("blocks"), "{e}");
}

#[test]
fn method_enum_picks_each_layer_from_configuration() {
    use burn::config::Config;
    use burn_sparse_attn::{AttentionMethodConfig, DenseAttentionConfig, DmaAttentionConfig, MobaAttentionConfig, SeerAttentionConfig};
    let configs = [
        AttentionMethodConfig::Dense(DenseAttentionConfig::new(D_MODEL, 4)),
        AttentionMethodConfig::Nsa(NsaAttentionConfig::new(D_MODEL, 4).with_compress_block(8).with_compress_stride(4).with_select_block(4).with_top_n(2).with_window(3)),
        AttentionMethodConfig::Moba(MobaAttentionConfig::new(D_MODEL, 4).with_block_size(4).with_top_k(2)),
        AttentionMethodConfig::Seer(SeerAttentionConfig::new(D_MODEL, 4).with_block_size(4).with_gate_hidden(8)),
        AttentionMethodConfig::Dma(DmaAttentionConfig::new(D_MODEL, 4).with_window(5)),
    ];
    let x = Rng::new(600).randn([1, 16, D_MODEL], 1.0, &dev()).cast(DType::F32);
    let dir = std::env::temp_dir().join(format!("sparse-attn-method-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (i, cfg) in configs.iter().enumerate() {
        // The config round-trips through its JSON file.
        let path = dir.join(format!("{i}.json"));
        cfg.save(&path).unwrap();
        let loaded = AttentionMethodConfig::load(&path).unwrap();
        assert_eq!(loaded.name(), cfg.name());
        assert_eq!(format!("{loaded:?}"), format!("{cfg:?}"));
        let layer = loaded.init(&dev()).unwrap();
        let out = layer.forward_with_aux(x.clone()).unwrap();
        assert_eq!(out.output.dims(), [1, 16, D_MODEL], "{}", cfg.name());
        assert_eq!(out.aux_loss.is_some(), cfg.name() == "seer", "{}: aux loss", cfg.name());
        assert_eq!(layer.has_aux_loss(), cfg.name() == "seer");
        assert_close(cfg.name(), &values(layer.forward(x.clone()).unwrap()), &values(out.output), 1e-6, 1e-6);
    }
    std::fs::remove_dir_all(&dir).ok();
    // A bad field still names itself through the enum.
    let e = AttentionMethodConfig::Moba(MobaAttentionConfig::new(D_MODEL, 4).with_top_k(0)).init(&dev()).unwrap_err();
    assert!(e.to_string().contains("top_k"), "{e}");
}
