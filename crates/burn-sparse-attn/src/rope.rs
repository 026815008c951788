//! Rotary position embedding (rotate-half / NeoX convention, as Llama and the published
//! sparse-attention code use), computed from explicit positions so that it also serves
//! block-level RoPE (SeerAttention's gate) and compressed tokens (NSA).

use burn::tensor::{DType, Tensor, TensorData};

use crate::error::{Result, param_err};

/// Applies RoPE to `x: [batch, heads, seq, dim]`, row `s` rotated by angle
/// `positions[s] * theta^(-2i/dim)` for frequency pair `i`.
pub fn apply_rope(x: Tensor<4>, positions: &[usize], theta: f64) -> Result<Tensor<4>> {
    let [b, h, s, d] = x.dims();
    if d % 2 != 0 {
        return param_err("head_dim", format!("RoPE needs an even head dimension, got {d}"));
    }
    if positions.len() != s {
        return param_err("positions", format!("{} positions for a sequence of {s}", positions.len()));
    }
    let half = d / 2;
    let device = x.device();
    let dtype = x.dtype();
    let (cos, sin) = rope_tables(positions, half, theta, &device, dtype);
    // The two halves of a row share their angles (rotate-half pairs `i` and `i + d / 2`).
    let cos = Tensor::cat(vec![cos.clone(), cos], 1).reshape([1, 1, s, d]);
    let sin = Tensor::cat(vec![sin.clone(), sin], 1).reshape([1, 1, s, d]);
    let x1 = x.clone().slice([0..b, 0..h, 0..s, 0..half]);
    let x2 = x.clone().slice([0..b, 0..h, 0..s, half..d]);
    let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
    Ok(x * cos.expand([b, h, s, d]) + rotated * sin.expand([b, h, s, d]))
}

/// Positions per factored table: a run of consecutive positions `p0 + 64 a + c` is built from
/// `64 a` and `c` tables.
const FACTOR: usize = 64;

/// `cos` and `sin` of `positions[t] * theta^(-2i / (2 half))`, `[positions.len(), half]` in
/// `dtype`.
///
/// Built on the device from small host tables: `s x half` host `sin`/`cos` calls per
/// projection were the largest part of a long-context training step (see
/// `docs/results/toy-lm-h200.md`). A run of consecutive positions `p0 + 64 a + c` uses
/// the angle-addition identities on f64 tables of `(p0 + 64 a) w` and `c w`, so no
/// large angle is ever rounded to f32 (the products add ~1e-7, not `angle * 6e-8`);
/// other position lists (compressed tokens, gate blocks) take f64 values per entry. The
/// tables are f64 when `dtype` is, f32 otherwise.
fn rope_tables(positions: &[usize], half: usize, theta: f64, device: &burn::tensor::Device, dtype: DType) -> (Tensor<2>, Tensor<2>) {
    let s = positions.len();
    let d = 2 * half;
    let inv_freq: Vec<f64> = (0..half).map(|i| theta.powf(-2.0 * i as f64 / d as f64)).collect();
    let compute = if dtype == DType::F64 { DType::F64 } else { DType::F32 };
    // Host cos/sin of `rows x half` angles, uploaded in the compute dtype.
    let table = |angles: Vec<f64>, rows: usize| {
        let up = |v: Vec<f64>| Tensor::<2>::from_data(TensorData::new(v, [rows, half]), (device, compute));
        (up(angles.iter().map(|a| a.cos()).collect()), up(angles.iter().map(|a| a.sin()).collect()))
    };
    let angles = |ps: &mut dyn Iterator<Item = f64>| ps.flat_map(|p| inv_freq.iter().map(move |w| p * w)).collect::<Vec<f64>>();
    let consecutive = s > FACTOR && positions.windows(2).all(|w| w[1] == w[0] + 1);
    let (cos, sin) = if consecutive {
        let p0 = positions[0] as f64;
        let na = s.div_ceil(FACTOR);
        let (ca, sa) = table(angles(&mut (0..na).map(|a| p0 + (a * FACTOR) as f64)), na);
        let (cc, sc) = table(angles(&mut (0..FACTOR).map(|c| c as f64)), FACTOR);
        let shape = [na, FACTOR, half];
        let (ca, sa) = (ca.reshape([na, 1, half]).expand(shape), sa.reshape([na, 1, half]).expand(shape));
        let (cc, sc) = (cc.reshape([1, FACTOR, half]).expand(shape), sc.reshape([1, FACTOR, half]).expand(shape));
        // cos(A + C) = cos A cos C - sin A sin C; sin(A + C) = sin A cos C + cos A sin C.
        let cos = ca.clone() * cc.clone() - sa.clone() * sc.clone();
        let sin = sa * cc + ca * sc;
        let rows = |t: Tensor<3>| t.reshape([na * FACTOR, half]).slice([0..s, 0..half]);
        (rows(cos), rows(sin))
    } else {
        table(angles(&mut positions.iter().map(|&p| p as f64)), s)
    };
    (cos.cast(dtype), sin.cast(dtype))
}

/// Positions `start, start + 1, ..` for a sequence of `len` tokens.
pub fn positions(start: usize, len: usize) -> Vec<usize> {
    (start..start + len).collect()
}
