//! The P2P layer between separate node processes on loopback (and, with root, in
//! network namespaces for mDNS).

mod common;

use std::time::Duration;

use common::{TestNode, cli, network_code, node_id, peer, rogue_peer, wait_for};
use reqwest::Method;
use serde_json::{Value, json};
use swarmllm_node::identity::Identity;
use swarmllm_node::net::announce::{Announcement, HardwareSummary, Load};
use swarmllm_node::net::frame::{Request, Response};

const DEADLINE: Duration = Duration::from_secs(45);

/// Waits until `observer` lists `target` with `connected` as given.
fn wait_connected(observer: &TestNode, target: &str, connected: bool) {
    observer.wait_logged(
        &format!(
            "{target:.8} to be {} at {}",
            if connected { "online" } else { "offline" },
            observer.port
        ),
        DEADLINE,
        || {
            let (_, peers) = observer.get("/api/admin/peers");
            let p = peer(&peers, target).ok_or_else(|| format!("no such peer in {peers}"))?;
            if p["connected"] == connected && p["is_active"] == connected {
                Ok(())
            } else {
                Err(p.to_string())
            }
        },
    );
}

#[test]
fn three_nodes_join_by_code_see_each_other_and_recover_from_a_kill() {
    let a = TestNode::start_without_model();
    let code = network_code(&a);
    let b = TestNode::start_full(false, &["--bootstrap", &code]);
    let mut c = TestNode::start_full(false, &["--bootstrap", &code]);
    let ids = [node_id(&a), node_id(&b), node_id(&c)];
    let nodes = [&a, &b, &c];

    // Everyone sees everyone, though B and C only had A's code.
    for (i, observer) in nodes.iter().enumerate() {
        for (j, id) in ids.iter().enumerate() {
            if i != j {
                wait_connected(observer, id, true);
            }
        }
    }
    // Latency comes from ping; the directory says how each peer was found.
    wait_for("latency measured", DEADLINE, || {
        let (_, peers) = b.get("/api/admin/peers");
        peer(&peers, &ids[0])?["latency_ms"]
            .as_f64()
            .filter(|l| *l > 0.0)
    });
    let (_, peers) = b.get("/api/admin/peers");
    assert_eq!(
        peer(&peers, &ids[0]).expect("a")["discovered_via"],
        "bootstrap"
    );
    // Gossip exchanges are logged (pulls of announcements and peer lists).
    let log = peers["sync_log"].as_array().expect("sync log");
    assert!(
        log.iter()
            .any(|e| e["direction"] == "pull" && e["success"] == true),
        "{peers}"
    );

    // A nickname set on C shows up in A's identity directory.
    let (s, _) = c.call(
        Method::PUT,
        "/api/identity/nickname",
        &json!({ "nickname": "attic-server" }),
    );
    assert_eq!(s, 200);
    wait_for("C's nickname at A", DEADLINE, || {
        let (_, peers) = a.get("/api/identity/peers");
        (peer(&peers, &ids[2])?["nickname"] == "attic-server").then_some(())
    });

    // Network views count all three.
    let (_, map) = a.get("/api/admin/network-map");
    let total: u64 = map["regions"]
        .as_object()
        .expect("regions")
        .values()
        .map(|r| r["total"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(total, 3, "{map}");
    let (_, wk) = a.get("/.well-known/swarmllm?limit=1");
    assert_eq!(wk["swarm"]["totalNodes"], 3, "{wk}");
    assert_eq!(wk["nodes"].as_array().map(Vec::len), Some(1));
    let (_, v1) = b.get("/api/v1/peers");
    assert_eq!(v1["total"], 2, "{v1}");
    let (_, net) = b.get("/api/v1/network");
    assert_eq!(net["nodes"]["total"], 3, "{net}");
    // A discovery round asks every connected peer (and needs the key).
    let (s, d) = b.post("/api/v1/network/discover", &json!({}));
    assert_eq!((s, d["peers_queried"].as_u64()), (200, Some(2)), "{d}");
    let r = b
        .http()
        .post(b.url("/api/v1/network/discover"))
        .send()
        .expect("send");
    assert_eq!(r.status().as_u16(), 401);

    // kill -9 C: it goes offline for A and B...
    c.kill();
    wait_connected(&a, &ids[2], false);
    wait_connected(&b, &ids[2], false);
    // ...and comes back when restarted without any bootstrap: its saved peers and
    // the others' redials reconnect it.
    c.restart_plain();
    wait_connected(&a, &ids[2], true);
    wait_connected(&b, &ids[2], true);
    wait_connected(&c, &ids[0], true);
}

#[test]
fn malformed_or_tampered_network_codes_get_400() {
    let a = TestNode::start_without_model();
    let code = network_code(&a);
    let mut chars: Vec<char> = code.chars().collect();
    let i = chars.len() / 2;
    chars[i] = if chars[i] == 'x' { 'y' } else { 'x' };
    let tampered: String = chars.into_iter().collect();
    for body in [
        json!({ "code": "swarm://not-base64!!" }),
        json!({ "code": tampered }),
        json!({ "code": "hello" }),
        json!({ "address": "/ip4/999.1.1.1/tcp/1" }),
    ] {
        let (s, v) = a.post("/api/admin/join-network", &body);
        assert_eq!(s, 400, "{body} → {v}");
        assert_eq!(v["error"]["code"], "INVALID_CODE", "{v}");
    }
    let (s, v) = a.post("/api/admin/join-network", &json!({}));
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (400, Some("INVALID_FIELD"))
    );
    // Writes need the key.
    let r = a
        .http()
        .post(a.url("/api/admin/join-network"))
        .json(&json!({ "code": code }))
        .send()
        .expect("send");
    assert_eq!(r.status().as_u16(), 401);
    // The CLI says so in one line and fails.
    let (ok, _, err) = cli(a.dir(), a.port, &["network", "join", &tampered]);
    assert!(!ok);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("400"), "{err}");
    // A code of the node itself is refused, not dialled in a loop.
    let (s, _) = a.post("/api/admin/join-network", &json!({ "code": code }));
    assert_eq!(s, 502);
    // Still serving.
    assert_eq!(a.get("/health/live").0, 200);
}

#[test]
fn garbage_frames_and_forged_announcements_are_rejected_and_the_node_keeps_serving() {
    // Every case must reach the node: no ban however low the rogue's trust falls.
    let a = TestNode::start_custom(false, &[], &[("SWARMLLM_PEER_BAN_TRUST", "0")], |_| {});
    let a_id = node_id(&a);
    let code = network_code(&a);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let tmp = tempfile::tempdir().expect("tempdir");
    let (rogue, rogue_identity) = rogue_peer(&rt, tmp.path());
    let joined = rt
        .block_on(rogue.add_seed_and_dial(&code, "test"))
        .expect("rogue joins A");
    assert_eq!(joined, a_id);

    // A well-formed request works.
    let echo = rt
        .block_on(rogue.request(&a_id, Request::Echo(vec![7; 1000])))
        .expect("echo");
    assert_eq!(echo, Response::Echo(vec![7; 1000]));

    // Malformed frames get an error frame back, not a crash.
    let bad_frames: Vec<Vec<u8>> = vec![
        vec![0xff, 0xff, 0xff, 0xff], // length over the cap
        vec![0, 0, 0, 3, 9, 1, 0],    // unknown wire version
        vec![0, 0, 0, 2, 1, 0x66],    // unknown kind
    ];
    for frame in &bad_frames {
        let r = rt.block_on(rogue.request(&a_id, Request::Raw(frame.clone())));
        match r {
            Ok(Response::Error { code, message }) => {
                assert_eq!(code, 400, "{message}");
            }
            other => panic!("{frame:?} → {other:?}"),
        }
    }
    // ...and they count against the sender.
    let rogue_id = rogue_identity.node_id();
    wait_for("bad frames counted at A", DEADLINE, || {
        let (_, peers) = a.get("/api/admin/peers");
        let p = peer(&peers, &rogue_id)?;
        (p["bad_frames"].as_i64()? >= 3 && p["trust_score"].as_i64()? < 50).then_some(())
    });

    // A forged announcement: names the rogue as its node but is signed by another key.
    let forged = Announcement {
        node_id: rogue_id.clone(),
        nickname: Some("forged".into()),
        version: "0".into(),
        capabilities: vec![],
        hardware: HardwareSummary::default(),
        region: "EU".into(),
        models: vec![],
        load: Load::default(),
        addrs: vec![],
        timestamp: chrono::Utc::now().timestamp(),
        seq: 1,
    }
    .sign(&Identity::generate());
    wait_for("A to reject the forged announcement", DEADLINE, || {
        let _ = rt.block_on(rogue.publish_raw(forged.clone()));
        let (_, stats) = a.get("/api/admin/stats");
        (stats["p2p"]["counters"]["announcements_rejected"].as_u64()? >= 1).then_some(())
    });
    let (_, ids) = a.get("/api/identity/peers");
    assert_ne!(
        peer(&ids, &rogue_id).and_then(|p| p["nickname"].as_str()),
        Some("forged")
    );

    // Signed by the rogue itself, but claiming demand for more models than an
    // announcement may carry: refused whole, and none of it counts.
    let flood = Announcement {
        node_id: rogue_id.clone(),
        nickname: Some("flood".into()),
        version: "0".into(),
        capabilities: vec![],
        hardware: HardwareSummary::default(),
        region: "EU".into(),
        models: vec![],
        load: Load {
            demand: (0..=swarmllm_node::swarm::demand::MAX_DEMAND_ENTRIES)
                .map(|i| swarmllm_node::swarm::demand::ModelDemand {
                    model_id: format!("m{i}"),
                    requests_per_minute: 60.0,
                    requesters: 1000,
                    requested: true,
                })
                .collect(),
            ..Load::default()
        },
        addrs: vec![],
        timestamp: chrono::Utc::now().timestamp(),
        seq: 2,
    }
    .sign(&rogue_identity);
    wait_for("A to reject the demand flood", DEADLINE, || {
        let _ = rt.block_on(rogue.publish_raw(flood.clone()));
        let (_, stats) = a.get("/api/admin/stats");
        (stats["p2p"]["counters"]["announcements_rejected"].as_u64()? >= 2).then_some(())
    });
    let (_, map) = a.get("/api/admin/network-map");
    assert!(!map.to_string().contains("\"m0\""), "{map}");

    // Raw TCP garbage at the P2P port does not hurt either.
    {
        use std::io::Write;
        let mut s = std::net::TcpStream::connect(("127.0.0.1", a.p2p_port)).expect("tcp");
        let _ = s.write_all(&[0x13; 4096]);
    }
    assert_eq!(a.get("/health/live").0, 200);
    let (_, peers) = a.get("/api/admin/peers");
    assert!(peers["total"].as_u64().is_some());
}

/// mDNS finds peers on a LAN with no code at all. Runs two nodes in network
/// namespaces joined by a veth pair; needs root and `ip netns`.
#[test]
fn mdns_discovers_peers_in_network_namespaces() {
    let Some(lan) = netns::Lan::create() else {
        eprintln!(
            "SKIPPED mdns_discovers_peers_in_network_namespaces: needs root and `ip netns` (iproute2)"
        );
        return;
    };
    let dirs = [
        tempfile::tempdir().expect("tempdir"),
        tempfile::tempdir().expect("tempdir"),
    ];
    let mut children = Vec::new();
    for (i, ns) in lan.names.iter().enumerate() {
        let log = std::fs::File::create(dirs[i].path().join("node.log")).expect("log");
        children.push(
            std::process::Command::new("ip")
                .args(["netns", "exec", ns])
                .arg(common::bin())
                .arg("--data-dir")
                .arg(dirs[i].path())
                .args(["--api-port", "18800", "serve", "--p2p-port", "18801"])
                .env("SWARMLLM_SECRET_STORE", "file")
                .env("SWARMLLM_MDNS", "true")
                .env("SWARMLLM_P2P_HOST", "0.0.0.0")
                .stdout(std::process::Stdio::null())
                .stderr(log)
                .spawn()
                .expect("spawn node in namespace"),
        );
    }
    let _guard = netns::Kill(children);
    // Both nodes get connected with no code at all; the one whose mDNS discovery won
    // the race dialled, so at least one side records the peer as found by mDNS (the
    // other may have seen the connection arrive first).
    let mut found_via = Vec::new();
    for (i, ns) in lan.names.iter().enumerate() {
        let via = wait_for(
            &format!("node in {ns} to find its LAN peer over mDNS"),
            Duration::from_secs(60),
            || {
                let out = std::process::Command::new("ip")
                    .args(["netns", "exec", ns])
                    .arg(common::bin())
                    .arg("--data-dir")
                    .arg(dirs[i].path())
                    .args(["--api-port", "18800", "peers", "--json"])
                    .env("SWARMLLM_SECRET_STORE", "file")
                    .output()
                    .ok()?;
                let peers: Value = serde_json::from_slice(&out.stdout).ok()?;
                let p = peers["peers"].as_array()?.first()?.clone();
                (p["connected"] == true)
                    .then(|| p["discovered_via"].as_str().unwrap_or("").to_string())
            },
        );
        found_via.push(via);
    }
    assert!(found_via.iter().any(|v| v == "mdns"), "{found_via:?}");
}

mod netns {
    use std::process::{Child, Command};

    /// Two namespaces joined by a veth pair on a private /24; removed on drop.
    pub(crate) struct Lan {
        pub(crate) names: [String; 2],
    }

    fn ip(args: &[&str]) -> bool {
        Command::new("ip")
            .args(args)
            .status()
            .is_ok_and(|s| s.success())
    }

    impl Lan {
        pub(crate) fn create() -> Option<Lan> {
            let root = Command::new("id").arg("-u").output().ok()?;
            if String::from_utf8_lossy(&root.stdout).trim() != "0" {
                return None;
            }
            let tag = std::process::id() % 100_000;
            let names = [format!("swl{tag}a"), format!("swl{tag}b")];
            let (va, vb) = (format!("swv{tag}a"), format!("swv{tag}b"));
            if !ip(&["netns", "add", &names[0]]) {
                return None;
            }
            let lan = Lan { names };
            let [a, b] = &lan.names;
            let ok = ip(&["netns", "add", b])
                && ip(&["link", "add", &va, "type", "veth", "peer", "name", &vb])
                && ip(&["link", "set", &va, "netns", a])
                && ip(&["link", "set", &vb, "netns", b])
                && ip(&["-n", a, "addr", "add", "10.231.77.1/24", "dev", &va])
                && ip(&["-n", b, "addr", "add", "10.231.77.2/24", "dev", &vb])
                && ip(&["-n", a, "link", "set", &va, "up", "multicast", "on"])
                && ip(&["-n", b, "link", "set", &vb, "up", "multicast", "on"])
                && ip(&["-n", a, "link", "set", "lo", "up"])
                && ip(&["-n", b, "link", "set", "lo", "up"])
                && ip(&["-n", a, "route", "add", "224.0.0.0/4", "dev", &va])
                && ip(&["-n", b, "route", "add", "224.0.0.0/4", "dev", &vb]);
            ok.then_some(lan)
        }
    }

    impl Drop for Lan {
        fn drop(&mut self) {
            for n in &self.names {
                let _ = Command::new("ip").args(["netns", "del", n]).status();
            }
        }
    }

    pub(crate) struct Kill(pub(crate) Vec<Child>);

    impl Drop for Kill {
        fn drop(&mut self) {
            for c in &mut self.0 {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

#[test]
fn websocket_pushes_stats_and_peer_changes() {
    use futures::StreamExt;
    let a = TestNode::start_without_model();
    let code = network_code(&a);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let url = format!("ws://127.0.0.1:{}/api/admin/ws", a.port);
    let (mut ws, _) = rt
        .block_on(tokio_tungstenite::connect_async(&url))
        .expect("websocket connects");
    let next = |ws: &mut tokio_tungstenite::WebSocketStream<_>| -> Value {
        let msg = rt
            .block_on(async { tokio::time::timeout(DEADLINE, ws.next()).await })
            .expect("a message within the deadline")
            .expect("stream open")
            .expect("message");
        serde_json::from_str(msg.to_text().expect("text")).expect("json")
    };
    let first = next(&mut ws);
    assert_eq!(first["type"], "peer_list");
    assert_eq!(first["data"]["peers"], json!([]));
    let stats = next(&mut ws);
    assert_eq!(stats["type"], "stats_update");
    assert_eq!(stats["data"]["peer_count"], 0);
    // A peer joins: a new peer_list arrives.
    let b = TestNode::start_full(false, &["--bootstrap", &code]);
    let b_id = node_id(&b);
    loop {
        let m = next(&mut ws);
        if m["type"] == "peer_list" {
            assert_eq!(m["data"]["peers"][0]["node_id"], json!(b_id));
            break;
        }
    }
    // A page from a foreign origin is refused.
    let mut req = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
        url.as_str(),
    )
    .expect("request");
    req.headers_mut()
        .insert("origin", "https://evil.example".parse().expect("header"));
    assert!(rt.block_on(tokio_tungstenite::connect_async(req)).is_err());
}
