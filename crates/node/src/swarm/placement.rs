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

use serde::Serialize;

use super::TrustLevel;

/// Requests per minute one more replica is meant to absorb.
pub const RPM_PER_REPLICA: f64 = 30.0;

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
/// smaller) among models it may acquire, that fits `free_bytes`, and for which
/// `first_in_line(model, index, missing)` says this node is among the `missing`
/// nodes meant to take it.
pub fn next_acquisition(
    models: &[ModelNeed],
    free_bytes: u64,
    mut first_in_line: impl FnMut(&str, u32, u32) -> bool,
) -> Option<Acquire> {
    // (short in this region, share of target missing, smaller first)
    type Need = (bool, u64, std::cmp::Reverse<u64>);
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
            let key = (
                s.holders_in_region < m.target,
                share,
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

/// A node's place in line for a shard: lower goes first. Every node computes
/// the same order without talking (rendezvous hashing).
pub fn score(node: &str, model_id: &str, index: u32) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(node.as_bytes());
    h.update(b"\0");
    h.update(model_id.as_bytes());
    h.update(&index.to_le_bytes());
    *h.finalize().as_bytes()
}

/// This node's place in line for a shard among `candidates` (the nodes that
/// could take it, this one included): how many of them score lower.
pub fn rank<'a>(
    me: &str,
    candidates: impl IntoIterator<Item = &'a str>,
    model_id: &str,
    index: u32,
) -> usize {
    let mine = score(me, model_id, index);
    candidates
        .into_iter()
        .filter(|c| *c != me && score(c, model_id, index) < mine)
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
        let mut ranks: Vec<usize> = nodes
            .iter()
            .map(|me| rank(me, nodes.iter().copied(), "m", 0))
            .collect();
        ranks.sort_unstable();
        assert_eq!(ranks, [0, 1, 2, 3]);
    }
}
