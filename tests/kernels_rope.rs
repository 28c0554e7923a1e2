//! Rotary position embedding against its f64-angle CPU reference: both pair layouts, partial
//! rotary, positions up to 2^24 - 1, custom frequency tables, and argument checks.
mod common;
use common::*;
use wgllm::kernels::rope::{self, RopeMode};
use wgllm::BufferClass::Activations;

/// Runs rope on random `[m, heads, hd]` data and compares with the reference; `freqs` None means
/// the standard `theta` frequencies through [`rope::rope`].
fn check(
    gpu: &wgllm::Gpu,
    (m, heads, hd): (usize, usize, usize),
    rot: usize,
    pos0: u32,
    theta: f32,
    custom: Option<&[f64]>,
    mode: RopeMode,
) {
    let x = randn(m * heads * hd, (m * 31 + hd) as u64, 1.0);
    let t = gpu
        .tensor_from("q", Activations, &[m, heads, hd], &x)
        .unwrap();
    let mut rec = gpu.recorder();
    let freqs = match custom {
        Some(f) => {
            rope::rope_with_freqs(&mut rec, &t, pos0, f, mode).unwrap();
            f.to_vec()
        }
        None => {
            rope::rope(&mut rec, &t, pos0, theta, mode, rot).unwrap();
            rope::rope_freqs(theta as f64, rot)
        }
    };
    rec.submit().unwrap();
    let got = gpu.read(&t).unwrap();
    let want = rope::rope_reference(&x, heads, hd, pos0, &freqs, mode);
    let what = format!("rope {mode:?} m={m} heads={heads} hd={hd} rot={rot} pos0={pos0}");
    // Angles are exact to ~1e-6 rad at every position (see src/kernels/rope.rs).
    assert_close(&what, &got, &want, tol::NMSE_TRANSCENDENTAL);
    // Partial rotary: the tail of every head is untouched, bit for bit.
    for (g, x) in got.chunks(hd).zip(x.chunks(hd)) {
        assert_eq!(&g[rot..], &x[rot..], "{what}: tail changed");
    }
}

#[test]
fn rope_matches_reference_in_both_modes() {
    let Some(gpu) = gpu() else { return };
    for mode in [RopeMode::Interleaved, RopeMode::Half] {
        for shape in [(1, 1, 2), (1, 4, 64), (7, 3, 128), (5, 2, 80), (2, 32, 128)] {
            check(gpu, shape, shape.2, 0, 10000.0, None, mode);
            check(gpu, shape, shape.2, 300, 500000.0, None, mode);
        }
    }
}

#[test]
fn rope_far_positions_partial_rotary_and_custom_freqs() {
    let Some(gpu) = gpu() else { return };
    for mode in [RopeMode::Interleaved, RopeMode::Half] {
        // Far positions, where a plain f32 angle would be off by up to ~1 rad.
        for pos0 in [5000, 131_072, 1_000_003, (1 << 24) - 3] {
            check(gpu, (3, 2, 64), 64, pos0, 10000.0, None, mode);
        }
        // Phi-2 style: 32 of 80 dims rotated; and a quarter-rotary 256-dim head.
        check(gpu, (4, 2, 80), 32, 17, 10000.0, None, mode);
        check(gpu, (2, 3, 256), 64, 1, 1e6, None, mode);
        // The largest rotary width, and a linearly scaled (x1/4) frequency table.
        check(gpu, (2, 2, 512), 512, 9, 10000.0, None, mode);
        let scaled: Vec<f64> = rope::rope_freqs(10000.0, 64)
            .iter()
            .map(|f| f / 4.0)
            .collect();
        check(gpu, (3, 2, 96), 64, 40_000, 0.0, Some(&scaled), mode);
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
    let wide = gpu.tensor("wide", Activations, &[1, 1, 1024]).unwrap();
    let mut rec = gpu.recorder();
    let e = rope::rope(&mut rec, &flat, 0, 1e4, RopeMode::Half, 64).unwrap_err();
    assert!(matches!(e, wgllm::Error::ShapeMismatch { .. }), "{e}");
    for rot in [0, 3, 66] {
        assert!(rope::rope(&mut rec, &x, 0, 1e4, RopeMode::Half, rot).is_err());
    }
    assert!(rope::rope(&mut rec, &wide, 0, 1e4, RopeMode::Half, 1024).is_err());
    assert!(rope::rope(&mut rec, &x, u32::MAX, 1e4, RopeMode::Half, 64).is_err());
    assert!(rope::rope(&mut rec, &x, (1 << 24) - 1, 1e4, RopeMode::Half, 64).is_err());
    assert!(rope::rope(&mut rec, &x, 0, f32::NAN, RopeMode::Half, 64).is_err());
    let bad = [1.0, f64::INFINITY];
    assert!(rope::rope_with_freqs(&mut rec, &x, 0, &bad, RopeMode::Half).is_err());
    assert!(rec.is_empty());
}

/// Linear RoPE scaling written out on its own (Hugging Face's `inv_freq / factor`, llama.cpp's
/// `freq_scale = 1 / factor`): the rotated copy of `x` (`[m, heads, hd]`, row-major), pair `i` of
/// token `t` turned by `((pos0 + t) / factor) * theta^(-2i / rot)`, in f64.
fn linear_reference(
    x: &[f32],
    (heads, hd, rot): (usize, usize, usize),
    pos0: usize,
    theta: f64,
    factor: f64,
    mode: RopeMode,
) -> Vec<f32> {
    let mut y = x.to_vec();
    for (h, head) in y.chunks_mut(hd).enumerate() {
        let pos = (pos0 + h / heads) as f64 / factor;
        for i in 0..rot / 2 {
            let angle = pos * theta.powf(-2.0 * i as f64 / rot as f64);
            let (a, b) = match mode {
                RopeMode::Interleaved => (2 * i, 2 * i + 1),
                RopeMode::Half => (i, i + rot / 2),
            };
            let (x0, x1) = (head[a] as f64, head[b] as f64);
            head[a] = (x0 * angle.cos() - x1 * angle.sin()) as f32;
            head[b] = (x0 * angle.sin() + x1 * angle.cos()) as f32;
        }
    }
    y
}

/// Linear scaling (Gemma 3's global layers: factor 8) in both kernels that rotate, rope.wgsl and
/// rope_store.wgsl, against [`linear_reference`]; a factor of 1 is the unscaled kernel, bit for
/// bit; a factor that is not finite and > 0 is refused before anything is recorded.
#[test]
fn linear_scaling_divides_the_positions() {
    use wgllm::kernels::attention::{self, KvCache, KvDtype};
    let Some(gpu) = gpu() else { return };
    let theta = 1e6f32;
    for mode in [RopeMode::Interleaved, RopeMode::Half] {
        for (factor, pos0) in [(8.0f32, 0usize), (8.0, 1000), (4.0, 131_072), (0.5, 17)] {
            let (m, heads, kv_heads, hd, rot) = (3, 4, 2, 64, 48);
            let what = format!("{mode:?} factor {factor} pos0 {pos0}");
            let q = randn(m * heads * hd, 90 + pos0 as u64, 1.0);
            let k = randn(m * kv_heads * hd, 91, 1.0);
            let v = randn(m * kv_heads * hd, 92, 1.0);
            let want_q = linear_reference(
                &q,
                (heads, hd, rot),
                pos0,
                theta as f64,
                factor as f64,
                mode,
            );
            let want_k = linear_reference(
                &k,
                (kv_heads, hd, rot),
                pos0,
                theta as f64,
                factor as f64,
                mode,
            );

            // rope.wgsl, through the frequency table of linear_freqs.
            let t = gpu
                .tensor_from("q", Activations, &[m, heads, hd], &q)
                .unwrap();
            let freqs = rope::linear_freqs(theta, factor, rot).unwrap();
            let mut rec = gpu.recorder();
            rope::rope_with_freqs(&mut rec, &t, pos0 as u32, &freqs, mode).unwrap();
            rec.submit().unwrap();
            assert_close(
                &format!("rope {what}"),
                &gpu.read(&t).unwrap(),
                &want_q,
                tol::NMSE_TRANSCENDENTAL,
            );

            // rope_store.wgsl: q in place, k into the cache.
            let ctx = pos0 + m;
            let cache = KvCache::new(gpu, "kv", KvDtype::F32, ctx, kv_heads, hd).unwrap();
            let qt = gpu
                .tensor_from("q", Activations, &[m, heads, hd], &q)
                .unwrap();
            let kt = gpu
                .tensor_from("k", Activations, &[m, kv_heads, hd], &k)
                .unwrap();
            let vt = gpu
                .tensor_from("v", Activations, &[m, kv_heads, hd], &v)
                .unwrap();
            let mut rec = gpu.recorder();
            attention::rope_store_scaled(
                &mut rec, &cache, &qt, &kt, &vt, pos0, theta, factor, mode, rot,
            )
            .unwrap();
            rec.submit().unwrap();
            assert_close(
                &format!("rope_store q {what}"),
                &gpu.read(&qt).unwrap(),
                &want_q,
                tol::NMSE_TRANSCENDENTAL,
            );
            let (kc, vc) = cache.read(gpu, ctx).unwrap();
            let row = kv_heads * hd;
            let held = |all: &[f32]| all[pos0 * row..(pos0 + m) * row].to_vec();
            assert_close(
                &format!("rope_store k {what}"),
                &held(&kc),
                &want_k,
                tol::NMSE_TRANSCENDENTAL,
            );
            assert_eq!(held(&vc), v, "{what}: v changed");
        }
    }
    // Factor 1 is no scaling: the same bits as rope().
    let x = randn(2 * 2 * 64, 93, 1.0);
    let a = gpu.tensor_from("a", Activations, &[2, 2, 64], &x).unwrap();
    let b = gpu.tensor_from("b", Activations, &[2, 2, 64], &x).unwrap();
    let mut rec = gpu.recorder();
    rope::rope(&mut rec, &a, 300, 1e4, RopeMode::Half, 64).unwrap();
    let ones = rope::linear_freqs(1e4, 1.0, 64).unwrap();
    rope::rope_with_freqs(&mut rec, &b, 300, &ones, RopeMode::Half).unwrap();
    rec.submit().unwrap();
    assert_eq!(gpu.read(&a).unwrap(), gpu.read(&b).unwrap());
    for bad in [0.0, -8.0, f32::NAN, f32::INFINITY] {
        assert!(rope::linear_freqs(1e4, bad, 64).is_err(), "factor {bad}");
        let cache = KvCache::new(gpu, "kv", KvDtype::F32, 4, 2, 64).unwrap();
        let t = gpu.tensor("t", Activations, &[1, 2, 64]).unwrap();
        let mut rec = gpu.recorder();
        let e = attention::rope_store_scaled(
            &mut rec,
            &cache,
            &t,
            &t,
            &t,
            0,
            1e4,
            bad,
            RopeMode::Half,
            64,
        );
        assert!(e.is_err() && rec.is_empty(), "factor {bad}");
    }
}
