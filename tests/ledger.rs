//! The VRAM ledger on a real device: every buffer goes through it, its report matches what was
//! allocated, and an over-budget request is refused with the typed error before the driver is asked.
mod common;
use common::*;
use wgllm::gpu::ledger::BufferClass;
use wgllm::{Error, Gpu, GpuOptions};

#[test]
fn report_matches_allocations_and_budget_is_enforced() {
    if gpu().is_none() {
        return;
    }
    // A device of our own, so other tests' buffers don't show in its ledger.
    let gpu = Gpu::new(&GpuOptions {
        budget: Some(10 << 20),
        ..Default::default()
    })
    .expect("device");
    let w = gpu.alloc("w", BufferClass::Parameters, 4 << 20).unwrap();
    let kv = gpu.alloc("kv", BufferClass::KvCache, 2 << 20).unwrap();
    let act = gpu
        .tensor("act", BufferClass::Activations, &[1000])
        .unwrap();
    let r = gpu.ledger.report();
    assert_eq!(r.class(BufferClass::Parameters).current_bytes, w.size());
    assert_eq!(r.class(BufferClass::KvCache).current_bytes, kv.size());
    assert_eq!(r.class(BufferClass::Activations).current_bytes, 4000);
    assert_eq!(r.current_total_bytes, w.size() + kv.size() + 4000);

    // 4 + 2 MiB + 4000 B in use; 5 MiB more would pass the 10 MiB budget.
    let e = gpu
        .alloc("too-big", BufferClass::Activations, 5 << 20)
        .unwrap_err();
    match &e {
        Error::VramBudget {
            label,
            class,
            requested,
            in_use,
            budget,
            usage,
            ..
        } => {
            assert_eq!(label, "too-big");
            assert_eq!(*class, BufferClass::Activations);
            assert_eq!(*requested, 5 << 20);
            assert_eq!(*in_use, r.current_total_bytes);
            assert_eq!(*budget, 10 << 20);
            assert_eq!(usage.parameters, 4 << 20);
        }
        other => panic!("expected VramBudget, got {other}"),
    }
    let msg = e.to_string();
    assert!(
        msg.contains("too-big") && msg.contains("activations") && msg.contains("parameters"),
        "{msg}"
    );
    // Nothing was booked for the refused request.
    assert_eq!(
        gpu.ledger.report().current_total_bytes,
        r.current_total_bytes
    );

    // An upload books staging while it runs and returns it afterwards.
    let up = gpu
        .upload("up", BufferClass::Parameters, &vec![1u8; 1 << 20])
        .unwrap();
    let r2 = gpu.ledger.report();
    assert_eq!(r2.class(BufferClass::Staging).current_bytes, 0);
    assert!(r2.class(BufferClass::Staging).peak_bytes >= 1 << 20);
    drop((w, kv, act, up));
    assert_eq!(
        gpu.ledger
            .report()
            .class(BufferClass::Parameters)
            .current_bytes,
        0
    );
    assert_eq!(
        gpu.ledger
            .report()
            .class(BufferClass::KvCache)
            .current_bytes,
        0
    );
}

#[test]
fn selftest_passes_on_this_device() {
    let Some(gpu) = gpu() else { return };
    let checks = wgllm::selftest::run(gpu, &mut |_| {});
    assert!(checks.len() >= 30, "{} checks", checks.len());
    let failed: Vec<String> = checks
        .iter()
        .filter(|c| !c.passed)
        .map(|c| format!("{} ({:?}, nmse {:e})", c.name, c.error, c.nmse))
        .collect();
    assert!(failed.is_empty(), "failed: {failed:?}");
}

#[test]
fn validation_errors_come_back_as_errors() {
    let Some(gpu) = gpu() else { return };
    // A kernel entry point that does not exist fails pipeline creation inside an error scope.
    let e = gpu
        .kernel(
            "elementwise",
            "no_such_entry",
            &[wgllm::gpu::Bind::Input],
            16,
            &[],
        )
        .unwrap_err();
    assert!(matches!(e, Error::Gpu { .. }), "{e}");
    let e = gpu
        .kernel("no_such_shader", "main", &[], 16, &[])
        .unwrap_err();
    assert!(matches!(e, Error::UnknownShader(_)), "{e}");
}
