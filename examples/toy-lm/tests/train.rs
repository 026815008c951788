//! Training smoke tests on tiny models: every attention type trains, the loss goes down,
//! checkpoints round-trip and resume continues exactly where it stopped.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::AdamWConfig;
use burn::store::{ModuleSnapshot, SafetensorsStore};
use burn::tensor::{Device, Tensor};
mod common;

use common::tiny;
use burn_sparse_attn::SeerMode;
use toy_lm::config::{Method, RunConfig, Task};
use toy_lm::model::ToyLm;
use toy_lm::train::{
    CONFIG_FILE, LEGACY_MODEL_FILE, MODEL_FILE, RunOptions, STATE_FILE, TrainState, load_state, load_weights, median,
    save_checkpoint, train,
};

/// The device RNG is global: tests that seed it and build models run one at a time, or
/// their initialisations interleave.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("toy-lm-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn opts(out: &Path) -> RunOptions {
    RunOptions { device: Device::default(), devices: Vec::new(), out: out.to_path_buf(), resume: None, init_from: None, log_prefix: String::new() }
}

fn params(model: &ToyLm) -> Vec<Vec<f32>> {
    struct Collect(Vec<Vec<f32>>);
    impl ModuleVisitor for Collect {
        fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<D>>) {
            self.0.push(p.val().try_into_vec_as::<f32>().unwrap());
        }
    }
    let mut c = Collect(Vec::new());
    model.visit(&mut c);
    c.0
}

/// Parameter ids in visiting order.
fn ids(model: &ToyLm) -> Vec<u64> {
    struct Collect(Vec<u64>);
    impl ModuleVisitor for Collect {
        fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<D>>) {
            self.0.push(p.id.val());
        }
    }
    let mut c = Collect(Vec::new());
    model.visit(&mut c);
    c.0
}

/// Parameter values by module path without enum variant names (`blocks.0.attn.proj...` for
/// every attention type), so models of different layouts compare.
fn params_by_path(model: &ToyLm) -> BTreeMap<String, Vec<f32>> {
    struct Collect {
        path: Vec<Option<String>>,
        out: BTreeMap<String, Vec<f32>>,
    }
    impl ModuleVisitor for Collect {
        fn enter_module(&mut self, name: &str, container_type: &str) {
            self.path.push((!container_type.starts_with("Enum:")).then(|| name.to_string()));
        }
        fn exit_module(&mut self, _name: &str, _container_type: &str) {
            self.path.pop();
        }
        fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<D>>) {
            let path = self.path.iter().flatten().cloned().collect::<Vec<_>>().join(".");
            self.out.insert(path, p.val().try_into_vec_as::<f32>().unwrap());
        }
    }
    let mut c = Collect { path: Vec::new(), out: BTreeMap::new() };
    model.visit(&mut c);
    c.out
}

/// The model of a checkpoint, loaded into a fresh `cfg` model.
fn checkpoint_model(cfg: &RunConfig, dir: &Path) -> ToyLm {
    let mut model = ToyLm::new(cfg, &Device::default()).unwrap();
    load_weights(&mut model, dir, false).unwrap();
    model
}

fn max_abs_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).flat_map(|(x, y)| x.iter().zip(y).map(|(p, q)| (p - q).abs())).fold(0.0, f32::max)
}

#[test]
fn every_attention_type_trains_a_few_steps() {
    let _serial = serial();
    for method in Method::ALL {
        let cfg = tiny(method, 3);
        let out = tmp(method.name());
        let r = train(&cfg, &opts(&out)).unwrap_or_else(|e| panic!("{method}: {e}"));
        assert_eq!(r.losses.len(), 3);
        assert!(r.losses.iter().all(|l| l.is_finite()), "{method}: {:?}", r.losses);
        assert!(r.val_loss.is_finite(), "{method}");
        if method == Method::Seer {
            assert!(r.final_gate_loss.is_some_and(f32::is_finite), "seer reports its gate loss");
        }
        std::fs::remove_dir_all(&out).ok();
    }
}

#[test]
fn loss_decreases_on_a_tiny_lm() {
    let _serial = serial();
    let mut cfg = tiny(Method::Moba, 30);
    cfg.train.lr = 1e-2;
    cfg.model.dense_last_layers = 1;
    let out = tmp("decrease");
    let r = train(&cfg, &opts(&out)).unwrap();
    let first: f32 = r.losses[..3].iter().sum::<f32>() / 3.0;
    let last: f32 = r.losses[27..].iter().sum::<f32>() / 3.0;
    assert!(last < first - 1.0, "loss did not fall enough: {first} -> {last} ({:?})", r.losses);
    // 28 timed steps: both throughputs are measured.
    assert!(r.tokens_per_sec > 0.0 && r.median_tokens_per_sec > 0.0, "{} / {}", r.tokens_per_sec, r.median_tokens_per_sec);
    std::fs::remove_dir_all(&out).ok();
}

#[test]
fn median_of_step_times() {
    assert_eq!(median(&mut []), None);
    assert_eq!(median(&mut [3.0, 1.0, 2.0]), Some(2.0));
    assert_eq!(median(&mut [4.0, 1.0, 3.0, 2.0]), Some(2.5));
    // One stalled step moves the mean, not the median.
    assert_eq!(median(&mut [0.1, 0.1, 2.2, 0.1, 0.1]), Some(0.1));
}

#[test]
fn mqar_and_needle_tasks_train() {
    let _serial = serial();
    for task in [Task::Mqar, Task::Needle] {
        let mut cfg = tiny(Method::Dense, 3);
        cfg.data.task = task;
        cfg.data.mqar_pairs = 8;
        let out = tmp(task.name());
        let r = train(&cfg, &opts(&out)).unwrap();
        assert!(r.losses.iter().all(|l| l.is_finite()));
        assert!((0.0..=1.0).contains(&r.val_accuracy));
        std::fs::remove_dir_all(&out).ok();
    }
}

#[test]
fn checkpoint_round_trip_restores_parameters() {
    let _serial = serial();
    let device = Device::default();
    let cfg = tiny(Method::Nsa, 1);
    device.seed(1);
    let model = ToyLm::new(&cfg, &device).unwrap();
    let dir = tmp("roundtrip");
    let state = TrainState {
        step: 7,
        label: "nsa".into(),
        losses: vec![1.0; 7],
        val_loss: None,
        val_accuracy: None,
        val_curve: Vec::new(),
        seed: 1,
        has_optimizer_state: true,
    };
    save_checkpoint(&dir, &model, &AdamWConfig::new().init(), &state, &cfg).unwrap();
    assert!(dir.join(MODEL_FILE).is_file() && !dir.join(LEGACY_MODEL_FILE).exists());
    device.seed(2);
    let mut other = ToyLm::new(&cfg, &device).unwrap();
    assert_ne!(params(&model), params(&other), "different seeds give different weights");
    assert!(ids(&model).iter().all(|id| !ids(&other).contains(id)), "a fresh model has fresh ids");
    let (applied, missing) = load_weights(&mut other, &dir, false).unwrap();
    assert!(missing.is_empty());
    assert_eq!(applied, params(&model).len());
    assert_eq!(params(&model), params(&other));
    // The ids come back from the file: the optimizer state is keyed by them.
    assert_eq!(ids(&model), ids(&other));
    assert_eq!(load_state(&dir).unwrap().step, 7);
    assert_eq!(RunConfig::from_file(&dir.join("config.toml")).unwrap(), cfg);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn resume_continues_the_same_run() {
    let _serial = serial();
    // A constant learning rate, so that a 3-step run followed by a resume to 6 steps follows
    // exactly the schedule of an uninterrupted 6-step run.
    let constant = |steps| {
        let mut c = tiny(Method::Dense, steps);
        c.train.warmup = 0;
        c.train.min_lr_ratio = 1.0;
        c
    };
    let full_dir = tmp("full");
    let full = train(&constant(6), &opts(&full_dir)).unwrap();

    let part_dir = tmp("part");
    let first = train(&constant(3), &opts(&part_dir)).unwrap();
    assert_eq!(load_state(&first.checkpoint).unwrap().step, 3);
    let first_ids = ids(&checkpoint_model(&constant(3), &first.checkpoint));
    let mut resumed_opts = opts(&part_dir);
    resumed_opts.resume = Some(first.checkpoint.clone());
    let resumed = train(&constant(6), &resumed_opts).unwrap();
    assert_eq!(load_state(&resumed.checkpoint).unwrap().step, 6);
    // The resumed run trained the parameters of the first (their ids, which key the AdamW
    // moments), and its weights are those of the uninterrupted run: a resume that lost the
    // moments would move them by about the learning rate at its first step.
    let resumed_model = checkpoint_model(&constant(6), &resumed.checkpoint);
    assert_eq!(ids(&resumed_model), first_ids);
    let diff = max_abs_diff(&params(&resumed_model), &params(&checkpoint_model(&constant(6), &full.checkpoint)));
    assert!(diff < 1e-5, "resumed weights differ from the uninterrupted run's by {diff}");
    assert_eq!(resumed.losses.len(), 6);
    assert_eq!(&resumed.losses[..3], &first.losses[..]);
    // The validation history carries over too (eval_every 0: one validation per call, at its end).
    assert_eq!(resumed.val_curve.iter().map(|p| p.step).collect::<Vec<_>>(), vec![3, 6]);
    // Same data stream, same weights and AdamW moments: the resumed steps match.
    for (i, (a, b)) in resumed.losses.iter().zip(&full.losses).enumerate() {
        assert!((a - b).abs() < 1e-3 * b.abs().max(1.0), "step {i}: resumed {a} vs uninterrupted {b}");
    }
    std::fs::remove_dir_all(&full_dir).ok();
    std::fs::remove_dir_all(&part_dir).ok();
}

#[test]
fn init_from_loads_a_dense_checkpoint_into_other_attention_types() {
    let _serial = serial();
    let device = Device::default();
    let dense_cfg = tiny(Method::Dense, 1);
    device.seed(3);
    let dense = ToyLm::new(&dense_cfg, &device).unwrap();
    let dir = tmp("init-from");
    let state = TrainState {
        step: 1,
        label: "dense".into(),
        losses: vec![1.0],
        val_loss: None,
        val_accuracy: None,
        val_curve: Vec::new(),
        seed: 3,
        has_optimizer_state: false,
    };
    save_checkpoint(&dir, &dense, &AdamWConfig::new().init(), &state, &dense_cfg).unwrap();
    let want = params_by_path(&dense);
    for method in [Method::Seer, Method::Moba] {
        let mut model = ToyLm::new(&tiny(method, 1), &device).unwrap();
        let (applied, missing) = load_weights(&mut model, &dir, true).unwrap();
        // Every dense tensor has its place (the attention projections under another enum variant).
        assert_eq!(applied, want.len(), "{method}: missing {missing:?}");
        let got = params_by_path(&model);
        for (path, values) in &want {
            assert_eq!(got.get(path), Some(values), "{method}: {path}");
        }
        assert_eq!(missing.len(), got.len() - want.len(), "{method}: {missing:?}");
        assert!(ids(&model).iter().all(|id| !ids(&dense).contains(id)), "{method}: weights only, not the dense ids");
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn checkpoints_from_before_burnpack_still_load_and_resume() {
    let _serial = serial();
    let cfg = tiny(Method::Dense, 2);
    let out = tmp("legacy");
    let run = train(&cfg, &opts(&out)).unwrap();
    let dir = run.checkpoint.clone();
    let model = checkpoint_model(&cfg, &dir);
    // Turn it into a checkpoint as written before model.bpk: model.safetensors (paths without
    // enum variants) and a state.json with the param_ids map.
    std::fs::remove_file(dir.join(MODEL_FILE)).unwrap();
    let mut store = SafetensorsStore::from_file(dir.join(LEGACY_MODEL_FILE)).skip_enum_variants(true);
    model.save_into(&mut store).unwrap();
    let mut state: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join(STATE_FILE)).unwrap()).unwrap();
    state["param_ids"] = serde_json::json!({ "embedding.weight": 42u64 });
    std::fs::write(dir.join(STATE_FILE), state.to_string()).unwrap();
    assert_eq!(load_state(&dir).unwrap().step, 2, "an old state.json still parses");

    assert_eq!(params(&checkpoint_model(&cfg, &dir)), params(&model), "generate and --resume load it");
    let mut seer = ToyLm::new(&tiny(Method::Seer, 2), &Device::default()).unwrap();
    let (applied, _) = load_weights(&mut seer, &dir, true).unwrap();
    assert_eq!(applied, params(&model).len(), "--init-from loads it");

    let mut o = opts(&out);
    o.resume = Some(dir.clone());
    let resumed = train(&tiny(Method::Dense, 3), &o).unwrap();
    assert_eq!(resumed.losses.len(), 3);
    assert!(dir.join(MODEL_FILE).is_file() && !dir.join(LEGACY_MODEL_FILE).exists(), "the next save is burnpack");
    assert!(dir.join(CONFIG_FILE).is_file());
    std::fs::remove_dir_all(&out).ok();
}

#[test]
fn seer_distill_trains_only_the_gates_from_a_dense_checkpoint() {
    let _serial = serial();
    let dense_dir = tmp("dense-base");
    let dense = train(&tiny(Method::Dense, 2), &opts(&dense_dir)).unwrap();
    let mut cfg = tiny(Method::Seer, 2);
    cfg.seer.mode = SeerMode::Distill;
    let out = tmp("distill");
    let mut o = opts(&out);
    o.init_from = Some(dense.checkpoint.clone());
    let r = train(&cfg, &o).unwrap();
    assert!(r.trainable_params > 0 && r.trainable_params < r.params / 4, "{} of {}", r.trainable_params, r.params);
    assert!(r.final_gate_loss.is_some_and(f32::is_finite));
    // The frozen dense model's loss is what the dense run reached (distill output is dense).
    assert!((r.losses[0] - dense.losses[1]).abs() < 1.0, "{:?} vs {:?}", r.losses, dense.losses);
    std::fs::remove_dir_all(&dense_dir).ok();
    std::fs::remove_dir_all(&out).ok();
}

#[test]
fn model_num_params_counts_untied_head() {
    let _serial = serial();
    let device = Device::default();
    let mut cfg = tiny(Method::Dense, 1);
    let tied = ToyLm::new(&cfg, &device).unwrap().num_params();
    cfg.model.tie_embeddings = false;
    let untied = ToyLm::new(&cfg, &device).unwrap().num_params();
    assert_eq!(untied - tied, 32 * 260);
}
