//! Model configs and exact parameter counts against the published totals, and weight bytes per
//! precision. No GPU needed.

use serde_json::json;
use wgllm::model::config::{preset_names, Arch, ModelConfig, Norm, Positions};
use wgllm::model::params::{
    count, tensors, textbook_estimate, textbook_relative_diff, weight_bytes, Precision,
};
use wgllm::Error;

fn preset(name: &str) -> ModelConfig {
    match ModelConfig::preset(name) {
        Ok(c) => c,
        Err(e) => panic!("preset {name}: {e}"),
    }
}

/// GPT-3 175B as the GPT-2 architecture with d = 12288, L = 96, V = 50257, P = 2048:
/// per layer 12 d² (Q, K, V, O and the two 4d FFN matrices) + 13 d (9 d of biases: 3d QKV, d O,
/// 4d FC, d proj; 4 d of two LayerNorms) = 1,812,099,072; total L * that + V d + P d + 2 d (ln_f)
/// = 173,961,510,912 + 617,558,016 + 25,165,824 + 24,576 = 174,604,259,328, the paper's "175.0B".
const GPT3_175B: u64 = 174_604_259_328;

const TOTALS: [(&str, u64); 11] = [
    ("llama-2-7b", 6_738_415_616),
    ("llama-2-13b", 13_015_864_320),
    ("llama-2-70b", 68_976_648_192),
    ("mistral-7b", 7_241_732_096),
    ("llama-3-8b", 8_030_261_248),
    ("qwen2.5-0.5b", 494_032_768),
    ("gpt2", 124_439_808),
    ("gpt2-xl", 1_557_611_200),
    ("bert-base-uncased", 109_482_240),
    ("smollm2-135m", 134_515_008),
    ("gpt3-175b", GPT3_175B),
];

#[test]
fn every_preset_matches_its_published_total() {
    assert_eq!(preset_names().len(), TOTALS.len());
    for (name, want) in TOTALS {
        let cfg = preset(name);
        let c = count(&cfg);
        assert_eq!(c.total, want, "{name}");
        let sum: u64 = c.modules.iter().map(|(_, p)| p).sum();
        assert_eq!(sum, c.total, "{name}: modules add up to the total");
        let layers: u64 = c
            .modules
            .iter()
            .filter(|(n, _)| n.starts_with("layers."))
            .map(|(_, p)| p)
            .sum();
        assert_eq!(layers, c.per_layer * cfg.n_layers as u64, "{name}");
    }
}

#[test]
fn gpt3_is_about_174_6_billion() {
    let c = count(&preset("gpt3-175b"));
    assert!((c.total as f64 / 1e9 - 174.6).abs() < 0.05, "{}", c.total);
    // Biases and norms are all that separates it from the textbook formula (tied, learned P).
    let cfg = preset("gpt3-175b");
    let extra = 96 * 13 * 12288 + 2 * 12288;
    assert_eq!(textbook_estimate(&cfg) + extra, c.total);
}

#[test]
fn smollm2_breakdown_counts_the_tied_embedding_once() {
    let cfg = preset("smollm2-135m");
    assert_eq!((cfg.n_heads, cfg.n_kv_heads, cfg.head_dim), (9, 3, 64));
    assert_eq!(cfg.positions, Positions::Rotary { theta: 100000.0 });
    let c = count(&cfg);
    assert_eq!(c.get("embed_tokens"), 28_311_552);
    assert_eq!(c.get("lm_head"), 0);
    assert!(c.modules.iter().all(|(n, _)| n != "lm_head"));
    assert_eq!(
        c.get("embed_positions"),
        0,
        "rotary positions have no parameters"
    );
    assert_eq!(c.get("layers.attn_k"), 30 * 576 * 192);
    assert_eq!(c.get("layers.ffn_gate"), 30 * 576 * 1536);
    assert_eq!(c.get("layers.attn_norm"), 30 * 576, "RMSNorm: gain only");
    assert_eq!(c.get("final_norm"), 576);
    assert_eq!(c.per_layer, 3_540_096);
}

#[test]
fn untying_adds_exactly_one_head() {
    let tied = preset("smollm2-135m");
    let untied = ModelConfig {
        tied_embeddings: false,
        ..tied.clone()
    };
    let (a, b) = (count(&tied), count(&untied));
    assert_eq!(b.total - a.total, 49152 * 576);
    assert_eq!(b.get("lm_head"), 49152 * 576);
    // Llama-2-7B is untied: its head is as large as its embedding.
    let l = count(&preset("llama-2-7b"));
    assert_eq!(l.get("lm_head"), l.get("embed_tokens"));
}

#[test]
fn layernorm_counts_gain_and_beta() {
    let bert = preset("bert-base-uncased");
    assert_eq!((bert.arch, bert.norm), (Arch::Bert, Norm::LayerNorm));
    let c = count(&bert);
    assert_eq!(c.get("embed_norm"), 2 * 768);
    assert_eq!(c.get("layers.attn_norm"), 12 * 2 * 768);
    assert_eq!(c.get("layers.ffn_norm"), 12 * 2 * 768);
    assert_eq!(c.get("final_norm"), 0, "BERT is post-norm");
    assert_eq!(c.get("embed_token_types"), 2 * 768);
    assert_eq!(c.get("embed_positions"), 512 * 768);
    assert_eq!(c.get("pooler") + c.get("pooler_bias"), 768 * 768 + 768);
    assert_eq!(c.get("lm_head"), 0);

    let gpt2 = count(&preset("gpt2"));
    assert_eq!(gpt2.get("final_norm"), 2 * 768);
    assert_eq!(gpt2.get("layers.ffn_norm"), 12 * 2 * 768);
    assert_eq!(gpt2.get("embed_positions"), 1024 * 768);
    assert_eq!(gpt2.per_layer, 7_087_872);
}

#[test]
fn textbook_estimate_is_close_for_gpt2_and_off_for_gqa() {
    // GPT-2 has no GQA or SwiGLU, so the formula is short only by biases and norms.
    let d = textbook_relative_diff(&preset("gpt2"));
    assert!(d < 0.0 && d > -0.01, "{d}");
    // Llama-2-70B: GQA shrinks K/V and SwiGLU widens the FFN; the formula is several % off.
    let d = textbook_relative_diff(&preset("llama-2-70b"));
    assert!(d.abs() > 0.01, "{d}");
}

#[test]
fn from_hf_json_reads_qwen2_biases_and_defaults() {
    let cfg = ModelConfig::from_hf_json(&json!({
        "model_type": "qwen2",
        "vocab_size": 1000,
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 128
    }))
    .expect("valid qwen2 config");
    assert!(cfg.attn_bias && !cfg.attn_out_bias && !cfg.ffn_bias);
    assert!(!cfg.tied_embeddings, "Qwen2Config defaults to untied");
    assert_eq!((cfg.head_dim, cfg.max_positions), (16, 32768));
    assert_eq!(cfg.positions, Positions::Rotary { theta: 10000.0 });
    let c = count(&cfg);
    assert_eq!(c.get("layers.attn_q_bias"), 2 * 64);
    assert_eq!(c.get("layers.attn_k_bias"), 2 * 32);
    assert_eq!(c.get("layers.attn_o_bias"), 0);
    // Biases live in the NormOrBias class.
    assert!(tensors(&cfg)
        .iter()
        .filter(|t| t.name.ends_with("_bias"))
        .all(|t| t.class == wgllm::model::params::ParamClass::NormOrBias));

    let gpt2 = ModelConfig::from_hf_json(&json!({
        "model_type": "gpt2", "vocab_size": 100, "n_embd": 32, "n_layer": 1, "n_head": 2,
        "n_inner": null
    }))
    .expect("valid gpt2 config");
    assert_eq!((gpt2.ffn_size, gpt2.max_positions), (128, 1024));
    assert!(gpt2.tied_embeddings);
}

#[test]
fn from_hf_json_refuses_bad_configs() {
    let base = json!({
        "model_type": "llama", "vocab_size": 1000, "hidden_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "intermediate_size": 128
    });
    assert!(ModelConfig::from_hf_json(&base).is_ok());
    let with = |key: &str, v: serde_json::Value| {
        let mut j = base.clone();
        j[key] = v;
        ModelConfig::from_hf_json(&j)
    };
    let mut missing = base.clone();
    if let Some(o) = missing.as_object_mut() {
        o.remove("hidden_size");
    }
    match ModelConfig::from_hf_json(&missing) {
        Err(Error::ConfigMissing { field, .. }) => assert_eq!(field, "hidden_size"),
        other => panic!("expected ConfigMissing, got {other:?}"),
    }
    match with("model_type", json!("mamba")) {
        Err(Error::UnknownModelType(t)) => assert!(t.contains("mamba")),
        other => panic!("expected UnknownModelType, got {other:?}"),
    }
    for (key, v) in [
        ("hidden_size", json!("4096")),
        ("hidden_size", json!(-1)),
        ("num_hidden_layers", json!(0)),
        ("num_key_value_heads", json!(3)),
        ("hidden_size", json!(66)),
        ("rms_norm_eps", json!("small")),
        ("tie_word_embeddings", json!(1)),
    ] {
        assert!(
            matches!(with(key, v.clone()), Err(Error::ConfigInvalid { .. })),
            "{key} = {v}"
        );
    }
    assert!(matches!(
        ModelConfig::from_hf_json(&json!([1, 2])),
        Err(Error::ConfigInvalid { .. })
    ));
    assert!(matches!(
        ModelConfig::preset("llama-9"),
        Err(Error::UnknownPreset { .. })
    ));
}

#[test]
fn q4_0_exact_bytes_are_4_5_bits() {
    let cfg = preset("llama-2-7b");
    let b = weight_bytes(&cfg, Precision::Q4_0);
    assert!(b.exact_bytes > b.naive_bytes);
    assert!((b.ratio() - 4.5 / 4.0).abs() < 1e-3, "{}", b.ratio());
    assert_eq!(b.naive_bytes, 6_738_415_616 / 2);
    // Embedding: 32000 x 4096 at 18 bytes per 32 weights; norms: 65 gains of 4096 in f32.
    assert_eq!(b.embeddings.bytes, 32000 * 4096 / 32 * 18);
    assert_eq!(b.norms_biases.params, 65 * 4096);
    assert_eq!(b.norms_biases.bytes, 65 * 4096 * 4);
    assert_eq!(
        b.exact_bytes,
        b.embeddings.bytes + b.matrices.bytes + b.norms_biases.bytes
    );
}

#[test]
fn bytes_per_precision_follow_the_block_sizes() {
    let cfg = preset("gpt2");
    let n = count(&cfg).total;
    for p in Precision::ALL {
        let b = weight_bytes(&cfg, p);
        assert_eq!(
            b.embeddings.params + b.matrices.params + b.norms_biases.params,
            n,
            "{p}"
        );
        assert_eq!(b.norms_biases.bytes, 4 * b.norms_biases.params, "{p}: f32");
        assert_eq!(Precision::parse(p.name()).ok(), Some(p));
    }
    let f32b = weight_bytes(&cfg, Precision::F32);
    assert_eq!((f32b.exact_bytes, f32b.naive_bytes), (4 * n, 4 * n));
    let (bf16, f16) = (
        weight_bytes(&cfg, Precision::Bf16),
        weight_bytes(&cfg, Precision::F16),
    );
    assert_eq!(
        (bf16.exact_bytes, bf16.naive_bytes),
        (f16.exact_bytes, f16.naive_bytes)
    );
    let q8 = weight_bytes(&cfg, Precision::Q8_0);
    assert_eq!(q8.matrices.bytes, q8.matrices.params / 32 * 34);
    let q41 = weight_bytes(&cfg, Precision::Q4_1);
    assert_eq!(q41.matrices.bytes, q41.matrices.params / 32 * 20);
    assert!(Precision::parse("q3_k").is_err());
}

// ---- K-quant mixes: llama.cpp's recipe --------------------------------------------------------

use wgllm::loader::gguf::GgmlType;
use wgllm::model::params::{tensor_type, typed_tensors, use_more_bits, NamedTypes, TensorRole};

/// llama.cpp's `use_more_bits(i, n)`, spelled out for 40 layers: the first five, the last five,
/// and every third from layer 7.
#[test]
fn use_more_bits_picks_llama_cpps_layers() {
    let want: Vec<usize> = (0..5).chain((7..35).step_by(3)).chain(35..40).collect();
    let got: Vec<usize> = (0..40).filter(|&i| use_more_bits(i, 40)).collect();
    assert_eq!(got, want);
    assert_eq!(got.len(), 20, "half of the layers");
    // 18 layers (Gemma 3 270M): n/8 = 2, 7n/8 = 15.
    let got: Vec<usize> = (0..18).filter(|&i| use_more_bits(i, 18)).collect();
    assert_eq!(got, [0, 1, 4, 7, 10, 13, 15, 16, 17]);
}

#[test]
fn q4_k_m_gives_llama_cpps_types_by_role_and_layer() {
    use TensorRole::*;
    let (p, n, sq) = (Precision::Q4_K_M, 40, (5120, 5120));
    let t = |role, layer, shape| tensor_type(p, role, layer, n, shape);
    assert_eq!(t(Output, 0, (32000, 5120)), GgmlType::Q6_K);
    assert_eq!(t(TokenEmbd, 0, (32000, 5120)), GgmlType::Q4_K);
    assert_eq!(t(TiedEmbedding, 0, (32000, 5120)), GgmlType::Q6_K);
    for layer in 0..n {
        let more = use_more_bits(layer, n);
        let v = if more { GgmlType::Q6_K } else { GgmlType::Q4_K };
        assert_eq!(t(AttnV, layer, sq), v, "attn_v {layer}");
        assert_eq!(t(FfnDown, layer, (5120, 13824)), v, "ffn_down {layer}");
        for role in [AttnQ, AttnK, AttnOutput, FfnGate, FfnUp] {
            assert_eq!(t(role, layer, sq), GgmlType::Q4_K, "{role:?} {layer}");
        }
        assert_eq!(t(NormOrBias, layer, (1, 5120)), GgmlType::F32);
    }
    // Rows that are not whole 256-blocks fall back to the 32-block type of about the same
    // precision, and to f16 where 32-blocks do not fit either.
    assert_eq!(t(AttnQ, 5, (1024, 640)), GgmlType::Q5_0);
    assert_eq!(t(AttnV, 0, (256, 640)), GgmlType::Q8_0);
    assert_eq!(t(TiedEmbedding, 0, (262144, 640)), GgmlType::Q8_0);
    assert_eq!(t(AttnQ, 5, (64, 48)), GgmlType::F16);
    assert_eq!(t(Output, 0, (64, 48)), GgmlType::F16);
    assert_eq!(t(KeptTable, 0, (1024, 768)), GgmlType::F16);
}

#[test]
fn the_other_mixes_follow_their_recipes() {
    use TensorRole::*;
    let n = 32;
    let t = |p, role, layer, cols| tensor_type(p, role, layer, n, (4096, cols));
    for layer in 0..n {
        let s = |cond| if cond { GgmlType::Q5_K } else { GgmlType::Q4_K };
        assert_eq!(t(Precision::Q4_K_S, AttnV, layer, 4096), s(layer < 4));
        assert_eq!(t(Precision::Q4_K_S, FfnDown, layer, 11008), s(layer < 4));
        assert_eq!(t(Precision::Q4_K_S, AttnQ, layer, 4096), GgmlType::Q4_K);
        let m = if use_more_bits(layer, n) {
            GgmlType::Q6_K
        } else {
            GgmlType::Q5_K
        };
        assert_eq!(t(Precision::Q5_K_M, AttnV, layer, 4096), m);
        assert_eq!(t(Precision::Q5_K_M, FfnDown, layer, 11008), m);
        assert_eq!(t(Precision::Q5_K_M, FfnUp, layer, 4096), GgmlType::Q5_K);
        assert_eq!(t(Precision::Q5_K_S, AttnV, layer, 4096), GgmlType::Q5_K);
        assert_eq!(t(Precision::Q6_K, FfnDown, layer, 11008), GgmlType::Q6_K);
    }
    for p in Precision::K_MIXES {
        assert_eq!(t(p, Output, 0, 4096), GgmlType::Q6_K, "{p}");
    }
    assert_eq!(t(Precision::Q5_K_M, AttnQ, 1, 640), GgmlType::Q5_1);
    assert_eq!(t(Precision::Q6_K, AttnQ, 1, 640), GgmlType::Q8_0);
    // A single-format precision types every matrix alike.
    assert_eq!(t(Precision::Q4_0, Output, 0, 4096), GgmlType::Q4_0);
    assert_eq!(t(Precision::Bf16, AttnV, 0, 4096), GgmlType::BF16);
}

#[test]
fn mixes_parse_and_print_by_llama_cpps_names() {
    for (s, p) in [
        ("q4_k_m", Precision::Q4_K_M),
        ("Q4_K_S", Precision::Q4_K_S),
        ("q5_k_m", Precision::Q5_K_M),
        ("q5_k_s", Precision::Q5_K_S),
        ("q6_k", Precision::Q6_K),
    ] {
        assert_eq!(Precision::parse(s).unwrap(), p);
        assert_eq!(p.name(), s.to_ascii_lowercase());
        assert!(p.is_mix());
    }
    assert!(!Precision::Q4_0.is_mix());
    assert!(matches!(
        Precision::parse("q3_k_m"),
        Err(Error::Parse { .. })
    ));
}

/// TheBloke's `llama-2-13b.Q4_K_M.gguf` is listed at 7.87 GB (TheBloke/Llama-2-13B-GGUF, the
/// same as the GGML q4_K_M file's listing): 7,870,000,000 bytes to the listing's rounding. The
/// recipe's tensor data must be within 2% of it; the file adds only its metadata (the vocabulary).
#[test]
fn llama_2_13b_q4_k_m_matches_the_published_file() {
    let cfg = preset("llama-2-13b");
    let w = weight_bytes(&cfg, Precision::Q4_K_M);
    let published = 7_870_000_000f64;
    let diff = (w.file_bytes as f64 - published) / published;
    assert!(
        diff.abs() < 0.02,
        "{} bytes: {:+.3}%",
        w.file_bytes,
        diff * 100.0
    );
    // Q6_K on 20 attn_v, 20 ffn_down and the head; Q4_K on every other matrix; f32 norms.
    let ts = typed_tensors(&cfg, Precision::Q4_K_M);
    let n = |t: GgmlType| ts.iter().filter(|x| x.ggml_type == t).count();
    assert_eq!(
        (n(GgmlType::Q6_K), n(GgmlType::Q4_K), n(GgmlType::F32)),
        (41, 241, 81)
    );
    assert_eq!(
        ts.iter().map(|t| t.params()).sum::<u64>(),
        count(&cfg).total
    );
    // The file bytes add up tensor by tensor, each in its type's blocks.
    let by_hand: u64 = ts
        .iter()
        .map(|t| {
            let per_block = t.ggml_type.block_bytes() as u64;
            t.params() / t.ggml_type.block_len() as u64 * per_block
        })
        .sum();
    assert_eq!(w.file_bytes, by_hand);
    // The mixes order as their bits do.
    let bytes: Vec<u64> = Precision::K_MIXES
        .iter()
        .map(|&p| weight_bytes(&cfg, p).file_bytes)
        .collect();
    assert!(bytes.windows(2).all(|w| w[0] > w[1]), "{bytes:?}");
}

/// A synthetic model of a mix types its tensors by GGUF name as the recipe types the config's.
#[test]
fn named_types_agree_with_the_config_recipe() {
    for name in ["llama-2-13b", "smollm2-135m", "qwen2.5-0.5b"] {
        let cfg = preset(name);
        let named = NamedTypes::new(&cfg, Precision::Q4_K_M);
        for t in typed_tensors(&cfg, Precision::Q4_K_M) {
            if t.role == TensorRole::NormOrBias {
                continue;
            }
            let gguf = match (t.name.as_str(), t.layer) {
                ("embed_tokens", _) => "token_embd.weight".to_string(),
                ("lm_head", _) => "output.weight".to_string(),
                (n, Some(l)) => {
                    let short = n.trim_start_matches("layers.");
                    let short = if short == "attn_o" {
                        "attn_output"
                    } else {
                        short
                    };
                    format!("blk.{l}.{short}.weight")
                }
                (n, None) => panic!("{name}: unexpected global tensor {n}"),
            };
            assert_eq!(
                named.ggml_type(&gguf, t.rows, t.cols),
                t.ggml_type,
                "{name} {gguf}"
            );
        }
    }
}
