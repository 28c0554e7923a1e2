//! SentencePiece vocabularies (`tokenizer.ggml.model = "llama"`): score-ordered BPE as
//! llama.cpp's SPM tokenizer (`llm_tokenizer_spm`) and SentencePiece's `bpe_model.cc` do it.
//!
//! Each character starts as a symbol; every adjacent pair whose concatenation is a token goes into
//! a priority queue by that token's score (ties: the leftmost pair); the best pair is merged and
//! its new neighbours are queued, until no pair is a token. A heap and a linked list of symbols
//! keep this O(n log n) in the text's length; symbols left that are not tokens become their UTF-8
//! bytes' `<0xXX>` tokens.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use super::{token_type, Fragment, GgufVocab, Vocab};
use crate::error::Result;

pub(super) struct Spm {
    pub(super) vocab: Vocab,
    scores: Vec<f32>,
    byte_ids: [u32; 256],
    add_space_prefix: bool,
}

#[derive(Clone, Copy)]
struct Symbol {
    start: usize,
    len: usize,
    prev: Option<usize>,
    next: Option<usize>,
}

/// A candidate merge of two adjacent symbols into a token of score `score` and `size` bytes.
struct Bigram {
    score: f32,
    left: usize,
    right: usize,
    size: usize,
}

impl PartialEq for Bigram {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == Ordering::Equal
    }
}
impl Eq for Bigram {}
impl PartialOrd for Bigram {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Bigram {
    /// The max-heap pops the best score first, and of equal scores the leftmost pair.
    fn cmp(&self, o: &Self) -> Ordering {
        self.score
            .total_cmp(&o.score)
            .then_with(|| o.left.cmp(&self.left))
    }
}

impl Spm {
    pub(super) fn new(v: &GgufVocab, vocab: Vocab) -> Result<Spm> {
        let n = v.tokens.len();
        if v.scores.len() != n {
            // llama.cpp reads absent scores as 0, which leaves the merge order to chance; a
            // SentencePiece vocabulary without them is not one it was trained as.
            let reason = if v.scores.is_empty() {
                format!("absent, but the SentencePiece vocabulary of {n} tokens needs a score per token")
            } else {
                format!("{} scores for {n} tokens", v.scores.len())
            };
            return Err(v.err("tokenizer.ggml.scores", reason));
        }
        let unk = v.unk.unwrap_or(0);
        let mut byte_ids = [unk; 256];
        for (b, slot) in byte_ids.iter_mut().enumerate() {
            if let Some(&id) = vocab.ids.get(&format!("<0x{b:02X}>")) {
                *slot = id;
            }
        }
        Ok(Spm {
            vocab,
            scores: v.scores.clone(),
            byte_ids,
            add_space_prefix: v.add_space_prefix,
        })
    }

    /// Appends the ids of `text` to `out` (no BOS/EOS).
    pub(super) fn encode(&self, text: &str, parse_special: bool, out: &mut Vec<u32>) {
        // The start counts as a special token: a space goes before the text's first word.
        let mut prev_special = true;
        let mut buf = String::new();
        for f in self.vocab.partition(text, parse_special) {
            match f {
                Fragment::Token(id) => {
                    out.push(id);
                    prev_special = true;
                }
                Fragment::Text(a, b) => {
                    buf.clear();
                    if self.add_space_prefix && prev_special {
                        buf.push('\u{2581}');
                    }
                    // Only the space is escaped: tabs and newlines stay, and Gemma has tokens
                    // for them.
                    for c in text[a..b].chars() {
                        buf.push(if c == ' ' { '\u{2581}' } else { c });
                    }
                    self.encode_fragment(&buf, out);
                    prev_special = false;
                }
            }
        }
    }

    /// Whether a merge may produce token `id`. Control tokens never come out of plain text
    /// (SentencePiece leaves them out of its merge table; llama.cpp would merge into them, so
    /// that with `parse_special = false` "<eos>" spelled out in a user's text could still become
    /// the EOS id through merges of its pieces).
    fn mergeable(&self, id: u32) -> bool {
        !matches!(
            self.vocab.ty(id),
            token_type::CONTROL | token_type::UNKNOWN | token_type::BYTE
        )
    }

    fn encode_fragment(&self, text: &str, out: &mut Vec<u32>) {
        let mut syms: Vec<Symbol> = Vec::with_capacity(text.len());
        for (start, c) in text.char_indices() {
            let i = syms.len();
            syms.push(Symbol {
                start,
                len: c.len_utf8(),
                prev: i.checked_sub(1),
                next: Some(i + 1),
            });
        }
        let Some(last) = syms.last_mut() else {
            return;
        };
        last.next = None;
        let mut heap = BinaryHeap::with_capacity(syms.len());
        let try_add = |syms: &[Symbol], heap: &mut BinaryHeap<Bigram>, l: usize, r: usize| {
            let (a, b) = (syms[l], syms[r]);
            let piece = &text[a.start..a.start + a.len + b.len];
            if let Some(&id) = self.vocab.ids.get(piece) {
                if self.mergeable(id) {
                    heap.push(Bigram {
                        score: self.scores[id as usize],
                        left: l,
                        right: r,
                        size: piece.len(),
                    });
                }
            }
        };
        for i in 1..syms.len() {
            try_add(&syms, &mut heap, i - 1, i);
        }
        while let Some(bg) = heap.pop() {
            let (l, r) = (syms[bg.left], syms[bg.right]);
            // Stale: one side has been merged into something else since the pair was queued.
            if l.len == 0 || r.len == 0 || l.len + r.len != bg.size {
                continue;
            }
            syms[bg.left].len += r.len;
            syms[bg.right].len = 0;
            syms[bg.left].next = r.next;
            if let Some(n) = r.next {
                syms[n].prev = Some(bg.left);
            }
            if let Some(p) = syms[bg.left].prev {
                try_add(&syms, &mut heap, p, bg.left);
            }
            if let Some(n) = syms[bg.left].next {
                try_add(&syms, &mut heap, bg.left, n);
            }
        }
        let mut i = Some(0);
        while let Some(k) = i {
            let s = syms[k];
            let piece = &text[s.start..s.start + s.len];
            // A merged symbol is always a token; a single character may not be: its bytes then.
            match self.vocab.ids.get(piece) {
                Some(&id) if self.mergeable(id) => out.push(id),
                _ => out.extend(piece.bytes().map(|b| self.byte_ids[b as usize])),
            }
            i = s.next;
        }
    }

    /// Text of `ids`: `▁` back to spaces, byte tokens to their bytes, special tokens as written;
    /// the space the encoder put first is dropped again.
    pub(super) fn decode(&self, ids: &[u32]) -> String {
        let mut bytes = Vec::new();
        for &id in ids {
            let Some(t) = self.vocab.tokens.get(id as usize) else {
                continue;
            };
            match self.vocab.ty(id) {
                token_type::BYTE => {
                    let hex = t.trim_start_matches("<0x").trim_end_matches('>');
                    match u8::from_str_radix(hex, 16) {
                        Ok(b) => bytes.push(b),
                        Err(_) => bytes.extend_from_slice(t.as_bytes()),
                    }
                }
                token_type::USER_DEFINED | token_type::CONTROL => {
                    bytes.extend_from_slice(t.as_bytes())
                }
                _ => bytes.extend_from_slice(t.replace('\u{2581}', " ").as_bytes()),
            }
        }
        let s = String::from_utf8_lossy(&bytes).into_owned();
        if self.add_space_prefix {
            if let Some(rest) = s.strip_prefix(' ') {
                return rest.to_string();
            }
        }
        s
    }
}
