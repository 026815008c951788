//! A small decoder-only transformer whose attention layer is picked per block.
//!
//! `embedding -> N x [RMSNorm -> attention -> +, RMSNorm -> SwiGLU MLP -> +] -> RMSNorm -> head`.
//! Each attention layer comes from `burn-sparse-attn` and applies its own q/k/v/o projections
//! and RoPE; the head is tied to the embedding or a separate linear layer.

use burn::module::{Initializer, Module, Param};
use burn::nn::{Embedding, EmbeddingConfig, Linear, LinearConfig, RmsNorm, RmsNormConfig, SwiGlu, SwiGluConfig};
use burn::tensor::activation::silu;
use burn::tensor::{DType, Device, Int, Tensor};
use burn_sparse_attn::{AttentionMethod, BlockCoverage};
use burn_sparse_attn::rows::{grouped_linear, linear_rows, scale_columns};

use crate::AppResult;
use crate::config::RunConfig;
use crate::data::VOCAB_SIZE;

/// Burn's [`RmsNorm`] (same parameters, same numerics), with its weight applied through
/// [`scale_columns`]: its gradient sums over every row, which Burn's untuned reduction runs
/// with one unit per column (6.7 ms per norm at 32k tokens on an H200, five per step, a fifth
/// of the dense model's step; `docs/results/toy-lm-h200.md`).
pub fn rms_norm(norm: &RmsNorm, x: Tensor<3>) -> Tensor<3> {
    let dtype = x.dtype();
    let rms = (x.clone().cast(DType::F32).square().mean_dim(2) + norm.epsilon).sqrt();
    scale_columns(x / rms.cast(dtype), norm.gamma.val())
}

/// Burn's [`SwiGlu`] (`silu(x W_inner) * (x W_outer)`) through [`grouped_linear`].
fn swiglu(mlp: &SwiGlu, x: Tensor<3>) -> Tensor<3> {
    silu(grouped_linear(&mlp.linear_inner, x.clone())) * grouped_linear(&mlp.linear_outer, x)
}

/// Burn's [`Embedding`] lookup as a one-hot matmul: the lookup's gradient is a scatter-add of
/// every token's row into a `vocab`-row table (7 ms at 32k tokens and vocab 256 on an H200,
/// the updates of one row colliding); the matmul's is a row-grouped `one_hot^T dy`.
fn embed(embedding: &Embedding, tokens: Tensor<2, Int>) -> Tensor<3> {
    let weight = embedding.weight.val();
    let one_hot = tokens.one_hot::<3>(VOCAB_SIZE).float().cast(weight.dtype());
    linear_rows(one_hot, weight, None)
}

/// `RMSNorm -> attention -> residual, RMSNorm -> SwiGLU -> residual`.
#[derive(Module, Debug)]
pub struct Block {
    /// Pre-attention norm.
    pub attn_norm: RmsNorm,
    /// The attention layer.
    pub attn: AttentionMethod,
    /// Pre-MLP norm.
    pub mlp_norm: RmsNorm,
    /// Gated up-projection.
    pub mlp: SwiGlu,
    /// Down-projection.
    pub down: Linear,
    /// Token shift (`model.token_shift`): per channel, the share of the attention input
    /// taken from the position itself; the rest comes from the previous position.
    pub shift: Option<Param<Tensor<1>>>,
}

impl Block {
    /// The attention layer's input: the normed residual, token-shifted when configured.
    fn attn_input(&self, x: Tensor<3>) -> Tensor<3> {
        let h = rms_norm(&self.attn_norm, x);
        let Some(mix) = &self.shift else { return h };
        let [b, s, d] = h.dims();
        let prev = Tensor::zeros([b, 1, d], (&h.device(), h.dtype()));
        let prev = if s > 1 { Tensor::cat(vec![prev, h.clone().slice([0..b, 0..s - 1, 0..d])], 1) } else { prev };
        prev.clone() + scale_columns(h - prev, mix.val())
    }

    fn forward(&self, x: Tensor<3>, with_gate_loss: bool) -> AppResult<(Tensor<3>, Option<Tensor<1>>)> {
        let h = self.attn_input(x.clone());
        let (a, gate_loss) = if with_gate_loss {
            let out = self.attn.forward_with_aux(h)?;
            (out.output, out.aux_loss)
        } else {
            (self.attn.forward(h)?, None)
        };
        let x = x + a;
        let x = x.clone() + grouped_linear(&self.down, swiglu(&self.mlp, rms_norm(&self.mlp_norm, x)));
        Ok((x, gate_loss))
    }
}

/// Output of a forward pass.
#[derive(Debug, Clone)]
pub struct LmOutput {
    /// `[batch, seq, vocab]`.
    pub logits: Tensor<3>,
    /// Sum of the SeerAttention gate losses (when asked for and present).
    pub gate_loss: Option<Tensor<1>>,
}

/// The toy language model.
#[derive(Module, Debug)]
pub struct ToyLm {
    /// Token embedding `[vocab, d_model]`.
    pub embedding: Embedding,
    /// Transformer blocks.
    pub blocks: Vec<Block>,
    /// Final norm.
    pub norm: RmsNorm,
    /// Untied output head (`None` when tied to the embedding).
    pub head: Option<Linear>,
}

impl ToyLm {
    /// A freshly initialised model (seed the device first for reproducibility).
    pub fn new(cfg: &RunConfig, device: &Device) -> AppResult<Self> {
        cfg.validate()?;
        let m = &cfg.model;
        let d = m.d_model;
        let lin = |i, o| LinearConfig::new(i, o).with_bias(false).init(device);
        let blocks = m
            .layer_methods()
            .into_iter()
            .map(|method| {
                Ok(Block {
                    attn_norm: RmsNormConfig::new(d).init(device),
                    attn: cfg.attention_config(method).init(device)?,
                    mlp_norm: RmsNormConfig::new(d).init(device),
                    mlp: SwiGluConfig::new(d, m.mlp_hidden()).init(device),
                    down: lin(m.mlp_hidden(), d),
                    shift: m.token_shift.then(|| Param::from_tensor(Tensor::full([d], 0.5, device))),
                })
            })
            .collect::<AppResult<Vec<_>>>()?;
        Ok(Self {
            embedding: EmbeddingConfig::new(VOCAB_SIZE, d).with_initializer(Initializer::Normal { mean: 0.0, std: 0.02 }).init(device),
            blocks,
            norm: RmsNormConfig::new(d).init(device),
            head: (!m.tie_embeddings).then(|| lin(d, VOCAB_SIZE)),
        })
    }

    /// `tokens: [batch, seq]` to logits `[batch, seq, vocab]`; with `with_gate_loss` the
    /// SeerAttention layers also return their gate losses (summed).
    pub fn forward(&self, tokens: Tensor<2, Int>, with_gate_loss: bool) -> AppResult<LmOutput> {
        let mut x = embed(&self.embedding, tokens);
        let mut gate_loss: Option<Tensor<1>> = None;
        for block in &self.blocks {
            let (y, loss) = block.forward(x, with_gate_loss)?;
            x = y;
            gate_loss = match (gate_loss, loss) {
                (Some(a), Some(b)) => Some(a + b),
                (a, b) => a.or(b),
            };
        }
        let x = rms_norm(&self.norm, x);
        let logits = match &self.head {
            Some(head) => grouped_linear(head, x),
            None => linear_rows(x, self.embedding.weight.val().transpose(), None),
        };
        Ok(LmOutput { logits, gate_loss })
    }

    /// Which (query, key) pairs each block's attention attends for `tokens: [batch, seq]`,
    /// in `block x block` cells (see `burn_sparse_attn::coverage`), first block first.
    pub fn block_coverage(&self, tokens: Tensor<2, Int>, block: usize) -> AppResult<Vec<BlockCoverage>> {
        let mut x = embed(&self.embedding, tokens);
        let mut maps = Vec::with_capacity(self.blocks.len());
        for b in &self.blocks {
            maps.push(b.attn.block_coverage(b.attn_input(x.clone()), block)?);
            x = b.forward(x, false)?.0;
        }
        Ok(maps)
    }

    /// SeerAttention distillation: only the gates keep requiring gradients.
    pub fn freeze_all_but_gates(self) -> Self {
        Self {
            embedding: self.embedding.no_grad(),
            blocks: self
                .blocks
                .into_iter()
                .map(|b| Block {
                    attn_norm: b.attn_norm.no_grad(),
                    attn: b.attn.freeze_all_but_gates(),
                    mlp_norm: b.mlp_norm.no_grad(),
                    mlp: b.mlp.no_grad(),
                    down: b.down.no_grad(),
                    shift: b.shift.map(|p| p.set_require_grad(false)),
                })
                .collect(),
            norm: self.norm.no_grad(),
            head: self.head.map(|h| h.no_grad()),
        }
    }

    /// Whether any block has a SeerAttention gate.
    pub fn has_gates(&self) -> bool {
        self.blocks.iter().any(|b| b.attn.has_aux_loss())
    }

    /// Parameters that currently require gradients.
    pub fn trainable_params(&self) -> usize {
        struct Count(usize);
        impl burn::module::ModuleVisitor for Count {
            fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<Tensor<D>>) {
                if param.is_require_grad() {
                    self.0 += param.shape().num_elements();
                }
            }
        }
        let mut c = Count(0);
        self.visit(&mut c);
        c.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Distribution, TensorData};

    fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
        t.into_data().convert::<f32>().try_to_vec::<f32>().unwrap()
    }

    /// Element-wise `|a - b| <= tol (1 + |b|)`.
    fn assert_close(a: Vec<f32>, b: Vec<f32>, tol: f32, what: &str) {
        assert_eq!(a.len(), b.len(), "{what}: lengths");
        for (i, (a, b)) in a.iter().zip(&b).enumerate() {
            assert!((a - b).abs() <= tol * (1.0 + b.abs()), "{what} [{i}]: {a} vs {b}");
        }
    }

    /// Output, input gradient and weight gradient of [`rms_norm`] against Burn's `RmsNorm`,
    /// with rows that fold into groups (48 rows: 16) and rows that do not (7 rows: 1).
    #[test]
    fn rms_norm_matches_burns_output_and_gradients() {
        let device = Device::flex().autodiff();
        for shape in [[2, 24, 8], [1, 7, 8]] {
            let mut norm = RmsNormConfig::new(8).init(&device);
            let gamma: Vec<f32> = (0..8).map(|i| 0.5 + 0.25 * i as f32).collect();
            norm.gamma = norm.gamma.map(|_| Tensor::<1>::from_data(TensorData::new(gamma.clone(), [8]), &device).require_grad());
            let x = Tensor::<3>::random(shape, Distribution::Normal(0.0, 1.0), &device).require_grad();
            let w = Tensor::<3>::random(shape, Distribution::Normal(0.0, 1.0), &device);
            let ours = rms_norm(&norm, x.clone());
            let burns = norm.forward(x.clone());
            let g_ours = (ours.clone() * w.clone()).sum().backward();
            let g_burn = (burns.clone() * w).sum().backward();
            let close = |a, b, what: &str| assert_close(a, b, 1e-5, &format!("{what} {shape:?}"));
            close(values(ours), values(burns), "output");
            close(values(x.grad(&g_ours).unwrap()), values(x.grad(&g_burn).unwrap()), "d x");
            close(values(norm.gamma.val().grad(&g_ours).unwrap()), values(norm.gamma.val().grad(&g_burn).unwrap()), "d gamma");
        }
    }

    /// Token shift: with the mix at 1 the attention input is the normed residual itself, at
    /// 0 the previous position's (zeros at the first); in between, the blend per channel.
    /// The mix gets a gradient, and a model without the option has no mix parameter.
    #[test]
    fn token_shift_blends_each_position_with_the_previous_one() {
        let device = Device::flex().autodiff();
        let mut cfg = RunConfig::default();
        cfg.model.token_shift = true;
        let model = ToyLm::new(&cfg, &device).unwrap();
        let block = &model.blocks[0];
        let d = cfg.model.d_model;
        let x = Tensor::<3>::random([2, 5, d], Distribution::Normal(0.0, 1.0), &device);
        let h = values(rms_norm(&block.attn_norm, x.clone()));
        let with_mix = |m: f32| {
            let mut b = block.clone();
            b.shift = Some(Param::from_tensor(Tensor::full([d], m, &device)));
            b
        };
        assert_close(values(with_mix(1.0).attn_input(x.clone())), h.clone(), 1e-6, "mix 1");
        let shifted = values(with_mix(0.0).attn_input(x.clone()));
        let row = |v: &[f32], b: usize, t: usize| v[(b * 5 + t) * d..(b * 5 + t + 1) * d].to_vec();
        for b in 0..2 {
            assert!(row(&shifted, b, 0).iter().all(|v| *v == 0.0), "first position of sequence {b}");
            for t in 1..5 {
                assert_close(row(&shifted, b, t), row(&h, b, t - 1), 1e-6, &format!("mix 0, {b},{t}"));
            }
        }
        let half = values(with_mix(0.25).attn_input(x.clone()));
        let want: Vec<f32> = (0..2 * 5 * d).map(|i| 0.25 * h[i] + 0.75 * shifted[i]).collect();
        assert_close(half, want, 1e-5, "mix 0.25");
        let grads = block.attn_input(x).sum().backward();
        assert!(block.shift.as_ref().unwrap().val().grad(&grads).is_some(), "the mix learns");
        cfg.model.token_shift = false;
        assert!(ToyLm::new(&cfg, &device).unwrap().blocks.iter().all(|b| b.shift.is_none()));
    }

    /// The one-hot embedding and the grouped SwiGLU against Burn's modules: outputs and the
    /// gradients of the input and of every weight.
    #[test]
    fn embedding_and_swiglu_match_burns() {
        let device = Device::flex().autodiff();
        let embedding = EmbeddingConfig::new(VOCAB_SIZE, 8).init(&device);
        let ids: Vec<i64> = (0..2 * 4096).map(|i| (i * 7 + i / 3) as i64 % VOCAB_SIZE as i64).collect();
        let tokens = Tensor::<2, Int>::from_data(TensorData::new(ids, [2, 4096]), &device);
        let w = Tensor::<3>::random([2, 4096, 8], Distribution::Normal(0.0, 1.0), &device);
        let ours = embed(&embedding, tokens.clone());
        let burns = embedding.forward(tokens);
        let g_ours = (ours.clone() * w.clone()).sum().backward();
        let g_burn = (burns.clone() * w.clone()).sum().backward();
        let close = |a, b, what: &str| assert_close(a, b, 1e-4, what);
        close(values(ours), values(burns), "embedding output");
        let table = embedding.weight.val();
        close(values(table.grad(&g_ours).unwrap()), values(table.grad(&g_burn).unwrap()), "d embedding");

        let mlp = SwiGluConfig::new(8, 5).init(&device);
        let x = Tensor::<3>::random([2, 4096, 8], Distribution::Normal(0.0, 1.0), &device).require_grad();
        let w = Tensor::<3>::random([2, 4096, 5], Distribution::Normal(0.0, 1.0), &device);
        let ours = swiglu(&mlp, x.clone());
        let burns = mlp.forward(x.clone());
        let g_ours = (ours.clone() * w.clone()).sum().backward();
        let g_burn = (burns.clone() * w).sum().backward();
        close(values(ours), values(burns), "swiglu output");
        close(values(x.grad(&g_ours).unwrap()), values(x.grad(&g_burn).unwrap()), "swiglu d x");
        for (lin, what) in [(&mlp.linear_inner, "inner"), (&mlp.linear_outer, "outer")] {
            let wt = lin.weight.val();
            close(values(wt.grad(&g_ours).unwrap()), values(wt.grad(&g_burn).unwrap()), what);
        }
    }
}
