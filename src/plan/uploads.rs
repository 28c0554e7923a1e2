//! The tensors a forward pass uploads, and what they take on the device: the parameters class and
//! the largest staging chunk of the GPT-2 and BERT loaders, which upload what they run rather than
//! the checkpoint (GPT-2 splits `c_attn` into Q, K and V; BERT sums its position and token-type
//! tables into one f32 table and leaves the pooler out), so the count of [`crate::model::params`]
//! is not their device footprint.

use serde::Serialize;

use crate::error::Result;
use crate::gpu::buffer::STAGING_CHUNK;
use crate::kernels::weights::WeightStorage;
use crate::model::params::Precision;
use crate::quant::WeightFormat;

/// How one tensor is uploaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum UploadKind {
    /// A `rows x cols` matrix or lookup table in the plan's precision ([`matrix_format`]),
    /// repacked and sharded as the device stores weight matrices.
    Matrix { rows: usize, cols: usize },
    /// A `rows x cols` table kept f32 whatever the precision, stored as matrices are.
    MatrixF32 { rows: usize, cols: usize },
    /// An f32 vector in a buffer: norm gains and betas, biases.
    Vector { len: usize },
}

/// One tensor of a forward pass's upload list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Upload {
    /// The loader's name for it (`wte`, `layers.w_fc`, ...).
    pub name: &'static str,
    pub kind: UploadKind,
    /// Uploaded once per layer.
    pub per_layer: bool,
}

pub(crate) fn once(name: &'static str, kind: UploadKind) -> Upload {
    Upload {
        name,
        kind,
        per_layer: false,
    }
}

pub(crate) fn layer(name: &'static str, kind: UploadKind) -> Upload {
    Upload {
        name,
        kind,
        per_layer: true,
    }
}

/// The format a `cols`-wide matrix is uploaded in at `precision`, as the loaders pick it
/// (`Source::matrix_bytes`, `gpt2::weight_format`): block formats need rows of whole blocks, so
/// other widths keep f16. bf16 is stored as f16.
pub fn matrix_format(precision: Precision, cols: usize) -> WeightFormat {
    let f = precision.storage();
    if f.is_quantized() && !cols.is_multiple_of(f.block_len()) {
        WeightFormat::F16
    } else {
        f
    }
}

/// Device bytes of one copy of `u` and its largest single staging chunk.
pub fn upload_bytes(
    u: &Upload,
    precision: Precision,
    storage: WeightStorage,
) -> Result<(u64, u64)> {
    let align4 = |b: u64| b.div_ceil(4).max(1) * 4;
    let (format, rows, cols) = match u.kind {
        UploadKind::Vector { len } => {
            let b = align4((len as u64).saturating_mul(4));
            return Ok((b, b.min(STAGING_CHUNK)));
        }
        UploadKind::Matrix { rows, cols } => (matrix_format(precision, cols), rows, cols),
        UploadKind::MatrixF32 { rows, cols } => (WeightFormat::F32, rows, cols),
    };
    sharded_matrix_bytes(format, rows, cols, storage)
}

/// Device bytes of a `rows` x `cols` matrix in `format`, split into shards as `storage` says, and
/// its largest shard's upload.
pub(crate) fn sharded_matrix_bytes(
    format: WeightFormat,
    rows: usize,
    cols: usize,
    storage: WeightStorage,
) -> Result<(u64, u64)> {
    let per = storage.rows_per_shard(format, rows, cols)?.max(1);
    let (mut total, mut largest, mut r0) = (0u64, 0u64, 0usize);
    while r0 < rows {
        let n = per.min(rows - r0);
        let (data, scales) = storage.shard_bytes(format, n, cols);
        total = total.saturating_add(data).saturating_add(scales);
        largest = largest.max(storage.shard_upload_bytes(format, n, cols));
        r0 += n;
    }
    Ok((total, largest))
}

/// What an upload list takes: all of it, one layer's share, and the largest staging chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UploadTotals {
    pub total: u64,
    pub per_layer: u64,
    pub largest_chunk: u64,
}

/// Adds up `uploads` for `n_layers` layers.
pub fn totals(
    uploads: &[Upload],
    n_layers: usize,
    precision: Precision,
    storage: WeightStorage,
) -> Result<UploadTotals> {
    let mut t = UploadTotals {
        total: 0,
        per_layer: 0,
        largest_chunk: 0,
    };
    for u in uploads {
        let (bytes, chunk) = upload_bytes(u, precision, storage)?;
        t.largest_chunk = t.largest_chunk.max(chunk);
        if u.per_layer {
            t.per_layer = t.per_layer.saturating_add(bytes);
        } else {
            t.total = t.total.saturating_add(bytes);
        }
    }
    t.total = t
        .total
        .saturating_add(t.per_layer.saturating_mul(n_layers as u64));
    Ok(t)
}
