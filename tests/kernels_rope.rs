//! Rotary position embedding against its f64-angle CPU reference, both pair layouts, partial rotary.
mod common;
use common::*;
use wgllm::kernels::rope::{self, RopeMode};
use wgllm::BufferClass::Activations;

/// Positions up to a few hundred: angle errors (f32 rounding of pos * freq, ~pos * 6e-8 rad) stay
/// near 1e-5, i.e. an NMSE around 1e-10.
const NMSE_ROPE_NEAR: f64 = tol::NMSE_TRANSCENDENTAL;
/// Positions near 5000: the f32 angle alone is off by up to ~3e-4 rad (NMSE ~1e-8 at worst).
const NMSE_ROPE_FAR: f64 = 1e-7;

#[allow(clippy::too_many_arguments)]
fn check(
    gpu: &wgllm::Gpu,
    m: usize,
    heads: usize,
    hd: usize,
    rot: usize,
    pos0: u32,
    theta: f32,
    mode: RopeMode,
    tol: f64,
) {
    let x = randn(m * heads * hd, (m * 31 + hd) as u64, 1.0);
    let t = gpu
        .tensor_from("q", Activations, &[m, heads, hd], &x)
        .unwrap();
    let mut rec = gpu.recorder();
    rope::rope(&mut rec, &t, pos0, theta, mode, rot).unwrap();
    rec.submit().unwrap();
    let got = gpu.read(&t).unwrap();
    let want = rope::rope_reference(&x, heads, hd, pos0, theta, mode, rot);
    let what = format!("rope {mode:?} m={m} heads={heads} hd={hd} rot={rot} pos0={pos0}");
    assert_close(&what, &got, &want, tol);
    // Partial rotary: the tail of every head is untouched, bit for bit.
    for (g, x) in got.chunks(hd).zip(x.chunks(hd)) {
        assert_eq!(&g[rot..], &x[rot..], "{what}: tail changed");
    }
}

#[test]
fn rope_matches_reference_in_both_modes() {
    let Some(gpu) = gpu() else { return };
    for mode in [RopeMode::Interleaved, RopeMode::Half] {
        for (m, heads, hd) in [(1, 1, 2), (1, 4, 64), (7, 3, 128), (5, 2, 80), (2, 32, 128)] {
            check(gpu, m, heads, hd, hd, 0, 10000.0, mode, NMSE_ROPE_NEAR);
            check(gpu, m, heads, hd, hd, 300, 500000.0, mode, NMSE_ROPE_NEAR);
        }
    }
}

#[test]
fn rope_far_positions_and_partial_rotary() {
    let Some(gpu) = gpu() else { return };
    for mode in [RopeMode::Interleaved, RopeMode::Half] {
        check(gpu, 3, 2, 64, 64, 5000, 10000.0, mode, NMSE_ROPE_FAR);
        // Phi-2 style: 32 of 80 dims rotated; and a quarter-rotary 256-dim head.
        check(gpu, 4, 2, 80, 32, 17, 10000.0, mode, NMSE_ROPE_NEAR);
        check(gpu, 2, 3, 256, 64, 1, 1e6, mode, NMSE_ROPE_NEAR);
    }
}

#[test]
fn rope_modes_pair_the_documented_elements() {
    let Some(gpu) = gpu() else { return };
    // One head of 4 at position 1: pair 0 (frequency theta^0 = 1) turns by exactly 1 rad, so the
    // unit vector e0 lands on cos 1 at 0 and sin 1 at its partner: 1 (interleaved) or 2 (half).
    let x = [1.0f32, 0.0, 0.0, 0.0];
    for (mode, partner) in [(RopeMode::Interleaved, 1), (RopeMode::Half, 2)] {
        let t = gpu.tensor_from("q", Activations, &[1, 1, 4], &x).unwrap();
        let mut rec = gpu.recorder();
        rope::rope(&mut rec, &t, 1, 10000.0, mode, 4).unwrap();
        rec.submit().unwrap();
        let y = gpu.read(&t).unwrap();
        assert!((y[0] - 1f32.cos()).abs() < 1e-6, "{mode:?}: {y:?}");
        assert!((y[partner] - 1f32.sin()).abs() < 1e-6, "{mode:?}: {y:?}");
    }
}

#[test]
fn rope_refuses_bad_arguments_before_dispatch() {
    let Some(gpu) = gpu() else { return };
    let flat = gpu.tensor("flat", Activations, &[2, 64]).unwrap();
    let x = gpu.tensor("x", Activations, &[2, 2, 64]).unwrap();
    let mut rec = gpu.recorder();
    let e = rope::rope(&mut rec, &flat, 0, 1e4, RopeMode::Half, 64).unwrap_err();
    assert!(matches!(e, wgllm::Error::ShapeMismatch { .. }), "{e}");
    for rot in [0, 3, 66] {
        assert!(rope::rope(&mut rec, &x, 0, 1e4, RopeMode::Half, rot).is_err());
    }
    assert!(rope::rope(&mut rec, &x, u32::MAX, 1e4, RopeMode::Half, 64).is_err());
    assert!(rope::rope(&mut rec, &x, 0, f32::NAN, RopeMode::Half, 64).is_err());
    assert!(rec.is_empty());
}
