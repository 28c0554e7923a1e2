//! wgllm's CPU dequantisers against gguf-py's (`gguf.quants.dequantize`), bit for bit, on the
//! committed blocks of `models/goldens/quant_blocks.json` (random quants and scales, and the
//! extremes: f16 max, the smallest subnormal and normal, zero, negative zero and negative
//! scales, infinities and NaNs, all-zero and all-one quant bits), one row per format.
//! `models/reference/make_quant_blocks.py` wrote them. The decoders are the loader's
//! ([`GgmlType::decoder`]), so every type the loader decodes must have a row.

mod common;
use common::golden;
use wgllm::loader::GgmlType;

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

#[test]
fn every_dequantiser_equals_gguf_py_bit_for_bit() {
    let g = golden("quant_blocks.json");
    let formats = g["formats"].as_array().expect("formats");
    let mut covered = Vec::new();
    for f in formats {
        let name = f["format"].as_str().expect("format");
        let id = f["ggml_type"].as_u64().expect("ggml_type") as u32;
        let t = GgmlType::from_id(id).expect("a known ggml type");
        assert_eq!(t.name(), name);
        let n = f["weights"].as_u64().expect("weights") as usize;
        let data = unhex(f["blocks_hex"].as_str().expect("blocks"));
        let want: Vec<u32> = unhex(f["f32_bits_hex"].as_str().expect("bits"))
            .chunks_exact(4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        assert_eq!(want.len(), n, "{name}");
        let decode = t.decoder().unwrap_or_else(|| panic!("{name}: no decoder"));
        let got = decode(&data, n).unwrap_or_else(|e| panic!("{name}: {e}"));
        let diff: Vec<usize> = (0..n).filter(|&i| got[i].to_bits() != want[i]).collect();
        assert!(
            diff.is_empty(),
            "{name}: {} of {n} weights differ from gguf-py, first at {}: {:#010x} vs {:#010x}",
            diff.len(),
            diff[0],
            got[diff[0]].to_bits(),
            want[diff[0]]
        );
        // The rows hold the extremes they claim: NaN and infinite scales reach the outputs.
        assert!(got.iter().any(|v| v.is_nan()), "{name}: no NaN row");
        assert!(
            got.iter().any(|v| v.is_infinite()),
            "{name}: no infinite row"
        );
        covered.push(t);
    }
    // Every block format the loader decodes has its row (the plain float types excepted).
    for t in GgmlType::all().filter(|t| t.block_len() > 1 && t.decoder().is_some()) {
        assert!(covered.contains(&t), "{t} has a decoder but no gguf-py row");
    }
    assert_eq!(covered.len(), 12);
}
