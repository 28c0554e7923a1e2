//! The activation buffers of a forward pass, shared by liveness: the machinery ([`Schedule`],
//! [`share`]) and LLaMA's schedule. GPT-2's and BERT's schedules use the same machinery, in
//! [`super::gpt2`] and [`super::bert`].
//!
//! [`llama_schedule`] writes down the kernel sequence of `Llama::forward_chunk` (src/model/llama.rs)
//! as steps that read and write named activation *roles* (`x`, `q`, `gate`, ...). [`share`] runs a
//! backward liveness analysis over that schedule, with the layer body as a loop (a back edge from
//! its last step to its first), and packs the roles into buffers greedily: largest role first, into
//! the first existing buffer none of whose roles is live at any step where this one is. A role is
//! "live" at a step when it is read or written there or carries a value across it; a kernel never
//! gets the same buffer as input and output, because a role read and a role written by one step
//! are both live at it.
//!
//! The real code allocates every buffer once for the chunk size and runs shorter chunks (decode:
//! one token) on prefixes, so a plan is per chunk size: `llama_activation_plan(cfg, 1, ..)` is the
//! decode-only plan. The schedule is a superset of every path the code takes (with or without
//! logits, one row or all rows to the head), so one sharing serves all of them.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::kernels::matmul::NORM_FOLD_MAX_WEIGHTS;
use crate::model::config::ModelConfig;

/// The roles of [`llama_schedule`], in the order the forward pass first touches them.
pub const LLAMA_ROLES: [&str; 14] = [
    "ids", "x", "x2", "xb", "q", "k", "v", "att", "proj", "gate", "up", "act", "logits", "partials",
];

/// Roles kept apart from every other: the residual stream ping-pongs between `x` and `x2` by
/// swapping views, so which physical buffer holds the residual depends on the parity of the swaps;
/// pinning both keeps the plan valid whatever that parity is.
pub const LLAMA_PINNED: [&str; 2] = ["x", "x2"];

/// What a step runs, which decides its dispatch count and its kernel-params bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kernel {
    /// Host write or read (token ids up, logits back): no dispatch.
    Host,
    /// Buffer-to-buffer copy recorded between dispatches: no dispatch.
    Copy,
    /// One dispatch per shard of the `rows x cols` table.
    Embedding {
        rows: usize,
        cols: usize,
    },
    /// One dispatch per shard of the `rows x cols` weight matrix.
    Matmul {
        rows: usize,
        cols: usize,
    },
    /// One dispatch for matrices stacked in one texture or buffer (Q, K, V; gate, up).
    StackedMatmul,
    RmsNorm,
    /// The residual add and the RMSNorm after it, one dispatch.
    AddRmsNorm,
    AddBias,
    /// RoPE of q and k and the KV-cache store, one dispatch.
    RopeStore,
    Attention,
    Add,
    Swiglu,
    /// Gemma's `gelu_tanh(gate) * up`.
    GeGlu,
    /// `out = s * x` (Gemma's embedding scale).
    Scale,
    /// An f32 lookup table of `rows x cols`, kept f32 whatever the precision (BERT's positions plus
    /// token type 0): one dispatch per shard.
    TableF32 {
        rows: usize,
        cols: usize,
    },
    LayerNorm,
    /// The KV-cache store of k and v without RoPE (GPT-2's learned positions), one dispatch.
    KvStore,
    Gelu,
    /// Attention without key splits, one dispatch per sequence: a GPT-2 chunk is one sequence; a
    /// BERT batch attends sequence by sequence, each within its own rows.
    DenseAttention {
        sequences: usize,
    },
}

/// Bytes of the uniform params block of the attention kernels (`kernels::attention`'s
/// `ATTENTION_PARAMS_BYTES`).
pub const ATTENTION_PARAMS_BYTES: u64 = 80;

/// Bytes of the uniform params block of the RoPE + KV-store kernel: 64 bytes of fields and
/// `MAX_ROT_DIM` (512) f32 frequency words, mirroring `kernels::attention::kv_cache` (kept here as
/// a number, since it is the one params block far from 16-32 bytes and the planner must not break
/// when that module changes).
pub const ROPE_STORE_PARAMS_BYTES: u64 = 64 + 512 * 4;

impl Kernel {
    /// Size of the kernel's uniform params struct (the `size_of` asserts in src/kernels).
    pub fn params_bytes(self) -> u64 {
        match self {
            Kernel::Host | Kernel::Copy => 0,
            Kernel::RmsNorm
            | Kernel::AddRmsNorm
            | Kernel::AddBias
            | Kernel::Add
            | Kernel::Swiglu
            | Kernel::GeGlu
            | Kernel::Scale
            | Kernel::LayerNorm
            | Kernel::Gelu => 16,
            Kernel::Embedding { .. }
            | Kernel::TableF32 { .. }
            | Kernel::Matmul { .. }
            | Kernel::StackedMatmul
            | Kernel::KvStore => 32,
            Kernel::Attention | Kernel::DenseAttention { .. } => ATTENTION_PARAMS_BYTES,
            Kernel::RopeStore => ROPE_STORE_PARAMS_BYTES,
        }
    }
}

/// One step of the schedule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Step {
    pub label: String,
    pub kernel: Kernel,
    pub reads: Vec<String>,
    pub writes: Vec<String>,
    /// Whether the pass folds into a projection when it sees a single token
    /// ([`Fusions::single_token_folds`]).
    pub folds: Folds,
}

/// When a step's pass folds into the projection after or before it, so that it does not dispatch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Folds {
    /// Never: the pass always dispatches.
    Never,
    /// In a chunk of one token; chunks of several dispatch the pass.
    SingleToken,
    /// Always: the pass always sees one row (the final norm of the last row alone).
    Always,
    /// The opposite of `SingleToken`: the step runs for a single token only, chunks of several
    /// run other steps in its place (the stacked projections on the workgroup matvec).
    Chunks,
}

impl Folds {
    /// Whether the step dispatches in a chunk of `chunk` tokens.
    pub fn dispatches(self, chunk: usize) -> bool {
        match self {
            Folds::Never => true,
            Folds::SingleToken => chunk > 1,
            Folds::Always => false,
            Folds::Chunks => chunk <= 1,
        }
    }
}

pub(crate) fn step(label: &str, kernel: Kernel, reads: &[&str], writes: &[&str]) -> Step {
    let own = |v: &[&str]| v.iter().map(|s| s.to_string()).collect();
    Step {
        label: label.into(),
        kernel,
        reads: own(reads),
        writes: own(writes),
        folds: Folds::Never,
    }
}

impl Step {
    /// The step folds into a projection for single tokens when `on`.
    fn folded(mut self, on: bool) -> Step {
        if on {
            self.folds = Folds::SingleToken;
        }
        self
    }

    /// The step runs for single tokens only when `on` (chunks of several run others instead).
    fn single_only(mut self, on: bool) -> Step {
        if on {
            self.folds = Folds::Chunks;
        }
        self
    }
}

/// A forward pass: steps before the layer loop, one layer (run `n_layers >= 1` times), and after.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Schedule {
    pub prologue: Vec<Step>,
    pub layer: Vec<Step>,
    pub epilogue: Vec<Step>,
}

impl Schedule {
    /// All steps in program order (the layer body once); indices of [`RolePlan::live`] refer to it.
    pub fn linear(&self) -> impl Iterator<Item = &Step> {
        self.prologue
            .iter()
            .chain(&self.layer)
            .chain(&self.epilogue)
    }
}

/// The fusions the forward pass runs on a device; they change the schedule.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Fusions {
    /// Q, K and V one dispatch (weights stacked in one texture or buffer,
    /// [`crate::kernels::matmul::matmul_fused`]). That changes the dispatch count, not the
    /// sharing: the stacked step writes the roles the separate ones wrote, live together anyway.
    pub stacked_projections: bool,
    /// Gate and up one dispatch, likewise (a model's two groups stack apart: each needs one
    /// format and to fit one binding or texture).
    pub stacked_gate_up: bool,
    /// Chunks of several tokens run the stacked projections as one dispatch too (the subgroup
    /// matvec); otherwise only a single token and decode rows do, and a chunk runs each matrix
    /// apart ([`crate::kernels::matmul::stacks_for`]).
    pub stacked_chunks: bool,
    /// For single tokens, the passes around the projections fold into them
    /// ([`crate::kernels::matmul::single_token_folds`]): the RMSNorms into the next projections'
    /// input where those are small enough ([`crate::kernels::matmul::norm_folds`]: Q/K/V, gate/up,
    /// the head), SwiGLU into the down projection's input, the residual adds into the output of
    /// the attention's and the FFN's last projection (the attention residual and FFN norm, one
    /// pass otherwise, become the output projection's add and the gate/up input, where the FFN
    /// norm folds). Chunks of several tokens keep the passes, so one schedule serves both: those
    /// steps say when they fold ([`Step::folds`]), and the projections read what the folded forms
    /// read. That changes the sharing where a folded projection reads a role besides the pinned
    /// `x` and `x2`: the down projection reads gate and up (they live until it), and the head,
    /// where the final norm folds into it, reads the last row copied into `proj`.
    pub single_token_folds: bool,
    /// The norms fold into projections of any size, not only up to
    /// [`NORM_FOLD_MAX_WEIGHTS`]: where the workgroup matvec runs (GPUs), whose workgroups load
    /// gamma beside x from cache ([`crate::kernels::matmul::norm_folds`]).
    pub unbounded_norm_folds: bool,
}

/// `Llama::forward_chunk` step by step. Q/K/V bias adds appear when `cfg.attn_bias`. Without
/// `all_logits` the last row is copied into `proj` before the final norm (the code skips the copy
/// when the chunk is one token and normalises `x` directly; the schedule lists both reads).
///
/// Each step reads and writes what the kernels that run for it bind, in the folded form and the
/// unfolded one: a projection that folds a pass in reads that pass's input as well as its own,
/// so that the input lives until the projection has run. Otherwise the plan may give a role read
/// by a folded projection the buffer of the role it writes.
///
/// `fusions`: see [`Fusions`].
pub fn llama_schedule(cfg: &ModelConfig, all_logits: bool, fusions: Fusions) -> Schedule {
    if cfg.gemma.is_some() {
        return gemma_schedule(cfg, all_logits, fusions);
    }
    let stacked = fusions.stacked_projections;
    let (d, v) = (cfg.hidden_size, cfg.vocab_size);
    let q = cfg.n_heads.saturating_mul(cfg.head_dim);
    let kv = cfg.n_kv_heads.saturating_mul(cfg.head_dim);
    let f = cfg.ffn_size;
    let mm = |rows, cols| Kernel::Matmul { rows, cols };
    let prologue = vec![
        step("upload token ids", Kernel::Host, &[], &["ids"]),
        step(
            "embedding",
            Kernel::Embedding { rows: v, cols: d },
            &["ids"],
            &["x"],
        ),
    ];
    let f1 = fusions.single_token_folds;
    // Norms fold into projections of few enough weights (kernels::matmul::norm_folds).
    let unbounded = fusions.unbounded_norm_folds;
    let norm_folds = |weights: usize| f1 && (unbounded || weights <= NORM_FOLD_MAX_WEIGHTS);
    let fold_attn_norm = norm_folds((q + 2 * kv).saturating_mul(d));
    let fold_head = norm_folds(v.saturating_mul(d));
    // The attention's residual folds into wo where the FFN norm folds into gate/up (else add and
    // norm stay one pass); folded residual adds need no bias after the projection.
    let fold_wo = norm_folds((2 * f).saturating_mul(d)) && !cfg.attn_out_bias;
    let fold_down = f1 && !cfg.ffn_bias;
    // What the projections read (and write) beyond the unfolded forms, when they fold.
    let also = |on: bool, base: &[&'static str], more: &[&'static str]| -> Vec<&'static str> {
        let mut v = base.to_vec();
        if on {
            v.extend_from_slice(more);
        }
        v
    };
    let attn_norm = step("attn_norm", Kernel::RmsNorm, &["x"], &["xb"]);
    let mut layer = vec![attn_norm.folded(fold_attn_norm)];
    let qkv_in = also(fold_attn_norm, &["xb"], &["x"]);
    let apart = !stacked || !fusions.stacked_chunks;
    if stacked {
        let qkv = Kernel::StackedMatmul;
        let s = step("matmul wq+wk+wv", qkv, &qkv_in, &["q", "k", "v"]);
        layer.push(s.single_only(apart));
    }
    if apart {
        layer.extend([
            step("matmul wq", mm(q, d), &qkv_in, &["q"]).folded(stacked),
            step("matmul wk", mm(kv, d), &qkv_in, &["k"]).folded(stacked),
            step("matmul wv", mm(kv, d), &qkv_in, &["v"]).folded(stacked),
        ]);
    }
    if cfg.attn_bias {
        for r in ["q", "k", "v"] {
            layer.push(step(&format!("bias {r}"), Kernel::AddBias, &[r], &[r]));
        }
    }
    layer.extend([
        step(
            "rope q, k + kv store",
            Kernel::RopeStore,
            &["q", "k", "v"],
            &["q"],
        ),
        // a single token may split its keys: partial states in `partials`, then merged
        step("attention", Kernel::Attention, &["q"], &["att", "partials"]),
        step(
            "matmul wo",
            mm(d, q),
            &also(fold_wo, &["att"], &["x"]),
            &also(fold_wo, &["proj"], &["x2"]),
        ),
    ]);
    // Biases that `attention_bias` (o_proj) and `mlp_bias` checkpoints add after their matmuls.
    let bias = |on: bool, layer: &mut Vec<Step>, r: &str| {
        if on {
            layer.push(step(&format!("bias {r}"), Kernel::AddBias, &[r], &[r]));
        }
    };
    bias(cfg.attn_out_bias, &mut layer, "proj");
    layer.push(
        step(
            "residual add (attention) + ffn_norm",
            Kernel::AddRmsNorm,
            &["x", "proj"],
            &["x2", "xb"],
        )
        .folded(fold_wo),
    );
    // Without the folded residual the single token still has the add+norm pass; with it, gate/up
    // normalise x2 themselves.
    let gu_in = also(fold_wo, &["xb"], &["x2"]);
    let stacked_gu = fusions.stacked_gate_up;
    let apart_gu = !stacked_gu || !fusions.stacked_chunks;
    if stacked_gu {
        let gu = Kernel::StackedMatmul;
        let s = step("matmul w_gate+w_up", gu, &gu_in, &["gate", "up"]);
        layer.push(s.single_only(apart_gu));
    }
    if apart_gu {
        // Stacked for single tokens only: a chunk's separate products follow the stacked step.
        let gate = step("matmul w_gate", mm(f, d), &gu_in, &["gate"]);
        layer.push(gate.folded(stacked_gu));
        layer.push(step("matmul w_up", mm(f, d), &gu_in, &["up"]).folded(stacked_gu));
    }
    bias(cfg.ffn_bias, &mut layer, "gate");
    bias(cfg.ffn_bias, &mut layer, "up");
    let mut down_in = also(f1, &["act"], &["gate", "up"]);
    if fold_down {
        down_in.push("x2");
    }
    layer.extend([
        step("swiglu", Kernel::Swiglu, &["gate", "up"], &["act"]).folded(f1),
        step(
            "matmul w_down",
            mm(d, f),
            &down_in,
            &also(fold_down, &["proj"], &["x"]),
        ),
    ]);
    bias(cfg.ffn_bias, &mut layer, "proj");
    layer.push(step("residual add (ffn)", Kernel::Add, &["x2", "proj"], &["x"]).folded(fold_down));
    Schedule {
        prologue,
        layer,
        epilogue: head_steps(all_logits, fold_head, mm(v, d)),
    }
}

/// The steps after the layers: the final norm and the head, on every row or on the last one.
fn head_steps(all_logits: bool, fold_head: bool, head: Kernel) -> Vec<Step> {
    let mut epilogue = Vec::new();
    let norm_in: &[&'static str] = if all_logits {
        &["x"]
    } else {
        epilogue.push(step("copy last row", Kernel::Copy, &["x"], &["proj"]));
        &["x", "proj"]
    };
    let also = |on: bool, base: &[&'static str], more: &[&'static str]| -> Vec<&'static str> {
        let mut v = base.to_vec();
        if on {
            v.extend_from_slice(more);
        }
        v
    };
    epilogue.extend([
        // Without all logits the head sees the last row alone, so the norm always folds.
        Step {
            folds: match (fold_head, all_logits) {
                (false, _) => Folds::Never,
                (true, true) => Folds::SingleToken,
                (true, false) => Folds::Always,
            },
            ..step("final_norm", Kernel::RmsNorm, norm_in, &["xb"])
        },
        // Folded, the head normalises the final norm's input itself: `x`, or the last row in
        // `proj` (not `xb`, which the folded norm never writes).
        step(
            "matmul head",
            head,
            &also(fold_head, &["xb"], norm_in),
            &["logits"],
        ),
        step("read back logits", Kernel::Host, &["logits"], &[]),
    ]);
    epilogue
}

/// `Llama::forward_chunk` with `gemma_layer` (src/model/llama.rs), Gemma 3: the embedding scaled
/// by sqrt(hidden) (looked up into `xb`, scaled into `x`), q and k normalised per head into `qn`
/// and `kn` before RoPE, norms after the attention and the FFN before their residual adds, GeGLU.
/// Only the attention norm folds into its projections (a single token); the other passes always
/// dispatch.
fn gemma_schedule(cfg: &ModelConfig, all_logits: bool, fusions: Fusions) -> Schedule {
    let stacked = fusions.stacked_projections;
    let (d, v) = (cfg.hidden_size, cfg.vocab_size);
    let q = cfg.n_heads.saturating_mul(cfg.head_dim);
    let kv = cfg.n_kv_heads.saturating_mul(cfg.head_dim);
    let f = cfg.ffn_size;
    let mm = |rows, cols| Kernel::Matmul { rows, cols };
    let prologue = vec![
        step("upload token ids", Kernel::Host, &[], &["ids"]),
        step(
            "embedding",
            Kernel::Embedding { rows: v, cols: d },
            &["ids"],
            &["xb"],
        ),
        step("embedding scale", Kernel::Scale, &["xb"], &["x"]),
    ];
    let f1 = fusions.single_token_folds;
    let unbounded = fusions.unbounded_norm_folds;
    let norm_folds = |weights: usize| f1 && (unbounded || weights <= NORM_FOLD_MAX_WEIGHTS);
    let fold_attn_norm = norm_folds((q + 2 * kv).saturating_mul(d));
    let fold_head = norm_folds(v.saturating_mul(d));
    let mut layer =
        vec![step("attn_norm", Kernel::RmsNorm, &["x"], &["xb"]).folded(fold_attn_norm)];
    let qkv_in: &[&str] = if fold_attn_norm {
        &["xb", "x"]
    } else {
        &["xb"]
    };
    let apart = !stacked || !fusions.stacked_chunks;
    if stacked {
        let qkv = Kernel::StackedMatmul;
        let s = step("matmul wq+wk+wv", qkv, qkv_in, &["q", "k", "v"]);
        layer.push(s.single_only(apart));
    }
    if apart {
        layer.extend([
            step("matmul wq", mm(q, d), qkv_in, &["q"]).folded(stacked),
            step("matmul wk", mm(kv, d), qkv_in, &["k"]).folded(stacked),
            step("matmul wv", mm(kv, d), qkv_in, &["v"]).folded(stacked),
        ]);
    }
    layer.extend([
        step("q_norm", Kernel::RmsNorm, &["q"], &["qn"]),
        step("k_norm", Kernel::RmsNorm, &["k"], &["kn"]),
        step(
            "rope q, k + kv store",
            Kernel::RopeStore,
            &["qn", "kn", "v"],
            &["qn"],
        ),
        step(
            "attention",
            Kernel::Attention,
            &["qn"],
            &["att", "partials"],
        ),
        step("matmul wo", mm(d, q), &["att"], &["proj"]),
        step("post_attention_norm", Kernel::RmsNorm, &["proj"], &["xb"]),
        step(
            "residual add (attention) + ffn_norm",
            Kernel::AddRmsNorm,
            &["x", "xb"],
            &["x2", "proj"],
        ),
    ]);
    let stacked_gu = fusions.stacked_gate_up;
    let apart_gu = !stacked_gu || !fusions.stacked_chunks;
    if stacked_gu {
        let gu = Kernel::StackedMatmul;
        let s = step("matmul w_gate+w_up", gu, &["proj"], &["gate", "up"]);
        layer.push(s.single_only(apart_gu));
    }
    if apart_gu {
        let gate = step("matmul w_gate", mm(f, d), &["proj"], &["gate"]);
        layer.push(gate.folded(stacked_gu));
        layer.push(step("matmul w_up", mm(f, d), &["proj"], &["up"]).folded(stacked_gu));
    }
    layer.extend([
        step("geglu", Kernel::GeGlu, &["gate", "up"], &["act"]),
        step("matmul w_down", mm(d, f), &["act"], &["proj"]),
        step("post_ffw_norm", Kernel::RmsNorm, &["proj"], &["xb"]),
        step("residual add (ffn)", Kernel::Add, &["x2", "xb"], &["x"]),
    ]);
    Schedule {
        prologue,
        layer,
        epilogue: head_steps(all_logits, fold_head, mm(v, d)),
    }
}

/// One role: its bytes and the step ranges (inclusive, in [`Schedule::linear`] order) where it is
/// live.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RolePlan {
    pub name: String,
    pub bytes: u64,
    pub live: Vec<(usize, usize)>,
}

/// One allocation shared by several roles, each using a prefix of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PlannedBuffer {
    /// The roles joined by `+`, largest first (`gate+q+proj`): the ledger label.
    pub label: String,
    /// The largest role's bytes.
    pub bytes: u64,
    pub roles: Vec<String>,
}

/// The shared activation buffers of one chunk size.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ActivationPlan {
    /// Tokens per chunk the buffers are sized for.
    pub chunk: usize,
    pub buffers: Vec<PlannedBuffer>,
    /// Role name to its index in `buffers`.
    pub role_to_buffer: BTreeMap<String, usize>,
    pub roles: Vec<RolePlan>,
    /// Step labels in [`Schedule::linear`] order, and the half-open index range of the layer body.
    pub steps: Vec<String>,
    pub layer_steps: (usize, usize),
    /// Sum of `buffers`.
    pub total_bytes: u64,
    /// Sum of all roles, one buffer each (what `RunState` allocated before sharing).
    pub unshared_bytes: u64,
}

impl ActivationPlan {
    /// The buffer `role` lives in.
    pub fn buffer_of(&self, role: &str) -> Option<&PlannedBuffer> {
        self.role_to_buffer.get(role).map(|&i| &self.buffers[i])
    }
}

/// Adds what a batched decode step of up to `rows` rows of distinct sequences needs beside a
/// chunk's buffers (`model::llama`'s `BatchBuffers`), one buffer each: a logits row per decode row
/// (`batch.logits`), the row table the batched RoPE/store and attention kernels read (`batch.rows`:
/// slot and position, two u32 a row) and the rows' split attention state (`batch.partials`).
pub fn add_batch_buffers(plan: &mut ActivationPlan, cfg: &ModelConfig, rows: usize) {
    let rows = rows as u64;
    let logits = rows.saturating_mul(cfg.vocab_size as u64);
    let partials = crate::kernels::attention::partials_bytes(cfg.n_heads, cfg.head_dim) / 4;
    for (role, n) in [
        ("batch.logits", logits),
        ("batch.rows", rows.saturating_mul(2)),
        ("batch.partials", rows.saturating_mul(partials)),
    ] {
        let bytes = n.saturating_mul(4);
        plan.role_to_buffer.insert(role.into(), plan.buffers.len());
        plan.buffers.push(PlannedBuffer {
            label: role.into(),
            bytes,
            roles: vec![role.into()],
        });
        plan.total_bytes = plan.total_bytes.saturating_add(bytes);
        plan.unshared_bytes = plan.unshared_bytes.saturating_add(bytes);
    }
}

/// The bytes of every [`LLAMA_ROLES`] entry for chunks of `chunk` tokens (f32 activations, token
/// ids u32).
pub fn llama_role_bytes(
    cfg: &ModelConfig,
    chunk: usize,
    all_logits: bool,
) -> BTreeMap<String, u64> {
    let m = chunk as u64;
    let d = cfg.hidden_size as u64;
    let q = (cfg.n_heads as u64).saturating_mul(cfg.head_dim as u64);
    let kv = (cfg.n_kv_heads as u64).saturating_mul(cfg.head_dim as u64);
    let f = cfg.ffn_size as u64;
    let n_logits = if all_logits { m } else { 1 };
    // Saturating: an absurd chunk or config gives an absurd plan, not an overflow.
    let partials = crate::kernels::attention::partials_bytes(cfg.n_heads, cfg.head_dim) / 4;
    let sizes: Vec<u64> = [1, d, d, d, q, kv, kv, q, d, f, f, f]
        .iter()
        .map(|&w| m.saturating_mul(w))
        .chain([n_logits.saturating_mul(cfg.vocab_size as u64), partials])
        .collect();
    let mut roles: BTreeMap<String, u64> = LLAMA_ROLES
        .iter()
        .zip(sizes)
        .map(|(r, n)| (r.to_string(), n.saturating_mul(4)))
        .collect();
    if cfg.gemma.is_some() {
        // Gemma's per-head normalised q and k.
        roles.insert("qn".into(), m.saturating_mul(q).saturating_mul(4));
        roles.insert("kn".into(), m.saturating_mul(kv).saturating_mul(4));
    }
    roles
}

/// The shared activation buffers of the LLaMA forward pass for chunks of `chunk` tokens (at least
/// 1). `all_logits` keeps logits for every token of a chunk rather than the last.
pub fn llama_activation_plan(cfg: &ModelConfig, chunk: usize, all_logits: bool) -> ActivationPlan {
    llama_activation_plan_with(cfg, chunk, all_logits, false)
}

/// [`llama_activation_plan`] for a forward pass with the single-token folds or without (the one
/// fusion that changes the sharing: the down projection reads gate and up; see [`Fusions`]), the
/// norms folding up to [`NORM_FOLD_MAX_WEIGHTS`] (the subgroup matvec's bound).
pub fn llama_activation_plan_with(
    cfg: &ModelConfig,
    chunk: usize,
    all_logits: bool,
    single_token_folds: bool,
) -> ActivationPlan {
    let fusions = Fusions {
        single_token_folds,
        ..Fusions::default()
    };
    llama_activation_plan_fused(cfg, chunk, all_logits, fusions)
}

/// [`llama_activation_plan`] for the fusions a device runs
/// ([`crate::plan::DeviceTraits::fusions`]). The runtime allocates this.
pub fn llama_activation_plan_fused(
    cfg: &ModelConfig,
    chunk: usize,
    all_logits: bool,
    fusions: Fusions,
) -> ActivationPlan {
    let chunk = chunk.max(1);
    let sched = llama_schedule(cfg, all_logits, fusions);
    let sizes = llama_role_bytes(cfg, chunk, all_logits);
    share(&sched, &sizes, &LLAMA_PINNED, chunk)
}

/// Liveness over `sched` (layer body as a loop) and greedy first-fit sharing of the roles in
/// `sizes`. Roles in `pinned` are live at every step. Roles the schedule never touches are
/// live nowhere and so share freely.
pub fn share(
    sched: &Schedule,
    sizes: &BTreeMap<String, u64>,
    pinned: &[&str],
    chunk: usize,
) -> ActivationPlan {
    let steps: Vec<&Step> = sched.linear().collect();
    let n = steps.len();
    let (p, b) = (sched.prologue.len(), sched.layer.len());
    let names: Vec<&String> = sizes.keys().collect();
    let idx = |r: &String| names.iter().position(|n| *n == r);
    let set = |rs: &[String]| -> Vec<bool> {
        let mut s = vec![false; names.len()];
        rs.iter().filter_map(idx).for_each(|i| s[i] = true);
        s
    };
    let uses: Vec<Vec<bool>> = steps.iter().map(|s| set(&s.reads)).collect();
    let defs: Vec<Vec<bool>> = steps.iter().map(|s| set(&s.writes)).collect();
    // Successors: the next step, plus the back edge from the body's last step to its first.
    let succ = |i: usize| -> Vec<usize> {
        let mut v = Vec::new();
        if i + 1 < n {
            v.push(i + 1);
        }
        if b > 0 && i == p + b - 1 {
            v.push(p);
        }
        v
    };
    let mut live_in = vec![vec![false; names.len()]; n];
    let mut live_out = vec![vec![false; names.len()]; n];
    // Backward dataflow to a fixed point; the loop needs at most two passes to settle.
    let mut changed = true;
    while changed {
        changed = false;
        for i in (0..n).rev() {
            let mut out = vec![false; names.len()];
            for s in succ(i) {
                for (o, l) in out.iter_mut().zip(&live_in[s]) {
                    *o |= *l;
                }
            }
            let inn: Vec<bool> = (0..names.len())
                .map(|r| uses[i][r] || (out[r] && !defs[i][r]))
                .collect();
            if inn != live_in[i] || out != live_out[i] {
                changed = true;
                live_in[i] = inn;
                live_out[i] = out;
            }
        }
    }
    let occupied = |r: usize, i: usize| {
        pinned.contains(&names[r].as_str()) || live_in[i][r] || live_out[i][r] || defs[i][r]
    };
    let occ: Vec<Vec<bool>> = (0..names.len())
        .map(|r| (0..n).map(|i| occupied(r, i)).collect())
        .collect();

    // Largest first; ties in LLAMA_ROLES-like order of first touch, then by name, for a stable plan.
    let first_touch = |r: usize| occ[r].iter().position(|&o| o).unwrap_or(n);
    let mut order: Vec<usize> = (0..names.len()).collect();
    order.sort_by_key(|&r| (std::cmp::Reverse(sizes[names[r]]), first_touch(r), r));
    let mut groups: Vec<Vec<usize>> = Vec::new();
    for r in order {
        let clash = |g: &Vec<usize>| g.iter().any(|&o| (0..n).any(|i| occ[o][i] && occ[r][i]));
        let solo = |x: usize| pinned.contains(&names[x].as_str());
        match groups
            .iter_mut()
            .find(|g| !solo(r) && !g.iter().any(|&o| solo(o)) && !clash(g))
        {
            Some(g) => g.push(r),
            None => groups.push(vec![r]),
        }
    }

    let mut role_to_buffer = BTreeMap::new();
    let buffers: Vec<PlannedBuffer> = groups
        .iter()
        .enumerate()
        .map(|(bi, g)| {
            let roles: Vec<String> = g.iter().map(|&r| names[r].clone()).collect();
            for r in &roles {
                role_to_buffer.insert(r.clone(), bi);
            }
            PlannedBuffer {
                label: roles.join("+"),
                bytes: g.iter().map(|&r| sizes[names[r]]).max().unwrap_or(0),
                roles,
            }
        })
        .collect();
    let roles = (0..names.len())
        .map(|r| RolePlan {
            name: names[r].clone(),
            bytes: sizes[names[r]],
            live: ranges(&occ[r]),
        })
        .collect();
    ActivationPlan {
        chunk,
        total_bytes: buffers.iter().fold(0, |a, b| a.saturating_add(b.bytes)),
        unshared_bytes: sizes.values().fold(0, |a, b| a.saturating_add(*b)),
        buffers,
        role_to_buffer,
        roles,
        steps: steps.iter().map(|s| s.label.clone()).collect(),
        layer_steps: (p, p + b),
    }
}

/// Inclusive index ranges of the `true` runs of `v`.
fn ranges(v: &[bool]) -> Vec<(usize, usize)> {
    let mut out: Vec<(usize, usize)> = Vec::new();
    for (i, &on) in v.iter().enumerate() {
        if !on {
            continue;
        }
        match out.last_mut() {
            Some(last) if last.1 + 1 == i => last.1 = i,
            _ => out.push((i, i)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Gemma 3 270M's shape (q wider than the hidden size).
    fn gemma() -> ModelConfig {
        let json = serde_json::json!({
            "model_type": "gemma3_text", "vocab_size": 262144, "hidden_size": 640,
            "intermediate_size": 2048, "num_hidden_layers": 18, "num_attention_heads": 4,
            "num_key_value_heads": 1, "head_dim": 256, "sliding_window": 512,
        });
        ModelConfig::from_hf_json(&json).unwrap()
    }

    /// Every role Gemma's schedule touches has bytes, every role with bytes is touched, and no
    /// step gets one buffer as an input and an output, for decode and prefill plans with and
    /// without the single-token folds and stacked projections.
    #[test]
    fn gemma_schedule_roles_and_sharing() {
        let cfg = gemma();
        for chunk in [1, 7, 64] {
            for (stacked, folds) in [(false, false), (true, true), (false, true)] {
                for all_logits in [false, true] {
                    let f = Fusions {
                        stacked_projections: stacked,
                        stacked_gate_up: stacked,
                        stacked_chunks: stacked && folds,
                        single_token_folds: folds,
                        unbounded_norm_folds: folds,
                    };
                    let sched = llama_schedule(&cfg, all_logits, f);
                    let sizes = llama_role_bytes(&cfg, chunk, all_logits);
                    let plan = share(&sched, &sizes, &LLAMA_PINNED, chunk);
                    let touched: std::collections::BTreeSet<&String> = sched
                        .linear()
                        .flat_map(|s| s.reads.iter().chain(&s.writes))
                        .collect();
                    assert_eq!(touched, sizes.keys().collect());
                    assert_eq!(sizes["qn"], 4 * (chunk * 1024) as u64);
                    assert_eq!(sizes["kn"], 4 * (chunk * 256) as u64);
                    for s in sched.linear() {
                        for r in &s.reads {
                            for w in s.writes.iter().filter(|w| *w != r) {
                                assert_ne!(
                                    plan.role_to_buffer[r], plan.role_to_buffer[w],
                                    "{}: reads {r} and writes {w} in one buffer",
                                    s.label
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    /// LLaMA's schedule has no Gemma steps or roles.
    #[test]
    fn llama_schedule_is_untouched_by_gemma() {
        let cfg = ModelConfig::preset("smollm2-135m").unwrap();
        let sizes = llama_role_bytes(&cfg, 8, false);
        assert_eq!(sizes.len(), LLAMA_ROLES.len());
        let sched = llama_schedule(&cfg, false, Fusions::default());
        assert!(sched.linear().all(|s| s.kernel != Kernel::GeGlu));
    }
}
