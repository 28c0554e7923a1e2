//! Where a model's tensors come from: a GGUF file or a Hugging Face safetensors directory. Both
//! answer the same questions (is this tensor there, upload it as a weight matrix or as an f32
//! vector) so that the architectures are written once.

use crate::error::{Error, Result};
use crate::gpu::{BufferClass, Gpu};
use crate::kernels::{Tensor, WeightMatrix};
use crate::loader::gguf::Gguf;
use crate::loader::safetensors::HfModel;
use crate::quant::WeightFormat;

pub enum Source<'a> {
    Gguf(&'a Gguf),
    /// A safetensors directory, with the format its matrices are quantised to on load (`None`
    /// keeps f32).
    Hf(&'a HfModel, Option<WeightFormat>),
    /// No file: pseudo-random weights of the real shapes in `format` (norm weights are ones), for
    /// benchmarks and memory proofs of models that are not on disk. The bytes are generated in
    /// bounded chunks and uploaded, so host memory stays small.
    Synthetic {
        format: WeightFormat,
        seed: u64,
    },
}

impl Source<'_> {
    pub fn file(&self) -> String {
        match self {
            Source::Gguf(g) => g.file().to_string(),
            Source::Hf(h, _) => h.dir().display().to_string(),
            Source::Synthetic { .. } => "(synthetic weights)".into(),
        }
    }

    pub fn has(&self, name: &str) -> bool {
        match self {
            Source::Gguf(g) => g.tensor(name).is_ok(),
            Source::Hf(h, _) => h.tensor_shape(name).is_ok(),
            // Synthetic models have no biases and no separate output head.
            Source::Synthetic { .. } => {
                !(name.contains("bias") || name == "output.weight" || name == "lm_head.weight")
            }
        }
    }

    fn shape_err(&self, name: &str, expected: String, got: String) -> Error {
        Error::TensorShape {
            file: self.file(),
            tensor: name.into(),
            expected,
            got,
        }
    }

    /// A `rows x cols` matrix (`rows` outputs). GGUF stores it as `[cols, rows]` (row length first),
    /// safetensors as `[rows, cols]`; both are checked against the config before any upload.
    pub fn matrix(&self, gpu: &Gpu, name: &str, rows: usize, cols: usize) -> Result<WeightMatrix> {
        match self {
            Source::Gguf(g) => {
                g.expect_shape(name, &[cols, rows])?;
                let (format, bytes) = g.tensor_weight(name)?;
                if format.is_quantized() && !cols.is_multiple_of(32) {
                    return Err(self.shape_err(
                        name,
                        "a row length that is a multiple of 32".into(),
                        format!("{cols}"),
                    ));
                }
                gpu.upload_weights(name, format, rows, cols, &bytes)
            }
            Source::Hf(h, precision) => {
                h.expect_shape(name, &[rows, cols])?;
                let w = h.tensor_f32(name)?;
                let format = match precision {
                    Some(f) if !f.is_quantized() || cols.is_multiple_of(32) => *f,
                    Some(f) => {
                        log::warn!("{name}: {cols} columns are not a multiple of 32; kept as f16 instead of {f}");
                        WeightFormat::F16
                    }
                    None => WeightFormat::F32,
                };
                gpu.upload_weights_f32(name, format, rows, cols, &w)
            }
            Source::Synthetic { format, seed } => {
                let format = if format.is_quantized() && !cols.is_multiple_of(32) {
                    WeightFormat::F16
                } else {
                    *format
                };
                let seed = seed
                    ^ name
                        .bytes()
                        .fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(b as u64));
                let bytes = crate::quant::synthetic(format, rows * cols, seed)?;
                gpu.upload_weights(name, format, rows, cols, &bytes)
            }
        }
    }

    /// A 1-D f32 tensor of `n` values (norm weights, biases).
    pub fn vector(&self, gpu: &Gpu, name: &str, n: usize) -> Result<Tensor> {
        let v = match self {
            Source::Gguf(g) => {
                g.expect_shape(name, &[n])?;
                g.tensor_f32(name)?
            }
            Source::Hf(h, _) => {
                h.expect_shape(name, &[n])?;
                h.tensor_f32(name)?
            }
            Source::Synthetic { .. } => vec![1.0; n],
        };
        gpu.tensor_from(name, BufferClass::Parameters, &[n], &v)
    }

    /// An optional vector: `None` when the tensor is absent.
    pub fn vector_opt(&self, gpu: &Gpu, name: &str, n: usize) -> Result<Option<Tensor>> {
        if self.has(name) {
            self.vector(gpu, name, n).map(Some)
        } else {
            Ok(None)
        }
    }
}
