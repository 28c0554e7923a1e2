//! The server's request checks (`wgllm::serve::http::check_body`): the JSON parse of chat,
//! completions and embeddings bodies, their messages, prompts and logprobs, and every sampling
//! field against the context. Half the inputs are raw bytes (malformed JSON, deep nesting, odd
//! escapes); the other half are requests built field by field from the input, each field either
//! of its type or of a wrong one, so the fuzzer reaches the range checks behind the parse.
//!
//! Whatever the body, the checks must not panic, and what they accept must be in range: a
//! generation that fits the context, sampling values the engine uses as they are.

#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;
use serde_json::{json, Map, Value};
use wgllm::serve::http::{check_body, BodyRoute, Checked};

/// A value for a field: usually of the field's type, sometimes anything.
#[derive(Arbitrary, Debug)]
enum Field {
    Int(i64),
    SmallInt(i8),
    Float(f64),
    Bool(bool),
    Str(String),
    Strs(Vec<String>),
    Ids(Vec<u32>),
    Null,
    Nested(u8),
}

impl Field {
    fn value(&self) -> Value {
        match self {
            Field::Int(v) => json!(v),
            Field::SmallInt(v) => json!(v),
            Field::Float(v) => serde_json::Number::from_f64(*v).map_or(Value::Null, Value::Number),
            Field::Bool(v) => json!(v),
            Field::Str(s) => json!(s),
            Field::Strs(v) => json!(v),
            Field::Ids(v) => json!(v),
            Field::Null => Value::Null,
            Field::Nested(depth) => {
                let mut v = json!(1);
                for _ in 0..(*depth % 40) {
                    v = json!([v]);
                }
                v
            }
        }
    }
}

#[derive(Arbitrary, Debug)]
struct Msg {
    role: String,
    content: Option<Field>,
    parts: Option<Vec<(String, Option<String>)>>,
}

const FIELDS: &[&str] = &[
    "model",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "stop",
    "presence_penalty",
    "frequency_penalty",
    "n",
    "ignore_eos",
    "logprobs",
    "top_logprobs",
    "stream",
    "stream_options",
    "prompt",
    "input",
    "encoding_format",
    "messages",
];

fn structured(u: &mut Unstructured, route: BodyRoute) -> arbitrary::Result<Vec<u8>> {
    let mut body = Map::new();
    match route {
        BodyRoute::Chat => {
            let msgs: Vec<Msg> = u.arbitrary()?;
            let msgs: Vec<Value> = msgs
                .iter()
                .map(|m| {
                    let mut o = json!({"role": m.role});
                    if let Some(parts) = &m.parts {
                        o["content"] = parts
                            .iter()
                            .map(|(kind, text)| json!({"type": kind, "text": text}))
                            .collect();
                    } else if let Some(c) = &m.content {
                        o["content"] = c.value();
                    }
                    o
                })
                .collect();
            body.insert("messages".into(), msgs.into());
        }
        BodyRoute::Completions => {
            let p: Field = u.arbitrary()?;
            body.insert("prompt".into(), p.value());
        }
        BodyRoute::Embeddings => {
            let p: Field = u.arbitrary()?;
            body.insert("input".into(), p.value());
        }
    }
    let n = u.int_in_range(0..=8)?;
    for _ in 0..n {
        let name = *u.choose(FIELDS)?;
        let f: Field = u.arbitrary()?;
        body.insert(name.into(), f.value());
    }
    Ok(serde_json::to_vec(&Value::Object(body)).unwrap())
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let route = match selector % 3 {
        0 => BodyRoute::Chat,
        1 => BodyRoute::Completions,
        _ => BodyRoute::Embeddings,
    };
    let body = if selector & 0x80 != 0 {
        match structured(&mut Unstructured::new(rest), route) {
            Ok(b) => b,
            Err(_) => return,
        }
    } else {
        rest.to_vec()
    };
    const CTX: usize = 2048;
    const VOCAB: usize = 49152;
    match check_body(route, &body, CTX, VOCAB, "all-MiniLM-L6-v2") {
        Ok(Checked::Generate { params, prompt_len }) => {
            assert!((1..CTX).contains(&prompt_len));
            assert!((1..=CTX).contains(&params.max_tokens));
            let s = &params.sampling;
            assert!((0.0..=2.0).contains(&s.temperature));
            assert!(s.top_p > 0.0 && s.top_p <= 1.0);
            assert!((-2.0..=2.0).contains(&s.presence_penalty));
            assert!((-2.0..=2.0).contains(&s.frequency_penalty));
            assert!(params.stop.len() <= 16);
            assert!(params.logprobs.is_none_or(|n| n <= 20));
        }
        Ok(Checked::Embed { inputs, .. }) => {
            assert!(!inputs.is_empty() && inputs.len() <= 2048);
        }
        Err(e) => {
            // Every refusal is a client error with OpenAI's error object.
            assert!(e.status().is_client_error(), "{:?}", e);
            let v = serde_json::to_value(e.body()).unwrap();
            assert!(v["error"]["message"].is_string());
        }
    }
});
