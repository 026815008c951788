//! Data-parallel training (`--devices`) against one device, on two CUDA GPUs: the hidden
//! `ddp-check` command trains a tiny model on the first device alone and then on both, with the
//! same seed and global batch, and compares the loss and gradient norm of every step and the
//! final parameters (relative tolerance 2e-3).
//!
//! ```text
//! TOY_LM_DDP_DEVICES=cuda:0,cuda:1 cargo test --release -p toy-lm --features cuda --test ddp -- --ignored
//! ```
//!
//! NCCL must be loadable as `libnccl.so` (see examples/toy-lm/README.md).

use std::process::Command;

#[test]
#[ignore = "needs two CUDA GPUs and NCCL: TOY_LM_DDP_DEVICES=cuda:0,cuda:1 cargo test -p toy-lm --features cuda --test ddp -- --ignored"]
fn data_parallel_training_matches_one_device() {
    let devices = std::env::var("TOY_LM_DDP_DEVICES").unwrap_or_else(|_| "cuda:0,cuda:1".into());
    let out = std::env::temp_dir().join(format!("toy-lm-ddp-test-{}", std::process::id()));
    let args = [
        "ddp-check", "--devices", &devices, "--layers", "2", "--d-model", "64", "--heads", "4", "--kv-heads", "2", "--seq-len",
        "128", "--batch", "8", "--steps", "8", "--warmup", "2", "--eval-every", "0", "--eval-batches", "1", "--out",
        out.to_str().unwrap(),
    ];
    let run = Command::new(env!("CARGO_BIN_EXE_toy-lm")).args(args).output().expect("the toy-lm binary runs");
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    std::fs::remove_dir_all(&out).ok();
    assert!(run.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains(": PASS"), "{stdout}");
}
