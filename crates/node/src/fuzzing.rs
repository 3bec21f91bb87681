//! One entry point per decoder of bytes a peer sends, for fuzzing: the
//! cargo-fuzz targets in `fuzz/` call these, and a unit test runs each over real
//! messages ([`seeds`]) and random mutations of them on the stable toolchain, so
//! CI exercises every target briefly. None may panic, hang or allocate without
//! bound, whatever the input.

use crate::identity::Identity;
use crate::net::frame::{FetchRequest, FrameCodec, PROTOCOL, Request};
use crate::pipeline::activation::{self, Direction, Dtype, Header, SessionKey};
use crate::pipeline::wire;
use crate::shard::Manifest;
use crate::shard::gguf::Gguf;

/// The fixed identity whose announcements the announcement target verifies.
fn peer() -> Identity {
    Identity::from_secret_bytes(&[42; 32])
}

/// Its node id, computed once (the targets run millions of times).
fn peer_id() -> &'static str {
    static ID: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    ID.get_or_init(|| peer().node_id())
}

/// The fixed key the activation target opens frames with, agreed once.
fn link_key() -> &'static SessionKey {
    static KEY: std::sync::OnceLock<SessionKey> = std::sync::OnceLock::new();
    KEY.get_or_init(|| {
        let ours = x25519_dalek::StaticSecret::from([1u8; 32]);
        let theirs = x25519_dalek::PublicKey::from(&x25519_dalek::StaticSecret::from([2u8; 32]));
        SessionKey::agree(&ours, &theirs, &[3; 16])
    })
}

/// The JSON model files a peer serves: `manifest.json` and `shard_hashes.json`.
pub fn manifest(data: &[u8]) {
    let _ = Manifest::from_json(data);
    let _ = crate::shard::ShardHashes::from_json(data, crate::shard::manifest::MAX_LAYERS);
}

/// A GGUF header from a peer (`gguf_header.bin`), and a whole GGUF; a header that
/// parses is split (the plan a manifest from the same peer must match) and merged
/// as the two parts of a multi-part GGUF.
pub fn gguf_header(data: &[u8]) {
    let _ = Gguf::header_from_bytes(data);
    if let Ok(g) = Gguf::from_bytes(data) {
        let _ = crate::shard::plan(&g, 3);
        let _ = crate::shard::parts::merge(&[g.clone(), g]);
    }
}

/// A request-response frame, read as a request and as a response.
pub fn frame(data: &[u8]) {
    use libp2p::request_response::Codec;
    futures::executor::block_on(async {
        let mut codec = FrameCodec;
        let _ = codec.read_request(&PROTOCOL, &mut &data[..]).await;
        let _ = codec.read_response(&PROTOCOL, &mut &data[..]).await;
    });
}

/// A pipeline step request and answer.
pub fn step_envelope(data: &[u8]) {
    let _ = wire::decode_request(data);
    let _ = wire::decode_answer(data);
}

/// A step's result as the last hop sends it back (opened): a sampled token,
/// with log-probabilities when the requester asked for some, or the tokens
/// after each row of a step with drafts.
pub fn step_result(data: &[u8]) {
    for wanted in [None, Some(0), Some(3), Some(20)] {
        let _ = wire::decode_result(data, wanted, 0);
    }
    for drafts in [1, 4, wire::MAX_DRAFT] {
        let _ = wire::decode_result(data, None, drafts);
    }
}

/// A sealed activation frame and a sealed step message.
pub fn activation_frame(data: &[u8]) {
    let key = link_key();
    let _ = activation::open(key, data, Direction::Forward);
    let _ = activation::open_message(key, 1, Direction::Backward, b"aad", data);
}

/// A gossiped announcement.
pub fn announcement(data: &[u8]) {
    let _ = crate::net::announce::verify(data, peer_id(), 1_000_000, 3600);
}

/// A pool-topic message.
pub fn pool_message(data: &[u8]) {
    crate::pool::decode_message(data);
}

/// A credit-ledger message.
pub fn credit_message(data: &[u8]) {
    crate::credits::decode_message(data);
}

/// A `swarm://` network code and a pool invite code.
pub fn invite_code(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = crate::net::invite::decode(text, "swarmllm");
        let _ = crate::pool::parse_code(text);
    }
}

/// A fuzz target: takes any bytes, must never panic.
pub type Target = fn(&[u8]);

/// Every target by name.
pub const TARGETS: &[(&str, Target)] = &[
    ("manifest", manifest),
    ("gguf_header", gguf_header),
    ("frame", frame),
    ("step_envelope", step_envelope),
    ("step_result", step_result),
    ("activation_frame", activation_frame),
    ("announcement", announcement),
    ("pool_message", pool_message),
    ("credit_message", credit_message),
    ("invite_code", invite_code),
];

/// Writes `target`'s seeds into the directory `SWARMLLM_FUZZ_SEEDS` names, if
/// set (the fuzz targets call this before libFuzzer reads its corpus).
pub fn write_seeds_from_env(target: &str) {
    let Some(dir) = std::env::var_os("SWARMLLM_FUZZ_SEEDS") else {
        return;
    };
    let dir = std::path::PathBuf::from(dir);
    if std::fs::create_dir_all(&dir).is_err() {
        return;
    }
    for (i, (_, bytes)) in seeds()
        .into_iter()
        .filter(|(n, _)| *n == target)
        .enumerate()
    {
        let _ = std::fs::write(dir.join(format!("seed-{i}")), bytes);
    }
}

/// Real messages for each target (its seed corpus).
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    use serde_json::json;
    let mut out: Vec<(&'static str, Vec<u8>)> = Vec::new();
    // A manifest as `models import` writes it.
    let entry = |file: &str| json!({ "file": file, "bytes": 10, "blake3": "ab".repeat(32) });
    let shard = |i: u32, a: u32, b: u32| {
        let mut s = json!({ "file": crate::shard::shard_file_name(i), "bytes": 10 });
        s["index"] = json!(i);
        s["layer_start"] = json!(a);
        s["layer_end"] = json!(b);
        s["tensors"] = json!(9);
        s["has_embedding"] = json!(i == 0);
        s["has_head"] = json!(i == 1);
        s
    };
    out.push((
        "manifest",
        serde_json::to_vec(&json!({
            "format": crate::shard::FORMAT, "model_id": "m", "architecture": "llama",
            "n_layers": 4, "tied_embeddings": true, "source": json!({ "file": "m.gguf", "bytes": 99, "sha256": "cd".repeat(32) }),
            "header": entry("gguf_header.bin"), "shards": [shard(0, 0, 2), shard(1, 2, 4)],
        }))
        .unwrap_or_default(),
    ));
    out.push((
        "manifest",
        serde_json::to_vec(&json!({ "shards": { "0": "ab".repeat(32), "1": "cd".repeat(32) } }))
            .unwrap_or_default(),
    ));
    // A GGUF with metadata and two tiny tensors.
    let path = std::env::temp_dir().join(format!("swarmllm-seed-{}.gguf", uuid::Uuid::new_v4()));
    let kv = vec![
        (
            "general.architecture".to_string(),
            crate::shard::gguf::Value::Str("llama".into()),
        ),
        (
            "llama.block_count".to_string(),
            crate::shard::gguf::Value::U32(1),
        ),
        (
            "tokenizer.ggml.tokens".to_string(),
            crate::shard::gguf::Value::Array(8, vec![crate::shard::gguf::Value::Str("a".into())]),
        ),
    ];
    let tensors = [
        crate::shard::gguf::TensorSource::f32("token_embd.weight", vec![2, 1], &[0.5, 1.0]),
        crate::shard::gguf::TensorSource::f32("blk.0.attn_q.weight", vec![2], &[1.0, 2.0]),
    ];
    if crate::shard::gguf::write(&path, &kv, 32, &tensors).is_ok()
        && let Ok(bytes) = std::fs::read(&path)
    {
        out.push(("gguf_header", bytes));
    }
    let _ = std::fs::remove_file(&path);
    // Frames as the codec writes them.
    for request in [
        Request::Echo(vec![1, 2, 3]),
        Request::GetPeers,
        Request::Credit(b"{\"op\":\"ask_receipt\",\"session\":\"00\"}".to_vec()),
        Request::Fetch(FetchRequest {
            model_id: "m".into(),
            file: "manifest.json".into(),
            offset: 0,
            len: 1024,
        }),
    ] {
        use libp2p::request_response::Codec;
        let mut buf = futures::io::Cursor::new(Vec::new());
        if futures::executor::block_on(FrameCodec.write_request(&PROTOCOL, &mut buf, request))
            .is_ok()
        {
            out.push(("frame", buf.into_inner()));
        }
    }
    // A step request and answer.
    let mut env = wire::Envelope {
        session: "00112233445566778899aabbccddeeff".into(),
        seq: 1,
        requester: peer().node_id(),
        route: vec![wire::Hop {
            node_id: peer().node_id(),
            model_id: "m".into(),
            layer_start: 0,
            layer_end: 4,
        }],
        pos: 0,
        n_tokens: 2,
        input: wire::InputKind::Tokens,
        dtype: "f16".into(),
        sample: None,
        prime: vec![],
        continues: None,
        close: false,
        draft: 0,
        requester_sig: String::new(),
    };
    env.sign(&peer());
    out.push(("step_envelope", wire::encode_request(&env, &[9; 24])));
    // A next turn's first step, taking over an earlier session's cache.
    env.continues = Some("ffeeddccbbaa99887766554433221100".into());
    env.pos = 5;
    env.sign(&peer());
    out.push(("step_envelope", wire::encode_request(&env, &[9; 24])));
    out.push((
        "step_envelope",
        wire::encode_answer(std::time::Duration::from_micros(5), &[1; 20]),
    ));
    // A sampled step asking for log-probabilities, and the results a last hop
    // sends back (plain, and with three alternatives).
    env.sample = Some(wire::SampleSpec {
        temperature: 0.0,
        top_p: 1.0,
        top_k: 0,
        min_p: 0.0,
        repeat_penalty: 1.0,
        repeat_last_n: 64,
        seed: 1,
        json_schema: None,
        logprobs: Some(3),
    });
    env.sign(&peer());
    out.push(("step_envelope", wire::encode_request(&env, &[9; 24])));
    let plain = wire::Sampled::token(42);
    let with = wire::Sampled {
        token: 42,
        logprobs: Some((-0.25, vec![(42, -0.25), (7, -1.5), (9, -3.0)])),
        after_drafts: Vec::new(),
    };
    out.push(("step_result", wire::encode_result(Some(&plain))));
    out.push(("step_result", wire::encode_result(Some(&with))));
    // A sealed activation frame and message.
    let key = link_key();
    for dtype in [Dtype::F16, Dtype::F32, Dtype::Q8] {
        if let Ok(frame) = activation::seal(
            key,
            Header {
                dtype,
                session: [3; 16],
                start_pos: 0,
                n_tokens: 2,
                n_embd: 4,
                seq: 1,
            },
            Direction::Forward,
            &[0.5; 8],
        ) {
            out.push(("activation_frame", frame));
        }
    }
    out.push((
        "activation_frame",
        activation::seal_message(key, 1, Direction::Backward, b"aad", &7i32.to_le_bytes()),
    ));
    // A signed announcement.
    let announcement = crate::net::announce::Announcement {
        node_id: peer().node_id(),
        nickname: Some("seed".into()),
        version: crate::VERSION.into(),
        capabilities: vec!["inference".into()],
        hardware: Default::default(),
        region: "EU".into(),
        models: vec![],
        load: Default::default(),
        addrs: vec!["/ip4/127.0.0.1/tcp/1".into()],
        timestamp: 1_000_000,
        seq: 1,
    };
    out.push(("announcement", announcement.sign(&peer())));
    // Pool and credit messages.
    out.push((
        "pool_message",
        serde_json::to_vec(&json!({
            "type": "join_start", "nameplate": "AB", "node_id": peer().node_id(),
            "device_name": null, "pake": "QUJD",
        }))
        .unwrap_or_default(),
    ));
    out.push((
        "pool_message",
        serde_json::to_vec(&json!({
            "type": "state", "body": "{\"pool_id\":\"p\",\"name\":\"n\",\"owner_node_id\":\"o\",\"members\":[],\"issued_at\":1}",
            "signature": "00",
        }))
        .unwrap_or_default(),
    ));
    out.push((
        "credit_message",
        serde_json::to_vec(&json!({ "op": "propose", "entry": {
            "body": "{\"kind\":\"transfer\",\"id\":\"t\",\"payer\":\"a\",\"payee\":\"b\",\"amount\":5,\"timestamp\":1}",
            "payer_sig": "", "payee_sig": "" } }))
        .unwrap_or_default(),
    ));
    // Codes.
    let invite = crate::net::invite::Invite {
        peer_id: "12D3KooWEyoppNCUx8Yx66oV9fJnriXwCcXwDDUA2kj6vnc6iDEp".into(),
        addrs: vec!["/ip4/127.0.0.1/tcp/8801".into()],
    };
    out.push((
        "invite_code",
        crate::net::invite::encode(&invite, "swarmllm").into_bytes(),
    ));
    out.push(("invite_code", b"ABCD-EF23".to_vec()));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// Every target over its seeds and 3000 random mutations of them (byte
    /// flips, insertions, truncations, splices): a short run of what
    /// `scripts/fuzz` runs for millions of executions.
    #[test]
    fn every_target_survives_its_seeds_and_their_mutations() {
        let seeds = seeds();
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for (name, target) in TARGETS {
            let own: Vec<&Vec<u8>> = seeds
                .iter()
                .filter(|(n, _)| n == name)
                .map(|(_, s)| s)
                .collect();
            assert!(!own.is_empty(), "no seed for {name}");
            for seed in &own {
                target(seed);
            }
            for _ in 0..3000 {
                let mut data = own[rng.gen_range(0..own.len())].clone();
                for _ in 0..rng.gen_range(1..8) {
                    match rng.gen_range(0..4) {
                        0 if !data.is_empty() => {
                            let i = rng.gen_range(0..data.len());
                            data[i] = rng.r#gen();
                        }
                        1 => {
                            let i = rng.gen_range(0..=data.len());
                            data.insert(i, rng.r#gen());
                        }
                        2 if !data.is_empty() => {
                            data.truncate(rng.gen_range(0..data.len()));
                        }
                        _ => {
                            let other = &seeds[rng.gen_range(0..seeds.len())].1;
                            let at = rng.gen_range(0..=data.len());
                            data.splice(at..at, other.iter().take(64).copied());
                        }
                    }
                }
                target(&data);
            }
        }
    }

    #[test]
    fn every_seed_is_a_message_its_decoder_accepts() {
        let seeds = seeds();
        let manifest = seeds.iter().find(|(n, _)| *n == "manifest").map(|(_, s)| s);
        assert!(Manifest::from_json(manifest.expect("seed")).is_ok());
        let gguf = seeds
            .iter()
            .find(|(n, _)| *n == "gguf_header")
            .map(|(_, s)| s);
        assert!(Gguf::from_bytes(gguf.expect("seed")).is_ok());
        let ann = seeds
            .iter()
            .find(|(n, _)| *n == "announcement")
            .map(|(_, s)| s);
        assert!(
            crate::net::announce::verify(ann.expect("seed"), &peer().node_id(), 1_000_000, 3600)
                .is_ok()
        );
        let code = seeds
            .iter()
            .find(|(n, _)| *n == "invite_code")
            .map(|(_, s)| s);
        let code = std::str::from_utf8(code.expect("seed")).expect("utf-8");
        assert!(crate::net::invite::decode(code, "swarmllm").is_ok());
        // Every step request seed decodes, the takeover one with its field.
        let steps: Vec<_> = seeds
            .iter()
            .filter(|(n, _)| *n == "step_envelope")
            .filter_map(|(_, s)| wire::decode_request(s).ok())
            .collect();
        assert_eq!(steps.len(), 3);
        assert!(steps[1].0.continues_bytes().is_ok_and(|c| c.is_some()));
        assert_eq!(steps[2].0.sample.as_ref().and_then(|s| s.logprobs), Some(3));
        // Both result seeds read back as what was sent, asked for 3 alternatives.
        let results: Vec<_> = seeds
            .iter()
            .filter(|(n, _)| *n == "step_result")
            .map(|(_, s)| wire::decode_result(s, Some(3), 0))
            .collect();
        assert_eq!(results.len(), 2);
        assert!(
            results[0].is_err(),
            "a plain token when log-probabilities were asked for"
        );
        assert!(
            results[1]
                .as_ref()
                .is_ok_and(|r| r.as_ref().is_some_and(|r| r.logprobs.is_some()))
        );
    }
}
