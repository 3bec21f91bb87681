//! The snapshot auto-manage decides over, built from this node's models, the
//! peers' (validated) announcements and the user's settings. The API shows the
//! same snapshot (trust levels, targets), so what the dashboard says is what the
//! loop acts on.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use super::TrustLevel;
use super::demand::{self, ModelDemand, NetworkDemand};
use super::placement::{self, ModelNeed, ShardNeed};
use crate::node::Node;

/// A node that does not say where it is.
pub const UNKNOWN_REGION: &str = "UNKNOWN";
/// The capability a node announces while auto-manage may acquire there.
pub const AUTO_CAPABILITY: &str = "auto-manage";
/// Peer records read for one view.
const MAX_PEERS: usize = 1000;

/// Everything one auto-manage round needs.
#[derive(Debug, Clone, Default)]
pub struct SwarmView {
    /// This node.
    pub node_id: String,
    /// Its region.
    pub region: String,
    /// Live nodes (this one included), by region.
    pub nodes_by_region: BTreeMap<String, usize>,
    /// Demand per model as this node can vouch for it.
    pub demand: BTreeMap<String, NetworkDemand>,
    /// Every model known here, with its shards when its manifest is here.
    pub models: Vec<ModelNeed>,
    /// The region of each node heard of (this one included).
    pub region_of: HashMap<String, String>,
    /// Nodes holding some of each model (this one included).
    pub model_holders: BTreeMap<String, BTreeSet<String>>,
    /// Holders of each shard: (model, index) → node ids.
    pub shard_holders: HashMap<(String, u32), BTreeSet<String>>,
    /// Live peers that may acquire, with the disk (bytes) each says it has left.
    pub auto_peers: BTreeMap<String, u64>,
    /// Bytes this node's models take on disk.
    pub used_bytes: u64,
    /// The disk budget in bytes (`None`: no limit).
    pub budget_bytes: Option<u64>,
    /// RAM available now: a fetched shard is loaded, so it must fit there too.
    pub free_memory_bytes: Option<u64>,
    /// The machine of each live node (this one included), as announced.
    pub machines: HashMap<String, placement::Machine>,
}

impl SwarmView {
    /// Live nodes known, this one included.
    pub fn nodes(&self) -> usize {
        self.nodes_by_region.values().sum::<usize>().max(1)
    }

    /// A model's entry.
    pub fn model(&self, model_id: &str) -> Option<&ModelNeed> {
        self.models.iter().find(|m| m.model_id == model_id)
    }

    /// Bytes auto-manage may still fill here (see [`placement::room`]).
    pub fn free_bytes(&self) -> u64 {
        placement::room(self.budget_bytes, self.used_bytes, self.free_memory_bytes)
    }

    /// How fast `node` runs a shard of `bytes` (1 for a node whose machine is
    /// not known).
    pub fn speed(&self, node: &str, bytes: u64) -> f64 {
        self.machines
            .get(node)
            .map_or(1.0, |m| placement::speed(*m, bytes))
    }

    /// The region where most holders of the shards beside shard `index` of
    /// `model` are (the first by name on a tie: every node picks the same one).
    pub fn near_region(&self, model: &str, index: u32) -> Option<&str> {
        let mut regions: BTreeMap<&str, usize> = BTreeMap::new();
        for i in [index.checked_sub(1), index.checked_add(1)]
            .into_iter()
            .flatten()
        {
            for h in self
                .shard_holders
                .get(&(model.to_string(), i))
                .into_iter()
                .flatten()
            {
                if let Some(r) = self.region_of.get(h) {
                    *regions.entry(r.as_str()).or_default() += 1;
                }
            }
        }
        regions
            .into_iter()
            .max_by(|a, b| a.1.cmp(&b.1).then_with(|| b.0.cmp(a.0)))
            .map(|(r, _)| r)
    }

    /// `node`'s weight in the line for a shard of `bytes` (see
    /// [`placement::weight`]): its speed, doubled when it is in `near` (the
    /// shard's [`SwarmView::near_region`]).
    pub fn weight(&self, node: &str, bytes: u64, near: Option<&str>) -> f64 {
        let is_near = near.is_some_and(|r| self.region_of.get(node).is_some_and(|n| n == r));
        placement::weight(self.speed(node, bytes), is_near)
    }
}

/// A node's machine from its announced hardware summary (the same figures
/// every node reads, so every node computes the same weights).
fn machine_of(hardware: &serde_json::Value) -> placement::Machine {
    let vram_gb = hardware["vram_gb"].as_f64().unwrap_or(0.0);
    placement::Machine {
        cores: hardware["cores"]
            .as_u64()
            .map_or(0, |c| u32::try_from(c).unwrap_or(u32::MAX)),
        vram_bytes: if vram_gb.is_finite() && vram_gb > 0.0 {
            (vram_gb.min(1e6) * (1u64 << 30) as f64) as u64
        } else {
            0
        },
    }
}

/// A view at most `max_age` old: every admin WebSocket client wants one every
/// 2 s, and one build (a directory read) serves them all. Callers that arrive
/// while it is being built wait for it rather than build their own.
pub async fn recent(node: &Node, max_age: std::time::Duration) -> std::sync::Arc<SwarmView> {
    let swarm = node.swarm();
    let mut slot = swarm.inner.recent_view.lock().await;
    if let Some((at, view)) = slot.as_ref()
        && at.elapsed() <= max_age
    {
        return view.clone();
    }
    let view = std::sync::Arc::new(build(node).await);
    *slot = Some((std::time::Instant::now(), view.clone()));
    view
}

/// Builds the view (reads the peer directory and the pool's pins).
pub async fn build(node: &Node) -> SwarmView {
    let config = node.config();
    let swarm = node.swarm();
    let me = node.node_id();
    let pipeline = node.pipeline();
    let region = node
        .network()
        .map(|n| n.region().to_string())
        .unwrap_or_else(|| crate::net::detect_region(&config.region));
    let window = i64::from(config.demand_window_secs);
    let now = chrono::Utc::now().timestamp();
    let records = match node.network() {
        Some(n) => n.peer_records(MAX_PEERS).await,
        None => Vec::new(),
    };

    let mut nodes_by_region: BTreeMap<String, usize> = BTreeMap::new();
    *nodes_by_region.entry(region.clone()).or_default() += 1;
    let mut region_of: HashMap<String, String> = HashMap::new();
    region_of.insert(me.clone(), region.clone());
    let mut announced: Vec<(String, Vec<ModelDemand>)> = Vec::new();
    let mut auto_peers = BTreeMap::new();
    let mut machines = HashMap::new();
    if let Some(hw) = swarm.hardware() {
        machines.insert(
            me.clone(),
            machine_of(&serde_json::to_value(hw).unwrap_or_default()),
        );
    }
    for r in &records {
        let r_region = r.region.clone().unwrap_or_else(|| UNKNOWN_REGION.into());
        if r.is_active {
            *nodes_by_region.entry(r_region.clone()).or_default() += 1;
            machines.insert(r.node_id.clone(), machine_of(&r.hardware));
            if r.capabilities
                .as_array()
                .is_some_and(|c| c.iter().any(|v| v == AUTO_CAPABILITY))
            {
                let free_mb = r.load["auto_free_mb"].as_u64().unwrap_or(0);
                auto_peers.insert(r.node_id.clone(), free_mb.saturating_mul(1_048_576));
            }
        }
        region_of.insert(r.node_id.clone(), r_region);
        // Demand from any node heard from within the window (gossip carries the
        // announcements of nodes this one is not connected to).
        if r.last_seen_at.is_some_and(|t| now - t <= window) {
            let entries: Vec<ModelDemand> =
                serde_json::from_value(r.load["demand"].clone()).unwrap_or_default();
            let entries: Vec<ModelDemand> = entries
                .into_iter()
                .take(demand::MAX_DEMAND_ENTRIES)
                .filter(|d| d.validate().is_ok())
                .collect();
            if !entries.is_empty() {
                announced.push((r.node_id.clone(), entries));
            }
        }
    }
    let local_demand = swarm.demand().snapshot();
    let demand = demand::aggregate(
        &me,
        &local_demand,
        |m| swarm.demand().requesters(m),
        announced.iter().map(|(n, e)| (n.as_str(), e.as_slice())),
    );

    let network = pipeline.network_models().await;
    let local = pipeline.local_models();
    let pools = node.pools().clone();
    let pool_pins = tokio::task::spawn_blocking(move || pools.pins())
        .await
        .ok()
        .and_then(Result::ok)
        .unwrap_or_default();
    let settings = swarm.settings();
    let locks = settings.all_locks();
    let nodes = nodes_by_region.values().sum::<usize>().max(1);

    // A model this node serves whole (`--model`) has it as a holder too.
    let engine_model = node.engine().map(|e| e.info().id.clone());
    let ids: BTreeSet<String> = local
        .iter()
        .map(|m| m.manifest.model_id.clone())
        .chain(network.iter().map(|m| m.id.clone()))
        .chain(demand.keys().cloned())
        .chain(engine_model.clone())
        .collect();
    let mut models = Vec::new();
    let mut model_holders = BTreeMap::new();
    let mut shard_holders = HashMap::new();
    let mut used_bytes = 0u64;
    for id in ids {
        let here = local.iter().find(|m| m.manifest.model_id == id);
        let net = network.iter().find(|m| m.id == id);
        let pinned: BTreeSet<u32> = pool_pins
            .iter()
            .filter(|p| p.model_id == id && p.target_node_id == me)
            .flat_map(|p| {
                here.map(|m| {
                    m.manifest
                        .shards
                        .iter()
                        .map(|s| s.index)
                        .filter(|i| p.covers(*i))
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default()
            })
            .collect();
        let pool_pinned = pool_pins
            .iter()
            .any(|p| p.model_id == id && p.target_node_id == me);
        // The user's choice: shards on disk that auto-manage did not fetch (a
        // header fetched only to send requests is not a choice), a pool pin, or
        // the model this node serves whole (`--model`).
        let chosen = (here.is_some_and(|m| !m.held.is_empty()) && !settings.auto_acquired(&id))
            || pool_pinned
            || engine_model.as_deref() == Some(id.as_str());
        let mut holder_ids: BTreeSet<&str> = net
            .map(|m| m.holders.iter().map(|h| h.node_id.as_str()).collect())
            .unwrap_or_default();
        if engine_model.as_deref() == Some(id.as_str()) {
            holder_ids.insert(me.as_str());
        }
        model_holders.insert(
            id.clone(),
            holder_ids
                .iter()
                .map(|h| h.to_string())
                .collect::<BTreeSet<_>>(),
        );
        let d = demand.get(&id).cloned().unwrap_or_default();
        let trust = TrustLevel::of(
            chosen,
            d.requesters.len(),
            holder_ids.len(),
            config.demand_min_requesters as usize,
        );
        let policy = settings.auto_manage(&id);
        // Nothing to fetch for a model served whole from its GGUF here.
        let acquire = policy.enabled.unwrap_or(config.auto_manage)
            && engine_model.as_deref() != Some(id.as_str());
        let prune = acquire && policy.prune.unwrap_or(config.auto_prune);
        let target = placement::replication_target(
            trust,
            d.requests_per_minute,
            nodes,
            config.replication_min,
        );
        let mut shards = Vec::new();
        if let Some(m) = here {
            used_bytes += m.disk_bytes();
            let model_locks = locks.get(&id);
            for s in &m.manifest.shards {
                let holders: BTreeSet<String> = net
                    .map(|n| {
                        n.holders
                            .iter()
                            .filter(|h| {
                                h.layer_start <= s.layer_start && h.layer_end >= s.layer_end
                            })
                            .map(|h| h.node_id.clone())
                            .collect()
                    })
                    .unwrap_or_default();
                let in_region = holders
                    .iter()
                    .filter(|h| region_of.get(*h).is_some_and(|r| *r == region))
                    .count();
                let held_here = m.held.contains(&s.index);
                let capacity = holders
                    .iter()
                    .map(|h| {
                        machines
                            .get(h)
                            .map_or(1.0, |m| placement::speed(*m, s.bytes))
                    })
                    .sum();
                shards.push(ShardNeed {
                    index: s.index,
                    bytes: s.bytes,
                    holders: holders.len() as u32,
                    holders_in_region: in_region as u32,
                    held_here,
                    locked: model_locks.is_some_and(|l| l.contains(&s.index))
                        || pinned.contains(&s.index),
                    // A holder whose disk its user manages never prunes on its
                    // own: it keeps the copy. Otherwise the first auto-managing
                    // holder in line does.
                    keeper: held_here
                        && holders
                            .iter()
                            .all(|h| *h == me || auto_peers.contains_key(h))
                        && placement::rank(
                            &me,
                            holders.iter().map(|h| (h.as_str(), 1.0)),
                            &id,
                            s.index,
                        ) == 0,
                    capacity,
                });
                shard_holders.insert((id.clone(), s.index), holders);
            }
        }
        models.push(ModelNeed {
            model_id: id,
            trust,
            acquire,
            prune,
            target,
            shards,
        });
    }
    let budget_bytes = swarm.budget_bytes(config.disk_budget_mb);
    let free_memory_bytes = tokio::task::spawn_blocking(crate::hardware::available_memory)
        .await
        .ok()
        .filter(|m| *m > 0);
    SwarmView {
        node_id: me,
        region,
        nodes_by_region,
        demand,
        models,
        region_of,
        model_holders,
        shard_holders,
        auto_peers,
        used_bytes,
        budget_bytes,
        free_memory_bytes,
        machines,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_line_prefers_the_region_of_the_neighbouring_stages() {
        let mut v = SwarmView::default();
        for (node, region) in [
            ("a", "EU"),
            ("b", "EU"),
            ("c", "NA"),
            ("x", "NA"),
            ("y", "EU"),
        ] {
            v.region_of.insert(node.into(), region.into());
        }
        let set = |n: &[&str]| n.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
        v.shard_holders.insert(("m".into(), 0), set(&["a", "c"]));
        v.shard_holders.insert(("m".into(), 2), set(&["b"]));
        // Shard 1's neighbours live mostly in EU: y is near, x is not.
        let near = v.near_region("m", 1).map(str::to_string);
        assert_eq!(near.as_deref(), Some("EU"));
        assert_eq!(v.weight("y", 100, near.as_deref()), placement::NEAR_WEIGHT);
        assert_eq!(v.weight("x", 100, near.as_deref()), 1.0);
        // A GPU that holds the shard.
        v.machines.insert(
            "x".into(),
            machine_of(&serde_json::json!({"cores": 8, "vram_gb": 8.0})),
        );
        assert_eq!(v.weight("x", 100, near.as_deref()), placement::GPU_SPEED);
        // Hardware that is not numbers counts as the slowest CPU.
        assert_eq!(
            machine_of(&serde_json::json!({"cores": "many", "vram_gb": -1})),
            placement::Machine::default()
        );
    }
}
