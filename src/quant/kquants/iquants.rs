//! ggml's codebook ("grid") formats IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS and IQ3_S, decoded on the
//! CPU for conversion on load: each group of 8 (IQ2) or 4 (IQ3) weights is one grid entry of
//! unsigned magnitudes ([`super::iq_grids`], from gguf-py), with a sign per weight and a 4-bit
//! scale per 16 or 32 weights. The f32 operations are gguf-py's (`gguf.quants.dequantize`) in
//! its order, so the results are bit for bit the same; `tests/quant_gguf_py.rs` checks that.
//!
//! | format | bytes per 256 | layout |
//! |---|---|---|
//! | IQ2_XXS | 66 | f16 d; per 32 weights a u32 of four grid indices and a u32 of four 7-bit sign indices and a 4-bit scale |
//! | IQ2_XS | 74 | f16 d; 32 u16 (9-bit grid index, 7-bit sign index); 8 bytes of 4-bit scales per 16 |
//! | IQ2_S | 82 | f16 d; 32 index bytes; 32 sign bytes; 8 bytes of index high bits; 8 bytes of 4-bit scales per 16 |
//! | IQ3_XXS | 98 | f16 d; 64 index bytes; per 32 weights a u32 of four 7-bit sign indices and a 4-bit scale |
//! | IQ3_S | 110 | f16 d; 64 index bytes; 8 bytes of index high bits; 32 sign bytes; 4 bytes of 4-bit scales per 32 |
//!
//! IQ2 scales are `d * (0.5 + s) * 0.25`, IQ3_XXS's `d * (0.5 + s) * 0.5`, IQ3_S's
//! `d * (1 + 2s)`. A 7-bit sign index `k` stands for the 8 signs `k | parity(k) << 7` (an even
//! number of minus signs), ggml's `ksigns_iq2xs`.

use super::iq_grids::{IQ2S_GRID, IQ2XS_GRID, IQ2XXS_GRID, IQ3S_GRID, IQ3XXS_GRID};
use super::{check_blocks, h, QK_K};
use crate::error::Result;

/// Bytes per IQ2_XXS super-block.
pub const IQ2_XXS_BYTES: usize = 66;
/// Bytes per IQ2_XS super-block.
pub const IQ2_XS_BYTES: usize = 74;
/// Bytes per IQ2_S super-block.
pub const IQ2_S_BYTES: usize = 82;
/// Bytes per IQ3_XXS super-block.
pub const IQ3_XXS_BYTES: usize = 98;
/// Bytes per IQ3_S super-block.
pub const IQ3_S_BYTES: usize = 110;

/// ggml's `ksigns_iq2xs[k]`: 7 sign bits and their parity as the eighth.
fn ksigns(k: u32) -> u8 {
    let k = (k & 127) as u8;
    k | (((k.count_ones() & 1) as u8) << 7)
}

/// Magnitude `j` of a packed grid entry.
fn mag(entry: u64, j: usize) -> f32 {
    ((entry >> (8 * j)) & 0xFF) as f32
}

/// `db * magnitude` times -1 where bit `j` of `signs` is set, as gguf-py does. A hardware
/// multiplication by -1 returns a NaN operand unchanged, sign included, where a negation would
/// flip its sign (and the compiler turns `x * -1.0` into a negation), so NaN is left alone.
fn signed(db: f32, m: f32, signs: u8, j: usize) -> f32 {
    let v = db * m;
    if (signs >> j) & 1 == 1 && !v.is_nan() {
        -v
    } else {
        v
    }
}

fn u32_at(b: &[u8], i: usize) -> u32 {
    u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
}

/// Dequantises `n` weights (a multiple of 256) of IQ2_XXS bytes.
pub fn dequantize_iq2_xxs(data: &[u8], n: usize) -> Result<Vec<f32>> {
    let need = check_blocks("iq2_xxs", QK_K, IQ2_XXS_BYTES, data, n)?;
    let mut y = Vec::with_capacity(n);
    for b in data[..need].chunks_exact(IQ2_XXS_BYTES) {
        let d = h(b, 0);
        for ib in 0..8 {
            let (idx, aux) = (&b[2 + 8 * ib..6 + 8 * ib], u32_at(b, 6 + 8 * ib));
            let db = d * (0.5 + (aux >> 28) as f32) * 0.25;
            for (l, &g) in idx.iter().enumerate() {
                let (entry, s) = (IQ2XXS_GRID[g as usize], ksigns(aux >> (7 * l)));
                y.extend((0..8).map(|j| signed(db, mag(entry, j), s, j)));
            }
        }
    }
    Ok(y)
}

/// The 16 IQ2 scales `d * (0.5 + s) * 0.25`, one per 16 weights, from 8 bytes of nibbles.
fn iq2_scales(d: f32, scales: &[u8]) -> [f32; 16] {
    std::array::from_fn(|k| d * (0.5 + ((scales[k / 2] >> (4 * (k % 2))) & 0xF) as f32) * 0.25)
}

/// Dequantises `n` weights (a multiple of 256) of IQ2_XS bytes.
pub fn dequantize_iq2_xs(data: &[u8], n: usize) -> Result<Vec<f32>> {
    let need = check_blocks("iq2_xs", QK_K, IQ2_XS_BYTES, data, n)?;
    let mut y = Vec::with_capacity(n);
    for b in data[..need].chunks_exact(IQ2_XS_BYTES) {
        let db = iq2_scales(h(b, 0), &b[66..74]);
        for e in 0..32 {
            let q = u16::from_le_bytes([b[2 + 2 * e], b[3 + 2 * e]]);
            let (entry, s) = (IQ2XS_GRID[(q & 511) as usize], ksigns((q >> 9) as u32));
            y.extend((0..8).map(|j| signed(db[e / 2], mag(entry, j), s, j)));
        }
    }
    Ok(y)
}

/// Dequantises `n` weights (a multiple of 256) of IQ2_S bytes.
pub fn dequantize_iq2_s(data: &[u8], n: usize) -> Result<Vec<f32>> {
    let need = check_blocks("iq2_s", QK_K, IQ2_S_BYTES, data, n)?;
    let mut y = Vec::with_capacity(n);
    for b in data[..need].chunks_exact(IQ2_S_BYTES) {
        let (qs, signs, qh) = (&b[2..34], &b[34..66], &b[66..74]);
        let db = iq2_scales(h(b, 0), &b[74..82]);
        for e in 0..32 {
            let high = ((qh[e / 4] >> (2 * (e % 4))) & 3) as usize;
            let entry = IQ2S_GRID[qs[e] as usize | (high << 8)];
            y.extend((0..8).map(|j| signed(db[e / 2], mag(entry, j), signs[e], j)));
        }
    }
    Ok(y)
}

/// Dequantises `n` weights (a multiple of 256) of IQ3_XXS bytes.
pub fn dequantize_iq3_xxs(data: &[u8], n: usize) -> Result<Vec<f32>> {
    let need = check_blocks("iq3_xxs", QK_K, IQ3_XXS_BYTES, data, n)?;
    let mut y = Vec::with_capacity(n);
    for b in data[..need].chunks_exact(IQ3_XXS_BYTES) {
        let (d, qs) = (h(b, 0), &b[2..66]);
        for ib in 0..8 {
            let aux = u32_at(b, 66 + 4 * ib);
            let db = d * (0.5 + (aux >> 28) as f32) * 0.5;
            for l in 0..4 {
                let s = ksigns(aux >> (7 * l));
                // Eight weights: two grid entries of four.
                for half in 0..2 {
                    let entry = IQ3XXS_GRID[qs[8 * ib + 2 * l + half] as usize] as u64;
                    y.extend((0..4).map(|j| signed(db, mag(entry, j), s, 4 * half + j)));
                }
            }
        }
    }
    Ok(y)
}

/// Dequantises `n` weights (a multiple of 256) of IQ3_S bytes.
pub fn dequantize_iq3_s(data: &[u8], n: usize) -> Result<Vec<f32>> {
    let need = check_blocks("iq3_s", QK_K, IQ3_S_BYTES, data, n)?;
    let mut y = Vec::with_capacity(n);
    for b in data[..need].chunks_exact(IQ3_S_BYTES) {
        let (d, qs, qh, signs, scales) = (h(b, 0), &b[2..66], &b[66..74], &b[74..106], &b[106..]);
        for ib in 0..8 {
            // gguf-py computes 1 + 2s in u8 (at most 31), then d times it.
            let db = d * (1 + 2 * ((scales[ib / 2] >> (4 * (ib % 2))) & 0xF)) as f32;
            for e in 8 * ib..8 * ib + 8 {
                let high = ((qh[e / 8] >> (e % 8)) & 1) as usize;
                let entry = IQ3S_GRID[qs[e] as usize | (high << 8)] as u64;
                // Weight 4e + j takes sign bit (4e + j) % 8 of sign byte (4e + j) / 8.
                let s = signs[e / 2] >> (4 * (e % 2));
                y.extend((0..4).map(|j| signed(db, mag(entry, j), s, j)));
            }
        }
    }
    Ok(y)
}
