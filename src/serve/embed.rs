//! Sentence embeddings for `/v1/embeddings`: a BERT encoder on its own worker thread (so a long
//! batch of inputs never stalls the decode steps), loaded on the first request. Given the engine's
//! [`crate::serve::engine::SharedDevice`], it follows the engine to a new device after a recovery
//! (the encoder is loaded again there), and reports a device failure it meets to the engine.

use std::path::PathBuf;
use std::sync::mpsc;

use tokio::sync::oneshot;

use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::model::bert::Bert;
use crate::serve::engine::{is_device_fault, DeviceSource};
use crate::tokenizer::Tokenizer;

/// Sequences per encoder pass.
const BATCH: usize = 8;

/// The embeddings of a request's inputs and the tokens they took.
#[derive(Debug, Clone)]
pub struct Embeddings {
    pub vectors: Vec<Vec<f32>>,
    pub tokens: usize,
}

struct Job {
    inputs: Vec<String>,
    reply: oneshot::Sender<Result<Embeddings>>,
}

/// The embedding worker. Dropping it stops the thread.
pub struct Embedder {
    jobs: Option<mpsc::Sender<Job>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Embedder {
    /// Starts the worker for the encoder at `model` (a directory or a `wgllm models` name;
    /// `None`: all-MiniLM-L6-v2), which is found, fetched if needed, and loaded on first use.
    /// `device` is a fixed device (`Arc<Gpu>`, `&'static Gpu`) or the engine's
    /// ([`crate::serve::Engine::device`]), which the worker follows.
    pub fn start(device: impl DeviceSource, model: Option<PathBuf>) -> Result<Embedder> {
        let (tx, rx) = mpsc::channel::<Job>();
        let thread = std::thread::Builder::new()
            .name("wgllm-embed".into())
            .spawn(move || {
                // The encoder and the generation of the device it is loaded on.
                let mut encoder: Option<(u64, Encoder)> = None;
                for job in rx {
                    let (generation, gpu) = device.device();
                    if encoder.as_ref().is_some_and(|(g, _)| *g != generation) {
                        log::info!("the device was replaced; loading the embedding model again");
                        encoder = None;
                    }
                    if encoder.is_none() {
                        match Encoder::load(&gpu, model.as_deref()) {
                            Ok(e) => encoder = Some((generation, e)),
                            Err(e) => {
                                if is_device_fault(&e) {
                                    device.report_lost(generation, e.to_string());
                                }
                                let _ = job.reply.send(Err(e));
                                continue;
                            }
                        }
                    }
                    if let Some((_, enc)) = encoder.as_mut() {
                        let out = enc.embed(&gpu, &job.inputs);
                        if let Err(e) = &out {
                            if is_device_fault(e) {
                                device.report_lost(generation, e.to_string());
                                encoder = None;
                            }
                        }
                        let _ = job.reply.send(out);
                    }
                }
            })
            .map_err(|e| Error::invalid("serve", format!("starting the embedding worker: {e}")))?;
        Ok(Embedder {
            jobs: Some(tx),
            thread: Some(thread),
        })
    }

    /// The embeddings of `inputs`, in order.
    pub async fn embed(&self, inputs: Vec<String>) -> Result<Embeddings> {
        let (reply, rx) = oneshot::channel();
        let stopped = || Error::invalid("embeddings", "the embedding worker has stopped");
        self.jobs
            .as_ref()
            .ok_or_else(stopped)?
            .send(Job { inputs, reply })
            .map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
    }
}

impl Drop for Embedder {
    fn drop(&mut self) {
        self.jobs.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The loaded encoder and its tokenizer.
struct Encoder {
    bert: Bert,
    tokenizer: Tokenizer,
}

impl Encoder {
    fn load(gpu: &Gpu, model: Option<&std::path::Path>) -> Result<Encoder> {
        let mut log = |s: &str| log::info!("{s}");
        let dir = match model {
            Some(p) => crate::model::load::resolve(Some(p), &mut log)?,
            None => crate::fetch::MINILM.ensure(&mut log)?,
        };
        let hf = crate::loader::safetensors::HfModel::open(&dir)?;
        let cfg = crate::model::config::ModelConfig::from_hf_json(hf.config())?;
        let mut tokenizer = Tokenizer::from_file(&dir.join("tokenizer.json"))?;
        // Cut where sentence-transformers cuts, as `wgllm embed` does; never past the positions.
        let max_len = crate::model::bert::sentence_max_length(&dir)
            .unwrap_or(cfg.max_positions)
            .min(cfg.max_positions);
        tokenizer.set_max_length(Some(max_len))?;
        let src = crate::model::source::Source::Hf(&hf, None);
        let bert = Bert::load_batch(gpu, cfg, &src, BATCH, max_len)?;
        log::info!("embedding model {} loaded", dir.display());
        Ok(Encoder { bert, tokenizer })
    }

    fn embed(&mut self, gpu: &Gpu, inputs: &[String]) -> Result<Embeddings> {
        let ids = inputs
            .iter()
            .map(|s| self.tokenizer.encode(s, true))
            .collect::<Result<Vec<_>>>()?;
        let seqs: Vec<&[u32]> = ids.iter().map(Vec::as_slice).collect();
        Ok(Embeddings {
            vectors: self.bert.embed_batch(gpu, &seqs)?,
            tokens: ids.iter().map(Vec::len).sum(),
        })
    }
}
