//! `wgllm selftest`: every kernel variant this device runs, on random data, against its CPU
//! reference, with the error found. A user's check that their driver computes correctly: quantised
//! kernels have been seen to give silently wrong results on some GPUs.

use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::error::Result;
use crate::gpu::{BufferClass::Activations, Gpu};
use crate::kernels::attention::{self, KvCache, KvDtype};
use crate::kernels::{activation, elementwise, embedding, matmul, norm, rope, softmax};
use crate::quant::{dequantize, quantize, WeightFormat};

/// One check's outcome.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub name: String,
    /// Normalised mean squared error against the CPU reference: sum((gpu-cpu)^2) / sum(cpu^2).
    pub nmse: f64,
    pub max_abs_err: f64,
    pub tolerance: f64,
    pub passed: bool,
    /// Set when the kernel could not run at all.
    pub error: Option<String>,
}

/// Tolerances on NMSE. The references use the same dequantised weights and exact arithmetic in
/// f64, so the GPU differs only by f32 summation order and its transcendental functions.
const TOL_EXACT: f64 = 1e-10;
const TOL_TRANSCENDENTAL: f64 = 1e-8;

fn randn(rng: &mut rand::rngs::StdRng, n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let (u, v): (f32, f32) = (rng.gen_range(1e-7..1.0), rng.gen());
            scale * (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos()
        })
        .collect()
}

fn compare(name: &str, got: &[f32], want: &[f32], tolerance: f64) -> Check {
    let (mut num, mut den, mut max) = (0f64, 0f64, 0f64);
    for (g, w) in got.iter().zip(want) {
        let d = (*g as f64) - (*w as f64);
        num += d * d;
        den += (*w as f64) * (*w as f64);
        max = max.max(d.abs());
    }
    let nmse = if got.len() != want.len() || got.iter().any(|v| !v.is_finite()) {
        f64::INFINITY
    } else if den > 0.0 {
        num / den
    } else {
        num
    };
    Check {
        name: name.into(),
        nmse,
        max_abs_err: max,
        tolerance,
        passed: nmse <= tolerance,
        error: None,
    }
}

fn failed(name: &str, e: crate::Error) -> Check {
    Check {
        name: name.into(),
        nmse: f64::INFINITY,
        max_abs_err: f64::INFINITY,
        tolerance: 0.0,
        passed: false,
        error: Some(e.to_string()),
    }
}

/// Runs all checks, calling `progress` with each result as it comes.
pub fn run(gpu: &Gpu, progress: &mut dyn FnMut(&Check)) -> Vec<Check> {
    let mut out = Vec::new();
    let mut push = |c: Check, out: &mut Vec<Check>| {
        progress(&c);
        out.push(c);
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5e1f);
    // Shapes chosen to be awkward: rows not a multiple of any workgroup tile, K not a multiple
    // of the workgroup size (K-quants: three 256-weight super-blocks).
    for f in WeightFormat::ALL {
        let cols = match f.block_len() {
            1 => 333,
            32 => 32 * 11,
            n => 3 * n,
        };
        let rows = 67;
        for m in [1usize, 7] {
            let name = format!(
                "{} {f} {rows}x{cols} x{m}",
                if m == 1 { "matvec" } else { "matmul" }
            );
            let c =
                check_matmul(gpu, &mut rng, f, rows, cols, m).unwrap_or_else(|e| failed(&name, e));
            push(Check { name, ..c }, &mut out);
        }
        let name = format!("embedding {f}");
        let c = check_embedding(gpu, &mut rng, f).unwrap_or_else(|e| failed(&name, e));
        push(Check { name, ..c }, &mut out);
    }
    type Small = fn(&Gpu, &mut rand::rngs::StdRng) -> Result<Check>;
    let small: [(&str, Small); 9] = [
        ("add", check_add),
        ("add_bias", check_add_bias),
        ("rms_norm", check_rms_norm),
        ("layer_norm", check_layer_norm),
        ("softmax", check_softmax),
        ("rope interleaved", |g, r| {
            check_rope(g, r, rope::RopeMode::Interleaved)
        }),
        ("rope rotate-half", |g, r| {
            check_rope(g, r, rope::RopeMode::Half)
        }),
        ("swiglu", check_swiglu),
        ("gelu erf + tanh", check_gelu),
    ];
    for (name, f) in small {
        let c = f(gpu, &mut rng).unwrap_or_else(|e| failed(name, e));
        push(
            Check {
                name: name.into(),
                ..c
            },
            &mut out,
        );
    }
    for dtype in [KvDtype::F32, KvDtype::F16, KvDtype::Q8_0] {
        for (m, pos0) in [(1usize, 40usize), (19, 5)] {
            let name = format!("attention kv={dtype} gqa 6/2 tokens={m} pos0={pos0}");
            let c =
                check_attention(gpu, &mut rng, dtype, m, pos0).unwrap_or_else(|e| failed(&name, e));
            push(Check { name, ..c }, &mut out);
        }
    }
    out
}

fn check_matmul(
    gpu: &Gpu,
    rng: &mut rand::rngs::StdRng,
    f: WeightFormat,
    rows: usize,
    cols: usize,
    m: usize,
) -> Result<Check> {
    let w = randn(rng, rows * cols, 1.0);
    let gguf = quantize(f, &w)?;
    let wd = dequantize(f, &gguf, w.len())?;
    let wm = gpu.upload_weights("selftest.w", f, rows, cols, &gguf)?;
    let x = randn(rng, m * cols, 1.0);
    let tx = gpu.tensor_from("selftest.x", Activations, &[m, cols], &x)?;
    let ty = gpu.tensor("selftest.y", Activations, &[m, rows])?;
    let mut rec = gpu.recorder();
    if m == 1 {
        matmul::matvec(&mut rec, &wm, &tx.view(&[cols])?, &ty.view(&[rows])?)?;
    } else {
        matmul::matmul(&mut rec, &wm, &tx, &ty)?;
    }
    rec.submit()?;
    Ok(compare(
        "",
        &gpu.read(&ty)?,
        &matmul::reference(&wd, rows, cols, &x, m),
        TOL_EXACT,
    ))
}

fn check_embedding(gpu: &Gpu, rng: &mut rand::rngs::StdRng, f: WeightFormat) -> Result<Check> {
    let (vocab, dim) = (50, 64.max(f.block_len()));
    let table = randn(rng, vocab * dim, 1.0);
    let gguf = quantize(f, &table)?;
    let td = dequantize(f, &gguf, table.len())?;
    let wm = gpu.upload_weights("selftest.table", f, vocab, dim, &gguf)?;
    let ids: Vec<u32> = (0..9).map(|_| rng.gen_range(0..vocab as u32)).collect();
    let tid = gpu.upload("selftest.ids", Activations, bytemuck::cast_slice(&ids))?;
    let out = gpu.tensor("selftest.out", Activations, &[ids.len(), dim])?;
    let mut rec = gpu.recorder();
    embedding::lookup(&mut rec, &wm, &tid, ids.len(), &out)?;
    rec.submit()?;
    Ok(compare(
        "",
        &gpu.read(&out)?,
        &embedding::lookup_reference(&td, dim, &ids),
        0.0,
    ))
}

fn check_add(gpu: &Gpu, rng: &mut rand::rngs::StdRng) -> Result<Check> {
    let (a, b) = (randn(rng, 1001, 1.0), randn(rng, 1001, 1.0));
    let ta = gpu.tensor_from("a", Activations, &[1001], &a)?;
    let tb = gpu.tensor_from("b", Activations, &[1001], &b)?;
    let o = gpu.tensor("o", Activations, &[1001])?;
    let mut rec = gpu.recorder();
    elementwise::add(&mut rec, &ta, &tb, &o)?;
    rec.submit()?;
    Ok(compare(
        "",
        &gpu.read(&o)?,
        &elementwise::add_reference(&a, &b),
        TOL_EXACT,
    ))
}

fn check_add_bias(gpu: &Gpu, rng: &mut rand::rngs::StdRng) -> Result<Check> {
    let (y, b) = (randn(rng, 5 * 77, 1.0), randn(rng, 77, 1.0));
    let ty = gpu.tensor_from("y", Activations, &[5, 77], &y)?;
    let tb = gpu.tensor_from("b", Activations, &[77], &b)?;
    let mut rec = gpu.recorder();
    elementwise::add_bias(&mut rec, &ty, &tb)?;
    rec.submit()?;
    Ok(compare(
        "",
        &gpu.read(&ty)?,
        &elementwise::add_bias_reference(&y, &b),
        TOL_EXACT,
    ))
}

fn check_rms_norm(gpu: &Gpu, rng: &mut rand::rngs::StdRng) -> Result<Check> {
    let (x, g) = (randn(rng, 3 * 300, 2.0), randn(rng, 300, 1.0));
    let tx = gpu.tensor_from("x", Activations, &[3, 300], &x)?;
    let tg = gpu.tensor_from("g", Activations, &[300], &g)?;
    let o = gpu.tensor("o", Activations, &[3, 300])?;
    let mut rec = gpu.recorder();
    norm::rms_norm(&mut rec, &tx, &tg, 1e-5, &o)?;
    rec.submit()?;
    Ok(compare(
        "",
        &gpu.read(&o)?,
        &norm::rms_norm_reference(&x, &g, 1e-5),
        TOL_EXACT,
    ))
}

fn check_layer_norm(gpu: &Gpu, rng: &mut rand::rngs::StdRng) -> Result<Check> {
    let (x, g, b) = (
        randn(rng, 3 * 300, 2.0),
        randn(rng, 300, 1.0),
        randn(rng, 300, 1.0),
    );
    let x: Vec<f32> = x.iter().map(|v| v + 5.0).collect(); // an offset tests the mean
    let tx = gpu.tensor_from("x", Activations, &[3, 300], &x)?;
    let tg = gpu.tensor_from("g", Activations, &[300], &g)?;
    let tb = gpu.tensor_from("b", Activations, &[300], &b)?;
    let o = gpu.tensor("o", Activations, &[3, 300])?;
    let mut rec = gpu.recorder();
    norm::layer_norm(&mut rec, &tx, &tg, &tb, 1e-12, &o)?;
    rec.submit()?;
    Ok(compare(
        "",
        &gpu.read(&o)?,
        &norm::layer_norm_reference(&x, &g, &b, 1e-12),
        TOL_EXACT,
    ))
}

fn check_softmax(gpu: &Gpu, rng: &mut rand::rngs::StdRng) -> Result<Check> {
    let x = randn(rng, 4 * 257, 30.0);
    let tx = gpu.tensor_from("x", Activations, &[4, 257], &x)?;
    let o = gpu.tensor("o", Activations, &[4, 257])?;
    let mut rec = gpu.recorder();
    softmax::softmax(&mut rec, &tx, &o)?;
    rec.submit()?;
    Ok(compare(
        "",
        &gpu.read(&o)?,
        &softmax::softmax_reference(&x, 257),
        TOL_TRANSCENDENTAL,
    ))
}

fn check_rope(gpu: &Gpu, rng: &mut rand::rngs::StdRng, mode: rope::RopeMode) -> Result<Check> {
    let (m, h, d) = (5, 3, 64);
    let x = randn(rng, m * h * d, 1.0);
    let tx = gpu.tensor_from("x", Activations, &[m, h, d], &x)?;
    let mut rec = gpu.recorder();
    rope::rope(&mut rec, &tx, 17, 10000.0, mode, d)?;
    rec.submit()?;
    let want = rope::rope_reference(&x, h, d, 17, &rope::rope_freqs(10000.0, d), mode);
    Ok(compare("", &gpu.read(&tx)?, &want, TOL_TRANSCENDENTAL))
}

fn check_swiglu(gpu: &Gpu, rng: &mut rand::rngs::StdRng) -> Result<Check> {
    let (g, u) = (randn(rng, 2 * 199, 3.0), randn(rng, 2 * 199, 1.0));
    let tg = gpu.tensor_from("g", Activations, &[2, 199], &g)?;
    let tu = gpu.tensor_from("u", Activations, &[2, 199], &u)?;
    let o = gpu.tensor("o", Activations, &[2, 199])?;
    let mut rec = gpu.recorder();
    activation::swiglu(&mut rec, &tg, &tu, &o)?;
    rec.submit()?;
    Ok(compare(
        "",
        &gpu.read(&o)?,
        &activation::swiglu_reference(&g, &u),
        TOL_TRANSCENDENTAL,
    ))
}

fn check_gelu(gpu: &Gpu, rng: &mut rand::rngs::StdRng) -> Result<Check> {
    let x = randn(rng, 513, 3.0);
    let tx = gpu.tensor_from("x", Activations, &[513], &x)?;
    let (oe, ot) = (
        gpu.tensor("oe", Activations, &[513])?,
        gpu.tensor("ot", Activations, &[513])?,
    );
    let mut rec = gpu.recorder();
    activation::gelu(&mut rec, &tx, &oe, activation::GeluForm::Erf)?;
    activation::gelu(&mut rec, &tx, &ot, activation::GeluForm::Tanh)?;
    rec.submit()?;
    let mut got = gpu.read(&oe)?;
    got.extend(gpu.read(&ot)?);
    let mut want = activation::gelu_reference(&x, activation::GeluForm::Erf);
    want.extend(activation::gelu_reference(&x, activation::GeluForm::Tanh));
    Ok(compare("", &got, &want, TOL_TRANSCENDENTAL))
}

fn check_attention(
    gpu: &Gpu,
    rng: &mut rand::rngs::StdRng,
    dtype: KvDtype,
    m: usize,
    pos0: usize,
) -> Result<Check> {
    let (nh, nkv, hd) = (6, 2, 64);
    let n = pos0 + m;
    let cache = KvCache::new(gpu, "selftest.kv", dtype, n + 3, nkv, hd)?;
    let k = randn(rng, n * nkv * hd, 1.0);
    let v = randn(rng, n * nkv * hd, 1.0);
    let tk = gpu.tensor_from("k", Activations, &[n, nkv, hd], &k)?;
    let tv = gpu.tensor_from("v", Activations, &[n, nkv, hd], &v)?;
    let q = randn(rng, m * nh * hd, 1.0);
    let tq = gpu.tensor_from("q", Activations, &[m, nh, hd], &q)?;
    let o = gpu.tensor("o", Activations, &[m, nh, hd])?;
    let scale = 1.0 / (hd as f32).sqrt();
    let mut rec = gpu.recorder();
    attention::store(&mut rec, &cache, &tk, &tv, 0)?;
    attention::attention(&mut rec, &tq, &cache, pos0, scale, &o)?;
    rec.submit()?;
    // Compare with what the cache holds (quantised caches round on store, by design).
    let (kc, vc) = cache.read(gpu, n)?;
    let want = attention::reference(&q, &kc, &vc, m, nh, nkv, hd, pos0, scale);
    Ok(compare("", &gpu.read(&o)?, &want, TOL_EXACT))
}
