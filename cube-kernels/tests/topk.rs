//! Row top-k against a host reference (stable descending sort: ties keep index order; `-inf`
//! and NaN never chosen, `-1` padding). Same runtime selection as `attention.rs`.
#![cfg(any(feature = "wgpu", feature = "cuda"))]

use sparse_attn_kernels::host::{device_from_env, download_i32, upload_f32};
use sparse_attn_kernels::*;

fn reference(values: &[f32], rows: usize, n: usize, k: usize) -> Vec<i32> {
    let mut out = Vec::with_capacity(rows * k);
    for r in 0..rows {
        let row = &values[r * n..(r + 1) * n];
        let mut idx: Vec<usize> = (0..n).filter(|&j| row[j] > f32::NEG_INFINITY).collect();
        // Stable: equal values keep ascending index order.
        idx.sort_by(|&a, &b| row[b].partial_cmp(&row[a]).unwrap());
        for x in 0..k {
            out.push(idx.get(x).map_or(-1, |&j| j as i32));
        }
    }
    out
}

#[test]
fn row_topk_matches_sorted_reference() {
    let client = device_from_env().client();
    let mut s = 12345u64;
    for (rows, n, k) in [(7, 1, 1), (33, 32, 3), (5, 256, 16), (3, 40, 50), (129, 9, 4)] {
        let values: Vec<f32> = (0..rows * n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                let u = (s >> 40) % 16;
                match u {
                    0 => f32::NEG_INFINITY,
                    1 => f32::INFINITY,
                    2 => f32::NAN,
                    // Coarse values: many exact ties.
                    _ => ((s >> 20) % 7) as f32 - 3.0,
                }
            })
            .collect();
        let h = upload_f32(&client, &values);
        let got = download_i32(&client, &row_topk(&client, &h, rows, n, k).unwrap(), rows * k);
        assert_eq!(got, reference(&values, rows, n, k), "rows {rows}, n {n}, k {k}");
    }
}

#[test]
fn row_topk_rejects_bad_k_and_short_buffers() {
    let client = device_from_env().client();
    let h = upload_f32(&client, &[1.0; 8]);
    let e = row_topk(&client, &h, 2, 4, 0).unwrap_err();
    assert!(e.to_string().contains("`k`"), "{e}");
    let e = row_topk(&client, &h, 2, 4, MAX_TOPK + 1).unwrap_err();
    assert!(e.to_string().contains("`k`"), "{e}");
    let e = row_topk(&client, &h, 3, 4, 2).unwrap_err();
    assert!(e.to_string().contains("values"), "{e}");
}
