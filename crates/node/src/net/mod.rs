//! The peer-to-peer layer (libp2p).
//!
//! ```text
//!  Network (cloneable handle) ──Command──▶ event loop task ──owns──▶ Swarm<Behaviour>
//!        ▲      reads ▲                      │  writes (blocking pool)
//!        │            └─ Shared (connected peers, listen addrs, counters)
//!        └── oneshot replies                 └──▶ Directory (SQLite)
//! ```
//!
//! One composed [`Behaviour`]: TCP and QUIC transports, noise, yamux, identify, ping,
//! Kademlia, signed gossipsub (node announcements), mDNS (switchable), relay server
//! and client, DCUtR, AutoNAT, connection limits, the request-response protocol
//! of [`frame`], and the long-lived pipeline streams of [`link`]. The libp2p peer id is derived from the node's own Ed25519 identity,
//! so node id and peer id name the same key.

pub mod announce;
mod dir_writer;
pub mod directory;
mod event_loop;
pub mod frame;
pub(crate) mod inflight;
pub mod invite;
pub mod link;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

use libp2p::swarm::NetworkBehaviour;
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::{
    Multiaddr, PeerId, StreamProtocol, autonat, connection_limits, dcutr, gossipsub, identify, kad,
    mdns, noise, ping, relay, request_response, tcp, yamux,
};
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

use self::announce::{HardwareSummary, HostedModel, Load};
use self::directory::Directory;
use self::frame::{FrameCodec, Request, Response};
use self::invite::{Invite, InviteError};
use crate::identity::Identity;
use crate::store::Store;

/// P2P settings (from the node config).
#[derive(Debug, Clone)]
pub struct NetConfig {
    /// Address to listen on (`0.0.0.0` for all interfaces).
    pub listen_host: String,
    /// TCP and UDP (QUIC) port; 0 picks one.
    pub port: u16,
    /// Local-network discovery.
    pub mdns: bool,
    /// Invite codes or multiaddrs to dial at start (and keep as seeds).
    pub bootstrap: Vec<String>,
    /// Network name; nodes of different networks cannot read each other's codes.
    pub network_name: String,
    /// How often the node announces itself.
    pub announce_interval: Duration,
    /// Region code.
    pub region: String,
    /// Offline (air-gapped LAN) mode: no bootstrap entries or saved seeds are
    /// dialled; peers come from mDNS only.
    pub offline: bool,
    /// A peer whose trust score falls below this is disconnected and refused for
    /// [`NetConfig::cool_off`] (0 never bans).
    pub ban_below_trust: i64,
    /// How long a banned peer is refused.
    pub cool_off: Duration,
}

/// What the node currently is, for its announcements.
#[derive(Debug, Clone, Default)]
pub struct LocalInfo {
    /// Nickname.
    pub nickname: Option<String>,
    /// Capabilities.
    pub capabilities: Vec<String>,
    /// Hardware.
    pub hardware: HardwareSummary,
    /// Hosted models.
    pub models: Vec<HostedModel>,
    /// Load.
    pub load: Load,
}

/// Stops the event loop when cancelled (re-exported so clients need no tokio-util).
pub use tokio_util::sync::CancellationToken as ShutdownToken;

/// Reads the node's current [`LocalInfo`].
pub type LocalInfoFn = Arc<dyn Fn() -> LocalInfo + Send + Sync>;

/// A P2P operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NetError {
    /// The transport or a behaviour could not be set up.
    #[error("p2p setup failed: {0}")]
    Setup(String),
    /// Not a multiaddr or invite code.
    #[error("not a multiaddr or network code: {0}")]
    InvalidAddress(String),
    /// An invite code failed to open.
    #[error(transparent)]
    Invite(#[from] InviteError),
    /// Dialling failed.
    #[error("could not connect: {0}")]
    Dial(String),
    /// A request failed.
    #[error("request failed: {0}")]
    Request(String),
    /// The peer is unknown or not a SwarmLLM node id.
    #[error("unknown peer {0}")]
    UnknownPeer(String),
    /// The network task has stopped.
    #[error("the p2p layer has stopped")]
    Stopped,
}

/// A live connection.
#[derive(Debug, Clone, Serialize)]
pub struct ConnectedPeer {
    /// Hex node id.
    pub node_id: String,
    /// libp2p peer id.
    pub peer_id: String,
    /// The remote address of the first connection.
    pub address: String,
    /// When it connected (RFC 3339).
    pub connected_since: String,
    /// Last ping round trip.
    pub latency_ms: Option<f64>,
}

/// Counters of the P2P layer.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) bad_frames: AtomicU64,
    pub(crate) announcements_accepted: AtomicU64,
    pub(crate) announcements_rejected: AtomicU64,
    pub(crate) requests_served: AtomicU64,
    /// Outgoing dials started (bootstrap, seeds, redials, discovery).
    pub(crate) dials_started: AtomicU64,
    /// Directory maintenance rounds run (every 2 s).
    pub(crate) maintenance_rounds: AtomicU64,
}

/// State the event loop writes and handles read.
#[derive(Debug, Default)]
pub(crate) struct Shared {
    pub(crate) connected: RwLock<HashMap<PeerId, ConnectedPeer>>,
    pub(crate) listen_addrs: RwLock<Vec<Multiaddr>>,
    pub(crate) counters: Counters,
    /// Where inbound pipeline steps go (set once by the node's pipeline).
    pub(crate) steps: OnceLock<mpsc::Sender<InboundStep>>,
    /// Where inbound credit-ledger messages go (set once by the node's credits).
    pub(crate) credits: OnceLock<mpsc::Sender<InboundStep>>,
    /// Where pool messages go: (author node id, bytes).
    pub(crate) pool_messages: OnceLock<mpsc::Sender<(String, Vec<u8>)>>,
}

/// Whether a warning about malformed input from a peer may be logged now: at most
/// one a second in the whole process (a flood of garbage must not become a flood
/// of log lines; the rest go to debug).
pub(crate) fn malformed_log_allowed() -> bool {
    use std::sync::atomic::AtomicI64;
    static LAST: AtomicI64 = AtomicI64::new(0);
    let now = chrono::Utc::now().timestamp_millis();
    let last = LAST.load(Ordering::Relaxed);
    now - last >= 1000
        && LAST
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
}

/// Lowers `node_id`'s trust (off the async runtime) and bans it when the trust
/// falls below `ban_below`.
pub(crate) fn penalise(
    directory: Directory,
    commands: mpsc::Sender<Command>,
    ban_below: i64,
    node_id: String,
) {
    tokio::task::spawn_blocking(move || match directory.misbehaved(&node_id) {
        Ok(Some(trust)) if trust < ban_below => {
            let _ = commands.blocking_send(Command::Ban(node_id));
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "peer directory: penalty failed"),
    });
}

/// The gossip topic of device-pool messages.
pub const POOL_TOPIC: &str = "swarmllm/pool/1";

/// A request another node sent that the node (not the P2P layer) answers:
/// a model-file fetch or a credit-ledger message (pipeline steps come on
/// [`link`]s). Answer it through [`Responder::send`].
#[derive(Debug)]
pub struct InboundStep {
    /// The sender's node id (authenticated by the transport).
    pub from: String,
    /// The request ([`Request::Fetch`], [`Request::Credit`], or a stray
    /// [`Request::Activation`] to refuse).
    pub request: Request,
    /// Where the answer goes.
    pub responder: Responder,
}

/// Answers one inbound request.
#[derive(Debug)]
pub struct Responder {
    channel: request_response::ResponseChannel<Response>,
    commands: mpsc::Sender<Command>,
}

impl Responder {
    /// Sends the response (dropped silently if the requester has gone).
    pub async fn send(self, response: Response) {
        let _ = self
            .commands
            .send(Command::Respond {
                channel: self.channel,
                response,
            })
            .await;
    }
}

impl Shared {
    /// The listen addresses as strings (without `/p2p/`).
    pub(crate) fn listen_addr_strings(&self) -> Vec<String> {
        self.listen_addrs
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(ToString::to_string)
            .collect()
    }
}

pub(crate) enum Command {
    Dial {
        addr: Multiaddr,
        peer: Option<PeerId>,
        via: &'static str,
        reply: Option<oneshot::Sender<Result<String, NetError>>>,
    },
    Request {
        peer: PeerId,
        request: Request,
        reply: oneshot::Sender<Result<Response, NetError>>,
    },
    Respond {
        channel: request_response::ResponseChannel<Response>,
        response: Response,
    },
    AnnounceNow,
    Discover {
        reply: oneshot::Sender<usize>,
    },
    Redial(Vec<(String, String, Vec<String>)>),
    #[cfg(feature = "test-hooks")]
    PublishRaw(Vec<u8>),
    /// Disconnect a peer and refuse it for the cooling-off period.
    Ban(String),
    PublishPool(Vec<u8>, oneshot::Sender<Result<(), NetError>>),
}

/// The composed behaviour.
#[derive(NetworkBehaviour)]
pub(crate) struct Behaviour {
    limits: connection_limits::Behaviour,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
    kad: kad::Behaviour<kad::store::MemoryStore>,
    gossipsub: gossipsub::Behaviour,
    mdns: Toggle<mdns::tokio::Behaviour>,
    /// Relaying for others; off in offline mode.
    relay: Toggle<relay::Behaviour>,
    relay_client: relay::client::Behaviour,
    dcutr: dcutr::Behaviour,
    autonat: autonat::Behaviour,
    rpc: request_response::Behaviour<FrameCodec>,
    links: libp2p_stream::Behaviour,
}

/// Handle to the P2P layer; clones share it.
#[derive(Clone)]
pub struct Network {
    commands: mpsc::Sender<Command>,
    /// Opens and accepts pipeline links (outside the event loop).
    links: libp2p_stream::Control,
    shared: Arc<Shared>,
    directory: Directory,
    config: Arc<NetConfig>,
    peer_id: PeerId,
    node_id: String,
}

impl std::fmt::Debug for Network {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Network")
            .field("peer_id", &self.peer_id)
            .finish()
    }
}

/// The first 12 characters of a node id, for logs.
pub fn short_id(node_id: &str) -> &str {
    node_id.get(..12).unwrap_or(node_id)
}

/// The libp2p peer id of a hex node id.
pub fn peer_id_of(node_id: &str) -> Option<PeerId> {
    let mut bytes = [0u8; 32];
    hex::decode_to_slice(node_id, &mut bytes).ok()?;
    let key = libp2p::identity::ed25519::PublicKey::try_from_bytes(&bytes).ok()?;
    Some(libp2p::identity::PublicKey::from(key).to_peer_id())
}

/// The hex node id of an Ed25519 peer id.
pub fn node_id_of(peer: &PeerId) -> Option<String> {
    // Ed25519 peer ids inline the protobuf-encoded public key (identity multihash).
    let key = libp2p::identity::PublicKey::try_decode_protobuf(peer.as_ref().digest()).ok()?;
    Some(hex::encode(key.try_into_ed25519().ok()?.to_bytes()))
}

impl Network {
    /// Builds the swarm, starts listening, and spawns the event loop (which stops
    /// when `shutdown` is cancelled).
    pub async fn start(
        identity: &Identity,
        store: Store,
        config: NetConfig,
        info: LocalInfoFn,
        tasks: crate::tasks::Tasks,
    ) -> Result<Network, NetError> {
        let setup = |e: &dyn std::fmt::Display| NetError::Setup(e.to_string());
        let keypair = libp2p::identity::Keypair::ed25519_from_bytes(*identity.secret_bytes())
            .map_err(|e| setup(&e))?;
        let use_mdns = config.mdns;
        let mut swarm = libp2p::SwarmBuilder::with_existing_identity(keypair)
            .with_tokio()
            .with_tcp(
                tcp::Config::default().nodelay(true),
                noise::Config::new,
                yamux::Config::default,
            )
            .map_err(|e| setup(&e))?
            .with_quic()
            .with_relay_client(noise::Config::new, yamux::Config::default)
            .map_err(|e| setup(&e))?
            .with_behaviour(|key, relay_client| {
                build_behaviour(key, relay_client, use_mdns, config.offline)
            })
            .map_err(|e| setup(&e))?
            .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(300)))
            .build();

        let host = &config.listen_host;
        let ip = if host.contains(':') { "ip6" } else { "ip4" };
        for addr in [
            format!("/{ip}/{host}/tcp/{}", config.port),
            format!("/{ip}/{host}/udp/{}/quic-v1", config.port),
        ] {
            let addr: Multiaddr = addr.parse().map_err(|e| setup(&e))?;
            swarm
                .listen_on(addr.clone())
                .map_err(|e| NetError::Setup(format!("cannot listen on {addr}: {e}")))?;
        }

        let peer_id = *swarm.local_peer_id();
        let links = swarm.behaviour().links.new_control();
        let directory = Directory::new(store);
        let shared = Arc::new(Shared::default());
        let (tx, rx) = mpsc::channel(256);
        let network = Network {
            commands: tx.clone(),
            links,
            shared: Arc::clone(&shared),
            directory: directory.clone(),
            config: Arc::new(config),
            peer_id,
            node_id: identity.node_id(),
        };
        let writer = dir_writer::DirectoryWriter::spawn(directory.clone())
            .map_err(|e| NetError::Setup(format!("starting the directory writer: {e}")))?;
        let event_loop = event_loop::EventLoop::new(
            swarm,
            rx,
            tx,
            shared,
            directory,
            writer,
            Arc::clone(&network.config),
            identity.clone(),
            info,
            tasks.shutdown_token().clone(),
        );
        tasks.spawn(event_loop.run());

        if network.config.offline {
            tracing::info!("offline mode: finding peers by mDNS only");
            return Ok(network);
        }
        // Dial the configured bootstrap entries and every saved seed.
        for entry in network.config.bootstrap.clone() {
            if let Err(e) = network.add_seed_and_dial(&entry, "bootstrap").await {
                tracing::warn!(%entry, error = %e, "bootstrap entry unusable");
            }
        }
        let dir = network.directory.clone();
        let seeds = tokio::task::spawn_blocking(move || dir.seeds())
            .await
            .map_err(|e| setup(&e))?
            .unwrap_or_default();
        for seed in seeds.into_iter().filter(|s| s.is_enabled) {
            if let Ok(addr) = seed.address.parse::<Multiaddr>() {
                let _ = network.dial_addr(addr, "seed", None).await;
            }
        }
        Ok(network)
    }

    /// This node's libp2p peer id.
    pub fn peer_id(&self) -> PeerId {
        self.peer_id
    }

    /// The peer directory.
    pub fn directory(&self) -> &Directory {
        &self.directory
    }

    /// The directory's peers (at most `limit`), read off the async runtime; empty
    /// when the read fails (callers show or route with what they have).
    pub async fn peer_records(&self, limit: usize) -> Vec<directory::PeerRecord> {
        let dir = self.directory.clone();
        tokio::task::spawn_blocking(move || dir.list(limit))
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_default()
    }

    /// The region this node announces.
    pub fn region(&self) -> &str {
        &self.config.region
    }

    /// Addresses others can dial, each ending in `/p2p/<peer id>`.
    pub fn listen_addrs(&self) -> Vec<Multiaddr> {
        self.shared
            .listen_addrs
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|a| a.clone().with_p2p(self.peer_id).unwrap_or_else(|a| a))
            .collect()
    }

    /// Live connections.
    pub fn connected(&self) -> Vec<ConnectedPeer> {
        self.shared
            .connected
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// `isolated` (no peers and nothing to dial), `bootstrapping` (dialling), or
    /// `connected`.
    pub async fn phase(&self) -> &'static str {
        if !self.connected().is_empty() {
            return "connected";
        }
        if !self.config.bootstrap.is_empty() {
            return "bootstrapping";
        }
        // Anything to dial? (The directory is SQLite: read it off the runtime.)
        let dir = self.directory.clone();
        let known = tokio::task::spawn_blocking(move || {
            dir.seeds().is_ok_and(|s| !s.is_empty()) || dir.list(1).is_ok_and(|l| !l.is_empty())
        })
        .await
        .unwrap_or(false);
        if known { "bootstrapping" } else { "isolated" }
    }

    /// Counters: (bad frames, announcements accepted, rejected, requests served).
    pub fn counters(&self) -> serde_json::Value {
        let c = &self.shared.counters;
        serde_json::json!({
            "bad_frames": c.bad_frames.load(Ordering::Relaxed),
            "announcements_accepted": c.announcements_accepted.load(Ordering::Relaxed),
            "announcements_rejected": c.announcements_rejected.load(Ordering::Relaxed),
            "requests_served": c.requests_served.load(Ordering::Relaxed),
            "dials_started": c.dials_started.load(Ordering::Relaxed),
            "maintenance_rounds": c.maintenance_rounds.load(Ordering::Relaxed),
        })
    }

    /// Whether the node runs in offline mode (mDNS discovery only: no bootstrap,
    /// seeds, DHT, peer exchange, redials or relaying).
    pub fn offline(&self) -> bool {
        self.config.offline
    }

    /// An invite code carrying this node's reachable addresses.
    pub fn invite_code(&self) -> String {
        invite::encode(
            &Invite {
                peer_id: self.peer_id.to_string(),
                addrs: self.shared.listen_addr_strings(),
            },
            &self.config.network_name,
        )
    }

    /// Parses an invite code or multiaddr into dialable addresses.
    pub fn parse_entry(&self, entry: &str) -> Result<Vec<Multiaddr>, NetError> {
        let entry = entry.trim();
        if entry.starts_with("swarm://") {
            let invite = invite::decode(entry, &self.config.network_name)?;
            let peer: PeerId = invite
                .peer_id
                .parse()
                .map_err(|_| NetError::Invite(InviteError::Tampered))?;
            let addrs: Vec<Multiaddr> = invite
                .addrs
                .iter()
                .filter_map(|a| a.parse::<Multiaddr>().ok())
                .map(|a| a.with_p2p(peer).unwrap_or_else(|a| a))
                .collect();
            if addrs.is_empty() {
                return Err(NetError::InvalidAddress(
                    "the code lists no addresses".into(),
                ));
            }
            return Ok(addrs);
        }
        entry
            .parse::<Multiaddr>()
            .map(|a| vec![a])
            .map_err(|_| NetError::InvalidAddress(entry.to_string()))
    }

    /// Joins via an invite code or multiaddr: saves it as a seed (redialled on
    /// restart) and dials it, returning the node id connected to.
    pub async fn add_seed_and_dial(
        &self,
        entry: &str,
        via: &'static str,
    ) -> Result<String, NetError> {
        let addrs = self.parse_entry(entry)?;
        let mut last_err = NetError::Dial("no address".into());
        for addr in addrs {
            let dir = self.directory.clone();
            let seed = addr.to_string();
            let _ = tokio::task::spawn_blocking(move || dir.add_seed(&seed, 10)).await;
            match self
                .dial_addr(addr.clone(), via, Some(Duration::from_secs(15)))
                .await
            {
                Ok(node_id) => return Ok(node_id),
                Err(e) => last_err = e,
            }
        }
        Err(last_err)
    }

    /// Dials `addr`; with a timeout, waits for the connection and returns the node id.
    pub async fn dial_addr(
        &self,
        addr: Multiaddr,
        via: &'static str,
        wait: Option<Duration>,
    ) -> Result<String, NetError> {
        let peer = addr.iter().find_map(|p| match p {
            libp2p::multiaddr::Protocol::P2p(id) => Some(id),
            _ => None,
        });
        let Some(wait) = wait else {
            self.send(Command::Dial {
                addr,
                peer,
                via,
                reply: None,
            })
            .await?;
            return Ok(String::new());
        };
        let (reply, rx) = oneshot::channel();
        self.send(Command::Dial {
            addr,
            peer,
            via,
            reply: Some(reply),
        })
        .await?;
        tokio::time::timeout(wait, rx)
            .await
            .map_err(|_| NetError::Dial("timed out".into()))?
            .map_err(|_| NetError::Stopped)?
    }

    /// Sends a request to a connected peer and waits for its response.
    pub async fn request(&self, node_id: &str, request: Request) -> Result<Response, NetError> {
        let peer = peer_id_of(node_id).ok_or_else(|| NetError::UnknownPeer(node_id.to_string()))?;
        let (reply, rx) = oneshot::channel();
        self.send(Command::Request {
            peer,
            request,
            reply,
        })
        .await?;
        rx.await.map_err(|_| NetError::Stopped)?
    }

    /// Opens a pipeline link to `node_id` (dialling it if need be).
    pub async fn open_link(&self, node_id: &str) -> Result<link::Link, NetError> {
        let peer = peer_id_of(node_id).ok_or_else(|| NetError::UnknownPeer(node_id.to_string()))?;
        let mut control = self.links.clone();
        let stream = tokio::time::timeout(
            Duration::from_secs(15),
            control.open_stream(peer, link::PROTOCOL),
        )
        .await
        .map_err(|_| NetError::Request("opening a link timed out".into()))?
        .map_err(|e| NetError::Request(e.to_string()))?;
        Ok(link::Link::new(node_id.to_string(), stream))
    }

    /// The pipeline links other nodes open to this one; `None` after the first
    /// call (one taker).
    pub fn inbound_links(&self) -> Option<link::InboundLinks> {
        self.links
            .clone()
            .accept(link::PROTOCOL)
            .ok()
            .map(link::InboundLinks::new)
    }

    /// Counts a malformed frame from `node_id` against it (trust score); a peer
    /// whose trust falls below `ban_below_trust` is disconnected and refused for
    /// the cooling-off period.
    pub fn report_bad_frame(&self, node_id: &str) {
        self.shared
            .counters
            .bad_frames
            .fetch_add(1, Ordering::Relaxed);
        penalise(
            self.directory.clone(),
            self.commands.clone(),
            self.config.ban_below_trust,
            node_id.to_string(),
        );
    }

    /// Routes device-pool gossip (author node id, bytes) to `handler`; only the
    /// first call takes effect.
    pub fn set_pool_handler(&self, handler: mpsc::Sender<(String, Vec<u8>)>) {
        let _ = self.shared.pool_messages.set(handler);
    }

    /// Publishes a device-pool message (signed by this node as gossip author).
    pub async fn publish_pool(&self, data: Vec<u8>) -> Result<(), NetError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::PublishPool(data, reply)).await?;
        rx.await.map_err(|_| NetError::Stopped)?
    }

    /// Routes inbound credit-ledger messages to `handler`; only the first call
    /// takes effect.
    pub fn set_credit_handler(&self, handler: mpsc::Sender<InboundStep>) {
        let _ = self.shared.credits.set(handler);
    }

    /// Routes inbound pipeline steps to `handler`; only the first call takes effect.
    pub fn set_step_handler(&self, handler: mpsc::Sender<InboundStep>) {
        let _ = self.shared.steps.set(handler);
    }

    /// Announces now (e.g. after a nickname change).
    pub async fn announce_now(&self) {
        let _ = self.send(Command::AnnounceNow).await;
    }

    /// Starts a discovery round (Kademlia walk + peer exchange with every
    /// connected peer); returns how many peers were asked.
    pub async fn discover(&self) -> Result<usize, NetError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Discover { reply }).await?;
        rx.await.map_err(|_| NetError::Stopped)
    }

    /// Publishes raw bytes on the announcement topic (tests of forged input).
    #[cfg(feature = "test-hooks")]
    pub async fn publish_raw(&self, data: Vec<u8>) -> Result<(), NetError> {
        self.send(Command::PublishRaw(data)).await
    }

    async fn send(&self, cmd: Command) -> Result<(), NetError> {
        self.commands.send(cmd).await.map_err(|_| NetError::Stopped)
    }

    /// This node's id.
    pub fn node_id(&self) -> &str {
        &self.node_id
    }
}

fn build_behaviour(
    key: &libp2p::identity::Keypair,
    relay_client: relay::client::Behaviour,
    use_mdns: bool,
    offline: bool,
) -> Result<Behaviour, Box<dyn std::error::Error + Send + Sync>> {
    let peer_id = key.public().to_peer_id();
    let gossip_config = gossipsub::ConfigBuilder::default()
        .protocol_id("/swarmllm/gossip/1", gossipsub::Version::V1_1)
        .heartbeat_interval(Duration::from_secs(1))
        .validation_mode(gossipsub::ValidationMode::Strict)
        .validate_messages()
        .max_transmit_size(64 * 1024)
        .build()?;
    let mut gossipsub = gossipsub::Behaviour::new(
        gossipsub::MessageAuthenticity::Signed(key.clone()),
        gossip_config,
    )?;
    gossipsub.subscribe(&gossipsub::IdentTopic::new(announce::TOPIC))?;
    gossipsub.subscribe(&gossipsub::IdentTopic::new(POOL_TOPIC))?;

    let mut kad = kad::Behaviour::with_config(
        peer_id,
        kad::store::MemoryStore::new(peer_id),
        kad::Config::new(StreamProtocol::new("/swarmllm/kad/1")),
    );
    kad.set_mode(Some(kad::Mode::Server));

    let mdns = if use_mdns {
        Some(mdns::tokio::Behaviour::new(
            mdns::Config::default(),
            peer_id,
        )?)
    } else {
        None
    };

    Ok(Behaviour {
        limits: connection_limits::Behaviour::new(
            connection_limits::ConnectionLimits::default()
                .with_max_established(Some(512))
                .with_max_established_per_peer(Some(4))
                .with_max_pending_incoming(Some(64))
                .with_max_pending_outgoing(Some(64)),
        ),
        identify: identify::Behaviour::new(
            identify::Config::new("/swarmllm/id/1".into(), key.public())
                .with_agent_version(format!("swarmllm/{}", crate::VERSION)),
        ),
        ping: ping::Behaviour::new(ping::Config::new().with_interval(Duration::from_secs(5))),
        kad,
        gossipsub,
        mdns: Toggle::from(mdns),
        relay: Toggle::from(
            (!offline).then(|| relay::Behaviour::new(peer_id, relay::Config::default())),
        ),
        relay_client,
        dcutr: dcutr::Behaviour::new(peer_id),
        autonat: autonat::Behaviour::new(peer_id, autonat::Config::default()),
        rpc: request_response::Behaviour::with_codec(
            FrameCodec,
            [(frame::PROTOCOL, request_response::ProtocolSupport::Full)],
            request_response::Config::default().with_request_timeout(Duration::from_secs(30)),
        ),
        links: libp2p_stream::Behaviour::new(),
    })
}

/// The region to announce: `configured` when set, else a guess from the time zone.
pub fn detect_region(configured: &str) -> String {
    if !configured.is_empty() {
        return configured.to_string();
    }
    let tz = std::env::var("TZ")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/timezone").ok())
        .or_else(|| {
            std::fs::read_link("/etc/localtime")
                .ok()
                .map(|p| p.to_string_lossy().into_owned())
        })
        .unwrap_or_default();
    let tz = tz.trim();
    let region = if tz.contains("America/") {
        "NA"
    } else if tz.contains("Europe/") {
        "EU"
    } else if tz.contains("Asia/") {
        "AS"
    } else if tz.contains("Africa/") {
        "AF"
    } else if tz.contains("Australia/") || tz.contains("Pacific/") {
        "OC"
    } else {
        "GLOBAL"
    };
    region.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_id_and_peer_id_name_the_same_key() {
        let id = Identity::generate();
        let peer = peer_id_of(&id.node_id()).expect("peer id");
        assert_eq!(node_id_of(&peer).as_deref(), Some(id.node_id().as_str()));
        let kp = libp2p::identity::Keypair::ed25519_from_bytes(*id.secret_bytes()).expect("kp");
        assert_eq!(kp.public().to_peer_id(), peer);
        assert!(peer_id_of("zz").is_none());
    }
}
