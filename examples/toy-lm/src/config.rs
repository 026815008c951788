//! Run configuration: defaults, TOML files and single-field overrides.
//!
//! One [`RunConfig`] describes a run completely (it is written next to every checkpoint and
//! every comparison as `config.toml`). Values come, in increasing priority, from the defaults
//! below, a TOML file (`--config file.toml`, any subset of the sections) and command-line
//! flags (defined in [`crate::cli`]: one typed flag per field, plus the generic
//! `--set section.key=value`, which goes through [`RunConfig::set`]).
//!
//! The method sections mirror the fields of the library's configs (`MobaAttentionConfig`,
//! `NsaAttentionConfig`, `SeerAttentionConfig`, `DmaAttentionConfig`, `DenseAttentionConfig`);
//! their defaults are chosen so that every method is actually sparse at the default context of
//! 256 tokens (see [`MobaOptions`] and friends), unlike the library defaults, which target 8k+.

use std::fmt;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::AppResult;

/// An attention method, as named on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// Causal softmax attention (the baseline).
    Dense,
    /// Native Sparse Attention.
    Nsa,
    /// Mixture of Block Attention.
    Moba,
    /// SeerAttention (learned block gate).
    Seer,
    /// Dynamic-mask attention.
    Dma,
}

impl Method {
    /// Every method, in the order `compare` runs them (dense first: Seer's distill mode
    /// starts from the dense run).
    pub const ALL: [Method; 5] = [Method::Dense, Method::Nsa, Method::Moba, Method::Seer, Method::Dma];

    /// The command-line name.
    pub fn name(self) -> &'static str {
        match self {
            Method::Dense => "dense",
            Method::Nsa => "nsa",
            Method::Moba => "moba",
            Method::Seer => "seer",
            Method::Dma => "dma",
        }
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The training data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Task {
    /// Byte-level language modelling on text files (or the default offline corpus).
    Lm,
    /// Multi-query associative recall: key-value pairs, then queries; loss on answers only.
    Mqar,
    /// Needle retrieval: a number hidden in filler text, asked for at the end.
    Needle,
}

impl Task {
    /// The command-line name.
    pub fn name(self) -> &'static str {
        match self {
            Task::Lm => "lm",
            Task::Mqar => "mqar",
            Task::Needle => "needle",
        }
    }
}

/// SeerAttention's mode (mirrors `burn_sparse_attn::SeerMode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum SeerModeOption {
    /// Gates trained on a frozen dense model (`--init-from` a dense checkpoint); output is dense.
    Distill,
    /// Output is block-sparse over the gate's selection; everything trains.
    Sparse,
}

/// Model shape.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelConfig {
    /// Transformer blocks.
    pub layers: usize,
    /// Model width.
    pub d_model: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads; 0 means `heads` (no GQA).
    pub kv_heads: usize,
    /// SwiGLU hidden width; 0 means `8/3 * d_model` rounded up to a multiple of 8.
    pub mlp_hidden: usize,
    /// Share the token embedding with the output head.
    pub tie_embeddings: bool,
    /// Attention method of every block (see `dense_first_layers` / `dense_last_layers`).
    pub attention: Method,
    /// Use dense attention in this many first blocks.
    pub dense_first_layers: usize,
    /// Use dense attention in this many last blocks (MoBA's recipe uses 1-3).
    pub dense_last_layers: usize,
    /// Explicit per-block methods (`--layer-attention moba,moba,dense`); overrides the three
    /// fields above when not empty.
    pub layer_attention: Vec<Method>,
    /// RoPE base of every attention layer.
    pub rope_theta: f64,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            layers: 2,
            d_model: 64,
            heads: 4,
            kv_heads: 0,
            mlp_hidden: 0,
            tie_embeddings: true,
            attention: Method::Dense,
            dense_first_layers: 0,
            dense_last_layers: 0,
            layer_attention: Vec::new(),
            rope_theta: 10000.0,
        }
    }
}

impl ModelConfig {
    /// Key/value heads with the `0 = heads` rule applied.
    pub fn kv_heads(&self) -> usize {
        if self.kv_heads == 0 { self.heads } else { self.kv_heads }
    }

    /// SwiGLU hidden width with the `0 = auto` rule applied.
    pub fn mlp_hidden(&self) -> usize {
        if self.mlp_hidden > 0 { self.mlp_hidden } else { (8 * self.d_model / 3).div_ceil(8) * 8 }
    }

    /// The attention method of each block.
    pub fn layer_methods(&self) -> Vec<Method> {
        if !self.layer_attention.is_empty() {
            return self.layer_attention.clone();
        }
        (0..self.layers)
            .map(|i| if i < self.dense_first_layers || i + self.dense_last_layers >= self.layers { Method::Dense } else { self.attention })
            .collect()
    }

    /// A short label for the attention layout: `moba`, `moba+dense1`, `dense`, `moba,dense`.
    pub fn attention_label(&self) -> String {
        let methods = self.layer_methods();
        if !self.layer_attention.is_empty() {
            return methods.iter().map(|m| m.name()).collect::<Vec<_>>().join(",");
        }
        let mut label = self.attention.name().to_string();
        if self.attention != Method::Dense {
            let dense = methods.iter().filter(|m| **m == Method::Dense).count();
            if dense > 0 {
                label.push_str(&format!("+dense{dense}"));
            }
        }
        label
    }
}

/// Optimisation and bookkeeping.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// Optimizer steps (total, counting those before a resume).
    pub steps: usize,
    /// Sequences per batch.
    pub batch: usize,
    /// Tokens per training sequence (the context length).
    pub seq_len: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Final learning rate as a fraction of `lr` (cosine decay floor).
    pub min_lr_ratio: f64,
    /// Linear warm-up steps.
    pub warmup: usize,
    /// AdamW decoupled weight decay.
    pub weight_decay: f64,
    /// AdamW beta_1.
    pub beta1: f64,
    /// AdamW beta_2.
    pub beta2: f64,
    /// Clip the global gradient norm to this value; 0 disables clipping.
    pub grad_clip: f64,
    /// Weight of SeerAttention's gate loss added to the LM loss.
    pub gate_loss_weight: f64,
    /// Validate every this many steps (and at the end); 0 means only at the end.
    pub eval_every: usize,
    /// Validation batches per evaluation.
    pub eval_batches: usize,
    /// Save a checkpoint every this many steps (and at the end); 0 means only at the end.
    pub checkpoint_every: usize,
    /// Print a progress line every this many steps.
    pub log_every: usize,
    /// Seed of the parameter initialisation and of the data streams.
    pub seed: u64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            steps: 150,
            batch: 8,
            seq_len: 256,
            lr: 3e-3,
            min_lr_ratio: 0.1,
            warmup: 15,
            weight_decay: 0.1,
            beta1: 0.9,
            beta2: 0.95,
            grad_clip: 1.0,
            gate_loss_weight: 1.0,
            eval_every: 50,
            eval_batches: 4,
            checkpoint_every: 0,
            log_every: 10,
            seed: 42,
        }
    }
}

/// What the model is trained on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataConfig {
    /// `lm`, `mqar` or `needle`.
    pub task: Task,
    /// UTF-8 text files for `lm`. Empty: the repository's own `*.md` and `*.rs` files, or a
    /// deterministic synthetic corpus when those are not found.
    pub text: Vec<String>,
    /// Fraction of the text held out (the end of the corpus) for validation.
    pub val_fraction: f64,
    /// MQAR: key-value pairs per sequence.
    pub mqar_pairs: usize,
    /// MQAR: queries per sequence; 0 means one per pair.
    pub mqar_queries: usize,
    /// MQAR: keys are drawn from byte values `0..mqar_key_vocab`.
    pub mqar_key_vocab: usize,
    /// MQAR: values are drawn from byte values `128..128 + mqar_value_vocab`.
    pub mqar_value_vocab: usize,
    /// Needle: digits of the hidden number.
    pub needle_digits: usize,
    /// Needle: relative depth of the needle in the haystack (0 = start, 1 = end); a negative
    /// value draws a random depth per sequence.
    pub needle_depth: f64,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            task: Task::Lm,
            text: Vec::new(),
            val_fraction: 0.1,
            mqar_pairs: 16,
            mqar_queries: 0,
            mqar_key_vocab: 64,
            mqar_value_vocab: 64,
            needle_digits: 4,
            needle_depth: -1.0,
        }
    }
}

/// `DenseAttentionConfig` fields.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DenseOptions {
    /// Sliding window; 0 means none (full causal attention).
    pub window: usize,
}

/// `MobaAttentionConfig` fields. Toy default: 8 blocks of 32 at context 256, 3 attended
/// (own block included), i.e. at most 96 of 256 keys (library default: 512 / 3 at 8k).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MobaOptions {
    /// Keys per block.
    pub block_size: usize,
    /// Blocks per query, own block included.
    pub top_k: usize,
}

impl Default for MobaOptions {
    fn default() -> Self {
        Self { block_size: 32, top_k: 3 }
    }
}

/// `NsaAttentionConfig` fields. Toy default: compression 16 / stride 8, selection blocks of 32
/// with 4 selected, window 64 (library default: 32 / 16, 64, 16, 512 at 64k).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NsaOptions {
    /// Compression window `l`.
    pub compress_block: usize,
    /// Compression stride `d`.
    pub compress_stride: usize,
    /// Hidden width of the compression MLPs; 0 means the library default (`4 * head_dim`).
    pub compress_hidden: usize,
    /// Selection block `l'`.
    pub select_block: usize,
    /// Selected blocks per query (forced first and recent blocks included).
    pub top_n: usize,
    /// Sliding-window branch size.
    pub window: usize,
    /// One k/v projection for all three branches.
    pub shared_kv: bool,
}

impl Default for NsaOptions {
    fn default() -> Self {
        Self { compress_block: 16, compress_stride: 8, compress_hidden: 0, select_block: 32, top_n: 4, window: 64, shared_kv: false }
    }
}

/// `SeerAttentionConfig` fields. Toy default: gate blocks of 32 (8 per 256-token sequence),
/// top-3 key blocks per query block, gate width 32 (library default: 64, threshold 1e-3, 128).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SeerOptions {
    /// Tokens per gate block.
    pub block_size: usize,
    /// Gate hidden width.
    pub gate_hidden: usize,
    /// Keep blocks whose gate probability exceeds this (used when `top_k` is 0).
    pub threshold: f64,
    /// Keep this many key blocks per query block; 0 selects by `threshold` instead.
    pub top_k: usize,
    /// Fraction of leading query blocks left out of the gate loss.
    pub loss_skip_fraction: f64,
    /// `sparse` (train everything, sparse output) or `distill` (train the gates of a frozen
    /// dense model given by `--init-from`).
    pub mode: SeerModeOption,
}

impl Default for SeerOptions {
    fn default() -> Self {
        Self { block_size: 32, gate_hidden: 32, threshold: 1e-3, top_k: 3, loss_skip_fraction: 0.25, mode: SeerModeOption::Sparse }
    }
}

/// `DmaAttentionConfig` fields. Toy default: keep 64 of up to 256 visible keys per query
/// (library default: 2048).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DmaOptions {
    /// Keys kept per query.
    pub window: usize,
}

impl Default for DmaOptions {
    fn default() -> Self {
        Self { window: 64 }
    }
}

/// Everything a run needs; serialised as `config.toml`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RunConfig {
    /// Model shape and attention layout.
    pub model: ModelConfig,
    /// Optimisation.
    pub train: TrainConfig,
    /// Data.
    pub data: DataConfig,
    /// Dense attention options.
    pub dense: DenseOptions,
    /// MoBA options.
    pub moba: MobaOptions,
    /// NSA options.
    pub nsa: NsaOptions,
    /// SeerAttention options.
    pub seer: SeerOptions,
    /// Dynamic-mask attention options.
    pub dma: DmaOptions,
}

/// Sections whose fields are flags without a prefix (`--d-model`, `--steps`, `--task`).
pub const PLAIN_SECTIONS: [&str; 3] = ["model", "train", "data"];
/// Sections whose fields are flags prefixed by the section (`--moba-block-size`).
pub const METHOD_SECTIONS: [&str; 5] = ["dense", "moba", "nsa", "seer", "dma"];

impl RunConfig {
    /// Reads a TOML file (any subset of the sections; missing fields keep their defaults).
    pub fn from_file(path: &Path) -> AppResult<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read config {}: {e}", path.display()))?;
        toml::from_str(&text).map_err(|e| format!("invalid config {}: {e}", path.display()).into())
    }

    /// The configuration as TOML.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("a RunConfig always serialises")
    }

    /// Writes `config.toml`-style text to `path`.
    pub fn save(&self, path: &Path) -> AppResult<()> {
        std::fs::write(path, self.to_toml()).map_err(|e| format!("cannot write {}: {e}", path.display()).into())
    }

    /// Label of the run in logs and results: the attention layout, plus `(distill)` for
    /// SeerAttention in distillation mode.
    pub fn label(&self) -> String {
        let mut label = self.model.attention_label();
        if self.seer.mode == SeerModeOption::Distill && self.model.layer_methods().contains(&Method::Seer) {
            label.push_str("-distill");
        }
        label
    }

    /// Every field as `(section, key, default value)`: sections in the order of
    /// `print-config`, keys sorted.
    pub fn default_fields() -> Vec<(&'static str, String, toml::Value)> {
        let defaults = toml::Table::try_from(RunConfig::default()).expect("a RunConfig always serialises");
        let mut out = Vec::new();
        for section in PLAIN_SECTIONS.into_iter().chain(METHOD_SECTIONS) {
            if let Some(fields) = defaults.get(section).and_then(toml::Value::as_table) {
                out.extend(fields.iter().map(|(k, v)| (section, k.clone(), v.clone())));
            }
        }
        out
    }

    /// This configuration with one field set from its command-line text: `path` is
    /// `section.key` (`nsa.top_n`; `-` and `_` are the same in the key), `raw` is read as the
    /// field's type (a list takes comma-separated items or a TOML array such as `["a,b.txt"]`).
    /// Not validated across fields (see [`RunConfig::validate`]).
    pub fn set(&self, path: &str, raw: &str) -> Result<RunConfig, String> {
        let (section, key) = path.split_once('.').ok_or_else(|| format!("`{path}` is not SECTION.KEY (e.g. nsa.top_n)"))?;
        let key = key.replace('-', "_");
        let fields = Self::default_fields();
        if !fields.iter().any(|(s, _, _)| *s == section) {
            let sections: Vec<&str> = PLAIN_SECTIONS.into_iter().chain(METHOD_SECTIONS).collect();
            return Err(format!("no section `{section}` (sections: {})", sections.join(", ")));
        }
        let Some((_, _, like)) = fields.iter().find(|(s, k, _)| *s == section && *k == key) else {
            let keys: Vec<&str> = fields.iter().filter(|(s, _, _)| *s == section).map(|(_, k, _)| k.as_str()).collect();
            return Err(format!("no field `{key}` in [{section}] (fields: {})", keys.join(", ")));
        };
        let value = value_like(raw, like).map_err(|what| format!("{section}.{key} takes {what}, not `{raw}`"))?;
        let mut table = toml::Table::try_from(self).map_err(|e| e.to_string())?;
        table
            .entry(section.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
            .as_table_mut()
            .expect("sections are tables")
            .insert(key.clone(), value);
        toml::Value::Table(table).try_into().map_err(|e: toml::de::Error| format!("{section}.{key}: {}", e.message().trim()))
    }

    /// Checks the cross-field rules that serde cannot.
    pub fn validate(&self) -> AppResult<()> {
        let m = &self.model;
        if m.layers == 0 || m.d_model == 0 || m.heads == 0 {
            return Err("model.layers, model.d_model and model.heads (--layers, --d-model, --heads) must be at least 1".into());
        }
        if !m.layer_attention.is_empty() && m.layer_attention.len() != m.layers {
            return Err(format!(
                "model.layer_attention (--layer-attention) lists {} methods for {} layers (--layers)",
                m.layer_attention.len(),
                m.layers
            )
            .into());
        }
        if m.dense_first_layers + m.dense_last_layers > m.layers {
            return Err("model.dense_first_layers + model.dense_last_layers (--dense-first-layers, --dense-last-layers) exceeds model.layers (--layers)".into());
        }
        let t = &self.train;
        if t.steps == 0 || t.batch == 0 || t.seq_len < 2 {
            return Err("train.steps and train.batch (--steps, --batch) must be at least 1 and train.seq_len (--seq-len) at least 2".into());
        }
        if t.lr.is_nan() || t.lr <= 0.0 || !(0.0..=1.0).contains(&t.min_lr_ratio) {
            return Err("train.lr (--lr) must be positive and train.min_lr_ratio (--min-lr-ratio) in [0, 1]".into());
        }
        if !(0.0..1.0).contains(&self.data.val_fraction) || self.data.val_fraction <= 0.0 {
            return Err("data.val_fraction (--val-fraction) must be in (0, 1)".into());
        }
        Ok(())
    }
}

/// `raw` read as a TOML value of the same type as `like`; on failure, what was expected.
fn value_like(raw: &str, like: &toml::Value) -> Result<toml::Value, &'static str> {
    let raw = raw.trim();
    Ok(match like {
        toml::Value::Integer(_) => toml::Value::Integer(raw.parse().map_err(|_| "a whole number")?),
        toml::Value::Float(_) => toml::Value::Float(raw.parse().map_err(|_| "a number")?),
        toml::Value::Boolean(_) => toml::Value::Boolean(raw.parse().map_err(|_| "true or false")?),
        toml::Value::Array(_) if raw.starts_with('[') => {
            match toml::from_str::<toml::Table>(&format!("v = {raw}")).ok().and_then(|mut t| t.remove("v")) {
                Some(v @ toml::Value::Array(_)) => v,
                _ => return Err("a TOML array"),
            }
        }
        toml::Value::Array(items) => {
            // Lists of strings (paths, method names) when the default is empty.
            let element = items.first().cloned().unwrap_or(toml::Value::String(String::new()));
            let list = raw.split(',').map(str::trim).filter(|v| !v.is_empty()).map(|v| value_like(v, &element));
            toml::Value::Array(list.collect::<Result<_, _>>()?)
        }
        _ => toml::Value::String(raw.to_string()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_round_trip_through_toml() {
        let cfg = RunConfig::default();
        let back: RunConfig = toml::from_str(&cfg.to_toml()).unwrap();
        assert_eq!(cfg, back);
    }

    #[test]
    fn set_reaches_every_section_and_type() {
        let cfg = RunConfig::default();
        let cfg = cfg.set("model.d_model", "32").unwrap();
        let cfg = cfg.set("model.attention", "moba").unwrap();
        let cfg = cfg.set("moba.block-size", "16").unwrap();
        let cfg = cfg.set("nsa.shared_kv", "true").unwrap();
        let cfg = cfg.set("seer.mode", "distill").unwrap();
        let cfg = cfg.set("train.lr", "1e-3").unwrap();
        let cfg = cfg.set("data.needle_depth", "0.5").unwrap();
        let cfg = cfg.set("data.text", r#"["a.txt", "b,c.txt"]"#).unwrap();
        let cfg = cfg.set("model.layer_attention", "moba, dense").unwrap();
        assert_eq!(cfg.model.d_model, 32);
        assert_eq!(cfg.model.attention, Method::Moba);
        assert_eq!(cfg.moba.block_size, 16);
        assert!(cfg.nsa.shared_kv);
        assert_eq!(cfg.seer.mode, SeerModeOption::Distill);
        assert_eq!(cfg.train.lr, 1e-3);
        assert_eq!(cfg.data.needle_depth, 0.5);
        assert_eq!(cfg.data.text, vec!["a.txt".to_string(), "b,c.txt".to_string()]);
        assert_eq!(cfg.model.layer_methods(), vec![Method::Moba, Method::Dense]);
    }

    #[test]
    fn set_names_what_is_wrong() {
        let cfg = RunConfig::default();
        let err = |path: &str, raw: &str| cfg.set(path, raw).unwrap_err();
        assert!(err("steps", "1").contains("SECTION.KEY"), "{}", err("steps", "1"));
        assert!(err("modle.layers", "1").contains("no section `modle`"));
        assert!(err("moba.blok", "1").contains("no field `blok` in [moba]"));
        assert!(err("train.steps", "many").contains("train.steps takes a whole number"));
        assert!(err("train.steps", "-3").contains("train.steps"), "{}", err("train.steps", "-3"));
        assert!(err("model.attention", "foo").contains("foo"), "{}", err("model.attention", "foo"));
        assert!(err("nsa.shared_kv", "yes").contains("true or false"));
    }

    #[test]
    fn layer_mix() {
        let m = ModelConfig { layers: 4, attention: Method::Nsa, dense_first_layers: 1, dense_last_layers: 1, ..Default::default() };
        assert_eq!(m.layer_methods(), vec![Method::Dense, Method::Nsa, Method::Nsa, Method::Dense]);
        assert_eq!(m.attention_label(), "nsa+dense2");
    }
}
