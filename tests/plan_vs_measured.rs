//! The memory planner keeps its word: for SmolLM2 at several contexts, the bytes `wgllm plan`
//! predicts per class equal (within 1%) what the VRAM ledger measures when the model runs, and the
//! KV cache equals llama.cpp's published formula. A small synthetic model whose final norm folds
//! into its head (SmolLM2's head is too large to) checks the activations exactly too.
mod common;
use common::*;
use wgllm::gpu::ledger::BufferClass;
use wgllm::kernels::attention::KvDtype;
use wgllm::model::llama::RunOptions;
use wgllm::plan::{MemoryPlan, PlanOptions};
use wgllm::{Gpu, GpuOptions};

/// SmolLM2's file, its GGUF and config, where the device and the model are there.
fn smollm2() -> Option<(
    std::path::PathBuf,
    wgllm::loader::gguf::Gguf,
    wgllm::model::config::ModelConfig,
)> {
    gpu()?;
    let path = packaged_model(&wgllm::fetch::SMOLLM2)?;
    let g = wgllm::loader::gguf::Gguf::open(&path).unwrap();
    let (cfg, _) = wgllm::model::llama::config_from_gguf(&g).unwrap();
    Some((path, g, cfg))
}

#[test]
fn smollm2_planned_bytes_match_the_ledger() {
    let Some((path, g, cfg)) = smollm2() else {
        return;
    };
    for (ctx, kv) in [
        (128usize, KvDtype::F16),
        (512, KvDtype::Q8_0),
        (2048, KvDtype::F32),
    ] {
        // A device of its own, so the ledger holds only this model.
        let gpu = Gpu::new(&GpuOptions::default()).unwrap();
        let chunk = 32;
        let opts = RunOptions {
            ctx,
            kv_dtype: kv,
            chunk,
            all_logits: false,
            ..Default::default()
        };
        let mut lm = wgllm::model::load::load_lm(&gpu, &path, None, opts).unwrap();
        lm.model.forward(&gpu, &[1, 2, 3], 0).unwrap();
        let r = gpu.ledger.report();

        let popts = PlanOptions {
            kv,
            ctx,
            chunk,
            ..Default::default()
        }
        .for_device(&wgllm::kernels::device_traits(&gpu));
        let storage = popts.weight_storage();
        let mut plan = MemoryPlan::new(&cfg, popts).unwrap();
        plan.use_gguf_weights(&g, storage).unwrap();

        let check = |class: &str, planned: u64, measured: u64| {
            let rel = (measured as f64 - planned as f64).abs() / planned as f64;
            eprintln!("ctx {ctx} kv {kv}: {class:<12} planned {planned:>12} measured {measured:>12} ({:+.3}%)", 100.0 * rel);
            assert!(
                rel <= 0.01,
                "ctx {ctx} {class}: planned {planned}, measured {measured}"
            );
        };
        check(
            "parameters",
            plan.parameters_bytes,
            r.class(BufferClass::Parameters).current_bytes,
        );
        check(
            "kv-cache",
            plan.kv_cache_bytes,
            r.class(BufferClass::KvCache).current_bytes,
        );
        check(
            "activations",
            plan.activation_bytes + plan.kernel_params_bytes,
            r.class(BufferClass::Activations).peak_bytes,
        );
        // Staging is planned as one upload chunk plus the logits readback; they never overlap, so
        // the measured peak is the larger of the two: exactly the upload chunk here (the largest
        // chunk is the embedding table's), and the plan errs on the safe side by the readback.
        let staging = r.class(BufferClass::Staging).peak_bytes;
        check("staging", plan.staging_upload_bytes, staging);
        assert_eq!(
            plan.staging_bytes,
            plan.staging_upload_bytes + plan.staging_readback_bytes
        );
        // llama.cpp: n_layer * n_ctx * n_embd_k_gqa * 2 (K and V) * bytes per element.
        if kv == KvDtype::F16 {
            assert_eq!(plan.kv_cache_bytes, 30 * ctx as u64 * 192 * 2 * 2);
        }
    }
}

/// The decode-only plan (chunk of one token) counts the dispatches a single token runs, which
/// fold norms, SwiGLU and residual adds into the projections where the device does
/// (`PlanOptions::single_token_folds`), and split a long context's attention in two passes
/// (`PlanOptions::split_attention`, counted for the token at the context's end): its
/// activation and kernel-params bytes equal the ledger's.
#[test]
fn smollm2_decode_plan_matches_the_ledger() {
    let Some((path, _, cfg)) = smollm2() else {
        return;
    };
    for ctx in [64, 512] {
        let gpu = Gpu::new(&GpuOptions::default()).unwrap();
        let opts = RunOptions {
            ctx,
            chunk: 1,
            ..Default::default()
        };
        let mut lm = wgllm::model::load::load_lm(&gpu, &path, None, opts).unwrap();
        lm.model.forward(&gpu, &[1], ctx - 1).unwrap();
        let measured = gpu
            .ledger
            .report()
            .class(BufferClass::Activations)
            .peak_bytes;
        let popts = PlanOptions {
            ctx,
            chunk: 1,
            kv: RunOptions::default().kv_dtype,
            ..Default::default()
        }
        .for_device(&wgllm::kernels::device_traits(&gpu));
        let plan = MemoryPlan::new(&cfg, popts).unwrap();
        eprintln!(
            "decode at ctx {ctx}: planned {} + {} params, measured {measured}, {} dispatches",
            plan.activation_bytes, plan.kernel_params_bytes, plan.dispatches_per_chunk
        );
        assert_eq!(plan.activation_bytes + plan.kernel_params_bytes, measured);
    }
}

/// A model whose head is small enough for the final norm to fold into it (the issue's: one layer,
/// hidden 32, intermediate 32, two heads of 16 over one KV head, vocab 264, tied), where the fold
/// keeps the last row in `proj` live through the head and so out of `logits`' buffer: the plan of
/// a prefill chunk and of a decode step still equals the ledger, and the head's dispatch runs.
#[test]
fn a_model_whose_final_norm_folds_into_the_head_matches_the_ledger() {
    if gpu().is_none() {
        return;
    }
    let mut cfg = wgllm::model::config::ModelConfig::preset("smollm2-135m").unwrap();
    (cfg.vocab_size, cfg.hidden_size, cfg.ffn_size, cfg.n_layers) = (264, 32, 32, 1);
    (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim) = (2, 1, 16);
    cfg.tied_embeddings = true;
    let ctx = 16;
    // (chunk, tokens, position): a prompt of three tokens in a chunk of 64 (the CLI's default),
    // and a decode step at the context's end.
    for (chunk, n, pos) in [(64, 3, 0), (1, 1, ctx - 1)] {
        let gpu = Gpu::new(&GpuOptions::default()).unwrap();
        let opts = RunOptions {
            ctx,
            chunk,
            ..Default::default()
        };
        let src = wgllm::model::source::Source::Synthetic {
            format: wgllm::quant::WeightFormat::Q8_0,
            seed: 1,
        };
        let rot = cfg.head_dim;
        let mut m = wgllm::model::llama::Llama::load(&gpu, cfg.clone(), rot, &src, opts).unwrap();
        let tokens: Vec<u32> = (1..=n as u32).collect();
        let logits = m.forward(&gpu, &tokens, pos).unwrap();
        assert_eq!(logits.len(), 264);
        let measured = gpu
            .ledger
            .report()
            .class(BufferClass::Activations)
            .peak_bytes;
        let popts = PlanOptions {
            ctx,
            chunk,
            kv: RunOptions::default().kv_dtype,
            ..Default::default()
        }
        .for_device(&wgllm::kernels::device_traits(&gpu));
        let plan = MemoryPlan::new(&cfg, popts).unwrap();
        eprintln!(
            "chunk {chunk}: planned {} + {} params, measured {measured}",
            plan.activation_bytes, plan.kernel_params_bytes
        );
        assert_eq!(plan.activation_bytes + plan.kernel_params_bytes, measured);
        let a = &plan.activations;
        if plan.options.single_token_folds {
            assert_ne!(a.role_to_buffer["proj"], a.role_to_buffer["logits"]);
        }
    }
}
