//! Which way the arrows point, checked on the source: the planner needs no GPU (a user plans a
//! 13B model on a laptop with no driver), kernels do not depend on the benchmarks, and the
//! command line keeps each subcommand's flags in its own module, `main.rs` only dispatching.

use std::path::{Path, PathBuf};

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let p = e.expect("dir entry").path();
        if p.is_dir() {
            out.extend(rust_files(&p));
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
    out
}

/// Source lines of `dir`'s Rust files, comments left out, as (file, line number, text).
fn code_lines(dir: &str) -> Vec<(String, usize, String)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
    let mut out = Vec::new();
    for f in rust_files(&root) {
        let text = std::fs::read_to_string(&f).expect("read source");
        for (i, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap_or("").to_string();
            out.push((f.display().to_string(), i + 1, code));
        }
    }
    out
}

#[test]
fn the_planner_never_takes_a_gpu() {
    for (f, n, code) in code_lines("src/plan") {
        for banned in ["gpu::Gpu", "&Gpu", "Gpu::", "wgpu::"] {
            assert!(
                !code.contains(banned),
                "{f}:{n}: the planner uses `{banned}`; give it plain data (DeviceTraits)"
            );
        }
    }
}

#[test]
fn kernels_do_not_depend_on_the_benchmarks() {
    for (f, n, code) in code_lines("src/kernels") {
        assert!(
            !code.contains("crate::bench"),
            "{f}:{n}: kernels use the benchmarks (shared helpers belong in crate::stats)"
        );
    }
}

#[test]
fn each_subcommand_keeps_its_flags_in_its_own_module() {
    let main = code_lines("src")
        .into_iter()
        .filter(|(f, _, _)| f.ends_with("src/main.rs"))
        .collect::<Vec<_>>();
    assert!(!main.is_empty());
    for (f, n, code) in &main {
        assert!(
            !code.contains("#[arg("),
            "{f}:{n}: a flag defined in main.rs; it belongs in the subcommand's src/cli module"
        );
    }
    let cli = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/cli");
    for cmd in [
        "devices",
        "selftest",
        "run",
        "logits",
        "perplexity",
        "embed",
        "plan",
        "profile",
        "bench",
    ] {
        let text = std::fs::read_to_string(cli.join(format!("{cmd}.rs"))).expect("cli module");
        assert!(
            text.contains("pub(crate) struct Args") && text.contains("pub(crate) fn run("),
            "src/cli/{cmd}.rs: one Args struct and one run function"
        );
        let variant = format!("(cli::{cmd}::Args)");
        assert!(
            main.iter().any(|(_, _, c)| c.contains(&variant)),
            "main.rs dispatches {cmd} with its Args"
        );
    }
}
