//! Opening models for the CLI: a file, the default model, or a preset with synthetic weights,
//! with `--resident-layers` streaming decided from the memory plan.

use anyhow::{Context, Result};
use wgllm::gpu::Gpu;

use wgllm::plan::MemoryPlan;

use super::plan::plan_precision;
use super::{ModelArgs, SyntheticArgs};

pub(crate) fn parse_precision(s: &str) -> Result<wgllm::quant::WeightFormat> {
    use wgllm::quant::WeightFormat;
    Ok(match s.to_ascii_lowercase().as_str() {
        "int8" => WeightFormat::Q8_0,
        "int4" => WeightFormat::Q4_0,
        other => WeightFormat::parse(other)?,
    })
}

pub(crate) fn load_model(
    gpu: &Gpu,
    m: &ModelArgs,
    all_logits: bool,
) -> Result<wgllm::model::load::LoadedLm> {
    use wgllm::model::llama::RunOptions;
    let path = wgllm::model::load::resolve(m.model.as_deref(), &mut |s| eprintln!("{s}"))?;
    // Without -c the context follows the model: never past its own trained context.
    let m = &ModelArgs {
        ctx: Some(match m.ctx {
            Some(c) => c,
            None => wgllm::model::load::default_ctx(&wgllm::model::load::config_of(&path)?),
        }),
        ..m.clone()
    };
    let precision = m.precision.as_deref().map(parse_precision).transpose()?;
    let kv = wgllm::kernels::attention::KvDtype::parse(&m.kv)?;
    // A GGUF model's weights go in the layout measured fastest for its largest matrix, chosen
    // before anything plans or uploads in the device's layout.
    if path.is_file() && precision.is_none() {
        if let Ok(g) = wgllm::loader::gguf::Gguf::open(&path) {
            if let Some((f, rows, cols)) = wgllm::kernels::tune::largest_matrix(&g) {
                wgllm::kernels::tune::prefer_model_layout(gpu, f, rows, cols);
            }
        }
    }
    let opts = RunOptions {
        ctx: m.ctx(),
        kv_dtype: kv,
        chunk: m.chunk.max(1),
        all_logits,
        resident_layers: resident_layers(gpu, m, || auto_model_plan(gpu, m, &path, all_logits))?,
        parallel: 1,
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

/// What `--resident-layers auto` decides with: the plan of the model with every layer resident,
/// and its layers' bytes (a GGUF file's own, else the config's at one precision).
pub(crate) type AutoPlan = Option<(wgllm::plan::MemoryPlan, wgllm::plan::LayerBytes)>;

/// What a run on `gpu` may use: the ledger's budget (`--budget`) and the budget the driver
/// reports for the process, where it reports one.
pub(crate) fn run_limits(gpu: &Gpu) -> wgllm::plan::Limits {
    wgllm::plan::Limits {
        ledger: gpu.ledger.budget(),
        device: gpu.memory().and_then(|m| m.budget_bytes),
    }
}

/// The plan options of a run of `m` on `gpu` (what `profile` compares with and `auto` decides
/// with).
pub(crate) fn run_plan_options(
    gpu: &Gpu,
    m: &ModelArgs,
    precision: wgllm::model::params::Precision,
    all_logits: bool,
) -> Result<wgllm::plan::PlanOptions> {
    Ok(wgllm::plan::PlanOptions {
        precision,
        kv: wgllm::kernels::attention::KvDtype::parse(&m.kv)?,
        ctx: m.ctx(),
        chunk: m.chunk.max(1),
        all_logits,
        budget: gpu.ledger.budget(),
        ..Default::default()
    }
    .for_device(&wgllm::kernels::device_traits(gpu)))
}

/// `--resident-layers`: `None` keeps every layer on the GPU. "auto" asks the memory plan when
/// there is a limit (a `--budget`, or the driver's reported budget): if the model does not fit it
/// resident, the most layers that fit stay (or, when not even streaming fits, none: the least
/// the GPU can hold, tried rather than refused).
pub(crate) fn resident_layers(
    gpu: &Gpu,
    m: &ModelArgs,
    model: impl FnOnce() -> Result<AutoPlan>,
) -> Result<Option<usize>> {
    use wgllm::gpu::ledger::human_bytes;
    match m.resident_layers.as_str() {
        "all" => return Ok(None),
        "auto" => {}
        n => {
            return n.parse().map(Some).map_err(|_| {
                anyhow::anyhow!("--resident-layers {n}: give a number of layers, all or auto")
            })
        }
    }
    let limits = run_limits(gpu);
    if limits == wgllm::plan::Limits::default() {
        return Ok(None);
    }
    let Some((plan, layers)) = model()? else {
        return Ok(None);
    };
    let Some(r) = plan.auto_resident_layers(&limits, &layers) else {
        return Ok(None);
    };
    let streamed = plan.with_streaming(r, &layers);
    let limit = match (limits.ledger, limits.device) {
        (Some(l), Some(d)) => format!(
            "the {} budget and the device's {}",
            human_bytes(l),
            human_bytes(d)
        ),
        (Some(l), None) => format!("the {} budget", human_bytes(l)),
        (None, Some(d)) => format!("the device's reported {}", human_bytes(d)),
        (None, None) => unreachable!("no limit returned early"),
    };
    if streamed.within(&limits) {
        eprintln!(
            "the model takes {} of buffers resident ({} with the device overhead), over {limit}: streaming {} of {} layers ({} of buffers planned)",
            human_bytes(plan.buffers_bytes()),
            human_bytes(plan.total_bytes),
            layers.resident.len() - r,
            layers.resident.len(),
            human_bytes(streamed.buffers_bytes())
        );
    } else {
        eprintln!(
            "warning: the model does not fit {limit} even with every layer streamed; trying that"
        );
    }
    Ok(Some(r))
}

/// [`AutoPlan`] of a model file: LLaMA-family models only (the others do not stream).
pub(crate) fn auto_model_plan(
    gpu: &Gpu,
    m: &ModelArgs,
    path: &std::path::Path,
    all_logits: bool,
) -> Result<AutoPlan> {
    use wgllm::model::config::{Arch, ModelConfig};
    use wgllm::model::params::Precision;
    if path.is_dir() {
        let hf = wgllm::loader::safetensors::HfModel::open(path)?;
        let cfg = ModelConfig::from_hf_json(hf.config())?;
        if cfg.arch != Arch::Llama {
            return Ok(None);
        }
        let precision = match m.precision.as_deref() {
            Some(p) => plan_precision(p)?,
            None => Precision::F32,
        };
        let plan = MemoryPlan::new(&cfg, run_plan_options(gpu, m, precision, all_logits)?)?;
        let layers = plan.uniform_layer_bytes();
        return Ok(Some((plan, layers)));
    }
    let g = wgllm::loader::gguf::Gguf::open(path)?;
    let Ok((cfg, _)) = wgllm::model::llama::config_from_gguf(&g) else {
        return Ok(None);
    };
    // The precision only sizes what the file's own tensors then replace.
    let opts = run_plan_options(gpu, m, Precision::F16, all_logits)?;
    let storage = opts.weight_storage();
    let mut plan = MemoryPlan::new(&cfg, opts)?;
    plan.use_gguf_weights(&g, storage)?;
    let layers = wgllm::plan::gguf_layer_bytes(&g, storage)?;
    Ok(Some((plan, layers)))
}

/// Loads the model for `bench model` / `profile`: a file, the default model, or a preset with
/// synthetic weights.
pub(crate) fn load_for_bench(
    gpu: &Gpu,
    m: &ModelArgs,
    synth: &SyntheticArgs,
) -> Result<(Box<dyn wgllm::model::generate::CausalLm>, String)> {
    let (preset, synthetic) = (synth.preset.as_deref(), synth.synthetic);
    use wgllm::model::config::{Arch, ModelConfig};
    use wgllm::model::llama::{Llama, RunOptions};
    use wgllm::model::source::Source;
    let kv = wgllm::kernels::attention::KvDtype::parse(&m.kv)?;
    let mut opts = RunOptions {
        ctx: m.ctx(),
        kv_dtype: kv,
        chunk: m.chunk.max(1),
        all_logits: false,
        resident_layers: None,
        parallel: 1,
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
        // A single format, or a K-quant mix whose matrices each take their type in the mix.
        let precision = m
            .precision
            .as_deref()
            .map(plan_precision)
            .transpose()?
            .unwrap_or(wgllm::model::params::Precision::Q4_0);
        let format = precision.storage();
        let mix = precision
            .is_mix()
            .then(|| wgllm::model::params::NamedTypes::new(&cfg, precision));
        eprintln!(
            "building {name} with synthetic {precision} weights on {} ...",
            gpu.info.name
        );
        opts.resident_layers = resident_layers(gpu, m, || {
            let plan = MemoryPlan::new(&cfg, run_plan_options(gpu, m, precision, false)?)?;
            let layers = plan.uniform_layer_bytes();
            Ok(Some((plan, layers)))
        })?;
        let t = std::time::Instant::now();
        let rot = cfg.head_dim;
        let src = Source::Synthetic {
            format,
            seed: 1,
            mix,
        };
        let model = Llama::load(gpu, cfg, rot, &src, opts)?;
        eprintln!("built in {:.1} s", t.elapsed().as_secs_f64());
        return Ok((Box::new(model), format!("{name} {precision} (synthetic)")));
    }
    let lm = load_model(gpu, m, false)?;
    Ok((lm.model, lm.description))
}
