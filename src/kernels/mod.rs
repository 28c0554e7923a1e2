//! One module per WGSL kernel family: its parameter block (mirroring the WGSL struct), the dispatch
//! arithmetic, shape checks before anything is recorded, and `reference`, the CPU version the tests
//! and `wgllm selftest` compare against.

pub mod activation;
pub mod attention;
pub mod elementwise;
pub mod embedding;
pub mod matmul;
pub mod norm;
pub mod rope;
pub mod softmax;
pub mod tune;
pub mod weights;

pub use weights::WeightMatrix;

/// What the memory planner needs to know of `gpu` ([`crate::plan::DeviceTraits`]): its limits, its
/// weight layout (measured once per device) and which kernel variants it runs.
pub fn device_traits(gpu: &Gpu) -> crate::plan::DeviceTraits {
    let w = weights::weight_storage(gpu);
    crate::plan::DeviceTraits {
        max_binding: w.max_binding,
        weight_layout: w.layout,
        max_texture_dim: w.max_texture_dim,
        subgroup_matvec: matmul::subgroup_matvec_ok(gpu),
        single_token_folds: matmul::single_token_folds(gpu),
        param_align: gpu.limits.min_uniform_buffer_offset_alignment as u64,
    }
}

use crate::error::{Error, Result};
use crate::gpu::{BufferClass, Gpu, GpuBuffer};

/// An f32 tensor on the GPU (row-major). Activations, KV caches and norms' weights are f32.
#[derive(Debug, Clone)]
pub struct Tensor {
    pub buf: GpuBuffer,
    pub shape: Vec<usize>,
}

impl Tensor {
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The same buffer seen with another shape, e.g. the first `m` rows of a buffer sized for a
    /// whole prefill chunk, or `[m, heads * head_dim]` as `[m, heads, head_dim]`.
    pub fn view(&self, shape: &[usize]) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        if n as u64 * 4 > self.buf.size() {
            return Err(Error::shape(
                format!("view of {}", self.buf.label),
                format!("at most {} values", self.buf.size() / 4),
                format!("{shape:?}"),
            ));
        }
        Ok(Tensor {
            buf: self.buf.clone(),
            shape: shape.to_vec(),
        })
    }

    /// Checks the shape before a dispatch; `op` names the caller in the error.
    pub fn expect(&self, op: &str, shape: &[usize]) -> Result<()> {
        if self.shape != shape {
            return Err(Error::shape(
                format!("{op} ({})", self.buf.label),
                format!("{shape:?}"),
                format!("{:?}", self.shape),
            ));
        }
        Ok(())
    }
}

impl Gpu {
    /// A zero-filled f32 tensor.
    pub fn tensor(&self, label: &str, class: BufferClass, shape: &[usize]) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        Ok(Tensor {
            buf: self.alloc(label, class, n as u64 * 4)?,
            shape: shape.to_vec(),
        })
    }

    /// An f32 tensor holding `data`.
    pub fn tensor_from(
        &self,
        label: &str,
        class: BufferClass,
        shape: &[usize],
        data: &[f32],
    ) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        if n != data.len() {
            return Err(Error::shape(
                format!("tensor {label}"),
                format!("{n} values for {shape:?}"),
                format!("{}", data.len()),
            ));
        }
        Ok(Tensor {
            buf: self.upload_f32(label, class, data)?,
            shape: shape.to_vec(),
        })
    }

    /// Reads a whole tensor back.
    pub fn read(&self, t: &Tensor) -> Result<Vec<f32>> {
        self.read_f32(&t.buf, 0, t.len())
    }
}

/// Workgroup size of the elementwise shaders (`elementwise.wgsl`, `activation.wgsl`).
const ELEMENTWISE_WG: u32 = 256;

/// One dispatch of an elementwise kernel over `n` values, one invocation each: bindings
/// `inputs[0]`, `inputs[1]` (read), `out` (read-write) and a 16-byte parameter block.
pub(crate) fn dispatch_elementwise(
    rec: &mut crate::gpu::Recorder,
    shader: &str,
    entry: &str,
    inputs: [&GpuBuffer; 2],
    out: &Tensor,
    n: u32,
    params: &[u8],
) -> Result<()> {
    use crate::gpu::Bind;
    let gpu = rec.gpu();
    let k = gpu.kernel(
        shader,
        entry,
        &[Bind::Input, Bind::Input, Bind::Output],
        16,
        &[],
    )?;
    let groups = gpu.groups(n.div_ceil(ELEMENTWISE_WG));
    rec.dispatch(
        &k,
        &format!("{entry}.{}", out.buf.label),
        &[inputs[0].view(), inputs[1].view(), out.buf.view()],
        params,
        groups,
    )
}

/// Bytes of a `#[repr(C)]` parameter block.
pub(crate) fn params<T: bytemuck::Pod>(p: &T) -> &[u8] {
    bytemuck::bytes_of(p)
}
