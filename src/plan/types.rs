//! Parameters and bytes per tensor type: of a GGUF file as it is (a K-quant file mixes four or
//! five types), or of a config at a precision ([`crate::model::params::typed_tensors`]). Each row
//! is a GGUF type and the format wgllm uploads it in ([`crate::loader::gguf::weight_format`], the
//! loader's mapping), with the tensors, parameters, bytes in the file and bytes on the device
//! (repacked, sharded to the binding limit, each buffer rounded up to whole words) of that type.

use serde::Serialize;

use crate::error::Result;
use crate::kernels::weights::WeightStorage;
use crate::loader::gguf::{GgmlType, Gguf};
use crate::model::config::ModelConfig;
use crate::model::params::{typed_tensors, Precision};
use crate::quant::WeightFormat;

/// The tensors of one GGUF type.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TypeRow {
    /// The GGUF type (`Q4_K`, `F32`, ...).
    pub ggml_type: String,
    /// What wgllm uploads it as.
    pub format: WeightFormat,
    pub tensors: u64,
    pub params: u64,
    /// Bytes of tensor data in the file.
    pub file_bytes: u64,
    /// Bytes on the device, as the ledger books them.
    pub uploaded_bytes: u64,
}

/// Rows in order of first appearance and their sum.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct TypeTable {
    pub rows: Vec<TypeRow>,
    pub total: TypeTotals,
}

/// The sum of a [`TypeTable`]'s rows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct TypeTotals {
    pub tensors: u64,
    pub params: u64,
    pub file_bytes: u64,
    pub uploaded_bytes: u64,
}

impl TypeTable {
    fn add(&mut self, ggml: GgmlType, format: WeightFormat, params: u64, file: u64, up: u64) {
        let i = match self
            .rows
            .iter()
            .position(|r| r.ggml_type == ggml.name() && r.format == format)
        {
            Some(i) => i,
            None => {
                self.rows.push(TypeRow {
                    ggml_type: ggml.name().to_string(),
                    format,
                    tensors: 0,
                    params: 0,
                    file_bytes: 0,
                    uploaded_bytes: 0,
                });
                self.rows.len() - 1
            }
        };
        let r = &mut self.rows[i];
        r.tensors += 1;
        r.params = r.params.saturating_add(params);
        r.file_bytes = r.file_bytes.saturating_add(file);
        r.uploaded_bytes = r.uploaded_bytes.saturating_add(up);
        let t = &mut self.total;
        t.tensors += 1;
        t.params = t.params.saturating_add(params);
        t.file_bytes = t.file_bytes.saturating_add(file);
        t.uploaded_bytes = t.uploaded_bytes.saturating_add(up);
    }

    /// The row of GGUF type `name` (its first, should a type be uploaded in two formats).
    pub fn get(&self, name: &str) -> Option<&TypeRow> {
        self.rows.iter().find(|r| r.ggml_type == name)
    }
}

/// Device bytes of a tensor of `rows` rows of `cols` values uploaded as `format`, and its largest
/// single upload: a matrix (more than one row) sharded as `storage` says, a vector in an f32
/// buffer rounded up to whole words.
pub(crate) fn upload_bytes(
    format: WeightFormat,
    rows: usize,
    cols: usize,
    storage: WeightStorage,
) -> Result<(u64, u64)> {
    let align4 = |b: u64| b.div_ceil(4).max(1) * 4;
    if rows <= 1 {
        let b = align4((cols as u64).saturating_mul(4));
        return Ok((b, b));
    }
    super::uploads::sharded_matrix_bytes(format, rows, cols, storage)
}

/// `(rows, cols)` of a GGUF tensor: its row length and every other dimension folded into rows.
pub(crate) fn gguf_rows_cols(shape: &[usize]) -> (usize, usize) {
    let cols = shape.first().copied().unwrap_or(1);
    let rows = shape.iter().skip(1).product::<usize>().max(1);
    (rows, cols)
}

/// The format wgllm uploads a GGUF type in (f32 where the loader has none).
pub(crate) fn gguf_upload_format(t: GgmlType) -> WeightFormat {
    crate::loader::gguf::weight_format(t).unwrap_or(WeightFormat::F32)
}

/// The file's tensors by type.
pub fn gguf_type_table(g: &Gguf, storage: WeightStorage) -> Result<TypeTable> {
    let mut table = TypeTable::default();
    for t in g.tensors() {
        let (rows, cols) = gguf_rows_cols(&t.shape);
        let format = gguf_upload_format(t.ggml_type);
        let up = upload_bytes(format, rows, cols, storage)?.0;
        table.add(t.ggml_type, format, t.n_elements as u64, t.size as u64, up);
    }
    Ok(table)
}

/// `cfg`'s tensors at `precision` by type, as a GGUF file of that precision would hold them and
/// wgllm would upload them.
pub fn config_type_table(
    cfg: &ModelConfig,
    precision: Precision,
    storage: WeightStorage,
) -> Result<TypeTable> {
    let mut table = TypeTable::default();
    for t in typed_tensors(cfg, precision) {
        let up = upload_bytes(t.format, t.rows, t.cols, storage)?.0;
        table.add(t.ggml_type, t.format, t.params(), t.file_bytes(), up);
    }
    Ok(table)
}

/// The table as text: one line per type and the total.
pub fn type_table_text(t: &TypeTable) -> String {
    use crate::gpu::ledger::group_digits;
    let mut s = format!(
        "  {:<8} {:<9} {:>7} {:>16} {:>16} {:>16}\n",
        "type", "uploaded", "tensors", "parameters", "file bytes", "uploaded bytes"
    );
    let line = |name: &str, fmt: &str, n: u64, p: u64, f: u64, u: u64| {
        format!(
            "  {name:<8} {fmt:<9} {n:>7} {:>16} {:>16} {:>16}\n",
            group_digits(p),
            group_digits(f),
            group_digits(u)
        )
    };
    for r in &t.rows {
        s += &line(
            &r.ggml_type,
            r.format.name(),
            r.tensors,
            r.params,
            r.file_bytes,
            r.uploaded_bytes,
        );
    }
    let tot = t.total;
    s += &line(
        "total",
        "",
        tot.tensors,
        tot.params,
        tot.file_bytes,
        tot.uploaded_bytes,
    );
    s
}
