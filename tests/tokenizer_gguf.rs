//! GGUF tokenizers against independent references on the same vocabularies
//! (models/reference/tokenizer_vectors.py writes tests/data/tokenizer/*.json):
//!
//! - Gemma 3 270M's SentencePiece vocabulary (262,144 tokens), against Google's `sentencepiece`
//!   built from the file's tokens, scores and types;
//! - SmolLM2's byte-level BPE (`smollm`), against Hugging Face `tokenizers` built from the file;
//! - Llama 3.2 (`llama-bpe`) and Qwen2.5 (`qwen2`), against the models' own tokenizer.json: the
//!   test writes a vocabulary-only GGUF from that tokenizer.json, reads it back through the GGUF
//!   loader, and runs `wgllm tokenize` on the file too; the same GGUFs also pass llama.cpp's own
//!   test-tokenizer-0 vectors for these vocabularies (tests/data/tokenizer/llamacpp-*).
//!
//! And the vocabularies wgllm must refuse: each a typed error naming the file and the key.

mod common;
use common::*;

use std::path::{Path, PathBuf};

use serde_json::Value as Json;
use wgllm::loader::{Array, Gguf, Value};
use wgllm::tokenizer::{GgufVocab, Tokenizer};
use wgllm::Error;

fn vectors(name: &str) -> Json {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/tokenizer")
        .join(format!("{name}.json"));
    serde_json::from_str(&std::fs::read_to_string(&p).expect("vectors")).expect("vector JSON")
}

/// Compares every case; returns how many there were. Also decodes each parsed case back to its
/// text (after the BOS the encoder put first).
fn check(tok: &Tokenizer, name: &str) -> usize {
    let v = vectors(name);
    let cases = v["cases"].as_array().expect("cases");
    let mut failures = Vec::new();
    for c in cases {
        let text = c["text"].as_str().unwrap();
        let add = c["add_special"].as_bool().unwrap();
        let special = c["parse_special"].as_bool().unwrap();
        let want = ids_of(&c["ids"]);
        let got = tok.encode_with(text, add, special).unwrap();
        if got != want {
            failures.push(format!(
                "{name}: {text:?} (add_special {add}, parse_special {special}):\n  got  {got:?}\n  want {want:?}"
            ));
            continue;
        }
        let body = match (add && tok.add_bos, got.first()) {
            (true, Some(&b)) if Some(b) == tok.bos => &got[1..],
            _ => &got[..],
        };
        if special {
            assert_eq!(
                tok.decode(body).unwrap(),
                text,
                "{name}: decode of {text:?}"
            );
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    cases.len()
}

fn open_vocab(path: &Path) -> Tokenizer {
    let g = Gguf::open(path).expect("GGUF");
    Tokenizer::from_gguf(&GgufVocab::from_gguf(&g).expect("vocab")).expect("tokenizer")
}

#[test]
fn gemma3_sentencepiece_ids_match_sentencepiece() {
    let Some(path) = packaged_model(&wgllm::fetch::GEMMA3_270M) else {
        return;
    };
    let tok = open_vocab(&path);
    assert!(tok.is_sentencepiece());
    assert_eq!(tok.vocab_size(), 262_144);
    // The file: add_bos_token true, add_space_prefix false.
    assert_eq!((tok.bos, tok.add_bos, tok.add_eos), (Some(2), true, false));
    assert_eq!(tok.encode("Hello", false).unwrap(), vec![9259]); // "Hello", not "▁Hello"
    let n = check(&tok, "gemma3");
    assert!(n >= 50, "{n} cases");
    // <end_of_turn> ends a turn; <start_of_turn> does not.
    let eot = tok.token_id("<end_of_turn>").unwrap();
    assert!(tok.is_stop(eot) && !tok.is_stop(tok.token_id("<start_of_turn>").unwrap()));
}

/// A 10 KB text encodes and round-trips. The time is printed, never asserted.
#[test]
fn gemma3_long_text_round_trips() {
    let Some(path) = packaged_model(&wgllm::fetch::GEMMA3_270M) else {
        return;
    };
    let tok = open_vocab(&path);
    let unit = "Tokenizers split text into pieces: 12,345 words, 日本語, émojis 🎉, code { x += 1; }\n\tand   spaces.  ";
    let text: String = unit.repeat(10_240 / unit.len() + 1);
    let t = std::time::Instant::now();
    let ids = tok.encode_with(&text, false, true).unwrap();
    eprintln!(
        "gemma3: {} bytes -> {} tokens in {:.1} ms",
        text.len(),
        ids.len(),
        t.elapsed().as_secs_f64() * 1e3
    );
    assert_eq!(tok.decode(&ids).unwrap(), text);
    // Whitespace runs are user-defined tokens cut out first, so each unit's words encode alike:
    // the ids of the text are those of the unit, repeated, give or take the joins.
    let unit_ids = tok.encode_with(unit, false, true).unwrap();
    let per_unit = ids.len() as f64 / (text.len() as f64 / unit.len() as f64);
    assert!(
        (per_unit - unit_ids.len() as f64).abs() < 2.0,
        "{per_unit} vs {}",
        unit_ids.len()
    );
}

#[test]
fn smollm2_bpe_ids_match_hf_tokenizers() {
    let Some(path) = packaged_model(&wgllm::fetch::SMOLLM2) else {
        return;
    };
    let tok = open_vocab(&path);
    assert!(!tok.is_sentencepiece());
    assert!(check(&tok, "smollm2") >= 45);
}

// ---- vocabulary-only GGUFs -------------------------------------------------------------------

fn put_str(b: &mut Vec<u8>, s: &str) {
    b.extend_from_slice(&(s.len() as u64).to_le_bytes());
    b.extend_from_slice(s.as_bytes());
}

fn put_value(b: &mut Vec<u8>, v: &Value) {
    b.extend_from_slice(&v.type_id().to_le_bytes());
    match v {
        Value::U32(x) => b.extend_from_slice(&x.to_le_bytes()),
        Value::Bool(x) => b.push(*x as u8),
        Value::String(s) => put_str(b, s),
        Value::Array(a) => {
            b.extend_from_slice(&a.elem_type_id().to_le_bytes());
            b.extend_from_slice(&(a.len() as u64).to_le_bytes());
            match a {
                Array::String(v) => v.iter().for_each(|s| put_str(b, s)),
                Array::I32(v) => v.iter().for_each(|x| b.extend_from_slice(&x.to_le_bytes())),
                Array::F32(v) => v.iter().for_each(|x| b.extend_from_slice(&x.to_le_bytes())),
                other => panic!("writer lacks {other:?}"),
            }
        }
        other => panic!("writer lacks {other:?}"),
    }
}

/// A GGUF v3 image with metadata only: no tensors, as llama.cpp's `ggml-vocab-*.gguf` are.
fn vocab_gguf(kvs: &[(&str, Value)]) -> Vec<u8> {
    let mut b = b"GGUF".to_vec();
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&0u64.to_le_bytes());
    b.extend_from_slice(&(kvs.len() as u64).to_le_bytes());
    for (k, v) in kvs {
        put_str(&mut b, k);
        put_value(&mut b, v);
    }
    b.resize(b.len().next_multiple_of(32), 0);
    b
}

fn strings(v: Vec<String>) -> Value {
    Value::Array(Array::String(v))
}

/// The `tokenizer.ggml.*` keys llama.cpp's converter writes for a byte-level BPE tokenizer.json:
/// tokens by id, merges as "a b", added tokens CONTROL when special and USER_DEFINED otherwise.
fn kvs_from_tokenizer_json(
    path: &Path,
    pre: &str,
    bos: &str,
    eos: &str,
    add_bos: bool,
) -> Vec<(&'static str, Value)> {
    let j: Json = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let vocab = j["model"]["vocab"].as_object().unwrap();
    let added = j["added_tokens"].as_array().unwrap();
    let n = vocab
        .values()
        .map(|v| v.as_u64().unwrap())
        .chain(added.iter().map(|a| a["id"].as_u64().unwrap()))
        .max()
        .unwrap() as usize
        + 1;
    let mut tokens: Vec<String> = (0..n).map(|i| format!("[PAD{i}]")).collect();
    let mut types = vec![5i32; n]; // UNUSED until named
    for (t, id) in vocab {
        tokens[id.as_u64().unwrap() as usize] = t.clone();
        types[id.as_u64().unwrap() as usize] = 1;
    }
    for a in added {
        let id = a["id"].as_u64().unwrap() as usize;
        tokens[id] = a["content"].as_str().unwrap().to_string();
        types[id] = if a["special"].as_bool().unwrap() {
            3
        } else {
            4
        };
    }
    let merges: Vec<String> = j["model"]["merges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| match m {
            Json::String(s) => s.clone(),
            Json::Array(p) => format!("{} {}", p[0].as_str().unwrap(), p[1].as_str().unwrap()),
            other => panic!("merge {other}"),
        })
        .collect();
    let id = |t: &str| tokens.iter().position(|x| x == t).unwrap() as u32;
    let (bos, eos) = (id(bos), id(eos));
    vec![
        ("general.architecture", Value::String("llama".into())),
        ("tokenizer.ggml.model", Value::String("gpt2".into())),
        ("tokenizer.ggml.pre", Value::String(pre.into())),
        ("tokenizer.ggml.tokens", strings(tokens)),
        ("tokenizer.ggml.token_type", Value::Array(Array::I32(types))),
        ("tokenizer.ggml.merges", strings(merges)),
        ("tokenizer.ggml.bos_token_id", Value::U32(bos)),
        ("tokenizer.ggml.eos_token_id", Value::U32(eos)),
        ("tokenizer.ggml.add_bos_token", Value::Bool(add_bos)),
    ]
}

fn temp_file(name: &str, bytes: &[u8]) -> PathBuf {
    let p = std::env::temp_dir().join(format!("wgllm-tok-{}-{name}", std::process::id()));
    std::fs::write(&p, bytes).unwrap();
    p
}

/// Builds the vocabulary-only GGUF, checks the vectors, and checks `wgllm tokenize --ids` on the
/// file prints the same ids as the library for the vectors' special-token case.
fn vocab_only(m: &wgllm::fetch::PackagedModel, name: &str, kvs: Vec<(&str, Value)>) {
    let gguf = temp_file(&format!("{name}.gguf"), &vocab_gguf(&kvs));
    let tok = open_vocab(&gguf);
    assert!(check(&tok, name) >= 45, "{}", m.id);
    check_llamacpp(&tok, name);
    let text = vectors(name)["cases"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| c["text"].as_str())
        .find(|t| t.contains("<|"))
        .unwrap()
        .to_string();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_wgllm"))
        .args(["tokenize", "--ids", "-m"])
        .arg(&gguf)
        .arg(&text)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ids = tok.encode(&text, true).unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), format!("{ids:?}\n"));
    // One line per token, `id -> "piece"`; --no-bos drops what add_special adds, and
    // --no-parse-special spells the control tokens out.
    let lines = |args: &[&str]| -> Vec<String> {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_wgllm"))
            .arg("tokenize")
            .args(args)
            .arg("-m")
            .arg(&gguf)
            .arg(&text)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect()
    };
    let shown = lines(&[]);
    assert_eq!(shown.len(), ids.len());
    for (line, id) in shown.iter().zip(&ids) {
        let piece = serde_json::to_string(&tok.piece(*id).unwrap()).unwrap();
        assert_eq!(line.trim_start(), format!("{id} -> {piece}"));
    }
    let bare = tok.encode_with(&text, false, true).unwrap();
    assert_eq!(lines(&["--no-bos"]).len(), bare.len());
    let plain = tok.encode_with(&text, false, false).unwrap();
    assert!(plain.len() > bare.len());
    assert_eq!(
        lines(&["--no-bos", "--no-parse-special"]).len(),
        plain.len()
    );
    let _ = std::fs::remove_file(&gguf);
}

/// llama.cpp's own vectors for the same vocabulary (its `models/ggml-vocab-{llama-bpe,qwen2}.gguf
/// .inp/.out`, made by its convert_hf_to_gguf_update.py from the models' tokenizer.json, MIT
/// licensed; copied from llama-cpp-python 0.3.36's vendor/llama.cpp): texts separated by
/// `\n__ggml_vocab_test__\n`, one line of ids per text, tokenized as test-tokenizer-0 does
/// (no BOS, special tokens not parsed).
fn check_llamacpp(tok: &Tokenizer, name: &str) {
    let file = match name {
        "llama3" => "llamacpp-llama-bpe",
        _ => "llamacpp-qwen2",
    };
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/tokenizer");
    let read = |ext: &str| std::fs::read_to_string(dir.join(format!("{file}.{ext}"))).unwrap();
    let (inp, out) = (read("inp"), read("out"));
    let texts: Vec<&str> = inp.split("\n__ggml_vocab_test__\n").collect();
    let ids: Vec<&str> = out.lines().collect();
    // The .inp ends with a separator and nothing after it: one text fewer than pieces.
    assert_eq!(texts.len(), ids.len() + 1, "{file}");
    for (text, line) in texts.iter().zip(&ids) {
        let want: Vec<u32> = line
            .split_whitespace()
            .map(|x| x.parse().unwrap())
            .collect();
        assert_eq!(
            tok.encode_with(text, false, false).unwrap(),
            want,
            "{file}: {text:?}"
        );
    }
}

#[test]
fn llama3_vocabulary_only_gguf_matches_tokenizer_json() {
    let Some(json) = packaged_model(&wgllm::fetch::LLAMA3_VOCAB) else {
        return;
    };
    let kvs = kvs_from_tokenizer_json(&json, "llama-bpe", "<|begin_of_text|>", "<|eot_id|>", true);
    vocab_only(&wgllm::fetch::LLAMA3_VOCAB, "llama3", kvs);
}

#[test]
fn qwen2_vocabulary_only_gguf_matches_tokenizer_json() {
    let Some(json) = packaged_model(&wgllm::fetch::QWEN2_VOCAB) else {
        return;
    };
    let kvs = kvs_from_tokenizer_json(&json, "qwen2", "<|endoftext|>", "<|im_end|>", false);
    vocab_only(&wgllm::fetch::QWEN2_VOCAB, "qwen2", kvs);
}

// ---- bad input ---------------------------------------------------------------------------------

/// A small valid byte-level BPE vocabulary: the 256 byte characters, "ab", "abc" and `<|s|>`.
fn tiny_bpe() -> Vec<(&'static str, Value)> {
    let mut tokens: Vec<String> = (0u32..256)
        .map(|b| {
            let printable = (33..=126).contains(&b) || (161..=172).contains(&b) || b >= 174;
            let cp = if printable {
                b
            } else {
                256 + (0..b)
                    .filter(|&x| !((33..=126).contains(&x) || (161..=172).contains(&x) || x >= 174))
                    .count() as u32
            };
            char::from_u32(cp).unwrap().to_string()
        })
        .collect();
    tokens.extend(["ab".into(), "abc".into(), "<|s|>".into()]);
    let mut types = vec![1i32; tokens.len()];
    *types.last_mut().unwrap() = 3;
    vec![
        ("tokenizer.ggml.model", Value::String("gpt2".into())),
        ("tokenizer.ggml.pre", Value::String("gpt-2".into())),
        ("tokenizer.ggml.tokens", strings(tokens)),
        ("tokenizer.ggml.token_type", Value::Array(Array::I32(types))),
        (
            "tokenizer.ggml.merges",
            strings(vec!["a b".into(), "ab c".into()]),
        ),
    ]
}

fn with(
    mut kvs: Vec<(&'static str, Value)>,
    key: &'static str,
    v: Value,
) -> Vec<(&'static str, Value)> {
    kvs.retain(|(k, _)| *k != key);
    kvs.push((key, v));
    kvs
}

fn build(name: &str, kvs: &[(&str, Value)]) -> wgllm::Result<Tokenizer> {
    let g = Gguf::from_bytes(name, vocab_gguf(kvs))?;
    Tokenizer::from_gguf(&GgufVocab::from_gguf(&g)?)
}

fn expect_vocab_error(name: &str, kvs: &[(&str, Value)], key: &str, says: &str) {
    match build(name, kvs) {
        Err(Error::Vocab {
            file,
            key: k,
            reason,
        }) => {
            assert_eq!(file, name);
            assert_eq!(k, key, "{reason}");
            assert!(reason.contains(says), "{name}: {reason:?} lacks {says:?}");
            let msg = Error::Vocab {
                file,
                key: k,
                reason,
            }
            .to_string();
            assert!(msg.contains(name) && msg.contains(key), "{msg}");
        }
        Err(e) => panic!("{name}: expected Error::Vocab for {key}, got {e}"),
        Ok(_) => panic!("{name}: expected Error::Vocab for {key}, got a tokenizer"),
    }
}

#[test]
fn the_tiny_vocabulary_is_valid() {
    let tok = build("tiny.gguf", &tiny_bpe()).unwrap();
    assert_eq!(
        tok.encode("abc<|s|>ab", false).unwrap(),
        vec![257, 258, 256]
    );
    assert_eq!(tok.decode(&[257, 258, 256]).unwrap(), "abc<|s|>ab");
    // Without parse_special the control token's text is plain bytes.
    let plain = tok.encode_with("<|s|>", false, false).unwrap();
    assert_eq!(plain.len(), 5);
    // Bytes outside ASCII go through GPT-2's byte characters and come back.
    let e = tok.encode("é ☃", false).unwrap();
    assert_eq!(e.len(), 6); // 2 + 1 (space) + 3 bytes, no merges among them
    assert_eq!(tok.decode(&e).unwrap(), "é ☃");
    // add_bos_token / add_eos_token as the file says.
    let kvs = with(tiny_bpe(), "tokenizer.ggml.bos_token_id", Value::U32(258));
    let kvs = with(kvs, "tokenizer.ggml.eos_token_id", Value::U32(256));
    let kvs = with(kvs, "tokenizer.ggml.add_eos_token", Value::Bool(true));
    let t = build("eos.gguf", &kvs).unwrap();
    assert_eq!(t.encode("abc", true).unwrap(), vec![257, 256]);
    assert_eq!(t.encode("abc", false).unwrap(), vec![257]);
    let t = build(
        "bos.gguf",
        &with(kvs, "tokenizer.ggml.add_bos_token", Value::Bool(true)),
    )
    .unwrap();
    assert_eq!(t.encode("abc", true).unwrap(), vec![258, 257, 256]);
    // An absent pre-tokenizer is llama.cpp's warned fallback to "default", not an error.
    let mut kvs = tiny_bpe();
    kvs.retain(|(k, _)| *k != "tokenizer.ggml.pre");
    assert_eq!(
        build("nopre.gguf", &kvs)
            .unwrap()
            .encode("abc", false)
            .unwrap(),
        vec![257]
    );
}

#[test]
fn an_unknown_pre_tokenizer_is_a_typed_error() {
    let kvs = with(
        tiny_bpe(),
        "tokenizer.ggml.pre",
        Value::String("no-such-pre".into()),
    );
    expect_vocab_error("pre.gguf", &kvs, "tokenizer.ggml.pre", "no-such-pre");
}

#[test]
fn an_unknown_tokenizer_model_is_a_typed_error() {
    let kvs = with(
        tiny_bpe(),
        "tokenizer.ggml.model",
        Value::String("rwkv".into()),
    );
    expect_vocab_error("model.gguf", &kvs, "tokenizer.ggml.model", "rwkv");
}

#[test]
fn merges_naming_unknown_tokens_are_a_typed_error() {
    let kvs = with(
        tiny_bpe(),
        "tokenizer.ggml.merges",
        strings(vec!["a b".into(), "ab zz".into()]),
    );
    expect_vocab_error("merges.gguf", &kvs, "tokenizer.ggml.merges", "\"zz\"");
    let kvs = with(
        tiny_bpe(),
        "tokenizer.ggml.merges",
        strings(vec!["ab".into()]),
    );
    expect_vocab_error("merges2.gguf", &kvs, "tokenizer.ggml.merges", "space");
    let mut kvs = tiny_bpe();
    kvs.retain(|(k, _)| *k != "tokenizer.ggml.merges");
    expect_vocab_error("merges3.gguf", &kvs, "tokenizer.ggml.merges", "absent");
}

#[test]
fn token_arrays_of_the_wrong_length_are_typed_errors() {
    let kvs = with(
        tiny_bpe(),
        "tokenizer.ggml.token_type",
        Value::Array(Array::I32(vec![1; 10])),
    );
    expect_vocab_error(
        "types.gguf",
        &kvs,
        "tokenizer.ggml.token_type",
        "10 token types",
    );
    // SentencePiece: scores shorter than the tokens, and no scores at all.
    let spm = with(
        tiny_bpe(),
        "tokenizer.ggml.model",
        Value::String("llama".into()),
    );
    let kvs = with(
        spm.clone(),
        "tokenizer.ggml.scores",
        Value::Array(Array::F32(vec![0.0; 5])),
    );
    expect_vocab_error("scores.gguf", &kvs, "tokenizer.ggml.scores", "5 scores");
    expect_vocab_error("noscores.gguf", &spm, "tokenizer.ggml.scores", "absent");
    // An empty token list.
    let kvs = with(tiny_bpe(), "tokenizer.ggml.tokens", strings(Vec::new()));
    let kvs = with(
        kvs,
        "tokenizer.ggml.token_type",
        Value::Array(Array::I32(Vec::new())),
    );
    expect_vocab_error("empty.gguf", &kvs, "tokenizer.ggml.tokens", "empty");
    // add_bos_token without a BOS id.
    let kvs = with(
        tiny_bpe(),
        "tokenizer.ggml.add_bos_token",
        Value::Bool(true),
    );
    expect_vocab_error(
        "bos.gguf",
        &kvs,
        "tokenizer.ggml.add_bos_token",
        "bos_token_id",
    );
}
