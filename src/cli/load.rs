//! Opening models for the CLI: a file, the default model, or a preset with synthetic weights,
//! with `--resident-layers` streaming decided from the memory plan.

use anyhow::{Context, Result};
use wgllm::gpu::Gpu;

use super::plan::plan_precision;
use super::ModelArgs;

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
    let opts = RunOptions {
        ctx: m.ctx(),
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
pub(crate) type AutoPlan = Option<(
    wgllm::model::config::ModelConfig,
    wgllm::model::params::Precision,
    Option<u64>,
)>;

/// `--resident-layers`: `None` keeps every layer on the GPU. "auto" asks the memory plan only when
/// there is a budget: if the model does not fit it resident, the plan's streaming suggestion (or,
/// when not even that fits, every layer streamed, the least the GPU can hold).
pub(crate) fn resident_layers(
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
        ctx: m.ctx(),
        chunk: m.chunk.max(1),
        budget: Some(budget),
        all_logits,
        ..Default::default()
    }
    .for_device(&wgllm::kernels::device_traits(gpu));
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
pub(crate) fn auto_model_plan(
    gpu: &Gpu,
    m: &ModelArgs,
    path: &std::path::Path,
) -> Result<AutoPlan> {
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
    let bytes =
        wgllm::plan::gguf_parameter_bytes(&g, wgllm::kernels::weights::weight_storage(gpu))?;
    Ok(Some((cfg, Precision::parse(format.name())?, Some(bytes))))
}

/// Loads the model for `bench model` / `profile`: a file, the default model, or a preset with
/// synthetic weights.
pub(crate) fn load_for_bench(
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
        ctx: m.ctx(),
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
