//! The SwarmLLM desktop app: a Tauri 2 shell around the node library.
//!
//! No node logic lives here. [`run`] starts the same [`Node`] the CLI starts, in
//! process on Tauri's async runtime, binds the same localhost REST/WebSocket API
//! (scripts and the CLI keep working while the app runs), and wires four things
//! to the library: Tauri commands for the UI ([`commands`]), the tray with its
//! private-mode check item ([`tray`]), Tauri's updater behind the node's update
//! API ([`updater`]), and the window's life cycle (closing the window keeps the
//! node running in the tray; Quit shuts it down gracefully).

pub mod commands;
mod tray;
pub mod updater;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Mutex;
use std::time::Duration;

use clap::Parser;
use serde_json::{Map, json};
use swarmllm_node::config::ConfigSource;
use swarmllm_node::{Node, NodeOptions};
use tauri::{Emitter, Manager};

/// Command-line flags: the CLI's global ones (`SWARMLLM_*` variables apply too).
#[derive(Debug, Parser)]
#[command(name = "swarmllm-desktop", version, about = "The SwarmLLM desktop app")]
pub struct Args {
    /// Data directory (default: the platform data dir).
    #[arg(long, env = "SWARMLLM_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Port of the localhost API.
    #[arg(long)]
    pub api_port: Option<u16>,
    /// Config file.
    #[arg(long, env = "SWARMLLM_CONFIG")]
    pub config: Option<PathBuf>,
    /// GGUF model to serve.
    #[arg(long)]
    pub model: Option<PathBuf>,
}

impl Args {
    /// Where the node's configuration comes from, as for `swarmllm serve`.
    pub fn config_source(&self) -> ConfigSource {
        let mut overrides = Map::new();
        if let Some(port) = self.api_port {
            overrides.insert("api_port".into(), json!(port));
        }
        if let Some(model) = &self.model {
            overrides.insert("model".into(), json!(model.to_string_lossy()));
        }
        ConfigSource::from_flags(self.config.clone(), self.data_dir.as_ref(), overrides)
    }
}

/// What the shell keeps: the node, its API router (for in-process commands) and
/// the task serving the localhost API.
pub struct Shell {
    /// The node.
    pub node: Node,
    /// The API as a service, called by [`commands::node_request`] without HTTP.
    pub router: axum::Router,
    /// `http://127.0.0.1:PORT`.
    pub api_base: String,
    serve: Mutex<Option<tauri::async_runtime::JoinHandle<()>>>,
}

impl Shell {
    /// Starts the node and its localhost API.
    pub async fn start(source: ConfigSource) -> Result<Shell, String> {
        let node = Node::start(NodeOptions {
            config: source,
            load_progress: None,
        })
        .await
        .map_err(|e| format!("starting the node: {e}"))?;
        let config = node.config();
        let addr = format!("{}:{}", config.api_host, config.api_port);
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
        let bound = listener
            .local_addr()
            .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
        let serving = node.clone();
        let serve = tauri::async_runtime::spawn(async move {
            if let Err(e) = swarmllm_node::api::serve(serving, listener).await {
                tracing::error!(error = %e, "the API server stopped");
            }
        });
        Ok(Shell {
            router: swarmllm_node::api::router(node.clone()),
            node,
            api_base: format!("http://{bound}"),
            serve: Mutex::new(Some(serve)),
        })
    }

    /// Shuts the node down and waits (at most 10 s each) for in-flight requests
    /// and for every background task, so the database and ports are released.
    pub async fn shutdown(&self) {
        self.node.request_shutdown();
        let serve = self.serve.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(serve) = serve {
            let _ = tokio::time::timeout(Duration::from_secs(10), serve).await;
        }
        if !self.node.stop(Duration::from_secs(10)).await {
            tracing::warn!("some background tasks did not end within 10 s");
        }
    }
}

/// Runs the app until Quit.
pub fn run() -> ExitCode {
    let args = Args::parse();
    let source = args.config_source();
    match source.load() {
        Ok(config) => swarmllm_node::logging::init(&config.log_format, &config.log_level),
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    }
    let result = tauri::Builder::default()
        .plugin(tauri_plugin_updater::Builder::new().build())
        .setup(move |app| {
            let shell = tauri::async_runtime::block_on(Shell::start(source))?;
            let node = shell.node.clone();
            node.set_updater(std::sync::Arc::new(updater::TauriUpdater::new(
                app.handle().clone(),
                node.clone(),
            )));
            tracing::info!(api = %shell.api_base, node_id = %node.node_id(), "desktop app: node started");
            app.manage(shell);
            tray::build(app.handle(), &node)?;
            follow_private_mode(app.handle().clone(), &node);
            // A shutdown asked for elsewhere (`POST /api/admin/shutdown`) ends the app.
            let handle = app.handle().clone();
            let token = node.shutdown_token();
            tauri::async_runtime::spawn(async move {
                token.cancelled().await;
                quit(handle).await;
            });
            Ok(())
        })
        .on_window_event(|window, event| {
            // Closing the window keeps the node running in the tray.
            if let tauri::WindowEvent::CloseRequested { api, .. } = event {
                api.prevent_close();
                let _ = window.hide();
            }
        })
        .invoke_handler(tauri::generate_handler![
            commands::app_info,
            commands::node_request,
            commands::set_private_mode,
            commands::tray_status,
            commands::restart_app,
        ])
        .build(tauri::generate_context!());
    match result {
        Ok(app) => {
            app.run(|_, event| {
                // The last window gone (destroyed, not just hidden) is no reason to
                // stop the node: only Quit or a shutdown exits (with a code).
                if let tauri::RunEvent::ExitRequested {
                    code: None, api, ..
                } = event
                {
                    api.prevent_exit();
                }
            });
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Keeps the tray and the UI in step with private mode, whoever changes it.
fn follow_private_mode<R: tauri::Runtime>(app: tauri::AppHandle<R>, node: &Node) {
    let mut changes = node.watch_private_mode();
    tauri::async_runtime::spawn(async move {
        while changes.changed().await.is_ok() {
            let mode = *changes.borrow_and_update();
            tray::show_private_mode(&app, mode.enabled);
            let _ = app.emit("private-mode", mode);
        }
    });
}

/// Shuts the node down gracefully, then starts the app again (the version an
/// update installed).
pub async fn restart<R: tauri::Runtime>(app: tauri::AppHandle<R>) {
    if let Some(shell) = app.try_state::<Shell>() {
        shell.shutdown().await;
    }
    tracing::info!("desktop app: node stopped; restarting");
    app.restart();
}

/// Shuts the node down gracefully, then exits.
pub async fn quit<R: tauri::Runtime>(app: tauri::AppHandle<R>) {
    if let Some(shell) = app.try_state::<Shell>() {
        shell.shutdown().await;
    }
    tracing::info!("desktop app: node stopped; exiting");
    app.exit(0);
}

/// Shows and focuses the main window, making it again if it was destroyed.
pub fn open_window<R: tauri::Runtime>(app: &tauri::AppHandle<R>) {
    let window = match app.get_webview_window("main") {
        Some(w) => w,
        None => match tauri::WebviewWindowBuilder::new(app, "main", tauri::WebviewUrl::default())
            .title("SwarmLLM")
            .inner_size(1100.0, 760.0)
            .build()
        {
            Ok(w) => w,
            Err(e) => {
                tracing::error!(error = %e, "cannot open the window");
                return;
            }
        },
    };
    let _ = window.show();
    let _ = window.unminimize();
    let _ = window.set_focus();
}
