//! `wgllm embed`: sentence embeddings with a BERT encoder, and their cosine similarities.

use anyhow::Result;

use super::load::parse_precision;
use super::Global;

#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    /// Sentences to embed.
    #[arg(required = true)]
    sentences: Vec<String>,
    /// A Hugging Face BERT directory (config.json, model.safetensors, tokenizer.json), or a name
    /// from `wgllm models`.
    #[arg(short = 'm', long)]
    model: Option<std::path::PathBuf>,
    /// Quantise weights on load: f32, f16, int8, int4.
    #[arg(long)]
    precision: Option<String>,
    /// Sentences encoded in one pass (`wgllm plan --batch` plans the same); each pass is sized
    /// for the longest sentence.
    #[arg(long, default_value_t = 32)]
    batch: usize,
    /// Print the full vectors.
    #[arg(long)]
    full: bool,
    #[arg(long)]
    json: bool,
}

pub(crate) fn run(a: Args, g: &Global) -> Result<()> {
    let gpu = &g.gpu()?;
    let Args {
        sentences,
        model,
        precision,
        batch,
        full,
        json,
    } = a;
    use wgllm::model::bert::{cosine, Bert};
    let dir = match &model {
        Some(p) => wgllm::model::load::resolve(Some(p), &mut |s| eprintln!("{s}"))?,
        None => wgllm::fetch::MINILM.ensure(&mut |s| eprintln!("{s}"))?,
    };
    let hf = wgllm::loader::safetensors::HfModel::open(&dir)?;
    let cfg = wgllm::model::config::ModelConfig::from_hf_json(hf.config())?;
    let precision = precision.as_deref().map(parse_precision).transpose()?;
    let mut tok = wgllm::tokenizer::Tokenizer::from_file(&dir.join("tokenizer.json"))?;
    // Cut where sentence-transformers cuts (256 for MiniLM, not tokenizer.json's 128); without
    // that file, never cut and let the model refuse what is past its positions.
    let max_len = wgllm::model::bert::sentence_max_length(&dir).map(|n| n.min(cfg.max_positions));
    tok.set_max_length(max_len)?;
    let ids = sentences
        .iter()
        .map(|s| tok.encode(s, true))
        .collect::<wgllm::Result<Vec<_>>>()?;
    // Activations for passes of `batch` sentences of the longest's length (past the positions,
    // the model refuses it).
    let longest = ids.iter().map(Vec::len).max().unwrap_or(1).max(1);
    let mut bert = Bert::load_batch(
        gpu,
        cfg,
        &wgllm::model::source::Source::Hf(&hf, precision),
        batch.clamp(1, ids.len().max(1)),
        longest,
    )?;
    let seqs: Vec<&[u32]> = ids.iter().map(Vec::as_slice).collect();
    let vecs = bert.embed_batch(gpu, &seqs)?;
    let n = vecs.len();
    let sims: Vec<Vec<f32>> = (0..n)
        .map(|i| (0..n).map(|j| cosine(&vecs[i], &vecs[j])).collect())
        .collect();
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(
                &serde_json::json!({"model": dir, "sentences": sentences, "embeddings": vecs, "cosine": sims})
            )?
        );
        return Ok(());
    }
    for (s, v) in sentences.iter().zip(&vecs) {
        let shown: Vec<String> = v
            .iter()
            .take(if full { v.len() } else { 8 })
            .map(|x| format!("{x:.5}"))
            .collect();
        println!(
            "{s:?}: [{}{}] ({} dims)",
            shown.join(", "),
            if full { "" } else { ", ..." },
            v.len()
        );
    }
    if n > 1 {
        println!("cosine similarities:");
        for (i, row) in sims.iter().enumerate() {
            let cells: Vec<String> = row.iter().map(|c| format!("{c:7.4}")).collect();
            println!("  [{i}] {}", cells.join(" "));
        }
    }
    Ok(())
}
