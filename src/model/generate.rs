//! Text generation: prefill the prompt, then decode one token at a time through the KV cache,
//! sampling each next token and streaming its text; stops at EOS, at `n` tokens or when the
//! context is full.

use std::time::Instant;

use serde::Serialize;

use crate::error::Result;
use crate::gpu::Gpu;
use crate::sampler::Sampler;
use crate::tokenizer::{TextStream, Tokenizer};

/// A causal language model: logits for tokens at positions `pos0..`.
pub trait CausalLm {
    /// Logits of the last token (`[vocab]`), or of every token with `all_logits` set.
    fn forward(&mut self, gpu: &Gpu, tokens: &[u32], pos0: usize) -> Result<Vec<f32>>;
    fn vocab_size(&self) -> usize;
    /// KV-cache positions.
    fn context(&self) -> usize;
    /// Return logits for every token of a forward call (perplexity, `wgllm logits`).
    fn set_all_logits(&mut self, all: bool);
    /// Weight bytes one decoded token reads (every matrix of every layer and the output head;
    /// one embedding row is negligible).
    fn weight_bytes_per_token(&self) -> u64 {
        0
    }
    /// KV-cache bytes one decoded token reads at position `pos` (keys and values of all layers).
    fn kv_bytes_per_token(&self, _pos: usize) -> u64 {
        0
    }
    /// Turns per-dispatch GPU timing on or off (`wgllm profile`).
    fn set_profiling(&mut self, _on: bool) {}
    /// The dispatch times gathered since profiling was turned on.
    fn take_profile(&mut self) -> Vec<crate::gpu::record::DispatchTime> {
        Vec::new()
    }
}

/// Runs `tokens` (at positions `pos0..`) through `run_chunk(chunk, pos, want_logits)` in chunks of
/// at most `chunk` tokens and gathers the logits: every chunk's with `all_logits`, else only the
/// last chunk's (the others are run without asking for logits).
pub fn in_chunks(
    tokens: &[u32],
    pos0: usize,
    chunk: usize,
    all_logits: bool,
    mut run_chunk: impl FnMut(&[u32], usize, bool) -> Result<Vec<f32>>,
) -> Result<Vec<f32>> {
    let mut out = Vec::new();
    let mut done = 0;
    while done < tokens.len() {
        let m = (tokens.len() - done).min(chunk.max(1));
        let last = done + m == tokens.len();
        let logits = run_chunk(&tokens[done..done + m], pos0 + done, all_logits || last)?;
        if all_logits {
            out.extend(logits);
        } else if last {
            out = logits;
        }
        done += m;
    }
    Ok(out)
}

/// Timings of one generation.
#[derive(Debug, Clone, Default, Serialize)]
pub struct GenStats {
    pub prompt_tokens: usize,
    pub prefill_secs: f64,
    pub generated_tokens: usize,
    /// Time of the decode steps (every generated token after the first).
    pub decode_secs: f64,
    pub stopped_at_eos: bool,
}

impl GenStats {
    pub fn prefill_tps(&self) -> f64 {
        self.prompt_tokens as f64 / self.prefill_secs.max(1e-9)
    }
    pub fn decode_tps(&self) -> f64 {
        self.generated_tokens.saturating_sub(1) as f64 / self.decode_secs.max(1e-9)
    }
}

/// Generates up to `n` tokens after `prompt`. `on_text` receives text as it is completed and
/// returns false to stop early.
pub fn generate(
    model: &mut dyn CausalLm,
    gpu: &Gpu,
    tok: &Tokenizer,
    prompt: &[u32],
    n: usize,
    sampler: &mut Sampler,
    on_text: &mut dyn FnMut(&str) -> bool,
) -> Result<(Vec<u32>, GenStats)> {
    model.set_all_logits(false);
    let mut stats = GenStats {
        prompt_tokens: prompt.len(),
        ..Default::default()
    };
    let mut history = prompt.to_vec();
    let mut out = Vec::new();
    let mut stream = TextStream::new(tok);
    let room = model.context().saturating_sub(prompt.len());
    let n = n.min(room);
    if n == 0 {
        return Ok((out, stats));
    }
    let t = Instant::now();
    let mut logits = model.forward(gpu, prompt, 0)?;
    stats.prefill_secs = t.elapsed().as_secs_f64();
    let t = Instant::now();
    loop {
        let next = sampler.sample(&logits, &history);
        history.push(next);
        out.push(next);
        stats.generated_tokens += 1;
        if Some(next) == tok.eos {
            stats.stopped_at_eos = true;
            break;
        }
        if !on_text(&stream.push(next)?) || out.len() >= n {
            break;
        }
        logits = model.forward(gpu, &[next], history.len() - 1)?;
    }
    stats.decode_secs = t.elapsed().as_secs_f64();
    Ok((out, stats))
}

/// Renders a chat prompt with the model's Jinja chat template (`tokenizer.chat_template`).
pub fn apply_chat_template(template: &str, user: &str, bos: &str, eos: &str) -> Result<String> {
    let err = |e: minijinja::Error| crate::Error::Tokenizer {
        reason: format!("chat template: {e}"),
    };
    let mut env = minijinja::Environment::new();
    env.add_template("chat", template).map_err(err)?;
    let tmpl = env.get_template("chat").map_err(err)?;
    tmpl.render(minijinja::context! {
        messages => vec![minijinja::context! { role => "user", content => user }],
        add_generation_prompt => true,
        bos_token => bos,
        eos_token => eos,
    })
    .map_err(err)
}

/// Perplexity as llama.cpp's `perplexity` computes it: the tokens are cut into chunks of `ctx`
/// (the remainder is dropped), each chunk runs from an empty cache, and only the second half of
/// each chunk is scored (the logits at positions `ctx/2 .. ctx-1` predict the next token), so every
/// scored token has at least `ctx/2` tokens of context. Returns (perplexity, mean NLL per chunk).
pub fn perplexity(
    model: &mut dyn CausalLm,
    gpu: &Gpu,
    tokens: &[u32],
    ctx: usize,
) -> Result<(f64, Vec<f64>)> {
    if ctx < 2 || tokens.len() < ctx || ctx > model.context() {
        return Err(crate::Error::invalid(
            "perplexity",
            format!("need at least one chunk of {ctx} tokens (have {}), and ctx <= the model's context {}", tokens.len(), model.context()),
        ));
    }
    model.set_all_logits(true);
    let vocab = model.vocab_size();
    let mut total = 0.0;
    let mut count = 0usize;
    let mut per_chunk = Vec::new();
    for chunk in tokens.chunks_exact(ctx) {
        let logits = model.forward(gpu, chunk, 0)?;
        let mut nll = 0.0;
        let first = ctx / 2;
        for pos in first..ctx - 1 {
            let row = &logits[pos * vocab..(pos + 1) * vocab];
            let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
            let lse = max
                + row
                    .iter()
                    .map(|&v| (v as f64 - max).exp())
                    .sum::<f64>()
                    .ln();
            nll += lse - row[chunk[pos + 1] as usize] as f64;
        }
        let n = ctx - 1 - first;
        per_chunk.push(nll / n as f64);
        total += nll;
        count += n;
    }
    model.set_all_logits(false);
    Ok(((total / count as f64).exp(), per_chunk))
}
