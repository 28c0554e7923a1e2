//! The subgroup matrix-vector product (`shaders/matvec_sg.wgsl`, `shaders/matvec_sg_tex.wgsl`) for
//! CPU devices with 8-lane subgroups: when it runs, its rows and tokens per invocation, and its
//! dispatch over one to three stacked matrices with what it folds in ([`Extras`]).

use super::*;
use crate::gpu::UNIFORM_WINDOW;
/// Most rows per invocation of the subgroup matvec (its `R` override takes 1 to 16); a workgroup
/// is one 8-lane subgroup, so it computes 8 times as many rows.
pub const MATVEC_SG_MAX_ROWS: u32 = 16;
/// Most tokens per invocation of the subgroup matvec (its `TOK` override takes 1 to 8).
pub const MATVEC_SG_MAX_TOKENS: u32 = 8;
/// Lanes of the subgroup (= workgroup) of `matvec_sg.wgsl`; the kernel needs exactly this size.
pub(super) const SG_LANES: usize = 8;
/// Bindings of the subgroup matvec (see shaders/common/matvec_sg_body.wgsl): weight data and
/// scales (`w`: buffers or textures), x, y, y1, y2, up, res, gamma; x and up as storage buffers
/// or uniform windows (`x`).
const fn sg_binds(w: Bind, x: Bind) -> [Bind; 9] {
    use Bind::{Input, Output};
    [w, w, x, Output, Output, Output, x, Input, Input]
}

/// What the subgroup matvec does besides `y = W x` (its XFN and RES overrides): how it makes its
/// input from x, and whether it adds a residual to its output.
#[derive(Clone, Copy, Default)]
pub(super) struct Extras<'a> {
    pub input: Input<'a>,
    /// `y = res + W x` (same shape as y; unsplit products only).
    pub res: Option<&'a Tensor>,
}

/// The input of a subgroup matvec.
#[derive(Clone, Copy, Default)]
pub(super) enum Input<'a> {
    #[default]
    Plain,
    /// `silu(x) * up`.
    Swiglu(&'a Tensor),
    /// `rms_norm(x) * gamma`, with `eps`.
    RmsNorm(&'a Tensor, f32),
}

/// The params of `matvec_sg.wgsl`: the rows computed, from which row of the binding, and where
/// the outputs split between y, y1 and y2.
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub(super) struct SgParams {
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
        // The words common/quant.wgsl's decode loads per 32 weights, scale word included (the
        // K-quants' 6-bit scales cost 2-3 words a unit, Q6_K's high bits 8 more).
        WeightFormat::Q5_0 | WeightFormat::Q5_1 => 6,
        WeightFormat::Q4_K => 12,
        WeightFormat::Q5_K => 20,
        WeightFormat::Q6_K => 18,
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

/// One matrix of a subgroup-matvec dispatch: a shard, where its rows go (`y`, rows of length
/// `ld`, starting at the shard's `row_start`).
pub(super) struct SgPart<'a> {
    pub shard: &'a Shard,
    pub y: View,
    pub ld: usize,
}

/// The weight bindings of a dispatch over `first` and `rest`: the data and scales of the first shard joined
/// with those of the shards that continue it (a stack's slices, checked by
/// [`super::fusable`]); f32/f16 bind their data's first word in the scales slot.
pub(super) fn part_views(first: &SgPart, rest: &[SgPart]) -> [View; 2] {
    let s0 = first.shard;
    let data: Vec<_> = rest.iter().map(|p| &p.shard.data).collect();
    let scales = match &s0.scales {
        Some(sc) => {
            let more: Vec<_> = rest
                .iter()
                .filter_map(|p| p.shard.scales.as_ref())
                .collect();
            sc.joined(&more)
        }
        None => s0.data.dummy(),
    };
    [s0.data.joined(&data), scales]
}

/// Dispatches `matvec_sg.wgsl` (or `matvec_sg_tex.wgsl`) once over 1 to 3 shards that share x,
/// the weight format and one binding (stacked rows of one texture, in order: see
/// [`matmul_fused`]); `rows` per invocation forced or (`None`) by [`matvec_sg_rows`] over all
/// their rows, `tokens` per invocation. Parts after the first go to row 0 of their own `y`.
#[allow(clippy::too_many_arguments)]
pub(super) fn subgroup_kernel(
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
    let (xfn, up, gamma, eps) = match extras.input {
        Input::Plain => (0, None, None, 0.0),
        Input::Swiglu(up) => (1, Some(bound(op, up)?), None, 0.0),
        Input::RmsNorm(gamma, eps) => {
            gamma.expect(op, &[cols])?;
            crate::kernels::norm::check_eps(op, eps)?;
            (2, None, Some(bound(op, gamma)?), eps)
        }
    };
    let res = match extras.res {
        Some(_) if parts.len() > 1 => {
            return Err(Error::invalid(op, "a residual needs an unsplit product"));
        }
        Some(t) => Some(bound(op, t)?),
        None => None,
    };
    // x (and up) through uniform windows where the tokens' rows fit one: see
    // shaders/common/matvec_sg_x_uniform.wgsl. Else storage buffers.
    let windows = uniform_windows(gpu, cols, m, x, up.as_ref());
    let (shader, w) = match (first.shard.data.layout(), windows.is_some()) {
        (WeightLayout::Buffers, false) => ("matvec_sg", Bind::Input),
        (WeightLayout::Buffers, true) => ("matvec_sg_ux", Bind::Input),
        (WeightLayout::Textures, false) => ("matvec_sg_tex", Bind::Texture),
        (WeightLayout::Textures, true) => ("matvec_sg_tex_ux", Bind::Texture),
    };
    let x_bind = if windows.is_some() {
        Bind::Uniform
    } else {
        Bind::Input
    };
    let (x_view, up_view) = match windows {
        Some((xw, uw)) => (xw.clone(), uw.unwrap_or(xw)),
        None => (x.clone(), up.unwrap_or_else(|| x.clone())),
    };
    let k = gpu.kernel(
        shader,
        &format!("matvec_{}", format.name()),
        &sg_binds(w, x_bind),
        std::mem::size_of::<SgParams>() as u64,
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
    let [data, scales] = part_views(first, &parts[1..]);
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
            x_view,
            y(0),
            y(1),
            y(2),
            up_view,
            res.unwrap_or_else(|| x.clone()),
            gamma.unwrap_or_else(|| x.clone()),
        ],
        params(&p),
        gpu.groups(u32_of(op, "workgroups", n)?),
    )
}

/// The uniform windows (x, and up where SwiGLU reads it) a subgroup matvec over `m` tokens of
/// rows of `cols` values reads its input through, where it can
/// (`shaders/common/matvec_sg_x_uniform.wgsl`): the device makes its buffers uniform-capable
/// ([`Gpu::uniform_inputs`]), rows are whole 32-value blocks, and the tokens' rows lie in the
/// first [`UNIFORM_WINDOW`] bytes of each buffer, which hold that many bytes. `None`: storage
/// buffers.
fn uniform_windows(
    gpu: &Gpu,
    cols: usize,
    m: usize,
    x: &View,
    up: Option<&View>,
) -> Option<(View, Option<View>)> {
    let bytes = (m as u64).checked_mul(cols as u64)?.checked_mul(4)?;
    if !gpu.uniform_inputs() || !cols.is_multiple_of(32) || bytes > UNIFORM_WINDOW {
        return None;
    }
    let xw = x.uniform_window(gpu, UNIFORM_WINDOW)?;
    match up {
        None => Some((xw, None)),
        Some(u) => Some((xw, Some(u.uniform_window(gpu, UNIFORM_WINDOW)?))),
    }
}
