//! The code behind wgllm's fuzz targets, shared with the stable regression test
//! (`tests/fuzz_regressions.rs` includes `entries.rs` and `alloc.rs` by path and replays every
//! committed case through the same functions).

pub mod alloc;
pub mod entries;
pub mod structured;
