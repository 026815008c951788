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

/// `--devices` (data-parallel training): bad lists are usage errors naming the flag, checked
/// before any device opens; several devices need CUDA. Runs on any build (the cases that need a
/// backend this build lacks check that backend's "not compiled" error instead).
#[test]
fn devices_flag_errors_name_the_flag() {
    // Syntax, and backends not compiled in.
    fails_with(&["train", "--devices", "cuda:x"], &["--devices", "cuda:x", "BACKEND:INDEX"]);
    fails_with(&["train", "--devices", "tpu:0"], &["--devices", "tpu:0", "unknown backend"]);
    if !cfg!(feature = "cuda") {
        fails_with(&["train", "--devices", "cuda:0,cuda:1"], &["--devices", "cuda:0", "not compiled"]);
    }
    // Lists of flex devices: a device twice, a batch that does not split, several devices of a
    // backend without collectives, an index that does not exist.
    fails_with(&["train", "--devices", "flex,cpu:0"], &["--devices flex:0,flex:0", "twice"]);
    fails_with(&["train", "--devices", "flex:0,flex:1", "--batch", "3"], &["--batch 3", "--devices flex:0,flex:1", "multiple of the device count"]);
    fails_with(&["train", "--devices", "flex:0,flex:1", "--batch", "4"], &["--devices flex:0,flex:1", "needs CUDA devices", "all-reduce"]);
    fails_with(&["train", "--devices", "flex:1"], &["--devices flex:1", "no such device"]);
    fails_with(&["train", "--device", "flex", "--devices", "flex:0,flex:1", "--batch", "4"], &["needs CUDA devices"]);
    // ddp-check (hidden) compares one device with several.
    fails_with(&["ddp-check", "--devices", "flex"], &["--devices", "at least two"]);
    fails_with(&["ddp-check", "--devices", "flex:0,flex:1", "--batch", "5"], &["--batch 5", "multiple of the device count"]);
    // Mixing backends, and --devices against --device: with a second backend compiled in.
    if cfg!(feature = "wgpu") {
        fails_with(&["train", "--devices", "flex,wgpu"], &["--devices flex:0,wgpu:0", "mixes backends"]);
        fails_with(&["train", "--device", "wgpu", "--devices", "flex"], &["--devices flex:0", "--device is wgpu"]);
    }
    if cfg!(feature = "cuda") {
        fails_with(&["train", "--devices", "cuda:0,flex"], &["--devices cuda:0,flex:0", "mixes backends"]);
        fails_with(&["train", "--devices", "cuda:0,cuda:1", "--batch", "3"], &["--batch 3", "multiple of the device count"]);
        fails_with(&["train", "--device", "flex", "--devices", "cuda:0"], &["--device is flex"]);
        fails_with(&["train", "--devices", "cuda:4096"], &["--devices cuda:4096"]);
    }
}

/// The checks behind `--devices`, whatever the build: mixing backends and a `--device` that
/// disagrees are named (the binary reaches these only with two backends compiled in).
#[test]
fn device_list_checks_without_opening_devices() {
    use toy_lm::device::{DeviceSpec, check_device_list};
    let specs = |s: &str| s.split(',').map(|d| d.parse::<DeviceSpec>().unwrap()).collect::<Vec<_>>();
    assert_eq!(check_device_list(Some("cuda"), &specs("cuda:0,cuda:1"), 8), Ok(()));
    assert_eq!(check_device_list(None, &specs("cuda:1"), 3), Ok(()), "one device: any batch");
    assert_eq!(check_device_list(None, &specs("cpu"), 3), Ok(()), "cpu reads as flex");
    let err = |device: Option<&str>, list: &str, batch| check_device_list(device, &specs(list), batch).unwrap_err();
    assert!(err(None, "cuda:0,wgpu", 8).contains("mixes backends (cuda and wgpu)"));
    assert!(err(Some("wgpu"), "cuda:0,cuda:1", 8).contains("--device is wgpu"));
    assert!(err(None, "cuda:1,cuda:0,cuda:1", 9).contains("names cuda:1 twice"));
    assert!(err(None, "cuda:0,cuda:1,cuda:2", 8).contains("--batch 8 does not split over the 3 devices"));
    assert!(err(None, "vulkan:0,vulkan:1", 8).contains("needs CUDA devices"));
    assert!("cuda:".parse::<DeviceSpec>().is_err() && ":1".parse::<DeviceSpec>().is_err());
    assert_eq!("CUDA:3".parse::<DeviceSpec>().unwrap().to_string(), "cuda:3");
}

/// `--devices` with one device trains on that device (the single-device loop).
#[test]
fn devices_flag_with_one_device_trains() {
    let out_dir = tmp("devices-one");
    let args = ["train", "--devices", "flex", "--steps", "2", "--seq-len", "32", "--d-model", "16", "--heads", "2", "--layers", "1"];
    let out = toy_lm(&[&args[..], &["--batch", "2", "--eval-batches", "1", "--out", out_dir.to_str().unwrap()]].concat());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("toy-lm train on flex") && stdout.contains("done: final train loss"), "{stdout}");
    std::fs::remove_dir_all(out_dir).ok();
}
