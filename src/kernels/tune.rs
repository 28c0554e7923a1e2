//! Per-device choice of kernel variants from measurements, cached on disk.
//!
//! What is chosen, each measured on a 2048 x 2048 Q4_0 matrix-vector product (GPU timestamps
//! where the device has them, else wall clock; median of 5 after a warm-up):
//! - the [`WeightLayout`] of weight matrices on devices where both layouts have a matvec (the
//!   subgroup matvec reads buffers and textures alike). Textures are taken only when at least 10%
//!   faster, since buffers are the layout every kernel reads;
//! - rows and threads per workgroup of the workgroup matvec (`matvec.wgsl`, what GPUs run), the
//!   fastest of [`MATVEC_ROWS`] x [`MATVEC_THREADS`] ([`matvec_choice`];
//!   [`super::matmul::matvec_rows`] and [`super::matmul::matvec_threads`] use it).
//!
//! The results are kept in `tuning.json` of the cache directory ([`crate::fetch::cache_dir`]) under
//! the adapter, driver and wgllm version, so each measurement runs once per device; delete the
//! file (or set `WGLLM_WEIGHTS`) to redo or override them. Rows per invocation of the subgroup
//! matvec (CPU devices) stay a rule ([`super::matmul::matvec_sg_rows`]): measured on lavapipe they
//! differed by less than the machine's noise (BENCHMARKS.md).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::gpu::{BufferClass, Gpu, WeightLayout};
use crate::kernels::matmul::{
    matvec, matvec_with, MatvecKernel, MATVEC_PART, MATVEC_ROWS, MATVEC_THREADS,
};
use crate::kernels::weights::WeightStorage;
use crate::quant::{synthetic, WeightFormat};

/// Rows of the probe matrix (and its columns).
pub const PROBE_ROWS: usize = 2048;

/// One device's measurements, as cached (each made when first needed).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct DeviceTuning {
    #[serde(default)]
    pub layout: Option<LayoutChoice>,
    #[serde(default)]
    pub matvec: Option<MatvecChoice>,
}

/// The workgroup matvec's fastest rows and threads per workgroup, and the median microseconds of
/// each (rows, threads) measured.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct MatvecChoice {
    pub rows: u32,
    pub threads: u32,
    pub us: Vec<(u32, u32, f64)>,
}

/// One device's measured layout choice.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LayoutChoice {
    pub layout: WeightLayout,
    /// Median microseconds of the probe matvec with weights in buffers, and in textures.
    pub buffers_us: f64,
    pub textures_us: f64,
}

/// The cache key of a device: adapter, backend, driver and wgllm version.
pub fn device_key(gpu: &Gpu) -> String {
    format!(
        "{} | {:?} | {} {} | wgllm {}",
        gpu.info.name,
        gpu.info.backend,
        gpu.info.driver,
        gpu.info.driver_info,
        env!("CARGO_PKG_VERSION")
    )
}

fn cache_file() -> PathBuf {
    crate::fetch::cache_dir().join("tuning.json")
}

fn read_cache() -> BTreeMap<String, DeviceTuning> {
    std::fs::read(cache_file())
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

/// Updates this device's entry with `update`, writing through a temporary file so readers never
/// see half a file.
fn write_cache(key: &str, update: impl FnOnce(&mut DeviceTuning)) -> std::io::Result<()> {
    let mut all = read_cache();
    update(all.entry(key.to_string()).or_default());
    let path = cache_file();
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension(format!("json.{}", std::process::id()));
    std::fs::write(&tmp, serde_json::to_vec_pretty(&all).unwrap_or_default())?;
    std::fs::rename(tmp, path)
}

/// `get`'s part of this device's cached entry, or `measure`'s (then cached with `put`).
fn cached<T: Clone>(
    gpu: &Gpu,
    what: &str,
    get: impl Fn(&DeviceTuning) -> Option<T>,
    measure: impl FnOnce(&Gpu) -> Result<T>,
    put: impl FnOnce(&mut DeviceTuning, T),
) -> Result<T> {
    let key = device_key(gpu);
    if let Some(c) = read_cache().get(&key).and_then(&get) {
        return Ok(c);
    }
    let choice = measure(gpu)?;
    let kept = choice.clone();
    if let Err(e) = write_cache(&key, |t| put(t, kept)) {
        log::warn!(
            "could not cache the {what} choice in {}: {e}",
            cache_file().display()
        );
    }
    Ok(choice)
}

/// The cached layout choice for this device, or a fresh measurement (then cached).
pub fn weight_layout_choice(gpu: &Gpu) -> Result<LayoutChoice> {
    let choice = cached(
        gpu,
        "layout",
        |t| t.layout.clone(),
        measure_layouts,
        |t, c| t.layout = Some(c),
    )?;
    log::info!(
        "weights in {} on {}: probe matvec {:.0} us in buffers, {:.0} us in textures",
        choice.layout.name(),
        gpu.info.name,
        choice.buffers_us,
        choice.textures_us
    );
    Ok(choice)
}

/// The cached rows-and-threads choice of the workgroup matvec for this device, or a fresh
/// measurement (then cached).
pub fn matvec_choice(gpu: &Gpu) -> Result<MatvecChoice> {
    let choice = cached(
        gpu,
        "matvec shape",
        |t| t.matvec.clone(),
        measure_matvec,
        |t, c| t.matvec = Some(c),
    )?;
    log::info!(
        "workgroup matvec on {}: {} rows, {} threads per workgroup (probe us: {:?})",
        gpu.info.name,
        choice.rows,
        choice.threads,
        choice.us
    );
    Ok(choice)
}

/// Times the probe matvec over every (rows, threads) per workgroup the kernel takes (weights in
/// buffers, the layout that kernel reads).
pub fn measure_matvec(gpu: &Gpu) -> Result<MatvecChoice> {
    let probe = Probe::new(gpu)?;
    let w = probe.weights(WeightStorage::on_device(gpu, WeightLayout::Buffers))?;
    let mut us = Vec::new();
    for rows in MATVEC_ROWS {
        for threads in MATVEC_THREADS
            .into_iter()
            .filter(|t| rows * t <= MATVEC_PART)
        {
            let k = Some(MatvecKernel::Workgroup { rows, threads });
            let t = probe.time(|rec| matvec_with(rec, &w, &probe.x, &probe.y, k))?;
            us.push((rows, threads, t));
        }
    }
    let (rows, threads) = us
        .iter()
        .min_by(|a, b| a.2.total_cmp(&b.2))
        .map_or((16, 64), |&(r, t, _)| (r, t));
    Ok(MatvecChoice { rows, threads, us })
}

/// The probe: a Q4_0 matrix and its input and output.
struct Probe<'a> {
    gpu: &'a Gpu,
    gguf: Vec<u8>,
    x: crate::kernels::Tensor,
    y: crate::kernels::Tensor,
}

impl<'a> Probe<'a> {
    fn new(gpu: &'a Gpu) -> Result<Probe<'a>> {
        const N: usize = PROBE_ROWS;
        let gguf = synthetic(WeightFormat::Q4_0, N * N, 7)?;
        let x: Vec<f32> = (0..N).map(|i| ((i % 97) as f32 - 48.0) * 0.01).collect();
        let x = gpu.tensor_from("tune.x", BufferClass::Activations, &[1, N], &x)?;
        let y = gpu.tensor("tune.y", BufferClass::Activations, &[1, N])?;
        Ok(Probe { gpu, gguf, x, y })
    }

    fn weights(&self, storage: WeightStorage) -> Result<crate::kernels::WeightMatrix> {
        const N: usize = PROBE_ROWS;
        self.gpu
            .upload_weights_as("tune.w", WeightFormat::Q4_0, N, N, &self.gguf, storage)
    }

    /// Median microseconds of what `record` records, over 5 runs after a warm-up.
    fn time(&self, record: impl Fn(&mut crate::gpu::Recorder) -> Result<()>) -> Result<f64> {
        let gpu = self.gpu;
        let mut times = Vec::new();
        for rep in 0..6 {
            let mut rec = gpu.recorder();
            record(&mut rec)?;
            let t = if gpu.caps.timestamps {
                rec.submit_timed()?.iter().map(|d| d.nanos).sum::<f64>() / 1e3
            } else {
                let start = Instant::now();
                rec.submit()?;
                gpu.wait()?;
                start.elapsed().as_secs_f64() * 1e6
            };
            if rep > 0 {
                times.push(t);
            }
        }
        Ok(crate::stats::median(&mut times))
    }
}

/// Times the probe matvec with the weights in each layout.
pub fn measure_layouts(gpu: &Gpu) -> Result<LayoutChoice> {
    let probe = Probe::new(gpu)?;
    let time = |layout: WeightLayout| -> Result<f64> {
        let w = probe.weights(WeightStorage::on_device(gpu, layout))?;
        probe.time(|rec| matvec(rec, &w, &probe.x, &probe.y))
    };
    let buffers_us = time(WeightLayout::Buffers)?;
    let textures_us = time(WeightLayout::Textures)?;
    let layout = if textures_us < 0.9 * buffers_us {
        WeightLayout::Textures
    } else {
        WeightLayout::Buffers
    };
    Ok(LayoutChoice {
        layout,
        buffers_us,
        textures_us,
    })
}
