//! Long runs, load/unload cycles and faults, on SmolLM2-135M (RELIABILITY.md, sections 3 and 4).
//!
//! The CI versions are short: 64 tokens past the prompt, 3 load/unload cycles. With
//! `WGLLM_RELIABILITY_FULL=1` the same tests run the full lengths (2,000 tokens, 20 cycles) and
//! print the figures RELIABILITY.md quotes. No timings are asserted.
mod common;
use common::*;

use std::path::{Path, PathBuf};

use wgllm::kernels::attention::KvDtype;
use wgllm::model::generate::generate_with;
use wgllm::model::llama::RunOptions;
use wgllm::model::load::load_lm;
use wgllm::sampler::{Sampler, SamplerConfig};
use wgllm::{Gpu, GpuOptions};

/// The tests here run one at a time: the resident set is the process's, so a model another test
/// loads meanwhile would count as this one's growth.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn full() -> bool {
    std::env::var("WGLLM_RELIABILITY_FULL").is_ok_and(|v| v == "1")
}

fn opts(ctx: usize, parallel: usize) -> RunOptions {
    RunOptions {
        ctx,
        kv_dtype: KvDtype::F32,
        chunk: 64,
        all_logits: false,
        resident_layers: None,
        parallel,
    }
}

/// A device of its own (a fresh ledger, and safe to destroy), or a CI failure without one.
fn own_gpu(budget: Option<u64>) -> Option<Gpu> {
    gpu()?;
    Some(
        Gpu::new(&GpuOptions {
            budget,
            ..Default::default()
        })
        .expect("a second device on the same adapter"),
    )
}

/// The process's resident set in bytes.
fn rss() -> u64 {
    wgllm::serve::http::resident_bytes().expect("/proc/self/statm")
}

fn greedy() -> Sampler {
    Sampler::new(SamplerConfig {
        temperature: 0.0,
        ..Default::default()
    })
}

/// `n` tokens past the first golden prompt with `--ignore-eos`: the ledger holds the same bytes
/// after every token, the first tokens are the numpy reference's, and the resident set does not
/// grow (the bound of RELIABILITY.md, 1%, holds for the full run; the short one allows 5% since
/// its first tokens still fault in pages of the code and the driver).
#[test]
fn a_long_run_neither_drifts_nor_leaks() {
    let _serial = serial();
    let Some(gpu) = own_gpu(None) else { return };
    let Some(path) = packaged_model(&wgllm::fetch::SMOLLM2) else {
        return;
    };
    let n = if full() { 2000 } else { 64 };
    let mut lm = load_lm(&gpu, &path, None, opts(n + 16, 1)).expect("load SmolLM2");
    let gold = golden("smollm2_greedy.json");
    let run = &gold["runs"][0];
    let prompt = ids_of(&run["prompt_ids"]);
    let want = ids_of(&run["new_ids"]);
    let mut ledger_after = Vec::new();
    let mut rss_after = Vec::new();
    let (got, stats) = generate_with(
        lm.model.as_mut(),
        &gpu,
        &lm.tokenizer,
        &prompt,
        n,
        true,
        &mut greedy(),
        &mut |_| {
            ledger_after.push(gpu.ledger.report().current_total_bytes);
            rss_after.push(rss());
            true
        },
    )
    .expect("generate");
    assert_eq!(got.len(), n, "--ignore-eos runs to n tokens");
    assert!(!stats.stopped_at_eos);
    assert_eq!(
        &got[..want.len()],
        &want[..],
        "the reference's first tokens"
    );
    let first = ledger_after[0];
    assert!(
        ledger_after.iter().all(|&b| b == first),
        "ledger bytes changed after the first token: {:?}",
        ledger_after
            .iter()
            .filter(|&&b| b != first)
            .take(5)
            .collect::<Vec<_>>()
    );
    // From the tenth token: the first ones compile kernels and grow the driver's caches.
    let base = rss_after[9.min(n - 1)];
    let last = *rss_after.last().unwrap();
    let growth = last as f64 / base as f64 - 1.0;
    eprintln!(
        "{n} tokens: ledger {first} bytes after every token; RSS {base} -> {last} bytes ({:+.3}%)",
        growth * 100.0
    );
    let bound = if full() { 0.01 } else { 0.05 };
    assert!(growth < bound, "RSS grew {:.3}%", growth * 100.0);
}

/// wgpu's counts of live buffers, bind groups and compute pipelines on `gpu` (all 0 unless built
/// with the `wgpu-counters` feature). Not textures: wgpu-hal 30's Vulkan backend counts a texture
/// when it is dropped but not when it is made (the count falls by the model's textures every
/// cycle), so that counter says nothing here.
fn wgpu_live(gpu: &Gpu) -> [isize; 3] {
    let c = gpu.device.get_internal_counters().hal;
    [
        c.buffers.read(),
        c.bind_groups.read(),
        c.compute_pipelines.read(),
    ]
}

/// Loading and dropping the model again and again: the ledger returns to 0 bytes each time, the
/// model answers the same each time, wgpu's live objects return to what the first cycle left (with
/// the `wgpu-counters` feature), and the resident set stays within 5% of the first cycle's.
#[test]
fn load_unload_cycles_return_to_baseline() {
    let _serial = serial();
    let Some(gpu) = own_gpu(None) else { return };
    let Some(path) = packaged_model(&wgllm::fetch::SMOLLM2) else {
        return;
    };
    let cycles = if full() { 20 } else { 3 };
    let gold = golden("smollm2_greedy.json");
    let run = &gold["runs"][1];
    let prompt = ids_of(&run["prompt_ids"]);
    let want = ids_of(&run["new_ids"]);
    let mut rss_after = Vec::new();
    let mut live_after = Vec::new();
    for c in 0..cycles {
        {
            let mut lm = load_lm(&gpu, &path, None, opts(64, 1)).expect("load SmolLM2");
            assert!(gpu.ledger.report().current_total_bytes > 0);
            let (got, _) = generate_with(
                lm.model.as_mut(),
                &gpu,
                &lm.tokenizer,
                &prompt,
                4,
                false,
                &mut greedy(),
                &mut |_| true,
            )
            .expect("generate");
            assert_eq!(got, want[..4], "cycle {c}");
        }
        gpu.wait().expect("the queue drains");
        let r = gpu.ledger.report();
        assert_eq!(r.current_total_bytes, 0, "cycle {c}: {}", r.to_table());
        rss_after.push(rss());
        live_after.push(wgpu_live(&gpu));
    }
    // After the first cycle: the device keeps the pipelines it compiled (its kernel cache), so
    // the baseline is what stays once the first model is gone.
    assert!(
        live_after.iter().all(|l| l == &live_after[0]),
        "wgpu's live buffers, bind groups, compute pipelines per cycle: {live_after:?}"
    );
    eprintln!(
        "wgpu live objects after each cycle (buffers, bind groups, compute pipelines; 0 without \
         the wgpu-counters feature): {:?}",
        live_after[0]
    );
    let base = rss_after[0];
    let worst = rss_after
        .iter()
        .map(|&r| r as f64 / base as f64 - 1.0)
        .fold(0.0, f64::max);
    eprintln!(
        "{cycles} cycles: ledger 0 bytes after each; RSS after cycle 1 {base}, largest growth \
         {:+.2}% ({:?})",
        worst * 100.0,
        rss_after
    );
    assert!(
        worst < 0.05,
        "RSS grew {:.2}% over {cycles} cycles",
        worst * 100.0
    );
}

/// A copy of the model file in a directory of its own, removed at the end.
struct TempModel {
    dir: PathBuf,
    file: PathBuf,
}

impl TempModel {
    fn new(src: &Path, tag: &str) -> TempModel {
        let dir = std::env::temp_dir().join(format!("wgllm-rel-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join(src.file_name().unwrap());
        std::fs::copy(src, &file).unwrap();
        TempModel { dir, file }
    }
}

impl Drop for TempModel {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The model file truncated, then replaced by other bytes, after loading: the model keeps no
/// mapping it reads after the load, so generation goes on, token for token as before (no SIGBUS);
/// loading the damaged file again is a typed error.
#[test]
fn a_model_file_truncated_or_replaced_after_loading() {
    let _serial = serial();
    let Some(gpu) = gpu() else { return };
    let Some(path) = packaged_model(&wgllm::fetch::SMOLLM2) else {
        return;
    };
    let tmp = TempModel::new(&path, "truncate");
    let mut lm = load_lm(gpu, &tmp.file, None, opts(64, 1)).expect("load the copy");
    let gold = golden("smollm2_greedy.json");
    let run = &gold["runs"][0];
    let prompt = ids_of(&run["prompt_ids"]);
    let want = ids_of(&run["new_ids"]);
    let six_tokens = |lm: &mut wgllm::model::load::LoadedLm| {
        generate_with(
            lm.model.as_mut(),
            gpu,
            &lm.tokenizer,
            &prompt,
            6,
            false,
            &mut greedy(),
            &mut |_| true,
        )
        .expect("generate")
        .0
    };
    assert_eq!(six_tokens(&mut lm), want[..6]);
    let len = std::fs::metadata(&tmp.file).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&tmp.file)
        .unwrap()
        .set_len(len / 3)
        .unwrap();
    assert_eq!(six_tokens(&mut lm), want[..6], "after truncation");
    std::fs::write(&tmp.file, b"not a model any more").unwrap();
    assert_eq!(six_tokens(&mut lm), want[..6], "after replacement");
    match load_lm(gpu, &tmp.file, None, opts(64, 1)) {
        Err(wgllm::Error::BadFile { .. }) | Err(wgllm::Error::Truncated { .. }) => {}
        Err(e) => panic!("an unexpected error for the replaced file: {e:?}"),
        Ok(_) => panic!("the replaced file loaded"),
    }
}

/// A budget that holds the model but not the slots asked for, or not a longer context: refused by
/// the ledger before the driver is asked (the peak stays within the budget), every buffer given
/// back, and the same device then loads what fits.
#[test]
fn a_budget_too_small_for_more_slots_or_context_is_refused() {
    let _serial = serial();
    let Some(probe) = own_gpu(None) else { return };
    let Some(path) = packaged_model(&wgllm::fetch::SMOLLM2) else {
        return;
    };
    // What loading one slot of 256 positions takes at its peak (uploads' staging included),
    // measured; 8 slots or 16 times the context need far more than the 2% on top.
    let one = {
        let _lm = wgllm::model::load::load_batch_lm(&probe, &path, None, opts(256, 1))
            .expect("load one slot");
        probe.ledger.report().peak_total_bytes
    };
    let budget = one + one / 50;
    let gpu = own_gpu(Some(budget)).unwrap();
    for (what, o) in [("8 slots", opts(256, 8)), ("a 4096 context", opts(4096, 1))] {
        match wgllm::model::load::load_batch_lm(&gpu, &path, None, o) {
            Err(wgllm::Error::VramBudget { .. }) => {}
            Err(e) => panic!("{what}: not the ledger's refusal: {e}"),
            Ok(_) => panic!("{what} fit a budget of {budget} bytes"),
        }
        let r = gpu.ledger.report();
        assert_eq!(r.current_total_bytes, 0, "{what}: {}", r.to_table());
        assert!(r.peak_total_bytes <= budget, "{what}: {}", r.to_table());
    }
    let mut lm =
        wgllm::model::load::load_batch_lm(&gpu, &path, None, opts(256, 1)).expect("one slot fits");
    let gold = golden("smollm2_greedy.json");
    let prompt = ids_of(&gold["runs"][0]["prompt_ids"]);
    let logits = lm.model.forward_slot(&gpu, 0, &prompt, 0).expect("forward");
    let want = ids_of(&gold["runs"][0]["new_ids"]);
    assert_eq!(greedy().sample(&logits, &prompt), want[0]);
}

/// The device lost under a loaded model (`Device::destroy` simulates it): the next forward pass is
/// a typed device error, not a panic.
#[test]
fn a_lost_device_is_a_typed_error() {
    let _serial = serial();
    let Some(gpu) = own_gpu(None) else { return };
    let Some(path) = packaged_model(&wgllm::fetch::SMOLLM2) else {
        return;
    };
    let mut lm = load_lm(&gpu, &path, None, opts(64, 1)).expect("load SmolLM2");
    let prompt = lm
        .tokenizer
        .encode("The capital of France is", true)
        .unwrap();
    gpu.device.destroy();
    let err = generate_with(
        lm.model.as_mut(),
        &gpu,
        &lm.tokenizer,
        &prompt,
        4,
        false,
        &mut greedy(),
        &mut |_| true,
    )
    .expect_err("a destroyed device still generated");
    assert!(
        wgllm::serve::engine::is_device_fault(&err),
        "not a device error: {err:?}"
    );
}

/// The server's engine on a device that is then lost: the request in flight ends with an error
/// event, the engine reports not ready (what `/health` answers 503 with), and later requests are
/// refused as unavailable (503) instead of queued.
#[test]
fn a_lost_device_makes_the_engine_not_ready() {
    let _serial = serial();
    let Some(gpu) = own_gpu(None) else { return };
    let Some(path) = packaged_model(&wgllm::fetch::SMOLLM2) else {
        return;
    };
    let gpu = std::sync::Arc::new(gpu);
    let o = opts(64, 2);
    let engine = wgllm::serve::Engine::start(
        gpu.clone(),
        wgllm::serve::EngineOptions {
            max_queue: 4,
            chunk: o.chunk,
        },
        move |g| wgllm::model::load::load_batch_lm(g, &path, None, o),
    )
    .expect("start the engine");
    let prompt = engine
        .info
        .tokenizer
        .encode("Once upon a time", true)
        .unwrap();
    let request = || wgllm::serve::GenRequest {
        prompt: prompt.clone(),
        params: wgllm::serve::GenParams {
            max_tokens: 4,
            sampling: SamplerConfig {
                temperature: 0.0,
                ..Default::default()
            },
            stop: Vec::new(),
            logprobs: None,
            ignore_eos: false,
        },
    };
    let finish = |mut rx: tokio::sync::mpsc::UnboundedReceiver<wgllm::serve::Event>| loop {
        match rx.blocking_recv() {
            Some(wgllm::serve::Event::Token { .. }) => continue,
            other => return other,
        }
    };
    assert!(matches!(
        finish(engine.submit(request()).unwrap()),
        Some(wgllm::serve::Event::Done { .. })
    ));
    assert_eq!(engine.health(), Ok(()));
    gpu.device.destroy();
    match finish(engine.submit(request()).unwrap()) {
        Some(wgllm::serve::Event::Error(e)) => eprintln!("after destroy: {e}"),
        other => panic!("a destroyed device answered {other:?}"),
    }
    let why = engine
        .health()
        .expect_err("still ready after the device was lost");
    assert!(!why.is_empty());
    assert!(matches!(
        engine.submit(request()),
        Err(wgllm::serve::SubmitError::Unavailable(_))
    ));
}
