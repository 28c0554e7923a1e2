//! Row softmax (`shaders/softmax.wgsl`) over the last dimension of an `[.., n]` activation, one
//! workgroup per row. Numerically stable: the row maximum is subtracted before `exp`, so logits of
//! any magnitude (1e4, or -1e30 used as a mask) give no overflow, NaN or inf. A row whose entries are
//! all `-inf` gives zeros.

use crate::error::{Error, Result};
use crate::gpu::{Bind, Recorder};
use crate::kernels::{params, Tensor};

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    m: u32,
    n: u32,
    _pad: [u32; 2],
}
const _: () = assert!(std::mem::size_of::<Params>() == 16);

/// `out[r, :] = softmax(x[r, :])` for every row of `x` (`[.., n]`). `out` must have `x`'s shape and
/// be a different buffer.
pub fn softmax(rec: &mut Recorder, x: &Tensor, out: &Tensor) -> Result<()> {
    let n = match x.shape.last() {
        Some(&n) if n > 0 => n,
        _ => {
            return Err(Error::shape(
                format!("softmax ({})", x.buf.label),
                "a non-empty last dimension",
                format!("{:?}", x.shape),
            ))
        }
    };
    out.expect("softmax", &x.shape)?;
    let m = x.len() / n;
    if m == 0 {
        return Err(Error::invalid(
            "softmax",
            format!("no rows in {:?}", x.shape),
        ));
    }
    if x.buf.buffer == out.buf.buffer {
        return Err(Error::invalid(
            "softmax",
            "out must not be the input buffer (a binding cannot be read-only and read-write at once)",
        ));
    }
    u32::try_from(x.len()).map_err(|_| Error::invalid("softmax", "tensor too large"))?;
    let (m, n) = (m as u32, n as u32);
    let gpu = rec.gpu();
    let k = gpu.kernel("softmax", "softmax", &[Bind::Input, Bind::Output], 16, &[])?;
    let groups = gpu.groups(m);
    rec.dispatch(
        &k,
        &format!("softmax.{}", out.buf.label),
        &[x.buf.view(), out.buf.view()],
        params(&Params { m, n, _pad: [0; 2] }),
        groups,
    )
}

/// CPU reference of [`softmax`] (f64), `x` row-major with rows of `n`.
pub fn softmax_reference(x: &[f32], n: usize) -> Vec<f32> {
    x.chunks(n.max(1))
        .flat_map(|row| {
            let mx = row.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
            let e: Vec<f64> = row.iter().map(|&v| (v as f64 - mx).exp()).collect();
            let s: f64 = e.iter().sum();
            let inv = if s > 0.0 { 1.0 / s } else { 0.0 };
            e.into_iter().map(move |v| (v * inv) as f32)
        })
        .collect()
}
