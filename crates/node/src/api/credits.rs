//! Credits: `GET /api/admin/credits`, `GET /api/identity/leaderboard`, the
//! wallet (`/api/v1/wallet/balance|send|transactions`, neuroshard's shapes) and
//! per-pool rates (`GET/PUT /api/admin/pools/{id}/rates`).

use std::collections::HashMap;

use axum::Json;
use axum::extract::{Query, State};

use super::extract::Path;
use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};

use super::AppState;
use super::error::ApiError;
use super::extract::{ApiJson, from_value};
use crate::credits::{Credits, LedgerError, Rates, SendError, from_credits, to_credits};

impl From<LedgerError> for ApiError {
    fn from(e: LedgerError) -> Self {
        ApiError::internal("credit ledger", e)
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, LedgerError> + Send + 'static,
) -> Result<T, ApiError> {
    super::blocking("credit ledger", f).await
}

fn rfc3339(unix: i64) -> String {
    chrono::DateTime::from_timestamp(unix, 0)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// A query parameter as an integer within `range`, or `default` when absent.
fn int_param(
    q: &HashMap<String, String>,
    name: &str,
    default: usize,
    max: usize,
) -> Result<usize, ApiError> {
    match q.get(name) {
        None => Ok(default),
        Some(v) => v
            .parse::<usize>()
            .ok()
            .filter(|n| *n <= max)
            .ok_or_else(|| {
                ApiError::invalid_parameter(name, format!("must be an integer from 0 to {max}"))
            }),
    }
}

/// `GET /api/admin/credits` (`?verify=true` re-checks every signature and the
/// totals): balance, tier and rates.
pub(crate) async fn admin_credits(
    State(state): State<AppState>,
    headers: axum::http::HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    // Re-verifying every signature is expensive: only the key holder may ask.
    if q.get("verify").is_some_and(|v| v == "true") && !super::extract::has_key(&state, &headers) {
        return Err(ApiError::unauthorized());
    }
    let credits = state.node.credits().clone();
    let ledger = credits.ledger().clone();
    let balance = blocking(move || ledger.balance()).await?;
    let ledger = credits.ledger().clone();
    let pending = blocking(move || ledger.pending_total()).await?;
    let (tier, percentile, ranked) = credits.standing().await;
    let mut v = json!({
        "node_id": state.node.node_id(),
        "balance": to_credits(balance.balance()),
        "earned": to_credits(balance.earned),
        "spent": to_credits(balance.spent),
        "entries": balance.entries,
        "pending_pool_forwards": to_credits(pending),
        "tier": tier,
        "percentile": percentile,
        "ranked_nodes": ranked,
        "rates": credits.rates().to_json(),
    });
    match q.get("verify").map(String::as_str) {
        None | Some("false") => {}
        Some("true") => {
            let ledger = credits.ledger().clone();
            let check = blocking(move || ledger.verify()).await?;
            v["verification"] = json!({
                "entries": check.entries,
                "invalid": check.invalid,
                "signatures_valid": check.invalid.is_empty(),
                "totals_match": check.totals_match,
                "recomputed_balance": to_credits(check.recomputed.balance()),
            });
        }
        Some(_) => {
            return Err(ApiError::invalid_parameter(
                "verify",
                "must be true or false",
            ));
        }
    }
    Ok(Json(v))
}

/// `GET /api/identity/leaderboard?limit=N`: every known node's announced
/// (signed) balance, highest first, with tiers.
pub(crate) async fn leaderboard(
    State(state): State<AppState>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let limit = int_param(&q, "limit", 100, 1000)?;
    let rows = state.node.credits().leaderboard().await;
    let balances: Vec<i64> = rows.iter().map(|r| r.balance).collect();
    let total = rows.len();
    let nickname = state.node.nickname();
    let entries: Vec<Value> = rows
        .into_iter()
        .take(limit)
        .enumerate()
        .map(|(i, r)| {
            let p = crate::credits::percentile(r.balance, &balances);
            json!({
                "rank": i + 1,
                "node_id": r.node_id,
                "nickname": if r.is_self { nickname.clone() } else { r.nickname },
                "balance": to_credits(r.balance),
                "earned": to_credits(r.earned),
                "spent": to_credits(r.spent),
                "entries": r.entries,
                "tier": crate::credits::tier(p),
                "percentile": p,
                "is_self": r.is_self,
            })
        })
        .collect();
    Ok(Json(json!({ "leaderboard": entries, "total": total })))
}

/// `GET /api/v1/wallet/balance`.
pub(crate) async fn wallet_balance(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let credits = state.node.credits();
    let ledger = credits.ledger().clone();
    let balance = blocking(move || ledger.balance()).await?;
    let ledger = credits.ledger().clone();
    let pending = blocking(move || ledger.pending_total()).await?;
    let available = to_credits(balance.balance());
    Ok(Json(json!({
        "address": state.node.node_id(),
        // No staking exists here, so no `staked` amount or `staking` block.
        "balances": {
            "available": available,
            "pending": to_credits(pending),
            "total": available,
        },
    })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SendBody {
    to: String,
    amount: f64,
    #[serde(default)]
    memo: Option<String>,
}

/// `POST /api/v1/wallet/send` with `{"to": NODE_ID, "amount": 1.5, "memo": "…"}`:
/// a transfer the recipient countersigns before it counts.
pub(crate) async fn wallet_send(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<Value>,
) -> Result<Json<Value>, ApiError> {
    let body: SendBody = from_value(&body)?;
    let amount = from_credits(body.amount)
        .filter(|a| *a > 0)
        .ok_or_else(|| ApiError::invalid_field("amount", "must be a positive number of credits"))?;
    let entry = state
        .node
        .credits()
        .send(&body.to, amount, body.memo.clone())
        .await
        .map_err(|e| {
            let msg = e.to_string();
            match e {
                SendError::Invalid(_) => {
                    ApiError::new(StatusCode::BAD_REQUEST, "INVALID_FIELD", msg)
                }
                SendError::Insufficient {
                    required,
                    available,
                } => ApiError::new(StatusCode::PAYMENT_REQUIRED, "INSUFFICIENT_BALANCE", msg)
                    .with_details(json!({
                        "required": to_credits(required),
                        "available": to_credits(available),
                    })),
                SendError::Unreachable(_) => {
                    ApiError::new(StatusCode::BAD_GATEWAY, "PEER_UNREACHABLE", msg)
                }
                SendError::Refused(_) => {
                    ApiError::new(StatusCode::CONFLICT, "TRANSFER_REFUSED", msg)
                }
                other => ApiError::internal("wallet send", other),
            }
        })?;
    let b = entry
        .body()
        .map_err(|e| ApiError::internal("wallet send", e))?;
    Ok(Json(json!({
        "transaction_id": b.id,
        "from": b.payer,
        "to": b.payee,
        "amount": to_credits(b.amount),
        "fee": 0.0,
        "memo": b.memo,
        "status": "confirmed",
        "timestamp": rfc3339(b.timestamp),
        "signed": Credits::entry_json(&entry),
    })))
}

/// `GET /api/v1/wallet/transactions?limit=10&offset=0`, newest first; each
/// carries its dual-signed entry.
pub(crate) async fn wallet_transactions(
    State(state): State<AppState>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let limit = int_param(&q, "limit", 50, 1000)?;
    let offset = int_param(&q, "offset", 0, usize::MAX >> 1)?;
    let ledger = state.node.credits().ledger().clone();
    let (rows, total) = blocking(move || ledger.transactions(limit, offset)).await?;
    let transactions: Vec<Value> = rows
        .into_iter()
        .map(|t| {
            let body = t.entry.body().ok();
            let counter_key = if t.amount < 0 { "to" } else { "from" };
            json!({
                "id": t.id,
                "type": t.r#type,
                "kind": t.kind,
                "amount": to_credits(t.amount),
                counter_key: t.counterparty,
                "timestamp": rfc3339(t.created_at),
                "details": {
                    "memo": body.as_ref().and_then(|b| b.memo.clone()),
                    "work": body.as_ref().and_then(|b| b.work.clone()),
                    "rates": body.as_ref().and_then(|b| b.rates).map(Rates::to_json),
                },
                "signed": Credits::entry_json(&t.entry),
            })
        })
        .collect();
    Ok(Json(json!({
        "transactions": transactions,
        "total": total,
        "limit": limit,
        "offset": offset,
    })))
}

fn rates_view(pool_id: &str, overrides: Option<Rates>, defaults: Rates) -> Value {
    json!({
        "pool_id": pool_id,
        "rates": overrides.unwrap_or(defaults).to_json(),
        "overrides": overrides.map(Rates::to_json),
        "defaults": defaults.to_json(),
    })
}

/// `GET /api/admin/pools/{id}/rates`: the rates that apply to work between the
/// pool's devices.
pub(crate) async fn get_pool_rates(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let pools = state.node.pools().clone();
    let (pool_id, overrides) = super::blocking("pool", move || pools.rates()).await?;
    if pool_id.as_deref() != Some(id.as_str()) {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "POOL_NOT_FOUND",
            format!("no pool '{id}' on this device"),
        ));
    }
    Ok(Json(rates_view(
        &id,
        overrides,
        state.node.credits().rates(),
    )))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RatesBody {
    per_layer_token: Option<f64>,
    per_token: Option<f64>,
}

/// `PUT /api/admin/pools/{id}/rates` with `{"per_layer_token": 0.0, "per_token":
/// 0.005}` (owner only; a missing field keeps the node default, `{}` clears the
/// overrides).
pub(crate) async fn put_pool_rates(
    State(state): State<AppState>,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<Value>,
) -> Result<Json<Value>, ApiError> {
    let body: RatesBody = from_value(&body)?;
    let defaults = state.node.credits().rates();
    let rate = |field: &str, v: Option<f64>, default: i64| -> Result<i64, ApiError> {
        match v {
            None => Ok(default),
            Some(x) => from_credits(x)
                .filter(|_| x <= 1000.0)
                .ok_or_else(|| ApiError::invalid_field(field, "must be between 0 and 1000")),
        }
    };
    let overrides = if body.per_layer_token.is_none() && body.per_token.is_none() {
        None
    } else {
        Some(Rates {
            per_layer_token: rate(
                "per_layer_token",
                body.per_layer_token,
                defaults.per_layer_token,
            )?,
            per_token: rate("per_token", body.per_token, defaults.per_token)?,
        })
    };
    let pools = state.node.pools().clone();
    let pool_id = id.clone();
    super::blocking("pool", move || pools.set_rates(&pool_id, overrides)).await?;
    state.node.pools().publish_settings().await;
    Ok(Json(rates_view(&id, overrides, defaults)))
}

/// Credits and the wallet. Each route is declared read (public) or write (needs the key) here.
pub(super) fn routes() -> super::routes::Routes {
    use axum::http::Method;
    super::routes::Routes::default()
        .read(Method::GET, "/api/admin/credits", admin_credits)
        .read(Method::GET, "/api/identity/leaderboard", leaderboard)
        .read(Method::GET, "/api/admin/pools/{id}/rates", get_pool_rates)
        .write(Method::PUT, "/api/admin/pools/{id}/rates", put_pool_rates)
        .write(Method::GET, "/api/v1/wallet/balance", wallet_balance)
        .write(Method::POST, "/api/v1/wallet/send", wallet_send)
        .write(
            Method::GET,
            "/api/v1/wallet/transactions",
            wallet_transactions,
        )
}
