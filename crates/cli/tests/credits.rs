//! The credit ledger across separate node processes: a split request ends with
//! the same dual-signed receipt on both sides and balances moved by the same
//! amount; transfers are countersigned; tampered entries are refused; a pool
//! member forwards the owner's share; `kill -9` inside a credit write leaves a
//! ledger that verifies.

mod common;

use std::time::Duration;

use common::{
    TestNode, cli, give_shards, import_shards, network_code, node_id, rogue_peer, wait_for,
};
use serde_json::{Value, json};
use swarmllm_node::credits::{Body, Entry, Kind, Party};
use swarmllm_node::identity::Identity;
use swarmllm_node::net::Network;
use swarmllm_node::net::frame::{Request, Response};

const DEADLINE: Duration = Duration::from_secs(90);
const EPS: f64 = 1e-9;

fn wait_servable(node: &TestNode) {
    wait_for("smol servable via 2 holders", DEADLINE, || {
        let (_, models) = node.get("/v1/models");
        models["data"]
            .as_array()?
            .iter()
            .find(|m| m["id"] == "smol" && m["meta"]["holders"].as_u64() == Some(2))
            .map(|_| ())
    });
}

/// The node's transactions once there are `n`.
fn transactions(node: &TestNode, n: usize) -> Vec<Value> {
    wait_for(&format!("{n} credit transactions"), DEADLINE, || {
        let (status, v) = node.get_auth("/api/v1/wallet/transactions?limit=100");
        assert_eq!(status, 200, "{v}");
        let txs = v["transactions"].as_array()?.clone();
        (txs.len() == n).then_some(txs)
    })
}

fn balance(node: &TestNode) -> f64 {
    let (status, v) = node.get_auth("/api/v1/wallet/balance");
    assert_eq!(status, 200, "{v}");
    v["balances"]["available"].as_f64().expect("available")
}

/// `GET /api/admin/credits?verify=true`, asserting the ledger verifies.
fn verified(node: &TestNode) -> Value {
    let (status, v) = node.get_auth("/api/admin/credits?verify=true");
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["verification"]["signatures_valid"], true, "{v}");
    assert_eq!(v["verification"]["totals_match"], true, "{v}");
    v
}

fn of_type<'a>(txs: &'a [Value], t: &str) -> &'a Value {
    txs.iter()
        .find(|x| x["type"] == t)
        .unwrap_or_else(|| panic!("no {t} in {txs:?}"))
}

fn complete(node: &TestNode, max_tokens: u32) -> Value {
    let (status, v) = node.post(
        "/v1/completions",
        &json!({ "model": "smol", "prompt": "The capital of France is", "max_tokens": max_tokens,
                 "temperature": 0, "ignore_eos": true }),
    );
    assert_eq!(status, 200, "{v}");
    v
}

/// Sends a credit message from the rogue peer.
fn credit_call(rt: &tokio::runtime::Runtime, net: &Network, to: &str, message: &Value) -> Response {
    let bytes = serde_json::to_vec(message).expect("json");
    rt.block_on(net.request(to, Request::Credit(bytes)))
        .expect("credit request")
}

fn transfer(from: &Identity, to: &str, id: &str, amount: i64) -> Entry {
    let body = Body {
        kind: Kind::Transfer,
        id: id.into(),
        payer: from.node_id(),
        payee: to.into(),
        amount,
        timestamp: chrono::Utc::now().timestamp(),
        memo: Some("test".into()),
        work: None,
        rates: None,
        source: None,
    };
    Entry::new(&body, from, Party::Payer)
}

#[test]
fn a_split_request_leaves_the_same_signed_receipt_on_both_sides() {
    let lib = import_shards(3);
    // A holds layers 0–10 and asks; B holds 10–30 and samples.
    let a = TestNode::start_custom(false, &[], &[], |d| give_shards(lib.path(), d, &[0]));
    let code = network_code(&a);
    let b = TestNode::start_custom(false, &["--bootstrap", &code], &[], |d| {
        give_shards(lib.path(), d, &[1, 2])
    });
    let (a_id, b_id) = (node_id(&a), node_id(&b));
    wait_servable(&a);

    let v = complete(&a, 12);
    let prompt = v["usage"]["prompt_tokens"].as_u64().expect("prompt tokens");
    let completion = v["usage"]["completion_tokens"]
        .as_u64()
        .expect("completion");
    assert_eq!(completion, 12, "{v}");

    // Both hold the same entry, signed by both.
    let (a_txs, b_txs) = (transactions(&a, 1), transactions(&b, 1));
    let (spend, reward) = (&a_txs[0], &b_txs[0]);
    assert_eq!(
        (&spend["type"], &reward["type"]),
        (&json!("spend"), &json!("reward"))
    );
    assert_eq!(spend["id"], reward["id"]);
    assert_eq!(spend["signed"], reward["signed"], "the two copies differ");
    assert_eq!(
        (&spend["to"], &reward["from"]),
        (&json!(b_id), &json!(a_id))
    );
    let body = &reward["signed"]["body"];
    assert_eq!(
        (&body["payer"], &body["payee"]),
        (&json!(a_id), &json!(b_id))
    );
    // The work is exactly what B ran: 20 layers for every row, a token sampled
    // after the prompt and after each generated token.
    let work = &reward["details"]["work"];
    assert_eq!(
        work["layer_tokens"].as_u64(),
        Some(20 * (prompt + completion)),
        "{work}"
    );
    assert_eq!(
        work["tokens_generated"].as_u64(),
        Some(completion + 1),
        "{work}"
    );
    let amount = reward["amount"].as_f64().expect("amount");
    let expected = 20.0 * (prompt + completion) as f64 * 0.0001 + (completion + 1) as f64 * 0.01;
    assert!((amount - expected).abs() < EPS, "{amount} vs {expected}");
    assert!((spend["amount"].as_f64().expect("amount") + amount).abs() < EPS);

    // Balances moved by the same amount; both ledgers re-verify.
    assert!((balance(&a) + amount).abs() < EPS);
    assert!((balance(&b) - amount).abs() < EPS);
    assert_eq!(verified(&a)["verification"]["entries"], 1);
    assert_eq!(verified(&b)["verification"]["entries"], 1);

    // A transfer B → A is countersigned by A and shows on both sides.
    let (status, sent) = b.post(
        "/api/v1/wallet/send",
        &json!({ "to": a_id, "amount": 0.01, "memo": "thanks" }),
    );
    assert_eq!(status, 200, "{sent}");
    assert_eq!(sent["status"], "confirmed");
    let received = of_type(&transactions(&a, 2), "receive").clone();
    assert_eq!(received["id"], sent["transaction_id"]);
    assert_eq!(received["signed"], sent["signed"]);
    assert!((balance(&b) - (amount - 0.01)).abs() < EPS);
    assert!((balance(&a) - (0.01 - amount)).abs() < EPS);

    // Bad sends: more than the balance, not a node, nothing, unauthenticated.
    let (status, v) = b.post(
        "/api/v1/wallet/send",
        &json!({ "to": a_id, "amount": 1000 }),
    );
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (402, Some("INSUFFICIENT_BALANCE")),
        "{v}"
    );
    assert!(v["error"]["details"]["available"].as_f64().is_some(), "{v}");
    let (status, v) = b.post(
        "/api/v1/wallet/send",
        &json!({ "to": "nobody", "amount": 0.001 }),
    );
    assert_eq!(status, 400, "{v}");
    let (status, v) = b.post("/api/v1/wallet/send", &json!({ "to": a_id, "amount": -1 }));
    assert_eq!(status, 400, "{v}");
    assert_eq!(b.get("/api/v1/wallet/balance").0, 401);

    // The CLI drives the same: balance with verification, a refused send.
    let (ok, out, err) = cli(b.dir(), b.port, &["credits", "balance", "--verify"]);
    assert!(
        ok && out.contains("ledger verified: 2 entries"),
        "{out}{err}"
    );
    let (ok, _, err) = cli(b.dir(), b.port, &["credits", "send", "nobody", "1"]);
    assert!(!ok && err.contains("node id"), "{err}");
    let (ok, out, err) = cli(a.dir(), a.port, &["credits", "history"]);
    assert!(
        ok && out.contains("receive") && out.contains("spend"),
        "{out}{err}"
    );

    // The network leaderboard ranks both from their signed announcements.
    wait_for("A's leaderboard to show B's balance", DEADLINE, || {
        let (_, v) = a.get("/api/identity/leaderboard");
        let rows = v["leaderboard"].as_array()?;
        let top = rows.first()?;
        (rows.len() == 2
            && top["node_id"] == b_id.as_str()
            && (top["balance"].as_f64()? - (amount - 0.01)).abs() < EPS)
            .then_some(())
    });
    assert_eq!(a.get("/api/admin/credits").1["tier"], "bronze");

    // A rogue peer's tampered, forged or out-of-turn entries change nothing.
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let tmp = tempfile::tempdir().expect("tempdir");
    let (rogue, rogue_id) = rogue_peer(&rt, tmp.path());
    rt.block_on(rogue.add_seed_and_dial(&code, "test"))
        .expect("rogue joins");
    let mut tampered = transfer(&rogue_id, &a_id, "tx_tampered", 5);
    tampered.body = tampered.body.replace("\"amount\":5", "\"amount\":5000000");
    let cases = [
        (
            "tampered transfer",
            json!({ "op": "propose", "entry": tampered }),
            400,
        ),
        (
            "a transfer paid by another node",
            json!({ "op": "propose", "entry": transfer(&Identity::generate(), &a_id, "tx_x", 5) }),
            403,
        ),
        (
            "a receipt nobody offered",
            json!({ "op": "settle", "entry": transfer(&rogue_id, &a_id, "tx_y", 5) }),
            404,
        ),
        (
            "receipt for unknown work",
            json!({ "op": "ask_receipt", "session": "00" }),
            404,
        ),
        ("garbage", json!({ "op": "mint", "amount": 1 }), 400),
    ];
    for (what, message, code) in cases {
        match credit_call(&rt, &rogue, &a_id, &message) {
            Response::Error { code: got, message } => assert_eq!(got, code, "{what}: {message}"),
            other => panic!("{what}: accepted: {other:?}"),
        }
    }
    assert_eq!(transactions(&a, 2).len(), 2);
    let before = balance(&a);
    // The same transfer untampered is countersigned: the refusals were the tampering.
    match credit_call(
        &rt,
        &rogue,
        &a_id,
        &json!({ "op": "propose", "entry": transfer(&rogue_id, &a_id, "tx_ok", 5) }),
    ) {
        Response::Credit(bytes) => {
            let v: Value = serde_json::from_slice(&bytes).expect("json");
            assert_eq!(v["op"], "settled", "{v}");
            let entry: Entry = serde_json::from_value(v["entry"].clone()).expect("entry");
            entry.verify().expect("countersigned by A");
        }
        other => panic!("refused: {other:?}"),
    }
    assert!((balance(&a) - before - 0.000005).abs() < EPS);

    // An unsolicited huge transfer is refused by its amount; a flood of small
    // ones is cut off at ten a minute per peer, and only the accepted ones count.
    let huge = transfer(&rogue_id, &a_id, "tx_huge", i64::MAX);
    match credit_call(
        &rt,
        &rogue,
        &a_id,
        &json!({ "op": "propose", "entry": huge }),
    ) {
        Response::Error { code, message } => assert_eq!(code, 400, "{message}"),
        other => panic!("a huge transfer was accepted: {other:?}"),
    }
    let (mut accepted, mut limited) = (0, 0);
    for i in 0..12 {
        let entry = transfer(&rogue_id, &a_id, &format!("tx_flood{i}"), 1);
        match credit_call(
            &rt,
            &rogue,
            &a_id,
            &json!({ "op": "propose", "entry": entry }),
        ) {
            Response::Credit(_) => accepted += 1,
            Response::Error { code: 429, .. } => limited += 1,
            other => panic!("flood transfer {i}: {other:?}"),
        }
    }
    assert_eq!(
        (accepted, limited),
        (9, 3),
        "tx_ok was the first of the ten"
    );
    assert!((balance(&a) - before - 0.000014).abs() < EPS);
    verified(&a);

    // Every field computed or absent. An inference through B says what it
    // costs A, and the receipt A signs for it charges exactly that.
    let (status, v) = a.post(
        "/api/v1/inference",
        &json!({ "model": "smol", "prompt": "Water boils at", "raw": true, "max_tokens": 6,
                 "temperature": 0 }),
    );
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["cost"]["currency"], "credits", "{v}");
    let cost = v["cost"]["amount"].as_f64().expect("cost");
    assert!(cost > 0.0, "{v}");
    let txs = transactions(&a, 13);
    let spent = txs
        .iter()
        .find(|t| t["type"] == "spend")
        .and_then(|t| t["amount"].as_f64())
        .expect("the newest spend");
    assert!((spent + cost).abs() < EPS, "charged {spent}, cost {cost}");
    // B's rewards: everything it earned (both receipts), some of it today.
    let (_, m) = b.get("/api/v1/metrics");
    let earned = m["rewards"]["earned_total"].as_f64().expect("earned_total");
    assert!((earned - (amount + cost)).abs() < EPS, "{m}");
    let today = m["rewards"]["earned_today"].as_f64().expect("earned_today");
    assert!((0.0..=earned + EPS).contains(&today), "{m}");
    assert!(
        m["network"]["active_connections"].as_u64() >= Some(1),
        "{m}"
    );
    // Tiers from the leaderboard: B, the richer of two, is silver.
    let (_, peers) = a.get("/api/identity/peers");
    let b_row = peers["peers"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["node_id"] == b_id.as_str()))
        .cloned()
        .expect("B in the directory");
    assert_eq!(b_row["tier"], "silver", "{peers}");
    // No staking and no validators here: those fields are absent, not zero.
    let (_, wallet) = b.get_auth("/api/v1/wallet/balance");
    assert!(
        wallet["balances"]["available"].as_f64().is_some(),
        "{wallet}"
    );
    assert!(wallet["balances"].get("staked").is_none() && wallet.get("staking").is_none());
    let (_, net) = a.get("/api/v1/network");
    assert!(net["nodes"].get("validators").is_none(), "{net}");
    assert!(
        net["capacity"]["total_ram_gb"].as_f64() > Some(0.0),
        "{net}"
    );
    assert!(net["capacity"]["total_vram_gb"].as_f64().is_some(), "{net}");
}

#[test]
fn a_pool_member_forwards_the_owners_share() {
    let lib = import_shards(3);
    let owner = TestNode::start_without_model();
    let code = network_code(&owner);
    // The member M holds layers 10–30; the requester R (outside the pool) 0–10.
    let member = TestNode::start_custom(false, &["--bootstrap", &code], &[], |d| {
        give_shards(lib.path(), d, &[1, 2])
    });
    let requester = TestNode::start_custom(false, &["--bootstrap", &code], &[], |d| {
        give_shards(lib.path(), d, &[0])
    });
    let (owner_id, member_id) = (node_id(&owner), node_id(&member));

    let (status, v) = owner.post("/api/pool/create", &json!({ "name": "Home" }));
    assert_eq!(status, 200, "{v}");
    let pool_id = v["pool_id"].as_str().expect("pool id").to_string();
    let (status, v) = owner.call(
        reqwest::Method::PUT,
        "/api/pool/credit-split",
        &json!({ "pct": 25 }),
    );
    assert_eq!(status, 200, "{v}");
    let (_, v) = owner.post("/api/pool/generate-code", &json!({}));
    let invite = v["code"].as_str().expect("code").to_string();
    let (status, v) = member.post("/api/pool/join", &json!({ "code": invite }));
    assert_eq!(status, 200, "{v}");
    wait_for("M to learn the 25 % split", DEADLINE, || {
        (member.get("/api/pool/state").1["credit_split_pct"] == 25).then_some(())
    });

    // Pool rates: only the owner sets them; members learn them from its state.
    let rates_path = format!("/api/admin/pools/{pool_id}/rates");
    let (status, v) = owner.get(&rates_path);
    assert_eq!((status, &v["overrides"]), (200, &Value::Null), "{v}");
    let (status, v) = member.call(
        reqwest::Method::PUT,
        &rates_path,
        &json!({ "per_token": 0.0 }),
    );
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (403, Some("NOT_OWNER")),
        "{v}"
    );
    let (status, v) = owner.call(
        reqwest::Method::PUT,
        &rates_path,
        &json!({ "per_layer_token": 0.0, "per_token": 0.5 }),
    );
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["rates"]["per_token"], 0.5);
    let (status, v) = owner.call(
        reqwest::Method::PUT,
        &rates_path,
        &json!({ "per_token": -1 }),
    );
    assert_eq!(status, 400, "{v}");
    assert_eq!(owner.get("/api/admin/pools/nope/rates").0, 404);
    wait_for("M to learn the pool's rates", DEADLINE, || {
        (member.get(&rates_path).1["overrides"]["per_token"] == 0.5).then_some(())
    });

    // R (not in the pool, so default rates) asks; M serves and earns.
    wait_servable(&requester);
    complete(&requester, 8);
    let r_txs = transactions(&requester, 1);
    let earned = -r_txs[0]["amount"].as_f64().expect("amount");
    assert!(earned > 0.0);
    let work = &r_txs[0]["details"]["work"];
    let default_price = work["layer_tokens"].as_f64().expect("lt") * 0.0001
        + work["tokens_generated"].as_f64().expect("tg") * 0.01;
    assert!(
        (earned - default_price).abs() < EPS,
        "pool rates leaked to a non-member"
    );

    // M keeps 25 % and forwards 75 % to the owner with the receipt attached.
    let m_txs = transactions(&member, 2);
    let reward = of_type(&m_txs, "reward");
    let forward = of_type(&m_txs, "pool_forward");
    assert_eq!(reward["signed"], r_txs[0]["signed"]);
    let o_txs = transactions(&owner, 1);
    let income = &o_txs[0];
    assert_eq!(income["type"], "pool_income");
    assert_eq!(income["signed"], forward["signed"]);
    assert_eq!(
        income["signed"]["body"]["source"]["body"], r_txs[0]["signed"]["signed_body"],
        "the forward carries the receipt"
    );
    let micro = (earned * 1e6).round() as i64;
    let forwarded = (micro - micro * 25 / 100) as f64 / 1e6;
    assert!((income["amount"].as_f64().expect("amount") - forwarded).abs() < EPS);
    assert!((balance(&owner) - forwarded).abs() < EPS);
    assert!((balance(&member) - (earned - forwarded)).abs() < EPS);
    assert_eq!(income["from"], member_id.as_str());
    assert_eq!(forward["to"], owner_id.as_str());
    for n in [&owner, &member, &requester] {
        verified(n);
    }
}

#[test]
fn kill_9_inside_a_credit_write_leaves_a_consistent_ledger() {
    // The node pauses inside its write transaction (a test-only hook), and is
    // killed there.
    let mut a = TestNode::start_custom(
        false,
        &[],
        &[("SWARMLLM_TEST_CREDIT_WRITE_PAUSE_MS", "60000")],
        |_| {},
    );
    let a_id = node_id(&a);
    let code = network_code(&a);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let tmp = tempfile::tempdir().expect("tempdir");
    let (rogue, rogue_id) = rogue_peer(&rt, tmp.path());
    rt.block_on(rogue.add_seed_and_dial(&code, "test"))
        .expect("rogue joins");
    let message = json!({ "op": "propose", "entry": transfer(&rogue_id, &a_id, "tx_k", 7) });
    let bytes = serde_json::to_vec(&message).expect("json");
    let (net, to) = (rogue.clone(), a_id.clone());
    let pending = rt.spawn(async move { net.request(&to, Request::Credit(bytes)).await });
    wait_for("A to pause inside the credit write", DEADLINE, || {
        a.log()
            .contains("credit write paused inside its transaction")
            .then_some(())
    });
    a.kill();
    let _ = rt.block_on(pending);

    a.clear_env();
    a.restart();
    let v = verified(&a);
    assert_eq!(
        v["verification"]["entries"], 0,
        "a half-written entry survived: {v}"
    );
    assert_eq!(v["balance"], 0.0);
    assert_eq!(transactions(&a, 0).len(), 0);

    // The ledger works after the crash: the same transfer goes through once.
    rt.block_on(rogue.add_seed_and_dial(&network_code(&a), "test"))
        .expect("rogue rejoins");
    for _ in 0..2 {
        match credit_call(&rt, &rogue, &a_id, &message) {
            Response::Credit(_) => {}
            other => panic!("refused: {other:?}"),
        }
    }
    assert_eq!(transactions(&a, 1).len(), 1);
    assert!((balance(&a) - 0.000007).abs() < EPS);
    verified(&a);
}
