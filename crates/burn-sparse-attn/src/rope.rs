//! Rotary position embedding (rotate-half / NeoX convention, as Llama and the published
//! sparse-attention code use), computed from explicit positions so that it also serves
//! block-level RoPE (SeerAttention's gate) and compressed tokens (NSA).

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use burn::tensor::{DType, Tensor, TensorData};

use crate::error::{Result, param_err};

/// Applies RoPE to `x: [batch, heads, seq, dim]`, row `s` rotated by angle
/// `positions[s] * theta^(-2i/dim)` for frequency pair `i`.
///
/// Computed as `x * cos + swap(x) * sin`, where `swap` exchanges the two halves of each row
/// (one flip) and `sin` carries the rotation's sign (`[-sin, sin]`), with the tables cached per
/// position list, width, base, dtype and device: a training step calls RoPE several times per
/// layer with the same positions, and the slices, concatenations and table builds of the
/// direct form were about 25 kernel launches per call, forward and backward
/// (`docs/results/toy-lm-h200.md`).
pub fn apply_rope(x: Tensor<4>, positions: &[usize], theta: f64) -> Result<Tensor<4>> {
    let [b, h, s, d] = x.dims();
    if d % 2 != 0 {
        return param_err("head_dim", format!("RoPE needs an even head dimension, got {d}"));
    }
    if positions.len() != s {
        return param_err("positions", format!("{} positions for a sequence of {s}", positions.len()));
    }
    let half = d / 2;
    let tables = cached_tables(positions, half, theta, &x.device(), x.dtype());
    let swapped = x.clone().reshape([b * h, s, 2, half]).flip([2]).reshape([b, h, s, d]);
    Ok(x * tables.cos.expand([b, h, s, d]) + swapped * tables.sin.expand([b, h, s, d]))
}

/// `[cos, cos]` and `[-sin, sin]` over the full width (`[1, 1, seq, dim]`; the two halves of
/// a row share their angles) in the input's dtype.
#[derive(Clone)]
struct RopeTables {
    cos: Tensor<4>,
    sin: Tensor<4>,
}

#[derive(Hash, PartialEq, Eq)]
enum PositionKey {
    Run { start: usize, len: usize },
    List(Vec<usize>),
}

#[derive(Hash, PartialEq, Eq)]
struct TableKey {
    positions: PositionKey,
    half: usize,
    theta: u64,
    dtype: String,
    device: String,
    autodiff: bool,
}

/// Entries kept before the cache starts over (a model uses a handful: the sequence length,
/// and the compressed or block positions of NSA and SeerAttention).
const MAX_CACHED_TABLES: usize = 64;

fn cached_tables(positions: &[usize], half: usize, theta: f64, device: &burn::tensor::Device, dtype: DType) -> RopeTables {
    static CACHE: OnceLock<Mutex<HashMap<TableKey, RopeTables>>> = OnceLock::new();
    let run = positions.windows(2).all(|w| w[1] == w[0] + 1);
    let key = TableKey {
        positions: match (run, positions.first()) {
            (true, Some(&start)) => PositionKey::Run { start, len: positions.len() },
            _ => PositionKey::List(positions.to_vec()),
        },
        half,
        theta: theta.to_bits(),
        dtype: format!("{dtype:?}"),
        device: format!("{device:?}"),
        autodiff: device.is_autodiff(),
    };
    let cache = CACHE.get_or_init(|| Mutex::new(HashMap::new()));
    if let Some(t) = cache.lock().expect("RoPE table cache").get(&key) {
        return t.clone();
    }
    let (s, d) = (positions.len(), 2 * half);
    let (cos, sin) = rope_tables(positions, half, theta, device, dtype);
    // Rotate-half: `[x1, x2] -> [x1 cos - x2 sin, x2 cos + x1 sin]`.
    let tables = RopeTables {
        cos: Tensor::cat(vec![cos.clone(), cos], 1).reshape([1, 1, s, d]),
        sin: Tensor::cat(vec![sin.clone().neg(), sin], 1).reshape([1, 1, s, d]),
    };
    let mut cache = cache.lock().expect("RoPE table cache");
    if cache.len() >= MAX_CACHED_TABLES {
        cache.clear();
    }
    cache.insert(key, tables.clone());
    tables
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
