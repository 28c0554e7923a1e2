//! ggml's block formats that no GPU kernel reads: the 2- and 3-bit k-quants Q2_K and Q3_K and the
//! non-linear 4-bit IQ4_NL and IQ4_XS. The GGUF loader decodes them here and requantises each row
//! to a native format (`loader::gguf::upload_format` says which). Each decoder does gguf-py's
//! (`gguf.quants.dequantize`) f32 operations in the same order, so the results are bit for bit
//! the same, NaN and infinite scales included; `tests/quant_gguf_py.rs` checks that.
//!
//! | format | weights | bytes | layout |
//! |---|---|---|---|
//! | Q2_K | 256 | 84 | 16 scale bytes (low nibble scale, high nibble min, per 16 weights), 64 bytes of 2-bit q, f16 d, f16 dmin |
//! | Q3_K | 256 | 110 | 32 bytes of high bits (hmask), 64 bytes of 2-bit low q, 12 bytes of 6-bit scales, f16 d |
//! | IQ4_NL | 32 | 18 | f16 d, 16 bytes of 4-bit indices into [`IQ4_VALUES`] |
//! | IQ4_XS | 256 | 136 | f16 d, u16 of scale high bits, 4 bytes of scale low nibbles, 128 bytes of 4-bit indices |
//!
//! Q2_K weight `i` = `d * (s & 15) * q - dmin * (s >> 4)` with `s` = scale byte `i / 16`, and
//! `q` = bits `2k..2k+2` of byte `32 * (i / 128) + i % 32`, `k = (i % 128) / 32`.
//! Q3_K weight `i` = `d * (scale[i / 16] - 32) * (q - 4 * !hbit)`: the 2-bit `q` as Q2_K's, the
//! high bit `hbit` = bit `i / 32` of hmask byte `i % 32` (set means no offset).
//! IQ4_NL weight `i` = `d * IQ4_VALUES[idx]`, `idx` the low nibble of byte `i` for `i < 16`, the
//! high nibble of byte `i - 16` otherwise. IQ4_XS: eight IQ4_NL-style sub-blocks of 32 with
//! 6-bit scales `d * (scale - 32)`.

use super::{check_blocks, h, QK_K};
use crate::error::Result;

/// Bytes per Q2_K super-block.
pub const Q2_K_BYTES: usize = 84;
/// Bytes per Q3_K super-block.
pub const Q3_K_BYTES: usize = 110;
/// Weights per IQ4_NL block.
pub const QK4_NL: usize = 32;
/// Bytes per IQ4_NL block.
pub const IQ4_NL_BYTES: usize = 18;
/// Bytes per IQ4_XS super-block.
pub const IQ4_XS_BYTES: usize = 136;

/// The 16 levels of IQ4_NL and IQ4_XS (ggml's `kvalues_iq4nl`): denser near zero, as trained
/// weights are.
pub const IQ4_VALUES: [i8; 16] = [
    -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
];

/// The 2-bit value of weight `i` (0..256) of a Q2_K / Q3_K super-block from its 64 bytes `qs`.
fn two_bits(qs: &[u8], i: usize) -> u8 {
    let (j, k, l) = (i / 128, (i % 128) / 32, i % 32);
    (qs[32 * j + l] >> (2 * k)) & 3
}

/// Dequantises `n` weights (a multiple of 256) of Q2_K bytes.
pub fn dequantize_q2_k(data: &[u8], n: usize) -> Result<Vec<f32>> {
    let need = check_blocks("q2_K", QK_K, Q2_K_BYTES, data, n)?;
    let mut y = Vec::with_capacity(n);
    for b in data[..need].chunks_exact(Q2_K_BYTES) {
        let (scales, qs) = (&b[..16], &b[16..80]);
        let (d, dmin) = (h(b, 80), h(b, 82));
        for (s, &sc) in scales.iter().enumerate() {
            // gguf-py: dl = d * (sc & 15), ml = dmin * (sc >> 4), then dl * q - ml.
            let dl = d * (sc & 0xF) as f32;
            let ml = dmin * (sc >> 4) as f32;
            y.extend((16 * s..16 * s + 16).map(|i| dl * two_bits(qs, i) as f32 - ml));
        }
    }
    Ok(y)
}

/// The 16 six-bit Q3_K scales (before the -32) from their 12 packed bytes: sub-block `k` takes
/// its low nibble from byte `k % 8` (low nibble for `k < 8`, high otherwise) and its top two bits
/// from bits `2 * (k / 4)` of byte `8 + k % 4`.
fn q3_k_scales(p: &[u8]) -> [i8; 16] {
    let mut s = [0i8; 16];
    for (k, v) in s.iter_mut().enumerate() {
        let low = (p[k % 8] >> (4 * (k / 8))) & 0xF;
        let high = (p[8 + k % 4] >> (2 * (k / 4))) & 3;
        *v = (low | (high << 4)) as i8 - 32;
    }
    s
}

/// Dequantises `n` weights (a multiple of 256) of Q3_K bytes.
pub fn dequantize_q3_k(data: &[u8], n: usize) -> Result<Vec<f32>> {
    let need = check_blocks("q3_K", QK_K, Q3_K_BYTES, data, n)?;
    let mut y = Vec::with_capacity(n);
    for b in data[..need].chunks_exact(Q3_K_BYTES) {
        let (hmask, qs) = (&b[..32], &b[32..96]);
        let scales = q3_k_scales(&b[96..108]);
        let d = h(b, 108);
        for (s, &sc) in scales.iter().enumerate() {
            let dl = d * sc as f32;
            y.extend((16 * s..16 * s + 16).map(|i| {
                // A clear high bit subtracts 4 (ggml's "hmask set: no offset").
                let high = (hmask[i % 32] >> (i / 32)) & 1;
                let q = two_bits(qs, i) as i8 - if high == 0 { 4 } else { 0 };
                dl * q as f32
            }));
        }
    }
    Ok(y)
}

/// The IQ4 level of weight `i` (0..32) of a 32-weight group whose 16 index bytes are `qs`.
fn iq4_value(qs: &[u8], i: usize) -> f32 {
    let idx = if i < 16 { qs[i] & 0xF } else { qs[i - 16] >> 4 };
    IQ4_VALUES[idx as usize] as f32
}

/// Dequantises `n` weights (a multiple of 32) of IQ4_NL bytes.
pub fn dequantize_iq4_nl(data: &[u8], n: usize) -> Result<Vec<f32>> {
    let need = check_blocks("iq4_nl", QK4_NL, IQ4_NL_BYTES, data, n)?;
    let mut y = Vec::with_capacity(n);
    for b in data[..need].chunks_exact(IQ4_NL_BYTES) {
        let d = h(b, 0);
        y.extend((0..QK4_NL).map(|i| d * iq4_value(&b[2..], i)));
    }
    Ok(y)
}

/// Dequantises `n` weights (a multiple of 256) of IQ4_XS bytes.
pub fn dequantize_iq4_xs(data: &[u8], n: usize) -> Result<Vec<f32>> {
    let need = check_blocks("iq4_xs", QK_K, IQ4_XS_BYTES, data, n)?;
    let mut y = Vec::with_capacity(n);
    for b in data[..need].chunks_exact(IQ4_XS_BYTES) {
        let d = h(b, 0);
        let scales_h = u16::from_le_bytes([b[2], b[3]]);
        let (scales_l, qs) = (&b[4..8], &b[8..]);
        for k in 0..QK_K / 32 {
            let low = (scales_l[k / 2] >> (4 * (k % 2))) & 0xF;
            let high = ((scales_h >> (2 * k)) & 3) as u8;
            let dl = d * ((low | (high << 4)) as i8 - 32) as f32;
            let group = &qs[16 * k..16 * k + 16];
            y.extend((0..32).map(|i| dl * iq4_value(group, i)));
        }
    }
    Ok(y)
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::f16;

    /// Weights written from the layout in the header (not from the decoders): a Q2_K block with
    /// scale byte `s` = `s` in the low nibble and `15 - s` in the high one.
    #[test]
    fn q2_k_matches_the_layout() {
        let q = |i: usize| ((i * 7 + i / 50) % 4) as u8;
        let mut b = vec![0u8; Q2_K_BYTES];
        for (s, v) in b[..16].iter_mut().enumerate() {
            *v = s as u8 | ((15 - s as u8) << 4);
        }
        for i in 0..256 {
            b[16 + 32 * (i / 128) + i % 32] |= q(i) << (2 * ((i % 128) / 32));
        }
        b[80..82].copy_from_slice(&f16::from_f32(0.5).to_le_bytes());
        b[82..84].copy_from_slice(&f16::from_f32(0.25).to_le_bytes());
        let y = dequantize_q2_k(&b, 256).unwrap();
        for (i, v) in y.iter().enumerate() {
            let s = i / 16;
            let want = 0.5 * s as f32 * q(i) as f32 - 0.25 * (15 - s) as f32;
            assert_eq!(*v, want, "weight {i}");
        }
    }

    #[test]
    fn q3_k_matches_the_layout() {
        let q = |i: usize| ((i * 5 + i / 30) % 8) as i32 - 4; // -4..=3
        let scale = |s: usize| (s * 4 + 1) as i32 - 32; // six bits minus 32
        let mut b = vec![0u8; Q3_K_BYTES];
        for i in 0..256 {
            let u = (q(i) + 4) as u8; // 3 bits: high bit set means no -4 offset
            b[32 + 32 * (i / 128) + i % 32] |= (u & 3) << (2 * ((i % 128) / 32));
            b[i % 32] |= (u >> 2) << (i / 32);
        }
        for s in 0..16 {
            let v = (scale(s) + 32) as u8;
            b[96 + s % 8] |= (v & 0xF) << (4 * (s / 8));
            b[104 + s % 4] |= (v >> 4) << (2 * (s / 4));
        }
        b[108..110].copy_from_slice(&f16::from_f32(-0.125).to_le_bytes());
        let y = dequantize_q3_k(&b, 256).unwrap();
        for (i, v) in y.iter().enumerate() {
            assert_eq!(
                *v,
                -0.125 * scale(i / 16) as f32 * q(i) as f32,
                "weight {i}"
            );
        }
    }

    #[test]
    fn iq4_formats_match_the_layout() {
        let idx = |i: usize| ((i * 11 + i / 40) % 16) as u8;
        let mut nl = f16::from_f32(0.25).to_le_bytes().to_vec();
        nl.extend((0..16).map(|j| idx(j) | (idx(j + 16) << 4)));
        let y = dequantize_iq4_nl(&nl, 32).unwrap();
        for (i, v) in y.iter().enumerate() {
            assert_eq!(*v, 0.25 * IQ4_VALUES[idx(i) as usize] as f32, "weight {i}");
        }

        let scale = |k: usize| (k * 9) as i32 - 32;
        let mut xs = vec![0u8; IQ4_XS_BYTES];
        xs[..2].copy_from_slice(&f16::from_f32(2.0).to_le_bytes());
        let mut high = 0u16;
        for k in 0..8 {
            let v = (scale(k) + 32) as u8;
            xs[4 + k / 2] |= (v & 0xF) << (4 * (k % 2));
            high |= ((v >> 4) as u16) << (2 * k);
        }
        xs[2..4].copy_from_slice(&high.to_le_bytes());
        for i in 0..256 {
            let (k, j) = (i / 32, i % 32);
            xs[8 + 16 * k + j % 16] |= idx(i) << (4 * (j / 16));
        }
        let y = dequantize_iq4_xs(&xs, 256).unwrap();
        for (i, v) in y.iter().enumerate() {
            let want = 2.0 * scale(i / 32) as f32 * IQ4_VALUES[idx(i) as usize] as f32;
            assert_eq!(*v, want, "weight {i}");
        }
    }

    #[test]
    fn bad_lengths_are_errors() {
        assert!(dequantize_q2_k(&[0; 84], 128).is_err());
        assert!(dequantize_q2_k(&[0; 83], 256).is_err());
        assert!(dequantize_q3_k(&[0; 219], 512).is_err());
        assert!(dequantize_iq4_nl(&[0; 18], 16).is_err());
        assert!(dequantize_iq4_xs(&[0; 135], 256).is_err());
        assert!(dequantize_iq4_xs(&[0; 272], 512).is_ok());
    }
}
