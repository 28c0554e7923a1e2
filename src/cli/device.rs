//! `wgllm devices` and `wgllm selftest`.

use anyhow::Result;
use wgllm::gpu::{list_adapters, Gpu};

pub(crate) fn devices(json: bool) -> Result<()> {
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

pub(crate) fn yes(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

pub(crate) fn selftest(gpu: &Gpu, json: bool) -> Result<()> {
    if !json {
        println!("selftest on {}", gpu.describe());
        println!(
            "features: shader-f16 {}, subgroups {}, timestamps {}",
            yes(gpu.caps.shader_f16),
            yes(gpu.caps.subgroups),
            yes(gpu.caps.timestamps)
        );
    }
    let checks = wgllm::selftest::run(gpu, &mut |c| {
        if !json {
            match &c.error {
                Some(e) => println!("FAIL  {:<44} error: {e}", c.name),
                None => println!(
                    "{}  {:<44} nmse {:.2e} (tolerance {:.0e}), max |err| {:.2e}",
                    if c.passed { "pass" } else { "FAIL" },
                    c.name,
                    c.nmse,
                    c.tolerance,
                    c.max_abs_err
                ),
            }
        }
    });
    let failed = checks.iter().filter(|c| !c.passed).count();
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(
                &serde_json::json!({"device": gpu.describe(), "checks": checks, "failed": failed})
            )?
        );
    } else {
        println!("{} passed, {} failed", checks.len() - failed, failed);
    }
    if failed > 0 {
        anyhow::bail!("{failed} kernel check(s) failed on {}", gpu.info.name);
    }
    Ok(())
}
