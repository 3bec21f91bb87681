//! The OpenAPI document against a real node: every route served is in it, and a
//! property-based fuzzer (schemathesis, from PyPI) that generates requests from
//! it finds no server error and no error body outside the API's JSON shape.

mod common;

use std::process::Command;

use common::TestNode;
use serde_json::Value;

/// Routes the fuzzer must not call: they stop the node or replace its program,
/// or would point it at hosts off this machine (a generated endpoint URL or a
/// cloud provider's key would send later requests there; tests stay on
/// loopback). Their validation has tests of its own.
const EXCLUDED: &[&str] = &[
    "/api/admin/shutdown",
    "/api/admin/update/apply",
    "/api/admin/config/reload",
    "/api/admin/config",
    "/api/admin/providers",
    "/api/admin/join-network",
];

#[test]
fn the_document_lists_every_route_the_node_serves() {
    let node = TestNode::start_without_model();
    let (status, doc) = node.get("/api/openapi.json");
    assert_eq!(status, 200, "{doc}");
    assert_eq!(doc["openapi"], "3.1.0");
    for r in swarmllm_node::api::route_table() {
        let op = &doc["paths"][r.path][r.method.as_str().to_ascii_lowercase()];
        assert!(op.is_object(), "{} {} is not documented", r.method, r.path);
    }
    let errors: &Value = &doc["components"]["schemas"]["Error"];
    assert_eq!(errors["required"], serde_json::json!(["error"]));
}

#[test]
fn a_fuzzer_driven_by_the_document_finds_no_server_error() {
    // Through the interpreter (its console script may not be on PATH yet).
    let schemathesis = || {
        let mut c = Command::new("python3");
        c.args([
            "-c",
            "import sys; from schemathesis.cli import schemathesis; sys.exit(schemathesis())",
        ]);
        c
    };
    let has_schemathesis = schemathesis()
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_schemathesis {
        eprintln!("SKIPPED: schemathesis is not installed (pip install schemathesis)");
        return;
    }
    // Loopback only: a Hub that refuses connections, no rate limits in the way.
    let node = TestNode::start_custom(
        true,
        &[],
        &[
            ("SWARMLLM_RATE_LIMIT_PER_MINUTE", "0"),
            ("SWARMLLM_PUBLIC_RATE_LIMIT_PER_MINUTE", "0"),
            ("HF_ENDPOINT", "http://127.0.0.1:9"),
        ],
        |_| {},
    );
    let config = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/schemathesis.toml");
    let mut cmd = schemathesis();
    cmd.args(["--config-file", config, "run"])
        .arg(node.url("/api/openapi.json"))
        .args(["--checks", "not_a_server_error,response_schema_conformance"])
        .args(["--phases", "examples,fuzzing"])
        .args(["--max-examples", "12", "--seed", "7", "--workers", "1"])
        .args(["--request-timeout", "30"])
        .args(["--header", &format!("Authorization: Bearer {}", node.key)]);
    for path in EXCLUDED {
        cmd.args(["--exclude-path", path]);
    }
    // Its caches go to a scratch folder, not into the checkout.
    let scratch = tempfile::tempdir().expect("tempdir");
    let out = cmd
        .current_dir(scratch.path())
        .output()
        .expect("run schemathesis");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the fuzzer found failures:\n{stdout}\n{stderr}"
    );
    // The node is still serving after all of it.
    assert_eq!(node.get("/health/live").0, 200);
}
