//! The `wgllm` command line: the subcommands and their dispatch. Each subcommand's flags and body
//! live in its own `src/cli/` module (one clap `Args` struct, one `run` function), so adding a flag
//! touches one file. Only the CLI prints; the library returns values and errors.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod cli;

#[derive(Parser)]
#[command(
    name = "wgllm",
    version,
    about = "GPU compute-shader inference for transformer language models (wgpu)"
)]
struct Cli {
    #[command(flatten)]
    global: cli::Global,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// List GPU adapters with backend, type, driver, features, limits and memory.
    Devices(cli::devices::Args),
    /// The models wgllm fetches by name (`-m NAME`), and whether they are cached.
    Models(cli::models::Args),
    /// Run every kernel variant on this device against its CPU reference.
    Selftest(cli::selftest::Args),
    /// Generate text (default model: SmolLM2-135M-Instruct, fetched on first use).
    Run(cli::run::Args),
    /// Token ids and pieces of a text (as llama-tokenize); reads only the vocabulary.
    Tokenize(cli::tokenize::Args),
    /// Print the top logits of the last prompt token (compare with any other runtime).
    Logits(cli::logits::Args),
    /// Perplexity of a text file: llama.cpp's chunks, one window for a short text, or strided.
    Perplexity(cli::perplexity::Args),
    /// Sentence embeddings with an encoder (default: all-MiniLM-L6-v2); with several sentences,
    /// their cosine similarities.
    Embed(cli::embed::Args),
    /// Will it fit? Parameter counts, bytes per precision and the VRAM plan by class. Exits 0 when
    /// the plan fits the budget, 2 when it does not.
    Plan(cli::plan::Args),
    /// Run a model for some tokens and print planned against measured bytes per class, the peak,
    /// and GPU time per op from timestamp queries.
    Profile(cli::profile::Args),
    /// An OpenAI-compatible HTTP server (chat, completions, embeddings) with continuous batching.
    Serve(cli::serve::Args),
    /// Chat with a model in the terminal: multi-turn, streamed, the cache kept across turns.
    Chat(cli::chat::Args),
    /// Benchmarks: `bench kernels` times the matrix kernels per precision, `bench model` a model.
    Bench(cli::bench::Args),
}

fn main() -> ExitCode {
    let Cli { global, cmd } = Cli::parse();
    cli::prepare_process(global.verbose);
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let result = match cmd {
        Cmd::Devices(a) => cli::devices::run(a),
        Cmd::Models(a) => cli::models::run(a),
        Cmd::Selftest(a) => cli::selftest::run(a, &global),
        Cmd::Run(a) => cli::run::run(a, &global),
        Cmd::Tokenize(a) => cli::tokenize::run(a),
        Cmd::Logits(a) => cli::logits::run(a, &global),
        Cmd::Perplexity(a) => cli::perplexity::run(a, &global),
        Cmd::Embed(a) => cli::embed::run(a, &global),
        Cmd::Plan(a) => match cli::plan::run(a, &global) {
            // A plan that does not fit is an answer, not an error: exit 2 without a message.
            Ok(false) => return ExitCode::from(2),
            other => other.map(|_| ()),
        },
        Cmd::Profile(a) => cli::profile::run(a, &global),
        Cmd::Bench(a) => cli::bench::run(a, &global),
        Cmd::Serve(a) => cli::serve::run(a, &global),
        Cmd::Chat(a) => cli::chat::run(a, &global),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            cli::report_error(&e, global.verbose);
            ExitCode::FAILURE
        }
    }
}
