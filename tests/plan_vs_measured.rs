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

/// Four sequence slots (`--parallel 4`): the plan books a KV cache per slot (slot-major, one K
/// and one V buffer a layer) and a batched decode step's buffers (four logits rows, the row table
/// and the rows' split-attention partials), and its submission's kernel params (one RoPE/store
/// and one split attention with its merge for all rows at the context's end); after prefills
/// into every slot and a step of four rows at the context's end, each class equals the ledger's.
/// A budget one byte short of what the slots' caches need is refused before anything is
/// allocated past it, with the typed budget error.
#[test]
fn smollm2_with_four_slots_matches_the_ledger() {
    let Some((_, g, cfg)) = smollm2() else {
        return;
    };
    let (ctx, chunk, parallel) = (512, 32, 4);
    let popts_for = |gpu: &Gpu| {
        PlanOptions {
            ctx,
            chunk,
            parallel,
            kv: RunOptions::default().kv_dtype,
            ..Default::default()
        }
        .for_device(&wgllm::kernels::device_traits(gpu))
    };
    let gpu = Gpu::new(&GpuOptions::default()).unwrap();
    let opts = RunOptions {
        ctx,
        chunk,
        parallel,
        ..Default::default()
    };
    let (_, rot) = wgllm::model::llama::config_from_gguf(&g).unwrap();
    let src = wgllm::model::source::Source::Gguf(&g);
    let mut m =
        wgllm::model::llama::Llama::load(&gpu, cfg.clone(), rot, &src, opts.clone()).unwrap();
    use wgllm::model::batch::{BatchLm, BatchRow};
    for slot in 0..parallel {
        m.forward_slot(&gpu, slot, &[1, 2, 3], ctx - 4).unwrap();
    }
    let rows: Vec<BatchRow> = (0..parallel)
        .map(|slot| BatchRow {
            slot,
            token: 7 + slot as u32,
            pos: ctx - 1,
        })
        .collect();
    let out = m.decode_batch(&gpu, &rows).unwrap();
    assert_eq!(out.len(), parallel);
    let r = gpu.ledger.report();
    let popts = popts_for(&gpu);
    let storage = popts.weight_storage();
    let mut plan = MemoryPlan::new(&cfg, popts).unwrap();
    plan.use_gguf_weights(&g, storage).unwrap();
    let what = "parallel 4";
    same(
        what,
        "kv-cache",
        plan.kv_cache_bytes,
        r.class(BufferClass::KvCache).current_bytes,
    );
    assert_eq!(plan.kv_cache_bytes, 4 * 30 * ctx as u64 * 192 * 2 * 4);
    same(
        what,
        "activations",
        plan.activation_bytes + plan.kernel_params_bytes,
        r.class(BufferClass::Activations).peak_bytes,
    );
    same(
        what,
        "parameters",
        plan.parameters_bytes,
        r.class(BufferClass::Parameters).current_bytes,
    );
    assert!(plan.activations.buffer_of("batch.logits").is_some());
    assert!(plan.activations.buffer_of("batch.rows").is_some());
    assert!(plan.activations.buffer_of("batch.partials").is_some());
    assert!(plan.to_table().contains("kv cache for 4 slots"));
    drop(m);

    // A budget that holds the parameters and all but one byte of the slots' caches (allocated
    // before the activations).
    let budget = plan.parameters_bytes + plan.kv_cache_bytes - 1;
    let tight = Gpu::new(&GpuOptions {
        budget: Some(budget),
        ..Default::default()
    })
    .unwrap();
    let err = match wgllm::model::llama::Llama::load(&tight, cfg.clone(), rot, &src, opts) {
        Err(e) => e,
        Ok(_) => panic!("{what}: a budget short of the slots was not refused"),
    };
    assert!(matches!(err, wgllm::Error::VramBudget { .. }), "{err}");
    let r = tight.ledger.report();
    assert!(r.class(BufferClass::KvCache).peak_bytes < plan.kv_cache_bytes);
    assert!(
        r.peak_total_bytes <= budget,
        "{what}: the ledger passed the budget"
    );
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
            mix: None,
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

/// A GPT-2 directory of `cfg` (GPT2Config fields) with pseudo-random weights of the HF shapes
/// (`Conv1D` matrices `[in, out]`): the memory is what is checked, not the arithmetic.
fn write_gpt2(name: &str, cfg: &serde_json::Value) -> TempModel {
    let n = |k: &str| cfg[k].as_u64().unwrap() as usize;
    let (v, p, d, l) = (n("vocab_size"), n("n_positions"), n("n_embd"), n("n_layer"));
    let f = 4 * d;
    let mut shapes = vec![
        ("wte.weight".to_string(), vec![v, d]),
        ("wpe.weight".to_string(), vec![p, d]),
    ];
    for i in 0..l {
        let layer: [(&str, Vec<usize>); 12] = [
            ("ln_1.weight", vec![d]),
            ("ln_1.bias", vec![d]),
            ("attn.c_attn.weight", vec![d, 3 * d]),
            ("attn.c_attn.bias", vec![3 * d]),
            ("attn.c_proj.weight", vec![d, d]),
            ("attn.c_proj.bias", vec![d]),
            ("ln_2.weight", vec![d]),
            ("ln_2.bias", vec![d]),
            ("mlp.c_fc.weight", vec![d, f]),
            ("mlp.c_fc.bias", vec![f]),
            ("mlp.c_proj.weight", vec![f, d]),
            ("mlp.c_proj.bias", vec![d]),
        ];
        shapes.extend(layer.into_iter().map(|(s, sh)| (format!("h.{i}.{s}"), sh)));
    }
    shapes.push(("ln_f.weight".into(), vec![d]));
    shapes.push(("ln_f.bias".into(), vec![d]));
    let tensors: Vec<_> = shapes
        .into_iter()
        .enumerate()
        .map(|(t, (name, shape))| {
            let len: usize = shape.iter().product();
            let w = randn(len, t as u64 + 1, 0.1);
            (name, shape, w)
        })
        .collect();
    write_hf_model(name, cfg, &tensors)
}

/// `planned` and `measured` agree exactly.
fn same(what: &str, class: &str, planned: u64, measured: u64) {
    eprintln!("{what}: {class:<24} planned {planned:>12} measured {measured:>12}");
    assert_eq!(planned, measured, "{what}: {class}");
}

/// GPT-2 keeps `wgllm plan`'s word class by class: parameters (as its loader uploads them, the
/// f16 fallback of block formats over rows that are not whole blocks included), the KV cache of
/// every layer (ctx capped at n_positions by both), the shared activations plus the kernel
/// parameters of the largest submission (a chunk with logits), and the staging upload chunk.
#[test]
fn gpt2_planned_bytes_equal_the_ledger() {
    if gpu().is_none() {
        return;
    }
    use wgllm::model::gpt2::Gpt2;
    use wgllm::model::params::Precision;
    use wgllm::model::source::Source;
    use wgllm::quant::WeightFormat;
    let tiny = serde_json::json!({
        "model_type": "gpt2", "vocab_size": 96, "n_positions": 64, "n_embd": 64,
        "n_layer": 2, "n_head": 4, "activation_function": "gelu_new"
    });
    // Rows of 80 are not whole q4_0 blocks (80 columns: f16); c_proj's 320 are.
    let odd = serde_json::json!({
        "model_type": "gpt2", "vocab_size": 300, "n_positions": 96, "n_embd": 80,
        "n_layer": 3, "n_head": 2, "activation_function": "gelu_new"
    });
    // head_dim 32: q8_0 keys and the subgroup attention.
    let q8 = serde_json::json!({
        "model_type": "gpt2", "vocab_size": 128, "n_positions": 128, "n_embd": 64,
        "n_layer": 2, "n_head": 2, "activation_function": "gelu"
    });
    let cases = [
        // (config, weights, KV, ctx, chunk, all logits, subgroups)
        (&tiny, None, KvDtype::F32, 48, 16, false, true),
        (
            &tiny,
            Some(WeightFormat::F16),
            KvDtype::F16,
            4096,
            1,
            false,
            true,
        ),
        (
            &odd,
            Some(WeightFormat::Q4_0),
            KvDtype::F16,
            96,
            8,
            true,
            true,
        ),
        (
            &odd,
            Some(WeightFormat::Q8_0),
            KvDtype::F32,
            64,
            5,
            false,
            false,
        ),
        (
            &q8,
            Some(WeightFormat::Q4_0),
            KvDtype::Q8_0,
            128,
            32,
            false,
            true,
        ),
    ];
    for (i, (cfg_json, weights, kv, ctx, chunk, all_logits, subgroups)) in
        cases.into_iter().enumerate()
    {
        let dir = write_gpt2(&format!("plan-gpt2-{i}"), cfg_json);
        let gpu = Gpu::new(&GpuOptions {
            no_subgroups: !subgroups,
            ..Default::default()
        })
        .unwrap();
        let hf = wgllm::loader::HfModel::open(&dir.0).unwrap();
        let cfg = wgllm::model::config::ModelConfig::from_hf_json(hf.config()).unwrap();
        let opts = RunOptions {
            ctx,
            kv_dtype: kv,
            chunk,
            all_logits,
            ..Default::default()
        };
        let mut m = Gpt2::load(&gpu, cfg.clone(), &Source::Hf(&hf, weights), opts).unwrap();
        // A prefill over two chunks (one without logits), then a decode step.
        let prompt: Vec<u32> = (0..chunk as u32 + 3).map(|t| t * 7 % 90).collect();
        let n = prompt.len().min(m.opts.ctx - 1);
        m.forward(&gpu, &prompt[..n], 0).unwrap();
        m.forward(&gpu, &[5], n).unwrap();
        let r = gpu.ledger.report();

        let precision = match weights {
            None => Precision::F32,
            Some(WeightFormat::F16) => Precision::F16,
            Some(WeightFormat::Q8_0) => Precision::Q8_0,
            Some(_) => Precision::Q4_0,
        };
        let popts = PlanOptions {
            precision,
            kv,
            ctx,
            chunk,
            all_logits,
            ..Default::default()
        }
        .for_device(&wgllm::kernels::device_traits(&gpu));
        let plan = MemoryPlan::new(&cfg, popts).unwrap();
        let what = format!("gpt2 case {i} ({weights:?}, kv {kv}, ctx {ctx}, chunk {chunk})");
        assert_eq!(plan.options.ctx, m.opts.ctx, "{what}: ctx capped alike");
        let class = |c: BufferClass| r.class(c);
        same(
            &what,
            "parameters",
            plan.parameters_bytes,
            class(BufferClass::Parameters).current_bytes,
        );
        same(
            &what,
            "kv cache",
            plan.kv_cache_bytes,
            class(BufferClass::KvCache).current_bytes,
        );
        same(
            &what,
            "activations + params",
            plan.activation_bytes + plan.kernel_params_bytes,
            class(BufferClass::Activations).peak_bytes,
        );
        same(
            &what,
            "staging (upload chunk)",
            plan.staging_upload_bytes,
            class(BufferClass::Staging).peak_bytes,
        );
    }
}

/// all-MiniLM-L6-v2 encoding a batch of sentences in one pass keeps the plan of `wgllm plan
/// --batch B --seq N`: its parameters as uploaded, no KV cache, the shared activations of the batch
/// plus the kernel parameters of the pass (one attention a sequence), the staging upload chunk.
#[test]
fn bert_batch_planned_bytes_equal_the_ledger() {
    use wgllm::model::bert::Bert;
    use wgllm::model::params::Precision;
    use wgllm::model::source::Source;
    use wgllm::quant::WeightFormat;
    if gpu().is_none() {
        return;
    }
    let Some(dir) = packaged_model(&wgllm::fetch::MINILM) else {
        return;
    };
    let sentences: Vec<Vec<u32>> = (0..4)
        .map(|s| {
            let mut ids = vec![101];
            ids.extend((0..5 + 3 * s).map(|t| 1000 + 37 * t + s));
            ids.push(102);
            ids
        })
        .collect();
    let seqs: Vec<&[u32]> = sentences.iter().map(|s| s.as_slice()).collect();
    for (weights, precision, batch, seq, subgroups) in [
        (None, Precision::F32, 4, 32, true),
        (Some(WeightFormat::Q8_0), Precision::Q8_0, 4, 20, false),
        (Some(WeightFormat::F16), Precision::F16, 2, 512, true),
    ] {
        let gpu = Gpu::new(&GpuOptions {
            no_subgroups: !subgroups,
            ..Default::default()
        })
        .unwrap();
        let hf = wgllm::loader::HfModel::open(&dir).unwrap();
        let cfg = wgllm::model::config::ModelConfig::from_hf_json(hf.config()).unwrap();
        let mut bert =
            Bert::load_batch(&gpu, cfg.clone(), &Source::Hf(&hf, weights), batch, seq).unwrap();
        let embs = bert.embed_batch(&gpu, &seqs).unwrap();
        assert_eq!(embs.len(), seqs.len());
        let r = gpu.ledger.report();
        let popts = PlanOptions {
            precision,
            ctx: seq,
            batch,
            ..Default::default()
        }
        .for_device(&wgllm::kernels::device_traits(&gpu));
        let plan = MemoryPlan::new(&cfg, popts).unwrap();
        let what = format!("minilm {precision}, batch {batch} x {seq}");
        let class = |c: BufferClass| r.class(c);
        same(
            &what,
            "parameters",
            plan.parameters_bytes,
            class(BufferClass::Parameters).current_bytes,
        );
        same(
            &what,
            "kv cache",
            plan.kv_cache_bytes,
            class(BufferClass::KvCache).peak_bytes,
        );
        same(
            &what,
            "activations + params",
            plan.activation_bytes + plan.kernel_params_bytes,
            class(BufferClass::Activations).peak_bytes,
        );
        same(
            &what,
            "staging (upload chunk)",
            plan.staging_upload_bytes,
            class(BufferClass::Staging).peak_bytes,
        );
    }
}

/// A synthetic model of a K-quant mix uploads each matrix in its recipe type's format: the
/// ledger's parameters are the plan's, and its per-type table's uploaded bytes, to the byte. SmolLM2's shapes exercise the fallbacks (hidden 576
/// is not whole 256-blocks: Q5_0, Q5_1 and Q8_0; ffn_down's 1536 is: Q4_K, Q5_K, Q6_K).
#[test]
fn a_synthetic_k_quant_mix_uploads_what_the_plan_counts() {
    if gpu().is_none() {
        return;
    }
    use wgllm::model::params::{NamedTypes, Precision};
    let mut cfg = wgllm::model::config::ModelConfig::preset("smollm2-135m").unwrap();
    cfg.n_layers = 4;
    for precision in [Precision::Q4_K_M, Precision::Q5_K_S, Precision::Q6_K] {
        let gpu = Gpu::new(&GpuOptions::default()).unwrap();
        let opts = RunOptions {
            ctx: 64,
            ..Default::default()
        };
        let src = wgllm::model::source::Source::Synthetic {
            format: precision.storage(),
            seed: 1,
            mix: Some(NamedTypes::new(&cfg, precision)),
        };
        let rot = cfg.head_dim;
        let mut m = wgllm::model::llama::Llama::load(&gpu, cfg.clone(), rot, &src, opts).unwrap();
        // It runs: every matrix's format has its kernels.
        let logits = m.forward(&gpu, &[1, 2, 3], 0).unwrap();
        assert!(logits.iter().all(|x| x.is_finite()), "{precision}");
        let measured = gpu
            .ledger
            .report()
            .class(BufferClass::Parameters)
            .current_bytes;
        let popts = PlanOptions {
            precision,
            ctx: 64,
            ..Default::default()
        }
        .for_device(&wgllm::kernels::device_traits(&gpu));
        let plan = MemoryPlan::new(&cfg, popts).unwrap();
        let types = &plan.tensor_types;
        eprintln!(
            "{precision}: measured {measured}, per type {}, plan {}",
            types.total.uploaded_bytes, plan.parameters_bytes
        );
        assert!(types.rows.len() >= 3, "{precision}: {types:?}");
        assert_eq!(types.total.uploaded_bytes, measured, "{precision}");
        assert_eq!(plan.parameters_bytes, measured, "{precision}");
    }
}

/// On a device without subgroups (lavapipe opened so: the workgroup matvec GPUs run, weights in
/// buffers) SmolLM2's Q/K/V and gate/up are stacked in one buffer per group: its parameters are
/// the plan's to the byte (a stack books what separate buffers would), and so are a step's
/// activations and kernel parameters (a block a dispatch): a decode step runs each group as one
/// dispatch (3 fewer a layer than the plan without stacking), a chunk of 16 tokens each matrix
/// apart.
#[test]
fn smollm2_stacked_in_buffers_matches_the_ledger() {
    let Some((path, g, cfg)) = smollm2() else {
        return;
    };
    let ctx = 64;
    for (chunk, tokens, pos, saved) in [(1, 1, ctx - 1, 3 * cfg.n_layers as u64), (16, 16, 0, 0)] {
        let gpu = Gpu::new(&GpuOptions {
            no_subgroups: true,
            ..Default::default()
        })
        .unwrap();
        let opts = RunOptions {
            ctx,
            chunk,
            ..Default::default()
        };
        let mut lm = wgllm::model::load::load_lm(&gpu, &path, None, opts).unwrap();
        let ids: Vec<u32> = (1..=tokens as u32).collect();
        lm.model.forward(&gpu, &ids, pos).unwrap();
        let r = gpu.ledger.report();
        let popts = PlanOptions {
            ctx,
            chunk,
            kv: RunOptions::default().kv_dtype,
            ..Default::default()
        }
        .for_device(&wgllm::kernels::device_traits(&gpu));
        assert!(popts.stacked_projections && !popts.stacked_chunks);
        let unstacked = PlanOptions {
            stacked_projections: false,
            ..popts.clone()
        };
        let storage = popts.weight_storage();
        let mut plan = MemoryPlan::new(&cfg, popts).unwrap();
        plan.use_gguf_weights(&g, storage).unwrap();
        let apart = MemoryPlan::new(&cfg, unstacked).unwrap();
        assert_eq!(
            apart.dispatches_per_chunk - plan.dispatches_per_chunk,
            saved,
            "chunk {chunk}"
        );
        let measured = r.class(BufferClass::Parameters).current_bytes;
        assert_eq!(plan.parameters_bytes, measured, "chunk {chunk}");
        let measured = r.class(BufferClass::Activations).peak_bytes;
        eprintln!(
            "chunk {chunk}: planned {} + {} params ({} dispatches), measured {measured}",
            plan.activation_bytes, plan.kernel_params_bytes, plan.dispatches_per_chunk
        );
        assert_eq!(
            plan.activation_bytes + plan.kernel_params_bytes,
            measured,
            "chunk {chunk}"
        );
    }
}
