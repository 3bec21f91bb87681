//! Sharded models: what this node holds and runs, what the network holds
//! (`/api/admin/models`, `/api/v1/layers`, `/api/admin/rescan-shards`, …).

use std::collections::BTreeSet;

use axum::Json;
use axum::extract::State;

use super::extract::Path;
use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};

use super::error::ApiError;
use super::extract::{ApiJson, from_value};
use super::{AppState, blocking};
use crate::pipeline::NetworkModel;
use crate::pipeline::host::RangeInfo;
use crate::pipeline::transfer::TransferError;
use crate::shard::library::LocalModel;

fn file_mb(path: &std::path::Path) -> f64 {
    std::fs::metadata(path)
        .map(|m| m.len() as f64 / 1_048_576.0)
        .unwrap_or(0.0)
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

/// Nodes (by id) whose announced or loaded range covers layers `a..b`.
fn holders_of(net: Option<&NetworkModel>, a: u32, b: u32) -> BTreeSet<String> {
    net.map(|m| {
        m.holders
            .iter()
            .filter(|h| h.layer_start <= a && h.layer_end >= b)
            .map(|h| h.node_id.clone())
            .collect()
    })
    .unwrap_or_default()
}

fn model_json(
    local: Option<&LocalModel>,
    net: Option<&NetworkModel>,
    ranges: &[RangeInfo],
) -> Value {
    let id = local
        .map(|m| m.manifest.model_id.clone())
        .or_else(|| net.map(|m| m.id.clone()))
        .unwrap_or_default();
    let n_layers = local
        .map(|m| m.manifest.n_layers)
        .or_else(|| net.map(|m| m.n_layers))
        .unwrap_or(0);
    let loaded: Vec<&RangeInfo> = ranges.iter().filter(|r| r.model_id == id).collect();
    let loaded_mb: f64 = loaded.iter().map(|r| file_mb(&r.path)).sum();
    let loaded_layers: u32 = loaded.iter().map(|r| r.layer_end - r.layer_start).sum();
    let offloaded: u32 = loaded
        .iter()
        .map(|r| r.gpu_layers.min(r.layer_end - r.layer_start))
        .sum();
    let on_gpu = f64::from(offloaded) / f64::from(loaded_layers.max(1));
    let shards: Vec<Value> = match local {
        Some(m) => m
            .manifest
            .shards
            .iter()
            .map(|s| {
                let holders = holders_of(net, s.layer_start, s.layer_end);
                json!({
                    "index": s.index,
                    "layer_start": s.layer_start,
                    "layer_end": s.layer_end,
                    "bytes": s.bytes,
                    "blake3": m.hashes.get(s.index),
                    "held": m.held.contains(&s.index),
                    "corrupt": m.corrupt.contains(&s.index),
                    "loaded": loaded.iter().any(|r| r.first_shard <= s.index && r.last_shard >= s.index),
                    "holders": holders.len(),
                    "holder_ids": holders,
                })
            })
            .collect(),
        None => Vec::new(),
    };
    json!({
        "id": id,
        "architecture": local.map(|m| m.manifest.architecture.clone()),
        "n_layers": n_layers,
        "local": local.is_some_and(|m| !m.held.is_empty()),
        "complete": local.is_some_and(|m| m.held.len() == m.manifest.shards.len()),
        "total_shards": local.map(|m| m.manifest.shards.len()),
        "held_shards": local.map(|m| m.held.clone()).unwrap_or_default(),
        "shards": shards,
        "layer_ranges": loaded.iter().map(|r| json!({
            "layer_start": r.layer_start,
            "layer_end": r.layer_end,
            "first_shard": r.first_shard,
            "last_shard": r.last_shard,
            "ms_per_layer": r.ms_per_layer,
        })).collect::<Vec<_>>(),
        "ram_estimate_mb": round1(loaded_mb * (1.0 - on_gpu)),
        "vram_estimate_mb": round1(loaded_mb * on_gpu),
        "holders": net.map(|m| m.holders.iter().map(|h| h.node_id.clone()).collect::<BTreeSet<_>>().len()).unwrap_or(0),
        // The manifest accepted here, and every one holders announce: holders of
        // another manifest are shown, never used.
        "manifest_hash": local.map(|m| m.manifest_hash.clone()).or_else(|| net.and_then(|m| m.manifest_hash.clone())),
        "manifest_hashes": net.map(|m| json!(m.manifest_hashes)).unwrap_or(json!({})),
        "manifest_conflict": net.is_some_and(|m| {
            m.manifest_hashes.len() > 1
                || m.manifest_hashes.keys().any(|h| m.manifest_hash.as_ref().is_some_and(|p| p != h))
        }),
    })
}

/// Adds what the swarm view says of `id`: trust level, demand, replication
/// target and auto-manage policy (the same figures auto-manage acts on).
fn add_swarm_fields(v: &mut Value, view: &crate::swarm::SwarmView, id: &str) {
    let m = view.model(id);
    let d = view.demand.get(id).cloned().unwrap_or_default();
    v["trust_level"] = json!(
        m.map(|m| m.trust)
            .unwrap_or(crate::swarm::TrustLevel::Discovered)
            .as_str()
    );
    v["demand"] = json!({
        "requesters": d.requesters.len(),
        "requests_per_minute": d.requests_per_minute,
    });
    v["replication_target"] = json!(m.map(|m| m.target).unwrap_or(0));
    v["auto_manage"] = json!({
        "enabled": m.is_some_and(|m| m.acquire),
        "prune": m.is_some_and(|m| m.prune),
    });
    if let (Some(m), Some(shards)) = (m, v["shards"].as_array_mut()) {
        for s in shards {
            let index = s["index"].as_u64();
            if let Some(n) = m.shards.iter().find(|n| Some(u64::from(n.index)) == index) {
                s["locked"] = json!(n.locked);
                // First in line among the holders: pruning never takes it here.
                s["keeper"] = json!(n.keeper);
            }
        }
    }
}

/// `GET /api/admin/models`
pub(crate) async fn list(State(state): State<AppState>) -> Json<Value> {
    let pipeline = state.node.pipeline();
    let local = pipeline.local_models();
    let net = pipeline.network_models().await;
    let ranges = pipeline.host().ranges();
    let ids: BTreeSet<String> = local
        .iter()
        .map(|m| m.manifest.model_id.clone())
        .chain(net.iter().map(|m| m.id.clone()))
        .collect();
    let view = crate::swarm::view(&state.node).await;
    let models: Vec<Value> = ids
        .iter()
        .map(|id| {
            let mut v = model_json(
                local.iter().find(|m| &m.manifest.model_id == id),
                net.iter().find(|m| &m.id == id),
                &ranges,
            );
            add_swarm_fields(&mut v, &view, id);
            v
        })
        .collect();
    // Directories skipped at the last scan because their manifest breaks a rule.
    let rejected = pipeline.rejected_models();
    Json(json!({ "models": models, "total": models.len(), "rejected": rejected }))
}

/// `GET /api/admin/models/{id}/status`
pub(crate) async fn status(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let pipeline = state.node.pipeline();
    let local = pipeline.local_models();
    let net = pipeline.network_models().await;
    let l = local.iter().find(|m| m.manifest.model_id == id);
    let n = net.iter().find(|m| m.id == id);
    if l.is_none() && n.is_none() {
        return Err(ApiError::not_found(format!(
            "no model '{id}' here or on the network"
        )));
    }
    let mut v = model_json(l, n, &pipeline.host().ranges());
    add_swarm_fields(&mut v, &crate::swarm::view(&state.node).await, &id);
    v["servable"] = json!(pipeline.can_serve(&id).await);
    if let Some(m) = l {
        let total: u64 = m.manifest.shards.iter().map(|s| s.bytes).sum();
        let held = m.held_bytes();
        v["progress_pct"] = json!(round1(held as f64 * 100.0 / total.max(1) as f64));
    }
    Ok(Json(v))
}

/// `GET /api/v1/layers`: the layers this node runs (neuroshard shape, plus the
/// ranges and live sessions).
pub(crate) async fn layers(State(state): State<AppState>) -> Json<Value> {
    let host = state.node.pipeline().host();
    let ranges = host.ranges();
    let mut layers = Vec::new();
    for r in &ranges {
        let per_layer = file_mb(&r.path) / (r.layer_end - r.layer_start).max(1) as f64;
        for index in r.layer_start..r.layer_end {
            layers.push(json!({
                "index": index,
                "type": "transformer",
                "memory_mb": round1(per_layer),
                "status": "active",
                "model_id": r.model_id,
            }));
        }
    }
    let total = ranges.iter().map(|r| r.n_layers).max().unwrap_or(0);
    Json(json!({
        "layers": layers,
        "total_layers": total,
        "my_layer_count": layers.len(),
        "ranges": ranges,
        "sessions": host.session_count(),
        "steps_served": host.steps_served(),
        // Single-token steps of several sessions decoded in one batch.
        "batched": { "batches": host.batching().0, "steps": host.batching().1 },
        "wire_bytes_sent": state.node.pipeline().wire_bytes(),
        "link_overhead": state.node.pipeline().link_latency(),
        // Each link this node sends hidden states on: its measured bandwidth and
        // the format it carries when a requester allows approximate answers
        // (steps this node requests allow them only with `approximate_answers`).
        "approximate_answers": state.node.pipeline().approximate_answers(),
        "links": state.node.pipeline().links(),
        // Draft tokens this node's split generations sent through their chains
        // and the ones the model chose itself (speculative decoding).
        "speculation": state.node.pipeline().speculation(),
        // The latest split generation's chain per model: each hop's round
        // trip and compute, the predicted ms per token and the measured.
        "routes": state.node.pipeline().routes(),
    }))
}

/// `POST /api/admin/rescan-shards`
pub(crate) async fn rescan(State(state): State<AppState>) -> Json<Value> {
    let models = state.node.pipeline().load_held().await;
    state.node.announce_soon().await;
    let ids: Vec<String> = models.into_iter().map(|m| m.manifest.model_id).collect();
    Json(json!({ "status": "ok", "models_updated": ids, "count": ids.len() }))
}

pub(super) fn check_id(id: &str) -> Result<(), ApiError> {
    if crate::pipeline::is_model_id(id) {
        Ok(())
    } else {
        Err(ApiError::invalid_field("id", "not a model id"))
    }
}

fn local_model(state: &AppState, id: &str) -> Result<LocalModel, ApiError> {
    check_id(id)?;
    state
        .node
        .pipeline()
        .local_models()
        .into_iter()
        .find(|m| m.manifest.model_id == id)
        .ok_or_else(|| ApiError::not_found(format!("model '{id}' is not on this node")))
}

fn check_index(model: &LocalModel, index: u32) -> Result<(), ApiError> {
    let n = model.manifest.shards.len();
    if index as usize >= n {
        return Err(ApiError::invalid_field(
            "index",
            format!("the model has {n} shards"),
        ));
    }
    Ok(())
}

pub(super) fn transfer_error(e: TransferError) -> ApiError {
    match e {
        TransferError::Invalid(m) => ApiError::invalid_field("shard", m),
        TransferError::NoHolder(m) => ApiError::new(StatusCode::BAD_REQUEST, "NO_SOURCE", m),
        TransferError::NoNetwork => {
            ApiError::new(StatusCode::BAD_REQUEST, "NO_SOURCE", e.to_string())
        }
        // A holder served a manifest that breaks a rule: the upstream is at fault.
        TransferError::Conflict(m) => ApiError::new(StatusCode::CONFLICT, "MANIFEST_CONFLICT", m),
        TransferError::BadManifest(m) => ApiError::new(
            StatusCode::BAD_GATEWAY,
            "BAD_MANIFEST",
            format!("the holders' manifest was refused: {m}"),
        )
        .with_details(json!({ "rule": m.rule })),
        other => ApiError::new(
            StatusCode::BAD_GATEWAY,
            "TRANSFER_FAILED",
            other.to_string(),
        ),
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct AddBody {
    /// Shard indices to fetch; all when absent.
    shards: Option<Vec<u32>>,
}

/// `POST /api/admin/models/{id}/add`: fetch the manifest and header from a
/// holder, then download the shards asked for (all by default).
pub(crate) async fn add(
    State(state): State<AppState>,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<Json<Value>, ApiError> {
    check_id(&id)?;
    // The body is optional: none means every shard.
    let body: AddBody = if body.iter().all(u8::is_ascii_whitespace) {
        AddBody::default()
    } else {
        let v: Value =
            serde_json::from_slice(&body).map_err(|e| ApiError::invalid_json(e.to_string()))?;
        from_value(&v)?
    };
    user_chose(&state, &id).await?;
    let pipeline = state.node.pipeline();
    let manifest = pipeline
        .ensure_manifest(&id)
        .await
        .map_err(transfer_error)?;
    let wanted: Vec<u32> = body
        .shards
        .unwrap_or_else(|| manifest.shards.iter().map(|s| s.index).collect());
    let mut downloads = Vec::new();
    for i in wanted {
        downloads.push(
            pipeline
                .download_shard(&id, i)
                .await
                .map_err(transfer_error)?,
        );
    }
    let pending = downloads.iter().filter(|d| d.active()).count();
    Ok(Json(json!({
        "status": if pending == 0 { "complete" } else { "acquiring" },
        "model_id": id,
        "total_shards": manifest.shards.len(),
        "downloads": downloads,
    })))
}

/// `POST /api/admin/models/{id}/shards/{index}/download[?fallback=start]`: from
/// the best peer; with no peer, the model's Hub source (`use_hf`, or with
/// `fallback=start` the Hub download itself).
pub(crate) async fn download(
    State(state): State<AppState>,
    Path((id, index)): Path<(String, u32)>,
    axum::extract::Query(q): axum::extract::Query<std::collections::HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    check_id(&id)?;
    user_chose(&state, &id).await?;
    let pipeline = state.node.pipeline();
    let here = pipeline
        .local_models()
        .into_iter()
        .any(|m| m.manifest.model_id == id && m.held.contains(&index));
    // Peers first; with none and a known Hub source, the Hub.
    if !here
        && !pipeline.has_holder(&id, index).await
        && let Some(source) = pipeline.hub_source(&id)
    {
        return from_hub(
            &state,
            &id,
            index,
            source,
            q.get("fallback").map(String::as_str),
        )
        .await;
    }
    let d = pipeline
        .download_shard(&id, index)
        .await
        .map_err(transfer_error)?;
    if !d.active() {
        return Ok(Json(
            json!({ "status": "already_local", "model_id": id, "shard_index": index }),
        ));
    }
    Ok(Json(json!({
        "status": "downloading",
        "source": "p2p",
        "peer": d.peer,
        "download_id": d.id,
        "model_id": id,
        "shard_index": index,
        "bytes_total": d.bytes_total,
    })))
}

/// The Hub fallback of a shard download: `use_hf`, or with `fallback=start` the
/// download itself.
async fn from_hub(
    state: &AppState,
    id: &str,
    index: u32,
    source: crate::pipeline::hub_fetch::HubSource,
    fallback: Option<&str>,
) -> Result<Json<Value>, ApiError> {
    if fallback != Some("start") {
        return Ok(Json(json!({
            "status": "use_hf",
            "source": "huggingface",
            "model_id": id,
            "shard_index": index,
            "repo_id": source.repo_id,
            "filename": source.filename,
            "reason": "no connected peer holds this shard",
        })));
    }
    let manifest =
        crate::shard::read_manifest(&state.node.config().data_dir_path().join("models").join(id))
            .ok();
    let hub = state.node.hub().map_err(super::hub::hub_error)?;
    let started = state
        .node
        .pipeline()
        .download_from_hub(
            &hub,
            crate::pipeline::hub_fetch::HubFetch {
                repo_id: source.repo_id.clone(),
                filename: source.filename.clone(),
                revision: source.commit.clone(),
                shards: manifest.map(|m| m.shard_count()),
                shard_indices: Some(vec![index]),
                fair_share: false,
                model_id: Some(id.to_string()),
            },
        )
        .await
        .map_err(super::hub::hub_fetch_error)?;
    Ok(Json(json!({
        "status": if started.shard_indices.is_empty() { "already_local" } else { "downloading" },
        "source": "huggingface",
        "model_id": id,
        "shard_index": index,
        "repo_id": source.repo_id,
        "filename": source.filename,
        "bytes_to_fetch": started.bytes_to_fetch,
        "download_ids": started.download_ids,
    })))
}

/// A model the user asks for is theirs (`Pinned`), even if auto-manage first
/// brought it in.
pub(crate) async fn user_chose(state: &AppState, id: &str) -> Result<(), ApiError> {
    let swarm = state.node.swarm().clone();
    let id = id.to_string();
    blocking("saving the model's origin", move || {
        swarm.settings().set_auto_acquired(&id, false)
    })
    .await
}

/// `GET /api/admin/downloads`
pub(crate) async fn downloads(State(state): State<AppState>) -> Json<Value> {
    let list: Vec<Value> = state
        .node
        .pipeline()
        .downloads()
        .into_iter()
        .map(|d| {
            let mut v = serde_json::to_value(&d).unwrap_or_default();
            v["progress_pct"] = json!(d.progress_pct());
            v
        })
        .collect();
    let active = list
        .iter()
        .filter(|d| matches!(d["status"].as_str(), Some("queued" | "downloading")))
        .count();
    Json(json!({ "downloads": list, "active": active }))
}

/// `POST /api/admin/downloads/{id}/cancel` (a download id or a model id).
pub(crate) async fn cancel_download(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let n = state.node.pipeline().cancel_downloads(&id);
    if n == 0 {
        return Err(ApiError::not_found(format!("no running download '{id}'")));
    }
    Ok(Json(json!({ "status": "cancelled", "cancelled": n })))
}

/// `DELETE /api/admin/models/{id}`
pub(crate) async fn remove(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    check_id(&id)?;
    pinned_guard(&state, &id, None).await?;
    let removed = state
        .node
        .pipeline()
        .remove_model(&id)
        .await
        .map_err(|e| ApiError::internal("removing the model", e))?;
    if !removed {
        return Err(ApiError::not_found(format!(
            "model '{id}' is not on this node"
        )));
    }
    let swarm = state.node.swarm().clone();
    let model_id = id.clone();
    blocking("forgetting the model's locks", move || {
        swarm.settings().forget(&model_id)
    })
    .await?;
    state.node.announce_soon().await;
    Ok(Json(json!({ "status": "removed", "model_id": id })))
}

/// `DELETE /api/admin/models/{id}/shards/{index}`
pub(crate) async fn remove_shard(
    State(state): State<AppState>,
    Path((id, index)): Path<(String, u32)>,
) -> Result<Json<Value>, ApiError> {
    local_model(&state, &id)?;
    pinned_guard(&state, &id, Some(index)).await?;
    if state.node.swarm().settings().locks(&id).contains(&index) {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "SHARD_LOCKED",
            format!("shard {index} of '{id}' is locked; unlock it first"),
        ));
    }
    let removed = state
        .node
        .pipeline()
        .remove_shard(&id, index)
        .await
        .map_err(|e| ApiError::internal("removing the shard", e))?;
    if !removed {
        return Err(ApiError::not_found(format!(
            "shard {index} of '{id}' is not on this node"
        )));
    }
    state.node.announce_soon().await;
    Ok(Json(
        json!({ "status": "removed", "model_id": id, "shard_index": index }),
    ))
}

/// `POST /api/admin/models/{id}/shards/{index}/load`
pub(crate) async fn load_shard(
    State(state): State<AppState>,
    Path((id, index)): Path<(String, u32)>,
) -> Result<Json<Value>, ApiError> {
    let model = local_model(&state, &id)?;
    if !model.held.contains(&index) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "SHARD_NOT_LOCAL",
            format!("shard {index} of '{id}' is not on disk; download it first"),
        ));
    }
    let loaded = state.node.pipeline().set_loaded(&id, &[index], true).await;
    state.node.announce_soon().await;
    Ok(Json(
        json!({ "status": "loaded", "model_id": id, "shard_index": index, "loaded_shards": loaded }),
    ))
}

/// `POST /api/admin/models/{id}/shards/{index}/unload`
pub(crate) async fn unload_shard(
    State(state): State<AppState>,
    Path((id, index)): Path<(String, u32)>,
) -> Result<Json<Value>, ApiError> {
    let model = local_model(&state, &id)?;
    check_index(&model, index)?;
    let remaining = state.node.pipeline().set_loaded(&id, &[index], false).await;
    state.node.announce_soon().await;
    Ok(Json(
        json!({ "status": "unloaded", "model_id": id, "shard_index": index, "remaining_loaded": remaining }),
    ))
}

/// `POST /api/admin/models/{id}/unload`
pub(crate) async fn unload_model(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let model = local_model(&state, &id)?;
    let pipeline = state.node.pipeline();
    let before: Vec<RangeInfo> = pipeline
        .host()
        .ranges()
        .into_iter()
        .filter(|r| r.model_id == id)
        .collect();
    let freed: f64 = before.iter().map(|r| file_mb(&r.path)).sum();
    let all: Vec<u32> = model.manifest.shards.iter().map(|s| s.index).collect();
    pipeline.set_loaded(&id, &all, false).await;
    state.node.announce_soon().await;
    Ok(Json(json!({
        "status": "unloaded",
        "model_id": id,
        "model_name": model.manifest.model_id,
        "segments_removed": before.len(),
        "estimated_freed_mb": round1(freed),
    })))
}

/// 409 when the pool pinned this shard (or, for `None`, any shard of the model)
/// to this device: pinned shards are never deleted.
async fn pinned_guard(state: &AppState, id: &str, index: Option<u32>) -> Result<(), ApiError> {
    let pools = state.node.pools().clone();
    let model = id.to_string();
    let pinned = tokio::task::spawn_blocking(move || pools.pinned_here(&model))
        .await
        .map_err(|e| ApiError::internal("reading pins", e))?
        .map_err(|e| ApiError::internal("reading pins", e))?;
    let hit = match (&pinned, index) {
        (None, _) => false,
        (Some(list), Some(i)) => list.is_empty() || list.contains(&i),
        (Some(_), None) => true,
    };
    if hit {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "SHARD_PINNED",
            format!("the pool's owner pinned {id} to this device; unpin it first"),
        ));
    }
    Ok(())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LockBody {
    locked: bool,
}

/// `PUT /api/admin/models/{id}/shards/{index}/lock` with `{"locked": bool}`.
pub(crate) async fn lock_shard(
    State(state): State<AppState>,
    Path((id, index)): Path<(String, u32)>,
    ApiJson(body): ApiJson<Value>,
) -> Result<Json<Value>, ApiError> {
    let model = local_model(&state, &id)?;
    check_index(&model, index)?;
    let body: LockBody = from_value(&body)?;
    let swarm = state.node.swarm().clone();
    let model_id = id.clone();
    let locked: Vec<u32> = blocking("saving the lock", move || {
        swarm.settings().set_lock(&model_id, index, body.locked)
    })
    .await?
    .into_iter()
    .collect();
    Ok(Json(
        json!({ "status": "ok", "model_id": id, "shard_index": index, "locked": body.locked, "locked_shards": locked }),
    ))
}

/// `GET /api/admin/shard-storage`
pub(crate) async fn storage(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let pipeline = state.node.pipeline();
    let ranges = pipeline.host().ranges();
    let all_locks = state.node.swarm().settings().all_locks();
    let mut total_disk = 0u64;
    let mut models = Vec::new();
    for m in pipeline.local_models() {
        let disk = m.disk_bytes();
        total_disk += disk;
        let v = model_json(Some(&m), None, &ranges);
        models.push(json!({
            "model_id": m.manifest.model_id,
            "disk_mb": round1(disk as f64 / 1_048_576.0),
            "shards_on_disk": m.held,
            "corrupt_shards": m.corrupt,
            "loaded_shards": pipeline.loaded_shards(&m.manifest.model_id),
            "locked_shards": all_locks.get(&m.manifest.model_id).cloned().unwrap_or_default(),
            "ram_mb": v["ram_estimate_mb"],
            "vram_mb": v["vram_estimate_mb"],
        }));
    }
    let budget = state.node.config().disk_budget_mb;
    let over_budget = budget > 0 && total_disk > budget * 1_048_576;
    Ok(Json(json!({
        "models": models,
        "total_disk_mb": round1(total_disk as f64 / 1_048_576.0),
        // Auto-manage never fetches past the budget and prunes back under it.
        "disk_budget_mb": state.node.config().disk_budget_mb,
        "disk_used_mb": round1(total_disk as f64 / 1_048_576.0),
        "over_budget": over_budget,
        "models_dir": state.node.data_dir().join("models"),
    })))
}

fn encrypted_json(state: &AppState, id: &str) -> Value {
    let (enabled, own) = state.node.encrypted_pipeline(id);
    let (first, last, shards) = state.node.pipeline().holds_ends(id);
    json!({
        "model_id": id,
        "enabled": enabled,
        "source": if own.is_some() { "model" } else { "global" },
        "ready": first && last,
        "holds_first_shard": first,
        "holds_last_shard": last,
        "total_shards": shards,
        "overhead_note": "This node embeds the prompt and samples every token itself, so \
            token ids and logits never leave it; peers see only sealed hidden states. \
            It costs one extra hop per token (the chain returns here for the last \
            layers) and the memory of the first and last shards.",
    })
}

/// `GET /api/admin/models/{id}/encrypted-pipeline`
pub(crate) async fn get_encrypted(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    check_id(&id)?;
    Ok(Json(encrypted_json(&state, &id)))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EncryptedBody {
    enabled: bool,
}

/// `PUT /api/admin/models/{id}/encrypted-pipeline` with `{"enabled": bool}`.
/// Enabling needs the first and last shard on this node (409 otherwise).
pub(crate) async fn put_encrypted(
    State(state): State<AppState>,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<Value>,
) -> Result<Json<Value>, ApiError> {
    check_id(&id)?;
    let body: EncryptedBody = from_value(&body)?;
    let (first, last, shards) = state.node.pipeline().holds_ends(&id);
    if body.enabled && !(first && last) {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "NOT_READY",
            format!(
                "the encrypted pipeline needs this node to hold the first and the last shard of '{id}' \
                 (first: {}, last: {})",
                if first { "held" } else { "missing" },
                if last { "held" } else { "missing" }
            ),
        )
        .with_details(json!({ "holds_first_shard": first, "holds_last_shard": last })));
    }
    state
        .node
        .set_encrypted_pipeline(&id, body.enabled)
        .await
        .map_err(|e| ApiError::internal("saving the setting", e))?;
    let mut v = encrypted_json(&state, &id);
    if body.enabled && shards == 2 {
        v["warning"] = json!(
            "with two shards this node holds the whole model: requests never leave it, so \
             the pipeline gains nothing from other nodes"
        );
    }
    Ok(Json(v))
}

/// Sharded models, shards and downloads. Each route is declared read (public) or write (needs the key) here.
pub(super) fn routes() -> super::routes::Routes {
    use axum::http::Method;
    super::routes::Routes::default()
        .read(Method::GET, "/api/admin/models", list)
        .read(Method::GET, "/api/admin/models/{id}/status", status)
        .read(Method::GET, "/api/v1/layers", layers)
        .read(Method::GET, "/api/admin/shard-storage", storage)
        .read(Method::GET, "/api/admin/downloads", downloads)
        .read(
            Method::GET,
            "/api/admin/models/{id}/encrypted-pipeline",
            get_encrypted,
        )
        .write(Method::POST, "/api/admin/rescan-shards", rescan)
        .write(Method::POST, "/api/admin/models/{id}/add", add)
        .write(Method::DELETE, "/api/admin/models/{id}", remove)
        .write(Method::POST, "/api/admin/models/{id}/unload", unload_model)
        .write(
            Method::DELETE,
            "/api/admin/models/{id}/shards/{index}",
            remove_shard,
        )
        .write(
            Method::POST,
            "/api/admin/models/{id}/shards/{index}/download",
            download,
        )
        .write(
            Method::POST,
            "/api/admin/models/{id}/shards/{index}/load",
            load_shard,
        )
        .write(
            Method::POST,
            "/api/admin/models/{id}/shards/{index}/unload",
            unload_shard,
        )
        .write(
            Method::PUT,
            "/api/admin/models/{id}/shards/{index}/lock",
            lock_shard,
        )
        .write(
            Method::POST,
            "/api/admin/downloads/{id}/cancel",
            cancel_download,
        )
        .write(
            Method::PUT,
            "/api/admin/models/{id}/encrypted-pipeline",
            put_encrypted,
        )
}
