//! Which format each GGUF tensor type reaches the GPU in, and the conversion of the types that
//! have no GPU kernel. One function, [`weight_format`], answers for the loader and the memory
//! planner alike, so that the plan counts the bytes really uploaded.
//!
//! Native (the file's bytes as they are): F32, F16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K,
//! Q6_K. BF16 becomes f32 (exact). The rest is decoded on the CPU a row at a time and requantised
//! with the target's own quantiser, never to f32: Q2_K and Q3_K (2.6 and 3.4 bits per weight) to
//! Q4_K (4.5 bits), the smallest native format whose own error is below theirs, with the same
//! 256-weight rows; IQ4_NL and IQ4_XS (4.5 and 4.25 bits) to Q8_0.
//!
//! Measured by `tests/loader_gguf.rs` (`conversion_targets_keep_the_source_precision`) on
//! 64 x 1024 heavy-tailed Gaussian weights quantised to each source type: RMS error relative to
//! the weights' RMS, the source's own error, then each candidate's conversion error against the
//! source's decoded values (and the converted weights' total error against the originals):
//!
//! | source | own | Q4_K | Q5_K | Q6_K | Q8_0 |
//! |---|---|---|---|---|---|
//! | Q2_K | 34.7% | 6.1% (35.3%) | 3.5% (34.9%) | 1.9% (34.7%) | 0.7% (34.8%) |
//! | Q3_K | 17.1% | 6.4% (18.3%) | 3.5% (17.4%) | 0.1% (17.1%) | 0.5% (17.1%) |
//! | IQ4_NL | 8.7% | 6.0% (10.3%) | 3.6% (9.4%) | 2.2% (8.9%) | 0.0% (8.7%) |
//! | IQ4_XS | 9.1% | 6.1% (10.7%) | 3.6% (9.8%) | 2.2% (9.3%) | 0.02% (9.1%) |
//!
//! IQ4's 16 levels are non-linear (denser near zero) and no linear grid of 16 to 64 levels
//! holds them: Q5_K adds 8% to their error and Q6_K 2-3%, while Q8_0 holds them exactly
//! whenever a block's largest weight sits on the -127 level (its scale is then IQ4's own), so
//! Q8_0 is the one native format that keeps their precision (at 8.5 bits per weight; it also
//! takes IQ4_NL's 32-weight rows, which the 256-weight k-quants do not). Q3_K to Q4_K adds 7%
//! to Q3_K's error (Q6_K would hold its 16-weight sub-blocks almost exactly, at 6.6 bits).

use super::gguf::{GgmlType, TensorInfo};
use crate::error::{Error, Result};
use crate::quant::{self, WeightFormat};

/// The format a tensor of GGUF type `t` is uploaded in; None: wgllm cannot read the type.
pub fn weight_format(t: GgmlType) -> Option<WeightFormat> {
    Some(match t {
        GgmlType::F32 | GgmlType::BF16 => WeightFormat::F32,
        GgmlType::F16 => WeightFormat::F16,
        GgmlType::Q8_0 => WeightFormat::Q8_0,
        GgmlType::Q4_0 => WeightFormat::Q4_0,
        GgmlType::Q4_1 => WeightFormat::Q4_1,
        GgmlType::Q5_0 => WeightFormat::Q5_0,
        GgmlType::Q5_1 => WeightFormat::Q5_1,
        GgmlType::Q4_K | GgmlType::Q2_K | GgmlType::Q3_K => WeightFormat::Q4_K,
        GgmlType::Q5_K => WeightFormat::Q5_K,
        GgmlType::Q6_K => WeightFormat::Q6_K,
        GgmlType::IQ4_NL | GgmlType::IQ4_XS => WeightFormat::Q8_0,
        _ => return None,
    })
}

/// Whether tensors of type `t` are uploaded as the file's own bytes.
pub fn is_native(t: GgmlType) -> bool {
    matches!(
        t,
        GgmlType::F32
            | GgmlType::F16
            | GgmlType::Q8_0
            | GgmlType::Q4_0
            | GgmlType::Q4_1
            | GgmlType::Q5_0
            | GgmlType::Q5_1
            | GgmlType::Q4_K
            | GgmlType::Q5_K
            | GgmlType::Q6_K
    )
}

/// Whether tensors of type `t` are decoded and requantised on load (BF16, widened exactly to
/// f32, is not counted: nothing is lost).
fn is_requantised(t: GgmlType) -> bool {
    !is_native(t) && t != GgmlType::BF16 && weight_format(t).is_some()
}

/// Rows of `row_len` weights of type `t` (`data`, whole rows) decoded and requantised to
/// `target`, row by row (a row at a time keeps the f32 copy small whatever the tensor's size).
/// Fails on a decoded value that is not finite, which no quantiser can represent.
pub fn convert_rows(
    t: GgmlType,
    data: &[u8],
    row_len: usize,
    target: WeightFormat,
) -> Result<Vec<u8>> {
    let op = || format!("convert {} to {target}", t.name());
    let decode = t
        .decoder()
        .ok_or_else(|| Error::invalid(op(), "no decoder for the type"))?;
    if row_len == 0 || !row_len.is_multiple_of(t.block_len()) {
        return Err(Error::invalid(
            op(),
            format!(
                "rows of {row_len} are not whole {} blocks of {}",
                t.name(),
                t.block_len()
            ),
        ));
    }
    if !row_len.is_multiple_of(target.block_len()) {
        return Err(Error::invalid(
            op(),
            format!(
                "rows of {row_len} are not whole {target} blocks of {}",
                target.block_len()
            ),
        ));
    }
    let row_bytes = row_len / t.block_len() * t.block_bytes();
    if !data.len().is_multiple_of(row_bytes) {
        return Err(Error::invalid(
            op(),
            format!("{} bytes are not whole rows of {row_bytes}", data.len()),
        ));
    }
    let mut out = Vec::with_capacity(data.len() / row_bytes * target.bytes_for(row_len));
    for (r, row) in data.chunks_exact(row_bytes).enumerate() {
        let x = decode(row, row_len)?;
        if let Some(i) = x.iter().position(|v| !v.is_finite()) {
            return Err(Error::invalid(
                op(),
                format!("row {r} weight {i} decodes to {}", x[i]),
            ));
        }
        let q = quant::quantize(target, &x)?;
        // Weights beyond f16's range times the target's largest quant (possible in a hostile
        // file whose scales are near f16's maximum) would make an infinite target scale.
        if let Some(at) = first_non_finite_scale(target, &q) {
            return Err(Error::invalid(
                op(),
                format!("row {r} overflows {target}'s f16 scales (byte {at} of the row)"),
            ));
        }
        out.extend(q);
    }
    Ok(out)
}

/// The byte offset of the first non-finite f16 scale in `bytes` of `format`, if any.
fn first_non_finite_scale(format: WeightFormat, bytes: &[u8]) -> Option<usize> {
    let t = match format {
        WeightFormat::Q8_0 => GgmlType::Q8_0,
        WeightFormat::Q4_K => GgmlType::Q4_K,
        WeightFormat::Q5_K => GgmlType::Q5_K,
        WeightFormat::Q6_K => GgmlType::Q6_K,
        WeightFormat::Q4_0 => GgmlType::Q4_0,
        WeightFormat::Q4_1 => GgmlType::Q4_1,
        WeightFormat::Q5_0 => GgmlType::Q5_0,
        WeightFormat::Q5_1 => GgmlType::Q5_1,
        WeightFormat::F32 | WeightFormat::F16 => return None,
    };
    let bb = t.block_bytes();
    bytes.chunks_exact(bb).enumerate().find_map(|(k, b)| {
        t.scale_offsets()
            .iter()
            .find(|&&at| !half::f16::from_le_bytes([b[at], b[at + 1]]).is_finite())
            .map(|&at| k * bb + at)
    })
}

/// How many names of each conversion the warning lists.
const NAMES_SHOWN: usize = 3;

/// One line naming the tensors of a file that are requantised on load, grouped by conversion
/// (count, first names, source type and target format); None when there are none. One warning
/// per file instead of one per tensor: a mixed file can hold hundreds.
pub fn conversion_summary(tensors: &[TensorInfo]) -> Option<String> {
    let mut groups: Vec<(GgmlType, WeightFormat, Vec<&str>)> = Vec::new();
    for t in tensors.iter().filter(|t| is_requantised(t.ggml_type)) {
        let target = weight_format(t.ggml_type)?;
        match groups.iter_mut().find(|g| g.0 == t.ggml_type) {
            Some(g) => g.2.push(&t.name),
            None => groups.push((t.ggml_type, target, vec![&t.name])),
        }
    }
    if groups.is_empty() {
        return None;
    }
    let total: usize = groups.iter().map(|g| g.2.len()).sum();
    let parts: Vec<String> = groups
        .iter()
        .map(|(from, to, names)| {
            let more = names.len().saturating_sub(NAMES_SHOWN);
            let shown = names[..names.len().min(NAMES_SHOWN)].join(", ");
            let more = if more > 0 {
                format!(", and {more} more")
            } else {
                String::new()
            };
            format!("{} {} -> {to} ({shown}{more})", names.len(), from.name())
        })
        .collect();
    Some(format!(
        "{total} tensor(s) have types without a GPU kernel and are requantised on load: {}",
        parts.join("; ")
    ))
}
