//! `wgllm bench kernels` and `wgllm bench model`.

use anyhow::Result;
use wgllm::gpu::Gpu;

use super::*;
use crate::ModelArgs;

pub(crate) fn bench_kernels(
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

#[allow(clippy::too_many_arguments)]
pub(crate) fn bench_model(
    gpu: &Gpu,
    m: &ModelArgs,
    preset: Option<&str>,
    synthetic: bool,
    opts: wgllm::bench::ModelBenchOptions,
    json: bool,
) -> Result<()> {
    let mut m = m.clone();
    let d = opts.depth;
    m.ctx = m.ctx.max(d + opts.pp + 8).max(d + opts.tg + 8);
    m.chunk = m.chunk.max(opts.pp.min(512));
    eprintln!("measuring the copy bandwidth of {}", gpu.info.name);
    let copy = wgllm::bench::copy_bandwidth(gpu)?;
    // The ledger's peak from here on covers loading and running the model only.
    gpu.ledger.reset_peaks();
    let (mut model, name) = load_for_bench(gpu, &m, preset, synthetic)?;
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
