//! Peer and network routes: the directory, network codes, the network map.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use axum::Json;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};

use super::AppState;
use super::error::ApiError;
use super::extract::ApiJson;
use crate::net::directory::PeerRecord;
use crate::net::{NetError, Network};

fn network(state: &AppState) -> Result<&Network, ApiError> {
    state.node.network().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "P2P_DISABLED",
            "the P2P layer is off on this node (p2p_enabled = false)",
        )
    })
}

/// Runs a peer-directory read on the blocking pool; `T::default()` when the P2P
/// layer is off.
async fn directory<T: Default + Send + 'static>(
    state: &AppState,
    read: impl FnOnce(&crate::net::directory::Directory) -> Result<T, crate::store::StoreError>
    + Send
    + 'static,
) -> Result<T, ApiError> {
    let Some(net) = state.node.network() else {
        return Ok(T::default());
    };
    let dir = net.directory().clone();
    tokio::task::spawn_blocking(move || read(&dir))
        .await
        .map_err(|e| ApiError::internal("peer directory", e))?
        .map_err(|e| ApiError::internal("peer directory", e))
}

async fn peers(state: &AppState, limit: usize) -> Result<Vec<PeerRecord>, ApiError> {
    directory(state, move |d| d.list(limit)).await
}

fn connected_ids(state: &AppState) -> BTreeSet<String> {
    state
        .node
        .network()
        .map(|n| n.connected().into_iter().map(|c| c.node_id).collect())
        .unwrap_or_default()
}

/// `GET /api/admin/peers`: every known peer with latency, trust and hosted models.
pub(crate) async fn admin_peers(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let list = peers(&state, 500).await?;
    let connected = connected_ids(&state);
    let peers: Vec<Value> = list
        .into_iter()
        .map(|p| {
            json!({
                "node_id": p.node_id,
                "peer_id": p.peer_id,
                "nickname": p.nickname,
                "addresses": p.addresses,
                "region": p.region,
                "version": p.software_version,
                "connected": connected.contains(&p.node_id),
                "is_active": p.is_active,
                "latency_ms": p.latency_ms,
                "trust_score": p.trust_score,
                "consecutive_failures": p.consecutive_failures,
                "bad_frames": p.bad_frames,
                "banned_until": p.banned_until,
                "models": p.models,
                "hardware": p.hardware,
                "load": p.load,
                "capabilities": p.capabilities,
                "discovered_via": p.discovered_via,
                "first_seen": p.discovered_at,
                "last_seen": p.last_seen_at,
            })
        })
        .collect();
    let sync_log = directory(&state, |d| d.sync_log(20)).await?;
    Ok(Json(json!({
        "total": peers.len(),
        "connected": connected.len(),
        "peers": peers,
        "sync_log": sync_log,
    })))
}

/// `GET /api/identity/peers`: the identity directory (nicknames, regions, tiers).
pub(crate) async fn identity_peers(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    // Tiers as the leaderboard ranks them: by each node's announced (signed)
    // balance among every node this one knows. A peer that announced none has
    // no tier (the field is left out, not guessed).
    let board = state.node.credits().leaderboard().await;
    let balances: Vec<i64> = board.iter().map(|r| r.balance).collect();
    let tiers: HashMap<String, &'static str> = board
        .iter()
        .map(|r| {
            let p = crate::credits::percentile(r.balance, &balances);
            (r.node_id.clone(), crate::credits::tier(p))
        })
        .collect();
    let peers: Vec<Value> = peers(&state, 500)
        .await?
        .into_iter()
        .map(|p| {
            let mut v = json!({
                "node_id": p.node_id,
                "nickname": p.nickname,
                "region": p.region,
                "online": p.is_active,
                "last_seen": p.last_seen_at,
            });
            if let Some(tier) = tiers.get(&p.node_id) {
                v["tier"] = json!(tier);
            }
            v
        })
        .collect();
    Ok(Json(json!({ "total": peers.len(), "peers": peers })))
}

/// `GET /api/admin/network-map`: per region the live nodes, holders and demand
/// per model, coverage gaps and replication targets — the swarm view that
/// auto-manage acts on, this node included in its region.
pub(crate) async fn network_map(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let view = crate::swarm::view(&state.node).await;
    let region_of = |node: &str| {
        view.region_of
            .get(node)
            .cloned()
            .unwrap_or_else(|| crate::swarm::UNKNOWN_REGION.into())
    };
    let mut out = BTreeMap::new();
    for (region, total) in &view.nodes_by_region {
        let mut models = BTreeMap::new();
        let mut demand = BTreeMap::new();
        let mut gaps = Vec::new();
        let mut target = BTreeMap::new();
        for m in &view.models {
            let holders = view
                .model_holders
                .get(&m.model_id)
                .map(|h| h.iter().filter(|n| region_of(n) == *region).count())
                .unwrap_or(0);
            let rpm: f64 = view
                .demand
                .get(&m.model_id)
                .map(|d| {
                    d.requesters
                        .iter()
                        .filter(|(n, _)| region_of(n) == *region)
                        .map(|(_, r)| r)
                        .sum()
                })
                .unwrap_or(0.0);
            if holders > 0 {
                models.insert(m.model_id.clone(), holders);
            } else {
                gaps.push(m.model_id.clone());
            }
            if rpm > 0.0 {
                demand.insert(m.model_id.clone(), (rpm * 100.0).round() / 100.0);
            }
            // The model's target, at most the nodes of this region.
            target.insert(m.model_id.clone(), m.target.min(*total as u32));
        }
        out.insert(
            region.clone(),
            json!({
                "total": total,
                "models": models,
                "demand": demand,
                "coverage_gaps": gaps,
                "replication_target": target,
                "local": *region == view.region,
            }),
        );
    }
    Ok(Json(json!({ "regions": out, "local_region": view.region })))
}

/// `GET /api/v1/peers` (neuroshard shape).
pub(crate) async fn v1_peers(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let Some(net) = state.node.network() else {
        return Ok(Json(json!({ "peers": [], "total": 0 })));
    };
    let list = peers(&state, 1000).await?;
    let peers: Vec<Value> = net
        .connected()
        .into_iter()
        .map(|c| {
            let rec = list.iter().find(|p| p.node_id == c.node_id);
            let layers: Vec<u32> = rec
                .and_then(|p| p.models.as_array().cloned())
                .unwrap_or_default()
                .iter()
                .flat_map(|m| {
                    let start = m["layer_start"].as_u64().unwrap_or(0) as u32;
                    let end = m["layer_end"].as_u64().unwrap_or(0) as u32;
                    start..end
                })
                .collect();
            json!({
                "id": c.node_id,
                "address": c.address,
                "role": if layers.is_empty() { "client" } else { "worker" },
                "layers": layers,
                "latency_ms": c.latency_ms,
                "connected_since": c.connected_since,
                "nickname": rec.and_then(|p| p.nickname.clone()),
            })
        })
        .collect();
    Ok(Json(json!({ "total": peers.len(), "peers": peers })))
}

/// `GET /api/v1/network` (neuroshard shape).
pub(crate) async fn v1_network(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let list: Vec<PeerRecord> = peers(&state, 1000)
        .await?
        .into_iter()
        .filter(|p| p.is_active)
        .collect();
    let workers = list
        .iter()
        .filter(|p| p.models.as_array().is_some_and(|m| !m.is_empty()))
        .count()
        + usize::from(state.node.engine().is_some());
    let total = list.len() + 1;
    // Each node's RAM and GPU memory as it announced them, this node's as it
    // measures them; "memory" is where a node keeps model layers: its GPU's
    // when it has one, else its RAM.
    let gpus = state.gpus().await;
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    let own_vram = gib(gpus.iter().map(|g| g.memory_total).sum());
    let own_ram = crate::hardware::total_memory_gb();
    let mut ram_gb = own_ram;
    let mut vram_gb = own_vram;
    let mut memory_gb = if own_vram > 0.0 { own_vram } else { own_ram };
    for p in &list {
        let ram = p.hardware["ram_gb"].as_f64().unwrap_or(0.0).max(0.0);
        let vram = p.hardware["vram_gb"].as_f64().unwrap_or(0.0).max(0.0);
        ram_gb += ram;
        vram_gb += vram;
        memory_gb += if vram > 0.0 { vram } else { ram };
    }
    // What this node holds in memory: its whole model and the layer ranges it
    // hosts (peers do not announce theirs).
    let host_bytes: u64 = state
        .node
        .pipeline()
        .host()
        .ranges()
        .iter()
        .filter_map(|r| std::fs::metadata(&r.path).ok())
        .map(|m| m.len())
        .sum();
    let used_gb = gib(state
        .node
        .engine()
        .map(|e| e.info().size_bytes)
        .unwrap_or(0)
        .saturating_add(host_bytes));
    let architecture = state.node.engine().map(|e| {
        let i = e.info();
        json!({
            "layers": i.n_layers,
            "hidden_dim": i.n_embd,
            "parameters": format!("{:.0}M", i.n_params as f64 / 1e6),
            "model": i.id,
        })
    });
    Ok(Json(json!({
        // No node validates others' work in this swarm, so there is no
        // `validators` count.
        "nodes": { "total": total, "drivers": total - workers, "workers": workers },
        "architecture": architecture,
        "capacity": {
            "total_memory_gb": (memory_gb * 10.0).round() / 10.0,
            "total_ram_gb": (ram_gb * 10.0).round() / 10.0,
            "total_vram_gb": (vram_gb * 10.0).round() / 10.0,
            "this_node_used_memory_gb": (used_gb * 100.0).round() / 100.0,
        },
    })))
}

#[derive(Debug, Deserialize)]
pub(crate) struct WellKnownQuery {
    nodes: Option<bool>,
    limit: Option<usize>,
}

/// `GET /.well-known/swarmllm`: this node's document and the nodes it knows.
pub(crate) async fn well_known(
    State(state): State<AppState>,
    Query(q): Query<WellKnownQuery>,
) -> Result<Json<Value>, ApiError> {
    let node = &state.node;
    let limit = q.limit.unwrap_or(50).clamp(1, 200);
    let all = peers(&state, 10_000).await?;
    let active = all.iter().filter(|p| p.is_active).count();
    let seeds: Vec<String> = directory(&state, |d| d.seeds())
        .await?
        .into_iter()
        .filter(|s| s.is_enabled)
        .map(|s| s.address)
        .collect();
    let mut capabilities = vec!["gossip", "rpc"];
    if node.engine().is_some() {
        capabilities.insert(0, "inference");
    }
    let mut doc = json!({
        "node": {
            "node_id": node.node_id(),
            "peer_id": node.network().map(|n| n.peer_id().to_string()),
            "name": node.nickname(),
            "description": "SwarmLLM node",
            "publicKey": node.node_id(),
            "softwareVersion": crate::VERSION,
            "capabilities": capabilities,
            "models": node.engine().map(|e| vec![e.info().id.clone()]).unwrap_or_default(),
        },
        "swarm": {
            "totalNodes": all.len() + 1,
            "activeNodes": active + 1,
            "seeds": seeds,
        },
    });
    if q.nodes.unwrap_or(true) {
        let nodes: Vec<Value> = all
            .into_iter()
            .take(limit)
            .map(|p| {
                json!({
                    "node_id": p.node_id,
                    "name": p.nickname,
                    "isActive": p.is_active,
                    "lastSeenAt": p.last_seen_at.and_then(|t| chrono::DateTime::from_timestamp(t, 0))
                        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)),
                })
            })
            .collect();
        doc["nodes"] = json!(nodes);
    }
    Ok(Json(doc))
}

/// `POST /api/v1/network/discover` (authenticated): a discovery round.
pub(crate) async fn discover(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let net = network(&state)?;
    let asked = net.discover().await.map_err(net_error)?;
    Ok(Json(
        json!({ "status": "started", "peers_queried": asked, "connected": net.connected().len() }),
    ))
}

/// `GET /api/admin/network-code`: an invite code and the network phase.
pub(crate) async fn network_code(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let net = network(&state)?;
    let code = net.invite_code();
    // The same code as a QR picture, for the app to show (another device's
    // app reads it with `POST /api/admin/network-code/scan`).
    let qr = crate::qr::svg(&code).map_err(|e| ApiError::internal("qr", e))?;
    Ok(Json(json!({
        "code": code,
        "qr_svg": qr,
        "phase": net.phase().await,
        "node_id": state.node.node_id(),
        "peer_id": net.peer_id().to_string(),
        "connected_peers": net.connected().len(),
    })))
}

/// `POST /api/admin/network-code/scan` (authenticated) with a PNG or JPEG
/// picture as the body → `{"code": "swarm://…"}`: the network code in a
/// picture of another node's QR code.
pub(crate) async fn scan_network_code(
    State(state): State<AppState>,
    body: axum::body::Bytes,
) -> Result<Json<Value>, ApiError> {
    let text = super::pool::read_qr(body).await?;
    let text = text.trim().to_string();
    let network_name = state.node.config().network_name.clone();
    if crate::net::invite::decode(&text, &network_name).is_err() {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "NOT_A_NETWORK_CODE",
            "the QR code does not hold a network code of this network (swarm://…)",
        ));
    }
    Ok(Json(json!({ "code": text })))
}

#[derive(Debug, Deserialize)]
pub(crate) struct JoinBody {
    code: Option<String>,
    address: Option<String>,
}

/// `POST /api/admin/join-network` (authenticated): `{"code": "swarm://…"}` or
/// `{"address": "/ip4/…/p2p/…"}`; dials and saves the peer for restarts.
pub(crate) async fn join_network(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<JoinBody>,
) -> Result<Json<Value>, ApiError> {
    // The body is checked before anything else: an empty code is the caller's
    // mistake (400) whatever state the network is in.
    let given = |v: Option<String>| v.map(|v| v.trim().to_string()).filter(|v| !v.is_empty());
    let entry = given(body.code).or(given(body.address)).ok_or_else(|| {
        ApiError::invalid_field("code", "give `code` (swarm://…) or `address` (a multiaddr)")
    })?;
    let net = network(&state)?;
    let node_id = net
        .add_seed_and_dial(&entry, "invite")
        .await
        .map_err(net_error)?;
    Ok(Json(json!({
        "status": "connected",
        "node_id": node_id,
        "phase": net.phase().await,
        "connected_peers": net.connected().len(),
    })))
}

fn net_error(e: NetError) -> ApiError {
    match e {
        NetError::Invite(e) => {
            ApiError::new(StatusCode::BAD_REQUEST, "INVALID_CODE", e.to_string())
        }
        NetError::InvalidAddress(a) => ApiError::new(
            StatusCode::BAD_REQUEST,
            "INVALID_CODE",
            format!("not a network code or multiaddr: {a}"),
        ),
        NetError::Dial(msg) => ApiError::new(StatusCode::BAD_GATEWAY, "PEER_UNREACHABLE", msg),
        other => ApiError::internal("p2p", other),
    }
}

/// The P2P network: peers, codes, joining. Each route is declared read (public) or write (needs the key) here.
pub(super) fn routes() -> super::routes::Routes {
    use axum::http::Method;
    super::routes::Routes::default()
        .read(Method::GET, "/api/identity/peers", identity_peers)
        .read(Method::GET, "/api/admin/peers", admin_peers)
        .read(Method::GET, "/api/admin/network-map", network_map)
        .read(Method::GET, "/api/admin/network-code", network_code)
        .read(Method::GET, "/api/v1/peers", v1_peers)
        .read(Method::GET, "/api/v1/network", v1_network)
        .read(Method::GET, "/.well-known/swarmllm", well_known)
        .write(Method::POST, "/api/admin/join-network", join_network)
        .write(
            Method::POST,
            "/api/admin/network-code/scan",
            scan_network_code,
        )
        .write(Method::POST, "/api/v1/network/discover", discover)
}
