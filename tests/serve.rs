//! `wgllm serve` end to end: the server runs in-process on a free port with the real SmolLM2 (and
//! all-MiniLM-L6-v2 for embeddings) and the tests talk HTTP to it. Greedy results are compared
//! with `model::generate::generate` (what `wgllm run --temp 0` runs), embeddings with the encoder
//! run directly; errors are checked for OpenAI's error object and followed by a request that
//! still works. Few tokens and small contexts keep it quick on lavapipe.
mod common;
use common::*;

use std::io::BufRead;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use wgllm::kernels::attention::KvDtype;
use wgllm::model::llama::RunOptions;
use wgllm::serve::http::ServerOptions;

const MODEL: &str = "smollm2-135m";
const KEY: &str = "test-key-31";

/// A server on 127.0.0.1 and its thread; dropping it stops the server.
struct Server {
    base: String,
    key: Option<String>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run_options(ctx: usize, parallel: usize) -> RunOptions {
    RunOptions {
        ctx,
        kv_dtype: KvDtype::F16,
        chunk: 64,
        all_logits: false,
        resident_layers: None,
        parallel,
    }
}

struct Config {
    parallel: usize,
    ctx: usize,
    max_queue: usize,
    api_key: Option<String>,
    max_body: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            parallel: 2,
            ctx: 256,
            max_queue: 16,
            api_key: None,
            max_body: 1 << 20,
        }
    }
}

fn start(c: Config) -> Option<Server> {
    let gpu = gpu()?;
    let path = packaged_model(&wgllm::fetch::SMOLLM2)?;
    packaged_model(&wgllm::fetch::MINILM)?;
    let opts = run_options(c.ctx, c.parallel);
    let engine = wgllm::serve::Engine::start(
        gpu,
        wgllm::serve::EngineOptions {
            max_queue: c.max_queue,
            chunk: opts.chunk,
            warm_up: true,
        },
        move |g| wgllm::model::load::load_batch_lm(g, &path, None, opts.clone()),
    )
    .expect("start the engine");
    let embedder = wgllm::serve::embed::Embedder::start(gpu, None).expect("embedder");
    let router = wgllm::serve::http::router(
        engine,
        Some(embedder),
        ServerOptions {
            model_id: MODEL.into(),
            api_key: c.api_key.clone(),
            max_body: c.max_body,
            shutdown_grace: Duration::from_secs(5),
            ..Default::default()
        },
    );
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.set_nonblocking(true).unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            wgllm::serve::http::serve(listener, router, Duration::from_secs(5), async {
                let _ = stopped.await;
            })
            .await
            .unwrap();
        });
    });
    Some(Server {
        base,
        key: c.api_key,
        stop: Some(stop),
        thread: Some(thread),
    })
}

/// Requests whose 4xx and 5xx are answers to check, not errors.
fn post_to(url: String) -> ureq::RequestBuilder<ureq::typestate::WithBody> {
    ureq::post(url)
        .config()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(600)))
        .build()
}

fn get_from(url: String) -> ureq::RequestBuilder<ureq::typestate::WithoutBody> {
    ureq::get(url)
        .config()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(600)))
        .build()
}

impl Server {
    fn post_raw(&self, path: &str, body: &str, key: Option<&str>) -> (u16, String) {
        let mut req =
            post_to(format!("{}{path}", self.base)).header("content-type", "application/json");
        if let Some(k) = key {
            req = req.header("authorization", format!("Bearer {k}"));
        }
        let mut resp = req.send(body).expect("POST");
        let status = resp.status().as_u16();
        (status, resp.body_mut().read_to_string().expect("body"))
    }
    /// POST with the server's key; the status and the JSON body.
    fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let (status, text) = self.post_raw(path, &body.to_string(), self.key.as_deref());
        let v = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
        (status, v)
    }
    fn ok(&self, path: &str, body: &Value) -> Value {
        let (status, v) = self.post(path, body);
        assert_eq!(status, 200, "{path}: {v}");
        v
    }
    fn get(&self, path: &str) -> (u16, String) {
        let mut req = get_from(format!("{}{path}", self.base));
        if let Some(k) = &self.key {
            req = req.header("authorization", format!("Bearer {k}"));
        }
        let mut resp = req.call().expect("GET");
        let status = resp.status().as_u16();
        (status, resp.body_mut().read_to_string().unwrap())
    }
    /// A streaming POST: the response's `data:` payloads as they arrive.
    fn stream(&self, path: &str, body: &Value) -> SseReader {
        let mut req =
            post_to(format!("{}{path}", self.base)).header("content-type", "application/json");
        if let Some(k) = &self.key {
            req = req.header("authorization", format!("Bearer {k}"));
        }
        let resp = req.send(body.to_string()).expect("POST");
        assert_eq!(resp.status().as_u16(), 200);
        let ct = resp.headers()["content-type"].to_str().unwrap().to_string();
        assert!(ct.starts_with("text/event-stream"), "{ct}");
        SseReader {
            lines: std::io::BufReader::new(resp.into_body().into_reader()),
        }
    }
    /// All payloads of a streaming POST, `[DONE]` last.
    fn stream_all(&self, path: &str, body: &Value) -> Vec<String> {
        let mut r = self.stream(path, body);
        let mut out = Vec::new();
        while let Some(d) = r.next_data() {
            out.push(d);
        }
        assert_eq!(out.last().map(String::as_str), Some("[DONE]"));
        out
    }
    /// One value of `/metrics`.
    fn metric(&self, name: &str) -> f64 {
        let (status, text) = self.get("/metrics");
        assert_eq!(status, 200);
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {text}"))
    }
    fn wait_metric(&self, name: &str, want: f64) {
        let t = Instant::now();
        while self.metric(name) != want {
            assert!(
                t.elapsed() < Duration::from_secs(300),
                "{name} never reached {want}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

struct SseReader {
    lines: std::io::BufReader<ureq::BodyReader<'static>>,
}

impl SseReader {
    fn next_data(&mut self) -> Option<String> {
        loop {
            let mut line = String::new();
            if self.lines.read_line(&mut line).ok()? == 0 {
                return None;
            }
            if let Some(d) = line.trim_end().strip_prefix("data: ") {
                return Some(d.to_string());
            }
        }
    }
}

/// The JSON chunks of a stream (without `[DONE]`).
fn chunks(data: &[String]) -> Vec<Value> {
    data.iter()
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str(d).unwrap())
        .collect()
}

/// The model in this process, for reference results.
struct Reference {
    lm: wgllm::model::load::LoadedLm,
}

impl Reference {
    fn load() -> Reference {
        let path = packaged_model(&wgllm::fetch::SMOLLM2).unwrap();
        let lm = wgllm::model::load::load_lm(gpu().unwrap(), &path, None, run_options(256, 1))
            .expect("load SmolLM2");
        Reference { lm }
    }

    /// Greedy `generate` of `prompt` ids: the text (without the end-of-turn token) and the
    /// tokens generated (with it, as the server counts them).
    fn greedy(&mut self, prompt: &[u32], n: usize) -> (String, usize) {
        let lm = &mut self.lm;
        let mut sampler = wgllm::sampler::Sampler::new(wgllm::sampler::SamplerConfig {
            temperature: 0.0,
            ..Default::default()
        });
        let (ids, _) = wgllm::model::generate::generate(
            lm.model.as_mut(),
            gpu().unwrap(),
            &lm.tokenizer,
            prompt,
            n,
            &mut sampler,
            &mut |_| true,
        )
        .unwrap();
        let text_ids: Vec<u32> = ids
            .iter()
            .copied()
            .filter(|&t| !lm.tokenizer.is_stop(t))
            .collect();
        (lm.tokenizer.decode(&text_ids).unwrap(), ids.len())
    }
    fn text_ids(&self, text: &str) -> Vec<u32> {
        self.lm.tokenizer.encode(text, true).unwrap()
    }
    fn chat_ids(&self, messages: &[(&str, &str)]) -> Vec<u32> {
        use wgllm::model::chat::{encode_prompt, Message, RenderArgs};
        let msgs: Vec<Message> = messages.iter().map(|(r, c)| Message::new(*r, *c)).collect();
        let args = RenderArgs::for_tokenizer(&self.lm.tokenizer, true);
        let text = self.lm.chat_template.render(&msgs, &args).unwrap();
        encode_prompt(&self.lm.tokenizer, &text).unwrap()
    }
}

/// The server every route test shares (and the `openai` client test).
fn shared() -> Option<&'static Server> {
    static S: OnceLock<Option<Server>> = OnceLock::new();
    S.get_or_init(|| {
        start(Config {
            parallel: 2,
            ..Default::default()
        })
    })
    .as_ref()
}

fn assert_openai_error(v: &Value, kind: &str) {
    let e = &v["error"];
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    assert_eq!(e["type"], kind, "{v}");
    assert!(e.get("param").is_some() && e.get("code").is_some(), "{v}");
}

#[test]
fn every_route_answers_streaming_and_not() {
    let Some(s) = shared() else { return };
    let (status, health) = s.get("/health");
    assert_eq!((status, health.contains("ok")), (200, true));
    let (status, models) = s.get("/v1/models");
    assert_eq!(status, 200);
    let models: Value = serde_json::from_str(&models).unwrap();
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [MODEL, "all-MiniLM-L6-v2"]);

    // Chat: the stream's deltas add up to the non-streamed message; usage agrees; the greedy
    // reply is `generate`'s.
    let question = "What is the capital of France?";
    let body = json!({"model": MODEL, "messages": [{"role": "user", "content": question}],
                      "max_tokens": 6, "temperature": 0, "logprobs": true, "top_logprobs": 3});
    let whole = s.ok("/v1/chat/completions", &body);
    assert_eq!(whole["object"], "chat.completion");
    let choice = &whole["choices"][0];
    let content = choice["message"]["content"].as_str().unwrap();
    let mut r = Reference::load();
    let (want, n) = {
        let ids = r.chat_ids(&[("user", question)]);
        r.greedy(&ids, 6)
    };
    assert_eq!(content, want);
    assert_eq!(whole["usage"]["completion_tokens"], n);
    assert_eq!(
        choice["finish_reason"],
        if n < 6 { "stop" } else { "length" }
    );
    // Greedy picks the most likely token: each token's logprob is its first alternative's.
    let lps = choice["logprobs"]["content"].as_array().unwrap();
    assert!(!lps.is_empty());
    for lp in lps {
        let top = lp["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 3);
        assert_eq!(lp["logprob"], top[0]["logprob"], "{lp}");
        assert!(top[0]["logprob"].as_f64().unwrap() >= top[1]["logprob"].as_f64().unwrap());
        assert!(lp["logprob"].as_f64().unwrap() <= 0.0);
    }
    let mut sbody = body.clone();
    sbody["stream"] = json!(true);
    sbody["stream_options"] = json!({"include_usage": true});
    let data = s.stream_all("/v1/chat/completions", &sbody);
    let cs = chunks(&data);
    assert!(cs.iter().all(|c| c["object"] == "chat.completion.chunk"));
    assert_eq!(cs[0]["choices"][0]["delta"]["role"], "assistant");
    let streamed: String = cs
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(streamed, content);
    let usage = &cs.last().unwrap()["usage"];
    assert_eq!(
        usage["completion_tokens"],
        whole["usage"]["completion_tokens"]
    );
    assert_eq!(usage["prompt_tokens"], whole["usage"]["prompt_tokens"]);
    let finish = &cs[cs.len() - 2]["choices"][0]["finish_reason"];
    assert_eq!(finish, &choice["finish_reason"]);

    // Completions, streamed and not, with a stop string.
    let body = json!({"model": MODEL, "prompt": "One, two, three, four,", "max_tokens": 8,
                      "temperature": 0});
    let whole = s.ok("/v1/completions", &body);
    assert_eq!(whole["object"], "text_completion");
    let text = whole["choices"][0]["text"].as_str().unwrap().to_string();
    let (want, _) = {
        let ids = r.text_ids("One, two, three, four,");
        r.greedy(&ids, 8)
    };
    assert_eq!(text, want);
    let mut sbody = body.clone();
    sbody["stream"] = json!(true);
    let streamed: String = chunks(&s.stream_all("/v1/completions", &sbody))
        .iter()
        .filter_map(|c| c["choices"][0]["text"].as_str().map(str::to_string))
        .collect();
    assert_eq!(streamed, text);
    // A stop string: the text ends before its first occurrence.
    if text.contains(',') {
        let mut stop = body.clone();
        stop["stop"] = json!([","]);
        let first = text.split(',').next().unwrap();
        let v = s.ok("/v1/completions", &stop);
        assert_eq!(v["choices"][0]["text"], first);
        assert_eq!(v["choices"][0]["finish_reason"], "stop");
    }

    // Embeddings: floats and base64 agree, and equal the encoder run directly.
    let sentences = ["A cat sits on the mat.", "Stock markets fell sharply."];
    let v = s.ok(
        "/v1/embeddings",
        &json!({"model": "all-MiniLM-L6-v2", "input": sentences}),
    );
    let got: Vec<Vec<f32>> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| serde_json::from_value(d["embedding"].clone()).unwrap())
        .collect();
    let b = s.ok(
        "/v1/embeddings",
        &json!({"input": sentences[0], "encoding_format": "base64"}),
    );
    let b64 = b["data"][0]["embedding"].as_str().unwrap();
    let decoded = decode_base64(b64);
    let from_b64: Vec<f32> = decoded
        .chunks(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(from_b64, got[0]);
    let dir = packaged_model(&wgllm::fetch::MINILM).unwrap();
    let hf = wgllm::loader::safetensors::HfModel::open(&dir).unwrap();
    let cfg = wgllm::model::config::ModelConfig::from_hf_json(hf.config()).unwrap();
    let tok = wgllm::tokenizer::Tokenizer::from_file(&dir.join("tokenizer.json")).unwrap();
    let mut bert = wgllm::model::bert::Bert::load(
        gpu().unwrap(),
        cfg,
        &wgllm::model::source::Source::Hf(&hf, None),
        64,
    )
    .unwrap();
    for (s, g) in sentences.iter().zip(&got) {
        let want = bert
            .embed(gpu().unwrap(), &tok.encode(s, true).unwrap())
            .unwrap();
        assert_close("embedding", g, &want, tol::NMSE_F32 * 100.0);
    }

    // Metrics: Prometheus text with the counters and the ledger's classes.
    let (status, m) = s.get("/metrics");
    assert_eq!(status, 200);
    for name in [
        "wgllm_requests_total",
        "wgllm_tokens_generated_total",
        "wgllm_tokens_per_second",
        "wgllm_queue_length",
        "wgllm_slots_busy",
        "wgllm_vram_bytes{class=\"kv-cache\"}",
    ] {
        assert!(m.contains(&format!("\n{name} ")), "{name} missing:\n{m}");
    }
    assert!(s.metric("wgllm_requests_total") >= 5.0);
    assert!(s.metric("wgllm_vram_bytes{class=\"parameters\"}") > 50e6);
}

fn decode_base64(s: &str) -> Vec<u8> {
    let val = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        _ => 63,
    } as u32;
    let mut out = Vec::new();
    for q in s.as_bytes().chunks(4) {
        let pad = q.iter().filter(|&&c| c == b'=').count();
        let n = q
            .iter()
            .fold(0u32, |n, &c| (n << 6) | if c == b'=' { 0 } else { val(c) });
        let bytes = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        out.extend_from_slice(&bytes[..3 - pad]);
    }
    out
}

/// Each bad request gets its 4xx and OpenAI's error object, and a good request after it works.
#[test]
fn bad_requests_get_openai_errors_and_the_server_keeps_serving() {
    let Some(s) = start(Config {
        parallel: 1,
        ctx: 128,
        max_queue: 1,
        api_key: Some(KEY.into()),
        max_body: 16 << 10,
    }) else {
        return;
    };
    let good = json!({"model": MODEL, "prompt": "Hello", "max_tokens": 2, "temperature": 0});
    let still_serves = || {
        let v = s.ok("/v1/completions", &good);
        assert_eq!(v["usage"]["completion_tokens"], 2);
    };
    let cases: Vec<(&str, String, Option<&str>, u16, &str)> = vec![
        (
            "no key",
            good.to_string(),
            None,
            401,
            "authentication_error",
        ),
        (
            "wrong key",
            good.to_string(),
            Some("nope"),
            401,
            "authentication_error",
        ),
        (
            "malformed JSON",
            "{\"prompt\": \"Hel".into(),
            Some(KEY),
            400,
            "invalid_request_error",
        ),
        (
            "wrong type",
            json!({"prompt": "Hi", "max_tokens": "many"}).to_string(),
            Some(KEY),
            400,
            "invalid_request_error",
        ),
        (
            "unknown model",
            json!({"model": "gpt-17", "prompt": "Hi"}).to_string(),
            Some(KEY),
            404,
            "invalid_request_error",
        ),
        (
            "negative max_tokens",
            json!({"prompt": "Hi", "max_tokens": -3}).to_string(),
            Some(KEY),
            400,
            "invalid_request_error",
        ),
        (
            "absurd max_tokens",
            json!({"prompt": "Hi", "max_tokens": 1_000_000_000u64}).to_string(),
            Some(KEY),
            400,
            "invalid_request_error",
        ),
        (
            "prompt past the context",
            json!({"prompt": "one two three ".repeat(60)}).to_string(),
            Some(KEY),
            400,
            "invalid_request_error",
        ),
        (
            "body over the limit",
            json!({"prompt": "x".repeat(40 << 10)}).to_string(),
            Some(KEY),
            413,
            "invalid_request_error",
        ),
    ];
    for (what, body, key, status, kind) in cases {
        let (got, text) = s.post_raw("/v1/completions", &body, key);
        assert_eq!(got, status, "{what}: {text}");
        let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_openai_error(&v, kind);
        still_serves();
    }
    // Chat's own: messages of the wrong type.
    let (status, v) = s.post("/v1/chat/completions", &json!({"messages": "hi"}));
    assert_eq!(status, 400);
    assert_openai_error(&v, "invalid_request_error");
    let (status, _) = s.get("/v1/models");
    assert_eq!(status, 200);
    still_serves();

    // Queue full, then cancellation. The one slot generates for a stream that never ends on its
    // own; one request waits in the queue; the next is refused with 503.
    let mut long = s.stream(
        "/v1/completions",
        &json!({"prompt": "Once upon a time", "max_tokens": 100, "temperature": 0,
                "ignore_eos": true, "stream": true}),
    );
    long.next_data().expect("a first token");
    s.wait_metric("wgllm_slots_busy", 1.0);
    let generated_before = s.metric("wgllm_tokens_generated_total");
    let waiting = {
        let base = s.base.clone();
        let body = good.to_string();
        std::thread::spawn(move || {
            let mut resp = post_to(format!("{base}/v1/completions"))
                .header("authorization", format!("Bearer {KEY}"))
                .send(body)
                .unwrap();
            (
                resp.status().as_u16(),
                resp.body_mut().read_to_string().unwrap(),
            )
        })
    };
    s.wait_metric("wgllm_queue_length", 1.0);
    let (status, v) = s.post("/v1/completions", &good);
    assert_eq!(status, 503, "{v}");
    assert_openai_error(&v, "server_error");
    assert_eq!(v["error"]["code"], "queue_full");
    // The streaming client goes away: its slot serves the waiting request, then frees.
    drop(long);
    let (status, text) = waiting.join().unwrap();
    assert_eq!(status, 200, "{text}");
    s.wait_metric("wgllm_slots_busy", 0.0);
    s.wait_metric("wgllm_queue_length", 0.0);
    // The stream stopped well before its 100 tokens.
    let generated = s.metric("wgllm_tokens_generated_total") - generated_before;
    assert!(generated < 60.0, "{generated} tokens after the client left");
    still_serves();
}

/// Eight greedy requests at once on eight slots equal the same requests one at a time (which
/// reuse the cached prompts) and `generate`, token for token; seeded sampling repeats alone and
/// in a batch; the next turn of a chat reuses the cache and answers as `generate` does.
#[test]
fn batched_greedy_equals_serial_and_generate_seeds_repeat_and_prompts_are_reused() {
    let Some(s) = start(Config {
        parallel: 8,
        ctx: 256,
        ..Default::default()
    }) else {
        return;
    };
    let s = &s;
    let prompts = [
        "The capital of France is",
        "Water boils at",
        "My favourite colour is",
        "In 1492, Columbus",
        "def fibonacci(n):",
        "Roses are red,",
        "Photosynthesis converts",
        "To make a cup of tea,",
    ];
    let n = 6;
    let body = |p: &str| json!({"model": MODEL, "prompt": p, "max_tokens": n, "temperature": 0});
    let text_of = |v: &Value| v["choices"][0]["text"].as_str().unwrap().to_string();
    let batched: Vec<Value> = std::thread::scope(|sc| {
        let handles: Vec<_> = prompts
            .iter()
            .map(|p| sc.spawn(move || s.ok("/v1/completions", &body(p))))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let serial: Vec<Value> = prompts
        .iter()
        .map(|p| s.ok("/v1/completions", &body(p)))
        .collect();
    let mut r = Reference::load();
    for ((p, b), one) in prompts.iter().zip(&batched).zip(&serial) {
        let ids = r.text_ids(p);
        let (want, count) = r.greedy(&ids, n);
        assert_eq!(text_of(b), want, "batched: {p}");
        assert_eq!(text_of(one), want, "serial: {p}");
        assert_eq!(b["usage"]["completion_tokens"], count);
        assert_eq!(b["usage"]["prompt_tokens"], ids.len());
        // The serial run found its prompt in the slot the batched run left.
        assert_eq!(
            one["usage"]["prompt_tokens_details"]["cached_tokens"],
            ids.len() - 1,
            "{p}"
        );
    }

    // Seeded sampling: the same seed gives the same text alone and beside other requests.
    let seeded = json!({"prompt": "Once upon a time", "max_tokens": n, "temperature": 1.0,
                        "top_p": 0.95, "seed": 1234, "ignore_eos": true});
    let alone = text_of(&s.ok("/v1/completions", &seeded));
    let in_batch: Vec<String> = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..4)
            .map(|i| {
                let mut b = seeded.clone();
                if i % 2 == 1 {
                    b["seed"] = json!(99 + i);
                    b["prompt"] = json!(prompts[i]);
                }
                sc.spawn(move || text_of(&s.ok("/v1/completions", &b)))
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(in_batch[0], alone);
    assert_eq!(in_batch[2], alone);

    // A conversation's second turn reuses the first turn's cache and answers as a fresh run.
    let q1 = "Name a fruit.";
    let turn1 = s.ok(
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": q1}], "max_tokens": n, "temperature": 0}),
    );
    let a1 = turn1["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    let q2 = "And a vegetable?";
    let turn2 = s.ok(
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": q1}, {"role": "assistant", "content": a1},
                             {"role": "user", "content": q2}],
                "max_tokens": n, "temperature": 0}),
    );
    let first_turn_tokens = turn1["usage"]["prompt_tokens"].as_u64().unwrap();
    let cached = turn2["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap();
    assert!(cached >= first_turn_tokens, "{cached} cached: {turn2}");
    let ids = r.chat_ids(&[("user", q1), ("assistant", &a1), ("user", q2)]);
    let (want, _) = r.greedy(&ids, n);
    assert_eq!(turn2["choices"][0]["message"]["content"], want.as_str());
}

/// The official `openai` Python client against the server: chat (streaming and not),
/// completions, embeddings and models (tests/openai_client.py).
#[test]
fn the_openai_python_client_works_unchanged() {
    let Some(s) = shared() else { return };
    let ci = std::env::var("CI").is_ok_and(|v| v == "true");
    let has_openai = std::process::Command::new("python3")
        .args(["-c", "import openai"])
        .status()
        .is_ok_and(|st| st.success());
    if !has_openai {
        assert!(
            !ci,
            "CI=true but python3 cannot import openai (python3 -m pip install openai)"
        );
        eprintln!("SKIPPED: python3 cannot import openai");
        return;
    }
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/openai_client.py");
    let out = std::process::Command::new("python3")
        .arg(script)
        .arg(format!("{}/v1", s.base))
        .output()
        .expect("run python3");
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "openai_client.py failed:\n{log}");
    assert!(log.contains("all checks passed"), "{log}");
}

/// `wgllm chat`: greedy replies equal `generate`'s for the conversation so far, the second turn
/// reuses the first turn's cache, and after `/reset` the first question gets its first answer.
#[test]
fn wgllm_chat_keeps_the_cache_across_turns_and_resets() {
    if gpu().is_none() || packaged_model(&wgllm::fetch::SMOLLM2).is_none() {
        return;
    }
    use std::io::Write;
    let (q1, q2, n) = ("Name a fruit.", "And a vegetable?", 6);
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_wgllm"))
        .args(["chat", "-m", MODEL, "-c", "256", "--temp", "0", "-n"])
        .arg(n.to_string())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run wgllm chat");
    write!(
        child.stdin.take().unwrap(),
        "{q1}\n{q2}\n/reset\n{q1}\n/exit\n"
    )
    .unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let replies: Vec<&str> = stdout
        .split("> ")
        .map(|r| r.trim_end_matches('\n'))
        .filter(|r| !r.is_empty())
        .collect();
    assert_eq!(replies.len(), 3, "{stdout}");
    // "[P prompt tokens, C from the cache; ...]" per turn.
    let cached: Vec<usize> = stderr
        .lines()
        .filter_map(|l| l.split(" prompt tokens, ").nth(1))
        .filter_map(|l| l.split(' ').next()?.parse().ok())
        .collect();
    assert_eq!(cached.len(), 3, "{stderr}");
    let mut r = Reference::load();
    let first = r.chat_ids(&[("user", q1)]);
    assert_eq!(replies[0], r.greedy(&first, n).0);
    let second = r.chat_ids(&[("user", q1), ("assistant", replies[0]), ("user", q2)]);
    assert_eq!(replies[1], r.greedy(&second, n).0);
    assert_eq!(replies[2], replies[0]);
    assert!(cached[1] >= first.len(), "{stderr}");
}

/// Serving needs sequence slots: an encoder is refused with a typed error before any weight loads.
#[test]
fn a_model_without_slots_is_refused_by_name() {
    let Some(gpu) = gpu() else { return };
    let Some(dir) = packaged_model(&wgllm::fetch::MINILM) else {
        return;
    };
    let e = wgllm::model::load::load_batch_lm(gpu, &dir, None, run_options(64, 2))
        .err()
        .expect("BERT has no slots");
    assert!(matches!(e, wgllm::Error::BadFile { .. }), "{e:?}");
    assert!(e.to_string().contains("no sequence slots"), "{e}");
}
