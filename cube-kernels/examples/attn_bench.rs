//! Times forward and forward+backward for dense causal attention and for block schedules:
//! `nsa`, an NSA-like per-token schedule (`--nsel` selected blocks of `--bk` keys per query
//! token, shared by the query heads of a GQA group; block 0 and the two most recent blocks
//! always selected; `--nsa-reuse p` keeps each of the previous token's other blocks with
//! probability p, as trained selections drift slowly, default 0: independent lists), and `moba`, a MoBA-like per-head schedule (`--moba-block` keys per block,
//! `--moba-topk` blocks per query block of the same size, own block included), and
//! `mobatok`, MoBA's per-token form (one list per head and token: the own block and
//! `--moba-topk - 1` random complete earlier blocks).
//!
//! ```text
//! cargo run --release -p sparse-attn-kernels --features cuda --example attn_bench -- \
//!     --b 1 --hq 16 --hkv 16 --s 4096 --d 128 --dtype bf16 --iters 5 --json out.jsonl
//! ```
//! `--json FILE` appends one JSON object per measurement (`impl`, `method`, `seq`,
//! `heads_q`, `heads_kv`, `head_dim`, `dtype`, `fwd_ms`, `fwdbwd_ms`, `peak_mib` (null: not
//! measured here), `gpu`, `pairs`).
//! Runtime: `cuda` feature -> CUDA device 0, else `wgpu`. TFLOP/s count `4 * D` flops per
//! attended (query, key) pair for the forward and `10 * D` for forward+backward (the
//! FlashAttention convention: backward = 2.5x forward), over the pairs actually attended.

#[cfg(not(any(feature = "wgpu", feature = "cuda")))]
fn main() {
    eprintln!("attn_bench needs a runtime feature: --features wgpu or --features cuda");
}

#[cfg(any(feature = "wgpu", feature = "cuda"))]
fn main() {
    use sparse_attn_kernels::host::{sync, upload, upload_i32};
    use sparse_attn_kernels::*;
    use std::time::Instant;

    let args: Vec<String> = std::env::args().collect();
    let get = |name: &str, default: &str| -> String {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1).cloned())
            .unwrap_or_else(|| default.to_string())
    };
    let b: usize = get("--b", "1").parse().unwrap();
    let hq: usize = get("--hq", "16").parse().unwrap();
    let hkv: usize = get("--hkv", "16").parse().unwrap();
    let s: usize = get("--s", "2048").parse().unwrap();
    let d: usize = get("--d", "128").parse().unwrap();
    let iters: usize = get("--iters", "3").parse().unwrap();
    let n_sel: usize = get("--nsel", "16").parse().unwrap();
    let bk: usize = get("--bk", "64").parse().unwrap();
    let only = get("--only", "all");
    let json = get("--json", "");
    let gpu = get("--gpu", "");
    let moba_block: usize = get("--moba-block", "512").parse().unwrap();
    let moba_topk: usize = get("--moba-topk", "3").parse().unwrap();
    // Share of a token's non-forced NSA blocks taken over from the previous token's list
    // (0: independent random lists, the hardest case for reuse between tokens).
    let nsa_reuse: f64 = get("--nsa-reuse", "0").parse().unwrap();
    assert!((0.0..=1.0).contains(&nsa_reuse), "--nsa-reuse is a share in [0, 1]");
    let dtype = match get("--dtype", "f32").as_str() {
        "f32" => AttnDtype::F32,
        "f16" => AttnDtype::F16,
        "bf16" => AttnDtype::BF16,
        x => panic!("--dtype {x}?"),
    };

    let client = sparse_attn_kernels::host::device_from_env().client();
    println!("{}", describe(&client));
    if let Err(e) = supports(&client, dtype) {
        println!("{e}");
        return;
    }

    let mut seed = 1u64;
    let mut rnd = |n: usize| -> Vec<f64> {
        (0..n)
            .map(|_| {
                seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((seed >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
            })
            .collect()
    };
    let q = upload(&client, dtype, &rnd(b * hq * s * d));
    let k = upload(&client, dtype, &rnd(b * hkv * s * d));
    let v = upload(&client, dtype, &rnd(b * hkv * s * d));
    let d_o = upload(&client, dtype, &rnd(b * hq * s * d));
    let p = AttnProblem {
        batch: b,
        heads_q: hq,
        heads_kv: hkv,
        seq_q: s,
        seq_k: s,
        head_dim: d,
        scale: 1.0 / (d as f32).sqrt(),
        causal: true,
        window: None,
    };

    // NSA-like schedule: per (batch, kv head, token): block 0, the 2 most recent blocks,
    // then random earlier blocks up to n_sel distinct ones; with `--nsa-reuse p`, each of
    // the previous token's other blocks is kept first with probability p (trained NSA
    // selections change slowly from token to token).
    let nkb = s.div_ceil(bk);
    let mut idx = vec![-1i32; b * hkv * s * n_sel];
    let mut pairs_sparse = 0usize;
    let mut lcg = 7u64;
    for bh in 0..b * hkv {
        for t in 0..s {
            let cur = t / bk;
            let mut chosen: Vec<usize> = vec![0];
            for c in [cur, cur.saturating_sub(1)] {
                if !chosen.contains(&c) {
                    chosen.push(c);
                }
            }
            if t > 0 && nsa_reuse > 0.0 {
                let prev = &idx[(bh * s + t - 1) * n_sel..(bh * s + t) * n_sel];
                for &c in prev.iter().filter(|&&c| c >= 0) {
                    lcg = lcg.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    let kept = ((lcg >> 11) as f64 / (1u64 << 53) as f64) < nsa_reuse;
                    if kept && chosen.len() < n_sel && !chosen.contains(&(c as usize)) {
                        chosen.push(c as usize);
                    }
                }
            }
            let list = &mut idx[(bh * s + t) * n_sel..(bh * s + t + 1) * n_sel];
            let mut tries = 0;
            while chosen.len() < n_sel.min(cur + 1) && tries < 10 * n_sel {
                lcg = lcg.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                let c = (lcg >> 33) as usize % (cur + 1);
                if !chosen.contains(&c) {
                    chosen.push(c);
                }
                tries += 1;
            }
            for (e, &c) in chosen.iter().take(n_sel).enumerate() {
                list[e] = c as i32;
                let lo = c * bk;
                let hi = ((c + 1) * bk).min(s).min(t + 1);
                pairs_sparse += hi.saturating_sub(lo);
            }
        }
    }
    let pairs_sparse = pairs_sparse * (hq / hkv);
    let sched = BlockSchedule {
        indices: upload_i32(&client, &idx),
        sel_heads: hkv,
        capacity: n_sel,
        query_block: 1,
        key_block: bk,
    };
    let pairs_dense = b * hq * s * (s + 1) / 2;
    let _ = nkb;

    // MoBA-like schedule: per (batch, head, query block of `moba_block`): the own block and
    // `moba_topk - 1` random earlier blocks.
    let mb = moba_block;
    let n_qb = s.div_ceil(mb);
    let mut midx = vec![-1i32; b * hq * n_qb * moba_topk];
    let mut pairs_moba = 0usize;
    for bh in 0..b * hq {
        for r in 0..n_qb {
            let list = &mut midx[(bh * n_qb + r) * moba_topk..(bh * n_qb + r + 1) * moba_topk];
            let mut chosen: Vec<usize> = vec![r];
            let mut tries = 0;
            while chosen.len() < moba_topk.min(r + 1) && tries < 100 {
                lcg = lcg.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                let c = (lcg >> 33) as usize % r.max(1);
                if !chosen.contains(&c) {
                    chosen.push(c);
                }
                tries += 1;
            }
            for (e, &c) in chosen.iter().enumerate() {
                list[e] = c as i32;
                for t in r * mb..((r + 1) * mb).min(s) {
                    let lo = c * mb;
                    let hi = ((c + 1) * mb).min(s).min(t + 1);
                    pairs_moba += hi.saturating_sub(lo);
                }
            }
        }
    }
    let moba_sched = BlockSchedule {
        indices: upload_i32(&client, &midx),
        sel_heads: hq,
        capacity: moba_topk,
        query_block: mb,
        key_block: mb,
    };
    // MoBA's own granularity: per (batch, head, token), the token's own block and
    // `moba_topk - 1` random complete earlier blocks (lists differ from token to token, one
    // query row per list: the gathered path).
    let mut tidx = vec![-1i32; b * hq * s * moba_topk];
    let mut pairs_moba_tok = 0usize;
    for bh in 0..b * hq {
        for t in 0..s {
            let r = t / mb;
            let list = &mut tidx[(bh * s + t) * moba_topk..(bh * s + t + 1) * moba_topk];
            list[0] = r as i32;
            pairs_moba_tok += t + 1 - r * mb;
            let mut n = 1;
            let mut tries = 0;
            while n < moba_topk.min(r + 1) && tries < 100 {
                lcg = lcg.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                let c = ((lcg >> 33) as usize % r.max(1)) as i32;
                if !list[..n].contains(&c) {
                    list[n] = c;
                    n += 1;
                    pairs_moba_tok += mb;
                }
                tries += 1;
            }
        }
    }
    let moba_tok_sched = BlockSchedule {
        indices: upload_i32(&client, &tidx),
        sel_heads: hq,
        capacity: moba_topk,
        query_block: 1,
        key_block: mb,
    };
    let dname = format!("{dtype:?}").to_lowercase();
    let run = |label: &str, method: &str, schedule: Option<&BlockSchedule>, pairs: usize| {
        let inputs = AttnInputs { q: &q, k: &k, v: &v, bias: None, schedule, key_positions: None, segments: None };
        // Warm-up (kernel compilation).
        let (o, lse) = attention_forward(&client, &p, dtype, &inputs).unwrap();
        let _ = attention_backward(&client, &p, dtype, &inputs, &o, &lse, &d_o).unwrap();
        sync(&client);
        let t0 = Instant::now();
        for _ in 0..iters {
            let _ = attention_forward(&client, &p, dtype, &inputs).unwrap();
        }
        sync(&client);
        let fwd = t0.elapsed().as_secs_f64() / iters as f64;
        let t0 = Instant::now();
        for _ in 0..iters {
            let (o, lse) = attention_forward(&client, &p, dtype, &inputs).unwrap();
            let _ = attention_backward(&client, &p, dtype, &inputs, &o, &lse, &d_o).unwrap();
        }
        sync(&client);
        let fb = t0.elapsed().as_secs_f64() / iters as f64;
        let fl = pairs as f64 * d as f64;
        println!(
            "{label:>12}: B={b} Hq={hq} Hkv={hkv} S={s} D={d} {dtype:?}: fwd {:.3} ms ({:.2} TFLOP/s), fwd+bwd {:.3} ms ({:.2} TFLOP/s), pairs {pairs}",
            fwd * 1e3,
            4.0 * fl / fwd / 1e12,
            fb * 1e3,
            10.0 * fl / fb / 1e12,
        );
        if !json.is_empty() {
            use std::io::Write;
            let line = format!(
                "{{\"impl\":\"ours\",\"method\":\"{method}\",\"seq\":{s},\"batch\":{b},\"heads_q\":{hq},\"heads_kv\":{hkv},\"head_dim\":{d},\"dtype\":\"{dname}\",\"fwd_ms\":{:.4},\"fwdbwd_ms\":{:.4},\"peak_mib\":null,\"gpu\":\"{gpu}\",\"pairs\":{pairs},\"path\":\"{:?}\"}}",
                fwd * 1e3,
                fb * 1e3,
                kernel_path(&client, dtype, d),
            );
            let mut f = std::fs::OpenOptions::new().create(true).append(true).open(&json).expect("--json: cannot open file");
            writeln!(f, "{line}").expect("--json: write failed");
        }
    };
    if only == "all" || only == "dense" {
        run("dense causal", "dense", None, pairs_dense);
    }
    if only == "all" || only == "nsa" {
        let (label, method) = if nsa_reuse > 0.0 {
            (format!("nsa {n_sel}x{bk} reuse {nsa_reuse}"), format!("nsa{n_sel}x{bk}r{nsa_reuse}"))
        } else {
            (format!("nsa {n_sel}x{bk}"), format!("nsa{n_sel}x{bk}"))
        };
        run(&label, &method, Some(&sched), pairs_sparse);
    }
    if only == "all" || only == "moba" {
        run(&format!("moba {moba_topk}x{mb}"), &format!("moba{moba_topk}x{mb}"), Some(&moba_sched), pairs_moba);
    }
    if only == "all" || only == "mobatok" {
        run(&format!("moba/tok {moba_topk}x{mb}"), &format!("mobatok{moba_topk}x{mb}"), Some(&moba_tok_sched), pairs_moba_tok);
    }
}
