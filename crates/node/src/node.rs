//! [`Node`]: the cheap, cloneable handle every client of the library holds.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock, RwLock, Weak};
use std::time::{Duration, Instant};

use serde_json::{Map, Value};
use tokio_util::sync::CancellationToken;
use zeroize::Zeroizing;

use crate::config::{Config, ConfigError, ConfigFileError, ConfigSource};
use crate::identity::{self, Identity, IdentityError};
use crate::infer::{Engine, EngineConfig, LoadModelError};
use crate::metrics::Metrics;
use crate::net::announce::{HardwareSummary, HostedModel, Load};
use crate::net::{LocalInfo, NetConfig, NetError, Network};
use crate::pipeline::host::HostConfig;
use crate::pipeline::{Pipeline, PipelineConfig};
use crate::secrets::{SecretBackend, SecretError, SecretStore};
use crate::store::{Store, StoreError};

/// How to start a node.
pub struct NodeOptions {
    /// Where the config comes from (file, env, flags).
    pub config: ConfigSource,
    /// Receives model-load progress in `0.0..=1.0` (for a progress bar).
    pub load_progress: Option<Box<dyn FnMut(f32) + Send>>,
}

impl std::fmt::Debug for NodeOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeOptions")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// Starting a node failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigFileError),
    /// The data dir cannot be created.
    #[error("cannot create data dir {path}: {source}")]
    DataDir {
        /// The directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The database failed to open or migrate.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Secrets could not be read or created.
    #[error(transparent)]
    Secrets(#[from] SecretError),
    /// The identity could not be loaded.
    #[error(transparent)]
    Identity(#[from] IdentityError),
    /// The model could not be loaded.
    #[error(transparent)]
    Model(#[from] LoadModelError),
    /// The P2P layer could not start.
    #[error(transparent)]
    Network(#[from] NetError),
    /// A blocking start-up task panicked.
    #[error("start-up task failed: {0}")]
    Task(String),
}

/// Changing the configuration failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UpdateConfigError {
    /// A value is invalid; names the field.
    #[error(transparent)]
    Invalid(#[from] ConfigError),
    /// The file could not be read or written.
    #[error(transparent)]
    File(#[from] ConfigFileError),
}

/// What a config change did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ConfigChange {
    /// Fields whose value changed.
    pub updated: Vec<String>,
    /// Of those, the ones that take effect only after a restart.
    pub restart_required: Vec<String>,
    /// The config now in effect (restart-only fields keep their running values).
    pub config: Map<String, Value>,
}

/// Handle to a running node. Clones share the same node.
#[derive(Clone)]
pub struct Node {
    inner: Arc<Inner>,
}

struct Inner {
    config: RwLock<Config>,
    source: ConfigSource,
    data_dir: PathBuf,
    store: Store,
    secrets: SecretStore,
    identity: Identity,
    api_key: Zeroizing<String>,
    /// Inference-only keys.
    client_keys: crate::keys::ClientKeys,
    adapters: crate::adapters::Adapters,
    /// Responses API records and runs.
    responses: crate::responses::Responses,
    /// Cloud providers.
    providers: crate::providers::Providers,
    engine: Option<Engine>,
    pipeline: Pipeline,
    pools: crate::pool::Pools,
    credits: crate::credits::Credits,
    /// Demand, auto-manage settings and activity.
    swarm: crate::swarm::Swarm,
    network: OnceLock<Network>,
    nickname: RwLock<Option<String>>,
    /// Private mode (persisted).
    /// Private mode (persisted); a watch so the desktop tray follows changes.
    private_mode: tokio::sync::watch::Sender<crate::pool::PrivateMode>,
    /// Per-model encrypted-pipeline settings (model id → on/off).
    encrypted: RwLock<std::collections::BTreeMap<String, bool>>,
    metrics: Metrics,
    started: Instant,
    started_at: chrono::DateTime<chrono::Utc>,
    shutdown: CancellationToken,
    /// Every background task of the node.
    tasks: crate::tasks::Tasks,
    /// The Hugging Face token (from the secret store, else `HF_TOKEN`).
    hf_token: RwLock<Option<Zeroizing<String>>>,
    /// The Hub client for the endpoint and token in force (its caches live as
    /// long as those do).
    hub: std::sync::Mutex<Option<HubSlot>>,
    /// This build's updates (an updater comes from the shell).
    updates: crate::update::Updates,
}

/// A Hub client and what it was made for.
struct HubSlot {
    endpoint: String,
    token: Option<Zeroizing<String>>,
    hub: crate::hub::Hub,
}

/// The secret holding the Hugging Face token.
const HF_TOKEN_SECRET: &str = "hf_token";

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("node_id", &self.node_id())
            .field("data_dir", &self.inner.data_dir)
            .finish_non_exhaustive()
    }
}

impl Node {
    /// Starts a node: loads the config, opens the data dir, database and secrets,
    /// loads or creates the identity and API key, and loads the model if one is set.
    pub async fn start(options: NodeOptions) -> Result<Node, StartError> {
        let NodeOptions {
            config: source,
            load_progress,
        } = options;
        let config = source.load()?;
        let data_dir = config.data_dir_path();
        std::fs::create_dir_all(&data_dir).map_err(|source| StartError::DataDir {
            path: data_dir.clone(),
            source,
        })?;

        // Database, keychain and model loading all block: keep them off the runtime.
        let blocking_config = config.clone();
        let blocking_dir = data_dir.clone();
        let (store, secrets, identity, (api_key, hf_token), (client_keys, responses, adapters)) =
            blocking(move || {
                let store = Store::open(&blocking_dir.join("node.db"))?;
                let client_keys = crate::keys::ClientKeys::open(store.clone())?;
                let responses = crate::responses::Responses::open(store.clone())?;
                let adapters =
                    crate::adapters::Adapters::open(store.clone(), blocking_dir.join("adapters"))?;
                let secrets = SecretStore::open(&blocking_dir, &blocking_config.secret_store)?;
                let identity = Identity::load_or_create(&secrets)?;
                let api_key = identity::load_or_create_api_key(&secrets)?;
                let hf_token = secrets
                    .get(HF_TOKEN_SECRET)?
                    .filter(|t| !t.is_empty())
                    .or_else(|| {
                        std::env::var("HF_TOKEN")
                            .ok()
                            .filter(|t| !t.is_empty())
                            .map(Zeroizing::new)
                    });
                Ok::<_, StartError>((
                    store,
                    secrets,
                    identity,
                    (api_key, hf_token),
                    (client_keys, responses, adapters),
                ))
            })
            .await??;
        tracing::info!(
            node_id = %identity.node_id(),
            data_dir = %data_dir.display(),
            secrets = ?secrets.backend(),
            "node identity ready"
        );

        let engine = if config.model.is_empty() {
            tracing::warn!(
                "no model configured; inference endpoints answer 503 until one is set (--model PATH)"
            );
            None
        } else {
            let engine_config = engine_config(&config);
            let progress = load_progress.unwrap_or_else(|| Box::new(|_| {}));
            Some(blocking(move || Engine::load(engine_config, progress)).await??)
        };

        let totals = {
            let store = store.clone();
            blocking(move || store.request_totals()).await??
        };
        let metrics = Metrics::new(totals);
        if let Some(engine) = &engine {
            metrics.set_model_loaded(&engine.info().id);
        }
        let nickname = {
            let store = store.clone();
            blocking(move || store.setting("nickname")).await??
        };
        let encrypted = {
            let store = store.clone();
            blocking(move || store.setting(ENCRYPTED_KEY)).await??
        }
        .and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or_default();
        let private_mode: crate::pool::PrivateMode = {
            let store = store.clone();
            blocking(move || store.setting(PRIVATE_MODE_KEY)).await??
        }
        .and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or_default();
        let (pipeline_config, host_config) = pipeline_config(&config);
        let pipeline = Pipeline::start(
            pipeline_config,
            host_config,
            identity.clone(),
            store.clone(),
        )
        .map_err(|e| StartError::Task(format!("starting the range host: {e}")))?;

        let pools = crate::pool::Pools::with_clock(
            store.clone(),
            identity.node_id(),
            config.pool_max_devices,
            pool_clock(),
        );
        let ledger = crate::credits::Ledger::new(store.clone(), identity.node_id());
        let credits = {
            let (identity, pools) = (identity.clone(), pools.clone());
            blocking(move || crate::credits::Credits::new(ledger, identity, pools)).await?
        };
        let swarm = {
            let (store, id) = (store.clone(), identity.node_id());
            let window = Duration::from_secs(u64::from(config.demand_window_secs));
            blocking(move || crate::swarm::Swarm::open(store, id, window)).await??
        };
        let shutdown = CancellationToken::new();
        let node = Node {
            inner: Arc::new(Inner {
                config: RwLock::new(config.clone()),
                source,
                data_dir,
                store,
                secrets,
                identity,
                api_key,
                client_keys,
                adapters,
                responses,
                providers: crate::providers::Providers::new(),
                engine,
                pipeline,
                pools,
                credits,
                swarm,
                network: OnceLock::new(),
                nickname: RwLock::new(nickname),
                encrypted: RwLock::new(encrypted),
                private_mode: tokio::sync::watch::Sender::new(private_mode),
                metrics,
                started: Instant::now(),
                started_at: chrono::Utc::now(),
                shutdown: shutdown.clone(),
                tasks: crate::tasks::Tasks::new(shutdown),
                hf_token: RwLock::new(hf_token),
                hub: std::sync::Mutex::new(None),
                updates: crate::update::Updates::default(),
            }),
        };
        let weak = Arc::downgrade(&node.inner);
        node.inner
            .pipeline
            .set_encryption_policy(Arc::new(move |model: &str| {
                weak.upgrade().is_some_and(|inner| {
                    let own = inner
                        .encrypted
                        .read()
                        .unwrap_or_else(|p| p.into_inner())
                        .get(model)
                        .copied();
                    own.unwrap_or_else(|| {
                        inner
                            .config
                            .read()
                            .unwrap_or_else(|p| p.into_inner())
                            .encrypted_pipeline
                    })
                })
            }));
        let weak = Arc::downgrade(&node.inner);
        node.inner.credits.set_rates(Arc::new(move || {
            let Some(inner) = weak.upgrade() else {
                return crate::credits::Rates::default();
            };
            let c = inner.config.read().unwrap_or_else(|p| p.into_inner());
            crate::credits::Rates::from_credits(c.credit_rate_layer_token, c.credit_rate_token)
        }));
        node.inner.pipeline.set_accounting(Arc::new(Observers {
            credits: node.inner.credits.clone(),
            swarm: node.inner.swarm.clone(),
        }));
        let (swarm, pools) = (node.inner.swarm.clone(), node.inner.pools.clone());
        let (limits, max_sessions) = (node.inner.swarm.clone(), config.pipeline_max_sessions);
        node.inner
            .pipeline
            .set_serve_policy(crate::pipeline::ServePolicy {
                contributing: Arc::new(move || swarm.contributing()),
                pool_members: Arc::new(move || pools.accepted_members().unwrap_or_default()),
                session_limit: Arc::new(move || limits.session_limit(max_sessions)),
            });
        let weak = Arc::downgrade(&node.inner);
        node.inner.pipeline.set_peer_policy(Arc::new(move || {
            let inner = weak.upgrade()?;
            let mode = *inner.private_mode.borrow();
            if !mode.enabled {
                return None;
            }
            // Only devices that accepted their invitation count.
            let members = inner.pools.accepted_members().unwrap_or_default();
            Some((members, mode.allow_lan))
        }));
        if config.p2p_enabled {
            let hardware = blocking(hardware_summary).await?;
            node.inner.swarm.set_hardware(hardware.clone());
            let mut net = net_config(&config);
            // Offline mode: discovery by mDNS only (when `mdns` is on, the default).
            net.offline = node.private_mode().offline_mode;
            let tasks = node.inner.tasks.clone();
            let network = Network::start(
                &node.inner.identity,
                node.inner.store.clone(),
                net,
                local_info(Arc::downgrade(&node.inner), hardware),
                tasks.clone(),
            )
            .await?;
            node.inner.pipeline.attach(network.clone(), tasks.clone());
            node.inner.credits.attach(network.clone(), tasks.clone());
            node.inner
                .pools
                .attach(network.clone(), node.inner.identity.clone(), tasks.clone());
            // Shards pinned to this device are fetched (pinned ones come first:
            // they are asked for as soon as the pin arrives).
            let (pinned_tx, mut pinned) =
                tokio::sync::mpsc::unbounded_channel::<crate::pool::Pin>();
            node.inner.pools.on_pinned(pinned_tx);
            let pipeline = node.inner.pipeline.clone();
            tasks.spawn(async move {
                while let Some(pin) = pinned.recv().await {
                    // The pin may arrive before the holders' announcements: keep
                    // asking for a minute.
                    let mut tries = 0;
                    let manifest = loop {
                        match pipeline.ensure_manifest(&pin.model_id).await {
                            Ok(m) => break Some(m),
                            Err(crate::pipeline::transfer::TransferError::NoHolder(_))
                                if tries < 60 =>
                            {
                                tries += 1;
                                tokio::time::sleep(Duration::from_secs(1)).await;
                            }
                            Err(e) => {
                                tracing::warn!(model = %pin.model_id, error = %e, "cannot fetch a pinned model");
                                break None;
                            }
                        }
                    };
                    let Some(manifest) = manifest else { continue };
                    for s in manifest.shards.iter().filter(|s| pin.covers(s.index)) {
                        if let Err(e) = pipeline.download_shard(&pin.model_id, s.index).await {
                            tracing::warn!(model = %pin.model_id, shard = s.index, error = %e,
                                "cannot fetch a pinned shard");
                        }
                    }
                }
            });
            let _ = node.inner.network.set(network);
        }
        if config.serve_shards {
            let models = node.inner.pipeline.load_held().await;
            if !models.is_empty() {
                tracing::info!(
                    models = models.len(),
                    ranges = node.inner.pipeline.host().ranges().len(),
                    "sharded models scanned"
                );
            }
            // Auto-manage: it acts only for models (or a default) the user enabled.
            if node.inner.network.get().is_some() {
                crate::swarm::spawn_manager(node.clone());
            }
            // Hub downloads a crash or restart interrupted carry on.
            let this = node.clone();
            node.inner.tasks.spawn(async move {
                match this.hub() {
                    Ok(hub) => this.inner.pipeline.resume_hub_downloads(&hub).await,
                    Err(e) => {
                        tracing::warn!(error = %e, "no Hub client; Hub downloads not resumed")
                    }
                }
            });
        }
        Ok(node)
    }

    /// The Hub client for the configured endpoint and the token in force.
    pub fn hub(&self) -> Result<crate::hub::Hub, crate::hub::HubError> {
        let endpoint = crate::hub::HubSettings::endpoint_from(&self.config().hf_endpoint);
        let token = self
            .inner
            .hf_token
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let mut slot = self.inner.hub.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = slot.as_ref()
            && s.endpoint == endpoint
            && s.token == token
        {
            return Ok(s.hub.clone());
        }
        let hub = crate::hub::Hub::new(crate::hub::HubSettings {
            endpoint: endpoint.clone(),
            token: token.as_ref().map(|t| t.to_string()),
        })?;
        *slot = Some(HubSlot {
            endpoint,
            token,
            hub: hub.clone(),
        });
        Ok(hub)
    }

    /// Stores (or, with `None`, clears) the Hugging Face token with the other
    /// secrets. Blocking: the keychain may be slow.
    pub fn set_hf_token(&self, token: Option<&str>) -> Result<(), SecretError> {
        self.inner
            .secrets
            .set(HF_TOKEN_SECRET, token.unwrap_or(""))?;
        *self
            .inner
            .hf_token
            .write()
            .unwrap_or_else(|p| p.into_inner()) = token.map(|t| Zeroizing::new(t.to_string()));
        Ok(())
    }

    /// Whether a Hugging Face token is set.
    pub fn has_hf_token(&self) -> bool {
        self.inner
            .hf_token
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }

    /// This node's credits (ledger, receipts, transfers).
    pub fn credits(&self) -> &crate::credits::Credits {
        &self.inner.credits
    }

    /// This node's device-pool records.
    pub fn pools(&self) -> &crate::pool::Pools {
        &self.inner.pools
    }

    /// Demand counting, auto-manage settings and activity.
    pub fn swarm(&self) -> &crate::swarm::Swarm {
        &self.inner.swarm
    }

    /// This build's updates.
    pub fn updates(&self) -> &crate::update::Updates {
        &self.inner.updates
    }

    /// Gives the node the shell's way of updating this build, and starts the
    /// periodic checks (`update_check_interval_hours`). `false` if it had one.
    pub fn set_updater(&self, updater: Arc<dyn crate::update::Updater>) -> bool {
        if !self.inner.updates.set_updater(updater) {
            return false;
        }
        let hours = self.config().update_check_interval_hours;
        let every = std::time::Duration::from_secs(u64::from(hours) * 3600);
        let (updates, stop) = (self.inner.updates.clone(), self.shutdown_token());
        self.inner
            .tasks
            .spawn(updates.check_periodically(every, stop));
        true
    }

    /// The node's background tasks.
    pub(crate) fn tasks(&self) -> &crate::tasks::Tasks {
        &self.inner.tasks
    }

    /// Split inference: this node's layer ranges and the requester side.
    pub fn pipeline(&self) -> &Pipeline {
        &self.inner.pipeline
    }

    /// The P2P layer, unless `p2p_enabled` is off.
    pub fn network(&self) -> Option<&Network> {
        self.inner.network.get()
    }

    /// The config in effect.
    pub fn config(&self) -> Config {
        self.inner
            .config
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The config file.
    pub fn config_path(&self) -> &Path {
        &self.inner.source.path
    }

    /// The data dir.
    pub fn data_dir(&self) -> &Path {
        &self.inner.data_dir
    }

    /// The database.
    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    /// The node's identity.
    pub fn identity(&self) -> &Identity {
        &self.inner.identity
    }

    /// 64 hex characters of the node's public key.
    pub fn node_id(&self) -> String {
        self.inner.identity.node_id()
    }

    /// Where secrets are kept.
    pub fn secret_backend(&self) -> SecretBackend {
        self.inner.secrets.backend()
    }

    /// The bearer API key.
    pub fn api_key(&self) -> &str {
        &self.inner.api_key
    }

    /// Compares `candidate` with the API key in constant time.
    pub fn api_key_matches(&self, candidate: &str) -> bool {
        use subtle::ConstantTimeEq;
        // Hash both so the comparison length never depends on the candidate.
        let a = blake3::hash(candidate.as_bytes());
        let b = blake3::hash(self.inner.api_key.as_bytes());
        a.as_bytes().ct_eq(b.as_bytes()).into()
    }

    /// Inference-only client keys.
    pub fn client_keys(&self) -> &crate::keys::ClientKeys {
        &self.inner.client_keys
    }

    /// Registered LoRA adapters.
    pub fn adapters(&self) -> &crate::adapters::Adapters {
        &self.inner.adapters
    }

    /// Cloud providers.
    pub fn providers(&self) -> &crate::providers::Providers {
        &self.inner.providers
    }

    /// The secret store (keychain or encrypted file). Blocking to use.
    pub(crate) fn secrets(&self) -> &SecretStore {
        &self.inner.secrets
    }

    /// The Responses API's records and runs.
    pub fn responses(&self) -> &crate::responses::Responses {
        &self.inner.responses
    }

    /// The inference engine, when a model is loaded.
    pub fn engine(&self) -> Option<&Engine> {
        self.inner.engine.as_ref()
    }

    /// Counters.
    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// Time since start.
    pub fn uptime(&self) -> std::time::Duration {
        self.inner.started.elapsed()
    }

    /// When the node started.
    pub fn started_at(&self) -> chrono::DateTime<chrono::Utc> {
        self.inner.started_at
    }

    /// Cancelled when the node is asked to shut down.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.inner.shutdown.clone()
    }

    /// Asks the node to shut down gracefully.
    pub fn request_shutdown(&self) {
        tracing::info!("shutdown requested");
        self.inner.shutdown.cancel();
    }

    /// Shuts the node down and waits (up to `limit`) until every background task
    /// has ended; whether all did. Once the last handle is dropped, the database
    /// and the ports are released (the HTTP server stops on the same signal).
    pub async fn stop(&self, limit: std::time::Duration) -> bool {
        tracing::info!("stopping");
        self.inner.tasks.stop(limit).await
    }

    /// Background tasks still running (for tests and diagnostics).
    pub fn running_tasks(&self) -> usize {
        self.inner.tasks.running()
    }

    /// The node's nickname.
    pub fn nickname(&self) -> Option<String> {
        self.inner
            .nickname
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Sets (or with `None` clears) the nickname, and announces the change.
    pub async fn set_nickname(&self, nickname: Option<String>) -> Result<(), StoreError> {
        let store = self.inner.store.clone();
        let value = nickname.clone();
        tokio::task::spawn_blocking(move || store.set_setting("nickname", value.as_deref()))
            .await
            .map_err(|e| StoreError::Task(e.to_string()))??;
        *self
            .inner
            .nickname
            .write()
            .unwrap_or_else(|p| p.into_inner()) = nickname;
        if let Some(network) = self.network() {
            network.announce_now().await;
        }
        Ok(())
    }

    /// The encrypted-pipeline setting of `model_id`: `(enabled, its own setting)`;
    /// without its own setting the global `encrypted_pipeline` applies.
    pub fn encrypted_pipeline(&self, model_id: &str) -> (bool, Option<bool>) {
        let own = self
            .inner
            .encrypted
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(model_id)
            .copied();
        (self.inner.pipeline.encrypted(model_id), own)
    }

    /// Sets (persisted) the encrypted-pipeline setting of `model_id`.
    pub async fn set_encrypted_pipeline(&self, model_id: &str, on: bool) -> Result<(), StoreError> {
        let text = {
            let mut map = self
                .inner
                .encrypted
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            map.insert(model_id.to_string(), on);
            serde_json::to_string(&map).unwrap_or_default()
        };
        let store = self.inner.store.clone();
        let saved = text.clone();
        tokio::task::spawn_blocking(move || store.set_setting(ENCRYPTED_KEY, Some(&saved)))
            .await
            .map_err(|e| StoreError::Task(e.to_string()))??;
        // Memory follows the database, never the other way round.
        *self
            .inner
            .encrypted
            .write()
            .unwrap_or_else(|p| p.into_inner()) = serde_json::from_str(&text).unwrap_or_default();
        Ok(())
    }

    /// Private mode as set.
    pub fn private_mode(&self) -> crate::pool::PrivateMode {
        *self.inner.private_mode.borrow()
    }

    /// Sets (persisted) private mode. Whether the network must restart for
    /// `offline_mode` to take effect.
    pub async fn set_private_mode(
        &self,
        mode: crate::pool::PrivateMode,
    ) -> Result<bool, StoreError> {
        let text = serde_json::to_string(&mode).unwrap_or_default();
        let store = self.inner.store.clone();
        tokio::task::spawn_blocking(move || store.set_setting(PRIVATE_MODE_KEY, Some(&text)))
            .await
            .map_err(|e| StoreError::Task(e.to_string()))??;
        let before = self.inner.private_mode.send_replace(mode);
        Ok(before.offline_mode != mode.offline_mode)
    }

    /// Follows private mode: the receiver sees every change, whoever makes it
    /// (API, CLI, desktop tray).
    pub fn watch_private_mode(&self) -> tokio::sync::watch::Receiver<crate::pool::PrivateMode> {
        self.inner.private_mode.subscribe()
    }

    /// Announces this node's state to peers now (after its models changed).
    pub async fn announce_soon(&self) {
        if let Some(network) = self.network() {
            network.announce_now().await;
        }
    }

    /// Applies a partial config change: validates it, writes it to the config file,
    /// and puts hot-reloadable fields into effect at once.
    pub fn update_config(
        &self,
        changes: &Map<String, Value>,
    ) -> Result<ConfigChange, UpdateConfigError> {
        let current = self.config();
        let wanted = current.patched(changes)?;
        let updated: Vec<String> = changes
            .keys()
            .filter(|k| current.to_json().get(*k) != wanted.to_json().get(*k))
            .cloned()
            .collect();
        self.inner.source.persist(changes)?;
        Ok(self.apply(wanted, updated))
    }

    /// Re-reads the config file and environment and applies what can change live.
    pub fn reload_config(&self) -> Result<ConfigChange, UpdateConfigError> {
        let wanted = self.inner.source.load()?;
        let updated = self.config().changed_fields(&wanted);
        Ok(self.apply(wanted, updated))
    }

    fn apply(&self, wanted: Config, updated: Vec<String>) -> ConfigChange {
        let restart_required = Config::restart_required(&updated);
        let mut guard = self.inner.config.write().unwrap_or_else(|p| p.into_inner());
        // Hot fields switch now; restart-only fields keep their running values.
        let mut running = guard.to_json();
        for (key, value) in wanted.to_json() {
            if !restart_required.contains(&key) {
                running.insert(key, value);
            }
        }
        if let Ok(next) = serde_json::from_value::<Config>(Value::Object(running)) {
            self.inner
                .swarm
                .demand()
                .set_window(Duration::from_secs(u64::from(next.demand_window_secs)));
            *guard = next;
        }
        let config = guard.to_json();
        drop(guard);
        if !updated.is_empty() {
            tracing::info!(?updated, ?restart_required, "configuration changed");
        }
        ConfigChange {
            updated,
            restart_required,
            config,
        }
    }
}

/// Settings key of private mode.
const PRIVATE_MODE_KEY: &str = "private_mode";

/// Settings key of the per-model encrypted-pipeline map.
const ENCRYPTED_KEY: &str = "encrypted_pipeline";

/// The P2P settings a config implies.
pub fn net_config(config: &Config) -> NetConfig {
    NetConfig {
        listen_host: config.p2p_host.clone(),
        port: config.p2p_port,
        mdns: config.mdns,
        bootstrap: config.bootstrap.clone(),
        network_name: config.network_name.clone(),
        announce_interval: Duration::from_secs(config.announce_interval_secs as u64),
        region: crate::net::detect_region(&config.region),
        offline: false,
        ban_below_trust: i64::from(config.peer_ban_trust),
        cool_off: Duration::from_secs(u64::from(config.peer_cool_off_secs)),
    }
}

fn hardware_summary() -> HardwareSummary {
    let hw = crate::hardware::snapshot();
    let gib = |b: u64| (b as f64 / (1u64 << 30) as f64 * 10.0).round() / 10.0;
    HardwareSummary {
        cpu: hw.cpu_model,
        cores: hw.cpu_threads as u32,
        ram_gb: gib(hw.ram_total),
        gpus: hw.gpus.iter().map(|g| g.description.clone()).collect(),
        vram_gb: gib(hw.gpus.iter().map(|g| g.memory_total).sum()),
    }
}

/// What the node announces about itself, read fresh at each announcement.
fn local_info(node: Weak<Inner>, hardware: HardwareSummary) -> crate::net::LocalInfoFn {
    Arc::new(move || {
        let Some(inner) = node.upgrade() else {
            return LocalInfo::default();
        };
        let mut capabilities = vec!["relay".to_string(), "rpc".to_string()];
        let mut models = Vec::new();
        let mut load = Load::default();
        if let Some(engine) = &inner.engine {
            capabilities.insert(0, "inference".into());
            let info = engine.info();
            models.push(HostedModel {
                id: info.id.clone(),
                layer_start: 0,
                layer_end: info.n_layers,
                n_layers: info.n_layers,
                ms_per_layer: None,
                manifest_hash: None,
            });
            load.queue_depth = engine.queue_depth() as u32;
        }
        let ranges = inner.pipeline.host().ranges();
        if !ranges.is_empty() && !capabilities.iter().any(|c| c == "inference") {
            capabilities.insert(0, "inference".into());
        }
        for r in ranges {
            models.push(HostedModel {
                manifest_hash: inner.pipeline.manifest_hash(&r.model_id),
                id: r.model_id,
                layer_start: r.layer_start,
                layer_end: r.layer_end,
                n_layers: r.n_layers,
                ms_per_layer: r.ms_per_layer,
            });
        }
        load.requests_per_minute = inner.metrics.summary().requests_per_minute;
        load.demand = inner.swarm.demand().snapshot();
        if !inner.swarm.contributing() {
            load.contributing = Some(false);
        }
        let config = inner.config.read().unwrap_or_else(|p| p.into_inner());
        if config.auto_manage
            || inner
                .swarm
                .settings()
                .auto_manage_all()
                .values()
                .any(|a| a.enabled == Some(true))
        {
            capabilities.push(crate::swarm::AUTO_CAPABILITY.to_string());
            let used: u64 = inner
                .pipeline
                .local_models()
                .iter()
                .map(|m| m.disk_bytes())
                .sum();
            // The same room this node's own auto-manage fetches within: the
            // budget left (at its contribution level) and what fits in RAM.
            let room = crate::swarm::placement::room(
                inner.swarm.budget_bytes(config.disk_budget_mb),
                used,
                Some(crate::hardware::available_memory()).filter(|m| *m > 0),
            );
            load.auto_free_mb = Some((room / 1_048_576).min(u64::from(u32::MAX)));
        }
        drop(config);
        load.steps_served = inner.pipeline.host().steps_served();
        // Sessions working in the range host count as queued work: requesters
        // weigh busy holders down (sessions kept idle for a next turn do not).
        load.queue_depth = load.queue_depth.saturating_add(
            u32::try_from(inner.pipeline.host().active_count()).unwrap_or(u32::MAX),
        );
        load.uptime_secs = inner.started.elapsed().as_secs();
        load.credits = Some(inner.credits.summary());
        LocalInfo {
            nickname: inner
                .nickname
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
            capabilities,
            hardware: hardware.clone(),
            models,
            load,
        }
    })
}

/// Tells both the credit ledger and the demand counter about pipeline work.
struct Observers {
    credits: crate::credits::Credits,
    swarm: crate::swarm::Swarm,
}

impl crate::pipeline::Accounting for Observers {
    fn served(
        &self,
        requester: &str,
        session: &str,
        model_id: &str,
        layer_tokens: u64,
        sampled: bool,
    ) {
        self.swarm
            .demand()
            .record_served(model_id, requester, session);
        self.credits
            .served(requester, session, model_id, layer_tokens, sampled);
    }

    fn requested(&self, work: Vec<(String, crate::credits::Work)>) {
        self.credits.requested(work);
    }

    fn price(&self, node: &str, work: &crate::credits::Work) -> i64 {
        crate::pipeline::Accounting::price(&self.credits, node, work)
    }
}

/// The pipeline and range-host settings a config implies.
pub fn pipeline_config(config: &Config) -> (PipelineConfig, HostConfig) {
    let data = config.data_dir_path();
    let engine = engine_config(config);
    (
        PipelineConfig {
            models_dir: data.join("models"),
            ranges_dir: data.join("ranges"),
            dtype: crate::pipeline::wire::parse_dtype(&config.activation_dtype)
                .unwrap_or(crate::pipeline::activation::Dtype::F16),
            approximate: config.approximate_answers,
            slow_link_mbps: config.slow_link_mbps,
            speculative_tokens: config.speculative_tokens,
            batch_size: config.batch_size,
            context_size: config.context_size,
            backends_dir: engine.backends_dir.clone(),
            link_idle: Duration::from_secs(config.pipeline_session_ttl_secs as u64),
        },
        HostConfig {
            threads: engine.threads,
            context_size: config.context_size,
            batch_size: config.batch_size,
            max_sessions: config.pipeline_max_sessions as usize,
            max_session_bytes: u64::from(config.pipeline_max_session_mb) << 20,
            session_ttl: Duration::from_secs(config.pipeline_session_ttl_secs as u64),
            gpu_layers: config.gpu_layers,
            poll: Duration::from_millis(u64::from(config.pipeline_poll_ms)),
        },
    )
}

/// The engine settings a config implies.
pub fn engine_config(config: &Config) -> EngineConfig {
    let model_path = PathBuf::from(&config.model);
    let model_id = if config.model_id.is_empty() {
        model_id_from_path(&model_path)
    } else {
        config.model_id.clone()
    };
    let threads = if config.threads == 0 {
        std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(1)
    } else {
        config.threads
    };
    EngineConfig {
        model_path,
        model_id,
        threads,
        gpu_layers: config.gpu_layers,
        context_size: config.context_size,
        batch_size: config.batch_size,
        max_queue: config.max_queue as usize,
        max_parallel: config.max_parallel as usize,
        backends_dir: (!config.backends_dir.is_empty())
            .then(|| PathBuf::from(&config.backends_dir)),
    }
}

/// `SmolLM2-135M-Instruct.Q4_1.gguf` → `smollm2-135m-instruct.q4_1`.
pub fn model_id_from_path(path: &Path) -> String {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| "model".into());
    let stem = name.strip_suffix(".gguf").unwrap_or(&name);
    // A multi-part GGUF is named by its model, not by its first part.
    let stem = match crate::shard::parts::part_names(&name) {
        Some(_) => stem
            .rsplit_once("-of-")
            .and_then(|(rest, _)| rest.rsplit_once('-'))
            .map_or(stem, |(base, _)| base),
        None => stem,
    };
    stem.to_ascii_lowercase()
}

/// The clock of pool operations: wall time, shifted by the number of seconds in
/// the file `SWARMLLM_TEST_CLOCK_OFFSET_FILE` names when that is set (a test hook,
/// so end-to-end tests can let invite codes expire).
fn pool_clock() -> crate::pool::Clock {
    // Only builds with the `test-hooks` feature read the variable.
    let offset_file = if cfg!(feature = "test-hooks") {
        std::env::var_os("SWARMLLM_TEST_CLOCK_OFFSET_FILE").map(PathBuf::from)
    } else {
        None
    };
    Arc::new(move || {
        let offset = offset_file
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .and_then(|t| t.trim().parse::<i64>().ok())
            .unwrap_or(0);
        chrono::Utc::now().timestamp() + offset
    })
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, StartError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StartError::Task(e.to_string()))
}
