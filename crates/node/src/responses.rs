//! The Responses API's records: stored responses in SQLite (`responses`) and
//! the live runs whose events readers follow (`/v1/responses`, see
//! `api::responses`).
//!
//! A run keeps every event it emitted, numbered, so a reader can join late or
//! resume after `starting_after`; a finished run's events are rebuilt from its
//! stored record (the text pieces are kept in order), so resuming works after
//! the run has left memory too.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use rusqlite::{OptionalExtension, params};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::store::{Store, StoreError};

/// Runs kept in memory at once (each is one generation in flight).
pub const MAX_RUNS: usize = 256;
/// Records kept; the oldest are deleted past it.
const MAX_RECORDS: i64 = 10_000;

/// A stored response.
#[derive(Debug, Clone)]
pub struct Record {
    /// `resp_…`.
    pub id: String,
    /// Who made it (a client key's id, or the node's).
    pub client: String,
    /// The response object as last known.
    pub object: Value,
    /// The conversation up to and including its answer (for
    /// `previous_response_id`): `[{"role", "content"}]`.
    pub conversation: Value,
    /// The answer's text pieces in order (to rebuild its stream).
    pub deltas: Vec<String>,
}

/// One response being generated.
#[derive(Debug)]
pub struct Run {
    /// Its id.
    pub id: String,
    /// Who made it.
    pub client: String,
    /// Cancelled by `POST /v1/responses/{id}/cancel` (or when a foreground
    /// stream's reader leaves).
    pub cancel: CancellationToken,
    events: Mutex<Vec<Value>>,
    /// Events emitted so far, and whether the run has ended (watchers wake on
    /// every change).
    progress: tokio::sync::watch::Sender<(usize, bool)>,
}

impl Run {
    /// Appends an event, numbering it.
    pub fn emit(&self, mut event: Value) {
        let mut events = self.events.lock().unwrap_or_else(|p| p.into_inner());
        event["sequence_number"] = Value::from(events.len());
        events.push(event);
        let n = events.len();
        drop(events);
        self.progress.send_modify(|p| p.0 = n);
    }

    /// Marks the run ended (after its last event).
    pub fn end(&self) {
        self.progress.send_modify(|p| p.1 = true);
    }

    /// Events numbered after `after` (all with `None`), and whether the run
    /// has ended.
    pub fn events_after(&self, after: Option<usize>) -> (Vec<Value>, bool) {
        let events = self.events.lock().unwrap_or_else(|p| p.into_inner());
        let from = after.map_or(0, |a| a.saturating_add(1)).min(events.len());
        let ended = self.progress.borrow().1;
        (events[from..].to_vec(), ended)
    }

    /// Waits for the next change (an event or the end).
    pub fn watch(&self) -> tokio::sync::watch::Receiver<(usize, bool)> {
        self.progress.subscribe()
    }
}

impl Run {
    /// A run outside any registry (to rebuild a stored response's events).
    pub fn detached(id: &str, client: &str) -> Self {
        Run {
            id: id.to_string(),
            client: client.to_string(),
            cancel: CancellationToken::new(),
            events: Mutex::default(),
            progress: tokio::sync::watch::Sender::new((0, false)),
        }
    }
}

/// Starting a run failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RunError {
    /// [`MAX_RUNS`] are in flight.
    #[error("{MAX_RUNS} responses are being generated; try again shortly")]
    Busy,
}

/// The node's responses.
#[derive(Debug)]
pub struct Responses {
    store: Store,
    runs: Mutex<HashMap<String, Arc<Run>>>,
}

impl Responses {
    /// Over `store` (blocking): responses that were running when the node
    /// stopped are marked failed, since nothing will finish them.
    pub fn open(store: Store) -> Result<Self, StoreError> {
        let this = Self {
            store,
            runs: Mutex::default(),
        };
        let stale: Vec<String> = this.store.with_conn(|c| {
            let mut q =
                c.prepare("SELECT id FROM responses WHERE status IN ('queued', 'in_progress')")?;
            let ids = q.query_map([], |r| r.get(0))?;
            ids.collect()
        })?;
        for id in stale {
            if let Some(mut r) = this.load(&id)? {
                r.object["status"] = Value::from("failed");
                r.object["error"] = serde_json::json!({
                    "code": "interrupted",
                    "message": "the node stopped while this response was being generated",
                });
                this.save(&r)?;
            }
        }
        Ok(this)
    }

    /// Registers a new run.
    pub fn start(&self, id: &str, client: &str) -> Result<Arc<Run>, RunError> {
        let mut runs = self.runs.lock().unwrap_or_else(|p| p.into_inner());
        if runs.len() >= MAX_RUNS {
            return Err(RunError::Busy);
        }
        let run = Arc::new(Run::detached(id, client));
        runs.insert(id.to_string(), Arc::clone(&run));
        Ok(run)
    }

    /// The run `id`, while it is in memory.
    pub fn run(&self, id: &str) -> Option<Arc<Run>> {
        let runs = self.runs.lock().unwrap_or_else(|p| p.into_inner());
        runs.get(id).cloned()
    }

    /// Forgets a finished run (its record, if stored, remains).
    pub fn finish(&self, id: &str) {
        let mut runs = self.runs.lock().unwrap_or_else(|p| p.into_inner());
        runs.remove(id);
    }

    /// Writes `record` (blocking; one statement), trimming the oldest records.
    pub fn save(&self, r: &Record) -> Result<(), StoreError> {
        let status = r.object["status"].as_str().unwrap_or("").to_string();
        let created = r.object["created_at"].as_i64().unwrap_or(0);
        let model = r.object["model"].as_str().unwrap_or("").to_string();
        let deltas = serde_json::to_string(&r.deltas).unwrap_or_else(|_| "[]".into());
        self.store.with_conn(|c| {
            let tx = c.transaction()?;
            tx.execute(
                "INSERT INTO responses (id, client, created_at, status, model, object, conversation, deltas)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
                 ON CONFLICT(id) DO UPDATE SET status = ?4, object = ?6, conversation = ?7, deltas = ?8",
                params![
                    r.id,
                    r.client,
                    created,
                    status,
                    model,
                    r.object.to_string(),
                    r.conversation.to_string(),
                    deltas
                ],
            )?;
            tx.execute(
                "DELETE FROM responses WHERE rowid IN (SELECT rowid FROM responses
                 ORDER BY created_at DESC, rowid DESC LIMIT -1 OFFSET ?1)",
                params![MAX_RECORDS],
            )?;
            tx.commit()
        })
    }

    /// The stored record `id` (blocking).
    pub fn load(&self, id: &str) -> Result<Option<Record>, StoreError> {
        self.store.with_conn(|c| {
            c.query_row(
                "SELECT id, client, object, conversation, deltas FROM responses WHERE id = ?1",
                params![id],
                |row| {
                    let text = |i: usize| -> rusqlite::Result<String> { row.get(i) };
                    Ok(Record {
                        id: text(0)?,
                        client: text(1)?,
                        object: serde_json::from_str(&text(2)?).unwrap_or(Value::Null),
                        conversation: serde_json::from_str(&text(3)?).unwrap_or(Value::Null),
                        deltas: serde_json::from_str(&text(4)?).unwrap_or_default(),
                    })
                },
            )
            .optional()
        })
    }

    /// Deletes record `id` (blocking); whether there was one.
    pub fn delete(&self, id: &str) -> Result<bool, StoreError> {
        self.store
            .with_conn(|c| c.execute("DELETE FROM responses WHERE id = ?1", params![id]))
            .map(|n| n > 0)
    }

    /// The newest records' objects, at most `limit`, optionally of one status
    /// (blocking).
    pub fn list(&self, limit: usize, status: Option<&str>) -> Result<Vec<Value>, StoreError> {
        self.store.with_conn(|c| {
            let mut q = c.prepare(
                "SELECT object FROM responses WHERE (?1 IS NULL OR status = ?1)
                 ORDER BY created_at DESC, rowid DESC LIMIT ?2",
            )?;
            let rows = q.query_map(params![status, limit as i64], |r| r.get::<_, String>(0))?;
            rows.map(|r| r.map(|s| serde_json::from_str(&s).unwrap_or(Value::Null)))
                .collect()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn records_round_trip_list_by_status_and_delete() -> Result<(), StoreError> {
        let r = Responses::open(Store::open_in_memory()?)?;
        let rec = |id: &str, status: &str, at: i64| Record {
            id: id.into(),
            client: "node".into(),
            object: json!({ "id": id, "status": status, "created_at": at, "model": "m" }),
            conversation: json!([{ "role": "user", "content": "hi" }]),
            deltas: vec!["He".into(), "llo".into()],
        };
        r.save(&rec("resp_a", "completed", 1))?;
        r.save(&rec("resp_b", "in_progress", 2))?;
        r.save(&rec("resp_b", "cancelled", 2))?;
        let b = r.load("resp_b")?.expect("stored");
        assert_eq!(b.object["status"], "cancelled");
        assert_eq!(b.deltas, ["He", "llo"]);
        assert_eq!(r.list(10, None)?.len(), 2);
        assert_eq!(r.list(10, Some("completed"))?[0]["id"], "resp_a");
        assert_eq!(r.list(1, None)?[0]["id"], "resp_b", "newest first");
        assert!(r.delete("resp_a")?);
        assert!(!r.delete("resp_a")?);
        assert!(r.load("resp_a")?.is_none());
        Ok(())
    }

    #[test]
    fn responses_running_when_the_node_stopped_are_failed_on_open() -> Result<(), StoreError> {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("node.db");
        let r = Responses::open(Store::open(&path)?)?;
        for (id, status) in [
            ("resp_run", "in_progress"),
            ("resp_q", "queued"),
            ("resp_ok", "completed"),
        ] {
            r.save(&Record {
                id: id.into(),
                client: "node".into(),
                object: json!({ "id": id, "status": status, "created_at": 1, "model": "m" }),
                conversation: json!([]),
                deltas: vec![],
            })?;
        }
        let reopened = Responses::open(Store::open(&path)?)?;
        let status = |id: &str| -> Result<Value, StoreError> {
            Ok(reopened.load(id)?.expect("kept").object["status"].clone())
        };
        assert_eq!(
            (status("resp_run")?, status("resp_q")?),
            (json!("failed"), json!("failed"))
        );
        assert_eq!(status("resp_ok")?, json!("completed"));
        assert_eq!(
            reopened.load("resp_run")?.expect("kept").object["error"]["code"],
            "interrupted"
        );
        Ok(())
    }

    #[test]
    fn a_run_numbers_its_events_and_replays_after_a_point() {
        let r = Responses::open(Store::open_in_memory().expect("db")).expect("open");
        let run = r.start("resp_x", "node").expect("room");
        for t in ["a", "b", "c"] {
            run.emit(json!({ "type": t }));
        }
        let (all, ended) = run.events_after(None);
        assert_eq!((all.len(), ended), (3, false));
        assert_eq!(all[2]["sequence_number"], 2);
        let (rest, _) = run.events_after(Some(0));
        assert_eq!(
            rest.iter().map(|e| e["type"].clone()).collect::<Vec<_>>(),
            ["b", "c"]
        );
        assert!(run.events_after(Some(99)).0.is_empty());
        run.end();
        assert!(run.events_after(Some(2)).1);
        r.finish("resp_x");
        assert!(r.run("resp_x").is_none());
    }
}
