//! Continuous batching in the local engine, through the HTTP API of a real node:
//! requests decoded together answer exactly as each does alone, a long prompt
//! chunked over several steps among short ones included, and a client that
//! leaves frees its sequence at once.

mod common;

use std::io::Read;
use std::time::Duration;

use common::{TestNode, wait_for};
use serde_json::{Value, json};

fn node(max_parallel: &str, batch_size: &str) -> TestNode {
    TestNode::start_custom(
        true,
        &[],
        &[
            ("SWARMLLM_MAX_PARALLEL", max_parallel),
            ("SWARMLLM_BATCH_SIZE", batch_size),
            ("SWARMLLM_RATE_LIMIT_PER_MINUTE", "0"),
        ],
        |_| {},
    )
}

fn ask(node: &TestNode, prompt: &str) -> String {
    let (s, v) = node.post(
        "/v1/chat/completions",
        &json!({
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": 24, "temperature": 0,
        }),
    );
    assert_eq!(s, 200, "{v}");
    v["choices"][0]["message"]["content"]
        .as_str()
        .expect("content")
        .to_string()
}

fn engine_stats(node: &TestNode) -> Value {
    node.get_auth("/api/admin/stats").1["engine"].clone()
}

#[test]
fn requests_decoded_together_answer_as_each_alone() {
    // Four sequences at once, and a batch of 32 tokens: the long prompt takes
    // several steps, sharing them with the others' tokens.
    let node = node("4", "32");
    let long = format!(
        "Read this list and tell me which animal comes third: {}",
        (0..40)
            .map(|i| ["cat", "dog", "owl", "fox", "eel"][i % 5])
            .collect::<Vec<_>>()
            .join(", ")
    );
    let prompts = [
        "What is the capital of France?",
        "Write a haiku about rivers.",
        long.as_str(),
        "List three prime numbers.",
        "Why is the sky blue?",
        "Name a color.",
    ];
    let alone: Vec<String> = prompts.iter().map(|p| ask(&node, p)).collect();
    let together: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = prompts.iter().map(|p| s.spawn(|| ask(&node, p))).collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("thread"))
            .collect()
    });
    for ((p, a), t) in prompts.iter().zip(&alone).zip(&together) {
        assert_eq!(a, t, "prompt {p:?}: alone vs decoded with others");
    }
    let stats = engine_stats(&node);
    assert!(
        stats["peak_batch_sequences"].as_u64().unwrap_or(0) >= 2,
        "the requests were never decoded together: {stats}"
    );
    assert_eq!(stats["queue_depth"], 0, "{stats}");
}

#[test]
fn a_client_that_leaves_frees_its_sequence_at_once() {
    let node = node("2", "512");
    let long = json!({
        "prompt": "Count forever:", "max_tokens": 3000, "temperature": 0,
        "ignore_eos": true, "stream": true,
    });
    let open = |body: &Value| {
        let mut resp = node
            .http()
            .post(node.url("/v1/completions"))
            .bearer_auth(&node.key)
            .json(body)
            .send()
            .expect("send");
        let mut buf = [0u8; 64];
        assert!(resp.read(&mut buf).expect("first bytes") > 0);
        resp
    };
    let staying = open(&long);
    let leaving = open(&long);
    wait_for("two sequences running", Duration::from_secs(30), || {
        (engine_stats(&node)["active_sequences"] == 2).then_some(())
    });
    drop(leaving);
    // Its sequence is freed at the next step, while the other keeps going.
    wait_for("one sequence running", Duration::from_secs(30), || {
        (engine_stats(&node)["active_sequences"] == 1).then_some(())
    });
    // A new request gets the freed sequence and is answered while the first
    // long one still runs (it has thousands of tokens to go).
    let (s, v) = node.post(
        "/v1/completions",
        &json!({ "prompt": "Hi", "max_tokens": 4, "temperature": 0 }),
    );
    assert_eq!(s, 200, "{v}");
    assert_eq!(engine_stats(&node)["active_sequences"], 1);
    drop(staying);
    wait_for("no sequence running", Duration::from_secs(30), || {
        (engine_stats(&node)["active_sequences"] == 0).then_some(())
    });
}

fn chat(node: &TestNode, messages: &Value) -> (String, u64, u64) {
    let (s, v) = node.post(
        "/v1/chat/completions",
        &json!({ "messages": messages, "max_tokens": 24, "temperature": 0 }),
    );
    assert_eq!(s, 200, "{v}");
    let text = v["choices"][0]["message"]["content"]
        .as_str()
        .expect("content")
        .to_string();
    let usage = &v["usage"];
    (
        text,
        usage["prompt_tokens"].as_u64().expect("prompt_tokens"),
        usage["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .expect("cached_tokens"),
    )
}

#[test]
fn a_chats_next_turn_reuses_its_history_and_answers_as_a_cold_prompt() {
    // One sequence: every request takes over the same stream.
    let node = node("1", "512");
    let facts: String = (0..40)
        .map(|i| {
            format!(
                "Fact {i}: {i} is {}. ",
                if i % 2 == 0 { "even" } else { "odd" }
            )
        })
        .collect();
    let system = json!({"role": "system", "content": format!("You know these facts. {facts}")});
    let (first, first_prompt, first_cached) = chat(
        &node,
        &json!([system, {"role": "user", "content": "Is 7 odd?"}]),
    );
    assert_eq!(first_cached, 0, "a fresh node has nothing cached");
    let turn2 = json!([
        system,
        {"role": "user", "content": "Is 7 odd?"},
        {"role": "assistant", "content": first},
        {"role": "user", "content": "And is 10 even?"},
    ]);
    // The next turn computes only what is new: the history (the first prompt
    // and most of its answer) comes from the cache.
    let (warm, prompt, cached) = chat(&node, &turn2);
    assert!(
        cached >= first_prompt && cached < prompt,
        "cached {cached} of {prompt} (the first prompt had {first_prompt})"
    );
    // Another conversation takes the stream over...
    let (_, _, _) = chat(
        &node,
        &json!([{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Name a fish."}]),
    );
    // ...so the same turn now runs (almost) cold, and says the same.
    let (cold, cold_prompt, cold_cached) = chat(&node, &turn2);
    assert_eq!(cold_prompt, prompt);
    assert!(cold_cached < 16, "cold run reused {cold_cached} tokens");
    assert_eq!(
        warm, cold,
        "a cached prefix must give the cold prompt's text"
    );
    // `cache_prompt: false` (llama-server's switch) computes every token.
    let (s, v) = node.post(
        "/v1/chat/completions",
        &json!({ "messages": turn2, "max_tokens": 24, "temperature": 0, "cache_prompt": false }),
    );
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        v["usage"]["prompt_tokens_details"]["cached_tokens"], 0,
        "{v}"
    );
    assert_eq!(v["choices"][0]["message"]["content"], json!(warm));
}

#[test]
fn past_the_queue_a_request_gets_429_with_retry_after() {
    // One sequence, one waiting place.
    let node = TestNode::start_custom(
        true,
        &[],
        &[
            ("SWARMLLM_MAX_PARALLEL", "1"),
            ("SWARMLLM_MAX_QUEUE", "1"),
            ("SWARMLLM_RATE_LIMIT_PER_MINUTE", "0"),
        ],
        |_| {},
    );
    let long = json!({
        "prompt": "Count forever:", "max_tokens": 3000, "temperature": 0,
        "ignore_eos": true, "stream": true,
    });
    let mut running = node
        .http()
        .post(node.url("/v1/completions"))
        .bearer_auth(&node.key)
        .json(&long)
        .send()
        .expect("send");
    let mut buf = [0u8; 64];
    assert!(running.read(&mut buf).expect("first bytes") > 0);
    std::thread::scope(|s| {
        // The second waits for the sequence (its answer starts only when the
        // first ends, so it runs on its own thread)...
        let waiting = s.spawn(|| {
            node.http()
                .post(node.url("/v1/completions"))
                .bearer_auth(&node.key)
                .json(&json!({ "prompt": "Hi", "max_tokens": 2, "temperature": 0 }))
                .send()
                .map(|r| r.status().as_u16())
        });
        wait_for("one request queued", Duration::from_secs(30), || {
            (engine_stats(&node)["queue_depth"] == 1).then_some(())
        });
        // ...and the third finds the queue full.
        let r = node
            .http()
            .post(node.url("/v1/completions"))
            .bearer_auth(&node.key)
            .json(&json!({ "prompt": "Hi", "max_tokens": 2 }))
            .send()
            .expect("send");
        assert_eq!(r.status().as_u16(), 429);
        assert_eq!(
            r.headers().get("retry-after").and_then(|v| v.to_str().ok()),
            Some("1")
        );
        let body: Value = r.json().expect("json");
        assert_eq!(body["error"]["code"], "OVERLOADED", "{body}");
        assert!(
            body["error"]["details"]["retry_after"].as_u64().is_some(),
            "{body}"
        );
        // The first one leaves: the waiting one is served.
        drop(running);
        assert_eq!(waiting.join().expect("thread").expect("answer"), 200);
    });
}

#[test]
fn api_keys_share_the_queue_and_take_turns() {
    // One sequence, four waiting places: each key may hold two of them.
    let node = TestNode::start_custom(
        true,
        &[],
        &[
            ("SWARMLLM_MAX_PARALLEL", "1"),
            ("SWARMLLM_MAX_QUEUE", "4"),
            ("SWARMLLM_RATE_LIMIT_PER_MINUTE", "0"),
        ],
        |_| {},
    );
    let (s, created) = node.post("/api/admin/api-keys", &json!({ "name": "second app" }));
    assert_eq!(s, 201, "{created}");
    let client_key = created["key"].as_str().expect("key").to_string();
    let client_id = created["id"].as_str().expect("id").to_string();
    let send = |key: &str, body: &Value| {
        node.http()
            .post(node.url("/v1/completions"))
            .bearer_auth(key)
            .json(body)
            .send()
            .expect("send")
    };
    let short = json!({ "prompt": "Hi", "max_tokens": 8, "temperature": 0, "ignore_eos": true });

    // The node's key holds the only sequence...
    let mut running = send(
        &node.key,
        &json!({ "prompt": "Count forever:", "max_tokens": 3000, "temperature": 0,
                 "ignore_eos": true, "stream": true }),
    );
    let mut buf = [0u8; 64];
    assert!(running.read(&mut buf).expect("first bytes") > 0);
    std::thread::scope(|s| {
        let done = |key: String| {
            let short = short.clone();
            let send = &send;
            move || {
                let status = send(&key, &short).status().as_u16();
                (status, std::time::Instant::now())
            }
        };
        // ...and queues two more: its share.
        let first = s.spawn(done(node.key.clone()));
        let second = s.spawn(done(node.key.clone()));
        wait_for(
            "two of the node key's requests queued",
            Duration::from_secs(30),
            || (engine_stats(&node)["queue_depth"] == 2).then_some(()),
        );
        // Its third is refused although the queue has room...
        let r = send(&node.key, &short);
        assert_eq!(r.status().as_u16(), 429);
        let body: Value = r.json().expect("json");
        assert_eq!(body["error"]["code"], "OVERLOADED", "{body}");
        assert_eq!(
            body["error"]["details"]["waiting_for_this_key"], 2,
            "{body}"
        );
        // ...which another key still gets.
        let other = s.spawn(done(client_key.clone()));
        wait_for(
            "the client key's request queued",
            Duration::from_secs(30),
            || {
                let (_, list) = node.get_auth("/api/admin/api-keys");
                let keys = list["keys"].as_array()?.clone();
                keys.iter()
                    .any(|k| k["id"] == json!(client_id) && k["waiting"] == 1)
                    .then_some(())
            },
        );
        assert_eq!(engine_stats(&node)["queue_depth"], 3);
        // The sequence frees: keys take turns, so the client key's one request
        // is not served after both of the node key's (first come, first served
        // would put it last).
        drop(running);
        let (a, b, c) = (
            first.join().expect("thread"),
            second.join().expect("thread"),
            other.join().expect("thread"),
        );
        assert_eq!((a.0, b.0, c.0), (200, 200, 200));
        assert!(
            c.1 < a.1.max(b.1),
            "the client key's request finished last: keys did not take turns"
        );
    });
}
