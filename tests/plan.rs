//! The memory planner: known answers (llama.cpp's KV cache size, the 13B-in-12-GiB proof), tight
//! suggestions, the activation sharing and its loop-aware liveness, the training contrast and the
//! reports; parameters per tensor type of mixed GGUF files and of the K-quant mixes. No GPU
//! needed.

mod common;

use std::collections::BTreeMap;

use wgllm::kernels::attention::KvDtype;
use wgllm::model::config::ModelConfig;
use wgllm::model::params::{self, Precision};
use wgllm::plan::activations::{
    llama_role_bytes, llama_schedule, share, Kernel, Schedule, Step, LLAMA_PINNED, LLAMA_ROLES,
};
use wgllm::plan::{
    activations::llama_activation_plan_with, llama_activation_plan, overhead, svg, ActivationPlan,
    MemoryPlan, PlanOptions, TrainOptions, GIB, MIB, STREAM_SLOTS,
};

fn preset(name: &str) -> ModelConfig {
    ModelConfig::preset(name).unwrap_or_else(|e| panic!("preset {name}: {e}"))
}

fn plan(
    name: &str,
    precision: Precision,
    kv: KvDtype,
    ctx: usize,
    budget: Option<u64>,
) -> MemoryPlan {
    let opts = PlanOptions {
        precision,
        kv,
        ctx,
        budget,
        ..Default::default()
    };
    MemoryPlan::new(&preset(name), opts).unwrap_or_else(|e| panic!("plan {name}: {e}"))
}

/// llama.cpp logs the KV cache as n_layer * n_ctx * n_embd_k_gqa * 2 (K and V) * sizeof(f16):
/// SmolLM2-135M (30 layers, 3 kv heads x 64) at ctx 8192 is 188,743,680 bytes = 180 MiB.
#[test]
fn kv_cache_matches_llama_cpp_for_smollm2() {
    let p = plan("smollm2-135m", Precision::F16, KvDtype::F16, 8192, None);
    assert_eq!(p.kv_cache_bytes, 30 * 8192 * 192 * 2 * 2);
    assert_eq!(p.kv_cache_bytes, 188_743_680);
    assert_eq!(p.kv_cache_bytes, 180 * MIB);
    // f32 doubles it; q8_0 is 34 bytes per 32 values (head_dim 64: two blocks, no padding).
    let f32 = plan("smollm2-135m", Precision::F16, KvDtype::F32, 8192, None);
    assert_eq!(f32.kv_cache_bytes, 2 * p.kv_cache_bytes);
    let q8 = plan("smollm2-135m", Precision::F16, KvDtype::Q8_0, 8192, None);
    assert_eq!(q8.kv_cache_bytes, 30 * 8192 * 2 * 3 * 68);
}

#[test]
fn llama_2_13b_q4_0_fits_12_gib_at_ctx_2048_with_f16_kv() {
    let p = plan(
        "llama-2-13b",
        Precision::Q4_0,
        KvDtype::F16,
        2048,
        Some(12 * GIB),
    );
    println!("{}", p.to_table());
    assert!(p.fits(), "total {}", p.total_bytes);
    assert_eq!(p.kv_cache_bytes, 40 * 2048 * 40 * 128 * 2 * 2);
    assert_eq!(
        p.parameters_bytes,
        params::weight_bytes(&p.cfg, Precision::Q4_0).exact_bytes
    );
    assert!(p.suggestions().is_none());
    assert!(p.warnings.is_empty(), "{:?}", p.warnings);
}

#[test]
fn llama_2_13b_q4_0_fits_12_gib_at_ctx_4096_with_q8_0_kv() {
    let p = plan(
        "llama-2-13b",
        Precision::Q4_0,
        KvDtype::Q8_0,
        4096,
        Some(12 * GIB),
    );
    println!("{}", p.to_table());
    assert!(p.fits(), "total {}", p.total_bytes);
    // 128 values: 4 blocks of 32 bytes plus 2 words of f16 scales = 136 bytes per row.
    assert_eq!(p.kv_bytes_per_token_layer, 2 * 40 * 136);
    // At 10 GiB the f16 cache no longer fits at 4096 and q8_0 is what makes it fit.
    let f16 = plan(
        "llama-2-13b",
        Precision::Q4_0,
        KvDtype::F16,
        4096,
        Some(10 * GIB),
    );
    assert!(!f16.fits(), "total {}", f16.total_bytes);
    let s = f16.suggestions().expect("suggestions when over budget");
    let q8 = s
        .kv_alternatives
        .iter()
        .find(|k| k.name == "q8_0")
        .expect("q8_0 listed");
    assert!(q8.fits);
    assert_eq!(q8.total_bytes, p.total_bytes);
}

/// Every suggestion sits exactly on the boundary: what it proposes fits and one step further
/// does not.
#[test]
fn suggestions_over_budget_are_tight() {
    let budget = 8 * GIB;
    let p = plan(
        "llama-2-13b",
        Precision::Q4_0,
        KvDtype::F16,
        4096,
        Some(budget),
    );
    println!("{}", p.to_table());
    assert!(!p.fits());
    let s = p.suggestions().expect("suggestions");
    let ctx = s.longest_ctx.expect("some ctx fits");
    assert!(plan(
        "llama-2-13b",
        Precision::Q4_0,
        KvDtype::F16,
        ctx,
        Some(budget)
    )
    .fits());
    assert!(!plan(
        "llama-2-13b",
        Precision::Q4_0,
        KvDtype::F16,
        ctx + 1,
        Some(budget)
    )
    .fits());
    // Smaller KV dtypes only, each judged at the requested ctx.
    assert_eq!(s.kv_alternatives.len(), 1);
    assert_eq!(s.kv_alternatives[0].name, "q8_0");
    let q8 = plan(
        "llama-2-13b",
        Precision::Q4_0,
        KvDtype::Q8_0,
        4096,
        Some(budget),
    );
    assert_eq!(s.kv_alternatives[0].fits, q8.fits());
    // q4_0 is already the smallest precision.
    assert!(s.highest_precision.is_none());
    // Streaming: r resident layers + 2 slots fit, r + 1 do not.
    let st = s.streaming.expect("streaming fits");
    let (l, lb) = (40u64, p.layer_weight_bytes);
    let buffers = p.total_bytes - p.overhead_bytes;
    let total = |r: u64| {
        let sum = buffers - (l - r) * lb + STREAM_SLOTS * lb;
        sum + overhead(sum)
    };
    let r = st.resident_layers as u64;
    assert_eq!(st.resident_layers + st.streamed_layers, 40);
    assert_eq!(st.total_bytes, total(r));
    assert!(total(r) <= budget && total(r + 1) > budget);
    assert_eq!(st.slot_bytes, 2 * lb);
}

#[test]
fn highest_precision_that_fits_is_q6_k_for_13b_in_12_gib() {
    let p = plan(
        "llama-2-13b",
        Precision::F16,
        KvDtype::F16,
        2048,
        Some(12 * GIB),
    );
    assert!(!p.fits());
    let s = p.suggestions().expect("suggestions");
    // q8_0 needs ~12.9 GiB of weights alone; llama.cpp's q6_k (6.56 bits a weight) is the
    // largest that fits, and of the single formats q4_1 (20 bytes per 32).
    let h = s.highest_precision.expect("a precision fits");
    assert_eq!(h.name, "q6_k");
    let at = |p| plan("llama-2-13b", p, KvDtype::F16, 2048, Some(12 * GIB));
    assert!(at(Precision::Q6_K).fits() && at(Precision::Q4_1).fits());
    assert!(at(Precision::Q6_K).parameters_bytes > at(Precision::Q4_1).parameters_bytes);
    assert!(!plan(
        "llama-2-13b",
        Precision::Q8_0,
        KvDtype::F16,
        2048,
        Some(12 * GIB)
    )
    .fits());
    assert!(
        s.longest_ctx.is_none(),
        "26 GB of f16 weights fit at no ctx"
    );
    let st = s.streaming.expect("streaming fits");
    assert!(st.resident_layers > 0 && st.resident_layers < 38);
}

#[test]
fn no_budget_or_within_budget_gives_no_suggestions() {
    assert!(plan("llama-2-7b", Precision::F16, KvDtype::F16, 4096, None)
        .suggestions()
        .is_none());
    let p = plan(
        "smollm2-135m",
        Precision::F32,
        KvDtype::F32,
        8192,
        Some(2 * GIB),
    );
    assert!(p.fits() && p.suggestions().is_none());
}

#[test]
fn parameters_split_into_layers_and_the_rest_exactly() {
    for name in ["llama-2-13b", "smollm2-135m", "qwen2.5-0.5b", "llama-3-8b"] {
        for pr in Precision::ALL {
            let p = plan(name, pr, KvDtype::F16, 128, None);
            let exact = params::weight_bytes(&p.cfg, pr).exact_bytes;
            assert_eq!(p.parameters_bytes, exact, "{name} {pr}");
            assert_eq!(
                p.layer_weight_bytes * p.cfg.n_layers as u64 + p.other_weight_bytes,
                exact
            );
            let sum: u64 = p.classes().iter().map(|(_, b)| b).sum();
            assert_eq!(sum, p.total_bytes);
        }
    }
}

/// 13 dispatches a layer (attn_norm, 7 matmuls, RoPE + KV store, attention, add + ffn_norm,
/// swiglu, add) plus embedding, final norm and head; one 256-byte slot each, nine for the
/// 2096-byte block of RoPE + KV store, except that the buffer ends with the last block (the
/// head's 32 bytes) unpadded.
#[test]
fn kernel_params_count_every_dispatch_and_shard() {
    let p = plan("smollm2-135m", Precision::Q4_0, KvDtype::F16, 256, None);
    assert_eq!(p.dispatches_per_chunk, 13 * 30 + 3);
    assert_eq!(
        p.kernel_params_bytes,
        (393 - 30) * 256 + 30 * 9 * 256 - (256 - 32)
    );
    // qwen2 adds three bias dispatches a layer.
    let q = plan("qwen2.5-0.5b", Precision::Q4_0, KvDtype::F16, 256, None);
    assert_eq!(q.dispatches_per_chunk, 16 * 24 + 3);
    // A 1 MiB binding limit splits the 49152 x 576 q4_0 embedding (288-byte rows) into 14 shards,
    // used by both the lookup and the tied head.
    let opts = PlanOptions {
        precision: Precision::Q4_0,
        max_binding: MIB,
        ..Default::default()
    };
    let small = MemoryPlan::new(&preset("smollm2-135m"), opts).expect("plan");
    assert_eq!(small.dispatches_per_chunk, 393 + 2 * 13);
}

#[test]
fn stacked_projections_save_three_dispatches_a_layer_and_share_the_same_buffers() {
    for name in ["smollm2-135m", "qwen2.5-0.5b", "llama-2-13b"] {
        let cfg = preset(name);
        let opts = |stacked_projections, stacked_chunks, chunk| PlanOptions {
            precision: Precision::Q4_0,
            stacked_projections,
            stacked_chunks,
            chunk,
            ..Default::default()
        };
        let saved = 3 * cfg.n_layers as u64;
        // (stacked for chunks too, chunk, dispatches saved): the subgroup matvec stacks every
        // chunk; the workgroup matvec single tokens only, a chunk of 64 runs the matrices apart.
        for (chunks, chunk, want) in [(true, 64, saved), (false, 1, saved), (false, 64, 0)] {
            let (a, b) = (
                MemoryPlan::new(&cfg, opts(false, false, chunk)).unwrap(),
                MemoryPlan::new(&cfg, opts(true, chunks, chunk)).unwrap(),
            );
            // Q, K, V: 3 dispatches become 1; gate, up: 2 become 1.
            let what = format!("{name} chunk {chunk}, stacked chunks {chunks}");
            assert_eq!(
                a.dispatches_per_chunk - b.dispatches_per_chunk,
                want,
                "{what}"
            );
            assert_eq!(
                a.kernel_params_bytes - b.kernel_params_bytes,
                want * 256,
                "{what}"
            );
            assert_eq!(a.activation_bytes, b.activation_bytes, "{what}");
        }
        // The runtime allocates the sharing of the unstacked schedule; it must be valid for the
        // stacked one too: no two roles of one buffer live together there (intervals are
        // inclusive step ranges), and no bigger than the stacked schedule's own sharing.
        for (chunk, stacked_chunks) in [(1, true), (64, true), (1, false), (64, false)] {
            let sizes = llama_role_bytes(&cfg, chunk, false);
            let fusions = wgllm::plan::activations::Fusions {
                stacked_projections: true,
                stacked_gate_up: true,
                stacked_chunks,
                ..Default::default()
            };
            let sched = llama_schedule(&cfg, false, fusions);
            let stacked = share(&sched, &sizes, &LLAMA_PINNED, chunk);
            let runtime = llama_activation_plan(&cfg, chunk, false);
            assert_eq!(
                stacked.total_bytes, runtime.total_bytes,
                "{name} chunk {chunk}"
            );
            let live = |r: &str| &stacked.roles.iter().find(|p| p.name == r).unwrap().live;
            for b in &runtime.buffers {
                for (i, r1) in b.roles.iter().enumerate() {
                    for r2 in &b.roles[i + 1..] {
                        let clash = live(r1)
                            .iter()
                            .any(|&(s1, e1)| live(r2).iter().any(|&(s2, e2)| s1 <= e2 && s2 <= e1));
                        assert!(
                            !clash,
                            "{name} chunk {chunk}: {r1} and {r2} in '{}'",
                            b.label
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn staging_is_one_upload_chunk_and_the_logits_readback() {
    let p = plan("llama-2-13b", Precision::Q4_0, KvDtype::F16, 2048, None);
    assert_eq!(p.staging_upload_bytes, 64 * MIB);
    assert_eq!(p.staging_readback_bytes, 32000 * 4);
    // SmolLM2's largest q4_0 upload is the 49152 x 576 embedding: 49152 * 288 bytes, under 64 MiB.
    let s = plan("smollm2-135m", Precision::Q4_0, KvDtype::F16, 2048, None);
    assert_eq!(s.staging_upload_bytes, 49152 * 288);
}

fn check_sharing(a: &ActivationPlan) {
    let mut seen = BTreeMap::new();
    for (i, b) in a.buffers.iter().enumerate() {
        let sizes: Vec<u64> = b.roles.iter().map(|r| role(a, r).bytes).collect();
        assert_eq!(b.bytes, *sizes.iter().max().expect("roles"), "{}", b.label);
        assert_eq!(b.label, b.roles.join("+"));
        for r in &b.roles {
            assert!(seen.insert(r.clone(), i).is_none(), "{r} in two buffers");
        }
        for (x, ra) in b.roles.iter().enumerate() {
            for rb in &b.roles[x + 1..] {
                let (la, lb) = (&role(a, ra).live, &role(a, rb).live);
                let overlap = la
                    .iter()
                    .any(|&(s0, e0)| lb.iter().any(|&(s1, e1)| s0 <= e1 && s1 <= e0));
                assert!(
                    !overlap,
                    "{ra} and {rb} share '{}' but are live together",
                    b.label
                );
            }
        }
    }
    assert_eq!(seen, a.role_to_buffer);
    assert_eq!(
        a.total_bytes,
        a.buffers.iter().map(|b| b.bytes).sum::<u64>()
    );
}

fn role<'a>(a: &'a ActivationPlan, name: &str) -> &'a wgllm::plan::activations::RolePlan {
    a.roles
        .iter()
        .find(|r| r.name == name)
        .unwrap_or_else(|| panic!("role {name}"))
}

#[test]
fn activation_plan_of_llama_2_13b_shares_buffers_safely() {
    let cfg = preset("llama-2-13b");
    let a = llama_activation_plan(&cfg, 64, false);
    check_sharing(&a);
    for r in LLAMA_ROLES {
        assert!(a.buffer_of(r).is_some(), "{r}");
    }
    let sizes = llama_role_bytes(&cfg, 64, false);
    assert_eq!(sizes["q"], 64 * 40 * 128 * 4);
    assert_eq!(sizes["gate"], 64 * 13824 * 4);
    assert_eq!(sizes["logits"], 32000 * 4);
    assert_eq!(sizes["ids"], 64 * 4);
    assert_eq!(a.unshared_bytes, sizes.values().sum::<u64>());
    assert!(a.total_bytes < a.unshared_bytes);
    // The residual pair stays alone; gate, up and act meet in swiglu so they cannot share.
    for r in LLAMA_PINNED {
        assert_eq!(a.buffer_of(r).expect("pinned").roles, vec![r.to_string()]);
    }
    let b = |r: &str| a.role_to_buffer[r];
    assert!(b("gate") != b("up") && b("up") != b("act") && b("gate") != b("act"));
    // q is dead by the time gate is written; xb is dead while act lives.
    assert_eq!(b("q"), b("gate"));
    assert_eq!(b("xb"), b("act"));
    println!("{:#?}", a.buffers);
}

#[test]
fn decode_and_all_logits_plans_follow_the_chunk() {
    let cfg = preset("smollm2-135m");
    let d = llama_activation_plan(&cfg, 1, false);
    check_sharing(&d);
    assert_eq!(d.chunk, 1);
    assert_eq!(role(&d, "x").bytes, 576 * 4);
    assert_eq!(role(&d, "logits").bytes, 49152 * 4);
    let all = llama_activation_plan(&cfg, 16, true);
    check_sharing(&all);
    assert_eq!(role(&all, "logits").bytes, 16 * 49152 * 4);
    assert!(!all.steps.iter().any(|s| s == "copy last row"));
    // chunk 0 is planned as 1, like RunState.
    assert_eq!(llama_activation_plan(&cfg, 0, false), d);
}

/// A one-layer model with hidden 32, intermediate 32, two heads of 16 over one KV head and vocab
/// 264 (the issue's): its 264 x 32 head is small enough for the final norm to fold into it, and
/// then, keeping the last row's logits only, the head reads the row copied into `proj` (or `x`,
/// for a single token). The plan used to let `logits` take `proj`'s buffer, which the recorder
/// refused as one buffer bound as the head's input and output.
#[test]
fn a_head_with_the_final_norm_folded_in_keeps_its_input_apart_from_logits() {
    let mut cfg = preset("smollm2-135m");
    (cfg.vocab_size, cfg.hidden_size, cfg.ffn_size, cfg.n_layers) = (264, 32, 32, 1);
    (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim) = (2, 1, 16);
    cfg.tied_embeddings = true;
    for chunk in [1, 2, 3, 64] {
        let a = llama_activation_plan_with(&cfg, chunk, false, true);
        check_sharing(&a);
        let b = |r: &str| a.role_to_buffer[r];
        assert_ne!(b("proj"), b("logits"), "chunk {chunk}: {:#?}", a.buffers);
        // The head step reads what the folded norm would have read.
        let head = a
            .steps
            .iter()
            .position(|s| s == "matmul head")
            .expect("head");
        for r in ["x", "proj"] {
            let live = &role(&a, r).live;
            assert!(
                live.iter().any(|&(s, e)| s <= head && head <= e),
                "chunk {chunk}: {r} is dead at the head: {live:?}"
            );
        }
    }
    // Unfolded (no subgroup matvec), the head reads xb and proj may share with logits again.
    let a = llama_activation_plan_with(&cfg, 64, false, false);
    check_sharing(&a);
    let head = a
        .steps
        .iter()
        .position(|s| s == "matmul head")
        .expect("head");
    assert!(!role(&a, "proj")
        .live
        .iter()
        .any(|&(s, e)| s <= head && head <= e));
}

/// A role read at the top of the layer body and never written in it is live through the whole
/// body (the next layer reads it again), so a temporary born later in the body must not take its
/// buffer, although in straight-line order the role's last read comes first.
#[test]
fn a_role_live_across_the_loop_boundary_is_not_shared_inside_the_body() {
    let st = |label: &str, reads: &[&str], writes: &[&str]| Step {
        label: label.into(),
        kernel: Kernel::Add,
        reads: reads.iter().map(|s| s.to_string()).collect(),
        writes: writes.iter().map(|s| s.to_string()).collect(),
        folds: wgllm::plan::activations::Folds::Never,
    };
    let sched = Schedule {
        prologue: vec![st("init", &[], &["h", "c"])],
        layer: vec![
            st("use c", &["h", "c"], &["a"]),
            st("make t", &["a"], &["t"]),
            st("use t", &["t"], &["h"]),
        ],
        epilogue: vec![st("out", &["h"], &["y"])],
    };
    let sizes: BTreeMap<String, u64> = [("h", 10), ("c", 8), ("a", 8), ("t", 8), ("y", 8)]
        .map(|(k, v)| (k.to_string(), v))
        .into();
    let p = share(&sched, &sizes, &[], 1);
    check_sharing(&p);
    let b = |r: &str| p.role_to_buffer[r];
    assert_ne!(b("c"), b("t"), "c is read again by the next layer");
    assert_eq!(role(&p, "c").live, vec![(0, 3)]);
    // In the epilogue c is dead, so y may take its buffer.
    assert_eq!(b("y"), b("c"));
    // a dies at "make t", where t is born: they meet in one step and may not share (a kernel
    // never reads and writes one buffer); likewise h, read where a is born.
    assert_ne!(b("a"), b("t"));
    assert_ne!(b("h"), b("a"));
}

#[test]
fn training_footprint_dwarfs_inference() {
    let opts = PlanOptions {
        precision: Precision::Q4_0,
        kv: KvDtype::F16,
        ctx: 2048,
        budget: Some(12 * GIB),
        train: Some(TrainOptions {
            batch: 1,
            seq: 2048,
        }),
        ..Default::default()
    };
    let p = MemoryPlan::new(&preset("llama-2-13b"), opts).expect("plan");
    assert!(p.fits());
    let t = p.train.as_ref().expect("train plan");
    let n = 13_015_864_320u64;
    assert_eq!(t.params, n);
    assert_eq!(t.weights_bytes + t.gradients_bytes + t.adam_bytes, 16 * n);
    // s*b*h*(34 + 5*a*s/h) = 2048 * 5120 * (34 + 80).
    assert_eq!(t.activation_bytes_per_layer, 2048 * 5120 * 114);
    assert_eq!(t.logits_bytes, 4 * 2048 * 32000);
    assert_eq!(
        t.activation_bytes,
        40 * t.activation_bytes_per_layer + t.logits_bytes
    );
    assert_eq!(p.train_fits(), Some(false));
    assert!(t.total_bytes > 20 * p.total_bytes);
    let table = p.to_table();
    assert!(table.contains("fine-tuning instead"), "{table}");
    assert!(table.contains("Korthikanti"));
}

#[test]
fn reports_table_json_and_svg() {
    let p = plan(
        "llama-2-13b",
        Precision::Q4_0,
        KvDtype::F16,
        4096,
        Some(10 * GIB),
    );
    let t = p.to_table();
    for needle in [
        "parameters",
        "kv cache",
        "activations",
        "staging",
        "kernel params",
        "overhead",
        "budget",
        "fits: NO",
        "to fit the budget",
        "q8_0 KV cache at ctx 4096",
        "12*L*d^2",
        "13,015,864,320",
        "q4_1",
        "exact/naive",
    ] {
        assert!(t.contains(needle), "missing '{needle}' in\n{t}");
    }
    let j = p.to_json();
    assert_eq!(j["total_bytes"].as_u64(), Some(p.total_bytes));
    assert_eq!(j["fits"].as_bool(), Some(false));
    assert_eq!(j["options"]["kv"].as_str(), Some("f16"));
    assert_eq!(
        j["activations"]["role_to_buffer"]["q"]
            .as_u64()
            .map(|v| v as usize),
        Some(p.activations.role_to_buffer["q"])
    );
    assert!(j["suggestions"]["longest_ctx"].as_u64().is_some());
    let s = svg::stacked_bar(&p);
    assert!(s.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""));
    assert!(s.trim_end().ends_with("</svg>"));
    assert_eq!(s.matches("<text").count(), s.matches("</text>").count());
    for (name, _) in p.classes() {
        assert!(s.contains(name), "{name}");
    }
    assert!(s.contains("budget 10.0 GiB") && s.contains("stroke-dasharray"));
    assert!(
        !s.contains("http://") || s.matches("http://").count() == 1,
        "no external references"
    );
    if let Ok(dir) = std::env::var("WGLLM_PLAN_SVG_DIR") {
        std::fs::write(format!("{dir}/plan.svg"), &s).expect("write svg");
        let fits = plan(
            "llama-2-13b",
            Precision::Q4_0,
            KvDtype::Q8_0,
            4096,
            Some(12 * GIB),
        );
        std::fs::write(format!("{dir}/plan_fits.svg"), svg::stacked_bar(&fits)).expect("write svg");
    }
}

#[test]
fn bad_requests_are_refused() {
    let cfg = preset("smollm2-135m");
    let with = |ctx, chunk| PlanOptions {
        ctx,
        chunk,
        ..Default::default()
    };
    assert!(MemoryPlan::new(&cfg, with(0, 64)).is_err());
    assert!(MemoryPlan::new(&cfg, with(64, 0)).is_err());
    let mut odd = cfg.clone();
    odd.head_dim = 48;
    let q8 = PlanOptions {
        kv: KvDtype::Q8_0,
        ..Default::default()
    };
    assert!(MemoryPlan::new(&odd, q8).is_err());
    // Absurd sizes saturate rather than wrap, and are refused.
    let huge = PlanOptions {
        ctx: usize::MAX,
        chunk: usize::MAX / 2,
        ..Default::default()
    };
    assert!(MemoryPlan::new(&cfg, huge).is_err());
    // Past the trained context is planned, with a warning.
    let long = MemoryPlan::new(&preset("llama-2-7b"), with(8192, 64)).expect("plan");
    assert!(long.warnings.iter().any(|w| w.contains("trained context")));
}

#[test]
fn single_token_folds_drop_four_dispatches_a_layer_in_decode_only() {
    let cfg = preset("smollm2-135m");
    let opts = |chunk, single_token_folds, all_logits| PlanOptions {
        precision: Precision::Q4_0,
        chunk,
        single_token_folds,
        all_logits,
        ..Default::default()
    };
    let plan = |chunk, fold| MemoryPlan::new(&cfg, opts(chunk, fold, false)).unwrap();
    let layers = cfg.n_layers as u64;
    // attn_norm, the attention residual add + ffn_norm, SwiGLU and the FFN residual add a layer;
    // the final norm stays a pass (the 28 M-weight head is past NORM_FOLD_MAX_WEIGHTS)
    assert_eq!(
        plan(1, false).dispatches_per_chunk - plan(1, true).dispatches_per_chunk,
        4 * layers
    );
    assert_eq!(
        plan(64, false).dispatches_per_chunk,
        plan(64, true).dispatches_per_chunk
    );
    // A model whose gate/up are past the limit keeps the FFN norm (and so the add before it) as
    // a pass, and one whose Q/K/V are too keeps the attention norm: only SwiGLU and the FFN
    // residual fold.
    let big = preset("llama-2-7b");
    let plan_big = |fold| MemoryPlan::new(&big, opts(1, fold, false)).unwrap();
    assert_eq!(
        plan_big(false).dispatches_per_chunk - plan_big(true).dispatches_per_chunk,
        2 * big.n_layers as u64
    );
    // With every row's logits the final norm of a chunk is a pass again.
    let all = |chunk, fold| MemoryPlan::new(&cfg, opts(chunk, fold, true)).unwrap();
    assert_eq!(
        all(64, false).dispatches_per_chunk,
        all(64, true).dispatches_per_chunk
    );
    // The down projection reads gate and up as well as act, so they cannot share with proj: the
    // folded schedule's sharing is valid for both forms, and takes at least as much.
    assert!(plan(64, true).activation_bytes >= plan(64, false).activation_bytes);
}

/// `--resident-layers auto`: the ledger's budget caps wgllm's buffers only, so the overhead
/// estimate does not count against it; the device's reported budget covers everything the
/// process holds, so it does. Streaming keeps as many layers as fit, and fewer resident layers
/// never plan more.
#[test]
fn auto_resident_layers_weighs_each_limit_by_what_it_covers() {
    use wgllm::plan::Limits;
    let p = plan("llama-2-13b", Precision::Q4_0, KvDtype::F16, 4096, None);
    let layers = p.uniform_layer_bytes();
    let buffers = p.buffers_bytes();
    assert!(p.total_bytes > buffers);
    let ledger = |b| Limits {
        ledger: Some(b),
        device: None,
    };
    let device = |b| Limits {
        ledger: None,
        device: Some(b),
    };
    // Only the overhead estimate is over a ledger budget of exactly the buffers: all resident.
    assert_eq!(p.auto_resident_layers(&ledger(buffers), &layers), None);
    // The same bytes as the device's budget leave no room for the overhead: some layers stream.
    let r = p
        .auto_resident_layers(&device(buffers), &layers)
        .expect("streams");
    assert!(r > 0 && r < 40, "{r}");
    let streamed = p.with_streaming(r, &layers);
    assert!(streamed.within(&device(buffers)));
    assert!(!p.with_streaming(r + 1, &layers).within(&device(buffers)));
    assert_eq!(
        streamed.parameters_bytes,
        p.parameters_bytes - (40 - r as u64) * p.layer_weight_bytes + 2 * p.layer_weight_bytes
    );
    for k in 0..40 {
        assert!(
            p.with_streaming(k, &layers).total_bytes
                <= p.with_streaming(k + 1, &layers).total_bytes
        );
    }
    // Nothing fits: every layer streamed, tried rather than refused.
    assert_eq!(p.auto_resident_layers(&ledger(1 << 20), &layers), Some(0));
}

// ---- Mixed GGUF files and K-quant mixes -------------------------------------------------------

use wgllm::kernels::weights::WeightStorage;
use wgllm::loader::gguf::{GgmlType, Gguf};
use wgllm::model::params::{tensor_type, TensorRole};
use wgllm::plan::{config_type_table, gguf_type_table, DEFAULT_MAX_BINDING};

fn buffers() -> WeightStorage {
    WeightStorage::buffers(DEFAULT_MAX_BINDING)
}

/// A small LLaMA as llama.cpp's Q4_K_M would write it, typed by hand from its rules: hidden 320
/// (not whole 256-blocks: Q4_K falls back to Q5_0, Q6_K to Q8_0), FFN 512 (whole blocks), 8
/// layers of which `use_more_bits` picks 0, 3, 6 and 7, an untied head (Q6_K, so Q8_0 here).
const SMALL: (usize, usize, usize, usize, usize) = (320, 512, 8, 96, 64); // d, ffn, L, vocab, kv

fn small_q4_k_m_tensors() -> Vec<(String, Vec<u64>, GgmlType)> {
    let (d, f, l, v, kv) = SMALL;
    let more = [0, 3, 6, 7];
    let mut ts = vec![(
        "token_embd.weight".to_string(),
        vec![d as u64, v as u64],
        GgmlType::Q5_0,
    )];
    for i in 0..l {
        let m = |name: &str, cols: usize, rows: usize, t| {
            (format!("blk.{i}.{name}"), vec![cols as u64, rows as u64], t)
        };
        let big = more.contains(&i);
        ts.push(m("attn_q.weight", d, d, GgmlType::Q5_0));
        ts.push(m("attn_k.weight", d, kv, GgmlType::Q5_0));
        let v_type = if big { GgmlType::Q8_0 } else { GgmlType::Q5_0 };
        ts.push(m("attn_v.weight", d, kv, v_type));
        ts.push(m("attn_output.weight", d, d, GgmlType::Q5_0));
        ts.push(m("ffn_gate.weight", d, f, GgmlType::Q5_0));
        ts.push(m("ffn_up.weight", d, f, GgmlType::Q5_0));
        let down = if big { GgmlType::Q6_K } else { GgmlType::Q4_K };
        ts.push(m("ffn_down.weight", f, d, down));
        for norm in ["attn_norm.weight", "ffn_norm.weight"] {
            ts.push((format!("blk.{i}.{norm}"), vec![d as u64], GgmlType::F32));
        }
    }
    ts.push((
        "output_norm.weight".to_string(),
        vec![d as u64],
        GgmlType::F32,
    ));
    ts.push((
        "output.weight".to_string(),
        vec![d as u64, v as u64],
        GgmlType::Q8_0,
    ));
    ts
}

/// A GGUF v3 image of `tensors` (zero data of each type's size) with LLaMA metadata for `SMALL`.
fn small_gguf(tensors: &[(String, Vec<u64>, GgmlType)]) -> Vec<u8> {
    let (d, f, l, _, kv) = SMALL;
    let put_str = |b: &mut Vec<u8>, s: &str| {
        b.extend_from_slice(&(s.len() as u64).to_le_bytes());
        b.extend_from_slice(s.as_bytes());
    };
    let u32s = [
        ("llama.embedding_length", d as u32),
        ("llama.feed_forward_length", f as u32),
        ("llama.block_count", l as u32),
        ("llama.attention.head_count", (d / 64) as u32),
        ("llama.attention.head_count_kv", (kv / 64) as u32),
        ("llama.context_length", 256),
    ];
    let mut b = b"GGUF".to_vec();
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    b.extend_from_slice(&(u32s.len() as u64 + 2).to_le_bytes());
    put_str(&mut b, "general.architecture");
    b.extend_from_slice(&8u32.to_le_bytes());
    put_str(&mut b, "llama");
    for (k, x) in u32s {
        put_str(&mut b, k);
        b.extend_from_slice(&4u32.to_le_bytes());
        b.extend_from_slice(&x.to_le_bytes());
    }
    put_str(&mut b, "llama.attention.layer_norm_rms_epsilon");
    b.extend_from_slice(&6u32.to_le_bytes());
    b.extend_from_slice(&1e-5f32.to_le_bytes());
    let mut offset = 0u64;
    for (name, dims, t) in tensors {
        put_str(&mut b, name);
        b.extend_from_slice(&(dims.len() as u32).to_le_bytes());
        dims.iter()
            .for_each(|x| b.extend_from_slice(&x.to_le_bytes()));
        b.extend_from_slice(&t.id().to_le_bytes());
        b.extend_from_slice(&offset.to_le_bytes());
        offset = (offset + type_bytes(*t, dims)).next_multiple_of(32);
    }
    b.resize(b.len().next_multiple_of(32), 0);
    b.resize(b.len() + offset as usize, 0);
    b
}

/// Bytes of a tensor of `dims` (row length first) in type `t`.
fn type_bytes(t: GgmlType, dims: &[u64]) -> u64 {
    let n: u64 = dims.iter().product();
    n / t.block_len() as u64 * t.block_bytes() as u64
}

/// The recipe reproduces the hand-typed file tensor by tensor, and the file's per-type table
/// (counted from its tensor infos) is the config's at q4_k_m (counted from the recipe).
#[test]
fn a_mixed_file_counts_per_type_as_its_recipe() {
    let ts = small_q4_k_m_tensors();
    let g = Gguf::from_bytes("small-q4_k_m.gguf", small_gguf(&ts)).expect("valid GGUF");
    let (cfg, _) = wgllm::model::llama::config_from_gguf(&g).expect("a LLaMA config");
    for (name, dims, want) in &ts {
        let (role, layer) = TensorRole::from_gguf_name(name, dims.len(), false);
        let shape = (dims.get(1).copied().unwrap_or(1) as usize, dims[0] as usize);
        let got = tensor_type(
            Precision::Q4_K_M,
            role,
            layer.unwrap_or(0),
            cfg.n_layers,
            shape,
        );
        assert_eq!(got, *want, "{name}");
    }
    let file = gguf_type_table(&g, buffers()).unwrap();
    let recipe = config_type_table(&cfg, Precision::Q4_K_M, buffers()).unwrap();
    let by_type = |t: &wgllm::plan::TypeTable| {
        let mut v: Vec<_> = t.rows.clone();
        v.sort_by(|a, b| a.ggml_type.cmp(&b.ggml_type));
        v
    };
    assert_eq!(by_type(&file), by_type(&recipe));
    assert_eq!(file.total, recipe.total);
    // Independently of either: counts, parameters and bytes from the tensor list.
    for row in &file.rows {
        let of: Vec<_> = ts.iter().filter(|t| t.2.name() == row.ggml_type).collect();
        assert_eq!(row.tensors, of.len() as u64, "{}", row.ggml_type);
        let params: u64 = of.iter().map(|t| t.1.iter().product::<u64>()).sum();
        assert_eq!(row.params, params, "{}", row.ggml_type);
        let bytes: u64 = of.iter().map(|t| type_bytes(t.2, &t.1)).sum();
        assert_eq!(row.file_bytes, bytes, "{}", row.ggml_type);
        assert!(row.uploaded_bytes >= row.params / 8, "{row:?}");
    }
    let count = |t: &str| file.get(t).map_or(0, |r| r.tensors);
    assert_eq!(
        [
            count("Q5_0"),
            count("Q8_0"),
            count("Q6_K"),
            count("Q4_K"),
            count("F32")
        ],
        [45, 5, 4, 4, 17]
    );
    assert_eq!(file.total.params, params::count(&cfg).total);

    // The plan of the file books its tensors as uploaded, and so does the config's at q4_k_m.
    let mut p = MemoryPlan::new(&cfg, PlanOptions::default()).unwrap();
    p.use_gguf_weights(&g, buffers()).unwrap();
    assert_eq!(p.parameters_bytes, file.total.uploaded_bytes);
    assert_eq!(p.tensor_types, file);
    let q = MemoryPlan::new(
        &cfg,
        PlanOptions {
            precision: Precision::Q4_K_M,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(q.tensor_types, recipe);
    assert_eq!(q.parameters_bytes, p.parameters_bytes);
}

/// `wgllm plan -m FILE --json` carries the per-type table; the text report prints it.
#[test]
fn plan_cli_prints_the_per_type_table_of_a_file() {
    let ts = small_q4_k_m_tensors();
    let path = std::env::temp_dir().join(format!("wgllm-plan-mixed-{}.gguf", std::process::id()));
    std::fs::write(&path, small_gguf(&ts)).unwrap();
    let run = |json: bool| {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_wgllm"));
        c.arg("plan").arg("-m").arg(&path);
        if json {
            c.arg("--json");
        }
        let out = c.output().expect("wgllm runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let v: serde_json::Value = serde_json::from_str(&run(true)).expect("JSON");
    let rows = v["tensor_types"]["rows"].as_array().expect("rows");
    let q6 = rows
        .iter()
        .find(|r| r["ggml_type"] == "Q6_K")
        .expect("Q6_K row");
    assert_eq!(q6["tensors"], 4);
    assert_eq!(v["tensor_types"]["total"]["tensors"], ts.len());
    let text = run(false);
    assert!(text.contains("parameters by tensor type"), "{text}");
    assert!(
        text.lines().any(|l| l.trim_start().starts_with("Q5_0")),
        "{text}"
    );
    let _ = std::fs::remove_file(&path);
}

/// The Gemma 3 270M Q4_K_M file from GGUF-my-repo: its counts as published (236 tensors: Q5_0
/// 81, Q4_K 27, Q8_0 10, Q6_K 9, F32 109; 268,098,176 parameters in 246,587,904 bytes), and
/// every tensor of it the type llama.cpp's Q4_K_M recipe gives it.
#[test]
fn the_gemma_file_counts_as_published_and_follows_the_recipe() {
    let Some(path) = common::packaged_model(&wgllm::fetch::GEMMA3_270M) else {
        return;
    };
    let g = Gguf::open(&path).unwrap();
    let t = gguf_type_table(&g, buffers()).unwrap();
    let count = |n: &str| t.get(n).map_or(0, |r| r.tensors);
    assert_eq!(
        [
            count("Q5_0"),
            count("Q4_K"),
            count("Q8_0"),
            count("Q6_K"),
            count("F32")
        ],
        [81, 27, 10, 9, 109]
    );
    assert_eq!(
        (t.total.tensors, t.total.params, t.total.file_bytes),
        (236, 268_098_176, 246_587_904)
    );
    let tied = g.tensor("output.weight").is_err();
    let n_layers = g.get_u32("gemma3.block_count").unwrap() as usize;
    for ti in g.tensors() {
        let (role, layer) = TensorRole::from_gguf_name(&ti.name, ti.shape.len(), tied);
        let rows = ti.shape.iter().skip(1).product::<usize>().max(1);
        let want = tensor_type(
            Precision::Q4_K_M,
            role,
            layer.unwrap_or(0),
            n_layers,
            (rows, ti.shape[0]),
        );
        assert_eq!(ti.ggml_type, want, "{}", ti.name);
    }
}

/// The 13B plan at q4_k_m: parameters as llama.cpp's file holds them (within 2% of the published
/// 7.87 GB), booked in the formats the loader uploads their types in (K-quants as they are), and
/// the whole run inside 12 GiB at 4k context with an f16 KV cache.
#[test]
fn llama_2_13b_q4_k_m_plan_counts_the_recipe_and_fits_12_gib_at_4k() {
    let p = plan(
        "llama-2-13b",
        Precision::Q4_K_M,
        KvDtype::F16,
        4096,
        Some(12 * GIB),
    );
    assert!(p.fits(), "{} bytes", p.total_bytes);
    let published = 7_870_000_000f64;
    let diff = (p.parameters_bytes as f64 - published) / published;
    assert!(diff.abs() < 0.02, "parameters {:+.3}%", diff * 100.0);
    let t = &p.tensor_types;
    for row in &t.rows {
        // Each type is uploaded as itself: Q4_K as q4_k, Q6_K as q6_k, F32 as f32.
        assert_eq!(
            row.format.name(),
            row.ggml_type.to_ascii_lowercase(),
            "{row:?}"
        );
        assert_eq!(
            row.uploaded_bytes, row.file_bytes,
            "uploaded as stored: {row:?}"
        );
    }
    assert_eq!(t.total.params, params::count(&p.cfg).total);
    let diff = (t.total.file_bytes as f64 - published) / published;
    assert!(diff.abs() < 0.02, "{:+.3}%", diff * 100.0);
    assert_eq!(p.weights.file_bytes, t.total.file_bytes);
    assert_eq!(p.parameters_bytes, t.total.uploaded_bytes);
    // Buffers of whole words hold the K-quant blocks as they are: nothing to align.
    assert_eq!(p.parameters_bytes, p.weights.exact_bytes);
    let sum: u64 = t.rows.iter().map(|r| r.uploaded_bytes).sum();
    assert_eq!(sum, t.total.uploaded_bytes);
    // One layer's bytes are the largest layer's (a use_more_bits layer).
    let layer0: u64 = params::typed_tensors(&p.cfg, Precision::Q4_K_M)
        .iter()
        .filter(|t| t.layer == Some(0))
        .map(|t| t.bytes())
        .sum();
    assert_eq!(p.layer_weight_bytes, layer0);
}

/// Dispatches of one 13B decode layer (a one-token chunk at the default 2k context; the
/// difference between 40 and 39 layers) on a GPU before the workgroup matvec folded or stacked
/// (no single-token folds, no stacking), on a GPU now (`DeviceTraits::default()`: the workgroup
/// matvec, Q/K/V and gate/up stacked in buffers, norms folded into projections of any size) and
/// on lavapipe (the subgroup matvec, weights stacked in textures).
#[test]
fn a_13b_decode_layer_on_a_gpu_folds_as_lavapipes_does() {
    use wgllm::plan::DeviceTraits;
    let per_layer = |opts: PlanOptions| {
        let mut cfg = preset("llama-2-13b");
        let mut count = |layers| {
            cfg.n_layers = layers;
            MemoryPlan::new(&cfg, opts.clone())
                .unwrap()
                .dispatches_per_chunk
        };
        count(40) - count(39)
    };
    let base = PlanOptions {
        precision: Precision::Q4_0,
        chunk: 1,
        ..Default::default()
    };
    let before = per_layer(base.clone());
    let gpu = per_layer(base.clone().for_device(&DeviceTraits::default()));
    let lavapipe_traits = DeviceTraits {
        weight_layout: wgllm::gpu::WeightLayout::Textures,
        subgroup_matvec: true,
        ..Default::default()
    };
    let lavapipe = per_layer(base.for_device(&lavapipe_traits));
    eprintln!(
        "13B decode layer dispatches: GPU before {before}, GPU now {gpu}, lavapipe {lavapipe}"
    );
    // attn_norm, the attention residual add + FFN norm, SwiGLU and the FFN residual add fold (4
    // fewer), Q/K/V and gate/up are one stacked dispatch each (3 fewer): Q/K/V, RoPE + store,
    // attention, wo (+ residual), gate/up, down (SwiGLU in, + residual).
    assert_eq!(before - gpu, 7);
    // Both split a decode step's attention over the keys at this context (the split and the
    // merge). Lavapipe stacks Q/K/V and gate/up too but keeps its norms as passes at 13B
    // (NORM_FOLD_MAX_WEIGHTS: 2 more): two dispatches more than a GPU, whose stacks in buffers
    // take the norms in.
    assert_eq!(gpu, 7);
    assert_eq!(lavapipe, 9);
    // A stack that would not fit one binding stays apart: at a 64 MiB binding 13B's gate and up
    // together (80 MB of Q4_0) are two matrices again, while Q/K/V (44 MB) still stack.
    let small = DeviceTraits {
        max_binding: 64 << 20,
        ..Default::default()
    };
    let apart = PlanOptions {
        precision: Precision::Q4_0,
        chunk: 1,
        ..Default::default()
    };
    assert_eq!(per_layer(apart.for_device(&small)), 8);
}
