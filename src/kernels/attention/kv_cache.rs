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
        })
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
        })
    }

    /// Bytes of K and V together: `ctx * bytes_per_token` (for [`KvCache::from_f32`], the sizes
    /// of the tensors' whole buffers).
    pub fn bytes(&self) -> u64 {
        self.k.size() + self.v.size()
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
        let get = |b: &GpuBuffer| -> Result<Vec<f32>> {
            // The positions as slots: one run up to the ring's end, then one from its start.
            let s0 = first % self.slots;
            let n0 = n_pos.min(self.slots - s0);
            let mut raw = gpu.read_bytes(b, s0 as u64 * row, n0 as u64 * row)?;
            if n0 < n_pos {
                raw.extend(gpu.read_bytes(b, 0, (n_pos - n0) as u64 * row)?);
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
    _pad: u32,
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
    _pad: [u32; 2],
    /// The frequency table ([`crate::kernels::rope`]'s).
    q: [f32; MAX_ROT_DIM],
}
/// Bytes of [`rope_store`]'s params (the memory planner's `Kernel::RopeStore`).
pub const ROPE_STORE_PARAMS_BYTES: usize = 48 + MAX_ROT_DIM * 4;
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
    let freqs = crate::kernels::rope::linear_freqs(theta, factor, rot_dim)?;
    let pos0_u32 = to_u32(op, pos0)?;
    let table = crate::kernels::rope::table(op, &freqs, cache.head_dim, m, pos0_u32)?;
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
        _pad: [0; 2],
        q: table,
    };
    let gpu = rec.gpu();
    use Bind::{Input, Output};
    let binds = [Output, Input, Input, Output, Output];
    let kernel = gpu.kernel(
        "rope_store",
        "rope_store",
        &binds,
        ROPE_STORE_PARAMS_BYTES as u64,
        &[("KV_DTYPE", cache.dtype.code())],
    )?;
    let groups = gpu.groups(to_u32(op, work.div_ceil(WG))?);
    rec.dispatch(
        &kernel,
        &format!("rope_store.{}@{pos0}+{m}", cache.k.label),
        &[
            q.buf.view(),
            k.buf.view(),
            v.buf.view(),
            cache.k.view(),
            cache.v.view(),
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
        _pad: 0,
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
