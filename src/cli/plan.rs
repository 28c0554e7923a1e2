//! `wgllm plan` and `wgllm profile`.

use anyhow::{Context, Result};
use wgllm::gpu::Gpu;

use super::*;
use crate::ModelArgs;

pub(crate) struct PlanArgs {
    pub(crate) precision: Option<String>,
    pub(crate) kv: String,
    pub(crate) ctx: usize,
    pub(crate) chunk: usize,
    pub(crate) train: bool,
    pub(crate) batch: usize,
    pub(crate) seq: Option<usize>,
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
pub(crate) fn plan(
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
    let mut gguf = None;
    let cfg = match (model, config, preset) {
        (Some(p), None, None) if p.is_dir() => {
            ModelConfig::from_hf_json(wgllm::loader::safetensors::HfModel::open(p)?.config())?
        }
        (Some(p), None, None) => {
            let g = wgllm::loader::gguf::Gguf::open(p)?;
            let cfg = wgllm::model::llama::config_from_gguf(&g)?.0;
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
    if let Some(g) = &gguf {
        plan.use_gguf_weights(
            g,
            wgllm::kernels::weights::WeightStorage::buffers(wgllm::plan::DEFAULT_MAX_BINDING),
        )?;
    }
    if let Some(path) = svg {
        std::fs::write(path, wgllm::plan::svg::stacked_bar(&plan))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&plan.to_json())?);
    } else {
        print!("{}", plan.to_table());
        print_parameter_breakdown(&cfg);
        let decode = wgllm::plan::activations::llama_activation_plan(&cfg, 1, false);
        println!(
            "activations for decode (1 token): {} in {} shared buffers (the run allocates for the prefill chunk)",
            wgllm::gpu::ledger::human_bytes(decode.total_bytes),
            decode.buffers.len()
        );
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

#[allow(clippy::too_many_arguments)]
pub(crate) fn profile(
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
    let cfg_plan = profile_plan(gpu, budget, &m, preset, synthetic)?;
    // The ledger's peaks cover loading (staging) and the run.
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

fn group_digits(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The plan `wgllm profile` compares the ledger with: the same model, precision and options (a
/// GGUF file's own weight formats; none for safetensors directories, which are not planned here).
fn profile_plan(
    gpu: &Gpu,
    budget: Option<u64>,
    m: &ModelArgs,
    preset: Option<&str>,
    synthetic: bool,
) -> Result<Option<wgllm::plan::MemoryPlan>> {
    let mut gguf = None;
    let cfg = match preset {
        Some(p) => wgllm::model::config::ModelConfig::preset(p)?,
        None => {
            let path = wgllm::model::load::resolve(m.model.as_deref(), &mut |s| eprintln!("{s}"))?;
            if path.is_dir() {
                return Ok(None);
            }
            let g = wgllm::loader::gguf::Gguf::open(&path)?;
            let cfg = wgllm::model::llama::config_from_gguf(&g)?.0;
            gguf = Some(g);
            cfg
        }
    };
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
        ..Default::default()
    }
    .for_device(gpu);
    let storage = opts.weight_storage();
    let mut plan = wgllm::plan::MemoryPlan::new(&cfg, opts)?;
    if let Some(g) = &gguf {
        plan.use_gguf_weights(g, storage)?;
    }
    Ok(Some(plan))
}
