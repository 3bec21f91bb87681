//! What the user decided about auto-manage, kept in the `settings` table and in
//! memory: the per-model policy, locked shards, and which models auto-manage
//! brought in (those are not the user's choice, so not `Pinned`).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::store::{Store, StoreError};

const AUTO_MANAGE_KEY: &str = "auto_manage";
const LOCKS_KEY: &str = "shard_locks";
const ACQUIRED_KEY: &str = "auto_acquired";
const SCHEDULE_KEY: &str = "schedule";
/// Models with their own policy (more are refused).
pub const MAX_POLICIES: usize = 10_000;

/// One model's auto-manage setting; `None` follows the global default.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct AutoManage {
    /// Acquire the shards the swarm lacks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// Delete shards no longer needed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prune: Option<bool>,
}

/// The settings, read once and written through.
#[derive(Debug)]
pub struct Settings {
    store: Store,
    state: Mutex<State>,
}

#[derive(Debug, Default, Clone)]
struct State {
    auto_manage: BTreeMap<String, AutoManage>,
    locks: BTreeMap<String, BTreeSet<u32>>,
    acquired: BTreeSet<String>,
    schedule: super::schedule::Schedule,
}

/// A policy could not be stored.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SettingsError {
    /// Too many models have their own policy.
    #[error("at most {MAX_POLICIES} models may have their own auto-manage setting")]
    TooMany,
    /// A schedule that names a bad day or hour.
    #[error("invalid schedule: {0}")]
    Schedule(String),
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl Settings {
    /// Reads the settings (blocking: SQLite). A value that does not parse is
    /// treated as empty rather than stopping the node.
    pub fn load(store: Store) -> Result<Self, StoreError> {
        fn read<T: serde::de::DeserializeOwned + Default>(
            store: &Store,
            key: &str,
        ) -> Result<T, StoreError> {
            Ok(store
                .setting(key)?
                .and_then(|v| serde_json::from_str(&v).ok())
                .unwrap_or_default())
        }
        let state = State {
            auto_manage: read(&store, AUTO_MANAGE_KEY)?,
            locks: read(&store, LOCKS_KEY)?,
            acquired: read(&store, ACQUIRED_KEY)?,
            schedule: read(&store, SCHEDULE_KEY)?,
        };
        Ok(Self {
            store,
            state: Mutex::new(state),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn save<T: Serialize>(&self, key: &str, value: &T) -> Result<(), StoreError> {
        let text = serde_json::to_string(value).unwrap_or_else(|_| "{}".into());
        self.store.set_setting(key, Some(&text))
    }

    /// The model's own setting (unset fields follow the global default).
    pub fn auto_manage(&self, model_id: &str) -> AutoManage {
        self.state()
            .auto_manage
            .get(model_id)
            .copied()
            .unwrap_or_default()
    }

    /// Every model with its own setting.
    pub fn auto_manage_all(&self) -> BTreeMap<String, AutoManage> {
        self.state().auto_manage.clone()
    }

    /// Sets (or, with both fields `None`, clears) a model's setting (blocking).
    pub fn set_auto_manage(&self, model_id: &str, value: AutoManage) -> Result<(), SettingsError> {
        let mut state = self.state();
        let mut next = state.auto_manage.clone();
        if value == AutoManage::default() {
            next.remove(model_id);
        } else {
            if !next.contains_key(model_id) && next.len() >= MAX_POLICIES {
                return Err(SettingsError::TooMany);
            }
            next.insert(model_id.to_string(), value);
        }
        self.save(AUTO_MANAGE_KEY, &next)?;
        state.auto_manage = next;
        Ok(())
    }

    /// The model's locked shards.
    pub fn locks(&self, model_id: &str) -> BTreeSet<u32> {
        self.state()
            .locks
            .get(model_id)
            .cloned()
            .unwrap_or_default()
    }

    /// Every model's locked shards.
    pub fn all_locks(&self) -> BTreeMap<String, BTreeSet<u32>> {
        self.state().locks.clone()
    }

    /// Locks or unlocks a shard (blocking); the caller checked that the model
    /// and index exist here. Returns the model's locked shards.
    pub fn set_lock(
        &self,
        model_id: &str,
        index: u32,
        locked: bool,
    ) -> Result<BTreeSet<u32>, SettingsError> {
        let mut state = self.state();
        let mut next = state.locks.clone();
        let set = next.entry(model_id.to_string()).or_default();
        if locked {
            set.insert(index);
        } else {
            set.remove(&index);
        }
        let now = set.clone();
        if now.is_empty() {
            next.remove(model_id);
        }
        self.save(LOCKS_KEY, &next)?;
        state.locks = next;
        Ok(now)
    }

    /// Forgets a model's locks (it was deleted; blocking).
    pub fn forget(&self, model_id: &str) -> Result<(), SettingsError> {
        let mut state = self.state();
        let mut locks = state.locks.clone();
        let mut acquired = state.acquired.clone();
        if locks.remove(model_id).is_some() {
            self.save(LOCKS_KEY, &locks)?;
        }
        if acquired.remove(model_id) {
            self.save(ACQUIRED_KEY, &acquired)?;
        }
        state.locks = locks;
        state.acquired = acquired;
        Ok(())
    }

    /// The contribution schedule.
    pub fn schedule(&self) -> super::schedule::Schedule {
        self.state().schedule.clone()
    }

    /// Whether the schedule lets the node contribute now (no copy made: this is
    /// asked per served step).
    pub fn contributes_now(&self) -> bool {
        self.state().schedule.contributes_now()
    }

    /// Replaces the schedule after checking it (blocking).
    pub fn set_schedule(&self, schedule: super::schedule::Schedule) -> Result<(), SettingsError> {
        schedule.validate().map_err(SettingsError::Schedule)?;
        let mut state = self.state();
        self.save(SCHEDULE_KEY, &schedule)?;
        state.schedule = schedule;
        Ok(())
    }

    /// Whether auto-manage brought this model in (rather than the user).
    pub fn auto_acquired(&self, model_id: &str) -> bool {
        self.state().acquired.contains(model_id)
    }

    /// Marks a model as brought in by auto-manage (`true`) or chosen by the user
    /// (`false`), blocking. Bounded by the models on disk: only those are marked.
    pub fn set_auto_acquired(&self, model_id: &str, auto: bool) -> Result<(), SettingsError> {
        let mut state = self.state();
        if state.acquired.contains(model_id) == auto {
            return Ok(());
        }
        let mut next = state.acquired.clone();
        if auto {
            next.insert(model_id.to_string());
        } else {
            next.remove(model_id);
        }
        self.save(ACQUIRED_KEY, &next)?;
        state.acquired = next;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_survive_a_reopen() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("node.db");
        {
            let s = Settings::load(Store::open(&path)?)?;
            s.set_auto_manage(
                "m",
                AutoManage {
                    enabled: Some(true),
                    prune: Some(false),
                },
            )?;
            assert_eq!(s.set_lock("m", 2, true)?, BTreeSet::from([2]));
            s.set_auto_acquired("x", true)?;
        }
        let s = Settings::load(Store::open(&path)?)?;
        assert_eq!(s.auto_manage("m").prune, Some(false));
        assert_eq!(s.locks("m"), BTreeSet::from([2]));
        assert!(s.auto_acquired("x"));
        // Clearing both fields removes the model's own setting.
        s.set_auto_manage("m", AutoManage::default())?;
        assert!(s.auto_manage_all().is_empty());
        s.forget("x")?;
        assert!(!s.auto_acquired("x"));
        Ok(())
    }
}
