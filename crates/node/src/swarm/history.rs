//! What auto-manage did, in SQLite (`swarm_activity`): acquisitions and prunes
//! with their reasons, for `GET /api/admin/prune-history` and the dashboard.

use rusqlite::params;
use serde::Serialize;

use crate::store::{Store, StoreError, now_unix};

/// Rows kept (older ones are deleted as new ones arrive).
const MAX_ROWS: i64 = 10_000;

/// One recorded action.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ActivityRecord {
    /// Unix seconds.
    pub at: i64,
    /// `prune` or `acquire`.
    pub kind: String,
    /// Model id.
    pub model_id: String,
    /// Shard index.
    pub shard_index: Option<u32>,
    /// Bytes freed or fetched.
    pub bytes: u64,
    /// Why.
    pub reason: String,
}

/// Appends `record` (blocking).
pub fn record(store: &Store, r: &ActivityRecord) -> Result<(), StoreError> {
    store.with_conn(|c| {
        let tx = c.transaction()?;
        tx.execute(
            "INSERT INTO swarm_activity (at, kind, model_id, shard_index, bytes, reason)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                r.at,
                r.kind,
                r.model_id,
                r.shard_index,
                i64::try_from(r.bytes).unwrap_or(i64::MAX),
                r.reason
            ],
        )?;
        tx.execute(
            "DELETE FROM swarm_activity WHERE id <= (SELECT MAX(id) FROM swarm_activity) - ?1",
            [MAX_ROWS],
        )?;
        tx.commit()
    })
}

/// The latest `limit` records of `kind`, newest first (blocking).
pub fn list(store: &Store, kind: &str, limit: u32) -> Result<Vec<ActivityRecord>, StoreError> {
    store.with_conn(|c| {
        let mut stmt = c.prepare(
            "SELECT at, kind, model_id, shard_index, bytes, reason FROM swarm_activity
             WHERE kind = ?1 ORDER BY id DESC LIMIT ?2",
        )?;
        let rows = stmt.query_map(params![kind, limit], |r| {
            Ok(ActivityRecord {
                at: r.get(0)?,
                kind: r.get(1)?,
                model_id: r.get(2)?,
                shard_index: r.get(3)?,
                bytes: u64::try_from(r.get::<_, i64>(4)?).unwrap_or(0),
                reason: r.get(5)?,
            })
        })?;
        rows.collect()
    })
}

/// A record made now.
pub fn now(
    kind: &str,
    model_id: &str,
    shard_index: Option<u32>,
    bytes: u64,
    reason: &str,
) -> ActivityRecord {
    ActivityRecord {
        at: now_unix(),
        kind: kind.into(),
        model_id: model_id.into(),
        shard_index,
        bytes,
        reason: reason.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newest_first_by_kind() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let store = Store::open(&dir.path().join("node.db"))?;
        record(
            &store,
            &now("prune", "m", Some(1), 10, "over the disk budget"),
        )?;
        record(&store, &now("acquire", "m", Some(0), 10, "below target"))?;
        record(
            &store,
            &now("prune", "m", Some(2), 20, "demand for the model has gone"),
        )?;
        let p = list(&store, "prune", 10)?;
        assert_eq!(p.len(), 2);
        assert_eq!(p[0].shard_index, Some(2));
        assert_eq!(list(&store, "acquire", 10)?.len(), 1);
        Ok(())
    }
}
