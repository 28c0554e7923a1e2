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
use crate::loader::gguf::GgmlType;
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

/// The precision the embeddings and matrices are stored in: one format for all of them, or one of
/// llama.cpp's K-quant mixes (`Q4_K_M` ...), whose [`tensor_type`] differs by tensor and layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[allow(non_camel_case_types)]
pub enum Precision {
    F32,
    F16,
    Bf16,
    Q8_0,
    Q4_0,
    Q4_1,
    /// llama.cpp's `Q4_K_S`: Q4_K, with Q5_K for the first four attn_v and the first eighth of
    /// the ffn_down matrices.
    Q4_K_S,
    /// llama.cpp's `Q4_K_M`: Q4_K, with Q6_K for half of the attn_v and ffn_down matrices.
    Q4_K_M,
    /// llama.cpp's `Q5_K_S`: Q5_K.
    Q5_K_S,
    /// llama.cpp's `Q5_K_M`: Q5_K, with Q6_K for half of the attn_v and ffn_down matrices.
    Q5_K_M,
    /// llama.cpp's `Q6_K`: Q6_K throughout.
    Q6_K,
}

impl Precision {
    /// The single-format precisions (the K-quant mixes are [`Precision::K_MIXES`]).
    pub const ALL: [Precision; 6] = [
        Precision::F32,
        Precision::F16,
        Precision::Bf16,
        Precision::Q8_0,
        Precision::Q4_0,
        Precision::Q4_1,
    ];

    /// llama.cpp's K-quant mixes, largest first.
    pub const K_MIXES: [Precision; 5] = [
        Precision::Q6_K,
        Precision::Q5_K_M,
        Precision::Q5_K_S,
        Precision::Q4_K_M,
        Precision::Q4_K_S,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Precision::Bf16 => "bf16",
            Precision::Q4_K_S => "q4_k_s",
            Precision::Q4_K_M => "q4_k_m",
            Precision::Q5_K_S => "q5_k_s",
            Precision::Q5_K_M => "q5_k_m",
            Precision::Q6_K => "q6_k",
            p => p.storage().name(),
        }
    }

    pub fn parse(s: &str) -> Result<Precision> {
        Precision::ALL
            .into_iter()
            .chain(Precision::K_MIXES)
            .find(|p| p.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| Error::Parse {
                what: "a precision",
                input: s.into(),
                reason:
                    "use f32, f16, bf16, q8_0, q4_0, q4_1, q4_k_s, q4_k_m, q5_k_s, q5_k_m or q6_k"
                        .into(),
            })
    }

    /// A K-quant mix: each tensor's type comes from [`tensor_type`].
    pub fn is_mix(self) -> bool {
        self.mix_default().is_some()
    }

    /// The GGUF type of a mix's ordinary matrices (llama.cpp's `llama_ftype_get_default_type`).
    pub fn mix_default(self) -> Option<GgmlType> {
        match self {
            Precision::Q4_K_S | Precision::Q4_K_M => Some(GgmlType::Q4_K),
            Precision::Q5_K_S | Precision::Q5_K_M => Some(GgmlType::Q5_K),
            Precision::Q6_K => Some(GgmlType::Q6_K),
            _ => None,
        }
    }

    /// The block format whose sizes apply; bf16 has f16's (2 bytes per weight). For a mix, the
    /// format its ordinary matrices are uploaded in ([`crate::loader::gguf::weight_format`] of
    /// [`Precision::mix_default`]); its other tensors differ ([`tensor_type`]).
    pub fn storage(self) -> WeightFormat {
        match self {
            Precision::F32 => WeightFormat::F32,
            Precision::F16 | Precision::Bf16 => WeightFormat::F16,
            Precision::Q8_0 => WeightFormat::Q8_0,
            Precision::Q4_0 => WeightFormat::Q4_0,
            Precision::Q4_1 => WeightFormat::Q4_1,
            Precision::Q4_K_S
            | Precision::Q4_K_M
            | Precision::Q5_K_S
            | Precision::Q5_K_M
            | Precision::Q6_K => self
                .mix_default()
                .and_then(uploaded_format)
                .unwrap_or(WeightFormat::F32),
        }
    }

    /// The naive rule's bytes per parameter as `(numerator, denominator)`: 4, 2, 2, 1, 1/2, 1/2;
    /// a mix's nominal bits (4, 5 or 6) over 8.
    pub fn naive_rate(self) -> (u64, u64) {
        match self {
            Precision::F32 => (4, 1),
            Precision::F16 | Precision::Bf16 => (2, 1),
            Precision::Q8_0 => (1, 1),
            Precision::Q4_0 | Precision::Q4_1 | Precision::Q4_K_S | Precision::Q4_K_M => (1, 2),
            Precision::Q5_K_S | Precision::Q5_K_M => (5, 8),
            Precision::Q6_K => (3, 4),
        }
    }

    /// The GGUF type a single-format precision stores its matrices in.
    fn plain_type(self) -> GgmlType {
        match self {
            Precision::F32 => GgmlType::F32,
            Precision::F16 => GgmlType::F16,
            Precision::Bf16 => GgmlType::BF16,
            Precision::Q8_0 => GgmlType::Q8_0,
            Precision::Q4_0 => GgmlType::Q4_0,
            Precision::Q4_1 => GgmlType::Q4_1,
            p => p.mix_default().unwrap_or(GgmlType::F32),
        }
    }
}

/// The format wgllm uploads a GGUF type in: the loader's one mapping, so that a plan counts what
/// the load will really put on the device.
fn uploaded_format(t: GgmlType) -> Option<WeightFormat> {
    crate::loader::gguf::weight_format(t)
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What a tensor is for, as llama.cpp's quantiser tells tensors apart (`tensor_get_category`):
/// the K-quant mixes give some roles more bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum TensorRole {
    /// The token embedding of a model with its own output head.
    TokenEmbd,
    /// The token embedding that is also the output head: quantised as the head.
    TiedEmbedding,
    /// The output head (`output.weight`, `lm_head`).
    Output,
    AttnQ,
    AttnK,
    AttnV,
    AttnOutput,
    FfnGate,
    FfnUp,
    FfnDown,
    /// Any other matrix (BERT's pooler, ...): the mix's default type.
    OtherMatrix,
    /// Tables llama.cpp never quantises (learned positions, token types): f16.
    KeptTable,
    /// Norm gains and betas, biases: f32.
    NormOrBias,
}

impl TensorRole {
    /// The role and layer of a GGUF tensor named `name` (`blk.3.attn_v.weight` is
    /// `(AttnV, Some(3))`), with `tied`: whether the file has no `output.weight`, so that its
    /// token embedding is the head. `dims` is its number of dimensions: llama.cpp only quantises
    /// tensors of two or more.
    pub fn from_gguf_name(name: &str, dims: usize, tied: bool) -> (TensorRole, Option<usize>) {
        let layer = name
            .strip_prefix("blk.")
            .and_then(|r| r.split('.').next())
            .and_then(|i| i.parse::<usize>().ok());
        let role = if dims < 2 || !name.ends_with("weight") || name.contains("_norm.") {
            TensorRole::NormOrBias
        } else if name == "output.weight" {
            TensorRole::Output
        } else if name == "token_embd.weight" {
            if tied {
                TensorRole::TiedEmbedding
            } else {
                TensorRole::TokenEmbd
            }
        } else if name == "position_embd.weight" || name == "token_types.weight" {
            TensorRole::KeptTable
        } else {
            [
                ("attn_v.weight", TensorRole::AttnV),
                ("attn_k.weight", TensorRole::AttnK),
                ("attn_q.weight", TensorRole::AttnQ),
                ("attn_output.weight", TensorRole::AttnOutput),
                ("ffn_up", TensorRole::FfnUp),
                ("ffn_gate", TensorRole::FfnGate),
                ("ffn_down", TensorRole::FfnDown),
            ]
            .into_iter()
            .find(|(pat, _)| name.contains(pat))
            .map_or(TensorRole::OtherMatrix, |(_, r)| r)
        };
        (role, layer)
    }

    /// The role of a [`ParamTensor`] of a model whose embedding is tied to its head or not.
    fn of(t: &ParamTensor, tied: bool) -> TensorRole {
        if t.class == ParamClass::NormOrBias {
            return TensorRole::NormOrBias;
        }
        match t.name.strip_prefix("layers.").unwrap_or(&t.name) {
            "embed_tokens" if tied => TensorRole::TiedEmbedding,
            "embed_tokens" => TensorRole::TokenEmbd,
            "embed_positions" | "embed_token_types" => TensorRole::KeptTable,
            "lm_head" => TensorRole::Output,
            "attn_q" => TensorRole::AttnQ,
            "attn_k" => TensorRole::AttnK,
            "attn_v" => TensorRole::AttnV,
            "attn_o" => TensorRole::AttnOutput,
            "ffn_gate" => TensorRole::FfnGate,
            "ffn_up" => TensorRole::FfnUp,
            "ffn_down" => TensorRole::FfnDown,
            _ => TensorRole::OtherMatrix,
        }
    }
}

/// A precision applied to one model's tensors by their GGUF names: what a synthetic model of a
/// K-quant mix generates each matrix in, as [`tensor_type`] types it in a file of that mix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NamedTypes {
    pub precision: Precision,
    pub n_layers: usize,
    /// The token embedding is the output head.
    pub tied: bool,
}

impl NamedTypes {
    pub fn new(cfg: &ModelConfig, precision: Precision) -> NamedTypes {
        NamedTypes {
            precision,
            n_layers: cfg.n_layers,
            tied: cfg.tied_embeddings,
        }
    }

    /// The GGUF type of the `rows x cols` matrix named `name` (`blk.3.attn_v.weight`).
    pub fn ggml_type(&self, name: &str, rows: usize, cols: usize) -> GgmlType {
        let (role, layer) = TensorRole::from_gguf_name(name, 2, self.tied);
        tensor_type(
            self.precision,
            role,
            layer.unwrap_or(0),
            self.n_layers,
            (rows, cols),
        )
    }

    /// The format wgllm uploads that matrix in (the loader's mapping of its type).
    pub fn format(&self, name: &str, rows: usize, cols: usize) -> WeightFormat {
        uploaded_format(self.ggml_type(name, rows, cols)).unwrap_or(WeightFormat::F32)
    }
}

/// llama.cpp's `use_more_bits`: the first and last eighth of the layers and every third one
/// between them get more bits in the `_M` mixes.
pub fn use_more_bits(layer: usize, n_layers: usize) -> bool {
    let (i, n) = (layer as i64, n_layers as i64);
    i < n / 8 || i >= 7 * n / 8 || (i - n / 8) % 3 == 2
}

/// The GGUF type of a `rows x cols` tensor (`cols` the row length) with role `role` in layer
/// `layer` of `n_layers` at `precision`.
///
/// The K-quant mixes follow llama.cpp's `llama_tensor_get_type` (src/llama-quant.cpp, as in
/// llama-cpp-python 0.3.36) for a dense model: the output head (and a tied token embedding) Q6_K,
/// or Q8_0 when its rows are not whole 256-blocks; attn_v and ffn_down Q6_K on the
/// [`use_more_bits`] layers in `Q4_K_M` and `Q5_K_M`, Q5_K on the first four attn_v and the first
/// eighth of the ffn_down in `Q4_K_S`; the mix's default type elsewhere; then the fallback for
/// rows that are not whole 256-blocks (Q4_K to Q5_0, Q5_K to Q5_1, Q6_K to Q8_0, and f16 where
/// even 32-blocks do not fit). Not modelled: llama.cpp's bump of a 70B LLaMA's attn_v to Q5_K,
/// mixture-of-experts and Falcon rules, importance matrices, user overrides.
///
/// A single-format precision gives its own type to every matrix and table (a row that is not
/// whole blocks is counted as a partial block, as [`weight_bytes`] counts it); norms and biases
/// are f32 in every case.
pub fn tensor_type(
    precision: Precision,
    role: TensorRole,
    layer: usize,
    n_layers: usize,
    rows_cols: (usize, usize),
) -> GgmlType {
    let cols = rows_cols.1;
    if role == TensorRole::NormOrBias {
        return GgmlType::F32;
    }
    let Some(default) = precision.mix_default() else {
        return precision.plain_type();
    };
    let more_bits = use_more_bits(layer, n_layers);
    let t = match role {
        TensorRole::KeptTable => return GgmlType::F16,
        TensorRole::Output | TensorRole::TiedEmbedding => {
            if !cols.is_multiple_of(default.block_len()) {
                GgmlType::Q8_0
            } else {
                GgmlType::Q6_K
            }
        }
        TensorRole::AttnV => match precision {
            Precision::Q4_K_M | Precision::Q5_K_M if more_bits => GgmlType::Q6_K,
            Precision::Q4_K_S if layer < 4 => GgmlType::Q5_K,
            _ => default,
        },
        TensorRole::FfnDown => match precision {
            Precision::Q4_K_M | Precision::Q5_K_M if more_bits => GgmlType::Q6_K,
            Precision::Q4_K_S if layer < n_layers / 8 => GgmlType::Q5_K,
            _ => default,
        },
        _ => default,
    };
    fallback(t, cols)
}

/// llama.cpp's `tensor_type_fallback`: a 256-block type on rows that are not whole blocks drops
/// to the 32-block type of about its precision, and to f16 where rows are not whole 32-blocks.
fn fallback(t: GgmlType, cols: usize) -> GgmlType {
    if cols.is_multiple_of(t.block_len()) {
        return t;
    }
    let r = match t {
        GgmlType::Q4_K => GgmlType::Q5_0,
        GgmlType::Q5_K => GgmlType::Q5_1,
        GgmlType::Q6_K => GgmlType::Q8_0,
        other => other,
    };
    if cols.is_multiple_of(r.block_len()) {
        r
    } else {
        GgmlType::F16
    }
}

/// One tensor of one layer (or a global one) with its GGUF type and the format it is uploaded in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TypedTensor {
    /// The [`ParamTensor`] name (`layers.attn_v`, `lm_head`, ...).
    pub name: String,
    pub role: TensorRole,
    pub class: ParamClass,
    /// The layer of a per-layer tensor.
    pub layer: Option<usize>,
    pub rows: usize,
    pub cols: usize,
    /// Its type in a GGUF file of this precision.
    #[serde(serialize_with = "ggml_name")]
    pub ggml_type: GgmlType,
    /// What wgllm uploads it as.
    pub format: WeightFormat,
}

fn ggml_name<S: serde::Serializer>(t: &GgmlType, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_str(t.name())
}

/// Bytes of `rows` rows of `cols` values in blocks of `block_len` values and `block_bytes` bytes,
/// each row whole blocks.
fn block_bytes(rows: usize, cols: usize, block_len: usize, block_bytes: usize) -> u64 {
    let row = mul(
        (cols as u64).div_ceil(block_len.max(1) as u64),
        block_bytes as u64,
    );
    mul(row, rows as u64)
}

impl TypedTensor {
    pub fn params(&self) -> u64 {
        mul(self.rows as u64, self.cols as u64)
    }

    /// Bytes in a GGUF file.
    pub fn file_bytes(&self) -> u64 {
        block_bytes(
            self.rows,
            self.cols,
            self.ggml_type.block_len(),
            self.ggml_type.block_bytes(),
        )
    }

    /// Bytes of the uploaded format, rows of whole blocks, before sharding and alignment.
    pub fn bytes(&self) -> u64 {
        block_bytes(
            self.rows,
            self.cols,
            self.format.block_len(),
            self.format.block_bytes(),
        )
    }
}

/// Every tensor of `cfg` at `precision`, per-layer ones once per layer (layer by layer, in
/// [`tensors`]' order within a layer), with the type [`tensor_type`] gives it and the format
/// wgllm uploads it in: a single-format precision's own for matrices and tables (f16 for bf16),
/// f32 for norms and biases; for a mix, the loader's mapping of each tensor's GGUF type
/// ([`crate::loader::gguf::weight_format`]).
pub fn typed_tensors(cfg: &ModelConfig, precision: Precision) -> Vec<TypedTensor> {
    let ts = tensors(cfg);
    let typed = |t: &ParamTensor, layer: Option<usize>| {
        let role = TensorRole::of(t, cfg.tied_embeddings);
        let ggml_type = tensor_type(
            precision,
            role,
            layer.unwrap_or(0),
            cfg.n_layers,
            (t.rows, t.cols),
        );
        let format = if role == TensorRole::NormOrBias {
            WeightFormat::F32
        } else if precision.is_mix() {
            uploaded_format(ggml_type).unwrap_or(WeightFormat::F32)
        } else {
            precision.storage()
        };
        TypedTensor {
            name: t.name.clone(),
            role,
            class: t.class,
            layer,
            rows: t.rows,
            cols: t.cols,
            ggml_type,
            format,
        }
    };
    let (layered, global): (Vec<&ParamTensor>, Vec<&ParamTensor>) =
        ts.iter().partition(|t| t.name.starts_with("layers."));
    let split = global
        .iter()
        .position(|t| t.class != ParamClass::Embedding)
        .unwrap_or(global.len());
    let mut out: Vec<TypedTensor> = global[..split].iter().map(|t| typed(t, None)).collect();
    for i in 0..cfg.n_layers {
        out.extend(layered.iter().map(|t| typed(t, Some(i))));
    }
    out.extend(global[split..].iter().map(|t| typed(t, None)));
    out
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
    /// Embeddings and matrices in their uploaded formats' blocks (Q4_0: 18 bytes per 32
    /// weights), norms and biases in f32.
    pub exact_bytes: u64,
    /// The same tensors in a GGUF file of this precision (a mix's types, bf16 as bf16).
    pub file_bytes: u64,
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

/// Bytes of `cfg`'s weights at `precision`, tensor by tensor ([`typed_tensors`]). Each row of a
/// matrix or table is whole blocks (`ceil(cols / block_len)`), as the block formats store it;
/// every preset's rows are multiples of 32, where this equals `WeightFormat::bytes_for(rows *
/// cols)`. wgllm's GPU layout (`quant::repack`) takes the same bytes, up to one padding word per
/// matrix.
pub fn weight_bytes(cfg: &ModelConfig, precision: Precision) -> WeightBytes {
    let (mut emb, mut mat, mut small) = (
        ClassBytes::default(),
        ClassBytes::default(),
        ClassBytes::default(),
    );
    let mut file_bytes = 0u64;
    for t in typed_tensors(cfg, precision) {
        let class = match t.class {
            ParamClass::NormOrBias => &mut small,
            ParamClass::Embedding => &mut emb,
            ParamClass::Matrix => &mut mat,
        };
        class.params = class.params.saturating_add(t.params());
        class.bytes = class.bytes.saturating_add(t.bytes());
        file_bytes = file_bytes.saturating_add(t.file_bytes());
    }
    let total = sum([emb.params, mat.params, small.params]);
    let (num, den) = precision.naive_rate();
    WeightBytes {
        precision,
        exact_bytes: sum([emb.bytes, mat.bytes, small.bytes]),
        file_bytes,
        naive_bytes: mul(total, num).div_ceil(den),
        embeddings: emb,
        matrices: mat,
        norms_biases: small,
    }
}
