mod common;
use common::*;
use wgllm::kernels::elementwise;
use wgllm::BufferClass::Activations;

#[test]
fn add_matches_reference_on_awkward_lengths() {
    let Some(gpu) = gpu() else { return };
    for n in [1usize, 255, 257, 100_003] {
        let a = randn(n, 1, 1.0);
        let b = randn(n, 2, 1.0);
        let ta = gpu.tensor_from("a", Activations, &[n], &a).unwrap();
        let tb = gpu.tensor_from("b", Activations, &[n], &b).unwrap();
        let out = gpu.tensor("out", Activations, &[n]).unwrap();
        let mut rec = gpu.recorder();
        elementwise::add(&mut rec, &ta, &tb, &out).unwrap();
        rec.submit().unwrap();
        assert_close(
            &format!("add n={n}"),
            &gpu.read(&out).unwrap(),
            &elementwise::add_reference(&a, &b),
            tol::NMSE_F32,
        );
    }
}

#[test]
fn add_rejects_mismatched_shapes_before_dispatch() {
    let Some(gpu) = gpu() else { return };
    let a = gpu.tensor("a", Activations, &[4]).unwrap();
    let b = gpu.tensor("b", Activations, &[5]).unwrap();
    let mut rec = gpu.recorder();
    let e = elementwise::add(&mut rec, &a, &b, &a).unwrap_err();
    assert!(matches!(e, wgllm::Error::ShapeMismatch { .. }), "{e}");
    assert!(rec.is_empty());
}
