//! SmolLM2-135M-Instruct (Q4_1 + Q8_0 GGUF) end to end on the device, against the goldens made by
//! the independent numpy reference (models/reference). Tolerances: logits within 0.02 absolute
//! (the reference runs in f64 on the same dequantised weights; wgllm accumulates in f32), greedy
//! continuations token for token, perplexity within 0.1%.
mod common;
use common::*;
use wgllm::kernels::attention::KvDtype;
use wgllm::model::chat::{encode_prompt, Message, RenderArgs};
use wgllm::model::generate::{generate, perplexity, Perplexity, PplMethod};
use wgllm::model::llama::RunOptions;
use wgllm::model::load::{load_lm, LoadedLm};
use wgllm::sampler::{Sampler, SamplerConfig};

const LOGIT_TOL: f32 = 0.02;

fn model(kv: KvDtype, ctx: usize) -> Option<(&'static wgllm::Gpu, LoadedLm)> {
    let gpu = gpu()?;
    let path = packaged_model(&wgllm::fetch::SMOLLM2)?;
    let lm = load_lm(
        gpu,
        &path,
        None,
        RunOptions {
            ctx,
            kv_dtype: kv,
            chunk: 64,
            all_logits: false,
            resident_layers: None,
            parallel: 1,
        },
    )
    .expect("load SmolLM2");
    Some((gpu, lm))
}

#[test]
fn tokenizer_ids_match_reference() {
    let Some(path) = packaged_model(&wgllm::fetch::SMOLLM2) else {
        return;
    };
    let g = wgllm::loader::gguf::Gguf::open(&path).unwrap();
    let tok = wgllm::tokenizer::Tokenizer::from_gguf(
        &wgllm::tokenizer::GgufVocab::from_gguf(&g).unwrap(),
    )
    .unwrap();
    let gold = golden("smollm2_tokens.json");
    let cases = gold["cases"].as_array().unwrap();
    assert!(cases.len() >= 12);
    for c in cases {
        let text = c["text"].as_str().unwrap();
        let special = c["parse_special"].as_bool().unwrap_or(true);
        let ids = tok.encode_with(text, true, special).unwrap();
        assert_eq!(ids, ids_of(&c["ids"]), "ids of {text:?}");
        if !ids.is_empty() {
            assert_eq!(tok.decode(&ids).unwrap(), text, "round trip of {text:?}");
        }
    }
}

fn logsumexp(row: &[f32]) -> f64 {
    let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    max + row
        .iter()
        .map(|&v| (v as f64 - max).exp())
        .sum::<f64>()
        .ln()
}

#[test]
fn logits_match_reference() {
    let Some((gpu, mut lm)) = model(KvDtype::F32, 256) else {
        return;
    };
    let gold = golden("smollm2_logits.json");
    let vocab = lm.config.vocab_size;
    for p in gold["prompts"].as_array().unwrap() {
        let ids = ids_of(&p["ids"]);
        assert_eq!(
            lm.tokenizer
                .encode(p["prompt"].as_str().unwrap(), true)
                .unwrap(),
            ids
        );
        let all = p.get("all_positions").is_some();
        lm.model.set_all_logits(all);
        let out = lm.model.forward(gpu, &ids, 0).unwrap();
        let last = &out[out.len() - vocab..];
        let want = &p["last"];
        let mut worst = 0f32;
        for pair in want["top20"].as_array().unwrap() {
            let (id, l) = (
                pair[0].as_u64().unwrap() as usize,
                pair[1].as_f64().unwrap() as f32,
            );
            worst = worst.max((last[id] - l).abs());
        }
        for (id, l) in ids_of(&want["fixed_ids"])
            .iter()
            .zip(want["fixed_logits"].as_array().unwrap())
        {
            worst = worst.max((last[*id as usize] - l.as_f64().unwrap() as f32).abs());
        }
        assert!(
            worst <= LOGIT_TOL,
            "{}: max logit error {worst}",
            p["prompt"]
        );
        assert!((logsumexp(last) - want["logsumexp"].as_f64().unwrap()).abs() <= LOGIT_TOL as f64);
        assert_eq!(
            wgllm::sampler::argmax(last) as u64,
            want["argmax"].as_u64().unwrap()
        );
        if all {
            for pos in p["all_positions"].as_array().unwrap() {
                let i = pos["pos"].as_u64().unwrap() as usize;
                let row = &out[i * vocab..(i + 1) * vocab];
                for pair in pos["top5"].as_array().unwrap() {
                    let (id, l) = (
                        pair[0].as_u64().unwrap() as usize,
                        pair[1].as_f64().unwrap() as f32,
                    );
                    assert!(
                        (row[id] - l).abs() <= LOGIT_TOL,
                        "position {i} id {id}: {} vs {l}",
                        row[id]
                    );
                }
                assert!(
                    (logsumexp(row) - pos["logsumexp"].as_f64().unwrap()).abs() <= LOGIT_TOL as f64
                );
            }
        }
        eprintln!("{}: max |logit error| {worst:.2e}", p["prompt"]);
    }
}

fn check_greedy(kv: KvDtype, runs: usize) {
    let Some((gpu, mut lm)) = model(kv, 256) else {
        return;
    };
    let gold = golden("smollm2_greedy.json");
    for r in gold["runs"].as_array().unwrap().iter().take(runs) {
        let prompt = ids_of(&r["prompt_ids"]);
        assert_eq!(
            lm.tokenizer
                .encode(r["prompt"].as_str().unwrap(), true)
                .unwrap(),
            prompt
        );
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
        assert_eq!(
            got,
            want,
            "greedy continuation of {:?} with a {kv} KV cache: {:?}",
            r["prompt"],
            lm.tokenizer.decode(&got)
        );
    }
}

/// `wgllm run --chat`'s path: the file's own ChatML template, the rendered prompt's ids, and a
/// greedy answer that ends at an end-of-turn token (`<|im_end|>`) well before the token limit.
#[test]
fn a_chat_turn_ends_at_its_end_of_turn_token() {
    let Some((gpu, mut lm)) = model(KvDtype::F32, 256) else {
        return;
    };
    let t = &lm.chat_template;
    assert_eq!(t.as_builtin(), None, "{}", t.origin());
    assert!(t.origin().ends_with("key 'tokenizer.chat_template'"));
    let args = RenderArgs::for_tokenizer(&lm.tokenizer, true);
    let text = t
        .render(
            &[Message::new("user", "What is the capital of France?")],
            &args,
        )
        .unwrap();
    assert!(text.ends_with("<|im_start|>assistant\n"), "{text:?}");
    let prompt = encode_prompt(&lm.tokenizer, &text).unwrap();
    let im_end = lm.tokenizer.token_id("<|im_end|>").unwrap();
    assert!(lm.tokenizer.is_stop(im_end));
    let mut sampler = Sampler::new(SamplerConfig {
        temperature: 0.0,
        ..Default::default()
    });
    let n = 64;
    let (got, stats) = generate(
        lm.model.as_mut(),
        gpu,
        &lm.tokenizer,
        &prompt,
        n,
        &mut sampler,
        &mut |_| true,
    )
    .unwrap();
    let answer = lm.tokenizer.decode(&got).unwrap();
    assert!(stats.stopped_at_eos && got.len() < n, "{answer:?}");
    assert_eq!(got.last(), Some(&im_end), "{answer:?}");
    assert!(answer.contains("Paris"), "{answer:?}");
}

#[test]
fn greedy_continuations_match_reference_f32_kv() {
    check_greedy(KvDtype::F32, 4);
}

#[test]
fn greedy_continuation_matches_with_f16_kv() {
    check_greedy(KvDtype::F16, 1);
}

/// The committed perplexity text's ids, checked against the reference's.
fn perplexity_ids(lm: &LoadedLm) -> Vec<u32> {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/models/goldens/perplexity.txt"
    ))
    .unwrap();
    let text = text.strip_suffix('\n').unwrap_or(&text);
    let ids = lm.tokenizer.encode(text, true).unwrap();
    assert_eq!(ids, ids_of(&golden("smollm2_perplexity.json")["ids"]));
    ids
}

/// `got` against a golden block's perplexity (0.1%), tokens scored and windows.
fn check_perplexity(got: &Perplexity, gold: &serde_json::Value, method: PplMethod) {
    let want = gold["ppl"].as_f64().unwrap();
    eprintln!(
        "{method:?}: perplexity {:.4} (reference {want}), windows {:?}",
        got.perplexity, got.window_mean_nll
    );
    assert_eq!(got.method, method);
    assert!(
        (got.perplexity - want).abs() / want <= 1e-3,
        "perplexity {} vs reference {want}",
        got.perplexity
    );
    let windows = gold
        .get("window_mean_nll")
        .or(gold.get("chunk_mean_nll"))
        .unwrap()
        .as_array()
        .unwrap();
    assert_eq!(got.window_mean_nll.len(), windows.len());
    for (g, w) in got.window_mean_nll.iter().zip(windows) {
        assert!((g - w.as_f64().unwrap()).abs() <= 5e-3, "{g} vs {w}");
    }
}

#[test]
fn perplexity_matches_reference() {
    let Some((gpu, mut lm)) = model(KvDtype::F32, 128) else {
        return;
    };
    let ids = perplexity_ids(&lm);
    let gold = golden("smollm2_perplexity.json");
    let got = perplexity(lm.model.as_mut(), gpu, &ids, 128, None).unwrap();
    check_perplexity(&got, &gold, PplMethod::Chunks);
    assert_eq!(got.scored, 3 * 63);

    // Strided: every token after the first scored once, with up to 128 tokens of context.
    let gold = &golden("smollm2_perplexity_strided.json")["strided"];
    let got = perplexity(lm.model.as_mut(), gpu, &ids, 128, Some(64)).unwrap();
    check_perplexity(&got, gold, PplMethod::Strided);
    assert_eq!(got.scored, ids.len() - 1);
    assert_eq!(got.stride, Some(64));
}

/// A text shorter than the context (402 tokens, ctx 2048) is scored in one window, not refused.
#[test]
fn perplexity_of_a_short_text_is_one_window() {
    let Some((gpu, mut lm)) = model(KvDtype::F32, 2048) else {
        return;
    };
    let ids = perplexity_ids(&lm);
    let gold = &golden("smollm2_perplexity_strided.json")["window"];
    let got = perplexity(lm.model.as_mut(), gpu, &ids, 2048, None).unwrap();
    check_perplexity(&got, gold, PplMethod::Window);
    assert_eq!(got.scored, ids.len() - 1);

    // What cannot be scored is refused with the reason, before anything runs.
    for (tokens, ctx, stride) in [
        (&ids[..1], 2048, None),
        (&ids[..], 4096, None),
        (&ids[..], 128, Some(128)),
        (&ids[..], 128, Some(0)),
    ] {
        let e = perplexity(lm.model.as_mut(), gpu, tokens, ctx, stride).unwrap_err();
        assert!(matches!(e, wgllm::Error::InvalidArgument { .. }), "{e}");
    }
}

#[test]
fn prompt_past_the_context_is_refused() {
    let Some((gpu, mut lm)) = model(KvDtype::F16, 16) else {
        return;
    };
    let e = lm.model.forward(gpu, &[1u32; 17], 0).unwrap_err();
    assert!(
        matches!(
            e,
            wgllm::Error::ContextFull {
                ctx: 16,
                needed: 17
            }
        ),
        "{e}"
    );
    let e = lm.model.forward(gpu, &[49152], 0).unwrap_err();
    assert!(!matches!(e, wgllm::Error::ContextFull { .. }), "{e}");
}

/// `wgllm tokenize` prints the reference tokenizer's ids and the vocabulary's own pieces for
/// every committed case (as llama-tokenize does), reading only the vocabulary.
#[test]
fn tokenize_command_prints_the_reference_ids_and_pieces() {
    let Some(path) = packaged_model(&wgllm::fetch::SMOLLM2) else {
        return;
    };
    let gold = golden("smollm2_tokens.json");
    for case in gold["cases"].as_array().unwrap().iter().take(12) {
        let text = case["text"].as_str().unwrap();
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_wgllm"));
        cmd.arg("tokenize").arg("-m").arg(&path).arg(text);
        if case["parse_special"] == false {
            cmd.arg("--no-parse-special");
        }
        let out = cmd.output().expect("running wgllm");
        assert!(out.status.success(), "{text:?}");
        let lines: Vec<(u32, String)> = String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(|l| {
                let (id, piece) = l.split_once(" -> ").expect("id -> piece");
                (
                    id.trim().parse().unwrap(),
                    serde_json::from_str(piece).expect("a quoted piece"),
                )
            })
            .collect();
        let ids: Vec<u32> = lines.iter().map(|l| l.0).collect();
        assert_eq!(ids, ids_of(&case["ids"]), "{text:?}");
        if let Some(tokens) = case["tokens"].as_array() {
            let pieces: Vec<&str> = lines.iter().map(|l| l.1.as_str()).collect();
            let want: Vec<&str> = tokens.iter().filter_map(|t| t.as_str()).collect();
            assert_eq!(pieces, want, "{text:?}");
        }
    }
}

/// `wgllm profile --parallel 2 --json`: batched decode steps of both slots, with the GPU time of
/// each op a step (the matrix products among them) and a wall time a step.
#[test]
fn profile_of_batched_steps_reports_every_op() {
    let Some(path) = packaged_model(&wgllm::fetch::SMOLLM2) else {
        return;
    };
    if gpu().is_none_or(|g| !g.caps.timestamps) {
        return;
    }
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_wgllm"))
        .args([
            "profile",
            "--parallel",
            "2",
            "-p",
            "3",
            "-n",
            "2",
            "-c",
            "64",
            "--json",
            "-m",
        ])
        .arg(&path)
        .output()
        .expect("running wgllm");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(v["slots"], 2);
    let step = &v["decode_batch"];
    assert_eq!(step["steps"], 2);
    assert!(step["seconds_per_step"].as_f64().unwrap() > 0.0);
    let ops = step["ops_ms_per_step"].as_array().unwrap();
    let kernels: Vec<&str> = ops.iter().filter_map(|o| o[0].as_str()).collect();
    assert!(
        kernels.iter().any(|k| k.starts_with("matvec")),
        "{kernels:?}"
    );
    assert!(ops
        .iter()
        .all(|o| o[1].as_f64().unwrap() >= 0.0 && o[2].as_f64().unwrap() > 0.0));
}
