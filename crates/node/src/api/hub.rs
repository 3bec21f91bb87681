//! `/api/admin/hf/*`: the Hugging Face catalog, probes of remote GGUFs, shard
//! downloads from the Hub, a model's Hub source and the Hub token.

use std::collections::HashMap;

use axum::Json;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};

use super::AppState;
use super::error::ApiError;
use super::extract::{ApiJson, Path};
use crate::hub::search::Fit;
use crate::hub::{HubError, is_repo_id, is_repo_path};
use crate::pipeline::hub_fetch::{HubFetch, HubFetchError, HubSource};

/// Maps a Hub failure to its status: the request's fault is 4xx, the Hub's 502.
pub(super) fn hub_error(e: HubError) -> ApiError {
    match e {
        HubError::Invalid(m) => ApiError::new(StatusCode::BAD_REQUEST, "INVALID_PARAMETER", m),
        HubError::NotFound(m) => ApiError::new(StatusCode::NOT_FOUND, "HF_NOT_FOUND", m),
        HubError::Gated(m) => ApiError::new(StatusCode::UNAUTHORIZED, "HF_GATED", m),
        HubError::RateLimited { retry_after } => ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "HF_RATE_LIMITED",
            "the Hugging Face Hub is rate limiting this node; try again later",
        )
        .with_details(json!({ "retry_after": retry_after.unwrap_or(60) })),
        HubError::BadFile(m) => ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "HF_BAD_FILE", m),
        HubError::Upstream(m) => ApiError::new(StatusCode::BAD_GATEWAY, "HF_UNAVAILABLE", m),
    }
}

/// Maps a failure to start a Hub download.
pub(super) fn hub_fetch_error(e: HubFetchError) -> ApiError {
    match e {
        HubFetchError::Hub(e) => hub_error(e),
        HubFetchError::Transfer(e) => super::models::transfer_error(e),
    }
}

fn hub(state: &AppState) -> Result<crate::hub::Hub, ApiError> {
    state.node.hub().map_err(hub_error)
}

async fn fit(state: &AppState) -> Fit {
    let context = state.node.config().context_size;
    tokio::task::spawn_blocking(move || Fit::here(context))
        .await
        .unwrap_or(Fit {
            memory_bytes: 0,
            vram: false,
            context,
        })
}

/// `GET /api/admin/hf/search?query=…&limit=…`
pub(crate) async fn search(
    State(state): State<AppState>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let query = q
        .get("query")
        .or_else(|| q.get("q"))
        .cloned()
        .unwrap_or_default();
    let limit = match q.get("limit") {
        Some(l) => l
            .parse::<usize>()
            .map_err(|_| ApiError::invalid_field("limit", "must be a whole number"))?,
        None => 10,
    };
    let fit = fit(&state).await;
    let results = hub(&state)?
        .search(&query, limit, &fit)
        .await
        .map_err(hub_error)?;
    Ok(Json(results))
}

fn required<'a>(q: &'a HashMap<String, String>, name: &str) -> Result<&'a str, ApiError> {
    q.get(name)
        .map(String::as_str)
        .filter(|v| !v.is_empty())
        .ok_or_else(|| ApiError::invalid_field(name, "is required"))
}

/// `GET /api/admin/hf/probe?repo_id=…&filename=…[&shards=N][&revision=…]`
pub(crate) async fn probe(
    State(state): State<AppState>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let repo_id = required(&q, "repo_id")?;
    let filename = required(&q, "filename")?;
    let shards = match q.get("shards") {
        Some(s) => Some(
            s.parse::<u32>()
                .map_err(|_| ApiError::invalid_field("shards", "must be a whole number"))?,
        ),
        None => None,
    };
    let probed = hub(&state)?
        .probe(repo_id, filename, q.get("revision").map(String::as_str))
        .await
        .map_err(hub_error)?;
    let fit = fit(&state).await;
    Ok(Json(probed.to_json(shards, &fit).map_err(hub_error)?))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct DownloadBody {
    repo_id: String,
    filename: String,
    #[serde(default)]
    revision: Option<String>,
    /// Shard count of the split (default: the probe's).
    #[serde(default)]
    shards: Option<u32>,
    #[serde(default)]
    shard_indices: Option<Vec<u32>>,
    #[serde(default)]
    peer_fair_share: bool,
    #[serde(default)]
    model_id: Option<String>,
}

/// `POST /api/admin/hf/download-shards`
pub(crate) async fn download_shards(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<DownloadBody>,
) -> Result<Json<Value>, ApiError> {
    if !is_repo_id(&body.repo_id) {
        return Err(ApiError::invalid_field("repo_id", "must be owner/name"));
    }
    if !is_repo_path(&body.filename) {
        return Err(ApiError::invalid_field(
            "filename",
            "must be a file path in the repository",
        ));
    }
    if body.shard_indices.is_some() && body.peer_fair_share {
        return Err(ApiError::invalid_field(
            "peer_fair_share",
            "give shard_indices or peer_fair_share, not both",
        ));
    }
    if let Some(id) = &body.model_id
        && !crate::shard::is_model_id(id)
    {
        return Err(ApiError::invalid_field(
            "model_id",
            "is not a usable model id",
        ));
    }
    if body.shards == Some(0) {
        return Err(ApiError::invalid_field("shards", "must be at least 1"));
    }
    let hub = hub(&state)?;
    let started = state
        .node
        .pipeline()
        .download_from_hub(
            &hub,
            HubFetch {
                repo_id: body.repo_id.clone(),
                filename: body.filename.clone(),
                revision: body.revision,
                shards: body.shards,
                shard_indices: body.shard_indices,
                fair_share: body.peer_fair_share,
                model_id: body.model_id,
            },
        )
        .await
        .map_err(hub_fetch_error)?;
    let mut v = serde_json::to_value(&started).unwrap_or_default();
    v["status"] = json!(if started.shard_indices.is_empty() {
        "already_local"
    } else {
        "downloading"
    });
    v["source"] = json!("huggingface");
    v["repo_id"] = json!(body.repo_id);
    v["filename"] = json!(body.filename);
    Ok(Json(v))
}

/// `GET /api/admin/hf/source/{id}`: the Hub source recorded for a model, else one
/// found by searching the Hub for its source file's name (then recorded).
pub(crate) async fn source(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    if !crate::shard::is_model_id(&id) {
        return Err(ApiError::invalid_field("id", "is not a model id"));
    }
    let pipeline = state.node.pipeline();
    if let Some(s) = pipeline.hub_source(&id) {
        return Ok(Json(source_json(&id, &s, "recorded")));
    }
    let Some(local) = pipeline
        .local_models()
        .into_iter()
        .find(|m| m.manifest.model_id == id)
    else {
        return Err(ApiError::not_found(format!(
            "model '{id}' is not on this node"
        )));
    };
    // Auto-discovery: a repository that lists a file of the same name and size
    // (the SHA-256 decides when the Hub names one).
    let file = local.manifest.source.file.clone();
    let stem = file.trim_end_matches(".gguf");
    let query: String = stem
        .split(['.', '-', '_'])
        .take(2)
        .collect::<Vec<_>>()
        .join(" ");
    let hub = hub(&state)?;
    let fit = fit(&state).await;
    let hits = hub.search(&query, 10, &fit).await.map_err(hub_error)?;
    for hit in hits.as_array().into_iter().flatten() {
        let Some(repo) = hit["repo_id"].as_str() else {
            continue;
        };
        let Ok(listing) = hub.listing(repo).await else {
            continue;
        };
        let found = listing.files.iter().find(|f| {
            f.path.rsplit('/').next() == Some(file.as_str())
                && f.size == Some(local.manifest.source.bytes)
                && f.sha256
                    .as_deref()
                    .is_none_or(|s| s == local.manifest.source.sha256)
        });
        if let Some(f) = found {
            let s = HubSource {
                repo_id: repo.to_string(),
                filename: f.path.clone(),
                commit: listing.sha.clone(),
                pending: Vec::new(),
            };
            pipeline
                .set_hub_source(&id, &s)
                .map_err(|e| ApiError::internal("recording the Hub source", e))?;
            return Ok(Json(source_json(&id, &s, "discovered")));
        }
    }
    Err(ApiError::not_found(format!(
        "no Hugging Face source is known or found for '{id}'"
    )))
}

fn source_json(id: &str, s: &HubSource, how: &str) -> Value {
    json!({
        "model_id": id,
        "repo_id": s.repo_id,
        "filename": s.filename,
        "commit": s.commit,
        "found_by": how,
    })
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TokenBody {
    token: Option<String>,
}

/// `PUT /api/admin/hf/token` `{"token": "hf_…"}` (or `null` to clear): kept with
/// the other secrets, never returned.
pub(crate) async fn put_token(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<TokenBody>,
) -> Result<Json<Value>, ApiError> {
    let token = body.token.filter(|t| !t.trim().is_empty());
    if let Some(t) = &token
        && (t.len() > 512 || !t.bytes().all(|b| b.is_ascii_graphic()))
    {
        return Err(ApiError::invalid_field("token", "is not a token"));
    }
    let node = state.node.clone();
    let set = token.is_some();
    tokio::task::spawn_blocking(move || node.set_hf_token(token.as_deref()))
        .await
        .map_err(|e| ApiError::internal("storing the token", e))?
        .map_err(|e| ApiError::internal("storing the token", e))?;
    Ok(Json(json!({ "status": "ok", "token_set": set })))
}

/// `GET /api/admin/hf/status`: the endpoint in use and whether a token is set.
pub(crate) async fn status(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let hub = hub(&state)?;
    Ok(Json(json!({
        "endpoint": hub.endpoint(),
        "token_set": state.node.has_hf_token(),
    })))
}

/// The Hub's routes.
pub(super) fn routes() -> super::routes::Routes {
    use axum::http::Method;
    super::routes::Routes::default()
        .read(Method::GET, "/api/admin/hf/search", search)
        .read(Method::GET, "/api/admin/hf/probe", probe)
        .read(Method::GET, "/api/admin/hf/source/{id}", source)
        .read(Method::GET, "/api/admin/hf/status", status)
        .write(
            Method::POST,
            "/api/admin/hf/download-shards",
            download_shards,
        )
        .write(Method::PUT, "/api/admin/hf/token", put_token)
}
