//! Split inference across separate node processes on loopback: SmolLM2 in three
//! shards held by three nodes gives exactly the whole model's greedy output, a
//! killed hop is replaced by its standby mid-stream without the client noticing,
//! a model nobody can cover gets 503 naming the missing layers, and malformed
//! activation frames are refused without harm.

mod common;

use std::io::{BufRead, BufReader};
use std::time::Duration;

use common::{TestNode, cli, give_shards, network_code, node_id, rogue_peer, wait_for};
use serde_json::{Value, json};
use swarmllm_node::net::frame::{Request, Response};

const DEADLINE: Duration = Duration::from_secs(90);

const PROMPTS: &[&str] = &[
    "Write a short poem about the sea.",
    "Explain in a few sentences why the sky is blue.",
    "List five fruits and say one thing about each.",
];
const STORY: &str = "Tell me a long story about a lighthouse keeper and a storm.";

/// The test model as 3 shards with id `smol`.
fn import_library() -> tempfile::TempDir {
    common::import_shards(3)
}

fn chat(node: &TestNode, model: Option<&str>, prompt: &str, max_tokens: u32) -> (u16, Value) {
    let mut body = json!({
        "messages": [{ "role": "user", "content": prompt }],
        "max_tokens": max_tokens,
        "temperature": 0,
    });
    if let Some(m) = model {
        body["model"] = json!(m);
    }
    node.post("/v1/chat/completions", &body)
}

/// A chat whose answer must follow a small JSON schema (`response_format`).
fn structured(node: &TestNode, model: Option<&str>) -> (u16, Value) {
    let schema = json!({
        "type": "object",
        "properties": { "answer": { "type": "string", "enum": ["yes", "no"] } },
        "required": ["answer"],
        "additionalProperties": false,
    });
    let mut body = json!({
        "messages": [{ "role": "user", "content": "Is the sky blue?" }],
        "max_tokens": 48,
        "temperature": 0,
        "response_format": { "type": "json_schema", "json_schema": { "name": "a", "schema": schema } },
    });
    if let Some(m) = model {
        body["model"] = json!(m);
    }
    node.post("/v1/chat/completions", &body)
}

fn logprobs_body(model: Option<&str>) -> Value {
    let mut body = json!({ "messages": [{ "role": "user", "content": PROMPTS[0] }],
                           "max_tokens": 8, "temperature": 0, "logprobs": true, "top_logprobs": 3 });
    if let Some(m) = model {
        body["model"] = json!(m);
    }
    body
}

fn content(v: &Value) -> String {
    v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_else(|| panic!("no content in {v}"))
        .to_string()
}

/// Waits until `node` can serve `smol` through holders of `holders` distinct nodes.
fn wait_servable(node: &TestNode, holders: u64) {
    wait_for(
        &format!("smol servable via {holders} holders"),
        DEADLINE,
        || {
            let (_, models) = node.get("/v1/models");
            models["data"]
                .as_array()?
                .iter()
                .find(|m| m["id"] == "smol" && m["meta"]["holders"].as_u64() == Some(holders))
                .map(|_| ())
        },
    );
}

#[test]
fn three_way_split_matches_local_greedy_output_and_survives_a_killed_hop() {
    // What the whole model says, on one node.
    let (reference, story_reference, structured_reference, logprobs_reference) = {
        let whole = TestNode::start();
        let answers: Vec<(String, Value)> = PROMPTS
            .iter()
            .map(|p| {
                let (status, v) = chat(&whole, None, p, 64);
                assert_eq!(status, 200, "{v}");
                (content(&v), v["usage"]["completion_tokens"].clone())
            })
            .collect();
        let (status, story) = chat(&whole, None, STORY, 160);
        assert_eq!(status, 200, "{story}");
        let (status, v) = structured(&whole, None);
        assert_eq!(status, 200, "{v}");
        let (status, lp) = whole.post("/v1/chat/completions", &logprobs_body(None));
        assert_eq!(status, 200, "{lp}");
        (answers, content(&story), content(&v), lp)
    };

    let lib = import_library();
    // f32 activations (the default, set here all the same): the exact wire format.
    let a = TestNode::start_custom(false, &[], &[("SWARMLLM_ACTIVATION_DTYPE", "f32")], |d| {
        give_shards(lib.path(), d, &[0])
    });
    let code = network_code(&a);
    let b = TestNode::start_custom(false, &["--bootstrap", &code], &[], |d| {
        give_shards(lib.path(), d, &[1])
    });
    let c = TestNode::start_custom(false, &["--bootstrap", &code], &[], |d| {
        give_shards(lib.path(), d, &[2])
    });
    wait_servable(&a, 3);

    // A JSON schema holds through the split (the last hop samples with the
    // grammar llama.cpp makes from it) and answers as the whole model does.
    let (status, v) = structured(&a, Some("smol"));
    assert_eq!(status, 200, "{v}");
    assert_eq!(content(&v), structured_reference);
    let parsed: Value = serde_json::from_str(&content(&v)).expect("JSON through the split");
    assert!(
        parsed["answer"] == "yes" || parsed["answer"] == "no",
        "{parsed}"
    );

    // Each node runs only its own layers.
    for (node, range) in [(&a, (0, 10)), (&b, (10, 20)), (&c, (20, 30))] {
        let (_, layers) = node.get("/api/v1/layers");
        assert_eq!(layers["my_layer_count"], 10, "{layers}");
        assert_eq!(layers["ranges"][0]["layer_start"], range.0);
        assert_eq!(layers["ranges"][0]["layer_end"], range.1);
    }

    // The first requests arrive together: the vocabulary is loaded once, by
    // whoever asks first, and every one of them is answered (it once raced: some
    // got 503 NO_TOKENIZER).
    std::thread::scope(|scope| {
        let answers: Vec<_> = (0..4)
            .map(|i| {
                let a = &a;
                scope.spawn(move || chat(a, Some("smol"), PROMPTS[i % PROMPTS.len()], 64))
            })
            .collect();
        for (i, answer) in answers.into_iter().enumerate() {
            let (status, v) = answer.join().expect("request thread");
            assert_eq!(status, 200, "concurrent first request {i}: {v}");
            assert_eq!(content(&v), reference[i % PROMPTS.len()].0, "request {i}");
        }
    });
    // The hops decoded steps of those sessions together (single-token steps
    // that arrived at once share a batch) and still answered exactly.
    let batched: u64 = [&b, &c]
        .iter()
        .map(|n| {
            n.get("/api/v1/layers").1["batched"]["steps"]
                .as_u64()
                .unwrap_or(0)
        })
        .sum();
    assert!(batched > 0, "no steps of concurrent sessions were batched");

    for (prompt, (text, tokens)) in PROMPTS.iter().zip(&reference) {
        let (status, v) = chat(&a, Some("smol"), prompt, 64);
        assert_eq!(status, 200, "{v}");
        assert_eq!(&content(&v), text, "prompt {prompt:?}");
        assert_eq!(&v["usage"]["completion_tokens"], tokens);
    }
    // Log-probabilities come back from the last hop: the same tokens and
    // alternatives as the whole model's, the same values within f32 rounding.
    let (status, v) = a.post("/v1/chat/completions", &logprobs_body(Some("smol")));
    assert_eq!(status, 200, "{v}");
    let split = v["choices"][0]["logprobs"]["content"]
        .as_array()
        .expect("split logprobs");
    let whole = logprobs_reference["choices"][0]["logprobs"]["content"]
        .as_array()
        .expect("whole logprobs");
    assert!(!split.is_empty() && split.len() == whole.len(), "{v}");
    for (s, w) in split.iter().zip(whole) {
        assert_eq!(s["token"], w["token"]);
        let names = |e: &Value| -> Vec<Value> {
            e["top_logprobs"]
                .as_array()
                .expect("top")
                .iter()
                .map(|t| t["token"].clone())
                .collect()
        };
        assert_eq!(names(s), names(w));
        let (a, b) = (
            s["logprob"].as_f64().expect("lp"),
            w["logprob"].as_f64().expect("lp"),
        );
        assert!((a - b).abs() < 1e-3, "{a} vs {b}");
    }

    // A standby for the middle span, then kill -9 whichever middle node is in use
    // while a long answer streams.
    let mut d = TestNode::start_custom(false, &["--bootstrap", &code], &[], |dir| {
        give_shards(lib.path(), dir, &[1])
    });
    wait_servable(&a, 4);
    let mut b = b;
    let b_id = node_id(&b);
    let response = a
        .http()
        .post(a.url("/v1/chat/completions"))
        .bearer_auth(&a.key)
        .json(&json!({
            "model": "smol",
            "messages": [{ "role": "user", "content": STORY }],
            "max_tokens": 160,
            "temperature": 0,
            "stream": true,
        }))
        .send()
        .expect("stream");
    assert_eq!(response.status().as_u16(), 200);
    let mut lines = BufReader::new(response).lines();
    let mut text = String::new();
    let mut events = 0;
    let mut killed = None;
    let mut middle_steps = None;
    let mut finish = Value::Null;
    while let Some(Ok(line)) = lines.next() {
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            break;
        }
        let v: Value = serde_json::from_str(data).expect("chunk json");
        if let Some(t) = v["choices"][0]["delta"]["content"].as_str() {
            text.push_str(t);
            events += 1;
        }
        if !v["choices"][0]["finish_reason"].is_null() {
            finish = v["choices"][0]["finish_reason"].clone();
        }
        // The middle node in use is the one whose step counter moves.
        if events == 4 {
            middle_steps = Some((steps_served(&b), steps_served(&d)));
        }
        if events == 8 && killed.is_none() {
            let (b0, d0) = middle_steps.expect("counted at 4 events");
            let victim = if steps_served(&b) > b0 {
                &mut b
            } else {
                assert!(steps_served(&d) > d0, "neither middle node is serving");
                &mut d
            };
            killed = Some(node_id(victim));
            victim.kill();
        }
    }
    assert!(killed.is_some(), "the stream ended before the kill");
    assert_eq!(
        text,
        story_reference,
        "the re-routed stream changed the text; requester's log:\n{}",
        a.log()
    );
    assert!(!finish.is_null());
    assert!(
        a.log().contains("re-routing"),
        "no re-route happened: {}",
        a.log()
    );

    // With both middle nodes gone there is no route: 503 naming layers 10-19.
    if killed.as_deref() == Some(b_id.as_str()) {
        d.kill();
    } else {
        b.kill();
    }
    let (status, v) = wait_for("A to notice the middle span is gone", DEADLINE, || {
        let (status, v) = chat(&a, Some("smol"), "Hi", 4);
        (status == 503).then_some((status, v))
    });
    assert_eq!(status, 503);
    assert_eq!(v["error"]["code"], "NO_ROUTE", "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("10-19"),
        "{v}"
    );
    assert_eq!(
        v["error"]["details"]["missing_layers"],
        json!([{ "start": 10, "end": 20 }])
    );
}

#[test]
fn unknown_models_404_and_malformed_activation_frames_are_refused() {
    let lib = import_library();
    // Every case must reach the node: no ban however low the rogue's trust falls.
    let a = TestNode::start_custom(false, &[], &[("SWARMLLM_PEER_BAN_TRUST", "0")], |d| {
        give_shards(lib.path(), d, &[0])
    });
    let (status, v) = chat(&a, Some("no-such-model"), "Hi", 4);
    assert_eq!(status, 404, "{v}");
    assert_eq!(v["error"]["code"], "MODEL_NOT_FOUND");
    // Alone with shard 0, layers 10-29 are missing.
    let (status, v) = chat(&a, Some("smol"), "Hi", 4);
    assert_eq!(status, 503, "{v}");
    assert_eq!(
        v["error"]["details"]["missing_layers"],
        json!([{ "start": 10, "end": 30 }])
    );

    let a_id = node_id(&a);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let tmp = tempfile::tempdir().expect("tempdir");
    let (rogue, _) = rogue_peer(&rt, tmp.path());
    rt.block_on(rogue.add_seed_and_dial(&network_code(&a), "test"))
        .expect("rogue joins");
    let envelope = |route_to: &str, input: &str| {
        json!({
            "session": "00112233445566778899aabbccddeeff",
            "seq": 1,
            "requester": route_to,
            "route": [{ "node_id": route_to, "model_id": "smol", "layer_start": 0, "layer_end": 10 }],
            "pos": 0,
            "n_tokens": 2,
            "input": input,
            "dtype": "f16",
        })
    };
    let frame = |env: &Value, body: &[u8]| {
        let head = serde_json::to_vec(env).expect("json");
        let mut out = (head.len() as u32).to_be_bytes().to_vec();
        out.extend_from_slice(&head);
        out.extend_from_slice(body);
        out
    };
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty", vec![]),
        ("garbage", vec![0xAB; 300]),
        ("envelope length past the end", vec![0, 0, 0xff, 0xff, b'{']),
        ("not json", frame(&json!("x"), &[])),
        (
            "tokens sealed with the wrong key",
            frame(&envelope(&a_id, "tokens"), &[7; 24]),
        ),
        (
            "hidden states sealed with the wrong key",
            frame(&envelope(&a_id, "hidden"), &[1; 40 + 2 * 576 * 2 + 16]),
        ),
    ];
    // Every case on one link: a refused step leaves the link usable.
    let mut link = rt.block_on(rogue.open_link(&a_id)).expect("link");
    for (what, bytes) in cases {
        match rt.block_on(link.call(Request::Activation(bytes))) {
            Ok(Response::Error { code, message }) => {
                assert_eq!(code, 400, "{what}: {message}");
            }
            other => panic!("{what}: {other:?}"),
        }
    }
    // A frame of another version, and a request a link does not carry.
    let mut wrong_version = 2u32.to_be_bytes().to_vec();
    wrong_version.extend_from_slice(&[9, 0x10]);
    for (what, request) in [
        ("wrong version", Request::Raw(wrong_version)),
        ("echo on a link", Request::Echo(vec![1, 2, 3])),
    ] {
        match rt.block_on(link.call(request)) {
            Ok(Response::Error { code, message }) => assert_eq!(code, 400, "{what}: {message}"),
            other => panic!("{what}: {other:?}"),
        }
    }
    // Steps do not travel as request-response messages.
    match rt.block_on(rogue.request(&a_id, Request::Activation(vec![0; 8]))) {
        Ok(Response::Error { code, message }) => {
            assert_eq!(code, 400, "{message}");
            assert!(message.contains("/swarmllm/step/1"), "{message}");
        }
        other => panic!("request-response step: {other:?}"),
    }
    // Still serving, and the frames counted against the sender.
    assert_eq!(a.get("/health/live").0, 200);
    let (_, stats) = a.get("/api/admin/stats");
    assert!(
        stats["p2p"]["counters"]["bad_frames"].as_u64() >= Some(8),
        "{stats}"
    );
}

fn model_status(node: &TestNode) -> Value {
    node.get("/api/admin/models/smol/status").1
}

fn wait_all_held(node: &TestNode, what: &str) -> Value {
    wait_for(what, DEADLINE, || {
        let v = model_status(node);
        (v["held_shards"] == json!([0, 1, 2]) && v["shards"][1]["corrupt"] == false).then_some(v)
    })
}

#[test]
fn shards_travel_between_peers_verified_resumable_and_repaired() {
    let lib = import_library();
    let a = TestNode::start_custom(false, &[], &[], |d| give_shards(lib.path(), d, &[0, 1, 2]));
    let code = network_code(&a);
    // B has nothing but the first MiB of shard 1 from an interrupted download.
    let b = TestNode::start_custom(false, &["--bootstrap", &code], &[], |d| {
        let dir = d.join("models/smol");
        std::fs::create_dir_all(&dir).expect("mkdir");
        let shard = std::fs::read(lib.path().join("models/smol/shard-001.gguf")).expect("read");
        std::fs::write(dir.join("shard-001.gguf.part"), &shard[..1 << 20]).expect("write");
    });
    wait_for("B to see A's model", DEADLINE, || {
        let (_, v) = b.get("/api/admin/models");
        v["models"]
            .as_array()?
            .iter()
            .find(|m| m["id"] == "smol" && m["holders"].as_u64() >= Some(1))
            .map(|_| ())
    });

    // The CLI acquires the whole model with progress bars and waits for it.
    let (ok, out, err) = cli(b.dir(), b.port, &["models", "add", "smol"]);
    assert!(ok, "models add: {out}{err}");
    assert!(out.contains("downloaded and verified"), "{out}");
    let status = wait_all_held(&b, "B to hold all shards");
    assert_eq!(status["complete"], true);
    let (_, downloads) = b.get("/api/admin/downloads");
    let shard1 = downloads["downloads"]
        .as_array()
        .expect("list")
        .iter()
        .find(|d| d["shard_index"] == 1)
        .expect("shard 1 download")
        .clone();
    assert_eq!(shard1["resumed_from"], 1 << 20, "{shard1}");
    assert_eq!(shard1["status"], "done");
    let (_, layers) = b.get("/api/v1/layers");
    assert_eq!(layers["my_layer_count"], 30);
    // The downloaded model answers exactly as the original holder.
    let (_, from_a) = chat(&a, Some("smol"), PROMPTS[1], 24);
    let (_, from_b) = chat(&b, Some("smol"), PROMPTS[1], 24);
    assert_eq!(content(&from_a), content(&from_b));

    // A damaged shard is caught by its hash on rescan and fetched again.
    let victim = b.dir().join("models/smol/shard-001.gguf");
    let original = swarmllm_node::shard::hash_file(&lib.path().join("models/smol/shard-001.gguf"))
        .expect("hash")
        .blake3;
    let mut bytes = std::fs::read(&victim).expect("read");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x55;
    std::fs::write(&victim, bytes).expect("write");
    let (status, _) = b.post("/api/admin/rescan-shards", &json!({}));
    assert_eq!(status, 200);
    wait_all_held(&b, "the damaged shard to be fetched again");
    assert_eq!(
        swarmllm_node::shard::hash_file(&victim)
            .expect("hash")
            .blake3,
        original
    );
    assert!(b.log().contains("does not match its BLAKE3"));

    // Locked shards cannot be deleted; unlocked ones can, and come back on request.
    let put = |path: &str, body: Value| b.call(reqwest::Method::PUT, path, &body);
    assert_eq!(
        put(
            "/api/admin/models/smol/shards/2/lock",
            json!({ "locked": true })
        )
        .0,
        200
    );
    let (status, v) = b.call(
        reqwest::Method::DELETE,
        "/api/admin/models/smol/shards/2",
        &Value::Null,
    );
    assert_eq!(status, 409, "{v}");
    assert_eq!(
        put(
            "/api/admin/models/smol/shards/2/lock",
            json!({ "locked": false })
        )
        .0,
        200
    );
    let (ok, out, err) = cli(b.dir(), b.port, &["models", "rm", "smol", "--shard", "2"]);
    assert!(ok, "rm shard: {out}{err}");
    assert_eq!(b.get("/api/v1/layers").1["my_layer_count"], 20);
    let (status, v) = b.post("/api/admin/models/smol/shards/2/download", &json!({}));
    assert_eq!(
        (status, v["status"].as_str()),
        (200, Some("downloading")),
        "{v}"
    );
    wait_all_held(&b, "shard 2 to come back");
    let (status, v) = b.post("/api/admin/models/smol/shards/2/download", &json!({}));
    assert_eq!(
        (status, v["status"].as_str()),
        (200, Some("already_local")),
        "{v}"
    );

    // Unload and load keep the files and change what runs.
    let (_, v) = b.post("/api/admin/models/smol/shards/0/unload", &json!({}));
    assert_eq!(v["remaining_loaded"], json!([1, 2]), "{v}");
    assert_eq!(b.get("/api/v1/layers").1["my_layer_count"], 20);
    let (_, v) = b.post("/api/admin/models/smol/shards/0/load", &json!({}));
    assert_eq!(v["loaded_shards"], json!([0, 1, 2]), "{v}");
    let (_, storage) = b.get("/api/admin/shard-storage");
    assert_eq!(
        storage["models"][0]["shards_on_disk"],
        json!([0, 1, 2]),
        "{storage}"
    );

    // Bad requests are clear errors.
    assert_eq!(
        b.post("/api/admin/models/smol/shards/9/download", &json!({}))
            .0,
        400
    );
    assert_eq!(
        b.post("/api/admin/downloads/nope/cancel", &json!({})).0,
        404
    );
    assert_eq!(b.post("/api/admin/models/ghost/add", &json!({})).0, 400);

    // Removing the model deletes its files.
    let (ok, out, err) = cli(b.dir(), b.port, &["models", "rm", "smol"]);
    assert!(ok, "rm: {out}{err}");
    assert!(!b.dir().join("models/smol").exists());
    assert_eq!(b.get("/api/v1/layers").1["my_layer_count"], 0);
}

#[test]
fn encrypted_pipeline_embeds_and_samples_on_the_requester() {
    let lib = import_library();
    let f32_env = [("SWARMLLM_ACTIVATION_DTYPE", "f32")];
    let mut a = TestNode::start_custom(false, &[], &f32_env, |d| {
        give_shards(lib.path(), d, &[0, 2])
    });
    let code = network_code(&a);
    let _b = TestNode::start_custom(false, &["--bootstrap", &code], &[], |d| {
        give_shards(lib.path(), d, &[1])
    });
    let c = TestNode::start_custom(false, &["--bootstrap", &code], &[], |d| {
        give_shards(lib.path(), d, &[2])
    });
    wait_servable(&a, 3);
    let path = "/api/admin/models/smol/encrypted-pipeline";
    let (_, v) = a.get(path);
    assert_eq!(
        (&v["enabled"], &v["ready"], &v["source"]),
        (&json!(false), &json!(true), &json!("global")),
        "{v}"
    );

    // A keeps shard 2 on disk but out of memory: its last span must come from C.
    let (_, v) = a.post("/api/admin/models/smol/shards/2/unload", &json!({}));
    assert_eq!(v["remaining_loaded"], json!([0]), "{v}");
    let (status, via_c) = chat(&a, Some("smol"), PROMPTS[0], 24);
    assert_eq!(status, 200, "{via_c}");

    // Encrypted: C may not sample for A, so with A's last span unloaded there is
    // no route…
    let (status, v) = a.call(reqwest::Method::PUT, path, &json!({ "enabled": true }));
    assert_eq!((status, &v["enabled"]), (200, &json!(true)), "{v}");
    let (status, v) = chat(&a, Some("smol"), PROMPTS[0], 24);
    assert_eq!(status, 503, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("encrypted pipeline"),
        "{v}"
    );
    // …and with it loaded again A embeds and samples itself: C sees no step.
    let (_, v) = a.post("/api/admin/models/smol/shards/2/load", &json!({}));
    assert_eq!(v["loaded_shards"], json!([0, 2]), "{v}");
    let c_steps = c.get("/api/v1/layers").1["steps_served"].clone();
    let (status, encrypted) = chat(&a, Some("smol"), PROMPTS[0], 24);
    assert_eq!(status, 200, "{encrypted}");
    assert_eq!(content(&encrypted), content(&via_c));
    assert_eq!(c.get("/api/v1/layers").1["steps_served"], c_steps);

    // The setting survives a restart; a node without the ends cannot enable it.
    a.restart();
    let (_, v) = a.get(path);
    assert_eq!(
        (&v["enabled"], &v["source"]),
        (&json!(true), &json!("model")),
        "{v}"
    );
    let (status, v) = c.call(reqwest::Method::PUT, path, &json!({ "enabled": true }));
    assert_eq!(status, 409, "{v}");
    assert_eq!(v["error"]["code"], "NOT_READY");
}

/// The link from `node` to the node with id `to`, as `GET /api/v1/layers` shows it.
fn link_to(node: &TestNode, to: &str) -> Option<Value> {
    let (_, v) = node.get("/api/v1/layers");
    v["links"]
        .as_array()?
        .iter()
        .find(|l| l["node_id"] == to)
        .cloned()
}

#[test]
fn hidden_states_shrink_only_on_slow_links_and_only_when_the_requester_allows() {
    let lib = import_library();
    // Every measured link counts as slow (loopback is never slow otherwise).
    let slow = [("SWARMLLM_SLOW_LINK_MBPS", "1e12")];
    let mut a = TestNode::start_custom(false, &[], &slow, |d| give_shards(lib.path(), d, &[0]));
    let code = network_code(&a);
    let b = TestNode::start_custom(false, &["--bootstrap", &code], &slow, |d| {
        give_shards(lib.path(), d, &[1])
    });
    let c = TestNode::start_custom(false, &["--bootstrap", &code], &[], |d| {
        give_shards(lib.path(), d, &[2])
    });
    wait_servable(&a, 3);
    let (b_id, c_id) = (node_id(&b), node_id(&c));

    // By default nothing is approximate: the links are measured (and slow), yet
    // every hidden state travels as f32.
    assert_eq!(a.get("/api/v1/layers").1["approximate_answers"], false);
    // Different prompts each time: a repeated one would reuse the hops' caches
    // and send one row, not the prompt's hidden states that measure bandwidth.
    for prompt in PROMPTS {
        let (status, v) = chat(&a, Some("smol"), prompt, 16);
        assert_eq!(status, 200, "{v}");
    }
    let link = link_to(&a, &b_id).expect("A's link to B");
    assert!(link["bandwidth_mbps"].as_f64().is_some(), "{link}");
    assert_eq!(
        (&link["slow"], &link["dtype_when_allowed"]),
        (&json!(true), &json!("f16")),
        "{link}"
    );
    assert!(link["frames"]["f32"].as_u64() > Some(0), "{link}");
    assert_eq!(
        (&link["frames"]["f16"], &link["frames"]["q8"]),
        (&json!(0), &json!(0)),
        "{link}"
    );
    let onward = link_to(&b, &c_id).expect("B's link to C");
    assert_eq!(onward["frames"]["f16"], 0, "{onward}");

    // The requester allows approximate answers: once a link has been measured
    // slow, its hop sends f16 (A to B, and B, which A's signed step allows, to C).
    let (status, v) = a.call(
        reqwest::Method::PUT,
        "/api/admin/config",
        &json!({ "approximate_answers": true }),
    );
    assert_eq!(status, 200, "{v}");
    a.restart();
    wait_servable(&a, 3);
    assert_eq!(a.get("/api/v1/layers").1["approximate_answers"], true);
    let mut turn = 0;
    wait_for("f16 frames on A's and B's links", DEADLINE, || {
        turn += 1;
        let (status, v) = chat(&a, Some("smol"), PROMPTS[turn % PROMPTS.len()], 16);
        assert_eq!(status, 200, "{v}");
        let a_f16 = link_to(&a, &b_id)?["frames"]["f16"].as_u64()?;
        let b_f16 = link_to(&b, &c_id)?["frames"]["f16"].as_u64()?;
        (a_f16 > 0 && b_f16 > 0).then_some(())
    });
    // B's own requests still allow only f32: its frames to C stay exact.
    let before = link_to(&b, &c_id).expect("B's link to C")["frames"].clone();
    let (status, v) = chat(&b, Some("smol"), PROMPTS[1], 8);
    assert_eq!(status, 200, "{v}");
    let after = link_to(&b, &c_id).expect("B's link to C")["frames"].clone();
    assert_eq!(after["f16"], before["f16"], "{before} → {after}");
}

fn steps_served(node: &TestNode) -> u64 {
    node.get("/api/v1/layers").1["steps_served"]
        .as_u64()
        .expect("steps_served")
}

#[test]
fn private_mode_routes_only_through_pool_devices() {
    let lib = import_library();
    let a = TestNode::start_custom(false, &[], &[], |d| give_shards(lib.path(), d, &[0]));
    let code = network_code(&a);
    let start = |held: &'static [u32]| {
        let lib = lib.path().to_path_buf();
        TestNode::start_custom(false, &["--bootstrap", &code], &[], move |d| {
            give_shards(&lib, d, held)
        })
    };
    let (b, c) = (start(&[1]), start(&[2]));
    // D is not in the pool and holds layers 10-29 in one range: the cheaper route.
    let d = start(&[1, 2]);
    wait_servable(&a, 4);

    // A owns a pool; B and C join it with codes.
    assert_eq!(
        a.post("/api/pool/create", &json!({ "name": "Home" })).0,
        200
    );
    for member in [&b, &c] {
        let (_, v) = a.post("/api/pool/generate-code", &json!({}));
        let (status, v) = member.post("/api/pool/join", &json!({ "code": v["code"] }));
        assert_eq!(status, 200, "{v}");
    }
    let c_id = node_id(&c);
    wait_for("A to list both devices as accepted", DEADLINE, || {
        let (_, s) = a.get("/api/pool/state");
        let accepted = s["members"]
            .as_array()?
            .iter()
            .filter(|m| m["accepted"] == true)
            .count();
        (accepted == 3).then_some(())
    });

    // Private mode on: the answer comes through B and C; D sees no step.
    let (status, v) = a.call(
        reqwest::Method::PUT,
        "/api/pool/private-mode",
        &json!({ "enabled": true }),
    );
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["coverage"]["models"][0]["coverage_pct"], 100.0, "{v}");
    let d_before = steps_served(&d);
    let b_before = steps_served(&b);
    let (status, v) = chat(&a, Some("smol"), PROMPTS[2], 16);
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        steps_served(&d),
        d_before,
        "a non-pool node received activations"
    );
    assert!(steps_served(&b) > b_before);

    // Without C in the pool, layers 20-29 are missing: a clear 503, not a leak.
    let (status, _) = a.post("/api/pool/remove", &json!({ "node_id": c_id }));
    assert_eq!(status, 200);
    let (_, cov) = a.get("/api/pool/coverage");
    assert_eq!(cov["models"][0]["missing"], json!([2]), "{cov}");
    let (status, v) = chat(&a, Some("smol"), PROMPTS[2], 16);
    assert_eq!(status, 503, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap_or("")
            .starts_with("private mode"),
        "{v}"
    );
    assert_eq!(
        v["error"]["details"]["missing_layers"],
        json!([{ "start": 20, "end": 30 }])
    );
    assert_eq!(steps_served(&d), d_before);

    // Private mode off: any holder may serve again (C, no longer in the pool, or
    // D). The setting persists.
    let outside_before = steps_served(&c) + steps_served(&d);
    let (status, _) = a.call(
        reqwest::Method::PUT,
        "/api/pool/private-mode",
        &json!({ "enabled": false }),
    );
    assert_eq!(status, 200);
    let (status, v) = chat(&a, Some("smol"), PROMPTS[2], 16);
    assert_eq!(status, 200, "{v}");
    assert!(steps_served(&c) + steps_served(&d) > outside_before);
    assert_eq!(a.get("/api/pool/private-mode").1["enabled"], false);
}

#[test]
fn pinned_shards_are_fetched_by_their_device_and_kept() {
    let lib = import_library();
    let a = TestNode::start_custom(false, &[], &[], |d| give_shards(lib.path(), d, &[0, 1, 2]));
    let b = TestNode::start_full(false, &["--bootstrap", &network_code(&a)]);
    assert_eq!(
        a.post("/api/pool/create", &json!({ "name": "Home" })).0,
        200
    );
    let (_, v) = a.post("/api/pool/generate-code", &json!({}));
    let (status, v) = b.post("/api/pool/join", &json!({ "code": v["code"] }));
    assert_eq!(status, 200, "{v}");
    let b_id = node_id(&b);
    wait_for("B's acceptance", DEADLINE, || {
        let (_, s) = a.get("/api/pool/state");
        (s["members"]
            .as_array()?
            .iter()
            .filter(|m| m["accepted"] == true)
            .count()
            == 2)
            .then_some(())
    });
    wait_servable(&a, 1);

    // Only the owner pins; the pin reaches B, which fetches shard 1.
    let pin = json!({ "model_id": "smol", "target_node_id": b_id, "shard_indices": [1] });
    assert_eq!(b.post("/api/pool/pin", &pin).0, 403);
    let (status, v) = a.post("/api/pool/pin", &pin);
    assert_eq!(status, 200, "{v}");
    wait_for("B to fetch its pinned shard", DEADLINE, || {
        let (_, s) = b.get("/api/admin/models/smol/status");
        (s["held_shards"] == json!([1])).then_some(())
    });
    let (_, pins) = b.get("/api/pool/pins");
    assert_eq!(pins["pins"][0]["shard_indices"], json!([1]), "{pins}");

    // A pinned shard is never deleted; unpinned, it can be.
    let (status, v) = b.call(
        reqwest::Method::DELETE,
        "/api/admin/models/smol/shards/1",
        &Value::Null,
    );
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (409, Some("SHARD_PINNED")),
        "{v}"
    );
    let (status, _) = a.call(reqwest::Method::DELETE, "/api/pool/pin", &pin);
    assert_eq!(status, 200);
    wait_for("B to learn of the unpin", DEADLINE, || {
        let (_, p) = b.get("/api/pool/pins");
        (p["pins"] == json!([])).then_some(())
    });
    let (status, v) = b.call(
        reqwest::Method::DELETE,
        "/api/admin/models/smol/shards/1",
        &Value::Null,
    );
    assert_eq!(status, 200, "{v}");
}

fn chat_turns(node: &TestNode, model: Option<&str>, messages: &Value) -> Value {
    let mut body = json!({ "messages": messages, "max_tokens": 40, "temperature": 0 });
    if let Some(m) = model {
        body["model"] = json!(m);
    }
    let (status, v) = node.post("/v1/chat/completions", &body);
    assert_eq!(status, 200, "{v}");
    v
}

/// A chat's next turn through a 2-node split continues the chain's sessions:
/// the hops keep the first turn's caches, the second computes only what is new
/// (`cached_tokens`), and the answer is still the whole model's.
#[test]
fn a_chats_next_turn_through_a_split_reuses_the_chains_caches() {
    let turn1 = json!([{ "role": "user", "content": PROMPTS[1] }]);
    let (first, turn2, expected) = {
        let whole = TestNode::start();
        let first = content(&chat_turns(&whole, None, &turn1));
        let turn2 = json!([
            { "role": "user", "content": PROMPTS[1] },
            { "role": "assistant", "content": first },
            { "role": "user", "content": "And why are sunsets red?" },
        ]);
        let expected = content(&chat_turns(&whole, None, &turn2));
        (first, turn2, expected)
    };
    let lib = common::import_shards(2);
    let a = TestNode::start_custom(false, &[], &[], |d| give_shards(lib.path(), d, &[0]));
    let code = network_code(&a);
    let b = TestNode::start_custom(false, &["--bootstrap", &code], &[], |d| {
        give_shards(lib.path(), d, &[1])
    });
    wait_servable(&a, 2);
    let v1 = chat_turns(&a, Some("smol"), &turn1);
    assert_eq!(content(&v1), first);
    assert_eq!(v1["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    let v2 = chat_turns(&a, Some("smol"), &turn2);
    assert_eq!(
        content(&v2),
        expected,
        "the next turn must answer as the whole model"
    );
    let cached = v2["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap_or(0);
    let first_prompt = v1["usage"]["prompt_tokens"].as_u64().unwrap_or(u64::MAX);
    assert!(
        cached >= first_prompt,
        "cached {cached} tokens of a history whose first prompt had {first_prompt}: {v2}"
    );
    // The hop holds one session for the conversation, not one per turn.
    let (_, layers) = b.get("/api/v1/layers");
    assert_eq!(layers["sessions"], 1, "{layers}");
}

/// A text the model quotes back, so prompt lookup finds drafts in it.
const QUOTE: &str = "Repeat the following text exactly, word for word:\n\
    The old lighthouse stood on the rocks above the harbour. Every night the keeper \
    climbed the hundred steps, lit the great lamp and watched the ships come home \
    through the fog. The old lighthouse stood on the rocks above the harbour.";

fn spec_chat(node: &TestNode, model: Option<&str>, extra: Value) -> (String, Value) {
    let mut body = json!({
        "messages": [{ "role": "user", "content": QUOTE }],
        "max_tokens": 96,
        "temperature": 0,
    });
    if let Some(m) = model {
        body["model"] = json!(m);
    }
    for (k, v) in extra.as_object().expect("object") {
        body[k] = v.clone();
    }
    let (status, v) = node.post("/v1/chat/completions", &body);
    assert_eq!(status, 200, "{v}");
    (content(&v), v)
}

/// Asserts that some drafts were accepted and some rejected (so the rollback
/// ran), from a `{drafted, accepted}` summary.
fn assert_drafts_accepted_and_rejected(speculation: &Value) {
    let drafted = speculation["drafted"].as_u64().unwrap_or(0);
    let accepted = speculation["accepted"].as_u64().unwrap_or(0);
    assert!(accepted > 0, "no draft was accepted: {speculation}");
    assert!(
        drafted > accepted,
        "no draft was rejected, so rollback went untested: {speculation}"
    );
}

/// Speculative decoding on the local engine (when a request asks) and through
/// a 2-node split (prompt lookup, on by default for greedy requests): drafts
/// are accepted and rejected, a stop sequence and `max_tokens` end a
/// generation inside a verified run, and every answer is token for token the
/// whole model's without speculation.
#[test]
fn speculative_decoding_locally_and_through_a_split_keeps_the_whole_models_text() {
    let whole = TestNode::start();
    let (reference, _) = spec_chat(&whole, None, json!({}));
    // A stop sequence well inside the answer, and a length that ends it early.
    let words: Vec<&str> = reference.split_whitespace().collect();
    assert!(
        words.len() > 12,
        "too short an answer to test with: {reference:?}"
    );
    let stop = format!("{} {}", words[words.len() / 2], words[words.len() / 2 + 1]);
    let (stopped_reference, v) = spec_chat(&whole, None, json!({ "stop": [stop] }));
    assert_eq!(v["choices"][0]["finish_reason"], "stop", "{v}");
    let (short_reference, _) = spec_chat(&whole, None, json!({ "max_tokens": 27 }));
    // The engine did not speculate unasked; asked, it gives the same text.
    let engine_speculation =
        |node: &TestNode| node.get("/api/admin/stats").1["engine"]["speculation"].clone();
    assert_eq!(engine_speculation(&whole)["drafted"], 0);
    let asked = json!({ "speculative.n_max": 8 });
    let (local, _) = spec_chat(&whole, None, asked.clone());
    assert_eq!(local, reference, "local, with speculation");
    assert_drafts_accepted_and_rejected(&engine_speculation(&whole));
    let (stopped, v) = spec_chat(
        &whole,
        None,
        json!({ "stop": [stop], "speculative.n_max": 8 }),
    );
    assert_eq!(stopped, stopped_reference, "local, stop {stop:?}");
    assert_eq!(v["choices"][0]["finish_reason"], "stop", "{v}");
    let (short, v) = spec_chat(
        &whole,
        None,
        json!({ "max_tokens": 27, "speculative.n_max": 8 }),
    );
    assert_eq!(short, short_reference, "local, max_tokens");
    assert_eq!(v["usage"]["completion_tokens"], 27, "{v}");
    drop(whole);

    let lib = common::import_shards(2);
    let a = TestNode::start_custom(false, &[], &[], |d| give_shards(lib.path(), d, &[0]));
    let code = network_code(&a);
    let _b = TestNode::start_custom(false, &["--bootstrap", &code], &[], |d| {
        give_shards(lib.path(), d, &[1])
    });
    wait_servable(&a, 2);

    let (plain, _) = spec_chat(&a, Some("smol"), json!({ "speculative.n_max": 0 }));
    assert_eq!(plain, reference, "without speculation");
    let (_, layers) = a.get("/api/v1/layers");
    assert_eq!(layers["speculation"]["drafted"], 0, "{layers}");

    let (fast, v) = spec_chat(&a, Some("smol"), json!({}));
    assert_eq!(fast, reference, "with speculation");
    assert_eq!(v["choices"][0]["finish_reason"], "stop", "{v}");
    let (_, layers) = a.get("/api/v1/layers");
    assert_drafts_accepted_and_rejected(&layers["speculation"]);

    let (stopped, v) = spec_chat(&a, Some("smol"), json!({ "stop": [stop] }));
    assert_eq!(stopped, stopped_reference, "stop {stop:?}");
    assert_eq!(v["choices"][0]["finish_reason"], "stop", "{v}");
    let (short, v) = spec_chat(&a, Some("smol"), json!({ "max_tokens": 27 }));
    assert_eq!(short, short_reference);
    assert_eq!(v["usage"]["completion_tokens"], 27, "{v}");

    // Out of range: a clear 422.
    let (status, v) = a.post(
        "/v1/chat/completions",
        &json!({ "model": "smol", "messages": [{ "role": "user", "content": "Hi" }],
                 "speculative.n_max": 17 }),
    );
    assert_eq!(status, 422, "{v}");
    assert_eq!(v["error"]["details"]["field"], "speculative.n_max", "{v}");
}

/// Over simulated WAN links (scripts/wan-rig: 20 ms round trips, 1 % of the
/// packets lost and 200 ms delay spikes), a 2-node split finishes its
/// generations with the whole model's text, with speculation and without.
/// Needs root, `ip netns` and /dev/net/tun, as scripts/wan-rig does.
#[test]
fn a_split_over_a_lossy_spiky_wan_keeps_the_whole_models_text() {
    let links = json!({ "default": {
        "rtt_ms": 20, "loss": 0.01,
        "spike_ms": 200, "spike_every_ms": 1500, "spike_len_ms": 150,
    } });
    let Some(rig) = wan::Rig::up(2, &links) else {
        eprintln!(
            "SKIPPED a_split_over_a_lossy_spiky_wan_keeps_the_whole_models_text: \
             needs root, `ip netns` and /dev/net/tun"
        );
        return;
    };
    let whole = TestNode::start();
    let (reference, _) = spec_chat(&whole, None, json!({}));
    drop(whole);

    let lib = common::import_shards(2);
    let a = TestNode::start_in_netns(&rig.namespace(0), &rig.address(0), &[], &[], |d| {
        give_shards(lib.path(), d, &[0])
    });
    let code = network_code(&a);
    let _b = TestNode::start_in_netns(
        &rig.namespace(1),
        &rig.address(1),
        &["--bootstrap", &code],
        &[],
        |d| give_shards(lib.path(), d, &[1]),
    );
    wait_servable(&a, 2);
    for extra in [json!({ "speculative.n_max": 0 }), json!({})] {
        let (text, v) = spec_chat(&a, Some("smol"), extra.clone());
        assert_eq!(text, reference, "{extra}");
        // The route as planned and measured, in the answer and the layers view.
        let route = &v["timing"]["route"];
        assert_eq!(route["hops"].as_array().map(Vec::len), Some(2), "{v}");
        assert!(
            route["predicted_ms_per_token"].as_f64() > Some(0.0),
            "{route}"
        );
        assert!(
            route["measured_ms_per_token"].as_f64() > Some(0.0),
            "{route}"
        );
        eprintln!("{extra}: {route}");
    }
    let (_, layers) = a.get("/api/v1/layers");
    assert_eq!(layers["routes"][0]["model"], "smol", "{layers}");
    // The impairments happened: packets were lost and held by spikes.
    let stats = wait_for("the emulator's counters", DEADLINE, || {
        let stats = rig.stats()?;
        (stats["dropped"].as_u64() > Some(0) && stats["spiked"].as_u64() > Some(0)).then_some(stats)
    });
    eprintln!("emulator: {stats}");
}

/// The whole model's answer to [`QUOTE`] with `extra` sampling fields.
fn whole_model_answer(extra: &Value) -> String {
    let whole = TestNode::start();
    spec_chat(&whole, None, extra.clone()).0
}

/// SmolLM2 split in two over the rig: node 0 holds the first half and asks,
/// nodes 1 and 2 each hold the second; returned once node 0 can use both.
fn wan_split_with_two_holders(rig: &wan::Rig, lib: &std::path::Path) -> [TestNode; 3] {
    let a = TestNode::start_in_netns(&rig.namespace(0), &rig.address(0), &[], &[], |d| {
        give_shards(lib, d, &[0])
    });
    let code = network_code(&a);
    let holder = |i: u32| {
        TestNode::start_in_netns(
            &rig.namespace(i),
            &rig.address(i),
            &["--bootstrap", &code],
            &[],
            |d| give_shards(lib, d, &[1]),
        )
    };
    let (b, c) = (holder(1), holder(2));
    wait_servable(&a, 3);
    [a, b, c]
}

/// A link that degrades mid-generation (10 ms round trips to the holder of
/// the second half, then 300 ms) moves the generation to the other holder
/// (60 ms away) once the steps measure far slower than the route predicted;
/// the text stays the whole model's.
#[test]
fn a_degraded_link_moves_the_generation_to_a_cheaper_chain() {
    let fast = json!({ "links": { "0-1": { "rtt_ms": 10 }, "0-2": { "rtt_ms": 60 } } });
    let Some(rig) = wan::Rig::up(3, &fast) else {
        eprintln!(
            "SKIPPED a_degraded_link_moves_the_generation_to_a_cheaper_chain: \
             needs root, `ip netns` and /dev/net/tun"
        );
        return;
    };
    let long = json!({ "max_tokens": 160, "ignore_eos": true, "speculative.n_max": 0 });
    let reference = whole_model_answer(&long);
    let lib = common::import_shards(2);
    let [a, near, far] = wan_split_with_two_holders(&rig, lib.path());
    let far_id = node_id(&far);
    let (text, v) = std::thread::scope(|s| {
        let answer = s.spawn(|| spec_chat(&a, Some("smol"), long.clone()));
        // Once the generation runs through the near holder, its link degrades.
        wait_for("steps through the near holder", DEADLINE, || {
            let (_, layers) = near.get("/api/v1/layers");
            (layers["steps_served"].as_u64() > Some(5)).then_some(())
        });
        rig.set(&json!({ "links": { "0-1": { "rtt_ms": 300 }, "0-2": { "rtt_ms": 60 } } }));
        answer.join().expect("the request's thread")
    });
    assert_eq!(text, reference);
    let route = &v["timing"]["route"];
    eprintln!("{route}");
    assert!(route["replans"].as_u64() >= Some(1), "{route}");
    assert_eq!(route["hops"][1]["node_id"], far_id.as_str(), "{route}");
}

/// A link that stops carrying anything mid-stream (every packet to the
/// holder of the second half lost) fails over to the standby holder: the
/// step's deadline (8 times the median recent step or twice the slowest, at
/// least 1 s) blames the silent hop, the chain is planned again and the
/// steps so far replayed, and the stream goes on with the whole model's
/// text. Prints the longest gap between two tokens (the failover, measured).
#[test]
fn a_link_that_drops_mid_stream_fails_over_to_the_standby() {
    let links = json!({ "links": { "0-1": { "rtt_ms": 10 }, "0-2": { "rtt_ms": 20 } } });
    let Some(rig) = wan::Rig::up(3, &links) else {
        eprintln!(
            "SKIPPED a_link_that_drops_mid_stream_fails_over_to_the_standby: \
             needs root, `ip netns` and /dev/net/tun"
        );
        return;
    };
    let long = json!({ "max_tokens": 120, "ignore_eos": true, "speculative.n_max": 0 });
    let reference = whole_model_answer(&long);
    let lib = common::import_shards(2);
    let [a, near, standby] = wan_split_with_two_holders(&rig, lib.path());
    let standby_id = node_id(&standby);
    let mut body = long.clone();
    body["messages"] = json!([{ "role": "user", "content": QUOTE }]);
    body["temperature"] = json!(0);
    body["stream"] = json!(true);
    body["stream_options"] = json!({ "include_usage": true });
    let events = std::thread::scope(|s| {
        let stream = s.spawn(|| a.post_stream_timed("/v1/chat/completions", &body));
        wait_for("steps through the near holder", DEADLINE, || {
            let (_, layers) = near.get("/api/v1/layers");
            (layers["steps_served"].as_u64() > Some(10)).then_some(())
        });
        rig.set(&json!({ "links": { "0-1": { "loss": 1.0 }, "0-2": { "rtt_ms": 20 } } }));
        stream.join().expect("the stream's thread")
    });
    let mut text = String::new();
    let mut arrivals = Vec::new();
    for (at, data) in &events {
        let Ok(chunk) = serde_json::from_str::<Value>(data) else {
            continue; // [DONE]
        };
        if let Some(t) = chunk["choices"][0]["delta"]["content"].as_str() {
            text.push_str(t);
            arrivals.push(*at);
        }
    }
    assert_eq!(text, reference);
    let gap = arrivals
        .windows(2)
        .map(|w| w[1].duration_since(w[0]))
        .max()
        .unwrap_or_default();
    eprintln!(
        "longest gap between tokens (the failover): {} ms",
        gap.as_millis()
    );
    // Where the gap went: the hop's deadline, then the replay.
    for line in a.log().lines() {
        if line.contains("re-routing") || line.contains("replayed") {
            eprintln!("  {line}");
        }
    }
    let (_, layers) = a.get("/api/v1/layers");
    let route = &layers["routes"][0];
    assert!(route["reroutes"].as_u64() >= Some(1), "{route}");
    assert_eq!(route["hops"][1]["node_id"], standby_id.as_str(), "{route}");
}

/// The WAN rig of scripts/wan-rig, taken down on drop.
mod wan {
    use std::path::PathBuf;
    use std::process::Command;

    use serde_json::Value;

    /// Its name (`SWL_RIG`): namespaces `swt-n<i>` and `swt-r`.
    const NAME: &str = "swt";

    /// One rig at a time: every rig uses the same namespaces and subnets.
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

    pub(crate) struct Rig {
        _turn: std::sync::MutexGuard<'static, ()>,
    }

    fn script() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../scripts/wan-rig")
    }

    impl Rig {
        /// `n` node namespaces with `links` (the emulator's config); `None`
        /// where this machine cannot have them (not root, no TUN device).
        pub(crate) fn up(n: u32, links: &Value) -> Option<Rig> {
            let root = Command::new("id").arg("-u").output().ok()?;
            if String::from_utf8_lossy(&root.stdout).trim() != "0"
                || !std::path::Path::new("/dev/net/tun").exists()
            {
                return None;
            }
            let turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
            let config = tempfile::NamedTempFile::new().expect("config file");
            std::fs::write(config.path(), links.to_string()).expect("write config");
            let status = Command::new(script())
                .args(["up", &n.to_string()])
                .arg(config.path())
                .env("SWL_RIG", NAME)
                .status()
                .expect("run scripts/wan-rig");
            assert!(status.success(), "scripts/wan-rig up failed: {status}");
            Some(Rig { _turn: turn })
        }

        pub(crate) fn namespace(&self, i: u32) -> String {
            format!("{NAME}-n{i}")
        }

        pub(crate) fn address(&self, i: u32) -> String {
            format!("10.77.{i}.2")
        }

        /// New link settings (the emulator reloads them at once).
        pub(crate) fn set(&self, links: &Value) {
            let config = tempfile::NamedTempFile::new().expect("config file");
            std::fs::write(config.path(), links.to_string()).expect("write config");
            let status = Command::new(script())
                .arg("set")
                .arg(config.path())
                .env("SWL_RIG", NAME)
                .status()
                .expect("run scripts/wan-rig");
            assert!(status.success(), "scripts/wan-rig set failed: {status}");
        }

        /// The emulator's counters (`passed`, `dropped`, `spiked`).
        pub(crate) fn stats(&self) -> Option<Value> {
            let text =
                std::fs::read_to_string(format!("/run/swarmllm-wan-{NAME}/stats.json")).ok()?;
            serde_json::from_str(&text).ok()
        }
    }

    impl Drop for Rig {
        fn drop(&mut self) {
            let _ = Command::new(script())
                .arg("down")
                .env("SWL_RIG", NAME)
                .status();
        }
    }
}
