//! Run configuration: defaults, TOML files and single-field overrides.
//!
//! One [`RunConfig`] describes a run completely (it is written next to every checkpoint and
//! every comparison as `config.toml`). Values come, in increasing priority, from the defaults
//! below, a TOML file (`--config file.toml`, any subset of the sections) and command-line
//! flags (defined in [`crate::cli`]: one typed flag per field, plus the generic
//! `--set section.key=value`, which goes through [`RunConfig::set`]).
//!
//! The method sections `[dense]`, `[moba]`, `[nsa]`, `[seer]` and `[dma]` hold the library's
//! own layer configs (`DenseAttentionConfig`, `MobaAttentionConfig`, `NsaAttentionConfig`,
//! `SeerAttentionConfig`, `DmaAttentionConfig`) in a [`LayerConfig`], without their shape
//! fields: every layer takes `d_model`, heads, kv heads and the RoPE base from `[model]`, filled
//! in by [`RunConfig::attention_config`]. Their defaults are chosen so that every method is
//! actually sparse at the default context of 256 tokens (see [`MethodConfig::toy`]), unlike the
//! library defaults, which target 8k+. Optional settings are `Option`s: left out of a section,
//! they take the library's default.

use std::fmt;
use std::path::Path;

use burn_sparse_attn::{
    AttentionMethodConfig, DenseAttentionConfig, DmaAttentionConfig, MobaAttentionConfig, NsaAttentionConfig, SeerAttentionConfig,
    SeerMode,
};
use serde::de::DeserializeOwned;
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
    /// Mix each position's attention input with the previous position's (RWKV's token shift,
    /// a learned share per channel): a block sees the previous token without spending an
    /// attention head on it, so associative recall (MQAR) needs one retrieval hop, not two.
    pub token_shift: bool,
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
            token_shift: false,
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

/// The fields of a library layer config that come from `[model]`, not from the method
/// sections: every layer gets the model's `d_model`, `heads` (as `n_heads`), `kv_heads` (as
/// `n_kv_heads`) and `rope_theta`, and the library's default `head_dim` (`d_model / heads`).
pub const SHAPE_FIELDS: [&str; 5] = ["d_model", "n_heads", "n_kv_heads", "head_dim", "rope_theta"];

/// A library layer config that a method section holds (see [`LayerConfig`]).
pub trait MethodConfig: Serialize + DeserializeOwned + Clone + fmt::Debug {
    /// The method this config builds.
    const METHOD: Method;
    /// Its `Option` fields (beyond the shape): left out of a section they are `None`, the
    /// library's default, even where the example's default is `Some`.
    const OPTIONAL: &'static [&'static str];
    /// The example's default (shape fields are placeholders): sparse at context 256.
    fn toy() -> Self;
    /// The library's enum of configs, holding this one.
    fn into_method(self) -> AttentionMethodConfig;
}

impl MethodConfig for DenseAttentionConfig {
    const METHOD: Method = Method::Dense;
    const OPTIONAL: &'static [&'static str] = &["window"];
    /// The library default: full causal attention, no window.
    fn toy() -> Self {
        DenseAttentionConfig::new(0, 0)
    }
    fn into_method(self) -> AttentionMethodConfig {
        AttentionMethodConfig::Dense(self)
    }
}

impl MethodConfig for MobaAttentionConfig {
    const METHOD: Method = Method::Moba;
    const OPTIONAL: &'static [&'static str] = &[];
    /// 8 blocks of 32 at context 256, 3 attended (own block included), i.e. at most 96 of 256
    /// keys (library default: 512 / 3, for 8k).
    fn toy() -> Self {
        MobaAttentionConfig::new(0, 0).with_block_size(32).with_top_k(3)
    }
    fn into_method(self) -> AttentionMethodConfig {
        AttentionMethodConfig::Moba(self)
    }
}

impl MethodConfig for NsaAttentionConfig {
    const METHOD: Method = Method::Nsa;
    const OPTIONAL: &'static [&'static str] = &["compress_hidden"];
    /// Compression 16 / stride 8, selection blocks of 32 with 4 selected, window 64, the
    /// library's compression MLP width (`4 * head_dim`) (library default: 32 / 16, 64, 16, 512,
    /// for 64k).
    fn toy() -> Self {
        NsaAttentionConfig::new(0, 0)
            .with_compress_block(16)
            .with_compress_stride(8)
            .with_select_block(32)
            .with_top_n(4)
            .with_window(64)
    }
    fn into_method(self) -> AttentionMethodConfig {
        AttentionMethodConfig::Nsa(self)
    }
}

impl MethodConfig for SeerAttentionConfig {
    const METHOD: Method = Method::Seer;
    const OPTIONAL: &'static [&'static str] = &["top_k"];
    /// Gate blocks of 32 (8 per 256-token sequence), top-3 key blocks per query block, gate
    /// width 32 (library default: 64, threshold 1e-3, 128).
    fn toy() -> Self {
        SeerAttentionConfig::new(0, 0).with_block_size(32).with_gate_hidden(32).with_top_k(Some(3))
    }
    fn into_method(self) -> AttentionMethodConfig {
        AttentionMethodConfig::Seer(self)
    }
}

impl MethodConfig for DmaAttentionConfig {
    const METHOD: Method = Method::Dma;
    const OPTIONAL: &'static [&'static str] = &[];
    /// Keep 64 of up to 256 visible keys per query (library default: 2048).
    fn toy() -> Self {
        DmaAttentionConfig::new(0, 0).with_window(64)
    }
    fn into_method(self) -> AttentionMethodConfig {
        AttentionMethodConfig::Dma(self)
    }
}

/// A method section (`[moba]`, `[nsa]`, ...): the library's own layer config
/// (`MobaAttentionConfig`, ...), read and written without its shape fields
/// ([`SHAPE_FIELDS`]), which [`RunConfig::attention_config`] fills from `[model]`; inside a
/// `LayerConfig` they are placeholders. It dereferences to the library config
/// (`cfg.moba.block_size`).
///
/// In TOML, a field left out keeps the example's default ([`MethodConfig::toy`]), except
/// the `Option` fields ([`MethodConfig::OPTIONAL`]: `dense.window`, `nsa.compress_hidden`,
/// `seer.top_k`), where leaving it out means `None`, the library's default. Enum values are
/// the library's variant names (`mode = "Distill"`; `distill` and `mean-pos` are read too).
/// For files written before the sections held the library configs, `0` in an `Option` field
/// reads as `None`, as it meant then.
#[derive(Clone, Debug)]
pub struct LayerConfig<C>(pub C);

impl<C: MethodConfig> Default for LayerConfig<C> {
    fn default() -> Self {
        Self(C::toy())
    }
}

impl<C> std::ops::Deref for LayerConfig<C> {
    type Target = C;
    fn deref(&self) -> &C {
        &self.0
    }
}

impl<C> std::ops::DerefMut for LayerConfig<C> {
    fn deref_mut(&mut self) -> &mut C {
        &mut self.0
    }
}

impl<C: MethodConfig> LayerConfig<C> {
    /// The method-specific fields as a TOML table (no shape fields; `None` fields left out).
    pub fn to_table(&self) -> toml::Table {
        let mut table = toml::Table::try_from(&self.0).expect("a library layer config always serialises");
        for key in SHAPE_FIELDS {
            table.remove(key);
        }
        table
    }

    /// The section read from `given` (see the type's documentation for absent fields).
    pub fn from_table(given: toml::Table) -> Result<Self, String> {
        let section = C::METHOD.name();
        let mut merged = Self::default().to_table();
        let mut known: Vec<String> = merged.keys().cloned().collect();
        known.extend(C::OPTIONAL.iter().map(|k| k.to_string()));
        known.sort();
        known.dedup();
        for key in C::OPTIONAL {
            merged.remove(*key);
        }
        for (key, value) in given {
            if SHAPE_FIELDS.contains(&key.as_str()) {
                return Err(format!(
                    "`{key}` is not set in [{section}]: every attention layer takes its shape from [model] (d_model, heads, kv_heads, rope_theta)"
                ));
            }
            if !known.contains(&key) {
                return Err(format!("unknown field `{key}` in [{section}], expected one of {}", known.join(", ")));
            }
            if C::OPTIONAL.contains(&key.as_str()) && value == toml::Value::Integer(0) {
                continue;
            }
            let value = match (value, merged.get(&key)) {
                (v, Some(toml::Value::String(_))) | (v @ toml::Value::Array(_), Some(toml::Value::Array(_))) => variant_names(v),
                (v, _) => v,
            };
            merged.insert(key, value);
        }
        merged.insert("d_model".into(), toml::Value::Integer(0));
        merged.insert("n_heads".into(), toml::Value::Integer(0));
        merged.insert("rope_theta".into(), toml::Value::Float(10000.0));
        toml::Value::Table(merged).try_into().map(LayerConfig).map_err(|e: toml::de::Error| format!("[{section}] {}", e.message().trim()))
    }

    /// The library config with the shape of `model` filled in.
    pub fn with_shape(&self, model: &ModelConfig) -> C {
        let mut table = self.to_table();
        table.insert("d_model".into(), toml::Value::Integer(model.d_model as i64));
        table.insert("n_heads".into(), toml::Value::Integer(model.heads as i64));
        table.insert("n_kv_heads".into(), toml::Value::Integer(model.kv_heads() as i64));
        table.insert("rope_theta".into(), toml::Value::Float(model.rope_theta));
        toml::Value::Table(table).try_into().expect("a library layer config reads back what it wrote")
    }
}

/// `distill`, `mean-pos`, `mean_pos` as the library's variant names `Distill`, `MeanPos`
/// (strings, and the strings of a list); other values unchanged.
fn variant_names(value: toml::Value) -> toml::Value {
    match value {
        toml::Value::String(s) => toml::Value::String(
            s.split(['-', '_'])
                .map(|part| {
                    let mut chars = part.chars();
                    chars.next().map(|c| c.to_ascii_uppercase().to_string() + chars.as_str()).unwrap_or_default()
                })
                .collect(),
        ),
        toml::Value::Array(items) => toml::Value::Array(items.into_iter().map(variant_names).collect()),
        other => other,
    }
}

impl<C: MethodConfig> PartialEq for LayerConfig<C> {
    fn eq(&self, other: &Self) -> bool {
        self.to_table() == other.to_table()
    }
}

impl<C: MethodConfig> Serialize for LayerConfig<C> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.to_table().serialize(serializer)
    }
}

impl<'de, C: MethodConfig> Deserialize<'de> for LayerConfig<C> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Self::from_table(toml::Table::deserialize(deserializer)?).map_err(serde::de::Error::custom)
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
    /// Dense attention layers (the library's `DenseAttentionConfig`, shape from `[model]`).
    pub dense: LayerConfig<DenseAttentionConfig>,
    /// MoBA layers (`MobaAttentionConfig`).
    pub moba: LayerConfig<MobaAttentionConfig>,
    /// NSA layers (`NsaAttentionConfig`).
    pub nsa: LayerConfig<NsaAttentionConfig>,
    /// SeerAttention layers (`SeerAttentionConfig`).
    pub seer: LayerConfig<SeerAttentionConfig>,
    /// Dynamic-mask attention layers (`DmaAttentionConfig`).
    pub dma: LayerConfig<DmaAttentionConfig>,
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
        if self.seer.mode == SeerMode::Distill && self.model.layer_methods().contains(&Method::Seer) {
            label.push_str("-distill");
        }
        label
    }

    /// The library config of `method`'s attention layers: its section, with the shape of
    /// `[model]` (the one place where the shape fields are filled in).
    pub fn attention_config(&self, method: Method) -> AttentionMethodConfig {
        let m = &self.model;
        match method {
            Method::Dense => self.dense.with_shape(m).into_method(),
            Method::Moba => self.moba.with_shape(m).into_method(),
            Method::Nsa => self.nsa.with_shape(m).into_method(),
            Method::Seer => self.seer.with_shape(m).into_method(),
            Method::Dma => self.dma.with_shape(m).into_method(),
        }
    }

    /// The `Option` fields of the method sections, as `(section, key)`: whole numbers, `None`
    /// (the library's default) when left out.
    pub fn optional_fields() -> Vec<(&'static str, &'static str)> {
        let of = |section: Method, keys: &'static [&'static str]| keys.iter().map(move |k| (section.name(), *k));
        of(Method::Dense, DenseAttentionConfig::OPTIONAL)
            .chain(of(Method::Moba, MobaAttentionConfig::OPTIONAL))
            .chain(of(Method::Nsa, NsaAttentionConfig::OPTIONAL))
            .chain(of(Method::Seer, SeerAttentionConfig::OPTIONAL))
            .chain(of(Method::Dma, DmaAttentionConfig::OPTIONAL))
            .collect()
    }

    /// Whether `section.key` is an `Option` field.
    pub fn is_optional(section: &str, key: &str) -> bool {
        Self::optional_fields().iter().any(|(s, k)| *s == section && *k == key)
    }

    /// Every field as `(section, key, default value)`: sections in the order of
    /// `print-config`, keys sorted; the default is `None` for an `Option` field that is unset
    /// by default (see [`RunConfig::optional_fields`]).
    pub fn default_fields() -> Vec<(&'static str, String, Option<toml::Value>)> {
        let defaults = toml::Table::try_from(RunConfig::default()).expect("a RunConfig always serialises");
        let mut out = Vec::new();
        for section in PLAIN_SECTIONS.into_iter().chain(METHOD_SECTIONS) {
            let mut fields: Vec<(&'static str, String, Option<toml::Value>)> = Vec::new();
            if let Some(table) = defaults.get(section).and_then(toml::Value::as_table) {
                fields.extend(table.iter().map(|(k, v)| (section, k.clone(), Some(v.clone()))));
            }
            for (s, key) in Self::optional_fields() {
                if s == section && !fields.iter().any(|(_, k, _)| k == key) {
                    fields.push((section, key.to_string(), None));
                }
            }
            fields.sort_by(|a, b| a.1.cmp(&b.1));
            out.extend(fields);
        }
        out
    }

    /// This configuration with one field set from its command-line text: `path` is
    /// `section.key` (`nsa.top_n`; `-` and `_` are the same in the key), `raw` is read as the
    /// field's type (a list takes comma-separated items or a TOML array such as `["a,b.txt"]`).
    /// An `Option` field takes `none` for `None` (the library's default; `0`, its old spelling,
    /// too). Not validated across fields (see [`RunConfig::validate`]).
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
        let optional = Self::is_optional(section, &key);
        let value = if optional && (raw.trim().eq_ignore_ascii_case("none") || raw.trim() == "0") {
            None
        } else {
            let like = like.clone().unwrap_or(toml::Value::Integer(0));
            let what = |what: &str| {
                let none = if optional { " or none" } else { "" };
                format!("{section}.{key} takes {what}{none}, not `{raw}`")
            };
            Some(value_like(raw, &like).map_err(what)?)
        };
        let mut table = toml::Table::try_from(self).map_err(|e| e.to_string())?;
        let fields = table
            .entry(section.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
            .as_table_mut()
            .expect("sections are tables");
        match value {
            Some(value) => fields.insert(key.clone(), value),
            None => fields.remove(&key),
        };
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
        assert_eq!(cfg.seer.mode, SeerMode::Distill);
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

    /// A section that leaves an `Option` field out gets `None`, the library's default, while
    /// its other missing fields keep the example's defaults; a missing section keeps them all.
    #[test]
    fn optional_fields_left_out_are_the_library_default() {
        let cfg: RunConfig = toml::from_str("[seer]\nblock_size = 16\n[nsa]\ntop_n = 2\n[dense]\nrope = true\n").unwrap();
        assert_eq!(cfg.seer.top_k, None, "seer.top_k absent: select by threshold");
        assert_eq!(cfg.seer.top_k, SeerAttentionConfig::new(1, 1).top_k);
        assert_eq!((cfg.seer.block_size, cfg.seer.gate_hidden), (16, 32), "other fields keep the toy defaults");
        assert_eq!(cfg.nsa.compress_hidden, None);
        assert_eq!((cfg.nsa.top_n, cfg.nsa.window), (2, 64));
        assert_eq!(cfg.dense.window, None);
        let defaults: RunConfig = toml::from_str("").unwrap();
        assert_eq!(defaults, RunConfig::default());
        assert_eq!(defaults.seer.top_k, Some(3), "toy default when the section is absent");
        // Files written when these fields were `0 = None` sentinels read as None.
        let old: RunConfig = toml::from_str("[seer]\ntop_k = 0\nmode = \"distill\"\n[nsa]\ncompress_hidden = 0\n").unwrap();
        assert_eq!((old.seer.top_k, old.seer.mode, old.nsa.compress_hidden), (None, SeerMode::Distill, None));
    }

    /// The layers get `[model]`'s shape; a method section cannot set it, nor an unknown field.
    #[test]
    fn layers_take_the_model_shape() {
        let mut cfg = RunConfig::default().set("model.rope_theta", "500000").unwrap();
        cfg.model.kv_heads = 2;
        cfg.nsa.compress_hidden = Some(24);
        let AttentionMethodConfig::Nsa(nsa) = cfg.attention_config(Method::Nsa) else { panic!("nsa") };
        assert_eq!((nsa.d_model, nsa.n_heads, nsa.n_kv_heads, nsa.head_dim, nsa.rope_theta), (64, 4, Some(2), None, 500000.0));
        assert_eq!((nsa.compress_block, nsa.compress_hidden, nsa.top_n), (16, Some(24), 4));
        let AttentionMethodConfig::Seer(seer) = cfg.attention_config(Method::Seer) else { panic!("seer") };
        assert_eq!((seer.d_model, seer.top_k, seer.mode), (64, Some(3), SeerMode::Sparse));
        for (text, needle) in [("[moba]\nd_model = 8\n", "from [model]"), ("[moba]\nblok = 8\n", "unknown field `blok`")] {
            let err = toml::from_str::<RunConfig>(text).unwrap_err().to_string();
            assert!(err.contains(needle), "{err}");
        }
    }

    #[test]
    fn set_takes_none_for_optional_fields() {
        let cfg = RunConfig::default().set("nsa.compress_hidden", "48").unwrap().set("dense.window", "32").unwrap();
        assert_eq!((cfg.nsa.compress_hidden, cfg.dense.window), (Some(48), Some(32)));
        let cfg = cfg.set("nsa.compress_hidden", "none").unwrap().set("dense.window", "0").unwrap().set("seer.top_k", "None").unwrap();
        assert_eq!((cfg.nsa.compress_hidden, cfg.dense.window, cfg.seer.top_k), (None, None, None));
        let back: RunConfig = toml::from_str(&cfg.to_toml()).unwrap();
        assert_eq!(back, cfg);
        assert!(RunConfig::default().set("seer.top_k", "many").unwrap_err().contains("a whole number or none"));
        let cfg = RunConfig::default().set("nsa.compressor", "mean-pos").unwrap().set("seer.gate_k_pool", "max,avg").unwrap();
        assert_eq!(cfg.nsa.compressor, burn_sparse_attn::nsa::CompressorKind::MeanPos);
        assert_eq!(cfg.seer.gate_k_pool.len(), 2);
    }

    #[test]
    fn layer_mix() {
        let m = ModelConfig { layers: 4, attention: Method::Nsa, dense_first_layers: 1, dense_last_layers: 1, ..Default::default() };
        assert_eq!(m.layer_methods(), vec![Method::Dense, Method::Nsa, Method::Nsa, Method::Dense]);
        assert_eq!(m.attention_label(), "nsa+dense2");
    }
}
