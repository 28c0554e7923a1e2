//! One declaration of a LLaMA-family layer's tensors ([`Layer`]): the table at the bottom names
//! each field, its kind, its shape, when it is present, its role, and its GGUF and Hugging Face
//! names. From it `define_layer!` writes the struct, the reader, the field-by-field mappers the
//! streaming code uses ([`Layer::try_map`], [`Layer::zip`]) and the lists of matrices and vectors,
//! so that adding a tensor (Qwen2's biases, Gemma 3's four extra norms) is one line.

use crate::error::{Error, Result};
use crate::model::config::ModelConfig;

/// The shapes a layer's tensors are declared in.
pub struct Shapes {
    /// Hidden size.
    pub d: usize,
    /// `n_heads * head_dim`: the width of q and of the attention output.
    pub q: usize,
    /// `n_kv_heads * head_dim`.
    pub kv: usize,
    pub head: usize,
    pub ffn: usize,
}

/// Which optional tensors a layer has.
pub struct Present {
    pub attn_bias: bool,
    pub attn_out_bias: bool,
    pub ffn_bias: bool,
    /// Gemma 3's q/k norms and post-attention / post-FFN norms.
    pub gemma: bool,
}

impl Shapes {
    fn of(cfg: &ModelConfig) -> (Shapes, Present) {
        let s = Shapes {
            d: cfg.hidden_size,
            q: cfg.n_heads * cfg.head_dim,
            kv: cfg.n_kv_heads * cfg.head_dim,
            head: cfg.head_dim,
            ffn: cfg.ffn_size,
        };
        let p = Present {
            attn_bias: cfg.attn_bias,
            attn_out_bias: cfg.attn_out_bias,
            ffn_bias: cfg.ffn_bias,
            gemma: cfg.gemma.is_some(),
        };
        (s, p)
    }
}

/// Tensor names of one checkpoint flavour: GGUF's `blk.{i}.{gguf}` or Hugging Face's
/// `model.layers.{i}.{hf}` (the one place that maps names to roles, with the table below).
pub struct Names {
    pub gguf: bool,
    /// Gemma 3 names the FFN's pre-norm `pre_feedforward_layernorm` and uses LLaMA's name for
    /// that norm, `post_attention_layernorm`, for the norm after the attention.
    pub gemma: bool,
}

impl Names {
    pub fn global(&self, role: &str) -> &'static str {
        match (self.gguf, role) {
            (true, "embed") => "token_embd.weight",
            (true, "norm") => "output_norm.weight",
            (true, _) => "output.weight",
            (false, "embed") => "model.embed_tokens.weight",
            (false, "norm") => "model.norm.weight",
            (false, _) => "lm_head.weight",
        }
    }

    pub fn layer(&self, i: usize, role: &str, gguf: &str, hf: &str) -> String {
        if self.gguf {
            format!("blk.{i}.{gguf}")
        } else if self.gemma && role == "ffn_norm" {
            format!("model.layers.{i}.pre_feedforward_layernorm.weight")
        } else {
            format!("model.layers.{i}.{hf}")
        }
    }

    /// Whether the norm weights read must have 1 added: Hugging Face's Gemma computes
    /// `x * (1 + w)`; GGUF files store `1 + w` already.
    pub fn norms_add_one(&self) -> bool {
        self.gemma && !self.gguf
    }
}

/// A field's type by its kind: matrices `M`, vectors `V`, optional vectors `Option<V>`.
macro_rules! field_type {
    ($M:ident, $V:ident, matrix) => { $M };
    ($M:ident, $V:ident, $kind:ident) => { $V };
    ($M:ident, $V:ident, $kind:ident $when:ident) => { Option<$V> };
}

/// Reads one field (see [`Layer::read`]).
macro_rules! read_field {
    ($mat:ident, $vec:ident, $s:ident, $p:ident, $name:expr, matrix ($r:ident, $c:ident)) => {
        $mat(&$name, $s.$r, $s.$c)?
    };
    ($mat:ident, $vec:ident, $s:ident, $p:ident, $name:expr, $kind:ident ($n:ident)) => {
        $vec(&$name, $s.$n, stringify!($kind) == "norm")?
    };
    ($mat:ident, $vec:ident, $s:ident, $p:ident, $name:expr, $kind:ident ($n:ident) $when:ident) => {
        if $p.$when {
            Some($vec(&$name, $s.$n, stringify!($kind) == "norm")?)
        } else {
            None
        }
    };
}

/// Maps one field (see [`Layer::try_map`]).
macro_rules! map_field {
    ($m:ident, $v:ident, $x:expr, $role:literal, matrix) => {
        $m($role, &$x)?
    };
    ($m:ident, $v:ident, $x:expr, $role:literal, $kind:ident) => {
        $v($role, &$x)?
    };
    ($m:ident, $v:ident, $x:expr, $role:literal, $kind:ident $when:ident) => {
        $x.as_ref().map(|x| $v($role, x)).transpose()?
    };
}

/// Pairs one field with another layer's (see [`Layer::zip`]).
macro_rules! zip_field {
    ($pair:ident, $a:expr, $b:expr, $kind:ident) => {
        (&$a, &$b)
    };
    ($pair:ident, $a:expr, $b:expr, $kind:ident $when:ident) => {
        $pair(&$a, &$b)?
    };
}

/// Pushes a field onto the list of matrices or of vectors (see [`Layer::matrices`]).
macro_rules! list_field {
    ($ms:ident, $vs:ident, $x:expr, matrix) => {
        $ms.push(&$x)
    };
    ($ms:ident, $vs:ident, $x:expr, $kind:ident) => {
        $vs.push(&$x)
    };
    ($ms:ident, $vs:ident, $x:expr, $kind:ident $when:ident) => {
        $vs.extend($x.as_ref())
    };
}

/// Writes [`Layer`] and its methods from the table of its tensors: per field, its kind
/// (`matrix (rows, cols)`, `norm (len)` or `bias (len)`, in [`Shapes`] fields), `if` a
/// [`Present`] flag for an optional vector, its role, its GGUF and its Hugging Face name.
macro_rules! define_layer {
    ($( $(#[$doc:meta])* $field:ident : $kind:ident ($($dim:ident),+) $(if $when:ident)?,
        $role:literal, $gguf:literal, $hf:literal; )*) => {
        /// One layer's parameters: `M` a matrix, `V` a vector (norm weights, biases). On the GPU
        /// that is [`crate::model::llama::LayerWeights`]; a streamed layer waits in host memory
        /// as a [`crate::model::stream::HostLayer`] and runs from a GPU slot.
        pub struct Layer<M, V> {
            $( $(#[$doc])* pub $field: field_type!(M, V, $kind $($when)?), )*
        }

        impl<M, V> Layer<M, V> {
            /// Reads layer `i` with `matrix(name, rows, cols)` and `vector(name, len, add_one)`
            /// at the shapes `cfg` gives (the readers check them against the file); `add_one` is
            /// set for the norm weights of Hugging Face's Gemma, stored less 1
            /// ([`Names::norms_add_one`]).
            pub fn read(
                cfg: &ModelConfig,
                names: &Names,
                i: usize,
                mut matrix: impl FnMut(&str, usize, usize) -> Result<M>,
                mut vector: impl FnMut(&str, usize, bool) -> Result<V>,
            ) -> Result<Self> {
                let (s, p) = Shapes::of(cfg);
                let add_one = names.norms_add_one();
                let mut vector = |n: &str, len: usize, norm: bool| vector(n, len, norm && add_one);
                Ok(Layer {
                    $( $field: read_field!(matrix, vector, s, p,
                        names.layer(i, $role, $gguf, $hf), $kind ($($dim),+) $($when)?), )*
                })
            }

            /// Maps every field, in declaration order, with its role ("attn_q", "ffn_norm", ...).
            pub fn try_map<M2, V2>(
                &self,
                mut m: impl FnMut(&'static str, &M) -> Result<M2>,
                mut v: impl FnMut(&'static str, &V) -> Result<V2>,
            ) -> Result<Layer<M2, V2>> {
                Ok(Layer {
                    $( $field: map_field!(m, v, self.$field, $role, $kind $($when)?), )*
                })
            }

            /// Pairs each field with the same field of `other`; both must have the same
            /// optional tensors.
            pub fn zip<'a, M2, V2>(
                &'a self,
                other: &'a Layer<M2, V2>,
            ) -> Result<Layer<(&'a M, &'a M2), (&'a V, &'a V2)>> {
                let pair = |a: &'a Option<V>, b: &'a Option<V2>| match (a, b) {
                    (Some(a), Some(b)) => Ok(Some((a, b))),
                    (None, None) => Ok(None),
                    _ => Err(Error::invalid(
                        "layer",
                        "one layer has optional tensors the other lacks",
                    )),
                };
                Ok(Layer {
                    $( $field: zip_field!(pair, self.$field, other.$field, $kind $($when)?), )*
                })
            }

            /// The matrices, in declaration order.
            pub fn matrices(&self) -> Vec<&M> {
                self.lists().0
            }

            /// The norm weights and the optional vectors present, in declaration order.
            pub fn vectors(&self) -> Vec<&V> {
                self.lists().1
            }

            fn lists(&self) -> (Vec<&M>, Vec<&V>) {
                let (mut ms, mut vs) = (Vec::new(), Vec::new());
                $( list_field!(ms, vs, self.$field, $kind $($when)?); )*
                (ms, vs)
            }
        }
    };
}

define_layer! {
    // field: kind (shape) [if present], role, GGUF name, Hugging Face name
    attn_norm: norm(d), "attn_norm", "attn_norm.weight", "input_layernorm.weight";
    wq: matrix(q, d), "attn_q", "attn_q.weight", "self_attn.q_proj.weight";
    wk: matrix(kv, d), "attn_k", "attn_k.weight", "self_attn.k_proj.weight";
    wv: matrix(kv, d), "attn_v", "attn_v.weight", "self_attn.v_proj.weight";
    bq: bias(q) if attn_bias, "attn_q_bias", "attn_q.bias", "self_attn.q_proj.bias";
    bk: bias(kv) if attn_bias, "attn_k_bias", "attn_k.bias", "self_attn.k_proj.bias";
    bv: bias(kv) if attn_bias, "attn_v_bias", "attn_v.bias", "self_attn.v_proj.bias";
    /// Gemma 3's RMSNorm of each query head and each key head, before RoPE.
    q_norm: norm(head) if gemma, "attn_q_norm", "attn_q_norm.weight", "self_attn.q_norm.weight";
    k_norm: norm(head) if gemma, "attn_k_norm", "attn_k_norm.weight", "self_attn.k_norm.weight";
    wo: matrix(d, q), "attn_output", "attn_output.weight", "self_attn.o_proj.weight";
    /// Output-projection bias (`attention_bias` llama checkpoints).
    bo: bias(d) if attn_out_bias, "attn_output_bias", "attn_output.bias", "self_attn.o_proj.bias";
    /// Gemma 3's norm of the attention output, before the residual add.
    post_attn_norm: norm(d) if gemma,
        "post_attention_norm", "post_attention_norm.weight", "post_attention_layernorm.weight";
    ffn_norm: norm(d), "ffn_norm", "ffn_norm.weight", "post_attention_layernorm.weight";
    w_gate: matrix(ffn, d), "ffn_gate", "ffn_gate.weight", "mlp.gate_proj.weight";
    w_up: matrix(ffn, d), "ffn_up", "ffn_up.weight", "mlp.up_proj.weight";
    w_down: matrix(d, ffn), "ffn_down", "ffn_down.weight", "mlp.down_proj.weight";
    /// MLP biases (`mlp_bias` llama checkpoints).
    b_gate: bias(ffn) if ffn_bias, "ffn_gate_bias", "ffn_gate.bias", "mlp.gate_proj.bias";
    b_up: bias(ffn) if ffn_bias, "ffn_up_bias", "ffn_up.bias", "mlp.up_proj.bias";
    b_down: bias(d) if ffn_bias, "ffn_down_bias", "ffn_down.bias", "mlp.down_proj.bias";
    /// Gemma 3's norm of the FFN output, before the residual add.
    post_ffn_norm: norm(d) if gemma,
        "post_ffw_norm", "post_ffw_norm.weight", "post_feedforward_layernorm.weight";
}
