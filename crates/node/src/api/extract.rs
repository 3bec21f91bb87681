//! Request plumbing shared by every route: the JSON extractor, bearer auth and the
//! per-key rate limit.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use axum::extract::{FromRequest, Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::Response;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde::de::DeserializeOwned;

use super::AppState;
use super::error::ApiError;

/// A JSON body. Unlike `axum::Json` it ignores the content type (so `curl -d` works),
/// enforces the configured body limit (413), and reports malformed JSON (400
/// `INVALID_JSON`) and bad fields (400 `INVALID_FIELD`, naming the field) in the API's
/// error shape.
#[derive(Debug)]
pub(crate) struct ApiJson<T>(pub(crate) T);

impl<T: DeserializeOwned> FromRequest<AppState> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, ApiError> {
        let limit = state.node.config().max_body_bytes as usize;
        let body = match Limited::new(req.into_body(), limit).collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => {
                return Err(ApiError::new(
                    axum::http::StatusCode::PAYLOAD_TOO_LARGE,
                    "PAYLOAD_TOO_LARGE",
                    format!("request body is larger than {limit} bytes"),
                ));
            }
            Err(e) => {
                return Err(ApiError::invalid_json(format!(
                    "could not read the request body: {e}"
                )));
            }
        };
        parse_json(&body).map(ApiJson)
    }
}

/// Path parameters, like `axum::extract::Path` but rejected in the API's error
/// shape: `…/shards/-1/download` is a 400 `INVALID_PATH` JSON body naming the
/// parameter, never plain text.
#[derive(Debug, axum::extract::FromRequestParts)]
#[from_request(via(axum::extract::Path), rejection(ApiError))]
pub(crate) struct Path<T>(pub(crate) T);

impl From<axum::extract::rejection::PathRejection> for ApiError {
    fn from(e: axum::extract::rejection::PathRejection) -> Self {
        ApiError::new(
            axum::http::StatusCode::BAD_REQUEST,
            "INVALID_PATH",
            e.body_text(),
        )
    }
}

/// Parses a JSON body into `T`, mapping errors to the API's shape.
pub(crate) fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    use serde_json::error::Category;
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::invalid_json(
            "the request body must be a JSON object",
        ));
    }
    let mut de = serde_json::Deserializer::from_slice(body);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        match inner.classify() {
            Category::Syntax | Category::Eof | Category::Io => {
                ApiError::invalid_json(format!("malformed JSON: {inner}"))
            }
            Category::Data => {
                let message = strip_position(&inner.to_string());
                let field = if path == "." {
                    missing_field_name(&message).unwrap_or_else(|| "<body>".into())
                } else {
                    path
                };
                ApiError::invalid_field(field, message)
            }
        }
    })?;
    de.end()
        .map_err(|e| ApiError::invalid_json(format!("malformed JSON: {e}")))?;
    Ok(value)
}

/// Deserializes one view of an already-parsed body (bodies that several structs
/// read parts of), with the same error mapping as [`parse_json`].
pub(crate) fn from_value<T: DeserializeOwned>(value: &serde_json::Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let message = strip_position(&e.into_inner().to_string());
        let field = if path == "." {
            missing_field_name(&message).unwrap_or_else(|| "<body>".into())
        } else {
            path
        };
        ApiError::invalid_field(field, message)
    })
}

fn strip_position(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(i) => message[..i].to_string(),
        None => message.to_string(),
    }
}

fn missing_field_name(message: &str) -> Option<String> {
    let rest = message.strip_prefix("missing field `")?;
    Some(rest.split('`').next()?.to_string())
}

/// Middleware: requires `Authorization: Bearer <api key>` and applies the per-key
/// rate limit.
pub(crate) async fn require_auth(
    State(state): State<AppState>,
    req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let Some(token) = bearer(req.headers()).filter(|t| state.node.api_key_matches(t)) else {
        return Err(ApiError::unauthorized());
    };
    let per_minute = state.node.config().rate_limit_per_minute;
    if let Err(retry_after) = state.limiter.check(&format!("key:{token}"), per_minute) {
        return Err(ApiError::rate_limited(retry_after));
    }
    Ok(next.run(req).await)
}

/// Who made an inference request: [`crate::infer::NODE_CLIENT`] for the node's
/// own key, else the client key's id. Put in the request's extensions by
/// [`require_client`].
#[derive(Debug, Clone)]
pub(crate) struct Client(pub(crate) String);

/// Middleware of the inference routes: the node's key or a client key, each
/// with its own rate-limit bucket; the handler learns which as [`Client`].
pub(crate) async fn require_client(
    State(state): State<AppState>,
    mut req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let token = bearer(req.headers()).ok_or_else(ApiError::unauthorized)?;
    let client = if state.node.api_key_matches(token) {
        crate::infer::NODE_CLIENT.to_string()
    } else {
        let key = state
            .node
            .client_keys()
            .lookup(token)
            .ok_or_else(ApiError::unauthorized)?;
        key.id
    };
    let per_minute = state.node.config().rate_limit_per_minute;
    if let Err(retry_after) = state.limiter.check(&format!("client:{client}"), per_minute) {
        return Err(ApiError::rate_limited(retry_after));
    }
    req.extensions_mut().insert(Client(client));
    Ok(next.run(req).await)
}

/// Callers whose bucket is kept (keys and client addresses together).
const MAX_BUCKETS: usize = 4096;

/// Middleware of the public routes: `public_rate_limit_per_minute` requests a
/// minute per client address (the API is meant for this machine and its LAN, so
/// a client flooding status reads is refused rather than served).
pub(crate) async fn limit_public(
    State(state): State<AppState>,
    req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let client = req
        .extensions()
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|c| c.0.ip().to_string())
        .unwrap_or_default();
    let per_minute = state.node.config().public_rate_limit_per_minute;
    if let Err(retry_after) = state.limiter.check(&format!("public:{client}"), per_minute) {
        return Err(ApiError::rate_limited(retry_after));
    }
    Ok(next.run(req).await)
}

/// Whether the request carries the node's API key (for reads that cost more
/// when asked for, such as `?verify=true`).
pub(crate) fn has_key(state: &AppState, headers: &axum::http::HeaderMap) -> bool {
    bearer(headers).is_some_and(|t| state.node.api_key_matches(t))
}

/// The token of an `Authorization: Bearer …` header.
fn bearer(headers: &axum::http::HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, token) = v.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        })
}

/// Token buckets per API key: `per_minute` requests a minute, bursts up to
/// `per_minute`.
#[derive(Debug, Default)]
pub(crate) struct RateLimiter {
    buckets: Mutex<HashMap<[u8; 32], Bucket>>,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    updated: Instant,
    per_minute: u32,
}

impl RateLimiter {
    /// Takes one token for `key`, or says how many seconds until one is free.
    pub(crate) fn check(&self, key: &str, per_minute: u32) -> Result<(), u64> {
        if per_minute == 0 {
            return Ok(());
        }
        // Keys are held only as hashes.
        let id = *blake3::hash(key.as_bytes()).as_bytes();
        let now = Instant::now();
        let rate = per_minute as f64 / 60.0;
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if buckets.len() >= MAX_BUCKETS && !buckets.contains_key(&id) {
            // Full buckets refill within a minute: those idle that long are
            // the same as new ones and can go.
            buckets.retain(|_, b| now.duration_since(b.updated).as_secs() < 60);
            if buckets.len() >= MAX_BUCKETS {
                return Err(1);
            }
        }
        let bucket = buckets.entry(id).or_insert(Bucket {
            tokens: per_minute as f64,
            updated: now,
            per_minute,
        });
        if bucket.per_minute != per_minute {
            // The limit was reconfigured: start over at the new capacity.
            bucket.tokens = bucket.tokens.min(per_minute as f64);
            bucket.per_minute = per_minute;
        }
        let elapsed = now.duration_since(bucket.updated).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * rate).min(per_minute as f64);
        bucket.updated = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            Err(((1.0 - bucket.tokens) / rate).ceil().max(1.0) as u64)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limiter_allows_burst_then_refuses_with_retry_after() {
        let l = RateLimiter::default();
        for _ in 0..3 {
            assert!(l.check("k", 3).is_ok());
        }
        let retry = l.check("k", 3).unwrap_err();
        assert!((1..=20).contains(&retry), "{retry}");
        assert!(l.check("other", 3).is_ok());
        assert!(l.check("k", 0).is_ok());
    }

    #[test]
    fn json_errors_name_the_field() {
        #[derive(serde::Deserialize, Debug)]
        #[allow(dead_code)]
        struct Body {
            messages: Vec<String>,
            max_tokens: Option<i64>,
        }
        let e = parse_json::<Body>(b"{").unwrap_err();
        assert_eq!(e.code, "INVALID_JSON");
        let e = parse_json::<Body>(b"{}").unwrap_err();
        assert_eq!(e.code, "INVALID_FIELD");
        assert_eq!(e.details.unwrap()["field"], "messages");
        let e = parse_json::<Body>(br#"{"messages":[],"max_tokens":"x"}"#).unwrap_err();
        assert_eq!(e.details.unwrap()["field"], "max_tokens");
        let e = parse_json::<Body>(b"").unwrap_err();
        assert_eq!(e.code, "INVALID_JSON");
    }
}
