//! `wgllm serve`: the OpenAI-compatible HTTP server (`wgllm::serve`).

use std::sync::Arc;

use anyhow::{Context, Result};
use wgllm::gpu::ledger::parse_bytes;

use super::load::{auto_model_plan, parse_precision, resident_layers};
use super::{Global, ModelArgs};

#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// Address to listen on; 127.0.0.1 serves this machine only. 0.0.0.0 serves the network:
    /// give --api-key then.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Sequences decoded together, each in its own KV-cache slot of -c positions.
    #[arg(long, default_value_t = 4)]
    parallel: usize,
    /// Requests that may wait while every slot is busy; past it, 503.
    #[arg(long, default_value_t = 64)]
    max_queue: usize,
    /// The encoder for /v1/embeddings: a Hugging Face BERT directory or a name from
    /// `wgllm models` (default: all-MiniLM-L6-v2, loaded on the first request).
    #[arg(long)]
    embedding_model: Option<std::path::PathBuf>,
    /// Requests must send `Authorization: Bearer KEY` (every route but /health).
    #[arg(long)]
    api_key: Option<String>,
    /// Largest request body, e.g. 4MiB.
    #[arg(long, default_value = "4MiB", value_parser = parse_size)]
    max_body: u64,
    /// Seconds in-flight responses may take to finish after Ctrl-C or SIGTERM.
    #[arg(long, default_value_t = 30)]
    shutdown_timeout: u64,
    /// Start serving without first compiling the batched decode's kernels for every number of
    /// busy slots (faster start; the first steps with a new number of slots pay the compile).
    #[arg(long)]
    no_warm_up: bool,
}

fn parse_size(s: &str) -> Result<u64, String> {
    parse_bytes(s).map_err(|e| e.to_string())
}

/// The names a request may give for the model: what `-m` named (or the default model's id),
/// and the file's name with and without its extension.
fn model_names(given: Option<&std::path::Path>, path: &std::path::Path) -> (String, Vec<String>) {
    let id = match given {
        Some(p) => p.display().to_string(),
        None => wgllm::fetch::SMOLLM2.id.to_string(),
    };
    let mut aliases = Vec::new();
    for name in [path.file_name(), path.file_stem()].into_iter().flatten() {
        let name = name.to_string_lossy().into_owned();
        if name != id && !aliases.contains(&name) {
            aliases.push(name);
        }
    }
    (id, aliases)
}

pub(crate) fn run(a: Args, g: &Global) -> Result<()> {
    let local = matches!(a.host.as_str(), "127.0.0.1" | "localhost" | "::1");
    if !local && a.api_key.is_none() {
        eprintln!(
            "warning: serving on {} without --api-key: anyone who reaches this address can use it",
            a.host
        );
    }
    let gpu = Arc::new(g.gpu()?);
    let engine = start_engine(&gpu, &a.model, a.parallel, a.max_queue, !a.no_warm_up)?;
    let path = wgllm::model::load::resolve(a.model.model.as_deref(), &mut |s| eprintln!("{s}"))?;
    let (model_id, aliases) = model_names(a.model.model.as_deref(), &path);
    let embedder =
        wgllm::serve::embed::Embedder::start(engine.device(), a.embedding_model.clone())?;
    let embedding_id = match &a.embedding_model {
        Some(p) => p.display().to_string(),
        None => "all-MiniLM-L6-v2".to_string(),
    };
    let opts = wgllm::serve::http::ServerOptions {
        model_id: model_id.clone(),
        aliases,
        embedding_id,
        api_key: a.api_key.clone(),
        max_body: a.max_body as usize,
        shutdown_grace: std::time::Duration::from_secs(a.shutdown_timeout),
    };
    let grace = opts.shutdown_grace;
    let router = wgllm::serve::http::router(engine, Some(embedder), opts);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        let addr = format!("{}:{}", a.host, a.port);
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .with_context(|| format!("listening on {addr}"))?;
        eprintln!(
            "serving '{model_id}' with {} slot(s) on http://{}/v1 (Ctrl-C stops)",
            a.parallel.max(1),
            listener.local_addr()?
        );
        wgllm::serve::http::serve(
            listener,
            router,
            grace,
            wgllm::serve::http::shutdown_signal(),
        )
        .await
        .context("serving")?;
        eprintln!("stopped");
        anyhow::Ok(())
    })
}

/// Loads the model at `m` with `parallel` slots on the engine's thread.
pub(crate) fn start_engine(
    gpu: &Arc<wgllm::Gpu>,
    m: &ModelArgs,
    parallel: usize,
    max_queue: usize,
    warm_up: bool,
) -> Result<wgllm::serve::Engine> {
    use wgllm::model::llama::RunOptions;
    let path = wgllm::model::load::resolve(m.model.as_deref(), &mut |s| eprintln!("{s}"))?;
    // Without -c the context follows the model, as `wgllm run`'s.
    let m = &ModelArgs {
        ctx: Some(match m.ctx {
            Some(c) => c,
            None => wgllm::model::load::default_ctx(&wgllm::model::load::config_of(&path)?),
        }),
        ..m.clone()
    };
    let precision = m.precision.as_deref().map(parse_precision).transpose()?;
    let opts = RunOptions {
        ctx: m.ctx(),
        kv_dtype: wgllm::kernels::attention::KvDtype::parse(&m.kv)?,
        chunk: m.chunk.max(1),
        all_logits: false,
        resident_layers: resident_layers(gpu, m, || auto_model_plan(gpu, m, &path, false))?,
        parallel: parallel.max(1),
    };
    let engine_opts = wgllm::serve::EngineOptions {
        max_queue: max_queue.max(1),
        chunk: opts.chunk,
        warm_up,
    };
    let t = std::time::Instant::now();
    let load_path = path.clone();
    let engine = wgllm::serve::Engine::start(gpu.clone(), engine_opts, move |gpu| {
        wgllm::model::load::load_batch_lm(gpu, &load_path, precision, opts.clone())
    })
    .with_context(|| format!("loading {}", path.display()))?;
    let (kernels, compile_secs) = engine.device().current().1.kernels_compiled();
    eprintln!(
        "loaded {} in {:.1} s on {} ({} slot(s) of {} positions; {kernels} kernels compiled in \
         {compile_secs:.1} s)",
        engine.info.description,
        t.elapsed().as_secs_f64(),
        gpu.info.name,
        engine.info.slots,
        engine.info.context
    );
    Ok(engine)
}
