//! `wgllm devices`: every adapter wgpu finds, with what wgllm uses of it.

use anyhow::Result;
use wgllm::gpu::list_adapters;

use super::yes;

#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    #[arg(long)]
    json: bool,
}

pub(crate) fn run(Args { json }: Args) -> Result<()> {
    let list = list_adapters();
    if json {
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(());
    }
    if list.is_empty() {
        println!("no GPU adapters found (on Linux without a GPU: apt-get install mesa-vulkan-drivers libvulkan1)");
    }
    for a in list {
        println!(
            "[{}] {} ({}, {})",
            a.index, a.name, a.backend, a.device_type
        );
        println!("    driver: {} {}", a.driver, a.driver_info);
        println!(
            "    features: shader-f16 {}, subgroups {} (size {}-{}), timestamp-query {}",
            yes(a.shader_f16),
            yes(a.subgroups),
            a.subgroup_min_size,
            a.subgroup_max_size,
            yes(a.timestamps)
        );
        println!(
            "    limits: max buffer {}, max storage binding {}, workgroup storage {} B, invocations/workgroup {}, workgroups/dim {}",
            wgllm::gpu::ledger::human_bytes(a.max_buffer_size),
            wgllm::gpu::ledger::human_bytes(a.max_storage_buffer_binding_size),
            a.max_compute_workgroup_storage_size,
            a.max_compute_invocations_per_workgroup,
            a.max_compute_workgroups_per_dimension
        );
        match a.memory {
            Some(m) => println!(
                "    memory: device-local {}, budget {}, in use {} ({})",
                wgllm::gpu::ledger::human_bytes(m.device_local_bytes),
                m.budget_bytes
                    .map_or("unknown".into(), wgllm::gpu::ledger::human_bytes),
                m.usage_bytes
                    .map_or("unknown".into(), wgllm::gpu::ledger::human_bytes),
                m.source
            ),
            None => println!("    memory: unknown (this backend does not report it)"),
        }
    }
    Ok(())
}
