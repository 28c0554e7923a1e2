//! The one error type of the wgllm library.
//!
//! Every failure a user, a file or a driver can cause comes back as a variant of [`Error`], never as
//! a panic. The binary wraps it in `anyhow` for printing; the library never does.

use crate::gpu::ledger::{BufferClass, ClassUsage};

/// Result alias used throughout the library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    // ---- device -------------------------------------------------------------------------------
    #[error("no GPU adapter found{0}")]
    NoAdapter(String),
    #[error(
        "adapter index {index} is out of range: {count} adapter(s) found (see `wgllm devices`)"
    )]
    AdapterIndex { index: usize, count: usize },
    #[error("could not open the device on adapter '{adapter}': {reason}")]
    RequestDevice { adapter: String, reason: String },
    #[error("the device lacks feature {feature}, needed by {needed_by}")]
    MissingFeature {
        feature: &'static str,
        needed_by: String,
    },
    #[error("wgpu {kind} error in {context}: {message}")]
    Gpu {
        kind: &'static str,
        context: String,
        message: String,
    },
    #[error("GPU readback of '{label}' failed: {reason}")]
    Readback { label: String, reason: String },

    // ---- tokenizers ---------------------------------------------------------------------------
    #[error("tokenizer: {reason}")]
    Tokenizer { reason: String },
    /// A GGUF vocabulary that cannot be used as it is: an unknown model or pre-tokenizer, token
    /// arrays of the wrong length, merges naming tokens the vocabulary lacks.
    #[error("'{file}': tokenizer key '{key}': {reason}")]
    Vocab {
        file: String,
        key: String,
        reason: String,
    },

    // ---- chat templates ------------------------------------------------------------------------
    /// A chat template that does not compile, raises, runs past its limits or fails otherwise;
    /// `origin` names where it came from (the file and key, or the built-in's name).
    #[error("chat template ({origin}): {kind}: {reason}")]
    ChatTemplate {
        origin: String,
        kind: TemplateFailure,
        reason: String,
    },

    // ---- fetching default models --------------------------------------------------------------
    #[error("could not fetch the default model {model}: {reason}")]
    Fetch { model: String, reason: String },

    // ---- VRAM ledger --------------------------------------------------------------------------
    #[error(
        "VRAM budget exceeded: '{label}' asks for {requested} bytes as {class}, \
         but {in_use} of the {budget}-byte budget are in use ({usage}); {over} bytes over"
    )]
    VramBudget {
        label: String,
        class: BufferClass,
        requested: u64,
        in_use: u64,
        budget: u64,
        over: u64,
        usage: ClassUsage,
    },
    #[error("buffer '{label}' of {size} bytes exceeds the device's maximum buffer size {max}")]
    BufferTooLarge { label: String, size: u64, max: u64 },

    #[error(
        "the context is full: {needed} positions needed, the KV cache holds {ctx} (raise -c/--ctx)"
    )]
    ContextFull { ctx: usize, needed: usize },

    // ---- shapes and kernels -------------------------------------------------------------------
    #[error("shape mismatch in {op}: expected {expected}, got {got}")]
    ShapeMismatch {
        op: String,
        expected: String,
        got: String,
    },
    #[error("invalid argument to {op}: {reason}")]
    InvalidArgument { op: String, reason: String },
    #[error("unknown shader '{0}'")]
    UnknownShader(String),

    // ---- model configs ------------------------------------------------------------------------
    #[error("model config ({model_type}): missing field '{field}'")]
    ConfigMissing { model_type: String, field: String },
    #[error("model config ({model_type}): field '{field}' is invalid: {reason}")]
    ConfigInvalid {
        model_type: String,
        field: String,
        reason: String,
    },
    #[error("unsupported model_type {0}; supported: llama, mistral, qwen2, bert, gpt2")]
    UnknownModelType(String),
    #[error("unknown model preset '{name}'; known presets: {known}")]
    UnknownPreset { name: String, known: String },

    // ---- parsing of sizes, formats and files --------------------------------------------------
    #[error("cannot parse '{input}' as {what}: {reason}")]
    Parse {
        what: &'static str,
        input: String,
        reason: String,
    },
    #[error("I/O error on '{path}': {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },

    // ---- model files --------------------------------------------------------------------------
    #[error(
        "'{file}' is truncated: {what} at offset {offset} needs {need} bytes, \
         but the file has {file_len}"
    )]
    Truncated {
        file: String,
        what: String,
        offset: u64,
        need: u64,
        file_len: u64,
    },
    #[error("'{file}' is not a valid model file: {reason}")]
    BadFile { file: String, reason: String },
    #[error("'{file}': tensor '{tensor}' is invalid: {reason}")]
    BadTensor {
        file: String,
        tensor: String,
        reason: String,
    },
    #[error("'{file}': tensor '{tensor}' has type {dtype}, which is not supported here")]
    UnsupportedDtype {
        file: String,
        tensor: String,
        dtype: String,
    },
    #[error("'{file}' has no tensor named '{tensor}'")]
    MissingTensor { file: String, tensor: String },
    #[error("'{file}': tensor '{tensor}' has shape {got}, expected {expected}")]
    TensorShape {
        file: String,
        tensor: String,
        expected: String,
        got: String,
    },
    #[error("'{file}' has no metadata key '{key}'")]
    MissingKey { file: String, key: String },
    #[error("'{file}': metadata key '{key}' holds {got}, expected {expected}")]
    KeyType {
        file: String,
        key: String,
        expected: &'static str,
        got: String,
    },
    #[error("'{file}' names shard '{shard}' for tensor '{tensor}', but the shard is missing")]
    MissingShard {
        file: String,
        shard: String,
        tensor: String,
    },
}

/// How a chat template failed ([`Error::ChatTemplate`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TemplateFailure {
    /// It is not valid Jinja (or uses a statement that is not supported).
    Syntax,
    /// The template itself called `raise_exception(message)`; the reason is its message.
    Raised,
    /// It ran past a render limit: instructions (fuel), recursion depth or output size.
    Limit,
    /// Any other failure while rendering (an unknown method, a type error, ...).
    Render,
}

impl std::fmt::Display for TemplateFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TemplateFailure::Syntax => "syntax error",
            TemplateFailure::Raised => "the template raised an exception",
            TemplateFailure::Limit => "render limit exceeded",
            TemplateFailure::Render => "render error",
        })
    }
}

impl Error {
    pub(crate) fn shape(
        op: impl Into<String>,
        expected: impl Into<String>,
        got: impl Into<String>,
    ) -> Self {
        Error::ShapeMismatch {
            op: op.into(),
            expected: expected.into(),
            got: got.into(),
        }
    }
    pub(crate) fn invalid(op: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::InvalidArgument {
            op: op.into(),
            reason: reason.into(),
        }
    }
}
