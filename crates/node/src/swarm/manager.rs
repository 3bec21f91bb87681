//! The auto-manage loop: every `auto_manage_interval_secs` it builds the view,
//! prunes what [`placement::prunes`] names, and otherwise fetches the one shard
//! [`placement::next_acquisition`] names (one download at a time, validated like
//! any other: `Pipeline::download_shard`). Each action is recorded
//! (`swarm_activity`) and pushed to dashboards as an `activity_event`.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use super::placement::{self, Acquire};
use super::view::{self, SwarmView};
use super::{Swarm, history};
use crate::node::Node;

/// A shard whose fetch failed is left alone this long.
const RETRY_AFTER: Duration = Duration::from_secs(60);
/// Shards tracked for waiting and failures (the maps start over beyond it).
const MAX_TRACKED: usize = 4096;
/// Rounds a gap may stay open before the line for it widens (the nodes ahead
/// may be busy, lack the disk, or have left): see `placement::in_line`.
const PATIENCE_ROUNDS: u32 = 3;
/// ... and never less than this (a fetch ahead in line takes time to show).
const MIN_PATIENCE: Duration = Duration::from_secs(20);

/// Starts the loop as one of the node's tasks.
pub fn spawn(node: Node) {
    let tasks = node.tasks().clone();
    tasks.spawn(async move {
        let mut manager = Manager {
            node,
            current: None,
            waiting: HashMap::new(),
            failed: HashMap::new(),
        };
        loop {
            let every = Duration::from_secs(u64::from(
                manager.node.config().auto_manage_interval_secs.max(1),
            ));
            tokio::time::sleep(every).await;
            manager.round(every).await;
        }
    });
}

struct Manager {
    node: Node,
    /// The download this loop started and has not seen end: (id, what).
    current: Option<(String, Acquire)>,
    /// Since when each gap this node was not first in line for has been open.
    waiting: HashMap<(String, u32), Instant>,
    /// When each shard's last fetch failed (`None`: the model's manifest).
    failed: HashMap<(String, Option<u32>), Instant>,
}

impl Manager {
    fn swarm(&self) -> &Swarm {
        self.node.swarm()
    }

    async fn round(&mut self, every: Duration) {
        // The pool owner's level for this node, from its latest signed state.
        let pools = self.node.pools().clone();
        if let Ok(level) = tokio::task::spawn_blocking(move || pools.own_contribution()).await {
            self.swarm().set_contribution_level(level);
        }
        if !self.finish_current().await {
            return; // one download at a time
        }
        let view = view::build(&self.node).await;
        self.swarm().round_done();
        if !view.models.iter().any(|m| m.acquire) {
            self.waiting.clear();
            return;
        }
        if self.prune(&view).await {
            return; // the next round sees the space freed
        }
        // Outside its contribution hours the node acquires nothing.
        if !self.swarm().contributing() {
            return;
        }
        if self.fetch_manifest(&view).await {
            return;
        }
        self.acquire(&view, every).await;
    }

    /// Notes how the download this loop started ended; false while it runs.
    async fn finish_current(&mut self) -> bool {
        let Some((id, acq)) = self.current.clone() else {
            return true;
        };
        let status = self
            .node
            .pipeline()
            .downloads()
            .into_iter()
            .find(|d| d.id == id);
        let state = status.as_ref().map(|s| s.status).unwrap_or("failed");
        match state {
            "done" => {
                self.record(
                    "acquire",
                    &acq.model_id,
                    Some(acq.index),
                    acq.bytes,
                    &format!(
                        "below its replication target ({} of {} holders)",
                        acq.holders, acq.target
                    ),
                )
                .await;
                self.swarm().emit(
                    "acquired",
                    &acq.model_id,
                    format!("fetched shard {} of {}", acq.index, acq.model_id),
                    "success",
                );
            }
            "failed" | "cancelled" => {
                self.note_failure(&acq.model_id, Some(acq.index));
                let why = status
                    .and_then(|s| s.error)
                    .unwrap_or_else(|| "cancelled".into());
                self.swarm().emit(
                    "acquire_failed",
                    &acq.model_id,
                    format!(
                        "could not fetch shard {} of {}: {why}",
                        acq.index, acq.model_id
                    ),
                    "warning",
                );
            }
            _ => return false,
        }
        self.current = None;
        true
    }

    fn note_failure(&mut self, model: &str, index: Option<u32>) {
        if self.failed.len() >= MAX_TRACKED {
            self.failed.retain(|_, at| at.elapsed() < RETRY_AFTER);
        }
        if self.failed.len() < MAX_TRACKED {
            self.failed
                .insert((model.to_string(), index), Instant::now());
        }
    }

    /// Whether this shard's (or manifest's) last fetch failed too recently to
    /// try again.
    fn recently_failed(&self, model: &str, index: Option<u32>) -> bool {
        self.failed
            .get(&(model.to_string(), index))
            .is_some_and(|at| at.elapsed() < RETRY_AFTER)
    }

    /// Deletes what pruning names; true if anything went.
    async fn prune(&mut self, view: &SwarmView) -> bool {
        let mut any = false;
        for p in placement::prunes(&view.models, view.used_bytes, view.budget_bytes) {
            match self
                .node
                .pipeline()
                .remove_shard(&p.model_id, p.index)
                .await
            {
                Ok(true) => {
                    any = true;
                    let why = p.reason.describe();
                    self.record("prune", &p.model_id, Some(p.index), p.bytes, why)
                        .await;
                    self.swarm().emit(
                        "prune",
                        &p.model_id,
                        format!("pruned shard {} of {}: {why}", p.index, p.model_id),
                        "info",
                    );
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(model = %p.model_id, shard = p.index, error = %e, "could not prune a shard");
                }
            }
        }
        if any {
            self.node.announce_soon().await;
        }
        any
    }

    /// Fetches the manifest of a model auto-manage may acquire but has no
    /// manifest of yet (its shards are unknown until then); true if it tried.
    async fn fetch_manifest(&mut self, view: &SwarmView) -> bool {
        let Some(m) = view.models.iter().find(|m| {
            m.acquire
                && m.trust.may_acquire()
                && m.shards.is_empty()
                && !self.recently_failed(&m.model_id, None)
        }) else {
            return false;
        };
        // Marked before anything is written: the model is auto-manage's, not
        // the user's choice, so it can be pruned again.
        if !self.mark_auto(&m.model_id).await {
            return false;
        }
        match self.node.pipeline().ensure_manifest(&m.model_id).await {
            Ok(_) => {
                self.swarm().emit(
                    "acquire",
                    &m.model_id,
                    format!(
                        "demand for {} is verified; fetched its manifest",
                        m.model_id
                    ),
                    "info",
                );
            }
            Err(e) => {
                tracing::debug!(model = %m.model_id, error = %e, "no manifest for a demanded model yet");
                self.note_failure(&m.model_id, None);
            }
        }
        true
    }

    async fn acquire(&mut self, view: &SwarmView, every: Duration) {
        let me = view.node_id.clone();
        // Rounds before the line widens: at least MIN_PATIENCE of time.
        let patience_rounds =
            u64::from(PATIENCE_ROUNDS).max(MIN_PATIENCE.as_secs().div_ceil(every.as_secs().max(1)));
        // A gap that closed is forgotten: if it opens again, the line starts
        // narrow again.
        self.waiting.retain(|(model, index), _| {
            view.model(model).is_some_and(|m| {
                m.shards
                    .iter()
                    .any(|s| s.index == *index && s.holders < m.target)
            })
        });
        if self.waiting.len() >= MAX_TRACKED {
            self.waiting.clear();
        }
        let failed = &self.failed;
        let waiting = &mut self.waiting;
        let next = placement::next_acquisition(
            &view.models,
            view.free_bytes(),
            |model, index, missing| {
                let key = (model.to_string(), index);
                if failed
                    .get(&(model.to_string(), Some(index)))
                    .is_some_and(|at| at.elapsed() < RETRY_AFTER)
                {
                    return false;
                }
                let holders = view.shard_holders.get(&key).cloned().unwrap_or_default();
                let bytes = view
                    .model(model)
                    .and_then(|m| m.shards.iter().find(|s| s.index == index))
                    .map(|s| s.bytes)
                    .unwrap_or(0);
                // Holders of the shards beside it never take it (see
                // `placement::next_acquisition`).
                let beside: BTreeSet<&String> = [index.checked_sub(1), index.checked_add(1)]
                    .into_iter()
                    .flatten()
                    .filter_map(|i| view.shard_holders.get(&(model.to_string(), i)))
                    .flatten()
                    .collect();
                // The nodes that could take it: auto-managing, not holding it or a
                // neighbour, with the room for it (as they announce), each
                // weighted by its speed and nearness to the neighbouring stages.
                let candidates: BTreeSet<&str> = view
                    .auto_peers
                    .iter()
                    .filter(|(_, free)| **free >= bytes)
                    .map(|(n, _)| n.as_str())
                    .chain(std::iter::once(me.as_str()))
                    .filter(|n| !holders.contains(*n) && !beside.iter().any(|b| b.as_str() == *n))
                    .collect();
                let near = view.near_region(model, index);
                let rank = placement::rank(
                    &me,
                    candidates.iter().map(|n| (*n, view.weight(n, bytes, near))),
                    model,
                    index,
                );
                // Not first in line: the line widens while the gap stays open.
                let since = *waiting.entry(key).or_insert_with(Instant::now);
                let waited =
                    (since.elapsed().as_secs_f64() / every.as_secs_f64().max(0.001)) as u64;
                placement::in_line(rank, missing, waited, patience_rounds)
            },
        );
        let Some(acq) = next else {
            return;
        };
        self.waiting.remove(&(acq.model_id.clone(), acq.index));
        // A model the user did not choose stays auto-manage's (prunable) once
        // its shards are here.
        if view
            .model(&acq.model_id)
            .is_some_and(|m| m.trust != super::TrustLevel::Pinned)
            && !self.mark_auto(&acq.model_id).await
        {
            return;
        }
        let shards = view.model(&acq.model_id).map(|m| m.shards.len() as u32);
        match self.start_fetch(&acq, shards).await {
            Ok(None) => {} // it was here already
            Ok(Some((id, source))) => {
                self.swarm().emit(
                    "acquire",
                    &acq.model_id,
                    format!(
                        "fetching shard {} of {} from {source} ({} of {} holders)",
                        acq.index, acq.model_id, acq.holders, acq.target
                    ),
                    "info",
                );
                self.current = Some((id, acq));
            }
            Err(e) => {
                tracing::warn!(model = %acq.model_id, shard = acq.index, error = %e, "auto-manage could not start a fetch");
                self.note_failure(&acq.model_id, Some(acq.index));
            }
        }
    }

    /// Starts fetching a shard: from peers, or — when no connected peer holds
    /// it and the model's Hub source is known — its byte ranges from the Hub.
    /// The download's id and where from; `None` when it is here already.
    async fn start_fetch(
        &self,
        acq: &Acquire,
        shards: Option<u32>,
    ) -> Result<Option<(String, &'static str)>, String> {
        let pipeline = self.node.pipeline();
        if !pipeline.has_holder(&acq.model_id, acq.index).await
            && let Some(source) = pipeline.hub_source(&acq.model_id)
        {
            let hub = self.node.hub().map_err(|e| e.to_string())?;
            let started = pipeline
                .download_from_hub(
                    &hub,
                    crate::pipeline::hub_fetch::HubFetch {
                        repo_id: source.repo_id,
                        filename: source.filename,
                        revision: source.commit,
                        shards,
                        shard_indices: Some(vec![acq.index]),
                        fair_share: false,
                        model_id: Some(acq.model_id.clone()),
                    },
                )
                .await
                .map_err(|e| e.to_string())?;
            return Ok(started
                .download_ids
                .into_iter()
                .next()
                .map(|id| (id, "the Hub")));
        }
        let status = pipeline
            .download_shard(&acq.model_id, acq.index)
            .await
            .map_err(|e| e.to_string())?;
        Ok((status.status != "done").then_some((status.id, "peers")))
    }

    /// Notes that auto-manage, not the user, brought `model` here.
    async fn mark_auto(&self, model: &str) -> bool {
        let swarm = self.swarm().clone();
        let id = model.to_string();
        let marked =
            tokio::task::spawn_blocking(move || swarm.settings().set_auto_acquired(&id, true))
                .await;
        match marked {
            Ok(Ok(())) => true,
            Ok(Err(e)) => {
                tracing::warn!(model, error = %e, "could not note an auto-managed model");
                false
            }
            Err(_) => false,
        }
    }

    async fn record(&self, kind: &str, model: &str, index: Option<u32>, bytes: u64, reason: &str) {
        let store = self.swarm().store().clone();
        let r = history::now(kind, model, index, bytes, reason);
        let _ = tokio::task::spawn_blocking(move || {
            if let Err(e) = history::record(&store, &r) {
                tracing::warn!(error = %e, "could not record swarm activity");
            }
        })
        .await;
    }
}
