//! Replays the committed inputs of the `serve_request` fuzz target (fuzz-serve/) through the same
//! entry point, `wgllm::serve::http::check_body`, with the same assertions: no panic, what is
//! accepted is in range, what is refused is a client error with OpenAI's error object.
//!
//! Each file under tests/data/fuzz/serve_request/ is a raw input: its first byte picks the route
//! (modulo 3: chat, completions, embeddings), the rest is the body. Inputs the target built field
//! by field are committed as the body it built (the target prints it), with the high bit of the
//! first byte cleared.

use std::path::Path;

use wgllm::serve::http::{check_body, BodyRoute, Checked};

const CTX: usize = 2048;
const VOCAB: usize = 49152;

fn replay(name: &str, data: &[u8]) {
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    assert!(
        selector & 0x80 == 0,
        "{name}: commit the built body, not the structured input"
    );
    let route = match selector % 3 {
        0 => BodyRoute::Chat,
        1 => BodyRoute::Completions,
        _ => BodyRoute::Embeddings,
    };
    match check_body(route, body, CTX, VOCAB, "all-MiniLM-L6-v2") {
        Ok(Checked::Generate { params, prompt_len }) => {
            assert!((1..CTX).contains(&prompt_len), "{name}");
            assert!((1..=CTX).contains(&params.max_tokens), "{name}");
            let s = &params.sampling;
            assert!((0.0..=2.0).contains(&s.temperature), "{name}");
            assert!(s.top_p > 0.0 && s.top_p <= 1.0, "{name}");
            assert!((-2.0..=2.0).contains(&s.presence_penalty), "{name}");
            assert!((-2.0..=2.0).contains(&s.frequency_penalty), "{name}");
            assert!(params.stop.len() <= 16, "{name}");
            assert!(params.logprobs.is_none_or(|n| n <= 20), "{name}");
        }
        Ok(Checked::Embed { inputs, .. }) => {
            assert!(!inputs.is_empty() && inputs.len() <= 2048, "{name}");
        }
        Err(e) => {
            assert!(e.status().is_client_error(), "{name}: {e:?}");
            let v = serde_json::to_value(e.body()).unwrap();
            assert!(v["error"]["message"].is_string(), "{name}: {v}");
        }
    }
}

#[test]
fn committed_serve_request_inputs_replay_cleanly() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/fuzz/serve_request");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).expect("the committed corpus") {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        replay(&name, &std::fs::read(&path).unwrap());
        n += 1;
    }
    assert!(n > 0, "no inputs under {}", dir.display());
}

/// The hostile inputs committed here are refused for the right reason, not only without a panic.
#[test]
fn hostile_bodies_are_refused_naming_the_field() {
    let refused = |route, body: &str| match check_body(route, body.as_bytes(), CTX, VOCAB, "e") {
        Err(e) => (e.status().as_u16(), e.body().error.param.clone()),
        Ok(c) => panic!("accepted {body}: {c:?}"),
    };
    let chat = |extra: &str| format!(r#"{{"messages":[{{"role":"user","content":"hi"}}]{extra}}}"#);
    assert_eq!(
        refused(BodyRoute::Chat, &chat(r#","max_tokens":0"#))
            .1
            .as_deref(),
        Some("max_tokens")
    );
    assert_eq!(
        refused(
            BodyRoute::Chat,
            &chat(r#","max_tokens":-9223372036854775808"#)
        )
        .1
        .as_deref(),
        Some("max_tokens")
    );
    assert_eq!(
        refused(BodyRoute::Chat, &chat(r#","temperature":1e39"#))
            .1
            .as_deref(),
        Some("temperature")
    );
    assert_eq!(
        refused(BodyRoute::Chat, &chat(r#","top_k":-1"#))
            .1
            .as_deref(),
        Some("top_k")
    );
    assert_eq!(
        refused(BodyRoute::Chat, &chat(r#","top_logprobs":2"#))
            .1
            .as_deref(),
        Some("logprobs")
    );
    assert_eq!(
        refused(BodyRoute::Completions, r#"{"prompt":[4294967295]}"#)
            .1
            .as_deref(),
        Some("prompt")
    );
    let deep = format!(r#"{{"messages":{}{}}}"#, "[".repeat(5000), "]".repeat(5000));
    assert_eq!(refused(BodyRoute::Chat, &deep), (400, None));
    assert_eq!(
        refused(BodyRoute::Embeddings, r#"{"input":[]}"#)
            .1
            .as_deref(),
        Some("input")
    );
    match check_body(
        BodyRoute::Chat,
        chat(r#","max_tokens":7,"ignore_eos":true"#).as_bytes(),
        CTX,
        VOCAB,
        "e",
    ) {
        Ok(Checked::Generate { params, .. }) => {
            assert_eq!(params.max_tokens, 7);
            assert!(params.ignore_eos);
        }
        other => panic!("{other:?}"),
    }
}
