//! Cloud providers (see [`crate::providers`]): `GET/PUT /api/admin/providers`,
//! `GET /api/admin/provider-models`, `GET /api/admin/provider-health`,
//! `POST /api/admin/provider-model-status`, and the hand-off of a chat the
//! swarm cannot serve ([`proxy_chat`]).

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::AppState;
use super::error::ApiError;
use super::extract::ApiJson;
use super::routes::Routes;
use crate::Node;
use crate::providers::{
    CHAT_TIMEOUT, Endpoints, PROVIDERS, Protocol, Provider, ProviderModel, Providers, anthropic,
    provider,
};

/// Longest key accepted.
const MAX_KEY: usize = 512;
/// Most models one status request may probe (the spec's limit).
const MAX_STATUS_MODELS: usize = 20;
/// Largest non-streamed provider answer read.
const MAX_ANSWER_BYTES: usize = 16 << 20;

fn secrets_error(e: crate::secrets::SecretError) -> ApiError {
    ApiError::internal("provider keys", e)
}

/// Every provider with a key, as `name → (base URL, key)` (blocking reads).
async fn configured(node: &Node) -> Result<BTreeMap<&'static str, (String, String)>, ApiError> {
    let n = node.clone();
    super::blocking("provider keys", move || {
        Ok::<_, ApiError>(
            n.providers()
                .configured(n.secrets(), Endpoints::of(&n.config()))
                .into_iter()
                .map(|(p, base, key)| (p.name, (base, key)))
                .collect(),
        )
    })
    .await
}

/// `GET /api/admin/providers`: every provider, whether it has a key (never
/// the key), and its base URL.
async fn list(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let with_keys = configured(&state.node).await?;
    let config = state.node.config();
    let endpoints = Endpoints::of(&config);
    let providers: Vec<Value> = PROVIDERS
        .iter()
        .map(|p| {
            json!({
                "provider": p.name,
                "name": p.label,
                "configured": with_keys.contains_key(p.name),
                "base_url": Providers::base_url(p, endpoints),
            })
        })
        .collect();
    Ok(Json(json!({ "providers": providers })))
}

/// `PUT /api/admin/providers` `{"openai": "sk-…", "groq": null}`: sets keys
/// (a null or empty value removes one); answers the list.
async fn update(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<Value>,
) -> Result<Json<Value>, ApiError> {
    let Some(map) = body.as_object() else {
        return Err(ApiError::invalid_field(
            "<root>",
            "must be an object of provider names to keys",
        ));
    };
    let mut changes = Vec::new();
    for (name, value) in map {
        let p = provider(name).ok_or_else(|| {
            ApiError::invalid_field(name.as_str(), "is not a provider this node knows")
        })?;
        let key = match value {
            Value::Null => None,
            Value::String(s) if s.is_empty() => None,
            Value::String(s) if s.len() <= MAX_KEY && s.chars().all(|c| c.is_ascii_graphic()) => {
                Some(s.clone())
            }
            _ => {
                return Err(ApiError::invalid_field(
                    name.as_str(),
                    format!("must be a key (up to {MAX_KEY} printable characters) or null"),
                ));
            }
        };
        changes.push((p.name, key));
    }
    let node = state.node.clone();
    super::blocking("provider keys", move || {
        for (name, key) in &changes {
            node.providers()
                .set_key(node.secrets(), name, key.as_deref())
                .map_err(secrets_error)?;
            tracing::info!(provider = name, set = key.is_some(), "provider key changed");
        }
        Ok::<_, ApiError>(())
    })
    .await?;
    list(State(state)).await
}

/// Fetches every configured provider's models and caches them.
async fn refresh(node: &Node) -> Result<Arc<Vec<ProviderModel>>, ApiError> {
    let with_keys = configured(node).await?;
    let providers = node.providers();
    let lists = with_keys.iter().filter_map(|(name, (base, key))| {
        let p = provider(name)?;
        Some(providers.list(p, base, key))
    });
    let models: Vec<ProviderModel> = futures::future::join_all(lists)
        .await
        .into_iter()
        .flatten()
        .collect();
    Ok(providers.store_models(models))
}

/// The cached models: fresh, or stale with a refresh started behind it, or
/// fetched now when there is no list yet.
async fn models_now(node: &Node) -> Result<Arc<Vec<ProviderModel>>, ApiError> {
    let providers = node.providers();
    match providers.cached_models() {
        Some((models, false)) => Ok(models),
        Some((models, true)) => {
            if providers.begin_refresh() {
                let n = node.clone();
                tokio::spawn(async move {
                    if refresh(&n).await.is_err() {
                        n.providers().end_refresh();
                    }
                });
            }
            Ok(models)
        }
        None => {
            let _ = providers.begin_refresh();
            let got = refresh(node).await;
            if got.is_err() {
                providers.end_refresh();
            }
            got
        }
    }
}

/// `GET /api/admin/provider-models`
async fn models(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let models = models_now(&state.node).await?;
    Ok(Json(json!({ "models": *models })))
}

/// `GET /api/admin/provider-health`: a one-token chat to each configured
/// provider, all at once.
async fn health(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let node = &state.node;
    let with_keys = configured(node).await?;
    let cached = node.providers().cached_models();
    let probes = with_keys.iter().filter_map(|(name, (base, key))| {
        let p = provider(name)?;
        let model = if p.probe_model.is_empty() {
            cached
                .as_ref()
                .and_then(|(m, _)| m.iter().find(|m| m.provider == p.name))
                .map(|m| m.id.clone())
                .unwrap_or_default()
        } else {
            p.probe_model.to_string()
        };
        let providers = node.providers();
        Some(async move {
            let probe = providers.probe(p, base, key, &model).await;
            json!({ "provider": p.name, "status": probe.status, "latency_ms": probe.latency_ms,
                    "detail": probe.detail })
        })
    });
    let providers: Vec<Value> = futures::future::join_all(probes).await;
    Ok(Json(json!({ "providers": providers })))
}

/// `POST /api/admin/provider-model-status` `{"models": [...]}` (at most 20).
async fn model_status(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<Value>,
) -> Result<Json<Value>, ApiError> {
    let wanted: Vec<String> = body["models"]
        .as_array()
        .ok_or_else(|| ApiError::invalid_field("models", "must be a list of model ids"))?
        .iter()
        .map(|m| m.as_str().map(str::to_string))
        .collect::<Option<_>>()
        .ok_or_else(|| ApiError::invalid_field("models", "must be a list of model ids"))?;
    if wanted.len() > MAX_STATUS_MODELS {
        return Err(ApiError::invalid_parameter(
            "models",
            format!("at most {MAX_STATUS_MODELS} models per request"),
        ));
    }
    let node = &state.node;
    let with_keys = configured(node).await?;
    let cached = models_now(node).await?;
    let probes = wanted.into_iter().map(|model| {
        let route = crate::providers::route(&model, &cached, &with_keys);
        let providers = node.providers();
        let with_keys = &with_keys;
        async move {
            let Some((p, id)) = route else {
                return json!({ "model": model, "status": "unavailable", "latency_ms": null });
            };
            let Some((base, key)) = with_keys.get(p.name) else {
                return json!({ "model": model, "status": "unavailable", "latency_ms": null });
            };
            let probe = providers.probe(p, base, key, &id).await;
            // The spec's words for a model: no overloaded or unreachable.
            let status = match probe.status.as_str() {
                "up" | "rate_limited" | "not_found" | "timeout" => probe.status.clone(),
                "overloaded" | "unreachable" => "unavailable".to_string(),
                _ => "error".to_string(),
            };
            json!({ "model": model, "provider": p.name, "status": status, "latency_ms": probe.latency_ms })
        }
    });
    let models: Vec<Value> = futures::future::join_all(probes).await;
    Ok(Json(json!({ "models": models })))
}

/// Hands a chat the swarm cannot serve to the provider that has `model`, if
/// any (`None`: no provider does). The answer names the provider
/// (`"provider"` in a body, the `x-swarmllm-provider` header on a stream).
pub(crate) async fn proxy_chat(
    node: &Node,
    model: &str,
    body: &Value,
) -> Result<Option<Response>, ApiError> {
    let with_keys = configured(node).await?;
    if with_keys.is_empty() {
        return Ok(None);
    }
    let cached = models_now(node).await?;
    let Some((p, id)) = crate::providers::route(model, &cached, &with_keys) else {
        return Ok(None);
    };
    let Some((base, key)) = with_keys.get(p.name) else {
        return Ok(None);
    };
    let upstream_body = match p.protocol {
        Protocol::OpenAi => {
            let mut b = body.clone();
            b["model"] = json!(id);
            b
        }
        Protocol::Anthropic => anthropic::request(body, &id)
            .map_err(|u| ApiError::invalid_parameter(u.field, u.message))?,
    };
    let stream = body["stream"] == true;
    tracing::info!(provider = p.name, model = %id, "a chat goes to a cloud provider");
    let sent = node
        .providers()
        .chat_request(p, base, key, &upstream_body)
        .timeout(CHAT_TIMEOUT)
        .send()
        .await
        .map_err(|e| upstream_error(p, &e))?;
    let status = sent.status();
    if !status.is_success() {
        return Err(status_error(p, status, sent.headers()));
    }
    if stream {
        let body = match p.protocol {
            Protocol::OpenAi => Body::from_stream(sent.bytes_stream()),
            Protocol::Anthropic => {
                let include_usage = body["stream_options"]["include_usage"] == true;
                Body::from_stream(translated(sent, include_usage))
            }
        };
        let mut response = body.into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream"),
        );
        headers.insert("x-swarmllm-provider", HeaderValue::from_static(p.name));
        return Ok(Some(response));
    }
    if sent
        .content_length()
        .is_some_and(|n| n > MAX_ANSWER_BYTES as u64)
    {
        return Err(garbage(p, "an answer too large"));
    }
    let bytes = sent.bytes().await.map_err(|e| upstream_error(p, &e))?;
    if bytes.len() > MAX_ANSWER_BYTES {
        return Err(garbage(p, "an answer too large"));
    }
    let answer: Value =
        serde_json::from_slice(&bytes).map_err(|_| garbage(p, "an answer that is not JSON"))?;
    let mut answer = match p.protocol {
        Protocol::OpenAi => answer,
        Protocol::Anthropic => anthropic::answer(&answer)
            .ok_or_else(|| garbage(p, "an answer that is not a message"))?,
    };
    if !answer["choices"].is_array() {
        return Err(garbage(p, "an answer without choices"));
    }
    answer["provider"] = json!(p.name);
    let mut response = Json(answer).into_response();
    response
        .headers_mut()
        .insert("x-swarmllm-provider", HeaderValue::from_static(p.name));
    Ok(Some(response))
}

/// Anthropic's event stream as OpenAI chunks (see
/// [`anthropic::StreamTranslator`]); a stream cut short ends with an error
/// frame.
fn translated(
    sent: reqwest::Response,
    include_usage: bool,
) -> impl futures::Stream<Item = Result<axum::body::Bytes, std::convert::Infallible>> {
    use futures::StreamExt;
    let state = (
        sent.bytes_stream(),
        anthropic::StreamTranslator::new(include_usage),
    );
    futures::stream::unfold(state, |(mut upstream, mut t)| async move {
        if t.done() {
            return None;
        }
        let frames = match upstream.next().await {
            Some(Ok(bytes)) => t.push(&bytes),
            Some(Err(_)) | None => t.finish(),
        };
        Some((Ok(axum::body::Bytes::from(frames)), (upstream, t)))
    })
}

fn garbage(p: &Provider, what: &str) -> ApiError {
    ApiError::new(
        StatusCode::BAD_GATEWAY,
        "PROVIDER_ERROR",
        format!("{} sent {what}", p.label),
    )
    .with_details(json!({ "provider": p.name }))
}

fn upstream_error(p: &Provider, e: &reqwest::Error) -> ApiError {
    let (status, code, what) = if e.is_timeout() {
        (
            StatusCode::GATEWAY_TIMEOUT,
            "PROVIDER_TIMEOUT",
            "did not answer in time",
        )
    } else if e.is_connect() {
        (
            StatusCode::BAD_GATEWAY,
            "PROVIDER_UNREACHABLE",
            "could not be reached",
        )
    } else {
        (StatusCode::BAD_GATEWAY, "PROVIDER_ERROR", "failed")
    };
    ApiError::new(status, code, format!("{} {what}", p.label))
        .with_details(json!({ "provider": p.name }))
}

fn status_error(
    p: &Provider,
    status: StatusCode,
    headers: &reqwest::header::HeaderMap,
) -> ApiError {
    let details = |extra: Value| {
        let mut d = json!({ "provider": p.name, "upstream_status": status.as_u16() });
        if let (Some(d), Some(e)) = (d.as_object_mut(), extra.as_object()) {
            d.extend(e.clone());
        }
        d
    };
    match status.as_u16() {
        429 => {
            let retry_after = headers
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(1)
                .clamp(1, 3600);
            ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "PROVIDER_RATE_LIMITED",
                format!(
                    "{} is rate limiting this node's key; try again later",
                    p.label
                ),
            )
            .with_details(details(json!({ "retry_after": retry_after })))
        }
        401 | 403 => ApiError::new(
            StatusCode::BAD_GATEWAY,
            "PROVIDER_AUTH",
            format!("{} refused this node's key", p.label),
        )
        .with_details(details(json!({}))),
        503 | 529 => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "PROVIDER_OVERLOADED",
            format!("{} is overloaded; try again later", p.label),
        )
        .with_details(details(json!({}))),
        404 => ApiError::new(
            StatusCode::NOT_FOUND,
            "MODEL_NOT_FOUND",
            format!("{} does not have that model", p.label),
        )
        .with_details(details(json!({}))),
        _ => ApiError::new(
            StatusCode::BAD_GATEWAY,
            "PROVIDER_ERROR",
            format!("{} answered {status}", p.label),
        )
        .with_details(details(json!({}))),
    }
}

/// The provider routes. The listings are public like the node's other
/// listings; setting keys and the probes (which spend the keys' credit) need
/// the node's key.
pub(crate) fn routes() -> Routes {
    use axum::http::Method;
    Routes::default()
        .read(Method::GET, "/api/admin/providers", list)
        .write(Method::PUT, "/api/admin/providers", update)
        .read(Method::GET, "/api/admin/provider-models", models)
        .write(Method::GET, "/api/admin/provider-health", health)
        .write(
            Method::POST,
            "/api/admin/provider-model-status",
            model_status,
        )
}
