//! Weight matrices on the GPU, in the layout of [`crate::quant::repack`], split by rows into shards
//! that each fit one storage binding (128 MiB on lavapipe) or one texture. Kernels dispatch once
//! per shard.
//!
//! Two layouts ([`WeightLayout`]): storage buffers, the repack arrays as they are; or 2D textures,
//! one texture row per matrix row: data as `rgba32uint` texels (a Q4 block is one texel, a Q8_0
//! block two, 4 f32 or 8 f16 weights one, rows padded with zeros to whole texels; blocks of 5,
//! 35, 43 or 52 words run on across texels), scales one texel per block (`r16uint` holding the f16
//! `d` of Q8_0/Q4_0/Q5_0/Q6_K, `r32uint` holding the `d` and `m`/`dmin` pair of
//! Q4_1/Q5_1/Q4_K/Q5_K). [`WeightStorage`] says which, and how many rows a shard takes; the upload and the
//! memory plan both ask it, so the plan counts the bytes the ledger books.

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::gpu::record::View;
use crate::gpu::texture::texel_bytes;
use crate::gpu::{BufferClass, Gpu, GpuBuffer, GpuTexture, WeightLayout};
use crate::quant::repack::{self, row_words, scale_words};
use crate::quant::WeightFormat;

/// Where one array of a shard lives: a buffer of its own, bytes `offset..offset + size` of a
/// buffer that holds other matrices' rows too, or rows `row0..row0 + rows` of a texture that may
/// hold other matrices' rows too ([`Gpu::upload_weights_stacked`]).
#[derive(Debug, Clone)]
pub enum Store {
    Buffer(GpuBuffer),
    /// A matrix's array within a stacked buffer: `offset` is a multiple of [`STACK_ALIGN`], so
    /// that every kernel binds the slice as a buffer of its own.
    Slice {
        buf: GpuBuffer,
        offset: u64,
        size: u64,
    },
    Texture {
        tex: Arc<GpuTexture>,
        row0: u32,
        rows: u32,
    },
}

impl Store {
    pub fn label(&self) -> &str {
        match self {
            Store::Buffer(b) | Store::Slice { buf: b, .. } => &b.label,
            Store::Texture { tex, .. } => &tex.label,
        }
    }
    /// Bytes on the device (a texture slice: its rows' share of the texture).
    pub fn size(&self) -> u64 {
        match self {
            Store::Buffer(b) => b.size(),
            Store::Slice { size, .. } => *size,
            Store::Texture { tex, rows, .. } => tex.size() / tex.height as u64 * *rows as u64,
        }
    }
    /// The whole buffer or texture as a kernel binding.
    pub fn view(&self) -> View {
        match self {
            Store::Buffer(b) => b.view(),
            Store::Slice { buf, offset, size } => buf.range(*offset, *size),
            Store::Texture { tex, .. } => tex.bind(),
        }
    }
    /// The first word as a binding (bound where a kernel has a slot it does not read).
    pub fn dummy(&self) -> View {
        match self {
            Store::Buffer(b) => b.range(0, 4),
            Store::Slice { buf, offset, .. } => buf.range(*offset, 4),
            Store::Texture { tex, .. } => tex.bind(),
        }
    }
    /// The texture row of the shard's row 0 (0 for buffers: a slice binds from its own row 0).
    pub fn row0(&self) -> u32 {
        match self {
            Store::Buffer(_) | Store::Slice { .. } => 0,
            Store::Texture { row0, .. } => *row0,
        }
    }
    /// The texture, if any.
    pub fn texture(&self) -> Option<&Arc<GpuTexture>> {
        match self {
            Store::Buffer(_) | Store::Slice { .. } => None,
            Store::Texture { tex, .. } => Some(tex),
        }
    }
    pub fn layout(&self) -> WeightLayout {
        match self {
            Store::Buffer(_) | Store::Slice { .. } => WeightLayout::Buffers,
            Store::Texture { .. } => WeightLayout::Textures,
        }
    }
}

impl Store {
    /// Whether `next` starts where this one ends, in the same buffer or texture (`rows`: this
    /// one's rows, for textures): consecutive matrices of one stack.
    pub fn continued_by(&self, rows: usize, next: &Store) -> bool {
        match (self, next) {
            (
                Store::Slice { buf, offset, size },
                Store::Slice {
                    buf: b2,
                    offset: o2,
                    ..
                },
            ) => buf.buffer == b2.buffer && offset + size == *o2,
            (
                Store::Texture { tex, row0, .. },
                Store::Texture {
                    tex: t2, row0: r2, ..
                },
            ) => Arc::ptr_eq(tex, t2) && *row0 as usize + rows == *r2 as usize,
            _ => false,
        }
    }

    /// This store and the `more` that continue it ([`Store::continued_by`]) as one binding: for
    /// slices the bytes from this one's start to the end of the last; for textures the texture.
    pub fn joined(&self, more: &[&Store]) -> View {
        match self {
            Store::Slice { buf, offset, size } => {
                let all = size + more.iter().map(|s| s.size()).sum::<u64>();
                buf.range(*offset, all)
            }
            _ => self.view(),
        }
    }
}

/// Where the arrays of stacked matrices in buffers start: the largest storage-binding offset
/// alignment WebGPU allows a device to ask for, so that each matrix's slice binds on its own on
/// any device, and the memory plan (which knows no device) stacks exactly where the upload does.
pub const STACK_ALIGN: u64 = 256;

/// A row range of a weight matrix, in its own buffers or textures.
#[derive(Debug, Clone)]
pub struct Shard {
    pub row_start: usize,
    pub rows: usize,
    pub data: Store,
    /// Block scales; absent for f32/f16 (kernels bind the data again in that slot).
    pub scales: Option<Store>,
}

impl Shard {
    /// The shard's data and scales as bindings; f32/f16 have no scales, so their data is bound in
    /// that slot as well (the shaders never read it).
    pub fn views(&self) -> [View; 2] {
        let scales = self
            .scales
            .as_ref()
            .map_or_else(|| self.data.dummy(), Store::view);
        [self.data.view(), scales]
    }
}

/// The size and format of one texture of a texture-layout shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TextureShape {
    pub format: wgpu::TextureFormat,
    pub width: u32,
    pub height: u32,
}

impl TextureShape {
    pub fn bytes(&self) -> u64 {
        self.width as u64 * self.height as u64 * texel_bytes(self.format) as u64
    }
    /// Bytes of one texture row padded to wgpu's copy alignment (a staging row).
    pub fn padded_row(&self) -> u64 {
        (self.width as u64 * texel_bytes(self.format) as u64)
            .next_multiple_of(wgpu::COPY_BYTES_PER_ROW_ALIGNMENT as u64)
    }
}

/// The data and (quantised formats) scales textures of `rows` rows of a `cols`-wide matrix.
pub fn texture_shapes(
    format: WeightFormat,
    rows: usize,
    cols: usize,
) -> (TextureShape, Option<TextureShape>) {
    let height = rows as u32;
    let data = TextureShape {
        format: wgpu::TextureFormat::Rgba32Uint,
        width: row_words(format, cols).div_ceil(4) as u32,
        height,
    };
    let blocks = (cols / format.block_len()) as u32;
    let scales = match repack::scale_bytes(format) {
        0 => None,
        2 => Some(wgpu::TextureFormat::R16Uint),
        _ => Some(wgpu::TextureFormat::R32Uint),
    }
    .map(|format| TextureShape {
        format,
        width: blocks,
        height,
    });
    (data, scales)
}

/// How a device stores weight matrices: the layout and the limits that set the shard size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WeightStorage {
    pub layout: WeightLayout,
    /// Largest storage binding (buffer layout).
    pub max_binding: u64,
    /// Largest texture side (texture layout).
    pub max_texture_dim: u32,
}

impl WeightStorage {
    /// Buffers sharded at `max_binding` bytes.
    pub fn buffers(max_binding: u64) -> WeightStorage {
        WeightStorage {
            layout: WeightLayout::Buffers,
            max_binding,
            max_texture_dim: 0,
        }
    }

    /// `layout` at `gpu`'s binding and texture limits.
    pub fn on_device(gpu: &Gpu, layout: WeightLayout) -> WeightStorage {
        WeightStorage {
            layout,
            max_binding: gpu.max_binding(),
            max_texture_dim: gpu.limits.max_texture_dimension_2d,
        }
    }

    /// Rows per shard of a `rows x cols` matrix.
    pub fn rows_per_shard(&self, format: WeightFormat, rows: usize, cols: usize) -> Result<usize> {
        match self.layout {
            WeightLayout::Buffers => rows_per_shard(format, rows, cols, self.max_binding),
            WeightLayout::Textures => {
                let max = self.max_texture_dim as usize;
                let (data, scales) = texture_shapes(format, 1, cols);
                let width = data.width.max(scales.map_or(0, |s| s.width)) as usize;
                if width > max {
                    return Err(Error::invalid(
                        "weights",
                        format!("a row of {cols} {format} weights needs {width} texels; textures take {max}"),
                    ));
                }
                Ok(rows.min(max & !1).max(1))
            }
        }
    }

    /// Device bytes of a shard of `rows` rows: (data, scales), as the ledger books them.
    pub fn shard_bytes(&self, format: WeightFormat, rows: usize, cols: usize) -> (u64, u64) {
        match self.layout {
            WeightLayout::Buffers => {
                let align4 = |b: u64| b.div_ceil(4).max(1) * 4;
                let s = scale_words(format, rows, cols) as u64 * 4;
                (
                    align4(rows as u64 * row_words(format, cols) as u64 * 4),
                    if s > 0 { align4(s) } else { 0 },
                )
            }
            WeightLayout::Textures => {
                let (d, s) = texture_shapes(format, rows, cols);
                (d.bytes(), s.map_or(0, |s| s.bytes()))
            }
        }
    }

    /// Whether matrices of `parts` (format, rows) sharing `cols` columns are stacked by
    /// [`Gpu::upload_weights_stacked`]: two or three of one format, and all of them one shard.
    /// In textures, the rows fit one texture; in buffers, the stacked data and scales each fit one
    /// binding, and each matrix's data and scales are a whole number of [`STACK_ALIGN`] bytes, so
    /// that the next one's slice starts bindable and the stack holds exactly the bytes of
    /// separate buffers (packed f16 scales included: an even count never shares a word).
    pub fn stacks(&self, parts: &[(WeightFormat, usize)], cols: usize) -> bool {
        let Some(&(format, _)) = parts.first() else {
            return false;
        };
        let total: usize = parts.iter().map(|p| p.1).sum();
        let same = (2..=3).contains(&parts.len())
            && parts.iter().all(|&(f, rows)| f == format && rows > 0)
            && repack::check_shape(format, total, cols).is_ok()
            && self.rows_per_shard(format, total, cols).ok() == Some(total);
        match self.layout {
            WeightLayout::Textures => same,
            WeightLayout::Buffers => {
                same && parts.iter().all(|&(f, rows)| {
                    let data = rows as u64 * row_words(f, cols) as u64 * 4;
                    let scales =
                        rows as u64 * (cols / f.block_len()) as u64 * repack::scale_bytes(f) as u64;
                    data.is_multiple_of(STACK_ALIGN) && scales.is_multiple_of(STACK_ALIGN)
                })
            }
        }
    }

    /// The largest staging chunk the upload of a shard of `rows` rows books.
    pub fn shard_upload_bytes(&self, format: WeightFormat, rows: usize, cols: usize) -> u64 {
        let chunk = crate::gpu::buffer::STAGING_CHUNK;
        match self.layout {
            WeightLayout::Buffers => {
                let (d, s) = self.shard_bytes(format, rows, cols);
                d.max(s).min(chunk)
            }
            WeightLayout::Textures => {
                let (d, s) = texture_shapes(format, rows, cols);
                [Some(d), s]
                    .into_iter()
                    .flatten()
                    .map(|t| t.padded_row() * (chunk / t.padded_row()).max(1).min(rows as u64))
                    .max()
                    .unwrap_or(0)
            }
        }
    }
}

/// Where this device puts weight matrices: `WGLLM_WEIGHTS` or an earlier choice if there is one;
/// buffers where only buffer kernels run; else the faster layout as measured and cached by
/// [`crate::kernels::tune`] (buffers if that measurement fails).
pub fn weight_layout(gpu: &Gpu) -> WeightLayout {
    gpu.weight_layout_or(|| {
        if !crate::kernels::matmul::subgroup_matvec_ok(gpu) {
            return WeightLayout::Buffers;
        }
        // The measurement uploads with explicit storage, so it never asks for the layout itself.
        match crate::kernels::tune::weight_layout_choice(gpu) {
            Ok(c) => c.layout,
            Err(e) => {
                log::warn!("measuring the weight layouts failed ({e}); weights go in buffers");
                WeightLayout::Buffers
            }
        }
    })
}

/// The device's [`WeightStorage`].
pub fn weight_storage(gpu: &Gpu) -> WeightStorage {
    WeightStorage::on_device(gpu, weight_layout(gpu))
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
            .map(|s| s.data.size() + s.scales.as_ref().map_or(0, Store::size))
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
        self.upload_weights_as(label, format, rows, cols, gguf, weight_storage(self))
    }

    /// [`Gpu::upload_weights`] stored as `storage` says rather than as the device prefers.
    pub fn upload_weights_as(
        &self,
        label: &str,
        format: WeightFormat,
        rows: usize,
        cols: usize,
        gguf: &[u8],
        storage: WeightStorage,
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
        let per = storage.rows_per_shard(format, rows, cols)?;
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
            let name = format!("{label}{suffix}");
            let (data, scales) = match storage.layout {
                WeightLayout::Buffers => self.upload_shard_buffers(&name, &p)?,
                WeightLayout::Textures => self.upload_shard_textures(&name, format, n, cols, &p)?,
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

    fn upload_shard_buffers(
        &self,
        name: &str,
        p: &repack::Packed,
    ) -> Result<(Store, Option<Store>)> {
        let data = self.upload(name, BufferClass::Parameters, bytemuck::cast_slice(&p.data))?;
        let scales = if p.scales.is_empty() {
            None
        } else {
            Some(Store::Buffer(self.upload(
                &format!("{name}.scales"),
                BufferClass::Parameters,
                bytemuck::cast_slice(&p.scales),
            )?))
        };
        Ok((Store::Buffer(data), scales))
    }

    /// Uploads a repacked shard of `rows` rows as textures ([`texture_shapes`]).
    fn upload_shard_textures(
        &self,
        name: &str,
        format: WeightFormat,
        rows: usize,
        cols: usize,
        p: &repack::Packed,
    ) -> Result<(Store, Option<Store>)> {
        let (data, scales) = self.create_weight_textures(name, format, rows, cols)?;
        let (d, s) = texture_rows(format, cols, p);
        self.write_texture_rows(&data, 0, &d)?;
        if let Some(t) = &scales {
            self.write_texture_rows(t, 0, &s)?;
        }
        let slice = |t: GpuTexture| Store::Texture {
            tex: Arc::new(t),
            row0: 0,
            rows: rows as u32,
        };
        Ok((slice(data), scales.map(slice)))
    }

    /// The (empty) data and scales textures for `rows` rows of `format`.
    fn create_weight_textures(
        &self,
        name: &str,
        format: WeightFormat,
        rows: usize,
        cols: usize,
    ) -> Result<(GpuTexture, Option<GpuTexture>)> {
        let (dshape, sshape) = texture_shapes(format, rows, cols);
        let make = |label: &str, s: TextureShape| {
            self.create_texture(label, BufferClass::Parameters, s.format, s.width, s.height)
        };
        let data = make(name, dshape)?;
        let scales = sshape
            .map(|s| make(&format!("{name}.scales"), s))
            .transpose()?;
        Ok((data, scales))
    }

    /// Uploads matrices that share `cols` and read the same input (Q, K and V; gate and up), each
    /// `(label, format, rows, GGUF bytes)`. Where [`WeightStorage::stacks`] says so their rows are
    /// stacked: in one texture (one data and one scales texture, each matrix a slice of rows), or
    /// in one buffer (one data and one scales buffer, each matrix a [`Store::Slice`] of its own
    /// repacked arrays, so that the stack is the repack of all rows at once), so that one dispatch
    /// computes them all ([`crate::kernels::matmul::matmul_fused`]); otherwise each is uploaded on
    /// its own. The bytes are the same either way.
    pub fn upload_weights_stacked(
        &self,
        cols: usize,
        parts: &[(&str, WeightFormat, usize, &[u8])],
    ) -> Result<Vec<WeightMatrix>> {
        self.upload_weights_stacked_as(cols, parts, weight_storage(self))
    }

    /// [`Gpu::upload_weights_stacked`] stored as `storage` says rather than as the device prefers.
    pub fn upload_weights_stacked_as(
        &self,
        cols: usize,
        parts: &[(&str, WeightFormat, usize, &[u8])],
        storage: WeightStorage,
    ) -> Result<Vec<WeightMatrix>> {
        let shapes: Vec<_> = parts.iter().map(|p| (p.1, p.2)).collect();
        if !storage.stacks(&shapes, cols) {
            return parts
                .iter()
                .map(|&(label, format, rows, gguf)| {
                    self.upload_weights_as(label, format, rows, cols, gguf, storage)
                })
                .collect();
        }
        let (format, total) = (parts[0].1, shapes.iter().map(|p| p.1).sum::<usize>());
        let name = parts.iter().map(|p| p.0).collect::<Vec<_>>().join("+");
        let mut out = Vec::with_capacity(parts.len());
        let matrix = |label: &str, rows, data, scales| WeightMatrix {
            label: label.to_string(),
            format,
            rows,
            cols,
            shards: vec![Shard {
                row_start: 0,
                rows,
                data,
                scales,
            }],
        };
        if storage.layout == WeightLayout::Buffers {
            // Each part is written on its own, so the staging chunks are a separate upload's.
            let (data_bytes, scale_bytes) = storage.shard_bytes(format, total, cols);
            let data = self.alloc(&name, BufferClass::Parameters, data_bytes)?;
            let scales = (scale_bytes > 0)
                .then(|| {
                    self.alloc(
                        &format!("{name}.scales"),
                        BufferClass::Parameters,
                        scale_bytes,
                    )
                })
                .transpose()?;
            let (mut at_data, mut at_scales) = (0, 0);
            for &(label, f, rows, gguf) in parts {
                let need = f.bytes_for(rows * cols);
                if gguf.len() != need {
                    return Err(Error::shape(
                        format!("upload {label}"),
                        format!("{need} bytes for {rows}x{cols} {f}"),
                        format!("{} bytes", gguf.len()),
                    ));
                }
                let p = repack::repack(f, rows, cols, gguf)?;
                let slice = |buf: &GpuBuffer, offset: &mut u64, words: &[u32]| -> Result<Store> {
                    let bytes: &[u8] = bytemuck::cast_slice(words);
                    self.write(buf, *offset, bytes)?;
                    let s = Store::Slice {
                        buf: buf.clone(),
                        offset: *offset,
                        size: bytes.len() as u64,
                    };
                    *offset += bytes.len() as u64;
                    Ok(s)
                };
                let d = slice(&data, &mut at_data, &p.data)?;
                let s = match &scales {
                    Some(b) => Some(slice(b, &mut at_scales, &p.scales)?),
                    None => None,
                };
                out.push(matrix(label, rows, d, s));
            }
            return Ok(out);
        }
        let (data, scales) = self.create_weight_textures(&name, format, total, cols)?;
        let data = Arc::new(data);
        let scales = scales.map(Arc::new);
        let mut row0 = 0;
        for &(label, f, rows, gguf) in parts {
            repack::check_shape(f, rows, cols)?;
            let p = repack::repack(f, rows, cols, gguf)?;
            let (d, s) = texture_rows(f, cols, &p);
            self.write_texture_rows(&data, row0 as u32, &d)?;
            if let Some(t) = &scales {
                self.write_texture_rows(t, row0 as u32, &s)?;
            }
            let slice = |tex: &Arc<GpuTexture>| Store::Texture {
                tex: tex.clone(),
                row0: row0 as u32,
                rows: rows as u32,
            };
            out.push(matrix(
                label,
                rows,
                slice(&data),
                scales.as_ref().map(slice),
            ));
            row0 += rows;
        }
        Ok(out)
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

/// The tight texture rows of a repacked shard: data rows padded with zero words to whole texels
/// (f32/f16 rows whose length is not a multiple of 4 or 8; quantised rows are whole texels), and
/// the scales one texel a block (Q8_0/Q4_0: the f16 out of the repack layout's pairs).
fn texture_rows(format: WeightFormat, cols: usize, p: &repack::Packed) -> (Vec<u8>, Vec<u8>) {
    let rw = row_words(format, cols);
    let tw = texture_shapes(format, 1, cols).0.width as usize * 4;
    let data: Vec<u32> = if rw == tw {
        p.data.clone()
    } else {
        p.data
            .chunks_exact(rw)
            .flat_map(|r| r.iter().copied().chain(std::iter::repeat_n(0, tw - rw)))
            .collect()
    };
    let scales = match repack::scale_bytes(format) {
        0 => Vec::new(),
        4 => bytemuck::cast_slice(&p.scales).to_vec(),
        _ => {
            let n = p.data.len() / rw * (cols / format.block_len());
            let halves: Vec<u16> = (0..n)
                .map(|g| (p.scales[g / 2] >> (16 * (g % 2))) as u16)
                .collect();
            bytemuck::cast_slice(&halves).to_vec()
        }
    };
    (bytemuck::cast_slice(&data).to_vec(), scales)
}
