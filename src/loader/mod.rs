//! Model file loaders: GGUF files ([`gguf`]) and Hugging Face safetensors directories
//! ([`safetensors`]). Files are memory-mapped and every read is checked against the file's length,
//! so a truncated or hostile file gives a typed [`Error`] naming the file (and tensor), never a
//! panic or a huge allocation. No GPU types appear here: loaders hand out raw bytes and f32 vectors;
//! uploading is the caller's business.
//!
//! This module also holds what both formats share: the file backing and the 16-bit float
//! conversions.

pub mod gguf;
pub mod safetensors;
mod upload;
mod value;

use std::ops::Deref;
use std::path::Path;

use half::{bf16, f16};

use crate::error::{Error, Result};

pub use self::gguf::{weight_format, GgmlType, Gguf, TensorInfo};
pub use self::safetensors::HfModel;
pub use self::upload::convert_rows;
pub use self::value::{Array, Value};

/// The bytes of a model file: a read-only memory map, or an owned buffer (files built in memory,
/// tests).
pub(crate) enum Backing {
    Mapped(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl Deref for Backing {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Backing::Mapped(m) => m,
            Backing::Owned(v) => v,
        }
    }
}

/// Memory-maps `path` read-only.
pub(crate) fn map_file(path: &Path) -> Result<Backing> {
    let io = |source| Error::Io {
        path: path.display().to_string(),
        source,
    };
    let file = std::fs::File::open(path).map_err(io)?;
    if file.metadata().map_err(io)?.len() == 0 {
        // Nothing to map; the parsers report the empty file as truncated.
        return Ok(Backing::Owned(Vec::new()));
    }
    // SAFETY: the map is read-only and private to this process. Another process truncating or
    // rewriting the model file while it is mapped is outside what this library can defend against
    // (as for every mmap-based loader); the parsers only ever index within the length checked here.
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
    Ok(Backing::Mapped(map))
}

/// Little-endian f16 bytes to f32 (a trailing odd byte is ignored; callers check lengths).
pub fn f16_bytes_to_f32(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(2)
        .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
        .collect()
}

/// Little-endian bf16 bytes to f32 (exact: bf16 is the top half of an f32).
pub fn bf16_bytes_to_f32(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(2)
        .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
        .collect()
}

/// Little-endian f32 bytes to f32 (the data may sit at any alignment in the file).
pub fn f32_bytes_to_f32(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// `[a, b, c]` for error messages.
pub(crate) fn shape_string(shape: &[usize]) -> String {
    format!("{shape:?}")
}
