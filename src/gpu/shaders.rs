//! The shader registry: every `shaders/*.wgsl` file, embedded at build time by `build.rs`.

include!(concat!(env!("OUT_DIR"), "/shaders.rs"));

use crate::error::{Error, Result};

/// The WGSL source of `shaders/<name>.wgsl`, with its includes resolved.
pub fn source(name: &str) -> Result<&'static str> {
    SHADERS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, s)| *s)
        .ok_or_else(|| Error::UnknownShader(name.to_string()))
}

/// The shader module of `src`, one of the registry's sources, created with wgpu's runtime checks
/// less loop bounding.
///
/// wgpu's default (`ShaderRuntimeChecks::checked`) makes every loop count its iterations in a
/// 64-bit counter and break out at 2^64 (`force_loop_bounding`), so that a driver may not treat an
/// endless loop as unreachable and draw unsound conclusions from it. That is a guard against
/// untrusted shaders; every loop in `shaders/` is bounded by construction, a `for` that compares
/// its variable with a bound and steps it towards the bound by a constant, or by a step the loop
/// itself shows is non-zero, with no other write to it (`tests/shaders_portability.rs` checks each
/// loop against that form and refuses `loop` and `while`). So the counter is dropped: it costs
/// registers and a compare and branch in every inner loop. Bounds checks on buffer and texture
/// accesses, and the guards on integer division, stay on.
pub(crate) fn create_module(device: &wgpu::Device, label: &str, src: &str) -> wgpu::ShaderModule {
    let checks = wgpu::ShaderRuntimeChecks {
        force_loop_bounding: false,
        ..wgpu::ShaderRuntimeChecks::checked()
    };
    let desc = wgpu::ShaderModuleDescriptor {
        label: Some(label),
        source: wgpu::ShaderSource::Wgsl(src.into()),
    };
    // SAFETY: the one obligation of `force_loop_bounding: false` is that the shader has no endless
    // loop. `src` comes from the registry (the project's own shaders, embedded at build time),
    // whose loops all terminate, as above; every other check keeps its default.
    unsafe { device.create_shader_module_trusted(desc, checks) }
}
