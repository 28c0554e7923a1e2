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

/// A Q4_K or Q6_K super-block of patterned bytes with finite f16 scales at the right place.
fn kquant_block(bytes: usize, d_at: usize, seed: u8) -> Vec<u8> {
    let mut b: Vec<u8> = (0..bytes)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect();
    b[d_at..d_at + 2].copy_from_slice(&half::f16::from_f32(0.0625).to_le_bytes());
    // The second f16 scale (dmin or m) of the formats that have one, finite.
    if matches!(bytes, 144 | 176 | 24) {
        b[2..4].copy_from_slice(&half::f16::from_f32(0.25).to_le_bytes());
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
        t("q4_k", &[256], 12, kquant_block(144, 0, 1)),
        t("q6_k", &[256], 14, kquant_block(210, 208, 2)),
        t("q5_k", &[256], 13, kquant_block(176, 0, 3)),
        t("q5_0", &[32], 6, kquant_block(22, 0, 4)),
        t("q5_1", &[32], 7, kquant_block(24, 0, 5)),
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

        // Native formats are borrowed as is; BF16 and k-quants come back as f32 bytes.
        let (f, b) = g.tensor_weight("q4_1").unwrap();
        assert_eq!((f, &*b), (WeightFormat::Q4_1, &tensors[4].data[..]));
        let (f, b) = g.tensor_weight("q6_k").unwrap();
        assert_eq!(f, WeightFormat::F32);
        assert_eq!(b.len(), 256 * 4);
    }
}

#[test]
fn weight_format_mapping() {
    let wf = |id| weight_format(GgmlType::from_id(id).unwrap());
    assert_eq!(wf(0), Some(WeightFormat::F32));
    assert_eq!(wf(1), Some(WeightFormat::F16));
    assert_eq!(wf(2), Some(WeightFormat::Q4_0));
    assert_eq!(wf(3), Some(WeightFormat::Q4_1));
    assert_eq!(wf(8), Some(WeightFormat::Q8_0));
    assert_eq!(wf(30), Some(WeightFormat::F32));
    // Q4_K, Q5_K, Q6_K, Q5_0 and Q5_1 are dequantised on load (no GPU kernels for them yet).
    for id in [12, 13, 14, 6, 7] {
        assert_eq!(wf(id), Some(WeightFormat::F32), "type {id}");
    }
    assert_eq!(wf(10), None); // Q2_K: known layout, no loader support
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
