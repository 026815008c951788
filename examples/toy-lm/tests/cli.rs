//! The command line end to end: the built `toy-lm` binary on bad input (clear clap-style
//! errors naming the flag, exit status 2, no panic) and on a tiny real `compare` (its table,
//! results and figures), then `plot` on what it wrote.

use std::path::PathBuf;
use std::process::{Command, Output};

fn toy_lm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_toy-lm")).args(args).output().expect("the toy-lm binary runs")
}

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("toy-lm-cli-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Runs `args`, expects a usage error (status 2) whose message contains every needle.
fn fails_with(args: &[&str], needles: &[&str]) {
    let out = toy_lm(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{args:?}: status {:?}, stderr:\n{stderr}", out.status);
    assert!(stderr.starts_with("error: "), "{args:?}: {stderr}");
    assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    for needle in needles {
        assert!(stderr.contains(needle), "{args:?}: `{needle}` missing from:\n{stderr}");
    }
}

#[test]
fn missing_files_and_bad_values_are_clear_errors() {
    fails_with(&["compare", "--config", "nope.toml"], &["--config", "nope.toml", "file not found"]);
    fails_with(&["train", "--text", "nope.txt"], &["--text", "nope.txt", "file not found"]);
    fails_with(&["generate", "--checkpoint", "nope"], &["--checkpoint", "nope", "not found"]);
    fails_with(&["train", "--resume", "nope"], &["--resume", "nope"]);
    fails_with(&["plot", "nope.json"], &["nope.json", "file not found"]);
    fails_with(&["compare", "--bogus", "1"], &["--bogus"]);
    fails_with(&["compare", "--steps", "abc"], &["--steps", "abc"]);
    fails_with(&["compare", "--dtype", "f64"], &["--dtype", "f64", "possible values: f32, bf16, f16"]);
    fails_with(&["compare", "--methods", "dense,foo"], &["--methods", "foo", "possible values"]);
    fails_with(&["print-config", "--layers", "2", "--layer-attention", "moba"], &["--layer-attention", "toy-lm print-config"]);

    let dir = tmp("bad-config");
    let file = dir.join("bad.toml");
    std::fs::write(&file, "[train]\nstesp = 3\n").unwrap();
    fails_with(&["print-config", "--config", file.to_str().unwrap()], &["--config", "bad.toml", "stesp"]);
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn help_and_print_config_succeed() {
    for args in [&["--help"][..], &["compare", "--help"], &["help", "train"], &["generate", "--help"]] {
        let out = toy_lm(args);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        assert!(stdout.contains("Usage: toy-lm"), "{args:?}: {stdout}");
    }
    let out = toy_lm(&["print-config", "--nsa-top-n", "2", "--set", "moba.top_k=5", "--tie-embeddings", "false"]);
    let toml = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    for line in ["top_n = 2", "top_k = 5", "tie_embeddings = false"] {
        assert!(toml.lines().any(|l| l == line), "`{line}` missing from:\n{toml}");
    }
}

#[test]
fn a_tiny_compare_writes_its_table_results_and_figures() {
    let out_dir = tmp("compare");
    let out_arg = out_dir.to_str().unwrap();
    let args = [
        "compare",
        "--methods",
        "dense,moba",
        "--steps",
        "3",
        "--seq-len",
        "64",
        "--d-model",
        "32",
        "--heads",
        "2",
        "--kv-heads",
        "1",
        "--layers",
        "1",
        "--batch",
        "2",
        "--eval-every",
        "2",
        "--eval-batches",
        "1",
        "--moba-block-size",
        "16",
        "--out",
        out_arg,
    ];
    let out = toy_lm(&args);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}\n{}", stdout, String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("| dense |") && stdout.contains("| moba |"), "{stdout}");
    for file in ["results.md", "results.json", "loss.svg", "speed.svg", "command.txt", "config.toml"] {
        assert!(out_dir.join(file).is_file(), "{file} not written");
    }
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out_dir.join("results.json")).unwrap()).unwrap();
    let steps: Vec<u64> = json["runs"][0]["val_curve"].as_array().unwrap().iter().map(|p| p["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, vec![2, 3], "validation every 2 steps and at the end");
    let md = std::fs::read_to_string(out_dir.join("results.md")).unwrap();
    assert!(md.contains("![training and validation loss](loss.svg)"), "{md}");
    assert!(std::fs::read_to_string(out_dir.join("loss.svg")).unwrap().contains("moba"));

    // `plot` redraws the figures from results.json alone.
    let redraw = tmp("plot");
    let results = out_dir.join("results.json");
    let out = toy_lm(&["plot", results.to_str().unwrap(), "--out", redraw.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for file in ["loss.svg", "speed.svg"] {
        assert!(redraw.join(file).is_file(), "plot did not write {file}");
    }
    fails_with(&["plot", out_dir.join("config.toml").to_str().unwrap()], &["not the results.json"]);
    std::fs::remove_dir_all(out_dir).ok();
    std::fs::remove_dir_all(redraw).ok();
}
