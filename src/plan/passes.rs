//! What each architecture's forward pass contributes to a [`super::MemoryPlan`]: its parameters
//! on the device, its KV cache per token, its activation plan and kernel schedule, what it reads
//! back. LLaMA-family models from the checkpoint's tensors; GPT-2 (and GPT-3, described with its
//! formulas) and BERT from what their loaders upload ([`super::uploads`]).

use super::activations::{self, ActivationPlan};
use super::uploads;
use super::{bert, gpt2, PlanOptions};
use crate::error::Result;
use crate::gpu::buffer::STAGING_CHUNK;
use crate::gpu::WeightLayout;
use crate::kernels::attention::bytes_per_token;
use crate::model::config::ModelConfig;
use crate::model::params::{self, ParamClass, TensorRole};

/// What one architecture's forward pass contributes to a plan.
pub(super) struct Pass {
    pub(super) parameters_bytes: u64,
    pub(super) layer_weight_bytes: u64,
    /// The largest single upload chunk of the weights.
    pub(super) largest_upload: u64,
    pub(super) kv_bytes_per_token_layer: u64,
    /// KV-cache positions of each layer (none for an encoder, which keeps none).
    pub(super) kv_positions: Vec<u64>,
    pub(super) activations: ActivationPlan,
    pub(super) schedule: activations::Schedule,
    /// Bytes one readback copies: the logits, or an encoder's hidden states.
    pub(super) readback: u64,
    /// A decode step's attention may split its keys (two dispatches; LLaMA's pass on devices
    /// with the subgroup kernel).
    pub(super) split_keys: bool,
    /// A batched decode step's rows split their keys (each row is a decode step; counted at the
    /// context's end).
    pub(super) row_split_keys: bool,
    /// A layer streamed through the slot pool, where it differs from a resident one (LLaMA's:
    /// slots are buffers, so its projections are never stacked); `None`: the same, or no
    /// streaming.
    pub(super) streamed_layer: Option<Vec<activations::Step>>,
}

/// LLaMA: parameters from the checkpoint's tensors ([`params::weight_bytes`]), the KV cache of
/// `n_kv_heads`, the activations of [`super::llama_activation_plan`] with the device's fusions.
pub(super) fn llama(cfg: &ModelConfig, opts: &PlanOptions) -> Result<Pass> {
    let p = opts.precision;
    let weights = params::weight_bytes(cfg, p);
    let tensors = params::typed_tensors(cfg, p);
    // One layer's weights: the largest layer's, since a K-quant mix gives some layers more bits
    // (every layer is the same otherwise).
    let mut per_layer = vec![0u64; cfg.n_layers];
    for t in &tensors {
        if let Some(l) = t.layer.and_then(|l| per_layer.get_mut(l)) {
            *l = l.saturating_add(t.bytes());
        }
    }
    let layer_weight_bytes = per_layer.iter().copied().max().unwrap_or(0);
    // Largest single upload chunk: of a shard's data or scales, or of a norm/bias vector.
    let storage = opts.weight_storage();
    let mut largest = 0u64;
    for t in &tensors {
        let b = match t.class {
            ParamClass::NormOrBias => t.bytes().min(STAGING_CHUNK),
            _ => {
                let per = storage
                    .rows_per_shard(t.format, t.rows, t.cols)?
                    .min(t.rows);
                storage.shard_upload_bytes(t.format, per, t.cols)
            }
        };
        largest = largest.max(b);
    }
    // In buffers, the upload stacks a layer's Q/K/V (gate/up) where they have one format and the
    // stack fits one binding in aligned slices (`WeightStorage::stacks`); the plan stacks a group
    // where every layer's does. (Textures: as the device says.)
    let stacks = |roles: &[TensorRole]| {
        (0..cfg.n_layers).all(|l| {
            let group: Vec<_> = roles
                .iter()
                .filter_map(|r| tensors.iter().find(|t| t.layer == Some(l) && t.role == *r))
                .collect();
            let parts: Vec<_> = group.iter().map(|t| (t.format, t.rows)).collect();
            group.len() == roles.len() && storage.stacks(&parts, group[0].cols)
        })
    };
    let textures = storage.layout == WeightLayout::Textures;
    let qkv = [TensorRole::AttnQ, TensorRole::AttnK, TensorRole::AttnV];
    let gate_up = [TensorRole::FfnGate, TensorRole::FfnUp];
    let fusions = activations::Fusions {
        stacked_projections: opts.stacked_projections && (textures || stacks(&qkv)),
        stacked_gate_up: opts.stacked_projections && (textures || stacks(&gate_up)),
        stacked_chunks: opts.stacked_chunks,
        single_token_folds: opts.single_token_folds,
        unbounded_norm_folds: opts.unbounded_norm_folds,
    };
    let mut activations =
        activations::llama_activation_plan_fused(cfg, opts.chunk, opts.all_logits, fusions);
    let rows = super::batch_rows(cfg, opts);
    if rows > 1 {
        activations::add_batch_buffers(&mut activations, cfg, rows);
    }
    // Where a decode step splits its keys at the context's end: on the subgroup kernel (CPU
    // devices) or the grouped workgroup kernel (GPUs), where the shape fits.
    let splits = |m: usize| {
        use crate::kernels::attention::{grouped_shape_fits, key_splits, subgroup_shape_fits};
        let group = cfg.n_heads / cfg.n_kv_heads.max(1);
        let subgroup = opts.split_attention && subgroup_shape_fits(cfg.head_dim, group);
        let fits = subgroup || (!opts.split_attention && grouped_shape_fits(cfg.head_dim, group));
        fits && key_splits(subgroup, m, opts.ctx) > 1
    };
    let (split_keys, row_split_keys) = (splits(opts.chunk), splits(1));
    let readback = role_bytes(&activations, "logits")
        .max(activations.buffer_of("batch.logits").map_or(0, |b| b.bytes));
    let unstacked = activations::Fusions {
        stacked_projections: false,
        stacked_gate_up: false,
        ..fusions
    };
    Ok(Pass {
        parameters_bytes: weights.exact_bytes,
        layer_weight_bytes,
        largest_upload: largest,
        kv_bytes_per_token_layer: bytes_per_token(opts.kv, cfg.n_kv_heads, cfg.head_dim),
        kv_positions: super::kv_layer_positions(cfg, opts.ctx, opts.chunk),
        schedule: activations::llama_schedule(cfg, opts.all_logits, fusions),
        streamed_layer: Some(activations::llama_schedule(cfg, opts.all_logits, unstacked).layer),
        activations,
        readback,
        split_keys,
        row_split_keys,
    })
}

/// GPT-2 (and GPT-3, described with the same formulas): what `Gpt2::load` uploads, a KV cache of
/// all heads over `ctx` positions, the activations of [`gpt2::gpt2_activation_plan`].
pub(super) fn gpt2(cfg: &ModelConfig, opts: &PlanOptions) -> Result<Pass> {
    let up = uploads::totals(
        &gpt2::gpt2_uploads(cfg),
        cfg.n_layers,
        opts.precision,
        opts.weight_storage(),
    )?;
    let activations = gpt2::gpt2_activation_plan(cfg, opts.chunk, opts.all_logits);
    Ok(Pass {
        parameters_bytes: up.total,
        layer_weight_bytes: up.per_layer,
        largest_upload: up.largest_chunk,
        kv_bytes_per_token_layer: bytes_per_token(opts.kv, cfg.n_kv_heads, cfg.head_dim),
        kv_positions: vec![opts.ctx as u64; cfg.n_layers],
        schedule: gpt2::gpt2_schedule(cfg, opts.all_logits),
        readback: role_bytes(&activations, "logits"),
        activations,
        split_keys: false,
        row_split_keys: false,
        streamed_layer: None,
    })
}

/// BERT: what `Bert::load` uploads for sequences of `ctx` tokens, no KV cache, the activations of
/// [`bert::bert_activation_plan`] for `batch` sequences, the hidden states read back.
pub(super) fn bert(cfg: &ModelConfig, opts: &PlanOptions) -> Result<Pass> {
    let up = uploads::totals(
        &bert::bert_uploads(cfg, opts.ctx),
        cfg.n_layers,
        opts.precision,
        opts.weight_storage(),
    )?;
    let activations = bert::bert_activation_plan(cfg, opts.batch, opts.ctx);
    Ok(Pass {
        parameters_bytes: up.total,
        layer_weight_bytes: up.per_layer,
        largest_upload: up.largest_chunk,
        kv_bytes_per_token_layer: 0,
        kv_positions: Vec::new(),
        schedule: bert::bert_schedule(cfg, opts.batch, opts.ctx),
        readback: role_bytes(&activations, "x"),
        activations,
        split_keys: false,
        row_split_keys: false,
        streamed_layer: None,
    })
}

/// The bytes of role `name` in `a` (0 if it has none).
fn role_bytes(a: &ActivationPlan, name: &str) -> u64 {
    a.roles
        .iter()
        .find(|r| r.name == name)
        .map_or(0, |r| r.bytes)
}
