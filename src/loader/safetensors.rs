//! Hugging Face model directories: `config.json` (kept as JSON for the caller) plus either
//! `model.safetensors` or a sharded `model.safetensors.index.json` with the shards it names. Shards
//! are memory-mapped and their headers parsed with the `safetensors` crate; F32, F16 and BF16
//! tensors convert to f32. Every failure names the file and, where there is one, the tensor.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use ::safetensors::tensor::{Metadata, SafeTensors};
pub use ::safetensors::Dtype;
use ::safetensors::SafeTensorError;

use super::{bf16_bytes_to_f32, f16_bytes_to_f32, f32_bytes_to_f32, map_file, Backing};
use crate::error::{Error, Result};

struct Shard {
    file: String,
    data: Backing,
}

/// Where one tensor lives.
struct Entry {
    dtype: Dtype,
    shape: Vec<usize>,
    shard: usize,
    start: usize,
    end: usize,
}

/// An open Hugging Face model directory.
pub struct HfModel {
    dir: PathBuf,
    /// The file tensors are looked up in: `model.safetensors` or the index.
    source: String,
    config: serde_json::Value,
    shards: Vec<Shard>,
    tensors: HashMap<String, Entry>,
}

fn read_json(path: &Path) -> Result<serde_json::Value> {
    let bytes = std::fs::read(path).map_err(|source| Error::Io {
        path: path.display().to_string(),
        source,
    })?;
    parse_json(path, &bytes)
}

fn parse_json(path: &Path, bytes: &[u8]) -> Result<serde_json::Value> {
    serde_json::from_slice(bytes).map_err(|e| Error::BadFile {
        file: path.display().to_string(),
        reason: format!("invalid JSON: {e}"),
    })
}

impl HfModel {
    /// Opens `dir`: reads `config.json` and maps every safetensors shard.
    pub fn open(dir: impl AsRef<Path>) -> Result<HfModel> {
        let dir = dir.as_ref();
        let config = read_json(&dir.join("config.json"))?;
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        let source = if single.is_file() { &single } else { &index };
        let mut model = HfModel {
            dir: dir.to_path_buf(),
            source: source.display().to_string(),
            config,
            shards: Vec::new(),
            tensors: HashMap::new(),
        };
        if single.is_file() {
            model.add_shard(&single)?;
        } else if index.is_file() {
            model.add_index(&index)?;
        } else {
            return Err(Error::BadFile {
                file: dir.display().to_string(),
                reason: "the directory has neither model.safetensors nor \
                         model.safetensors.index.json"
                    .into(),
            });
        }
        Ok(model)
    }

    /// A directory held in memory: the bytes of its `config.json` and of one `model.safetensors`;
    /// `dir` stands for the directory in errors. The same checks as [`HfModel::open`] (the fuzz
    /// targets and their regression test read files this way).
    pub fn from_bytes(
        dir: impl AsRef<Path>,
        config_json: &[u8],
        safetensors: Vec<u8>,
    ) -> Result<HfModel> {
        let dir = dir.as_ref();
        let single = dir.join("model.safetensors");
        let mut model = HfModel {
            dir: dir.to_path_buf(),
            source: single.display().to_string(),
            config: parse_json(&dir.join("config.json"), config_json)?,
            shards: Vec::new(),
            tensors: HashMap::new(),
        };
        model.add_shard_data(single.display().to_string(), Backing::Owned(safetensors))?;
        Ok(model)
    }

    fn add_index(&mut self, index: &Path) -> Result<()> {
        let file = index.display().to_string();
        let bad = |reason: String| Error::BadFile {
            file: file.clone(),
            reason,
        };
        let json = read_json(index)?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| bad("no \"weight_map\" object".into()))?;
        // Shard file name -> the tensors the index puts there (sorted, for stable errors).
        let mut wanted: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for (tensor, shard) in map {
            let shard = shard
                .as_str()
                .ok_or_else(|| bad(format!("the shard of tensor '{tensor}' is not a string")))?;
            // Plain file names only: an index must not reach outside the model directory.
            if shard.is_empty() || Path::new(shard).file_name() != Some(shard.as_ref()) {
                return Err(bad(format!(
                    "shard name '{shard}' is not a plain file name"
                )));
            }
            wanted.entry(shard).or_default().push(tensor);
        }
        for (shard, mut names) in wanted {
            names.sort_unstable();
            let path = self.dir.join(shard);
            if !path.is_file() {
                return Err(Error::MissingShard {
                    file: file.clone(),
                    shard: path.display().to_string(),
                    tensor: names.first().copied().unwrap_or_default().into(),
                });
            }
            let at = self.add_shard(&path)?;
            for name in names {
                if self.tensors.get(name).is_none_or(|e| e.shard != at) {
                    return Err(Error::MissingTensor {
                        file: path.display().to_string(),
                        tensor: name.into(),
                    });
                }
            }
        }
        Ok(())
    }

    fn add_shard(&mut self, path: &Path) -> Result<usize> {
        self.add_shard_data(path.display().to_string(), map_file(path)?)
    }

    fn add_shard_data(&mut self, file: String, data: Backing) -> Result<usize> {
        let (n, meta) = parse_header(&file, &data)?;
        let at = self.shards.len();
        for (name, info) in meta.tensors() {
            if let Some(e) = self.tensors.get(&name) {
                return Err(Error::BadTensor {
                    file,
                    tensor: name,
                    reason: format!("also in shard '{}'", self.shards[e.shard].file),
                });
            }
            let (s, e) = info.data_offsets;
            // The crate checked the offsets tile the data section exactly.
            let entry = Entry {
                dtype: info.dtype,
                shape: info.shape.clone(),
                shard: at,
                start: 8 + n + s,
                end: 8 + n + e,
            };
            self.tensors.insert(name, entry);
        }
        self.shards.push(Shard { file, data });
        Ok(at)
    }

    /// The directory's `config.json`.
    pub fn config(&self) -> &serde_json::Value {
        &self.config
    }
    pub fn dir(&self) -> &Path {
        &self.dir
    }
    /// Tensor names, sorted.
    pub fn tensor_names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.tensors.keys().map(String::as_str).collect();
        v.sort_unstable();
        v
    }
    fn entry(&self, name: &str) -> Result<&Entry> {
        self.tensors.get(name).ok_or_else(|| Error::MissingTensor {
            file: self.source.clone(),
            tensor: name.into(),
        })
    }
    /// Shape, row-major (the last dimension is fastest).
    pub fn tensor_shape(&self, name: &str) -> Result<&[usize]> {
        Ok(&self.entry(name)?.shape)
    }
    pub fn tensor_dtype(&self, name: &str) -> Result<Dtype> {
        Ok(self.entry(name)?.dtype)
    }
    /// Fails with [`Error::TensorShape`] unless the tensor has shape `expected`.
    pub fn expect_shape(&self, name: &str, expected: &[usize]) -> Result<()> {
        let e = self.entry(name)?;
        if e.shape != expected {
            return Err(Error::TensorShape {
                file: self.shards[e.shard].file.clone(),
                tensor: name.into(),
                expected: super::shape_string(expected),
                got: super::shape_string(&e.shape),
            });
        }
        Ok(())
    }
    /// The raw little-endian bytes of a tensor.
    pub fn tensor_bytes(&self, name: &str) -> Result<&[u8]> {
        let e = self.entry(name)?;
        Ok(&self.shards[e.shard].data[e.start..e.end])
    }
    /// An F32, F16 or BF16 tensor as f32.
    pub fn tensor_f32(&self, name: &str) -> Result<Vec<f32>> {
        let e = self.entry(name)?;
        let b = &self.shards[e.shard].data[e.start..e.end];
        match e.dtype {
            Dtype::F32 => Ok(f32_bytes_to_f32(b)),
            Dtype::F16 => Ok(f16_bytes_to_f32(b)),
            Dtype::BF16 => Ok(bf16_bytes_to_f32(b)),
            d => Err(Error::UnsupportedDtype {
                file: self.shards[e.shard].file.clone(),
                tensor: name.into(),
                dtype: format!("{d:?}"),
            }),
        }
    }
}

/// Checks the header length against the file, then lets the crate parse and validate the header.
/// Returns the header length and the tensor table.
fn parse_header(file: &str, buf: &[u8]) -> Result<(usize, Metadata)> {
    let file_len = buf.len() as u64;
    let truncated = |what: String, offset: u64, need: u64| Error::Truncated {
        file: file.into(),
        what,
        offset,
        need,
        file_len,
    };
    let Some(len_bytes) = buf.first_chunk::<8>() else {
        return Err(truncated("the header length".into(), 0, 8));
    };
    let n = u64::from_le_bytes(*len_bytes);
    if n > file_len - 8 {
        return Err(truncated("the JSON header".into(), 8, n));
    }
    SafeTensors::read_metadata(buf).map_err(|e| diagnose(file, buf, n as usize, e))
}

/// Turns the crate's error into one naming the tensor at fault where possible.
fn diagnose(file: &str, buf: &[u8], n: usize, err: SafeTensorError) -> Error {
    let bad = |reason: String| Error::BadFile {
        file: file.into(),
        reason,
    };
    let meta: Metadata = match serde_json::from_slice(&buf[8..8 + n]) {
        Ok(m) => m,
        Err(e) => return bad(format!("invalid safetensors header: {e}")),
    };
    let data_len = buf.len() - 8 - n;
    let mut infos: Vec<_> = meta.tensors().into_iter().collect();
    infos.sort_by_key(|(_, i)| i.data_offsets);
    for (name, info) in infos {
        let (s, e) = info.data_offsets;
        let bad_tensor = |reason: String| Error::BadTensor {
            file: file.into(),
            tensor: name.clone(),
            reason,
        };
        if s > e {
            return bad_tensor(format!("data offsets [{s}, {e}) are reversed"));
        }
        if e > data_len {
            return Error::Truncated {
                file: file.into(),
                what: format!("the data of tensor '{name}'"),
                offset: (8 + n + s) as u64,
                need: (e - s) as u64,
                file_len: buf.len() as u64,
            };
        }
        let bytes = info
            .shape
            .iter()
            .try_fold(info.dtype.size(), |a, &d| a.checked_mul(d));
        if bytes != Some(e - s) {
            return bad_tensor(format!(
                "shape {:?} of {:?} does not match its {} data bytes",
                info.shape,
                info.dtype,
                e - s
            ));
        }
    }
    bad(format!("safetensors header rejected: {err}"))
}
