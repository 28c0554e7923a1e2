//! Matrix kernels over [`WeightMatrix`] in every weight format: the decode matrix-vector product
//! (`shaders/matvec.wgsl`) and the prefill matrix product, one dispatch per row shard of the
//! weights. Activations and accumulation are f32.
//!
//! The prefill product has two kernels ([`MatmulKernel`]): the shared-memory tiled one
//! (`shaders/matmul.wgsl`, for GPUs and many tokens) and the matvec kernel run over a few tokens
//! per workgroup (for small batches, and for CPU devices such as lavapipe, where every load is
//! expensive and the matvec kernel, with fewer loads per multiply-add, is 1.4 to 1.8 times faster
//! on quantised weights).

use crate::error::{Error, Result};
use crate::gpu::record::View;
use crate::gpu::{Bind, Gpu, Recorder};
use crate::kernels::weights::Shard;
use crate::kernels::{params, Tensor, WeightMatrix};
use crate::quant::repack::row_words;
use crate::quant::QK;

/// The rows per matvec workgroup the shader supports (its `ROWS` override).
pub const MATVEC_ROWS: [u32; 3] = [4, 8, 16];
/// The tokens per matvec workgroup the shader supports (its `TOK` override).
pub const MATVEC_TOKENS: [u32; 3] = [1, 2, 4];
/// Edge of the square output tile of a matmul workgroup (`T` in matmul.wgsl).
const MATMUL_TILE: usize = 64;

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct MatvecParams {
    rows: u32,
    cols: u32,
    row_start: u32,
    row_words: u32,
    blocks: u32,
    m: u32,
    ld: u32,
    _pad: u32,
}
const _: () = assert!(std::mem::size_of::<MatvecParams>() == 32);

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct MatmulParams {
    m: u32,
    rows: u32,
    cols: u32,
    row_start: u32,
    ld: u32,
    row_words: u32,
    blocks: u32,
    tiles_n: u32,
}
const _: () = assert!(std::mem::size_of::<MatmulParams>() == 32);

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

/// The shard's data and scales as bindings; f32/f16 have no scales, so their first data word is
/// bound in that slot instead (the shaders never read it).
fn weight_views(s: &Shard) -> [View; 2] {
    let scales = s
        .scales
        .as_ref()
        .map_or_else(|| s.data.range(0, 4), |b| b.view());
    [s.data.view(), scales]
}

/// Rows per matvec workgroup for a shard of `rows` rows. More rows means fewer loads per weight
/// (each x value serves every row), which is what lavapipe is bound by, so a CPU device always gets
/// 16; a GPU gets 16 only while that still leaves at least 256 workgroups, then 8 or 4.
pub fn matvec_rows(gpu: &Gpu, rows: usize) -> u32 {
    if gpu.info.device_type == wgpu::DeviceType::Cpu || rows >= 16 * 256 {
        16
    } else if rows >= 8 * 128 {
        8
    } else {
        4
    }
}

/// Which kernel computes a prefill product.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MatmulKernel {
    /// 64 x 64 output tiles through workgroup memory (`shaders/matmul.wgsl`).
    Tiled,
    /// The matvec kernel, `tokens` (one of [`MATVEC_TOKENS`]) tokens per workgroup.
    Rows { tokens: u32 },
}

/// The kernel for a product over `m` tokens: on a CPU device always the matvec kernel, four tokens
/// at a time (it needs fewer loads per multiply-add, which is what lavapipe is bound by); on a GPU
/// the matvec kernel up to 8 tokens (a 64-token tile would be mostly padding), tiles beyond.
pub fn matmul_kernel(gpu: &Gpu, m: usize) -> MatmulKernel {
    if gpu.info.device_type == wgpu::DeviceType::Cpu || m <= 8 {
        MatmulKernel::Rows { tokens: 4 }
    } else {
        MatmulKernel::Tiled
    }
}

/// `y = W x` for one token: `x` is `[cols]` or `[1, cols]`, `y` is `[rows]` or `[1, rows]`.
pub fn matvec(rec: &mut Recorder, w: &WeightMatrix, x: &Tensor, y: &Tensor) -> Result<()> {
    matvec_with_rows(rec, w, x, y, None)
}

/// [`matvec`] with the rows per workgroup forced to one of [`MATVEC_ROWS`] (for tests and
/// tuning); `None` picks [`matvec_rows`] per shard.
pub fn matvec_with_rows(
    rec: &mut Recorder,
    w: &WeightMatrix,
    x: &Tensor,
    y: &Tensor,
    rows_per_group: Option<u32>,
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
    rows_kernel(rec, w, x, y, 1, rows_per_group, 1, &op)
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
    let Some((_, lead)) = x.shape.split_last().filter(|(&c, _)| c == w.cols) else {
        return Err(Error::shape(
            format!("{op} ({})", x.buf.label),
            format!("[.., {}]", w.cols),
            format!("{:?}", x.shape),
        ));
    };
    let mut want = lead.to_vec();
    want.push(w.rows);
    y.expect(&op, &want)?;
    let m: usize = lead.iter().product();
    if m == 0 {
        return Ok(());
    }
    match kernel.unwrap_or_else(|| matmul_kernel(rec.gpu(), m)) {
        _ if m == 1 => rows_kernel(rec, w, x, y, 1, None, 1, &op),
        MatmulKernel::Rows { tokens } => rows_kernel(rec, w, x, y, m, None, tokens, &op),
        MatmulKernel::Tiled => tiled_kernel(rec, w, x, y, m, &op),
    }
}

/// Dispatches `matvec.wgsl` over `m` tokens, `tokens` per workgroup; shapes already checked.
#[allow(clippy::too_many_arguments)]
fn rows_kernel(
    rec: &mut Recorder,
    w: &WeightMatrix,
    x: &Tensor,
    y: &Tensor,
    m: usize,
    rows_per_group: Option<u32>,
    tokens: u32,
    op: &str,
) -> Result<()> {
    if let Some(r) = rows_per_group.filter(|r| !MATVEC_ROWS.contains(r)) {
        return Err(Error::invalid(
            op,
            format!("{r} rows per workgroup; the kernel takes {MATVEC_ROWS:?}"),
        ));
    }
    if !MATVEC_TOKENS.contains(&tokens) {
        return Err(Error::invalid(
            op,
            format!("{tokens} tokens per workgroup; the kernel takes {MATVEC_TOKENS:?}"),
        ));
    }
    check_shards(op, w)?;
    let (xv, yv) = (bound(op, x)?, bound(op, y)?);
    let gpu = rec.gpu();
    let entry = format!("matvec_{}", w.format.name());
    let cols = u32_of(op, "cols", w.cols)?;
    let rw = u32_of(op, "row words", row_words(w.format, w.cols))?;
    let token_groups = m.div_ceil(tokens as usize);
    for s in &w.shards {
        let r = rows_per_group.unwrap_or_else(|| matvec_rows(gpu, s.rows));
        let k = gpu.kernel(
            "matvec",
            &entry,
            &BINDS,
            32,
            &[("ROWS", r as f64), ("TOK", tokens as f64)],
        )?;
        let p = MatvecParams {
            rows: u32_of(op, "rows", s.rows)?,
            cols,
            row_start: u32_of(op, "row", s.row_start)?,
            row_words: rw,
            blocks: (w.cols / QK) as u32,
            m: u32_of(op, "tokens", m)?,
            ld: u32_of(op, "rows", w.rows)?,
            _pad: 0,
        };
        let n = s.rows.div_ceil(r as usize) * token_groups;
        let [data, scales] = weight_views(s);
        rec.dispatch(
            &k,
            &format!("matvec.{}", s.data.label),
            &[data, scales, xv.clone(), yv.clone()],
            params(&p),
            gpu.groups(u32_of(op, "workgroups", n)?),
        )?;
    }
    Ok(())
}

/// Dispatches `matmul.wgsl` over `m` tokens; shapes already checked.
fn tiled_kernel(
    rec: &mut Recorder,
    w: &WeightMatrix,
    x: &Tensor,
    y: &Tensor,
    m: usize,
    op: &str,
) -> Result<()> {
    check_shards(op, w)?;
    let (xv, yv) = (bound(op, x)?, bound(op, y)?);
    let gpu = rec.gpu();
    let entry = format!("matmul_{}", w.format.name());
    let k = gpu.kernel("matmul", &entry, &BINDS, 32, &[])?;
    let mu = u32_of(op, "tokens", m)?;
    let cols = u32_of(op, "cols", w.cols)?;
    let ld = u32_of(op, "rows", w.rows)?;
    let rw = u32_of(op, "row words", row_words(w.format, w.cols))?;
    let tiles_m = m.div_ceil(MATMUL_TILE);
    for s in &w.shards {
        let tiles_n = s.rows.div_ceil(MATMUL_TILE);
        let p = MatmulParams {
            m: mu,
            rows: u32_of(op, "rows", s.rows)?,
            cols,
            row_start: u32_of(op, "row", s.row_start)?,
            ld,
            row_words: rw,
            blocks: (w.cols / QK) as u32,
            tiles_n: u32_of(op, "tiles", tiles_n)?,
        };
        let groups = gpu.groups(u32_of(op, "tiles", tiles_n * tiles_m)?);
        let [data, scales] = weight_views(s);
        rec.dispatch(
            &k,
            &format!("matmul.{}", s.data.label),
            &[data, scales, xv.clone(), yv.clone()],
            params(&p),
            groups,
        )?;
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
