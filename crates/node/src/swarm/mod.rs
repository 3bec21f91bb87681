//! The self-organising swarm: nodes count demand, rank models by trust, and —
//! where their users allow it (auto-manage) — fetch the shards the swarm lacks
//! most and delete the ones it no longer needs, within their disk budgets.
//!
//! - [`demand`]: requests per model by distinct requester, announced signed;
//!   the network view counts only what a node says of itself;
//! - [`placement`]: the pure decisions (replication targets, what to fetch, what
//!   to prune), shared with the scale simulation;
//! - `view`: the snapshot those decisions are made over (holders per shard,
//!   demand, disk used against the budget);
//! - `manager`: the loop that acts on them;
//! - [`schedule`]: the hours the node contributes;
//! - [`settings`] and [`history`]: what the user set, and what was done.

pub mod demand;
pub mod history;
mod manager;
pub mod placement;
pub mod schedule;
pub mod settings;
mod view;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::broadcast;

pub use manager::spawn as spawn_manager;
pub use view::{AUTO_CAPABILITY, SwarmView, UNKNOWN_REGION, build as view, recent as recent_view};

use crate::store::{Store, StoreError};

/// How far a node trusts a model enough to spend disk on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum TrustLevel {
    /// Only seen announced.
    Discovered,
    /// At least `demand_min_requesters` distinct requesters asked for it.
    DemandVerified,
    /// Twice that many requesters, and [`POPULAR_HOLDERS`] holders.
    NetworkPopular,
    /// The user chose it here (imported, downloaded, added, or pinned by the pool).
    Pinned,
}

/// Holders a demanded model needs to be `NetworkPopular`.
pub const POPULAR_HOLDERS: usize = 3;

impl TrustLevel {
    /// The level of a model from what is known of it here.
    pub fn of(chosen_here: bool, requesters: usize, holders: usize, min_requesters: usize) -> Self {
        let min = min_requesters.max(2);
        if chosen_here {
            TrustLevel::Pinned
        } else if requesters >= 2 * min && holders >= POPULAR_HOLDERS {
            TrustLevel::NetworkPopular
        } else if requesters >= min {
            TrustLevel::DemandVerified
        } else {
            TrustLevel::Discovered
        }
    }

    /// Auto-manage spends disk only on these.
    pub fn may_acquire(self) -> bool {
        self != TrustLevel::Discovered
    }

    /// The spec's name.
    pub fn as_str(self) -> &'static str {
        match self {
            TrustLevel::Discovered => "Discovered",
            TrustLevel::DemandVerified => "DemandVerified",
            TrustLevel::NetworkPopular => "NetworkPopular",
            TrustLevel::Pinned => "Pinned",
        }
    }
}

/// Something auto-manage did, for the dashboard (`activity_event` on the
/// admin WebSocket).
#[derive(Debug, Clone, Serialize)]
pub struct Activity {
    /// `acquire`, `acquired`, `prune`, `acquire_failed`.
    pub kind: String,
    /// The model.
    pub model_id: String,
    /// One line for a person.
    pub message: String,
    /// RFC 3339.
    pub timestamp: String,
    /// `info`, `success`, `warning`.
    pub toast_level: String,
}

/// Counters for `stats_update`.
#[derive(Debug, Default, Serialize, Clone, Copy)]
pub struct SwarmCounters {
    /// Shards fetched by auto-manage since start.
    pub acquisitions: u64,
    /// Shards pruned since start.
    pub prunes: u64,
    /// Auto-manage rounds run since start.
    pub rounds: u64,
}

/// The swarm side of a node: demand counting, the user's settings, and events.
#[derive(Clone, Debug)]
pub struct Swarm {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    demand: demand::DemandCounter,
    settings: settings::Settings,
    store: Store,
    events: broadcast::Sender<Activity>,
    acquisitions: AtomicU64,
    prunes: AtomicU64,
    rounds: AtomicU64,
    /// The pool owner's contribution level for this node (0–100).
    level: std::sync::atomic::AtomicU32,
    /// This node's machine as it announces it (set when the network starts):
    /// placement weighs it the way the others do.
    hardware: std::sync::OnceLock<crate::net::announce::HardwareSummary>,
    /// The last view built for dashboards, shared by every WebSocket client
    /// (see [`view::recent`]).
    recent_view: tokio::sync::Mutex<Option<(std::time::Instant, Arc<SwarmView>)>>,
}

impl Swarm {
    /// Opens the settings (blocking: SQLite).
    pub fn open(
        store: Store,
        node_id: String,
        demand_window: Duration,
    ) -> Result<Self, StoreError> {
        let settings = settings::Settings::load(store.clone())?;
        Ok(Self {
            inner: Arc::new(Inner {
                demand: demand::DemandCounter::new(node_id, demand_window),
                settings,
                store,
                events: broadcast::channel(256).0,
                acquisitions: AtomicU64::new(0),
                prunes: AtomicU64::new(0),
                rounds: AtomicU64::new(0),
                level: std::sync::atomic::AtomicU32::new(100),
                hardware: std::sync::OnceLock::new(),
                recent_view: tokio::sync::Mutex::new(None),
            }),
        })
    }

    /// This node's demand counter.
    pub fn demand(&self) -> &demand::DemandCounter {
        &self.inner.demand
    }

    /// The user's auto-manage settings and locks.
    pub fn settings(&self) -> &settings::Settings {
        &self.inner.settings
    }

    /// The database (history).
    pub(crate) fn store(&self) -> &Store {
        &self.inner.store
    }

    /// Auto-manage activity as it happens.
    pub fn subscribe(&self) -> broadcast::Receiver<Activity> {
        self.inner.events.subscribe()
    }

    /// Whether the node contributes now: its schedule allows it and its pool's
    /// owner did not set its contribution level to 0.
    pub fn contributing(&self) -> bool {
        self.contribution_level() > 0 && self.inner.settings.contributes_now()
    }

    /// The contribution level (0–100) the pool's owner set for this node; 100
    /// outside a pool.
    pub fn contribution_level(&self) -> u32 {
        self.inner.level.load(Ordering::Relaxed)
    }

    /// Notes this node's machine as it announces it.
    pub fn set_hardware(&self, hardware: crate::net::announce::HardwareSummary) {
        // Set once, when the network starts; a second call changes nothing.
        let _ = self.inner.hardware.set(hardware);
    }

    /// This node's machine as announced (`None` before the network starts).
    pub fn hardware(&self) -> Option<&crate::net::announce::HardwareSummary> {
        self.inner.hardware.get()
    }

    /// Notes the level from the owner's latest signed state.
    pub fn set_contribution_level(&self, level: u32) {
        self.inner.level.store(level.min(100), Ordering::Relaxed);
    }

    /// Disk auto-manage may fill: the budget scaled by the contribution level
    /// (`None`: no limit).
    pub fn budget_bytes(&self, disk_budget_mb: u64) -> Option<u64> {
        let level = u64::from(self.contribution_level());
        match (disk_budget_mb, level) {
            (_, 0) => Some(0),
            (0, _) => None,
            (mb, level) => Some(mb * 1_048_576 * level / 100),
        }
    }

    /// Sessions of other nodes served at once under the contribution level
    /// (`None`: no limit beyond the engine's own).
    pub fn session_limit(&self, max_sessions: u32) -> Option<usize> {
        let level = self.contribution_level();
        (level < 100).then(|| ((max_sessions as usize * level as usize) / 100).max(1))
    }

    /// Acquisitions and prunes since start.
    pub fn counters(&self) -> SwarmCounters {
        SwarmCounters {
            acquisitions: self.inner.acquisitions.load(Ordering::Relaxed),
            prunes: self.inner.prunes.load(Ordering::Relaxed),
            rounds: self.inner.rounds.load(Ordering::Relaxed),
        }
    }

    /// Counts an auto-manage round that looked at the swarm.
    pub(crate) fn round_done(&self) {
        self.inner.rounds.fetch_add(1, Ordering::Relaxed);
    }

    /// Tells the dashboard (and the log) what happened.
    pub(crate) fn emit(&self, kind: &str, model_id: &str, message: String, toast_level: &str) {
        tracing::info!(kind, model = %model_id, "{message}");
        match kind {
            "acquired" => {
                self.inner.acquisitions.fetch_add(1, Ordering::Relaxed);
            }
            "prune" => {
                self.inner.prunes.fetch_add(1, Ordering::Relaxed);
            }
            _ => {}
        }
        let _ = self.inner.events.send(Activity {
            kind: kind.into(),
            model_id: model_id.into(),
            message,
            timestamp: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            toast_level: toast_level.into(),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_contribution_level_scales_disk_and_sessions() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let swarm = Swarm::open(
            Store::open(&dir.path().join("node.db"))?,
            "me".into(),
            Duration::from_secs(60),
        )?;
        assert_eq!(swarm.budget_bytes(100), Some(100 * 1_048_576));
        assert_eq!(swarm.budget_bytes(0), None);
        assert_eq!(swarm.session_limit(16), None);
        swarm.set_contribution_level(25);
        assert_eq!(swarm.budget_bytes(100), Some(25 * 1_048_576));
        assert_eq!(swarm.session_limit(16), Some(4));
        swarm.set_contribution_level(0);
        assert_eq!(swarm.budget_bytes(0), Some(0));
        assert!(!swarm.contributing());
        swarm.set_contribution_level(250);
        assert_eq!(swarm.contribution_level(), 100);
        Ok(())
    }

    #[test]
    fn one_requester_never_verifies_demand() {
        assert_eq!(TrustLevel::of(false, 1, 9, 1), TrustLevel::Discovered);
        assert_eq!(TrustLevel::of(false, 2, 1, 2), TrustLevel::DemandVerified);
        assert_eq!(TrustLevel::of(false, 4, 2, 2), TrustLevel::DemandVerified);
        assert_eq!(TrustLevel::of(false, 4, 3, 2), TrustLevel::NetworkPopular);
        assert_eq!(TrustLevel::of(true, 0, 0, 2), TrustLevel::Pinned);
    }
}
