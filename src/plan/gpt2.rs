//! The GPT-2 forward pass as the planner sees it: [`gpt2_schedule`] writes down the kernel
//! sequence of `Gpt2::forward_chunk` (src/model/gpt2.rs) in the roles of
//! [`super::activations`], [`gpt2_activation_plan`] shares them by liveness (the buffers
//! `Gpt2`'s `RunState` allocates), and [`gpt2_uploads`] lists what `Gpt2::load` uploads.
//!
//! GPT-3 configs ([`crate::model::config::Arch::Gpt3`]) have the same layout and are planned with
//! the same schedule, as a description: wgllm does not run them.

use std::collections::BTreeMap;

use super::activations::{share, step, ActivationPlan, Kernel, Schedule};
use super::uploads::{layer, once, Upload, UploadKind};
use crate::model::config::ModelConfig;

/// The roles of [`gpt2_schedule`], in the order the forward pass first touches them.
pub const GPT2_ROLES: [&str; 13] = [
    "ids", "pos_ids", "x", "x2", "xb", "q", "k", "v", "att", "proj", "fc", "act", "logits",
];

/// The residual stream ping-pongs between `x` and `x2` by swapping views, as in LLaMA's pass
/// ([`super::activations::LLAMA_PINNED`]): both are kept apart from every other role.
pub const GPT2_PINNED: [&str; 2] = ["x", "x2"];

/// `Gpt2::forward_chunk` step by step. Without `all_logits` the last row is copied into `proj`
/// before the final norm (a single-token chunk normalises `x` directly; the schedule lists both
/// reads). The head is the tied token embedding.
pub fn gpt2_schedule(cfg: &ModelConfig, all_logits: bool) -> Schedule {
    let (d, v, f) = (cfg.hidden_size, cfg.vocab_size, cfg.ffn_size);
    let q = cfg.n_heads.saturating_mul(cfg.head_dim);
    let kv = cfg.n_kv_heads.saturating_mul(cfg.head_dim);
    let mm = |rows, cols| Kernel::Matmul { rows, cols };
    let prologue = vec![
        step(
            "upload token and position ids",
            Kernel::Host,
            &[],
            &["ids", "pos_ids"],
        ),
        step(
            "embedding wte",
            Kernel::Embedding { rows: v, cols: d },
            &["ids"],
            &["x2"],
        ),
        step(
            "embedding wpe",
            Kernel::Embedding {
                rows: cfg.max_positions,
                cols: d,
            },
            &["pos_ids"],
            &["xb"],
        ),
        step("add positions", Kernel::Add, &["x2", "xb"], &["x"]),
    ];
    let bias = |r: &str| step(&format!("bias {r}"), Kernel::AddBias, &[r], &[r]);
    let layer = vec![
        step("ln_1", Kernel::LayerNorm, &["x"], &["xb"]),
        step("matmul wq", mm(q, d), &["xb"], &["q"]),
        bias("q"),
        step("matmul wk", mm(kv, d), &["xb"], &["k"]),
        bias("k"),
        step("matmul wv", mm(kv, d), &["xb"], &["v"]),
        bias("v"),
        step("kv store", Kernel::KvStore, &["k", "v"], &[]),
        step(
            "attention",
            Kernel::DenseAttention { sequences: 1 },
            &["q"],
            &["att"],
        ),
        step("matmul c_proj (attention)", mm(d, q), &["att"], &["proj"]),
        bias("proj"),
        step(
            "residual add (attention)",
            Kernel::Add,
            &["x", "proj"],
            &["x2"],
        ),
        step("ln_2", Kernel::LayerNorm, &["x2"], &["xb"]),
        step("matmul c_fc", mm(f, d), &["xb"], &["fc"]),
        bias("fc"),
        step("gelu", Kernel::Gelu, &["fc"], &["act"]),
        step("matmul c_proj (ffn)", mm(d, f), &["act"], &["proj"]),
        bias("proj"),
        step("residual add (ffn)", Kernel::Add, &["x2", "proj"], &["x"]),
    ];
    let mut epilogue = Vec::new();
    let norm_in: &[&str] = if all_logits {
        &["x"]
    } else {
        epilogue.push(step("copy last row", Kernel::Copy, &["x"], &["proj"]));
        &["x", "proj"]
    };
    epilogue.extend([
        step("ln_f", Kernel::LayerNorm, norm_in, &["xb"]),
        step("matmul head (wte)", mm(v, d), &["xb"], &["logits"]),
        step("read back logits", Kernel::Host, &["logits"], &[]),
    ]);
    Schedule {
        prologue,
        layer,
        epilogue,
    }
}

/// The bytes of every [`GPT2_ROLES`] entry for chunks of `chunk` tokens (f32 activations, u32
/// token and position ids).
pub fn gpt2_role_bytes(cfg: &ModelConfig, chunk: usize, all_logits: bool) -> BTreeMap<String, u64> {
    let m = chunk as u64;
    let d = cfg.hidden_size as u64;
    let q = (cfg.n_heads as u64).saturating_mul(cfg.head_dim as u64);
    let kv = (cfg.n_kv_heads as u64).saturating_mul(cfg.head_dim as u64);
    let f = cfg.ffn_size as u64;
    let n_logits = if all_logits { m } else { 1 };
    let widths = [1, 1, d, d, d, q, kv, kv, q, d, f, f];
    let sizes = widths
        .iter()
        .map(|&w| m.saturating_mul(w))
        .chain([n_logits.saturating_mul(cfg.vocab_size as u64)]);
    GPT2_ROLES
        .iter()
        .zip(sizes)
        .map(|(r, n)| (r.to_string(), n.saturating_mul(4)))
        .collect()
}

/// The shared activation buffers of the GPT-2 forward pass for chunks of `chunk` tokens (at least
/// 1): what `Gpt2`'s `RunState` allocates.
pub fn gpt2_activation_plan(cfg: &ModelConfig, chunk: usize, all_logits: bool) -> ActivationPlan {
    let chunk = chunk.max(1);
    let sizes = gpt2_role_bytes(cfg, chunk, all_logits);
    share(&gpt2_schedule(cfg, all_logits), &sizes, &GPT2_PINNED, chunk)
}

/// What `Gpt2::load` uploads, in order: the token and position tables, each layer's LayerNorms,
/// Q, K and V (`c_attn` split in three, transposed from `Conv1D`) with their biases, the
/// projections and FFN matrices with theirs, and the final LayerNorm. The head is `wte`.
pub fn gpt2_uploads(cfg: &ModelConfig) -> Vec<Upload> {
    let (d, f) = (cfg.hidden_size, cfg.ffn_size);
    let q = cfg.n_heads.saturating_mul(cfg.head_dim);
    let kv = cfg.n_kv_heads.saturating_mul(cfg.head_dim);
    let m = |rows, cols| UploadKind::Matrix { rows, cols };
    let vec = |len| UploadKind::Vector { len };
    vec![
        once("wte", m(cfg.vocab_size, d)),
        once("wpe", m(cfg.max_positions, d)),
        layer("ln_1.weight", vec(d)),
        layer("ln_1.bias", vec(d)),
        layer("wq", m(q, d)),
        layer("wk", m(kv, d)),
        layer("wv", m(kv, d)),
        layer("bq", vec(q)),
        layer("bk", vec(kv)),
        layer("bv", vec(kv)),
        layer("attn.c_proj", m(d, q)),
        layer("attn.c_proj.bias", vec(d)),
        layer("ln_2.weight", vec(d)),
        layer("ln_2.bias", vec(d)),
        layer("mlp.c_fc", m(f, d)),
        layer("mlp.c_fc.bias", vec(f)),
        layer("mlp.c_proj", m(d, f)),
        layer("mlp.c_proj.bias", vec(d)),
        once("ln_f.weight", vec(d)),
        once("ln_f.bias", vec(d)),
    ]
}
