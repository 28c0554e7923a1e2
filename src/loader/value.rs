//! GGUF metadata values and the bounds-checked little-endian reader the GGUF parser is built on.
//!
//! The reader never indexes past the end of the file and never allocates for a count before
//! checking that the elements could fit in the bytes left, so a hostile count fails fast.

use crate::error::{Error, Result};

/// Arrays may nest (the spec allows arrays of arrays); deeper than this is refused.
const MAX_DEPTH: u32 = 4;
/// Most elements reserved up front; beyond that a vector grows only with elements actually read.
const PREALLOC: usize = 1 << 16;

/// One metadata value. Variant order follows the GGUF value type numbers 0..=12.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(Array),
    U64(u64),
    I64(i64),
    F64(f64),
}

/// A metadata array, stored by element type so big arrays (vocabularies, scores) stay compact.
#[derive(Debug, Clone, PartialEq)]
pub enum Array {
    U8(Vec<u8>),
    I8(Vec<i8>),
    U16(Vec<u16>),
    I16(Vec<i16>),
    U32(Vec<u32>),
    I32(Vec<i32>),
    F32(Vec<f32>),
    Bool(Vec<bool>),
    String(Vec<String>),
    Array(Vec<Array>),
    U64(Vec<u64>),
    I64(Vec<i64>),
    F64(Vec<f64>),
}

/// GGUF value type names, indexed by type number.
const TYPE_NAMES: [&str; 13] = [
    "u8", "i8", "u16", "i16", "u32", "i32", "f32", "bool", "string", "array", "u64", "i64", "f64",
];

impl Value {
    /// The GGUF value type number.
    pub fn type_id(&self) -> u32 {
        match self {
            Value::U8(_) => 0,
            Value::I8(_) => 1,
            Value::U16(_) => 2,
            Value::I16(_) => 3,
            Value::U32(_) => 4,
            Value::I32(_) => 5,
            Value::F32(_) => 6,
            Value::Bool(_) => 7,
            Value::String(_) => 8,
            Value::Array(_) => 9,
            Value::U64(_) => 10,
            Value::I64(_) => 11,
            Value::F64(_) => 12,
        }
    }
    /// Any integer, if it fits in i64.
    pub fn as_i64(&self) -> Option<i64> {
        Some(match *self {
            Value::U8(x) => x.into(),
            Value::I8(x) => x.into(),
            Value::U16(x) => x.into(),
            Value::I16(x) => x.into(),
            Value::U32(x) => x.into(),
            Value::I32(x) => x.into(),
            Value::U64(x) => x.try_into().ok()?,
            Value::I64(x) => x,
            _ => return None,
        })
    }
    /// Any non-negative integer.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U64(x) => Some(x),
            _ => self.as_i64().and_then(|x| x.try_into().ok()),
        }
    }
    /// A float or an integer.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(x) => Some(x.into()),
            Value::F64(x) => Some(x),
            Value::U64(x) => Some(x as f64),
            _ => self.as_i64().map(|x| x as f64),
        }
    }
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_array(&self) -> Option<&Array> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
    /// A short description for error messages: the type, and the value unless it is long.
    pub fn describe(&self) -> String {
        let ty = TYPE_NAMES[self.type_id() as usize];
        match self {
            Value::Array(a) => {
                let elem = TYPE_NAMES[a.elem_type_id() as usize];
                format!("an array of {} {elem}", a.len())
            }
            Value::String(s) if s.len() > 40 => format!("a string of {} bytes", s.len()),
            Value::String(s) => format!("string {s:?}"),
            Value::Bool(b) => format!("bool {b}"),
            Value::F32(x) => format!("f32 {x}"),
            Value::F64(x) => format!("f64 {x}"),
            v => match (v.as_i64(), v.as_u64()) {
                (Some(x), _) => format!("{ty} {x}"),
                (_, Some(x)) => format!("{ty} {x}"),
                _ => ty.to_string(),
            },
        }
    }
}

impl Array {
    /// The GGUF value type number of the elements.
    pub fn elem_type_id(&self) -> u32 {
        match self {
            Array::U8(_) => 0,
            Array::I8(_) => 1,
            Array::U16(_) => 2,
            Array::I16(_) => 3,
            Array::U32(_) => 4,
            Array::I32(_) => 5,
            Array::F32(_) => 6,
            Array::Bool(_) => 7,
            Array::String(_) => 8,
            Array::Array(_) => 9,
            Array::U64(_) => 10,
            Array::I64(_) => 11,
            Array::F64(_) => 12,
        }
    }
    pub fn len(&self) -> usize {
        match self {
            Array::U8(v) => v.len(),
            Array::I8(v) => v.len(),
            Array::U16(v) => v.len(),
            Array::I16(v) => v.len(),
            Array::U32(v) => v.len(),
            Array::I32(v) => v.len(),
            Array::F32(v) => v.len(),
            Array::Bool(v) => v.len(),
            Array::String(v) => v.len(),
            Array::Array(v) => v.len(),
            Array::U64(v) => v.len(),
            Array::I64(v) => v.len(),
            Array::F64(v) => v.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Integer elements as i64 (None for non-integer arrays or u64 values past i64).
    pub fn to_i64s(&self) -> Option<Vec<i64>> {
        fn conv<T: Copy + Into<i64>>(v: &[T]) -> Option<Vec<i64>> {
            Some(v.iter().map(|&x| x.into()).collect())
        }
        match self {
            Array::U8(v) => conv(v),
            Array::I8(v) => conv(v),
            Array::U16(v) => conv(v),
            Array::I16(v) => conv(v),
            Array::U32(v) => conv(v),
            Array::I32(v) => conv(v),
            Array::I64(v) => Some(v.clone()),
            Array::U64(v) => v.iter().map(|&x| i64::try_from(x).ok()).collect(),
            _ => None,
        }
    }
    /// Float or integer elements as f32.
    pub fn to_f32s(&self) -> Option<Vec<f32>> {
        match self {
            Array::F32(v) => Some(v.clone()),
            Array::F64(v) => Some(v.iter().map(|&x| x as f32).collect()),
            Array::U64(v) => Some(v.iter().map(|&x| x as f32).collect()),
            a => Some(a.to_i64s()?.into_iter().map(|x| x as f32).collect()),
        }
    }
}

/// Smallest encoding of one value of GGUF type `ty` (None: unknown type).
fn min_size(ty: u32) -> Option<u64> {
    Some(match ty {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        10..=12 => 8,
        8 => 8,  // string length
        9 => 12, // element type and count
        _ => return None,
    })
}

/// A cursor over a file's bytes; every read is bounds-checked and names what it was reading.
pub(crate) struct Reader<'a> {
    file: &'a str,
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(file: &'a str, buf: &'a [u8]) -> Self {
        Reader { file, buf, pos: 0 }
    }
    pub(crate) fn pos(&self) -> usize {
        self.pos
    }
    fn remaining(&self) -> u64 {
        (self.buf.len() - self.pos) as u64
    }
    fn bad(&self, reason: String) -> Error {
        Error::BadFile {
            file: self.file.into(),
            reason,
        }
    }
    /// Fails unless `need` more bytes exist.
    pub(crate) fn check_fits(&self, need: u64, what: &str) -> Result<()> {
        if need > self.remaining() {
            return Err(Error::Truncated {
                file: self.file.into(),
                what: what.into(),
                offset: self.pos as u64,
                need,
                file_len: self.buf.len() as u64,
            });
        }
        Ok(())
    }
    fn take(&mut self, n: u64, what: &str) -> Result<&'a [u8]> {
        self.check_fits(n, what)?;
        let s = &self.buf[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }
    pub(crate) fn fixed<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N as u64, what)?);
        Ok(a)
    }
    pub(crate) fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.fixed(what)?))
    }
    pub(crate) fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.fixed(what)?))
    }
    pub(crate) fn string(&mut self, what: &str) -> Result<String> {
        let len = self.u64(what)?;
        let at = self.pos;
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec())
            .map_err(|_| self.bad(format!("{what}: the string at offset {at} is not UTF-8")))
    }
    /// An element count whose elements (at least `each` bytes apiece) fit in the rest of the file.
    fn count(&mut self, each: u64, what: &str) -> Result<usize> {
        let n = self.u64(what)?;
        self.check_fits(
            n.saturating_mul(each),
            &format!("{what}: {n} array elements"),
        )?;
        Ok(n as usize) // at most the bytes left, so it fits
    }

    /// A value of GGUF type `ty`.
    pub(crate) fn value(&mut self, ty: u32, what: &str, depth: u32) -> Result<Value> {
        Ok(match ty {
            0 => Value::U8(self.fixed::<1>(what)?[0]),
            1 => Value::I8(self.fixed::<1>(what)?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.fixed(what)?)),
            3 => Value::I16(i16::from_le_bytes(self.fixed(what)?)),
            4 => Value::U32(self.u32(what)?),
            5 => Value::I32(i32::from_le_bytes(self.fixed(what)?)),
            6 => Value::F32(f32::from_le_bytes(self.fixed(what)?)),
            7 => Value::Bool(self.fixed::<1>(what)?[0] != 0),
            8 => Value::String(self.string(what)?),
            9 => Value::Array(self.array(what, depth + 1)?),
            10 => Value::U64(self.u64(what)?),
            11 => Value::I64(i64::from_le_bytes(self.fixed(what)?)),
            12 => Value::F64(f64::from_le_bytes(self.fixed(what)?)),
            _ => return Err(self.bad(format!("{what}: unknown value type {ty}"))),
        })
    }

    fn array(&mut self, what: &str, depth: u32) -> Result<Array> {
        if depth > MAX_DEPTH {
            return Err(self.bad(format!("{what}: arrays nested deeper than {MAX_DEPTH}")));
        }
        let ty = self.u32(what)?;
        let each = min_size(ty)
            .ok_or_else(|| self.bad(format!("{what}: unknown array element type {ty}")))?;
        let n = self.count(each, what)?;
        macro_rules! nums {
            ($var:ident, $t:ty) => {{
                const W: usize = std::mem::size_of::<$t>();
                let bytes = self.take((n * W) as u64, what)?;
                Array::$var(
                    bytes
                        .chunks_exact(W)
                        .map(|c| {
                            let mut a = [0u8; W];
                            a.copy_from_slice(c);
                            <$t>::from_le_bytes(a)
                        })
                        .collect(),
                )
            }};
        }
        Ok(match ty {
            0 => Array::U8(self.take(n as u64, what)?.to_vec()),
            1 => nums!(I8, i8),
            2 => nums!(U16, u16),
            3 => nums!(I16, i16),
            4 => nums!(U32, u32),
            5 => nums!(I32, i32),
            6 => nums!(F32, f32),
            7 => Array::Bool(self.take(n as u64, what)?.iter().map(|&b| b != 0).collect()),
            8 => {
                let mut v = Vec::with_capacity(n.min(PREALLOC));
                for _ in 0..n {
                    v.push(self.string(what)?);
                }
                Array::String(v)
            }
            9 => {
                let mut v = Vec::with_capacity(n.min(PREALLOC));
                for _ in 0..n {
                    v.push(self.array(what, depth + 1)?);
                }
                Array::Array(v)
            }
            10 => nums!(U64, u64),
            11 => nums!(I64, i64),
            _ => nums!(F64, f64),
        })
    }
}
