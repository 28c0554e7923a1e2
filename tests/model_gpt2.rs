//! GPT-2 on the GPU against the independent numpy reference (`models/reference/gpt2_ref.py`) on a
//! tiny deterministic random model (vocab 96, 64 positions, n_embd 64, 2 layers, 4 heads), which
//! both sides build from the same integer-hash formula and this test writes as `config.json` +
//! `model.safetensors` into a temporary directory. Checked: the weights themselves (per-tensor sums
//! in the golden), logits of a whole-sequence prefill, of a chunked prefill and of token-by-token
//! decode through the KV cache (max abs diff <= [F32_LOGITS]), the greedy continuation token for
//! token, quantised runs (`--precision` f16 / q8_0 / q4_0, looser bounds), the `transformer.`
//! prefix, and typed errors for configs or tensors that do not fit.

mod common;

use common::TempModel;

use serde_json::Value;
use wgllm::loader::HfModel;
use wgllm::model::config::ModelConfig;
use wgllm::model::gpt2::{transpose, Gpt2};
use wgllm::model::llama::RunOptions;
use wgllm::model::source::Source;
use wgllm::quant::WeightFormat;
use wgllm::{Error, Gpu};

/// f32 weights and activations against the float64 reference: max |logit diff| (logits have
/// std 2.3). Measured on lavapipe: 7e-6, the size of the golden's 6-significant-digit rounding.
const F32_LOGITS: f32 = 1e-3;
/// Weights stored as f16, q8_0 and q4_0 (every matrix, embeddings and the tied head included)
/// against the float64 reference on the unquantised weights: `(max |logit diff|, NMSE)`. Measured
/// on lavapipe: f16 4.6e-3 / 3.5e-7, q8_0 8.4e-2 / 1.2e-4, q4_0 1.6 / 3.2e-2 (uniform random
/// weights quantise worse than trained ones). The tight check of the quantised paths is
/// `quantised_weights_match_their_dequantised_f32_copy`.
const F16_LOGITS: (f32, f64) = (1.5e-2, 1e-5);
const Q8_0_LOGITS: (f32, f64) = (0.25, 5e-4);
const Q4_0_LOGITS: (f32, f64) = (4.0, 0.1);
/// A quantised run against the f32 run of the same weights dequantised on the CPU: only the
/// kernels' summation order differs.
const QUANT_VS_DEQUANT: f32 = 1e-4;

const VOCAB: usize = 96;
const N_POS: usize = 64;
const D: usize = 64;
const N_LAYER: usize = 2;

/// The weight formula of gpt2_ref.py: element `j` of tensor number `t`, uniform in [-1, 1).
fn uniform(t: u64, j: u64) -> f64 {
    let m = 0xFFFF_FFFFu64;
    let mut x = (j * 2654435761 + t * 40503 + 12345) & m;
    x ^= x >> 15;
    x = (x * 2246822519) & m;
    x ^= x >> 13;
    x = (x * 3266489917) & m;
    x ^= x >> 16;
    2.0 * (x as f64 / 4294967296.0) - 1.0
}

/// `(name, HF shape, scale, offset)` in tensor-number order, as gpt2_ref.py's `tensor_list`.
fn tensor_list() -> Vec<(String, Vec<usize>, f64, f64)> {
    let f = 4 * D;
    let mut v = vec![
        ("wte.weight".to_string(), vec![VOCAB, D], 0.5, 0.0),
        ("wpe.weight".to_string(), vec![N_POS, D], 0.5, 0.0),
    ];
    let layer: [(&str, &[usize], f64, f64); 12] = [
        ("ln_1.weight", &[D], 0.2, 1.0),
        ("ln_1.bias", &[D], 0.1, 0.0),
        ("attn.c_attn.weight", &[D, 3 * D], 0.25, 0.0),
        ("attn.c_attn.bias", &[3 * D], 0.1, 0.0),
        ("attn.c_proj.weight", &[D, D], 0.2, 0.0),
        ("attn.c_proj.bias", &[D], 0.05, 0.0),
        ("ln_2.weight", &[D], 0.2, 1.0),
        ("ln_2.bias", &[D], 0.1, 0.0),
        ("mlp.c_fc.weight", &[D, f], 0.25, 0.0),
        ("mlp.c_fc.bias", &[f], 0.1, 0.0),
        ("mlp.c_proj.weight", &[f, D], 0.4, 0.0),
        ("mlp.c_proj.bias", &[D], 0.05, 0.0),
    ];
    for i in 0..N_LAYER {
        v.extend(
            layer
                .iter()
                .map(|(n, s, sc, off)| (format!("h.{i}.{n}"), s.to_vec(), *sc, *off)),
        );
    }
    v.push(("ln_f.weight".into(), vec![D], 0.2, 1.0));
    v.push(("ln_f.bias".into(), vec![D], 0.1, 0.0));
    v
}

/// `(name, shape, values)` of the tiny model.
type Tensors = Vec<(String, Vec<usize>, Vec<f32>)>;

fn tiny_weights() -> Tensors {
    tensor_list()
        .into_iter()
        .enumerate()
        .map(|(t, (name, shape, scale, offset))| {
            let n: usize = shape.iter().product();
            let w = (0..n)
                .map(|j| (offset + scale * uniform(t as u64, j as u64)) as f32)
                .collect();
            (name, shape, w)
        })
        .collect()
}

fn golden() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/models/goldens/gpt2_tiny.json");
    serde_json::from_str(&std::fs::read_to_string(path).expect("read the golden"))
        .expect("golden JSON")
}

fn prompt(g: &Value) -> Vec<u32> {
    g["prompt"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect()
}

fn golden_logits(g: &Value) -> Vec<Vec<f32>> {
    let rows = g["logits"].as_array().unwrap();
    rows.iter()
        .map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap() as f32)
                .collect()
        })
        .collect()
}

/// Writes `config.json` (the golden's, edited by `edit_cfg`) and `model.safetensors` (names with
/// `prefix`, tensors edited by `edit_w`) into a fresh temporary directory, removed on drop.
fn write_model(
    name: &str,
    prefix: &str,
    edit_cfg: impl FnOnce(&mut Value),
    edit_w: impl FnOnce(&mut Tensors),
) -> TempModel {
    let mut cfg = golden()["config"].clone();
    edit_cfg(&mut cfg);
    let mut w = tiny_weights();
    edit_w(&mut w);
    let w: Vec<_> = w
        .into_iter()
        .map(|(n, s, v)| (format!("{prefix}{n}"), s, v))
        .collect();
    common::write_hf_model(&format!("gpt2-{name}"), &cfg, &w)
}

fn opts(chunk: usize, all_logits: bool) -> RunOptions {
    RunOptions {
        ctx: 2048,
        chunk,
        all_logits,
        ..Default::default()
    }
}

fn load(
    gpu: &Gpu,
    dir: &TempModel,
    precision: Option<WeightFormat>,
    o: RunOptions,
) -> wgllm::Result<Gpt2> {
    let hf = HfModel::open(&dir.0)?;
    let cfg = ModelConfig::from_hf_json(hf.config())?;
    Gpt2::load(gpu, cfg, &Source::Hf(&hf, precision), o)
}

fn max_diff(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len(), "logit count");
    got.iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max)
}

fn argmax(v: &[f32]) -> u32 {
    // First maximum: ties go to the lowest id, as np.argmax.
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

#[test]
fn weights_match_the_reference_formula() {
    let g = golden();
    for (name, _, w) in tiny_weights() {
        let want = g["weight_sums"][&name]
            .as_f64()
            .unwrap_or_else(|| panic!("no sum for {name}"));
        let got: f64 = w.iter().map(|&v| v as f64).sum();
        assert!(
            (got - want).abs() <= 1e-7 + 1e-9 * want.abs(),
            "{name}: sum {got} vs golden {want}"
        );
    }
}

#[test]
fn transpose_swaps_rows_and_columns() {
    let w = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]; // 2 x 3
    assert_eq!(transpose(&w, 2, 3), [1.0, 4.0, 2.0, 5.0, 3.0, 6.0]);
    assert_eq!(transpose(&transpose(&w, 2, 3), 3, 2), w);
}

#[test]
fn prefill_matches_golden() {
    let Some(gpu) = common::gpu() else { return };
    let g = golden();
    let (toks, want) = (prompt(&g), golden_logits(&g).concat());
    let dir = write_model("prefill", "", |_| {}, |_| {});
    // One chunk (tiled attention, matmul), then chunks of 5 (5 + 5 + 2 tokens).
    for chunk in [64, 5] {
        let mut m = load(gpu, &dir, None, opts(chunk, true)).unwrap();
        let got = m.forward(gpu, &toks, 0).unwrap();
        let e = max_diff(&got, &want);
        eprintln!("f32 prefill, chunk {chunk}: max |logit diff| {e:.3e}");
        assert!(
            e <= F32_LOGITS,
            "f32 prefill chunk {chunk}: max |diff| {e:.3e} > {F32_LOGITS:.0e}"
        );
    }
}

#[test]
fn decode_through_the_kv_cache_matches_golden() {
    let Some(gpu) = common::gpu() else { return };
    let g = golden();
    let (toks, want) = (prompt(&g), golden_logits(&g));
    let dir = write_model("decode", "", |_| {}, |_| {});
    let mut m = load(gpu, &dir, None, opts(64, false)).unwrap();
    let mut worst = 0f32;
    for (i, &t) in toks.iter().enumerate() {
        let got = m.forward(gpu, &[t], i).unwrap();
        worst = worst.max(max_diff(&got, &want[i]));
    }
    eprintln!("f32 decode: max |logit diff| {worst:.3e}");
    assert!(
        worst <= F32_LOGITS,
        "f32 decode: max |diff| {worst:.3e} > {F32_LOGITS:.0e}"
    );
}

/// Prefill, then greedy decode of as many tokens as the golden has.
fn greedy(gpu: &Gpu, m: &mut Gpt2, toks: &[u32], n: usize) -> Vec<u32> {
    let mut out = vec![argmax(&m.forward(gpu, toks, 0).unwrap())];
    while out.len() < n {
        let pos = toks.len() + out.len() - 1;
        out.push(argmax(&m.forward(gpu, &out[out.len() - 1..], pos).unwrap()));
    }
    out
}

#[test]
fn greedy_continuation_matches_golden() {
    let Some(gpu) = common::gpu() else { return };
    let g = golden();
    let want: Vec<u32> = g["greedy"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    let dir = write_model("greedy", "", |_| {}, |_| {});
    let mut m = load(gpu, &dir, None, opts(64, false)).unwrap();
    assert_eq!(greedy(gpu, &mut m, &prompt(&g), want.len()), want);
}

#[test]
fn quantised_runs_stay_close() {
    let Some(gpu) = common::gpu() else { return };
    let g = golden();
    let (toks, want) = (prompt(&g), golden_logits(&g).concat());
    let dir = write_model("quant", "", |_| {}, |_| {});
    for (f, tol) in [
        (WeightFormat::F16, F16_LOGITS),
        (WeightFormat::Q8_0, Q8_0_LOGITS),
        (WeightFormat::Q4_0, Q4_0_LOGITS),
    ] {
        let mut m = load(gpu, &dir, Some(f), opts(64, true)).unwrap();
        assert_eq!(m.weights.layers[0].wq.format, f, "c_attn uploaded as {f}");
        assert_eq!(m.weights.wte.format, f, "wte uploaded as {f}");
        let got = m.forward(gpu, &toks, 0).unwrap();
        let (e, n) = (max_diff(&got, &want), common::nmse(&got, &want));
        eprintln!("{f} prefill: max |logit diff| {e:.3e}, NMSE {n:.3e}");
        assert!(
            e <= tol.0 && n <= tol.1,
            "{f}: max |diff| {e:.3e}, NMSE {n:.3e}; bounds {tol:?}"
        );
    }
}

/// The tiny model with every matrix replaced by its `f` round trip, quantised along the input
/// dimension as the loader does: rows of `wte`/`wpe`, columns of the Conv1D `[in, out]` weights.
fn dequantised(f: WeightFormat) -> Tensors {
    // Rows of `cols` values through quantize + dequantize.
    let rt = |w: &[f32], cols: usize| -> Vec<f32> {
        let q = |r: &[f32]| {
            wgllm::quant::quantize(f, r).and_then(|b| wgllm::quant::dequantize(f, &b, cols))
        };
        w.chunks(cols).flat_map(|r| q(r).unwrap()).collect()
    };
    let mut w = tiny_weights();
    for (name, shape, v) in w.iter_mut() {
        if let [a, b] = shape[..] {
            *v = if name.starts_with("h.") {
                transpose(&rt(&transpose(v, a, b), a), b, a)
            } else {
                rt(v, b)
            };
        }
    }
    w
}

#[test]
fn quantised_weights_match_their_dequantised_f32_copy() {
    let Some(gpu) = common::gpu() else { return };
    let toks = prompt(&golden());
    let dir = write_model("q-direct", "", |_| {}, |_| {});
    for f in [WeightFormat::Q8_0, WeightFormat::Q4_0] {
        let deq = dequantised(f);
        let dq_dir = write_model(&format!("deq-{f}"), "", |_| {}, |w| *w = deq);
        let want = load(gpu, &dq_dir, None, opts(64, true))
            .unwrap()
            .forward(gpu, &toks, 0)
            .unwrap();
        let got = load(gpu, &dir, Some(f), opts(64, true))
            .unwrap()
            .forward(gpu, &toks, 0)
            .unwrap();
        let e = max_diff(&got, &want);
        eprintln!("{f} vs its dequantised f32 copy: max |logit diff| {e:.3e}");
        assert!(
            e <= QUANT_VS_DEQUANT,
            "{f}: max |diff| {e:.3e} > {QUANT_VS_DEQUANT:.0e}"
        );
    }
}

#[test]
fn transformer_prefix_is_accepted() {
    let Some(gpu) = common::gpu() else { return };
    let g = golden();
    let want = golden_logits(&g);
    let dir = write_model("prefix", "transformer.", |_| {}, |_| {});
    let mut m = load(gpu, &dir, None, opts(64, false)).unwrap();
    let e = max_diff(
        &m.forward(gpu, &prompt(&g), 0).unwrap(),
        &want[want.len() - 1],
    );
    assert!(e <= F32_LOGITS, "prefixed checkpoint: max |diff| {e:.3e}");
}

#[test]
fn mismatched_configs_and_tensors_give_typed_errors() {
    let Some(gpu) = common::gpu() else { return };
    // A config claiming n_embd 128 over 64-wide tensors: refused on the first tensor.
    let dir = write_model("wide", "", |c| c["n_embd"] = 128.into(), |_| {});
    match load(gpu, &dir, None, opts(64, false)) {
        Err(Error::TensorShape {
            tensor,
            expected,
            got,
            ..
        }) => {
            assert_eq!(tensor, "wte.weight");
            assert!(
                expected.contains("128") && got.contains("64"),
                "{expected} / {got}"
            );
        }
        other => panic!("n_embd 128: expected TensorShape, got {:?}", other.err()),
    }
    // One layer more than the file has.
    let dir = write_model("deep", "", |c| c["n_layer"] = 3.into(), |_| {});
    match load(gpu, &dir, None, opts(64, false)) {
        Err(Error::MissingTensor { tensor, .. }) => assert!(tensor.starts_with("h.2."), "{tensor}"),
        other => panic!("n_layer 3: expected MissingTensor, got {:?}", other.err()),
    }
    // c_fc stored in nn.Linear orientation ([4d, d]) instead of Conv1D's [d, 4d].
    let dir = write_model(
        "linear",
        "",
        |_| {},
        |w| {
            let t = w.iter_mut().find(|t| t.0 == "h.1.mlp.c_fc.weight").unwrap();
            t.2 = transpose(&t.2, D, 4 * D);
            t.1 = vec![4 * D, D];
        },
    );
    match load(gpu, &dir, None, opts(64, false)) {
        Err(Error::TensorShape { tensor, .. }) => assert_eq!(tensor, "h.1.mlp.c_fc.weight"),
        other => panic!(
            "transposed c_fc: expected TensorShape, got {:?}",
            other.err()
        ),
    }
    // An unsupported activation and a config that is not GPT-2 at all.
    let dir = write_model(
        "relu",
        "",
        |c| c["activation_function"] = "relu".into(),
        |_| {},
    );
    assert!(matches!(
        load(gpu, &dir, None, opts(64, false)),
        Err(Error::ConfigInvalid { .. })
    ));
    let hf = HfModel::open(&dir.0).unwrap();
    let llama = ModelConfig::preset("smollm2-135m").unwrap();
    let r = Gpt2::load(gpu, llama, &Source::Hf(&hf, None), opts(64, false));
    assert!(
        matches!(r, Err(Error::InvalidArgument { .. })),
        "{:?}",
        r.err()
    );
    // The context is capped at n_positions (64): position 64 has no learned embedding.
    let dir = write_model("ctx", "", |_| {}, |_| {});
    let mut m = load(gpu, &dir, None, opts(64, false)).unwrap();
    assert_eq!(m.opts.ctx, N_POS);
    assert!(matches!(
        m.forward(gpu, &[1], N_POS),
        Err(Error::ContextFull { ctx: 64, .. })
    ));
    assert!(matches!(
        m.forward(gpu, &[VOCAB as u32], 0),
        Err(Error::InvalidArgument { .. })
    ));
}
