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

/// The rows per matvec workgroup the shader supports (its `ROWS` override).
pub const MATVEC_ROWS: [u32; 3] = [4, 8, 16];
/// The tokens per matvec workgroup the shader supports (its `TOK` override).
pub const MATVEC_TOKENS: [u32; 3] = [1, 2, 4];
/// Most rows per invocation of the subgroup matvec (its `R` override takes 1 to 16); a workgroup
/// is one 8-lane subgroup, so it computes 8 times as many rows.
pub const MATVEC_SG_MAX_ROWS: u32 = 16;
/// Most tokens per invocation of the subgroup matvec (its `TOK` override takes 1 to 8).
pub const MATVEC_SG_MAX_TOKENS: u32 = 8;
/// Lanes of the subgroup (= workgroup) of `matvec_sg.wgsl`; the kernel needs exactly this size.
const SG_LANES: usize = 8;
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
/// Bindings of the subgroup matvec (see shaders/common/matvec_sg_body.wgsl): weight data and
/// scales (buffers or textures), x, y, y1, y2, x2, res.
const SG_BINDS: [Bind; 8] = sg_binds(Bind::Input);
const SG_TEX_BINDS: [Bind; 8] = sg_binds(Bind::Texture);

const fn sg_binds(w: Bind) -> [Bind; 8] {
    use Bind::{Input, Output};
    [w, w, Input, Output, Output, Output, Input, Input]
}

/// What the subgroup matvec does besides `y = W x` (its XFN and RES overrides): how it makes its
/// input from x, and whether it adds a residual to its output.
#[derive(Clone, Copy, Default)]
struct Extras<'a> {
    input: Input<'a>,
    /// `y = res + W x` (same shape as y; unsplit products only).
    res: Option<&'a Tensor>,
}

/// The input of a subgroup matvec.
#[derive(Clone, Copy, Default)]
enum Input<'a> {
    #[default]
    Plain,
    /// `silu(x) * up`.
    Swiglu(&'a Tensor),
    /// `rms_norm(x) * gamma`, with `eps`.
    RmsNorm(&'a Tensor, f32),
}

impl Extras<'_> {
    fn is_plain(&self) -> bool {
        matches!(self.input, Input::Plain) && self.res.is_none()
    }
}

/// The params of `matvec_sg.wgsl`: the rows computed, from which row of the binding, and where
/// the outputs split between y, y1 and y2.
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct SgParams {
    rows: u32,
    cols: u32,
    row_start: u32,
    row0: u32,
    split1: u32,
    split2: u32,
    m: u32,
    ld: u32,
}
const _: () = assert!(std::mem::size_of::<SgParams>() == 32);

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

/// Rows per matvec workgroup for a shard of `rows` rows. More rows means fewer loads per weight
/// (each x value serves every row), which is what lavapipe is bound by, so a CPU device always gets
/// 16. A GPU gets what the tuner measured fastest on its probe matrix
/// ([`crate::kernels::tune::matvec_rows_choice`], once per device, cached), capped for shards
/// smaller than the probe so that they keep enough workgroups: 16 only while that leaves at least
/// 256, 8 while it leaves 128, else 4.
pub fn matvec_rows(gpu: &Gpu, rows: usize) -> u32 {
    if gpu.info.device_type == wgpu::DeviceType::Cpu {
        return 16;
    }
    let tuned = *gpu.matvec_rows.get_or_init(|| {
        crate::kernels::tune::matvec_rows_choice(gpu).map_or_else(
            |e| {
                log::warn!("measuring the matvec rows failed ({e}); 16 rows per workgroup");
                16
            },
            |c| c.rows,
        )
    });
    let cap = if rows >= 16 * 256 {
        16
    } else if rows >= 8 * 128 {
        8
    } else {
        4
    };
    if rows >= crate::kernels::tune::PROBE_ROWS {
        tuned
    } else {
        tuned.min(cap)
    }
}

/// Whether the device runs `matvec_sg.wgsl` and is one it is meant for: subgroup operations with
/// subgroups of exactly 8 lanes, on a CPU (lavapipe). GPUs keep `matvec.wgsl`, which is tuned for
/// them and needs no optional feature.
pub fn subgroup_matvec_ok(gpu: &Gpu) -> bool {
    let c = &gpu.caps;
    c.subgroups
        && c.subgroup_min_size == SG_LANES as u32
        && c.subgroup_max_size == SG_LANES as u32
        && gpu.info.device_type == wgpu::DeviceType::Cpu
}

/// Tokens per invocation of the subgroup matvec for a product over `m` tokens: 1, 2, 4 or 8, few
/// sizes because each is a pipeline to compile (a token past `m` costs no loads, only arithmetic).
pub fn matvec_sg_tokens(m: usize) -> u32 {
    match m {
        0 | 1 => 1,
        2 => 2,
        3 | 4 => 4,
        _ => 8,
    }
}

/// The threads lavapipe runs workgroups on: `LP_NUM_THREADS` where set, else one per CPU.
pub(crate) fn cpu_threads() -> usize {
    std::env::var("LP_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .max(1)
}

/// Rows per invocation of the subgroup matvec for a shard of `rows` rows in `format`, `m` tokens
/// taken `tokens` at a time. On lavapipe a workgroup costs its loads: per block, each lane loads
/// 4 x values per token and the block's words of each of its R rows (9 for Q8_0, 5 for Q4, 16 or
/// 32 for f16/f32), so more rows cost fewer loads per weight; but the workgroups must also share
/// out evenly over the CPU threads (576 rows are 4.5 workgroups of 8 x 16 rows). So 16 from 4096
/// rows on, below that the one of 12, 8 and 4 with the fewest loads per thread, the largest on a
/// tie. Every R is a pipeline to compile (0.2-0.4 s, and 0.5-4 s for LLVM when Mesa's shader cache
/// is cold), so the choice is kept coarse: a small model's matrices all get R = 12, where 16 would
/// save 1-2% of the decode loads of its larger matrices.
pub fn matvec_sg_rows(format: WeightFormat, rows: usize, m: usize, tokens: u32) -> u32 {
    if rows >= 4096 {
        return MATVEC_SG_MAX_ROWS;
    }
    let words = match format {
        WeightFormat::F32 => 32,
        WeightFormat::F16 => 16,
        WeightFormat::Q8_0 => 9,
        WeightFormat::Q4_0 | WeightFormat::Q4_1 => 5,
    };
    let (threads, tokens) = (cpu_threads(), tokens.max(1) as usize);
    let groups = m.div_ceil(tokens).max(1);
    [12, 8, 4]
        .into_iter()
        .min_by_key(|&r| {
            let workgroups = rows.div_ceil(SG_LANES * r) * groups;
            workgroups.div_ceil(threads) * (4 * tokens + words * r)
        })
        .map_or(MATVEC_SG_MAX_ROWS, |r| r as u32)
}

/// Which kernel computes a matrix-vector product.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MatvecKernel {
    /// `shaders/matvec.wgsl`, `rows` (one of [`MATVEC_ROWS`]) rows per workgroup.
    Workgroup { rows: u32 },
    /// `shaders/matvec_sg.wgsl`, `rows` (1 to [`MATVEC_SG_MAX_ROWS`]) rows per invocation; needs
    /// [`subgroup_matvec_ok`].
    Subgroup { rows: u32 },
}

/// The matvec kernel for a shard of `rows` rows in `format`: the subgroup one where
/// [`subgroup_matvec_ok`], else the workgroup one with [`matvec_rows`].
pub fn matvec_kernel(gpu: &Gpu, format: WeightFormat, rows: usize) -> MatvecKernel {
    if subgroup_matvec_ok(gpu) {
        MatvecKernel::Subgroup {
            rows: matvec_sg_rows(format, rows, 1, 1),
        }
    } else {
        MatvecKernel::Workgroup {
            rows: matvec_rows(gpu, rows),
        }
    }
}

/// Which kernel computes a prefill product.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MatmulKernel {
    /// 64 x 64 output tiles through workgroup memory (`shaders/matmul.wgsl`).
    Tiled,
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
/// the matvec kernel up to 8 tokens (a 64-token tile would be mostly padding), tiles beyond.
pub fn matmul_kernel(gpu: &Gpu, m: usize) -> MatmulKernel {
    if subgroup_matvec_ok(gpu) {
        MatmulKernel::Subgroup {
            rows: None,
            tokens: matvec_sg_tokens(m),
        }
    } else if gpu.info.device_type == wgpu::DeviceType::Cpu || m <= 8 {
        MatmulKernel::Rows { tokens: 4 }
    } else {
        MatmulKernel::Tiled
    }
}

/// `y = W x` for one token: `x` is `[cols]` or `[1, cols]`, `y` is `[rows]` or `[1, rows]`.
pub fn matvec(rec: &mut Recorder, w: &WeightMatrix, x: &Tensor, y: &Tensor) -> Result<()> {
    matvec_with(rec, w, x, y, None)
}

/// [`matvec`] with the workgroup kernel forced to one of [`MATVEC_ROWS`] rows per workgroup (for
/// tests and tuning); `None` picks [`matvec_kernel`] per shard.
pub fn matvec_with_rows(
    rec: &mut Recorder,
    w: &WeightMatrix,
    x: &Tensor,
    y: &Tensor,
    rows_per_group: Option<u32>,
) -> Result<()> {
    let kernel = rows_per_group.map(|rows| MatvecKernel::Workgroup { rows });
    matvec_with(rec, w, x, y, kernel)
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
        Some(MatvecKernel::Workgroup { rows }) => Rows::Workgroup(Some(rows), 1),
        Some(MatvecKernel::Subgroup { rows }) => Rows::Subgroup(Some(rows), 1),
    };
    rows_kernel(rec, w, x, Extras::default(), y, 1, kind, &op)
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
        MatmulKernel::Tiled => return tiled_kernel(rec, w, x, y, m, &op),
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

/// A matvec kernel for [`rows_kernel`]: rows per workgroup (workgroup kernel) or per invocation
/// (subgroup kernel), forced or `None` (the policy's, per shard), and tokens per workgroup.
#[derive(Debug, Clone, Copy)]
enum Rows {
    /// One token, the kernel [`matvec_kernel`] picks per shard.
    Auto,
    Workgroup(Option<u32>, u32),
    Subgroup(Option<u32>, u32),
}

/// Why a forced kernel cannot run here, if it cannot.
fn refusal(gpu: &Gpu, kind: Rows) -> Option<String> {
    match kind {
        Rows::Auto => None,
        Rows::Workgroup(rows, tokens) => {
            if let Some(r) = rows.filter(|r| !MATVEC_ROWS.contains(r)) {
                Some(format!(
                    "{r} rows per workgroup; the kernel takes {MATVEC_ROWS:?}"
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
    let entry = format!("matvec_{}", w.format.name());
    let cols = u32_of(op, "cols", w.cols)?;
    let rw = u32_of(op, "row words", row_words(w.format, w.cols))?;
    for s in &w.shards {
        // The subgroup kernel's rows per invocation (forced or its rule's) and tokens per pass.
        let subgroup = match kind {
            Rows::Auto => match matvec_kernel(gpu, w.format, s.rows) {
                MatvecKernel::Workgroup { .. } => None,
                MatvecKernel::Subgroup { rows } => Some((Some(rows), 1)),
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
        let (r, t) = match kind {
            Rows::Workgroup(rows, tokens) => {
                (rows.unwrap_or_else(|| matvec_rows(gpu, s.rows)), tokens)
            }
            _ => (matvec_rows(gpu, s.rows), 1),
        };
        if !extras.is_plain() {
            return Err(Error::invalid(
                op,
                "only the subgroup matvec folds SwiGLU, RMSNorm or a residual in",
            ));
        }
        if s.data.layout() == WeightLayout::Textures {
            return Err(Error::invalid(
                op,
                format!(
                    "'{}' is in textures, which only the subgroup matvec reads",
                    w.label
                ),
            ));
        }
        let k = gpu.kernel(
            "matvec",
            &entry,
            &BINDS,
            32,
            &[("ROWS", r as f64), ("TOK", t as f64)],
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
        let n = s.rows.div_ceil(r as usize) * m.div_ceil(t as usize);
        let [data, scales] = s.views();
        rec.dispatch(
            &k,
            &format!("matvec.{}", s.data.label()),
            &[data, scales, xv.clone(), yv.clone()],
            params(&p),
            gpu.groups(u32_of(op, "workgroups", n)?),
        )?;
    }
    Ok(())
}

/// One matrix of a subgroup-matvec dispatch: a shard, where its rows go (`y`, rows of length
/// `ld`, starting at the shard's `row_start`).
struct SgPart<'a> {
    shard: &'a Shard,
    y: View,
    ld: usize,
}

/// Dispatches `matvec_sg.wgsl` (or `matvec_sg_tex.wgsl`) once over 1 to 3 shards that share x,
/// the weight format and one binding (stacked rows of one texture, in order: see
/// [`matmul_fused`]); `rows` per invocation forced or (`None`) by [`matvec_sg_rows`] over all
/// their rows, `tokens` per invocation. Parts after the first go to row 0 of their own `y`.
#[allow(clippy::too_many_arguments)]
fn subgroup_kernel(
    rec: &mut Recorder,
    format: WeightFormat,
    cols: usize,
    parts: &[SgPart],
    x: &View,
    extras: Extras,
    m: usize,
    rows: Option<u32>,
    tokens: u32,
    op: &str,
) -> Result<()> {
    let gpu = rec.gpu();
    let first = parts
        .first()
        .filter(|_| parts.len() <= 3)
        .ok_or_else(|| Error::invalid(op, "the subgroup matvec takes 1 to 3 matrices"))?;
    let total: usize = parts.iter().map(|p| p.shard.rows).sum();
    let r = rows.unwrap_or_else(|| matvec_sg_rows(format, total, m, tokens));
    let (xfn, x2, eps) = match extras.input {
        Input::Plain => (0, None, 0.0),
        Input::Swiglu(up) => (1, Some(bound(op, up)?), 0.0),
        Input::RmsNorm(gamma, eps) => {
            gamma.expect(op, &[cols])?;
            crate::kernels::norm::check_eps(op, eps)?;
            (2, Some(bound(op, gamma)?), eps)
        }
    };
    let res = match extras.res {
        Some(_) if parts.len() > 1 => {
            return Err(Error::invalid(op, "a residual needs an unsplit product"));
        }
        Some(t) => Some(bound(op, t)?),
        None => None,
    };
    let (shader, binds) = match first.shard.data.layout() {
        WeightLayout::Buffers => ("matvec_sg", &SG_BINDS),
        WeightLayout::Textures => ("matvec_sg_tex", &SG_TEX_BINDS),
    };
    let k = gpu.kernel(
        shader,
        &format!("matvec_{}", format.name()),
        binds,
        32,
        &[
            ("R", r as f64),
            ("TOK", tokens as f64),
            ("XFN", xfn as f64),
            ("EPS", eps as f64),
            ("RES", u32::from(res.is_some()) as f64),
        ],
    )?;
    // Where the outputs switch to y1 and y2 (at the end when there is no such part; the unused
    // slots bind y again).
    let split = |i: usize| -> Result<u32> {
        let rows: usize = parts.iter().take(i).map(|p| p.shard.rows).sum();
        u32_of(op, "rows", if i < parts.len() { rows } else { total })
    };
    let p = SgParams {
        rows: u32_of(op, "rows", total)?,
        cols: u32_of(op, "cols", cols)?,
        row_start: u32_of(op, "row", first.shard.row_start)?,
        row0: first.shard.data.row0(),
        split1: split(1)?,
        split2: split(2)?,
        m: u32_of(op, "tokens", m)?,
        ld: u32_of(op, "rows", first.ld)?,
    };
    let per = r as usize * SG_LANES;
    let n = total.div_ceil(per) * m.div_ceil(tokens as usize);
    let y = |i: usize| parts.get(i).unwrap_or(first).y.clone();
    let [data, scales] = first.shard.views();
    let label = parts
        .iter()
        .map(|p| p.shard.data.label())
        .collect::<Vec<_>>()
        .join("+");
    rec.dispatch(
        &k,
        &format!("{shader}.{label}"),
        &[
            data,
            scales,
            x.clone(),
            y(0),
            y(1),
            y(2),
            x2.unwrap_or_else(|| x.clone()),
            res.unwrap_or_else(|| x.clone()),
        ],
        params(&p),
        gpu.groups(u32_of(op, "workgroups", n)?),
    )
}

/// `ys[i] = xs W_iᵀ` for 1 to 3 matrices that read the same `x` (Q, K and V; gate and up): one
/// dispatch where [`fusable`] says so, else one [`matmul`] each. `x` is `[.., cols]`, each `ys[i]`
/// has the same leading dimensions and `ws[i].rows` last.
pub fn matmul_fused(
    rec: &mut Recorder,
    ws: &[&WeightMatrix],
    x: &Tensor,
    ys: &[&Tensor],
) -> Result<()> {
    let op = fused_op("fused matmul", ws);
    if !fusable(rec.gpu(), ws) {
        check_fused(&op, ws, ys)?;
        for (w, y) in ws.iter().zip(ys) {
            matmul(rec, w, x, y)?;
        }
        return Ok(());
    }
    fused_kernel(rec, ws, x, ys, Extras::default(), &op)
}

/// Most weights a single token's projections may have for [`matmul_fused_norm`] to fold the
/// norm in. The fold saves a dispatch and the norm pass (about 130 us on lavapipe) but makes
/// every workgroup load gamma beside x (about 8 ns a column and workgroup there, two threads):
/// measured on SmolLM2, the fold wins at Q/K/V (0.55 M weights, 10 workgroups) and by a little at
/// gate/up (1.8 M, 32 workgroups), and loses at the 28 M-weight head (BENCHMARKS.md); at R = 12
/// rows per invocation the estimate breaks even near 3 M.
pub const NORM_FOLD_MAX_WEIGHTS: usize = 1 << 22;

/// Whether [`matmul_fused_norm`] folds the norm into the projections `ws` for `m` tokens: a
/// single token where [`single_token_folds`], the projections together at most
/// [`NORM_FOLD_MAX_WEIGHTS`].
pub fn norm_folds(gpu: &Gpu, ws: &[&WeightMatrix], m: usize) -> bool {
    let weights: usize = ws.iter().map(|w| w.rows * w.cols).sum();
    single_token_folds(gpu) && m == 1 && weights <= NORM_FOLD_MAX_WEIGHTS
}

/// `ys[i] = rms_norm(x) W_iᵀ` (the norm with `gamma` and `eps`): [`matmul_fused`] of the
/// attention or FFN block after its RMSNorm. Where [`norm_folds`], the subgroup matvec
/// normalises x as it loads it (the norm's `1 / rms` scales each finished row), so there is no
/// norm pass and `xb` is not touched; otherwise [`crate::kernels::norm::rms_norm`] into `xb`,
/// then [`matmul_fused`].
#[allow(clippy::too_many_arguments)]
pub fn matmul_fused_norm(
    rec: &mut Recorder,
    ws: &[&WeightMatrix],
    x: &Tensor,
    gamma: &Tensor,
    eps: f32,
    xb: &Tensor,
    ys: &[&Tensor],
) -> Result<()> {
    if !norm_folds(rec.gpu(), ws, lead(x)) {
        crate::kernels::norm::rms_norm(rec, x, gamma, eps, xb)?;
        return matmul_fused(rec, ws, xb, ys);
    }
    let op = fused_op("fused matmul (RMSNorm input)", ws);
    let extras = Extras {
        input: Input::RmsNorm(gamma, eps),
        res: None,
    };
    if fusable(rec.gpu(), ws) {
        return fused_kernel(rec, ws, x, ys, extras, &op);
    }
    // Matrices apart (streamed layers, the output head): each dispatch takes the norm itself.
    check_fused(&op, ws, ys)?;
    for (w, y) in ws.iter().zip(ys) {
        let m = tokens(&op, w, x, y)?;
        rows_kernel(rec, w, x, extras, y, m, Rows::Subgroup(None, 1), &op)?;
    }
    Ok(())
}

/// `y = res + x Wᵀ`, a projection added to the residual stream (`res` and `y` the same shape):
/// for a single token where [`single_token_folds`], the subgroup matvec adds `res` as it stores
/// (no add pass); otherwise [`matmul`] into `proj`, then [`crate::kernels::elementwise::add`].
pub fn matmul_add(
    rec: &mut Recorder,
    w: &WeightMatrix,
    x: &Tensor,
    res: &Tensor,
    proj: &Tensor,
    y: &Tensor,
) -> Result<()> {
    let op = format!("matmul {} (+ residual)", w.label);
    res.expect(&op, &y.shape)?;
    let m = tokens(&op, w, x, y)?;
    if !single_token_folds(rec.gpu()) || m != 1 {
        matmul(rec, w, x, proj)?;
        return crate::kernels::elementwise::add(rec, res, proj, y);
    }
    let extras = Extras {
        input: Input::Plain,
        res: Some(res),
    };
    rows_kernel(rec, w, x, extras, y, m, Rows::Subgroup(None, 1), &op)
}

/// The tokens of `x` (`[.., cols]`: the product of its leading dimensions).
fn lead(x: &Tensor) -> usize {
    x.shape.iter().rev().skip(1).product()
}

fn fused_op(what: &str, ws: &[&WeightMatrix]) -> String {
    let names = ws.iter().map(|w| w.label.as_str()).collect::<Vec<_>>();
    format!("{what} {}", names.join("+"))
}

fn check_fused(op: &str, ws: &[&WeightMatrix], ys: &[&Tensor]) -> Result<()> {
    if ws.len() != ys.len() || ws.is_empty() {
        return Err(Error::invalid(
            op,
            format!("{} matrices and {} outputs", ws.len(), ys.len()),
        ));
    }
    Ok(())
}

/// One subgroup-matvec dispatch over the stacked matrices `ws` ([`fusable`]).
fn fused_kernel(
    rec: &mut Recorder,
    ws: &[&WeightMatrix],
    x: &Tensor,
    ys: &[&Tensor],
    extras: Extras,
    op: &str,
) -> Result<()> {
    check_fused(op, ws, ys)?;
    let cols = ws[0].cols;
    let mut m = 0;
    let mut parts = Vec::with_capacity(ws.len());
    for (w, y) in ws.iter().zip(ys) {
        m = tokens(op, w, x, y)?;
        parts.push(SgPart {
            shard: &w.shards[0],
            y: bound(op, y)?,
            ld: w.rows,
        });
    }
    if m == 0 {
        return Ok(());
    }
    let xv = bound(op, x)?;
    let per_pass = matvec_sg_tokens(m);
    subgroup_kernel(
        rec,
        ws[0].format,
        cols,
        &parts,
        &xv,
        extras,
        m,
        None,
        per_pass,
        op,
    )
}

/// `y = swiglu(gate, up) Wᵀ`, SwiGLU (`silu(gate) * up`) feeding a projection (the FFN's down
/// projection): for a single token where [`single_token_folds`], the subgroup matvec computes
/// SwiGLU as it loads its input, so there is no pass of its own and `act` is not touched;
/// otherwise [`crate::kernels::activation::swiglu`] into `act`, then [`matmul`] (at 8 tokens a
/// pass, the folded form's doubled input loads cost lavapipe more than the separate pass saves).
/// `gate`, `up` and `act` are `[.., cols]`, `y` `[.., rows]`.
pub fn matmul_swiglu(
    rec: &mut Recorder,
    w: &WeightMatrix,
    gate: &Tensor,
    up: &Tensor,
    act: &Tensor,
    y: &Tensor,
) -> Result<()> {
    swiglu_kernel(rec, w, gate, up, act, None, y)
}

/// `y = res + swiglu(gate, up) Wᵀ`: [`matmul_swiglu`] added to the residual stream, folded like
/// [`matmul_add`] (else the product goes to `proj` and an add pass follows).
#[allow(clippy::too_many_arguments)]
pub fn matmul_swiglu_add(
    rec: &mut Recorder,
    w: &WeightMatrix,
    gate: &Tensor,
    up: &Tensor,
    act: &Tensor,
    res: &Tensor,
    proj: &Tensor,
    y: &Tensor,
) -> Result<()> {
    res.expect(&format!("matmul {} (+ residual)", w.label), &y.shape)?;
    if !single_token_folds(rec.gpu()) || lead(gate) != 1 {
        swiglu_kernel(rec, w, gate, up, act, None, proj)?;
        return crate::kernels::elementwise::add(rec, res, proj, y);
    }
    swiglu_kernel(rec, w, gate, up, act, Some(res), y)
}

fn swiglu_kernel(
    rec: &mut Recorder,
    w: &WeightMatrix,
    gate: &Tensor,
    up: &Tensor,
    act: &Tensor,
    res: Option<&Tensor>,
    y: &Tensor,
) -> Result<()> {
    if !single_token_folds(rec.gpu()) || lead(gate) != 1 {
        crate::kernels::activation::swiglu(rec, gate, up, act)?;
        return matmul(rec, w, act, y);
    }
    let op = format!("matmul {} (SwiGLU input)", w.label);
    up.expect(&op, &gate.shape)?;
    let m = tokens(&op, w, gate, y)?;
    let extras = Extras {
        input: Input::Swiglu(up),
        res,
    };
    rows_kernel(rec, w, gate, extras, y, m, Rows::Subgroup(None, 1), &op)
}

/// Whether a single token's products fold in what runs around them: SwiGLU into the down
/// projection's input ([`matmul_swiglu`]), RMSNorm into the next projections' input
/// ([`matmul_fused_norm`]) and the residual adds into the projections' output ([`matmul_add`],
/// [`matmul_swiglu_add`]). Where the subgroup matvec runs; the memory plan's schedule follows
/// ([`crate::plan::PlanOptions::single_token_folds`]). Chunks of several tokens keep the passes:
/// each fold reloads its input per token, where a pass over 8 tokens costs lavapipe less.
pub fn single_token_folds(gpu: &Gpu) -> bool {
    subgroup_matvec_ok(gpu)
}

/// Whether [`matmul_fused`] runs `ws` as one dispatch: the device runs the subgroup matvec, and
/// the matrices (2 or 3) are slices of one texture, in order, one shard each, in one format
/// ([`Gpu::upload_weights_stacked`] makes them).
pub fn fusable(gpu: &Gpu, ws: &[&WeightMatrix]) -> bool {
    let Some(w0) = ws.first() else { return false };
    let Some(tex) = w0.shards.first().and_then(|s| s.data.texture()) else {
        return false;
    };
    let mut next = w0.shards[0].data.row0();
    subgroup_matvec_ok(gpu)
        && (2..=3).contains(&ws.len())
        && ws.iter().all(|w| {
            let ok = w.shards.len() == 1
                && w.format == w0.format
                && w.cols == w0.cols
                && w.shards[0].row_start == 0
                && w.shards[0].data.row0() == next
                && w.shards[0]
                    .data
                    .texture()
                    .is_some_and(|t| std::sync::Arc::ptr_eq(t, tex));
            next += w.rows as u32;
            ok
        })
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
    if w.shards
        .iter()
        .any(|s| s.data.layout() == WeightLayout::Textures)
    {
        return Err(Error::invalid(
            op,
            format!(
                "'{}' is in textures, which the tiled matmul cannot read",
                w.label
            ),
        ));
    }
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
        let [data, scales] = s.views();
        rec.dispatch(
            &k,
            &format!("matmul.{}", s.data.label()),
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
