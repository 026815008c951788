//! Packed variable-length batches for the sparse methods, on Flex in f64: a packed call of
//! `block_sparse_attention_varlen`, `moba_attention_varlen` and `dma_attention_varlen`
//! equals the unpacked op on each sequence alone (its rows, its keys, its slice of the
//! selection or bias), for the output, the LSE and the gradients of q, k, v (and the DMA
//! bias), to 1e-12. Sequences include an empty one, a single token, uneven lengths and
//! lengths that are not multiples of the block.

use burn::tensor::{Int, Tensor};
use burn_sparse_attn::attention::{AttentionOptions, AttentionOutput};
use burn_sparse_attn::block_sparse::{BlockSelection, block_sparse_attention, block_sparse_attention_varlen, packed_selection_rows};
use burn_sparse_attn::dma::{DmaParams, dma_attention, dma_attention_varlen};
use burn_sparse_attn::moba::{MobaParams, moba_attention, moba_attention_varlen};
use burn_sparse_attn::varlen::VarLen;
use sparse_attn_tests::*;

const B: usize = 2;
const HQ: usize = 4;
const HKV: usize = 2;
const D: usize = 8;

/// The inputs of one sequence, detached and tracked on their own.
struct Part {
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    bias: Tensor<3>,
}

/// Packs random q, k, v (GQA 4 / 2, head dim 8, batch 2) and a per-key bias over
/// `cu_q` / `cu_k`, runs `packed` once and `separate` per non-empty sequence with the same
/// upstream gradient, and compares output, LSE and every gradient to 1e-12.
fn packed_equals_separate(
    name: &str,
    cu_q: &[usize],
    cu_k: &[usize],
    packed: impl Fn(Tensor<4>, Tensor<4>, Tensor<4>, Tensor<3>, &VarLen) -> AttentionOutput,
    separate: impl Fn(usize, Part) -> AttentionOutput,
) {
    let device = ad_dev();
    let mut rng = Rng::new(5);
    let (tq, tk) = (cu_q[cu_q.len() - 1], cu_k[cu_k.len() - 1]);
    let q = rng.randn([B, HQ, tq, D], 1.0, &device).require_grad();
    let k = rng.randn([B, HKV, tk, D], 1.0, &device).require_grad();
    let v = rng.randn([B, HKV, tk, D], 1.0, &device).require_grad();
    let bias = rng.randn([B, HKV, tk], 1.0, &device).require_grad();
    let d_o = rng.randn([B, HQ, tq, D], 1.0, &device);
    let varlen = VarLen::cross(cu_q.to_vec(), cu_k.to_vec()).unwrap();
    let out = packed(q.clone(), k.clone(), v.clone(), bias.clone(), &varlen);
    let g = (out.output.clone() * d_o.clone()).sum().backward();
    let gq = values(q.grad(&g).unwrap());
    let gk = values(k.grad(&g).unwrap());
    let gv = values(v.grad(&g).unwrap());
    let gb = bias.grad(&g).map(values);
    for s in 0..cu_q.len() - 1 {
        let (qa, qb, ka, kb) = (cu_q[s], cu_q[s + 1], cu_k[s], cu_k[s + 1]);
        if qa == qb || ka == kb {
            continue;
        }
        let what = |x: &str| format!("{name}: sequence {s} ({qa}..{qb} x {ka}..{kb}) {x}");
        let part = Part {
            q: seq_rows(&q, qa, qb).detach().require_grad(),
            k: seq_rows(&k, ka, kb).detach().require_grad(),
            v: seq_rows(&v, ka, kb).detach().require_grad(),
            bias: bias.clone().slice([0..B, 0..HKV, ka..kb]).detach().require_grad(),
        };
        let (q1, k1, v1, b1) = (part.q.clone(), part.k.clone(), part.v.clone(), part.bias.clone());
        let one = separate(s, part);
        assert_close(&what("o"), &values(seq_rows(&out.output, qa, qb)), &values(one.output.clone()), 1e-12, 1e-12);
        let lse_packed = values(out.lse.clone().slice([0..B, 0..HQ, qa..qb]));
        for (a, b) in lse_packed.iter().zip(&values(one.lse.clone())) {
            assert!(a == b || (a - b).abs() < 1e-12, "{}: {a} vs {b}", what("lse"));
        }
        let g1 = (one.output * seq_rows(&d_o, qa, qb)).sum().backward();
        assert_close(&what("dq"), &flat_rows(&gq, B * HQ, tq, D, qa, qb), &values(q1.grad(&g1).unwrap()), 1e-12, 1e-12);
        assert_close(&what("dk"), &flat_rows(&gk, B * HKV, tk, D, ka, kb), &values(k1.grad(&g1).unwrap()), 1e-12, 1e-12);
        assert_close(&what("dv"), &flat_rows(&gv, B * HKV, tk, D, ka, kb), &values(v1.grad(&g1).unwrap()), 1e-12, 1e-12);
        if let Some(gb) = &gb {
            let want = b1.grad(&g1).map(values).expect("the separate call differentiates the bias too");
            assert_close(&what("dbias"), &flat_rows(gb, B * HKV, tk, 1, ka, kb), &want, 1e-12, 1e-12);
        }
    }
}

/// A random packed selection: `[B, sel_heads, rows, cap]` of local block numbers, with
/// padding, out-of-range entries and duplicates.
fn random_selection(rng: &mut Rng, varlen: &VarLen, sel_heads: usize, query_block: usize, key_block: usize, cap: usize) -> Vec<i64> {
    let (cu_q, cu_k) = (varlen.cu_seqlens_q(), varlen.cu_seqlens_k());
    let mut lists = Vec::new();
    for _ in 0..B * sel_heads {
        for s in 0..varlen.num_sequences() {
            let nkb = (cu_k[s + 1] - cu_k[s]).div_ceil(key_block).max(1);
            for _ in 0..(cu_q[s + 1] - cu_q[s]).div_ceil(query_block) {
                for e in 0..cap {
                    lists.push(match rng.below(8) {
                        0 => -1,
                        1 => (nkb + rng.below(2)) as i64, // outside the sequence: ignored
                        2 if e > 0 => *lists.last().unwrap(),
                        _ => rng.below(nkb) as i64,
                    });
                }
            }
        }
    }
    lists
}

fn block_sparse_case(name: &str, cu_q: &[usize], cu_k: &[usize], sel_heads: usize, query_block: usize, key_block: usize, opts: AttentionOptions) {
    let varlen = VarLen::cross(cu_q.to_vec(), cu_k.to_vec()).unwrap();
    let rows_total = packed_selection_rows(&varlen, query_block);
    let cap = 3;
    let lists = random_selection(&mut Rng::new(9), &varlen, sel_heads, query_block, key_block, cap);
    let device = ad_dev();
    let indices = int_tensor(lists, [B, sel_heads, rows_total, cap], &device);
    let selection = BlockSelection::per_query_block(indices.clone(), query_block, key_block);
    // Each sequence's lists: its rows of the packed selection.
    let mut first_row = vec![0];
    for s in 0..varlen.num_sequences() {
        first_row.push(first_row[s] + (cu_q[s + 1] - cu_q[s]).div_ceil(query_block));
    }
    packed_equals_separate(
        name,
        cu_q,
        cu_k,
        |q, k, v, _, vl| block_sparse_attention_varlen(q, k, v, &selection, vl, &opts).unwrap(),
        |s, p| {
            let own: Tensor<4, Int> = indices.clone().slice([0..B, 0..sel_heads, first_row[s]..first_row[s + 1], 0..cap]);
            block_sparse_attention(p.q, p.k, p.v, &BlockSelection::per_query_block(own, query_block, key_block), &opts).unwrap()
        },
    );
}

#[test]
fn block_sparse_per_token_causal_self_packing() {
    // Sequences of 7, 0, 13, 1 and 11 tokens, key blocks of 4 (partial last blocks).
    let cu = [0, 7, 7, 20, 21, 32];
    block_sparse_case("per-token, heads_kv", &cu, &cu, HKV, 1, 4, AttentionOptions::causal());
    block_sparse_case("per-token, heads_q, window", &cu, &cu, HQ, 1, 3, AttentionOptions::causal().with_window(5));
}

#[test]
fn block_sparse_query_blocks_noncausal_and_cross_lengths() {
    let cu = [0, 9, 20];
    block_sparse_case("query blocks of 4, non-causal", &cu, &cu, HQ, 4, 3, AttentionOptions::full());
    block_sparse_case("query blocks of 2 x key blocks of 3, causal", &cu, &cu, HKV, 2, 3, AttentionOptions::causal());
    // More keys than queries (bottom-right causal within each sequence), a sequence without
    // keys, and one with fewer keys than queries.
    block_sparse_case("cross lengths", &[0, 3, 5, 12], &[0, 7, 7, 10], HKV, 1, 2, AttentionOptions::causal());
}

#[test]
fn moba_packing_equals_moba_per_sequence() {
    let params = MobaParams { block_size: 4, top_k: 2, scale: None };
    let cu = [0, 7, 7, 20, 21, 35];
    packed_equals_separate(
        "moba",
        &cu,
        &cu,
        |q, k, v, _, vl| moba_attention_varlen(q, k, v, vl, &params).unwrap().attention,
        |_, p| moba_attention(p.q, p.k, p.v, &params).unwrap().attention,
    );
    // Cross lengths: the routing positions are bottom-right aligned within each sequence.
    let top3 = MobaParams { block_size: 3, top_k: 3, scale: Some(0.3) };
    packed_equals_separate(
        "moba cross",
        &[0, 4, 9, 15],
        &[0, 10, 16, 21],
        |q, k, v, _, vl| moba_attention_varlen(q, k, v, vl, &top3).unwrap().attention,
        |_, p| moba_attention(p.q, p.k, p.v, &top3).unwrap().attention,
    );
}

/// The routing a packed MoBA call reports is each sequence's own routing, in local block
/// numbers (as sets: the order of equal scores is not part of the contract).
#[test]
fn moba_packed_routing_is_per_sequence_routing() {
    let device = dev();
    let params = MobaParams { block_size: 4, top_k: 3, scale: None };
    let cu = [0, 10, 23, 30];
    let mut rng = Rng::new(2);
    let q = rng.randn([1, 2, 30, D], 1.0, &device);
    let k = rng.randn([1, 1, 30, D], 1.0, &device);
    let packed = moba_attention_varlen(q.clone(), k.clone(), k.clone(), &VarLen::new(cu.to_vec()).unwrap(), &params).unwrap();
    let [_, _, _, cap] = packed.selection.indices.dims();
    let got = ints(packed.selection.indices);
    for s in 0..3 {
        let (a, b) = (cu[s], cu[s + 1]);
        let one = moba_attention(seq_rows(&q, a, b), seq_rows(&k, a, b), seq_rows(&k, a, b), &params).unwrap();
        let [_, _, _, c1] = one.selection.indices.dims();
        let want = ints(one.selection.indices);
        for h in 0..2 {
            for t in 0..b - a {
                let mut x: Vec<i64> = got[(h * 30 + a + t) * cap..(h * 30 + a + t + 1) * cap].iter().copied().filter(|&e| e >= 0).collect();
                let mut y: Vec<i64> = want[(h * (b - a) + t) * c1..(h * (b - a) + t + 1) * c1].iter().copied().filter(|&e| e >= 0).collect();
                x.sort();
                y.sort();
                assert_eq!(x, y, "sequence {s}, head {h}, token {t}");
            }
        }
    }
}

#[test]
fn dma_packing_equals_dma_per_sequence() {
    let cu = [0, 7, 7, 20, 21, 35];
    for (window, causal) in [(3, true), (5, false), (40, true)] {
        let params = DmaParams { window, scale: None, causal };
        packed_equals_separate(
            &format!("dma window {window} causal {causal}"),
            &cu,
            &cu,
            |q, k, v, bias, vl| dma_attention_varlen(q, k, v, bias, vl, &params).unwrap(),
            |_, p| dma_attention(p.q, p.k, p.v, p.bias, &params).unwrap(),
        );
    }
    let params = DmaParams { window: 4, scale: None, causal: true };
    packed_equals_separate(
        "dma cross lengths",
        &[0, 3, 9, 12],
        &[0, 8, 14, 20],
        |q, k, v, bias, vl| dma_attention_varlen(q, k, v, bias, vl, &params).unwrap(),
        |_, p| dma_attention(p.q, p.k, p.v, p.bias, &params).unwrap(),
    );
}

#[test]
fn packed_sparse_ops_name_bad_arguments() {
    let device = dev();
    let q = Tensor::<4>::zeros([1, 2, 10, 4], &device);
    let kv = Tensor::<4>::zeros([1, 2, 10, 4], &device);
    let varlen = VarLen::new(vec![0, 4, 10]).unwrap();
    // Rows: per-token lists need 10 rows; query blocks of 3 need ceil(4/3) + ceil(6/3) = 4.
    let sel = BlockSelection::per_token(Tensor::<4, Int>::zeros([1, 2, 9, 2], &device), 4);
    let e = block_sparse_attention_varlen(q.clone(), kv.clone(), kv.clone(), &sel, &varlen, &AttentionOptions::causal()).unwrap_err();
    assert!(e.to_string().contains("selection.indices"), "{e}");
    assert_eq!(packed_selection_rows(&varlen, 3), 4);
    let wrong = VarLen::new(vec![0, 4, 11]).unwrap();
    let sel = BlockSelection::per_token(Tensor::<4, Int>::zeros([1, 2, 11, 2], &device), 4);
    let e = block_sparse_attention_varlen(q.clone(), kv.clone(), kv.clone(), &sel, &wrong, &AttentionOptions::causal()).unwrap_err();
    assert!(e.to_string().contains("cu_seqlens_q"), "{e}");
    let e = moba_attention_varlen(q.clone(), kv.clone(), kv.clone(), &wrong, &MobaParams::default()).unwrap_err();
    assert!(e.to_string().contains("cu_seqlens_q"), "{e}");
    let bias = Tensor::<3>::zeros([1, 2, 9], &device);
    let e = dma_attention_varlen(q, kv.clone(), kv, bias, &varlen, &DmaParams::default()).unwrap_err();
    assert!(e.to_string().contains("bias"), "{e}");
}
