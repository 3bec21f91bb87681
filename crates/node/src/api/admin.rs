//! `/api/admin/*` and `/api/identity/nickname`.

use std::net::SocketAddr;

use axum::Json;
use axum::extract::{ConnectInfo, State};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::AppState;
use super::error::ApiError;
use super::extract::ApiJson;
use crate::node::UpdateConfigError;

/// `GET /api/admin/stats`
pub(crate) async fn stats(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let node = &state.node;
    let hardware = tokio::task::spawn_blocking(crate::hardware::snapshot)
        .await
        .map_err(|e| ApiError::internal("hardware snapshot", e))?;
    let nickname = node.nickname();
    // The pool owner's level for this node, read fresh (and applied at once).
    let pools = node.pools().clone();
    if let Ok(level) = tokio::task::spawn_blocking(move || pools.own_contribution()).await {
        node.swarm().set_contribution_level(level);
    }
    let (cpu_percent, ram_used) = state.process_usage().await;
    let p2p = match node.network() {
        Some(n) => json!({
            "peer_id": n.peer_id().to_string(),
            "phase": n.phase().await,
            "region": n.region(),
            "offline": n.offline(),
            "counters": n.counters(),
        }),
        None => Value::Null,
    };
    Ok(Json(json!({
        "node_id": node.node_id(),
        "nickname": nickname,
        "version": crate::VERSION,
        "uptime_seconds": node.uptime().as_secs(),
        "started_at": node.started_at().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        "hardware": hardware,
        "process": { "cpu_percent": cpu_percent, "ram_used": ram_used },
        "model": node.engine().map(|e| e.info().clone()),
        "queue_depth": node.engine().map(|e| e.queue_depth()).unwrap_or(0),
        // Continuous batching: sequences running, batches and their sizes.
        "engine": node.engine().map(|e| e.stats()),
        "inference": node.metrics().summary(),
        "secret_store": node.secret_backend(),
        "peer_count": node.network().map(|n| n.connected().len()).unwrap_or(0),
        "p2p": p2p,
        "auto_manage": node.swarm().counters(),
        // Outside its contribution hours the node serves only itself and its
        // pool, and acquires nothing.
        "contributing": node.swarm().contributing(),
        "contribution_level": node.swarm().contribution_level(),
    })))
}

/// `GET /api/admin/version`: this build, and where its updates stand.
pub(crate) async fn version(State(state): State<AppState>) -> Json<Value> {
    let mut features: Vec<&str> = Vec::new();
    if cfg!(feature = "gpu") {
        features.push("gpu");
    }
    if cfg!(feature = "cuda") {
        features.push("cuda");
    }
    if cfg!(feature = "vulkan") {
        features.push("vulkan");
    }
    if cfg!(feature = "metal") {
        features.push("metal");
    }
    if cfg!(feature = "openmp") {
        features.push("openmp");
    }
    Json(json!({
        "name": "swarmllm",
        "version": crate::VERSION,
        "engine": "llama.cpp (llama-cpp-2 0.1.160)",
        "target": format!("{}-{}", std::env::consts::ARCH, std::env::consts::OS),
        "features": features,
        "debug_build": cfg!(debug_assertions),
        "updates": state.node.updates().status(),
    }))
}

/// `GET /api/admin/api-key` (authenticated)
pub(crate) async fn api_key(State(state): State<AppState>) -> Json<Value> {
    Json(json!({ "api_key": state.node.api_key() }))
}

/// `POST /api/admin/shutdown` (authenticated, loopback only)
pub(crate) async fn shutdown(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
) -> Result<Json<Value>, ApiError> {
    if !peer.ip().is_loopback() {
        return Err(ApiError::forbidden(
            "shutdown is only accepted from localhost",
        ));
    }
    state.node.request_shutdown();
    Ok(Json(json!({
        "status": "shutting_down",
        "message": "the node stops accepting connections; requests in flight finish first",
    })))
}

/// `GET /api/admin/config`
pub(crate) async fn get_config(State(state): State<AppState>) -> Json<Value> {
    Json(Value::Object(state.node.config().to_json()))
}

/// `GET /api/admin/config/defaults`: every field's default and the fields that
/// take effect only after a restart (for settings forms).
pub(crate) async fn get_config_defaults() -> Json<Value> {
    Json(json!({
        "defaults": crate::config::Config::default().to_json(),
        "restart_required": crate::config::Config::restart_fields(),
    }))
}

/// `PUT /api/admin/config` (authenticated): a partial object of fields to change.
pub(crate) async fn put_config(
    State(state): State<AppState>,
    ApiJson(changes): ApiJson<Map<String, Value>>,
) -> Result<Json<Value>, ApiError> {
    if changes.is_empty() {
        return Err(ApiError::invalid_field("<body>", "no fields to update"));
    }
    let node = state.node.clone();
    let change = tokio::task::spawn_blocking(move || node.update_config(&changes))
        .await
        .map_err(|e| ApiError::internal("config update", e))?
        .map_err(config_error)?;
    Ok(Json(json!({
        "success": true,
        "updated": change.updated,
        "restart_required": change.restart_required,
        "config": change.config,
    })))
}

/// `POST /api/admin/config/reload` (authenticated)
pub(crate) async fn reload_config(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let node = state.node.clone();
    let change = tokio::task::spawn_blocking(move || node.reload_config())
        .await
        .map_err(|e| ApiError::internal("config reload", e))?
        .map_err(config_error)?;
    Ok(Json(json!({
        "status": "ok",
        "updated": change.updated,
        "restart_required": change.restart_required,
        "config": change.config,
    })))
}

fn config_error(e: UpdateConfigError) -> ApiError {
    match e {
        UpdateConfigError::Invalid(e) => ApiError::invalid_field(e.field, e.message),
        UpdateConfigError::File(crate::config::ConfigFileError::Invalid(e)) => {
            ApiError::invalid_field(e.field, e.message)
        }
        UpdateConfigError::File(e @ crate::config::ConfigFileError::Parse { .. }) => ApiError::new(
            axum::http::StatusCode::BAD_REQUEST,
            "INVALID_CONFIG_FILE",
            e.to_string(),
        ),
        other => ApiError::internal("writing the config file", other),
    }
}

/// `GET /api/identity/nickname`
pub(crate) async fn get_nickname(State(state): State<AppState>) -> Json<Value> {
    Json(json!({ "node_id": state.node.node_id(), "nickname": state.node.nickname() }))
}

#[derive(Debug, Deserialize)]
pub(crate) struct NicknameBody {
    nickname: String,
}

/// Longest nickname, in characters.
const MAX_NICKNAME_CHARS: usize = 32;

/// `PUT /api/identity/nickname` (authenticated)
pub(crate) async fn put_nickname(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<NicknameBody>,
) -> Result<Json<Value>, ApiError> {
    let nickname = body.nickname.trim().to_string();
    if nickname.is_empty() {
        return Err(ApiError::invalid_parameter(
            "nickname",
            "must not be empty (use DELETE to clear it)",
        ));
    }
    if nickname.chars().count() > MAX_NICKNAME_CHARS {
        return Err(ApiError::invalid_parameter(
            "nickname",
            format!("must be at most {MAX_NICKNAME_CHARS} characters"),
        ));
    }
    if nickname.chars().any(char::is_control) {
        return Err(ApiError::invalid_parameter(
            "nickname",
            "must not contain control characters",
        ));
    }
    state
        .node
        .set_nickname(Some(nickname.clone()))
        .await
        .map_err(|e| ApiError::internal("saving the nickname", e))?;
    Ok(Json(
        json!({ "node_id": state.node.node_id(), "nickname": nickname }),
    ))
}

/// `DELETE /api/identity/nickname` (authenticated)
pub(crate) async fn delete_nickname(
    State(state): State<AppState>,
) -> Result<Json<Value>, ApiError> {
    state
        .node
        .set_nickname(None)
        .await
        .map_err(|e| ApiError::internal("clearing the nickname", e))?;
    Ok(Json(
        json!({ "node_id": state.node.node_id(), "nickname": null }),
    ))
}

/// `GET /api/admin/models/{id}/metadata`: parsed GGUF metadata from the model's
/// `gguf_header.bin` (400 when the node has no header for it).
pub(crate) async fn model_metadata(
    State(state): State<AppState>,
    super::extract::Path(id): super::extract::Path<String>,
) -> Result<Json<Value>, ApiError> {
    if id.is_empty() || id.contains(['/', '\\']) || id.starts_with('.') {
        return Err(ApiError::invalid_field("id", "not a model id"));
    }
    let path = state
        .node
        .data_dir()
        .join("models")
        .join(&id)
        .join("gguf_header.bin");
    let header = tokio::task::spawn_blocking(move || crate::shard::gguf::Gguf::read_header(&path))
        .await
        .map_err(|e| ApiError::internal("reading the GGUF header", e))?
        .map_err(|e| {
            ApiError::new(
                axum::http::StatusCode::BAD_REQUEST,
                "NO_HEADER",
                format!("no readable GGUF header for model '{id}' (import it with `swarmllm models import`): {e}"),
            )
        })?;
    Ok(Json(crate::shard::metadata_json(&id, &header)))
}

/// Node administration: stats, config, identity, shutdown. Each route is declared read (public) or write (needs the key) here.
pub(super) fn routes() -> super::routes::Routes {
    use axum::http::Method;
    super::routes::Routes::default()
        .read(Method::GET, "/api/admin/stats", stats)
        .read(Method::GET, "/api/admin/version", version)
        .read(Method::GET, "/api/admin/config", get_config)
        .read(
            Method::GET,
            "/api/admin/config/defaults",
            get_config_defaults,
        )
        .read(Method::GET, "/api/identity/nickname", get_nickname)
        .read(
            Method::GET,
            "/api/admin/models/{id}/metadata",
            model_metadata,
        )
        .write(Method::GET, "/api/admin/api-key", api_key)
        .write(Method::POST, "/api/admin/shutdown", shutdown)
        .write(Method::PUT, "/api/admin/config", put_config)
        .write(Method::POST, "/api/admin/config/reload", reload_config)
        .write(Method::PUT, "/api/identity/nickname", put_nickname)
        .write(Method::DELETE, "/api/identity/nickname", delete_nickname)
}
