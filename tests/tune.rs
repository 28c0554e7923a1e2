//! The per-device choices (weight layout; rows and threads per workgroup of the workgroup
//! matvec): measured once, cached under the device's key, read back from the cache without
//! measuring again, and remeasured (no panic) over a corrupt cache file.
mod common;
use common::*;
use wgllm::gpu::WeightLayout;
use wgllm::kernels::tune::{self, DeviceTuning, LayoutChoice, MatvecChoice};

#[test]
fn layout_choice_is_measured_once_and_cached_per_device() {
    let Some(gpu) = gpu() else { return };
    // This test binary is its own process: pointing the cache elsewhere touches no other test.
    let dir = std::env::temp_dir().join(format!("wgllm-tune-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::env::set_var("WGLLM_CACHE", &dir);
    let file = dir.join("tuning.json");

    let measured = tune::weight_layout_choice(gpu).unwrap();
    assert!(
        measured.buffers_us > 0.0 && measured.textures_us > 0.0,
        "{measured:?}"
    );
    let faster = if measured.textures_us < 0.9 * measured.buffers_us {
        WeightLayout::Textures
    } else {
        WeightLayout::Buffers
    };
    assert_eq!(measured.layout, faster, "{measured:?}");
    let cached: std::collections::BTreeMap<String, DeviceTuning> =
        serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    let entry = cached.get(&tune::device_key(gpu)).unwrap();
    assert_eq!(entry.layout.as_ref(), Some(&measured));

    // A cached entry is taken as it is: this one could not come from a measurement.
    let planted = LayoutChoice {
        layout: WeightLayout::Buffers,
        buffers_us: 1.0,
        textures_us: 1e9,
    };
    let mut all = cached;
    all.get_mut(&tune::device_key(gpu)).unwrap().layout = Some(planted.clone());
    std::fs::write(&file, serde_json::to_vec(&all).unwrap()).unwrap();
    assert_eq!(tune::weight_layout_choice(gpu).unwrap(), planted);

    // The matvec's rows and threads per workgroup: every shape the kernel takes timed, the
    // fastest taken, cached in the same entry beside the layout.
    let mv = tune::matvec_choice(gpu).unwrap();
    use wgllm::kernels::matmul::{MATVEC_PART, MATVEC_ROWS, MATVEC_THREADS};
    let want: Vec<(u32, u32)> = MATVEC_ROWS
        .iter()
        .flat_map(|&r| MATVEC_THREADS.iter().map(move |&t| (r, t)))
        .filter(|&(r, t)| r * t <= MATVEC_PART)
        .collect();
    let ours: Vec<(u32, u32)> = mv.us.iter().map(|&(r, t, _)| (r, t)).collect();
    assert_eq!(ours, want, "{mv:?}");
    assert!(mv.us.iter().all(|&(_, _, us)| us > 0.0), "{mv:?}");
    let best = mv.us.iter().min_by(|a, b| a.2.total_cmp(&b.2)).unwrap();
    assert_eq!((mv.rows, mv.threads), (best.0, best.1));
    let all: std::collections::BTreeMap<String, DeviceTuning> =
        serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    let entry = &all[&tune::device_key(gpu)];
    assert_eq!(entry.layout.as_ref(), Some(&planted));
    assert_eq!(entry.matvec.as_ref(), Some(&mv));
    let planted_mv = MatvecChoice {
        rows: 8,
        threads: 128,
        us: vec![(8, 128, 1.0)],
    };
    let mut all = all;
    all.get_mut(&tune::device_key(gpu)).unwrap().matvec = Some(planted_mv.clone());
    std::fs::write(&file, serde_json::to_vec(&all).unwrap()).unwrap();
    assert_eq!(tune::matvec_choice(gpu).unwrap(), planted_mv);

    // A corrupt file is measured over and rewritten.
    std::fs::write(&file, b"{ not json").unwrap();
    let again = tune::weight_layout_choice(gpu).unwrap();
    assert!(
        again.buffers_us > 1.0 && again.textures_us < 1e9,
        "{again:?}"
    );
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(text.contains(&tune::device_key(gpu)), "{text}");
    let _ = std::fs::remove_dir_all(&dir);
}
