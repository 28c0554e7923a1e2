//! `wgllm tokenize`: the token ids and pieces of a text, as llama.cpp's `llama-tokenize` prints
//! them. Reads only the vocabulary: a GGUF file without tensors (a vocabulary-only file) works.

use anyhow::{Context, Result};

#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    /// A GGUF file, a Hugging Face directory (tokenizer.json), or a name from `wgllm models`;
    /// default: SmolLM2.
    #[arg(short = 'm', long)]
    model: Option<std::path::PathBuf>,
    /// The text.
    text: String,
    /// Print the ids only, as a list.
    #[arg(long)]
    ids: bool,
    /// Do not add the special tokens the model asks for (BOS first, EOS last where the file's
    /// add_bos_token / add_eos_token say so).
    #[arg(long)]
    no_bos: bool,
    /// Tokenize control-token strings such as `<start_of_turn>` as plain text (user-defined
    /// tokens, such as Gemma's whitespace runs, are still matched, as in llama.cpp).
    #[arg(long)]
    no_parse_special: bool,
}

pub(crate) fn run(a: Args) -> Result<()> {
    let path = wgllm::model::load::resolve(a.model.as_deref(), &mut |s| eprintln!("{s}"))?;
    let tok = if path.is_dir() {
        wgllm::tokenizer::Tokenizer::from_file(&path.join("tokenizer.json"))?
    } else {
        let g = wgllm::loader::gguf::Gguf::open(&path)?;
        wgllm::tokenizer::Tokenizer::from_gguf(&wgllm::tokenizer::GgufVocab::from_gguf(&g)?)
            .with_context(|| format!("the vocabulary of {}", path.display()))?
    };
    let ids = tok.encode_with(&a.text, !a.no_bos, !a.no_parse_special)?;
    if a.ids {
        println!("{ids:?}");
        return Ok(());
    }
    for id in ids {
        // The vocabulary's own piece: decoding one token alone would drop SentencePiece's
        // leading space and split characters made of byte-fallback tokens.
        // JSON-quoted, so that control characters and quotes stay unambiguous.
        let piece = serde_json::to_string(&tok.piece(id).unwrap_or_default())?;
        println!("{id:>7} -> {piece}");
    }
    Ok(())
}
