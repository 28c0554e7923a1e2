//! Token embedding lookup (`shaders/embedding.wgsl`): `out[t, :] = table[ids[t], :]` for a table in
//! any [`crate::quant::WeightFormat`], dequantised in the shader from the [`crate::quant::repack`] layout. One
//! dispatch per shard of the table, each writing the tokens whose id falls in its row range; ids
//! `>= vocab` read nothing and come out as zero rows (the last shard's dispatch writes them).
//! Callers that want bad ids refused rather than zeroed check them with [`check_ids`] first.

use crate::error::{Error, Result};
use crate::gpu::{Bind, GpuBuffer, Recorder, WeightLayout};
use crate::kernels::{params, Tensor, WeightMatrix};
use crate::quant::repack::row_words;

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    n_tokens: u32,
    dim: u32,
    row_start: u32,
    rows: u32,
    vocab: u32,
    zero_oob: u32,
    row_words: u32,
    /// Texture row of shard row 0 (textures only).
    row0: u32,
}
const _: () = assert!(std::mem::size_of::<Params>() == 32);

/// Refuses any id `>= vocab` with [`Error::InvalidArgument`] naming the first offender.
pub fn check_ids(ids: &[u32], vocab: usize) -> Result<()> {
    match ids.iter().position(|&id| id as usize >= vocab) {
        None => Ok(()),
        Some(i) => Err(Error::invalid(
            "embedding lookup",
            format!(
                "token id {} at position {i} is outside the vocabulary of {vocab}",
                ids[i]
            ),
        )),
    }
}

/// `out[t, :] = table[ids[t], :]` for `t < n_tokens`; `table` is `vocab x dim`, `ids` holds at
/// least `n_tokens` u32 token ids, `out` is `[n_tokens, dim]`. Ids `>= vocab` give zero rows.
pub fn lookup(
    rec: &mut Recorder,
    table: &WeightMatrix,
    ids: &GpuBuffer,
    n_tokens: usize,
    out: &Tensor,
) -> Result<()> {
    let op = format!("embedding lookup ({})", table.label);
    let dim = table.cols;
    out.expect(&op, &[n_tokens, dim])?;
    if n_tokens == 0 {
        return Ok(());
    }
    if ids.size() < n_tokens as u64 * 4 {
        return Err(Error::shape(
            op,
            format!("{n_tokens} token ids ({} bytes)", n_tokens * 4),
            format!("'{}' of {} bytes", ids.label, ids.size()),
        ));
    }
    let covered: usize = table.shards.iter().map(|s| s.rows).sum();
    if table.shards.is_empty() || covered != table.rows {
        return Err(Error::invalid(
            op,
            format!("shards cover {covered} of {} rows", table.rows),
        ));
    }
    let too_big = || Error::invalid("embedding lookup", "tensor or table too large");
    let n = u32::try_from(n_tokens).map_err(|_| too_big())?;
    u32::try_from(out.len()).map_err(|_| too_big())?;
    let vocab = u32::try_from(table.rows).map_err(|_| too_big())?;
    // One entry point per format, named after it (shaders/common/embedding_body.wgsl).
    let entry = format!("lookup_{}", table.format.name());
    let gpu = rec.gpu();
    let textures = table
        .shards
        .iter()
        .any(|s| s.data.layout() == WeightLayout::Textures);
    let (shader, weights) = if textures {
        ("embedding_tex", Bind::Texture)
    } else {
        ("embedding", Bind::Input)
    };
    let k = gpu.kernel(
        shader,
        &entry,
        &[Bind::Input, weights, weights, Bind::Output],
        32,
        &[],
    )?;
    let groups = gpu.groups(n);
    let last = table.shards.len() - 1;
    for (i, s) in table.shards.iter().enumerate() {
        let p = Params {
            n_tokens: n,
            dim: dim as u32,
            row_start: s.row_start as u32,
            rows: s.rows as u32,
            vocab,
            zero_oob: u32::from(i == last),
            row_words: row_words(table.format, dim) as u32,
            row0: s.data.row0(),
        };
        if (s.data.layout() == WeightLayout::Textures) != textures {
            return Err(Error::invalid(
                op,
                "shards in both buffers and textures".to_string(),
            ));
        }
        let [data, scales] = s.views();
        rec.dispatch(
            &k,
            &format!(
                "embedding.{}[{}..{}]",
                table.label,
                s.row_start,
                s.row_start + s.rows
            ),
            &[ids.view(), data, scales, out.buf.view()],
            params(&p),
            groups,
        )?;
    }
    Ok(())
}

/// CPU reference of [`lookup`] over the dequantised `table` (row-major, rows of `dim`): ids past
/// the table give zero rows.
pub fn lookup_reference(table: &[f32], dim: usize, ids: &[u32]) -> Vec<f32> {
    let vocab = table.len() / dim.max(1);
    ids.iter()
        .flat_map(|&id| {
            let id = id as usize;
            if id < vocab {
                table[id * dim..(id + 1) * dim].to_vec()
            } else {
                vec![0.0; dim]
            }
        })
        .collect()
}
