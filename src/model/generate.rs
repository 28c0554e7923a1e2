//! Text generation: prefill the prompt, then decode one token at a time through the KV cache,
//! sampling each next token and streaming its text; stops at EOS or an end-of-turn token
//! ([`Tokenizer::stop_ids`]), at `n` tokens or when the context is full.

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
    /// Layers kept on the GPU when the rest stream from host memory; `None`: all resident.
    fn resident_layers(&self) -> Option<usize> {
        None
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
    /// Generation ended at EOS or an end-of-turn token ([`Tokenizer::stop_ids`]).
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
    generate_with(model, gpu, tok, prompt, n, false, sampler, on_text)
}

/// [`generate`], and with `ignore_eos` it keeps going past EOS and end-of-turn tokens
/// (llama.cpp's `--ignore-eos`) until `n` tokens or the context: long runs of a fixed length.
#[allow(clippy::too_many_arguments)]
pub fn generate_with(
    model: &mut dyn CausalLm,
    gpu: &Gpu,
    tok: &Tokenizer,
    prompt: &[u32],
    n: usize,
    ignore_eos: bool,
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
        if !ignore_eos && tok.is_stop(next) {
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

/// Which definition of perplexity a [`Perplexity`] used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PplMethod {
    /// llama.cpp's `perplexity`: the tokens are cut into chunks of `ctx` (the remainder is
    /// dropped), each chunk runs from an empty cache, and only the second half of each chunk is
    /// scored, so every scored token has at least `ctx/2` tokens of context.
    Chunks,
    /// A text shorter than one context, in one window: every token after the first is scored
    /// (how Hugging Face evaluates a fixed-length model on a short text).
    Window,
    /// `--ppl-stride`: windows of up to `ctx` tokens every `stride` tokens, each from an empty
    /// cache; a window scores the tokens past the previous window's end, so every token after the
    /// first is scored exactly once, with up to `ctx` tokens of context (at least `ctx - stride`
    /// past the first window). Hugging Face's strided evaluation; llama.cpp's `--ppl-stride`
    /// scores the same windows' last `stride` tokens but leaves the first window's head out.
    Strided,
}

impl PplMethod {
    /// One line for the output: what was scored.
    pub fn describe(self) -> &'static str {
        match self {
            PplMethod::Chunks => {
                "llama.cpp's chunks: chunks of ctx tokens, the second half of each scored"
            }
            PplMethod::Window => {
                "one window: the text is shorter than ctx, every token after the first scored"
            }
            PplMethod::Strided => {
                "strided: windows of ctx tokens every stride tokens, every token after the first scored once"
            }
        }
    }
}

/// A perplexity and how it was computed.
#[derive(Debug, Clone, Serialize)]
pub struct Perplexity {
    pub method: PplMethod,
    pub ctx: usize,
    /// Windows' stride ([`PplMethod::Strided`] only).
    pub stride: Option<usize>,
    pub tokens: usize,
    /// Tokens scored, over all chunks or windows.
    pub scored: usize,
    /// Mean negative log-likelihood (natural log) of each chunk or window's scored tokens.
    pub window_mean_nll: Vec<f64>,
    pub mean_nll: f64,
    pub perplexity: f64,
}

/// Perplexity of `tokens` with windows of `ctx` tokens: with `stride`, [`PplMethod::Strided`];
/// without, llama.cpp's [`PplMethod::Chunks`] when the text holds at least one chunk of `ctx`
/// tokens, else the whole text as one [`PplMethod::Window`].
pub fn perplexity(
    model: &mut dyn CausalLm,
    gpu: &Gpu,
    tokens: &[u32],
    ctx: usize,
    stride: Option<usize>,
) -> Result<Perplexity> {
    let invalid = |m: String| crate::Error::invalid("perplexity", m);
    if tokens.len() < 2 {
        return Err(invalid(format!(
            "the text has {} token(s); at least 2 are needed to score one",
            tokens.len()
        )));
    }
    if ctx < 2 || ctx > model.context() {
        return Err(invalid(format!(
            "a context of {ctx} tokens: it must be at least 2 and at most the {} positions the model was loaded with (-c)",
            model.context()
        )));
    }
    // Each window: (first token, tokens, first scored position within the window).
    let mut windows: Vec<(usize, usize, usize)> = Vec::new();
    let method = match stride {
        Some(stride) => {
            if stride == 0 || stride >= ctx {
                return Err(invalid(format!(
                    "--ppl-stride {stride}: give 1 .. {} (below the context {ctx}, so that windows overlap and every token is scored)",
                    ctx - 1
                )));
            }
            let (mut begin, mut prev_end) = (0, 0);
            loop {
                let end = (begin + ctx).min(tokens.len());
                let first = prev_end.max(begin + 1) - begin;
                windows.push((begin, end - begin, first));
                if end == tokens.len() {
                    break;
                }
                prev_end = end;
                begin += stride;
            }
            PplMethod::Strided
        }
        None if tokens.len() < ctx => {
            windows.push((0, tokens.len(), 1));
            PplMethod::Window
        }
        None => {
            for c in 0..tokens.len() / ctx {
                windows.push((c * ctx, ctx, ctx / 2 + 1));
            }
            PplMethod::Chunks
        }
    };
    model.set_all_logits(true);
    let scored = score_windows(model, gpu, tokens, &windows);
    model.set_all_logits(false);
    let (window_mean_nll, counts): (Vec<f64>, Vec<usize>) = scored?.into_iter().unzip();
    let scored: usize = counts.iter().sum();
    let total: f64 = window_mean_nll
        .iter()
        .zip(&counts)
        .map(|(m, &c)| m * c as f64)
        .sum();
    let mean_nll = total / scored as f64;
    Ok(Perplexity {
        method,
        ctx,
        stride: stride.filter(|_| method == PplMethod::Strided),
        tokens: tokens.len(),
        scored,
        window_mean_nll,
        mean_nll,
        perplexity: mean_nll.exp(),
    })
}

/// `ln(sum(exp(row)))` in f64, shifted by the maximum so that no term overflows: a logit row's
/// normaliser (`logit - log_sum_exp` is the log-probability).
pub fn log_sum_exp(row: &[f32]) -> f64 {
    let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    max + row
        .iter()
        .map(|&v| (v as f64 - max).exp())
        .sum::<f64>()
        .ln()
}

/// Runs each window `(begin, len, first)` from an empty cache and scores its tokens at positions
/// `first .. len` (the logits at `p - 1` predict token `p`): (mean NLL, tokens scored) each.
fn score_windows(
    model: &mut dyn CausalLm,
    gpu: &Gpu,
    tokens: &[u32],
    windows: &[(usize, usize, usize)],
) -> Result<Vec<(f64, usize)>> {
    let vocab = model.vocab_size();
    let mut out = Vec::with_capacity(windows.len());
    for &(begin, len, first) in windows {
        let window = &tokens[begin..begin + len];
        let logits = model.forward(gpu, window, 0)?;
        let mut nll = 0.0;
        for p in first..len {
            let row = &logits[(p - 1) * vocab..p * vocab];
            nll += log_sum_exp(row) - row[window[p] as usize] as f64;
        }
        out.push((nll / (len - first) as f64, len - first));
    }
    Ok(out)
}
