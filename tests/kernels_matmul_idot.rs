//! The integer-dot variant of the workgroup matvec (x quantised to 8 bits by
//! `shaders/quantize_x.wgsl`, `dot4I8Packed` in the `matvec_idot_*` entry points) forced on the
//! test device (its sums reduced with `subgroupAdd`) and on the OpenGL backend (workgroup memory,
//! `dot4I8Packed` written out by naga), against the CPU reference of the same quantisation and
//! integer dot, and against the float reference within the error 8-bit activations make. One
//! token and several, the folds (RMSNorm and SwiGLU in, the residual out), and the policy: the
//! variant runs only where forced or where the gate lets it, never on a CPU device by default.

mod common;
use common::*;
use wgllm::kernels::matmul::idot::{self, MatvecMath, IDOT_FORMATS};
use wgllm::kernels::matmul::{self, MatmulKernel, MatvecKernel};
use wgllm::kernels::{Tensor, WeightMatrix};
use wgllm::quant::WeightFormat;
use wgllm::BufferClass::Activations;
use wgllm::{Gpu, GpuOptions};

/// NMSE against the integer reference: the same integers, summed in f32 on the device (lane
/// partials, then the reduction) and in f64 on the CPU.
const NMSE_SAME_INTEGERS: f64 = 1e-10;
/// NMSE against the float product: x's 8-bit rounding, about (max |x| / 127)^2 / 12 per value
/// relative to the mean square (3e-5 for normal x over 32-value blocks), bounded with margin.
const NMSE_VS_FLOAT: f64 = 1e-4;

/// A device of its own with the integer-dot variant forced.
fn forced(opts: GpuOptions) -> Gpu {
    let gpu = Gpu::new(&opts).expect("open the device");
    assert!(
        gpu.caps.packed_4x8_dot,
        "wgpu reports packed_4x8_integer_dot_product on every native backend"
    );
    idot::force_matvec(&gpu, Some(MatvecMath::Idot));
    gpu
}

/// The test device (lavapipe in CI), failing under CI=true without one.
fn vulkan() -> Option<Gpu> {
    gpu()?;
    Some(forced(GpuOptions::default()))
}

/// The OpenGL adapter, where Mesa's GL is installed (CI installs Vulkan only).
fn gl() -> Option<Gpu> {
    Some(forced(GpuOptions {
        adapter: Some(gl_adapter()?),
        ..Default::default()
    }))
}

fn devices() -> Vec<Gpu> {
    let mut out: Vec<Gpu> = vulkan().into_iter().collect();
    match gl() {
        Some(g) => out.push(g),
        None => eprintln!("SKIPPED on OpenGL: no OpenGL adapter"),
    }
    out
}

/// Random weights in `f` in buffers: the GGUF blocks, the uploaded matrix, the dequantised rows.
fn weights(
    gpu: &Gpu,
    f: WeightFormat,
    rows: usize,
    cols: usize,
    seed: u64,
) -> (Vec<u8>, WeightMatrix, Vec<f32>) {
    quantised_weights(gpu, buffers(gpu), f, rows, cols, seed)
}

#[test]
fn quantisation_reference_rounds_blocks_to_bytes() {
    // A block of 32: max |v| = 2.54 gives d = 0.02; v = 1.27 is exactly 63.5 quanta (ties to
    // even: 64), 0.01 half a quantum (0), -2.54 the extreme (-127).
    let mut x = vec![0f32; 32];
    x[0] = -2.54;
    x[1] = 1.27;
    x[2] = 0.01;
    x[3] = 0.5;
    let (q, d) = idot::quantize_activations(&x);
    assert_eq!(d.len(), 1);
    assert!((d[0] - 0.02).abs() < 1e-7, "{}", d[0]);
    assert_eq!(
        &q[..4],
        &[-127, (1.27f32 / d[0]).round_ties_even() as i8, 0, 25]
    );
    assert!(q[4..].iter().all(|&v| v == 0));
    // An all-zero block has scale 0 and zero quants.
    let (q, d) = idot::quantize_activations(&[0.0; 32]);
    assert_eq!((q, d), (vec![0i8; 32], vec![0.0]));
}

#[test]
fn idot_matvec_matches_the_integer_reference() {
    for gpu in devices() {
        let dev = format!("{} ({:?})", gpu.info.name, gpu.info.backend);
        for (i, f) in IDOT_FORMATS.into_iter().enumerate() {
            // 37 rows (a partial workgroup), 37 blocks a row (no multiple of a pass).
            let (rows, cols) = (37, 32 * 37);
            let (q, wm, deq) = weights(&gpu, f, rows, cols, 700 + i as u64);
            let (r, threads) = [(16, 64), (8, 128), (4, 256)][i % 3];
            let one = MatmulKernel::Rows { tokens: 1 };
            let cases = [
                (1, Some(MatvecKernel::Workgroup { rows: r, threads }), one),
                (2, None, MatmulKernel::Rows { tokens: 2 }),
                (5, None, MatmulKernel::Rows { tokens: 4 }),
            ];
            for (m, mv, mm) in cases {
                let xd = randn(m * cols, 710 + (i * 8 + m) as u64, 1.0);
                let x = gpu.tensor_from("x", Activations, &[m, cols], &xd).unwrap();
                let y = gpu.tensor("y", Activations, &[m, rows]).unwrap();
                let mut rec = gpu.recorder();
                if m == 1 {
                    matmul::matvec_with(&mut rec, &wm, &x, &y, mv).unwrap();
                } else {
                    matmul::matmul_with(&mut rec, &wm, &x, &y, Some(mm)).unwrap();
                }
                assert_eq!(rec.len(), 2, "{dev} {f}: quantise x once, then the product");
                rec.submit().unwrap();
                let got = gpu.read(&y).unwrap();
                let what = format!("{dev} idot {f} {rows}x{cols} x{m}");
                let want = idot::reference(f, &q, rows, cols, &xd, m).unwrap();
                assert_close(&what, &got, &want, NMSE_SAME_INTEGERS);
                let float = matmul::reference(&deq, rows, cols, &xd, m);
                assert_close(&format!("{what} vs float"), &got, &float, NMSE_VS_FLOAT);
            }
        }
        eprintln!("{dev}: the integer-dot matvec matches in {IDOT_FORMATS:?}");
    }
}

#[test]
fn idot_matvec_applies_the_folds() {
    for gpu in devices() {
        let dev = format!("{} ({:?})", gpu.info.name, gpu.info.backend);
        let f = WeightFormat::Q4_1;
        let (rows, cols) = (48, 256);
        let (_, wm, deq) = weights(&gpu, f, rows, cols, 800);
        let xd = randn(cols, 801, 3.0);
        let x = gpu.tensor_from("x", Activations, &[1, cols], &xd).unwrap();
        let y = gpu.tensor("y", Activations, &[1, rows]).unwrap();

        // RMSNorm folded in: x * gamma quantised, 1 / rms in the scales.
        let gd = randn(cols, 802, 1.0);
        let gamma = gpu.tensor_from("gamma", Activations, &[cols], &gd).unwrap();
        let xb = gpu.tensor("xb", Activations, &[1, cols]).unwrap();
        let mut rec = gpu.recorder();
        matmul::matmul_fused_norm(&mut rec, &[&wm], &x, &gamma, 1e-5, &xb, &[&y]).unwrap();
        assert_eq!(rec.len(), 2, "{dev}: the norm goes into the quantisation");
        rec.submit().unwrap();
        let normed = wgllm::kernels::norm::rms_norm_reference(&xd, &gd, 1e-5);
        let want = matmul::reference(&deq, rows, cols, &normed, 1);
        assert_close(
            &format!("{dev} norm"),
            &gpu.read(&y).unwrap(),
            &want,
            NMSE_VS_FLOAT,
        );

        // SwiGLU in, the residual out.
        let ud = randn(cols, 803, 1.0);
        let rd = randn(rows, 804, 1.0);
        let up = gpu.tensor_from("up", Activations, &[1, cols], &ud).unwrap();
        let res = gpu
            .tensor_from("res", Activations, &[1, rows], &rd)
            .unwrap();
        let (act, proj) = (
            gpu.tensor("act", Activations, &[1, cols]).unwrap(),
            gpu.tensor("proj", Activations, &[1, rows]).unwrap(),
        );
        let mut rec = gpu.recorder();
        matmul::matmul_swiglu_add(&mut rec, &wm, &x, &up, &act, &res, &proj, &y).unwrap();
        assert_eq!(rec.len(), 2, "{dev}: SwiGLU goes into the quantisation");
        rec.submit().unwrap();
        let act_ref = wgllm::kernels::activation::swiglu_reference(&xd, &ud);
        let want = wgllm::kernels::elementwise::add_reference(
            &rd,
            &matmul::reference(&deq, rows, cols, &act_ref, 1),
        );
        assert_close(
            &format!("{dev} swiglu + res"),
            &gpu.read(&y).unwrap(),
            &want,
            NMSE_VS_FLOAT,
        );
    }
}

#[test]
fn idot_runs_only_where_forced_or_allowed() {
    if gpu().is_none() {
        return;
    }
    let plain = Gpu::new(&GpuOptions::default()).unwrap();
    // Not forced: a CPU device keeps the float path, whatever the gate says.
    if plain.info.device_type == wgpu::DeviceType::Cpu && std::env::var("WGLLM_MATVEC").is_err() {
        for f in WeightFormat::ALL {
            assert!(!idot::uses_idot(&plain, f), "{f}");
        }
    }
    idot::force_matvec(&plain, Some(MatvecMath::Idot));
    for f in WeightFormat::ALL {
        assert_eq!(idot::uses_idot(&plain, f), IDOT_FORMATS.contains(&f), "{f}");
    }
    // Forced, one token runs on the workgroup matvec, lavapipe too.
    assert!(matches!(
        matmul::matvec_kernel(&plain, WeightFormat::Q4_0, 576),
        MatvecKernel::Workgroup { .. }
    ));
    assert_eq!(
        matmul::matmul_kernel(&plain, 64),
        MatmulKernel::Rows { tokens: 4 }
    );
    idot::force_matvec(&plain, Some(MatvecMath::Float));
    assert!(!idot::uses_idot(&plain, WeightFormat::Q8_0));
    // A format without integer-dot entry points keeps the float path, one dispatch.
    idot::force_matvec(&plain, Some(MatvecMath::Idot));
    let (_, wm, deq) = weights(&plain, WeightFormat::Q4_K, 8, 256, 900);
    let xd = randn(256, 901, 1.0);
    let x = plain.tensor_from("x", Activations, &[256], &xd).unwrap();
    let y: Tensor = plain.tensor("y", Activations, &[8]).unwrap();
    let mut rec = plain.recorder();
    matmul::matvec(&mut rec, &wm, &x, &y).unwrap();
    assert_eq!(rec.len(), 1);
    rec.submit().unwrap();
    let want = matmul::reference(&deq, 8, 256, &xd, 1);
    assert_close(
        "q4_k forced idot",
        &plain.read(&y).unwrap(),
        &want,
        tol::NMSE_QUANT,
    );
}
