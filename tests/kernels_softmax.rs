//! Row softmax against its f64 CPU reference, including logits that would overflow a naive exp.
mod common;
use common::*;
use wgllm::kernels::softmax;
use wgllm::BufferClass::Activations;

fn run(gpu: &wgllm::Gpu, x: &[f32], m: usize, n: usize) -> Vec<f32> {
    let tx = gpu.tensor_from("logits", Activations, &[m, n], x).unwrap();
    let out = gpu.tensor("probs", Activations, &[m, n]).unwrap();
    let mut rec = gpu.recorder();
    softmax::softmax(&mut rec, &tx, &out).unwrap();
    rec.submit().unwrap();
    gpu.read(&out).unwrap()
}

#[test]
fn softmax_matches_reference_on_awkward_sizes() {
    let Some(gpu) = gpu() else { return };
    for (m, n) in [(1, 1), (1, 7), (4, 255), (3, 257), (2, 1000), (1, 5000)] {
        let x = randn(m * n, 11, 3.0);
        let got = run(gpu, &x, m, n);
        assert_close(
            &format!("softmax {m}x{n}"),
            &got,
            &softmax::softmax_reference(&x, n),
            tol::NMSE_TRANSCENDENTAL,
        );
        for (r, row) in got.chunks(n).enumerate() {
            let s: f32 = row.iter().sum();
            assert!((s - 1.0).abs() < 1e-4, "row {r} of {m}x{n} sums to {s}");
        }
    }
}

#[test]
fn softmax_is_stable_for_huge_and_masked_logits() {
    let Some(gpu) = gpu() else { return };
    let (m, n) = (3, 257);
    let mut x = randn(m * n, 12, 1.0);
    // Row 0: logits around 1e4 (exp overflows f32 past 88).
    for v in &mut x[..n] {
        *v = 1e4 + 30.0 * *v;
    }
    // Row 1: a causal-style mask, -1e30 on every other entry.
    for v in x[n..2 * n].iter_mut().step_by(2) {
        *v = -1e30;
    }
    // Row 2: everything masked: uniform, not NaN.
    for v in &mut x[2 * n..] {
        *v = -1e30;
    }
    let got = run(gpu, &x, m, n);
    assert!(got.iter().all(|v| v.is_finite()), "non-finite output");
    let want = softmax::softmax_reference(&x, n);
    assert_close("softmax huge/masked", &got, &want, tol::NMSE_TRANSCENDENTAL);
    assert!(
        got[n..2 * n].iter().step_by(2).all(|&v| v == 0.0),
        "masked entries not 0"
    );
    assert!(got[2 * n..]
        .iter()
        .all(|&v| (v - 1.0 / n as f32).abs() < 1e-6));
}

#[test]
fn softmax_refuses_bad_shapes_before_dispatch() {
    let Some(gpu) = gpu() else { return };
    let x = gpu.tensor("x", Activations, &[2, 8]).unwrap();
    let out = gpu.tensor("out", Activations, &[2, 7]).unwrap();
    let empty = gpu.tensor("empty", Activations, &[2, 0]).unwrap();
    let mut rec = gpu.recorder();
    let e = softmax::softmax(&mut rec, &x, &out).unwrap_err();
    assert!(matches!(e, wgllm::Error::ShapeMismatch { .. }), "{e}");
    assert!(softmax::softmax(&mut rec, &empty, &empty).is_err());
    assert!(softmax::softmax(&mut rec, &x, &x).is_err());
    assert!(rec.is_empty());
}
