//! GGUF v2/v3 reader (little-endian), memory-mapped. The layout: magic "GGUF", version u32,
//! tensor count u64, metadata count u64, the metadata key/values, the tensor infos (name, n_dims
//! u32, dims u64 each with `dims[0]` the row length, ggml type u32, offset u64 relative to the data
//! section), padding to `general.alignment` (default 32), then the data section.
//!
//! Everything is checked against the file before it is used: every read is bounds-checked, counts
//! and lengths must fit in the bytes left before anything is allocated for them (a hostile file
//! claiming 2^60 entries fails at once), tensor shapes must have no zero dimension and must not
//! overflow, and tensor data must be aligned, inside the file and not overlapping. Metadata values live in `loader::value`.

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Once;

pub use super::upload::weight_format;
use super::upload::{conversion_summary, convert_rows, is_native};
use super::value::{Array, Reader};
use super::{bf16_bytes_to_f32, f16_bytes_to_f32, f32_bytes_to_f32, map_file, Backing, Value};
use crate::error::{Error, Result};
use crate::quant::{self, kquants, WeightFormat};

/// Alignment of the data section and of every tensor when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml's GGML_MAX_DIMS.
const MAX_DIMS: u32 = 4;
/// Smallest possible tensor info (empty name, no dims): name length, n_dims, type, offset.
const MIN_TENSOR_INFO: u64 = 8 + 4 + 4 + 8;
/// Smallest possible metadata entry: key length, value type, a one-byte value.
const MIN_KV: u64 = 8 + 4 + 1;

/// A ggml tensor type this reader knows the block layout of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct GgmlType(u32);

/// (id, name, weights per block, bytes per block), as ggml's type traits define them.
const TYPES: &[(u32, &str, usize, usize)] = &[
    (0, "F32", 1, 4),
    (1, "F16", 1, 2),
    (2, "Q4_0", 32, 18),
    (3, "Q4_1", 32, 20),
    (6, "Q5_0", 32, 22),
    (7, "Q5_1", 32, 24),
    (8, "Q8_0", 32, 34),
    (9, "Q8_1", 32, 36),
    (10, "Q2_K", 256, 84),
    (11, "Q3_K", 256, 110),
    (12, "Q4_K", 256, 144),
    (13, "Q5_K", 256, 176),
    (14, "Q6_K", 256, 210),
    (15, "Q8_K", 256, 292),
    (16, "IQ2_XXS", 256, 66),
    (17, "IQ2_XS", 256, 74),
    (18, "IQ3_XXS", 256, 98),
    (19, "IQ1_S", 256, 50),
    (20, "IQ4_NL", 32, 18),
    (21, "IQ3_S", 256, 110),
    (22, "IQ2_S", 256, 82),
    (23, "IQ4_XS", 256, 136),
    (24, "I8", 1, 1),
    (25, "I16", 1, 2),
    (26, "I32", 1, 4),
    (27, "I64", 1, 8),
    (28, "F64", 1, 8),
    (29, "IQ1_M", 256, 56),
    (30, "BF16", 1, 2),
    (34, "TQ1_0", 256, 54),
    (35, "TQ2_0", 256, 66),
    (39, "MXFP4", 32, 17),
];

impl GgmlType {
    pub const F32: GgmlType = GgmlType(0);
    pub const F16: GgmlType = GgmlType(1);
    pub const Q4_0: GgmlType = GgmlType(2);
    pub const Q4_1: GgmlType = GgmlType(3);
    pub const Q5_0: GgmlType = GgmlType(6);
    pub const Q5_1: GgmlType = GgmlType(7);
    pub const Q8_0: GgmlType = GgmlType(8);
    pub const Q2_K: GgmlType = GgmlType(10);
    pub const Q3_K: GgmlType = GgmlType(11);
    pub const Q4_K: GgmlType = GgmlType(12);
    pub const Q5_K: GgmlType = GgmlType(13);
    pub const Q6_K: GgmlType = GgmlType(14);
    pub const Q8_K: GgmlType = GgmlType(15);
    pub const IQ2_XXS: GgmlType = GgmlType(16);
    pub const IQ2_XS: GgmlType = GgmlType(17);
    pub const IQ3_XXS: GgmlType = GgmlType(18);
    pub const IQ1_S: GgmlType = GgmlType(19);
    pub const IQ4_NL: GgmlType = GgmlType(20);
    pub const IQ3_S: GgmlType = GgmlType(21);
    pub const IQ2_S: GgmlType = GgmlType(22);
    pub const IQ4_XS: GgmlType = GgmlType(23);
    pub const BF16: GgmlType = GgmlType(30);

    /// Every type this reader knows the layout of, in id order.
    pub fn all() -> impl Iterator<Item = GgmlType> {
        TYPES.iter().map(|t| GgmlType(t.0))
    }

    /// The type with ggml id `id`, if this reader knows its layout.
    pub fn from_id(id: u32) -> Option<GgmlType> {
        TYPES.iter().any(|t| t.0 == id).then_some(GgmlType(id))
    }
    pub fn id(self) -> u32 {
        self.0
    }
    fn traits(self) -> (&'static str, usize, usize) {
        // Values are only made by `from_id` and the constants, so the lookup always succeeds.
        TYPES
            .iter()
            .find(|t| t.0 == self.0)
            .map_or(("?", 1, 1), |t| (t.1, t.2, t.3))
    }
    pub fn name(self) -> &'static str {
        self.traits().0
    }
    /// Weights per block (1 for plain numbers).
    pub fn block_len(self) -> usize {
        self.traits().1
    }
    pub fn block_bytes(self) -> usize {
        self.traits().2
    }

    /// Byte offsets of the f16 scales (d, and dmin or m where the format has one) within each
    /// block of this type; empty for the plain types and for those wgllm does not decode.
    pub fn scale_offsets(self) -> &'static [usize] {
        match self {
            GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => &[0],
            GgmlType::IQ4_NL | GgmlType::IQ4_XS => &[0],
            GgmlType::IQ2_XXS | GgmlType::IQ2_XS | GgmlType::IQ2_S => &[0],
            GgmlType::IQ3_XXS | GgmlType::IQ3_S => &[0],
            GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q4_K | GgmlType::Q5_K => &[0, 2],
            GgmlType::Q2_K => &[80, 82],
            GgmlType::Q3_K => &[108],
            GgmlType::Q6_K => &[208],
            _ => &[],
        }
    }

    /// The CPU decoder of this type's data to f32 (`n` weights, a multiple of the block length),
    /// bit for bit as gguf-py's `gguf.quants.dequantize`; None for the types wgllm cannot decode
    /// (IQ1_S and IQ1_M, the ternary and FP4 formats, Q8_1 and Q8_K, which ggml uses only for
    /// activations, and the integer types).
    pub fn decoder(self) -> Option<Decoder> {
        /// `n` plain floats of `width` bytes.
        fn floats(b: &[u8], n: usize, width: usize, f: fn(&[u8]) -> Vec<f32>) -> Result<Vec<f32>> {
            match n.checked_mul(width) {
                Some(need) if need <= b.len() => Ok(f(&b[..need])),
                _ => Err(Error::invalid(
                    "decode",
                    format!("{} bytes given for {n} values of {width} bytes", b.len()),
                )),
            }
        }
        Some(match self {
            GgmlType::F32 => |b, n| floats(b, n, 4, f32_bytes_to_f32),
            GgmlType::F16 => |b, n| floats(b, n, 2, f16_bytes_to_f32),
            GgmlType::BF16 => |b, n| floats(b, n, 2, bf16_bytes_to_f32),
            GgmlType::Q4_0 => |b, n| quant::dequantize(WeightFormat::Q4_0, b, n),
            GgmlType::Q4_1 => |b, n| quant::dequantize(WeightFormat::Q4_1, b, n),
            GgmlType::Q8_0 => |b, n| quant::dequantize(WeightFormat::Q8_0, b, n),
            GgmlType::Q5_0 => kquants::dequantize_q5_0,
            GgmlType::Q5_1 => kquants::dequantize_q5_1,
            GgmlType::Q2_K => kquants::dequantize_q2_k,
            GgmlType::Q3_K => kquants::dequantize_q3_k,
            GgmlType::Q4_K => kquants::dequantize_q4_k,
            GgmlType::Q5_K => kquants::dequantize_q5_k,
            GgmlType::Q6_K => kquants::dequantize_q6_k,
            GgmlType::IQ4_NL => kquants::dequantize_iq4_nl,
            GgmlType::IQ4_XS => kquants::dequantize_iq4_xs,
            GgmlType::IQ2_XXS => kquants::dequantize_iq2_xxs,
            GgmlType::IQ2_XS => kquants::dequantize_iq2_xs,
            GgmlType::IQ2_S => kquants::dequantize_iq2_s,
            GgmlType::IQ3_XXS => kquants::dequantize_iq3_xxs,
            GgmlType::IQ3_S => kquants::dequantize_iq3_s,
            _ => return None,
        })
    }
}

/// A CPU decoder of one ggml type: (bytes, number of weights) to f32.
pub type Decoder = fn(&[u8], usize) -> Result<Vec<f32>>;

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.name(), self.0)
    }
}

/// Where a tensor is and what it holds.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// GGUF order: `shape[0]` is the row length (fastest-varying).
    pub shape: Vec<usize>,
    pub ggml_type: GgmlType,
    pub n_elements: usize,
    /// Bytes of data.
    pub size: usize,
    /// Absolute byte offset of the data in the file.
    pub offset: usize,
}

/// An open GGUF file.
pub struct Gguf {
    file: String,
    data: Backing,
    version: u32,
    alignment: usize,
    metadata: Vec<(String, Value)>,
    keys: HashMap<String, usize>,
    tensors: Vec<TensorInfo>,
    by_name: HashMap<String, usize>,
    /// The warning about tensors requantised on load, given once per opened file.
    conversion_warning: Once,
}

impl Gguf {
    /// Memory-maps and validates the file at `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<Gguf> {
        let path = path.as_ref();
        Gguf::parse(path.display().to_string(), map_file(path)?)
    }

    /// Validates an in-memory GGUF image; `name` stands for the file in errors.
    pub fn from_bytes(name: impl Into<String>, bytes: Vec<u8>) -> Result<Gguf> {
        Gguf::parse(name.into(), Backing::Owned(bytes))
    }

    fn parse(file: String, data: Backing) -> Result<Gguf> {
        let buf: &[u8] = &data;
        let bad = |reason: String| Error::BadFile {
            file: file.clone(),
            reason,
        };
        let bad_tensor = |tensor: &str, reason: String| Error::BadTensor {
            file: file.clone(),
            tensor: tensor.into(),
            reason,
        };
        let mut r = Reader::new(&file, buf);
        let magic: [u8; 4] = r.fixed("the magic")?;
        if &magic != b"GGUF" {
            return Err(bad(format!("bad magic {magic:02x?}, expected \"GGUF\"")));
        }
        let version = r.u32("the version")?;
        if !(2..=3).contains(&version) {
            let hint = if version.swap_bytes() <= 3 {
                " (a big-endian file?)"
            } else {
                ""
            };
            return Err(bad(format!(
                "GGUF version {version} is not supported (2 and 3 are){hint}"
            )));
        }
        let n_tensors = r.u64("the tensor count")?;
        let n_kv = r.u64("the metadata count")?;
        let need = n_tensors
            .saturating_mul(MIN_TENSOR_INFO)
            .saturating_add(n_kv.saturating_mul(MIN_KV));
        r.check_fits(
            need,
            &format!("{n_tensors} tensor infos and {n_kv} metadata entries"),
        )?;

        let mut metadata = Vec::new();
        let mut keys = HashMap::new();
        for _ in 0..n_kv {
            let key = r.string("a metadata key")?;
            let what = format!("metadata '{key}'");
            let ty = r.u32(&what)?;
            let value = r.value(ty, &what, 0)?;
            if keys.insert(key.clone(), metadata.len()).is_some() {
                return Err(bad(format!("metadata key '{key}' appears twice")));
            }
            metadata.push((key, value));
        }
        let alignment = match keys.get("general.alignment").map(|&i| &metadata[i].1) {
            None => DEFAULT_ALIGNMENT,
            Some(v) => match v.as_u64() {
                Some(a) if a.is_power_of_two() && a <= 1 << 30 => a,
                _ => {
                    let v = v.describe();
                    return Err(bad(format!(
                        "general.alignment ({v}) is not a power of two"
                    )));
                }
            },
        };

        // (info, offset relative to the data section) per tensor.
        let mut raw = Vec::new();
        let mut by_name = HashMap::new();
        for _ in 0..n_tensors {
            let name = r.string("a tensor name")?;
            let what = format!("the info of tensor '{name}'");
            let n_dims = r.u32(&what)?;
            if n_dims > MAX_DIMS {
                return Err(bad_tensor(
                    &name,
                    format!("{n_dims} dimensions, at most {MAX_DIMS}"),
                ));
            }
            let mut dims = Vec::new();
            for _ in 0..n_dims {
                dims.push(r.u64(&what)?);
            }
            let id = r.u32(&what)?;
            let offset = r.u64(&what)?;
            let ggml_type = GgmlType::from_id(id).ok_or_else(|| Error::UnsupportedDtype {
                file: file.clone(),
                tensor: name.clone(),
                dtype: format!("unknown ggml type {id}"),
            })?;
            // A dimension of 0 holds no data, yet the other dimensions would still size work (the
            // planner walks a matrix's rows shard by shard: 2^62 rows of nothing take hours).
            // llama.cpp cannot read one either (its element-count check divides by each).
            if dims.contains(&0) {
                return Err(bad_tensor(
                    &name,
                    format!("shape {dims:?} has a dimension of 0"),
                ));
            }
            let overflow = || bad_tensor(&name, format!("shape {dims:?} overflows"));
            let n = dims
                .iter()
                .try_fold(1u64, |a, &d| {
                    a.checked_mul(d).filter(|p| *p <= i64::MAX as u64)
                })
                .ok_or_else(overflow)?;
            let row = dims.first().copied().unwrap_or(1);
            let (bl, bb) = (ggml_type.block_len() as u64, ggml_type.block_bytes() as u64);
            if !row.is_multiple_of(bl) {
                return Err(bad_tensor(
                    &name,
                    format!(
                        "rows of {row} are not a multiple of the {} block length {bl}",
                        ggml_type.name()
                    ),
                ));
            }
            let size = (n / bl).checked_mul(bb).ok_or_else(overflow)?;
            let shape = dims
                .iter()
                .map(|&d| usize::try_from(d))
                .collect::<std::result::Result<Vec<_>, _>>()
                .map_err(|_| overflow())?;
            let n_elements = usize::try_from(n).map_err(|_| overflow())?;
            if by_name.insert(name.clone(), raw.len()).is_some() {
                return Err(bad_tensor(&name, "the name appears twice".into()));
            }
            let info = TensorInfo {
                name,
                shape,
                ggml_type,
                n_elements,
                size: 0,
                offset: 0,
            };
            raw.push((info, offset, size));
        }

        let file_len = buf.len() as u64;
        let data_start = (r.pos() as u64).next_multiple_of(alignment);
        let mut tensors = Vec::with_capacity(raw.len());
        for (mut info, rel, size) in raw {
            if !rel.is_multiple_of(alignment) {
                return Err(bad_tensor(
                    &info.name,
                    format!("data offset {rel} is not a multiple of the alignment {alignment}"),
                ));
            }
            let start = data_start.saturating_add(rel);
            if start.checked_add(size).is_none_or(|end| end > file_len) {
                return Err(Error::Truncated {
                    file: file.clone(),
                    what: format!("the data of tensor '{}'", info.name),
                    offset: start,
                    need: size,
                    file_len,
                });
            }
            // Both fit in the file length, hence in usize.
            (info.offset, info.size) = (start as usize, size as usize);
            tensors.push(info);
        }
        let mut order: Vec<&TensorInfo> = tensors.iter().collect();
        order.sort_by_key(|t| (t.offset, t.size));
        for w in order.windows(2) {
            if w[0].offset + w[0].size > w[1].offset {
                return Err(bad_tensor(
                    &w[1].name,
                    format!("its data overlaps that of tensor '{}'", w[0].name),
                ));
            }
        }
        Ok(Gguf {
            version,
            alignment: alignment as usize,
            metadata,
            keys,
            tensors,
            by_name,
            file,
            data,
            conversion_warning: Once::new(),
        })
    }

    /// The file's path (or the name given to [`Gguf::from_bytes`]).
    pub fn file(&self) -> &str {
        &self.file
    }
    pub fn version(&self) -> u32 {
        self.version
    }
    pub fn alignment(&self) -> usize {
        self.alignment
    }

    /// The value of metadata `key`, if present.
    pub fn metadata(&self, key: &str) -> Option<&Value> {
        self.keys.get(key).map(|&i| &self.metadata[i].1)
    }
    /// All metadata in file order.
    pub fn metadata_entries(&self) -> impl Iterator<Item = (&str, &Value)> {
        self.metadata.iter().map(|(k, v)| (k.as_str(), v))
    }

    fn need(&self, key: &str) -> Result<&Value> {
        self.metadata(key).ok_or_else(|| Error::MissingKey {
            file: self.file.clone(),
            key: key.into(),
        })
    }
    fn typed<'a, T>(
        &'a self,
        key: &str,
        expected: &'static str,
        f: impl FnOnce(&'a Value) -> Option<T>,
    ) -> Result<T> {
        let v = self.need(key)?;
        f(v).ok_or_else(|| Error::KeyType {
            file: self.file.clone(),
            key: key.into(),
            expected,
            got: v.describe(),
        })
    }

    /// Any integer type, if the value fits in u32.
    pub fn get_u32(&self, key: &str) -> Result<u32> {
        self.typed(key, "an integer in u32 range", |v| {
            v.as_u64().and_then(|x| x.try_into().ok())
        })
    }
    /// Any non-negative integer.
    pub fn get_u64(&self, key: &str) -> Result<u64> {
        self.typed(key, "a non-negative integer", Value::as_u64)
    }
    /// f32, f64 or any integer.
    pub fn get_f32(&self, key: &str) -> Result<f32> {
        self.typed(key, "a number", |v| v.as_f64().map(|x| x as f32))
    }
    pub fn get_bool(&self, key: &str) -> Result<bool> {
        self.typed(key, "a bool", Value::as_bool)
    }
    pub fn get_str(&self, key: &str) -> Result<&str> {
        self.typed(key, "a string", Value::as_str)
    }
    pub fn get_str_array(&self, key: &str) -> Result<&[String]> {
        self.typed(key, "an array of strings", |v| match v {
            Value::Array(Array::String(s)) => Some(s.as_slice()),
            _ => None,
        })
    }
    /// An array of floats or integers, as f32.
    pub fn get_f32_array(&self, key: &str) -> Result<Vec<f32>> {
        self.typed(key, "an array of numbers", |v| {
            v.as_array().and_then(Array::to_f32s)
        })
    }
    /// An array of any integer type whose values all fit in i32.
    pub fn get_i32_array(&self, key: &str) -> Result<Vec<i32>> {
        self.typed(key, "an array of integers in i32 range", |v| {
            let ints = v.as_array()?.to_i64s()?;
            ints.into_iter().map(|x| i32::try_from(x).ok()).collect()
        })
    }
    /// `general.architecture`, e.g. "llama".
    pub fn architecture(&self) -> Result<&str> {
        self.get_str("general.architecture")
    }

    /// Tensor infos in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }
    pub fn tensor(&self, name: &str) -> Result<&TensorInfo> {
        self.by_name
            .get(name)
            .map(|&i| &self.tensors[i])
            .ok_or_else(|| Error::MissingTensor {
                file: self.file.clone(),
                tensor: name.into(),
            })
    }
    /// The tensor, after checking its shape (GGUF order) is `expected`.
    pub fn expect_shape(&self, name: &str, expected: &[usize]) -> Result<&TensorInfo> {
        let t = self.tensor(name)?;
        if t.shape != expected {
            return Err(Error::TensorShape {
                file: self.file.clone(),
                tensor: name.into(),
                expected: super::shape_string(expected),
                got: super::shape_string(&t.shape),
            });
        }
        Ok(t)
    }
    /// The raw bytes of a tensor, in its ggml type.
    pub fn tensor_bytes(&self, name: &str) -> Result<&[u8]> {
        let t = self.tensor(name)?;
        Ok(&self.data[t.offset..t.offset + t.size])
    }

    fn unsupported(&self, t: &TensorInfo) -> Error {
        Error::UnsupportedDtype {
            file: self.file.clone(),
            tensor: t.name.clone(),
            dtype: t.ggml_type.to_string(),
        }
    }

    /// A tensor as f32, decoded by its type's [`GgmlType::decoder`].
    pub fn tensor_f32(&self, name: &str) -> Result<Vec<f32>> {
        let t = self.tensor(name)?;
        let decode = t.ggml_type.decoder().ok_or_else(|| self.unsupported(t))?;
        let bytes = self.checked_bytes(t)?;
        decode(bytes, t.n_elements)
    }

    /// A tensor's bytes after checking that every f16 block scale in them is finite. gguf-py and
    /// ggml decode a NaN or infinite scale into NaN or infinite weights, which would turn a
    /// model's every output into NaN; llama.cpp's `--check-tensors` refuses such blocks, and so
    /// does wgllm, always (one f16 read per block, next to the upload's read of every byte).
    fn checked_bytes(&self, t: &TensorInfo) -> Result<&[u8]> {
        let bytes = &self.data[t.offset..t.offset + t.size];
        let (block_bytes, block_len) = (t.ggml_type.block_bytes(), t.ggml_type.block_len());
        for &at in t.ggml_type.scale_offsets() {
            let bad = bytes
                .chunks_exact(block_bytes)
                .enumerate()
                .find_map(|(k, b)| {
                    let v = half::f16::from_le_bytes([b[at], b[at + 1]]);
                    (!v.is_finite()).then_some((k, v))
                });
            if let Some((k, v)) = bad {
                return Err(Error::BadTensor {
                    file: self.file.clone(),
                    tensor: t.name.clone(),
                    reason: format!(
                        "block {k} (weights {}..{}) has a non-finite {} scale ({v}) at byte {at} of the block",
                        k * block_len,
                        (k + 1) * block_len,
                        t.ggml_type.name()
                    ),
                });
            }
        }
        Ok(bytes)
    }

    /// The warning naming the tensors of this file that are requantised on load (their types
    /// have no GPU kernel), or None when there are none.
    pub fn conversion_summary(&self) -> Option<String> {
        conversion_summary(&self.tensors)
    }

    /// A tensor in the format [`weight_format`] gives for its type: borrowed from the file when
    /// that is its own format, decoded and requantised row by row otherwise (BF16 to f32 bytes),
    /// with one warning per file naming every tensor so converted.
    pub fn tensor_weight(&self, name: &str) -> Result<(WeightFormat, Cow<'_, [u8]>)> {
        let t = self.tensor(name)?;
        let format = weight_format(t.ggml_type).ok_or_else(|| self.unsupported(t))?;
        let bytes = self.checked_bytes(t)?;
        if is_native(t.ggml_type) {
            return Ok((format, Cow::Borrowed(bytes)));
        }
        if t.ggml_type == GgmlType::BF16 {
            let f = bf16_bytes_to_f32(bytes);
            return Ok((format, Cow::Owned(bytemuck::cast_slice(&f).to_vec())));
        }
        self.conversion_warning.call_once(|| {
            if let Some(w) = self.conversion_summary() {
                log::warn!("{}: {w}", self.file);
            }
        });
        let row = t.shape.first().copied().unwrap_or(1);
        let out = convert_rows(t.ggml_type, bytes, row, format).map_err(|e| Error::BadTensor {
            file: self.file.clone(),
            tensor: t.name.clone(),
            reason: e.to_string(),
        })?;
        Ok((format, Cow::Owned(out)))
    }
}
