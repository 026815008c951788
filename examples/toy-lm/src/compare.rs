//! `compare`: trains every chosen attention method under the same budget and writes
//! `results.md`, `results.json`, `loss.svg`, `speed.svg`, `command.txt` and `config.toml`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use burn_sparse_attn::SeerMode;
use serde::{Deserialize, Serialize};

use crate::AppResult;
use crate::config::{Method, RunConfig, Task};
use crate::plot::{LossCurves, Speed, loss_chart, speed_chart};
use crate::train::{RunOptions, TrainOutcome, train};

/// What `compare` writes to `results.json` (and `plot` reads back).
#[derive(Debug, Serialize, Deserialize)]
pub struct CompareResults {
    /// The exact command line.
    pub command: String,
    /// Backend name as given to `--device`.
    pub backend: String,
    /// Device description.
    pub device: String,
    /// Float precision of the models (`--dtype`).
    #[serde(default)]
    pub dtype: String,
    /// Task name.
    pub task: String,
    /// Shared budget.
    pub steps: usize,
    /// Sequences per batch.
    pub batch: usize,
    /// Context length.
    pub seq_len: usize,
    /// Seed.
    pub seed: u64,
    /// Total wall time of the comparison.
    pub total_wall_time_s: f64,
    /// One entry per method.
    pub runs: Vec<TrainOutcome>,
}

/// Options of `compare` beyond the run configuration.
#[derive(Debug, Clone)]
pub struct CompareOptions {
    /// Methods, in order.
    pub methods: Vec<Method>,
    /// Output folder.
    pub out: PathBuf,
    /// Backend name (`flex`, `cuda`, ...).
    pub backend: String,
    /// The device.
    pub device: burn::tensor::Device,
    /// Float precision (`--dtype`), recorded in the results.
    pub dtype: String,
    /// The command line, for `command.txt`.
    pub command: String,
}

fn fmt_bytes(b: Option<u64>) -> String {
    match b {
        Some(b) if b >= 1 << 30 => format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64),
        Some(b) => format!("{:.0} MiB", b as f64 / (1u64 << 20) as f64),
        None => "n/a".into(),
    }
}

/// The mean share of causal pairs the layers attend, as a percentage.
fn attended(per_layer: &[f64]) -> String {
    if per_layer.is_empty() {
        return "n/a".into();
    }
    format!("{:.1}%", 100.0 * per_layer.iter().sum::<f64>() / per_layer.len() as f64)
}

/// The markdown table of a comparison.
pub fn markdown_table(task: Task, runs: &[TrainOutcome]) -> String {
    let acc = if task == Task::Lm { "val next-byte acc" } else { "val answer acc" };
    let mut s = format!(
        "| method | params | final train loss | val loss | {acc} | attended pairs | tokens/s (steady) | tokens/s (median step) | warm-up | peak memory | wall time |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    );
    for r in runs {
        s.push_str(&format!(
            "| {} | {} | {:.4} | {:.4} | {:.1}% | {} | {:.0} | {:.0} | {:.1} s | {} | {:.1} s |\n",
            r.label,
            r.params,
            r.final_train_loss,
            r.val_loss,
            100.0 * r.val_accuracy,
            attended(&r.attended_pairs),
            r.tokens_per_sec,
            r.median_tokens_per_sec,
            r.warmup_s,
            fmt_bytes(r.peak_memory_bytes),
            r.wall_time_s
        ));
    }
    s
}

/// Runs the comparison.
pub fn compare(base: &RunConfig, opts: &CompareOptions) -> AppResult<CompareResults> {
    let start = Instant::now();
    std::fs::create_dir_all(&opts.out)?;
    std::fs::write(opts.out.join("command.txt"), format!("{}\n", opts.command))?;
    base.save(&opts.out.join("config.toml"))?;
    let mut runs: Vec<TrainOutcome> = Vec::new();
    let mut dense_checkpoint: Option<PathBuf> = None;
    for &method in &opts.methods {
        let mut cfg = base.clone();
        cfg.model.attention = method;
        cfg.model.layer_attention.clear();
        let label = cfg.label();
        println!("\n=== {label}: {} steps, batch {}, seq {} ===", cfg.train.steps, cfg.train.batch, cfg.train.seq_len);
        let init_from = if method == Method::Seer && cfg.seer.mode == SeerMode::Distill {
            if dense_checkpoint.is_none() {
                println!("[{label}] note: seer distill without a dense run first: put `dense` before `seer` in --methods");
            }
            dense_checkpoint.clone()
        } else {
            None
        };
        let run_opts = RunOptions {
            device: opts.device.clone(),
            devices: Vec::new(),
            out: opts.out.join(&label),
            resume: None,
            init_from,
            log_prefix: format!("[{label}] "),
        };
        let outcome = train(&cfg, &run_opts)?;
        if method == Method::Dense {
            dense_checkpoint = Some(outcome.checkpoint.clone());
        }
        runs.push(outcome);
    }
    let results = CompareResults {
        command: opts.command.clone(),
        backend: opts.backend.clone(),
        device: format!("{:?}", opts.device),
        dtype: opts.dtype.clone(),
        task: base.data.task.name().to_string(),
        steps: base.train.steps,
        batch: base.train.batch,
        seq_len: base.train.seq_len,
        seed: base.train.seed,
        total_wall_time_s: start.elapsed().as_secs_f64(),
        runs,
    };
    write_results(&results, base, &opts.out)?;
    Ok(results)
}

/// The figures, written next to the results.
pub const LOSS_FIGURE: &str = "loss.svg";
/// See [`LOSS_FIGURE`].
pub const SPEED_FIGURE: &str = "speed.svg";

/// Writes `results.md`, `results.json`, `loss.svg` and `speed.svg`.
pub fn write_results(results: &CompareResults, base: &RunConfig, out: &Path) -> AppResult<()> {
    let task = base.data.task;
    let table = markdown_table(task, &results.runs);
    let mut md = String::new();
    md.push_str("# toy-lm attention comparison\n\n");
    md.push_str(&format!(
        "Task `{}`, {} layers, d_model {}, {} heads, context {}, batch {}, {} steps, seed {}; backend `{}` ({}). Total wall time {:.1} s.\n\n",
        task.name(),
        base.model.layers,
        base.model.d_model,
        base.model.heads,
        base.train.seq_len,
        base.train.batch,
        base.train.steps,
        base.train.seed,
        results.backend,
        results.device,
        results.total_wall_time_s
    ));
    md.push_str(&table);
    let kinds: Vec<&str> = results.runs.iter().map(|r| r.peak_memory_kind.as_str()).collect();
    let rss_note = if kinds.iter().any(|k| k.contains("RSS")) {
        " (reset before each method, but memory the allocator kept from earlier methods counts: for exact numbers run `--methods` one at a time)"
    } else {
        ""
    };
    md.push_str(&format!(
        "\nFinal train loss: mean of the last 10 steps. Validation: {} held-out batches at the end. Peak memory: {}{rss_note}. tokens/s counts training steps after the first {} (their time, kernel compilation included, is the warm-up column), over their total time and at the median step (a stalled step lowers the first only); the device memory pool is emptied before each method.\n",
        base.train.eval_batches,
        kinds.first().copied().unwrap_or("n/a"),
        crate::train::WARMUP_STEPS
    ));
    md.push_str(&format!(
        "\nMethod settings: MoBA block {} top-k {}; NSA compress {}/{} select {} top-n {} window {}; Seer block {} {} ({}); DMA window {}; dense last layers {}.\n",
        base.moba.block_size,
        base.moba.top_k,
        base.nsa.compress_block,
        base.nsa.compress_stride,
        base.nsa.select_block,
        base.nsa.top_n,
        base.nsa.window,
        base.seer.block_size,
        match base.seer.top_k {
            Some(k) => format!("top-k {k}"),
            None => format!("threshold {}", base.seer.threshold),
        },
        match base.seer.mode {
            SeerMode::Sparse => "sparse",
            SeerMode::Distill => "distill",
        },
        base.dma.window,
        base.model.dense_last_layers,
    ));
    md.push_str(&format!(
        "\nCommand: see `command.txt`; full configuration: `config.toml`; figures: `{LOSS_FIGURE}`, `{SPEED_FIGURE}`.\n\n![training and validation loss]({LOSS_FIGURE})\n\n![training tokens/s]({SPEED_FIGURE})\n"
    ));
    let maps: Vec<&TrainOutcome> = results.runs.iter().filter(|r| !r.attended_pairs.is_empty()).collect();
    if !maps.is_empty() {
        md.push_str(&format!(
            "\nAttended pairs: the share of causal (query, key) pairs the attention layers attend on the first validation sequence, averaged over layers (NSA: selected blocks and window; its compressed branch is not counted). Where, per layer: `<method>/{}`.\n",
            crate::selection::SELECTION_FIGURE
        ));
        for r in maps {
            md.push_str(&format!("\n![{} selection]({}/{})\n", r.label, r.label, crate::selection::SELECTION_FIGURE));
        }
    }
    std::fs::write(out.join("results.md"), md)?;
    std::fs::write(out.join("results.json"), serde_json::to_string_pretty(results)?)?;
    write_figures(results, out)
}

/// Draws `loss.svg` (training and validation loss per method) and `speed.svg` (tokens/s per
/// method) into `out`. Results of older versions, without a validation history, show their
/// final validation loss as one dot.
pub fn write_figures(results: &CompareResults, out: &Path) -> AppResult<()> {
    let curves: Vec<LossCurves> = results
        .runs
        .iter()
        .map(|r| {
            let mut val: Vec<(usize, f32)> = r.val_curve.iter().map(|p| (p.step, p.loss)).collect();
            if val.is_empty() && r.val_loss.is_finite() {
                val.push((r.steps, r.val_loss));
            }
            LossCurves { label: r.label.clone(), train: r.losses.clone(), val }
        })
        .collect();
    let dtype = if results.dtype.is_empty() { String::new() } else { format!(", {}", results.dtype) };
    let title = format!("{} task, context {}, batch {}{dtype}", results.task, results.seq_len, results.batch);
    loss_chart(&out.join(LOSS_FIGURE), &format!("loss: {title}"), &curves)?;
    let speeds: Vec<Speed> = results
        .runs
        .iter()
        .map(|r| Speed { label: r.label.clone(), tokens_per_sec: r.tokens_per_sec, median_tokens_per_sec: r.median_tokens_per_sec })
        .collect();
    speed_chart(&out.join(SPEED_FIGURE), &format!("training speed on {}: {title}", results.backend), &speeds)
}
