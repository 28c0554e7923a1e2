//! The BERT encoder as the planner sees it: a batch of sequences in one pass. [`bert_schedule`]
//! writes down the kernel sequence of `Bert::hidden_states_batch` (src/model/bert.rs) in the
//! roles of [`super::activations`], [`bert_activation_plan`] shares them by liveness (the buffers
//! `Bert`'s `RunState` allocates), and [`bert_uploads`] lists what `Bert::load` uploads.
//!
//! A batch lays its sequences one after another, each in a *slot* of [`sequence_slot`] rows: every
//! row-wise kernel (matmuls, norms, GELU, adds) runs once over all rows, and attention runs once
//! per sequence, bound at the sequence's first row so that it sees only that sequence's keys. A
//! binding's offset must be a multiple of the device's storage offset alignment, at most
//! [`SEQUENCE_ALIGN`] bytes on any WebGPU device, so a slot's rows are rounded up to a multiple of
//! that many bytes (`hidden * 4` is one already for hidden sizes that are multiples of 64).

use std::collections::BTreeMap;

use super::activations::{share, step, ActivationPlan, Kernel, Schedule};
use super::uploads::{layer, once, Upload, UploadKind};
use crate::model::config::ModelConfig;

/// Bytes a sequence's first row is aligned to: WebGPU's largest `min_storage_buffer_offset_alignment`.
pub const SEQUENCE_ALIGN: u64 = 256;

/// The roles of [`bert_schedule`], in the order the pass first touches them.
pub const BERT_ROLES: [&str; 11] = [
    "ids", "pos_ids", "proj", "x", "sum", "q", "k", "v", "att", "inter", "act",
];

/// Rows a sequence of `seq` tokens takes in a batch of `hidden`-wide rows: `seq` rounded up so
/// that every slot starts at a multiple of [`SEQUENCE_ALIGN`] bytes.
pub fn sequence_slot(seq: usize, hidden: usize) -> usize {
    let row = (hidden as u64).saturating_mul(4).max(1);
    // Rows whose bytes are a multiple of the alignment: ALIGN / gcd(row, ALIGN).
    let (mut a, mut b) = (row, SEQUENCE_ALIGN);
    while b != 0 {
        (a, b) = (b, a % b);
    }
    let unit = (SEQUENCE_ALIGN / a) as usize;
    seq.max(1).div_ceil(unit).saturating_mul(unit)
}

/// `Bert::hidden_states_batch` step by step, for a pass of `batch` sequences of up to
/// `max_tokens` tokens. Token types are all 0: the position table holds positions plus token
/// type 0's row, summed at load.
pub fn bert_schedule(cfg: &ModelConfig, batch: usize, max_tokens: usize) -> Schedule {
    let (d, f) = (cfg.hidden_size, cfg.ffn_size);
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
            "embedding words",
            Kernel::Embedding {
                rows: cfg.vocab_size,
                cols: d,
            },
            &["ids"],
            &["proj"],
        ),
        step(
            "embedding positions + token type",
            Kernel::TableF32 {
                rows: max_tokens,
                cols: d,
            },
            &["pos_ids"],
            &["x"],
        ),
        step("add embeddings", Kernel::Add, &["proj", "x"], &["sum"]),
        step("embedding LayerNorm", Kernel::LayerNorm, &["sum"], &["x"]),
    ];
    let bias = |r: &str| step(&format!("bias {r}"), Kernel::AddBias, &[r], &[r]);
    let layer = vec![
        step("matmul query", mm(q, d), &["x"], &["q"]),
        bias("q"),
        step("matmul key", mm(kv, d), &["x"], &["k"]),
        bias("k"),
        step("matmul value", mm(kv, d), &["x"], &["v"]),
        bias("v"),
        // The K and V projections are the attention's f32 store: no cache, no copy.
        step(
            "attention (each sequence)",
            Kernel::DenseAttention { sequences: batch },
            &["q", "k", "v"],
            &["att"],
        ),
        step("matmul attention output", mm(d, q), &["att"], &["proj"]),
        bias("proj"),
        step(
            "residual add (attention)",
            Kernel::Add,
            &["x", "proj"],
            &["sum"],
        ),
        step("attention LayerNorm", Kernel::LayerNorm, &["sum"], &["x"]),
        step("matmul intermediate", mm(f, d), &["x"], &["inter"]),
        bias("inter"),
        step("gelu", Kernel::Gelu, &["inter"], &["act"]),
        step("matmul output", mm(d, f), &["act"], &["proj"]),
        bias("proj"),
        step("residual add (ffn)", Kernel::Add, &["x", "proj"], &["sum"]),
        step("output LayerNorm", Kernel::LayerNorm, &["sum"], &["x"]),
    ];
    let epilogue = vec![step("read back hidden states", Kernel::Host, &["x"], &[])];
    Schedule {
        prologue,
        layer,
        epilogue,
    }
}

/// The bytes of every [`BERT_ROLES`] entry for `batch` sequences of up to `max_tokens` tokens
/// (f32 activations, u32 token and position ids), each in its [`sequence_slot`].
pub fn bert_role_bytes(
    cfg: &ModelConfig,
    batch: usize,
    max_tokens: usize,
) -> BTreeMap<String, u64> {
    let rows = (batch as u64).saturating_mul(sequence_slot(max_tokens, cfg.hidden_size) as u64);
    let d = cfg.hidden_size as u64;
    let q = (cfg.n_heads as u64).saturating_mul(cfg.head_dim as u64);
    let kv = (cfg.n_kv_heads as u64).saturating_mul(cfg.head_dim as u64);
    let f = cfg.ffn_size as u64;
    let widths = [1, 1, d, d, d, q, kv, kv, q, f, f];
    BERT_ROLES
        .iter()
        .zip(widths)
        .map(|(r, w)| (r.to_string(), rows.saturating_mul(w).saturating_mul(4)))
        .collect()
}

/// The shared activation buffers of a BERT pass over `batch` sequences of up to `max_tokens`
/// tokens (each at least 1): what `Bert`'s `RunState` allocates. The plan's `chunk` is the rows of
/// the batch.
pub fn bert_activation_plan(cfg: &ModelConfig, batch: usize, max_tokens: usize) -> ActivationPlan {
    let (batch, max_tokens) = (batch.max(1), max_tokens.max(1));
    let sizes = bert_role_bytes(cfg, batch, max_tokens);
    let rows = batch.saturating_mul(sequence_slot(max_tokens, cfg.hidden_size));
    share(&bert_schedule(cfg, batch, max_tokens), &sizes, &[], rows)
}

/// What `Bert::load` uploads for sequences of up to `max_tokens` tokens, in order: the word
/// embeddings, the position table (positions `0..max_tokens` plus token type 0, f32), the
/// embedding LayerNorm, and each layer's matrices, biases and LayerNorms. The pooler is not used
/// and not uploaded.
pub fn bert_uploads(cfg: &ModelConfig, max_tokens: usize) -> Vec<Upload> {
    let (d, f) = (cfg.hidden_size, cfg.ffn_size);
    let q = cfg.n_heads.saturating_mul(cfg.head_dim);
    let kv = cfg.n_kv_heads.saturating_mul(cfg.head_dim);
    let m = |rows, cols| UploadKind::Matrix { rows, cols };
    let vec = |len| UploadKind::Vector { len };
    vec![
        once("word_embeddings", m(cfg.vocab_size, d)),
        once(
            "pos_type",
            UploadKind::MatrixF32 {
                rows: max_tokens,
                cols: d,
            },
        ),
        once("embeddings.LayerNorm.weight", vec(d)),
        once("embeddings.LayerNorm.bias", vec(d)),
        layer("query", m(q, d)),
        layer("query.bias", vec(q)),
        layer("key", m(kv, d)),
        layer("key.bias", vec(kv)),
        layer("value", m(kv, d)),
        layer("value.bias", vec(kv)),
        layer("attention.output", m(d, q)),
        layer("attention.output.bias", vec(d)),
        layer("attention.output.LayerNorm.weight", vec(d)),
        layer("attention.output.LayerNorm.bias", vec(d)),
        layer("intermediate", m(f, d)),
        layer("intermediate.bias", vec(f)),
        layer("output", m(d, f)),
        layer("output.bias", vec(d)),
        layer("output.LayerNorm.weight", vec(d)),
        layer("output.LayerNorm.bias", vec(d)),
    ]
}
