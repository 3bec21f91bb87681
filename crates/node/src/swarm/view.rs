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

    /// Bytes auto-manage may still fill: what is left of the disk budget, and
    /// no more than fits in the RAM available (keeping a quarter of it free),
    /// since a fetched shard is loaded at once.
    pub fn free_bytes(&self) -> u64 {
        let disk = self
            .budget_bytes
            .map(|b| b.saturating_sub(self.used_bytes))
            .unwrap_or(u64::MAX);
        let memory = self
            .free_memory_bytes
            .map(|m| m / 4 * 3)
            .unwrap_or(u64::MAX);
        disk.min(memory)
    }
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
    for r in &records {
        let r_region = r.region.clone().unwrap_or_else(|| UNKNOWN_REGION.into());
        if r.is_active {
            *nodes_by_region.entry(r_region.clone()).or_default() += 1;
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
                        && placement::rank(&me, holders.iter().map(String::as_str), &id, s.index)
                            == 0,
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
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn room_is_the_budget_left_and_what_fits_in_ram() {
        let mut v = SwarmView {
            used_bytes: 300,
            budget_bytes: Some(1000),
            ..SwarmView::default()
        };
        assert_eq!(v.free_bytes(), 700);
        v.free_memory_bytes = Some(400);
        assert_eq!(v.free_bytes(), 300, "three quarters of free RAM");
        v.budget_bytes = None;
        assert_eq!(v.free_bytes(), 300);
        v.free_memory_bytes = None;
        assert_eq!(v.free_bytes(), u64::MAX);
    }
}
