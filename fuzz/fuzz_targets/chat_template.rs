//! Hostile chat templates and messages (`entries::chat_template`): a render ends, within its
//! limits, as text or a typed error.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wgllm_fuzz::entries;

fuzz_target!(|data: &[u8]| {
    let _ = entries::chat_template(data);
});
