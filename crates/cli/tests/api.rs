//! The node's HTTP API, driven over real HTTP against real `swarmllm serve`
//! processes running the SmolLM2 test model.

mod common;

use std::io::Read;
use std::time::Duration;

use common::{TestNode, wait_for};
use reqwest::Method;
use serde_json::{Value, json};

fn chat_body(content: &str, max_tokens: u32) -> Value {
    json!({
        "model": "smollm2-135m-instruct.q4_1",
        "messages": [{ "role": "user", "content": content }],
        "temperature": 0,
        "max_tokens": max_tokens,
    })
}

fn chat_text(v: &Value) -> String {
    v["choices"][0]["message"]["content"]
        .as_str()
        .expect("content")
        .to_string()
}

/// Concatenates the `delta.content` (chat) or `text` (completions) of stream chunks.
fn stream_text(events: &[String]) -> (String, Option<String>, Option<Value>) {
    assert_eq!(
        events.last().map(String::as_str),
        Some("[DONE]"),
        "stream must end with [DONE]"
    );
    let mut text = String::new();
    let mut finish = None;
    let mut usage = None;
    for e in &events[..events.len() - 1] {
        let v: Value = serde_json::from_str(e).expect("chunk is JSON");
        if let Some(u) = v.get("usage").filter(|u| !u.is_null()) {
            usage = Some(u.clone());
        }
        if let Some(choice) = v["choices"].get(0) {
            if let Some(t) = choice["delta"]["content"]
                .as_str()
                .or(choice["text"].as_str())
            {
                text.push_str(t);
            }
            if let Some(f) = choice["finish_reason"].as_str() {
                finish = Some(f.to_string());
            }
        }
    }
    (text, finish, usage)
}

#[test]
fn greedy_output_is_deterministic_and_streaming_matches() {
    let node = TestNode::start();
    // The model served whole here is the user's choice, held here: no gap.
    let (_, map) = node.get("/api/admin/network-map");
    let region = map["regions"][map["local_region"].as_str().unwrap_or("")].clone();
    let model = "smollm2-135m-instruct.q4_1";
    assert_eq!(region["models"][model], 1, "{map}");
    assert_eq!(region["coverage_gaps"], serde_json::json!([]), "{map}");
    for prompt in [
        "What is the capital of France?",
        "Write a haiku about rivers.",
    ] {
        let body = chat_body(prompt, 48);
        let (s1, a) = node.post("/v1/chat/completions", &body);
        let (s2, b) = node.post("/v1/chat/completions", &body);
        assert_eq!((s1, s2), (200, 200), "{a} {b}");
        assert!(!chat_text(&a).is_empty());
        assert_eq!(
            chat_text(&a),
            chat_text(&b),
            "greedy chat must be deterministic"
        );
        assert_eq!(a["object"], "chat.completion");

        let mut sbody = body.clone();
        sbody["stream"] = json!(true);
        sbody["stream_options"] = json!({ "include_usage": true });
        let events = node.post_stream("/v1/chat/completions", &sbody);
        let (text, finish, usage) = stream_text(&events);
        assert_eq!(
            text,
            chat_text(&a),
            "streamed text must equal the non-streamed text"
        );
        assert_eq!(finish.as_deref(), a["choices"][0]["finish_reason"].as_str());
        let usage = usage.expect("usage chunk");
        for count in ["prompt_tokens", "completion_tokens", "total_tokens"] {
            assert_eq!(usage[count], a["usage"][count], "{usage} {}", a["usage"]);
        }
        // The same prompt again: all but its last token come from the cache.
        assert_eq!(
            usage["prompt_tokens_details"]["cached_tokens"],
            usage["prompt_tokens"].as_u64().expect("prompt_tokens") - 1,
            "{usage}"
        );
    }

    // /v1/completions: same properties on a raw prompt.
    let body =
        json!({ "prompt": "The three primary colors are", "max_tokens": 24, "temperature": 0 });
    let (s, a) = node.post("/v1/completions", &body);
    assert_eq!(s, 200, "{a}");
    let (_, b) = node.post("/v1/completions", &body);
    assert_eq!(a["choices"][0]["text"], b["choices"][0]["text"]);
    let mut sbody = body.clone();
    sbody["stream"] = json!(true);
    let (text, _, _) = stream_text(&node.post_stream("/v1/completions", &sbody));
    assert_eq!(json!(text), a["choices"][0]["text"]);

    // /api/v1/inference: same again, SSE ending with the [DONE] token event.
    let body = json!({ "prompt": "Name a fruit.", "max_tokens": 24, "temperature": 0 });
    let (s, a) = node.post("/api/v1/inference", &body);
    assert_eq!(s, 200, "{a}");
    assert!(a["id"].as_str().is_some_and(|id| id.starts_with("inf_")));
    assert_eq!(a["tokens_generated"], a["usage"]["completion_tokens"]);
    for k in ["queue_ms", "inference_ms", "total_ms"] {
        assert!(a["timing"][k].is_u64(), "timing.{k} in {a}");
    }
    // Served here, it cost this node nothing (the split case is in credits.rs).
    assert_eq!(a["cost"], json!({ "amount": 0.0, "currency": "credits" }));
    let mut sbody = body.clone();
    sbody["stream"] = json!(true);
    let events = node.post_stream("/api/v1/inference", &sbody);
    let last: Value = serde_json::from_str(events.last().expect("events")).expect("json");
    assert_eq!(last["token"], "[DONE]");
    assert_eq!(last["finish_reason"], a["finish_reason"]);
    assert_eq!(
        last["usage"]["completion_tokens"],
        a["usage"]["completion_tokens"]
    );
    assert_eq!(last["usage"]["prompt_tokens"], a["usage"]["prompt_tokens"]);
    assert_eq!(last["cost"], a["cost"]);
    let mut text = String::new();
    for (i, e) in events[..events.len() - 1].iter().enumerate() {
        let v: Value = serde_json::from_str(e).expect("json");
        assert_eq!(v["index"], json!(i));
        text.push_str(v["token"].as_str().expect("token"));
    }
    assert_eq!(json!(text), a["text"]);
}

#[test]
fn max_tokens_stop_sequences_and_usage_are_honoured() {
    let node = TestNode::start();
    // max_tokens: exactly that many tokens, finish_reason "length".
    let (s, v) = node.post(
        "/v1/completions",
        &json!({ "prompt": "Once upon a time", "max_tokens": 7, "temperature": 0, "ignore_eos": true }),
    );
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["usage"]["completion_tokens"], 7);
    let u = &v["usage"];
    assert_eq!(
        u["total_tokens"].as_u64(),
        Some(u["prompt_tokens"].as_u64().unwrap_or(0) + 7)
    );

    // Usage: a longer prompt has more prompt tokens; counts agree across endpoints.
    let (_, short) = node.post(
        "/v1/completions",
        &json!({ "prompt": "Hi", "max_tokens": 1, "temperature": 0 }),
    );
    let (_, long) = node.post(
        "/v1/completions",
        &json!({ "prompt": "Hi there, this prompt is clearly much longer than the other one", "max_tokens": 1, "temperature": 0 }),
    );
    let (p_short, p_long) = (
        short["usage"]["prompt_tokens"].as_u64().expect("u64"),
        long["usage"]["prompt_tokens"].as_u64().expect("u64"),
    );
    assert!(p_short >= 1 && p_long > p_short + 5, "{p_short} {p_long}");

    // Stop sequence: cut the greedy text at a word in its middle.
    let body = json!({ "prompt": "List the days of the week: Monday,", "max_tokens": 40, "temperature": 0 });
    let (_, full) = node.post("/v1/completions", &body);
    let full_text = full["choices"][0]["text"]
        .as_str()
        .expect("text")
        .to_string();
    let stop = ["Wednesday", "Thursday", "Friday"]
        .into_iter()
        .find(|w| full_text.contains(w))
        .unwrap_or_else(|| panic!("no weekday in {full_text:?}"));
    let expected = &full_text[..full_text.find(stop).expect("found")];
    let mut with_stop = body.clone();
    with_stop["stop"] = json!([stop, "never-appears"]);
    let (s, v) = node.post("/v1/completions", &with_stop);
    assert_eq!(s, 200);
    assert_eq!(v["choices"][0]["text"], json!(expected));
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    // ...and streaming yields exactly the same text (stop text never leaks).
    with_stop["stream"] = json!(true);
    let (text, finish, _) = stream_text(&node.post_stream("/v1/completions", &with_stop));
    assert_eq!(text, expected);
    assert_eq!(finish.as_deref(), Some("stop"));
    // A single string is accepted for `stop` too.
    with_stop["stream"] = json!(false);
    with_stop["stop"] = json!(stop);
    let (_, v) = node.post("/v1/completions", &with_stop);
    assert_eq!(v["choices"][0]["text"], json!(expected));
}

#[test]
fn auth_is_enforced_on_inference_and_writes_only() {
    let node = TestNode::start();
    let http = node.http();
    let body = chat_body("hi", 2);
    let protected: [(Method, &str, Value); 8] = [
        (Method::POST, "/v1/chat/completions", body.clone()),
        (Method::POST, "/v1/completions", json!({ "prompt": "x" })),
        (Method::POST, "/api/v1/inference", json!({ "prompt": "x" })),
        (Method::GET, "/api/admin/api-key", Value::Null),
        (
            Method::PUT,
            "/api/admin/config",
            json!({ "rate_limit_per_minute": 5 }),
        ),
        (Method::POST, "/api/admin/config/reload", Value::Null),
        (
            Method::PUT,
            "/api/identity/nickname",
            json!({ "nickname": "x" }),
        ),
        (Method::POST, "/api/admin/shutdown", Value::Null),
    ];
    for (method, path, body) in &protected {
        for auth in [None, Some("Bearer wrong-key"), Some("Basic Zm9vOmJhcg==")] {
            let mut req = http.request(method.clone(), node.url(path)).json(body);
            if let Some(a) = auth {
                req = req.header("Authorization", a);
            }
            let r = req.send().expect("send");
            assert_eq!(r.status().as_u16(), 401, "{method} {path} with {auth:?}");
            let v: Value = r.json().expect("json");
            assert_eq!(v["error"]["code"], "UNAUTHORIZED");
        }
    }
    // The right key works; the key endpoint returns it.
    let (s, v) = node.call(Method::GET, "/api/admin/api-key", &Value::Null);
    assert_eq!(s, 200);
    assert_eq!(v["api_key"], json!(node.key));
    // Read-only status endpoints need no key.
    for path in [
        "/health",
        "/health/live",
        "/health/ready",
        "/metrics",
        "/v1/models",
        "/api/v1/status",
        "/api/v1/health",
        "/api/v1/metrics",
        "/api/admin/stats",
        "/api/admin/version",
        "/api/admin/config",
        "/api/identity/nickname",
    ] {
        let r = http.get(node.url(path)).send().expect("get");
        assert_eq!(r.status().as_u16(), 200, "{path}");
    }
    // The node is still alive after all that.
    let (s, _) = node.post("/v1/chat/completions", &body);
    assert_eq!(s, 200);
}

#[test]
fn every_write_route_refuses_a_request_without_the_key() {
    use swarmllm_node::api::{Access, route_table};
    let node = TestNode::start_without_model();
    let http = node.http();
    let table = route_table();
    let writes = table.iter().filter(|r| r.access == Access::Write).count();
    assert!(writes >= 40, "only {writes} write routes declared");
    for route in &table {
        let path = route
            .path
            .replace("{id}", "x")
            .replace("{index}", "0")
            .replace("{file}", "index.html");
        let method = Method::from_bytes(route.method.as_str().as_bytes()).expect("method");
        for auth in [None, Some("Bearer wrong-key")] {
            let mut req = http
                .request(method.clone(), node.url(&path))
                .json(&json!({}));
            if let Some(a) = auth {
                req = req.header("Authorization", a);
            }
            let status = req.send().expect("send").status().as_u16();
            match route.access {
                Access::Write | Access::Infer => {
                    assert_eq!(status, 401, "{method} {path} with {auth:?}")
                }
                // A read may fail for its own reasons (no model, no such id), but
                // never for want of a key.
                Access::Read => assert_ne!(status, 401, "{method} {path} with {auth:?}"),
            }
        }
    }
    // The node is still serving after every route was called.
    assert_eq!(node.get("/health/live").0, 200);
}

#[test]
fn path_host_and_expensive_read_errors_are_json_and_refused() {
    let node = TestNode::start_without_model();
    // A path parameter of the wrong type is a JSON 400, not plain text.
    let (status, v) = node.post("/api/admin/models/x/shards/-1/download", &json!({}));
    assert_eq!(status, 400, "{v}");
    assert_eq!(v["error"]["code"], "INVALID_PATH", "{v}");
    // Joining with an empty code is the caller's mistake.
    for body in [json!({ "code": "" }), json!({ "code": "  " }), json!({})] {
        let (status, v) = node.post("/api/admin/join-network", &body);
        assert_eq!(status, 400, "{body}: {v}");
        assert_eq!(v["error"]["details"]["field"], "code", "{v}");
    }
    // DNS rebinding: a hostile name that resolves here is refused; IP literals
    // and localhost are not.
    let http = node.http();
    let host = |h: &str| {
        http.get(node.url("/health"))
            .header("Host", h)
            .send()
            .expect("send")
            .status()
            .as_u16()
    };
    assert_eq!(host("evil.example:8800"), 421);
    assert_eq!(host(&format!("localhost:{}", node.port)), 200);
    assert_eq!(host(&format!("127.0.0.1:{}", node.port)), 200);
    // Re-verifying the whole ledger needs the key.
    let r = http
        .get(node.url("/api/admin/credits?verify=true"))
        .send()
        .expect("send");
    assert_eq!(r.status().as_u16(), 401);
    let (status, v) = node.get_auth("/api/admin/credits?verify=true");
    assert_eq!(status, 200, "{v}");
    assert!(v["verification"].is_object(), "{v}");
    assert_eq!(node.get("/api/admin/credits").0, 200);
}

#[test]
fn bad_inputs_get_clear_errors_and_the_node_keeps_serving() {
    let node = TestNode::start();
    let raw = |body: &str| {
        let r = node
            .http()
            .post(node.url("/v1/chat/completions"))
            .bearer_auth(&node.key)
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .expect("send");
        let s = r.status().as_u16();
        (s, r.json::<Value>().expect("error body is JSON"))
    };
    let expect = |(s, v): (u16, Value), status: u16, code: &str| {
        assert_eq!(s, status, "{v}");
        assert_eq!(v["error"]["code"], code, "{v}");
        assert!(
            v["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{v}"
        );
        v
    };
    expect(raw("{not json"), 400, "INVALID_JSON");
    expect(raw(""), 400, "INVALID_JSON");
    let v = expect(raw(r#"{"model":"x"}"#), 400, "INVALID_FIELD");
    assert_eq!(v["error"]["details"]["field"], "messages");
    let v = expect(
        raw(r#"{"messages":[{"role":"wizard","content":"hi"}]}"#),
        400,
        "INVALID_FIELD",
    );
    assert!(
        v["error"]["details"]["field"]
            .as_str()
            .is_some_and(|f| f.contains("role")),
        "{v}"
    );
    let v = expect(
        raw(r#"{"messages":[{"role":"user","content":"hi"}],"max_tokens":"ten"}"#),
        400,
        "INVALID_FIELD",
    );
    assert_eq!(v["error"]["details"]["field"], "max_tokens");

    let ok_msgs = json!([{ "role": "user", "content": "hi" }]);
    for (field, value) in [
        ("max_tokens", json!(0)),
        ("max_tokens", json!(-5)),
        ("temperature", json!(2.5)),
        ("temperature", json!(-1)),
        ("top_p", json!(1.5)),
        ("top_k", json!(-1)),
        ("n", json!(0)),
        ("n", json!(9)),
        // Alternatives need `logprobs: true`, and are 0–20.
        ("top_logprobs", json!(2)),
    ] {
        let mut body = json!({ "messages": ok_msgs });
        body[field] = value;
        let v = expect(
            node.post("/v1/chat/completions", &body),
            422,
            "INVALID_PARAMETER",
        );
        assert_eq!(v["error"]["details"]["field"], field);
    }
    let v = expect(
        node.post(
            "/v1/chat/completions",
            &json!({ "messages": ok_msgs, "logprobs": true, "top_logprobs": 21 }),
        ),
        422,
        "INVALID_PARAMETER",
    );
    assert_eq!(v["error"]["details"]["field"], "top_logprobs");
    let v = expect(
        node.post(
            "/v1/completions",
            &json!({ "prompt": "Hi", "logprobs": -1 }),
        ),
        422,
        "INVALID_PARAMETER",
    );
    assert_eq!(v["error"]["details"]["field"], "logprobs");
    expect(
        node.post("/v1/chat/completions", &json!({ "messages": [] })),
        422,
        "INVALID_PARAMETER",
    );
    expect(
        node.post(
            "/api/v1/inference",
            &json!({ "prompt": "x", "max_tokens": 0 }),
        ),
        422,
        "INVALID_PARAMETER",
    );
    let v = expect(
        node.post(
            "/v1/chat/completions",
            &json!({ "model": "gpt-9", "messages": ok_msgs }),
        ),
        404,
        "MODEL_NOT_FOUND",
    );
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("gpt-9")
    );
    expect(node.get("/v1/nothing-here"), 404, "NOT_FOUND");
    expect(
        node.post("/api/admin/unknown", &json!({})),
        404,
        "NOT_FOUND",
    );

    // Over the body limit (1 MiB by default).
    let huge = format!(
        r#"{{"messages":[{{"role":"user","content":"{}"}}]}}"#,
        "a".repeat(1_200_000)
    );
    expect(raw(&huge), 413, "PAYLOAD_TOO_LARGE");

    // A prompt longer than the context window.
    let long = "word ".repeat(5000);
    let v = expect(
        node.post(
            "/v1/completions",
            &json!({ "prompt": long, "max_tokens": 1 }),
        ),
        400,
        "CONTEXT_LENGTH_EXCEEDED",
    );
    assert!(v["error"]["details"]["context_size"].is_u64());

    // After all of that the node still serves normal requests.
    let (s, v) = node.post("/v1/chat/completions", &chat_body("hi", 3));
    assert_eq!(s, 200, "{v}");

    // Per-key rate limit: 429 with retry_after once the bucket is empty.
    let (s, _) = node.call(
        Method::PUT,
        "/api/admin/config",
        &json!({ "rate_limit_per_minute": 3 }),
    );
    assert_eq!(s, 200);
    let mut limited = None;
    for _ in 0..6 {
        let (s, v) = node.get_authed("/api/admin/api-key");
        if s == 429 {
            limited = Some(v);
            break;
        }
    }
    let v = limited.expect("a 429 within 6 requests at 3/min");
    assert_eq!(v["error"]["code"], "RATE_LIMITED");
    assert!(
        v["error"]["details"]["retry_after"]
            .as_u64()
            .is_some_and(|r| r >= 1),
        "{v}"
    );
    // Rate limiting refuses requests; it does not take the node down.
    let (s, _) = node.get("/health/ready");
    assert_eq!(s, 200);
}

impl TestNode {
    fn get_authed(&self, path: &str) -> (u16, Value) {
        self.call(Method::GET, path, &Value::Null)
    }
}

#[test]
fn node_without_a_model_answers_503_and_stays_up() {
    let node = TestNode::start_without_model();
    let (s, v) = node.post("/v1/chat/completions", &chat_body("hi", 4));
    assert_eq!(s, 503, "{v}");
    assert_eq!(v["error"]["code"], "NO_MODEL_LOADED");
    let (s, v) = node.get("/health/ready");
    assert_eq!(s, 503);
    assert_eq!(v["error"]["code"], "NO_MODEL_LOADED");
    let (s, v) = node.get("/health/live");
    assert_eq!((s, v["status"].as_str()), (200, Some("alive")));
    let (_, v) = node.get("/v1/models");
    assert_eq!(v["data"], json!([]));
}

#[test]
fn config_and_nickname_survive_a_restart() {
    let mut node = TestNode::start();
    let (s, v) = node.call(
        Method::PUT,
        "/api/identity/nickname",
        &json!({ "nickname": "kitchen-pc" }),
    );
    assert_eq!(s, 200, "{v}");
    let (s, v) = node.call(
        Method::PUT,
        "/api/admin/config",
        &json!({ "rate_limit_per_minute": 1234, "default_max_tokens": 99 }),
    );
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["restart_required"], json!([]));
    // Hot fields apply at once.
    assert_eq!(
        node.get("/api/admin/config").1["rate_limit_per_minute"],
        1234
    );
    // Unknown keys and bad values are refused, naming the field, and change nothing.
    let (s, v) = node.call(
        Method::PUT,
        "/api/admin/config",
        &json!({ "no_such_field": 1 }),
    );
    assert_eq!(
        (s, v["error"]["details"]["field"].as_str()),
        (400, Some("no_such_field"))
    );
    let (s, v) = node.call(
        Method::PUT,
        "/api/admin/config",
        &json!({ "api_port": "high" }),
    );
    assert_eq!(
        (s, v["error"]["details"]["field"].as_str()),
        (400, Some("api_port"))
    );
    let (s, v) = node.call(
        Method::PUT,
        "/api/admin/config",
        &json!({ "log_format": "xml" }),
    );
    assert_eq!(
        (s, v["error"]["details"]["field"].as_str()),
        (400, Some("log_format"))
    );
    let (s, _) = node.call(
        Method::PUT,
        "/api/identity/nickname",
        &json!({ "nickname": "x".repeat(40) }),
    );
    assert_eq!(s, 422);
    let node_id = node.get("/api/identity/nickname").1["node_id"].clone();
    let key = node.key.clone();

    node.restart();

    assert_eq!(node.key, key, "the API key must persist");
    let (_, v) = node.get("/api/identity/nickname");
    assert_eq!(v["nickname"], "kitchen-pc");
    assert_eq!(v["node_id"], node_id, "the identity must persist");
    let (_, c) = node.get("/api/admin/config");
    assert_eq!(c["rate_limit_per_minute"], 1234);
    assert_eq!(c["default_max_tokens"], 99);
    let (s, v) = node.call(Method::DELETE, "/api/identity/nickname", &Value::Null);
    assert_eq!((s, &v["nickname"]), (200, &Value::Null));
    assert_eq!(
        node.get("/api/identity/nickname").1["nickname"],
        Value::Null
    );
    // The request log survived too: lifetime totals count requests before the restart.
    assert!(node.get("/api/v1/metrics").1["inference"]["requests_total"].is_u64());
    // The config file is plain TOML in the data dir.
    let toml = std::fs::read_to_string(node.dir().join("config.toml")).expect("config.toml");
    assert!(toml.contains("rate_limit_per_minute = 1234"), "{toml}");

    // POST /api/admin/config/reload picks up a hand edit of the file.
    std::fs::write(node.dir().join("config.toml"), toml.replace("1234", "777")).expect("write");
    let (s, v) = node.call(Method::POST, "/api/admin/config/reload", &Value::Null);
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["updated"], json!(["rate_limit_per_minute"]));
    assert_eq!(
        node.get("/api/admin/config").1["rate_limit_per_minute"],
        777
    );
}

#[test]
fn disconnecting_client_cancels_generation() {
    let node = TestNode::start();
    let body = json!({
        "prompt": "Count forever:", "max_tokens": 3000, "temperature": 0,
        "ignore_eos": true, "stream": true,
    });
    let mut resp = node
        .http()
        .post(node.url("/v1/completions"))
        .bearer_auth(&node.key)
        .json(&body)
        .send()
        .expect("send");
    let mut buf = [0u8; 256];
    let n = resp.read(&mut buf).expect("read first bytes");
    assert!(n > 0);
    drop(resp);
    // The engine notices and records the cancellation well before 3000 tokens.
    wait_for(
        "a cancelled request in /metrics",
        Duration::from_secs(20),
        || {
            let text = node
                .http()
                .get(node.url("/metrics"))
                .send()
                .ok()?
                .text()
                .ok()?;
            text.contains("outcome=\"cancelled\"").then_some(())
        },
    );
    // The engine is free again: a short request is answered promptly.
    let (s, _) = node.post(
        "/v1/completions",
        &json!({ "prompt": "Hi", "max_tokens": 2 }),
    );
    assert_eq!(s, 200);
}

#[test]
fn concurrent_requests_queue_and_all_succeed() {
    let node = TestNode::start();
    let body = chat_body("Give me one word.", 12);
    let results: Vec<(u16, Value)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..6)
            .map(|_| s.spawn(|| node.post("/v1/chat/completions", &body)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("thread"))
            .collect()
    });
    let first = chat_text(&results[0].1);
    for (s, v) in &results {
        assert_eq!(*s, 200, "{v}");
        assert_eq!(
            chat_text(v),
            first,
            "greedy answers must not depend on queueing"
        );
    }
    let (_, m) = node.get("/api/v1/metrics");
    assert!(
        m["inference"]["requests_total"].as_u64().unwrap_or(0) >= 6,
        "{m}"
    );
}

#[test]
fn shutdown_is_graceful_and_loopback_only() {
    let mut node = TestNode::start();
    // A long-ish generation in flight while shutdown is requested must complete.
    let stream_body = json!({
        "prompt": "Once upon a time", "max_tokens": 120, "temperature": 0,
        "ignore_eos": true, "stream": true, "stream_options": { "include_usage": true },
    });
    let (started_tx, started_rx) = std::sync::mpsc::channel();
    let events = std::thread::scope(|s| {
        let in_flight = s.spawn(|| {
            let mut resp = node
                .http()
                .post(node.url("/v1/completions"))
                .bearer_auth(&node.key)
                .json(&stream_body)
                .send()
                .expect("send");
            let mut first = [0u8; 1];
            resp.read_exact(&mut first).expect("first byte");
            started_tx.send(()).expect("signal");
            let mut rest = String::new();
            resp.read_to_string(&mut rest).expect("rest of the stream");
            let text = format!("{}{rest}", first[0] as char);
            text.split("\n\n")
                .filter_map(|ev| {
                    ev.lines()
                        .find_map(|l| l.strip_prefix("data:").map(|d| d.trim().to_string()))
                })
                .collect::<Vec<_>>()
        });
        started_rx
            .recv_timeout(Duration::from_secs(30))
            .expect("the stream to start");
        let (s, v) = node.call(Method::POST, "/api/admin/shutdown", &Value::Null);
        assert_eq!(s, 200, "{v}");
        in_flight.join().expect("in-flight request")
    });
    let (_, finish, usage) = stream_text(&events);
    assert_eq!(finish.as_deref(), Some("length"));
    assert_eq!(usage.expect("usage")["completion_tokens"], 120);
    assert!(
        node.wait_exit(Duration::from_secs(30)),
        "the node must exit cleanly"
    );
}

#[test]
fn cors_allows_only_the_apps_own_origins() {
    let node = TestNode::start_without_model();
    let preflight = |origin: &str| {
        node.http()
            .request(Method::OPTIONS, node.url("/v1/chat/completions"))
            .header("Origin", origin)
            .header("Access-Control-Request-Method", "POST")
            .header(
                "Access-Control-Request-Headers",
                "authorization,content-type",
            )
            .send()
            .expect("preflight")
            .headers()
            .get("access-control-allow-origin")
            .map(|v| v.to_str().unwrap_or("").to_string())
    };
    assert_eq!(
        preflight("tauri://localhost").as_deref(),
        Some("tauri://localhost")
    );
    let own = format!("http://127.0.0.1:{}", node.port);
    assert_eq!(preflight(&own).as_deref(), Some(own.as_str()));
    assert_eq!(preflight("https://evil.example"), None);
    assert_eq!(preflight("http://127.0.0.1:1"), None);
}

#[test]
fn metrics_expose_requests_tokens_latency_and_model() {
    let node = TestNode::start();
    let (s, v) = node.post("/v1/chat/completions", &chat_body("hello", 5));
    assert_eq!(s, 200);
    let completion = v["usage"]["completion_tokens"].as_u64().expect("u64");
    let text = node
        .http()
        .get(node.url("/metrics"))
        .send()
        .expect("metrics")
        .text()
        .expect("text");
    assert!(
        text.contains(
            "swarmllm_requests_total{endpoint=\"/v1/chat/completions\",outcome=\"ok\"} 1"
        ),
        "{text}"
    );
    assert!(
        text.contains(&format!("swarmllm_completion_tokens_total {completion}")),
        "{text}"
    );
    assert!(
        text.contains("swarmllm_request_duration_seconds_count 1"),
        "{text}"
    );
    assert!(
        text.contains("swarmllm_model_loaded{model=\"smollm2-135m-instruct.q4_1\"} 1"),
        "{text}"
    );
    // Batching: time in queue, the engine's batches and their sizes.
    for line in [
        "swarmllm_queue_seconds_count 1",
        "swarmllm_engine_active_sequences 0",
        "swarmllm_engine_peak_batch_sequences 1",
    ] {
        assert!(text.contains(line), "{line} in {text}");
    }
    assert!(
        text.lines().any(|l| l
            .strip_prefix("swarmllm_engine_batches ")
            .and_then(|n| n.parse::<u64>().ok())
            .is_some_and(|n| n >= 2)),
        "{text}"
    );
    let (_, m) = node.get("/api/v1/metrics");
    assert_eq!(m["inference"]["requests_total"], 1);
    assert_eq!(m["inference"]["tokens_generated"], json!(completion));
    assert!(
        m["inference"]["avg_latency_ms"]
            .as_f64()
            .is_some_and(|l| l > 0.0)
    );
    let (_, st) = node.get("/api/admin/stats");
    assert_eq!(st["node_id"].as_str().map(str::len), Some(64));
    assert!(
        st["hardware"]["cpu_threads"]
            .as_u64()
            .is_some_and(|n| n >= 1)
    );
    assert!(st["hardware"]["ram_total"].as_u64().is_some_and(|n| n > 0));
    assert_eq!(st["model"]["n_layers"], 30);
    // `gpu_layers = "auto"` (the default) on a machine whose llama.cpp has no
    // GPU device: nothing offloaded, and no GPU listed.
    assert_eq!(node.get("/api/admin/config").1["gpu_layers"], "auto");
    assert_eq!(st["hardware"]["gpus"], json!([]));
    assert_eq!(st["model"]["gpu_layers"], 0);
    let (_, ver) = node.get("/api/admin/version");
    assert_eq!(ver["version"], env!("CARGO_PKG_VERSION"));
    // `swarmllm` on its own has no updater (its package manager updates it):
    // the update routes say so (the desktop app's are tested in its e2e).
    assert_eq!(ver["updates"]["supported"], false, "{ver}");
    for path in ["/api/admin/update/check", "/api/admin/update/apply"] {
        let (status, v) = node.post(path, &json!({}));
        assert_eq!(status, 501, "{path}: {v}");
        assert_eq!(v["error"]["code"], "UPDATES_UNSUPPORTED", "{v}");
        assert!(
            v["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("package manager")),
            "{v}"
        );
    }
}

#[test]
fn the_node_serves_the_web_ui_and_renders_and_reads_invite_qr_codes() {
    let node = TestNode::start_without_model();
    let r = node.http().get(node.url("/")).send().expect("GET /");
    assert_eq!(r.status().as_u16(), 200);
    let csp = r
        .headers()
        .get("content-security-policy")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    assert!(csp.contains("default-src 'self'"), "{csp}");
    assert!(
        r.text()
            .expect("html")
            .contains("<script type=\"module\" src=\"app.js\">")
    );
    for (file, mime) in [
        ("app.js", "text/javascript"),
        ("client.js", "text/javascript"),
        ("style.css", "text/css"),
    ] {
        let r = node
            .http()
            .get(node.url(&format!("/{file}")))
            .send()
            .expect("GET");
        assert_eq!(r.status().as_u16(), 200, "{file}");
        let ct = r.headers()["content-type"]
            .to_str()
            .expect("ct")
            .to_string();
        assert!(ct.starts_with(mime), "{file}: {ct}");
    }
    let (status, v) = node.get("/secrets.enc");
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (404, Some("NOT_FOUND")),
        "{v}"
    );

    // The CLI prints the UI's address with the key in the fragment.
    let (ok, out, err) = common::cli(node.dir(), node.port, &["ui"]);
    assert!(ok, "{err}");
    assert_eq!(
        out.trim(),
        format!("http://127.0.0.1:{}/#key={}", node.port, node.key)
    );

    // QR: rendered for a valid code; pictures without one are refused clearly.
    let (status, v) = node.post("/api/pool/qr", &json!({ "code": "a3f7k2m9" }));
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["code"], "A3F7K2M9");
    assert!(v["svg"].as_str().expect("svg").contains("<svg"));
    assert_eq!(
        node.post("/api/pool/qr", &json!({ "code": "AB0O1I" })).0,
        400
    );
    let scan = |body: Vec<u8>| {
        let r = node
            .http()
            .post(node.url("/api/pool/scan-qr"))
            .bearer_auth(&node.key)
            .header("content-type", "image/png")
            .body(body)
            .send()
            .expect("scan");
        let status = r.status().as_u16();
        (status, r.json::<Value>().unwrap_or(Value::Null))
    };
    let (status, v) = scan(b"not a picture".to_vec());
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (400, Some("INVALID_IMAGE")),
        "{v}"
    );
    // The app icon is a picture without a QR code.
    let blank = std::fs::read(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../icons/32x32.png"),
    )
    .expect("icon");
    let (status, v) = scan(blank);
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (422, Some("NO_QR_CODE")),
        "{v}"
    );
    let unauthenticated = node
        .http()
        .post(node.url("/api/pool/scan-qr"))
        .body(vec![0u8; 4])
        .send()
        .expect("scan");
    assert_eq!(unauthenticated.status().as_u16(), 401);
}

#[test]
fn response_format_constrains_the_answer_to_json() {
    let node = TestNode::start();
    let ask = |format: Value, max_tokens: u32| {
        node.post(
            "/v1/chat/completions",
            &json!({ "messages": [{ "role": "user", "content": "Is the sky blue?" }],
                     "max_tokens": max_tokens, "temperature": 0, "response_format": format }),
        )
    };
    // A strict schema: exactly one key, one of two values, and a finished object.
    let schema = json!({
        "type": "object",
        "properties": { "answer": { "type": "string", "enum": ["yes", "no"] } },
        "required": ["answer"],
        "additionalProperties": false,
    });
    let (status, v) = ask(
        json!({ "type": "json_schema",
                "json_schema": { "name": "answer", "strict": true, "schema": schema } }),
        48,
    );
    assert_eq!(status, 200, "{v}");
    let content = v["choices"][0]["message"]["content"]
        .as_str()
        .expect("content");
    let parsed: Value = serde_json::from_str(content).unwrap_or_else(|e| panic!("{e}: {content}"));
    let answer = parsed["answer"].as_str().unwrap_or_default();
    assert!(answer == "yes" || answer == "no", "{content}");
    assert_eq!(parsed.as_object().map(|o| o.len()), Some(1), "{content}");
    assert_eq!(v["choices"][0]["finish_reason"], "stop", "{v}");
    // JSON mode: an object from the first character.
    let (status, v) = ask(json!({ "type": "json_object" }), 24);
    assert_eq!(status, 200, "{v}");
    let content = v["choices"][0]["message"]["content"]
        .as_str()
        .expect("content");
    assert!(content.trim_start().starts_with('{'), "{content}");
    if v["choices"][0]["finish_reason"] == "stop" {
        assert!(
            serde_json::from_str::<Value>(content).is_ok_and(|o| o.is_object()),
            "{content}"
        );
    }
    // `text` is no constraint; anything else is refused, naming the field.
    assert_eq!(ask(json!({ "type": "text" }), 4).0, 200);
    for bad in [
        json!({ "type": "xml" }),
        json!({ "type": "json_schema", "json_schema": { "name": "x" } }),
        json!({ "type": "json_schema", "json_schema": { "schema": { "type": "no-such-type" } } }),
    ] {
        let (status, v) = ask(bad.clone(), 4);
        assert_eq!(status, 422, "{bad}: {v}");
        assert_eq!(
            v["error"]["details"]["field"], "response_format",
            "{bad}: {v}"
        );
    }
}

#[test]
fn n_choices_come_back_together_each_with_its_own_seed() {
    let node = TestNode::start();
    let body = |n: u32, temperature: f64, seed: u32| {
        json!({ "messages": [{ "role": "user", "content": "Name a colour." }], "max_tokens": 12,
                "temperature": temperature, "seed": seed, "n": n })
    };
    // Sampled: three choices, indexed, each what that seed gives alone (the
    // request's seed plus the choice's index).
    let (status, v) = node.post("/v1/chat/completions", &body(3, 1.0, 40));
    assert_eq!(status, 200, "{v}");
    let choices = v["choices"].as_array().expect("choices");
    assert_eq!(choices.len(), 3, "{v}");
    let mut completion = 0;
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(c["index"], i, "{v}");
        let (status, alone) = node.post("/v1/chat/completions", &body(1, 1.0, 40 + i as u32));
        assert_eq!(status, 200, "{alone}");
        assert_eq!(
            c["message"]["content"], alone["choices"][0]["message"]["content"],
            "choice {i}"
        );
        completion += alone["usage"]["completion_tokens"]
            .as_u64()
            .expect("tokens");
    }
    // Usage: the prompt once, every choice's tokens.
    assert_eq!(v["usage"]["completion_tokens"], completion, "{v}");
    assert_eq!(
        v["usage"]["total_tokens"].as_u64(),
        Some(completion + v["usage"]["prompt_tokens"].as_u64().expect("prompt"))
    );
    // Streamed: the same three texts, each under its index, one finish per
    // choice and one usage chunk with every choice's tokens.
    let mut streamed = body(3, 1.0, 40);
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({ "include_usage": true });
    let events = node.post_stream("/v1/chat/completions", &streamed);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let mut texts = [String::new(), String::new(), String::new()];
    let (mut finishes, mut usages) = (0, Vec::new());
    for e in &events[..events.len() - 1] {
        let v: Value = serde_json::from_str(e).expect("chunk is JSON");
        if let Some(u) = v.get("usage").filter(|u| !u.is_null()) {
            usages.push(u.clone());
        }
        for c in v["choices"].as_array().expect("choices") {
            let i = c["index"].as_u64().expect("index") as usize;
            texts[i].push_str(c["delta"]["content"].as_str().unwrap_or(""));
            finishes += usize::from(c["finish_reason"].is_string());
        }
    }
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(
            c["message"]["content"],
            json!(texts[i]),
            "streamed choice {i}"
        );
    }
    assert_eq!(finishes, 3);
    assert_eq!(usages.len(), 1, "{usages:?}");
    assert_eq!(usages[0]["completion_tokens"], completion);
    // Completions too.
    let (status, v) = node.post(
        "/v1/completions",
        &json!({ "prompt": "The sky is", "max_tokens": 4, "temperature": 0, "n": 2 }),
    );
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["choices"][1]["index"], 1, "{v}");
    assert_eq!(
        v["choices"][0]["text"], v["choices"][1]["text"],
        "greedy choices agree"
    );
    let events = node.post_stream(
        "/v1/completions",
        &json!({ "prompt": "The sky is", "max_tokens": 4, "temperature": 0, "n": 2, "stream": true }),
    );
    let mut texts = [String::new(), String::new()];
    for e in &events[..events.len() - 1] {
        let v: Value = serde_json::from_str(e).expect("chunk is JSON");
        for c in v["choices"].as_array().expect("choices") {
            let i = c["index"].as_u64().expect("index") as usize;
            texts[i].push_str(c["text"].as_str().unwrap_or(""));
        }
    }
    assert_eq!(json!(texts[0]), v["choices"][0]["text"]);
    assert_eq!(json!(texts[1]), v["choices"][1]["text"]);
}

#[test]
fn a_client_key_runs_inference_and_nothing_else_until_revoked() {
    let node = TestNode::start();
    let as_client = |key: &str, method: Method, path: &str, body: &Value| {
        let r = node
            .http()
            .request(method, node.url(path))
            .bearer_auth(key)
            .json(body)
            .send()
            .expect("send");
        let status = r.status().as_u16();
        (status, r.json::<Value>().unwrap_or(Value::Null))
    };
    // Created with the node's key; the key is shown once, its hash kept.
    let (s, created) = node.post("/api/admin/api-keys", &json!({ "name": "notes app" }));
    assert_eq!(s, 201, "{created}");
    let key = created["key"].as_str().expect("key").to_string();
    let id = created["id"].as_str().expect("id").to_string();
    assert!(key.starts_with("swl-client-"), "{created}");
    let (s, list) = node.get_auth("/api/admin/api-keys");
    assert_eq!(s, 200, "{list}");
    assert_eq!(list["keys"][0]["name"], "notes app", "{list}");
    assert_eq!(list["keys"][0]["id"], json!(id), "{list}");
    assert!(
        list["keys"][0].get("key").is_none(),
        "a listing never shows the key: {list}"
    );
    assert!(
        list["queue_share"].as_u64().is_some_and(|n| n >= 1),
        "{list}"
    );
    for file in ["node.db", "node.db-wal"] {
        let bytes = std::fs::read(node.dir().join(file)).unwrap_or_default();
        assert!(
            !bytes.windows(key.len()).any(|w| w == key.as_bytes()),
            "the key itself is not in {file}"
        );
    }

    // It runs the model on every inference route...
    let (s, v) = as_client(
        &key,
        Method::POST,
        "/v1/chat/completions",
        &chat_body("hi", 3),
    );
    assert_eq!(s, 200, "{v}");
    let (s, v) = as_client(
        &key,
        Method::POST,
        "/v1/completions",
        &json!({ "prompt": "Hello", "max_tokens": 2 }),
    );
    assert_eq!(s, 200, "{v}");
    let (s, v) = as_client(
        &key,
        Method::POST,
        "/api/v1/inference",
        &json!({ "prompt": "Hello", "max_tokens": 2 }),
    );
    assert_eq!(s, 200, "{v}");
    // ...and nothing else: no writes, no key management, no node key.
    for (method, path) in [
        (Method::PUT, "/api/admin/config"),
        (Method::POST, "/api/admin/api-keys"),
        (Method::GET, "/api/admin/api-keys"),
        (Method::GET, "/api/admin/api-key"),
        (Method::PUT, "/api/pool/private-mode"),
    ] {
        let (s, v) = as_client(&key, method.clone(), path, &json!({ "name": "x" }));
        assert_eq!(s, 401, "{method} {path}: {v}");
    }

    // Bad names and unknown ids are clear errors.
    for body in [
        json!({ "name": "" }),
        json!({ "name": "a\u{7}b" }),
        json!({}),
        json!({ "name": "x", "admin": true }),
    ] {
        let (s, v) = node.post("/api/admin/api-keys", &body);
        assert_eq!(s, 400, "{body}: {v}");
    }
    let (s, v) = node.call(Method::DELETE, "/api/admin/api-keys/nope", &json!({}));
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (404, Some("KEY_NOT_FOUND")),
        "{v}"
    );

    // Revoked: refused at once.
    let (s, v) = node.call(
        Method::DELETE,
        &format!("/api/admin/api-keys/{id}"),
        &json!({}),
    );
    assert_eq!((s, &v["revoked"]["id"]), (200, &json!(id)), "{v}");
    let (s, v) = as_client(
        &key,
        Method::POST,
        "/v1/chat/completions",
        &chat_body("hi", 3),
    );
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (401, Some("UNAUTHORIZED")),
        "{v}"
    );
    assert_eq!(node.get_auth("/api/admin/api-keys").1["keys"], json!([]));
}

#[test]
fn responses_are_stored_listed_and_private_to_their_key() {
    let node = TestNode::start();
    let (s, r) = node.post(
        "/v1/responses",
        &json!({ "input": "Say hi.", "max_output_tokens": 4, "temperature": 0 }),
    );
    assert_eq!(s, 200, "{r}");
    let id = r["id"].as_str().expect("id").to_string();
    assert!(r["output"][0]["content"][0]["text"].is_string(), "{r}");
    // The admin listing, by status.
    let (s, list) = node.get_auth("/api/admin/responses?limit=5");
    assert_eq!(s, 200, "{list}");
    assert_eq!(list["responses"][0]["id"], json!(id), "{list}");
    let status = r["status"].as_str().expect("status");
    let (_, same) = node.get_auth(&format!("/api/admin/responses?status={status}"));
    assert_eq!(same["count"], 1, "{same}");
    let (_, none) = node.get_auth("/api/admin/responses?status=failed");
    assert_eq!(none["count"], 0, "{none}");
    for q in ["limit=0", "limit=501", "limit=x", "status=weird"] {
        let (s, v) = node.get_auth(&format!("/api/admin/responses?{q}"));
        assert_eq!(s, 422, "{q}: {v}");
    }
    // Another key neither sees it nor continues it.
    let (_, created) = node.post("/api/admin/api-keys", &json!({ "name": "other" }));
    let other = created["key"].as_str().expect("key").to_string();
    let as_other = |method: Method, path: &str, body: &Value| {
        let r = node
            .http()
            .request(method, node.url(path))
            .bearer_auth(&other)
            .json(body)
            .send()
            .expect("send");
        (
            r.status().as_u16(),
            r.json::<Value>().unwrap_or(Value::Null),
        )
    };
    let (s, _) = as_other(Method::GET, &format!("/v1/responses/{id}"), &json!({}));
    assert_eq!(s, 404);
    let (s, _) = as_other(
        Method::POST,
        "/v1/responses",
        &json!({ "input": "Go on.", "previous_response_id": id, "max_output_tokens": 2 }),
    );
    assert_eq!(s, 404);
    let (s, _) = as_other(Method::DELETE, &format!("/v1/responses/{id}"), &json!({}));
    assert_eq!(s, 404);
    // Bad requests are clear.
    for (body, field) in [
        (json!({ "input": [] }), "input"),
        (json!({ "input": 3 }), "input"),
        (
            json!({ "input": [{ "role": "wizard", "content": "x" }] }),
            "input[0].role",
        ),
        (
            json!({ "input": "x", "background": true, "store": false }),
            "background",
        ),
        (
            json!({ "input": "x", "max_output_tokens": 0 }),
            "max_output_tokens",
        ),
    ] {
        let (s, v) = node.post("/v1/responses", &body);
        assert_eq!(
            (s, &v["error"]["details"]["field"]),
            (422, &json!(field)),
            "{body}: {v}"
        );
    }
    // Only a background response can be cancelled; deleted means gone.
    let (s, _) = node.post(&format!("/v1/responses/{id}/cancel"), &json!({}));
    assert_eq!(s, 422);
    let (s, v) = node.call(Method::DELETE, &format!("/v1/responses/{id}"), &json!({}));
    assert_eq!((s, &v["deleted"]), (200, &json!(true)), "{v}");
    assert_eq!(node.get_auth(&format!("/v1/responses/{id}")).0, 404);
}
