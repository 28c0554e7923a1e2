//! One layer's KV cache ([`KvCache`]), its store kernels (`shaders/kv_cache.wgsl`, and
//! `shaders/rope_store.wgsl` that rotates keys and queries on the way: [`rope_store`]) and the CPU
//! encoding of its rows ([`encode`], [`decode`]).
//!
//! A [`KvCache`] holds K and V of one layer, each `[ctx, n_kv_heads, head_dim]` as rows of `u32`
//! words, one row per (position, kv head):
//!
//! | dtype | words per row | bytes per token and layer, K and V together ([`bytes_per_token`]) |
//! |---|---|---|
//! | f32 | `head_dim` | `8 * n_kv * head_dim` |
//! | f16 | `head_dim / 2` (element 2i in the low half of word i) | `4 * n_kv * head_dim` |
//! | q8_0 | `ceil(nb / 2) + 8 * nb`, `nb = head_dim / 32` | `2 * n_kv * (head_dim + 4 * ceil(nb / 2))` |
//!
//! A q8_0 row starts with the f16 scales (block b in half `b % 2` of word `b / 2`), then the i8
//! quants, four per word, little-endian. With an even block count (head_dim a multiple of 64) that
//! is 34 bytes per 32 values, GGUF's Q8_0 rate; an odd count pads the last scale word (2 bytes per
//! row). Quantisation on store is src/quant's Q8_0 (`d = amax / 127`, `q = round(x / d)`, d kept as
//! f16). head_dim must be a multiple of 4 (f16: also even; q8_0: of 32) and at most 256.
//!
//! A sliding-window layer (Mistral's `sliding_window`, Gemma 3's local layers; [`KvCache::windowed`])
//! keeps a ring instead: position p lives in slot `p % slots` ([`ring_slots`]), and a query at
//! position t attends keys k with `t - k < window` and `k <= t` (Hugging Face's and llama.cpp's
//! mask). A global layer's cache is the ring of `ctx` slots, where `p % ctx == p`: nothing changes.
//! A ring forgets: running again from an earlier position p0 (after positions past p0 were
//! stored) finds the keys before p0 only where no later position has taken their slot, so a rerun
//! starts from position 0 (as generation and perplexity windows do).
//!
//! Several sequences (`RunOptions::parallel` slots) keep their caches of one layer slot-major in
//! the same K and V buffers ([`KvCache::slots_major`]): slot s of a buffer from word
//! `s * slots * n_kv_heads * row_words` on, each [`KvCache`] a view of its slot. A batched decode
//! step then stores and attends every row's keys in one dispatch each, the rows' slots and
//! positions read from a row table ([`row_table`]). Where a layer's caches of all slots would
//! pass the storage binding limit, the slots are split over as few buffers as hold them
//! ([`slots_per_buffer`]), and a step dispatches once per buffer.

use half::f16;

use crate::error::{Error, Result};
use crate::gpu::{Bind, BufferClass, Gpu, GpuBuffer, Recorder};
use crate::kernels::rope::{RopeMode, MAX_ROT_DIM};
use crate::kernels::{params, Tensor};
use crate::quant::{quantize, WeightFormat, QK};

/// Largest head_dim of the decode kernel (`HD4R * 4` in shaders/attention.wgsl).
pub const MAX_HEAD_DIM: usize = 256;
/// Threads per workgroup of the store kernel.
const WG: usize = 64;

/// How the cache stores K and V.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KvDtype {
    F32,
    F16,
    Q8_0,
}

impl KvDtype {
    pub const ALL: [KvDtype; 3] = [KvDtype::F32, KvDtype::F16, KvDtype::Q8_0];

    pub fn name(self) -> &'static str {
        match self {
            KvDtype::F32 => "f32",
            KvDtype::F16 => "f16",
            KvDtype::Q8_0 => "q8_0",
        }
    }

    pub fn parse(s: &str) -> Result<KvDtype> {
        KvDtype::ALL
            .into_iter()
            .find(|d| d.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| Error::Parse {
                what: "a KV cache type",
                input: s.into(),
                reason: "use f32, f16 or q8_0".into(),
            })
    }

    /// `u32` words of one cache row (one position, one kv head).
    pub fn row_words(self, head_dim: usize) -> usize {
        match self {
            KvDtype::F32 => head_dim,
            KvDtype::F16 => head_dim.div_ceil(2),
            KvDtype::Q8_0 => {
                let nb = head_dim.div_ceil(QK);
                nb.div_ceil(2) + 8 * nb
            }
        }
    }

    /// Checks that rows of `head_dim` values can be stored (see the module header).
    pub fn check_head_dim(self, head_dim: usize) -> Result<()> {
        let block = if self == KvDtype::Q8_0 { QK } else { 4 };
        if head_dim == 0 || !head_dim.is_multiple_of(block) || head_dim > MAX_HEAD_DIM {
            return Err(Error::invalid(
                "kv cache",
                format!(
                    "head_dim {head_dim} with {}: needs a multiple of {block} up to {MAX_HEAD_DIM}",
                    self.name()
                ),
            ));
        }
        Ok(())
    }

    /// The `KV_DTYPE` override constant of both shaders.
    pub(super) fn code(self) -> f64 {
        match self {
            KvDtype::F32 => 0.0,
            KvDtype::F16 => 1.0,
            KvDtype::Q8_0 => 2.0,
        }
    }
}

impl std::fmt::Display for KvDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Exact VRAM bytes one token costs in one layer's cache, K and V together.
pub fn bytes_per_token(dtype: KvDtype, n_kv_heads: usize, head_dim: usize) -> u64 {
    2 * n_kv_heads as u64 * dtype.row_words(head_dim) as u64 * 4
}

/// Slots of the ring of a layer with attention `window` over `ctx` positions, stored in chunks
/// of up to `chunk` tokens: `ctx` for a global layer (`None`), else `min(ctx, window + chunk - 1)`.
///
/// Why `window + chunk - 1`: a chunk of m tokens at positions `pos0..pos0 + m` is stored before
/// any of its queries attends, and its first query (position pos0) still needs the keys from
/// `pos0 + 1 - window` on. Storing position `pos0 + m - 1` overwrites position
/// `pos0 + m - 1 - slots`, which must lie below `pos0 + 1 - window`: `slots >= window + m - 1`.
/// Splitting chunks instead would cost the prefill its large matmuls; one chunk's worth of
/// extra slots is small beside the window (Gemma 3: 512 + 63 at the default chunk of 64).
pub fn ring_slots(ctx: usize, window: Option<usize>, chunk: usize) -> usize {
    match window {
        None => ctx,
        Some(w) => ctx.min(w.max(1).saturating_add(chunk.max(1) - 1)),
    }
}

/// One layer's K and V cache.
#[derive(Debug, Clone)]
pub struct KvCache {
    pub dtype: KvDtype,
    /// Positions the cache serves: `0..ctx`.
    pub ctx: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub k: GpuBuffer,
    pub v: GpuBuffer,
    /// `u32` words per row, [`KvDtype::row_words`].
    pub row_words: usize,
    /// Sliding-window attention: a query at position t sees keys from `t + 1 - window` on; `None`
    /// for a global layer.
    pub window: Option<usize>,
    /// Positions held, the ring's length ([`ring_slots`]): position p lives in slot `p % slots`.
    /// `ctx` for a global layer.
    pub slots: usize,
    /// Which sequence slot of the `k` and `v` buffers this cache is ([`KvCache::slots_major`]):
    /// its rows start at word `slot_index * slot_words()`. 0 for a cache of its own.
    pub slot_index: usize,
}

impl KvCache {
    /// Allocates a zeroed cache of `ctx` positions through the ledger (class `KvCache`), buffers
    /// `<label>.k` and `<label>.v`. Each must fit one storage binding.
    pub fn new(
        gpu: &Gpu,
        label: &str,
        dtype: KvDtype,
        ctx: usize,
        n_kv_heads: usize,
        head_dim: usize,
    ) -> Result<KvCache> {
        KvCache::windowed(gpu, label, dtype, ctx, n_kv_heads, head_dim, None, 1)
    }

    /// [`KvCache::new`] for a layer whose queries see the last `window` positions (`None`: all,
    /// exactly [`KvCache::new`]), stored in chunks of up to `chunk` tokens: a ring of
    /// [`ring_slots`] positions, booked as such.
    #[allow(clippy::too_many_arguments)]
    pub fn windowed(
        gpu: &Gpu,
        label: &str,
        dtype: KvDtype,
        ctx: usize,
        n_kv_heads: usize,
        head_dim: usize,
        window: Option<usize>,
        chunk: usize,
    ) -> Result<KvCache> {
        let bytes = check_layout(gpu, label, dtype, ctx, n_kv_heads, head_dim, window, chunk)?;
        let slots = ring_slots(ctx, window, chunk);
        let row_words = dtype.row_words(head_dim);
        Ok(KvCache {
            dtype,
            ctx,
            n_kv_heads,
            head_dim,
            k: gpu.alloc(&format!("{label}.k"), BufferClass::KvCache, bytes)?,
            v: gpu.alloc(&format!("{label}.v"), BufferClass::KvCache, bytes)?,
            row_words,
            window,
            slots,
            slot_index: 0,
        })
    }

    /// The caches of `n_slots` sequences for one layer ([`KvCache::windowed`]'s arguments),
    /// slot-major: as many slots share one K and one V buffer as fit one storage binding
    /// ([`slots_per_buffer`] of `per_buffer_cap`; `usize::MAX` for no cap beside the binding),
    /// slot s in buffer `s / per_buffer` at index `s % per_buffer`. One slot is exactly
    /// [`KvCache::windowed`]. Buffers `<label>.k` / `.v`, `<label>.b<i>.k` past the first.
    #[allow(clippy::too_many_arguments)]
    pub fn slots_major(
        gpu: &Gpu,
        label: &str,
        dtype: KvDtype,
        ctx: usize,
        n_kv_heads: usize,
        head_dim: usize,
        window: Option<usize>,
        chunk: usize,
        n_slots: usize,
        per_buffer: usize,
    ) -> Result<Vec<KvCache>> {
        let n_slots = n_slots.max(1);
        if n_slots == 1 {
            let one =
                KvCache::windowed(gpu, label, dtype, ctx, n_kv_heads, head_dim, window, chunk)?;
            return Ok(vec![one]);
        }
        let per_buffer = per_buffer.clamp(1, n_slots);
        let slot_bytes = check_layout(gpu, label, dtype, ctx, n_kv_heads, head_dim, window, chunk)?;
        let mut caches = Vec::with_capacity(n_slots);
        for (b, first) in (0..n_slots).step_by(per_buffer).enumerate() {
            let here = per_buffer.min(n_slots - first);
            let name = if b == 0 {
                label.to_string()
            } else {
                format!("{label}.b{b}")
            };
            let bytes = slot_bytes.saturating_mul(here as u64);
            if bytes > gpu.max_binding() {
                return Err(Error::invalid(
                    format!("kv cache {name}"),
                    format!(
                        "{here} slots take {bytes} bytes per tensor, over the {}-byte storage                          binding limit",
                        gpu.max_binding()
                    ),
                ));
            }
            let k = gpu.alloc(&format!("{name}.k"), BufferClass::KvCache, bytes)?;
            let v = gpu.alloc(&format!("{name}.v"), BufferClass::KvCache, bytes)?;
            for i in 0..here {
                caches.push(KvCache {
                    dtype,
                    ctx,
                    n_kv_heads,
                    head_dim,
                    k: k.clone(),
                    v: v.clone(),
                    row_words: dtype.row_words(head_dim),
                    window,
                    slots: ring_slots(ctx, window, chunk),
                    slot_index: i,
                });
            }
        }
        Ok(caches)
    }

    /// `u32` words of one sequence slot's rows in the K (or V) buffer.
    pub fn slot_words(&self) -> usize {
        self.slots * self.n_kv_heads * self.row_words
    }

    /// The first word of this cache's rows in its buffers.
    pub fn base_words(&self) -> usize {
        self.slot_index * self.slot_words()
    }

    /// Whether `other` is a slot of the same K and V buffers (and shape), so that one dispatch
    /// with a row table serves both.
    pub fn shares_buffers(&self, other: &KvCache) -> bool {
        self.k.buffer == other.k.buffer
            && self.v.buffer == other.v.buffer
            && self.slots == other.slots
            && self.row_words == other.row_words
            && self.n_kv_heads == other.n_kv_heads
            && self.head_dim == other.head_dim
            && self.dtype == other.dtype
            && self.window == other.window
            && self.ctx == other.ctx
    }

    /// An f32 cache over existing K and V tensors of shape `[ctx, n_kv_heads, head_dim]`, without
    /// a copy: an f32 cache row is exactly such a tensor's row. For an encoder, which attends once
    /// over its whole sequence's K and V projections and needs no separate [`store`]. The cache
    /// shares the tensors' buffers (and their ledger class).
    pub fn from_f32(k: &Tensor, v: &Tensor) -> Result<KvCache> {
        let [ctx, n_kv_heads, head_dim] = k.shape[..] else {
            return Err(Error::shape(
                format!("kv cache over {}", k.buf.label),
                "[ctx, n_kv_heads, head_dim]",
                format!("{:?}", k.shape),
            ));
        };
        v.expect("kv cache over tensors", &k.shape)?;
        if k.buf.buffer == v.buf.buffer {
            return Err(Error::invalid(
                "kv cache over tensors",
                "K and V must be separate buffers",
            ));
        }
        KvDtype::F32.check_head_dim(head_dim)?;
        if ctx == 0 || n_kv_heads == 0 {
            return Err(Error::invalid(
                format!("kv cache over {}", k.buf.label),
                format!("ctx {ctx} and n_kv_heads {n_kv_heads} must be positive"),
            ));
        }
        Ok(KvCache {
            dtype: KvDtype::F32,
            ctx,
            n_kv_heads,
            head_dim,
            k: k.buf.clone(),
            v: v.buf.clone(),
            row_words: head_dim,
            window: None,
            slots: ctx,
            slot_index: 0,
        })
    }

    /// Bytes of this slot's K and V together: `slots * bytes_per_token` (for
    /// [`KvCache::from_f32`], the sizes of the tensors' whole buffers).
    pub fn bytes(&self) -> u64 {
        if self.slot_index == 0 && self.k.size() == (self.slot_words() * 4) as u64 {
            return self.k.size() + self.v.size();
        }
        2 * (self.slot_words() * 4) as u64
    }

    /// K and V of positions `0..n_pos` as the cache holds them, dequantised to f32
    /// (`[n_pos, n_kv_heads, head_dim]` each); at most [`KvCache::slots`] positions.
    pub fn read(&self, gpu: &Gpu, n_pos: usize) -> Result<(Vec<f32>, Vec<f32>)> {
        self.read_positions(gpu, 0, n_pos)
    }

    /// K and V of positions `first..first + n_pos` as the ring holds them (slot `p % slots` for
    /// position p), dequantised to f32. The slots hold the last positions stored, which the
    /// caller knows: up to [`KvCache::slots`] positions can be read back at once.
    pub fn read_positions(
        &self,
        gpu: &Gpu,
        first: usize,
        n_pos: usize,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        if n_pos > self.slots || first.checked_add(n_pos).is_none_or(|end| end > self.ctx) {
            return Err(Error::invalid(
                "kv cache read",
                format!(
                    "positions {first}..{} of a {}-position cache of {} slots",
                    first.saturating_add(n_pos),
                    self.ctx,
                    self.slots
                ),
            ));
        }
        let row = (self.n_kv_heads * self.row_words * 4) as u64;
        let base = (self.base_words() * 4) as u64;
        let get = |b: &GpuBuffer| -> Result<Vec<f32>> {
            // The positions as slots: one run up to the ring's end, then one from its start.
            let s0 = first % self.slots;
            let n0 = n_pos.min(self.slots - s0);
            let mut raw = gpu.read_bytes(b, base + s0 as u64 * row, n0 as u64 * row)?;
            if n0 < n_pos {
                raw.extend(gpu.read_bytes(b, base, (n_pos - n0) as u64 * row)?);
            }
            decode(
                self.dtype,
                &bytemuck::pod_collect_to_vec(&raw),
                self.head_dim,
            )
        };
        Ok((get(&self.k)?, get(&self.v)?))
    }
}

/// Checks a cache's shape ([`KvCache::windowed`]'s arguments) and returns the bytes of one
/// sequence's K (or V): at most one storage binding.
#[allow(clippy::too_many_arguments)]
fn check_layout(
    gpu: &Gpu,
    label: &str,
    dtype: KvDtype,
    ctx: usize,
    n_kv_heads: usize,
    head_dim: usize,
    window: Option<usize>,
    chunk: usize,
) -> Result<u64> {
    dtype.check_head_dim(head_dim)?;
    if ctx == 0 || n_kv_heads == 0 || window == Some(0) {
        return Err(Error::invalid(
            format!("kv cache {label}"),
            format!(
                "ctx {ctx}, n_kv_heads {n_kv_heads} and the window ({window:?}) must be positive"
            ),
        ));
    }
    let slots = ring_slots(ctx, window, chunk);
    let row_words = dtype.row_words(head_dim);
    let bytes = (slots as u64 * n_kv_heads as u64 * row_words as u64).saturating_mul(4);
    if bytes > gpu.max_binding() {
        return Err(Error::invalid(
            format!("kv cache {label}"),
            format!(
                "{slots} positions of {dtype} take {bytes} bytes per tensor, over the {}-byte \
                 storage binding limit; use a shorter context or a smaller KV type",
                gpu.max_binding()
            ),
        ));
    }
    Ok(bytes)
}

/// Sequence slots whose caches of one layer share a K and a V buffer ([`KvCache::slots_major`]):
/// all `n_slots` where they fit one storage binding of `max_binding` bytes, else as many as do
/// (at least 1). `slot_bytes`: one slot's K of the layer with the largest ring, so every layer
/// splits its slots alike and one row table serves them all.
pub fn slots_per_buffer(slot_bytes: u64, max_binding: u64, n_slots: usize) -> usize {
    let fit = max_binding / slot_bytes.max(1);
    (fit.min(n_slots as u64) as usize).max(1)
}

/// The row table of a batched decode step: per row, the slot index of its cache in its buffers
/// ([`KvCache::slot_index`]) and its position, two `u32` each, as the kernels read them
/// ([`rope_store_rows`], `attention::attention_rows`).
pub fn row_table(rows: &[(&KvCache, usize)]) -> Result<Vec<u32>> {
    let mut t = Vec::with_capacity(2 * rows.len());
    for (kv, pos) in rows {
        t.push(to_u32("row table", kv.slot_index)?);
        t.push(to_u32("row table", *pos)?);
    }
    Ok(t)
}

/// Cache rows for `x` (rows of `head_dim` values), exactly as the store kernel writes them.
pub fn encode(dtype: KvDtype, x: &[f32], head_dim: usize) -> Result<Vec<u32>> {
    dtype.check_head_dim(head_dim)?;
    if !x.len().is_multiple_of(head_dim) {
        return Err(Error::invalid(
            "kv encode",
            format!("{} values are not rows of {head_dim}", x.len()),
        ));
    }
    let mut out = Vec::with_capacity(x.len() / head_dim * dtype.row_words(head_dim));
    for row in x.chunks_exact(head_dim) {
        match dtype {
            KvDtype::F32 => out.extend(row.iter().map(|v| v.to_bits())),
            KvDtype::F16 => out.extend(row.chunks_exact(2).map(|p| {
                f16::from_f32(p[0]).to_bits() as u32 | (f16::from_f32(p[1]).to_bits() as u32) << 16
            })),
            KvDtype::Q8_0 => {
                let gguf = quantize(WeightFormat::Q8_0, row)?;
                let blocks: Vec<&[u8]> = gguf.chunks_exact(34).collect();
                for pair in blocks.chunks(2) {
                    let d = |i: usize| pair.get(i).map_or(0, |b| u16::from_le_bytes([b[0], b[1]]));
                    out.push(d(0) as u32 | (d(1) as u32) << 16);
                }
                for b in &blocks {
                    out.extend(
                        b[2..]
                            .chunks_exact(4)
                            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])),
                    );
                }
            }
        }
    }
    Ok(out)
}

/// The f32 values of cache rows `words` (the inverse of [`encode`], up to its rounding).
pub fn decode(dtype: KvDtype, words: &[u32], head_dim: usize) -> Result<Vec<f32>> {
    dtype.check_head_dim(head_dim)?;
    let rw = dtype.row_words(head_dim);
    if !words.len().is_multiple_of(rw) {
        return Err(Error::invalid(
            "kv decode",
            format!("{} words are not rows of {rw}", words.len()),
        ));
    }
    let half =
        |w: u32, hi: bool| f16::from_bits(if hi { (w >> 16) as u16 } else { w as u16 }).to_f32();
    let mut out = Vec::with_capacity(words.len() / rw * head_dim);
    for row in words.chunks_exact(rw) {
        match dtype {
            KvDtype::F32 => out.extend(row.iter().map(|w| f32::from_bits(*w))),
            KvDtype::F16 => out.extend(row.iter().flat_map(|&w| [half(w, false), half(w, true)])),
            KvDtype::Q8_0 => {
                let nb = head_dim / QK;
                let (scales, quants) = row.split_at(nb.div_ceil(2));
                for (b, block) in quants.chunks_exact(8).enumerate() {
                    let d = half(scales[b / 2], b % 2 == 1);
                    out.extend(
                        block
                            .iter()
                            .flat_map(|w| w.to_le_bytes())
                            .map(|q| d * (q as i8) as f32),
                    );
                }
            }
        }
    }
    Ok(out)
}

pub(super) fn to_u32(op: &str, n: usize) -> Result<u32> {
    u32::try_from(n).map_err(|_| Error::invalid(op, format!("{n} does not fit 32 bits")))
}

/// Positions `pos0..pos0 + m` lie in the cache's context and, in a ring, one chunk of them never
/// overwrites a key that its own first query still needs ([`ring_slots`]).
pub(super) fn check_positions(op: &str, cache: &KvCache, pos0: usize, m: usize) -> Result<()> {
    if pos0.checked_add(m).is_none_or(|end| end > cache.ctx) {
        return Err(Error::invalid(
            format!("{op} ({})", cache.k.label),
            format!(
                "positions {pos0}..{} exceed the cache context {}",
                pos0.saturating_add(m),
                cache.ctx
            ),
        ));
    }
    if let Some(w) = cache.window.filter(|_| cache.slots < cache.ctx) {
        if m + w > cache.slots + 1 {
            return Err(Error::invalid(
                format!("{op} ({})", cache.k.label),
                format!(
                    "a chunk of {m} tokens over a window of {w} needs {} ring slots; this cache \
                     has {} (made for shorter chunks)",
                    m + w - 1,
                    cache.slots
                ),
            ));
        }
    }
    Ok(())
}

/// The window as the kernels take it: keys per query, `u32::MAX` (all) for a global layer.
pub(super) fn window_u32(cache: &KvCache) -> u32 {
    cache
        .window
        .map_or(u32::MAX, |w| u32::try_from(w).unwrap_or(u32::MAX))
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct StoreParams {
    rows: u32,
    head_dim: u32,
    row_words: u32,
    pos0: u32,
    units_per_row: u32,
    n_kv_heads: u32,
    /// The ring's length: token t goes to slot `(pos0 + t) % slots`.
    slots: u32,
    /// The first word of the sequence's cache ([`KvCache::base_words`]).
    base: u32,
}
const _: () = assert!(std::mem::size_of::<StoreParams>() == 32);

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct RopeStoreParams {
    m: u32,
    n_heads: u32,
    n_kv_heads: u32,
    head_dim: u32,
    rot_dim: u32,
    pos0: u32,
    mode: u32,
    row_words: u32,
    units_per_row: u32,
    /// The ring's length: token t goes to slot `(pos0 + t) % slots`.
    slots: u32,
    /// One sequence: the first word of its cache ([`KvCache::base_words`]).
    base: u32,
    /// 1: decode rows, each row's slot and position from the row table ([`rope_store_rows`]).
    table: u32,
    /// With a table: the dispatch's first row.
    row0: u32,
    _pad: [u32; 3],
    /// The frequency table ([`crate::kernels::rope`]'s).
    q: [f32; MAX_ROT_DIM],
}
/// Bytes of [`rope_store`]'s params (the memory planner's `Kernel::RopeStore`).
pub const ROPE_STORE_PARAMS_BYTES: usize = 64 + MAX_ROT_DIM * 4;
const _: () = assert!(std::mem::size_of::<RopeStoreParams>() == ROPE_STORE_PARAMS_BYTES);

/// Store units per cache row: a word for f32/f16, a scale word (two blocks) for q8_0.
fn units_per_row(cache: &KvCache) -> usize {
    match cache.dtype {
        KvDtype::F32 | KvDtype::F16 => cache.row_words,
        KvDtype::Q8_0 => (cache.head_dim / QK).div_ceil(2),
    }
}

/// RoPE of `q` (`[m, n_heads, head_dim]`, in place) and `k`, and the store of K and V (`[m,
/// n_kv_heads, head_dim]`) at positions `pos0..pos0+m`, in one dispatch: [`crate::kernels::rope::
/// rope`] of q and k with the standard frequencies of `theta`, then [`store`], except that `k`
/// itself is left unrotated (only its cached copy is rotated: attention reads keys from the cache).
#[allow(clippy::too_many_arguments)]
pub fn rope_store(
    rec: &mut Recorder,
    cache: &KvCache,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    pos0: usize,
    theta: f32,
    mode: RopeMode,
    rot_dim: usize,
) -> Result<()> {
    rope_store_scaled(rec, cache, q, k, v, pos0, theta, 1.0, mode, rot_dim)
}

/// [`rope_store`] with linear RoPE scaling: positions divided by `factor` (the frequencies of
/// [`crate::kernels::rope::linear_freqs`]; 1 is none).
#[allow(clippy::too_many_arguments)]
pub fn rope_store_scaled(
    rec: &mut Recorder,
    cache: &KvCache,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    pos0: usize,
    theta: f32,
    factor: f32,
    mode: RopeMode,
    rot_dim: usize,
) -> Result<()> {
    let op = "rope + kv store";
    let m = k.shape.first().copied().unwrap_or(0);
    k.expect(op, &[m.max(1), cache.n_kv_heads, cache.head_dim])?;
    v.expect(op, &k.shape)?;
    let n_heads = q.shape.get(1).copied().unwrap_or(0);
    q.expect(op, &[m.max(1), n_heads.max(1), cache.head_dim])?;
    check_positions(op, cache, pos0, m)?;
    let rope = (theta, factor, mode, rot_dim);
    let label = format!("rope_store.{}@{pos0}+{m}", cache.k.label);
    dispatch_rope_store(rec, cache, [q, k, v], m, pos0, None, rope, &label)
}

/// [`rope_store_scaled`] of decode rows `row0..row0 + rows.len()` of `q`, `k`, `v` (each row of
/// its own sequence: `rows[i]` = (its cache, its position)) in one dispatch: every cache must be
/// a slot of the same buffers ([`KvCache::shares_buffers`]), and `table` must hold
/// [`row_table`] of the step's rows from row 0 (so row `row0 + i` is `rows[i]`). Each row is
/// rotated and stored exactly as [`rope_store_scaled`] of that row alone.
#[allow(clippy::too_many_arguments)]
pub fn rope_store_rows(
    rec: &mut Recorder,
    rows: &[(&KvCache, usize)],
    table: &GpuBuffer,
    row0: usize,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    theta: f32,
    factor: f32,
    mode: RopeMode,
    rot_dim: usize,
) -> Result<()> {
    let op = "rope + kv store rows";
    let cache = check_rows(op, rows, table, row0)?;
    let all = k.shape.first().copied().unwrap_or(0);
    k.expect(op, &[all.max(1), cache.n_kv_heads, cache.head_dim])?;
    v.expect(op, &k.shape)?;
    let n_heads = q.shape.get(1).copied().unwrap_or(0);
    q.expect(op, &[all.max(1), n_heads.max(1), cache.head_dim])?;
    let m = rows.len();
    if row0 + m > all {
        return Err(Error::invalid(
            op,
            format!("rows {row0}..{} of {all}", row0 + m),
        ));
    }
    let last = rows.iter().map(|r| r.1).max().unwrap_or(0);
    let rope = (theta, factor, mode, rot_dim);
    let label = format!("rope_store.{}.rows{row0}+{m}", cache.k.label);
    let tokens = Some((table, row0, last));
    dispatch_rope_store(rec, cache, [q, k, v], m, 0, tokens, rope, &label)
}

/// The caches of decode rows share one pair of buffers and each row's position fits; the table
/// holds the rows. Returns the first row's cache.
pub(super) fn check_rows<'a>(
    op: &str,
    rows: &[(&'a KvCache, usize)],
    table: &GpuBuffer,
    row0: usize,
) -> Result<&'a KvCache> {
    let Some(&(first, _)) = rows.first() else {
        return Err(Error::invalid(op, "no decode rows"));
    };
    for (i, (kv, pos)) in rows.iter().enumerate() {
        if !first.shares_buffers(kv) {
            return Err(Error::invalid(
                op,
                format!("row {i}'s cache is not a slot of '{}'", first.k.label),
            ));
        }
        check_positions(op, kv, *pos, 1)?;
    }
    let need = ((row0 + rows.len()) * 8) as u64;
    if table.size() < need {
        return Err(Error::invalid(
            op,
            format!(
                "row table '{}' of {} bytes for rows up to {}",
                table.label,
                table.size(),
                row0 + rows.len()
            ),
        ));
    }
    Ok(first)
}

/// The RoPE + store dispatch of `m` tokens: one sequence from `pos0`, or (`rows`: the table, the
/// first row, the largest position) decode rows.
#[allow(clippy::too_many_arguments)]
fn dispatch_rope_store(
    rec: &mut Recorder,
    cache: &KvCache,
    [q, k, v]: [&Tensor; 3],
    m: usize,
    pos0: usize,
    rows: Option<(&GpuBuffer, usize, usize)>,
    (theta, factor, mode, rot_dim): (f32, f32, RopeMode, usize),
    label: &str,
) -> Result<()> {
    let op = "rope + kv store";
    let n_heads = q.shape.get(1).copied().unwrap_or(0);
    let freqs = crate::kernels::rope::linear_freqs(theta, factor, rot_dim)?;
    let pos0_u32 = to_u32(op, pos0)?;
    // The table checks the positions' range: the chunk's, or up to the rows' last.
    let (first, n) = match rows {
        None => (pos0_u32, m),
        Some((_, _, last)) => (0, last + 1),
    };
    let table = crate::kernels::rope::table(op, &freqs, cache.head_dim, n, first)?;
    let units = units_per_row(cache);
    let work = m * (n_heads * rot_dim / 2 + cache.n_kv_heads * units);
    if work == 0 {
        return Ok(());
    }
    let p = RopeStoreParams {
        m: to_u32(op, m)?,
        n_heads: to_u32(op, n_heads)?,
        n_kv_heads: cache.n_kv_heads as u32,
        head_dim: cache.head_dim as u32,
        rot_dim: rot_dim as u32,
        pos0: pos0_u32,
        mode: mode.code(),
        row_words: cache.row_words as u32,
        units_per_row: units as u32,
        slots: to_u32(op, cache.slots)?,
        base: to_u32(op, cache.base_words())?,
        table: u32::from(rows.is_some()),
        row0: to_u32(op, rows.map_or(0, |r| r.1))?,
        _pad: [0; 3],
        q: table,
    };
    let gpu = rec.gpu();
    use Bind::{Input, Output};
    let binds = [Output, Input, Input, Output, Output, Input];
    let kernel = gpu.kernel(
        "rope_store",
        "rope_store",
        &binds,
        ROPE_STORE_PARAMS_BYTES as u64,
        &[
            ("KV_DTYPE", cache.dtype.code()),
            ("TABLE", f64::from(p.table)),
        ],
    )?;
    let groups = gpu.groups(to_u32(op, work.div_ceil(WG))?);
    // Without a table the `rows` binding is never read: k stands in.
    let table_view = rows.map_or_else(|| k.buf.view(), |r| r.0.view());
    rec.dispatch(
        &kernel,
        label,
        &[
            q.buf.view(),
            k.buf.view(),
            v.buf.view(),
            cache.k.view(),
            cache.v.view(),
            table_view,
        ],
        params(&p),
        groups,
    )
}

/// Writes K and V of `m` tokens (`[m, n_kv_heads, head_dim]` f32 each) into positions
/// `pos0..pos0+m` of the cache (slots `p % slots` of a ring), converting to its dtype. One
/// dispatch.
pub fn store(
    rec: &mut Recorder,
    cache: &KvCache,
    k: &Tensor,
    v: &Tensor,
    pos0: usize,
) -> Result<()> {
    let m = k.shape.first().copied().unwrap_or(0);
    k.expect("kv store", &[m.max(1), cache.n_kv_heads, cache.head_dim])?;
    v.expect("kv store", &k.shape)?;
    check_positions("kv store", cache, pos0, m)?;
    let hd = cache.head_dim;
    let units_per_row = units_per_row(cache);
    let rows = m * cache.n_kv_heads;
    let p = StoreParams {
        rows: to_u32("kv store", rows)?,
        head_dim: hd as u32,
        row_words: cache.row_words as u32,
        pos0: to_u32("kv store", pos0)?,
        units_per_row: units_per_row as u32,
        n_kv_heads: cache.n_kv_heads as u32,
        slots: to_u32("kv store", cache.slots)?,
        base: to_u32("kv store", cache.base_words())?,
    };
    let gpu = rec.gpu();
    let binds = [Bind::Input, Bind::Input, Bind::Output, Bind::Output];
    let kernel = gpu.kernel(
        "kv_cache",
        "store",
        &binds,
        32,
        &[("KV_DTYPE", cache.dtype.code())],
    )?;
    let groups = gpu.groups(to_u32("kv store", (rows * units_per_row).div_ceil(WG))?);
    rec.dispatch(
        &kernel,
        &format!("kv_store.{}@{pos0}+{m}", cache.k.label),
        &[k.buf.view(), v.buf.view(), cache.k.view(), cache.v.view()],
        params(&p),
        groups,
    )
}
