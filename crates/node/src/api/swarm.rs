//! The self-organising swarm's settings and record: per-model auto-manage and
//! the prune history (`swarm` module).

use axum::Json;
use axum::extract::State;
use serde_json::{Value, json};

use super::error::ApiError;
use super::extract::{ApiJson, Path};
use super::{AppState, blocking};
use crate::swarm::settings::SettingsError;

impl From<SettingsError> for ApiError {
    fn from(e: SettingsError) -> Self {
        match e {
            SettingsError::TooMany => ApiError::new(
                axum::http::StatusCode::UNPROCESSABLE_ENTITY,
                "TOO_MANY_POLICIES",
                e.to_string(),
            ),
            SettingsError::Schedule(m) => ApiError::invalid_field("schedule", m),
            SettingsError::Store(e) => ApiError::internal("saving swarm settings", e),
        }
    }
}

async fn auto_manage_json(state: &AppState, id: &str) -> Value {
    let own = state.node.swarm().settings().auto_manage(id);
    let config = state.node.config();
    let view = crate::swarm::view(&state.node).await;
    let m = view.model(id);
    json!({
        "model_id": id,
        "enabled": own.enabled.unwrap_or(config.auto_manage),
        "prune": own.prune.unwrap_or(config.auto_prune),
        // Where each value comes from: this model's own setting, or the
        // global default (`auto_manage`, `auto_prune` in the config).
        "source": {
            "enabled": if own.enabled.is_some() { "model" } else { "default" },
            "prune": if own.prune.is_some() { "model" } else { "default" },
        },
        "default": { "enabled": config.auto_manage, "prune": config.auto_prune },
        "trust_level": m.map(|m| m.trust).unwrap_or(crate::swarm::TrustLevel::Discovered).as_str(),
        "replication_target": m.map(|m| m.target).unwrap_or(0),
    })
}

/// `GET /api/admin/models/{id}/auto-manage`
pub(crate) async fn get_auto_manage(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    super::models::check_id(&id)?;
    Ok(Json(auto_manage_json(&state, &id).await))
}

/// One field of the PUT body: absent (`None`), `null` (`Some(None)`: back to the
/// global default) or a bool.
fn tri_state(body: &Value, field: &str) -> Result<Option<Option<bool>>, ApiError> {
    match body.get(field) {
        None => Ok(None),
        Some(Value::Null) => Ok(Some(None)),
        Some(Value::Bool(b)) => Ok(Some(Some(*b))),
        Some(other) => Err(ApiError::invalid_field(
            field,
            format!("must be true, false or null, not {other}"),
        )),
    }
}

/// `PUT /api/admin/models/{id}/auto-manage`
pub(crate) async fn put_auto_manage(
    State(state): State<AppState>,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<Value>,
) -> Result<Json<Value>, ApiError> {
    super::models::check_id(&id)?;
    let fields = body
        .as_object()
        .ok_or_else(|| ApiError::invalid_json("the body must be a JSON object"))?;
    if let Some(k) = fields
        .keys()
        .find(|k| !matches!(k.as_str(), "enabled" | "prune"))
    {
        return Err(ApiError::invalid_field(
            k.as_str(),
            "unknown field (expected enabled, prune)",
        ));
    }
    let (enabled, prune) = (tri_state(&body, "enabled")?, tri_state(&body, "prune")?);
    if enabled.is_none() && prune.is_none() {
        return Err(ApiError::invalid_json(
            "give \"enabled\" and/or \"prune\" (true, false, or null for the default)",
        ));
    }
    let swarm = state.node.swarm().clone();
    let model = id.clone();
    blocking("saving auto-manage", move || {
        let mut now = swarm.settings().auto_manage(&model);
        if let Some(v) = enabled {
            now.enabled = v;
        }
        if let Some(v) = prune {
            now.prune = v;
        }
        swarm.settings().set_auto_manage(&model, now)
    })
    .await?;
    // Peers learn whether this node now takes shards.
    state.node.announce_soon().await;
    Ok(Json(auto_manage_json(&state, &id).await))
}

/// `GET /api/admin/prune-history[?limit=N]`: what auto-manage deleted and why,
/// newest first (100 by default, at most 1000).
pub(crate) async fn prune_history(
    State(state): State<AppState>,
    axum::extract::Query(q): axum::extract::Query<std::collections::HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let limit = match q.get("limit") {
        None => 100,
        Some(v) => v
            .parse::<u32>()
            .ok()
            .filter(|n| (1..=1000).contains(n))
            .ok_or_else(|| ApiError::invalid_parameter("limit", "must be 1 to 1000"))?,
    };
    let store = state.node.swarm().store().clone();
    let events = blocking("reading the prune history", move || {
        crate::swarm::history::list(&store, "prune", limit)
            .map_err(|e| ApiError::internal("reading the prune history", e))
    })
    .await?;
    let freed: u64 = events.iter().map(|e| e.bytes).sum();
    Ok(Json(json!({
        "events": events,
        "total": events.len(),
        "freed_mb": (freed as f64 / 1_048_576.0 * 10.0).round() / 10.0,
    })))
}

fn schedule_json(state: &AppState) -> Value {
    let schedule = state.node.swarm().settings().schedule();
    let contributing = schedule.contributes_now();
    let mut v = serde_json::to_value(&schedule).unwrap_or_default();
    v["contributing_now"] = json!(contributing);
    v["local_time"] = json!(chrono::Local::now().format("%a %H:%M").to_string());
    v
}

/// `GET /api/admin/schedule`
pub(crate) async fn get_schedule(State(state): State<AppState>) -> Json<Value> {
    Json(schedule_json(&state))
}

/// `PUT /api/admin/schedule` with `{"enabled": bool, "weekdays": {"mon":
/// [{"start": 9, "end": 17}], …}}` (hours in local time, end exclusive).
pub(crate) async fn put_schedule(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<Value>,
) -> Result<Json<Value>, ApiError> {
    let schedule: crate::swarm::schedule::Schedule = super::extract::from_value(&body)?;
    let swarm = state.node.swarm().clone();
    blocking("saving the schedule", move || {
        swarm.settings().set_schedule(schedule)
    })
    .await?;
    // Peers learn at once whether this node contributes.
    state.node.announce_soon().await;
    Ok(Json(schedule_json(&state)))
}

/// Auto-manage routes. Each route is declared read (public) or write (needs the key) here.
pub(super) fn routes() -> super::routes::Routes {
    use axum::http::Method;
    super::routes::Routes::default()
        .read(
            Method::GET,
            "/api/admin/models/{id}/auto-manage",
            get_auto_manage,
        )
        .read(Method::GET, "/api/admin/prune-history", prune_history)
        .read(Method::GET, "/api/admin/schedule", get_schedule)
        .write(Method::PUT, "/api/admin/schedule", put_schedule)
        .write(
            Method::PUT,
            "/api/admin/models/{id}/auto-manage",
            put_auto_manage,
        )
}
