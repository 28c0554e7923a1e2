//! Replays the fuzz targets' committed inputs through the functions the targets call
//! (`fuzz/src/entries.rs`, included here by path, so this runs on stable without a fuzzer): the
//! seeds of `fuzz/corpus/<target>/` and every finding, minimised, in
//! `tests/data/fuzz/<target>/` (RELIABILITY.md lists them). Each input ends in success or a typed
//! error that names its file, with no panic, and the GGUF and safetensors readers stay within the
//! targets' allocation bound (`fuzz/src/alloc.rs`). Also: hostile chat templates end in a limit
//! error, and hostile vocabularies load or are refused with an error naming the file and key.

#[path = "../fuzz/src/alloc.rs"]
mod alloc;
#[path = "../fuzz/src/entries.rs"]
mod entries;

use std::path::Path;

use wgllm::error::TemplateFailure;
use wgllm::loader::Gguf;
use wgllm::tokenizer::{GgufVocab, Tokenizer};
use wgllm::Error;

#[global_allocator]
static ALLOC: alloc::Counting = alloc::Counting;

/// The seeds and the findings of `target`, sorted by path.
fn cases(target: &str) -> Vec<(String, Vec<u8>)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut out = Vec::new();
    for dir in ["fuzz/corpus", "tests/data/fuzz"] {
        let Ok(entries) = std::fs::read_dir(root.join(dir).join(target)) else {
            continue;
        };
        for e in entries {
            let path = e.unwrap().path();
            let bytes = std::fs::read(&path).unwrap();
            out.push((path.display().to_string(), bytes));
        }
    }
    out.sort();
    out
}

/// Runs `f` on every case of the targets, with the allocation bound; `check` judges the result.
fn replay<R>(
    targets: &[&str],
    min_cases: usize,
    f: impl Fn(&[u8]) -> R,
    check: impl Fn(&str, R) -> Result<(), String>,
) {
    let mut failures = Vec::new();
    let mut n = 0;
    for target in targets {
        for (name, bytes) in cases(target) {
            n += 1;
            let (r, peak) = alloc::peak_of(|| f(&bytes));
            if let Err(e) = alloc::within_bound(&name, bytes.len(), peak) {
                failures.push(e);
            }
            if let Err(e) = check(&name, r) {
                failures.push(e);
            }
        }
    }
    assert!(n >= min_cases, "only {n} cases for {targets:?}");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Success, or an error whose message names `file`.
fn names_file(file: &str) -> impl Fn(&str, Result<(), Error>) -> Result<(), String> + '_ {
    move |name, r| match r {
        Err(e) if !e.to_string().contains(file) => {
            Err(format!("{name}: the error does not name {file}: {e}"))
        }
        _ => Ok(()),
    }
}

#[test]
fn gguf_cases_end_in_success_or_a_typed_error() {
    // gguf_structured's findings are committed as the GGUF files their recipes wrote.
    replay(
        &["gguf", "gguf_structured"],
        10,
        entries::gguf,
        names_file(entries::GGUF_NAME),
    );
}

#[test]
fn safetensors_cases_end_in_success_or_a_typed_error() {
    replay(
        &["safetensors"],
        10,
        entries::safetensors,
        names_file(entries::HF_DIR),
    );
}

#[test]
fn tokenizer_cases_round_trip() {
    let spm = entries::vocab_tokenizer("spm.gguf", entries::SPM_VOCAB).unwrap();
    let bpe = entries::vocab_tokenizer("bpe.gguf", entries::BPE_VOCAB).unwrap();
    assert!(spm.is_sentencepiece() && !bpe.is_sentencepiece());
    replay(
        &["tokenizer"],
        10,
        |data| entries::tokenizer(&spm, &bpe, data),
        |name, r| r.map_err(|e| format!("{name}: {e}")),
    );
}

#[test]
fn chat_template_cases_render_or_fail_typed() {
    let failures = std::sync::Mutex::new(Vec::new());
    for (name, bytes) in cases("chat_template") {
        match entries::chat_template(&bytes) {
            Ok(_) => {}
            Err(Error::ChatTemplate { origin, .. }) if origin == entries::TEMPLATE_ORIGIN => {}
            Err(e) => failures.lock().unwrap().push(format!("{name}: {e}")),
        }
    }
    let failures = failures.into_inner().unwrap();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// `template` rendered by the chat target's entry, with two messages.
fn render(template: &str) -> Result<String, Error> {
    let mut data = vec![1u8];
    data.extend_from_slice(template.as_bytes());
    data.extend_from_slice(b"\xffuser\x00hi\x00assistant\x00hello");
    entries::chat_template(&data)
}

fn limit_kind(template: &str) -> TemplateFailure {
    match render(template) {
        Err(Error::ChatTemplate { kind, .. }) => kind,
        other => panic!("{template}: {other:?}"),
    }
}

#[test]
fn hostile_templates_stop_at_a_limit() {
    let limit = TemplateFailure::Limit;
    // Recursion, output size, fuel.
    assert_eq!(
        limit_kind("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}"),
        limit
    );
    assert_eq!(limit_kind("{{ 'x' * 100000000 }}"), limit);
    assert_eq!(
        limit_kind(
            "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
        ),
        limit
    );
    // Values built by join, tojson and Python's string methods, larger than the output may be,
    // refused as they grow (the sequences are lazy: 10^9 items, never materialised).
    assert_eq!(
        limit_kind("{% set x = ([1] * 1000000000)|join(',') %}"),
        limit
    );
    assert_eq!(limit_kind("{% set x = ([1] * 1000000000)|tojson %}"), limit);
    assert_eq!(
        limit_kind("{% set s = 'x' * 10000000 %}{% set t = s.replace('x', 'yy') %}"),
        limit
    );
    // Nothing but the messages: no files, no Python internals.
    assert!(render("{% include 'other' %}").is_err());
    assert_eq!(
        render("{{ messages.__class__ }}{{ range.__globals__ }}").unwrap(),
        ""
    );
    // What the limits leave alone renders as before.
    assert_eq!(
        render("{% for m in messages %}{{ m.role }}:{{ m.content }};{% endfor %}{{ [1,2]|join('-') }}{{ {'a': [1]}|tojson }}").unwrap(),
        "user:hi;assistant:hello;1-2{\"a\": [1]}"
    );
}

// ---- hostile vocabularies -------------------------------------------------------------------

const FILE: &str = "hostile-vocab.gguf";

fn put_str(b: &mut Vec<u8>, s: &[u8]) {
    b.extend_from_slice(&(s.len() as u64).to_le_bytes());
    b.extend_from_slice(s);
}

/// A vocabulary-only GGUF: `tokenizer.ggml.model`, the tokens (raw bytes, so that they may be
/// invalid UTF-8), their types and scores, one merge, and BOS/EOS ids 0 and 1.
fn vocab_gguf(model: &str, tokens: &[&[u8]], types: &[i32]) -> Vec<u8> {
    let mut b = b"GGUF".to_vec();
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&0u64.to_le_bytes());
    b.extend_from_slice(&7u64.to_le_bytes());
    put_str(&mut b, b"tokenizer.ggml.merges");
    b.extend_from_slice(&9u32.to_le_bytes());
    b.extend_from_slice(&8u32.to_le_bytes());
    b.extend_from_slice(&1u64.to_le_bytes());
    put_str(&mut b, b"<0x41> <0x42>");
    put_str(&mut b, b"tokenizer.ggml.model");
    b.extend_from_slice(&8u32.to_le_bytes());
    put_str(&mut b, model.as_bytes());
    put_str(&mut b, b"tokenizer.ggml.tokens");
    b.extend_from_slice(&9u32.to_le_bytes());
    b.extend_from_slice(&8u32.to_le_bytes());
    b.extend_from_slice(&(tokens.len() as u64).to_le_bytes());
    for t in tokens {
        put_str(&mut b, t);
    }
    put_str(&mut b, b"tokenizer.ggml.token_type");
    b.extend_from_slice(&9u32.to_le_bytes());
    b.extend_from_slice(&5u32.to_le_bytes());
    b.extend_from_slice(&(types.len() as u64).to_le_bytes());
    for t in types {
        b.extend_from_slice(&t.to_le_bytes());
    }
    // Scores: longer tokens first, as SentencePiece's merges prefer them.
    put_str(&mut b, b"tokenizer.ggml.scores");
    b.extend_from_slice(&9u32.to_le_bytes());
    b.extend_from_slice(&6u32.to_le_bytes());
    b.extend_from_slice(&(tokens.len() as u64).to_le_bytes());
    for t in tokens {
        b.extend_from_slice(&(t.len() as f32).to_le_bytes());
    }
    for (key, id) in [
        ("tokenizer.ggml.bos_token_id", 0u32),
        ("tokenizer.ggml.eos_token_id", 1),
    ] {
        put_str(&mut b, key.as_bytes());
        b.extend_from_slice(&4u32.to_le_bytes());
        b.extend_from_slice(&id.to_le_bytes());
    }
    b
}

fn load(model: &str, tokens: &[&[u8]], types: &[i32]) -> Result<Tokenizer, Error> {
    let g = Gguf::from_bytes(FILE, vocab_gguf(model, tokens, types))?;
    Tokenizer::from_gguf(&GgufVocab::from_gguf(&g)?)
}

fn refused(model: &str, tokens: &[&[u8]], types: &[i32]) -> Error {
    match load(model, tokens, types) {
        Ok(_) => panic!("a {model} vocabulary of {} tokens loaded", tokens.len()),
        Err(e) => e,
    }
}

/// Fails unless `e` names the file and `key`.
fn names_file_and_key(e: &Error, key: &str) {
    let s = e.to_string();
    assert!(s.contains(FILE) && s.contains(key), "{s}");
}

/// Byte tokens `<0x00>`..`<0xFF>` (type 6) after `head`, for SentencePiece's byte fallback, and
/// the token of [`vocab_gguf`]'s merge.
fn with_bytes(head: &[&[u8]], head_type: i32) -> (Vec<Vec<u8>>, Vec<i32>) {
    let mut tokens: Vec<Vec<u8>> = head.iter().map(|t| t.to_vec()).collect();
    let mut types = vec![head_type; head.len()];
    types[0] = 3;
    types[1] = 3;
    for b in 0..=255u8 {
        tokens.push(format!("<0x{b:02X}>").into_bytes());
        types.push(6);
    }
    // What the one merge makes.
    tokens.push(b"<0x41><0x42>".to_vec());
    types.push(1);
    (tokens, types)
}

#[test]
fn absurd_and_control_token_strings_load_and_round_trip() {
    let long = vec![b'a'; 1 << 20];
    let head: Vec<&[u8]> = vec![
        b"<s>",
        b"</s>",
        &long,
        b"",
        b"\x00",
        b"\x1b[2J",
        b"\r\n\t",
        "\u{2581}\u{2581}".as_bytes(),
        "\u{202e}rtl".as_bytes(),
        b"<0xZZ>",
    ];
    let (tokens, types) = with_bytes(&head, 1);
    let refs: Vec<&[u8]> = tokens.iter().map(Vec::as_slice).collect();
    for model in ["llama", "gpt2"] {
        let tok = load(model, &refs, &types).unwrap_or_else(|e| panic!("{model}: {e}"));
        assert_eq!(tok.vocab_size(), tokens.len());
        let text = format!(
            "\u{0}\u{1b}[2J\r\n\t {} \u{202e}rtl <0xZZ> \u{7f}",
            "a".repeat(5000)
        );
        let ids = tok.encode_with(&text, false, false).unwrap();
        let back = tok.decode(&ids).unwrap();
        if model == "llama" {
            // The space prefix comes back as a space: the vocabulary has no lone U+2581, so it
            // went out as byte tokens (the BPE vocabulary here is not byte-level, and drops
            // what it cannot spell, as llama.cpp does).
            assert_eq!(back.replace('\u{2581}', " "), format!(" {text}"), "{model}");
        }
        // Every id, in range or not, decodes without a panic; the long token decodes whole.
        let all: Vec<u32> = (0..tok.vocab_size() as u32 + 3).collect();
        assert!(tok.decode(&all).unwrap().contains(&"a".repeat(1 << 20)));
    }
}

#[test]
fn duplicate_tokens_load_and_the_last_spelling_wins() {
    let (tokens, types) = with_bytes(&[b"<s>", b"</s>", b"ab", b"cd", b"ab", b"</s>"], 1);
    let refs: Vec<&[u8]> = tokens.iter().map(Vec::as_slice).collect();
    for model in ["llama", "gpt2"] {
        let tok = load(model, &refs, &types).unwrap_or_else(|e| panic!("{model}: {e}"));
        // llama.cpp's token_to_id keeps the last id of a spelling.
        assert_eq!(tok.token_id("ab"), Some(4), "{model}");
        assert_eq!(tok.decode(&[2, 3, 4]).unwrap(), "abcdab", "{model}");
    }
}

#[test]
fn invalid_utf8_tokens_are_refused_naming_the_file_and_key() {
    let (tokens, types) = with_bytes(&[b"<s>", b"</s>", b"ok", b"bad\xff\xfe"], 1);
    let refs: Vec<&[u8]> = tokens.iter().map(Vec::as_slice).collect();
    let e = refused("llama", &refs, &types);
    assert!(matches!(e, Error::BadFile { .. }), "{e:?}");
    names_file_and_key(&e, "tokenizer.ggml.tokens");
}

#[test]
fn broken_vocabularies_are_refused_naming_the_file_and_key() {
    let (tokens, types) = with_bytes(&[b"<s>", b"</s>", b"a"], 1);
    let refs: Vec<&[u8]> = tokens.iter().map(Vec::as_slice).collect();
    // One type fewer than tokens.
    let e = refused("llama", &refs, &types[1..]);
    assert!(matches!(e, Error::Vocab { .. }), "{e:?}");
    names_file_and_key(&e, "tokenizer.ggml.token_type");
    // No tokens at all.
    let e = refused("gpt2", &[], &[]);
    names_file_and_key(&e, "tokenizer.ggml.tokens");
    // A model nobody knows.
    let e = refused("t5", &refs, &types);
    names_file_and_key(&e, "tokenizer.ggml.model");
}

// ---- string growth in templates -------------------------------------------------------------

/// Templates that grow a value geometrically: every path that builds text or a sequence from
/// parts (`~`, `+`, `*`, `join`, `replace`, `format`, `indent`, Python's methods, macro results
/// and captured blocks, list concatenation and repetition). Each doubles its value in a loop of 64
/// iterations (2^64 bytes if nothing stopped it) or asks for one huge value at once.
const GROWTH: &[&str] = &[
    "{% set s = namespace(v='ab') %}{% for i in range(64) %}{% set s.v = s.v ~ s.v %}{% endfor %}{{ s.v|length }}",
    "{% set s = namespace(v='ab') %}{% for i in range(64) %}{% set s.v = s.v + s.v %}{% endfor %}{{ s.v|length }}",
    "{% set s = namespace(v='ab') %}{% for i in range(64) %}{% set s.v = s.v * 2 %}{% endfor %}{{ s.v|length }}",
    "{% set s = namespace(v='ab') %}{% for i in range(64) %}{% set s.v = 2 * s.v %}{% endfor %}{{ s.v|length }}",
    "{% set s = namespace(v='ab') %}{% for i in range(64) %}{% set s.v = [s.v, s.v]|join %}{% endfor %}",
    "{% set s = namespace(v='ab') %}{% for i in range(64) %}{% set s.v = ''.join([s.v, s.v]) %}{% endfor %}",
    "{% set s = namespace(v='ab') %}{% for i in range(64) %}{% set s.v = s.v|replace('a', 'aa') %}{% endfor %}",
    "{% set s = namespace(v='ab') %}{% for i in range(64) %}{% set s.v = s.v.replace('ab', 'abab') %}{% endfor %}",
    "{% set s = namespace(v='ab') %}{% for i in range(64) %}{% set s.v = '%s%s'|format(s.v, s.v) %}{% endfor %}",
    "{% set s = namespace(v='ab') %}{% for i in range(64) %}{% set s.v = '{0}{0}'.format(s.v) %}{% endfor %}",
    "{% macro d(x) %}{{ x }}{{ x }}{% endmacro %}{% set s = namespace(v='ab') %}{% for i in range(64) %}{% set s.v = d(s.v) %}{% endfor %}",
    "{% set s = namespace(v='ab') %}{% for i in range(64) %}{% set t %}{{ s.v }}{{ s.v }}{% endset %}{% set s.v = t %}{% endfor %}",
    "{% set s = namespace(v=[1]) %}{% for i in range(64) %}{% set s.v = s.v + s.v %}{% endfor %}{{ s.v|length }}",
    "{% set s = namespace(v=[1]) %}{% for i in range(64) %}{% set s.v = s.v * 2 %}{% endfor %}{{ s.v|list|length }}",
    "{{ ('x\n' * 1000)|indent(100000000) }}",
    "{{ '{:>999999999}'.format('x') }}",
    "{{ '%999999999s'|format('x') }}",
    "{{ ([1] * 100000000) ~ '' }}",
    concat!(
        "{% set t %}{% for i in range(100000) %}{% for j in range(100) %}",
        "0123456789012345678901234567890123456789012345678901234567890123456789012345678901234567890123456789",
        "0123456789012345678901234567890123456789012345678901234567890123456789012345678901234567890123456789",
        "0123456789012345678901234567890123456789012345678901234567890123456789012345678901234567890123456789",
        "0123456789012345678901234567890123456789012345678901234567890123456789012345678901234567890123456789",
        "{% endfor %}{% endfor %}{% endset %}",
    ),
];

/// Each growth template ends with the typed limit error naming the limit it ran into (the value
/// limit or the budget of bytes built, both `Limits::max_output`), not the deadline (2 s here).
#[test]
fn template_string_growth_stops_at_the_output_limit() {
    for src in GROWTH {
        match render(src) {
            Err(Error::ChatTemplate {
                kind: TemplateFailure::Limit,
                reason,
                ..
            }) => assert!(reason.contains("Limits::max_output"), "{src}: {reason}"),
            other => panic!("{src}: {other:?}"),
        }
    }
}

/// The process's peak resident set (VmHWM), in bytes.
fn peak_rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("VmHWM")
        * 1024
}

const GROWTH_CASE: &str = "WGLLM_TEMPLATE_GROWTH_CASE";

/// Each growth template's peak memory, measured in a process of its own (this test run again
/// for one case, `GROWTH_CASE` naming it): the peak resident set with the render less the peak
/// without it stays below the render's budget of bytes built and emitted
/// (`BUILD_BUDGET_FACTOR` x the default 16 MiB output limit) and two values more.
#[test]
fn template_string_growth_peak_memory_is_bounded() {
    use wgllm::model::chat::{ChatTemplate, Limits, Message, RenderArgs, BUILD_BUDGET_FACTOR};
    let messages = [Message::new("user", "hi")];
    let render_case = |src: &str| {
        ChatTemplate::new("growth", src)
            .render(&messages, &RenderArgs::default())
            .map(|s| s.len())
    };
    if let Ok(case) = std::env::var(GROWTH_CASE) {
        let before = peak_rss();
        let r = match case.parse::<usize>() {
            Ok(i) => render_case(GROWTH[i]),
            Err(_) => render_case("{{ messages[0].content }}"),
        };
        println!(
            "growth-case {case} {before} {} {:?}",
            peak_rss(),
            r.map_err(|e| e.to_string())
        );
        return;
    }
    let max = Limits::default().max_output as u64;
    let bound = (BUILD_BUDGET_FACTOR as u64 + 2) * max;
    let exe = std::env::current_exe().unwrap();
    let measure = |case: String| -> (u64, String) {
        let out = std::process::Command::new(&exe)
            .args([
                "template_string_growth_peak_memory_is_bounded",
                "--exact",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(GROWTH_CASE, &case)
            .output()
            .expect("run the case");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let line = stdout
            .lines()
            .find_map(|l| Some(l.split_once(&format!("growth-case {case} "))?.1))
            .unwrap_or_else(|| panic!("case {case}: {stdout}"))
            .to_string();
        let mut f = line.splitn(3, ' ');
        let before: u64 = f.next().unwrap().parse().unwrap();
        let after: u64 = f.next().unwrap().parse().unwrap();
        (after.saturating_sub(before), f.next().unwrap().to_string())
    };
    let (base, r) = measure("baseline".into());
    assert!(r.starts_with("Ok("), "the baseline renders: {r}");
    let mut worst = 0;
    for (i, src) in GROWTH.iter().enumerate() {
        let (grew, r) = measure(i.to_string());
        assert!(r.contains("Limits::max_output"), "{src}: {r}");
        let grew = grew.saturating_sub(base);
        assert!(
            grew <= bound,
            "{src}: the peak resident set grew {grew} bytes (bound {bound})"
        );
        eprintln!("case {i}: peak resident set +{grew} bytes: {r}");
        worst = worst.max(grew);
    }
    eprintln!(
        "{} growth templates: peak resident set at most {worst} bytes above the baseline's \
         (bound {bound})",
        GROWTH.len()
    );
}
