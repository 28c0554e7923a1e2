//! The integer-dot variant of the workgroup matvec: x quantised to 8 bits per 32-value block
//! (`shaders/quantize_x.wgsl`, one dispatch per product input, not per row of weights), then the
//! `matvec_idot_*` entry points of `shaders/common/matvec_wg_body.wgsl` (both reductions, the
//! float path's bindings and parameter block) multiply packed weight bytes by packed activation
//! bytes with WGSL's `dot4I8Packed`, four products an instruction where the driver has one.
//! Q8_0, Q4_0, Q4_1, Q5_0 and Q5_1 (bytes, nibbles, nibbles and a fifth bit: each weight a byte
//! after a mask or two); the K-quants keep the float path. The CPU reference here ([`quantize_activations`], [`reference`]) does the same
//! quantisation and the integer dot in exact integer arithmetic.
//!
//! When it runs ([`uses_idot`]): where wgpu reports the language extension, for a device that is
//! not a CPU (lavapipe keeps its subgroup matvec), and only if [`IDOT_BY_DEFAULT`], the result
//! of the perplexity gate (BENCHMARKS.md); `WGLLM_MATVEC` forces it ([`forced_matvec`]).

use super::subgroup::Input;
use super::*;

/// The weight formats with integer-dot entry points.
pub const IDOT_FORMATS: [WeightFormat; 5] = [
    WeightFormat::Q8_0,
    WeightFormat::Q4_0,
    WeightFormat::Q4_1,
    WeightFormat::Q5_0,
    WeightFormat::Q5_1,
];

/// Whether GPUs run the integer-dot variant without being told to: only if it keeps perplexity
/// within 0.1% of the float path's. Measured (BENCHMARKS.md, "The integer-dot matvec"), it does
/// not: SmolLM2's Q4_1 file +0.47% (ctx 128) and +0.42% (one window), Gemma 3 270M's Q4_K_M file
/// (its Q5_0 and Q8_0 matrices) +0.20%. So it stays off; `WGLLM_MATVEC=idot` turns it on.
pub const IDOT_BY_DEFAULT: bool = false;

/// How the workgroup matvec multiplies, as `WGLLM_MATVEC` forces it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MatvecMath {
    /// f32 products (`WGLLM_MATVEC=workgroup`).
    Float,
    /// `dot4I8Packed` on 8-bit x where the format has it (`WGLLM_MATVEC=idot`).
    Idot,
}

/// How the workgroup matvec is forced to multiply on `gpu`: what [`force_matvec`] set, else
/// `WGLLM_MATVEC=workgroup|idot`. Forced, every product of a model, one token or many, runs on
/// the workgroup matvec (four tokens a pass), in f32 or with integer dot products, on any device
/// (lavapipe too, with `WGLLM_WEIGHTS=buffers`: the workgroup matvec reads no textures). For
/// measuring one against the other; `WGLLM_PREFILL` still wins for chunks.
pub fn forced_matvec(gpu: &Gpu) -> Option<MatvecMath> {
    let set = *gpu.matvec_math.lock().unwrap_or_else(|e| e.into_inner());
    set.or_else(matvec_from_env)
}

/// Forces (or with `None` leaves to `WGLLM_MATVEC` and the policy) how `gpu`'s workgroup matvec
/// multiplies, as [`forced_matvec`] describes: for tests and measurements on one device.
pub fn force_matvec(gpu: &Gpu, math: Option<MatvecMath>) {
    *gpu.matvec_math.lock().unwrap_or_else(|e| e.into_inner()) = math;
}

fn matvec_from_env() -> Option<MatvecMath> {
    match std::env::var("WGLLM_MATVEC").ok()?.as_str() {
        "workgroup" => Some(MatvecMath::Float),
        "idot" => Some(MatvecMath::Idot),
        other => {
            log::warn!("WGLLM_MATVEC={other} ignored: use workgroup or idot");
            None
        }
    }
}

/// Whether the workgroup matvec of `format` runs the integer-dot entry points here: a format of
/// [`IDOT_FORMATS`] on a device where wgpu reports `packed_4x8_integer_dot_product`, forced, or
/// by default ([`IDOT_BY_DEFAULT`]) on a device that is not a CPU.
pub fn uses_idot(gpu: &Gpu, format: WeightFormat) -> bool {
    IDOT_FORMATS.contains(&format)
        && gpu.caps.packed_4x8_dot
        && match forced_matvec(gpu) {
            Some(math) => math == MatvecMath::Idot,
            None => IDOT_BY_DEFAULT && gpu.info.device_type != wgpu::DeviceType::Cpu,
        }
}

/// u32 words of `m` tokens' rows of `cols` values quantised: per 32-value block 8 words of
/// packed i8 and one f32 scale.
pub fn quantized_words(cols: usize, m: usize) -> usize {
    m * (cols / QK) * 9
}

/// The params of `quantize_x.wgsl`.
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct QuantizeParams {
    cols: u32,
    m: u32,
    pad: [u32; 2],
}
const _: () = assert!(std::mem::size_of::<QuantizeParams>() == 16);

/// Records the quantisation of `m` rows of `cols` values of `x` (with `input` applied: SwiGLU,
/// or RMSNorm whose `1 / rms` goes into the scales) into the device's scratch buffer, and returns
/// the quantised rows as a binding for the `matvec_idot_*` entry points.
pub(super) fn quantize_x(
    rec: &mut Recorder,
    x: &View,
    input: Input,
    cols: usize,
    m: usize,
    op: &str,
) -> Result<View> {
    let gpu = rec.gpu();
    if !cols.is_multiple_of(QK) {
        return Err(Error::invalid(
            op,
            format!("the integer-dot matvec takes rows of whole {QK}-value blocks, not {cols}"),
        ));
    }
    let (xfn, x2, eps) = match input {
        Input::Plain => (0, None, 0.0),
        Input::Swiglu(up) => (1, Some(bound(op, up)?), 0.0),
        Input::RmsNorm(gamma, eps) => (2, Some(bound(op, gamma)?), eps),
    };
    let bytes = quantized_words(cols, m) as u64 * 4;
    let scratch = {
        let mut slot = gpu.idot_scratch.lock().unwrap_or_else(|e| e.into_inner());
        match slot.as_ref().filter(|b| b.size() >= bytes) {
            Some(b) => b.range(0, bytes),
            None => {
                // Grown to the largest request; a recording that still binds the old one keeps
                // it alive until it is submitted.
                let b = gpu.alloc("idot x", crate::gpu::BufferClass::Activations, bytes)?;
                let v = b.range(0, bytes);
                *slot = Some(b);
                v
            }
        }
    };
    let k = gpu.kernel(
        "quantize_x",
        "quantize_q8",
        &[Bind::Input, Bind::Input, Bind::Output],
        16,
        &[("XFN", xfn as f64), ("EPS", eps as f64)],
    )?;
    let p = QuantizeParams {
        cols: u32_of(op, "cols", cols)?,
        m: u32_of(op, "tokens", m)?,
        pad: [0; 2],
    };
    rec.dispatch(
        &k,
        "quantize_x",
        &[x.clone(), x2.unwrap_or_else(|| x.clone()), scratch.clone()],
        params(&p),
        gpu.groups(u32_of(op, "tokens", m)?),
    )?;
    Ok(scratch)
}

/// CPU reference of `quantize_x.wgsl` on one token's row (whole blocks of 32): per block the
/// quants `round(v / d)` (ties to even, as WGSL's `round`) with `d = max |v| / 127`, and `d`.
pub fn quantize_activations(x: &[f32]) -> (Vec<i8>, Vec<f32>) {
    let mut q = Vec::with_capacity(x.len());
    let mut d = Vec::with_capacity(x.len() / QK);
    for block in x.chunks_exact(QK) {
        let amax = block.iter().fold(0f32, |a, v| a.max(v.abs()));
        let scale = amax / 127.0;
        let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
        q.extend(block.iter().map(|v| (v * inv).round_ties_even() as i8));
        d.push(scale);
    }
    (q, d)
}

/// A block's weight quants (as the kernel multiplies them: Q8_0's signed bytes, Q4's nibbles
/// 0..15) and its scales (d, m) from GGUF block bytes.
fn weight_block(format: WeightFormat, b: &[u8]) -> ([i32; QK], f32, f32) {
    let f16 = |i: usize| half::f16::from_le_bytes([b[i], b[i + 1]]).to_f32();
    let mut q = [0i32; QK];
    match format {
        WeightFormat::Q8_0 => {
            for (qi, &byte) in q.iter_mut().zip(&b[2..2 + QK]) {
                *qi = byte as i8 as i32;
            }
            (q, f16(0), 0.0)
        }
        _ => {
            // Q4_0: d, 16 nibble bytes; Q4_1: d, m, 16 nibble bytes; Q5_0 and Q5_1 the same with
            // a u32 of fifth bits (bit i: weight i's) before the nibbles. Byte i holds weight i
            // (low nibble) and weight i + 16 (high).
            let (m, at) = match format {
                WeightFormat::Q4_1 | WeightFormat::Q5_1 => (f16(2), 4),
                _ => (0.0, 2),
            };
            let q5 = matches!(format, WeightFormat::Q5_0 | WeightFormat::Q5_1);
            let (fifths, at) = if q5 {
                let qh = u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
                (qh, at + 4)
            } else {
                (0, at)
            };
            let fifth = |i: usize| (((fifths >> i) & 1) << 4) as i32;
            for i in 0..QK / 2 {
                q[i] = (b[at + i] & 15) as i32 | fifth(i);
                q[i + QK / 2] = (b[at + i] >> 4) as i32 | fifth(i + QK / 2);
            }
            (q, f16(0), m)
        }
    }
}

/// CPU reference of the integer-dot matvec: `Y[t, r] = sum over blocks` of the integer sums of
/// the weight quants times [`quantize_activations`]' quants, scaled as `qidot_fold` does (Q8_0:
/// `d dx s`; Q4_0, Q5_0: `d dx (s - 8 sx)`, `- 16 sx`; Q4_1, Q5_1: `d dx s + m dx sx`, sx the
/// sum of x's quants),
/// blocks summed in f64. `blocks` is the GGUF bytes of `rows` rows of `cols` weights in one of
/// [`IDOT_FORMATS`]; `x` is `m` rows of `cols` values.
pub fn reference(
    format: WeightFormat,
    blocks: &[u8],
    rows: usize,
    cols: usize,
    x: &[f32],
    m: usize,
) -> Result<Vec<f32>> {
    let op = "idot reference";
    if !IDOT_FORMATS.contains(&format) || !cols.is_multiple_of(QK) {
        return Err(Error::invalid(
            op,
            format!(
                "{format} rows of {cols}: the integer dot takes 32-weight blocks, not K-quants"
            ),
        ));
    }
    let per_row = cols / QK * format.block_bytes();
    if blocks.len() != rows * per_row || x.len() != m * cols {
        return Err(Error::invalid(
            op,
            format!(
                "{} weight bytes and {} values for {rows} x {cols} and {m} tokens",
                blocks.len(),
                x.len()
            ),
        ));
    }
    let xs: Vec<_> = x.chunks_exact(cols).map(quantize_activations).collect();
    let mut y = vec![0f64; m * rows];
    for (r, row) in blocks.chunks_exact(per_row).enumerate() {
        for (b, block) in row.chunks_exact(format.block_bytes()).enumerate() {
            let (wq, d, mw) = weight_block(format, block);
            for (t, (xq, xd)) in xs.iter().enumerate() {
                let xq = &xq[b * QK..(b + 1) * QK];
                let s: i32 = wq.iter().zip(xq).map(|(&w, &v)| w * v as i32).sum();
                let sx: i32 = xq.iter().map(|&v| v as i32).sum();
                let dx = xd[b] as f64;
                let v = match format {
                    WeightFormat::Q4_0 => d as f64 * dx * (s - 8 * sx) as f64,
                    WeightFormat::Q5_0 => d as f64 * dx * (s - 16 * sx) as f64,
                    WeightFormat::Q4_1 | WeightFormat::Q5_1 => {
                        d as f64 * dx * s as f64 + mw as f64 * dx * sx as f64
                    }
                    _ => d as f64 * dx * s as f64,
                };
                y[t * rows + r] += v;
            }
        }
    }
    Ok(y.into_iter().map(|v| v as f32).collect())
}
