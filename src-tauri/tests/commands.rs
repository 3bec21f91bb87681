//! The app's Tauri commands on Tauri's mock runtime (no display, no webview):
//! each drives a real node started from the library, as the app does.

use serde_json::{Value, json};
use std::io::{Read, Write};
use swarmllm_desktop::{Shell, commands};
use swarmllm_node::config::ConfigSource;

use tauri::Manager;
use tauri::test::{INVOKE_KEY, get_ipc_response, mock_builder};

fn shell(dir: &std::path::Path) -> Shell {
    let mut overrides = serde_json::Map::new();
    overrides.insert("data_dir".into(), json!(dir.to_string_lossy()));
    overrides.insert("api_port".into(), json!(0));
    overrides.insert("p2p_enabled".into(), json!(false));
    overrides.insert("secret_store".into(), json!("file"));
    let source = ConfigSource {
        path: dir.join("config.toml"),
        overrides,
        read_env: false,
    };
    tauri::async_runtime::block_on(Shell::start(source)).expect("node starts")
}

fn invoke(
    webview: &tauri::WebviewWindow<tauri::test::MockRuntime>,
    cmd: &str,
    args: Value,
) -> Result<Value, Value> {
    get_ipc_response(
        webview,
        tauri::webview::InvokeRequest {
            cmd: cmd.into(),
            callback: tauri::ipc::CallbackFn(0),
            error: tauri::ipc::CallbackFn(1),
            // The app's own origin on Linux and macOS.
            url: "tauri://localhost".parse().expect("url"),
            body: tauri::ipc::InvokeBody::Json(args),
            headers: Default::default(),
            invoke_key: INVOKE_KEY.to_string(),
        },
    )
    .map(|b| b.deserialize::<Value>().expect("json"))
}

#[test]
fn commands_reach_the_node_in_process() {
    let dir = tempfile::tempdir().expect("tempdir");
    let shell = shell(dir.path());
    let node = shell.node.clone();
    let mut changes = node.watch_private_mode();
    let app = mock_builder()
        .manage(shell)
        .invoke_handler(tauri::generate_handler![
            commands::app_info,
            commands::node_request,
            commands::set_private_mode,
        ])
        // The app's own context: its capabilities decide what the window may invoke.
        .build(tauri::generate_context!())
        .expect("app");
    let webview = tauri::WebviewWindowBuilder::new(&app, "main", Default::default())
        .build()
        .expect("webview");

    // app_info: the node behind the app and where its localhost API listens.
    let info = invoke(&webview, "app_info", json!({})).expect("app_info");
    assert_eq!(info["node_id"], node.node_id());
    assert_eq!(info["api_key"], node.api_key());
    assert_eq!(info["in_app"], true);
    let base = info["api_base"].as_str().expect("api_base");
    assert!(base.starts_with("http://127.0.0.1:"), "{base}");

    // node_request: the API in process; writes are authenticated as the app.
    let r = invoke(
        &webview,
        "node_request",
        json!({ "method": "GET", "path": "/api/pool/private-mode", "body": null }),
    )
    .expect("request");
    assert_eq!(
        (r["status"].as_u64(), &r["body"]["enabled"]),
        (Some(200), &json!(false))
    );
    let r = invoke(
        &webview,
        "node_request",
        json!({ "method": "POST", "path": "/api/pool/create", "body": { "name": "Home" } }),
    )
    .expect("request");
    assert_eq!(r["status"], 200, "{r}");
    assert_eq!(r["body"]["role"], "owner", "{r}");
    let r = invoke(
        &webview,
        "node_request",
        json!({ "method": "POST", "path": "/api/pool/create", "body": { "name": "Other" } }),
    )
    .expect("request");
    assert_eq!(r["status"], 409, "{r}");
    assert_eq!(r["body"]["error"]["code"], "ALREADY_IN_POOL");
    let r = invoke(
        &webview,
        "node_request",
        json!({ "method": "GET", "path": "/nope/nothing", "body": null }),
    )
    .expect("request");
    assert_eq!(r["status"], 404);
    for (method, path) in [("GET", "http://example.com/"), ("BAD METHOD", "/health")] {
        assert!(
            invoke(
                &webview,
                "node_request",
                json!({ "method": method, "path": path, "body": null }),
            )
            .is_err(),
            "{method} {path}"
        );
    }

    // set_private_mode: the node changes, and watchers (the tray) hear of it.
    let mode = invoke(&webview, "set_private_mode", json!({ "enabled": true })).expect("set");
    assert_eq!(mode["enabled"], true);
    assert!(node.private_mode().enabled);
    assert!(changes.has_changed().expect("watch"));
    assert!(changes.borrow_and_update().enabled);
    let r = invoke(
        &webview,
        "node_request",
        json!({ "method": "GET", "path": "/api/pool/private-mode", "body": null }),
    )
    .expect("request");
    assert_eq!(r["body"]["enabled"], true);
    invoke(&webview, "set_private_mode", json!({ "enabled": false })).expect("set");
    assert!(!node.private_mode().enabled);

    // The localhost API answers too, for scripts and the CLI.
    assert_eq!(app.state::<Shell>().api_base, base);
    let mut stream =
        std::net::TcpStream::connect(base.trim_start_matches("http://")).expect("connect");
    stream
        .write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .expect("write");
    let mut answer = String::new();
    stream.read_to_string(&mut answer).expect("read");
    assert!(answer.starts_with("HTTP/1.0 200"), "{answer}");
    assert!(answer.contains(&node.node_id()), "{answer}");
}
