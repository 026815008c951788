//! NSA's compressed branch on the attention engine, in `O(S)` memory.
//!
//! Compressed token `i` covers keys `[i * stride, i * stride + block)` and is visible to the
//! query at position `p` when `i * stride + block - 1 <= p`, i.e. `i <= floor((p + 1 - block)
//! / stride)`. Split the queries by their position modulo the stride: for residue `r`, the
//! `m`-th query (`p = (m + a) * stride + r`) sees `i <= m + c_r` with
//! `c_r = a + floor((r + 1 - block) / stride)`, which is exactly a bottom-right causal mask
//! over `m` queries and `m + c_r` compressed keys. Residues with the same `c_r` (contiguous
//! runs of `r`) become extra heads of one causal attention call, so the branch is a few
//! engine calls (two with the default 32 / 16) plus reshapes, forward and backward, instead of
//! a `[seq, n_cmp]` mask and score matrix.

use burn::tensor::{DType, Tensor};

use super::NsaParams;
use crate::attention::{AttentionOptions, AttentionOutput, attention};
use crate::error::Result;

/// The compressed branch through [`attention`]; same contract as
/// [`super::nsa_compressed_attention`] (whose checks have run).
pub(crate) fn compressed_attention_on_engine(
    q: Tensor<4>,
    k_cmp: Tensor<4>,
    v_cmp: Tensor<4>,
    seq_k: usize,
    params: &NsaParams,
) -> Result<AttentionOutput> {
    let [b, hq, sq, d] = q.dims();
    let [_, hkv, n_cmp, _] = k_cmp.dims();
    let (device, dtype) = (q.device(), q.dtype());
    let stride = params.compress_stride;
    let block = params.compress_block as i64;
    // Left padding `pre` makes padded row `u` sit at position `u + stride * a`.
    let pos0 = seq_k as i64 - sq as i64;
    let pre = pos0.rem_euclid(stride as i64) as usize;
    let a = (pos0 - pre as i64) / stride as i64;
    let m = (pre + sq).div_ceil(stride);
    let padded = m * stride;
    let mut rows = Vec::with_capacity(3);
    if pre > 0 {
        rows.push(Tensor::zeros([b, hq, pre, d], (&device, dtype)));
    }
    rows.push(q);
    if padded > pre + sq {
        rows.push(Tensor::zeros([b, hq, padded - pre - sq, d], (&device, dtype)));
    }
    // [b, hq, stride, m, d]: residue-major.
    let by_residue = Tensor::cat(rows, 2).reshape([b, hq, m, stride, d]).swap_dims(2, 3);
    let offset = |r: usize| a + (r as i64 + 1 - block).div_euclid(stride as i64);
    let opts = AttentionOptions { causal: true, window: None, scale: params.scale };

    // One engine call per run of residues with the same offset: (residues, output and LSE
    // `[b, hq, residues, rows]` when the run has keys, rows computed).
    type Group = (usize, Option<(Tensor<5>, Tensor<4>)>, usize);
    let mut groups: Vec<Group> = Vec::new();
    let mut r0 = 0;
    while r0 < stride {
        let c = offset(r0);
        let mut r1 = r0 + 1;
        while r1 < stride && offset(r1) == c {
            r1 += 1;
        }
        let rn = r1 - r0;
        // Rows past `n_cmp - c` would need keys that do not exist; they are padding (real
        // queries sit at positions < seq_k, which see at most compressed token n_cmp - 1).
        let m_g = (m as i64).min(n_cmp as i64 - c).max(0) as usize;
        let n_keys = m_g as i64 + c;
        let result = if m_g > 0 && n_keys > 0 {
            let n_keys = n_keys as usize;
            let qg = by_residue.clone().slice([0..b, 0..hq, r0..r1, 0..m_g, 0..d]).reshape([b, hq * rn, m_g, d]);
            let kg = k_cmp.clone().slice([0..b, 0..hkv, 0..n_keys, 0..d]);
            let vg = v_cmp.clone().slice([0..b, 0..hkv, 0..n_keys, 0..d]);
            let out = attention(qg, kg, vg, &opts)?;
            Some((out.output.reshape([b, hq, rn, m_g, d]), out.lse.reshape([b, hq, rn, m_g])))
        } else {
            None
        };
        groups.push((rn, result, m_g));
        r0 = r1;
    }
    let lse_dtype = groups.iter().find_map(|(_, g, _)| g.as_ref().map(|(_, l)| l.dtype())).unwrap_or(DType::F32);
    let mut outs = Vec::with_capacity(groups.len());
    let mut lses = Vec::with_capacity(groups.len());
    for (rn, result, m_g) in groups {
        match result {
            Some((o, l)) if m_g == m => {
                outs.push(o);
                lses.push(l);
            }
            Some((o, l)) => {
                outs.push(Tensor::cat(vec![o, Tensor::zeros([b, hq, rn, m - m_g, d], (&device, dtype))], 3));
                lses.push(Tensor::cat(vec![l, Tensor::full([b, hq, rn, m - m_g], f64::NEG_INFINITY, (&device, lse_dtype))], 3));
            }
            None => {
                outs.push(Tensor::zeros([b, hq, rn, m, d], (&device, dtype)));
                lses.push(Tensor::full([b, hq, rn, m], f64::NEG_INFINITY, (&device, lse_dtype)));
            }
        }
    }
    let output = Tensor::cat(outs, 2).swap_dims(2, 3).reshape([b, hq, padded, d]).slice([0..b, 0..hq, pre..pre + sq, 0..d]);
    let lse = Tensor::cat(lses, 2).swap_dims(2, 3).reshape([b, hq, padded]).slice([0..b, 0..hq, pre..pre + sq]);
    Ok(AttentionOutput { output, lse })
}
