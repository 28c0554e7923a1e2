//! Layer streaming (`RunOptions::resident_layers`): layers past the resident ones wait in host
//! memory and run from two GPU slots. Streamed runs must give logits bit for bit equal to a fully
//! resident run (same kernels, same weights words), and a model over the VRAM budget must run
//! within it while the resident load of the same model is refused.
mod common;
use common::*;
use wgllm::kernels::attention::KvDtype;
use wgllm::loader::gguf::Gguf;
use wgllm::model::config::ModelConfig;
use wgllm::model::llama::{config_from_gguf, Llama, RunOptions};
use wgllm::model::source::Source;
use wgllm::model::stream::HostMatrix;
use wgllm::quant::WeightFormat;
use wgllm::{Error, Gpu, GpuOptions};

/// Resident layers of the SmolLM2 runs (of 30).
const RESIDENT: usize = 10;
/// Ledger bytes a streamed run may differ from a resident one by, besides the layers it keeps off
/// the GPU and the slots: staging buffers, booked one at a time (measured: 240 KiB).
const STAGING_SLACK: u64 = 1 << 20;

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn opts(resident_layers: Option<usize>) -> RunOptions {
    RunOptions {
        ctx: 32,
        kv_dtype: KvDtype::F16,
        chunk: 8,
        all_logits: false,
        resident_layers,
        parallel: 1,
    }
}

/// Logits of the prompt, then of `steps` greedy decode steps.
fn run(gpu: &Gpu, model: &mut Llama, prompt: &[u32], steps: usize) -> Vec<Vec<f32>> {
    let mut out = vec![model.forward(gpu, prompt, 0).expect("prompt")];
    for i in 0..steps {
        let next = wgllm::sampler::argmax(out.last().expect("logits"));
        out.push(
            model
                .forward(gpu, &[next], prompt.len() + i)
                .expect("decode"),
        );
    }
    out
}

fn assert_same(what: &str, got: &[Vec<f32>], want: &[Vec<f32>]) {
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            bits(g) == bits(w),
            "{what}: logits of step {i} differ (max |diff| {:.3e})",
            max_abs_diff(g, w)
        );
    }
}

/// SmolLM2 (Q4_1/Q8_0 GGUF), its config and rotary dims, and a short prompt.
fn smollm2() -> Option<(Gguf, ModelConfig, usize, Vec<u32>)> {
    let path = packaged_model(&wgllm::fetch::SMOLLM2)?;
    let g = Gguf::open(&path).expect("open");
    let (cfg, rot) = config_from_gguf(&g).expect("config");
    let tok = wgllm::tokenizer::Tokenizer::from_gguf(
        &wgllm::tokenizer::GgufVocab::from_gguf(&g).expect("vocab"),
    )
    .expect("tokenizer");
    let prompt = tok
        .encode("The capital of France is", true)
        .expect("encode");
    Some((g, cfg, rot, prompt))
}

fn load(
    gpu: &Gpu,
    g: &Gguf,
    cfg: &ModelConfig,
    rot: usize,
    resident: Option<usize>,
) -> wgllm::Result<Llama> {
    Llama::load(gpu, cfg.clone(), rot, &Source::Gguf(g), opts(resident))
}

#[test]
fn smollm2_streamed_layers_match_resident_bit_for_bit() {
    let Some(gpu) = gpu() else { return };
    let Some((g, cfg, rot, prompt)) = smollm2() else {
        return;
    };
    let mut resident = load(gpu, &g, &cfg, rot, None).expect("resident load");
    let want = run(gpu, &mut resident, &prompt, 2);
    drop(resident);
    let mut streamed = load(gpu, &g, &cfg, rot, Some(RESIDENT)).expect("streamed load");
    assert_eq!(streamed.resident_layers(), RESIDENT);
    let st = streamed.weights.streamed.as_ref().expect("streamed layers");
    assert_eq!((st.first(), st.len()), (RESIDENT, cfg.n_layers - RESIDENT));
    let got = run(gpu, &mut streamed, &prompt, 2);
    assert_same("10 resident + 20 streamed layers", &got, &want);
}

#[test]
fn smollm2_streaming_fits_a_budget_the_resident_model_exceeds() {
    if gpu().is_none() {
        return;
    }
    let Some((g, cfg, rot, prompt)) = smollm2() else {
        return;
    };
    // The resident run on a device of its own, so its ledger holds nothing else.
    let free = Gpu::new(&GpuOptions::default()).expect("device");
    let mut resident = load(&free, &g, &cfg, rot, None).expect("resident load");
    let want = run(&free, &mut resident, &prompt, 1);
    let resident_peak = free.ledger.report().peak_total_bytes;
    // Streaming layers 10.. keeps two of their twenty on the GPU (the slots); budget half the
    // difference below the resident peak.
    let layer_bytes: Vec<u64> = resident.weights.layers[RESIDENT..]
        .iter()
        .map(|l| {
            let m: u64 = l.matrices().iter().map(|m| m.bytes()).sum();
            m + l.vectors().iter().map(|v| v.buf.size()).sum::<u64>()
        })
        .collect();
    let largest = layer_bytes.iter().copied().max().unwrap_or(0);
    let saved = layer_bytes.iter().sum::<u64>() - 2 * largest;
    let budget = resident_peak - saved / 2;
    drop(resident);
    drop(free);

    let small = Gpu::new(&GpuOptions {
        budget: Some(budget),
        ..Default::default()
    })
    .expect("device with a budget");
    match load(&small, &g, &cfg, rot, None) {
        Err(Error::VramBudget { .. }) => {}
        Err(e) => panic!("resident load under the budget: expected VramBudget, got {e}"),
        Ok(_) => panic!("the resident model loaded within {budget} bytes"),
    }
    assert_eq!(
        small.ledger.report().current_total_bytes,
        0,
        "the refused load left buffers"
    );
    small.ledger.reset_peaks();
    let mut streamed = load(&small, &g, &cfg, rot, Some(RESIDENT)).expect("streamed load");
    let got = run(&small, &mut streamed, &prompt, 1);
    let report = small.ledger.report();
    let st = streamed.weights.streamed.as_ref().expect("streamed");
    eprintln!(
        "resident peak {resident_peak} B; budget {budget} B; streamed peak {} B \
         (slots {} B, {} B of layers in host memory)",
        report.peak_total_bytes,
        st.slot_bytes(),
        st.host_bytes()
    );
    assert!(report.peak_total_bytes <= budget);
    // Beyond the slots, streaming costs only its upload staging (one chunk at a time).
    assert!(
        report.peak_total_bytes <= resident_peak - saved + STAGING_SLACK,
        "streamed peak {} over the resident peak less the streamed layers plus the slots ({})",
        report.peak_total_bytes,
        resident_peak - saved
    );
    assert_same("streamed under the budget", &got, &want);
}

/// A tiny LLaMA with synthetic weights; `w_down` has 80 columns, so it falls back to f16 while
/// the other matrices are q4_0.
fn tiny() -> ModelConfig {
    let mut cfg = ModelConfig::preset("smollm2-135m").expect("preset");
    cfg.vocab_size = 200;
    cfg.hidden_size = 64;
    cfg.n_heads = 4;
    cfg.n_kv_heads = 2;
    cfg.head_dim = 16;
    cfg.ffn_size = 80;
    cfg.n_layers = 5;
    cfg.max_positions = 64;
    cfg
}

#[test]
fn synthetic_every_split_matches_resident_across_chunks() {
    let Some(gpu) = gpu() else { return };
    let cfg = tiny();
    let src = Source::Synthetic {
        format: WeightFormat::Q4_0,
        seed: 7,
        mix: None,
    };
    let tokens: Vec<u32> = (0..7).map(|i| (i * 37 + 5) % 200).collect();
    let load = |resident: Option<usize>| {
        let o = RunOptions {
            ctx: 16,
            kv_dtype: KvDtype::F32,
            chunk: 3, // 7 tokens: three chunks, two without logits
            all_logits: false,
            resident_layers: resident,
            parallel: 1,
        };
        Llama::load(gpu, cfg.clone(), cfg.head_dim, &src, o).expect("load")
    };
    let want = run(gpu, &mut load(None), &tokens, 2);
    for resident in [0, 3, 4, 5, 9] {
        let mut m = load(Some(resident));
        assert_eq!(m.resident_layers(), resident.min(5));
        let streamed = m.weights.streamed.as_ref().map_or(0, |s| s.len());
        assert_eq!(streamed, 5 - resident.min(5));
        let got = run(gpu, &mut m, &tokens, 2);
        assert_same(&format!("{resident} resident layers"), &got, &want);
        // Every logits row for every token too (one chunk per call, logits of each).
        m.opts.all_logits = true;
        let all = m.forward(gpu, &tokens[..4], 0).expect("all logits");
        let mut r = load(None);
        r.opts.all_logits = true;
        assert_eq!(
            bits(&all),
            bits(&r.forward(gpu, &tokens[..4], 0).expect("resident"))
        );
    }
}

#[test]
fn streamed_layer_errors_are_refused_before_dispatch() {
    let Some(gpu) = gpu() else { return };
    // Wrong byte count for the shape.
    let e = HostMatrix::pack("w", WeightFormat::Q4_0, 2, 32, &[0u8; 5], 1 << 20);
    assert!(matches!(e, Err(Error::ShapeMismatch { .. })), "{e:?}");
    // A layer that is resident (or past the end) cannot be fetched into a slot.
    let cfg = tiny();
    let src = Source::Synthetic {
        format: WeightFormat::Q8_0,
        seed: 1,
        mix: None,
    };
    let o = RunOptions {
        ctx: 8,
        chunk: 2,
        resident_layers: Some(3),
        ..Default::default()
    };
    let mut m = Llama::load(gpu, cfg.clone(), cfg.head_dim, &src, o).expect("load");
    let st = m.weights.streamed.as_mut().expect("streamed");
    assert!(st.fetch(gpu, 2).is_err());
    assert!(st.fetch(gpu, 5).is_err());
    let w = st.fetch(gpu, 4).expect("layer 4");
    assert_eq!(w.wq.label, "blk.4.attn_q.weight");
    assert_eq!(w.w_down.format, WeightFormat::F16);
    assert_eq!(w.wq.format, WeightFormat::Q8_0);
}

/// The plan of a streamed run ([`wgllm::plan::MemoryPlan::with_streaming`]) equals the ledger
/// class by class: parameters (resident layers + two slots), KV cache, and activations with the
/// kernel params of the largest submission (the resident part, or a streamed layer with the
/// head), in prefill chunks and in decode.
#[test]
fn smollm2_streamed_plan_matches_the_ledger() {
    use wgllm::plan::{gguf_layer_bytes, MemoryPlan, PlanOptions};
    use wgllm::BufferClass;
    let Some((g, cfg, rot, prompt)) = smollm2() else {
        return;
    };
    for (resident, chunk) in [(0, 8), (RESIDENT, 8), (29, 8), (RESIDENT, 1)] {
        let gpu = Gpu::new(&GpuOptions::default()).expect("device");
        let o = RunOptions {
            chunk,
            ..opts(Some(resident))
        };
        let mut model =
            Llama::load(&gpu, cfg.clone(), rot, &Source::Gguf(&g), o.clone()).expect("load");
        model.forward(&gpu, &prompt, 0).expect("prompt");
        model.forward(&gpu, &[1], prompt.len()).expect("decode");
        let popts = PlanOptions {
            ctx: o.ctx,
            chunk,
            kv: o.kv_dtype,
            ..Default::default()
        }
        .for_device(&wgllm::kernels::device_traits(&gpu));
        let storage = popts.weight_storage();
        let mut plan = MemoryPlan::new(&cfg, popts).expect("plan");
        plan.use_gguf_weights(&g, storage).expect("gguf weights");
        let layers = gguf_layer_bytes(&g, storage).expect("layer bytes");
        let plan = plan.with_streaming(resident, &layers);
        let r = gpu.ledger.report();
        let what = format!("{resident} resident layers, chunk {chunk}");
        assert_eq!(plan.resident_layers, Some(resident));
        assert_eq!(
            plan.parameters_bytes,
            r.class(BufferClass::Parameters).current_bytes,
            "{what}: parameters"
        );
        assert_eq!(
            plan.kv_cache_bytes,
            r.class(BufferClass::KvCache).current_bytes,
            "{what}: KV cache"
        );
        assert_eq!(
            plan.activation_bytes + plan.kernel_params_bytes,
            r.class(BufferClass::Activations).peak_bytes,
            "{what}: activations and kernel params"
        );
    }
}

/// `--resident-layers auto` under `--budget` compares the budget with the buffers the ledger
/// will book, not with the plan's estimate of driver overhead (3% + 64 MiB), which no ledger
/// sees: a budget that holds SmolLM2's buffers but not that margin runs it fully resident.
#[test]
fn auto_keeps_every_layer_when_only_the_overhead_estimate_exceeds_the_budget() {
    use wgllm::plan::{MemoryPlan, PlanOptions};
    let Some((g, cfg, _, _)) = smollm2() else {
        return;
    };
    let Some(path) = packaged_model(&wgllm::fetch::SMOLLM2) else {
        return;
    };
    let gpu = Gpu::new(&GpuOptions::default()).expect("device");
    // What `wgllm run` plans with: ctx 2048 (SmolLM2's own is 8192), chunk 64, KV f16.
    let popts = PlanOptions {
        ctx: 2048,
        chunk: 64,
        kv: KvDtype::F16,
        ..Default::default()
    }
    .for_device(&wgllm::kernels::device_traits(&gpu));
    let storage = popts.weight_storage();
    let mut plan = MemoryPlan::new(&cfg, popts).expect("plan");
    plan.use_gguf_weights(&g, storage).expect("gguf weights");
    let budget = plan.buffers_bytes();
    assert!(
        plan.total_bytes > budget,
        "the overhead estimate is over it"
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_wgllm"))
        .args(["run", "Hi", "-n", "2", "--temp", "0", "-m"])
        .arg(&path)
        .args(["--budget", &format!("{budget}B")])
        .output()
        .expect("running wgllm");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(!err.contains("streaming"), "{err}");
}
