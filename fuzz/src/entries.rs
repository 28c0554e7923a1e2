//! What each fuzz target does with its input, as plain functions of bytes. The fuzz targets call
//! them, and so does `tests/fuzz_regressions.rs` (this file is included there by path, so it uses
//! nothing but `wgllm`, `serde_json` and `std`). Each returns the typed error of the step that
//! refused the input, if one did; the steps after a refusal are not run. Anything else a target
//! checks (a panic, an allocation past `alloc::allowed`, a broken invariant) is a finding.

use std::time::{Duration, SystemTime};

use wgllm::kernels::weights::WeightStorage;
use wgllm::loader::{Gguf, HfModel};
use wgllm::model::chat::{ChatTemplate, Limits, Message, RenderArgs};
use wgllm::model::config::ModelConfig;
use wgllm::tokenizer::{GgufVocab, TextStream, Tokenizer};
use wgllm::Error;

/// The name the fuzzed GGUF image has in errors.
pub const GGUF_NAME: &str = "fuzz.gguf";
/// The directory the fuzzed safetensors model has in errors.
pub const HF_DIR: &str = "fuzz-model";
/// Where the fuzzed chat template comes from, in errors.
pub const TEMPLATE_ORIGIN: &str = "fuzz chat template";

/// Text every tokenizer a GGUF image describes is run over: ASCII, accents, CJK, an emoji, a
/// control character and special-token lookalikes.
const SAMPLE_TEXT: &str = "Hello world! It's 3.14 \u{e9}t\u{e9} \u{4f60}\u{597d} \u{1f600}\t\n\
    \u{7} <s></s><|im_start|>user<|im_end|> <start_of_turn>";

/// Opens `data` as a GGUF file and reads it as loading a model, planning it and tokenizing with
/// it do: every metadata value, the LLaMA-family config, the parameter bytes and type table of
/// the memory plan, the vocabulary and its tokenizer, and every tensor decoded and converted to
/// its upload format.
pub fn gguf(data: &[u8]) -> Result<(), Error> {
    let g = Gguf::from_bytes(GGUF_NAME, data.to_vec())?;
    for (_, v) in g.metadata_entries() {
        let _ = v.describe();
    }
    if let Ok((cfg, _ctx)) = wgllm::model::llama::config_from_gguf(&g) {
        config_uses(&cfg);
    }
    let storage = WeightStorage::buffers(128 << 20);
    let _ = wgllm::plan::gguf_parameter_bytes(&g, storage);
    let _ = wgllm::plan::types::gguf_type_table(&g, storage);
    let _ = g.conversion_summary();
    if let Ok(v) = GgufVocab::from_gguf(&g) {
        if let Ok(tok) = Tokenizer::from_gguf(&v) {
            let n = tok.vocab_size() as u32;
            let ids = [0, 1, 2, n / 2, n.saturating_sub(1), n, u32::MAX];
            tokenizer_uses(&tok, SAMPLE_TEXT, &ids, true, true);
        }
    }
    for t in g.tensors() {
        let _ = g.tensor_bytes(&t.name);
        let _ = g.tensor_f32(&t.name);
        let _ = g.tensor_weight(&t.name);
    }
    Ok(())
}

/// What the planner and the parameter count read from a config.
fn config_uses(cfg: &ModelConfig) {
    let _ = wgllm::model::params::count(cfg);
    for l in 0..cfg.n_layers.min(64) {
        let _ = cfg.layer_window(l);
        let _ = cfg.layer_rope(l);
    }
}

/// `data` is a `config.json`, then (after a 0xFF byte, which UTF-8 JSON never holds) a
/// `model.safetensors` image: the config is read as [`ModelConfig::from_hf_json`] reads it, and
/// the directory opened with [`HfModel::from_bytes`], every tensor read back.
pub fn safetensors(data: &[u8]) -> Result<(), Error> {
    let (config, weights) = match data.iter().position(|&b| b == 0xFF) {
        Some(i) => (&data[..i], Some(&data[i + 1..])),
        None => (data, None),
    };
    if let Ok(json) = serde_json::from_slice::<serde_json::Value>(config) {
        if let Ok(cfg) = ModelConfig::from_hf_json(&json) {
            config_uses(&cfg);
        }
    }
    let Some(weights) = weights else {
        return Ok(());
    };
    let m = HfModel::from_bytes(HF_DIR, config, weights.to_vec())?;
    for name in m.tensor_names() {
        let shape = m.tensor_shape(name)?.to_vec();
        let _ = m.tensor_dtype(name)?;
        m.expect_shape(name, &shape)?;
        let _ = m.tensor_bytes(name)?;
        let _ = m.tensor_f32(name);
    }
    Ok(())
}

/// The two vocabularies of tests/data/fuzz/vocab (made by fuzz/make_seeds.py): the first 3,000
/// tokens of Gemma 3's SentencePiece vocabulary, and the first 2,000 of SmolLM2's byte-level BPE
/// with the merges among them.
pub const SPM_VOCAB: &[u8] = include_bytes!("../../tests/data/fuzz/vocab/spm.gguf");
pub const BPE_VOCAB: &[u8] = include_bytes!("../../tests/data/fuzz/vocab/bpe.gguf");

/// The tokenizer of a vocabulary-only GGUF image.
pub fn vocab_tokenizer(name: &str, gguf: &[u8]) -> Result<Tokenizer, Error> {
    let g = Gguf::from_bytes(name, gguf.to_vec())?;
    Tokenizer::from_gguf(&GgufVocab::from_gguf(&g)?)
}

/// `data`: a flag byte (bit 0: the BPE vocabulary, else SentencePiece; bit 1: add BOS/EOS;
/// bit 2: parse special tokens), then bytes that are both the text to encode (as UTF-8, invalid
/// sequences replaced) and, two bytes at a time, the ids to decode (taken modulo the vocabulary
/// size plus 64, so that some are past it; 0xFFFF is u32::MAX). Encoding then decoding text
/// without special tokens must give the text back.
pub fn tokenizer(spm: &Tokenizer, bpe: &Tokenizer, data: &[u8]) -> Result<(), String> {
    let Some((&flags, payload)) = data.split_first() else {
        return Ok(());
    };
    let tok = if flags & 1 == 0 { spm } else { bpe };
    let (add, special) = (flags & 2 != 0, flags & 4 != 0);
    let text = String::from_utf8_lossy(payload);
    let n = tok.vocab_size() as u32 + 64;
    let ids: Vec<u32> = payload
        .chunks(2)
        .map(
            |c| match u16::from_le_bytes([c[0], *c.get(1).unwrap_or(&0)]) {
                0xFFFF => u32::MAX,
                v => u32::from(v) % n,
            },
        )
        .collect();
    tokenizer_uses(tok, &text, &ids, add, special);
    // SentencePiece writes spaces as U+2581 and decodes U+2581 as a space, so there the text comes
    // back with the two alike (and a U+2581 the vocabulary has no piece for comes back from its
    // byte tokens as itself, as llama.cpp decodes it).
    let same = |a: &str, b: &str| {
        if tok.is_sentencepiece() {
            a.replace('\u{2581}', " ") == b.replace('\u{2581}', " ")
        } else {
            a == b
        }
    };
    let round_trip = |text: &str| -> Result<(Vec<u32>, String), String> {
        let encoded = tok
            .encode_with(text, false, false)
            .map_err(|e| format!("encode of {text:?}: {e}"))?;
        let decoded = tok
            .decode(&encoded)
            .map_err(|e| format!("decode of {encoded:?}: {e}"))?;
        Ok((encoded, decoded))
    };
    let (encoded, decoded) = round_trip(&text)?;
    // A byte-level BPE vocabulary may lack some bytes (SmolLM2's has no token for 0x06, among
    // 21): they are dropped, as llama.cpp drops them. The text must come back whole when each of
    // its characters does on its own.
    let mut whole = true;
    for c in text.chars() {
        let c = c.to_string();
        whole &= same(&round_trip(&c)?.1, &c);
    }
    if whole && !same(&decoded, &text) {
        return Err(format!(
            "{text:?} encodes to {encoded:?}, which decodes to {decoded:?}"
        ));
    }
    Ok(())
}

/// Encoding `text`, decoding `ids` at once and one by one (as streaming output does), and the
/// per-token lookups.
fn tokenizer_uses(tok: &Tokenizer, text: &str, ids: &[u32], add: bool, special: bool) {
    let _ = tok.encode_with(text, add, special);
    let _ = tok.decode(ids);
    let mut stream = TextStream::new(tok);
    for &id in ids {
        let _ = stream.push(id);
        let _ = tok.piece(id);
        let _ = tok.token_text(id);
        let _ = tok.is_stop(id);
    }
}

/// The limits the chat target renders with: the defaults, but a shorter deadline, so that a
/// render that runs into it ends well within libFuzzer's timeout.
pub fn chat_limits() -> Limits {
    Limits {
        deadline: Duration::from_secs(2),
        ..Limits::default()
    }
}

/// `data`: a flag byte (bit 0: add_generation_prompt), the template (UTF-8, invalid sequences
/// replaced), a 0xFF byte, then the messages: role, content, role, content, ... separated by NUL
/// bytes. Renders with [`chat_limits`]; the output must be within their size.
pub fn chat_template(data: &[u8]) -> Result<String, Error> {
    let Some((&flags, rest)) = data.split_first() else {
        return Ok(String::new());
    };
    let (source, messages) = match rest.iter().position(|&b| b == 0xFF) {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, &[][..]),
    };
    let parts: Vec<String> = messages
        .split(|&b| b == 0)
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .collect();
    let messages: Vec<Message> = parts
        .chunks(2)
        .map(|c| Message::new(c[0].clone(), c.get(1).cloned().unwrap_or_default()))
        .collect();
    let args = RenderArgs {
        add_generation_prompt: flags & 1 != 0,
        bos_token: "<s>".into(),
        eos_token: "</s>".into(),
    };
    let limits = chat_limits();
    let out = ChatTemplate::new(TEMPLATE_ORIGIN, String::from_utf8_lossy(source))
        .with_limits(limits)
        .with_now(SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000))
        .render(&messages, &args)?;
    assert!(
        out.len() <= limits.max_output,
        "{} bytes of output past the limit of {}",
        out.len(),
        limits.max_output
    );
    Ok(out)
}
