//! Per-device choice of kernel variants from measurements, cached on disk.
//!
//! What is chosen: the [`WeightLayout`] of weight matrices on devices where both layouts have a
//! matvec (the subgroup matvec reads buffers and textures alike). The two are timed on a 2048 x
//! 2048 Q4_0 matrix-vector product (GPU timestamps where the device has them, else wall clock;
//! median of 5 after a warm-up) and textures are taken only when at least 10% faster, since
//! buffers are the layout every kernel reads. The result is kept in `tuning.json` of the cache
//! directory ([`crate::fetch::cache_dir`]) under the adapter, driver and wgllm version, so the
//! measurement runs once per device; delete the file (or set `WGLLM_WEIGHTS`) to redo or override
//! it. Rows per invocation stay a rule ([`super::matmul::matvec_sg_rows`]): measured on lavapipe
//! they differed by less than the machine's noise (BENCHMARKS.md).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::gpu::{BufferClass, Gpu, WeightLayout};
use crate::kernels::matmul::matvec;
use crate::kernels::weights::WeightStorage;
use crate::quant::{synthetic, WeightFormat};

/// One device's measured choice, as cached.
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

fn read_cache() -> BTreeMap<String, LayoutChoice> {
    std::fs::read(cache_file())
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

/// Adds `choice` under `key`, writing through a temporary file so readers never see half a file.
fn write_cache(key: &str, choice: &LayoutChoice) -> std::io::Result<()> {
    let mut all = read_cache();
    all.insert(key.to_string(), choice.clone());
    let path = cache_file();
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension(format!("json.{}", std::process::id()));
    std::fs::write(&tmp, serde_json::to_vec_pretty(&all).unwrap_or_default())?;
    std::fs::rename(tmp, path)
}

/// The cached choice for this device, or a fresh measurement (then cached).
pub fn weight_layout_choice(gpu: &Gpu) -> Result<LayoutChoice> {
    let key = device_key(gpu);
    if let Some(c) = read_cache().get(&key) {
        return Ok(c.clone());
    }
    let choice = measure_layouts(gpu)?;
    log::info!(
        "weights in {} on {}: probe matvec {:.0} us in buffers, {:.0} us in textures",
        choice.layout.name(),
        gpu.info.name,
        choice.buffers_us,
        choice.textures_us
    );
    if let Err(e) = write_cache(&key, &choice) {
        log::warn!(
            "could not cache the layout choice in {}: {e}",
            cache_file().display()
        );
    }
    Ok(choice)
}

/// Times the probe matvec with the weights in each layout.
pub fn measure_layouts(gpu: &Gpu) -> Result<LayoutChoice> {
    const N: usize = 2048;
    let gguf = synthetic(WeightFormat::Q4_0, N * N, 7)?;
    let x: Vec<f32> = (0..N).map(|i| ((i % 97) as f32 - 48.0) * 0.01).collect();
    let x = gpu.tensor_from("tune.x", BufferClass::Activations, &[1, N], &x)?;
    let y = gpu.tensor("tune.y", BufferClass::Activations, &[1, N])?;
    let time = |layout: WeightLayout| -> Result<f64> {
        let storage = WeightStorage {
            layout,
            max_binding: gpu.max_binding(),
            max_texture_dim: gpu.limits.max_texture_dimension_2d,
        };
        let w = gpu.upload_weights_as("tune.w", WeightFormat::Q4_0, N, N, &gguf, storage)?;
        let mut times = Vec::new();
        for rep in 0..6 {
            let mut rec = gpu.recorder();
            matvec(&mut rec, &w, &x, &y)?;
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
        Ok(crate::bench::median(&mut times))
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
