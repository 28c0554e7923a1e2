//! The LLaMA family (llama, mistral, qwen2, gemma3): pre-norm decoder with RMSNorm, rotary
//! positions, grouped-query attention (optionally with Q/K/V biases, as qwen2), a SwiGLU FFN and a
//! tied or separate output head; Gemma 3 (`gemma_layer`) adds per-head q/k norms, norms after the
//! attention and the FFN, GeGLU and scaled embeddings. `forward` reads like the architecture: one
//! kernel call a line. The layer's tensors are declared once, in [`crate::model::layer`].

use crate::error::{Error, Result};
use crate::gpu::{Gpu, GpuBuffer, Recorder};
use crate::kernels::attention::{self, KvCache, KvDtype};
use crate::kernels::rope::RopeMode;
use crate::kernels::{activation, elementwise, embedding, matmul, norm, Tensor, WeightMatrix};
use crate::loader::gguf::Gguf;
use crate::model::config::{Arch, Ffn, Gemma, ModelConfig, Norm, Positions};
use crate::model::source::Source;
use crate::model::stream::{read_vector, HostLayer, HostMatrix, StreamedLayers};

pub use crate::model::layer::Layer;
use crate::model::layer::Names;

/// One layer's parameters on the GPU.
pub type LayerWeights = Layer<WeightMatrix, Tensor>;

/// All parameters.
pub struct LlamaWeights {
    pub embed: WeightMatrix,
    /// The resident layers, `0..layers.len()`.
    pub layers: Vec<LayerWeights>,
    /// The rest, streamed from host memory (`RunOptions::resident_layers`).
    pub streamed: Option<StreamedLayers>,
    pub norm: Tensor,
    /// `None` when the output head is the token embedding (tied).
    pub output: Option<WeightMatrix>,
}

/// Activations for one chunk of up to `chunk` tokens, allocated once, and the KV cache.
pub struct RunState {
    pub chunk: usize,
    /// Whether the logits buffer holds a row per token of a chunk.
    all_logits: bool,
    ids: GpuBuffer,
    x: Tensor,          // (chunk, d) residual stream
    x2: Tensor,         // (chunk, d) the residual after an add (ping-pong with x)
    xb: Tensor,         // (chunk, d) normed input of a block
    q: Tensor,          // (chunk, n_heads * head_dim)
    k: Tensor,          // (chunk, n_kv_heads * head_dim)
    v: Tensor,          // (chunk, n_kv_heads * head_dim)
    att: Tensor,        // (chunk, n_heads * head_dim)
    proj: Tensor,       // (chunk, d) output of attention / FFN projections
    gate: Tensor,       // (chunk, ffn)
    up: Tensor,         // (chunk, ffn)
    act: Tensor,        // (chunk, ffn) silu(gate) * up
    logits: Tensor,     // (chunk, vocab) or (1, vocab)
    partials: Tensor,   // a decode step's split attention state (attention::partials_bytes)
    qn: Option<Tensor>, // (chunk, n_heads * head_dim) Gemma's normalised q
    kn: Option<Tensor>, // (chunk, n_kv_heads * head_dim) Gemma's normalised k
    pub kv: Vec<KvCache>,
    /// What a batched decode step adds, where the model has more than one slot.
    batch: Option<BatchBuffers>,
}

/// The buffers of a batched decode step ([`crate::model::batch::BatchLm::decode_batch`]) beside
/// the chunk's: a logits row per decode row, the row table (each row's slot and position, written
/// once a step: [`attention::row_table`]) and the rows' split attention state.
struct BatchBuffers {
    logits: Tensor, // (batch_rows, vocab)
    rows: RowTable,
}

/// What the batched RoPE/store and attention dispatches read beside the activations.
#[derive(Clone)]
struct RowTable {
    /// `[batch_rows, 2]` u32: slot index and position per row.
    table: Tensor,
    /// `attention::partials_bytes` per row.
    partials: Tensor,
}

/// Decode rows per forward pass of a batched step: the slots, at most a chunk (the activation
/// buffers hold a chunk of rows).
pub fn batch_rows(opts: &RunOptions) -> usize {
    opts.parallel.min(opts.chunk.max(1))
}

/// Options for loading and running.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Context length (KV cache positions).
    pub ctx: usize,
    pub kv_dtype: KvDtype,
    /// Tokens per prefill chunk (activation buffers are sized for it).
    pub chunk: usize,
    /// Keep logits for every token of a chunk (perplexity, `wgllm logits`), not only the last.
    pub all_logits: bool,
    /// Layers kept on the GPU; the later ones are streamed from host memory through
    /// [`crate::model::stream::STREAM_SLOTS`] layer slots, for models larger than the VRAM budget.
    /// `None` keeps all resident.
    pub resident_layers: Option<usize>,
    /// Sequence slots ([`crate::model::batch::BatchLm`]), each with its own KV cache.
    pub parallel: usize,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            ctx: 2048,
            kv_dtype: KvDtype::F32,
            chunk: 64,
            all_logits: false,
            resident_layers: None,
            parallel: 1,
        }
    }
}

/// A loaded LLaMA-family model, ready to run.
pub struct Llama {
    pub cfg: ModelConfig,
    pub rope_mode: RopeMode,
    pub rope_theta: f32,
    pub rot_dim: usize,
    pub weights: LlamaWeights,
    pub state: RunState,
    pub opts: RunOptions,
    /// When set, every chunk is submitted with timestamp queries and its dispatch times are
    /// appended here (`wgllm profile`).
    pub profile: Option<Vec<crate::gpu::record::DispatchTime>>,
    /// The KV caches of the slots that are not active (`state.kv` is the active one's; its entry
    /// here is empty). Slot-major: each layer's caches of `slots_per_buffer` consecutive slots
    /// share one K and one V buffer ([`KvCache::slots_major`]).
    slot_kv: Vec<Vec<KvCache>>,
    active_slot: usize,
    /// Slots whose caches share buffers: all of them unless a layer's would pass one storage
    /// binding ([`attention::slots_per_buffer`]).
    slots_per_buffer: usize,
}

/// Reads a LLaMA-family config from GGUF metadata (`<arch>.*` keys).
pub fn config_from_gguf(g: &Gguf) -> Result<(ModelConfig, usize)> {
    let arch = g.architecture()?.to_string();
    if !matches!(arch.as_str(), "llama" | "mistral" | "qwen2" | "gemma3") {
        return Err(Error::BadFile {
            file: g.file().into(),
            reason: format!("architecture '{arch}' is not a LLaMA-family model"),
        });
    }
    let k = |s: &str| format!("{arch}.{s}");
    let hidden = g.get_u32(&k("embedding_length"))? as usize;
    let n_heads = g.get_u32(&k("attention.head_count"))? as usize;
    let n_kv_heads = g
        .get_u32(&k("attention.head_count_kv"))
        .map(|v| v as usize)
        .unwrap_or(n_heads);
    if n_heads == 0 {
        return Err(Error::BadFile {
            file: g.file().into(),
            reason: "attention.head_count is 0".into(),
        });
    }
    let head_dim = g
        .get_u32(&k("attention.key_length"))
        .map(|v| v as usize)
        .unwrap_or(hidden / n_heads);
    let gemma = arch == "gemma3";
    let embed = g.tensor("token_embd.weight")?;
    let vocab = embed.shape.get(1).copied().unwrap_or(0);
    let cfg = ModelConfig {
        arch: Arch::Llama,
        vocab_size: vocab,
        hidden_size: hidden,
        n_layers: g.get_u32(&k("block_count"))? as usize,
        n_heads,
        n_kv_heads,
        head_dim,
        ffn_size: g.get_u32(&k("feed_forward_length"))? as usize,
        max_positions: g
            .get_u32(&k("context_length"))
            .map(|v| v as usize)
            .unwrap_or(2048),
        norm: Norm::RmsNorm,
        norm_eps: g
            .get_f32(&k("attention.layer_norm_rms_epsilon"))
            .unwrap_or(1e-5) as f64,
        ffn: if gemma { Ffn::GeGluTanh } else { Ffn::SwiGlu },
        positions: Positions::Rotary {
            theta: g.get_f32(&k("rope.freq_base")).unwrap_or(10000.0) as f64,
        },
        tied_embeddings: g.tensor("output.weight").is_err(),
        attn_bias: g.tensor("blk.0.attn_q.bias").is_ok(),
        attn_out_bias: false,
        ffn_bias: false,
        type_vocab_size: 0,
        pooler: false,
        sliding_window: g
            .get_u32(&k("attention.sliding_window"))
            .ok()
            .map(|w| w as usize),
        window_layers: crate::model::config::WindowLayers::for_gguf_arch(&arch),
        // llama.cpp's Gemma 3: the scale from the head size, local layers at base 10,000 (its
        // `rope_freq_base_train_swa`), linear scaling where `rope.scaling.factor` is set.
        gemma: gemma.then(|| Gemma {
            query_pre_attn_scalar: head_dim as f64,
            rope_local_theta: 10_000.0,
            rope_scaling: match g.get_str(&k("rope.scaling.type")) {
                Ok("linear") => g.get_f32(&k("rope.scaling.factor")).unwrap_or(1.0) as f64,
                _ => 1.0,
            },
        }),
    };
    cfg.validate(&arch)?;
    let rot_dim = g
        .get_u32(&k("rope.dimension_count"))
        .map(|v| v as usize)
        .unwrap_or(head_dim);
    Ok((cfg, rot_dim))
}

impl Llama {
    /// Loads weights from `src`, checking every tensor's shape against `cfg`, and allocates the
    /// KV cache and activations. LLaMA GGUF files carry Q/K rows permuted for interleaved RoPE;
    /// Hugging Face checkpoints, and Gemma in either form (llama.cpp runs it NEOX-style and does
    /// not permute it), use rotate-half.
    pub fn load(
        gpu: &Gpu,
        cfg: ModelConfig,
        rot_dim: usize,
        src: &Source,
        opts: RunOptions,
    ) -> Result<Llama> {
        if cfg.arch != Arch::Llama {
            return Err(Error::invalid(
                "llama",
                format!("config is {:?}, not a LLaMA-family model", cfg.arch),
            ));
        }
        let Positions::Rotary { theta } = cfg.positions else {
            return Err(Error::invalid("llama", "LLaMA models use rotary positions"));
        };
        let names = Names {
            gguf: matches!(src, Source::Gguf(_) | Source::Synthetic { .. }),
            gemma: cfg.gemma.is_some(),
        };
        let rope_mode = if names.gguf && cfg.gemma.is_none() {
            RopeMode::Interleaved
        } else {
            RopeMode::Half
        };
        let d = cfg.hidden_size;
        let embed = src.matrix(gpu, names.global("embed"), cfg.vocab_size, d)?;
        let resident = opts
            .resident_layers
            .unwrap_or(cfg.n_layers)
            .min(cfg.n_layers);
        let layers = (0..resident)
            .map(|i| upload_layer(gpu, src, &cfg, &names, i))
            .collect::<Result<Vec<_>>>()?;
        // Streamed layers are repacked once, here, into host memory.
        let host = (resident..cfg.n_layers)
            .map(|i| {
                HostLayer::read(
                    &cfg,
                    &names,
                    i,
                    |n, rows, cols| HostMatrix::read(src, n, rows, cols, gpu.max_binding()),
                    |n, len, add_one| read_vector(src, n, len, add_one),
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let streamed = if host.is_empty() {
            None
        } else {
            let st = StreamedLayers::new(gpu, resident, host)?;
            log::info!(
                "streaming layers {resident}..{} from host memory ({} there, {} of GPU slots)",
                cfg.n_layers,
                crate::gpu::ledger::human_bytes(st.host_bytes()),
                crate::gpu::ledger::human_bytes(st.slot_bytes())
            );
            Some(st)
        };
        let norm = src.vector_plus(gpu, names.global("norm"), d, names.norms_add_one())?;
        let output = if cfg.tied_embeddings && !src.has(names.global("output")) {
            None
        } else {
            Some(src.matrix(gpu, names.global("output"), cfg.vocab_size, d)?)
        };
        let weights = LlamaWeights {
            embed,
            layers,
            streamed,
            norm,
            output,
        };
        let slots_per_buffer = kv_slots_per_buffer(gpu, &cfg, &opts);
        let mut slot_kv = kv_caches(gpu, &cfg, &opts, slots_per_buffer)?;
        let kv0 = std::mem::take(&mut slot_kv[0]);
        let state = RunState::new(gpu, &cfg, &opts, Some(kv0))?;
        Ok(Llama {
            slot_kv,
            active_slot: 0,
            slots_per_buffer,
            rope_theta: theta as f32,
            rot_dim,
            rope_mode,
            cfg,
            weights,
            state,
            opts,
            profile: None,
        })
    }

    /// Runs `tokens` at positions `pos0..` through the model, in chunks, and returns the logits of
    /// the last token (`[vocab]`), or of every token (`[n, vocab]`) with `all_logits`.
    pub fn forward(&mut self, gpu: &Gpu, tokens: &[u32], pos0: usize) -> Result<Vec<f32>> {
        embedding::check_ids(tokens, self.cfg.vocab_size)?;
        if tokens.is_empty() {
            return Err(Error::invalid("forward", "no tokens"));
        }
        if pos0 + tokens.len() > self.opts.ctx {
            return Err(Error::ContextFull {
                ctx: self.opts.ctx,
                needed: pos0 + tokens.len(),
            });
        }
        if self.state.all_logits != self.opts.all_logits {
            // The logits buffer's size (and so the plan) depends on it: re-plan, keeping the cache.
            let kv = std::mem::take(&mut self.state.kv);
            self.state = RunState::new(gpu, &self.cfg, &self.opts, Some(kv))?;
        }
        let (chunk, all) = (self.state.chunk, self.opts.all_logits);
        crate::model::generate::in_chunks(tokens, pos0, chunk, all, |c, pos, want| {
            self.forward_chunk(gpu, c, pos, want)
        })
    }

    /// One chunk of `m <= chunk` tokens: the embedding and the resident layers in one command
    /// buffer; each streamed layer in its own, submitted without waiting so the next layer's upload
    /// overlaps it. Waits once, at the end.
    fn forward_chunk(
        &mut self,
        gpu: &Gpu,
        tokens: &[u32],
        pos0: usize,
        want_logits: bool,
    ) -> Result<Vec<f32>> {
        self.forward_tokens(gpu, tokens, Seqs::Chunk { pos0 }, want_logits)
    }

    /// The forward pass of `tokens`: a chunk of one sequence (the active slot's), or one decode
    /// row per token of the batch `Seqs::Rows` (each of its own slot and position; every row's
    /// logits come back).
    fn forward_tokens(
        &mut self,
        gpu: &Gpu,
        tokens: &[u32],
        seqs: Seqs,
        want_logits: bool,
    ) -> Result<Vec<f32>> {
        let (cfg, s, profile) = (&self.cfg, &self.state, &mut self.profile);
        let LlamaWeights {
            embed,
            layers,
            streamed,
            norm: final_norm,
            output,
        } = &mut self.weights;
        let m = tokens.len();
        let d = cfg.hidden_size;
        let eps = cfg.norm_eps as f32;
        let step = match seqs {
            Seqs::Chunk { .. } => matmul::Step::Chunk,
            Seqs::Rows(_) => matmul::Step::Rows,
        };
        let a = ChunkViews::new(s, cfg, m, step)?;
        // Gemma scales attention by 1/sqrt(query_pre_attn_scalar), LLaMA by 1/sqrt(head_dim).
        let scale_by = cfg
            .gemma
            .map_or(cfg.head_dim as f64, |g| g.query_pre_attn_scalar);
        let mut args = LayerArgs {
            eps,
            scale: (1.0 / scale_by.sqrt()) as f32,
            rope_theta: self.rope_theta,
            rope_factor: 1.0,
            rope_mode: self.rope_mode,
            rot_dim: self.rot_dim,
        };
        // Layer l's caches and positions: the chunk's one, or each row's slot's.
        let slot_kv = &self.slot_kv;
        let active = self.active_slot;
        let caches = |l: usize| -> Result<Vec<(&KvCache, usize)>> {
            let of_slot = |slot: usize| -> Result<&KvCache> {
                let kv = if slot == active {
                    &s.kv
                } else {
                    &slot_kv[slot]
                };
                kv.get(l)
                    .ok_or_else(|| Error::invalid("llama", format!("slot {slot} has no layer {l}")))
            };
            match seqs {
                Seqs::Chunk { pos0 } => Ok(vec![(of_slot(active)?, pos0)]),
                Seqs::Rows(rows) => rows.iter().map(|r| Ok((of_slot(r.slot)?, r.pos))).collect(),
            }
        };
        gpu.write(&s.ids, 0, bytemuck::cast_slice(tokens))?;
        if let (Seqs::Rows(_), Some(b)) = (seqs, &s.batch) {
            // Every layer's slots lie alike in their buffers: layer 0's caches give the table.
            let table = attention::row_table(&caches(0)?)?;
            gpu.write(&b.rows.table.buf, 0, bytemuck::cast_slice(&table))?;
        }

        let mut rec = gpu.recorder();
        if cfg.gemma.is_some() {
            // Gemma scales the embeddings by sqrt(hidden) (HF rounds the factor to the weights'
            // dtype; here it stays f32).
            embedding::lookup(&mut rec, embed, &s.ids, m, &a.xb)?;
            elementwise::scale(&mut rec, &a.xb, (d as f32).sqrt(), &a.x)?;
        } else {
            embedding::lookup(&mut rec, embed, &s.ids, m, &a.x)?;
        }
        let layer = if cfg.gemma.is_some() {
            gemma_layer
        } else {
            layer
        };
        for l in 0..cfg.n_layers {
            if let Some((theta, factor)) = cfg.layer_rope(l) {
                args.rope_theta = theta as f32;
                args.rope_factor = factor as f32;
            }
            let kvs = caches(l)?;
            if let Some(lw) = layers.get(l) {
                layer(&mut rec, &a, lw, &kvs, &args)?;
                continue;
            }
            let st = streamed
                .as_mut()
                .ok_or_else(|| Error::invalid("llama", format!("layer {l} has no weights")))?;
            // Hand the GPU what is recorded (up to layer l - 1), and upload layer l while it runs.
            let index = submit(profile, std::mem::replace(&mut rec, gpu.recorder()), false)?;
            if l > st.first() {
                st.submitted(l - 1, index);
            }
            let lw = st.fetch(gpu, l)?;
            layer(&mut rec, &a, &lw, &kvs, &args)?;
        }
        if !want_logits {
            return submit(profile, rec, true).map(|_| Vec::new());
        }
        let r = &mut rec;
        let head = output.as_ref().unwrap_or(embed);
        let vocab = cfg.vocab_size;
        let (n_out, logits) = match (&seqs, &s.batch) {
            (Seqs::Rows(_), Some(b)) => (m, b.logits.view(&[m, vocab])?),
            (Seqs::Rows(_), None) => {
                return Err(Error::invalid("llama", "decode rows without batch buffers"))
            }
            _ if self.opts.all_logits => (m, s.logits.view(&[m, vocab])?),
            _ => (1, s.logits.view(&[1, vocab])?),
        };
        // Only the rows whose logits are wanted go through the final norm and the head.
        let last = if n_out == m {
            a.x.clone()
        } else {
            let row = s.proj.view(&[1, d])?;
            r.copy(
                &a.x.buf,
                ((m - 1) * d * 4) as u64,
                &row.buf,
                0,
                (d * 4) as u64,
            )?;
            row
        };
        let xn = s.xb.view(&[n_out, d])?;
        matmul::matmul_fused_norm_in(r, step, &[head], &last, final_norm, eps, &xn, &[&logits])?;
        submit(profile, rec, true)?;
        gpu.read_f32(&logits.buf, 0, n_out * vocab)
    }

    /// Layers on the GPU; the rest are streamed.
    pub fn resident_layers(&self) -> usize {
        self.weights.layers.len()
    }
}

/// The sequences of a forward pass: a chunk of the active slot's from `pos0`, or decode rows
/// of distinct slots.
#[derive(Clone, Copy)]
enum Seqs<'a> {
    Chunk { pos0: usize },
    Rows(&'a [crate::model::batch::BatchRow]),
}

/// What every layer of a chunk shares besides the activations.
struct LayerArgs {
    eps: f32,
    /// Attention scale, 1/sqrt(head_dim).
    scale: f32,
    rope_theta: f32,
    /// Linear RoPE scaling: positions divided by this (1: none; Gemma 3's global layers).
    rope_factor: f32,
    rope_mode: RopeMode,
    rot_dim: usize,
}

/// The activation buffers viewed at the chunk's `m` tokens.
struct ChunkViews {
    m: usize, // tokens
    /// A chunk of one sequence, or decode rows of several.
    step: matmul::Step,
    x: Tensor,  // (m, d) residual stream, entering and leaving each layer
    x2: Tensor, // (m, d) residual stream between the attention and the FFN block
    xb: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q3: Tensor, // (m, nh, hd)
    k3: Tensor, // (m, nkv, hd)
    v3: Tensor,
    att3: Tensor,
    att: Tensor,
    proj: Tensor,
    gate: Tensor,
    up: Tensor,
    act: Tensor,
    partials: Tensor,
    /// Gemma's per-head normalised q and k, `(m, nh, hd)` and `(m, nkv, hd)`.
    qn3: Option<Tensor>,
    kn3: Option<Tensor>,
    /// The row table and partials of a batched step, where the model has slots.
    rows: Option<RowTable>,
}

impl ChunkViews {
    fn new(s: &RunState, cfg: &ModelConfig, m: usize, step: matmul::Step) -> Result<ChunkViews> {
        let (d, hd, nh, nkv, ffn) = (
            cfg.hidden_size,
            cfg.head_dim,
            cfg.n_heads,
            cfg.n_kv_heads,
            cfg.ffn_size,
        );
        Ok(ChunkViews {
            m,
            step,
            rows: s.batch.as_ref().map(|b| b.rows.clone()),
            x: s.x.view(&[m, d])?,
            x2: s.x2.view(&[m, d])?,
            xb: s.xb.view(&[m, d])?,
            q: s.q.view(&[m, nh * hd])?,
            k: s.k.view(&[m, nkv * hd])?,
            v: s.v.view(&[m, nkv * hd])?,
            q3: s.q.view(&[m, nh, hd])?,
            k3: s.k.view(&[m, nkv, hd])?,
            v3: s.v.view(&[m, nkv, hd])?,
            att3: s.att.view(&[m, nh, hd])?,
            att: s.att.view(&[m, nh * hd])?,
            proj: s.proj.view(&[m, d])?,
            gate: s.gate.view(&[m, ffn])?,
            up: s.up.view(&[m, ffn])?,
            act: s.act.view(&[m, ffn])?,
            partials: s.partials.clone(),
            qn3: s.qn.as_ref().map(|t| t.view(&[m, nh, hd])).transpose()?,
            kn3: s.kn.as_ref().map(|t| t.view(&[m, nkv, hd])).transpose()?,
        })
    }
}

/// A matrix read from the source (its GGUF bytes, borrowed from the mapped file where they can
/// be) and not yet on the GPU.
struct PendingMatrix<'a> {
    name: String,
    format: crate::quant::WeightFormat,
    rows: usize,
    cols: usize,
    gguf: std::borrow::Cow<'a, [u8]>,
}

/// Reads layer `i` and uploads it, Q/K/V and gate/up each stacked in one texture or buffer where
/// their formats and sizes allow ([`Gpu::upload_weights_stacked`]), so that each group runs as
/// one dispatch.
fn upload_layer(
    gpu: &Gpu,
    src: &Source,
    cfg: &ModelConfig,
    names: &Names,
    i: usize,
) -> Result<LayerWeights> {
    let l = Layer::<PendingMatrix, Tensor>::read(
        cfg,
        names,
        i,
        |n, rows, cols| {
            let (format, gguf) = src.matrix_bytes(n, rows, cols)?;
            Ok(PendingMatrix {
                name: n.to_string(),
                format,
                rows,
                cols,
                gguf,
            })
        },
        |n, len, add_one| src.vector_plus(gpu, n, len, add_one),
    )?;
    let one = |p: &PendingMatrix| gpu.upload_weights(&p.name, p.format, p.rows, p.cols, &p.gguf);
    let stacked = |ps: &[&PendingMatrix]| -> Result<std::vec::IntoIter<WeightMatrix>> {
        let parts: Vec<_> = ps
            .iter()
            .map(|p| (p.name.as_str(), p.format, p.rows, &p.gguf[..]))
            .collect();
        Ok(gpu.upload_weights_stacked(ps[0].cols, &parts)?.into_iter())
    };
    let mut qkv = stacked(&[&l.wq, &l.wk, &l.wv])?;
    let mut gate_up = stacked(&[&l.w_gate, &l.w_up])?;
    let next = |it: &mut std::vec::IntoIter<WeightMatrix>| {
        it.next()
            .ok_or_else(|| Error::invalid("llama", "a stacked upload lost a matrix"))
    };
    // Fields are mapped in declaration order, so each stack hands its matrices out in turn.
    l.try_map(
        |role, p| match role {
            "attn_q" | "attn_k" | "attn_v" => next(&mut qkv),
            "ffn_gate" | "ffn_up" => next(&mut gate_up),
            _ => one(p),
        },
        |_, v| Ok(v.clone()),
    )
}

/// One decoder layer over the chunk; the residual stream enters and leaves in `a.x`.
fn layer(
    r: &mut Recorder,
    a: &ChunkViews,
    lw: &LayerWeights,
    kvs: &[(&KvCache, usize)],
    p: &LayerArgs,
) -> Result<()> {
    let step = a.step;
    // attention block: q (m, nh * hd), k and v (m, nkv * hd) of the normalised stream, one
    // dispatch where the weights are stacked (and the norm folded in for a single token)
    let qkv = [&lw.wq, &lw.wk, &lw.wv];
    matmul::matmul_fused_norm_in(
        r,
        step,
        &qkv,
        &a.x,
        &lw.attn_norm,
        p.eps,
        &a.xb,
        &[&a.q, &a.k, &a.v],
    )?;
    for (t, b) in [(&a.q, &lw.bq), (&a.k, &lw.bk), (&a.v, &lw.bv)] {
        if let Some(b) = b {
            elementwise::add_bias(r, t, b)?;
        }
    }
    // RoPE of q and k, and k and v into the cache, in one pass; then the attention
    rope_attend(r, a, &a.q3, &a.k3, kvs, p)?;
    // residual, then the FFN block's norm: where the norm folds into gate/up (a single token),
    // the add folds into the output projection; otherwise add and norm are one pass
    let (gate_up, gu_out) = ([&lw.w_gate, &lw.w_up], [&a.gate, &a.up]);
    if matmul::norm_folds_in(r.gpu(), step, &gate_up, a.m) && lw.bo.is_none() {
        matmul::matmul_add_in(r, step, &lw.wo, &a.att, &a.x, &a.proj, &a.x2)?;
        let (x2, ffn_norm) = (&a.x2, &lw.ffn_norm);
        matmul::matmul_fused_norm_in(r, step, &gate_up, x2, ffn_norm, p.eps, &a.xb, &gu_out)?;
    } else {
        matmul::matmul_in(r, step, &lw.wo, &a.att, &a.proj)?; // (m, d)
        bias(r, &a.proj, &lw.bo)?;
        norm::add_rms_norm(r, &a.x, &a.proj, &lw.ffn_norm, p.eps, &a.x2, &a.xb)?;
        matmul::matmul_fused_in(r, step, &gate_up, &a.xb, &gu_out)?; // (m, ffn) each
    }
    bias(r, &a.gate, &lw.b_gate)?;
    bias(r, &a.up, &lw.b_up)?;
    // x = x2 + (silu(gate) * up) w_downᵀ; SwiGLU and the residual add folded in where they can be
    let (gate, up, act) = (&a.gate, &a.up, &a.act);
    if lw.b_down.is_none() {
        let (x2, proj) = (&a.x2, &a.proj);
        matmul::matmul_swiglu_add_in(r, step, &lw.w_down, gate, up, act, x2, proj, &a.x)?;
    } else {
        matmul::matmul_swiglu_in(r, step, &lw.w_down, gate, up, act, &a.proj)?;
        bias(r, &a.proj, &lw.b_down)?;
        elementwise::add(r, &a.x2, &a.proj, &a.x)?;
    }
    Ok(())
}

/// One Gemma 3 decoder layer over the chunk: LLaMA's layer with q and k normalised per head
/// before RoPE, a norm on the attention's and the FFN's output before each residual add, and
/// GeGLU; the residual stream enters and leaves in `a.x`.
fn gemma_layer(
    r: &mut Recorder,
    a: &ChunkViews,
    lw: &LayerWeights,
    kvs: &[(&KvCache, usize)],
    p: &LayerArgs,
) -> Result<()> {
    let step = a.step;
    let missing = |what: &str| Error::invalid("gemma3", format!("no {what} for a Gemma layer"));
    let (qn3, kn3) = (
        a.qn3.as_ref().ok_or_else(|| missing("qn buffer"))?,
        a.kn3.as_ref().ok_or_else(|| missing("kn buffer"))?,
    );
    let norm_of = |v: &Option<Tensor>, what| v.as_ref().ok_or_else(|| missing(what)).cloned();
    let (q_norm, k_norm) = (
        norm_of(&lw.q_norm, "q_norm")?,
        norm_of(&lw.k_norm, "k_norm")?,
    );
    let post_attn_norm = norm_of(&lw.post_attn_norm, "post_attention_norm")?;
    let post_ffn_norm = norm_of(&lw.post_ffn_norm, "post_ffw_norm")?;
    // attention block: q (m, nh * hd), k and v (m, nkv * hd) of the normalised stream
    let qkv = [&lw.wq, &lw.wk, &lw.wv];
    let qkv_out = [&a.q, &a.k, &a.v];
    matmul::matmul_fused_norm_in(r, step, &qkv, &a.x, &lw.attn_norm, p.eps, &a.xb, &qkv_out)?;
    // RMSNorm of every query and key head (rows of head_dim), then RoPE and the cache store
    norm::rms_norm(r, &a.q3, &q_norm, p.eps, qn3)?; // (m, nh, hd)
    norm::rms_norm(r, &a.k3, &k_norm, p.eps, kn3)?; // (m, nkv, hd)
    rope_attend(r, a, qn3, kn3, kvs, p)?;
    matmul::matmul_in(r, step, &lw.wo, &a.att, &a.proj)?; // (m, d)
                                                          // x2 = x + post_attn_norm(proj); the FFN's input is ffn_norm(x2)
    norm::rms_norm(r, &a.proj, &post_attn_norm, p.eps, &a.xb)?;
    norm::add_rms_norm(r, &a.x, &a.xb, &lw.ffn_norm, p.eps, &a.x2, &a.proj)?;
    let gate_up = [&lw.w_gate, &lw.w_up];
    matmul::matmul_fused_in(r, step, &gate_up, &a.proj, &[&a.gate, &a.up])?; // (m, ffn)
    activation::geglu_tanh(r, &a.gate, &a.up, &a.act)?;
    matmul::matmul_in(r, step, &lw.w_down, &a.act, &a.proj)?; // (m, d)
                                                              // x = x2 + post_ffw_norm(proj)
    norm::rms_norm(r, &a.proj, &post_ffn_norm, p.eps, &a.xb)?;
    elementwise::add(r, &a.x2, &a.xb, &a.x)?;
    Ok(())
}

/// RoPE of `q3` and `k3`, `k3` and `a.v3` into the cache, and the attention of `q3` over it
/// into `a.att3`, for every layer of the family. A chunk is one sequence (`kvs` one cache and
/// its first position); decode rows each have their cache and position (read by the kernels
/// from the row table), all rows in one dispatch of each kernel, each row computed exactly as
/// the same kernels compute a single token, so that a row's result does not depend on the
/// batch.
fn rope_attend(
    r: &mut Recorder,
    a: &ChunkViews,
    q3: &Tensor,
    k3: &Tensor,
    kvs: &[(&KvCache, usize)],
    p: &LayerArgs,
) -> Result<()> {
    let (theta, factor, mode, rot) = (p.rope_theta, p.rope_factor, p.rope_mode, p.rot_dim);
    // A local layer's window (Gemma 3's, Mistral's) lives in its cache (`KvCache::windowed`, a
    // ring): every store and attention kernel masks to it from there.
    if let [(kv, pos0)] = kvs {
        if a.step == matmul::Step::Chunk || a.m == 1 {
            attention::rope_store_scaled(r, kv, q3, k3, &a.v3, *pos0, theta, factor, mode, rot)?;
            let (partials, out) = (&a.partials, &a.att3);
            return attention::attention_split(r, q3, kv, *pos0, p.scale, partials, out);
        }
    }
    if kvs.len() != a.m {
        return Err(Error::invalid(
            "llama",
            format!("{} decode rows and {} caches", a.m, kvs.len()),
        ));
    }
    let rows = a
        .rows
        .as_ref()
        .ok_or_else(|| Error::invalid("llama", "decode rows without batch buffers"))?;
    // One dispatch each for every run of rows whose slots share buffers (all rows, unless the
    // slots' caches are split over several buffers); every row's RoPE and store before any
    // row's attention, as the schedule's two steps (att may share k's buffer).
    let runs = buffer_runs(kvs);
    let table = &rows.table.buf;
    for &(row0, n) in &runs {
        let group = &kvs[row0..row0 + n];
        attention::rope_store_rows(
            r, group, table, row0, q3, k3, &a.v3, theta, factor, mode, rot,
        )?;
    }
    for &(row0, n) in &runs {
        let group = &kvs[row0..row0 + n];
        let (partials, out) = (&rows.partials, &a.att3);
        attention::attention_rows(r, group, table, row0, q3, p.scale, partials, out)?;
    }
    Ok(())
}

/// Runs of consecutive decode rows whose caches share buffers: (first row, rows).
fn buffer_runs(kvs: &[(&KvCache, usize)]) -> Vec<(usize, usize)> {
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for (i, (kv, _)) in kvs.iter().enumerate() {
        match runs.last_mut() {
            Some((r0, n)) if kvs[*r0].0.shares_buffers(kv) => *n += 1,
            _ => runs.push((i, 1)),
        }
    }
    runs
}

/// Adds an optional bias to every row of `y`.
fn bias(r: &mut Recorder, y: &Tensor, b: &Option<Tensor>) -> Result<()> {
    match b {
        Some(b) => elementwise::add_bias(r, y, b),
        None => Ok(()),
    }
}

impl crate::model::generate::CausalLm for Llama {
    fn forward(&mut self, gpu: &Gpu, tokens: &[u32], pos0: usize) -> Result<Vec<f32>> {
        Llama::forward(self, gpu, tokens, pos0)
    }
    fn vocab_size(&self) -> usize {
        self.cfg.vocab_size
    }
    fn context(&self) -> usize {
        self.opts.ctx
    }
    fn set_all_logits(&mut self, all: bool) {
        self.opts.all_logits = all;
    }
    fn weight_bytes_per_token(&self) -> u64 {
        let w = &self.weights;
        let layers: u64 = w
            .layers
            .iter()
            .flat_map(|l| l.matrices())
            .map(|m| m.bytes())
            .sum();
        let streamed = w.streamed.as_ref().map_or(0, |s| s.matrix_bytes());
        layers + streamed + w.output.as_ref().unwrap_or(&w.embed).bytes()
    }
    fn kv_bytes_per_token(&self, pos: usize) -> u64 {
        let per = crate::kernels::attention::bytes_per_token(
            self.opts.kv_dtype,
            self.cfg.n_kv_heads,
            self.cfg.head_dim,
        );
        per * self.cfg.n_layers as u64 * (pos as u64 + 1)
    }
    fn resident_layers(&self) -> Option<usize> {
        self.weights
            .streamed
            .as_ref()
            .map(|_| self.weights.layers.len())
    }
    fn set_profiling(&mut self, on: bool) {
        self.profile = if on { Some(Vec::new()) } else { None };
    }
    fn take_profile(&mut self) -> Vec<crate::gpu::record::DispatchTime> {
        self.profile
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }
}

/// Submits `rec`, timed when profiling (which waits). Otherwise with `wait` false it returns at
/// once, with the submission to wait for.
fn submit(
    profile: &mut Option<Vec<crate::gpu::record::DispatchTime>>,
    rec: Recorder,
    wait: bool,
) -> Result<Option<wgpu::SubmissionIndex>> {
    match profile.as_mut() {
        Some(p) => p.extend(rec.submit_timed()?),
        None if wait => rec.submit()?,
        None => return rec.submit_no_wait(),
    }
    Ok(None)
}

impl RunState {
    /// Allocates the activations exactly as the memory planner shares them
    /// ([`crate::plan::activations::llama_activation_plan`]): one buffer per planned buffer, each
    /// role a prefix view of its buffer, so `wgllm plan` and the ledger agree byte for byte.
    fn new(
        gpu: &Gpu,
        cfg: &ModelConfig,
        opts: &RunOptions,
        kv: Option<Vec<KvCache>>,
    ) -> Result<RunState> {
        let c = opts.chunk.max(1);
        let (d, hd) = (cfg.hidden_size, cfg.head_dim);
        let fusions = crate::kernels::device_traits(gpu).fusions();
        let mut plan =
            crate::plan::activations::llama_activation_plan_fused(cfg, c, opts.all_logits, fusions);
        if opts.parallel > 1 {
            crate::plan::activations::add_batch_buffers(&mut plan, cfg, batch_rows(opts));
        }
        let acts = crate::model::planned::PlannedActivations::allocate(gpu, plan, "act")?;
        let role = |name: &str, shape: &[usize]| acts.role(name, shape);
        let gemma = cfg.gemma.is_some();
        let kv = match kv {
            Some(kv) => kv,
            None => kv_caches(gpu, cfg, opts, 1)?.swap_remove(0),
        };
        let n_logits = if opts.all_logits { c } else { 1 };
        let batch = if opts.parallel > 1 {
            let nh = cfg.n_heads;
            let t = |name: &str, shape: &[usize]| acts.role(&format!("batch.{name}"), shape);
            let rows = batch_rows(opts);
            let partials = crate::kernels::attention::partials_bytes(nh, hd) as usize / 4;
            Some(BatchBuffers {
                logits: t("logits", &[rows, cfg.vocab_size])?,
                rows: RowTable {
                    table: t("rows", &[rows, 2])?,
                    partials: t("partials", &[rows * partials])?,
                },
            })
        } else {
            None
        };
        Ok(RunState {
            batch,
            chunk: c,
            all_logits: opts.all_logits,
            ids: role("ids", &[c])?.buf,
            x: role("x", &[c, d])?,
            x2: role("x2", &[c, d])?,
            xb: role("xb", &[c, d])?,
            q: role("q", &[c, cfg.n_heads * hd])?,
            k: role("k", &[c, cfg.n_kv_heads * hd])?,
            v: role("v", &[c, cfg.n_kv_heads * hd])?,
            att: role("att", &[c, cfg.n_heads * hd])?,
            proj: role("proj", &[c, d])?,
            gate: role("gate", &[c, cfg.ffn_size])?,
            up: role("up", &[c, cfg.ffn_size])?,
            act: role("act", &[c, cfg.ffn_size])?,
            logits: role("logits", &[n_logits, cfg.vocab_size])?,
            partials: role(
                "partials",
                &[crate::kernels::attention::partials_bytes(cfg.n_heads, hd) as usize / 4],
            )?,
            qn: gemma
                .then(|| role("qn", &[c, cfg.n_heads * hd]))
                .transpose()?,
            kn: gemma
                .then(|| role("kn", &[c, cfg.n_kv_heads * hd]))
                .transpose()?,
            kv,
        })
    }
}

/// The KV caches of every sequence slot (`opts.parallel`, at least 1), a layer each
/// (`layer.{l}.kv`; a sliding-window layer keeps a ring for chunks of up to `opts.chunk`
/// tokens), slot-major: `per_buffer` consecutive slots share each layer's K and V buffers
/// ([`KvCache::slots_major`]). Indexed `[slot][layer]`.
fn kv_caches(
    gpu: &Gpu,
    cfg: &ModelConfig,
    opts: &RunOptions,
    per_buffer: usize,
) -> Result<Vec<Vec<KvCache>>> {
    let n_slots = opts.parallel.max(1);
    let mut slots: Vec<Vec<KvCache>> = (0..n_slots)
        .map(|_| Vec::with_capacity(cfg.n_layers))
        .collect();
    for l in 0..cfg.n_layers {
        let layer = KvCache::slots_major(
            gpu,
            &format!("layer.{l}.kv"),
            opts.kv_dtype,
            opts.ctx,
            cfg.n_kv_heads,
            cfg.head_dim,
            cfg.layer_window(l),
            opts.chunk.max(1),
            n_slots,
            per_buffer,
        )?;
        for (slot, kv) in slots.iter_mut().zip(layer) {
            slot.push(kv);
        }
    }
    Ok(slots)
}

/// Slots per K/V buffer ([`attention::slots_per_buffer`]) of the layer with the largest ring.
fn kv_slots_per_buffer(gpu: &Gpu, cfg: &ModelConfig, opts: &RunOptions) -> usize {
    let row = opts.kv_dtype.row_words(cfg.head_dim) * cfg.n_kv_heads * 4;
    let largest = (0..cfg.n_layers)
        .map(|l| {
            let ring = attention::ring_slots(opts.ctx, cfg.layer_window(l), opts.chunk.max(1));
            (ring * row) as u64
        })
        .max()
        .unwrap_or(0);
    attention::slots_per_buffer(largest, gpu.max_binding(), opts.parallel.max(1))
}

impl Llama {
    /// Makes `slot`'s caches the ones the forward pass uses.
    fn select_slot(&mut self, slot: usize) -> Result<()> {
        if slot >= self.slot_kv.len() {
            return Err(Error::invalid(
                "llama",
                format!("slot {slot} of {}", self.slot_kv.len()),
            ));
        }
        if slot != self.active_slot {
            let kv = std::mem::take(&mut self.slot_kv[slot]);
            self.slot_kv[self.active_slot] = std::mem::replace(&mut self.state.kv, kv);
            self.active_slot = slot;
        }
        Ok(())
    }
}

impl crate::model::batch::BatchLm for Llama {
    fn slots(&self) -> usize {
        self.slot_kv.len()
    }
    fn forward_slot(
        &mut self,
        gpu: &Gpu,
        slot: usize,
        tokens: &[u32],
        pos0: usize,
    ) -> Result<Vec<f32>> {
        self.select_slot(slot)?;
        self.forward(gpu, tokens, pos0)
    }
    fn decode_batch(
        &mut self,
        gpu: &Gpu,
        rows: &[crate::model::batch::BatchRow],
    ) -> Result<Vec<Vec<f32>>> {
        let op = "decode batch";
        for (i, r) in rows.iter().enumerate() {
            if r.slot >= self.slot_kv.len() {
                return Err(Error::invalid(
                    op,
                    format!("row {i}: slot {} of {}", r.slot, self.slot_kv.len()),
                ));
            }
            if rows[..i].iter().any(|o| o.slot == r.slot) {
                return Err(Error::invalid(
                    op,
                    format!("row {i}: slot {} has two rows in one step", r.slot),
                ));
            }
            if r.pos >= self.opts.ctx {
                return Err(Error::ContextFull {
                    ctx: self.opts.ctx,
                    needed: r.pos + 1,
                });
            }
        }
        let tokens: Vec<u32> = rows.iter().map(|r| r.token).collect();
        embedding::check_ids(&tokens, self.cfg.vocab_size)?;
        if rows.len() == 1 {
            let r = rows[0];
            return Ok(vec![self.forward_slot(gpu, r.slot, &tokens, r.pos)?]);
        }
        if self.state.all_logits != self.opts.all_logits {
            let kv = std::mem::take(&mut self.state.kv);
            self.state = RunState::new(gpu, &self.cfg, &self.opts, Some(kv))?;
        }
        let vocab = self.cfg.vocab_size;
        let per_pass = batch_rows(&self.opts).max(1);
        // Rows whose slots share K/V buffers go next to each other (one dispatch per buffer; a
        // row's result does not depend on its place in the step), and come back in order.
        let mut order: Vec<usize> = (0..rows.len()).collect();
        order.sort_by_key(|&i| rows[i].slot / self.slots_per_buffer.max(1));
        let sorted: Vec<_> = order.iter().map(|&i| rows[i]).collect();
        let ids: Vec<u32> = sorted.iter().map(|r| r.token).collect();
        let mut out = vec![Vec::new(); rows.len()];
        let mut done = 0;
        for (group, ids) in sorted.chunks(per_pass).zip(ids.chunks(per_pass)) {
            let logits = self.forward_tokens(gpu, ids, Seqs::Rows(group), true)?;
            for row in logits.chunks_exact(vocab) {
                out[order[done]] = row.to_vec();
                done += 1;
            }
        }
        Ok(out)
    }
    fn warm_up(&mut self, gpu: &Gpu) -> Result<usize> {
        // A step of more rows than a pass takes runs as full passes and one of the rest, so the
        // row counts up to a pass cover every step.
        let most = self.slots().min(batch_rows(&self.opts).max(1));
        // The first position and the last: a step's attention splits its keys from some length
        // on (`attention::key_splits`), with kernels of its own.
        let last = self.opts.ctx.saturating_sub(1);
        for pos in [0, last].into_iter().take(if last > 0 { 2 } else { 1 }) {
            for n in 1..=most {
                let rows: Vec<_> = (0..n)
                    .map(|slot| crate::model::batch::BatchRow {
                        slot,
                        token: 0,
                        pos,
                    })
                    .collect();
                self.decode_batch(gpu, &rows)?;
            }
        }
        Ok(most)
    }
    fn reusable_prefix(&self, cached: usize, common: usize) -> usize {
        let common = common.min(cached);
        // A ring of `slots` positions still holds the last `window` keys before `common` when
        // at most `slots - window` positions were written after them.
        let ring_ok = (0..self.cfg.n_layers).all(|l| match self.cfg.layer_window(l) {
            None => true,
            Some(w) => {
                let slots = crate::kernels::attention::kv_cache::ring_slots(
                    self.opts.ctx,
                    Some(w),
                    self.opts.chunk.max(1),
                );
                cached - common <= slots.saturating_sub(w.min(common))
            }
        });
        if ring_ok {
            common
        } else {
            0
        }
    }
}
