//! Data generation: MQAR and needle correctness, text split, determinism.

use toy_lm::config::{RunConfig, Task};
use toy_lm::data::{BOS, DataSource, MqarSpec, NEEDLE_MARK, PAD, QUERY, Rng, TextCorpus, VALUE_BASE, mqar_example, needle_example};

fn spec(pairs: usize, queries: usize) -> MqarSpec {
    MqarSpec { pairs, queries, key_vocab: 64, value_vocab: 64 }
}

#[test]
fn mqar_sequences_are_well_formed_and_answerable() {
    for (seq, pairs, queries) in [(64, 4, 4), (128, 16, 8), (256, 16, 16), (512, 32, 32), (37, 8, 8)] {
        let spec = spec(pairs, queries);
        spec.validate(seq).unwrap();
        for seed in 0..50 {
            let ex = mqar_example(seq, &spec, &mut Rng::new(seed));
            assert_eq!(ex.tokens.len(), seq + 1);
            assert_eq!(ex.scored.len(), seq);
            assert_eq!(ex.tokens[0], BOS);
            // The pairs: distinct keys from the key range, values from the value range.
            let mut table = std::collections::HashMap::new();
            for i in 0..pairs {
                let (k, v) = (ex.tokens[1 + 2 * i], ex.tokens[2 + 2 * i]);
                assert!(k < 64, "key {k}");
                assert!((VALUE_BASE..VALUE_BASE + 64).contains(&v), "value {v}");
                assert!(table.insert(k, (1 + 2 * i, v)).is_none(), "duplicate key {k}");
            }
            // Every scored position is a query key whose target is the value it had earlier.
            let mut asked = std::collections::HashSet::new();
            let scored: Vec<usize> = (0..seq).filter(|&p| ex.scored[p]).collect();
            assert_eq!(scored.len(), queries, "seq {seq} seed {seed}");
            for &p in &scored {
                assert!(p > 2 * pairs, "queries come after the pairs");
                let key = ex.tokens[p];
                let (key_pos, value) = table[&key];
                assert!(key_pos < p, "the key appears before it is queried");
                assert_eq!(ex.tokens[p + 1], value, "target is the key's value");
                assert!(asked.insert(key), "each key is asked once");
            }
            // Everything else after the pairs is filler or a query's value.
            for p in 1 + 2 * pairs..=seq {
                let t = ex.tokens[p];
                let is_query_key = p < seq && ex.scored[p];
                let is_answer = p >= 1 && ex.scored[p - 1];
                assert!(t == PAD || is_query_key || is_answer, "stray token {t} at {p}");
            }
        }
    }
}

#[test]
fn mqar_rejects_impossible_specs() {
    assert!(spec(16, 16).validate(32).is_err(), "too short");
    assert!(spec(70, 4).validate(1024).is_err(), "more pairs than keys");
    assert!(spec(4, 8).validate(256).is_err(), "more queries than pairs");
}

#[test]
fn needle_sequences_hide_one_number_and_ask_for_it() {
    for (seq, digits, depth) in [(64, 4, -1.0), (256, 5, 0.0), (256, 5, 1.0), (512, 6, 0.5), (40, 3, -1.0)] {
        for seed in 0..50 {
            let ex = needle_example(seq, digits, depth, &mut Rng::new(seed));
            let t = &ex.tokens;
            assert_eq!(t.len(), seq + 1);
            assert_eq!(t[0], BOS);
            let q = seq - digits;
            assert_eq!(t[q], QUERY);
            let answer = &t[q + 1..];
            assert_eq!(answer.len(), digits);
            assert!(answer.iter().all(|&d| (b'0' as u32..=b'9' as u32).contains(&d)));
            // Exactly one needle `#digits#` in the haystack, equal to the answer.
            let hay = &t[1..q];
            let marks: Vec<usize> = (0..hay.len()).filter(|&i| hay[i] == NEEDLE_MARK).collect();
            assert_eq!(marks.len(), 2, "two marks");
            assert_eq!(marks[1] - marks[0], digits + 1);
            assert_eq!(&hay[marks[0] + 1..marks[1]], answer, "needle equals answer");
            // No other digit or special token in the haystack.
            for (i, &c) in hay.iter().enumerate() {
                if i > marks[0] && i < marks[1] || c == NEEDLE_MARK {
                    continue;
                }
                assert!(c == b' ' as u32 || (b'a' as u32..=b'z' as u32).contains(&c), "haystack byte {c}");
            }
            if depth == 0.0 {
                assert_eq!(marks[0], 0);
            }
            if depth == 1.0 {
                assert_eq!(marks[1], hay.len() - 1);
            }
            // Exactly the answer digits are scored.
            let scored: Vec<usize> = (0..seq).filter(|&p| ex.scored[p]).collect();
            assert_eq!(scored, (q..seq).collect::<Vec<_>>());
        }
    }
}

#[test]
fn text_split_holds_out_the_end() {
    let bytes: Vec<u8> = (0..1000u32).map(|i| (i % 251) as u8).collect();
    let c = TextCorpus::split(bytes.clone(), 0.1, 65, "test".into()).unwrap();
    assert_eq!(c.train.len(), 900);
    assert_eq!(c.val.len(), 100);
    assert_eq!([c.train.clone(), c.val.clone()].concat(), bytes, "disjoint, contiguous, complete");
    assert!(TextCorpus::split(bytes.clone(), 0.05, 65, "test".into()).is_err(), "validation shorter than a window");
    assert!(TextCorpus::split(bytes[..100].to_vec(), 0.5, 65, "test".into()).is_err());
}

#[test]
fn text_files_and_default_corpus_load() {
    let dir = std::env::temp_dir().join(format!("toy-lm-data-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("a.txt");
    std::fs::write(&path, "hello world, ".repeat(200)).unwrap();
    let c = TextCorpus::load(&[path.display().to_string()], 0.2, 33).unwrap();
    assert_eq!(c.train.len() + c.val.len(), 200 * 13 + 1);
    assert!(TextCorpus::load(&[dir.join("missing.txt").display().to_string()], 0.2, 33).is_err());
    std::fs::remove_dir_all(&dir).ok();
    let d = TextCorpus::load(&[], 0.1, 257).unwrap();
    assert!(d.train.len() > 10 * 257 && d.val.len() > 257, "{}", d.source);
}

#[test]
fn batches_are_deterministic_per_step_and_scored_as_the_task_says() {
    for task in [Task::Lm, Task::Mqar, Task::Needle] {
        let mut cfg = RunConfig::default();
        cfg.data.task = task;
        cfg.train.seq_len = 128;
        cfg.train.batch = 3;
        let data = DataSource::new(&cfg).unwrap();
        let (a, b) = (data.train_batch(5), data.train_batch(5));
        assert_eq!(a.inputs, b.inputs);
        assert_ne!(a.inputs, data.train_batch(6).inputs);
        assert_ne!(a.inputs, data.val_batch(5).inputs);
        assert_eq!(a.inputs.len(), 3 * 128);
        // Targets are inputs shifted by one.
        assert_eq!(a.inputs[1..128], a.targets[..127]);
        let expect = match task {
            Task::Lm => 3 * 128,
            Task::Mqar => 3 * 16,
            Task::Needle => 3 * cfg.data.needle_digits,
        };
        assert_eq!(a.scored(), expect, "{task:?}");
    }
}

/// The shards of a batch (one per data-parallel replica) are its rows in order, equal parts.
#[test]
fn shards_are_the_rows_in_order() {
    let mut cfg = RunConfig::default();
    cfg.data.task = Task::Mqar;
    cfg.train.batch = 6;
    cfg.train.seq_len = 64;
    let batch = DataSource::new(&cfg).unwrap().train_batch(3);
    assert_eq!(batch.shard(0, 1).inputs, batch.inputs);
    for parts in [2, 3, 6] {
        let shards: Vec<_> = (0..parts).map(|i| batch.shard(i, parts)).collect();
        assert!(shards.iter().all(|s| s.batch == 6 / parts && s.seq == 64));
        assert_eq!(shards.iter().flat_map(|s| s.inputs.clone()).collect::<Vec<_>>(), batch.inputs);
        assert_eq!(shards.iter().flat_map(|s| s.targets.clone()).collect::<Vec<_>>(), batch.targets);
        assert_eq!(shards.iter().flat_map(|s| s.weights.clone()).collect::<Vec<_>>(), batch.weights);
        assert_eq!(shards.iter().map(|s| s.scored()).sum::<usize>(), batch.scored());
    }
}
