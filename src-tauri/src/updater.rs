//! The app's updates through Tauri's updater: the node's
//! [`swarmllm_node::update::Updater`], so `POST /api/admin/update/check` and
//! `/apply` (and the UI's buttons) use it.
//!
//! The endpoint is the node's `update_endpoint` (else the one in
//! `tauri.conf.json`); the key an update must be signed with is the one the app
//! was built with (`plugins.updater.pubkey`), or `SWARMLLM_UPDATE_PUBKEY` in the
//! app's environment. That variable, unlike the config, cannot be changed over
//! the API: whoever holds the API key can point the app at another server, but
//! only updates signed by the trusted key install. The plugin checks the
//! minisign signature, and that the signed version is the announced one (no
//! replaying an old signed release as a new version), before installing.

use std::sync::Mutex;

use swarmllm_node::Node;
use swarmllm_node::update::{Applied, Available, BoxFuture, UpdateError, Updater};
use tauri_plugin_updater::{Error, Update, UpdaterExt};

/// The trusted key, overriding the built-in one (for a private build or tests).
const PUBKEY_VAR: &str = "SWARMLLM_UPDATE_PUBKEY";
/// The file an AppImage update replaces (default: this executable), for tests
/// that must not replace the binary under test.
const TARGET_VAR: &str = "SWARMLLM_UPDATE_TARGET";

/// Tauri's updater for one app.
pub struct TauriUpdater<R: tauri::Runtime> {
    app: tauri::AppHandle<R>,
    node: Node,
    /// What the last check found, which apply installs.
    offered: Mutex<Option<Update>>,
}

impl<R: tauri::Runtime> TauriUpdater<R> {
    /// The updater of `app`, reading its endpoint from `node`'s config.
    pub fn new(app: tauri::AppHandle<R>, node: Node) -> Self {
        TauriUpdater {
            app,
            node,
            offered: Mutex::new(None),
        }
    }

    fn updater(&self) -> Result<tauri_plugin_updater::Updater, UpdateError> {
        let mut b = self.app.updater_builder();
        let endpoint = self.node.config().update_endpoint;
        if !endpoint.is_empty() {
            let url = tauri::Url::parse(&endpoint)
                .map_err(|e| UpdateError::Unsupported(format!("update_endpoint: {e}")))?;
            b = b.endpoints(vec![url]).map_err(map)?;
        }
        if let Ok(key) = std::env::var(PUBKEY_VAR) {
            b = b.pubkey(key);
        }
        if let Some(path) = std::env::var_os(TARGET_VAR) {
            b = b.executable_path(path);
        }
        b.build().map_err(map)
    }

    async fn check_now(&self) -> Result<Option<Update>, UpdateError> {
        if !self.app.config().plugins.0.contains_key("updater") {
            return Err(UpdateError::Unsupported(
                "this build has no updater configuration".into(),
            ));
        }
        let pubkey_set = std::env::var(PUBKEY_VAR).is_ok_and(|k| !k.is_empty())
            || self.app.config().plugins.0["updater"]["pubkey"]
                .as_str()
                .is_some_and(|k| !k.is_empty());
        if !pubkey_set {
            return Err(UpdateError::Unsupported(
                "this build trusts no update signing key, so it installs no updates".into(),
            ));
        }
        self.updater()?.check().await.map_err(map)
    }
}

fn available(u: &Update) -> Available {
    Available {
        version: u.version.clone(),
        current_version: u.current_version.clone(),
        notes: u.body.clone(),
        pub_date: u.raw_json["pub_date"].as_str().map(str::to_string),
    }
}

/// The plugin's errors as the node's kinds.
fn map(e: Error) -> UpdateError {
    let message = e.to_string();
    match e {
        Error::EmptyEndpoints => UpdateError::Unsupported(
            "no update endpoint: set update_endpoint in the settings".into(),
        ),
        Error::UnsupportedArch | Error::UnsupportedOs | Error::InsecureTransportProtocol => {
            UpdateError::Unsupported(message)
        }
        Error::Minisign(_)
        | Error::Base64(_)
        | Error::SignatureUtf8(_)
        | Error::SignedVersionMismatch { .. }
        | Error::MissingSignedVersion => UpdateError::Signature(message),
        Error::Reqwest(_)
        | Error::Network(_)
        | Error::ReleaseNotFound
        | Error::Serialization(_)
        | Error::Semver(_)
        | Error::UrlParse(_)
        | Error::TargetNotFound(_)
        | Error::TargetsNotFound(_)
        | Error::Http(_) => UpdateError::Server(message),
        _ => UpdateError::Install(message),
    }
}

impl<R: tauri::Runtime> Updater for TauriUpdater<R> {
    fn check(&self) -> BoxFuture<'_, Result<Option<Available>, UpdateError>> {
        Box::pin(async move {
            let found = self.check_now().await?;
            let out = found.as_ref().map(available);
            *self.offered.lock().unwrap_or_else(|p| p.into_inner()) = found;
            Ok(out)
        })
    }

    fn apply(&self) -> BoxFuture<'_, Result<Applied, UpdateError>> {
        Box::pin(async move {
            // Always from a fresh check: the offer may have changed since.
            let update = self
                .check_now()
                .await?
                .ok_or_else(|| UpdateError::NoUpdate(swarmllm_node::VERSION.into()))?;
            tracing::info!(version = %update.version, url = %update.download_url, "downloading an update");
            // `download` verifies the signature before it returns the bytes.
            let bytes = update.download(|_, _| {}, || {}).await.map_err(map)?;
            update.install(&bytes).map_err(map)?;
            *self.offered.lock().unwrap_or_else(|p| p.into_inner()) = None;
            Ok(Applied {
                version: update.version.clone(),
                restart_required: true,
            })
        })
    }
}
