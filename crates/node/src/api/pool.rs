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

fn pool_error(e: PoolError) -> ApiError {
    let msg = e.to_string();
    match e {
        PoolError::AlreadyInPool(_) => ApiError::new(StatusCode::CONFLICT, "ALREADY_IN_POOL", msg),
        PoolError::NotInPool => ApiError::new(StatusCode::NOT_FOUND, "NOT_IN_POOL", msg),
        PoolError::NotOwner => ApiError::new(StatusCode::FORBIDDEN, "NOT_OWNER", msg),
        PoolError::TooManyCodes => ApiError::new(StatusCode::CONFLICT, "TOO_MANY_CODES", msg)
            .with_details(json!({ "max_active_codes": crate::pool::MAX_ACTIVE_CODES })),
        PoolError::RateLimited { retry_after } => ApiError::rate_limited(retry_after.max(1) as u64)
            .with_details_merged(json!({ "reason": msg })),
        PoolError::Invalid(_) => ApiError::new(StatusCode::BAD_REQUEST, "INVALID_FIELD", msg),
        PoolError::UnknownCode => ApiError::new(StatusCode::NOT_FOUND, "UNKNOWN_CODE", msg),
        PoolError::CodeUsed => ApiError::new(StatusCode::GONE, "CODE_USED", msg),
        PoolError::CodeExpired => ApiError::new(StatusCode::GONE, "CODE_EXPIRED", msg),
        PoolError::Full(_) => ApiError::new(StatusCode::CONFLICT, "POOL_FULL", msg),
        other => ApiError::internal("pool", other),
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, PoolError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::internal("pool", e))?
        .map_err(pool_error)
}

/// `GET /api/pool/state`
pub(crate) async fn state(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let pools = state.node.pools().clone();
    let s = blocking(move || pools.state()).await?;
    Ok(Json(serde_json::to_value(s).unwrap_or_default()))
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
    let s = state
        .node
        .pools()
        .join(&body.code, device)
        .await
        .map_err(pool_error)?;
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
    let s = state
        .node
        .pools()
        .remove(&body.node_id)
        .await
        .map_err(pool_error)?;
    Ok(Json(serde_json::to_value(s).unwrap_or_default()))
}
