//! Every WGSL kernel is validated by naga without a device and translated to SPIR-V (Vulkan), MSL
//! (Metal) and HLSL (DX12), so portability is checked even where no such GPU is at hand. Kernels
//! whose name has an `_sg` part (`matvec_sg`, `matvec_sg_tex`) are the subgroup variants, which
//! the host only picks where the device has subgroups: they are validated with that capability
//! (and f16-in-f32) instead of none; likewise an `_f16` part (`matmul_f16`, `enable f16;`) with
//! SHADER_FLOAT16.

use naga::valid::{Capabilities, ValidationFlags, Validator};
use wgllm::gpu::shaders::SHADERS;

fn translate(name: &str, src: &str) -> Result<(), String> {
    let module = naga::front::wgsl::parse_str(src)
        .map_err(|e| format!("parse: {}", e.emit_to_string(src)))?;
    // Validate as a WebGPU device without optional features would: no f16, no subgroups. Only
    // `unpack2x16float`/`pack2x16float` need a capability in naga's terms, and every WebGPU-compliant
    // device has it (wgpu's downlevel flag SHADER_F16_IN_F32). Subgroup variants get SUBGROUP too,
    // and nothing else.
    let subgroups = name.split('_').any(|part| part == "sg");
    let f16 = name.split('_').any(|part| part == "f16");
    let (caps, what) = if subgroups {
        (
            Capabilities::SHADER_FLOAT16_IN_FLOAT32 | Capabilities::SUBGROUP,
            "subgroups only",
        )
    } else if f16 {
        (
            Capabilities::SHADER_FLOAT16_IN_FLOAT32 | Capabilities::SHADER_FLOAT16,
            "f16 only",
        )
    } else {
        (
            Capabilities::SHADER_FLOAT16_IN_FLOAT32,
            "no optional capabilities",
        )
    };
    let info = Validator::new(ValidationFlags::all(), caps)
        .validate(&module)
        .map_err(|e| format!("validate ({what}): {}", e.emit_to_string(src)))?;
    let (module, info) = naga::back::pipeline_constants::process_overrides(
        &module,
        &info,
        None,
        &naga::back::PipelineConstants::default(),
    )
    .map_err(|e| format!("overrides: {e}"))?;
    if module.entry_points.is_empty() {
        return Err("no entry points".into());
    }
    naga::back::spv::write_vec(&module, &info, &naga::back::spv::Options::default(), None)
        .map_err(|e| format!("SPIR-V: {e}"))?;
    // MSL 2.3 (macOS 11, iOS 14) is what wgpu targets on current Apple GPUs.
    let msl_opts = naga::back::msl::Options {
        lang_version: (2, 3),
        fake_missing_bindings: true,
        ..Default::default()
    };
    naga::back::msl::write_string(
        &module,
        &info,
        &msl_opts,
        &naga::back::msl::PipelineOptions::default(),
    )
    .map_err(|e| format!("MSL: {e}"))?;
    // Subgroup operations become wave intrinsics, which exist from shader model 6.0 on (naga's
    // writer does not check the model, DXC does), and wgpu enables SUBGROUP on DX12 only there.
    let hlsl_opts = naga::back::hlsl::Options {
        fake_missing_bindings: true,
        shader_model: if f16 {
            // 16-bit types need shader model 6.2, where wgpu's DX12 backend enables SHADER_F16.
            naga::back::hlsl::ShaderModel::V6_2
        } else if subgroups {
            naga::back::hlsl::ShaderModel::V6_0
        } else {
            naga::back::hlsl::Options::default().shader_model
        },
        ..Default::default()
    };
    let pipe = naga::back::hlsl::PipelineOptions { entry_point: None };
    let mut out = String::new();
    naga::back::hlsl::Writer::new(&mut out, &hlsl_opts, &pipe)
        .write(&module, &info, None)
        .map_err(|e| format!("HLSL: {e}"))?;
    Ok(())
}

#[test]
fn every_shader_validates_and_translates_to_spirv_msl_hlsl() {
    assert!(!SHADERS.is_empty(), "no shaders embedded");
    let failures: Vec<String> = SHADERS
        .iter()
        .filter_map(|(name, src)| {
            translate(name, src)
                .err()
                .map(|e| format!("{name}.wgsl: {e}"))
        })
        .collect();
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn the_registry_holds_every_file_in_shaders_dir() {
    let on_disk: Vec<String> = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/shaders"))
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "wgsl"))
        .map(|p| p.file_stem().unwrap().to_string_lossy().into_owned())
        .collect();
    for n in &on_disk {
        assert!(SHADERS.iter().any(|(s, _)| s == n), "{n}.wgsl not embedded");
    }
}

/// The shader files on disk under `shaders/` (subfolders included), as (path relative to
/// `shaders/`, source).
fn shader_files() -> Vec<(String, String)> {
    fn walk(dir: &std::path::Path, root: &std::path::Path, out: &mut Vec<(String, String)>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let path = e.unwrap().path();
            if path.is_dir() {
                walk(&path, root, out);
            } else if path.extension().is_some_and(|x| x == "wgsl") {
                let rel = path
                    .strip_prefix(root)
                    .unwrap()
                    .to_string_lossy()
                    .replace('\\', "/");
                out.push((rel, std::fs::read_to_string(&path).unwrap()));
            }
        }
    }
    let root = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/shaders"));
    let mut out = Vec::new();
    walk(root, root, &mut out);
    out.sort();
    out
}

/// WGSL without its `//` comments, as tokens: identifiers and literals (`[A-Za-z0-9_.]+`) and
/// single punctuation characters.
fn tokens(src: &str) -> Vec<String> {
    let mut out = Vec::new();
    for line in src.lines() {
        let code = line.split("//").next().unwrap_or("");
        let mut word = String::new();
        for ch in code.chars() {
            if ch.is_ascii_alphanumeric() || ch == '_' || ch == '.' {
                word.push(ch);
                continue;
            }
            if !word.is_empty() {
                out.push(std::mem::take(&mut word));
            }
            if !ch.is_whitespace() {
                out.push(ch.to_string());
            }
        }
        if !word.is_empty() {
            out.push(word);
        }
    }
    out
}

/// The value of an integer literal (`15u`, `0xf00u`, `63`), if the token is one.
fn int_literal(t: &str) -> Option<u64> {
    let t = t.trim_end_matches(['u', 'i']);
    match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => t.parse().ok(),
    }
}

/// A mask that takes a quant field out of a word: 4, 6 or 8 contiguous one bits (a nibble, a
/// K-quant 6-bit scale, a byte), anywhere in the word (`15u`, `0xf00u`, `63u`, `0xff0000u`).
fn quant_field_mask(v: u64) -> bool {
    v != 0 && {
        let run = v >> v.trailing_zeros();
        run == 0xf || run == 0x3f || run == 0xff
    }
}

/// The block-decode code in a shader's tokens: each finding as a short description.
fn block_decode_findings(toks: &[String]) -> Vec<String> {
    let mut found = Vec::new();
    for (i, t) in toks.iter().enumerate() {
        if QUANT_PRIMITIVES.contains(&t.as_str()) || FIELD_BUILTINS.contains(&t.as_str()) {
            found.push(format!("`{t}`"));
        }
        // A bitwise AND (not `&&`) whose right operand is a field mask, bare or as a vector
        // constructor's argument (`w & 15u`, `v & vec4<u32>(0xfu, 0xf00u, ...)`).
        let and =
            t == "&" && toks.get(i + 1).is_none_or(|n| n != "&") && (i == 0 || toks[i - 1] != "&");
        if and {
            let rest = toks[i + 1..]
                .iter()
                .skip_while(|n| matches!(n.as_str(), "(" | "<" | ">" | "u32" | "i32"))
                .skip_while(|n| n.starts_with("vec"))
                .skip_while(|n| matches!(n.as_str(), "(" | "<" | ">" | "u32" | "i32"));
            if let Some(m) = rest
                .take(1)
                .find(|n| int_literal(n).is_some_and(quant_field_mask))
            {
                found.push(format!("`& {m}`"));
            }
        }
    }
    found
}

/// The bit-level primitives of common/quant.wgsl's block decode (nibble, byte and 6-bit scale
/// extraction, packed f16 scale halves, the in-place nibble scaling); its API (`qunit_head`,
/// `qunit4`, `qdecode4`, `qunit_words`, `qquants_tuned`, `qfold`, `qscales_of`, ...) says where
/// the words are and is for every kernel to call.
const QUANT_PRIMITIVES: [&str; 11] = [
    "q8_unpack",
    "q4_lo",
    "q4_hi",
    "q4_lo_u",
    "q4_hi_u",
    "q4_lo_in_place",
    "q4_hi_in_place",
    "qh_scale",
    "qbyte",
    "k4_scale_min",
    "NIBBLE_SCALE",
];

/// WGSL's bit-field builtins, which a decode would use instead of a shift and a mask.
const FIELD_BUILTINS: [&str; 6] = [
    "extractBits",
    "insertBits",
    "unpack4xI8",
    "unpack4xU8",
    "unpack4x8snorm",
    "unpack4x8unorm",
];

/// The KV cache's q8_0 rows (scales first, then the quants: common/kv_store_body.wgsl writes them,
/// common/attention_io.wgsl reads them) are the cache's own layout, not a weight block: no weight
/// reaches them.
const KV_CACHE_FILES: [&str; 2] = ["common/attention_io.wgsl", "common/kv_store_body.wgsl"];

/// Every weight format's block decode is written once, in common/quant.wgsl, and every kernel
/// reads its weights through it. This fails when another shader file decodes block bits itself,
/// by either of two signs: it names one of quant.wgsl's bit-level primitives (a kernel that
/// re-implements one, or calls one to decode on its own, as the subgroup matvec's Q8_0/Q4 path
/// used to), or it masks a quant field out of a word (an AND with a run of 4, 6 or 8 one bits, or
/// a bit-field builtin). Masks are what any decode needs whatever its helpers are called, and
/// nothing else in the kernels ANDs with such runs (parities, `& 7u` lane splits, RoPE's 12-bit
/// split are other widths). Both signs are checked to fire on quant.wgsl itself, so a rename there
/// cannot make this test pass vacuously.
#[test]
fn only_common_quant_wgsl_decodes_blocks() {
    let files = shader_files();
    let quant = files
        .iter()
        .find(|(p, _)| p == "common/quant.wgsl")
        .expect("shaders/common/quant.wgsl exists");
    let quant_toks = tokens(&quant.1);
    for name in QUANT_PRIMITIVES {
        assert!(
            quant_toks.iter().any(|t| t == name),
            "common/quant.wgsl no longer defines `{name}`: update QUANT_PRIMITIVES"
        );
    }
    let masks = block_decode_findings(&quant_toks)
        .iter()
        .filter(|f| f.starts_with("`&"))
        .count();
    assert!(
        masks >= 5,
        "the field-mask rule finds only {masks} masks in common/quant.wgsl's decode"
    );
    let mut failures = Vec::new();
    for (path, src) in &files {
        if path == "common/quant.wgsl" {
            continue;
        }
        let toks = tokens(src);
        let found: Vec<String> = block_decode_findings(&toks)
            .into_iter()
            .filter(|f| !(KV_CACHE_FILES.contains(&path.as_str()) && f.starts_with("`&")))
            .collect();
        if !found.is_empty() {
            failures.push(format!("shaders/{path}: {}", found.join(", ")));
        }
    }
    assert!(
        failures.is_empty(),
        "block decode outside shaders/common/quant.wgsl (move it there):\n{}",
        failures.join("\n")
    );
}

/// Loops whose step is a runtime value, each with why it is non-zero (file, step).
const NONZERO_RUNTIME_STEPS: [(&str, &str); 1] = [
    // `for (var i = kg; i < nk; i += n_kg)` runs only inside `if (kg < n_kg)`: n_kg > kg >= 0.
    ("attention.wgsl", "n_kg"),
];

/// Whether `toks[i..]` starts an assignment to the variable at `toks[i]` (`v = `, `v += `,
/// `v++`, `v >>= `, ...), as opposed to a use or a comparison (`v == `, `v <= `, `v >> 1u`).
fn assigns(toks: &[String], i: usize) -> bool {
    let at = |k: usize| toks.get(i + k).map(String::as_str).unwrap_or("");
    match at(1) {
        "=" => at(2) != "=",
        "+" | "-" => at(2) == "=" || at(2) == at(1),
        "*" | "/" | "%" | "&" | "|" | "^" => at(2) == "=",
        "<" | ">" => at(2) == at(1) && at(3) == "=",
        _ => false,
    }
}

/// The index of the token that closes the bracket opened at `toks[open]`.
fn closing(toks: &[String], open: usize) -> Option<usize> {
    let (o, c) = match toks[open].as_str() {
        "(" => ("(", ")"),
        "{" => ("{", "}"),
        _ => return None,
    };
    let mut depth = 0usize;
    for (k, t) in toks.iter().enumerate().skip(open) {
        if t == o {
            depth += 1;
        } else if t == c {
            depth -= 1;
            if depth == 0 {
                return Some(k);
            }
        }
    }
    None
}

/// Why the loop whose `for` is `toks[at]` may not terminate, if it may not: its header must be
/// `for (var v = init; v < bound; step)` with the step `v++`, `v += s` or `v = v + s`, s a
/// positive literal, an upper-case constant or override (their values are fixed positive numbers:
/// `WG`, `TK`, `LANES`; the host sets matvec's `WG` override from 64/128/256), or a runtime value
/// listed in NONZERO_RUNTIME_STEPS; or `for (var v = init; v > 0u; v = v >> 1u)`. Neither `v` nor
/// an identifier of the bound may be assigned in the body. (The counts the bounds come from are
/// element counts of bindings, far below 2^32 - step, so `v` cannot wrap past them.)
fn unbounded_for(file: &str, toks: &[String], at: usize) -> Option<String> {
    let open = at + 1;
    let Some(close) = (open < toks.len()).then(|| closing(toks, open)).flatten() else {
        return Some("a `for` without a bracketed header".into());
    };
    let head: Vec<&str> = toks[open + 1..close].iter().map(String::as_str).collect();
    let text = head.join(" ");
    let parts: Vec<&[&str]> = head.split(|t| *t == ";").collect();
    let [init, cond, step] = parts[..] else {
        return Some(format!("`for ({text})` is not `init; condition; step`"));
    };
    let [_, v, ..] = init else {
        return Some(format!("`for ({text})` declares no loop variable"));
    };
    if init.first() != Some(&"var") {
        return Some(format!("`for ({text})` declares no loop variable"));
    }
    let step_ok = |s: &[&str]| -> bool {
        let positive = |t: &str| {
            t.trim_end_matches('u').parse::<u64>().is_ok_and(|n| n > 0)
                || (t
                    .chars()
                    .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
                    && t.starts_with(|c: char| c.is_ascii_uppercase()))
                || NONZERO_RUNTIME_STEPS.contains(&(file, t))
        };
        match s {
            [x, "+", "+"] => x == v,
            [x, "+", "=", s] => x == v && positive(s),
            [x, "=", y, "+", s] => x == v && y == v && positive(s),
            _ => false,
        }
    };
    let bound: Vec<&str> = match cond {
        [x, "<", rest @ ..] if x == v && rest.first() != Some(&"=") && step_ok(step) => {
            rest.to_vec()
        }
        [x, ">", "0u"]
            if x == v && matches!(step, [a, "=", b, ">", ">", "1u"] if a == v && b == v) =>
        {
            Vec::new()
        }
        _ => return Some(format!("`for ({text})` is not of a form that always ends")),
    };
    // The body: the statement's braces.
    let body_open = close + 1;
    if toks.get(body_open).map(String::as_str) != Some("{") {
        return Some(format!("`for ({text})` has no braced body"));
    }
    let Some(body_close) = closing(toks, body_open) else {
        return Some(format!("`for ({text})` has an unclosed body"));
    };
    for k in body_open..body_close {
        let t = toks[k].as_str();
        let watched =
            t == *v || (bound.contains(&t) && t.starts_with(|c: char| c.is_ascii_lowercase()));
        // A member (`p.n`) is not the variable of that name.
        if watched && toks[k - 1] != "." && assigns(toks, k) {
            return Some(format!("`for ({text})` assigns `{t}` in its body"));
        }
    }
    None
}

/// Every loop in `shaders/` ends by construction, which lets the shader modules be created without
/// wgpu's loop bounding (`wgllm::gpu::shaders::create_module` says why that is sound). This
/// fails on `loop` and `while` (whose ending no syntactic rule can show), and on every `for` that
/// is not of the forms `unbounded_for` accepts.
#[test]
fn every_shader_loop_ends_by_construction() {
    let mut failures = Vec::new();
    let mut loops = 0;
    for (path, src) in shader_files() {
        let toks = tokens(&src);
        for (i, t) in toks.iter().enumerate() {
            match t.as_str() {
                "loop" | "while" => failures.push(format!("shaders/{path}: `{t}`")),
                "for" => {
                    loops += 1;
                    if let Some(why) = unbounded_for(&path, &toks, i) {
                        failures.push(format!("shaders/{path}: {why}"));
                    }
                }
                _ => {}
            }
        }
    }
    assert!(loops > 50, "found only {loops} loops: the scan is broken");
    assert!(
        failures.is_empty(),
        "loops that may not end:\n{}",
        failures.join("\n")
    );
    // The rule itself: what it must refuse.
    for (src, why) in [
        ("loop { x += 1u; }", "loop"),
        ("while (x < n) { x += 1u; }", "while"),
        ("for (var i = 0u; i < n; i += k) { }", "runtime step"),
        ("for (var i = 0u; i <= n; i++) { }", "<= bound"),
        ("for (var i = 0u; i < n; i++) { i = 0u; }", "variable reset"),
        ("for (var i = 0u; i < n; i++) { n += 1u; }", "bound grows"),
        ("for (var i = 0u; i < n; i += 0u) { }", "zero step"),
        ("for (var i = n; i > 0u; i = i >> 2u) { }", "not a halving"),
        ("for (var i = 0u; i != n; i++) { }", "!= bound"),
    ] {
        let toks = tokens(src);
        let bad = toks.iter().any(|t| t == "loop" || t == "while")
            || toks
                .iter()
                .position(|t| t == "for")
                .is_some_and(|i| unbounded_for("test.wgsl", &toks, i).is_some());
        assert!(bad, "the rule accepts a loop it must refuse ({why}): {src}");
    }
}
