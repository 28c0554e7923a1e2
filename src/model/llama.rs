//! The LLaMA family (llama, mistral, qwen2): pre-norm decoder with RMSNorm, rotary positions,
//! grouped-query attention (optionally with Q/K/V biases, as qwen2), a SwiGLU FFN and a tied or
//! separate output head. `forward` reads like the architecture: one kernel call a line.

use crate::error::{Error, Result};
use crate::gpu::{Gpu, GpuBuffer, Recorder};
use crate::kernels::attention::{self, KvCache, KvDtype};
use crate::kernels::rope::RopeMode;
use crate::kernels::{elementwise, embedding, matmul, norm, Tensor, WeightMatrix};
use crate::loader::gguf::Gguf;
use crate::model::config::{Arch, Ffn, ModelConfig, Norm, Positions};
use crate::model::source::Source;
use crate::model::stream::{read_vector, HostLayer, HostMatrix, StreamedLayers};

/// One layer's parameters: `M` a matrix, `V` a vector (norm weights, biases). On the GPU that is
/// [`LayerWeights`]; a streamed layer waits in host memory as a [`HostLayer`] and runs from a GPU
/// slot ([`crate::model::stream`]).
pub struct Layer<M, V> {
    pub attn_norm: V,
    pub wq: M,
    pub wk: M,
    pub wv: M,
    pub bq: Option<V>,
    pub bk: Option<V>,
    pub bv: Option<V>,
    pub wo: M,
    /// Output-projection bias (`attention_bias` llama checkpoints).
    pub bo: Option<V>,
    pub ffn_norm: V,
    pub w_gate: M,
    pub w_up: M,
    pub w_down: M,
    /// MLP biases (`mlp_bias` llama checkpoints).
    pub b_gate: Option<V>,
    pub b_up: Option<V>,
    pub b_down: Option<V>,
}

/// One layer's parameters on the GPU.
pub type LayerWeights = Layer<WeightMatrix, Tensor>;

/// Two layers' fields side by side ([`Layer::zip`]).
pub type LayerPair<'a, M, V, M2, V2> = Layer<(&'a M, &'a M2), (&'a V, &'a V2)>;

impl<M, V> Layer<M, V> {
    /// Reads layer `i` with `matrix(name, rows, cols)` and `vector(name, len)` at the shapes `cfg`
    /// gives (the readers check them against the file).
    fn read(
        cfg: &ModelConfig,
        names: &Names,
        i: usize,
        mut matrix: impl FnMut(&str, usize, usize) -> Result<M>,
        mut vector: impl FnMut(&str, usize) -> Result<V>,
    ) -> Result<Self> {
        let (d, ffn) = (cfg.hidden_size, cfg.ffn_size);
        let (qd, kvd) = (cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim);
        let n = |r: &str| names.layer(i, r);
        let bias = cfg.attn_bias;
        Ok(Layer {
            attn_norm: vector(&n("attn_norm.weight"), d)?,
            wq: matrix(&n("attn_q.weight"), qd, d)?,
            wk: matrix(&n("attn_k.weight"), kvd, d)?,
            wv: matrix(&n("attn_v.weight"), kvd, d)?,
            bq: bias.then(|| vector(&n("attn_q.bias"), qd)).transpose()?,
            bk: bias.then(|| vector(&n("attn_k.bias"), kvd)).transpose()?,
            bv: bias.then(|| vector(&n("attn_v.bias"), kvd)).transpose()?,
            wo: matrix(&n("attn_output.weight"), d, qd)?,
            bo: cfg
                .attn_out_bias
                .then(|| vector(&n("attn_output.bias"), d))
                .transpose()?,
            ffn_norm: vector(&n("ffn_norm.weight"), d)?,
            w_gate: matrix(&n("ffn_gate.weight"), ffn, d)?,
            w_up: matrix(&n("ffn_up.weight"), ffn, d)?,
            w_down: matrix(&n("ffn_down.weight"), d, ffn)?,
            b_gate: cfg
                .ffn_bias
                .then(|| vector(&n("ffn_gate.bias"), ffn))
                .transpose()?,
            b_up: cfg
                .ffn_bias
                .then(|| vector(&n("ffn_up.bias"), ffn))
                .transpose()?,
            b_down: cfg
                .ffn_bias
                .then(|| vector(&n("ffn_down.bias"), d))
                .transpose()?,
        })
    }

    /// Maps every field, in declaration order, with its role ("attn_q", "ffn_norm", ...).
    pub fn try_map<M2, V2>(
        &self,
        mut m: impl FnMut(&'static str, &M) -> Result<M2>,
        mut v: impl FnMut(&'static str, &V) -> Result<V2>,
    ) -> Result<Layer<M2, V2>> {
        Ok(Layer {
            attn_norm: v("attn_norm", &self.attn_norm)?,
            wq: m("attn_q", &self.wq)?,
            wk: m("attn_k", &self.wk)?,
            wv: m("attn_v", &self.wv)?,
            bq: self.bq.as_ref().map(|b| v("attn_q_bias", b)).transpose()?,
            bk: self.bk.as_ref().map(|b| v("attn_k_bias", b)).transpose()?,
            bv: self.bv.as_ref().map(|b| v("attn_v_bias", b)).transpose()?,
            wo: m("attn_output", &self.wo)?,
            bo: self
                .bo
                .as_ref()
                .map(|b| v("attn_output_bias", b))
                .transpose()?,
            ffn_norm: v("ffn_norm", &self.ffn_norm)?,
            w_gate: m("ffn_gate", &self.w_gate)?,
            w_up: m("ffn_up", &self.w_up)?,
            w_down: m("ffn_down", &self.w_down)?,
            b_gate: self
                .b_gate
                .as_ref()
                .map(|b| v("ffn_gate_bias", b))
                .transpose()?,
            b_up: self
                .b_up
                .as_ref()
                .map(|b| v("ffn_up_bias", b))
                .transpose()?,
            b_down: self
                .b_down
                .as_ref()
                .map(|b| v("ffn_down_bias", b))
                .transpose()?,
        })
    }

    /// Pairs each field with the same field of `other`; both must have the same biases.
    pub fn zip<'a, M2, V2>(
        &'a self,
        other: &'a Layer<M2, V2>,
    ) -> Result<LayerPair<'a, M, V, M2, V2>> {
        let pair = |a: &'a Option<V>, b: &'a Option<V2>| match (a, b) {
            (Some(a), Some(b)) => Ok(Some((a, b))),
            (None, None) => Ok(None),
            _ => Err(Error::invalid(
                "layer",
                "one layer has biases the other lacks",
            )),
        };
        Ok(Layer {
            attn_norm: (&self.attn_norm, &other.attn_norm),
            wq: (&self.wq, &other.wq),
            wk: (&self.wk, &other.wk),
            wv: (&self.wv, &other.wv),
            bq: pair(&self.bq, &other.bq)?,
            bk: pair(&self.bk, &other.bk)?,
            bv: pair(&self.bv, &other.bv)?,
            wo: (&self.wo, &other.wo),
            bo: pair(&self.bo, &other.bo)?,
            ffn_norm: (&self.ffn_norm, &other.ffn_norm),
            w_gate: (&self.w_gate, &other.w_gate),
            w_up: (&self.w_up, &other.w_up),
            w_down: (&self.w_down, &other.w_down),
            b_gate: pair(&self.b_gate, &other.b_gate)?,
            b_up: pair(&self.b_up, &other.b_up)?,
            b_down: pair(&self.b_down, &other.b_down)?,
        })
    }

    /// The seven matrices.
    pub fn matrices(&self) -> [&M; 7] {
        [
            &self.wq,
            &self.wk,
            &self.wv,
            &self.wo,
            &self.w_gate,
            &self.w_up,
            &self.w_down,
        ]
    }

    /// The norm weights and the biases present.
    pub fn vectors(&self) -> Vec<&V> {
        let mut v = vec![&self.attn_norm, &self.ffn_norm];
        v.extend(
            [
                &self.bq,
                &self.bk,
                &self.bv,
                &self.bo,
                &self.b_gate,
                &self.b_up,
                &self.b_down,
            ]
            .into_iter()
            .flatten(),
        );
        v
    }
}

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
    x: Tensor,        // (chunk, d) residual stream
    x2: Tensor,       // (chunk, d) the residual after an add (ping-pong with x)
    xb: Tensor,       // (chunk, d) normed input of a block
    q: Tensor,        // (chunk, n_heads * head_dim)
    k: Tensor,        // (chunk, n_kv_heads * head_dim)
    v: Tensor,        // (chunk, n_kv_heads * head_dim)
    att: Tensor,      // (chunk, n_heads * head_dim)
    proj: Tensor,     // (chunk, d) output of attention / FFN projections
    gate: Tensor,     // (chunk, ffn)
    up: Tensor,       // (chunk, ffn)
    act: Tensor,      // (chunk, ffn) silu(gate) * up
    logits: Tensor,   // (chunk, vocab) or (1, vocab)
    partials: Tensor, // a decode step's split attention state (attention::partials_bytes)
    pub kv: Vec<KvCache>,
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
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            ctx: 2048,
            kv_dtype: KvDtype::F32,
            chunk: 64,
            all_logits: false,
            resident_layers: None,
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
}

/// Reads a LLaMA-family config from GGUF metadata (`<arch>.*` keys).
pub fn config_from_gguf(g: &Gguf) -> Result<(ModelConfig, usize)> {
    let arch = g.architecture()?.to_string();
    if !matches!(arch.as_str(), "llama" | "mistral" | "qwen2") {
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
        ffn: Ffn::SwiGlu,
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
    };
    cfg.validate(&arch)?;
    let rot_dim = g
        .get_u32(&k("rope.dimension_count"))
        .map(|v| v as usize)
        .unwrap_or(head_dim);
    Ok((cfg, rot_dim))
}

/// Tensor names of one checkpoint flavour (the one place that maps names to roles).
struct Names {
    gguf: bool,
}

impl Names {
    fn global(&self, role: &str) -> &'static str {
        match (self.gguf, role) {
            (true, "embed") => "token_embd.weight",
            (true, "norm") => "output_norm.weight",
            (true, _) => "output.weight",
            (false, "embed") => "model.embed_tokens.weight",
            (false, "norm") => "model.norm.weight",
            (false, _) => "lm_head.weight",
        }
    }
    fn layer(&self, i: usize, role: &str) -> String {
        if self.gguf {
            format!("blk.{i}.{role}")
        } else {
            let hf = match role {
                "attn_norm.weight" => "input_layernorm.weight",
                "attn_q.weight" => "self_attn.q_proj.weight",
                "attn_k.weight" => "self_attn.k_proj.weight",
                "attn_v.weight" => "self_attn.v_proj.weight",
                "attn_q.bias" => "self_attn.q_proj.bias",
                "attn_k.bias" => "self_attn.k_proj.bias",
                "attn_v.bias" => "self_attn.v_proj.bias",
                "attn_output.weight" => "self_attn.o_proj.weight",
                "attn_output.bias" => "self_attn.o_proj.bias",
                "ffn_gate.bias" => "mlp.gate_proj.bias",
                "ffn_up.bias" => "mlp.up_proj.bias",
                "ffn_down.bias" => "mlp.down_proj.bias",
                "ffn_norm.weight" => "post_attention_layernorm.weight",
                "ffn_gate.weight" => "mlp.gate_proj.weight",
                "ffn_up.weight" => "mlp.up_proj.weight",
                "ffn_down.weight" => "mlp.down_proj.weight",
                other => other,
            };
            format!("model.layers.{i}.{hf}")
        }
    }
}

impl Llama {
    /// Loads weights from `src`, checking every tensor's shape against `cfg`, and allocates the
    /// KV cache and activations. GGUF files carry Q/K rows permuted for interleaved RoPE;
    /// Hugging Face checkpoints use rotate-half.
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
        };
        let rope_mode = if names.gguf {
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
                    |n, len| read_vector(src, n, len),
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
        let norm = src.vector(gpu, names.global("norm"), d)?;
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
        let state = RunState::new(gpu, &cfg, &opts, None)?;
        Ok(Llama {
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
        let a = ChunkViews::new(s, cfg, m)?;
        let args = LayerArgs {
            pos0,
            eps,
            scale: 1.0 / (cfg.head_dim as f32).sqrt(),
            rope_theta: self.rope_theta,
            rope_mode: self.rope_mode,
            rot_dim: self.rot_dim,
        };
        gpu.write(&s.ids, 0, bytemuck::cast_slice(tokens))?;

        let mut rec = gpu.recorder();
        embedding::lookup(&mut rec, embed, &s.ids, m, &a.x)?;
        for (l, kv) in s.kv.iter().enumerate() {
            if let Some(lw) = layers.get(l) {
                layer(&mut rec, &a, lw, kv, &args)?;
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
            layer(&mut rec, &a, &lw, kv, &args)?;
        }
        if !want_logits {
            return submit(profile, rec, true).map(|_| Vec::new());
        }
        let r = &mut rec;
        let head = output.as_ref().unwrap_or(embed);
        let vocab = cfg.vocab_size;
        let n_out = if self.opts.all_logits { m } else { 1 };
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
        let logits = s.logits.view(&[n_out, vocab])?;
        matmul::matmul_fused_norm(r, &[head], &last, final_norm, eps, &xn, &[&logits])?;
        submit(profile, rec, true)?;
        gpu.read_f32(&logits.buf, 0, n_out * vocab)
    }

    /// Layers on the GPU; the rest are streamed.
    pub fn resident_layers(&self) -> usize {
        self.weights.layers.len()
    }
}

/// What every layer of a chunk shares besides the activations.
struct LayerArgs {
    pos0: usize,
    eps: f32,
    /// Attention scale, 1/sqrt(head_dim).
    scale: f32,
    rope_theta: f32,
    rope_mode: RopeMode,
    rot_dim: usize,
}

/// The activation buffers viewed at the chunk's `m` tokens.
struct ChunkViews {
    m: usize,   // tokens
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
}

impl ChunkViews {
    fn new(s: &RunState, cfg: &ModelConfig, m: usize) -> Result<ChunkViews> {
        let (d, hd, nh, nkv, ffn) = (
            cfg.hidden_size,
            cfg.head_dim,
            cfg.n_heads,
            cfg.n_kv_heads,
            cfg.ffn_size,
        );
        Ok(ChunkViews {
            m,
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

/// Reads layer `i` and uploads it, Q/K/V and gate/up each stacked where the device keeps weights
/// in textures ([`Gpu::upload_weights_stacked`]), so that each group runs as one dispatch.
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
        |n, len| src.vector(gpu, n, len),
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
    Ok(Layer {
        attn_norm: l.attn_norm,
        wq: next(&mut qkv)?,
        wk: next(&mut qkv)?,
        wv: next(&mut qkv)?,
        bq: l.bq,
        bk: l.bk,
        bv: l.bv,
        wo: one(&l.wo)?,
        bo: l.bo,
        ffn_norm: l.ffn_norm,
        w_gate: next(&mut gate_up)?,
        w_up: next(&mut gate_up)?,
        w_down: one(&l.w_down)?,
        b_gate: l.b_gate,
        b_up: l.b_up,
        b_down: l.b_down,
    })
}

/// One decoder layer over the chunk; the residual stream enters and leaves in `a.x`.
fn layer(
    r: &mut Recorder,
    a: &ChunkViews,
    lw: &LayerWeights,
    kv: &KvCache,
    p: &LayerArgs,
) -> Result<()> {
    // attention block: q (m, nh * hd), k and v (m, nkv * hd) of the normalised stream, one
    // dispatch where the weights are stacked (and the norm folded in for a single token)
    let qkv = [&lw.wq, &lw.wk, &lw.wv];
    matmul::matmul_fused_norm(
        r,
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
    // RoPE of q and k, and k and v into the cache, in one pass
    let (theta, mode) = (p.rope_theta, p.rope_mode);
    attention::rope_store(r, kv, &a.q3, &a.k3, &a.v3, p.pos0, theta, mode, p.rot_dim)?;
    attention::attention_split(r, &a.q3, kv, p.pos0, p.scale, &a.partials, &a.att3)?;
    // residual, then the FFN block's norm: where the norm folds into gate/up (a single token),
    // the add folds into the output projection; otherwise add and norm are one pass
    let (gate_up, gu_out) = ([&lw.w_gate, &lw.w_up], [&a.gate, &a.up]);
    if matmul::norm_folds(r.gpu(), &gate_up, a.m) && lw.bo.is_none() {
        matmul::matmul_add(r, &lw.wo, &a.att, &a.x, &a.proj, &a.x2)?;
        matmul::matmul_fused_norm(r, &gate_up, &a.x2, &lw.ffn_norm, p.eps, &a.xb, &gu_out)?;
    } else {
        matmul::matmul(r, &lw.wo, &a.att, &a.proj)?; // (m, d)
        bias(r, &a.proj, &lw.bo)?;
        norm::add_rms_norm(r, &a.x, &a.proj, &lw.ffn_norm, p.eps, &a.x2, &a.xb)?;
        matmul::matmul_fused(r, &gate_up, &a.xb, &gu_out)?; // (m, ffn) each
    }
    bias(r, &a.gate, &lw.b_gate)?;
    bias(r, &a.up, &lw.b_up)?;
    // x = x2 + (silu(gate) * up) w_downᵀ; SwiGLU and the residual add folded in where they can be
    let (gate, up, act) = (&a.gate, &a.up, &a.act);
    if lw.b_down.is_none() {
        matmul::matmul_swiglu_add(r, &lw.w_down, gate, up, act, &a.x2, &a.proj, &a.x)?;
    } else {
        matmul::matmul_swiglu(r, &lw.w_down, gate, up, act, &a.proj)?;
        bias(r, &a.proj, &lw.b_down)?;
        elementwise::add(r, &a.x2, &a.proj, &a.x)?;
    }
    Ok(())
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
        let folds = crate::kernels::matmul::single_token_folds(gpu);
        let plan =
            crate::plan::activations::llama_activation_plan_with(cfg, c, opts.all_logits, folds);
        let acts = crate::model::planned::PlannedActivations::allocate(gpu, plan, "act")?;
        let role = |name: &str, shape: &[usize]| acts.role(name, shape);
        let kv = match kv {
            Some(kv) => kv,
            None => (0..cfg.n_layers)
                .map(|l| {
                    // A sliding-window layer keeps a ring for chunks of up to `c` tokens.
                    KvCache::windowed(
                        gpu,
                        &format!("layer.{l}.kv"),
                        opts.kv_dtype,
                        opts.ctx,
                        cfg.n_kv_heads,
                        hd,
                        cfg.layer_window(l),
                        c,
                    )
                })
                .collect::<Result<Vec<_>>>()?,
        };
        let n_logits = if opts.all_logits { c } else { 1 };
        Ok(RunState {
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
            kv,
        })
    }
}
