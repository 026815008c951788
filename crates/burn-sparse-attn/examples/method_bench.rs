//! Times each method's whole functional op (everything a layer does between its projections:
//! routing, selection, compression branch, thresholds and the attention kernels) forward and
//! forward+backward under autodiff, beside this library's dense attention and Burn's own
//! `burn::tensor::module::attention` (what a Burn user gets without this library), in one
//! process on one device.
//!
//! ```text
//! cargo run --release -p burn-sparse-attn --features cuda --example method_bench -- \
//!     --s 16384 --hq 64 --hkv 4 --d 128 --dtype bf16 --iters 3 --json out.jsonl
//! ```
//! Methods (`--only a,b,...`, default all): `dense`, `burn` (skipped when its `seq x seq`
//! scores would not fit), `moba` (block 512, top 3), `nsa` (compression 32/16, selection
//! 16 x 64, window 512, compressed keys given), `dma` (keep 2048), `seer` (sparse mode:
//! top 10% of the 64-blocks from random gate logits), and `moba-given` / `nsa-given` (the
//! same ops on a routing computed once outside the timed region: the difference to `moba` /
//! `nsa` is what routing and selection cost), and `seer-target` (Seer's distillation step:
//! the dense attention with its gradients plus the block-max target, 64-blocks), and
//! `seer-train` (Seer's sparse-mode training step: the gate's selection, the block-sparse
//! attention, the target from detached inputs and the gate loss). `--json FILE` appends one
//! object per method: `impl` (`ours` or `burn`), `method`, `seq`, `batch`, `heads_q`, `heads_kv`,
//! `head_dim`, `dtype`, `fwd_ms`, `fwdbwd_ms`, `peak_mib` (the device memory pool's reserved
//! bytes after the method's runs, starting from an emptied pool), `gpu`.
//! Runtime: `--features cuda` -> CUDA device 0, else wgpu.

use std::time::Instant;

use burn::tensor::module::attention as burn_attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{DType, Device, Tensor, TensorData};
use burn_sparse_attn::attention::{AttentionOptions, attention};
use burn_sparse_attn::dma::{DmaParams, dma_attention};
use burn_sparse_attn::moba::{MobaParams, moba_attention, moba_select};
use burn_sparse_attn::nsa::{NsaBlocks, NsaInputs, NsaParams, nsa_attention, nsa_attention_with};
use burn_sparse_attn::seer::{seer_attention_target, seer_gate_loss, seer_select_topk};
use burn_sparse_attn::block_sparse_attention;

fn arg(args: &[String], name: &str, default: &str) -> String {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned().unwrap_or_else(|| default.to_string())
}

fn random(shape: [usize; 4], seed: u64, device: &Device, dtype: DType) -> Tensor<4> {
    let n: usize = shape.iter().product();
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(1);
    let data: Vec<f32> = (0..n)
        .map(|_| {
            s = s.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect();
    Tensor::<4>::from_data(TensorData::new(data, shape), device).cast(dtype)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let get = |n: &str, d: &str| arg(&args, n, d);
    let parse = |n: &str, d: &str| -> usize { get(n, d).parse().unwrap_or_else(|_| panic!("{n}: expected an integer")) };
    let (b, hq, hkv, s, d, iters) = (parse("--b", "1"), parse("--hq", "64"), parse("--hkv", "4"), parse("--s", "16384"), parse("--d", "128"), parse("--iters", "3"));
    let dtype = match get("--dtype", "bf16").as_str() {
        "bf16" => DType::BF16,
        "f16" => DType::F16,
        "f32" => DType::F32,
        other => panic!("--dtype: expected bf16, f16 or f32, got {other}"),
    };
    let dname = get("--dtype", "bf16");
    let only = get("--only", "dense,burn,moba,nsa,dma,seer");
    let json = get("--json", "");
    let gpu = get("--gpu", "");
    #[cfg(feature = "cuda")]
    let device = Device::cuda(0).autodiff();
    #[cfg(not(feature = "cuda"))]
    let device = Device::wgpu(Default::default()).autodiff();

    let q = random([b, hq, s, d], 1, &device, dtype);
    let k = random([b, hkv, s, d], 2, &device, dtype);
    let v = random([b, hkv, s, d], 3, &device, dtype);
    let d_o = random([b, hq, s, d], 4, &device, dtype);
    let nsa = NsaParams::default();
    let n_cmp = (s - nsa.compress_block) / nsa.compress_stride + 1;
    let k_cmp = random([b, hkv, n_cmp, d], 5, &device, dtype);
    let v_cmp = random([b, hkv, n_cmp, d], 6, &device, dtype);
    let gates = random([b, hq, s, 3], 7, &device, DType::F32).abs().cast(dtype);
    let dma_bias = random([b, hkv, s, 1], 8, &device, DType::F32).reshape([b, hkv, s]);
    let seer_block = 64;
    let nqb = s.div_ceil(seer_block);
    let seer_logits = random([b, hq, nqb, nqb], 9, &device, DType::F32);
    let seer_topk = nqb.div_ceil(10);

    // Each method: the inputs that get gradients, and the op returning the output.
    type Op<'a> = Box<dyn Fn(Tensor<4>, Tensor<4>, Tensor<4>) -> Tensor<4> + 'a>;
    let causal = AttentionOptions::causal();
    let group = hq / hkv;
    let repeat = move |t: Tensor<4>| {
        let [b, h, s, d] = t.dims();
        t.reshape([b, h, 1, s, d]).expand([b, h, group, s, d]).reshape([b, h * group, s, d])
    };
    let nsa_inputs = |q: Tensor<4>, k: Tensor<4>, v: Tensor<4>| NsaInputs {
        q,
        k_cmp: k_cmp.clone(),
        v_cmp: v_cmp.clone(),
        k_slc: k.clone(),
        v_slc: v.clone(),
        k_win: k,
        v_win: v,
        gates: gates.clone(),
    };
    // The `*-given` variants take the routing computed once outside the timed region, so
    // their difference to the full op is the cost of routing.
    let wants = |name: &str| only.split(',').any(|o| o == name);
    let moba = MobaParams::default();
    let moba_given = wants("moba-given").then(|| moba_select(q.clone(), k.clone(), moba.block_size, moba.top_k).unwrap());
    let nsa_given = wants("nsa-given").then(|| nsa_attention(nsa_inputs(q.clone(), k.clone(), v.clone()), &nsa).unwrap().selection.indices);
    let mut methods: Vec<(&str, &str, Op)> = vec![
        ("ours", "dense", Box::new(|q, k, v| attention(q, k, v, &causal).unwrap().output)),
        (
            "burn",
            "dense",
            Box::new(move |q, k, v| {
                let opts = AttentionModuleOptions { is_causal: true, ..Default::default() };
                burn_attention(q, repeat(k), repeat(v), None, None, opts)
            }),
        ),
        ("ours", "moba", Box::new(|q, k, v| moba_attention(q, k, v, &moba).unwrap().attention.output)),
        (
            "ours",
            "moba-given",
            Box::new(|q, k, v| block_sparse_attention(q, k, v, moba_given.as_ref().unwrap(), &causal).unwrap().output),
        ),
        ("ours", "nsa", Box::new(|q, k, v| nsa_attention(nsa_inputs(q, k, v), &nsa).unwrap().output)),
        (
            "ours",
            "nsa-given",
            Box::new(|q, k, v| {
                let given = NsaBlocks::Given(nsa_given.clone().unwrap());
                nsa_attention_with(nsa_inputs(q, k, v), &nsa, given, None).unwrap().output
            }),
        ),
        (
            "ours",
            "dma",
            Box::new(|q, k, v| dma_attention(q, k, v, dma_bias.clone(), &DmaParams { window: 2048, ..Default::default() }).unwrap().output),
        ),
        (
            "ours",
            "seer",
            Box::new(|q, k, v| {
                let sel = seer_select_topk(seer_logits.clone(), seer_topk, seer_block).unwrap();
                block_sparse_attention(q, k, v, &sel, &causal).unwrap().output
            }),
        ),
        (
            "ours",
            "seer-target",
            Box::new(|q, k, v| seer_attention_target(q, k, v, seer_block, None).unwrap().1.output),
        ),
        // What a sparse-mode SeerAttention layer runs between its projections in a training
        // step: the gate's selection, the block-sparse attention, and the gate's target (from
        // detached q, k, v) with its loss. The loss is added to the output at weight 0 so the
        // lazily built target is computed inside the timed region.
        (
            "ours",
            "seer-train",
            Box::new(|q, k, v| {
                let sel = seer_select_topk(seer_logits.clone(), seer_topk, seer_block).unwrap();
                let (target, _) = seer_attention_target(q.clone().detach(), k.clone().detach(), v.clone().detach(), seer_block, None).unwrap();
                let loss = seer_gate_loss(seer_logits.clone().cast(q.dtype()), target, 0).unwrap();
                let out = block_sparse_attention(q, k, v, &sel, &causal).unwrap().output;
                out + loss.reshape([1, 1, 1, 1]).mul_scalar(0.0)
            }),
        ),
    ];
    methods.retain(|(imp, m, _)| wants(if *imp == "burn" { "burn" } else { m }));
    // Burn's attention materialises `[b, hq, s, s]` scores (and their gradient): skip it where
    // that alone would take more than 32 GiB.
    let score_bytes = b * hq * s * s * 4;
    // Reading one element and then waiting for the device: the timed region ends when every
    // queued kernel has finished.
    let sync = |t: &Tensor<4>| {
        let _ = t.clone().slice([0..1, 0..1, 0..1, 0..1]).into_data();
        device.sync().expect("device sync");
    };

    for (imp, method, op) in &methods {
        if *imp == "burn" && score_bytes > (32usize << 30) {
            println!("{imp:>5} {method:>6}: skipped (scores alone {} GiB)", score_bytes >> 30);
            continue;
        }
        device.memory_cleanup();
        let run_fwd = || op(q.clone(), k.clone(), v.clone());
        let run_fb = || {
            let (qg, kg, vg) = (q.clone().require_grad(), k.clone().require_grad(), v.clone().require_grad());
            let o = op(qg.clone(), kg.clone(), vg.clone());
            let grads = (o * d_o.clone()).sum().backward();
            qg.grad(&grads).unwrap()
        };
        // Warm-up: kernel compilation and the memory pool's growth.
        sync(&run_fwd());
        sync(&run_fb());
        let t0 = Instant::now();
        for _ in 0..iters {
            sync(&run_fwd());
        }
        let fwd = t0.elapsed().as_secs_f64() / iters as f64 * 1e3;
        let t0 = Instant::now();
        for _ in 0..iters {
            sync(&run_fb());
        }
        let fb = t0.elapsed().as_secs_f64() / iters as f64 * 1e3;
        let peak = device.memory_pool_usage().map(|m| m.bytes_reserved as f64 / (1u64 << 20) as f64);
        let peak_s = peak.map_or("null".to_string(), |p| format!("{p:.0}"));
        println!("{imp:>5} {method:>6}: B={b} Hq={hq} Hkv={hkv} S={s} D={d} {dname}: fwd {fwd:.3} ms, fwd+bwd {fb:.3} ms, pool {peak_s} MiB");
        if !json.is_empty() {
            use std::io::Write;
            let line = format!(
                "{{\"impl\":\"{imp}\",\"method\":\"{method}\",\"seq\":{s},\"batch\":{b},\"heads_q\":{hq},\"heads_kv\":{hkv},\"head_dim\":{d},\"dtype\":\"{dname}\",\"fwd_ms\":{fwd:.4},\"fwdbwd_ms\":{fb:.4},\"peak_mib\":{peak_s},\"gpu\":\"{gpu}\"}}"
            );
            let mut f = std::fs::OpenOptions::new().create(true).append(true).open(&json).expect("--json: cannot open file");
            writeln!(f, "{line}").expect("--json: write failed");
        }
    }
}
