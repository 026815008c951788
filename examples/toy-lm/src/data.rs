//! Data without downloads: byte-level text, and synthetic long-context tasks made from a seed.
//!
//! Tokens are bytes (0..256) plus a few special tokens ([`PAD`], [`BOS`], [`QUERY`]), so one
//! vocabulary of [`VOCAB_SIZE`] serves text and the synthetic tasks. Every batch is a pure
//! function of (seed, step): resuming a run replays exactly the data it would have seen.

use std::path::{Path, PathBuf};

use crate::AppResult;
use crate::config::{DataConfig, RunConfig, Task};

/// Filler token of the synthetic tasks.
pub const PAD: u32 = 256;
/// Start of a synthetic sequence.
pub const BOS: u32 = 257;
/// Marks the question of the needle task.
pub const QUERY: u32 = 258;
/// Bytes plus the special tokens (rounded up to a multiple of 4).
pub const VOCAB_SIZE: usize = 260;

/// First value token of MQAR (keys are `0..key_vocab`, values `VALUE_BASE..`).
pub const VALUE_BASE: u32 = 128;

/// A small, fast, deterministic PRNG (SplitMix64): the same stream on every platform.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator for `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed ^ 0x9E37_79B9_7F4A_7C15)
    }

    /// A generator for `(seed, stream, index)`, e.g. the batch of one step.
    pub fn derive(seed: u64, stream: u64, index: u64) -> Self {
        let mut r = Rng::new(seed.wrapping_mul(0xD1B5_4A32_D192_ED03) ^ stream.rotate_left(17) ^ index.wrapping_mul(0xA24B_AED4_963E_E407));
        r.next_u64();
        r
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (((self.next_u64() >> 11) as u128 * n as u128) >> 53) as usize
    }

    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Fisher-Yates shuffle.
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            items.swap(i, self.below(i + 1));
        }
    }
}

/// One training example: `seq + 1` tokens (inputs are `tokens[..seq]`, targets
/// `tokens[1..]`) and, per input position, whether its target counts in the loss.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    /// `seq + 1` tokens.
    pub tokens: Vec<u32>,
    /// `seq` flags: the target at this input position is scored.
    pub scored: Vec<bool>,
}

impl Example {
    fn all_scored(tokens: Vec<u32>) -> Self {
        let n = tokens.len() - 1;
        Self { tokens, scored: vec![true; n] }
    }
}

/// A batch in host memory, row-major `[batch, seq]`.
#[derive(Debug, Clone)]
pub struct Batch {
    /// Sequences.
    pub batch: usize,
    /// Tokens per sequence.
    pub seq: usize,
    /// Input tokens.
    pub inputs: Vec<i64>,
    /// Next-token targets.
    pub targets: Vec<i64>,
    /// 1 where the target is scored, else 0.
    pub weights: Vec<f32>,
}

impl Batch {
    /// Stacks examples of equal length.
    pub fn from_examples(examples: &[Example]) -> Self {
        let seq = examples[0].scored.len();
        let mut b = Batch { batch: examples.len(), seq, inputs: Vec::new(), targets: Vec::new(), weights: Vec::new() };
        for e in examples {
            assert_eq!(e.tokens.len(), seq + 1, "examples of one batch have one length");
            b.inputs.extend(e.tokens[..seq].iter().map(|&t| t as i64));
            b.targets.extend(e.tokens[1..].iter().map(|&t| t as i64));
            b.weights.extend(e.scored.iter().map(|&s| if s { 1.0 } else { 0.0 }));
        }
        b
    }

    /// Scored target count.
    pub fn scored(&self) -> usize {
        self.weights.iter().filter(|w| **w > 0.0).count()
    }

    /// Part `index` of `parts` equal parts, by rows (sequences): rows
    /// `index * batch / parts .. (index + 1) * batch / parts`, what replica `index` of a
    /// data-parallel run trains on. `parts` must divide `batch` (`--devices` checks it).
    pub fn shard(&self, index: usize, parts: usize) -> Batch {
        assert!(parts > 0 && index < parts && self.batch % parts == 0, "batch {} into {parts} parts", self.batch);
        if parts == 1 {
            return self.clone();
        }
        let rows = self.batch / parts;
        let span = rows * self.seq * index..rows * self.seq * (index + 1);
        Batch {
            batch: rows,
            seq: self.seq,
            inputs: self.inputs[span.clone()].to_vec(),
            targets: self.targets[span.clone()].to_vec(),
            weights: self.weights[span].to_vec(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Text

/// A byte corpus split into a training part and a validation part (the end of the text).
#[derive(Debug, Clone)]
pub struct TextCorpus {
    /// Training bytes.
    pub train: Vec<u8>,
    /// Validation bytes.
    pub val: Vec<u8>,
    /// Where the text came from.
    pub source: String,
}

impl TextCorpus {
    /// Splits `bytes`, holding out the last `val_fraction` for validation. Both parts must hold
    /// at least `min_len` bytes (one training window).
    pub fn split(bytes: Vec<u8>, val_fraction: f64, min_len: usize, source: String) -> AppResult<Self> {
        let n_val = ((bytes.len() as f64) * val_fraction).round() as usize;
        let n_train = bytes.len().saturating_sub(n_val);
        if n_val < min_len || n_train < min_len {
            return Err(format!(
                "text too short: {} bytes give {n_train} training and {n_val} validation bytes, each needs at least seq_len + 1 = {min_len}",
                bytes.len()
            )
            .into());
        }
        let mut train = bytes;
        let val = train.split_off(n_train);
        Ok(Self { train, val, source })
    }

    /// Reads the given files (concatenated in order), or the default corpus when `paths` is empty.
    pub fn load(paths: &[String], val_fraction: f64, min_len: usize) -> AppResult<Self> {
        if paths.is_empty() {
            let (bytes, source) = default_corpus(min_len);
            return Self::split(bytes, val_fraction, min_len, source);
        }
        let mut bytes = Vec::new();
        for p in paths {
            let text = std::fs::read(p).map_err(|e| format!("cannot read --text {p}: {e}"))?;
            if std::str::from_utf8(&text).is_err() {
                return Err(format!("--text {p} is not UTF-8").into());
            }
            bytes.extend_from_slice(&text);
            bytes.push(b'\n');
        }
        Self::split(bytes, val_fraction, min_len, format!("{} file(s): {}", paths.len(), paths.join(", ")))
    }
}

/// The offline corpus: this repository's `*.md` and `*.rs` files (found from the crate's
/// manifest directory at build time), or a deterministic synthetic text when fewer than 64 KiB
/// are found (a binary moved off its checkout).
pub fn default_corpus(min_len: usize) -> (Vec<u8>, String) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut files = Vec::new();
    collect_files(&root, &mut files, 0);
    files.sort();
    let mut bytes = Vec::new();
    for f in &files {
        if let Ok(text) = std::fs::read(f)
            && std::str::from_utf8(&text).is_ok()
        {
            bytes.extend_from_slice(&text);
            bytes.push(b'\n');
        }
    }
    if bytes.len() >= (64 << 10).max(20 * min_len) {
        let root = root.canonicalize().unwrap_or(root);
        let source = format!("repository text: {} *.md/*.rs files under {} ({} bytes)", files.len(), root.display(), bytes.len());
        return (bytes, source);
    }
    let bytes = synthetic_text(1 << 19, 0x70_79_4C_4D);
    let source = format!("synthetic text ({} bytes, fixed seed)", bytes.len());
    (bytes, source)
}

fn collect_files(dir: &Path, out: &mut Vec<PathBuf>, depth: usize) {
    if depth > 8 {
        return;
    }
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') || name == "target" || name == "runs" || name == "node_modules" {
            continue;
        }
        let Ok(kind) = entry.file_type() else { continue };
        if kind.is_dir() {
            collect_files(&path, out, depth + 1);
        } else if kind.is_file() && (name.ends_with(".md") || name.ends_with(".rs")) {
            out.push(path);
        }
    }
}

/// English-like sentences from a tiny grammar: deterministic for a given seed.
pub fn synthetic_text(len: usize, seed: u64) -> Vec<u8> {
    const SUBJECTS: [&str; 12] = [
        "the model",
        "a small cat",
        "the old sailor",
        "every student",
        "the engineer",
        "my neighbour",
        "the river",
        "a quiet child",
        "the committee",
        "this kernel",
        "the garden",
        "our teacher",
    ];
    const VERBS: [&str; 12] =
        ["reads", "finds", "builds", "remembers", "follows", "paints", "counts", "carries", "watches", "repairs", "describes", "ignores"];
    const OBJECTS: [&str; 12] = [
        "a long letter",
        "the blue door",
        "seven stones",
        "the last train",
        "an empty box",
        "the map",
        "a warm loaf",
        "the broken clock",
        "two lanterns",
        "the answer",
        "a paper boat",
        "the winter road",
    ];
    const TAILS: [&str; 8] =
        ["", " in the morning", " before dinner", " near the bridge", " without a word", " twice", " again", " at night"];
    let mut rng = Rng::new(seed);
    let mut out = Vec::with_capacity(len + 64);
    while out.len() < len {
        let s = SUBJECTS[rng.below(SUBJECTS.len())];
        let mut sentence = format!("{s} {} {}{}", VERBS[rng.below(12)], OBJECTS[rng.below(12)], TAILS[rng.below(8)]);
        if rng.below(4) == 0 {
            sentence.push_str(&format!(", and then {} {}", VERBS[rng.below(12)], OBJECTS[rng.below(12)]));
        }
        let mut chars = sentence.chars();
        let first = chars.next().unwrap().to_ascii_uppercase();
        out.extend_from_slice(format!("{first}{}. ", chars.as_str()).as_bytes());
        if rng.below(6) == 0 {
            out.push(b'\n');
        }
    }
    out.truncate(len);
    out
}

/// A random window of `seq + 1` bytes.
pub fn lm_example(text: &[u8], seq: usize, rng: &mut Rng) -> Example {
    let start = rng.below(text.len() - seq);
    Example::all_scored(text[start..start + seq + 1].iter().map(|&b| b as u32).collect())
}

// ---------------------------------------------------------------------------------------------
// MQAR

/// Multi-query associative recall parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MqarSpec {
    /// Key-value pairs at the start of each sequence.
    pub pairs: usize,
    /// Queries (each a key of the pairs, followed by its value).
    pub queries: usize,
    /// Keys are `0..key_vocab`.
    pub key_vocab: usize,
    /// Values are `VALUE_BASE..VALUE_BASE + value_vocab`.
    pub value_vocab: usize,
}

impl MqarSpec {
    /// From the data config.
    pub fn from_config(d: &DataConfig) -> Self {
        let queries = if d.mqar_queries == 0 { d.mqar_pairs } else { d.mqar_queries };
        Self { pairs: d.mqar_pairs, queries, key_vocab: d.mqar_key_vocab, value_vocab: d.mqar_value_vocab }
    }

    /// Checks the spec fits a sequence of `seq` inputs.
    pub fn validate(&self, seq: usize) -> AppResult<()> {
        if self.pairs == 0 || self.queries == 0 {
            return Err("MQAR needs at least one pair and one query".into());
        }
        if self.key_vocab > VALUE_BASE as usize || self.value_vocab > 128 {
            return Err("MQAR key vocab must be at most 128 and value vocab at most 128".into());
        }
        if self.pairs > self.key_vocab {
            return Err(format!("MQAR: {} pairs need distinct keys but the key vocab has {}", self.pairs, self.key_vocab).into());
        }
        if self.queries > self.pairs {
            return Err(format!("MQAR: {} queries exceed the {} pairs (each key is asked once)", self.queries, self.pairs).into());
        }
        // BOS + pairs, then each query needs a slot of 2 tokens in the remainder.
        let remainder = (seq + 1).saturating_sub(1 + 2 * self.pairs);
        if remainder / 2 < self.queries {
            return Err(format!("MQAR: seq_len {seq} is too short for {} pairs and {} queries", self.pairs, self.queries).into());
        }
        Ok(())
    }
}

/// One MQAR sequence: `BOS k1 v1 .. kn vn`, then filler ([`PAD`]) with the queries (`k v`,
/// keys distinct, each asked once) at random positions. Only the values of the queries are
/// scored: the target of a query key's position is its value, seen once in the pairs.
pub fn mqar_example(seq: usize, spec: &MqarSpec, rng: &mut Rng) -> Example {
    let total = seq + 1;
    let mut keys: Vec<u32> = (0..spec.key_vocab as u32).collect();
    rng.shuffle(&mut keys);
    keys.truncate(spec.pairs);
    let values: Vec<u32> = (0..spec.pairs).map(|_| VALUE_BASE + rng.below(spec.value_vocab) as u32).collect();
    let mut tokens = Vec::with_capacity(total);
    tokens.push(BOS);
    for (k, v) in keys.iter().zip(&values) {
        tokens.push(*k);
        tokens.push(*v);
    }
    let start = tokens.len();
    tokens.resize(total, PAD);
    let mut scored = vec![false; seq];
    // Non-overlapping 2-token slots after the pairs.
    let mut slots: Vec<usize> = (0..(total - start) / 2).collect();
    rng.shuffle(&mut slots);
    let mut slots = slots[..spec.queries].to_vec();
    slots.sort_unstable();
    let mut asked: Vec<usize> = (0..spec.pairs).collect();
    rng.shuffle(&mut asked);
    for (slot, pair) in slots.into_iter().zip(asked) {
        let p = start + 2 * slot;
        tokens[p] = keys[pair];
        tokens[p + 1] = values[pair];
        scored[p] = true;
    }
    Example { tokens, scored }
}

// ---------------------------------------------------------------------------------------------
// Needle in a haystack

/// The needle task's framing: `#` + digits + `#` hidden in the haystack, and at the end
/// [`QUERY`] followed by the same digits.
pub const NEEDLE_MARK: u32 = b'#' as u32;

/// One needle sequence: `BOS`, a haystack of lowercase pseudo-words with `#DDDD#` at the given
/// relative depth (random when negative), then `QUERY DDDD`. The digits after `QUERY` are
/// scored; digits and `#` appear nowhere else.
pub fn needle_example(seq: usize, digits: usize, depth: f64, rng: &mut Rng) -> Example {
    let total = seq + 1;
    let needle: Vec<u32> = (0..digits).map(|_| b'0' as u32 + rng.below(10) as u32).collect();
    let tail = 1 + digits; // QUERY + answer
    let hay_len = total - 1 - tail;
    let mut hay = Vec::with_capacity(hay_len);
    while hay.len() < hay_len {
        let word = 1 + rng.below(7);
        for _ in 0..word {
            hay.push(b'a' as u32 + rng.below(26) as u32);
        }
        hay.push(b' ' as u32);
    }
    hay.truncate(hay_len);
    let needle_len = digits + 2;
    let room = hay_len - needle_len;
    let at = if depth < 0.0 { rng.below(room + 1) } else { ((depth.min(1.0) * room as f64).round() as usize).min(room) };
    hay[at] = NEEDLE_MARK;
    hay[at + 1..at + 1 + digits].copy_from_slice(&needle);
    hay[at + 1 + digits] = NEEDLE_MARK;
    let mut tokens = Vec::with_capacity(total);
    tokens.push(BOS);
    tokens.extend_from_slice(&hay);
    tokens.push(QUERY);
    tokens.extend_from_slice(&needle);
    debug_assert_eq!(tokens.len(), total);
    let mut scored = vec![false; seq];
    // Input positions QUERY .. second-to-last digit predict the digits.
    for s in &mut scored[seq - digits..] {
        *s = true;
    }
    Example { tokens, scored }
}

// ---------------------------------------------------------------------------------------------
// Streams

const TRAIN_STREAM: u64 = 1;
const VAL_STREAM: u64 = 2;

/// Training and validation batches for a run.
#[derive(Debug, Clone)]
pub struct DataSource {
    task: Task,
    seq: usize,
    batch: usize,
    seed: u64,
    corpus: Option<TextCorpus>,
    mqar: MqarSpec,
    needle_digits: usize,
    needle_depth: f64,
}

impl DataSource {
    /// Loads the text (task `lm`) or checks the synthetic task fits the context.
    pub fn new(cfg: &RunConfig) -> AppResult<Self> {
        let d = &cfg.data;
        let seq = cfg.train.seq_len;
        let mqar = MqarSpec::from_config(d);
        let corpus = match d.task {
            Task::Lm => Some(TextCorpus::load(&d.text, d.val_fraction, seq + 2)?),
            Task::Mqar => {
                mqar.validate(seq)?;
                None
            }
            Task::Needle => {
                if d.needle_digits == 0 || seq < 2 * d.needle_digits + 8 {
                    return Err(format!("needle: seq_len {seq} is too short for {} digits", d.needle_digits).into());
                }
                None
            }
        };
        Ok(Self {
            task: d.task,
            seq,
            batch: cfg.train.batch,
            seed: cfg.train.seed,
            corpus,
            mqar,
            needle_digits: d.needle_digits,
            needle_depth: d.needle_depth,
        })
    }

    /// The task.
    pub fn task(&self) -> Task {
        self.task
    }

    /// A one-line description for logs and results.
    pub fn describe(&self) -> String {
        match (&self.corpus, self.task) {
            (Some(c), _) => format!("byte LM on {} ({} train / {} val bytes)", c.source, c.train.len(), c.val.len()),
            (None, Task::Mqar) => format!(
                "MQAR: {} pairs, {} queries, {} keys, {} values, context {}",
                self.mqar.pairs, self.mqar.queries, self.mqar.key_vocab, self.mqar.value_vocab, self.seq
            ),
            (None, _) => format!(
                "needle: {} digits at {} depth, context {}",
                self.needle_digits,
                if self.needle_depth < 0.0 { "random".to_string() } else { format!("{:.2}", self.needle_depth) },
                self.seq
            ),
        }
    }

    fn example(&self, rng: &mut Rng, val: bool) -> Example {
        match self.task {
            Task::Lm => {
                let c = self.corpus.as_ref().expect("lm has a corpus");
                lm_example(if val { &c.val } else { &c.train }, self.seq, rng)
            }
            Task::Mqar => mqar_example(self.seq, &self.mqar, rng),
            Task::Needle => needle_example(self.seq, self.needle_digits, self.needle_depth, rng),
        }
    }

    /// The training batch of `step` (a pure function of seed and step).
    pub fn train_batch(&self, step: usize) -> Batch {
        let mut rng = Rng::derive(self.seed, TRAIN_STREAM, step as u64);
        let examples: Vec<Example> = (0..self.batch).map(|_| self.example(&mut rng, false)).collect();
        Batch::from_examples(&examples)
    }

    /// Validation batch `index`: held-out text windows, or synthetic sequences from a stream
    /// disjoint from training.
    pub fn val_batch(&self, index: usize) -> Batch {
        let mut rng = Rng::derive(self.seed, VAL_STREAM, index as u64);
        let examples: Vec<Example> = (0..self.batch).map(|_| self.example(&mut rng, true)).collect();
        Batch::from_examples(&examples)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rng_is_deterministic_and_in_range() {
        let mut a = Rng::derive(7, 1, 3);
        let mut b = Rng::derive(7, 1, 3);
        for _ in 0..1000 {
            let x = a.below(10);
            assert_eq!(x, b.below(10));
            assert!(x < 10);
        }
        assert_ne!(Rng::derive(7, 1, 3).next_u64(), Rng::derive(7, 1, 4).next_u64());
    }

    #[test]
    fn synthetic_text_is_deterministic_ascii() {
        let a = synthetic_text(5000, 1);
        assert_eq!(a, synthetic_text(5000, 1));
        assert_eq!(a.len(), 5000);
        assert!(a.iter().all(|b| b.is_ascii()));
    }
}
