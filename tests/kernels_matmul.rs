//! The matrix kernels (decode matvec, prefill matmul) in every weight format against the CPU
//! reference on the dequantised weights: awkward shapes, sharded weights, one f32 weight larger
//! than the device's binding limit, and shape checks before dispatch. The subgroup matvec
//! (`matvec_sg.wgsl`) is forced where the device runs it (lavapipe), with the weights in buffers
//! and in textures (`matvec_sg_tex.wgsl`), and a device opened without subgroups must fall back to
//! the workgroup kernel.

mod common;
use common::*;
use wgllm::gpu::WeightLayout;
use wgllm::kernels::matmul::{self, MatmulKernel, MatvecKernel};
use wgllm::kernels::weights::WeightStorage;
use wgllm::kernels::{Tensor, WeightMatrix};
use wgllm::quant::{dequantize, quantize, WeightFormat};
use wgllm::BufferClass::Activations;
use wgllm::{Gpu, GpuOptions};

fn tolerance(f: WeightFormat) -> f64 {
    match f {
        WeightFormat::F32 => tol::NMSE_F32,
        WeightFormat::F16 => tol::NMSE_F16_WEIGHTS,
        _ => tol::NMSE_QUANT,
    }
}

/// Row length: not a multiple of any workgroup size (37 blocks for the quantised formats of 32,
/// three super-blocks for the K-quants).
fn awkward_cols(f: WeightFormat) -> usize {
    match f.block_len() {
        1 => 1001,
        32 => 32 * 37,
        n => 3 * n,
    }
}

/// `cols` rounded up to whole blocks of `f` (a K-quant row is whole 256-weight super-blocks).
fn fit(f: WeightFormat, cols: usize) -> usize {
    cols.next_multiple_of(f.block_len())
}

/// Random weights uploaded in `f` as `storage` says, and the same weights dequantised for the
/// reference.
fn weights(
    gpu: &Gpu,
    storage: WeightStorage,
    f: WeightFormat,
    rows: usize,
    cols: usize,
    seed: u64,
) -> (WeightMatrix, Vec<f32>) {
    let (_, wm, deq) = quantised_weights(gpu, storage, f, rows, cols, seed);
    (wm, deq)
}

/// What [`check`] runs.
#[derive(Debug, Clone, Copy)]
enum Op {
    /// matvec, with the kernel forced or left to the policy
    Matvec(Option<MatvecKernel>),
    /// matmul over this many tokens, with the kernel forced or left to the policy
    Matmul(usize, Option<MatmulKernel>),
}

/// Runs `op` on random inputs and compares with the reference.
fn check(gpu: &Gpu, wm: &WeightMatrix, deq: &[f32], op: Op, seed: u64) {
    let (rows, cols) = (wm.rows, wm.cols);
    let m = match op {
        Op::Matvec(_) => 1,
        Op::Matmul(m, _) => m,
    };
    let xd = randn(m * cols, seed, 1.0);
    let (xs, ys) = match op {
        Op::Matvec(_) => (vec![cols], vec![rows]),
        Op::Matmul(m, _) => (vec![m, cols], vec![m, rows]),
    };
    let x = gpu.tensor_from("x", Activations, &xs, &xd).unwrap();
    let y = gpu.tensor("y", Activations, &ys).unwrap();
    let mut rec = gpu.recorder();
    match op {
        Op::Matvec(k) => matmul::matvec_with(&mut rec, wm, &x, &y, k).unwrap(),
        Op::Matmul(_, k) => matmul::matmul_with(&mut rec, wm, &x, &y, k).unwrap(),
    }
    assert_eq!(rec.len(), wm.shards.len(), "one dispatch per shard");
    rec.submit().unwrap();
    let what = format!(
        "{op:?} {} {rows}x{cols} ({} shards)",
        wm.format,
        wm.shards.len()
    );
    assert_close(
        &what,
        &gpu.read(&y).unwrap(),
        &matmul::reference(deq, rows, cols, &xd, m),
        tolerance(wm.format),
    );
}

#[test]
fn matvec_matches_reference_in_every_format() {
    let Some(gpu) = gpu() else { return };
    for (f, storage) in WeightFormat::ALL
        .into_iter()
        .flat_map(|f| layouts(gpu).into_iter().map(move |s| (f, s)))
    {
        let k = awkward_cols(f);
        // One row; rows not a multiple of any rows-per-workgroup; a small model's square matrix.
        // K-quants: also K = 256, one super-block.
        for (i, (rows, cols)) in [(1, k), (13, k), (67, fit(f, 64)), (576, fit(f, 576))]
            .into_iter()
            .enumerate()
        {
            let (wm, deq) = weights(gpu, storage, f, rows, cols, 10 + i as u64);
            check(gpu, &wm, &deq, Op::Matvec(None), 20 + i as u64);
            // Every rows- and threads-per-workgroup variant (the code is the same for all formats
            // but f32/f16 vs blocks; each variant is a pipeline to compile, so two formats cover
            // it).
            let buffers = storage.layout == WeightLayout::Buffers;
            if buffers && rows == 13 && matches!(f, WeightFormat::F16 | WeightFormat::Q4_1) {
                for rows in matmul::MATVEC_ROWS {
                    for threads in matmul::MATVEC_THREADS {
                        if rows * threads > matmul::MATVEC_PART {
                            continue;
                        }
                        let k = Some(MatvecKernel::Workgroup { rows, threads });
                        check(gpu, &wm, &deq, Op::Matvec(k), 30 + rows as u64);
                    }
                }
                // A shape past the workgroup memory is refused before dispatch.
                let x = gpu.tensor("x", Activations, &[wm.cols]).unwrap();
                let y = gpu.tensor("y", Activations, &[wm.rows]).unwrap();
                let mut rec = gpu.recorder();
                let big = Some(MatvecKernel::Workgroup {
                    rows: 16,
                    threads: 256,
                });
                assert!(matmul::matvec_with(&mut rec, &wm, &x, &y, big).is_err());
                assert!(rec.is_empty());
            }
        }
    }
}

#[test]
fn matmul_matches_reference_in_every_format() {
    let Some(gpu) = gpu() else { return };
    // Textures: the policy's kernel (the subgroup matvec) on them.
    for storage in layouts(gpu).into_iter().skip(1) {
        for f in WeightFormat::ALL {
            let (wm, deq) = weights(gpu, storage, f, 67, awkward_cols(f), 30);
            for m in [1, 7, 33] {
                check(gpu, &wm, &deq, Op::Matmul(m, None), 40 + m as u64);
            }
        }
    }
    let buffers = buffers(gpu);
    for f in WeightFormat::ALL {
        let k = awkward_cols(f);
        let (wm, deq) = weights(gpu, buffers, f, 67, k, 30);
        for m in [1, 7, 33] {
            for kernel in [
                None,
                Some(MatmulKernel::Tiled),
                Some(MatmulKernel::Rows { tokens: 4 }),
            ] {
                check(gpu, &wm, &deq, Op::Matmul(m, kernel), 40 + m as u64);
            }
        }
        // Two tokens per workgroup: no policy picks it, so one quantised format checks it.
        if matches!(f, WeightFormat::F32 | WeightFormat::Q8_0) {
            let two = Some(MatmulKernel::Rows { tokens: 2 });
            check(gpu, &wm, &deq, Op::Matmul(7, two), 48);
        }
        // Several tiles both ways, partial at both edges.
        let (wm, deq) = weights(gpu, buffers, f, 130, fit(f, 96), 31);
        check(
            gpu,
            &wm,
            &deq,
            Op::Matmul(70, Some(MatmulKernel::Tiled)),
            50,
        );
        check(gpu, &wm, &deq, Op::Matmul(70, None), 51);
    }
}

#[test]
fn sharded_weights_match_reference() {
    let Some(gpu) = gpu() else { return };
    // Limits lowered so that 150 rows take several shards: 8 KiB bindings (3 to 19 shards),
    // 96-texel textures (96 rows a shard; a row of 320 f32 weights is 80 texels).
    for mut storage in layouts(gpu) {
        storage.max_binding = 8 << 10;
        storage.max_texture_dim = 96;
        for f in WeightFormat::ALL {
            let (wm, deq) = weights(gpu, storage, f, 150, fit(f, 320), 60);
            assert!(
                wm.shards.len() >= 2,
                "{f} in {:?}: {} shards",
                storage.layout,
                wm.shards.len()
            );
            check(gpu, &wm, &deq, Op::Matvec(None), 61);
            check(gpu, &wm, &deq, Op::Matmul(7, None), 62);
            if storage.layout == WeightLayout::Buffers {
                let rows = Some(MatmulKernel::Rows { tokens: 4 });
                check(gpu, &wm, &deq, Op::Matmul(7, Some(MatmulKernel::Tiled)), 63);
                check(gpu, &wm, &deq, Op::Matmul(7, rows), 64);
            }
        }
    }
}

#[test]
fn f32_weight_past_the_binding_limit_is_sharded() {
    let Some(gpu) = gpu() else { return };
    let (rows, cols) = (8320, 4096);
    let w = randn(rows * cols, 70, 1.0);
    let bytes = (rows * cols * 4) as u64;
    let wm = gpu
        .upload_weights_as(
            "big",
            WeightFormat::F32,
            rows,
            cols,
            bytemuck::cast_slice(&w),
            buffers(gpu),
        )
        .unwrap();
    assert!(
        bytes > gpu.limits.max_storage_buffer_binding_size && wm.shards.len() >= 2,
        "{bytes} bytes in {} shards (binding limit {})",
        wm.shards.len(),
        gpu.limits.max_storage_buffer_binding_size
    );
    check(gpu, &wm, &w, Op::Matvec(None), 71);
}

/// The test device where it runs the subgroup matvec, else a printed skip.
fn subgroup_gpu() -> Option<&'static Gpu> {
    let gpu = gpu()?;
    if matmul::subgroup_matvec_ok(gpu) {
        return Some(gpu);
    }
    eprintln!(
        "SKIPPED: {} is not a CPU device with 8-lane subgroups; the subgroup matvec is unused",
        gpu.describe()
    );
    None
}

#[test]
fn subgroup_matvec_matches_reference_in_every_format() {
    let Some(gpu) = subgroup_gpu() else { return };
    for (f, storage) in WeightFormat::ALL
        .into_iter()
        .flat_map(|f| layouts(gpu).into_iter().map(move |s| (f, s)))
    {
        let k = awkward_cols(f);
        // One row (every lane's rows clamp to it); 13 rows, fewer than one lane's 16; 130 rows,
        // one full workgroup of 8 x 16 and a partial one.
        for (i, rows) in [1, 13, 130].into_iter().enumerate() {
            let (wm, deq) = weights(gpu, storage, f, rows, k, 100 + i as u64);
            let sixteen = Some(MatvecKernel::Subgroup { rows: 16 });
            check(gpu, &wm, &deq, Op::Matvec(sixteen), 110 + i as u64);
            // An odd rows-per-invocation (each is a pipeline to compile: one format covers it).
            if rows == 130 && f == WeightFormat::Q4_1 {
                let three = Some(MatvecKernel::Subgroup { rows: 3 });
                check(gpu, &wm, &deq, Op::Matvec(three), 120);
            }
        }
    }
}

#[test]
fn subgroup_prefill_matches_reference_for_1_to_8_tokens() {
    let Some(gpu) = subgroup_gpu() else { return };
    for (f, storage) in WeightFormat::ALL
        .into_iter()
        .flat_map(|f| layouts(gpu).into_iter().map(move |s| (f, s)))
    {
        // 70 rows: one workgroup of 8 x 8 rows and a partial one. (8 rows and 8 tokens is what
        // the policy picks in matmul_matches_reference_in_every_format too: one pipeline less to
        // compile, and those of 8 tokens take seconds where Mesa's shader cache is cold.)
        let (wm, deq) = weights(gpu, storage, f, 70, awkward_cols(f), 130);
        let eight = Some(MatmulKernel::Subgroup {
            rows: Some(8),
            tokens: 8,
        });
        // 1..8 tokens in one partial or full group; 11 = a full group and a partial one.
        for m in (1..=8).chain([11]) {
            check(gpu, &wm, &deq, Op::Matmul(m, eight), 140 + m as u64);
        }
        // Q8_0 and Q4_0 share a scale word between blocks 2k and 2k + 1 where rows have an even
        // number of blocks (the rows above have 37).
        if matches!(f, WeightFormat::Q8_0 | WeightFormat::Q4_0) {
            let (wm, deq) = weights(gpu, storage, f, 70, 32 * 38, 131);
            check(gpu, &wm, &deq, Op::Matmul(5, eight), 149);
        }
        // An odd tokens-per-invocation: groups of 3, 3 and 1.
        if f == WeightFormat::Q4_0 {
            let three = Some(MatmulKernel::Subgroup {
                rows: Some(5),
                tokens: 3,
            });
            check(gpu, &wm, &deq, Op::Matmul(7, three), 150);
        }
    }
}

#[test]
fn without_subgroups_the_workgroup_kernel_is_used_and_the_subgroup_one_refused() {
    if gpu().is_none() {
        return;
    }
    let opts = GpuOptions {
        no_subgroups: true,
        ..Default::default()
    };
    let plain = Gpu::new(&opts).unwrap();
    assert!(!matmul::subgroup_matvec_ok(&plain));
    assert!(matches!(
        matmul::matvec_kernel(&plain, WeightFormat::Q4_1, 576),
        MatvecKernel::Workgroup { .. }
    ));
    assert!(!matches!(
        matmul::matmul_kernel(&plain, 32),
        MatmulKernel::Subgroup { .. }
    ));
    let (wm, deq) = weights(&plain, buffers(&plain), WeightFormat::Q4_1, 21, 64, 160);
    check(&plain, &wm, &deq, Op::Matvec(None), 161);
    check(&plain, &wm, &deq, Op::Matmul(5, None), 162);
    let x = plain.tensor("x", Activations, &[64]).unwrap();
    let y = plain.tensor("y", Activations, &[21]).unwrap();
    let mut rec = plain.recorder();
    let sg = Some(MatvecKernel::Subgroup { rows: 8 });
    let e = matmul::matvec_with(&mut rec, &wm, &x, &y, sg).unwrap_err();
    assert!(matches!(e, wgllm::Error::InvalidArgument { .. }), "{e}");
    // Weights in textures have no kernel here: a typed refusal, not a failed pipeline.
    let tex = WeightStorage {
        layout: WeightLayout::Textures,
        ..textures_at_device_limits(&plain)
    };
    let (wt, _) = weights(&plain, tex, WeightFormat::Q4_1, 21, 64, 163);
    let e = matmul::matvec(&mut rec, &wt, &x, &y).unwrap_err();
    assert!(matches!(e, wgllm::Error::InvalidArgument { .. }), "{e}");
    assert!(rec.is_empty());
}

/// The workgroup matvec (the kernel GPUs run) forced in every format, for one token and for 3
/// and 5 tokens (4 a pass), on the test device (its sums reduced with `subgroupAdd`,
/// `matvec_wg_sg.wgsl`) and on it opened without subgroups (workgroup memory only,
/// `matvec.wgsl`).
#[test]
fn workgroup_matvec_matches_reference_in_every_format_and_reduction() {
    let Some(gpu) = gpu() else { return };
    let plain = Gpu::new(&GpuOptions {
        no_subgroups: true,
        ..Default::default()
    })
    .unwrap();
    assert!(matmul::reduces_in_subgroups(gpu) || !gpu.caps.subgroups);
    assert!(!matmul::reduces_in_subgroups(&plain));
    for g in [gpu, &plain] {
        for (i, f) in WeightFormat::ALL.into_iter().enumerate() {
            let (wm, deq) = weights(g, buffers(g), f, 37, awkward_cols(f), 300 + i as u64);
            let (rows, threads) = [(16, 64), (8, 128), (4, 256)][i % 3];
            let k = Some(MatvecKernel::Workgroup { rows, threads });
            check(g, &wm, &deq, Op::Matvec(k), 310 + i as u64);
            let four = Some(MatmulKernel::Rows { tokens: 4 });
            for m in [3, 5] {
                check(g, &wm, &deq, Op::Matmul(m, four), 320 + m as u64);
            }
        }
        // f32/f16 rows of whole 16-byte quads take the vec4 entry points (awkward_cols' 1001
        // takes the word-at-a-time ones above).
        for (i, f) in [WeightFormat::F32, WeightFormat::F16]
            .into_iter()
            .enumerate()
        {
            let (wm, deq) = weights(g, buffers(g), f, 37, 1000, 340 + i as u64);
            let k = Some(MatvecKernel::Workgroup {
                rows: 8,
                threads: 64,
            });
            check(g, &wm, &deq, Op::Matvec(k), 350 + i as u64);
            let four = Some(MatmulKernel::Rows { tokens: 4 });
            check(g, &wm, &deq, Op::Matmul(5, four), 360 + i as u64);
        }
    }
}

#[test]
fn shape_mismatches_are_refused_before_dispatch() {
    let Some(gpu) = gpu() else { return };
    let (wm, _) = weights(gpu, buffers(gpu), WeightFormat::Q4_0, 8, 64, 80);
    let t = |shape: &[usize]| -> Tensor { gpu.tensor("t", Activations, shape).unwrap() };
    let refused = |r: wgllm::Result<()>| {
        let e = r.unwrap_err();
        assert!(matches!(e, wgllm::Error::ShapeMismatch { .. }), "{e}");
    };
    let mut rec = gpu.recorder();
    refused(matmul::matvec(&mut rec, &wm, &t(&[63]), &t(&[8])));
    refused(matmul::matvec(&mut rec, &wm, &t(&[64]), &t(&[9])));
    refused(matmul::matvec(&mut rec, &wm, &t(&[2, 64]), &t(&[2, 8])));
    refused(matmul::matmul(&mut rec, &wm, &t(&[3, 65]), &t(&[3, 8])));
    refused(matmul::matmul(&mut rec, &wm, &t(&[3, 64]), &t(&[4, 8])));
    refused(matmul::matmul(&mut rec, &wm, &t(&[3, 64]), &t(&[3, 7])));
    let five = Some(MatvecKernel::Workgroup {
        rows: 5,
        threads: 64,
    });
    let e = matmul::matvec_with(&mut rec, &wm, &t(&[64]), &t(&[8]), five).unwrap_err();
    assert!(matches!(e, wgllm::Error::InvalidArgument { .. }), "{e}");
    let bad = Some(MatmulKernel::Rows { tokens: 3 });
    let e = matmul::matmul_with(&mut rec, &wm, &t(&[3, 64]), &t(&[3, 8]), bad).unwrap_err();
    assert!(matches!(e, wgllm::Error::InvalidArgument { .. }), "{e}");
    // Subgroup kernel: rows per invocation 1..=16, tokens 1..=8 (refused, whatever the device).
    for rows in [0, 17] {
        let bad = Some(MatvecKernel::Subgroup { rows });
        let e = matmul::matvec_with(&mut rec, &wm, &t(&[64]), &t(&[8]), bad).unwrap_err();
        assert!(matches!(e, wgllm::Error::InvalidArgument { .. }), "{e}");
    }
    for tokens in [0, 9] {
        let bad = Some(MatmulKernel::Subgroup { rows: None, tokens });
        let e = matmul::matmul_with(&mut rec, &wm, &t(&[3, 64]), &t(&[3, 8]), bad).unwrap_err();
        assert!(matches!(e, wgllm::Error::InvalidArgument { .. }), "{e}");
    }
    assert!(rec.is_empty());
}

/// Random `rows x cols` weights per part in `f`, quantised: (GGUF bytes, dequantised values).
fn quantised_parts(
    f: WeightFormat,
    rows: &[usize],
    cols: usize,
    seed: u64,
) -> Vec<(Vec<u8>, Vec<f32>)> {
    rows.iter()
        .enumerate()
        .map(|(i, &r)| {
            let w = randn(r * cols, seed + i as u64, 1.0);
            let mut q = Vec::new();
            let mut deq = Vec::new();
            for row in w.chunks(cols) {
                let b = quantize(f, row).unwrap();
                deq.extend(dequantize(f, &b, cols).unwrap());
                q.extend(b);
            }
            (q, deq)
        })
        .collect()
}

#[test]
fn stacked_projections_run_as_one_dispatch_and_match_reference() {
    let Some(gpu) = subgroup_gpu() else { return };
    let tex = textures_at_device_limits(gpu);
    for f in WeightFormat::ALL {
        let cols = awkward_cols(f);
        // Q, K, V of unequal heights (a lane's 12-16 rows cross the splits), then gate and up.
        for rows in [vec![100, 36, 36], vec![70, 70]] {
            let parts = quantised_parts(f, &rows, cols, 200);
            let labels = ["a", "b", "c"];
            let spec: Vec<_> = rows
                .iter()
                .zip(&parts)
                .zip(labels)
                .map(|((&r, (q, _)), l)| (l, f, r, q.as_slice()))
                .collect();
            let ws = gpu.upload_weights_stacked_as(cols, &spec, tex).unwrap();
            let refs: Vec<&WeightMatrix> = ws.iter().collect();
            assert!(matmul::fusable(gpu, &refs), "{f} {rows:?} not stacked");
            for m in [1, 5, 11] {
                let xd = randn(m * cols, 210 + m as u64, 1.0);
                let x = gpu.tensor_from("x", Activations, &[m, cols], &xd).unwrap();
                let ys: Vec<Tensor> = rows
                    .iter()
                    .map(|&r| gpu.tensor("y", Activations, &[m, r]).unwrap())
                    .collect();
                let yrefs: Vec<&Tensor> = ys.iter().collect();
                let mut rec = gpu.recorder();
                matmul::matmul_fused(&mut rec, &refs, &x, &yrefs).unwrap();
                assert_eq!(rec.len(), 1, "one dispatch for {rows:?}");
                rec.submit().unwrap();
                for ((y, &r), (_, deq)) in ys.iter().zip(&rows).zip(&parts) {
                    assert_close(
                        &format!("stacked {f} {rows:?} part of {r} rows, {m} tokens"),
                        &gpu.read(y).unwrap(),
                        &matmul::reference(deq, r, cols, &xd, m),
                        tolerance(f),
                    );
                }
            }
            // Each slice alone (rows from row0 > 0 of the shared texture) is a plain matrix too.
            let last = ws.len() - 1;
            check(gpu, &ws[last], &parts[last].1, Op::Matvec(None), 220);
            check(gpu, &ws[last], &parts[last].1, Op::Matmul(3, None), 221);
        }
    }
}

#[test]
fn stacking_falls_back_to_separate_matrices_where_it_cannot_apply() {
    let Some(gpu) = gpu() else { return };
    let parts = quantised_parts(WeightFormat::Q4_0, &[40, 24], 64, 230);
    let spec = [
        ("a", WeightFormat::Q4_0, 40, parts[0].0.as_slice()),
        ("b", WeightFormat::Q4_0, 24, parts[1].0.as_slice()),
    ];
    // In buffers, where the second's slices would start off a 256-byte boundary (40 rows of 2
    // blocks: 160 bytes of f16 scales): two matrices of their own, computed one dispatch each.
    let ws = gpu
        .upload_weights_stacked_as(64, &spec, buffers(gpu))
        .unwrap();
    let refs: Vec<&WeightMatrix> = ws.iter().collect();
    assert!(!matmul::fusable(gpu, &refs));
    let x = gpu
        .tensor_from("x", Activations, &[2, 64], &randn(128, 231, 1.0))
        .unwrap();
    let ys = [
        gpu.tensor("y0", Activations, &[2, 40]).unwrap(),
        gpu.tensor("y1", Activations, &[2, 24]).unwrap(),
    ];
    let mut rec = gpu.recorder();
    matmul::matmul_fused(&mut rec, &refs, &x, &[&ys[0], &ys[1]]).unwrap();
    assert_eq!(rec.len(), 2);
    rec.submit().unwrap();
    for ((y, &r), (_, deq)) in ys.iter().zip(&[40, 24]).zip(&parts) {
        let xd = gpu.read(&x).unwrap();
        assert_close(
            "fallback",
            &gpu.read(y).unwrap(),
            &matmul::reference(deq, r, 64, &xd, 2),
            tol::NMSE_QUANT,
        );
    }
    // Textures but mixed formats: not stacked.
    let q8 = quantised_parts(WeightFormat::Q8_0, &[24], 64, 232);
    let mixed = [spec[0], ("b", WeightFormat::Q8_0, 24, q8[0].0.as_slice())];
    let ws = gpu
        .upload_weights_stacked_as(64, &mixed, textures_at_device_limits(gpu))
        .unwrap();
    let refs: Vec<&WeightMatrix> = ws.iter().collect();
    assert!(!matmul::fusable(gpu, &refs));
    // Outputs that disagree with the matrices are refused before anything is recorded.
    let mut rec = gpu.recorder();
    let e = matmul::matmul_fused(&mut rec, &refs, &x, &[&ys[0]]).unwrap_err();
    assert!(matches!(e, wgllm::Error::InvalidArgument { .. }), "{e}");
    assert!(rec.is_empty());
}

/// Runs matmul_swiglu on `gpu` over `m` tokens and compares with SwiGLU then the matmul
/// reference; returns the dispatches it recorded.
fn check_swiglu(gpu: &Gpu, wm: &WeightMatrix, deq: &[f32], m: usize, seed: u64) -> usize {
    let (rows, cols) = (wm.rows, wm.cols);
    let (g, u) = (randn(m * cols, seed, 2.0), randn(m * cols, seed + 1, 1.0));
    let gate = gpu
        .tensor_from("gate", Activations, &[m, cols], &g)
        .unwrap();
    let up = gpu.tensor_from("up", Activations, &[m, cols], &u).unwrap();
    let act = gpu.tensor("act", Activations, &[m, cols]).unwrap();
    let y = gpu.tensor("y", Activations, &[m, rows]).unwrap();
    let mut rec = gpu.recorder();
    matmul::matmul_swiglu(&mut rec, wm, &gate, &up, &act, &y).unwrap();
    let n = rec.len();
    rec.submit().unwrap();
    let want = matmul::reference(
        deq,
        rows,
        cols,
        &wgllm::kernels::activation::swiglu_reference(&g, &u),
        m,
    );
    let what = format!("swiglu matmul {} {rows}x{cols} x{m}", wm.format);
    assert_close(&what, &gpu.read(&y).unwrap(), &want, tolerance(wm.format));
    n
}

#[test]
fn swiglu_folds_into_the_down_projection() {
    let Some(gpu) = gpu() else { return };
    let folded = matmul::single_token_folds(gpu);
    // Every format in the device's own layout; two (one float, one quantised) in the other, each
    // variant being pipelines to compile.
    let own = wgllm::kernels::weights::weight_layout(gpu);
    for storage in layouts(gpu) {
        for f in WeightFormat::ALL {
            if storage.layout != own && !matches!(f, WeightFormat::F16 | WeightFormat::Q4_1) {
                continue;
            }
            let (wm, deq) = weights(gpu, storage, f, 70, awkward_cols(f), 240);
            for m in [1, 11] {
                let n = check_swiglu(gpu, &wm, &deq, m, 241);
                // Folded (one token): the matmul's dispatches only; else the swiglu pass too.
                let pass = usize::from(!(folded && m == 1));
                assert_eq!(n, wm.shards.len() + pass, "{f} x{m}");
            }
        }
    }
    // Without subgroups the workgroup matvec folds a single token's SwiGLU; several tokens keep
    // the separate pass.
    let plain = Gpu::new(&GpuOptions {
        no_subgroups: true,
        ..Default::default()
    })
    .unwrap();
    assert!(matmul::single_token_folds(&plain));
    let (wm, deq) = weights(&plain, buffers(&plain), WeightFormat::Q4_0, 21, 64, 242);
    assert_eq!(check_swiglu(&plain, &wm, &deq, 3, 243), 2);
    assert_eq!(check_swiglu(&plain, &wm, &deq, 1, 244), 1);
}

/// The single-token folds on the workgroup matvec (a device without subgroups: the kernel GPUs
/// run, reduced in workgroup memory) in every format: SwiGLU into the input, RMSNorm into the
/// input (the sum of squares reduced beside the rows), and the residual add into the output,
/// each one dispatch, against the references.
#[test]
fn workgroup_matvec_folds_match_reference_in_every_format() {
    if gpu().is_none() {
        return;
    }
    let no_subgroups = Gpu::new(&GpuOptions {
        no_subgroups: true,
        ..Default::default()
    })
    .unwrap();
    // The same kernel reduced with subgroupAdd (`matvec_wg_sg.wgsl`): a device with subgroups of
    // its own (lavapipe's), forced onto the workgroup matvec in f32.
    let subgroups = Gpu::new(&GpuOptions::default()).unwrap();
    matmul::idot::force_matvec(&subgroups, Some(matmul::idot::MatvecMath::Float));
    let devices = if matmul::reduces_in_subgroups(&subgroups) {
        vec![&no_subgroups, &subgroups]
    } else {
        vec![&no_subgroups]
    };
    // Every format at an awkward row length, and f32/f16 at one of whole 16-byte quads (their
    // vec4 entry points).
    let cases: Vec<_> = WeightFormat::ALL
        .into_iter()
        .map(|f| (f, awkward_cols(f)))
        .chain([(WeightFormat::F32, 1000), (WeightFormat::F16, 1000)])
        .collect();
    for (plain, (i, &(f, cols))) in devices
        .iter()
        .flat_map(|d| cases.iter().enumerate().map(move |c| (*d, c)))
    {
        let rows = 45;
        let (wm, deq) = weights(plain, buffers(plain), f, rows, cols, 400 + i as u64);
        assert_eq!(check_swiglu(plain, &wm, &deq, 1, 410 + i as u64), 1, "{f}");
        assert_eq!(
            check_norm_fold(plain, &[&wm], &[&deq], 1, 420 + i as u64),
            1,
            "{f}"
        );
        let (xd, rd) = (randn(cols, 430, 1.0), randn(rows, 431, 1.0));
        let x = plain
            .tensor_from("x", Activations, &[1, cols], &xd)
            .unwrap();
        let res = plain
            .tensor_from("res", Activations, &[1, rows], &rd)
            .unwrap();
        let proj = plain.tensor("proj", Activations, &[1, rows]).unwrap();
        let y = plain.tensor("y", Activations, &[1, rows]).unwrap();
        let mut rec = plain.recorder();
        matmul::matmul_add(&mut rec, &wm, &x, &res, &proj, &y).unwrap();
        assert_eq!(rec.len(), 1, "{f}");
        rec.submit().unwrap();
        let want = wgllm::kernels::elementwise::add_reference(
            &rd,
            &matmul::reference(&deq, rows, cols, &xd, 1),
        );
        assert_close(
            &format!("{f} + residual"),
            &plain.read(&y).unwrap(),
            &want,
            tolerance(f),
        );
    }
    if devices.len() > 1 {
        // The folds really ran through the subgroupAdd form: XFN 1 (SwiGLU), 2 (RMSNorm), RES.
        let keys = subgroups.kernel_keys();
        for want in ["XFN=1", "XFN=2", "RES=1"] {
            assert!(
                keys.iter()
                    .any(|k| k.starts_with("matvec_wg_sg::") && k.contains(want)),
                "no matvec_wg_sg kernel with {want}: {keys:?}"
            );
        }
    }
}

/// Runs `matmul_fused_norm` over `m` tokens and compares with RMSNorm then the matmul reference;
/// returns the dispatches it recorded.
fn check_norm_fold(gpu: &Gpu, ws: &[&WeightMatrix], deqs: &[&[f32]], m: usize, seed: u64) -> usize {
    let cols = ws[0].cols;
    let (xd, gd) = (randn(m * cols, seed, 3.0), randn(cols, seed + 1, 1.0));
    let eps = 1e-5;
    let x = gpu.tensor_from("x", Activations, &[m, cols], &xd).unwrap();
    let gamma = gpu.tensor_from("gamma", Activations, &[cols], &gd).unwrap();
    let xb = gpu.tensor("xb", Activations, &[m, cols]).unwrap();
    let ys: Vec<Tensor> = ws
        .iter()
        .map(|w| gpu.tensor("y", Activations, &[m, w.rows]).unwrap())
        .collect();
    let yrefs: Vec<&Tensor> = ys.iter().collect();
    let mut rec = gpu.recorder();
    matmul::matmul_fused_norm(&mut rec, ws, &x, &gamma, eps, &xb, &yrefs).unwrap();
    let n = rec.len();
    rec.submit().unwrap();
    let normed = wgllm::kernels::norm::rms_norm_reference(&xd, &gd, eps);
    for ((y, w), deq) in ys.iter().zip(ws).zip(deqs) {
        let what = format!("rms_norm matmul {} {}x{} x{m}", w.format, w.rows, cols);
        let want = matmul::reference(deq, w.rows, cols, &normed, m);
        assert_close(&what, &gpu.read(y).unwrap(), &want, tolerance(w.format));
    }
    n
}

#[test]
fn rms_norm_folds_into_the_projections_for_single_tokens() {
    let Some(gpu) = gpu() else { return };
    let folded = matmul::single_token_folds(gpu);
    let tex = textures_at_device_limits(gpu);
    for f in WeightFormat::ALL {
        let cols = awkward_cols(f);
        // Stacked Q/K/V (the attention block's input): one dispatch for a single token.
        let rows = [100, 36, 36];
        let parts = quantised_parts(f, &rows, cols, 250);
        let spec: Vec<_> = rows
            .iter()
            .zip(&parts)
            .zip(["q", "k", "v"])
            .map(|((&r, (q, _)), l)| (l, f, r, q.as_slice()))
            .collect();
        let ws = gpu.upload_weights_stacked_as(cols, &spec, tex).unwrap();
        let refs: Vec<&WeightMatrix> = ws.iter().collect();
        let deqs: Vec<&[f32]> = parts.iter().map(|(_, d)| d.as_slice()).collect();
        let stacked = matmul::fusable(gpu, &refs);
        for m in [1, 5] {
            let n = check_norm_fold(gpu, &refs, &deqs, m, 251);
            let want = match (folded && m == 1, stacked) {
                (true, true) => 1,
                (true, false) => 3,
                (false, true) => 2,
                (false, false) => 4,
            };
            assert_eq!(n, want, "{f} x{m}");
        }
    }
    // One matrix in shards (the output head): each shard's dispatch takes the norm itself.
    let storage = WeightStorage {
        max_texture_dim: 64,
        ..tex
    };
    let (wm, deq) = weights(gpu, storage, WeightFormat::Q8_0, 150, 64, 252);
    assert!(wm.shards.len() > 1);
    let n = check_norm_fold(gpu, &[&wm], &[&deq], 1, 253);
    assert_eq!(n, wm.shards.len() + usize::from(!folded));
    // Past NORM_FOLD_MAX_WEIGHTS the norm stays a pass (every workgroup would reload gamma).
    let rows = matmul::NORM_FOLD_MAX_WEIGHTS / 64 + 1;
    let (big, deq) = weights(gpu, tex, WeightFormat::Q8_0, rows, 64, 254);
    assert!(!matmul::norm_folds(gpu, &[&big], 1));
    assert_eq!(
        check_norm_fold(gpu, &[&big], &[&deq], 1, 255),
        big.shards.len() + 1
    );
}

#[test]
fn residual_adds_fold_into_the_projections_for_single_tokens() {
    let Some(gpu) = gpu() else { return };
    let folded = matmul::single_token_folds(gpu);
    for storage in layouts(gpu) {
        for f in [WeightFormat::F32, WeightFormat::Q4_1, WeightFormat::Q8_0] {
            let (rows, cols) = (70, awkward_cols(f));
            let (wm, deq) = weights(gpu, storage, f, rows, cols, 260);
            for m in [1, 3] {
                let fold = usize::from(!(folded && m == 1));
                let (xd, rd) = (randn(m * cols, 261, 1.0), randn(m * rows, 262, 1.0));
                let x = gpu.tensor_from("x", Activations, &[m, cols], &xd).unwrap();
                let up_d = randn(m * cols, 263, 1.0);
                let up = gpu
                    .tensor_from("up", Activations, &[m, cols], &up_d)
                    .unwrap();
                let act = gpu.tensor("act", Activations, &[m, cols]).unwrap();
                let res = gpu
                    .tensor_from("res", Activations, &[m, rows], &rd)
                    .unwrap();
                let proj = gpu.tensor("proj", Activations, &[m, rows]).unwrap();
                let y = gpu.tensor("y", Activations, &[m, rows]).unwrap();
                let what = format!("{f} {:?} x{m}", storage.layout);
                // y = res + x Wᵀ
                let mut rec = gpu.recorder();
                matmul::matmul_add(&mut rec, &wm, &x, &res, &proj, &y).unwrap();
                assert_eq!(rec.len(), wm.shards.len() + fold, "{what}");
                rec.submit().unwrap();
                let plain = matmul::reference(&deq, rows, cols, &xd, m);
                let want = wgllm::kernels::elementwise::add_reference(&rd, &plain);
                assert_close(&what, &gpu.read(&y).unwrap(), &want, tolerance(f));
                // y = res + swiglu(x, up) Wᵀ
                let mut rec = gpu.recorder();
                matmul::matmul_swiglu_add(&mut rec, &wm, &x, &up, &act, &res, &proj, &y).unwrap();
                assert_eq!(rec.len(), wm.shards.len() + 2 * fold, "swiglu {what}");
                rec.submit().unwrap();
                let act_d = wgllm::kernels::activation::swiglu_reference(&xd, &up_d);
                let plain = matmul::reference(&deq, rows, cols, &act_d, m);
                let want = wgllm::kernels::elementwise::add_reference(&rd, &plain);
                assert_close(
                    &format!("swiglu {what}"),
                    &gpu.read(&y).unwrap(),
                    &want,
                    tolerance(f),
                );
            }
        }
    }
    // A residual that is the output itself is refused before anything runs, as is a mismatch.
    let (wm, _) = weights(gpu, buffers(gpu), WeightFormat::Q4_0, 16, 64, 264);
    let x = gpu.tensor("x", Activations, &[1, 64]).unwrap();
    let y = gpu.tensor("y", Activations, &[1, 16]).unwrap();
    let proj = gpu.tensor("proj", Activations, &[1, 16]).unwrap();
    let mut rec = gpu.recorder();
    assert!(matmul::matmul_add(&mut rec, &wm, &x, &y, &proj, &y).is_err());
    let short = gpu.tensor("res", Activations, &[1, 8]).unwrap();
    assert!(matmul::matmul_add(&mut rec, &wm, &x, &short, &proj, &y).is_err());
    assert!(rec.is_empty());
}

/// What a decode-row product folds in (the single-token folds of `matmul::single_token_folds`).
#[derive(Debug, Clone, Copy)]
enum Fold {
    Plain,
    Norm,
    Add,
    SwigluAdd,
}

/// `fold` of `wm` over the `m` rows of `xs` (`[m, cols]`) as `step` computes them; `[m, rows]`.
fn folded_product(
    gpu: &Gpu,
    wm: &WeightMatrix,
    fold: Fold,
    step: matmul::Step,
    xs: &[f32],
    m: usize,
) -> Vec<f32> {
    folded_product_in(gpu, wm, fold, step, xs, m, false)
}

/// [`folded_product`], with every tensor in a buffer of at least a uniform window
/// ([`wgllm::gpu::UNIFORM_WINDOW`]) where `windows`, so that the subgroup matvec can read x and up
/// through uniform windows; else each buffer is exactly its tensor.
fn folded_product_in(
    gpu: &Gpu,
    wm: &WeightMatrix,
    fold: Fold,
    step: matmul::Step,
    xs: &[f32],
    m: usize,
    windows: bool,
) -> Vec<f32> {
    let (rows, cols) = (wm.rows, wm.cols);
    let t = |data: &[f32], shape: &[usize]| {
        let mut padded = data.to_vec();
        if windows {
            padded.resize(data.len().max(wgllm::gpu::UNIFORM_WINDOW as usize / 4), 0.0);
        }
        Tensor {
            buf: gpu.upload_f32("t", Activations, &padded).unwrap(),
            shape: shape.to_vec(),
        }
    };
    let x = t(xs, &[m, cols]);
    let ups: Vec<f32> = xs.iter().map(|v| 0.5 - v * 0.25).collect();
    let up = t(&ups, &[m, cols]);
    let gamma = t(&randn(cols, 5, 1.0), &[cols]);
    // Each row's residual from its own x, so that a row alone gets the same one.
    let res_data: Vec<f32> = (0..m * rows)
        .map(|i| 0.5 * xs[i / rows * cols + i % rows % cols])
        .collect();
    let res = t(&res_data, &[m, rows]);
    let scratch_x = t(&vec![0.0; m * cols], &[m, cols]);
    let proj = t(&vec![0.0; m * rows], &[m, rows]);
    let y = t(&vec![0.0; m * rows], &[m, rows]);
    let mut rec = gpu.recorder();
    match fold {
        Fold::Plain => matmul::matmul_in(&mut rec, step, wm, &x, &y),
        Fold::Norm => {
            matmul::matmul_fused_norm_in(&mut rec, step, &[wm], &x, &gamma, 1e-5, &scratch_x, &[&y])
        }
        Fold::Add => matmul::matmul_add_in(&mut rec, step, wm, &x, &res, &proj, &y),
        Fold::SwigluAdd => {
            matmul::matmul_swiglu_add_in(&mut rec, step, wm, &x, &up, &scratch_x, &res, &proj, &y)
        }
    }
    .unwrap();
    rec.submit().unwrap();
    gpu.read_f32(&y.buf, 0, m * rows).unwrap()
}

/// Decode rows ([`matmul::Step::Rows`]): `m` rows in one dispatch, each the same bits as that row
/// alone through the single-token path, folds included, in every format and weight layout; on the
/// test device (lavapipe: the subgroup matvec, 2, 4 or 8 tokens a pass) and on it opened without
/// subgroups (the workgroup matvec, 2 or 4 tokens a pass).
#[test]
fn decode_rows_equal_single_rows_bit_for_bit() {
    let Some(gpu) = gpu() else {
        return;
    };
    let plain = Gpu::new(&GpuOptions {
        no_subgroups: true,
        ..Default::default()
    })
    .unwrap();
    for g in [gpu, &plain] {
        let folds_here = matmul::single_token_folds(g);
        for storage in layouts(g) {
            for (i, f) in WeightFormat::ALL.into_iter().enumerate() {
                let (rows, cols) = (100, awkward_cols(f));
                let (wm, _) = weights(g, storage, f, rows, cols, 90 + i as u64);
                // Each row count is its own pipeline, and pipeline compilation is what this
                // test spends its time on: the counts rotate over the formats, so every count
                // from 2 to 8 meets every fold somewhere without each format compiling them all.
                let counts = [2, 3, 4, 5, 6, 7, 8];
                let m = |k: usize| counts[(i * 3 + k) % counts.len()];
                let mut cases = vec![(Fold::Plain, m(0))];
                if folds_here {
                    cases.extend([
                        (Fold::Norm, m(1)),
                        (Fold::Add, m(2)),
                        (Fold::SwigluAdd, m(4)),
                    ]);
                }
                for (fold, m) in cases {
                    let xs = randn(m * cols, 200 + m as u64, 1.0);
                    let batch = folded_product(g, &wm, fold, matmul::Step::Rows, &xs, m);
                    for (r, row) in xs.chunks(cols).enumerate() {
                        let one = folded_product(g, &wm, fold, matmul::Step::Chunk, row, 1);
                        let got = &batch[r * rows..(r + 1) * rows];
                        let same = same_bits(got, &one);
                        assert!(
                            same,
                            "{} {f} {:?} {fold:?}, row {r} of {m}: {:?} vs {:?}",
                            g.describe(),
                            storage.layout,
                            &got[..4],
                            &one[..4]
                        );
                    }
                }
            }
        }
    }
}

/// On a device whose buffers are uniform-capable (lavapipe), the subgroup matvec reads x and up
/// through uniform windows (`matvec_sg_tex_ux.wgsl`, `matvec_sg_ux.wgsl`), and gives the
/// storage-buffer kernel's results bit for bit (a device opened with `storage_x`): every format
/// (rows of whole 32-value blocks) in the device's weight layout and Q4_1 in the other, plain and
/// with each fold, for one token, decode rows and a prefill chunk. On fresh devices, so that their
/// kernel keys show which variant ran.
#[test]
fn uniform_x_windows_give_the_storage_results_bit_for_bit() {
    let Some(shared) = subgroup_gpu() else { return };
    assert!(shared.uniform_inputs() || std::env::var("WGLLM_SG_X").is_ok_and(|v| v == "storage"));
    if !shared.uniform_inputs() {
        return;
    }
    let windowed = Gpu::new(&GpuOptions::default()).unwrap();
    let stored = Gpu::new(&GpuOptions {
        storage_x: true,
        ..Default::default()
    })
    .unwrap();
    assert!(!stored.uniform_inputs());
    let ran = |gpu: &Gpu, ux: bool| {
        gpu.kernel_keys()
            .into_iter()
            .filter(|k| k.starts_with("matvec_sg") && k.contains("_ux::") == ux)
            .count()
    };
    // Each case is two pipelines to compile (one a device), which is what this test spends its
    // time on: every format in the device's own layout, Q4_1 in the other too; two folds a
    // format, rotating so that every fold meets one token and decode rows somewhere.
    let own = wgllm::kernels::weights::weight_layout(&windowed);
    let folds = [Fold::Plain, Fold::Norm, Fold::Add, Fold::SwigluAdd];
    for layout in [WeightLayout::Textures, WeightLayout::Buffers] {
        let storage_of = |g: &Gpu| {
            layouts(g)
                .into_iter()
                .find(|s| s.layout == layout)
                .expect("both layouts on lavapipe")
        };
        for (i, f) in WeightFormat::ALL.into_iter().enumerate() {
            if layout != own && f != WeightFormat::Q4_1 {
                continue;
            }
            let (rows, cols) = (100, fit(f, 32 * 9));
            let (wm_w, _) = weights(
                &windowed,
                storage_of(&windowed),
                f,
                rows,
                cols,
                300 + i as u64,
            );
            let (wm_s, _) = weights(&stored, storage_of(&stored), f, rows, cols, 300 + i as u64);
            let mut cases = vec![
                (folds[i % 4], matmul::Step::Chunk, 1),
                (folds[(i + 1) % 4], matmul::Step::Rows, 3 + i % 2),
            ];
            // A prefill chunk of 40 tokens (8 a pass; 56 rows of 288 values fit a window).
            if layout == own && matches!(f, WeightFormat::Q4_1 | WeightFormat::Q8_0) {
                cases.extend([
                    (Fold::Plain, matmul::Step::Chunk, 40),
                    (Fold::SwigluAdd, matmul::Step::Chunk, 40),
                ]);
            }
            for (fold, step, m) in cases {
                let xs = randn(m * cols, 310 + m as u64, 1.0);
                let want = folded_product_in(&stored, &wm_s, fold, step, &xs, m, true);
                let got = folded_product_in(&windowed, &wm_w, fold, step, &xs, m, true);
                let same = same_bits(&got, &want);
                assert!(
                    same,
                    "{f} {layout:?} {fold:?} x{m}: {:?} vs {:?}",
                    &got[..4],
                    &want[..4]
                );
            }
        }
    }
    assert_eq!(ran(&stored, true), 0, "the storage device used a window");
    assert_eq!(ran(&windowed, false), 0, "the window device used storage");
    assert!(ran(&windowed, true) > 0 && ran(&stored, false) > 0);
}

/// Runs `matmul_fused_in` over `xd` (`m` tokens) and returns the dispatches and each output.
fn fused_run(
    gpu: &Gpu,
    step: matmul::Step,
    ws: &[&WeightMatrix],
    xd: &[f32],
    m: usize,
) -> (usize, Vec<Vec<f32>>) {
    let cols = ws[0].cols;
    let x = gpu.tensor_from("x", Activations, &[m, cols], xd).unwrap();
    let ys: Vec<Tensor> = ws
        .iter()
        .map(|w| gpu.tensor("y", Activations, &[m, w.rows]).unwrap())
        .collect();
    let yrefs: Vec<&Tensor> = ys.iter().collect();
    let mut rec = gpu.recorder();
    matmul::matmul_fused_in(&mut rec, step, ws, &x, &yrefs).unwrap();
    let n = rec.len();
    rec.submit().unwrap();
    (n, ys.iter().map(|y| gpu.read(y).unwrap()).collect())
}

/// Q/K/V and gate/up stacked in one buffer on the workgroup matvec (`gpu` runs it: a device
/// without 8-lane subgroups) in `formats`: one dispatch for a single token, for decode rows and
/// with the RMSNorm folded in, each row the same bits as the matrices uploaded apart and close
/// to the CPU reference; a chunk of several tokens runs the matrices apart. Heights whose
/// slices would start unaligned, and mixed formats, are not stacked.
fn check_stacked_buffers(gpu: &Gpu, formats: &[WeightFormat]) {
    assert!(!matmul::subgroup_matvec_ok(gpu));
    let storage = buffers(gpu);
    for &f in formats {
        let cols = awkward_cols(f);
        // Q, K, V of unequal heights, then gate and up: whole 256-byte slices in every format.
        for rows in [vec![256, 128, 128], vec![384, 384]] {
            let what = format!("{} {f} {rows:?}", gpu.describe());
            let parts = quantised_parts(f, &rows, cols, 500);
            let labels = ["a", "b", "c"];
            let spec: Vec<_> = rows
                .iter()
                .zip(&parts)
                .zip(labels)
                .map(|((&r, (q, _)), l)| (l, f, r, q.as_slice()))
                .collect();
            let ws = gpu.upload_weights_stacked_as(cols, &spec, storage).unwrap();
            let refs: Vec<&WeightMatrix> = ws.iter().collect();
            assert!(matmul::fusable(gpu, &refs), "{what}: not stacked");
            // The stack books the bytes of separate buffers.
            let apart: Vec<WeightMatrix> = spec
                .iter()
                .map(|&(l, f, r, q)| gpu.upload_weights_as(l, f, r, cols, q, storage).unwrap())
                .collect();
            let apart_refs: Vec<&WeightMatrix> = apart.iter().collect();
            for (s, a) in ws.iter().zip(&apart) {
                assert_eq!(s.bytes(), a.bytes(), "{what}");
            }
            assert!(!matmul::fusable(gpu, &apart_refs));
            // A single token: one dispatch, the rows of the separate matrices bit for bit.
            let xd = randn(cols, 510, 1.0);
            let (n, got) = fused_run(gpu, matmul::Step::Chunk, &refs, &xd, 1);
            assert_eq!(n, 1, "{what}");
            let (n_apart, want) = fused_run(gpu, matmul::Step::Chunk, &apart_refs, &xd, 1);
            assert_eq!(n_apart, rows.len(), "{what}");
            for (i, ((g, w), (_, deq))) in got.iter().zip(&want).zip(&parts).enumerate() {
                let bits = same_bits(g, w);
                assert!(bits, "{what} part {i}: {:?} vs {:?}", &g[..4], &w[..4]);
                let r = &matmul::reference(deq, rows[i], cols, &xd, 1);
                assert_close(&format!("{what} part {i}"), g, r, tolerance(f));
            }
            // Decode rows: one dispatch, each row the single token's bits.
            let m = 3;
            let xs = randn(m * cols, 520, 1.0);
            let (n, batch) = fused_run(gpu, matmul::Step::Rows, &refs, &xs, m);
            assert_eq!(n, 1, "{what} decode rows");
            for (t, row) in xs.chunks(cols).enumerate() {
                let (_, one) = fused_run(gpu, matmul::Step::Chunk, &refs, row, 1);
                for (i, (b, o)) in batch.iter().zip(&one).enumerate() {
                    let got = &b[t * rows[i]..(t + 1) * rows[i]];
                    let bits = same_bits(got, o);
                    assert!(bits, "{what} part {i}, row {t} of {m}");
                }
            }
            // A chunk of several tokens: each matrix apart, still right.
            let m = 5;
            let xs = randn(m * cols, 530, 1.0);
            let (n, got) = fused_run(gpu, matmul::Step::Chunk, &refs, &xs, m);
            assert_eq!(n, rows.len(), "{what} chunk");
            for (i, (g, (_, deq))) in got.iter().zip(&parts).enumerate() {
                let r = &matmul::reference(deq, rows[i], cols, &xs, m);
                assert_close(&format!("{what} part {i} x{m}"), g, r, tolerance(f));
            }
            // The RMSNorm folds into the stacked dispatch.
            let deqs: Vec<&[f32]> = parts.iter().map(|p| p.1.as_slice()).collect();
            assert_eq!(check_norm_fold(gpu, &refs, &deqs, 1, 540), 1, "{what}");
        }
    }
    // Fallbacks: slices that would start off a 256-byte boundary (Q4_0's f16 scales of 36 rows of
    // 2 blocks), and mixed formats, are uploaded apart and run one dispatch each.
    let q4 = quantised_parts(WeightFormat::Q4_0, &[100, 36, 36], 64, 550);
    let q8 = quantised_parts(WeightFormat::Q8_0, &[128], 64, 551);
    let unaligned: Vec<_> = [100, 36, 36]
        .iter()
        .zip(&q4)
        .zip(["a", "b", "c"])
        .map(|((&r, (q, _)), l)| (l, WeightFormat::Q4_0, r, q.as_slice()))
        .collect();
    let q4b = quantised_parts(WeightFormat::Q4_0, &[128], 64, 552);
    let mixed = vec![
        ("a", WeightFormat::Q4_0, 128, q4b[0].0.as_slice()),
        ("b", WeightFormat::Q8_0, 128, q8[0].0.as_slice()),
    ];
    let deq_mixed = [q4b[0].1.as_slice(), q8[0].1.as_slice()];
    let deq_unaligned = [q4[0].1.as_slice(), q4[1].1.as_slice(), q4[2].1.as_slice()];
    for (spec, deqs) in [(&unaligned, &deq_unaligned[..]), (&mixed, &deq_mixed[..])] {
        let ws = gpu.upload_weights_stacked_as(64, spec, storage).unwrap();
        let refs: Vec<&WeightMatrix> = ws.iter().collect();
        assert!(!matmul::fusable(gpu, &refs));
        let xd = randn(64, 553, 1.0);
        let (n, got) = fused_run(gpu, matmul::Step::Chunk, &refs, &xd, 1);
        assert_eq!(n, spec.len());
        for ((g, w), deq) in got.iter().zip(&ws).zip(deqs) {
            let r = &matmul::reference(deq, w.rows, 64, &xd, 1);
            assert_close(&format!("fallback {}", w.format), g, r, tol::NMSE_QUANT);
        }
    }
}

#[test]
fn stacked_buffers_run_as_one_workgroup_matvec_dispatch() {
    if gpu().is_none() {
        return;
    }
    // Lavapipe opened without subgroups runs the workgroup matvec, GPUs' kernel.
    let plain = Gpu::new(&GpuOptions {
        no_subgroups: true,
        ..Default::default()
    })
    .unwrap();
    check_stacked_buffers(&plain, &WeightFormat::ALL);
    // The GL backend (portable kernels), where Mesa's GL is installed: a float and two
    // quantised formats, each a set of pipelines to compile.
    use WeightFormat::{F16, Q4_K, Q8_0};
    match gl_device() {
        Some(gl) => check_stacked_buffers(&gl, &[F16, Q8_0, Q4_K]),
        None => eprintln!("SKIPPED: no OpenGL adapter"),
    }
}
