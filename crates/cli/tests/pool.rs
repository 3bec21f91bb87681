//! Device pools on a real node process: what works so far is the owner's side
//! (create, one-time invite codes with their limits, state, leave), driven through
//! the CLI and the HTTP API.

mod common;

use common::{TestNode, cli};
use serde_json::{Value, json};

#[test]
fn owner_creates_a_pool_and_issues_at_most_five_codes() {
    let node = TestNode::start_without_model();
    let (_, state) = node.get("/api/pool/state");
    assert_eq!(state["in_pool"], false);
    // Writes need the key.
    let status = node
        .http()
        .post(node.url("/api/pool/create"))
        .json(&json!({ "name": "x" }))
        .send()
        .expect("post")
        .status();
    assert_eq!(status.as_u16(), 401);
    assert_eq!(node.post("/api/pool/create", &json!({ "name": "" })).0, 400);

    let (ok, out, err) = cli(
        node.dir(),
        node.port,
        &[
            "pool",
            "create",
            "--name",
            "My Devices",
            "--device-name",
            "laptop",
        ],
    );
    assert!(ok, "{out}{err}");
    assert!(out.contains("created pool My Devices"), "{out}");
    let (status, v) = node.post("/api/pool/create", &json!({ "name": "Second" }));
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (409, Some("ALREADY_IN_POOL"))
    );

    let mut codes = Vec::new();
    for _ in 0..4 {
        let (ok, out, err) = cli(node.dir(), node.port, &["pool", "invite-code"]);
        assert!(ok, "{err}");
        codes.push(out.trim().to_string());
    }
    let (status, v) = node.post("/api/pool/generate-code", &json!({}));
    assert_eq!(status, 200, "{v}");
    codes.push(v["code"].as_str().expect("code").to_string());
    for code in &codes {
        assert_eq!(code.len(), 8, "{code}");
        assert!(
            code.bytes()
                .all(|b| b"ABCDEFGHJKLMNPQRSTUVWXYZ23456789".contains(&b)),
            "{code}"
        );
    }
    let distinct: std::collections::HashSet<&String> = codes.iter().collect();
    assert_eq!(distinct.len(), 5);
    // The sixth active code is refused, clearly.
    let (status, v) = node.post("/api/pool/generate-code", &json!({}));
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (409, Some("TOO_MANY_CODES")),
        "{v}"
    );
    let (ok, _, err) = cli(node.dir(), node.port, &["pool", "invite-code"]);
    assert!(!ok && err.contains("5 active invite codes"), "{err}");

    let (_, state): (u16, Value) = node.get("/api/pool/state");
    assert_eq!(state["active_codes"], 5);
    assert_eq!(state["role"], "owner");
    assert_eq!(state["members"][0]["device_name"], "laptop");
    // Codes are kept only as hashes.
    let db = std::fs::read(node.dir().join("node.db")).expect("db");
    for code in &codes {
        assert!(
            !db.windows(8).any(|w| w == code.as_bytes()),
            "code {code} stored in clear"
        );
    }

    let (ok, out, _) = cli(node.dir(), node.port, &["pool", "status"]);
    assert!(
        ok && out.contains("My Devices") && out.contains("5 active"),
        "{out}"
    );
    let (ok, _, err) = cli(node.dir(), node.port, &["pool", "leave"]);
    assert!(ok, "{err}");
    assert_eq!(node.get("/api/pool/state").1["in_pool"], false);
    let (status, _) = node.post("/api/pool/generate-code", &json!({}));
    assert_eq!(status, 404);
}
