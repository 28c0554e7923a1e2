//! GPU buffers created through the ledger, and the upload and readback paths.
//!
//! Uploads and readbacks go through staging buffers that the ledger books as `staging`, in chunks
//! of at most [`STAGING_CHUNK`] bytes, so that loading a 7 GB model never needs 7 GB of host-visible
//! memory and the staging peak shows in the report.

use std::sync::Arc;

use super::ledger::{BufferClass, Reservation};
use super::{scoped, Gpu};
use crate::error::{Error, Result};

/// Largest staging buffer an upload or readback uses at once.
pub const STAGING_CHUNK: u64 = 64 << 20;

/// A GPU buffer booked in the ledger. Clones share the buffer; the bytes return to the ledger when
/// the last clone is dropped.
#[derive(Debug, Clone)]
pub struct GpuBuffer {
    pub buffer: wgpu::Buffer,
    pub label: Arc<str>,
    _booking: Arc<Reservation>,
}

impl GpuBuffer {
    pub fn size(&self) -> u64 {
        self.buffer.size()
    }
    pub fn class(&self) -> BufferClass {
        self._booking.class()
    }
}

fn align4(n: u64) -> u64 {
    n.div_ceil(4) * 4
}

impl Gpu {
    /// Creates a storage buffer (usable as kernel input and output, and as copy source and
    /// destination; on a device with [`Gpu::uniform_inputs`] also as a uniform buffer). The
    /// ledger is asked first; the driver only if the ledger agrees.
    pub fn alloc(&self, label: &str, class: BufferClass, size: u64) -> Result<GpuBuffer> {
        let mut usage = wgpu::BufferUsages::STORAGE
            | wgpu::BufferUsages::COPY_DST
            | wgpu::BufferUsages::COPY_SRC;
        if self.uniform_inputs() {
            usage |= wgpu::BufferUsages::UNIFORM;
        }
        self.alloc_with_usage(label, class, size, usage, false)
    }

    /// Whether buffers from [`Gpu::alloc`] can also be bound as uniform buffers (windows of
    /// [`super::UNIFORM_WINDOW`] bytes), which the subgroup matvec reads x through on CPU devices.
    pub fn uniform_inputs(&self) -> bool {
        self.uniform_inputs
    }

    pub(crate) fn alloc_with_usage(
        &self,
        label: &str,
        class: BufferClass,
        size: u64,
        usage: wgpu::BufferUsages,
        mapped: bool,
    ) -> Result<GpuBuffer> {
        // wgpu wants sizes that are multiples of 4 for copies and mapping; never zero-sized.
        let size = align4(size.max(4));
        if size > self.limits.max_buffer_size {
            return Err(Error::BufferTooLarge {
                label: label.into(),
                size,
                max: self.limits.max_buffer_size,
            });
        }
        let booking = self.ledger.reserve(label, class, size)?;
        let buffer = scoped(&self.device, &format!("creating buffer '{label}'"), || {
            self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                size,
                usage,
                mapped_at_creation: mapped,
            })
        })?;
        Ok(GpuBuffer {
            buffer,
            label: label.into(),
            _booking: Arc::new(booking),
        })
    }

    /// Creates a storage buffer holding `data`, uploaded through booked staging chunks.
    pub fn upload(&self, label: &str, class: BufferClass, data: &[u8]) -> Result<GpuBuffer> {
        let dst = self.alloc(label, class, data.len() as u64)?;
        self.write(&dst, 0, data)?;
        Ok(dst)
    }

    /// Creates a storage buffer holding `data` as f32.
    pub fn upload_f32(&self, label: &str, class: BufferClass, data: &[f32]) -> Result<GpuBuffer> {
        self.upload(label, class, bytemuck::cast_slice(data))
    }

    /// Writes `data` into `dst` at byte `offset` through staging chunks booked in the ledger.
    pub fn write(&self, dst: &GpuBuffer, offset: u64, data: &[u8]) -> Result<()> {
        if offset + data.len() as u64 > dst.size() {
            return Err(Error::invalid(
                "write",
                format!(
                    "{} bytes at offset {offset} do not fit '{}' ({} bytes)",
                    data.len(),
                    dst.label,
                    dst.size()
                ),
            ));
        }
        let mut done = 0usize;
        while done < data.len() {
            let n = (data.len() - done).min(STAGING_CHUNK as usize);
            let padded = align4(n as u64);
            let staging = self.staging_upload(&dst.label, padded, |view| {
                view.slice(..n).copy_from_slice(&data[done..done + n]);
            })?;
            // Copies need 4-byte multiples: a ragged tail is padded with zeros in the staging buffer
            // and may only overwrite padding in `dst` (its size is a multiple of 4 too).
            let copy = padded.min(dst.size() - offset - done as u64);
            let mut enc = self
                .device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                    label: Some("upload"),
                });
            enc.copy_buffer_to_buffer(&staging.buffer, 0, &dst.buffer, offset + done as u64, copy);
            scoped(&self.device, &format!("uploading '{}'", dst.label), || {
                self.queue.submit([enc.finish()])
            })?;
            done += n;
        }
        Ok(())
    }

    /// A staging buffer of `size` bytes (booked as staging) for an upload to `label`, filled by
    /// `fill` while mapped (it starts zeroed) and unmapped, ready to copy from.
    pub(crate) fn staging_upload(
        &self,
        label: &str,
        size: u64,
        fill: impl FnOnce(&mut wgpu::BufferViewMut),
    ) -> Result<GpuBuffer> {
        let staging = self.alloc_with_usage(
            &format!("{label}.upload"),
            BufferClass::Staging,
            size,
            wgpu::BufferUsages::MAP_WRITE | wgpu::BufferUsages::COPY_SRC,
            true,
        )?;
        {
            let mut view = staging
                .buffer
                .slice(..)
                .get_mapped_range_mut()
                .map_err(|e| Error::Gpu {
                    kind: "map",
                    context: format!("mapping the upload of '{label}'"),
                    message: e.to_string(),
                })?;
            fill(&mut view);
        }
        staging.buffer.unmap();
        Ok(staging)
    }

    /// Reads `size` bytes of `src` from byte `offset`.
    pub fn read_bytes(&self, src: &GpuBuffer, offset: u64, size: u64) -> Result<Vec<u8>> {
        if !offset.is_multiple_of(4) || offset + size > src.size() {
            return Err(Error::invalid(
                "read",
                format!(
                    "range {offset}+{size} of '{}' ({} bytes)",
                    src.label,
                    src.size()
                ),
            ));
        }
        let mut out = Vec::with_capacity(size as usize);
        let mut done = 0u64;
        while done < size {
            let n = (size - done).min(STAGING_CHUNK);
            let padded = align4(n);
            let staging = self.alloc_with_usage(
                &format!("{}.readback", src.label),
                BufferClass::Staging,
                padded,
                wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                false,
            )?;
            let mut enc = self
                .device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                    label: Some("readback"),
                });
            enc.copy_buffer_to_buffer(
                &src.buffer,
                offset + done,
                &staging.buffer,
                0,
                padded.min(src.size() - offset - done),
            );
            scoped(
                &self.device,
                &format!("reading back '{}'", src.label),
                || self.queue.submit([enc.finish()]),
            )?;
            let (tx, rx) = std::sync::mpsc::channel();
            staging
                .buffer
                .slice(..)
                .map_async(wgpu::MapMode::Read, move |r| {
                    let _ = tx.send(r);
                });
            self.wait()?;
            let mapped = rx.recv().map_err(|e| Error::Readback {
                label: src.label.to_string(),
                reason: e.to_string(),
            })?;
            mapped.map_err(|e| Error::Readback {
                label: src.label.to_string(),
                reason: e.to_string(),
            })?;
            {
                let view =
                    staging
                        .buffer
                        .slice(..)
                        .get_mapped_range()
                        .map_err(|e| Error::Readback {
                            label: src.label.to_string(),
                            reason: e.to_string(),
                        })?;
                out.extend_from_slice(&view[..n as usize]);
            }
            staging.buffer.unmap();
            done += n;
        }
        Ok(out)
    }

    /// Reads `len` f32 values of `src` starting at element `start`.
    pub fn read_f32(&self, src: &GpuBuffer, start: usize, len: usize) -> Result<Vec<f32>> {
        let bytes = self.read_bytes(src, start as u64 * 4, len as u64 * 4)?;
        Ok(bytemuck::pod_collect_to_vec(&bytes))
    }
}
