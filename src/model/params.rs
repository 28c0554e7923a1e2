//! Exact parameter counts of a [`ModelConfig`], module by module, and the bytes its weights take at
//! each precision.
//!
//! The count walks the same tensors the checkpoint holds (HF `state_dict` of the base model plus
//! the LM head where untied), so it reproduces the published totals exactly: Llama-2-7B
//! 6,738,415,616, GPT-2 124,439,808, `BertModel` base 109,482,240, and so on (see `tests/params.rs`).
//!
//! Storage in wgllm: the token, position and token-type embeddings and every projection matrix
//! (attention, FFN, untied LM head, BERT pooler) take the chosen [`Precision`]; norm gains and betas
//! and all biases stay f32, since they are tiny and a quantised norm gain would scale whole rows of
//! activations by its rounding error.

use serde::Serialize;

use super::config::{Arch, Ffn, ModelConfig, Norm, Positions};
use crate::error::{Error, Result};
use crate::quant::WeightFormat;

/// How a tensor is stored, which decides its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum ParamClass {
    /// Lookup tables (token, position, token type): the chosen precision.
    Embedding,
    /// Projection matrices: the chosen precision.
    Matrix,
    /// Norm gains/betas and biases: always f32.
    NormOrBias,
}

/// One kind of tensor of the model, `copies` times (once, or once per layer).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ParamTensor {
    /// `embed_tokens`, `layers.attn_q`, `final_norm`, ...
    pub name: String,
    /// Output rows of a matrix; for a norm, its number of vectors (1 for RMSNorm's gain, 2 for
    /// LayerNorm's gain and beta); 1 for a bias.
    pub rows: usize,
    /// Row length: the input width of a matrix, the length of a vector.
    pub cols: usize,
    /// 1, or `n_layers` for a per-layer tensor.
    pub copies: usize,
    pub class: ParamClass,
}

impl ParamTensor {
    /// Parameters in all copies.
    pub fn params(&self) -> u64 {
        mul(mul(self.rows as u64, self.cols as u64), self.copies as u64)
    }
}

// Saturating so that an absurd hand-built config gives an absurd number, not an overflow panic;
// configs from JSON are bounded by `ModelConfig::validate`.
fn mul(a: u64, b: u64) -> u64 {
    a.saturating_mul(b)
}

fn sum(it: impl IntoIterator<Item = u64>) -> u64 {
    it.into_iter().fold(0, u64::saturating_add)
}

/// Every tensor of the model in checkpoint order: embeddings, one layer's tensors (with
/// `copies = n_layers`), final norm, LM head, pooler. Tensors of zero size are left out.
pub fn tensors(cfg: &ModelConfig) -> Vec<ParamTensor> {
    use ParamClass::{Embedding, Matrix, NormOrBias};
    let d = cfg.hidden_size;
    let q = cfg.n_heads.saturating_mul(cfg.head_dim);
    let kv = cfg.n_kv_heads.saturating_mul(cfg.head_dim);
    let f = cfg.ffn_size;
    let norm_rows = match cfg.norm {
        Norm::RmsNorm => 1,
        Norm::LayerNorm => 2,
    };
    let mut out = Vec::new();
    let mut push = |name: &str, rows: usize, cols: usize, per_layer: bool, class| {
        let copies = if per_layer { cfg.n_layers } else { 1 };
        if rows > 0 && cols > 0 && copies > 0 {
            let name = if per_layer {
                format!("layers.{name}")
            } else {
                name.to_string()
            };
            out.push(ParamTensor {
                name,
                rows,
                cols,
                copies,
                class,
            });
        }
    };

    push("embed_tokens", cfg.vocab_size, d, false, Embedding);
    if cfg.positions == Positions::Learned {
        push("embed_positions", cfg.max_positions, d, false, Embedding);
    }
    push(
        "embed_token_types",
        cfg.type_vocab_size,
        d,
        false,
        Embedding,
    );
    if cfg.arch == Arch::Bert {
        push("embed_norm", norm_rows, d, false, NormOrBias);
    }

    // One layer. K and V are n_kv_heads wide (grouped-query attention).
    for (name, rows, bias) in [
        ("attn_q", q, cfg.attn_bias),
        ("attn_k", kv, cfg.attn_bias),
        ("attn_v", kv, cfg.attn_bias),
    ] {
        push(name, rows, d, true, Matrix);
        if bias {
            push(&format!("{name}_bias"), 1, rows, true, NormOrBias);
        }
    }
    push("attn_o", d, q, true, Matrix);
    if cfg.attn_out_bias {
        push("attn_o_bias", 1, d, true, NormOrBias);
    }
    push("attn_norm", norm_rows, d, true, NormOrBias);
    let ffn_mats: &[(&str, usize, usize)] = match cfg.ffn {
        Ffn::SwiGlu | Ffn::GeGluTanh => &[("ffn_gate", f, d), ("ffn_up", f, d), ("ffn_down", d, f)],
        Ffn::Gelu => &[("ffn_up", f, d), ("ffn_down", d, f)],
    };
    for &(name, rows, cols) in ffn_mats {
        push(name, rows, cols, true, Matrix);
        if cfg.ffn_bias {
            push(&format!("{name}_bias"), 1, rows, true, NormOrBias);
        }
    }
    push("ffn_norm", norm_rows, d, true, NormOrBias);
    if cfg.gemma.is_some() {
        // Gemma 3: q and k norms of one head's width, norms after the attention and the FFN.
        push("attn_q_norm", 1, cfg.head_dim, true, NormOrBias);
        push("attn_k_norm", 1, cfg.head_dim, true, NormOrBias);
        push("post_attention_norm", 1, d, true, NormOrBias);
        push("post_ffw_norm", 1, d, true, NormOrBias);
    }

    // BERT is post-norm: each layer ends in a norm, so there is no final one.
    if cfg.arch != Arch::Bert {
        push("final_norm", norm_rows, d, false, NormOrBias);
    }
    // BertModel has no LM head; a tied head is the token embedding, counted once above.
    if cfg.arch != Arch::Bert && !cfg.tied_embeddings {
        push("lm_head", cfg.vocab_size, d, false, Matrix);
    }
    if cfg.pooler {
        push("pooler", d, d, false, Matrix);
        push("pooler_bias", 1, d, false, NormOrBias);
    }
    out
}

/// Parameter counts by module.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ParamCount {
    /// `(name, parameters)` in checkpoint order; per-layer modules (`layers.*`) are summed over all
    /// layers, so the entries add up to `total`. Modules the architecture lacks are absent.
    pub modules: Vec<(String, u64)>,
    /// Parameters of one layer.
    pub per_layer: u64,
    pub total: u64,
}

impl ParamCount {
    /// Parameters of module `name` (0 when the model has none, e.g. `lm_head` when tied).
    pub fn get(&self, name: &str) -> u64 {
        self.modules
            .iter()
            .find(|(n, _)| n == name)
            .map_or(0, |(_, p)| *p)
    }
}

/// The exact parameter count of `cfg`.
pub fn count(cfg: &ModelConfig) -> ParamCount {
    let ts = tensors(cfg);
    let per_layer = sum(ts
        .iter()
        .filter(|t| t.name.starts_with("layers."))
        .map(|t| mul(t.rows as u64, t.cols as u64)));
    let modules: Vec<(String, u64)> = ts.iter().map(|t| (t.name.clone(), t.params())).collect();
    let total = sum(modules.iter().map(|(_, p)| *p));
    ParamCount {
        modules,
        per_layer,
        total,
    }
}

/// The textbook estimate `12 L d² + V d (+ P d with learned positions)`: four `d x d` attention
/// matrices and two `d x 4d` FFN matrices per layer, ignoring GQA, SwiGLU widths, norms, biases
/// and an untied head.
pub fn textbook_estimate(cfg: &ModelConfig) -> u64 {
    let d = cfg.hidden_size as u64;
    let layers = mul(mul(12, cfg.n_layers as u64), mul(d, d));
    let positions = match cfg.positions {
        Positions::Learned => mul(cfg.max_positions as u64, d),
        Positions::Rotary { .. } | Positions::Sinusoidal => 0,
    };
    sum([layers, mul(cfg.vocab_size as u64, d), positions])
}

/// `(textbook - exact) / exact`: negative when the estimate is short.
pub fn textbook_relative_diff(cfg: &ModelConfig) -> f64 {
    let exact = count(cfg).total as f64;
    (textbook_estimate(cfg) as f64 - exact) / exact.max(1.0)
}

/// The precision the embeddings and matrices are stored in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum Precision {
    F32,
    F16,
    Bf16,
    Q8_0,
    Q4_0,
    Q4_1,
}

impl Precision {
    pub const ALL: [Precision; 6] = [
        Precision::F32,
        Precision::F16,
        Precision::Bf16,
        Precision::Q8_0,
        Precision::Q4_0,
        Precision::Q4_1,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Precision::Bf16 => "bf16",
            p => p.storage().name(),
        }
    }

    pub fn parse(s: &str) -> Result<Precision> {
        Precision::ALL
            .into_iter()
            .find(|p| p.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| Error::Parse {
                what: "a precision",
                input: s.into(),
                reason: "use f32, f16, bf16, q8_0, q4_0 or q4_1".into(),
            })
    }

    /// The block format whose sizes apply; bf16 has f16's (2 bytes per weight).
    pub fn storage(self) -> WeightFormat {
        match self {
            Precision::F32 => WeightFormat::F32,
            Precision::F16 | Precision::Bf16 => WeightFormat::F16,
            Precision::Q8_0 => WeightFormat::Q8_0,
            Precision::Q4_0 => WeightFormat::Q4_0,
            Precision::Q4_1 => WeightFormat::Q4_1,
        }
    }

    /// The naive rule's bytes per parameter as `(numerator, denominator)`: 4, 2, 2, 1, 1/2, 1/2.
    pub fn naive_rate(self) -> (u64, u64) {
        match self {
            Precision::F32 => (4, 1),
            Precision::F16 | Precision::Bf16 => (2, 1),
            Precision::Q8_0 => (1, 1),
            Precision::Q4_0 | Precision::Q4_1 => (1, 2),
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Parameters and bytes of one storage class.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ClassBytes {
    pub params: u64,
    pub bytes: u64,
}

/// The weights' bytes at one precision, exact and by the naive rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct WeightBytes {
    pub precision: Precision,
    /// Embeddings and matrices in the precision's blocks (Q4_0: 18 bytes per 32 weights), norms
    /// and biases in f32.
    pub exact_bytes: u64,
    /// Every parameter at the naive rate (4, 2, 1 or 0.5 bytes), rounded up.
    pub naive_bytes: u64,
    pub embeddings: ClassBytes,
    pub matrices: ClassBytes,
    pub norms_biases: ClassBytes,
}

impl WeightBytes {
    /// `exact / naive`: 1.125 for Q4_0 and Q8_0's 4.5 and 8.5 bits, plus the f32 norms' share.
    pub fn ratio(&self) -> f64 {
        self.exact_bytes as f64 / self.naive_bytes.max(1) as f64
    }
}

/// Bytes of `cfg`'s weights at `precision`. Each row of a matrix or table is whole blocks
/// (`ceil(cols / block_len)`), as the block formats store it; every preset's rows are multiples of
/// 32, where this equals `WeightFormat::bytes_for(rows * cols)`. wgllm's GPU layout (`quant::repack`)
/// takes the same bytes, up to one padding word per matrix.
pub fn weight_bytes(cfg: &ModelConfig, precision: Precision) -> WeightBytes {
    let fmt = precision.storage();
    let (mut emb, mut mat, mut small) = (
        ClassBytes::default(),
        ClassBytes::default(),
        ClassBytes::default(),
    );
    for t in tensors(cfg) {
        let params = t.params();
        let (class, bytes) = match t.class {
            ParamClass::NormOrBias => (&mut small, mul(params, 4)),
            c => {
                let blocks = (t.cols as u64).div_ceil(fmt.block_len() as u64);
                let row_bytes = mul(blocks, fmt.block_bytes() as u64);
                let bytes = mul(mul(row_bytes, t.rows as u64), t.copies as u64);
                (
                    if c == ParamClass::Embedding {
                        &mut emb
                    } else {
                        &mut mat
                    },
                    bytes,
                )
            }
        };
        class.params = class.params.saturating_add(params);
        class.bytes = class.bytes.saturating_add(bytes);
    }
    let total = sum([emb.params, mat.params, small.params]);
    let (num, den) = precision.naive_rate();
    WeightBytes {
        precision,
        exact_bytes: sum([emb.bytes, mat.bytes, small.bytes]),
        naive_bytes: mul(total, num).div_ceil(den),
        embeddings: emb,
        matrices: mat,
        norms_biases: small,
    }
}
