//! Training smoke tests on tiny models: every attention type trains, the loss goes down,
//! checkpoints round-trip and resume continues exactly where it stopped.

use std::path::{Path, PathBuf};

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::AdamWConfig;
use burn::tensor::{Device, Tensor};
mod common;

use common::tiny;
use burn_sparse_attn::SeerMode;
use toy_lm::config::{Method, RunConfig, Task};
use toy_lm::model::ToyLm;
use toy_lm::train::{RunOptions, TrainState, load_state, load_weights, median, save_checkpoint, train};

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
    RunOptions { device: Device::default(), out: out.to_path_buf(), resume: None, init_from: None, log_prefix: String::new() }
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
        param_ids: Default::default(),
    };
    save_checkpoint(&dir, &model, &AdamWConfig::new().init(), &state, &cfg).unwrap();
    device.seed(2);
    let mut other = ToyLm::new(&cfg, &device).unwrap();
    assert_ne!(params(&model), params(&other), "different seeds give different weights");
    let (applied, missing) = load_weights(&mut other, &dir, false).unwrap();
    assert!(missing.is_empty());
    assert_eq!(applied, params(&model).len());
    assert_eq!(params(&model), params(&other));
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
    let mut resumed_opts = opts(&part_dir);
    resumed_opts.resume = Some(first.checkpoint.clone());
    let resumed = train(&constant(6), &resumed_opts).unwrap();
    assert_eq!(load_state(&resumed.checkpoint).unwrap().step, 6);
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
