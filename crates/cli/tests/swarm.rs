//! The self-organising swarm between five real node processes on loopback: a
//! 3-shard model imported on one node spreads to the auto-managing others once
//! demand from two requesters verifies it (one requester alone never does), no
//! node passes its disk budget, requests from several requesters spread over
//! the replicas, a locked shard survives pruning while an unlocked one goes
//! (never a last copy), and when the original holder is killed requests still
//! get the whole model's greedy text. A node outside its contribution hours
//! refuses peers and still serves itself.

mod common;

use std::time::Duration;

use common::{TestNode, cli, give_shards, import_shards, network_code, wait_for};
use reqwest::Method;
use serde_json::{Value, json};

const DEADLINE: Duration = Duration::from_secs(150);
const BUDGET_MB: u64 = 120;
const PROMPT: &str = "Name three colours of the rainbow.";

fn chat(node: &TestNode, prompt: &str) -> (u16, Value) {
    node.post(
        "/v1/chat/completions",
        &json!({
            "model": "smol",
            "messages": [{ "role": "user", "content": prompt }],
            "max_tokens": 24,
            "temperature": 0,
        }),
    )
}

fn content(v: &Value) -> String {
    v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_else(|| panic!("no content in {v}"))
        .to_string()
}

fn smol(node: &TestNode) -> Value {
    node.get("/api/admin/models/smol/status").1
}

fn rounds(node: &TestNode) -> u64 {
    node.get("/api/admin/stats").1["auto_manage"]["rounds"]
        .as_u64()
        .unwrap_or(0)
}

/// Shards held on `node`'s disk.
fn held(node: &TestNode) -> Vec<u64> {
    let (_, s) = node.get("/api/admin/shard-storage");
    s["models"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|m| m["model_id"] == "smol")
        .flat_map(|m| m["shards_on_disk"].as_array().cloned().unwrap_or_default())
        .filter_map(|v| v.as_u64())
        .collect()
}

/// Waits until every shard of smol has at least its replication target of
/// holders, as `observer` sees it; returns the status.
fn wait_replicated(observer: &TestNode) -> Value {
    observer.wait_logged("every shard at its replication target", DEADLINE, || {
        let v = smol(observer);
        let target = v["replication_target"].as_u64().unwrap_or(0);
        let shards = v["shards"].as_array().cloned().unwrap_or_default();
        let ok = target >= 2
            && shards.len() == 3
            && shards
                .iter()
                .all(|s| s["holders"].as_u64().unwrap_or(0) >= target);
        if ok { Ok(v) } else { Err(v.to_string()) }
    })
}

/// Waits until `node` has run at least `n` more auto-manage rounds.
fn wait_rounds(node: &TestNode, n: u64) {
    let start = rounds(node);
    wait_for("auto-manage rounds", DEADLINE, || {
        (rounds(node) >= start + n).then_some(())
    });
}

fn steps_served(node: &TestNode) -> u64 {
    node.get("/api/v1/layers").1["steps_served"]
        .as_u64()
        .expect("steps_served")
}

/// What one dashboard saw.
#[derive(Debug, Default)]
struct Seen {
    acquired: bool,
    models_changed: bool,
    registry: bool,
}

/// Reads `ws` until it has seen a fetch, a models_changed and the shard
/// registry, or the deadline passes.
fn watch(
    rt: &tokio::runtime::Runtime,
    ws: &mut tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
) -> Seen {
    use futures::StreamExt;
    let end = std::time::Instant::now() + DEADLINE;
    let mut seen = Seen::default();
    while !(seen.acquired && seen.models_changed && seen.registry) {
        let left = end.saturating_duration_since(std::time::Instant::now());
        let Ok(Some(Ok(msg))) = rt.block_on(async { tokio::time::timeout(left, ws.next()).await })
        else {
            break;
        };
        let Ok(m) = serde_json::from_str::<Value>(msg.to_text().unwrap_or("")) else {
            continue;
        };
        match m["type"].as_str() {
            Some("activity_event") => {
                assert!(
                    m["data"]["timestamp"].is_string() && m["data"]["toast_level"].is_string(),
                    "{m}"
                );
                seen.acquired |= m["data"]["kind"] == "acquired" && m["data"]["model_id"] == "smol";
            }
            Some("models_changed") => seen.models_changed = true,
            Some("stats_update") => {
                seen.registry |= m["data"]["shard_registry"]
                    .as_array()
                    .is_some_and(|r| r.iter().any(|e| e["model_id"] == "smol"));
            }
            _ => {}
        }
    }
    seen
}

/// Starts A, holding all of smol (its user's choice: outside auto-manage), and
/// `n` auto-managing nodes with a budget of [`BUDGET_MB`] that join through it.
fn swarm_of(n: usize) -> (tempfile::TempDir, TestNode, Vec<TestNode>) {
    let lib = import_shards(3);
    let fast = [("SWARMLLM_ANNOUNCE_INTERVAL_SECS", "1")];
    let a = TestNode::start_custom(false, &[], &fast, |d| {
        give_shards(lib.path(), d, &[0, 1, 2])
    });
    let code = network_code(&a);
    let budget = BUDGET_MB.to_string();
    let auto = [
        ("SWARMLLM_ANNOUNCE_INTERVAL_SECS", "1"),
        ("SWARMLLM_AUTO_MANAGE", "true"),
        ("SWARMLLM_AUTO_MANAGE_INTERVAL_SECS", "1"),
        ("SWARMLLM_DISK_BUDGET_MB", budget.as_str()),
        ("SWARMLLM_DEMAND_WINDOW_SECS", "600"),
        ("SWARMLLM_LOG_LEVEL", "info,swarmllm_node::pipeline=debug"),
    ];
    let others = (0..n)
        .map(|_| TestNode::start_custom(false, &["--bootstrap", &code], &auto, |_| {}))
        .collect();
    (lib, a, others)
}

/// Asks `node` until it answers 200; the answer's text.
fn answer(node: &TestNode, what: &str) -> String {
    node.wait_logged(what, DEADLINE, || {
        let (s, v) = chat(node, PROMPT);
        if s == 200 {
            Ok(content(&v))
        } else {
            Err(format!("{s} {v}"))
        }
    })
}

#[test]
fn five_nodes_spread_a_demanded_model_within_budgets_and_survive_its_holder() {
    let (_lib, mut a, others) = swarm_of(4);
    let (b, c) = (&others[0], &others[1]);
    // Dashboards of the four: auto-manage's actions arrive as events.
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let mut sockets: Vec<_> = others
        .iter()
        .map(|n| {
            let url = format!("ws://127.0.0.1:{}/api/admin/ws", n.port);
            rt.block_on(tokio_tungstenite::connect_async(&url))
                .expect("websocket connects")
                .0
        })
        .collect();

    // Nobody asked yet: the model is only discovered, and the others know it.
    for n in &others {
        let v = n.wait_logged("smol known", DEADLINE, || {
            let v = smol(n);
            if v["holders"].as_u64() == Some(1) {
                Ok(v)
            } else {
                Err(v.to_string())
            }
        });
        assert_eq!(v["trust_level"], "Discovered", "{v}");
    }
    assert_eq!(smol(&a)["trust_level"], "Pinned");

    // One requester alone: demand is seen everywhere, but never verified. (Its
    // answers come from A, which runs every layer: the whole model's text.)
    let (s, v) = chat(b, PROMPT);
    assert_eq!(s, 200, "{v}");
    let reference = content(&v);
    for _ in 0..2 {
        let (s, v) = chat(b, PROMPT);
        assert_eq!(s, 200, "{v}");
        assert_eq!(content(&v), reference);
    }
    for n in &others[1..] {
        n.wait_logged("B's demand announced", DEADLINE, || {
            let v = smol(n);
            if v["demand"]["requesters"] == 1 {
                Ok(())
            } else {
                Err(v.to_string())
            }
        });
    }
    for n in &others {
        wait_rounds(n, 3);
        let v = smol(n);
        assert_eq!(
            v["trust_level"], "Discovered",
            "one requester promoted it: {v}"
        );
        assert!(held(n).is_empty(), "fetched on one requester's demand");
    }

    // A second requester verifies the demand: every shard reaches its target.
    let (s, v) = chat(c, PROMPT);
    assert_eq!(s, 200, "{v}");
    assert_eq!(content(&v), reference);
    let status = wait_replicated(&a);
    assert_eq!(smol(b)["trust_level"], "DemandVerified");
    // Each shard is held by A and at least one of the others; no budget passed.
    let mut fetched = 0;
    for n in &others {
        let (_, storage) = n.get("/api/admin/shard-storage");
        assert!(
            storage["disk_used_mb"].as_f64().unwrap_or(f64::MAX) <= BUDGET_MB as f64,
            "over budget: {storage}"
        );
        assert_eq!(storage["over_budget"], false);
        fetched += held(n).len();
    }
    assert!(fetched >= 3, "{status}");
    // Auto-manage never puts two neighbouring shards on one node (its ranges
    // stay shard-aligned, so any mix of holders chains).
    for n in &others {
        let h = held(n);
        assert!(
            !h.windows(2).any(|w| w[1] == w[0] + 1),
            "neighbours on one node: {h:?}"
        );
    }
    // A node that fetched told its dashboard: an activity_event per fetch, a
    // models_changed, and the shard in the stats' registry.
    let i = others
        .iter()
        .position(|n| !held(n).is_empty())
        .expect("a node that fetched");
    let seen = watch(&rt, &mut sockets[i]);
    assert!(
        seen.acquired && seen.models_changed && seen.registry,
        "{seen:?}"
    );

    // Under load from several requesters, requests spread over the replicas:
    // some chains go through A (all 30 layers), some through the new holders.
    // The planner draws a random share of each holder's cost and weighs the
    // measured compute, which five nodes on two cores make noisy, so one round
    // of six requests can all pick one side by chance: up to four rounds.
    let before: Vec<u64> = others.iter().map(steps_served).collect();
    let a_before = steps_served(&a);
    let (mut a_gain, mut others_gain) = (0, 0);
    for _round in 0..4 {
        std::thread::scope(|scope| {
            let answers: Vec<_> = others[..3]
                .iter()
                .flat_map(|n| [n, n])
                .map(|n| scope.spawn(move || chat(n, PROMPT)))
                .collect();
            for answer in answers {
                let (s, v) = answer.join().expect("request thread");
                assert_eq!(s, 200, "{v}");
                assert_eq!(content(&v), reference);
            }
        });
        a_gain = steps_served(&a) - a_before;
        others_gain = others
            .iter()
            .zip(&before)
            .map(|(n, b)| steps_served(n) - b)
            .sum::<u64>();
        if a_gain > 0 && others_gain > 0 {
            break;
        }
    }
    assert!(
        a_gain > 0 && others_gain > 0,
        "requests did not spread: A ran {a_gain} steps, the replicas {others_gain}; B's log:\n{}",
        b.log()
            .lines()
            .filter(|l| l.contains("route"))
            .collect::<Vec<_>>()
            .join("\n")
    );

    // The original holder dies: requests still get the whole model's text.
    a.kill();
    let text = answer(b, "an answer without A");
    assert_eq!(text, reference);
}

#[test]
fn outside_its_hours_a_node_refuses_peers_and_still_serves_itself() {
    let lib = import_shards(3);
    let fast = [("SWARMLLM_ANNOUNCE_INTERVAL_SECS", "1")];
    let a = TestNode::start_custom(false, &[], &fast, |d| {
        give_shards(lib.path(), d, &[0, 1, 2])
    });
    let code = network_code(&a);
    let b = TestNode::start_custom(false, &["--bootstrap", &code], &fast, |_| {});
    let reference = answer(&b, "B served through A");

    // Bad schedules are refused with the reason.
    for bad in [
        json!({ "enabled": true, "weekdays": { "caturday": [] } }),
        json!({ "enabled": true, "weekdays": { "mon": [{ "start": 18, "end": 9 }] } }),
        json!({ "enabled": true, "hours": 3 }),
    ] {
        let (s, v) = a.call(Method::PUT, "/api/admin/schedule", &bad);
        assert_eq!(s, 400, "{bad} → {v}");
        assert!(v["error"]["message"].is_string(), "{v}");
    }
    assert_eq!(
        a.http()
            .put(a.url("/api/admin/schedule"))
            .json(&json!({ "enabled": false }))
            .send()
            .expect("send")
            .status()
            .as_u16(),
        401,
        "a write without the key"
    );

    // Enabled with no hours at all: A never contributes now.
    let (s, v) = a.call(
        Method::PUT,
        "/api/admin/schedule",
        &json!({ "enabled": true, "weekdays": {} }),
    );
    assert_eq!((s, &v["contributing_now"]), (200, &json!(false)), "{v}");
    assert_eq!(a.get("/api/admin/stats").1["contributing"], false);
    // Peers get no steps from it (whether they still try it or already route
    // around it)...
    let served = a.get("/api/v1/layers").1["steps_served"]
        .as_u64()
        .unwrap_or(0);
    b.wait_logged("B refused", DEADLINE, || {
        let (s, v) = chat(&b, PROMPT);
        if s == 503 {
            Ok(())
        } else {
            Err(format!("{s} {v}"))
        }
    });
    assert_eq!(
        a.get("/api/v1/layers").1["steps_served"]
            .as_u64()
            .unwrap_or(0),
        served,
        "A ran steps for a peer outside its hours"
    );
    // ...while its own requests are served as ever.
    let (s, v) = chat(&a, PROMPT);
    assert_eq!(s, 200, "{v}");
    assert_eq!(content(&v), reference);

    // Back within its hours (every hour of every day), peers are served again.
    let all_day: serde_json::Map<String, Value> = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
        .iter()
        .map(|d| (d.to_string(), json!([{ "start": 0, "end": 24 }])))
        .collect();
    let (s, v) = a.call(
        Method::PUT,
        "/api/admin/schedule",
        &json!({ "enabled": true, "weekdays": all_day }),
    );
    assert_eq!((s, &v["contributing_now"]), (200, &json!(true)), "{v}");
    let text = answer(&b, "B served again");
    assert_eq!(text, reference);

    // The CLI sets and shows the schedule, and names a bad one.
    let (ok, out, err) = cli(
        b.dir(),
        b.port,
        &["swarm", "schedule", "--hours", "funday=1-2"],
    );
    assert!(!ok && err.contains("unknown day"), "{out}{err}");
    let (ok, out, err) = cli(
        b.dir(),
        b.port,
        &["swarm", "schedule", "--hours", "all=0-24"],
    );
    assert!(
        ok && out.contains("sun: 0-24") && out.contains("contributing"),
        "{out}{err}"
    );
    let (ok, out, err) = cli(b.dir(), b.port, &["swarm", "schedule", "--off"]);
    assert!(
        ok && out.contains("contributes at every hour"),
        "{out}{err}"
    );
    assert_eq!(b.get("/api/admin/schedule").1["enabled"], false);
}

#[test]
fn a_locked_shard_survives_pruning_and_an_unlocked_one_goes() {
    let (_lib, a, others) = swarm_of(2);
    for n in &others {
        answer(n, "B and C served");
    }
    wait_replicated(&a);
    // A's user manages its disk (it never prunes on its own), so the others'
    // copies are theirs to prune — but never A's last one.
    let (y, j) = others
        .iter()
        .find_map(|n| {
            let v = smol(n);
            let j = v["shards"]
                .as_array()?
                .iter()
                .find(|s| s["held"] == true && s["keeper"] == false)?["index"]
                .as_u64()?;
            Some((n, j))
        })
        .expect("a held shard that is not its holder's to keep");
    // Locked, it survives however far over budget its node goes.
    let (s, v) = y.call(
        Method::PUT,
        &format!("/api/admin/models/smol/shards/{j}/lock"),
        &json!({ "locked": true }),
    );
    assert_eq!(s, 200, "{v}");
    let (s, v) = y.call(
        Method::PUT,
        "/api/admin/config",
        &json!({ "disk_budget_mb": 1 }),
    );
    assert_eq!(s, 200, "{v}");
    wait_rounds(y, 3);
    assert!(held(y).contains(&j), "a locked shard was pruned");
    assert_eq!(smol(y)["shards"][j as usize]["locked"], true);
    // Unlocked (with the CLI), it goes, and the history says why.
    let (ok, out, err) = cli(
        y.dir(),
        y.port,
        &["swarm", "lock", "smol", &j.to_string(), "--unlock"],
    );
    assert!(ok && out.contains("unlocked"), "{out}{err}");
    let history = y.wait_logged("shard j pruned on Y", DEADLINE, || {
        let (_, h) = y.get("/api/admin/prune-history");
        let hit = h["events"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|e| e["model_id"] == "smol" && e["shard_index"] == j);
        if hit { Ok(h) } else { Err(h.to_string()) }
    });
    assert!(
        history["events"]
            .as_array()
            .into_iter()
            .flatten()
            .all(|e| e["reason"] == "over the disk budget"),
        "{history}"
    );
    assert!(!held(y).contains(&j));
    let (ok, out, err) = cli(y.dir(), y.port, &["swarm", "prune-history"]);
    assert!(ok && out.contains("over the disk budget"), "{out}{err}");
    let (ok, out, err) = cli(y.dir(), y.port, &["swarm", "map"]);
    assert!(
        ok && out.contains("smol:") && out.contains("(this node)"),
        "{out}{err}"
    );
    let (ok, out, err) = cli(y.dir(), y.port, &["swarm", "auto-manage", "smol"]);
    assert!(
        ok && out.contains("auto-manage on") && out.contains("DemandVerified"),
        "{out}{err}"
    );
    // A, which nothing prunes, still holds every shard.
    assert_eq!(smol(&a)["held_shards"], json!([0, 1, 2]));
}
