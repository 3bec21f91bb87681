//! Sharded models: what this node holds and runs, what the network holds
//! (`/api/admin/models`, `/api/v1/layers`, `/api/admin/rescan-shards`, …).

use std::collections::BTreeSet;

use axum::Json;
use axum::extract::{Path, State};
use serde_json::{Value, json};

use super::AppState;
use super::error::ApiError;
use crate::pipeline::NetworkModel;
use crate::pipeline::host::RangeInfo;
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
    gpu_layers: u32,
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
    let on_gpu = (gpu_layers.min(loaded_layers) as f64) / (loaded_layers.max(1) as f64);
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
                    "bytes": s.file.bytes,
                    "blake3": s.file.blake3,
                    "held": m.held.contains(&s.index),
                    "corrupt": m.corrupt.contains(&s.index),
                    "loaded": loaded.iter().any(|r| r.first_shard <= s.index && r.last_shard >= s.index),
                    "holders": holders.len(),
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
        // A model imported here was chosen by the user; one only seen on the
        // network is merely discovered.
        "trust_level": if local.is_some() { "Pinned" } else { "Discovered" },
    })
}

/// `GET /api/admin/models`
pub(crate) async fn list(State(state): State<AppState>) -> Json<Value> {
    let pipeline = state.node.pipeline();
    let local = pipeline.local_models();
    let net = pipeline.network_models().await;
    let ranges = pipeline.host().ranges();
    let gpu_layers = state.node.config().gpu_layers;
    let ids: BTreeSet<String> = local
        .iter()
        .map(|m| m.manifest.model_id.clone())
        .chain(net.iter().map(|m| m.id.clone()))
        .collect();
    let models: Vec<Value> = ids
        .iter()
        .map(|id| {
            model_json(
                local.iter().find(|m| &m.manifest.model_id == id),
                net.iter().find(|m| &m.id == id),
                &ranges,
                gpu_layers,
            )
        })
        .collect();
    Json(json!({ "models": models, "total": models.len() }))
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
    let mut v = model_json(
        l,
        n,
        &pipeline.host().ranges(),
        state.node.config().gpu_layers,
    );
    v["servable"] = json!(pipeline.can_serve(&id).await);
    if let Some(m) = l {
        let total: u64 = m.manifest.shards.iter().map(|s| s.file.bytes).sum();
        let held: u64 = m
            .manifest
            .shards
            .iter()
            .filter(|s| m.held.contains(&s.index))
            .map(|s| s.file.bytes)
            .sum();
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
    }))
}

/// `POST /api/admin/rescan-shards`
pub(crate) async fn rescan(State(state): State<AppState>) -> Json<Value> {
    let models = state.node.pipeline().load_held().await;
    state.node.announce_soon().await;
    let ids: Vec<String> = models.into_iter().map(|m| m.manifest.model_id).collect();
    Json(json!({ "status": "ok", "models_updated": ids, "count": ids.len() }))
}
