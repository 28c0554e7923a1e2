//! `wgllm perplexity`: perplexity of a text file, by llama.cpp's chunks where the text holds one
//! context, else in one window, or strided with `--ppl-stride` (see
//! [`wgllm::model::generate::PplMethod`]).

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
    /// Strided evaluation: windows of -c tokens every N tokens, so that every token after the
    /// first is scored once with up to -c tokens of context (N below -c).
    #[arg(long = "ppl-stride")]
    ppl_stride: Option<usize>,
    #[arg(long)]
    json: bool,
}

pub(crate) fn run(a: Args, g: &Global) -> Result<()> {
    let gpu = &g.gpu()?;
    let Args {
        model: m,
        file,
        ppl_stride,
        json,
    } = a;
    let file = file.as_path();
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let text = text.strip_suffix('\n').unwrap_or(&text);
    let mut lm = load_model(gpu, &m, true)?;
    let ids = lm.tokenizer.encode(text, true)?;
    let ctx = m
        .ctx
        .unwrap_or_else(|| wgllm::model::load::default_ctx(&lm.config));
    let t = std::time::Instant::now();
    let r = wgllm::model::generate::perplexity(lm.model.as_mut(), gpu, &ids, ctx, ppl_stride)?;
    let secs = t.elapsed().as_secs_f64();
    if json {
        let mut v = serde_json::to_value(&r)?;
        v["model"] = lm.description.into();
        v["file"] = file.display().to_string().into();
        v["definition"] = r.method.describe().into();
        v["seconds"] = secs.into();
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        let unit = match r.method {
            wgllm::model::generate::PplMethod::Chunks => "chunk",
            _ => "window",
        };
        for (i, c) in r.window_mean_nll.iter().enumerate() {
            println!("{unit} {}: mean NLL {:.5} (ppl {:.4})", i + 1, c, c.exp());
        }
        println!("definition: {}", r.method.describe());
        println!(
            "perplexity: {:.4} over {} scored tokens in {} {unit}(s); ctx {}{} ({} tokens in the file; {:.1} s)",
            r.perplexity,
            r.scored,
            r.window_mean_nll.len(),
            r.ctx,
            r.stride.map_or(String::new(), |s| format!(", stride {s}")),
            r.tokens,
            secs
        );
    }
    Ok(())
}
