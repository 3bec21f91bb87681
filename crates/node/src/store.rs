//! The node's SQLite database: numbered migrations, WAL, transactional writes.
//!
//! One connection behind a mutex is plenty for a node's write rate and keeps the
//! locking story simple; calls are short and run on the blocking pool
//! (`tokio::task::spawn_blocking`) when made from async code.

use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use rusqlite::{Connection, OptionalExtension, params};

/// Schema migrations, applied in order. Index + 1 is the schema version stored in
/// `PRAGMA user_version`. Never edit a shipped entry: append a new one.
const MIGRATIONS: &[&str] = &[
    // 1: settings and the request log.
    "CREATE TABLE settings (
        key        TEXT PRIMARY KEY,
        value      TEXT NOT NULL,
        updated_at INTEGER NOT NULL
    );
    CREATE TABLE request_log (
        id                TEXT PRIMARY KEY,
        endpoint          TEXT NOT NULL,
        model             TEXT NOT NULL,
        prompt_tokens     INTEGER NOT NULL,
        completion_tokens INTEGER NOT NULL,
        finish_reason     TEXT NOT NULL,
        queue_ms          INTEGER NOT NULL,
        inference_ms      INTEGER NOT NULL,
        total_ms          INTEGER NOT NULL,
        created_at        INTEGER NOT NULL
    );
    CREATE INDEX request_log_created ON request_log(created_at);",
    // 2: the peer directory (shapes of swarm_nodes, swarm_seeds, swarm_sync_log).
    "CREATE TABLE swarm_nodes (
        id                   TEXT PRIMARY KEY,
        node_id              TEXT NOT NULL UNIQUE,
        peer_id              TEXT NOT NULL,
        addresses            TEXT NOT NULL DEFAULT '[]',
        nickname             TEXT,
        region               TEXT,
        software_version     TEXT,
        capabilities         TEXT NOT NULL DEFAULT '[]',
        hardware             TEXT NOT NULL DEFAULT '{}',
        models               TEXT NOT NULL DEFAULT '[]',
        load                 TEXT NOT NULL DEFAULT '{}',
        latency_ms           REAL,
        trust_score          INTEGER NOT NULL DEFAULT 50,
        consecutive_failures INTEGER NOT NULL DEFAULT 0,
        bad_frames           INTEGER NOT NULL DEFAULT 0,
        discovered_via       TEXT NOT NULL,
        discovered_at        INTEGER NOT NULL,
        last_seen_at         INTEGER,
        last_sync_at         INTEGER,
        announce_seq         INTEGER NOT NULL DEFAULT 0,
        is_active            INTEGER NOT NULL DEFAULT 0,
        next_retry_at        INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE swarm_seeds (
        id                   TEXT PRIMARY KEY,
        address              TEXT NOT NULL UNIQUE,
        priority             INTEGER NOT NULL DEFAULT 100,
        is_enabled           INTEGER NOT NULL DEFAULT 1,
        last_contact_at      INTEGER,
        consecutive_failures INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE swarm_sync_log (
        id             TEXT PRIMARY KEY,
        remote_node    TEXT NOT NULL,
        direction      TEXT NOT NULL CHECK (direction IN ('push', 'pull')),
        nodes_received INTEGER NOT NULL DEFAULT 0,
        nodes_sent     INTEGER NOT NULL DEFAULT 0,
        success        INTEGER NOT NULL,
        error_message  TEXT,
        duration_ms    INTEGER NOT NULL DEFAULT 0,
        created_at     INTEGER NOT NULL
    );
    CREATE INDEX swarm_sync_log_created ON swarm_sync_log(created_at);",
    // 3: device pools (this node's pool, its members, invite-code hashes, the
    // hourly operation log).
    "CREATE TABLE pools (
        id               TEXT PRIMARY KEY,
        name             TEXT NOT NULL,
        owner_node_id    TEXT NOT NULL,
        role             TEXT NOT NULL CHECK (role IN ('owner', 'member')),
        credit_split_pct INTEGER NOT NULL DEFAULT 20,
        max_devices      INTEGER NOT NULL DEFAULT 10,
        created_at       INTEGER NOT NULL
    );
    CREATE TABLE pool_members (
        pool_id        TEXT NOT NULL,
        node_id        TEXT NOT NULL,
        device_name    TEXT,
        role           TEXT NOT NULL,
        joined_at      INTEGER NOT NULL,
        invitation_id  TEXT,
        acceptance_sig TEXT,
        contribution   INTEGER,
        PRIMARY KEY (pool_id, node_id)
    );
    CREATE TABLE pool_codes (
        code_hash  TEXT PRIMARY KEY,
        pool_id    TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        expires_at INTEGER NOT NULL,
        used_at    INTEGER,
        used_by    TEXT
    );
    CREATE TABLE pool_ops (
        node_id TEXT NOT NULL,
        at      INTEGER NOT NULL
    );
    CREATE INDEX pool_ops_at ON pool_ops(node_id, at);
    CREATE TABLE pool_pins (
        pool_id        TEXT NOT NULL,
        model_id       TEXT NOT NULL,
        target_node_id TEXT NOT NULL,
        shard_indices  TEXT NOT NULL DEFAULT '[]',
        created_at     INTEGER NOT NULL,
        PRIMARY KEY (pool_id, model_id, target_node_id)
    );
    CREATE TABLE pool_seen_notices (
        nonce   TEXT PRIMARY KEY,
        seen_at INTEGER NOT NULL
    );",
    // 4: the credit ledger (dual-signed entries, this node's cached totals,
    // forwards waiting for the pool owner) and per-pool rate overrides.
    "CREATE TABLE credit_entries (
        id         TEXT PRIMARY KEY,
        kind       TEXT NOT NULL CHECK (kind IN ('receipt', 'transfer', 'pool_forward')),
        payer      TEXT NOT NULL,
        payee      TEXT NOT NULL,
        amount     INTEGER NOT NULL CHECK (amount >= 0),
        created_at INTEGER NOT NULL,
        body       TEXT NOT NULL,
        payer_sig  TEXT NOT NULL,
        payee_sig  TEXT NOT NULL
    );
    CREATE INDEX credit_entries_created ON credit_entries(created_at);
    CREATE TABLE credit_totals (
        node_id TEXT PRIMARY KEY,
        earned  INTEGER NOT NULL DEFAULT 0,
        spent   INTEGER NOT NULL DEFAULT 0,
        entries INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE credit_pending_forwards (
        id         TEXT PRIMARY KEY,
        owner      TEXT NOT NULL,
        entry      TEXT NOT NULL,
        created_at INTEGER NOT NULL
    );
    ALTER TABLE pools ADD COLUMN rates TEXT;",
    // 5 (hostile peers): the manifest hash first accepted for each model id;
    // banned peers; the public nameplate and online attempts of pool codes
    // (joins by PAKE); receipts whose settle has not reached the hop yet.
    "CREATE TABLE manifest_pins (
        model_id      TEXT PRIMARY KEY,
        manifest_hash TEXT NOT NULL,
        pinned_at     INTEGER NOT NULL
    );
    ALTER TABLE swarm_nodes ADD COLUMN banned_until INTEGER;
    ALTER TABLE pool_codes ADD COLUMN nameplate TEXT;
    ALTER TABLE pool_codes ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0;
    CREATE TABLE credit_pending_settles (
        id         TEXT PRIMARY KEY,
        node       TEXT NOT NULL,
        entry      TEXT NOT NULL,
        created_at INTEGER NOT NULL
    );
    CREATE TABLE request_totals (
        id                INTEGER PRIMARY KEY CHECK (id = 1),
        requests          INTEGER NOT NULL,
        completion_tokens INTEGER NOT NULL,
        prompt_tokens     INTEGER NOT NULL
    );
    INSERT INTO request_totals VALUES (1, 0, 0, 0);",
    // 6 (self-organising swarm): what auto-manage acquired and pruned, and why.
    "CREATE TABLE swarm_activity (
        id          INTEGER PRIMARY KEY AUTOINCREMENT,
        at          INTEGER NOT NULL,
        kind        TEXT NOT NULL,
        model_id    TEXT NOT NULL,
        shard_index INTEGER,
        bytes       INTEGER NOT NULL DEFAULT 0,
        reason      TEXT NOT NULL
    );
    CREATE INDEX swarm_activity_kind ON swarm_activity (kind, id);",
    // 7 (fair shares): client keys, by the BLAKE3 of the key (never the key).
    "CREATE TABLE client_keys (
        id         TEXT PRIMARY KEY,
        name       TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        key_hash   BLOB NOT NULL UNIQUE
    );",
    // 8 (Responses API): stored responses.
    "CREATE TABLE responses (
        id           TEXT PRIMARY KEY,
        client       TEXT NOT NULL,
        created_at   INTEGER NOT NULL,
        status       TEXT NOT NULL,
        model        TEXT NOT NULL,
        object       TEXT NOT NULL,
        conversation TEXT NOT NULL,
        deltas       TEXT NOT NULL
    );
    CREATE INDEX responses_created ON responses (created_at);",
    // 9 (LoRA adapters): registered adapters.
    "CREATE TABLE adapters (
        id         TEXT PRIMARY KEY,
        name       TEXT NOT NULL,
        base_model TEXT NOT NULL,
        rank       INTEGER NOT NULL,
        alpha      REAL NOT NULL,
        path       TEXT NOT NULL,
        format     TEXT NOT NULL,
        file       TEXT NOT NULL,
        digest     TEXT NOT NULL,
        created_at INTEGER NOT NULL
    );",
];

/// Request-log rows kept; older ones live on only in the lifetime totals.
pub const MAX_REQUEST_LOG: i64 = 100_000;

/// A database failure.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// SQLite reported an error.
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The blocking task running the query failed.
    #[error("database task failed: {0}")]
    Task(String),
    /// The database was written by a newer SwarmLLM.
    #[error("database schema version {found} is newer than this build supports ({supported})")]
    TooNew {
        /// Version in the file.
        found: i64,
        /// Newest version this build knows.
        supported: i64,
    },
}

/// One completed inference request, as kept in `request_log`.
#[derive(Debug, Clone)]
pub struct RequestRecord {
    /// Request id.
    pub id: String,
    /// The API route that served it.
    pub endpoint: String,
    /// Model id.
    pub model: String,
    /// Prompt tokens.
    pub prompt_tokens: u32,
    /// Generated tokens.
    pub completion_tokens: u32,
    /// `stop`, `length`, `cancelled` or `error`.
    pub finish_reason: String,
    /// Time spent waiting for the engine.
    pub queue_ms: u64,
    /// Time spent in the engine.
    pub inference_ms: u64,
    /// Wall time of the whole request.
    pub total_ms: u64,
}

/// Lifetime totals derived from `request_log`.
#[derive(Debug, Clone, Copy, Default)]
pub struct RequestTotals {
    /// Requests served.
    pub requests: u64,
    /// Tokens generated.
    pub completion_tokens: u64,
    /// Prompt tokens processed.
    pub prompt_tokens: u64,
}

/// Handle to the database; cheap to clone.
#[derive(Clone)]
pub struct Store {
    conn: Arc<Mutex<Connection>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").finish_non_exhaustive()
    }
}

impl Store {
    /// Opens (creating if needed) the database at `path` and migrates it.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let conn = Connection::open(path)?;
        Self::init(conn)
    }

    /// An in-memory database (tests).
    pub fn open_in_memory() -> Result<Self, StoreError> {
        Self::init(Connection::open_in_memory()?)
    }

    fn init(mut conn: Connection) -> Result<Self, StoreError> {
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        // WAL: readers never block the writer; NORMAL sync is durable across
        // application crashes (only an OS crash can lose the last transaction).
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        migrate(&mut conn)?;
        Ok(Self {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave SQLite inconsistent (every
        // multi-statement write is a transaction), so a poisoned lock is still usable.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` on the connection (for domain modules that keep their own SQL).
    pub(crate) fn with_conn<T>(
        &self,
        f: impl FnOnce(&mut Connection) -> rusqlite::Result<T>,
    ) -> Result<T, StoreError> {
        Ok(f(&mut self.conn())?)
    }

    /// Schema version of the open database.
    pub fn schema_version(&self) -> Result<i64, StoreError> {
        Ok(self
            .conn()
            .pragma_query_value(None, "user_version", |r| r.get(0))?)
    }

    /// Reads a setting.
    pub fn setting(&self, key: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .conn()
            .query_row("SELECT value FROM settings WHERE key = ?1", [key], |r| {
                r.get(0)
            })
            .optional()?)
    }

    /// Writes a setting, or deletes it when `value` is `None`.
    pub fn set_setting(&self, key: &str, value: Option<&str>) -> Result<(), StoreError> {
        let conn = self.conn();
        match value {
            Some(v) => conn.execute(
                "INSERT INTO settings (key, value, updated_at) VALUES (?1, ?2, ?3)
                 ON CONFLICT(key) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
                params![key, v, now_unix()],
            )?,
            None => conn.execute("DELETE FROM settings WHERE key = ?1", [key])?,
        };
        Ok(())
    }

    /// Appends finished requests in one transaction. Beyond [`MAX_REQUEST_LOG`]
    /// rows the oldest are folded into the lifetime totals and dropped.
    pub fn record_requests(&self, records: &[RequestRecord]) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        {
            let mut stmt = tx.prepare_cached(
                "INSERT OR IGNORE INTO request_log (id, endpoint, model, prompt_tokens,
                 completion_tokens, finish_reason, queue_ms, inference_ms, total_ms, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            )?;
            let now = now_unix();
            for r in records {
                stmt.execute(params![
                    r.id,
                    r.endpoint,
                    r.model,
                    r.prompt_tokens,
                    r.completion_tokens,
                    r.finish_reason,
                    r.queue_ms as i64,
                    r.inference_ms as i64,
                    r.total_ms as i64,
                    now
                ])?;
            }
        }
        let rows: i64 = tx.query_row("SELECT COUNT(*) FROM request_log", [], |r| r.get(0))?;
        if rows > MAX_REQUEST_LOG {
            let oldest = "SELECT id FROM request_log ORDER BY created_at, id LIMIT ?1";
            tx.execute(
                &format!(
                    "UPDATE request_totals SET
                         requests = requests + (SELECT COUNT(*) FROM request_log WHERE id IN ({oldest})),
                         completion_tokens = completion_tokens + (SELECT COALESCE(SUM(completion_tokens), 0)
                             FROM request_log WHERE id IN ({oldest})),
                         prompt_tokens = prompt_tokens + (SELECT COALESCE(SUM(prompt_tokens), 0)
                             FROM request_log WHERE id IN ({oldest}))
                     WHERE id = 1"
                ),
                [rows - MAX_REQUEST_LOG],
            )?;
            tx.execute(
                &format!("DELETE FROM request_log WHERE id IN ({oldest})"),
                [rows - MAX_REQUEST_LOG],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Lifetime totals of the request log.
    pub fn request_totals(&self) -> Result<RequestTotals, StoreError> {
        Ok(self.conn().query_row(
            "SELECT COUNT(l.id) + t.requests, COALESCE(SUM(l.completion_tokens), 0) + t.completion_tokens,
                    COALESCE(SUM(l.prompt_tokens), 0) + t.prompt_tokens
             FROM request_totals t LEFT JOIN request_log l ON 1 = 1 WHERE t.id = 1",
            [],
            |r| {
                Ok(RequestTotals {
                    requests: r.get::<_, i64>(0)? as u64,
                    completion_tokens: r.get::<_, i64>(1)? as u64,
                    prompt_tokens: r.get::<_, i64>(2)? as u64,
                })
            },
        )?)
    }
}

fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let current: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    let supported = MIGRATIONS.len() as i64;
    if current > supported {
        return Err(StoreError::TooNew {
            found: current,
            supported,
        });
    }
    for (index, sql) in MIGRATIONS.iter().enumerate().skip(current as usize) {
        // Each migration and its version bump commit together or not at all.
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", index as i64 + 1)?;
        tx.commit()?;
        tracing::debug!(version = index + 1, "applied database migration");
    }
    Ok(())
}

pub(crate) fn now_unix() -> i64 {
    chrono::Utc::now().timestamp()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrates_to_latest_and_is_idempotent() -> Result<(), StoreError> {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("node.db");
        let store = Store::open(&path)?;
        assert_eq!(store.schema_version()?, MIGRATIONS.len() as i64);
        drop(store);
        let store = Store::open(&path)?;
        assert_eq!(store.schema_version()?, MIGRATIONS.len() as i64);
        Ok(())
    }

    #[test]
    fn refuses_newer_schema() -> Result<(), StoreError> {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("node.db");
        drop(Store::open(&path)?);
        let conn = Connection::open(&path)?;
        conn.pragma_update(None, "user_version", 999)?;
        drop(conn);
        assert!(matches!(Store::open(&path), Err(StoreError::TooNew { .. })));
        Ok(())
    }

    #[test]
    fn settings_round_trip_and_delete() -> Result<(), StoreError> {
        let store = Store::open_in_memory()?;
        assert_eq!(store.setting("nickname")?, None);
        store.set_setting("nickname", Some("a"))?;
        store.set_setting("nickname", Some("b"))?;
        assert_eq!(store.setting("nickname")?.as_deref(), Some("b"));
        store.set_setting("nickname", None)?;
        assert_eq!(store.setting("nickname")?, None);
        Ok(())
    }

    #[test]
    fn request_log_totals() -> Result<(), StoreError> {
        let store = Store::open_in_memory()?;
        let rec = |id: &str, n| RequestRecord {
            id: id.into(),
            endpoint: "/v1/completions".into(),
            model: "m".into(),
            prompt_tokens: 3,
            completion_tokens: n,
            finish_reason: "stop".into(),
            queue_ms: 0,
            inference_ms: 1,
            total_ms: 1,
        };
        store.record_requests(&[rec("a", 5), rec("b", 7)])?;
        let t = store.request_totals()?;
        assert_eq!(
            (t.requests, t.completion_tokens, t.prompt_tokens),
            (2, 12, 6)
        );
        // Past the cap the oldest rows fold into the totals: nothing is lost.
        let many: Vec<RequestRecord> = (0..MAX_REQUEST_LOG + 8)
            .map(|i| rec(&format!("r{i}"), 1))
            .collect();
        store.record_requests(&many)?;
        let rows: i64 = store
            .with_conn(|c| c.query_row("SELECT COUNT(*) FROM request_log", [], |r| r.get(0)))?;
        assert_eq!(rows, MAX_REQUEST_LOG);
        let t = store.request_totals()?;
        let n = MAX_REQUEST_LOG as u64 + 10;
        assert_eq!(
            (t.requests, t.completion_tokens, t.prompt_tokens),
            (n, 12 + n - 2, 3 * n)
        );
        Ok(())
    }
}
