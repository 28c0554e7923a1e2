//! RMSNorm (alone and after a residual add) and LayerNorm against their f64 CPU references on
//! awkward row lengths, plus shape checks. On lavapipe the RMSNorm kernels are norm_sg.wgsl's.
mod common;
use common::*;
use wgllm::kernels::norm;
use wgllm::BufferClass::Activations;

const SIZES: [(usize, usize); 7] = [
    (1, 1),
    (1, 7),
    (3, 255),
    (2, 257),
    (5, 1000),
    (1, 4096),
    (9, 64),
];

#[test]
fn rms_norm_matches_reference() {
    let Some(gpu) = gpu() else { return };
    for (m, n) in SIZES {
        let x = randn(m * n, 1, 2.0);
        let g = randn(n, 2, 1.0);
        let tx = gpu.tensor_from("x", Activations, &[m, n], &x).unwrap();
        let tg = gpu.tensor_from("gamma", Activations, &[n], &g).unwrap();
        let out = gpu.tensor("out", Activations, &[m, n]).unwrap();
        let mut rec = gpu.recorder();
        norm::rms_norm(&mut rec, &tx, &tg, 1e-6, &out).unwrap();
        rec.submit().unwrap();
        assert_close(
            &format!("rms_norm {m}x{n}"),
            &gpu.read(&out).unwrap(),
            &norm::rms_norm_reference(&x, &g, 1e-6),
            tol::NMSE_F32,
        );
    }
}

#[test]
fn add_rms_norm_matches_the_add_then_the_reference() {
    let Some(gpu) = gpu() else { return };
    for (m, n) in SIZES {
        let (x, b) = (randn(m * n, 3, 2.0), randn(m * n, 4, 1.0));
        let g = randn(n, 5, 1.0);
        let tx = gpu.tensor_from("x", Activations, &[m, n], &x).unwrap();
        let tb = gpu.tensor_from("b", Activations, &[m, n], &b).unwrap();
        let tg = gpu.tensor_from("gamma", Activations, &[n], &g).unwrap();
        let sum = gpu.tensor("sum", Activations, &[m, n]).unwrap();
        let out = gpu.tensor("out", Activations, &[m, n]).unwrap();
        let mut rec = gpu.recorder();
        norm::add_rms_norm(&mut rec, &tx, &tb, &tg, 1e-6, &sum, &out).unwrap();
        assert_eq!(rec.len(), 1);
        rec.submit().unwrap();
        let want_sum: Vec<f32> = x.iter().zip(&b).map(|(a, b)| a + b).collect();
        // The sum is one f32 addition: exact.
        assert_eq!(
            gpu.read(&sum).unwrap(),
            want_sum,
            "add_rms_norm sum {m}x{n}"
        );
        assert_close(
            &format!("add_rms_norm {m}x{n}"),
            &gpu.read(&out).unwrap(),
            &norm::rms_norm_reference(&want_sum, &g, 1e-6),
            tol::NMSE_F32,
        );
    }
}

#[test]
fn layer_norm_matches_reference_even_with_a_large_mean() {
    let Some(gpu) = gpu() else { return };
    for (m, n) in SIZES {
        // An offset of 1000 standard deviations: a one-pass E[x^2] - E[x]^2 variance would lose
        // most of its digits here.
        let x: Vec<f32> = randn(m * n, 3, 1.0).iter().map(|v| v + 1000.0).collect();
        let g = randn(n, 4, 1.0);
        let b = randn(n, 5, 1.0);
        let tx = gpu.tensor_from("x", Activations, &[m, n], &x).unwrap();
        let tg = gpu.tensor_from("gamma", Activations, &[n], &g).unwrap();
        let tb = gpu.tensor_from("beta", Activations, &[n], &b).unwrap();
        let out = gpu.tensor("out", Activations, &[m, n]).unwrap();
        let mut rec = gpu.recorder();
        norm::layer_norm(&mut rec, &tx, &tg, &tb, 1e-5, &out).unwrap();
        rec.submit().unwrap();
        // An f32 mean of values near 1000 is good to a few ulps of 1000 (~1e-4), which is ~1e-4
        // relative to the unit deviations whatever the algorithm: compare at that resolution. A
        // one-pass variance would be off by far more (E[x^2] ~ 1e6 has ulps of 0.06).
        let want = norm::layer_norm_reference(&x, &g, &b, 1e-5);
        let got = gpu.read(&out).unwrap();
        if n > 1 {
            assert_close(&format!("layer_norm {m}x{n}"), &got, &want, 1e-7);
        } else {
            // One column: the row is its own mean, the output is beta exactly.
            assert_close(&format!("layer_norm {m}x{n}"), &got, &want, tol::NMSE_F32);
        }
    }
}

#[test]
fn layer_norm_matches_reference_on_centred_data() {
    let Some(gpu) = gpu() else { return };
    for (m, n) in SIZES {
        let x = randn(m * n, 6, 3.0);
        let g = randn(n, 7, 1.0);
        let b = randn(n, 8, 1.0);
        let tx = gpu.tensor_from("x", Activations, &[m, n], &x).unwrap();
        let tg = gpu.tensor_from("gamma", Activations, &[n], &g).unwrap();
        let tb = gpu.tensor_from("beta", Activations, &[n], &b).unwrap();
        let out = gpu.tensor("out", Activations, &[m, n]).unwrap();
        let mut rec = gpu.recorder();
        norm::layer_norm(&mut rec, &tx, &tg, &tb, 1e-5, &out).unwrap();
        rec.submit().unwrap();
        assert_close(
            &format!("layer_norm {m}x{n}"),
            &gpu.read(&out).unwrap(),
            &norm::layer_norm_reference(&x, &g, &b, 1e-5),
            tol::NMSE_F32,
        );
    }
}

#[test]
fn norms_refuse_bad_shapes_before_dispatch() {
    let Some(gpu) = gpu() else { return };
    let x = gpu.tensor("x", Activations, &[2, 8]).unwrap();
    let g8 = gpu.tensor("g8", Activations, &[8]).unwrap();
    let g7 = gpu.tensor("g7", Activations, &[7]).unwrap();
    let out = gpu.tensor("out", Activations, &[2, 8]).unwrap();
    let out_bad = gpu.tensor("out_bad", Activations, &[8, 2]).unwrap();
    let mut rec = gpu.recorder();
    let shape = |e: wgllm::Error| assert!(matches!(e, wgllm::Error::ShapeMismatch { .. }), "{e}");
    shape(norm::rms_norm(&mut rec, &x, &g7, 1e-6, &out).unwrap_err());
    shape(norm::rms_norm(&mut rec, &x, &g8, 1e-6, &out_bad).unwrap_err());
    shape(norm::layer_norm(&mut rec, &x, &g8, &g7, 1e-5, &out).unwrap_err());
    shape(norm::layer_norm(&mut rec, &x, &g7, &g8, 1e-5, &out).unwrap_err());
    // In place is refused (one buffer cannot be bound read-only and read-write at once).
    assert!(norm::rms_norm(&mut rec, &x, &g8, 1e-6, &x).is_err());
    assert!(norm::rms_norm(&mut rec, &x, &g8, f32::NAN, &out).is_err());
    // add_rms_norm: shapes, and no output aliasing an input or the other output.
    let b = gpu.tensor("b", Activations, &[2, 8]).unwrap();
    let sum = gpu.tensor("sum", Activations, &[2, 8]).unwrap();
    shape(norm::add_rms_norm(&mut rec, &x, &out_bad, &g8, 1e-6, &sum, &out).unwrap_err());
    shape(norm::add_rms_norm(&mut rec, &x, &b, &g7, 1e-6, &sum, &out).unwrap_err());
    assert!(norm::add_rms_norm(&mut rec, &x, &b, &g8, 1e-6, &b, &out).is_err());
    assert!(norm::add_rms_norm(&mut rec, &x, &b, &g8, 1e-6, &sum, &x).is_err());
    assert!(norm::add_rms_norm(&mut rec, &x, &b, &g8, 1e-6, &out, &out).is_err());
    assert!(rec.is_empty());
}

#[test]
fn the_portable_rms_norm_kernels_match_reference_too() {
    // Where the device has 8-lane subgroups (lavapipe) the RMSNorm kernels are norm_sg.wgsl's; a
    // device opened without subgroups runs norm.wgsl's, which every GPU gets.
    if gpu().is_none() {
        return;
    }
    let plain = wgllm::Gpu::new(&wgllm::GpuOptions {
        no_subgroups: true,
        ..Default::default()
    })
    .unwrap();
    for (m, n) in SIZES {
        let (x, b) = (randn(m * n, 6, 2.0), randn(m * n, 7, 1.0));
        let g = randn(n, 8, 1.0);
        let tx = plain.tensor_from("x", Activations, &[m, n], &x).unwrap();
        let tb = plain.tensor_from("b", Activations, &[m, n], &b).unwrap();
        let tg = plain.tensor_from("gamma", Activations, &[n], &g).unwrap();
        let (sum, out, alone) = (
            plain.tensor("sum", Activations, &[m, n]).unwrap(),
            plain.tensor("out", Activations, &[m, n]).unwrap(),
            plain.tensor("alone", Activations, &[m, n]).unwrap(),
        );
        let mut rec = plain.recorder();
        norm::add_rms_norm(&mut rec, &tx, &tb, &tg, 1e-6, &sum, &out).unwrap();
        norm::rms_norm(&mut rec, &tx, &tg, 1e-6, &alone).unwrap();
        rec.submit().unwrap();
        let want_sum: Vec<f32> = x.iter().zip(&b).map(|(a, b)| a + b).collect();
        assert_eq!(
            plain.read(&sum).unwrap(),
            want_sum,
            "portable add_rms_norm sum {m}x{n}"
        );
        let what = format!("portable add_rms_norm {m}x{n}");
        let want = norm::rms_norm_reference(&want_sum, &g, 1e-6);
        assert_close(&what, &plain.read(&out).unwrap(), &want, tol::NMSE_F32);
        let what = format!("portable rms_norm {m}x{n}");
        let want = norm::rms_norm_reference(&x, &g, 1e-6);
        assert_close(&what, &plain.read(&alone).unwrap(), &want, tol::NMSE_F32);
    }
}

/// Gemma 3's q/k norms: RMSNorm of every head of an `(m, heads, head_dim)` tensor with one gamma
/// of `head_dim`, which is the row kernel over rows of `head_dim` (each head normalised on its
/// own, not the whole token), on the default device and on one without subgroups.
#[test]
fn rms_norm_per_head_of_a_3d_tensor() {
    let Some(gpu) = gpu() else { return };
    let plain = wgllm::Gpu::new(&wgllm::GpuOptions {
        no_subgroups: true,
        ..Default::default()
    })
    .unwrap();
    for dev in [gpu, &plain] {
        for (m, heads, hd) in [(3, 4, 256), (1, 1, 256), (5, 3, 12), (2, 9, 80)] {
            // Heads of very different scales: a per-token norm would get them wrong.
            let x: Vec<f32> = randn(m * heads * hd, 9, 1.0)
                .iter()
                .enumerate()
                .map(|(i, v)| v * (1 + (i / hd) % 5) as f32 * 3.0)
                .collect();
            let g = randn(hd, 10, 1.0);
            let tx = dev
                .tensor_from("q", Activations, &[m, heads, hd], &x)
                .unwrap();
            let tg = dev.tensor_from("q_norm", Activations, &[hd], &g).unwrap();
            let out = dev.tensor("qn", Activations, &[m, heads, hd]).unwrap();
            let mut rec = dev.recorder();
            norm::rms_norm(&mut rec, &tx, &tg, 1e-6, &out).unwrap();
            rec.submit().unwrap();
            let want: Vec<f32> = x
                .chunks(hd)
                .flat_map(|head| norm::rms_norm_reference(head, &g, 1e-6))
                .collect();
            assert_close(
                &format!("per-head rms_norm {m}x{heads}x{hd}"),
                &dev.read(&out).unwrap(),
                &want,
                tol::NMSE_F32,
            );
        }
    }
}
