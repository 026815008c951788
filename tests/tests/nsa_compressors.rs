//! The NSA compressors besides the MLP against plain loops (f64 on Flex, random weights):
//! mean pooling with a per-head position embedding, softmax-weighted pooling with learned
//! per-head weights, a per-head linear map of the flattened window; the layer with each of
//! them (forward and finite-difference gradients of the compressor weights).

use burn::module::Param;
use burn::tensor::Tensor;
use burn_sparse_attn::NsaAttentionConfig;
use burn_sparse_attn::nsa::{AttentionPoolCompressor, CompressorKind, HeadLinearCompressor, MeanPosCompressor};
use sparse_attn_tests::*;

const B: usize = 2;
const H: usize = 2;
const S: usize = 11;
const D: usize = 3;
const L: usize = 4;
const STRIDE: usize = 2;

fn param3(v: &[f64], s: [usize; 3]) -> Param<Tensor<3>> {
    Param::from_tensor(tensor(v.to_vec(), s, &dev()))
}

/// `y[b][h][i][t][c]`: window `i`'s key `t` plus the embedding, as plain vectors.
fn windows(x: &[f64], pe: &[f64]) -> (usize, impl Fn(usize, usize, usize, usize, usize) -> f64) {
    let n = (S - L) / STRIDE + 1;
    let x = x.to_vec();
    let pe = pe.to_vec();
    (n, move |b, h, i, t, c| x[((b * H + h) * S + i * STRIDE + t) * D + c] + pe[(h * L + t) * D + c])
}

#[test]
fn mean_pos_matches_loops() {
    let mut rng = Rng::new(1);
    let (x, pe) = (rng.normals(B * H * S * D, 1.0), rng.normals(H * L * D, 1.0));
    let m = MeanPosCompressor { pos_emb: param3(&pe, [H, L, D]) };
    let got = values(m.forward(tensor(x.clone(), [B, H, S, D], &dev()), STRIDE).unwrap());
    let (n, y) = windows(&x, &pe);
    let mut want = Vec::new();
    for b in 0..B {
        for h in 0..H {
            for i in 0..n {
                for c in 0..D {
                    want.push((0..L).map(|t| y(b, h, i, t, c)).sum::<f64>() / L as f64);
                }
            }
        }
    }
    assert_close("mean pos", &got, &want, 1e-12, 1e-12);
}

#[test]
fn attention_pool_matches_loops() {
    let mut rng = Rng::new(2);
    let (x, pe, w) = (rng.normals(B * H * S * D, 1.0), rng.normals(H * L * D, 1.0), rng.normals(H * D * D, 0.5));
    let m = AttentionPoolCompressor { pos_emb: param3(&pe, [H, L, D]), weight: param3(&w, [H, D, D]) };
    let got = values(m.forward(tensor(x.clone(), [B, H, S, D], &dev()), STRIDE).unwrap());
    let (n, y) = windows(&x, &pe);
    let mut want = Vec::new();
    for b in 0..B {
        for h in 0..H {
            for i in 0..n {
                // logits[t][o] = sum_c y[t][c] W[h][c][o]; softmax over t per o.
                let logit = |t: usize, o: usize| (0..D).map(|c| y(b, h, i, t, c) * w[(h * D + c) * D + o]).sum::<f64>();
                for o in 0..D {
                    let mx = (0..L).map(|t| logit(t, o)).fold(f64::NEG_INFINITY, f64::max);
                    let z: f64 = (0..L).map(|t| (logit(t, o) - mx).exp()).sum();
                    want.push((0..L).map(|t| (logit(t, o) - mx).exp() / z * y(b, h, i, t, o)).sum::<f64>());
                }
            }
        }
    }
    assert_close("attention pool", &got, &want, 1e-12, 1e-12);
}

#[test]
fn head_linear_matches_loops() {
    let mut rng = Rng::new(3);
    let (x, pe) = (rng.normals(B * H * S * D, 1.0), rng.normals(H * L * D, 1.0));
    let (w, bias) = (rng.normals(H * L * D * D, 0.5), rng.normals(H * D, 0.5));
    let m = HeadLinearCompressor {
        pos_emb: param3(&pe, [H, L, D]),
        weight: param3(&w, [H, L * D, D]),
        bias: Param::from_tensor(tensor(bias.clone(), [H, D], &dev())),
    };
    let got = values(m.forward(tensor(x.clone(), [B, H, S, D], &dev()), STRIDE).unwrap());
    let (n, y) = windows(&x, &pe);
    let mut want = Vec::new();
    for b in 0..B {
        for h in 0..H {
            for i in 0..n {
                for o in 0..D {
                    let flat: f64 = (0..L * D).map(|f| y(b, h, i, f / D, f % D) * w[(h * L * D + f) * D + o]).sum();
                    want.push(flat + bias[h * D + o]);
                }
            }
        }
    }
    assert_close("head linear", &got, &want, 1e-12, 1e-12);
}

#[test]
fn compressor_config_builds_each_kind() {
    // Built from the config (identity pooling weights, small embeddings): finite tokens.
    for kind in [CompressorKind::Mlp, CompressorKind::MeanPos, CompressorKind::AttentionPool, CompressorKind::HeadLinear] {
        let c = burn_sparse_attn::nsa::CompressorConfig::new(kind, L, D, H).init(&dev()).unwrap();
        let x = Rng::new(4).randn([1, H, S, D], 1.0, &dev()).cast(burn::tensor::DType::F32);
        let out = values(c.forward(x, STRIDE).unwrap());
        assert_eq!(out.len(), H * ((S - L) / STRIDE + 1) * D, "{kind:?}");
        assert!(out.iter().all(|v| v.is_finite()), "{kind:?}");
    }
    let e = burn_sparse_attn::nsa::CompressorConfig::new(CompressorKind::HeadLinear, 0, D, H).init(&dev()).unwrap_err();
    assert!(e.to_string().contains("compress_block"), "{e}");
}

#[test]
fn a_sequence_shorter_than_a_window_compresses_to_no_token() {
    // As the packed ops do for such a sequence: `[b, h, 0, d]`, not an error; a zero stride
    // is still refused by name.
    use burn_sparse_attn::nsa::{TrailingWindow, compress_mean, compress_mean_with};
    let x = Rng::new(5).randn([B, H, L - 1, D], 1.0, &dev());
    for kind in [CompressorKind::Mlp, CompressorKind::MeanPos, CompressorKind::AttentionPool, CompressorKind::HeadLinear] {
        let c = burn_sparse_attn::nsa::CompressorConfig::new(kind, L, D, H).init(&dev()).unwrap();
        assert_eq!(c.forward(x.clone(), STRIDE).unwrap().dims(), [B, H, 0, D], "{kind:?}");
        let e = c.forward(x.clone(), 0).unwrap_err();
        assert!(e.to_string().contains("compress_stride"), "{kind:?}: {e}");
    }
    assert_eq!(compress_mean(x.clone(), L, STRIDE).unwrap().dims(), [B, H, 0, D]);
    assert_eq!(compress_mean_with(x.clone(), L, STRIDE, TrailingWindow::Drop).unwrap().dims(), [B, H, 0, D]);
    // The partial rule still pools the keys it has into one token.
    assert_eq!(compress_mean_with(x, L, STRIDE, TrailingWindow::Partial).unwrap().dims(), [B, H, 1, D]);
}

#[test]
fn nsa_layer_with_each_compressor_and_its_gradients() {
    for (kind, paths) in [
        (CompressorKind::MeanPos, vec!["compress_key.MeanPos.pos_emb", "compress_value.MeanPos.pos_emb"]),
        (CompressorKind::AttentionPool, vec!["compress_key.AttentionPool.pos_emb", "compress_key.AttentionPool.weight", "compress_value.AttentionPool.weight"]),
        (CompressorKind::HeadLinear, vec!["compress_key.HeadLinear.weight", "compress_key.HeadLinear.bias", "compress_value.HeadLinear.pos_emb"]),
    ] {
        let cfg = NsaAttentionConfig::new(8, 2)
            .with_n_kv_heads(Some(1))
            .with_compress_block(4)
            .with_compress_stride(2)
            .with_select_block(4)
            .with_top_n(2)
            .with_window(4)
            .with_compressor(kind);
        let m = module_to_f64(randomize_params(cfg.init(&ad_dev()).unwrap(), 130, 0.3));
        let mut rng = Rng::new(14);
        let x = tensor(rng.normals(10 * 8, 1.0), [1, 10, 8], &ad_dev());
        let w = rng.normals(10 * 8, 1.0);
        let loss = |m: &burn_sparse_attn::NsaAttention| {
            let out = m.forward(x.clone()).unwrap();
            (out * tensor(w.clone(), [1, 10, 8], &ad_dev())).sum()
        };
        module_grad_check(&format!("nsa layer {kind:?}"), &m, &paths, FdConfig { samples: 4, ..FdConfig::default() }, loss);
    }
}
