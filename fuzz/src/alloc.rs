//! A counting global allocator: the peak of live heap bytes that one call allocates on the
//! calling thread, above what was live when it started. The file readers must never size an
//! allocation from a count in a file before the bytes behind it exist, so their peak is bounded by
//! a multiple of the input; the targets and the regression test assert [`within_bound`].
//!
//! Counted per thread, so that tests running in parallel do not see each other's allocations
//! (memory freed on another thread than the one that allocated it makes the count low, never
//! high).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

pub struct Counting;

thread_local! {
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

fn add(delta: isize) {
    // try_with: the thread's slots may be gone while it exits.
    let _ = LIVE.try_with(|live| {
        let now = live.get() + delta;
        live.set(now);
        let _ = PEAK.try_with(|peak| peak.set(peak.get().max(now)));
    });
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc(layout);
        if !p.is_null() {
            add(layout.size() as isize);
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc_zeroed(layout);
        if !p.is_null() {
            add(layout.size() as isize);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout);
        add(-(layout.size() as isize));
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = System.realloc(ptr, layout, new_size);
        if !p.is_null() {
            add(new_size as isize - layout.size() as isize);
        }
        p
    }
}

/// Runs `f` and returns its result and the peak of heap bytes it held live on this thread at once.
pub fn peak_of<R>(f: impl FnOnce() -> R) -> (R, usize) {
    let base = LIVE.with(Cell::get);
    PEAK.with(|p| p.set(base));
    let r = f();
    let peak = PEAK.with(Cell::get);
    (r, (peak - base).max(0) as usize)
}

/// Bytes an input of `input` bytes may make a reader hold at once: a fixed allowance for the
/// tables every open builds (hash maps, the BPE pre-tokenizer's regexes, error messages), plus a
/// multiple of the input. The multiple covers decoding: the densest format wgllm decodes is
/// IQ2_XXS, 256 weights in 66 bytes, 15.5 f32 bytes per file byte; a vocabulary's tokens become
/// `String`s and hash-map entries, under 64 bytes apiece for at least 8 bytes of file each.
pub fn allowed(input: usize) -> usize {
    FIXED_ALLOWANCE + PER_INPUT_BYTE * input
}
pub const FIXED_ALLOWANCE: usize = 16 << 20;
pub const PER_INPUT_BYTE: usize = 32;

/// Fails with the figures when `peak` is past [`allowed`] for `input` bytes.
pub fn within_bound(what: &str, input: usize, peak: usize) -> Result<(), String> {
    if peak > allowed(input) {
        return Err(format!(
            "{what}: {peak} bytes allocated at once for an input of {input} bytes (allowed: {})",
            allowed(input)
        ));
    }
    Ok(())
}
