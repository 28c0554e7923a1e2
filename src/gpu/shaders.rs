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
