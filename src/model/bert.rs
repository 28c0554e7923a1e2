//! The BERT encoder (`BertModel`, e.g. sentence-transformers all-MiniLM-L6-v2) and sentence
//! embeddings: post-norm layers with LayerNorm, bidirectional multi-head attention, a GELU FFN and
//! biases everywhere; learned positions and token types (all 0 here). [`Bert::embed`] mean-pools
//! the last hidden states over the tokens of one unpadded sequence and L2-normalises them when the
//! directory's `modules.json` lists `sentence_transformers.models.Normalize`. The pooler is unused.
//! `pass` reads like the architecture: one kernel call a line.
//!
//! A pass encodes a batch of up to [`Bert::batch`] sequences at once ([`Bert::embed_batch`]): the
//! sequences lie one after another in the activations, each in a slot of
//! [`crate::plan::bert::sequence_slot`] rows, every row-wise kernel runs once over all of them
//! (the weights are read once a batch, not once a sequence), and attention runs once per sequence
//! over that sequence's rows alone, so no padding is attended to. The activations are the shared
//! buffers of [`crate::plan::bert_activation_plan`], so `wgllm plan` and the ledger agree.

use std::path::Path;

use serde_json::Value;

use crate::error::{Error, Result};
use crate::gpu::{Gpu, GpuBuffer};
use crate::kernels::activation::{self, GeluForm};
use crate::kernels::attention::{self, KvCache};
use crate::kernels::{elementwise, embedding, matmul, norm, Tensor, WeightMatrix};
use crate::model::config::{Arch, Ffn, ModelConfig, Norm, Positions};
use crate::model::source::Source;
use crate::quant::WeightFormat;

/// A LayerNorm's gain and bias.
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
}

/// A matrix (`rows` outputs) and its bias.
pub struct Linear {
    pub w: WeightMatrix,
    pub b: Tensor,
}

/// One encoder layer's parameters.
pub struct BertLayer {
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    pub attn_out: Linear,
    pub attn_ln: LayerNorm,
    pub ffn_in: Linear,
    pub ffn_out: Linear,
    pub ffn_ln: LayerNorm,
}

/// All parameters used for sentence embeddings.
pub struct BertWeights {
    pub word: WeightMatrix,
    /// Position embeddings plus token type 0's row, `[max_tokens, d]` f32, summed on the CPU at
    /// load (token types are all 0), so the embedding costs two lookups (words, positions) and one
    /// add.
    pub pos_type: WeightMatrix,
    pub emb_ln: LayerNorm,
    pub layers: Vec<BertLayer>,
}

/// Activations for `batch` sequences of up to `max_tokens` tokens (`rows` = `batch` slots),
/// allocated once as the planner shares them; every role is a prefix view of its buffer.
struct RunState {
    ids: GpuBuffer,
    pos_ids: GpuBuffer,
    x: Tensor,     // (rows, d) hidden states (LayerNorm outputs); the position embeddings
    sum: Tensor,   // (rows, d) the residual sum before a LayerNorm
    q: Tensor,     // (rows, d)
    k: Tensor,     // (rows, d), also the attention's K store
    v: Tensor,     // (rows, d), also the attention's V store
    att: Tensor,   // (rows, d)
    proj: Tensor,  // (rows, d) output of the attention / FFN projections, the word embeddings
    inter: Tensor, // (rows, ffn)
    act: Tensor,   // (rows, ffn) gelu(inter)
}

/// A loaded BERT encoder, ready to embed sentences.
pub struct Bert {
    pub cfg: ModelConfig,
    pub weights: BertWeights,
    /// Longest sequence accepted: `min(max_tokens, max_positions)`.
    pub max_tokens: usize,
    /// Sequences encoded in one pass.
    pub batch: usize,
    pub gelu: GeluForm,
    /// L2-normalise pooled embeddings (`modules.json` lists Normalize).
    pub normalize: bool,
    state: RunState,
}

/// Cosine similarity of two vectors (0 when either is zero), accumulated in f64.
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let (mut ab, mut aa, mut bb) = (0f64, 0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        let (x, y) = (x as f64, y as f64);
        ab += x * y;
        aa += x * x;
        bb += y * y;
    }
    if aa == 0.0 || bb == 0.0 {
        0.0
    } else {
        (ab / (aa.sqrt() * bb.sqrt())) as f32
    }
}

/// Mean of the `[n, d]` rows of `hidden`, L2-normalised (norm floored at 1e-12, as
/// sentence-transformers) if `normalize`.
pub fn mean_pool(hidden: &[f32], d: usize, normalize: bool) -> Vec<f32> {
    let n = hidden.len() / d.max(1);
    let mut acc = vec![0f64; d];
    for row in hidden.chunks_exact(d.max(1)) {
        acc.iter_mut().zip(row).for_each(|(a, &x)| *a += x as f64);
    }
    acc.iter_mut().for_each(|a| *a /= n.max(1) as f64);
    if normalize {
        let norm = acc.iter().map(|a| a * a).sum::<f64>().sqrt().max(1e-12);
        acc.iter_mut().for_each(|a| *a /= norm);
    }
    acc.into_iter().map(|a| a as f32).collect()
}

/// Reads a sentence-transformers directory's `modules.json`: whether it lists Normalize. Without
/// the file, `false`. A Pooling module whose config asks for anything but mean pooling is refused.
pub fn sentence_modules(dir: &Path) -> Result<bool> {
    let read = |p: &Path| -> Result<Value> {
        let text = std::fs::read_to_string(p).map_err(|e| Error::Io {
            path: p.display().to_string(),
            source: e,
        })?;
        serde_json::from_str(&text).map_err(|e| Error::BadFile {
            file: p.display().to_string(),
            reason: e.to_string(),
        })
    };
    let path = dir.join("modules.json");
    if !path.exists() {
        return Ok(false);
    }
    let modules = read(&path)?;
    let Some(list) = modules.as_array() else {
        let reason = "expected a list of modules".into();
        return Err(Error::BadFile {
            file: path.display().to_string(),
            reason,
        });
    };
    let mut normalize = false;
    for m in list {
        let ty = m.get("type").and_then(Value::as_str).unwrap_or("");
        if ty == "sentence_transformers.models.Normalize" {
            normalize = true;
        } else if ty == "sentence_transformers.models.Pooling" {
            let sub = m.get("path").and_then(Value::as_str).unwrap_or("");
            let cfg_path = dir.join(sub).join("config.json");
            if cfg_path.exists() {
                let cfg = read(&cfg_path)?;
                let on = |k: &str| cfg.get(k).and_then(Value::as_bool).unwrap_or(false);
                let others = ["pooling_mode_cls_token", "pooling_mode_max_tokens"];
                if !on("pooling_mode_mean_tokens") || others.iter().any(|k| on(k)) {
                    return Err(Error::BadFile {
                        file: cfg_path.display().to_string(),
                        reason: "only mean-token pooling is supported".into(),
                    });
                }
            }
        }
    }
    Ok(normalize)
}

/// An f32 table of `rows x cols` from `src` (GGUF stores it `[cols, rows]`).
fn table(src: &Source, name: &str, rows: usize, cols: usize) -> Result<Vec<f32>> {
    match src {
        Source::Gguf(g) => {
            g.expect_shape(name, &[cols, rows])?;
            g.tensor_f32(name)
        }
        Source::Hf(h, _) => {
            h.expect_shape(name, &[rows, cols])?;
            h.tensor_f32(name)
        }
        Source::Synthetic { seed, .. } => {
            let bytes =
                crate::quant::synthetic(crate::quant::WeightFormat::F32, rows * cols, *seed)?;
            Ok(bytemuck::pod_collect_to_vec(&bytes))
        }
    }
}

/// sentence-transformers' `max_seq_length` (from `sentence_bert_config.json`), the length its
/// tokenizer cuts input to; `None` when the file is absent.
pub fn sentence_max_length(dir: &std::path::Path) -> Option<usize> {
    let text = std::fs::read_to_string(dir.join("sentence_bert_config.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v.get("max_seq_length")?.as_u64().map(|n| n as usize)
}

/// The GELU form of a Hugging Face `hidden_act` (`gelu` is the exact erf form).
fn gelu_form(src: &Source) -> Result<GeluForm> {
    let Source::Hf(h, _) = src else {
        return Ok(GeluForm::Erf);
    };
    match h
        .config()
        .get("hidden_act")
        .and_then(Value::as_str)
        .unwrap_or("gelu")
    {
        "gelu" => Ok(GeluForm::Erf),
        "gelu_new" | "gelu_pytorch_tanh" => Ok(GeluForm::Tanh),
        other => Err(Error::ConfigInvalid {
            model_type: "bert".into(),
            field: "hidden_act".into(),
            reason: format!("'{other}' is not supported (gelu, gelu_new, gelu_pytorch_tanh are)"),
        }),
    }
}

impl Bert {
    /// Loads weights from `src` (HF `BertModel` names, with or without the `bert.` prefix),
    /// checking every shape against `cfg`, and allocates activations for one sequence of
    /// `max_tokens` tokens (capped at `max_positions`). `normalize` comes from the directory's
    /// `modules.json`.
    pub fn load(gpu: &Gpu, cfg: ModelConfig, src: &Source, max_tokens: usize) -> Result<Bert> {
        Bert::load_batch(gpu, cfg, src, 1, max_tokens)
    }

    /// [`Bert::load`] with activations for passes of `batch` sequences of up to `max_tokens`
    /// tokens each: what `wgllm plan --batch B --seq N` plans for a BERT model.
    pub fn load_batch(
        gpu: &Gpu,
        cfg: ModelConfig,
        src: &Source,
        batch: usize,
        max_tokens: usize,
    ) -> Result<Bert> {
        let bad = |reason: String| Error::invalid("bert", reason);
        if cfg.arch != Arch::Bert || cfg.norm != Norm::LayerNorm || cfg.ffn != Ffn::Gelu {
            return Err(bad(format!("config is {:?}, not a BERT encoder", cfg.arch)));
        }
        if cfg.positions != Positions::Learned || cfg.type_vocab_size == 0 {
            return Err(bad("BERT needs learned positions and token types".into()));
        }
        if cfg.n_heads * cfg.head_dim != cfg.hidden_size || cfg.n_kv_heads != cfg.n_heads {
            return Err(bad(format!(
                "{} heads of {} do not make hidden size {} (multi-head attention)",
                cfg.n_heads, cfg.head_dim, cfg.hidden_size
            )));
        }
        let max_tokens = max_tokens.min(cfg.max_positions);
        if max_tokens == 0 || batch == 0 {
            return Err(bad("max_tokens and batch must be positive".into()));
        }
        let prefix = if src.has("bert.embeddings.word_embeddings.weight") {
            "bert."
        } else {
            ""
        };
        let n = |s: &str| format!("{prefix}{s}");
        let (d, ffn) = (cfg.hidden_size, cfg.ffn_size);
        let linear = |name: &str, rows: usize, cols: usize| -> Result<Linear> {
            let w = src.matrix(gpu, &n(&format!("{name}.weight")), rows, cols)?;
            Ok(Linear {
                w,
                b: src.vector(gpu, &n(&format!("{name}.bias")), rows)?,
            })
        };
        let layer_norm = |name: &str| -> Result<LayerNorm> {
            let weight = src.vector(gpu, &n(&format!("{name}.weight")), d)?;
            Ok(LayerNorm {
                weight,
                bias: src.vector(gpu, &n(&format!("{name}.bias")), d)?,
            })
        };
        let word = src.matrix(
            gpu,
            &n("embeddings.word_embeddings.weight"),
            cfg.vocab_size,
            d,
        )?;
        let pos = table(
            src,
            &n("embeddings.position_embeddings.weight"),
            cfg.max_positions,
            d,
        )?;
        let types = table(
            src,
            &n("embeddings.token_type_embeddings.weight"),
            cfg.type_vocab_size,
            d,
        )?;
        let pos_type: Vec<f32> = pos[..max_tokens * d]
            .iter()
            .zip(types[..d].iter().cycle())
            .map(|(p, t)| p + t)
            .collect();
        // A table, so that each row of a batch looks its position up (every sequence starts at
        // position 0); f32 whatever the precision, as it was summed.
        let pos_type = gpu.upload_weights_f32(
            "embeddings.pos_type",
            WeightFormat::F32,
            max_tokens,
            d,
            &pos_type,
        )?;
        let emb_ln = layer_norm("embeddings.LayerNorm")?;
        let mut layers = Vec::with_capacity(cfg.n_layers);
        for i in 0..cfg.n_layers {
            let l = |s: &str| format!("encoder.layer.{i}.{s}");
            layers.push(BertLayer {
                q: linear(&l("attention.self.query"), d, d)?,
                k: linear(&l("attention.self.key"), d, d)?,
                v: linear(&l("attention.self.value"), d, d)?,
                attn_out: linear(&l("attention.output.dense"), d, d)?,
                attn_ln: layer_norm(&l("attention.output.LayerNorm"))?,
                ffn_in: linear(&l("intermediate.dense"), ffn, d)?,
                ffn_out: linear(&l("output.dense"), d, ffn)?,
                ffn_ln: layer_norm(&l("output.LayerNorm"))?,
            });
        }
        let normalize = match src {
            Source::Hf(h, _) => sentence_modules(h.dir())?,
            Source::Gguf(_) | Source::Synthetic { .. } => false,
        };
        let gelu = gelu_form(src)?;
        let state = RunState::new(gpu, &cfg, batch, max_tokens)?;
        let weights = BertWeights {
            word,
            pos_type,
            emb_ln,
            layers,
        };
        Ok(Bert {
            cfg,
            weights,
            max_tokens,
            batch,
            gelu,
            normalize,
            state,
        })
    }

    /// The last layer's hidden states of one sequence, `[ids.len(), hidden]` row-major. Refuses
    /// an empty sequence, ids outside the vocabulary and more than [`Bert::max_tokens`] tokens
    /// ([`Error::ContextFull`]).
    pub fn hidden_states(&mut self, gpu: &Gpu, ids: &[u32]) -> Result<Vec<f32>> {
        let mut out = self.hidden_states_batch(gpu, &[ids])?;
        out.pop()
            .ok_or_else(|| Error::invalid("bert", "no hidden states"))
    }

    /// The last layer's hidden states of each sequence (`[len, hidden]` row-major each), in passes
    /// of up to [`Bert::batch`] sequences. Refuses what [`Bert::hidden_states`] refuses, before
    /// anything runs, and an empty list.
    pub fn hidden_states_batch(&mut self, gpu: &Gpu, seqs: &[&[u32]]) -> Result<Vec<Vec<f32>>> {
        if seqs.is_empty() {
            return Err(Error::invalid("bert", "no sequences"));
        }
        for ids in seqs {
            if ids.is_empty() {
                return Err(Error::invalid("bert", "no tokens"));
            }
            if ids.len() > self.max_tokens {
                return Err(Error::ContextFull {
                    ctx: self.max_tokens,
                    needed: ids.len(),
                });
            }
            embedding::check_ids(ids, self.cfg.vocab_size)?;
        }
        let mut out = Vec::with_capacity(seqs.len());
        for group in seqs.chunks(self.batch) {
            out.extend(self.pass(gpu, group)?);
        }
        Ok(out)
    }

    /// One pass over up to [`Bert::batch`] checked sequences: sequence `b` in rows
    /// `b * slot..b * slot + len`, `slot` fitting the longest; padding rows hold token 0 at
    /// position 0 and are never attended to.
    fn pass(&mut self, gpu: &Gpu, seqs: &[&[u32]]) -> Result<Vec<Vec<f32>>> {
        let (s, w, cfg) = (&self.state, &self.weights, &self.cfg);
        let (d, nh, hd) = (cfg.hidden_size, cfg.n_heads, cfg.head_dim);
        let longest = seqs.iter().map(|s| s.len()).max().unwrap_or(1);
        let slot = crate::plan::bert::sequence_slot(longest, d);
        let m = seqs.len() * slot;
        let (mut ids, mut positions) = (vec![0u32; m], vec![0u32; m]);
        for (b, seq) in seqs.iter().enumerate() {
            ids[b * slot..b * slot + seq.len()].copy_from_slice(seq);
            for (t, p) in positions[b * slot..b * slot + seq.len()]
                .iter_mut()
                .enumerate()
            {
                *p = t as u32;
            }
        }
        let eps = cfg.norm_eps as f32;
        let scale = 1.0 / (hd as f32).sqrt();
        gpu.write(&s.ids, 0, bytemuck::cast_slice(&ids))?;
        gpu.write(&s.pos_ids, 0, bytemuck::cast_slice(&positions))?;
        let (x, sum, proj) = (
            s.x.view(&[m, d])?,
            s.sum.view(&[m, d])?,
            s.proj.view(&[m, d])?,
        );
        let (q, k, v) = (s.q.view(&[m, d])?, s.k.view(&[m, d])?, s.v.view(&[m, d])?);
        let (k3, v3) = (k.view(&[m, nh, hd])?, v.view(&[m, nh, hd])?);
        let att = s.att.view(&[m, d])?;
        let (inter, act) = (
            s.inter.view(&[m, cfg.ffn_size])?,
            s.act.view(&[m, cfg.ffn_size])?,
        );
        // The K and V projections are the attention's f32 store: no copy into a cache.
        let kv = KvCache::from_f32(&k3, &v3)?;

        let mut rec = gpu.recorder();
        let r = &mut rec;
        embedding::lookup(r, &w.word, &s.ids, m, &proj)?;
        embedding::lookup(r, &w.pos_type, &s.pos_ids, m, &x)?; // position + type 0
        elementwise::add(r, &proj, &x, &sum)?;
        norm::layer_norm(r, &sum, &w.emb_ln.weight, &w.emb_ln.bias, eps, &x)?;
        for l in &w.layers {
            // attention block, post-norm: x = LN(x + attn(x)), each sequence over its own rows
            linear(r, &l.q, &x, &q)?;
            linear(r, &l.k, &x, &k)?;
            linear(r, &l.v, &x, &v)?;
            for (b, seq) in seqs.iter().enumerate() {
                let n = seq.len();
                let (qb, ab) = (s.q.view(&[n, nh, hd])?, s.att.view(&[n, nh, hd])?);
                attention::attention_bidirectional_rows(r, &qb, &kv, b * slot, n, scale, &ab)?;
            }
            linear(r, &l.attn_out, &att, &proj)?;
            elementwise::add(r, &x, &proj, &sum)?; // residual
            norm::layer_norm(r, &sum, &l.attn_ln.weight, &l.attn_ln.bias, eps, &x)?;
            // FFN block: x = LN(x + W_out gelu(W_in x))
            linear(r, &l.ffn_in, &x, &inter)?;
            activation::gelu(r, &inter, &act, self.gelu)?;
            linear(r, &l.ffn_out, &act, &proj)?;
            elementwise::add(r, &x, &proj, &sum)?; // residual
            norm::layer_norm(r, &sum, &l.ffn_ln.weight, &l.ffn_ln.bias, eps, &x)?;
        }
        rec.submit()?;
        let hidden = gpu.read_f32(&x.buf, 0, m * d)?;
        Ok(seqs
            .iter()
            .enumerate()
            .map(|(b, seq)| hidden[b * slot * d..(b * slot + seq.len()) * d].to_vec())
            .collect())
    }

    /// The sentence embedding of one unpadded sequence (`[CLS] ... [SEP]` ids): the mean of its
    /// hidden states, L2-normalised if [`Bert::normalize`]. `[hidden]` values.
    pub fn embed(&mut self, gpu: &Gpu, ids: &[u32]) -> Result<Vec<f32>> {
        let hidden = self.hidden_states(gpu, ids)?;
        Ok(mean_pool(&hidden, self.cfg.hidden_size, self.normalize))
    }

    /// [`Bert::embed`] of each sequence, in passes of up to [`Bert::batch`].
    pub fn embed_batch(&mut self, gpu: &Gpu, seqs: &[&[u32]]) -> Result<Vec<Vec<f32>>> {
        let d = self.cfg.hidden_size;
        Ok(self
            .hidden_states_batch(gpu, seqs)?
            .iter()
            .map(|h| mean_pool(h, d, self.normalize))
            .collect())
    }
}

/// `y = x Wᵀ + b`.
fn linear(r: &mut crate::gpu::Recorder, l: &Linear, x: &Tensor, y: &Tensor) -> Result<()> {
    matmul::matmul(r, &l.w, x, y)?;
    elementwise::add_bias(r, y, &l.b)
}

impl RunState {
    /// The buffers of [`crate::plan::bert_activation_plan`] for `batch` sequences of up to
    /// `max_tokens` tokens, one allocation each, every role a prefix view.
    fn new(gpu: &Gpu, cfg: &ModelConfig, batch: usize, max_tokens: usize) -> Result<RunState> {
        let plan = crate::plan::bert_activation_plan(cfg, batch, max_tokens);
        let rows = plan.chunk;
        let acts = crate::model::planned::PlannedActivations::allocate(gpu, plan, "bert")?;
        let role = |name: &str, cols: usize| acts.role(name, &[rows, cols]);
        let d = cfg.hidden_size;
        Ok(RunState {
            ids: role("ids", 1)?.buf,
            pos_ids: role("pos_ids", 1)?.buf,
            x: role("x", d)?,
            sum: role("sum", d)?,
            q: role("q", d)?,
            k: role("k", d)?,
            v: role("v", d)?,
            att: role("att", d)?,
            proj: role("proj", d)?,
            inter: role("inter", cfg.ffn_size)?,
            act: role("act", cfg.ffn_size)?,
        })
    }
}
