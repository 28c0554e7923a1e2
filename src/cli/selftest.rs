//! `wgllm selftest`: every kernel variant this device gets, against its CPU reference.

use anyhow::Result;

use super::{yes, Global};

#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    #[arg(long)]
    json: bool,
}

pub(crate) fn run(Args { json }: Args, g: &Global) -> Result<()> {
    let gpu = &g.gpu()?;
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
