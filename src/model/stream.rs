//! Layer streaming: running a model whose weights exceed the VRAM budget.
//!
//! Layers `0..first` stay on the GPU as usual. Every later layer is repacked once at load into
//! host memory, as the exact GPU words of [`crate::quant::repack`] sharded as
//! [`Gpu::upload_weights`] shards them, so a forward pass does no CPU repacking. A pool of
//! [`STREAM_SLOTS`] layer slots (GPU buffers sized for the largest streamed layer, booked as
//! parameters) is allocated once; each forward pass writes streamed layer `first + i` into slot
//! `i % STREAM_SLOTS` through the ledger-booked staging of [`Gpu::write`], then runs it from there.
//!
//! Queue order makes this correct: a slot's upload is submitted after the work that read the
//! slot's previous layer, and before the work that reads the new one. For speed the forward pass
//! submits a layer without waiting and uploads the next one into the other slot while the GPU runs
//! it; [`StreamedLayers::fetch`] waits only for the submission that last read the slot it is about
//! to overwrite, so at most two layers' uploads (and their staging buffers, which wgpu keeps alive
//! until their copies ran) are ever in flight.

use std::collections::HashMap;

use crate::error::{Error, Result};
use crate::gpu::{BufferClass, Gpu, GpuBuffer};
use crate::kernels::weights::{rows_per_shard, Shard, Store};
use crate::kernels::{Tensor, WeightMatrix};
use crate::model::llama::{Layer, LayerWeights};
use crate::model::source::Source;
use crate::quant::repack::{self, Packed};
use crate::quant::WeightFormat;

/// Layer slots on the GPU: one being read by the GPU, one being uploaded.
pub const STREAM_SLOTS: usize = crate::plan::STREAM_SLOTS as usize;

/// A row range of a matrix in GPU layout, in host memory.
#[derive(Debug, Clone)]
pub struct HostShard {
    pub row_start: usize,
    pub rows: usize,
    pub packed: Packed,
}

/// A `rows x cols` weight matrix in GPU layout, in host memory, sharded as on the GPU.
#[derive(Debug, Clone)]
pub struct HostMatrix {
    pub label: String,
    pub format: WeightFormat,
    pub rows: usize,
    pub cols: usize,
    pub shards: Vec<HostShard>,
}

/// One streamed layer: matrices in GPU layout, norm weights and biases as f32.
pub type HostLayer = Layer<HostMatrix, Vec<f32>>;

impl HostMatrix {
    /// Repacks a matrix given as GGUF bytes of `format`, split into the shards
    /// [`Gpu::upload_weights`] would make for a `max_binding`-byte binding limit.
    pub fn pack(
        label: &str,
        format: WeightFormat,
        rows: usize,
        cols: usize,
        gguf: &[u8],
        max_binding: u64,
    ) -> Result<HostMatrix> {
        repack::check_shape(format, rows, cols)?;
        let need = format.bytes_for(rows * cols);
        if gguf.len() != need {
            return Err(Error::shape(
                format!("pack {label}"),
                format!("{need} bytes for {rows}x{cols} {format}"),
                format!("{} bytes", gguf.len()),
            ));
        }
        let per = rows_per_shard(format, rows, cols, max_binding)?;
        let row_bytes = format.bytes_for(cols);
        let mut shards = Vec::new();
        let mut r0 = 0;
        while r0 < rows {
            let n = per.min(rows - r0);
            let packed =
                repack::repack(format, n, cols, &gguf[r0 * row_bytes..(r0 + n) * row_bytes])?;
            shards.push(HostShard {
                row_start: r0,
                rows: n,
                packed,
            });
            r0 += n;
        }
        Ok(HostMatrix {
            label: label.to_string(),
            format,
            rows,
            cols,
            shards,
        })
    }

    /// Reads matrix `name` of `src` in the format [`Source::matrix`] uploads it in (the same
    /// checks, the same fallbacks), without touching the GPU.
    pub fn read(
        src: &Source,
        name: &str,
        rows: usize,
        cols: usize,
        max_binding: u64,
    ) -> Result<HostMatrix> {
        let (format, gguf) = src.matrix_bytes(name, rows, cols)?;
        HostMatrix::pack(name, format, rows, cols, &gguf, max_binding)
    }

    /// Bytes it takes on the GPU (as [`WeightMatrix::bytes`] counts them).
    pub fn bytes(&self) -> u64 {
        self.shards
            .iter()
            .map(|s| 4 * (s.packed.data.len() + s.packed.scales.len()) as u64)
            .sum()
    }
}

/// The f32 vector `name` of `n` values, as [`Source::vector_plus`] reads it.
pub fn read_vector(src: &Source, name: &str, n: usize, add_one: bool) -> Result<Vec<f32>> {
    src.vector_f32_plus(name, n, add_one)
}

/// Shard buffers of one matrix role in a slot: for each shard index, data (and scales) buffers
/// large enough for that shard of every streamed layer, whatever its format.
struct SlotMatrix {
    shards: Vec<(GpuBuffer, Option<GpuBuffer>)>,
}

/// Largest data and scales bytes per shard index over the matrices of one role.
#[derive(Default)]
struct Capacity {
    data: Vec<u64>,
    scales: Vec<u64>,
}

impl Capacity {
    fn grow(&mut self, m: &HostMatrix) {
        let n = m.shards.len().max(self.data.len());
        self.data.resize(n, 0);
        self.scales.resize(n, 0);
        for (i, s) in m.shards.iter().enumerate() {
            self.data[i] = self.data[i].max(4 * s.packed.data.len() as u64);
            self.scales[i] = self.scales[i].max(4 * s.packed.scales.len() as u64);
        }
    }
}

impl SlotMatrix {
    fn alloc(gpu: &Gpu, label: &str, cap: &Capacity) -> Result<SlotMatrix> {
        let several = cap.data.len() > 1;
        let shards = cap
            .data
            .iter()
            .zip(&cap.scales)
            .enumerate()
            .map(|(i, (&data, &scales))| {
                let label = if several {
                    format!("{label}[{i}]")
                } else {
                    label.to_string()
                };
                let d = gpu.alloc(&label, BufferClass::Parameters, data)?;
                let s = (scales > 0)
                    .then(|| gpu.alloc(&format!("{label}.scales"), BufferClass::Parameters, scales))
                    .transpose()?;
                Ok((d, s))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(SlotMatrix { shards })
    }

    /// Writes `m` into the slot and returns it as a weight matrix over the slot's buffers.
    fn load(&self, gpu: &Gpu, m: &HostMatrix) -> Result<WeightMatrix> {
        let missing = || Error::invalid("stream", format!("'{}' does not fit its slot", m.label));
        if m.shards.len() > self.shards.len() {
            return Err(missing());
        }
        let mut shards = Vec::with_capacity(m.shards.len());
        for (h, (data, scales)) in m.shards.iter().zip(&self.shards) {
            gpu.write(data, 0, bytemuck::cast_slice(&h.packed.data))?;
            let scales = if h.packed.scales.is_empty() {
                None
            } else {
                let b = scales.as_ref().ok_or_else(missing)?;
                gpu.write(b, 0, bytemuck::cast_slice(&h.packed.scales))?;
                Some(b.clone())
            };
            shards.push(Shard {
                row_start: h.row_start,
                rows: h.rows,
                data: Store::Buffer(data.clone()),
                scales: scales.map(Store::Buffer),
            });
        }
        Ok(WeightMatrix {
            label: m.label.clone(),
            format: m.format,
            rows: m.rows,
            cols: m.cols,
            shards,
        })
    }
}

/// Layers `first..first + len()` of a model, in host memory, and the GPU slots they run from.
pub struct StreamedLayers {
    first: usize,
    host: Vec<HostLayer>,
    slots: Vec<Layer<SlotMatrix, Tensor>>,
    /// The last submission that reads each slot (waited for before the slot is overwritten).
    in_use: Vec<Option<wgpu::SubmissionIndex>>,
}

impl StreamedLayers {
    /// Allocates `min(STREAM_SLOTS, host.len())` slots, each large enough for every layer of
    /// `host` (which are layers `first..`).
    pub fn new(gpu: &Gpu, first: usize, host: Vec<HostLayer>) -> Result<StreamedLayers> {
        let Some(layer0) = host.first() else {
            return Err(Error::invalid("stream", "no layers to stream"));
        };
        let mut caps: HashMap<&str, Capacity> = HashMap::new();
        let mut lens: HashMap<&str, usize> = HashMap::new();
        for h in &host {
            h.try_map(
                |role, m| {
                    caps.entry(role).or_default().grow(m);
                    Ok(())
                },
                |role, v| {
                    let n = lens.entry(role).or_default();
                    *n = (*n).max(v.len());
                    Ok(())
                },
            )?;
        }
        let slots = (0..STREAM_SLOTS.min(host.len()))
            .map(|i| {
                layer0.try_map(
                    |role, _| {
                        SlotMatrix::alloc(gpu, &format!("stream.slot{i}.{role}"), &caps[role])
                    },
                    |role, _| {
                        let n = lens[role];
                        let label = format!("stream.slot{i}.{role}");
                        Ok(Tensor {
                            buf: gpu.alloc(&label, BufferClass::Parameters, 4 * n as u64)?,
                            shape: vec![n],
                        })
                    },
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(StreamedLayers {
            first,
            in_use: (0..slots.len()).map(|_| None).collect(),
            host,
            slots,
        })
    }

    /// The first streamed layer (the number of resident layers).
    pub fn first(&self) -> usize {
        self.first
    }

    /// Streamed layers.
    pub fn len(&self) -> usize {
        self.host.len()
    }

    pub fn is_empty(&self) -> bool {
        self.host.is_empty()
    }

    /// The slot layer `l` runs from.
    fn slot(&self, l: usize) -> Result<usize> {
        l.checked_sub(self.first)
            .filter(|&i| i < self.host.len())
            .map(|i| i % self.slots.len())
            .ok_or_else(|| {
                Error::invalid(
                    "stream",
                    format!(
                        "layer {l} is not streamed (layers {}..{} are)",
                        self.first,
                        self.first + self.host.len()
                    ),
                )
            })
    }

    /// Uploads layer `l` into its slot and returns its weights there. Waits first for the GPU to
    /// finish the submission that last read the slot (see [`StreamedLayers::submitted`]); queue
    /// order alone already keeps the result right, the wait bounds the uploads in flight.
    pub fn fetch(&mut self, gpu: &Gpu, l: usize) -> Result<LayerWeights> {
        let s = self.slot(l)?;
        if let Some(index) = self.in_use[s].take() {
            gpu.device
                .poll(wgpu::PollType::Wait {
                    submission_index: Some(index),
                    timeout: None,
                })
                .map_err(|e| Error::Gpu {
                    kind: "poll",
                    context: format!("waiting for streaming slot {s} to be free"),
                    message: e.to_string(),
                })?;
        }
        let host = &self.host[l - self.first];
        host.zip(&self.slots[s])?.try_map(
            |_, (m, slot)| slot.load(gpu, m),
            |_, (v, slot)| {
                gpu.write(&slot.buf, 0, bytemuck::cast_slice(v))?;
                Ok(Tensor {
                    buf: slot.buf.clone(),
                    shape: vec![v.len()],
                })
            },
        )
    }

    /// Records that submission `index` reads layer `l`'s slot.
    pub fn submitted(&mut self, l: usize, index: Option<wgpu::SubmissionIndex>) {
        if let Ok(s) = self.slot(l) {
            self.in_use[s] = index;
        }
    }

    /// GPU bytes of the streamed layers' matrices (what each token reads through the slots).
    pub fn matrix_bytes(&self) -> u64 {
        self.host
            .iter()
            .flat_map(|h| h.matrices())
            .map(HostMatrix::bytes)
            .sum()
    }

    /// Host bytes the streamed layers take.
    pub fn host_bytes(&self) -> u64 {
        self.host
            .iter()
            .map(|h| {
                let vectors: u64 = h.vectors().iter().map(|v| 4 * v.len() as u64).sum();
                h.matrices().iter().map(|m| m.bytes()).sum::<u64>() + vectors
            })
            .sum()
    }

    /// GPU bytes of the slots.
    pub fn slot_bytes(&self) -> u64 {
        self.slots
            .iter()
            .map(|s| {
                let m: u64 = s
                    .matrices()
                    .iter()
                    .flat_map(|m| &m.shards)
                    .map(|(d, s)| d.size() + s.as_ref().map_or(0, |b| b.size()))
                    .sum();
                m + s.vectors().iter().map(|t| t.buf.size()).sum::<u64>()
            })
            .sum()
    }
}
