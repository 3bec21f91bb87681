//! One error type for every API failure, rendered the same way everywhere:
//! `{"error": {"code": "...", "message": "...", "details": {...}}}`.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

/// An API failure with its HTTP status.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Stable machine-readable code (`UNAUTHORIZED`, `INVALID_PARAMETER`, …).
    pub code: &'static str,
    /// Human-readable message.
    pub message: String,
    /// Extra context (`field`, `retry_after`, …).
    pub details: Option<Value>,
}

impl ApiError {
    /// A new error.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            details: None,
        }
    }

    /// Adds details.
    pub fn with_details(mut self, details: Value) -> Self {
        self.details = Some(details);
        self
    }

    /// Adds the keys of `extra` (an object) to the details, keeping existing ones.
    pub fn with_details_merged(mut self, extra: Value) -> Self {
        match (&mut self.details, extra) {
            (Some(Value::Object(map)), Value::Object(more)) => {
                for (k, v) in more {
                    map.entry(k).or_insert(v);
                }
            }
            (details @ None, extra) => *details = Some(extra),
            _ => {}
        }
        self
    }

    /// 400: malformed JSON.
    pub fn invalid_json(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "INVALID_JSON", message)
    }

    /// 400: a field is missing, has the wrong type, or an unknown value.
    pub fn invalid_field(field: impl Into<String>, message: impl Into<String>) -> Self {
        let field = field.into();
        let message = message.into();
        Self::new(
            StatusCode::BAD_REQUEST,
            "INVALID_FIELD",
            format!("{field}: {message}"),
        )
        .with_details(json!({ "field": field }))
    }

    /// 422: well-formed but semantically invalid.
    pub fn invalid_parameter(field: &str, message: impl Into<String>) -> Self {
        let message = message.into();
        Self::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "INVALID_PARAMETER",
            format!("{field}: {message}"),
        )
        .with_details(json!({ "field": field }))
    }

    /// 401.
    pub fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "UNAUTHORIZED",
            "missing or invalid API key: send `Authorization: Bearer <key>` (see `swarmllm` or GET /api/admin/api-key)",
        )
    }

    /// 403.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "FORBIDDEN", message)
    }

    /// 404.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "NOT_FOUND", message)
    }

    /// 429 with the seconds to wait.
    pub fn rate_limited(retry_after: u64) -> Self {
        Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            "RATE_LIMITED",
            "Too many requests",
        )
        .with_details(json!({ "retry_after": retry_after }))
    }

    /// 503: no model is loaded.
    pub fn no_model() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "NO_MODEL_LOADED",
            "no model is loaded on this node; start it with --model PATH",
        )
    }

    /// 500: logged in full, answered without internals.
    pub fn internal(context: &str, error: impl std::fmt::Display) -> Self {
        tracing::error!(%error, "{context}");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "INTERNAL",
            format!("internal error: {context}"),
        )
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.status.as_u16(),
            self.code,
            self.message
        )
    }
}

impl std::error::Error for ApiError {}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut error = json!({ "code": self.code, "message": self.message });
        if let Some(details) = &self.details {
            error["details"] = details.clone();
        }
        let retry_after = self
            .details
            .as_ref()
            .and_then(|d| d.get("retry_after"))
            .and_then(Value::as_u64);
        let mut response = (self.status, axum::Json(json!({ "error": error }))).into_response();
        if let Some(secs) = retry_after
            && let Ok(v) = HeaderValue::from_str(&secs.to_string())
        {
            response.headers_mut().insert(header::RETRY_AFTER, v);
        }
        if self.status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

/// A database failure behind a request is the node's (500), whichever table.
impl From<crate::store::StoreError> for ApiError {
    fn from(e: crate::store::StoreError) -> Self {
        ApiError::internal("database", e)
    }
}
