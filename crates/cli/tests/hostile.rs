//! A rogue peer against a real node process: a libp2p peer built from the node's
//! own protocol code that announces a model and serves manifests no honest node
//! would write. The node must refuse each one with the rule it breaks, keep
//! serving, leave every file outside its model folder alone, and count the
//! attempt against the peer.

mod common;

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use swarmllm_node::net::announce::HostedModel;
use swarmllm_node::net::frame::{MAX_CHUNK, Request, Response};
use swarmllm_node::net::{InboundStep, LocalInfo};

use common::{TestNode, give_shards, network_code, node_id, rogue_peer_announcing, wait_for};

/// The files the rogue serves for model `evil`: (manifest, header).
type Served = Arc<Mutex<(Vec<u8>, Vec<u8>)>>;

/// Answers every fetch from `served`, chunk by chunk, as a holder would.
fn serve_files(rx: tokio::sync::mpsc::Receiver<InboundStep>, served: Served) {
    let mut rx = rx;
    tokio::spawn(async move {
        while let Some(step) = rx.recv().await {
            let response = match step.request {
                Request::Fetch(f) => {
                    let (manifest, header) = served.lock().expect("lock").clone();
                    let bytes = if f.file == "manifest.json" {
                        manifest
                    } else {
                        header
                    };
                    let start = (f.offset as usize).min(bytes.len());
                    let end = (start + f.len.min(MAX_CHUNK) as usize).min(bytes.len());
                    Response::Chunk(bytes[start..end].to_vec())
                }
                _ => Response::Error {
                    code: 400,
                    message: "no".into(),
                },
            };
            step.responder.send(response).await;
        }
    });
}

/// The real manifest of the test model, renamed `evil`, spoiled by `spoil`.
fn spoiled(lib: &Path, spoil: impl Fn(&mut Value)) -> Vec<u8> {
    let text = std::fs::read(lib.join("models/smol/manifest.json")).expect("manifest");
    let mut m: Value = serde_json::from_slice(&text).expect("json");
    m["model_id"] = json!("evil");
    spoil(&mut m);
    serde_json::to_vec(&m).expect("json")
}

#[test]
fn a_peer_serving_hostile_manifests_changes_nothing_outside_the_model_folder() {
    let lib = common::import_shards(3);
    // Every case must reach the node: the ban is tested on its own below.
    let node = TestNode::start_custom(false, &[], &[("SWARMLLM_PEER_BAN_TRUST", "0")], |_| {});
    // Files a traversal would reach: beside the data dir's models folder and
    // at an absolute path.
    let victim = node.dir().join("victim.txt");
    std::fs::write(&victim, "precious").expect("victim");
    let outside = tempfile::tempdir().expect("tempdir");
    let absolute = outside.path().join("victim.txt");
    std::fs::write(&absolute, "precious too").expect("victim");

    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let tmp = tempfile::tempdir().expect("tempdir");
    // The manifest hash the rogue announces for `evil` (none at first).
    let announced: Arc<Mutex<Option<String>>> = Arc::default();
    let claims = {
        let announced = Arc::clone(&announced);
        Arc::new(move || LocalInfo {
            models: vec![HostedModel {
                id: "evil".into(),
                layer_start: 0,
                layer_end: 30,
                n_layers: 30,
                ms_per_layer: None,
                manifest_hash: announced.lock().expect("lock").clone(),
            }],
            ..LocalInfo::default()
        })
    };
    let (rogue, rogue_identity) = rogue_peer_announcing(&rt, tmp.path(), claims);
    let rogue_id = rogue_identity.node_id();
    let header = std::fs::read(lib.path().join("models/smol/gguf_header.bin")).expect("header");
    let served: Served = Arc::new(Mutex::new((Vec::new(), header)));
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    rogue.set_step_handler(tx);
    {
        let _guard = rt.enter();
        serve_files(rx, Arc::clone(&served));
    }
    rt.block_on(rogue.add_seed_and_dial(&network_code(&node), "test"))
        .expect("rogue joins");
    // The node learns of `evil` from the rogue's signed announcements.
    wait_for(
        "the rogue's model to be announced",
        Duration::from_secs(60),
        || {
            rt.block_on(rogue.announce_now());
            let (_, v) = node.get("/api/admin/models");
            v["models"]
                .as_array()?
                .iter()
                .any(|m| m["id"] == "evil")
                .then_some(())
        },
    );
    let trust_before = trust_of(&node, &rogue_id);

    let victim_path = victim.to_str().expect("utf-8").to_string();
    let absolute_path = absolute.to_str().expect("utf-8").to_string();
    let cases: Vec<(&str, &str, Vec<u8>)> = vec![
        (
            "relative traversal",
            "file_name",
            spoiled(lib.path(), |m| {
                m["shards"][1]["file"] = json!("../../victim.txt")
            }),
        ),
        (
            "absolute path",
            "file_name",
            spoiled(lib.path(), |m| {
                m["shards"][1]["file"] = json!(absolute_path)
            }),
        ),
        (
            "absolute path to the data dir's file",
            "file_name",
            spoiled(lib.path(), |m| m["shards"][0]["file"] = json!(victim_path)),
        ),
        (
            "Windows drive path",
            "file_name",
            spoiled(lib.path(), |m| {
                m["shards"][2]["file"] = json!("C:\\victim.txt")
            }),
        ),
        (
            "another plain name",
            "file_name",
            spoiled(lib.path(), |m| m["shards"][2]["file"] = json!("node.db")),
        ),
        (
            "declared index out of range",
            "shard_index",
            spoiled(lib.path(), |m| {
                m["shards"][2]["index"] = json!(4_000_000_000u32)
            }),
        ),
        (
            "huge n_layers",
            "layers",
            spoiled(lib.path(), |m| m["n_layers"] = json!(u32::MAX)),
        ),
        (
            "a gap in the layer ranges",
            "layer_ranges",
            spoiled(lib.path(), |m| m["shards"][1]["layer_start"] = json!(11)),
        ),
        (
            "shard sizes the header does not imply",
            "header",
            spoiled(lib.path(), |m| m["shards"][1]["bytes"] = json!(12_345)),
        ),
        (
            "layer ranges the header does not imply",
            "header",
            spoiled(lib.path(), |m| {
                m["shards"][0]["layer_end"] = json!(9);
                m["shards"][1]["layer_start"] = json!(9);
            }),
        ),
        (
            "too many source parts",
            "size",
            spoiled(lib.path(), |m| {
                m["source_parts"] = json!(vec![m["source"].clone(); 300])
            }),
        ),
        (
            "parts that do not begin with the source",
            "file_name",
            spoiled(lib.path(), |m| {
                let mut other = m["source"].clone();
                other["file"] = json!("other.gguf");
                m["source_parts"] = json!([other, m["source"].clone()]);
            }),
        ),
    ];
    for (what, rule, manifest) in cases {
        served.lock().expect("lock").0 = manifest;
        let (status, v) = node.post("/api/admin/models/evil/add", &json!({}));
        assert_eq!(status, 502, "{what}: {v}");
        assert_eq!(v["error"]["code"], "BAD_MANIFEST", "{what}: {v}");
        assert_eq!(v["error"]["details"]["rule"], rule, "{what}: {v}");
        // Nothing outside the model folder changed, and nothing was kept.
        assert_eq!(
            std::fs::read_to_string(&victim).expect("victim"),
            "precious"
        );
        assert_eq!(
            std::fs::read_to_string(&absolute).expect("victim"),
            "precious too"
        );
        assert!(
            !node.dir().join("models/evil/manifest.json").exists(),
            "{what}: a refused manifest was stored"
        );
    }

    // A valid manifest is accepted, and its hash pinned for the id: the same id
    // with another manifest is refused later (after the model is removed here),
    // and a holder announcing another one is shown as a conflict.
    served.lock().expect("lock").0 = spoiled(lib.path(), |_| {});
    let (status, v) = node.post("/api/admin/models/evil/add", &json!({ "shards": [] }));
    assert_eq!(status, 200, "{v}");
    let (_, models) = node.get("/api/admin/models");
    let pinned = models["models"]
        .as_array()
        .and_then(|ms| ms.iter().find(|m| m["id"] == "evil"))
        .map(|m| m["manifest_hash"].clone())
        .expect("evil listed");
    assert_eq!(pinned.as_str().map(str::len), Some(64), "{models}");
    let (status, v) = node.call(
        reqwest::Method::DELETE,
        "/api/admin/models/evil",
        &json!({}),
    );
    assert_eq!(status, 200, "{v}");
    served.lock().expect("lock").0 =
        spoiled(lib.path(), |m| m["source"]["file"] = json!("other.gguf"));
    let (status, v) = node.post("/api/admin/models/evil/add", &json!({ "shards": [] }));
    assert_eq!(status, 409, "{v}");
    assert_eq!(v["error"]["code"], "MANIFEST_CONFLICT", "{v}");
    *announced.lock().expect("lock") = Some("f".repeat(64));
    wait_for("the conflict to show", Duration::from_secs(60), || {
        rt.block_on(rogue.announce_now());
        let (_, v) = node.get("/api/admin/models");
        let m = v["models"]
            .as_array()?
            .iter()
            .find(|m| m["id"] == "evil")?
            .clone();
        (m["manifest_conflict"] == true && m["holders"] == 0).then_some(())
    });

    // Still serving, and every refusal counted against the rogue.
    assert_eq!(node.get("/health/live").0, 200);
    let trust_after = trust_of(&node, &rogue_id);
    assert!(
        trust_after < trust_before,
        "trust {trust_before} -> {trust_after}"
    );
    assert_ne!(node_id(&node), rogue_id);
}

fn trust_of(node: &TestNode, peer: &str) -> i64 {
    let (_, v) = node.get("/api/admin/peers");
    v["peers"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["node_id"] == peer))
        .and_then(|p| p["trust_score"].as_i64())
        .unwrap_or_else(|| panic!("the rogue is not in the peer list: {v}"))
}

#[test]
fn a_peer_that_keeps_sending_garbage_is_disconnected_and_refused_for_a_while() {
    let node = TestNode::start_without_model();
    let node_id = node_id(&node);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let tmp = tempfile::tempdir().expect("tempdir");
    let (rogue, rogue_identity) = common::rogue_peer(&rt, tmp.path());
    let rogue_id = rogue_identity.node_id();
    rt.block_on(rogue.add_seed_and_dial(&network_code(&node), "test"))
        .expect("rogue joins");
    // Malformed credit messages: each costs 10 trust; below 10 the peer is out.
    for _ in 0..6 {
        let _ = rt.block_on(rogue.request(&node_id, Request::Credit(b"{not json".to_vec())));
    }
    let peer = wait_for("the rogue to be banned", Duration::from_secs(30), || {
        let (_, v) = node.get("/api/admin/peers");
        let p = v["peers"]
            .as_array()?
            .iter()
            .find(|p| p["node_id"] == rogue_id.as_str())?
            .clone();
        (p["banned_until"].as_i64()? > chrono::Utc::now().timestamp() && p["connected"] == false)
            .then_some(p)
    });
    assert!(peer["trust_score"].as_i64() < Some(10), "{peer}");
    // Coming back at once does not work: the node drops the connection.
    let _ = rt.block_on(rogue.add_seed_and_dial(&network_code(&node), "test"));
    for _ in 0..3 {
        let answer = rt.block_on(rogue.request(&node_id, Request::Echo(vec![1])));
        assert!(answer.is_err(), "a banned peer was answered: {answer:?}");
    }
    assert_eq!(node.get("/health/live").0, 200);
}

#[test]
fn a_flood_of_peer_exchange_hints_is_cut_to_32_a_minute() {
    let node = TestNode::start_without_model();
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let tmp = tempfile::tempdir().expect("tempdir");
    let (rogue, rogue_identity) = common::rogue_peer(&rt, tmp.path());
    let rogue_id = rogue_identity.node_id();
    // The rogue's directory lists 64 "live" peers (at loopback ports nobody
    // listens on): its answer to every peer-exchange request names them all.
    for i in 0..64u16 {
        let fake = swarmllm_node::identity::Identity::generate().node_id();
        let peer = swarmllm_node::net::peer_id_of(&fake).expect("peer id");
        rogue
            .directory()
            .connected(
                &fake,
                &peer.to_string(),
                &[format!("/ip4/127.0.0.1/tcp/{}", 9 + i)],
                "test",
            )
            .expect("fake peer");
    }
    rt.block_on(rogue.add_seed_and_dial(&network_code(&node), "test"))
        .expect("rogue joins");
    // The node asks on connecting; ask again within the minute.
    let pulls = |n: usize| {
        wait_for(
            &format!("{n} peer-exchange pulls from the rogue"),
            Duration::from_secs(30),
            || {
                let (_, v) = node.get("/api/admin/peers");
                let pulls: Vec<i64> = v["sync_log"]
                    .as_array()?
                    .iter()
                    .filter(|e| e["remote_node"] == rogue_id.as_str())
                    .filter_map(|e| e["nodes_received"].as_i64())
                    .collect();
                (pulls.len() >= n).then_some((pulls, v["total"].as_u64()?))
            },
        )
    };
    pulls(1);
    let (status, v) = node.post("/api/v1/network/discover", &json!({}));
    assert_eq!(status, 200, "{v}");
    let (received, total) = pulls(2);
    assert!(received.iter().all(|&r| r <= 32), "{received:?}");
    assert!(received.iter().sum::<i64>() <= 32, "{received:?}");
    // The rogue itself, and at most 32 of the 64 it named.
    assert!(total <= 33, "the directory grew to {total}");
    assert_eq!(node.get("/health/live").0, 200);
}

/// One pipeline step as a requester sends it: the envelope and the token ids
/// sealed for the link from `from` to `to`.
fn token_step(
    from: &swarmllm_node::identity::Identity,
    to: &str,
    seq: u64,
    pos: u32,
    tokens: &[i32],
    repeat_last_n: i32,
) -> Vec<u8> {
    token_step_in(from, to, [0x5a; 16], None, seq, pos, tokens, repeat_last_n)
}

fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// [`token_step`] in session `session`, taking over session `continues`.
#[allow(clippy::too_many_arguments)]
fn token_step_in(
    from: &swarmllm_node::identity::Identity,
    to: &str,
    session: [u8; 16],
    continues: Option<[u8; 16]>,
    seq: u64,
    pos: u32,
    tokens: &[i32],
    repeat_last_n: i32,
) -> Vec<u8> {
    token_step_with(
        from,
        to,
        session,
        continues,
        seq,
        pos,
        tokens,
        repeat_last_n,
        |_| {},
    )
}

/// [`token_step_in`] with the envelope changed by `edit` before it is signed.
#[allow(clippy::too_many_arguments)]
fn token_step_with(
    from: &swarmllm_node::identity::Identity,
    to: &str,
    session: [u8; 16],
    continues: Option<[u8; 16]>,
    seq: u64,
    pos: u32,
    tokens: &[i32],
    repeat_last_n: i32,
    edit: impl FnOnce(&mut swarmllm_node::pipeline::wire::Envelope),
) -> Vec<u8> {
    use swarmllm_node::pipeline::activation::{self, Direction, SessionKey};
    use swarmllm_node::pipeline::wire::{self, Envelope, Hop, InputKind, SampleSpec};
    let mut env = Envelope {
        session: to_hex(&session),
        seq,
        requester: from.node_id(),
        route: vec![Hop {
            node_id: to.into(),
            model_id: "smol".into(),
            layer_start: 0,
            layer_end: 30,
        }],
        pos,
        n_tokens: tokens.len() as u32,
        input: InputKind::Tokens,
        dtype: "f32".into(),
        sample: Some(SampleSpec {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            repeat_penalty: 1.1,
            repeat_last_n,
            seed: 1,
            json_schema: None,
            logprobs: None,
        }),
        prime: vec![],
        continues: continues.map(|c| to_hex(&c)),
        close: false,
        draft: 0,
        requester_sig: String::new(),
    };
    edit(&mut env);
    env.sign(from);
    let key = SessionKey::agree(
        &from.x25519_secret(),
        &swarmllm_node::identity::x25519_public(to).expect("node id"),
        &session,
    );
    // The step's associated data, as the protocol defines it.
    let aad = format!("step:{}:{}:{}:{}", env.session, seq, pos, tokens.len());
    let body = activation::seal_message(
        &key,
        seq,
        Direction::Forward,
        aad.as_bytes(),
        &wire::tokens_to_bytes(tokens),
    );
    wire::encode_request(&env, &body)
}

#[test]
fn pipeline_steps_with_bad_numbers_or_for_another_peers_session_are_refused() {
    let lib = common::import_shards(3);
    // No ban here: every refused step must reach the node.
    let node = TestNode::start_custom(false, &[], &[("SWARMLLM_PEER_BAN_TRUST", "0")], |d| {
        give_shards(lib.path(), d, &[0, 1, 2])
    });
    let node_id = node_id(&node);
    wait_for(
        "the node to load its range",
        Duration::from_secs(60),
        || {
            let (_, v) = node.get("/api/v1/layers");
            (v["my_layer_count"] == 30).then_some(())
        },
    );
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let (tmp1, tmp2) = (
        tempfile::tempdir().expect("tempdir"),
        tempfile::tempdir().expect("tempdir"),
    );
    let (owner, owner_identity) = common::rogue_peer(&rt, tmp1.path());
    let (stranger, stranger_identity) = common::rogue_peer(&rt, tmp2.path());
    for peer in [&owner, &stranger] {
        rt.block_on(peer.add_seed_and_dial(&network_code(&node), "test"))
            .expect("joins");
    }
    let mut owner_link = rt.block_on(owner.open_link(&node_id)).expect("link");
    let mut stranger_link = rt.block_on(stranger.open_link(&node_id)).expect("link");
    let call = |link: &mut swarmllm_node::net::link::Link, bytes: Vec<u8>| {
        rt.block_on(link.call(Request::Activation(bytes)))
            .expect("an answer")
    };
    let prompt = [1, 504, 3158];

    // An oversized repeat_last_n is refused by the HTTP API's own validation.
    match call(
        &mut owner_link,
        token_step(&owner_identity, &node_id, 1, 0, &prompt, i32::MAX),
    ) {
        Response::Error { message, .. } => {
            assert!(message.contains("repeat_last_n"), "{message}")
        }
        other => panic!("accepted: {other:?}"),
    }
    // The same step with sane numbers opens the session for its sender.
    assert!(matches!(
        call(
            &mut owner_link,
            token_step(&owner_identity, &node_id, 2, 0, &prompt, 64)
        ),
        Response::Activation(_)
    ));
    // Another peer can neither step nor close it.
    match call(
        &mut stranger_link,
        token_step(&stranger_identity, &node_id, 3, 3, &[504], 64),
    ) {
        Response::Error { message, .. } => assert!(message.contains("another peer"), "{message}"),
        other => panic!("a stranger stepped the session: {other:?}"),
    }
    let close = {
        let mut env: serde_json::Value = {
            let bytes = token_step(&stranger_identity, &node_id, 4, 0, &[1], 64);
            let len = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) as usize;
            serde_json::from_slice(&bytes[4..4 + len]).expect("envelope")
        };
        env["close"] = json!(true);
        env["n_tokens"] = json!(0);
        let head = serde_json::to_vec(&env).expect("json");
        let mut out = (head.len() as u32).to_be_bytes().to_vec();
        out.extend_from_slice(&head);
        out
    };
    let _ = call(&mut stranger_link, close);
    // Nor can a session of its own take the owner's cache over (a next turn
    // continues only its own peer's session).
    match call(
        &mut stranger_link,
        token_step_in(
            &stranger_identity,
            &node_id,
            [0xc3; 16],
            Some([0x5a; 16]),
            4,
            3,
            &[504],
            64,
        ),
    ) {
        Response::Error { message, .. } => assert!(message.contains("another peer"), "{message}"),
        other => panic!("a stranger took the session over: {other:?}"),
    }
    // The owner's next step still finds its session where it left it.
    assert!(matches!(
        call(
            &mut owner_link,
            token_step(&owner_identity, &node_id, 5, 3, &[504], 64)
        ),
        Response::Activation(_)
    ));
    // Steps sent back to back (as a replay sends them) are answered in their
    // order, garbage among them included: the node reads ahead but never
    // answers out of turn, and the garbage costs only its own answer.
    rt.block_on(async {
        for bytes in [
            token_step(&owner_identity, &node_id, 6, 4, &[504], 64),
            b"\x00\x00\x00\x05garbage".to_vec(),
            token_step(&owner_identity, &node_id, 7, 5, &[3158], 64),
        ] {
            owner_link
                .post(Request::Activation(bytes))
                .await
                .expect("posted");
        }
        let mut kinds = Vec::new();
        for _ in 0..3 {
            kinds.push(match owner_link.answer().await.expect("an answer") {
                Response::Activation(_) => "step".to_string(),
                Response::Error { code, .. } => format!("error {code}"),
                other => format!("{other:?}"),
            });
        }
        assert_eq!(kinds, ["step", "error 400", "step"]);
    });
    // A response format's schema from a stranger: one over 16 KiB is refused
    // before anything is built, and so are primed tokens its grammar forbids
    // (llama.cpp would abort on accepting one: here the end of the turn before
    // the object even opened). A sane one samples.
    let schema = r#"{"type":"object","properties":{"a":{"type":"string"}},"required":["a"]}"#;
    let with_schema = |session: u8, schema: String, prime: Vec<i32>| {
        token_step_with(
            &stranger_identity,
            &node_id,
            [session; 16],
            None,
            1,
            0,
            &prompt,
            64,
            move |env| {
                if let Some(s) = env.sample.as_mut() {
                    s.json_schema = Some(schema);
                }
                env.prime = prime;
            },
        )
    };
    let huge = format!(
        r#"{{"type":"object","description":"{}"}}"#,
        "x".repeat(17 << 10)
    );
    for (what, step, words) in [
        (
            "an oversized schema",
            with_schema(0xd1, huge, vec![]),
            "response_format",
        ),
        (
            "a forbidden prime",
            with_schema(0xd2, schema.into(), vec![2]),
            "grammar",
        ),
    ] {
        match call(&mut stranger_link, step) {
            Response::Error { message, .. } => {
                assert!(message.contains(words), "{what}: {message}")
            }
            other => panic!("{what} accepted: {other:?}"),
        }
    }
    assert!(matches!(
        call(&mut stranger_link, with_schema(0xd3, schema.into(), vec![])),
        Response::Activation(_)
    ));

    // Draft tokens (speculative decoding) from a stranger: 17 of them (the
    // most is 16), as many as the step's rows, or for a sampler that is not
    // greedy and stateless (a repeat penalty) are refused. Two drafts in a
    // greedy step of three rows are verified: one sampled token per draft and
    // one more, every one in the vocabulary.
    let drafted = |session: u8, tokens: &[i32], draft: u32, repeat_penalty: f32| {
        token_step_with(
            &stranger_identity,
            &node_id,
            [session; 16],
            None,
            1,
            0,
            tokens,
            64,
            move |env| {
                env.draft = draft;
                if let Some(s) = env.sample.as_mut() {
                    s.repeat_penalty = repeat_penalty;
                }
            },
        )
    };
    let eighteen: Vec<i32> = (504..522).collect();
    for (what, step, words) in [
        ("17 drafts", drafted(0xe1, &eighteen, 17, 1.0), "draft"),
        (
            "drafts in every row",
            drafted(0xe2, &prompt, 3, 1.0),
            "draft",
        ),
        (
            "drafts with a repeat penalty",
            drafted(0xe3, &prompt, 1, 1.1),
            "greedy and stateless",
        ),
    ] {
        match call(&mut stranger_link, step) {
            Response::Error { message, .. } => {
                assert!(message.contains(words), "{what}: {message}")
            }
            other => panic!("{what} accepted: {other:?}"),
        }
    }
    let Response::Activation(answer) = call(&mut stranger_link, drafted(0xe4, &prompt, 2, 1.0))
    else {
        panic!("a sane draft step was refused");
    };
    {
        use swarmllm_node::pipeline::activation::{self, Direction, SessionKey};
        use swarmllm_node::pipeline::wire;
        let key = SessionKey::agree(
            &stranger_identity.x25519_secret(),
            &swarmllm_node::identity::x25519_public(&node_id).expect("node id"),
            &[0xe4; 16],
        );
        let (_, sealed) = wire::decode_answer(&answer).expect("an answer");
        let aad = format!("result:{}:1", to_hex(&[0xe4; 16]));
        let plain = activation::open_message(&key, 1, Direction::Backward, aad.as_bytes(), sealed)
            .expect("a result sealed for the stranger");
        let sampled = wire::decode_result(&plain, None, 2)
            .expect("a verification result")
            .expect("sampled tokens");
        // The token after the first verified row, then one after each draft.
        assert_eq!(sampled.after_drafts.len(), 2, "{sampled:?}");
        assert!(
            std::iter::once(&sampled.token)
                .chain(&sampled.after_drafts)
                .all(|t| (0..49_152).contains(t)),
            "{sampled:?}"
        );
    }

    // Still serving; the refusals counted against the stranger and the owner's
    // bad numbers against the owner.
    assert_eq!(node.get("/health/live").0, 200);
    let (_, peers) = node.get("/api/admin/peers");
    for id in [owner_identity.node_id(), stranger_identity.node_id()] {
        let p = peers["peers"]
            .as_array()
            .and_then(|ps| ps.iter().find(|p| p["node_id"] == id.as_str()))
            .unwrap_or_else(|| panic!("{id} not listed: {peers}"));
        assert!(p["bad_frames"].as_i64() >= Some(1), "{p}");
    }
}

#[test]
fn a_bad_manifest_on_disk_is_reported_and_skipped_and_the_node_starts() {
    let lib = common::import_shards(3);
    let node = TestNode::start_custom(false, &[], &[], |d| {
        give_shards(lib.path(), d, &[0, 1, 2]);
        // A second model whose manifest names a file outside its folder.
        let evil = d.join("models/evil");
        std::fs::create_dir_all(&evil).expect("mkdir");
        let text = std::fs::read(lib.path().join("models/smol/manifest.json")).expect("manifest");
        let mut m: Value = serde_json::from_slice(&text).expect("json");
        m["model_id"] = json!("evil");
        m["shards"][0]["file"] = json!("../../node.db");
        std::fs::write(
            evil.join("manifest.json"),
            serde_json::to_vec(&m).expect("json"),
        )
        .expect("write");
    });
    let (status, v) = node.get("/api/admin/models");
    assert_eq!(status, 200, "{v}");
    let rejected = v["rejected"].as_array().expect("rejected list").clone();
    assert_eq!(rejected.len(), 1, "{v}");
    assert_eq!(rejected[0]["dir"], "evil");
    assert_eq!(rejected[0]["rule"], "file_name");
    // The good model is served as usual; the node database is untouched.
    assert!(
        v["models"]
            .as_array()
            .expect("models")
            .iter()
            .any(|m| m["id"] == "smol" && m["complete"] == true),
        "{v}"
    );
    assert_eq!(node.get("/health/live").0, 200);
    assert!(node.dir().join("node.db").is_file());
}

#[test]
fn a_flood_of_garbage_leaves_the_nodes_memory_bounded() {
    // No ban: the flood must reach the node for the whole test.
    let node = TestNode::start_custom(false, &[], &[("SWARMLLM_PEER_BAN_TRUST", "0")], |_| {});
    let node_id = node_id(&node);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let tmp = tempfile::tempdir().expect("tempdir");
    let (rogue, _) = common::rogue_peer(&rt, tmp.path());
    rt.block_on(rogue.add_seed_and_dial(&network_code(&node), "test"))
        .expect("rogue joins");
    let flood = |n: usize| {
        rt.block_on(async {
            let mut pending = Vec::new();
            for i in 0..n {
                let garbage = vec![b'{'; 1 + i % 4096];
                pending.push(rogue.request(&node_id, Request::Credit(garbage)));
                pending.push(rogue.request(&node_id, Request::Activation(vec![0xab; 512])));
                if pending.len() >= 64 {
                    futures::future::join_all(pending.drain(..)).await;
                }
            }
            futures::future::join_all(pending).await;
        })
    };
    // A first round warms every path (allocator pools, SQLite pages), then the
    // measured round: ten times as many messages must not grow memory with them.
    flood(500);
    let before = node.rss_kib();
    flood(5000);
    let after = node.rss_kib();
    eprintln!("node RSS: {before} KiB before, {after} KiB after 10 000 garbage messages");
    assert!(
        after < before + 32 * 1024,
        "memory grew from {before} KiB to {after} KiB over 10 000 garbage messages"
    );
    assert_eq!(node.get("/health/live").0, 200);
}
