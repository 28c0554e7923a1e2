//! The subcommands, one module each: its clap `Args` struct and its `run` entry function. What
//! several share lives here: the global flags, which model to load and how ([`ModelArgs`]), the
//! sampling flags, and how an error reaches the user.

pub(crate) mod bench;
pub(crate) mod chat;
pub(crate) mod devices;
pub(crate) mod embed;
pub(crate) mod load;
pub(crate) mod logits;
pub(crate) mod models;
pub(crate) mod perplexity;
pub(crate) mod plan;
pub(crate) mod profile;
pub(crate) mod run;
pub(crate) mod selftest;
pub(crate) mod serve;
pub(crate) mod tokenize;

use anyhow::{Context, Result};
use wgllm::gpu::ledger::parse_bytes;
use wgllm::gpu::{Gpu, GpuOptions};

/// Flags every subcommand takes.
#[derive(clap::Args, Clone, Debug)]
pub(crate) struct Global {
    /// Adapter index from `wgllm devices` (default: WGPU_ADAPTER_NAME, else the best adapter).
    #[arg(long, global = true)]
    pub(crate) device: Option<usize>,
    /// VRAM budget for every GPU buffer wgllm creates, e.g. 12GiB (default: unlimited).
    #[arg(long, global = true, value_parser = parse_budget)]
    pub(crate) budget: Option<u64>,
    /// On an error, print where it came from (a backtrace) as well; also WGLLM_BACKTRACE=1.
    #[arg(short = 'v', long, global = true)]
    pub(crate) verbose: bool,
}

impl Global {
    /// Opens the GPU these flags name, with the ledger's budget.
    pub(crate) fn gpu(&self) -> Result<Gpu> {
        Gpu::new(&GpuOptions {
            adapter: self.device,
            budget: self.budget,
            ..Default::default()
        })
        .context("opening the GPU")
    }
}

fn parse_budget(s: &str) -> Result<u64, String> {
    parse_bytes(s).map_err(|e| e.to_string())
}

/// Which model to load and how.
#[derive(clap::Args, Clone, Debug)]
pub(crate) struct ModelArgs {
    /// A GGUF file, a Hugging Face directory (config.json + safetensors), or a name from
    /// `wgllm models` (fetched on first use); default: SmolLM2.
    #[arg(short = 'm', long)]
    pub(crate) model: Option<std::path::PathBuf>,
    /// Context length (KV cache positions); default: 2048, or the model's own context where that
    /// is shorter.
    #[arg(short = 'c', long = "ctx-size")]
    pub(crate) ctx: Option<usize>,
    /// KV cache type: f32, f16 or q8_0.
    #[arg(long, default_value = "f16")]
    pub(crate) kv: String,
    /// Quantise safetensors weights on load: f32, f16, int8 (q8_0) or int4 (q4_0), or a format name;
    /// for --synthetic presets also a K-quant mix (q4_k_m, q4_k_s, q5_k_m, q5_k_s, q6_k), each
    /// matrix in the type llama.cpp's file of that mix has.
    #[arg(long)]
    pub(crate) precision: Option<String>,
    /// Tokens per prefill chunk.
    #[arg(long, default_value_t = 64)]
    pub(crate) chunk: usize,
    /// Layers kept on the GPU; the rest stream from host memory through two layer slots, so a
    /// model larger than --budget (or than the device's reported memory budget) still runs. A
    /// number, "all", or "auto": all unless the memory plan says the model does not fit, then as
    /// many as the plan fits.
    #[arg(long, default_value = "auto")]
    pub(crate) resident_layers: String,
}

impl ModelArgs {
    /// The context: `-c`, else [`wgllm::model::load::DEFAULT_CTX`] (commands that know the
    /// model's config resolve it first: [`load::load_model`]).
    pub(crate) fn ctx(&self) -> usize {
        self.ctx.unwrap_or(wgllm::model::load::DEFAULT_CTX)
    }
}

/// A built-in preset with synthetic weights instead of a model file (`bench model`, `profile`).
#[derive(clap::Args, Clone, Debug)]
pub(crate) struct SyntheticArgs {
    /// A built-in preset (see `wgllm plan --list`) instead of a file; needs --synthetic.
    #[arg(long)]
    pub(crate) preset: Option<String>,
    /// Random weights of the real shapes, made on the fly (no file).
    #[arg(long)]
    pub(crate) synthetic: bool,
}

/// Sampling flags, named as llama.cpp names them.
#[derive(clap::Args, Clone, Debug)]
pub(crate) struct SamplingArgs {
    /// Temperature; 0 is greedy.
    #[arg(long = "temp", default_value_t = 0.8)]
    pub(crate) temperature: f32,
    #[arg(long, default_value_t = 40)]
    pub(crate) top_k: usize,
    #[arg(long, default_value_t = 0.95)]
    pub(crate) top_p: f32,
    #[arg(long, default_value_t = 1.0)]
    pub(crate) repeat_penalty: f32,
    #[arg(long, default_value_t = 64)]
    pub(crate) repeat_last_n: usize,
    /// Random seed (default: from the clock).
    #[arg(short = 's', long)]
    pub(crate) seed: Option<u64>,
}

/// Whether errors carry a backtrace: `-v` or `WGLLM_BACKTRACE=1`. `RUST_BACKTRACE`, which many
/// developers keep set for their own programs, does not decide what a wgllm user sees.
pub(crate) fn backtrace_wanted(verbose: bool) -> bool {
    verbose || std::env::var("WGLLM_BACKTRACE").is_ok_and(|v| v != "0" && !v.is_empty())
}

/// Process set-up before any GPU instance or error exists (single-threaded still, so setting
/// environment variables is sound):
/// - `RUST_LIB_BACKTRACE` decides whether `anyhow` captures backtraces; it takes precedence over
///   `RUST_BACKTRACE`, so a user's `RUST_BACKTRACE=1` no longer turns every error into a trace;
/// - a closed pipe (`wgllm plan ... | head`) ends the process quietly, as it does `cat`, instead
///   of making `println!` panic: Rust ignores SIGPIPE by default, so restore the default action;
/// - Mesa's drivers warn twice on every start when `XDG_RUNTIME_DIR` is unset, so point it at a
///   private directory of ours (see [`wgllm::gpu::runtime_dir`]).
pub(crate) fn prepare_process(verbose: bool) {
    // SAFETY: signal() with SIG_DFL installs no handler of ours; nothing else runs yet.
    #[cfg(unix)]
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    std::env::set_var(
        "RUST_LIB_BACKTRACE",
        if backtrace_wanted(verbose) { "1" } else { "0" },
    );
    if std::env::var_os("XDG_RUNTIME_DIR").is_none() {
        if let Some(dir) = wgllm::gpu::runtime_dir::private_runtime_dir() {
            std::env::set_var("XDG_RUNTIME_DIR", dir);
        }
    }
}

/// Prints an error as `error: ...` with its causes, and a backtrace only when asked for.
pub(crate) fn report_error(e: &anyhow::Error, verbose: bool) {
    eprintln!("error: {e}");
    for cause in e.chain().skip(1) {
        eprintln!("  caused by: {cause}");
    }
    if backtrace_wanted(verbose) {
        eprintln!("\nbacktrace:\n{}", e.backtrace());
    }
}

/// "yes" or "no".
pub(crate) fn yes(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

pub(crate) use wgllm::gpu::ledger::group_digits;
