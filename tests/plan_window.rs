//! Sliding-window layers from config to ledger: which layers HF's keys window
//! (`ModelConfig::layer_window`), the planner's KV bytes (a ring of `min(ctx, window + chunk - 1)`
//! positions per windowed layer), the plan equal to what the ledger books when a windowed model
//! runs, and that model's logits the same whether its prompt is prefilled in chunks or token by
//! token.
mod common;
use common::*;
use serde_json::json;
use wgllm::gpu::ledger::BufferClass;
use wgllm::kernels::attention::{bytes_per_token, KvDtype};
use wgllm::model::config::{ModelConfig, WindowLayers};
use wgllm::model::llama::RunOptions;
use wgllm::plan::{kv_layer_positions, MemoryPlan, PlanOptions};
use wgllm::{Gpu, GpuOptions};

/// A LLaMA-family `config.json` of Gemma 3 270M's attention shape (18 layers, 4 query heads over
/// one kv head of 256) with `extra` keys.
fn config(model_type: &str, extra: serde_json::Value) -> ModelConfig {
    let mut v = json!({
        "model_type": model_type, "hidden_size": 640, "num_hidden_layers": 18,
        "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256,
        "intermediate_size": 2048, "vocab_size": 262144, "max_position_embeddings": 32768,
        "tie_word_embeddings": true
    });
    for (k, x) in extra.as_object().unwrap() {
        v[k] = x.clone();
    }
    ModelConfig::from_hf_json(&v).unwrap()
}

fn windows(c: &ModelConfig) -> Vec<Option<usize>> {
    (0..c.n_layers).map(|l| c.layer_window(l)).collect()
}

#[test]
fn hf_keys_choose_the_windowed_layers() {
    // Mistral: every layer; MistralConfig's 4096 when the key is absent, none when it is null;
    // LLaMA: none unless given.
    let m = config("mistral", json!({"sliding_window": 512}));
    assert_eq!(windows(&m), vec![Some(512); 18]);
    assert_eq!(windows(&config("mistral", json!({}))), vec![Some(4096); 18]);
    let null = config("mistral", json!({"sliding_window": null}));
    assert_eq!(windows(&null), vec![None; 18]);
    assert_eq!(windows(&config("llama", json!({}))), vec![None; 18]);
    // Gemma 3's pattern: every 6th layer global.
    let g = config(
        "llama",
        json!({"sliding_window": 512, "sliding_window_pattern": 6}),
    );
    assert_eq!(g.window_layers, WindowLayers::GlobalEvery(6));
    let global: Vec<usize> = (0..18).filter(|&l| g.layer_window(l).is_none()).collect();
    assert_eq!(global, [5, 11, 17]);
    // layer_types, as newer configs list them.
    let types: Vec<&str> = (0..18)
        .map(|l| {
            if l % 6 == 5 {
                "full_attention"
            } else {
                "sliding_attention"
            }
        })
        .collect();
    let listed = config(
        "llama",
        json!({"sliding_window": 512, "layer_types": types}),
    );
    assert_eq!(windows(&listed), windows(&g));
    // Qwen2 keeps its window off unless use_sliding_window; then from max_window_layers on.
    let off = config(
        "qwen2",
        json!({"sliding_window": 4096, "use_sliding_window": false, "max_window_layers": 2}),
    );
    assert_eq!(windows(&off), vec![None; 18]);
    let unsaid = config("qwen2", json!({"sliding_window": 4096}));
    assert_eq!(windows(&unsaid), vec![None; 18]);
    let on = config(
        "qwen2",
        json!({"sliding_window": 4096, "use_sliding_window": true, "max_window_layers": 16}),
    );
    let w = windows(&on);
    assert_eq!((w[15], w[16], w[17]), (None, Some(4096), Some(4096)));
    // The presets: Mistral 7B windows every layer at 4096; Qwen2.5 has it switched off.
    let mistral = ModelConfig::preset("mistral-7b").unwrap();
    assert_eq!(windows(&mistral), vec![Some(4096); 32]);
    let qwen = ModelConfig::preset("qwen2.5-0.5b").unwrap();
    assert!(windows(&qwen).iter().all(Option::is_none));
    // Nonsense is refused, naming the key.
    let bad = |extra: serde_json::Value, key: &str| {
        let mut v = json!({
            "model_type": "mistral", "hidden_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 2, "intermediate_size": 64, "vocab_size": 10
        });
        for (k, x) in extra.as_object().unwrap() {
            v[k] = x.clone();
        }
        let e = ModelConfig::from_hf_json(&v).unwrap_err().to_string();
        assert!(e.contains(key), "{e}");
    };
    bad(json!({"sliding_window": 0}), "sliding_window");
    bad(json!({"sliding_window": -3}), "sliding_window");
    let pattern = json!({"sliding_window": 8, "sliding_window_pattern": 0});
    bad(pattern, "sliding_window_pattern");
    let short = json!({"sliding_window": 8, "layer_types": ["full_attention"]});
    bad(short, "layer_types");
    let unknown = json!({"sliding_window": 8, "layer_types": ["x", "full_attention"]});
    bad(unknown, "layer_types");
}

/// Gemma 3 270M's shape at 32k: 3 global layers of every position and 15 rings of 512 + 63,
/// about 5x less KV cache than 18 global layers; Mistral 7B at 32k: 32 rings of 4096 + 63. Below
/// the window nothing changes.
#[test]
fn planned_kv_cache_counts_a_ring_per_windowed_layer() {
    let g = config(
        "llama",
        json!({"sliding_window": 512, "sliding_window_pattern": 6}),
    );
    let (ctx, chunk) = (32768, 64);
    let plan = |cfg: &ModelConfig, ctx: usize| {
        let opts = PlanOptions {
            ctx,
            chunk,
            kv: KvDtype::F16,
            ..Default::default()
        };
        MemoryPlan::new(cfg, opts).unwrap()
    };
    let p = plan(&g, ctx);
    let bpt = bytes_per_token(KvDtype::F16, 1, 256);
    assert_eq!(bpt, 1024);
    assert_eq!(p.kv_positions, 3 * 32768 + 15 * 575);
    assert_eq!(p.kv_cache_bytes, (3 * 32768 + 15 * 575) * bpt);
    assert_eq!(p.kv_ring_layers, 15);
    let all_global = ModelConfig {
        sliding_window: None,
        ..g.clone()
    };
    let full = plan(&all_global, ctx).kv_cache_bytes;
    assert_eq!(full, 18 * 32768 * bpt);
    let ratio = full as f64 / p.kv_cache_bytes as f64;
    assert!((5.0..6.0).contains(&ratio), "{ratio}");
    let table = p.to_table();
    assert!(
        table.contains("sliding window 512 on 15 of 18 layers, each a ring of 575 positions"),
        "{table}"
    );
    assert_eq!(kv_layer_positions(&g, ctx, chunk)[4..7], [575, 32768, 575]);
    // A decode-only plan (chunk 1) rings exactly the window.
    assert_eq!(kv_layer_positions(&g, ctx, 1)[0], 512);

    let mistral = ModelConfig::preset("mistral-7b").unwrap();
    let m = plan(&mistral, ctx);
    assert_eq!(
        m.kv_cache_bytes,
        32 * (4096 + 63) * bytes_per_token(KvDtype::F16, 8, 128)
    );
    // Within the window (and its chunk) every position is kept: the old formula.
    for c in [2048, 4096 + 63] {
        let short = plan(&mistral, c);
        assert_eq!(short.kv_cache_bytes, 32 * c as u64 * 4096);
        assert_eq!(short.kv_ring_layers, 0);
        assert!(!short.to_table().contains("sliding window"));
    }
    // What fits a budget: the KV cache stops growing at the ring's length, so a budget one byte
    // short of the 32k plan holds every ctx below that length and none from it on.
    let tight = PlanOptions {
        ctx,
        chunk,
        kv: KvDtype::F16,
        budget: Some(m.total_bytes - 1),
        ..Default::default()
    };
    let over = MemoryPlan::new(&mistral, tight).unwrap();
    assert!(!over.fits());
    let longest = over.suggestions().unwrap().longest_ctx.unwrap();
    assert_eq!(longest, 4096 + 62);
}

/// A small random LLaMA-family model with two windowed layers and one global one: what the plan
/// counts equals what the ledger books (KV cache, activations and kernel params), and the last
/// token's logits are the same whether the prompt (past the window several times over) runs in
/// chunks of 5 or token by token, and differ from the same model without its window.
#[test]
fn windowed_model_matches_the_ledger_and_its_own_decode() {
    if gpu().is_none() {
        return;
    }
    let mut cfg = ModelConfig::preset("smollm2-135m").unwrap();
    (cfg.vocab_size, cfg.hidden_size, cfg.ffn_size, cfg.n_layers) = (264, 64, 64, 3);
    (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim) = (4, 2, 32);
    cfg.sliding_window = Some(8);
    cfg.window_layers = WindowLayers::GlobalEvery(3);
    let (ctx, n) = (40, 37);
    let tokens: Vec<u32> = (0..n as u32).map(|i| (i * 37 + 5) % 264).collect();
    let run = |cfg: &ModelConfig, chunk: usize, kv: KvDtype| {
        let gpu = Gpu::new(&GpuOptions::default()).unwrap();
        let opts = RunOptions {
            ctx,
            chunk,
            kv_dtype: kv,
            ..Default::default()
        };
        let src = wgllm::model::source::Source::Synthetic {
            format: wgllm::quant::WeightFormat::F32,
            seed: 7,
        };
        let rot = cfg.head_dim;
        let mut m = wgllm::model::llama::Llama::load(&gpu, cfg.clone(), rot, &src, opts).unwrap();
        let logits = if chunk == 1 {
            let mut last = Vec::new();
            for (p, &t) in tokens.iter().enumerate() {
                last = m.forward(&gpu, &[t], p).unwrap();
            }
            last
        } else {
            m.forward(&gpu, &tokens, 0).unwrap()
        };
        let r = gpu.ledger.report();
        let popts = PlanOptions {
            ctx,
            chunk,
            kv,
            ..Default::default()
        }
        .for_device(&wgllm::kernels::device_traits(&gpu));
        let plan = MemoryPlan::new(cfg, popts).unwrap();
        let what = format!("chunk {chunk} kv {kv}");
        assert_eq!(
            plan.kv_cache_bytes,
            r.class(BufferClass::KvCache).current_bytes,
            "{what}: kv cache"
        );
        assert_eq!(
            plan.activation_bytes + plan.kernel_params_bytes,
            r.class(BufferClass::Activations).peak_bytes,
            "{what}: activations"
        );
        logits
    };
    for kv in [KvDtype::F32, KvDtype::F16] {
        let chunked = run(&cfg, 5, kv);
        let stepped = run(&cfg, 1, kv);
        // Prefill and decode kernels round differently; the positions they see are the same.
        assert_close(&format!("{kv}: chunks vs steps"), &chunked, &stepped, 1e-8);
        let global = ModelConfig {
            sliding_window: None,
            ..cfg.clone()
        };
        let unwindowed = run(&global, 5, kv);
        assert!(
            nmse(&unwindowed, &chunked) > 1e-6,
            "{kv}: the window changed nothing"
        );
    }
    // Ring sizes: chunks of 5 over a window of 8 keep 12 positions, decode steps 8.
    let bpt = bytes_per_token(KvDtype::F32, 2, 32);
    let at = |chunk| {
        let popts = PlanOptions {
            ctx,
            chunk,
            kv: KvDtype::F32,
            ..Default::default()
        };
        MemoryPlan::new(&cfg, popts).unwrap().kv_cache_bytes
    };
    assert_eq!((at(5), at(1)), ((12 + 12 + 40) * bpt, (8 + 8 + 40) * bpt));
}
