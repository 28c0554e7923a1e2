//! GPT-2 (`GPT2LMHeadModel`): pre-norm decoder with LayerNorm, learned absolute positions, biases
//! on every projection, a tanh-GELU FFN and the output head tied to the token embedding. Loaded
//! from a Hugging Face safetensors directory; `forward` reads like the architecture, one kernel call
//! a line, as [`crate::model::llama`].
//!
//! HF GPT-2 keeps its projections as `Conv1D`, whose weight is stored `[in, out]` (`y = x W + b`),
//! the transpose of `nn.Linear`. Those matrices are transposed on the CPU ([`transpose`]) before
//! upload, and the fused `c_attn` (`[d, 3d]`) is split into separate Q, K and V matrices so that
//! each lands in its own activation buffer in the layout attention expects.

use crate::error::{Error, Result};
use crate::gpu::record::DispatchTime;
use crate::gpu::{BufferClass, Gpu, GpuBuffer, Recorder};
use crate::kernels::activation::{self, GeluForm};
use crate::kernels::attention::{self, KvCache};
use crate::kernels::{elementwise, embedding, matmul, norm, Tensor, WeightMatrix};
use crate::loader::safetensors::HfModel;
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

/// Activations for one chunk of up to `chunk` tokens, allocated once, and the KV cache.
pub struct RunState {
    pub chunk: usize,
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
fn hf_options(
    json: &serde_json::Value,
    n_layers: usize,
    head_dim: usize,
) -> Result<(GeluForm, Vec<f32>)> {
    let invalid = |field: &str, reason: String| Error::ConfigInvalid {
        model_type: "gpt2".into(),
        field: field.into(),
        reason,
    };
    let flag = |name: &str, default: bool| match json.get(name) {
        None | Some(serde_json::Value::Null) => Ok(default),
        Some(v) => v
            .as_bool()
            .ok_or_else(|| invalid(name, format!("{v} is not a boolean"))),
    };
    let gelu = match json
        .get("activation_function")
        .and_then(|v| v.as_str())
        .unwrap_or("gelu_new")
    {
        // gelu_fast is the same tanh formula with the constant folded.
        "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => GeluForm::Tanh,
        "gelu" => GeluForm::Erf,
        other => {
            return Err(invalid(
                "activation_function",
                format!("'{other}' is not supported (gelu_new, gelu)"),
            ))
        }
    };
    let base = if flag("scale_attn_weights", true)? {
        1.0 / (head_dim as f32).sqrt()
    } else {
        1.0
    };
    let by_layer = flag("scale_attn_by_inverse_layer_idx", false)?;
    let scales = (0..n_layers)
        .map(|l| {
            if by_layer {
                base / (l + 1) as f32
            } else {
                base
            }
        })
        .collect();
    Ok((gelu, scales))
}

/// Tensor names: HF's, with the `transformer.` prefix that `GPT2LMHeadModel` checkpoints may carry.
struct Names {
    prefix: &'static str,
}

impl Names {
    fn g(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }
    fn l(&self, i: usize, name: &str) -> String {
        format!("{}h.{i}.{name}", self.prefix)
    }
    /// Every tensor with its HF shape, for the check before any upload.
    fn shapes(&self, cfg: &ModelConfig) -> Vec<(String, Vec<usize>)> {
        let (d, f) = (cfg.hidden_size, cfg.ffn_size);
        let mut v = vec![
            (self.g("wte.weight"), vec![cfg.vocab_size, d]),
            (self.g("wpe.weight"), vec![cfg.max_positions, d]),
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
            v.extend(layer.iter().map(|(n, s)| (self.l(i, n), s.to_vec())));
        }
        v.push((self.g("ln_f.weight"), vec![d]));
        v.push((self.g("ln_f.bias"), vec![d]));
        v
    }
}

/// Uploads a Conv1D weight stored `[n_in, parts * n_out]` as `parts` matrices of `n_out x n_in`.
fn conv1d(
    gpu: &Gpu,
    h: &HfModel,
    precision: Option<WeightFormat>,
    name: &str,
    n_in: usize,
    n_out: usize,
    parts: usize,
) -> Result<Vec<WeightMatrix>> {
    h.expect_shape(name, &[n_in, parts * n_out])?;
    let t = transpose(&h.tensor_f32(name)?, n_in, parts * n_out);
    let format = weight_format(precision, n_in);
    t.chunks_exact(n_out * n_in)
        .enumerate()
        .map(|(p, w)| {
            let label = if parts == 1 {
                name.to_string()
            } else {
                format!("{name}[{}]", ["q", "k", "v"].get(p).unwrap_or(&"?"))
            };
            gpu.upload_weights_f32(&label, format, n_out, n_in, w)
        })
        .collect()
}

/// A bias `[parts * n]` split into `parts` vectors.
fn split_vector(gpu: &Gpu, h: &HfModel, name: &str, n: usize, parts: usize) -> Result<Vec<Tensor>> {
    h.expect_shape(name, &[parts * n])?;
    let v = h.tensor_f32(name)?;
    v.chunks_exact(n)
        .enumerate()
        .map(|(p, c)| gpu.tensor_from(&format!("{name}[{p}]"), BufferClass::Parameters, &[n], c))
        .collect()
}

impl Gpt2 {
    /// Loads weights from a Hugging Face directory (`src` must be [`Source::Hf`]; its format
    /// quantises every matrix, embeddings and head included), checking every tensor's shape
    /// against `cfg` before anything is uploaded, and allocates the KV cache and activations.
    pub fn load(gpu: &Gpu, cfg: ModelConfig, src: &Source, mut opts: RunOptions) -> Result<Gpt2> {
        if cfg.arch != Arch::Gpt2
            || cfg.norm != Norm::LayerNorm
            || cfg.positions != Positions::Learned
            || cfg.n_kv_heads != cfg.n_heads
        {
            return Err(Error::invalid(
                "gpt2",
                format!("config is a {:?} model, not GPT-2", cfg.arch),
            ));
        }
        if cfg.n_heads * cfg.head_dim != cfg.hidden_size {
            return Err(Error::invalid(
                "gpt2",
                format!(
                    "{} heads of {} do not make n_embd {}",
                    cfg.n_heads, cfg.head_dim, cfg.hidden_size
                ),
            ));
        }
        let &Source::Hf(h, precision) = src else {
            return Err(Error::invalid("gpt2", "GPT-2 loads from a Hugging Face safetensors directory; GGUF gpt2 files are not supported"));
        };
        let (gelu, attn_scales) = hf_options(h.config(), cfg.n_layers, cfg.head_dim)?;
        let names = Names {
            prefix: if h.tensor_shape("transformer.wte.weight").is_ok() {
                "transformer."
            } else {
                ""
            },
        };
        for (name, shape) in names.shapes(&cfg) {
            h.expect_shape(&name, &shape)?;
        }
        let (d, f) = (cfg.hidden_size, cfg.ffn_size);
        let ln = |n: &str| -> Result<(Tensor, Tensor)> {
            Ok((
                src.vector(gpu, &format!("{n}.weight"), d)?,
                src.vector(gpu, &format!("{n}.bias"), d)?,
            ))
        };
        let wte = src.matrix(gpu, &names.g("wte.weight"), cfg.vocab_size, d)?;
        let wpe = src.matrix(gpu, &names.g("wpe.weight"), cfg.max_positions, d)?;
        let mut layers = Vec::with_capacity(cfg.n_layers);
        for i in 0..cfg.n_layers {
            let n = |r: &str| names.l(i, r);
            let mut qkv = conv1d(gpu, h, precision, &n("attn.c_attn.weight"), d, d, 3)?.into_iter();
            let mut bqkv = split_vector(gpu, h, &n("attn.c_attn.bias"), d, 3)?.into_iter();
            let one = |name: &str, n_in: usize, n_out: usize| {
                conv1d(gpu, h, precision, name, n_in, n_out, 1).map(|mut v| v.remove(0))
            };
            let missing = || Error::invalid("gpt2", "c_attn split into fewer than 3 parts");
            layers.push(Gpt2Layer {
                ln_1: ln(&n("ln_1"))?,
                wq: qkv.next().ok_or_else(missing)?,
                wk: qkv.next().ok_or_else(missing)?,
                wv: qkv.next().ok_or_else(missing)?,
                bq: bqkv.next().ok_or_else(missing)?,
                bk: bqkv.next().ok_or_else(missing)?,
                bv: bqkv.next().ok_or_else(missing)?,
                wo: one(&n("attn.c_proj.weight"), d, d)?,
                bo: src.vector(gpu, &n("attn.c_proj.bias"), d)?,
                ln_2: ln(&n("ln_2"))?,
                w_fc: one(&n("mlp.c_fc.weight"), d, f)?,
                b_fc: src.vector(gpu, &n("mlp.c_fc.bias"), f)?,
                w_proj: one(&n("mlp.c_proj.weight"), f, d)?,
                b_proj: src.vector(gpu, &n("mlp.c_proj.bias"), d)?,
            });
        }
        let ln_f = ln(&names.g("ln_f"))?;
        // Positions past the learned table have no embedding.
        opts.ctx = opts.ctx.min(cfg.max_positions);
        let state = RunState::new(gpu, &cfg, &opts)?;
        Ok(Gpt2 {
            cfg,
            gelu,
            attn_scales,
            weights: Gpt2Weights {
                wte,
                wpe,
                layers,
                ln_f,
            },
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
        let rows = if self.opts.all_logits {
            self.state.chunk
        } else {
            1
        };
        if self.state.logits.len() < rows * self.cfg.vocab_size {
            // Logits for every token were asked for after loading: grow the buffer.
            let shape = [rows, self.cfg.vocab_size];
            self.state.logits = gpu.tensor("logits", BufferClass::Activations, &shape)?;
        }
        let mut out = Vec::new();
        let mut done = 0;
        while done < tokens.len() {
            let m = (tokens.len() - done).min(self.state.chunk);
            let last = done + m == tokens.len();
            let logits = self.forward_chunk(
                gpu,
                &tokens[done..done + m],
                pos0 + done,
                self.opts.all_logits || last,
            )?;
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
    fn new(gpu: &Gpu, cfg: &ModelConfig, opts: &RunOptions) -> Result<RunState> {
        let c = opts.chunk.max(1);
        let (d, hd) = (cfg.hidden_size, cfg.head_dim);
        let t = |label: &str, shape: &[usize]| gpu.tensor(label, BufferClass::Activations, shape);
        let kv = (0..cfg.n_layers)
            .map(|l| {
                KvCache::new(
                    gpu,
                    &format!("layer.{l}.kv"),
                    opts.kv_dtype,
                    opts.ctx,
                    cfg.n_heads,
                    hd,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(RunState {
            chunk: c,
            ids: gpu.alloc("token_ids", BufferClass::Activations, c as u64 * 4)?,
            pos_ids: gpu.alloc("position_ids", BufferClass::Activations, c as u64 * 4)?,
            x: t("x", &[c, d])?,
            x2: t("x2", &[c, d])?,
            xb: t("xb", &[c, d])?,
            q: t("q", &[c, d])?,
            k: t("k", &[c, d])?,
            v: t("v", &[c, d])?,
            att: t("att", &[c, d])?,
            proj: t("proj", &[c, d])?,
            fc: t("ffn_fc", &[c, cfg.ffn_size])?,
            act: t("ffn_act", &[c, cfg.ffn_size])?,
            logits: t(
                "logits",
                &[if opts.all_logits { c } else { 1 }, cfg.vocab_size],
            )?,
            kv,
        })
    }
}
