//! Embeds every WGSL file of `shaders/` into the binary, with `// #include "common/x.wgsl"` lines
//! replaced by the named helper file, so that the library, `wgllm selftest` and the portability test
//! all see exactly the same source.

use std::fmt::Write as _;
use std::path::Path;

fn resolve(dir: &Path, file: &Path, depth: usize) -> String {
    let text =
        std::fs::read_to_string(file).unwrap_or_else(|e| panic!("reading {}: {e}", file.display()));
    let mut out = String::new();
    for line in text.lines() {
        let t = line.trim();
        if let Some(rest) = t.strip_prefix("// #include ") {
            assert!(depth < 4, "include nesting too deep in {}", file.display());
            let inc = rest.trim().trim_matches('"');
            writeln!(out, "// ---- begin {inc} ----").unwrap();
            out += &resolve(dir, &dir.join(inc), depth + 1);
            writeln!(out, "// ---- end {inc} ----").unwrap();
        } else {
            out += line;
            out.push('\n');
        }
    }
    out
}

fn main() {
    let dir = Path::new("shaders");
    println!("cargo:rerun-if-changed=shaders");
    let mut names: Vec<_> = std::fs::read_dir(dir)
        .expect("shaders/ directory")
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "wgsl"))
        .collect();
    names.sort();
    let mut gen = String::from("/// Every kernel source, includes resolved: (file stem, WGSL).\npub const SHADERS: &[(&str, &str)] = &[\n");
    for p in &names {
        println!("cargo:rerun-if-changed={}", p.display());
        let stem = p.file_stem().unwrap().to_string_lossy().to_string();
        let src = resolve(dir, p, 0);
        writeln!(gen, "    ({stem:?}, {src:?}),").unwrap();
    }
    gen += "];\n";
    if let Ok(common) = std::fs::read_dir(dir.join("common")) {
        for e in common.flatten() {
            println!("cargo:rerun-if-changed={}", e.path().display());
        }
    }
    let out = Path::new(&std::env::var("OUT_DIR").unwrap()).join("shaders.rs");
    std::fs::write(out, gen).unwrap();
}
