//! DMA's gathered key order against a host reference: each key's last keeping row (from the
//! keep threshold), the order's bucketing (latest tile first, index order within a tile),
//! and that every query tile's block list covers every key its rows keep. Random, tied and
//! monotone biases; causal and not; seq_q != seq_k.
#![cfg(any(feature = "wgpu", feature = "cuda"))]

use sparse_attn_kernels::host::{device_from_env, download_f32, download_i32, upload_f32};
use sparse_attn_kernels::*;

/// Keep rule of row `t` for key `j` from the thresholds, as the kernels apply it.
fn kept(b: f32, j: usize, tv: f32, ti: i32) -> bool {
    b > tv || (b == tv && j as i32 >= ti)
}

#[test]
fn key_order_covers_every_kept_key() {
    let client = device_from_env().client();
    let mut s = 7u64;
    let mut rnd = move || {
        s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (s >> 33) as u32
    };
    for (heads, sq, sk, w, causal, kind, qt, kb) in [
        (2, 200, 200, 24, true, 0, 16, 16),
        (1, 150, 260, 40, true, 1, 32, 16),
        (2, 90, 90, 10, true, 2, 8, 8),
        (1, 70, 70, 12, true, 3, 16, 8),
        (1, 50, 80, 9, false, 0, 16, 16),
        (2, 600, 1000, 50, true, 1, 8, 16),
        // Many more buckets (query tiles) than keys; sq > sk.
        (1, 9000, 60, 8, true, 0, 1, 16),
    ] {
        let bias: Vec<f32> = (0..heads * sk)
            .map(|i| match kind {
                0 => (rnd() % 10_000) as f32 / 100.0,
                1 => (rnd() % 5) as f32,           // many ties
                2 => (i % sk) as f32,              // increasing: a sliding window
                _ => -((i % sk) as f32),           // decreasing: the first keys forever
            })
            .collect();
        let bh = upload_f32(&client, &bias);
        let (tv, ti) = keep_threshold(&client, &bh, heads, sq, sk, w, causal).unwrap();
        let last = key_last_rows(&client, &bh, &tv, &ti, heads, sq, sk, causal).unwrap();
        let order = key_order(&client, &last, heads, sq, sk, qt, kb, causal).unwrap();
        let tv = download_f32(&client, &tv);
        let ti = download_i32(&client, &ti, heads * sq);
        let last = download_i32(&client, &last, heads * sk);
        let perm = download_i32(&client, &order.perm, heads * sk);
        let n_tiles = sq.div_ceil(qt);
        let nkb = order.n_key_blocks;
        assert_eq!(nkb, sk.div_ceil(kb));
        let lists = download_i32(&client, &order.lists, heads * n_tiles * nkb);
        let off = sk as i64 - sq as i64;
        let mut listed_pairs = 0usize;
        for h in 0..heads {
            // Last rows: brute force over every row.
            for j in 0..sk {
                let b = bias[h * sk + j];
                let rows: Vec<usize> = (0..sq)
                    .filter(|&t| (!causal || j as i64 <= t as i64 + off) && kept(b, j, tv[h * sq + t] as f32, ti[h * sq + t]))
                    .collect();
                let want = rows.last().map_or(-1, |&t| t as i32);
                assert_eq!(last[h * sk + j], want, "kind {kind}, head {h}, key {j}");
                if let (Some(&a), Some(&z)) = (rows.first(), rows.last()) {
                    assert_eq!(rows.len(), z - a + 1, "kind {kind}: rows keeping key {j} are not an interval");
                }
            }
            // The order: a permutation, buckets latest first, index order within a bucket.
            let p = &perm[h * sk..(h + 1) * sk];
            let mut seen = p.to_vec();
            seen.sort_unstable();
            assert_eq!(seen, (0..sk as i32).collect::<Vec<_>>(), "kind {kind}: not a permutation");
            let key = |j: i32| {
                let l = last[h * sk + j as usize];
                (if l < 0 { i64::MAX } else { -(l as i64 / qt as i64) }, j)
            };
            assert!(p.windows(2).all(|x| key(x[0]) < key(x[1])), "kind {kind}: order");
            // Coverage: each kept (row, key) pair's permuted block is in the row tile's list.
            let slot: Vec<usize> = {
                let mut v = vec![0; sk];
                for (s, &j) in p.iter().enumerate() {
                    v[j as usize] = s;
                }
                v
            };
            for t in 0..sq {
                let list = &lists[(h * n_tiles + t / qt) * nkb..(h * n_tiles + t / qt + 1) * nkb];
                for j in 0..sk {
                    let visible = !causal || j as i64 <= t as i64 + off;
                    if visible && kept(bias[h * sk + j], j, tv[h * sq + t] as f32, ti[h * sq + t]) {
                        assert!(list.contains(&((slot[j] / kb) as i32)), "kind {kind}: row {t} keeps key {j}, block {} not listed", slot[j] / kb);
                    }
                }
            }
            listed_pairs += lists[h * n_tiles * nkb..(h + 1) * n_tiles * nkb].iter().filter(|&&x| x >= 0).count();
        }
        println!("kind {kind}: {listed_pairs} listed (tile, block) pairs of {} dense", heads * n_tiles * nkb);
    }
}
