mod common;
use common::*;
use wgllm::kernels::matmul;
use wgllm::quant::WeightFormat;
use wgllm::BufferClass::Activations;
fn cpu() -> f64 {
    let s = std::fs::read_to_string("/proc/self/stat").unwrap();
    let f: Vec<&str> = s.rsplit(')').next().unwrap().split_whitespace().collect();
    (f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap()) / 100.0
}

#[test]
#[ignore]
fn bench() {
    let Some(gpu) = gpu() else { return };
    let (rows, cols) = (4096, 4096);
    let w = randn(rows * cols, 1, 1.0);
    for f in WeightFormat::ALL {
        let wm = gpu.upload_weights_f32("w", f, rows, cols, &w).unwrap();
        let x = gpu.tensor_from("x", Activations, &[cols], &randn(cols, 2, 1.0)).unwrap();
        let y = gpu.tensor("y", Activations, &[rows]).unwrap();
        let n = 20;
        let mut best = f64::MAX;
        for _ in 0..3 {
            let mut rec = gpu.recorder();
            for _ in 0..n { matmul::matvec(&mut rec, &wm, &x, &y).unwrap(); }
            let t = cpu();
            rec.submit().unwrap();
            best = best.min((cpu() - t) / n as f64);
        }
        let bytes = wm.bytes() as f64;
        println!("matvec {f} {rows}x{cols}: {:.2} ms, {:.2} GB/s", best * 1e3, bytes / best / 1e9);
        let m = 128;
        let x = gpu.tensor_from("x", Activations, &[m, cols], &randn(m*cols, 2, 1.0)).unwrap();
        let y = gpu.tensor("y", Activations, &[m, rows]).unwrap();
        let mut best = f64::MAX;
        for _ in 0..2 {
            let mut rec = gpu.recorder();
            matmul::matmul(&mut rec, &wm, &x, &y).unwrap();
            let t = cpu();
            rec.submit().unwrap();
            best = best.min((cpu() - t));
        }
        println!("matmul {f} m={m}: {:.2} ms, {:.2} GFLOP/s", best * 1e3, 2.0 * (m * rows * cols) as f64 / best / 1e9);
    }
}
