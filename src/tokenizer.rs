//! Tokenizers: `tokenizer.json` through the `tokenizers` crate, and the vocabularies GGUF files
//! embed in their metadata, built into the same crate's types so ids equal the reference
//! tokenizer's:
//!
//! - `tokenizer.ggml.model = "gpt2"`: byte-level BPE from `tokens` + `merges`, with the
//!   pre-tokenizer named by `tokenizer.ggml.pre` (SmolLM's splits digits one by one; Llama-3 and
//!   Qwen2 use their own split patterns); control and user-defined tokens become special tokens.
//! - `tokenizer.ggml.model = "llama"`: SentencePiece-style BPE over `tokens` + `scores` (merge the
//!   adjacent pair with the best-scoring result first, `▁` for spaces, `<0xXX>` byte fallback), as
//!   llama.cpp's SPM tokenizer does; implemented here since the crate has no score-ordered BPE.

use std::collections::HashMap;
use std::path::Path;

use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior};

use crate::error::{Error, Result};

/// GGUF token types (llama.cpp's `llama_token_type`).
pub mod token_type {
    pub const NORMAL: i32 = 1;
    pub const UNKNOWN: i32 = 2;
    pub const CONTROL: i32 = 3;
    pub const USER_DEFINED: i32 = 4;
    pub const UNUSED: i32 = 5;
    pub const BYTE: i32 = 6;
}

/// What a GGUF file says about its tokenizer.
#[derive(Debug, Clone, Default)]
pub struct GgufVocab {
    pub model: String,
    pub pre: Option<String>,
    pub tokens: Vec<String>,
    pub merges: Vec<String>,
    pub scores: Vec<f32>,
    pub token_types: Vec<i32>,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub add_bos: bool,
}

impl GgufVocab {
    /// Reads the `tokenizer.ggml.*` keys of a GGUF file.
    pub fn from_gguf(g: &crate::loader::gguf::Gguf) -> Result<GgufVocab> {
        let model = g.get_str("tokenizer.ggml.model")?.to_string();
        let tokens = g.get_str_array("tokenizer.ggml.tokens")?.to_vec();
        let n = tokens.len();
        let id = |k: &str| g.get_u32(k).ok().filter(|&v| (v as usize) < n);
        Ok(GgufVocab {
            pre: g.get_str("tokenizer.ggml.pre").ok().map(str::to_string),
            merges: g
                .get_str_array("tokenizer.ggml.merges")
                .map(|m| m.to_vec())
                .unwrap_or_default(),
            scores: g.get_f32_array("tokenizer.ggml.scores").unwrap_or_default(),
            token_types: g
                .get_i32_array("tokenizer.ggml.token_type")
                .unwrap_or_default(),
            bos: id("tokenizer.ggml.bos_token_id"),
            eos: id("tokenizer.ggml.eos_token_id"),
            // llama.cpp's default: SentencePiece vocabularies add BOS, BPE ones do not.
            add_bos: g
                .get_bool("tokenizer.ggml.add_bos_token")
                .unwrap_or(model == "llama"),
            model,
            tokens,
        })
    }
}

enum Inner {
    Hf(Box<tokenizers::Tokenizer>),
    Spm(Box<Spm>),
}

/// Tokens that end a model's turn, besides EOS: llama.cpp's end-of-generation list
/// (`llama_vocab::impl::load`), searched for by text because few files name them in metadata.
/// Chat models end an answer with their template's end-of-turn token (`<|im_end|>`,
/// `<|eot_id|>`, `<end_of_turn>`, ...), which is often not the file's EOS.
pub const END_OF_TURN_TOKENS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<|return|>",
    "<|call|>",
    "<|flush|>",
    "<|calls|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "</s>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "[EOT]",
    "[EOS]",
    "<|end_of_text|>",
    "<end_of_utterance>",
    "<eos>",
    "<turn|>",
    "<|tool_response>",
    "<\u{ff5c}end\u{2581}of\u{2581}sentence\u{ff5c}>",
    "[e~[",
];

/// A tokenizer with the special ids generation needs.
pub struct Tokenizer {
    inner: Inner,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    /// Whether a BOS token is put before the prompt.
    pub add_bos: bool,
    vocab_size: usize,
    /// Ids that end generation: EOS and the [`END_OF_TURN_TOKENS`] the vocabulary has.
    stop: Vec<u32>,
}

fn tok_err(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Tokenizer {
        reason: format!("{what}: {e}"),
    }
}

const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

fn split(pattern: &str) -> Result<PreTokenizerWrapper> {
    let s = Split::new(
        SplitPattern::Regex(pattern.into()),
        SplitDelimiterBehavior::Isolated,
        false,
    )
    .map_err(|e| tok_err("split pattern", e))?;
    Ok(s.into())
}

impl Tokenizer {
    /// Loads a Hugging Face `tokenizer.json`.
    pub fn from_file(path: &Path) -> Result<Tokenizer> {
        let mut t = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| tok_err(&format!("reading {}", path.display()), e))?;
        // One sequence at a time: fixed padding (MiniLM's pads to 128) would add [PAD] tokens.
        t.with_padding(None);
        let vocab_size = t.get_vocab_size(true);
        let id = |s: &str| t.token_to_id(s);
        let bos = id("[CLS]")
            .or_else(|| id("<s>"))
            .or_else(|| id("<|begin_of_text|>"));
        let eos = id("[SEP]")
            .or_else(|| id("</s>"))
            .or_else(|| id("<|end_of_text|>"))
            .or_else(|| id("<|endoftext|>"));
        Ok(Tokenizer {
            inner: Inner::Hf(Box::new(t)),
            bos,
            eos,
            add_bos: false,
            vocab_size,
            stop: Vec::new(),
        }
        .with_stops())
    }

    /// Builds the tokenizer a GGUF file describes.
    pub fn from_gguf(v: &GgufVocab) -> Result<Tokenizer> {
        let inner = match v.model.as_str() {
            "gpt2" => Inner::Hf(Box::new(byte_level_bpe(v)?)),
            "llama" => Inner::Spm(Box::new(Spm::new(v)?)),
            other => {
                return Err(Error::Tokenizer {
                    reason: format!("tokenizer model '{other}' is not supported (gpt2-style BPE and llama SentencePiece are)"),
                })
            }
        };
        Ok(Tokenizer {
            inner,
            bos: v.bos,
            eos: v.eos,
            add_bos: v.add_bos,
            vocab_size: v.tokens.len(),
            stop: Vec::new(),
        }
        .with_stops())
    }

    fn with_stops(mut self) -> Tokenizer {
        let mut stop: Vec<u32> = self.eos.into_iter().collect();
        stop.extend(END_OF_TURN_TOKENS.iter().filter_map(|t| self.token_id(t)));
        stop.sort_unstable();
        stop.dedup();
        self.stop = stop;
        self
    }

    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// The ids that end generation: EOS and the end-of-turn tokens in the vocabulary.
    pub fn stop_ids(&self) -> &[u32] {
        &self.stop
    }

    /// Whether generation ends at `id`.
    pub fn is_stop(&self, id: u32) -> bool {
        self.stop.contains(&id)
    }

    /// The id of the vocabulary token spelled `token` (special tokens included).
    pub fn token_id(&self, token: &str) -> Option<u32> {
        match &self.inner {
            Inner::Hf(t) => t.token_to_id(token),
            Inner::Spm(s) => s.ids.get(token).copied(),
        }
    }

    /// The vocabulary's spelling of token `id` (`<|im_end|>`, `</s>`), as chat templates get
    /// `bos_token` and `eos_token`.
    pub fn token_text(&self, id: u32) -> Option<String> {
        match &self.inner {
            Inner::Hf(t) => t.id_to_token(id),
            Inner::Spm(s) => s.tokens.get(id as usize).cloned(),
        }
    }

    /// Whether this is a SentencePiece (`tokenizer.ggml.model = "llama"`) vocabulary.
    pub fn is_sentencepiece(&self) -> bool {
        matches!(self.inner, Inner::Spm(_))
    }

    /// Token ids of `text`; special-token strings such as `<|im_start|>` map to their ids. A BOS is
    /// put first when the model asks for one and `add_bos` is true.
    pub fn encode(&self, text: &str, add_bos: bool) -> Result<Vec<u32>> {
        let mut ids = Vec::new();
        if add_bos && self.add_bos {
            ids.extend(self.bos);
        }
        match &self.inner {
            Inner::Hf(t) => {
                // add_special_tokens=true lets BERT's post-processor add [CLS]/[SEP]; the GGUF
                // tokenizers have no post-processor, so it only affects tokenizer.json models.
                let e = t.encode(text, true).map_err(|e| tok_err("encoding", e))?;
                ids.extend_from_slice(e.get_ids());
            }
            Inner::Spm(s) => ids.extend(s.encode(text)),
        }
        Ok(ids)
    }

    /// Sets the longest encoding (special tokens included); longer input is cut, as
    /// sentence-transformers cuts at its `max_seq_length`. `None` never cuts. Only tokenizer.json
    /// tokenizers carry such a limit.
    pub fn set_max_length(&mut self, max: Option<usize>) -> Result<()> {
        if let Inner::Hf(t) = &mut self.inner {
            let params = max.map(|max_length| tokenizers::TruncationParams {
                max_length,
                ..Default::default()
            });
            t.with_truncation(params)
                .map_err(|e| tok_err("setting the truncation", e))?;
        }
        Ok(())
    }

    /// Like [`Tokenizer::encode`], but with `parse_special = false` special-token strings are
    /// tokenized as plain text (for untrusted input that must not inject control tokens).
    pub fn encode_with(&self, text: &str, add_bos: bool, parse_special: bool) -> Result<Vec<u32>> {
        if parse_special {
            return self.encode(text, add_bos);
        }
        let mut ids = Vec::new();
        if add_bos && self.add_bos {
            ids.extend(self.bos);
        }
        match &self.inner {
            Inner::Hf(t) => {
                let mut plain = (**t).clone();
                plain.set_encode_special_tokens(true);
                ids.extend_from_slice(
                    plain
                        .encode(text, true)
                        .map_err(|e| tok_err("encoding", e))?
                        .get_ids(),
                );
            }
            Inner::Spm(s) => ids.extend(s.encode(text)),
        }
        Ok(ids)
    }

    /// Token `id`'s piece as the vocabulary writes it (`▁world`, `<0x0A>`, `Ġworld`), what
    /// llama-tokenize prints; `None` past the vocabulary.
    pub fn piece(&self, id: u32) -> Option<String> {
        match &self.inner {
            Inner::Hf(t) => t.id_to_token(id),
            Inner::Spm(s) => s.tokens.get(id as usize).cloned(),
        }
    }

    /// Text of `ids` (special tokens included).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        match &self.inner {
            Inner::Hf(t) => t.decode(ids, false).map_err(|e| tok_err("decoding", e)),
            Inner::Spm(s) => Ok(s.decode(ids)),
        }
    }
}

/// Streams text as tokens arrive, holding back incomplete UTF-8 sequences.
pub struct TextStream<'t> {
    tok: &'t Tokenizer,
    ids: Vec<u32>,
    emitted: usize,
}

impl<'t> TextStream<'t> {
    pub fn new(tok: &'t Tokenizer) -> Self {
        TextStream {
            tok,
            ids: Vec::new(),
            emitted: 0,
        }
    }

    /// Adds a token and returns the new text it completes, if any.
    pub fn push(&mut self, id: u32) -> Result<String> {
        self.ids.push(id);
        let text = self.tok.decode(&self.ids)?;
        if text.ends_with('\u{FFFD}') {
            return Ok(String::new());
        }
        let new = text.get(self.emitted..).unwrap_or("").to_string();
        self.emitted = text.len();
        Ok(new)
    }
}

fn byte_level_bpe(v: &GgufVocab) -> Result<tokenizers::Tokenizer> {
    let vocab: Vocab = v
        .tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect();
    let mut merges = Vec::with_capacity(v.merges.len());
    for m in &v.merges {
        let (a, b) = m.split_once(' ').ok_or_else(|| Error::Tokenizer {
            reason: format!("merge '{m}' has no space"),
        })?;
        merges.push((a.to_string(), b.to_string()));
    }
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| tok_err("building BPE", e))?;
    let mut t = tokenizers::Tokenizer::new(bpe);
    let byte_level = ByteLevel::new(false, false, true);
    let pre: PreTokenizerWrapper = match v.pre.as_deref().unwrap_or("default") {
        "smollm" | "starcoder" | "refact" => {
            Sequence::new(vec![Digits::new(true).into(), byte_level.into()]).into()
        }
        "llama3" | "llama-bpe" | "llama-v3" => Sequence::new(vec![
            split(LLAMA3_SPLIT)?,
            ByteLevel::new(false, false, false).into(),
        ])
        .into(),
        "qwen2" => Sequence::new(vec![
            split(QWEN2_SPLIT)?,
            ByteLevel::new(false, false, false).into(),
        ])
        .into(),
        "gpt2" | "default" | "gpt-2" => byte_level.into(),
        other => {
            log::warn!("unknown GGUF pre-tokenizer '{other}': using GPT-2 byte-level splitting");
            byte_level.into()
        }
    };
    t.with_pre_tokenizer(Some(pre));
    t.with_decoder(Some(ByteLevel::default()));
    let special: Vec<AddedToken> = v
        .tokens
        .iter()
        .zip(&v.token_types)
        .filter(|(_, &ty)| ty == token_type::CONTROL || ty == token_type::USER_DEFINED)
        .map(|(s, &ty)| AddedToken::from(s.clone(), ty == token_type::CONTROL))
        .collect();
    t.add_special_tokens(&special);
    Ok(t)
}

/// SentencePiece-style BPE by scores (llama.cpp's SPM tokenizer).
struct Spm {
    ids: HashMap<String, u32>,
    tokens: Vec<String>,
    scores: Vec<f32>,
    types: Vec<i32>,
    byte_ids: [Option<u32>; 256],
    unk: u32,
}

impl Spm {
    fn new(v: &GgufVocab) -> Result<Spm> {
        if v.scores.len() != v.tokens.len() {
            return Err(Error::Tokenizer {
                reason: format!("{} scores for {} tokens", v.scores.len(), v.tokens.len()),
            });
        }
        let ids: HashMap<String, u32> = v
            .tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let mut byte_ids = [None; 256];
        for (b, slot) in byte_ids.iter_mut().enumerate() {
            *slot = ids.get(&format!("<0x{b:02X}>")).copied();
        }
        let unk = ids.get("<unk>").copied().unwrap_or(0);
        let types = if v.token_types.len() == v.tokens.len() {
            v.token_types.clone()
        } else {
            vec![token_type::NORMAL; v.tokens.len()]
        };
        Ok(Spm {
            ids,
            tokens: v.tokens.clone(),
            scores: v.scores.clone(),
            types,
            byte_ids,
            unk,
        })
    }

    fn encode(&self, text: &str) -> Vec<u32> {
        if text.is_empty() {
            return Vec::new();
        }
        // SentencePiece adds a dummy prefix space and writes spaces as U+2581.
        let norm = format!("\u{2581}{}", text.replace(' ', "\u{2581}"));
        let mut syms: Vec<String> = norm.chars().map(|c| c.to_string()).collect();
        loop {
            let mut best: Option<(usize, f32)> = None;
            for i in 0..syms.len().saturating_sub(1) {
                let cand = format!("{}{}", syms[i], syms[i + 1]);
                if let Some(&id) = self.ids.get(&cand) {
                    let s = self.scores[id as usize];
                    if best.is_none_or(|(_, bs)| s > bs) {
                        best = Some((i, s));
                    }
                }
            }
            let Some((i, _)) = best else { break };
            let right = syms.remove(i + 1);
            syms[i].push_str(&right);
        }
        let mut out = Vec::new();
        for s in syms {
            match self.ids.get(&s) {
                Some(&id) => out.push(id),
                None => {
                    for b in s.bytes() {
                        out.push(self.byte_ids[b as usize].unwrap_or(self.unk));
                    }
                }
            }
        }
        out
    }

    fn decode(&self, ids: &[u32]) -> String {
        let mut bytes = Vec::new();
        for &id in ids {
            let Some(t) = self.tokens.get(id as usize) else {
                continue;
            };
            if self.types.get(id as usize) == Some(&token_type::BYTE) {
                if let Ok(b) =
                    u8::from_str_radix(t.trim_start_matches("<0x").trim_end_matches('>'), 16)
                {
                    bytes.push(b);
                    continue;
                }
            }
            bytes.extend_from_slice(t.replace('\u{2581}', " ").as_bytes());
        }
        let s = String::from_utf8_lossy(&bytes).into_owned();
        s.strip_prefix(' ').map(str::to_string).unwrap_or(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spm_vocab() -> GgufVocab {
        let mut tokens: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
        let mut types = vec![
            token_type::UNKNOWN,
            token_type::CONTROL,
            token_type::CONTROL,
        ];
        for b in 0..=255u8 {
            tokens.push(format!("<0x{b:02X}>"));
            types.push(token_type::BYTE);
        }
        for t in [
            "\u{2581}",
            "h",
            "e",
            "l",
            "o",
            "\u{2581}h",
            "he",
            "ll",
            "llo",
            "hello",
            "\u{2581}hello",
        ] {
            tokens.push(t.into());
            types.push(token_type::NORMAL);
        }
        let scores = (0..tokens.len()).map(|i| i as f32).collect();
        GgufVocab {
            model: "llama".into(),
            tokens,
            scores,
            token_types: types,
            bos: Some(1),
            eos: Some(2),
            add_bos: true,
            ..Default::default()
        }
    }

    #[test]
    fn spm_merges_by_score_and_falls_back_to_bytes() {
        let t = Tokenizer::from_gguf(&spm_vocab()).unwrap();
        let ids = t.encode("hello", true).unwrap();
        let last = (t.vocab_size() - 1) as u32; // "▁hello" has the best score
        assert_eq!(ids, vec![1, last]);
        assert_eq!(t.decode(&ids[1..]).unwrap(), "hello");
        // 'é' is not in the vocabulary: two byte tokens.
        let ids = t.encode("é", false).unwrap();
        assert_eq!(t.decode(&ids).unwrap(), "é");
        assert_eq!(ids.len(), 3); // "▁" + 2 bytes
    }

    /// Generation stops at EOS and at every end-of-turn token the vocabulary has, whatever its
    /// id, and at nothing else.
    #[test]
    fn stop_ids_are_eos_and_the_end_of_turn_tokens_present() {
        let mut v = spm_vocab();
        let base = v.tokens.len() as u32;
        for t in [
            "<start_of_turn>",
            "<end_of_turn>",
            "<|im_end|>",
            "<|eot_id|>",
            "<|end|>",
        ] {
            v.tokens.push(t.into());
            v.token_types.push(token_type::CONTROL);
            v.scores.push(0.0);
        }
        let t = Tokenizer::from_gguf(&v).unwrap();
        // </s> (2, the EOS) and the four end-of-turn tokens; <start_of_turn> does not stop.
        assert_eq!(t.stop_ids(), &[2, base + 1, base + 2, base + 3, base + 4]);
        assert!(t.is_stop(base + 2) && !t.is_stop(base) && !t.is_stop(1));
        assert_eq!(t.token_id("<|im_end|>"), Some(base + 2));
        assert_eq!(t.token_text(base + 3).as_deref(), Some("<|eot_id|>"));
        assert!(t.is_sentencepiece());
        // Without an EOS the end-of-turn tokens still stop.
        v.eos = None;
        let t = Tokenizer::from_gguf(&v).unwrap();
        assert_eq!(t.stop_ids(), &[2, base + 1, base + 2, base + 3, base + 4]);
        v.tokens[2] = "<eos-renamed>".into();
        let t = Tokenizer::from_gguf(&v).unwrap();
        assert_eq!(t.stop_ids(), &[base + 1, base + 2, base + 3, base + 4]);
    }

    #[test]
    fn unknown_model_is_a_typed_error() {
        let v = GgufVocab {
            model: "rwkv".into(),
            ..Default::default()
        };
        assert!(matches!(
            Tokenizer::from_gguf(&v),
            Err(Error::Tokenizer { .. })
        ));
    }
}
