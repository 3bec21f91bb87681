//! The task that owns the swarm. It never blocks: directory writes go to one
//! writer thread (in order), reads to the blocking pool, and results that the
//! swarm needs come back as commands.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures::StreamExt;
use libp2p::swarm::dial_opts::DialOpts;
use libp2p::swarm::{ConnectionId, SwarmEvent};
use libp2p::{Multiaddr, PeerId, Swarm, gossipsub, identify, kad, mdns, ping, request_response};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::announce::{self, Announcement};
use super::dir_writer::DirectoryWriter;
use super::directory::Directory;
use super::frame::{PeerHint, Request, Response};
use super::{
    Behaviour, BehaviourEvent, Command, ConnectedPeer, LocalInfoFn, NetConfig, NetError, Shared,
    node_id_of, peer_id_of,
};
use crate::identity::Identity;

type Reply<T> = oneshot::Sender<Result<T, NetError>>;

pub(super) struct EventLoop {
    swarm: Swarm<Behaviour>,
    commands: mpsc::Receiver<Command>,
    loopback: mpsc::Sender<Command>,
    shared: Arc<Shared>,
    directory: Directory,
    writer: DirectoryWriter,
    config: Arc<NetConfig>,
    identity: Identity,
    info: LocalInfoFn,
    shutdown: CancellationToken,
    pending_dials: HashMap<ConnectionId, (Option<Reply<String>>, &'static str)>,
    dial_via: HashMap<PeerId, &'static str>,
    pending_requests:
        HashMap<request_response::OutboundRequestId, (Reply<Response>, Option<Instant>)>,
    peer_exchange: HashSet<request_response::OutboundRequestId>,
    /// Peer-exchange hints taken from each peer in its current minute.
    hint_windows: HashMap<PeerId, (Instant, usize)>,
    /// Peers refused until the instant (their trust fell below the threshold).
    banned: HashMap<PeerId, Instant>,

    seq: u64,
}

/// Peer-exchange hints used from one answer.
const MAX_HINTS_PER_ANSWER: usize = 32;
/// Peer-exchange hints used from one peer per minute.
const MAX_HINTS_PER_MINUTE: usize = 32;
/// Addresses used from one hint.
const MAX_ADDRS_PER_HINT: usize = 8;
/// Peers whose hint budget is tracked (older windows are dropped beyond it).
const MAX_HINT_WINDOWS: usize = 4096;

impl EventLoop {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        swarm: Swarm<Behaviour>,
        commands: mpsc::Receiver<Command>,
        loopback: mpsc::Sender<Command>,
        shared: Arc<Shared>,
        directory: Directory,
        writer: DirectoryWriter,
        config: Arc<NetConfig>,
        identity: Identity,
        info: LocalInfoFn,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            swarm,
            commands,
            loopback,
            shared,
            directory,
            writer,
            config,
            identity,
            info,
            shutdown,
            pending_dials: HashMap::new(),
            dial_via: HashMap::new(),
            hint_windows: HashMap::new(),
            banned: HashMap::new(),

            pending_requests: HashMap::new(),
            peer_exchange: HashSet::new(),
            // Start from the clock so a restarted node's announcements are newer.
            seq: chrono::Utc::now().timestamp_millis() as u64,
        }
    }

    pub(super) async fn run(mut self) {
        let mut announce = tokio::time::interval(self.config.announce_interval);
        let mut maintain = tokio::time::interval(Duration::from_secs(2));
        loop {
            tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => break,
                cmd = self.commands.recv() => match cmd {
                    Some(cmd) => self.on_command(cmd),
                    None => break,
                },
                event = self.swarm.select_next_some() => self.on_event(event),
                _ = announce.tick() => self.announce(),
                _ = maintain.tick() => self.maintain(),
            }
        }
        tracing::debug!("p2p event loop stopped");
    }

    /// Queues a directory write behind the ones before it (see [`DirectoryWriter`]).
    fn db(
        &self,
        what: &'static str,
        f: impl FnOnce(&Directory) -> Result<(), crate::store::StoreError> + Send + 'static,
    ) {
        self.writer.write(what, f);
    }

    fn on_command(&mut self, cmd: Command) {
        match cmd {
            Command::Dial {
                addr,
                peer,
                via,
                reply,
            } => self.dial(addr, peer, via, reply),
            Command::Request {
                peer,
                request,
                reply,
            } => {
                if !self.swarm.is_connected(&peer) {
                    let _ = reply.send(Err(NetError::UnknownPeer(format!(
                        "{peer} is not connected"
                    ))));
                    return;
                }
                let id = self.swarm.behaviour_mut().rpc.send_request(&peer, request);
                self.pending_requests.insert(id, (reply, None));
            }
            Command::Respond { channel, response } => {
                let _ = self
                    .swarm
                    .behaviour_mut()
                    .rpc
                    .send_response(channel, response);
            }
            Command::AnnounceNow => self.announce(),
            Command::Ban(node_id) => self.ban(&node_id),
            Command::Discover { reply } if self.config.offline => {
                let _ = reply.send(0); // offline: mDNS is the only discovery
            }
            Command::Discover { reply } => {
                let kad = &mut self.swarm.behaviour_mut().kad;
                let _ = kad.bootstrap();
                kad.get_closest_peers(PeerId::random());
                let peers: Vec<PeerId> = self.swarm.connected_peers().copied().collect();
                for peer in &peers {
                    self.ask_for_peers(*peer);
                }
                let _ = reply.send(peers.len());
            }
            Command::Redial(_) if self.config.offline => {}
            Command::Redial(due) => {
                for (node_id, peer_id, addrs) in due {
                    let Ok(peer) = peer_id.parse::<PeerId>() else {
                        continue;
                    };
                    if self.swarm.is_connected(&peer) || node_id == self.identity.node_id() {
                        continue;
                    }
                    let addrs: Vec<Multiaddr> =
                        addrs.iter().filter_map(|a| a.parse().ok()).collect();
                    let opts = DialOpts::peer_id(peer).addresses(addrs).build();
                    if self.swarm.dial(opts).is_ok() {
                        self.count_dial();
                        self.dial_via.entry(peer).or_insert("redial");
                        self.db("redial", move |d| d.redial_started(&node_id));
                    }
                }
            }
            #[cfg(feature = "test-hooks")]
            Command::PublishRaw(data) => {
                let topic = gossipsub::IdentTopic::new(announce::TOPIC);
                let _ = self.swarm.behaviour_mut().gossipsub.publish(topic, data);
            }
            Command::PublishPool(data, reply) => {
                let topic = gossipsub::IdentTopic::new(super::POOL_TOPIC);
                let result = self
                    .swarm
                    .behaviour_mut()
                    .gossipsub
                    .publish(topic, data)
                    .map(|_| ())
                    .map_err(|e| NetError::Request(format!("publishing: {e}")));
                let _ = reply.send(result);
            }
        }
    }

    fn dial(
        &mut self,
        addr: Multiaddr,
        peer: Option<PeerId>,
        via: &'static str,
        reply: Option<Reply<String>>,
    ) {
        if let Some(p) = peer {
            if p == *self.swarm.local_peer_id() {
                if let Some(r) = reply {
                    let _ = r.send(Err(NetError::Dial(
                        "that is this node's own address".into(),
                    )));
                }
                return;
            }
            if self.swarm.is_connected(&p) {
                if let Some(r) = reply {
                    let _ = r.send(
                        node_id_of(&p).ok_or_else(|| NetError::Dial("not an ed25519 peer".into())),
                    );
                }
                return;
            }
            self.dial_via.insert(p, via);
        }
        let opts = match peer {
            Some(p) => DialOpts::peer_id(p).addresses(vec![addr]).build(),
            None => DialOpts::unknown_peer_id().address(addr).build(),
        };
        let id = opts.connection_id();
        match self.swarm.dial(opts) {
            Ok(()) => {
                self.count_dial();
                self.pending_dials.insert(id, (reply, via));
            }
            Err(e) => {
                if let Some(r) = reply {
                    let _ = r.send(Err(NetError::Dial(e.to_string())));
                }
            }
        }
    }

    fn count_dial(&self) {
        self.shared
            .counters
            .dials_started
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    fn ask_for_peers(&mut self, peer: PeerId) {
        if self.config.offline {
            return; // no peer exchange: peers come from mDNS only
        }
        let id = self
            .swarm
            .behaviour_mut()
            .rpc
            .send_request(&peer, Request::GetPeers);
        self.peer_exchange.insert(id);
    }

    fn on_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::NewListenAddr { address, .. } => {
                tracing::info!(%address, "p2p listening");
                self.shared
                    .listen_addrs
                    .write()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(address);
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                self.shared
                    .listen_addrs
                    .write()
                    .unwrap_or_else(|p| p.into_inner())
                    .retain(|a| a != &address);
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                connection_id,
                endpoint,
                num_established,
                ..
            } => {
                let via_dial = self.pending_dials.remove(&connection_id);
                let Some(node_id) = node_id_of(&peer_id) else {
                    // Not an Ed25519 key: not a SwarmLLM node.
                    let _ = self.swarm.disconnect_peer_id(peer_id);
                    if let Some((Some(r), _)) = via_dial {
                        let _ = r.send(Err(NetError::Dial(
                            "the peer is not a SwarmLLM node".into(),
                        )));
                    }
                    return;
                };
                if self.is_banned(&peer_id) {
                    let _ = self.swarm.disconnect_peer_id(peer_id);
                    if let Some((Some(r), _)) = via_dial {
                        let _ = r.send(Err(NetError::Dial("the peer is banned".into())));
                    }
                    return;
                }
                let via = via_dial
                    .as_ref()
                    .map(|(_, v)| *v)
                    .or_else(|| self.dial_via.remove(&peer_id))
                    .unwrap_or(if endpoint.is_dialer() {
                        "dial"
                    } else {
                        "inbound"
                    });
                if let Some((Some(r), _)) = via_dial {
                    let _ = r.send(Ok(node_id.clone()));
                }
                if num_established.get() > 1 {
                    return;
                }
                let addr = endpoint.get_remote_address().clone();
                tracing::info!(peer = %node_id, %addr, via, "peer connected");
                self.shared
                    .connected
                    .write()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(
                        peer_id,
                        ConnectedPeer {
                            node_id: node_id.clone(),
                            peer_id: peer_id.to_string(),
                            address: addr.to_string(),
                            connected_since: chrono::Utc::now()
                                .to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                            latency_ms: None,
                        },
                    );
                // Only a dialled address is known to be reachable.
                let addrs = if endpoint.is_dialer() {
                    vec![addr.to_string()]
                } else {
                    Vec::new()
                };
                let pid = peer_id.to_string();
                self.db("connect", move |d| d.connected(&node_id, &pid, &addrs, via));
                self.ask_for_peers(peer_id);
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established: 0,
                ..
            } => {
                self.shared
                    .connected
                    .write()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&peer_id);
                if let Some(node_id) = node_id_of(&peer_id) {
                    tracing::info!(peer = %node_id, "peer disconnected");
                    self.db("disconnect", move |d| d.disconnected(&node_id));
                }
            }
            SwarmEvent::OutgoingConnectionError {
                peer_id,
                connection_id,
                error,
            } => {
                if let Some((Some(r), _)) = self.pending_dials.remove(&connection_id) {
                    let _ = r.send(Err(NetError::Dial(error.to_string())));
                }
                // A failed dial is forgotten: nothing about it stays in memory.
                if let Some(peer) = peer_id {
                    self.dial_via.remove(&peer);
                }
                // A spare dial that lost to a live connection (both sides dialled,
                // or one address of several failed) says nothing against the peer.
                if let Some(node_id) = peer_id
                    .filter(|p| !self.swarm.is_connected(p))
                    .as_ref()
                    .and_then(node_id_of)
                {
                    tracing::debug!(peer = %node_id, %error, "dial failed");
                    self.db("dial failure", move |d| d.dial_failed(&node_id));
                }
            }
            SwarmEvent::Behaviour(event) => self.on_behaviour(event),
            _ => {}
        }
    }

    fn on_behaviour(&mut self, event: BehaviourEvent) {
        match event {
            BehaviourEvent::Identify(identify::Event::Received { peer_id, info, .. })
                if !self.config.offline =>
            {
                for addr in &info.listen_addrs {
                    self.swarm
                        .behaviour_mut()
                        .kad
                        .add_address(&peer_id, addr.clone());
                }
            }
            BehaviourEvent::Ping(ping::Event {
                peer,
                result: Ok(rtt),
                ..
            }) => {
                let ms = rtt.as_secs_f64() * 1000.0;
                if let Some(c) = self
                    .shared
                    .connected
                    .write()
                    .unwrap_or_else(|p| p.into_inner())
                    .get_mut(&peer)
                {
                    c.latency_ms = Some((ms * 100.0).round() / 100.0);
                }
                if let Some(node_id) = node_id_of(&peer) {
                    self.db("latency", move |d| d.latency(&node_id, ms));
                }
            }
            BehaviourEvent::Mdns(mdns::Event::Discovered(found)) => {
                for (peer, addr) in found {
                    // Record how we learnt of it even if its own dial reaches us first.
                    if let Some(node_id) = node_id_of(&peer) {
                        let (pid, a) = (peer.to_string(), addr.to_string());
                        self.db("mdns", move |d| {
                            d.learned(&node_id, &pid, &[a], "mdns").map(|_| ())
                        });
                    }
                    if !self.swarm.is_connected(&peer) {
                        self.dial(addr, Some(peer), "mdns", None);
                    }
                }
            }
            BehaviourEvent::Gossipsub(gossipsub::Event::Message {
                propagation_source,
                message_id,
                message,
            }) if message.topic == gossipsub::IdentTopic::new(super::POOL_TOPIC).hash() => {
                self.on_pool_message(propagation_source, message_id, message);
            }
            BehaviourEvent::Gossipsub(gossipsub::Event::Message {
                propagation_source,
                message_id,
                message,
            }) => {
                self.on_announcement(propagation_source, message_id, message);
            }
            BehaviourEvent::Rpc(request_response::Event::Message { peer, message, .. }) => {
                match message {
                    request_response::Message::Request {
                        request, channel, ..
                    } => self.on_request(peer, request, channel),
                    request_response::Message::Response {
                        request_id,
                        response,
                    } => {
                        if self.peer_exchange.remove(&request_id) {
                            self.on_peer_list(peer, response);
                        } else if let Some((reply, _)) = self.pending_requests.remove(&request_id) {
                            let _ = reply.send(Ok(response));
                        }
                    }
                }
            }
            BehaviourEvent::Rpc(request_response::Event::OutboundFailure {
                request_id,
                error,
                peer,
                ..
            }) => {
                self.peer_exchange.remove(&request_id);
                if let Some((reply, _)) = self.pending_requests.remove(&request_id) {
                    let _ = reply.send(Err(NetError::Request(format!("{peer}: {error}"))));
                }
            }
            BehaviourEvent::Rpc(request_response::Event::InboundFailure {
                peer, error, ..
            }) => {
                tracing::debug!(%peer, %error, "inbound request failed");
            }
            BehaviourEvent::Autonat(libp2p::autonat::Event::StatusChanged { new, .. }) => {
                tracing::info!(status = ?new, "NAT status");
            }
            BehaviourEvent::Kad(kad::Event::RoutingUpdated {
                peer,
                is_new_peer: true,
                addresses,
                ..
            }) if !self.swarm.is_connected(&peer) => {
                let addrs: Vec<Multiaddr> = addresses.iter().cloned().collect();
                let _ = self
                    .swarm
                    .dial(DialOpts::peer_id(peer).addresses(addrs).build());
                self.dial_via.entry(peer).or_insert("kademlia");
            }
            _ => {}
        }
    }

    fn on_request(
        &mut self,
        peer: PeerId,
        request: Request,
        channel: request_response::ResponseChannel<Response>,
    ) {
        self.shared
            .counters
            .requests_served
            .fetch_add(1, Ordering::Relaxed);
        match request {
            Request::Echo(bytes) => {
                let _ = self
                    .swarm
                    .behaviour_mut()
                    .rpc
                    .send_response(channel, Response::Echo(bytes));
            }
            Request::GetPeers => {
                let dir = self.directory.clone();
                let loopback = self.loopback.clone();
                let own = self.own_hint();
                tokio::task::spawn_blocking(move || {
                    let mut hints: Vec<PeerHint> = dir
                        .list(64)
                        .unwrap_or_default()
                        .into_iter()
                        .filter(|p| p.is_active && !p.addresses.is_empty())
                        .map(|p| PeerHint {
                            node_id: p.node_id,
                            addrs: p.addresses,
                        })
                        .collect();
                    hints.push(own);
                    let _ = loopback.blocking_send(Command::Respond {
                        channel,
                        response: Response::Peers(hints),
                    });
                });
            }
            Request::Invalid(reason) => {
                self.misbehaved(peer, &reason);
                let _ = self.swarm.behaviour_mut().rpc.send_response(
                    channel,
                    Response::Error {
                        code: 400,
                        message: reason,
                    },
                );
            }
            request @ (Request::Activation(_) | Request::Fetch(_) | Request::Credit(_)) => {
                let handler = match request {
                    Request::Credit(_) => self.shared.credits.get(),
                    _ => self.shared.steps.get(),
                };
                let Some(handler) = handler else {
                    let _ = self.swarm.behaviour_mut().rpc.send_response(
                        channel,
                        Response::Error {
                            code: 404,
                            message: "this node does not serve that request".into(),
                        },
                    );
                    return;
                };
                let step = super::InboundStep {
                    from: node_id_of(&peer).unwrap_or_default(),
                    request,
                    responder: super::Responder {
                        channel,
                        commands: self.loopback.clone(),
                    },
                };
                if let Err(e) = handler.try_send(step) {
                    let step = match e {
                        mpsc::error::TrySendError::Full(s)
                        | mpsc::error::TrySendError::Closed(s) => s,
                    };
                    let _ = self.swarm.behaviour_mut().rpc.send_response(
                        step.responder.channel,
                        Response::Error {
                            code: 503,
                            message: "too many requests in flight".into(),
                        },
                    );
                }
            }
            // Raw is a send-side test hook; the codec never decodes one.
            #[cfg(feature = "test-hooks")]
            Request::Raw(_) => {
                let response = Response::Error {
                    code: 400,
                    message: "unexpected raw frame".into(),
                };
                let _ = self
                    .swarm
                    .behaviour_mut()
                    .rpc
                    .send_response(channel, response);
            }
        }
    }

    fn own_hint(&self) -> PeerHint {
        PeerHint {
            node_id: self.identity.node_id(),
            addrs: self.shared.listen_addr_strings(),
        }
    }

    fn misbehaved(&mut self, peer: PeerId, reason: &str) {
        self.shared
            .counters
            .bad_frames
            .fetch_add(1, Ordering::Relaxed);
        if super::malformed_log_allowed() {
            tracing::warn!(%peer, reason, "malformed input from peer");
        } else {
            tracing::debug!(%peer, reason, "malformed input from peer");
        }
        if let Some(node_id) = node_id_of(&peer) {
            super::penalise(
                self.directory.clone(),
                self.loopback.clone(),
                self.config.ban_below_trust,
                node_id,
            );
        }
    }

    /// Disconnects `node_id` and refuses it until the cooling-off period ends.
    fn ban(&mut self, node_id: &str) {
        let Some(peer) = peer_id_of(node_id) else {
            return;
        };
        const MAX_BANNED: usize = 4096;
        if self.banned.len() >= MAX_BANNED {
            let now = Instant::now();
            self.banned.retain(|_, until| *until > now);
        }
        if self.banned.len() < MAX_BANNED {
            self.banned
                .insert(peer, Instant::now() + self.config.cool_off);
        }
        tracing::warn!(peer = %node_id, secs = self.config.cool_off.as_secs(),
            "peer trust fell below the threshold; disconnected and refused for a while");
        let _ = self.swarm.disconnect_peer_id(peer);
        let until = now_unix_plus(self.config.cool_off);
        let node_id = node_id.to_string();
        self.db("ban", move |d| d.banned(&node_id, until));
    }

    fn is_banned(&mut self, peer: &PeerId) -> bool {
        match self.banned.get(peer) {
            Some(until) if *until > Instant::now() => true,
            Some(_) => {
                self.banned.remove(peer);
                false
            }
            None => false,
        }
    }

    /// Hints `peer` may still give this minute.
    fn hint_budget(&mut self, peer: PeerId) -> usize {
        match self.hint_windows.get(&peer) {
            Some((start, used)) if start.elapsed() < Duration::from_secs(60) => {
                MAX_HINTS_PER_MINUTE.saturating_sub(*used)
            }
            _ => MAX_HINTS_PER_MINUTE,
        }
    }

    fn spend_hints(&mut self, peer: PeerId, n: usize) {
        if self.hint_windows.len() >= MAX_HINT_WINDOWS {
            self.hint_windows
                .retain(|_, (start, _)| start.elapsed() < Duration::from_secs(60));
        }
        let window = self.hint_windows.entry(peer).or_insert((Instant::now(), 0));
        if window.0.elapsed() >= Duration::from_secs(60) {
            *window = (Instant::now(), 0);
        }
        window.1 += n;
    }

    fn on_peer_list(&mut self, from: PeerId, response: Response) {
        let started = Instant::now();
        let Response::Peers(hints) = response else {
            return;
        };
        let me = self.identity.node_id();
        let from_id = node_id_of(&from).unwrap_or_default();
        // At most 32 hints an answer and 32 a minute from one peer, 8 addresses
        // each: a peer cannot flood the directory or make this node dial the world.
        let budget = self.hint_budget(from);
        let hints: Vec<_> = hints
            .into_iter()
            .filter(|h| h.node_id != me)
            .take(MAX_HINTS_PER_ANSWER.min(budget))
            .map(|mut h| {
                h.addrs.truncate(MAX_ADDRS_PER_HINT);
                h
            })
            .collect();
        self.spend_hints(from, hints.len());
        let mut to_dial = Vec::new();
        for hint in hints.iter().filter(|h| h.node_id != me) {
            let Some(peer) = peer_id_of(&hint.node_id) else {
                continue;
            };
            if !self.swarm.is_connected(&peer) {
                let addrs: Vec<Multiaddr> =
                    hint.addrs.iter().filter_map(|a| a.parse().ok()).collect();
                if !addrs.is_empty() {
                    to_dial.push((peer, addrs));
                }
            }
        }
        for (peer, addrs) in to_dial {
            self.dial_via.entry(peer).or_insert("peer-exchange");
            let _ = self
                .swarm
                .dial(DialOpts::peer_id(peer).addresses(addrs).build());
        }
        let received = hints.len();
        self.db("peer exchange", move |d| {
            for h in hints.iter().filter(|h| h.node_id != me) {
                if let Some(peer) = peer_id_of(&h.node_id) {
                    d.learned(&h.node_id, &peer.to_string(), &h.addrs, "peer-exchange")?;
                }
            }
            d.log_sync(
                &from_id,
                "pull",
                received,
                0,
                true,
                None,
                started.elapsed().as_millis() as u64,
            )
        });
    }

    /// Pool messages are relayed if small and from a known author; their meaning
    /// is checked by the pool module.
    fn on_pool_message(
        &mut self,
        source: PeerId,
        id: gossipsub::MessageId,
        message: gossipsub::Message,
    ) {
        let author = message.source.and_then(|p| node_id_of(&p));
        let acceptance = if author.is_some() && message.data.len() <= 64 * 1024 {
            gossipsub::MessageAcceptance::Accept
        } else {
            gossipsub::MessageAcceptance::Reject
        };
        let _ = self
            .swarm
            .behaviour_mut()
            .gossipsub
            .report_message_validation_result(&id, &source, acceptance);
        if let (Some(author), Some(handler)) = (author, self.shared.pool_messages.get()) {
            let _ = handler.try_send((author, message.data));
        }
    }

    fn on_announcement(
        &mut self,
        source: PeerId,
        id: gossipsub::MessageId,
        message: gossipsub::Message,
    ) {
        let publisher = message.source.unwrap_or(source);
        let publisher_id = node_id_of(&publisher).unwrap_or_default();
        let ttl = (self.config.announce_interval.as_secs() as i64 * 6).max(60);
        let result = announce::verify(
            &message.data,
            &publisher_id,
            chrono::Utc::now().timestamp(),
            ttl,
        );
        let acceptance = match &result {
            Ok(_) => gossipsub::MessageAcceptance::Accept,
            // Stale is not malice: drop it quietly.
            Err(announce::AnnounceError::Stale { .. }) => gossipsub::MessageAcceptance::Ignore,
            Err(_) => gossipsub::MessageAcceptance::Reject,
        };
        let _ = self
            .swarm
            .behaviour_mut()
            .gossipsub
            .report_message_validation_result(&id, &source, acceptance);
        match result {
            Ok(ann) => {
                self.shared
                    .counters
                    .announcements_accepted
                    .fetch_add(1, Ordering::Relaxed);
                if !self.swarm.is_connected(&publisher) && ann.node_id != self.identity.node_id() {
                    let addrs: Vec<Multiaddr> =
                        ann.addrs.iter().filter_map(|a| a.parse().ok()).collect();
                    if !addrs.is_empty() {
                        self.dial_via.entry(publisher).or_insert("gossip");
                        let _ = self
                            .swarm
                            .dial(DialOpts::peer_id(publisher).addresses(addrs).build());
                    }
                }
                let pid = publisher.to_string();
                let from = ann.node_id.clone();
                self.db("announcement", move |d| {
                    d.announced(&ann, &pid)?;
                    d.log_sync(&from, "pull", 1, 0, true, None, 0)
                });
            }
            Err(announce::AnnounceError::Stale { age_secs }) => {
                tracing::debug!(peer = %publisher_id, age_secs, "stale announcement ignored");
            }
            Err(e) => {
                self.shared
                    .counters
                    .announcements_rejected
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!(peer = %publisher_id, error = %e, "announcement rejected");
                self.misbehaved(publisher, &e.to_string());
                let reason = e.to_string();
                self.db("sync log", move |d| {
                    d.log_sync(&publisher_id, "pull", 0, 0, false, Some(&reason), 0)
                });
            }
        }
    }

    fn announce(&mut self) {
        let info = (self.info)();
        self.seq += 1;
        let ann = Announcement {
            node_id: self.identity.node_id(),
            nickname: info.nickname,
            version: crate::VERSION.to_string(),
            capabilities: info.capabilities,
            hardware: info.hardware,
            region: self.config.region.clone(),
            models: info.models,
            load: info.load,
            addrs: self.own_hint().addrs,
            timestamp: chrono::Utc::now().timestamp(),
            seq: self.seq,
        };
        let topic = gossipsub::IdentTopic::new(announce::TOPIC);
        let sent = self.swarm.behaviour().gossipsub.all_peers().count();
        if sent == 0 {
            return;
        }
        let result = self
            .swarm
            .behaviour_mut()
            .gossipsub
            .publish(topic, ann.sign(&self.identity));
        let me = self.identity.node_id();
        let error = result.err().map(|e| e.to_string());
        self.db("sync log", move |d| {
            d.log_sync(&me, "push", 0, sent, error.is_none(), error.as_deref(), 0)
        });
    }

    fn maintain(&mut self) {
        self.shared
            .counters
            .maintenance_rounds
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let connected: Vec<String> = self
            .shared
            .connected
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(|c| c.node_id.clone())
            .collect();
        let stale = (self.config.announce_interval.as_secs() as i64 * 3).max(15);
        let loopback = self.loopback.clone();
        let offline = self.config.offline;
        // Every 150th round (5 minutes), and the first: forget long-gone peers.
        let prune = self
            .shared
            .counters
            .maintenance_rounds
            .load(std::sync::atomic::Ordering::Relaxed)
            % 150
            == 1;
        // Behind the connects and disconnects already queued, so it sees them.
        self.db("maintenance", move |dir| {
            dir.expire(&connected, stale)?;
            if prune {
                let n = dir.prune(&connected)?;
                if n > 0 {
                    tracing::info!(forgotten = n, "peer directory pruned");
                }
            }
            let due = dir.due_for_redial(8)?;
            if !due.is_empty() && !offline {
                // A missed round is retried in two seconds; never block the writer.
                let _ = loopback.try_send(Command::Redial(due));
            }
            Ok(())
        });
    }
}

/// Unix seconds `d` from now.
fn now_unix_plus(d: Duration) -> i64 {
    chrono::Utc::now().timestamp() + i64::try_from(d.as_secs()).unwrap_or(i64::MAX / 2)
}
