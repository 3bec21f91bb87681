//! Device pools on real node processes, driven through the CLI and the HTTP API:
//! the owner's side (create, one-time invite codes with their limits, state,
//! leave) and devices joining by code over gossip.

mod common;

use std::time::Duration;

use common::{TestNode, cli, network_code, node_id, rogue_peer, wait_for};
use serde_json::{Value, json};

const DEADLINE: Duration = Duration::from_secs(45);

/// Waits until `owner`'s pool state lists `node` as an accepted member.
fn wait_accepted(owner: &TestNode, node: &str, what: &str) {
    wait_for(what, DEADLINE, || {
        let (_, s) = owner.get("/api/pool/state");
        s["members"]
            .as_array()?
            .iter()
            .find(|m| m["node_id"] == node && m["accepted"] == true)
            .map(|_| ())
    });
}

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

    // Owner settings, with their ranges.
    let put = |path: &str, body: Value| node.call(reqwest::Method::PUT, path, &body).0;
    assert_eq!(put("/api/pool/credit-split", json!({ "pct": 30 })), 200);
    assert_eq!(put("/api/pool/credit-split", json!({ "pct": 51 })), 400);
    let me = state["members"][0]["node_id"].clone();
    assert_eq!(
        put(
            "/api/pool/contribution",
            json!({ "node_id": me, "level": 75 })
        ),
        200
    );
    assert_eq!(
        put(
            "/api/pool/contribution",
            json!({ "node_id": me, "level": 101 })
        ),
        400
    );
    assert_eq!(
        put(
            "/api/pool/contribution",
            json!({ "node_id": "nobody", "level": 5 })
        ),
        400
    );
    let (status, _) = node.post("/api/pool/device-name", &json!({ "name": "Gaming PC" }));
    assert_eq!(status, 200);
    let (_, state) = node.get("/api/pool/state");
    assert_eq!(state["credit_split_pct"], 30);
    assert_eq!(state["members"][0]["contribution"], 75);
    assert_eq!(state["members"][0]["device_name"], "Gaming PC");

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

#[test]
fn devices_join_by_code_over_gossip_once_and_see_each_other() {
    let a = TestNode::start_without_model();
    let invite = network_code(&a);
    let b = TestNode::start_full(false, &["--bootstrap", &invite]);
    let c = TestNode::start_full(false, &["--bootstrap", &invite]);
    wait_for("A to see both devices", DEADLINE, || {
        let (_, v) = a.get("/api/admin/network-code");
        (v["connected_peers"].as_u64()? >= 2).then_some(())
    });
    let (a_id, b_id) = (node_id(&a), node_id(&b));
    let (ok, _, err) = cli(
        a.dir(),
        a.port,
        &[
            "pool",
            "create",
            "--name",
            "Home",
            "--device-name",
            "desktop",
        ],
    );
    assert!(ok, "{err}");
    let code = |n: &TestNode| {
        let (ok, out, err) = cli(n.dir(), n.port, &["pool", "invite-code"]);
        assert!(ok, "{err}");
        out.trim().to_string()
    };
    let (first, second) = (code(&a), code(&a));

    // B joins with the CLI; the owner records its signed acceptance.
    let (ok, out, err) = cli(
        b.dir(),
        b.port,
        &[
            "pool",
            "join",
            &first.to_lowercase(),
            "--device-name",
            "laptop",
        ],
    );
    assert!(ok, "join: {out}{err}");
    assert!(out.contains("joined pool Home"), "{out}");
    let (_, state) = b.get("/api/pool/state");
    assert_eq!(
        (&state["role"], &state["owner_node_id"]),
        (&json!("member"), &json!(a_id)),
        "{state}"
    );
    wait_accepted(&a, &b_id, "A to record B's acceptance");

    // The owner's contribution level reaches B in the signed state and limits
    // it: at 0 it serves only itself and its pool, and stores nothing.
    let (s, v) = a.call(
        reqwest::Method::PUT,
        "/api/pool/contribution",
        &json!({ "node_id": b_id, "level": 0 }),
    );
    assert_eq!(s, 200, "{v}");
    b.wait_logged("B at level 0", DEADLINE, || {
        let (_, st) = b.get("/api/admin/stats");
        if st["contribution_level"] == 0 && st["contributing"] == false {
            Ok(())
        } else {
            Err(st.to_string())
        }
    });
    let (s, v) = a.call(
        reqwest::Method::PUT,
        "/api/pool/contribution",
        &json!({ "node_id": b_id, "level": 100 }),
    );
    assert_eq!(s, 200, "{v}");
    b.wait_logged("B back at 100", DEADLINE, || {
        let (_, st) = b.get("/api/admin/stats");
        if st["contribution_level"] == 100 && st["contributing"] == true {
            Ok(())
        } else {
            Err(st.to_string())
        }
    });

    // The code worked once; a wrong code finds no owner; a malformed one is 400.
    let (status, v) = c.post("/api/pool/join", &json!({ "code": first }));
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (410, Some("CODE_USED")),
        "{v}"
    );
    let (status, v) = c.post("/api/pool/join", &json!({ "code": "ZZZZZZZZ" }));
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (404, Some("UNKNOWN_CODE")),
        "{v}"
    );
    assert_eq!(
        c.post("/api/pool/join", &json!({ "code": "AB0O1I" })).0,
        400
    );

    // C joins with the second code; B learns of C from the owner's signed state.
    let (status, v) = c.post(
        "/api/pool/join",
        &json!({ "code": second, "device_name": "tablet" }),
    );
    assert_eq!(status, 200, "{v}");
    wait_for("B to see all three devices", DEADLINE, || {
        let (_, s) = b.get("/api/pool/state");
        (s["members"].as_array()?.len() == 3).then_some(())
    });
    let (status, v) = c.post("/api/pool/join", &json!({ "code": code(&a) }));
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (409, Some("ALREADY_IN_POOL")),
        "{v}"
    );

    // C renames itself: the owner takes the signed rename into its signed
    // state, so every device shows the new name and the owner's next state
    // (the contribution change below) does not undo it.
    let c_id = node_id(&c);
    let (status, v) = c.post(
        "/api/pool/device-name",
        &json!({ "name": " kitchen tablet " }),
    );
    assert_eq!(status, 200, "{v}");
    let name_of = |n: &TestNode, id: &str| {
        let (_, s) = n.get("/api/pool/state");
        s["members"]
            .as_array()?
            .iter()
            .find(|m| m["node_id"] == id)
            .map(|m| m["device_name"].clone())
    };
    for (who, n) in [("A", &a), ("B", &b)] {
        wait_for(&format!("{who} to show C's new name"), DEADLINE, || {
            (name_of(n, &c_id)? == "kitchen tablet").then_some(())
        });
    }
    let (s, v) = a.call(
        reqwest::Method::PUT,
        "/api/pool/contribution",
        &json!({ "node_id": c_id, "level": 90 }),
    );
    assert_eq!(s, 200, "{v}");
    wait_for("C to get the owner's next state", DEADLINE, || {
        let (_, st) = c.get("/api/admin/stats");
        (st["contribution_level"] == 90).then_some(())
    });
    assert_eq!(name_of(&c, &c_id), Some(json!("kitchen tablet")));
    assert_eq!(name_of(&b, &c_id), Some(json!("kitchen tablet")));
    // A name with a control character, or too long, is refused.
    for bad in ["bad\u{7}name", &"x".repeat(65)] {
        let (status, v) = c.post("/api/pool/device-name", &json!({ "name": bad }));
        assert_eq!(status, 400, "{v}");
    }

    // The owner removes B: B leaves the pool on the signed notice, C sees it go.
    let (ok, _, err) = cli(a.dir(), a.port, &["pool", "remove", &b_id]);
    assert!(ok, "{err}");
    wait_for("B to be out of the pool", DEADLINE, || {
        (b.get("/api/pool/state").1["in_pool"] == false).then_some(())
    });
    wait_for("C to see two devices", DEADLINE, || {
        let (_, s) = c.get("/api/pool/state");
        (s["members"].as_array()?.len() == 2).then_some(())
    });
    // Only the owner removes.
    let (status, _) = c.post("/api/pool/remove", &json!({ "node_id": a_id }));
    assert_eq!(status, 403);

    // Invited back by node id: only B can read the invitation; B accepts it.
    let (status, v) = a.post("/api/pool/invite", &json!({ "node_id": b_id }));
    assert_eq!(status, 200, "{v}");
    let invitation = wait_for("B to receive the invitation", DEADLINE, || {
        let (_, v) = b.get("/api/pool/invitations");
        v["invitations"].as_array()?.first().cloned()
    });
    assert_eq!(invitation["pool_name"], "Home");
    assert_eq!(c.get("/api/pool/invitations").1["invitations"], json!([]));
    let (status, v) = b.post(
        "/api/pool/accept",
        &json!({ "invitation_id": invitation["invitation_id"] }),
    );
    assert_eq!((status, &v["role"]), (200, &json!("member")), "{v}");
    wait_accepted(&a, &b_id, "A to record B's acceptance again");
    let (status, _) = b.post("/api/pool/accept", &json!({ "invitation_id": "nope" }));
    assert_eq!(status, 400);

    // Online status and per-device stats come from each device's announcements.
    let state = wait_for("A to see C online with stats", DEADLINE, || {
        let (_, s) = a.get("/api/pool/state");
        let c_entry = s["members"]
            .as_array()?
            .iter()
            .find(|m| m["device_name"] == "kitchen tablet")?
            .clone();
        (c_entry["online"] == true && c_entry["stats"]["uptime_secs"].as_u64()? > 0).then_some(s)
    });
    assert!(state["combined_vram_gb"].is_number(), "{state}");
    let (_, board) = a.get("/api/pool/leaderboard");
    let ranks: Vec<u64> = board["members"]
        .as_array()
        .expect("members")
        .iter()
        .filter_map(|m| m["rank"].as_u64())
        .collect();
    assert_eq!(ranks, vec![1, 2, 3], "{board}");
}

#[test]
fn expired_codes_a_full_pool_and_too_many_attempts_are_refused() {
    // The owner's pool clock is shifted by the seconds in this file.
    let clock = tempfile::NamedTempFile::new().expect("clock file");
    std::fs::write(clock.path(), "0").expect("write clock");
    let owner = TestNode::start_custom(
        false,
        &[],
        &[
            (
                "SWARMLLM_TEST_CLOCK_OFFSET_FILE",
                clock.path().to_str().expect("utf-8"),
            ),
            ("SWARMLLM_POOL_MAX_DEVICES", "2"),
        ],
        |_| {},
    );
    let invite = network_code(&owner);
    let b = TestNode::start_full(false, &["--bootstrap", &invite]);
    let c = TestNode::start_full(false, &["--bootstrap", &invite]);
    wait_for("the owner to see both devices", DEADLINE, || {
        let (_, v) = owner.get("/api/admin/network-code");
        (v["connected_peers"].as_u64()? >= 2).then_some(())
    });
    assert_eq!(
        owner.post("/api/pool/create", &json!({ "name": "Home" })).0,
        200
    );
    let code = |n: &TestNode| {
        let (status, v) = n.post("/api/pool/generate-code", &json!({}));
        assert_eq!(status, 200, "{v}");
        v["code"].as_str().expect("code").to_string()
    };
    let (stale, fresh_b, fresh_c) = (code(&owner), code(&owner), code(&owner));

    // 25 hours later (by the owner's clock) the first code no longer works...
    std::fs::write(clock.path(), (25 * 3600).to_string()).expect("write clock");
    let (status, v) = b.post("/api/pool/join", &json!({ "code": stale }));
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (410, Some("CODE_EXPIRED")),
        "{v}"
    );
    // ...and neither do the others: every code lives 24 hours.
    let (status, v) = b.post("/api/pool/join", &json!({ "code": fresh_b }));
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (410, Some("CODE_EXPIRED")),
        "{v}"
    );
    std::fs::write(clock.path(), "0").expect("write clock");

    // With room for two devices (the owner and one more), the second joiner is refused.
    let (status, v) = b.post("/api/pool/join", &json!({ "code": fresh_c }));
    assert_eq!(status, 200, "{v}");
    let (status, v) = c.post("/api/pool/join", &json!({ "code": code(&owner) }));
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (409, Some("POOL_FULL")),
        "{v}"
    );

    // Bad attempts cost the sender: its eleventh pool operation within the hour is 429.
    let mut statuses = Vec::new();
    for _ in 0..10 {
        let (status, v) = c.post("/api/pool/join", &json!({ "code": stale }));
        statuses.push(status);
        if status == 429 {
            assert!(
                v["error"]["details"]["retry_after"].as_u64().is_some(),
                "{v}"
            );
            break;
        }
    }
    // C's join refused as full was its first operation: nine more are answered,
    // the eleventh is not. The stale code itself has few online attempts: B's
    // try was its first, four more are answered (full); after that the owner no
    // longer runs the exchange for it, and the joiner finds no owner (404).
    let answered = (swarmllm_node::pool::CODE_ATTEMPTS - 1) as usize;
    let mut expected = vec![409; answered];
    expected.resize(9, 404);
    expected.push(429);
    assert_eq!(statuses, expected);
}

#[test]
fn offline_mode_dials_nobody_after_a_restart() {
    let a = TestNode::start_without_model();
    let mut b = TestNode::start_full(false, &["--bootstrap", &network_code(&a)]);
    let a_id = node_id(&a);
    let connected = |n: &TestNode| {
        n.get("/api/admin/peers").1["peers"]
            .as_array()
            .is_some_and(|p| {
                p.iter()
                    .any(|p| p["node_id"] == a_id.as_str() && p["is_active"] == true)
            })
    };
    wait_for("B to connect to A", DEADLINE, || {
        connected(&b).then_some(())
    });
    let p2p = |n: &TestNode| n.get("/api/admin/stats").1["p2p"].clone();

    let (status, v) = b.call(
        reqwest::Method::PUT,
        "/api/pool/private-mode",
        &json!({ "enabled": true, "offline_mode": true }),
    );
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["restart_required"], json!(["offline_mode"]), "{v}");
    // Restarted without --bootstrap, B would redial its saved seed (A); offline, it
    // dials nobody: no bootstrap, seeds, DHT walks, peer exchange or redials.
    b.restart_plain();
    let stats = wait_for("three maintenance rounds", DEADLINE, || {
        let s = p2p(&b);
        (s["counters"]["maintenance_rounds"].as_u64()? >= 3).then_some(s)
    });
    assert_eq!(stats["offline"], true, "{stats}");
    assert_eq!(stats["counters"]["dials_started"], 0, "{stats}");
    assert!(b.log().contains("offline mode: finding peers by mDNS only"));
    let (status, v) = b.post("/api/v1/network/discover", &json!({}));
    assert_eq!(status, 200, "{v}");
    assert_eq!(p2p(&b)["counters"]["dials_started"], 0);

    // Back online, the same restart redials the saved seed.
    let (status, _) = b.call(
        reqwest::Method::PUT,
        "/api/pool/private-mode",
        &json!({ "enabled": false, "offline_mode": false }),
    );
    assert_eq!(status, 200);
    b.restart_plain();
    wait_for("B to redial A", DEADLINE, || {
        (p2p(&b)["offline"] == false && connected(&b)).then_some(())
    });
    assert!(p2p(&b)["counters"]["dials_started"].as_u64() > Some(0));
}

#[test]
fn a_join_by_code_is_a_pake_that_an_observer_can_neither_test_nor_replay() {
    let a = TestNode::start_without_model();
    let invite = network_code(&a);
    let b = TestNode::start_full(false, &["--bootstrap", &invite]);
    let c = TestNode::start_full(false, &["--bootstrap", &invite]);
    let a_id = node_id(&a);
    // An observer on the pool topic records every message of the exchange.
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let tmp = tempfile::tempdir().expect("tempdir");
    let (rogue, rogue_identity) = rogue_peer(&rt, tmp.path());
    let rogue_id = rogue_identity.node_id();
    let (tx, mut seen) = tokio::sync::mpsc::channel::<(String, Vec<u8>)>(256);
    rogue.set_pool_handler(tx);
    rt.block_on(rogue.add_seed_and_dial(&invite, "test"))
        .expect("observer joins");
    wait_for("A to see every device", DEADLINE, || {
        let (_, v) = a.get("/api/admin/network-code");
        (v["connected_peers"].as_u64()? >= 3).then_some(())
    });
    let (status, v) = a.post("/api/pool/create", &json!({ "name": "Home" }));
    assert_eq!(status, 200, "{v}");
    let code_of = |v: Value| v["code"].as_str().expect("code").to_string();
    let first = code_of(a.post("/api/pool/generate-code", &json!({})).1);
    let second = code_of(a.post("/api/pool/generate-code", &json!({})).1);

    let (status, v) = b.post("/api/pool/join", &json!({ "code": first }));
    assert_eq!(status, 200, "{v}");
    let b_id = node_id(&b);
    wait_accepted(&a, &b_id, "A to record B");
    // Everything that travelled: the join's three messages (and the state).
    let mut messages: Vec<(String, Value)> = Vec::new();
    let kinds = |m: &[(String, Value)]| {
        m.iter()
            .filter_map(|(_, v)| v["type"].as_str().map(str::to_string))
            .collect::<Vec<_>>()
    };
    wait_for("the observer to see the whole join", DEADLINE, || {
        while let Ok((author, bytes)) = seen.try_recv() {
            let text = String::from_utf8_lossy(&bytes).to_string();
            // Neither the code nor its hash is ever on the wire.
            assert!(!text.contains(&first), "the code travelled: {text}");
            assert!(
                !text.contains(&swarmllm_node::pool::code_hash(&first)),
                "the code's hash travelled: {text}"
            );
            messages.push((author, serde_json::from_slice(&bytes).expect("json")));
        }
        let k = kinds(&messages);
        ["join_start", "join_reply", "join_finish"]
            .iter()
            .all(|t| k.iter().any(|x| x == t))
            .then_some(())
    });

    // Replayed as the observer's own, with its own node id, nothing gets it in.
    for (_, message) in &messages {
        let mut forged = message.clone();
        if forged.get("node_id").is_some() {
            forged["node_id"] = json!(rogue_id);
        }
        let _ = rt.block_on(rogue.publish_pool(serde_json::to_vec(&forged).expect("json")));
    }
    // The owner answers the replayed start like any guess (it cannot tell): that
    // answer, addressed to the observer, shows the replays were processed.
    wait_for("the owner to answer the replayed start", DEADLINE, || {
        while let Ok((author, bytes)) = seen.try_recv() {
            messages.push((author, serde_json::from_slice(&bytes).expect("json")));
        }
        messages
            .iter()
            .any(|(author, v)| {
                author == &a_id && v["type"] == "join_reply" && v["node_id"] == rogue_id.as_str()
            })
            .then_some(())
    });
    let (_, state) = a.get("/api/pool/state");
    let members = state["members"].as_array().expect("members").clone();
    assert_eq!(members.len(), 2, "{state}");
    assert!(
        members.iter().all(|m| m["node_id"] != rogue_id.as_str()),
        "{state}"
    );

    // A wrong code with a live code's nameplate: the owner answers, the joiner
    // cannot verify the answer, and learns only that the code is unknown.
    let wrong: String = second
        .chars()
        .take(2)
        .chain(
            second
                .chars()
                .skip(2)
                .map(|ch| if ch == 'A' { 'B' } else { 'A' }),
        )
        .collect();
    let (status, v) = c.post("/api/pool/join", &json!({ "code": wrong }));
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (404, Some("UNKNOWN_CODE")),
        "{v}"
    );
    assert!(!v.to_string().contains("Home"), "{v}");
    // The right code still works (one attempt spent, a few left).
    let (status, v) = c.post("/api/pool/join", &json!({ "code": second }));
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["role"], "member", "{v}");
}
