//! `wgllm bench kernels`: matrix kernels per weight format on the shapes 7B/13B models use, timed
//! with GPU timestamp queries (median of repeated runs), reported as time, effective GB/s, GFLOP/s
//! and the ratio to the device's copy bandwidth measured in the same run.

use std::time::Instant;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::gpu::{BufferClass, Gpu};
use crate::kernels::{matmul, Tensor};
use crate::quant::{synthetic, WeightFormat};

/// A matrix shape as `k x n`: `k` inputs (the row length of W), `n` outputs (its rows).
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Shape {
    pub k: usize,
    pub n: usize,
}

/// The shapes of the 7B/13B projections: attention (4096x4096), FFN up and down (4096x11008,
/// 11008x4096) and 13B's FFN up (5120x13824).
pub const MODEL_SHAPES: [Shape; 4] = [
    Shape { k: 4096, n: 4096 },
    Shape { k: 4096, n: 11008 },
    Shape { k: 11008, n: 4096 },
    Shape { k: 5120, n: 13824 },
];

#[derive(Debug, Clone)]
pub struct KernelBenchOptions {
    pub formats: Vec<WeightFormat>,
    pub shapes: Vec<Shape>,
    /// Tokens per run: 1 is decode (matvec), more is prefill (matmul).
    pub tokens: Vec<usize>,
    /// Timed runs per case, after one warm-up run.
    pub reps: usize,
}

impl Default for KernelBenchOptions {
    fn default() -> Self {
        KernelBenchOptions {
            formats: WeightFormat::ALL.to_vec(),
            shapes: MODEL_SHAPES.to_vec(),
            tokens: vec![1, 128],
            reps: 5,
        }
    }
}

/// One measured case.
#[derive(Debug, Clone, Serialize)]
pub struct KernelBenchRow {
    pub format: WeightFormat,
    pub k: usize,
    pub n: usize,
    pub tokens: usize,
    pub median_us: f64,
    pub min_us: f64,
    /// Weights + input + output bytes per run.
    pub bytes: u64,
    pub gb_per_s: f64,
    pub gflop_per_s: f64,
    /// `gb_per_s / copy_gb_per_s`.
    pub copy_ratio: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct KernelBenchReport {
    pub device: String,
    /// Where the weights were (`buffers` or `textures`, the device's [`crate::gpu::WeightLayout`]).
    pub weights: &'static str,
    /// Buffer-to-buffer copy bandwidth counting bytes read plus bytes written, like the kernels.
    pub copy_gb_per_s: f64,
    pub rows: Vec<KernelBenchRow>,
}

/// Copy bandwidth of the device: a 256 MiB buffer-to-buffer copy (capped by the device's maximum
/// buffer size), median of 5 after a warm-up, counting read + write bytes.
pub fn copy_bandwidth(gpu: &Gpu) -> Result<f64> {
    let size = (256u64 << 20).min(gpu.limits.max_buffer_size / 2) & !255;
    let a = gpu.alloc("bench.copy.src", BufferClass::Activations, size)?;
    let b = gpu.alloc("bench.copy.dst", BufferClass::Activations, size)?;
    let mut times = Vec::new();
    for i in 0..6 {
        let mut enc = gpu
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("bench.copy"),
            });
        enc.copy_buffer_to_buffer(&a.buffer, 0, &b.buffer, 0, size);
        let t = Instant::now();
        gpu.queue.submit([enc.finish()]);
        gpu.wait()?;
        if i > 0 {
            times.push(t.elapsed().as_secs_f64());
        }
    }
    Ok(2.0 * size as f64 / crate::stats::median(&mut times) / 1e9)
}

/// Runs every (format, shape, tokens) case. `progress(done, total, case)` is called before each.
pub fn bench_kernels(
    gpu: &Gpu,
    opts: &KernelBenchOptions,
    progress: &mut dyn FnMut(usize, usize, &str),
) -> Result<KernelBenchReport> {
    if !gpu.caps.timestamps {
        return Err(Error::MissingFeature {
            feature: "TIMESTAMP_QUERY",
            needed_by: "wgllm bench kernels".into(),
        });
    }
    let copy = copy_bandwidth(gpu)?;
    let total = opts.formats.len() * opts.shapes.len() * opts.tokens.len();
    let mut rows = Vec::new();
    let mut done = 0;
    for shape in &opts.shapes {
        for &format in &opts.formats {
            let gguf = synthetic(format, shape.k * shape.n, 42)?;
            let w = gpu.upload_weights(
                &format!("bench.w.{format}"),
                format,
                shape.n,
                shape.k,
                &gguf,
            )?;
            drop(gguf);
            for &m in &opts.tokens {
                progress(
                    done,
                    total,
                    &format!("{format} {}x{} x{m} tokens", shape.k, shape.n),
                );
                done += 1;
                let x: Vec<f32> = (0..m * shape.k)
                    .map(|i| ((i % 97) as f32 - 48.0) * 0.01)
                    .collect();
                let x = gpu.tensor_from("bench.x", BufferClass::Activations, &[m, shape.k], &x)?;
                let y = gpu.tensor("bench.y", BufferClass::Activations, &[m, shape.n])?;
                let mut times = Vec::new();
                for rep in 0..=opts.reps {
                    let mut rec = gpu.recorder();
                    run_case(&mut rec, &w, &x, &y, m)?;
                    let t: f64 = rec.submit_timed()?.iter().map(|d| d.nanos).sum();
                    if rep > 0 {
                        times.push(t / 1e3);
                    }
                }
                let min_us = times.iter().cloned().fold(f64::INFINITY, f64::min);
                let median_us = crate::stats::median(&mut times);
                let bytes = w.bytes() + (m * (shape.k + shape.n) * 4) as u64;
                let gb = bytes as f64 / (median_us * 1e-6) / 1e9;
                rows.push(KernelBenchRow {
                    format,
                    k: shape.k,
                    n: shape.n,
                    tokens: m,
                    median_us,
                    min_us,
                    bytes,
                    gb_per_s: gb,
                    gflop_per_s: 2.0 * (m * shape.k * shape.n) as f64 / (median_us * 1e-6) / 1e9,
                    copy_ratio: gb / copy,
                });
            }
        }
    }
    Ok(KernelBenchReport {
        device: gpu.describe(),
        weights: crate::kernels::weights::weight_layout(gpu).name(),
        copy_gb_per_s: copy,
        rows,
    })
}

fn run_case(
    rec: &mut crate::gpu::Recorder,
    w: &crate::kernels::WeightMatrix,
    x: &Tensor,
    y: &Tensor,
    m: usize,
) -> Result<()> {
    if m == 1 {
        let xs = Tensor {
            buf: x.buf.clone(),
            shape: vec![w.cols],
        };
        let ys = Tensor {
            buf: y.buf.clone(),
            shape: vec![w.rows],
        };
        matmul::matvec(rec, w, &xs, &ys)
    } else {
        matmul::matmul(rec, w, x, y)
    }
}

impl KernelBenchReport {
    /// A markdown table, as BENCHMARKS.md holds it.
    pub fn to_table(&self) -> String {
        let mut s = format!(
            "device: {}\nweights in {}\ncopy bandwidth: {:.1} GB/s (read + write)\n\n",
            self.device, self.weights, self.copy_gb_per_s
        );
        s += "| format | k x n | tokens | median | GB/s | GFLOP/s | of copy |\n|---|---|---:|---:|---:|---:|---:|\n";
        for r in &self.rows {
            s += &format!(
                "| {} | {}x{} | {} | {:.0} us | {:.2} | {:.1} | {:.2} |\n",
                r.format, r.k, r.n, r.tokens, r.median_us, r.gb_per_s, r.gflop_per_s, r.copy_ratio
            );
        }
        s
    }
}

/// `wgllm bench model`, in llama-bench's shape: prompt processing of `pp` tokens and text
/// generation of `tg` tokens, each repeated `reps` times from a context of `depth` tokens (0: an
/// empty one; the depth's prompt runs once, untimed).
#[derive(Debug, Clone, Serialize)]
pub struct ModelBenchOptions {
    pub pp: usize,
    pub tg: usize,
    pub reps: usize,
    pub depth: usize,
}

impl ModelBenchOptions {
    /// A test's name as llama-bench prints it: `pp512`, `tg128 @ d1024`.
    fn test_name(&self, test: &str, n: usize) -> String {
        if self.depth == 0 {
            format!("{test}{n}")
        } else {
            format!("{test}{n} @ d{}", self.depth)
        }
    }
}

/// Mean and standard deviation of tokens per second over the repetitions.
#[derive(Debug, Clone, Serialize)]
pub struct Rate {
    pub test: String,
    pub tokens_per_s: f64,
    pub std: f64,
    pub samples: Vec<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ModelBenchReport {
    pub model: String,
    pub device: String,
    pub rates: Vec<Rate>,
    /// Weights and (average) KV bytes read per decoded token.
    pub bytes_per_token: u64,
    pub decode_gb_per_s: f64,
    pub copy_gb_per_s: f64,
    /// Decode's effective bandwidth as a share of the copy bandwidth (the bandwidth bound).
    pub bandwidth_share: f64,
    /// VRAM ledger peak during the run.
    pub ledger_peak_bytes: u64,
}

fn mean_std(v: &[f64]) -> (f64, f64) {
    let n = v.len().max(1) as f64;
    let mean = v.iter().sum::<f64>() / n;
    let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
    (mean, var.sqrt())
}

/// Runs the pp and tg tests on a loaded model. `progress` gets a line per step.
/// `copy_gb_per_s` is the device's copy bandwidth, measured by the caller with [`copy_bandwidth`]
/// before the model was loaded (so its scratch buffers never share the ledger with the model).
pub fn bench_model(
    gpu: &Gpu,
    model: &mut dyn crate::model::generate::CausalLm,
    name: &str,
    opts: &ModelBenchOptions,
    copy_gb_per_s: f64,
    progress: &mut dyn FnMut(&str),
) -> Result<ModelBenchReport> {
    let vocab = model.vocab_size() as u32;
    model.set_all_logits(false);
    let d = opts.depth;
    let tokens: Vec<u32> = (0..(opts.pp.max(1) + d) as u32)
        .map(|i| (i * 7919 + 13) % vocab)
        .collect();
    let (context, tokens) = tokens.split_at(d);
    let mut rates = Vec::new();
    if d > 0 {
        progress(&format!("filling a context of {d} tokens"));
        model.forward(gpu, context, 0)?;
    }
    // Untimed warm-ups create every pipeline the timed runs use: the whole prompt (a chunk's
    // kernels follow its length) and a decode step (a single token's folded kernels are its
    // own). Without the second, the first tg run paid the decode kernels' compile.
    if opts.pp > 0 {
        model.forward(gpu, tokens, d)?;
    }
    if opts.tg > 0 || opts.pp == 0 {
        model.forward(gpu, &tokens[..1], d)?;
    }
    if opts.pp > 0 {
        let mut samples = Vec::new();
        for r in 0..opts.reps {
            progress(&format!("pp{} run {}/{}", opts.pp, r + 1, opts.reps));
            let t = Instant::now();
            model.forward(gpu, tokens, d)?;
            samples.push(opts.pp as f64 / t.elapsed().as_secs_f64());
        }
        let (m, s) = mean_std(&samples);
        rates.push(Rate {
            test: opts.test_name("pp", opts.pp),
            tokens_per_s: m,
            std: s,
            samples,
        });
    }
    if opts.tg > 0 {
        let mut samples = Vec::new();
        for r in 0..opts.reps {
            progress(&format!("tg{} run {}/{}", opts.tg, r + 1, opts.reps));
            let t = Instant::now();
            let mut next = tokens[0];
            for pos in d..d + opts.tg {
                let logits = model.forward(gpu, &[next], pos)?;
                next = crate::sampler::argmax(&logits);
            }
            samples.push(opts.tg as f64 / t.elapsed().as_secs_f64());
        }
        let (m, s) = mean_std(&samples);
        rates.push(Rate {
            test: opts.test_name("tg", opts.tg),
            tokens_per_s: m,
            std: s,
            samples,
        });
    }
    let copy = copy_gb_per_s;
    let bytes = model.weight_bytes_per_token() + model.kv_bytes_per_token(d + opts.tg / 2);
    let tg = rates
        .iter()
        .find(|r| r.test.starts_with("tg"))
        .map_or(0.0, |r| r.tokens_per_s);
    let gbs = bytes as f64 * tg / 1e9;
    Ok(ModelBenchReport {
        model: name.into(),
        device: gpu.describe(),
        rates,
        bytes_per_token: bytes,
        decode_gb_per_s: gbs,
        copy_gb_per_s: copy,
        bandwidth_share: gbs / copy,
        ledger_peak_bytes: gpu.ledger.report().peak_total_bytes,
    })
}

/// One batched decode step of slots `0..next.len()`, slot s feeding `next[s]` at position `pos`,
/// and each slot's greedy next token back into `next`.
pub fn greedy_batch_step(
    gpu: &Gpu,
    model: &mut dyn crate::model::batch::BatchLm,
    next: &mut [u32],
    pos: usize,
) -> Result<()> {
    use crate::model::batch::BatchRow;
    let rows: Vec<BatchRow> = next
        .iter()
        .enumerate()
        .map(|(slot, &token)| BatchRow { slot, token, pos })
        .collect();
    let logits = model.decode_batch(gpu, &rows)?;
    for (t, l) in next.iter_mut().zip(&logits) {
        *t = crate::sampler::argmax(l);
    }
    Ok(())
}

/// `wgllm bench model --parallel N`: text generation of `tg` tokens in each of the model's
/// `slots` sequence slots at once, every step one [`crate::model::batch::BatchLm::decode_batch`]
/// of all slots (continuous batching's steady state), each slot's context `depth` tokens deep
/// (filled once, untimed). Its rate is the aggregate: all slots' tokens per second.
pub fn bench_batch(
    gpu: &Gpu,
    model: &mut dyn crate::model::batch::BatchLm,
    name: &str,
    opts: &ModelBenchOptions,
    copy_gb_per_s: f64,
    progress: &mut dyn FnMut(&str),
) -> Result<ModelBenchReport> {
    let vocab = model.vocab_size() as u32;
    model.set_all_logits(false);
    let (d, n) = (opts.depth, model.slots());
    let mut next: Vec<u32> = (0..n as u32).map(|s| (s * 7919 + 13) % vocab).collect();
    for (slot, &t) in next.iter().enumerate() {
        if d > 0 {
            progress(&format!("filling slot {slot} with a context of {d} tokens"));
            let context: Vec<u32> = (0..d as u32)
                .map(|i| (i * 7919 + 13 + slot as u32) % vocab)
                .collect();
            model.forward_slot(gpu, slot, &context, 0)?;
        }
        // Untimed: creates the single-token pipelines.
        model.forward_slot(gpu, slot, &[t], d)?;
    }
    let step = |model: &mut dyn crate::model::batch::BatchLm, next: &mut Vec<u32>, pos: usize| {
        greedy_batch_step(gpu, model, next, pos)
    };
    // Untimed: creates the batched step's pipelines.
    step(model, &mut next, d)?;
    let mut rates = Vec::new();
    if opts.tg > 0 {
        let mut samples = Vec::new();
        for r in 0..opts.reps {
            progress(&format!("tg{} x{n} run {}/{}", opts.tg, r + 1, opts.reps));
            let t = Instant::now();
            for pos in d..d + opts.tg {
                step(model, &mut next, pos)?;
            }
            samples.push((n * opts.tg) as f64 / t.elapsed().as_secs_f64());
        }
        let (m, s) = mean_std(&samples);
        rates.push(Rate {
            test: format!("{} x{n} slots (aggregate)", opts.test_name("tg", opts.tg)),
            tokens_per_s: m,
            std: s,
            samples,
        });
    }
    // Weights are read once a step for all slots; each slot reads its own KV cache.
    let tg = rates.first().map_or(0.0, |r| r.tokens_per_s);
    let steps_per_s = tg / n.max(1) as f64;
    let kv = model.kv_bytes_per_token(d + opts.tg / 2);
    let step_bytes = model.weight_bytes_per_token() + n as u64 * kv;
    let gbs = step_bytes as f64 * steps_per_s / 1e9;
    Ok(ModelBenchReport {
        model: name.into(),
        device: gpu.describe(),
        rates,
        bytes_per_token: step_bytes,
        decode_gb_per_s: gbs,
        copy_gb_per_s,
        bandwidth_share: gbs / copy_gb_per_s,
        ledger_peak_bytes: gpu.ledger.report().peak_total_bytes,
    })
}

impl ModelBenchReport {
    /// A table like llama-bench's.
    pub fn to_table(&self) -> String {
        let mut s = "| model | device | test | t/s |\n|---|---|---:|---:|\n".to_string();
        for r in &self.rates {
            s += &format!(
                "| {} | {} | {} | {:.2} ± {:.2} |\n",
                self.model, self.device, r.test, r.tokens_per_s, r.std
            );
        }
        s += &format!(
            "\ndecode reads {:.1} MiB/token: {:.2} GB/s effective, {:.1}% of the {:.1} GB/s copy bandwidth; ledger peak {}\n",
            self.bytes_per_token as f64 / (1 << 20) as f64,
            self.decode_gb_per_s,
            100.0 * self.bandwidth_share,
            self.copy_gb_per_s,
            crate::gpu::ledger::human_bytes(self.ledger_peak_bytes)
        );
        s
    }
}
