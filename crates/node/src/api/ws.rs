//! `GET /api/admin/ws`: live updates for dashboards.
//!
//! Every 2 s a `stats_update` (peer count, queue, request counters, credits, private
//! mode, auto-manage counters, the shard registry, swarm capacity and the
//! wishlist); a `peer_list` snapshot on connect and whenever the set of connected
//! peers changes; an `activity_event` for each auto-manage action; and
//! `models_changed` whenever the models on disk or in memory change (a download,
//! load, unload or prune); and `update_available` (version, changelog) when an
//! update check finds a newer version, and on connect while one is on offer.
//! Messages are JSON: `{"type": "...", "data": {...}, "timestamp": "..."}`.
//! Browsers cannot send a bearer header on a WebSocket, so the route is read-only
//! and checks the `Origin` header against the same allow-list as CORS.

use std::collections::BTreeSet;
use std::time::Duration;

use axum::extract::State;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::http::HeaderMap;
use axum::response::Response;
use serde_json::{Value, json};

use super::AppState;
use super::error::ApiError;

const STATS_EVERY: Duration = Duration::from_secs(2);

/// Upgrades to a WebSocket after checking the origin.
pub(crate) async fn upgrade(
    State(state): State<AppState>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    if let Some(origin) = headers.get("origin").and_then(|o| o.to_str().ok())
        && !super::origin_allowed(&state.node, origin)
    {
        return Err(ApiError::forbidden(format!(
            "origin {origin} is not allowed"
        )));
    }
    Ok(ws.on_upgrade(move |socket| run(state, socket)))
}

fn message(kind: &str, data: Value) -> Message {
    let text = json!({
        "type": kind,
        "data": data,
        "timestamp": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
    })
    .to_string();
    Message::Text(text.into())
}

fn stats(state: &AppState) -> Value {
    let node = &state.node;
    json!({
        "node_id": node.node_id(),
        "uptime_seconds": node.uptime().as_secs(),
        "peer_count": node.network().map(|n| n.connected().len()).unwrap_or(0),
        "queue_depth": node.engine().map(|e| e.queue_depth()).unwrap_or(0),
        "model": node.engine().map(|e| e.info().id.clone()),
        "inference": node.metrics().summary(),
        "credits": credits_json(node.credits().summary()),
        "private_mode": node.private_mode().enabled,
        "acquisitions": node.swarm().counters(),
        "contributing": node.swarm().contributing(),
    })
}

/// The swarm part of `stats_update`: the shard registry (what this node holds),
/// swarm capacity (nodes and bytes against the budget) and the wishlist (shards
/// below their replication target).
async fn swarm_stats(state: &AppState) -> Value {
    let view = crate::swarm::recent_view(&state.node, STATS_EVERY).await;
    let registry: Vec<Value> = view
        .models
        .iter()
        .filter(|m| m.shards.iter().any(|s| s.held_here))
        .map(|m| {
            json!({
                "model_id": m.model_id,
                "shards": m.shards.iter().filter(|s| s.held_here).map(|s| s.index).collect::<Vec<_>>(),
            })
        })
        .collect();
    let wishlist: Vec<Value> = view
        .models
        .iter()
        .filter(|m| m.trust.may_acquire())
        .flat_map(|m| {
            m.shards
                .iter()
                .filter(|s| s.holders < m.target)
                .map(move |s| {
                    json!({
                        "model_id": m.model_id,
                        "shard_index": s.index,
                        "holders": s.holders,
                        "target": m.target,
                        "trust_level": m.trust.as_str(),
                    })
                })
        })
        .take(100)
        .collect();
    json!({
        "shard_registry": registry,
        "swarm_capacity": {
            "nodes": view.nodes(),
            "auto_manage_peers": view.auto_peers.len(),
            "auto_manage_free_mb": view.auto_peers.values().map(|b| b / 1_048_576).sum::<u64>(),
            "disk_used_mb": mb(view.used_bytes),
            "disk_budget_mb": view.budget_bytes.map(mb),
        },
        "wishlist": wishlist,
    })
}

fn mb(bytes: u64) -> f64 {
    (bytes as f64 / 1_048_576.0 * 10.0).round() / 10.0
}

/// What `models_changed` watches: the models on disk and the ranges in memory.
fn models_fingerprint(state: &AppState) -> Vec<(String, Vec<u32>, usize)> {
    let pipeline = state.node.pipeline();
    let ranges = pipeline.host().ranges();
    let mut out: Vec<(String, Vec<u32>, usize)> = pipeline
        .local_models()
        .into_iter()
        .map(|m| {
            let loaded = ranges
                .iter()
                .filter(|r| r.model_id == m.manifest.model_id)
                .count();
            (m.manifest.model_id, m.held, loaded)
        })
        .collect();
    out.sort();
    out
}

async fn full_stats(state: &AppState) -> Value {
    let mut v = stats(state);
    if let (Some(obj), Value::Object(extra)) = (v.as_object_mut(), swarm_stats(state).await) {
        obj.extend(extra);
    }
    v
}

fn peers(state: &AppState) -> (BTreeSet<String>, Value) {
    let connected = state
        .node
        .network()
        .map(|n| n.connected())
        .unwrap_or_default();
    let ids = connected.iter().map(|c| c.node_id.clone()).collect();
    (ids, json!({ "peers": connected }))
}

async fn run(state: AppState, mut socket: WebSocket) {
    let (mut last_ids, snapshot) = peers(&state);
    let mut activity = state.node.swarm().subscribe();
    let mut last_models = models_fingerprint(&state);
    let mut updates = state.node.updates().watch();
    let offered = updates.borrow_and_update().clone();
    if let Some(a) = offered
        && socket.send(update_available(&a)).await.is_err()
    {
        return;
    }
    if socket.send(message("peer_list", snapshot)).await.is_err()
        || socket
            .send(message("stats_update", full_stats(&state).await))
            .await
            .is_err()
    {
        return;
    }
    let mut tick = tokio::time::interval(STATS_EVERY);
    tick.tick().await;
    let mut peer_check = tokio::time::interval(Duration::from_millis(500));
    let shutdown = state.node.shutdown_token();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => {
                let _ = socket.send(Message::Close(None)).await;
                return;
            }
            _ = tick.tick() => {
                if socket.send(message("stats_update", full_stats(&state).await)).await.is_err() {
                    return;
                }
            }
            event = activity.recv() => match event {
                Ok(a) => {
                    let data = serde_json::to_value(&a).unwrap_or_default();
                    if socket.send(message("activity_event", data)).await.is_err() {
                        return;
                    }
                }
                // A slow dashboard missed some: it still gets the next ones.
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            },
            changed = updates.changed() => {
                if changed.is_err() {
                    return;
                }
                let offered = updates.borrow_and_update().clone();
                if let Some(a) = offered
                    && socket.send(update_available(&a)).await.is_err()
                {
                    return;
                }
            }
            _ = peer_check.tick() => {
                let models = models_fingerprint(&state);
                if models != last_models {
                    last_models = models;
                    if socket.send(message("models_changed", json!({}))).await.is_err() {
                        return;
                    }
                }
                let (ids, snapshot) = peers(&state);
                if ids != last_ids {
                    last_ids = ids;
                    if socket.send(message("peer_list", snapshot)).await.is_err() {
                        return;
                    }
                }
            }
            incoming = socket.recv() => match incoming {
                // Clients only listen; pings are answered by axum, anything else ignored.
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                Some(Ok(_)) => {}
            },
        }
    }
}

fn update_available(a: &crate::update::Available) -> Message {
    message(
        "update_available",
        json!({
            "version": a.version,
            "current_version": a.current_version,
            "changelog": a.notes,
            "pub_date": a.pub_date,
        }),
    )
}

fn credits_json(c: crate::net::announce::CreditSummary) -> Value {
    json!({ "balance": crate::credits::to_credits(c.balance), "entries": c.entries })
}

/// The admin WebSocket. Each route is declared read (public) or write (needs the key) here.
pub(super) fn routes() -> super::routes::Routes {
    use axum::http::Method;
    super::routes::Routes::default().read(Method::GET, "/api/admin/ws", upgrade)
}
