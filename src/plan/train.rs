//! The fine-tuning contrast ([`TrainPlan`]): what training the same model with Adam would take,
//! so that a plan shows why a model that runs in 12 GiB cannot be fine-tuned there.

use serde::Serialize;

use super::{overhead, TrainOptions};
use crate::model::config::ModelConfig;
use crate::model::params;

/// Fine-tuning footprint with Adam, for contrast with inference.
///
/// Weights, gradients and Adam's two moments: 16 bytes per parameter (f32 each; mixed precision
/// lands on the same 16: f16 weights and gradients plus f32 master weights, m and v, as in the
/// ZeRO paper). Activations kept for backward, per layer, from Korthikanti et al. 2022, "Reducing
/// Activation Recomputation in Large Transformer Models", eq. (1), without parallelism or
/// recomputation: `s*b*h*(34 + 5*a*s/h)` bytes = `34 s b h + 5 a s² b` for 16-bit activations
/// (and 1-byte dropout masks). The estimate is for GPT's 4h GeLU MLP; LLaMA's SwiGLU at ~2.7h
/// keeps about the same bytes, and f32 activations would nearly double them, so this is a floor.
/// Plus the f32 logits for the loss, `4 s b V`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TrainPlan {
    pub batch: usize,
    pub seq: usize,
    pub params: u64,
    pub weights_bytes: u64,
    pub gradients_bytes: u64,
    /// Adam's m and v.
    pub adam_bytes: u64,
    pub activation_bytes_per_layer: u64,
    pub logits_bytes: u64,
    /// All layers plus logits.
    pub activation_bytes: u64,
    pub overhead_bytes: u64,
    pub total_bytes: u64,
}

impl TrainPlan {
    pub fn new(cfg: &ModelConfig, t: TrainOptions) -> TrainPlan {
        let p = params::count(cfg).total;
        let (s, b) = (t.seq as u64, t.batch as u64);
        let (h, a) = (cfg.hidden_size as u64, cfg.n_heads as u64);
        let sbh = s.saturating_mul(b).saturating_mul(h);
        let per_layer = sbh.saturating_mul(34).saturating_add(
            5u64.saturating_mul(a)
                .saturating_mul(s)
                .saturating_mul(s)
                .saturating_mul(b),
        );
        let logits = (4 * s)
            .saturating_mul(b)
            .saturating_mul(cfg.vocab_size as u64);
        let activation_bytes = per_layer
            .saturating_mul(cfg.n_layers as u64)
            .saturating_add(logits);
        let sum = [4, 4, 8].iter().fold(activation_bytes, |acc, k| {
            acc.saturating_add(p.saturating_mul(*k))
        });
        let overhead_bytes = overhead(sum);
        TrainPlan {
            batch: t.batch,
            seq: t.seq,
            params: p,
            weights_bytes: 4 * p,
            gradients_bytes: 4 * p,
            adam_bytes: 8 * p,
            activation_bytes_per_layer: per_layer,
            logits_bytes: logits,
            activation_bytes,
            overhead_bytes,
            total_bytes: sum.saturating_add(overhead_bytes),
        }
    }
}
