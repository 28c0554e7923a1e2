//! wgllm: a GPU compute-shader inference runtime for transformer language models, on wgpu.
//!
//! Layers, from the bottom: [`gpu`] (device, VRAM ledger, kernels and recording), [`quant`] (block
//! formats and CPU quantisation), [`kernels`] (one module per WGSL kernel family, each with its CPU
//! reference).

pub mod bench;
pub mod error;
pub mod fetch;
pub mod gpu;
pub mod kernels;
pub mod loader;
pub mod model;
pub mod plan;
pub mod quant;
pub mod sampler;
pub mod selftest;
pub mod serve;
pub mod stats;
pub mod tokenizer;

pub use error::{Error, Result};
pub use gpu::{BufferClass, Gpu, GpuOptions};
