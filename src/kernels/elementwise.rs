//! Elementwise kernels (`shaders/elementwise.wgsl`): the residual add, the broadcast bias add and
//! the scaled copy.

use crate::error::{Error, Result};
use crate::gpu::Recorder;
use crate::kernels::{dispatch_elementwise, params, Tensor};

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    n: u32,
    _pad: [u32; 3],
}
const _: () = assert!(std::mem::size_of::<Params>() == 16);

/// `out = a + b`, elementwise (out may alias neither input; use a separate buffer).
pub fn add(rec: &mut Recorder, a: &Tensor, b: &Tensor, out: &Tensor) -> Result<()> {
    b.expect("add", &a.shape)?;
    out.expect("add", &a.shape)?;
    let n = u32::try_from(a.len()).map_err(|_| Error::invalid("add", "tensor too large"))?;
    let p = Params { n, _pad: [0; 3] };
    dispatch_elementwise(
        rec,
        "elementwise",
        "add",
        [&a.buf, &b.buf],
        out,
        n,
        params(&p),
    )
}

/// CPU reference of [`add`].
pub fn add_reference(a: &[f32], b: &[f32]) -> Vec<f32> {
    a.iter().zip(b).map(|(x, y)| x + y).collect()
}

/// Parameter block of `add_bias` and `scale` (the same WGSL struct as `add`'s, its padding named).
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct BiasScaleParams {
    n: u32,
    cols: u32,
    s: f32,
    _pad: u32,
}
const _: () = assert!(std::mem::size_of::<BiasScaleParams>() == 16);

/// `y[r, :] += bias` for every row of `y` (`[.., n]`, `bias` `[n]`), in place: a bias after a matmul.
pub fn add_bias(rec: &mut Recorder, y: &Tensor, bias: &Tensor) -> Result<()> {
    let cols = match y.shape.last() {
        Some(&c) if c > 0 => c,
        _ => {
            return Err(Error::shape(
                format!("add_bias ({})", y.buf.label),
                "a non-empty last dimension",
                format!("{:?}", y.shape),
            ))
        }
    };
    bias.expect("add_bias", &[cols])?;
    if bias.buf.buffer == y.buf.buffer {
        return Err(Error::invalid(
            "add_bias",
            "the bias must not be the output buffer",
        ));
    }
    let too_big = || Error::invalid("add_bias", "tensor too large");
    let n = u32::try_from(y.len()).map_err(|_| too_big())?;
    let cols = u32::try_from(cols).map_err(|_| too_big())?;
    let p = BiasScaleParams {
        n,
        cols,
        s: 0.0,
        _pad: 0,
    };
    // The shader does not read binding 1; the bias fills it.
    dispatch_elementwise(
        rec,
        "elementwise",
        "add_bias",
        [&bias.buf, &bias.buf],
        y,
        n,
        params(&p),
    )
}

/// `out = s * x`, elementwise (`out` a separate buffer of `x`'s shape).
pub fn scale(rec: &mut Recorder, x: &Tensor, s: f32, out: &Tensor) -> Result<()> {
    out.expect("scale", &x.shape)?;
    if x.buf.buffer == out.buf.buffer {
        return Err(Error::invalid("scale", "out must not be the input buffer"));
    }
    let n = u32::try_from(x.len()).map_err(|_| Error::invalid("scale", "tensor too large"))?;
    if n == 0 {
        return Ok(());
    }
    let p = BiasScaleParams {
        n,
        cols: 1,
        s,
        _pad: 0,
    };
    // The shader does not read binding 1; x fills it.
    dispatch_elementwise(
        rec,
        "elementwise",
        "scale",
        [&x.buf, &x.buf],
        out,
        n,
        params(&p),
    )
}

/// CPU reference of [`add_bias`]: `y` with `bias` added to each row.
pub fn add_bias_reference(y: &[f32], bias: &[f32]) -> Vec<f32> {
    y.chunks(bias.len().max(1))
        .flat_map(|row| row.iter().zip(bias).map(|(a, b)| a + b))
        .collect()
}

/// CPU reference of [`scale`].
pub fn scale_reference(x: &[f32], s: f32) -> Vec<f32> {
    x.iter().map(|v| v * s).collect()
}
