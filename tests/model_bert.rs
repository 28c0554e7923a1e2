//! all-MiniLM-L6-v2 sentence embeddings on the GPU against the committed golden
//! (`models/goldens/minilm_embeddings.json`, an f64 numpy reference): token ids, per-sentence
//! cosine to the golden embedding, the 4x4 cosine matrix, a Q8_0-quantised load, a batch of
//! sentences in one pass against one at a time, and refusals.
mod common;
use common::*;

use std::path::PathBuf;

use serde_json::Value;
use wgllm::loader::safetensors::HfModel;
use wgllm::model::bert::{cosine, mean_pool, Bert};
use wgllm::model::config::ModelConfig;
use wgllm::model::source::Source;
use wgllm::quant::WeightFormat;
use wgllm::tokenizer::Tokenizer;

/// f32 GPU arithmetic against the f64 reference: cosine to each golden embedding.
const MIN_COSINE_F32: f32 = 0.9999;
/// Every matrix Q8_0 (including the word embeddings): cosine to each golden embedding.
const MIN_COSINE_Q8_0: f32 = 0.99;
/// Entries of the 4x4 cosine matrix.
const COSINE_MATRIX_ABS: f32 = 1e-3;

struct Golden {
    texts: Vec<String>,
    ids: Vec<Vec<u32>>,
    embeddings: Vec<Vec<f32>>,
    cosine: Vec<Vec<f32>>,
}

fn golden() -> Golden {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/models/goldens/minilm_embeddings.json"
    );
    let g: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let f32s = |v: &Value| -> Vec<f32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect()
    };
    let sentences = g["sentences"].as_array().unwrap();
    Golden {
        texts: sentences
            .iter()
            .map(|s| s["text"].as_str().unwrap().to_string())
            .collect(),
        ids: sentences
            .iter()
            .map(|s| {
                s["ids"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_u64().unwrap() as u32)
                    .collect()
            })
            .collect(),
        embeddings: sentences.iter().map(|s| f32s(&s["embedding"])).collect(),
        cosine: g["cosine"].as_array().unwrap().iter().map(f32s).collect(),
    }
}

/// The model directory (fetched if missing); `None` (a printed skip) if it cannot be had, except
/// under CI=true, where that fails.
fn model_dir() -> Option<PathBuf> {
    match wgllm::fetch::MINILM.ensure(&mut |s| eprintln!("{s}")) {
        Ok(p) => Some(p),
        Err(e) if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!("CI=true but MiniLM is unavailable: {e}")
        }
        Err(e) => {
            eprintln!("SKIPPED: all-MiniLM-L6-v2 unavailable ({e})");
            None
        }
    }
}

fn load(
    gpu: &wgllm::Gpu,
    dir: &PathBuf,
    precision: Option<WeightFormat>,
    max_tokens: usize,
) -> Bert {
    let hf = HfModel::open(dir).unwrap();
    let cfg = ModelConfig::from_hf_json(hf.config()).unwrap();
    Bert::load(gpu, cfg, &Source::Hf(&hf, precision), max_tokens).unwrap()
}

/// Embeds the golden sentences (from the golden ids) and returns them with the minimum cosine to
/// the golden embeddings.
fn embed_all(gpu: &wgllm::Gpu, bert: &mut Bert, g: &Golden) -> (Vec<Vec<f32>>, f32) {
    let embs: Vec<Vec<f32>> = g
        .ids
        .iter()
        .map(|ids| bert.embed(gpu, ids).unwrap())
        .collect();
    let min = embs
        .iter()
        .zip(&g.embeddings)
        .map(|(e, w)| cosine(e, w))
        .fold(f32::INFINITY, f32::min);
    (embs, min)
}

#[test]
fn tokenizer_ids_match_golden() {
    let Some(dir) = model_dir() else { return };
    let g = golden();
    let tok = Tokenizer::from_file(&dir.join("tokenizer.json")).unwrap();
    for (text, want) in g.texts.iter().zip(&g.ids) {
        assert_eq!(&tok.encode(text, true).unwrap(), want, "ids of {text:?}");
    }
}

#[test]
fn embeddings_match_golden() {
    let (Some(gpu), Some(dir)) = (gpu(), model_dir()) else {
        return;
    };
    let g = golden();
    let mut bert = load(gpu, &dir, None, 32);
    assert!(bert.normalize, "modules.json lists Normalize");
    let (embs, min) = embed_all(gpu, &mut bert, &g);
    eprintln!(
        "f32: minimum cosine to the golden embeddings {min:.7} (1 - cos = {:.1e})",
        1.0 - min
    );
    let diff = embs
        .iter()
        .zip(&g.embeddings)
        .map(|(e, w)| max_abs_diff(e, w));
    eprintln!(
        "f32: largest |embedding - golden| {:.1e}",
        diff.fold(0.0, f32::max)
    );
    for (i, e) in embs.iter().enumerate() {
        let c = cosine(e, &g.embeddings[i]);
        assert!(
            c >= MIN_COSINE_F32,
            "sentence {i}: cosine {c} < {MIN_COSINE_F32}"
        );
        let norm = e.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5, "sentence {i}: norm {norm}");
    }
    let mut worst = 0f32;
    for (i, a) in embs.iter().enumerate() {
        for (j, b) in embs.iter().enumerate() {
            let err = (cosine(a, b) - g.cosine[i][j]).abs();
            worst = worst.max(err);
            assert!(err <= COSINE_MATRIX_ABS, "cosine[{i}][{j}] off by {err}");
        }
    }
    eprintln!("f32: largest cosine-matrix error {worst:.2e}");
}

#[test]
fn q8_0_embeddings_stay_close() {
    let (Some(gpu), Some(dir)) = (gpu(), model_dir()) else {
        return;
    };
    let g = golden();
    let mut bert = load(gpu, &dir, Some(WeightFormat::Q8_0), 32);
    let (_, min) = embed_all(gpu, &mut bert, &g);
    eprintln!(
        "q8_0: minimum cosine to the golden embeddings {min:.7} (1 - cos = {:.1e})",
        1.0 - min
    );
    assert!(
        min >= MIN_COSINE_Q8_0,
        "q8_0 cosine {min} < {MIN_COSINE_Q8_0}"
    );
}

#[test]
fn bad_input_is_refused() {
    let (Some(gpu), Some(dir)) = (gpu(), model_dir()) else {
        return;
    };
    // Asking for more than max_positions (512) caps there.
    let mut bert = load(gpu, &dir, None, 100_000);
    assert_eq!(bert.max_tokens, 512);
    let too_long = vec![101u32; 513];
    let e = bert.embed(gpu, &too_long).unwrap_err();
    assert!(
        matches!(
            e,
            wgllm::Error::ContextFull {
                ctx: 512,
                needed: 513
            }
        ),
        "{e}"
    );
    let e = bert.embed(gpu, &[]).unwrap_err();
    assert!(matches!(e, wgllm::Error::InvalidArgument { .. }), "{e}");
    let e = bert.embed(gpu, &[101, 30522, 102]).unwrap_err();
    assert!(matches!(e, wgllm::Error::InvalidArgument { .. }), "{e}");
    // A smaller capacity refuses past it too.
    let mut small = load(gpu, &dir, None, 4);
    let e = small.embed(gpu, &[101, 1996, 4633, 2003, 102]).unwrap_err();
    assert!(
        matches!(e, wgllm::Error::ContextFull { ctx: 4, needed: 5 }),
        "{e}"
    );
    // Up to the capacity it runs, and embed is the normalised mean of hidden_states.
    let ids = [101, 1996, 4633, 102];
    let hidden = small.hidden_states(gpu, &ids).unwrap();
    assert_eq!(hidden.len(), ids.len() * 384);
    let emb = small.embed(gpu, &ids).unwrap();
    assert_close(
        "embed = pooled hidden states",
        &emb,
        &mean_pool(&hidden, 384, true),
        0.0,
    );
}

/// A batch in one pass gives each sentence what it gives alone: the four golden sentences (8 to 14
/// tokens, so the shorter ones are padded to the longest) in one pass of 4, in passes of 3 and 1,
/// and with a wider slot than needed. Each attends to its own rows only; padding is never seen.
#[test]
fn batched_embeddings_match_one_sentence_at_a_time() {
    let (Some(gpu), Some(dir)) = (gpu(), model_dir()) else {
        return;
    };
    let g = golden();
    let mut one = load(gpu, &dir, None, 32);
    let (alone, _) = embed_all(gpu, &mut one, &g);
    let seqs: Vec<&[u32]> = g.ids.iter().map(|v| v.as_slice()).collect();
    let hf = HfModel::open(&dir).unwrap();
    // The subgroup attention, and the tiled and row kernels of a device without subgroups.
    let plain = wgllm::Gpu::new(&wgllm::GpuOptions {
        no_subgroups: true,
        ..Default::default()
    })
    .unwrap();
    for (dev, batch, max_tokens) in [(gpu, 4, 14), (gpu, 3, 32), (gpu, 8, 100), (&plain, 4, 14)] {
        let cfg = ModelConfig::from_hf_json(hf.config()).unwrap();
        let mut b = Bert::load_batch(dev, cfg, &Source::Hf(&hf, None), batch, max_tokens).unwrap();
        let got = b.embed_batch(dev, &seqs).unwrap();
        assert_eq!(got.len(), 4);
        for (i, (e, a)) in got.iter().zip(&alone).enumerate() {
            let d = max_abs_diff(e, a);
            assert!(d <= 1e-5, "batch {batch}: sentence {i} off by {d:.2e}");
            let c = cosine(e, &g.embeddings[i]);
            assert!(
                c >= MIN_COSINE_F32,
                "batch {batch}: sentence {i}: cosine {c}"
            );
        }
        // Hidden states come back per sentence, unpadded.
        let h = b.hidden_states_batch(dev, &seqs).unwrap();
        let lens: Vec<usize> = h.iter().map(|x| x.len() / 384).collect();
        assert_eq!(lens, [8, 9, 8, 14]);
    }
    // One bad sequence refuses the batch before anything runs.
    let mut b = Bert::load_batch(
        gpu,
        ModelConfig::from_hf_json(hf.config()).unwrap(),
        &Source::Hf(&hf, None),
        2,
        10,
    )
    .unwrap();
    let e = b.embed_batch(gpu, &seqs).unwrap_err();
    assert!(
        matches!(
            e,
            wgllm::Error::ContextFull {
                ctx: 10,
                needed: 14
            }
        ),
        "{e}"
    );
    let e = b.embed_batch(gpu, &[]).unwrap_err();
    assert!(matches!(e, wgllm::Error::InvalidArgument { .. }), "{e}");
    let e = b.embed_batch(gpu, &[&[101, 102], &[]]).unwrap_err();
    assert!(matches!(e, wgllm::Error::InvalidArgument { .. }), "{e}");
}

#[test]
fn cosine_of_simple_vectors() {
    assert!((cosine(&[1.0, 2.0], &[2.0, 4.0]) - 1.0).abs() < 1e-7);
    assert_eq!(cosine(&[1.0, 0.0], &[0.0, 3.0]), 0.0);
    assert!((cosine(&[1.0, 0.0], &[-1.0, 0.0]) + 1.0).abs() < 1e-7);
    assert_eq!(cosine(&[0.0, 0.0], &[1.0, 0.0]), 0.0);
    assert_eq!(mean_pool(&[1.0, 2.0, 3.0, 4.0], 2, false), vec![2.0, 3.0]);
    assert_eq!(mean_pool(&[3.0, 0.0, 3.0, 8.0], 2, true), vec![0.6, 0.8]);
}

/// sentence-transformers cuts MiniLM input at 256 tokens (sentence_bert_config.json), not at the
/// 128 its tokenizer.json says; wgllm follows sentence-transformers.
#[test]
fn sentence_length_follows_sentence_transformers() {
    let Some(dir) = common::packaged_model(&wgllm::fetch::MINILM) else {
        return;
    };
    assert_eq!(wgllm::model::bert::sentence_max_length(&dir), Some(256));
    let mut tok = wgllm::tokenizer::Tokenizer::from_file(&dir.join("tokenizer.json")).unwrap();
    let text = vec!["word"; 300].join(" ");
    tok.set_max_length(Some(256)).unwrap();
    assert_eq!(tok.encode(&text, true).unwrap().len(), 256);
    tok.set_max_length(None).unwrap();
    assert_eq!(tok.encode(&text, true).unwrap().len(), 302);
}
