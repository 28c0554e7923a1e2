//! Where a model's tensors come from: a GGUF file or a Hugging Face safetensors directory. Both
//! answer the same questions (is this tensor there, upload it as a weight matrix or as an f32
//! vector) so that the architectures are written once.

use std::borrow::Cow;

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
    /// bounded chunks and uploaded, so host memory stays small. With `mix` (a K-quant mix), each
    /// matrix is in the format its type in a file of that mix is uploaded in, not `format`.
    Synthetic {
        format: WeightFormat,
        seed: u64,
        mix: Option<crate::model::params::NamedTypes>,
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

    /// The GGUF-layout bytes of a `rows x cols` matrix (`rows` outputs) and their format: a GGUF
    /// tensor as stored (borrowed from the map when its type runs natively), a safetensors tensor
    /// quantised to the requested precision, or synthetic bytes. GGUF stores the matrix as
    /// `[cols, rows]` (row length first), safetensors as `[rows, cols]`; both are checked against
    /// the config before any byte is read.
    pub fn matrix_bytes(
        &self,
        name: &str,
        rows: usize,
        cols: usize,
    ) -> Result<(WeightFormat, Cow<'_, [u8]>)> {
        // Block formats need whole blocks per row; other shapes keep f16 (or the file's own type).
        let fits = |f: WeightFormat| !f.is_quantized() || cols.is_multiple_of(crate::quant::QK);
        match self {
            Source::Gguf(g) => {
                g.expect_shape(name, &[cols, rows])?;
                let (format, bytes) = g.tensor_weight(name)?;
                if !fits(format) {
                    return Err(self.shape_err(
                        name,
                        "a row length that is a multiple of 32".into(),
                        format!("{cols}"),
                    ));
                }
                Ok((format, bytes))
            }
            Source::Hf(h, precision) => {
                h.expect_shape(name, &[rows, cols])?;
                let w = h.tensor_f32(name)?;
                let format = match precision {
                    Some(f) if fits(*f) => *f,
                    Some(f) => {
                        log::warn!("{name}: {cols} columns are not a multiple of 32; kept as f16 instead of {f}");
                        WeightFormat::F16
                    }
                    None => WeightFormat::F32,
                };
                crate::quant::repack::check_shape(format, rows, cols)?;
                let mut bytes = Vec::with_capacity(format.bytes_for(w.len()));
                for row in w.chunks(cols) {
                    bytes.extend(crate::quant::quantize(format, row)?);
                }
                Ok((format, Cow::Owned(bytes)))
            }
            Source::Synthetic { format, seed, mix } => {
                let format = match mix {
                    Some(m) => m.format(name, rows, cols),
                    None if fits(*format) => *format,
                    None => WeightFormat::F16,
                };
                let seed = seed
                    ^ name
                        .bytes()
                        .fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(b as u64));
                Ok((
                    format,
                    Cow::Owned(crate::quant::synthetic(format, rows * cols, seed)?),
                ))
            }
        }
    }

    /// A `rows x cols` matrix uploaded to the GPU (see [`Source::matrix_bytes`]).
    pub fn matrix(&self, gpu: &Gpu, name: &str, rows: usize, cols: usize) -> Result<WeightMatrix> {
        let (format, bytes) = self.matrix_bytes(name, rows, cols)?;
        gpu.upload_weights(name, format, rows, cols, &bytes)
    }

    /// The f32 values of a 1-D tensor of `n` values (norm weights, biases; ones when synthetic).
    pub fn vector_f32(&self, name: &str, n: usize) -> Result<Vec<f32>> {
        match self {
            Source::Gguf(g) => {
                g.expect_shape(name, &[n])?;
                g.tensor_f32(name)
            }
            Source::Hf(h, _) => {
                h.expect_shape(name, &[n])?;
                h.tensor_f32(name)
            }
            Source::Synthetic { .. } => Ok(vec![1.0; n]),
        }
    }

    /// [`Source::vector_f32`], with 1 added to every value when `add_one` (the norm weights of
    /// Hugging Face's Gemma, which computes `x * (1 + w)`).
    pub fn vector_f32_plus(&self, name: &str, n: usize, add_one: bool) -> Result<Vec<f32>> {
        let mut v = self.vector_f32(name, n)?;
        // Synthetic norm weights are ones already, whatever the convention.
        if add_one && !matches!(self, Source::Synthetic { .. }) {
            v.iter_mut().for_each(|x| *x += 1.0);
        }
        Ok(v)
    }

    /// [`Source::vector_f32_plus`] on the GPU.
    pub fn vector_plus(&self, gpu: &Gpu, name: &str, n: usize, add_one: bool) -> Result<Tensor> {
        let v = self.vector_f32_plus(name, n, add_one)?;
        gpu.tensor_from(name, BufferClass::Parameters, &[n], &v)
    }

    /// A 1-D f32 tensor of `n` values on the GPU.
    pub fn vector(&self, gpu: &Gpu, name: &str, n: usize) -> Result<Tensor> {
        let v = self.vector_f32(name, n)?;
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
