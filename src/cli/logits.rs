//! `wgllm logits`: the top logits of the last prompt token (or of every position), to compare
//! numbers with any other runtime.

use anyhow::Result;

use super::load::load_model;
use super::{Global, ModelArgs};

#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    #[command(flatten)]
    model: ModelArgs,
    #[arg(long)]
    prompt: String,
    #[arg(long, default_value_t = 10)]
    top_k: usize,
    /// Logits of every prompt position, not only the last.
    #[arg(long)]
    all: bool,
    #[arg(long)]
    json: bool,
}

pub(crate) fn run(a: Args, g: &Global) -> Result<()> {
    let gpu = &g.gpu()?;
    let Args {
        model: m,
        prompt,
        top_k: k,
        all,
        json,
    } = a;
    let mut lm = load_model(gpu, &m, all)?;
    let ids = lm.tokenizer.encode(&prompt, true)?;
    let vocab = lm.config.vocab_size;
    lm.model.set_all_logits(all);
    let out = lm.model.forward(gpu, &ids, 0)?;
    let rows: Vec<(usize, &[f32])> = if all {
        out.chunks(vocab).enumerate().collect()
    } else {
        vec![(ids.len() - 1, &out[..vocab])]
    };
    let mut report = Vec::new();
    for (pos, row) in rows {
        let lse = wgllm::model::generate::log_sum_exp(row);
        let top: Vec<serde_json::Value> = top_k_of(row, k)
            .into_iter()
            .map(|(id, l)| {
                serde_json::json!({"id": id, "token": lm.tokenizer.decode(&[id]).unwrap_or_default(), "logit": l, "logprob": l as f64 - lse})
            })
            .collect();
        report.push(
            serde_json::json!({"pos": pos, "token_id": ids[pos], "logsumexp": lse, "top": top}),
        );
    }
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(
                &serde_json::json!({"model": lm.description, "tokens": ids, "positions": report})
            )?
        );
    } else {
        println!("tokens: {ids:?}");
        for r in &report {
            println!(
                "position {} (token {}), logsumexp {:.4}:",
                r["pos"],
                r["token_id"],
                r["logsumexp"].as_f64().unwrap_or(0.0)
            );
            for t in r["top"].as_array().into_iter().flatten() {
                println!(
                    "  {:>7} {:>12.4} {:>9.4}  {:?}",
                    t["id"],
                    t["logit"].as_f64().unwrap_or(0.0),
                    t["logprob"].as_f64().unwrap_or(0.0),
                    t["token"].as_str().unwrap_or("")
                );
            }
        }
    }
    Ok(())
}

/// The `k` largest entries of `row` as (index, value), ties by index.
fn top_k_of(row: &[f32], k: usize) -> Vec<(u32, f32)> {
    let mut v: Vec<(u32, f32)> = row
        .iter()
        .enumerate()
        .map(|(i, &x)| (i as u32, x))
        .collect();
    v.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    v.truncate(k);
    v
}
