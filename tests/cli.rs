//! The command line as a user meets it: what an error looks like, what every command prints
//! besides its output, exit codes. Runs the built `wgllm` binary.

use std::io::Read;
use std::process::{Command, Stdio};

/// The binary, with the environment variables these tests are about cleared.
fn wgllm() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_wgllm"));
    c.env_remove("WGLLM_BACKTRACE")
        .env_remove("RUST_BACKTRACE")
        .env_remove("RUST_LIB_BACKTRACE");
    c
}

fn stderr_of(c: &mut Command) -> (Option<i32>, String) {
    let out = c.output().expect("running wgllm");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn an_error_is_one_line_with_causes_even_with_rust_backtrace_set() {
    let (code, err) =
        stderr_of(
            wgllm()
                .env("RUST_BACKTRACE", "1")
                .args(["plan", "--preset", "no-such-model"]),
        );
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.starts_with("error: unknown model preset 'no-such-model'"),
        "{err}"
    );
    assert!(!err.to_lowercase().contains("backtrace"), "{err}");
}

#[test]
fn a_backtrace_is_printed_when_asked_for() {
    for ask in [&["-v"][..], &[]] {
        let mut c = wgllm();
        if ask.is_empty() {
            c.env("WGLLM_BACKTRACE", "1");
        }
        let (code, err) = stderr_of(c.args(ask).args(["plan", "--preset", "no-such-model"]));
        assert_eq!(code, Some(1), "{err}");
        assert!(err.starts_with("error: unknown model preset"), "{err}");
        assert!(err.contains("\nbacktrace:\n"), "{err}");
        assert!(!err.contains("disabled backtrace"), "{err}");
    }
}

/// Mesa's drivers print "XDG_RUNTIME_DIR is invalid or not set in the environment" when the
/// variable is missing; wgllm points it at a private directory first.
#[test]
fn no_runtime_dir_warning_when_xdg_runtime_dir_is_unset() {
    let (code, err) = stderr_of(wgllm().env_remove("XDG_RUNTIME_DIR").arg("devices"));
    assert_eq!(code, Some(0), "{err}");
    assert!(!err.contains("XDG_RUNTIME_DIR"), "{err}");
}

#[test]
fn plan_exits_0_when_it_fits_and_2_when_it_does_not() {
    let plan = |budget: &str| {
        wgllm()
            .args(["plan", "--preset", "smollm2-135m", "--budget", budget])
            .stdout(Stdio::null())
            .status()
            .expect("running wgllm")
            .code()
    };
    assert_eq!(plan("12GiB"), Some(0));
    assert_eq!(plan("64MiB"), Some(2));
}

/// `wgllm plan ... | head -1`: the reader goes away, and wgllm ends without a panic message.
#[test]
fn a_closed_stdout_ends_quietly() {
    let mut child = wgllm()
        .args(["plan", "--preset", "llama-2-13b"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running wgllm");
    drop(child.stdout.take());
    let mut err = String::new();
    child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut err)
        .expect("reading stderr");
    child.wait().expect("waiting for wgllm");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn models_lists_what_can_be_fetched_by_name() {
    let out = wgllm()
        .args(["models", "--json"])
        .output()
        .expect("running wgllm");
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let ids: Vec<&str> = v
        .as_array()
        .expect("a list")
        .iter()
        .filter_map(|m| m["id"].as_str())
        .collect();
    assert_eq!(ids, ["smollm2-135m", "all-minilm-l6-v2", "gemma-3-270m"]);
    assert_eq!(v[2]["bytes"], 253_113_024);
    assert_eq!(
        v[2]["sha256"],
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
    );
}

/// `wgllm plan`'s stdout and exit code.
fn plan_output(args: &[&str]) -> (Option<i32>, String) {
    let out = wgllm()
        .arg("plan")
        .args(args)
        .output()
        .expect("running wgllm");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.stderr.is_empty(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), text)
}

/// Every preset is planned, with its exact parameter count beside the textbook estimate: the
/// models wgllm runs (GPT-2, BERT) from their passes, GPT-3 as a description.
#[test]
fn plan_prints_every_architecture_with_its_exact_count() {
    for (preset, total, first_class) in [
        ("gpt2", "124,439,808", "kv cache (3,072 B/token/layer)"),
        ("gpt2-xl", "1,557,611,200", "kv cache (6,400 B/token/layer)"),
        (
            "bert-base-uncased",
            "109,482,240",
            "kv cache (none: an encoder)",
        ),
        (
            "gpt3-175b",
            "174,604,259,328",
            "kv cache (49,152 B/token/layer)",
        ),
    ] {
        let (code, out) = plan_output(&["--preset", preset]);
        assert_eq!(code, Some(0), "{preset}: {out}");
        assert!(
            out.contains(&format!("parameters: {total} exact vs")),
            "{preset}: {out}"
        );
        // The per-module breakdown ends in the same total.
        let breakdown = out
            .lines()
            .find(|l| l.starts_with("  total ") && l.ends_with(total));
        assert!(breakdown.is_some(), "{preset}: no module total in {out}");
        assert!(out.contains(first_class), "{preset}: {out}");
        assert!(
            out.contains("by the textbook 12*L*d^2 + V*d + P*d"),
            "{preset}"
        );
    }
    // GPT-3 in 12 GiB at int4: a verdict (no: exit 2), marked as a description.
    let (code, out) = plan_output(&[
        "--preset",
        "gpt3-175b",
        "--precision",
        "int4",
        "--budget",
        "12GiB",
    ]);
    assert_eq!(code, Some(2), "{out}");
    assert!(
        out.contains("described only: wgllm has no forward pass for gpt3"),
        "{out}"
    );
    assert!(out.contains("fits: NO"), "{out}");
    // BERT's batch of sequences: --batch and --seq.
    let (_, out) = plan_output(&[
        "--preset",
        "bert-base-uncased",
        "--batch",
        "8",
        "--seq",
        "128",
    ]);
    assert!(
        out.contains("batch 8 sequences x 128 tokens (1024 rows)"),
        "{out}"
    );
    assert!(out.contains("runs here: `wgllm embed`"), "{out}");
}

/// `--config` of a GPT-2 and a BERT config.json, table and JSON.
#[test]
fn plan_reads_gpt2_and_bert_configs() {
    let dir = std::env::temp_dir().join(format!("wgllm-cli-configs-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let gpt2 = dir.join("gpt2.json");
    let bert = dir.join("bert.json");
    std::fs::write(
        &gpt2,
        r#"{"model_type": "gpt2", "vocab_size": 50257, "n_embd": 768, "n_layer": 12,
            "n_head": 12, "n_positions": 1024, "n_inner": null}"#,
    )
    .unwrap();
    std::fs::write(
        &bert,
        r#"{"model_type": "bert", "vocab_size": 30522, "hidden_size": 384,
            "num_hidden_layers": 6, "num_attention_heads": 12, "intermediate_size": 1536,
            "max_position_embeddings": 512, "type_vocab_size": 2}"#,
    )
    .unwrap();
    let path = |p: &std::path::Path| p.to_str().unwrap().to_string();
    let (code, out) = plan_output(&["--config", &path(&gpt2)]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("parameters: 124,439,808 exact"), "{out}");
    assert!(out.contains("activations for decode (1 token)"), "{out}");
    let (code, out) = plan_output(&["--config", &path(&bert), "--batch", "4", "--seq", "64"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("parameters: 22,713,216 exact"), "{out}");
    let (_, json) = plan_output(&["--config", &path(&bert), "--json"]);
    let v: serde_json::Value = serde_json::from_str(&json).expect("JSON");
    assert_eq!(v["runs_here"], serde_json::json!(true));
    assert_eq!(v["kv_cache_bytes"], serde_json::json!(0));
    assert!(v["activation_bytes"].as_u64().unwrap() > 0);
    let _ = std::fs::remove_dir_all(&dir);
}
