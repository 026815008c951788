//! Linear maps and per-column vectors applied over groups of rows, so that their weight
//! gradients are computed by many GPU units instead of a few.
//!
//! A weight shared by every row of `x: [rows, d]` gets a gradient that sums over all rows:
//! `x^T dy` for a linear map, a column sum for a bias or a scale. Burn runs the first as one
//! matmul whose inner dimension is `rows` (at 32k tokens its output has so few tiles that a
//! `512 x 768` weight gradient took as long as a `512 x 128` one, 5.9 ms on an H200) and the
//! second as one reduction with one unit per column (6.7 ms per RMSNorm weight at 32k tokens;
//! `docs/results/toy-lm-h200.md`). Here the rows are split into groups first:
//! - [`grouped_linear`] multiplies `[groups, rows / groups, d_in]` by the weight broadcast
//!   over the groups, so the weight gradient is `groups` independent partial products
//!   (a split of the inner dimension) that the broadcast's backward then adds up;
//! - [`scale_columns`] and [`shift_columns`] repeat the vector over a group of up to 64 rows,
//!   so the column sum has `64 x d` outputs and the repeat's backward adds the 64 copies.
//!
//! Values and gradients equal the ungrouped ops up to the order of floating-point sums.
//! `SPARSE_ATTN_ROW_GROUPS=0` turns the grouping off (Burn's own ops), for A/B timing.

use std::sync::OnceLock;

use burn::nn::Linear;
use burn::tensor::Tensor;

/// Rows per group the linear maps' split aims for: long enough for each partial product to
/// run at the matmul's full rate, short enough that a 32k-token batch fills the GPU.
const LINEAR_GROUP_ROWS: usize = 2048;
/// The most groups a linear map's weight gradient is split into (each is a full weight-sized
/// partial product held until the sum).
const MAX_LINEAR_GROUPS: usize = 64;
/// The rows a per-column vector is repeated over.
const MAX_COLUMN_GROUP: usize = 64;
/// Output tiles (of 128 x 128) a split weight gradient aims to reach in all: about two per
/// streaming multiprocessor of a large GPU (132 on an H100 / H200).
const TARGET_GRAD_TILES: usize = 264;
/// The fewest rows a group of a thin weight's split keeps.
const MIN_THIN_GROUP_ROWS: usize = 256;

fn grouping_on() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var("SPARSE_ATTN_ROW_GROUPS").map(|v| v.trim() != "0").unwrap_or(true))
}

/// Groups a linear map over `rows` splits its rows into: the largest power of two that
/// divides `rows`, leaves at least `LINEAR_GROUP_ROWS` rows per group and is at most
/// `MAX_LINEAR_GROUPS` (1 when grouping is off).
pub fn linear_groups(rows: usize) -> usize {
    if !grouping_on() {
        return 1;
    }
    power_of_two_split(rows, LINEAR_GROUP_ROWS, MAX_LINEAR_GROUPS)
}

/// The largest power of two `g <= max_groups` that divides `rows` with `rows / g >= min_rows`
/// (at least 1).
fn power_of_two_split(rows: usize, min_rows: usize, max_groups: usize) -> usize {
    let mut groups = 1;
    while groups * 2 <= max_groups && rows.is_multiple_of(groups * 2) && rows / (groups * 2) >= min_rows {
        groups *= 2;
    }
    groups
}

/// Groups a linear map `d_in -> d_out` over `rows` splits its rows into: those of
/// [`linear_groups`], or more when its weight is thin (few output tiles: a compression MLP's
/// `1024 x 512`, a gate's `512 x 24`), up to `TARGET_GRAD_TILES` tiles in all with at
/// least `MIN_THIN_GROUP_ROWS` rows per group (a power of two dividing `rows`, at most
/// `MAX_LINEAR_GROUPS`; 1 when grouping is off).
pub fn linear_groups_for(rows: usize, d_in: usize, d_out: usize) -> usize {
    let base = linear_groups(rows);
    if !grouping_on() {
        return base;
    }
    let tiles = d_in.div_ceil(128) * d_out.div_ceil(128);
    base.max(power_of_two_split(rows, MIN_THIN_GROUP_ROWS, MAX_LINEAR_GROUPS.min(TARGET_GRAD_TILES / tiles.max(1))))
}

/// Rows a per-column vector is repeated over: the largest power of two up to
/// `MAX_COLUMN_GROUP` that divides `rows` (1 when grouping is off).
pub fn column_group(rows: usize) -> usize {
    if !grouping_on() || rows == 0 {
        return 1;
    }
    1usize << rows.trailing_zeros().min(MAX_COLUMN_GROUP.trailing_zeros())
}

/// `layer.forward(x)` (Burn's [`Linear`]: `x @ weight + bias` over the last dimension) with
/// the weight gradient split over row groups.
pub fn grouped_linear<const D: usize>(layer: &Linear, x: Tensor<D>) -> Tensor<D> {
    linear_rows(x, layer.weight.val(), layer.bias.as_ref().map(|b| b.val()))
}

/// `x @ weight (+ bias)` over the last dimension of `x: [.., d_in]`, `weight: [d_in, d_out]`,
/// with the weight gradient split over row groups (see the module docs).
///
/// # Panics
/// When `weight`'s first dimension or `bias`'s length does not match (as Burn's `linear`).
pub fn linear_rows<const D: usize>(x: Tensor<D>, weight: Tensor<2>, bias: Option<Tensor<1>>) -> Tensor<D> {
    let dims = x.dims();
    let d_in = dims[D - 1];
    let [w_in, d_out] = weight.dims();
    assert_eq!(w_in, d_in, "linear: weight is [{w_in}, {d_out}] but the input's last dimension is {d_in}");
    if let Some(b) = &bias {
        assert_eq!(b.dims(), [d_out], "linear: bias must be [{d_out}], got {:?}", b.dims());
    }
    let rows: usize = dims[..D - 1].iter().product();
    let groups = linear_groups_for(rows, d_in, d_out);
    if groups == 1 {
        return burn::tensor::module::linear(x, weight, bias);
    }
    let y = x.reshape([groups, rows / groups, d_in]).matmul(weight.unsqueeze::<3>());
    let y = match bias {
        Some(b) => shift_columns(y, b),
        None => y,
    };
    let mut out = dims;
    out[D - 1] = d_out;
    y.reshape(out)
}

/// `x * v` with `v: [d]` broadcast over the rows of `x: [.., d]`, its gradient summed in
/// parallel over row groups.
pub fn scale_columns<const D: usize>(x: Tensor<D>, v: Tensor<1>) -> Tensor<D> {
    per_column(x, v, |x, v| x * v)
}

/// `x + v` with `v: [d]` broadcast over the rows of `x: [.., d]`, its gradient summed in
/// parallel over row groups.
pub fn shift_columns<const D: usize>(x: Tensor<D>, v: Tensor<1>) -> Tensor<D> {
    per_column(x, v, |x, v| x + v)
}

fn per_column<const D: usize>(x: Tensor<D>, v: Tensor<1>, op: impl Fn(Tensor<3>, Tensor<3>) -> Tensor<3>) -> Tensor<D> {
    let dims = x.dims();
    let d = dims[D - 1];
    assert_eq!(v.dims(), [d], "per-column vector must be [{d}] for an input of shape {dims:?}, got {:?}", v.dims());
    let rows: usize = dims[..D - 1].iter().product();
    let group = column_group(rows);
    let v = v.reshape([1, 1, d]);
    let v = if group > 1 { v.repeat_dim(1, group) } else { v };
    op(x.reshape([rows / group, group, d]), v).reshape(dims)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::nn::LinearConfig;
    use burn::tensor::{Device, Distribution};

    fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
        t.into_data().convert::<f32>().try_to_vec::<f32>().unwrap()
    }

    fn assert_close(a: Vec<f32>, b: Vec<f32>, what: &str) {
        assert_eq!(a.len(), b.len(), "{what}: lengths");
        for (i, (a, b)) in a.iter().zip(&b).enumerate() {
            assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "{what} [{i}]: {a} vs {b}");
        }
    }

    #[test]
    fn group_counts() {
        assert_eq!(linear_groups(32768), 16);
        assert_eq!(linear_groups(4096), 2);
        assert_eq!(linear_groups(4095), 1);
        assert_eq!(linear_groups(2048 * 3 * 4), 8);
        assert_eq!(linear_groups(1 << 20), MAX_LINEAR_GROUPS);
        // Thin weights split further: 2 x 1 tiles reach 64 groups of 256 rows, a 1024 x 512
        // weight (32 tiles) 8 groups; a wide one keeps the base count.
        assert_eq!(linear_groups_for(16384, 512, 24), 64);
        assert_eq!(linear_groups_for(2048, 1024, 512), 8);
        assert_eq!(linear_groups_for(2046, 256, 64), 2);
        assert_eq!(linear_groups_for(32768, 512, 1280), 16);
        assert_eq!(linear_groups_for(100, 512, 24), 1);
        assert_eq!(column_group(48), 16);
        assert_eq!(column_group(7), 1);
        assert_eq!(column_group(1 << 12), 64);
    }

    /// Output and the gradients of x, weight and bias against Burn's `Linear`, at a row count
    /// that splits into 4 groups and one that does not split.
    #[test]
    fn grouped_linear_matches_burns_linear() {
        let device = Device::flex().autodiff();
        for shape in [[2, 4096, 6], [1, 5, 6]] {
            let layer = LinearConfig::new(6, 3).init(&device);
            let x = Tensor::<3>::random(shape, Distribution::Normal(0.0, 1.0), &device).require_grad();
            let w = Tensor::<3>::random([shape[0], shape[1], 3], Distribution::Normal(0.0, 1.0), &device);
            let ours = grouped_linear(&layer, x.clone());
            let burns = layer.forward(x.clone());
            let g_ours = (ours.clone() * w.clone()).sum().backward();
            let g_burn = (burns.clone() * w).sum().backward();
            assert_close(values(ours), values(burns), "output");
            assert_close(values(x.grad(&g_ours).unwrap()), values(x.grad(&g_burn).unwrap()), "d x");
            let (wt, bias) = (layer.weight.val(), layer.bias.as_ref().unwrap().val());
            assert_close(values(wt.grad(&g_ours).unwrap()), values(wt.grad(&g_burn).unwrap()), "d weight");
            assert_close(values(bias.grad(&g_ours).unwrap()), values(bias.grad(&g_burn).unwrap()), "d bias");
        }
    }

    /// `scale_columns` and `shift_columns` against the plain broadcast, values and gradients.
    #[test]
    fn column_ops_match_broadcast() {
        let device = Device::flex().autodiff();
        for shape in [[2, 24, 8], [1, 7, 8]] {
            let x = Tensor::<3>::random(shape, Distribution::Normal(0.0, 1.0), &device).require_grad();
            let v = Tensor::<1>::random([8], Distribution::Normal(0.0, 1.0), &device).require_grad();
            let w = Tensor::<3>::random(shape, Distribution::Normal(0.0, 1.0), &device);
            let plain_v = || v.clone().reshape([1, 1, 8]);
            for (ours, plain, what) in [
                (scale_columns(x.clone(), v.clone()), x.clone() * plain_v(), "scale"),
                (shift_columns(x.clone(), v.clone()), x.clone() + plain_v(), "shift"),
            ] {
                let g_ours = (ours.clone() * w.clone()).sum().backward();
                let g_plain = (plain.clone() * w.clone()).sum().backward();
                assert_close(values(ours), values(plain), what);
                assert_close(values(x.grad(&g_ours).unwrap()), values(x.grad(&g_plain).unwrap()), what);
                assert_close(values(v.grad(&g_ours).unwrap()), values(v.grad(&g_plain).unwrap()), what);
            }
        }
    }
}
