//! The node's localhost HTTP API (axum).
//!
//! [`router`] builds the whole app for a [`Node`]; [`serve`] runs it on a listener
//! until the node is asked to shut down (in-flight requests finish first). Read-only
//! status routes are public; inference and every write need the bearer API key.

mod adapters;
mod admin;
mod credits;
mod error;
mod extract;
mod generate;
mod hub;
mod keys;
mod models;
mod net;
mod openai;
mod openapi;
mod pool;
mod providers;
mod responses;
mod routes;
mod swarm;
mod tools;
mod ui;
mod update;
mod v1;
mod ws;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::OnceCell;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::cors::{AllowOrigin, CorsLayer};

pub use error::ApiError;
use routes::Routes;
pub use routes::{Access, Route};

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

/// Every domain's routes.
fn all_routes() -> Routes {
    health_routes()
        .merge(ui::routes())
        .merge(openai::routes())
        .merge(v1::routes())
        .merge(admin::routes())
        .merge(net::routes())
        .merge(ws::routes())
        .merge(models::routes())
        .merge(hub::routes())
        .merge(swarm::routes())
        .merge(pool::routes())
        .merge(credits::routes())
        .merge(update::routes())
        .merge(keys::routes())
        .merge(responses::routes())
        .merge(openapi::routes())
        .merge(providers::routes())
        .merge(adapters::routes())
}

/// Every route of the API with its method and access (read or write), as the
/// domains declare them.
pub fn route_table() -> Vec<Route> {
    all_routes().table
}

/// Builds the HTTP app for `node`.
pub fn router(node: Node) -> Router {
    let state = AppState {
        node,
        limiter: Arc::default(),
        sys: Arc::new(Mutex::new(sysinfo::System::new())),
        gpus: Arc::default(),
    };

    let routes = all_routes();
    let protected = routes
        .write
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            extract::require_auth,
        ));
    let inference = routes
        .infer
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            extract::require_client,
        ));
    let public = routes
        .read
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            extract::limit_public,
        ));

    public
        .merge(protected)
        .merge(inference)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            check_host,
        ))
        .layer(cors(state.node.clone()))
        .layer(CatchPanicLayer::custom(panic_response))
        .with_state(state)
}

/// Health and Prometheus metrics. Each route is declared read (public) or write (needs the key) here.
fn health_routes() -> Routes {
    use axum::http::Method;
    Routes::default()
        .read(Method::GET, "/health", health)
        .read(Method::GET, "/health/live", live)
        .read(Method::GET, "/health/ready", ready)
        .read(Method::GET, "/metrics", prometheus)
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

/// Refuses requests whose `Host` is a name this node does not answer to (421):
/// DNS rebinding points a hostile name at 127.0.0.1 so that a web page can read
/// the API as its own origin. IP literals cannot be rebound, so they pass, as do
/// `localhost` names and the configured `allowed_hosts`.
async fn check_host(
    State(state): State<AppState>,
    req: Request,
    next: axum::middleware::Next,
) -> Response {
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri().host());
    match host {
        Some(host) if !host_allowed(&state.node.config().allowed_hosts, host) => ApiError::new(
            StatusCode::MISDIRECTED_REQUEST,
            "HOST_NOT_ALLOWED",
            format!("this node does not answer to host {host:?} (see allowed_hosts)"),
        )
        .into_response(),
        _ => next.run(req).await,
    }
}

/// Whether a `Host` header value (name or address, with or without a port)
/// names this node.
pub(crate) fn host_allowed(allowed: &[String], host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        // [v6]:port
        Some(rest) => rest.split(']').next().unwrap_or_default(),
        None => host.rsplit_once(':').map_or(host, |(name, port)| {
            if port.bytes().all(|b| b.is_ascii_digit()) {
                name
            } else {
                host
            }
        }),
    };
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    name.parse::<std::net::IpAddr>().is_ok()
        || name == "localhost"
        || name.ends_with(".localhost")
        || allowed.iter().any(|a| a.eq_ignore_ascii_case(&name))
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
        metrics.set_engine(&engine.stats());
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

#[cfg(test)]
mod tests {
    use super::host_allowed;

    #[test]
    fn hosts_are_ip_literals_localhost_or_configured() {
        let none: Vec<String> = Vec::new();
        for ok in [
            "127.0.0.1:8800",
            "localhost:8800",
            "localhost",
            "[::1]:8800",
            "tauri.localhost",
            "192.168.1.5:8800",
        ] {
            assert!(host_allowed(&none, ok), "{ok}");
        }
        for bad in [
            "evil.example:8800",
            "evil.example",
            "127.0.0.1.evil.example:80",
        ] {
            assert!(!host_allowed(&none, bad), "{bad}");
        }
        assert!(host_allowed(&["my-box.lan".to_string()], "My-Box.lan:8800"));
    }
}
