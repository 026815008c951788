//! SeerAttention's block-max target against an f64 reference: the largest causal
//! probability `exp(scale q.k - lse)` of every (query block, key block) pair with the true
//! LSE, over GQA groups, seq_q < seq_k and > seq_k (rows that see no key), ragged last
//! blocks and block sizes 64 (the fragment kernel on CUDA f16/bf16), 16 / 32 / 48 (the
//! cooperative-matrix kernel where the device has one, e.g. CUDA f32 as TF32) and 40 (scalar).
//! Dtypes: env `SPARSE_ATTN_DTYPES` as in `attention.rs`.
#![cfg(any(feature = "wgpu", feature = "cuda"))]

use sparse_attn_kernels::host::{device_from_env, download_f32, dtypes_from_env, random_values, upload, upload_f32};
use sparse_attn_kernels::*;



/// `(lse, block maxima)` in f64.
fn reference(p: &BlockMaxProblem, q: &[f64], k: &[f64]) -> (Vec<f64>, Vec<f64>) {
    let (d, g, bs) = (p.head_dim, p.heads_q / p.heads_kv, p.block);
    let (nq, nk) = (p.seq_q.div_ceil(bs), p.seq_k.div_ceil(bs));
    let off = p.seq_k as i64 - p.seq_q as i64;
    let score = |b: usize, h: usize, t: usize, j: usize| -> f64 {
        let (qo, ko) = (((b * p.heads_q + h) * p.seq_q + t) * d, ((b * p.heads_kv + h / g) * p.seq_k + j) * d);
        (0..d).map(|x| q[qo + x] * k[ko + x]).sum::<f64>() * p.scale as f64
    };
    let mut lse = vec![f64::NEG_INFINITY; p.batch * p.heads_q * p.seq_q];
    let mut out = vec![0.0; p.batch * p.heads_q * nq * nk];
    for b in 0..p.batch {
        for h in 0..p.heads_q {
            for t in 0..p.seq_q {
                let vis: Vec<usize> = (0..p.seq_k).filter(|&j| j as i64 <= t as i64 + off).collect();
                if vis.is_empty() {
                    continue;
                }
                let s: Vec<f64> = vis.iter().map(|&j| score(b, h, t, j)).collect();
                let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let l = m + s.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
                lse[(b * p.heads_q + h) * p.seq_q + t] = l;
                for (&j, &sj) in vis.iter().zip(&s) {
                    let o: &mut f64 = &mut out[((b * p.heads_q + h) * nq + t / bs) * nk + j / bs];
                    *o = o.max((sj - l).exp());
                }
            }
        }
    }
    (lse, out)
}

#[test]
fn block_max_matches_f64_reference() {
    let client = device_from_env().client();
    // (batch, heads_q, heads_kv, seq_q, seq_k, head_dim, block)
    let cases = [(1, 4, 2, 200, 200, 64, 64), (2, 2, 1, 130, 190, 32, 64), (1, 2, 2, 100, 70, 16, 64), (1, 3, 1, 90, 90, 16, 16), (1, 2, 1, 75, 120, 32, 40), (1, 2, 2, 150, 150, 32, 32), (1, 2, 1, 100, 130, 48, 48)];
    for dtype in dtypes_from_env() {
        if let Err(e) = supports(&client, dtype) {
            println!("skipping {dtype:?}: {e}");
            continue;
        }
        for (n, &(b, hq, hkv, sq, sk, d, block)) in cases.iter().enumerate() {
            let p = BlockMaxProblem { batch: b, heads_q: hq, heads_kv: hkv, seq_q: sq, seq_k: sk, head_dim: d, block, scale: 1.0 / (d as f32).sqrt() };
            let q = random_values(b * hq * sq * d, 3 * n as u64 + 1, dtype, 2.0);
            let k = random_values(b * hkv * sk * d, 3 * n as u64 + 2, dtype, 2.0);
            let (lse, want) = reference(&p, &q, &k);
            let lse32: Vec<f32> = lse.iter().map(|&x| x as f32).collect();
            let got = seer_block_max(&client, dtype, &p, &upload(&client, dtype, &q), &upload(&client, dtype, &k), &upload_f32(&client, &lse32)).unwrap();
            let got = download_f32(&client, &got);
            let path = block_max_path(&client, dtype, &p);
            // f32 on the cooperative-matrix kernel multiplies in TF32 (10-bit mantissa), as
            // f16/bf16 do in their own formats.
            let tol = if dtype == AttnDtype::F32 && path != BlockMaxPath::TensorCore { 1e-4 } else { 1e-2 };
            assert_eq!(got.len(), want.len());
            for (x, (&a, &w)) in got.iter().zip(&want).enumerate() {
                assert!((a - w).abs() <= tol * w.max(1e-3), "case {n} ({path:?}, {dtype:?}): element {x}: got {a}, want {w}");
            }
        }
    }
}

#[test]
fn block_max_rejects_bad_arguments() {
    let client = device_from_env().client();
    let h = upload_f32(&client, &[0.0; 1024]);
    let mut p = BlockMaxProblem { batch: 1, heads_q: 4, heads_kv: 3, seq_q: 8, seq_k: 8, head_dim: 16, block: 4, scale: 0.25 };
    let e = seer_block_max(&client, AttnDtype::F32, &p, &h, &h, &h).unwrap_err();
    assert!(e.to_string().contains("heads_kv"), "{e}");
    p.heads_kv = 2;
    p.block = 0;
    let e = seer_block_max(&client, AttnDtype::F32, &p, &h, &h, &h).unwrap_err();
    assert!(e.to_string().contains("block"), "{e}");
    p.block = 4;
    let short = upload_f32(&client, &[0.0; 4]);
    let e = seer_block_max(&client, AttnDtype::F32, &p, &short, &h, &h).unwrap_err();
    assert!(e.to_string().contains("q"), "{e}");
}
