//! LoRA adapters (see [`crate::adapters`]): `GET /api/admin/adapters`,
//! `POST /api/admin/adapters`, `DELETE /api/admin/adapters/{id}`, in the
//! admin spec's shapes.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde_json::{Value, json};

use super::AppState;
use super::error::ApiError;
use super::extract::{ApiJson, Path, from_value};
use super::routes::Routes;
use crate::adapters::{AdapterError, BaseModel, Registration};

impl From<AdapterError> for ApiError {
    fn from(e: AdapterError) -> Self {
        let message = e.to_string();
        match e {
            AdapterError::BadField(field, _) => ApiError::invalid_field(field, message),
            AdapterError::BadPath(_) => {
                ApiError::new(StatusCode::BAD_REQUEST, "INVALID_PATH", message)
            }
            AdapterError::BadFile(_) => {
                ApiError::new(StatusCode::BAD_REQUEST, "INVALID_ADAPTER", message)
            }
            AdapterError::NeedsBase(_) => {
                ApiError::new(StatusCode::CONFLICT, "NO_BASE_MODEL", message)
            }
            AdapterError::Exists(_) => {
                ApiError::new(StatusCode::CONFLICT, "ADAPTER_EXISTS", message)
            }
            AdapterError::TooMany => {
                ApiError::new(StatusCode::CONFLICT, "TOO_MANY_ADAPTERS", message)
            }
            // The spec: "Returns 400 if the id is not found."
            AdapterError::NotFound(_) => {
                ApiError::new(StatusCode::BAD_REQUEST, "ADAPTER_NOT_FOUND", message)
            }
            AdapterError::Io(e) => ApiError::internal("adapter file", e),
            AdapterError::Store(e) => ApiError::internal("adapters", e),
        }
    }
}

/// `GET /api/admin/adapters`
async fn list(State(state): State<AppState>) -> Json<Value> {
    Json(json!({ "adapters": state.node.adapters().list() }))
}

/// `POST /api/admin/adapters` `{"id", "name", "base_model", "rank", "alpha",
/// "path"}`: checks (or converts) the file and registers it.
async fn register(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<Value>,
) -> Result<Json<Value>, ApiError> {
    let req: Registration = from_value(&body)?;
    let node = state.node.clone();
    let adapter = super::blocking("adapters", move || {
        // The model this node serves: a PEFT file is converted for it, and a
        // GGUF adapter for another architecture is refused now rather than
        // on the first request.
        let base = node.engine().and_then(|e| {
            let info = e.info();
            let header = crate::shard::gguf::Gguf::read(&info.path).ok()?;
            Some(BaseModel {
                id: info.id.clone(),
                header,
            })
        });
        node.adapters().register(req, base.as_ref())
    })
    .await?;
    tracing::info!(id = %adapter.id, format = %adapter.format, rank = adapter.rank, "adapter registered");
    Ok(Json(json!({ "status": "ok", "adapter": adapter })))
}

/// `DELETE /api/admin/adapters/{id}`: unregisters it (the file stays).
async fn remove(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let node = state.node.clone();
    let gone = super::blocking("adapters", move || node.adapters().remove(&id)).await?;
    tracing::info!(id = %gone.id, "adapter removed");
    Ok(Json(json!({
        "status": "ok",
        "message": format!("Adapter '{}' removed", gone.id),
    })))
}

/// The adapter routes: listing is public like the node's other listings;
/// registering and removing need the node's key.
pub(crate) fn routes() -> Routes {
    use axum::http::Method;
    Routes::default()
        .read(Method::GET, "/api/admin/adapters", list)
        .write(Method::POST, "/api/admin/adapters", register)
        .write(Method::DELETE, "/api/admin/adapters/{id}", remove)
}
