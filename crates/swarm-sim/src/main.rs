//! Auto-manage at scale, simulated: a thousand nodes with churn run the very
//! placement and pruning logic the node runs (`swarmllm_node::swarm::placement`),
//! one round per simulated minute, each over the swarm as announced a minute
//! before. It reports, hour by hour, how many demanded models every shard of
//! which some node still holds (availability), the bytes fetched, and whether
//! any node ever passed its disk budget.
//!
//! ```text
//! cargo run --release -p swarmllm-swarm-sim -- --nodes 1000 --hours 24 --churn 0.2
//! ```
//!
//! The model of the world: nodes leave at `--churn` per hour (each replaced by a
//! fresh, empty node, so the population stays level); a fetch takes the shard's
//! size over `--mbps`; every node has auto-manage on with a random budget; demand
//! per model follows a Zipf curve (the tail has a single requester, so it must
//! never be fetched), and one popular model's demand stops half-way (its extra
//! copies must be pruned, never its last ones). Nodes have machines (`--gpu-share`
//! with a GPU, the rest 2–16 cores) and the line who fetches is weighted by
//! speed and nearness as the node weighs it; it reports each demanded model's
//! slowest stage and cross-region hops (`--unweighted` for the plain line).

use std::collections::{BTreeSet, HashMap};

use anyhow::{Result, bail};
use clap::Parser;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use swarmllm_node::swarm::TrustLevel;
use swarmllm_node::swarm::placement::{self, ModelNeed, ShardNeed};

const GB: u64 = 1 << 30;

#[derive(Parser, Debug)]
#[command(about = "Simulates auto-manage for many nodes with churn")]
struct Args {
    /// Nodes online at any time.
    #[arg(long, default_value_t = 1000)]
    nodes: usize,
    /// Simulated hours.
    #[arg(long, default_value_t = 24)]
    hours: u64,
    /// Share of the nodes that leave per hour.
    #[arg(long, default_value_t = 0.2)]
    churn: f64,
    /// Models in the swarm.
    #[arg(long, default_value_t = 12)]
    models: usize,
    /// Regions the nodes are spread over.
    #[arg(long, default_value_t = 4)]
    regions: usize,
    /// Smallest and largest disk budget (GiB).
    #[arg(long, default_value_t = 2)]
    min_budget_gb: u64,
    #[arg(long, default_value_t = 16)]
    max_budget_gb: u64,
    /// Download speed of every node (MB/s).
    #[arg(long, default_value_t = 50.0)]
    mbps: f64,
    /// Holders every shard of a demanded model should have at least.
    #[arg(long, default_value_t = 2)]
    replication_min: u32,
    /// Rounds a node waits for the nodes ahead of it in line.
    #[arg(long, default_value_t = 3)]
    patience: u64,
    /// Share of the nodes with a GPU (8–24 GiB); the others have 2–16 cores.
    #[arg(long, default_value_t = 0.1)]
    gpu_share: f64,
    /// Place by the plain rendezvous line, ignoring speed and regions (to
    /// compare against the weighted line the node uses).
    #[arg(long)]
    unweighted: bool,
    /// Random seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

struct Model {
    id: String,
    shards: Vec<u64>,
    /// Requests per minute, and distinct requesters, while demanded.
    rpm: f64,
    requesters: usize,
    /// Minute from which nobody asks for it any more.
    demand_stops: Option<u64>,
}

impl Model {
    fn requesters_at(&self, minute: u64) -> usize {
        match self.demand_stops {
            Some(stop) if minute >= stop => 0,
            _ => self.requesters,
        }
    }
}

struct Node {
    id: String,
    region: usize,
    machine: placement::Machine,
    budget: u64,
    used: u64,
    /// Held shards per model.
    held: Vec<BTreeSet<u32>>,
    /// Models this node's user chose (they are `Pinned` here).
    chosen: BTreeSet<usize>,
    /// The fetch in flight: (model, shard, bytes, minute it lands).
    fetching: Option<(usize, u32, u64, u64)>,
    /// Since which minute each gap it was not first in line for has waited.
    waiting: HashMap<(usize, u32), u64>,
    fetched_bytes: u64,
}

impl Node {
    fn new(serial: usize, args: &Args, models: usize, rng: &mut StdRng) -> Self {
        Node {
            id: format!("node-{serial:06}"),
            region: rng.gen_range(0..args.regions.max(1)),
            machine: if rng.gen_bool(args.gpu_share.clamp(0.0, 1.0)) {
                placement::Machine {
                    cores: 8,
                    vram_bytes: rng.gen_range(8..=24) * GB,
                }
            } else {
                placement::Machine {
                    cores: [2, 4, 8, 16][rng.gen_range(0..4)],
                    vram_bytes: 0,
                }
            },
            budget: rng.gen_range(args.min_budget_gb..=args.max_budget_gb.max(args.min_budget_gb))
                * GB,
            used: 0,
            held: vec![BTreeSet::new(); models],
            chosen: BTreeSet::new(),
            fetching: None,
            waiting: HashMap::new(),
            fetched_bytes: 0,
        }
    }
}

/// What every node announced at the start of a minute.
struct Snapshot {
    /// Holders per (model, shard), by index into the node list.
    holders: Vec<Vec<Vec<usize>>>,
    /// Of those, per region.
    in_region: Vec<Vec<Vec<u32>>>,
}

/// How well a model's holders serve it as a pipeline: the compute of its
/// slowest stage (the holders' summed speed: the throughput bound) and the
/// fewest region changes along any chain of one holder per shard (the latency
/// a request pays in long hops).
fn pipeline_quality(holders: &[Vec<usize>], nodes: &[Node], model: &Model) -> (f64, u64) {
    let bottleneck = holders
        .iter()
        .zip(&model.shards)
        .map(|(h, bytes)| {
            h.iter()
                .map(|&i| placement::speed(nodes[i].machine, *bytes))
                .sum::<f64>()
        })
        .fold(f64::INFINITY, f64::min);
    // Fewest region changes to reach each region at each shard.
    let mut best: HashMap<usize, u64> = HashMap::new();
    for (s, h) in holders.iter().enumerate() {
        let mut next: HashMap<usize, u64> = HashMap::new();
        for &i in h {
            let r = nodes[i].region;
            let cost = if s == 0 {
                0
            } else {
                best.iter()
                    .map(|(pr, c)| c + u64::from(*pr != r))
                    .min()
                    .unwrap_or(u64::MAX / 2)
            };
            let e = next.entry(r).or_insert(cost);
            *e = (*e).min(cost);
        }
        best = next;
    }
    let hops = best.values().copied().min().unwrap_or(0);
    (
        if bottleneck.is_finite() {
            bottleneck
        } else {
            0.0
        },
        hops,
    )
}

fn snapshot(nodes: &[Node], models: &[Model], regions: usize) -> Snapshot {
    let mut holders: Vec<Vec<Vec<usize>>> = models
        .iter()
        .map(|m| vec![Vec::new(); m.shards.len()])
        .collect();
    let mut in_region: Vec<Vec<Vec<u32>>> = models
        .iter()
        .map(|m| vec![vec![0; regions.max(1)]; m.shards.len()])
        .collect();
    for (i, n) in nodes.iter().enumerate() {
        for (m, held) in n.held.iter().enumerate() {
            for &s in held {
                holders[m][s as usize].push(i);
                in_region[m][s as usize][n.region] += 1;
            }
        }
    }
    Snapshot { holders, in_region }
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.nodes < 2 || args.models == 0 || !(0.0..1.0).contains(&args.churn) {
        bail!("need at least 2 nodes, 1 model and a churn in [0, 1)");
    }
    let mut rng = StdRng::seed_from_u64(args.seed);
    let minutes = args.hours * 60;

    // Zipf demand; the last quarter of the models has one requester only.
    let models: Vec<Model> = (0..args.models)
        .map(|i| {
            let n_shards = rng.gen_range(3..=12);
            let tail = i >= args.models * 3 / 4;
            Model {
                id: format!("model-{i:02}"),
                shards: (0..n_shards)
                    .map(|_| rng.gen_range(GB / 4..=GB + GB / 2))
                    .collect(),
                rpm: 240.0 / (i as f64 + 1.0),
                requesters: if tail { 1 } else { (40 / (i + 1)).max(2) },
                demand_stops: (i == 1).then_some(minutes / 2),
            }
        })
        .collect();

    let mut serial = 0;
    let mut nodes: Vec<Node> = (0..args.nodes)
        .map(|_| {
            serial += 1;
            Node::new(serial, &args, models.len(), &mut rng)
        })
        .collect();
    // Each model starts on one node whose user imported it (room permitting).
    for (m, model) in models.iter().enumerate() {
        let size: u64 = model.shards.iter().sum();
        if let Some(n) = nodes
            .iter_mut()
            .find(|n| n.used + size <= n.budget && n.chosen.is_empty())
        {
            n.held[m] = (0..model.shards.len() as u32).collect();
            n.used += size;
            n.chosen.insert(m);
        }
    }

    let leave_per_minute = 1.0 - (1.0 - args.churn).powf(1.0 / 60.0);
    let bytes_per_minute = args.mbps * 1e6 * 60.0;
    let mut available_minutes = 0u64;
    let mut demanded_minutes = 0u64;
    let mut budget_violations = 0u64;
    let mut prunes_total = 0u64;
    let mut last_copy_lost = 0u64;
    let mut tail_fetches = 0u64;
    let mut fetched_by_gone = 0u64;
    let mut joined = 0u64;
    let mut hour_fetched = 0u64;
    let mut hour_prunes = 0u64;
    let mut hour_available = (0u64, 0u64);
    // Per demanded model, sampled hourly: (bottleneck compute, cross-region
    // hops of the best chain, samples).
    let mut quality = (0.0f64, 0u64, 0u64);
    println!(
        "{} nodes, {} models ({} GiB in all), churn {:.0}%/h, budgets {}–{} GiB, {} MB/s",
        args.nodes,
        models.len(),
        models
            .iter()
            .map(|m| m.shards.iter().sum::<u64>())
            .sum::<u64>()
            / GB,
        args.churn * 100.0,
        args.min_budget_gb,
        args.max_budget_gb,
        args.mbps
    );
    println!("hour  online  available/demanded  min-holders  fetched-GiB  pruned  joined");

    for minute in 0..minutes {
        // Churn: leavers are replaced by fresh, empty nodes.
        let before = nodes.len();
        let mut kept = Vec::with_capacity(before);
        for n in nodes.drain(..) {
            if rng.gen_bool(leave_per_minute) {
                fetched_by_gone += n.fetched_bytes;
            } else {
                kept.push(n);
            }
        }
        for _ in kept.len()..before {
            serial += 1;
            joined += 1;
            kept.push(Node::new(serial, &args, models.len(), &mut rng));
        }
        nodes = kept;

        let snap = snapshot(&nodes, &models, args.regions);
        let n_nodes = nodes.len();
        // Trust and targets as every node sees them (the same demand everywhere).
        let trust_of = |m: usize, chosen: bool| {
            let holders: BTreeSet<usize> = snap.holders[m].iter().flatten().copied().collect();
            TrustLevel::of(chosen, models[m].requesters_at(minute), holders.len(), 2)
        };
        let trusts: Vec<TrustLevel> = (0..models.len()).map(|m| trust_of(m, false)).collect();
        // The first holder in line for each shard keeps it.
        let keepers: Vec<Vec<Option<usize>>> = models
            .iter()
            .enumerate()
            .map(|(m, model)| {
                (0..model.shards.len())
                    .map(|s| {
                        let holders = &snap.holders[m][s];
                        // A holder whose user chose the model never prunes it.
                        if holders.iter().any(|&i| nodes[i].chosen.contains(&m)) {
                            return None;
                        }
                        holders.iter().copied().min_by(|&a, &b| {
                            let key = |i: usize| {
                                placement::line_key(&nodes[i].id, &model.id, s as u32, 1.0)
                            };
                            key(a).total_cmp(&key(b))
                        })
                    })
                    .collect()
            })
            .collect();
        // The line for each shard short of its target: candidates by score.
        let mut lines: HashMap<(usize, u32), HashMap<usize, usize>> = HashMap::new();
        for (m, model) in models.iter().enumerate() {
            let target =
                placement::replication_target(trusts[m], model.rpm, n_nodes, args.replication_min);
            for (s, bytes) in model.shards.iter().enumerate() {
                let holders = &snap.holders[m][s];
                if holders.len() as u32 >= target {
                    continue;
                }
                // Holders of a neighbouring shard never take it.
                let beside = |n: &Node| {
                    n.held[m].contains(&(s as u32 + 1))
                        || (s > 0 && n.held[m].contains(&(s as u32 - 1)))
                };
                // The region most holders of the neighbouring shards are in.
                let mut near = vec![0usize; args.regions.max(1)];
                for i in [s.checked_sub(1), s.checked_add(1)].into_iter().flatten() {
                    for &h in snap.holders[m].get(i).into_iter().flatten() {
                        near[nodes[h].region] += 1;
                    }
                }
                let near_region = near
                    .iter()
                    .enumerate()
                    .filter(|(_, c)| **c > 0)
                    .max_by(|a, b| a.1.cmp(b.1).then_with(|| b.0.cmp(&a.0)))
                    .map(|(r, _)| r);
                let mut line: Vec<(f64, usize)> = nodes
                    .iter()
                    .enumerate()
                    .filter(|(i, n)| {
                        !holders.contains(i)
                            && !beside(n)
                            && n.budget.saturating_sub(n.used) >= *bytes
                    })
                    .map(|(i, n)| {
                        let w = if args.unweighted {
                            1.0
                        } else {
                            placement::weight(
                                placement::speed(n.machine, *bytes),
                                near_region == Some(n.region),
                            )
                        };
                        (placement::line_key(&n.id, &model.id, s as u32, w), i)
                    })
                    .collect();
                line.sort_unstable_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
                lines.insert(
                    (m, s as u32),
                    line.into_iter()
                        .enumerate()
                        .map(|(rank, (_, i))| (i, rank))
                        .collect(),
                );
            }
        }

        let nodes_machines: Vec<placement::Machine> = nodes.iter().map(|n| n.machine).collect();
        for (idx, node) in nodes.iter_mut().enumerate() {
            // A fetch that has landed.
            if let Some((m, s, bytes, lands)) = node.fetching
                && lands <= minute
            {
                let n = &mut *node;
                n.fetching = None;
                if n.held[m].insert(s) {
                    n.used += bytes;
                    n.fetched_bytes += bytes;
                    hour_fetched += bytes;
                }
                if n.used > n.budget {
                    budget_violations += 1;
                }
            }
            let needs: Vec<ModelNeed> = models
                .iter()
                .enumerate()
                .map(|(m, model)| {
                    let n = &*node;
                    let chosen = n.chosen.contains(&m);
                    let trust = if chosen {
                        TrustLevel::Pinned
                    } else {
                        trusts[m]
                    };
                    ModelNeed {
                        model_id: model.id.clone(),
                        trust,
                        acquire: true,
                        prune: true,
                        target: placement::replication_target(
                            trust,
                            model.rpm,
                            n_nodes,
                            args.replication_min,
                        ),
                        shards: model
                            .shards
                            .iter()
                            .enumerate()
                            .map(|(s, bytes)| ShardNeed {
                                index: s as u32,
                                bytes: *bytes,
                                holders: snap.holders[m][s].len() as u32,
                                holders_in_region: snap.in_region[m][s][n.region],
                                held_here: n.held[m].contains(&(s as u32)),
                                locked: false,
                                keeper: n.held[m].contains(&(s as u32))
                                    && keepers[m][s] == Some(idx),
                                capacity: if args.unweighted {
                                    snap.holders[m][s].len() as f64
                                } else {
                                    snap.holders[m][s]
                                        .iter()
                                        .map(|&h| placement::speed(nodes_machines[h], *bytes))
                                        .sum()
                                },
                            })
                            .collect(),
                    }
                })
                .collect();
            for p in placement::prunes(&needs, node.used, Some(node.budget)) {
                let Some(m) = models.iter().position(|x| x.id == p.model_id) else {
                    continue;
                };
                if node.held[m].remove(&p.index) {
                    node.used = node.used.saturating_sub(p.bytes);
                    prunes_total += 1;
                    hour_prunes += 1;
                }
            }
            if node.fetching.is_some() {
                continue;
            }
            let free = node.budget.saturating_sub(node.used);
            node.waiting.retain(|key, _| lines.contains_key(key));
            let waiting = &mut node.waiting;
            let patience = args.patience;
            let next = placement::next_acquisition(&needs, free, |model, index, missing| {
                let Some(m) = models.iter().position(|x| x.id == model) else {
                    return false;
                };
                let Some(rank) = lines.get(&(m, index)).and_then(|line| line.get(&idx)) else {
                    return false;
                };
                let since = *waiting.entry((m, index)).or_insert(minute);
                placement::in_line(*rank, missing, minute - since, patience)
            });
            if let Some(a) = next
                && let Some(m) = models.iter().position(|x| x.id == a.model_id)
            {
                node.waiting.remove(&(m, a.index));
                // Decided on one requester's word (or none): a rule broken.
                if models[m].requesters_at(minute) < 2 && !node.chosen.contains(&m) {
                    tail_fetches += 1;
                }
                let took = (a.bytes as f64 / bytes_per_minute).ceil().max(1.0) as u64;
                node.fetching = Some((m, a.index, a.bytes, minute + took));
            }
        }

        // Availability: every shard of each demanded model held by someone.
        let after = snapshot(&nodes, &models, args.regions);
        for (m, model) in models.iter().enumerate() {
            let every_shard = after.holders[m].iter().all(|h| !h.is_empty());
            if model.requesters_at(minute) >= 2 {
                demanded_minutes += 1;
                hour_available.1 += 1;
                if every_shard {
                    available_minutes += 1;
                    hour_available.0 += 1;
                }
            }
            if !every_shard && snap.holders[m].iter().all(|h| !h.is_empty()) {
                last_copy_lost += 1;
            }
        }
        if (minute + 1) % 60 == 0 {
            for (m, model) in models.iter().enumerate() {
                if model.requesters_at(minute) >= 2 {
                    let (compute, hops) = pipeline_quality(&after.holders[m], &nodes, model);
                    quality.0 += compute;
                    quality.1 += hops;
                    quality.2 += 1;
                }
            }
            let min_holders = models
                .iter()
                .enumerate()
                .filter(|(_, model)| model.requesters_at(minute) >= 2)
                .flat_map(|(m, _)| after.holders[m].iter().map(Vec::len))
                .min()
                .unwrap_or(0);
            println!(
                "{:>4}  {:>6}  {:>8.2}%  ({:>4}/{:<4})  {:>11}  {:>11.1}  {:>6}  {:>6}",
                (minute + 1) / 60,
                nodes.len(),
                100.0 * hour_available.0 as f64 / hour_available.1.max(1) as f64,
                hour_available.0,
                hour_available.1,
                min_holders,
                hour_fetched as f64 / GB as f64,
                hour_prunes,
                joined
            );
            hour_fetched = 0;
            hour_prunes = 0;
            hour_available = (0, 0);
        }
    }

    let availability = 100.0 * available_minutes as f64 / demanded_minutes.max(1) as f64;
    let total_fetched = fetched_by_gone + nodes.iter().map(|n| n.fetched_bytes).sum::<u64>();
    let ever = (args.nodes as u64 + joined) as f64;
    let node_hours = args.nodes as f64 * args.hours as f64;
    println!();
    println!("availability of demanded models: {availability:.3}% of model-minutes");
    println!(
        "fetched: {:.1} GiB in all, {:.2} GiB per node that ever joined, {:.3} GiB per node-hour",
        total_fetched as f64 / GB as f64,
        total_fetched as f64 / GB as f64 / ever,
        total_fetched as f64 / GB as f64 / node_hours
    );
    println!(
        "pruned shards: {prunes_total}; a model lost its last copy of a shard {last_copy_lost} times"
    );
    println!("fetches of models one requester asked for: {tail_fetches}");
    println!(
        "pipelines ({}): bottleneck stage {:.2}× an 8-core CPU on average; \
         {:.2} cross-region hops in a model's best chain on average",
        if args.unweighted {
            "plain rendezvous line"
        } else {
            "line weighted by speed and region"
        },
        quality.0 / quality.2.max(1) as f64,
        quality.1 as f64 / quality.2.max(1) as f64
    );
    println!("budget violations: {budget_violations}");
    let goal = availability >= 99.0 && budget_violations == 0 && tail_fetches == 0;
    println!(
        "goal (≥ 99% available, no budget passed, nothing fetched on one requester's word): {}",
        if goal { "met" } else { "NOT met" }
    );
    if budget_violations > 0 || tail_fetches > 0 {
        bail!("the placement logic broke a rule it must never break");
    }
    Ok(())
}
