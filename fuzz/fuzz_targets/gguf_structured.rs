//! GGUF files built from a recipe (`structured::gguf_from_recipe`: valid layout, mutated counts,
//! lengths, types, offsets and dimensions), then the same reading as the `gguf` target, within the
//! same allocation bound. A finding's GGUF bytes are what the regression test replays (written by
//! `WGLLM_FUZZ_WRITE=path cargo fuzz run gguf_structured <artifact>`).
#![no_main]

use arbitrary::Unstructured;
use libfuzzer_sys::fuzz_target;
use wgllm_fuzz::{alloc, entries, structured};

#[global_allocator]
static ALLOC: alloc::Counting = alloc::Counting;

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let Ok(file) = structured::gguf_from_recipe(&mut u) else {
        return;
    };
    if let Some(path) = std::env::var_os("WGLLM_FUZZ_WRITE") {
        std::fs::write(path, &file).expect("write the GGUF of the recipe");
    }
    let (_, peak) = alloc::peak_of(|| entries::gguf(&file));
    if let Err(e) = alloc::within_bound("gguf_structured", file.len(), peak) {
        panic!("{e}");
    }
});
