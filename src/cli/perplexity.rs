//! `wgllm perplexity`: perplexity of a text file.

use anyhow::{Context, Result};

use super::load::load_model;
use super::{Global, ModelArgs};

#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// The text file.
    #[arg(short = 'f', long)]
    file: std::path::PathBuf,
    #[arg(long)]
    json: bool,
}

pub(crate) fn run(a: Args, g: &Global) -> Result<()> {
    let gpu = &g.gpu()?;
    let Args {
        model: m,
        file,
        json,
    } = a;
    let file = file.as_path();
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let text = text.strip_suffix('\n').unwrap_or(&text);
    let mut lm = load_model(gpu, &m, true)?;
    let ids = lm.tokenizer.encode(text, true)?;
    let t = std::time::Instant::now();
    let (ppl, chunks) = wgllm::model::generate::perplexity(lm.model.as_mut(), gpu, &ids, m.ctx)?;
    let secs = t.elapsed().as_secs_f64();
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(
                &serde_json::json!({"model": lm.description, "file": file, "tokens": ids.len(), "ctx": m.ctx, "chunks": chunks.len(), "chunk_mean_nll": chunks, "perplexity": ppl, "seconds": secs})
            )?
        );
    } else {
        for (i, c) in chunks.iter().enumerate() {
            println!("chunk {}: mean NLL {:.5} (ppl {:.4})", i + 1, c, c.exp());
        }
        println!(
            "perplexity: {ppl:.4} over {} chunks of {} tokens ({} tokens in the file; {:.1} s)",
            chunks.len(),
            m.ctx,
            ids.len(),
            secs
        );
    }
    Ok(())
}
