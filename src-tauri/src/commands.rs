//! Tauri commands: how the UI reaches the node inside the app. They only call the
//! node library (its API router in-process, or one of its methods).

use std::net::SocketAddr;

use serde::Serialize;
use serde_json::Value;
use swarmllm_node::pool::PrivateMode;
use tauri::State;
use tower::ServiceExt;

use crate::Shell;

/// Largest API answer a command passes back.
const MAX_BODY: usize = 16 * 1024 * 1024;

/// What the UI needs to know about the app and its node.
#[derive(Debug, Serialize)]
pub struct AppInfo {
    /// The node's id.
    pub node_id: String,
    /// The localhost API (`http://127.0.0.1:PORT`), for streams and uploads.
    pub api_base: String,
    /// The API key (the UI is this app's own; settings reveal it).
    pub api_key: String,
    /// `keychain` or `encrypted_file`.
    pub secret_store: Value,
    /// Always true: the UI is inside the app.
    pub in_app: bool,
    /// App version.
    pub version: &'static str,
}

/// `invoke("app_info")`.
#[tauri::command]
pub fn app_info(shell: State<'_, Shell>) -> AppInfo {
    AppInfo {
        node_id: shell.node.node_id(),
        api_base: shell.api_base.clone(),
        api_key: shell.node.api_key().to_string(),
        secret_store: serde_json::to_value(shell.node.secret_backend()).unwrap_or(Value::Null),
        in_app: true,
        version: swarmllm_node::VERSION,
    }
}

/// An API answer: the HTTP status and the JSON body (a string when not JSON).
#[derive(Debug, Serialize)]
pub struct NodeResponse {
    /// HTTP status.
    pub status: u16,
    /// JSON body.
    pub body: Value,
}

/// `invoke("node_request", {method, path, body})`: one call of the node's API,
/// in process (no socket), authenticated as the app.
#[tauri::command]
pub async fn node_request(
    shell: State<'_, Shell>,
    method: String,
    path: String,
    body: Option<Value>,
) -> Result<NodeResponse, String> {
    if !path.starts_with('/') || path.starts_with("//") || path.contains("://") {
        return Err(format!("not an API path: {path}"));
    }
    let method: axum::http::Method = method
        .parse()
        .map_err(|_| format!("not an HTTP method: {method}"))?;
    let mut request = axum::http::Request::builder()
        .method(method)
        .uri(&path)
        .header("authorization", format!("Bearer {}", shell.node.api_key()));
    let body = match body {
        Some(v) => {
            request = request.header("content-type", "application/json");
            axum::body::Body::from(serde_json::to_vec(&v).map_err(|e| e.to_string())?)
        }
        None => axum::body::Body::empty(),
    };
    let mut request = request.body(body).map_err(|e| e.to_string())?;
    // Handlers that check the caller's address see a local one.
    request
        .extensions_mut()
        .insert(axum::extract::ConnectInfo(SocketAddr::from((
            [127, 0, 0, 1],
            0,
        ))));
    let response = shell
        .router
        .clone()
        .oneshot(request)
        .await
        .map_err(|e| e.to_string())?;
    let status = response.status().as_u16();
    let bytes = axum::body::to_bytes(response.into_body(), MAX_BODY)
        .await
        .map_err(|e| e.to_string())?;
    let body = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    Ok(NodeResponse { status, body })
}

/// Turns private mode on or off, keeping its other settings (the tray's check
/// item and the UI's switch both land here).
pub async fn switch_private_mode(
    node: &swarmllm_node::Node,
    enabled: bool,
) -> Result<PrivateMode, String> {
    let mode = PrivateMode {
        enabled,
        ..node.private_mode()
    };
    node.set_private_mode(mode)
        .await
        .map_err(|e| format!("cannot save private mode: {e}"))?;
    Ok(mode)
}

/// `invoke("set_private_mode", {enabled})`.
#[tauri::command]
pub async fn set_private_mode(
    shell: State<'_, Shell>,
    enabled: bool,
) -> Result<PrivateMode, String> {
    switch_private_mode(&shell.node, enabled).await
}

/// What the tray shows (its status line and the "Private mode" check mark):
/// for the desktop test, which cannot open a tray menu.
#[derive(Debug, Serialize)]
pub struct TrayShown {
    status: String,
    private_mode_checked: bool,
}

#[tauri::command]
pub fn tray_status(app: tauri::AppHandle) -> TrayShown {
    let (status, private_mode_checked) = crate::tray::shown(&app);
    TrayShown {
        status,
        private_mode_checked,
    }
}

/// `invoke("restart_app")`: after an update is installed, stops the node
/// gracefully and starts the app again.
#[tauri::command]
pub async fn restart_app(app: tauri::AppHandle) {
    crate::restart(app).await;
}
