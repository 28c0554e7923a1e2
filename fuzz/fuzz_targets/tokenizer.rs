//! Encode arbitrary text and decode arbitrary ids with the SentencePiece and BPE tokenizers of
//! two small GGUF vocabularies (`entries::tokenizer`); text must round-trip.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use wgllm::tokenizer::Tokenizer;
use wgllm_fuzz::entries;

fn tokenizers() -> &'static (Tokenizer, Tokenizer) {
    static TOKENIZERS: OnceLock<(Tokenizer, Tokenizer)> = OnceLock::new();
    TOKENIZERS.get_or_init(|| {
        (
            entries::vocab_tokenizer("spm.gguf", entries::SPM_VOCAB).expect("SentencePiece vocab"),
            entries::vocab_tokenizer("bpe.gguf", entries::BPE_VOCAB).expect("BPE vocab"),
        )
    })
}

fuzz_target!(|data: &[u8]| {
    let (spm, bpe) = tokenizers();
    if let Err(e) = entries::tokenizer(spm, bpe, data) {
        panic!("{e}");
    }
});
