//! Chat templates of real models (llama.cpp's `models/templates`, see
//! tests/data/chat_templates/README.md) render a plain conversation, within a small fraction of
//! the default limits; a model file's broken template is a typed error that names the file and
//! the key; a model without a template gets the built-in for its vocabulary.

use std::path::{Path, PathBuf};
use std::time::{Duration, UNIX_EPOCH};

use wgllm::error::TemplateFailure;
use wgllm::model::chat::{Builtin, ChatTemplate, Limits, Message, RenderArgs};
use wgllm::Error;

const LAST_USER: &str = "What is the capital of France?";

fn templates_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/chat_templates")
}

/// Every `.jinja` file, sorted by name.
fn templates() -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = std::fs::read_dir(templates_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "jinja"))
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read_to_string(&p).unwrap())
        })
        .collect();
    out.sort();
    out
}

/// System, user, assistant, user.
fn plain() -> Vec<Message> {
    vec![
        Message::new("system", "You are a terse assistant."),
        Message::new("user", "Hello!"),
        Message::new("assistant", "Hi. How can I help?"),
        Message::new("user", LAST_USER),
    ]
}

/// Templates that refuse a system message and say so with `raise_exception`: the message they
/// raise. They get the same conversation without it.
const NO_SYSTEM_ROLE: &[(&str, &str)] =
    &[("google-gemma-2-2b-it.jinja", "System role not supported")];

fn args() -> RenderArgs {
    RenderArgs {
        add_generation_prompt: true,
        bos_token: "<s>".into(),
        eos_token: "</s>".into(),
    }
}

/// Fuel of 1% of the default: real templates need far less for a conversation, which leaves
/// the default a wide margin.
fn tight() -> Limits {
    Limits {
        fuel: Limits::default().fuel / 100,
        ..Limits::default()
    }
}

/// 2024-08-01 for the templates that print today's date.
fn now() -> std::time::SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_722_470_400)
}

/// The conversation a template gets: [`plain`], less the system message for the templates in
/// [`NO_SYSTEM_ROLE`] (after checking that they do refuse it, with their documented message).
fn conversation_for(name: &str, t: &ChatTemplate) -> Vec<Message> {
    let mut messages = plain();
    if let Some((_, raised)) = NO_SYSTEM_ROLE.iter().find(|(n, _)| *n == name) {
        match t.render(&messages, &args()) {
            Err(Error::ChatTemplate {
                kind: TemplateFailure::Raised,
                reason,
                ..
            }) if reason == *raised => {}
            other => panic!("{name}: expected it to raise {raised:?}, got {other:?}"),
        }
        messages.remove(0);
    }
    messages
}

#[test]
fn every_template_renders_a_plain_conversation() {
    let all = templates();
    assert_eq!(all.len(), 70, "templates in {}", templates_dir().display());
    let mut failures = Vec::new();
    for (name, src) in &all {
        let t = ChatTemplate::new(name.as_str(), src.as_str())
            .with_limits(tight())
            .with_now(now());
        let messages = conversation_for(name, &t);
        match t.render(&messages, &args()) {
            Ok(out) if out.contains(LAST_USER) => {}
            Ok(out) => failures.push(format!(
                "{name}: the output lacks the last message: {out:?}"
            )),
            Err(e) => failures.push(format!("{name}: {e}")),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} templates fail:\n{}",
        failures.len(),
        all.len(),
        failures.join("\n")
    );
}

/// Each template's output equals what Hugging Face's Jinja2 environment renders for the same
/// conversation and date (expected.json, from render_reference.py with jinja2 3.1.6), byte for
/// byte: the prompt a model gets is the one it was trained on.
#[test]
fn every_template_renders_as_transformers_does() {
    let text = std::fs::read_to_string(templates_dir().join("expected.json")).unwrap();
    let expected: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut diffs = Vec::new();
    for (name, src) in templates() {
        let want = expected[&name]
            .as_str()
            .unwrap_or_else(|| panic!("{name}: no reference output: {}", expected[&name]));
        let t = ChatTemplate::new(name.as_str(), src.as_str()).with_now(now());
        let got = t.render(&conversation_for(&name, &t), &args()).unwrap();
        if got != want {
            let at = got
                .char_indices()
                .zip(want.chars())
                .find(|((_, a), b)| a != b)
                .map_or(got.len().min(want.len()), |((i, _), _)| i);
            let around = |s: &str| {
                s.get(at.saturating_sub(40)..)
                    .unwrap_or(s)
                    .chars()
                    .take(80)
                    .collect::<String>()
            };
            diffs.push(format!(
                "{name}: differs at byte {at}:\n  got:  {:?}\n  want: {:?}",
                around(&got),
                around(want)
            ));
        }
    }
    assert!(
        diffs.is_empty(),
        "{} differ:\n{}",
        diffs.len(),
        diffs.join("\n")
    );
}

/// A GGUF metadata value, as `write_gguf` writes it.
enum Meta<'a> {
    Str(&'a str),
    Strs(Vec<&'a str>),
    I32s(Vec<i32>),
}

/// A GGUF file with no tensors and a small byte-level BPE vocabulary (its chat tokens are control
/// tokens), plus `extra` string keys.
fn write_gguf(name: &str, extra: &[(&str, &str)]) -> PathBuf {
    fn put_str(b: &mut Vec<u8>, s: &str) {
        b.extend_from_slice(&(s.len() as u64).to_le_bytes());
        b.extend_from_slice(s.as_bytes());
    }
    const I32: u32 = 5;
    const STRING: u32 = 8;
    const ARRAY: u32 = 9;
    let tokens = vec!["<|endoftext|>", "<|im_start|>", "<|im_end|>", "a", "b"];
    let types = tokens
        .iter()
        .map(|t| if t.starts_with('<') { 3 } else { 1 })
        .collect();
    let mut kv = vec![
        ("general.architecture", Meta::Str("llama")),
        ("tokenizer.ggml.model", Meta::Str("gpt2")),
        ("tokenizer.ggml.tokens", Meta::Strs(tokens)),
        ("tokenizer.ggml.merges", Meta::Strs(vec![])),
        ("tokenizer.ggml.token_type", Meta::I32s(types)),
    ];
    kv.extend(extra.iter().map(|&(k, v)| (k, Meta::Str(v))));
    let mut b = b"GGUF".to_vec();
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&0u64.to_le_bytes()); // tensors
    b.extend_from_slice(&(kv.len() as u64).to_le_bytes());
    for (key, value) in &kv {
        put_str(&mut b, key);
        match value {
            Meta::Str(s) => {
                b.extend_from_slice(&STRING.to_le_bytes());
                put_str(&mut b, s);
            }
            Meta::Strs(v) => {
                b.extend_from_slice(&ARRAY.to_le_bytes());
                b.extend_from_slice(&STRING.to_le_bytes());
                b.extend_from_slice(&(v.len() as u64).to_le_bytes());
                v.iter().for_each(|s| put_str(&mut b, s));
            }
            Meta::I32s(v) => {
                b.extend_from_slice(&ARRAY.to_le_bytes());
                b.extend_from_slice(&I32.to_le_bytes());
                b.extend_from_slice(&(v.len() as u64).to_le_bytes());
                v.iter().for_each(|x| b.extend_from_slice(&x.to_le_bytes()));
            }
        }
    }
    let path = std::env::temp_dir().join(format!("wgllm-chat-{name}-{}.gguf", std::process::id()));
    std::fs::write(&path, b).unwrap();
    path
}

/// A model file whose template does not compile, or fails while rendering, gives a typed error
/// that names the file and the key it came from.
#[test]
fn a_broken_template_in_a_model_file_is_a_typed_error_naming_file_and_key() {
    let cases = [
        (
            "syntax",
            "{% for m in messages %}{{ m.content }}",
            TemplateFailure::Syntax,
        ),
        (
            "render",
            "{{ messages[0].content.no_such_method() }}",
            TemplateFailure::Render,
        ),
        (
            "raise",
            "{{ raise_exception('only user turns, please') }}",
            TemplateFailure::Raised,
        ),
    ];
    for (name, src, want) in cases {
        let path = write_gguf(name, &[("tokenizer.chat_template", src)]);
        let t = wgllm::model::load::chat_template_of(&path).unwrap();
        assert_eq!(t.as_builtin(), None);
        let err = t.render(&plain(), &args()).unwrap_err();
        let _ = std::fs::remove_file(&path);
        let text = err.to_string();
        match err {
            Error::ChatTemplate { origin, kind, .. } => {
                assert_eq!(kind, want, "{text}");
                assert_eq!(
                    origin,
                    format!("'{}' key 'tokenizer.chat_template'", path.display())
                );
            }
            other => panic!("{name}: expected a chat template error, got {other:?}"),
        }
        assert!(
            text.contains(&path.display().to_string()) && text.contains("tokenizer.chat_template"),
            "{text}"
        );
    }
}

/// Without a template the model gets the built-in its vocabulary suggests (ChatML for
/// `<|im_start|>`), and generation would stop at `<|im_end|>` as well as at `<|endoftext|>`.
#[test]
fn a_model_without_a_template_gets_the_builtin_for_its_vocabulary() {
    let path = write_gguf("builtin", &[]);
    let t = wgllm::model::load::chat_template_of(&path).unwrap();
    let g = wgllm::loader::gguf::Gguf::open(&path).unwrap();
    let tok = wgllm::tokenizer::Tokenizer::from_gguf(
        &wgllm::tokenizer::GgufVocab::from_gguf(&g).unwrap(),
    )
    .unwrap();
    let _ = std::fs::remove_file(&path);
    assert_eq!(t.as_builtin(), Some(Builtin::ChatMl));
    assert!(
        t.origin().contains("has no chat template") && t.origin().contains("<|im_start|>"),
        "{}",
        t.origin()
    );
    let out = t.render(&[Message::new("user", "hi")], &args()).unwrap();
    assert_eq!(
        out,
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    );
    assert_eq!(tok.stop_ids(), &[0, 2]);
}
