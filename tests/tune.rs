//! The tuner: probe plans past the cache bound for every format and class; choices measured on a
//! (here tiny) probe, cached per (format, class) under the device's key and read back without
//! measuring again, with no choice leaking to another pair; older cache files read; the ledger back
//! to its bytes after a probe and a probe cut (or refused) by the budget; every candidate shape
//! agreeing with the CPU reference. No timing is asserted: only that the choice is the fastest of
//! what was measured.
mod common;
use std::collections::BTreeMap;

use common::*;
use wgllm::gpu::{BufferClass, WeightLayout};
use wgllm::kernels::matmul::{self, MatvecKernel};
use wgllm::kernels::tune::{
    self, ClassTuning, DeviceTuning, LayoutChoice, MatvecChoice, ProbePlan, ShapeClass, LLC_BOUND,
    SMALL_MAX_BYTES,
};
use wgllm::quant::WeightFormat;
use wgllm::{Gpu, GpuOptions};

/// A probe small enough for CI: `copies` 32 x 256 matrices (256 columns: whole k-quant blocks).
fn tiny(format: WeightFormat, class: ShapeClass, copies: usize) -> ProbePlan {
    ProbePlan {
        format,
        class,
        rows: 32,
        cols: 256,
        copies,
    }
}

fn read(file: &std::path::Path) -> BTreeMap<String, DeviceTuning> {
    serde_json::from_slice(&std::fs::read(file).unwrap()).unwrap()
}

#[test]
fn probe_plans_exceed_the_cache_bound_in_every_format_and_class() {
    for f in WeightFormat::ALL {
        for c in ShapeClass::ALL {
            let p = ProbePlan::new(f, c);
            assert!(p.bytes() >= LLC_BOUND, "{p:?}: {} bytes", p.bytes());
            // Not more copies than needed: one fewer would be under the bound.
            assert!(p.bytes() - p.matrix_bytes() < LLC_BOUND, "{p:?}");
            // The probe's matrix is of the class it stands for.
            assert_eq!(ShapeClass::of(f, p.rows, p.cols), c, "{p:?}");
        }
    }
    // The classes of real matrices: SmolLM2's 576 x 1536, LLaMA-7B's FFN at f16 and Q4.
    use WeightFormat::*;
    assert_eq!(ShapeClass::of(Q4_1, 576, 1536), ShapeClass::Small);
    assert_eq!(ShapeClass::of(F16, 11008, 4096), ShapeClass::Tall);
    assert_eq!(ShapeClass::of(Q4_0, 4096, 11008), ShapeClass::Wide);
    assert_eq!(ShapeClass::of(Q4_0, 13824, 5120), ShapeClass::Tall);
    let edge = (SMALL_MAX_BYTES / 4) as usize;
    assert_eq!(ShapeClass::of(F32, edge / 1024, 1024), ShapeClass::Tall);
    assert_eq!(
        ShapeClass::of(F32, edge / 1024 - 1, 1024),
        ShapeClass::Small
    );
}

#[test]
fn choices_are_measured_once_and_cached_per_format_and_class() {
    let Some(gpu) = gpu() else { return };
    // This test binary is its own process, and this is its only test on the cache file: pointing
    // the cache elsewhere touches no other test.
    let dir = std::env::temp_dir().join(format!("wgllm-tune-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::env::set_var("WGLLM_CACHE", &dir);
    let file = dir.join("tuning.json");
    let key = tune::device_key(gpu);

    // An older version's entry (one choice per device, no classes) stays readable and is kept.
    let old = format!(
        r#"{{"{key}": {{"layout": {{"layout": "textures", "buffers_us": 2.0, "textures_us": 1.0}},
            "matvec": {{"rows": 8, "threads": 128, "us": [[8, 128, 1.0]]}}}}}}"#
    );
    std::fs::write(&file, old).unwrap();
    let before = tune::read_cache();
    assert!(before[&key].classes.is_empty() && before[&key].layout.is_some());

    // The workgroup matvec's shapes on a tiny Q4_0 probe: every candidate timed (or dropped after
    // being timed), the fastest kept, cached under q4_0/small only.
    let small = tiny(WeightFormat::Q4_0, ShapeClass::Small, 4);
    let mv = tune::matvec_choice_with(gpu, &small).unwrap();
    let ours: Vec<(u32, u32)> = mv.us.iter().map(|&(r, t, _)| (r, t)).collect();
    assert_eq!(ours, tune::matvec_candidates(), "{mv:?}");
    assert!(mv.us.iter().all(|&(_, _, us)| us > 0.0), "{mv:?}");
    let best = mv.us.iter().min_by(|a, b| a.2.total_cmp(&b.2)).unwrap();
    assert_eq!((mv.rows, mv.threads), (best.0, best.1));
    assert_eq!(mv.probe, Some(small));
    let all = read(&file);
    let entry = &all[&key];
    assert_eq!(entry.classes.keys().collect::<Vec<_>>(), ["q4_0/small"]);
    assert_eq!(entry.classes["q4_0/small"].matvec.as_ref(), Some(&mv));
    assert!(
        entry.layout.is_some() && entry.matvec.is_some(),
        "old entry dropped"
    );

    // The layout on a tiny Q8_0 wide probe, beside it.
    let wide = tiny(WeightFormat::Q8_0, ShapeClass::Wide, 3);
    let lay = tune::layout_choice_with(gpu, &wide).unwrap();
    assert!(lay.buffers_us > 0.0 && lay.textures_us > 0.0, "{lay:?}");
    let faster = if lay.textures_us < 0.9 * lay.buffers_us {
        WeightLayout::Textures
    } else {
        WeightLayout::Buffers
    };
    assert_eq!(lay.layout, faster, "{lay:?}");
    let all = read(&file);
    assert_eq!(all[&key].classes["q8_0/wide"].layout.as_ref(), Some(&lay));
    assert_eq!(all[&key].classes["q8_0/wide"].matvec, None);
    assert_eq!(all[&key].classes["q4_0/small"].layout, None);

    // Cached entries are taken as they are (these could not come from a measurement), each for
    // its own pair: every pair below gets its own planted shape back, through the device's lookup
    // as well.
    let planted = |rows, threads| MatvecChoice {
        rows,
        threads,
        us: vec![(rows, threads, 1.0)],
        probe: None,
        probe_ms: 0.0,
    };
    let pairs = [
        (WeightFormat::Q4_0, ShapeClass::Small, planted(4, 256)),
        (WeightFormat::Q4_0, ShapeClass::Tall, planted(8, 128)),
        (WeightFormat::Q4_0, ShapeClass::Wide, planted(8, 64)),
        (WeightFormat::F16, ShapeClass::Tall, planted(4, 64)),
    ];
    let mut all = all;
    for (f, c, p) in &pairs {
        let e = all.get_mut(&key).unwrap();
        e.classes.entry(tune::class_key(*f, *c)).or_default().matvec = Some(p.clone());
    }
    std::fs::write(&file, serde_json::to_vec(&all).unwrap()).unwrap();
    for (f, c, p) in &pairs {
        let plan = tiny(*f, *c, 2);
        assert_eq!(
            &tune::matvec_choice_with(gpu, &plan).unwrap(),
            p,
            "{f} {c:?}"
        );
        assert_eq!(tune::matvec_shape_for(gpu, *f, *c), (p.rows, p.threads));
    }
    // A pair with nothing cached is measured, not given a neighbour's choice.
    let q8 = tune::matvec_choice_with(gpu, &tiny(WeightFormat::Q8_0, ShapeClass::Tall, 2)).unwrap();
    assert_eq!(q8.us.len(), tune::matvec_candidates().len(), "{q8:?}");
    let all = read(&file);
    assert_eq!(all[&key].classes["q8_0/tall"].matvec.as_ref(), Some(&q8));
    assert_eq!(all[&key].classes["q8_0/wide"].layout.as_ref(), Some(&lay));

    // The whole file round-trips.
    let text = serde_json::to_string(&all).unwrap();
    assert_eq!(
        serde_json::from_str::<BTreeMap<String, DeviceTuning>>(&text).unwrap(),
        all
    );

    // A corrupt file is measured over and rewritten.
    std::fs::write(&file, b"{ not json").unwrap();
    let again = tune::layout_choice_with(gpu, &wide).unwrap();
    assert!(again.buffers_us > 0.0, "{again:?}");
    let all = read(&file);
    assert_eq!(
        all[&key].classes["q8_0/wide"],
        ClassTuning {
            matvec: None,
            layout: Some(again)
        }
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_probe_gives_its_bytes_back_and_stays_in_the_budget() {
    let Some(shared) = gpu() else { return };
    let opts = GpuOptions {
        adapter: None,
        budget: None,
        no_f16: false,
        no_subgroups: false,
        storage_x: false,
    };
    // A device of its own, whose budget no other test sees.
    let gpu = Gpu::new(&opts).unwrap();
    assert_eq!(gpu.info.name, shared.info.name);
    // 160 KiB matrices: large enough beside the input and output vectors for the budget below.
    let plan = ProbePlan {
        rows: 256,
        cols: 1024,
        ..tiny(WeightFormat::Q4_1, ShapeClass::Tall, 6)
    };
    let before = gpu.ledger.report();
    let mv = tune::measure_matvec(&gpu, &plan).unwrap();
    assert_eq!(mv.probe, Some(plan));
    // The copies were booked while alive (in buffers, the matvec's layout).
    let mid = gpu.ledger.report();
    let params = mid.class(BufferClass::Parameters).peak_bytes;
    assert!(params >= plan.bytes(), "{params} < {}", plan.bytes());
    let one = params / plan.copies as u64;
    let lay = tune::measure_layouts(&gpu, &plan).unwrap();
    assert_eq!(lay.probe, Some(plan));
    let after = gpu.ledger.report();
    for c in BufferClass::ALL {
        assert_eq!(
            after.class(c).current_bytes,
            before.class(c).current_bytes,
            "{c}"
        );
    }

    // Under a budget with room for about two copies the probe shrinks to fit, and stays within.
    let base = gpu.ledger.report().current_total_bytes;
    // The vectors, and room for the kernel parameters of a submission.
    let x_y = 4 * (plan.rows + plan.cols) as u64 + (16 << 10);
    let budget = base + x_y + 4 * one;
    gpu.ledger.set_budget(Some(budget));
    gpu.ledger.reset_peaks();
    let cut = tune::measure_matvec(&gpu, &plan).unwrap();
    let copies = cut.probe.unwrap().copies;
    assert!((1..plan.copies).contains(&copies), "{cut:?}");
    assert!(gpu.ledger.report().peak_total_bytes <= budget);
    assert_eq!(gpu.ledger.report().current_total_bytes, base);

    // No room for one copy: an error (the lookup then keeps the default), nothing left booked.
    gpu.ledger.set_budget(Some(base + x_y));
    assert!(tune::measure_matvec(&gpu, &plan).is_err());
    assert!(tune::measure_layouts(&gpu, &plan).is_err());
    assert_eq!(gpu.ledger.report().current_total_bytes, base);
}

#[test]
fn every_probed_shape_agrees_with_the_reference() {
    let Some(gpu) = gpu() else { return };
    // kernels_matmul runs the candidates in F16 and Q4_1; here two more block formats.
    for (i, f) in [WeightFormat::Q4_0, WeightFormat::Q6_K]
        .into_iter()
        .enumerate()
    {
        let (rows, cols) = (45, 512);
        let gguf = wgllm::quant::synthetic(f, rows * cols, 3 + i as u64).unwrap();
        let deq = wgllm::quant::dequantize(f, &gguf, rows * cols).unwrap();
        let storage = wgllm::kernels::weights::WeightStorage::buffers(gpu.max_binding());
        let w = gpu
            .upload_weights_as("w", f, rows, cols, &gguf, storage)
            .unwrap();
        let xs = randn(cols, 9, 1.0);
        let want = matmul::reference(&deq, rows, cols, &xs, 1);
        let x = gpu
            .tensor_from("x", BufferClass::Activations, &[cols], &xs)
            .unwrap();
        let y = gpu.tensor("y", BufferClass::Activations, &[rows]).unwrap();
        for (r, t) in tune::matvec_candidates() {
            let mut rec = gpu.recorder();
            let k = Some(MatvecKernel::Workgroup {
                rows: r,
                threads: t,
            });
            matmul::matvec_with(&mut rec, &w, &x, &y, k).unwrap();
            rec.submit().unwrap();
            let err = nmse(&gpu.read(&y).unwrap(), &want);
            assert!(err < 1e-8, "{f} {r} x {t}: nmse {err}");
        }
    }
}

#[test]
fn old_layout_entries_are_not_taken_for_a_class() {
    // The device-wide choice of the older versions was measured on a cache-resident probe; it
    // parses, but as no (format, class)'s choice.
    let old = r#"{"layout": {"layout": "textures", "buffers_us": 2.0, "textures_us": 1.0}}"#;
    let t: DeviceTuning = serde_json::from_str(old).unwrap();
    assert!(t.classes.is_empty());
    assert_eq!(
        t.layout,
        Some(LayoutChoice {
            layout: WeightLayout::Textures,
            buffers_us: 2.0,
            textures_us: 1.0,
            probe: None,
            probe_ms: 0.0
        })
    );
}
