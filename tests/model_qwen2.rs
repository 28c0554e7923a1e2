//! The Hugging Face path of the LLaMA family (`Llama::load` with `Source::Hf`: rotate-half RoPE,
//! qwen2's Q/K/V biases, grouped-query attention, an untied `lm_head`) against the independent
//! numpy reference (`models/reference/qwen2_ref.py`) on a tiny deterministic random qwen2 (vocab
//! 128, hidden 64, 2 layers, 4 heads over 2 KV heads, intermediate 96), which both sides build
//! from the same integer-hash formula and this test writes as `config.json` + `model.safetensors`
//! (+ a word-level `tokenizer.json` for `load_lm`) into a temporary directory. Checked: the weights
//! (per-tensor sums in the golden), the config fields, logits of a whole and a chunked prefill and
//! of token-by-token decode through the KV cache (max abs diff <= [F32_LOGITS]), the greedy
//! continuation, the `load_lm` path, quantised runs, and typed errors for configs or tensors that
//! do not fit.

mod common;

use common::TempModel;

use serde_json::{json, Value};
use wgllm::loader::HfModel;
use wgllm::model::config::{ModelConfig, Positions};
use wgllm::model::llama::{Llama, RunOptions};
use wgllm::model::load::load_lm;
use wgllm::model::source::Source;
use wgllm::quant::WeightFormat;
use wgllm::{Error, Gpu};

/// f32 weights and activations against the float64 reference: max |logit diff| over all 10x128
/// logits (std 2.3). Measured on lavapipe: 6.9e-6 (one chunk), 7.6e-6 (chunks of 4, decode), the
/// size of the golden's 6-significant-digit rounding. The golden's `sensitivity` shows what the bound catches: dropping the Q/K/V biases
/// moves the logits by 4.1, interleaved instead of rotate-half RoPE by 6.3, the wrong GQA head
/// mapping by 12, the tied head instead of `lm_head` by 11.
const F32_LOGITS: f32 = 1e-3;
/// Every matrix stored as f16 against the float64 reference on the f32 weights:
/// `(max |logit diff|, NMSE)`. Measured on lavapipe: 7.7e-3 / 6.3e-7.
const F16_LOGITS: (f32, f64) = (2.5e-2, 1e-5);
/// A q8_0 / q4_0 run against the f32 run of the same weights dequantised on the CPU: only the
/// kernels' summation order differs. Measured on lavapipe: 5.1e-6 (q8_0), 6.9e-6 (q4_0).
const QUANT_VS_DEQUANT: f32 = 1e-4;

const VOCAB: usize = 128;
const D: usize = 64;
const N_LAYER: usize = 2;
const N_HEAD: usize = 4;
const N_KV: usize = 2;
const HD: usize = D / N_HEAD;
const FFN: usize = 96;

/// The weight formula of qwen2_ref.py: element `j` of tensor number `t`, uniform in [-1, 1).
fn uniform(t: u64, j: u64) -> f64 {
    let m = 0xFFFF_FFFFu64;
    let mut x = (j * 2654435761 + t * 40503 + 12345) & m;
    x ^= x >> 15;
    x = (x * 2246822519) & m;
    x ^= x >> 13;
    x = (x * 3266489917) & m;
    x ^= x >> 16;
    2.0 * (x as f64 / 4294967296.0) - 1.0
}

/// `(name, HF shape, scale, offset)` in tensor-number order, as qwen2_ref.py's `tensor_list`.
fn tensor_list() -> Vec<(String, Vec<usize>, f64, f64)> {
    let (q, kv) = (N_HEAD * HD, N_KV * HD);
    let mut v = vec![(
        "model.embed_tokens.weight".to_string(),
        vec![VOCAB, D],
        0.5,
        0.0,
    )];
    let layer: [(&str, &[usize], f64, f64); 12] = [
        ("input_layernorm.weight", &[D], 0.2, 1.0),
        ("self_attn.q_proj.weight", &[q, D], 0.25, 0.0),
        ("self_attn.q_proj.bias", &[q], 0.5, 0.0),
        ("self_attn.k_proj.weight", &[kv, D], 0.25, 0.0),
        ("self_attn.k_proj.bias", &[kv], 0.5, 0.0),
        ("self_attn.v_proj.weight", &[kv, D], 0.25, 0.0),
        ("self_attn.v_proj.bias", &[kv], 0.5, 0.0),
        ("self_attn.o_proj.weight", &[D, q], 0.2, 0.0),
        ("post_attention_layernorm.weight", &[D], 0.2, 1.0),
        ("mlp.gate_proj.weight", &[FFN, D], 0.25, 0.0),
        ("mlp.up_proj.weight", &[FFN, D], 0.25, 0.0),
        ("mlp.down_proj.weight", &[D, FFN], 0.2, 0.0),
    ];
    for i in 0..N_LAYER {
        v.extend(
            layer
                .iter()
                .map(|(n, s, sc, off)| (format!("model.layers.{i}.{n}"), s.to_vec(), *sc, *off)),
        );
    }
    v.push(("model.norm.weight".into(), vec![D], 0.2, 1.0));
    v.push(("lm_head.weight".into(), vec![VOCAB, D], 0.5, 0.0));
    v
}

/// `(name, shape, values)` of the tiny model.
type Tensors = Vec<(String, Vec<usize>, Vec<f32>)>;

fn tiny_weights() -> Tensors {
    tensor_list()
        .into_iter()
        .enumerate()
        .map(|(t, (name, shape, scale, offset))| {
            let n: usize = shape.iter().product();
            let w = (0..n)
                .map(|j| (offset + scale * uniform(t as u64, j as u64)) as f32)
                .collect();
            (name, shape, w)
        })
        .collect()
}

fn golden() -> Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/models/goldens/qwen2_tiny.json"
    );
    serde_json::from_str(&std::fs::read_to_string(path).expect("read the golden"))
        .expect("golden JSON")
}

fn ids(v: &Value) -> Vec<u32> {
    let a = v.as_array().expect("an id array");
    a.iter().map(|v| v.as_u64().unwrap() as u32).collect()
}

fn golden_logits(g: &Value) -> Vec<Vec<f32>> {
    let rows = g["logits"].as_array().unwrap();
    rows.iter()
        .map(|r| {
            let r = r.as_array().unwrap();
            r.iter().map(|v| v.as_f64().unwrap() as f32).collect()
        })
        .collect()
}

/// A word-level `tokenizer.json` whose token `i` is the word `t{i}`, for `load_lm`.
fn tokenizer_json() -> Value {
    let vocab: serde_json::Map<String, Value> =
        (0..VOCAB).map(|i| (format!("t{i}"), json!(i))).collect();
    json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {"type": "WhitespaceSplit"},
        "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "t0"}
    })
}

/// Writes `config.json` (the golden's, edited by `edit_cfg`), `model.safetensors` (tensors edited
/// by `edit_w`) and `tokenizer.json` into a fresh temporary directory, removed on drop.
fn write_model(
    name: &str,
    edit_cfg: impl FnOnce(&mut Value),
    edit_w: impl FnOnce(&mut Tensors),
) -> TempModel {
    let mut cfg = golden()["config"].clone();
    edit_cfg(&mut cfg);
    let mut w = tiny_weights();
    edit_w(&mut w);
    let dir = common::write_hf_model(&format!("qwen2-{name}"), &cfg, &w);
    let json = serde_json::to_vec_pretty(&tokenizer_json()).unwrap();
    std::fs::write(dir.0.join("tokenizer.json"), json).unwrap();
    dir
}

fn opts(chunk: usize, all_logits: bool) -> RunOptions {
    RunOptions {
        ctx: 64,
        chunk,
        all_logits,
        ..Default::default()
    }
}

/// Loads as `load_lm` does for a directory: config from `config.json`, RoPE over the whole head.
fn load(
    gpu: &Gpu,
    dir: &TempModel,
    precision: Option<WeightFormat>,
    o: RunOptions,
) -> wgllm::Result<Llama> {
    let hf = HfModel::open(&dir.0)?;
    let cfg = ModelConfig::from_hf_json(hf.config())?;
    let rot = cfg.head_dim;
    Llama::load(gpu, cfg, rot, &Source::Hf(&hf, precision), o)
}

fn argmax(v: &[f32]) -> u32 {
    // First maximum: ties go to the lowest id, as np.argmax.
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

#[test]
fn weights_match_the_reference_formula() {
    let g = golden();
    for (name, _, w) in tiny_weights() {
        let want = g["weight_sums"][&name]
            .as_f64()
            .unwrap_or_else(|| panic!("no sum for {name}"));
        let got: f64 = w.iter().map(|&v| v as f64).sum();
        assert!(
            (got - want).abs() <= 1e-7 + 1e-9 * want.abs(),
            "{name}: sum {got} vs golden {want}"
        );
    }
    assert_eq!(g["weight_sums"].as_object().unwrap().len(), 2 * 12 + 3);
}

#[test]
fn config_json_reads_as_qwen2() {
    let cfg = ModelConfig::from_hf_json(&golden()["config"]).unwrap();
    assert!(cfg.attn_bias, "qwen2 has Q/K/V biases");
    assert!(!cfg.attn_out_bias, "qwen2 has no o_proj bias");
    assert!(!cfg.ffn_bias && !cfg.tied_embeddings);
    let dims = (cfg.vocab_size, cfg.hidden_size, cfg.n_layers, cfg.ffn_size);
    assert_eq!(dims, (VOCAB, D, N_LAYER, FFN));
    let heads = (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim);
    assert_eq!(heads, (N_HEAD, N_KV, HD));
    assert_eq!(cfg.positions, Positions::Rotary { theta: 10000.0 });
    assert_eq!((cfg.norm_eps, cfg.max_positions), (1e-6, 64));
}

#[test]
fn prefill_matches_golden() {
    let Some(gpu) = common::gpu() else { return };
    let g = golden();
    let (toks, want) = (ids(&g["prompt"]), golden_logits(&g).concat());
    let dir = write_model("prefill", |_| {}, |_| {});
    // One chunk, then chunks of 4 (4 + 4 + 2) and 3 (3 + 3 + 3 + 1): the later chunks attend to
    // cached keys, and chunks of 1 to 4 tokens take the matvec path on CPU devices.
    for chunk in [64, 4, 3] {
        let mut m = load(gpu, &dir, None, opts(chunk, true)).unwrap();
        assert!(m.weights.output.is_some(), "lm_head is untied");
        let got = m.forward(gpu, &toks, 0).unwrap();
        let e = common::max_abs_diff(&got, &want);
        eprintln!("f32 prefill, chunk {chunk}: max |logit diff| {e:.3e}");
        assert!(
            e <= F32_LOGITS,
            "f32 prefill chunk {chunk}: max |diff| {e:.3e} > {F32_LOGITS:.0e}"
        );
    }
}

#[test]
fn decode_through_the_kv_cache_matches_golden() {
    let Some(gpu) = common::gpu() else { return };
    let g = golden();
    let (toks, want) = (ids(&g["prompt"]), golden_logits(&g));
    let dir = write_model("decode", |_| {}, |_| {});
    let mut m = load(gpu, &dir, None, opts(64, false)).unwrap();
    let mut worst = 0f32;
    for (i, &t) in toks.iter().enumerate() {
        let got = m.forward(gpu, &[t], i).unwrap();
        worst = worst.max(common::max_abs_diff(&got, &want[i]));
    }
    eprintln!("f32 decode: max |logit diff| {worst:.3e}");
    assert!(
        worst <= F32_LOGITS,
        "f32 decode: max |diff| {worst:.3e} > {F32_LOGITS:.0e}"
    );
}

/// Prefill, then greedy decode of `n` tokens in all.
fn greedy(mut step: impl FnMut(&[u32], usize) -> Vec<f32>, toks: &[u32], n: usize) -> Vec<u32> {
    let mut out = vec![argmax(&step(toks, 0))];
    while out.len() < n {
        let pos = toks.len() + out.len() - 1;
        out.push(argmax(&step(&out[out.len() - 1..], pos)));
    }
    out
}

#[test]
fn greedy_continuation_matches_golden() {
    let Some(gpu) = common::gpu() else { return };
    let g = golden();
    let want = ids(&g["greedy"]);
    let dir = write_model("greedy", |_| {}, |_| {});
    let mut m = load(gpu, &dir, None, opts(64, false)).unwrap();
    let step = |t: &[u32], pos| m.forward(gpu, t, pos).unwrap();
    assert_eq!(greedy(step, &ids(&g["prompt"]), want.len()), want);
}

#[test]
fn load_lm_runs_the_directory_end_to_end() {
    let Some(gpu) = common::gpu() else { return };
    let g = golden();
    let (prompt, want) = (ids(&g["prompt"]), ids(&g["greedy"]));
    let dir = write_model("load-lm", |_| {}, |_| {});
    let mut lm = load_lm(gpu, &dir.0, None, opts(64, false)).unwrap();
    assert!(lm.config.attn_bias && !lm.config.tied_embeddings);
    let text: Vec<String> = prompt.iter().map(|i| format!("t{i}")).collect();
    assert_eq!(lm.tokenizer.encode(&text.join(" "), false).unwrap(), prompt);
    let step = |t: &[u32], pos| lm.model.forward(gpu, t, pos).unwrap();
    assert_eq!(greedy(step, &prompt, want.len()), want);
}

/// The tiny model with every matrix replaced by its `f` round trip, quantised along the input
/// dimension as the loader does (rows of the HF `[out, in]` layout, embeddings included).
fn dequantised(f: WeightFormat) -> Tensors {
    let mut w = tiny_weights();
    for (_, shape, v) in w.iter_mut() {
        if let [_, cols] = shape[..] {
            let rt = |r: &[f32]| {
                wgllm::quant::quantize(f, r).and_then(|b| wgllm::quant::dequantize(f, &b, cols))
            };
            *v = v.chunks(cols).flat_map(|r| rt(r).unwrap()).collect();
        }
    }
    w
}

#[test]
fn quantised_runs_stay_close() {
    let Some(gpu) = common::gpu() else { return };
    let g = golden();
    let (toks, want) = (ids(&g["prompt"]), golden_logits(&g).concat());
    let dir = write_model("quant", |_| {}, |_| {});
    let mut m = load(gpu, &dir, Some(WeightFormat::F16), opts(64, true)).unwrap();
    let got = m.forward(gpu, &toks, 0).unwrap();
    let (e, n) = (common::max_abs_diff(&got, &want), common::nmse(&got, &want));
    eprintln!("f16 prefill: max |logit diff| {e:.3e}, NMSE {n:.3e}");
    let tol = F16_LOGITS;
    assert!(e <= tol.0 && n <= tol.1, "f16: {e:.3e}, {n:.3e}; {tol:?}");
    for f in [WeightFormat::Q8_0, WeightFormat::Q4_0] {
        let deq = dequantised(f);
        let dq_dir = write_model(&format!("deq-{f}"), |_| {}, |w| *w = deq);
        let mut dq = load(gpu, &dq_dir, None, opts(64, true)).unwrap();
        let want = dq.forward(gpu, &toks, 0).unwrap();
        let mut m = load(gpu, &dir, Some(f), opts(64, true)).unwrap();
        assert_eq!(m.weights.layers[1].wk.format, f, "k_proj uploaded as {f}");
        assert_eq!(m.weights.output.as_ref().unwrap().format, f);
        let e = common::max_abs_diff(&m.forward(gpu, &toks, 0).unwrap(), &want);
        eprintln!("{f} vs its dequantised f32 copy: max |logit diff| {e:.3e}");
        assert!(e <= QUANT_VS_DEQUANT, "{f}: max |diff| {e:.3e}");
    }
}

/// Loads `dir` expecting a `TensorShape` error on `tensor`; returns `(expected, got)`.
fn shape_error(gpu: &Gpu, dir: &TempModel, tensor: &str) -> (String, String) {
    match load(gpu, dir, None, opts(64, false)) {
        Err(Error::TensorShape {
            tensor: t,
            expected,
            got,
            ..
        }) if t == tensor => (expected, got),
        other => panic!("expected TensorShape on {tensor}, got {:?}", other.err()),
    }
}

fn missing(gpu: &Gpu, dir: &TempModel) -> String {
    match load(gpu, dir, None, opts(64, false)) {
        Err(Error::MissingTensor { tensor, .. }) => tensor,
        other => panic!("expected MissingTensor, got {:?}", other.err()),
    }
}

/// The tiny model with `key` of its config set to `v`.
fn with_cfg(name: &str, key: &str, v: Value) -> TempModel {
    write_model(name, |c| c[key] = v, |_| {})
}

/// The tiny model with `edit` applied to tensor `tensor` .
fn with_tensor(
    name: &str,
    tensor: &str,
    edit: impl FnOnce(&mut Vec<usize>, &mut Vec<f32>),
) -> TempModel {
    write_model(
        name,
        |_| {},
        |w| {
            let t = w
                .iter_mut()
                .find(|t| t.0 == tensor)
                .expect("a tensor of the model");
            edit(&mut t.1, &mut t.2);
        },
    )
}

#[test]
fn mismatched_configs_and_tensors_give_typed_errors() {
    let Some(gpu) = common::gpu() else { return };
    let l1 = "model.layers.1.self_attn";
    // A q_proj bias one element short.
    let bq = format!("{l1}.q_proj.bias");
    let dir = with_tensor("short-bias", &bq, |s, v| (s[0], _) = (63, v.pop()));
    let (want, got) = shape_error(gpu, &dir, &bq);
    assert!(want.contains("64") && got.contains("63"), "{want} / {got}");
    // num_key_value_heads disagreeing with k_proj's 32 rows, both ways.
    for kv in [1, 4] {
        let dir = with_cfg(&format!("kv{kv}"), "num_key_value_heads", kv.into());
        let (want, got) = shape_error(gpu, &dir, "model.layers.0.self_attn.k_proj.weight");
        let ok = want.contains(&(kv * HD).to_string()) && got.contains("32");
        assert!(ok, "kv heads {kv}: {want} / {got}");
    }
    // 4 heads over 3 KV heads: refused by the config check, before any tensor is read.
    let dir = with_cfg("kv3", "num_key_value_heads", 3.into());
    let r = load(gpu, &dir, None, opts(64, false));
    assert!(
        matches!(r, Err(Error::ConfigInvalid { .. })),
        "{:?}",
        r.err()
    );
    // Widths that disagree with the file: hidden_size (the embedding) and intermediate_size.
    let dir = with_cfg("wide", "hidden_size", 128.into());
    shape_error(gpu, &dir, "model.embed_tokens.weight");
    let dir = with_cfg("ffn", "intermediate_size", 128.into());
    shape_error(gpu, &dir, "model.layers.0.mlp.gate_proj.weight");
    // k_proj stored transposed ([in, out]).
    let wk = format!("{l1}.k_proj.weight");
    let dir = with_tensor("k-t", &wk, |s, _| *s = vec![D, N_KV * HD]);
    shape_error(gpu, &dir, &wk);
    // A qwen2 checkpoint without its v_proj bias; an untied config without lm_head.
    let bv = format!("{l1}.v_proj.bias");
    let dir = write_model("no-bias", |_| {}, |w| w.retain(|t| t.0 != bv));
    assert_eq!(missing(gpu, &dir), bv);
    let dir = write_model("no-head", |_| {}, |w| w.retain(|t| t.0 != "lm_head.weight"));
    assert_eq!(missing(gpu, &dir), "lm_head.weight");
    // One layer more than the file has.
    let dir = with_cfg("deep", "num_hidden_layers", 3.into());
    assert!(missing(gpu, &dir).starts_with("model.layers.2."));
}

/// A `llama` config with `attention_bias: true` promises an o_proj bias (`attn_out_bias`), which
/// HF's LlamaAttention adds; the loader applies it (it used to drop it silently).
#[test]
fn llama_attention_bias_is_not_silently_dropped() {
    let Some(gpu) = common::gpu() else { return };
    let g = golden();
    let want = golden_logits(&g);
    let cfg = |c: &mut Value| {
        c["model_type"] = "llama".into();
        c["attention_bias"] = true.into();
    };
    let dir = write_model("o-bias", cfg, |w| {
        for i in 0..N_LAYER {
            let name = format!("model.layers.{i}.self_attn.o_proj.bias");
            w.push((name, vec![D], vec![1.0; D]));
        }
    });
    let mut m = load(gpu, &dir, None, opts(64, false))
        .expect("a llama checkpoint with an o_proj bias loads");
    let got = m.forward(gpu, &ids(&g["prompt"]), 0).unwrap();
    let e = common::max_abs_diff(&got, &want[want.len() - 1]);
    assert!(e > 0.1, "the o_proj bias of 1.0 changed no logit ({e:.1e})");
}

#[test]
fn the_portable_kernels_match_golden_too() {
    // On lavapipe the default device runs the CPU variants (subgroup matvec and attention, weights
    // in textures, stacked projections, folded SwiGLU); a device opened without subgroups runs the
    // kernels every GPU gets, through the same forward pass.
    if common::gpu().is_none() {
        return;
    }
    let plain = Gpu::new(&wgllm::GpuOptions {
        no_subgroups: true,
        ..Default::default()
    })
    .unwrap();
    let g = golden();
    let (toks, want) = (ids(&g["prompt"]), golden_logits(&g));
    let dir = write_model("portable", |_| {}, |_| {});
    for chunk in [64, 4] {
        let mut m = load(&plain, &dir, None, opts(chunk, true)).unwrap();
        let got = m.forward(&plain, &toks, 0).unwrap();
        let e = common::max_abs_diff(&got, &want.concat());
        assert!(
            e <= F32_LOGITS,
            "portable prefill chunk {chunk}: max |diff| {e:.3e}"
        );
    }
    let mut m = load(&plain, &dir, None, opts(64, false)).unwrap();
    for (i, &t) in toks.iter().enumerate() {
        let e = common::max_abs_diff(&m.forward(&plain, &[t], i).unwrap(), &want[i]);
        assert!(
            e <= F32_LOGITS,
            "portable decode at {i}: max |diff| {e:.3e}"
        );
    }
}
