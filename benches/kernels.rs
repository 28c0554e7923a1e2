//! Criterion benches of the matrix kernels per weight format (wall-clock, one submission per
//! iteration, so they include submission overhead; `wgllm bench kernels` reports GPU timestamps).
//! `cargo bench --bench kernels`; WGLLM_BENCH_FULL=1 adds the 7B/13B shapes.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use wgllm::gpu::BufferClass::Activations;
use wgllm::kernels::matmul;
use wgllm::quant::{synthetic, WeightFormat};
use wgllm::{Gpu, GpuOptions};

fn shapes() -> Vec<(usize, usize)> {
    // (k, n): k inputs, n outputs.
    if std::env::var("WGLLM_BENCH_FULL").is_ok() {
        vec![(4096, 4096), (4096, 11008), (11008, 4096), (5120, 13824)]
    } else {
        vec![(576, 1536), (4096, 4096)]
    }
}

fn bench(c: &mut Criterion) {
    let gpu = match Gpu::new(&GpuOptions::default()) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("no GPU adapter: {e}");
            return;
        }
    };
    let mut group = c.benchmark_group(format!("matrix kernels on {}", gpu.info.name));
    group.sample_size(10);
    for (k, n) in shapes() {
        for f in WeightFormat::ALL {
            let gguf = synthetic(f, k * n, 7).expect("synthetic weights");
            let w = gpu
                .upload_weights("bench.w", f, n, k, &gguf)
                .expect("upload");
            for m in [1usize, 128] {
                let x = gpu.tensor("bench.x", Activations, &[m, k]).expect("x");
                let y = gpu.tensor("bench.y", Activations, &[m, n]).expect("y");
                group.throughput(Throughput::Bytes(w.bytes()));
                let id = BenchmarkId::new(
                    format!("{} {f}", if m == 1 { "matvec" } else { "matmul x128" }),
                    format!("{k}x{n}"),
                );
                group.bench_function(id, |b| {
                    b.iter(|| {
                        let mut rec = gpu.recorder();
                        if m == 1 {
                            matmul::matvec(
                                &mut rec,
                                &w,
                                &x.view(&[k]).unwrap(),
                                &y.view(&[n]).unwrap(),
                            )
                            .unwrap();
                        } else {
                            matmul::matmul(&mut rec, &w, &x, &y).unwrap();
                        }
                        rec.submit().unwrap();
                    })
                });
            }
        }
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
