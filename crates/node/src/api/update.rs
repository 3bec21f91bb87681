//! Updates (`/api/admin/update/*`, as admin-api.txt's "Updates"; the version
//! and update status are in `GET /api/admin/version`).

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde_json::{Value, json};

use super::AppState;
use super::error::ApiError;
use crate::update::UpdateError;

impl From<UpdateError> for ApiError {
    fn from(e: UpdateError) -> Self {
        let (status, code) = match &e {
            UpdateError::Unsupported(_) => (StatusCode::NOT_IMPLEMENTED, "UPDATES_UNSUPPORTED"),
            UpdateError::NoUpdate(_) => (StatusCode::CONFLICT, "NO_UPDATE"),
            UpdateError::Busy => (StatusCode::CONFLICT, "UPDATE_IN_PROGRESS"),
            UpdateError::Server(_) => (StatusCode::BAD_GATEWAY, "UPDATE_SERVER_ERROR"),
            UpdateError::Signature(_) => {
                (StatusCode::UNPROCESSABLE_ENTITY, "UPDATE_SIGNATURE_INVALID")
            }
            UpdateError::Install(_) => (StatusCode::INTERNAL_SERVER_ERROR, "UPDATE_INSTALL_FAILED"),
        };
        ApiError::new(status, code, e.to_string())
    }
}

/// `POST /api/admin/update/check`: asks the update source; a newer version is
/// also announced on the WebSocket (`update_available`).
pub(crate) async fn check(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    Ok(Json(match state.node.updates().check().await? {
        Some(a) => json!({
            "update_available": true,
            "current_version": a.current_version,
            "version": a.version,
            "changelog": a.notes,
            "pub_date": a.pub_date,
        }),
        None => json!({ "update_available": false, "current_version": crate::VERSION }),
    }))
}

/// `POST /api/admin/update/apply`: downloads the newer version, checks its
/// signature, installs it; it runs after a restart.
pub(crate) async fn apply(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let applied = state.node.updates().apply().await?;
    Ok(Json(json!({
        "status": "applied",
        "version": applied.version,
        "restart_required": applied.restart_required,
    })))
}

/// The update routes. Each route is declared read (public) or write (needs the key) here.
pub(super) fn routes() -> super::routes::Routes {
    use axum::http::Method;
    super::routes::Routes::default()
        // A check changes nothing but what the node knows; admin-api.txt asks
        // the key only of apply.
        .read(Method::POST, "/api/admin/update/check", check)
        .write(Method::POST, "/api/admin/update/apply", apply)
}
