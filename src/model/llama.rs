//! The LLaMA family (llama, mistral, qwen2): pre-norm decoder with RMSNorm, rotary positions,
//! grouped-query attention (optionally with Q/K/V biases, as qwen2), a SwiGLU FFN and a tied or
//! separate output head. `forward` reads like the architecture: one kernel call a line.

use crate::error::{Error, Result};
use crate::gpu::{BufferClass, Gpu, GpuBuffer};
use crate::kernels::attention::{self, KvCache, KvDtype};
use crate::kernels::rope::{self, RopeMode};
use crate::kernels::{activation, elementwise, embedding, matmul, norm, Tensor, WeightMatrix};
use crate::loader::gguf::Gguf;
use crate::model::config::{Arch, Ffn, ModelConfig, Norm, Positions};
use crate::model::source::Source;

/// One layer's parameters.
pub struct LayerWeights {
    pub attn_norm: Tensor,
    pub wq: WeightMatrix,
    pub wk: WeightMatrix,
    pub wv: WeightMatrix,
    pub bq: Option<Tensor>,
    pub bk: Option<Tensor>,
    pub bv: Option<Tensor>,
    pub wo: WeightMatrix,
    pub ffn_norm: Tensor,
    pub w_gate: WeightMatrix,
    pub w_up: WeightMatrix,
    pub w_down: WeightMatrix,
}

/// All parameters.
pub struct LlamaWeights {
    pub embed: WeightMatrix,
    pub layers: Vec<LayerWeights>,
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
    x: Tensor,      // (chunk, d) residual stream
    x2: Tensor,     // (chunk, d) the residual after an add (ping-pong with x)
    xb: Tensor,     // (chunk, d) normed input of a block
    q: Tensor,      // (chunk, n_heads * head_dim)
    k: Tensor,      // (chunk, n_kv_heads * head_dim)
    v: Tensor,      // (chunk, n_kv_heads * head_dim)
    att: Tensor,    // (chunk, n_heads * head_dim)
    proj: Tensor,   // (chunk, d) output of attention / FFN projections
    gate: Tensor,   // (chunk, ffn)
    up: Tensor,     // (chunk, ffn)
    act: Tensor,    // (chunk, ffn) silu(gate) * up
    logits: Tensor, // (chunk, vocab) or (1, vocab)
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
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            ctx: 2048,
            kv_dtype: KvDtype::F32,
            chunk: 64,
            all_logits: false,
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
        let (d, hd, ffn) = (cfg.hidden_size, cfg.head_dim, cfg.ffn_size);
        let (qd, kvd) = (cfg.n_heads * hd, cfg.n_kv_heads * hd);
        let embed = src.matrix(gpu, names.global("embed"), cfg.vocab_size, d)?;
        let mut layers = Vec::with_capacity(cfg.n_layers);
        for i in 0..cfg.n_layers {
            let n = |r: &str| names.layer(i, r);
            let bias = |r: &str, len: usize| {
                if cfg.attn_bias {
                    src.vector(gpu, &n(r), len).map(Some)
                } else {
                    Ok(None)
                }
            };
            layers.push(LayerWeights {
                attn_norm: src.vector(gpu, &n("attn_norm.weight"), d)?,
                wq: src.matrix(gpu, &n("attn_q.weight"), qd, d)?,
                wk: src.matrix(gpu, &n("attn_k.weight"), kvd, d)?,
                wv: src.matrix(gpu, &n("attn_v.weight"), kvd, d)?,
                bq: bias("attn_q.bias", qd)?,
                bk: bias("attn_k.bias", kvd)?,
                bv: bias("attn_v.bias", kvd)?,
                wo: src.matrix(gpu, &n("attn_output.weight"), d, qd)?,
                ffn_norm: src.vector(gpu, &n("ffn_norm.weight"), d)?,
                w_gate: src.matrix(gpu, &n("ffn_gate.weight"), ffn, d)?,
                w_up: src.matrix(gpu, &n("ffn_up.weight"), ffn, d)?,
                w_down: src.matrix(gpu, &n("ffn_down.weight"), d, ffn)?,
            });
        }
        let norm = src.vector(gpu, names.global("norm"), d)?;
        let output = if cfg.tied_embeddings && !src.has(names.global("output")) {
            None
        } else {
            Some(src.matrix(gpu, names.global("output"), cfg.vocab_size, d)?)
        };
        let weights = LlamaWeights {
            embed,
            layers,
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
        let mut out = Vec::new();
        let mut done = 0;
        while done < tokens.len() {
            let m = (tokens.len() - done).min(self.state.chunk);
            let chunk = &tokens[done..done + m];
            let last = done + m == tokens.len();
            let logits =
                self.forward_chunk(gpu, chunk, pos0 + done, self.opts.all_logits || last)?;
            if self.opts.all_logits {
                out.extend(logits);
            } else if last {
                out = logits;
            }
            done += m;
        }
        Ok(out)
    }

    /// One chunk of `m <= chunk` tokens, recorded as one command buffer.
    fn forward_chunk(
        &mut self,
        gpu: &Gpu,
        tokens: &[u32],
        pos0: usize,
        want_logits: bool,
    ) -> Result<Vec<f32>> {
        let cfg = &self.cfg;
        let s = &self.state;
        let w = &self.weights;
        let m = tokens.len();
        let (d, hd, nh, nkv, ffn) = (
            cfg.hidden_size,
            cfg.head_dim,
            cfg.n_heads,
            cfg.n_kv_heads,
            cfg.ffn_size,
        );
        let eps = cfg.norm_eps as f32;
        let scale = 1.0 / (hd as f32).sqrt();
        gpu.write(&s.ids, 0, bytemuck::cast_slice(tokens))?;
        let (mut x, mut x2) = (s.x.view(&[m, d])?, s.x2.view(&[m, d])?);
        let xb = s.xb.view(&[m, d])?;
        let q = s.q.view(&[m, nh * hd])?;
        let k = s.k.view(&[m, nkv * hd])?;
        let v = s.v.view(&[m, nkv * hd])?;
        let (q3, k3, v3) = (
            q.view(&[m, nh, hd])?,
            k.view(&[m, nkv, hd])?,
            v.view(&[m, nkv, hd])?,
        );
        let att3 = s.att.view(&[m, nh, hd])?;
        let att = s.att.view(&[m, nh * hd])?;
        let proj = s.proj.view(&[m, d])?;
        let (gate, up, act) = (
            s.gate.view(&[m, ffn])?,
            s.up.view(&[m, ffn])?,
            s.act.view(&[m, ffn])?,
        );

        let mut rec = gpu.recorder();
        let r = &mut rec;
        embedding::lookup(r, &w.embed, &s.ids, m, &x)?;
        for (l, lw) in w.layers.iter().enumerate() {
            // attention block
            norm::rms_norm(r, &x, &lw.attn_norm, eps, &xb)?;
            matmul::matmul(r, &lw.wq, &xb, &q)?; // (m, nh * hd)
            matmul::matmul(r, &lw.wk, &xb, &k)?; // (m, nkv * hd)
            matmul::matmul(r, &lw.wv, &xb, &v)?; // (m, nkv * hd)
            for (t, b) in [(&q, &lw.bq), (&k, &lw.bk), (&v, &lw.bv)] {
                if let Some(b) = b {
                    elementwise::add_bias(r, t, b)?;
                }
            }
            rope::rope(
                r,
                &q3,
                pos0 as u32,
                self.rope_theta,
                self.rope_mode,
                self.rot_dim,
            )?;
            rope::rope(
                r,
                &k3,
                pos0 as u32,
                self.rope_theta,
                self.rope_mode,
                self.rot_dim,
            )?;
            attention::store(r, &s.kv[l], &k3, &v3, pos0)?;
            attention::attention(r, &q3, &s.kv[l], pos0, scale, &att3)?;
            matmul::matmul(r, &lw.wo, &att, &proj)?; // (m, d)
            elementwise::add(r, &x, &proj, &x2)?; // residual
            std::mem::swap(&mut x, &mut x2);
            // FFN block
            norm::rms_norm(r, &x, &lw.ffn_norm, eps, &xb)?;
            matmul::matmul(r, &lw.w_gate, &xb, &gate)?; // (m, ffn)
            matmul::matmul(r, &lw.w_up, &xb, &up)?; // (m, ffn)
            activation::swiglu(r, &gate, &up, &act)?; // silu(gate) * up
            matmul::matmul(r, &lw.w_down, &act, &proj)?; // (m, d)
            elementwise::add(r, &x, &proj, &x2)?; // residual
            std::mem::swap(&mut x, &mut x2);
        }
        if !want_logits {
            return submit(&mut self.profile, rec).map(|_| Vec::new());
        }
        let head = w.output.as_ref().unwrap_or(&w.embed);
        let vocab = cfg.vocab_size;
        let n_out = if self.opts.all_logits { m } else { 1 };
        // Only the rows whose logits are wanted go through the final norm and the head.
        let last = if n_out == m {
            x.clone()
        } else {
            let row = s.proj.view(&[1, d])?;
            r.copy(
                &x.buf,
                ((m - 1) * d * 4) as u64,
                &row.buf,
                0,
                (d * 4) as u64,
            )?;
            row
        };
        let xn = s.xb.view(&[n_out, d])?;
        norm::rms_norm(r, &last, &w.norm, eps, &xn)?;
        let logits = s.logits.view(&[n_out, vocab])?;
        matmul::matmul(r, head, &xn, &logits)?;
        submit(&mut self.profile, rec)?;
        gpu.read_f32(&logits.buf, 0, n_out * vocab)
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
            .map(|l| {
                [&l.wq, &l.wk, &l.wv, &l.wo, &l.w_gate, &l.w_up, &l.w_down]
                    .iter()
                    .map(|m| m.bytes())
                    .sum::<u64>()
            })
            .sum();
        layers + w.output.as_ref().unwrap_or(&w.embed).bytes()
    }
    fn kv_bytes_per_token(&self, pos: usize) -> u64 {
        let per = crate::kernels::attention::bytes_per_token(
            self.opts.kv_dtype,
            self.cfg.n_kv_heads,
            self.cfg.head_dim,
        );
        per * self.cfg.n_layers as u64 * (pos as u64 + 1)
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

fn submit(
    profile: &mut Option<Vec<crate::gpu::record::DispatchTime>>,
    rec: crate::gpu::Recorder,
) -> Result<()> {
    match profile.as_mut() {
        Some(p) => p.extend(rec.submit_timed()?),
        None => rec.submit()?,
    }
    Ok(())
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
        let plan = crate::plan::activations::llama_activation_plan(cfg, c, opts.all_logits);
        let buffers = plan
            .buffers
            .iter()
            .map(|b| {
                gpu.alloc(
                    &format!("act.{}", b.label),
                    BufferClass::Activations,
                    b.bytes,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let role = |name: &str, shape: &[usize]| -> Result<Tensor> {
            let i = *plan.role_to_buffer.get(name).ok_or_else(|| {
                Error::invalid("activation plan", format!("no buffer for '{name}'"))
            })?;
            Tensor {
                buf: buffers[i].clone(),
                shape: vec![buffers[i].size() as usize / 4],
            }
            .view(shape)
        };
        let kv = match kv {
            Some(kv) => kv,
            None => (0..cfg.n_layers)
                .map(|l| {
                    KvCache::new(
                        gpu,
                        &format!("layer.{l}.kv"),
                        opts.kv_dtype,
                        opts.ctx,
                        cfg.n_kv_heads,
                        hd,
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
            kv,
        })
    }
}
