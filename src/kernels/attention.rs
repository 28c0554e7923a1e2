//! Attention over one layer's KV cache, with grouped-query attention: causal for decoders
//! ([`attention`]), bidirectional for encoders ([`attention_bidirectional`]). Three kernels:
//! `shaders/attention.wgsl`'s decode (`attend_rows`) and tiled prefill (`attend_tiled`) kernels,
//! and `shaders/attention_sg.wgsl` for CPU devices with 8-lane subgroups (one subgroup per token
//! and kv head, no workgroup memory or barriers; see [`subgroup_fits`]).
//! The cache, its layouts and byte costs: [`kv_cache`]. Every kernel reads a sliding-window
//! layer's ring ([`KvCache::windowed`]): query position t sees keys `t + 1 - window ..= t`, each
//! at row `k % slots`.

pub mod kv_cache;

pub use kv_cache::{
    bytes_per_token, decode, encode, ring_slots, rope_store, rope_store_rows, rope_store_scaled,
    row_table, slots_per_buffer, store, KvCache, KvDtype, MAX_HEAD_DIM,
};

use crate::error::{Error, Result};
use crate::gpu::{Bind, Gpu, Recorder};
use crate::kernels::{params, Tensor};
use kv_cache::{check_positions, check_rows, to_u32, window_u32};

/// Largest head_dim of the tiled prefill kernel (`HD4T * 4`); larger ones use the decode kernel.
pub const MAX_HEAD_DIM_TILED: usize = 128;
/// Query tokens per workgroup of the tiled kernel (`TQ`).
const TQ: usize = 16;
/// Fewest tokens for which [`attention`] picks the tiled kernel: below that, most of its 16 query
/// slots idle. On lavapipe at 2048 keys the decode kernel was 2.5-10x faster for 1-4 tokens, on
/// par at 16 and up to 1.6x slower at 128.
pub const TILED_MIN_TOKENS: usize = 8;
/// Workgroup memory of the tiled kernel: three 512-entry vec4 arrays, 256 + 16 f32.
const TILED_SHARED_BYTES: u32 = 3 * 512 * 16 + 256 * 4 + 16 * 4;

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct AttnParams {
    m: u32,
    n_heads: u32,
    n_kv_heads: u32,
    head_dim: u32,
    pos0: u32,
    group: u32,
    row_words: u32,
    n_wg: u32,
    scale: f32,
    causal: u32,
    n_keys: u32,
    /// Parts the keys are split in (the split subgroup kernel and its combine pass).
    splits: u32,
    /// Causal: keys per query, the sliding window ([`window_u32`]; `u32::MAX` for all).
    window: u32,
    /// Rows of the cache's ring ([`KvCache::slots`]): key position k lives in row `k % slots`.
    slots: u32,
    /// One sequence: the first word of its cache ([`KvCache::base_words`]).
    base: u32,
    /// 1: decode rows, each row's slot and position from the row table ([`attention_rows`]).
    table: u32,
    /// With a table: the dispatch's first row of q, out, the table and the partials.
    row0: u32,
    /// With a table, split entries: [`KEYS_PER_SPLIT`] (each row's parts are its own).
    keys_per_split: u32,
    _pad: [u32; 2],
}
/// Bytes of the attention kernels' params (the memory planner's `Kernel::Attention`).
pub const ATTENTION_PARAMS_BYTES: usize = 80;
const _: () = assert!(std::mem::size_of::<AttnParams>() == ATTENTION_PARAMS_BYTES);

/// Most parts [`attention_split`] splits a token's keys in; the partials scratch
/// ([`partials_bytes`]) holds that many.
pub const MAX_KEY_SPLITS: usize = 16;
/// Keys per part: [`key_splits`] splits a token's keys once it has two parts of this many.
/// Measured on lavapipe at 1024 keys (SmolLM2, 3 kv heads, 2 threads; BENCHMARKS.md): attention
/// 52-55 ms a token unsplit, 41 ms in 4 parts, 44-50 ms in 2, 50 ms in 16 (each merge pass
/// costs a dispatch, and more parts more partial state).
pub const KEYS_PER_SPLIT: usize = 256;

/// Bytes of the partials scratch of [`attention_split`] for one token of `n_heads` query heads:
/// each head's running maximum, sum (one vec4 with them) and V sum per part.
pub fn partials_bytes(n_heads: usize, head_dim: usize) -> u64 {
    (n_heads * MAX_KEY_SPLITS * (head_dim + 4) * 4) as u64
}

/// Parts [`attention_split`] splits the `n_keys` keys of `m` query tokens in: a single token gets
/// one part per [`KEYS_PER_SPLIT`] keys, so that a decode step has more than `n_kv_heads`
/// workgroups of work: on the subgroup kernel (`subgroup`: [`subgroup_fits`], a CPU device) up to
/// two per CPU thread (and [`MAX_KEY_SPLITS`]), to share out over the threads; on the grouped
/// workgroup kernel (GPUs: [`grouped_shape_fits`]) up to [`MAX_KEY_SPLITS`]. Otherwise 1 (a chunk
/// of tokens has a workgroup per token and head already).
pub fn key_splits(subgroup: bool, m: usize, n_keys: usize) -> usize {
    if m != 1 {
        return 1;
    }
    let most = if subgroup {
        (2 * crate::kernels::matmul::cpu_threads()).min(MAX_KEY_SPLITS)
    } else {
        MAX_KEY_SPLITS
    };
    (n_keys / KEYS_PER_SPLIT).clamp(1, most)
}

/// Most query heads per kv head the grouped decode kernel takes (`GMAX` of attention.wgsl).
pub const MAX_GROUP_GROUPED: usize = 8;

/// The shapes the grouped decode kernel (`attend_group`, GPUs) takes: head_dim up to
/// [`MAX_HEAD_DIM`], at most [`MAX_GROUP_GROUPED`] query heads per kv head.
pub fn grouped_shape_fits(head_dim: usize, group: usize) -> bool {
    head_dim <= MAX_HEAD_DIM && (1..=MAX_GROUP_GROUPED).contains(&group)
}

/// Query heads per kv head of `q` (`[m, n_heads, head_dim]`) over `cache` (0 when `q` has no
/// heads dimension; the dispatch checks shapes).
fn query_group(q: &Tensor, cache: &KvCache) -> usize {
    q.shape.get(1).map_or(0, |&h| h / cache.n_kv_heads.max(1))
}

/// Most query heads per kv head `attention_sg.wgsl` takes (its `G`).
pub const MAX_GROUP_SG: usize = 8;

/// Whether `attention_sg.wgsl` runs here and is the one to pick: the device runs the subgroup
/// matvec (a CPU device with 8-lane subgroups, where storage and workgroup loads are per-lane
/// loops), head_dim is a multiple of 32 up to 128 (1 to 4 vec4s a lane), and at most
/// [`MAX_GROUP_SG`] query heads share a kv head.
pub fn subgroup_fits(gpu: &Gpu, head_dim: usize, group: usize) -> bool {
    crate::kernels::matmul::subgroup_matvec_ok(gpu) && subgroup_shape_fits(head_dim, group)
}

/// The shapes `attention_sg.wgsl` takes: head_dim a multiple of 32 up to 128, groups of 1 to
/// [`MAX_GROUP_SG`] query heads per kv head.
pub fn subgroup_shape_fits(head_dim: usize, group: usize) -> bool {
    head_dim.is_multiple_of(32)
        && (32..=128).contains(&head_dim)
        && (1..=MAX_GROUP_SG).contains(&group)
}

/// Whether the tiled kernel can run: head_dim and the device's workgroup memory.
fn tiled_fits(gpu: &Gpu, head_dim: usize) -> bool {
    head_dim <= MAX_HEAD_DIM_TILED
        && gpu.limits.max_compute_workgroup_storage_size >= TILED_SHARED_BYTES
}

/// Which keys each query sees.
#[derive(Debug, Clone, Copy)]
enum Keys {
    /// Query t of a chunk starting at position `pos0` sees keys `0..=pos0 + t`.
    Causal { pos0: usize },
    /// Every query sees keys `0..n_keys`; q, out and the cache are bound from row `row0` on (one
    /// sequence of a batch laid out row after row).
    All { n_keys: usize, row0: usize },
}

/// The tiled kernel from [`TILED_MIN_TOKENS`] tokens on, when it fits; the decode kernel otherwise.
fn auto_path(gpu: &Gpu, q: &Tensor, cache: &KvCache) -> Path {
    let group = query_group(q, cache);
    if subgroup_fits(gpu, cache.head_dim, group) {
        return Path::Subgroup;
    }
    let many = q.shape.first().is_some_and(|&m| m >= TILED_MIN_TOKENS);
    if many && tiled_fits(gpu, cache.head_dim) {
        Path::Tiled
    } else {
        Path::Rows
    }
}

/// Which attention kernel runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttentionKernel {
    /// `attend_rows`: one workgroup per token and head.
    Rows,
    /// `attend_tiled`: one workgroup per 16 tokens and head, K/V tiles in workgroup memory.
    Tiled,
    /// `attend_sg`: one 8-lane subgroup per token and kv head.
    Subgroup,
    /// `attend_group`: one workgroup per token, kv head and part of the keys (a decode step on
    /// GPUs; the G query heads of a group share each K/V load).
    Grouped,
}
use AttentionKernel as Path;

/// `out = softmax(scale * q K^T, causal) V` for `m` query tokens at positions `pos0..pos0+m`
/// (`q`, `out`: `[m, n_heads, head_dim]`; query head h reads kv head `h / (n_heads / n_kv_heads)`).
/// Keys `0..pos0+m` must have been stored. Picks the subgroup kernel where [`subgroup_fits`],
/// else the tiled prefill kernel from [`TILED_MIN_TOKENS`] tokens on (if head_dim and the
/// device's workgroup memory allow) and the decode kernel otherwise.
pub fn attention(
    rec: &mut Recorder,
    q: &Tensor,
    cache: &KvCache,
    pos0: usize,
    scale: f32,
    out: &Tensor,
) -> Result<()> {
    let path = auto_path(rec.gpu(), q, cache);
    dispatch_attention(rec, path, q, cache, Keys::Causal { pos0 }, scale, out)
}

/// [`attention`] where a single token's keys may be split across subgroups ([`key_splits`]): each
/// part's partial softmax state goes to `partials` (at least [`partials_bytes`] of a token), and a
/// second pass merges them into `out`. Otherwise exactly [`attention`].
pub fn attention_split(
    rec: &mut Recorder,
    q: &Tensor,
    cache: &KvCache,
    pos0: usize,
    scale: f32,
    partials: &Tensor,
    out: &Tensor,
) -> Result<()> {
    let path = decode_path(rec.gpu(), q, cache);
    let m = q.shape.first().copied().unwrap_or(0);
    // A decode step sees pos0 + 1 keys, or a sliding window's worth.
    let n_keys = pos0
        .saturating_add(m)
        .min(cache.window.unwrap_or(usize::MAX));
    let splits = match path {
        Path::Subgroup | Path::Grouped => key_splits(path == Path::Subgroup, m, n_keys),
        _ => 1,
    };
    if splits == 1 {
        return dispatch_attention(rec, path, q, cache, Keys::Causal { pos0 }, scale, out);
    }
    let split = Some((partials, splits));
    check_partials(q, cache, partials, out, splits)?;
    dispatch(
        rec,
        path,
        q,
        cache,
        Keys::Causal { pos0 },
        scale,
        out,
        split,
    )
}

/// [`auto_path`], but a single token on a device without the subgroup kernel takes the grouped
/// decode kernel where its shape fits.
fn decode_path(gpu: &Gpu, q: &Tensor, cache: &KvCache) -> Path {
    let path = auto_path(gpu, q, cache);
    let single = q.shape.first() == Some(&1);
    if path == Path::Rows && single && grouped_shape_fits(cache.head_dim, query_group(q, cache)) {
        Path::Grouped
    } else {
        path
    }
}

/// `partials` holds `m` tokens' partial states of `splits` parts, apart from `out`.
fn check_partials(
    q: &Tensor,
    cache: &KvCache,
    partials: &Tensor,
    out: &Tensor,
    splits: usize,
) -> Result<()> {
    let dim = |i: usize| q.shape.get(i).copied().unwrap_or(0);
    let need = dim(0) * dim(1) * splits * (cache.head_dim + 4);
    if splits == 0 || partials.len() < need || partials.buf.buffer == out.buf.buffer {
        return Err(Error::invalid(
            "split attention",
            format!(
                "{splits} parts need {need} f32 of partials apart from out; '{}' has {}",
                partials.buf.label,
                partials.len()
            ),
        ));
    }
    Ok(())
}

/// The grouped decode kernel (`attend_group`, GPUs) with the keys in `splits` parts (1: no
/// merge pass) forced, on any device (for tests and benchmarks); refused unless
/// [`grouped_shape_fits`] and `partials` holds `m` tokens' partial states of `splits` parts.
#[allow(clippy::too_many_arguments)]
pub fn attention_grouped(
    rec: &mut Recorder,
    q: &Tensor,
    cache: &KvCache,
    pos0: usize,
    scale: f32,
    partials: &Tensor,
    out: &Tensor,
    splits: usize,
) -> Result<()> {
    let group = query_group(q, cache);
    if !grouped_shape_fits(cache.head_dim, group) {
        return Err(Error::invalid(
            "grouped attention",
            format!("groups of 1 to {MAX_GROUP_GROUPED} query heads (got {group})"),
        ));
    }
    check_partials(q, cache, partials, out, splits)?;
    let keys = Keys::Causal { pos0 };
    let split = (splits > 1).then_some((partials, splits));
    dispatch(rec, Path::Grouped, q, cache, keys, scale, out, split)
}

/// [`attention_split`] with the subgroup kernel and the keys in `splits` parts forced (for tests
/// and benchmarks); refused unless [`subgroup_fits`] and `partials` holds `m` tokens' partial
/// states of `splits` parts.
#[allow(clippy::too_many_arguments)]
pub fn attention_split_with(
    rec: &mut Recorder,
    q: &Tensor,
    cache: &KvCache,
    pos0: usize,
    scale: f32,
    partials: &Tensor,
    out: &Tensor,
    splits: usize,
) -> Result<()> {
    let group = query_group(q, cache);
    if !subgroup_fits(rec.gpu(), cache.head_dim, group) {
        return Err(Error::invalid(
            "split attention",
            "split keys need the subgroup kernel (see subgroup_fits)",
        ));
    }
    check_partials(q, cache, partials, out, splits)?;
    let keys = Keys::Causal { pos0 };
    dispatch(
        rec,
        Path::Subgroup,
        q,
        cache,
        keys,
        scale,
        out,
        Some((partials, splits)),
    )
}

/// [`attention_split`] of decode rows `row0..row0 + rows.len()` of `q` and `out` (`[M, n_heads,
/// head_dim]` of the whole step), each row of its own sequence (`rows[i]` = its cache and
/// position), in one dispatch (plus the combine pass where some row splits its keys): every
/// cache a slot of the same buffers ([`KvCache::shares_buffers`]), `table` holding
/// [`row_table`] of the step's rows from row 0. Each row gets the kernel, and the key split,
/// that [`attention_split`] gives it alone, so its output is that of the row alone, bit for bit.
/// `partials` holds [`partials_bytes`] per row of the step.
#[allow(clippy::too_many_arguments)]
pub fn attention_rows(
    rec: &mut Recorder,
    rows: &[(&KvCache, usize)],
    table: &crate::gpu::GpuBuffer,
    row0: usize,
    q: &Tensor,
    scale: f32,
    partials: &Tensor,
    out: &Tensor,
) -> Result<()> {
    let op = "attention rows";
    let cache = check_rows(op, rows, table, row0)?;
    let all = q.shape.first().copied().unwrap_or(0);
    if row0 + rows.len() > all {
        return Err(Error::invalid(
            op,
            format!("rows {row0}..{} of {all}", row0 + rows.len()),
        ));
    }
    let one = Tensor {
        shape: vec![1, q.shape.get(1).copied().unwrap_or(0), cache.head_dim],
        ..q.clone()
    };
    // Each row's kernel and parts as `attention_split` picks them for that row alone.
    let path = decode_path(rec.gpu(), &one, cache);
    let n_keys = |pos: usize| (pos + 1).min(cache.window.unwrap_or(usize::MAX));
    let splits = match path {
        Path::Subgroup | Path::Grouped => rows
            .iter()
            .map(|&(_, pos)| key_splits(path == Path::Subgroup, 1, n_keys(pos)))
            .max()
            .unwrap_or(1),
        _ => 1,
    };
    let table = Some((table, row0, rows.len()));
    if splits == 1 {
        let keys = Keys::Causal { pos0: 0 };
        return dispatch_table(rec, path, q, cache, keys, scale, out, None, table);
    }
    let n_heads = one.shape[1];
    let need = (row0 + rows.len()) * n_heads * splits * (cache.head_dim + 4);
    if partials.len() < need || partials.buf.buffer == out.buf.buffer {
        return Err(Error::invalid(
            op,
            format!(
                "{splits} parts need {need} f32 of partials apart from out; '{}' has {}",
                partials.buf.label,
                partials.len()
            ),
        ));
    }
    let keys = Keys::Causal { pos0: 0 };
    let split = Some((partials, splits));
    dispatch_table(rec, path, q, cache, keys, scale, out, split, table)
}

/// Bidirectional (encoder) attention: `out = softmax(scale * q K^T) V` where every one of the `m`
/// query tokens sees all keys `0..n_keys` (no causal mask; `q`, `out`: `[m, n_heads, head_dim]`,
/// GQA as in [`attention`]). Keys `0..n_keys` must have been stored; `1 <= n_keys <= ctx`. Picks
/// the kernel as [`attention`] does.
pub fn attention_bidirectional(
    rec: &mut Recorder,
    q: &Tensor,
    cache: &KvCache,
    n_keys: usize,
    scale: f32,
    out: &Tensor,
) -> Result<()> {
    attention_bidirectional_with(rec, q, cache, n_keys, scale, out, None)
}

/// [`attention_bidirectional`] with the kernel forced (tests; refused where it cannot run), or
/// (`None`) picked as [`attention`] does.
pub fn attention_bidirectional_with(
    rec: &mut Recorder,
    q: &Tensor,
    cache: &KvCache,
    n_keys: usize,
    scale: f32,
    out: &Tensor,
    kernel: Option<AttentionKernel>,
) -> Result<()> {
    if n_keys == 0 {
        return Err(Error::invalid(
            format!("bidirectional attention ({})", cache.k.label),
            "no keys to attend to",
        ));
    }
    let gpu = rec.gpu();
    let group = query_group(q, cache);
    let path = match kernel {
        None => auto_path(gpu, q, cache),
        Some(AttentionKernel::Tiled) if !tiled_fits(gpu, cache.head_dim) => {
            return Err(Error::invalid(
                "attention",
                "the tiled kernel does not fit here",
            ))
        }
        Some(AttentionKernel::Subgroup) if !subgroup_fits(gpu, cache.head_dim, group) => {
            return Err(Error::invalid(
                "attention",
                "the subgroup kernel does not run here",
            ))
        }
        Some(k) => k,
    };
    let keys = Keys::All { n_keys, row0: 0 };
    dispatch_attention(rec, path, q, cache, keys, scale, out)
}

/// [`attention_bidirectional`] for one sequence of a batch laid out row after row in the same
/// buffers: the `m` query rows of `q` and `out` (`[m, n_heads, head_dim]` views of buffers that
/// hold the whole batch) start at row `row0` of their buffers and see key rows
/// `row0..row0 + n_keys` of `cache`. Every binding starts at row `row0`, so `row0` rows of q, out
/// and the cache must each be a multiple of the device's storage offset alignment in bytes (a
/// binding's offset must be; [`crate::plan::bert::sequence_slot`] lays sequences out so). Picks the
/// kernel as [`attention`] does.
pub fn attention_bidirectional_rows(
    rec: &mut Recorder,
    q: &Tensor,
    cache: &KvCache,
    row0: usize,
    n_keys: usize,
    scale: f32,
    out: &Tensor,
) -> Result<()> {
    if n_keys == 0 {
        return Err(Error::invalid(
            format!("bidirectional attention ({})", cache.k.label),
            "no keys to attend to",
        ));
    }
    let path = auto_path(rec.gpu(), q, cache);
    let keys = Keys::All { n_keys, row0 };
    dispatch_attention(rec, path, q, cache, keys, scale, out)
}

/// [`attention`] with the decode kernel (one workgroup per token and head; keys split over its
/// threads), for any `m`.
pub fn attention_decode(
    rec: &mut Recorder,
    q: &Tensor,
    cache: &KvCache,
    pos0: usize,
    scale: f32,
    out: &Tensor,
) -> Result<()> {
    dispatch_attention(rec, Path::Rows, q, cache, Keys::Causal { pos0 }, scale, out)
}

/// [`attention`] with the subgroup kernel (`attention_sg.wgsl`, one subgroup per token and kv
/// head); refused unless [`subgroup_fits`].
pub fn attention_subgroup(
    rec: &mut Recorder,
    q: &Tensor,
    cache: &KvCache,
    pos0: usize,
    scale: f32,
    out: &Tensor,
) -> Result<()> {
    let group = query_group(q, cache);
    if !subgroup_fits(rec.gpu(), cache.head_dim, group) {
        return Err(Error::invalid(
            "attention",
            format!(
                "the subgroup kernel needs a CPU device with 8-lane subgroups, head_dim a multiple \
                 of 32 up to 128 (got {}) and at most {MAX_GROUP_SG} query heads per kv head (got {group})",
                cache.head_dim
            ),
        ));
    }
    dispatch_attention(
        rec,
        Path::Subgroup,
        q,
        cache,
        Keys::Causal { pos0 },
        scale,
        out,
    )
}

/// [`attention`] with the tiled prefill kernel (one workgroup per 16 tokens and head; K/V tiles
/// shared in workgroup memory). Needs head_dim <= [`MAX_HEAD_DIM_TILED`].
pub fn attention_prefill(
    rec: &mut Recorder,
    q: &Tensor,
    cache: &KvCache,
    pos0: usize,
    scale: f32,
    out: &Tensor,
) -> Result<()> {
    if !tiled_fits(rec.gpu(), cache.head_dim) {
        return Err(Error::invalid(
            "attention prefill",
            format!(
                "head_dim {} needs at most {MAX_HEAD_DIM_TILED} and {TILED_SHARED_BYTES} bytes of \
                 workgroup memory; use attention()",
                cache.head_dim
            ),
        ));
    }
    dispatch_attention(
        rec,
        Path::Tiled,
        q,
        cache,
        Keys::Causal { pos0 },
        scale,
        out,
    )
}

fn dispatch_attention(
    rec: &mut Recorder,
    path: Path,
    q: &Tensor,
    cache: &KvCache,
    keys: Keys,
    scale: f32,
    out: &Tensor,
) -> Result<()> {
    dispatch(rec, path, q, cache, keys, scale, out, None)
}

/// The attention dispatch of one sequence; with `split` (partials, parts), the subgroup kernel's
/// split entry into the partials and the combine pass into `out`.
#[allow(clippy::too_many_arguments)]
fn dispatch(
    rec: &mut Recorder,
    path: Path,
    q: &Tensor,
    cache: &KvCache,
    keys: Keys,
    scale: f32,
    out: &Tensor,
    split: Option<(&Tensor, usize)>,
) -> Result<()> {
    dispatch_table(rec, path, q, cache, keys, scale, out, split, None)
}

/// [`dispatch`], or with `table` (the row table, the first row, the rows) the decode rows of
/// [`attention_rows`] (whose caller has checked them): then `split`'s parts are the most of any
/// row, each row taking its own.
#[allow(clippy::too_many_arguments)]
fn dispatch_table(
    rec: &mut Recorder,
    path: Path,
    q: &Tensor,
    cache: &KvCache,
    keys: Keys,
    scale: f32,
    out: &Tensor,
    split: Option<(&Tensor, usize)>,
    table: Option<(&crate::gpu::GpuBuffer, usize, usize)>,
) -> Result<()> {
    let (all, n_heads) = match q.shape[..] {
        [m, h, d] if m > 0 && h > 0 && d == cache.head_dim => (m, h),
        _ => {
            return Err(Error::shape(
                format!("attention q ({})", q.buf.label),
                format!("[m, n_heads, {}]", cache.head_dim),
                format!("{:?}", q.shape),
            ))
        }
    };
    out.expect("attention out", &q.shape)?;
    // The tokens this dispatch computes: all of q's, or the table's rows.
    let m = table.map_or(all, |t| t.2);
    if out.buf.buffer == q.buf.buffer {
        return Err(Error::invalid("attention", "out must not alias q"));
    }
    if !n_heads.is_multiple_of(cache.n_kv_heads) {
        return Err(Error::invalid(
            "attention",
            format!(
                "{n_heads} query heads are not a multiple of {} kv heads",
                cache.n_kv_heads
            ),
        ));
    }
    // Causal: the chunk's own positions must fit; bidirectional: the keys read.
    let (pos0, causal, n_keys) = match keys {
        // Decode rows: checked by `check_rows`.
        Keys::Causal { pos0 } if table.is_some() => (pos0, 1, 0),
        Keys::Causal { pos0 } => {
            check_positions("attention", cache, pos0, m)?;
            (pos0, 1, 0)
        }
        Keys::All { n_keys, row0 } => {
            if cache.window.is_some() {
                return Err(Error::invalid(
                    format!("bidirectional attention ({})", cache.k.label),
                    "a sliding-window cache holds only its last positions; an encoder sees all",
                ));
            }
            check_positions("attention", cache, row0, n_keys)?;
            (0, 0, n_keys)
        }
    };
    // Rows before `row0` are another sequence's: every binding starts at that row.
    let row0 = match keys {
        Keys::All { row0, .. } => row0,
        Keys::Causal { .. } => 0,
    };
    let q_row = (n_heads * cache.head_dim * 4) as u64;
    let q_end = (row0 as u64).saturating_add(m as u64).saturating_mul(q_row);
    if q_end > q.buf.size() || q_end > out.buf.size() {
        return Err(Error::invalid(
            "attention",
            format!(
                "rows {row0}..{} of '{}' and '{}' run past their buffers",
                row0 + m,
                q.buf.label,
                out.buf.label
            ),
        ));
    }
    let kv_row = (cache.n_kv_heads * cache.row_words * 4) as u64;
    let from_row = |b: &crate::gpu::GpuBuffer, row_bytes: u64| {
        let offset = row0 as u64 * row_bytes;
        b.range(offset, b.size() - offset)
    };
    let group = n_heads / cache.n_kv_heads;
    let (shader, entry, n_wg) = match path {
        Path::Rows => ("attention", "attend_rows", m * n_heads),
        Path::Tiled => ("attention", "attend_tiled", m.div_ceil(TQ) * n_heads),
        Path::Grouped if split.is_some() => ("attention", "attend_group_split", 0),
        Path::Grouped => ("attention", "attend_group", m * cache.n_kv_heads),
        Path::Subgroup if split.is_some() => ("attention_sg", "attend_sg_split", 0),
        Path::Subgroup => ("attention_sg", "attend_sg", m * cache.n_kv_heads),
    };
    if path == Path::Grouped && !grouped_shape_fits(cache.head_dim, group) {
        return Err(Error::invalid(
            "attention",
            format!("the grouped kernel takes at most {MAX_GROUP_GROUPED} heads per kv head"),
        ));
    }
    let splits = split.map_or(1, |(_, s)| s);
    let n_wg = if split.is_some() {
        m * cache.n_kv_heads * splits
    } else {
        n_wg
    };
    let p = AttnParams {
        m: to_u32("attention", m)?,
        n_heads: n_heads as u32,
        n_kv_heads: cache.n_kv_heads as u32,
        head_dim: cache.head_dim as u32,
        pos0: to_u32("attention", pos0)?,
        group: group as u32,
        row_words: cache.row_words as u32,
        n_wg: to_u32("attention", n_wg)?,
        scale,
        causal,
        n_keys: to_u32("attention", n_keys)?,
        splits: to_u32("attention", splits)?,
        window: window_u32(cache),
        slots: to_u32("attention", cache.slots)?,
        base: to_u32("attention", cache.base_words())?,
        table: u32::from(table.is_some()),
        row0: to_u32("attention", table.map_or(0, |t| t.1))?,
        keys_per_split: KEYS_PER_SPLIT as u32,
        _pad: [0; 2],
    };
    let gpu = rec.gpu();
    let binds = [
        Bind::Input,
        Bind::Input,
        Bind::Input,
        Bind::Output,
        Bind::Input,
    ];
    let dtype = ("KV_DTYPE", cache.dtype.code());
    let shape = [
        dtype,
        ("TABLE", f64::from(p.table)),
        ("G", group as f64),
        ("HD4", (cache.head_dim / 32) as f64),
    ];
    let overrides = match path {
        Path::Subgroup => &shape[..],
        _ => &shape[..2],
    };
    let kernel = gpu.kernel(
        shader,
        entry,
        &binds,
        ATTENTION_PARAMS_BYTES as u64,
        overrides,
    )?;
    let label = match (keys, table) {
        (_, Some((_, r0, _))) => format!("attention.{entry}.{}.rows{r0}+{m}", out.buf.label),
        (Keys::Causal { .. }, None) => {
            format!("attention.{entry}.{}@{pos0}+{m}", out.buf.label)
        }
        (Keys::All { .. }, None) => {
            format!("attention.{entry}.{}.all{n_keys}x{m}@{row0}", out.buf.label)
        }
    };
    let (k, v) = (from_row(&cache.k, kv_row), from_row(&cache.v, kv_row));
    // Without a table the `rows` binding is never read: k stands in.
    let rows = table.map_or_else(|| k.clone(), |t| t.0.view());
    let Some((partials, _)) = split else {
        let views = [
            from_row(&q.buf, q_row),
            k,
            v,
            from_row(&out.buf, q_row),
            rows,
        ];
        return rec.dispatch(&kernel, &label, &views, params(&p), gpu.groups(p.n_wg));
    };
    let views = [
        q.buf.view(),
        k.clone(),
        v.clone(),
        partials.buf.view(),
        rows.clone(),
    ];
    rec.dispatch(&kernel, &label, &views, params(&p), gpu.groups(p.n_wg))?;
    // The combine pass reads the partials in q's slot; one invocation per row and vec4.
    let combine = gpu.kernel(
        shader,
        "attend_combine",
        &binds,
        ATTENTION_PARAMS_BYTES as u64,
        overrides,
    )?;
    let n = to_u32("attention", m * n_heads * cache.head_dim / 4)?;
    let views = [partials.buf.view(), k, v, out.buf.view(), rows];
    let label = format!("attention.attend_combine.{}@{pos0}+{m}", out.buf.label);
    rec.dispatch(
        &combine,
        &label,
        &views,
        params(&p),
        gpu.groups(n.div_ceil(64)),
    )
}

/// CPU reference of [`attention`]: `k_all`, `v_all` are the f32 cache contents
/// `[pos0 + m, n_kv_heads, head_dim]`; softmax in f64.
#[allow(clippy::too_many_arguments)]
pub fn reference(
    q: &[f32],
    k_all: &[f32],
    v_all: &[f32],
    m: usize,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    pos0: usize,
    scale: f32,
) -> Vec<f32> {
    let shape = (m, n_heads, n_kv_heads, head_dim);
    reference_windowed(q, k_all, v_all, shape, pos0, None, scale)
}

/// [`reference`] with a sliding `window` (`None`: none, exactly [`reference`]): query t (position
/// `pos0 + t`) sees the keys k of `k_all`, `v_all` (every position from 0, as a global cache would
/// hold them) with `pos0 + t - k < window`, as Hugging Face and llama.cpp mask them. `shape` is
/// `(m, n_heads, n_kv_heads, head_dim)`.
pub fn reference_windowed(
    q: &[f32],
    k_all: &[f32],
    v_all: &[f32],
    shape: (usize, usize, usize, usize),
    pos0: usize,
    window: Option<usize>,
    scale: f32,
) -> Vec<f32> {
    let w = window.unwrap_or(usize::MAX);
    let first = |t: usize| (pos0 + t + 1).saturating_sub(w);
    reference_keys(q, k_all, v_all, shape, |t| first(t)..pos0 + t + 1, scale)
}

/// CPU reference of [`attention_bidirectional`]: every query sees keys `0..n_keys` of `k_all`,
/// `v_all` (`[n_keys, n_kv_heads, head_dim]` or more); softmax in f64.
#[allow(clippy::too_many_arguments)]
pub fn reference_bidirectional(
    q: &[f32],
    k_all: &[f32],
    v_all: &[f32],
    m: usize,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    n_keys: usize,
    scale: f32,
) -> Vec<f32> {
    let shape = (m, n_heads, n_kv_heads, head_dim);
    reference_keys(q, k_all, v_all, shape, |_| 0..n_keys, scale)
}

/// Query token t attends keys `keys(t)`; `shape` is `(m, n_heads, n_kv_heads, head_dim)`.
fn reference_keys(
    q: &[f32],
    k_all: &[f32],
    v_all: &[f32],
    (m, n_heads, n_kv_heads, head_dim): (usize, usize, usize, usize),
    keys: impl Fn(usize) -> std::ops::Range<usize>,
    scale: f32,
) -> Vec<f32> {
    let group = n_heads / n_kv_heads.max(1);
    let mut out = vec![0f32; m * n_heads * head_dim];
    for t in 0..m {
        for h in 0..n_heads {
            let qv = &q[(t * n_heads + h) * head_dim..][..head_dim];
            let kvh = h / group.max(1);
            let row = |all: &[f32], j: usize| -> Vec<f64> {
                all[(j * n_kv_heads + kvh) * head_dim..][..head_dim]
                    .iter()
                    .map(|&x| x as f64)
                    .collect()
            };
            let seen = keys(t);
            let scores: Vec<f64> = seen
                .clone()
                .map(|j| {
                    row(k_all, j)
                        .iter()
                        .zip(qv)
                        .map(|(k, &x)| k * x as f64)
                        .sum::<f64>()
                        * scale as f64
                })
                .collect();
            let mx = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let w: Vec<f64> = scores.iter().map(|s| (s - mx).exp()).collect();
            let sum: f64 = w.iter().sum();
            let mut acc = vec![0f64; head_dim];
            for (j, wj) in seen.zip(&w) {
                for (a, v) in acc.iter_mut().zip(row(v_all, j)) {
                    *a += wj * v;
                }
            }
            for (o, a) in out[(t * n_heads + h) * head_dim..][..head_dim]
                .iter_mut()
                .zip(acc)
            {
                *o = (a / sum) as f32;
            }
        }
    }
    out
}
