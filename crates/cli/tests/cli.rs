//! The `swarmllm` CLI as a user runs it: real processes, real node.

mod common;

use common::{TestNode, cli, free_port};

#[test]
fn client_commands_fail_with_one_clear_line_when_no_node_runs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    for args in [&["status"][..], &["models", "list"], &["chat", "-p", "hi"]] {
        let (ok, out, err) = cli(dir.path(), port, args);
        assert!(!ok, "{args:?} must fail");
        assert!(out.is_empty(), "{args:?} printed {out}");
        let lines: Vec<&str> = err.lines().collect();
        assert_eq!(lines.len(), 1, "{args:?}: {err}");
        assert!(
            lines[0].starts_with("error: no node is running at"),
            "{err}"
        );
    }
    // Without a node there is no API key yet either.
    let (ok, _, err) = cli(dir.path(), port, &["api-key"]);
    assert!(!ok);
    assert!(err.starts_with("error: no API key yet"), "{err}");
}

#[test]
fn config_get_and_set_work_offline_and_reject_bad_input() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let (ok, out, err) = cli(dir.path(), port, &["config", "get", "context_size"]);
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "4096");
    let (ok, out, err) = cli(
        dir.path(),
        port,
        &["config", "set", "rate_limit_per_minute", "42"],
    );
    assert!(ok, "{err}");
    assert!(out.contains("written to"), "{out}");
    let (_, out, _) = cli(
        dir.path(),
        port,
        &["config", "get", "rate_limit_per_minute"],
    );
    assert_eq!(out.trim(), "42");
    // Bad key, bad value: one error line, non-zero exit, nothing written.
    let (ok, _, err) = cli(dir.path(), port, &["config", "set", "no_such_key", "1"]);
    assert!(!ok);
    assert!(
        err.contains("no_such_key") && err.lines().count() == 1,
        "{err}"
    );
    let (ok, _, err) = cli(dir.path(), port, &["config", "set", "api_port", "99999"]);
    assert!(!ok);
    assert!(err.contains("api_port"), "{err}");
    let toml = std::fs::read_to_string(dir.path().join("config.toml")).expect("config.toml");
    assert!(
        !toml.contains("no_such_key") && !toml.contains("99999"),
        "{toml}"
    );
    // The SWARMLLM_<FIELD> variables override the file.
    let out = std::process::Command::new(common::bin())
        .args(["--data-dir"])
        .arg(dir.path())
        .args(["config", "get", "rate_limit_per_minute"])
        .env("SWARMLLM_RATE_LIMIT_PER_MINUTE", "7")
        .output()
        .expect("run");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "7");
}

#[test]
fn cli_drives_a_running_node() {
    let node = TestNode::start();
    let dir = node.dir();
    let (ok, out, err) = cli(dir, node.port, &["status"]);
    assert!(ok, "{err}");
    assert!(out.contains("smollm2-135m-instruct.q4_1"), "{out}");
    let (ok, out, _) = cli(dir, node.port, &["models", "list"]);
    assert!(ok);
    assert!(
        out.contains("smollm2-135m-instruct.q4_1") && out.contains("llama"),
        "{out}"
    );
    let (ok, out, err) = cli(
        dir,
        node.port,
        &[
            "chat",
            "-p",
            "What is 2+2?",
            "--temperature",
            "0",
            "--max-tokens",
            "16",
        ],
    );
    assert!(ok, "{err}");
    assert!(!out.trim().is_empty());
    // Same answer as the API gives for the same greedy request.
    let (_, v) = node.post(
        "/v1/chat/completions",
        &serde_json::json!({ "messages": [{"role": "user", "content": "What is 2+2?"}], "temperature": 0, "max_tokens": 16 }),
    );
    assert_eq!(
        out.trim_end_matches('\n'),
        v["choices"][0]["message"]["content"]
            .as_str()
            .expect("text")
    );
    // config set goes through the running node and applies live.
    let (ok, out, err) = cli(
        dir,
        node.port,
        &["config", "set", "default_max_tokens", "77"],
    );
    assert!(ok, "{err}");
    assert!(out.contains("running node"), "{out}");
    assert_eq!(node.get("/api/admin/config").1["default_max_tokens"], 77);
    let (ok, out, _) = cli(dir, node.port, &["config", "set", "context_size", "2048"]);
    assert!(ok);
    assert!(out.contains("after a restart"), "{out}");
    // A node without an updater (this one: `swarmllm` alone) says how it is updated.
    for sub in ["check", "apply"] {
        let (ok, _, err) = cli(dir, node.port, &["update", sub]);
        assert!(
            !ok && err.contains("package manager"),
            "update {sub}: {err}"
        );
    }
    // Client keys: made, listed (without the key), used, revoked.
    let (ok, out, err) = cli(dir, node.port, &["keys", "create", "phone app"]);
    assert!(ok, "{err}");
    let key = out.trim().to_string();
    assert!(
        key.starts_with("swl-client-") && err.contains("shown this once"),
        "{out} {err}"
    );
    let (ok, out, err) = cli(dir, node.port, &["keys", "list"]);
    assert!(
        ok && out.contains("phone app") && !out.contains(&key),
        "{out} {err}"
    );
    let id = out
        .lines()
        .find(|l| l.contains("phone app"))
        .and_then(|l| l.split_whitespace().next())
        .expect("id")
        .to_string();
    let status = |key: &str| {
        node.http()
            .post(node.url("/v1/completions"))
            .bearer_auth(key)
            .json(&serde_json::json!({ "prompt": "Hi", "max_tokens": 1 }))
            .send()
            .expect("send")
            .status()
            .as_u16()
    };
    assert_eq!(status(&key), 200);
    let (ok, _, err) = cli(dir, node.port, &["keys", "revoke", "../x"]);
    assert!(!ok && err.contains("not a key id"), "{err}");
    let (ok, _, err) = cli(dir, node.port, &["keys", "revoke", &id]);
    assert!(ok, "{err}");
    assert_eq!(status(&key), 401);
    let (ok, _, err) = cli(dir, node.port, &["keys", "revoke", &id]);
    assert!(!ok && err.contains("no client key"), "{err}");
}

#[test]
fn models_import_then_metadata_over_http() {
    let node = TestNode::start_without_model();
    let model = common::model_path();
    let (ok, out, err) = cli(
        node.dir(),
        node.port,
        &[
            "models",
            "import",
            model.to_str().expect("utf8"),
            "--shards",
            "3",
        ],
    );
    assert!(ok, "{err}");
    assert!(
        out.contains("as 3 shard(s)") && out.contains("layers 20..30"),
        "{out}"
    );
    let (ok, out, _) = cli(node.dir(), node.port, &["models", "list"]);
    assert!(ok);
    assert!(
        out.contains("smollm2-135m-instruct.q4_1") && out.contains("30"),
        "{out}"
    );

    let (s, m) = node.get("/api/admin/models/smollm2-135m-instruct.q4_1/metadata");
    assert_eq!(s, 200, "{m}");
    assert_eq!(m["model_id"], "smollm2-135m-instruct.q4_1");
    assert_eq!(m["general"]["architecture"], "llama");
    assert_eq!(m["general"]["architecture_supported"], true);
    assert_eq!(m["general"]["quantization"], "Q4_1");
    assert_eq!(m["model"]["block_count"], 30);
    assert_eq!(m["model"]["embedding_length"], 576);
    assert!(
        m["model"]["vocab_size"].as_u64().is_some_and(|v| v > 1000),
        "{m}"
    );
    assert!(m["tokenizer"]["eos_token_id"].is_u64());
    assert!(m["tensors"]["count"].as_u64().is_some_and(|c| c > 200));
    let raw = m["raw"].as_array().expect("raw");
    assert!(
        raw.iter()
            .any(|kv| kv["key"] == "general.architecture" && kv["value"] == "llama")
    );
    assert!(
        !raw.iter().any(|kv| kv["key"] == "tokenizer.ggml.tokens"),
        "vocabulary arrays are excluded"
    );

    let (s, v) = node.get("/api/admin/models/nope/metadata");
    assert_eq!((s, v["error"]["code"].as_str()), (400, Some("NO_HEADER")));
}
