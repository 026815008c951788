//! The command line (clap, derive API): `compare`, `train`, `generate`, `print-config` and
//! `plot`, with generated `--help`.
//!
//! Every field of [`RunConfig`] is a typed flag of `compare`, `train` and `print-config`
//! (except a few fields of the library's layer configs: `rope`, NSA's `compressor` and
//! `forced_*`, Seer's gate pools and `gate_kv_head_keys`, reached by `--set`):
//! fields of `[model]`, `[train]` and `[data]` take no prefix (`--d-model 128`, `--lr 1e-3`,
//! `--task mqar`), method sections take their name (`--moba-top-k 2`, `--seer-mode distill`);
//! `--section.field VALUE` (`--nsa.top-n 2`) is accepted as an alias of each, and
//! `--set section.key=value` reaches any field by its name in `print-config`. Values come, in
//! increasing priority, from the defaults, `--config FILE.toml` (or, for `train --resume`, the
//! checkpoint's own `config.toml`), `--set`, then the typed flags. Bad input is a clap error
//! naming the flag (exit status 2), never a panic.

use std::path::{Path, PathBuf};

use burn::tensor::FloatDType;
use clap::builder::{PossibleValuesParser, TypedValueParser};
use clap::error::ErrorKind;
use clap::{ArgMatches, Args, CommandFactory, FromArgMatches, Parser, Subcommand};

use burn_sparse_attn::SeerMode;
use burn_sparse_attn::seer::GatePool;
use burn_sparse_attn::nsa::CompressorKind;

use crate::config::{METHOD_SECTIONS, Method, RunConfig, Task};
use crate::device::{DeviceSpec, compiled_backends, parse_dtype};
use crate::train::{CONFIG_FILE, LEGACY_MODEL_FILE, MODEL_FILE};

/// The parsed command line: `Cli::parse()` (or `Cli::try_parse_from(args)`).
///
/// [`CommandFactory`] is implemented by hand (the rest is derived) so that the generated
/// command also shows each configuration flag's default and accepts the `--section.field`
/// aliases, both computed from [`RunConfig::default`].
#[derive(Debug, Clone)]
pub struct Cli {
    /// The subcommand.
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Clone, Subcommand)]
pub enum Command {
    /// Train every chosen attention method under one budget and compare them
    ///
    /// Writes OUT/results.md, results.json, loss.svg (training and validation loss per
    /// method), speed.svg (tokens/s per method), command.txt, config.toml and one checkpoint
    /// per method, and prints the table.
    Compare(CompareArgs),
    /// Train one model (optionally resuming, or starting from another checkpoint's weights)
    Train(TrainArgs),
    /// Sample bytes from a trained checkpoint
    Generate(GenerateArgs),
    /// Print the configuration as TOML (defaults, then --config, --set and the flags applied)
    PrintConfig(PrintConfigArgs),
    /// Redraw loss.svg and speed.svg from the results.json of a `compare` run
    Plot(PlotArgs),
    /// Draw tokens/s and peak memory against context (sweep-speed.svg, sweep-memory.svg)
    /// from result rows (JSON lines, as in docs/results/toy-lm-h200.jsonl) of one session
    PlotSweep(PlotSweepArgs),
    /// Train on the first device of --devices alone, then data-parallel on all of them (same
    /// seed and global batch), and compare loss and gradient norm per step and the final
    /// parameters; exits 1 when a difference exceeds --tolerance
    #[command(hide = true)]
    DdpCheck(DdpCheckArgs),
}

/// `compare`.
#[derive(Debug, Clone, Args)]
pub struct CompareArgs {
    /// Methods to train, in this order (dense first: Seer's distill mode starts from its
    /// checkpoint) [default: all]
    #[arg(long, value_name = "M,M,..", value_delimiter = ',', num_args = 1.., ignore_case = true)]
    pub methods: Option<Vec<Method>>,
    /// Output folder
    #[arg(long, value_name = "DIR", default_value = "runs/compare")]
    pub out: PathBuf,
    /// Backend and precision.
    #[command(flatten)]
    pub device: DeviceArgs,
    /// The run configuration.
    #[command(flatten)]
    pub config: ConfigArgs,
}

/// `train`.
#[derive(Debug, Clone, Args)]
pub struct TrainArgs {
    /// Output folder (the checkpoint goes to OUT/checkpoint)
    #[arg(long, value_name = "DIR", default_value = "runs/train")]
    pub out: PathBuf,
    /// Continue from this checkpoint folder (weights, optimizer moments, step and data
    /// stream); its config.toml is the base configuration unless --config is given
    #[arg(long, value_name = "CKPT_DIR", value_parser = checkpoint_dir)]
    pub resume: Option<PathBuf>,
    /// Initialise from this checkpoint's weights, where the shapes match (Seer distillation:
    /// a dense checkpoint)
    #[arg(long, value_name = "CKPT_DIR", value_parser = checkpoint_dir)]
    pub init_from: Option<PathBuf>,
    /// Backend and precision.
    #[command(flatten)]
    pub device: DeviceArgs,
    /// Train one model data-parallel on these devices of the --device backend (e.g.
    /// cuda:0,cuda:1): one replica per device, each on an equal share of every --batch,
    /// gradients summed by Burn's collective all-reduce (NCCL; CUDA only). The first device
    /// logs, validates and writes checkpoints. One device alone picks that device
    #[arg(long, value_name = "DEV,DEV,..", value_delimiter = ',', num_args = 1.., value_parser = device_spec)]
    pub devices: Vec<DeviceSpec>,
    /// The run configuration.
    #[command(flatten)]
    pub config: ConfigArgs,
}

/// `ddp-check` (hidden): single-device against data-parallel training.
#[derive(Debug, Clone, Args)]
pub struct DdpCheckArgs {
    /// The devices (at least two, e.g. cuda:0,cuda:1); the single-device run takes the first
    #[arg(long, value_name = "DEV,DEV,..", value_delimiter = ',', num_args = 1.., required = true, value_parser = device_spec)]
    pub devices: Vec<DeviceSpec>,
    /// Precision of the whole model
    #[arg(long, value_name = "T", default_value = "f32", ignore_case = true, value_parser = dtype_parser())]
    pub dtype: FloatDType,
    /// Largest relative difference allowed in any step's loss and gradient norm, and in the
    /// final parameters (relative L2)
    #[arg(long, value_name = "X", default_value_t = 2e-3)]
    pub tolerance: f32,
    /// Output folder (the runs' checkpoints go to OUT/one and OUT/all)
    #[arg(long, value_name = "DIR", default_value = "runs/ddp-check")]
    pub out: PathBuf,
    /// The run configuration.
    #[command(flatten)]
    pub config: ConfigArgs,
}

/// `generate`.
#[derive(Debug, Clone, Args)]
pub struct GenerateArgs {
    /// Checkpoint folder (with config.toml and model.bpk)
    #[arg(long, value_name = "CKPT_DIR", value_parser = checkpoint_dir)]
    pub checkpoint: PathBuf,
    /// Text to continue (several words are joined by spaces)
    #[arg(long, value_name = "TEXT", num_args = 1.., default_value = "")]
    pub prompt: Vec<String>,
    /// Bytes to generate
    #[arg(long, value_name = "N", default_value_t = 200)]
    pub tokens: usize,
    /// Softmax temperature; 0 is greedy
    #[arg(long, value_name = "T", default_value_t = 0.8)]
    pub temperature: f64,
    /// Sample among the K most likely bytes; 0 means all
    #[arg(long, value_name = "K", default_value_t = 0)]
    pub top_k: usize,
    /// Sampling seed
    #[arg(long, value_name = "S", default_value_t = 0)]
    pub seed: u64,
    /// Backend to run on (among those compiled in) [default: the first compiled in]
    #[arg(long, value_name = "NAME", value_parser = compiled_device)]
    pub device: Option<String>,
}

/// `print-config`.
#[derive(Debug, Clone, Args)]
pub struct PrintConfigArgs {
    /// The run configuration.
    #[command(flatten)]
    pub config: ConfigArgs,
}

/// `plot`.
#[derive(Debug, Clone, Args)]
pub struct PlotArgs {
    /// results.json written by `compare`
    #[arg(value_name = "RESULTS.json", value_parser = existing_file)]
    pub results: PathBuf,
    /// Output folder [default: the folder of RESULTS.json]
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
}

/// `plot-sweep`.
#[derive(Debug, Clone, Args)]
pub struct PlotSweepArgs {
    /// Result rows, one JSON object per line
    #[arg(value_name = "ROWS.jsonl", value_parser = existing_file)]
    pub rows: PathBuf,
    /// The `session` field of the rows to draw
    #[arg(long, value_name = "NAME")]
    pub session: String,
    /// Title prefix of both figures
    #[arg(long, value_name = "TEXT", default_value = "toy LM training step")]
    pub title: String,
    /// Output folder [default: the folder of ROWS.jsonl]
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
}

/// `--device` and `--dtype` (`compare`, `train`).
#[derive(Debug, Clone, Args)]
pub struct DeviceArgs {
    /// Backend to run on (among those compiled in) [default: the first compiled in]
    #[arg(long, value_name = "NAME", value_parser = compiled_device)]
    pub device: Option<String>,
    /// Precision of the whole model (parameters, activations, optimizer state, attention);
    /// on CUDA, bf16 and f16 take the kernels' fastest paths
    #[arg(long, value_name = "T", default_value = "f32", ignore_case = true, value_parser = dtype_parser())]
    pub dtype: FloatDType,
}

/// Where the run configuration comes from: a file, `--set`, and one typed flag per field.
#[derive(Debug, Clone, Default, Args)]
#[command(next_help_heading = "Configuration")]
pub struct ConfigArgs {
    /// Start from this TOML file (any subset of the sections printed by `print-config`);
    /// --set and the flags below override it
    #[arg(long, value_name = "FILE.toml", value_parser = existing_file)]
    pub config: Option<PathBuf>,
    /// Set any field of `print-config` by name, e.g. --set nsa.top_n=2 (repeatable; the typed
    /// flags below override it)
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE", value_parser = parse_set)]
    pub set: Vec<SetField>,
    /// `[model]`.
    #[command(flatten)]
    pub model: ModelFlags,
    /// `[train]`.
    #[command(flatten)]
    pub train: TrainFlags,
    /// `[data]`.
    #[command(flatten)]
    pub data: DataFlags,
    /// Method sections.
    #[command(flatten)]
    pub methods: MethodFlags,
}

/// One `--set section.key=value`, checked against the field's type when parsed.
#[derive(Debug, Clone, PartialEq)]
pub struct SetField {
    /// `section.key`.
    pub path: String,
    /// The value as typed.
    pub value: String,
}

/// Fields of `[model]`.
#[derive(Debug, Clone, Default, Args)]
#[command(next_help_heading = "Model ([model])")]
pub struct ModelFlags {
    /// Transformer blocks
    #[arg(long, value_name = "N", value_parser = at_least::<1>)]
    pub layers: Option<usize>,
    /// Model width
    #[arg(long, value_name = "N", value_parser = at_least::<1>)]
    pub d_model: Option<usize>,
    /// Query heads
    #[arg(long, value_name = "N", value_parser = at_least::<1>)]
    pub heads: Option<usize>,
    /// Key/value heads (GQA); 0 means --heads
    #[arg(long, value_name = "N")]
    pub kv_heads: Option<usize>,
    /// SwiGLU hidden width; 0 means 8/3 d_model rounded up to a multiple of 8
    #[arg(long, value_name = "N")]
    pub mlp_hidden: Option<usize>,
    /// Share the token embedding with the output head (alone: true)
    #[arg(long, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    pub tie_embeddings: Option<bool>,
    /// Mix each attention input with the previous token's (token shift; alone: true)
    #[arg(long, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    pub token_shift: Option<bool>,
    /// Attention of every block (compare sets it per method)
    #[arg(long, value_name = "M", ignore_case = true)]
    pub attention: Option<Method>,
    /// Keep this many first blocks dense
    #[arg(long, value_name = "N")]
    pub dense_first_layers: Option<usize>,
    /// Keep this many last blocks dense (MoBA's recipe: 1)
    #[arg(long, value_name = "N")]
    pub dense_last_layers: Option<usize>,
    /// Explicit method per block, e.g. moba,moba,dense (overrides the three flags above)
    #[arg(long, value_name = "M,M,..", value_delimiter = ',', ignore_case = true)]
    pub layer_attention: Option<Vec<Method>>,
    /// RoPE base of every attention layer
    #[arg(long, value_name = "X")]
    pub rope_theta: Option<f64>,
}

/// Fields of `[train]`.
#[derive(Debug, Clone, Default, Args)]
#[command(next_help_heading = "Training ([train])")]
pub struct TrainFlags {
    /// Optimizer steps (in total, counting those before a resume)
    #[arg(long, value_name = "N", value_parser = at_least::<1>)]
    pub steps: Option<usize>,
    /// Sequences per batch
    #[arg(long, value_name = "N", value_parser = at_least::<1>)]
    pub batch: Option<usize>,
    /// Context length (tokens per training sequence)
    #[arg(long, value_name = "N", value_parser = at_least::<2>)]
    pub seq_len: Option<usize>,
    /// Peak learning rate
    #[arg(long, value_name = "X")]
    pub lr: Option<f64>,
    /// Final learning rate as a fraction of --lr (cosine decay floor)
    #[arg(long, value_name = "X")]
    pub min_lr_ratio: Option<f64>,
    /// Linear warm-up steps
    #[arg(long, value_name = "N")]
    pub warmup: Option<usize>,
    /// AdamW decoupled weight decay
    #[arg(long, value_name = "X")]
    pub weight_decay: Option<f64>,
    /// AdamW beta_1
    #[arg(long, value_name = "X")]
    pub beta1: Option<f64>,
    /// AdamW beta_2
    #[arg(long, value_name = "X")]
    pub beta2: Option<f64>,
    /// Clip the global gradient norm to this; 0 disables clipping
    #[arg(long, value_name = "X")]
    pub grad_clip: Option<f64>,
    /// Weight of SeerAttention's gate loss added to the LM loss
    #[arg(long, value_name = "X")]
    pub gate_loss_weight: Option<f64>,
    /// Validate every N steps (and at the end); 0: only at the end
    #[arg(long, value_name = "N")]
    pub eval_every: Option<usize>,
    /// Validation batches per evaluation
    #[arg(long, value_name = "N")]
    pub eval_batches: Option<usize>,
    /// Save a checkpoint every N steps (and at the end); 0: only at the end
    #[arg(long, value_name = "N")]
    pub checkpoint_every: Option<usize>,
    /// Print a log line every N steps
    #[arg(long, value_name = "N")]
    pub log_every: Option<usize>,
    /// Seed of the initialisation and of the data streams
    #[arg(long, value_name = "N")]
    pub seed: Option<u64>,
}

/// Fields of `[data]`.
#[derive(Debug, Clone, Default, Args)]
#[command(next_help_heading = "Data ([data])")]
pub struct DataFlags {
    /// Training data: text (lm), associative recall (mqar) or a hidden number (needle)
    #[arg(long, value_name = "TASK", ignore_case = true)]
    pub task: Option<Task>,
    /// UTF-8 text files for --task lm [default: this repository's *.md and *.rs files]
    #[arg(long, value_name = "FILE", num_args = 1.., value_parser = existing_text_file)]
    pub text: Option<Vec<String>>,
    /// Fraction of the text held out (its end) for validation
    #[arg(long, value_name = "X")]
    pub val_fraction: Option<f64>,
    /// MQAR: key-value pairs per sequence
    #[arg(long, value_name = "N")]
    pub mqar_pairs: Option<usize>,
    /// MQAR: queries per sequence; 0 means one per pair
    #[arg(long, value_name = "N")]
    pub mqar_queries: Option<usize>,
    /// MQAR: keys are byte values 0..N
    #[arg(long, value_name = "N")]
    pub mqar_key_vocab: Option<usize>,
    /// MQAR: values are byte values 128..128+N
    #[arg(long, value_name = "N")]
    pub mqar_value_vocab: Option<usize>,
    /// Needle: digits of the hidden number
    #[arg(long, value_name = "N")]
    pub needle_digits: Option<usize>,
    /// Needle: depth of the needle (0 start, 1 end); negative: random per sequence
    #[arg(long, value_name = "X", allow_negative_numbers = true)]
    pub needle_depth: Option<f64>,
}

/// Fields of the method sections `[dense]`, `[moba]`, `[nsa]`, `[seer]`, `[dma]`.
#[derive(Debug, Clone, Default, Args)]
#[command(next_help_heading = "Attention methods ([dense], [moba], [nsa], [seer], [dma])")]
pub struct MethodFlags {
    /// Dense: sliding window; `none` (or 0) for none, full causal attention [default: none]
    #[arg(long, value_name = "N|none", value_parser = count_or_none)]
    pub dense_window: Option<CountOrNone>,
    /// MoBA: keys per block
    #[arg(long, value_name = "N")]
    pub moba_block_size: Option<usize>,
    /// MoBA: blocks per query, own block included
    #[arg(long, value_name = "N")]
    pub moba_top_k: Option<usize>,
    /// NSA: compression window
    #[arg(long, value_name = "N")]
    pub nsa_compress_block: Option<usize>,
    /// NSA: compression stride
    #[arg(long, value_name = "N")]
    pub nsa_compress_stride: Option<usize>,
    /// NSA: hidden width of the compression MLPs; `none` (or 0) for the library's default,
    /// 4 x head_dim [default: none]
    #[arg(long, value_name = "N|none", value_parser = count_or_none)]
    pub nsa_compress_hidden: Option<CountOrNone>,
    /// NSA: selection block
    #[arg(long, value_name = "N")]
    pub nsa_select_block: Option<usize>,
    /// NSA: selected blocks per query (first and recent blocks included)
    #[arg(long, value_name = "N")]
    pub nsa_top_n: Option<usize>,
    /// NSA: sliding-window branch size
    #[arg(long, value_name = "N")]
    pub nsa_window: Option<usize>,
    /// NSA: one k/v projection for all three branches (alone: true)
    #[arg(long, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    pub nsa_shared_kv: Option<bool>,
    /// NSA: the compressor of keys and values: mlp (the paper's), mean-pos (mean plus a
    /// position embedding), attention-pool (learned per-head weights) or head-linear (a
    /// per-head linear map of the window) [default: mlp]
    #[arg(long, value_name = "KIND", ignore_case = true, value_parser = compressor_parser())]
    pub nsa_compressor: Option<CompressorKind>,
    /// NSA: leading selection blocks always selected [default: 1]
    #[arg(long, value_name = "N")]
    pub nsa_forced_initial: Option<usize>,
    /// NSA: most recent selection blocks always selected, the current one included [default: 2]
    #[arg(long, value_name = "N")]
    pub nsa_forced_local: Option<usize>,
    /// SeerAttention: sparse (train everything, block-sparse output) or distill (train the
    /// gates of a frozen dense model: train --init-from a dense checkpoint; compare does this
    /// from its dense run)
    #[arg(long, value_name = "MODE", ignore_case = true, value_parser = seer_mode_parser())]
    pub seer_mode: Option<SeerMode>,
    /// SeerAttention: tokens per gate block
    #[arg(long, value_name = "N")]
    pub seer_block_size: Option<usize>,
    /// SeerAttention: gate hidden width
    #[arg(long, value_name = "N")]
    pub seer_gate_hidden: Option<usize>,
    /// SeerAttention: key blocks kept per query block; `none` (or 0) selects by
    /// --seer-threshold instead
    #[arg(long, value_name = "N|none", value_parser = count_or_none)]
    pub seer_top_k: Option<CountOrNone>,
    /// SeerAttention: keep blocks whose gate probability exceeds this (when --seer-top-k is
    /// none)
    #[arg(long, value_name = "X")]
    pub seer_threshold: Option<f64>,
    /// SeerAttention: fraction of leading query blocks left out of the gate loss
    #[arg(long, value_name = "X")]
    pub seer_loss_skip_fraction: Option<f64>,
    /// SeerAttention: how the gate pools the queries of a block, a comma list of avg, max, min
    /// concatenated in order [default: avg]
    #[arg(long, value_name = "POOLS", value_delimiter = ',', ignore_case = true, value_parser = gate_pool_parser())]
    pub seer_gate_q_pool: Option<Vec<GatePool>>,
    /// SeerAttention: how the gate pools the keys of a block, a comma list of avg, max, min
    /// concatenated in order [default: max,min,avg]
    #[arg(long, value_name = "POOLS", value_delimiter = ',', ignore_case = true, value_parser = gate_pool_parser())]
    pub seer_gate_k_pool: Option<Vec<GatePool>>,
    /// DMA: keys kept per query
    #[arg(long, value_name = "N")]
    pub dma_window: Option<usize>,
}

/// The value of a flag that sets an `Option` field of the configuration: a whole number, or
/// `none` (`0` too, its meaning before the field was an `Option`) for `None`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CountOrNone(pub Option<usize>);

impl From<CountOrNone> for Option<usize> {
    fn from(v: CountOrNone) -> Self {
        v.0
    }
}

fn count_or_none(s: &str) -> Result<CountOrNone, String> {
    if s.trim().eq_ignore_ascii_case("none") {
        return Ok(CountOrNone(None));
    }
    let n: usize = s.trim().parse().map_err(|_| "expected a whole number or `none`".to_string())?;
    Ok(CountOrNone((n > 0).then_some(n)))
}

fn compressor_parser() -> impl TypedValueParser<Value = CompressorKind> {
    PossibleValuesParser::new(["mlp", "mean-pos", "attention-pool", "head-linear"]).map(|s| match s.to_ascii_lowercase().as_str() {
        "mean-pos" => CompressorKind::MeanPos,
        "attention-pool" => CompressorKind::AttentionPool,
        "head-linear" => CompressorKind::HeadLinear,
        _ => CompressorKind::Mlp,
    })
}

fn gate_pool_parser() -> impl TypedValueParser<Value = GatePool> {
    PossibleValuesParser::new(["avg", "max", "min"]).map(|s| match s.to_ascii_lowercase().as_str() {
        "max" => GatePool::Max,
        "min" => GatePool::Min,
        _ => GatePool::Avg,
    })
}

fn seer_mode_parser() -> impl TypedValueParser<Value = SeerMode> {
    PossibleValuesParser::new(["sparse", "distill"]).map(|s| if s.eq_ignore_ascii_case("distill") { SeerMode::Distill } else { SeerMode::Sparse })
}

/// Copies every `Some` flag into the configuration field it names.
macro_rules! apply_flags {
    ($cfg:ident, $flags:expr, { $($flag:ident => $section:ident . $field:ident),* $(,)? }) => {
        $(if let Some(v) = &$flags.$flag {
            $cfg.$section.$field = v.clone().into();
        })*
    };
}

impl ConfigArgs {
    /// The run configuration: defaults (or `base`, a checkpoint's `config.toml`, when no
    /// `--config` is given), then `--config`, `--set` and the typed flags; validated. Errors
    /// name the flag or the file.
    pub fn resolve(&self, base: Option<&Path>) -> Result<RunConfig, String> {
        let mut cfg = match (&self.config, base) {
            (Some(path), _) => RunConfig::from_file(path).map_err(|e| format!("--config: {e}"))?,
            (None, Some(path)) => RunConfig::from_file(path).map_err(|e| e.to_string())?,
            (None, None) => RunConfig::default(),
        };
        for s in &self.set {
            cfg = cfg.set(&s.path, &s.value).map_err(|e| format!("--set {}={}: {e}", s.path, s.value))?;
        }
        apply_flags!(cfg, self.model, {
            layers => model.layers, d_model => model.d_model, heads => model.heads, kv_heads => model.kv_heads,
            mlp_hidden => model.mlp_hidden, tie_embeddings => model.tie_embeddings, attention => model.attention,
            dense_first_layers => model.dense_first_layers, dense_last_layers => model.dense_last_layers,
            layer_attention => model.layer_attention, rope_theta => model.rope_theta, token_shift => model.token_shift,
        });
        apply_flags!(cfg, self.train, {
            steps => train.steps, batch => train.batch, seq_len => train.seq_len, lr => train.lr,
            min_lr_ratio => train.min_lr_ratio, warmup => train.warmup, weight_decay => train.weight_decay,
            beta1 => train.beta1, beta2 => train.beta2, grad_clip => train.grad_clip,
            gate_loss_weight => train.gate_loss_weight, eval_every => train.eval_every,
            eval_batches => train.eval_batches, checkpoint_every => train.checkpoint_every,
            log_every => train.log_every, seed => train.seed,
        });
        apply_flags!(cfg, self.data, {
            task => data.task, text => data.text, val_fraction => data.val_fraction, mqar_pairs => data.mqar_pairs,
            mqar_queries => data.mqar_queries, mqar_key_vocab => data.mqar_key_vocab,
            mqar_value_vocab => data.mqar_value_vocab, needle_digits => data.needle_digits,
            needle_depth => data.needle_depth,
        });
        apply_flags!(cfg, self.methods, {
            dense_window => dense.window, moba_block_size => moba.block_size, moba_top_k => moba.top_k,
            nsa_compress_block => nsa.compress_block, nsa_compress_stride => nsa.compress_stride,
            nsa_compress_hidden => nsa.compress_hidden, nsa_select_block => nsa.select_block,
            nsa_top_n => nsa.top_n, nsa_window => nsa.window, nsa_shared_kv => nsa.shared_kv,
            nsa_compressor => nsa.compressor, nsa_forced_initial => nsa.forced_initial,
            nsa_forced_local => nsa.forced_local,
            seer_mode => seer.mode, seer_block_size => seer.block_size, seer_gate_hidden => seer.gate_hidden,
            seer_top_k => seer.top_k, seer_threshold => seer.threshold,
            seer_loss_skip_fraction => seer.loss_skip_fraction, dma_window => dma.window,
            seer_gate_q_pool => seer.gate_q_pool, seer_gate_k_pool => seer.gate_k_pool,
        });
        cfg.validate().map_err(|e| e.to_string())?;
        Ok(cfg)
    }
}

impl TrainArgs {
    /// The configuration of `train`: a resumed run starts from its checkpoint's `config.toml`.
    pub fn run_config(&self) -> Result<RunConfig, String> {
        let base = self.resume.as_ref().map(|dir| dir.join(CONFIG_FILE));
        self.config.resolve(base.as_deref())
    }
}

impl Command {
    /// The subcommand's name, as typed.
    pub fn name(&self) -> &'static str {
        match self {
            Command::Compare(_) => "compare",
            Command::Train(_) => "train",
            Command::Generate(_) => "generate",
            Command::PrintConfig(_) => "print-config",
            Command::Plot(_) => "plot",
            Command::PlotSweep(_) => "plot-sweep",
            Command::DdpCheck(_) => "ddp-check",
        }
    }
}

/// A usage error of `subcommand`, formatted as clap formats its own (message, usage line,
/// `--help` hint; exit status 2).
pub fn usage_error(subcommand: &str, message: impl std::fmt::Display) -> clap::Error {
    let mut cmd = Cli::command();
    cmd.build();
    match cmd.find_subcommand_mut(subcommand) {
        Some(sub) => sub.error(ErrorKind::ValueValidation, message),
        None => cmd.error(ErrorKind::ValueValidation, message),
    }
}

/// The configuration field a typed flag sets, by the flag's argument id (its field name in
/// the structs above): `d_model` is `[model] d_model`, `nsa_top_n` is `[nsa] top_n`.
pub fn config_field_of(arg_id: &str) -> Option<(&'static str, String, Option<toml::Value>)> {
    RunConfig::default_fields().into_iter().find(|(section, key, _)| flag_id(section, key) == arg_id)
}

/// The argument id (and, with `-` for `_`, the long flag) of a configuration field.
pub fn flag_id(section: &str, key: &str) -> String {
    if METHOD_SECTIONS.contains(&section) { format!("{section}_{key}") } else { key.to_string() }
}

fn default_text(v: &toml::Value) -> Option<String> {
    match v {
        toml::Value::String(s) => Some(s.clone()),
        toml::Value::Array(items) if items.is_empty() => None,
        toml::Value::Array(items) => Some(items.iter().filter_map(default_text).collect::<Vec<_>>().join(",")),
        other => Some(other.to_string()),
    }
}

/// Adds to each configuration flag its default (from [`RunConfig::default`], so the help
/// cannot drift) and its `--section.field` alias.
fn annotate_config_flags(cmd: clap::Command) -> clap::Command {
    cmd.mut_args(|arg| {
        let Some((section, key, default)) = config_field_of(arg.get_id().as_str()) else {
            return arg;
        };
        let arg = arg.alias(format!("{section}.{}", key.replace('_', "-")));
        match (default.as_ref().and_then(default_text), arg.get_help().map(ToString::to_string)) {
            (Some(d), Some(help)) => arg.help(format!("{help} [default: {d}]")),
            _ => arg,
        }
    })
}

impl CommandFactory for Cli {
    fn command() -> clap::Command {
        finish_command(Command::augment_subcommands(top_command()))
    }

    fn command_for_update() -> clap::Command {
        finish_command(Command::augment_subcommands_for_update(top_command()))
    }
}

fn top_command() -> clap::Command {
    clap::Command::new("toy-lm").version(env!("CARGO_PKG_VERSION")).subcommand_required(true).arg_required_else_help(true).after_help(
        format!("Backends compiled in: {}. `toy-lm <COMMAND> --help` lists each command's options.", compiled_backends().join(", ")),
    )
}

fn finish_command(cmd: clap::Command) -> clap::Command {
    // Set after the subcommands, whose derive would otherwise take the enum's doc comment.
    let cmd =
        cmd.about("Byte-level LM pretraining with the sparse attention layers of burn-sparse-attn (dense, NSA, MoBA, SeerAttention, DMA)");
    let config_note = "Configuration precedence: defaults < --config FILE < --set < flags. The method \
         sections hold the library's layer configs (MobaAttentionConfig, ...), whose shape (d_model, \
         heads, kv_heads, rope_theta) comes from [model]. Fields printed by `toy-lm print-config` are \
         flags (fields of [model], [train] and [data] without prefix, method sections with it: \
         --moba-top-k 2; --section.field VALUE works too) or reached by --set; optional fields take \
         `none` (the library's default).";
    ["compare", "train", "print-config", "ddp-check"]
        .into_iter()
        .fold(cmd, |cmd, name| cmd.mut_subcommand(name, |sub| annotate_config_flags(sub).after_help(config_note)))
}

impl FromArgMatches for Cli {
    fn from_arg_matches(matches: &ArgMatches) -> Result<Self, clap::Error> {
        Ok(Self { command: Command::from_arg_matches(matches)? })
    }

    fn update_from_arg_matches(&mut self, matches: &ArgMatches) -> Result<(), clap::Error> {
        self.command.update_from_arg_matches(matches)
    }
}

impl Parser for Cli {}

/// A whole number of at least `MIN`.
fn at_least<const MIN: usize>(s: &str) -> Result<usize, String> {
    let n: usize = s.parse().map_err(|_| "expected a whole number".to_string())?;
    if n < MIN { Err(format!("must be at least {MIN}")) } else { Ok(n) }
}

fn existing_file(s: &str) -> Result<PathBuf, String> {
    let path = PathBuf::from(s);
    if path.is_file() {
        Ok(path)
    } else if path.exists() {
        Err("not a file".into())
    } else {
        Err("file not found".into())
    }
}

fn existing_text_file(s: &str) -> Result<String, String> {
    existing_file(s).map(|_| s.to_string())
}

/// A checkpoint folder: exists and holds `config.toml` and `model.bpk` (or, written before
/// `model.bpk`, `model.safetensors`).
fn checkpoint_dir(s: &str) -> Result<PathBuf, String> {
    let dir = PathBuf::from(s);
    if !dir.is_dir() {
        return Err("checkpoint folder not found".into());
    }
    if !dir.join(CONFIG_FILE).is_file() {
        return Err(format!("not a checkpoint folder (no {CONFIG_FILE} in it)"));
    }
    if !dir.join(MODEL_FILE).is_file() && !dir.join(LEGACY_MODEL_FILE).is_file() {
        return Err(format!("not a checkpoint folder (no {MODEL_FILE} in it)"));
    }
    Ok(dir)
}

/// A backend compiled into this binary (`cpu` is `flex`).
fn compiled_device(s: &str) -> Result<String, String> {
    let name = s.to_ascii_lowercase().replace("cpu", "flex");
    let compiled = compiled_backends();
    if compiled.contains(&name.as_str()) {
        return Ok(name);
    }
    if ["flex", "wgpu", "vulkan", "metal", "cuda"].contains(&name.as_str()) {
        Err(format!("not compiled into this build (compiled: {}); rebuild with `--features {name}`", compiled.join(", ")))
    } else {
        Err(format!("unknown backend (expected flex, wgpu, vulkan, metal or cuda; compiled: {})", compiled.join(", ")))
    }
}

/// One entry of `--devices`: `BACKEND` or `BACKEND:INDEX`, of a backend compiled in.
fn device_spec(s: &str) -> Result<DeviceSpec, String> {
    let spec: DeviceSpec = s.parse()?;
    compiled_device(&spec.backend).map_err(|e| format!("`{s}`: {e}"))?;
    Ok(spec)
}

fn dtype_parser() -> impl TypedValueParser<Value = FloatDType> {
    PossibleValuesParser::new(["f32", "bf16", "f16"]).map(|s| parse_dtype(Some(&s)).expect("one of the possible values"))
}

fn parse_set(s: &str) -> Result<SetField, String> {
    let (path, value) = s.split_once('=').ok_or("expected SECTION.KEY=VALUE, e.g. nsa.top_n=2")?;
    let set = SetField { path: path.trim().to_string(), value: value.to_string() };
    // Checked here (name and type) so that a mistake is reported against --set.
    RunConfig::default().set(&set.path, &set.value)?;
    Ok(set)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("toy-lm").chain(args.iter().copied()))
    }

    fn config_of(args: &[&str]) -> RunConfig {
        match parse(args).unwrap_or_else(|e| panic!("{args:?}: {e}")).command {
            Command::Compare(a) => a.config.resolve(None),
            Command::Train(a) => a.run_config(),
            Command::PrintConfig(a) => a.config.resolve(None),
            other => panic!("{other:?} has no configuration"),
        }
        .unwrap_or_else(|e| panic!("{args:?}: {e}"))
    }

    fn error_of(args: &[&str]) -> (ErrorKind, String) {
        let e = parse(args).map(|c| c.command.name()).expect_err("should not parse");
        (e.kind(), e.to_string())
    }

    #[test]
    fn the_command_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn commands_quoted_in_the_docs_still_parse() {
        let quoted = "compare --device flex --dtype bf16 --layers 2 --d-model 512 --heads 8 --kv-heads 2 --batch 1 \
            --eval-every 0 --eval-batches 1 --log-every 1 --moba-block-size 512 --moba-top-k 3 --nsa-compress-block 32 \
            --nsa-compress-stride 16 --nsa-select-block 64 --nsa-top-n 16 --nsa-window 512 --seer-block-size 64 \
            --seer-top-k 16 --dma-window 2048 --steps 8 --methods dense,nsa,moba --seq-len 16384 --rope-theta 500000 \
            --beta1 0.8 --beta2 0.99";
        let args: Vec<&str> = quoted.split_whitespace().collect();
        let Command::Compare(c) = parse(&args).unwrap().command else { panic!("compare") };
        assert_eq!(c.methods, Some(vec![Method::Dense, Method::Nsa, Method::Moba]));
        assert_eq!(c.device.dtype, FloatDType::BF16);
        let cfg = c.config.resolve(None).unwrap();
        assert_eq!((cfg.model.layers, cfg.model.d_model, cfg.model.heads, cfg.model.kv_heads), (2, 512, 8, 2));
        assert_eq!((cfg.train.batch, cfg.train.steps, cfg.train.seq_len, cfg.train.eval_every), (1, 8, 16384, 0));
        assert_eq!((cfg.moba.block_size, cfg.moba.top_k, cfg.nsa.top_n, cfg.nsa.window, cfg.dma.window), (512, 3, 16, 512, 2048));
        assert_eq!((cfg.seer.block_size, cfg.seer.top_k), (64, Some(16)));
        assert_eq!((cfg.model.rope_theta, cfg.train.beta1, cfg.train.beta2), (500000.0, 0.8, 0.99));

        let cfg = config_of(&["train", "--attention", "moba", "--dense-last-layers", "1", "--text", "Cargo.toml", "src/lib.rs"]);
        assert_eq!(cfg.model.attention, Method::Moba);
        assert_eq!(cfg.data.text, vec!["Cargo.toml".to_string(), "src/lib.rs".to_string()]);
        let cfg = config_of(&["train", "--attention", "seer", "--seer-mode", "distill", "--nsa.top-n", "2", "--model.layers=3"]);
        assert_eq!((cfg.seer.mode, cfg.nsa.top_n, cfg.model.layers), (SeerMode::Distill, 2, 3));
        let cfg =
            config_of(&["compare", "--task", "mqar", "--mqar-pairs", "8", "--needle-depth", "-1", "--tie-embeddings", "--layers", "3"]);
        assert_eq!((cfg.data.task, cfg.data.mqar_pairs, cfg.data.needle_depth), (Task::Mqar, 8, -1.0));
        assert!(cfg.model.tie_embeddings);
        assert_eq!(config_of(&["print-config", "--tie-embeddings", "false"]).model.tie_embeddings, false);
        assert!(config_of(&["compare", "--token-shift"]).model.token_shift);
        assert!(!config_of(&["compare"]).model.token_shift);
        assert_eq!(
            config_of(&["print-config", "--layer-attention", "moba,dense"]).model.layer_methods(),
            vec![Method::Moba, Method::Dense]
        );

        let dir = std::env::temp_dir().join(format!("toy-lm-cli-ckpt-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(CONFIG_FILE), "").unwrap();
        std::fs::write(dir.join(MODEL_FILE), "").unwrap();
        let ckpt = dir.to_str().unwrap();
        let args = ["generate", "--checkpoint", ckpt, "--prompt", "pub", "fn", "--tokens", "5", "--top-k", "3"];
        let Command::Generate(g) = parse(&args).unwrap().command else { panic!("generate") };
        std::fs::remove_dir_all(&dir).ok();
        assert_eq!((g.prompt.join(" ").as_str(), g.tokens, g.top_k, g.temperature), ("pub fn", 5, 3, 0.8));
    }

    /// Fields of the library configs that have no typed flag (set them with `--set` or in
    /// the TOML file).
    const SET_ONLY: [&str; 6] = [
        "dense.rope",
        "moba.rope",
        "nsa.rope",
        "seer.gate_kv_head_keys",
        "seer.rope",
        "dma.rope",
    ];

    /// Every field of `print-config` is a `--set` key and, except [`SET_ONLY`], a typed flag
    /// (named by [`flag_id`]), and each actually sets its field.
    #[test]
    fn every_config_field_is_reachable_by_flag_and_by_set() {
        let text = concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml");
        let defaults = toml::Table::try_from(RunConfig::default()).unwrap();
        let mut cmd = Cli::command();
        let print_config = cmd.find_subcommand_mut("print-config").unwrap();
        let mut set_only = Vec::new();
        for (section, key, default) in RunConfig::default_fields() {
            let value = match (&default, key.as_str()) {
                (None, _) => "5".into(),
                (Some(toml::Value::Integer(i)), _) => (i + 1).to_string(),
                (Some(toml::Value::Float(f)), _) => ((f + 0.2).abs() / 2.0).to_string(),
                (Some(toml::Value::Boolean(b)), _) => (!b).to_string(),
                (_, "attention") => "nsa".into(),
                (_, "task") => "mqar".into(),
                (_, "mode") => "distill".into(),
                (_, "text") => text.into(),
                (_, "layer_attention") => "nsa,dense".into(),
                (_, "compressor") => "head-linear".into(),
                (_, "gate_q_pool") => "Max".into(),
                (_, "gate_k_pool") => "avg,min".into(),
                other => panic!("no test value for {section}.{key} = {other:?}"),
            };
            let id = flag_id(section, &key);
            let flag = format!("--{}", id.replace('_', "-"));
            let set = format!("{section}.{key}={value}");
            let mut ways = vec![vec!["print-config", "--set", set.as_str()]];
            if print_config.get_arguments().any(|a| a.get_id().as_str() == id) {
                ways.push(vec!["print-config", flag.as_str(), value.as_str()]);
            } else {
                set_only.push(format!("{section}.{key}"));
            }
            for args in ways {
                let cfg = toml::Table::try_from(config_of(&args)).unwrap();
                assert_ne!(cfg[section].get(&key), defaults[section].get(&key), "{args:?} left {section}.{key} at its default");
            }
        }
        assert_eq!(set_only, SET_ONLY, "fields without a typed flag");
    }

    /// The flags of `Option` fields take `none`, and `0` (their old spelling of it).
    #[test]
    fn optional_flags_take_none_and_zero() {
        let cfg = config_of(&["print-config", "--seer-top-k", "4", "--nsa-compress-hidden", "48", "--dense-window", "32"]);
        assert_eq!((cfg.seer.top_k, cfg.nsa.compress_hidden, cfg.dense.window), (Some(4), Some(48), Some(32)));
        let cfg = config_of(&["print-config", "--seer-top-k", "0", "--nsa-compress-hidden", "none", "--dense-window", "0"]);
        assert_eq!((cfg.seer.top_k, cfg.nsa.compress_hidden, cfg.dense.window), (None, None, None));
        let (kind, text) = error_of(&["compare", "--seer-top-k", "some"]);
        assert_eq!(kind, ErrorKind::ValueValidation);
        assert!(text.contains("--seer-top-k") && text.contains("`none`"), "{text}");
    }

    /// NSA's compressor and forced blocks from typed flags; a bad compressor name is named.
    #[test]
    fn nsa_compressor_and_forced_blocks_flags() {
        let cfg = config_of(&["print-config", "--nsa-compressor", "mean-pos", "--nsa-forced-initial", "0", "--nsa-forced-local", "1"]);
        assert_eq!((cfg.nsa.compressor, cfg.nsa.forced_initial, cfg.nsa.forced_local), (CompressorKind::MeanPos, 0, 1));
        let (kind, text) = error_of(&["compare", "--nsa-compressor", "conv"]);
        assert_eq!(kind, ErrorKind::InvalidValue);
        assert!(text.contains("--nsa-compressor") && text.contains("head-linear"), "{text}");
    }

    /// SeerAttention's gate pools from comma lists; a bad pool is named.
    #[test]
    fn seer_gate_pool_flags() {
        let cfg = config_of(&["print-config", "--seer-gate-q-pool", "max,avg", "--seer-gate-k-pool", "min"]);
        assert_eq!((cfg.seer.gate_q_pool.clone(), cfg.seer.gate_k_pool.clone()), (vec![GatePool::Max, GatePool::Avg], vec![GatePool::Min]));
        let (kind, text) = error_of(&["compare", "--seer-gate-k-pool", "max,median"]);
        assert_eq!(kind, ErrorKind::InvalidValue);
        assert!(text.contains("--seer-gate-k-pool") && text.contains("median"), "{text}");
    }

    /// `print-config` output read back by `--config` is the same configuration, with `Option`
    /// fields set and unset.
    #[test]
    fn print_config_round_trips_through_config() {
        let dir = std::env::temp_dir().join(format!("toy-lm-cli-roundtrip-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for flags in [
            &["--d-model", "48", "--heads", "3", "--seer-mode", "distill", "--nsa-compress-hidden", "40"][..],
            &["--seer-top-k", "0", "--dense-window", "16", "--set", "nsa.compressor=MeanPos", "--set", "seer.gate_q_pool=Max"],
        ] {
            let cfg = config_of(&[&["print-config"], flags].concat());
            let file = dir.join("printed.toml");
            std::fs::write(&file, cfg.to_toml()).unwrap();
            assert_eq!(config_of(&["print-config", "--config", file.to_str().unwrap()]), cfg, "{flags:?}");
        }
        std::fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn precedence_is_defaults_then_file_then_set_then_flags() {
        let dir = std::env::temp_dir().join(format!("toy-lm-cli-precedence-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("run.toml");
        std::fs::write(&file, "[model]\nd_model = 48\nheads = 3\n[train]\nsteps = 7\nlr = 0.01\n").unwrap();
        let file = file.to_str().unwrap();
        let cfg = config_of(&["print-config", "--config", file, "--set", "train.steps=9", "--set", "train.lr=0.02", "--lr", "0.03"]);
        assert_eq!(cfg.model.d_model, 48, "file over default");
        assert_eq!(cfg.model.heads, 3, "file over default");
        assert_eq!(cfg.model.layers, RunConfig::default().model.layers, "default where nothing is said");
        assert_eq!(cfg.train.steps, 9, "--set over file");
        assert_eq!(cfg.train.lr, 0.03, "flag over --set and file");
        std::fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn bad_input_is_a_clap_error_naming_the_flag() {
        let cases: &[(&[&str], ErrorKind, &[&str])] = &[
            (&["compare", "--bogus", "1"], ErrorKind::UnknownArgument, &["--bogus"]),
            (&["compare", "--step", "3"], ErrorKind::UnknownArgument, &["--step", "--steps"]),
            (&["compare", "--steps", "abc"], ErrorKind::ValueValidation, &["--steps", "abc"]),
            (&["compare", "--steps", "0"], ErrorKind::ValueValidation, &["--steps", "at least 1"]),
            (&["compare", "--dtype", "f64"], ErrorKind::InvalidValue, &["--dtype", "f64", "bf16"]),
            (&["compare", "--methods", "dense,foo"], ErrorKind::InvalidValue, &["--methods", "foo", "moba"]),
            (&["train", "--attention", "sparse"], ErrorKind::InvalidValue, &["--attention", "sparse"]),
            (&["train", "--seer-mode", "fast"], ErrorKind::InvalidValue, &["--seer-mode", "distill"]),
            (&["train", "--tie-embeddings", "yes"], ErrorKind::InvalidValue, &["--tie-embeddings", "yes"]),
            (&["train", "--lr", "fast"], ErrorKind::ValueValidation, &["--lr", "fast"]),
            (&["train", "--device", "tpu"], ErrorKind::ValueValidation, &["--device", "tpu", "unknown backend"]),
            (&["compare", "--config", "nope.toml"], ErrorKind::ValueValidation, &["--config", "nope.toml", "file not found"]),
            (&["compare", "--text", "nope.txt"], ErrorKind::ValueValidation, &["--text", "nope.txt", "file not found"]),
            (&["train", "--resume", "nope"], ErrorKind::ValueValidation, &["--resume", "nope", "not found"]),
            (&["generate", "--checkpoint", "nope"], ErrorKind::ValueValidation, &["--checkpoint", "nope", "not found"]),
            (&["generate", "--checkpoint", "src"], ErrorKind::ValueValidation, &["--checkpoint", "config.toml"]),
            (&["generate"], ErrorKind::MissingRequiredArgument, &["--checkpoint"]),
            (&["generate", "--tokens", "-3"], ErrorKind::UnknownArgument, &["-3"]),
            (&["compare", "--set", "nsa.top_n"], ErrorKind::ValueValidation, &["--set", "SECTION.KEY=VALUE"]),
            (&["compare", "--set", "nsa.top_m=2"], ErrorKind::ValueValidation, &["--set", "no field `top_m` in [nsa]"]),
            (&["compare", "--set", "train.steps=x"], ErrorKind::ValueValidation, &["--set", "train.steps takes a whole number"]),
            (&["compare", "--set", "model.attention=foo"], ErrorKind::ValueValidation, &["--set", "foo"]),
            (&["fly"], ErrorKind::InvalidSubcommand, &["fly"]),
            (&["compare", "extra"], ErrorKind::UnknownArgument, &["extra"]),
        ];
        for (args, kind, needles) in cases {
            let (got, text) = error_of(args);
            assert_eq!(got, *kind, "{args:?}: {text}");
            for needle in *needles {
                assert!(text.contains(needle), "{args:?}: `{needle}` missing from:\n{text}");
            }
        }
        // Help and version are "errors" too in clap's API, of their own kinds.
        assert_eq!(error_of(&["--help"]).0, ErrorKind::DisplayHelp);
        assert_eq!(error_of(&["compare", "--help"]).0, ErrorKind::DisplayHelp);
        assert_eq!(error_of(&[]).0, ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand);
    }

    #[test]
    fn cross_field_and_file_errors_name_their_source() {
        let resolve = |args: &[&str]| match parse(args).unwrap().command {
            Command::PrintConfig(a) => a.config.resolve(None).unwrap_err(),
            _ => unreachable!(),
        };
        assert!(resolve(&["print-config", "--layers", "2", "--layer-attention", "moba"]).contains("--layer-attention"));
        assert!(resolve(&["print-config", "--val-fraction", "1.5"]).contains("--val-fraction"));
        let dir = std::env::temp_dir().join(format!("toy-lm-cli-badfile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("bad.toml");
        std::fs::write(&file, "[model]\nd_modle = 3\n").unwrap();
        let err = resolve(&["print-config", "--config", file.to_str().unwrap()]);
        assert!(err.contains("--config") && err.contains("d_modle"), "{err}");
        std::fs::remove_dir_all(dir).ok();
        let e = usage_error("compare", "boom");
        assert!(e.to_string().contains("boom") && e.to_string().contains("toy-lm compare"), "{e}");
    }

    #[test]
    fn help_shows_defaults_and_every_command() {
        let mut cmd = Cli::command();
        let top = cmd.render_help().to_string();
        for name in ["compare", "train", "generate", "print-config", "plot"] {
            assert!(top.contains(name), "{top}");
        }
        let compare = cmd.find_subcommand_mut("compare").unwrap().render_help().to_string();
        for needle in
            ["--d-model <N>", "[default: 64]", "--moba-top-k", "--set <SECTION.KEY=VALUE>", "--config <FILE.toml>", "--rope-theta"]
        {
            assert!(compare.contains(needle), "`{needle}` missing from:\n{compare}");
        }
    }
}
