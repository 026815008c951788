//! The CubeCL kernels reached through Burn (backend extension + autodiff backward) against
//! the tensor-op reference on the same device: output, LSE and the gradients of q, k, v and
//! the bias, for dense, block-sparse (both granularities) and DMA-style biased attention.
//!
//! They run on every runtime compiled in (`--features cuda`, `wgpu` or `vulkan`), CI's
//! software Vulkan included.
#![cfg(any(feature = "wgpu", feature = "cuda"))]

use burn::tensor::{DType, Device, Int, Tensor, TensorData};
use burn_sparse_attn::attention::reference::attention_reference;
use burn_sparse_attn::attention::{AttentionOptions, KeyBias, attention_with_bias};
use burn_sparse_attn::block_sparse::{BlockSelection, block_sparse_attention, block_sparse_attention_with_bias};
use burn_sparse_attn::dma::dma_keep_threshold;
use burn_sparse_attn::varlen::{VarLen, attention_varlen};
use burn_sparse_attn::{attention, kernel_impl_for};

/// `SPARSE_ATTN_RUNTIME=cuda|wgpu|vulkan` picks among the compiled-in runtimes.
fn device() -> Device {
    match std::env::var("SPARSE_ATTN_RUNTIME").as_deref() {
        #[cfg(feature = "cuda")]
        Ok("cuda") => Device::cuda(0),
        #[cfg(feature = "vulkan")]
        Ok("vulkan") => Device::vulkan(Default::default()),
        #[cfg(feature = "wgpu")]
        Ok("wgpu") => Device::wgpu(Default::default()),
        #[cfg(feature = "cuda")]
        _ => Device::cuda(0),
        #[cfg(not(feature = "cuda"))]
        _ => Device::wgpu(Default::default()),
    }
}

fn host_random(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E3779B97F4A7C15).wrapping_add(1);
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// The same random tensor on the kernel device and on Flex (where the reference runs: on
/// the software Vulkan driver each of the reference's many small ops would compile a kernel).
fn pair<const D: usize>(shape: [usize; D], seed: u64, kdev: &Device, rdev: &Device) -> (Tensor<D>, Tensor<D>) {
    let n = shape.iter().product();
    let data = TensorData::new(host_random(n, seed), shape);
    (Tensor::from_data(data.clone(), kdev), Tensor::from_data(data, rdev))
}

fn rel_err(a: Tensor<4>, b: Tensor<4>) -> f64 {
    let a: Vec<f32> = a.into_data().convert::<f32>().try_to_vec().unwrap();
    let b: Vec<f32> = b.into_data().convert::<f32>().try_to_vec().unwrap();
    assert_eq!(a.len(), b.len());
    let num: f64 = a.iter().zip(&b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    assert!(a.iter().all(|x| x.is_finite()), "kernel produced a non-finite value");
    (num / den.max(1e-30)).sqrt()
}

type Run = dyn Fn(Tensor<4>, Tensor<4>, Tensor<4>, Option<Tensor<3>>) -> (Tensor<4>, Tensor<3>);

/// Runs `f` (kernel) and `g` (reference) with the same inputs and compares O, LSE and grads.
fn check(shape_q: [usize; 4], shape_k: [usize; 4], with_bias: bool, kernel: &Run, reference: &Run, tol: f64) {
    check_in(None, shape_q, shape_k, with_bias, kernel, reference, tol, if tf32_possible() { 2e-3 } else { 1e-4 });
}

/// [`check`] with the kernel side's inputs cast to `dtype` (the reference stays f32 on Flex).
#[allow(clippy::too_many_arguments)]
fn check_in(
    dtype: Option<DType>,
    shape_q: [usize; 4],
    shape_k: [usize; 4],
    with_bias: bool,
    kernel: &Run,
    reference: &Run,
    tol: f64,
    lse_tol: f32,
) {
    let kdev = device().autodiff();
    let rdev = Device::flex().autodiff();
    assert_eq!(kernel_impl_for(&kdev), burn_sparse_attn::kernel::AttentionImpl::Kernel);
    let q0 = pair(shape_q, 1, &kdev, &rdev);
    let k0 = pair(shape_k, 2, &kdev, &rdev);
    let v0 = pair(shape_k, 3, &kdev, &rdev);
    let b0 = pair([shape_k[0], shape_k[1], shape_k[2]], 4, &kdev, &rdev);
    let d_o = pair(shape_q, 5, &kdev, &rdev);
    let mut results = Vec::new();
    for (side, run) in [kernel, reference].into_iter().enumerate() {
        let cast4 = |t: Tensor<4>| match (side, dtype) {
            (0, Some(dt)) => t.cast(dt),
            _ => t,
        };
        let pick = |t: &(Tensor<4>, Tensor<4>)| cast4(if side == 0 { t.0.clone() } else { t.1.clone() });
        let (q0, k0, v0, d_o) = (pick(&q0), pick(&k0), pick(&v0), pick(&d_o));
        let b0 = with_bias.then(|| {
            let b = if side == 0 { b0.0.clone() } else { b0.1.clone() };
            match (side, dtype) {
                (0, Some(dt)) => b.cast(dt),
                _ => b,
            }
        });
        let q = q0.clone().detach().require_grad();
        let k = k0.clone().detach().require_grad();
        let v = v0.clone().detach().require_grad();
        let b = b0.clone().map(|b| b.detach().require_grad());
        let (o, lse) = run(q.clone(), k.clone(), v.clone(), b.clone());
        let grads = (o.clone() * d_o.clone()).sum().backward();
        let gb = b.map(|b| b.grad(&grads).expect("bias grad").unsqueeze::<4>());
        results.push((o, lse, q.grad(&grads).unwrap(), k.grad(&grads).unwrap(), v.grad(&grads).unwrap(), gb));
    }
    let r = results.pop().unwrap();
    let kr = results.pop().unwrap();
    let lse_k: Vec<f32> = kr.1.into_data().convert::<f32>().try_to_vec().unwrap();
    let lse_r: Vec<f32> = r.1.into_data().convert::<f32>().try_to_vec().unwrap();
    for (a, b) in lse_k.iter().zip(&lse_r) {
        if b.is_infinite() {
            assert_eq!(a, b, "lse of an empty row");
        } else {
            assert!((a - b).abs() <= lse_tol * b.abs().max(1.0), "lse {a} vs {b}");
        }
    }
    for (name, a, b) in [("o", kr.0, r.0), ("dq", kr.2, r.2), ("dk", kr.3, r.3), ("dv", kr.4, r.4)] {
        let e = rel_err(a, b);
        assert!(e < tol, "{name}: relative error {e:e}");
    }
    if let (Some(a), Some(b)) = (kr.5, r.5) {
        let e = rel_err(a, b);
        assert!(e < tol, "dbias: relative error {e:e}");
    }
}

/// Whether the f32 kernels may multiply in TF32: the tensor-core path on CUDA, unless
/// `SPARSE_ATTN_KERNEL_PATH=portable` forces the exact portable kernels.
fn tf32_possible() -> bool {
    let cuda = cfg!(feature = "cuda") && !matches!(std::env::var("SPARSE_ATTN_RUNTIME").as_deref(), Ok("wgpu") | Ok("vulkan"));
    cuda && std::env::var("SPARSE_ATTN_KERNEL_PATH").as_deref() != Ok("portable")
}

/// f32 agreement, or TF32's (10-bit mantissa products, f32 accumulation).
fn tol() -> f64 {
    if tf32_possible() { 3e-3 } else { 1e-4 }
}

#[test]
fn dense_causal_gqa_ragged_matches_reference() {
    let opts = AttentionOptions::causal();
    let kern = move |q, k, v, _b| {
        let o = attention(q, k, v, &opts).unwrap();
        (o.output, o.lse)
    };
    let refr = move |q, k, v, _b| {
        let o = attention_reference(q, k, v, None, None, &opts);
        (o.output, o.lse)
    };
    check([2, 4, 37, 32], [2, 2, 37, 32], false, &kern, &refr, tol());
    // seq_q > seq_k: the first rows see no key.
    check([1, 2, 21, 16], [1, 1, 13, 16], false, &kern, &refr, tol());
}

/// Packed sequences (the portable kernels on every device) against the reference's mask:
/// an empty sequence, a single token, uneven lengths, GQA, and a window. Runs everywhere:
/// its two portable kernels build in seconds on software Vulkan.
#[test]
fn varlen_matches_reference() {
    for opts in [AttentionOptions::causal(), AttentionOptions::causal().with_window(4)] {
        let varlen = VarLen::new(vec![0, 9, 9, 30, 31, 45]).unwrap();
        let (vk, vr) = (varlen.clone(), varlen);
        let kern = move |q, k, v, _b| {
            let o = attention_varlen(q, k, v, &vk, &opts).unwrap();
            (o.output, o.lse)
        };
        let refr = move |q, k, v, _b| {
            let o = attention_varlen(q, k, v, &vr, &opts).unwrap();
            (o.output, o.lse)
        };
        // The portable kernels multiply in f32 on every device.
        check_in(None, [1, 4, 45, 64], [1, 2, 45, 64], false, &kern, &refr, 1e-4, 1e-4);
    }
}

#[test]
fn window_and_bias_match_reference() {
    let opts = AttentionOptions::causal().with_window(7);
    let kern = move |q, k, v, b: Option<Tensor<3>>| {
        let o = attention_with_bias(q, k, v, &KeyBias { values: b.unwrap(), keep: None }, &opts).unwrap();
        (o.output, o.lse)
    };
    let refr = move |q, k, v, b: Option<Tensor<3>>| {
        let o = attention_reference(q, k, v, Some(&KeyBias { values: b.unwrap(), keep: None }), None, &opts);
        (o.output, o.lse)
    };
    check([1, 4, 29, 32], [1, 2, 29, 32], true, &kern, &refr, tol());
}

#[test]
fn dma_threshold_matches_reference() {
    let opts = AttentionOptions::causal();
    let kern = move |q: Tensor<4>, k, v, b: Option<Tensor<3>>| {
        let b = b.unwrap();
        let keep = dma_keep_threshold(&b, q.dims()[2], 9, true).unwrap();
        let o = attention_with_bias(q, k, v, &KeyBias { values: b, keep: Some(keep) }, &opts).unwrap();
        (o.output, o.lse)
    };
    let refr = move |q: Tensor<4>, k, v, b: Option<Tensor<3>>| {
        let b = b.unwrap();
        let keep = dma_keep_threshold(&b, q.dims()[2], 9, true).unwrap();
        let o = attention_reference(q, k, v, Some(&KeyBias { values: b, keep: Some(keep) }), None, &opts);
        (o.output, o.lse)
    };
    check([1, 2, 33, 16], [1, 2, 33, 16], true, &kern, &refr, tol());
}

fn random_selection(b: usize, h: usize, rows: usize, cap: usize, nkb: usize, seed: u64) -> TensorData {
    let mut s = seed;
    let data: Vec<i64> = (0..b * h * rows * cap)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let r = (s >> 33) as usize % (nkb + 1);
            if r == nkb { -1 } else { r as i64 }
        })
        .collect();
    TensorData::new(data, [b, h, rows, cap])
}

/// The selection on the kernel device and on Flex.
fn selections(data: TensorData, make: impl Fn(Tensor<4, Int>) -> BlockSelection) -> (BlockSelection, BlockSelection) {
    let kdev = device().autodiff();
    let rdev = Device::flex().autodiff();
    (make(Tensor::from_data(data.clone(), &kdev)), make(Tensor::from_data(data, &rdev)))
}

#[test]
fn block_sparse_per_token_gqa_shared_matches_reference() {
    let (sq, kb) = (45usize, 8);
    let idx = random_selection(1, 2, sq, 3, sq.div_ceil(kb), 7);
    let (sel, s2) = selections(idx, |t| BlockSelection::per_token(t, kb));
    let opts = AttentionOptions::causal();
    let kern = move |q, k, v, _b| {
        let o = block_sparse_attention(q, k, v, &sel, &opts).unwrap();
        (o.output, o.lse)
    };
    let refr = move |q, k, v, _b| {
        let o = attention_reference(q, k, v, None, Some(&s2), &opts);
        (o.output, o.lse)
    };
    check([1, 4, sq, 32], [1, 2, sq, 32], false, &kern, &refr, tol());
}

#[test]
fn block_sparse_per_query_block_with_bias_matches_reference() {
    let (sq, qb, kb) = (50usize, 16, 16);
    let idx = random_selection(2, 2, sq.div_ceil(qb), 4, sq.div_ceil(kb), 11);
    let (sel, s2) = selections(idx, |t| BlockSelection::per_query_block(t, qb, kb));
    let opts = AttentionOptions::causal();
    let kern = move |q, k, v, b: Option<Tensor<3>>| {
        let o = block_sparse_attention_with_bias(q, k, v, &sel, &KeyBias { values: b.unwrap(), keep: None }, &opts).unwrap();
        (o.output, o.lse)
    };
    let refr = move |q, k, v, b: Option<Tensor<3>>| {
        let o = attention_reference(q, k, v, Some(&KeyBias { values: b.unwrap(), keep: None }), Some(&s2), &opts);
        (o.output, o.lse)
    };
    check([2, 2, sq, 16], [2, 2, sq, 16], true, &kern, &refr, tol());
}

/// bf16 on CUDA takes the register-fragment kernels (forward, dQ, dK/dV/dbias): through Burn
/// and autodiff they must agree with the f32 reference to bf16 accuracy.
#[test]
#[cfg(feature = "cuda")]
fn bf16_fragment_path_matches_f32_reference() {
    let opts = AttentionOptions::causal().with_window(40);
    let kern = move |q, k, v, b: Option<Tensor<3>>| {
        let o = attention_with_bias(q, k, v, &KeyBias { values: b.unwrap(), keep: None }, &opts).unwrap();
        (o.output, o.lse)
    };
    let refr = move |q, k, v, b: Option<Tensor<3>>| {
        let o = attention_reference(q, k, v, Some(&KeyBias { values: b.unwrap(), keep: None }), None, &opts);
        (o.output, o.lse)
    };
    check_in(Some(DType::BF16), [1, 4, 150, 64], [1, 2, 150, 64], true, &kern, &refr, 3e-2, 3e-2);
    let idx = random_selection(1, 2, 150, 3, 150usize.div_ceil(32), 5);
    let (sel, s2) = selections(idx, |t| BlockSelection::per_token(t, 32));
    let opts = AttentionOptions::causal();
    let kern = move |q, k, v, _b| {
        let o = block_sparse_attention(q, k, v, &sel, &opts).unwrap();
        (o.output, o.lse)
    };
    let refr = move |q, k, v, _b| {
        let o = attention_reference(q, k, v, None, Some(&s2), &opts);
        (o.output, o.lse)
    };
    check_in(Some(DType::BF16), [1, 4, 150, 128], [1, 2, 150, 128], false, &kern, &refr, 3e-2, 3e-2);
}

/// The routers' top-k runs as a kernel on Cube devices: MoBA's routing, NSA's selection and
/// Seer's top-k pick the same blocks (as sets: equal scores may be ordered differently) as on
/// Flex, where Burn's `topk_with_indices` runs. Quick on software Vulkan too, so CI runs it.
#[test]
fn routers_top_k_on_device_match_flex() {
    use burn_sparse_attn::moba::moba_select;
    use burn_sparse_attn::nsa::{NsaParams, nsa_select};
    use burn_sparse_attn::seer::seer_select_topk;
    let kdev = device();
    let rdev = Device::flex();
    let sets = |t: Tensor<4, Int>| -> Vec<Vec<i64>> {
        let n = t.dims()[3];
        let v: Vec<i64> = t.into_data().convert::<i64>().try_to_vec().unwrap();
        v.chunks(n).map(|r| {
            let mut r: Vec<i64> = r.iter().copied().filter(|&x| x >= 0).collect();
            r.sort_unstable();
            r
        }).collect()
    };
    // MoBA: per token and head, 90 tokens of blocks of 8, top 3.
    let (qk, qr) = pair([1, 4, 90, 16], 11, &kdev, &rdev);
    let (kk, kr) = pair([1, 2, 90, 16], 12, &kdev, &rdev);
    let a = moba_select(qk, kk, 8, 3).unwrap().indices;
    let b = moba_select(qr, kr, 8, 3).unwrap().indices;
    assert_eq!(sets(a), sets(b), "MoBA routing");
    // Under autodiff (training) the routing goes through the same kernel, detached.
    let adev = kdev.clone().autodiff();
    let (qa, _) = pair([1, 4, 90, 16], 11, &adev, &rdev);
    let (ka, _) = pair([1, 2, 90, 16], 12, &adev, &rdev);
    let c = moba_select(qa.require_grad(), ka.require_grad(), 8, 3).unwrap().indices;
    let b = moba_select(pair([1, 4, 90, 16], 11, &kdev, &rdev).1, pair([1, 2, 90, 16], 12, &kdev, &rdev).1, 8, 3).unwrap().indices;
    assert_eq!(sets(c), sets(b), "MoBA routing under autodiff");
    // NSA: block scores with forced blocks (+inf ties) and future blocks (-inf).
    let p = NsaParams { select_block: 4, top_n: 5, ..NsaParams::default() };
    let (sk, sr) = pair([1, 2, 70, 18], 13, &kdev, &rdev);
    let a = nsa_select(sk, 70, 70, &p).unwrap().indices;
    let b = nsa_select(sr, 70, 70, &p).unwrap().indices;
    assert_eq!(sets(a), sets(b), "NSA selection");
    // Seer: top 4 of block-causal gate logits.
    let mask = burn_sparse_attn::seer::block_causal_mask(96, 96, 8, &kdev).unsqueeze::<4>().expand([1, 4, 12, 12]);
    let mask_r = burn_sparse_attn::seer::block_causal_mask(96, 96, 8, &rdev).unsqueeze::<4>().expand([1, 4, 12, 12]);
    let (lk, lr) = pair([1, 4, 12, 12], 14, &kdev, &rdev);
    let a = seer_select_topk(lk.mask_fill(mask.bool_not(), f64::NEG_INFINITY), 4, 8).unwrap().indices;
    let b = seer_select_topk(lr.mask_fill(mask_r.bool_not(), f64::NEG_INFINITY), 4, 8).unwrap().indices;
    assert_eq!(sets(a), sets(b), "Seer top-k");
}

/// DMA's keep threshold runs as a kernel on Cube devices: the same `(value, index)` per row
/// as the host walk on Flex, with many tied bias values, causal and not, seq_q != seq_k.
/// Quick on software Vulkan too, so CI runs it.
#[test]
fn dma_keep_threshold_on_device_matches_host() {
    use burn_sparse_attn::dma::dma_keep_threshold_host;
    let kdev = device();
    let mut s = 99u64;
    for (b, h, sq, sk, w, causal) in [(2, 2, 30, 30, 6, true), (1, 3, 11, 40, 9, true), (1, 2, 25, 25, 40, true), (1, 1, 7, 19, 5, false)] {
        let data: Vec<f32> = (0..b * h * sk)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 40) % 5) as f32 - 2.0
            })
            .collect();
        let td = TensorData::new(data, [b, h, sk]);
        let on_device = dma_keep_threshold(&Tensor::<3>::from_data(td.clone(), &kdev.clone().autodiff()).require_grad(), sq, w, causal).unwrap();
        let on_host = dma_keep_threshold_host(&Tensor::<3>::from_data(td, &Device::flex()), sq, w, causal).unwrap();
        let vals = |t: Tensor<3>| -> Vec<f32> { t.into_data().convert::<f32>().try_to_vec().unwrap() };
        let idx = |t: Tensor<3, Int>| -> Vec<i64> { t.into_data().convert::<i64>().try_to_vec().unwrap() };
        let what = format!("b {b}, h {h}, sq {sq}, sk {sk}, window {w}, causal {causal}");
        assert_eq!(vals(on_device.value), vals(on_host.value), "{what}: values");
        assert_eq!(idx(on_device.index), idx(on_host.index), "{what}: indices");
    }
}

/// NSA's computed selection on a Cube device (block scores from one kernel, then the row
/// top-k) chooses the blocks the tensor ops choose on Flex: where the sets differ, only by
/// blocks whose reference scores tie at the top-n boundary (within `tol`). GQA groups 4 and
/// 16, seq_q < seq_k; f32 everywhere (the scalar score kernel) and bf16 on CUDA (the
/// fragment kernel). It runs the whole NSA op (three attention branches).
#[test]
fn nsa_selection_on_device_matches_flex() {
    use burn_sparse_attn::nsa::{NsaInputs, NsaParams, nsa_attention, nsa_compressed_attention, nsa_selection_scores, num_compressed};
    let kdev = device();
    let rdev = Device::flex();
    let mut cases = vec![(DType::F32, 8, 2, 120, 150, 32, 2e-4), (DType::F32, 16, 1, 200, 200, 16, 2e-4)];
    if cfg!(feature = "cuda") && std::env::var("SPARSE_ATTN_RUNTIME").as_deref().unwrap_or("cuda") == "cuda" {
        cases.push((DType::BF16, 16, 1, 300, 300, 64, 3e-2));
        cases.push((DType::BF16, 8, 2, 200, 260, 128, 3e-2));
    }
    for (n, &(dtype, hq, hkv, sq, sk, d, tol)) in cases.iter().enumerate() {
        let p = NsaParams { compress_block: 16, compress_stride: 8, select_block: 16, top_n: 4, window: 32, ..NsaParams::default() };
        let n_cmp = num_compressed(sk, 16, 8);
        let seed = 40 + 10 * n as u64;
        let (qk, qr) = pair([1, hq, sq, d], seed, &kdev, &rdev);
        let (kk, kr) = pair([1, hkv, sk, d], seed + 1, &kdev, &rdev);
        let (ck, cr) = pair([1, hkv, n_cmp, d], seed + 2, &kdev, &rdev);
        let (gk, gr) = pair([1, hq, sq, 3], seed + 3, &kdev, &rdev);
        // The reference sees the same (rounded) values as the kernel.
        let round = |t: Tensor<4>| t.cast(dtype).cast(DType::F32);
        let (qr, kr, cr) = (round(qr), round(kr), round(cr));
        let inputs = |q: Tensor<4>, k: Tensor<4>, c: Tensor<4>, g: Tensor<4>| NsaInputs {
            q,
            k_cmp: c.clone(),
            v_cmp: c,
            k_slc: k.clone(),
            v_slc: k.clone(),
            k_win: k.clone(),
            v_win: k,
            gates: g,
        };
        let got = nsa_attention(inputs(qk.cast(dtype), kk.cast(dtype), ck.cast(dtype), gk.cast(dtype)), &p).unwrap().selection.indices;
        let want = nsa_attention(inputs(qr.clone(), kr, cr.clone(), gr), &p).unwrap().selection.indices;
        let lse = nsa_compressed_attention(qr.clone(), cr.clone(), cr.clone(), sk, &p).unwrap().lse;
        let scores = nsa_selection_scores(qr, cr, lse, sk, &p).unwrap();
        let cap = got.dims()[3];
        assert_eq!(cap, want.dims()[3]);
        let got: Vec<i64> = got.into_data().convert::<i64>().try_to_vec().unwrap();
        let want: Vec<i64> = want.into_data().convert::<i64>().try_to_vec().unwrap();
        let n_sel = sk.div_ceil(16);
        let scores: Vec<f32> = scores.into_data().convert::<f32>().try_to_vec().unwrap();
        for (r, (a, b)) in got.chunks(cap).zip(want.chunks(cap)).enumerate() {
            let only_a: Vec<i64> = a.iter().copied().filter(|x| *x >= 0 && !b.contains(x)).collect();
            let only_b: Vec<i64> = b.iter().copied().filter(|x| *x >= 0 && !a.contains(x)).collect();
            assert_eq!(only_a.len(), only_b.len(), "case {n} row {r}: {a:?} vs {b:?}");
            let s = |j: i64| scores[r * n_sel + j as usize];
            let lo_a = only_a.iter().map(|&j| s(j)).fold(f32::INFINITY, f32::min);
            let hi_b = only_b.iter().map(|&j| s(j)).fold(f32::NEG_INFINITY, f32::max);
            assert!(only_a.is_empty() || lo_a >= hi_b - tol as f32 * hi_b.abs().max(1.0), "case {n} ({dtype:?}) row {r}: kernel {a:?} vs reference {b:?}");
        }
    }
}

/// DMA on the fragment path walks its kept keys gathered (a bias-dependent key order and
/// per-query-tile block lists). Through Burn and autodiff, in bf16 on the same device and
/// inputs, it gives the output, LSE and the gradients of q, k, v and the bias of the dense
/// walk with the same keep rule (itself checked against the reference above), causal and
/// not, with random and tied biases. (Against the f32 reference, dbias is a sum with heavy
/// cancellation, so bf16 rounding of the inputs alone moves it by tens of percent.)
#[test]
#[cfg(feature = "cuda")]
fn dma_gathered_bf16_matches_dense_walk() {
    use burn_sparse_attn::dma::{DmaParams, dma_attention};
    let dev = device().autodiff();
    let rdev = Device::flex();
    for (causal, tied) in [(true, false), (false, false), (true, true)] {
        let params = DmaParams { window: 40, causal, ..DmaParams::default() };
        let opts = AttentionOptions { causal, ..AttentionOptions::causal() };
        let bf = |t: Tensor<4>| t.cast(DType::BF16);
        let (q, k, v, d_o) = (
            bf(pair([1, 4, 300, 64], 1, &dev, &rdev).0),
            bf(pair([1, 2, 300, 64], 2, &dev, &rdev).0),
            bf(pair([1, 2, 300, 64], 3, &dev, &rdev).0),
            bf(pair([1, 4, 300, 64], 5, &dev, &rdev).0),
        );
        let b0 = pair([1, 2, 300], 4, &dev, &rdev).0;
        let b0 = if tied { (b0 * 3.0).round() } else { b0 * 4.0 }.cast(DType::BF16);
        let mut outs = Vec::new();
        for gathered in [true, false] {
            let (q, k, v, b) = (q.clone().require_grad(), k.clone().require_grad(), v.clone().require_grad(), b0.clone().require_grad());
            let o = if gathered {
                dma_attention(q.clone(), k.clone(), v.clone(), b.clone(), &params).unwrap()
            } else {
                let keep = dma_keep_threshold(&b, 300, 40, causal).unwrap();
                attention_with_bias(q.clone(), k.clone(), v.clone(), &KeyBias { values: b.clone(), keep: Some(keep) }, &opts).unwrap()
            };
            let grads = (o.output.clone() * d_o.clone()).sum().backward();
            outs.push([
                o.output,
                o.lse.unsqueeze::<4>(),
                q.grad(&grads).unwrap(),
                k.grad(&grads).unwrap(),
                v.grad(&grads).unwrap(),
                b.grad(&grads).unwrap().unsqueeze::<4>(),
            ]);
        }
        let dense = outs.pop().unwrap();
        let gathered = outs.pop().unwrap();
        for (name, (a, b)) in ["o", "lse", "dq", "dk", "dv", "dbias"].iter().zip(gathered.into_iter().zip(dense)) {
            let e = rel_err(a.cast(DType::F32), b.cast(DType::F32));
            assert!(e < 1e-2, "causal {causal}, tied {tied}: {name}: relative error {e:e}");
        }
    }
}

/// Seer's target from the block-max kernel comes back in q's dtype (as the tensor-op path's
/// does), so the gate loss of a bf16 model does not mix dtypes (the toy LM in bf16 hit a
/// `DTypeMismatch` in Burn's fusion before), and matches the reference target to bf16
/// accuracy.
#[test]
#[cfg(feature = "cuda")]
fn seer_target_bf16_keeps_dtype_and_matches_reference() {
    use burn_sparse_attn::seer::{seer_attention_target, seer_attention_target_reference};
    let dev = device();
    let rdev = Device::flex();
    let (q, qr) = pair([1, 4, 200, 64], 21, &dev, &rdev);
    let (k, kr) = pair([1, 2, 200, 64], 22, &dev, &rdev);
    let round = |t: Tensor<4>| t.cast(DType::BF16).cast(DType::F32);
    let (target, _) = seer_attention_target(q.cast(DType::BF16), k.clone().cast(DType::BF16), k.cast(DType::BF16), 64, None).unwrap();
    assert_eq!(target.dtype(), DType::BF16);
    let (want, _) = seer_attention_target_reference(round(qr), round(kr.clone()), round(kr), 64, None).unwrap();
    let e = rel_err(target.cast(DType::F32), want);
    assert!(e < 3e-2, "target: relative error {e:e}");
}

/// DMA with a bias per (query, key) through Burn: the kernels' portable path (bias read per
/// pair, keep rule as a per-row threshold) against the tensor ops on Flex, for output, LSE and
/// the gradients of q, k, v and the bias; a bias from a few values, so rows have ties at
/// their threshold; bias heads = kv heads (dbias sums the group) and = query heads.
#[test]
fn dma_pair_bias_matches_tensor_ops() {
    use burn_sparse_attn::dma::{DmaParams, dma_attention_pairwise};
    let kdev = device().autodiff();
    let rdev = Device::flex().autodiff();
    for (hq, hkv, hb, sq, sk, d, causal, window) in [(4usize, 2usize, 2usize, 21usize, 21usize, 16usize, true, 6usize), (2, 1, 2, 13, 19, 32, false, 5)] {
        let q0 = pair([1, hq, sq, d], 11, &kdev, &rdev);
        let k0 = pair([1, hkv, sk, d], 12, &kdev, &rdev);
        let v0 = pair([1, hkv, sk, d], 13, &kdev, &rdev);
        let d_o = pair([1, hq, sq, d], 14, &kdev, &rdev);
        let tied: Vec<f32> = host_random(hb * sq * sk, 15).into_iter().map(|x| (x * 2.0).round() / 2.0).collect();
        let b0 = (
            Tensor::<4>::from_data(TensorData::new(tied.clone(), [1, hb, sq, sk]), &kdev),
            Tensor::<4>::from_data(TensorData::new(tied, [1, hb, sq, sk]), &rdev),
        );
        let params = DmaParams { window, causal, ..Default::default() };
        let mut results = Vec::new();
        for side in 0..2 {
            let pick = |t: &(Tensor<4>, Tensor<4>)| if side == 0 { t.0.clone() } else { t.1.clone() };
            let (q, k, v, b) = (pick(&q0).require_grad(), pick(&k0).require_grad(), pick(&v0).require_grad(), pick(&b0).require_grad());
            let out = dma_attention_pairwise(q.clone(), k.clone(), v.clone(), b.clone(), &params).unwrap();
            let grads = (out.output.clone() * pick(&d_o)).sum().backward();
            let g = |t: &Tensor<4>| t.grad(&grads).expect("grad").into_data();
            results.push((out.output.into_data(), out.lse.unsqueeze::<4>().into_data(), g(&q), g(&k), g(&v), g(&b)));
        }
        let to = |x: &TensorData| Tensor::<4>::from_data(x.clone(), &Device::flex());
        let (a, r) = (&results[0], &results[1]);
        for (what, x, y) in [("o", &a.0, &r.0), ("lse", &a.1, &r.1), ("dq", &a.2, &r.2), ("dk", &a.3, &r.3), ("dv", &a.4, &r.4), ("dbias", &a.5, &r.5)] {
            let e = rel_err(to(x), to(y));
            assert!(e < tol(), "hq {hq} hb {hb} causal {causal}: {what} rel err {e:.3e}");
        }
    }
}

/// The same packed op for the kernel device and for Flex: `op(device_index)` builds the
/// closure of side 0 (kernel) and 1 (reference), so each side captures its own selection.
fn both<F>(op: impl Fn(usize) -> F) -> (F, F) {
    (op(0), op(1))
}

/// The packed sparse ops on the kernel device against the same ops on Flex: block-sparse
/// with causal self-packing (the block-aligned layout alone, so the fast schedule paths) and
/// MoBA's packed routing.
#[test]
fn varlen_block_sparse_and_moba_match_flex() {
    use burn_sparse_attn::moba::{MobaParams, moba_attention_varlen};
    use burn_sparse_attn::varlen::{block_sparse_attention_varlen, packed_selection_rows};
    let varlen = VarLen::new(vec![0, 9, 9, 30, 31, 45]).unwrap();
    let kb = 8;
    let idx = random_selection(1, 2, packed_selection_rows(&varlen, 1), 3, 3, 5);
    let sels = selections(idx, |t| BlockSelection::per_token(t, kb));
    let sels = [sels.0, sels.1];
    let opts = AttentionOptions::causal();
    let (kern, refr) = both(|side| {
        let (sel, vl) = (sels[side].clone(), varlen.clone());
        move |q, k, v, _b| {
            let o = block_sparse_attention_varlen(q, k, v, &sel, &vl, &opts).unwrap();
            (o.output, o.lse)
        }
    });
    check([1, 4, 45, 32], [1, 2, 45, 32], false, &kern, &refr, tol());
    let params = MobaParams { block_size: 8, top_k: 2, scale: None };
    let (kern, refr) = both(|_| {
        let vl = varlen.clone();
        move |q, k, v, _b| {
            let o = moba_attention_varlen(q, k, v, &vl, &params).unwrap().attention;
            (o.output, o.lse)
        }
    });
    check([1, 4, 45, 32], [1, 2, 45, 32], false, &kern, &refr, tol());
}

/// Packed sequences with per-sequence visibility on the portable kernels: non-causal
/// block-sparse lists (query blocks, cross lengths) and DMA's keep rule per sequence, with
/// the bias gradient. Runs everywhere (portable kernels only).
#[test]
fn varlen_segments_with_lists_and_keep_rule_match_flex() {
    use burn_sparse_attn::dma::DmaParams;
    use burn_sparse_attn::varlen::{block_sparse_attention_varlen, dma_attention_varlen, packed_selection_rows};
    let varlen = VarLen::cross(vec![0, 12, 14, 30], vec![0, 5, 5, 41]).unwrap();
    let (qb, kb) = (4, 8);
    let idx = random_selection(1, 4, packed_selection_rows(&varlen, qb), 3, 5, 3);
    let sels = selections(idx, |t| BlockSelection::per_query_block(t, qb, kb));
    let sels = [sels.0, sels.1];
    let opts = AttentionOptions::full();
    let (kern, refr) = both(|side| {
        let (sel, vl) = (sels[side].clone(), varlen.clone());
        move |q, k, v, _b| {
            let o = block_sparse_attention_varlen(q, k, v, &sel, &vl, &opts).unwrap();
            (o.output, o.lse)
        }
    });
    check_in(None, [1, 4, 30, 32], [1, 2, 41, 32], false, &kern, &refr, 1e-4, 1e-4);
    let varlen = VarLen::new(vec![0, 9, 9, 30, 31, 45]).unwrap();
    let params = DmaParams { window: 6, scale: None, causal: true };
    let (kern, refr) = both(|_| {
        let vl = varlen.clone();
        move |q, k, v, b: Option<Tensor<3>>| {
            let o = dma_attention_varlen(q, k, v, b.unwrap(), &vl, &params).unwrap();
            (o.output, o.lse)
        }
    });
    check_in(None, [1, 4, 45, 32], [1, 2, 45, 32], true, &kern, &refr, 1e-4, 1e-4);
}

/// NSA on a packed batch on the kernel device against the same op on Flex: the compressed
/// branch (each row's visible compressed tokens of its own sequence as segments), given
/// per-token block lists (the block-aligned layout) and the window, with gradients through
/// all three branches and the packed mean-pool compression. Given lists keep the test free of
/// top-k ties between devices.
#[test]
fn varlen_nsa_matches_flex() {
    use burn_sparse_attn::nsa::{NsaBlocks, NsaInputs, NsaParams, TrailingWindow, compress_mean_varlen, nsa_attention_varlen};
    let cu = vec![0, 9, 9, 30, 31, 45];
    let params = NsaParams { compress_block: 8, compress_stride: 4, select_block: 8, top_n: 3, window: 6, ..NsaParams::default() };
    let idx = random_selection(1, 2, 45, 3, 3, 11);
    let lists = [Tensor::<4, Int>::from_data(idx.clone(), &device().autodiff()), Tensor::<4, Int>::from_data(idx, &Device::flex().autodiff())];
    let (kern, refr) = both(|side| {
        let lists = lists[side].clone();
        let cu = cu.clone();
        let varlen = VarLen::new(cu.clone()).unwrap();
        move |q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, _b: Option<Tensor<3>>| {
            let k_cmp = compress_mean_varlen(k.clone(), &cu, 8, 4, TrailingWindow::Drop).unwrap();
            let v_cmp = compress_mean_varlen(v.clone(), &cu, 8, 4, TrailingWindow::Drop).unwrap();
            let [b, h, s, _] = q.dims();
            let gates = Tensor::<4>::ones([b, h, s, 3], (&q.device(), q.dtype()));
            let inputs = NsaInputs { q, k_cmp, v_cmp, k_slc: k.clone(), v_slc: v.clone(), k_win: k, v_win: v, gates };
            let o = nsa_attention_varlen(inputs, &varlen, &params, NsaBlocks::Given(lists.clone()), None).unwrap();
            (o.output, o.compressed.lse)
        }
    });
    check([1, 4, 45, 32], [1, 2, 45, 32], false, &kern, &refr, tol());
}
