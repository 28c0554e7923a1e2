//! Kernels (compute pipelines with explicit layouts) and the recorder that batches their dispatches
//! into one command buffer.
//!
//! Binding convention for every kernel: read-only storage inputs first, then read-write outputs,
//! then one uniform block of parameters as the last binding. Parameters of all dispatches of one
//! submission share one uniform buffer, each at its own aligned offset.

use std::sync::Arc;

use super::buffer::GpuBuffer;
use super::ledger::BufferClass;
use super::texture::GpuTexture;
use super::{scoped, shaders, Gpu};
use crate::error::{Error, Result};

/// The kind of one binding of a kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bind {
    /// `var<storage, read>`
    Input,
    /// `var<storage, read_write>`
    Output,
    /// `texture_2d<u32>` (read with `textureLoad`)
    Texture,
    /// `var<uniform>`: a buffer window of at most the device's uniform binding size, at an offset
    /// aligned as uniform bindings need (the buffer made with `UNIFORM` usage: [`Gpu::alloc`] on
    /// a device with [`Gpu::uniform_inputs`]).
    Uniform,
}

/// A compute pipeline and its bind-group layout.
#[derive(Debug)]
pub struct Kernel {
    pub name: String,
    pipeline: wgpu::ComputePipeline,
    layout: wgpu::BindGroupLayout,
    binds: Vec<Bind>,
    params_size: u64,
}

impl Gpu {
    /// The kernel `entry` of `shaders/<shader>.wgsl`, created once and cached. `binds` lists the
    /// storage bindings (0..n); the parameter block of `params_size` bytes is binding n.
    /// `constants` sets WGSL `override` values.
    pub fn kernel(
        &self,
        shader: &str,
        entry: &str,
        binds: &[Bind],
        params_size: u64,
        constants: &[(&str, f64)],
    ) -> Result<Arc<Kernel>> {
        let mut key = format!("{shader}::{entry}");
        for (k, v) in constants {
            key += &format!(",{k}={v}");
        }
        if let Some(k) = self
            .kernels
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
        {
            return Ok(k.clone());
        }
        let started = std::time::Instant::now();
        let src = shaders::source(shader)?;
        let mut entries: Vec<wgpu::BindGroupLayoutEntry> = binds
            .iter()
            .enumerate()
            .map(|(i, b)| wgpu::BindGroupLayoutEntry {
                binding: i as u32,
                visibility: wgpu::ShaderStages::COMPUTE,
                ty: match b {
                    Bind::Texture => wgpu::BindingType::Texture {
                        sample_type: wgpu::TextureSampleType::Uint,
                        view_dimension: wgpu::TextureViewDimension::D2,
                        multisampled: false,
                    },
                    Bind::Uniform => wgpu::BindingType::Buffer {
                        ty: wgpu::BufferBindingType::Uniform,
                        has_dynamic_offset: false,
                        min_binding_size: None,
                    },
                    _ => wgpu::BindingType::Buffer {
                        ty: wgpu::BufferBindingType::Storage {
                            read_only: *b == Bind::Input,
                        },
                        has_dynamic_offset: false,
                        min_binding_size: None,
                    },
                },
                count: None,
            })
            .collect();
        entries.push(wgpu::BindGroupLayoutEntry {
            binding: binds.len() as u32,
            visibility: wgpu::ShaderStages::COMPUTE,
            ty: wgpu::BindingType::Buffer {
                ty: wgpu::BufferBindingType::Uniform,
                has_dynamic_offset: false,
                min_binding_size: None,
            },
            count: None,
        });
        let kernel = scoped(&self.device, &format!("creating kernel {key}"), || {
            let module = shaders::create_module(&self.device, shader, src);
            let layout = self
                .device
                .create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
                    label: Some(&key),
                    entries: &entries,
                });
            let pl = self
                .device
                .create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
                    label: Some(&key),
                    bind_group_layouts: &[Some(&layout)],
                    immediate_size: 0,
                });
            let pipeline = self
                .device
                .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                    label: Some(&key),
                    layout: Some(&pl),
                    module: &module,
                    entry_point: Some(entry),
                    compilation_options: wgpu::PipelineCompilationOptions {
                        constants,
                        zero_initialize_workgroup_memory: false,
                    },
                    cache: None,
                });
            Kernel {
                name: key.clone(),
                pipeline,
                layout,
                binds: binds.to_vec(),
                params_size,
            }
        })?;
        let kernel = Arc::new(kernel);
        self.kernel_compile_micros.fetch_add(
            started.elapsed().as_micros() as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
        self.kernels
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, kernel.clone());
        Ok(kernel)
    }

    /// Kernels created so far on this device (pipelines compiled), and the seconds it took.
    pub fn kernels_compiled(&self) -> (usize, f64) {
        let n = self.kernels.lock().unwrap_or_else(|e| e.into_inner()).len();
        let micros = self
            .kernel_compile_micros
            .load(std::sync::atomic::Ordering::Relaxed);
        (n, micros as f64 / 1e6)
    }

    /// The keys of the kernels created so far (shader, entry and override constants), sorted.
    pub fn kernel_keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = self
            .kernels
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .cloned()
            .collect();
        keys.sort();
        keys
    }

    /// Workgroup counts for `n` workgroups, folded into two dimensions past the per-dimension limit.
    /// Shaders compute the flat index as `wid.x + wid.y * nwg.x` and skip indices past `n`.
    pub fn groups(&self, n: u32) -> [u32; 3] {
        let max = self.limits.max_compute_workgroups_per_dimension.max(1);
        if n <= max {
            [n.max(1), 1, 1]
        } else {
            let y = n.div_ceil(max);
            [n.div_ceil(y), y, 1]
        }
    }

    /// Starts recording dispatches.
    pub fn recorder(&self) -> Recorder<'_> {
        Recorder {
            gpu: self,
            items: Vec::new(),
            copies: Vec::new(),
            params: Vec::new(),
        }
    }
}

/// What one kernel binding binds: a byte range of a buffer, or a whole texture.
#[derive(Debug, Clone)]
pub struct View {
    resource: Resource,
    label: Arc<str>,
}

#[derive(Debug, Clone)]
enum Resource {
    Buffer {
        buffer: wgpu::Buffer,
        offset: u64,
        size: u64,
    },
    Texture(wgpu::TextureView),
}

impl GpuBuffer {
    /// The whole buffer as a binding.
    pub fn view(&self) -> View {
        self.range(0, self.size())
    }
    /// Bytes `offset..offset+size` as a binding.
    pub fn range(&self, offset: u64, size: u64) -> View {
        View {
            resource: Resource::Buffer {
                buffer: self.buffer.clone(),
                offset,
                size,
            },
            label: self.label.clone(),
        }
    }
}

impl View {
    /// `len` bytes of this view's buffer from the view's start, as a uniform binding: where the
    /// buffer can be bound as one, the start is aligned as uniform bindings need, and the buffer
    /// holds `len` bytes from there. `None` otherwise (and for textures).
    pub fn uniform_window(&self, gpu: &Gpu, len: u64) -> Option<View> {
        let Resource::Buffer { buffer, offset, .. } = &self.resource else {
            return None;
        };
        let align = gpu.limits.min_uniform_buffer_offset_alignment as u64;
        let ok = buffer.usage().contains(wgpu::BufferUsages::UNIFORM)
            && offset.is_multiple_of(align)
            && len <= gpu.limits.max_uniform_buffer_binding_size
            && buffer.size().saturating_sub(*offset) >= len;
        ok.then(|| View {
            resource: Resource::Buffer {
                buffer: buffer.clone(),
                offset: *offset,
                size: len,
            },
            label: self.label.clone(),
        })
    }
}

impl GpuTexture {
    /// The texture as a binding.
    pub fn bind(&self) -> View {
        View {
            resource: Resource::Texture(self.view.clone()),
            label: self.label.clone(),
        }
    }
}

struct Pending {
    kernel: Arc<Kernel>,
    label: String,
    views: Vec<View>,
    params_offset: u64,
    groups: [u32; 3],
}

/// A buffer-to-buffer copy between dispatches.
struct CopyOp {
    /// Dispatches recorded before it.
    after: usize,
    src: wgpu::Buffer,
    src_offset: u64,
    dst: wgpu::Buffer,
    dst_offset: u64,
    size: u64,
}

/// Records dispatches (and copies between them) and submits them as one command buffer.
pub struct Recorder<'g> {
    gpu: &'g Gpu,
    items: Vec<Pending>,
    copies: Vec<CopyOp>,
    params: Vec<u8>,
}

/// GPU time of one dispatch, from timestamp queries.
#[derive(Debug, Clone)]
pub struct DispatchTime {
    pub label: String,
    pub kernel: String,
    pub nanos: f64,
}

impl<'g> Recorder<'g> {
    /// The device this recorder records for.
    pub fn gpu(&self) -> &'g Gpu {
        self.gpu
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Adds one dispatch. Everything checkable is checked here, before anything reaches the GPU.
    pub fn dispatch(
        &mut self,
        kernel: &Arc<Kernel>,
        label: &str,
        views: &[View],
        params: &[u8],
        groups: [u32; 3],
    ) -> Result<()> {
        let gpu = self.gpu;
        if views.len() != kernel.binds.len() {
            return Err(Error::invalid(
                &kernel.name,
                format!(
                    "{} bindings given, {} expected",
                    views.len(),
                    kernel.binds.len()
                ),
            ));
        }
        if params.len() as u64 != kernel.params_size {
            return Err(Error::invalid(
                &kernel.name,
                format!(
                    "params of {} bytes, {} expected",
                    params.len(),
                    kernel.params_size
                ),
            ));
        }
        for (v, bind) in views.iter().zip(&kernel.binds) {
            let (align, max) = match bind {
                Bind::Uniform => (
                    gpu.limits.min_uniform_buffer_offset_alignment as u64,
                    gpu.limits.max_uniform_buffer_binding_size,
                ),
                _ => (
                    gpu.limits.min_storage_buffer_offset_alignment as u64,
                    gpu.limits.max_storage_buffer_binding_size,
                ),
            };
            let (offset, size, buffer) = match (&v.resource, bind) {
                (Resource::Texture(_), Bind::Texture) => continue,
                (
                    Resource::Buffer {
                        buffer,
                        offset,
                        size,
                    },
                    Bind::Input | Bind::Output | Bind::Uniform,
                ) => (*offset, *size, buffer),
                _ => {
                    return Err(Error::invalid(
                        &kernel.name,
                        format!(
                            "'{}' is not the kind of resource its binding takes ({bind:?})",
                            v.label
                        ),
                    ))
                }
            };
            if *bind == Bind::Uniform && !buffer.usage().contains(wgpu::BufferUsages::UNIFORM) {
                return Err(Error::invalid(
                    &kernel.name,
                    format!(
                        "'{}' is bound as a uniform buffer but was not made as one",
                        v.label
                    ),
                ));
            }
            if size == 0 || size > max || !offset.is_multiple_of(align) {
                return Err(Error::invalid(
                    &kernel.name,
                    format!(
                        "binding of '{}' at {}+{} is empty, unaligned or larger than one binding",
                        v.label, offset, size
                    ),
                ));
            }
            if offset + size > buffer.size() {
                return Err(Error::invalid(
                    &kernel.name,
                    format!("binding range past the end of '{}'", v.label),
                ));
            }
        }
        // WebGPU refuses a buffer bound read-only and read-write in one dispatch (a usage
        // conflict that would surface as a device error later): say which, now.
        let buffer_of = |v: &View| match &v.resource {
            Resource::Buffer { buffer, .. } => Some(buffer.clone()),
            Resource::Texture(_) => None,
        };
        let bound = views.iter().zip(&kernel.binds);
        for (out, _) in bound.clone().filter(|(_, b)| **b == Bind::Output) {
            let Some(ob) = buffer_of(out) else { continue };
            if let Some((inp, _)) = bound.clone().find(|(v, b)| {
                matches!(**b, Bind::Input | Bind::Uniform) && buffer_of(v).as_ref() == Some(&ob)
            }) {
                return Err(Error::invalid(
                    &kernel.name,
                    format!(
                        "'{}' is bound as an output and '{}' as an input of the same buffer",
                        out.label, inp.label
                    ),
                ));
            }
        }
        let maxg = gpu.limits.max_compute_workgroups_per_dimension;
        if groups.iter().any(|&g| g > maxg) {
            return Err(Error::invalid(
                &kernel.name,
                format!("workgroup count {groups:?} exceeds {maxg}"),
            ));
        }
        let slot = gpu.limits.min_uniform_buffer_offset_alignment as usize;
        let params_offset = self.params.len().div_ceil(slot) * slot;
        self.params.resize(params_offset, 0);
        self.params.extend_from_slice(params);
        self.items.push(Pending {
            kernel: kernel.clone(),
            label: label.to_string(),
            views: views.to_vec(),
            params_offset: params_offset as u64,
            groups,
        });
        Ok(())
    }

    /// Copies `size` bytes (a multiple of 4, at 4-byte aligned offsets) between buffers, ordered
    /// after the dispatches recorded so far and before the ones that follow.
    pub fn copy(
        &mut self,
        src: &GpuBuffer,
        src_offset: u64,
        dst: &GpuBuffer,
        dst_offset: u64,
        size: u64,
    ) -> Result<()> {
        if !size.is_multiple_of(4) || !src_offset.is_multiple_of(4) || !dst_offset.is_multiple_of(4)
        {
            return Err(Error::invalid(
                "copy",
                format!(
                    "copy of {size} bytes at {src_offset} -> {dst_offset} is not 4-byte aligned"
                ),
            ));
        }
        if src_offset + size > src.size() || dst_offset + size > dst.size() {
            return Err(Error::invalid(
                "copy",
                format!(
                    "copy of {size} bytes from '{}' to '{}' runs past a buffer's end",
                    src.label, dst.label
                ),
            ));
        }
        if size > 0 {
            self.copies.push(CopyOp {
                after: self.items.len(),
                src: src.buffer.clone(),
                src_offset,
                dst: dst.buffer.clone(),
                dst_offset,
                size,
            });
        }
        Ok(())
    }

    /// Submits all dispatches in one compute pass and waits for them.
    pub fn submit(self) -> Result<()> {
        self.run(false, true).map(|_| ())
    }

    /// Submits like [`Recorder::submit`] but returns without waiting, so the CPU can prepare the
    /// next work while the GPU runs this. Queue order keeps later submissions (and uploads) after
    /// it; the buffers it uses (its kernel-params block included) stay alive in wgpu until the GPU
    /// is done with them, even when their handles are dropped now. Returns the submission, to wait
    /// for with `PollType::Wait` (`None` when nothing was recorded).
    pub fn submit_no_wait(self) -> Result<Option<wgpu::SubmissionIndex>> {
        self.run(false, false).map(|(_, index)| index)
    }

    /// Submits with a timestamp pair around every dispatch and returns the GPU time of each.
    /// Needs TIMESTAMP_QUERY.
    pub fn submit_timed(self) -> Result<Vec<DispatchTime>> {
        if !self.gpu.caps.timestamps {
            return Err(Error::MissingFeature {
                feature: "TIMESTAMP_QUERY",
                needed_by: "timed submission".into(),
            });
        }
        self.run(true, true).map(|(times, _)| times)
    }

    /// Records and submits; with `wait`, waits for completion and returns the dispatch times of a
    /// `timed` run (which needs the wait to read them back).
    fn run(
        self,
        timed: bool,
        wait: bool,
    ) -> Result<(Vec<DispatchTime>, Option<wgpu::SubmissionIndex>)> {
        let gpu = self.gpu;
        if self.items.is_empty() && self.copies.is_empty() {
            return Ok((Vec::new(), None));
        }
        let params = gpu.alloc_with_usage(
            "kernel-params",
            BufferClass::Activations,
            self.params.len() as u64,
            wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
            false,
        )?;
        gpu.queue.write_buffer(&params.buffer, 0, &self.params);
        // Timestamp queries: two per dispatch, in query sets of at most 4096 (wgpu's limit).
        const PER_SET: usize = 2048;
        let mut sets = Vec::new();
        let mut resolve = None;
        if timed {
            for (i, chunk) in self.items.chunks(PER_SET).enumerate() {
                sets.push(gpu.device.create_query_set(&wgpu::QuerySetDescriptor {
                    label: Some(&format!("timestamps.{i}")),
                    ty: wgpu::QueryType::Timestamp,
                    count: (chunk.len() * 2) as u32,
                }));
            }
            resolve = Some(gpu.alloc_with_usage(
                "timestamps.resolve",
                BufferClass::Staging,
                (self.items.len() * 16) as u64,
                wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
                false,
            )?);
        }
        let context = format!(
            "submitting {} dispatches (first: {})",
            self.items.len(),
            self.items.first().map_or("copy", |p| p.label.as_str())
        );
        let index = scoped(&gpu.device, &context, || {
            let bind_groups: Vec<wgpu::BindGroup> = self
                .items
                .iter()
                .map(|p| {
                    let mut entries: Vec<wgpu::BindGroupEntry> = p
                        .views
                        .iter()
                        .enumerate()
                        .map(|(i, v)| wgpu::BindGroupEntry {
                            binding: i as u32,
                            resource: match &v.resource {
                                Resource::Buffer {
                                    buffer,
                                    offset,
                                    size,
                                } => wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                                    buffer,
                                    offset: *offset,
                                    size: std::num::NonZeroU64::new(*size),
                                }),
                                Resource::Texture(t) => wgpu::BindingResource::TextureView(t),
                            },
                        })
                        .collect();
                    entries.push(wgpu::BindGroupEntry {
                        binding: p.views.len() as u32,
                        resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                            buffer: &params.buffer,
                            offset: p.params_offset,
                            size: std::num::NonZeroU64::new(p.kernel.params_size),
                        }),
                    });
                    gpu.device.create_bind_group(&wgpu::BindGroupDescriptor {
                        label: Some(&p.label),
                        layout: &p.kernel.layout,
                        entries: &entries,
                    })
                })
                .collect();
            let mut enc = gpu
                .device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                    label: Some("wgllm.record"),
                });
            let copies_at = |enc: &mut wgpu::CommandEncoder, i: usize| {
                for c in self.copies.iter().filter(|c| c.after == i) {
                    enc.copy_buffer_to_buffer(&c.src, c.src_offset, &c.dst, c.dst_offset, c.size);
                }
            };
            if timed {
                for (i, (p, bg)) in self.items.iter().zip(&bind_groups).enumerate() {
                    copies_at(&mut enc, i);
                    let set = &sets[i / PER_SET];
                    let q = ((i % PER_SET) * 2) as u32;
                    let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                        label: Some(&p.label),
                        timestamp_writes: Some(wgpu::ComputePassTimestampWrites {
                            query_set: set,
                            beginning_of_pass_write_index: Some(q),
                            end_of_pass_write_index: Some(q + 1),
                        }),
                    });
                    pass.set_pipeline(&p.kernel.pipeline);
                    pass.set_bind_group(0, bg, &[]);
                    pass.dispatch_workgroups(p.groups[0], p.groups[1], p.groups[2]);
                }
                copies_at(&mut enc, self.items.len());
                let resolve = resolve.as_ref().expect("timed");
                for (i, set) in sets.iter().enumerate() {
                    let n = (self.items.len() - i * PER_SET).min(PER_SET) as u32 * 2;
                    enc.resolve_query_set(set, 0..n, &resolve.buffer, (i * PER_SET * 16) as u64);
                }
            } else {
                // One compute pass for each run of dispatches between copies.
                let mut i = 0;
                while i <= self.items.len() {
                    copies_at(&mut enc, i);
                    let end = self
                        .copies
                        .iter()
                        .map(|c| c.after)
                        .filter(|&a| a > i)
                        .min()
                        .unwrap_or(self.items.len());
                    if end > i {
                        let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                            label: Some("wgllm.pass"),
                            timestamp_writes: None,
                        });
                        for (p, bg) in self.items[i..end].iter().zip(&bind_groups[i..end]) {
                            pass.set_pipeline(&p.kernel.pipeline);
                            pass.set_bind_group(0, bg, &[]);
                            pass.dispatch_workgroups(p.groups[0], p.groups[1], p.groups[2]);
                        }
                    }
                    i = end.max(i + 1);
                }
            }
            gpu.queue.submit([enc.finish()])
        })?;
        if !wait {
            return Ok((Vec::new(), Some(index)));
        }
        gpu.wait()?;
        let Some(resolve) = resolve else {
            return Ok((Vec::new(), None));
        };
        let raw = gpu.read_bytes(&resolve, 0, resolve.size())?;
        let ticks: Vec<u64> = bytemuck::pod_collect_to_vec(&raw);
        let period = gpu.queue.get_timestamp_period() as f64;
        let times = self
            .items
            .iter()
            .enumerate()
            .map(|(i, p)| DispatchTime {
                label: p.label.clone(),
                kernel: p.kernel.name.clone(),
                nanos: ticks[2 * i + 1].saturating_sub(ticks[2 * i]) as f64 * period,
            })
            .collect();
        Ok((times, None))
    }
}
