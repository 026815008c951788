//! Host-side validation of a call: shapes, parameters and buffer sizes, each error naming
//! its argument.

use crate::*;
use cubecl::prelude::*;

// ---------------------------------------------------------------------------------------
// Validation
// ---------------------------------------------------------------------------------------

pub(crate) fn check_size(arg: &'static str, h: &Handle, elems: usize, elem_size: usize) -> Result<(), KernelError> {
    let need = (elems * elem_size) as u64;
    let have = h.size_in_used();
    if have < need {
        return Err(invalid(arg, format!("buffer has {have} bytes, expected at least {need} ({elems} elements)")));
    }
    Ok(())
}

pub(crate) fn validate(client: &Client, p: &AttnProblem, dtype: AttnDtype, inp: &AttnInputs) -> Result<(), KernelError> {
    supports(client, dtype)?;
    for (v, name) in [
        (p.batch, "problem.batch"),
        (p.heads_q, "problem.heads_q"),
        (p.heads_kv, "problem.heads_kv"),
        (p.seq_q, "problem.seq_q"),
        (p.seq_k, "problem.seq_k"),
        (p.head_dim, "problem.head_dim"),
    ] {
        if v == 0 {
            return Err(invalid(name, "must be >= 1"));
        }
    }
    if !p.heads_q.is_multiple_of(p.heads_kv) {
        return Err(invalid("problem.heads_kv", format!("heads_q = {} is not a multiple of heads_kv = {}", p.heads_q, p.heads_kv)));
    }
    if p.head_dim > MAX_HEAD_DIM {
        return Err(unsupported("problem.head_dim", format!("{} > {MAX_HEAD_DIM}", p.head_dim)));
    }
    if !p.scale.is_finite() {
        return Err(invalid("problem.scale", "must be finite"));
    }
    if p.window == Some(0) {
        return Err(invalid("problem.window", "must be >= 1"));
    }
    for (n, name) in [(p.seq_q, "problem.seq_q"), (p.seq_k, "problem.seq_k")] {
        if n > i32::MAX as usize / 2 {
            return Err(unsupported(name, "too long for 32-bit mask arithmetic"));
        }
    }
    let es = dtype.size();
    let (b, hq, hkv, sq, sk, d) = (p.batch, p.heads_q, p.heads_kv, p.seq_q, p.seq_k, p.head_dim);
    check_size("inputs.q", inp.q, b * hq * sq * d, es)?;
    check_size("inputs.k", inp.k, b * hkv * sk * d, es)?;
    check_size("inputs.v", inp.v, b * hkv * sk * d, es)?;
    if let Some(bias) = inp.bias {
        let hb = bias.heads;
        if hb == 0 || hq % hb != 0 || hb % hkv != 0 {
            return Err(invalid(
                "bias.heads",
                format!("{hb} must divide heads_q = {hq} and be a multiple of heads_kv = {hkv}"),
            ));
        }
        check_size("bias.values", &bias.values, bias.elems(p), es)?;
        if bias.pairwise {
            let other = [
                (inp.schedule.is_some(), "a block schedule"),
                (inp.key_positions.is_some(), "gathered keys"),
                (inp.segments.is_some(), "packed sequences"),
            ];
            if let Some((_, what)) = other.into_iter().find(|(on, _)| *on) {
                return Err(unsupported("bias", format!("a pairwise bias with {what} is not implemented")));
            }
        }
        if let Some((tv, ti)) = &bias.threshold {
            check_size("bias.threshold.0 (value)", tv, b * hb * sq, 4)?;
            check_size("bias.threshold.1 (index)", ti, b * hb * sq, 4)?;
        }
    }
    if let Some(s) = inp.schedule {
        let hs = s.sel_heads;
        if hs == 0 || hq % hs != 0 || hs % hkv != 0 {
            return Err(invalid(
                "schedule.sel_heads",
                format!("{hs} must divide heads_q = {hq} and be a multiple of heads_kv = {hkv}"),
            ));
        }
        if s.capacity == 0 {
            return Err(invalid("schedule.capacity", "must be >= 1"));
        }
        if s.query_block == 0 {
            return Err(invalid("schedule.query_block", "must be >= 1"));
        }
        if s.key_block == 0 {
            return Err(invalid("schedule.key_block", "must be >= 1"));
        }
        let r = sq.div_ceil(s.query_block);
        check_size("schedule.indices", &s.indices, b * hs * r * s.capacity, 4)?;
    }
    if let Some(pos) = inp.key_positions {
        if inp.schedule.is_none() {
            return Err(invalid("key_positions", "needs a block schedule (gathered keys are walked by block)"));
        }
        if p.window.is_some() {
            return Err(invalid("key_positions", "cannot be combined with a sliding window"));
        }
        let aligned = crate::caps::vector_aligned(&[inp.q, inp.k, inp.v]);
        if !(aligned && crate::caps::fragment_supported(client, dtype, p.head_dim)) {
            return Err(invalid("key_positions", "only the fragment path (CUDA, f16/bf16, head dim a multiple of 16 up to 128) takes gathered keys"));
        }
        check_size("key_positions", pos, p.batch * p.heads_kv * p.seq_k, 4)?;
    }
    if let Some(seg) = inp.segments {
        if seg.seq_q != sq || seg.seq_k != sk {
            return Err(invalid(
                "segments",
                format!("describe {} rows and {} keys, the problem has seq_q = {sq}, seq_k = {sk}", seg.seq_q, seg.seq_k),
            ));
        }
        if inp.key_positions.is_some() {
            return Err(unsupported("segments", "packed sequences with gathered keys are not implemented"));
        }
        check_size("segments.bounds", &seg.bounds, 2 * (sq + sk), 4)?;
    }
    Ok(())
}
