//! Weight formats and their block layouts, byte-compatible with GGUF (as ggml defines them), with
//! CPU quantisation and dequantisation. This is the one place that defines each block format: the
//! CPU references, the GPU uploader ([`repack`]) and the memory planner all use it.
//!
//! | format | weights/block | bytes/block | value |
//! |---|---|---|---|
//! | Q8_0 | 32 | 34 | `d * q`, f16 d, i8 q |
//! | Q4_0 | 32 | 18 | `d * (q - 8)`, f16 d, 4-bit q; byte j holds weight j (low) and j+16 (high) |
//! | Q4_1 | 32 | 20 | `d * q + m`, f16 d and m, nibbles as Q4_0 |
//! | Q5_0 | 32 | 22 | `d * (q - 16)`, f16 d, u32 of fifth bits, nibbles as Q4_0 |
//! | Q5_1 | 32 | 24 | `d * q + m`, f16 d and m, u32 of fifth bits, nibbles as Q4_0 |
//! | Q4_K | 256 | 144 | `d * sc[s] * q - dmin * m[s]` over 8 sub-blocks of 32 with 6-bit sc, m |
//! | Q5_K | 256 | 176 | as Q4_K with 5-bit q |
//! | Q6_K | 256 | 210 | `d * sc[s] * (q - 32)` over 16 sub-blocks of 16 with i8 sc |
//!
//! The last five are decoded in [`kquants`] (which documents their byte layouts) and quantised there
//! by ports of ggml's reference quantisers (`quantize_row_*_ref`, including the K-quants' scale
//! searches `make_qkx2_quants` / `make_qx_quants`).
//!
//! Round-trip error (measured by the tests on N(0,1) data, per block of 32): Q8_0 at most
//! `amax/254` per weight (half a step of `amax/127`) plus f16 rounding of d; Q4_0 half a step
//! (`|max|/16`), except values of the sign opposite the largest, clamped at `7d`: up to `|max|/8`; Q4_1 at most `(max-min)/30`. Relative RMS error on N(0,1) data is about
//! 0.4% for Q8_0, 11% for Q4_0 and 9% for Q4_1; Q5_0 and Q5_1 at most half a step (`|max|/32`,
//! `(max-min)/62`; Q5_0's opposite-sign clamp at `15d` up to `|max|/16`). Relative RMS error on
//! N(0,1) data: Q5_0 4.3%, Q5_1 3.8%, Q4_K 7.1%, Q5_K 3.6%, Q6_K 1.8%.

pub mod kquants;
pub mod repack;

use half::f16;
use serde::Serialize;

use crate::error::{Error, Result};

/// Weights per block of every quantised format here.
pub const QK: usize = 32;

/// How a weight matrix is stored.
/// ggml's names (Q4_K ...), kept so that a format reads as in llama.cpp and the GGUF spec.
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum WeightFormat {
    F32,
    F16,
    Q8_0,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q4_K,
    Q5_K,
    Q6_K,
}

impl WeightFormat {
    pub const ALL: [WeightFormat; 10] = [
        WeightFormat::F32,
        WeightFormat::F16,
        WeightFormat::Q8_0,
        WeightFormat::Q4_0,
        WeightFormat::Q4_1,
        WeightFormat::Q5_0,
        WeightFormat::Q5_1,
        WeightFormat::Q4_K,
        WeightFormat::Q5_K,
        WeightFormat::Q6_K,
    ];

    pub fn name(self) -> &'static str {
        match self {
            WeightFormat::F32 => "f32",
            WeightFormat::F16 => "f16",
            WeightFormat::Q8_0 => "q8_0",
            WeightFormat::Q4_0 => "q4_0",
            WeightFormat::Q4_1 => "q4_1",
            WeightFormat::Q5_0 => "q5_0",
            WeightFormat::Q5_1 => "q5_1",
            WeightFormat::Q4_K => "q4_k",
            WeightFormat::Q5_K => "q5_k",
            WeightFormat::Q6_K => "q6_k",
        }
    }

    pub fn parse(s: &str) -> Result<WeightFormat> {
        WeightFormat::ALL
            .into_iter()
            .find(|f| f.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| Error::Parse {
                what: "a weight format",
                input: s.into(),
                reason: "use f32, f16, q8_0, q4_0, q4_1, q5_0, q5_1, q4_k, q5_k or q6_k".into(),
            })
    }

    /// Weights per block (1 for the float formats).
    pub fn block_len(self) -> usize {
        match self {
            WeightFormat::F32 | WeightFormat::F16 => 1,
            WeightFormat::Q4_K | WeightFormat::Q5_K | WeightFormat::Q6_K => kquants::QK_K,
            _ => QK,
        }
    }

    /// Bytes per block in the GGUF file.
    pub fn block_bytes(self) -> usize {
        match self {
            WeightFormat::F32 => 4,
            WeightFormat::F16 => 2,
            WeightFormat::Q8_0 => 34,
            WeightFormat::Q4_0 => 18,
            WeightFormat::Q4_1 => 20,
            WeightFormat::Q5_0 => kquants::Q5_0_BYTES,
            WeightFormat::Q5_1 => kquants::Q5_1_BYTES,
            WeightFormat::Q4_K => kquants::Q4_K_BYTES,
            WeightFormat::Q5_K => kquants::Q5_K_BYTES,
            WeightFormat::Q6_K => kquants::Q6_K_BYTES,
        }
    }

    pub fn is_quantized(self) -> bool {
        self.block_len() > 1
    }

    /// Bytes of `n` weights in the GGUF layout; `n` must be a multiple of the block length.
    pub fn bytes_for(self, n: usize) -> usize {
        n.div_ceil(self.block_len()) * self.block_bytes()
    }

    /// Bits per weight, block scales included.
    pub fn bits_per_weight(self) -> f64 {
        self.block_bytes() as f64 * 8.0 / self.block_len() as f64
    }
}

impl std::fmt::Display for WeightFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// GGUF block structs, for documentation and size checks.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct BlockQ8_0 {
    pub d: f16,
    pub qs: [i8; QK],
}
#[repr(C)]
#[derive(Clone, Copy)]
pub struct BlockQ4_0 {
    pub d: f16,
    pub qs: [u8; QK / 2],
}
#[repr(C)]
#[derive(Clone, Copy)]
pub struct BlockQ4_1 {
    pub d: f16,
    pub m: f16,
    pub qs: [u8; QK / 2],
}
const _: () = assert!(std::mem::size_of::<BlockQ8_0>() == 34);
const _: () = assert!(std::mem::size_of::<BlockQ4_0>() == 18);
const _: () = assert!(std::mem::size_of::<BlockQ4_1>() == 20);

fn check_len(format: WeightFormat, n: usize) -> Result<()> {
    if !n.is_multiple_of(format.block_len()) {
        return Err(Error::invalid(
            format!("quantize {format}"),
            format!(
                "{n} weights is not a multiple of the block length {}",
                format.block_len()
            ),
        ));
    }
    Ok(())
}

/// Quantises `x` into GGUF bytes of `format` (ggml's reference rounding).
pub fn quantize(format: WeightFormat, x: &[f32]) -> Result<Vec<u8>> {
    check_len(format, x.len())?;
    let mut out = Vec::with_capacity(format.bytes_for(x.len()));
    match format {
        WeightFormat::F32 => out.extend_from_slice(bytemuck::cast_slice(x)),
        WeightFormat::F16 => {
            for v in x {
                out.extend_from_slice(&f16::from_f32(*v).to_le_bytes());
            }
        }
        WeightFormat::Q8_0 => {
            for b in x.chunks_exact(QK) {
                let amax = b.iter().fold(0f32, |m, v| m.max(v.abs()));
                let d = amax / 127.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
                out.extend(b.iter().map(|v| (v * id).round() as i8 as u8));
            }
        }
        WeightFormat::Q4_0 => {
            for b in x.chunks_exact(QK) {
                // The signed value of largest magnitude maps to -8, so the full range [-8, 7] is used.
                let max = b
                    .iter()
                    .fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
                let d = max / -8.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
                let q = |v: f32| ((v * id + 8.5) as i32).clamp(0, 15) as u8;
                out.extend((0..QK / 2).map(|j| q(b[j]) | (q(b[j + QK / 2]) << 4)));
            }
        }
        WeightFormat::Q4_1 => {
            for b in x.chunks_exact(QK) {
                let min = b.iter().fold(f32::INFINITY, |m, &v| m.min(v));
                let max = b.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
                let d = (max - min) / 15.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
                out.extend_from_slice(&f16::from_f32(min).to_le_bytes());
                let q = |v: f32| (((v - min) * id + 0.5) as i32).clamp(0, 15) as u8;
                out.extend((0..QK / 2).map(|j| q(b[j]) | (q(b[j + QK / 2]) << 4)));
            }
        }
        WeightFormat::Q5_0 => out = kquants::quantize_q5_0(x)?,
        WeightFormat::Q5_1 => out = kquants::quantize_q5_1(x)?,
        WeightFormat::Q4_K => out = kquants::quantize_q4_k(x)?,
        WeightFormat::Q5_K => out = kquants::quantize_q5_k(x)?,
        WeightFormat::Q6_K => out = kquants::quantize_q6_k(x)?,
    }
    Ok(out)
}

fn h(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// Dequantises `n` weights of GGUF bytes `data` in `format`.
pub fn dequantize(format: WeightFormat, data: &[u8], n: usize) -> Result<Vec<f32>> {
    check_len(format, n)?;
    let need = format.bytes_for(n);
    if data.len() < need {
        return Err(Error::invalid(
            format!("dequantize {format}"),
            format!("{} bytes given, {need} needed for {n} weights", data.len()),
        ));
    }
    let data = &data[..need];
    let mut out = Vec::with_capacity(n);
    match format {
        WeightFormat::F32 => out.extend(
            data.chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        ),
        WeightFormat::F16 => out.extend(
            data.chunks_exact(2)
                .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32()),
        ),
        WeightFormat::Q8_0 => {
            for b in data.chunks_exact(34) {
                let d = h(b, 0);
                out.extend(b[2..].iter().map(|&q| d * (q as i8) as f32));
            }
        }
        WeightFormat::Q4_0 => {
            for b in data.chunks_exact(18) {
                let d = h(b, 0);
                let qs = &b[2..];
                out.extend(qs.iter().map(|&q| d * ((q & 15) as f32 - 8.0)));
                out.extend(qs.iter().map(|&q| d * ((q >> 4) as f32 - 8.0)));
            }
        }
        WeightFormat::Q4_1 => {
            for b in data.chunks_exact(20) {
                let (d, m) = (h(b, 0), h(b, 2));
                let qs = &b[4..];
                out.extend(qs.iter().map(|&q| d * (q & 15) as f32 + m));
                out.extend(qs.iter().map(|&q| d * (q >> 4) as f32 + m));
            }
        }
        WeightFormat::Q5_0 => out = kquants::dequantize_q5_0(data, n)?,
        WeightFormat::Q5_1 => out = kquants::dequantize_q5_1(data, n)?,
        WeightFormat::Q4_K => out = kquants::dequantize_q4_k(data, n)?,
        WeightFormat::Q5_K => out = kquants::dequantize_q5_k(data, n)?,
        WeightFormat::Q6_K => out = kquants::dequantize_q6_k(data, n)?,
    }
    Ok(out)
}

/// Valid GGUF bytes for `n` weights of `format` with pseudo-random values (scales near 0.01), made
/// fast without quantising: for benchmarks and synthetic models of real shapes.
pub fn synthetic(format: WeightFormat, n: usize, seed: u64) -> Result<Vec<u8>> {
    check_len(format, n)?;
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        // xorshift64*: plenty for filler data.
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        state.wrapping_mul(0x2545_F491_4F6C_DD1D)
    };
    let mut out = vec![0u8; format.bytes_for(n)];
    for chunk in out.chunks_mut(8) {
        let r = next().to_le_bytes();
        chunk.copy_from_slice(&r[..chunk.len()]);
    }
    let small = |r: u64| f16::from_f32(0.005 + (r % 1000) as f32 * 1e-5).to_le_bytes();
    match format {
        WeightFormat::F32 => {
            for c in out.chunks_exact_mut(4) {
                c.copy_from_slice(&((next() % 2001) as f32 * 1e-5 - 0.01).to_le_bytes());
            }
        }
        WeightFormat::F16 => {
            for c in out.chunks_exact_mut(2) {
                c.copy_from_slice(
                    &f16::from_f32((next() % 2001) as f32 * 1e-5 - 0.01).to_le_bytes(),
                );
            }
        }
        WeightFormat::Q8_0 | WeightFormat::Q4_0 => {
            for b in out.chunks_exact_mut(format.block_bytes()) {
                b[..2].copy_from_slice(&small(next()));
            }
        }
        WeightFormat::Q4_1 => {
            for b in out.chunks_exact_mut(20) {
                b[..2].copy_from_slice(&small(next()));
                b[2..4].copy_from_slice(&f16::from_f32(-0.04).to_le_bytes());
            }
        }
        WeightFormat::Q5_0 => {
            for b in out.chunks_exact_mut(format.block_bytes()) {
                b[..2].copy_from_slice(&small(next()));
            }
        }
        WeightFormat::Q5_1 => {
            for b in out.chunks_exact_mut(format.block_bytes()) {
                b[..2].copy_from_slice(&small(next()));
                b[2..4].copy_from_slice(&f16::from_f32(-0.08).to_le_bytes());
            }
        }
        WeightFormat::Q4_K | WeightFormat::Q5_K => {
            // Random 6-bit sub-block scales (up to 63) times levels up to 31: d and dmin small
            // enough that weights stay near the other formats' +-0.1.
            for b in out.chunks_exact_mut(format.block_bytes()) {
                b[..2].copy_from_slice(&f16::from_f32(2e-4).to_le_bytes());
                b[2..4].copy_from_slice(&f16::from_f32(1e-3).to_le_bytes());
            }
        }
        WeightFormat::Q6_K => {
            // Random i8 scales (up to 128) times levels -32..31.
            for b in out.chunks_exact_mut(format.block_bytes()) {
                b[208..210].copy_from_slice(&f16::from_f32(2e-5).to_le_bytes());
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn normal(n: usize, seed: u64) -> Vec<f32> {
        let mut r = rand::rngs::StdRng::seed_from_u64(seed);
        // Box-Muller keeps the dependency list short.
        (0..n)
            .map(|_| {
                let (u, v): (f32, f32) = (r.gen_range(1e-7..1.0), r.gen());
                (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos()
            })
            .collect()
    }

    fn rel_rms(a: &[f32], b: &[f32]) -> f32 {
        let num: f32 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum();
        let den: f32 = a.iter().map(|x| x * x).sum();
        (num / den).sqrt()
    }

    #[test]
    fn round_trip_errors_are_within_documented_bounds() {
        let x = normal(QK * 512, 1);
        for (f, rms_bound) in [
            (WeightFormat::F32, 0.0),
            (WeightFormat::F16, 1e-3),
            (WeightFormat::Q8_0, 0.006),
            (WeightFormat::Q4_0, 0.13),
            (WeightFormat::Q4_1, 0.11),
            (WeightFormat::Q5_0, 0.05),
            (WeightFormat::Q5_1, 0.045),
            (WeightFormat::Q4_K, 0.08),
            (WeightFormat::Q5_K, 0.04),
            (WeightFormat::Q6_K, 0.02),
        ] {
            let q = quantize(f, &x).unwrap();
            assert_eq!(q.len(), f.bytes_for(x.len()), "{f}");
            let y = dequantize(f, &q, x.len()).unwrap();
            let e = rel_rms(&x, &y);
            assert!(e <= rms_bound, "{f}: relative rms {e} > {rms_bound}");
            // Per-block maximum error bound.
            for (bx, by) in x.chunks(QK).zip(y.chunks(QK)) {
                let amax = bx.iter().fold(0f32, |m, v| m.max(v.abs()));
                let (mn, mx) = bx
                    .iter()
                    .fold((f32::MAX, f32::MIN), |(a, b), &v| (a.min(v), b.max(v)));
                let bound = match f {
                    // The K-quants' scales come from a weighted least-squares search, so no
                    // simple per-block bound holds; their RMS bound above covers them.
                    WeightFormat::Q4_K | WeightFormat::Q5_K | WeightFormat::Q6_K => f32::MAX,
                    WeightFormat::Q5_0 => amax / 16.0 * 1.01 + amax * 1e-3,
                    WeightFormat::Q5_1 => (mx - mn) / 62.0 * 1.01 + amax * 2e-3,
                    WeightFormat::F32 => 0.0,
                    WeightFormat::F16 => amax * 1e-3,
                    WeightFormat::Q8_0 => amax / 254.0 * 1.01 + amax * 1e-3,
                    // Half a step, except values of the sign opposite to the largest, clamped at 7d.
                    WeightFormat::Q4_0 => amax / 8.0 * 1.01 + amax * 1e-3,
                    WeightFormat::Q4_1 => (mx - mn) / 30.0 * 1.01 + amax * 2e-3,
                };
                for (a, b) in bx.iter().zip(by) {
                    assert!((a - b).abs() <= bound + 1e-7, "{f}: |{a} - {b}| > {bound}");
                }
            }
        }
    }

    #[test]
    fn synthetic_weights_are_finite_and_small() {
        for f in WeightFormat::ALL {
            let b = synthetic(f, 4096, 3).unwrap();
            let w = dequantize(f, &b, 4096).unwrap();
            assert!(w.iter().all(|v| v.is_finite() && v.abs() < 2.0), "{f}");
        }
    }

    #[test]
    fn zero_blocks_and_bad_lengths() {
        let z = vec![0f32; 256];
        for f in WeightFormat::ALL {
            let y = dequantize(f, &quantize(f, &z).unwrap(), 256).unwrap();
            assert!(y.iter().all(|v| *v == 0.0), "{f}");
        }
        assert!(quantize(WeightFormat::Q4_0, &[1.0; 33]).is_err());
        assert!(dequantize(WeightFormat::Q8_0, &[0u8; 33], 32).is_err());
    }

    #[test]
    fn q4_0_layout_matches_ggml() {
        // Weight j in the low nibble of byte j, weight j+16 in the high nibble; d = max / -8.
        let mut x = [0f32; 32];
        x[0] = -8.0;
        x[16] = 7.0;
        let q = quantize(WeightFormat::Q4_0, &x).unwrap();
        assert_eq!(h(&q, 0), 1.0);
        assert_eq!(q[2] & 15, 0); // -8 / 1 + 8
        assert_eq!(q[2] >> 4, 15); // 7 + 8
    }
}
