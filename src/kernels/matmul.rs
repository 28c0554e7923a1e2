//! Matrix kernels over [`WeightMatrix`] in every weight format: the decode matrix-vector product
//! and the prefill matrix product, one dispatch per row shard of the weights. Activations and
//! accumulation are f32.
//!
//! The matrix-vector product has two kernels ([`MatvecKernel`]): `shaders/matvec.wgsl`, rows per
//! workgroup with the partial sums reduced in workgroup memory (every device), and
//! `shaders/matvec_sg.wgsl`, rows per invocation with x shared through `subgroupBroadcast` (CPU
//! devices with 8-lane subgroups, i.e. lavapipe, where every load costs a loop over the lanes and
//! that kernel needs several times fewer loads per weight).
//!
//! The prefill product has three ([`MatmulKernel`]): the shared-memory tiled one
//! (`shaders/matmul.wgsl`, for GPUs and many tokens) and either matvec kernel run over a few
//! tokens per workgroup or invocation (for small batches, and for CPU devices, where the matvec
//! kernels, with fewer loads per multiply-add, beat the tiled one on quantised weights).

use crate::error::{Error, Result};
use crate::gpu::record::View;
use crate::gpu::WeightLayout;
use crate::gpu::{Bind, Gpu, Recorder};
use crate::kernels::weights::Shard;
use crate::kernels::{params, Tensor, WeightMatrix};
use crate::quant::repack::row_words;
use crate::quant::{WeightFormat, QK};

mod fused;
pub mod idot;
mod subgroup;
mod tiled;
mod workgroup;

pub use fused::{
    fusable, matmul_add, matmul_add_in, matmul_fused, matmul_fused_in, matmul_fused_norm,
    matmul_fused_norm_in, matmul_swiglu, matmul_swiglu_add, matmul_swiglu_add_in, matmul_swiglu_in,
    norm_folds, norm_folds_in, single_token_folds, NORM_FOLD_MAX_WEIGHTS,
};
pub(crate) use subgroup::cpu_threads;
pub use subgroup::{
    matvec_sg_rows, matvec_sg_tokens, subgroup_matvec_ok, MATVEC_SG_MAX_ROWS, MATVEC_SG_MAX_TOKENS,
};
use subgroup::{subgroup_kernel, Extras, SgPart, SG_LANES};
pub use tiled::{
    forced_prefill, prefill_tiles, tile_shape, TileMath, TileShape, TILE_MEMORY, TILE_ROWS,
    TILE_SHAPES,
};
pub use workgroup::reduces_in_subgroups;
use workgroup::{workgroup_kernel, WgShape};

/// The rows per matvec workgroup the shader supports (its `ROWS` override).
pub const MATVEC_ROWS: [u32; 3] = [4, 8, 16];
/// The threads per matvec workgroup the shader supports (its `WG` override), with rows x threads
/// at most [`MATVEC_PART`].
pub const MATVEC_THREADS: [u32; 3] = [64, 128, 256];
/// Partial sums a matvec workgroup keeps in workgroup memory (`PART` in matvec.wgsl).
pub const MATVEC_PART: u32 = 2048;
/// The tokens per matvec workgroup the shader supports (its `TOK` override).
pub const MATVEC_TOKENS: [u32; 3] = [1, 2, 4];

const BINDS: [Bind; 4] = [Bind::Input, Bind::Input, Bind::Input, Bind::Output];
fn u32_of(op: &str, what: &str, n: usize) -> Result<u32> {
    u32::try_from(n).map_err(|_| Error::invalid(op, format!("{what} {n} exceeds u32")))
}

/// The first `len` f32 of a tensor's buffer as a binding (the buffer may be larger than the tensor).
fn bound(op: &str, t: &Tensor) -> Result<View> {
    let bytes = t.len() as u64 * 4;
    if bytes == 0 || bytes > t.buf.size() {
        return Err(Error::invalid(
            op,
            format!(
                "tensor '{}' of shape {:?} does not fit its {}-byte buffer",
                t.buf.label,
                t.shape,
                t.buf.size()
            ),
        ));
    }
    Ok(t.buf.range(0, bytes))
}

/// Checks that the shards tile `0..w.rows` in order, so every output row is written exactly once.
fn check_shards(op: &str, w: &WeightMatrix) -> Result<()> {
    let mut next = 0;
    for s in &w.shards {
        if s.row_start != next || s.rows == 0 {
            return Err(Error::invalid(
                op,
                format!("shards of '{}' do not tile its rows in order", w.label),
            ));
        }
        if w.format.is_quantized() && s.scales.is_none() {
            return Err(Error::invalid(
                op,
                format!("{} weights '{}' lack block scales", w.format, w.label),
            ));
        }
        next += s.rows;
    }
    if next != w.rows {
        return Err(Error::invalid(
            op,
            format!("shards of '{}' cover {next} of {} rows", w.label, w.rows),
        ));
    }
    Ok(())
}

/// Rows and threads per workgroup of the workgroup matvec for a shard of `shard_rows` rows of a
/// `rows x cols` matrix in `format`: the one place the dispatch asks for them.
///
/// A CPU device always gets 16 rows of 64 threads: more rows means fewer loads per weight (each x
/// value serves every row), which is what lavapipe is bound by. A GPU gets what the tuner measured
/// fastest for the matrix's format and shape class ([`crate::kernels::tune::matvec_shape_for`],
/// once per device and pair, cached), with the rows capped for shards smaller than that class's
/// probe so that they keep enough workgroups (16 only while that leaves at least 256, 8 while it
/// leaves 128, else 4), and the threads halved while rows x threads would pass [`MATVEC_PART`].
pub fn matvec_shape(
    gpu: &Gpu,
    format: WeightFormat,
    rows: usize,
    cols: usize,
    shard_rows: usize,
) -> (u32, u32) {
    if gpu.info.device_type == wgpu::DeviceType::Cpu {
        return (16, 64);
    }
    use crate::kernels::tune::{matvec_shape_for, ShapeClass};
    let class = ShapeClass::of(format, rows, cols);
    let (tuned_rows, mut threads) = matvec_shape_for(gpu, format, class);
    let cap = if shard_rows >= 16 * 256 {
        16
    } else if shard_rows >= 8 * 128 {
        8
    } else {
        4
    };
    let r = if shard_rows >= class.probe_shape().0 {
        tuned_rows
    } else {
        tuned_rows.min(cap)
    };
    while threads > MATVEC_THREADS[0] && r * threads > MATVEC_PART {
        threads /= 2;
    }
    (r, threads)
}

/// Which kernel computes a matrix-vector product.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MatvecKernel {
    /// `shaders/matvec.wgsl`, `rows` (one of [`MATVEC_ROWS`]) rows and `threads` (one of
    /// [`MATVEC_THREADS`]) threads per workgroup.
    Workgroup { rows: u32, threads: u32 },
    /// `shaders/matvec_sg.wgsl`, `rows` (1 to [`MATVEC_SG_MAX_ROWS`]) rows per invocation; needs
    /// [`subgroup_matvec_ok`].
    Subgroup { rows: u32 },
}

/// The matvec kernel for a shard of `rows` rows in `format`: the subgroup one where
/// [`subgroup_matvec_ok`] (and `WGLLM_MATVEC` does not force the workgroup one:
/// [`idot::forced_matvec`]), else the workgroup one with [`matvec_shape`] (of a square matrix:
/// the dispatch asks [`matvec_shape`] with the matrix's own columns).
pub fn matvec_kernel(gpu: &Gpu, format: WeightFormat, rows: usize) -> MatvecKernel {
    if subgroup_matvec_ok(gpu) && idot::forced_matvec(gpu).is_none() {
        MatvecKernel::Subgroup {
            rows: matvec_sg_rows(format, rows, 1, 1),
        }
    } else {
        let (rows, threads) = matvec_shape(gpu, format, rows, rows, rows);
        MatvecKernel::Workgroup { rows, threads }
    }
}

/// Which kernel computes a prefill product.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MatmulKernel {
    /// Output tiles through workgroup memory (`shaders/matmul.wgsl`), f32 tiles, the shape
    /// [`tile_shape`] picks: the portable form.
    Tiled,
    /// The tiled kernel with `math` (f16 tiles need SHADER_F16) and `shape` (`None`: the one
    /// [`tile_shape`] picks).
    TiledAs {
        math: TileMath,
        shape: Option<TileShape>,
    },
    /// The matvec kernel, `tokens` (one of [`MATVEC_TOKENS`]) tokens per workgroup.
    Rows { tokens: u32 },
    /// The subgroup matvec kernel, `tokens` (1 to [`MATVEC_SG_MAX_TOKENS`]) tokens per
    /// invocation, `rows` per invocation forced or (`None`) picked per shard by
    /// [`matvec_sg_rows`]; needs [`subgroup_matvec_ok`].
    Subgroup { rows: Option<u32>, tokens: u32 },
}

/// The kernel for a product over `m` tokens: on a CPU device always a matvec kernel (it needs
/// fewer loads per multiply-add, which is what lavapipe is bound by), the subgroup one with
/// [`matvec_sg_tokens`] where [`subgroup_matvec_ok`], else four tokens per workgroup; on a GPU
/// the matvec kernel up to 8 tokens (a 64-token tile would be mostly padding), tiles beyond, in
/// the precision [`prefill_tiles`] picks. `WGLLM_PREFILL` forces the tiled kernel for more than one
/// token on any device ([`forced_prefill`]); else `WGLLM_MATVEC` the workgroup matvec
/// ([`idot::forced_matvec`]).
pub fn matmul_kernel(gpu: &Gpu, m: usize) -> MatmulKernel {
    if let Some(forced) = forced_prefill().filter(|_| m > 1) {
        return forced;
    }
    if idot::forced_matvec(gpu).is_some() {
        return MatmulKernel::Rows { tokens: 4 };
    }
    if subgroup_matvec_ok(gpu) {
        MatmulKernel::Subgroup {
            rows: None,
            tokens: matvec_sg_tokens(m),
        }
    } else if gpu.info.device_type == wgpu::DeviceType::Cpu || m <= 8 {
        MatmulKernel::Rows { tokens: 4 }
    } else {
        MatmulKernel::TiledAs {
            math: prefill_tiles(gpu),
            shape: None,
        }
    }
}

/// `y = W x` for one token: `x` is `[cols]` or `[1, cols]`, `y` is `[rows]` or `[1, rows]`.
pub fn matvec(rec: &mut Recorder, w: &WeightMatrix, x: &Tensor, y: &Tensor) -> Result<()> {
    matvec_with(rec, w, x, y, None)
}

/// [`matvec`] with the kernel forced (for tests and tuning); `None` picks [`matvec_kernel`] per
/// shard.
pub fn matvec_with(
    rec: &mut Recorder,
    w: &WeightMatrix,
    x: &Tensor,
    y: &Tensor,
    kernel: Option<MatvecKernel>,
) -> Result<()> {
    let op = format!("matvec {}", w.label);
    let vec_ok = |t: &Tensor, n: usize| t.shape == [n] || t.shape == [1, n];
    if !vec_ok(x, w.cols) {
        return Err(Error::shape(
            format!("{op} ({})", x.buf.label),
            format!("[{0}] or [1, {0}]", w.cols),
            format!("{:?}", x.shape),
        ));
    }
    if !vec_ok(y, w.rows) {
        return Err(Error::shape(
            format!("{op} ({})", y.buf.label),
            format!("[{0}] or [1, {0}]", w.rows),
            format!("{:?}", y.shape),
        ));
    }
    let kind = match kernel {
        None => Rows::Auto,
        Some(MatvecKernel::Workgroup { rows, threads }) => {
            Rows::Workgroup(Some((rows, threads)), 1)
        }
        Some(MatvecKernel::Subgroup { rows }) => Rows::Subgroup(Some(rows), 1),
    };
    rows_kernel(rec, w, x, Extras::default(), y, 1, kind, &op)
}

/// What the `m` rows of a product are, which decides how it is computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Step {
    /// `m` tokens of one sequence (a prefill chunk): the kernel and its shape that are fastest
    /// for `m`; a single token folds what [`single_token_folds`] says.
    #[default]
    Chunk,
    /// `m` decode rows of different sequences (a batched decode step): the weights are still read
    /// once for all rows (tokens per pass as for a chunk), but each row is computed exactly as
    /// a single token would be: the same folds, rows per invocation (workgroup) and threads, so
    /// its result does not depend on the other rows, bit for bit.
    Rows,
}

/// [`matmul`] for a [`Step`].
pub fn matmul_in(
    rec: &mut Recorder,
    step: Step,
    w: &WeightMatrix,
    x: &Tensor,
    y: &Tensor,
) -> Result<()> {
    if step == Step::Chunk {
        return matmul(rec, w, x, y);
    }
    let op = format!("matmul {} (decode rows)", w.label);
    let m = tokens(&op, w, x, y)?;
    match m {
        0 => Ok(()),
        1 => matmul(rec, w, x, y),
        _ => rows_kernel(rec, w, x, Extras::default(), y, m, Rows::Decode, &op),
    }
}

/// Tokens per workgroup of the workgroup matvec for `m` decode rows (1, 2 or 4; a token past
/// the end costs arithmetic only).
fn workgroup_tokens(m: usize) -> u32 {
    match m {
        0 | 1 => 1,
        2 => 2,
        _ => 4,
    }
}

/// `Y = X Wᵀ` for `m` tokens: `x` is `[.., cols]` (m = all leading dimensions), `y` has the same
/// leading dimensions and `rows` last. One token goes through [`matvec`].
pub fn matmul(rec: &mut Recorder, w: &WeightMatrix, x: &Tensor, y: &Tensor) -> Result<()> {
    matmul_with(rec, w, x, y, None)
}

/// [`matmul`] with the kernel forced (for tests and tuning); `None` picks [`matmul_kernel`].
pub fn matmul_with(
    rec: &mut Recorder,
    w: &WeightMatrix,
    x: &Tensor,
    y: &Tensor,
    kernel: Option<MatmulKernel>,
) -> Result<()> {
    let op = format!("matmul {}", w.label);
    let m = tokens(&op, w, x, y)?;
    if m == 0 {
        return Ok(());
    }
    let kind = match kernel.unwrap_or_else(|| matmul_kernel(rec.gpu(), m)) {
        // One token: a plain matvec (a forced subgroup kernel stays forced).
        MatmulKernel::Subgroup { rows, .. } if m == 1 => Rows::Subgroup(rows, 1),
        _ if m == 1 => Rows::Auto,
        MatmulKernel::Rows { tokens } => Rows::Workgroup(None, tokens),
        MatmulKernel::Subgroup { rows, tokens } => Rows::Subgroup(rows, tokens),
        MatmulKernel::Tiled => {
            return tiled::tiled_kernel(rec, w, x, y, m, TileMath::F32, None, &op)
        }
        MatmulKernel::TiledAs { math, shape } => {
            return tiled::tiled_kernel(rec, w, x, y, m, math, shape, &op)
        }
    };
    rows_kernel(rec, w, x, Extras::default(), y, m, kind, &op)
}

/// Checks that `x` is `[.., w.cols]` and `y` the same leading dimensions and `w.rows`; returns
/// the tokens (the product of the leading dimensions).
fn tokens(op: &str, w: &WeightMatrix, x: &Tensor, y: &Tensor) -> Result<usize> {
    let Some((_, lead)) = x.shape.split_last().filter(|(&c, _)| c == w.cols) else {
        return Err(Error::shape(
            format!("{op} ({})", x.buf.label),
            format!("[.., {}]", w.cols),
            format!("{:?}", x.shape),
        ));
    };
    let mut want = lead.to_vec();
    want.push(w.rows);
    y.expect(op, &want)?;
    Ok(lead.iter().product())
}

/// A matvec kernel for [`rows_kernel`]: rows and threads per workgroup (workgroup kernel) or rows
/// per invocation (subgroup kernel), forced or `None` (the policy's, per shard), and tokens per
/// workgroup.
#[derive(Debug, Clone, Copy)]
enum Rows {
    /// One token, the kernel [`matvec_kernel`] picks per shard.
    Auto,
    /// Decode rows ([`Step::Rows`]): per shard the kernel and rows (and threads) [`matvec_kernel`]
    /// picks for one token, over the rows several at a time.
    Decode,
    Workgroup(Option<(u32, u32)>, u32),
    Subgroup(Option<u32>, u32),
}

/// Why a forced kernel cannot run here, if it cannot.
fn refusal(gpu: &Gpu, kind: Rows) -> Option<String> {
    match kind {
        Rows::Auto | Rows::Decode => None,
        Rows::Workgroup(shape, tokens) => {
            if let Some((r, t)) = shape.filter(|&(r, t)| {
                !MATVEC_ROWS.contains(&r) || !MATVEC_THREADS.contains(&t) || r * t > MATVEC_PART
            }) {
                Some(format!(
                    "{r} rows and {t} threads per workgroup; the kernel takes {MATVEC_ROWS:?} \
                     rows and {MATVEC_THREADS:?} threads, rows x threads at most {MATVEC_PART}"
                ))
            } else if !MATVEC_TOKENS.contains(&tokens) {
                Some(format!(
                    "{tokens} tokens per workgroup; the kernel takes {MATVEC_TOKENS:?}"
                ))
            } else {
                None
            }
        }
        Rows::Subgroup(rows, tokens) => {
            let c = &gpu.caps;
            if !subgroup_matvec_ok(gpu) {
                Some(format!(
                    "the subgroup matvec needs a CPU device with {SG_LANES}-lane subgroups; {} \
                     has subgroups: {} (size {}-{})",
                    gpu.info.name, c.subgroups, c.subgroup_min_size, c.subgroup_max_size
                ))
            } else if let Some(r) = rows.filter(|r| !(1..=MATVEC_SG_MAX_ROWS).contains(r)) {
                Some(format!(
                    "{r} rows per invocation; the kernel takes 1 to {MATVEC_SG_MAX_ROWS}"
                ))
            } else if !(1..=MATVEC_SG_MAX_TOKENS).contains(&tokens) {
                Some(format!(
                    "{tokens} tokens per invocation; the kernel takes 1 to {MATVEC_SG_MAX_TOKENS}"
                ))
            } else {
                None
            }
        }
    }
}

/// Dispatches `matvec.wgsl` or `matvec_sg.wgsl` over `m` tokens; shapes already checked.
#[allow(clippy::too_many_arguments)]
fn rows_kernel(
    rec: &mut Recorder,
    w: &WeightMatrix,
    x: &Tensor,
    extras: Extras,
    y: &Tensor,
    m: usize,
    kind: Rows,
    op: &str,
) -> Result<()> {
    let gpu = rec.gpu();
    if let Some(why) = refusal(gpu, kind) {
        return Err(Error::invalid(op, why));
    }
    check_shards(op, w)?;
    let (xv, yv) = (bound(op, x)?, bound(op, y)?);
    let shape = |shard_rows| matvec_shape(gpu, w.format, w.rows, w.cols, shard_rows);
    for s in &w.shards {
        // The subgroup kernel's rows per invocation (forced or its rule's) and tokens per pass.
        let subgroup = match kind {
            Rows::Auto => match matvec_kernel(gpu, w.format, s.rows) {
                MatvecKernel::Workgroup { .. } => None,
                MatvecKernel::Subgroup { rows } => Some((Some(rows), 1)),
            },
            Rows::Decode => match matvec_kernel(gpu, w.format, s.rows) {
                MatvecKernel::Workgroup { .. } => None,
                MatvecKernel::Subgroup { rows } => Some((Some(rows), matvec_sg_tokens(m))),
            },
            Rows::Workgroup(..) => None,
            Rows::Subgroup(rows, tokens) => Some((rows, tokens)),
        };
        if let Some((rows, tokens)) = subgroup {
            let part = SgPart {
                shard: s,
                y: yv.clone(),
                ld: w.rows,
            };
            let (f, cols) = (w.format, w.cols);
            subgroup_kernel(rec, f, cols, &[part], &xv, extras, m, rows, tokens, op)?;
            continue;
        }
        let ((r, threads), t) = match kind {
            Rows::Workgroup(Some(shape), tokens) => (shape, tokens),
            Rows::Workgroup(None, tokens) => (shape(s.rows), tokens),
            Rows::Decode => (shape(s.rows), workgroup_tokens(m)),
            _ => (shape(s.rows), 1),
        };
        if s.data.layout() == WeightLayout::Textures {
            return Err(Error::invalid(
                op,
                format!(
                    "'{}' is in textures, which only the subgroup matvec reads",
                    w.label
                ),
            ));
        }
        let part = SgPart {
            shard: s,
            y: yv.clone(),
            ld: w.rows,
        };
        let wg = WgShape {
            rows: r,
            threads,
            tokens: t,
        };
        workgroup_kernel(rec, w.format, w.cols, &[part], &xv, extras, m, wg, op)?;
    }
    Ok(())
}

/// CPU reference of [`matvec`] and [`matmul`]: `Y[t, r] = sum_c w[r, c] x[t, c]` for `m` tokens,
/// on dequantised weights `w` (row-major `rows x cols`), accumulated in f64. Rows or tokens missing
/// from short inputs come out as zeros.
pub fn reference(w: &[f32], rows: usize, cols: usize, x: &[f32], m: usize) -> Vec<f32> {
    let mut y = vec![0f32; m * rows];
    if cols == 0 {
        return y;
    }
    for (yt, xt) in y.chunks_exact_mut(rows.max(1)).zip(x.chunks_exact(cols)) {
        for (yr, wr) in yt.iter_mut().zip(w.chunks_exact(cols)) {
            let s: f64 = wr.iter().zip(xt).map(|(a, b)| *a as f64 * *b as f64).sum();
            *yr = s as f32;
        }
    }
    y
}
