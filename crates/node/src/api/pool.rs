//! Device pools (`/api/pool/*`): create, invite codes, join by code over gossip,
//! state, leave.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};

use super::AppState;
use super::error::ApiError;
use super::extract::{ApiJson, from_value};
use crate::pool::PoolError;

impl From<PoolError> for ApiError {
    fn from(e: PoolError) -> Self {
        let msg = e.to_string();
        match e {
            PoolError::AlreadyInPool(_) => {
                ApiError::new(StatusCode::CONFLICT, "ALREADY_IN_POOL", msg)
            }
            PoolError::NotInPool => ApiError::new(StatusCode::NOT_FOUND, "NOT_IN_POOL", msg),
            PoolError::NotOwner => ApiError::new(StatusCode::FORBIDDEN, "NOT_OWNER", msg),
            PoolError::TooManyCodes => ApiError::new(StatusCode::CONFLICT, "TOO_MANY_CODES", msg)
                .with_details(json!({ "max_active_codes": crate::pool::MAX_ACTIVE_CODES })),
            PoolError::RateLimited { retry_after } => {
                ApiError::rate_limited(retry_after.max(1) as u64)
                    .with_details_merged(json!({ "reason": msg }))
            }
            PoolError::Invalid(_) => ApiError::new(StatusCode::BAD_REQUEST, "INVALID_FIELD", msg),
            PoolError::UnknownCode => ApiError::new(StatusCode::NOT_FOUND, "UNKNOWN_CODE", msg),
            PoolError::CodeUsed => ApiError::new(StatusCode::GONE, "CODE_USED", msg),
            PoolError::CodeExpired => ApiError::new(StatusCode::GONE, "CODE_EXPIRED", msg),
            PoolError::Full(_) => ApiError::new(StatusCode::CONFLICT, "POOL_FULL", msg),
            PoolError::UnknownPool(_) => {
                ApiError::new(StatusCode::NOT_FOUND, "POOL_NOT_FOUND", msg)
            }
            other => ApiError::internal("pool", other),
        }
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, PoolError> + Send + 'static,
) -> Result<T, ApiError> {
    super::blocking("pool", f).await
}

/// The pool state with each device's online status and stats (from its signed
/// announcements; this node's own from itself).
async fn state_with_stats(state: &AppState) -> Result<Value, ApiError> {
    let pools = state.node.pools().clone();
    let s = blocking(move || pools.state()).await?;
    let mut v = serde_json::to_value(&s).unwrap_or_default();
    let me = state.node.node_id();
    let (records, connected) = match state.node.network() {
        Some(net) => {
            let records = net.peer_records(1000).await;
            let connected: std::collections::HashSet<String> =
                net.connected().into_iter().map(|p| p.node_id).collect();
            (records, connected)
        }
        None => (Vec::new(), Default::default()),
    };
    let hw = tokio::task::spawn_blocking(crate::hardware::snapshot)
        .await
        .map_err(|e| ApiError::internal("reading the hardware", e))?;
    let mut total_vram = 0.0;
    if let Some(members) = v["members"].as_array_mut() {
        for m in members.iter_mut() {
            let id = m["node_id"].as_str().unwrap_or_default().to_string();
            let stats = if id == me {
                let vram: u64 = hw.gpus.iter().map(|g| g.memory_total).sum();
                let ranges = state.node.pipeline().host().ranges();
                json!({
                    "online": true,
                    "last_seen_at": chrono::Utc::now().timestamp(),
                    "vram_gb": (vram as f64 / (1u64 << 30) as f64 * 10.0).round() / 10.0,
                    "shards_hosted": ranges.iter().map(|r| r.last_shard - r.first_shard + 1).sum::<u32>(),
                    "forwards_served": state.node.pipeline().host().steps_served(),
                    "uptime_secs": state.node.uptime().as_secs(),
                    "models": ranges.iter().map(|r| r.model_id.clone()).collect::<std::collections::BTreeSet<_>>(),
                })
            } else if let Some(r) = records.iter().find(|r| r.node_id == id) {
                let models: Vec<crate::net::announce::HostedModel> =
                    serde_json::from_value(r.models.clone()).unwrap_or_default();
                json!({
                    "online": connected.contains(&id),
                    "last_seen_at": r.last_seen_at,
                    "vram_gb": r.hardware["vram_gb"].as_f64().unwrap_or(0.0),
                    "layers_hosted": models.iter().map(|m| m.layer_end - m.layer_start).sum::<u32>(),
                    "forwards_served": r.load["steps_served"].as_u64().unwrap_or(0),
                    "uptime_secs": r.load["uptime_secs"].as_u64().unwrap_or(0),
                    "models": models.iter().map(|m| m.id.clone()).collect::<std::collections::BTreeSet<_>>(),
                })
            } else {
                json!({ "online": false, "last_seen_at": null })
            };
            total_vram += stats["vram_gb"].as_f64().unwrap_or(0.0);
            m["stats"] = stats.clone();
            m["online"] = stats["online"].clone();
        }
    }
    v["combined_vram_gb"] = json!((total_vram * 10.0).round() / 10.0);
    Ok(v)
}

/// `GET /api/pool/state`
pub(crate) async fn state(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    Ok(Json(state_with_stats(&state).await?))
}

/// `GET /api/pool/leaderboard`: the pool's devices ranked by forwards served.
pub(crate) async fn leaderboard(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let v = state_with_stats(&state).await?;
    let mut rows: Vec<Value> = v["members"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .map(|m| {
            json!({
                "node_id": m["node_id"],
                "device_name": m["device_name"],
                "role": m["role"],
                "online": m["online"],
                "forwards_served": m["stats"]["forwards_served"].as_u64().unwrap_or(0),
                "contribution": m["contribution"],
            })
        })
        .collect();
    rows.sort_by_key(|r| std::cmp::Reverse(r["forwards_served"].as_u64().unwrap_or(0)));
    for (i, r) in rows.iter_mut().enumerate() {
        r["rank"] = json!(i + 1);
    }
    Ok(Json(json!({ "pool_id": v["pool_id"], "members": rows })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateBody {
    name: String,
    device_name: Option<String>,
}

/// `POST /api/pool/create` with `{"name": "My Devices"}`.
pub(crate) async fn create(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<Value>,
) -> Result<Json<Value>, ApiError> {
    let body: CreateBody = from_value(&body)?;
    let pools = state.node.pools().clone();
    let device = body.device_name.or_else(|| state.node.nickname());
    let s = blocking(move || pools.create(&body.name, device.as_deref())).await?;
    Ok(Json(serde_json::to_value(s).unwrap_or_default()))
}

/// `POST /api/pool/generate-code` → `{"code": "A3F7K2M9", "expires_at": …}`.
pub(crate) async fn generate_code(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let pools = state.node.pools().clone();
    let (code, expires_at) = blocking(move || pools.generate_code()).await?;
    Ok(Json(json!({ "code": code, "expires_at": expires_at })))
}

/// `POST /api/pool/leave` (the owner leaving dissolves the pool).
pub(crate) async fn leave(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let pools = state.node.pools().clone();
    blocking(move || pools.leave()).await?;
    Ok(Json(json!({ "status": "left" })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct JoinBody {
    code: String,
    device_name: Option<String>,
}

/// `POST /api/pool/join` with `{"code": "A3F7K2M9"}`: waits for the owner's
/// answer (404 `UNKNOWN_CODE` when no owner recognises the code in time, 410 for a
/// used or expired code, 409 for a full pool).
pub(crate) async fn join(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<Value>,
) -> Result<Json<Value>, ApiError> {
    let body: JoinBody = from_value(&body)?;
    let device = body.device_name.or_else(|| state.node.nickname());
    let s = state.node.pools().join(&body.code, device).await?;
    Ok(Json(serde_json::to_value(s).unwrap_or_default()))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RemoveBody {
    node_id: String,
}

/// `POST /api/pool/remove` with `{"node_id": "…"}` (owner only): removes the
/// device and gossips a signed removal notice.
pub(crate) async fn remove(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<Value>,
) -> Result<Json<Value>, ApiError> {
    let body: RemoveBody = from_value(&body)?;
    let s = state.node.pools().remove(&body.node_id).await?;
    Ok(Json(serde_json::to_value(s).unwrap_or_default()))
}

/// Per-model coverage by this node and its pool's devices.
async fn coverage(state: &AppState) -> Value {
    let pipeline = state.node.pipeline();
    let pools = state.node.pools().clone();
    let me = state.node.node_id();
    let members: std::collections::HashSet<String> =
        tokio::task::spawn_blocking(move || pools.accepted_members())
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_default();
    let mut models = Vec::new();
    let mut disk_used: u64 = 0;
    for m in pipeline.local_models() {
        // The figure the budget is held to (shards and header), as in
        // `GET /api/admin/shard-storage`.
        disk_used += m.disk_bytes();
        let holders = pipeline.holders(&m.manifest.model_id).await;
        let in_pool = |a: u32, b: u32| {
            holders.iter().any(|h| {
                (h.local || h.node_id == me || members.contains(&h.node_id))
                    && h.layer_start <= a
                    && h.layer_end >= b
            })
        };
        let mut missing = Vec::new();
        let mut missing_bytes = 0u64;
        for s in &m.manifest.shards {
            if !(m.held.contains(&s.index) || in_pool(s.layer_start, s.layer_end)) {
                missing.push(s.index);
                missing_bytes += s.bytes;
            }
        }
        let total = m.manifest.shards.len();
        let pool_shards = total - missing.len();
        models.push(json!({
            "model_id": m.manifest.model_id,
            "total_shards": total,
            "pool_shards": pool_shards,
            "coverage_pct": (pool_shards as f64 * 1000.0 / total.max(1) as f64).round() / 10.0,
            "missing": missing,
            "est_download_mb": (missing_bytes as f64 / 1_048_576.0 * 10.0).round() / 10.0,
        }));
    }
    json!({
        "models": models,
        "disk_budget_mb": state.node.config().disk_budget_mb,
        "disk_used_mb": (disk_used as f64 / 1_048_576.0 * 10.0).round() / 10.0,
    })
}

/// `GET /api/pool/coverage`
pub(crate) async fn get_coverage(State(state): State<AppState>) -> Json<Value> {
    Json(coverage(&state).await)
}

fn private_mode_json(mode: crate::pool::PrivateMode, coverage: Value) -> Value {
    json!({
        "enabled": mode.enabled,
        "allow_lan": mode.allow_lan,
        "offline_mode": mode.offline_mode,
        "coverage": coverage,
    })
}

/// `GET /api/pool/private-mode`
pub(crate) async fn get_private_mode(State(state): State<AppState>) -> Json<Value> {
    Json(private_mode_json(
        state.node.private_mode(),
        coverage(&state).await,
    ))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PrivateModeBody {
    enabled: bool,
    allow_lan: Option<bool>,
    offline_mode: Option<bool>,
}

/// `PUT /api/pool/private-mode` with `{"enabled": true}` (and optionally
/// `allow_lan`, `offline_mode`); answers with the coverage summary.
pub(crate) async fn put_private_mode(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<Value>,
) -> Result<Json<Value>, ApiError> {
    let body: PrivateModeBody = from_value(&body)?;
    let before = state.node.private_mode();
    let mode = crate::pool::PrivateMode {
        enabled: body.enabled,
        allow_lan: body.allow_lan.unwrap_or(before.allow_lan),
        offline_mode: body.offline_mode.unwrap_or(before.offline_mode),
    };
    let restart = state
        .node
        .set_private_mode(mode)
        .await
        .map_err(|e| ApiError::internal("saving private mode", e))?;
    let mut v = private_mode_json(mode, coverage(&state).await);
    if restart {
        v["restart_required"] = json!(["offline_mode"]);
    }
    Ok(Json(v))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SplitBody {
    pct: u32,
}

/// `PUT /api/pool/credit-split` with `{"pct": 20}` (0–50, owner only).
pub(crate) async fn put_credit_split(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<Value>,
) -> Result<Json<Value>, ApiError> {
    let body: SplitBody = from_value(&body)?;
    let pools = state.node.pools().clone();
    let s = blocking(move || pools.set_credit_split(body.pct)).await?;
    // Members forward by the split they know: tell them.
    state.node.pools().publish_settings().await;
    Ok(Json(serde_json::to_value(s).unwrap_or_default()))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ContributionBody {
    node_id: String,
    level: u32,
}

/// `PUT /api/pool/contribution` with `{"node_id": "…", "level": 75}` (0–100,
/// owner only).
pub(crate) async fn put_contribution(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<Value>,
) -> Result<Json<Value>, ApiError> {
    let body: ContributionBody = from_value(&body)?;
    let pools = state.node.pools().clone();
    let s = blocking(move || pools.set_contribution(&body.node_id, body.level)).await?;
    // The member learns its level from the owner's signed state.
    state.node.pools().publish_settings().await;
    Ok(Json(serde_json::to_value(s).unwrap_or_default()))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DeviceNameBody {
    name: String,
}

/// `POST /api/pool/device-name` with `{"name": "Gaming PC"}`.
pub(crate) async fn device_name(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<Value>,
) -> Result<Json<Value>, ApiError> {
    let body: DeviceNameBody = from_value(&body)?;
    let s = state.node.pools().rename_device(&body.name).await?;
    Ok(Json(serde_json::to_value(s).unwrap_or_default()))
}

/// `GET /api/pool/pins`
pub(crate) async fn pins(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let pools = state.node.pools().clone();
    let pins = blocking(move || pools.pins()).await?;
    Ok(Json(json!({ "pins": pins })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PinBody {
    model_id: String,
    target_node_id: String,
    #[serde(default)]
    shard_indices: Vec<u32>,
}

async fn change_pin(state: &AppState, body: Value, add: bool) -> Result<Json<Value>, ApiError> {
    let body: PinBody = from_value(&body)?;
    if !crate::pipeline::is_model_id(&body.model_id) {
        return Err(ApiError::invalid_field("model_id", "not a model id"));
    }
    let pins = state
        .node
        .pools()
        .pin(
            crate::pool::Pin {
                model_id: body.model_id,
                target_node_id: body.target_node_id,
                shard_indices: body.shard_indices,
            },
            add,
        )
        .await?;
    Ok(Json(json!({ "status": "ok", "pins": pins })))
}

/// `POST /api/pool/pin` with `{"model_id", "target_node_id", "shard_indices"?}`
/// (owner only; empty or absent indices pin every shard).
pub(crate) async fn add_pin(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<Value>,
) -> Result<Json<Value>, ApiError> {
    change_pin(&state, body, true).await
}

/// `DELETE /api/pool/pin` with the same body.
pub(crate) async fn remove_pin(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<Value>,
) -> Result<Json<Value>, ApiError> {
    change_pin(&state, body, false).await
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct InviteBody {
    node_id: String,
}

/// `POST /api/pool/invite` with `{"node_id": "…"}` (owner only).
pub(crate) async fn invite(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<Value>,
) -> Result<Json<Value>, ApiError> {
    let body: InviteBody = from_value(&body)?;
    let s = state.node.pools().invite_node(&body.node_id).await?;
    Ok(Json(serde_json::to_value(s).unwrap_or_default()))
}

/// `GET /api/pool/invitations`: invitations this device received.
pub(crate) async fn invitations(State(state): State<AppState>) -> Json<Value> {
    Json(json!({ "invitations": state.node.pools().invitations() }))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AcceptBody {
    invitation_id: String,
    device_name: Option<String>,
}

/// `POST /api/pool/accept` with `{"invitation_id": "…"}`.
pub(crate) async fn accept(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<Value>,
) -> Result<Json<Value>, ApiError> {
    let body: AcceptBody = from_value(&body)?;
    let device = body.device_name.or_else(|| state.node.nickname());
    let s = state
        .node
        .pools()
        .accept(&body.invitation_id, device)
        .await?;
    Ok(Json(serde_json::to_value(s).unwrap_or_default()))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct QrBody {
    code: String,
}

/// `POST /api/pool/qr` with `{"code": "A3F7K2M9"}` → `{"code", "svg"}`: the invite
/// code as an SVG QR code (for the pool page).
pub(crate) async fn qr(ApiJson(body): ApiJson<Value>) -> Result<Json<Value>, ApiError> {
    let body: QrBody = from_value(&body)?;
    let code = crate::pool::parse_code(&body.code)?;
    let svg = crate::qr::svg(&code).map_err(|e| ApiError::internal("qr", e))?;
    Ok(Json(json!({ "code": code, "svg": svg })))
}

/// `POST /api/pool/scan-qr` with a PNG or JPEG picture as the body → `{"code"}`:
/// the invite code in the picture (a photo, a screenshot, a camera frame).
pub(crate) async fn scan_qr(body: axum::body::Bytes) -> Result<Json<Value>, ApiError> {
    let text = read_qr(body).await?;
    let code = crate::pool::parse_code(&text).map_err(|_| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "NOT_AN_INVITE_CODE",
            "the QR code does not hold a pool invite code",
        )
    })?;
    Ok(Json(json!({ "code": code })))
}

/// The text of the QR code in a picture (422 `NO_QR_CODE` when none is found).
pub(super) async fn read_qr(picture: axum::body::Bytes) -> Result<String, ApiError> {
    tokio::task::spawn_blocking(move || crate::qr::decode(&picture))
        .await
        .map_err(|e| ApiError::internal("qr", e))?
        .map_err(|e| match e {
            crate::qr::QrError::NotFound => ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "NO_QR_CODE",
                e.to_string(),
            ),
            other => ApiError::new(StatusCode::BAD_REQUEST, "INVALID_IMAGE", other.to_string()),
        })
}

/// Device pools. Each route is declared read (public) or write (needs the key) here.
pub(super) fn routes() -> super::routes::Routes {
    use axum::http::Method;
    super::routes::Routes::default()
        .read(Method::GET, "/api/pool/state", state)
        .read(Method::GET, "/api/pool/private-mode", get_private_mode)
        .read(Method::GET, "/api/pool/coverage", get_coverage)
        .read(Method::GET, "/api/pool/pins", pins)
        .read(Method::GET, "/api/pool/invitations", invitations)
        .read(Method::GET, "/api/pool/leaderboard", leaderboard)
        .write(Method::POST, "/api/pool/create", create)
        .write(Method::POST, "/api/pool/generate-code", generate_code)
        .write(Method::POST, "/api/pool/leave", leave)
        .write(Method::POST, "/api/pool/join", join)
        .write(Method::POST, "/api/pool/remove", remove)
        .write(Method::POST, "/api/pool/device-name", device_name)
        .write(Method::POST, "/api/pool/invite", invite)
        .write(Method::POST, "/api/pool/accept", accept)
        .write(Method::POST, "/api/pool/qr", qr)
        .write(Method::POST, "/api/pool/scan-qr", scan_qr)
        .write(Method::POST, "/api/pool/pin", add_pin)
        .write(Method::DELETE, "/api/pool/pin", remove_pin)
        .write(Method::PUT, "/api/pool/credit-split", put_credit_split)
        .write(Method::PUT, "/api/pool/contribution", put_contribution)
        .write(Method::PUT, "/api/pool/private-mode", put_private_mode)
}
