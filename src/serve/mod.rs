//! `wgllm serve` and `wgllm chat`: an engine thread that owns the model and batches requests
//! ([`engine`]), the encoder for embeddings on its own worker ([`embed`]), and an OpenAI-compatible
//! HTTP layer on axum ([`http`], request and response bodies in [`api`]).

pub mod api;
pub mod embed;
pub mod engine;
pub mod http;

pub use engine::{
    DeviceRef, DeviceSource, Engine, EngineOptions, Event, FinishReason, GenParams, GenRequest,
    GpuHandle, SharedDevice, SubmitError, Usage,
};
