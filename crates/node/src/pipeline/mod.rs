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
//!   replay the session so the client sees the same tokens;
//! - `local`: this node's models on disk and the ranges loaded from them;
//! - `holders`: who holds which layers, and the chain a request takes;
//! - `links`: the keys and seals of each link;
//! - `serve`: running a hop for the peer that sent the step, and sending steps;
//! - [`transfer`]: model files between peers; `pins`: the manifest accepted per id.
//!
//! A node serves steps for others and requests them for its own clients through the
//! same `Pipeline::run_hop` (in `serve`): compute the local range, forward the rest.

pub mod activation;
mod generate;
mod holders;
pub mod host;
pub mod hub_fetch;
pub mod latency;
pub mod link_speed;
mod links;
mod local;
mod pins;
pub mod route;
mod serve;
pub mod transfer;
pub mod wire;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use llama_cpp_2::model::LlamaModel;
use tokio::sync::mpsc;

use self::activation::{Dtype, LinkSecret};
use self::host::RangeHost;
use self::route::Holder;
use crate::identity::Identity;
use crate::net::frame::{Request, Response};
use crate::net::{InboundStep, Network};
use crate::shard::library::{self, LocalModel};

/// Requests from other nodes processed at once (more wait in the handler's queue).
const INBOUND_QUEUE: usize = 64;
/// Links from other nodes served at once (each carries one session's steps at a
/// time); more are refused.
const MAX_INBOUND_LINKS: usize = 256;
/// Requests (file fetches) one peer may have answered at once.
const MAX_REQUESTS_PER_PEER: usize = 8;
/// Links one peer may have served at once.
const MAX_LINKS_PER_PEER: usize = 32;
/// Peers whose link secret is kept (the cache starts over when it is full).
const MAX_LINKS: usize = 4096;

/// Whether the encrypted pipeline is on for a model.
pub type EncryptionPolicy = Arc<dyn Fn(&str) -> bool + Send + Sync>;

/// Which peers a route may use: `None` for any; `Some((node ids, allow_lan))` in
/// private mode (the pool's devices, plus peers on the LAN when allowed). Called
/// on the blocking pool (it may read the database).
pub type PeerPolicy = Arc<dyn Fn() -> Option<(HashSet<String>, bool)> + Send + Sync>;

/// Whom this node serves: `contributing()` is cheap and asked per step; when it
/// says no, `pool_members()` (blocking: it may read the database) names the
/// devices still served — the node's own requests always are.
#[derive(Clone)]
pub struct ServePolicy {
    /// The schedule allows contributing now.
    pub contributing: Arc<dyn Fn() -> bool + Send + Sync>,
    /// This node's pool devices.
    pub pool_members: Arc<dyn Fn() -> HashSet<String> + Send + Sync>,
    /// Sessions of other nodes served at once (the contribution level), if
    /// limited.
    pub session_limit: Arc<dyn Fn() -> Option<usize> + Send + Sync>,
}

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
    /// What `work` done by `node` costs this node, in micro-credits.
    fn price(&self, node: &str, work: &crate::credits::Work) -> i64;
}

/// Pipeline settings.
#[derive(Debug, Clone)]
pub struct PipelineConfig {
    /// `<data>/models`.
    pub models_dir: PathBuf,
    /// `<data>/ranges` (assembled range files).
    pub ranges_dir: PathBuf,
    /// The format hidden states take on a slow link when approximate answers
    /// are allowed (f32 always otherwise).
    pub dtype: Dtype,
    /// Steps this node requests allow hidden states narrower than f32 on slow
    /// links (`approximate_answers`).
    pub approximate: bool,
    /// A link measured below this many megabits per second is slow.
    pub slow_link_mbps: f64,
    /// Draft tokens per verification step of a greedy generation (0: none).
    pub speculative_tokens: u32,
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
    /// Signs the steps this node requests.
    identity: Identity,
    x25519: x25519_dalek::StaticSecret,
    /// X25519 secret shared with each peer, by node id.
    links: Mutex<HashMap<String, LinkSecret>>,
    network: OnceLock<Network>,
    /// The node's tasks (set when a network is attached).
    tasks: crate::tasks::LateTasks,
    vocabs: Mutex<HashMap<String, Arc<LlamaModel>>>,
    /// Held while a vocabulary loads (see [`Pipeline::vocab`]).
    vocab_load: tokio::sync::Mutex<()>,
    local: Mutex<Vec<LocalModel>>,
    /// Model directories the last scan skipped (bad manifests), with why.
    rejected: Mutex<Vec<library::RejectedModel>>,
    downloads: transfer::Downloads,
    /// Per-model encrypted-pipeline decision.
    encryption: OnceLock<EncryptionPolicy>,
    /// Private mode's restriction of routes.
    peers_allowed: OnceLock<PeerPolicy>,
    /// The contribution schedule's restriction of whom this node serves.
    serve_policy: OnceLock<ServePolicy>,
    accounting: OnceLock<Arc<dyn Accounting>>,
    /// Bytes of pipeline requests this node sent plus the responses it got.
    wire_bytes: std::sync::atomic::AtomicU64,
    /// The overhead of the links this node sends steps on.
    link_latency: latency::LinkLatency,
    /// The bandwidth of the links this node sends hidden states on.
    link_speeds: link_speed::LinkSpeeds,
    /// Draft tokens this node's generations sent and had accepted.
    speculation: crate::infer::speculation::SpeculationStats,
    /// The latest generation's route per model.
    routes: route::LatestRoutes,
    /// Generations this node has running through each other node (weighs the
    /// next route; see `route`).
    in_flight: Arc<crate::net::inflight::InFlight>,
    /// Makes weighing, choosing and reserving a route one step.
    route_lock: Mutex<()>,
    /// Finished generations whose sessions the hops still keep, for a later
    /// prompt that starts with the same tokens (see `generate`).
    kept: Mutex<std::collections::VecDeque<generate::Kept>>,
    /// The manifest hash accepted for each model id.
    pins: pins::ManifestPins,
    /// Serialises [`Pipeline::load_held`].
    reload: tokio::sync::Mutex<()>,
    /// Shards held but kept out of memory (`shards/{i}/unload`), by model.
    unloaded: Mutex<HashMap<String, HashSet<u32>>>,
    /// Runs llama.cpp refused to load, by what they were made of (model,
    /// manifest, shards and their hashes): not tried again at every rescan
    /// (assembling a run copies its shards) until one of those changes.
    failed_runs: Mutex<HashSet<String>>,
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
                identity: identity.clone(),
                links: Mutex::new(HashMap::new()),
                config,
                host,
                network: OnceLock::new(),
                tasks: crate::tasks::LateTasks::default(),
                vocabs: Mutex::new(HashMap::new()),
                vocab_load: tokio::sync::Mutex::new(()),
                local: Mutex::new(Vec::new()),
                rejected: Mutex::new(Vec::new()),
                downloads: transfer::Downloads::default(),
                unloaded: Mutex::new(HashMap::new()),
                failed_runs: Mutex::new(HashSet::new()),
                reload: tokio::sync::Mutex::new(()),
                pins: pins::ManifestPins::new(store),
                encryption: OnceLock::new(),
                peers_allowed: OnceLock::new(),
                serve_policy: OnceLock::new(),
                accounting: OnceLock::new(),
                wire_bytes: std::sync::atomic::AtomicU64::new(0),
                link_latency: latency::LinkLatency::default(),
                link_speeds: link_speed::LinkSpeeds::default(),
                speculation: crate::infer::speculation::SpeculationStats::default(),
                routes: route::LatestRoutes::default(),
                in_flight: Arc::new(crate::net::inflight::InFlight::default()),
                kept: Mutex::new(std::collections::VecDeque::new()),
                route_lock: Mutex::new(()),
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

    /// The links this node sends hidden states on, slowest first, with the
    /// format each takes when a requester allows approximate answers.
    pub fn links(&self) -> Vec<link_speed::LinkView> {
        let c = &self.inner.config;
        self.inner.link_speeds.view(c.slow_link_mbps, c.dtype)
    }

    /// Draft tokens this node's split generations sent and had accepted.
    pub fn speculation(&self) -> crate::infer::speculation::SpeculationSummary {
        self.inner.speculation.summary()
    }

    /// The latest split generation's route of each model, predicted and
    /// measured.
    pub fn routes(&self) -> Vec<route::RouteReport> {
        self.inner.routes.all()
    }

    /// Whether the steps this node requests allow approximate hidden states.
    pub fn approximate_answers(&self) -> bool {
        self.inner.config.approximate
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
        self.inner.tasks.set(tasks);
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
            let per_peer = Arc::new(crate::net::inflight::InFlight::default());
            self.spawn(async move {
                while let Some(link) = links.next().await {
                    let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
                        tracing::warn!(peer = %short(&link.from), "too many pipeline links; refusing one");
                        continue;
                    };
                    let Some(peer_slot) = per_peer.try_acquire(&link.from, MAX_LINKS_PER_PEER)
                    else {
                        tracing::warn!(peer = %short(&link.from), "too many links from one peer; refusing one");
                        continue;
                    };
                    let serving = this.clone();
                    this.spawn(async move {
                        serving.serve_link(link).await;
                        drop((slot, peer_slot));
                    });
                }
            });
        }
        let this = self.clone();
        let per_peer = Arc::new(crate::net::inflight::InFlight::default());
        self.spawn(async move {
            while let Some(step) = rx.recv().await {
                let Some(slot) = per_peer.try_acquire(&step.from, MAX_REQUESTS_PER_PEER) else {
                    step.responder
                        .send(Response::Error {
                            code: 429,
                            message: format!(
                                "at most {MAX_REQUESTS_PER_PEER} requests in flight per peer"
                            ),
                        })
                        .await;
                    continue;
                };
                let serving = this.clone();
                this.spawn(async move {
                    let _slot = slot;
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

    /// Runs `task` as one of the node's tasks.
    fn spawn<F>(&self, task: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        self.inner.tasks.spawn(task);
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

    /// Limits whom this node serves to its schedule (set by the node).
    pub fn set_serve_policy(&self, policy: ServePolicy) {
        let _ = self.inner.serve_policy.set(policy);
    }

    /// Whether this node serves `requester` now: always itself; others while
    /// the schedule allows (a session starting, `new_session`, only within the
    /// contribution level's share of sessions), and its pool's devices at any
    /// hour.
    pub(crate) async fn serves(&self, requester: &str, new_session: bool) -> bool {
        let Some(policy) = self.inner.serve_policy.get() else {
            return true;
        };
        if requester == self.inner.node_id {
            return true;
        }
        let room = !new_session
            || (policy.session_limit)().is_none_or(|n| self.inner.host.active_count() < n);
        if room && (policy.contributing)() {
            return true;
        }
        let members = Arc::clone(&policy.pool_members);
        tokio::task::spawn_blocking(move || members())
            .await
            .map(|m| m.contains(requester))
            .unwrap_or(false)
    }

    /// Whether requests for `model_id` must embed and sample on this node.
    pub fn encrypted(&self, model_id: &str) -> bool {
        self.inner.encryption.get().is_some_and(|p| p(model_id))
    }
}

use crate::net::short_id as short;

pub use crate::shard::is_model_id;
pub use wire::MAX_DRAFT;
