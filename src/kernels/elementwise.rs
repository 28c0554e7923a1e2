//! Elementwise kernels (`shaders/elementwise.wgsl`): the residual add.

use crate::error::{Error, Result};
use crate::gpu::{Bind, Recorder};
use crate::kernels::{params, Tensor};

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    n: u32,
    _pad: [u32; 3],
}
const _: () = assert!(std::mem::size_of::<Params>() == 16);

const WG: u32 = 256;

/// `out = a + b`, elementwise (out may alias neither input; use a separate buffer).
pub fn add(rec: &mut Recorder, a: &Tensor, b: &Tensor, out: &Tensor) -> Result<()> {
    b.expect("add", &a.shape)?;
    out.expect("add", &a.shape)?;
    let n = u32::try_from(a.len()).map_err(|_| Error::invalid("add", "tensor too large"))?;
    let gpu = rec.gpu();
    let k = gpu.kernel(
        "elementwise",
        "add",
        &[Bind::Input, Bind::Input, Bind::Output],
        16,
        &[],
    )?;
    let groups = gpu.groups(n.div_ceil(WG));
    rec.dispatch(
        &k,
        &format!("add.{}", out.buf.label),
        &[a.buf.view(), b.buf.view(), out.buf.view()],
        params(&Params { n, _pad: [0; 3] }),
        groups,
    )
}

/// CPU reference of [`add`].
pub fn add_reference(a: &[f32], b: &[f32]) -> Vec<f32> {
    a.iter().zip(b).map(|(x, y)| x + y).collect()
}
