//! Hugging Face directory loader tests: single-file and sharded models built in a temporary
//! directory round-trip F32/F16/BF16 tensors; broken files (truncated header, header length past
//! the end, data past the end, missing shard, missing tensor, wrong dtype) give typed errors naming
//! the file and tensor; and the cached all-MiniLM-L6-v2 opens with its known embedding shape.

use std::path::{Path, PathBuf};

use wgllm::loader::HfModel;
use wgllm::Error;

/// A safetensors image, written by hand from the format description: u64 header length, JSON
/// header, then the tensors' bytes back to back.
fn st_bytes(tensors: &[(&str, &str, &[usize], Vec<u8>)]) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    let mut data = Vec::new();
    for (name, dtype, shape, bytes) in tensors {
        let entry = serde_json::json!({
            "dtype": dtype,
            "shape": shape,
            "data_offsets": [data.len(), data.len() + bytes.len()],
        });
        header.insert(name.to_string(), entry);
        data.extend_from_slice(bytes);
    }
    let header = serde_json::to_vec(&header).unwrap();
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&header);
    out.extend_from_slice(&data);
    out
}

/// A fresh, empty temporary directory for one test.
fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("wgllm-st-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn write(dir: &Path, file: &str, bytes: impl AsRef<[u8]>) {
    std::fs::write(dir.join(file), bytes).unwrap();
}

const CONFIG: &str = r#"{"model_type": "bert", "hidden_size": 4}"#;

fn f32s(v: &[f32]) -> Vec<u8> {
    bytemuck::cast_slice(v).to_vec()
}

fn small_tensors() -> Vec<(&'static str, &'static str, &'static [usize], Vec<u8>)> {
    let f16: Vec<u8> = [1.5f32, -2.0, 0.25]
        .iter()
        .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
        .collect();
    let bf16: Vec<u8> = [3.0f32, -0.5]
        .iter()
        .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
        .collect();
    vec![
        (
            "a.weight",
            "F32",
            &[2, 3],
            f32s(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]),
        ),
        ("b.half", "F16", &[3], f16),
        ("c.brain", "BF16", &[1, 2], bf16),
        ("d.ids", "I32", &[2], vec![1, 0, 0, 0, 2, 0, 0, 0]),
    ]
}

fn kind(e: &Error) -> &'static str {
    match e {
        Error::Truncated { .. } => "Truncated",
        Error::BadFile { .. } => "BadFile",
        Error::BadTensor { .. } => "BadTensor",
        Error::UnsupportedDtype { .. } => "UnsupportedDtype",
        Error::MissingTensor { .. } => "MissingTensor",
        Error::MissingShard { .. } => "MissingShard",
        Error::TensorShape { .. } => "TensorShape",
        Error::Io { .. } => "Io",
        _ => "other",
    }
}

#[test]
fn single_file_round_trips() {
    let dir = temp_dir("single");
    write(&dir, "config.json", CONFIG);
    write(&dir, "model.safetensors", st_bytes(&small_tensors()));
    let m = HfModel::open(&dir).unwrap();
    assert_eq!(m.config()["hidden_size"], 4);
    assert_eq!(m.tensor_names(), ["a.weight", "b.half", "c.brain", "d.ids"]);
    assert_eq!(m.tensor_shape("a.weight").unwrap(), [2, 3]);
    assert_eq!(
        m.tensor_f32("a.weight").unwrap(),
        [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    );
    assert_eq!(m.tensor_f32("b.half").unwrap(), [1.5, -2.0, 0.25]);
    assert_eq!(m.tensor_f32("c.brain").unwrap(), [3.0, -0.5]);
    assert_eq!(m.tensor_bytes("d.ids").unwrap(), [1, 0, 0, 0, 2, 0, 0, 0]);
    m.expect_shape("c.brain", &[1, 2]).unwrap();

    let e = m.tensor_f32("d.ids").unwrap_err();
    assert_eq!(kind(&e), "UnsupportedDtype", "{e}");
    assert!(e.to_string().contains("d.ids") && e.to_string().contains("model.safetensors"));
    let e = m.tensor_f32("nope").unwrap_err();
    assert_eq!(kind(&e), "MissingTensor", "{e}");
    assert!(e.to_string().contains("nope") && e.to_string().contains("model.safetensors"));
    let e = m.expect_shape("a.weight", &[3, 2]).unwrap_err();
    assert_eq!(kind(&e), "TensorShape", "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

fn index_json(map: &[(&str, &str)]) -> String {
    let m: serde_json::Map<_, _> = map
        .iter()
        .map(|(t, s)| (t.to_string(), serde_json::json!(s)))
        .collect();
    serde_json::json!({ "metadata": {}, "weight_map": m }).to_string()
}

#[test]
fn sharded_model_and_its_failures() {
    let dir = temp_dir("sharded");
    let t = small_tensors();
    write(&dir, "config.json", CONFIG);
    write(&dir, "model-1.safetensors", st_bytes(&t[..2]));
    write(&dir, "model-2.safetensors", st_bytes(&t[2..]));
    let good = [
        ("a.weight", "model-1.safetensors"),
        ("b.half", "model-1.safetensors"),
        ("c.brain", "model-2.safetensors"),
        ("d.ids", "model-2.safetensors"),
    ];
    write(&dir, "model.safetensors.index.json", index_json(&good));
    let m = HfModel::open(&dir).unwrap();
    assert_eq!(m.tensor_names().len(), 4);
    assert_eq!(m.tensor_f32("b.half").unwrap(), [1.5, -2.0, 0.25]);
    assert_eq!(m.tensor_f32("c.brain").unwrap(), [3.0, -0.5]);
    let e = m.tensor_f32("zzz").unwrap_err();
    assert!(e.to_string().contains("index.json"), "{e}");

    // A shard named in the index but absent: names the shard and a tensor in it.
    let mut missing = good.to_vec();
    missing.push(("e.extra", "model-3.safetensors"));
    write(&dir, "model.safetensors.index.json", index_json(&missing));
    let e = HfModel::open(&dir).err().unwrap();
    assert_eq!(kind(&e), "MissingShard", "{e}");
    assert!(e.to_string().contains("model-3.safetensors") && e.to_string().contains("e.extra"));

    // The index puts a tensor in a shard that lacks it.
    let mut wrong = good.to_vec();
    wrong[0].1 = "model-2.safetensors";
    write(&dir, "model.safetensors.index.json", index_json(&wrong));
    let e = HfModel::open(&dir).err().unwrap();
    assert_eq!(kind(&e), "MissingTensor", "{e}");
    assert!(e.to_string().contains("model-2.safetensors") && e.to_string().contains("a.weight"));

    // Shard names must stay inside the directory.
    write(
        &dir,
        "model.safetensors.index.json",
        index_json(&[("a", "../x.safetensors")]),
    );
    assert_eq!(kind(&HfModel::open(&dir).err().unwrap()), "BadFile");
    write(&dir, "model.safetensors.index.json", "{\"weight_map\": 3}");
    assert_eq!(kind(&HfModel::open(&dir).err().unwrap()), "BadFile");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Opens a directory whose model.safetensors is `bytes`.
fn open_with(dir: &Path, bytes: &[u8]) -> Result<HfModel, Error> {
    write(dir, "model.safetensors", bytes);
    HfModel::open(dir)
}

#[test]
fn broken_files_give_typed_errors() {
    let dir = temp_dir("broken");
    write(&dir, "config.json", CONFIG);
    let good = st_bytes(&small_tensors());
    let header_len = u64::from_le_bytes(good[..8].try_into().unwrap()) as usize;

    // Every prefix is truncated: in the length, the JSON header or some tensor's data.
    for len in 0..good.len() {
        let e = open_with(&dir, &good[..len]).err().unwrap();
        assert_eq!(kind(&e), "Truncated", "prefix {len}: {e}");
        assert!(e.to_string().contains("model.safetensors"), "{e}");
        if len >= 8 + header_len {
            assert!(e.to_string().contains("tensor '"), "prefix {len}: {e}");
        }
    }
    let mut past = good.clone();
    past[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    let e = open_with(&dir, &past).err().unwrap();
    assert_eq!(kind(&e), "Truncated", "{e}");
    assert!(e.to_string().contains("JSON header"), "{e}");

    // Data offsets past the end of the file name the tensor.
    let mut header = serde_json::Map::new();
    header.insert(
        "big".into(),
        serde_json::json!({"dtype": "F32", "shape": [100], "data_offsets": [0, 400]}),
    );
    let h = serde_json::to_vec(&header).unwrap();
    let mut bad = (h.len() as u64).to_le_bytes().to_vec();
    bad.extend_from_slice(&h);
    bad.extend_from_slice(&[0u8; 40]);
    let e = open_with(&dir, &bad).err().unwrap();
    assert_eq!(kind(&e), "Truncated", "{e}");
    assert!(e.to_string().contains("tensor 'big'"), "{e}");

    // A shape that disagrees with the byte count, and a header that is not JSON.
    let bad = st_bytes(&[("w", "F32", &[3], vec![0; 8])]);
    let e = open_with(&dir, &bad).err().unwrap();
    assert_eq!(kind(&e), "BadTensor", "{e}");
    let mut bad = 4u64.to_le_bytes().to_vec();
    bad.extend_from_slice(b"{{{{");
    assert_eq!(kind(&open_with(&dir, &bad).err().unwrap()), "BadFile");

    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    assert_eq!(kind(&HfModel::open(&dir).err().unwrap()), "BadFile");
    std::fs::remove_file(dir.join("config.json")).unwrap();
    assert_eq!(kind(&HfModel::open(&dir).err().unwrap()), "Io");
    write(&dir, "config.json", "{not json");
    assert_eq!(kind(&HfModel::open(&dir).err().unwrap()), "BadFile");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn minilm_opens() {
    let cache = match std::env::var_os("WGLLM_CACHE") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/wgllm"),
    };
    let dir = cache.join("all-MiniLM-L6-v2");
    if !dir.join("model.safetensors").is_file() {
        println!("SKIPPED: {} is absent", dir.display());
        return;
    }
    let m = HfModel::open(&dir).unwrap();
    assert_eq!(m.config()["hidden_size"], 384);
    let name = "embeddings.word_embeddings.weight";
    assert_eq!(m.tensor_shape(name).unwrap(), [30522, 384]);
    m.expect_shape(name, &[30522, 384]).unwrap();
    let w = m.tensor_f32(name).unwrap();
    assert_eq!(w.len(), 30522 * 384);
    assert!(w.iter().all(|v| v.is_finite()));
    println!(
        "{} tensors, {name} {:?}",
        m.tensor_names().len(),
        m.tensor_dtype(name).unwrap()
    );
}
