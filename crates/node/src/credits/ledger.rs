//! The ledger's SQLite side: entries, cached totals, queued pool forwards.
//!
//! `credit_entries` is the record; `credit_totals` caches this node's earned and
//! spent sums so a balance is one row read. Both change in one transaction, so a
//! crash (even `kill -9` mid-write) leaves either both or neither, and
//! [`Ledger::verify`] recomputes the totals from the entries to prove it.

use std::time::Duration;

use rusqlite::{OptionalExtension, params};
use serde::Serialize;

use super::{Entry, EntryError};
use crate::store::{Store, StoreError};

/// Test hook: milliseconds to pause inside a credit write's transaction, so a
/// test can kill the process mid-write. Never set in production.
const PAUSE_ENV: &str = "SWARMLLM_TEST_CREDIT_WRITE_PAUSE_MS";

/// A message queued with an entry, delivered until its recipient confirms it.
enum Queued<'a> {
    /// A pool forward: (its id, the owner, the payer-signed forward).
    Forward(&'a str, &'a str, &'a Entry),
    /// The settle of the recorded receipt, to this hop.
    Settle(&'a str),
}

/// What recording an entry did.
enum Outcome {
    Inserted,
    /// The same entry was already recorded.
    Duplicate,
    /// Another entry with the same id was recorded.
    Conflict,
    /// The totals would overflow.
    Overflow,
}

/// A ledger operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LedgerError {
    /// The entry does not verify or is not acceptable.
    #[error(transparent)]
    Entry(#[from] EntryError),
    /// The entry concerns two other nodes.
    #[error("credit entry {0} names neither this node as payer nor as payee")]
    NotOurs(String),
    /// An entry with the same id but different content is already recorded.
    #[error("credit entry {0} conflicts with a recorded entry of the same id")]
    Conflict(String),
    /// Recording the entry would overflow this node's 64-bit totals.
    #[error("credit entry {0} would overflow the ledger's totals")]
    Overflow(String),
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<rusqlite::Error> for LedgerError {
    fn from(e: rusqlite::Error) -> Self {
        LedgerError::Store(StoreError::Sqlite(e))
    }
}

/// This node's totals, in micro-credits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Balance {
    /// Received (work served, transfers and forwards in).
    pub earned: i64,
    /// Paid (work requested, transfers and forwards out).
    pub spent: i64,
    /// Entries recorded.
    pub entries: i64,
}

impl Balance {
    /// `earned − spent`.
    pub fn balance(&self) -> i64 {
        self.earned - self.spent
    }
}

/// One entry as this node sees it.
#[derive(Debug, Clone, Serialize)]
pub struct Transaction {
    /// Entry id.
    pub id: String,
    /// `receipt`, `transfer` or `pool_forward`.
    pub kind: String,
    /// From this node's side: `reward`, `spend`, `send`, `receive`,
    /// `pool_forward` (out) or `pool_income` (in).
    pub r#type: String,
    /// Signed micro-credits (negative when this node paid).
    pub amount: i64,
    /// The other node.
    pub counterparty: String,
    /// Unix seconds.
    pub created_at: i64,
    /// The dual-signed entry.
    pub entry: Entry,
}

/// The result of re-checking the whole ledger.
#[derive(Debug, Clone, Serialize)]
pub struct Verification {
    /// Entries checked.
    pub entries: i64,
    /// Ids whose signatures or content do not verify.
    pub invalid: Vec<String>,
    /// Totals recomputed from the entries.
    pub recomputed: Balance,
    /// Totals as cached.
    pub stored: Balance,
    /// Whether the cache equals the recomputation.
    pub totals_match: bool,
}

/// The ledger over the node's store.
#[derive(Debug, Clone)]
pub struct Ledger {
    store: Store,
    node_id: String,
    pause: Option<Duration>,
}

impl Ledger {
    /// The ledger of node `node_id`.
    pub fn new(store: Store, node_id: String) -> Self {
        // Only builds with the `test-hooks` feature read the variable.
        let pause = std::env::var(PAUSE_ENV)
            .ok()
            .filter(|_| cfg!(feature = "test-hooks"))
            .and_then(|v| v.parse::<u64>().ok())
            .filter(|ms| *ms > 0)
            .map(Duration::from_millis);
        Ledger {
            store,
            node_id,
            pause,
        }
    }

    /// Records a dual-signed entry; `Ok(false)` if it was already recorded.
    pub fn record(&self, entry: &Entry) -> Result<bool, LedgerError> {
        self.record_queued(entry, None)
    }

    /// Records a receipt this node paid and, in the same transaction, queues its
    /// settle for `hop` until the hop confirms it ([`Ledger::settled`]): both
    /// ledgers end up with the entry even if the first settle is lost.
    pub fn record_settle(&self, entry: &Entry, hop: &str) -> Result<bool, LedgerError> {
        self.record_queued(entry, Some(Queued::Settle(hop)))
    }

    /// Receipts whose settle has not been confirmed: (id, hop, entry). Settles
    /// a hop has not taken within a week are given up (the receipt stays here).
    pub fn pending_settles(&self) -> Result<Vec<(String, String, Entry)>, LedgerError> {
        let week_ago = chrono::Utc::now().timestamp() - 7 * 24 * 3600;
        self.store.with_conn(|conn| {
            conn.execute(
                "DELETE FROM credit_pending_settles WHERE created_at < ?1",
                [week_ago],
            )
        })?;
        self.queued("SELECT id, node, entry FROM credit_pending_settles ORDER BY created_at")
    }

    /// The hop confirmed (or refused for good) the settle of receipt `id`.
    pub fn settled(&self, id: &str) -> Result<(), LedgerError> {
        self.store.with_conn(|conn| {
            conn.execute("DELETE FROM credit_pending_settles WHERE id = ?1", [id])
        })?;
        Ok(())
    }

    fn queued(&self, sql: &str) -> Result<Vec<(String, String, Entry)>, LedgerError> {
        Ok(self
            .store
            .with_conn(|conn| {
                let mut stmt = conn.prepare(sql)?;
                stmt.query_map([], |r| {
                    let text: String = r.get(2)?;
                    Ok((r.get(0)?, r.get(1)?, text))
                })?
                .collect::<rusqlite::Result<Vec<(String, String, String)>>>()
            })?
            .into_iter()
            .filter_map(|(id, to, text)| Some((id, to, serde_json::from_str(&text).ok()?)))
            .collect())
    }

    /// Records `entry` and, in the same transaction, queues `forward` (its id,
    /// the pool owner, the payer-signed forward) for delivery.
    pub fn record_with_forward(
        &self,
        entry: &Entry,
        forward: Option<(&str, &str, &Entry)>,
    ) -> Result<bool, LedgerError> {
        self.record_queued(
            entry,
            forward.map(|(id, owner, fwd)| Queued::Forward(id, owner, fwd)),
        )
    }

    fn record_queued(&self, entry: &Entry, queue: Option<Queued<'_>>) -> Result<bool, LedgerError> {
        let body = entry.verify()?;
        if body.payer != self.node_id && body.payee != self.node_id {
            return Err(LedgerError::NotOurs(body.id));
        }
        let outcome = self.store.with_conn(|conn| {
            // A credit write must survive a power cut, not only a crash: FULL
            // syncs the WAL at each commit (the rest of the store keeps NORMAL).
            conn.pragma_update(None, "synchronous", "FULL")?;
            let outcome = self.insert(conn, entry, &body, queue);
            conn.pragma_update(None, "synchronous", "NORMAL")?;
            outcome
        })?;
        match outcome {
            Outcome::Inserted => Ok(true),
            Outcome::Duplicate => Ok(false),
            Outcome::Conflict => Err(LedgerError::Conflict(body.id)),
            Outcome::Overflow => Err(LedgerError::Overflow(body.id)),
        }
    }

    /// Inserts `entry` and updates the totals in one transaction; nothing is
    /// written unless the outcome is [`Outcome::Inserted`].
    fn insert(
        &self,
        conn: &mut rusqlite::Connection,
        entry: &Entry,
        body: &super::Body,
        queue: Option<Queued<'_>>,
    ) -> rusqlite::Result<Outcome> {
        let tx = conn.transaction()?;
        let existing: Option<String> = tx
            .query_row(
                "SELECT body FROM credit_entries WHERE id = ?1",
                [&body.id],
                |r| r.get(0),
            )
            .optional()?;
        if let Some(existing) = existing {
            return Ok(if existing == entry.body {
                Outcome::Duplicate
            } else {
                Outcome::Conflict
            });
        }
        tx.execute(
            "INSERT INTO credit_entries
               (id, kind, payer, payee, amount, created_at, body, payer_sig, payee_sig)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            params![
                body.id,
                body.kind.as_str(),
                body.payer,
                body.payee,
                body.amount,
                body.timestamp,
                entry.body,
                entry.payer_sig,
                entry.payee_sig
            ],
        )?;
        if let Some(pause) = self.pause {
            tracing::warn!("credit write paused inside its transaction ({PAUSE_ENV}, a test hook)");
            std::thread::sleep(pause);
        }
        let (earned, spent) = if body.payee == self.node_id {
            (body.amount, 0)
        } else {
            (0, body.amount)
        };
        // SQLite turns an overflowing integer sum into a float: the update runs
        // only while both totals stay within 64 bits, and a refused one rolls
        // the whole entry back.
        let updated = tx.execute(
            "INSERT INTO credit_totals (node_id, earned, spent, entries) VALUES (?1, ?2, ?3, 1)
             ON CONFLICT(node_id) DO UPDATE SET earned = earned + ?2, spent = spent + ?3,
                 entries = entries + 1
             WHERE earned <= 9223372036854775807 - ?2 AND spent <= 9223372036854775807 - ?3",
            params![self.node_id, earned, spent],
        )?;
        if updated != 1 {
            return Ok(Outcome::Overflow);
        }
        // A forward this entry settles is no longer pending.
        tx.execute(
            "DELETE FROM credit_pending_forwards WHERE id = ?1",
            [&body.id],
        )?;
        match queue {
            Some(Queued::Forward(id, owner, fwd)) => {
                tx.execute(
                    "INSERT OR IGNORE INTO credit_pending_forwards (id, owner, entry, created_at)
                     VALUES (?1, ?2, ?3, ?4)",
                    params![
                        id,
                        owner,
                        serde_json::to_string(fwd).unwrap_or_default(),
                        body.timestamp
                    ],
                )?;
            }
            Some(Queued::Settle(hop)) => {
                tx.execute(
                    "INSERT OR IGNORE INTO credit_pending_settles (id, node, entry, created_at)
                     VALUES (?1, ?2, ?3, ?4)",
                    params![
                        body.id,
                        hop,
                        serde_json::to_string(entry).unwrap_or_default(),
                        chrono::Utc::now().timestamp()
                    ],
                )?;
            }
            None => {}
        }
        tx.commit()?;
        Ok(Outcome::Inserted)
    }

    /// This node's cached totals.
    pub fn balance(&self) -> Result<Balance, LedgerError> {
        Ok(self.store.with_conn(|conn| {
            conn.query_row(
                "SELECT earned, spent, entries FROM credit_totals WHERE node_id = ?1",
                [&self.node_id],
                balance_row,
            )
            .optional()
            .map(Option::unwrap_or_default)
        })?)
    }

    /// This node's totals summed from the entries in SQL, without checking
    /// signatures (see [`Ledger::verify`]): cheap enough for every start.
    pub fn recomputed(&self) -> Result<Balance, LedgerError> {
        Ok(self.store.with_conn(|conn| {
            conn.query_row(
                "SELECT COALESCE(SUM(CASE WHEN payee = ?1 THEN amount END), 0),
                        COALESCE(SUM(CASE WHEN payer = ?1 THEN amount END), 0),
                        COUNT(*)
                 FROM credit_entries",
                [&self.node_id],
                balance_row,
            )
        })?)
    }

    /// Entries, newest first, with the total count.
    pub fn transactions(
        &self,
        limit: usize,
        offset: usize,
    ) -> Result<(Vec<Transaction>, i64), LedgerError> {
        let me = self.node_id.clone();
        Ok(self.store.with_conn(|conn| {
            let total: i64 =
                conn.query_row("SELECT COUNT(*) FROM credit_entries", [], |r| r.get(0))?;
            let mut stmt = conn.prepare(
                "SELECT id, kind, payer, payee, amount, created_at, body, payer_sig, payee_sig
                 FROM credit_entries ORDER BY created_at DESC, rowid DESC LIMIT ?1 OFFSET ?2",
            )?;
            let rows = stmt
                .query_map(params![limit as i64, offset as i64], |r| {
                    let kind: String = r.get(1)?;
                    let payer: String = r.get(2)?;
                    let payee: String = r.get(3)?;
                    let amount: i64 = r.get(4)?;
                    let paid = payer == me;
                    let r#type = match (kind.as_str(), paid) {
                        ("receipt", false) => "reward",
                        ("receipt", true) => "spend",
                        ("transfer", true) => "send",
                        ("transfer", false) => "receive",
                        ("pool_forward", true) => "pool_forward",
                        _ => "pool_income",
                    };
                    Ok(Transaction {
                        id: r.get(0)?,
                        kind,
                        r#type: r#type.into(),
                        amount: if paid { -amount } else { amount },
                        counterparty: if paid { payee } else { payer },
                        created_at: r.get(5)?,
                        entry: Entry {
                            body: r.get(6)?,
                            payer_sig: r.get(7)?,
                            payee_sig: r.get(8)?,
                        },
                    })
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok((rows, total))
        })?)
    }

    /// The recorded entry `id`.
    pub fn entry(&self, id: &str) -> Result<Option<Entry>, LedgerError> {
        Ok(self.store.with_conn(|conn| {
            conn.query_row(
                "SELECT body, payer_sig, payee_sig FROM credit_entries WHERE id = ?1",
                [id],
                |r| {
                    Ok(Entry {
                        body: r.get(0)?,
                        payer_sig: r.get(1)?,
                        payee_sig: r.get(2)?,
                    })
                },
            )
            .optional()
        })?)
    }

    /// Re-verifies every entry's signatures and recomputes the totals.
    pub fn verify(&self) -> Result<Verification, LedgerError> {
        let (entries, _) = self.transactions(usize::MAX >> 1, 0)?;
        let mut recomputed = Balance::default();
        let mut invalid = Vec::new();
        for t in &entries {
            match t.entry.verify() {
                Ok(body)
                    if body.id == t.id
                        && (body.payer == self.node_id || body.payee == self.node_id) =>
                {
                    recomputed.entries += 1;
                    if body.payee == self.node_id {
                        recomputed.earned += body.amount;
                    } else {
                        recomputed.spent += body.amount;
                    }
                }
                _ => invalid.push(t.id.clone()),
            }
        }
        let stored = self.balance()?;
        Ok(Verification {
            entries: entries.len() as i64,
            invalid,
            recomputed,
            stored,
            totals_match: recomputed == stored,
        })
    }

    /// Forwards waiting for the pool owner: (id, owner, payer-signed entry).
    pub fn pending_forwards(&self) -> Result<Vec<(String, String, Entry)>, LedgerError> {
        self.queued("SELECT id, owner, entry FROM credit_pending_forwards ORDER BY created_at")
    }

    /// Micro-credits this node received in entries made at or after `since`
    /// (Unix seconds).
    pub fn earned_since(&self, since: i64) -> Result<i64, LedgerError> {
        Ok(self.store.with_conn(|conn| {
            conn.query_row(
                "SELECT COALESCE(SUM(amount), 0) FROM credit_entries
                 WHERE payee = ?1 AND created_at >= ?2",
                params![self.node_id, since],
                |r| r.get(0),
            )
        })?)
    }

    /// Micro-credits queued for the pool owner.
    pub fn pending_total(&self) -> Result<i64, LedgerError> {
        let pending = self.pending_forwards()?;
        Ok(pending
            .iter()
            .filter_map(|(_, _, e)| e.body().ok())
            .map(|b| b.amount)
            .sum())
    }

    /// Drops a queued forward the owner refused for good.
    pub fn drop_forward(&self, id: &str) -> Result<(), LedgerError> {
        self.store.with_conn(|conn| {
            conn.execute("DELETE FROM credit_pending_forwards WHERE id = ?1", [id])
        })?;
        Ok(())
    }
}

/// A `(earned, spent, entries)` row as a [`Balance`].
fn balance_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Balance> {
    Ok(Balance {
        earned: r.get(0)?,
        spent: r.get(1)?,
        entries: r.get(2)?,
    })
}

#[cfg(test)]
mod tests {
    use super::super::{Body, Kind, Party};
    use super::*;
    use crate::identity::Identity;

    fn transfer(a: &Identity, b: &Identity, id: &str, amount: i64) -> Entry {
        let body = Body {
            kind: Kind::Transfer,
            id: id.into(),
            payer: a.node_id(),
            payee: b.node_id(),
            amount,
            timestamp: 1000,
            memo: None,
            work: None,
            rates: None,
            source: None,
        };
        let mut e = Entry::new(&body, a, Party::Payer);
        e.sign(b, Party::Payee);
        e
    }

    #[test]
    fn amounts_are_bounded_and_totals_never_overflow() {
        let (me, other) = (Identity::generate(), Identity::generate());
        let store = Store::open_in_memory().expect("db");
        let ledger = Ledger::new(store.clone(), me.node_id());
        for bad in [0, -1, super::super::MAX_AMOUNT + 1, i64::MAX] {
            assert!(
                matches!(
                    ledger.record(&transfer(&other, &me, &format!("bad{bad}"), bad)),
                    Err(LedgerError::Entry(_))
                ),
                "{bad}"
            );
        }
        // Totals one entry away from overflowing 64 bits refuse the entry, and
        // write nothing.
        store
            .with_conn(|c| {
                c.execute(
                    "INSERT INTO credit_totals (node_id, earned, spent, entries)
                     VALUES (?1, ?2, 0, 1)",
                    params![me.node_id(), i64::MAX - 10],
                )
            })
            .expect("seed totals");
        assert!(matches!(
            ledger.record(&transfer(&other, &me, "big", 11)),
            Err(LedgerError::Overflow(_))
        ));
        let b = ledger.balance().expect("balance");
        assert_eq!((b.earned, b.entries), (i64::MAX - 10, 1));
        assert!(
            ledger
                .record(&transfer(&other, &me, "fits", 10))
                .expect("fits")
        );
        assert_eq!(ledger.balance().expect("balance").earned, i64::MAX);
    }

    #[test]
    fn a_paid_receipts_settle_stays_queued_until_confirmed() {
        let (me, hop) = (Identity::generate(), Identity::generate());
        let ledger = Ledger::new(Store::open_in_memory().expect("db"), me.node_id());
        let receipt = transfer(&me, &hop, "r1", 40);
        assert!(
            ledger
                .record_settle(&receipt, &hop.node_id())
                .expect("recorded")
        );
        let pending = ledger.pending_settles().expect("pending");
        assert_eq!(pending.len(), 1);
        assert_eq!(
            (pending[0].0.as_str(), pending[0].1.clone()),
            ("r1", hop.node_id())
        );
        assert_eq!(pending[0].2, receipt);
        ledger.settled("r1").expect("settled");
        assert!(ledger.pending_settles().expect("pending").is_empty());
        assert_eq!(ledger.balance().expect("balance").spent, 40);
    }

    #[test]
    fn balances_come_from_entries_and_reverify() {
        let (me, other) = (Identity::generate(), Identity::generate());
        let ledger = Ledger::new(Store::open_in_memory().expect("db"), me.node_id());
        assert!(
            ledger
                .record(&transfer(&other, &me, "a", 700))
                .expect("recorded")
        );
        assert!(
            ledger
                .record(&transfer(&me, &other, "b", 200))
                .expect("recorded")
        );
        // The same entry again is not counted twice.
        assert!(!ledger.record(&transfer(&me, &other, "b", 200)).expect("ok"));
        // Same id, other content: refused.
        assert!(matches!(
            ledger.record(&transfer(&me, &other, "b", 201)),
            Err(LedgerError::Conflict(_))
        ));
        // Tampered: refused, nothing written.
        let mut t = transfer(&other, &me, "c", 5);
        t.body = t.body.replace("\"amount\":5", "\"amount\":5000");
        assert!(matches!(ledger.record(&t), Err(LedgerError::Entry(_))));
        // Not ours.
        let third = Identity::generate();
        assert!(matches!(
            ledger.record(&transfer(&other, &third, "d", 5)),
            Err(LedgerError::NotOurs(_))
        ));
        let b = ledger.balance().expect("balance");
        assert_eq!(
            (b.earned, b.spent, b.entries, b.balance()),
            (700, 200, 2, 500)
        );
        let v = ledger.verify().expect("verify");
        assert!(v.totals_match && v.invalid.is_empty());
        assert_eq!(ledger.recomputed().expect("sums"), b);
        let (txs, total) = ledger.transactions(10, 0).expect("list");
        assert_eq!(total, 2);
        assert_eq!(txs.iter().map(|t| t.amount).sum::<i64>(), 500);
        assert!(txs.iter().any(|t| t.r#type == "send" && t.amount == -200));
    }
}
