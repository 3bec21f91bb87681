//! Client keys: bearer keys the node's owner hands to apps and people so they
//! can run inference (the OpenAI routes and `/api/v1/inference`) and nothing
//! else. Each is a client of its own for the engine's fair shares
//! ([`crate::infer`]) and the per-key rate limit, and can be revoked alone.
//!
//! Only a key's BLAKE3 hash is stored (SQLite `client_keys`); the key itself is
//! shown once, when it is created. Lookups go to an in-memory map of the
//! hashes, so checking a request costs one hash and no database read.

use std::collections::HashMap;
use std::sync::RwLock;

use rand::RngCore;
use rusqlite::params;
use serde::Serialize;

use crate::store::{Store, StoreError, now_unix};

/// Client keys a node keeps (each is a queue share and a rate-limit bucket).
pub const MAX_KEYS: usize = 64;
/// Longest key name, in characters.
pub const MAX_NAME_CHARS: usize = 64;
/// What every client key starts with (the node's own key starts `swl-`).
pub const PREFIX: &str = "swl-client-";

/// A client key as listed (never the key itself).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KeyInfo {
    /// Short id (names the key in the API, the queue and the logs).
    pub id: String,
    /// What the owner called it.
    pub name: String,
    /// Unix seconds.
    pub created_at: i64,
}

/// A key just created: the only time the key is seen.
#[derive(Debug, Clone, Serialize)]
pub struct NewKey {
    /// Its listing.
    #[serde(flatten)]
    pub info: KeyInfo,
    /// The bearer key.
    pub key: String,
}

/// Creating or revoking a key failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The name is empty, too long or has control characters.
    #[error("a key's name must be 1–{MAX_NAME_CHARS} characters without control characters")]
    BadName,
    /// [`MAX_KEYS`] keys exist already.
    #[error("this node already has {MAX_KEYS} client keys; revoke one first")]
    TooMany,
    /// No key has that id.
    #[error("no client key '{0}'")]
    NotFound(String),
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The node's client keys.
#[derive(Debug)]
pub struct ClientKeys {
    store: Store,
    /// BLAKE3 of each key → its listing.
    by_hash: RwLock<HashMap<[u8; 32], KeyInfo>>,
}

impl ClientKeys {
    /// Loads the keys from `store` (blocking).
    pub fn open(store: Store) -> Result<Self, StoreError> {
        let rows = store.with_conn(|c| {
            let mut q = c.prepare("SELECT id, name, created_at, key_hash FROM client_keys")?;
            let rows = q.query_map([], |r| {
                let hash: Vec<u8> = r.get(3)?;
                Ok((
                    KeyInfo {
                        id: r.get(0)?,
                        name: r.get(1)?,
                        created_at: r.get(2)?,
                    },
                    hash,
                ))
            })?;
            rows.collect::<rusqlite::Result<Vec<_>>>()
        })?;
        let by_hash = rows
            .into_iter()
            .filter_map(|(info, hash)| Some((<[u8; 32]>::try_from(hash).ok()?, info)))
            .collect();
        Ok(Self {
            store,
            by_hash: RwLock::new(by_hash),
        })
    }

    /// The key `candidate` is, if it is one of ours.
    pub fn lookup(&self, candidate: &str) -> Option<KeyInfo> {
        // Cheap early out for the node's own key and for garbage.
        if !candidate.starts_with(PREFIX) {
            return None;
        }
        let hash = blake3::hash(candidate.as_bytes());
        self.read().get(hash.as_bytes()).cloned()
    }

    /// Every key, oldest first.
    pub fn list(&self) -> Vec<KeyInfo> {
        let mut all: Vec<KeyInfo> = self.read().values().cloned().collect();
        all.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        all
    }

    /// Makes a key named `name` (blocking: one transaction).
    pub fn create(&self, name: &str) -> Result<NewKey, KeyError> {
        let name = name.trim();
        if name.is_empty()
            || name.chars().count() > MAX_NAME_CHARS
            || name.chars().any(char::is_control)
        {
            return Err(KeyError::BadName);
        }
        // The write lock is held across the insert so two creates cannot both
        // pass the count check.
        let mut map = self.by_hash.write().unwrap_or_else(|p| p.into_inner());
        if map.len() >= MAX_KEYS {
            return Err(KeyError::TooMany);
        }
        let mut raw = [0u8; 24];
        rand::rngs::OsRng.fill_bytes(&mut raw);
        let key = format!("{PREFIX}{}", hex::encode(raw));
        let mut id_raw = [0u8; 4];
        rand::rngs::OsRng.fill_bytes(&mut id_raw);
        let info = KeyInfo {
            id: hex::encode(id_raw),
            name: name.to_string(),
            created_at: now_unix(),
        };
        let hash = *blake3::hash(key.as_bytes()).as_bytes();
        self.store.with_conn(|c| {
            c.execute(
                "INSERT INTO client_keys (id, name, created_at, key_hash) VALUES (?1, ?2, ?3, ?4)",
                params![info.id, info.name, info.created_at, hash.to_vec()],
            )
        })?;
        map.insert(hash, info.clone());
        Ok(NewKey { info, key })
    }

    /// Revokes key `id` (blocking): requests with it are refused from now on.
    pub fn revoke(&self, id: &str) -> Result<KeyInfo, KeyError> {
        let mut map = self.by_hash.write().unwrap_or_else(|p| p.into_inner());
        let Some(hash) = map.iter().find(|(_, k)| k.id == id).map(|(h, _)| *h) else {
            return Err(KeyError::NotFound(id.to_string()));
        };
        self.store
            .with_conn(|c| c.execute("DELETE FROM client_keys WHERE id = ?1", params![id]))?;
        map.remove(&hash)
            .ok_or_else(|| KeyError::NotFound(id.to_string()))
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<[u8; 32], KeyInfo>> {
        self.by_hash.read().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_found_by_value_survive_a_reopen_and_die_when_revoked() -> Result<(), KeyError> {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("node.db");
        let keys = ClientKeys::open(Store::open(&path)?)?;
        let a = keys.create("  laptop app ")?;
        assert_eq!(a.info.name, "laptop app");
        assert!(a.key.starts_with(PREFIX));
        assert_eq!(keys.lookup(&a.key), Some(a.info.clone()));
        assert_eq!(keys.lookup(&format!("{}0", a.key)), None);
        assert_eq!(keys.lookup("swl-somethingelse"), None);
        // Only the hash is stored.
        let stored: Vec<u8> = Store::open(&path)?
            .with_conn(|c| c.query_row("SELECT key_hash FROM client_keys", [], |r| r.get(0)))?;
        assert_eq!(stored, blake3::hash(a.key.as_bytes()).as_bytes().to_vec());

        let reopened = ClientKeys::open(Store::open(&path)?)?;
        assert_eq!(reopened.lookup(&a.key), Some(a.info.clone()));
        assert_eq!(reopened.revoke(&a.info.id)?, a.info);
        assert_eq!(reopened.lookup(&a.key), None);
        assert!(matches!(
            reopened.revoke(&a.info.id),
            Err(KeyError::NotFound(_))
        ));
        assert!(ClientKeys::open(Store::open(&path)?)?.list().is_empty());
        Ok(())
    }

    #[test]
    fn names_and_count_are_bounded() -> Result<(), KeyError> {
        let keys = ClientKeys::open(Store::open_in_memory()?)?;
        for bad in ["", "   ", "a\nb", &"x".repeat(MAX_NAME_CHARS + 1)] {
            assert!(
                matches!(keys.create(bad), Err(KeyError::BadName)),
                "{bad:?}"
            );
        }
        for i in 0..MAX_KEYS {
            keys.create(&format!("k{i}"))?;
        }
        assert!(matches!(keys.create("one more"), Err(KeyError::TooMany)));
        assert_eq!(keys.list().len(), MAX_KEYS);
        Ok(())
    }
}
