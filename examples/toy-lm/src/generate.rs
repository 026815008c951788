//! Sampling bytes from a trained checkpoint.

use std::io::Write;
use std::path::Path;

use burn::tensor::{Device, Int, Tensor, TensorData};

use crate::AppResult;
use crate::config::RunConfig;
use crate::data::{Rng, VOCAB_SIZE};
use crate::model::ToyLm;
use crate::train::{CONFIG_FILE, load_weights};

/// Sampling settings.
#[derive(Debug, Clone)]
pub struct SampleOptions {
    /// Bytes to generate.
    pub tokens: usize,
    /// Softmax temperature; 0 is greedy.
    pub temperature: f64,
    /// Sample among the `top_k` most likely bytes; 0 means all.
    pub top_k: usize,
    /// Sampling seed.
    pub seed: u64,
}

/// Loads the model of a checkpoint directory (its `config.toml` and `model.bpk`, or the
/// `model.safetensors` of a checkpoint written before `model.bpk`).
pub fn load_model(dir: &Path, device: &Device) -> AppResult<(ToyLm, RunConfig)> {
    let cfg = RunConfig::from_file(&dir.join(CONFIG_FILE))?;
    let mut model = ToyLm::new(&cfg, device)?;
    load_weights(&mut model, dir, false)?;
    Ok((model, cfg))
}

/// Picks a byte from `logits` (over bytes only: special tokens are never sampled).
pub fn sample_byte(logits: &[f32], opts: &SampleOptions, rng: &mut Rng) -> u8 {
    let bytes = &logits[..256];
    let argmax = || bytes.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map(|(i, _)| i as u8).unwrap_or(b' ');
    if opts.temperature <= 0.0 {
        return argmax();
    }
    let mut order: Vec<usize> = (0..256).collect();
    order.sort_by(|&a, &b| bytes[b].total_cmp(&bytes[a]));
    let k = if opts.top_k == 0 { 256 } else { opts.top_k.min(256) };
    let top = &order[..k];
    let max = bytes[top[0]] as f64;
    let weights: Vec<f64> = top.iter().map(|&i| ((bytes[i] as f64 - max) / opts.temperature).exp()).collect();
    let total: f64 = weights.iter().sum();
    let mut u = rng.unit() * total;
    for (&i, w) in top.iter().zip(&weights) {
        if u < *w {
            return i as u8;
        }
        u -= w;
    }
    top[0] as u8
}

/// Generates `opts.tokens` bytes after `prompt`, streaming them to stdout; returns them.
pub fn generate(model: &ToyLm, cfg: &RunConfig, prompt: &str, opts: &SampleOptions, device: &Device) -> AppResult<Vec<u8>> {
    let mut context: Vec<i64> = prompt.bytes().map(i64::from).collect();
    if context.is_empty() {
        context.push(b'\n' as i64);
    }
    let window = cfg.train.seq_len;
    let mut rng = Rng::new(opts.seed);
    let mut out = Vec::with_capacity(opts.tokens);
    let mut stdout = std::io::stdout();
    let mut pending = Vec::new();
    for _ in 0..opts.tokens {
        let ctx = &context[context.len().saturating_sub(window)..];
        let n = ctx.len();
        let tokens = Tensor::<2, Int>::from_data(TensorData::new(ctx.to_vec(), [1, n]), device);
        let logits = model.forward(tokens, false)?.logits.slice([0..1, n - 1..n]).reshape([VOCAB_SIZE]);
        let logits: Vec<f32> = logits.try_into_vec_as::<f32>().map_err(|e| format!("{e:?}"))?;
        let byte = sample_byte(&logits, opts, &mut rng);
        context.push(byte as i64);
        out.push(byte);
        // Print whole UTF-8 characters as they complete.
        pending.push(byte);
        if std::str::from_utf8(&pending).is_ok() || pending.len() >= 4 {
            let _ = stdout.write_all(String::from_utf8_lossy(&pending).as_bytes());
            let _ = stdout.flush();
            pending.clear();
        }
    }
    if !pending.is_empty() {
        let _ = stdout.write_all(String::from_utf8_lossy(&pending).as_bytes());
    }
    println!();
    Ok(out)
}
