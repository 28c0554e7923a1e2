mod common;
use common::*;
use wgllm::kernels::rope::{self, RopeMode};
use wgllm::BufferClass::Activations;
#[test]
fn diag() {
    let Some(gpu) = gpu() else { return };
    for (m, heads, hd, rot, pos0, theta) in [(7usize, 3usize, 128usize, 128usize, 0u32, 1e4f32), (7, 3, 128, 128, 300, 5e5), (3, 2, 64, 64, 5000, 1e4), (2, 3, 256, 64, 1, 1e6), (4, 8, 128, 128, 100_000, 1e4), (4, 8, 128, 128, 1_000_000, 1e4)] {
        for mode in [RopeMode::Interleaved, RopeMode::Half] {
            let x = randn(m * heads * hd, 5, 1.0);
            let t = gpu.tensor_from("q", Activations, &[m, heads, hd], &x).unwrap();
            let mut rec = gpu.recorder();
            rope::rope(&mut rec, &t, pos0, theta, mode, rot).unwrap();
            rec.submit().unwrap();
            let got = gpu.read(&t).unwrap();
            let want = rope::rope_reference(&x, heads, hd, pos0, theta, mode, rot);
            eprintln!("rope pos0={pos0} theta={theta} {mode:?}: nmse {:.2e} maxdiff {:.2e}", nmse(&got, &want), max_abs_diff(&got, &want));
        }
    }
}
