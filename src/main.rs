//! The `wgllm` command line. Only this file (and the report formatting it calls) prints; the library
//! returns values and errors.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use wgllm::gpu::ledger::parse_bytes;
use wgllm::gpu::{list_adapters, Gpu, GpuOptions};

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
    let opts = RunOptions {
        ctx: m.ctx,
        kv_dtype: kv,
        chunk: m.chunk.max(1),
        all_logits,
        resident_layers: resident_layers(gpu, m, all_logits, || auto_model_plan(gpu, m, &path))?,
    };
    let t = std::time::Instant::now();
    let lm = wgllm::model::load::load_lm(gpu, &path, precision, opts)
        .with_context(|| format!("loading {}", path.display()))?;
    eprintln!(
        "loaded {} in {:.1} s on {}",
        lm.description,
        t.elapsed().as_secs_f64(),
        gpu.info.name
    );
    Ok(lm)
}

/// What `--resident-layers auto` plans with: the config, the weight precision that sizes a layer,
/// and the parameter bytes when known exactly (a GGUF file's own formats).
type AutoPlan = Option<(
    wgllm::model::config::ModelConfig,
    wgllm::model::params::Precision,
    Option<u64>,
)>;

/// `--resident-layers`: `None` keeps every layer on the GPU. "auto" asks the memory plan only when
/// there is a budget: if the model does not fit it resident, the plan's streaming suggestion (or,
/// when not even that fits, every layer streamed, the least the GPU can hold).
fn resident_layers(
    gpu: &Gpu,
    m: &ModelArgs,
    all_logits: bool,
    model: impl FnOnce() -> Result<AutoPlan>,
) -> Result<Option<usize>> {
    use wgllm::gpu::ledger::human_bytes;
    use wgllm::plan::{MemoryPlan, PlanOptions};
    match m.resident_layers.as_str() {
        "all" => return Ok(None),
        "auto" => {}
        n => {
            return n.parse().map(Some).map_err(|_| {
                anyhow::anyhow!("--resident-layers {n}: give a number of layers, all or auto")
            })
        }
    }
    let Some(budget) = gpu.ledger.budget() else {
        return Ok(None);
    };
    let Some((cfg, precision, param_bytes)) = model()? else {
        return Ok(None);
    };
    let opts = PlanOptions {
        precision,
        kv: wgllm::kernels::attention::KvDtype::parse(&m.kv)?,
        ctx: m.ctx,
        chunk: m.chunk.max(1),
        budget: Some(budget),
        all_logits,
        max_binding: gpu.max_binding(),
        ..Default::default()
    };
    let mut plan = MemoryPlan::new(&cfg, opts)?;
    if let Some(b) = param_bytes {
        plan.set_parameter_bytes(b);
    }
    if plan.fits() {
        return Ok(None);
    }
    let resident = match plan.suggestions().and_then(|s| s.streaming) {
        Some(st) => {
            eprintln!(
                "the model takes {} resident, over the {} budget: streaming {} of {} layers ({} planned)",
                human_bytes(plan.total_bytes),
                human_bytes(budget),
                st.streamed_layers,
                cfg.n_layers,
                human_bytes(st.total_bytes)
            );
            st.resident_layers
        }
        None => {
            eprintln!(
                "warning: the model does not fit the {} budget even with every layer streamed; trying that",
                human_bytes(budget)
            );
            0
        }
    };
    Ok(Some(resident))
}

/// [`AutoPlan`] of a model file: LLaMA-family models only (the others do not stream).
fn auto_model_plan(gpu: &Gpu, m: &ModelArgs, path: &std::path::Path) -> Result<AutoPlan> {
    use wgllm::model::config::{Arch, ModelConfig};
    use wgllm::model::params::Precision;
    if path.is_dir() {
        let hf = wgllm::loader::safetensors::HfModel::open(path)?;
        let cfg = ModelConfig::from_hf_json(hf.config())?;
        let precision = match m.precision.as_deref() {
            Some(p) => plan_precision(p)?,
            None => Precision::F32,
        };
        return Ok((cfg.arch == Arch::Llama).then_some((cfg, precision, None)));
    }
    let g = wgllm::loader::gguf::Gguf::open(path)?;
    let Ok((cfg, _)) = wgllm::model::llama::config_from_gguf(&g) else {
        return Ok(None);
    };
    // A layer is sized at the format of its FFN matrices (a mixed file's other formats are close).
    let format = g
        .tensor("blk.0.ffn_up.weight")
        .ok()
        .and_then(|t| wgllm::loader::gguf::weight_format(t.ggml_type))
        .unwrap_or(wgllm::quant::WeightFormat::F16);
    let bytes = wgllm::plan::gguf_parameter_bytes(&g, gpu.max_binding())?;
    Ok(Some((cfg, Precision::parse(format.name())?, Some(bytes))))
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
                    json,
                },
        } => {
            let gpu = Gpu::new(&gpu_options(&cli)).context("opening the GPU")?;
            bench_model(
                &gpu,
                model,
                preset.as_deref(),
                *synthetic,
                *pp,
                *tg,
                *reps,
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
        println!(
            "[{}] {} ({}, {})",
            a.index, a.name, a.backend, a.device_type
        );
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
                m.budget_bytes
                    .map_or("unknown".into(), wgllm::gpu::ledger::human_bytes),
                m.usage_bytes
                    .map_or("unknown".into(), wgllm::gpu::ledger::human_bytes),
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
        println!(
            "features: shader-f16 {}, subgroups {}, timestamps {}",
            yes(gpu.caps.shader_f16),
            yes(gpu.caps.subgroups),
            yes(gpu.caps.timestamps)
        );
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
        println!(
            "{}",
            serde_json::to_string_pretty(
                &serde_json::json!({"device": gpu.describe(), "checks": checks, "failed": failed})
            )?
        );
    } else {
        println!("{} passed, {} failed", checks.len() - failed, failed);
    }
    if failed > 0 {
        anyhow::bail!("{failed} kernel check(s) failed on {}", gpu.info.name);
    }
    Ok(())
}

fn bench_kernels(
    gpu: &Gpu,
    formats: Option<&[String]>,
    tokens: &[usize],
    quick: bool,
    reps: usize,
    json: bool,
) -> Result<()> {
    use wgllm::bench::{bench_kernels, KernelBenchOptions, MODEL_SHAPES};
    use wgllm::quant::WeightFormat;
    let mut opts = KernelBenchOptions {
        tokens: tokens.to_vec(),
        reps: reps.max(1),
        ..Default::default()
    };
    if let Some(f) = formats {
        opts.formats = f
            .iter()
            .map(|s| WeightFormat::parse(s))
            .collect::<Result<_, _>>()?;
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

fn run(
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

fn logits(gpu: &Gpu, m: &ModelArgs, prompt: &str, k: usize, all: bool, json: bool) -> Result<()> {
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

fn perplexity(gpu: &Gpu, m: &ModelArgs, file: &std::path::Path, json: bool) -> Result<()> {
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

/// Loads the model for `bench model` / `profile`: a file, the default model, or a preset with
/// synthetic weights.
fn load_for_bench(
    gpu: &Gpu,
    m: &ModelArgs,
    preset: Option<&str>,
    synthetic: bool,
) -> Result<(Box<dyn wgllm::model::generate::CausalLm>, String)> {
    use wgllm::model::config::{Arch, ModelConfig};
    use wgllm::model::llama::{Llama, RunOptions};
    use wgllm::model::source::Source;
    let kv = wgllm::kernels::attention::KvDtype::parse(&m.kv)?;
    let mut opts = RunOptions {
        ctx: m.ctx,
        kv_dtype: kv,
        chunk: m.chunk.max(1),
        all_logits: false,
        resident_layers: None,
    };
    if synthetic || preset.is_some() {
        let Some(name) = preset else {
            anyhow::bail!("--synthetic needs --preset NAME")
        };
        if !synthetic {
            anyhow::bail!("--preset runs on synthetic weights: add --synthetic");
        }
        let cfg = ModelConfig::preset(name)?;
        if cfg.arch != Arch::Llama {
            anyhow::bail!(
                "synthetic benchmarks run LLaMA-family presets; {name} is {:?}",
                cfg.arch
            );
        }
        let format = m
            .precision
            .as_deref()
            .map(parse_precision)
            .transpose()?
            .unwrap_or(wgllm::quant::WeightFormat::Q4_0);
        eprintln!(
            "building {name} with synthetic {format} weights on {} ...",
            gpu.info.name
        );
        opts.resident_layers = resident_layers(gpu, m, false, || {
            let precision = wgllm::model::params::Precision::parse(format.name())?;
            Ok(Some((cfg.clone(), precision, None)))
        })?;
        let t = std::time::Instant::now();
        let rot = cfg.head_dim;
        let model = Llama::load(gpu, cfg, rot, &Source::Synthetic { format, seed: 1 }, opts)?;
        eprintln!("built in {:.1} s", t.elapsed().as_secs_f64());
        return Ok((Box::new(model), format!("{name} {format} (synthetic)")));
    }
    let lm = load_model(gpu, m, false)?;
    Ok((lm.model, lm.description))
}

#[allow(clippy::too_many_arguments)]
fn bench_model(
    gpu: &Gpu,
    m: &ModelArgs,
    preset: Option<&str>,
    synthetic: bool,
    pp: usize,
    tg: usize,
    reps: usize,
    json: bool,
) -> Result<()> {
    let mut m = m.clone();
    m.ctx = m.ctx.max(pp + 8).max(tg + 8);
    m.chunk = m.chunk.max(pp.min(512));
    eprintln!("measuring the copy bandwidth of {}", gpu.info.name);
    let copy = wgllm::bench::copy_bandwidth(gpu)?;
    // The ledger's peak from here on covers loading and running the model only.
    gpu.ledger.reset_peaks();
    let (mut model, name) = load_for_bench(gpu, &m, preset, synthetic)?;
    let opts = wgllm::bench::ModelBenchOptions {
        pp,
        tg,
        reps: reps.max(1),
    };
    let report = wgllm::bench::bench_model(gpu, model.as_mut(), &name, &opts, copy, &mut |s| {
        eprintln!("{s}")
    })?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.to_table());
        eprint!(
            "GPU memory (VRAM ledger):\n{}",
            gpu.ledger.report().to_table()
        );
    }
    Ok(())
}

fn embed(
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
    let tok = wgllm::tokenizer::Tokenizer::from_file(&dir.join("tokenizer.json"))?;
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

struct PlanArgs {
    precision: Option<String>,
    kv: String,
    ctx: usize,
    chunk: usize,
    train: bool,
    batch: usize,
    seq: Option<usize>,
}

fn plan_precision(s: &str) -> Result<wgllm::model::params::Precision> {
    let s = match s.to_ascii_lowercase().as_str() {
        "int8" => "q8_0".to_string(),
        "int4" => "q4_0".to_string(),
        other => other.to_string(),
    };
    Ok(wgllm::model::params::Precision::parse(&s)?)
}

/// Builds and prints the plan; returns whether it fits.
fn plan(
    budget: Option<u64>,
    model: Option<&std::path::Path>,
    config: Option<&std::path::Path>,
    preset: Option<&str>,
    a: &PlanArgs,
    json: bool,
    svg: Option<&std::path::Path>,
) -> Result<bool> {
    use wgllm::model::config::ModelConfig;
    use wgllm::plan::{MemoryPlan, PlanOptions, TrainOptions};
    let mut gguf_bytes = None;
    let cfg = match (model, config, preset) {
        (Some(p), None, None) if p.is_dir() => {
            ModelConfig::from_hf_json(wgllm::loader::safetensors::HfModel::open(p)?.config())?
        }
        (Some(p), None, None) => {
            let g = wgllm::loader::gguf::Gguf::open(p)?;
            if a.precision.is_none() {
                gguf_bytes = Some(wgllm::plan::gguf_parameter_bytes(
                    &g,
                    wgllm::plan::DEFAULT_MAX_BINDING,
                )?);
            }
            wgllm::model::llama::config_from_gguf(&g)?.0
        }
        (None, Some(c), None) => {
            let text =
                std::fs::read_to_string(c).with_context(|| format!("reading {}", c.display()))?;
            ModelConfig::from_hf_json(
                &serde_json::from_str(&text).with_context(|| format!("parsing {}", c.display()))?,
            )?
        }
        (None, None, Some(name)) => ModelConfig::preset(name)?,
        _ => anyhow::bail!("give exactly one of --model, --config or --preset (see --list)"),
    };
    let precision = a
        .precision
        .as_deref()
        .map(plan_precision)
        .transpose()?
        .unwrap_or(wgllm::model::params::Precision::F16);
    let opts = PlanOptions {
        precision,
        kv: wgllm::kernels::attention::KvDtype::parse(&a.kv)?,
        ctx: a.ctx,
        chunk: a.chunk.max(1),
        budget,
        train: a.train.then(|| TrainOptions {
            batch: a.batch.max(1),
            seq: a.seq.unwrap_or(a.ctx),
        }),
        ..Default::default()
    };
    let mut plan = MemoryPlan::new(&cfg, opts)?;
    if let Some(b) = gguf_bytes {
        plan.set_parameter_bytes(b);
    }
    if let Some(path) = svg {
        std::fs::write(path, wgllm::plan::svg::stacked_bar(&plan))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&plan.to_json())?);
    } else {
        print!("{}", plan.to_table());
        if let Some(b) = gguf_bytes {
            println!(
                "(parameters: the GGUF file's own tensor formats, {} on the GPU)",
                wgllm::gpu::ledger::human_bytes(b)
            );
        }
    }
    Ok(plan.fits())
}

#[allow(clippy::too_many_arguments)]
fn profile(
    gpu: &Gpu,
    budget: Option<u64>,
    m: &ModelArgs,
    preset: Option<&str>,
    synthetic: bool,
    prompt: usize,
    n: usize,
    json: bool,
) -> Result<()> {
    use wgllm::gpu::ledger::{human_bytes, BufferClass};
    let mut m = m.clone();
    m.ctx = m.ctx.max(prompt + n + 1);
    let (mut model, name) = load_for_bench(gpu, &m, preset, synthetic)?;
    // The plan of the same configuration.
    let cfg_plan = {
        let cfg = match (preset, m.model.as_deref()) {
            (Some(p), _) => Some(wgllm::model::config::ModelConfig::preset(p)?),
            (None, path) => {
                let path = wgllm::model::load::resolve(path, &mut |s| eprintln!("{s}"))?;
                if path.is_dir() {
                    None
                } else {
                    let g = wgllm::loader::gguf::Gguf::open(&path)?;
                    let bytes = wgllm::plan::gguf_parameter_bytes(&g, gpu.max_binding())?;
                    Some((wgllm::model::llama::config_from_gguf(&g)?.0, bytes)).map(|(c, b)| {
                        let _ = b;
                        c
                    })
                }
            }
        };
        match cfg {
            Some(cfg) => {
                let precision = match m.precision.as_deref() {
                    Some(p) => plan_precision(p)?,
                    None if synthetic => wgllm::model::params::Precision::Q4_0,
                    None => wgllm::model::params::Precision::F16,
                };
                let opts = wgllm::plan::PlanOptions {
                    precision,
                    kv: wgllm::kernels::attention::KvDtype::parse(&m.kv)?,
                    ctx: m.ctx,
                    chunk: m.chunk.max(1),
                    budget,
                    max_binding: gpu.max_binding(),
                    param_align: gpu.limits.min_uniform_buffer_offset_alignment as u64,
                    ..Default::default()
                };
                let mut plan = wgllm::plan::MemoryPlan::new(&cfg, opts)?;
                if !synthetic && preset.is_none() {
                    let path = wgllm::model::load::resolve(m.model.as_deref(), &mut |_| {})?;
                    let g = wgllm::loader::gguf::Gguf::open(&path)?;
                    plan.set_parameter_bytes(wgllm::plan::gguf_parameter_bytes(
                        &g,
                        gpu.max_binding(),
                    )?);
                }
                Some(plan)
            }
            None => None,
        }
    };
    gpu.ledger.reset_peaks();
    model.set_profiling(true);
    let vocab = model.vocab_size() as u32;
    let ids: Vec<u32> = (0..prompt.max(1) as u32)
        .map(|i| (i * 7919 + 13) % vocab)
        .collect();
    let t = std::time::Instant::now();
    let mut logits = model.forward(gpu, &ids, 0)?;
    let prefill = t.elapsed().as_secs_f64();
    let prefill_ops = model.take_profile();
    let t = std::time::Instant::now();
    for i in 0..n {
        let next = wgllm::sampler::argmax(&logits);
        logits = model.forward(gpu, &[next], ids.len() + i)?;
    }
    let decode = t.elapsed().as_secs_f64();
    let decode_ops = model.take_profile();
    let report = gpu.ledger.report();
    // Per-op GPU time, grouped by kernel.
    let group = |ops: &[wgllm::gpu::record::DispatchTime], per: f64| {
        let mut by: std::collections::BTreeMap<String, (f64, usize)> = Default::default();
        for d in ops {
            let e = by.entry(d.kernel.clone()).or_default();
            e.0 += d.nanos;
            e.1 += 1;
        }
        let mut v: Vec<(String, f64, f64)> = by
            .into_iter()
            .map(|(k, (ns, c))| (k, ns / 1e6 / per, c as f64 / per))
            .collect();
        v.sort_by(|a, b| b.1.total_cmp(&a.1));
        v
    };
    let pre = group(&prefill_ops, 1.0);
    let dec = group(&decode_ops, n.max(1) as f64);
    let measured = |c: BufferClass| report.class(c).peak_bytes;
    if json {
        let planned = cfg_plan.as_ref().map(|p| p.to_json());
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "model": name, "device": gpu.describe(), "ledger": report, "planned": planned,
                "prefill": {"tokens": prompt, "seconds": prefill, "ops_ms": pre},
                "decode": {"tokens": n, "seconds_per_token": decode / n.max(1) as f64, "ops_ms_per_token": dec},
            }))?
        );
        return Ok(());
    }
    println!("{name} on {}", gpu.describe());
    println!("\nmemory by class: planned (wgllm plan) vs measured (ledger peak)");
    println!(
        "{:<14} {:>14} {:>14} {:>8}",
        "class", "planned", "measured", "diff"
    );
    let rows: Vec<(&str, Option<u64>, u64)> = vec![
        (
            "parameters",
            cfg_plan.as_ref().map(|p| p.parameters_bytes),
            measured(BufferClass::Parameters),
        ),
        (
            "kv-cache",
            cfg_plan.as_ref().map(|p| p.kv_cache_bytes),
            measured(BufferClass::KvCache),
        ),
        (
            "activations",
            cfg_plan
                .as_ref()
                .map(|p| p.activation_bytes + p.kernel_params_bytes),
            measured(BufferClass::Activations),
        ),
        (
            "staging",
            cfg_plan.as_ref().map(|p| p.staging_bytes),
            measured(BufferClass::Staging),
        ),
    ];
    for (c, p, mbytes) in rows {
        let diff = p.map_or("-".to_string(), |p| {
            format!(
                "{:+.2}%",
                100.0 * (mbytes as f64 - p as f64) / (p.max(1) as f64)
            )
        });
        println!(
            "{c:<14} {:>14} {:>14} {diff:>8}",
            p.map_or("-".into(), human_bytes),
            human_bytes(mbytes)
        );
    }
    println!(
        "{:<14} {:>14} {:>14}",
        "peak total",
        cfg_plan
            .as_ref()
            .map_or("-".into(), |p| human_bytes(p.total_bytes)),
        human_bytes(report.peak_total_bytes)
    );
    println!(
        "\nprefill of {prompt} tokens: {:.3} s wall; GPU time per op:",
        prefill
    );
    for (k, ms, c) in &pre {
        println!("  {k:<48} {ms:>10.3} ms  {c:>6.0} dispatches");
    }
    println!(
        "\ndecode: {:.3} s per token wall; GPU time per op per token:",
        decode / n.max(1) as f64
    );
    let total: f64 = dec.iter().map(|d| d.1).sum();
    for (k, ms, c) in &dec {
        println!(
            "  {k:<48} {ms:>10.3} ms  {c:>6.0} dispatches  {:>5.1}%",
            100.0 * ms / total.max(1e-12)
        );
    }
    println!(
        "  {:<48} {total:>10.3} ms  (wall {:.3} ms: the rest is submission and dispatch overhead)",
        "GPU total",
        1e3 * decode / n.max(1) as f64
    );
    Ok(())
}
