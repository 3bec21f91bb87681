//! Client keys: `GET/POST /api/admin/api-keys`, `DELETE /api/admin/api-keys/{id}`
//! (the node's key only). A client key runs inference and nothing else, with its
//! own share of the queue (see [`crate::keys`]).

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};

use super::AppState;
use super::error::ApiError;
use super::extract::{ApiJson, Path, from_value};
use super::routes::Routes;
use crate::keys::KeyError;

impl From<KeyError> for ApiError {
    fn from(e: KeyError) -> Self {
        match e {
            KeyError::BadName => ApiError::invalid_field("name", e.to_string()),
            KeyError::TooMany => {
                ApiError::new(StatusCode::CONFLICT, "TOO_MANY_KEYS", e.to_string())
            }
            KeyError::NotFound(_) => {
                ApiError::new(StatusCode::NOT_FOUND, "KEY_NOT_FOUND", e.to_string())
            }
            KeyError::Store(e) => ApiError::internal("client keys", e),
        }
    }
}

/// `GET /api/admin/api-keys`: every client key (never the key itself) with the
/// requests it has waiting, and the share of the queue each may hold.
async fn list(State(state): State<AppState>) -> Json<Value> {
    let node = &state.node;
    let engine = node.engine();
    let keys: Vec<Value> = node
        .client_keys()
        .list()
        .into_iter()
        .map(|k| {
            let waiting = engine.map_or(0, |e| e.waiting_for(&k.id));
            json!({ "id": k.id, "name": k.name, "created_at": k.created_at, "waiting": waiting })
        })
        .collect();
    Json(json!({
        "keys": keys,
        "max_keys": crate::keys::MAX_KEYS,
        "queue_share": engine.map(crate::infer::Engine::queue_share),
    }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateBody {
    name: String,
}

/// `POST /api/admin/api-keys` `{"name"}` → 201 with the key, shown this once.
async fn create(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<Value>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let body: CreateBody = from_value(&body)?;
    let node = state.node.clone();
    let new = super::blocking("client keys", move || node.client_keys().create(&body.name)).await?;
    tracing::info!(id = %new.info.id, name = %new.info.name, "client key created");
    Ok((StatusCode::CREATED, Json(json!(new))))
}

/// `DELETE /api/admin/api-keys/{id}`: requests with it are refused from now on.
async fn revoke(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let node = state.node.clone();
    let gone = super::blocking("client keys", move || node.client_keys().revoke(&id)).await?;
    tracing::info!(id = %gone.id, "client key revoked");
    Ok(Json(json!({ "revoked": gone })))
}

/// The client-key routes, all for the node's key.
pub(crate) fn routes() -> Routes {
    use axum::http::Method;
    Routes::default()
        .write(Method::GET, "/api/admin/api-keys", list)
        .write(Method::POST, "/api/admin/api-keys", create)
        .write(Method::DELETE, "/api/admin/api-keys/{id}", revoke)
}
