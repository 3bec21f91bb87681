//! The node's localhost HTTP API (axum).
//!
//! [`router`] builds the whole app for a [`Node`]; [`serve`] runs it on a listener
//! until the node is asked to shut down (in-flight requests finish first). Read-only
//! status routes are public; inference and every write need the bearer API key.

mod admin;
mod credits;
mod error;
mod extract;
mod generate;
mod models;
mod net;
mod openai;
mod pool;
mod ui;
mod v1;
mod ws;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::OnceCell;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::cors::{AllowOrigin, CorsLayer};

pub use error::ApiError;

use crate::Node;
use crate::infer::DeviceInfo;

/// Shared state of every handler.
#[derive(Clone)]
pub(crate) struct AppState {
    node: Node,
    limiter: Arc<extract::RateLimiter>,
    sys: Arc<Mutex<sysinfo::System>>,
    gpus: Arc<OnceCell<Vec<DeviceInfo>>>,
}

impl AppState {
    /// This process's CPU use (percent of one core) and resident memory.
    async fn process_usage(&self) -> (f64, u64) {
        let sys = Arc::clone(&self.sys);
        tokio::task::spawn_blocking(move || {
            let Ok(pid) = sysinfo::get_current_pid() else {
                return (0.0, 0);
            };
            let mut sys = sys.lock().unwrap_or_else(|p| p.into_inner());
            sys.refresh_processes(sysinfo::ProcessesToUpdate::Some(&[pid]), true);
            sys.process(pid)
                .map(|p| ((p.cpu_usage() as f64 * 10.0).round() / 10.0, p.memory()))
                .unwrap_or((0.0, 0))
        })
        .await
        .unwrap_or((0.0, 0))
    }

    /// GPUs llama.cpp sees (probed once).
    async fn gpus(&self) -> Vec<DeviceInfo> {
        self.gpus
            .get_or_init(|| async {
                tokio::task::spawn_blocking(|| {
                    crate::infer::backend_devices()
                        .into_iter()
                        .filter(|d| d.kind != "cpu")
                        .collect()
                })
                .await
                .unwrap_or_default()
            })
            .await
            .clone()
    }
}

/// Builds the HTTP app for `node`.
pub fn router(node: Node) -> Router {
    let state = AppState {
        node,
        limiter: Arc::default(),
        sys: Arc::new(Mutex::new(sysinfo::System::new())),
        gpus: Arc::default(),
    };

    let public = Router::new()
        .route("/", get(ui::index))
        .route("/{file}", get(ui::asset))
        .route("/health", get(health))
        .route("/health/live", get(live))
        .route("/health/ready", get(ready))
        .route("/metrics", get(prometheus))
        .route("/v1/models", get(openai::list_models))
        .route("/api/v1/status", get(v1::status))
        .route("/api/v1/health", get(v1::health))
        .route("/api/v1/metrics", get(v1::metrics))
        .route("/api/admin/stats", get(admin::stats))
        .route("/api/admin/version", get(admin::version))
        .route("/api/admin/config", get(admin::get_config))
        .route("/api/identity/nickname", get(admin::get_nickname))
        .route("/api/identity/peers", get(net::identity_peers))
        .route("/api/admin/peers", get(net::admin_peers))
        .route("/api/admin/network-map", get(net::network_map))
        .route("/api/admin/network-code", get(net::network_code))
        .route("/api/v1/peers", get(net::v1_peers))
        .route("/api/v1/network", get(net::v1_network))
        .route("/.well-known/swarmllm", get(net::well_known))
        .route(
            "/api/admin/models/{id}/metadata",
            get(admin::model_metadata),
        )
        .route("/api/admin/ws", get(ws::upgrade))
        .route("/api/admin/models", get(models::list))
        .route("/api/admin/models/{id}/status", get(models::status))
        .route("/api/v1/layers", get(models::layers))
        .route("/api/pool/state", get(pool::state))
        .route("/api/pool/private-mode", get(pool::get_private_mode))
        .route("/api/pool/coverage", get(pool::get_coverage))
        .route("/api/pool/pins", get(pool::pins))
        .route("/api/pool/invitations", get(pool::invitations))
        .route("/api/pool/leaderboard", get(pool::leaderboard))
        .route("/api/admin/credits", get(credits::admin_credits))
        .route("/api/identity/leaderboard", get(credits::leaderboard))
        .route("/api/admin/pools/{id}/rates", get(credits::get_pool_rates))
        .route("/api/admin/shard-storage", get(models::storage))
        .route("/api/admin/downloads", get(models::downloads))
        .route(
            "/api/admin/models/{id}/encrypted-pipeline",
            get(models::get_encrypted),
        );

    let protected = Router::new()
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/completions", post(openai::completions))
        .route("/api/v1/inference", post(v1::inference))
        .route("/api/admin/api-key", get(admin::api_key))
        .route("/api/admin/shutdown", post(admin::shutdown))
        .route("/api/admin/config", axum::routing::put(admin::put_config))
        .route("/api/admin/config/reload", post(admin::reload_config))
        .route("/api/admin/join-network", post(net::join_network))
        .route("/api/v1/network/discover", post(net::discover))
        .route("/api/admin/rescan-shards", post(models::rescan))
        .route("/api/pool/create", post(pool::create))
        .route("/api/pool/generate-code", post(pool::generate_code))
        .route("/api/pool/leave", post(pool::leave))
        .route("/api/pool/join", post(pool::join))
        .route("/api/pool/remove", post(pool::remove))
        .route("/api/pool/device-name", post(pool::device_name))
        .route("/api/pool/invite", post(pool::invite))
        .route("/api/pool/accept", post(pool::accept))
        .route("/api/pool/qr", post(pool::qr))
        .route("/api/pool/scan-qr", post(pool::scan_qr))
        .route(
            "/api/admin/pools/{id}/rates",
            axum::routing::put(credits::put_pool_rates),
        )
        .route("/api/v1/wallet/balance", get(credits::wallet_balance))
        .route("/api/v1/wallet/send", post(credits::wallet_send))
        .route(
            "/api/v1/wallet/transactions",
            get(credits::wallet_transactions),
        )
        .route(
            "/api/pool/pin",
            post(pool::add_pin).delete(pool::remove_pin),
        )
        .route(
            "/api/pool/credit-split",
            axum::routing::put(pool::put_credit_split),
        )
        .route(
            "/api/pool/contribution",
            axum::routing::put(pool::put_contribution),
        )
        .route(
            "/api/pool/private-mode",
            axum::routing::put(pool::put_private_mode),
        )
        .route("/api/admin/models/{id}/add", post(models::add))
        .route(
            "/api/admin/models/{id}",
            axum::routing::delete(models::remove),
        )
        .route("/api/admin/models/{id}/unload", post(models::unload_model))
        .route(
            "/api/admin/models/{id}/shards/{index}",
            axum::routing::delete(models::remove_shard),
        )
        .route(
            "/api/admin/models/{id}/shards/{index}/download",
            post(models::download),
        )
        .route(
            "/api/admin/models/{id}/shards/{index}/load",
            post(models::load_shard),
        )
        .route(
            "/api/admin/models/{id}/shards/{index}/unload",
            post(models::unload_shard),
        )
        .route(
            "/api/admin/models/{id}/shards/{index}/lock",
            axum::routing::put(models::lock_shard),
        )
        .route(
            "/api/admin/downloads/{id}/cancel",
            post(models::cancel_download),
        )
        .route(
            "/api/admin/models/{id}/encrypted-pipeline",
            axum::routing::put(models::put_encrypted),
        )
        .route(
            "/api/identity/nickname",
            axum::routing::put(admin::put_nickname).delete(admin::delete_nickname),
        )
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            extract::require_auth,
        ));

    public
        .merge(protected)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(cors(state.node.clone()))
        .layer(CatchPanicLayer::custom(panic_response))
        .with_state(state)
}

/// Serves the API on `listener` until the node's shutdown token is cancelled, then
/// waits for in-flight requests to finish.
pub async fn serve(node: Node, listener: TcpListener) -> std::io::Result<()> {
    let shutdown = node.shutdown_token();
    let app = router(node);
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown.cancelled_owned())
    .await
}

/// Browser origins the API answers: the desktop app's webview, pages the node
/// serves itself, and `cors_origins` from the config (read per request, so a config
/// change applies at once).
fn cors(node: Node) -> CorsLayer {
    CorsLayer::new()
        .allow_origin(AllowOrigin::predicate(move |origin: &HeaderValue, _| {
            origin.to_str().is_ok_and(|o| origin_allowed(&node, o))
        }))
        .allow_methods([Method::GET, Method::POST, Method::PUT, Method::DELETE])
        .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE])
}

/// Whether a browser page from `origin` may use the API.
pub(crate) fn origin_allowed(node: &Node, origin: &str) -> bool {
    let config = node.config();
    let own = [
        "tauri://localhost".to_string(),
        "http://tauri.localhost".to_string(),
        "https://tauri.localhost".to_string(),
        format!("http://127.0.0.1:{}", config.api_port),
        format!("http://localhost:{}", config.api_port),
    ];
    own.iter().any(|o| o == origin) || config.cors_origins.iter().any(|o| o == origin)
}

async fn not_found(req: Request) -> ApiError {
    ApiError::not_found(format!(
        "no route for {} {}",
        req.method(),
        req.uri().path()
    ))
}

async fn method_not_allowed(req: Request) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "METHOD_NOT_ALLOWED",
        format!("{} is not allowed on {}", req.method(), req.uri().path()),
    )
}

/// Runs a blocking domain call (SQLite, files) off the async runtime; its error
/// renders through the domain's `From<…> for ApiError`.
pub(crate) async fn blocking<T, E>(
    context: &'static str,
    f: impl FnOnce() -> Result<T, E> + Send + 'static,
) -> Result<T, ApiError>
where
    T: Send + 'static,
    E: Into<ApiError> + Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::internal(context, e))?
        .map_err(Into::into)
}

fn panic_response(_: Box<dyn std::any::Any + Send + 'static>) -> Response {
    ApiError::internal("request handler", "a handler panicked").into_response()
}

async fn health(State(state): State<AppState>) -> axum::Json<serde_json::Value> {
    let node = &state.node;
    axum::Json(json!({
        "status": "ok",
        "version": crate::VERSION,
        "node_id": node.node_id(),
        "uptime_seconds": node.uptime().as_secs(),
        "model_loaded": node.engine().is_some(),
    }))
}

async fn live() -> axum::Json<serde_json::Value> {
    axum::Json(json!({ "status": "alive" }))
}

async fn ready(State(state): State<AppState>) -> Result<axum::Json<serde_json::Value>, ApiError> {
    let engine = state.node.engine().ok_or_else(ApiError::no_model)?;
    Ok(axum::Json(
        json!({ "status": "ready", "model": engine.info().id }),
    ))
}

async fn prometheus(State(state): State<AppState>) -> Response {
    let metrics = state.node.metrics();
    if let Some(engine) = state.node.engine() {
        metrics.set_queue_depth(engine.queue_depth());
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        metrics.encode(),
    )
        .into_response()
}
