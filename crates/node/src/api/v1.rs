//! The `/api/v1` surface of neuroshard-http-api.txt: inference, status, health,
//! metrics.

use axum::Json;
use axum::extract::{Extension, State};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use super::AppState;
use super::error::ApiError;
use super::extract::{ApiJson, Client, from_value};
use super::generate::{self, SamplingDefaults, SamplingFields};
use super::openai::{GenInfo, StreamPiece, sse};
use crate::infer::ChatTurn;

#[derive(Debug, Deserialize)]
pub(crate) struct InferenceRequest {
    prompt: String,
    model: Option<String>,
    #[serde(default)]
    stream: bool,
    /// Send `prompt` to the model as-is instead of as a user chat turn.
    #[serde(default)]
    raw: bool,
    system: Option<String>,
}

/// `POST /api/v1/inference`. Like Ollama's `/api/generate`, the prompt is sent as a
/// user turn through the model's chat template unless `raw` is true.
pub(crate) async fn inference(
    State(state): State<AppState>,
    Extension(client): Extension<Client>,
    ApiJson(body): ApiJson<Value>,
) -> Result<Response, ApiError> {
    let req: InferenceRequest = from_value(&body)?;
    let sampling: SamplingFields = from_value(&body)?;
    let node = &state.node;
    let asked = generate::requested_model(req.model.as_deref(), &body)?;
    let model = generate::resolve_model(node, asked.as_deref()).await?;
    if req.prompt.is_empty() {
        return Err(ApiError::invalid_parameter("prompt", "must not be empty"));
    }
    // Defaults from the reference: max_tokens 100, temperature 1.0, top_p 1.0, top_k 50.
    let params = sampling.into_params(SamplingDefaults {
        max_tokens: 100,
        temperature: 1.0,
        top_p: 1.0,
        top_k: 50,
    })?;
    let prompt = if req.raw {
        req.prompt
    } else {
        let mut turns = Vec::new();
        if let Some(system) = req.system {
            turns.push(ChatTurn {
                role: "system".into(),
                content: system,
            });
        }
        turns.push(ChatTurn {
            role: "user".into(),
            content: req.prompt,
        });
        generate::render_chat(node, &model, &turns).await?
    };
    let id = format!("inf_{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let generation = generate::start(
        node,
        "/api/v1/inference",
        &client.0,
        id,
        model,
        prompt,
        params,
    )
    .await?;

    if req.stream {
        let mut index = 0u64;
        return Ok(sse(
            vec![generation],
            move |_: &GenInfo, _, piece| match piece {
                StreamPiece::Begin => vec![],
                StreamPiece::Text { text, .. } => {
                    let v = json!({ "token": text, "index": index });
                    index += 1;
                    vec![v]
                }
                StreamPiece::End {
                    finish_reason,
                    usage,
                    timing,
                    total_ms,
                    cost,
                } => vec![json!({
                    "token": "[DONE]",
                    "finish_reason": finish_reason,
                    "usage": usage,
                    "cost": cost_json(cost),
                    "timing": { "queue_ms": timing.queue_ms, "inference_ms": timing.inference_ms, "total_ms": total_ms, "route": timing.route },
                })],
            },
            false,
        ));
    }
    let id = generation.id.clone();
    let done = generation.collect().await?;
    Ok(Json(json!({
        "id": id,
        "text": done.text,
        "tokens_generated": done.usage.completion_tokens,
        "finish_reason": done.finish_reason.as_str(),
        "usage": done.usage,
        "cost": cost_json(done.cost),
        "timing": {
            "queue_ms": done.timing.queue_ms,
            "inference_ms": done.timing.inference_ms,
            "route": done.timing.route,
            "total_ms": done.total_ms,
        },
    }))
    .into_response())
}

/// The spec's `cost`: what the answer cost this node in credits, at the rates
/// of the nodes that worked on it (0 when it ran here).
fn cost_json(micro: i64) -> Value {
    json!({ "amount": crate::credits::to_credits(micro), "currency": "credits" })
}

/// `GET /api/v1/status`
pub(crate) async fn status(State(state): State<AppState>) -> Json<Value> {
    let node = &state.node;
    let (model, layers) = match node.engine() {
        Some(e) => (
            json!(e.info().id),
            (0..e.info().n_layers).collect::<Vec<_>>(),
        ),
        None => (Value::Null, Vec::new()),
    };
    let (cpu_percent, ram_used) = state.process_usage().await;
    let gpus = state.gpus().await;
    Json(json!({
        "node_id": node.node_id(),
        "version": crate::VERSION,
        "uptime_seconds": node.uptime().as_secs(),
        "status": if node.engine().is_some() { "running" } else { "idle" },
        "role": if node.engine().is_some() { "worker" } else { "client" },
        "model": model,
        "layers": layers,
        "peer_count": node.network().map(|n| n.connected().len()).unwrap_or(0),
        "queue_depth": node.engine().map(|e| e.queue_depth()).unwrap_or(0),
        "resources": {
            "gpu_memory_used": gpus.iter().map(|g| g.memory_total.saturating_sub(g.memory_free)).sum::<u64>(),
            "gpu_memory_total": gpus.iter().map(|g| g.memory_total).sum::<u64>(),
            "cpu_percent": cpu_percent,
            "ram_used": ram_used,
        },
    }))
}

/// `GET /api/v1/health`
pub(crate) async fn health(State(state): State<AppState>) -> Json<Value> {
    let node = state.node.clone();
    let storage_ok = tokio::task::spawn_blocking(move || node.store().schema_version().is_ok())
        .await
        .unwrap_or(false);
    let gpus = state.gpus().await;
    let model_ok = state.node.engine().is_some();
    Json(json!({
        "healthy": storage_ok,
        "checks": {
            "gpu": if gpus.is_empty() { "none" } else { "ok" },
            "network": match state.node.network() {
                Some(n) if !n.connected().is_empty() => "ok",
                Some(_) => "no_peers",
                None => "disabled",
            },
            "storage": if storage_ok { "ok" } else { "error" },
            "peers": state.node.network().map(|n| n.connected().len()).unwrap_or(0),
            "model": if model_ok { "ok" } else { "not_loaded" },
        }
    }))
}

/// `GET /api/v1/metrics`: the spec's `inference`, `network` and `rewards`
/// blocks, each field measured (there is no training, so no `training` block;
/// libp2p's own byte counts are not kept, so `network` has the pipeline's).
pub(crate) async fn metrics(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let node = &state.node;
    let network = node.network().map(|n| {
        json!({
            "active_connections": n.connected().len(),
            "rpc_calls": n.counters()["requests_served"],
            "pipeline_bytes": node.pipeline().wire_bytes(),
        })
    });
    let ledger = node.credits().ledger().clone();
    let midnight = chrono::Utc::now()
        .date_naive()
        .and_hms_opt(0, 0, 0)
        .map(|t| t.and_utc().timestamp())
        .unwrap_or(0);
    let (balance, today, pending) = super::blocking("credit ledger", move || {
        Ok::<_, crate::credits::LedgerError>((
            ledger.balance()?,
            ledger.earned_since(midnight)?,
            ledger.pending_total()?,
        ))
    })
    .await?;
    let to_credits = crate::credits::to_credits;
    let mut v = json!({
        "timestamp": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        "inference": node.metrics().summary(),
        "rewards": {
            // Since midnight UTC.
            "earned_today": to_credits(today),
            "earned_total": to_credits(balance.earned),
            // Owed to this node's pool owner and not yet accepted by it.
            "pending": to_credits(pending),
        },
    });
    if let Some(n) = network {
        v["network"] = n;
    }
    Ok(Json(v))
}

/// The `/api/v1` status and inference API. Each route is declared read (public) or write (needs the key) here.
pub(super) fn routes() -> super::routes::Routes {
    use axum::http::Method;
    super::routes::Routes::default()
        .read(Method::GET, "/api/v1/status", status)
        .read(Method::GET, "/api/v1/health", health)
        .read(Method::GET, "/api/v1/metrics", metrics)
        .infer(Method::POST, "/api/v1/inference", inference)
}
