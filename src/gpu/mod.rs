//! The GPU layer: adapter choice, device features and limits, the VRAM ledger, buffers, pipelines
//! and command recording. It knows nothing about models.

pub mod buffer;
pub mod ledger;
pub mod memory;
pub mod record;
pub mod runtime_dir;
pub mod shaders;
pub mod texture;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use serde::Serialize;

pub use buffer::GpuBuffer;
pub use ledger::{BufferClass, Ledger, LedgerReport};
pub use record::{Bind, Kernel, Recorder};
pub use texture::GpuTexture;

use crate::error::{Error, Result};

/// How to open a device.
#[derive(Debug, Clone, Default)]
pub struct GpuOptions {
    /// Index into [`list_adapters`]; `None` picks by `WGPU_ADAPTER_NAME` or the best adapter.
    pub adapter: Option<usize>,
    /// The ledger's byte budget; `None` is unlimited.
    pub budget: Option<u64>,
    /// Do not request SHADER_F16 even where present (tests the f32-only paths).
    pub no_f16: bool,
    /// Do not request SUBGROUP even where present (tests the shared-memory paths).
    pub no_subgroups: bool,
    /// Keep the subgroup matvec's x in storage buffers, not uniform windows (as
    /// `WGLLM_SG_X=storage` does; to compare the two).
    pub storage_x: bool,
}

/// The optional features wgllm uses, as granted on the open device.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Capabilities {
    pub shader_f16: bool,
    pub subgroups: bool,
    pub timestamps: bool,
    pub subgroup_min_size: u32,
    pub subgroup_max_size: u32,
    /// WGSL's `dot4I8Packed` (language extension `packed_4x8_integer_dot_product`), as wgpu reports
    /// it; where the driver lacks a native instruction naga writes it out as byte extractions.
    pub packed_4x8_dot: bool,
}

/// One adapter as `wgllm devices` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct AdapterSummary {
    pub index: usize,
    pub name: String,
    pub backend: String,
    pub device_type: String,
    pub driver: String,
    pub driver_info: String,
    pub shader_f16: bool,
    pub subgroups: bool,
    pub timestamps: bool,
    pub max_buffer_size: u64,
    pub max_storage_buffer_binding_size: u64,
    pub max_compute_workgroup_storage_size: u32,
    pub max_compute_invocations_per_workgroup: u32,
    pub max_compute_workgroups_per_dimension: u32,
    pub subgroup_min_size: u32,
    pub subgroup_max_size: u32,
    /// Device-local memory (heap size) and the budget the driver grants us, where the native API
    /// says (Vulkan `VK_EXT_memory_budget`); `None` means unknown.
    pub memory: Option<memory::DeviceMemory>,
}

fn instance() -> wgpu::Instance {
    wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env())
}

fn adapters(instance: &wgpu::Instance) -> Vec<wgpu::Adapter> {
    pollster::block_on(instance.enumerate_adapters(wgpu::Backends::all()))
}

fn summarize(index: usize, a: &wgpu::Adapter) -> AdapterSummary {
    let info = a.get_info();
    let f = a.features();
    let l = a.limits();
    AdapterSummary {
        index,
        name: info.name.clone(),
        backend: format!("{:?}", info.backend),
        device_type: format!("{:?}", info.device_type),
        driver: info.driver.clone(),
        driver_info: info.driver_info.clone(),
        shader_f16: f.contains(wgpu::Features::SHADER_F16),
        subgroups: f.contains(wgpu::Features::SUBGROUP),
        timestamps: f.contains(wgpu::Features::TIMESTAMP_QUERY),
        max_buffer_size: l.max_buffer_size,
        max_storage_buffer_binding_size: l.max_storage_buffer_binding_size,
        max_compute_workgroup_storage_size: l.max_compute_workgroup_storage_size,
        max_compute_invocations_per_workgroup: l.max_compute_invocations_per_workgroup,
        max_compute_workgroups_per_dimension: l.max_compute_workgroups_per_dimension,
        subgroup_min_size: a.get_info().subgroup_min_size,
        subgroup_max_size: a.get_info().subgroup_max_size,
        memory: memory::query(a),
    }
}

/// Every adapter wgpu can see, in the order `--device N` indexes them.
pub fn list_adapters() -> Vec<AdapterSummary> {
    adapters(&instance())
        .iter()
        .enumerate()
        .map(|(i, a)| summarize(i, a))
        .collect()
}

fn type_rank(t: wgpu::DeviceType) -> u8 {
    match t {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Cpu => 3,
        wgpu::DeviceType::Other => 4,
    }
}

/// An open device with its queue, ledger and pipeline cache.
pub struct Gpu {
    pub adapter: wgpu::Adapter,
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    pub info: wgpu::AdapterInfo,
    pub caps: Capabilities,
    pub limits: wgpu::Limits,
    pub ledger: Ledger,
    kernels: Mutex<HashMap<String, Arc<Kernel>>>,
    /// Microseconds spent creating kernels (compiling pipelines), for `/metrics` and the
    /// server's warm-up: a drivers' compile can take longer than a decode step.
    kernel_compile_micros: std::sync::atomic::AtomicU64,
    /// The largest storage binding kernels may use: the device's, within its largest buffer.
    max_binding: u64,
    /// Where weight matrices go, once chosen (`WGLLM_WEIGHTS`, or
    /// [`crate::kernels::weights::weight_layout`]'s measurement).
    weight_layout: Mutex<Option<WeightLayout>>,
    /// The workgroup matvec's rows and threads per workgroup per weight format and shape class,
    /// once measured ([`crate::kernels::tune::matvec_shape_for`]).
    pub(crate) matvec_shapes:
        Mutex<HashMap<(crate::quant::WeightFormat, crate::kernels::tune::ShapeClass), (u32, u32)>>,
    /// The integer-dot matvec's quantised x, grown to the largest asked for
    /// ([`crate::kernels::matmul`]'s idot module).
    pub(crate) idot_scratch: Mutex<Option<GpuBuffer>>,
    /// How the workgroup matvec is forced to multiply on this device, if it is
    /// (`crate::kernels::matmul::idot::force_matvec`; else `WGLLM_MATVEC`).
    pub(crate) matvec_math: Mutex<Option<crate::kernels::matmul::idot::MatvecMath>>,
    /// Whether [`Gpu::alloc`] makes its buffers usable as uniform buffers too, so that the
    /// subgroup matvec can read x through uniform windows (`shaders/matvec_sg_tex_ux.wgsl`): on
    /// the devices that run that kernel, unless `WGLLM_SG_X=storage`.
    uniform_inputs: bool,
    /// How it was opened, so that [`Gpu::reopen`] opens the same adapter the same way.
    options: GpuOptions,
}

/// Where weight matrices live on a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WeightLayout {
    /// Storage buffers, which every kernel reads.
    Buffers,
    /// 2D textures, read with `textureLoad` by the subgroup matvec and the embedding lookup (CPU
    /// devices, where a texture fetch is a vectorised gather and a storage load is not).
    Textures,
}

impl WeightLayout {
    pub fn name(self) -> &'static str {
        match self {
            WeightLayout::Buffers => "buffers",
            WeightLayout::Textures => "textures",
        }
    }

    /// `WGLLM_WEIGHTS=buffers|textures`, if set to one of those.
    fn from_env() -> Option<WeightLayout> {
        match std::env::var("WGLLM_WEIGHTS").ok()?.as_str() {
            "buffers" => Some(WeightLayout::Buffers),
            "textures" => Some(WeightLayout::Textures),
            other => {
                log::warn!("WGLLM_WEIGHTS={other} ignored: use buffers or textures");
                None
            }
        }
    }
}

/// Bytes of the uniform window the subgroup matvec reads x through
/// (`shaders/common/matvec_sg_x_uniform.wgsl`'s arrays of 4096 vec4).
pub const UNIFORM_WINDOW: u64 = 64 << 10;

/// Whether the device's buffers should be usable as uniform windows of x: where the subgroup
/// matvec runs ([`crate::kernels::matmul::subgroup_matvec_ok`]) and uniform bindings take a whole
/// window, unless `storage_x` or `WGLLM_SG_X=storage` keeps x in storage buffers (to compare).
fn uniform_inputs_wanted(gpu: &Gpu) -> bool {
    let keep_storage = gpu.options.storage_x
        || match std::env::var("WGLLM_SG_X").ok().as_deref() {
            None | Some("uniform") => false,
            Some("storage") => true,
            Some(other) => {
                log::warn!("WGLLM_SG_X={other} ignored: use uniform or storage");
                false
            }
        };
    crate::kernels::matmul::subgroup_matvec_ok(gpu)
        && gpu.limits.max_uniform_buffer_binding_size >= UNIFORM_WINDOW
        && !keep_storage
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gpu")
            .field("adapter", &self.info.name)
            .field("caps", &self.caps)
            .finish()
    }
}

impl Gpu {
    /// Opens the chosen adapter with SHADER_F16, SUBGROUP and TIMESTAMP_QUERY where present and the
    /// adapter's maximum limits.
    /// The device's memory as the native API reports it now (heap sizes, and the process's
    /// budget where the driver has `VK_EXT_memory_budget`); `None` where it reports nothing.
    pub fn memory(&self) -> Option<memory::DeviceMemory> {
        memory::query(&self.adapter)
    }

    pub fn new(opts: &GpuOptions) -> Result<Gpu> {
        if let Some(n) = std::env::var(INJECT_OOM_ENV)
            .ok()
            .and_then(|v| v.parse::<u32>().ok())
        {
            inject_out_of_memory(n);
        }
        let inst = instance();
        let all = adapters(&inst);
        if all.is_empty() {
            return Err(Error::NoAdapter(
                ": install a Vulkan, Metal or DX12 driver (on Linux without a GPU: \
                 apt-get install mesa-vulkan-drivers libvulkan1)"
                    .into(),
            ));
        }
        let adapter = match (opts.adapter, std::env::var("WGPU_ADAPTER_NAME").ok()) {
            (Some(i), _) => all.get(i).cloned().ok_or(Error::AdapterIndex {
                index: i,
                count: all.len(),
            })?,
            (None, Some(name)) => {
                let want = name.to_lowercase();
                all.iter()
                    .find(|a| a.get_info().name.to_lowercase().contains(&want))
                    .cloned()
                    .ok_or_else(|| {
                        Error::NoAdapter(format!(" whose name contains WGPU_ADAPTER_NAME='{name}'"))
                    })?
            }
            (None, None) => all
                .iter()
                .min_by_key(|a| type_rank(a.get_info().device_type))
                .cloned()
                .expect("non-empty"),
        };
        let info = adapter.get_info();
        let avail = adapter.features();
        let mut want = wgpu::Features::empty();
        if avail.contains(wgpu::Features::SHADER_F16) && !opts.no_f16 {
            want |= wgpu::Features::SHADER_F16;
        }
        if avail.contains(wgpu::Features::SUBGROUP) && !opts.no_subgroups {
            want |= wgpu::Features::SUBGROUP;
        }
        if avail.contains(wgpu::Features::TIMESTAMP_QUERY) {
            want |= wgpu::Features::TIMESTAMP_QUERY;
        }
        let limits = adapter.limits();
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("wgllm"),
            required_features: want,
            required_limits: limits.clone(),
            experimental_features: wgpu::ExperimentalFeatures::disabled(),
            memory_hints: wgpu::MemoryHints::Performance,
            trace: wgpu::Trace::Off,
        }))
        .map_err(|e| Error::RequestDevice {
            adapter: info.name.clone(),
            reason: e.to_string(),
        })?;
        device.on_uncaptured_error(Arc::new(|e| log::error!("uncaptured wgpu error: {e}")));
        let caps = Capabilities {
            shader_f16: want.contains(wgpu::Features::SHADER_F16),
            subgroups: want.contains(wgpu::Features::SUBGROUP),
            timestamps: want.contains(wgpu::Features::TIMESTAMP_QUERY),
            subgroup_min_size: info.subgroup_min_size,
            subgroup_max_size: info.subgroup_max_size,
            packed_4x8_dot: inst
                .wgsl_language_features()
                .contains(wgpu::WgslLanguageFeatures::Packed4x8IntegerDotProduct),
        };
        log::info!(
            "opened {} ({:?}, {}) with {:?}",
            info.name,
            info.backend,
            info.driver,
            caps
        );
        let mut gpu = Gpu {
            uniform_inputs: false,
            max_binding: limits
                .max_storage_buffer_binding_size
                .min(limits.max_buffer_size),
            adapter,
            device,
            queue,
            info,
            caps,
            limits,
            ledger: Ledger::new(opts.budget),
            kernels: Mutex::new(HashMap::new()),
            kernel_compile_micros: std::sync::atomic::AtomicU64::new(0),
            weight_layout: Mutex::new(WeightLayout::from_env()),
            matvec_shapes: Mutex::new(HashMap::new()),
            idot_scratch: Mutex::new(None),
            matvec_math: Mutex::new(None),
            options: opts.clone(),
        };
        // Known once the device is open; no buffer exists yet.
        gpu.uniform_inputs = uniform_inputs_wanted(&gpu);
        Ok(gpu)
    }

    /// A new device on the same adapter, opened as this one was (features, limits, a fresh
    /// ledger with the same budget), for recovering after this one was lost. It keeps the weight
    /// layout and matvec shape this one chose, so that a model reloaded there computes what it
    /// computed here, bit for bit.
    pub fn reopen(&self) -> Result<Gpu> {
        let gpu = Gpu::new(&self.options)?;
        let layout = *self.weight_layout.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(layout) = layout {
            gpu.weight_layout_or(|| layout);
        }
        let shapes = self.matvec_shapes.lock().unwrap_or_else(|e| e.into_inner());
        *gpu.matvec_shapes.lock().unwrap_or_else(|e| e.into_inner()) = shapes.clone();
        Ok(gpu)
    }

    /// One line naming the device, for reports and BENCHMARKS.md.
    pub fn describe(&self) -> String {
        format!(
            "{} ({:?}, {:?}, driver {} {})",
            self.info.name,
            self.info.backend,
            self.info.device_type,
            self.info.driver,
            self.info.driver_info
        )
    }

    /// The largest storage binding (bytes) a kernel may use. Tensors larger than this are split.
    pub fn max_binding(&self) -> u64 {
        self.max_binding
    }

    /// The weight layout chosen so far, or `choose()`'s, which is kept. The choice is made under a
    /// lock, so threads sharing the device measure once (see
    /// [`crate::kernels::weights::weight_layout`]); `choose` must not ask for the layout itself.
    pub fn weight_layout_or(&self, choose: impl FnOnce() -> WeightLayout) -> WeightLayout {
        let mut chosen = self.weight_layout.lock().unwrap_or_else(|e| e.into_inner());
        *chosen.get_or_insert_with(choose)
    }

    /// Waits until the queue is idle.
    pub fn wait(&self) -> Result<()> {
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map(|_| ())
            .map_err(|e| Error::Gpu {
                kind: "poll",
                context: "waiting for the queue".into(),
                message: e.to_string(),
            })
    }
}

/// Error scopes still to report an injected out-of-memory error ([`inject_out_of_memory`]).
static INJECTED_OOM: AtomicU32 = AtomicU32::new(0);

/// The variable [`Gpu::new`] reads to inject out-of-memory errors into a whole process (the CLI's
/// test): its value is the count given to [`inject_out_of_memory`].
#[doc(hidden)]
pub const INJECT_OOM_ENV: &str = "WGLLM_TEST_INJECT_OOM";

/// Test hook: the next `scopes` error scopes (on any device of the process; every buffer and
/// texture creation, upload, pipeline creation and submission runs in one) report a driver
/// out-of-memory error, the same `wgpu::Error::OutOfMemory` value the driver's would be, after
/// running what they wrap. A real one cannot be produced on demand: lavapipe allocates host memory
/// lazily, and a buffer larger than the host's memory is past its limits before the driver runs.
#[doc(hidden)]
pub fn inject_out_of_memory(scopes: u32) {
    INJECTED_OOM.store(scopes, Ordering::SeqCst);
}

/// The injected error, if one is due.
fn injected_oom() -> Option<wgpu::Error> {
    INJECTED_OOM
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .ok()
        .map(|_| wgpu::Error::OutOfMemory {
            source: "injected by the test hook (inject_out_of_memory)".into(),
        })
}

/// Runs `f` inside a validation and an out-of-memory error scope, and turns what they caught into
/// [`Error::Gpu`] instead of letting wgpu panic or log.
pub(crate) fn scoped<T>(device: &wgpu::Device, context: &str, f: impl FnOnce() -> T) -> Result<T> {
    let oom = device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
    let val = device.push_error_scope(wgpu::ErrorFilter::Validation);
    let out = f();
    let v = pollster::block_on(val.pop());
    let o = pollster::block_on(oom.pop()).or_else(injected_oom);
    if let Some(e) = v {
        return Err(Error::Gpu {
            kind: "validation",
            context: context.into(),
            message: e.to_string(),
        });
    }
    if let Some(e) = o {
        return Err(Error::Gpu {
            kind: "out-of-memory",
            context: context.into(),
            message: e.to_string(),
        });
    }
    Ok(out)
}
