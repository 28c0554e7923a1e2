//! Gemma 3 270M (llama.cpp's Q4_K_M GGUF: Q5_0, Q4_K, Q6_K, Q8_0 and F32 tensors) end to end on
//! the device, against `models/goldens/gemma3_270m.json` from the float64 numpy reference
//! (`models/reference/gemma3_ref.py`, weights dequantised by gguf-py). The prompts are fed as the
//! golden's token ids (an independent tokenizer made them), so these tests check the forward pass
//! alone.
//!
//! Tolerances: greedy continuations token for token; last-token logits within `LOGIT_TOL`
//! absolute. The loader dequantises the K-quants and Q5_0 to f32 and wgllm accumulates in f32, so
//! the error is f32 rounding through 18 layers, a 262,144-row head and logits of up to ~40
//! (measured: 5.2e-5 and 5.9e-5 on the goldens' two prompts, which is the goldens' rounding to six
//! significant digits; the bound leaves room for long prompts); perplexity within 0.5% (measured:
//! 37.7116 against 37.7116 on the 191-token text).
mod common;
use common::*;
use wgllm::kernels::attention::KvDtype;
use wgllm::model::generate::{generate, perplexity, PplMethod};
use wgllm::model::llama::RunOptions;
use wgllm::model::load::{load_lm, LoadedLm};
use wgllm::sampler::{Sampler, SamplerConfig};

const GOLDEN: &str = "gemma3_270m.json";
const LOGIT_TOL: f32 = 5e-3;
const PPL_REL_TOL: f64 = 0.005;

/// The goldens of models/reference/gemma3_ref.py.
fn goldens() -> Option<serde_json::Value> {
    Some(golden(GOLDEN))
}

fn model(ctx: usize, all_logits: bool) -> Option<(&'static wgllm::Gpu, LoadedLm)> {
    let gpu = gpu()?;
    let path = packaged_model(&wgllm::fetch::GEMMA3_270M)?;
    let lm = load_lm(
        gpu,
        &path,
        None,
        RunOptions {
            ctx,
            kv_dtype: KvDtype::F32,
            chunk: 64,
            all_logits,
            resident_layers: None,
            parallel: 1,
        },
    )
    .expect("load Gemma 3 270M");
    Some((gpu, lm))
}

fn pairs(v: &serde_json::Value) -> Vec<(usize, f32)> {
    v.as_array()
        .expect("pairs")
        .iter()
        .map(|p| {
            (
                p[0].as_u64().expect("id") as usize,
                p[1].as_f64().expect("logit") as f32,
            )
        })
        .collect()
}

#[test]
fn config_from_the_file() {
    let Some(path) = packaged_model(&wgllm::fetch::GEMMA3_270M) else {
        return;
    };
    let g = wgllm::loader::gguf::Gguf::open(&path).unwrap();
    let (cfg, rot) = wgllm::model::llama::config_from_gguf(&g).unwrap();
    assert_eq!(
        (cfg.hidden_size, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads),
        (640, 18, 4, 1)
    );
    assert_eq!((cfg.head_dim, rot, cfg.ffn_size), (256, 256, 2048));
    assert_eq!(cfg.vocab_size, 262_144);
    assert!(cfg.tied_embeddings);
    assert_eq!(cfg.ffn, wgllm::model::config::Ffn::GeGluTanh);
    let gemma = cfg.gemma.expect("gemma");
    assert_eq!(gemma.query_pre_attn_scalar, 256.0);
    // Five local layers (window 512, base 10,000), then a global one (base 1e6).
    for l in 0..18 {
        let global = (l + 1) % 6 == 0;
        assert_eq!(cfg.layer_window(l), (!global).then_some(512), "layer {l}");
        let theta = if global { 1e6 } else { 1e4 };
        assert_eq!(cfg.layer_rope(l), Some((theta, 1.0)), "layer {l}");
    }
}

#[test]
fn logits_match_reference() {
    let Some(gold) = goldens() else { return };
    // The longest case is the 880-token text, past the 512-token window.
    let Some((gpu, mut lm)) = model(1024, false) else {
        return;
    };
    let vocab = lm.config.vocab_size;
    for case in gold["logits"].as_array().expect("logits") {
        let ids = ids_of(&case["prompt_ids"]);
        let out = lm.model.forward(gpu, &ids, 0).unwrap();
        let last = &out[out.len() - vocab..];
        let top = pairs(&case["top"]);
        let mut worst = 0f32;
        for (id, l) in top.iter().chain(&pairs(&case["sample"])) {
            worst = worst.max((last[*id] - l).abs());
        }
        let max_abs = last.iter().fold(0f32, |m, v| m.max(v.abs()));
        let want_max = case["max_abs"].as_f64().unwrap() as f32;
        assert!(
            (max_abs - want_max).abs() <= LOGIT_TOL,
            "{}: max |logit| {max_abs} (reference {want_max})",
            case["name"]
        );
        assert!(
            worst <= LOGIT_TOL,
            "{}: max logit error {worst}",
            case["name"]
        );
        assert_eq!(
            wgllm::sampler::argmax(last) as usize,
            top[0].0,
            "{}",
            case["name"]
        );
        eprintln!("{}: max |logit error| {worst:.2e}", case["name"]);
    }
}

#[test]
fn greedy_matches_reference() {
    let Some(gold) = goldens() else { return };
    let Some((gpu, mut lm)) = model(512, false) else {
        return;
    };
    for r in gold["greedy"].as_array().expect("greedy") {
        let prompt = ids_of(&r["prompt_ids"]);
        assert_eq!(prompt.first(), Some(&2), "{}: BOS first", r["name"]);
        let want = ids_of(&r["new_ids"]);
        assert_eq!(want.len() as u64, r["n_new"].as_u64().unwrap());
        // Tokens one at a time through the model, no stop tokens: the golden never stops early.
        let mut got = Vec::new();
        let mut logits = lm.model.forward(gpu, &prompt, 0).unwrap();
        for i in 0..want.len() {
            let next = wgllm::sampler::argmax(&logits);
            got.push(next);
            if i + 1 < want.len() {
                logits = lm.model.forward(gpu, &[next], prompt.len() + i).unwrap();
            }
        }
        assert_eq!(
            got,
            want,
            "greedy continuation of {}: {:?}",
            r["name"],
            lm.tokenizer.decode(&got)
        );
    }
}

/// `generate` (the path of `wgllm run`) on the golden's first raw prompt.
#[test]
fn generate_follows_the_greedy_golden() {
    let Some(gold) = goldens() else { return };
    let Some((gpu, mut lm)) = model(512, false) else {
        return;
    };
    let r = &gold["greedy"][0];
    let prompt = ids_of(&r["prompt_ids"]);
    let want = ids_of(&r["new_ids"]);
    let mut sampler = Sampler::new(SamplerConfig {
        temperature: 0.0,
        ..Default::default()
    });
    let (got, _) = generate(
        lm.model.as_mut(),
        gpu,
        &lm.tokenizer,
        &prompt,
        want.len(),
        &mut sampler,
        &mut |_| true,
    )
    .unwrap();
    // generate stops at EOS / end of turn; the golden does not, so compare the common prefix.
    assert!(!got.is_empty());
    assert_eq!(got[..], want[..got.len()], "{}", r["name"]);
}

#[test]
fn perplexity_matches_reference() {
    let Some(gold) = goldens() else { return };
    let mut compared = 0;
    for case in gold["perplexity"].as_array().expect("perplexity") {
        let ids = ids_of(&case["ids"]);
        assert_eq!(case["method"].as_str(), Some("window"));
        // The 880-token text crosses the local layers' 512-token window: their ring caches
        // (`KvCache::windowed`) must forget what the reference's mask hides (full attention
        // would give 45.94 there, the window 20.48).
        // One window over the whole text: a context one longer than the text.
        let Some((gpu, mut lm)) = model(ids.len() + 1, true) else {
            return;
        };
        let got = perplexity(lm.model.as_mut(), gpu, &ids, ids.len() + 1, None).unwrap();
        assert_eq!(got.method, PplMethod::Window);
        assert_eq!(got.scored, ids.len() - 1);
        let want = case["ppl"].as_f64().unwrap();
        let rel = (got.perplexity - want).abs() / want;
        eprintln!(
            "{}: {} tokens, perplexity {:.4} (reference {want:.4}, {:.4}%)",
            case["name"],
            ids.len(),
            got.perplexity,
            100.0 * rel
        );
        assert!(
            rel <= PPL_REL_TOL,
            "{}: perplexity {} vs {want}",
            case["name"],
            got.perplexity
        );
        compared += 1;
    }
    assert_eq!(compared, gold["perplexity"].as_array().unwrap().len());
}
