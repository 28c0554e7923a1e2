//! Several sequences in one model: sequence slots, each with its own KV cache, and decode steps
//! that take one token of several slots in one forward pass (continuous batching, `wgllm serve`).

use crate::error::Result;
use crate::gpu::Gpu;
use crate::model::generate::CausalLm;

/// One row of a batched decode step: token `token` of slot `slot`, at position `pos` of that
/// slot's sequence (its cache holds positions `0..pos`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchRow {
    pub slot: usize,
    pub token: u32,
    pub pos: usize,
}

/// A causal language model with [`BatchLm::slots`] sequence slots.
pub trait BatchLm: CausalLm {
    /// Sequence slots, each with its own KV cache of [`CausalLm::context`] positions.
    fn slots(&self) -> usize;
    /// Runs `tokens` of slot `slot` at positions `pos0..` (a prompt, in chunks, or one token) and
    /// returns the logits of the last token. Other slots' caches are untouched.
    fn forward_slot(
        &mut self,
        gpu: &Gpu,
        slot: usize,
        tokens: &[u32],
        pos0: usize,
    ) -> Result<Vec<f32>>;
    /// One decode step of several distinct slots; returns each row's logits (`[vocab]`), in the
    /// order of `rows`.
    fn decode_batch(&mut self, gpu: &Gpu, rows: &[BatchRow]) -> Result<Vec<Vec<f32>>>;
    /// A slot's cache holds `cached` positions and the next request's tokens agree with them on
    /// the first `common`: how many positions can be kept, so that only the rest is computed.
    /// At most `common`; less where a sliding-window ring has already overwritten keys the kept
    /// prefix's last window needs.
    fn reusable_prefix(&self, cached: usize, common: usize) -> usize;
    /// Runs a batched decode step of every row count a step can have, at the first and the last
    /// position, so that every kernel a step needs is compiled before the first request rather
    /// than inside it (a driver's pipeline compile takes from milliseconds to seconds, and a
    /// step's kernels depend on its row count and context length). Writes the slots' caches:
    /// call it before any slot holds a sequence. Returns the most rows a step ran.
    fn warm_up(&mut self, gpu: &Gpu) -> Result<usize>;
}
