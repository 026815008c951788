//! toy-lm: byte-level language-model pretraining with the attention layers of
//! `burn-sparse-attn` (dense, NSA, MoBA, SeerAttention, dynamic-mask attention).
//!
//! ```text
//! cargo run -p toy-lm --release -- compare --out runs/compare
//! cargo run -p toy-lm --release -- train --attention moba --dense-last-layers 1 --out runs/moba
//! cargo run -p toy-lm --release -- generate --checkpoint runs/moba/checkpoint --prompt "fn main"
//! ```
//!
//! Run `toy-lm help` for every command and option.

use std::path::PathBuf;

use toy_lm::AppResult;
use toy_lm::compare::{CompareOptions, compare, markdown_table};
use toy_lm::config::{Method, RunConfig};
use toy_lm::device::{compiled_backends, parse_dtype, select_device, select_device_with};
use toy_lm::generate::{SampleOptions, generate, load_model};
use toy_lm::train::{CONFIG_FILE, RunOptions, train};

const HELP: &str = "\
toy-lm: byte-level LM pretraining with sparse attention (burn-sparse-attn)

USAGE:
  toy-lm compare  [--methods dense,nsa,moba,seer,dma] [--out DIR] [OPTIONS]
  toy-lm train    [--out DIR] [--resume CKPT_DIR] [--init-from CKPT_DIR] [OPTIONS]
  toy-lm generate --checkpoint CKPT_DIR [--prompt TEXT] [--tokens N] [--temperature T] [--top-k K] [--seed S]
  toy-lm print-config      print the default configuration (every field below) as TOML
  toy-lm help

COMMON:
  --device NAME        flex | wgpu | vulkan | metal | cuda (those compiled in; default: first compiled)
  --dtype T            f32 | bf16 | f16: precision of the whole model (default f32; bf16/f16 take
                       the CUDA kernels' fastest paths; results.json records it)
  --config FILE.toml   start from this configuration (sections model/train/data/dense/moba/nsa/seer/dma)

OPTIONS (any field of the configuration; sections model/train/data need no prefix):
  --attention M        dense | nsa | moba | seer | dma            (default dense; compare sets it per method)
  --dense-last-layers N / --dense-first-layers N  keep N dense blocks (MoBA recipe: --dense-last-layers 1)
  --layer-attention L  explicit per-block list, e.g. moba,moba,dense
  --layers N --d-model N --heads N --kv-heads N --mlp-hidden N --tie-embeddings BOOL
  --steps N --batch N --seq-len N --lr X --warmup N --min-lr-ratio X --weight-decay X --grad-clip X
  --eval-every N --eval-batches N --checkpoint-every N --log-every N --seed N --gate-loss-weight X
  --task lm|mqar|needle --text FILE... --val-fraction X
  --mqar-pairs N --mqar-queries N --mqar-key-vocab N --mqar-value-vocab N --needle-digits N --needle-depth X
  --moba-block-size N --moba-top-k N
  --nsa-compress-block N --nsa-compress-stride N --nsa-compress-hidden N --nsa-select-block N
  --nsa-top-n N --nsa-window N --nsa-shared-kv BOOL
  --seer-mode sparse|distill --seer-block-size N --seer-gate-hidden N --seer-top-k N
  --seer-threshold X --seer-loss-skip-fraction X
  --dma-window N --dense-window N
  (`--section.field VALUE` works too, e.g. --nsa.top-n 2)

SEER MODES:
  --seer-mode sparse   train everything; attention output is block-sparse over the gate's choice
  --seer-mode distill  train only the gates of a frozen dense model: --init-from a dense checkpoint
                       (compare does this automatically from its dense run when dense comes first)
";

/// Flags that are not configuration fields.
const COMMAND_FLAGS: [&str; 12] =
    ["config", "out", "resume", "init-from", "device", "dtype", "methods", "checkpoint", "prompt", "tokens", "temperature", "help"];

struct Args {
    command: String,
    flags: Vec<(String, Vec<String>)>,
}

impl Args {
    fn parse(argv: &[String]) -> AppResult<Self> {
        let mut it = argv.iter().peekable();
        let command = match it.peek() {
            Some(a) if !a.starts_with("--") => it.next().unwrap().clone(),
            _ => "help".to_string(),
        };
        let mut flags: Vec<(String, Vec<String>)> = Vec::new();
        while let Some(arg) = it.next() {
            let Some(flag) = arg.strip_prefix("--") else {
                return Err(format!("unexpected argument `{arg}` (options start with --)").into());
            };
            let (name, mut values) = match flag.split_once('=') {
                Some((n, v)) => (n.to_string(), vec![v.to_string()]),
                None => (flag.to_string(), Vec::new()),
            };
            while let Some(v) = it.peek() {
                if v.starts_with("--") {
                    break;
                }
                values.push(it.next().unwrap().clone());
            }
            flags.push((name, values));
        }
        Ok(Self { command, flags })
    }

    fn take(&mut self, name: &str) -> Option<Vec<String>> {
        let pos = self.flags.iter().rposition(|(n, _)| n == name)?;
        Some(self.flags.remove(pos).1)
    }

    fn take_one(&mut self, name: &str) -> AppResult<Option<String>> {
        match self.take(name) {
            None => Ok(None),
            Some(v) if v.len() == 1 => Ok(Some(v[0].clone())),
            Some(v) => Err(format!("--{name} takes one value, got {}", v.len()).into()),
        }
    }

    fn take_parsed<T: std::str::FromStr>(&mut self, name: &str, default: T) -> AppResult<T> {
        match self.take_one(name)? {
            None => Ok(default),
            Some(v) => v.parse().map_err(|_| format!("--{name}: cannot parse `{v}`").into()),
        }
    }

    /// Base configuration (checkpoint's when resuming, else `--config` or defaults) plus the
    /// remaining flags as overrides.
    fn run_config(&mut self, resume: Option<&PathBuf>) -> AppResult<RunConfig> {
        let file = self.take_one("config")?;
        let base = match (resume, file) {
            (_, Some(path)) => RunConfig::from_file(path.as_ref())?,
            (Some(dir), None) => RunConfig::from_file(&dir.join(CONFIG_FILE))?,
            (None, None) => RunConfig::default(),
        };
        if let Some((flag, _)) = self.flags.iter().find(|(n, _)| COMMAND_FLAGS.contains(&n.as_str())) {
            return Err(format!("--{flag} is not an option of `{}`", self.command).into());
        }
        base.with_overrides(&self.flags)
    }
}

fn main() {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    if let Err(e) = run(&argv) {
        eprintln!("error: {e}");
        std::process::exit(2);
    }
}

fn run(argv: &[String]) -> AppResult<()> {
    let mut args = Args::parse(argv)?;
    if args.take("help").is_some() || args.command == "help" {
        print!("{HELP}");
        println!("\nbackends compiled in: {}", compiled_backends().join(", "));
        return Ok(());
    }
    let command_line = std::iter::once("toy-lm".to_string())
        .chain(argv.iter().map(|a| if a.contains(' ') || a.is_empty() { format!("{a:?}") } else { a.clone() }))
        .collect::<Vec<_>>()
        .join(" ");
    match args.command.as_str() {
        "print-config" => {
            let cfg = args.run_config(None)?;
            print!("{}", cfg.to_toml());
        }
        "train" => {
            let device_name = args.take_one("device")?;
            let dtype = parse_dtype(args.take_one("dtype")?.as_deref())?;
            let (backend, device) = select_device_with(device_name.as_deref(), dtype)?;
            let out = PathBuf::from(args.take_one("out")?.unwrap_or_else(|| "runs/train".into()));
            let resume = args.take_one("resume")?.map(PathBuf::from);
            let init_from = args.take_one("init-from")?.map(PathBuf::from);
            let cfg = args.run_config(resume.as_ref())?;
            println!("toy-lm train on {backend} ({device:?}): {}", cfg.label());
            std::fs::create_dir_all(&out)?;
            std::fs::write(out.join("command.txt"), format!("{command_line}\n"))?;
            cfg.save(&out.join("config.toml"))?;
            let opts = RunOptions { device, out: out.clone(), resume, init_from, log_prefix: String::new() };
            let r = train(&cfg, &opts)?;
            println!(
                "done: final train loss {:.4}, val loss {:.4}, val accuracy {:.1}%, {:.0} tokens/s, {:.1} s; checkpoint {}",
                r.final_train_loss,
                r.val_loss,
                100.0 * r.val_accuracy,
                r.tokens_per_sec,
                r.wall_time_s,
                r.checkpoint.display()
            );
        }
        "compare" => {
            let device_name = args.take_one("device")?;
            let dtype = parse_dtype(args.take_one("dtype")?.as_deref())?;
            let (backend, device) = select_device_with(device_name.as_deref(), dtype)?;
            let out = PathBuf::from(args.take_one("out")?.unwrap_or_else(|| "runs/compare".into()));
            let methods = match args.take("methods") {
                Some(v) => Method::parse_list(&v.join(","))?,
                None => Method::ALL.to_vec(),
            };
            let cfg = args.run_config(None)?;
            println!(
                "toy-lm compare on {backend} ({device:?}, {dtype:?}): {} | {} steps, batch {}, seq {}, seed {}",
                methods.iter().map(|m| m.name()).collect::<Vec<_>>().join(", "),
                cfg.train.steps,
                cfg.train.batch,
                cfg.train.seq_len,
                cfg.train.seed
            );
            let opts = CompareOptions { methods, out: out.clone(), backend, device, dtype: format!("{dtype:?}").to_ascii_lowercase(), command: command_line };
            let results = compare(&cfg, &opts)?;
            println!("\n{}", markdown_table(cfg.data.task, &results.runs));
            println!(
                "total wall time {:.1} s; wrote {}/results.md, results.json, loss.png, command.txt, config.toml",
                results.total_wall_time_s,
                out.display()
            );
        }
        "generate" => {
            let (_, device) = select_device(args.take_one("device")?.as_deref())?;
            let dir = PathBuf::from(args.take_one("checkpoint")?.ok_or("generate needs --checkpoint DIR")?);
            let prompt = args.take("prompt").map(|v| v.join(" ")).unwrap_or_default();
            let opts = SampleOptions {
                tokens: args.take_parsed("tokens", 200)?,
                temperature: args.take_parsed("temperature", 0.8)?,
                top_k: args.take_parsed("top-k", 0)?,
                seed: args.take_parsed("seed", 0)?,
            };
            if let Some((flag, _)) = args.flags.first() {
                return Err(format!("--{flag} is not an option of `generate`").into());
            }
            let (model, cfg) = load_model(&dir, &device)?;
            print!("{prompt}");
            generate(&model, &cfg, &prompt, &opts, &device)?;
        }
        other => return Err(format!("unknown command `{other}` (try `toy-lm help`)").into()),
    }
    Ok(())
}
