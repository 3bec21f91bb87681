//! `GET /api/admin/ws`: live updates for dashboards.
//!
//! Every 2 s a `stats_update` (peer count, queue, request counters, credits, private
//! mode); a `peer_list` snapshot on connect and whenever the set of connected peers
//! changes. Messages are JSON: `{"type": "...", "data": {...}, "timestamp": "..."}`.
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
    })
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
    if socket.send(message("peer_list", snapshot)).await.is_err()
        || socket
            .send(message("stats_update", stats(&state)))
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
                if socket.send(message("stats_update", stats(&state))).await.is_err() {
                    return;
                }
            }
            _ = peer_check.tick() => {
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

fn credits_json(c: crate::net::announce::CreditSummary) -> Value {
    json!({ "balance": crate::credits::to_credits(c.balance), "entries": c.entries })
}

/// The admin WebSocket. Each route is declared read (public) or write (needs the key) here.
pub(super) fn routes() -> super::routes::Routes {
    use axum::http::Method;
    super::routes::Routes::default().read(Method::GET, "/api/admin/ws", upgrade)
}
