//! Split inference across peers.
//!
//! ```text
//!  requester                 hop 1 (layers 0..10)      hop 2 (10..20)       hop 3 (20..30, head)
//!  tokens ──sealed──▶ embed + layers ──f16 frame──▶ layers ──f16 frame──▶ layers + sample
//!     ▲                                                                          │
//!     └──────────── sealed token, back along the open links ◀────────────────────┘
//! ```
//!
//! Each arrow is a link (`net::link`): a stream kept open for the session, so a
//! step costs one frame each way and no connection or stream set-up.
//!
//! - [`host`]: the thread that owns this node's loaded layer ranges and the KV cache
//!   of every session passing through them;
//! - [`wire`] and [`activation`]: the bytes of a step, sealed per link;
//! - [`route`]: the cheapest chain of holders, with a standby per span;
//! - [`generate`]: the requester's side — tokenize, run the chain step by step,
//!   detokenize and stop like the local engine, and on a hop's death re-route and
//!   replay the session so the client sees the same tokens.
//!
//! A node serves steps for others and requests them for its own clients through the
//! same [`Pipeline::execute`]: compute the local range, forward the rest.

pub mod activation;
mod generate;
pub mod host;
pub mod latency;
mod pins;
pub mod route;
pub mod transfer;
pub mod wire;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::model::params::LlamaModelParams;
use tokio::sync::mpsc;

use self::activation::{Direction, Dtype, Header, LinkSecret, SessionKey};
use self::host::{RangeHost, RangeInfo, Step, StepInput, StepOutput};
use self::route::{Holder, NoRoute, Plan};
use self::wire::{Envelope, InputKind, StepFailure};
use crate::identity::{self, Identity};
use crate::net::frame::{Request, Response};
use crate::net::link::{InboundLink, Link};
use crate::net::{InboundStep, Network};
use crate::shard::ModelDir;
use crate::shard::library::{self, LocalModel};

/// Requests from other nodes processed at once (more wait in the handler's queue).
const INBOUND_QUEUE: usize = 64;
/// Links from other nodes served at once (each carries one session's steps at a
/// time); more are refused.
const MAX_INBOUND_LINKS: usize = 256;
/// Peers whose link secret is kept (the cache starts over when it is full).
const MAX_LINKS: usize = 4096;

/// Whether the encrypted pipeline is on for a model.
pub type EncryptionPolicy = Arc<dyn Fn(&str) -> bool + Send + Sync>;

/// Which peers a route may use: `None` for any; `Some((node ids, allow_lan))` in
/// private mode (the pool's devices, plus peers on the LAN when allowed). Called
/// on the blocking pool (it may read the database).
pub type PeerPolicy = Arc<dyn Fn() -> Option<(HashSet<String>, bool)> + Send + Sync>;

/// Who is told about pipeline work (the credit ledger), so the pipeline itself
/// knows nothing of credits.
pub trait Accounting: Send + Sync {
    /// This node ran `layer_tokens` layer × token rows of `model_id` for
    /// `requester` in `session` (hex), sampling a token if `sampled`.
    fn served(
        &self,
        requester: &str,
        session: &str,
        model_id: &str,
        layer_tokens: u64,
        sampled: bool,
    );
    /// A generation this node requested has ended: per other node, the work sent
    /// through it in each session (an upper bound: failed attempts count).
    fn requested(&self, work: Vec<(String, crate::credits::Work)>);
}

/// Pipeline settings.
#[derive(Debug, Clone)]
pub struct PipelineConfig {
    /// `<data>/models`.
    pub models_dir: PathBuf,
    /// `<data>/ranges` (assembled range files).
    pub ranges_dir: PathBuf,
    /// How hidden states travel.
    pub dtype: Dtype,
    /// Rows per step (the engine's batch size).
    pub batch_size: u32,
    /// Longest session in tokens.
    pub context_size: u32,
    /// Folder of ggml backend modules (`gpu` builds).
    pub backends_dir: Option<PathBuf>,
    /// A link from another node that carries no step for this long is closed
    /// (the session TTL).
    pub link_idle: std::time::Duration,
}

/// Cloneable handle to this node's part in split inference.
#[derive(Clone)]
pub struct Pipeline {
    inner: Arc<Inner>,
}

struct Inner {
    config: PipelineConfig,
    host: RangeHost,
    node_id: String,
    x25519: x25519_dalek::StaticSecret,
    /// X25519 secret shared with each peer, by node id.
    links: Mutex<HashMap<String, LinkSecret>>,
    network: OnceLock<Network>,
    /// The node's tasks (set when a network is attached).
    tasks: OnceLock<crate::tasks::Tasks>,
    vocabs: Mutex<HashMap<String, Arc<LlamaModel>>>,
    local: Mutex<Vec<LocalModel>>,
    /// Model directories the last scan skipped (bad manifests), with why.
    rejected: Mutex<Vec<library::RejectedModel>>,
    downloads: transfer::Downloads,
    /// Per-model encrypted-pipeline decision.
    encryption: OnceLock<EncryptionPolicy>,
    /// Private mode's restriction of routes.
    peers_allowed: OnceLock<PeerPolicy>,
    accounting: OnceLock<Arc<dyn Accounting>>,
    /// Bytes of pipeline requests this node sent plus the responses it got.
    wire_bytes: std::sync::atomic::AtomicU64,
    /// The overhead of the links this node sends steps on.
    link_latency: latency::LinkLatency,
    /// The manifest hash accepted for each model id.
    pins: pins::ManifestPins,
    /// Serialises [`Pipeline::load_held`].
    reload: tokio::sync::Mutex<()>,
    /// Shards held but kept out of memory (`shards/{i}/unload`), by model.
    unloaded: Mutex<HashMap<String, HashSet<u32>>>,
    /// Shards found damaged, to fetch again once a network is attached.
    repairs: mpsc::UnboundedSender<(String, u32)>,
    repairs_rx: Mutex<Option<mpsc::UnboundedReceiver<(String, u32)>>>,
}

impl std::fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipeline")
            .field("node_id", &self.inner.node_id)
            .finish_non_exhaustive()
    }
}

/// A connected peer as its announcements describe it.
#[derive(Debug, Clone)]
struct PeerView {
    node_id: String,
    models: Vec<crate::net::announce::HostedModel>,
    rtt_ms: Option<f64>,
    queue_depth: u32,
    trust: i64,
    /// The address of the live connection.
    address: String,
}

/// A model the network (or this node) can serve.
#[derive(Debug, Clone, serde::Serialize)]
pub struct NetworkModel {
    /// Model id.
    pub id: String,
    /// Layers.
    pub n_layers: u32,
    /// Nodes holding some of it (this one included) with the manifest accepted
    /// here (or any, when none is).
    pub holders: Vec<Holder>,
    /// The manifest hash accepted here.
    pub manifest_hash: Option<String>,
    /// Every manifest hash announced for the id (this node's included), with
    /// the nodes announcing it: more than one is a conflict.
    pub manifest_hashes: std::collections::BTreeMap<String, Vec<String>>,
}

impl Pipeline {
    /// Starts the range host.
    pub fn start(
        config: PipelineConfig,
        host: host::HostConfig,
        identity: Identity,
        store: crate::store::Store,
    ) -> std::io::Result<Self> {
        let host = RangeHost::start(host)?;
        let (repairs, repairs_rx) = mpsc::unbounded_channel();
        Ok(Self {
            inner: Arc::new(Inner {
                node_id: identity.node_id(),
                x25519: identity.x25519_secret(),
                links: Mutex::new(HashMap::new()),
                config,
                host,
                network: OnceLock::new(),
                tasks: OnceLock::new(),
                vocabs: Mutex::new(HashMap::new()),
                local: Mutex::new(Vec::new()),
                rejected: Mutex::new(Vec::new()),
                downloads: transfer::Downloads::default(),
                unloaded: Mutex::new(HashMap::new()),
                reload: tokio::sync::Mutex::new(()),
                pins: pins::ManifestPins::new(store),
                encryption: OnceLock::new(),
                peers_allowed: OnceLock::new(),
                accounting: OnceLock::new(),
                wire_bytes: std::sync::atomic::AtomicU64::new(0),
                link_latency: latency::LinkLatency::default(),
                repairs,
                repairs_rx: Mutex::new(Some(repairs_rx)),
            }),
        })
    }

    /// Bytes of pipeline steps this node sent, with the answers it received.
    pub fn wire_bytes(&self) -> u64 {
        self.inner
            .wire_bytes
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The recent overhead of the links this node sent steps on (the wait for an
    /// answer minus the time the answering node spent).
    pub fn link_latency(&self) -> latency::LatencySummary {
        self.inner.link_latency.summary()
    }

    /// The range host.
    pub fn host(&self) -> &RangeHost {
        &self.inner.host
    }

    /// Serves other nodes' steps arriving on `network`, and uses it for ours;
    /// everything it spawns is one of `tasks`.
    pub fn attach(&self, network: Network, tasks: crate::tasks::Tasks) {
        let (tx, mut rx) = mpsc::channel::<InboundStep>(INBOUND_QUEUE);
        network.set_step_handler(tx);
        let _ = self.inner.network.set(network);
        let _ = self.inner.tasks.set(tasks);
        // Damaged shards are fetched again from holders.
        let repairs = self
            .inner
            .repairs_rx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(mut repairs) = repairs {
            let this = self.clone();
            self.spawn(async move {
                while let Some((model, index)) = repairs.recv().await {
                    if let Err(e) = this.download_shard(&model, index).await {
                        tracing::warn!(%model, shard = index, error = %e, "could not re-fetch a damaged shard");
                    }
                }
            });
        }
        // Pipeline steps arrive on links, one task per link.
        if let Some(mut links) = self.inner.network.get().and_then(Network::inbound_links) {
            let this = self.clone();
            let slots = Arc::new(tokio::sync::Semaphore::new(MAX_INBOUND_LINKS));
            self.spawn(async move {
                while let Some(link) = links.next().await {
                    let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
                        tracing::warn!(peer = %short(&link.from), "too many pipeline links; refusing one");
                        continue;
                    };
                    let serving = this.clone();
                    this.spawn(async move {
                        serving.serve_link(link).await;
                        drop(slot);
                    });
                }
            });
        }
        let this = self.clone();
        self.spawn(async move {
            while let Some(step) = rx.recv().await {
                let serving = this.clone();
                this.spawn(async move {
                    let response = match step.request {
                        Request::Fetch(fetch) => serving.serve_fetch(&step.from, fetch).await,
                        Request::Activation(_) => Response::Error {
                            code: 400,
                            message: format!(
                                "pipeline steps travel on {} links",
                                crate::net::link::PROTOCOL
                            ),
                        },
                        _ => Response::Error {
                            code: 400,
                            message: "unexpected request".into(),
                        },
                    };
                    step.responder.send(response).await;
                });
            }
        });
    }

    /// Runs `task` as one of the node's tasks (a plain task before a network
    /// is attached, when there are none to track).
    fn spawn<F>(&self, task: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        match self.inner.tasks.get() {
            Some(tasks) => tasks.spawn(task),
            None => {
                tokio::spawn(task);
            }
        }
    }

    /// Rescans the models directory and loads every contiguous run of intact
    /// shards as one layer range (replacing what was loaded). Damaged shards are
    /// reported and left out.
    pub async fn load_held(&self) -> Vec<LocalModel> {
        let cfg = self.inner.config.clone();
        // One reload at a time (downloads finishing together would interleave).
        let _one_at_a_time = self.inner.reload.lock().await;
        let this = self.clone();
        let scan = tokio::task::spawn_blocking(move || {
            let scan = library::scan(&cfg.models_dir);
            // The manifests on disk are the user's choice: they pin their ids.
            if let Err(e) = this.inner.pins.reload() {
                tracing::warn!(error = %e, "could not read the manifest pins");
            }
            for m in &scan.models {
                if let Err(e) = this.inner.pins.set(&m.manifest.model_id, &m.manifest_hash) {
                    tracing::warn!(model = %m.manifest.model_id, error = %e, "could not pin a manifest");
                }
            }
            scan
        })
        .await
        .unwrap_or_default();
        let models = scan.models;
        *self
            .inner
            .rejected
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = scan.rejected;
        let mut wanted: Vec<(&LocalModel, u32, u32)> = Vec::new();
        for model in &models {
            for &bad in &model.corrupt {
                tracing::warn!(model = %model.manifest.model_id, shard = bad,
                    "shard file does not match its BLAKE3 hash; discarding it and fetching it again");
                if let Some(s) = model.manifest.shard(bad) {
                    let _ = std::fs::remove_file(model.dir.shard(s));
                }
                let _ = self
                    .inner
                    .repairs
                    .send((model.manifest.model_id.clone(), bad));
            }
            let skip = self
                .inner
                .unloaded
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&model.manifest.model_id)
                .cloned()
                .unwrap_or_default();
            for (first, last) in model.runs_without(&skip) {
                wanted.push((model, first, last));
            }
        }
        // Only what changed is unloaded or loaded, so sessions on unchanged ranges
        // live on.
        let loaded = self.inner.host.ranges();
        for r in &loaded {
            if !wanted.iter().any(|(m, a, b)| {
                m.manifest.model_id == r.model_id && *a == r.first_shard && *b == r.last_shard
            }) {
                self.inner
                    .host
                    .unload(&r.model_id, r.layer_start, r.layer_end)
                    .await;
            }
        }
        for (model, first, last) in wanted {
            let present = loaded.iter().any(|r| {
                r.model_id == model.manifest.model_id
                    && r.first_shard == first
                    && r.last_shard == last
            });
            if present {
                continue;
            }
            if let Err(e) = self.load_run(model, first, last).await {
                tracing::warn!(model = %model.manifest.model_id, first, last, error = %e,
                    "could not load a shard run");
            }
        }
        *self.inner.local.lock().unwrap_or_else(|p| p.into_inner()) = models.clone();
        models
    }

    async fn load_run(&self, model: &LocalModel, first: u32, last: u32) -> Result<(), String> {
        let m = &model.manifest;
        let (Some(a), Some(b)) = (m.shard(first), m.shard(last)) else {
            return Err(format!("shards {first}..={last} are not in the manifest"));
        };
        let ranges_dir = self.inner.config.ranges_dir.clone();
        let model_clone = model.clone();
        let path = tokio::task::spawn_blocking(move || {
            library::range_file(&model_clone, &ranges_dir, first, last)
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
        let info = RangeInfo {
            model_id: m.model_id.clone(),
            first_shard: first,
            last_shard: last,
            layer_start: a.layer_start,
            layer_end: b.layer_end,
            n_layers: m.n_layers,
            has_embedding: first == 0,
            has_head: last + 1 == m.shard_count(),
            path,
            ms_per_layer: None,
        };
        self.inner
            .host
            .load(info)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    /// Keeps shards `indices` of `model_id` out of memory (`load = false`) or lets
    /// them back in, then reloads the ranges. Returns the shards loaded afterwards.
    pub async fn set_loaded(&self, model_id: &str, indices: &[u32], load: bool) -> Vec<u32> {
        {
            let mut unloaded = self
                .inner
                .unloaded
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let set = unloaded.entry(model_id.to_string()).or_default();
            for i in indices {
                if load {
                    set.remove(i);
                } else {
                    set.insert(*i);
                }
            }
        }
        self.load_held().await;
        self.loaded_shards(model_id)
    }

    /// Shards of `model_id` currently loaded.
    pub fn loaded_shards(&self, model_id: &str) -> Vec<u32> {
        let mut out: Vec<u32> = self
            .inner
            .host
            .ranges()
            .into_iter()
            .filter(|r| r.model_id == model_id)
            .flat_map(|r| r.first_shard..=r.last_shard)
            .collect();
        out.sort_unstable();
        out
    }

    /// Removes `model_id` from this node: unloads it, cancels its downloads and
    /// deletes its directory. Whether it was there.
    pub async fn remove_model(&self, model_id: &str) -> std::io::Result<bool> {
        let Ok(dir) = ModelDir::new(&self.inner.config.models_dir, model_id) else {
            return Ok(false);
        };
        let dir = dir.path().to_path_buf();
        if !dir.is_dir() {
            return Ok(false);
        }
        self.cancel_downloads(model_id);
        for r in self
            .inner
            .host
            .ranges()
            .into_iter()
            .filter(|r| r.model_id == model_id)
        {
            self.inner
                .host
                .unload(model_id, r.layer_start, r.layer_end)
                .await;
        }
        tokio::task::spawn_blocking(move || std::fs::remove_dir_all(dir))
            .await
            .map_err(std::io::Error::other)??;
        self.inner
            .vocabs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(model_id);
        self.load_held().await;
        Ok(true)
    }

    /// Deletes one shard file of `model_id`. Whether it was there.
    pub async fn remove_shard(&self, model_id: &str, index: u32) -> std::io::Result<bool> {
        let Some(model) = self
            .local_models()
            .into_iter()
            .find(|m| m.manifest.model_id == model_id)
        else {
            return Ok(false);
        };
        let Some(entry) = model.manifest.shard(index) else {
            return Ok(false);
        };
        let path = model.dir.shard(entry);
        if !path.is_file() {
            return Ok(false);
        }
        std::fs::remove_file(&path)?;
        self.load_held().await;
        Ok(true)
    }

    /// The manifest hash this node accepted for `model_id`, if any.
    pub fn manifest_hash(&self, model_id: &str) -> Option<String> {
        self.inner.pins.get(model_id)
    }

    /// Model directories the last scan skipped because their manifest is bad.
    pub fn rejected_models(&self) -> Vec<library::RejectedModel> {
        self.inner
            .rejected
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The models in this node's models directory, as last scanned.
    pub fn local_models(&self) -> Vec<LocalModel> {
        self.inner
            .local
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Everyone who can run part of `model_id`: this node's ranges and those that
    /// connected peers announce.
    pub async fn holders(&self, model_id: &str) -> Vec<Holder> {
        self.holders_in(model_id, &self.peers().await)
    }

    /// [`Pipeline::holders`] over an already-read peer list.
    fn holders_in(&self, model_id: &str, peers: &[PeerView]) -> Vec<Holder> {
        let local = self
            .inner
            .host
            .ranges()
            .into_iter()
            .filter(|r| r.model_id == model_id)
            .map(|r| Holder {
                node_id: self.inner.node_id.clone(),
                local: true,
                layer_start: r.layer_start,
                layer_end: r.layer_end,
                rtt_ms: Some(0.0),
                ms_per_layer: r.ms_per_layer,
                queue_depth: 0,
            });
        // Holders of another manifest than the one accepted here are never used:
        // their shards would not fit ours.
        let pinned = self.inner.pins.get(model_id);
        let remote = peers.iter().flat_map(move |p| {
            let pinned = pinned.clone();
            p.models
                .iter()
                .filter(move |m| {
                    m.id == model_id
                        && (pinned.is_none()
                            || m.manifest_hash.is_none()
                            || m.manifest_hash == pinned)
                })
                .map(|m| Holder {
                    node_id: p.node_id.clone(),
                    local: false,
                    layer_start: m.layer_start,
                    layer_end: m.layer_end,
                    rtt_ms: p.rtt_ms,
                    ms_per_layer: m.ms_per_layer,
                    queue_depth: p.queue_depth,
                })
        });
        local.chain(remote).collect()
    }

    /// Every connected peer with what it announced: one directory read, shared
    /// by everything one decision needs (holders, layer count, trust, address).
    async fn peers(&self) -> Vec<PeerView> {
        let Some(network) = self.inner.network.get() else {
            return Vec::new();
        };
        let connected: HashMap<String, (Option<f64>, String)> = network
            .connected()
            .into_iter()
            .map(|p| (p.node_id, (p.latency_ms, p.address)))
            .collect();
        let records = network.peer_records(1000).await;
        records
            .into_iter()
            .filter_map(|r| {
                let (rtt, address) = connected.get(&r.node_id)?.clone();
                Some(PeerView {
                    models: serde_json::from_value(r.models).unwrap_or_default(),
                    rtt_ms: rtt.or(r.latency_ms),
                    queue_depth: r.load["queue_depth"].as_u64().unwrap_or(0) as u32,
                    trust: r.trust_score,
                    address,
                    node_id: r.node_id,
                })
            })
            .collect()
    }

    /// Every model this node or a connected peer holds some of, with its holders.
    pub async fn network_models(&self) -> Vec<NetworkModel> {
        let peers = self.peers().await;
        let mut n_layers: HashMap<String, u32> = HashMap::new();
        for r in self.inner.host.ranges() {
            n_layers.insert(r.model_id, r.n_layers);
        }
        for m in self.local_models() {
            n_layers.insert(m.manifest.model_id, m.manifest.n_layers);
        }
        for m in peers.iter().flat_map(|p| &p.models) {
            n_layers.entry(m.id.clone()).or_insert(m.n_layers);
        }
        let mut out: Vec<NetworkModel> = n_layers
            .into_iter()
            .map(|(id, n)| {
                let manifest_hash = self.inner.pins.get(&id);
                let mut manifest_hashes = std::collections::BTreeMap::<String, Vec<String>>::new();
                if let Some(h) = &manifest_hash
                    && self
                        .local_models()
                        .iter()
                        .any(|m| m.manifest.model_id == id)
                {
                    manifest_hashes
                        .entry(h.clone())
                        .or_default()
                        .push(self.inner.node_id.clone());
                }
                for p in &peers {
                    for m in p.models.iter().filter(|m| m.id == id) {
                        if let Some(h) = &m.manifest_hash {
                            let nodes = manifest_hashes.entry(h.clone()).or_default();
                            if !nodes.contains(&p.node_id) {
                                nodes.push(p.node_id.clone());
                            }
                        }
                    }
                }
                NetworkModel {
                    holders: self.holders_in(&id, &peers),
                    id,
                    n_layers: n,
                    manifest_hash,
                    manifest_hashes,
                }
            })
            .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }

    /// Decides per model whether the encrypted pipeline is on (set by the node,
    /// which keeps the per-model settings and the global default).
    pub fn set_encryption_policy(&self, policy: EncryptionPolicy) {
        let _ = self.inner.encryption.set(policy);
    }

    /// Reports work served and requested to `accounting` (set by the node).
    pub fn set_accounting(&self, accounting: Arc<dyn Accounting>) {
        let _ = self.inner.accounting.set(accounting);
    }

    fn accounting(&self) -> Option<&Arc<dyn Accounting>> {
        self.inner.accounting.get()
    }

    /// Restricts routes to some peers (private mode), set by the node.
    pub fn set_peer_policy(&self, policy: PeerPolicy) {
        let _ = self.inner.peers_allowed.set(policy);
    }

    /// Whether requests for `model_id` must embed and sample on this node.
    pub fn encrypted(&self, model_id: &str) -> bool {
        self.inner.encryption.get().is_some_and(|p| p(model_id))
    }

    /// Whether this node holds (on disk, intact) the first and the last shard of
    /// `model_id`, as the encrypted pipeline needs; and the shard count.
    pub fn holds_ends(&self, model_id: &str) -> (bool, bool, usize) {
        self.local_models()
            .into_iter()
            .find(|m| m.manifest.model_id == model_id)
            .map(|m| {
                let n = m.manifest.shard_count();
                (
                    m.held.contains(&0),
                    n > 0 && m.held.contains(&(n - 1)),
                    n as usize,
                )
            })
            .unwrap_or((false, false, 0))
    }

    /// Plans a chain for `model_id` without `exclude`d nodes.
    pub async fn plan(&self, model_id: &str, exclude: &HashSet<String>) -> Result<Plan, NoRoute> {
        let peers = self.peers().await;
        let holders = self.holders_in(model_id, &peers);
        let n_layers = self.n_layers_in(model_id, &peers);
        let allowed = match self.inner.peers_allowed.get() {
            Some(policy) => {
                let policy = Arc::clone(policy);
                tokio::task::spawn_blocking(move || policy())
                    .await
                    .ok()
                    .flatten()
            }
            None => None,
        };
        let Some((members, allow_lan)) = allowed else {
            return route::plan(n_layers, &holders, exclude, self.encrypted(model_id));
        };
        // Private mode: only this node, pool devices and (if allowed) LAN peers.
        let on_lan = |id: &str| {
            peers
                .iter()
                .any(|p| p.node_id == id && transfer::is_lan(&p.address))
        };
        let holders: Vec<Holder> = holders
            .into_iter()
            .filter(|h| {
                h.local || members.contains(&h.node_id) || (allow_lan && on_lan(&h.node_id))
            })
            .collect();
        route::plan(n_layers, &holders, exclude, self.encrypted(model_id)).map_err(|mut e| {
            e.private_mode = true;
            e
        })
    }

    /// The model's layer count: from its manifest here, else from an announcement.
    fn n_layers_in(&self, model_id: &str, peers: &[PeerView]) -> u32 {
        self.local_models()
            .into_iter()
            .find(|m| m.manifest.model_id == model_id)
            .map(|m| m.manifest.n_layers)
            .or_else(|| {
                peers
                    .iter()
                    .flat_map(|p| &p.models)
                    .find(|m| m.id == model_id)
                    .map(|m| m.n_layers)
            })
            .unwrap_or(0)
    }

    /// Whether this node can act as requester for `model_id`: it has the model's
    /// header (for the tokenizer) and a chain covers every layer.
    pub async fn can_serve(&self, model_id: &str) -> bool {
        self.model_dir(model_id).is_some() && self.plan(model_id, &HashSet::new()).await.is_ok()
    }

    fn model_dir(&self, model_id: &str) -> Option<ModelDir> {
        ModelDir::new(&self.inner.config.models_dir, model_id)
            .ok()
            .filter(|dir| dir.header().is_file())
    }

    /// The model's vocabulary (tokenizer and chat template), loaded once.
    pub async fn vocab(&self, model_id: &str) -> Result<Arc<LlamaModel>, String> {
        if let Some(v) = self
            .inner
            .vocabs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(model_id)
        {
            return Ok(Arc::clone(v));
        }
        let dir = self.model_dir(model_id).ok_or_else(|| {
            format!(
                "this node has no copy of model '{model_id}''s header (import or add the model)"
            )
        })?;
        let ranges = self.inner.config.ranges_dir.clone();
        let id = model_id.to_string();
        let backends = self.inner.config.backends_dir.clone();
        let model = tokio::task::spawn_blocking(move || -> Result<LlamaModel, String> {
            let path = library::vocab_file(&dir, &id, &ranges).map_err(|e| e.to_string())?;
            let backend = crate::infer::backend(backends.as_deref()).map_err(|e| e.to_string())?;
            LlamaModel::load_from_file(
                backend,
                &path,
                &LlamaModelParams::default().with_vocab_only(true),
            )
            .map_err(|e| format!("loading the vocabulary of {id}: {e}"))
        })
        .await
        .map_err(|e| e.to_string())??;
        let model = Arc::new(model);
        self.inner
            .vocabs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(model_id.to_string(), Arc::clone(&model));
        Ok(model)
    }

    fn link_key(&self, peer: &str, session: &[u8; 16]) -> Result<SessionKey, StepFailure> {
        let cached = self
            .inner
            .links
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(peer)
            .cloned();
        let secret = match cached {
            Some(secret) => secret,
            None => {
                let public = identity::x25519_public(peer).ok_or_else(|| StepFailure {
                    failed_hop: Some(peer.to_string()),
                    message: format!("{peer} is not a valid node id"),
                })?;
                let secret = LinkSecret::agree(&self.inner.x25519, &public);
                let mut links = self.inner.links.lock().unwrap_or_else(|p| p.into_inner());
                if links.len() >= MAX_LINKS {
                    links.clear();
                }
                links.insert(peer.to_string(), secret.clone());
                secret
            }
        };
        Ok(SessionKey::derive(&secret, session))
    }

    fn own_failure(&self, message: impl Into<String>) -> StepFailure {
        StepFailure {
            failed_hop: Some(self.inner.node_id.clone()),
            message: message.into(),
        }
    }

    /// Runs this node's hop of `env` (it must be `route[0]`) on `input` for `from`
    /// (the authenticated sender: the session's owner here), forwards the output
    /// to the next hop over `next` (opened or replaced as needed), and returns the
    /// sealed result for the requester.
    async fn execute(
        &self,
        from: &str,
        env: Envelope,
        input: StepInput,
        next: &mut Option<Link>,
    ) -> Result<Vec<u8>, StepFailure> {
        let me = &env.route[0];
        if me.node_id != self.inner.node_id {
            return Err(StepFailure {
                failed_hop: None,
                message: "step addressed to another node".into(),
            });
        }
        let session = env
            .session_bytes()
            .map_err(|e| self.own_failure(e.to_string()))?;
        if env.close {
            self.inner.host.close(session, from);
        } else {
            let out = self
                .inner
                .host
                .step(Step {
                    peer: from.to_string(),
                    session,
                    seq: env.seq,
                    model_id: me.model_id.clone(),
                    layer_start: me.layer_start,
                    layer_end: me.layer_end,
                    pos: env.pos,
                    input,
                    sample: env.sample.clone(),
                    prime: env.prime.clone(),
                })
                .await
                .map_err(|e| {
                    // A step no honest peer sends counts against its sender.
                    if matches!(e, host::HostError::Forbidden(_))
                        && from != self.inner.node_id
                        && let Some(network) = self.inner.network.get()
                    {
                        tracing::warn!(peer = %short(from), error = %e, "refused a hostile pipeline step");
                        network.report_bad_frame(from);
                    }
                    self.own_failure(e.to_string())
                })?;
            if let Some(accounting) = self.accounting() {
                let layers = u64::from(me.layer_end.saturating_sub(me.layer_start));
                accounting.served(
                    &env.requester,
                    &env.session,
                    &me.model_id,
                    layers * u64::from(env.n_tokens),
                    env.sample.is_some() && env.route.len() == 1,
                );
            }
            match out {
                StepOutput::Hidden(h) => return self.forward(env, session, h, next).await,
                StepOutput::Token(t) if env.route.len() == 1 => {
                    return self.seal_result(&env, session, t);
                }
                StepOutput::Token(_) => {
                    return Err(self.own_failure("a range with the head is not the last hop"));
                }
            }
        }
        // A close travels down the whole chain.
        if env.route.len() > 1 {
            let mut close = env;
            close.route.remove(0);
            let to = close.route[0].node_id.clone();
            return self
                .send(&to, wire::encode_request(&close, &[]), next)
                .await;
        }
        self.seal_result(&env, session, None)
    }

    async fn forward(
        &self,
        env: Envelope,
        session: [u8; 16],
        hidden: Vec<f32>,
        link: &mut Option<Link>,
    ) -> Result<Vec<u8>, StepFailure> {
        if env.route.len() < 2 {
            return Err(self.own_failure("the route ends before the model's head"));
        }
        let mut next = env;
        next.route.remove(0);
        next.input = InputKind::Hidden;
        let to = next.route[0].node_id.clone();
        let frame = self.seal_hidden(&next, session, &to, &hidden)?;
        self.send(&to, wire::encode_request(&next, &frame), link)
            .await
    }

    fn seal_hidden(
        &self,
        env: &Envelope,
        session: [u8; 16],
        to: &str,
        hidden: &[f32],
    ) -> Result<Vec<u8>, StepFailure> {
        let n_tokens = env.n_tokens;
        let n_embd = hidden.len() / n_tokens.max(1) as usize;
        let key = self.link_key(to, &session)?;
        let dtype = env.dtype().map_err(|e| self.own_failure(e.to_string()))?;
        activation::seal(
            &key,
            Header {
                dtype,
                session,
                start_pos: env.pos,
                n_tokens,
                n_embd: n_embd as u32,
                seq: env.seq,
            },
            Direction::Forward,
            hidden,
        )
        .map_err(|e| self.own_failure(e.to_string()))
    }

    fn seal_result(
        &self,
        env: &Envelope,
        session: [u8; 16],
        token: Option<i32>,
    ) -> Result<Vec<u8>, StepFailure> {
        let key = self.link_key(&env.requester, &session)?;
        let plain = token.map(|t| t.to_le_bytes().to_vec()).unwrap_or_default();
        Ok(activation::seal_message(
            &key,
            env.seq,
            Direction::Backward,
            &result_aad(env),
            &plain,
        ))
    }

    /// Sends a step to `to` over `link` (opened, or replaced when it leads
    /// elsewhere); a transport failure blames `to` and drops the link.
    async fn send(
        &self,
        to: &str,
        bytes: Vec<u8>,
        link: &mut Option<Link>,
    ) -> Result<Vec<u8>, StepFailure> {
        let network = self.inner.network.get().ok_or_else(|| StepFailure {
            failed_hop: Some(to.to_string()),
            message: "this node has no P2P network".into(),
        })?;
        let sent = bytes.len() as u64;
        let open = match link.take() {
            Some(l) if l.node_id() == to => Ok(l),
            _ => network.open_link(to).await,
        };
        let started = std::time::Instant::now();
        let answer = match open {
            Ok(mut l) => {
                let answer = l.call(Request::Activation(bytes)).await;
                if answer.is_ok() {
                    *link = Some(l);
                }
                answer
            }
            Err(e) => Err(e),
        };
        let received = match &answer {
            Ok(Response::Activation(r)) => r.len() as u64,
            _ => 0,
        };
        self.inner
            .wire_bytes
            .fetch_add(sent + received, std::sync::atomic::Ordering::Relaxed);
        match answer {
            Ok(Response::Activation(answer)) => {
                let waited = started.elapsed();
                let (spent, result) = wire::decode_answer(&answer).map_err(|e| StepFailure {
                    failed_hop: Some(to.to_string()),
                    message: e.to_string(),
                })?;
                self.inner.link_latency.record(waited, spent);
                Ok(result.to_vec())
            }
            Ok(Response::Error { message, .. }) => {
                Err(serde_json::from_str(&message).unwrap_or(StepFailure {
                    failed_hop: Some(to.to_string()),
                    message,
                }))
            }
            Ok(other) => Err(StepFailure {
                failed_hop: Some(to.to_string()),
                message: format!("unexpected answer {other:?}"),
            }),
            Err(e) => Err(StepFailure {
                failed_hop: Some(to.to_string()),
                message: format!("hop {} unreachable: {e}", short(to)),
            }),
        }
    }

    /// Answers the steps that arrive on `link` until it closes or idles out; the
    /// link onward to the next hop lives as long.
    async fn serve_link(&self, mut link: InboundLink) {
        let mut next: Option<Link> = None;
        while let Some(request) = link.next(self.inner.config.link_idle).await {
            let response = match request {
                Request::Activation(bytes) => self.answer_step(&link.from, &bytes, &mut next).await,
                Request::Invalid(reason) => self.bad_step(&link.from, reason),
                _ => self.bad_step(&link.from, "a link carries pipeline steps only".into()),
            };
            if link.respond(response).await.is_err() {
                break;
            }
        }
    }

    /// The answer to a malformed step, counted against its sender.
    fn bad_step(&self, from: &str, reason: String) -> Response {
        tracing::warn!(peer = %short(from), %reason, "malformed pipeline step");
        if let Some(network) = self.inner.network.get() {
            network.report_bad_frame(from);
        }
        Response::Error {
            code: 400,
            message: failure_json(&StepFailure {
                failed_hop: None,
                message: reason,
            }),
        }
    }

    /// Runs a step from `from` and returns the answer to send back.
    async fn answer_step(&self, from: &str, bytes: &[u8], next: &mut Option<Link>) -> Response {
        let started = std::time::Instant::now();
        match self.open_inbound(from, bytes) {
            Err(reason) => self.bad_step(from, reason),
            Ok((env, input)) => match self.execute(from, env, input, next).await {
                Ok(result) => Response::Activation(wire::encode_answer(started.elapsed(), &result)),
                Err(failure) => Response::Error {
                    code: 502,
                    message: failure_json(&failure),
                },
            },
        }
    }

    /// Decodes a step from `from` and opens its body.
    fn open_inbound(&self, from: &str, bytes: &[u8]) -> Result<(Envelope, StepInput), String> {
        let (env, body) = wire::decode_request(bytes).map_err(|e| e.to_string())?;
        let session = env.session_bytes().map_err(|e| e.to_string())?;
        let key = self.link_key(from, &session).map_err(|e| e.message)?;
        if env.close {
            return Ok((env, StepInput::Tokens(Vec::new())));
        }
        let input = match env.input {
            // Token ids go to the first hop, and only the requester sends them: a
            // peer cannot run a session in another node's name.
            InputKind::Tokens if env.requester != from => {
                return Err("token input from a peer that is not the session's requester".into());
            }
            InputKind::Tokens => {
                let plain = activation::open_message(
                    &key,
                    env.seq,
                    Direction::Forward,
                    &step_aad(&env),
                    body,
                )
                .map_err(|e| e.to_string())?;
                let tokens = wire::bytes_to_tokens(&plain).map_err(|e| e.to_string())?;
                if tokens.len() != env.n_tokens as usize {
                    return Err(format!(
                        "{} token ids for {} rows",
                        tokens.len(),
                        env.n_tokens
                    ));
                }
                StepInput::Tokens(tokens)
            }
            InputKind::Hidden => {
                let (header, values) =
                    activation::open(&key, body, Direction::Forward).map_err(|e| e.to_string())?;
                if header.session != session
                    || header.seq != env.seq
                    || header.start_pos != env.pos
                    || header.n_tokens != env.n_tokens
                {
                    return Err("the activation header does not match the envelope".into());
                }
                StepInput::Hidden(values)
            }
        };
        Ok((env, input))
    }

    /// Runs one step of a route as the requester and opens the result.
    async fn request_step(
        &self,
        env: Envelope,
        input: StepInput,
        link: &mut Option<Link>,
    ) -> Result<Option<i32>, StepFailure> {
        let session = env
            .session_bytes()
            .map_err(|e| self.own_failure(e.to_string()))?;
        let first = env.route[0].node_id.clone();
        let last = env.route[env.route.len() - 1].node_id.clone();
        let result = if first == self.inner.node_id {
            let me = self.inner.node_id.clone();
            self.execute(&me, env.clone(), input, link).await?
        } else {
            let key = self.link_key(&first, &session)?;
            let body = match &input {
                StepInput::Tokens(t) => activation::seal_message(
                    &key,
                    env.seq,
                    Direction::Forward,
                    &step_aad(&env),
                    &wire::tokens_to_bytes(t),
                ),
                StepInput::Hidden(h) => self.seal_hidden(&env, session, &first, h)?,
            };
            self.send(&first, wire::encode_request(&env, &body), link)
                .await?
        };
        let key = self.link_key(&last, &session)?;
        let plain = activation::open_message(
            &key,
            env.seq,
            Direction::Backward,
            &result_aad(&env),
            &result,
        )
        .map_err(|_| StepFailure {
            failed_hop: Some(last.clone()),
            message: "the step result failed authentication".into(),
        })?;
        match plain.len() {
            0 => Ok(None),
            4 => Ok(Some(i32::from_le_bytes([
                plain[0], plain[1], plain[2], plain[3],
            ]))),
            n => Err(StepFailure {
                failed_hop: Some(last),
                message: format!("a {n}-byte step result"),
            }),
        }
    }
}

fn step_aad(env: &Envelope) -> Vec<u8> {
    format!(
        "step:{}:{}:{}:{}",
        env.session, env.seq, env.pos, env.n_tokens
    )
    .into_bytes()
}

fn result_aad(env: &Envelope) -> Vec<u8> {
    format!("result:{}:{}", env.session, env.seq).into_bytes()
}

fn failure_json(f: &StepFailure) -> String {
    serde_json::to_string(f).unwrap_or_else(|_| f.message.clone())
}

use crate::net::short_id as short;

pub use crate::shard::is_model_id;
