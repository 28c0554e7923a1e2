//! `wgllm plan`: will it fit? Parameter counts, bytes per precision and the VRAM plan by class,
//! from a file, a config or a preset, with no GPU opened.

use anyhow::{Context, Result};

use super::{group_digits, Global};

#[derive(clap::Args, Debug)]
pub(crate) struct Args {
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
    /// Weight precision: f32, f16, bf16, int8/q8_0, int4/q4_0, q4_1, or one of llama.cpp's
    /// K-quant mixes q4_k_s, q4_k_m, q5_k_s, q5_k_m, q6_k (each tensor the type llama.cpp's
    /// quantiser gives it: Q4_K_M is Q4_K with Q6_K for the head and half the attn_v and ffn_down
    /// matrices). Default: f16, or a GGUF file's own tensor types.
    #[arg(long)]
    precision: Option<String>,
    /// KV cache type: f32, f16, q8_0.
    #[arg(long, default_value = "f16")]
    kv: String,
    /// Context length (KV cache positions) [default: 2048, or the model's learned positions where
    /// fewer].
    #[arg(short = 'c', long = "ctx")]
    ctx: Option<usize>,
    /// Tokens per prefill chunk.
    #[arg(long, default_value_t = 64)]
    chunk: usize,
    /// Sequence slots (`wgllm serve --parallel`): a KV cache each, and the buffers of a batched
    /// decode step (LLaMA family).
    #[arg(long, default_value_t = 1)]
    parallel: usize,
    /// Add the training footprint (gradients, Adam moments, saved activations).
    #[arg(long)]
    train: bool,
    /// Sequences per pass: an encoder's (BERT) inference plan encodes this many at once, as
    /// `wgllm embed` does its sentences; also --train's batch.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Tokens per sequence: an encoder's (BERT) inference plan and --train's (default: --ctx; an
    /// encoder's is capped at its positions).
    #[arg(long)]
    seq: Option<usize>,
    #[arg(long)]
    json: bool,
    /// Write a stacked bar chart of the plan as SVG.
    #[arg(long)]
    svg: Option<std::path::PathBuf>,
}

pub(crate) fn plan_precision(s: &str) -> Result<wgllm::model::params::Precision> {
    let s = match s.to_ascii_lowercase().as_str() {
        "int8" => "q8_0".to_string(),
        "int4" => "q4_0".to_string(),
        other => other.to_string(),
    };
    Ok(wgllm::model::params::Precision::parse(&s)?)
}

/// Builds and prints the plan; returns whether it fits.
pub(crate) fn run(a: Args, g: &Global) -> Result<bool> {
    if a.list {
        for n in wgllm::model::config::preset_names() {
            println!("{n}");
        }
        return Ok(true);
    }
    let budget = g.budget;
    // `-m NAME` of a packaged model (`wgllm models`) plans the cached file, as `run` does.
    let resolved = a
        .model
        .as_deref()
        .map(|p| wgllm::model::load::resolve(Some(p), &mut |m| eprintln!("{m}")))
        .transpose()?;
    let (model, config, preset) = (
        resolved.as_deref(),
        a.config.as_deref(),
        a.preset.as_deref(),
    );
    use wgllm::model::config::ModelConfig;
    use wgllm::plan::{MemoryPlan, PlanOptions, TrainOptions};
    let mut gguf = None;
    let cfg = match (model, config, preset) {
        (Some(p), None, None) if p.is_dir() => {
            ModelConfig::from_hf_json(wgllm::loader::safetensors::HfModel::open(p)?.config())?
        }
        (Some(p), None, None) => {
            let g = wgllm::loader::gguf::Gguf::open(p)?;
            let cfg = match wgllm::model::llama::config_from_gguf(&g) {
                Ok((cfg, _)) => cfg,
                // An architecture wgllm does not run yet still has its tensors to count.
                Err(e) => return type_table_only(&g, &e, a.json),
            };
            if a.precision.is_none() {
                gguf = Some(g);
            }
            cfg
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
    use wgllm::model::config::{Arch, Positions};
    // A learned position table bounds the context; the loaders cap it there.
    let ctx = a.ctx.unwrap_or(match cfg.positions {
        Positions::Learned => cfg.max_positions.min(2048),
        _ => 2048,
    });
    let seq = a.seq.unwrap_or(ctx);
    let encoder = cfg.arch == Arch::Bert;
    let opts = PlanOptions {
        precision,
        kv: wgllm::kernels::attention::KvDtype::parse(&a.kv)?,
        // An encoder keeps no KV cache: its context is the sequence it encodes.
        ctx: if encoder { seq } else { ctx },
        batch: a.batch.max(1),
        chunk: a.chunk.max(1),
        budget,
        parallel: a.parallel.max(1),
        train: a.train.then(|| TrainOptions {
            batch: a.batch.max(1),
            seq,
        }),
        ..Default::default()
    };
    let mut plan = MemoryPlan::new(&cfg, opts)?;
    if let Some(g) = &gguf {
        plan.use_gguf_weights(
            g,
            wgllm::kernels::weights::WeightStorage::buffers(wgllm::plan::DEFAULT_MAX_BINDING),
        )?;
    }
    if let Some(path) = &a.svg {
        std::fs::write(path, wgllm::plan::svg::stacked_bar(&plan))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&plan.to_json())?);
    } else {
        print!("{}", plan.to_table());
        print_parameter_breakdown(&cfg);
        if !plan.tensor_types.rows.is_empty() {
            let of = if gguf.is_some() {
                "the file's tensors".to_string()
            } else {
                format!("at {}", plan.options.precision)
            };
            println!(
                "\nparameters by tensor type ({of}; uploaded bytes as the ledger books them):"
            );
            print!(
                "{}",
                wgllm::plan::types::type_table_text(&plan.tensor_types)
            );
        }
        if !encoder {
            let decode = MemoryPlan::new(
                &cfg,
                PlanOptions {
                    chunk: 1,
                    train: None,
                    ..plan.options.clone()
                },
            )?
            .activations;
            println!(
                "activations for decode (1 token): {} in {} shared buffers (the run allocates for the prefill chunk)",
                wgllm::gpu::ledger::human_bytes(decode.total_bytes),
                decode.buffers.len()
            );
        }
        if gguf.is_some() {
            let b = plan.parameters_bytes;
            println!(
                "(parameters: the GGUF file's own tensor formats, {} on the GPU)",
                wgllm::gpu::ledger::human_bytes(b)
            );
        }
    }
    Ok(plan.fits())
}

/// Parameters per module (all layers together), per layer and in total.
fn print_parameter_breakdown(cfg: &wgllm::model::config::ModelConfig) {
    let count = wgllm::model::params::count(cfg);
    println!(
        "\nparameters by module ({} layers; `layers.*` rows are summed over all layers):",
        cfg.n_layers
    );
    for (name, n) in &count.modules {
        println!("  {name:<28} {n:>18}", n = group_digits(*n));
    }
    println!(
        "  {:<28} {:>18}",
        "per layer",
        group_digits(count.per_layer)
    );
    println!("  {:<28} {:>18}", "total", group_digits(count.total));
}

/// The per-type table of a GGUF file whose architecture has no plan here (no forward pass yet):
/// what the file holds and what its tensors would take on the device.
fn type_table_only(g: &wgllm::loader::gguf::Gguf, why: &wgllm::Error, json: bool) -> Result<bool> {
    let storage = wgllm::kernels::weights::WeightStorage::buffers(wgllm::plan::DEFAULT_MAX_BINDING);
    let table = wgllm::plan::gguf_type_table(g, storage)?;
    let arch = g.architecture().unwrap_or("unknown");
    if json {
        let v = serde_json::json!({
            "file": g.file(),
            "architecture": arch,
            "runs_here": false,
            "reason": why.to_string(),
            "tensor_types": table,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!(
            "{}: architecture {arch}: no memory plan ({why}); its tensors by type:",
            g.file()
        );
        print!("{}", wgllm::plan::types::type_table_text(&table));
    }
    Ok(true)
}
