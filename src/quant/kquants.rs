//! ggml's block formats that wgllm dequantises on the CPU (no GPU kernel reads them yet): the
//! "k-quant" super-blocks Q4_K, Q5_K and Q6_K (256 weights each) and the 5-bit Q5_0 and Q5_1
//! (32 weights), decoded exactly as ggml's `dequantize_row_*` and gguf-py's
//! `gguf.quants.dequantize` do (the same f32 operations in the same order, so bit for bit:
//! `tests/quant_gguf_py.rs` checks that on blocks gguf-py decoded). The GGUF loader turns such
//! tensors into f32, which the caller may requantise to a native format.
//!
//! | format | bytes | layout |
//! |---|---|---|
//! | Q4_K | 144 | f16 d, f16 dmin, 12 bytes of 6-bit scales and mins for 8 sub-blocks of 32, 128 bytes of nibbles |
//! | Q5_K | 176 | as Q4_K, then 32 bytes of fifth bits before the nibbles |
//! | Q6_K | 210 | 128 bytes low nibbles (ql), 64 bytes high 2-bit pairs (qh), 16 i8 scales, f16 d |
//! | Q5_0 | 22 | f16 d, u32 of fifth bits, 16 bytes of nibbles |
//! | Q5_1 | 24 | f16 d, f16 m, u32 of fifth bits, 16 bytes of nibbles |
//!
//! Q4_K weight = `d * scale[s] * q - dmin * min[s]` for sub-block `s`; within each 64-weight chunk
//! `c`, byte `32c + l` holds weight `64c + l` in its low nibble and `64c + 32 + l` in its high one.
//! Q5_K adds bit `c'` of fifth-bit byte `l` as bit 4 of weight `32c' + l`.
//! Q6_K weight = `d * scale[s] * (q - 32)` with 16 sub-blocks of 16 and a 6-bit q split over ql/qh.
//! Q5_0 weight = `d * (q - 16)`, Q5_1 weight = `d * q + m`: byte `l` holds weight `l` (low nibble)
//! and `l + 16` (high), bit `j` of the u32 is bit 4 of weight `j`.

use half::f16;

use crate::error::{Error, Result};

/// Weights per k-quant super-block.
pub const QK_K: usize = 256;
/// Bytes per Q4_K super-block.
pub const Q4_K_BYTES: usize = 144;
/// Bytes per Q6_K super-block.
pub const Q6_K_BYTES: usize = 210;
/// Bytes per Q5_K super-block.
pub const Q5_K_BYTES: usize = 176;
/// Weights per Q5_0 / Q5_1 block.
pub const QK5: usize = 32;
/// Bytes per Q5_0 block.
pub const Q5_0_BYTES: usize = 22;
/// Bytes per Q5_1 block.
pub const Q5_1_BYTES: usize = 24;

fn h(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// ggml's `get_scale_min_k4`: the 6-bit scale and min of sub-block `j` (0..8) from the 12 packed
/// bytes. Sub-blocks 0..4 use the low 6 bits of bytes j and j+4; 4..8 take their low 4 bits from
/// byte j+4 (scale: low nibble, min: high nibble) and their top 2 bits from the spare top bits of
/// bytes j-4 (scale) and j (min).
pub fn get_scale_min_k4(j: usize, q: &[u8; 12]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// Bytes `n` weights of a format of `block_len`-weight blocks of `block_bytes` take, checked
/// against what is given.
fn check_blocks(
    name: &str,
    block_len: usize,
    block_bytes: usize,
    data: &[u8],
    n: usize,
) -> Result<usize> {
    if !n.is_multiple_of(block_len) {
        return Err(Error::invalid(
            format!("dequantize {name}"),
            format!("{n} weights is not a multiple of the block length {block_len}"),
        ));
    }
    let need = n / block_len * block_bytes;
    if data.len() < need {
        return Err(Error::invalid(
            format!("dequantize {name}"),
            format!("{} bytes given, {need} needed for {n} weights", data.len()),
        ));
    }
    Ok(need)
}

fn check(name: &str, block_bytes: usize, data: &[u8], n: usize) -> Result<usize> {
    check_blocks(name, QK_K, block_bytes, data, n)
}

/// Dequantises `n` weights (a multiple of 256) of Q4_K bytes.
pub fn dequantize_q4_k(data: &[u8], n: usize) -> Result<Vec<f32>> {
    let need = check("q4_K", Q4_K_BYTES, data, n)?;
    let mut y = Vec::with_capacity(n);
    for b in data[..need].chunks_exact(Q4_K_BYTES) {
        let d = h(b, 0);
        let min = h(b, 2);
        let mut scales = [0u8; 12];
        scales.copy_from_slice(&b[4..16]);
        let qs = &b[16..];
        for (c, q) in qs.chunks_exact(32).enumerate() {
            // Same operation order as ggml (d * sc, then * q - min * m) for bit-identical results.
            let (sc, m) = get_scale_min_k4(2 * c, &scales);
            let (d1, m1) = (d * sc as f32, min * m as f32);
            let (sc, m) = get_scale_min_k4(2 * c + 1, &scales);
            let (d2, m2) = (d * sc as f32, min * m as f32);
            y.extend(q.iter().map(|&v| d1 * (v & 0xF) as f32 - m1));
            y.extend(q.iter().map(|&v| d2 * (v >> 4) as f32 - m2));
        }
    }
    Ok(y)
}

/// Dequantises `n` weights (a multiple of 256) of Q5_K bytes.
pub fn dequantize_q5_k(data: &[u8], n: usize) -> Result<Vec<f32>> {
    let need = check("q5_K", Q5_K_BYTES, data, n)?;
    let mut y = Vec::with_capacity(n);
    for b in data[..need].chunks_exact(Q5_K_BYTES) {
        let d = h(b, 0);
        let min = h(b, 2);
        let mut scales = [0u8; 12];
        scales.copy_from_slice(&b[4..16]);
        let qh = &b[16..48];
        let qs = &b[48..];
        for (c, q) in qs.chunks_exact(32).enumerate() {
            let (sc, m) = get_scale_min_k4(2 * c, &scales);
            let (d1, m1) = (d * sc as f32, min * m as f32);
            let (sc, m) = get_scale_min_k4(2 * c + 1, &scales);
            let (d2, m2) = (d * sc as f32, min * m as f32);
            // Sub-blocks 2c and 2c + 1 take their fifth bits from bits 2c and 2c + 1 of qh.
            let fifth = |l: usize, bit: usize| ((qh[l] >> bit) & 1) << 4;
            y.extend((0..32).map(|l| d1 * ((q[l] & 0xF) | fifth(l, 2 * c)) as f32 - m1));
            y.extend((0..32).map(|l| d2 * ((q[l] >> 4) | fifth(l, 2 * c + 1)) as f32 - m2));
        }
    }
    Ok(y)
}

/// The 32 five-bit values of a Q5_0 / Q5_1 block from its fifth bits and nibbles.
fn q5_values(qh: [u8; 4], qs: &[u8]) -> [u8; QK5] {
    let qh = u32::from_le_bytes(qh);
    let mut q = [0u8; QK5];
    for j in 0..16 {
        q[j] = (qs[j] & 0xF) | ((((qh >> j) & 1) as u8) << 4);
        q[j + 16] = (qs[j] >> 4) | ((((qh >> (j + 16)) & 1) as u8) << 4);
    }
    q
}

/// Dequantises `n` weights (a multiple of 32) of Q5_0 bytes.
pub fn dequantize_q5_0(data: &[u8], n: usize) -> Result<Vec<f32>> {
    let need = check_blocks("q5_0", QK5, Q5_0_BYTES, data, n)?;
    let mut y = Vec::with_capacity(n);
    for b in data[..need].chunks_exact(Q5_0_BYTES) {
        let d = h(b, 0);
        let q = q5_values([b[2], b[3], b[4], b[5]], &b[6..]);
        y.extend(q.iter().map(|&v| d * (v as i32 - 16) as f32));
    }
    Ok(y)
}

/// Dequantises `n` weights (a multiple of 32) of Q5_1 bytes.
pub fn dequantize_q5_1(data: &[u8], n: usize) -> Result<Vec<f32>> {
    let need = check_blocks("q5_1", QK5, Q5_1_BYTES, data, n)?;
    let mut y = Vec::with_capacity(n);
    for b in data[..need].chunks_exact(Q5_1_BYTES) {
        let (d, m) = (h(b, 0), h(b, 2));
        let q = q5_values([b[4], b[5], b[6], b[7]], &b[8..]);
        // d * q, then + m: two roundings, as ggml and gguf-py (no fused multiply-add).
        y.extend(q.iter().map(|&v| d * v as f32 + m));
    }
    Ok(y)
}

/// Dequantises `n` weights (a multiple of 256) of Q6_K bytes.
pub fn dequantize_q6_k(data: &[u8], n: usize) -> Result<Vec<f32>> {
    let need = check("q6_K", Q6_K_BYTES, data, n)?;
    let mut y = vec![0f32; n];
    for (b, out) in data[..need]
        .chunks_exact(Q6_K_BYTES)
        .zip(y.chunks_exact_mut(QK_K))
    {
        let d = h(b, 208);
        // Two halves of 128 weights; each uses 64 bytes of ql, 32 of qh and 8 scales.
        for half in 0..2 {
            let ql = &b[64 * half..64 * half + 64];
            let qh = &b[128 + 32 * half..128 + 32 * half + 32];
            let sc = &b[192 + 8 * half..192 + 8 * half + 8];
            let y = &mut out[128 * half..128 * half + 128];
            for l in 0..32 {
                let is = l / 16;
                let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i32 - 32;
                let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                let s = |k: usize| sc[is + k] as i8 as f32;
                y[l] = d * s(0) * q1 as f32;
                y[l + 32] = d * s(2) * q2 as f32;
                y[l + 64] = d * s(4) * q3 as f32;
                y[l + 96] = d * s(6) * q4 as f32;
            }
        }
    }
    Ok(y)
}

// ---------------------------------------------------------------------------------------------
// Quantisers: faithful ports of ggml's reference quantisers (`quantize_row_*_ref` in
// ggml-quants.c), the same f32 operations in the same order, so that wgllm writes the blocks
// llama.cpp's reference path writes (builds that contract multiply-adds into FMAs may differ in
// the last bit of a scale, and hence in a few quants).

/// ggml's `nearest_int`: round to nearest, ties to even, through the float's mantissa (valid for
/// |v| < 2^22, which every caller's range is).
fn nearest_int(v: f32) -> i32 {
    ((v + 12_582_912.0).to_bits() & 0x007f_ffff) as i32 - 0x0040_0000
}

/// ggml's `GROUP_MAX_EPS`: below this a group counts as all zero.
const GROUP_MAX_EPS: f32 = 1e-15;

fn f16_bytes(v: f32) -> [u8; 2] {
    f16::from_f32(v).to_le_bytes()
}

fn f16_round(v: f32) -> f32 {
    f16::from_f32(v).to_f32()
}

/// ggml's `make_qkx2_quants`: a scale and a min (returned negated, as ggml does) for `x` with
/// levels `0..=nmax` chosen by weighted least squares over `nstep + 1` candidate scales.
#[allow(clippy::too_many_arguments)]
fn make_qkx2_quants(
    nmax: i32,
    x: &[f32],
    weights: &[f32],
    l_out: &mut [u8],
    l_aux: &mut [u8],
    rmin: f32,
    rdelta: f32,
    nstep: i32,
) -> (f32, f32) {
    let n = x.len();
    let mut min = x[0];
    let mut max = x[0];
    let mut sum_w = weights[0];
    let mut sum_x = sum_w * x[0];
    for i in 1..n {
        if x[i] < min {
            min = x[i];
        }
        if x[i] > max {
            max = x[i];
        }
        let w = weights[i];
        sum_w += w;
        sum_x += w * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        l_out.fill(0);
        return (0.0, -min);
    }
    let mut iscale = nmax as f32 / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_error = 0f32;
    for i in 0..n {
        let l = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
        l_out[i] = l as u8;
        let diff = scale * l as f32 + min - x[i];
        best_error += weights[i] * (diff * diff);
    }
    if nstep < 1 {
        return (scale, -min);
    }
    for is in 0..=nstep {
        iscale = (rmin + rdelta * is as f32 + nmax as f32) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0f32, 0f32, 0f32);
        for i in 0..n {
            let l = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
            l_aux[i] = l as u8;
            let (w, lf) = (weights[i], l as f32);
            sum_l += w * lf;
            sum_l2 += w * lf * lf;
            sum_xl += w * lf * x[i];
        }
        let det = sum_w * sum_l2 - sum_l * sum_l;
        if det > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / det;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut cur_error = 0f32;
            for i in 0..n {
                let diff = this_scale * l_aux[i] as f32 + this_min - x[i];
                cur_error += weights[i] * (diff * diff);
            }
            if cur_error < best_error {
                l_out[..n].copy_from_slice(&l_aux[..n]);
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

/// ggml's `make_qx_quants` with `rmse_type = 1` and no importance weights (what Q6_K's reference
/// quantiser uses): a signed scale for levels `-nmax..nmax-1`, stored in `l` offset by `nmax`.
fn make_qx_quants(nmax: i32, x: &[f32], l_out: &mut [u8]) -> f32 {
    let mut max = 0f32;
    let mut amax = 0f32;
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    if amax < GROUP_MAX_EPS {
        l_out.fill(0);
        return 0.0;
    }
    let nf = nmax as f32;
    let mut iscale = -nf / max;
    let (mut sumlx, mut suml2) = (0f32, 0f32);
    for (i, &v) in x.iter().enumerate() {
        let l = nearest_int(iscale * v).clamp(-nmax, nmax - 1);
        l_out[i] = (l + nmax) as u8;
        // rmse_type 1 weighs each value by its square.
        let (w, lf) = (v * v, l as f32);
        sumlx += w * v * lf;
        suml2 += w * lf * lf;
    }
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;
    for is in -9..=9 {
        if is == 0 {
            continue;
        }
        iscale = -(nf + 0.1 * is as f32) / max;
        sumlx = 0.0;
        suml2 = 0.0;
        for &v in x {
            let l = nearest_int(iscale * v).clamp(-nmax, nmax - 1);
            let (w, lf) = (v * v, l as f32);
            sumlx += w * v * lf;
            suml2 += w * lf * lf;
        }
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            for (i, &v) in x.iter().enumerate() {
                l_out[i] = (nmax + nearest_int(iscale * v).clamp(-nmax, nmax - 1)) as u8;
            }
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    scale
}

/// Checks that `x` is a whole number of `block_len` blocks.
fn check_quantize(name: &str, block_len: usize, x: &[f32]) -> Result<()> {
    if !x.len().is_multiple_of(block_len) {
        return Err(Error::invalid(
            format!("quantize {name}"),
            format!(
                "{} weights is not a multiple of the block length {block_len}",
                x.len()
            ),
        ));
    }
    Ok(())
}

/// Q5_0 blocks of `x` (ggml's `quantize_row_q5_0_ref`): the signed value of largest magnitude maps
/// to -16.
pub fn quantize_q5_0(x: &[f32]) -> Result<Vec<u8>> {
    check_quantize("q5_0", QK5, x)?;
    let mut out = Vec::with_capacity(x.len() / QK5 * Q5_0_BYTES);
    for b in x.chunks_exact(QK5) {
        let (mut amax, mut max) = (0f32, 0f32);
        for &v in b {
            if amax < v.abs() {
                amax = v.abs();
                max = v;
            }
        }
        let d = max / -16.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        // (int8_t)(x * id + 16.5), then MIN(31, .): truncation, as C's conversion.
        let q = |v: f32| ((v * id + 16.5) as i8).min(31) as u8;
        out.extend_from_slice(&f16_bytes(d));
        push_q5(&mut out, b, q);
    }
    Ok(out)
}

/// Q5_1 blocks of `x` (ggml's `quantize_row_q5_1_ref`): min and max map to 0 and 31.
pub fn quantize_q5_1(x: &[f32]) -> Result<Vec<u8>> {
    check_quantize("q5_1", QK5, x)?;
    let mut out = Vec::with_capacity(x.len() / QK5 * Q5_1_BYTES);
    for b in x.chunks_exact(QK5) {
        let (mut min, mut max) = (f32::MAX, -f32::MAX);
        for &v in b {
            if v < min {
                min = v;
            }
            if v > max {
                max = v;
            }
        }
        let d = (max - min) / 31.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let q = |v: f32| ((v - min) * id + 0.5) as u8;
        out.extend_from_slice(&f16_bytes(d));
        out.extend_from_slice(&f16_bytes(min));
        push_q5(&mut out, b, q);
    }
    Ok(out)
}

/// The fifth bits (a little-endian u32, bit j for weight j) and the nibbles (byte j: weight j low,
/// j + 16 high) of a 32-weight block of 5-bit levels.
fn push_q5(out: &mut Vec<u8>, b: &[f32], q: impl Fn(f32) -> u8) {
    let mut qh = 0u32;
    let mut qs = [0u8; QK5 / 2];
    for j in 0..QK5 / 2 {
        let (x0, x1) = (q(b[j]), q(b[j + QK5 / 2]));
        qs[j] = (x0 & 0xF) | ((x1 & 0xF) << 4);
        qh |= (((x0 & 0x10) >> 4) as u32) << j;
        qh |= (((x1 & 0x10) >> 4) as u32) << (j + QK5 / 2);
    }
    out.extend_from_slice(&qh.to_le_bytes());
    out.extend_from_slice(&qs);
}

/// The shared part of ggml's Q4_K and Q5_K reference quantisers for one super-block: per sub-block
/// scales and mins by `make_qkx2_quants`, quantised to 6 bits against the super-block's largest,
/// then the levels recomputed from the rounded scales. Returns d, dmin, the 12 packed scale bytes
/// and the 256 levels.
fn quantize_k_superblock(
    x: &[f32],
    nmax: i32,
    rmin: f32,
    nstep: i32,
) -> (f32, f32, [u8; 12], [u8; QK_K]) {
    let mut levels = [0u8; QK_K];
    let mut l_aux = [0u8; 32];
    let mut weights = [0f32; 32];
    let (mut scales, mut mins) = ([0f32; 8], [0f32; 8]);
    let (mut max_scale, mut max_min) = (0f32, 0f32);
    for j in 0..QK_K / 32 {
        let xs = &x[32 * j..32 * j + 32];
        let mut sum_x2 = 0f32;
        for &v in xs {
            sum_x2 += v * v;
        }
        let av_x = (sum_x2 / 32.0).sqrt();
        for (w, &v) in weights.iter_mut().zip(xs) {
            *w = av_x + v.abs();
        }
        let (s, m) = make_qkx2_quants(
            nmax,
            xs,
            &weights,
            &mut levels[32 * j..32 * j + 32],
            &mut l_aux,
            rmin,
            0.1,
            nstep,
        );
        scales[j] = s;
        mins[j] = m;
        if s > max_scale {
            max_scale = s;
        }
        if m > max_min {
            max_min = m;
        }
    }
    let inv_scale = if max_scale > 0.0 {
        63.0 / max_scale
    } else {
        0.0
    };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let mut packed = [0u8; 12];
    for j in 0..QK_K / 32 {
        // uint8_t ls = nearest_int(...): C keeps the low byte, then MIN(63, .).
        let ls = (nearest_int(inv_scale * scales[j]) as u8).min(63);
        let lm = (nearest_int(inv_min * mins[j]) as u8).min(63);
        if j < 4 {
            packed[j] = ls;
            packed[j + 4] = lm;
        } else {
            packed[j + 4] = (ls & 0xF) | ((lm & 0xF) << 4);
            packed[j - 4] |= (ls >> 4) << 6;
            packed[j] |= (lm >> 4) << 6;
        }
    }
    let d = f16_round(max_scale / 63.0);
    let dmin = f16_round(max_min / 63.0);
    for j in 0..QK_K / 32 {
        let (sc, m) = get_scale_min_k4(j, &packed);
        let ds = d * sc as f32;
        if ds == 0.0 {
            continue;
        }
        let dm = dmin * m as f32;
        for ii in 0..32 {
            let l = nearest_int((x[32 * j + ii] + dm) / ds);
            levels[32 * j + ii] = l.clamp(0, nmax) as u8;
        }
    }
    (d, dmin, packed, levels)
}

/// Q4_K super-blocks of `x` (ggml's `quantize_row_q4_K_ref`).
pub fn quantize_q4_k(x: &[f32]) -> Result<Vec<u8>> {
    check_quantize("q4_K", QK_K, x)?;
    let mut out = Vec::with_capacity(x.len() / QK_K * Q4_K_BYTES);
    for xb in x.chunks_exact(QK_K) {
        let (d, dmin, packed, l) = quantize_k_superblock(xb, 15, -1.0, 20);
        out.extend_from_slice(&f16_bytes(d));
        out.extend_from_slice(&f16_bytes(dmin));
        out.extend_from_slice(&packed);
        for j in (0..QK_K).step_by(64) {
            out.extend((0..32).map(|i| l[j + i] | (l[j + i + 32] << 4)));
        }
    }
    Ok(out)
}

/// Q5_K super-blocks of `x` (ggml's `quantize_row_q5_K_ref`).
pub fn quantize_q5_k(x: &[f32]) -> Result<Vec<u8>> {
    check_quantize("q5_K", QK_K, x)?;
    let mut out = Vec::with_capacity(x.len() / QK_K * Q5_K_BYTES);
    for xb in x.chunks_exact(QK_K) {
        let (d, dmin, packed, l) = quantize_k_superblock(xb, 31, -0.5, 15);
        let mut qh = [0u8; QK_K / 8];
        let mut ql = [0u8; QK_K / 2];
        let (mut m1, mut m2) = (1u8, 2u8);
        for (c, n) in (0..QK_K).step_by(64).enumerate() {
            for j in 0..32 {
                let (mut l1, mut l2) = (l[n + j], l[n + j + 32]);
                if l1 > 15 {
                    l1 -= 16;
                    qh[j] |= m1;
                }
                if l2 > 15 {
                    l2 -= 16;
                    qh[j] |= m2;
                }
                ql[32 * c + j] = l1 | (l2 << 4);
            }
            m1 <<= 2;
            m2 <<= 2;
        }
        out.extend_from_slice(&f16_bytes(d));
        out.extend_from_slice(&f16_bytes(dmin));
        out.extend_from_slice(&packed);
        out.extend_from_slice(&qh);
        out.extend_from_slice(&ql);
    }
    Ok(out)
}

/// Q6_K super-blocks of `x` (ggml's `quantize_row_q6_K_ref`).
pub fn quantize_q6_k(x: &[f32]) -> Result<Vec<u8>> {
    check_quantize("q6_K", QK_K, x)?;
    let mut out = Vec::with_capacity(x.len() / QK_K * Q6_K_BYTES);
    for xb in x.chunks_exact(QK_K) {
        let mut l = [0u8; QK_K];
        let mut scales = [0f32; QK_K / 16];
        let (mut max_scale, mut max_abs_scale) = (0f32, 0f32);
        for ib in 0..QK_K / 16 {
            let s = make_qx_quants(
                32,
                &xb[16 * ib..16 * ib + 16],
                &mut l[16 * ib..16 * ib + 16],
            );
            scales[ib] = s;
            if s.abs() > max_abs_scale {
                max_abs_scale = s.abs();
                max_scale = s;
            }
        }
        if max_abs_scale < GROUP_MAX_EPS {
            out.extend_from_slice(&[0u8; Q6_K_BYTES]);
            continue;
        }
        let iscale = -128.0 / max_scale;
        let d = f16_round(1.0 / iscale);
        let mut sc = [0i8; QK_K / 16];
        for ib in 0..QK_K / 16 {
            sc[ib] = nearest_int(iscale * scales[ib]).min(127) as i8;
        }
        for j in 0..QK_K / 16 {
            let ds = d * sc[j] as f32;
            if ds == 0.0 {
                continue;
            }
            for ii in 0..16 {
                let q = nearest_int(xb[16 * j + ii] / ds).clamp(-32, 31);
                l[16 * j + ii] = (q + 32) as u8;
            }
        }
        let mut ql = [0u8; QK_K / 2];
        let mut qh = [0u8; QK_K / 4];
        for (half, j) in (0..QK_K).step_by(128).enumerate() {
            for i in 0..32 {
                let (q1, q2, q3, q4) = (l[j + i], l[j + i + 32], l[j + i + 64], l[j + i + 96]);
                ql[64 * half + i] = (q1 & 0xF) | ((q3 & 0xF) << 4);
                ql[64 * half + i + 32] = (q2 & 0xF) | ((q4 & 0xF) << 4);
                qh[32 * half + i] =
                    (q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | ((q4 >> 4) << 6);
            }
        }
        out.extend_from_slice(&ql);
        out.extend_from_slice(&qh);
        out.extend(sc.iter().map(|&s| s as u8));
        out.extend_from_slice(&f16_bytes(d));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Packs 8 six-bit scales and mins the way the format describes (written from the layout, not
    /// from the unpacking code): bytes 0..4 scale 0..4 plus the top 2 bits of scale 4..8, bytes 4..8
    /// min 0..4 plus the top 2 bits of min 4..8, bytes 8..12 the low nibbles of scale (low) and min
    /// (high) 4..8.
    fn pack(sc: [u8; 8], m: [u8; 8]) -> [u8; 12] {
        let mut p = [0u8; 12];
        for i in 0..4 {
            p[i] = sc[i] | ((sc[i + 4] >> 4) << 6);
            p[i + 4] = m[i] | ((m[i + 4] >> 4) << 6);
            p[i + 8] = (sc[i + 4] & 15) | ((m[i + 4] & 15) << 4);
        }
        p
    }

    fn f16b(v: f32) -> [u8; 2] {
        f16::from_f32(v).to_le_bytes()
    }

    #[test]
    fn scale_min_unpacking_inverts_the_packing() {
        let sc = [1, 63, 17, 32, 63, 0, 45, 22];
        let m = [0, 5, 63, 40, 33, 63, 16, 1];
        let p = pack(sc, m);
        for j in 0..8 {
            assert_eq!(get_scale_min_k4(j, &p), (sc[j], m[j]), "sub-block {j}");
        }
    }

    fn q4k_block(d: f32, dmin: f32, sc: [u8; 8], m: [u8; 8], q: impl Fn(usize) -> u8) -> Vec<u8> {
        let mut b = Vec::with_capacity(Q4_K_BYTES);
        b.extend_from_slice(&f16b(d));
        b.extend_from_slice(&f16b(dmin));
        b.extend_from_slice(&pack(sc, m));
        // Byte 32c + l: weight 64c + l (low nibble), weight 64c + 32 + l (high nibble).
        for c in 0..4 {
            for l in 0..32 {
                b.push(q(64 * c + l) | (q(64 * c + 32 + l) << 4));
            }
        }
        b
    }

    #[test]
    fn q4_k_matches_the_layout() {
        let (d, dmin) = (0.5f32, 0.25f32);
        let sc = [1, 2, 3, 4, 60, 61, 62, 63];
        let m = [7, 6, 5, 4, 40, 50, 33, 17];
        let q = |i: usize| ((i * 7 + i / 13) % 16) as u8;
        let mut data = q4k_block(d, dmin, sc, m, q);
        data.extend(q4k_block(-1.0, 2.0, m, sc, |i| (15 - i % 16) as u8));
        let y = dequantize_q4_k(&data, 512).unwrap();
        for i in 0..256 {
            let s = i / 32;
            let want = d * sc[s] as f32 * q(i) as f32 - dmin * m[s] as f32;
            assert_eq!(y[i], want, "weight {i}");
            // d = -1: the scale term flips sign.
            let want2 = -(m[s] as f32 * (15 - i % 16) as f32) - 2.0 * sc[s] as f32;
            assert_eq!(y[256 + i], want2, "block 2 weight {i}");
        }
    }

    #[test]
    fn q4_k_zero_nibbles_give_minus_dmin_times_min() {
        let m = [1, 2, 3, 4, 5, 6, 7, 63];
        let data = q4k_block(3.0, 0.125, [9; 8], m, |_| 0);
        let y = dequantize_q4_k(&data, 256).unwrap();
        for (i, v) in y.iter().enumerate() {
            assert_eq!(*v, -0.125 * m[i / 32] as f32, "weight {i}");
        }
    }

    #[test]
    fn q6_k_matches_the_layout() {
        // Weight i in half h = i / 128, position p = i % 128, quarter k = p / 32, l = p % 32:
        // low nibble from ql[64h + l + 32 (k odd)] (k >= 2: high nibble), high bits from
        // qh[32h + l] bits 2k..2k+2; scale index 8h + k*2 + l/16.
        let q = |i: usize| ((i * 5 + 3 * (i / 64)) % 64) as u8;
        let scales: [i8; 16] = [
            1, -2, 3, -4, 5, 127, -128, 8, 9, -10, 11, 12, -13, 14, 15, -16,
        ];
        let d = 0.03125f32;
        let mut b = vec![0u8; Q6_K_BYTES];
        for i in 0..256 {
            let (hh, p) = (i / 128, i % 128);
            let (k, l) = (p / 32, p % 32);
            let qi = q(i);
            let ql_idx = 64 * hh + l + if k % 2 == 1 { 32 } else { 0 };
            b[ql_idx] |= if k >= 2 { (qi & 15) << 4 } else { qi & 15 };
            b[128 + 32 * hh + l] |= (qi >> 4) << (2 * k);
        }
        for (j, s) in scales.iter().enumerate() {
            b[192 + j] = *s as u8;
        }
        b[208..210].copy_from_slice(&f16b(d));
        let y = dequantize_q6_k(&b, 256).unwrap();
        for (i, v) in y.iter().enumerate() {
            let (hh, p) = (i / 128, i % 128);
            let s = scales[8 * hh + (p / 32) * 2 + (p % 32) / 16] as f32;
            assert_eq!(*v, d * s * (q(i) as i32 - 32) as f32, "weight {i}");
        }
    }

    #[test]
    fn bad_lengths_are_errors() {
        assert!(dequantize_q4_k(&[0; 144], 128).is_err());
        assert!(dequantize_q4_k(&[0; 143], 256).is_err());
        assert!(dequantize_q6_k(&[0; 209], 256).is_err());
        assert!(dequantize_q6_k(&[0; 420], 512).is_ok());
        assert!(dequantize_q5_k(&[0; 175], 256).is_err());
        assert!(dequantize_q5_0(&[0; 22], 16).is_err());
        assert!(dequantize_q5_0(&[0; 21], 32).is_err());
        assert!(dequantize_q5_1(&[0; 48], 64).is_ok());
    }
}

// The formats without a GPU kernel (Q2_K, Q3_K, IQ4_NL, IQ4_XS), converted on load.
pub mod lowbit;
pub use lowbit::{
    dequantize_iq4_nl, dequantize_iq4_xs, dequantize_q2_k, dequantize_q3_k, IQ4_VALUES,
};
