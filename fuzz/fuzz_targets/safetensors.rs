//! A Hugging Face directory as bytes: `config.json`, 0xFF, `model.safetensors`
//! (`entries::safetensors`), within the allocation bound of `alloc::allowed`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wgllm_fuzz::{alloc, entries};

#[global_allocator]
static ALLOC: alloc::Counting = alloc::Counting;

fuzz_target!(|data: &[u8]| {
    let (_, peak) = alloc::peak_of(|| entries::safetensors(data));
    if let Err(e) = alloc::within_bound("safetensors", data.len(), peak) {
        panic!("{e}");
    }
});
