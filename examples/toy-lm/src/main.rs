//! toy-lm: byte-level language-model pretraining with the attention layers of
//! `burn-sparse-attn` (dense, NSA, MoBA, SeerAttention, dynamic-mask attention).
//!
//! ```text
//! cargo run -p toy-lm --release -- compare --out runs/compare
//! cargo run -p toy-lm --release -- train --attention moba --dense-last-layers 1 --out runs/moba
//! cargo run -p toy-lm --release -- generate --checkpoint runs/moba/checkpoint --prompt "fn main"
//! ```
//!
//! Run `toy-lm --help` (or `toy-lm <COMMAND> --help`) for every command and option; the
//! command line is defined in `toy_lm::cli`.

use clap::Parser;
use toy_lm::AppResult;
use toy_lm::cli::{Cli, Command, usage_error};
use toy_lm::compare::{CompareOptions, CompareResults, LOSS_FIGURE, SPEED_FIGURE, compare, markdown_table, write_figures};
use toy_lm::config::Method;
use toy_lm::ddp::ddp_check;
use toy_lm::device::{check_device_list, select_device, select_device_with, select_devices};
use toy_lm::generate::{SampleOptions, generate, load_model};
use toy_lm::plot::{sweep_chart, sweep_from_rows};
use toy_lm::train::{RunOptions, train};

fn main() {
    // Bad flags and values exit here with clap's message and status 2.
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        match e.downcast::<clap::Error>() {
            Ok(usage) => usage.exit(),
            Err(e) => {
                eprintln!("error: {e}");
                std::process::exit(1);
            }
        }
    }
}

/// The command line as typed, for `command.txt`.
fn command_line() -> String {
    std::iter::once("toy-lm".to_string())
        .chain(std::env::args().skip(1).map(|a| if a.contains(' ') || a.is_empty() { format!("{a:?}") } else { a }))
        .collect::<Vec<_>>()
        .join(" ")
}

fn run(cli: Cli) -> AppResult<()> {
    let sub = cli.command.name();
    // Configuration errors (a bad --config file, --set, or fields that do not fit together)
    // are usage errors of the subcommand.
    let usage = |message: String| usage_error(sub, message);
    match cli.command {
        Command::PrintConfig(args) => {
            let cfg = args.config.resolve(None).map_err(usage)?;
            print!("{}", cfg.to_toml());
        }
        Command::Train(args) => {
            let cfg = args.run_config().map_err(usage)?;
            let dtype = args.device.dtype;
            let (backend, devices) = if args.devices.is_empty() {
                let (backend, device) = select_device_with(args.device.device.as_deref(), dtype)?;
                (backend, vec![device])
            } else {
                // `--devices`: checked against --device and --batch before any device opens.
                check_device_list(args.device.device.as_deref(), &args.devices, cfg.train.batch).map_err(usage)?;
                select_devices(&args.devices, dtype).map_err(usage)?
            };
            let device = devices[0].clone();
            match devices.len() {
                1 => println!("toy-lm train on {backend} ({device:?}): {}", cfg.label()),
                n => println!("toy-lm train on {n} {backend} devices ({devices:?}), data-parallel: {}", cfg.label()),
            }
            let out = args.out.clone();
            std::fs::create_dir_all(&out)?;
            std::fs::write(out.join("command.txt"), format!("{}\n", command_line()))?;
            cfg.save(&out.join("config.toml"))?;
            let devices = if devices.len() > 1 { devices } else { Vec::new() };
            let opts = RunOptions { device, devices, out, resume: args.resume, init_from: args.init_from, log_prefix: String::new() };
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
        Command::DdpCheck(args) => {
            let cfg = args.config.resolve(None).map_err(usage)?;
            check_device_list(None, &args.devices, cfg.train.batch).map_err(usage)?;
            if args.devices.len() < 2 {
                return Err(usage("--devices: ddp-check compares one device with several: list at least two".into()).into());
            }
            let (backend, devices) = select_devices(&args.devices, args.dtype).map_err(usage)?;
            println!("toy-lm ddp-check on {backend}: {} | {} steps, global batch {}, seq {}", cfg.label(), cfg.train.steps, cfg.train.batch, cfg.train.seq_len);
            let c = ddp_check(&cfg, &devices, &args.out)?;
            let pass = c.passes(args.tolerance);
            println!(
                "ddp-check: {} steps | step 1 loss {:.6} vs {:.6}, grad norm {:.6} vs {:.6} (1 device vs {}) | \
                 max rel diff: loss {:.2e}, grad norm {:.2e} | final params: rel L2 {:.2e}, max abs {:.2e} | \
                 tokens/s {:.0} vs {:.0} ({:.2}x) | tolerance {:.1e}: {}",
                c.steps,
                c.first_step[0].0,
                c.first_step[1].0,
                c.first_step[0].1,
                c.first_step[1].1,
                devices.len(),
                c.loss_rel,
                c.grad_norm_rel,
                c.params_rel_l2,
                c.params_max_abs,
                c.tokens_per_sec[0],
                c.tokens_per_sec[1],
                c.tokens_per_sec[1] / c.tokens_per_sec[0].max(1e-9),
                args.tolerance,
                if pass { "PASS" } else { "FAIL" }
            );
            if !pass {
                return Err(format!("ddp-check: the data-parallel run differs from the single-device run by more than {}", args.tolerance).into());
            }
        }
        Command::Compare(args) => {
            let cfg = args.config.resolve(None).map_err(usage)?;
            let dtype = args.device.dtype;
            let (backend, device) = select_device_with(args.device.device.as_deref(), dtype)?;
            let methods = args.methods.unwrap_or_else(|| Method::ALL.to_vec());
            println!(
                "toy-lm compare on {backend} ({device:?}, {dtype:?}): {} | {} steps, batch {}, seq {}, seed {}",
                methods.iter().map(|m| m.name()).collect::<Vec<_>>().join(", "),
                cfg.train.steps,
                cfg.train.batch,
                cfg.train.seq_len,
                cfg.train.seed
            );
            let out = args.out;
            let dtype = format!("{dtype:?}").to_ascii_lowercase();
            let opts = CompareOptions { methods, out: out.clone(), backend, device, dtype, command: command_line() };
            let results = compare(&cfg, &opts)?;
            println!("\n{}", markdown_table(cfg.data.task, &results.runs));
            println!(
                "total wall time {:.1} s; wrote {}/results.md, results.json, {LOSS_FIGURE}, {SPEED_FIGURE}, command.txt, config.toml",
                results.total_wall_time_s,
                out.display()
            );
        }
        Command::Generate(args) => {
            let (_, device) = select_device(args.device.as_deref())?;
            let (model, cfg) = load_model(&args.checkpoint, &device)?;
            let prompt = args.prompt.join(" ");
            let opts = SampleOptions { tokens: args.tokens, temperature: args.temperature, top_k: args.top_k, seed: args.seed };
            print!("{prompt}");
            generate(&model, &cfg, &prompt, &opts, &device)?;
        }
        Command::Plot(args) => {
            let text = std::fs::read_to_string(&args.results).map_err(|e| format!("cannot read {}: {e}", args.results.display()))?;
            let results: CompareResults = serde_json::from_str(&text)
                .map_err(|e| usage(format!("{} is not the results.json of `toy-lm compare`: {e}", args.results.display())))?;
            let out = args.out.unwrap_or_else(|| args.results.parent().map(|p| p.to_path_buf()).unwrap_or_default());
            std::fs::create_dir_all(&out)?;
            write_figures(&results, &out)?;
            println!("wrote {}, {}", out.join(LOSS_FIGURE).display(), out.join(SPEED_FIGURE).display());
        }
        Command::PlotSweep(args) => {
            let text = std::fs::read_to_string(&args.rows).map_err(|e| format!("cannot read {}: {e}", args.rows.display()))?;
            let (speed, memory) = sweep_from_rows(&text, &args.session).map_err(|e| usage(format!("{}: {e}", args.rows.display())))?;
            let out = args.out.unwrap_or_else(|| args.rows.parent().map(|p| p.to_path_buf()).unwrap_or_default());
            std::fs::create_dir_all(&out)?;
            let (speed_svg, memory_svg) = (out.join("sweep-speed.svg"), out.join("sweep-memory.svg"));
            sweep_chart(&speed_svg, &format!("{}: tokens/s ({})", args.title, args.session), "training tokens/s", &speed)?;
            sweep_chart(&memory_svg, &format!("{}: peak memory ({})", args.title, args.session), "peak device memory (MiB)", &memory)?;
            println!("wrote {}, {}", speed_svg.display(), memory_svg.display());
        }
    }
    Ok(())
}
