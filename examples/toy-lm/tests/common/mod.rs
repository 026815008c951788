//! Shared by the toy-lm test binaries.

use toy_lm::config::{Method, RunConfig, Task};

/// A model and context small enough for a few steps per second in debug builds.
pub fn tiny(method: Method, steps: usize) -> RunConfig {
    let mut c = RunConfig::default();
    c.model.layers = 2;
    c.model.d_model = 32;
    c.model.heads = 2;
    c.model.attention = method;
    c.train.steps = steps;
    c.train.batch = 2;
    c.train.seq_len = 64;
    c.train.warmup = 2;
    c.train.eval_every = 0;
    c.train.eval_batches = 1;
    c.train.log_every = 1000;
    c.data.task = Task::Lm;
    c.moba.block_size = 16;
    c.moba.top_k = 2;
    c.nsa.compress_block = 8;
    c.nsa.compress_stride = 4;
    c.nsa.select_block = 16;
    c.nsa.top_n = 2;
    c.nsa.window = 16;
    c.seer.block_size = 16;
    c.seer.top_k = Some(2);
    c.seer.gate_hidden = 16;
    c.dma.window = 16;
    c
}
