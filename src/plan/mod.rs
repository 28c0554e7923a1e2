//! The memory planner: what a model takes on the device before anything is allocated, class by
//! class, whether it fits a budget, and what to change when it does not. No GPU is touched.
//!
//! Every architecture wgllm runs is planned from its own forward pass: LLaMA-family decoders,
//! GPT-2 (`wgllm run`) and the BERT encoder (`wgllm embed`, a batch of sequences per pass). GPT-3
//! is described with GPT-2's formulas and marked so ([`MemoryPlan::described_only`]).
//!
//! Classes (each exact for wgllm's own buffers, the overhead stated):
//! - parameters: LLaMA: [`params::weight_bytes`] (block formats for embeddings and matrices, f32
//!   norms); GPT-2 and BERT: what their loaders upload ([`uploads`]), sharded as the device stores
//!   matrices;
//! - KV cache: `ctx * bytes_per_token(kv, n_kv_heads, head_dim)` per layer, as `KvCache` allocates
//!   (none for BERT, which attends over each pass's own K and V); a sliding-window layer keeps a
//!   ring of `min(ctx, window + chunk - 1)` positions instead ([`kv_layer_positions`]);
//! - activations: the shared buffers of the pass's schedule ([`activations::llama_activation_plan`],
//!   [`gpt2::gpt2_activation_plan`] for the chunk size; [`bert::bert_activation_plan`] for the
//!   batch);
//! - staging: one upload chunk (`min(STAGING_CHUNK, largest uploaded buffer)`, the load path) plus
//!   the readback (`min(STAGING_CHUNK, logits)`, or BERT's hidden states), counted together
//!   although the load and the run do not overlap, so that streaming layers while running stays
//!   covered;
//! - kernel params: the uniform buffer of one submission, one [`PARAM_SLOT`]-aligned slot per
//!   dispatch (a params block over 256 bytes takes several slots), the last one unpadded;
//! - overhead: [`OVERHEAD_PERCENT`] % of the above plus [`OVERHEAD_FIXED`]. The percentage covers
//!   the driver's allocation granularity and alignment (Vulkan allocators place buffers in larger
//!   memory blocks); the fixed part covers the device context, pipelines, shader modules, bind
//!   groups and command buffers, which wgpu does not report. Both are estimates, deliberately on
//!   the safe side of what lavapipe and desktop Vulkan drivers show.
//!
//! [`TrainPlan`] is the contrast: what fine-tuning the same model with Adam would take.

pub mod activations;
pub mod bert;
pub mod gpt2;
mod passes;
mod report;
mod streaming;
pub mod svg;
mod train;
pub mod types;
pub mod uploads;

pub use activations::{llama_activation_plan, ActivationPlan, PlannedBuffer};
pub use bert::bert_activation_plan;
pub use gpt2::gpt2_activation_plan;
pub use streaming::{gguf_layer_bytes, LayerBytes, Limits};
pub use train::TrainPlan;
pub use types::{config_type_table, gguf_type_table, TypeRow, TypeTable};

use serde::{Serialize, Serializer};

use crate::error::{Error, Result};
use crate::gpu::buffer::STAGING_CHUNK;
use crate::gpu::WeightLayout;
use crate::kernels::attention::{bytes_per_token, ring_slots, KvDtype};
use crate::kernels::weights::WeightStorage;
use crate::model::config::{Arch, ModelConfig};
use crate::model::params::{self, Precision, WeightBytes};
use crate::quant::WeightFormat;
use activations::Kernel;

/// KV caches a run keeps: one per sequence slot for the LLaMA family, else one.
pub fn kv_slots(cfg: &ModelConfig, opts: &PlanOptions) -> u64 {
    match cfg.arch {
        Arch::Llama => opts.parallel.max(1) as u64,
        _ => 1,
    }
}

/// Decode rows of a batched step the activations hold (0: no slots beside the one sequence):
/// the slots, at most a chunk (`model::llama::batch_rows`).
pub fn batch_rows(cfg: &ModelConfig, opts: &PlanOptions) -> usize {
    match cfg.arch {
        Arch::Llama if opts.parallel > 1 => opts.parallel.min(opts.chunk.max(1)),
        _ => 0,
    }
}

/// Positions each layer's KV cache holds at context `ctx` with prefill chunks of up to `chunk`
/// tokens, as the LLaMA pass allocates them: `ctx` for a global layer, the ring's
/// [`ring_slots`] (`min(ctx, window + chunk - 1)`) for a layer with a sliding window
/// ([`ModelConfig::layer_window`]).
pub fn kv_layer_positions(cfg: &ModelConfig, ctx: usize, chunk: usize) -> Vec<u64> {
    (0..cfg.n_layers)
        .map(|l| ring_slots(ctx, cfg.layer_window(l), chunk) as u64)
        .collect()
}

pub const MIB: u64 = 1 << 20;
pub const GIB: u64 = 1 << 30;
/// Bytes of one kernel-params slot: wgpu's default `min_uniform_buffer_offset_alignment`.
pub const PARAM_SLOT: u64 = 256;
/// wgpu's default `max_storage_buffer_binding_size` (also lavapipe's): weights are sharded to it.
pub const DEFAULT_MAX_BINDING: u64 = 128 * MIB;
/// Device overhead: this share of all planned buffers ...
pub const OVERHEAD_PERCENT: u64 = 3;
/// ... plus this much for the driver and pipeline objects.
pub const OVERHEAD_FIXED: u64 = 64 * MIB;

/// Batch and sequence length of a fine-tuning run, for [`TrainPlan`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct TrainOptions {
    pub batch: usize,
    pub seq: usize,
}

/// What to plan for. `PlanOptions { precision, kv, ctx, budget, ..Default::default() }`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PlanOptions {
    pub precision: Precision,
    #[serde(serialize_with = "kv_name")]
    pub kv: KvDtype,
    /// KV cache positions; for an encoder (BERT), the tokens of each sequence. Models with
    /// learned positions are capped at their table, as their loaders cap them.
    pub ctx: usize,
    /// Sequences an encoder (BERT) encodes in one pass; decoders ignore it.
    pub batch: usize,
    /// Tokens per prefill chunk; activations are sized for it (1: decode only).
    pub chunk: usize,
    /// Device bytes available, if known.
    pub budget: Option<u64>,
    pub train: Option<TrainOptions>,
    /// Logits for every token of a chunk (`RunOptions::all_logits`).
    pub all_logits: bool,
    /// Storage binding limit weights are sharded to (it sets the dispatch count).
    pub max_binding: u64,
    /// Where the device keeps weight matrices (textures are sharded by rows at
    /// `max_texture_dim`, and pad f32/f16 rows to whole texels).
    pub weight_layout: WeightLayout,
    /// The device's largest texture side (texture layout only).
    pub max_texture_dim: u32,
    /// Q/K/V and gate/up run as one dispatch each (weights stacked in one texture or buffer; see
    /// [`crate::kernels::matmul::matmul_fused`]): fewer kernel parameter blocks. The plan stacks
    /// a model's groups where [`WeightStorage::stacks`] says the upload does (same format, one
    /// binding or texture), each group on its own.
    pub stacked_projections: bool,
    /// Chunks of several tokens run them stacked too (the subgroup matvec); elsewhere single
    /// tokens and decode rows only ([`activations::Fusions::stacked_chunks`]).
    pub stacked_chunks: bool,
    /// A single token's norms, SwiGLU and residual adds folded into the projections
    /// ([`crate::kernels::matmul::single_token_folds`]): up to four dispatches less a layer in
    /// decode, and a different sharing of the activations (see [`activations::Fusions`]).
    pub single_token_folds: bool,
    /// The norms fold into projections of any size (the workgroup matvec), not only up to
    /// [`crate::kernels::matmul::NORM_FOLD_MAX_WEIGHTS`] (see [`activations::Fusions`]).
    pub unbounded_norm_folds: bool,
    /// The device runs the subgroup attention (CPU devices); otherwise the grouped workgroup
    /// decode kernel (GPUs). Either splits a long context's keys in a decode step
    /// ([`crate::kernels::attention::key_splits`], by its own rule): a decode step's attention is
    /// two dispatches (the split and the merge) once the context allows it (the plan counts the
    /// step at the context's end).
    pub split_attention: bool,
    /// The device's uniform-buffer offset alignment: each dispatch's params take a slot of this
    /// granularity (256 by default, WebGPU's; lavapipe's is 32).
    pub param_align: u64,
    /// Sequence slots of a LLaMA-family model (`RunOptions::parallel`, `wgllm serve
    /// --parallel`): a KV cache each, and the buffers of a batched decode step of up to that many
    /// rows ([`activations::add_batch_buffers`]).
    pub parallel: usize,
}

impl Default for PlanOptions {
    /// `RunOptions`' chunk of 64, f16 weights and KV cache, ctx 2048, batch 1, no budget.
    fn default() -> Self {
        PlanOptions {
            precision: Precision::F16,
            kv: KvDtype::F16,
            ctx: 2048,
            batch: 1,
            chunk: 64,
            budget: None,
            train: None,
            all_logits: false,
            max_binding: DEFAULT_MAX_BINDING,
            weight_layout: WeightLayout::Buffers,
            max_texture_dim: 8192,
            stacked_projections: false,
            stacked_chunks: false,
            single_token_folds: false,
            unbounded_norm_folds: false,
            split_attention: false,
            param_align: PARAM_SLOT,
            parallel: 1,
        }
    }
}

impl PlanOptions {
    /// How weight matrices are stored and sharded under these options.
    pub fn weight_storage(&self) -> WeightStorage {
        WeightStorage {
            layout: self.weight_layout,
            max_binding: self.max_binding,
            max_texture_dim: self.max_texture_dim,
        }
    }

    /// Sets the device-dependent fields (binding limit, weight layout, texture size, uniform
    /// alignment, which kernel variants run) from what is known of a device.
    pub fn for_device(mut self, d: &DeviceTraits) -> PlanOptions {
        self.max_binding = d.max_binding;
        self.weight_layout = d.weight_layout;
        self.max_texture_dim = d.max_texture_dim;
        let fusions = d.fusions();
        self.stacked_projections = fusions.stacked_projections;
        self.stacked_chunks = fusions.stacked_chunks;
        self.single_token_folds = d.single_token_folds;
        self.unbounded_norm_folds = d.fusions().unbounded_norm_folds;
        self.split_attention = d.subgroup_matvec;
        self.param_align = d.param_align;
        self
    }
}

/// What a memory plan needs to know of a device: its limits, where it keeps weight matrices and
/// which kernel variants it runs. Plain data, so that planning never needs an open device:
/// [`crate::kernels::device_traits`] reads them from one, and [`Default`] is a WebGPU-default
/// device that runs the portable kernels from buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct DeviceTraits {
    pub max_binding: u64,
    pub weight_layout: WeightLayout,
    pub max_texture_dim: u32,
    /// The device runs the subgroup matvec and attention (CPU Vulkan devices).
    pub subgroup_matvec: bool,
    /// A single token's norms, SwiGLU and residual adds fold into the projections (every device
    /// now: both matvec kernels fold).
    pub single_token_folds: bool,
    pub param_align: u64,
}

impl Default for DeviceTraits {
    fn default() -> Self {
        DeviceTraits {
            max_binding: DEFAULT_MAX_BINDING,
            weight_layout: WeightLayout::Buffers,
            max_texture_dim: 8192,
            subgroup_matvec: false,
            single_token_folds: true,
            param_align: PARAM_SLOT,
        }
    }
}

impl DeviceTraits {
    /// The fusions of the forward pass on this device that change the activation plan: the
    /// stacked projections (every device: textures are read by the subgroup matvec alone, buffers
    /// by both matvec kernels; for chunks of several tokens the subgroup one only), the
    /// single-token folds, their norms unbounded where the workgroup matvec runs (every device
    /// but the subgroup matvec's).
    pub fn fusions(&self) -> activations::Fusions {
        activations::Fusions {
            stacked_projections: self.weight_layout == WeightLayout::Buffers
                || self.subgroup_matvec,
            stacked_gate_up: self.weight_layout == WeightLayout::Buffers || self.subgroup_matvec,
            stacked_chunks: self.subgroup_matvec,
            single_token_folds: self.single_token_folds,
            unbounded_norm_folds: self.single_token_folds && !self.subgroup_matvec,
        }
    }
}

fn kv_name<S: Serializer>(kv: &KvDtype, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_str(kv.name())
}

/// [`OVERHEAD_PERCENT`] % of `sum`, rounded up, plus [`OVERHEAD_FIXED`].
pub fn overhead(sum: u64) -> u64 {
    sum.saturating_mul(OVERHEAD_PERCENT)
        .div_ceil(100)
        .saturating_add(OVERHEAD_FIXED)
}

/// The device memory of one inference configuration.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MemoryPlan {
    pub cfg: ModelConfig,
    /// The options planned for: as given, except `ctx` capped at a learned position table.
    pub options: PlanOptions,
    /// wgllm has a forward pass for this architecture (`wgllm run`, or `wgllm embed` for BERT).
    pub runs_here: bool,
    /// Where it has none (GPT-3): a line saying so, and that the figures come from the same
    /// formulas (the GPT-2 pass at this size).
    pub described_only: Option<String>,
    /// What the figures are, where the architecture makes it worth saying (BERT's parameters are
    /// what it uploads, not its checkpoint; a ctx capped at the learned positions).
    pub notes: Vec<String>,
    pub weights: WeightBytes,
    /// Parameters and bytes per GGUF type: of the config at the precision (LLaMA-family models),
    /// or of the file's own tensors ([`MemoryPlan::use_gguf_weights`]); empty for GPT-2 and
    /// BERT, whose loaders upload other tensors than the checkpoint's.
    pub tensor_types: TypeTable,
    /// The weights are a GGUF file's own tensor types ([`MemoryPlan::use_gguf_weights`]), not
    /// `options.precision`.
    pub weights_from_file: bool,
    /// One layer's weights; `parameters_bytes = n_layers * layer_weight_bytes +
    /// other_weight_bytes`. A K-quant mix's layers differ: this is the largest (what a streaming
    /// slot must hold), and `other_weight_bytes` is what remains, less than its global tensors.
    pub layer_weight_bytes: u64,
    pub other_weight_bytes: u64,
    pub parameters_bytes: u64,
    /// One token in one layer, K and V together.
    pub kv_bytes_per_token_layer: u64,
    /// KV-cache positions of all layers together: `n_layers * ctx` unless some layers keep a
    /// sliding window's ring ([`kv_layer_positions`]).
    pub kv_positions: u64,
    /// Layers whose cache is a sliding window's ring shorter than the context.
    pub kv_ring_layers: usize,
    pub kv_cache_bytes: u64,
    pub activations: ActivationPlan,
    pub activation_bytes: u64,
    pub staging_upload_bytes: u64,
    pub staging_readback_bytes: u64,
    pub staging_bytes: u64,
    /// Dispatches of one chunk with logits (embedding, all layers, head); of one batch for an
    /// encoder.
    pub dispatches_per_chunk: u64,
    /// Dispatches of one batched decode step of `parallel` rows at the context's end (all
    /// layers resident); 0 without slots.
    pub dispatches_per_batch_step: u64,
    pub kernel_params_bytes: u64,
    pub overhead_bytes: u64,
    pub total_bytes: u64,
    pub train: Option<TrainPlan>,
    /// Layers kept on the device when the rest stream through the slot pool
    /// ([`MemoryPlan::with_streaming`]); `None`: every layer resident.
    pub resident_layers: Option<usize>,
    /// Dispatches and kernel params of the forward pass's parts, which a streamed run submits
    /// separately.
    pub submissions: Submissions,
    /// Things that would stop the load even within budget (a buffer over the binding limit), or
    /// look unintended (ctx past the trained context).
    pub warnings: Vec<String>,
}

/// Dispatches and kernel-params bytes of part of a forward pass. A submission's uniform buffer
/// holds every dispatch's params block at a slot-aligned offset, so each block but the last
/// takes whole slots: `params_bytes` counts them all padded, `tail_slack` is the padding the
/// last block does not take.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Tally {
    pub dispatches: u64,
    pub params_bytes: u64,
    pub tail_slack: u64,
}

impl Tally {
    /// This part, then `next`, in one submission.
    pub fn then(self, next: Tally) -> Tally {
        Tally {
            dispatches: self.dispatches + next.dispatches,
            params_bytes: self.params_bytes + next.params_bytes,
            tail_slack: if next.dispatches > 0 {
                next.tail_slack
            } else {
                self.tail_slack
            },
        }
    }

    /// This part `n` times in a row.
    pub fn times(self, n: u64) -> Tally {
        Tally {
            dispatches: self.dispatches * n,
            params_bytes: self.params_bytes * n,
            tail_slack: if n > 0 { self.tail_slack } else { 0 },
        }
    }

    /// Bytes of the uniform buffer of a submission of this part.
    pub fn uniform_bytes(self) -> u64 {
        self.params_bytes - self.tail_slack
    }
}

/// The forward pass's parts: the embedding, one layer (resident, and streamed: from buffers,
/// never stacked), and the head.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Submissions {
    pub prologue: Tally,
    pub layer: Tally,
    pub streamed_layer: Tally,
    pub epilogue: Tally,
}

impl MemoryPlan {
    /// Plans `cfg` under `opts`. LLaMA-family models, GPT-2 and BERT are planned from the forward
    /// passes wgllm runs; GPT-3 ([`Arch::Gpt3`]) from GPT-2's, as a description
    /// ([`MemoryPlan::described_only`]). Models with learned positions cap `ctx` at their table,
    /// as their loaders do; for BERT `ctx` is the tokens of each of `batch` sequences.
    pub fn new(cfg: &ModelConfig, opts: PlanOptions) -> Result<MemoryPlan> {
        if opts.ctx == 0 || opts.chunk == 0 || opts.batch == 0 {
            return Err(Error::invalid(
                "plan",
                format!(
                    "ctx {}, chunk {} and batch {} must be at least 1",
                    opts.ctx, opts.chunk, opts.batch
                ),
            ));
        }
        if opts.precision.is_mix() && cfg.arch != Arch::Llama {
            // The GPT-2 and BERT loaders upload one format for every matrix (`uploads`).
            return Err(Error::invalid(
                "plan",
                format!(
                    "{} is one of llama.cpp's K-quant mixes, planned for LLaMA-family models; {} \
                     takes a single format (f32, f16, bf16, q8_0, q4_0, q4_1)",
                    opts.precision,
                    cfg.arch.name()
                ),
            ));
        }
        let mut opts = opts;
        let mut warnings = Vec::new();
        let mut notes = Vec::new();
        let learned = cfg.positions == crate::model::config::Positions::Learned;
        if learned && opts.ctx > cfg.max_positions {
            let what = if cfg.arch == Arch::Bert {
                "sequence length"
            } else {
                "ctx"
            };
            notes.push(format!(
                "{what} {} is capped at the model's {} learned positions, as its loader caps it",
                opts.ctx, cfg.max_positions
            ));
            opts.ctx = cfg.max_positions;
        } else if opts.ctx > cfg.max_positions {
            warnings.push(format!(
                "ctx {} is past the model's trained context of {} positions",
                opts.ctx, cfg.max_positions
            ));
        }
        let encoder = cfg.arch == Arch::Bert;
        if !encoder {
            opts.kv.check_head_dim(cfg.head_dim)?;
        }
        let pass = match cfg.arch {
            Arch::Llama => passes::llama(cfg, &opts)?,
            Arch::Gpt2 | Arch::Gpt3 => passes::gpt2(cfg, &opts)?,
            Arch::Bert => passes::bert(cfg, &opts)?,
        };
        let described_only = (cfg.arch == Arch::Gpt3).then(|| {
            format!(
                "described only: wgllm has no forward pass for {} (its alternating dense and \
                 locally banded sparse attention has no kernel here); the figures are the GPT-2 \
                 pass's, from the same formulas, at this size",
                cfg.arch.name()
            )
        });
        match cfg.arch {
            Arch::Bert => notes.push(format!(
                "parameters as `wgllm embed` uploads them: no pooler, and the position and token \
                 type tables summed into one f32 table of {} rows; no KV cache (an encoder \
                 attends within each pass); activations for {} sequences of up to {} tokens",
                opts.ctx, opts.batch, opts.ctx
            )),
            Arch::Gpt2 | Arch::Gpt3 => notes.push(
                "parameters as the GPT-2 loader uploads them: c_attn split into Q, K and V, the \
                 head tied to wte"
                    .into(),
            ),
            Arch::Llama => {}
        }
        let (p, l) = (opts.precision, cfg.n_layers as u64);
        let fmt = p.storage();
        let weights = params::weight_bytes(cfg, p);
        let tensor_types = match cfg.arch {
            Arch::Llama => types::config_type_table(cfg, p, opts.weight_storage())?,
            Arch::Gpt2 | Arch::Gpt3 | Arch::Bert => TypeTable::default(),
        };
        let kv_bpt = pass.kv_bytes_per_token_layer;
        let kv_positions = pass
            .kv_positions
            .iter()
            .fold(0, |a: u64, &b| a.saturating_add(b));
        let kv_ring_layers = pass
            .kv_positions
            .iter()
            .filter(|&&n| n < opts.ctx as u64)
            .count();
        // Every sequence slot has the whole cache.
        let kv_positions = kv_positions.saturating_mul(kv_slots(cfg, &opts));
        let kv_cache_bytes = kv_positions.saturating_mul(kv_bpt);
        let activations = pass.activations;

        let align4 = |b: u64| b.div_ceil(4) * 4;
        let staging_upload_bytes = align4(pass.largest_upload);
        let staging_readback_bytes = align4(pass.readback.min(STAGING_CHUNK));

        // Kernel params: every dispatch of one chunk (an encoder: one batch), layers unrolled, in
        // one submission ([`Tally`]); a streamed run submits its parts apart ([`Submissions`]).
        let storage = opts.weight_storage();
        let sched = &pass.schedule;
        let slot = opts.param_align.max(1);
        // Dispatches and kernel-params bytes of a list of steps, with matrices sharded as
        // `storage` shards them.
        // `rows` > 0: a batched decode step of that many rows, whose projections dispatch as a
        // single token's (folds included) and whose RoPE/store and attention run once for all
        // rows (once per K/V buffer where the slots' caches are split over several: at most
        // `row_runs`), the attention split as a decode step's at the context's end.
        let longest_ring = pass.kv_positions.iter().copied().max().unwrap_or(0);
        let slot_bytes = longest_ring.saturating_mul(kv_bpt) / 2;
        let n_slots = kv_slots(cfg, &opts) as usize;
        let per_buffer =
            crate::kernels::attention::slots_per_buffer(slot_bytes, opts.max_binding, n_slots);
        let kv_buffers = n_slots.div_ceil(per_buffer) as u64;
        let tally_rows =
            |steps: &[activations::Step], storage: WeightStorage, rows: u64| -> Result<Tally> {
                let shards = |f: WeightFormat, rows: usize, cols: usize| -> Result<u64> {
                    Ok(rows.div_ceil(storage.rows_per_shard(f, rows, cols)?) as u64)
                };
                let tokens = if rows > 0 { 1 } else { opts.chunk };
                let mut t = Tally::default();
                for s in steps {
                    let k = s.kernel;
                    let n = match k {
                        Kernel::Host | Kernel::Copy => 0,
                        _ if !s.folds.dispatches(tokens) => 0,
                        Kernel::RopeStore if rows > 0 => rows.min(kv_buffers),
                        Kernel::Attention if rows > 0 => {
                            rows.min(kv_buffers) * (1 + u64::from(pass.row_split_keys))
                        }
                        Kernel::Attention if pass.split_keys => 2,
                        Kernel::DenseAttention { sequences } => sequences as u64,
                        Kernel::Embedding { rows, cols } | Kernel::Matmul { rows, cols } => {
                            let f = if cfg.arch == Arch::Llama {
                                fmt
                            } else {
                                uploads::matrix_format(p, cols)
                            };
                            shards(f, rows, cols)?
                        }
                        Kernel::TableF32 { rows, cols } => shards(WeightFormat::F32, rows, cols)?,
                        _ => 1,
                    };
                    if n > 0 {
                        let padded = k.params_bytes().div_ceil(slot) * slot;
                        t = t.then(Tally {
                            dispatches: n,
                            params_bytes: n * padded,
                            tail_slack: padded - k.params_bytes(),
                        });
                    }
                }
                Ok(t)
            };
        let tally =
            |steps: &[activations::Step], storage: WeightStorage| tally_rows(steps, storage, 0);
        let layer = tally(&sched.layer, storage)?;
        let submissions = Submissions {
            prologue: tally(&sched.prologue, storage)?,
            layer,
            // Streamed layers run from buffers, unstacked (see `with_streaming`).
            streamed_layer: match &pass.streamed_layer {
                Some(steps) => tally(steps, WeightStorage::buffers(storage.max_binding))?,
                None => layer,
            },
            epilogue: tally(&sched.epilogue, storage)?,
        };
        let chunk = submissions
            .prologue
            .then(submissions.layer.times(l))
            .then(submissions.epilogue);
        let dispatches = chunk.dispatches;
        let mut kernel_params_bytes = chunk.uniform_bytes();
        let rows = batch_rows(cfg, &opts) as u64;
        let mut dispatches_per_batch_step = 0;
        if rows > 1 {
            // A batched decode step is one submission too (resident layers); its uniform buffer
            // may be the larger one.
            let step = tally_rows(&sched.prologue, storage, rows)?
                .then(tally_rows(&sched.layer, storage, rows)?.times(l))
                .then(tally_rows(&sched.epilogue, storage, rows)?);
            kernel_params_bytes = kernel_params_bytes.max(step.uniform_bytes());
            dispatches_per_batch_step = step.dispatches;
        }

        let longest = pass.kv_positions.iter().copied().max().unwrap_or(0);
        let kv_buffer = longest.saturating_mul(kv_bpt) / 2;
        if kv_buffer > opts.max_binding {
            warnings.push(format!(
                "each layer's K and V buffers take {kv_buffer} bytes, over the {}-byte binding limit",
                opts.max_binding
            ));
        }
        for b in activations
            .buffers
            .iter()
            .filter(|b| b.bytes > opts.max_binding)
        {
            warnings.push(format!(
                "activation buffer '{}' takes {} bytes, over the {}-byte binding limit",
                b.label, b.bytes, opts.max_binding
            ));
        }

        // A K-quant mix is booked as its per-type table counts it: each tensor sharded and laid
        // out as the device stores it, as a GGUF file's tensors are.
        let parameters_bytes = if p.is_mix() && cfg.arch == Arch::Llama {
            tensor_types.total.uploaded_bytes
        } else {
            pass.parameters_bytes
        };
        let staging_bytes = staging_upload_bytes + staging_readback_bytes;
        let activation_bytes = activations.total_bytes;
        let sum = [
            kv_cache_bytes,
            activation_bytes,
            staging_bytes,
            kernel_params_bytes,
        ]
        .iter()
        .try_fold(parameters_bytes, |a, b| a.checked_add(*b));
        // Every size above saturates rather than wraps; a saturated one makes this sum overflow.
        let too_big = || Error::invalid("plan", "the planned sizes overflow 64 bits");
        let sum = sum.filter(|&s| s < u64::MAX / 2).ok_or_else(too_big)?;
        let overhead_bytes = overhead(sum);
        Ok(MemoryPlan {
            weights_from_file: false,
            cfg: cfg.clone(),
            runs_here: described_only.is_none(),
            described_only,
            notes,
            train: opts.train.map(|t| TrainPlan::new(cfg, t)),
            options: opts,
            parameters_bytes,
            weights,
            tensor_types,
            layer_weight_bytes: pass.layer_weight_bytes,
            other_weight_bytes: parameters_bytes
                .saturating_sub(l.saturating_mul(pass.layer_weight_bytes)),
            kv_bytes_per_token_layer: kv_bpt,
            kv_positions,
            kv_ring_layers,
            kv_cache_bytes,
            activations,
            activation_bytes,
            staging_upload_bytes,
            staging_readback_bytes,
            staging_bytes,
            dispatches_per_chunk: dispatches,
            dispatches_per_batch_step,
            kernel_params_bytes,
            overhead_bytes,
            total_bytes: sum + overhead_bytes,
            resident_layers: None,
            submissions,
            warnings,
        })
    }

    /// `(class, bytes)` in report order; they add up to `total_bytes`.
    pub fn classes(&self) -> [(&'static str, u64); 6] {
        [
            ("parameters", self.parameters_bytes),
            ("kv cache", self.kv_cache_bytes),
            ("activations", self.activation_bytes),
            ("staging", self.staging_bytes),
            ("kernel params", self.kernel_params_bytes),
            ("overhead", self.overhead_bytes),
        ]
    }

    /// wgllm's own buffers, without the overhead estimate: what the ledger books (and
    /// `--budget` caps).
    pub fn buffers_bytes(&self) -> u64 {
        self.total_bytes - self.overhead_bytes
    }

    /// Within the budget (always, without one).
    pub fn fits(&self) -> bool {
        self.options.budget.is_none_or(|b| self.total_bytes <= b)
    }

    /// The training footprint fits the budget, if both are given.
    pub fn train_fits(&self) -> Option<bool> {
        Some(self.train.as_ref()?.total_bytes <= self.options.budget?)
    }

    /// What would fit, when there is a budget and this plan exceeds it.
    pub fn suggestions(&self) -> Option<Suggestions> {
        let budget = self.options.budget?;
        if self.fits() {
            return None;
        }
        let fits_sum = |sum: u64| sum.saturating_add(overhead(sum)) <= budget;
        let encoder = self.cfg.arch == Arch::Bert;
        let base = self.buffers_bytes().saturating_sub(self.kv_cache_bytes);
        // The KV cache at another ctx: every layer's positions, sliding windows capped.
        let kv_at = |c: u64| {
            let positions = kv_layer_positions(&self.cfg, c as usize, self.options.chunk);
            let n = positions.iter().fold(0, |a: u64, &b| a.saturating_add(b));
            n.saturating_mul(kv_slots(&self.cfg, &self.options))
                .saturating_mul(self.kv_bytes_per_token_layer)
        };
        // Largest ctx below the requested one whose total fits (a decoder's activations do not
        // depend on it).
        let longest_ctx = last_fitting(1, self.options.ctx as u64, |c| {
            fits_sum(base.saturating_add(kv_at(c)))
        })
        .filter(|_| !encoder)
        .map(|c| c as usize);

        let replan =
            |o: PlanOptions| MemoryPlan::new(&self.cfg, PlanOptions { train: None, ..o }).ok();
        let with = |precision, kv| {
            replan(PlanOptions {
                precision,
                kv,
                ..self.options.clone()
            })
        };
        // An encoder's activations grow with its batch and sequence length: re-planned.
        let encoder_fit = |batch: u64, ctx: u64| {
            replan(PlanOptions {
                batch: batch as usize,
                ctx: ctx as usize,
                ..self.options.clone()
            })
            .is_some_and(|p| p.fits())
        };
        let (b, c) = (self.options.batch as u64, self.options.ctx as u64);
        let largest_batch = last_fitting(1, b, |x| encoder_fit(x, c))
            .filter(|_| encoder)
            .map(|x| x as usize);
        let longest_seq = last_fitting(1, c, |x| encoder_fit(b, x))
            .filter(|_| encoder)
            .map(|x| x as usize);
        let kv_alternatives = KvDtype::ALL
            .into_iter()
            .filter(|_| !encoder)
            .filter(|&k| {
                bytes_per_token(k, 1, self.cfg.head_dim)
                    < bytes_per_token(self.options.kv, 1, self.cfg.head_dim)
            })
            .filter_map(|k| with(self.options.precision, k))
            .map(|p| PlanFit {
                name: p.options.kv.name().to_string(),
                total_bytes: p.total_bytes,
                fits: p.fits(),
            })
            .collect();
        // llama.cpp's K-quant mixes are candidates where the recipe applies (LLaMA's tensors).
        let mixes = Precision::K_MIXES
            .into_iter()
            .filter(|_| self.cfg.arch == Arch::Llama);
        let mut by_bytes: Vec<MemoryPlan> = Precision::ALL
            .into_iter()
            .chain(mixes)
            .filter_map(|p| with(p, self.options.kv))
            .collect();
        by_bytes.sort_by_key(|p| std::cmp::Reverse(p.parameters_bytes));
        let highest_precision = by_bytes.iter().find(|p| p.fits()).map(|p| PlanFit {
            name: p.options.precision.name().to_string(),
            total_bytes: p.total_bytes,
            fits: true,
        });

        // Streaming: keep r layers resident and cycle the rest through a pool of two layer slots.
        let (l, lb) = (self.cfg.n_layers as u64, self.layer_weight_bytes);
        let streamed_sum = |r: u64| {
            self.buffers_bytes()
                .saturating_sub((l - r).saturating_mul(lb))
                .saturating_add(STREAM_SLOTS.saturating_mul(lb))
        };
        // Only the LLaMA pass streams layers (`RunOptions::resident_layers`).
        let streaming = last_fitting(0, l, |r| fits_sum(streamed_sum(r)))
            .filter(|_| self.cfg.arch == Arch::Llama)
            .map(|r| Streaming {
                resident_layers: r as usize,
                streamed_layers: (l - r) as usize,
                slot_bytes: STREAM_SLOTS.saturating_mul(lb),
                total_bytes: streamed_sum(r).saturating_add(overhead(streamed_sum(r))),
            });
        Some(Suggestions {
            longest_ctx,
            kv_alternatives,
            highest_precision,
            streaming,
            largest_batch,
            longest_seq,
        })
    }

    /// The plan as JSON (every field, plus `fits` and `suggestions`).
    pub fn to_json(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(self).unwrap_or_default();
        if let Some(o) = v.as_object_mut() {
            o.insert("fits".into(), self.fits().into());
            o.insert(
                "suggestions".into(),
                serde_json::to_value(self.suggestions()).unwrap_or_default(),
            );
        }
        v
    }

    /// A text report: classes, budget, suggestions, parameter counts, bytes per precision.
    pub fn to_table(&self) -> String {
        report::table(self)
    }
}

/// The largest `x` in `lo..hi` with `fits(x)`, for `fits` true up to some point and false after.
fn last_fitting(lo: u64, hi: u64, fits: impl Fn(u64) -> bool) -> Option<u64> {
    if lo >= hi || !fits(lo) {
        return None;
    }
    let (mut yes, mut no) = (lo, hi);
    while no - yes > 1 {
        let mid = yes + (no - yes) / 2;
        if fits(mid) {
            yes = mid;
        } else {
            no = mid;
        }
    }
    Some(yes)
}

/// Layer slots of the streaming pool: one in use, one being uploaded.
pub const STREAM_SLOTS: u64 = 2;

/// A variant of the plan and whether it fits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PlanFit {
    /// KV dtype or precision name.
    pub name: String,
    pub total_bytes: u64,
    pub fits: bool,
}

/// Layer streaming that fits the budget.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Streaming {
    pub resident_layers: usize,
    pub streamed_layers: usize,
    /// The pool of [`STREAM_SLOTS`] layer slots.
    pub slot_bytes: u64,
    pub total_bytes: u64,
}

/// Ways to fit a budget the plan exceeds. `None` fields: nothing of that kind fits, or it does
/// not apply (a decoder's batch, an encoder's ctx and KV types, streaming outside LLaMA).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Suggestions {
    /// The longest context that fits with the requested KV dtype.
    pub longest_ctx: Option<usize>,
    /// Each smaller KV dtype at the requested ctx.
    pub kv_alternatives: Vec<PlanFit>,
    /// The largest weight precision that fits at the requested ctx and KV dtype.
    pub highest_precision: Option<PlanFit>,
    /// Layers to stream to fit at the requested precision (LLaMA-family models only).
    pub streaming: Option<Streaming>,
    /// An encoder's largest batch that fits at the requested sequence length.
    pub largest_batch: Option<usize>,
    /// An encoder's longest sequence that fits at the requested batch.
    pub longest_seq: Option<usize>,
}

impl MemoryPlan {
    /// Replaces the parameter bytes (e.g. with what a GGUF file's mixed formats really take) and
    /// recomputes the overhead and the total.
    pub fn set_parameter_bytes(&mut self, bytes: u64) {
        let rest = self.buffers_bytes() - self.parameters_bytes;
        self.parameters_bytes = bytes;
        self.other_weight_bytes =
            bytes.saturating_sub(self.cfg.n_layers as u64 * self.layer_weight_bytes);
        self.overhead_bytes = overhead(rest + bytes);
        self.total_bytes = rest + bytes + self.overhead_bytes;
    }
}

/// GPU bytes of every tensor of a GGUF file as wgllm uploads it (repacked, sharded and stored as
/// `storage` says, vectors in buffers rounded up to 4 bytes): what the ledger's parameters class
/// will hold.
pub fn gguf_parameter_bytes(g: &crate::loader::gguf::Gguf, storage: WeightStorage) -> Result<u64> {
    Ok(gguf_weight_bytes(g, storage)?.0)
}

impl MemoryPlan {
    /// Takes a GGUF file's real weights: its parameter bytes and its largest single upload (which
    /// sizes the staging chunk), in place of the estimate for one precision.
    pub fn use_gguf_weights(
        &mut self,
        g: &crate::loader::gguf::Gguf,
        storage: WeightStorage,
    ) -> Result<()> {
        let (total, largest) = gguf_weight_bytes(g, storage)?;
        self.set_parameter_bytes(total);
        self.tensor_types = types::gguf_type_table(g, storage)?;
        self.weights_from_file = true;
        let upload = largest.min(STAGING_CHUNK).div_ceil(4) * 4;
        let rest = self.buffers_bytes() - self.staging_bytes;
        self.staging_upload_bytes = upload;
        self.staging_bytes = upload + self.staging_readback_bytes;
        self.overhead_bytes = overhead(rest + self.staging_bytes);
        self.total_bytes = rest + self.staging_bytes + self.overhead_bytes;
        Ok(())
    }
}

/// (total GPU bytes, largest single upload chunk) of a GGUF file's tensors as wgllm uploads them.
fn gguf_weight_bytes(g: &crate::loader::gguf::Gguf, storage: WeightStorage) -> Result<(u64, u64)> {
    let mut total = 0u64;
    let mut largest = 0u64;
    for t in g.tensors() {
        let (bytes, upload) = gguf_tensor_bytes(t, storage)?;
        total += bytes;
        largest = largest.max(upload);
    }
    Ok((total, largest))
}

/// GPU bytes of one GGUF tensor as wgllm uploads it under `storage`, and its largest upload.
fn gguf_tensor_bytes(
    t: &crate::loader::gguf::TensorInfo,
    storage: WeightStorage,
) -> Result<(u64, u64)> {
    let (rows, cols) = types::gguf_rows_cols(&t.shape);
    types::upload_bytes(types::gguf_upload_format(t.ggml_type), rows, cols, storage)
}
