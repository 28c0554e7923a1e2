//! `wgllm run`, `logits`, `perplexity` and `embed`.

use anyhow::{Context, Result};
use wgllm::gpu::Gpu;

use super::*;
use crate::{ModelArgs, SamplingArgs};

pub(crate) fn run(
    gpu: &Gpu,
    prompt: &str,
    m: &ModelArgs,
    s: &SamplingArgs,
    n: usize,
    chat: bool,
) -> Result<()> {
    use std::io::Write;
    use wgllm::sampler::{Sampler, SamplerConfig};
    let mut lm = load_model(gpu, m, false)?;
    let text = if chat {
        let tmpl = lm
            .chat_template
            .as_deref()
            .context("--chat: the model has no chat template in its metadata")?;
        let tok = &lm.tokenizer;
        let name = |id: Option<u32>| id.and_then(|i| tok.decode(&[i]).ok()).unwrap_or_default();
        wgllm::model::generate::apply_chat_template(tmpl, prompt, &name(tok.bos), &name(tok.eos))?
    } else {
        prompt.to_string()
    };
    let ids = lm.tokenizer.encode(&text, true)?;
    let seed = s.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
    });
    let mut sampler = Sampler::new(SamplerConfig {
        temperature: s.temperature,
        top_k: s.top_k,
        top_p: s.top_p,
        repeat_penalty: s.repeat_penalty,
        repeat_last_n: s.repeat_last_n,
        seed,
    });
    print!("{text}");
    std::io::stdout().flush()?;
    let (_, stats) = wgllm::model::generate::generate(
        lm.model.as_mut(),
        gpu,
        &lm.tokenizer,
        &ids,
        n,
        &mut sampler,
        &mut |t| {
            print!("{t}");
            std::io::stdout().flush().is_ok()
        },
    )?;
    println!();
    eprintln!(
        "\nprefill: {} tokens in {:.2} s ({:.2} tokens/s); decode: {} tokens in {:.2} s ({:.2} tokens/s){}",
        stats.prompt_tokens,
        stats.prefill_secs,
        stats.prefill_tps(),
        stats.generated_tokens,
        stats.decode_secs,
        stats.decode_tps(),
        if stats.stopped_at_eos { "; stopped at EOS" } else { "" }
    );
    eprint!(
        "GPU memory (VRAM ledger):\n{}",
        gpu.ledger.report().to_table()
    );
    Ok(())
}

pub(crate) fn top_k_of(row: &[f32], k: usize) -> Vec<(u32, f32)> {
    let mut v: Vec<(u32, f32)> = row
        .iter()
        .enumerate()
        .map(|(i, &x)| (i as u32, x))
        .collect();
    v.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    v.truncate(k);
    v
}

pub(crate) fn logits(
    gpu: &Gpu,
    m: &ModelArgs,
    prompt: &str,
    k: usize,
    all: bool,
    json: bool,
) -> Result<()> {
    let mut lm = load_model(gpu, m, all)?;
    let ids = lm.tokenizer.encode(prompt, true)?;
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
        let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
        let lse = max
            + row
                .iter()
                .map(|&v| (v as f64 - max).exp())
                .sum::<f64>()
                .ln();
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

pub(crate) fn perplexity(
    gpu: &Gpu,
    m: &ModelArgs,
    file: &std::path::Path,
    json: bool,
) -> Result<()> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let text = text.strip_suffix('\n').unwrap_or(&text);
    let mut lm = load_model(gpu, m, true)?;
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

pub(crate) fn embed(
    gpu: &Gpu,
    sentences: &[String],
    model: Option<&std::path::Path>,
    precision: Option<&str>,
    full: bool,
    json: bool,
) -> Result<()> {
    use wgllm::model::bert::{cosine, Bert};
    let dir = match model {
        Some(p) => p.to_path_buf(),
        None => wgllm::fetch::MINILM.ensure(&mut |s| eprintln!("{s}"))?,
    };
    let hf = wgllm::loader::safetensors::HfModel::open(&dir)?;
    let cfg = wgllm::model::config::ModelConfig::from_hf_json(hf.config())?;
    let precision = precision.map(parse_precision).transpose()?;
    let mut tok = wgllm::tokenizer::Tokenizer::from_file(&dir.join("tokenizer.json"))?;
    // Cut where sentence-transformers cuts (256 for MiniLM, not tokenizer.json's 128); without
    // that file, never cut and let the model refuse what is past its positions.
    let max_len = wgllm::model::bert::sentence_max_length(&dir).map(|n| n.min(cfg.max_positions));
    tok.set_max_length(max_len)?;
    let max = cfg.max_positions;
    let mut bert = Bert::load(
        gpu,
        cfg,
        &wgllm::model::source::Source::Hf(&hf, precision),
        max,
    )?;
    let mut vecs = Vec::new();
    for s in sentences {
        let ids = tok.encode(s, true)?;
        vecs.push(bert.embed(gpu, &ids)?);
    }
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
