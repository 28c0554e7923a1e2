//! Embedding lookup in every weight format, whole and sharded, against the CPU reference over the
//! dequantised table, with the table in buffers and in textures; out-of-range ids give zero rows on
//! the GPU and a typed error from check_ids.
mod common;
use common::*;
use wgllm::kernels::embedding;
use wgllm::kernels::weights::WeightStorage;
use wgllm::quant::{dequantize, quantize, WeightFormat};
use wgllm::BufferClass::Activations;

/// Uploads a random `vocab x dim` table in `format`, stored as `storage` says; returns it with its
/// dequantised values.
fn table(
    gpu: &wgllm::Gpu,
    storage: WeightStorage,
    format: WeightFormat,
    vocab: usize,
    dim: usize,
) -> (wgllm::kernels::WeightMatrix, Vec<f32>) {
    let w = randn(vocab * dim, 41, 1.0);
    let q = quantize(format, &w).unwrap();
    let deq = dequantize(format, &q, w.len()).unwrap();
    let t = gpu
        .upload_weights_as(
            &format!("tok_embd.{format}"),
            format,
            vocab,
            dim,
            &q,
            storage,
        )
        .unwrap();
    (t, deq)
}

fn lookup(gpu: &wgllm::Gpu, t: &wgllm::kernels::WeightMatrix, ids: &[u32]) -> Vec<f32> {
    let idb = gpu
        .upload("ids", Activations, bytemuck::cast_slice(ids))
        .unwrap();
    let out = gpu
        .tensor("embd", Activations, &[ids.len(), t.cols])
        .unwrap();
    // Stale data in out must be overwritten, zero rows included.
    gpu.write(
        &out.buf,
        0,
        bytemuck::cast_slice(&vec![f32::NAN; out.len()]),
    )
    .unwrap();
    let mut rec = gpu.recorder();
    embedding::lookup(&mut rec, t, &idb, ids.len(), &out).unwrap();
    rec.submit().unwrap();
    gpu.read(&out).unwrap()
}

fn ids_for(vocab: usize, n: usize) -> Vec<u32> {
    // First, last, repeats, and a spread in between.
    let mut ids: Vec<u32> = vec![0, vocab as u32 - 1, 0];
    ids.extend((0..n.saturating_sub(3)).map(|i| ((i * 7919 + 13) % vocab) as u32));
    ids.truncate(n);
    ids
}

#[test]
fn lookup_matches_reference_in_every_format() {
    let Some(gpu) = gpu() else { return };
    for (format, storage) in WeightFormat::ALL
        .into_iter()
        .flat_map(|f| [buffers(gpu), textures_at_device_limits(gpu)].map(|s| (f, s)))
    {
        let dims: &[usize] = match format.block_len() {
            1 => &[1, 7, 33, 300],
            32 => &[32, 96],
            // K-quants: one super-block, and five (more vec4 than the workgroup has threads).
            _ => &[256, 1280],
        };
        for &dim in dims {
            let vocab = 50;
            let (t, deq) = table(gpu, storage, format, vocab, dim);
            for n in [1, 5, 300] {
                let ids = ids_for(vocab, n);
                let got = lookup(gpu, &t, &ids);
                let want = embedding::lookup_reference(&deq, dim, &ids);
                // A lookup copies (dequantised) weights: exact.
                assert_eq!(
                    got, want,
                    "{format} dim={dim} n={n} in {:?}",
                    storage.layout
                );
            }
        }
    }
}

#[test]
fn lookup_handles_sharded_tables_and_bad_ids() {
    let Some(gpu) = gpu() else { return };
    // Limits lowered so that 300 rows take several shards: 4 KiB bindings, 64-row textures.
    let mut small = [buffers(gpu), textures_at_device_limits(gpu)];
    for s in &mut small {
        s.max_binding = 4096;
        s.max_texture_dim = 64;
    }
    let tables: Vec<_> = WeightFormat::ALL
        .into_iter()
        .flat_map(|f| small.map(|s| (f, table(gpu, s, f, 300, 64.max(f.block_len())))))
        .collect();
    for (format, (t, deq)) in &tables {
        assert!(t.shards.len() > 1, "{format}: not sharded");
        let mut ids = ids_for(300, 40);
        // Ids on every shard boundary, and out-of-range ids (which must come out as zeros).
        ids.extend(
            t.shards
                .iter()
                .flat_map(|s| [s.row_start as u32, (s.row_start + s.rows - 1) as u32]),
        );
        ids.extend([300, u32::MAX, 1000]);
        let got = lookup(gpu, t, &ids);
        let dim = t.cols;
        let want = embedding::lookup_reference(deq, dim, &ids);
        assert_eq!(got, want, "{format} sharded into {}", t.shards.len());
        assert!(got[got.len() - 3 * dim..].iter().all(|&v| v == 0.0));
    }
}

#[test]
fn check_ids_refuses_out_of_range_ids() {
    assert!(embedding::check_ids(&[0, 5, 9], 10).is_ok());
    assert!(embedding::check_ids(&[], 10).is_ok());
    let e = embedding::check_ids(&[0, 10, 3], 10).unwrap_err();
    assert!(matches!(e, wgllm::Error::InvalidArgument { .. }), "{e}");
    assert!(e.to_string().contains("position 1"), "{e}");
}

#[test]
fn lookup_refuses_bad_shapes_before_dispatch() {
    let Some(gpu) = gpu() else { return };
    let (t, _) = table(gpu, buffers(gpu), WeightFormat::Q8_0, 10, 32);
    let ids = gpu
        .upload("ids", Activations, bytemuck::cast_slice(&[1u32, 2]))
        .unwrap();
    let out = gpu.tensor("embd", Activations, &[2, 32]).unwrap();
    let wrong = gpu.tensor("embd_wrong", Activations, &[2, 31]).unwrap();
    let big = gpu.tensor("embd_big", Activations, &[3, 32]).unwrap();
    let mut rec = gpu.recorder();
    let shape = |e: wgllm::Error| assert!(matches!(e, wgllm::Error::ShapeMismatch { .. }), "{e}");
    shape(embedding::lookup(&mut rec, &t, &ids, 2, &wrong).unwrap_err());
    shape(embedding::lookup(&mut rec, &t, &ids, 3, &out).unwrap_err());
    // Three tokens asked for, only two ids in the buffer.
    shape(embedding::lookup(&mut rec, &t, &ids, 3, &big).unwrap_err());
    assert!(rec.is_empty());
}

#[test]
fn lookup_reads_a_slice_of_a_shared_texture() {
    let Some(gpu) = gpu() else { return };
    // Two tables stacked in one texture: the second starts at texture row 10.
    let (dim, format) = (64, WeightFormat::Q4_1);
    let (w1, w2) = (randn(10 * dim, 43, 1.0), randn(20 * dim, 44, 1.0));
    let (q1, q2) = (
        quantize(format, &w1).unwrap(),
        quantize(format, &w2).unwrap(),
    );
    let spec = [
        ("a", format, 10, q1.as_slice()),
        ("b", format, 20, q2.as_slice()),
    ];
    let tables = gpu
        .upload_weights_stacked_as(dim, &spec, textures_at_device_limits(gpu))
        .unwrap();
    assert_eq!(tables[1].shards[0].data.row0(), 10);
    let ids = ids_for(20, 30);
    let want = embedding::lookup_reference(&dequantize(format, &q2, w2.len()).unwrap(), dim, &ids);
    assert_eq!(lookup(gpu, &tables[1], &ids), want);
}
