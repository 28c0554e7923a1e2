//! GGUF loader tests: a small valid file written by `write_gguf` round-trips its metadata and
//! tensors; every prefix of it and a table of hostile files fail with the specific typed error
//! (never a panic); and the real SmolLM2 file, when cached, opens with the expected layout.

use wgllm::loader::{weight_format, Array, GgmlType, Gguf, Value};
use wgllm::quant::{dequantize, kquants, quantize, WeightFormat};
use wgllm::Error;

/// One tensor for `write_gguf`; `offset` overrides the computed (aligned) data offset.
struct T {
    name: &'static str,
    dims: Vec<u64>,
    ty: u32,
    data: Vec<u8>,
    offset: Option<u64>,
}

fn t(name: &'static str, dims: &[u64], ty: u32, data: Vec<u8>) -> T {
    T {
        name,
        dims: dims.to_vec(),
        ty,
        data,
        offset: None,
    }
}

fn put_str(b: &mut Vec<u8>, s: &[u8]) {
    b.extend_from_slice(&(s.len() as u64).to_le_bytes());
    b.extend_from_slice(s);
}

fn put_array(b: &mut Vec<u8>, a: &Array) {
    b.extend_from_slice(&a.elem_type_id().to_le_bytes());
    b.extend_from_slice(&(a.len() as u64).to_le_bytes());
    macro_rules! each {
        ($v:expr) => {
            $v.iter()
                .for_each(|x| b.extend_from_slice(&x.to_le_bytes()))
        };
    }
    match a {
        Array::U8(v) => each!(v),
        Array::I8(v) => each!(v),
        Array::U16(v) => each!(v),
        Array::I16(v) => each!(v),
        Array::U32(v) => each!(v),
        Array::I32(v) => each!(v),
        Array::F32(v) => each!(v),
        Array::Bool(v) => v.iter().for_each(|x| b.push(*x as u8)),
        Array::String(v) => v.iter().for_each(|s| put_str(b, s.as_bytes())),
        Array::Array(v) => v.iter().for_each(|x| put_array(b, x)),
        Array::U64(v) => each!(v),
        Array::I64(v) => each!(v),
        Array::F64(v) => each!(v),
    }
}

fn put_value(b: &mut Vec<u8>, v: &Value) {
    b.extend_from_slice(&v.type_id().to_le_bytes());
    match v {
        Value::U8(x) => b.push(*x),
        Value::I8(x) => b.push(*x as u8),
        Value::U16(x) => b.extend_from_slice(&x.to_le_bytes()),
        Value::I16(x) => b.extend_from_slice(&x.to_le_bytes()),
        Value::U32(x) => b.extend_from_slice(&x.to_le_bytes()),
        Value::I32(x) => b.extend_from_slice(&x.to_le_bytes()),
        Value::F32(x) => b.extend_from_slice(&x.to_le_bytes()),
        Value::Bool(x) => b.push(*x as u8),
        Value::String(s) => put_str(b, s.as_bytes()),
        Value::Array(a) => put_array(b, a),
        Value::U64(x) => b.extend_from_slice(&x.to_le_bytes()),
        Value::I64(x) => b.extend_from_slice(&x.to_le_bytes()),
        Value::F64(x) => b.extend_from_slice(&x.to_le_bytes()),
    }
}

/// A GGUF image: header, metadata, tensor infos, padding, then each tensor's data at the next
/// aligned offset, with nothing after the last tensor.
fn write_gguf(version: u32, kvs: &[(&str, Value)], tensors: &[T]) -> Vec<u8> {
    let align = kvs
        .iter()
        .find(|(k, _)| *k == "general.alignment")
        .and_then(|(_, v)| v.as_u64())
        .filter(|a| a.is_power_of_two()) // broken alignments are for the parser to refuse
        .unwrap_or(32) as usize;
    let mut b = b"GGUF".to_vec();
    b.extend_from_slice(&version.to_le_bytes());
    b.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    b.extend_from_slice(&(kvs.len() as u64).to_le_bytes());
    for (k, v) in kvs {
        put_str(&mut b, k.as_bytes());
        put_value(&mut b, v);
    }
    let mut data = Vec::new();
    for t in tensors {
        data.resize(data.len().next_multiple_of(align), 0);
        put_str(&mut b, t.name.as_bytes());
        b.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
        t.dims
            .iter()
            .for_each(|d| b.extend_from_slice(&d.to_le_bytes()));
        b.extend_from_slice(&t.ty.to_le_bytes());
        b.extend_from_slice(&t.offset.unwrap_or(data.len() as u64).to_le_bytes());
        data.extend_from_slice(&t.data);
    }
    b.resize(b.len().next_multiple_of(align), 0);
    b.extend_from_slice(&data);
    b
}

fn kind(e: &Error) -> &'static str {
    match e {
        Error::Truncated { .. } => "Truncated",
        Error::BadFile { .. } => "BadFile",
        Error::BadTensor { .. } => "BadTensor",
        Error::UnsupportedDtype { .. } => "UnsupportedDtype",
        Error::MissingTensor { .. } => "MissingTensor",
        Error::MissingKey { .. } => "MissingKey",
        Error::KeyType { .. } => "KeyType",
        Error::TensorShape { .. } => "TensorShape",
        Error::Io { .. } => "Io",
        _ => "other",
    }
}

fn ramp(n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) * scale)
        .collect()
}

/// `blocks` blocks of ggml type `ty` of patterned bytes with finite f16 scales at the right
/// places (d = 0.0625, the second scale 0.25).
fn quant_blocks(ty: u32, blocks: usize, seed: u8) -> Vec<u8> {
    let t = GgmlType::from_id(ty).unwrap();
    let mut b: Vec<u8> = (0..t.block_bytes() * blocks)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect();
    for block in b.chunks_exact_mut(t.block_bytes()) {
        for (k, &at) in t.scale_offsets().iter().enumerate() {
            let v = if k == 0 { 0.0625 } else { 0.25 };
            block[at..at + 2].copy_from_slice(&half::f16::from_f32(v).to_le_bytes());
        }
    }
    b
}

fn valid_metadata() -> Vec<(&'static str, Value)> {
    vec![
        ("general.architecture", Value::String("llama".into())),
        ("llama.block_count", Value::U32(2)),
        ("u8", Value::U8(200)),
        ("i8", Value::I8(-3)),
        ("u16", Value::U16(60000)),
        ("i16", Value::I16(-300)),
        ("i32", Value::I32(-5)),
        ("f32", Value::F32(1e-5)),
        ("bool", Value::Bool(true)),
        ("u64", Value::U64(1 << 40)),
        ("i64", Value::I64(7)),
        ("f64", Value::F64(10000.0)),
        (
            "tokens",
            Value::Array(Array::String(vec!["<s>".into(), "é".into(), "".into()])),
        ),
        ("scores", Value::Array(Array::F32(vec![0.5, -1.0, 2.0]))),
        ("types", Value::Array(Array::U32(vec![1, 2, 3]))),
        (
            "nested",
            Value::Array(Array::Array(vec![
                Array::I8(vec![-1]),
                Array::Bool(vec![true, false]),
            ])),
        ),
    ]
}

fn valid_tensors() -> Vec<T> {
    let q = |f, n, s| quantize(f, &ramp(n, s)).unwrap();
    vec![
        t(
            "f32",
            &[5, 3],
            0,
            bytemuck::cast_slice(&ramp(15, 0.1)).to_vec(),
        ),
        t(
            "f16",
            &[7],
            1,
            quantize(WeightFormat::F16, &ramp(7, 0.5)).unwrap(),
        ),
        t("q8_0", &[64, 2], 8, q(WeightFormat::Q8_0, 128, 0.01)),
        t("q4_0", &[32, 3], 2, q(WeightFormat::Q4_0, 96, 0.02)),
        t("q4_1", &[32], 3, q(WeightFormat::Q4_1, 32, 0.03)),
        t("bf16", &[3], 30, vec![0x80, 0x3f, 0x00, 0xc0, 0x49, 0x40]),
        t("q4_k", &[256], 12, quant_blocks(12, 1, 1)),
        t("q6_k", &[256], 14, quant_blocks(14, 1, 2)),
        t("q5_k", &[256], 13, quant_blocks(13, 1, 3)),
        t("q5_0", &[32], 6, quant_blocks(6, 1, 4)),
        t("q5_1", &[32], 7, quant_blocks(7, 1, 5)),
        t("q2_k", &[256, 2], 10, quant_blocks(10, 2, 6)),
        t("q3_k", &[512], 11, quant_blocks(11, 2, 7)),
        t("iq4_nl", &[64, 3], 20, quant_blocks(20, 6, 8)),
        t("iq4_xs", &[256], 23, quant_blocks(23, 1, 9)),
    ]
}

fn valid_file() -> Vec<u8> {
    write_gguf(3, &valid_metadata(), &valid_tensors())
}

#[test]
fn valid_file_round_trips_metadata_and_tensors() {
    for (version, align) in [(3, None), (2, Some(64u32))] {
        let mut kvs = valid_metadata();
        if let Some(a) = align {
            kvs.push(("general.alignment", Value::U32(a)));
        }
        let g =
            Gguf::from_bytes("valid.gguf", write_gguf(version, &kvs, &valid_tensors())).unwrap();
        assert_eq!(
            (g.version(), g.alignment()),
            (version, align.unwrap_or(32) as usize)
        );
        for (k, v) in &kvs {
            assert_eq!(g.metadata(k), Some(v), "{k}");
        }
        assert_eq!(g.metadata_entries().count(), kvs.len());
        assert_eq!(g.architecture().unwrap(), "llama");
        assert_eq!(g.get_u32("llama.block_count").unwrap(), 2);
        assert_eq!(g.get_u32("u8").unwrap(), 200);
        assert_eq!(g.get_u32("u16").unwrap(), 60000);
        assert_eq!(g.get_u64("u64").unwrap(), 1 << 40);
        assert_eq!(g.get_u32("i64").unwrap(), 7);
        assert_eq!(g.get_f32("f32").unwrap(), 1e-5);
        assert_eq!(g.get_f32("f64").unwrap(), 10000.0);
        assert_eq!(g.get_f32("u16").unwrap(), 60000.0);
        assert!(g.get_bool("bool").unwrap());
        assert_eq!(g.get_str_array("tokens").unwrap(), ["<s>", "é", ""]);
        assert_eq!(g.get_f32_array("scores").unwrap(), [0.5, -1.0, 2.0]);
        assert_eq!(g.get_i32_array("types").unwrap(), [1, 2, 3]);
        assert_eq!(g.get_f32_array("types").unwrap(), [1.0, 2.0, 3.0]);
        // Typed getters refuse what does not fit, naming the key.
        for (e, want) in [
            (g.get_u32("i32").unwrap_err(), "KeyType"),
            (g.get_u32("u64").unwrap_err(), "KeyType"),
            (g.get_str("u8").unwrap_err(), "KeyType"),
            (g.get_str_array("scores").unwrap_err(), "KeyType"),
            (g.get_u32("absent").unwrap_err(), "MissingKey"),
        ] {
            assert_eq!(kind(&e), want, "{e}");
        }

        let tensors = valid_tensors();
        assert_eq!(g.tensors().len(), tensors.len());
        for (want, info) in tensors.iter().zip(g.tensors()) {
            assert_eq!(info.name, want.name);
            let shape: Vec<usize> = want.dims.iter().map(|&d| d as usize).collect();
            assert_eq!(info.shape, shape);
            assert_eq!(info.ggml_type.id(), want.ty);
            assert_eq!(info.offset % g.alignment(), 0, "{}", want.name);
            assert_eq!(g.tensor_bytes(want.name).unwrap(), want.data);
            let n = info.n_elements;
            let got = g.tensor_f32(want.name).unwrap();
            let expected = match want.ty {
                12 => kquants::dequantize_q4_k(&want.data, n).unwrap(),
                13 => kquants::dequantize_q5_k(&want.data, n).unwrap(),
                14 => kquants::dequantize_q6_k(&want.data, n).unwrap(),
                6 => kquants::dequantize_q5_0(&want.data, n).unwrap(),
                7 => kquants::dequantize_q5_1(&want.data, n).unwrap(),
                10 => kquants::dequantize_q2_k(&want.data, n).unwrap(),
                11 => kquants::dequantize_q3_k(&want.data, n).unwrap(),
                20 => kquants::dequantize_iq4_nl(&want.data, n).unwrap(),
                23 => kquants::dequantize_iq4_xs(&want.data, n).unwrap(),
                30 => vec![1.0, -2.0, 3.140625],
                ty => {
                    let f = weight_format(GgmlType::from_id(ty).unwrap()).unwrap();
                    dequantize(f, &want.data, n).unwrap()
                }
            };
            assert_eq!(got, expected, "{}", want.name);
            assert!(got.iter().all(|v| v.is_finite()), "{}", want.name);
        }
        assert_eq!(g.tensor_f32("f32").unwrap(), ramp(15, 0.1));
        g.expect_shape("q8_0", &[64, 2]).unwrap();
        let e = g.expect_shape("q8_0", &[2, 64]).unwrap_err();
        assert_eq!(kind(&e), "TensorShape", "{e}");
        let e = g.tensor_bytes("nope").unwrap_err();
        assert_eq!(kind(&e), "MissingTensor");
        assert!(e.to_string().contains("valid.gguf") && e.to_string().contains("nope"));

        // Native formats are borrowed as is, BF16 comes back as f32 bytes, and the types
        // without a kernel are requantised row by row with the target's quantiser.
        for want in &tensors {
            let info = g.tensor(want.name).unwrap();
            let (f, b) = g.tensor_weight(want.name).unwrap();
            assert_eq!(Some(f), weight_format(info.ggml_type), "{}", want.name);
            match want.ty {
                10 | 11 | 20 | 23 => {
                    let row = info.shape[0];
                    let x = g.tensor_f32(want.name).unwrap();
                    let mut expected = Vec::new();
                    for r in x.chunks(row) {
                        expected.extend(quantize(f, r).unwrap());
                    }
                    assert_eq!(*b, expected, "{}", want.name);
                    assert_eq!(b.len(), f.bytes_for(info.n_elements), "{}", want.name);
                }
                30 => assert_eq!(*b, *bytemuck::cast_slice::<f32, u8>(&[1.0, -2.0, 3.140625])),
                _ => assert_eq!(*b, want.data, "{}", want.name),
            }
        }
        let summary = g.conversion_summary().unwrap();
        for part in [
            "4 tensor(s)",
            "1 Q2_K -> q4_k (q2_k)",
            "1 Q3_K -> q4_k (q3_k)",
            "1 IQ4_NL -> q8_0 (iq4_nl)",
            "1 IQ4_XS -> q8_0 (iq4_xs)",
        ] {
            assert!(summary.contains(part), "'{summary}' lacks '{part}'");
        }
    }
}

#[test]
fn weight_format_mapping() {
    let wf = |id| weight_format(GgmlType::from_id(id).unwrap());
    use WeightFormat::*;
    // The formats with kernels are uploaded as they are; BF16 as f32 (exact).
    for (id, f) in [
        (0, F32),
        (1, F16),
        (2, Q4_0),
        (3, Q4_1),
        (8, Q8_0),
        (30, F32),
    ] {
        assert_eq!(wf(id), Some(f), "type {id}");
    }
    for (id, f) in [(6, Q5_0), (7, Q5_1), (12, Q4_K), (13, Q5_K), (14, Q6_K)] {
        assert_eq!(wf(id), Some(f), "type {id}");
    }
    // The others are requantised (see conversion_targets_keep_the_source_precision), never to f32.
    for (id, f) in [(10, Q4_K), (11, Q4_K), (20, Q8_0), (23, Q8_0)] {
        assert_eq!(wf(id), Some(f), "type {id}");
    }
    // Every type with a decoder has an upload format, and only the plain float types are f32.
    for t in GgmlType::all() {
        assert_eq!(t.decoder().is_some(), weight_format(t).is_some(), "{t}");
        if t.block_len() > 1 {
            assert_ne!(weight_format(t), Some(F32), "{t}");
        }
    }
    assert_eq!(wf(16), None); // IQ2_XXS: known layout, no decoder
    assert_eq!(wf(15), None); // Q8_K: only ever an activation format in ggml
    assert!(GgmlType::from_id(99).is_none() && GgmlType::from_id(4).is_none());
}

#[test]
fn every_prefix_of_a_valid_file_is_truncated() {
    let full = valid_file();
    assert!(Gguf::from_bytes("full", full.clone()).is_ok());
    for len in 0..full.len() {
        match Gguf::from_bytes("prefix", full[..len].to_vec()) {
            Err(Error::Truncated {
                offset,
                need,
                file_len,
                ..
            }) => {
                assert_eq!(file_len, len as u64);
                assert!(offset.saturating_add(need) > file_len, "prefix {len}");
            }
            Err(e) => panic!("prefix of {len} bytes: expected Truncated, got {e}"),
            Ok(_) => panic!("prefix of {len} bytes opened"),
        }
    }
}

fn patch_u64(mut b: Vec<u8>, at: usize, v: u64) -> Vec<u8> {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
    b
}

#[test]
fn broken_files_give_specific_errors() {
    let one = |name, dims: &[u64], ty, n: usize| vec![t(name, dims, ty, vec![0u8; n])];
    let arr = |a: Array| write_gguf(3, &[("a", Value::Array(a))], &[]);
    let kv_u32 = |k: &'static str, v| write_gguf(3, &[(k, Value::U32(v))], &[]);
    let mut misaligned = one("w", &[4], 0, 16);
    misaligned[0].offset = Some(4);
    let mut past_eof = one("w", &[4], 0, 16);
    past_eof[0].offset = Some(1 << 20);
    let mut overlap = vec![t("a", &[8], 0, vec![0; 32]), t("b", &[8], 0, vec![0; 32])];
    overlap[1].offset = Some(0);
    let mut deep = Array::U8(vec![1]);
    for _ in 0..6 {
        deep = Array::Array(vec![deep]);
    }
    let mut non_utf8 = write_gguf(3, &[("k\u{e9}", Value::U8(1))], &[]);
    non_utf8[33] = 0xff; // the key starts at 32, after its 8-byte length
    let mut unknown_value = kv_u32("k", 1);
    unknown_value[33..37].copy_from_slice(&13u32.to_le_bytes());

    let cases: Vec<(&str, Vec<u8>, &str, &str)> = vec![
        ("empty", vec![], "Truncated", "magic"),
        (
            "bad magic",
            [b"GGUX".as_slice(), &valid_file()[4..]].concat(),
            "BadFile",
            "magic",
        ),
        ("version 1", write_gguf(1, &[], &[]), "BadFile", "version 1"),
        ("version 4", write_gguf(4, &[], &[]), "BadFile", "version 4"),
        (
            "big-endian",
            write_gguf(3u32.swap_bytes(), &[], &[]),
            "BadFile",
            "big-endian",
        ),
        (
            "tensor count",
            patch_u64(valid_file(), 8, u64::MAX / 3),
            "Truncated",
            "tensor infos",
        ),
        (
            "kv count",
            patch_u64(valid_file(), 16, 1 << 40),
            "Truncated",
            "metadata entries",
        ),
        (
            "key past EOF",
            patch_u64(kv_u32("k", 1), 24, 1 << 20),
            "Truncated",
            "metadata key",
        ),
        (
            "string past EOF",
            patch_u64(
                write_gguf(3, &[("k", Value::String("ab".into()))], &[]),
                37,
                99,
            ),
            "Truncated",
            "metadata 'k'",
        ),
        (
            "array 2^60 u8",
            patch_u64(arr(Array::U8(vec![1, 2, 3])), 41, 1 << 60),
            "Truncated",
            "array elements",
        ),
        (
            "array 2^60 strings",
            patch_u64(arr(Array::String(vec!["x".into()])), 41, 1 << 60),
            "Truncated",
            "array elements",
        ),
        (
            "array 2^60 arrays",
            patch_u64(arr(Array::Array(vec![])), 41, 1 << 60),
            "Truncated",
            "array elements",
        ),
        (
            "array u64::MAX f64",
            patch_u64(arr(Array::F64(vec![1.0])), 41, u64::MAX),
            "Truncated",
            "array elements",
        ),
        ("nested too deep", arr(deep), "BadFile", "nested"),
        ("non-UTF-8 key", non_utf8, "BadFile", "UTF-8"),
        (
            "unknown value type",
            unknown_value,
            "BadFile",
            "value type 13",
        ),
        (
            "duplicate key",
            write_gguf(3, &[("k", Value::U8(1)), ("k", Value::U8(2))], &[]),
            "BadFile",
            "twice",
        ),
        (
            "alignment 0",
            kv_u32("general.alignment", 0),
            "BadFile",
            "alignment",
        ),
        (
            "alignment 3",
            kv_u32("general.alignment", 3),
            "BadFile",
            "alignment",
        ),
        (
            "alignment string",
            write_gguf(3, &[("general.alignment", Value::String("32".into()))], &[]),
            "BadFile",
            "alignment",
        ),
        (
            "tensor name past EOF",
            patch_u64(write_gguf(3, &[], &one("w", &[4], 0, 16)), 24, 1 << 30),
            "Truncated",
            "tensor name",
        ),
        (
            "n_dims 9",
            write_gguf(3, &[], &one("w", &[1; 9], 0, 4)),
            "BadTensor",
            "9 dimensions",
        ),
        (
            "n_dims 5",
            write_gguf(3, &[], &one("w", &[1; 5], 0, 4)),
            "BadTensor",
            "5 dimensions",
        ),
        (
            "shape overflow",
            write_gguf(3, &[], &one("w", &[1 << 40, 1 << 40], 0, 4)),
            "BadTensor",
            "overflows",
        ),
        (
            "size overflow",
            write_gguf(3, &[], &one("w", &[1 << 62], 0, 4)),
            "BadTensor",
            "overflows",
        ),
        (
            "row not whole blocks",
            write_gguf(3, &[], &one("w", &[33], 2, 18)),
            "BadTensor",
            "block length",
        ),
        (
            "unknown type 99",
            write_gguf(3, &[], &one("w", &[4], 99, 16)),
            "UnsupportedDtype",
            "99",
        ),
        (
            "duplicate names",
            write_gguf(
                3,
                &[],
                &[t("w", &[4], 0, vec![0; 16]), t("w", &[4], 0, vec![0; 16])],
            ),
            "BadTensor",
            "twice",
        ),
        (
            "offset past EOF",
            write_gguf(3, &[], &past_eof),
            "Truncated",
            "tensor 'w'",
        ),
        (
            "misaligned offset",
            write_gguf(3, &[], &misaligned),
            "BadTensor",
            "alignment",
        ),
        (
            "data past the end",
            write_gguf(3, &[], &one("w", &[64], 0, 100)),
            "Truncated",
            "tensor 'w'",
        ),
        (
            "overlapping data",
            write_gguf(3, &[], &overlap),
            "BadTensor",
            "overlaps",
        ),
    ];
    for (name, bytes, want, text) in cases {
        match Gguf::from_bytes(name, bytes) {
            Ok(_) => panic!("{name}: opened"),
            Err(e) => {
                let msg = e.to_string();
                assert_eq!(kind(&e), want, "{name}: {msg}");
                assert!(msg.contains(text), "{name}: '{msg}' lacks '{text}'");
                assert!(msg.contains(name), "{name}: '{msg}' does not name the file");
            }
        }
    }
}

#[test]
fn open_reads_files_from_disk() {
    let dir = std::env::temp_dir().join(format!("wgllm-gguf-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("small.gguf");
    std::fs::write(&path, valid_file()).unwrap();
    let g = Gguf::open(&path).unwrap();
    assert_eq!(g.file(), path.display().to_string());
    assert_eq!(g.tensor_f32("f32").unwrap(), ramp(15, 0.1));
    std::fs::write(&path, b"").unwrap();
    assert_eq!(kind(&Gguf::open(&path).err().unwrap()), "Truncated");
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(
        kind(&Gguf::open(dir.join("absent.gguf")).err().unwrap()),
        "Io"
    );
}

fn cache_dir() -> std::path::PathBuf {
    match std::env::var_os("WGLLM_CACHE") {
        Some(d) => d.into(),
        None => std::path::PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
            .join(".cache/wgllm"),
    }
}

#[test]
fn smollm2_file_opens() {
    let path = cache_dir().join("SmolLM2-135M-Instruct.Q4_1.gguf");
    if !path.is_file() {
        println!("SKIPPED: {} is absent", path.display());
        return;
    }
    let g = Gguf::open(&path).unwrap();
    assert_eq!(g.architecture().unwrap(), "llama");
    assert_eq!(g.get_u32("llama.block_count").unwrap(), 30);
    assert_eq!(g.get_u32("llama.embedding_length").unwrap(), 576);
    assert_eq!(g.get_u32("llama.attention.head_count").unwrap(), 9);
    assert_eq!(g.get_u32("llama.attention.head_count_kv").unwrap(), 3);
    assert_eq!(
        g.get_str_array("tokenizer.ggml.tokens").unwrap().len(),
        49152
    );
    println!(
        "GGUF v{}, alignment {}, {} tensors",
        g.version(),
        g.alignment(),
        g.tensors().len()
    );
    for (k, v) in g.metadata_entries() {
        println!("  {k}: {}", v.describe());
    }
    let mut by_type: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for t in g.tensors() {
        let ok = [GgmlType::F32, GgmlType::Q4_1, GgmlType::Q8_0].contains(&t.ggml_type);
        assert!(ok, "{} has type {}", t.name, t.ggml_type);
        if !t.name.starts_with("blk.") || t.name.starts_with("blk.0.") {
            println!("  {} {} {:?}", t.name, t.ggml_type, t.shape);
        }
        by_type
            .entry(t.ggml_type.to_string())
            .or_default()
            .push(t.name.clone());
    }
    for (ty, names) in &by_type {
        println!("{ty}: {} tensors", names.len());
    }
    // The embedding dequantises to finite values of the right count.
    let emb = g.tensor_f32("token_embd.weight").unwrap();
    assert_eq!(emb.len(), 576 * 49152);
    assert!(emb.iter().all(|v| v.is_finite()));
}

/// Heavy-tailed weights like a trained matrix's: Gaussian rows of varied scale with rare
/// outliers (about one in 200 weights at 4-8x), seeded.
fn weights_like(rows: usize, cols: usize, seed: u64) -> Vec<f32> {
    use rand::{Rng, SeedableRng};
    let mut r = rand::rngs::StdRng::seed_from_u64(seed);
    let mut x = Vec::with_capacity(rows * cols);
    for _ in 0..rows {
        let scale = 0.02 * (1.0 + 2.0 * r.gen::<f32>());
        for _ in 0..cols {
            let (u, v): (f32, f32) = (r.gen::<f32>().max(1e-9), r.gen());
            let g = (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos();
            let outlier = if r.gen::<f32>() < 0.005 {
                4.0 + 4.0 * r.gen::<f32>()
            } else {
                1.0
            };
            x.push(g * scale * outlier);
        }
    }
    x
}

/// The IQ4 level nearest `v`.
fn iq4_index(v: f32) -> u8 {
    (0..16)
        .min_by(|&a, &b| {
            let da = (kquants::IQ4_VALUES[a] as f32 - v).abs();
            let db = (kquants::IQ4_VALUES[b] as f32 - v).abs();
            da.total_cmp(&db)
        })
        .unwrap() as u8
}

/// 32 weights as IQ4 indices under scale `d` (byte j: weight j low, weight j + 16 high).
fn iq4_nibbles(x: &[f32], d: f32) -> Vec<u8> {
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    (0..16)
        .map(|j| iq4_index(x[j] * id) | (iq4_index(x[j + 16] * id) << 4))
        .collect()
}

/// The signed value of largest magnitude.
fn signed_max(x: &[f32]) -> f32 {
    x.iter()
        .fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m })
}

/// Squared error of 32 weights quantised to IQ4 levels under scale `d`.
fn iq4_error(x: &[f32], d: f32) -> f32 {
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    x.iter()
        .map(|&v| (v - d * kquants::IQ4_VALUES[iq4_index(v * id) as usize] as f32).powi(2))
        .sum()
}

/// An IQ4_NL quantiser with a scale search like ggml's: scales putting the largest weight at
/// levels -127 +- 7, the one of least squared error kept.
fn quantize_iq4_nl(x: &[f32]) -> Vec<u8> {
    let mut out = Vec::new();
    for b in x.chunks_exact(32) {
        let max = signed_max(b);
        let d = (-7..=7)
            .map(|t| half::f16::from_f32(max / (-127.0 + t as f32)))
            .min_by(|p, q| iq4_error(b, p.to_f32()).total_cmp(&iq4_error(b, q.to_f32())))
            .unwrap();
        out.extend_from_slice(&d.to_le_bytes());
        out.extend(iq4_nibbles(b, d.to_f32()));
    }
    out
}

/// A plain IQ4_XS quantiser: per 32-weight group the IQ4_NL scale, stored as a 6-bit multiple
/// of the super-block's d as ggml's `quantize_row_iq4_xs` does.
fn quantize_iq4_xs(x: &[f32]) -> Vec<u8> {
    let mut out = Vec::new();
    for b in x.chunks_exact(256) {
        let scales: Vec<f32> = b.chunks_exact(32).map(|g| signed_max(g) / -127.0).collect();
        let d = half::f16::from_f32(-signed_max(&scales) / 32.0);
        let id = if d.to_f32() != 0.0 {
            1.0 / d.to_f32()
        } else {
            0.0
        };
        let l: Vec<i32> = scales
            .iter()
            .map(|s| ((id * s).round() as i32).clamp(-32, 31))
            .collect();
        out.extend_from_slice(&d.to_le_bytes());
        let high = (0..8).fold(0u16, |h, k| h | ((((l[k] + 32) >> 4) as u16) << (2 * k)));
        out.extend_from_slice(&high.to_le_bytes());
        out.extend(
            (0..4)
                .map(|k| ((l[2 * k] + 32) & 15) as u8 | ((((l[2 * k + 1] + 32) & 15) as u8) << 4)),
        );
        for (k, g) in b.chunks_exact(32).enumerate() {
            out.extend(iq4_nibbles(g, d.to_f32() * l[k] as f32));
        }
    }
    out
}

/// A plain Q3_K quantiser: per 16 weights a scale putting the largest at -4, stored as a
/// 6-bit multiple of the super-block's d; 3-bit q split into hmask (set: no -4) and 2 low bits.
fn quantize_q3_k(x: &[f32]) -> Vec<u8> {
    let mut out = Vec::new();
    for b in x.chunks_exact(256) {
        let scales: Vec<f32> = b.chunks_exact(16).map(|g| signed_max(g) / -4.0).collect();
        let d = half::f16::from_f32(signed_max(&scales) / -32.0);
        let id = if d.to_f32() != 0.0 {
            1.0 / d.to_f32()
        } else {
            0.0
        };
        let l: Vec<i32> = scales
            .iter()
            .map(|s| ((id * s).round() as i32).clamp(-32, 31))
            .collect();
        let mut blk = vec![0u8; 110];
        for i in 0..256 {
            let dl = d.to_f32() * l[i / 16] as f32;
            let q = if dl != 0.0 {
                ((b[i] / dl).round() as i32).clamp(-4, 3)
            } else {
                0
            };
            let u = (q + 4) as u8;
            blk[32 + 32 * (i / 128) + i % 32] |= (u & 3) << (2 * ((i % 128) / 32));
            blk[i % 32] |= (u >> 2) << (i / 32);
        }
        for (k, &lk) in l.iter().enumerate() {
            let v = (lk + 32) as u8;
            blk[96 + k % 8] |= (v & 15) << (4 * (k / 8));
            blk[104 + k % 4] |= (v >> 4) << (2 * (k / 4));
        }
        blk[108..].copy_from_slice(&d.to_le_bytes());
        out.extend(blk);
    }
    out
}

/// A plain Q2_K quantiser: per 16 weights a scale and a min (4 bits each, multiples of the
/// super-block's d and dmin) and q in 0..=3.
fn quantize_q2_k(x: &[f32]) -> Vec<u8> {
    let mut out = Vec::new();
    for b in x.chunks_exact(256) {
        let groups: Vec<(f32, f32)> = b
            .chunks_exact(16)
            .map(|g| {
                let mn = g.iter().fold(0f32, |m, &v| m.min(v));
                let mx = g.iter().fold(f32::MIN, |m, &v| m.max(v));
                ((mx - mn) / 3.0, -mn)
            })
            .collect();
        let d = half::f16::from_f32(groups.iter().fold(0f32, |m, g| m.max(g.0)) / 15.0);
        let dmin = half::f16::from_f32(groups.iter().fold(0f32, |m, g| m.max(g.1)) / 15.0);
        let q4 = |v: f32, s: f32| {
            if s != 0.0 {
                ((v / s).round() as i32).clamp(0, 15) as u8
            } else {
                0
            }
        };
        let mut blk = vec![0u8; 84];
        for (k, &(sc, mn)) in groups.iter().enumerate() {
            blk[k] = q4(sc, d.to_f32()) | (q4(mn, dmin.to_f32()) << 4);
        }
        for i in 0..256 {
            let (sc, m) = (blk[i / 16] & 15, blk[i / 16] >> 4);
            let (dl, ml) = (d.to_f32() * sc as f32, dmin.to_f32() * m as f32);
            let q = if dl != 0.0 {
                (((b[i] + ml) / dl).round() as i32).clamp(0, 3)
            } else {
                0
            } as u8;
            blk[16 + 32 * (i / 128) + i % 32] |= q << (2 * ((i % 128) / 32));
        }
        blk[80..82].copy_from_slice(&d.to_le_bytes());
        blk[82..84].copy_from_slice(&dmin.to_le_bytes());
        out.extend(blk);
    }
    out
}

fn rms(a: &[f32], b: &[f32]) -> f64 {
    let s: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    (s / a.len() as f64).sqrt()
}

/// The measurement behind `weight_format`'s targets for the types without a kernel: quantise
/// realistic weights to the source type, convert them with `convert_rows` to each candidate,
/// and compare the conversion's RMS error (against the source's decoded values) with the
/// source's own error (against the original weights). A target keeps the source's precision
/// when the converted weights' error against the originals stays within 1% of the source's
/// own; the loader's target must be the smallest candidate (bits per weight) that does, or,
/// for Q2_K and Q3_K, Q4_K, whose own error is already below theirs (printed with
/// `--nocapture`; the numbers are in `loader/upload.rs`).
#[test]
fn conversion_targets_keep_the_source_precision() {
    let (rows, cols) = (64, 1024);
    let x = weights_like(rows, cols, 11);
    let x_rms = rms(&x, &vec![0.0; x.len()]);
    let sources: [(GgmlType, Vec<u8>); 4] = [
        (GgmlType::Q2_K, quantize_q2_k(&x)),
        (GgmlType::Q3_K, quantize_q3_k(&x)),
        (GgmlType::IQ4_NL, quantize_iq4_nl(&x)),
        (GgmlType::IQ4_XS, quantize_iq4_xs(&x)),
    ];
    let candidates = [
        WeightFormat::Q4_K,
        WeightFormat::Q5_K,
        WeightFormat::Q6_K,
        WeightFormat::Q8_0,
    ];
    for (t, bytes) in sources {
        let src = t.decoder().unwrap()(&bytes, x.len()).unwrap();
        let own = rms(&src, &x) / x_rms;
        let mut line = format!("{}: own error {:.2}%", t.name(), 100.0 * own);
        let mut keeps = Vec::new();
        for target in candidates {
            let conv = wgllm::loader::convert_rows(t, &bytes, cols, target).unwrap();
            let y = dequantize(target, &conv, x.len()).unwrap();
            let (err, total) = (rms(&y, &src) / x_rms, rms(&y, &x) / x_rms);
            line += &format!(
                ", {target} {:.2}% (total {:.2}%)",
                100.0 * err,
                100.0 * total
            );
            if total <= 1.01 * own {
                keeps.push(target);
            }
        }
        println!("{line}");
        let chosen = weight_format(t).unwrap();
        match t {
            GgmlType::Q2_K | GgmlType::Q3_K => {
                assert_eq!(chosen, WeightFormat::Q4_K, "{}", t.name());
                let q4k = wgllm::quant::quantize(chosen, &x).unwrap();
                let q4k_own = rms(&dequantize(chosen, &q4k, x.len()).unwrap(), &x) / x_rms;
                assert!(
                    q4k_own < own,
                    "{}: Q4_K's own error {q4k_own} is not below",
                    t.name()
                );
            }
            _ => {
                let best = keeps
                    .iter()
                    .min_by(|a, b| a.bits_per_weight().total_cmp(&b.bits_per_weight()));
                assert_eq!(Some(&chosen), best, "{}: {line}", t.name());
            }
        }
    }
}

/// A file holding one tensor named `w`.
fn one_tensor(dims: &[u64], ty: u32, data: Vec<u8>) -> Vec<u8> {
    write_gguf(3, &[], &[t("w", dims, ty, data)])
}

#[test]
fn broken_quantised_tensors_give_typed_errors() {
    // At open: truncated data, rows of part blocks, type ids ggml never had or no longer has.
    let three_of_four = quant_blocks(12, 3, 1);
    let cases: Vec<(&str, Vec<u8>, &str, &str)> = vec![
        (
            "q4_k truncated",
            one_tensor(&[256, 4], 12, three_of_four),
            "Truncated",
            "tensor 'w'",
        ),
        (
            "q6_k truncated",
            one_tensor(&[512], 14, quant_blocks(14, 1, 2)),
            "Truncated",
            "tensor 'w'",
        ),
        (
            "q2_k one byte short",
            one_tensor(&[256], 10, quant_blocks(10, 1, 3)[..83].to_vec()),
            "Truncated",
            "tensor 'w'",
        ),
        (
            "q4_k rows of 128",
            one_tensor(&[128, 2], 12, quant_blocks(12, 1, 4)),
            "BadTensor",
            "Q4_K block length 256",
        ),
        (
            "q6_k rows of 300",
            one_tensor(&[300], 14, quant_blocks(14, 2, 5)),
            "BadTensor",
            "Q6_K block length 256",
        ),
        (
            "iq4_nl rows of 48",
            one_tensor(&[48, 2], 20, quant_blocks(20, 3, 6)),
            "BadTensor",
            "IQ4_NL block length 32",
        ),
        (
            "removed type 4",
            one_tensor(&[32], 4, vec![0; 18]),
            "UnsupportedDtype",
            "unknown ggml type 4",
        ),
        (
            "type 31",
            one_tensor(&[32], 31, vec![0; 18]),
            "UnsupportedDtype",
            "unknown ggml type 31",
        ),
        (
            "type 2^31",
            one_tensor(&[32], 1 << 31, vec![0; 18]),
            "UnsupportedDtype",
            "unknown ggml type 2147483648",
        ),
    ];
    for (name, bytes, want, text) in cases {
        match Gguf::from_bytes(name, bytes) {
            Ok(_) => panic!("{name}: opened"),
            Err(e) => {
                let msg = e.to_string();
                assert_eq!(kind(&e), want, "{name}: {msg}");
                assert!(msg.contains(text), "{name}: '{msg}' lacks '{text}'");
                assert!(msg.contains(name), "{name}: '{msg}' does not name the file");
                assert!(
                    msg.contains("'w'"),
                    "{name}: '{msg}' does not name the tensor"
                );
            }
        }
    }

    // At read: a known layout without a decoder, and NaN or infinite block scales (gguf-py
    // decodes them to NaN and infinite weights; wgllm refuses the tensor, naming the block).
    let f16 = |v: f32| half::f16::from_f32(v).to_le_bytes();
    let with = |ty: u32, blocks: usize, block: usize, at: usize, v: f32| {
        let t = GgmlType::from_id(ty).unwrap();
        let mut b = quant_blocks(ty, blocks, 7);
        let off = block * t.block_bytes() + at;
        b[off..off + 2].copy_from_slice(&f16(v));
        b
    };
    let reads: Vec<(&str, Vec<u8>, &str, &str)> = vec![
        (
            "iq2_xxs",
            one_tensor(&[256], 16, vec![0; 66]),
            "UnsupportedDtype",
            "IQ2_XXS",
        ),
        (
            "q4_k NaN d",
            one_tensor(&[256, 2], 12, with(12, 2, 1, 0, f32::NAN)),
            "BadTensor",
            "block 1 (weights 256..512) has a non-finite Q4_K scale (NaN) at byte 0",
        ),
        (
            "q4_k inf dmin",
            one_tensor(&[256], 12, with(12, 1, 0, 2, f32::INFINITY)),
            "BadTensor",
            "non-finite Q4_K scale (inf) at byte 2",
        ),
        (
            "q6_k -inf d",
            one_tensor(&[512], 14, with(14, 2, 1, 208, f32::NEG_INFINITY)),
            "BadTensor",
            "non-finite Q6_K scale (-inf) at byte 208",
        ),
        (
            "q5_0 NaN d",
            one_tensor(&[64], 6, with(6, 2, 1, 0, f32::NAN)),
            "BadTensor",
            "block 1 (weights 32..64)",
        ),
        (
            "q3_k NaN d",
            one_tensor(&[256], 11, with(11, 1, 0, 108, f32::NAN)),
            "BadTensor",
            "non-finite Q3_K scale",
        ),
        (
            "q2_k inf dmin",
            one_tensor(&[256], 10, with(10, 1, 0, 82, f32::INFINITY)),
            "BadTensor",
            "at byte 82",
        ),
        (
            "iq4_xs NaN d",
            one_tensor(&[256], 23, with(23, 1, 0, 0, f32::NAN)),
            "BadTensor",
            "non-finite IQ4_XS scale",
        ),
        (
            "q8_0 inf d",
            one_tensor(&[32], 8, with(8, 1, 0, 0, f32::INFINITY)),
            "BadTensor",
            "non-finite Q8_0 scale",
        ),
    ];
    for (name, bytes, want, text) in reads {
        let g = Gguf::from_bytes(name, bytes).unwrap();
        let errors = [
            g.tensor_weight("w").map(|_| ()).unwrap_err(),
            g.tensor_f32("w").map(|_| ()).unwrap_err(),
        ];
        for e in errors {
            let msg = e.to_string();
            assert_eq!(kind(&e), want, "{name}: {msg}");
            assert!(msg.contains(text), "{name}: '{msg}' lacks '{text}'");
            assert!(msg.contains(name) && msg.contains("'w'"), "{name}: '{msg}'");
        }
    }
}

/// Finite IQ4_XS scales whose weights lie beyond what Q8_0's f16 scale can hold: read as f32,
/// refused for upload with a typed error rather than uploaded with infinite scales.
#[test]
fn conversion_overflow_is_a_typed_error() {
    let mut b = vec![0u8; 136];
    b[..2].copy_from_slice(&half::f16::from_f32(60000.0).to_le_bytes());
    // Scale bits all zero: every group's scale is d * (0 - 32); index 0 is level -127.
    let g = Gguf::from_bytes("huge.gguf", one_tensor(&[256], 23, b)).unwrap();
    let x = g.tensor_f32("w").unwrap();
    assert!(x
        .iter()
        .all(|v| v.is_finite() && *v == 60000.0 * -32.0 * -127.0));
    let e = g.tensor_weight("w").map(|_| ()).unwrap_err();
    let msg = e.to_string();
    assert_eq!(kind(&e), "BadTensor", "{msg}");
    assert!(msg.contains("huge.gguf") && msg.contains("'w'") && msg.contains("overflows q8_0"));
}

/// Random bytes as blocks of every type wgllm decodes: decoding never panics and gives the
/// weights asked for, wrong lengths are errors, and files of random tensors (and random
/// corruptions of a valid file) open or fail with a typed error, their tensors read or fail
/// likewise, never a panic.
#[test]
fn random_blocks_never_panic() {
    use rand::{Rng, SeedableRng};
    let mut r = rand::rngs::StdRng::seed_from_u64(20261202);
    let types: Vec<GgmlType> = GgmlType::all().filter(|t| t.decoder().is_some()).collect();
    assert_eq!(types.len(), 15);
    for round in 0..200 {
        for &t in &types {
            let decode = t.decoder().unwrap();
            let (bl, bb) = (t.block_len(), t.block_bytes());
            let blocks = r.gen_range(1..=4);
            let n = blocks * bl.max(32);
            let bytes: Vec<u8> = (0..n / bl * bb).map(|_| r.gen()).collect();
            let y = decode(&bytes, n).unwrap_or_else(|e| panic!("{t} round {round}: {e}"));
            assert_eq!(y.len(), n, "{t}");
            assert!(
                decode(&bytes, n + bl.max(32)).is_err(),
                "{t}: too few bytes"
            );
            assert!(decode(&bytes[..bytes.len() - 1], n).is_err(), "{t}: short");
            if bl > 1 {
                assert!(decode(&bytes, n - 1).is_err(), "{t}: part block");
            }
            // The same bytes as a two-row tensor: read, converted, or refused with a typed error.
            let rows = if bl > 1 { blocks } else { 1 };
            let file = one_tensor(&[(n / rows) as u64, rows as u64], t.id(), bytes);
            let g = Gguf::from_bytes("random.gguf", file).unwrap();
            for e in [
                g.tensor_f32("w").map(|_| ()).err(),
                g.tensor_weight("w").map(|_| ()).err(),
            ]
            .into_iter()
            .flatten()
            {
                assert_eq!(kind(&e), "BadTensor", "{t}: {e}");
            }
            // What converts has finite scales in the target format too.
            if let Ok((f, b)) = g.tensor_weight("w") {
                let y = dequantize(f, &b, n).unwrap();
                assert!(
                    t.block_len() == 1 || y.iter().all(|v| v.is_finite()),
                    "{t} -> {f}"
                );
            }
        }
    }
    // Random corruptions of a valid file.
    let valid = valid_file();
    for _ in 0..300 {
        let mut b = valid.clone();
        for _ in 0..r.gen_range(1..=8) {
            let at = r.gen_range(0..b.len());
            b[at] = r.gen();
        }
        if let Ok(g) = Gguf::from_bytes("mutated.gguf", b) {
            let names: Vec<String> = g.tensors().iter().map(|t| t.name.clone()).collect();
            for name in names {
                let errors = [
                    g.tensor_f32(&name).map(|_| ()).err(),
                    g.tensor_weight(&name).map(|_| ()).err(),
                ];
                for e in errors.into_iter().flatten() {
                    assert_ne!(kind(&e), "other", "{name}: {e}");
                }
            }
        }
    }
}

/// The real Gemma 3 270M Q4_K_M file (when cached): every tensor is uploaded as the file's own
/// bytes (its Q5_0, Q4_K, Q6_K and Q8_0 tensors included), so the upload is exactly the file's
/// 246,587,904 bytes of tensor data, nothing is converted, and no block scale is NaN or infinite.
#[test]
fn gemma_q4_k_m_uploads_as_stored() {
    let path = cache_dir().join("gemma-3-270m-q4_k_m.gguf");
    if !path.is_file() {
        println!("SKIPPED: {} is absent", path.display());
        return;
    }
    let g = Gguf::open(&path).unwrap();
    let mut by_type: std::collections::BTreeMap<&str, usize> = Default::default();
    let mut uploaded = 0usize;
    for t in g.tensors() {
        *by_type.entry(t.ggml_type.name()).or_default() += 1;
        let (f, b) = g.tensor_weight(&t.name).unwrap();
        assert!(
            matches!(b, std::borrow::Cow::Borrowed(_)),
            "{} was converted",
            t.name
        );
        assert_eq!(b.len(), t.size, "{}", t.name);
        assert_eq!(f.bytes_for(t.n_elements), t.size, "{} as {f}", t.name);
        uploaded += b.len();
    }
    let want = [
        ("F32", 109),
        ("Q4_K", 27),
        ("Q5_0", 81),
        ("Q6_K", 9),
        ("Q8_0", 10),
    ];
    assert_eq!(by_type.into_iter().collect::<Vec<_>>(), want);
    assert_eq!(uploaded, 246_587_904);
    assert_eq!(g.conversion_summary(), None);
}
