//! The GPU layout of weight matrices, repacked from GGUF bytes on upload.
//!
//! GGUF blocks are 18, 20 or 34 bytes, not 4-byte aligned, while WGSL storage arrays are arrays of
//! `u32`. So each matrix is split into two aligned arrays:
//!
//! - `data`, row-major, each row a whole number of `u32` words:
//!   - F32: one word per weight (the f32 bits);
//!   - F16: two weights per word (even column in the low half, as `unpack2x16float` reads it), the
//!     row padded to an even count;
//!   - Q8_0: 8 words per block, the 32 `i8` quants in GGUF order, four per word, little-endian;
//!   - Q4_0, Q4_1: 4 words per block, the 16 nibble bytes of the GGUF block verbatim (weight j in
//!     the low nibble of byte j, weight j+16 in the high nibble).
//! - `scales` (quantised formats only), indexed by block `g = row * blocks_per_row + block`:
//!   - Q8_0, Q4_0: the f16 `d` of block g in half `g % 2` of word `g / 2`;
//!   - Q4_1: word g holds `d` (low half) and `m` (high half).
//!
//! Sizes are exactly GGUF's (Q4_0: 16 + 2 bytes per 32 weights), so a 7B Q4_0 model takes the same
//! VRAM as its file.

use half::f16;

use super::WeightFormat;
use crate::error::{Error, Result};

/// A matrix (or a row range of one) in GPU layout.
#[derive(Debug, Clone, Default)]
pub struct Packed {
    pub data: Vec<u32>,
    pub scales: Vec<u32>,
}

/// `u32` words of `data` per row.
pub fn row_words(format: WeightFormat, cols: usize) -> usize {
    match format {
        WeightFormat::F32 => cols,
        WeightFormat::F16 => cols.div_ceil(2),
        WeightFormat::Q8_0 => cols / 32 * 8,
        WeightFormat::Q4_0 | WeightFormat::Q4_1 => cols / 32 * 4,
    }
}

/// `u32` words of `scales` for `rows` rows.
pub fn scale_words(format: WeightFormat, rows: usize, cols: usize) -> usize {
    let blocks = rows * (cols / 32);
    match format {
        WeightFormat::F32 | WeightFormat::F16 => 0,
        WeightFormat::Q8_0 | WeightFormat::Q4_0 => blocks.div_ceil(2),
        WeightFormat::Q4_1 => blocks,
    }
}

/// Checks that a `rows x cols` matrix can be stored in `format`.
pub fn check_shape(format: WeightFormat, rows: usize, cols: usize) -> Result<()> {
    if rows == 0 || cols == 0 {
        return Err(Error::invalid(
            "weights",
            format!("empty matrix {rows}x{cols}"),
        ));
    }
    if format.is_quantized() && !cols.is_multiple_of(32) {
        return Err(Error::invalid(
            "weights",
            format!("{format} needs a row length that is a multiple of 32, got {cols}"),
        ));
    }
    Ok(())
}

/// Repacks `rows` rows of GGUF bytes (`rows * cols` weights in `format`) into GPU layout.
pub fn repack(format: WeightFormat, rows: usize, cols: usize, gguf: &[u8]) -> Result<Packed> {
    check_shape(format, rows, cols)?;
    let need = format.bytes_for(rows * cols);
    if gguf.len() != need {
        return Err(Error::invalid(
            "repack",
            format!(
                "{rows}x{cols} {format} needs {need} bytes, got {}",
                gguf.len()
            ),
        ));
    }
    let rw = row_words(format, cols);
    let mut p = Packed {
        data: Vec::with_capacity(rows * rw),
        scales: vec![0; scale_words(format, rows, cols)],
    };
    let word = |b: &[u8]| u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    let half = |b: &[u8]| u16::from_le_bytes([b[0], b[1]]) as u32;
    match format {
        WeightFormat::F32 => p.data.extend(gguf.chunks_exact(4).map(word)),
        WeightFormat::F16 => {
            for row in gguf.chunks_exact(cols * 2) {
                let mut halves = row.chunks_exact(2).map(half);
                for _ in 0..rw {
                    let lo = halves.next().unwrap_or(0);
                    let hi = halves.next().unwrap_or(0);
                    p.data.push(lo | (hi << 16));
                }
            }
        }
        WeightFormat::Q8_0 | WeightFormat::Q4_0 => {
            let bb = format.block_bytes();
            for (g, b) in gguf.chunks_exact(bb).enumerate() {
                p.scales[g / 2] |= half(b) << (16 * (g % 2));
                p.data.extend(b[2..].chunks_exact(4).map(word));
            }
        }
        WeightFormat::Q4_1 => {
            for (g, b) in gguf.chunks_exact(20).enumerate() {
                p.scales[g] = half(b) | (half(&b[2..]) << 16);
                p.data.extend(b[4..].chunks_exact(4).map(word));
            }
        }
    }
    Ok(p)
}

/// Reads weight `(row, col)` back from the GPU layout; the CPU references of the kernels use it so
/// that the layout itself is under test.
pub fn weight_at(format: WeightFormat, cols: usize, p: &Packed, row: usize, col: usize) -> f32 {
    let rw = row_words(format, cols);
    let h =
        |w: u32, hi: bool| f16::from_bits(if hi { (w >> 16) as u16 } else { w as u16 }).to_f32();
    match format {
        WeightFormat::F32 => f32::from_bits(p.data[row * rw + col]),
        WeightFormat::F16 => h(p.data[row * rw + col / 2], col % 2 == 1),
        _ => {
            let nb = cols / 32;
            let (b, j) = (col / 32, col % 32);
            let g = row * nb + b;
            let words = &p.data[row * rw + b * (rw / nb)..];
            match format {
                WeightFormat::Q8_0 => {
                    let q = (words[j / 4] >> (8 * (j % 4))) as u8 as i8;
                    h(p.scales[g / 2], g % 2 == 1) * q as f32
                }
                _ => {
                    let byte = (words[(j % 16) / 4] >> (8 * (j % 4))) as u8;
                    let q = if j < 16 { byte & 15 } else { byte >> 4 } as f32;
                    if format == WeightFormat::Q4_0 {
                        h(p.scales[g / 2], g % 2 == 1) * (q - 8.0)
                    } else {
                        h(p.scales[g], false) * q + h(p.scales[g], true)
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::{dequantize, quantize};

    #[test]
    fn layout_reads_back_every_weight() {
        let (rows, cols) = (3, 96);
        let x: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 7919) % 101) as f32 / 13.0 - 3.0)
            .collect();
        for f in WeightFormat::ALL {
            let q = quantize(f, &x).unwrap();
            let want = dequantize(f, &q, x.len()).unwrap();
            let p = repack(f, rows, cols, &q).unwrap();
            assert_eq!(p.data.len(), rows * row_words(f, cols), "{f}");
            assert_eq!(
                (p.data.len() + p.scales.len()) * 4,
                f.bytes_for(rows * cols).div_ceil(4) * 4,
                "{f} size"
            );
            for r in 0..rows {
                for c in 0..cols {
                    assert_eq!(
                        weight_at(f, cols, &p, r, c),
                        want[r * cols + c],
                        "{f} ({r},{c})"
                    );
                }
            }
        }
    }

    #[test]
    fn odd_f16_rows_are_padded() {
        let x = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0];
        let q = quantize(WeightFormat::F16, &x).unwrap();
        let p = repack(WeightFormat::F16, 2, 3, &q).unwrap();
        assert_eq!(p.data.len(), 4);
        assert_eq!(weight_at(WeightFormat::F16, 3, &p, 1, 2), 6.0);
    }
}
