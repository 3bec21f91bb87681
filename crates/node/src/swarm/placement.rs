//! Where shards should go: pure decisions over a snapshot of the swarm, so the
//! node's auto-manage loop and the scale simulation (`swarmllm-swarm-sim`) run
//! the very same logic.
//!
//! - [`replication_target`]: holders a shard should have, from demand and the
//!   number of nodes around;
//! - [`next_acquisition`]: the shard this node should fetch next — the one
//!   furthest below its target (in this node's region first), that fits the
//!   disk left, is not next to one it holds (its ranges stay shard-aligned, so
//!   any mix of holders chains), and that this node is among the first to take
//!   (a rendezvous rank, so nodes seeing the same gap fetch different shards);
//! - [`prunes`]: the shards to delete — of models whose demand has gone, then the
//!   least needed until the disk budget holds; never a locked shard, never one
//!   of a pinned model, never one this node is the last holder of — nor one it
//!   is first in line to keep among the holders (so two holders pruning at
//!   once cannot remove the last copy between them).
//!
//! Placement weighs each node's speed and links, the first of Parallax's two
//! phases: the shard fetched first is, among those equally short of holders,
//! the stage with the least compute behind it (the pipeline's bottleneck), and
//! the line of nodes meant to take a shard is a *weighted* rendezvous — a node
//! whose GPU holds the shard, or with more cores, or in the region where the
//! neighbouring stages live (one short hop instead of a long one), comes first
//! proportionally more often ([`weight`]). Memory limits bound who is in line
//! at all: each node announces the room it has ([`room`]: the disk budget left
//! and what fits in its RAM). The second phase, choosing a chain of holders per
//! request to spread load, is the route planner's (`pipeline::route`).

use serde::Serialize;

use super::TrustLevel;

/// Requests per minute one more replica is meant to absorb.
pub const RPM_PER_REPLICA: f64 = 30.0;
/// A node whose GPU memory holds a shard runs it this many times faster than
/// an 8-core CPU (llama.cpp on a laptop GPU against its CPU; a round figure,
/// since every node must compute the same weights from announcements alone).
pub const GPU_SPEED: f64 = 4.0;
/// How much more a node in the region of a shard's neighbouring stages is
/// preferred: a hop inside a region costs a few ms, across regions tens.
pub const NEAR_WEIGHT: f64 = 2.0;

/// A node's machine, as its signed announcement says.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Machine {
    /// Logical cores.
    pub cores: u32,
    /// GPU memory in bytes.
    pub vram_bytes: u64,
}

/// How fast `machine` runs a shard of `bytes`, relative to an 8-core CPU: its
/// GPU's [`GPU_SPEED`] when the shard fits in GPU memory, else by cores
/// (between a quarter and twice).
pub fn speed(machine: Machine, bytes: u64) -> f64 {
    if machine.vram_bytes > 0 && machine.vram_bytes >= bytes {
        GPU_SPEED
    } else {
        (f64::from(machine.cores) / 8.0).clamp(0.25, 2.0)
    }
}

/// A node's weight in the line for a shard: its [`speed`], times
/// [`NEAR_WEIGHT`] when it is `near` the shard's neighbouring stages.
pub fn weight(speed: f64, near: bool) -> f64 {
    let w = if near { speed * NEAR_WEIGHT } else { speed };
    if w.is_finite() && w > 0.0 { w } else { 1.0 }
}

/// Bytes a node may still fill: what is left of its disk budget (`None`: no
/// limit), and no more than three quarters of the RAM available (`None`: not
/// known), since a fetched shard is loaded at once. Announced as
/// `auto_free_mb`, so the others' line counts only nodes with the room.
pub fn room(budget: Option<u64>, used: u64, free_memory: Option<u64>) -> u64 {
    let disk = budget.map(|b| b.saturating_sub(used)).unwrap_or(u64::MAX);
    let memory = free_memory.map(|m| m / 4 * 3).unwrap_or(u64::MAX);
    disk.min(memory)
}

/// One shard of a model as this node sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct ShardNeed {
    /// Shard index.
    pub index: u32,
    /// Bytes on disk.
    pub bytes: u64,
    /// Nodes holding it (this one included).
    pub holders: u32,
    /// Of those, in this node's region.
    pub holders_in_region: u32,
    /// This node holds it.
    pub held_here: bool,
    /// Locked against pruning here.
    pub locked: bool,
    /// The compute behind this stage: the holders' summed [`speed`] (a holder
    /// whose machine is not known counts 1).
    pub capacity: f64,
    /// This node keeps the shard: no holder outside auto-manage has it (such
    /// a holder never prunes on its own) and this node is first in line among
    /// the holders (see [`score`]) — so holders that prune at the same moment
    /// never remove the last copy between them.
    pub keeper: bool,
}

/// One model as this node sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelNeed {
    /// Model id.
    pub model_id: String,
    /// Its trust level here.
    pub trust: TrustLevel,
    /// Auto-manage may acquire its shards.
    pub acquire: bool,
    /// Auto-manage may prune its shards.
    pub prune: bool,
    /// Holders each shard should have.
    pub target: u32,
    /// Its shards (empty when its manifest is not known here yet).
    pub shards: Vec<ShardNeed>,
}

/// Holders each shard of a model should have: none asked of a merely
/// discovered model; otherwise `min` (default 2: one may leave) plus one per
/// [`RPM_PER_REPLICA`] of demand, one more for a popular model, and never more
/// than the nodes there are.
pub fn replication_target(
    trust: TrustLevel,
    requests_per_minute: f64,
    nodes: usize,
    min: u32,
) -> u32 {
    let base = match trust {
        TrustLevel::Discovered => return 0,
        TrustLevel::DemandVerified | TrustLevel::Pinned => min.max(1),
        TrustLevel::NetworkPopular => min.max(1) + 1,
    };
    let extra = if requests_per_minute.is_finite() && requests_per_minute > 0.0 {
        (requests_per_minute / RPM_PER_REPLICA).floor().min(64.0) as u32
    } else {
        0
    };
    (base + extra).min(nodes.max(1) as u32)
}

/// A shard to fetch.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Acquire {
    /// Model id.
    pub model_id: String,
    /// Shard index.
    pub index: u32,
    /// Its size.
    pub bytes: u64,
    /// Holders it had, and its target.
    pub holders: u32,
    /// Holders wanted.
    pub target: u32,
}

/// The shard this node should fetch next, if any: the most needed (below target
/// in this region first, then the largest share of its target missing, then the
/// stage with the least compute behind it, then the smaller) among models it may acquire, that fits `free_bytes`, and for which
/// `first_in_line(model, index, missing)` says this node is among the `missing`
/// nodes meant to take it.
pub fn next_acquisition(
    models: &[ModelNeed],
    free_bytes: u64,
    mut first_in_line: impl FnMut(&str, u32, u32) -> bool,
) -> Option<Acquire> {
    // (short in this region, share of target missing, least compute, smaller)
    type Need = (bool, u64, std::cmp::Reverse<u64>, std::cmp::Reverse<u64>);
    let mut best: Option<(Need, Acquire)> = None;
    for m in models.iter().filter(|m| m.acquire && m.trust.may_acquire()) {
        // A node loads consecutive shards as one range, and a route can only
        // chain ranges that meet at shard boundaries: auto-manage never takes a
        // shard next to one it holds, so whatever mix of nodes holds a model's
        // shards, they still form a chain.
        let held: std::collections::HashSet<u32> = m
            .shards
            .iter()
            .filter(|s| s.held_here)
            .map(|s| s.index)
            .collect();
        let beside_held = |i: u32| held.contains(&(i + 1)) || (i > 0 && held.contains(&(i - 1)));
        for s in m.shards.iter().filter(|s| {
            !s.held_here && s.holders < m.target && s.bytes <= free_bytes && !beside_held(s.index)
        }) {
            let missing = m.target - s.holders;
            if !first_in_line(&m.model_id, s.index, missing) {
                continue;
            }
            // Share of the target missing, in thousandths (integers compare exactly).
            let share = u64::from(missing) * 1000 / u64::from(m.target.max(1));
            // Compute in thousandths of an 8-core CPU (integers compare exactly).
            let compute = (s.capacity.max(0.0) * 1000.0).min(u64::MAX as f64) as u64;
            let key = (
                s.holders_in_region < m.target,
                share,
                std::cmp::Reverse(compute),
                std::cmp::Reverse(s.bytes),
            );
            if best.as_ref().is_none_or(|(k, _)| key > *k) {
                best = Some((
                    key,
                    Acquire {
                        model_id: m.model_id.clone(),
                        index: s.index,
                        bytes: s.bytes,
                        holders: s.holders,
                        target: m.target,
                    },
                ));
            }
        }
    }
    best.map(|(_, a)| a)
}

/// Why a shard was pruned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PruneReason {
    /// Its model has too few requesters now.
    DemandGone,
    /// The node was over its disk budget.
    OverBudget,
}

impl PruneReason {
    /// Words for the history and the activity feed.
    pub fn describe(self) -> &'static str {
        match self {
            PruneReason::DemandGone => "demand for the model has gone",
            PruneReason::OverBudget => "over the disk budget",
        }
    }
}

/// A shard to delete.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Prune {
    /// Model id.
    pub model_id: String,
    /// Shard index.
    pub index: u32,
    /// Bytes freed.
    pub bytes: u64,
    /// Why.
    pub reason: PruneReason,
}

/// The shards to delete, given `used` bytes against `budget` (`None`: no limit).
pub fn prunes(models: &[ModelNeed], used: u64, budget: Option<u64>) -> Vec<Prune> {
    // (need after removal, model, shard): the lower the need, the sooner it goes.
    let mut eligible: Vec<(i64, &ModelNeed, &ShardNeed)> = models
        .iter()
        .filter(|m| m.prune && m.trust != TrustLevel::Pinned)
        .flat_map(|m| {
            m.shards
                .iter()
                .filter(|s| s.held_here && !s.locked && !s.keeper && s.holders > 1)
                .map(move |s| (i64::from(m.target) - i64::from(s.holders - 1), m, s))
        })
        .collect();
    eligible.sort_by(|a, b| {
        a.0.cmp(&b.0)
            .then_with(|| b.2.bytes.cmp(&a.2.bytes))
            .then_with(|| a.1.model_id.cmp(&b.1.model_id))
            .then_with(|| a.2.index.cmp(&b.2.index))
    });
    let mut out = Vec::new();
    let mut used = used;
    for (_, m, s) in &eligible {
        if m.trust == TrustLevel::Discovered {
            used = used.saturating_sub(s.bytes);
            out.push(prune(m, s, PruneReason::DemandGone));
        }
    }
    if let Some(budget) = budget {
        for (_, m, s) in &eligible {
            if used <= budget {
                break;
            }
            if m.trust != TrustLevel::Discovered {
                used = used.saturating_sub(s.bytes);
                out.push(prune(m, s, PruneReason::OverBudget));
            }
        }
    }
    out
}

fn prune(m: &ModelNeed, s: &ShardNeed, reason: PruneReason) -> Prune {
    Prune {
        model_id: m.model_id.clone(),
        index: s.index,
        bytes: s.bytes,
        reason,
    }
}

/// Whether a node `rank`ed in line for a shard (see [`rank`]) should take it
/// when `missing` holders are wanted and it has waited `waited` rounds of
/// `patience`: the first `missing` at once, then one more `missing` nodes per
/// `patience` rounds the gap stays open (the nodes ahead may be busy, full or
/// gone) — the line widens, it never opens to everyone at once.
pub fn in_line(rank: usize, missing: u32, waited: u64, patience: u64) -> bool {
    let widen = 1 + waited / patience.max(1);
    (rank as u64) < u64::from(missing).saturating_mul(widen)
}

/// A node's hash for a shard, the root of its place in line (see [`line_key`]).
/// Every node computes the same order without talking (rendezvous hashing).
pub fn score(node: &str, model_id: &str, index: u32) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(node.as_bytes());
    h.update(b"\0");
    h.update(model_id.as_bytes());
    h.update(&index.to_le_bytes());
    *h.finalize().as_bytes()
}

/// A node's place in line for a shard with its [`weight`]: lower goes first.
/// Weighted rendezvous hashing (`-ln(u) / weight`, `u` uniform in (0, 1) from
/// [`score`]): a node comes first with probability its share of the weights,
/// and every node that sees the same announcements computes the same order.
pub fn line_key(node: &str, model_id: &str, index: u32, weight: f64) -> f64 {
    let h = score(node, model_id, index);
    let mut first = [0u8; 8];
    first.copy_from_slice(&h[..8]);
    let u = (u64::from_le_bytes(first) as f64 + 1.0) / (u64::MAX as f64 + 2.0);
    -u.ln() / weight.max(1e-9)
}

/// This node's place in line for a shard among `candidates` (the nodes that
/// could take it, this one included, each with its [`weight`]): how many of
/// them come before it.
pub fn rank<'a>(
    me: &str,
    candidates: impl IntoIterator<Item = (&'a str, f64)>,
    model_id: &str,
    index: u32,
) -> usize {
    let candidates: Vec<(&str, f64)> = candidates.into_iter().collect();
    let my_weight = candidates
        .iter()
        .find(|(c, _)| *c == me)
        .map_or(1.0, |(_, w)| *w);
    let mine = line_key(me, model_id, index, my_weight);
    candidates
        .iter()
        .filter(|(c, w)| *c != me && line_key(c, model_id, index, *w) < mine)
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shard(index: u32, holders: u32, held_here: bool) -> ShardNeed {
        ShardNeed {
            index,
            bytes: 100,
            holders,
            holders_in_region: holders,
            held_here,
            locked: false,
            keeper: false,
            capacity: f64::from(holders),
        }
    }

    fn model(id: &str, trust: TrustLevel, target: u32, shards: Vec<ShardNeed>) -> ModelNeed {
        ModelNeed {
            model_id: id.into(),
            trust,
            acquire: true,
            prune: true,
            target,
            shards,
        }
    }

    #[test]
    fn targets_follow_trust_demand_and_size() {
        assert_eq!(replication_target(TrustLevel::Discovered, 500.0, 10, 2), 0);
        assert_eq!(
            replication_target(TrustLevel::DemandVerified, 5.0, 10, 2),
            2
        );
        assert_eq!(
            replication_target(TrustLevel::DemandVerified, 5.0, 10, 3),
            3
        );
        assert_eq!(
            replication_target(TrustLevel::DemandVerified, 65.0, 10, 2),
            4
        );
        assert_eq!(
            replication_target(TrustLevel::NetworkPopular, 0.0, 10, 2),
            3
        );
        assert_eq!(replication_target(TrustLevel::Pinned, 1e9, 3, 2), 3);
        assert_eq!(replication_target(TrustLevel::Pinned, f64::NAN, 1, 2), 1);
    }

    #[test]
    fn the_most_needed_shard_that_fits_comes_first() {
        let models = vec![
            model(
                "a",
                TrustLevel::DemandVerified,
                2,
                vec![shard(0, 1, false), shard(1, 2, false)],
            ),
            model("b", TrustLevel::Pinned, 3, vec![shard(0, 1, false)]),
            // Never fetched: only discovered.
            model("c", TrustLevel::Discovered, 0, vec![shard(0, 0, false)]),
        ];
        let next = next_acquisition(&models, 1000, |_, _, _| true).expect("one");
        // b/0 misses 2 of 3 (667‰), a/0 misses 1 of 2 (500‰).
        assert_eq!((next.model_id.as_str(), next.index), ("b", 0));
        // Not this node's turn for b/0: a/0 is next.
        let next = next_acquisition(&models, 1000, |m, _, _| m != "b").expect("one");
        assert_eq!((next.model_id.as_str(), next.index), ("a", 0));
        // Nothing fits in 99 bytes.
        assert_eq!(next_acquisition(&models, 99, |_, _, _| true), None);
        // Never a shard next to one held here (its ranges stay shard-aligned).
        let models = vec![model(
            "a",
            TrustLevel::DemandVerified,
            2,
            vec![shard(0, 1, true), shard(1, 1, false), shard(2, 1, false)],
        )];
        let next = next_acquisition(&models, 1000, |_, _, _| true).expect("one");
        assert_eq!(next.index, 2);
        // A shard short in this region beats a bigger gap elsewhere.
        let mut regional = shard(0, 3, false);
        regional.holders_in_region = 0;
        let models = vec![
            model("far", TrustLevel::DemandVerified, 4, vec![regional]),
            model(
                "near",
                TrustLevel::DemandVerified,
                4,
                vec![ShardNeed {
                    holders_in_region: 4,
                    ..shard(0, 1, false)
                }],
            ),
        ];
        let next = next_acquisition(&models, 1000, |_, _, _| true).expect("one");
        assert_eq!(next.model_id, "far");
    }

    #[test]
    fn pruning_spares_locked_pinned_and_last_copies() {
        let mut locked = shard(1, 3, true);
        locked.locked = true;
        let models = vec![
            // Demand gone: its shards go, except the one only this node holds
            // and the locked one.
            model(
                "gone",
                TrustLevel::Discovered,
                0,
                vec![shard(0, 2, true), locked, shard(2, 1, true)],
            ),
            model("pinned", TrustLevel::Pinned, 2, vec![shard(0, 5, true)]),
            model(
                "wanted",
                TrustLevel::DemandVerified,
                2,
                vec![shard(0, 4, true), shard(1, 2, true)],
            ),
        ];
        let p = prunes(&models, 500, None);
        assert_eq!(
            p.iter()
                .map(|p| (p.model_id.as_str(), p.index, p.reason))
                .collect::<Vec<_>>(),
            [("gone", 0, PruneReason::DemandGone)]
        );
        // Over budget: the least needed goes first (wanted/0 has two spare
        // holders), and only as much as needed.
        let p = prunes(&models, 500, Some(350));
        assert_eq!(
            p.iter()
                .map(|p| (p.model_id.as_str(), p.index, p.reason))
                .collect::<Vec<_>>(),
            [
                ("gone", 0, PruneReason::DemandGone),
                ("wanted", 0, PruneReason::OverBudget)
            ]
        );
        // Never below one holder, whatever the budget.
        let p = prunes(&models, 500, Some(0));
        assert!(p.iter().all(|p| !(p.model_id == "gone" && p.index == 2)));
        assert!(p.iter().all(|p| p.model_id != "pinned"));
        // The keeper of a shard keeps it, even with other holders around.
        let mut kept = models.clone();
        kept[0].shards[0].keeper = true;
        assert!(
            prunes(&kept, 500, Some(0))
                .iter()
                .all(|p| !(p.model_id == "gone" && p.index == 0))
        );
    }

    #[test]
    fn the_line_widens_while_a_gap_stays_open() {
        assert!(in_line(0, 1, 0, 3) && !in_line(1, 1, 0, 3));
        assert!(!in_line(1, 1, 2, 3) && in_line(1, 1, 3, 3));
        assert!(in_line(5, 2, 6, 3) && !in_line(6, 2, 6, 3));
    }

    #[test]
    fn nodes_agree_on_the_order() {
        let nodes = ["n1", "n2", "n3", "n4"];
        let weighted = [("n1", 1.0), ("n2", 4.0), ("n3", 0.5), ("n4", 2.0)];
        let mut ranks: Vec<usize> = nodes.iter().map(|me| rank(me, weighted, "m", 0)).collect();
        ranks.sort_unstable();
        assert_eq!(ranks, [0, 1, 2, 3]);
    }

    #[test]
    fn faster_and_nearer_nodes_come_first_in_proportion() {
        // A GPU node that fits the shard, an 8-core CPU, a 2-core laptop, and
        // the 8-core CPU again but near the neighbouring stages.
        let gpu = Machine {
            cores: 8,
            vram_bytes: 8 << 30,
        };
        let cpu = Machine {
            cores: 8,
            vram_bytes: 0,
        };
        let laptop = Machine {
            cores: 2,
            vram_bytes: 0,
        };
        let bytes = 1 << 30;
        assert_eq!(speed(gpu, bytes), GPU_SPEED);
        assert_eq!(speed(gpu, 16 << 30), 1.0, "a shard its GPU cannot hold");
        assert_eq!(speed(laptop, bytes), 0.25);
        let line = [
            ("gpu", weight(speed(gpu, bytes), false)),
            ("cpu", weight(speed(cpu, bytes), false)),
            ("laptop", weight(speed(laptop, bytes), false)),
            ("near", weight(speed(cpu, bytes), true)),
        ];
        let total: f64 = line.iter().map(|(_, w)| w).sum();
        let shards = 4000;
        for (node, w) in line {
            let first = (0..shards)
                .filter(|i| rank(node, line, "m", *i) == 0)
                .count();
            let share = first as f64 / f64::from(shards);
            let expected = w / total;
            assert!(
                (share - expected).abs() < 0.03,
                "{node}: first for {share:.3} of shards, expected {expected:.3}"
            );
        }
        // Equal weights: the plain rendezvous order (the larger hash first).
        let even = [("a", 1.0), ("b", 1.0)];
        let h = |n: &str| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&score(n, "m", 7)[..8]);
            u64::from_le_bytes(b)
        };
        assert_eq!(rank("a", even, "m", 7) == 0, h("a") > h("b"));
        // Weights that are not numbers count as 1.
        assert_eq!(weight(f64::NAN, true), 1.0);
    }

    #[test]
    fn the_slowest_stage_gets_its_replica_first() {
        // Both shards miss one holder of two; shard 1's holder is a laptop,
        // shard 0's a GPU: shard 1 is the pipeline's bottleneck.
        let mut fast = shard(0, 1, false);
        fast.capacity = GPU_SPEED;
        let mut slow = shard(1, 1, false);
        slow.capacity = 0.25;
        let models = vec![model("m", TrustLevel::DemandVerified, 2, vec![fast, slow])];
        let next = next_acquisition(&models, 1000, |_, _, _| true).expect("one");
        assert_eq!(next.index, 1);
    }

    #[test]
    fn room_is_the_budget_left_and_what_fits_in_ram() {
        assert_eq!(room(Some(1000), 300, None), 700);
        assert_eq!(
            room(Some(1000), 300, Some(400)),
            300,
            "three quarters of free RAM"
        );
        assert_eq!(room(None, 300, Some(400)), 300);
        assert_eq!(room(None, 300, None), u64::MAX);
        assert_eq!(room(Some(100), 300, None), 0);
    }
}
