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
    let _ = (gpu, json);
    anyhow::bail!("selftest: not wired yet")
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
