//! wgllm's CPU dequantisers against gguf-py's (`gguf.quants.dequantize`), bit for bit, on the
//! committed blocks of `models/goldens/quant_blocks.json` (random quants and scales, and the
//! extremes: f16 max, the smallest subnormal, negative zero and negative scales, all-zero and
//! all-one quant bits). `models/reference/make_quant_blocks.py` wrote them.

mod common;
use common::golden;
use wgllm::quant::{dequantize, kquants, WeightFormat};

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

/// wgllm's dequantiser for a GGML type name.
fn ours(format: &str, data: &[u8], n: usize) -> wgllm::Result<Vec<f32>> {
    match format {
        "Q4_0" => dequantize(WeightFormat::Q4_0, data, n),
        "Q4_1" => dequantize(WeightFormat::Q4_1, data, n),
        "Q8_0" => dequantize(WeightFormat::Q8_0, data, n),
        "Q5_0" => kquants::dequantize_q5_0(data, n),
        "Q5_1" => kquants::dequantize_q5_1(data, n),
        "Q4_K" => kquants::dequantize_q4_k(data, n),
        "Q5_K" => kquants::dequantize_q5_k(data, n),
        "Q6_K" => kquants::dequantize_q6_k(data, n),
        other => panic!("no dequantiser listed for {other}"),
    }
}

#[test]
fn every_dequantiser_equals_gguf_py_bit_for_bit() {
    let g = golden("quant_blocks.json");
    let formats = g["formats"].as_array().expect("formats");
    assert_eq!(formats.len(), 8);
    for f in formats {
        let name = f["format"].as_str().expect("format");
        let n = f["weights"].as_u64().expect("weights") as usize;
        let data = unhex(f["blocks_hex"].as_str().expect("blocks"));
        let want: Vec<u32> = unhex(f["f32_bits_hex"].as_str().expect("bits"))
            .chunks_exact(4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        assert_eq!(want.len(), n, "{name}");
        let got = ours(name, &data, n).unwrap_or_else(|e| panic!("{name}: {e}"));
        let diff: Vec<usize> = (0..n).filter(|&i| got[i].to_bits() != want[i]).collect();
        assert!(
            diff.is_empty(),
            "{name}: {} of {n} weights differ from gguf-py, first at {}: {} vs {}",
            diff.len(),
            diff[0],
            got[diff[0]],
            f32::from_bits(want[diff[0]])
        );
    }
}
