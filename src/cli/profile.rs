//! `wgllm profile`: run a model for some tokens and print the plan against the ledger, class by
//! class, and GPU time per op from timestamp queries.

use anyhow::Result;
use wgllm::gpu::Gpu;

use super::load::{auto_model_plan, load_for_bench, run_plan_options};
use super::plan::plan_precision;
use super::{Global, ModelArgs, SyntheticArgs};

#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    synth: SyntheticArgs,
    /// Prompt tokens, then decoded tokens.
    #[arg(short = 'p', long, default_value_t = 32)]
    prompt_tokens: usize,
    #[arg(short = 'n', long, default_value_t = 8)]
    tokens: usize,
    /// Sequence slots: with more than one, profile batched decode steps of every slot at once
    /// (as `wgllm serve --parallel N` runs them), each slot's prompt run first (unprofiled); a
    /// LLaMA-family GGUF model only.
    #[arg(long, default_value_t = 1)]
    parallel: usize,
    #[arg(long)]
    json: bool,
}

/// Per-op GPU time, grouped by kernel, per `per` steps: (kernel, ms, dispatches), largest first.
fn by_kernel(ops: &[wgllm::gpu::record::DispatchTime], per: f64) -> Vec<(String, f64, f64)> {
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
}

/// Prints per-op times (from [`by_kernel`]) with their shares and the GPU total against `wall_ms`.
fn print_ops(ops: &[(String, f64, f64)], wall_ms: f64) {
    let total: f64 = ops.iter().map(|d| d.1).sum();
    for (k, ms, c) in ops {
        println!(
            "  {k:<48} {ms:>10.3} ms  {c:>6.0} dispatches  {:>5.1}%",
            100.0 * ms / total.max(1e-12)
        );
    }
    println!(
        "  {:<48} {total:>10.3} ms  (wall {wall_ms:.3} ms: the rest is submission and dispatch overhead)",
        "GPU total"
    );
}

/// `--parallel N`: `n` batched decode steps of all N slots, after each slot's prompt.
fn run_batched(a: Args, gpu: &Gpu) -> Result<()> {
    use wgllm::model::batch::BatchLm;
    use wgllm::model::generate::CausalLm;
    let (prompt, n, slots) = (a.prompt_tokens.max(1), a.tokens.max(1), a.parallel);
    let mut m = a.model;
    m.ctx = Some(m.ctx().max(prompt + n + 2));
    let (mut model, name) = super::bench::load_slots(gpu, &m, slots)?;
    model.set_all_logits(false);
    let vocab = model.vocab_size() as u32;
    let mut next = Vec::new();
    for slot in 0..slots {
        let ids: Vec<u32> = (0..prompt as u32)
            .map(|i| (i * 7919 + 13 + slot as u32) % vocab)
            .collect();
        next.push(wgllm::sampler::argmax(
            &model.forward_slot(gpu, slot, &ids, 0)?,
        ));
    }
    let mut step = |model: &mut wgllm::model::llama::Llama, pos: usize| -> Result<()> {
        Ok(wgllm::bench::greedy_batch_step(gpu, model, &mut next, pos)?)
    };
    // Unprofiled: compiles the step's kernels.
    step(&mut model, prompt)?;
    model.set_profiling(true);
    let t = std::time::Instant::now();
    for i in 0..n {
        step(&mut model, prompt + 1 + i)?;
    }
    let wall = t.elapsed().as_secs_f64() / n as f64;
    let ops = by_kernel(&model.take_profile(), n as f64);
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "model": name, "device": gpu.describe(), "slots": slots,
                "decode_batch": {"steps": n, "seconds_per_step": wall, "ops_ms_per_step": ops},
            }))?
        );
        return Ok(());
    }
    println!("{name} on {}", gpu.describe());
    println!(
        "\ndecode steps of {slots} rows (one token of each slot, after {prompt}-token prompts): \
         {:.3} s per step wall ({:.1} tokens/s in all; timestamps slow it); GPU time per op per step:",
        wall,
        slots as f64 / wall
    );
    print_ops(&ops, 1e3 * wall);
    Ok(())
}

pub(crate) fn run(a: Args, g: &Global) -> Result<()> {
    let gpu = &g.gpu()?;
    if a.parallel > 1 {
        return run_batched(a, gpu);
    }
    let (prompt, n, json) = (a.prompt_tokens, a.tokens, a.json);
    use wgllm::gpu::ledger::{human_bytes, BufferClass};
    let mut m = a.model;
    m.ctx = Some(m.ctx().max(prompt + n + 2));
    let (mut model, name) = load_for_bench(gpu, &m, &a.synth)?;
    let cfg_plan = profile_plan(gpu, &m, &a.synth, model.resident_layers())?;
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
    // One decoded token first, its kernels compiled and its times dropped, so that the wall time
    // per token is the steady state's.
    let next = wgllm::sampler::argmax(&logits);
    logits = model.forward(gpu, &[next], ids.len())?;
    model.take_profile();
    let t = std::time::Instant::now();
    for i in 0..n {
        let next = wgllm::sampler::argmax(&logits);
        logits = model.forward(gpu, &[next], ids.len() + 1 + i)?;
    }
    let decode = t.elapsed().as_secs_f64();
    let decode_ops = model.take_profile();
    let report = gpu.ledger.report();
    let pre = by_kernel(&prefill_ops, 1.0);
    let dec = by_kernel(&decode_ops, n.max(1) as f64);
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
            .map_or("-".into(), |p| human_bytes(p.buffers_bytes())),
        human_bytes(report.peak_total_bytes)
    );
    if let Some(p) = &cfg_plan {
        println!(
            "(planned: the classes added up, although loading and running never hold their staging at once; \
             the plan adds {} of estimated driver overhead, which no ledger sees, for {} in all{})",
            human_bytes(p.overhead_bytes),
            human_bytes(p.total_bytes),
            p.resident_layers
                .map_or(String::new(), |r| format!("; {r} layers resident, the rest streamed"))
        );
    }
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
    print_ops(&dec, 1e3 * decode / n.max(1) as f64);
    Ok(())
}

/// The plan `wgllm profile` compares the ledger with: the same model, precision, options and
/// streamed layers (`resident`, as the model was loaded); none for a safetensors directory of
/// another architecture, which is not planned here.
fn profile_plan(
    gpu: &Gpu,
    m: &ModelArgs,
    synth: &SyntheticArgs,
    resident: Option<usize>,
) -> Result<Option<wgllm::plan::MemoryPlan>> {
    let (plan, layers) = match synth.preset.as_deref() {
        Some(p) => {
            let cfg = wgllm::model::config::ModelConfig::preset(p)?;
            let precision = match m.precision.as_deref() {
                Some(p) => plan_precision(p)?,
                None if synth.synthetic => wgllm::model::params::Precision::Q4_0,
                None => wgllm::model::params::Precision::F16,
            };
            let plan =
                wgllm::plan::MemoryPlan::new(&cfg, run_plan_options(gpu, m, precision, false)?)?;
            let layers = plan.uniform_layer_bytes();
            (plan, layers)
        }
        None => {
            let path = wgllm::model::load::resolve(m.model.as_deref(), &mut |s| eprintln!("{s}"))?;
            match auto_model_plan(gpu, m, &path, false)? {
                Some(p) => p,
                None => return Ok(None),
            }
        }
    };
    Ok(Some(match resident {
        Some(r) => plan.with_streaming(r, &layers),
        None => plan,
    }))
}
