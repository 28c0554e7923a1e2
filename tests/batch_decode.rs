//! Continuous batching (`BatchLm`): sequences of different prompt lengths in their own slots,
//! decoded together in batches of 1 to 8 rows at mixed positions while slots join and leave,
//! give logits bit-identical to each sequence run alone through `forward` (prefill, then one
//! token a step: the `wgllm run --temp 0` path), and so the same greedy tokens. SmolLM2 (the real
//! GGUF file) and a small random Gemma 3 whose sliding window is shorter than the sequences. Plus
//! the typed errors of a malformed step.
mod common;
use common::*;
use wgllm::kernels::attention::KvDtype;
use wgllm::model::batch::{BatchLm, BatchRow};
use wgllm::model::config::ModelConfig;
use wgllm::model::llama::{Llama, RunOptions};
use wgllm::model::source::Source;
use wgllm::Error;

/// A sequence of the test: its prompt, how many tokens it generates, and the step it joins at.
struct Seq {
    prompt: Vec<u32>,
    generate: usize,
    join: usize,
}

/// Ten sequences over `vocab`, prompt lengths 1 to 19: eight join one a step and leave one a
/// step (batches of 1 to 8 rows and back), two more join later into freed slots.
fn sequences(vocab: u32) -> Vec<Seq> {
    let spec = [
        (5, 10, 0),
        (12, 10, 1),
        (1, 10, 2),
        (19, 10, 3),
        (7, 10, 4),
        (3, 10, 5),
        (15, 10, 6),
        (9, 10, 7),
        (2, 4, 10),
        (11, 3, 11),
    ];
    spec.iter()
        .enumerate()
        .map(|(i, &(len, generate, join))| Seq {
            prompt: (0..len as u32)
                .map(|j| (j * 131 + i as u32 * 977 + 17) % vocab)
                .collect(),
            generate,
            join,
        })
        .collect()
}

fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best as u32
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Each sequence alone: prefill, then one token a step; the logits of every step.
fn alone(m: &mut Llama, gpu: &wgllm::Gpu, s: &Seq) -> Vec<Vec<f32>> {
    let mut logits = vec![m.forward(gpu, &s.prompt, 0).unwrap()];
    let mut pos = s.prompt.len();
    while logits.len() < s.generate {
        let next = argmax(logits.last().unwrap());
        logits.push(m.forward(gpu, &[next], pos).unwrap());
        pos += 1;
    }
    logits
}

/// Runs the sequences through `m`'s slots with joins and leaves and checks every step's logits
/// against `want` bit for bit; returns how many steps had each batch size (index = rows).
fn batched(m: &mut Llama, gpu: &wgllm::Gpu, seqs: &[Seq], want: &[Vec<Vec<f32>>]) -> Vec<usize> {
    struct Live {
        seq: usize,
        slot: usize,
        pos: usize,
        next: u32,
        done: usize,
    }
    let slots = m.slots();
    let mut free: Vec<usize> = (0..slots).rev().collect();
    let mut live: Vec<Live> = Vec::new();
    let mut waiting: Vec<usize> = (0..seqs.len()).collect();
    let mut sizes = vec![0; slots + 1];
    let mut step = 0;
    let check = |seq: usize, k: usize, got: &[f32]| {
        assert_eq!(
            bits(got),
            bits(&want[seq][k]),
            "sequence {seq}, token {k}: batched logits differ from the sequence run alone"
        );
    };
    while !waiting.is_empty() || !live.is_empty() {
        // Joins between steps: prefill into a free slot.
        while let Some(&i) = waiting.first() {
            if seqs[i].join > step || free.is_empty() {
                break;
            }
            waiting.remove(0);
            let slot = free.pop().unwrap();
            let logits = m.forward_slot(gpu, slot, &seqs[i].prompt, 0).unwrap();
            check(i, 0, &logits);
            live.push(Live {
                seq: i,
                slot,
                pos: seqs[i].prompt.len(),
                next: argmax(&logits),
                done: 1,
            });
        }
        // Leaves: sequences that have all their tokens free their slot.
        live.retain(|l| {
            let finished = l.done == seqs[l.seq].generate;
            if finished {
                free.push(l.slot);
            }
            !finished
        });
        if !live.is_empty() {
            let rows: Vec<BatchRow> = live
                .iter()
                .map(|l| BatchRow {
                    slot: l.slot,
                    token: l.next,
                    pos: l.pos,
                })
                .collect();
            sizes[rows.len()] += 1;
            let out = m.decode_batch(gpu, &rows).unwrap();
            assert_eq!(out.len(), rows.len());
            for (l, logits) in live.iter_mut().zip(&out) {
                check(l.seq, l.done, logits);
                l.next = argmax(logits);
                l.pos += 1;
                l.done += 1;
            }
        }
        step += 1;
    }
    sizes
}

fn check_model(load: &dyn Fn(usize) -> Llama, vocab: u32) {
    let gpu = gpu().unwrap();
    let seqs = sequences(vocab);
    let mut single = load(1);
    let want: Vec<_> = seqs.iter().map(|s| alone(&mut single, gpu, s)).collect();
    drop(single);
    let mut m = load(8);
    assert_eq!(m.slots(), 8);
    let sizes = batched(&mut m, gpu, &seqs, &want);
    eprintln!("steps per batch size (index = rows): {sizes:?}");
    for (n, &count) in sizes.iter().enumerate().skip(1) {
        assert!(count > 0, "no step had {n} rows: {sizes:?}");
    }
}

const CTX: usize = 48;

#[test]
fn smollm2_batched_logits_equal_each_sequence_alone() {
    if gpu().is_none() {
        return;
    }
    let Some(path) = packaged_model(&wgllm::fetch::SMOLLM2) else {
        return;
    };
    let g = wgllm::loader::gguf::Gguf::open(&path).unwrap();
    let (cfg, rot) = wgllm::model::llama::config_from_gguf(&g).unwrap();
    let vocab = cfg.vocab_size as u32;
    let load = |parallel: usize| {
        let opts = RunOptions {
            ctx: CTX,
            kv_dtype: KvDtype::F16,
            chunk: 64,
            parallel,
            ..Default::default()
        };
        Llama::load(gpu().unwrap(), cfg.clone(), rot, &Source::Gguf(&g), opts).unwrap()
    };
    check_model(&load, vocab);
}

/// A small Gemma 3 (GeGLU, q/k norms, post norms) with a window of 6 on every other layer, so
/// that most sequences outgrow it and their rings wrap.
fn small_gemma() -> ModelConfig {
    let cfg = serde_json::json!({
        "model_type": "gemma3_text", "vocab_size": 320, "hidden_size": 64,
        "intermediate_size": 96, "num_hidden_layers": 4, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 32, "max_position_embeddings": 256,
        "rms_norm_eps": 1e-6, "rope_theta": 1e6, "tie_word_embeddings": true,
        "sliding_window": 6, "sliding_window_pattern": 2, "query_pre_attn_scalar": 24,
        "hidden_activation": "gelu_pytorch_tanh"
    });
    ModelConfig::from_hf_json(&cfg).unwrap()
}

#[test]
fn gemma3_with_a_sliding_window_batched_logits_equal_each_sequence_alone() {
    if gpu().is_none() {
        return;
    }
    let cfg = small_gemma();
    assert_eq!(cfg.layer_window(0), Some(6));
    assert_eq!(cfg.layer_window(1), None);
    for format in [
        wgllm::quant::WeightFormat::F32,
        wgllm::quant::WeightFormat::Q8_0,
    ] {
        let load = |parallel: usize| {
            let opts = RunOptions {
                ctx: CTX,
                kv_dtype: KvDtype::F16,
                chunk: 4,
                parallel,
                ..Default::default()
            };
            let src = Source::Synthetic {
                format,
                seed: 11,
                mix: None,
            };
            let hd = cfg.head_dim;
            Llama::load(gpu().unwrap(), cfg.clone(), hd, &src, opts).unwrap()
        };
        check_model(&load, cfg.vocab_size as u32);
    }
}

#[test]
fn malformed_steps_are_typed_errors() {
    let Some(gpu) = gpu() else {
        return;
    };
    let cfg = small_gemma();
    let opts = RunOptions {
        ctx: 16,
        chunk: 4,
        parallel: 3,
        ..Default::default()
    };
    let src = Source::Synthetic {
        format: wgllm::quant::WeightFormat::F32,
        seed: 3,
        mix: None,
    };
    let mut m = Llama::load(gpu, cfg.clone(), cfg.head_dim, &src, opts).unwrap();
    for slot in 0..3 {
        m.forward_slot(gpu, slot, &[1, 2, 3], 0).unwrap();
    }
    let row = |slot, pos| BatchRow {
        slot,
        token: 5,
        pos,
    };
    let err = m.decode_batch(gpu, &[row(0, 3), row(3, 3)]).unwrap_err();
    assert!(
        matches!(err, Error::InvalidArgument { ref reason, .. } if reason.contains("slot 3 of 3")),
        "{err}"
    );
    let err = m.decode_batch(gpu, &[row(1, 3), row(1, 4)]).unwrap_err();
    assert!(
        matches!(err, Error::InvalidArgument { ref reason, .. } if reason.contains("two rows")),
        "{err}"
    );
    let err = m.decode_batch(gpu, &[row(0, 3), row(2, 16)]).unwrap_err();
    assert!(
        matches!(
            err,
            Error::ContextFull {
                ctx: 16,
                needed: 17
            }
        ),
        "{err}"
    );
    let bad_token = BatchRow {
        slot: 0,
        token: 320,
        pos: 3,
    };
    assert!(m.decode_batch(gpu, &[bad_token, row(1, 3)]).is_err());
    assert!(m.forward_slot(gpu, 3, &[1], 0).is_err());
    // A refused step changes nothing: a good step after it still runs.
    let out = m.decode_batch(gpu, &[row(0, 3), row(2, 3)]).unwrap();
    assert_eq!(out.len(), 2);
    assert!(out.iter().flatten().all(|x| x.is_finite()));
}

/// `BatchLm::warm_up` compiles every kernel a batched decode step needs: after it, steps of any
/// row count, any slots and any position (short, past the sliding window, past a split of the
/// keys) compile nothing more. Without it the same steps compile kernels (what a server's first
/// concurrent requests would wait for). Each model gets a device of its own, so that no other
/// test's kernels are counted.
#[test]
fn after_the_warm_up_no_decode_step_compiles_a_kernel() {
    let Some(shared) = gpu() else {
        return;
    };
    let cfg = small_gemma();
    let opts = RunOptions {
        ctx: 600,
        kv_dtype: KvDtype::F16,
        chunk: 8,
        parallel: 6,
        ..Default::default()
    };
    let src = Source::Synthetic {
        format: wgllm::quant::WeightFormat::Q8_0,
        seed: 5,
        mix: None,
    };
    let steps = |m: &mut Llama, gpu: &wgllm::Gpu| {
        for pos in [3, 7, 300, 599] {
            for n in 1..=6 {
                let rows: Vec<BatchRow> = (0..n)
                    .map(|i| BatchRow {
                        slot: (i * 5 + pos) % 6,
                        token: (i * 37 + pos) as u32 % 320,
                        pos,
                    })
                    .collect();
                let logits = m.decode_batch(gpu, &rows).unwrap();
                assert_eq!(logits.len(), n);
                assert!(logits.iter().flatten().all(|x| x.is_finite()));
            }
        }
    };
    for warm in [true, false] {
        let gpu = shared.reopen().unwrap();
        let mut m = Llama::load(&gpu, cfg.clone(), cfg.head_dim, &src, opts.clone()).unwrap();
        let (loaded, _) = gpu.kernels_compiled();
        if warm {
            assert_eq!(m.warm_up(&gpu).unwrap(), 6);
            let warmed = gpu.kernel_keys();
            assert!(warmed.len() > loaded, "the warm-up compiled nothing");
            steps(&mut m, &gpu);
            let new: Vec<_> = gpu
                .kernel_keys()
                .into_iter()
                .filter(|k| !warmed.contains(k))
                .collect();
            assert!(
                new.is_empty(),
                "decode steps compiled kernels the warm-up did not: {new:?}"
            );
        } else {
            steps(&mut m, &gpu);
            assert!(
                gpu.kernels_compiled().0 > loaded,
                "without a warm-up the steps compiled nothing: the test shows nothing"
            );
        }
    }
}
