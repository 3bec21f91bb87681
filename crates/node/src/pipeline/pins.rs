//! The manifest a node first accepted for each model id, by hash.
//!
//! Two peers could serve different manifests under one model id (a different
//! quantization, or an attack). A node keeps the BLAKE3 of the manifest it first
//! accepted for an id (`manifest_pins` in SQLite), announces it with its ranges,
//! fetches a manifest only when it matches, and never routes through or downloads
//! from a holder that announces another one, so shards of two manifests are never
//! mixed. A model on disk is the user's choice: its manifest re-pins the id.

use std::collections::HashMap;
use std::sync::Mutex;

use rusqlite::{OptionalExtension, params};

use crate::store::{Store, StoreError};

/// Most pins kept in memory (the table holds one row per model ever accepted).
const MAX_CACHED: usize = 10_000;

/// Manifest hashes by model id: SQLite, with an in-memory copy for routing.
#[derive(Debug)]
pub(crate) struct ManifestPins {
    store: Store,
    cache: Mutex<HashMap<String, String>>,
    /// Set once the table has been read into `cache` (every write after keeps
    /// the cache current).
    loaded: std::sync::OnceLock<()>,
}

impl ManifestPins {
    pub(crate) fn new(store: Store) -> Self {
        Self {
            store,
            cache: Mutex::new(HashMap::new()),
            loaded: std::sync::OnceLock::new(),
        }
    }

    /// Reads every pin into memory the first time it is called (blocking: SQLite).
    pub(crate) fn load_once(&self) -> Result<(), StoreError> {
        if self.loaded.get().is_none() {
            self.reload()?;
            let _ = self.loaded.set(());
        }
        Ok(())
    }

    /// The pinned hash of `model_id` (from memory; [`ManifestPins::reload`] fills it).
    pub(crate) fn get(&self, model_id: &str) -> Option<String> {
        self.cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(model_id)
            .cloned()
    }

    /// Pins `hash` for `model_id` unless another hash is pinned already; returns
    /// the pin in force (blocking: SQLite).
    pub(crate) fn pin_first(&self, model_id: &str, hash: &str) -> Result<String, StoreError> {
        let pinned = self.store.with_conn(|c| {
            c.execute(
                "INSERT OR IGNORE INTO manifest_pins (model_id, manifest_hash, pinned_at)
                 VALUES (?1, ?2, ?3)",
                params![model_id, hash, chrono::Utc::now().timestamp()],
            )?;
            c.query_row(
                "SELECT manifest_hash FROM manifest_pins WHERE model_id = ?1",
                [model_id],
                |r| r.get::<_, String>(0),
            )
        })?;
        self.remember(model_id, &pinned);
        Ok(pinned)
    }

    /// Pins `hash` for `model_id`, replacing any other (the manifest on disk).
    pub(crate) fn set(&self, model_id: &str, hash: &str) -> Result<(), StoreError> {
        let old = self.store.with_conn(|c| {
            c.query_row(
                "SELECT manifest_hash FROM manifest_pins WHERE model_id = ?1",
                [model_id],
                |r| r.get::<_, String>(0),
            )
            .optional()
        })?;
        if old.as_deref() != Some(hash) {
            if let Some(old) = old {
                tracing::info!(model = model_id, %old, new = hash,
                    "the manifest on disk re-pins the model");
            }
            self.store.with_conn(|c| {
                c.execute(
                    "INSERT INTO manifest_pins (model_id, manifest_hash, pinned_at)
                     VALUES (?1, ?2, ?3)
                     ON CONFLICT(model_id) DO UPDATE SET manifest_hash = excluded.manifest_hash,
                                                         pinned_at = excluded.pinned_at",
                    params![model_id, hash, chrono::Utc::now().timestamp()],
                )
            })?;
        }
        self.remember(model_id, hash);
        Ok(())
    }

    /// Reads every pin into memory (blocking: SQLite).
    fn reload(&self) -> Result<(), StoreError> {
        let rows = self.store.with_conn(|c| {
            let mut stmt = c.prepare(
                "SELECT model_id, manifest_hash FROM manifest_pins
                 ORDER BY pinned_at DESC LIMIT ?1",
            )?;
            stmt.query_map([MAX_CACHED as i64], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<rusqlite::Result<HashMap<String, String>>>()
        })?;
        *self.cache.lock().unwrap_or_else(|p| p.into_inner()) = rows;
        Ok(())
    }

    fn remember(&self, model_id: &str, hash: &str) {
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= MAX_CACHED && !cache.contains_key(model_id) {
            return;
        }
        cache.insert(model_id.to_string(), hash.to_string());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_accepted_hash_stays_until_disk_says_otherwise() -> Result<(), StoreError> {
        let pins = ManifestPins::new(Store::open_in_memory()?);
        assert_eq!(pins.get("m"), None);
        assert_eq!(pins.pin_first("m", "aa")?, "aa");
        assert_eq!(pins.pin_first("m", "bb")?, "aa");
        assert_eq!(pins.get("m").as_deref(), Some("aa"));
        pins.set("m", "cc")?;
        let fresh = ManifestPins::new(pins.store.clone());
        fresh.reload()?;
        assert_eq!(fresh.get("m").as_deref(), Some("cc"));
        Ok(())
    }
}
