//! The workgroup matrix-vector product (`shaders/matvec.wgsl`, `shaders/matvec_wg_sg.wgsl`, the
//! body in `shaders/common/matvec_wg_body.wgsl`): the matvec GPUs run. Its dispatch over one to
//! three stacked matrices, with what it folds in ([`Extras`]), takes the subgroup matvec's
//! bindings and parameter block, so that stacking and folds are written once for both.

use super::subgroup::{part_views, Extras, Input, SgPart};
use super::*;

/// Bindings of the workgroup matvec: weight data and scales, x, y, y1, y2, x2, res.
const WG_BINDS: [Bind; 8] = {
    use Bind::{Input, Output};
    [Input, Input, Input, Output, Output, Output, Input, Input]
};

/// The params of `matvec.wgsl` (the subgroup matvec's): the rows computed, from which row of
/// the binding, and where the outputs split between y, y1 and y2.
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct WgParams {
    rows: u32,
    cols: u32,
    row_start: u32,
    row0: u32,
    split1: u32,
    split2: u32,
    m: u32,
    ld: u32,
}
const _: () = assert!(std::mem::size_of::<WgParams>() == 32);

/// Rows and threads per workgroup, tokens per pass.
#[derive(Debug, Clone, Copy)]
pub(super) struct WgShape {
    pub rows: u32,
    pub threads: u32,
    pub tokens: u32,
}

/// Whether the workgroup matvec reduces its partial sums with `subgroupAdd`
/// (`matvec_wg_sg.wgsl`) rather than through workgroup memory alone (`matvec.wgsl`): where the
/// device has subgroups of 8 to 64 lanes (the kernel keeps the sums of at most threads / 8
/// subgroups, and a subgroup must not outgrow the smallest workgroup of 64).
pub fn reduces_in_subgroups(gpu: &Gpu) -> bool {
    let c = &gpu.caps;
    c.subgroups && c.subgroup_min_size >= 8 && c.subgroup_max_size <= 64
}

/// Dispatches the workgroup matvec once over 1 to 3 shards that share x, the weight format and
/// one buffer binding (stacked rows, in order: see [`matmul_fused`]). Parts after the first go
/// to row 0 of their own `y`.
#[allow(clippy::too_many_arguments)]
pub(super) fn workgroup_kernel(
    rec: &mut Recorder,
    format: WeightFormat,
    cols: usize,
    parts: &[SgPart],
    x: &View,
    extras: Extras,
    m: usize,
    shape: WgShape,
    op: &str,
) -> Result<()> {
    let gpu = rec.gpu();
    let first = parts
        .first()
        .filter(|_| parts.len() <= 3)
        .ok_or_else(|| Error::invalid(op, "the workgroup matvec takes 1 to 3 matrices"))?;
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
    let shader = if reduces_in_subgroups(gpu) {
        "matvec_wg_sg"
    } else {
        "matvec"
    };
    // f32/f16 rows of whole 16-byte quads take the vec4 entry points (`matvec_quads`).
    let quads = match format {
        WeightFormat::F32 => cols.is_multiple_of(4),
        WeightFormat::F16 => cols.is_multiple_of(8),
        _ => false,
    };
    // The integer-dot entry points read x quantised, with what XFN would fold already applied.
    let (entry, xq, xfn) = if super::idot::uses_idot(gpu, format) {
        let xq = super::idot::quantize_x(rec, x, extras.input, cols, m, op)?;
        (format!("matvec_idot_{}", format.name()), Some(xq), 0)
    } else {
        let v4 = if quads { "_v4" } else { "" };
        (format!("matvec_{}{v4}", format.name()), None, xfn)
    };
    let k = gpu.kernel(
        shader,
        &entry,
        &WG_BINDS,
        32,
        &[
            ("ROWS", shape.rows as f64),
            ("TOK", shape.tokens as f64),
            ("WG", shape.threads as f64),
            ("XFN", xfn as f64),
            ("EPS", eps as f64),
            ("RES", u32::from(res.is_some()) as f64),
        ],
    )?;
    let total: usize = parts.iter().map(|p| p.shard.rows).sum();
    // Where the outputs switch to y1 and y2 (at the end when there is no such part; the unused
    // slots bind y again).
    let split = |i: usize| -> Result<u32> {
        let rows: usize = parts.iter().take(i).map(|p| p.shard.rows).sum();
        u32_of(op, "rows", if i < parts.len() { rows } else { total })
    };
    let p = WgParams {
        rows: u32_of(op, "rows", total)?,
        cols: u32_of(op, "cols", cols)?,
        row_start: u32_of(op, "row", first.shard.row_start)?,
        row0: first.shard.data.row0(),
        split1: split(1)?,
        split2: split(2)?,
        m: u32_of(op, "tokens", m)?,
        ld: u32_of(op, "rows", first.ld)?,
    };
    let n = total.div_ceil(shape.rows as usize) * m.div_ceil(shape.tokens as usize);
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
            xq.unwrap_or_else(|| x.clone()),
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
