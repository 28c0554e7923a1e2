//! The memory planner beyond LLaMA: GPT-2 and BERT planned from the passes wgllm runs (GPT-2's KV
//! cache, BERT's batch of sequences), GPT-3 described with GPT-2's formulas and marked so, and the
//! exact parameter counts beside them. No GPU needed; `tests/plan_vs_measured.rs` holds the plans
//! against the ledger.

use serde_json::json;
use wgllm::kernels::attention::KvDtype;
use wgllm::model::config::{Arch, ModelConfig};
use wgllm::model::params::{self, Precision};
use wgllm::plan::bert::{bert_activation_plan, sequence_slot};
use wgllm::plan::gpt2::gpt2_activation_plan;
use wgllm::plan::{MemoryPlan, PlanOptions, GIB, MIB};

fn preset(name: &str) -> ModelConfig {
    ModelConfig::preset(name).unwrap_or_else(|e| panic!("preset {name}: {e}"))
}

fn plan_with(cfg: &ModelConfig, opts: PlanOptions) -> MemoryPlan {
    MemoryPlan::new(cfg, opts).unwrap_or_else(|e| panic!("plan {:?}: {e}", cfg.arch))
}

/// The published totals (tests/params.rs) of the presets that are not LLaMA-family.
const TOTALS: [(&str, u64); 4] = [
    ("gpt2", 124_439_808),
    ("gpt2-xl", 1_557_611_200),
    ("bert-base-uncased", 109_482_240),
    ("gpt3-175b", 174_604_259_328),
];

/// `1,234,567`, as the report groups digits.
use wgllm::gpu::ledger::group_digits as grouped;

#[test]
fn every_preset_is_planned_with_its_exact_count() {
    for (name, total) in TOTALS {
        let cfg = preset(name);
        let p = plan_with(&cfg, PlanOptions::default());
        assert_eq!(params::count(&cfg).total, total, "{name}");
        let t = p.to_table();
        let needle = format!("parameters: {} exact vs", grouped(total));
        assert!(t.contains(&needle), "{name}: no '{needle}' in\n{t}");
        let tb = grouped(params::textbook_estimate(&cfg));
        assert!(t.contains(&tb), "{name}: textbook estimate {tb} missing");
        assert!(
            t.contains("12*L*d^2 + V*d + P*d"),
            "{name}: learned positions"
        );
        let sum: u64 = p.classes().iter().map(|(_, b)| b).sum();
        assert_eq!(sum, p.total_bytes, "{name}");
        let j = p.to_json();
        assert_eq!(j["runs_here"], json!(name != "gpt3-175b"), "{name}");
        assert_eq!(j["cfg"]["arch"], json!(cfg.arch.name()), "{name}");
    }
}

#[test]
fn gpt2_plans_its_kv_cache_and_caps_ctx_at_its_positions() {
    let cfg = preset("gpt2");
    let p = plan_with(&cfg, PlanOptions::default());
    assert!(p.runs_here && p.described_only.is_none());
    // The loader caps ctx at n_positions: 12 layers x 1024 positions x K and V of 12 x 64 f16.
    assert_eq!(p.options.ctx, 1024);
    assert!(p.notes.iter().any(|n| n.contains("1024 learned positions")));
    assert_eq!(p.kv_bytes_per_token_layer, 2 * 12 * 64 * 2);
    assert_eq!(p.kv_cache_bytes, 12 * 1024 * 2 * 768 * 2);
    assert!(p.to_table().contains("runs here: `wgllm run`"));
    // What the loader uploads is the checkpoint's tensors (c_attn split in three): the same bytes.
    for name in ["gpt2", "gpt2-xl", "gpt3-175b"] {
        let cfg = preset(name);
        for pr in Precision::ALL {
            let p = plan_with(
                &cfg,
                PlanOptions {
                    precision: pr,
                    ..Default::default()
                },
            );
            let exact = params::weight_bytes(&cfg, pr).exact_bytes;
            assert_eq!(p.parameters_bytes, exact, "{name} {pr}");
            assert_eq!(
                p.layer_weight_bytes * cfg.n_layers as u64 + p.other_weight_bytes,
                exact
            );
        }
    }
    // 3 + 19 a layer + 2 dispatches (embeddings and add; ln, 6 matmuls and biases, store,
    // attention, 2 adds, 2 more ln, gelu; ln_f and the tied head), 256-byte slots, the last one
    // (the head's 32 bytes) unpadded.
    assert_eq!(p.dispatches_per_chunk, 3 + 19 * 12 + 2);
    assert_eq!(p.kernel_params_bytes, 233 * 256 - (256 - 32));
    // Decode: one token's activations, the last row's logits.
    let d = gpt2_activation_plan(&cfg, 1, false);
    let role = |r: &str| d.roles.iter().find(|x| x.name == r).unwrap().bytes;
    assert_eq!(
        (role("x"), role("fc"), role("logits")),
        (768 * 4, 3072 * 4, 50257 * 4)
    );
    for r in ["x", "x2"] {
        assert_eq!(d.buffer_of(r).unwrap().roles, vec![r.to_string()], "{r}");
    }
}

#[test]
fn bert_plans_a_batch_of_sequences_and_no_kv_cache() {
    let cfg = preset("bert-base-uncased");
    let opts = |batch, ctx| PlanOptions {
        batch,
        ctx,
        ..Default::default()
    };
    let p = plan_with(&cfg, opts(8, 128));
    assert!(p.runs_here);
    assert!(p.to_table().contains("runs here: `wgllm embed`"));
    assert_eq!((p.kv_cache_bytes, p.kv_bytes_per_token_layer), (0, 0));
    // 768 * 4 bytes a row is a multiple of 256: sequences are packed with no padding rows.
    assert_eq!(sequence_slot(128, 768), 128);
    let rows = 8 * 128u64;
    assert_eq!(p.activations.chunk, 1024);
    let a = bert_activation_plan(&cfg, 8, 128);
    assert_eq!(a, p.activations);
    let role = |r: &str| a.roles.iter().find(|x| x.name == r).unwrap().bytes;
    assert_eq!(role("x"), rows * 768 * 4);
    assert_eq!(role("inter"), rows * 3072 * 4);
    // q, k and v meet in the attention, inter and act in the GELU: never one buffer.
    let b = |r: &str| a.role_to_buffer[r];
    assert!(b("q") != b("k") && b("k") != b("v") && b("q") != b("v"));
    assert!(b("inter") != b("act") && b("att") != b("q"));
    // Activations grow with the batch.
    let p16 = plan_with(&cfg, opts(16, 128));
    assert_eq!(p16.activation_bytes, 2 * p.activation_bytes);
    // Uploaded: the checkpoint less the pooler and the position and type tables, plus one f32
    // table of 128 positions + type 0.
    let w = params::weight_bytes(&cfg, Precision::F16).exact_bytes;
    let pooler = 768 * 768 * 2 + 768 * 4;
    let tables = (512 + 2) * 768 * 2;
    assert_eq!(p.parameters_bytes, w - pooler - tables + 128 * 768 * 4);
    // Per layer: q, k, v, output, intermediate, output (6) with biases, 8 attentions (one per
    // sequence), 2 residual adds, 2 LayerNorms, GELU; before: 2 lookups, an add, a LayerNorm.
    assert_eq!(p.dispatches_per_chunk, 4 + 12 * (12 + 8 + 5));
    // The hidden states come back.
    assert_eq!(p.staging_readback_bytes, rows * 768 * 4);
    // A sequence past the 512 positions is capped there, as Bert::load caps it.
    let long = plan_with(&cfg, opts(1, 2048));
    assert_eq!(long.options.ctx, 512);
    assert!(long
        .notes
        .iter()
        .any(|n| n.contains("512 learned positions")));
}

#[test]
fn bert_suggests_the_largest_batch_and_longest_sequence_that_fit() {
    let cfg = preset("bert-base-uncased");
    let budget = 600 * MIB;
    let opts = |batch, ctx| PlanOptions {
        batch,
        ctx,
        budget: Some(budget),
        ..Default::default()
    };
    let p = plan_with(&cfg, opts(64, 512));
    assert!(!p.fits());
    let s = p.suggestions().expect("over budget");
    assert!(s.kv_alternatives.is_empty() && s.longest_ctx.is_none() && s.streaming.is_none());
    let b = s.largest_batch.expect("some batch fits");
    assert!(plan_with(&cfg, opts(b, 512)).fits());
    assert!(!plan_with(&cfg, opts(b + 1, 512)).fits());
    let n = s.longest_seq.expect("some length fits");
    assert!(plan_with(&cfg, opts(64, n)).fits());
    assert!(!plan_with(&cfg, opts(64, n + 1)).fits());
    let t = p.to_table();
    assert!(
        t.contains(&format!("largest batch of 512-token sequences: {b}")),
        "{t}"
    );
}

/// GPT-3 175B: counts, bytes, KV cache and a verdict, marked as a description.
#[test]
fn gpt3_is_described_not_run() {
    let cfg = preset("gpt3-175b");
    assert_eq!(cfg.arch, Arch::Gpt3);
    assert_eq!(cfg.arch.runs_with(), None);
    let p = plan_with(
        &cfg,
        PlanOptions {
            precision: Precision::Q4_0,
            budget: Some(12 * GIB),
            ..Default::default()
        },
    );
    assert!(!p.runs_here);
    let d = p.described_only.as_deref().expect("marked");
    assert!(
        d.starts_with("described only") && d.contains("no forward pass"),
        "{d}"
    );
    assert!(!p.fits());
    // 96 layers x 2048 positions x K and V of 96 x 128 f16.
    assert_eq!(p.kv_cache_bytes, 96 * 2048 * 2 * 12288 * 2);
    assert_eq!(
        p.parameters_bytes,
        params::weight_bytes(&cfg, Precision::Q4_0).exact_bytes
    );
    let t = p.to_table();
    assert!(
        t.contains("described only: wgllm has no forward pass for gpt3"),
        "{t}"
    );
    assert!(
        t.contains("fits: NO") && t.contains("[described only]"),
        "{t}"
    );
    let j = p.to_json();
    assert_eq!(j["runs_here"], json!(false));
    assert!(j["described_only"].as_str().is_some());
    // No pass streams it.
    assert!(p.suggestions().expect("over budget").streaming.is_none());
}

/// `--config` of a GPT-2 and a BERT config.json (as `transformers` writes them) and of a GPT-3
/// config (model_type gpt3, wgllm's own: GPT2Config's fields).
#[test]
fn configs_of_every_architecture_are_planned() {
    let gpt2 = json!({
        "model_type": "gpt2", "vocab_size": 50257, "n_embd": 768, "n_layer": 12, "n_head": 12,
        "n_positions": 1024, "activation_function": "gelu_new"
    });
    let bert = json!({
        "model_type": "bert", "vocab_size": 30522, "hidden_size": 384, "num_hidden_layers": 6,
        "num_attention_heads": 12, "intermediate_size": 1536, "max_position_embeddings": 512,
        "type_vocab_size": 2, "hidden_act": "gelu"
    });
    let gpt3_xl = json!({
        "model_type": "gpt3", "vocab_size": 50257, "n_embd": 2048, "n_layer": 24, "n_head": 16,
        "n_positions": 2048
    });
    for (json, arch, runs) in [
        (gpt2, Arch::Gpt2, true),
        (bert, Arch::Bert, true),
        (gpt3_xl, Arch::Gpt3, false),
    ] {
        let cfg = ModelConfig::from_hf_json(&json).expect("config");
        assert_eq!(cfg.arch, arch);
        let p = plan_with(&cfg, PlanOptions::default());
        assert_eq!(p.runs_here, runs, "{arch:?}");
        assert!(p.to_table().contains(&grouped(params::count(&cfg).total)));
    }
    // all-MiniLM-L6-v2's shape: 22,713,216 parameters with the pooler.
    let minilm = ModelConfig::from_hf_json(&json!({
        "model_type": "bert", "vocab_size": 30522, "hidden_size": 384, "num_hidden_layers": 6,
        "num_attention_heads": 12, "intermediate_size": 1536
    }))
    .unwrap();
    assert_eq!(params::count(&minilm).total, 22_713_216);
}

#[test]
fn bad_requests_are_refused_for_every_architecture() {
    for name in ["gpt2", "bert-base-uncased", "gpt3-175b"] {
        let cfg = preset(name);
        for (ctx, chunk, batch) in [(0, 64, 1), (64, 0, 1), (64, 64, 0)] {
            let o = PlanOptions {
                ctx,
                chunk,
                batch,
                ..Default::default()
            };
            assert!(
                MemoryPlan::new(&cfg, o).is_err(),
                "{name} {ctx} {chunk} {batch}"
            );
        }
    }
    // GPT-2's head_dim 64 stores q8_0 keys; an encoder has no KV type to refuse.
    let q8 = PlanOptions {
        kv: KvDtype::Q8_0,
        ..Default::default()
    };
    assert!(MemoryPlan::new(&preset("gpt2"), q8.clone()).is_ok());
    assert!(MemoryPlan::new(&preset("bert-base-uncased"), q8).is_ok());
    // llama.cpp's K-quant mixes type LLaMA's tensors; the GPT-2 and BERT loaders take one format.
    for name in ["gpt2", "bert-base-uncased", "gpt3-175b"] {
        let mix = PlanOptions {
            precision: wgllm::model::params::Precision::Q4_K_M,
            ..Default::default()
        };
        let e = MemoryPlan::new(&preset(name), mix).expect_err(name);
        assert!(
            matches!(e, wgllm::Error::InvalidArgument { .. }),
            "{name}: {e}"
        );
        assert!(e.to_string().contains("q4_k_m"), "{e}");
    }
}
