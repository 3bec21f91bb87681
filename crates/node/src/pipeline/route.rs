//! Choosing the chain of holders that covers every layer of a model.
//!
//! A holder offers one contiguous layer range. The cost of using it is the round
//! trip to it (zero for this node), plus its measured compute per layer times its
//! layers, plus a penalty per queued job. The cheapest chain from layer 0 to the
//! last layer is a shortest path over layer boundaries (ranges only go forward, so
//! one pass in order of start layer is enough). Each chosen span also gets a
//! standby: the cheapest other holder of exactly that span.

use std::collections::{BTreeSet, HashSet};

use serde::Serialize;

use super::wire::Hop;

/// Compute per layer assumed for a holder that has not reported one (ms).
const DEFAULT_MS_PER_LAYER: f64 = 0.5;
/// Round trip assumed for a peer with no ping yet (ms).
const DEFAULT_RTT_MS: f64 = 5.0;
/// Cost of each job waiting at a holder (ms).
const QUEUE_PENALTY_MS: f64 = 20.0;

/// Someone who can run a layer range.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Holder {
    /// Node id.
    pub node_id: String,
    /// This node itself.
    pub local: bool,
    /// First layer.
    pub layer_start: u32,
    /// One past the last.
    pub layer_end: u32,
    /// Measured round trip.
    pub rtt_ms: Option<f64>,
    /// Measured compute per layer.
    pub ms_per_layer: Option<f64>,
    /// Jobs waiting there.
    pub queue_depth: u32,
    /// Load the requester adds at request time (ms): see [`load_ms`].
    #[serde(skip)]
    pub load_ms: f64,
}

/// The random share of a holder's cost added per request: replicas whose cost
/// is within this fraction of each other share the load.
pub const JITTER: f64 = 0.3;

/// The load term for a holder of cost `cost` with `in_flight` sessions of this
/// requester running there, given a uniform random `u` in [0, 1): a holder runs
/// the steps of its sessions in turn, so each one in flight adds about its cost
/// again.
pub fn load_ms(cost: f64, in_flight: u32, u: f64) -> f64 {
    cost * (f64::from(in_flight) + JITTER * u.clamp(0.0, 1.0))
}

/// Holders that have not measured their compute yet are assumed to match the
/// mean of those that have (not a fixed guess that would favour or shun them).
pub fn fill_unmeasured(holders: &mut [Holder]) {
    let measured: Vec<f64> = holders.iter().filter_map(|h| h.ms_per_layer).collect();
    if measured.is_empty() {
        return;
    }
    let mean = measured.iter().sum::<f64>() / measured.len() as f64;
    for h in holders.iter_mut().filter(|h| h.ms_per_layer.is_none()) {
        h.ms_per_layer = Some(mean);
    }
}

impl Holder {
    /// The estimated cost of one decode step through this holder, in ms.
    pub fn cost(&self) -> f64 {
        self.step_ms() + self.load_ms
    }

    /// What one decode step through this holder is expected to take (ms): the
    /// round trip into it, its layers' compute and its queue, without the load
    /// term the requester adds to spread its requests.
    pub fn step_ms(&self) -> f64 {
        let rtt = if self.local {
            0.0
        } else {
            self.rtt_ms.unwrap_or(DEFAULT_RTT_MS)
        };
        let layers = (self.layer_end - self.layer_start) as f64;
        rtt + layers * self.ms_per_layer.unwrap_or(DEFAULT_MS_PER_LAYER)
            + self.queue_depth as f64 * QUEUE_PENALTY_MS
    }
}

/// One hop of a route as the requester weighed it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RouteHop {
    /// Node id.
    pub node_id: String,
    /// First layer.
    pub layer_start: u32,
    /// One past the last.
    pub layer_end: u32,
    /// The round trip to it when the route was planned (none for this node
    /// or a peer not yet pinged).
    pub rtt_ms: Option<f64>,
    /// Its compute per layer as measured (or assumed, see [`fill_unmeasured`]).
    pub ms_per_layer: Option<f64>,
    /// What a decode step through it was expected to take (ms).
    pub predicted_ms: f64,
}

/// A split generation's route: the chain, what the planner expected a token
/// to cost, and what it cost (in the response's `timing.route` and, for the
/// latest generation of each model, in `GET /api/v1/layers`).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct RouteReport {
    /// The model.
    pub model: String,
    /// The chain in layer order (after any re-route, the one that finished).
    pub hops: Vec<RouteHop>,
    /// Expected ms per decode step (a token without speculation): the sum of
    /// the hops' predictions.
    pub predicted_ms_per_token: f64,
    /// Measured: decode time over the tokens it gave (fewer ms than a step
    /// when speculation has drafts accepted); none before a second token.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub measured_ms_per_token: Option<f64>,
    /// Measured: decode time over the steps it took.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub measured_ms_per_step: Option<f64>,
    /// Times the chain was planned again after a hop failed.
    pub reroutes: usize,
    /// Times the generation moved to a chain predicted cheaper than its
    /// steps measured (a link degraded).
    pub replans: usize,
}

/// One span of a plan.
#[derive(Debug, Clone, Serialize)]
pub struct Span {
    /// Who runs it.
    pub primary: Holder,
    /// Who takes over if the primary fails.
    pub standby: Option<Holder>,
}

/// A chain covering the model.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    /// The spans in layer order.
    pub spans: Vec<Span>,
    /// Estimated cost of a decode step (ms).
    pub cost_ms: f64,
}

impl Plan {
    /// The route as [`RouteReport`] shows it, before it has run.
    pub fn report(&self, model_id: &str) -> RouteReport {
        let hops: Vec<RouteHop> = self
            .spans
            .iter()
            .map(|s| RouteHop {
                node_id: s.primary.node_id.clone(),
                layer_start: s.primary.layer_start,
                layer_end: s.primary.layer_end,
                rtt_ms: (!s.primary.local).then_some(s.primary.rtt_ms).flatten(),
                ms_per_layer: s.primary.ms_per_layer,
                predicted_ms: round2(s.primary.step_ms()),
            })
            .collect();
        RouteReport {
            model: model_id.to_string(),
            predicted_ms_per_token: round2(self.spans.iter().map(|s| s.primary.step_ms()).sum()),
            hops,
            measured_ms_per_token: None,
            measured_ms_per_step: None,
            reroutes: 0,
            replans: 0,
        }
    }

    /// The route as hops of model `model_id`.
    pub fn hops(&self, model_id: &str) -> Vec<Hop> {
        self.spans
            .iter()
            .map(|s| Hop {
                node_id: s.primary.node_id.clone(),
                model_id: model_id.to_string(),
                layer_start: s.primary.layer_start,
                layer_end: s.primary.layer_end,
            })
            .collect()
    }
}

/// No chain covers the model.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{}{}", if *.private_mode { "private mode: " } else { "" }, describe(.missing, *.n_layers, *.local_ends))]
pub struct NoRoute {
    /// Only pool devices (and maybe LAN peers) were allowed.
    pub private_mode: bool,
    /// The route had to keep the first and last spans on this node.
    pub local_ends: bool,
    /// Layers in the model.
    pub n_layers: u32,
    /// Layer ranges `[start, end)` no reachable holder runs (empty when every layer
    /// is held but the holders' ranges do not line up into a chain).
    pub missing: Vec<(u32, u32)>,
}

fn describe(missing: &[(u32, u32)], n_layers: u32, local_ends: bool) -> String {
    if local_ends {
        return format!(
            "the encrypted pipeline needs this node to run the first and last layers itself \
             and reachable nodes for the rest; not covered: {}",
            describe(missing, n_layers, false)
        );
    }
    if missing.is_empty() {
        return format!(
            "the reachable holders' layer ranges do not join into a chain over all {n_layers} layers"
        );
    }
    let list: Vec<String> = missing
        .iter()
        .map(|(a, b)| {
            if b - a == 1 {
                format!("{a}")
            } else {
                format!("{a}-{}", b - 1)
            }
        })
        .collect();
    format!(
        "no reachable node holds layers {} of {n_layers}",
        list.join(", ")
    )
}

/// Plans the cheapest chain over `n_layers`, leaving out `exclude`d nodes. With
/// `local_ends` (the encrypted pipeline) the spans that embed (layer 0) and sample
/// (the last layer) must be this node's, so tokens and logits never leave it.
pub fn plan(
    n_layers: u32,
    holders: &[Holder],
    exclude: &HashSet<String>,
    local_ends: bool,
) -> Result<Plan, NoRoute> {
    let usable: Vec<&Holder> = holders
        .iter()
        .filter(|h| !exclude.contains(&h.node_id))
        .filter(|h| h.layer_start < h.layer_end && h.layer_end <= n_layers)
        .filter(|h| !local_ends || h.local || (h.layer_start > 0 && h.layer_end < n_layers))
        .collect();
    let n = n_layers as usize;
    // cost_at[l]: cheapest way to reach layer boundary l; via[l]: the holder that
    // gets there. Ranges only go forward, so one pass in start order suffices.
    let mut cost_at = vec![f64::INFINITY; n + 1];
    let mut via: Vec<Option<usize>> = vec![None; n + 1];
    cost_at[0] = 0.0;
    let mut order: Vec<usize> = (0..usable.len()).collect();
    order.sort_by_key(|&i| usable[i].layer_start);
    for &i in &order {
        let h = usable[i];
        let (a, b) = (h.layer_start as usize, h.layer_end as usize);
        let c = cost_at[a] + h.cost();
        if c < cost_at[b] {
            cost_at[b] = c;
            via[b] = Some(i);
        }
    }
    if !cost_at[n].is_finite() {
        let mut held = BTreeSet::new();
        for h in &usable {
            held.extend(h.layer_start..h.layer_end);
        }
        return Err(NoRoute {
            private_mode: false,
            local_ends,
            n_layers,
            missing: gaps(n_layers, &held),
        });
    }
    let mut spans = Vec::new();
    let mut at = n;
    while at > 0 {
        let Some(i) = via[at] else { break };
        let primary = usable[i].clone();
        let standby = usable
            .iter()
            .filter(|h| {
                h.node_id != primary.node_id
                    && h.layer_start == primary.layer_start
                    && h.layer_end == primary.layer_end
            })
            .min_by(|x, y| x.cost().total_cmp(&y.cost()))
            .map(|h| (*h).clone());
        at = primary.layer_start as usize;
        spans.push(Span { primary, standby });
    }
    spans.reverse();
    Ok(Plan {
        spans,
        cost_ms: cost_at[n],
    })
}

/// Models whose latest route is kept (more: the oldest goes).
const MAX_ROUTES: usize = 32;

/// The latest generation's route per model, newest last.
#[derive(Debug, Default)]
pub struct LatestRoutes(std::sync::Mutex<Vec<RouteReport>>);

impl LatestRoutes {
    /// Keeps `report` as its model's latest.
    pub fn remember(&self, report: RouteReport) {
        let mut all = self.0.lock().unwrap_or_else(|p| p.into_inner());
        all.retain(|r| r.model != report.model);
        if all.len() >= MAX_ROUTES {
            all.remove(0);
        }
        all.push(report);
    }

    /// Every model's latest route, newest last.
    pub fn all(&self) -> Vec<RouteReport> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// `x` to two decimals (for display).
pub(super) fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

fn gaps(n_layers: u32, held: &BTreeSet<u32>) -> Vec<(u32, u32)> {
    let mut out = Vec::new();
    let mut start = None;
    for l in 0..n_layers {
        match (held.contains(&l), start) {
            (false, None) => start = Some(l),
            (true, Some(s)) => {
                out.push((s, l));
                start = None;
            }
            _ => {}
        }
    }
    if let Some(s) = start {
        out.push((s, n_layers));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(id: &str, a: u32, b: u32, rtt: f64) -> Holder {
        Holder {
            node_id: id.into(),
            local: id == "me",
            layer_start: a,
            layer_end: b,
            rtt_ms: Some(rtt),
            ms_per_layer: Some(0.1),
            queue_depth: 0,
            load_ms: 0.0,
        }
    }

    #[test]
    fn load_spreads_requests_over_equal_replicas() {
        let holders = [
            h("me", 0, 10, 0.0),
            h("b", 10, 20, 1.0),
            h("c", 10, 20, 1.0),
            h("d", 20, 30, 1.0),
        ];
        // The same random draws every run: a simple LCG.
        let mut seed = 7u64;
        let mut rand = move || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 11) as f64 / (1u64 << 53) as f64
        };
        let mut in_flight = std::collections::HashMap::<String, u32>::new();
        let mut used = std::collections::HashMap::<String, u32>::new();
        for _ in 0..40 {
            let loaded: Vec<Holder> = holders
                .iter()
                .map(|x| {
                    let mut x = x.clone();
                    let n = in_flight.get(&x.node_id).copied().unwrap_or(0);
                    x.load_ms = load_ms(x.cost(), n, rand());
                    x
                })
                .collect();
            let p = plan(30, &loaded, &HashSet::new(), false).expect("route");
            let middle = p.spans[1].primary.node_id.clone();
            *used.entry(middle.clone()).or_default() += 1;
            // Half the sessions are still running when the next one starts.
            *in_flight.entry(middle).or_default() += 1;
            if used.values().sum::<u32>() % 2 == 0 {
                in_flight.clear();
            }
        }
        let (b, c) = (used["b"], used["c"]);
        assert!(b >= 10 && c >= 10, "b {b}, c {c}");
    }

    #[test]
    fn picks_the_cheapest_chain_and_a_standby() {
        let holders = vec![
            h("me", 0, 10, 0.0),
            h("b", 10, 20, 3.0),
            h("c", 10, 20, 1.0),
            h("d", 20, 30, 1.0),
            h("e", 0, 30, 50.0),
        ];
        let p = plan(30, &holders, &HashSet::new(), false).expect("route");
        let ids: Vec<&str> = p.spans.iter().map(|s| s.primary.node_id.as_str()).collect();
        assert_eq!(ids, ["me", "c", "d"]);
        assert_eq!(
            p.spans[1].standby.as_ref().map(|s| s.node_id.as_str()),
            Some("b")
        );
        // Without c, the standby takes its place.
        let p = plan(30, &holders, &HashSet::from(["c".to_string()]), false).expect("route");
        assert_eq!(p.spans[1].primary.node_id, "b");
        // A whole-model holder nearby wins over three hops far away.
        let holders = vec![
            h("a", 0, 10, 40.0),
            h("b", 10, 30, 40.0),
            h("me", 0, 30, 0.0),
        ];
        let p = plan(30, &holders, &HashSet::new(), false).expect("route");
        assert_eq!(p.spans.len(), 1);
    }

    #[test]
    fn slow_links_favour_fewer_hops_and_the_report_predicts_the_step() {
        let with = |id: &str, a: u32, b: u32, rtt: f64, ms_per_layer: f64| Holder {
            ms_per_layer: Some(ms_per_layer),
            ..h(id, a, b, rtt)
        };
        // This node runs the whole model slowly (60 ms a step); two fast
        // peers hold half each.
        let holders = |rtt: f64| {
            vec![
                with("me", 0, 30, 0.0, 2.0),
                with("g1", 0, 15, rtt, 0.1),
                with("g2", 15, 30, rtt, 0.1),
            ]
        };
        let ids = |p: &Plan| -> Vec<String> {
            p.spans.iter().map(|s| s.primary.node_id.clone()).collect()
        };
        // Over a LAN the two hops are worth it: 2 × (2 + 1.5) ms.
        let p = plan(30, &holders(2.0), &HashSet::new(), false).expect("route");
        assert_eq!(ids(&p), ["g1", "g2"]);
        let report = p.report("m");
        assert_eq!(report.predicted_ms_per_token, 7.0);
        assert_eq!(report.hops[0].rtt_ms, Some(2.0));
        assert_eq!(report.hops[1].predicted_ms, 3.5);
        // At 40 ms a link they are not: 83 ms against 60 here.
        let p = plan(30, &holders(40.0), &HashSet::new(), false).expect("route");
        assert_eq!(ids(&p), ["me"]);
        let report = p.report("m");
        assert_eq!(report.predicted_ms_per_token, 60.0);
        assert_eq!(report.hops[0].rtt_ms, None, "no round trip to this node");
        // One peer with the whole model beats two hops at the same distance.
        let mut far = holders(40.0);
        far.push(with("g3", 0, 30, 40.0, 0.1));
        let p = plan(30, &far, &HashSet::new(), false).expect("route");
        assert_eq!(ids(&p), ["g3"]);
        assert_eq!(p.report("m").predicted_ms_per_token, 43.0);
    }

    #[test]
    fn missing_layers_are_named() {
        let holders = vec![h("me", 0, 10, 0.0), h("d", 20, 30, 1.0)];
        let e = plan(30, &holders, &HashSet::new(), false).expect_err("no route");
        assert_eq!(e.missing, vec![(10, 20)]);
        assert_eq!(e.to_string(), "no reachable node holds layers 10-19 of 30");
        let e = plan(30, &holders, &HashSet::from(["d".to_string()]), false).expect_err("no route");
        assert_eq!(e.missing, vec![(10, 30)]);
        // Every layer held, but the ranges do not join.
        let e = plan(
            30,
            &[h("a", 0, 15, 1.0), h("b", 10, 30, 1.0)],
            &HashSet::new(),
            false,
        )
        .expect_err("no chain");
        assert!(e.missing.is_empty());
    }

    #[test]
    fn the_encrypted_pipeline_keeps_both_ends_local() {
        let holders = vec![
            h("a", 0, 10, 1.0),
            h("me", 0, 10, 0.0),
            h("b", 10, 20, 1.0),
            h("c", 20, 30, 1.0),
            h("me", 20, 30, 0.0),
        ];
        let p = plan(30, &holders, &HashSet::new(), true).expect("route");
        let ids: Vec<&str> = p.spans.iter().map(|s| s.primary.node_id.as_str()).collect();
        assert_eq!(ids, ["me", "b", "me"]);
        // Without the last span locally there is no encrypted route.
        let e = plan(30, &holders[..4], &HashSet::new(), true).expect_err("no route");
        assert_eq!(e.missing, vec![(20, 30)]);
    }
}
