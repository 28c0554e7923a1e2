//! The GPU layout of weight matrices, repacked from GGUF bytes on upload.
//!
//! GGUF blocks are 18, 20, 22 or 34 bytes (and Q6_K's 210), not 4-byte aligned, while WGSL storage
//! arrays are arrays of `u32`. So each matrix is split into two aligned arrays, the block's f16
//! scale(s) in one and the rest of the block, verbatim, in the other:
//!
//! - `data`, row-major, each row a whole number of `u32` words:
//!   - F32: one word per weight (the f32 bits);
//!   - F16: two weights per word (even column in the low half, as `unpack2x16float` reads it), the
//!     row padded to an even count;
//!   - Q8_0: 8 words per block, the 32 `i8` quants in GGUF order, four per word, little-endian;
//!   - Q4_0, Q4_1: 4 words per block, the 16 nibble bytes of the GGUF block verbatim (weight j in
//!     the low nibble of byte j, weight j+16 in the high nibble);
//!   - Q5_0, Q5_1: 5 words per block: the u32 of fifth bits (bit j for weight j), then the 16
//!     nibble bytes as Q4_0's;
//!   - Q4_K: 35 words per 256-weight super-block: the 12 bytes of packed 6-bit scales and mins,
//!     then the 128 nibble bytes (byte 32c + l: weight 64c + l low, 64c + 32 + l high);
//!   - Q5_K: 43 words per super-block: the 12 scale bytes, the 32 bytes of fifth bits, the 128
//!     nibble bytes;
//!   - Q6_K: 52 words per super-block: ql (128 bytes), qh (64), the 16 i8 sub-block scales;
//!
//!   (byte k of a block's words is byte `k % 4` of word `k / 4`, little-endian).
//! - `scales` (quantised formats only), indexed by block `g = row * blocks_per_row + block`:
//!   - Q8_0, Q4_0: the f16 `d` of block g in half `g % 2` of word `g / 2`;
//!   - Q4_1, Q5_1: word g holds `d` (low half) and `m` (high half);
//!   - Q5_0, Q6_K: the f16 `d` of block g in half `g % 2` of word `g / 2` (as Q8_0);
//!   - Q4_K, Q5_K: word g holds `d` (low half) and `dmin` (high half).
//!
//! Sizes are exactly GGUF's (Q4_0: 16 + 2 bytes per 32 weights, Q4_K: 140 + 4 per 256), so a 7B
//! Q4_0 model takes the same VRAM as its file (up to the 2-byte pad of an odd block count).

use half::f16;

use super::{kquants, WeightFormat};
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
        _ => cols / format.block_len() * block_words(format),
    }
}

/// `u32` words of `data` per block of a quantised format: the block less its scale bytes.
pub fn block_words(format: WeightFormat) -> usize {
    (format.block_bytes() - scale_bytes(format)) / 4
}

/// Bytes of f16 scales at the start (Q6_K: the end) of a block that go to `scales`: 2 (one f16
/// `d`, two blocks a word) or 4 (`d` and `m`/`dmin`, a word a block); 0 for f32/f16.
pub fn scale_bytes(format: WeightFormat) -> usize {
    match format {
        WeightFormat::F32 | WeightFormat::F16 => 0,
        WeightFormat::Q8_0 | WeightFormat::Q4_0 | WeightFormat::Q5_0 | WeightFormat::Q6_K => 2,
        WeightFormat::Q4_1 | WeightFormat::Q5_1 | WeightFormat::Q4_K | WeightFormat::Q5_K => 4,
    }
}

/// `u32` words of `scales` for `rows` rows.
pub fn scale_words(format: WeightFormat, rows: usize, cols: usize) -> usize {
    if !format.is_quantized() {
        return 0;
    }
    let blocks = rows * (cols / format.block_len());
    if scale_bytes(format) == 2 {
        blocks.div_ceil(2)
    } else {
        blocks
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
    if !cols.is_multiple_of(format.block_len()) {
        return Err(Error::invalid(
            "weights",
            format!(
                "{format} needs a row length that is a multiple of {}, got {cols}",
                format.block_len()
            ),
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
        WeightFormat::Q6_K => {
            // Q6_K's d is the block's last two bytes.
            for (g, b) in gguf.chunks_exact(format.block_bytes()).enumerate() {
                p.scales[g / 2] |= half(&b[208..]) << (16 * (g % 2));
                p.data.extend(b[..208].chunks_exact(4).map(word));
            }
        }
        _ => {
            let (bb, sb) = (format.block_bytes(), scale_bytes(format));
            for (g, b) in gguf.chunks_exact(bb).enumerate() {
                if sb == 2 {
                    p.scales[g / 2] |= half(b) << (16 * (g % 2));
                } else {
                    p.scales[g] = half(b) | (half(&b[2..]) << 16);
                }
                p.data.extend(b[sb..].chunks_exact(4).map(word));
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
            let bl = format.block_len();
            let nb = cols / bl;
            let (b, j) = (col / bl, col % bl);
            let g = row * nb + b;
            let words = &p.data[row * rw + b * (rw / nb)..];
            let byte = |k: usize| (words[k / 4] >> (8 * (k % 4))) as u8;
            // The f16 pair of a 4-byte scale entry, or the half of a shared word.
            let (d, m) = if scale_bytes(format) == 2 {
                (h(p.scales[g / 2], g % 2 == 1), 0.0)
            } else {
                (h(p.scales[g], false), h(p.scales[g], true))
            };
            match format {
                WeightFormat::Q5_0 | WeightFormat::Q5_1 => {
                    let nib = byte(4 + j % 16);
                    let lo = if j < 16 { nib & 15 } else { nib >> 4 };
                    let q = lo | ((((words[0] >> j) & 1) as u8) << 4);
                    if format == WeightFormat::Q5_0 {
                        d * (q as i32 - 16) as f32
                    } else {
                        d * q as f32 + m
                    }
                }
                WeightFormat::Q4_K | WeightFormat::Q5_K => {
                    let mut sc = [0u8; 12];
                    for (k, s) in sc.iter_mut().enumerate() {
                        *s = byte(k);
                    }
                    let s = j / 32;
                    let (scale, min) = kquants::get_scale_min_k4(s, &sc);
                    let qs = if format == WeightFormat::Q4_K { 12 } else { 44 };
                    let nib = byte(qs + 32 * (j / 64) + j % 32);
                    let mut q = if s % 2 == 0 { nib & 15 } else { nib >> 4 };
                    if format == WeightFormat::Q5_K {
                        q |= ((byte(12 + j % 32) >> s) & 1) << 4;
                    }
                    // ggml's order: (d * scale) * q - dmin * min.
                    d * scale as f32 * q as f32 - m * min as f32
                }
                WeightFormat::Q6_K => {
                    let (half, p) = (j / 128, j % 128);
                    let (k, l) = (p / 32, p % 32);
                    let ql = byte(64 * half + l + 32 * (k % 2));
                    let lo = if k >= 2 { ql >> 4 } else { ql & 15 };
                    let hi = (byte(128 + 32 * half + l) >> (2 * k)) & 3;
                    let q = (lo | (hi << 4)) as i32 - 32;
                    let scale = byte(192 + 8 * half + 2 * k + l / 16) as i8;
                    d * scale as f32 * q as f32
                }
                WeightFormat::Q8_0 => d * byte(j) as i8 as f32,
                _ => {
                    let nib = byte(j % 16);
                    let q = if j < 16 { nib & 15 } else { nib >> 4 } as f32;
                    if format == WeightFormat::Q4_0 {
                        d * (q - 8.0)
                    } else {
                        d * q + m
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
        // Three rows of two K-quant super-blocks (or sixteen 32-weight blocks): an odd block
        // count per matrix for the shared-word scales, and scale extremes from the ramp.
        let (rows, cols) = (3, 512);
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
