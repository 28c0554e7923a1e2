//! Every WGSL kernel is validated by naga without a device and translated to SPIR-V (Vulkan), MSL
//! (Metal) and HLSL (DX12), so portability is checked even where no such GPU is at hand. Kernels
//! whose name has an `_sg` part (`matvec_sg`, `matvec_sg_tex`) are the subgroup variants, which
//! the host only picks where the device has subgroups: they are validated with that capability
//! (and f16-in-f32) instead of none.

use naga::valid::{Capabilities, ValidationFlags, Validator};
use wgllm::gpu::shaders::SHADERS;

fn translate(name: &str, src: &str) -> Result<(), String> {
    let module = naga::front::wgsl::parse_str(src)
        .map_err(|e| format!("parse: {}", e.emit_to_string(src)))?;
    // Validate as a WebGPU device without optional features would: no f16, no subgroups. Only
    // `unpack2x16float`/`pack2x16float` need a capability in naga's terms, and every WebGPU-compliant
    // device has it (wgpu's downlevel flag SHADER_F16_IN_F32). Subgroup variants get SUBGROUP too,
    // and nothing else.
    let subgroups = name.split('_').any(|part| part == "sg");
    let (caps, what) = if subgroups {
        (
            Capabilities::SHADER_FLOAT16_IN_FLOAT32 | Capabilities::SUBGROUP,
            "subgroups only",
        )
    } else {
        (
            Capabilities::SHADER_FLOAT16_IN_FLOAT32,
            "no optional capabilities",
        )
    };
    let info = Validator::new(ValidationFlags::all(), caps)
        .validate(&module)
        .map_err(|e| format!("validate ({what}): {}", e.emit_to_string(src)))?;
    let (module, info) = naga::back::pipeline_constants::process_overrides(
        &module,
        &info,
        None,
        &naga::back::PipelineConstants::default(),
    )
    .map_err(|e| format!("overrides: {e}"))?;
    if module.entry_points.is_empty() {
        return Err("no entry points".into());
    }
    naga::back::spv::write_vec(&module, &info, &naga::back::spv::Options::default(), None)
        .map_err(|e| format!("SPIR-V: {e}"))?;
    // MSL 2.3 (macOS 11, iOS 14) is what wgpu targets on current Apple GPUs.
    let msl_opts = naga::back::msl::Options {
        lang_version: (2, 3),
        fake_missing_bindings: true,
        ..Default::default()
    };
    naga::back::msl::write_string(
        &module,
        &info,
        &msl_opts,
        &naga::back::msl::PipelineOptions::default(),
    )
    .map_err(|e| format!("MSL: {e}"))?;
    // Subgroup operations become wave intrinsics, which exist from shader model 6.0 on (naga's
    // writer does not check the model, DXC does), and wgpu enables SUBGROUP on DX12 only there.
    let hlsl_opts = naga::back::hlsl::Options {
        fake_missing_bindings: true,
        shader_model: if subgroups {
            naga::back::hlsl::ShaderModel::V6_0
        } else {
            naga::back::hlsl::Options::default().shader_model
        },
        ..Default::default()
    };
    let pipe = naga::back::hlsl::PipelineOptions { entry_point: None };
    let mut out = String::new();
    naga::back::hlsl::Writer::new(&mut out, &hlsl_opts, &pipe)
        .write(&module, &info, None)
        .map_err(|e| format!("HLSL: {e}"))?;
    Ok(())
}

#[test]
fn every_shader_validates_and_translates_to_spirv_msl_hlsl() {
    assert!(!SHADERS.is_empty(), "no shaders embedded");
    let failures: Vec<String> = SHADERS
        .iter()
        .filter_map(|(name, src)| {
            translate(name, src)
                .err()
                .map(|e| format!("{name}.wgsl: {e}"))
        })
        .collect();
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn the_registry_holds_every_file_in_shaders_dir() {
    let on_disk: Vec<String> = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/shaders"))
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "wgsl"))
        .map(|p| p.file_stem().unwrap().to_string_lossy().into_owned())
        .collect();
    for n in &on_disk {
        assert!(SHADERS.iter().any(|(s, _)| s == n), "{n}.wgsl not embedded");
    }
}
