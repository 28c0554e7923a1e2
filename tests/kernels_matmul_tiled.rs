//! The tiled prefill kernel (`shaders/matmul.wgsl`, `shaders/matmul_f16.wgsl`) forced on the test
//! device, against the CPU reference on the dequantised weights: every tile precision the device
//! has (f32; f16 tiles with f32 sums and with f16 sums per K step where it has SHADER_F16), in
//! every weight format, on shapes that are not multiples of the tile in tokens, rows or K; every
//! tile shape on two formats; a device opened without f16 refuses f16 tiles and its policy keeps
//! f32; and the portable f32 tiles on the OpenGL backend where there is one.

mod common;
use common::*;
use wgllm::kernels::matmul::{self, MatmulKernel, TileMath, TileShape, TILE_MEMORY, TILE_SHAPES};
use wgllm::kernels::WeightMatrix;
use wgllm::quant::WeightFormat;
use wgllm::BufferClass::Activations;
use wgllm::{Gpu, GpuOptions};

/// NMSE of f16 tiles: X and the dequantised W rounded to f16 (relative error up to 2^-11 each),
/// sums in f32. Measured 4e-8 to 9e-8 on these shapes (lavapipe).
const NMSE_F16_TILES: f64 = 5e-7;
/// NMSE of f16 tiles whose K steps (at most 32 values) are summed in f16. Measured 3e-7 to
/// 4.5e-7.
const NMSE_F16_SUMS: f64 = 2e-6;

fn tolerance(math: TileMath, f: WeightFormat) -> f64 {
    match (math, f) {
        (TileMath::F16, _) => NMSE_F16_TILES,
        (TileMath::F16Acc, _) => NMSE_F16_SUMS,
        (TileMath::F32, WeightFormat::F32) => tol::NMSE_F32,
        (TileMath::F32, WeightFormat::F16) => tol::NMSE_F16_WEIGHTS,
        (TileMath::F32, _) => tol::NMSE_QUANT,
    }
}

/// Row length: not a multiple of any K step for f32/f16 (1001), 37 units of 32 (odd, so a 32-wide
/// step pairs them across the two buffers unevenly), three K-quant super-blocks.
fn ragged_cols(f: WeightFormat) -> usize {
    match f.block_len() {
        1 => 1001,
        32 => 32 * 37,
        n => 3 * n,
    }
}

/// Random weights in `f` in buffers, and the same weights dequantised.
fn weights(
    gpu: &Gpu,
    f: WeightFormat,
    rows: usize,
    cols: usize,
    seed: u64,
) -> (WeightMatrix, Vec<f32>) {
    let (_, wm, deq) = quantised_weights(gpu, buffers(gpu), f, rows, cols, seed);
    (wm, deq)
}

/// Runs the tiled kernel over `m` random tokens and compares it with the reference; returns the
/// NMSE and the largest absolute error.
fn check(
    gpu: &Gpu,
    wm: &WeightMatrix,
    deq: &[f32],
    m: usize,
    kernel: MatmulKernel,
    tol: f64,
    seed: u64,
) -> (f64, f32) {
    let (rows, cols) = (wm.rows, wm.cols);
    let xd = randn(m * cols, seed, 1.0);
    let x = gpu.tensor_from("x", Activations, &[m, cols], &xd).unwrap();
    let y = gpu.tensor("y", Activations, &[m, rows]).unwrap();
    let mut rec = gpu.recorder();
    matmul::matmul_with(&mut rec, wm, &x, &y, Some(kernel)).unwrap();
    assert_eq!(rec.len(), wm.shards.len(), "one dispatch per shard");
    rec.submit().unwrap();
    let got = gpu.read(&y).unwrap();
    let want = matmul::reference(deq, rows, cols, &xd, m);
    let what = format!("{kernel:?} {} {m} x {rows} x {cols}", wm.format);
    assert_close(&what, &got, &want, tol);
    (nmse(&got, &want), max_abs_diff(&got, &want))
}

/// The tile precisions `gpu` runs.
fn maths(gpu: &Gpu) -> Vec<TileMath> {
    if gpu.caps.shader_f16 {
        vec![TileMath::F32, TileMath::F16, TileMath::F16Acc]
    } else {
        vec![TileMath::F32]
    }
}

#[test]
fn every_precision_matches_reference_in_every_format_on_ragged_shapes() {
    let Some(gpu) = gpu() else { return };
    for f in WeightFormat::ALL {
        // 130 rows: two 64-row tiles and two rows of a third. 70 tokens: a 64-token tile and 6 of
        // the next; 150: a 128-token tile and 22 of the next (the policy's two tile heights).
        let (wm, deq) = weights(gpu, f, 130, ragged_cols(f), 60);
        for math in maths(gpu) {
            for m in [70, 150] {
                let kernel = MatmulKernel::TiledAs { math, shape: None };
                let (e, max) = check(gpu, &wm, &deq, m, kernel, tolerance(math, f), 70 + m as u64);
                eprintln!("{f} {math:?} m={m}: nmse {e:.2e}, max abs error {max:.2e}");
            }
        }
        // The portable form as the callers name it.
        check(
            gpu,
            &wm,
            &deq,
            9,
            MatmulKernel::Tiled,
            tolerance(TileMath::F32, f),
            79,
        );
    }
}

#[test]
fn every_tile_shape_within_the_memory_limit_matches_reference() {
    let Some(gpu) = gpu() else { return };
    // Two formats cover the shapes: the code per shape is the same for all but the W load.
    for f in [WeightFormat::F16, WeightFormat::Q4_K] {
        let (wm, deq) = weights(gpu, f, 77, ragged_cols(f), 61);
        for math in maths(gpu) {
            for shape in TILE_SHAPES {
                let kernel = MatmulKernel::TiledAs {
                    math,
                    shape: Some(shape),
                };
                if shape.workgroup_bytes(math) > TILE_MEMORY {
                    // Past WebGPU's default limit: refused before anything is recorded.
                    let x = gpu.tensor("x", Activations, &[3, wm.cols]).unwrap();
                    let y = gpu.tensor("y", Activations, &[3, wm.rows]).unwrap();
                    let mut rec = gpu.recorder();
                    assert!(matmul::matmul_with(&mut rec, &wm, &x, &y, Some(kernel)).is_err());
                    assert!(rec.is_empty());
                    continue;
                }
                check(gpu, &wm, &deq, 131, kernel, tolerance(math, f), 80);
            }
        }
    }
}

#[test]
fn the_policy_picks_shapes_within_the_memory_limit() {
    for math in [TileMath::F32, TileMath::F16, TileMath::F16Acc] {
        for m in [9, 64, 127, 128, 512] {
            let s = matmul::tile_shape(math, m);
            assert!(TILE_SHAPES.contains(&s), "{s:?}");
            assert!(s.workgroup_bytes(math) <= TILE_MEMORY, "{math:?} {s:?}");
            assert_eq!(s.tokens, if m >= 128 { 128 } else { 64 });
        }
    }
    // f16 tiles take half the bytes, so twice the K step.
    let (f32_64, f16_64) = (
        matmul::tile_shape(TileMath::F32, 64),
        matmul::tile_shape(TileMath::F16, 64),
    );
    assert_eq!(f16_64.k, 2 * f32_64.k);
    assert_eq!(
        f16_64.workgroup_bytes(TileMath::F16),
        f32_64.workgroup_bytes(TileMath::F32)
    );
    let s = TileShape { tokens: 128, k: 16 };
    assert!((s.loads_per_fma() - 3.0 / 128.0).abs() < 1e-12);
}

#[test]
fn without_f16_the_tiles_stay_f32_and_f16_tiles_are_refused() {
    let Some(_) = gpu() else { return };
    let plain = Gpu::new(&GpuOptions {
        no_f16: true,
        no_subgroups: true,
        ..Default::default()
    })
    .unwrap();
    assert!(!plain.caps.shader_f16);
    assert_eq!(matmul::prefill_tiles(&plain), TileMath::F32);
    let f = WeightFormat::Q4_0;
    let (wm, deq) = weights(&plain, f, 67, ragged_cols(f), 62);
    let half = MatmulKernel::TiledAs {
        math: TileMath::F16,
        shape: None,
    };
    let x = plain.tensor("x", Activations, &[20, wm.cols]).unwrap();
    let y = plain.tensor("y", Activations, &[20, wm.rows]).unwrap();
    let mut rec = plain.recorder();
    let err = matmul::matmul_with(&mut rec, &wm, &x, &y, Some(half)).unwrap_err();
    assert!(err.to_string().contains("SHADER_F16"), "{err}");
    assert!(rec.is_empty());
    drop(rec);
    // The portable tiles run there.
    check(
        &plain,
        &wm,
        &deq,
        70,
        MatmulKernel::Tiled,
        tolerance(TileMath::F32, f),
        81,
    );
}

#[test]
fn portable_tiles_match_reference_on_the_gl_backend() {
    // CI installs Vulkan only; where Mesa's GL is present this runs the f32 tiles through GLSL.
    let Some(gl) = gl_device() else {
        eprintln!("SKIPPED: no OpenGL adapter");
        return;
    };
    assert!(
        !gl.caps.shader_f16,
        "the test expects GL without SHADER_F16"
    );
    assert_eq!(matmul::prefill_tiles(&gl), TileMath::F32);
    for f in WeightFormat::ALL {
        let (wm, deq) = weights(&gl, f, 130, ragged_cols(f), 63);
        for m in [70, 150] {
            let kernel = MatmulKernel::TiledAs {
                math: TileMath::F32,
                shape: None,
            };
            check(
                &gl,
                &wm,
                &deq,
                m,
                kernel,
                tolerance(TileMath::F32, f),
                90 + m as u64,
            );
        }
    }
}
