//! The per-device weight-layout choice: measured once, cached under the device's key, read back
//! from the cache without measuring again, and remeasured (no panic) over a corrupt cache file.
mod common;
use common::*;
use wgllm::gpu::WeightLayout;
use wgllm::kernels::tune::{self, LayoutChoice};

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
    let cached: std::collections::BTreeMap<String, LayoutChoice> =
        serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    assert_eq!(cached.get(&tune::device_key(gpu)), Some(&measured));

    // A cached entry is taken as it is: this one could not come from a measurement.
    let planted = LayoutChoice {
        layout: WeightLayout::Buffers,
        buffers_us: 1.0,
        textures_us: 1e9,
    };
    let mut all = cached;
    all.insert(tune::device_key(gpu), planted.clone());
    std::fs::write(&file, serde_json::to_vec(&all).unwrap()).unwrap();
    assert_eq!(tune::weight_layout_choice(gpu).unwrap(), planted);

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
