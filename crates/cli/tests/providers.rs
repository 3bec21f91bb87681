//! Cloud providers against a local server that speaks the OpenAI-compatible
//! protocol as a provider does (models list, chat completions plain and
//! streamed, 401 without the key, 429 with Retry-After, garbage) and one that
//! speaks Anthropic's Messages API (`x-api-key`, `anthropic-version`, its
//! event stream, 529 "overloaded"): keys set and never shown, the model list,
//! health and model probes, and a chat the swarm cannot serve handed to the
//! provider and named as its answer.

mod common;

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use common::TestNode;
use reqwest::Method;
use serde_json::{Value, json};

const KEY: &str = "test-provider-key-123";
const OK: u8 = 0;
const RATE_LIMITED: u8 = 1;
const GARBAGE: u8 = 2;
const OVERLOADED: u8 = 3;

#[derive(Clone, Default)]
struct Fake {
    mode: Arc<AtomicU8>,
    last: Arc<Mutex<Option<Value>>>,
}

fn authed(h: &HeaderMap) -> bool {
    h.get("authorization").and_then(|v| v.to_str().ok()) == Some(&format!("Bearer {KEY}"))
}

async fn models(axum::extract::State(_f): axum::extract::State<Fake>, h: HeaderMap) -> Response {
    if !authed(&h) {
        return (StatusCode::UNAUTHORIZED, "{\"error\":\"bad key\"}").into_response();
    }
    axum::Json(json!({ "object": "list", "data": [{ "id": "cloud-mini", "object": "model" }] }))
        .into_response()
}

async fn chat(
    axum::extract::State(f): axum::extract::State<Fake>,
    h: HeaderMap,
    axum::Json(body): axum::Json<Value>,
) -> Response {
    if !authed(&h) {
        return (StatusCode::UNAUTHORIZED, "{\"error\":\"bad key\"}").into_response();
    }
    *f.last.lock().expect("lock") = Some(body.clone());
    match f.mode.load(Ordering::SeqCst) {
        RATE_LIMITED => {
            return (
                StatusCode::TOO_MANY_REQUESTS,
                [("retry-after", "7")],
                "slow down",
            )
                .into_response();
        }
        GARBAGE => return (StatusCode::OK, "<html>not json</html>").into_response(),
        _ => {}
    }
    if body["stream"] == true {
        let chunk = json!({ "id": "c1", "object": "chat.completion.chunk", "model": body["model"],
            "choices": [{ "index": 0, "delta": { "content": "from the cloud" }, "finish_reason": null }] });
        let text = format!("data: {chunk}\n\ndata: [DONE]\n\n");
        return ([("content-type", "text/event-stream")], text).into_response();
    }
    axum::Json(json!({
        "id": "c1", "object": "chat.completion", "model": body["model"],
        "choices": [{ "index": 0, "message": { "role": "assistant", "content": "from the cloud" },
                      "finish_reason": "stop" }],
        "usage": { "prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6 },
    }))
    .into_response()
}

/// Anthropic's `POST /v1/messages`, as its API answers (the shapes of
/// docs.anthropic.com's "Messages" and "Streaming Messages").
async fn messages(
    axum::extract::State(f): axum::extract::State<Fake>,
    h: HeaderMap,
    axum::Json(body): axum::Json<Value>,
) -> Response {
    let error = |status: StatusCode, kind: &str| {
        let body = json!({ "type": "error", "error": { "type": kind, "message": kind } });
        (status, axum::Json(body)).into_response()
    };
    if h.get("x-api-key").and_then(|v| v.to_str().ok()) != Some(KEY) {
        return error(StatusCode::UNAUTHORIZED, "authentication_error");
    }
    if h.get("anthropic-version").is_none() {
        return error(StatusCode::BAD_REQUEST, "invalid_request_error");
    }
    if body["max_tokens"].as_u64().is_none() || !body["messages"].is_array() {
        return error(StatusCode::BAD_REQUEST, "invalid_request_error");
    }
    *f.last.lock().expect("lock") = Some(body.clone());
    if f.mode.load(Ordering::SeqCst) == OVERLOADED {
        return error(StatusCode::from_u16(529).expect("529"), "overloaded_error");
    }
    let wants_tool = body["tools"].is_array();
    if body["stream"] == true {
        let event = |name: &str, data: Value| {
            format!(
                "event: {name}
data: {data}

"
            )
        };
        let mut text = event(
            "message_start",
            json!({ "type": "message_start", "message": { "id": "msg_01", "type": "message",
                "role": "assistant", "content": [], "model": body["model"], "stop_reason": null,
                "usage": { "input_tokens": 11, "output_tokens": 1 } } }),
        );
        text += &event(
            "content_block_start",
            json!({ "type": "content_block_start", "index": 0,
                "content_block": { "type": "text", "text": "" } }),
        );
        text += &event("ping", json!({ "type": "ping" }));
        for piece in ["from ", "claude"] {
            text += &event(
                "content_block_delta",
                json!({ "type": "content_block_delta", "index": 0,
                    "delta": { "type": "text_delta", "text": piece } }),
            );
        }
        text += &event(
            "content_block_stop",
            json!({ "type": "content_block_stop", "index": 0 }),
        );
        text += &event(
            "message_delta",
            json!({ "type": "message_delta",
                "delta": { "stop_reason": "end_turn", "stop_sequence": null },
                "usage": { "output_tokens": 2 } }),
        );
        text += &event("message_stop", json!({ "type": "message_stop" }));
        return ([("content-type", "text/event-stream")], text).into_response();
    }
    let mut content = vec![json!({ "type": "text", "text": "from claude" })];
    if wants_tool {
        content.push(
            json!({ "type": "tool_use", "id": "toolu_01", "name": "weather",
            "input": { "city": "Paris" } }),
        );
    }
    axum::Json(json!({
        "id": "msg_01", "type": "message", "role": "assistant", "model": body["model"],
        "content": content,
        "stop_reason": if wants_tool { "tool_use" } else { "end_turn" }, "stop_sequence": null,
        "usage": { "input_tokens": 11, "output_tokens": 2 },
    }))
    .into_response()
}

/// Starts the fake provider on a loopback port; returns its base URL.
fn start_fake(fake: Fake) -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    listener.set_nonblocking(true).expect("nonblocking");
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("rt");
        rt.block_on(async move {
            let app = Router::new()
                .route("/v1/models", get(models))
                .route("/v1/chat/completions", post(chat))
                .route("/v1/messages", post(messages))
                .with_state(fake);
            let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
            let _ = axum::serve(listener, app).await;
        });
    });
    format!("http://127.0.0.1:{port}/v1")
}

fn chat_body(model: &str, stream: bool) -> Value {
    json!({ "model": model, "messages": [{ "role": "user", "content": "Hi" }], "max_tokens": 4,
            "stream": stream })
}

#[test]
fn a_chat_the_swarm_cannot_serve_goes_to_the_provider_that_has_the_model() {
    let fake = Fake::default();
    let url = start_fake(fake.clone());
    let node = TestNode::start_custom(true, &[], &[("SWARMLLM_PROVIDER_CUSTOM_URL", &url)], |_| {});

    // Listed, not configured; a key is set (never shown), bad ones refused.
    let (s, v) = node.get("/api/admin/providers");
    assert_eq!(s, 200, "{v}");
    let custom = |v: &Value| -> Value {
        v["providers"]
            .as_array()
            .expect("list")
            .iter()
            .find(|p| p["provider"] == "custom")
            .cloned()
            .expect("custom")
    };
    assert_eq!(
        (
            custom(&v)["configured"].clone(),
            custom(&v)["base_url"].clone()
        ),
        (json!(false), json!(url))
    );
    assert!(v["providers"].as_array().expect("list").len() >= 12, "{v}");
    for bad in [
        json!({ "nope": "x" }),
        json!({ "custom": 5 }),
        json!({ "custom": "has space" }),
        json!([1]),
    ] {
        let (s, e) = node.call(Method::PUT, "/api/admin/providers", &bad);
        assert_eq!(
            (s, e["error"]["code"].as_str()),
            (400, Some("INVALID_FIELD")),
            "{bad}: {e}"
        );
    }
    let unauth = node
        .http()
        .put(node.url("/api/admin/providers"))
        .json(&json!({ "custom": KEY }))
        .send()
        .expect("send");
    assert_eq!(unauth.status().as_u16(), 401);
    let (s, v) = node.call(
        Method::PUT,
        "/api/admin/providers",
        &json!({ "custom": KEY }),
    );
    assert_eq!(
        (s, custom(&v)["configured"].clone()),
        (200, json!(true)),
        "{v}"
    );
    assert!(
        !v.to_string().contains(KEY),
        "the key is never returned: {v}"
    );
    for entry in std::fs::read_dir(node.dir()).expect("data dir").flatten() {
        let bytes = std::fs::read(entry.path()).unwrap_or_default();
        assert!(
            !bytes.windows(KEY.len()).any(|w| w == KEY.as_bytes()),
            "the key is in plain text in {}",
            entry.path().display()
        );
    }

    // The provider's models.
    let (s, v) = node.get("/api/admin/provider-models");
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        v["models"],
        json!([{ "id": "cloud-mini", "name": "cloud-mini", "provider": "custom" }])
    );

    // A chat for its model goes there and says so; the node's own model stays here.
    let (s, v) = node.post("/v1/chat/completions", &chat_body("cloud-mini", false));
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        (
            v["provider"].clone(),
            v["choices"][0]["message"]["content"].clone()
        ),
        (json!("custom"), json!("from the cloud"))
    );
    assert_eq!(
        fake.last
            .lock()
            .expect("lock")
            .as_ref()
            .map(|b| b["model"].clone()),
        Some(json!("cloud-mini"))
    );
    let (s, _) = node.post(
        "/v1/chat/completions",
        &chat_body("custom:other-model", false),
    );
    assert_eq!(s, 200);
    assert_eq!(
        fake.last
            .lock()
            .expect("lock")
            .as_ref()
            .map(|b| b["model"].clone()),
        Some(json!("other-model"))
    );
    let streamed = node
        .http()
        .post(node.url("/v1/chat/completions"))
        .bearer_auth(&node.key)
        .json(&chat_body("cloud-mini", true))
        .send()
        .expect("stream");
    assert_eq!(
        streamed
            .headers()
            .get("x-swarmllm-provider")
            .and_then(|h| h.to_str().ok()),
        Some("custom")
    );
    let text = streamed.text().expect("body");
    assert!(
        text.contains("from the cloud") && text.contains("[DONE]"),
        "{text}"
    );
    let (s, v) = node.post(
        "/v1/chat/completions",
        &json!({ "messages": [{ "role": "user", "content": "Hi" }], "max_tokens": 2 }),
    );
    assert_eq!((s, v.get("provider")), (200, None), "{v}");
    let (s, v) = node.post("/v1/chat/completions", &chat_body("nobody-has-this", false));
    assert_eq!(s, 404, "{v}");

    // Probes.
    let (s, v) = node.get_auth("/api/admin/provider-health");
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        (
            v["providers"][0]["provider"].clone(),
            v["providers"][0]["status"].clone()
        ),
        (json!("custom"), json!("up")),
        "{v}"
    );
    let (s, v) = node.post(
        "/api/admin/provider-model-status",
        &json!({ "models": ["cloud-mini", "nope"] }),
    );
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        (
            v["models"][0]["status"].clone(),
            v["models"][1]["status"].clone()
        ),
        (json!("up"), json!("unavailable")),
        "{v}"
    );
    let many: Vec<String> = (0..21).map(|i| format!("m{i}")).collect();
    assert_eq!(
        node.post(
            "/api/admin/provider-model-status",
            &json!({ "models": many })
        )
        .0,
        422
    );

    // A provider that rate-limits or answers garbage gets a clear status.
    fake.mode.store(RATE_LIMITED, Ordering::SeqCst);
    let (s, v) = node.post("/v1/chat/completions", &chat_body("cloud-mini", false));
    assert_eq!(
        (
            s,
            v["error"]["code"].as_str(),
            v["error"]["details"]["retry_after"].as_u64()
        ),
        (429, Some("PROVIDER_RATE_LIMITED"), Some(7)),
        "{v}"
    );
    let (_, v) = node.get_auth("/api/admin/provider-health");
    assert_eq!(v["providers"][0]["status"], "rate_limited", "{v}");
    fake.mode.store(GARBAGE, Ordering::SeqCst);
    let (s, v) = node.post("/v1/chat/completions", &chat_body("cloud-mini", false));
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (502, Some("PROVIDER_ERROR")),
        "{v}"
    );

    // The key removed: the provider is not called any more.
    fake.mode.store(OK, Ordering::SeqCst);
    let (s, v) = node.call(
        Method::PUT,
        "/api/admin/providers",
        &json!({ "custom": null }),
    );
    assert_eq!(
        (s, custom(&v)["configured"].clone()),
        (200, json!(false)),
        "{v}"
    );
    assert_eq!(
        node.post("/v1/chat/completions", &chat_body("cloud-mini", false))
            .0,
        404
    );
    assert_eq!(node.get("/health/live").0, 200);
}

#[test]
fn an_unreachable_provider_is_a_clear_502() {
    // Nothing listens on the discard port on loopback.
    let node = TestNode::start_custom(
        false,
        &[],
        &[("SWARMLLM_PROVIDER_CUSTOM_URL", "http://127.0.0.1:9/v1")],
        |_| {},
    );
    let (s, _) = node.call(
        Method::PUT,
        "/api/admin/providers",
        &json!({ "custom": KEY }),
    );
    assert_eq!(s, 200);
    let (s, v) = node.post("/v1/chat/completions", &chat_body("custom:any", false));
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (502, Some("PROVIDER_UNREACHABLE")),
        "{v}"
    );
    let (_, v) = node.get_auth("/api/admin/provider-health");
    assert_eq!(v["providers"][0]["status"], "unreachable", "{v}");
}

#[test]
fn a_claude_chat_goes_through_anthropics_messages_api() {
    let fake = Fake::default();
    let url = start_fake(fake.clone());
    let node = TestNode::start_custom(
        false,
        &[],
        &[("SWARMLLM_PROVIDER_ANTHROPIC_URL", &url)],
        |_| {},
    );
    let (s, v) = node.call(
        Method::PUT,
        "/api/admin/providers",
        &json!({ "anthropic": KEY }),
    );
    assert_eq!(s, 200, "{v}");
    let anthropic = v["providers"]
        .as_array()
        .expect("list")
        .iter()
        .find(|p| p["provider"] == "anthropic")
        .cloned()
        .expect("anthropic");
    assert_eq!(
        (
            anthropic["configured"].clone(),
            anthropic["base_url"].clone()
        ),
        (json!(true), json!(url))
    );
    let (_, v) = node.get("/api/admin/provider-models");
    assert!(
        v["models"]
            .as_array()
            .expect("models")
            .iter()
            .any(|m| m["id"] == "claude-sonnet-4-6" && m["provider"] == "anthropic"),
        "{v}"
    );

    // A chat, translated both ways.
    let body = json!({ "model": "claude-sonnet-4-6", "max_tokens": 50, "stop": ["END"],
        "messages": [{ "role": "system", "content": "Be brief." },
                     { "role": "user", "content": "Hi" }] });
    let (s, v) = node.post("/v1/chat/completions", &body);
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        (
            v["provider"].clone(),
            v["object"].clone(),
            v["choices"][0]["message"]["content"].clone(),
            v["choices"][0]["finish_reason"].clone(),
            v["usage"]["total_tokens"].clone()
        ),
        (
            json!("anthropic"),
            json!("chat.completion"),
            json!("from claude"),
            json!("stop"),
            json!(13)
        ),
        "{v}"
    );
    let sent = fake.last.lock().expect("lock").clone().expect("a request");
    assert_eq!(
        (
            sent["system"].clone(),
            sent["messages"].clone(),
            sent["stop_sequences"].clone()
        ),
        (
            json!("Be brief."),
            json!([{ "role": "user", "content": [{ "type": "text", "text": "Hi" }] }]),
            json!(["END"])
        )
    );

    // Tools: OpenAI's in, a tool_use out as tool_calls.
    let mut with_tools = body.clone();
    with_tools["tools"] = json!([{ "type": "function", "function": { "name": "weather",
        "parameters": { "type": "object", "properties": { "city": { "type": "string" } } } } }]);
    let (s, v) = node.post("/v1/chat/completions", &with_tools);
    assert_eq!(s, 200, "{v}");
    let call = &v["choices"][0]["message"]["tool_calls"][0];
    assert_eq!(
        (
            call["function"]["name"].clone(),
            call["function"]["arguments"].clone(),
            v["choices"][0]["finish_reason"].clone()
        ),
        (
            json!("weather"),
            json!("{\"city\":\"Paris\"}"),
            json!("tool_calls")
        ),
        "{v}"
    );
    let sent = fake.last.lock().expect("lock").clone().expect("a request");
    assert_eq!(sent["tools"][0]["input_schema"]["type"], "object");

    // Streamed: Anthropic's events arrive as OpenAI chunks.
    let mut streamed_body = body.clone();
    streamed_body["stream"] = json!(true);
    streamed_body["stream_options"] = json!({ "include_usage": true });
    let streamed = node
        .http()
        .post(node.url("/v1/chat/completions"))
        .bearer_auth(&node.key)
        .json(&streamed_body)
        .send()
        .expect("stream");
    assert_eq!(
        streamed
            .headers()
            .get("x-swarmllm-provider")
            .and_then(|h| h.to_str().ok()),
        Some("anthropic")
    );
    let text = streamed.text().expect("body");
    let chunks: Vec<Value> = text
        .split("\n\n")
        .filter_map(|f| f.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str(d).expect("a JSON chunk"))
        .collect();
    let content: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(content, "from claude", "{text}");
    assert!(
        chunks
            .iter()
            .all(|c| c["object"] == "chat.completion.chunk"),
        "{text}"
    );
    assert!(
        chunks
            .iter()
            .any(|c| c["choices"][0]["finish_reason"] == "stop"),
        "{text}"
    );
    assert_eq!(
        chunks.last().expect("usage")["usage"]["total_tokens"],
        13,
        "{text}"
    );
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");

    // What Anthropic cannot do is refused before sending.
    let mut with_logprobs = body.clone();
    with_logprobs["logprobs"] = json!(true);
    let (s, v) = node.post("/v1/chat/completions", &with_logprobs);
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (422, Some("INVALID_PARAMETER")),
        "{v}"
    );

    // Probes, then an overloaded Anthropic.
    let (_, v) = node.get_auth("/api/admin/provider-health");
    assert_eq!(
        (
            v["providers"][0]["provider"].clone(),
            v["providers"][0]["status"].clone()
        ),
        (json!("anthropic"), json!("up")),
        "{v}"
    );
    fake.mode.store(OVERLOADED, Ordering::SeqCst);
    let (s, v) = node.post("/v1/chat/completions", &body);
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (503, Some("PROVIDER_OVERLOADED")),
        "{v}"
    );
    let (_, v) = node.get_auth("/api/admin/provider-health");
    assert_eq!(v["providers"][0]["status"], "overloaded", "{v}");
    let (_, v) = node.post(
        "/api/admin/provider-model-status",
        &json!({ "models": ["claude-haiku-4-5"] }),
    );
    assert_eq!(
        (
            v["models"][0]["provider"].clone(),
            v["models"][0]["status"].clone()
        ),
        (json!("anthropic"), json!("unavailable")),
        "{v}"
    );
    assert_eq!(node.get("/health/live").0, 200);
}
