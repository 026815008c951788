//! The training loop: AdamW, warm-up + cosine decay, global gradient-norm clipping, periodic
//! validation, checkpoints (burnpack model + optimizer state + JSON) and resume; on one
//! device, or data-parallel on several ([`crate::ddp`]) through the same loop.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::{AdamWConfig, GradientsParams, ModuleOptimizer};
use burn::store::burn_pack::Tensor as PackTensor;
use burn::store::{ApplyResult, BurnpackStore, ModuleSnapshot, ModuleStore, SafetensorsStore};
use burn::tensor::activation::log_softmax;
use burn::tensor::{Bool, Bytes, Device, Int, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use crate::AppResult;
use burn_sparse_attn::SeerMode;

use crate::config::{Method, RunConfig, Task, TrainConfig};
use crate::data::{Batch, DataSource};
use crate::model::ToyLm;
use crate::selection;

/// File names inside a checkpoint directory.
///
/// The model: weights and parameter ids in Burn's burnpack format ([`BurnpackStore`]). The
/// optimizer state is keyed by parameter id, so a model loaded from this file (ids and all)
/// continues with its AdamW moments.
pub const MODEL_FILE: &str = "model.bpk";
/// The model file of checkpoints written before [`MODEL_FILE`]: safetensors, which keeps no
/// parameter ids. Still read when a checkpoint has no [`MODEL_FILE`] (see [`load_weights`]).
pub const LEGACY_MODEL_FILE: &str = "model.safetensors";
/// Optimizer state (burnpack).
pub const OPTIMIZER_FILE: &str = "optimizer.bpk";
/// Step counter, loss history and metrics.
pub const STATE_FILE: &str = "state.json";
/// The run's configuration.
pub const CONFIG_FILE: &str = "config.toml";

/// Where a run writes and what it starts from.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// The device to train on (autodiff is added here); the first of `devices` in a
    /// data-parallel run, where it logs, validates and writes the checkpoints.
    pub device: Device,
    /// Every device of a data-parallel run (`--devices`), `device` first: one replica of the
    /// model per device, each on its share of every batch, gradients summed by Burn's
    /// all-reduce ([`crate::ddp`]). Empty (or `device` alone) for a single-device run.
    pub devices: Vec<Device>,
    /// Output directory; the checkpoint goes to `out/checkpoint`.
    pub out: PathBuf,
    /// Continue from this checkpoint directory.
    pub resume: Option<PathBuf>,
    /// Initialise from this checkpoint (partial: e.g. a dense model for Seer distillation).
    pub init_from: Option<PathBuf>,
    /// Prefix of progress lines (the method in `compare`).
    pub log_prefix: String,
}

/// What a run produced.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainOutcome {
    /// Attention layout, e.g. `moba+dense1`.
    pub label: String,
    /// Steps trained in total.
    pub steps: usize,
    /// Parameters (all).
    pub params: usize,
    /// Parameters that were trained.
    pub trainable_params: usize,
    /// LM loss of every step (scored tokens only).
    pub losses: Vec<f32>,
    /// Global gradient norm (before clipping) of each step this process ran; in a
    /// data-parallel run, of the summed gradient.
    #[serde(default)]
    pub grad_norms: Vec<f32>,
    /// Devices the run trained on (data-parallel when more than 1).
    #[serde(default = "one")]
    pub devices: usize,
    /// Mean LM loss of the last 10 steps.
    pub final_train_loss: f32,
    /// Validation loss at the end.
    pub val_loss: f32,
    /// Every validation of the run (every `eval_every` steps and at the end).
    #[serde(default)]
    pub val_curve: Vec<ValPoint>,
    /// Validation accuracy: on answer tokens for `mqar`/`needle`, next-byte for `lm`.
    pub val_accuracy: f32,
    /// Gate loss of the last step (SeerAttention only).
    pub final_gate_loss: Option<f32>,
    /// Steady-state training throughput: tokens of this process's steps after the first
    /// [`WARMUP_STEPS`] (kernel compilation, memory-pool growth) over their wall time; all
    /// steps when the run has no more than that.
    pub tokens_per_sec: f64,
    /// Throughput of the median timed step (the same steps as `tokens_per_sec`): far above
    /// `tokens_per_sec` when a few steps stalled (a late kernel compilation, say).
    #[serde(default)]
    pub median_tokens_per_sec: f64,
    /// Wall time of the first [`WARMUP_STEPS`] steps (compilation and warm-up), seconds.
    #[serde(default)]
    pub warmup_s: f64,
    /// Peak memory in bytes.
    pub peak_memory_bytes: Option<u64>,
    /// What `peak_memory_bytes` measures.
    pub peak_memory_kind: String,
    /// Wall time of this process's part of the run, validation and checkpoints included.
    pub wall_time_s: f64,
    /// The checkpoint directory.
    pub checkpoint: PathBuf,
    /// Per layer, the share of causal (query, key) pairs its attention attends on the first
    /// validation sequence (1.0 for dense; `selection.svg` draws where); empty above
    /// [`SELECTION_MAP_MAX_SEQ`].
    #[serde(default)]
    pub attended_pairs: Vec<f64>,
}

fn one() -> usize {
    1
}

/// One validation: after how many steps, its loss and accuracy.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ValPoint {
    /// Steps done when it ran.
    pub step: usize,
    /// Validation loss.
    pub loss: f32,
    /// Validation accuracy (answer tokens for `mqar`/`needle`, next byte for `lm`).
    pub accuracy: f32,
}

/// `state.json` of a checkpoint.
///
/// Checkpoints written before [`MODEL_FILE`] also hold a `param_ids` map (parameter ids by
/// module path, which their safetensors model could not keep); it is ignored when read, as
/// unknown fields are.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainState {
    /// Steps done.
    pub step: usize,
    /// Attention layout.
    pub label: String,
    /// LM loss of every step done.
    pub losses: Vec<f32>,
    /// Last validation loss.
    pub val_loss: Option<f32>,
    /// Last validation accuracy.
    pub val_accuracy: Option<f32>,
    /// Every validation so far.
    #[serde(default)]
    pub val_curve: Vec<ValPoint>,
    /// Seed of the run.
    pub seed: u64,
    /// Whether `optimizer.bpk` holds the AdamW moments.
    pub has_optimizer_state: bool,
}

/// The median of `v` (the mean of the two middle values for an even count); `None` when empty.
pub fn median(v: &mut [f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 { v[n / 2] } else { 0.5 * (v[n / 2 - 1] + v[n / 2]) })
}

/// Learning rate at `step` (0-based): linear warm-up, then cosine decay to `lr * min_lr_ratio`.
pub fn lr_at(step: usize, t: &TrainConfig) -> f64 {
    if step < t.warmup {
        return t.lr * (step + 1) as f64 / t.warmup as f64;
    }
    let span = t.steps.saturating_sub(t.warmup).max(1) as f64;
    let progress = ((step - t.warmup) as f64 / span).min(1.0);
    let min = t.lr * t.min_lr_ratio;
    min + (t.lr - min) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
}

/// Host batch to `(inputs, targets, weights)` on `device`.
pub fn batch_tensors(b: &Batch, device: &Device) -> (Tensor<2, Int>, Tensor<2, Int>, Tensor<2>) {
    let shape = [b.batch, b.seq];
    (
        Tensor::from_data(TensorData::new(b.inputs.clone(), shape), device),
        Tensor::from_data(TensorData::new(b.targets.clone(), shape), device),
        Tensor::from_data(TensorData::new(b.weights.clone(), shape), device),
    )
}

/// Mean cross-entropy over the scored targets.
pub fn masked_cross_entropy(logits: Tensor<3>, targets: Tensor<2, Int>, weights: Tensor<2>, scored: usize) -> Tensor<1> {
    let nll = log_softmax(logits, 2).gather(2, targets.unsqueeze_dim::<3>(2)).squeeze_dim::<2>(2).neg();
    (nll * weights).sum().div_scalar(scored.max(1) as f64)
}

/// Validation loss and accuracy of `model` on `batches` validation batches.
pub fn evaluate(model: &ToyLm, data: &DataSource, batches: usize, device: &Device) -> AppResult<(f32, f32)> {
    let model = model.valid();
    let (mut loss_sum, mut correct, mut scored) = (0.0f64, 0usize, 0usize);
    for i in 0..batches.max(1) {
        let batch = data.val_batch(i);
        let (inputs, targets, weights) = batch_tensors(&batch, device);
        let n = batch.scored();
        let logits = model.forward(inputs, false)?.logits;
        let pred = logits.clone().argmax(2).squeeze_dim::<2>(2);
        let loss = masked_cross_entropy(logits, targets, weights, n).into_scalar::<f32>();
        let pred: Vec<i64> = pred.try_into_vec_as::<i64>().map_err(|e| format!("{e:?}"))?;
        for ((p, t), w) in pred.iter().zip(&batch.targets).zip(&batch.weights) {
            if *w > 0.0 && p == t {
                correct += 1;
            }
        }
        loss_sum += loss as f64 * n as f64;
        scored += n;
    }
    Ok(((loss_sum / scored.max(1) as f64) as f32, correct as f32 / scored.max(1) as f32))
}

/// Scales all gradients so that their global L2 norm is at most `max_norm`; returns the norm
/// before clipping.
pub fn clip_global_norm(model: &ToyLm, grads: &mut GradientsParams, max_norm: f64) -> f32 {
    struct SquaredNorm<'a> {
        grads: &'a GradientsParams,
        parts: Vec<Tensor<1>>,
    }
    impl ModuleVisitor for SquaredNorm<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if let Some(g) = self.grads.get::<D>(param.id) {
                self.parts.push(g.square().sum());
            }
        }
    }
    struct Scale<'a> {
        grads: &'a mut GradientsParams,
        factor: f64,
    }
    impl ModuleVisitor for Scale<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if let Some(g) = self.grads.remove::<D>(param.id) {
                self.grads.register(param.id, g.mul_scalar(self.factor));
            }
        }
    }
    let mut norm = SquaredNorm { grads, parts: Vec::new() };
    model.visit(&mut norm);
    if norm.parts.is_empty() {
        return 0.0;
    }
    let total = Tensor::cat(norm.parts, 0).sum().sqrt().into_scalar::<f32>();
    if max_norm > 0.0 && total as f64 > max_norm {
        model.visit(&mut Scale { grads, factor: max_norm / (total as f64 + 1e-6) });
    }
    total
}

/// Saves the model (burnpack, with its parameter ids), the optimizer state, `state.json` and
/// `config.toml`.
///
/// Each file is written under a temporary name and renamed into place, so an interrupted save
/// never leaves a half-written checkpoint behind.
pub fn save_checkpoint(dir: &Path, model: &ToyLm, optim: &ModuleOptimizer, state: &TrainState, cfg: &RunConfig) -> AppResult<()> {
    std::fs::create_dir_all(dir)?;
    let tmp = |name: &str| dir.join(format!(".{name}.tmp"));
    let mut store = BurnpackStore::from_file(tmp(MODEL_FILE))
        .auto_extension(false)
        .overwrite(true)
        .metadata("toy-lm.label", state.label.clone())
        .metadata("toy-lm.step", state.step.to_string());
    model.save_into(&mut store).map_err(|e| format!("saving {}: {e}", dir.join(MODEL_FILE).display()))?;
    let _ = std::fs::remove_file(tmp(OPTIMIZER_FILE));
    optim.save(tmp(OPTIMIZER_FILE)).map_err(|e| format!("saving {}: {e:?}", dir.join(OPTIMIZER_FILE).display()))?;
    std::fs::write(tmp(STATE_FILE), serde_json::to_string_pretty(state)?)?;
    std::fs::write(tmp(CONFIG_FILE), cfg.to_toml())?;
    for name in [MODEL_FILE, OPTIMIZER_FILE, STATE_FILE, CONFIG_FILE] {
        std::fs::rename(tmp(name), dir.join(name))?;
    }
    // A checkpoint from before `model.bpk` resumed into its own folder: its model file now
    // holds an older step than the rest (and `model.bpk` is read first anyway).
    let legacy = dir.join(LEGACY_MODEL_FILE);
    if legacy.exists() {
        std::fs::remove_file(&legacy)?;
    }
    Ok(())
}

/// Loads the optimizer state of a checkpoint (read into memory: the file may be replaced by
/// the next save while the state is still in use).
pub fn load_optimizer(optim: ModuleOptimizer, dir: &Path) -> AppResult<ModuleOptimizer> {
    let path = dir.join(OPTIMIZER_FILE);
    let bytes = std::fs::read(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    optim.from_bytes(Bytes::from_bytes_vec(bytes)).map_err(|e| format!("loading {}: {e:?}", path.display()).into())
}

/// Loads model weights from a checkpoint directory; `partial` accepts missing tensors (e.g. a
/// dense checkpoint into a model with gates) and returns how many tensors were applied and
/// which were missing.
///
/// Reads [`MODEL_FILE`] (burnpack). A full load goes through [`BurnpackStore`] as is and also
/// gives the parameters their saved ids (the keys of the optimizer state). A partial load
/// applies weights only (the parameters keep their ids), and may cross layouts whose attention
/// layers are different variants of one enum (`blocks.0.attn.Dense.…` into
/// `blocks.0.attn.Seer.…`): burnpack paths name the variant and [`BurnpackStore`] has no
/// `skip_enum_variants` option, so the checkpoint's tensors are first matched to the model's
/// parameters up to variant names (`match_enum_variants`).
///
/// Checkpoints written before [`MODEL_FILE`] have [`LEGACY_MODEL_FILE`] instead: when there is
/// no [`MODEL_FILE`], that is read (with `skip_enum_variants`, as it was written). It keeps no
/// parameter ids, so the parameters keep their own, and the optimizer state of such a
/// checkpoint cannot be matched to them ([`train`] leaves it out on `--resume`).
pub fn load_weights(model: &mut ToyLm, dir: &Path, partial: bool) -> AppResult<(usize, Vec<String>)> {
    let path = dir.join(MODEL_FILE);
    let legacy = dir.join(LEGACY_MODEL_FILE);
    if !path.exists() && legacy.exists() {
        return load_legacy_weights(model, &legacy, partial);
    }
    if !path.exists() {
        return Err(format!("no {MODEL_FILE} (or {LEGACY_MODEL_FILE}) in {}", dir.display()).into());
    }
    // Read into memory rather than from the file: the next save replaces this file.
    let bytes = std::fs::read(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mut store = BurnpackStore::from_bytes(Some(Bytes::from_bytes_vec(bytes)));
    let result = if partial {
        let mut tensors: Vec<PackTensor> =
            store.get_all_tensors().map_err(|e| format!("loading {}: {e}", path.display()))?.values().cloned().collect();
        match_enum_variants(model, &mut tensors);
        // Weights only: a model initialised from another run's checkpoint keeps its own ids.
        for tensor in &mut tensors {
            tensor.param_id = None;
        }
        model.apply(tensors, None, None, false)
    } else {
        model.load_from(&mut store).map_err(|e| format!("loading {}: {e}", path.display()))?
    };
    applied_and_missing(result, &path, partial)
}

/// [`load_weights`] from a [`LEGACY_MODEL_FILE`] (safetensors, without enum variant names in
/// its paths, without parameter ids).
fn load_legacy_weights(model: &mut ToyLm, path: &Path, partial: bool) -> AppResult<(usize, Vec<String>)> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mut store = SafetensorsStore::from_bytes(Some(bytes)).skip_enum_variants(true).allow_partial(partial);
    let result = model.load_from(&mut store).map_err(|e| format!("loading {}: {e}", path.display()))?;
    applied_and_missing(result, path, partial)
}

/// How many tensors a load applied and which parameters it left alone; an error when a tensor
/// did not fit its parameter, or (unless `partial`) when a parameter was missing.
fn applied_and_missing(result: ApplyResult, path: &Path, partial: bool) -> AppResult<(usize, Vec<String>)> {
    if !result.errors.is_empty() {
        return Err(format!("loading {}: {:?}", path.display(), result.errors).into());
    }
    if !partial && !result.missing.is_empty() {
        return Err(format!("loading {}: missing {:?}", path.display(), result.missing).into());
    }
    Ok((result.applied.len(), result.missing.into_iter().map(|(p, _)| p).collect()))
}

/// Renames each checkpoint tensor whose path is that of a parameter of `model` except for enum
/// variant names, at the places where the model's path has them, to the parameter's path: a
/// dense layer's `blocks.0.attn.Dense.proj.q.weight` becomes a Seer layer's
/// `blocks.0.attn.Seer.proj.q.weight`. Other tensors keep their names (and are left unused).
///
/// This does for burnpack what `skip_enum_variants` does for safetensors, an option
/// [`BurnpackStore`] lacks.
fn match_enum_variants(model: &ToyLm, tensors: &mut [PackTensor]) {
    /// Every parameter's path segments, with whether each is an enum variant name.
    struct Paths {
        stack: Vec<(String, bool)>,
        out: Vec<Vec<(String, bool)>>,
    }
    impl ModuleVisitor for Paths {
        fn enter_module(&mut self, name: &str, container_type: &str) {
            self.stack.push((name.to_string(), container_type.starts_with("Enum:")));
        }
        fn exit_module(&mut self, _name: &str, _container_type: &str) {
            self.stack.pop();
        }
        fn visit_float<const D: usize>(&mut self, _param: &Param<Tensor<D>>) {
            self.out.push(self.stack.clone());
        }
        fn visit_int<const D: usize>(&mut self, _param: &Param<Tensor<D, Int>>) {
            self.out.push(self.stack.clone());
        }
        fn visit_bool<const D: usize>(&mut self, _param: &Param<Tensor<D, Bool>>) {
            self.out.push(self.stack.clone());
        }
    }
    let mut paths = Paths { stack: Vec::new(), out: Vec::new() };
    model.visit(&mut paths);

    // The path without the segments at `variants` (ascending).
    fn without<S: AsRef<str>>(segments: &[S], variants: &[usize]) -> String {
        let kept = segments.iter().enumerate().filter(|(i, _)| !variants.contains(i)).map(|(_, s)| s.as_ref());
        kept.collect::<Vec<_>>().join(".")
    }
    // (variant positions, path without them) -> the parameter's path.
    let mut params = HashMap::new();
    for segments in &paths.out {
        let variants: Vec<usize> = segments.iter().enumerate().filter(|(_, (_, v))| *v).map(|(i, _)| i).collect();
        let names: Vec<&str> = segments.iter().map(|(s, _)| s.as_str()).collect();
        let key = without(&names, &variants);
        params.insert((variants, key), names.join("."));
    }
    let patterns: BTreeSet<Vec<usize>> = params.keys().map(|(v, _)| v.clone()).collect();
    for tensor in tensors.iter_mut() {
        let segments: Vec<&str> = tensor.name.split('.').collect();
        let found = patterns.iter().filter(|v| v.last().is_none_or(|&i| i < segments.len())).find_map(|v| {
            // Same length: the key leaves out as many segments as the parameter's path has variants.
            params.get(&(v.clone(), without(&segments, v)))
        });
        if let Some(name) = found {
            tensor.name = name.clone();
        }
    }
}

/// Reads `state.json`.
pub fn load_state(dir: &Path) -> AppResult<TrainState> {
    let path = dir.join(STATE_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    Ok(serde_json::from_str(&text)?)
}

/// Peak resident set size of this process (`VmHWM`), Linux only.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Resets the peak RSS counter (so each method of `compare` gets its own peak), Linux only.
pub fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// Steps left out of the throughput (kernel compilation and memory-pool growth happen there).
pub const WARMUP_STEPS: usize = 2;

/// Trains one model as configured: on `opts.device`, or data-parallel on every device of
/// `opts.devices` when it lists more than one ([`crate::ddp`]). Prints progress lines (the
/// first device's process only); returns the metrics.
pub fn train(cfg: &RunConfig, opts: &RunOptions) -> AppResult<TrainOutcome> {
    if opts.devices.len() > 1 {
        return crate::ddp::train_data_parallel(cfg, opts);
    }
    let wall = Instant::now();
    let prepared = prepare(cfg, opts)?;
    let outcome = run_steps(cfg, opts, prepared, &Rank::single(opts.device.clone()), wall)?;
    outcome.ok_or_else(|| "the training loop returned no outcome".into())
}

/// A model ready to train and what goes with it: the optimizer, where the run starts, the
/// history a resume brings and the data.
#[derive(Clone)]
pub(crate) struct Prepared {
    pub model: ToyLm,
    pub optim: ModuleOptimizer,
    pub start: usize,
    pub losses: Vec<f32>,
    pub val_curve: Vec<ValPoint>,
    pub data: DataSource,
    pub params: usize,
    pub trainable: usize,
}

/// One replica of a run: which of how many, on which device (without autodiff), and the
/// board on which the replicas of a data-parallel run add up their losses.
pub(crate) struct Rank {
    pub index: usize,
    pub count: usize,
    pub device: Device,
    pub board: Option<std::sync::Arc<crate::ddp::StepBoard>>,
}

impl Rank {
    /// The only replica of a single-device run.
    pub fn single(device: Device) -> Self {
        Self { index: 0, count: 1, device, board: None }
    }
}

/// Builds the model on `opts.device` (seeded), the optimizer, and applies `--init-from`,
/// Seer distillation's freezing and `--resume`.
pub(crate) fn prepare(cfg: &RunConfig, opts: &RunOptions) -> AppResult<Prepared> {
    reset_peak_rss();
    // Each run's pool peak starts from what it allocates itself (compare runs methods in turn).
    opts.device.memory_cleanup();
    let t = &cfg.train;
    let prefix = &opts.log_prefix;
    let device = opts.device.clone();
    device.seed(t.seed);
    let ad = device.clone().autodiff();
    let data = DataSource::new(cfg)?;
    println!("{prefix}data: {}", data.describe());

    let mut model = ToyLm::new(cfg, &ad)?;
    let mut optim = AdamWConfig::new()
        .with_beta_1(t.beta1 as f32)
        .with_beta_2(t.beta2 as f32)
        .with_epsilon(1e-8)
        .with_weight_decay(t.weight_decay as f32)
        .init();
    let mut start = 0;
    let mut losses = Vec::new();
    let mut val_curve: Vec<ValPoint> = Vec::new();
    if let Some(init) = &opts.init_from {
        let (applied, missing) = load_weights(&mut model, init, true)?;
        println!("{prefix}init-from {}: {applied} tensors loaded, {} left at initialisation", init.display(), missing.len());
    }
    let distill = cfg.seer.mode == SeerMode::Distill && cfg.model.layer_methods().contains(&Method::Seer);
    if distill {
        if opts.init_from.is_none() && opts.resume.is_none() {
            println!("{prefix}warning: seer distill without --init-from trains gates on a randomly initialised frozen model");
        }
        model = model.freeze_all_but_gates();
    }
    if let Some(dir) = &opts.resume {
        let state = load_state(dir)?;
        // The parameters get their saved ids back from `model.bpk`: the optimizer state is
        // keyed by them.
        load_weights(&mut model, dir, false)?;
        if state.has_optimizer_state && dir.join(OPTIMIZER_FILE).exists() {
            if dir.join(MODEL_FILE).exists() {
                optim = load_optimizer(optim, dir)?;
            } else {
                println!(
                    "{prefix}warning: {} has {LEGACY_MODEL_FILE} (no parameter ids), not {MODEL_FILE}: \
                     its optimizer state cannot be matched to the parameters; AdamW starts afresh",
                    dir.display()
                );
            }
        }
        start = state.step;
        losses = state.losses;
        losses.truncate(start);
        val_curve = state.val_curve;
        val_curve.retain(|p| p.step <= start);
        println!("{prefix}resumed from {} at step {start}", dir.display());
    }
    let params = model.num_params();
    let trainable = model.trainable_params();
    println!(
        "{prefix}model: {} layers ({}), d_model {}, {} heads, {params} parameters ({trainable} trainable)",
        cfg.model.layers,
        cfg.model.layer_methods().iter().map(|m| m.name()).collect::<Vec<_>>().join(","),
        cfg.model.d_model,
        cfg.model.heads,
    );
    Ok(Prepared { model, optim, start, losses, val_curve, data, params, trainable })
}

/// The training loop of one replica. Every replica takes its rows of each global batch
/// ([`Batch::shard`]) and divides its loss by the scored targets of the whole batch, so that
/// the sum of the replicas' gradients (the all-reduce inside `backward()` of a data-parallel
/// run) is the gradient of the global batch's mean loss, as one device computes it. Replica 0
/// logs, validates and writes checkpoints, and returns the outcome; the others return `None`.
pub(crate) fn run_steps(cfg: &RunConfig, opts: &RunOptions, prepared: Prepared, rank: &Rank, wall: Instant) -> AppResult<Option<TrainOutcome>> {
    let t = &cfg.train;
    let label = cfg.label();
    let prefix = &opts.log_prefix;
    let main = rank.index == 0;
    let device = rank.device.clone();
    let ad = device.clone().autodiff();
    let Prepared { mut model, mut optim, start, mut losses, mut val_curve, data, params, trainable } = prepared;

    let ckpt_dir = opts.out.join("checkpoint");
    let tokens_per_step = (t.batch * t.seq_len) as f64;
    // Throughput counts the steps after the warm-up ones (when there are any).
    let warmup_steps = if t.steps.saturating_sub(start) > WARMUP_STEPS { WARMUP_STEPS } else { 0 };
    let (mut train_secs, mut steps_timed, mut warmup_s) = (0.0f64, 0usize, 0.0f64);
    let mut step_secs: Vec<f64> = Vec::new();
    let mut grad_norms: Vec<f32> = Vec::new();
    let (mut val_loss, mut val_acc) = (f32::NAN, f32::NAN);
    let mut last_gate = None;
    let mut peak_pool: Option<u64> = None;
    let want_gate_loss = model.has_gates();
    let progress = main.then(|| crate::progress::Progress::new(if label.is_empty() { "train" } else { &label }, start, t.steps));
    let finish = |progress: &Option<crate::progress::Progress>| {
        if let Some(p) = progress {
            p.finish();
        }
    };
    // Each replica's share of the (mean) gate loss: the replicas' gate gradients add up.
    let gate_weight = t.gate_loss_weight / rank.count as f64;
    for step in start..t.steps {
        let t0 = Instant::now();
        let batch = data.train_batch(step);
        let scored = batch.scored();
        let shard = batch.shard(rank.index, rank.count);
        let (inputs, targets, weights) = batch_tensors(&shard, &ad);
        let out = model.forward(inputs, want_gate_loss)?;
        let lm_loss = masked_cross_entropy(out.logits, targets, weights, scored);
        let loss = match &out.gate_loss {
            Some(g) if t.gate_loss_weight > 0.0 => lm_loss.clone() + g.clone().mul_scalar(gate_weight),
            _ => lm_loss.clone(),
        };
        let mut grads = GradientsParams::from_grads(loss.backward(), &model);
        let grad_norm = clip_global_norm(&model, &mut grads, t.grad_clip);
        let lr = lr_at(step, t);
        model = optim.step(lr, model, grads);
        let (lm, gate) = (lm_loss.into_scalar::<f32>(), out.gate_loss.map(|g| g.into_scalar::<f32>()));
        // The whole batch's loss (each replica's part is already divided by the whole
        // batch's scored targets) and the replicas' mean gate loss.
        let (lm, gate) = match &rank.board {
            Some(board) => board.exchange(rank.index, lm, gate),
            None => (lm, gate),
        };
        last_gate = gate;
        if !lm.is_finite() {
            finish(&progress);
            return Err(format!("{prefix}loss is {lm} at step {step}; lower --lr or --grad-clip").into());
        }
        losses.push(lm);
        grad_norms.push(grad_norm);
        if !main {
            continue;
        }
        if step - start < warmup_steps {
            warmup_s += t0.elapsed().as_secs_f64();
        } else {
            let secs = t0.elapsed().as_secs_f64();
            train_secs += secs;
            step_secs.push(secs);
            steps_timed += 1;
        }
        if let Some(usage) = device.memory_pool_usage() {
            peak_pool = Some(peak_pool.unwrap_or(0).max(usage.bytes_reserved));
        }
        let done = step + 1;
        let Some(progress) = &progress else { continue };
        progress.step(done, &format!("loss {lm:.4}"));
        if done % t.log_every.max(1) == 0 || done == t.steps || done == start + 1 {
            let gate = last_gate.map(|g| format!(" | gate loss {g:.4}")).unwrap_or_default();
            progress.line(&format!(
                "{prefix}step {done:>5}/{} | loss {lm:.4}{gate} | lr {lr:.2e} | grad norm {grad_norm:.3} | {:.0} tok/s | {:.1}s",
                t.steps,
                steps_timed as f64 * tokens_per_step / train_secs.max(1e-9),
                wall.elapsed().as_secs_f64()
            ));
        }
        let eval_now = done == t.steps || (t.eval_every > 0 && done % t.eval_every == 0);
        if eval_now {
            (val_loss, val_acc) = evaluate(&model, &data, t.eval_batches, &device)?;
            val_curve.push(ValPoint { step: done, loss: val_loss, accuracy: val_acc });
            let what = if data.task() == Task::Lm { "next-byte accuracy" } else { "answer accuracy" };
            progress.line(&format!("{prefix}validation @ {done}: loss {val_loss:.4} | {what} {:.1}%", 100.0 * val_acc));
        }
        if done == t.steps || (t.checkpoint_every > 0 && done % t.checkpoint_every == 0) {
            let state = TrainState {
                step: done,
                label: label.clone(),
                losses: losses.clone(),
                val_loss: val_loss.is_finite().then_some(val_loss),
                val_accuracy: val_acc.is_finite().then_some(val_acc),
                val_curve: val_curve.clone(),
                seed: t.seed,
                has_optimizer_state: true,
            };
            save_checkpoint(&ckpt_dir, &model, &optim, &state, cfg)?;
        }
    }
    finish(&progress);
    if !main {
        return Ok(None);
    }
    if start >= t.steps {
        println!("{prefix}already at step {start} of {}; evaluating only", t.steps);
        (val_loss, val_acc) = evaluate(&model, &data, t.eval_batches, &device)?;
        if val_curve.last().is_none_or(|p| p.step != start) {
            val_curve.push(ValPoint { step: start, loss: val_loss, accuracy: val_acc });
        }
    }
    let attended_pairs = selection_figure(&model, &data, &device, &opts.out, &label, cfg.train.seq_len)?;
    let tail = &losses[losses.len().saturating_sub(10)..];
    let (peak_memory_bytes, peak_memory_kind) = match peak_pool {
        Some(b) => (Some(b), "device memory pool (reserved)".to_string()),
        None => (peak_rss_bytes(), "process peak RSS".to_string()),
    };
    Ok(Some(TrainOutcome {
        label,
        steps: t.steps,
        params,
        trainable_params: trainable,
        final_train_loss: tail.iter().sum::<f32>() / tail.len().max(1) as f32,
        losses,
        grad_norms,
        devices: rank.count,
        val_loss,
        val_curve,
        val_accuracy: val_acc,
        final_gate_loss: last_gate,
        tokens_per_sec: if train_secs > 0.0 { steps_timed as f64 * tokens_per_step / train_secs } else { 0.0 },
        median_tokens_per_sec: median(&mut step_secs).map_or(0.0, |m| if m > 0.0 { tokens_per_step / m } else { 0.0 }),
        warmup_s,
        peak_memory_bytes,
        peak_memory_kind,
        wall_time_s: wall.elapsed().as_secs_f64(),
        checkpoint: ckpt_dir,
        attended_pairs,
    }))
}

/// Contexts above this get no selection heat map: its pairs are counted on the host.
pub const SELECTION_MAP_MAX_SEQ: usize = 16384;

/// Draws `selection.svg` into `dir` for the trained `model` and returns the share of causal
/// pairs each layer attends; nothing above [`SELECTION_MAP_MAX_SEQ`].
fn selection_figure(model: &ToyLm, data: &DataSource, device: &Device, dir: &Path, label: &str, seq: usize) -> AppResult<Vec<f64>> {
    if seq > SELECTION_MAP_MAX_SEQ {
        return Ok(Vec::new());
    }
    let maps = selection::selection_maps(model, data, device)?;
    std::fs::create_dir_all(dir)?;
    let title = format!("{label}: attended pairs per layer, context {seq} (first validation sequence)");
    selection::selection_chart(&dir.join(selection::SELECTION_FIGURE), &title, &maps)?;
    Ok(maps.iter().map(|m| m.attended).collect())
}
