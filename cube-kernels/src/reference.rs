//! Plain-Rust f64 reference of the attention forward and backward, with exactly the
//! semantics of the kernels (masks, GQA, bias, threshold, block schedules). Straightforward
//! loops over every (row, key) pair; meant for tests on small shapes.
//!
//! An optional rounding function emulates a lower-precision "standard attention" (as
//! PyTorch computes it in f16/bf16): the scores, the probabilities, the output and every
//! gradient matrix are rounded after they are formed. FlashAttention's tolerance rule
//! compares a kernel's error against the error of that same-precision reference.

use crate::AttnProblem;

/// Host copy of a block schedule (same layout as [`crate::BlockSchedule`]).
#[derive(Clone, Debug)]
pub struct RefSchedule {
    /// `[B, sel_heads, ceil(Sq / query_block), capacity]`, `-1`-padded.
    pub indices: Vec<i32>,
    /// `Hs`.
    pub sel_heads: usize,
    /// `C`.
    pub capacity: usize,
    /// `Bq`.
    pub query_block: usize,
    /// `Bk`.
    pub key_block: usize,
}

/// Host copy of a key bias (same layout as [`crate::KeyBias`]).
#[derive(Clone, Debug)]
pub struct RefBias {
    /// `[B, heads, Sk]`, or `[B, heads, Sq, Sk]` when `pairwise`.
    pub values: Vec<f64>,
    /// `Hb`.
    pub heads: usize,
    /// `(thr_value [B, Hb, Sq], thr_index [B, Hb, Sq])`.
    pub threshold: Option<(Vec<f64>, Vec<i32>)>,
    /// One bias per (query, key) pair ([`crate::KeyBias::pairwise`]).
    pub pairwise: bool,
}

impl RefBias {
    /// Index of the bias of (query head `h`, query `i`, key `j`) in `values` (and in the
    /// bias gradient).
    pub fn at(&self, p: &AttnProblem, b: usize, h: usize, i: usize, j: usize) -> usize {
        let hb = h / (p.heads_q / self.heads);
        match self.pairwise {
            true => ((b * self.heads + hb) * p.seq_q + i) * p.seq_k + j,
            false => (b * self.heads + hb) * p.seq_k + j,
        }
    }
}

/// Reference inputs (all f64, contiguous row-major).
#[derive(Clone, Debug)]
pub struct RefInputs<'a> {
    /// `[B, Hq, Sq, D]`.
    pub q: &'a [f64],
    /// `[B, Hkv, Sk, D]`.
    pub k: &'a [f64],
    /// `[B, Hkv, Sk, D]`.
    pub v: &'a [f64],
    /// Optional bias.
    pub bias: Option<&'a RefBias>,
    /// Optional schedule (`None` = dense).
    pub schedule: Option<&'a RefSchedule>,
    /// Packed sequences: their row intervals replace the problem's causal mask and window
    /// (as [`crate::AttnInputs::segments`]).
    pub segments: Option<&'a crate::VarlenBounds>,
}

/// Reference gradients.
#[derive(Clone, Debug)]
pub struct RefGrads {
    /// `[B, Hq, Sq, D]`.
    pub dq: Vec<f64>,
    /// `[B, Hkv, Sk, D]`.
    pub dk: Vec<f64>,
    /// `[B, Hkv, Sk, D]`.
    pub dv: Vec<f64>,
    /// `[B, Hb, Sk]` (`[B, Hb, Sq, Sk]` pairwise) when a bias is given.
    pub dbias: Option<Vec<f64>>,
}

/// Whether query `i` of head `h` in batch `b` attends to key `j` (masks, schedule,
/// threshold), following the crate-level semantics.
pub fn allowed(p: &AttnProblem, inp: &RefInputs, b: usize, h: usize, i: usize, j: usize) -> bool {
    if let Some(sg) = inp.segments {
        if !(sg.row_keys[2 * i] as usize..sg.row_keys[2 * i + 1] as usize).contains(&j) {
            return false;
        }
    } else {
        let d = i as i64 + p.seq_k as i64 - p.seq_q as i64 - j as i64;
        if p.causal && d < 0 {
            return false;
        }
        if p.window.is_some_and(|w| d >= w as i64) {
            return false;
        }
    }
    if let Some(s) = inp.schedule {
        let hs = h / (p.heads_q / s.sel_heads);
        let r = i / s.query_block;
        let n_rows = p.seq_q.div_ceil(s.query_block);
        let base = ((b * s.sel_heads + hs) * n_rows + r) * s.capacity;
        let kb = (j / s.key_block) as i32;
        if !s.indices[base..base + s.capacity].contains(&kb) {
            return false;
        }
    }
    if let Some(bias) = inp.bias
        && let Some((tv, ti)) = &bias.threshold
    {
        {
            let hb = h / (p.heads_q / bias.heads);
            let bj = bias.values[bias.at(p, b, h, i, j)];
            let t = (b * bias.heads + hb) * p.seq_q + i;
            if !(bj > tv[t] || (bj == tv[t] && j as i64 >= ti[t] as i64)) {
                return false;
            }
        }
    }
    true
}

fn score(p: &AttnProblem, inp: &RefInputs, b: usize, h: usize, i: usize, j: usize, round: &dyn Fn(f64) -> f64) -> f64 {
    let dd = p.head_dim;
    let hk = h / (p.heads_q / p.heads_kv);
    let qo = ((b * p.heads_q + h) * p.seq_q + i) * dd;
    let ko = ((b * p.heads_kv + hk) * p.seq_k + j) * dd;
    let mut s = 0.0;
    for x in 0..dd {
        s += inp.q[qo + x] * inp.k[ko + x];
    }
    let mut s = round(s) * p.scale as f64;
    if let Some(bias) = inp.bias {
        s += bias.values[bias.at(p, b, h, i, j)];
    }
    round(s)
}

/// Forward: `(o [B,Hq,Sq,D], lse [B,Hq,Sq])`, in f64 (`round = None`) or emulating a
/// lower precision.
pub fn forward(p: &AttnProblem, inp: &RefInputs, round: Option<&dyn Fn(f64) -> f64>) -> (Vec<f64>, Vec<f64>) {
    let id = |x: f64| x;
    let round: &dyn Fn(f64) -> f64 = round.unwrap_or(&id);
    let dd = p.head_dim;
    let mut o = vec![0.0; p.batch * p.heads_q * p.seq_q * dd];
    let mut lse = vec![f64::NEG_INFINITY; p.batch * p.heads_q * p.seq_q];
    for b in 0..p.batch {
        for h in 0..p.heads_q {
            let hk = h / (p.heads_q / p.heads_kv);
            for i in 0..p.seq_q {
                let row = (b * p.heads_q + h) * p.seq_q + i;
                let keys: Vec<usize> = (0..p.seq_k).filter(|&j| allowed(p, inp, b, h, i, j)).collect();
                if keys.is_empty() {
                    continue;
                }
                let s: Vec<f64> = keys.iter().map(|&j| score(p, inp, b, h, i, j, round)).collect();
                let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let l: f64 = s.iter().map(|x| (x - m).exp()).sum();
                lse[row] = m + l.ln();
                for (n, &j) in keys.iter().enumerate() {
                    let pr = round((s[n] - lse[row]).exp());
                    let vo = ((b * p.heads_kv + hk) * p.seq_k + j) * dd;
                    for x in 0..dd {
                        o[row * dd + x] += pr * inp.v[vo + x];
                    }
                }
                for x in 0..dd {
                    o[row * dd + x] = round(o[row * dd + x]);
                }
            }
        }
    }
    (o, lse)
}

/// Backward given `o`, `lse` (used as given) and `d_o`.
pub fn backward(
    p: &AttnProblem,
    inp: &RefInputs,
    o: &[f64],
    lse: &[f64],
    d_o: &[f64],
    round: Option<&dyn Fn(f64) -> f64>,
) -> RefGrads {
    let id = |x: f64| x;
    let round: &dyn Fn(f64) -> f64 = round.unwrap_or(&id);
    let dd = p.head_dim;
    let mut dq = vec![0.0; p.batch * p.heads_q * p.seq_q * dd];
    let mut dk = vec![0.0; p.batch * p.heads_kv * p.seq_k * dd];
    let mut dv = vec![0.0; p.batch * p.heads_kv * p.seq_k * dd];
    let mut dbias = inp.bias.map(|b| vec![0.0; b.values.len()]);
    for b in 0..p.batch {
        for h in 0..p.heads_q {
            let hk = h / (p.heads_q / p.heads_kv);
            for i in 0..p.seq_q {
                let row = (b * p.heads_q + h) * p.seq_q + i;
                if lse[row] == f64::NEG_INFINITY {
                    continue;
                }
                let delta: f64 = round((0..dd).map(|x| d_o[row * dd + x] * o[row * dd + x]).sum());
                for j in 0..p.seq_k {
                    if !allowed(p, inp, b, h, i, j) {
                        continue;
                    }
                    let s = score(p, inp, b, h, i, j, round);
                    let pr = round((s - lse[row]).exp());
                    let ko = ((b * p.heads_kv + hk) * p.seq_k + j) * dd;
                    let dp: f64 = round((0..dd).map(|x| d_o[row * dd + x] * inp.v[ko + x]).sum());
                    let ds = round(pr * (dp - delta));
                    for x in 0..dd {
                        dv[ko + x] += pr * d_o[row * dd + x];
                        dk[ko + x] += ds * p.scale as f64 * inp.q[row * dd + x];
                        dq[row * dd + x] += ds * p.scale as f64 * inp.k[ko + x];
                    }
                    if let (Some(db), Some(bias)) = (dbias.as_mut(), inp.bias) {
                        db[bias.at(p, b, h, i, j)] += ds;
                    }
                }
            }
        }
    }
    for x in dq.iter_mut().chain(dk.iter_mut()).chain(dv.iter_mut()) {
        *x = round(*x);
    }
    if let Some(db) = dbias.as_mut() {
        for x in db.iter_mut() {
            *x = round(*x);
        }
    }
    RefGrads { dq, dk, dv, dbias }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rng(seed: &mut u64, n: usize) -> Vec<f64> {
        (0..n)
            .map(|_| {
                *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((*seed >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
            })
            .collect()
    }

    /// Reference gradients against central finite differences of `sum(o * dO)` in f64, on
    /// a tiny GQA problem with causal mask, window, bias with threshold and a schedule.
    #[test]
    fn reference_gradients_match_finite_differences() {
        let p = AttnProblem {
            batch: 1,
            heads_q: 2,
            heads_kv: 1,
            seq_q: 5,
            seq_k: 7,
            head_dim: 3,
            scale: 0.7,
            causal: true,
            window: Some(5),
        };
        let mut s = 42u64;
        let q = rng(&mut s, 2 * 5 * 3);
        let k = rng(&mut s, 7 * 3);
        let v = rng(&mut s, 7 * 3);
        let d_o = rng(&mut s, 2 * 5 * 3);
        let bias_v = rng(&mut s, 2 * 7);
        // Thresholds strictly between bias values (a small perturbation keeps the kept set).
        let tv = vec![-0.5, f64::NEG_INFINITY, 0.1, -0.9, f64::INFINITY, -0.3, -0.8, 0.2, -1.5, -0.05];
        let ti = vec![0; 10];
        // Per-token schedule over blocks of 2 keys, one list per kv head.
        let sched = RefSchedule {
            indices: vec![0, 1, 3, 2, -1, 3, 1, 2, -1, 0, 1, 2, 3, 3, -1],
            sel_heads: 1,
            capacity: 3,
            query_block: 1,
            key_block: 2,
        };
        let bias = RefBias { values: bias_v.clone(), heads: 2, threshold: Some((tv.clone(), ti.clone())), pairwise: false };
        let inp = RefInputs { q: &q, k: &k, v: &v, bias: Some(&bias), schedule: Some(&sched), segments: None };
        let (o, lse) = forward(&p, &inp, None);
        assert!(lse.contains(&f64::NEG_INFINITY), "want an empty row");
        let g = backward(&p, &inp, &o, &lse, &d_o, None);
        let loss = |q: &[f64], k: &[f64], v: &[f64], b: &[f64]| {
            let bias = RefBias { values: b.to_vec(), heads: 2, threshold: Some((tv.clone(), ti.clone())), pairwise: false };
            let inp = RefInputs { q, k, v, bias: Some(&bias), schedule: Some(&sched), segments: None };
            let (o, _) = forward(&p, &inp, None);
            o.iter().zip(&d_o).map(|(a, b)| a * b).sum::<f64>()
        };
        let eps = 1e-6;
        let fd = |which: usize, idx: usize| {
            let mut a = [q.clone(), k.clone(), v.clone(), bias_v.clone()];
            a[which][idx] += eps;
            let lp = loss(&a[0], &a[1], &a[2], &a[3]);
            a[which][idx] -= 2.0 * eps;
            let lm = loss(&a[0], &a[1], &a[2], &a[3]);
            (lp - lm) / (2.0 * eps)
        };
        let grads = [&g.dq, &g.dk, &g.dv, g.dbias.as_ref().unwrap()];
        for (which, gr) in grads.iter().enumerate() {
            for idx in 0..gr.len() {
                let f = fd(which, idx);
                assert!((f - gr[idx]).abs() < 1e-6, "grad {which}[{idx}]: analytic {} vs fd {f}", gr[idx]);
            }
        }
    }
}
