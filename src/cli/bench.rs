//! `wgllm bench kernels` (the matrix kernels per precision), `wgllm bench model` (llama-bench's
//! pp/tg tables for a model) and `wgllm bench tune` (the tuner's choices per format and shape
//! class).

use anyhow::Result;
use wgllm::gpu::Gpu;

use super::load::load_for_bench;
use super::{Global, ModelArgs, SyntheticArgs};

#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    #[command(subcommand)]
    what: What,
}

#[derive(clap::Subcommand, Debug)]
enum What {
    /// Matrix-vector (1 token) and matrix-matrix (prefill) kernels per weight format on 7B/13B shapes.
    Kernels(KernelsArgs),
    /// Prompt processing (pp) and text generation (tg) tokens/s, like llama-bench.
    Model(ModelBenchArgs),
    /// The tuner's choices per weight format and shape class (workgroup matvec rows x threads,
    /// weight layout), probing the pairs not yet cached on this device.
    Tune(TuneArgs),
}

#[derive(clap::Args, Debug)]
struct TuneArgs {
    /// Formats (comma-separated: f32,f16,q8_0,q4_0,q4_1,q5_0,q5_1,q4_k,q5_k,q6_k); all by default.
    #[arg(long, value_delimiter = ',')]
    formats: Option<Vec<String>>,
    /// Shape classes (comma-separated: small,tall,wide); all by default.
    #[arg(long, value_delimiter = ',')]
    classes: Option<Vec<String>>,
    /// Probe the workgroup matvec's shapes even where the device does not run that kernel (CPU
    /// devices keep a rule).
    #[arg(long)]
    matvec: bool,
    /// Probe the weight layout even where only buffers are read (no subgroup matvec).
    #[arg(long)]
    layout: bool,
    /// Only print what is cached; probe nothing.
    #[arg(long)]
    cached: bool,
}

#[derive(clap::Args, Debug)]
struct KernelsArgs {
    /// Formats to run (comma-separated: f32,f16,q8_0,q4_0,q4_1,q5_0,q5_1,q4_k,q5_k,q6_k).
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
}

#[derive(clap::Args, Debug)]
struct ModelBenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    synth: SyntheticArgs,
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
    /// Sequence slots decoding together (continuous batching): the tg test decodes this many
    /// sequences, one batched step for all a token, and reports their aggregate tokens/s (pp is
    /// skipped). A GGUF file of the LLaMA family.
    #[arg(long, default_value_t = 1)]
    parallel: usize,
    #[arg(long)]
    json: bool,
}

pub(crate) fn run(a: Args, g: &Global) -> Result<()> {
    let gpu = g.gpu()?;
    match a.what {
        What::Kernels(k) => bench_kernels(&gpu, k),
        What::Model(m) => bench_model(&gpu, m),
        What::Tune(t) => bench_tune(&gpu, t),
    }
}

fn bench_tune(gpu: &Gpu, a: TuneArgs) -> Result<()> {
    use wgllm::kernels::tune::{self, ShapeClass};
    use wgllm::quant::WeightFormat;
    let formats = match &a.formats {
        Some(f) => f
            .iter()
            .map(|s| WeightFormat::parse(s))
            .collect::<Result<Vec<_>, _>>()?,
        None => WeightFormat::ALL.to_vec(),
    };
    let classes = match &a.classes {
        Some(c) => c
            .iter()
            .map(|s| ShapeClass::parse(s))
            .collect::<Result<Vec<_>, _>>()?,
        None => ShapeClass::ALL.to_vec(),
    };
    let pairs: Vec<_> = formats
        .iter()
        .flat_map(|&f| classes.iter().map(move |&c| (f, c)))
        .collect();
    let matvec = a.matvec || gpu.info.device_type != wgpu::DeviceType::Cpu;
    let layout = a.layout || wgllm::kernels::matmul::subgroup_matvec_ok(gpu);
    if !a.cached {
        for &(f, c) in &pairs {
            eprintln!("probing {} on {}", tune::class_key(f, c), gpu.info.name);
            if matvec {
                tune::matvec_choice_for(gpu, f, c)?;
            }
            if layout {
                tune::layout_choice_for(gpu, f, c)?;
            }
        }
    }
    println!(
        "{} (device layout: {} of {})",
        gpu.info.name,
        wgllm::kernels::weights::weight_layout(gpu).name(),
        tune::class_key(tune::DEVICE_LAYOUT_PROBE.0, tune::DEVICE_LAYOUT_PROBE.1)
    );
    print!("{}", tune::choices_table(gpu, &pairs));
    Ok(())
}

fn bench_kernels(gpu: &Gpu, a: KernelsArgs) -> Result<()> {
    let KernelsArgs {
        formats,
        tokens,
        quick,
        reps,
        json,
    } = a;
    use wgllm::bench::{bench_kernels, KernelBenchOptions, MODEL_SHAPES};
    use wgllm::quant::WeightFormat;
    let mut opts = KernelBenchOptions {
        tokens,
        reps: reps.max(1),
        ..Default::default()
    };
    if let Some(f) = &formats {
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

fn bench_model(gpu: &Gpu, a: ModelBenchArgs) -> Result<()> {
    let json = a.json;
    let opts = wgllm::bench::ModelBenchOptions {
        pp: a.pp,
        tg: a.tg,
        reps: a.reps.max(1),
        depth: a.depth,
    };
    let mut m = a.model.clone();
    let d = opts.depth;
    m.ctx = Some(m.ctx().max(d + opts.pp + 8).max(d + opts.tg + 8));
    m.chunk = m.chunk.max(opts.pp.min(512));
    eprintln!("measuring the copy bandwidth of {}", gpu.info.name);
    let copy = wgllm::bench::copy_bandwidth(gpu)?;
    // The ledger's peak from here on covers loading and running the model only.
    gpu.ledger.reset_peaks();
    let report = if a.parallel > 1 {
        let (mut model, name) = load_slots(gpu, &m, a.parallel)?;
        wgllm::bench::bench_batch(gpu, &mut model, &name, &opts, copy, &mut |s| {
            eprintln!("{s}")
        })?
    } else {
        let (mut model, name) = load_for_bench(gpu, &m, &a.synth)?;
        wgllm::bench::bench_model(gpu, model.as_mut(), &name, &opts, copy, &mut |s| {
            eprintln!("{s}")
        })?
    };
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

/// A LLaMA-family GGUF file with `parallel` sequence slots.
pub(crate) fn load_slots(
    gpu: &Gpu,
    m: &super::ModelArgs,
    parallel: usize,
) -> Result<(wgllm::model::llama::Llama, String)> {
    use wgllm::model::llama::{config_from_gguf, Llama, RunOptions};
    let path = wgllm::model::load::resolve(m.model.as_deref(), &mut |s| eprintln!("{s}"))?;
    let g = wgllm::loader::gguf::Gguf::open(&path)?;
    let (cfg, rot) = config_from_gguf(&g)?;
    let opts = RunOptions {
        ctx: m.ctx(),
        kv_dtype: wgllm::kernels::attention::KvDtype::parse(&m.kv)?,
        chunk: m.chunk.max(1),
        parallel,
        ..Default::default()
    };
    let model = Llama::load(gpu, cfg, rot, &wgllm::model::source::Source::Gguf(&g), opts)?;
    let name = path.file_name().map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into(),
    );
    Ok((model, name))
}
