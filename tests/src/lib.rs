//! Shared helpers of the cross-crate correctness tests of `burn-sparse-attn`:
//! a deterministic RNG, f64 tensor constructors, an independent naive attention written with
//! plain loops, finite-difference gradient checks for functions and for modules, and error
//! matchers.

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::tensor::{DType, Device, Int, Tensor, TensorData};
use burn_sparse_attn::SparseAttnError;

// ---------------------------------------------------------------------------------------------
// Devices and tensors
// ---------------------------------------------------------------------------------------------

/// The plain CPU device (no autodiff).
pub fn dev() -> Device {
    Device::flex()
}

/// The CPU device with autodiff.
pub fn ad_dev() -> Device {
    Device::flex().autodiff()
}

/// An f64 tensor from row-major data.
pub fn tensor<const D: usize>(data: Vec<f64>, shape: [usize; D], device: &Device) -> Tensor<D> {
    assert_eq!(data.len(), shape.iter().product::<usize>(), "tensor(): data/shape mismatch");
    Tensor::from_data(TensorData::new(data, shape), (device, DType::F64))
}

/// An f32 tensor from row-major data (given as f64).
pub fn tensor_f32<const D: usize>(data: Vec<f64>, shape: [usize; D], device: &Device) -> Tensor<D> {
    assert_eq!(data.len(), shape.iter().product::<usize>(), "tensor_f32(): data/shape mismatch");
    let data: Vec<f32> = data.into_iter().map(|x| x as f32).collect();
    Tensor::from_data(TensorData::new(data, shape), (device, DType::F32))
}

/// An i64 tensor from row-major data.
pub fn int_tensor<const D: usize>(data: Vec<i64>, shape: [usize; D], device: &Device) -> Tensor<D, Int> {
    assert_eq!(data.len(), shape.iter().product::<usize>(), "int_tensor(): data/shape mismatch");
    Tensor::from_data(TensorData::new(data, shape), device)
}

/// Row-major values of a float tensor, as f64.
pub fn values<const D: usize>(t: Tensor<D>) -> Vec<f64> {
    t.into_data().convert::<f64>().try_to_vec::<f64>().expect("float data")
}

/// Row-major values of an int tensor, as i64.
pub fn ints<const D: usize>(t: Tensor<D, Int>) -> Vec<i64> {
    t.into_data().convert::<i64>().try_to_vec::<i64>().expect("int data")
}

/// `t[:, :, lo..hi, :]`: the rows `lo..hi` (axis 2) of a 4-D tensor, e.g. one sequence of
/// a packed batch.
pub fn seq_rows(t: &Tensor<4>, lo: usize, hi: usize) -> Tensor<4> {
    let [b, h, _, d] = t.dims();
    t.clone().slice([0..b, 0..h, lo..hi, 0..d])
}

/// The rows `lo..hi` (axis 2) of the flat values of a `[outer..., len, width]` tensor, where
/// `outer` is the product of the leading dims (batch x heads).
pub fn flat_rows(full: &[f64], outer: usize, len: usize, width: usize, lo: usize, hi: usize) -> Vec<f64> {
    (0..outer).flat_map(|o| full[(o * len + lo) * width..(o * len + hi) * width].to_vec()).collect()
}

/// A scalar tensor's value.
pub fn scalar(t: Tensor<1>) -> f64 {
    let v = values(t);
    assert_eq!(v.len(), 1, "expected a scalar tensor");
    v[0]
}

// ---------------------------------------------------------------------------------------------
// Random numbers
// ---------------------------------------------------------------------------------------------

/// SplitMix64: small, deterministic, good enough for test data.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from a seed.
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(0x2545_F491_4F6C_DD1D))
    }

    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in `[lo, hi)`.
    pub fn range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.uniform()
    }

    /// Uniform integer in `0..n`.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = self.uniform().max(1e-300);
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }

    /// `n` normal samples with standard deviation `std`.
    pub fn normals(&mut self, n: usize, std: f64) -> Vec<f64> {
        (0..n).map(|_| std * self.normal()).collect()
    }

    /// A random f64 tensor with normal entries.
    pub fn randn<const D: usize>(&mut self, shape: [usize; D], std: f64, device: &Device) -> Tensor<D> {
        let n = shape.iter().product();
        tensor(self.normals(n, std), shape, device)
    }

    /// `k` distinct indices of `0..n` (all of them, in order, when `k >= n`).
    pub fn subset(&mut self, n: usize, k: usize) -> Vec<usize> {
        if k >= n {
            return (0..n).collect();
        }
        let mut all: Vec<usize> = (0..n).collect();
        for i in 0..k {
            let j = i + self.below(n - i);
            all.swap(i, j);
        }
        let mut out = all[..k].to_vec();
        out.sort_unstable();
        out
    }
}

// ---------------------------------------------------------------------------------------------
// Comparisons
// ---------------------------------------------------------------------------------------------

/// Checks `|a - b| <= atol + rtol * |b|` element-wise; equal infinities match.
pub fn assert_close(what: &str, got: &[f64], want: &[f64], rtol: f64, atol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length {} != {}", got.len(), want.len());
    for (i, (&a, &b)) in got.iter().zip(want).enumerate() {
        if a.is_infinite() || b.is_infinite() {
            assert!(a == b, "{what}[{i}]: got {a}, want {b}");
            continue;
        }
        assert!(a.is_finite() && b.is_finite(), "{what}[{i}]: got {a}, want {b} (not finite)");
        assert!((a - b).abs() <= atol + rtol * b.abs(), "{what}[{i}]: got {a}, want {b} (diff {:e})", (a - b).abs());
    }
}

/// `||a - b|| / ||b||`.
pub fn rel_err(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let num: f64 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum::<f64>().sqrt();
    let den: f64 = b.iter().map(|y| y * y).sum::<f64>().sqrt();
    num / den.max(1e-300)
}

/// Asserts two float vectors differ somewhere by more than `tol` (makes "equal" tests meaningful).
pub fn assert_differs(what: &str, a: &[f64], b: &[f64], tol: f64) {
    assert_eq!(a.len(), b.len());
    let max = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max);
    assert!(max > tol, "{what}: expected the values to differ, max diff {max:e}");
}

// ---------------------------------------------------------------------------------------------
// Naive attention (plain f64 loops, independent of the library)
// ---------------------------------------------------------------------------------------------

/// Sizes of a naive attention problem.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dims {
    pub b: usize,
    pub hq: usize,
    pub hkv: usize,
    pub sq: usize,
    pub sk: usize,
    pub d: usize,
}

impl Dims {
    pub fn new(b: usize, hq: usize, hkv: usize, sq: usize, sk: usize, d: usize) -> Self {
        Self { b, hq, hkv, sq, sk, d }
    }
    pub fn q_shape(&self) -> [usize; 4] {
        [self.b, self.hq, self.sq, self.d]
    }
    pub fn kv_shape(&self) -> [usize; 4] {
        [self.b, self.hkv, self.sk, self.d]
    }
    /// kv head of query head `h`.
    pub fn kv_head(&self, h: usize) -> usize {
        h / (self.hq / self.hkv)
    }
    /// Key position of query row `i` (bottom-right alignment).
    pub fn pos(&self, i: usize) -> i64 {
        i as i64 + self.sk as i64 - self.sq as i64
    }
    pub fn qi(&self, b: usize, h: usize, i: usize) -> usize {
        ((b * self.hq + h) * self.sq + i) * self.d
    }
    pub fn ki(&self, b: usize, h: usize, j: usize) -> usize {
        ((b * self.hkv + h) * self.sk + j) * self.d
    }
}

/// Naive causal/window visibility: `causal` hides keys after the query's key position,
/// `window = Some(w)` keeps the `w` most recent key positions (the query's own included).
pub fn naive_visible(dims: &Dims, causal: bool, window: Option<usize>, i: usize, j: usize) -> bool {
    let pos = dims.pos(i);
    let j = j as i64;
    if causal && j > pos {
        return false;
    }
    if let Some(w) = window
        && j <= pos - w as i64
    {
        return false;
    }
    true
}

/// Plain-loop attention. `visible(b, h, i, j)` and `bias(b, h, j)` take the query head `h`.
/// Returns the output `[b, hq, sq, d]` and the LSE `[b, hq, sq]` (`-inf` for empty rows).
pub fn naive_attention(
    dims: &Dims,
    q: &[f64],
    k: &[f64],
    v: &[f64],
    scale: f64,
    visible: &dyn Fn(usize, usize, usize, usize) -> bool,
    bias: &dyn Fn(usize, usize, usize) -> f64,
) -> (Vec<f64>, Vec<f64>) {
    naive_attention_pair_bias(dims, q, k, v, scale, visible, &|b, h, _i, j| bias(b, h, j))
}

/// [`naive_attention`] with a bias per (query, key): `bias(b, h, i, j)`.
pub fn naive_attention_pair_bias(
    dims: &Dims,
    q: &[f64],
    k: &[f64],
    v: &[f64],
    scale: f64,
    visible: &dyn Fn(usize, usize, usize, usize) -> bool,
    bias: &dyn Fn(usize, usize, usize, usize) -> f64,
) -> (Vec<f64>, Vec<f64>) {
    let Dims { b: nb, hq, sq, sk, d, .. } = *dims;
    let mut out = vec![0.0; nb * hq * sq * d];
    let mut lse = vec![f64::NEG_INFINITY; nb * hq * sq];
    for b in 0..nb {
        for h in 0..hq {
            let hk = dims.kv_head(h);
            for i in 0..sq {
                let qo = dims.qi(b, h, i);
                let mut s: Vec<(usize, f64)> = Vec::new();
                for j in 0..sk {
                    if !visible(b, h, i, j) {
                        continue;
                    }
                    let ko = dims.ki(b, hk, j);
                    let dot: f64 = (0..d).map(|t| q[qo + t] * k[ko + t]).sum();
                    s.push((j, dot * scale + bias(b, h, i, j)));
                }
                if s.is_empty() {
                    continue;
                }
                let m = s.iter().map(|x| x.1).fold(f64::NEG_INFINITY, f64::max);
                let l: f64 = s.iter().map(|x| (x.1 - m).exp()).sum();
                lse[(b * hq + h) * sq + i] = m + l.ln();
                for &(j, sc) in &s {
                    let p = (sc - m).exp() / l;
                    let vo = dims.ki(b, hk, j);
                    for t in 0..d {
                        out[qo + t] += p * v[vo + t];
                    }
                }
            }
        }
    }
    (out, lse)
}

/// Default softmax scale.
pub fn default_scale(d: usize) -> f64 {
    1.0 / (d as f64).sqrt()
}

// ---------------------------------------------------------------------------------------------
// Finite-difference gradient checks
// ---------------------------------------------------------------------------------------------

/// Settings of a finite-difference check.
#[derive(Debug, Clone, Copy)]
pub struct FdConfig {
    /// Central-difference step.
    pub eps: f64,
    /// Relative tolerance.
    pub rtol: f64,
    /// Absolute tolerance.
    pub atol: f64,
    /// Entries checked per input (all when the input is smaller).
    pub samples: usize,
    /// Seed of the entry sampling.
    pub seed: u64,
}

impl Default for FdConfig {
    fn default() -> Self {
        Self { eps: 1e-6, rtol: 1e-5, atol: 1e-8, samples: 24, seed: 7 }
    }
}

fn compare_grad(name: &str, input: &str, idx: usize, analytic: f64, numeric: f64, cfg: &FdConfig) {
    assert!(analytic.is_finite(), "{name}: d/d{input}[{idx}] analytic is {analytic}");
    let tol = cfg.atol + cfg.rtol * analytic.abs().max(numeric.abs());
    assert!(
        (analytic - numeric).abs() <= tol,
        "{name}: d/d{input}[{idx}] analytic {analytic:.12e} vs numeric {numeric:.12e} (diff {:.3e}, tol {tol:.3e})",
        (analytic - numeric).abs()
    );
}

/// Checks the gradient of the scalar `f(inputs)` against central differences.
///
/// Every input is handed to `f` as a flat 1-D f64 tensor (reshape inside `f`); `names` names
/// them and `check[i]` says whether input `i` is checked. `f` runs once on the autodiff device
/// (analytic gradients) and `2 * samples` times per checked input on the plain device. Each
/// checked input must get a non-zero gradient somewhere, so a detached input fails.
pub fn grad_check<F>(name: &str, names: &[&str], inputs: &[Vec<f64>], check: &[bool], cfg: FdConfig, f: F)
where
    F: Fn(&[Tensor<1>]) -> Tensor<1>,
{
    assert_eq!(names.len(), inputs.len());
    assert_eq!(check.len(), inputs.len());
    let ad = ad_dev();
    let leaves: Vec<Tensor<1>> = inputs
        .iter()
        .enumerate()
        .map(|(i, x)| {
            let t = tensor(x.clone(), [x.len()], &ad);
            if check[i] { t.require_grad() } else { t }
        })
        .collect();
    let loss = f(&leaves).sum();
    let loss_value = scalar(loss.clone());
    assert!(loss_value.is_finite(), "{name}: loss is {loss_value}");
    let grads = loss.backward();

    let plain = dev();
    let mut rng = Rng::new(cfg.seed);
    let eval = |xs: &[Vec<f64>]| -> f64 {
        let ts: Vec<Tensor<1>> = xs.iter().map(|x| tensor(x.clone(), [x.len()], &plain)).collect();
        scalar(f(&ts).sum())
    };
    // The plain-device forward must agree with the autodiff one.
    let base = eval(inputs);
    assert!((base - loss_value).abs() <= 1e-12 * (1.0 + base.abs()), "{name}: forward differs between devices");

    for (i, x) in inputs.iter().enumerate() {
        if !check[i] {
            continue;
        }
        let analytic = match leaves[i].grad(&grads) {
            Some(g) => values(g),
            None => vec![0.0; x.len()],
        };
        assert_eq!(analytic.len(), x.len());
        assert!(analytic.iter().all(|g| g.is_finite()), "{name}: gradient of {} has non-finite entries", names[i]);
        let max = analytic.iter().fold(0.0f64, |m, g| m.max(g.abs()));
        assert!(max > 1e-10, "{name}: gradient of {} is identically zero", names[i]);
        for idx in rng.subset(x.len(), cfg.samples) {
            let mut xs = inputs.to_vec();
            xs[i][idx] = x[idx] + cfg.eps;
            let fp = eval(&xs);
            xs[i][idx] = x[idx] - cfg.eps;
            let fm = eval(&xs);
            let numeric = (fp - fm) / (2.0 * cfg.eps);
            compare_grad(name, names[i], idx, analytic[idx], numeric, &cfg);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Module helpers: f64 casting, gradient collection and parameter perturbation by path
// ---------------------------------------------------------------------------------------------

struct CastF64;

impl ModuleMapper for CastF64 {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let (id, t, _) = param.consume();
        let t = t.cast(DType::F64).detach();
        let t = if t.is_autodiff() { t.require_grad() } else { t };
        Param::initialized(id, t)
    }
}

/// Casts every float parameter to f64 (as fresh leaves that require gradients when the module
/// lives on an autodiff device).
pub fn module_to_f64<M: Module>(module: M) -> M {
    module.map(&mut CastF64)
}

struct Randomize {
    rng: Rng,
    std: f64,
}

impl ModuleMapper for Randomize {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let (id, t, _) = param.consume();
        let (device, dtype, shape) = (t.device(), t.dtype(), t.dims());
        let v = self.rng.normals(shape.iter().product(), self.std);
        Param::initialized(id, Tensor::<D>::from_data(TensorData::new(v, shape), (&device, dtype)))
    }
}

/// Replaces every float parameter with seeded normal values of standard deviation `std`, so
/// that a test does not depend on Burn's (unseeded) initialisation.
pub fn randomize_params<M: Module>(module: M, seed: u64, std: f64) -> M {
    module.map(&mut Randomize { rng: Rng::new(seed), std })
}

struct Perturb {
    path: Vec<String>,
    target: String,
    index: usize,
    delta: f64,
    found: bool,
}

impl ModuleMapper for Perturb {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }
    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        if self.path.join(".") != self.target {
            return param;
        }
        self.found = true;
        let (id, t, _) = param.consume();
        let device = t.device();
        let dtype = t.dtype();
        let shape: [usize; D] = t.dims();
        let mut v = values(t);
        v[self.index] += self.delta;
        let t = Tensor::<D>::from_data(TensorData::new(v, shape), (&device, dtype));
        Param::initialized(id, t)
    }
}

/// Adds `delta` to entry `index` (row-major) of the parameter at `path` (e.g. `"fc1.weight"`).
pub fn perturb_param<M: Module>(module: M, path: &str, index: usize, delta: f64) -> M {
    let mut p = Perturb { path: Vec::new(), target: path.to_string(), index, delta, found: false };
    let m = module.map(&mut p);
    assert!(p.found, "no parameter at path {path}");
    m
}

/// A parameter's path, id, element count and values.
#[derive(Debug, Clone)]
pub struct ParamInfo {
    pub path: String,
    pub id: ParamId,
    pub numel: usize,
    pub shape: Vec<usize>,
    pub values: Vec<f64>,
}

struct Collect {
    path: Vec<String>,
    out: Vec<ParamInfo>,
}

impl ModuleVisitor for Collect {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }
    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let shape = param.val().dims().to_vec();
        let v = values(param.val());
        self.out.push(ParamInfo { path: self.path.join("."), id: param.id, numel: v.len(), shape, values: v });
    }
}

/// Every float parameter of a module, in visiting order.
pub fn module_params<M: Module>(module: &M) -> Vec<ParamInfo> {
    let mut c = Collect { path: Vec::new(), out: Vec::new() };
    module.visit(&mut c);
    c.out
}

struct CollectGrads<'a> {
    path: Vec<String>,
    grads: &'a burn::tensor::Gradients,
    out: Vec<(String, Option<Vec<f64>>)>,
}

impl ModuleVisitor for CollectGrads<'_> {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }
    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let g = param.val().grad(self.grads).map(values);
        self.out.push((self.path.join("."), g));
    }
}

/// Gradients of every float parameter by path (`None` where the parameter got none).
pub fn module_grads<M: Module>(module: &M, grads: &burn::tensor::Gradients) -> Vec<(String, Option<Vec<f64>>)> {
    let mut c = CollectGrads { path: Vec::new(), grads, out: Vec::new() };
    module.visit(&mut c);
    c.out
}

/// Finite-difference check of `d loss / d param` for the parameters at `paths` of an f64
/// module on the autodiff device (see [`module_to_f64`]); `samples` entries per parameter.
/// A path `name[a..b]` samples only columns `a..b` of a 2-D parameter.
pub fn module_grad_check<M, F>(name: &str, module: &M, paths: &[&str], cfg: FdConfig, loss: F)
where
    M: Module + Clone,
    F: Fn(&M) -> Tensor<1>,
{
    let l = loss(module).sum();
    let l_value = scalar(l.clone());
    assert!(l_value.is_finite(), "{name}: loss is {l_value}");
    let grads = l.backward();
    let all = module_grads(module, &grads);
    let infos = module_params(module);
    let mut rng = Rng::new(cfg.seed);
    for &spec in paths {
        // `path[a..b]`: only entries in columns `a..b` of a 2-D parameter (one branch of a
        // packed projection).
        let (path, cols) = match spec.split_once('[') {
            Some((p, r)) => {
                let (a, b) = r.trim_end_matches(']').split_once("..").expect("columns as [a..b]");
                (p, Some(a.parse::<usize>().unwrap()..b.parse::<usize>().unwrap()))
            }
            None => (spec, None),
        };
        let info = infos.iter().find(|p| p.path == path).unwrap_or_else(|| {
            panic!("{name}: no parameter {path}; have {:?}", infos.iter().map(|p| p.path.clone()).collect::<Vec<_>>())
        });
        let analytic = all
            .iter()
            .find(|(p, _)| p == path)
            .and_then(|(_, g)| g.clone())
            .unwrap_or_else(|| panic!("{name}: parameter {path} got no gradient"));
        assert!(analytic.iter().all(|g| g.is_finite()), "{name}: gradient of {path} not finite");
        let candidates: Vec<usize> = match &cols {
            Some(c) => {
                let width = *info.shape.last().unwrap();
                (0..info.numel).filter(|i| c.contains(&(i % width))).collect()
            }
            None => (0..info.numel).collect(),
        };
        assert!(!candidates.is_empty(), "{name}: {spec} selects no entries");
        assert!(candidates.iter().any(|&i| analytic[i].abs() > 1e-10), "{name}: gradient of {spec} is identically zero");
        for idx in rng.subset(candidates.len(), cfg.samples).into_iter().map(|i| candidates[i]) {
            let fp = scalar(loss(&perturb_param(module.clone(), path, idx, cfg.eps)).sum());
            let fm = scalar(loss(&perturb_param(module.clone(), path, idx, -cfg.eps)).sum());
            let numeric = (fp - fm) / (2.0 * cfg.eps);
            compare_grad(name, path, idx, analytic[idx], numeric, &cfg);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

/// The error of a call that must fail.
pub fn expect_err<T>(what: &str, r: Result<T, SparseAttnError>) -> SparseAttnError {
    match r {
        Ok(_) => panic!("{what}: expected an error, got Ok"),
        Err(e) => e,
    }
}

/// Asserts a `Shape` error naming one of `args`.
pub fn assert_shape_err<T>(what: &str, r: Result<T, SparseAttnError>, args: &[&str]) {
    match expect_err(what, r) {
        SparseAttnError::Shape { arg, detail } => {
            assert!(args.contains(&arg), "{what}: Shape error names `{arg}` ({detail}), expected one of {args:?}");
            assert!(!detail.is_empty(), "{what}: empty detail");
        }
        other => panic!("{what}: expected a Shape error naming {args:?}, got {other:?}"),
    }
}

/// Asserts a `Param` error naming one of `args`.
pub fn assert_param_err<T>(what: &str, r: Result<T, SparseAttnError>, args: &[&str]) {
    match expect_err(what, r) {
        e @ SparseAttnError::Param { .. } => {
            let SparseAttnError::Param { arg, detail } = &e else { unreachable!() };
            assert!(args.contains(arg), "{what}: Param error names `{arg}` ({detail}), expected one of {args:?}");
            assert!(e.to_string().contains(arg), "{what}: message `{e}` does not name `{arg}`");
        }
        other => panic!("{what}: expected a Param error naming {args:?}, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Naive routing
// ---------------------------------------------------------------------------------------------

/// Naive MoBA routing of query `(b, h, i)`: the query's own block plus the `top_k - 1`
/// complete blocks before it with the largest `q . mean(K_block)`; sorted. Empty when the
/// query sits before the first key.
#[allow(clippy::too_many_arguments)]
pub fn naive_moba_blocks(dims: &Dims, q: &[f64], k: &[f64], bs: usize, top_k: usize, b: usize, h: usize, i: usize) -> Vec<usize> {
    let pos = dims.pos(i);
    if pos < 0 {
        return Vec::new();
    }
    let own = pos as usize / bs;
    let hk = dims.kv_head(h);
    let qo = dims.qi(b, h, i);
    let mut scored: Vec<(f64, usize)> = (0..own)
        .map(|j| {
            let mut s = 0.0;
            for key in j * bs..(j + 1) * bs {
                let ko = dims.ki(b, hk, key);
                s += (0..dims.d).map(|t| q[qo + t] * k[ko + t]).sum::<f64>();
            }
            (s / bs as f64, j)
        })
        .collect();
    scored.sort_by(|a, b| b.0.total_cmp(&a.0));
    let mut out: Vec<usize> = scored.iter().take(top_k.saturating_sub(1)).map(|x| x.1).collect();
    out.push(own);
    out.sort_unstable();
    out
}

/// The valid (non-negative, in-range) entries of one index list, sorted and deduplicated.
pub fn valid_sorted(list: &[i64], n_blocks: usize) -> Vec<usize> {
    let mut v: Vec<usize> = list.iter().filter(|&&x| x >= 0 && (x as usize) < n_blocks).map(|&x| x as usize).collect();
    v.sort_unstable();
    v.dedup();
    v
}
