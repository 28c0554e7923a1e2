//! Tokenizers: `tokenizer.json` through the `tokenizers` crate, and the vocabularies GGUF files
//! embed in their metadata, tokenized as llama.cpp tokenizes them (`src/llama-vocab.cpp`):
//!
//! - Special tokens first: control, user-defined and unknown tokens are cut out of the text,
//!   longest first (`Vocab::partition`, llama.cpp's `tokenizer_st_partition`); without
//!   `parse_special` only the user-defined ones are (Gemma's runs of spaces, tabs and newlines
//!   are user-defined tokens, and plain text must still reach them).
//! - `tokenizer.ggml.model = "llama"` (`spm.rs`): SentencePiece's score-ordered BPE over `tokens` +
//!   `scores`, spaces written `▁`, `<0xXX>` byte fallback, a space put before text that follows
//!   the start or a special token when `add_space_prefix` says so (Llama 2 does, Gemma 3 does not).
//! - `tokenizer.ggml.model = "gpt2"` (`bpe.rs`): byte-level BPE from `tokens` + `merges`, split
//!   first by the regular expressions llama.cpp keeps for `tokenizer.ggml.pre`.
//!
//! `add_bos_token`, `add_eos_token` and `add_space_prefix` are read from the file, with
//! llama.cpp's defaults where a key is absent. A vocabulary llama.cpp would refuse (an unknown
//! model or pre-tokenizer, token arrays shorter than the token list, merges of tokens that do not
//! exist) is an [`Error::Vocab`] naming the file and the key.

mod bpe;
mod spm;

use std::collections::HashMap;
use std::path::Path;

use crate::error::{Error, Result};

pub use bpe::PRE_TOKENIZERS;

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
    /// The file it came from, for errors.
    pub file: String,
    pub model: String,
    pub pre: Option<String>,
    pub tokens: Vec<String>,
    /// `tokenizer.ggml.merges` (BPE); `None` when absent.
    pub merges: Option<Vec<String>>,
    /// `tokenizer.ggml.scores`; empty when absent.
    pub scores: Vec<f32>,
    /// `tokenizer.ggml.token_type`; empty when absent (every token normal).
    pub token_types: Vec<i32>,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub unk: Option<u32>,
    /// Whether encoding with special tokens puts BOS first / EOS last.
    pub add_bos: bool,
    pub add_eos: bool,
    /// Whether SentencePiece text gets a leading space (`▁`) at the start and after specials.
    pub add_space_prefix: bool,
    /// `general.name` and `general.architecture`: llama.cpp sets a few tokens' whitespace
    /// stripping by them (Phi-3's special tokens eat the whitespace after them).
    pub model_name: Option<String>,
    pub arch: Option<String>,
}

/// Pre-tokenizer names after which llama.cpp adds BOS unless the file says otherwise.
const PRE_ADDING_BOS: &[&str] = &[
    "llama3",
    "llama-v3",
    "llama-bpe",
    "falcon3",
    "falcon-h1",
    "pixtral",
    "midm-2.0",
    "lfm2",
    "tekken",
    "chameleon",
];

impl GgufVocab {
    /// Reads the `tokenizer.ggml.*` keys of a GGUF file. A key that is present with the wrong
    /// type is an error; an absent optional key takes llama.cpp's default.
    pub fn from_gguf(g: &crate::loader::gguf::Gguf) -> Result<GgufVocab> {
        fn opt<T>(
            g: &crate::loader::gguf::Gguf,
            key: &str,
            get: impl Fn(&str) -> Result<T>,
        ) -> Result<Option<T>> {
            if g.metadata(key).is_some() {
                get(key).map(Some)
            } else {
                Ok(None)
            }
        }
        let model = g.get_str("tokenizer.ggml.model")?.to_string();
        let tokens = g.get_str_array("tokenizer.ggml.tokens")?.to_vec();
        let pre = opt(g, "tokenizer.ggml.pre", |k| {
            g.get_str(k).map(str::to_string)
        })?;
        let n = tokens.len();
        let spm = model == "llama";
        // An id past the vocabulary is ignored, as llama.cpp ignores it (with a warning).
        let id = |k: &str, default: Option<u32>| -> Result<Option<u32>> {
            let v = opt(g, k, |k| g.get_u32(k))?.or(default);
            Ok(v.filter(|&v| (v as usize) < n))
        };
        let flag = |k: &str, default: bool| -> Result<bool> {
            Ok(opt(g, k, |k| g.get_bool(k))?.unwrap_or(default))
        };
        let add_bos_default = spm || pre.as_deref().is_some_and(|p| PRE_ADDING_BOS.contains(&p));
        Ok(GgufVocab {
            file: g.file().to_string(),
            merges: opt(g, "tokenizer.ggml.merges", |k| {
                g.get_str_array(k).map(<[String]>::to_vec)
            })?,
            scores: opt(g, "tokenizer.ggml.scores", |k| g.get_f32_array(k))?.unwrap_or_default(),
            token_types: opt(g, "tokenizer.ggml.token_type", |k| g.get_i32_array(k))?
                .unwrap_or_default(),
            // llama.cpp's defaults for SentencePiece vocabularies: <unk>=0, <s>=1, </s>=2.
            bos: id("tokenizer.ggml.bos_token_id", spm.then_some(1))?,
            eos: id("tokenizer.ggml.eos_token_id", spm.then_some(2))?,
            unk: id("tokenizer.ggml.unknown_token_id", spm.then_some(0))?,
            add_bos: flag("tokenizer.ggml.add_bos_token", add_bos_default)?,
            add_eos: flag("tokenizer.ggml.add_eos_token", false)?,
            add_space_prefix: flag("tokenizer.ggml.add_space_prefix", spm)?,
            model_name: opt(g, "general.name", |k| g.get_str(k).map(str::to_string))?,
            arch: opt(g, "general.architecture", |k| {
                g.get_str(k).map(str::to_string)
            })?,
            pre,
            model,
            tokens,
        })
    }

    fn err(&self, key: &str, reason: impl Into<String>) -> Error {
        Error::Vocab {
            file: self.file.clone(),
            key: key.into(),
            reason: reason.into(),
        }
    }
}

/// The vocabulary both GGUF tokenizers share.
struct Vocab {
    tokens: Vec<String>,
    types: Vec<i32>,
    ids: HashMap<String, u32>,
    /// Control, user-defined and unknown tokens, longest first: what is cut out of the text before
    /// the model's own splitting (llama.cpp's `cache_special_tokens`).
    specials: Vec<u32>,
    /// Specials that take the whitespace before them (LSTRIP) or after them (RSTRIP) with them.
    lstrip: Vec<u32>,
    rstrip: Vec<u32>,
}

/// C's `isspace`, which llama.cpp strips with.
fn is_c_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r')
}

/// The tokens llama.cpp gives LSTRIP / RSTRIP by model name, architecture or pre-tokenizer (the
/// attributes are not in GGUF files): `<mask>` of Jina v2 and Nomic BERT, every special of
/// Phi-3 but `<unk>`, `<s>` and `<|endoftext|>`, and `</s>` there too.
fn strip_attributes(v: &GgufVocab, specials: &[u32]) -> (Vec<u32>, Vec<u32>) {
    let id = |t: &str| v.tokens.iter().rposition(|x| x == t).map(|i| i as u32);
    let has = |s: Option<&String>, any: &[&str]| {
        s.is_some_and(|s| any.iter().any(|a| s.to_lowercase().contains(a)))
    };
    if has(
        v.pre.as_ref(),
        &["jina-v2-de", "jina-v2-es", "jina-v2-code"],
    ) || has(v.arch.as_ref(), &["nomic-bert-moe", "jina-bert-v3"])
    {
        return (id("<mask>").into_iter().collect(), Vec::new());
    }
    if has(v.model_name.as_ref(), &["phi-3", "phi3"]) {
        let keep: Vec<u32> = ["<unk>", "<s>", "<|endoftext|>"]
            .iter()
            .filter_map(|t| id(t))
            .collect();
        let mut r: Vec<u32> = specials.iter().copied().chain(id("</s>")).collect();
        r.retain(|i| !keep.contains(i));
        r.sort_unstable();
        r.dedup();
        return (Vec::new(), r);
    }
    if has(v.model_name.as_ref(), &["modern-bert"]) {
        return (id("[MASK]").into_iter().collect(), Vec::new());
    }
    (Vec::new(), Vec::new())
}

/// A piece of text on its way to tokens: a byte range of the input, or a special token found in it.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Fragment {
    Text(usize, usize),
    Token(u32),
}

impl Vocab {
    fn new(v: &GgufVocab) -> Result<Vocab> {
        let n = v.tokens.len();
        if n == 0 {
            return Err(v.err("tokenizer.ggml.tokens", "the token list is empty"));
        }
        if n > u32::MAX as usize {
            return Err(v.err(
                "tokenizer.ggml.tokens",
                format!("{n} tokens do not fit u32 ids"),
            ));
        }
        let types = match v.token_types.len() {
            0 => vec![token_type::NORMAL; n],
            m if m == n => v.token_types.clone(),
            m => {
                return Err(v.err(
                    "tokenizer.ggml.token_type",
                    format!("{m} token types for {n} tokens"),
                ))
            }
        };
        // The last of equal spellings wins, as in llama.cpp's token_to_id.
        let ids: HashMap<String, u32> = v
            .tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let mut specials: Vec<u32> = (0..n as u32)
            .filter(|&i| {
                let ty = types[i as usize];
                !v.tokens[i as usize].is_empty()
                    && matches!(
                        ty,
                        token_type::CONTROL | token_type::USER_DEFINED | token_type::UNKNOWN
                    )
            })
            .collect();
        // Stable, so that equal lengths keep id order: the result does not depend on the sort.
        specials.sort_by_key(|&i| std::cmp::Reverse(v.tokens[i as usize].len()));
        let (lstrip, rstrip) = strip_attributes(v, &specials);
        Ok(Vocab {
            tokens: v.tokens.clone(),
            types,
            ids,
            specials,
            lstrip,
            rstrip,
        })
    }

    fn ty(&self, id: u32) -> i32 {
        self.types
            .get(id as usize)
            .copied()
            .unwrap_or(token_type::NORMAL)
    }

    /// Cuts the special tokens out of `text`, longest first; each is taken wherever it occurs in
    /// what longer ones left as text. Without `parse_special` control and unknown tokens stay
    /// text and only user-defined ones are cut (llama.cpp's `tokenizer_st_partition`).
    fn partition(&self, text: &str, parse_special: bool) -> Vec<Fragment> {
        if text.is_empty() {
            return Vec::new();
        }
        let mut frags = vec![Fragment::Text(0, text.len())];
        for &id in &self.specials {
            let ty = self.ty(id);
            if !parse_special && (ty == token_type::CONTROL || ty == token_type::UNKNOWN) {
                continue;
            }
            let s = self.tokens[id as usize].as_str();
            // Most of a large vocabulary's specials (Gemma has 6,400) are not in the text: one
            // search of the whole text rejects them before any fragment is looked at.
            if !text.contains(s) {
                continue;
            }
            let (lstrip, rstrip) = (self.lstrip.contains(&id), self.rstrip.contains(&id));
            let bytes = text.as_bytes();
            let mut out = Vec::with_capacity(frags.len() + 2);
            for f in frags {
                let Fragment::Text(a, b) = f else {
                    out.push(f);
                    continue;
                };
                let mut start = a;
                // A match of a whole UTF-8 string starts and ends on character boundaries.
                while let Some(p) = text[start..b].find(s) {
                    let m = start + p;
                    // Whitespace is ASCII: stripping it keeps the ends on character boundaries.
                    let mut end = m;
                    while lstrip && end > start && is_c_space(bytes[end - 1]) {
                        end -= 1;
                    }
                    if end > start {
                        out.push(Fragment::Text(start, end));
                    }
                    out.push(Fragment::Token(id));
                    start = m + s.len();
                    while rstrip && start < b && is_c_space(bytes[start]) {
                        start += 1;
                    }
                }
                if start < b {
                    out.push(Fragment::Text(start, b));
                }
            }
            frags = out;
        }
        frags
    }
}

enum Inner {
    Hf(Box<tokenizers::Tokenizer>),
    Spm(Box<spm::Spm>),
    Bpe(Box<bpe::Bpe>),
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
    /// Whether an EOS token is put after the prompt (few models ask for it).
    pub add_eos: bool,
    vocab_size: usize,
    /// Ids that end generation: EOS and the [`END_OF_TURN_TOKENS`] the vocabulary has.
    stop: Vec<u32>,
}

fn tok_err(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Tokenizer {
        reason: format!("{what}: {e}"),
    }
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
            add_eos: false,
            vocab_size,
            stop: Vec::new(),
        }
        .with_stops())
    }

    /// Builds the tokenizer a GGUF file describes.
    pub fn from_gguf(v: &GgufVocab) -> Result<Tokenizer> {
        let inner = match v.model.as_str() {
            "gpt2" => Inner::Bpe(Box::new(bpe::Bpe::new(v, Vocab::new(v)?)?)),
            "llama" => Inner::Spm(Box::new(spm::Spm::new(v, Vocab::new(v)?)?)),
            other => {
                return Err(v.err(
                    "tokenizer.ggml.model",
                    format!(
                        "tokenizer model '{other}' is not supported (gpt2-style BPE and llama \
                         SentencePiece are)"
                    ),
                ))
            }
        };
        let checked = |id: Option<u32>, key: &str| -> Result<Option<u32>> {
            match id {
                Some(i) if i as usize >= v.tokens.len() => Err(v.err(
                    key,
                    format!("token id {i} is past the {} tokens", v.tokens.len()),
                )),
                _ => Ok(id),
            }
        };
        let bos = checked(v.bos, "tokenizer.ggml.bos_token_id")?;
        let eos = checked(v.eos, "tokenizer.ggml.eos_token_id")?;
        if v.add_bos && bos.is_none() {
            return Err(v.err(
                "tokenizer.ggml.add_bos_token",
                "true, but tokenizer.ggml.bos_token_id is not set",
            ));
        }
        if v.add_eos && eos.is_none() {
            return Err(v.err(
                "tokenizer.ggml.add_eos_token",
                "true, but tokenizer.ggml.eos_token_id is not set",
            ));
        }
        Ok(Tokenizer {
            inner,
            bos,
            eos,
            add_bos: v.add_bos,
            add_eos: v.add_eos,
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

    fn gguf_vocab(&self) -> Option<&Vocab> {
        match &self.inner {
            Inner::Hf(_) => None,
            Inner::Spm(s) => Some(&s.vocab),
            Inner::Bpe(b) => Some(&b.vocab),
        }
    }

    /// The id of the vocabulary token spelled `token` (special tokens included).
    pub fn token_id(&self, token: &str) -> Option<u32> {
        match (&self.inner, self.gguf_vocab()) {
            (Inner::Hf(t), _) => t.token_to_id(token),
            (_, Some(v)) => v.ids.get(token).copied(),
            _ => None,
        }
    }

    /// The vocabulary's spelling of token `id` (`<|im_end|>`, `</s>`), as chat templates get
    /// `bos_token` and `eos_token`.
    pub fn token_text(&self, id: u32) -> Option<String> {
        self.piece(id)
    }

    /// Whether this is a SentencePiece (`tokenizer.ggml.model = "llama"`) vocabulary.
    pub fn is_sentencepiece(&self) -> bool {
        matches!(self.inner, Inner::Spm(_))
    }

    /// Token ids of `text`; special-token strings such as `<|im_start|>` map to their ids. A BOS is
    /// put first (and an EOS last) when the model asks for one and `add_bos` is true.
    pub fn encode(&self, text: &str, add_bos: bool) -> Result<Vec<u32>> {
        self.encode_with(text, add_bos, true)
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

    /// Like [`Tokenizer::encode`], but with `parse_special = false` control-token strings are
    /// tokenized as plain text (for untrusted input that must not inject control tokens).
    /// `add_special` puts the BOS / EOS the model asks for around the text.
    pub fn encode_with(
        &self,
        text: &str,
        add_special: bool,
        parse_special: bool,
    ) -> Result<Vec<u32>> {
        let mut ids = Vec::new();
        let t = match &self.inner {
            Inner::Hf(t) => t,
            Inner::Spm(s) => {
                if add_special && self.add_bos {
                    ids.extend(self.bos);
                }
                s.encode(text, parse_special, &mut ids);
                if add_special && self.add_eos {
                    ids.extend(self.eos);
                }
                return Ok(ids);
            }
            Inner::Bpe(b) => {
                if add_special && self.add_bos {
                    ids.extend(self.bos);
                }
                b.encode(text, parse_special, &mut ids)?;
                if add_special && self.add_eos {
                    ids.extend(self.eos);
                }
                return Ok(ids);
            }
        };
        // add_special_tokens=true lets BERT's post-processor add [CLS]/[SEP].
        let e = if parse_special {
            t.encode(text, true)
        } else {
            let mut plain = (**t).clone();
            plain.set_encode_special_tokens(true);
            plain.encode(text, true)
        }
        .map_err(|e| tok_err("encoding", e))?;
        ids.extend_from_slice(e.get_ids());
        Ok(ids)
    }

    /// Token `id`'s piece as the vocabulary writes it (`▁world`, `<0x0A>`, `Ġworld`), what
    /// llama-tokenize prints; `None` past the vocabulary.
    pub fn piece(&self, id: u32) -> Option<String> {
        match (&self.inner, self.gguf_vocab()) {
            (Inner::Hf(t), _) => t.id_to_token(id),
            (_, Some(v)) => v.tokens.get(id as usize).cloned(),
            _ => None,
        }
    }

    /// Text of `ids` (special tokens included).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        match &self.inner {
            Inner::Hf(t) => t.decode(ids, false).map_err(|e| tok_err("decoding", e)),
            Inner::Spm(s) => Ok(s.decode(ids)),
            Inner::Bpe(b) => Ok(b.decode(ids)),
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
            add_space_prefix: true,
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
            file: "x.gguf".into(),
            model: "rwkv".into(),
            ..Default::default()
        };
        assert!(matches!(
            Tokenizer::from_gguf(&v),
            Err(Error::Vocab { file, key, .. }) if file == "x.gguf" && key == "tokenizer.ggml.model"
        ));
    }

    /// Specials are cut longest first, and each wherever it occurs in what longer ones left;
    /// without parse_special only user-defined ones are cut.
    #[test]
    fn partition_takes_the_longest_special_first() {
        let mut v = spm_vocab();
        let base = v.tokens.len() as u32;
        for (t, ty) in [
            ("<a>", token_type::CONTROL),
            ("<a><b>", token_type::CONTROL),
            ("\n\n", token_type::USER_DEFINED),
        ] {
            v.tokens.push(t.into());
            v.token_types.push(ty);
            v.scores.push(0.0);
        }
        let voc = Vocab::new(&v).unwrap();
        let text = "x<a><b>y<a>\n\n\nz";
        use Fragment::{Text, Token};
        assert_eq!(
            voc.partition(text, true),
            vec![
                Text(0, 1),
                Token(base + 1),
                Text(7, 8),
                Token(base),
                Token(base + 2),
                Text(13, 15),
            ]
        );
        assert_eq!(
            voc.partition(text, false),
            vec![Text(0, 11), Token(base + 2), Text(13, 15)]
        );
        assert!(voc.partition("", true).is_empty());
    }

    /// Phi-3 (by general.name, as llama.cpp decides it): special tokens take the whitespace after
    /// them, except <s>; other models keep it.
    #[test]
    fn phi3_specials_strip_the_whitespace_after_them() {
        let mut v = spm_vocab();
        let user = v.tokens.len() as u32;
        v.tokens.push("<|user|>".into());
        v.token_types.push(token_type::CONTROL);
        v.scores.push(0.0);
        v.add_space_prefix = false;
        let plain = Tokenizer::from_gguf(&v).unwrap();
        v.model_name = Some("Phi-3-mini-4k-instruct".into());
        let phi3 = Tokenizer::from_gguf(&v).unwrap();
        let h = plain.token_id("hello").unwrap();
        let nl = plain.token_id("<0x0A>").unwrap();
        assert_eq!(
            plain.encode("<|user|>\n hello", false).unwrap()[..2],
            [user, nl]
        );
        assert_eq!(
            phi3.encode("<|user|>\n hello", false).unwrap(),
            vec![user, h]
        );
        assert_eq!(phi3.encode("<|user|>\n", false).unwrap(), vec![user]);
        // <s> is not stripped after.
        assert_eq!(phi3.encode("<s>\n", false).unwrap(), vec![1, nl]);
    }

    /// Gemma-style: no space prefix, so "hello" is not "▁hello"; with the prefix it is, also
    /// after a special token.
    #[test]
    fn space_prefix_follows_the_file() {
        let mut v = spm_vocab();
        v.add_space_prefix = false;
        let t = Tokenizer::from_gguf(&v).unwrap();
        let hello = t.token_id("hello").unwrap();
        assert_eq!(t.encode("hello", false).unwrap(), vec![hello]);
        assert_eq!(t.decode(&[hello]).unwrap(), "hello");
        let pre = Tokenizer::from_gguf(&spm_vocab()).unwrap();
        let spaced = pre.token_id("\u{2581}hello").unwrap();
        assert_eq!(
            pre.encode("hello</s>hello", false).unwrap(),
            vec![spaced, 2, spaced]
        );
    }
}
