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
