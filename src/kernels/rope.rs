//! Rotary position embedding (`shaders/rope.wgsl`), applied IN PLACE to `x` `[m, n_heads,
//! head_dim]` (queries or keys), one invocation per rotated pair. Token `t` (row `t` of `x`) has
//! position `pos0 + t`; pair `i < rot_dim / 2` turns by `pos * freq_i`, with
//! `freq_i = theta^(-2i / rot_dim)` ([`rope_freqs`]) or any other table ([`rope_with_freqs`], for
//! scaled variants such as linear, NTK, YaRN or Llama-3 frequency factors).
//!
//! Linear scaling (Gemma 3's global layers, `rope_scaling: {"rope_type": "linear", "factor": f}`)
//! turns pair `i` by `(pos / f) * freq_i`: [`linear_freqs`] gives the table `freq_i / f`, as
//! Hugging Face divides its `inv_freq` and llama.cpp multiplies by `freq_scale = 1 / f`. The
//! scale travels in the frequency table of the parameter block rather than as a factor on the
//! position in the shader: the table is formed in f64, and positions stay the exact integers the
//! shader's exact partial products need.
//!
//! Accuracy: frequencies are computed in f64 on the host and passed as `hi + lo` f32 pairs in the
//! parameter block; the shader forms `pos * freq` in turns with exact partial products and drops
//! whole turns exactly, so angles are good to ~1e-6 rad at every position below 2^24 (a plain f32
//! angle is off by ~`pos * 2^-24` rad: 0.01 rad at position 1e5), and `sin`/`cos` only ever see
//! `[-pi, pi]`. The CPU reference computes angles in f64.

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

/// The most rotated dimensions per head (the parameter block holds 256 frequency pairs).
pub const MAX_ROT_DIM: usize = 512;

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    m: u32,
    n_heads: u32,
    head_dim: u32,
    rot_dim: u32,
    pos0: u32,
    mode: u32,
    _pad: [u32; 2],
    /// `freq_i / 2pi` as `(hi, lo)` f32 pairs, pair `i` at `q[2i..2i + 2]`.
    q: [f32; MAX_ROT_DIM],
}
const PARAMS_SIZE: usize = 32 + MAX_ROT_DIM * 4;
const _: () = assert!(std::mem::size_of::<Params>() == PARAMS_SIZE);

const WG: u32 = 256;

/// The standard frequencies `theta^(-2i / rot_dim)`, `i < rot_dim / 2`.
pub fn rope_freqs(theta: f64, rot_dim: usize) -> Vec<f64> {
    (0..rot_dim / 2)
        .map(|i| theta.powf(-2.0 * i as f64 / rot_dim as f64))
        .collect()
}

/// [`rope_freqs`] of `theta` with positions divided by `factor` (linear RoPE scaling; 1 is none):
/// `theta^(-2i / rot_dim) / factor`, once `theta`, `factor` and `rot_dim` are checked.
pub fn linear_freqs(theta: f32, factor: f32, rot_dim: usize) -> Result<Vec<f64>> {
    if !(factor.is_finite() && factor > 0.0) {
        return Err(Error::invalid(
            "rope",
            format!("the linear scaling factor must be finite and > 0, got {factor}"),
        ));
    }
    let freqs = standard_freqs(theta, rot_dim)?;
    if factor == 1.0 {
        return Ok(freqs);
    }
    Ok(freqs.iter().map(|f| f / factor as f64).collect())
}

/// Rotates `x` (`[m, n_heads, head_dim]`) in place with the standard frequencies of `theta`.
/// `rot_dim` (even, `<= head_dim`, `<= MAX_ROT_DIM`) is the number of leading elements of each
/// head that are rotated (partial rotary); pass `head_dim` for all.
pub fn rope(
    rec: &mut Recorder,
    x: &Tensor,
    pos0: u32,
    theta: f32,
    mode: RopeMode,
    rot_dim: usize,
) -> Result<()> {
    let freqs = standard_freqs(theta, rot_dim)?;
    rope_with_freqs(rec, x, pos0, &freqs, mode)
}

/// [`rope_freqs`] for `theta` and `rot_dim`, once both are checked.
pub(crate) fn standard_freqs(theta: f32, rot_dim: usize) -> Result<Vec<f64>> {
    if !(theta.is_finite() && theta > 0.0) {
        return Err(Error::invalid(
            "rope",
            format!("theta must be finite and > 0, got {theta}"),
        ));
    }
    if !rot_dim.is_multiple_of(2) {
        return Err(Error::invalid(
            "rope",
            format!("rot_dim must be even, got {rot_dim}"),
        ));
    }
    Ok(rope_freqs(theta as f64, rot_dim))
}

/// Rotates `x` in place with pair `i` turning by `pos * freqs[i]` radians; `rot_dim` is
/// `2 * freqs.len()`.
pub fn rope_with_freqs(
    rec: &mut Recorder,
    x: &Tensor,
    pos0: u32,
    freqs: &[f64],
    mode: RopeMode,
) -> Result<()> {
    let [m, n_heads, head_dim] = x.shape[..] else {
        return Err(Error::shape(
            format!("rope ({})", x.buf.label),
            "[tokens, heads, head_dim]",
            format!("{:?}", x.shape),
        ));
    };
    let table = table("rope", freqs, head_dim, m, pos0)?;
    let pairs = m * n_heads * freqs.len();
    if pairs == 0 {
        return Ok(());
    }
    let too_big = || Error::invalid("rope", "tensor too large");
    u32::try_from(x.len()).map_err(|_| too_big())?;
    let pairs = u32::try_from(pairs).map_err(|_| too_big())?;
    let p = Params {
        m: m as u32,
        n_heads: n_heads as u32,
        head_dim: head_dim as u32,
        rot_dim: 2 * freqs.len() as u32,
        pos0,
        mode: mode.code(),
        _pad: [0; 2],
        q: table,
    };
    let gpu = rec.gpu();
    let k = gpu.kernel("rope", "rope", &[Bind::Output], PARAMS_SIZE as u64, &[])?;
    rec.dispatch(
        &k,
        &format!("rope.{}", x.buf.label),
        &[x.buf.view()],
        params(&p),
        gpu.groups(pairs.div_ceil(WG)),
    )
}

impl RopeMode {
    /// The shaders' `mode`.
    pub(crate) fn code(self) -> u32 {
        match self {
            RopeMode::Interleaved => 0,
            RopeMode::Half => 1,
        }
    }
}

/// The shaders' frequency table for `freqs` (`freq_i / 2pi` as `(hi, lo)` f32 pairs, pair `i` at
/// `[2i..2i + 2]`), once `freqs` (`rot_dim / 2` of them, finite, >= 0; `rot_dim <= head_dim`) and
/// the positions `pos0..pos0 + m` (below 2^24: the shader splits them in two 12-bit halves) are
/// checked.
pub(crate) fn table(
    op: &str,
    freqs: &[f64],
    head_dim: usize,
    m: usize,
    pos0: u32,
) -> Result<[f32; MAX_ROT_DIM]> {
    let rot_dim = 2 * freqs.len();
    if rot_dim == 0 || rot_dim > head_dim || rot_dim > MAX_ROT_DIM {
        return Err(Error::invalid(
            op,
            format!(
                "rot_dim must be even and in 2..={}, got {rot_dim}",
                head_dim.min(MAX_ROT_DIM)
            ),
        ));
    }
    if let Some(f) = freqs.iter().find(|f| !(f.is_finite() && **f >= 0.0)) {
        return Err(Error::invalid(
            op,
            format!("frequency {f} is not finite and >= 0"),
        ));
    }
    let last = u32::try_from(m.max(1) - 1)
        .ok()
        .and_then(|t| pos0.checked_add(t));
    if last.is_none_or(|p| p >= 1 << 24) {
        return Err(Error::invalid(
            op,
            format!("positions {pos0}..{pos0}+{m} exceed 2^24"),
        ));
    }
    let mut q = [0.0; MAX_ROT_DIM];
    for (i, f) in freqs.iter().enumerate() {
        let turns = f / std::f64::consts::TAU;
        let hi = turns as f32;
        q[2 * i] = hi;
        q[2 * i + 1] = (turns - hi as f64) as f32;
    }
    Ok(q)
}

/// CPU reference of [`rope_with_freqs`] (angles in f64): the rotated copy of `x` (`[m, n_heads,
/// head_dim]` row-major). For [`rope`], pass [`rope_freqs`]`(theta as f64, rot_dim)`.
pub fn rope_reference(
    x: &[f32],
    n_heads: usize,
    head_dim: usize,
    pos0: u32,
    freqs: &[f64],
    mode: RopeMode,
) -> Vec<f32> {
    let mut y = x.to_vec();
    let half = freqs.len();
    for (h, head) in y.chunks_mut(head_dim).enumerate() {
        let pos = (pos0 as u64 + (h / n_heads.max(1)) as u64) as f64;
        for (i, f) in freqs.iter().enumerate() {
            let (s, c) = (pos * f).sin_cos();
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
