//! Weight streaming in the plan, and what a run may use.
//!
//! With `--resident-layers`, layers `r..` stay in host memory and run from a pool of
//! [`STREAM_SLOTS`] GPU layer slots (`model::stream`): the plan's parameters lose those layers and
//! gain the slots, each as large, role by role, as the largest streamed tensor of that role (the
//! slots are buffers whatever the device's weight layout, so a streamed layer's projections are
//! never stacked). Staging does not change: a streamed upload books one staging chunk at a time,
//! as the load does. Kernel params do: the embedding and the resident layers go in one
//! submission, each streamed layer in its own (the last with the head), and only one
//! submission's params are booked at a time.
//!
//! Two limits can apply to a run ([`Limits`]): the ledger's budget (`--budget`), which caps the
//! buffers wgllm books and nothing else, so the plan's overhead estimate must not count against
//! it; and the budget the driver reports for the process (Vulkan `VK_EXT_memory_budget`), which
//! covers everything the process holds on the device, overhead included.

use std::collections::BTreeMap;

use serde::Serialize;

use super::{overhead, MemoryPlan, STREAM_SLOTS};
use crate::error::Result;
use crate::kernels::weights::WeightStorage;

/// What a run may use on the device.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Limits {
    /// The ledger's budget for wgllm's own buffers (`--budget`).
    pub ledger: Option<u64>,
    /// What the driver says the process may use in all (`VK_EXT_memory_budget`), where it says.
    pub device: Option<u64>,
}

/// Weight bytes of each layer, as the streaming pool needs them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LayerBytes {
    /// Each layer's bytes resident on the device (its weight layout).
    pub resident: Vec<u64>,
    /// Each layer's bytes by role (tensor name within the layer) in buffers, the slots' layout.
    pub roles: Vec<BTreeMap<String, u64>>,
}

impl LayerBytes {
    /// Bytes of one slot for layers `first..`: per role, the largest of those layers' tensors.
    pub fn slot_bytes(&self, first: usize) -> u64 {
        let mut max: BTreeMap<&str, u64> = BTreeMap::new();
        for layer in self.roles.iter().skip(first) {
            for (role, &b) in layer {
                let m = max.entry(role).or_default();
                *m = (*m).max(b);
            }
        }
        max.values().sum()
    }
}

/// [`LayerBytes`] of a GGUF file: tensors `blk.<i>.<role>`, sized as [`super::gguf_parameter_bytes`]
/// sizes them (`storage` for resident layers, buffers at the same binding limit for slots).
pub fn gguf_layer_bytes(
    g: &crate::loader::gguf::Gguf,
    storage: WeightStorage,
) -> Result<LayerBytes> {
    let buffers = WeightStorage::buffers(storage.max_binding);
    let mut out = LayerBytes {
        resident: Vec::new(),
        roles: Vec::new(),
    };
    for t in g.tensors() {
        let Some(rest) = t.name.strip_prefix("blk.") else {
            continue;
        };
        let Some((layer, role)) = rest.split_once('.') else {
            continue;
        };
        let Ok(layer) = layer.parse::<usize>() else {
            continue;
        };
        // Layer indices come from the file: grow only as far as tensors that exist name.
        if layer >= out.resident.len() {
            out.resident.resize(layer + 1, 0);
            out.roles.resize(layer + 1, BTreeMap::new());
        }
        out.resident[layer] += super::gguf_tensor_bytes(t, storage)?.0;
        *out.roles[layer].entry(role.to_string()).or_default() +=
            super::gguf_tensor_bytes(t, buffers)?.0;
    }
    Ok(out)
}

impl MemoryPlan {
    /// [`LayerBytes`] of the plan's own config: every layer alike, `layer_weight_bytes` each; in
    /// a K-quant mix, whose layers differ, each layer's own tensors by role.
    pub fn uniform_layer_bytes(&self) -> LayerBytes {
        let l = self.cfg.n_layers;
        if self.options.precision.is_mix() {
            let mut out = LayerBytes {
                resident: vec![0; l],
                roles: vec![BTreeMap::new(); l],
            };
            for t in crate::model::params::typed_tensors(&self.cfg, self.options.precision) {
                let Some(i) = t.layer.filter(|&i| i < l) else {
                    continue;
                };
                out.resident[i] += t.bytes();
                *out.roles[i].entry(t.name).or_default() += t.bytes();
            }
            return out;
        }
        LayerBytes {
            resident: vec![self.layer_weight_bytes; l],
            roles: vec![BTreeMap::from([("layer".to_string(), self.layer_weight_bytes)]); l],
        }
    }

    /// The plan of the same run with only layers `..resident` on the device and the rest
    /// streamed (`layers` sizes them); unchanged when `resident` covers every layer.
    pub fn with_streaming(&self, resident: usize, layers: &LayerBytes) -> MemoryPlan {
        let mut p = self.clone();
        let n = layers.resident.len();
        if resident >= n {
            return p;
        }
        let streamed: u64 = layers.resident[resident..].iter().sum();
        let slots = (STREAM_SLOTS).min((n - resident) as u64);
        let rest = p.buffers_bytes() - p.parameters_bytes;
        p.parameters_bytes = p
            .parameters_bytes
            .saturating_sub(streamed)
            .saturating_add(slots.saturating_mul(layers.slot_bytes(resident)));
        p.resident_layers = Some(resident);
        // One submission holds the embedding and the resident layers, then each streamed layer
        // goes alone, the last with the head; one submission's params are booked at a time.
        let (sub, r, s) = (p.submissions, resident as u64, (n - resident) as u64);
        let first = sub.prologue.then(sub.layer.times(r));
        let last = sub.streamed_layer.then(sub.epilogue);
        let params = first.uniform_bytes().max(last.uniform_bytes());
        let rest = rest - p.kernel_params_bytes + params;
        p.kernel_params_bytes = params;
        p.dispatches_per_chunk = first
            .then(sub.streamed_layer.times(s))
            .then(sub.epilogue)
            .dispatches;
        p.overhead_bytes = overhead(rest + p.parameters_bytes);
        p.total_bytes = rest + p.parameters_bytes + p.overhead_bytes;
        p
    }

    /// Whether the plan fits `limits`: its buffers within the ledger's budget, and its total
    /// (with the overhead) within the device's.
    pub fn within(&self, limits: &Limits) -> bool {
        limits.ledger.is_none_or(|b| self.buffers_bytes() <= b)
            && limits.device.is_none_or(|b| self.total_bytes <= b)
    }

    /// `--resident-layers auto`: `None` (every layer resident) when the plan fits `limits`,
    /// else the most resident layers with which it does, else `Some(0)`: every layer streamed,
    /// the least the device can hold, tried rather than refused.
    pub fn auto_resident_layers(&self, limits: &Limits, layers: &LayerBytes) -> Option<usize> {
        if self.within(limits) {
            return None;
        }
        let n = layers.resident.len();
        // Fewer resident layers never take more memory (a slot is no larger than the layers it
        // replaces), so the last that fits is found from the top.
        Some(
            (0..n)
                .rev()
                .find(|&r| self.with_streaming(r, layers).within(limits))
                .unwrap_or(0),
        )
    }
}
