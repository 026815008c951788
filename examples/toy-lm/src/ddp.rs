//! Data-parallel training on the devices of one machine, through Burn's own collectives.
//!
//! One replica of the model per device, each in its own thread, running the same training loop
//! as a single device (`crate::train::run_steps`) on its share of every global batch. The
//! gradients are made equal across replicas by Burn itself: every trainable parameter is
//! marked distributed ([`Tensor::set_distributed`], as burn-train's DDP strategy does), a
//! [`DistributedContext`] runs Burn's gradient-sync server for the devices, and each replica's
//! `backward()` hands every finished parameter gradient to that server, which all-reduces it
//! across the devices (NCCL on CUDA) and waits for the reductions before `backward()` returns.
//! The reduction is a sum ([`ReduceOperation::Sum`]); every replica divides its loss by the
//! scored targets of the whole batch, so the sum is exactly the gradient of the global batch's
//! mean loss that one device computes. Clipping, the AdamW step and the learning rate then run
//! identically on every replica, which keeps the replicas' parameters equal.
//!
//! Replica 0 logs, validates and writes checkpoints (the checkpoint is that of a single-device
//! run: resume it on any number of devices). The replicas add up their scalar losses on the
//! host each step (`StepBoard`) only so that replica 0 logs the global loss and all of them
//! stop together on a non-finite one; no gradient passes through it.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Barrier, Mutex, mpsc};
use std::time::Instant;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::distributed::{DistributedConfig, DistributedContext, ReduceOperation};
use burn::tensor::{Device, Tensor};

use crate::AppResult;
use crate::config::RunConfig;
use crate::generate::load_model;
use crate::train::{Prepared, Rank, RunOptions, TrainOutcome, prepare, run_steps};

/// Marks every parameter that requires a gradient as distributed, keyed by its parameter id
/// (the same id on every replica): Burn then all-reduces its gradient during `backward()`.
/// Frozen parameters (Seer distillation) have no gradient to reduce and stay as they are.
struct MarkDistributed;

impl ModuleMapper for MarkDistributed {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        if !param.is_require_grad() {
            return param;
        }
        let (id, tensor, mapper) = param.consume();
        Param::from_mapped_value(id, tensor.set_distributed(id), mapper)
    }
}

/// Where the replicas of a run add up their step's scalar losses (host values, for the log
/// and the stop on a non-finite loss): each posts its part, all wait for all, each reads the
/// total.
pub(crate) struct StepBoard {
    parts: Mutex<Vec<(f32, Option<f32>)>>,
    posted: Barrier,
    read: Barrier,
}

impl StepBoard {
    /// A board for `replicas` replicas.
    pub fn new(replicas: usize) -> Self {
        Self { parts: Mutex::new(vec![(0.0, None); replicas]), posted: Barrier::new(replicas), read: Barrier::new(replicas) }
    }

    /// Posts replica `index`'s LM loss part and gate loss; returns the sum of the LM loss parts
    /// (each already divided by the whole batch's scored targets) and the mean gate loss.
    /// Blocks until every replica has posted.
    pub fn exchange(&self, index: usize, lm: f32, gate: Option<f32>) -> (f32, Option<f32>) {
        self.parts.lock().expect("step board")[index] = (lm, gate);
        self.posted.wait();
        let total = {
            let parts = self.parts.lock().expect("step board");
            let lm = parts.iter().map(|p| p.0).sum::<f32>();
            let gates: Option<Vec<f32>> = parts.iter().map(|p| p.1).collect();
            (lm, gates.map(|g| g.iter().sum::<f32>() / g.len() as f32))
        };
        // Nobody posts the next step's part before everyone has read this one.
        self.read.wait();
        total
    }
}

/// [`crate::train::train`] on the several devices of `opts.devices`.
pub fn train_data_parallel(cfg: &RunConfig, opts: &RunOptions) -> AppResult<TrainOutcome> {
    let wall = Instant::now();
    let devices = opts.devices.clone();
    let n = devices.len();
    let batch = cfg.train.batch;
    if n < 2 || batch % n != 0 {
        return Err(format!("data-parallel training over {n} devices needs a batch divisible by the device count (batch {batch})").into());
    }
    let opts = RunOptions { device: devices[0].clone(), ..opts.clone() };
    // The model is initialised once, on the first device, and copied to every device, so
    // every replica starts from the same parameters (with the same ids).
    let prepared = prepare(cfg, &opts)?;
    println!(
        "{}data-parallel over {n} devices ({}): {} of {batch} sequences per device per step; gradients summed by Burn's all-reduce",
        opts.log_prefix,
        devices.iter().map(|d| format!("{d:?}")).collect::<Vec<_>>().join(", "),
        batch / n
    );
    let replicas: Vec<Prepared> = devices
        .iter()
        .map(|device| Prepared { model: prepared.model.clone().fork(&device.clone().autodiff()).map(&mut MarkDistributed), ..prepared.clone() })
        .collect();
    drop(prepared);

    let context = DistributedContext::init(devices.clone(), DistributedConfig { all_reduce_op: ReduceOperation::Sum });
    let board = Arc::new(StepBoard::new(n));
    let (tx, rx) = mpsc::channel();
    for (index, (device, replica)) in devices.iter().cloned().zip(replicas).enumerate() {
        let (cfg, opts, tx) = (cfg.clone(), opts.clone(), tx.clone());
        let rank = Rank { index, count: n, device, board: Some(board.clone()) };
        std::thread::Builder::new().name(format!("toy-lm-replica-{index}")).spawn(move || {
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run_steps(&cfg, &opts, replica, &rank, wall)))
                .unwrap_or_else(|panic| {
                    let what = panic.downcast_ref::<String>().cloned().or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()));
                    Err(format!("panicked: {}", what.unwrap_or_default()).into())
                });
            tx.send((index, result)).ok();
        })?;
    }
    drop(tx);
    let mut outcome = None;
    for _ in 0..n {
        let (index, result) = rx.recv().map_err(|_| "a data-parallel replica ended without a result")?;
        match result {
            Ok(Some(o)) => outcome = Some(o),
            Ok(None) => {}
            // The other replicas may be left waiting for this one inside a collective: the
            // error ends the run (and the process, from `main`).
            Err(e) => return Err(format!("replica {index} ({:?}): {e}", devices[index]).into()),
        }
    }
    drop(context);
    outcome.ok_or_else(|| "replica 0 returned no outcome".into())
}

/// What [`ddp_check`] found: the largest relative differences between the single-device run
/// and the data-parallel run.
#[derive(Debug, Clone)]
pub struct DdpCheck {
    /// Steps compared.
    pub steps: usize,
    /// Largest `|a - b| / max(|b|, 1e-6)` over the per-step losses.
    pub loss_rel: f32,
    /// The same over the per-step gradient norms (of the summed gradient, before clipping).
    pub grad_norm_rel: f32,
    /// `||a - b|| / ||b||` over all final parameters.
    pub params_rel_l2: f32,
    /// Largest `|a - b|` over all final parameters.
    pub params_max_abs: f32,
    /// Step 1's loss and gradient norm on one device and on all.
    pub first_step: [(f32, f32); 2],
    /// Steady-state tokens/s on one device and on all.
    pub tokens_per_sec: [f64; 2],
}

impl DdpCheck {
    /// Whether every difference is within `tolerance`.
    pub fn passes(&self, tolerance: f32) -> bool {
        self.loss_rel <= tolerance && self.grad_norm_rel <= tolerance && self.params_rel_l2 <= tolerance
    }
}

/// Trains `cfg` on `devices[0]` alone, then data-parallel on all of `devices` (same seed, same
/// global batch, checkpoints under `out/one` and `out/all`), and compares the two runs: loss
/// and gradient norm of every step, and the final parameters.
pub fn ddp_check(cfg: &RunConfig, devices: &[Device], out: &Path) -> AppResult<DdpCheck> {
    if devices.len() < 2 {
        return Err("ddp-check: --devices must list at least two devices".into());
    }
    let run = |name: &str, list: Vec<Device>| -> AppResult<(TrainOutcome, PathBuf)> {
        let dir = out.join(name);
        let opts = RunOptions {
            device: devices[0].clone(),
            devices: list,
            out: dir.clone(),
            resume: None,
            init_from: None,
            log_prefix: format!("[{name}] "),
        };
        Ok((crate::train::train(cfg, &opts)?, dir.join("checkpoint")))
    };
    let (one, one_ckpt) = run("one", Vec::new())?;
    let (all, all_ckpt) = run("all", devices.to_vec())?;
    let rel = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(a, b)| (a - b).abs() / b.abs().max(1e-6)).fold(0.0f32, f32::max);
    if one.losses.len() != all.losses.len() || one.grad_norms.len() != all.grad_norms.len() {
        return Err(format!("ddp-check: the runs have {} and {} steps", one.losses.len(), all.losses.len()).into());
    }
    let (a, _) = load_model(&all_ckpt, &devices[0])?;
    let (b, _) = load_model(&one_ckpt, &devices[0])?;
    let (a, b) = (param_values(&a), param_values(&b));
    let (mut diff2, mut ref2, mut max_abs) = (0.0f64, 0.0f64, 0.0f32);
    for (a, b) in a.iter().zip(&b) {
        for (x, y) in a.iter().zip(b) {
            diff2 += ((x - y) as f64).powi(2);
            ref2 += (*y as f64).powi(2);
            max_abs = max_abs.max((x - y).abs());
        }
    }
    Ok(DdpCheck {
        steps: one.losses.len(),
        loss_rel: rel(&all.losses, &one.losses),
        grad_norm_rel: rel(&all.grad_norms, &one.grad_norms),
        params_rel_l2: (diff2.sqrt() / ref2.sqrt().max(1e-30)) as f32,
        params_max_abs: max_abs,
        first_step: [(one.losses[0], one.grad_norms[0]), (all.losses[0], all.grad_norms[0])],
        tokens_per_sec: [one.tokens_per_sec, all.tokens_per_sec],
    })
}

/// Every float parameter's values (as f32), in visiting order.
fn param_values(model: &impl Module) -> Vec<Vec<f32>> {
    struct Values(Vec<Vec<f32>>);
    impl ModuleVisitor for Values {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let data = param.val().into_data().convert::<f32>();
            self.0.push(data.try_to_vec::<f32>().unwrap_or_default());
        }
    }
    let mut v = Values(Vec::new());
    model.visit(&mut v);
    v.0
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every replica reads the sum of the LM loss parts and the mean gate loss of the same
    /// step, step after step.
    #[test]
    fn the_step_board_adds_up_each_step() {
        let board = Arc::new(StepBoard::new(3));
        let handles: Vec<_> = (0..3)
            .map(|i| {
                let board = board.clone();
                std::thread::spawn(move || {
                    (0..50).map(|step| board.exchange(i, (step * 10 + i) as f32, Some(i as f32))).collect::<Vec<_>>()
                })
            })
            .collect();
        for h in handles {
            let seen = h.join().unwrap();
            for (step, (lm, gate)) in seen.into_iter().enumerate() {
                assert_eq!(lm, (30 * step + 3) as f32);
                assert_eq!(gate, Some(1.0));
            }
        }
        let board = StepBoard::new(2);
        std::thread::scope(|s| {
            s.spawn(|| assert_eq!(board.exchange(0, 1.0, Some(2.0)), (3.0, None)));
            assert_eq!(board.exchange(1, 2.0, None), (3.0, None), "a replica without a gate loss: none");
        });
    }
}
