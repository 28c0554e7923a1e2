//! GGUF files as bytes: parsed, then read as loading, planning and tokenizing do
//! (`entries::gguf`), within the allocation bound of `alloc::allowed`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wgllm_fuzz::{alloc, entries};

#[global_allocator]
static ALLOC: alloc::Counting = alloc::Counting;

fuzz_target!(|data: &[u8]| {
    let (_, peak) = alloc::peak_of(|| entries::gguf(data));
    if let Err(e) = alloc::within_bound("gguf", data.len(), peak) {
        panic!("{e}");
    }
});
