//! Random small LLaMA-family models (LLaMA, Qwen2, Gemma 3) end to end against a CPU reference.
//!
//! The activation plan shares buffers between roles by the liveness of a hand-written schedule,
//! and the single-token folds change which roles a kernel binds, so a sharing that is wrong shows
//! up for some shapes only (where a pass folds, where sizes make the planner pair two roles): as
//! the recorder refusing one buffer bound as a kernel's input and output, or as wrong logits.
//! So this test draws, from seeded generators, configs (hidden, intermediate, heads, KV heads,
//! head_dim, vocab, 1-3 layers, tied or separate head, biases), sources (GGUF with a format per
//! matrix, or a Hugging Face directory quantised on load: every format the loaders take), chunk
//! sizes (1 and several tokens), devices (weights in buffers or textures, or no subgroups and so
//! nothing folded) and resident or streamed layers. Each case runs a chunked prefill keeping the
//! last row's logits, a prefill keeping every row's and decode steps, and compares every logits
//! row with an f64 CPU forward pass on the same dequantised weights. What the loader accepts must
//! run; a failure prints the case and its seed.
//!
//! Fixed cases: the model of the issue that motivated this (one layer, hidden 32, vocab 264, tied:
//! its head shared a buffer with the row it read), and models past the fold limit in one place
//! each, which small random models never reach.

mod common;

use rand::{Rng, SeedableRng};
use wgllm::gpu::WeightLayout;
use wgllm::kernels::attention::KvDtype;
use wgllm::loader::gguf::Gguf;
use wgllm::loader::HfModel;
use wgllm::model::config::ModelConfig;
use wgllm::model::llama::{config_from_gguf, Llama, RunOptions};
use wgllm::model::source::Source;
use wgllm::quant::WeightFormat;
use wgllm::{Gpu, GpuOptions};

/// Every logits row against the f64 reference on the same dequantised weights: max |diff| over
/// the row, relative to the row's largest |logit| plus one. Every format is compared with its own
/// dequantised values, so only f32 arithmetic (summation order, the folds' rescaling, `exp` in
/// the softmax) separates the two; measured on lavapipe: below 2e-6 in every case. A buffer
/// shared while still read, by contrast, moves logits by their own size.
const LOGITS_TOL: f64 = 1e-4;

/// Random cases by default; each loads a model and runs 5 to 12 forward calls (under a second on
/// lavapipe with two threads, kernels compiled). `WGLLM_RANDOM_CASES` and `WGLLM_RANDOM_SEED`
/// draw others, to search further: a failing case prints its seed.
const CASES: u64 = 24;

/// Where the weights come from.
#[derive(Debug, Clone)]
enum Src {
    /// A GGUF image with a format per matrix (interleaved RoPE, as llama.cpp converts), with
    /// Q/K/V biases or none (the loader looks for `blk.0.attn_q.bias`).
    Gguf { qkv_bias: bool },
    /// A Hugging Face directory of f32 safetensors, quantised on load to `precision` (rotate-half
    /// RoPE); `model_type` llama (optionally with `attention_bias`: Q, K, V and O biases, and
    /// `mlp_bias`) or qwen2 (Q, K and V biases).
    Hf {
        precision: Option<WeightFormat>,
        qwen2: bool,
        attention_bias: bool,
        mlp_bias: bool,
    },
}

/// One drawn model and how it runs.
#[derive(Debug, Clone)]
struct Case {
    /// Seeds the weights and the token ids.
    seed: u64,
    vocab: usize,
    hidden: usize,
    ffn: usize,
    n_heads: usize,
    n_kv: usize,
    head_dim: usize,
    layers: usize,
    tied: bool,
    src: Src,
    /// GGUF only: the formats the matrices take in turn (one that does not fit a matrix's row
    /// length gives f16).
    formats: Vec<WeightFormat>,
    /// Tokens per chunk (`RunOptions::chunk`): the activations are planned for it.
    chunk: usize,
    device: Device,
    /// Layers kept on the GPU (`RunOptions::resident_layers`); the rest are streamed.
    resident: Option<usize>,
    /// A Gemma 3 model (GGUF `gemma3`, HF `gemma3_text`) instead of LLaMA / Qwen2.
    gemma: bool,
    /// Gemma only: linear RoPE scaling of the global layers (positions divided by it; 1: none),
    /// as GGUF's `rope.scaling.type = linear` and `rope.scaling.factor`, or Hugging Face's
    /// `rope_scaling: {"rope_type": "linear", "factor": f}`.
    rope_factor: f64,
}

/// The device a case runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Device {
    /// The default device, weights in buffers. On lavapipe that runs the subgroup matvec and the
    /// single-token folds.
    Buffers,
    /// The same, weights in textures (only where the subgroup matvec, their one reader, runs).
    Textures,
    /// A device opened without subgroups: the kernels every GPU gets, nothing folded.
    Portable,
}

/// One tensor of the model: its Hugging Face name and the GGUF one, `[rows, cols]` (or `[n]`),
/// f32 values, and the format the GPU holds it in (vectors: f32).
struct T {
    hf: String,
    gguf: String,
    shape: Vec<usize>,
    values: Vec<f32>,
    format: WeightFormat,
}

/// Whether the tensors of `c` have Q/K/V biases, an O bias, MLP biases.
fn biases(c: &Case) -> (bool, bool, bool) {
    match c.src {
        Src::Gguf { qkv_bias } => (qkv_bias, false, false),
        Src::Hf {
            qwen2,
            attention_bias,
            mlp_bias,
            ..
        } => (qwen2 || attention_bias, !qwen2 && attention_bias, mlp_bias),
    }
}

/// The model's tensors, random: weights N(0, 1/cols) so that every product keeps unit scale,
/// norm weights near 1, biases small.
fn tensors(c: &Case) -> Vec<T> {
    let (d, f, v) = (c.hidden, c.ffn, c.vocab);
    let (q, kv) = (c.n_heads * c.head_dim, c.n_kv * c.head_dim);
    let (qkv_bias, o_bias, mlp_bias) = biases(c);
    let mut out = Vec::new();
    let mut seed = c.seed.wrapping_mul(1000);
    let mut turn = c.formats.iter().cycle();
    let mut push = |hf: String, gguf: String, shape: Vec<usize>, scale: f32, offset: f32| {
        seed += 1;
        let n = shape.iter().product();
        let values = common::randn(n, seed, scale)
            .into_iter()
            .map(|x| x + offset)
            .collect();
        let format = match (&c.src, &shape[..]) {
            (_, [_]) => WeightFormat::F32,
            (Src::Gguf { .. }, &[_, cols]) => match turn.next() {
                Some(f) if fitting(cols).contains(f) && gguf_native(*f) => *f,
                _ => WeightFormat::F16,
            },
            // The HF loader keeps f16 for rows that are not whole blocks of a block format.
            (Src::Hf { precision, .. }, &[_, cols]) => match precision {
                None => WeightFormat::F32,
                Some(f) if fitting(cols).contains(f) => *f,
                Some(_) => WeightFormat::F16,
            },
            _ => unreachable!("vectors and matrices only"),
        };
        out.push(T {
            hf,
            gguf,
            shape,
            values,
            format,
        });
    };
    let w = |cols: usize| 1.0 / (cols as f32).sqrt();
    let hd = c.head_dim;
    // Gemma calls the FFN's pre-norm `pre_feedforward_layernorm` and LLaMA's name of it the norm
    // after the attention.
    let ffn_norm_hf = if c.gemma {
        "pre_feedforward_layernorm.weight"
    } else {
        "post_attention_layernorm.weight"
    };
    push(
        "model.embed_tokens.weight".into(),
        "token_embd.weight".into(),
        vec![v, d],
        1.0,
        0.0,
    );
    for l in 0..c.layers {
        let hf = |n: &str| format!("model.layers.{l}.{n}");
        let gg = |n: &str| format!("blk.{l}.{n}");
        push(
            hf("input_layernorm.weight"),
            gg("attn_norm.weight"),
            vec![d],
            0.1,
            1.0,
        );
        for (p, r, g) in [("q", q, "attn_q"), ("k", kv, "attn_k"), ("v", kv, "attn_v")] {
            push(
                hf(&format!("self_attn.{p}_proj.weight")),
                gg(&format!("{g}.weight")),
                vec![r, d],
                w(d),
                0.0,
            );
            if qkv_bias {
                push(
                    hf(&format!("self_attn.{p}_proj.bias")),
                    gg(&format!("{g}.bias")),
                    vec![r],
                    0.1,
                    0.0,
                );
            }
        }
        if c.gemma {
            for (p, g) in [("q", "attn_q_norm"), ("k", "attn_k_norm")] {
                push(
                    hf(&format!("self_attn.{p}_norm.weight")),
                    gg(&format!("{g}.weight")),
                    vec![hd],
                    0.1,
                    1.0,
                );
            }
        }
        push(
            hf("self_attn.o_proj.weight"),
            gg("attn_output.weight"),
            vec![d, q],
            w(q),
            0.0,
        );
        if o_bias {
            push(
                hf("self_attn.o_proj.bias"),
                gg("attn_output.bias"),
                vec![d],
                0.1,
                0.0,
            );
        }
        if c.gemma {
            push(
                hf("post_attention_layernorm.weight"),
                gg("post_attention_norm.weight"),
                vec![d],
                0.1,
                1.0,
            );
        }
        push(hf(ffn_norm_hf), gg("ffn_norm.weight"), vec![d], 0.1, 1.0);
        for (p, g) in [("gate", "ffn_gate"), ("up", "ffn_up")] {
            push(
                hf(&format!("mlp.{p}_proj.weight")),
                gg(&format!("{g}.weight")),
                vec![f, d],
                w(d),
                0.0,
            );
            if mlp_bias {
                push(
                    hf(&format!("mlp.{p}_proj.bias")),
                    gg(&format!("{g}.bias")),
                    vec![f],
                    0.1,
                    0.0,
                );
            }
        }
        push(
            hf("mlp.down_proj.weight"),
            gg("ffn_down.weight"),
            vec![d, f],
            w(f),
            0.0,
        );
        if mlp_bias {
            push(
                hf("mlp.down_proj.bias"),
                gg("ffn_down.bias"),
                vec![d],
                0.1,
                0.0,
            );
        }
        if c.gemma {
            push(
                hf("post_feedforward_layernorm.weight"),
                gg("post_ffw_norm.weight"),
                vec![d],
                0.1,
                1.0,
            );
        }
    }
    push(
        "model.norm.weight".into(),
        "output_norm.weight".into(),
        vec![d],
        0.1,
        1.0,
    );
    if !c.tied {
        push(
            "lm_head.weight".into(),
            "output.weight".into(),
            vec![v, d],
            w(d),
            0.0,
        );
    }
    out
}

/// Formats that a matrix of `cols` columns can be stored in (block formats need whole blocks).
fn fitting(cols: usize) -> Vec<WeightFormat> {
    WeightFormat::ALL
        .into_iter()
        .filter(|f| cols.is_multiple_of(f.block_len()))
        .collect()
}

/// `values` as the GPU holds them in `format`: quantised and dequantised (blocks run along the
/// rows, which are whole blocks for a block format).
fn round_trip(format: WeightFormat, values: &[f32]) -> Vec<f32> {
    let bytes = wgllm::quant::quantize(format, values).expect("quantise");
    wgllm::quant::dequantize(format, &bytes, values.len()).expect("dequantise")
}

// ---- GGUF -------------------------------------------------------------------------------------

enum Kv {
    U32(u32),
    F32(f32),
    Str(&'static str),
}

/// A GGUF v3 image: metadata, tensor infos, then each tensor at the next 32-byte boundary.
fn gguf_image(kvs: &[(String, Kv)], tensors: &[(String, Vec<u64>, u32, Vec<u8>)]) -> Vec<u8> {
    let put_str = |b: &mut Vec<u8>, s: &str| {
        b.extend_from_slice(&(s.len() as u64).to_le_bytes());
        b.extend_from_slice(s.as_bytes());
    };
    let mut b = b"GGUF".to_vec();
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    b.extend_from_slice(&(kvs.len() as u64).to_le_bytes());
    for (k, v) in kvs {
        put_str(&mut b, k);
        match v {
            Kv::U32(x) => {
                b.extend_from_slice(&4u32.to_le_bytes());
                b.extend_from_slice(&x.to_le_bytes());
            }
            Kv::F32(x) => {
                b.extend_from_slice(&6u32.to_le_bytes());
                b.extend_from_slice(&x.to_le_bytes());
            }
            Kv::Str(s) => {
                b.extend_from_slice(&8u32.to_le_bytes());
                put_str(&mut b, s);
            }
        }
    }
    let mut data = Vec::new();
    for (name, dims, ty, bytes) in tensors {
        data.resize(data.len().next_multiple_of(32), 0);
        put_str(&mut b, name);
        b.extend_from_slice(&(dims.len() as u32).to_le_bytes());
        dims.iter()
            .for_each(|d| b.extend_from_slice(&d.to_le_bytes()));
        b.extend_from_slice(&ty.to_le_bytes());
        b.extend_from_slice(&(data.len() as u64).to_le_bytes());
        data.extend_from_slice(bytes);
    }
    b.resize(b.len().next_multiple_of(32), 0);
    b.extend_from_slice(&data);
    b
}

/// Whether the GGUF loader hands tensors of `f` to the GPU as they are (it converts the types
/// it has no native mapping for, which this test's format check would count as a failure): the
/// K-quant and Q5 formats join the GGUF cases as soon as the loader maps them natively.
fn gguf_native(f: WeightFormat) -> bool {
    use wgllm::loader::gguf::{weight_format, GgmlType};
    GgmlType::from_id(ggml_type(f)).and_then(weight_format) == Some(f)
}

/// GGML's type id of a weight format.
fn ggml_type(f: WeightFormat) -> u32 {
    match f {
        WeightFormat::F32 => 0,
        WeightFormat::F16 => 1,
        WeightFormat::Q4_0 => 2,
        WeightFormat::Q4_1 => 3,
        WeightFormat::Q8_0 => 8,
        WeightFormat::Q5_0 => 6,
        WeightFormat::Q5_1 => 7,
        WeightFormat::Q4_K => 12,
        WeightFormat::Q5_K => 13,
        WeightFormat::Q6_K => 14,
    }
}

/// The model as a GGUF image, each tensor in its format.
fn gguf_of(c: &Case, ts: &[T]) -> Gguf {
    let arch = if c.gemma { "gemma3" } else { "llama" };
    let k = |s: &str| format!("{arch}.{s}");
    let mut kvs = vec![
        ("general.architecture".into(), Kv::Str(arch)),
        (k("embedding_length"), Kv::U32(c.hidden as u32)),
        (k("feed_forward_length"), Kv::U32(c.ffn as u32)),
        (k("block_count"), Kv::U32(c.layers as u32)),
        (k("attention.head_count"), Kv::U32(c.n_heads as u32)),
        (k("attention.head_count_kv"), Kv::U32(c.n_kv as u32)),
        (k("attention.key_length"), Kv::U32(c.head_dim as u32)),
        (k("context_length"), Kv::U32(256)),
        (k("attention.layer_norm_rms_epsilon"), Kv::F32(1e-5)),
        (k("rope.freq_base"), Kv::F32(global_theta(c) as f32)),
    ];
    if c.gemma {
        kvs.push((k("attention.sliding_window"), Kv::U32(512)));
    }
    if c.rope_factor != 1.0 {
        kvs.push((k("rope.scaling.type"), Kv::Str("linear")));
        kvs.push((k("rope.scaling.factor"), Kv::F32(c.rope_factor as f32)));
    }
    let tensors: Vec<_> = ts
        .iter()
        .map(|t| {
            // GGUF lists dimensions row length first.
            let dims = t.shape.iter().rev().map(|&d| d as u64).collect();
            let bytes = wgllm::quant::quantize(t.format, &t.values).expect("quantise");
            (t.gguf.clone(), dims, ggml_type(t.format), bytes)
        })
        .collect();
    Gguf::from_bytes("random.gguf", gguf_image(&kvs, &tensors)).expect("a valid GGUF image")
}

// ---- Hugging Face -----------------------------------------------------------------------------

fn hf_dir(c: &Case, ts: &[T], name: &str) -> common::TempModel {
    let Src::Hf {
        qwen2,
        attention_bias,
        mlp_bias,
        ..
    } = c.src
    else {
        unreachable!("a Hugging Face case");
    };
    let mut cfg = serde_json::json!({
        "model_type": if c.gemma { "gemma3_text" } else if qwen2 { "qwen2" } else { "llama" },
        "vocab_size": c.vocab,
        "hidden_size": c.hidden,
        "intermediate_size": c.ffn,
        "num_hidden_layers": c.layers,
        "num_attention_heads": c.n_heads,
        "num_key_value_heads": c.n_kv,
        "head_dim": c.head_dim,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5,
        "rope_theta": global_theta(c),
        "tie_word_embeddings": c.tied,
    });
    if c.gemma {
        // A global layer every other one, so that small models have both kinds; a scale other
        // than the head size.
        cfg["sliding_window_pattern"] = 2.into();
        cfg["query_pre_attn_scalar"] = 24.into();
        cfg["hidden_activation"] = "gelu_pytorch_tanh".into();
        if c.rope_factor != 1.0 {
            cfg["rope_scaling"] =
                serde_json::json!({"rope_type": "linear", "factor": c.rope_factor});
        }
    } else if !qwen2 {
        cfg["attention_bias"] = attention_bias.into();
        cfg["mlp_bias"] = mlp_bias.into();
    }
    // Hugging Face's Gemma stores its norm weights less 1 (it computes `x * (1 + w)`).
    let stored = |t: &T| -> Vec<f32> {
        if c.gemma && t.hf.ends_with("norm.weight") {
            t.values.iter().map(|v| v - 1.0).collect()
        } else {
            t.values.clone()
        }
    };
    let tensors: Vec<_> = ts
        .iter()
        .map(|t| (t.hf.clone(), t.shape.clone(), stored(t)))
        .collect();
    common::write_hf_model(name, &cfg, &tensors)
}

// ---- CPU reference ----------------------------------------------------------------------------

/// The reference's weights by GGUF name, in f64: the values the GPU holds ([`ref_weights`]).
struct RefWeights {
    by_name: std::collections::HashMap<String, Vec<f64>>,
}

impl RefWeights {
    fn get(&self, name: &str) -> Option<&[f64]> {
        self.by_name.get(name).map(|v| &v[..])
    }
    fn w(&self, name: &str) -> &[f64] {
        self.get(name)
            .unwrap_or_else(|| panic!("reference weight {name}"))
    }
}

fn rms_norm(x: &[f64], g: &[f64], eps: f64) -> Vec<f64> {
    let ms = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
    let s = 1.0 / (ms + eps).sqrt();
    x.iter().zip(g).map(|(v, g)| v * s * g).collect()
}

/// `W x (+ b)` for `W` rows of `x.len()`.
fn matvec(w: &[f64], x: &[f64], b: Option<&[f64]>) -> Vec<f64> {
    let mut y: Vec<f64> = w
        .chunks_exact(x.len())
        .map(|r| r.iter().zip(x).map(|(a, b)| a * b).sum())
        .collect();
    if let Some(b) = b {
        y.iter_mut().zip(b).for_each(|(y, b)| *y += b);
    }
    y
}

/// Rotates each head of `x` (`heads x hd`) for position `pos` with base `theta`: pairs
/// `(2i, 2i + 1)` when `interleaved` (LLaMA GGUF), else `(i, i + hd / 2)` (Hugging Face, Gemma).
/// Linear scaling: the position is divided by `factor` (1: none).
fn rope(x: &mut [f64], hd: usize, pos: usize, interleaved: bool, theta: f64, factor: f64) {
    let pos = pos as f64 / factor;
    for h in x.chunks_exact_mut(hd) {
        for i in 0..hd / 2 {
            let freq = theta.powf(-2.0 * i as f64 / hd as f64);
            let (s, c) = (pos * freq).sin_cos();
            let (a, b) = if interleaved {
                (2 * i, 2 * i + 1)
            } else {
                (i, i + hd / 2)
            };
            let (x0, x1) = (h[a], h[b]);
            h[a] = x0 * c - x1 * s;
            h[b] = x0 * s + x1 * c;
        }
    }
}

/// The RoPE base of the global layers: Gemma's 1e6, else 10,000 (every LLaMA layer).
fn global_theta(c: &Case) -> f64 {
    if c.gemma {
        1e6
    } else {
        1e4
    }
}

/// Whether layer `l` of a Gemma case is global: every 6th in GGUF (llama.cpp's pattern), every
/// 2nd in the Hugging Face configs written here (`sliding_window_pattern`).
fn gemma_global(c: &Case, l: usize) -> bool {
    let every = if matches!(c.src, Src::Gguf { .. }) {
        6
    } else {
        2
    };
    (l + 1).is_multiple_of(every)
}

/// Each `hd`-wide head of `x` RMS-normalised with `g`.
fn head_norm(x: &[f64], g: &[f64], hd: usize, eps: f64) -> Vec<f64> {
    x.chunks_exact(hd)
        .flat_map(|h| rms_norm(h, g, eps))
        .collect()
}

/// `v` normalised with `norm` where the model has that norm (Gemma's post norms), else `v`.
fn post_norm(w: &RefWeights, norm: &str, v: Vec<f64>, eps: f64) -> Vec<f64> {
    match w.get(norm) {
        Some(g) => rms_norm(&v, g, eps),
        None => v,
    }
}

/// The logits of every position of `tokens`, in f64 on the reference weights: LLaMA, or Gemma 3
/// (embeddings times sqrt(hidden), q and k normalised per head, post norms, GeGLU, its scale and
/// its RoPE bases; every context here is within the sliding window).
fn reference(c: &Case, w: &RefWeights, tokens: &[u32]) -> Vec<Vec<f64>> {
    let (d, hd) = (c.hidden, c.head_dim);
    let interleaved = matches!(c.src, Src::Gguf { .. }) && !c.gemma;
    let eps = 1e-5;
    let scale = match (c.gemma, &c.src) {
        (true, Src::Hf { .. }) => 1.0 / 24f64.sqrt(),
        _ => 1.0 / (hd as f64).sqrt(),
    };
    let embed = w.w("token_embd.weight");
    let embed_scale = if c.gemma { (d as f64).sqrt() } else { 1.0 };
    let mut xs: Vec<Vec<f64>> = tokens
        .iter()
        .map(|&t| {
            embed[t as usize * d..][..d]
                .iter()
                .map(|v| v * embed_scale)
                .collect()
        })
        .collect();
    let group = c.n_heads / c.n_kv;
    for l in 0..c.layers {
        let n = |s: &str| format!("blk.{l}.{s}");
        // Gemma 3 scales the global layers' positions only (Hugging Face's local rotary
        // embedding has the default rope type, llama.cpp's SWA layers a freq_scale of 1).
        let (theta, factor) = if !c.gemma || gemma_global(c, l) {
            (global_theta(c), c.rope_factor)
        } else {
            (1e4, 1.0)
        };
        let (mut keys, mut vals) = (Vec::new(), Vec::new());
        for (pos, x) in xs.iter_mut().enumerate() {
            let xn = rms_norm(x, w.w(&n("attn_norm.weight")), eps);
            let mut q = matvec(w.w(&n("attn_q.weight")), &xn, w.get(&n("attn_q.bias")));
            let mut k = matvec(w.w(&n("attn_k.weight")), &xn, w.get(&n("attn_k.bias")));
            let v = matvec(w.w(&n("attn_v.weight")), &xn, w.get(&n("attn_v.bias")));
            if c.gemma {
                q = head_norm(&q, w.w(&n("attn_q_norm.weight")), hd, eps);
                k = head_norm(&k, w.w(&n("attn_k_norm.weight")), hd, eps);
            }
            rope(&mut q, hd, pos, interleaved, theta, factor);
            rope(&mut k, hd, pos, interleaved, theta, factor);
            keys.push(k);
            vals.push(v);
            let mut att = vec![0f64; c.n_heads * hd];
            for h in 0..c.n_heads {
                let g = h / group;
                let qh = &q[h * hd..][..hd];
                let scores: Vec<f64> = keys
                    .iter()
                    .map(|k| {
                        let kh = &k[g * hd..][..hd];
                        qh.iter().zip(kh).map(|(a, b)| a * b).sum::<f64>() * scale
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let sum: f64 = e.iter().sum();
                for (p, e) in e.iter().enumerate() {
                    let vh = &vals[p][g * hd..][..hd];
                    for (a, v) in att[h * hd..][..hd].iter_mut().zip(vh) {
                        *a += e / sum * v;
                    }
                }
            }
            let o = matvec(
                w.w(&n("attn_output.weight")),
                &att,
                w.get(&n("attn_output.bias")),
            );
            let o = post_norm(w, &n("post_attention_norm.weight"), o, eps);
            let x2: Vec<f64> = x.iter().zip(&o).map(|(a, b)| a + b).collect();
            let xn = rms_norm(&x2, w.w(&n("ffn_norm.weight")), eps);
            let gate = matvec(w.w(&n("ffn_gate.weight")), &xn, w.get(&n("ffn_gate.bias")));
            let up = matvec(w.w(&n("ffn_up.weight")), &xn, w.get(&n("ffn_up.bias")));
            let act: Vec<f64> = gate
                .iter()
                .zip(&up)
                .map(|(&g, u)| {
                    if c.gemma {
                        // GeGLU, tanh GELU: 0.5 g (1 + tanh(sqrt(2/pi) (g + 0.044715 g^3)))
                        let t = (2.0 / std::f64::consts::PI).sqrt() * (g + 0.044715 * g * g * g);
                        0.5 * g * (1.0 + t.tanh()) * u
                    } else {
                        g / (1.0 + (-g).exp()) * u
                    }
                })
                .collect();
            let down = matvec(w.w(&n("ffn_down.weight")), &act, w.get(&n("ffn_down.bias")));
            let down = post_norm(w, &n("post_ffw_norm.weight"), down, eps);
            *x = x2.iter().zip(&down).map(|(a, b)| a + b).collect();
        }
    }
    let head = w.get("output.weight").unwrap_or(embed);
    xs.iter()
        .map(|x| matvec(head, &rms_norm(x, w.w("output_norm.weight"), eps), None))
        .collect()
}

/// The reference weights: each matrix round-tripped through its format, as the GPU holds it.
fn ref_weights(ts: &[T]) -> RefWeights {
    let by_name = ts
        .iter()
        .map(|t| {
            let v = match t.shape.len() {
                2 => round_trip(t.format, &t.values),
                _ => t.values.clone(),
            };
            (t.gguf.clone(), v.into_iter().map(f64::from).collect())
        })
        .collect();
    RefWeights { by_name }
}

/// Checks that the loaded model holds its resident matrices in the formats the reference assumes.
fn check_formats(m: &Llama, ts: &[T]) -> Result<(), String> {
    let format = |name: &str| ts.iter().find(|t| t.gguf == name).map(|t| t.format);
    let w = &m.weights;
    let mut seen = vec![("token_embd.weight".to_string(), w.embed.format)];
    if let Some(o) = &w.output {
        seen.push(("output.weight".into(), o.format));
    }
    let roles = [
        "attn_q",
        "attn_k",
        "attn_v",
        "attn_output",
        "ffn_gate",
        "ffn_up",
        "ffn_down",
    ];
    for (l, layer) in w.layers.iter().enumerate() {
        for (r, m) in roles.iter().zip(layer.matrices()) {
            seen.push((format!("blk.{l}.{r}.weight"), m.format));
        }
    }
    for (name, got) in seen {
        if format(&name) != Some(got) {
            return Err(format!(
                "{name} loaded as {got}, expected {:?}",
                format(&name)
            ));
        }
    }
    Ok(())
}

// ---- running a case ---------------------------------------------------------------------------

/// The [`Device`]s, their weight layout pinned. `None` without an adapter (see `common::gpu`).
fn devices() -> Option<&'static [(Device, Gpu)]> {
    static DEVICES: std::sync::OnceLock<Vec<(Device, Gpu)>> = std::sync::OnceLock::new();
    common::gpu()?;
    let v = DEVICES.get_or_init(|| {
        let mut v = Vec::new();
        let kinds = [
            (Device::Buffers, false, WeightLayout::Buffers),
            (Device::Textures, false, WeightLayout::Textures),
            (Device::Portable, true, WeightLayout::Buffers),
        ];
        for (device, no_subgroups, layout) in kinds {
            let opts = GpuOptions {
                no_subgroups,
                ..Default::default()
            };
            let gpu = Gpu::new(&opts).expect("a device besides the shared one");
            let readable =
                layout == WeightLayout::Buffers || wgllm::kernels::matmul::subgroup_matvec_ok(&gpu);
            // WGLLM_WEIGHTS, when set, has chosen the layout already: devices of the other one
            // are left out.
            if readable && gpu.weight_layout_or(|| layout) == layout {
                v.push((device, gpu));
            }
        }
        v
    });
    Some(v)
}

/// What a case came to: the rows compared and the worst relative error, or the loader's refusal.
enum Outcome {
    Ran { rows: usize, worst: f64 },
    Refused(String),
}

/// Token ids of a case, seeded.
fn tokens(c: &Case, n: usize) -> Vec<u32> {
    let mut r = rand::rngs::StdRng::seed_from_u64(c.seed ^ 0x5eed);
    (0..n).map(|_| r.gen_range(0..c.vocab as u32)).collect()
}

/// Loads `c` on `gpu` and runs, comparing each logits row with the reference: a chunked prefill
/// keeping the last row's logits (two full chunks: the last row is copied out of a chunk of
/// several), a prefill keeping every row's (a full chunk, then a single token), and two decode
/// steps. A load error is the loader refusing the config; any later error fails the case.
fn run_case(c: &Case, gpu: &Gpu) -> Result<Outcome, String> {
    let ts = tensors(c);
    let (prefill, all_rows) = if c.chunk > 8 {
        (3, 9)
    } else {
        (2 * c.chunk, c.chunk + 1)
    };
    let n = prefill + all_rows + 2;
    let opts = RunOptions {
        ctx: n,
        kv_dtype: KvDtype::F32,
        chunk: c.chunk,
        all_logits: false,
        resident_layers: c.resident,
        parallel: 1,
    };
    let dir;
    let hf;
    let gguf;
    let loaded = match c.src {
        Src::Gguf { .. } => {
            gguf = gguf_of(c, &ts);
            config_from_gguf(&gguf).and_then(|(cfg, rot)| {
                Llama::load(gpu, cfg, rot, &Source::Gguf(&gguf), opts.clone())
            })
        }
        Src::Hf { precision, .. } => {
            // Tests run in parallel and cases may share a seed: a directory of its own each.
            static DIRS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
            let k = DIRS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            dir = hf_dir(c, &ts, &format!("random-{k}"));
            hf = HfModel::open(&dir.0).map_err(|e| format!("open: {e}"))?;
            ModelConfig::from_hf_json(hf.config()).and_then(|cfg| {
                let rot = cfg.head_dim;
                Llama::load(gpu, cfg, rot, &Source::Hf(&hf, precision), opts.clone())
            })
        }
    };
    let mut m = match loaded {
        Ok(m) => m,
        Err(e) => return Ok(Outcome::Refused(e.to_string())),
    };
    check_formats(&m, &ts)?;
    let toks = tokens(c, n);
    let want = reference(c, &ref_weights(&ts), &toks);
    let (mut rows, mut worst) = (0, 0f64);
    let mut compare = |what: &str, got: &[f32], first: usize| -> Result<(), String> {
        if got.is_empty() || !got.len().is_multiple_of(c.vocab) {
            return Err(format!("{what}: {} logits", got.len()));
        }
        for (i, row) in got.chunks(c.vocab).enumerate() {
            let pos = first + i;
            let w = &want[pos];
            let scale = 1.0 + w.iter().fold(0f64, |a, v| a.max(v.abs()));
            let diff = row
                .iter()
                .zip(w)
                .fold(0f64, |a, (g, w)| a.max((*g as f64 - w).abs()));
            let e = diff / scale;
            if e.is_nan() || e > LOGITS_TOL {
                return Err(format!(
                    "{what}: position {pos}: max |diff| {diff:.3e} over a scale of {scale:.2} \
                     ({e:.2e} > {LOGITS_TOL:.0e})"
                ));
            }
            worst = worst.max(e);
            rows += 1;
        }
        Ok(())
    };
    let run = |m: &mut Llama, all: bool, at: usize, len: usize| {
        m.opts.all_logits = all;
        m.forward(gpu, &toks[at..at + len], at)
            .map_err(|e| format!("forward of {len} tokens at {at} (all logits: {all}): {e}"))
    };
    let got = run(&mut m, false, 0, prefill)?;
    compare("prefill, last row", &got, prefill - 1)?;
    let got = run(&mut m, true, prefill, all_rows)?;
    compare("prefill, every row", &got, prefill)?;
    for at in prefill + all_rows..n {
        let got = run(&mut m, false, at, 1)?;
        compare("decode", &got, at)?;
    }
    Ok(Outcome::Ran { rows, worst })
}

/// Runs `c` on its device (where this adapter lacks it, the first there is: textures need the
/// subgroup matvec); an error names the case.
fn check(c: &Case) -> Result<Outcome, String> {
    let devs = devices().expect("devices");
    let (_, gpu) = devs
        .iter()
        .find(|(d, _)| *d == c.device)
        .or(devs.first())
        .ok_or("no device")?;
    run_case(c, gpu).map_err(|e| format!("{e}\nin case {c:?}"))
}

/// Draws case `seed`: dimensions multiples of 32 half the time (so that block formats apply),
/// else any; head_dim a multiple of 4 (the KV cache's requirement, which the loader checks); KV
/// heads dividing the heads.
fn draw(seed: u64) -> Case {
    let mut r = rand::rngs::StdRng::seed_from_u64(seed);
    let dim = |r: &mut rand::rngs::StdRng| {
        if r.gen_bool(0.5) {
            // 256 = 32 x 8: whole K-quant super-blocks.
            [32, 64, 96, 256][r.gen_range(0..4)]
        } else {
            r.gen_range(1..=72)
        }
    };
    let hidden = dim(&mut r);
    let ffn = dim(&mut r);
    let n_kv = r.gen_range(1..=3);
    let n_heads = n_kv * r.gen_range(1..=3);
    let head_dim = 4 * r.gen_range(1..=8);
    let layers = r.gen_range(1..=3);
    let src = if r.gen_bool(0.4) {
        Src::Gguf {
            qkv_bias: r.gen_bool(0.25),
        }
    } else {
        let qwen2 = r.gen_bool(0.25);
        // The HF loader's fallback to f16 knows 32-weight blocks only (src/model/source.rs), so
        // its precisions are the formats of 32-weight blocks; GGUF cases take every format.
        let hf: Vec<_> = WeightFormat::ALL
            .into_iter()
            .filter(|f| f.block_len() <= 32)
            .collect();
        Src::Hf {
            precision: [None]
                .into_iter()
                .chain(hf.iter().copied().map(Some))
                .nth(r.gen_range(0..=hf.len()))
                .flatten(),
            qwen2,
            attention_bias: !qwen2 && r.gen_bool(0.3),
            mlp_bias: !qwen2 && r.gen_bool(0.3),
        }
    };
    let mut formats = WeightFormat::ALL.to_vec();
    let n = formats.len();
    formats.rotate_left(r.gen_range(0..n));
    formats.truncate(r.gen_range(1..=n));
    Case {
        seed,
        vocab: r.gen_range(1..=300),
        hidden,
        ffn,
        n_heads,
        n_kv,
        head_dim,
        layers,
        tied: r.gen_bool(0.5),
        src,
        formats,
        chunk: if r.gen_bool(0.4) {
            1
        } else {
            r.gen_range(2..=9)
        },
        device: match r.gen_range(0..5) {
            0 | 1 => Device::Buffers,
            2 | 3 => Device::Textures,
            _ => Device::Portable,
        },
        resident: if r.gen_bool(0.2) {
            Some(r.gen_range(0..layers))
        } else {
            None
        },
        gemma: false,
        rope_factor: 1.0,
    }
}

/// Case `seed` as a Gemma 3 model: no biases, six layers from GGUF (its fixed pattern makes the
/// sixth global) and one to three from Hugging Face (every other layer global there).
fn draw_gemma(seed: u64) -> Case {
    let mut c = draw(seed);
    c.gemma = true;
    c.src = match c.src {
        Src::Gguf { .. } => {
            c.layers = 6;
            Src::Gguf { qkv_bias: false }
        }
        Src::Hf { precision, .. } => Src::Hf {
            precision,
            qwen2: false,
            attention_bias: false,
            mlp_bias: false,
        },
    };
    c.resident = c.resident.map(|r| r.min(c.layers - 1));
    c
}

/// Case `seed` as a Gemma 3 model with linear RoPE scaling (factor 8, Gemma 3's own) on its
/// global layers: GGUF for even seeds, Hugging Face for odd ones, so that both forms of the
/// scaling's metadata are read; Hugging Face cases have two or three layers, so one is global.
fn draw_gemma_scaled(seed: u64) -> Case {
    let mut c = draw_gemma(seed);
    c.rope_factor = 8.0;
    let gguf = seed.is_multiple_of(2);
    match (&c.src, gguf) {
        (Src::Gguf { .. }, false) => {
            c.src = Src::Hf {
                precision: None,
                qwen2: false,
                attention_bias: false,
                mlp_bias: false,
            };
            c.layers = 2;
        }
        (Src::Hf { .. }, true) => {
            c.src = Src::Gguf { qkv_bias: false };
            c.layers = 6;
        }
        (Src::Hf { .. }, false) => c.layers = c.layers.max(2),
        (Src::Gguf { .. }, true) => {}
    }
    c.resident = c.resident.map(|r| r.min(c.layers - 1));
    c
}

/// The issue's model: one layer, hidden 32, intermediate 32, two heads of 16 over one KV head,
/// vocab 264, tied embeddings, as GGUF with F16/F32/Q4_0/Q8_0 matrices and as a Hugging Face
/// directory. Its head (32 x 264) is small enough for the final norm to fold into it, and with the
/// last row's logits only, that folded head reads the row copied into `proj`: the plan had let
/// `logits` share `proj`'s buffer, and the recorder refused the dispatch.
fn issue_case(src: Src, chunk: usize, device: Device) -> Case {
    Case {
        seed: 264,
        vocab: 264,
        hidden: 32,
        ffn: 32,
        n_heads: 2,
        n_kv: 1,
        head_dim: 16,
        layers: 1,
        tied: true,
        src,
        formats: vec![
            WeightFormat::F16,
            WeightFormat::F32,
            WeightFormat::Q4_0,
            WeightFormat::Q8_0,
        ],
        chunk,
        device,
        resident: None,
        gemma: false,
        rope_factor: 1.0,
    }
}

#[test]
fn the_issue_model_runs_from_gguf_and_hugging_face() {
    let Some(devs) = devices() else { return };
    let hf = Src::Hf {
        precision: None,
        qwen2: false,
        attention_bias: false,
        mlp_bias: false,
    };
    for (device, _) in devs {
        for src in [Src::Gguf { qkv_bias: false }, hf.clone()] {
            // The CLI's default chunk (the prompt in one chunk), a few tokens, one.
            for chunk in [64, 3, 1] {
                let c = issue_case(src.clone(), chunk, *device);
                match check(&c) {
                    Ok(Outcome::Ran { worst, .. }) => {
                        eprintln!("{src:?} chunk {chunk} {device:?}: worst {worst:.2e}")
                    }
                    Ok(Outcome::Refused(e)) => panic!("the issue's model was refused: {e}"),
                    Err(e) => panic!("{e}"),
                }
            }
        }
    }
}

/// The seeds of the random cases: `0..CASES`, or as `WGLLM_RANDOM_SEED` (the first) and
/// `WGLLM_RANDOM_CASES` (how many) say.
fn seeds() -> std::ops::Range<u64> {
    let var = |name: &str, default: u64| {
        std::env::var(name)
            .ok()
            .map(|v| v.parse().unwrap_or_else(|e| panic!("{name}={v}: {e}")))
            .unwrap_or(default)
    };
    let first = var("WGLLM_RANDOM_SEED", 0);
    first..first + var("WGLLM_RANDOM_CASES", CASES)
}

#[test]
fn random_configs_run_and_match_the_reference() {
    run_random(draw);
}

/// Random Gemma 3 models, as GGUF (norm weights with Gemma's +1 stored) and as Hugging Face
/// directories (without it), against the same reference.
#[test]
fn random_gemma_configs_run_and_match_the_reference() {
    run_random(draw_gemma);
}

/// Random Gemma 3 models whose global layers scale RoPE linearly (factor 8), from GGUF metadata
/// and from Hugging Face's `rope_scaling`, against the reference. The scaling must matter: the
/// reference without it is checked to be far from the one with it.
#[test]
fn random_gemma_configs_with_linear_rope_scaling_match_the_reference() {
    for seed in [0, 1] {
        let c = draw_gemma_scaled(seed);
        let ts = tensors(&c);
        let toks = tokens(&c, 8);
        let scaled = reference(&c, &ref_weights(&ts), &toks);
        let plain = reference(
            &Case {
                rope_factor: 1.0,
                ..c.clone()
            },
            &ref_weights(&ts),
            &toks,
        );
        let diff = scaled[1..]
            .iter()
            .flatten()
            .zip(plain[1..].iter().flatten())
            .fold(0f64, |a, (x, y)| a.max((x - y).abs()));
        assert!(
            diff > 100.0 * LOGITS_TOL,
            "case {seed}: scaling changes logits by {diff:.2e} only"
        );
    }
    run_random(draw_gemma_scaled);
}

fn run_random(draw: fn(u64) -> Case) {
    if devices().is_none() {
        return;
    }
    let (mut ran, mut refused, mut failed) = (0, Vec::new(), Vec::new());
    let seeds = seeds();
    let n = seeds.end - seeds.start;
    for seed in seeds {
        let c = draw(seed);
        match check(&c) {
            Ok(Outcome::Ran { rows, worst }) => {
                ran += 1;
                eprintln!("case {seed}: {rows} rows, worst {worst:.2e}: {c:?}");
            }
            Ok(Outcome::Refused(e)) => {
                eprintln!("case {seed}: refused by the loader ({e}): {c:?}");
                refused.push(e);
            }
            Err(e) => {
                eprintln!("case {seed} FAILED: {e}");
                failed.push(format!("case {seed}: {e}"));
            }
        }
    }
    eprintln!(
        "{ran} of {n} cases ran, {} refused, {} failed",
        refused.len(),
        failed.len()
    );
    assert!(failed.is_empty(), "failed cases:\n{}", failed.join("\n"));
    // The generator draws what the loaders accept: a refusal means they disagree, and the cases
    // test less than they say.
    assert!(refused.is_empty(), "refused cases: {refused:#?}");
}

/// Models past the fold limit ([`wgllm::kernels::matmul::NORM_FOLD_MAX_WEIGHTS`] weights) in
/// one place each, so that a single token folds some passes and dispatches others, each a
/// different schedule: the head (the final norm stays a pass), gate/up (the FFN norm stays, and
/// so the attention residual add before it; SwiGLU and the FFN residual fold), Q/K/V (the
/// attention norm stays); and Q/K/V exactly at the limit, which folds.
#[test]
fn models_past_the_fold_limits_run_too() {
    let Some(devs) = devices() else { return };
    let limit = wgllm::kernels::matmul::NORM_FOLD_MAX_WEIGHTS;
    let base = |seed| Case {
        seed,
        vocab: 64,
        hidden: 32,
        ffn: 32,
        n_heads: 2,
        n_kv: 1,
        head_dim: 16,
        layers: 1,
        tied: false,
        src: Src::Gguf { qkv_bias: false },
        formats: vec![WeightFormat::Q8_0, WeightFormat::Q4_0, WeightFormat::F16],
        chunk: 1,
        device: Device::Buffers,
        resident: None,
        gemma: false,
        rope_factor: 1.0,
    };
    let head = Case {
        vocab: limit / 32 + 32,
        tied: true,
        ..base(1)
    };
    let gate_up = Case {
        ffn: limit / 64 + 32,
        src: Src::Hf {
            precision: Some(WeightFormat::Q8_0),
            qwen2: false,
            attention_bias: false,
            mlp_bias: false,
        },
        ..base(2)
    };
    let qkv = |n_kv| Case {
        hidden: 1024,
        n_heads: 16,
        n_kv,
        head_dim: 128,
        ..base(3)
    };
    // (what, the case, its folding projections' weights, whether they are past the limit)
    let cases = [
        ("head", head, (limit / 32 + 32) * 32, true),
        ("gate/up", gate_up, 2 * (limit / 64 + 32) * 32, true),
        ("q/k/v", qkv(16), (2048 + 2 * 2048) * 1024, true),
        (
            "q/k/v at the limit",
            qkv(8),
            (2048 + 2 * 1024) * 1024,
            false,
        ),
    ];
    for (i, (what, c, weights, past)) in cases.into_iter().enumerate() {
        assert!(weights >= limit && (weights > limit) == past, "{what}");
        // Chunks of 1 and 3 tokens take turns over the devices: their plans differ (the sizes
        // decide the sharing), and either runs single tokens (decode) and chunks of several.
        for (j, (device, _)) in devs.iter().enumerate() {
            let chunk = [1, 3][(i + j) % 2];
            let c = Case {
                chunk,
                device: *device,
                ..c.clone()
            };
            match check(&c) {
                Ok(Outcome::Ran { worst, .. }) => {
                    eprintln!("{what}, {device:?}, chunk {chunk}: worst {worst:.2e}")
                }
                Ok(Outcome::Refused(e)) => panic!("{what} was refused: {e}"),
                Err(e) => panic!("{what}: {e}"),
            }
        }
    }
}

/// The same Gemma 3 weights as a GGUF file (norms with the +1 stored, llama.cpp's metadata) and as
/// a Hugging Face `gemma3_text` directory (norms without it; the config says what the GGUF
/// metadata implies: a global layer every 6, the head size as `query_pre_attn_scalar`, a window
/// of 512): the two readers give one config, and the two models the same logits, both the
/// reference's.
#[test]
fn gemma_from_gguf_and_hugging_face_agree() {
    gemma_pair_agrees(1.0);
}

/// The same with linear RoPE scaling of factor 8 (GGUF `rope.scaling.*`, HF `rope_scaling`).
#[test]
fn gemma_from_gguf_and_hugging_face_agree_with_linear_rope_scaling() {
    gemma_pair_agrees(8.0);
}

fn gemma_pair_agrees(rope_factor: f64) {
    let Some(devs) = devices() else { return };
    let gpu = &devs[0].1;
    let gguf_case = Case {
        gemma: true,
        layers: 6,
        rope_factor,
        formats: vec![WeightFormat::F32],
        ..issue_case(Src::Gguf { qkv_bias: false }, 3, devs[0].0)
    };
    let hf_case = Case {
        src: Src::Hf {
            precision: None,
            qwen2: false,
            attention_bias: false,
            mlp_bias: false,
        },
        ..gguf_case.clone()
    };
    let ts = tensors(&gguf_case);
    let gguf = gguf_of(&gguf_case, &ts);
    // The two pair tests run in parallel in one process: a directory of their own each.
    let dir = hf_dir(
        &hf_case,
        &tensors(&hf_case),
        &format!("gemma-pair-x{rope_factor}"),
    );
    let path = dir.0.join("config.json");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    json["sliding_window_pattern"] = 6.into();
    json["query_pre_attn_scalar"] = gguf_case.head_dim.into();
    json["sliding_window"] = 512.into();
    std::fs::write(&path, json.to_string()).unwrap();
    let hf = HfModel::open(&dir.0).unwrap();
    let (cfg, rot) = config_from_gguf(&gguf).unwrap();
    let mut hf_cfg = ModelConfig::from_hf_json(hf.config()).unwrap();
    // GGUF keeps eps as an f32.
    assert_eq!(hf_cfg.norm_eps as f32, cfg.norm_eps as f32);
    hf_cfg.norm_eps = cfg.norm_eps;
    assert_eq!(hf_cfg, cfg);

    let toks = tokens(&gguf_case, 7);
    let opts = RunOptions {
        ctx: toks.len(),
        kv_dtype: KvDtype::F32,
        chunk: 3,
        all_logits: true,
        resident_layers: None,
        parallel: 1,
    };
    let run = |src: &Source| {
        let mut m = Llama::load(gpu, cfg.clone(), rot, src, opts.clone()).unwrap();
        m.forward(gpu, &toks, 0).unwrap()
    };
    let from_gguf = run(&Source::Gguf(&gguf));
    let from_hf = run(&Source::Hf(&hf, None));
    let want = reference(&gguf_case, &ref_weights(&ts), &toks);
    let v = gguf_case.vocab;
    for (pos, w) in want.iter().enumerate() {
        let scale = 1.0 + w.iter().fold(0f64, |a, x| a.max(x.abs()));
        for (what, got) in [("gguf", &from_gguf), ("hf", &from_hf)] {
            let row = &got[pos * v..(pos + 1) * v];
            let diff = row
                .iter()
                .zip(w)
                .fold(0f64, |a, (g, w)| a.max((*g as f64 - w).abs()));
            assert!(
                diff / scale <= LOGITS_TOL,
                "{what}, position {pos}: max |diff| {diff:.3e} against the reference"
            );
        }
        let gh = from_gguf[pos * v..(pos + 1) * v]
            .iter()
            .zip(&from_hf[pos * v..(pos + 1) * v])
            .fold(0f32, |a, (x, y)| a.max((x - y).abs()));
        assert!(
            gh as f64 / scale <= LOGITS_TOL,
            "position {pos}: GGUF and HF differ by {gh:.3e}"
        );
    }
}
