//! The activation buffers of a memory plan, allocated: each model's `RunState` takes its roles
//! from here, so that the ledger books exactly what `wgllm plan` planned (one allocation per
//! shared buffer, every role a prefix view of its buffer).

use crate::error::{Error, Result};
use crate::gpu::{BufferClass, Gpu, GpuBuffer};
use crate::kernels::Tensor;
use crate::plan::ActivationPlan;

/// The allocated buffers of an [`ActivationPlan`].
pub struct PlannedActivations {
    plan: ActivationPlan,
    buffers: Vec<GpuBuffer>,
}

impl PlannedActivations {
    /// Allocates every buffer of `plan` as activations, labelled `{prefix}.{buffer label}`.
    pub fn allocate(gpu: &Gpu, plan: ActivationPlan, prefix: &str) -> Result<PlannedActivations> {
        let buffers = plan
            .buffers
            .iter()
            .map(|b| {
                gpu.alloc(
                    &format!("{prefix}.{}", b.label),
                    BufferClass::Activations,
                    b.bytes,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(PlannedActivations { plan, buffers })
    }

    /// Role `name` as a tensor of `shape`, a prefix view of the buffer the plan gave it.
    pub fn role(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let i =
            *self.plan.role_to_buffer.get(name).ok_or_else(|| {
                Error::invalid("activation plan", format!("no buffer for '{name}'"))
            })?;
        Tensor {
            buf: self.buffers[i].clone(),
            shape: vec![self.buffers[i].size() as usize / 4],
        }
        .view(shape)
    }
}
