//! Weight matrices on the GPU, in the layout of [`crate::quant::repack`], split by rows into shards
//! that each fit one storage binding (128 MiB on lavapipe). Kernels dispatch once per shard.

use crate::error::{Error, Result};
use crate::gpu::{BufferClass, Gpu, GpuBuffer};
use crate::quant::repack::{self, row_words, scale_words};
use crate::quant::WeightFormat;

/// A row range of a weight matrix, in its own buffers.
#[derive(Debug, Clone)]
pub struct Shard {
    pub row_start: usize,
    pub rows: usize,
    pub data: GpuBuffer,
    /// Block scales; absent for f32/f16 (a 4-byte dummy is bound instead).
    pub scales: Option<GpuBuffer>,
}

/// A `rows x cols` weight matrix (`y = W x` maps `cols` inputs to `rows` outputs).
#[derive(Debug, Clone)]
pub struct WeightMatrix {
    pub label: String,
    pub format: WeightFormat,
    pub rows: usize,
    pub cols: usize,
    pub shards: Vec<Shard>,
}

impl WeightMatrix {
    /// Bytes on the GPU, all shards.
    pub fn bytes(&self) -> u64 {
        self.shards
            .iter()
            .map(|s| s.data.size() + s.scales.as_ref().map_or(0, |b| b.size()))
            .sum()
    }
}

/// Rows per shard so that a shard's data and scales each fit `max_binding` bytes.
pub fn rows_per_shard(
    format: WeightFormat,
    rows: usize,
    cols: usize,
    max_binding: u64,
) -> Result<usize> {
    let row_bytes = row_words(format, cols) as u64 * 4;
    // Scales of one row round up to whole words; two rows' worth bounds it from above.
    let scale_row_bytes = (scale_words(format, 2, cols) as u64 * 4).div_ceil(2) + 4;
    let per_row = row_bytes.max(scale_row_bytes);
    let n = (max_binding / per_row) as usize;
    if n == 0 {
        return Err(Error::invalid(
            "weights",
            format!("one row of {cols} {format} weights ({row_bytes} bytes) exceeds the {max_binding}-byte binding limit"),
        ));
    }
    // An even number of rows keeps packed f16 scale pairs from straddling shards.
    let n = if n >= rows { rows } else { (n & !1).max(1) };
    Ok(n)
}

impl Gpu {
    /// Uploads a `rows x cols` matrix given as GGUF bytes of `format`, repacked and sharded.
    pub fn upload_weights(
        &self,
        label: &str,
        format: WeightFormat,
        rows: usize,
        cols: usize,
        gguf: &[u8],
    ) -> Result<WeightMatrix> {
        repack::check_shape(format, rows, cols)?;
        let need = format.bytes_for(rows * cols);
        if gguf.len() != need {
            return Err(Error::shape(
                format!("upload {label}"),
                format!("{need} bytes for {rows}x{cols} {format}"),
                format!("{} bytes", gguf.len()),
            ));
        }
        let per = rows_per_shard(format, rows, cols, self.max_binding())?;
        let row_bytes = format.bytes_for(cols);
        let mut shards = Vec::new();
        let mut r0 = 0;
        while r0 < rows {
            let n = per.min(rows - r0);
            let p = repack::repack(format, n, cols, &gguf[r0 * row_bytes..(r0 + n) * row_bytes])?;
            let suffix = if per < rows {
                format!("[{r0}..{}]", r0 + n)
            } else {
                String::new()
            };
            let data = self.upload(
                &format!("{label}{suffix}"),
                BufferClass::Parameters,
                bytemuck::cast_slice(&p.data),
            )?;
            let scales = if p.scales.is_empty() {
                None
            } else {
                Some(self.upload(
                    &format!("{label}{suffix}.scales"),
                    BufferClass::Parameters,
                    bytemuck::cast_slice(&p.scales),
                )?)
            };
            shards.push(Shard {
                row_start: r0,
                rows: n,
                data,
                scales,
            });
            r0 += n;
        }
        Ok(WeightMatrix {
            label: label.to_string(),
            format,
            rows,
            cols,
            shards,
        })
    }

    /// Quantises `w` (row-major `rows x cols` f32) to `format` on the CPU and uploads it.
    pub fn upload_weights_f32(
        &self,
        label: &str,
        format: WeightFormat,
        rows: usize,
        cols: usize,
        w: &[f32],
    ) -> Result<WeightMatrix> {
        if w.len() != rows * cols {
            return Err(Error::shape(
                format!("upload {label}"),
                format!("{} values", rows * cols),
                format!("{}", w.len()),
            ));
        }
        repack::check_shape(format, rows, cols)?;
        let mut gguf = Vec::with_capacity(format.bytes_for(w.len()));
        for row in w.chunks(cols) {
            gguf.extend(crate::quant::quantize(format, row)?);
        }
        self.upload_weights(label, format, rows, cols, &gguf)
    }
}
