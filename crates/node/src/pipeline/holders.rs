//! Who holds which layers: this node's ranges and what connected peers announce
//! (only holders of the manifest accepted here), the models the network can
//! serve, and the chain a request takes over them (private mode included).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use super::route::{self, Holder, NoRoute, Plan};
use super::{NetworkModel, Pipeline, transfer};

/// A connected peer as its announcements describe it.
#[derive(Debug, Clone)]
pub(super) struct PeerView {
    pub(super) node_id: String,
    pub(super) models: Vec<crate::net::announce::HostedModel>,
    pub(super) rtt_ms: Option<f64>,
    pub(super) queue_depth: u32,
    pub(super) trust: i64,
    /// The address of the live connection.
    pub(super) address: String,
    /// Its schedule lets it serve others now.
    pub(super) contributing: bool,
}

impl Pipeline {
    /// Everyone who can run part of `model_id`: this node's ranges and those that
    /// connected peers announce.
    pub async fn holders(&self, model_id: &str) -> Vec<Holder> {
        self.holders_in(model_id, &self.peers().await)
    }

    /// [`Pipeline::holders`] over an already-read peer list.
    pub(super) fn holders_in(&self, model_id: &str, peers: &[PeerView]) -> Vec<Holder> {
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
                load_ms: 0.0,
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
                    load_ms: 0.0,
                })
        });
        local.chain(remote).collect()
    }

    /// Every connected peer with what it announced: one directory read, shared
    /// by everything one decision needs (holders, layer count, trust, address).
    pub(super) async fn peers(&self) -> Vec<PeerView> {
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
                    contributing: r.load["contributing"] != serde_json::Value::Bool(false),
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
        let mut local_ids = HashSet::new();
        for m in self.local_models() {
            n_layers.insert(m.manifest.model_id.clone(), m.manifest.n_layers);
            local_ids.insert(m.manifest.model_id);
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
                    && local_ids.contains(&id)
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

    /// Plans a chain for `model_id` without `exclude`d nodes, each holder
    /// weighed by this node's sessions in flight there and a random share of its
    /// cost (see `route`), so requests spread over replicas.
    pub async fn plan(&self, model_id: &str, exclude: &HashSet<String>) -> Result<Plan, NoRoute> {
        self.plan_with(model_id, exclude, false)
            .await
            .map(|(p, _)| p)
    }

    /// [`Pipeline::plan`] for a generation about to start: the chosen chain's
    /// nodes count this session as in flight (until the slots drop) from the
    /// moment it is chosen, so requests planned at the same time spread too.
    pub(super) async fn plan_reserved(
        &self,
        model_id: &str,
    ) -> Result<(Plan, Vec<crate::net::inflight::Slot>), NoRoute> {
        self.plan_with(model_id, &HashSet::new(), true).await
    }

    async fn plan_with(
        &self,
        model_id: &str,
        exclude: &HashSet<String>,
        reserve: bool,
    ) -> Result<(Plan, Vec<crate::net::inflight::Slot>), NoRoute> {
        let peers = self.peers().await;
        let n_layers = self.n_layers_in(model_id, &peers);
        let mut holders = self.holders_in(model_id, &peers);
        // A holder outside its contribution hours serves only its own pool.
        let resting: HashSet<&str> = peers
            .iter()
            .filter(|p| !p.contributing)
            .map(|p| p.node_id.as_str())
            .collect();
        if holders.iter().any(|h| resting.contains(h.node_id.as_str())) {
            let members = match self.inner.serve_policy.get() {
                Some(policy) => {
                    let members = Arc::clone(&policy.pool_members);
                    tokio::task::spawn_blocking(move || members())
                        .await
                        .unwrap_or_default()
                }
                None => HashSet::new(),
            };
            holders
                .retain(|h| !resting.contains(h.node_id.as_str()) || members.contains(&h.node_id));
        }
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
            return self.weigh_and_plan(n_layers, holders, exclude, model_id, reserve);
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
        self.weigh_and_plan(n_layers, holders, exclude, model_id, reserve)
            .map_err(|mut e| {
                e.private_mode = true;
                e
            })
    }

    /// Adds each holder's load term, plans, and (with `reserve`) counts the
    /// chain's remote nodes as in flight — one step, under one lock, so two
    /// requests planned together see each other.
    fn weigh_and_plan(
        &self,
        n_layers: u32,
        holders: Vec<Holder>,
        exclude: &HashSet<String>,
        model_id: &str,
        reserve: bool,
    ) -> Result<(Plan, Vec<crate::net::inflight::Slot>), NoRoute> {
        let _one_at_a_time = self
            .inner
            .route_lock
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let in_flight = self.inner.in_flight.snapshot();
        let mut holders = holders;
        route::fill_unmeasured(&mut holders);
        let holders: Vec<Holder> = holders
            .into_iter()
            .map(|mut h| {
                let n = if h.local {
                    0
                } else {
                    in_flight.get(&h.node_id).copied().unwrap_or(0)
                };
                h.load_ms = route::load_ms(h.cost(), n, rand::random::<f64>());
                h
            })
            .collect();
        tracing::debug!(
            model = model_id,
            holders = %holders.iter().map(|h| format!("{}[{}..{}]={:.1}ms", super::short(&h.node_id), h.layer_start, h.layer_end, h.cost())).collect::<Vec<_>>().join(" "),
            "route candidates"
        );
        let plan = route::plan(n_layers, &holders, exclude, self.encrypted(model_id))?;
        let slots = if reserve {
            plan.spans
                .iter()
                .filter(|s| !s.primary.local)
                .filter_map(|s| {
                    self.inner
                        .in_flight
                        .try_acquire(&s.primary.node_id, usize::MAX)
                })
                .collect()
        } else {
            Vec::new()
        };
        Ok((plan, slots))
    }

    /// The model's layer count: from its manifest here, else from an announcement.
    pub(super) fn n_layers_in(&self, model_id: &str, peers: &[PeerView]) -> u32 {
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
}
