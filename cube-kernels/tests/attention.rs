//! Kernel vs f64 reference (docs/testing.md sections 3-4). Runtime: feature `cuda` -> CUDA device 0, else
//! feature `wgpu` -> the default wgpu adapter. Dtypes: env `SPARSE_ATTN_DTYPES`
//! (comma-separated `f32,f16,bf16`; default `f32`); a dtype the device lacks is skipped
//! with a message (and `unsupported_dtype_is_an_error` checks the error).
#![cfg(any(feature = "wgpu", feature = "cuda"))]

use sparse_attn_kernels::host::{dtypes_from_env, download, download_f32, nan_buffer, round_to, upload, upload_f32, upload_i32};
use sparse_attn_kernels::reference::{self, RefBias, RefInputs, RefSchedule};
use sparse_attn_kernels::*;

fn client() -> Client {
    let c = sparse_attn_kernels::host::device_from_env().client();
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| eprintln!("[sparse-attn-kernels tests] {}", describe(&c)));
    c
}


/// Deterministic pseudo-random numbers in [-1, 1).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> f64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((self.0 >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
    }
    fn below(&mut self, n: usize) -> usize {
        (((self.next() + 1.0) / 2.0) * n as f64) as usize % n.max(1)
    }
    fn vec(&mut self, n: usize, scale: f64) -> Vec<f64> {
        (0..n).map(|_| self.next() * scale).collect()
    }
}

#[derive(Clone, Copy, Debug)]
enum Thr {
    /// Keep the `w` visible keys with the largest bias; some rows keep all (-inf), some none (+inf).
    TopW(usize),
}

#[derive(Clone, Debug)]
enum Sel {
    /// Random lists: `n` entries each, with duplicates, -1s, out-of-range values, any order.
    Random { sel_heads_kv: bool, query_block: usize, key_block: usize, cap: usize },
    /// Every block, in reverse order.
    Full { sel_heads_kv: bool, query_block: usize, key_block: usize },
    /// Every entry -1.
    Empty { query_block: usize, key_block: usize },
    /// Lists shared by a GQA group whose first entry is block 0 for every row (NSA's forced
    /// first block: one key block seen by every query), the others random valid blocks.
    ForcedFirst { query_block: usize, key_block: usize, cap: usize },
}

#[derive(Clone, Debug)]
struct Case {
    name: &'static str,
    p: AttnProblem,
    /// Bias heads: None, Some(false) = Hkv, Some(true) = Hq.
    bias_per_q_head: Option<bool>,
    thr: Option<Thr>,
    sel: Option<Sel>,
    /// Quantise the bias to few values (ties for the threshold rule).
    bias_ties: bool,
    /// One bias per (query, key) pair, `[B, Hb, Sq, Sk]` ([`KeyBias::pairwise`]).
    pair_bias: bool,
    /// Packed sequences `(cu_seqlens_q, cu_seqlens_k)`; the problem's causal flag and window
    /// then apply within each sequence.
    varlen: Option<(Vec<usize>, Vec<usize>)>,
}

#[allow(clippy::too_many_arguments)]
fn prob(b: usize, hq: usize, hkv: usize, sq: usize, sk: usize, d: usize, causal: bool, window: Option<usize>) -> AttnProblem {
    AttnProblem {
        batch: b,
        heads_q: hq,
        heads_kv: hkv,
        seq_q: sq,
        seq_k: sk,
        head_dim: d,
        scale: 1.0 / (d as f32).sqrt(),
        causal,
        window,
    }
}

fn case(name: &'static str, p: AttnProblem) -> Case {
    Case { name, p, bias_per_q_head: None, thr: None, sel: None, bias_ties: false, pair_bias: false, varlen: None }
}

fn rel_err(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let mut num = 0.0;
    let mut den = 0.0;
    for (x, y) in a.iter().zip(b) {
        num += (x - y) * (x - y);
        den += y * y;
    }
    if den == 0.0 { num.sqrt() } else { (num / den).sqrt() }
}

/// Split an LSE vector into (finite values, positions of -inf) and check the -inf pattern.
fn lse_parts(name: &str, got: &[f64], want: &[f64]) -> (Vec<f64>, Vec<f64>) {
    let mut g = Vec::new();
    let mut w = Vec::new();
    for (i, (&a, &b)) in got.iter().zip(want).enumerate() {
        if b == f64::NEG_INFINITY {
            assert!(a == f64::NEG_INFINITY, "{name}: lse[{i}] = {a}, expected -inf");
        } else {
            assert!(a.is_finite(), "{name}: lse[{i}] = {a}, expected {b}");
            g.push(a);
            w.push(b);
        }
    }
    (g, w)
}

struct Data {
    q: Vec<f64>,
    k: Vec<f64>,
    v: Vec<f64>,
    d_o: Vec<f64>,
    bias: Option<RefBias>,
    sched: Option<RefSchedule>,
    seg: Option<VarlenBounds>,
}

fn make_data(c: &Case, dtype: AttnDtype, seed: u64) -> Data {
    let p = &c.p;
    let mut rng = Rng(seed);
    let r = |v: Vec<f64>| v.into_iter().map(|x| round_to(dtype, x)).collect::<Vec<_>>();
    let q = r(rng.vec(p.batch * p.heads_q * p.seq_q * p.head_dim, 1.0));
    let k = r(rng.vec(p.batch * p.heads_kv * p.seq_k * p.head_dim, 1.0));
    let v = r(rng.vec(p.batch * p.heads_kv * p.seq_k * p.head_dim, 1.0));
    let d_o = r(rng.vec(p.batch * p.heads_q * p.seq_q * p.head_dim, 1.0));
    let bias = c.bias_per_q_head.map(|per_q| {
        let heads = if per_q { p.heads_q } else { p.heads_kv };
        let per_head = if c.pair_bias { p.seq_q * p.seq_k } else { p.seq_k };
        let mut values = rng.vec(p.batch * heads * per_head, 2.0);
        if c.bias_ties {
            for x in values.iter_mut() {
                *x = (*x * 2.0).round() / 2.0;
            }
        }
        let values = r(values);
        let threshold = c.thr.map(|Thr::TopW(w)| {
            let mut tv = vec![0.0; p.batch * heads * p.seq_q];
            let mut ti = vec![0i32; p.batch * heads * p.seq_q];
            for b in 0..p.batch {
                for hb in 0..heads {
                    for i in 0..p.seq_q {
                        let t = (b * heads + hb) * p.seq_q + i;
                        match i % 7 {
                            0 => {
                                tv[t] = f64::NEG_INFINITY;
                                ti[t] = 0;
                            }
                            3 => {
                                tv[t] = f64::INFINITY;
                                ti[t] = 0;
                            }
                            _ => {
                                let off = p.seq_k as i64 - p.seq_q as i64;
                                let mut vis: Vec<usize> = (0..p.seq_k)
                                    .filter(|&j| {
                                        let d = i as i64 + off - j as i64;
                                        (!p.causal || d >= 0) && p.window.is_none_or(|w| d < w as i64)
                                    })
                                    .collect();
                                let bj = |j: usize| match c.pair_bias {
                                    true => values[((b * heads + hb) * p.seq_q + i) * p.seq_k + j],
                                    false => values[(b * heads + hb) * p.seq_k + j],
                                };
                                vis.sort_by(|&x, &y| bj(y).partial_cmp(&bj(x)).unwrap().then(y.cmp(&x)));
                                if vis.len() > w {
                                    tv[t] = bj(vis[w - 1]);
                                    ti[t] = vis[w - 1] as i32;
                                } else {
                                    tv[t] = f64::NEG_INFINITY;
                                    ti[t] = 0;
                                }
                            }
                        }
                    }
                }
            }
            // Threshold values are f32 on the device.
            (tv.into_iter().map(|x| x as f32 as f64).collect(), ti)
        });
        RefBias { values, heads, threshold, pairwise: c.pair_bias }
    });
    let sched = c.sel.as_ref().map(|sel| {
        let (hs_kv, qb, kb) = match *sel {
            Sel::Random { sel_heads_kv, query_block, key_block, .. } => (sel_heads_kv, query_block, key_block),
            Sel::Full { sel_heads_kv, query_block, key_block } => (sel_heads_kv, query_block, key_block),
            Sel::Empty { query_block, key_block } => (false, query_block, key_block),
            Sel::ForcedFirst { query_block, key_block, .. } => (true, query_block, key_block),
        };
        let hs = if hs_kv { p.heads_kv } else { p.heads_q };
        let n_rows = p.seq_q.div_ceil(qb);
        let nkb = p.seq_k.div_ceil(kb);
        let cap = match *sel {
            Sel::Random { cap, .. } | Sel::ForcedFirst { cap, .. } => cap,
            Sel::Full { .. } => nkb,
            Sel::Empty { .. } => 3,
        };
        let mut indices = vec![-1i32; p.batch * hs * n_rows * cap];
        for l in 0..p.batch * hs * n_rows {
            let list = &mut indices[l * cap..(l + 1) * cap];
            match *sel {
                Sel::Random { .. } => {
                    for (e, x) in list.iter_mut().enumerate() {
                        let u = rng.below(10);
                        *x = match u {
                            0 => -1,
                            1 if e > 0 => -7,                 // other negatives are ignored too
                            2 => nkb as i32 + rng.below(3) as i32, // out of range: ignored
                            _ => rng.below(nkb) as i32,
                        };
                    }
                    // A few exact duplicates.
                    if cap >= 2 && rng.below(3) == 0 {
                        list[cap - 1] = list[0];
                    }
                }
                Sel::Full { .. } => {
                    for (e, x) in list.iter_mut().enumerate() {
                        *x = (nkb - 1 - e) as i32;
                    }
                }
                Sel::Empty { .. } => {}
                Sel::ForcedFirst { .. } => {
                    list[0] = 0;
                    for x in list.iter_mut().skip(1) {
                        *x = rng.below(nkb) as i32;
                    }
                }
            }
        }
        RefSchedule { indices, sel_heads: hs, capacity: cap, query_block: qb, key_block: kb }
    });
    let seg = c.varlen.as_ref().map(|(cq, ck)| varlen_bounds(cq, ck, p.causal, p.window).expect("cu_seqlens"));
    Data { q, k, v, d_o, bias, sched, seg }
}

struct Outputs {
    o: Vec<f64>,
    lse: Vec<f64>,
    dq: Vec<f64>,
    dk: Vec<f64>,
    dv: Vec<f64>,
    dbias: Option<Vec<f64>>,
}

/// Run forward (into NaN-poisoned buffers), then backward with the kernel's own o / lse.
fn run_kernels(client: &Client, p: &AttnProblem, dtype: AttnDtype, data: &Data) -> Outputs {
    let q = upload(client, dtype, &data.q);
    let k = upload(client, dtype, &data.k);
    let v = upload(client, dtype, &data.v);
    let d_o = upload(client, dtype, &data.d_o);
    let bias = data.bias.as_ref().map(|b| KeyBias {
        values: upload(client, dtype, &b.values),
        heads: b.heads,
        threshold: b.threshold.as_ref().map(|(tv, ti)| {
            let tvf: Vec<f32> = tv.iter().map(|&x| x as f32).collect();
            (upload_f32(client, &tvf), upload_i32(client, ti))
        }),
        pairwise: b.pairwise,
    });
    let sched = data.sched.as_ref().map(|s| BlockSchedule {
        indices: upload_i32(client, &s.indices),
        sel_heads: s.sel_heads,
        capacity: s.capacity,
        query_block: s.query_block,
        key_block: s.key_block,
    });
    let seg = data.seg.as_ref().map(|b| SegmentBounds::upload(client, b));
    let inputs = AttnInputs {
        q: &q,
        k: &k,
        v: &v,
        bias: bias.as_ref(),
        schedule: sched.as_ref(),
        key_positions: None,
        segments: seg.as_ref(),
    };
    let rows = p.batch * p.heads_q * p.seq_q;
    let o = nan_buffer(client, dtype, rows * p.head_dim);
    let lse = nan_buffer(client, AttnDtype::F32, rows);
    attention_forward_into(client, p, dtype, &inputs, &o, &lse).expect("forward");
    let kv = p.batch * p.heads_kv * p.seq_k * p.head_dim;
    let grads = AttnGrads {
        dq: nan_buffer(client, dtype, rows * p.head_dim),
        dk: nan_buffer(client, dtype, kv),
        dv: nan_buffer(client, dtype, kv),
        dbias: data.bias.as_ref().map(|b| nan_buffer(client, dtype, b.values.len())),
    };
    attention_backward_into(client, p, dtype, &inputs, &o, &lse, &d_o, &grads).expect("backward");
    let take = |v: Vec<f64>, n: usize| v[..n].to_vec();
    Outputs {
        o: take(download(client, dtype, &o), rows * p.head_dim),
        lse: take(download_f32(client, &lse), rows),
        dq: take(download(client, dtype, &grads.dq), rows * p.head_dim),
        dk: take(download(client, dtype, &grads.dk), kv),
        dv: take(download(client, dtype, &grads.dv), kv),
        dbias: grads.dbias.as_ref().map(|h| {
            take(download(client, dtype, h), data.bias.as_ref().unwrap().values.len())
        }),
    }
}

/// Round to TF32 (8-bit exponent, 10-bit mantissa, round to nearest even).
fn round_to_tf32(x: f64) -> f64 {
    let b = (x as f32).to_bits();
    let lsb = (b >> 13) & 1;
    f32::from_bits(b.wrapping_add(0x0fff + lsb) & !0x1fff) as f64
}

fn check_finite(name: &str, what: &str, v: &[f64]) {
    if let Some(i) = v.iter().position(|x| !x.is_finite()) {
        panic!("{name}: {what}[{i}] = {} (unwritten or NaN)", v[i]);
    }
}

fn run_case(c: &Case) {
    let client = client();
    for dtype in dtypes_from_env() {
        if let Err(e) = supports(&client, dtype) {
            eprintln!("{}: skipping {dtype:?}: {e}", c.name);
            continue;
        }
        let t0 = std::time::Instant::now();
        let data = make_data(c, dtype, 0x5eed ^ (c.name.len() as u64 * 7919));
        let out = run_kernels(&client, &c.p, dtype, &data);
        let t_kernel = t0.elapsed();
        let name = format!("{} [{dtype:?}]", c.name);
        for (w, v) in [("o", &out.o), ("dq", &out.dq), ("dk", &out.dk), ("dv", &out.dv)] {
            check_finite(&name, w, v);
        }
        if let Some(db) = &out.dbias {
            check_finite(&name, "dbias", db);
        }
        assert!(out.lse.iter().all(|x| !x.is_nan()), "{name}: NaN in lse");

        let inp = RefInputs {
            q: &data.q,
            k: &data.k,
            v: &data.v,
            bias: data.bias.as_ref(),
            schedule: data.sched.as_ref(),
            segments: data.seg.as_ref(),
        };
        let (o_ref, lse_ref) = reference::forward(&c.p, &inp, None);
        // Backward reference from the kernel's own o / lse ("use them as given").
        let g_ref = reference::backward(&c.p, &inp, &out.o, &out.lse, &data.d_o, None);
        let (lse_g, lse_w) = lse_parts(&name, &out.lse, &lse_ref);
        // Empty rows: exact zeros.
        for (row, &l) in lse_ref.iter().enumerate() {
            if l == f64::NEG_INFINITY {
                let d = c.p.head_dim;
                assert!(out.o[row * d..(row + 1) * d].iter().all(|&x| x == 0.0), "{name}: empty row {row} has o != 0");
                assert!(out.dq[row * d..(row + 1) * d].iter().all(|&x| x == 0.0), "{name}: empty row {row} has dq != 0");
            }
        }
        let mut pairs: Vec<(&str, Vec<f64>, Vec<f64>, f64)> = vec![
            ("o", out.o.clone(), o_ref.clone(), 2.0),
            ("lse", lse_g, lse_w, 2.0),
            ("dq", out.dq.clone(), g_ref.dq.clone(), 3.0),
            ("dk", out.dk.clone(), g_ref.dk.clone(), 3.0),
            ("dv", out.dv.clone(), g_ref.dv.clone(), 3.0),
        ];
        if let (Some(db), Some(dbr)) = (&out.dbias, &g_ref.dbias) {
            pairs.push(("dbias", db.clone(), dbr.clone(), 3.0));
        }
        // f32 on tensor cores multiplies in TF32: judged like f16/bf16, against a TF32 reference.
        // (Packed sequences run on the portable kernels everywhere.)
        let tf32 = dtype == AttnDtype::F32
            && c.varlen.is_none()
            && kernel_path(&client, dtype, c.p.head_dim) == KernelPath::TensorCore;
        match dtype {
            AttnDtype::F32 if !tf32 => {
                for (what, got, want, _) in &pairs {
                    let e = rel_err(got, want);
                    assert!(e < 1e-4, "{name}: {what} rel err {e:.3e} >= 1e-4");
                }
            }
            _ => {
                // FlashAttention rule: kernel error vs f64 <= 2x (o) / 3x (grads) the error
                // of a same-precision standard-attention reference (small absolute floor
                // for outputs that are exactly representable, e.g. all-zero dbias).
                let rnd = move |x: f64| if tf32 { round_to_tf32(x) } else { round_to(dtype, x) };
                let (o_h, lse_h) = reference::forward(&c.p, &inp, Some(&rnd));
                let g_h = reference::backward(&c.p, &inp, &out.o, &out.lse, &data.d_o, Some(&rnd));
                let (lse_hg, _) = lse_parts(&name, &lse_h, &lse_ref);
                let mut half = vec![o_h, lse_hg, g_h.dq, g_h.dk, g_h.dv];
                if let Some(db) = g_h.dbias {
                    half.push(db);
                }
                for ((what, got, want, factor), h) in pairs.iter().zip(&half) {
                    let e = rel_err(got, want);
                    let eh = rel_err(h, want);
                    assert!(
                        e <= factor * eh + if tf32 { 2e-5 } else { 1e-6 },
                        "{name}: {what} rel err {e:.3e} > {factor} x same-precision reference error {eh:.3e}"
                    );
                }
            }
        }
        let path = kernel_path(&client, dtype, c.p.head_dim);
        eprintln!("{name}: ok ({path:?}, kernels {:.2?}, total {:.2?})", t_kernel, t0.elapsed());
    }
}

// ---------------------------------------------------------------------------------------
// Dense
// ---------------------------------------------------------------------------------------

#[test]
fn dense_noncausal_ragged() {
    run_case(&case("dense_noncausal_ragged", prob(2, 3, 3, 37, 45, 64, false, None)));
}

#[test]
fn dense_causal_gqa() {
    run_case(&case("dense_causal_gqa", prob(1, 4, 2, 70, 70, 64, true, None)));
}

#[test]
fn dense_causal_mqa_sq_lt_sk_odd_dim() {
    run_case(&case("dense_causal_mqa_sq_lt_sk_d40", prob(1, 4, 1, 19, 83, 40, true, None)));
}

#[test]
fn dense_causal_sq_gt_sk_empty_rows() {
    run_case(&case("dense_causal_sq_gt_sk", prob(2, 2, 1, 50, 23, 64, true, None)));
}

#[test]
fn dense_single_query_d128() {
    run_case(&case("dense_single_query_d128", prob(1, 2, 1, 1, 100, 128, true, None)));
}

// ---------------------------------------------------------------------------------------
// Packed variable-length sequences
// ---------------------------------------------------------------------------------------

/// Causal packing of sequences of lengths 7, 0, 33, 1, 19 (an empty one, a single token, one
/// longer than a tile), GQA, batch 2 packed alike.
#[test]
fn varlen_causal_gqa() {
    let cu = vec![0, 7, 7, 40, 41, 60];
    let mut c = case("varlen_causal_gqa", prob(2, 4, 2, 60, 60, 64, true, None));
    c.varlen = Some((cu.clone(), cu));
    run_case(&c);
}

/// Different query and key lengths per sequence (bottom-right causal within each, rows
/// before their sequence's first key see nothing), a window, and a per-key bias.
#[test]
fn varlen_causal_window_cross_lengths_bias() {
    let mut c = case("varlen_causal_window_cross_lengths_bias", prob(1, 2, 1, 30, 41, 40, true, Some(5)));
    c.varlen = Some((vec![0, 12, 14, 30], vec![0, 5, 20, 41]));
    c.bias_per_q_head = Some(true);
    run_case(&c);
}

/// Non-causal packing: every row sees exactly its own sequence.
#[test]
fn varlen_noncausal() {
    let mut c = case("varlen_noncausal", prob(1, 3, 3, 50, 50, 64, false, None));
    c.varlen = Some((vec![0, 17, 50], vec![0, 17, 50]));
    run_case(&c);
}

/// Packing equals attention over each sequence on its own (the varlen contract), checked
/// against separate kernel calls rather than the reference.
#[test]
fn varlen_equals_separate_sequences() {
    let client = client();
    let cu = [0usize, 21, 64, 70];
    let packed = prob(1, 2, 1, 70, 70, 64, true, None);
    let mut c = case("varlen_equals_separate_sequences", packed.clone());
    c.varlen = Some((cu.to_vec(), cu.to_vec()));
    let dtype = AttnDtype::F32;
    let data = make_data(&c, dtype, 7);
    let all = run_kernels(&client, &packed, dtype, &data);
    let d = packed.head_dim;
    for s in 0..cu.len() - 1 {
        let (a, n) = (cu[s], cu[s + 1] - cu[s]);
        let one = prob(1, 2, 1, n, n, d, true, None);
        // Slice [1, H, 70, D] tensors to the sequence's rows.
        let slice = |v: &[f64], heads: usize| -> Vec<f64> {
            (0..heads).flat_map(|h| v[(h * 70 + a) * d..(h * 70 + a + n) * d].to_vec()).collect()
        };
        let part = Data {
            q: slice(&data.q, 2),
            k: slice(&data.k, 1),
            v: slice(&data.v, 1),
            d_o: slice(&data.d_o, 2),
            bias: None,
            sched: None,
            seg: None,
        };
        let sep = run_kernels(&client, &one, dtype, &part);
        // The packed call runs the portable kernels; the separate one multiplies in TF32
        // where tensor cores take f32 (CUDA), which moves the results by about 1e-4.
        let tol = if kernel_path(&client, dtype, d) == KernelPath::TensorCore { 2e-3 } else { 1e-5 };
        for (w, got, want, heads) in [("o", &all.o, &sep.o, 2), ("dq", &all.dq, &sep.dq, 2), ("dk", &all.dk, &sep.dk, 1), ("dv", &all.dv, &sep.dv, 1)] {
            let e = rel_err(&slice(got, heads), want);
            assert!(e < tol, "sequence {s}: packed {w} differs from the separate call by {e:.3e}");
        }
    }
}

/// Packed sequences with a per-token schedule shared by each GQA group: the schedule's
/// blocks straddle sequence boundaries, and each pair is still checked against its row's
/// own sequence (causal within it).
#[test]
fn varlen_blocks_per_token_causal() {
    let cu = vec![0, 7, 7, 40, 41, 60];
    let mut c = case("varlen_blocks_per_token_causal", prob(2, 4, 2, 60, 60, 32, true, None));
    c.sel = Some(Sel::Random { sel_heads_kv: true, query_block: 1, key_block: 8, cap: 4 });
    c.varlen = Some((cu.clone(), cu));
    run_case(&c);
}

/// Query-block lists, non-causal packing with different query and key lengths per sequence
/// (one sequence without keys), a window-free full visibility inside each sequence.
#[test]
fn varlen_blocks_per_query_block_noncausal_cross() {
    let mut c = case("varlen_blocks_per_query_block_noncausal_cross", prob(1, 2, 2, 30, 41, 32, false, None));
    c.sel = Some(Sel::Random { sel_heads_kv: false, query_block: 4, key_block: 16, cap: 3 });
    c.varlen = Some((vec![0, 12, 14, 30], vec![0, 5, 5, 41]));
    run_case(&c);
}

/// A per-key bias with a per-row keep threshold (DMA's rule) on packed sequences, causal
/// with a window and cross lengths.
#[test]
fn varlen_bias_keep_threshold() {
    let mut c = case("varlen_bias_keep_threshold", prob(1, 4, 2, 30, 41, 32, true, Some(9)));
    c.bias_per_q_head = Some(false);
    c.bias_ties = true;
    c.thr = Some(Thr::TopW(5));
    c.varlen = Some((vec![0, 12, 14, 30], vec![0, 5, 20, 41]));
    run_case(&c);
}

/// Boundaries that do not match the problem, and a pairwise bias with packed sequences, are
/// refused, naming the argument.
#[test]
fn varlen_rejects_unsupported_combinations() {
    let client = client();
    let p = prob(1, 2, 1, 16, 16, 32, true, None);
    let h = upload(&client, AttnDtype::F32, &vec![0.0; 2 * 16 * 32]);
    let short = SegmentBounds::upload(&client, &varlen_bounds(&[0, 5, 15], &[0, 5, 15], true, None).unwrap());
    let inputs = AttnInputs { q: &h, k: &h, v: &h, bias: None, schedule: None, key_positions: None, segments: Some(&short) };
    let e = attention_forward(&client, &p, AttnDtype::F32, &inputs).unwrap_err();
    assert!(e.to_string().contains("segments"), "{e}");
    let seg = SegmentBounds::upload(&client, &varlen_bounds(&[0, 5, 16], &[0, 5, 16], true, None).unwrap());
    let pair = upload(&client, AttnDtype::F32, &vec![0.0; 2 * 16 * 16]);
    let bias = KeyBias { values: pair, heads: 2, threshold: None, pairwise: true };
    let e = attention_forward(&client, &p, AttnDtype::F32, &AttnInputs { bias: Some(&bias), segments: Some(&seg), ..inputs }).unwrap_err();
    assert!(e.to_string().contains("bias"), "{e}");
}

#[test]
fn dense_causal_d128_gqa() {
    run_case(&case("dense_causal_d128_gqa", prob(1, 4, 2, 45, 45, 128, true, None)));
}

#[test]
fn dense_window() {
    run_case(&case("dense_window", prob(1, 4, 2, 90, 90, 64, true, Some(17))));
    run_case(&case("dense_window_sq_gt_sk", prob(1, 2, 2, 40, 30, 64, true, Some(5))));
    run_case(&case("dense_window_noncausal", prob(1, 2, 1, 33, 40, 72, false, Some(9))));
}

// ---------------------------------------------------------------------------------------
// Bias and dynamic-mask threshold
// ---------------------------------------------------------------------------------------

#[test]
fn bias_kv_heads() {
    let mut c = case("bias_kv_heads", prob(1, 4, 2, 41, 41, 64, true, None));
    c.bias_per_q_head = Some(false);
    run_case(&c);
}

#[test]
fn bias_q_heads_threshold_ties_d72() {
    let mut c = case("bias_q_heads_threshold_ties_d72", prob(2, 2, 1, 38, 52, 72, true, None));
    c.bias_per_q_head = Some(true);
    c.thr = Some(Thr::TopW(9));
    c.bias_ties = true;
    run_case(&c);
}

#[test]
fn bias_kv_heads_threshold_noncausal() {
    let mut c = case("bias_kv_heads_threshold_noncausal", prob(1, 4, 2, 29, 70, 64, false, None));
    c.bias_per_q_head = Some(false);
    c.thr = Some(Thr::TopW(12));
    run_case(&c);
}

/// A bias per (query, key) pair shared by a GQA group (bias heads = kv heads): dbias sums
/// dS over the group's query heads.
#[test]
fn pair_bias_kv_heads() {
    let mut c = case("pair_bias_kv_heads", prob(1, 4, 2, 37, 37, 32, true, None));
    c.bias_per_q_head = Some(false);
    c.pair_bias = true;
    run_case(&c);
}

/// A bias per (query, key) pair and query head, with DMA's keep rule on each row's own
/// bias (ties included), more keys than queries.
#[test]
fn pair_bias_q_heads_threshold_ties() {
    let mut c = case("pair_bias_q_heads_threshold_ties", prob(2, 2, 1, 30, 45, 32, true, None));
    c.bias_per_q_head = Some(true);
    c.pair_bias = true;
    c.thr = Some(Thr::TopW(7));
    c.bias_ties = true;
    run_case(&c);
}

/// A pairwise bias, non-causal with a window, keep rule, bias heads = kv heads.
#[test]
fn pair_bias_kv_heads_threshold_window_noncausal() {
    let mut c = case("pair_bias_kv_heads_threshold_window_noncausal", prob(1, 4, 2, 26, 40, 16, false, Some(20)));
    c.bias_per_q_head = Some(false);
    c.pair_bias = true;
    c.thr = Some(Thr::TopW(6));
    run_case(&c);
}

// ---------------------------------------------------------------------------------------
// Block-sparse schedules
// ---------------------------------------------------------------------------------------

#[test]
fn blocks_per_token_gqa_shared() {
    let mut c = case("blocks_per_token_gqa_shared", prob(1, 4, 2, 75, 75, 64, true, None));
    c.sel = Some(Sel::Random { sel_heads_kv: true, query_block: 1, key_block: 16, cap: 5 });
    run_case(&c);
}

#[test]
fn blocks_per_token_per_head_sq_lt_sk() {
    let mut c = case("blocks_per_token_per_head_sq_lt_sk", prob(2, 2, 1, 21, 64, 40, true, None));
    c.sel = Some(Sel::Random { sel_heads_kv: false, query_block: 1, key_block: 8, cap: 4 });
    run_case(&c);
}

/// One list per head and token with more than 64 queries per block: the fragment path
/// gathers several row tiles per key block; the inversion walks several row chunks.
#[test]
fn blocks_per_token_per_head_gathered_window() {
    let mut c = case("blocks_per_token_per_head_gathered_window", prob(1, 2, 2, 200, 230, 64, true, Some(120)));
    c.sel = Some(Sel::Random { sel_heads_kv: false, query_block: 1, key_block: 16, cap: 6 });
    run_case(&c);
}

/// Lists shared by a GQA group of 4 at head dim 128 (gathered rows of 4 heads per token).
#[test]
fn blocks_per_token_gqa4_gathered_d128() {
    let mut c = case("blocks_per_token_gqa4_gathered_d128", prob(1, 4, 1, 96, 96, 128, true, None));
    c.sel = Some(Sel::Random { sel_heads_kv: true, query_block: 1, key_block: 32, cap: 3 });
    run_case(&c);
}

/// Query blocks of 4 queries x 2 heads per list (gathered), more queries than keys.
#[test]
fn blocks_per_query_block_4_gathered_sq_gt_sk() {
    let mut c = case("blocks_per_query_block_4_gathered_sq_gt_sk", prob(1, 4, 2, 90, 70, 64, true, None));
    c.sel = Some(Sel::Random { sel_heads_kv: true, query_block: 4, key_block: 16, cap: 4 });
    run_case(&c);
}

/// More key blocks than the inversion counts in one launch (4096): two segments.
#[test]
fn blocks_more_key_blocks_than_one_segment() {
    let mut c = case("blocks_more_key_blocks_than_one_segment", prob(1, 1, 1, 12, 4200, 16, false, None));
    c.sel = Some(Sel::Random { sel_heads_kv: false, query_block: 1, key_block: 1, cap: 8 });
    run_case(&c);
}

#[test]
fn blocks_per_query_block_64() {
    let mut c = case("blocks_per_query_block_64", prob(1, 2, 2, 150, 150, 64, true, None));
    c.sel = Some(Sel::Random { sel_heads_kv: false, query_block: 64, key_block: 32, cap: 3 });
    run_case(&c);
}

/// Key blocks of 128: each block is walked as two 64-key tiles by the key-major pass (and two
/// sub-tiles of its pieces on the fragment path).
#[test]
fn blocks_per_query_block_key_block_128() {
    let mut c = case("blocks_per_query_block_key_block_128", prob(1, 2, 2, 300, 300, 64, true, None));
    c.sel = Some(Sel::Random { sel_heads_kv: false, query_block: 64, key_block: 128, cap: 2 });
    run_case(&c);
}

#[test]
fn blocks_per_query_block_sq_gt_sk_window() {
    let mut c = case("blocks_per_query_block_sq_gt_sk_window", prob(1, 4, 2, 70, 50, 64, true, Some(20)));
    c.sel = Some(Sel::Random { sel_heads_kv: false, query_block: 16, key_block: 16, cap: 3 });
    run_case(&c);
}

#[test]
fn blocks_full_selection_equals_dense() {
    let client = client();
    let p = prob(1, 4, 2, 66, 66, 64, true, None);
    let mut c = case("blocks_full_selection", p.clone());
    c.sel = Some(Sel::Full { sel_heads_kv: true, query_block: 1, key_block: 16 });
    run_case(&c);
    let mut c2 = case("blocks_full_selection_q64", p.clone());
    c2.sel = Some(Sel::Full { sel_heads_kv: false, query_block: 64, key_block: 32 });
    run_case(&c2);
    // Degenerate oracle: the full selection equals the dense kernel.
    let dtype = AttnDtype::F32;
    let data = make_data(&c, dtype, 99);
    let sparse = run_kernels(&client, &p, dtype, &data);
    let dense_data = Data { sched: None, ..data };
    let dense = run_kernels(&client, &p, dtype, &dense_data);
    // The two walks cut the keys into different tiles; on tensor cores (TF32 products) that
    // changes the rounding of P, so only the portable path is held to f32 agreement.
    let tol = if kernel_path(&client, dtype, p.head_dim) == KernelPath::TensorCore { 2e-3 } else { 1e-5 };
    for (w, a, b) in [("o", &sparse.o, &dense.o), ("dq", &sparse.dq, &dense.dq), ("dk", &sparse.dk, &dense.dk), ("dv", &sparse.dv, &dense.dv)] {
        let e = rel_err(a, b);
        assert!(e < tol, "full selection vs dense: {w} rel err {e:.3e}");
    }
}

/// Enough sequences (160 x 4 heads of one kv head) that the key-major pass of the fragment
/// path gives pieces several row chunks each (`key_pieces` cuts a pass into about 2048
/// pieces), spanning heads, the first key tile of each sequence into the most.
#[test]
fn dense_causal_many_sequences_split_tiles() {
    run_case(&case("dense_causal_many_sequences_split_tiles", prob(160, 4, 1, 128, 128, 32, true, None)));
}

/// A GQA group of 16 query heads per kv head: the key-major pass walks 16 heads x 2 row
/// chunks per key tile in one cube.
#[test]
fn dense_gqa16_d32() {
    run_case(&case("dense_gqa16_d32", prob(1, 16, 1, 64, 64, 32, true, None)));
}

/// [`dense_gqa16_d32`] at head dim 64.
#[test]
fn dense_gqa16_d64() {
    run_case(&case("dense_gqa16_d64", prob(1, 16, 1, 64, 64, 64, true, None)));
}

/// 1024 tokens: the last query-major cube walks 32 key tiles.
#[test]
fn dense_d32_long_walk() {
    run_case(&case("dense_d32_long_walk", prob(1, 1, 1, 1024, 1024, 32, true, None)));
}

/// 512 tokens at head dim 64: the last query-major cube walks 16 key tiles.
#[test]
fn dense_d64_sixteen_key_tiles() {
    run_case(&case("dense_d64_sixteen_key_tiles", prob(1, 1, 1, 512, 512, 64, true, None)));
}

/// A GQA group of 16 over 256 keys at head dim 64: on a software device one key's gradient
/// walk (16 heads x 8 chunks of query rows) exceeds llvmpipe's loop budget, so the
/// key-major pass splits it over cubes (`loop_budget`); elsewhere the usual split.
#[test]
fn dense_gqa16_d64_split_key_walk() {
    run_case(&case("dense_gqa16_d64_split_key_walk", prob(1, 16, 1, 256, 256, 64, true, None)));
}

/// On a software device a query-major walk longer than the driver's loop budget is an
/// error naming `problem.seq_k` (the kernels would otherwise stop early and return wrong
/// numbers); the same call succeeds on a GPU.
#[test]
fn software_device_refuses_walks_past_its_loop_budget() {
    let client = client();
    let p = prob(1, 1, 1, 4096, 4096, 128, true, None);
    let z = |n: usize| upload(&client, AttnDtype::F32, &vec![0.5; n]);
    let (q, k, v) = (z(4096 * 128), z(4096 * 128), z(4096 * 128));
    let inputs = AttnInputs { q: &q, k: &k, v: &v, bias: None, schedule: None, key_positions: None, segments: None };
    let r = attention_forward(&client, &p, AttnDtype::F32, &inputs);
    if client.properties().identity.physical.is_none() && kernel_path(&client, AttnDtype::F32, 128) == KernelPath::Portable {
        let e = r.unwrap_err();
        assert!(e.to_string().contains("problem.seq_k") && e.to_string().contains("software device"), "{e}");
    } else {
        assert!(r.is_ok(), "{:?}", r.err());
    }
}

/// Per-token lists shared by a GQA group of 16 (NSA's shape: one plane of 16 rows per list
/// on the fragment path); 75 tokens, more list entries than key blocks.
#[test]
fn blocks_per_token_gqa16() {
    let mut c = case("blocks_per_token_gqa16", prob(1, 16, 1, 75, 75, 32, true, None));
    c.sel = Some(Sel::Random { sel_heads_kv: true, query_block: 1, key_block: 16, cap: 6 });
    run_case(&c);
}

/// [`blocks_per_token_gqa16`] at head dim 64.
#[test]
fn blocks_per_token_gqa16_d64() {
    let mut c = case("blocks_per_token_gqa16_d64", prob(1, 16, 1, 75, 75, 64, true, None));
    c.sel = Some(Sel::Random { sel_heads_kv: true, query_block: 1, key_block: 16, cap: 5 });
    run_case(&c);
}

/// Lists per query block of 4 shared by a GQA group of 4 (16 rows per list), head dim 128,
/// more keys than queries, a window, a partial last query block.
#[test]
fn blocks_per_query_block_4_gqa4_window_d128() {
    let mut c = case("blocks_per_query_block_4_gqa4_window_d128", prob(1, 8, 2, 70, 90, 128, true, Some(40)));
    c.sel = Some(Sel::Random { sel_heads_kv: true, query_block: 4, key_block: 32, cap: 3 });
    run_case(&c);
}

/// Per-token lists of a GQA group of 16 that all hold block 0, with a per-kv-head bias and
/// DMA's keep rule.
#[test]
fn blocks_forced_first_gqa16_bias_threshold() {
    let mut c = case("blocks_forced_first_gqa16_bias_threshold", prob(2, 16, 1, 100, 100, 64, true, None));
    c.bias_per_q_head = Some(false);
    c.thr = Some(Thr::TopW(12));
    c.sel = Some(Sel::ForcedFirst { query_block: 1, key_block: 16, cap: 4 });
    run_case(&c);
}

/// Block 0 selected by every query of a GQA group of 8: its key tile carries every row of
/// the group, about four times the others, and is cut into pieces of two chunks.
#[test]
fn blocks_forced_first_block_split() {
    let mut c = case("blocks_forced_first_block_split", prob(24, 8, 1, 128, 128, 16, true, None));
    c.sel = Some(Sel::ForcedFirst { query_block: 1, key_block: 16, cap: 4 });
    run_case(&c);
}

#[test]
fn blocks_empty_selection() {
    let mut c = case("blocks_empty_selection", prob(1, 2, 1, 20, 33, 64, false, None));
    c.sel = Some(Sel::Empty { query_block: 1, key_block: 16 });
    run_case(&c);
}

#[test]
fn blocks_with_bias_threshold() {
    let mut c = case("blocks_with_bias_threshold", prob(1, 4, 2, 40, 56, 64, true, None));
    c.bias_per_q_head = Some(false);
    c.thr = Some(Thr::TopW(10));
    c.sel = Some(Sel::Random { sel_heads_kv: true, query_block: 1, key_block: 8, cap: 4 });
    run_case(&c);
}

// ---------------------------------------------------------------------------------------
// Errors and environment
// ---------------------------------------------------------------------------------------

#[test]
fn invalid_arguments_are_errors() {
    let client = client();
    let p = prob(1, 4, 2, 8, 8, 64, true, None);
    let z = |n: usize| upload(&client, AttnDtype::F32, &vec![0.5; n]);
    let q = z(4 * 8 * 64);
    let k = z(2 * 8 * 64);
    let v = z(2 * 8 * 64);
    let inputs = AttnInputs { q: &q, k: &k, v: &v, bias: None, schedule: None, key_positions: None, segments: None };
    assert!(attention_forward(&client, &p, AttnDtype::F32, &inputs).is_ok());

    let mut bad = p.clone();
    bad.heads_kv = 3;
    let e = attention_forward(&client, &bad, AttnDtype::F32, &inputs).unwrap_err();
    assert!(e.to_string().contains("heads_kv"), "{e}");

    let mut bad = p.clone();
    bad.head_dim = 300;
    let e = attention_forward(&client, &bad, AttnDtype::F32, &inputs).unwrap_err();
    assert!(e.to_string().contains("head_dim"), "{e}");

    let small = z(10);
    let e = attention_forward(&client, &p, AttnDtype::F32, &AttnInputs { q: &small, ..inputs }).unwrap_err();
    assert!(e.to_string().contains("inputs.q"), "{e}");

    let bias = KeyBias { values: z(3 * 8), heads: 3, threshold: None, pairwise: false };
    let e = attention_forward(&client, &p, AttnDtype::F32, &AttnInputs { bias: Some(&bias), ..inputs }).unwrap_err();
    assert!(e.to_string().contains("bias.heads"), "{e}");

    let sched = BlockSchedule { indices: upload_i32(&client, &[0; 8]), sel_heads: 1, capacity: 1, query_block: 1, key_block: 4 };
    let e = attention_forward(&client, &p, AttnDtype::F32, &AttnInputs { schedule: Some(&sched), ..inputs }).unwrap_err();
    assert!(e.to_string().contains("schedule.sel_heads"), "{e}");

    let mut bad = p.clone();
    bad.window = Some(0);
    let e = attention_forward(&client, &bad, AttnDtype::F32, &inputs).unwrap_err();
    assert!(e.to_string().contains("window"), "{e}");

    // A pairwise bias: its size is [B, Hb, Sq, Sk]; it does not combine with a schedule.
    let per_key_size = KeyBias { values: z(2 * 8), heads: 2, threshold: None, pairwise: true };
    let e = attention_forward(&client, &p, AttnDtype::F32, &AttnInputs { bias: Some(&per_key_size), ..inputs }).unwrap_err();
    assert!(e.to_string().contains("bias.values"), "{e}");
    let pair = KeyBias { values: z(2 * 8 * 8), heads: 2, threshold: None, pairwise: true };
    let sched = BlockSchedule { indices: upload_i32(&client, &[0; 16]), sel_heads: 2, capacity: 1, query_block: 1, key_block: 4 };
    let e = attention_forward(&client, &p, AttnDtype::F32, &AttnInputs { bias: Some(&pair), schedule: Some(&sched), ..inputs }).unwrap_err();
    assert!(e.to_string().contains("bias") && e.to_string().contains("block schedule"), "{e}");
}

#[test]
fn unsupported_dtype_is_an_error() {
    let client = client();
    for dtype in [AttnDtype::F16, AttnDtype::BF16] {
        match supports(&client, dtype) {
            Ok(()) => eprintln!("{dtype:?} supported on this device"),
            Err(e) => {
                assert!(e.to_string().contains("dtype"), "{e}");
                let p = prob(1, 1, 1, 4, 4, 8, false, None);
                let h = upload(&client, AttnDtype::F32, &[0.25; 64]);
                let inputs = AttnInputs { q: &h, k: &h, v: &h, bias: None, schedule: None, key_positions: None, segments: None };
                let err = attention_forward(&client, &p, dtype, &inputs).unwrap_err();
                assert_eq!(err, e);
            }
        }
    }
}

#[test]
fn adapter_is_lavapipe_when_expected() {
    let client = client();
    let name = client.properties().identity.name.clone();
    eprintln!("adapter: {name} ({})", describe(&client));
    if std::env::var("SPARSE_ATTN_EXPECT_LAVAPIPE").as_deref() == Ok("1") {
        let lname = name.to_lowercase();
        assert!(
            lname.contains("llvmpipe") || lname.contains("lavapipe"),
            "expected Mesa lavapipe (Vulkan llvmpipe), got adapter '{name}'"
        );
        // wgpu's GL fallback also runs on llvmpipe and names the adapter the same way; tell
        // them apart by the Vulkan vendor id that lavapipe reports (VK_VENDOR_ID_MESA =
        // 0x10005, in the fingerprint `spirv_<vendor>_<device>`) and by f16, which wgpu's
        // GL backend lacks.
        let fp = &client.properties().identity.fingerprint;
        assert!(fp.starts_with("spirv_65541_"), "expected lavapipe's Vulkan vendor id 0x10005, got fingerprint '{fp}'");
        assert!(supports(&client, AttnDtype::F16).is_ok(), "lavapipe over Vulkan has f16; this adapter does not (GL fallback?)");
    }
}


