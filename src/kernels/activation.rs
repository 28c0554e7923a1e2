//! Activations (`shaders/activation.wgsl`), one invocation per element: SwiGLU's `silu(gate) * up`,
//! GELU in its exact (erf) and tanh forms, and GeGLU's `gelu_tanh(gate) * up` (Gemma).
//!
//! WGSL has no `erf`. The shader evaluates `1 + erf(x/sqrt 2)` as `erfc(-x/sqrt 2)` with Numerical
//! Recipes' `erfcc` (relative error < 1.2e-7 everywhere), so GELU keeps its relative accuracy in the
//! negative tail instead of cancelling `1 - 0.99999..`; `exp(-z^2)` is formed without rounding `z^2`
//! and with a Cody-Waite reduced `exp`. Measured against the f64 reference on lavapipe: relative
//! error <= 7e-7 over [-13, 13] (documented bound 1e-6, down to outputs of 1e-30).
//!
//! The tanh form is computed as `x * sigmoid(2u)` (identical to `0.5x(1 + tanh u)`), which cannot
//! overflow for large |x| and does not cancel for u < 0. Its relative error is ~1.2e-7 * (1 + |2u|),
//! from the f32 rounding of `u` itself: <= 1e-6 for |x| <= 3, <= 1.5e-5 down to outputs of 1e-30.
//! Sigmoids clamp their argument to ±80 (`sigmoid(-80)` = 1.8e-35), so infinities never reach
//! `exp`; outputs below ~1e-30 are therefore only accurate in absolute terms.
//! `gelu_relative_error_is_bounded` in tests/kernels_activation.rs checks these bounds.

use crate::error::{Error, Result};
use crate::gpu::Recorder;
use crate::kernels::{dispatch_elementwise, params, Tensor};

/// Which GELU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GeluForm {
    /// `0.5 x (1 + erf(x / sqrt 2))`, the exact GELU (PyTorch default, BERT).
    Erf,
    /// `0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))` (GPT-2, Gemma's `gelu_pytorch_tanh`).
    Tanh,
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    n: u32,
    _pad: [u32; 3],
}
const _: () = assert!(std::mem::size_of::<Params>() == 16);

fn run(rec: &mut Recorder, entry: &str, a: &Tensor, b: &Tensor, out: &Tensor) -> Result<()> {
    for t in [a, b] {
        if t.buf.buffer == out.buf.buffer {
            return Err(Error::invalid(
                entry,
                "out must not be an input buffer (a binding cannot be read-only and read-write at once)",
            ));
        }
    }
    let n = u32::try_from(a.len()).map_err(|_| Error::invalid(entry, "tensor too large"))?;
    if n == 0 {
        return Ok(());
    }
    let p = Params { n, _pad: [0; 3] };
    dispatch_elementwise(
        rec,
        "activation",
        entry,
        [&a.buf, &b.buf],
        out,
        n,
        params(&p),
    )
}

/// `out = silu(gate) * up`, elementwise; all three the same shape, `out` a separate buffer.
pub fn swiglu(rec: &mut Recorder, gate: &Tensor, up: &Tensor, out: &Tensor) -> Result<()> {
    up.expect("swiglu", &gate.shape)?;
    out.expect("swiglu", &gate.shape)?;
    run(rec, "swiglu", gate, up, out)
}

/// `out = gelu_tanh(gate) * up`, elementwise (GeGLU, Gemma's `gelu_pytorch_tanh`); all three
/// the same shape, `out` a separate buffer.
pub fn geglu_tanh(rec: &mut Recorder, gate: &Tensor, up: &Tensor, out: &Tensor) -> Result<()> {
    up.expect("geglu_tanh", &gate.shape)?;
    out.expect("geglu_tanh", &gate.shape)?;
    run(rec, "geglu_tanh", gate, up, out)
}

/// `out = gelu(x)` in the chosen form; `out` has `x`'s shape and is a separate buffer.
pub fn gelu(rec: &mut Recorder, x: &Tensor, out: &Tensor, form: GeluForm) -> Result<()> {
    out.expect("gelu", &x.shape)?;
    let entry = match form {
        GeluForm::Erf => "gelu_erf",
        GeluForm::Tanh => "gelu_tanh",
    };
    // The shader's second input is unused by GELU; x fills the slot.
    run(rec, entry, x, x, out)
}

/// CPU reference of [`swiglu`] (f64).
pub fn swiglu_reference(gate: &[f32], up: &[f32]) -> Vec<f32> {
    gate.iter()
        .zip(up)
        .map(|(&g, &u)| {
            let g = g as f64;
            (g / (1.0 + (-g).exp()) * u as f64) as f32
        })
        .collect()
}

/// CPU reference of [`gelu`] (f64, with [`erfc_f64`]).
pub fn gelu_reference(x: &[f32], form: GeluForm) -> Vec<f32> {
    x.iter()
        .map(|&v| {
            let v = v as f64;
            let y = match form {
                GeluForm::Erf => 0.5 * v * erfc_f64(-v / std::f64::consts::SQRT_2),
                GeluForm::Tanh => {
                    let u = (2.0 / std::f64::consts::PI).sqrt() * (v + 0.044715 * v * v * v);
                    // 0.5 (1 + tanh u) as 1 / (1 + e^(-2u)): even f64 cancels in 1 + tanh(u) for
                    // u < -18.
                    v / (1.0 + (-2.0 * u).exp())
                }
            };
            y as f32
        })
        .collect()
}

/// CPU reference of [`geglu_tanh`] (f64).
pub fn geglu_tanh_reference(gate: &[f32], up: &[f32]) -> Vec<f32> {
    gate.iter()
        .zip(up)
        .map(|(&g, &u)| {
            let g = g as f64;
            let t = (2.0 / std::f64::consts::PI).sqrt() * (g + 0.044715 * g * g * g);
            (g / (1.0 + (-2.0 * t).exp()) * u as f64) as f32
        })
        .collect()
}

/// `erf` in f64 to ~1e-15 (reference quality): the all-positive series
/// `erf(x) = 2/sqrt(pi) e^(-x^2) sum 2^k x^(2k+1) / (1*3*..*(2k+1))` below |x| = 2 (no cancellation),
/// `1 - erfc` above.
pub fn erf_f64(x: f64) -> f64 {
    let a = x.abs();
    let r = if a < 2.0 {
        let (mut term, mut sum, mut k) = (a, a, 0.0);
        while term > sum * 1e-17 {
            k += 1.0;
            term *= 2.0 * a * a / (2.0 * k + 1.0);
            sum += term;
        }
        std::f64::consts::FRAC_2_SQRT_PI * (-a * a).exp() * sum
    } else {
        1.0 - erfc_f64(a)
    };
    r.copysign(x)
}

/// `erfc` in f64 with relative accuracy in the tail: the continued fraction
/// `erfc(z) = e^(-z^2)/sqrt(pi) / (z + (1/2)/(z + 1/(z + (3/2)/(z + ...))))` from z = 2 (200 terms,
/// evaluated backwards), `1 - erf` below, `2 - erfc(-z)` for negative z.
pub fn erfc_f64(z: f64) -> f64 {
    if z.is_nan() {
        return z;
    }
    if z < 0.0 {
        return 2.0 - erfc_f64(-z);
    }
    if z < 2.0 {
        return 1.0 - erf_f64(z);
    }
    let mut f = z;
    for k in (1..=200).rev() {
        f = z + (k as f64 / 2.0) / f;
    }
    (-z * z).exp() / std::f64::consts::PI.sqrt() / f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_erf_matches_known_values() {
        // Values from CPython's math.erf / math.erfc (libm).
        for (x, want) in [
            (0.5, 0.5204998778130465),
            (1.0, 0.8427007929497149),
            (1.999, 0.9953015566513705),
            (-1.0, -0.8427007929497149),
        ] {
            assert!(
                (erf_f64(x) - want).abs() < 1e-15,
                "erf({x}) = {}",
                erf_f64(x)
            );
        }
        for (z, want) in [
            (2.0, 0.004677734981047265),
            (3.0, 2.2090496998585438e-05),
            (5.0, 1.5374597944280351e-12),
            (10.0, 2.088487583762545e-45),
        ] {
            let got = erfc_f64(z);
            assert!(((got - want) / want).abs() < 1e-13, "erfc({z}) = {got}");
        }
        assert_eq!(erf_f64(0.0), 0.0);
        assert!((erfc_f64(-3.0) - (2.0 - 2.209049699858544e-05)).abs() < 1e-15);
    }
}
