//! Model hyper-parameters ([`ModelConfig`]), read from a Hugging Face `config.json` or from one of
//! the built-in presets in `models/presets/` (copies of the published `config.json` files).
//!
//! Each `model_type` follows the defaults of its `transformers` config class (`LlamaConfig`,
//! `MistralConfig`, `Qwen2Config`, `BertConfig`, `GPT2Config`) for the optional fields. The shape
//! fields (vocabulary, width, depth, heads, FFN width) are required instead of defaulted: a config
//! that lacks one is more likely broken than a model of the class's default size.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// The architecture family, which fixes the layer layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Arch {
    /// Pre-norm decoder with RMSNorm, SwiGLU and RoPE: llama, mistral, qwen2.
    Llama,
    /// Post-norm encoder with LayerNorm, GELU, learned positions and token types (`BertModel`).
    Bert,
    /// Pre-norm decoder with LayerNorm, GELU, learned positions and biases.
    Gpt2,
    /// GPT-3 (Brown et al. 2020): GPT-2's layout and tensors, with attention alternating between
    /// dense and locally banded sparse layers. wgllm describes it (parameters, bytes, a plan from
    /// the GPT-2 pass's formulas) but has no forward pass for it: there is no banded attention
    /// kernel here, and running it as GPT-2 would attend densely in every layer.
    Gpt3,
}

impl Arch {
    /// The lowercase name, as in JSON (`gpt2`, `bert`).
    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Bert => "bert",
            Arch::Gpt2 => "gpt2",
            Arch::Gpt3 => "gpt3",
        }
    }

    /// The command that runs this architecture, or `None` where wgllm only describes it.
    pub fn runs_with(self) -> Option<&'static str> {
        match self {
            Arch::Llama | Arch::Gpt2 => Some("wgllm run"),
            Arch::Bert => Some("wgllm embed"),
            Arch::Gpt3 => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Norm {
    /// A gain vector only.
    RmsNorm,
    /// A gain and a bias vector.
    LayerNorm,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Ffn {
    /// `down(silu(gate x) * up x)`: three matrices.
    SwiGlu,
    /// `down(gelu(up x))`: two matrices.
    Gelu,
    /// `down(gelu_tanh(gate x) * up x)` (GeGLU, Gemma): three matrices, as SwiGLU.
    GeGluTanh,
}

/// What Gemma 3 adds to the LLaMA layout: embeddings scaled by sqrt(hidden), RMSNorm of q and k
/// per head before RoPE, norms after the attention and the FFN (before their residual adds),
/// GeGLU ([`Ffn::GeGluTanh`]), rotate-half RoPE in GGUF files too, and per-layer RoPE bases.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Gemma {
    /// The attention scale is `1 / sqrt(query_pre_attn_scalar)` (the head size in GGUF files).
    pub query_pre_attn_scalar: f64,
    /// RoPE base of the local (sliding-window) layers; global layers use [`Positions::Rotary`]'s.
    pub rope_local_theta: f64,
    /// Linear RoPE scaling of the global layers (positions divided by it; 1 for none).
    pub rope_scaling: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Positions {
    /// Rotary embeddings with base `theta`; no parameters.
    Rotary { theta: f64 },
    /// A learned `max_positions x hidden_size` table.
    Learned,
    /// Fixed sinusoids; no parameters.
    Sinusoidal,
}

/// The hyper-parameters of one model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub arch: Arch,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    /// Key/value heads (grouped-query attention); equal to `n_heads` for multi-head attention.
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub ffn_size: usize,
    pub max_positions: usize,
    pub norm: Norm,
    pub norm_eps: f64,
    pub ffn: Ffn,
    pub positions: Positions,
    /// The output head reuses the token embedding.
    pub tied_embeddings: bool,
    /// Biases on the Q, K and V projections.
    pub attn_bias: bool,
    /// Bias on the attention output projection.
    pub attn_out_bias: bool,
    /// Biases on the FFN matrices.
    pub ffn_bias: bool,
    /// BERT token-type (segment) vocabulary; 0 for models without one.
    pub type_vocab_size: usize,
    /// BERT's pooler: a dense `hidden x hidden` layer with bias on the first token.
    pub pooler: bool,
    /// Sliding-window attention (Mistral; Gemma 3's local layers): a query at position t of a
    /// windowed layer sees keys from `t + 1 - sliding_window` on. `None`: every layer global.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sliding_window: Option<usize>,
    /// Which layers the window applies to ([`ModelConfig::layer_window`]).
    #[serde(default, skip_serializing_if = "WindowLayers::is_all")]
    pub window_layers: WindowLayers,
    /// Gemma 3's additions; `None` for every other architecture.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gemma: Option<Gemma>,
}

/// Which layers of a model with a `sliding_window` attend within it; the others are global.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WindowLayers {
    /// Every layer (Mistral).
    #[default]
    All,
    /// Layer l is global when `(l + 1) % n == 0` (HF `sliding_window_pattern`; Gemma 3: 6, five
    /// local layers to each global one).
    GlobalEvery(usize),
    /// Windowed or not, layer by layer (HF `layer_types`: `sliding_attention` / `full_attention`).
    Listed(Vec<bool>),
}

impl WindowLayers {
    pub fn is_all(&self) -> bool {
        *self == WindowLayers::All
    }

    /// The rule of a GGUF architecture, whose metadata has `{arch}.attention.sliding_window` but
    /// no pattern: llama.cpp's (`gemma3`: every 6th layer global, `gemma2`: every 2nd).
    pub fn for_gguf_arch(arch: &str) -> WindowLayers {
        match arch {
            "gemma3" => WindowLayers::GlobalEvery(6),
            "gemma2" => WindowLayers::GlobalEvery(2),
            _ => WindowLayers::All,
        }
    }
}

/// Built-in presets: name and the HF `config.json` content.
const PRESETS: [(&str, &str); 11] = [
    (
        "llama-2-7b",
        include_str!("../../models/presets/llama-2-7b.json"),
    ),
    (
        "llama-2-13b",
        include_str!("../../models/presets/llama-2-13b.json"),
    ),
    (
        "llama-2-70b",
        include_str!("../../models/presets/llama-2-70b.json"),
    ),
    (
        "mistral-7b",
        include_str!("../../models/presets/mistral-7b.json"),
    ),
    (
        "llama-3-8b",
        include_str!("../../models/presets/llama-3-8b.json"),
    ),
    (
        "qwen2.5-0.5b",
        include_str!("../../models/presets/qwen2.5-0.5b.json"),
    ),
    ("gpt2", include_str!("../../models/presets/gpt2.json")),
    ("gpt2-xl", include_str!("../../models/presets/gpt2-xl.json")),
    (
        "bert-base-uncased",
        include_str!("../../models/presets/bert-base-uncased.json"),
    ),
    (
        "smollm2-135m",
        include_str!("../../models/presets/smollm2-135m.json"),
    ),
    (
        "gpt3-175b",
        include_str!("../../models/presets/gpt3-175b.json"),
    ),
];

/// Names accepted by [`ModelConfig::preset`].
pub fn preset_names() -> Vec<&'static str> {
    PRESETS.iter().map(|(name, _)| *name).collect()
}

/// Upper bound on every dimension, so that parameter counts stay far from `u64` overflow and a
/// corrupt config is reported rather than planned.
const MAX_DIM: usize = 1 << 32;

impl ModelConfig {
    /// The attention window of layer `l`: `Some(sliding_window)` for a windowed layer, `None`
    /// for a global one.
    pub fn layer_window(&self, l: usize) -> Option<usize> {
        let w = self.sliding_window?;
        let windowed = match &self.window_layers {
            WindowLayers::All => true,
            WindowLayers::GlobalEvery(n) => !(l + 1).is_multiple_of(*n),
            WindowLayers::Listed(v) => v.get(l).copied().unwrap_or(false),
        };
        windowed.then_some(w)
    }

    /// The RoPE base and linear position scale of layer `l` (`None` without rotary positions):
    /// Gemma 3's local layers have their own base and no scaling.
    pub fn layer_rope(&self, l: usize) -> Option<(f64, f64)> {
        let Positions::Rotary { theta } = self.positions else {
            return None;
        };
        Some(match (&self.gemma, self.layer_window(l)) {
            (Some(g), Some(_)) => (g.rope_local_theta, 1.0),
            (Some(g), None) => (theta, g.rope_scaling),
            (None, _) => (theta, 1.0),
        })
    }

    /// A built-in preset by name (see [`preset_names`]), case-insensitive.
    pub fn preset(name: &str) -> Result<ModelConfig> {
        let (_, json) = PRESETS
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .ok_or_else(|| Error::UnknownPreset {
                name: name.into(),
                known: preset_names().join(", "),
            })?;
        let value: Value = serde_json::from_str(json).map_err(|e| Error::Parse {
            what: "a preset config.json",
            input: name.into(),
            reason: e.to_string(),
        })?;
        ModelConfig::from_hf_json(&value)
    }

    /// Reads a Hugging Face `config.json` of model_type llama, mistral, qwen2, bert or gpt2, or
    /// wgllm's own `gpt3` (GPT2Config's fields; OpenAI published no config.json for GPT-3).
    pub fn from_hf_json(json: &Value) -> Result<ModelConfig> {
        let obj = json.as_object().ok_or_else(|| Error::ConfigInvalid {
            model_type: "?".into(),
            field: "(root)".into(),
            reason: "not a JSON object".into(),
        })?;
        let model_type = match obj.get("model_type") {
            Some(Value::String(s)) => s.as_str(),
            Some(other) => return Err(Error::UnknownModelType(other.to_string())),
            None => {
                return Err(Error::ConfigMissing {
                    model_type: "?".into(),
                    field: "model_type".into(),
                })
            }
        };
        let f = Fields { obj, model_type };
        let cfg = match model_type {
            "llama" | "mistral" | "qwen2" => f.llama()?,
            "gemma3_text" => f.gemma3()?,
            "bert" => f.bert()?,
            "gpt2" => f.gpt2(Arch::Gpt2)?,
            "gpt3" => f.gpt2(Arch::Gpt3)?,
            other => return Err(Error::UnknownModelType(format!("'{other}'"))),
        };
        cfg.validate(model_type)?;
        Ok(cfg)
    }

    /// Checks the relations between the dimensions that every architecture here relies on.
    pub fn validate(&self, model_type: &str) -> Result<()> {
        let bad = |field: &str, reason: String| Error::ConfigInvalid {
            model_type: model_type.into(),
            field: field.into(),
            reason,
        };
        let dims = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("n_layers", self.n_layers),
            ("n_heads", self.n_heads),
            ("n_kv_heads", self.n_kv_heads),
            ("head_dim", self.head_dim),
            ("ffn_size", self.ffn_size),
            ("max_positions", self.max_positions),
        ];
        for (name, v) in dims {
            if v == 0 || v > MAX_DIM {
                return Err(bad(name, format!("{v} is outside 1..={MAX_DIM}")));
            }
        }
        if self.type_vocab_size > MAX_DIM {
            return Err(bad(
                "type_vocab_size",
                format!("{} is too large", self.type_vocab_size),
            ));
        }
        if !self.n_heads.is_multiple_of(self.n_kv_heads) {
            return Err(bad(
                "n_kv_heads",
                format!(
                    "{} heads are not a multiple of {} kv heads",
                    self.n_heads, self.n_kv_heads
                ),
            ));
        }
        if !(self.norm_eps.is_finite() && self.norm_eps > 0.0) {
            return Err(bad(
                "norm_eps",
                format!("{} is not a positive number", self.norm_eps),
            ));
        }
        match (&self.window_layers, self.sliding_window) {
            (_, Some(0)) => return Err(bad("sliding_window", "0 keys is no window".into())),
            (WindowLayers::GlobalEvery(0), _) => {
                return Err(bad("sliding_window_pattern", "0 is no pattern".into()))
            }
            (WindowLayers::Listed(v), _) if v.len() != self.n_layers => {
                return Err(bad(
                    "layer_types",
                    format!("{} entries for {} layers", v.len(), self.n_layers),
                ))
            }
            _ => {}
        }
        if let Positions::Rotary { theta } = self.positions {
            if !(theta.is_finite() && theta > 0.0) {
                return Err(bad(
                    "rope_theta",
                    format!("{theta} is not a positive number"),
                ));
            }
        }
        if let Some(w) = self.sliding_window {
            if w == 0 || w > MAX_DIM {
                return Err(bad(
                    "sliding_window",
                    format!("{w} is outside 1..={MAX_DIM}"),
                ));
            }
        }
        if let Some(g) = self.gemma {
            for (field, v) in [
                ("query_pre_attn_scalar", g.query_pre_attn_scalar),
                ("rope_local_base_freq", g.rope_local_theta),
                ("rope_scaling.factor", g.rope_scaling),
            ] {
                if !(v.is_finite() && v > 0.0) {
                    return Err(bad(field, format!("{v} is not a positive number")));
                }
            }
        }
        Ok(())
    }
}

/// Typed access to the fields of one `config.json`, with errors that name the field.
struct Fields<'a> {
    obj: &'a Map<String, Value>,
    model_type: &'a str,
}

impl Fields<'_> {
    /// The first of `names` (HF aliases) present and not null.
    fn get<'n>(&self, names: &[&'n str]) -> Option<(&'n str, &Value)> {
        names.iter().find_map(|n| match self.obj.get(*n) {
            None | Some(Value::Null) => None,
            Some(v) => Some((*n, v)),
        })
    }

    fn invalid(&self, field: &str, reason: impl Into<String>) -> Error {
        Error::ConfigInvalid {
            model_type: self.model_type.into(),
            field: field.into(),
            reason: reason.into(),
        }
    }

    fn opt_usize(&self, names: &[&str]) -> Result<Option<usize>> {
        let Some((name, v)) = self.get(names) else {
            return Ok(None);
        };
        v.as_u64()
            .and_then(|n| usize::try_from(n).ok())
            .map(Some)
            .ok_or_else(|| self.invalid(name, format!("{v} is not a non-negative integer")))
    }

    fn usize(&self, names: &[&str]) -> Result<usize> {
        self.opt_usize(names)?.ok_or_else(|| Error::ConfigMissing {
            model_type: self.model_type.into(),
            field: names.join("' or '"),
        })
    }

    fn f64_or(&self, names: &[&str], default: f64) -> Result<f64> {
        match self.get(names) {
            None => Ok(default),
            Some((name, v)) => v
                .as_f64()
                .ok_or_else(|| self.invalid(name, format!("{v} is not a number"))),
        }
    }

    fn bool_or(&self, name: &str, default: bool) -> Result<bool> {
        match self.get(&[name]) {
            None => Ok(default),
            Some((_, v)) => v
                .as_bool()
                .ok_or_else(|| self.invalid(name, format!("{v} is not a boolean"))),
        }
    }

    /// `head_dim` if given (newer Llama/Mistral configs), else `hidden / heads`, which must divide.
    fn head_dim(&self, hidden: usize, heads: usize) -> Result<usize> {
        if let Some(d) = self.opt_usize(&["head_dim"])? {
            return Ok(d);
        }
        if heads == 0 || !hidden.is_multiple_of(heads) {
            return Err(self.invalid(
                "num_attention_heads",
                format!("hidden size {hidden} is not a multiple of {heads} heads"),
            ));
        }
        Ok(hidden / heads)
    }

    /// The sliding window and its layers, from HF's keys: `sliding_window` (null: none; absent:
    /// MistralConfig's 4096 for `mistral`, none otherwise), off where `use_sliding_window` is
    /// false (Qwen2Config's default), and then `layer_types` (per layer
    /// `sliding_attention` or `full_attention`), Qwen2's `max_window_layers` (layers from it on
    /// windowed), `sliding_window_pattern` (every n-th layer global), else `default` (the config
    /// class's rule: every layer for Mistral; Gemma 3's class defaults to a pattern of 6).
    pub(crate) fn sliding_window(
        &self,
        n_layers: usize,
        default: WindowLayers,
    ) -> Result<(Option<usize>, WindowLayers)> {
        let none = Ok((None, WindowLayers::All));
        let absent = self.model_type == "mistral" && !self.obj.contains_key("sliding_window");
        let w = match self.opt_usize(&["sliding_window"])? {
            Some(w) => w,
            None if absent => 4096,
            None => return none,
        };
        if !self.bool_or("use_sliding_window", self.model_type != "qwen2")? {
            return none;
        }
        if let Some((name, v)) = self.get(&["layer_types"]) {
            let types = v
                .as_array()
                .ok_or_else(|| self.invalid(name, "not a list"))?;
            let windowed = types
                .iter()
                .map(|t| match t.as_str() {
                    Some("sliding_attention") => Ok(true),
                    Some("full_attention") => Ok(false),
                    _ => Err(self.invalid(name, format!("{t} is not a layer type"))),
                })
                .collect::<Result<Vec<bool>>>()?;
            return Ok((Some(w), WindowLayers::Listed(windowed)));
        }
        if let Some(first) = self.opt_usize(&["max_window_layers"])? {
            let windowed = (0..n_layers).map(|l| l >= first).collect();
            return Ok((Some(w), WindowLayers::Listed(windowed)));
        }
        match self.opt_usize(&["sliding_window_pattern"])? {
            Some(n) => Ok((Some(w), WindowLayers::GlobalEvery(n))),
            None => Ok((Some(w), default)),
        }
    }

    /// llama, mistral and qwen2 share one layout; they differ in defaults and qwen2's QKV biases.
    fn llama(&self) -> Result<ModelConfig> {
        let hidden = self.usize(&["hidden_size"])?;
        let heads = self.usize(&["num_attention_heads"])?;
        let qwen2 = self.model_type == "qwen2";
        // Class defaults: LlamaConfig 2048 positions and eps 1e-6; MistralConfig 4096*32 and 1e-6;
        // Qwen2Config 32768 and 1e-6. All default to untied embeddings and rope_theta 10000.
        let default_positions = match self.model_type {
            "mistral" => 4096 * 32,
            "qwen2" => 32768,
            _ => 2048,
        };
        // LlamaConfig's attention_bias covers Q, K, V and O; Qwen2Attention hard-codes biases on
        // Q, K and V only.
        let attention_bias = self.bool_or("attention_bias", false)?;
        let n_layers = self.usize(&["num_hidden_layers"])?;
        let (sliding_window, window_layers) = self.sliding_window(n_layers, WindowLayers::All)?;
        Ok(ModelConfig {
            arch: Arch::Llama,
            vocab_size: self.usize(&["vocab_size"])?,
            hidden_size: hidden,
            n_layers,
            n_heads: heads,
            n_kv_heads: self.opt_usize(&["num_key_value_heads"])?.unwrap_or(heads),
            head_dim: self.head_dim(hidden, heads)?,
            ffn_size: self.usize(&["intermediate_size"])?,
            max_positions: self
                .opt_usize(&["max_position_embeddings"])?
                .unwrap_or(default_positions),
            norm: Norm::RmsNorm,
            norm_eps: self.f64_or(&["rms_norm_eps"], 1e-6)?,
            ffn: Ffn::SwiGlu,
            positions: Positions::Rotary {
                theta: self.f64_or(&["rope_theta"], 10000.0)?,
            },
            tied_embeddings: self.bool_or("tie_word_embeddings", false)?,
            attn_bias: qwen2 || attention_bias,
            attn_out_bias: !qwen2 && attention_bias,
            ffn_bias: self.bool_or("mlp_bias", false)?,
            type_vocab_size: 0,
            pooler: false,
            sliding_window,
            window_layers,
            gemma: None,
        })
    }

    /// Gemma3TextConfig: the LLaMA layout with Gemma's additions ([`Gemma`]). Defaults are the
    /// class's (eps 1e-6, rope_theta 1e6, local base 1e4, window 4096, query_pre_attn_scalar
    /// 256, a global layer every 6, tied embeddings). `layer_types`, where given, must follow
    /// that pattern (the runtime keeps one pattern, as llama.cpp does).
    fn gemma3(&self) -> Result<ModelConfig> {
        let mut cfg = self.llama()?;
        let every = self.opt_usize(&["sliding_window_pattern"])?.unwrap_or(6);
        if let Some((name, v)) = self.get(&["layer_types"]) {
            let types = v
                .as_array()
                .ok_or_else(|| self.invalid(name, "not a list"))?;
            for (l, t) in types.iter().enumerate() {
                let global = every > 0 && (l + 1).is_multiple_of(every);
                let want = if global {
                    "full_attention"
                } else {
                    "sliding_attention"
                };
                if t.as_str() != Some(want) {
                    return Err(self.invalid(
                        name,
                        format!("layer {l} is {t}, not {want} (one global layer every {every})"),
                    ));
                }
            }
        }
        let rope_scaling = match self.get(&["rope_scaling"]) {
            None => 1.0,
            Some((name, v)) => {
                let kind = v.get("rope_type").or_else(|| v.get("type"));
                if kind.and_then(Value::as_str) != Some("linear") {
                    return Err(self.invalid(name, format!("{v}: only linear scaling is known")));
                }
                v.get("factor")
                    .and_then(Value::as_f64)
                    .ok_or_else(|| self.invalid(name, "no numeric factor"))?
            }
        };
        if let Some((name, v)) = self.get(&["final_logit_softcapping", "attn_logit_softcapping"]) {
            return Err(self.invalid(name, format!("{v}: Gemma 3 has no softcapping")));
        }
        if self.bool_or("use_bidirectional_attention", false)? {
            return Err(self.invalid(
                "use_bidirectional_attention",
                "only causal Gemma 3 models run here",
            ));
        }
        if let Some((name, v)) = self.get(&["hidden_activation", "hidden_act"]) {
            if v.as_str() != Some("gelu_pytorch_tanh") {
                return Err(self.invalid(name, format!("{v}: Gemma 3's FFN is gelu_pytorch_tanh")));
            }
        }
        cfg.norm_eps = self.f64_or(&["rms_norm_eps"], 1e-6)?;
        cfg.positions = Positions::Rotary {
            theta: self.f64_or(&["rope_theta"], 1_000_000.0)?,
        };
        cfg.ffn = Ffn::GeGluTanh;
        cfg.head_dim = self.opt_usize(&["head_dim"])?.unwrap_or(256);
        cfg.max_positions = self
            .opt_usize(&["max_position_embeddings"])?
            .unwrap_or(131072);
        cfg.tied_embeddings = self.bool_or("tie_word_embeddings", true)?;
        cfg.sliding_window = Some(self.opt_usize(&["sliding_window"])?.unwrap_or(4096));
        cfg.window_layers = WindowLayers::GlobalEvery(every);
        cfg.gemma = Some(Gemma {
            query_pre_attn_scalar: self.f64_or(&["query_pre_attn_scalar"], 256.0)?,
            rope_local_theta: self.f64_or(&["rope_local_base_freq"], 10_000.0)?,
            rope_scaling,
        });
        Ok(cfg)
    }

    /// `BertModel` with its pooler (what `AutoModel` loads); the MLM head is not part of it.
    fn bert(&self) -> Result<ModelConfig> {
        if let Some((name, v)) = self.get(&["position_embedding_type"]) {
            if v.as_str() != Some("absolute") {
                return Err(self.invalid(name, format!("{v} is not supported, only \"absolute\"")));
            }
        }
        let hidden = self.usize(&["hidden_size"])?;
        let heads = self.usize(&["num_attention_heads"])?;
        Ok(ModelConfig {
            arch: Arch::Bert,
            vocab_size: self.usize(&["vocab_size"])?,
            hidden_size: hidden,
            n_layers: self.usize(&["num_hidden_layers"])?,
            n_heads: heads,
            n_kv_heads: heads,
            head_dim: self.head_dim(hidden, heads)?,
            ffn_size: self.usize(&["intermediate_size"])?,
            max_positions: self.opt_usize(&["max_position_embeddings"])?.unwrap_or(512),
            norm: Norm::LayerNorm,
            norm_eps: self.f64_or(&["layer_norm_eps"], 1e-12)?,
            ffn: Ffn::Gelu,
            positions: Positions::Learned,
            // An encoder has no output head to tie.
            tied_embeddings: false,
            attn_bias: true,
            attn_out_bias: true,
            ffn_bias: true,
            type_vocab_size: self.opt_usize(&["type_vocab_size"])?.unwrap_or(2),
            pooler: true,
            sliding_window: None,
            window_layers: WindowLayers::All,
            gemma: None,
        })
    }

    /// GPT-2: GPT2Config's own names, with the HF aliases it maps them from also accepted. GPT-3
    /// configs (`arch` [`Arch::Gpt3`]) use the same fields.
    fn gpt2(&self, arch: Arch) -> Result<ModelConfig> {
        let hidden = self.usize(&["n_embd", "hidden_size"])?;
        let heads = self.usize(&["n_head", "num_attention_heads"])?;
        Ok(ModelConfig {
            arch,
            vocab_size: self.usize(&["vocab_size"])?,
            hidden_size: hidden,
            n_layers: self.usize(&["n_layer", "num_hidden_layers"])?,
            n_heads: heads,
            n_kv_heads: heads,
            head_dim: self.head_dim(hidden, heads)?,
            // n_inner: null means 4 * n_embd.
            ffn_size: self
                .opt_usize(&["n_inner", "intermediate_size"])?
                .unwrap_or(hidden.saturating_mul(4)),
            max_positions: self
                .opt_usize(&["n_positions", "max_position_embeddings"])?
                .unwrap_or(1024),
            norm: Norm::LayerNorm,
            norm_eps: self.f64_or(&["layer_norm_epsilon"], 1e-5)?,
            ffn: Ffn::Gelu,
            positions: Positions::Learned,
            // GPT2LMHeadModel always ties lm_head to wte.
            tied_embeddings: true,
            attn_bias: true,
            attn_out_bias: true,
            ffn_bias: true,
            type_vocab_size: 0,
            pooler: false,
            sliding_window: None,
            window_layers: WindowLayers::All,
            gemma: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// google/gemma-3-270m's config.json (layer_types cut to the pattern it follows).
    fn gemma_270m() -> Value {
        let types: Vec<&str> = (0..18)
            .map(|l| {
                if (l + 1) % 6 == 0 {
                    "full_attention"
                } else {
                    "sliding_attention"
                }
            })
            .collect();
        serde_json::json!({
            "architectures": ["Gemma3ForCausalLM"], "attention_bias": false,
            "attn_logit_softcapping": null, "final_logit_softcapping": null, "head_dim": 256,
            "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 640,
            "intermediate_size": 2048, "layer_types": types, "max_position_embeddings": 32768,
            "model_type": "gemma3_text", "num_attention_heads": 4, "num_hidden_layers": 18,
            "num_key_value_heads": 1, "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06,
            "rope_local_base_freq": 10000.0, "rope_scaling": null, "rope_theta": 1000000.0,
            "sliding_window": 512, "use_bidirectional_attention": false, "vocab_size": 262144
        })
    }

    #[test]
    fn gemma3_text_config() {
        let cfg = ModelConfig::from_hf_json(&gemma_270m()).unwrap();
        assert_eq!((cfg.hidden_size, cfg.head_dim, cfg.n_heads), (640, 256, 4));
        assert_eq!(cfg.ffn, Ffn::GeGluTanh);
        assert!(cfg.tied_embeddings);
        let g = cfg.gemma.unwrap();
        assert_eq!((g.query_pre_attn_scalar, g.rope_scaling), (256.0, 1.0));
        assert_eq!(cfg.layer_window(0), Some(512));
        assert_eq!(cfg.layer_window(5), None);
        assert_eq!(cfg.layer_rope(4), Some((10_000.0, 1.0)));
        assert_eq!(cfg.layer_rope(11), Some((1e6, 1.0)));
        // Linear scaling applies to the global layers only.
        let mut j = gemma_270m();
        j["rope_scaling"] = serde_json::json!({"rope_type": "linear", "factor": 8.0});
        let cfg = ModelConfig::from_hf_json(&j).unwrap();
        assert_eq!(cfg.layer_rope(5), Some((1e6, 8.0)));
        assert_eq!(cfg.layer_rope(0), Some((10_000.0, 1.0)));
    }

    #[test]
    fn gemma3_text_configs_the_runtime_cannot_honour_are_refused() {
        let cases: [(&str, Value); 5] = [
            ("layer_types", serde_json::json!(vec!["full_attention"; 18])),
            ("final_logit_softcapping", serde_json::json!(30.0)),
            ("use_bidirectional_attention", serde_json::json!(true)),
            ("hidden_activation", serde_json::json!("silu")),
            (
                "rope_scaling",
                serde_json::json!({"rope_type": "yarn", "factor": 4.0}),
            ),
        ];
        for (field, v) in cases {
            let mut j = gemma_270m();
            j[field] = v;
            match ModelConfig::from_hf_json(&j) {
                Err(Error::ConfigInvalid { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{field}: {other:?}"),
            }
        }
    }

    #[test]
    fn sliding_windows_of_mistral_and_qwen2() {
        let mistral = ModelConfig::preset("mistral-7b").unwrap();
        assert_eq!(mistral.layer_window(0), Some(4096));
        assert_eq!(mistral.layer_window(31), Some(4096));
        assert_eq!(mistral.layer_rope(3), Some((10_000.0, 1.0)));
        // Qwen2 lists a window but uses it only with use_sliding_window.
        let qwen = ModelConfig::preset("qwen2.5-0.5b").unwrap();
        assert_eq!(qwen.layer_window(0), None);
        let llama = ModelConfig::preset("llama-2-7b").unwrap();
        assert_eq!((llama.layer_window(0), llama.gemma), (None, None));
    }
}
