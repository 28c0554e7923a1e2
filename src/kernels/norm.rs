//! Row normalisations (`shaders/norm.wgsl`): RMSNorm (alone, or with the residual add before it)
//! and LayerNorm over the last dimension of an `[m, n]` activation, one workgroup per row with
//! shared-memory (pairwise) reductions. LayerNorm uses two passes (mean, then the mean of squared
//! deviations), so a large mean does not cancel the variance away. On CPU devices with 8-lane
//! subgroups, the RMSNorm kernels come from `shaders/norm_sg.wgsl` (one subgroup per row, no
//! barriers), which llvmpipe runs several times faster.

use crate::error::{Error, Result};
use crate::gpu::{Bind, Recorder};
use crate::kernels::{params, Tensor};

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    m: u32,
    n: u32,
    eps: f32,
    _pad: u32,
}
const _: () = assert!(std::mem::size_of::<Params>() == 16);

/// Checks `x` is `[.., n]` (rows = product of the leading dims), `out` has its shape and the
/// per-column vectors are `[n]`; returns `(m, n)`.
fn rows_cols(op: &str, x: &Tensor, out: &Tensor, vecs: &[&Tensor]) -> Result<(u32, u32)> {
    let n = match x.shape.last() {
        Some(&n) if n > 0 => n,
        _ => {
            return Err(Error::shape(
                format!("{op} ({})", x.buf.label),
                "a non-empty last dimension",
                format!("{:?}", x.shape),
            ))
        }
    };
    out.expect(op, &x.shape)?;
    for v in vecs {
        v.expect(op, &[n])?;
    }
    let m = x.len() / n;
    if m == 0 {
        return Err(Error::invalid(op, format!("no rows in {:?}", x.shape)));
    }
    if x.buf.buffer == out.buf.buffer {
        return Err(Error::invalid(
            op,
            "out must not be the input buffer (a binding cannot be read-only and read-write at once)",
        ));
    }
    let too_big = || Error::invalid(op, "tensor too large");
    u32::try_from(x.len()).map_err(|_| too_big())?;
    Ok((m as u32, n as u32))
}

pub(crate) fn check_eps(op: &str, eps: f32) -> Result<()> {
    if !(eps.is_finite() && eps >= 0.0) {
        return Err(Error::invalid(
            op,
            format!("eps must be finite and >= 0, got {eps}"),
        ));
    }
    Ok(())
}

/// Dispatches `entry`; `sum` is add_rms_norm's second output (the others bind `out` there).
#[allow(clippy::too_many_arguments)]
fn run(
    rec: &mut Recorder,
    entry: &str,
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    out: &Tensor,
    sum: Option<&Tensor>,
    p: Params,
) -> Result<()> {
    let gpu = rec.gpu();
    let sg = entry != "layer_norm" && crate::kernels::matmul::subgroup_matvec_ok(gpu);
    let shader = if sg { "norm_sg" } else { "norm" };
    let k = gpu.kernel(
        shader,
        entry,
        &[
            Bind::Input,
            Bind::Input,
            Bind::Input,
            Bind::Output,
            Bind::Output,
        ],
        16,
        &[],
    )?;
    let groups = gpu.groups(p.m);
    rec.dispatch(
        &k,
        &format!("{entry}.{}", out.buf.label),
        &[
            x.buf.view(),
            gamma.buf.view(),
            beta.buf.view(),
            out.buf.view(),
            sum.unwrap_or(out).buf.view(),
        ],
        params(&p),
        groups,
    )
}

/// `out = x / sqrt(mean(x^2) + eps) * gamma` per row of `x` (`[.., n]`, `gamma` `[n]`).
/// `out` must be a different buffer from `x`.
pub fn rms_norm(
    rec: &mut Recorder,
    x: &Tensor,
    gamma: &Tensor,
    eps: f32,
    out: &Tensor,
) -> Result<()> {
    let (m, n) = rows_cols("rms_norm", x, out, &[gamma])?;
    check_eps("rms_norm", eps)?;
    // The shader's beta binding is unused by rms_norm; gamma fills the slot.
    let p = Params { m, n, eps, _pad: 0 };
    run(rec, "rms_norm", x, gamma, gamma, out, None, p)
}

/// The residual add and the RMSNorm after it in one pass: `sum = x + b`, then
/// `out = sum / sqrt(mean(sum^2) + eps) * gamma` per row (`x`, `b`, `sum`, `out` `[.., n]`,
/// `gamma` `[n]`). `sum` and `out` must be buffers other than `x`'s and `b`'s, and each other's.
pub fn add_rms_norm(
    rec: &mut Recorder,
    x: &Tensor,
    b: &Tensor,
    gamma: &Tensor,
    eps: f32,
    sum: &Tensor,
    out: &Tensor,
) -> Result<()> {
    let op = "add_rms_norm";
    let (m, n) = rows_cols(op, x, out, &[gamma])?;
    b.expect(op, &x.shape)?;
    sum.expect(op, &x.shape)?;
    check_eps(op, eps)?;
    let outputs = [&sum.buf.buffer, &out.buf.buffer];
    if outputs.contains(&&b.buf.buffer)
        || outputs.contains(&&x.buf.buffer)
        || sum.buf.buffer == out.buf.buffer
    {
        return Err(Error::invalid(
            op,
            "sum and out must be two buffers other than the inputs' (a binding cannot be read-only and read-write at once)",
        ));
    }
    let p = Params { m, n, eps, _pad: 0 };
    run(rec, op, x, gamma, b, out, Some(sum), p)
}

/// `out = (x - mean) / sqrt(var + eps) * gamma + beta` per row of `x` (`[.., n]`; `gamma`, `beta`
/// `[n]`; biased variance, as PyTorch). `out` must be a different buffer from `x`.
pub fn layer_norm(
    rec: &mut Recorder,
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f32,
    out: &Tensor,
) -> Result<()> {
    let (m, n) = rows_cols("layer_norm", x, out, &[gamma, beta])?;
    check_eps("layer_norm", eps)?;
    let p = Params { m, n, eps, _pad: 0 };
    run(rec, "layer_norm", x, gamma, beta, out, None, p)
}

/// CPU reference of [`rms_norm`] (f64 accumulation), `x` row-major with rows of `gamma.len()`.
pub fn rms_norm_reference(x: &[f32], gamma: &[f32], eps: f32) -> Vec<f32> {
    let n = gamma.len().max(1);
    x.chunks(n)
        .flat_map(|row| {
            let ms = row.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / n as f64;
            let inv = 1.0 / (ms + eps as f64).sqrt();
            row.iter()
                .zip(gamma)
                .map(move |(&v, &g)| (v as f64 * inv * g as f64) as f32)
        })
        .collect()
}

/// CPU reference of [`layer_norm`] (f64, two-pass).
pub fn layer_norm_reference(x: &[f32], gamma: &[f32], beta: &[f32], eps: f32) -> Vec<f32> {
    let n = gamma.len().max(1);
    x.chunks(n)
        .flat_map(|row| {
            let mean = row.iter().map(|&v| v as f64).sum::<f64>() / n as f64;
            let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n as f64;
            let inv = 1.0 / (var + eps as f64).sqrt();
            row.iter()
                .zip(gamma.iter().zip(beta))
                .map(move |(&v, (&g, &b))| ((v as f64 - mean) * inv * g as f64 + b as f64) as f32)
        })
        .collect()
}
