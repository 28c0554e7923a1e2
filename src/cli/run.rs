//! `wgllm run`: generate text from a prompt, streamed as it is sampled.

use anyhow::Result;

use super::load::load_model;
use super::{Global, ModelArgs, SamplingArgs};

#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    /// The prompt.
    prompt: String,
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// Tokens to generate.
    #[arg(short = 'n', long = "n-predict", default_value_t = 128)]
    n_predict: usize,
    /// Wrap the prompt in the model's chat template as a user message (the template from its
    /// metadata, or a built-in one chosen by architecture and vocabulary when it has none).
    #[arg(long)]
    chat: bool,
    /// Keep generating past EOS and end-of-turn tokens, up to -n tokens or the context
    /// (llama.cpp's --ignore-eos).
    #[arg(long)]
    ignore_eos: bool,
}

pub(crate) fn run(a: Args, g: &Global) -> Result<()> {
    let gpu = &g.gpu()?;
    let Args {
        prompt,
        model: m,
        sampling: s,
        n_predict: n,
        chat,
        ignore_eos,
    } = a;
    use std::io::Write;
    use wgllm::sampler::{Sampler, SamplerConfig};
    let mut lm = load_model(gpu, &m, false)?;
    let (text, ids) = if chat {
        use wgllm::model::chat::{encode_prompt, Message, RenderArgs};
        let tmpl = &lm.chat_template;
        if tmpl.as_builtin().is_some() {
            eprintln!("chat template: {}", tmpl.origin());
        }
        let args = RenderArgs::for_tokenizer(&lm.tokenizer, true);
        let text = tmpl.render(&[Message::new("user", prompt)], &args)?;
        let ids = encode_prompt(&lm.tokenizer, &text)?;
        (text, ids)
    } else {
        let ids = lm.tokenizer.encode(&prompt, true)?;
        (prompt, ids)
    };
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
        ..Default::default()
    });
    print!("{text}");
    std::io::stdout().flush()?;
    let (_, stats) = wgllm::model::generate::generate_with(
        lm.model.as_mut(),
        gpu,
        &lm.tokenizer,
        &ids,
        n,
        ignore_eos,
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
        if stats.stopped_at_eos { "; stopped at end of turn" } else { "" }
    );
    eprint!(
        "GPU memory (VRAM ledger):\n{}",
        gpu.ledger.report().to_table()
    );
    Ok(())
}
