//! Read-only 2D textures of unsigned integer texels, booked in the ledger like buffers.
//!
//! Why textures at all: on CPU Vulkan drivers (Mesa's llvmpipe) a `textureLoad` is a vectorised
//! gather, while every storage-buffer load is a loop over the SIMD lanes; reading 16 MiB with
//! `textureLoad` of `rgba32uint` texels runs at 5.6-7.5 GB/s there against 0.9-1.1 GB/s through
//! `array<u32>` or `array<vec4<u32>>` (BENCHMARKS.md). So weight matrices can live in textures
//! ([`crate::gpu::WeightLayout::Textures`]) on devices where that measures faster.

use std::sync::Arc;

use super::buffer::STAGING_CHUNK;
use super::ledger::{BufferClass, Reservation};
use super::{scoped, Gpu};
use crate::error::{Error, Result};

/// A `width x height` texture of `format` texels, bindable as `texture_2d<u32>`.
#[derive(Debug)]
pub struct GpuTexture {
    pub texture: wgpu::Texture,
    pub view: wgpu::TextureView,
    pub label: Arc<str>,
    pub width: u32,
    pub height: u32,
    _booking: Reservation,
}

/// Bytes of one texel of the formats wgllm uses (`r16uint`, `r32uint`, `rgba32uint`).
pub fn texel_bytes(format: wgpu::TextureFormat) -> u32 {
    format.block_copy_size(None).unwrap_or(4)
}

impl GpuTexture {
    /// Bytes the texture holds (what the ledger booked).
    pub fn size(&self) -> u64 {
        self.width as u64 * self.height as u64 * texel_bytes(self.texture.format()) as u64
    }
}

impl Gpu {
    /// Creates a `width x height` texture of `format`, zero-filled, booked in the ledger first.
    pub fn create_texture(
        &self,
        label: &str,
        class: BufferClass,
        format: wgpu::TextureFormat,
        width: u32,
        height: u32,
    ) -> Result<GpuTexture> {
        let max = self.limits.max_texture_dimension_2d;
        if width == 0 || height == 0 || width > max || height > max {
            return Err(Error::invalid(
                "texture",
                format!("'{label}' of {width}x{height} texels: each side must be 1 to {max}"),
            ));
        }
        let bytes = width as u64 * height as u64 * texel_bytes(format) as u64;
        let booking = self.ledger.reserve(label, class, bytes)?;
        let texture = scoped(&self.device, &format!("creating texture '{label}'"), || {
            self.device.create_texture(&wgpu::TextureDescriptor {
                label: Some(label),
                size: wgpu::Extent3d {
                    width,
                    height,
                    depth_or_array_layers: 1,
                },
                mip_level_count: 1,
                sample_count: 1,
                dimension: wgpu::TextureDimension::D2,
                format,
                usage: wgpu::TextureUsages::TEXTURE_BINDING | wgpu::TextureUsages::COPY_DST,
                view_formats: &[],
            })
        })?;
        let view = texture.create_view(&wgpu::TextureViewDescriptor::default());
        Ok(GpuTexture {
            texture,
            view,
            label: label.into(),
            width,
            height,
            _booking: booking,
        })
    }

    /// Writes whole rows from row `y0` on: `data` holds tight rows of the texture's width, and
    /// goes through booked staging chunks whose rows are padded to wgpu's 256-byte copy alignment.
    pub fn write_texture_rows(&self, t: &GpuTexture, y0: u32, data: &[u8]) -> Result<()> {
        let label = &t.label;
        let texel = texel_bytes(t.texture.format()) as usize;
        let row = t.width as usize * texel;
        let rows = data.len() / row;
        if !data.len().is_multiple_of(row) || y0 as usize + rows > t.height as usize {
            return Err(Error::shape(
                format!("texture '{label}'"),
                format!(
                    "whole rows of {row} bytes within its {} rows from row {y0}",
                    t.height
                ),
                format!("{} bytes", data.len()),
            ));
        }
        let padded = row.next_multiple_of(wgpu::COPY_BYTES_PER_ROW_ALIGNMENT as usize);
        let rows_per_chunk = (STAGING_CHUNK as usize / padded).max(1);
        let mut y = 0usize;
        while y < rows {
            let n = rows_per_chunk.min(rows - y);
            let staging = self.staging_upload(label, (n * padded) as u64, |view| {
                for (i, src) in data[y * row..(y + n) * row].chunks_exact(row).enumerate() {
                    view.slice(i * padded..i * padded + row)
                        .copy_from_slice(src);
                }
            })?;
            let mut enc = self
                .device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                    label: Some("texture upload"),
                });
            enc.copy_buffer_to_texture(
                wgpu::TexelCopyBufferInfo {
                    buffer: &staging.buffer,
                    layout: wgpu::TexelCopyBufferLayout {
                        offset: 0,
                        bytes_per_row: Some(padded as u32),
                        rows_per_image: Some(n as u32),
                    },
                },
                wgpu::TexelCopyTextureInfo {
                    texture: &t.texture,
                    mip_level: 0,
                    origin: wgpu::Origin3d {
                        x: 0,
                        y: y0 + y as u32,
                        z: 0,
                    },
                    aspect: wgpu::TextureAspect::All,
                },
                wgpu::Extent3d {
                    width: t.width,
                    height: n as u32,
                    depth_or_array_layers: 1,
                },
            );
            scoped(&self.device, &format!("uploading '{label}'"), || {
                self.queue.submit([enc.finish()])
            })?;
            y += n;
        }
        Ok(())
    }
}
