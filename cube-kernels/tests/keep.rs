//! DMA's keep threshold on the device against a host reference that sorts each row's visible
//! keys: `window`-th largest `(bias, index)` pair, `(-inf, 0)` when the row sees at most
//! `window` keys. Coarse bias values give many exact ties. Same runtime selection as
//! `attention.rs`.
#![cfg(any(feature = "wgpu", feature = "cuda"))]

use sparse_attn_kernels::host::{device_from_env, download_f32, download_i32, upload_f32};
use sparse_attn_kernels::*;

fn reference(bias: &[f32], heads: usize, sq: usize, sk: usize, w: usize, causal: bool) -> (Vec<f32>, Vec<i32>) {
    let (mut tv, mut ti) = (Vec::new(), Vec::new());
    for h in 0..heads {
        let row = &bias[h * sk..(h + 1) * sk];
        for i in 0..sq {
            let vis = if causal { (i as i64 + sk as i64 - sq as i64 + 1).clamp(0, sk as i64) as usize } else { sk };
            if vis <= w {
                tv.push(f32::NEG_INFINITY);
                ti.push(0);
                continue;
            }
            let mut keys: Vec<(f32, usize)> = (0..vis).map(|j| (row[j], j)).collect();
            // Descending by (value, index): the w-th is the smallest kept pair.
            keys.sort_by(|a, b| b.0.partial_cmp(&a.0).unwrap().then(b.1.cmp(&a.1)));
            let (v, j) = keys[w - 1];
            tv.push(v);
            ti.push(j as i32);
        }
    }
    (tv, ti)
}

#[test]
fn keep_threshold_matches_sorted_reference() {
    let client = device_from_env().client();
    let mut s = 777u64;
    for (heads, sq, sk, w, causal) in [
        (3, 40, 40, 7, true),
        (2, 13, 50, 5, true),
        (2, 50, 20, 4, true),
        (1, 30, 30, 64, true),
        (2, 9, 33, 10, false),
        (1, 1, 1000, 100, true),
        (2, 700, 700, 60, true),
        (1, 300, 600, 20, false),
    ] {
        let bias: Vec<f32> = (0..heads * sk)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 40) % 9) as f32 * 0.5 - 2.0
            })
            .collect();
        let h = upload_f32(&client, &bias);
        let (v, i) = keep_threshold(&client, &h, heads, sq, sk, w, causal).unwrap();
        let got_v: Vec<f32> = download_f32(&client, &v).into_iter().take(heads * sq).map(|x| x as f32).collect();
        let got_i = download_i32(&client, &i, heads * sq);
        let (want_v, want_i) = reference(&bias, heads, sq, sk, w, causal);
        let what = format!("heads {heads}, sq {sq}, sk {sk}, window {w}, causal {causal}");
        assert_eq!(got_v, want_v, "{what}: values");
        assert_eq!(got_i, want_i, "{what}: indices");
    }
}

#[test]
fn keep_threshold_rejects_bad_window_and_short_bias() {
    let client = device_from_env().client();
    let h = upload_f32(&client, &[0.0; 8]);
    let e = keep_threshold(&client, &h, 2, 4, 4, 0, true).unwrap_err();
    assert!(e.to_string().contains("`window`"), "{e}");
    let e = keep_threshold(&client, &h, 3, 4, 4, 2, true).unwrap_err();
    assert!(e.to_string().contains("bias"), "{e}");
}
