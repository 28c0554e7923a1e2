//! GPT-2 (`GPT2LMHeadModel`): pre-norm decoder with LayerNorm, learned absolute positions, biases
//! on every projection, a tanh-GELU FFN and the output head tied to the token embedding. Loaded
//! from a Hugging Face safetensors directory; `forward` reads like the architecture, one kernel call
//! a line, as [`crate::model::llama`].
//!
//! HF GPT-2 keeps its projections as `Conv1D`, whose weight is stored `[in, out]` (`y = x W + b`),
//! the transpose of `nn.Linear`. Those matrices are transposed on the CPU ([`transpose`]) before
//! upload, and the fused `c_attn` (`[d, 3d]`) is split into separate Q, K and V matrices so that
//! each lands in its own activation buffer in the layout attention expects.

use serde_json::Value;

use crate::error::{Error, Result};
use crate::gpu::record::DispatchTime;
use crate::gpu::{BufferClass, Gpu, GpuBuffer, Recorder};
use crate::kernels::activation::{self, GeluForm};
use crate::kernels::attention::{self, KvCache};
use crate::kernels::{elementwise, embedding, matmul, norm, Tensor, WeightMatrix};
use crate::model::config::{Arch, ModelConfig, Norm, Positions};
use crate::model::generate::CausalLm;
use crate::model::llama::RunOptions;
use crate::model::source::Source;
use crate::quant::WeightFormat;

/// One block's parameters (matrices in `nn.Linear` orientation: `rows` outputs).
pub struct Gpt2Layer {
    pub ln_1: (Tensor, Tensor),
    pub wq: WeightMatrix,
    pub wk: WeightMatrix,
    pub wv: WeightMatrix,
    pub bq: Tensor,
    pub bk: Tensor,
    pub bv: Tensor,
    pub wo: WeightMatrix,
    pub bo: Tensor,
    pub ln_2: (Tensor, Tensor),
    pub w_fc: WeightMatrix,
    pub b_fc: Tensor,
    pub w_proj: WeightMatrix,
    pub b_proj: Tensor,
}

/// All parameters. The output head is `wte` (tied).
pub struct Gpt2Weights {
    pub wte: WeightMatrix,
    pub wpe: WeightMatrix,
    pub layers: Vec<Gpt2Layer>,
    pub ln_f: (Tensor, Tensor),
}

/// Activations for one chunk of up to `chunk` tokens, allocated once as the memory planner shares
/// them ([`crate::plan::gpt2_activation_plan`]), and the KV cache.
pub struct RunState {
    pub chunk: usize,
    /// Whether the logits role holds a row per token of a chunk.
    all_logits: bool,
    ids: GpuBuffer,
    pos_ids: GpuBuffer,
    x: Tensor,      // (chunk, d) residual stream
    x2: Tensor,     // (chunk, d) the residual after an add (ping-pong with x)
    xb: Tensor,     // (chunk, d) normed input of a block; also the position embeddings
    q: Tensor,      // (chunk, d)
    k: Tensor,      // (chunk, d)
    v: Tensor,      // (chunk, d)
    att: Tensor,    // (chunk, d)
    proj: Tensor,   // (chunk, d) output of the attention / FFN projections
    fc: Tensor,     // (chunk, ffn) c_fc output
    act: Tensor,    // (chunk, ffn) gelu(fc)
    logits: Tensor, // (chunk, vocab) or (1, vocab)
    pub kv: Vec<KvCache>,
}

/// A loaded GPT-2 model, ready to run.
pub struct Gpt2 {
    pub cfg: ModelConfig,
    pub gelu: GeluForm,
    /// Attention score scale per layer (`1/sqrt(head_dim)`, optionally `/ (layer + 1)`).
    pub attn_scales: Vec<f32>,
    pub weights: Gpt2Weights,
    pub state: RunState,
    /// As given, except `ctx` is at most the model's `n_positions` (the learned table's length).
    pub opts: RunOptions,
    /// When set, every chunk is submitted with timestamp queries and its dispatch times are
    /// appended here.
    pub profile: Option<Vec<DispatchTime>>,
}

/// `w` (row-major `rows x cols`) transposed to row-major `cols x rows`.
pub fn transpose(w: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0f32; w.len()];
    for (r, row) in w.chunks_exact(cols.max(1)).take(rows).enumerate() {
        for (c, &v) in row.iter().enumerate() {
            t[c * rows + r] = v;
        }
    }
    t
}

/// The format a `cols`-wide matrix is uploaded in, as [`Source::matrix`] picks it: block formats
/// need rows that are whole blocks, else f16.
fn weight_format(precision: Option<WeightFormat>, cols: usize) -> WeightFormat {
    match precision {
        Some(f) if !f.is_quantized() || cols.is_multiple_of(crate::quant::QK) => f,
        Some(_) => WeightFormat::F16,
        None => WeightFormat::F32,
    }
}

/// GPT2Config options that change the arithmetic: the GELU form and the attention scales.
fn hf_options(json: &Value, n_layers: usize, head_dim: usize) -> Result<(GeluForm, Vec<f32>)> {
    let invalid = |field: &str, reason: String| Error::ConfigInvalid {
        model_type: "gpt2".into(),
        field: field.into(),
        reason,
    };
    let flag = |name: &str, default: bool| match json.get(name) {
        None | Some(Value::Null) => Ok(default),
        Some(v) => v
            .as_bool()
            .ok_or_else(|| invalid(name, format!("{v} is not a boolean"))),
    };
    let gelu = match json.get("activation_function").and_then(Value::as_str) {
        // gelu_fast is the same tanh formula with the constant folded.
        None | Some("gelu_new" | "gelu_pytorch_tanh" | "gelu_fast") => GeluForm::Tanh,
        Some("gelu") => GeluForm::Erf,
        Some(other) => {
            let reason = format!("'{other}' is not supported (gelu_new, gelu)");
            return Err(invalid("activation_function", reason));
        }
    };
    let base = if flag("scale_attn_weights", true)? {
        1.0 / (head_dim as f32).sqrt()
    } else {
        1.0
    };
    let by_layer = flag("scale_attn_by_inverse_layer_idx", false)?;
    let scale = |l: usize| {
        if by_layer {
            base / (l + 1) as f32
        } else {
            base
        }
    };
    Ok((gelu, (0..n_layers).map(scale).collect()))
}

/// Every tensor (HF names without the `transformer.` prefix) with its HF shape: `Conv1D`
/// weights are `[in, out]`.
fn hf_shapes(cfg: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    let (d, f) = (cfg.hidden_size, cfg.ffn_size);
    let mut v = vec![
        ("wte.weight".to_string(), vec![cfg.vocab_size, d]),
        ("wpe.weight".to_string(), vec![cfg.max_positions, d]),
    ];
    for i in 0..cfg.n_layers {
        let layer: [(&str, &[usize]); 12] = [
            ("ln_1.weight", &[d]),
            ("ln_1.bias", &[d]),
            ("attn.c_attn.weight", &[d, 3 * d]),
            ("attn.c_attn.bias", &[3 * d]),
            ("attn.c_proj.weight", &[d, d]),
            ("attn.c_proj.bias", &[d]),
            ("ln_2.weight", &[d]),
            ("ln_2.bias", &[d]),
            ("mlp.c_fc.weight", &[d, f]),
            ("mlp.c_fc.bias", &[f]),
            ("mlp.c_proj.weight", &[f, d]),
            ("mlp.c_proj.bias", &[d]),
        ];
        v.extend(
            layer
                .iter()
                .map(|(n, s)| (format!("h.{i}.{n}"), s.to_vec())),
        );
    }
    v.push(("ln_f.weight".into(), vec![d]));
    v.push(("ln_f.bias".into(), vec![d]));
    v
}

impl Gpt2 {
    /// Loads weights from a Hugging Face directory (`src` must be [`Source::Hf`]; its format
    /// quantises every matrix, embeddings and head included), checking every tensor's shape
    /// against `cfg` before anything is uploaded, and allocates the KV cache and activations.
    pub fn load(gpu: &Gpu, cfg: ModelConfig, src: &Source, mut opts: RunOptions) -> Result<Gpt2> {
        let gpt2 = cfg.arch == Arch::Gpt2 && cfg.norm == Norm::LayerNorm;
        if !gpt2 || cfg.positions != Positions::Learned || cfg.n_kv_heads != cfg.n_heads {
            let reason = format!("config is a {:?} model, not GPT-2", cfg.arch);
            return Err(Error::invalid("gpt2", reason));
        }
        cfg.validate("gpt2")?;
        if cfg.n_heads * cfg.head_dim != cfg.hidden_size {
            let (h, hd, d) = (cfg.n_heads, cfg.head_dim, cfg.hidden_size);
            return Err(Error::invalid(
                "gpt2",
                format!("{h} heads of {hd} do not make n_embd {d}"),
            ));
        }
        let &Source::Hf(h, precision) = src else {
            let reason = "GPT-2 loads from a Hugging Face safetensors directory, not GGUF";
            return Err(Error::invalid("gpt2", reason));
        };
        let (gelu, attn_scales) = hf_options(h.config(), cfg.n_layers, cfg.head_dim)?;
        let prefixed = h.tensor_shape("transformer.wte.weight").is_ok();
        let name = |n: &str| {
            if prefixed {
                format!("transformer.{n}")
            } else {
                n.to_string()
            }
        };
        for (n, shape) in hf_shapes(&cfg) {
            h.expect_shape(&name(&n), &shape)?;
        }
        let (d, f) = (cfg.hidden_size, cfg.ffn_size);
        let vector = |n: &str, len: usize| src.vector(gpu, &name(n), len);
        let ln = |n: &str| {
            Ok((
                vector(&format!("{n}.weight"), d)?,
                vector(&format!("{n}.bias"), d)?,
            ))
        };
        // A Conv1D weight (`[n_in, n_out]`, shape checked above) transposed to `nn.Linear` rows,
        // so that it quantises along `n_in` as every matrix does.
        let conv1d = |n: &str, n_in: usize| -> Result<Vec<f32>> {
            let w = h.tensor_f32(&name(n))?;
            Ok(transpose(&w, n_in, w.len() / n_in))
        };
        let upload = |label: String, w: &[f32], n_in: usize| {
            let format = weight_format(precision, n_in);
            gpu.upload_weights_f32(&label, format, w.len() / n_in, n_in, w)
        };
        let wte = src.matrix(gpu, &name("wte.weight"), cfg.vocab_size, d)?;
        let wpe = src.matrix(gpu, &name("wpe.weight"), cfg.max_positions, d)?;
        let mut layers = Vec::with_capacity(cfg.n_layers);
        for i in 0..cfg.n_layers {
            let n = |r: &str| format!("h.{i}.{r}");
            let (attn, proj) = (n("attn.c_attn.weight"), n("attn.c_proj.weight"));
            let (fc, fc_proj) = (n("mlp.c_fc.weight"), n("mlp.c_proj.weight"));
            // c_attn is Q, K and V side by side: rows 0..d, d..2d, 2d..3d once transposed.
            let (qkv, b, dd) = (
                conv1d(&attn, d)?,
                h.tensor_f32(&name(&n("attn.c_attn.bias")))?,
                d * d,
            );
            let bias = |part: &str, v: &[f32]| {
                let label = format!("{}[{part}]", name(&n("attn.c_attn.bias")));
                gpu.tensor_from(&label, BufferClass::Parameters, &[d], v)
            };
            layers.push(Gpt2Layer {
                ln_1: ln(&n("ln_1"))?,
                wq: upload(format!("{}[q]", name(&attn)), &qkv[..dd], d)?,
                wk: upload(format!("{}[k]", name(&attn)), &qkv[dd..2 * dd], d)?,
                wv: upload(format!("{}[v]", name(&attn)), &qkv[2 * dd..], d)?,
                bq: bias("q", &b[..d])?,
                bk: bias("k", &b[d..2 * d])?,
                bv: bias("v", &b[2 * d..])?,
                wo: upload(name(&proj), &conv1d(&proj, d)?, d)?,
                bo: vector(&n("attn.c_proj.bias"), d)?,
                ln_2: ln(&n("ln_2"))?,
                w_fc: upload(name(&fc), &conv1d(&fc, d)?, d)?,
                b_fc: vector(&n("mlp.c_fc.bias"), f)?,
                w_proj: upload(name(&fc_proj), &conv1d(&fc_proj, f)?, f)?,
                b_proj: vector(&n("mlp.c_proj.bias"), d)?,
            });
        }
        let ln_f = ln("ln_f")?;
        // Positions past the learned table have no embedding.
        opts.ctx = opts.ctx.min(cfg.max_positions);
        let state = RunState::new(gpu, &cfg, &opts, None)?;
        let weights = Gpt2Weights {
            wte,
            wpe,
            layers,
            ln_f,
        };
        Ok(Gpt2 {
            cfg,
            gelu,
            attn_scales,
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
        let needed = pos0.saturating_add(tokens.len());
        if needed > self.opts.ctx {
            return Err(Error::ContextFull {
                ctx: self.opts.ctx,
                needed,
            });
        }
        if self.state.all_logits != self.opts.all_logits {
            // The logits role's size (and so the plan) depends on it: re-plan, keeping the cache.
            let kv = std::mem::take(&mut self.state.kv);
            self.state = RunState::new(gpu, &self.cfg, &self.opts, Some(kv))?;
        }
        let (chunk, all) = (self.state.chunk, self.opts.all_logits);
        crate::model::generate::in_chunks(tokens, pos0, chunk, all, |c, pos, want| {
            self.forward_chunk(gpu, c, pos, want)
        })
    }

    /// One chunk of `m <= chunk` tokens, recorded as one command buffer.
    fn forward_chunk(
        &mut self,
        gpu: &Gpu,
        tokens: &[u32],
        pos0: usize,
        want_logits: bool,
    ) -> Result<Vec<f32>> {
        let (cfg, s, w) = (&self.cfg, &self.state, &self.weights);
        let m = tokens.len();
        let (d, hd, nh, ffn) = (cfg.hidden_size, cfg.head_dim, cfg.n_heads, cfg.ffn_size);
        let eps = cfg.norm_eps as f32;
        let positions: Vec<u32> = (pos0..pos0 + m).map(|p| p as u32).collect();
        gpu.write(&s.ids, 0, bytemuck::cast_slice(tokens))?;
        gpu.write(&s.pos_ids, 0, bytemuck::cast_slice(&positions))?;
        let (mut x, mut x2, xb) = (s.x.view(&[m, d])?, s.x2.view(&[m, d])?, s.xb.view(&[m, d])?);
        let (q, k, v) = (s.q.view(&[m, d])?, s.k.view(&[m, d])?, s.v.view(&[m, d])?);
        let (q3, k3, v3) = (
            q.view(&[m, nh, hd])?,
            k.view(&[m, nh, hd])?,
            v.view(&[m, nh, hd])?,
        );
        let (att, att3) = (s.att.view(&[m, d])?, s.att.view(&[m, nh, hd])?);
        let proj = s.proj.view(&[m, d])?;
        let (fc, act) = (s.fc.view(&[m, ffn])?, s.act.view(&[m, ffn])?);

        let mut rec = gpu.recorder();
        let r = &mut rec;
        embedding::lookup(r, &w.wte, &s.ids, m, &x2)?; // token embeddings
        embedding::lookup(r, &w.wpe, &s.pos_ids, m, &xb)?; // learned positions
        elementwise::add(r, &x2, &xb, &x)?;
        for (l, lw) in w.layers.iter().enumerate() {
            // attention block
            norm::layer_norm(r, &x, &lw.ln_1.0, &lw.ln_1.1, eps, &xb)?;
            for (wm, b, out) in [
                (&lw.wq, &lw.bq, &q),
                (&lw.wk, &lw.bk, &k),
                (&lw.wv, &lw.bv, &v),
            ] {
                matmul::matmul(r, wm, &xb, out)?; // (m, d)
                elementwise::add_bias(r, out, b)?;
            }
            attention::store(r, &s.kv[l], &k3, &v3, pos0)?;
            attention::attention(r, &q3, &s.kv[l], pos0, self.attn_scales[l], &att3)?;
            matmul::matmul(r, &lw.wo, &att, &proj)?; // (m, d)
            elementwise::add_bias(r, &proj, &lw.bo)?;
            elementwise::add(r, &x, &proj, &x2)?; // residual
            std::mem::swap(&mut x, &mut x2);
            // FFN block
            norm::layer_norm(r, &x, &lw.ln_2.0, &lw.ln_2.1, eps, &xb)?;
            matmul::matmul(r, &lw.w_fc, &xb, &fc)?; // (m, ffn)
            elementwise::add_bias(r, &fc, &lw.b_fc)?;
            activation::gelu(r, &fc, &act, self.gelu)?;
            matmul::matmul(r, &lw.w_proj, &act, &proj)?; // (m, d)
            elementwise::add_bias(r, &proj, &lw.b_proj)?;
            elementwise::add(r, &x, &proj, &x2)?; // residual
            std::mem::swap(&mut x, &mut x2);
        }
        if !want_logits {
            return submit(&mut self.profile, rec).map(|_| Vec::new());
        }
        let n_out = if self.opts.all_logits { m } else { 1 };
        // Only the rows whose logits are wanted go through the final norm and the head.
        let last = if n_out == m {
            x.clone()
        } else {
            let row = s.proj.view(&[1, d])?;
            let (offset, bytes) = (((m - 1) * d * 4) as u64, (d * 4) as u64);
            r.copy(&x.buf, offset, &row.buf, 0, bytes)?;
            row
        };
        let xn = s.xb.view(&[n_out, d])?;
        norm::layer_norm(r, &last, &w.ln_f.0, &w.ln_f.1, eps, &xn)?;
        let logits = s.logits.view(&[n_out, cfg.vocab_size])?;
        matmul::matmul(r, &w.wte, &xn, &logits)?; // tied head
        submit(&mut self.profile, rec)?;
        gpu.read_f32(&logits.buf, 0, n_out * cfg.vocab_size)
    }
}

impl CausalLm for Gpt2 {
    fn forward(&mut self, gpu: &Gpu, tokens: &[u32], pos0: usize) -> Result<Vec<f32>> {
        Gpt2::forward(self, gpu, tokens, pos0)
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
}

fn submit(profile: &mut Option<Vec<DispatchTime>>, rec: Recorder) -> Result<()> {
    match profile.as_mut() {
        Some(p) => p.extend(rec.submit_timed()?),
        None => rec.submit()?,
    }
    Ok(())
}

impl RunState {
    /// Allocates the activations exactly as the memory planner shares them
    /// ([`crate::plan::gpt2_activation_plan`]): one buffer per planned buffer, each role a prefix
    /// view of its buffer, so `wgllm plan` and the ledger agree byte for byte. The KV cache is
    /// `kv` when re-planning, else a new one of `opts.ctx` positions.
    fn new(
        gpu: &Gpu,
        cfg: &ModelConfig,
        opts: &RunOptions,
        kv: Option<Vec<KvCache>>,
    ) -> Result<RunState> {
        let c = opts.chunk.max(1);
        let (d, hd) = (cfg.hidden_size, cfg.head_dim);
        let plan = crate::plan::gpt2_activation_plan(cfg, c, opts.all_logits);
        let acts = crate::model::planned::PlannedActivations::allocate(gpu, plan, "act")?;
        let role = |name: &str, shape: &[usize]| acts.role(name, shape);
        let kv = match kv {
            Some(kv) => kv,
            None => (0..cfg.n_layers)
                .map(|l| {
                    let label = format!("layer.{l}.kv");
                    KvCache::new(gpu, &label, opts.kv_dtype, opts.ctx, cfg.n_heads, hd)
                })
                .collect::<Result<Vec<_>>>()?,
        };
        let n_logits = if opts.all_logits { c } else { 1 };
        Ok(RunState {
            chunk: c,
            all_logits: opts.all_logits,
            ids: role("ids", &[c])?.buf,
            pos_ids: role("pos_ids", &[c])?.buf,
            x: role("x", &[c, d])?,
            x2: role("x2", &[c, d])?,
            xb: role("xb", &[c, d])?,
            q: role("q", &[c, d])?,
            k: role("k", &[c, d])?,
            v: role("v", &[c, d])?,
            att: role("att", &[c, d])?,
            proj: role("proj", &[c, d])?,
            fc: role("fc", &[c, cfg.ffn_size])?,
            act: role("act", &[c, cfg.ffn_size])?,
            logits: role("logits", &[n_logits, cfg.vocab_size])?,
            kv,
        })
    }
}
