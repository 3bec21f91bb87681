//! Demand: how many distinct requesters want each model, counted so that one node
//! cannot inflate it alone.
//!
//! Here, each generation this node starts for its own clients
//! ([`DemandCounter::record_own`]) and each session it serves for another node
//! ([`DemandCounter::record_served`], the requester being the signed step's
//! author) counts for its model over a sliding window. Announcements carry a
//! summary per model ([`ModelDemand`]): requests per minute, distinct requesters,
//! and whether the node itself asked.
//!
//! Across the network ([`aggregate`]) a model's requesters are the nodes that say
//! *themselves* that they asked (an announcement is signed by its node, so a node
//! speaks only for itself) plus the nodes seen asking here. The requester counts
//! other nodes report are shown, never trusted; rates are capped per requester.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Demand entries one announcement may carry (more are refused at the boundary).
pub const MAX_DEMAND_ENTRIES: usize = 64;
/// Models counted here (the least recently asked-for is dropped beyond it).
const MAX_MODELS: usize = 256;
/// Requesters counted per model (new ones beyond it are not counted).
const MAX_REQUESTERS: usize = 256;
/// Served sessions remembered per model, so each counts once (the oldest are
/// forgotten beyond it).
const MAX_SESSIONS: usize = 1024;
/// The window is counted in this many buckets: memory per requester is fixed,
/// however often it asks.
const BUCKETS: usize = 12;
/// The most requests per minute one requester adds to a model's rate.
pub const MAX_RPM_PER_REQUESTER: f64 = 60.0;

/// One model's demand as a node announces it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelDemand {
    /// Model id.
    pub model_id: String,
    /// Requests per minute over the window (each requester capped).
    pub requests_per_minute: f64,
    /// Distinct requesters this node saw (informational: never trusted).
    pub requesters: u32,
    /// This node itself requested the model within the window.
    #[serde(default)]
    pub requested: bool,
}

impl ModelDemand {
    /// Checks a peer's entry: a model id, and a finite, bounded rate.
    pub fn validate(&self) -> Result<(), String> {
        if !crate::shard::is_model_id(&self.model_id) {
            return Err(format!("demand for a bad model id {:?}", self.model_id));
        }
        if !(self.requests_per_minute.is_finite() && self.requests_per_minute >= 0.0) {
            return Err("demand rate is not a non-negative number".into());
        }
        Ok(())
    }
}

/// Requests per model over a sliding window, by requester.
#[derive(Debug)]
pub struct DemandCounter {
    own_id: String,
    /// Bucket numbers count from here.
    start: Instant,
    inner: Mutex<Counts>,
}

#[derive(Debug)]
struct Counts {
    window: Duration,
    models: HashMap<String, Tally>,
}

#[derive(Debug, Default)]
struct Tally {
    requesters: HashMap<String, Buckets>,
    /// Served sessions already counted, with when.
    sessions: HashMap<String, Instant>,
    last: Option<Instant>,
}

/// One requester's requests in the last [`BUCKETS`] buckets: slot `b % BUCKETS`
/// holds bucket `b`'s count while `epoch` says it is `b`.
#[derive(Debug, Default, Clone, Copy)]
struct Buckets {
    epoch: [u64; BUCKETS],
    counts: [u32; BUCKETS],
}

impl Buckets {
    fn add(&mut self, bucket: u64) {
        let slot = (bucket % BUCKETS as u64) as usize;
        if self.epoch[slot] != bucket {
            self.epoch[slot] = bucket;
            self.counts[slot] = 0;
        }
        self.counts[slot] = self.counts[slot].saturating_add(1);
    }

    /// Requests in the window ending at bucket `now`.
    fn total(&self, now: u64) -> u32 {
        (0..BUCKETS)
            .filter(|&i| self.epoch[i] + (BUCKETS as u64) > now && self.epoch[i] <= now)
            .map(|i| self.counts[i])
            .fold(0u32, u32::saturating_add)
    }
}

impl DemandCounter {
    /// A counter for the node `own_id` over `window`.
    pub fn new(own_id: String, window: Duration) -> Self {
        Self {
            own_id,
            start: Instant::now(),
            inner: Mutex::new(Counts {
                window,
                models: HashMap::new(),
            }),
        }
    }

    fn counts(&self) -> std::sync::MutexGuard<'_, Counts> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Changes the window (a config reload); what was counted starts over.
    pub fn set_window(&self, window: Duration) {
        let mut c = self.counts();
        if c.window != window {
            c.window = window;
            c.models.clear();
        }
    }

    fn bucket(&self, at: Instant, window: Duration) -> u64 {
        let len = (window.as_secs_f64() / BUCKETS as f64).max(0.001);
        // Bucket numbers start at BUCKETS so that a zeroed slot is never current.
        (at.saturating_duration_since(self.start).as_secs_f64() / len) as u64 + BUCKETS as u64
    }

    /// A generation this node started for its own clients.
    pub fn record_own(&self, model_id: &str) {
        let own = self.own_id.clone();
        self.record(model_id, &own, None, Instant::now());
    }

    /// A session this node serves for `requester` (counted once per session).
    pub fn record_served(&self, model_id: &str, requester: &str, session: &str) {
        if requester == self.own_id {
            return; // counted when it started, by `record_own`
        }
        self.record(model_id, requester, Some(session), Instant::now());
    }

    fn record(&self, model_id: &str, requester: &str, session: Option<&str>, now: Instant) {
        let mut counts = self.counts();
        let window = counts.window;
        let bucket = self.bucket(now, window);
        let models = &mut counts.models;
        if !models.contains_key(model_id) && models.len() >= MAX_MODELS {
            // Drop the model asked for least recently.
            let oldest = models
                .iter()
                .min_by_key(|(_, t)| t.last)
                .map(|(id, _)| id.clone());
            if let Some(id) = oldest {
                models.remove(&id);
            }
        }
        let tally = models.entry(model_id.to_string()).or_default();
        if let Some(s) = session {
            if tally.sessions.contains_key(s) {
                return;
            }
            if tally.sessions.len() >= MAX_SESSIONS {
                tally
                    .sessions
                    .retain(|_, at| now.saturating_duration_since(*at) <= window);
            }
            if tally.sessions.len() >= MAX_SESSIONS {
                let oldest = tally
                    .sessions
                    .iter()
                    .min_by_key(|(_, at)| **at)
                    .map(|(k, _)| k.clone());
                if let Some(k) = oldest {
                    tally.sessions.remove(&k);
                }
            }
            tally.sessions.insert(s.to_string(), now);
        }
        if !tally.requesters.contains_key(requester) {
            if tally.requesters.len() >= MAX_REQUESTERS {
                tally.requesters.retain(|_, b| b.total(bucket) > 0);
            }
            if tally.requesters.len() >= MAX_REQUESTERS {
                return; // a flood of new requesters is not counted past the cap
            }
        }
        tally
            .requesters
            .entry(requester.to_string())
            .or_default()
            .add(bucket);
        tally.last = Some(now);
    }

    /// The distinct requesters of `model_id` seen here within the window.
    pub fn requesters(&self, model_id: &str) -> BTreeSet<String> {
        let counts = self.counts();
        let now = self.bucket(Instant::now(), counts.window);
        counts
            .models
            .get(model_id)
            .map(|t| {
                t.requesters
                    .iter()
                    .filter(|(_, b)| b.total(now) > 0)
                    .map(|(r, _)| r.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// What this node announces: one entry per model asked for in the window
    /// (at most [`MAX_DEMAND_ENTRIES`], the busiest first).
    pub fn snapshot(&self) -> Vec<ModelDemand> {
        self.snapshot_at(Instant::now())
    }

    fn snapshot_at(&self, at: Instant) -> Vec<ModelDemand> {
        let mut counts = self.counts();
        let window = counts.window;
        let now = self.bucket(at, window);
        let minutes = (window.as_secs_f64() / 60.0).max(1.0 / 6.0);
        counts.models.retain(|_, t| {
            t.requesters.retain(|_, b| b.total(now) > 0);
            !t.requesters.is_empty()
        });
        let mut out: Vec<ModelDemand> = counts
            .models
            .iter()
            .map(|(id, t)| ModelDemand {
                model_id: id.clone(),
                requests_per_minute: round2(
                    t.requesters
                        .values()
                        .map(|b| (f64::from(b.total(now)) / minutes).min(MAX_RPM_PER_REQUESTER))
                        .sum(),
                ),
                requesters: t.requesters.len() as u32,
                requested: t.requesters.contains_key(self.own_id.as_str()),
            })
            .collect();
        out.sort_by(|a, b| {
            b.requests_per_minute
                .total_cmp(&a.requests_per_minute)
                .then_with(|| a.model_id.cmp(&b.model_id))
        });
        out.truncate(MAX_DEMAND_ENTRIES);
        out
    }
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// A model's demand across the network, as this node can vouch for it.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct NetworkDemand {
    /// Nodes known to have asked for it — those that said so themselves, and
    /// those seen asking here — with the rate each reports for itself (capped;
    /// 0 for one only seen asking here).
    pub requesters: BTreeMap<String, f64>,
    /// Their sum.
    pub requests_per_minute: f64,
}

/// Combines this node's own counts (`local`: per model, the requesters seen here
/// and this node's own rate) with what peers announced (`announced`: node id and
/// its entries, already validated).
pub fn aggregate<'a>(
    own_id: &str,
    local: &[ModelDemand],
    local_requesters: impl Fn(&str) -> BTreeSet<String>,
    announced: impl IntoIterator<Item = (&'a str, &'a [ModelDemand])>,
) -> BTreeMap<String, NetworkDemand> {
    let mut out: BTreeMap<String, NetworkDemand> = BTreeMap::new();
    for d in local {
        let e = out.entry(d.model_id.clone()).or_default();
        for r in local_requesters(&d.model_id) {
            e.requesters.entry(r).or_insert(0.0);
        }
        if d.requested {
            // This node's own share of its rate: its clients' requests.
            e.requesters.insert(
                own_id.to_string(),
                d.requests_per_minute.min(MAX_RPM_PER_REQUESTER),
            );
        }
    }
    for (node_id, entries) in announced {
        if node_id == own_id {
            continue;
        }
        for d in entries.iter().take(MAX_DEMAND_ENTRIES) {
            if !d.requested {
                continue; // it speaks for others: shown elsewhere, never counted
            }
            out.entry(d.model_id.clone())
                .or_default()
                .requesters
                .insert(
                    node_id.to_string(),
                    d.requests_per_minute.min(MAX_RPM_PER_REQUESTER),
                );
        }
    }
    for e in out.values_mut() {
        e.requests_per_minute = round2(e.requesters.values().sum());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn served_sessions_count_once_and_own_requests_are_marked() {
        let c = DemandCounter::new("me".into(), Duration::from_secs(60));
        c.record_own("m");
        for _ in 0..5 {
            c.record_served("m", "peer-a", "s1");
        }
        c.record_served("m", "peer-b", "s2");
        // Steps this node sent itself are counted at the start, not again.
        c.record_served("m", "me", "s3");
        let snap = c.snapshot();
        assert_eq!(snap.len(), 1);
        assert_eq!(snap[0].requesters, 3);
        assert!(snap[0].requested);
        assert_eq!(snap[0].requests_per_minute, 3.0);
        assert_eq!(
            c.requesters("m"),
            BTreeSet::from(["me".into(), "peer-a".into(), "peer-b".into()])
        );
    }

    #[test]
    fn old_requests_leave_the_window_and_floods_are_capped() {
        let c = DemandCounter::new("me".into(), Duration::from_secs(60));
        c.record("m", "old", None, Instant::now());
        assert_eq!(c.snapshot().len(), 1);
        assert!(
            c.snapshot_at(Instant::now() + Duration::from_secs(120))
                .is_empty()
        );
        // One requester asking a thousand times adds at most the per-requester cap.
        for i in 0..1000 {
            c.record_served("m", "greedy", &format!("s{i}"));
        }
        let snap = c.snapshot();
        assert_eq!(snap[0].requesters, 1);
        assert_eq!(snap[0].requests_per_minute, MAX_RPM_PER_REQUESTER);
        // New requesters beyond the cap are not remembered.
        for i in 0..(MAX_REQUESTERS + 50) {
            c.record_served("m", &format!("r{i}"), &format!("x{i}"));
        }
        assert_eq!(c.requesters("m").len(), MAX_REQUESTERS);
    }

    fn entry(model: &str, requested: bool, requesters: u32) -> ModelDemand {
        ModelDemand {
            model_id: model.into(),
            requests_per_minute: 1000.0,
            requesters,
            requested,
        }
    }

    #[test]
    fn a_node_speaks_only_for_itself() {
        // A host claims a million requesters it served, and that it asked itself.
        let rogue = vec![entry("m", true, 1_000_000)];
        let honest = vec![entry("m", true, 1)];
        let host = vec![entry("m", false, 2)];
        let agg = aggregate(
            "me",
            &[],
            |_| BTreeSet::new(),
            [
                ("rogue", rogue.as_slice()),
                ("b", honest.as_slice()),
                ("host", host.as_slice()),
            ],
        );
        let m = &agg["m"];
        assert_eq!(
            m.requesters.keys().collect::<Vec<_>>(),
            ["b", "rogue"],
            "the host's count of others is not a requester"
        );
        assert_eq!(m.requests_per_minute, 2.0 * MAX_RPM_PER_REQUESTER);
        // Requesters seen here count, once each.
        let local = vec![entry("m", false, 1)];
        let agg = aggregate(
            "me",
            &local,
            |_| BTreeSet::from(["b".into(), "c".into()]),
            [("b", honest.as_slice())],
        );
        assert_eq!(agg["m"].requesters.len(), 2);
    }

    #[test]
    fn bad_entries_are_named() {
        assert!(entry("m", true, 1).validate().is_ok());
        assert!(entry("../x", true, 1).validate().is_err());
        let mut e = entry("m", true, 1);
        e.requests_per_minute = f64::NAN;
        assert!(e.validate().is_err());
    }
}
