//! SwiGLU, GeGLU (tanh) and GELU (both forms) against their f64 CPU references, and the bias add and scaled copy
//! of shaders/elementwise.wgsl.
mod common;
use common::*;
use wgllm::kernels::activation::{self, GeluForm};
use wgllm::kernels::elementwise;
use wgllm::BufferClass::Activations;

const LENS: [usize; 6] = [1, 7, 255, 257, 1000, 70_001];

fn gelu_gpu(gpu: &wgllm::Gpu, x: &[f32], form: GeluForm) -> Vec<f32> {
    let tx = gpu.tensor_from("x", Activations, &[x.len()], x).unwrap();
    let out = gpu.tensor("gelu", Activations, &[x.len()]).unwrap();
    let mut rec = gpu.recorder();
    activation::gelu(&mut rec, &tx, &out, form).unwrap();
    rec.submit().unwrap();
    gpu.read(&out).unwrap()
}

#[test]
fn swiglu_matches_reference() {
    let Some(gpu) = gpu() else { return };
    for n in LENS {
        // Wide gates reach both tails of the sigmoid.
        let g = randn(n, 21, 6.0);
        let u = randn(n, 22, 1.0);
        let tg = gpu.tensor_from("gate", Activations, &[1, n], &g).unwrap();
        let tu = gpu.tensor_from("up", Activations, &[1, n], &u).unwrap();
        let out = gpu.tensor("out", Activations, &[1, n]).unwrap();
        let mut rec = gpu.recorder();
        activation::swiglu(&mut rec, &tg, &tu, &out).unwrap();
        rec.submit().unwrap();
        assert_close(
            &format!("swiglu n={n}"),
            &gpu.read(&out).unwrap(),
            &activation::swiglu_reference(&g, &u),
            tol::NMSE_TRANSCENDENTAL,
        );
    }
}

#[test]
fn geglu_tanh_matches_reference() {
    let Some(gpu) = gpu() else { return };
    for n in LENS {
        // Wide gates reach both tails of the tanh GELU.
        let g = randn(n, 31, 6.0);
        let u = randn(n, 32, 1.0);
        let tg = gpu.tensor_from("gate", Activations, &[1, n], &g).unwrap();
        let tu = gpu.tensor_from("up", Activations, &[1, n], &u).unwrap();
        let out = gpu.tensor("out", Activations, &[1, n]).unwrap();
        let mut rec = gpu.recorder();
        activation::geglu_tanh(&mut rec, &tg, &tu, &out).unwrap();
        rec.submit().unwrap();
        let want = activation::geglu_tanh_reference(&g, &u);
        assert_close(
            &format!("geglu_tanh n={n}"),
            &gpu.read(&out).unwrap(),
            &want,
            tol::NMSE_TRANSCENDENTAL,
        );
        // The reference is gelu_tanh(gate) * up, as GELU's own reference computes it.
        let gelu = activation::gelu_reference(&g, GeluForm::Tanh);
        for ((w, gl), up) in want.iter().zip(&gelu).zip(&u) {
            assert!(
                (w - gl * up).abs() <= 1e-6 * (1.0 + w.abs()),
                "{w} vs {gl} * {up}"
            );
        }
    }
    let (a, b) = (
        gpu.tensor("a", Activations, &[2, 3]).unwrap(),
        gpu.tensor("b", Activations, &[3, 2]).unwrap(),
    );
    let mut rec = gpu.recorder();
    assert!(activation::geglu_tanh(&mut rec, &a, &b, &a).is_err());
}

#[test]
fn gelu_matches_reference_in_both_forms() {
    let Some(gpu) = gpu() else { return };
    for form in [GeluForm::Erf, GeluForm::Tanh] {
        for n in LENS {
            let x = randn(n, 23, 3.0);
            assert_close(
                &format!("gelu {form:?} n={n}"),
                &gelu_gpu(gpu, &x, form),
                &activation::gelu_reference(&x, form),
                tol::NMSE_TRANSCENDENTAL,
            );
        }
    }
}

/// The documented bounds of the shader's GELUs (src/kernels/activation.rs), on a dense grid over
/// [-13, 13] plus huge inputs: relative error where |gelu(x)| >= 1e-30, absolute below (denormals
/// and the sigmoid clamp at 1.8e-35), and always finite.
#[test]
fn gelu_relative_error_is_bounded() {
    let Some(gpu) = gpu() else { return };
    let mut x: Vec<f32> = (-13_000..=13_000).map(|i| i as f32 * 1e-3).collect();
    x.extend([-1e30, -1e6, -100.0, -20.0, 20.0, 100.0, 1e6, 1e30]);
    for form in [GeluForm::Erf, GeluForm::Tanh] {
        // The tanh form inherits the f32 rounding of its argument u, amplified by |2u| in the tail.
        let bound = |v: f32| match form {
            GeluForm::Erf => 1e-6,
            GeluForm::Tanh if v.abs() <= 3.0 => 1e-6,
            GeluForm::Tanh => 1.5e-5,
        };
        let got = gelu_gpu(gpu, &x, form);
        let want = activation::gelu_reference(&x, form);
        let mut worst = (0f64, 0f32);
        for ((&v, &g), &w) in x.iter().zip(&got).zip(&want) {
            assert!(g.is_finite(), "{form:?} gelu({v}) = {g}");
            if w.abs() >= 1e-30 && v.abs() <= 13.0 {
                let rel = ((g as f64 - w as f64) / w as f64).abs();
                assert!(
                    rel <= bound(v),
                    "{form:?}: relative error {rel:.2e} at x = {v}"
                );
                if rel > worst.0 {
                    worst = (rel, v);
                }
            } else {
                // Underflowing tail, or huge |x| where both forms give x or 0.
                assert!(
                    (g - w).abs() <= 1e-30 * v.abs().max(1.0),
                    "{form:?} gelu({v}) = {g}, want {w}"
                );
            }
        }
        eprintln!(
            "{form:?}: worst relative error {:.2e} at x = {}",
            worst.0, worst.1
        );
    }
}

#[test]
fn activations_refuse_bad_shapes_before_dispatch() {
    let Some(gpu) = gpu() else { return };
    let a = gpu.tensor("a", Activations, &[2, 8]).unwrap();
    let b = gpu.tensor("b", Activations, &[2, 7]).unwrap();
    let c = gpu.tensor("c", Activations, &[2, 8]).unwrap();
    let mut rec = gpu.recorder();
    let shape = |e: wgllm::Error| assert!(matches!(e, wgllm::Error::ShapeMismatch { .. }), "{e}");
    shape(activation::swiglu(&mut rec, &a, &b, &c).unwrap_err());
    shape(activation::swiglu(&mut rec, &a, &c, &b).unwrap_err());
    shape(activation::gelu(&mut rec, &a, &b, GeluForm::Erf).unwrap_err());
    assert!(activation::swiglu(&mut rec, &a, &c, &a).is_err());
    assert!(activation::gelu(&mut rec, &a, &a, GeluForm::Tanh).is_err());
    shape(elementwise::add_bias(&mut rec, &a, &b).unwrap_err());
    shape(elementwise::scale(&mut rec, &a, 2.0, &b).unwrap_err());
    assert!(rec.is_empty());
}

#[test]
fn add_bias_and_scale_match_reference() {
    let Some(gpu) = gpu() else { return };
    for (m, n) in [(1, 1), (3, 7), (2, 255), (5, 257), (4, 1000)] {
        let y = randn(m * n, 31, 1.0);
        let bias = randn(n, 32, 1.0);
        let ty = gpu.tensor_from("y", Activations, &[m, n], &y).unwrap();
        let tb = gpu.tensor_from("bias", Activations, &[n], &bias).unwrap();
        let out = gpu.tensor("scaled", Activations, &[m, n]).unwrap();
        let mut rec = gpu.recorder();
        elementwise::add_bias(&mut rec, &ty, &tb).unwrap();
        elementwise::scale(&mut rec, &ty, -0.125, &out).unwrap();
        rec.submit().unwrap();
        let biased = elementwise::add_bias_reference(&y, &bias);
        assert_close(
            &format!("add_bias {m}x{n}"),
            &gpu.read(&ty).unwrap(),
            &biased,
            tol::NMSE_F32,
        );
        assert_close(
            &format!("scale {m}x{n}"),
            &gpu.read(&out).unwrap(),
            &elementwise::scale_reference(&biased, -0.125),
            tol::NMSE_F32,
        );
    }
}
