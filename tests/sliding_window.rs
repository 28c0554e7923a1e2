//! Sliding-window layers from config to ledger: which layers HF's keys window
//! (`ModelConfig::layer_window`), the planner's KV bytes (a ring of `min(ctx, window + chunk - 1)`
//! positions per windowed layer), the plan equal to what the ledger books when a windowed model
//! runs, and that model's logits the same whether its prompt is prefilled in chunks or token by
//! token, and a windowed Mistral directory end to end against an f64 forward pass.
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
            mix: None,
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

// ---- end to end against an f64 forward pass ---------------------------------------------------

/// `W x` for `W` rows of `x.len()`.
fn matvec(w: &[f64], x: &[f64]) -> Vec<f64> {
    w.chunks_exact(x.len())
        .map(|r| r.iter().zip(x).map(|(a, b)| a * b).sum())
        .collect()
}

fn rms_norm(x: &[f64], g: &[f64]) -> Vec<f64> {
    let s = 1.0 / (x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64 + 1e-5).sqrt();
    x.iter().zip(g).map(|(v, g)| v * s * g).collect()
}

/// Hugging Face's rotate-half RoPE (base 10000) of every head of `x` at position `pos`.
fn rope(x: &mut [f64], hd: usize, pos: usize) {
    for h in x.chunks_exact_mut(hd) {
        for i in 0..hd / 2 {
            let freq = 10000f64.powf(-2.0 * i as f64 / hd as f64);
            let (s, c) = (pos as f64 * freq).sin_cos();
            let (x0, x1) = (h[i], h[i + hd / 2]);
            h[i] = x0 * c - x1 * s;
            h[i + hd / 2] = x0 * s + x1 * c;
        }
    }
}

/// The logits of every position of `tokens`: a LLaMA-family forward pass in f64 whose layer `l`
/// attends the last `windows[l]` positions (all with `None`), as Hugging Face masks them.
fn reference(
    cfg: &ModelConfig,
    w: &std::collections::HashMap<String, Vec<f64>>,
    tokens: &[u32],
) -> Vec<Vec<f64>> {
    let (d, hd, nh, nkv) = (cfg.hidden_size, cfg.head_dim, cfg.n_heads, cfg.n_kv_heads);
    let embed = &w["model.embed_tokens.weight"];
    let mut xs: Vec<Vec<f64>> = tokens
        .iter()
        .map(|&t| embed[t as usize * d..][..d].to_vec())
        .collect();
    for l in 0..cfg.n_layers {
        let p = |s: &str| &w[&format!("model.layers.{l}.{s}.weight")];
        let (mut keys, mut vals) = (Vec::new(), Vec::new());
        for (pos, x) in xs.iter_mut().enumerate() {
            let xn = rms_norm(x, p("input_layernorm"));
            let mut q = matvec(p("self_attn.q_proj"), &xn);
            let mut k = matvec(p("self_attn.k_proj"), &xn);
            rope(&mut q, hd, pos);
            rope(&mut k, hd, pos);
            keys.push(k);
            vals.push(matvec(p("self_attn.v_proj"), &xn));
            let first = cfg
                .layer_window(l)
                .map_or(0, |win| (pos + 1).saturating_sub(win));
            let mut att = vec![0f64; nh * hd];
            for h in 0..nh {
                let g = h / (nh / nkv);
                let qh = &q[h * hd..][..hd];
                let scores: Vec<f64> = (first..=pos)
                    .map(|j| {
                        let kh = &keys[j][g * hd..][..hd];
                        qh.iter().zip(kh).map(|(a, b)| a * b).sum::<f64>() / (hd as f64).sqrt()
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let sum: f64 = e.iter().sum();
                for (j, e) in (first..=pos).zip(&e) {
                    let vh = &vals[j][g * hd..][..hd];
                    for (a, v) in att[h * hd..][..hd].iter_mut().zip(vh) {
                        *a += e / sum * v;
                    }
                }
            }
            let o = matvec(p("self_attn.o_proj"), &att);
            let x2: Vec<f64> = x.iter().zip(&o).map(|(a, b)| a + b).collect();
            let xn = rms_norm(&x2, p("post_attention_layernorm"));
            let gate = matvec(p("mlp.gate_proj"), &xn);
            let up = matvec(p("mlp.up_proj"), &xn);
            let act: Vec<f64> = gate
                .iter()
                .zip(&up)
                .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
                .collect();
            let down = matvec(p("mlp.down_proj"), &act);
            *x = x2.iter().zip(&down).map(|(a, b)| a + b).collect();
        }
    }
    xs.iter()
        .map(|x| matvec(embed, &rms_norm(x, &w["model.norm.weight"])))
        .collect()
}

/// Each logits row against the reference: max |diff| relative to the row's largest |logit| plus
/// one (tests/model_random_configs.rs's measure and bound; f32 arithmetic alone separates them).
fn compare(what: &str, got: &[f32], want: &[Vec<f64>], first: usize) {
    let vocab = want[0].len();
    assert_eq!(got.len() % vocab, 0, "{what}");
    for (i, row) in got.chunks(vocab).enumerate() {
        let w = &want[first + i];
        let scale = 1.0 + w.iter().fold(0f64, |a, v| a.max(v.abs()));
        let diff = row
            .iter()
            .zip(w)
            .fold(0f64, |a, (g, w)| a.max((*g as f64 - w).abs()));
        assert!(
            diff / scale <= 1e-4,
            "{what}: position {}: max |diff| {diff:.3e} over a scale of {scale:.2}",
            first + i
        );
    }
}

/// A random `mistral` Hugging Face directory (f32 weights, tied head) whose first two layers of
/// three attend a window of 6 (`layer_types`), run past the window six times over: a prefill in
/// chunks of 5 (every row's logits) and decode steps equal an f64 forward pass masked per layer,
/// which the same model without its window does not.
#[test]
fn windowed_mistral_directory_matches_the_masked_reference() {
    let Some(gpu) = gpu() else { return };
    let (vocab, d, ffn, layers, nh, nkv, hd) = (300, 64, 96, 3, 4, 2, 32);
    let types = ["sliding_attention", "sliding_attention", "full_attention"];
    let config = json!({
        "model_type": "mistral", "vocab_size": vocab, "hidden_size": d,
        "intermediate_size": ffn, "num_hidden_layers": layers, "num_attention_heads": nh,
        "num_key_value_heads": nkv, "head_dim": hd, "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": true,
        "sliding_window": 6, "layer_types": types
    });
    let mut tensors = Vec::new();
    let mut seed = 900;
    let mut push = |name: String, shape: Vec<usize>, scale: f32, offset: f32| {
        seed += 1;
        let n = shape.iter().product();
        let v: Vec<f32> = randn(n, seed, scale).iter().map(|x| x + offset).collect();
        tensors.push((name, shape, v));
    };
    push("model.embed_tokens.weight".into(), vec![vocab, d], 1.0, 0.0);
    push("model.norm.weight".into(), vec![d], 0.1, 1.0);
    let s = |n: usize| 1.0 / (n as f32).sqrt();
    for l in 0..layers {
        let n = |x: &str| format!("model.layers.{l}.{x}.weight");
        push(n("input_layernorm"), vec![d], 0.1, 1.0);
        push(n("post_attention_layernorm"), vec![d], 0.1, 1.0);
        // Large queries and keys, so that which keys a query sees moves its output.
        push(n("self_attn.q_proj"), vec![nh * hd, d], 3.0 * s(d), 0.0);
        push(n("self_attn.k_proj"), vec![nkv * hd, d], 3.0 * s(d), 0.0);
        push(n("self_attn.v_proj"), vec![nkv * hd, d], s(d), 0.0);
        push(n("self_attn.o_proj"), vec![d, nh * hd], s(nh * hd), 0.0);
        push(n("mlp.gate_proj"), vec![ffn, d], s(d), 0.0);
        push(n("mlp.up_proj"), vec![ffn, d], s(d), 0.0);
        push(n("mlp.down_proj"), vec![d, ffn], s(ffn), 0.0);
    }
    let dir = write_hf_model("sliding-window", &config, &tensors);
    let hf = wgllm::loader::HfModel::open(&dir.0).unwrap();
    let cfg = ModelConfig::from_hf_json(hf.config()).unwrap();
    assert_eq!(windows(&cfg), [Some(6), Some(6), None]);
    let w: std::collections::HashMap<String, Vec<f64>> = tensors
        .iter()
        .map(|(n, _, v)| (n.clone(), v.iter().map(|&x| x as f64).collect()))
        .collect();
    let n = 37;
    let tokens: Vec<u32> = (0..n as u32).map(|i| (i * 41 + 3) % vocab as u32).collect();
    let want = reference(&cfg, &w, &tokens);
    let global = ModelConfig {
        sliding_window: None,
        ..cfg.clone()
    };
    let unmasked = reference(&global, &w, &tokens);
    let moved = want[n - 1]
        .iter()
        .zip(&unmasked[n - 1])
        .fold(0f64, |a, (x, y)| a.max((x - y).abs()));
    assert!(
        moved > 1e-2,
        "the window moves the last logits by only {moved:.2e}"
    );
    for chunk in [5, 1] {
        let opts = RunOptions {
            ctx: 40,
            chunk,
            kv_dtype: KvDtype::F32,
            all_logits: chunk > 1,
            ..Default::default()
        };
        let src = wgllm::model::source::Source::Hf(&hf, None);
        let mut m = wgllm::model::llama::Llama::load(gpu, cfg.clone(), hd, &src, opts).unwrap();
        assert_eq!(m.state.kv[0].slots, 6 + chunk - 1);
        assert_eq!(m.state.kv[2].slots, 40);
        if chunk > 1 {
            let got = m.forward(gpu, &tokens, 0).unwrap();
            compare("prefill in chunks of 5", &got, &want, 0);
        } else {
            for (p, &t) in tokens.iter().enumerate() {
                let got = m.forward(gpu, &[t], p).unwrap();
                compare("decode", &got, &want, p);
            }
        }
    }
}
