//! The `wgllm` command line. Only this file (and the report formatting it calls) prints; the library
//! returns values and errors.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

mod cli;
use cli::*;

use wgllm::gpu::ledger::parse_bytes;
use wgllm::gpu::{Gpu, GpuOptions};

#[derive(Parser)]
#[command(
    name = "wgllm",
    version,
    about = "GPU compute-shader inference for transformer language models (wgpu)"
)]
struct Cli {
    /// Adapter index from `wgllm devices` (default: WGPU_ADAPTER_NAME, else the best adapter).
    #[arg(long, global = true)]
    device: Option<usize>,
    /// VRAM budget for every GPU buffer wgllm creates, e.g. 12GiB (default: unlimited).
    #[arg(long, global = true, value_parser = parse_budget)]
    budget: Option<u64>,
    #[command(subcommand)]
    cmd: Cmd,
}

fn parse_budget(s: &str) -> Result<u64, String> {
    parse_bytes(s).map_err(|e| e.to_string())
}

#[derive(Subcommand)]
enum Cmd {
    /// List GPU adapters with backend, type, driver, features, limits and memory.
    Devices {
        #[arg(long)]
        json: bool,
    },
    /// Run every kernel variant on this device against its CPU reference.
    Selftest {
        #[arg(long)]
        json: bool,
    },
    /// Generate text (default model: SmolLM2-135M-Instruct, fetched on first use).
    Run {
        /// The prompt.
        prompt: String,
        #[command(flatten)]
        model: ModelArgs,
        #[command(flatten)]
        sampling: SamplingArgs,
        /// Tokens to generate.
        #[arg(short = 'n', long = "n-predict", default_value_t = 128)]
        n_predict: usize,
        /// Wrap the prompt in the model's chat template (from its metadata).
        #[arg(long)]
        chat: bool,
    },
    /// Print the top logits of the last prompt token (compare with any other runtime).
    Logits {
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
    },
    /// Perplexity of a text file, as llama.cpp's `perplexity` computes it.
    Perplexity {
        #[command(flatten)]
        model: ModelArgs,
        /// The text file.
        #[arg(short = 'f', long)]
        file: std::path::PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Sentence embeddings with an encoder (default: all-MiniLM-L6-v2); with several sentences,
    /// their cosine similarities.
    Embed {
        /// Sentences to embed.
        #[arg(required = true)]
        sentences: Vec<String>,
        /// A Hugging Face BERT directory (config.json, model.safetensors, tokenizer.json).
        #[arg(short = 'm', long)]
        model: Option<std::path::PathBuf>,
        /// Quantise weights on load: f32, f16, int8, int4.
        #[arg(long)]
        precision: Option<String>,
        /// Print the full vectors.
        #[arg(long)]
        full: bool,
        #[arg(long)]
        json: bool,
    },
    /// Will it fit? Parameter counts, bytes per precision and the VRAM plan by class. Exits 0 when
    /// the plan fits the budget, 2 when it does not.
    Plan {
        /// A GGUF file or Hugging Face directory.
        #[arg(short = 'm', long)]
        model: Option<std::path::PathBuf>,
        /// A Hugging Face config.json.
        #[arg(long)]
        config: Option<std::path::PathBuf>,
        /// A built-in preset (--list shows them).
        #[arg(long)]
        preset: Option<String>,
        /// List the presets.
        #[arg(long)]
        list: bool,
        /// Weight precision: f32, f16, bf16, int8/q8_0, int4/q4_0, q4_1 (default: f16, or a GGUF file's own).
        #[arg(long)]
        precision: Option<String>,
        /// KV cache type: f32, f16, q8_0.
        #[arg(long, default_value = "f16")]
        kv: String,
        /// Context length.
        #[arg(short = 'c', long = "ctx", default_value_t = 2048)]
        ctx: usize,
        /// Tokens per prefill chunk.
        #[arg(long, default_value_t = 64)]
        chunk: usize,
        /// Add the training footprint (gradients, Adam moments, saved activations).
        #[arg(long)]
        train: bool,
        /// Batch size for --train.
        #[arg(long, default_value_t = 1)]
        batch: usize,
        /// Sequence length for --train (default: --ctx).
        #[arg(long)]
        seq: Option<usize>,
        #[arg(long)]
        json: bool,
        /// Write a stacked bar chart of the plan as SVG.
        #[arg(long)]
        svg: Option<std::path::PathBuf>,
    },
    /// Run a model for some tokens and print planned against measured bytes per class, the peak,
    /// and GPU time per op from timestamp queries.
    Profile {
        #[command(flatten)]
        model: ModelArgs,
        /// A built-in preset with --synthetic weights instead of a file.
        #[arg(long)]
        preset: Option<String>,
        #[arg(long)]
        synthetic: bool,
        /// Prompt tokens, then decoded tokens.
        #[arg(short = 'p', long, default_value_t = 32)]
        prompt_tokens: usize,
        #[arg(short = 'n', long, default_value_t = 8)]
        tokens: usize,
        #[arg(long)]
        json: bool,
    },
    /// Benchmarks: `bench kernels` times the matrix kernels per precision.
    Bench {
        #[command(subcommand)]
        what: BenchCmd,
    },
}

#[derive(Subcommand)]
enum BenchCmd {
    /// Matrix-vector (1 token) and matrix-matrix (prefill) kernels per weight format on 7B/13B shapes.
    Kernels {
        /// Formats to run (comma-separated: f32,f16,q8_0,q4_0,q4_1).
        #[arg(long, value_delimiter = ',')]
        formats: Option<Vec<String>>,
        /// Token counts (comma-separated); 1 is decode, more is prefill.
        #[arg(long, value_delimiter = ',', default_values_t = vec![1usize, 128])]
        tokens: Vec<usize>,
        /// Only the 4096x4096 shape.
        #[arg(long)]
        quick: bool,
        /// Timed repetitions per case (after one warm-up).
        #[arg(long, default_value_t = 5)]
        reps: usize,
        #[arg(long)]
        json: bool,
    },
    /// Prompt processing (pp) and text generation (tg) tokens/s, like llama-bench.
    Model {
        #[command(flatten)]
        model: ModelArgs,
        /// A built-in preset (see `wgllm plan --list`) instead of a file; needs --synthetic.
        #[arg(long)]
        preset: Option<String>,
        /// Random weights of the real shapes, made on the fly (no file).
        #[arg(long)]
        synthetic: bool,
        /// Prompt tokens for the pp test (0 skips it).
        #[arg(short = 'p', long = "n-prompt", default_value_t = 512)]
        pp: usize,
        /// Generated tokens for the tg test (0 skips it).
        #[arg(short = 'n', long = "n-gen", default_value_t = 128)]
        tg: usize,
        /// Repetitions of each test.
        #[arg(short = 'r', long = "repetitions", default_value_t = 5)]
        reps: usize,
        /// Context depth: both tests run after this many tokens already in the KV cache (a prompt
        /// processed once, untimed), like llama-bench's -d.
        #[arg(short = 'd', long = "n-depth", default_value_t = 0)]
        depth: usize,
        #[arg(long)]
        json: bool,
    },
}

/// Which model to load and how.
#[derive(clap::Args, Clone)]
struct ModelArgs {
    /// A GGUF file or a Hugging Face directory (config.json + safetensors); default: SmolLM2.
    #[arg(short = 'm', long)]
    model: Option<std::path::PathBuf>,
    /// Context length (KV cache positions).
    #[arg(short = 'c', long = "ctx-size", default_value_t = 2048)]
    ctx: usize,
    /// KV cache type: f32, f16 or q8_0.
    #[arg(long, default_value = "f16")]
    kv: String,
    /// Quantise safetensors weights on load: f32, f16, int8 (q8_0) or int4 (q4_0), or a format name.
    #[arg(long)]
    precision: Option<String>,
    /// Tokens per prefill chunk.
    #[arg(long, default_value_t = 64)]
    chunk: usize,
    /// Layers kept on the GPU; the rest stream from host memory through two layer slots, so a
    /// model larger than --budget still runs. A number, "all", or "auto": all unless --budget is
    /// given and the memory plan says the model does not fit it, then as many as the plan fits.
    #[arg(long, default_value = "auto")]
    resident_layers: String,
}

/// Sampling flags, named as llama.cpp names them.
#[derive(clap::Args, Clone)]
struct SamplingArgs {
    /// Temperature; 0 is greedy.
    #[arg(long = "temp", default_value_t = 0.8)]
    temperature: f32,
    #[arg(long, default_value_t = 40)]
    top_k: usize,
    #[arg(long, default_value_t = 0.95)]
    top_p: f32,
    #[arg(long, default_value_t = 1.0)]
    repeat_penalty: f32,
    #[arg(long, default_value_t = 64)]
    repeat_last_n: usize,
    /// Random seed (default: from the clock).
    #[arg(short = 's', long)]
    seed: Option<u64>,
}

fn gpu_options(cli: &Cli) -> GpuOptions {
    GpuOptions {
        adapter: cli.device,
        budget: cli.budget,
        ..Default::default()
    }
}

fn main() -> Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = Cli::parse();
    match &cli.cmd {
        Cmd::Devices { json } => devices(*json),
        Cmd::Selftest { json } => {
            let gpu = Gpu::new(&gpu_options(&cli)).context("opening the GPU")?;
            selftest(&gpu, *json)
        }
        Cmd::Run {
            prompt,
            model,
            sampling,
            n_predict,
            chat,
        } => {
            let gpu = Gpu::new(&gpu_options(&cli)).context("opening the GPU")?;
            run(&gpu, prompt, model, sampling, *n_predict, *chat)
        }
        Cmd::Logits {
            model,
            prompt,
            top_k,
            all,
            json,
        } => {
            let gpu = Gpu::new(&gpu_options(&cli)).context("opening the GPU")?;
            logits(&gpu, model, prompt, *top_k, *all, *json)
        }
        Cmd::Perplexity { model, file, json } => {
            let gpu = Gpu::new(&gpu_options(&cli)).context("opening the GPU")?;
            perplexity(&gpu, model, file, *json)
        }
        Cmd::Bench {
            what:
                BenchCmd::Model {
                    model,
                    preset,
                    synthetic,
                    pp,
                    tg,
                    reps,
                    depth,
                    json,
                },
        } => {
            let gpu = Gpu::new(&gpu_options(&cli)).context("opening the GPU")?;
            bench_model(
                &gpu,
                model,
                preset.as_deref(),
                *synthetic,
                wgllm::bench::ModelBenchOptions {
                    pp: *pp,
                    tg: *tg,
                    reps: (*reps).max(1),
                    depth: *depth,
                },
                *json,
            )
        }
        Cmd::Embed {
            sentences,
            model,
            precision,
            full,
            json,
        } => {
            let gpu = Gpu::new(&gpu_options(&cli)).context("opening the GPU")?;
            embed(
                &gpu,
                sentences,
                model.as_deref(),
                precision.as_deref(),
                *full,
                *json,
            )
        }
        Cmd::Plan {
            model,
            config,
            preset,
            list,
            precision,
            kv,
            ctx,
            chunk,
            train,
            batch,
            seq,
            json,
            svg,
        } => {
            if *list {
                for n in wgllm::model::config::preset_names() {
                    println!("{n}");
                }
                return Ok(());
            }
            let args = PlanArgs {
                precision: precision.clone(),
                kv: kv.clone(),
                ctx: *ctx,
                chunk: *chunk,
                train: *train,
                batch: *batch,
                seq: *seq,
            };
            let fits = plan(
                cli.budget,
                model.as_deref(),
                config.as_deref(),
                preset.as_deref(),
                &args,
                *json,
                svg.as_deref(),
            )?;
            if !fits {
                std::process::exit(2);
            }
            Ok(())
        }
        Cmd::Profile {
            model,
            preset,
            synthetic,
            prompt_tokens,
            tokens,
            json,
        } => {
            let gpu = Gpu::new(&gpu_options(&cli)).context("opening the GPU")?;
            profile(
                &gpu,
                cli.budget,
                model,
                preset.as_deref(),
                *synthetic,
                *prompt_tokens,
                *tokens,
                *json,
            )
        }
        Cmd::Bench {
            what:
                BenchCmd::Kernels {
                    formats,
                    tokens,
                    quick,
                    reps,
                    json,
                },
        } => {
            let gpu = Gpu::new(&gpu_options(&cli)).context("opening the GPU")?;
            bench_kernels(&gpu, formats.as_deref(), tokens, *quick, *reps, *json)
        }
    }
}
