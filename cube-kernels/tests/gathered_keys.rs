//! Gathered keys ([`AttnInputs::key_positions`]): dynamic-mask attention walked in DMA's
//! gathered key order ([`key_order`]) with per-query-tile block lists gives the output, LSE
//! and every gradient (dQ, dK, dV, dbias) of the same problem walked densely in sequence
//! order. On CUDA (f16, bf16: the fragment path) both runs
//! are compared; elsewhere the argument must be refused by name.
#![cfg(any(feature = "wgpu", feature = "cuda"))]

use sparse_attn_kernels::host::{device_from_env, download, download_f32, random_values, round_to, sync, upload, upload_f32, upload_i32};
use sparse_attn_kernels::*;


fn assert_close(name: &str, got: &[f64], want: &[f64], tol: f64) {
    let num: f64 = got.iter().zip(want).map(|(a, b)| (a - b).powi(2)).sum();
    let den: f64 = want.iter().map(|b| b * b).sum::<f64>().max(1e-30);
    let rel = (num / den).sqrt();
    assert!(rel <= tol, "{name}: relative error {rel:.2e} > {tol:.0e}");
}

#[test]
fn gathered_keys_match_sequence_order() {
    let client = device_from_env().client();
    // (batch, heads_q, heads_kv, seq_q, seq_k, head_dim, keep, bias kind)
    let cases = [(1, 4, 2, 200, 200, 64, 40, 0), (1, 16, 1, 150, 190, 128, 64, 1), (2, 2, 2, 130, 130, 32, 20, 2)];
    for dtype in [AttnDtype::F16, AttnDtype::BF16] {
        for &(b, hq, hkv, sq, sk, d, keep, kind) in &cases {
            let p = AttnProblem { batch: b, heads_q: hq, heads_kv: hkv, seq_q: sq, seq_k: sk, head_dim: d, scale: 1.0 / (d as f32).sqrt(), causal: true, window: None };
            let q = random_values(b * hq * sq * d, 1, dtype, 1.0);
            let k = random_values(b * hkv * sk * d, 2, dtype, 1.0);
            let v = random_values(b * hkv * sk * d, 3, dtype, 1.0);
            let d_o = random_values(b * hq * sq * d, 4, dtype, 1.0);
            let bias: Vec<f64> = match kind {
                0 => random_values(b * hkv * sk, 5, dtype, 1.0).iter().map(|x| x * 4.0).collect(),
                1 => (0..b * hkv * sk).map(|i| round_to(dtype, ((i % sk) as f64) / sk as f64)).collect(),
                _ => random_values(b * hkv * sk, 6, dtype, 1.0).iter().map(|x| (x * 3.0).round()).collect(),
            };
            let heads = b * hkv;
            let bias32: Vec<f32> = bias.iter().map(|&x| x as f32).collect();
            let (tv, ti) = keep_threshold(&client, &upload_f32(&client, &bias32), heads, sq, sk, keep, true).unwrap();
            // Sequence order, dense walk.
            let kb_plain = KeyBias { values: upload(&client, dtype, &bias), heads: hkv, threshold: Some((tv.clone(), ti.clone())), pairwise: false };
            let (qh, kh, vh, doh) = (upload(&client, dtype, &q), upload(&client, dtype, &k), upload(&client, dtype, &v), upload(&client, dtype, &d_o));
            let plain = AttnInputs { q: &qh, k: &kh, v: &vh, bias: Some(&kb_plain), schedule: None, key_positions: None, segments: None };
            if kernel_path(&client, dtype, d) != KernelPath::Fragment {
                let last = key_last_rows(&client, &upload_f32(&client, &bias32), &tv, &ti, heads, sq, sk, true).unwrap();
                let order = key_order(&client, &last, heads, sq, sk, 64, 64, true).unwrap();
                let sched = BlockSchedule { indices: order.lists, sel_heads: hkv, capacity: order.n_key_blocks, query_block: 64, key_block: 64 };
                let e = attention_forward(&client, &p, dtype, &AttnInputs { schedule: Some(&sched), key_positions: Some(&order.perm), ..plain });
                match (supports(&client, dtype), e) {
                    (Ok(()), Err(e)) => assert!(e.to_string().contains("key_positions"), "{e}"),
                    (Ok(()), Ok(_)) => panic!("gathered keys accepted off the fragment path"),
                    (Err(_), _) => {}
                }
                // The order's kernels may still run: finish them before the process can exit
                // (software Vulkan has crashed at exit with work in flight).
                sync(&client);
                continue;
            }
            let (o_ref, lse_ref) = attention_forward(&client, &p, dtype, &plain).unwrap();
            let g_ref = attention_backward(&client, &p, dtype, &plain, &o_ref, &lse_ref, &doh).unwrap();
            // Gathered order: the same buffers, walked through the permutation.
            let last = key_last_rows(&client, &upload_f32(&client, &bias32), &tv, &ti, heads, sq, sk, true).unwrap();
            let order = key_order(&client, &last, heads, sq, sk, 64, 64, true).unwrap();
            let sched = BlockSchedule { indices: order.lists, sel_heads: hkv, capacity: order.n_key_blocks, query_block: 64, key_block: 64 };
            let gathered = AttnInputs { schedule: Some(&sched), key_positions: Some(&order.perm), ..plain };
            let (o, lse) = attention_forward(&client, &p, dtype, &gathered).unwrap();
            let g = attention_backward(&client, &p, dtype, &gathered, &o, &lse, &doh).unwrap();
            let tol = 2e-2;
            let what = format!("{dtype:?} b{b} hq{hq} hkv{hkv} sq{sq} sk{sk} d{d} keep{keep} kind{kind}");
            assert_close(&format!("O {what}"), &download(&client, dtype, &o), &download(&client, dtype, &o_ref), tol);
            let (l, lr) = (download_f32(&client, &lse), download_f32(&client, &lse_ref));
            assert!(l.iter().zip(&lr).all(|(a, b)| (a - b).abs() <= 1e-2 * b.abs().max(1.0)), "LSE {what}");
            assert_close(&format!("dQ {what}"), &download(&client, dtype, &g.dq), &download(&client, dtype, &g_ref.dq), tol);
            let dl = |h: &Handle| download(&client, dtype, h);
            assert_close(&format!("dK {what}"), &dl(&g.dk), &dl(&g_ref.dk), tol);
            assert_close(&format!("dV {what}"), &dl(&g.dv), &dl(&g_ref.dv), tol);
            assert_close(&format!("dbias {what}"), &dl(g.dbias.as_ref().unwrap()), &dl(g_ref.dbias.as_ref().unwrap()), tol);
        }
    }
}

#[test]
fn gathered_keys_need_a_schedule_and_no_window() {
    let client = device_from_env().client();
    let p = AttnProblem { batch: 1, heads_q: 2, heads_kv: 1, seq_q: 8, seq_k: 8, head_dim: 16, scale: 0.25, causal: true, window: None };
    let h = upload_f32(&client, &[0.0; 256]);
    let pos = upload_i32(&client, &[0; 8]);
    let inputs = AttnInputs { q: &h, k: &h, v: &h, bias: None, schedule: None, key_positions: Some(&pos), segments: None };
    let e = attention_forward(&client, &p, AttnDtype::F32, &inputs).unwrap_err();
    assert!(e.to_string().contains("key_positions"), "{e}");
    let sched = BlockSchedule { indices: upload_i32(&client, &[0; 8]), sel_heads: 1, capacity: 1, query_block: 8, key_block: 8 };
    let windowed = AttnProblem { window: Some(4), ..p.clone() };
    let e = attention_forward(&client, &windowed, AttnDtype::F32, &AttnInputs { schedule: Some(&sched), ..inputs }).unwrap_err();
    assert!(e.to_string().contains("key_positions"), "{e}");    sync(&client);
}
