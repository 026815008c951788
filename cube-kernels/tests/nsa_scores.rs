//! NSA's selection-block scores against an f64 host reference (compression probabilities
//! from the true compressed LSE, overlap weights, the selection rule's offsets), over GQA
//! groups 1, 3, 4, 16 and 64, `seq_q < seq_k`, a chunk of rows, a single query and rows
//! that see no compressed token. On CUDA f16/bf16 this runs the fragment kernel, where the
//! device has cooperative matrices (CUDA f32 as TF32, Vulkan) the cmma kernel, elsewhere the
//! scalar one. Dtypes: env `SPARSE_ATTN_DTYPES` as in `attention.rs`.
#![cfg(any(feature = "wgpu", feature = "cuda"))]

use sparse_attn_kernels::host::{device_from_env, download_f32, dtypes_from_env, random_values, upload, upload_f32};
use sparse_attn_kernels::*;



struct Case {
    p: BlockScoreProblem,
    seq_k: usize,
}

fn case(b: usize, hq: usize, hkv: usize, sq: usize, sk: usize, d: usize, (l, st, ls): (usize, usize, usize), forced: (usize, usize), rows: (usize, usize)) -> Case {
    let n_cmp = if sk >= l { (sk - l) / st + 1 } else { 0 };
    let p = BlockScoreProblem {
        batch: b,
        heads_q: hq,
        heads_kv: hkv,
        head_dim: d,
        seq_q: sq,
        row0: rows.0,
        rows: rows.1,
        pos0: sk as i64 - sq as i64,
        n_cmp,
        compress_block: l,
        compress_stride: st,
        select_block: ls,
        n_sel: sk.div_ceil(ls),
        forced_initial: forced.0,
        forced_local: forced.1,
        scale: 1.0 / (d as f32).sqrt(),
    };
    Case { p, seq_k: sk }
}

/// `(lse [b, hq, sq], scores [b, hkv, rows, n_sel])` in f64.
fn reference(p: &BlockScoreProblem, q: &[f64], k: &[f64]) -> (Vec<f64>, Vec<f64>) {
    let (d, g) = (p.head_dim, p.heads_q / p.heads_kv);
    let scale = p.scale as f64;
    let visible = |i: usize, pos: i64| (i * p.compress_stride + p.compress_block) as i64 - 1 <= pos;
    let dot = |b: usize, h: usize, t: usize, i: usize| -> f64 {
        let qo = ((b * p.heads_q + h) * p.seq_q + t) * d;
        let ko = ((b * p.heads_kv + h / g) * p.n_cmp + i) * d;
        (0..d).map(|x| q[qo + x] * k[ko + x]).sum::<f64>() * scale
    };
    let mut lse = vec![f64::NEG_INFINITY; p.batch * p.heads_q * p.seq_q];
    for b in 0..p.batch {
        for h in 0..p.heads_q {
            for t in 0..p.seq_q {
                let pos = p.pos0 + t as i64;
                let s: Vec<f64> = (0..p.n_cmp).filter(|&i| visible(i, pos)).map(|i| dot(b, h, t, i)).collect();
                if !s.is_empty() {
                    let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    lse[(b * p.heads_q + h) * p.seq_q + t] = m + s.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
                }
            }
        }
    }
    let mut out = Vec::new();
    for b in 0..p.batch {
        for hk in 0..p.heads_kv {
            for t in p.row0..p.row0 + p.rows {
                let pos = p.pos0 + t as i64;
                for j in 0..p.n_sel {
                    let (b0, b1) = (j * p.select_block, (j + 1) * p.select_block);
                    let mut score = 0.0;
                    for h in hk * g..(hk + 1) * g {
                        let l = lse[(b * p.heads_q + h) * p.seq_q + t];
                        let l = if l == f64::NEG_INFINITY { 0.0 } else { l };
                        for i in (0..p.n_cmp).filter(|&i| visible(i, pos)) {
                            let (w0, w1) = (i * p.compress_stride, i * p.compress_stride + p.compress_block);
                            let shared = w1.min(b1).saturating_sub(w0.max(b0)) as f64 / p.compress_stride as f64;
                            if shared > 0.0 {
                                score += shared * (dot(b, h, t, i) - l).exp();
                            }
                        }
                    }
                    if pos < 0 || (b0 as i64) > pos {
                        score = f64::NEG_INFINITY;
                    }
                    if pos >= 0 {
                        let cur = pos / p.select_block as i64;
                        let jj = j as i64;
                        if jj < p.forced_initial as i64 || (jj <= cur && jj + p.forced_local as i64 > cur) {
                            score = f64::INFINITY;
                        }
                    }
                    out.push(score);
                }
            }
        }
    }
    (lse, out)
}

#[test]
fn block_scores_match_f64_reference() {
    let device = device_from_env();
    let client = device.client();
    let cases = [
        // NSA's defaults, one GQA group of 16 (one query per plane).
        case(1, 16, 1, 300, 300, 64, (32, 16, 64), (1, 2), (0, 300)),
        // GQA 4, seq_q < seq_k, a chunk of rows, no forced blocks.
        case(2, 8, 2, 150, 333, 32, (16, 8, 32), (0, 0), (20, 100)),
        // One head per list (16 queries per plane), small blocks: many tiles.
        case(1, 2, 2, 130, 130, 16, (4, 2, 4), (1, 1), (0, 130)),
        // Group of 64 (one query per cube), group of 3 (21 queries per cube).
        case(1, 64, 1, 40, 90, 16, (8, 4, 16), (1, 2), (0, 40)),
        case(1, 6, 2, 70, 70, 32, (16, 16, 16), (2, 0), (0, 70)),
        // A single query; queries that see no compressed token (seq_q > seq_k).
        case(1, 4, 1, 1, 500, 32, (32, 16, 64), (1, 2), (0, 1)),
        case(1, 4, 2, 60, 40, 16, (8, 4, 8), (1, 2), (0, 60)),
    ];
    for dtype in dtypes_from_env() {
        if let Err(e) = supports(&client, dtype) {
            println!("skipping {dtype:?}: {e}");
            continue;
        }
        for (n, c) in cases.iter().enumerate() {
            let p = &c.p;
            let q = random_values(p.batch * p.heads_q * p.seq_q * p.head_dim, 2 * n as u64 + 1, dtype, 1.0);
            let k = random_values(p.batch * p.heads_kv * p.n_cmp * p.head_dim, 2 * n as u64 + 2, dtype, 1.0);
            let (lse, want) = reference(p, &q, &k);
            let lse32: Vec<f32> = lse.iter().map(|&x| x as f32).collect();
            let got = nsa_block_scores(&client, dtype, p, &upload(&client, dtype, &q), &upload(&client, dtype, &k), &upload_f32(&client, &lse32)).unwrap();
            let got = download_f32(&client, &got);
            let path = block_score_path(&client, dtype, p);
            // f32 on the cooperative-matrix kernel multiplies in TF32 (10-bit mantissa).
            let tol = if dtype == AttnDtype::F32 && path != BlockScorePath::TensorCore { 1e-4 } else { 2e-3 };
            assert_eq!(got.len(), want.len());
            for (x, (&a, &w)) in got.iter().zip(&want).enumerate() {
                let ok = if w.is_infinite() { a == w } else { (a - w).abs() <= tol * w.abs().max(1.0) };
                assert!(ok, "case {n} ({path:?}, {dtype:?}, seq_k {}): element {x}: got {a}, want {w}", c.seq_k);
            }
        }
    }
}

#[test]
fn block_scores_reject_bad_arguments() {
    let client = device_from_env().client();
    let mut c = case(1, 4, 3, 8, 8, 16, (4, 2, 4), (1, 2), (0, 8));
    let h = upload_f32(&client, &[0.0; 4096]);
    let e = nsa_block_scores(&client, AttnDtype::F32, &c.p, &h, &h, &h).unwrap_err();
    assert!(e.to_string().contains("heads_kv"), "{e}");
    c.p.heads_kv = 2;
    c.p.rows = 9;
    let e = nsa_block_scores(&client, AttnDtype::F32, &c.p, &h, &h, &h).unwrap_err();
    assert!(e.to_string().contains("rows"), "{e}");
    c.p.rows = 8;
    let short = upload_f32(&client, &[0.0; 4]);
    let e = nsa_block_scores(&client, AttnDtype::F32, &c.p, &short, &h, &h).unwrap_err();
    assert!(e.to_string().contains("`q`") || e.to_string().contains("q"), "{e}");
}
