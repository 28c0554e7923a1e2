//! The HTTP layer: OpenAI's routes on axum, in front of the [`Engine`] and the [`Embedder`].
//!
//! Handlers parse the body themselves (so that malformed JSON and wrong types both answer 400 with
//! OpenAI's error object), render chat messages through the model's template, check the prompt
//! against the context, and submit to the engine; a full queue answers 503. `stream: true`
//! answers with server-sent events (`data: {chunk}` ... `data: [DONE]`). Dropping a response
//! (the client went away) drops the request's receiver, which frees its slot.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use tokio::sync::mpsc::UnboundedReceiver;

use crate::gpu::BufferClass;
use crate::model::chat::{encode_prompt, Message, RenderArgs};
use crate::sampler::SamplerConfig;
use crate::serve::api::{self, ErrorBody, ErrorDetail, UsageBody};
use crate::serve::embed::Embedder;
use crate::serve::engine::{Engine, Event, GenParams, GenRequest, SubmitError, Usage};

/// The most alternatives `top_logprobs` may ask for (OpenAI's limit).
const MAX_TOP_LOGPROBS: i64 = 20;

/// How the server answers.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// The id `/v1/models` lists and requests name (`model`).
    pub model_id: String,
    /// Other names requests may use for the model (what was given to `-m`).
    pub aliases: Vec<String>,
    /// The embedding model's id.
    pub embedding_id: String,
    /// Requests must carry `Authorization: Bearer KEY` (all routes but `/health`).
    pub api_key: Option<String>,
    /// Bodies past this many bytes are refused with 413.
    pub max_body: usize,
    /// After Ctrl-C or SIGTERM, in-flight responses may finish for this long.
    pub shutdown_grace: Duration,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            model_id: "model".into(),
            aliases: Vec::new(),
            embedding_id: "all-MiniLM-L6-v2".into(),
            api_key: None,
            max_body: 4 << 20,
            shutdown_grace: Duration::from_secs(30),
        }
    }
}

struct AppState {
    engine: Engine,
    embedder: Option<Embedder>,
    opts: ServerOptions,
    started: std::time::Instant,
    ids: AtomicU64,
    embeddings: AtomicU64,
}

/// An OpenAI-style error response.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    body: ErrorBody,
}

impl ApiError {
    fn new(status: StatusCode, kind: &str, code: Option<&str>, message: impl Into<String>) -> Self {
        ApiError {
            status,
            body: ErrorBody {
                error: ErrorDetail {
                    message: message.into(),
                    kind: kind.into(),
                    param: None,
                    code: code.map(str::to_string),
                },
            },
        }
    }
    fn invalid(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            None,
            message,
        )
    }
    fn with_param(mut self, param: &str) -> Self {
        self.body.error.param = Some(param.into());
        self
    }
    /// The HTTP status it answers with.
    pub fn status(&self) -> StatusCode {
        self.status
    }
    /// OpenAI's error object it answers with.
    pub fn body(&self) -> &ErrorBody {
        &self.body
    }
    fn server(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            None,
            message,
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body)).into_response()
    }
}

pub type ApiResult<T> = Result<T, ApiError>;

/// The routes, ready to serve.
pub fn router(engine: Engine, embedder: Option<Embedder>, opts: ServerOptions) -> Router {
    let max_body = opts.max_body;
    let state = Arc::new(AppState {
        engine,
        embedder,
        opts,
        started: std::time::Instant::now(),
        ids: AtomicU64::new(0),
        embeddings: AtomicU64::new(0),
    });
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/completions", post(completions))
        .route("/v1/embeddings", post(embeddings))
        .route("/embeddings", post(embeddings))
        .route("/v1/models", get(models))
        .route("/models", get(models))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(|| async {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                Some("not_found"),
                "no such route; wgllm serves /v1/chat/completions, /v1/completions, \
                 /v1/embeddings, /v1/models, /health and /metrics",
            )
        })
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(state)
}

/// Serves `router` on `listener` until `shutdown` completes; then in-flight responses may finish
/// for `grace`, and whatever is still open is dropped (which cancels its requests).
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    grace: Duration,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let (stopping_tx, stopping_rx) = tokio::sync::oneshot::channel::<()>();
    let server = axum::serve(listener, router).with_graceful_shutdown(async move {
        shutdown.await;
        let _ = stopping_tx.send(());
    });
    let server = std::pin::pin!(std::future::IntoFuture::into_future(server));
    let deadline = async move {
        if stopping_rx.await.is_ok() {
            tokio::time::sleep(grace).await;
            log::warn!(
                "responses still open {} s after the shutdown signal were dropped",
                grace.as_secs()
            );
        } else {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        r = server => r,
        _ = deadline => Ok(()),
    }
}

/// Completes at Ctrl-C or (on Unix) SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

impl AppState {
    fn authorize(&self, headers: &HeaderMap) -> ApiResult<()> {
        let Some(key) = &self.opts.api_key else {
            return Ok(());
        };
        let given = headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        // Compared without an early exit, so that timing tells nothing of the key.
        let matches = given.is_some_and(|g| {
            g.len() == key.len()
                && g.bytes()
                    .zip(key.bytes())
                    .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                    == 0
        });
        if matches {
            Ok(())
        } else {
            Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "authentication_error",
                Some("invalid_api_key"),
                "missing or wrong API key: send the key given to --api-key as \
                 'Authorization: Bearer KEY'",
            ))
        }
    }

    fn check_model(&self, model: Option<&str>) -> ApiResult<()> {
        match model {
            None => Ok(()),
            Some(m) if m == self.opts.model_id || self.opts.aliases.iter().any(|a| a == m) => {
                Ok(())
            }
            Some(m) => Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                Some("model_not_found"),
                format!(
                    "the model '{m}' does not exist here; this server runs '{}'",
                    self.opts.model_id
                ),
            )
            .with_param("model")),
        }
    }

    fn next_id(&self, prefix: &str) -> String {
        let n = self.ids.fetch_add(1, Ordering::Relaxed);
        format!("{prefix}-{:x}{n:06x}", unix_time())
    }

    /// The engine's parameters from a request's sampling fields ([`sampling_params`]); without a
    /// seed, each request draws its own from the clock and a counter.
    fn gen_params(
        &self,
        s: &api::Sampling,
        prompt_len: usize,
        logprobs: Option<usize>,
    ) -> ApiResult<GenParams> {
        let fallback_seed = unix_nanos() ^ self.ids.fetch_add(1, Ordering::Relaxed).rotate_left(32);
        sampling_params(
            s,
            prompt_len,
            self.engine.info.context,
            logprobs,
            fallback_seed,
        )
    }

    fn submit(&self, req: GenRequest) -> ApiResult<UnboundedReceiver<Event>> {
        self.engine.submit(req).map_err(|e| match e {
            SubmitError::QueueFull { .. } => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                Some("queue_full"),
                e.to_string(),
            ),
            SubmitError::Stopped => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                Some("shutting_down"),
                e.to_string(),
            ),
            SubmitError::Unavailable(_) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                Some("model_unavailable"),
                e.to_string(),
            ),
        })
    }
}

/// The engine's parameters from a request's sampling fields, for a prompt of `prompt_len` tokens
/// and a context of `ctx`: every field checked against its range (400 naming the field), so the
/// engine never sees a value it would have to clamp. `fallback_seed` serves a request without one.
pub fn sampling_params(
    s: &api::Sampling,
    prompt_len: usize,
    ctx: usize,
    logprobs: Option<usize>,
    fallback_seed: u64,
) -> ApiResult<GenParams> {
    if prompt_len == 0 {
        return Err(ApiError::invalid("the prompt is empty").with_param("prompt"));
    }
    if prompt_len >= ctx {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            Some("context_length_exceeded"),
            format!(
                "the prompt has {prompt_len} tokens; this model's context is {ctx} tokens \
                 (-c), which must also hold the completion"
            ),
        )
        .with_param("messages"));
    }
    let (field, max_tokens) = match (s.max_completion_tokens, s.max_tokens) {
        (Some(n), _) => ("max_completion_tokens", Some(n)),
        (None, n) => ("max_tokens", n),
    };
    let max_tokens = match max_tokens {
        None => ctx - prompt_len,
        Some(n) if n < 1 || n as u64 > ctx as u64 => {
            return Err(ApiError::invalid(format!(
                "{field} is {n}; give 1 to {ctx} (the context, -c)"
            ))
            .with_param(field))
        }
        Some(n) => n as usize,
    };
    if let Some(n) = s.n.filter(|&n| n != 1) {
        return Err(ApiError::invalid(format!(
            "n is {n}; wgllm returns one choice per request (n = 1)"
        ))
        .with_param("n"));
    }
    let defaults = SamplerConfig::default();
    let temperature = s.temperature.unwrap_or(defaults.temperature);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(
            ApiError::invalid(format!("temperature is {temperature}; give 0 to 2"))
                .with_param("temperature"),
        );
    }
    let top_p = s.top_p.unwrap_or(defaults.top_p);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(
            ApiError::invalid(format!("top_p is {top_p}; give a number in (0, 1]"))
                .with_param("top_p"),
        );
    }
    let top_k = match s.top_k {
        None => defaults.top_k,
        Some(k) if k < 0 => {
            return Err(
                ApiError::invalid(format!("top_k is {k}; give 0 (off) or more"))
                    .with_param("top_k"),
            )
        }
        Some(k) => k as usize,
    };
    for (name, v) in [
        ("presence_penalty", s.presence_penalty),
        ("frequency_penalty", s.frequency_penalty),
    ] {
        if let Some(v) = v.filter(|v| !(-2.0..=2.0).contains(v)) {
            return Err(ApiError::invalid(format!("{name} is {v}; give -2 to 2")).with_param(name));
        }
    }
    let stop = s
        .stop
        .clone()
        .map(api::OneOrMany::into_vec)
        .unwrap_or_default();
    if stop.len() > 16 {
        return Err(ApiError::invalid("stop takes at most 16 strings").with_param("stop"));
    }
    let seed = s.seed.map_or(fallback_seed, |seed| seed as u64);
    Ok(GenParams {
        max_tokens,
        sampling: SamplerConfig {
            temperature,
            top_k,
            top_p,
            presence_penalty: s.presence_penalty.unwrap_or(0.0),
            frequency_penalty: s.frequency_penalty.unwrap_or(0.0),
            seed,
            ..defaults
        },
        stop,
        logprobs,
        ignore_eos: s.ignore_eos.unwrap_or(false),
    })
}

/// The process's resident set in bytes (Linux: /proc/self/statm, in pages; elsewhere none).
pub fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf only reads a constant of the system.
    #[cfg(unix)]
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    #[cfg(not(unix))]
    let page = 4096;
    Some(pages * u64::try_from(page).ok()?)
}

fn unix_time() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn unix_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// The body as JSON of type `T`: 413 past the size limit, 400 for malformed JSON or wrong types.
fn parse_body<T: serde::de::DeserializeOwned>(body: Result<Bytes, BytesRejection>) -> ApiResult<T> {
    let body = body.map_err(|r| {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                Some("request_too_large"),
                "the request body is larger than the server accepts (--max-body)",
            )
        } else {
            ApiError::invalid(format!("could not read the request body: {r}"))
        }
    })?;
    parse_json(&body)
}

/// `body` as JSON of type `T`: 400 for malformed JSON or wrong types.
pub fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> ApiResult<T> {
    serde_json::from_slice(body).map_err(|e| {
        let what = if e.is_syntax() || e.is_eof() {
            "the body is not valid JSON"
        } else {
            "the body does not match the request's schema"
        };
        ApiError::invalid(format!("{what}: {e}"))
    })
}

/// A route that takes a JSON body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyRoute {
    Chat,
    Completions,
    Embeddings,
}

/// What [`check_body`] accepted.
#[derive(Debug)]
pub enum Checked {
    /// A generation request's parameters, and its prompt's stand-in length.
    Generate {
        params: GenParams,
        prompt_len: usize,
    },
    /// An embeddings request's inputs.
    Embed { inputs: Vec<String>, base64: bool },
}

/// The checks a body of `route` goes through before its prompt meets the model, in the handlers'
/// order and with the same functions: the parse, the messages or prompt, logprobs, then the
/// sampling fields against a context of `ctx` and a vocabulary of `vocab`. Text stands in for its
/// tokens by its length in bytes (plus one for BOS), an upper bound on what a tokenizer makes of
/// it. The fuzz target `serve_request` and `tests/fuzz_serve_regressions.rs` run bodies through
/// this.
pub fn check_body(
    route: BodyRoute,
    body: &[u8],
    ctx: usize,
    vocab: usize,
    embedding_id: &str,
) -> ApiResult<Checked> {
    let (sampling, prompt_len, logprobs) = match route {
        BodyRoute::Chat => {
            let req: api::ChatRequest = parse_json(body)?;
            let messages = chat_messages(req.messages)?;
            let logprobs = chat_logprobs(req.logprobs, req.top_logprobs)?;
            let len = messages.iter().map(|m| m.content.len() + 8).sum::<usize>() + 1;
            (req.sampling, len, logprobs)
        }
        BodyRoute::Completions => {
            let req: api::CompletionRequest = parse_json(body)?;
            let len = match completion_prompt(req.prompt, vocab)? {
                CompletionPrompt::Tokens(ids) => ids.len(),
                CompletionPrompt::Text(t) => t.len() + 1,
            };
            let logprobs = completion_logprobs_count(req.logprobs)?;
            (req.sampling, len, logprobs)
        }
        BodyRoute::Embeddings => {
            let req: api::EmbeddingRequest = parse_json(body)?;
            let (_, base64, inputs) = embedding_args(req, embedding_id)?;
            return Ok(Checked::Embed { inputs, base64 });
        }
    };
    let params = sampling_params(&sampling, prompt_len, ctx, logprobs, 0)?;
    Ok(Checked::Generate { params, prompt_len })
}

/// The whole response of a non-streaming request: text, logprobs, finish and usage.
struct Collected {
    text: String,
    logprobs: Vec<crate::serve::engine::TokenLogprobs>,
    finish: crate::serve::engine::FinishReason,
    usage: Usage,
}

async fn collect(mut rx: UnboundedReceiver<Event>) -> ApiResult<Collected> {
    let mut text = String::new();
    let mut logprobs = Vec::new();
    while let Some(ev) = rx.recv().await {
        match ev {
            Event::Token {
                text: t,
                logprobs: l,
            } => {
                text.push_str(&t);
                logprobs.extend(l);
            }
            Event::Done { finish, usage } => {
                return Ok(Collected {
                    text,
                    logprobs,
                    finish,
                    usage,
                })
            }
            Event::Error(e) => return Err(ApiError::server(e)),
        }
    }
    Err(ApiError::server(
        "the engine stopped before the response was complete",
    ))
}

/// A response of server-sent events: `head` first, then what `chunks` makes of each engine event,
/// then `data: [DONE]`.
fn sse(
    head: Vec<Value>,
    rx: UnboundedReceiver<Event>,
    mut chunks: impl FnMut(Event) -> Vec<Value> + Send + 'static,
) -> Response {
    struct St<F> {
        rx: UnboundedReceiver<Event>,
        queue: VecDeque<String>,
        done: bool,
        chunks: F,
    }
    let st = St {
        rx,
        queue: head.iter().map(Value::to_string).collect(),
        done: false,
        chunks: move |e| chunks(e),
    };
    let stream = futures_util::stream::unfold(st, |mut st| async move {
        loop {
            if let Some(data) = st.queue.pop_front() {
                return Some((Ok::<_, Infallible>(SseEvent::default().data(data)), st));
            }
            if st.done {
                return None;
            }
            let ev = st.rx.recv().await;
            let end = !matches!(ev, Some(Event::Token { .. }));
            let values = match ev {
                Some(ev) => (st.chunks)(ev),
                None => vec![error_value(
                    "the engine stopped before the response was complete",
                )],
            };
            st.queue.extend(values.iter().map(Value::to_string));
            if end {
                st.queue.push_back("[DONE]".into());
                st.done = true;
            }
        }
    });
    Sse::new(stream).into_response()
}

fn error_value(message: &str) -> Value {
    json!({"error": {"message": message, "type": "server_error", "param": null, "code": null}})
}

/// The text of a message's content: a string, or its text parts joined.
fn content_text(c: Option<api::Content>) -> ApiResult<String> {
    Ok(match c {
        None => String::new(),
        Some(api::Content::Text(s)) => s,
        Some(api::Content::Parts(parts)) => {
            let mut s = String::new();
            for p in parts {
                match (p.kind.as_str(), p.text) {
                    ("text", Some(t)) => s.push_str(&t),
                    (kind, _) => {
                        return Err(ApiError::invalid(format!(
                            "content parts of type '{kind}' are not supported (text is)"
                        ))
                        .with_param("messages"))
                    }
                }
            }
            s
        }
    })
}

/// A chat request's messages as the template takes them: at least one, text content only.
pub fn chat_messages(messages: Vec<api::ChatMessage>) -> ApiResult<Vec<Message>> {
    if messages.is_empty() {
        return Err(ApiError::invalid("messages is empty").with_param("messages"));
    }
    messages
        .into_iter()
        .map(|m| Ok(Message::new(m.role, content_text(m.content)?)))
        .collect()
}

/// Chat's `logprobs` and `top_logprobs`: the alternatives per token to report, if any.
pub fn chat_logprobs(logprobs: Option<bool>, top: Option<i64>) -> ApiResult<Option<usize>> {
    Ok(match (logprobs, top) {
        (_, Some(n)) if !(0..=MAX_TOP_LOGPROBS).contains(&n) => {
            return Err(ApiError::invalid(format!(
                "top_logprobs is {n}; give 0 to {MAX_TOP_LOGPROBS}"
            ))
            .with_param("top_logprobs"))
        }
        (Some(true), n) => Some(n.unwrap_or(0) as usize),
        (_, Some(_)) => {
            return Err(
                ApiError::invalid("top_logprobs needs logprobs: true").with_param("logprobs")
            )
        }
        _ => None,
    })
}

async fn chat(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    chat_inner(st, headers, body)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

async fn chat_inner(
    st: Arc<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    st.authorize(&headers)?;
    let req: api::ChatRequest = parse_body(body)?;
    st.check_model(req.model.as_deref())?;
    let messages = chat_messages(req.messages)?;
    // Templates run with fuel and a deadline; off the async threads all the same.
    let st2 = st.clone();
    let prompt = tokio::task::spawn_blocking(move || {
        let info = &st2.engine.info;
        let args = RenderArgs::for_tokenizer(&info.tokenizer, true);
        let text = info.chat_template.render(&messages, &args)?;
        encode_prompt(&info.tokenizer, &text)
    })
    .await
    .map_err(|e| ApiError::server(e.to_string()))?
    .map_err(|e| ApiError::invalid(e.to_string()).with_param("messages"))?;
    let logprobs = chat_logprobs(req.logprobs, req.top_logprobs)?;
    let params = st.gen_params(&req.sampling, prompt.len(), logprobs)?;
    let rx = st.submit(GenRequest { prompt, params })?;
    let id = st.next_id("chatcmpl");
    let created = unix_time();
    let model = st.opts.model_id.clone();
    if req.stream.unwrap_or(false) {
        let include_usage = req
            .stream_options
            .and_then(|o| o.include_usage)
            .unwrap_or(false);
        let chunk = move |delta: Value, logprobs: Value, finish: Value| {
            json!({
                "id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}],
            })
        };
        let head = vec![chunk(
            json!({"role": "assistant", "content": ""}),
            Value::Null,
            Value::Null,
        )];
        return Ok(sse(head, rx, move |ev| match ev {
            Event::Token { text, logprobs } => {
                if text.is_empty() && logprobs.is_none() {
                    return vec![];
                }
                let lp =
                    logprobs.map_or(Value::Null, |l| json!({"content": [api::chat_logprob(&l)]}));
                vec![chunk(json!({"content": text}), lp, Value::Null)]
            }
            Event::Done { finish, usage } => {
                let mut out = vec![chunk(json!({}), Value::Null, finish.as_str().into())];
                if include_usage {
                    let mut last = chunk(json!({}), Value::Null, Value::Null);
                    last["choices"] = json!([]);
                    last["usage"] = json!(UsageBody::from(usage));
                    out.push(last);
                }
                out
            }
            Event::Error(e) => vec![error_value(&e)],
        }));
    }
    let c = collect(rx).await?;
    let logprobs = logprobs.map_or(
        Value::Null,
        |_| json!({"content": c.logprobs.iter().map(api::chat_logprob).collect::<Vec<_>>()}),
    );
    Ok(Json(json!({
        "id": id, "object": "chat.completion", "created": created, "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": c.text},
            "logprobs": logprobs,
            "finish_reason": c.finish.as_str(),
        }],
        "usage": UsageBody::from(c.usage),
    }))
    .into_response())
}

/// Completions' `logprobs` object for some tokens, starting at `offset` bytes of the text.
fn completion_logprobs(lps: &[crate::serve::engine::TokenLogprobs], mut offset: usize) -> Value {
    let mut tokens = Vec::new();
    let mut token_logprobs = Vec::new();
    let mut top = Vec::new();
    let mut offsets = Vec::new();
    for l in lps {
        tokens.push(l.chosen.token.clone());
        token_logprobs.push(l.chosen.logprob);
        let alts: serde_json::Map<String, Value> = l
            .top
            .iter()
            .map(|t| (t.token.clone(), json!(t.logprob)))
            .collect();
        top.push(Value::Object(alts));
        offsets.push(offset);
        offset += l.chosen.token.len();
    }
    json!({"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets})
}

/// A completion's prompt: one text to tokenize, or token ids already checked against the
/// vocabulary.
#[derive(Debug)]
pub enum CompletionPrompt {
    Text(String),
    Tokens(Vec<u32>),
}

/// Completions' `prompt`: one string, or token ids below `vocab`.
pub fn completion_prompt(prompt: api::Prompt, vocab: usize) -> ApiResult<CompletionPrompt> {
    match prompt {
        api::Prompt::Tokens(ids) => {
            if let Some(bad) = ids.iter().find(|&&t| t as usize >= vocab) {
                return Err(ApiError::invalid(format!(
                    "token id {bad} is outside the vocabulary of {vocab}"
                ))
                .with_param("prompt"));
            }
            Ok(CompletionPrompt::Tokens(ids))
        }
        api::Prompt::Text(t) => {
            let mut texts = t.into_vec();
            if texts.len() != 1 {
                return Err(ApiError::invalid(format!(
                    "prompt holds {} strings; wgllm completes one prompt per request",
                    texts.len()
                ))
                .with_param("prompt"));
            }
            Ok(CompletionPrompt::Text(texts.remove(0)))
        }
    }
}

/// Completions' `logprobs`: the alternatives per token to report, if any.
pub fn completion_logprobs_count(logprobs: Option<i64>) -> ApiResult<Option<usize>> {
    match logprobs {
        None => Ok(None),
        Some(n) if (0..=MAX_TOP_LOGPROBS).contains(&n) => Ok(Some(n as usize)),
        Some(n) => Err(
            ApiError::invalid(format!("logprobs is {n}; give 0 to {MAX_TOP_LOGPROBS}"))
                .with_param("logprobs"),
        ),
    }
}

async fn completions(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    completions_inner(st, headers, body)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

async fn completions_inner(
    st: Arc<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    st.authorize(&headers)?;
    let req: api::CompletionRequest = parse_body(body)?;
    st.check_model(req.model.as_deref())?;
    let vocab = st.engine.info.tokenizer.vocab_size();
    let prompt = match completion_prompt(req.prompt, vocab)? {
        CompletionPrompt::Tokens(ids) => ids,
        CompletionPrompt::Text(text) => {
            let st2 = st.clone();
            tokio::task::spawn_blocking(move || st2.engine.info.tokenizer.encode(&text, true))
                .await
                .map_err(|e| ApiError::server(e.to_string()))?
                .map_err(|e| ApiError::invalid(e.to_string()).with_param("prompt"))?
        }
    };
    let logprobs = completion_logprobs_count(req.logprobs)?;
    let params = st.gen_params(&req.sampling, prompt.len(), logprobs)?;
    let rx = st.submit(GenRequest { prompt, params })?;
    let id = st.next_id("cmpl");
    let created = unix_time();
    let model = st.opts.model_id.clone();
    if req.stream.unwrap_or(false) {
        let include_usage = req
            .stream_options
            .and_then(|o| o.include_usage)
            .unwrap_or(false);
        let mut offset = 0;
        let chunk = move |text: String, logprobs: Value, finish: Value| {
            json!({
                "id": id, "object": "text_completion", "created": created, "model": model,
                "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}],
            })
        };
        return Ok(sse(vec![], rx, move |ev| match ev {
            Event::Token { text, logprobs } => {
                if text.is_empty() && logprobs.is_none() {
                    return vec![];
                }
                let lp = logprobs.map_or(Value::Null, |l| {
                    let v = completion_logprobs(std::slice::from_ref(&l), offset);
                    offset += l.chosen.token.len();
                    v
                });
                vec![chunk(text, lp, Value::Null)]
            }
            Event::Done { finish, usage } => {
                let mut out = vec![chunk(String::new(), Value::Null, finish.as_str().into())];
                if include_usage {
                    let mut last = chunk(String::new(), Value::Null, Value::Null);
                    last["choices"] = json!([]);
                    last["usage"] = json!(UsageBody::from(usage));
                    out.push(last);
                }
                out
            }
            Event::Error(e) => vec![error_value(&e)],
        }));
    }
    let c = collect(rx).await?;
    let logprobs = logprobs.map_or(Value::Null, |_| completion_logprobs(&c.logprobs, 0));
    Ok(Json(json!({
        "id": id, "object": "text_completion", "created": created, "model": model,
        "choices": [{
            "index": 0, "text": c.text, "logprobs": logprobs, "finish_reason": c.finish.as_str(),
        }],
        "usage": UsageBody::from(c.usage),
    }))
    .into_response())
}

/// An embeddings request's model (checked against `embedding_id`), whether it asks for base64,
/// and its inputs (1 to 2048 strings).
pub fn embedding_args(
    req: api::EmbeddingRequest,
    embedding_id: &str,
) -> ApiResult<(String, bool, Vec<String>)> {
    let model = req.model.unwrap_or_else(|| embedding_id.to_string());
    if model != embedding_id {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            Some("model_not_found"),
            format!(
                "the embedding model '{model}' does not exist here; this server embeds with \
                 '{embedding_id}'"
            ),
        )
        .with_param("model"));
    }
    let base64 = match req.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return Err(ApiError::invalid(format!(
                "encoding_format '{other}': give float or base64"
            ))
            .with_param("encoding_format"))
        }
    };
    let inputs = req.input.into_vec();
    if inputs.is_empty() || inputs.len() > 2048 {
        return Err(ApiError::invalid(format!(
            "input holds {} strings; give 1 to 2048",
            inputs.len()
        ))
        .with_param("input"));
    }
    Ok((model, base64, inputs))
}

async fn embeddings(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    embeddings_inner(st, headers, body)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

async fn embeddings_inner(
    st: Arc<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    st.authorize(&headers)?;
    let req: api::EmbeddingRequest = parse_body(body)?;
    let (model, base64, inputs) = embedding_args(req, &st.opts.embedding_id)?;
    let Some(embedder) = &st.embedder else {
        return Err(ApiError::invalid("this server has no embedding model"));
    };
    let out = embedder
        .embed(inputs)
        .await
        .map_err(|e| ApiError::server(e.to_string()))?;
    st.embeddings.fetch_add(1, Ordering::Relaxed);
    let data: Vec<Value> = out
        .vectors
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let embedding = if base64 {
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                json!(api::base64(&bytes))
            } else {
                json!(v)
            };
            json!({"object": "embedding", "index": i, "embedding": embedding})
        })
        .collect();
    Ok(Json(json!({
        "object": "list", "data": data, "model": model,
        "usage": {"prompt_tokens": out.tokens, "total_tokens": out.tokens},
    }))
    .into_response())
}

async fn models(State(st): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if let Err(e) = st.authorize(&headers) {
        return e.into_response();
    }
    let created = unix_time();
    let mut data = vec![json!({
        "id": st.opts.model_id, "object": "model", "created": created, "owned_by": "wgllm",
        "meta": {"description": st.engine.info.description, "context": st.engine.info.context,
                 "slots": st.engine.info.slots},
    })];
    if st.embedder.is_some() {
        data.push(json!({
            "id": st.opts.embedding_id, "object": "model", "created": created, "owned_by": "wgllm",
        }));
    }
    Json(json!({"object": "list", "data": data})).into_response()
}

/// 200 `{"status": "ok"}` while the model can run; 503 with the reason while it cannot (its device
/// failed, and the engine is reloading it on a new device or gave up).
async fn health(State(st): State<Arc<AppState>>) -> Response {
    match st.engine.health() {
        Ok(()) => Json(json!({"status": "ok"})).into_response(),
        Err(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "unavailable", "error": why})),
        )
            .into_response(),
    }
}

async fn metrics(State(st): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if let Err(e) = st.authorize(&headers) {
        return e.into_response();
    }
    let s = &st.engine.stats;
    let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let busy_secs = load(&s.busy_micros) as f64 / 1e6;
    let generated = load(&s.generated_tokens);
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, value: String| {
        out.push_str(&format!(
            "# HELP wgllm_{name} {help}\n# TYPE wgllm_{name} {kind}\nwgllm_{name} {value}\n"
        ));
    };
    metric(
        "requests_total",
        "counter",
        "Generation requests accepted.",
        load(&s.requests).to_string(),
    );
    metric(
        "requests_rejected_total",
        "counter",
        "Generation requests refused because the queue was full.",
        load(&s.rejected).to_string(),
    );
    metric(
        "device_recoveries_total",
        "counter",
        "Reloads of the model on a new device after its device failed.",
        load(&s.recoveries).to_string(),
    );
    metric(
        "ready",
        "gauge",
        "1 while the model can run, 0 while its device failed (reloading, or given up).",
        u8::from(st.engine.health().is_ok()).to_string(),
    );
    metric(
        "embedding_requests_total",
        "counter",
        "Embedding requests served.",
        st.embeddings.load(Ordering::Relaxed).to_string(),
    );
    metric(
        "prompt_tokens_total",
        "counter",
        "Prompt tokens of requests given a slot.",
        load(&s.prompt_tokens).to_string(),
    );
    metric(
        "prompt_tokens_cached_total",
        "counter",
        "Prompt tokens served from a slot's cache.",
        load(&s.cached_tokens).to_string(),
    );
    metric(
        "tokens_generated_total",
        "counter",
        "Tokens generated.",
        generated.to_string(),
    );
    metric(
        "busy_seconds_total",
        "counter",
        "Time spent in steps that ran the model.",
        format!("{busy_secs:.6}"),
    );
    metric(
        "tokens_per_second",
        "gauge",
        "Tokens generated per second of busy time, over all slots.",
        format!("{:.3}", generated as f64 / busy_secs.max(1e-9)),
    );
    metric(
        "steps_total",
        "counter",
        "Scheduling steps that ran the model.",
        load(&s.steps).to_string(),
    );
    metric(
        "queue_length",
        "gauge",
        "Requests waiting for a slot.",
        s.queued.load(Ordering::SeqCst).to_string(),
    );
    metric(
        "slots_busy",
        "gauge",
        "Slots generating for a request.",
        s.busy_slots.load(Ordering::SeqCst).to_string(),
    );
    metric(
        "slots_total",
        "gauge",
        "Sequence slots (--parallel).",
        st.engine.info.slots.to_string(),
    );
    metric(
        "uptime_seconds",
        "gauge",
        "Seconds since the server started.",
        format!("{:.1}", st.started.elapsed().as_secs_f64()),
    );
    let (kernels, compile_secs) = st.engine.device().current().1.kernels_compiled();
    metric(
        "kernels_compiled",
        "gauge",
        "Compute pipelines compiled on the device so far (the warm-up compiles the batched \
         decode's for every row count before the server reports ready).",
        kernels.to_string(),
    );
    metric(
        "kernel_compile_seconds_total",
        "counter",
        "Time spent compiling compute pipelines on the device.",
        format!("{compile_secs:.6}"),
    );
    if let Some(rss) = resident_bytes() {
        metric(
            "process_resident_bytes",
            "gauge",
            "The server process's resident host memory (RSS), from /proc/self/statm.",
            rss.to_string(),
        );
    }
    let report = st.engine.ledger_report();
    out.push_str(
        "# HELP wgllm_vram_bytes GPU buffer bytes held now, per class (the VRAM ledger).\n\
         # TYPE wgllm_vram_bytes gauge\n",
    );
    for c in BufferClass::ALL {
        out.push_str(&format!(
            "wgllm_vram_bytes{{class=\"{}\"}} {}\n",
            c.name(),
            report.class(c).current_bytes
        ));
    }
    out.push_str(
        "# HELP wgllm_vram_peak_bytes GPU buffer bytes held at most, per class.\n\
         # TYPE wgllm_vram_peak_bytes gauge\n",
    );
    for c in BufferClass::ALL {
        out.push_str(&format!(
            "wgllm_vram_peak_bytes{{class=\"{}\"}} {}\n",
            c.name(),
            report.class(c).peak_bytes
        ));
    }
    if let Some(b) = report.budget_bytes {
        out.push_str(&format!(
            "# HELP wgllm_vram_budget_bytes The ledger's budget (--budget).\n\
             # TYPE wgllm_vram_budget_bytes gauge\nwgllm_vram_budget_bytes {b}\n"
        ));
    }
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        out,
    )
        .into_response()
}
