//! Rotary position embedding (`shaders/rope.wgsl`), applied IN PLACE to `x` `[m, n_heads,
//! head_dim]` (queries or keys), one invocation per rotated pair. Token `t` (row `t` of `x`) gets
//! position `pos0 + t`; pair `i < rot_dim / 2` turns by `pos * theta^(-2i / rot_dim)`.
//!
//! Accuracy: the frequency is computed to a few ulps (see the shader), so the angle's error is
//! dominated by its own f32 rounding, about `pos * freq * 2^-24` radians, plus the device's
//! `sin`/`cos`. The CPU reference computes angles in f64.

use crate::error::{Error, Result};
use crate::gpu::{Bind, Recorder};
use crate::kernels::{params, Tensor};

/// Which elements of a head form the rotated pairs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeMode {
    /// GGUF / llama.cpp "normal" rope: pairs `(2i, 2i + 1)`.
    Interleaved,
    /// Hugging Face `rotate_half` / GPT-NeoX: pairs `(i, i + rot_dim / 2)`.
    Half,
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    m: u32,
    n_heads: u32,
    head_dim: u32,
    rot_dim: u32,
    pos0: u32,
    mode: u32,
    lt_hi: f32,
    lt_lo: f32,
}
const _: () = assert!(std::mem::size_of::<Params>() == 32);

const WG: u32 = 256;

/// `log2(theta) / rot_dim` as `hi + lo`, `hi` cut to 12 significant bits so that the shader's
/// `f32(2i) * hi` is exact for `2i < 4096`.
fn split_exponent(theta: f32, rot_dim: usize) -> (f32, f32) {
    let l = (theta as f64).log2() / rot_dim as f64;
    let hi = f32::from_bits((l as f32).to_bits() & 0xffff_f000);
    (hi, (l - hi as f64) as f32)
}

/// Rotates `x` (`[m, n_heads, head_dim]`) in place. `rot_dim` (even, `<= head_dim`) is the number
/// of leading elements of each head that are rotated (partial rotary); pass `head_dim` for all.
pub fn rope(
    rec: &mut Recorder,
    x: &Tensor,
    pos0: u32,
    theta: f32,
    mode: RopeMode,
    rot_dim: usize,
) -> Result<()> {
    let [m, n_heads, head_dim] = x.shape[..] else {
        return Err(Error::shape(
            format!("rope ({})", x.buf.label),
            "[tokens, heads, head_dim]",
            format!("{:?}", x.shape),
        ));
    };
    if rot_dim == 0 || rot_dim % 2 != 0 || rot_dim > head_dim {
        return Err(Error::invalid(
            "rope",
            format!("rot_dim must be even and in 2..={head_dim}, got {rot_dim}"),
        ));
    }
    if !(theta.is_finite() && theta > 1.0) {
        return Err(Error::invalid(
            "rope",
            format!("theta must be finite and > 1, got {theta}"),
        ));
    }
    let pairs = m * n_heads * (rot_dim / 2);
    if pairs == 0 {
        return Ok(());
    }
    let last = u32::try_from(m - 1).ok().and_then(|t| pos0.checked_add(t));
    // Positions must also stay exact as f32 in the shader.
    if last.is_none_or(|p| p >= 1 << 24) {
        return Err(Error::invalid(
            "rope",
            format!("positions {pos0}+{m} exceed 2^24"),
        ));
    }
    let too_big = || Error::invalid("rope", "tensor too large");
    u32::try_from(x.len()).map_err(|_| too_big())?;
    let pairs = u32::try_from(pairs).map_err(|_| too_big())?;
    let (lt_hi, lt_lo) = split_exponent(theta, rot_dim);
    let p = Params {
        m: m as u32,
        n_heads: n_heads as u32,
        head_dim: head_dim as u32,
        rot_dim: rot_dim as u32,
        pos0,
        mode: match mode {
            RopeMode::Interleaved => 0,
            RopeMode::Half => 1,
        },
        lt_hi,
        lt_lo,
    };
    let gpu = rec.gpu();
    let k = gpu.kernel("rope", "rope", &[Bind::Output], 32, &[])?;
    let groups = gpu.groups(pairs.div_ceil(WG));
    rec.dispatch(
        &k,
        &format!("rope.{}", x.buf.label),
        &[x.buf.view()],
        params(&p),
        groups,
    )
}

/// CPU reference of [`rope`] (angles in f64): returns the rotated copy of `x` (`[m, n_heads,
/// head_dim]` row-major).
pub fn rope_reference(
    x: &[f32],
    n_heads: usize,
    head_dim: usize,
    pos0: u32,
    theta: f32,
    mode: RopeMode,
    rot_dim: usize,
) -> Vec<f32> {
    let mut y = x.to_vec();
    let half = rot_dim / 2;
    for (h, head) in y.chunks_mut(head_dim).enumerate() {
        let pos = (pos0 as u64 + (h / n_heads.max(1)) as u64) as f64;
        for i in 0..half {
            let freq = (theta as f64).powf(-2.0 * i as f64 / rot_dim as f64);
            let (s, c) = (pos * freq).sin_cos();
            let (a, b) = match mode {
                RopeMode::Interleaved => (2 * i, 2 * i + 1),
                RopeMode::Half => (i, i + half),
            };
            let (x0, x1) = (head[a] as f64, head[b] as f64);
            head[a] = (x0 * c - x1 * s) as f32;
            head[b] = (x0 * s + x1 * c) as f32;
        }
    }
    y
}
