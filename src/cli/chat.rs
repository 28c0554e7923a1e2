//! `wgllm chat`: a conversation in the terminal on the serving engine (one slot), streamed, with
//! the KV cache kept across turns so that each turn computes only its new tokens.

use std::io::{BufRead, Write};
use std::sync::Arc;

use anyhow::Result;
use wgllm::model::chat::{encode_prompt, Message, RenderArgs};
use wgllm::serve::{Event, GenParams, GenRequest};

use super::{Global, ModelArgs, SamplingArgs};

#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// Most tokens per reply.
    #[arg(short = 'n', long = "n-predict", default_value_t = 1024)]
    n_predict: usize,
    /// A system message that opens the conversation.
    #[arg(long)]
    system: Option<String>,
}

pub(crate) fn run(a: Args, g: &Global) -> Result<()> {
    let gpu = Arc::new(g.gpu()?);
    let engine = super::serve::start_engine(&gpu, &a.model, 1, 1, true)?;
    let info = engine.info.clone();
    if info.chat_template.as_builtin().is_some() {
        eprintln!("chat template: {}", info.chat_template.origin());
    }
    eprintln!("/reset starts a new conversation, /exit (or Ctrl-D) leaves");
    let opening: Vec<Message> = a
        .system
        .iter()
        .map(|s| Message::new("system", s.clone()))
        .collect();
    let mut messages = opening.clone();
    let base_seed = a.sampling.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
    });
    let stdin = std::io::stdin();
    let mut out = std::io::stdout();
    for turn in 0u64.. {
        print!("> ");
        out.flush()?;
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 {
            println!();
            break;
        }
        let line = line.trim();
        match line {
            "" => continue,
            "/exit" | "/quit" => break,
            "/reset" => {
                messages = opening.clone();
                eprintln!("(new conversation)");
                continue;
            }
            _ => {}
        }
        messages.push(Message::new("user", line));
        let args = RenderArgs::for_tokenizer(&info.tokenizer, true);
        let text = info.chat_template.render(&messages, &args)?;
        let prompt = encode_prompt(&info.tokenizer, &text)?;
        if prompt.len() >= info.context {
            eprintln!(
                "the conversation has {} tokens, the context {} (-c): /reset to start again",
                prompt.len(),
                info.context
            );
            messages.pop();
            continue;
        }
        let s = &a.sampling;
        let params = GenParams {
            max_tokens: a.n_predict.max(1),
            sampling: wgllm::sampler::SamplerConfig {
                temperature: s.temperature,
                top_k: s.top_k,
                top_p: s.top_p,
                repeat_penalty: s.repeat_penalty,
                repeat_last_n: s.repeat_last_n,
                seed: base_seed.wrapping_add(turn),
                ..Default::default()
            },
            stop: Vec::new(),
            logprobs: None,
            ignore_eos: false,
        };
        let t = std::time::Instant::now();
        let mut rx = engine
            .submit(GenRequest { prompt, params })
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let mut reply = String::new();
        while let Some(ev) = rx.blocking_recv() {
            match ev {
                Event::Token { text, .. } => {
                    print!("{text}");
                    out.flush()?;
                    reply.push_str(&text);
                }
                Event::Done { usage, .. } => {
                    println!();
                    eprintln!(
                        "[{} prompt tokens, {} from the cache; {} tokens in {:.1} s]",
                        usage.prompt_tokens,
                        usage.cached_tokens,
                        usage.completion_tokens,
                        t.elapsed().as_secs_f64()
                    );
                    break;
                }
                Event::Error(e) => anyhow::bail!("generation failed: {e}"),
            }
        }
        messages.push(Message::new("assistant", reply));
    }
    Ok(())
}
