//! The `wgllm` command line. Only this file (and the report formatting it calls) prints; the library
//! returns values and errors.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use wgllm::gpu::ledger::parse_bytes;
use wgllm::gpu::{list_adapters, Gpu, GpuOptions};

#[derive(Parser)]
#[command(name = "wgllm", version, about = "GPU compute-shader inference for transformer language models (wgpu)")]
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

fn parse_precision(s: &str) -> Result<wgllm::quant::WeightFormat> {
    use wgllm::quant::WeightFormat;
    Ok(match s.to_ascii_lowercase().as_str() {
        "int8" => WeightFormat::Q8_0,
        "int4" => WeightFormat::Q4_0,
        other => WeightFormat::parse(other)?,
    })
}

fn load_model(gpu: &Gpu, m: &ModelArgs, all_logits: bool) -> Result<wgllm::model::load::LoadedLm> {
    use wgllm::model::llama::RunOptions;
    let path = wgllm::model::load::resolve(m.model.as_deref(), &mut |s| eprintln!("{s}"))?;
    let precision = m.precision.as_deref().map(parse_precision).transpose()?;
    let kv = wgllm::kernels::attention::KvDtype::parse(&m.kv)?;
    let opts = RunOptions { ctx: m.ctx, kv_dtype: kv, chunk: m.chunk.max(1), all_logits };
    let t = std::time::Instant::now();
    let lm = wgllm::model::load::load_lm(gpu, &path, precision, opts).with_context(|| format!("loading {}", path.display()))?;
    eprintln!("loaded {} in {:.1} s on {}", lm.description, t.elapsed().as_secs_f64(), gpu.info.name);
    Ok(lm)
}

fn gpu_options(cli: &Cli) -> GpuOptions {
    GpuOptions { adapter: cli.device, budget: cli.budget, ..Default::default() }
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
        Cmd::Run { prompt, model, sampling, n_predict, chat } => {
            let gpu = Gpu::new(&gpu_options(&cli)).context("opening the GPU")?;
            run(&gpu, prompt, model, sampling, *n_predict, *chat)
        }
        Cmd::Logits { model, prompt, top_k, all, json } => {
            let gpu = Gpu::new(&gpu_options(&cli)).context("opening the GPU")?;
            logits(&gpu, model, prompt, *top_k, *all, *json)
        }
        Cmd::Perplexity { model, file, json } => {
            let gpu = Gpu::new(&gpu_options(&cli)).context("opening the GPU")?;
            perplexity(&gpu, model, file, *json)
        }
        Cmd::Bench { what: BenchCmd::Kernels { formats, tokens, quick, reps, json } } => {
            let gpu = Gpu::new(&gpu_options(&cli)).context("opening the GPU")?;
            bench_kernels(&gpu, formats.as_deref(), tokens, *quick, *reps, *json)
        }
    }
}

fn devices(json: bool) -> Result<()> {
    let list = list_adapters();
    if json {
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(());
    }
    if list.is_empty() {
        println!("no GPU adapters found (on Linux without a GPU: apt-get install mesa-vulkan-drivers libvulkan1)");
    }
    for a in list {
        println!("[{}] {} ({}, {})", a.index, a.name, a.backend, a.device_type);
        println!("    driver: {} {}", a.driver, a.driver_info);
        println!(
            "    features: shader-f16 {}, subgroups {} (size {}-{}), timestamp-query {}",
            yes(a.shader_f16),
            yes(a.subgroups),
            a.subgroup_min_size,
            a.subgroup_max_size,
            yes(a.timestamps)
        );
        println!(
            "    limits: max buffer {}, max storage binding {}, workgroup storage {} B, invocations/workgroup {}, workgroups/dim {}",
            wgllm::gpu::ledger::human_bytes(a.max_buffer_size),
            wgllm::gpu::ledger::human_bytes(a.max_storage_buffer_binding_size),
            a.max_compute_workgroup_storage_size,
            a.max_compute_invocations_per_workgroup,
            a.max_compute_workgroups_per_dimension
        );
        match a.memory {
            Some(m) => println!(
                "    memory: device-local {}, budget {}, in use {} ({})",
                wgllm::gpu::ledger::human_bytes(m.device_local_bytes),
                m.budget_bytes.map_or("unknown".into(), wgllm::gpu::ledger::human_bytes),
                m.usage_bytes.map_or("unknown".into(), wgllm::gpu::ledger::human_bytes),
                m.source
            ),
            None => println!("    memory: unknown (this backend does not report it)"),
        }
    }
    Ok(())
}

fn yes(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

fn selftest(gpu: &Gpu, json: bool) -> Result<()> {
    if !json {
        println!("selftest on {}", gpu.describe());
        println!("features: shader-f16 {}, subgroups {}, timestamps {}", yes(gpu.caps.shader_f16), yes(gpu.caps.subgroups), yes(gpu.caps.timestamps));
    }
    let checks = wgllm::selftest::run(gpu, &mut |c| {
        if !json {
            match &c.error {
                Some(e) => println!("FAIL  {:<44} error: {e}", c.name),
                None => println!(
                    "{}  {:<44} nmse {:.2e} (tolerance {:.0e}), max |err| {:.2e}",
                    if c.passed { "pass" } else { "FAIL" },
                    c.name,
                    c.nmse,
                    c.tolerance,
                    c.max_abs_err
                ),
            }
        }
    });
    let failed = checks.iter().filter(|c| !c.passed).count();
    if json {
        println!("{}", serde_json::to_string_pretty(&serde_json::json!({"device": gpu.describe(), "checks": checks, "failed": failed}))?);
    } else {
        println!("{} passed, {} failed", checks.len() - failed, failed);
    }
    if failed > 0 {
        anyhow::bail!("{failed} kernel check(s) failed on {}", gpu.info.name);
    }
    Ok(())
}

fn bench_kernels(gpu: &Gpu, formats: Option<&[String]>, tokens: &[usize], quick: bool, reps: usize, json: bool) -> Result<()> {
    use wgllm::bench::{bench_kernels, KernelBenchOptions, MODEL_SHAPES};
    use wgllm::quant::WeightFormat;
    let mut opts = KernelBenchOptions { tokens: tokens.to_vec(), reps: reps.max(1), ..Default::default() };
    if let Some(f) = formats {
        opts.formats = f.iter().map(|s| WeightFormat::parse(s)).collect::<Result<_, _>>()?;
    }
    if quick {
        opts.shapes = MODEL_SHAPES[..1].to_vec();
    }
    let total = opts.formats.len() * opts.shapes.len() * opts.tokens.len();
    let bar = indicatif::ProgressBar::new(total as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} {msg} [{elapsed}]")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_message(format!("measuring copy bandwidth on {}", gpu.info.name));
    let report = bench_kernels(gpu, &opts, &mut |done, _, case| {
        bar.set_position(done as u64);
        bar.set_message(case.to_string());
    })?;
    bar.finish_and_clear();
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.to_table());
    }
    Ok(())
}

fn run(gpu: &Gpu, prompt: &str, m: &ModelArgs, s: &SamplingArgs, n: usize, chat: bool) -> Result<()> {
    use std::io::Write;
    use wgllm::sampler::{Sampler, SamplerConfig};
    let mut lm = load_model(gpu, m, false)?;
    let text = if chat {
        let tmpl = lm.chat_template.as_deref().context("--chat: the model has no chat template in its metadata")?;
        let tok = &lm.tokenizer;
        let name = |id: Option<u32>| id.and_then(|i| tok.decode(&[i]).ok()).unwrap_or_default();
        wgllm::model::generate::apply_chat_template(tmpl, prompt, &name(tok.bos), &name(tok.eos))?
    } else {
        prompt.to_string()
    };
    let ids = lm.tokenizer.encode(&text, true)?;
    let seed = s.seed.unwrap_or_else(|| std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64));
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
    let (_, stats) = wgllm::model::generate::generate(lm.model.as_mut(), gpu, &lm.tokenizer, &ids, n, &mut sampler, &mut |t| {
        print!("{t}");
        std::io::stdout().flush().is_ok()
    })?;
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
    eprint!("GPU memory (VRAM ledger):\n{}", gpu.ledger.report().to_table());
    Ok(())
}

fn top_k_of(row: &[f32], k: usize) -> Vec<(u32, f32)> {
    let mut v: Vec<(u32, f32)> = row.iter().enumerate().map(|(i, &x)| (i as u32, x)).collect();
    v.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    v.truncate(k);
    v
}

fn logits(gpu: &Gpu, m: &ModelArgs, prompt: &str, k: usize, all: bool, json: bool) -> Result<()> {
    let mut lm = load_model(gpu, m, all)?;
    let ids = lm.tokenizer.encode(prompt, true)?;
    let vocab = lm.config.vocab_size;
    lm.model.set_all_logits(all);
    let out = lm.model.forward(gpu, &ids, 0)?;
    let rows: Vec<(usize, &[f32])> =
        if all { out.chunks(vocab).enumerate().collect() } else { vec![(ids.len() - 1, &out[..vocab])] };
    let mut report = Vec::new();
    for (pos, row) in rows {
        let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
        let lse = max + row.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln();
        let top: Vec<serde_json::Value> = top_k_of(row, k)
            .into_iter()
            .map(|(id, l)| {
                serde_json::json!({"id": id, "token": lm.tokenizer.decode(&[id]).unwrap_or_default(), "logit": l, "logprob": l as f64 - lse})
            })
            .collect();
        report.push(serde_json::json!({"pos": pos, "token_id": ids[pos], "logsumexp": lse, "top": top}));
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&serde_json::json!({"model": lm.description, "tokens": ids, "positions": report}))?);
    } else {
        println!("tokens: {ids:?}");
        for r in &report {
            println!("position {} (token {}), logsumexp {:.4}:", r["pos"], r["token_id"], r["logsumexp"].as_f64().unwrap_or(0.0));
            for t in r["top"].as_array().into_iter().flatten() {
                println!("  {:>7} {:>12.4} {:>9.4}  {:?}", t["id"], t["logit"].as_f64().unwrap_or(0.0), t["logprob"].as_f64().unwrap_or(0.0), t["token"].as_str().unwrap_or(""));
            }
        }
    }
    Ok(())
}

fn perplexity(gpu: &Gpu, m: &ModelArgs, file: &std::path::Path, json: bool) -> Result<()> {
    let text = std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let text = text.strip_suffix('\n').unwrap_or(&text);
    let mut lm = load_model(gpu, m, true)?;
    let ids = lm.tokenizer.encode(text, true)?;
    let t = std::time::Instant::now();
    let (ppl, chunks) = wgllm::model::generate::perplexity(lm.model.as_mut(), gpu, &ids, m.ctx)?;
    let secs = t.elapsed().as_secs_f64();
    if json {
        println!("{}", serde_json::to_string_pretty(&serde_json::json!({"model": lm.description, "file": file, "tokens": ids.len(), "ctx": m.ctx, "chunks": chunks.len(), "chunk_mean_nll": chunks, "perplexity": ppl, "seconds": secs}))?);
    } else {
        for (i, c) in chunks.iter().enumerate() {
            println!("chunk {}: mean NLL {:.5} (ppl {:.4})", i + 1, c, c.exp());
        }
        println!("perplexity: {ppl:.4} over {} chunks of {} tokens ({} tokens in the file; {:.1} s)", chunks.len(), m.ctx, ids.len(), secs);
    }
    Ok(())
}
