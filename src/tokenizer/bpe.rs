//! GPT-2-style byte-level BPE vocabularies (`tokenizer.ggml.model = "gpt2"`).
//!
//! Text between special tokens is split by the regular expressions llama.cpp keeps for the file's
//! `tokenizer.ggml.pre` (copied from `llm_tokenizer_bpe` in llama.cpp's `src/llama-vocab.cpp`,
//! applied one after the other, each splitting the pieces the previous one left, matches and the
//! text between them kept), each piece's bytes are written as GPT-2's printable characters and
//! merged by rank. The `tokenizers` crate does the splitting (its `Split` pre-tokenizer with the
//! same expressions) and the merging; which tokens are special, and decoding, are done here as
//! llama.cpp does them.

use tokenizers::models::bpe::{Vocab as BpeVocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{PreTokenizerWrapper, SplitDelimiterBehavior};

use super::{tok_err, token_type, Fragment, GgufVocab, Vocab};
use crate::error::Result;

// llama.cpp's expressions (src/llama-vocab.cpp, llama-cpp-python 0.3.36's copy), by the names
// its pre-tokenizer types carry.
const DEEPSEEK_LLM: &[&str] = &[
    r#"[\r\n]"#,
    r#"\s?[A-Za-zµÀ-ÖØ-öø-ƺƼ-ƿǄ-ʓʕ-ʯͰ-ͳͶͷͻ-ͽͿΆΈ-ΊΌΎ-ΡΣ-ϵϷ-ҁҊ-ԯԱ-ՖႠ-ჅᎠ-Ᏽᏸ-ᏽᲐ-ᲺᲽ-Ჿᴀ-ᴫᵫ-ᵷᵹ-ᶚḀ-ἕἘ-Ἕἠ-ὅὈ-Ὅὐ-ὗὙὛὝὟ-ώᾀ-ᾴᾶ-ᾼιῂ-ῄῆ-ῌῐ-ΐῖ-Ίῠ-Ῥῲ-ῴῶ-ῼℂℇℊ-ℓℕℙ-ℝℤΩℨK-ℭℯ-ℴℹℼ-ℿⅅ-ⅉⅎↃↄⰀ-ⱻⱾ-ⳤⳫ-ⳮⳲⳳꙀ-ꙭꚀ-ꚛꜢ-ꝯꝱ-ꞇꞋ-ꞎꭰ-ꮿﬀ-ﬆﬓ-ﬗＡ-Ｚａ-ｚ𐐀-𐑏𐒰-𐓓𐓘-𐓻𐲀-𐲲𐳀-𐳲𑢠-𑣟𞤀-𞥃]+"#,
    r#"\s?[!-/:-~！-／：-～‘-‟　-。]+"#,
    r#"\s+$"#,
    r#"[一-龥ࠀ-一가-퟿]+"#,
    r#"\p{N}+"#,
];

const DEEPSEEK_CODER: &[&str] = &[
    r#"[\r\n]"#,
    r#"\s?\p{L}+"#,
    r#"\s?\p{P}+"#,
    r#"[一-龥ࠀ-一가-퟿]+"#,
    r#"\p{N}"#,
];

const DEEPSEEK3: &[&str] = &[
    r#"\p{N}{1,3}"#,
    r#"[一-龥぀-ゟ゠-ヿ]+"#,
    r##"[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"##,
];

const FALCON: &[&str] = &[
    r#"[\p{P}\$\+<=>\^~\|`]+"#,
    r#"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"#,
    r#"[0-9][0-9][0-9]"#,
];

const DIGITS_GPT2: &[&str] = &[
    r#"\p{N}"#,
    r#"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"#,
];

const GPT2: &[&str] =
    &[r#"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"#];

const QWEN2: &[&str] = &[
    r#"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"#,
];

const QWEN35: &[&str] = &[
    r#"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"#,
];

const PORO: &[&str] = &[r#" ?[^(\s|.,!?…。，、।۔،)]+"#];

const VIKING: &[&str] = &[r#" ?[^(\s|.,!?…。，、।۔،)]+"#, r#"\p{N}"#];

const TEKKEN: &[&str] = &[
    r#"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"#,
];

const GPT4O: &[&str] = &[
    r#"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"#,
];

const LLAMA3: &[&str] = &[
    r#"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"#,
];

const DEFAULT: &[&str] = &[
    r#"[\p{P}\$\+<=>\^~\|]+"#,
    r#"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"#,
    r#"\p{N}+"#,
    r#"[0-9][0-9][0-9]"#,
];

/// A pre-tokenizer llama.cpp knows by name: its expressions, and whether a whole piece that is
/// already a token is taken as it is, before any merge (`ignore_merges`; Llama 3's
/// tokenizer.json asks for it).
struct Pre {
    regexes: &'static [&'static str],
    ignore_merges: bool,
}

/// The `tokenizer.ggml.pre` names wgllm reads, with llama.cpp's expressions for each.
pub const PRE_TOKENIZERS: &[&str] = &[
    "default",
    "gpt-2",
    "phi-2",
    "jina-es",
    "jina-de",
    "gigachat",
    "jina-v2-es",
    "jina-v2-de",
    "a.x-4.0",
    "mellum",
    "modern-bert",
    "exaone4",
    "mpt",
    "olmo",
    "jais",
    "trillion",
    "granite-docling",
    "llama3",
    "llama-v3",
    "llama-bpe",
    "falcon3",
    "falcon-h1",
    "pixtral",
    "midm-2.0",
    "lfm2",
    "jina-v5-nano",
    "dbrx",
    "smaug-bpe",
    "deepseek-llm",
    "deepseek-coder",
    "deepseek-v3",
    "falcon",
    "starcoder",
    "refact",
    "command-r",
    "smollm",
    "codeshell",
    "exaone",
    "minerva-7b",
    "mellum2",
    "qwen2",
    "deepseek-r1-qwen",
    "kormo",
    "f2llmv2",
    "stablelm2",
    "megrez",
    "hunyuan",
    "solar-open",
    "qwen35",
    "poro-chat",
    "bloom",
    "gpt3-finnish",
    "viking",
    "tekken",
    "gpt-4o",
    "llama4",
    "kanana2",
    "talkie",
    "minimax-m2",
];

fn pre_tokenizer(name: &str) -> Option<Pre> {
    let (regexes, ignore_merges) = match name {
        "default" => (DEFAULT, false),
        "gpt-2" | "phi-2" | "jina-es" | "jina-de" | "gigachat" | "jina-v2-es" | "jina-v2-de"
        | "a.x-4.0" | "mellum" | "modern-bert" | "exaone4" | "mpt" | "olmo" | "jais"
        | "trillion" | "granite-docling" => (GPT2, false),
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0"
        | "lfm2" | "jina-v5-nano" => (LLAMA3, true),
        "dbrx" | "smaug-bpe" => (LLAMA3, false),
        "deepseek-llm" => (DEEPSEEK_LLM, false),
        "deepseek-coder" => (DEEPSEEK_CODER, false),
        "deepseek-v3" => (DEEPSEEK3, false),
        "falcon" => (FALCON, false),
        "starcoder" | "refact" | "command-r" | "smollm" | "codeshell" | "exaone" | "minerva-7b"
        | "mellum2" => (DIGITS_GPT2, false),
        "qwen2" | "deepseek-r1-qwen" | "kormo" | "f2llmv2" | "stablelm2" | "megrez" | "hunyuan"
        | "solar-open" => (QWEN2, false),
        "qwen35" => (QWEN35, false),
        "poro-chat" | "bloom" | "gpt3-finnish" => (PORO, false),
        "viking" => (VIKING, false),
        "tekken" => (TEKKEN, true),
        "gpt-4o" | "llama4" | "kanana2" | "talkie" | "minimax-m2" => (GPT4O, false),
        _ => return None,
    };
    Some(Pre {
        regexes,
        ignore_merges,
    })
}

pub(super) struct Bpe {
    pub(super) vocab: Vocab,
    /// Splitting and merging only: no added tokens, no normaliser, no post-processor.
    hf: tokenizers::Tokenizer,
    /// GPT-2's printable character for each byte, inverted: code point -> byte.
    unbyte: Vec<Option<u8>>,
}

/// GPT-2's `bytes_to_unicode`: printable Latin-1 bytes stand for themselves, the others
/// (controls, space, NBSP, soft hyphen) for U+0100 onwards in byte order.
fn byte_chars() -> [char; 256] {
    let mut out = ['\0'; 256];
    let mut next = 256u32;
    for (b, slot) in out.iter_mut().enumerate() {
        let printable = (33..=126).contains(&b) || (161..=172).contains(&b) || b >= 174;
        let cp = if printable {
            b as u32
        } else {
            next += 1;
            next - 1
        };
        *slot = char::from_u32(cp).unwrap_or('\0');
    }
    out
}

impl Bpe {
    pub(super) fn new(v: &GgufVocab, vocab: Vocab) -> Result<Bpe> {
        let pre = match v.pre.as_deref() {
            None => {
                // As llama.cpp: a warned fallback, since older converters wrote no name.
                log::warn!(
                    "{}: no tokenizer.ggml.pre; splitting with llama.cpp's 'default' expressions \
                     (the tokens may differ from the model's own tokenizer)",
                    v.file
                );
                "default"
            }
            Some(p) => p,
        };
        let Some(pre) = pre_tokenizer(pre) else {
            // llama.cpp refuses the file too ("unknown pre-tokenizer type").
            return Err(v.err(
                "tokenizer.ggml.pre",
                format!(
                    "unknown pre-tokenizer '{pre}' (known: {})",
                    PRE_TOKENIZERS.join(", ")
                ),
            ));
        };
        // Absent is refused as llama.cpp refuses it; empty is a vocabulary of whole tokens.
        let Some(given) = &v.merges else {
            return Err(v.err("tokenizer.ggml.merges", "absent: BPE needs merges"));
        };
        let mut merges = Vec::with_capacity(given.len());
        let mut joined = String::new();
        for (i, m) in given.iter().enumerate() {
            // llama.cpp splits at the first space after the first byte: a merge may start
            // with a space character only in byte-level spelling, where it is 'Ġ'.
            let split = m.bytes().skip(1).position(|c| c == b' ').map(|p| p + 1);
            let Some(p) = split else {
                return Err(v.err(
                    "tokenizer.ggml.merges",
                    format!("merge {i} ({m:?}) is not two tokens separated by a space"),
                ));
            };
            let (a, b) = (&m[..p], &m[p + 1..]);
            joined.clear();
            joined.push_str(a);
            joined.push_str(b);
            for part in [a, b, joined.as_str()] {
                if !vocab.ids.contains_key(part) {
                    return Err(v.err(
                        "tokenizer.ggml.merges",
                        format!("merge {i} ({m:?}) names {part:?}, which is not a token"),
                    ));
                }
            }
            merges.push((a.to_string(), b.to_string()));
        }
        let bpe_vocab: BpeVocab = vocab.ids.clone().into_iter().collect();
        let model = BPE::builder()
            .vocab_and_merges(bpe_vocab, merges)
            .ignore_merges(pre.ignore_merges)
            .build()
            .map_err(|e| v.err("tokenizer.ggml.merges", e.to_string()))?;
        let mut steps: Vec<PreTokenizerWrapper> = Vec::new();
        for r in pre.regexes {
            let s = Split::new(
                SplitPattern::Regex((*r).into()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(|e| tok_err(&format!("pre-tokenizer expression {r:?}"), e))?;
            steps.push(s.into());
        }
        // Bytes to GPT-2's characters, after the split (use_regex = false).
        steps.push(ByteLevel::new(false, false, false).into());
        let mut hf = tokenizers::Tokenizer::new(model);
        hf.with_pre_tokenizer(Some(Sequence::new(steps)));
        let mut unbyte = vec![None; 324];
        for (b, c) in byte_chars().iter().enumerate() {
            if let Some(slot) = unbyte.get_mut(*c as usize) {
                *slot = Some(b as u8);
            }
        }
        Ok(Bpe { vocab, hf, unbyte })
    }

    /// Appends the ids of `text` to `out` (no BOS/EOS).
    pub(super) fn encode(&self, text: &str, parse_special: bool, out: &mut Vec<u32>) -> Result<()> {
        for f in self.vocab.partition(text, parse_special) {
            match f {
                Fragment::Token(id) => out.push(id),
                Fragment::Text(a, b) => {
                    let e = self
                        .hf
                        .encode(&text[a..b], false)
                        .map_err(|e| tok_err("encoding", e))?;
                    out.extend_from_slice(e.get_ids());
                }
            }
        }
        Ok(())
    }

    /// Text of `ids`: normal tokens from GPT-2's characters back to bytes, special and
    /// user-defined ones as written (llama.cpp's `token_to_piece`).
    pub(super) fn decode(&self, ids: &[u32]) -> String {
        let mut bytes = Vec::new();
        for &id in ids {
            let Some(t) = self.vocab.tokens.get(id as usize) else {
                continue;
            };
            match self.vocab.ty(id) {
                token_type::CONTROL | token_type::USER_DEFINED | token_type::UNKNOWN => {
                    bytes.extend_from_slice(t.as_bytes())
                }
                _ => {
                    for c in t.chars() {
                        match self.unbyte.get(c as usize).copied().flatten() {
                            Some(b) => bytes.push(b),
                            None => {
                                let mut buf = [0u8; 4];
                                bytes.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                            }
                        }
                    }
                }
            }
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }
}
