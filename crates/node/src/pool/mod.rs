//! Device pools ("My Devices"): a user's own devices linked under one owner.
//!
//! This is the owner's local side: creating a pool, one-time invite codes, the
//! member list and the rate limit on pool operations, all in SQLite. Codes are 8
//! characters from a 32-character alphabet without 0/O/1/I, drawn from the OS
//! CSPRNG; only their BLAKE3 hash is stored (and, once joining over gossip lands,
//! sent), each works once and for 24 hours, and at most 5 are active per pool.
//! [`Pools::redeem`] is the owner's check of a join request's code hash.

mod gossip;

pub use gossip::ReceivedInvitation;
pub(crate) use gossip::decode_message;

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use rand::Rng;
use rusqlite::{OptionalExtension, params};
use serde::Serialize;

use crate::store::{Store, StoreError};

/// The invite-code alphabet: A–Z and 2–9 without the look-alikes 0, O, 1 and I.
pub const CODE_ALPHABET: &[u8; 32] = b"ABCDEFGHJKLMNPQRSTUVWXYZ23456789";
/// Characters in a code.
pub const CODE_LEN: usize = 8;
/// How long a code works.
pub const CODE_TTL_SECS: i64 = 24 * 3600;
/// Active (unused, unexpired) codes a pool may have.
pub const MAX_ACTIVE_CODES: usize = 5;
/// Pool operations a node may make per hour.
pub const OPS_PER_HOUR: usize = 10;
/// Characters of a code that travel in the clear, so its owner can find the
/// join meant for it (the rest is only ever used as a SPAKE2 password).
pub const NAMEPLATE_LEN: usize = 2;
/// Joins one code may be tried with (each costs the code an attempt; a guesser
/// gets this many online guesses and no offline ones).
pub const CODE_ATTEMPTS: i64 = 5;
/// Devices per pool unless configured otherwise.
pub const DEFAULT_MAX_DEVICES: u32 = 10;

/// Unix seconds; tests substitute their own.
pub type Clock = Arc<dyn Fn() -> i64 + Send + Sync>;

/// A pool operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PoolError {
    /// This node is already in a pool.
    #[error("this device is already in pool '{0}'; leave it first")]
    AlreadyInPool(String),
    /// This node is in no pool.
    #[error("this device is not in a pool")]
    NotInPool,
    /// Only the owner may do this.
    #[error("only the pool's owner can do this")]
    NotOwner,
    /// The pool has its maximum of active codes.
    #[error(
        "the pool already has {MAX_ACTIVE_CODES} active invite codes; use or let one expire first"
    )]
    TooManyCodes,
    /// More than [`OPS_PER_HOUR`] operations in the last hour.
    #[error("too many pool operations; try again in {retry_after} s")]
    RateLimited {
        /// Seconds until the next operation is allowed.
        retry_after: i64,
    },
    /// A name or code that is not acceptable.
    #[error("{0}")]
    Invalid(String),
    /// A code that no pool of this node issued.
    #[error("unknown invite code")]
    UnknownCode,
    /// A code that was already used.
    #[error("this invite code was already used")]
    CodeUsed,
    /// A code past its 24 hours.
    #[error("this invite code has expired")]
    CodeExpired,
    /// No pool of this node has that id.
    #[error("no pool '{0}' on this device")]
    UnknownPool(String),
    /// The pool has its maximum of devices.
    #[error("the pool is full ({0} devices)")]
    Full(u32),
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<rusqlite::Error> for PoolError {
    fn from(e: rusqlite::Error) -> Self {
        PoolError::Store(StoreError::Sqlite(e))
    }
}

/// One device of a pool.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Member {
    /// Node id.
    pub node_id: String,
    /// Its device name.
    pub device_name: Option<String>,
    /// `owner` or `member`.
    pub role: String,
    /// Unix seconds.
    pub joined_at: i64,
    /// The device has signed its acceptance (an invited device that has not
    /// yet is listed with `false`).
    pub accepted: bool,
    /// The owner's contribution-level override (0–100), if set.
    pub contribution: Option<u32>,
}

/// Private mode: prompts are served only through this node and its pool's
/// devices (plus LAN peers with `allow_lan`); `offline_mode` also keeps the node
/// off the wider network (mDNS only, from the next start).
#[derive(Debug, Clone, Copy, Default, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct PrivateMode {
    /// Routes use pool devices only.
    pub enabled: bool,
    /// Peers on the same LAN count as pool devices.
    pub allow_lan: bool,
    /// No bootstrap, no saved seeds: mDNS discovery only.
    pub offline_mode: bool,
}

/// A shard pin: the owner assigns a model (or some of its shards) to a device,
/// which fetches them and never deletes them while pinned.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct Pin {
    /// Model id.
    pub model_id: String,
    /// The device that holds it.
    pub target_node_id: String,
    /// Shards pinned; empty means all.
    pub shard_indices: Vec<u32>,
}

impl Pin {
    /// Whether shard `index` is pinned.
    pub fn covers(&self, index: u32) -> bool {
        self.shard_indices.is_empty() || self.shard_indices.contains(&index)
    }
}

/// `GET /api/pool/state`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PoolState {
    /// Whether this node is in a pool.
    pub in_pool: bool,
    /// Pool id.
    pub pool_id: Option<String>,
    /// Pool name.
    pub name: Option<String>,
    /// The owner's node id.
    pub owner_node_id: Option<String>,
    /// This node's role (`owner`, `member`).
    pub role: Option<String>,
    /// Percentage of earnings members keep (0–50).
    pub credit_split_pct: Option<u32>,
    /// Devices allowed.
    pub max_devices: Option<u32>,
    /// The devices.
    pub members: Vec<Member>,
    /// Unused, unexpired invite codes (their count; the codes are never stored).
    pub active_codes: usize,
}

/// This node's pool row: id, name, owner node id, this node's role, credit split,
/// device limit.
type PoolRow = (String, String, String, String, u32, u32);

/// Cloneable handle to this node's pool records.
#[derive(Clone)]
pub struct Pools {
    store: Store,
    node_id: String,
    clock: Clock,
    max_devices: u32,
    net: Arc<OnceLock<gossip::PoolNet>>,
    pinned: Arc<OnceLock<tokio::sync::mpsc::UnboundedSender<Pin>>>,
}

/// What the owner tells a device whose code it redeemed.
#[derive(Debug, Clone)]
pub struct Invitation {
    /// Pool id.
    pub pool_id: String,
    /// Pool name.
    pub pool_name: String,
    /// The invitation the device signs to accept.
    pub invitation_id: String,
}

impl std::fmt::Debug for Pools {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pools")
            .field("node_id", &self.node_id)
            .finish()
    }
}

/// The BLAKE3 hash (hex) of a code, as stored and sent.
pub fn code_hash(code: &str) -> String {
    blake3::hash(code.as_bytes()).to_hex().to_string()
}

/// The public part of a code (its first [`NAMEPLATE_LEN`] characters).
pub fn nameplate(code: &str) -> &str {
    code.get(..NAMEPLATE_LEN).unwrap_or(code)
}

/// A code a join may be for, as the owner sees it.
#[derive(Debug, Clone)]
pub(crate) struct Candidate {
    /// The code's hash (the SPAKE2 password).
    pub(crate) code_hash: String,
    pub(crate) pool_id: String,
    pub(crate) pool_name: String,
    /// `used`, `expired` or `full`; `None` when the joiner may come in.
    pub(crate) refused: Option<&'static str>,
}

/// A device name as a person typed it: trimmed, 1–64 characters, no control
/// characters (it is shown in every device's list).
fn device_name(name: &str) -> Result<String, PoolError> {
    let name = name.trim();
    if name.is_empty() || name.chars().count() > 64 || name.chars().any(char::is_control) {
        return Err(PoolError::Invalid(
            "the device name must be 1–64 characters, without control characters".into(),
        ));
    }
    Ok(name.to_string())
}

/// Normalises a typed code (trims, upper-cases, drops spaces and dashes) and
/// checks its length and alphabet.
pub fn parse_code(input: &str) -> Result<String, PoolError> {
    let code: String = input
        .chars()
        .filter(|c| !c.is_whitespace() && *c != '-')
        .map(|c| c.to_ascii_uppercase())
        .collect();
    if code.len() != CODE_LEN || !code.bytes().all(|b| CODE_ALPHABET.contains(&b)) {
        return Err(PoolError::Invalid(format!(
            "an invite code is {CODE_LEN} characters from A–Z and 2–9 (no 0, O, 1 or I)"
        )));
    }
    Ok(code)
}

fn new_code() -> String {
    let mut rng = rand::rngs::OsRng;
    (0..CODE_LEN)
        .map(|_| CODE_ALPHABET[rng.gen_range(0..CODE_ALPHABET.len())] as char)
        .collect()
}

impl Pools {
    /// Pool records of node `node_id` in `store`, on the system clock.
    pub fn new(store: Store, node_id: String, max_devices: u32) -> Self {
        Self::with_clock(
            store,
            node_id,
            max_devices,
            Arc::new(|| chrono::Utc::now().timestamp()),
        )
    }

    /// The same with an injected clock (tests).
    pub fn with_clock(store: Store, node_id: String, max_devices: u32, clock: Clock) -> Self {
        Self {
            store,
            node_id,
            clock,
            max_devices: max_devices.max(1),
            net: Arc::new(OnceLock::new()),
            pinned: Arc::new(OnceLock::new()),
        }
    }

    fn now(&self) -> i64 {
        (self.clock)()
    }

    /// Counts one operation against the hourly limit (in the same transaction as
    /// the operation, so a refused operation costs nothing else).
    fn take_op(&self, tx: &rusqlite::Transaction<'_>) -> Result<(), PoolError> {
        let now = self.now();
        tx.execute("DELETE FROM pool_ops WHERE at <= ?1", [now - 3600])?;
        let (count, oldest): (i64, Option<i64>) = tx.query_row(
            "SELECT COUNT(*), MIN(at) FROM pool_ops WHERE node_id = ?1",
            [&self.node_id],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        if count as usize >= OPS_PER_HOUR {
            return Err(PoolError::RateLimited {
                retry_after: (oldest.unwrap_or(now) + 3600 - now).max(1),
            });
        }
        tx.execute(
            "INSERT INTO pool_ops (node_id, at) VALUES (?1, ?2)",
            params![self.node_id, now],
        )?;
        Ok(())
    }

    /// Runs `f` in one transaction: committed when it returns `Ok`, rolled back
    /// when it returns an error (so a refused operation changes nothing).
    fn transact<T>(
        &self,
        f: impl FnOnce(&rusqlite::Transaction<'_>) -> Result<T, PoolError>,
    ) -> Result<T, PoolError> {
        self.store
            .with_conn(|conn| -> rusqlite::Result<Result<T, PoolError>> {
                let tx = conn.transaction()?;
                let out = f(&tx);
                if out.is_ok() {
                    tx.commit()?;
                }
                Ok(out)
            })?
    }

    /// This node's pool, which it must own.
    fn owned_pool(conn: &rusqlite::Connection) -> Result<PoolRow, PoolError> {
        let row = Self::current(conn)?.ok_or(PoolError::NotInPool)?;
        if row.3 != "owner" {
            return Err(PoolError::NotOwner);
        }
        Ok(row)
    }

    fn current(conn: &rusqlite::Connection) -> rusqlite::Result<Option<PoolRow>> {
        conn.query_row(
            "SELECT id, name, owner_node_id, role, credit_split_pct, max_devices FROM pools LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?)),
        )
        .optional()
    }

    /// Creates a pool owned by this node.
    pub fn create(&self, name: &str, device_name: Option<&str>) -> Result<PoolState, PoolError> {
        let name = name.trim();
        if name.is_empty() || name.chars().count() > 64 {
            return Err(PoolError::Invalid(
                "the pool name must be 1–64 characters".into(),
            ));
        }
        let now = self.now();
        self.transact(|tx| {
            if let Some((_, existing, ..)) = Self::current(tx)? {
                return Err(PoolError::AlreadyInPool(existing));
            }
            self.take_op(tx)?;
            let id = uuid::Uuid::new_v4().to_string();
            tx.execute(
                "INSERT INTO pools (id, name, owner_node_id, role, credit_split_pct, max_devices, created_at)
                 VALUES (?1, ?2, ?3, 'owner', 20, ?4, ?5)",
                params![id, name, self.node_id, self.max_devices, now],
            )?;
            tx.execute(
                "INSERT INTO pool_members (pool_id, node_id, device_name, role, joined_at)
                 VALUES (?1, ?2, ?3, 'owner', ?4)",
                params![id, self.node_id, device_name, now],
            )?;
                        Ok(())
        })?;
        self.state()
    }

    /// Issues a one-time invite code (owner only). Returns the code and when it
    /// expires; only its hash and its nameplate (the first characters, unique
    /// among the pool's active codes) are kept.
    pub fn generate_code(&self) -> Result<(String, i64), PoolError> {
        let now = self.now();
        let expires = now + CODE_TTL_SECS;
        self.transact(|tx| {
            let (pool_id, ..) = Self::owned_pool(tx)?;
            // A nameplate names one active code of the pool, so a join finds it.
            let code = loop {
                let code = new_code();
                let taken: i64 = tx.query_row(
                    "SELECT COUNT(*) FROM pool_codes
                     WHERE pool_id = ?1 AND nameplate = ?2 AND used_at IS NULL AND expires_at > ?3",
                    params![pool_id, nameplate(&code), now],
                    |r| r.get(0),
                )?;
                if taken == 0 {
                    break code;
                }
            };
            let hash = code_hash(&code);
            let active: i64 = tx.query_row(
                "SELECT COUNT(*) FROM pool_codes WHERE pool_id = ?1 AND used_at IS NULL AND expires_at > ?2",
                params![pool_id, now],
                |r| r.get(0),
            )?;
            if active as usize >= MAX_ACTIVE_CODES {
                return Err(PoolError::TooManyCodes);
            }
            self.take_op(tx)?;
            tx.execute(
                "INSERT INTO pool_codes (code_hash, pool_id, created_at, expires_at, nameplate)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![hash, pool_id, now, expires, nameplate(&code)],
            )?;
            Ok((code, expires))
        })
    }

    /// The owner's side of a join by code: this pool's recent codes with
    /// `nameplate` that have attempts left, each charged one attempt, with what
    /// a joiner who knows it gets (the pool, or why not). Empty when this node
    /// owns no pool.
    pub(crate) fn join_candidates(&self, nameplate: &str) -> Result<Vec<Candidate>, PoolError> {
        let now = self.now();
        self.transact(|tx| {
            let (pool_id, pool_name, _, _, _, max_devices) = match Self::owned_pool(tx) {
                Ok(row) => row,
                Err(PoolError::NotOwner | PoolError::NotInPool) => return Ok(Vec::new()),
                Err(e) => return Err(e),
            };
            let codes: Vec<(String, i64, Option<i64>)> = {
                let mut stmt = tx.prepare(
                    "SELECT code_hash, expires_at, used_at FROM pool_codes
                     WHERE pool_id = ?1 AND nameplate = ?2 AND attempts < ?3 AND created_at > ?4
                     ORDER BY created_at DESC LIMIT 8",
                )?;
                stmt.query_map(
                    params![pool_id, nameplate, CODE_ATTEMPTS, now - 2 * CODE_TTL_SECS],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                )?
                .collect::<rusqlite::Result<_>>()?
            };
            let members: i64 = tx.query_row(
                "SELECT COUNT(*) FROM pool_members WHERE pool_id = ?1",
                [&pool_id],
                |r| r.get(0),
            )?;
            let mut out = Vec::new();
            for (code_hash, expires, used) in codes {
                tx.execute(
                    "UPDATE pool_codes SET attempts = attempts + 1 WHERE code_hash = ?1",
                    [&code_hash],
                )?;
                let refused = if used.is_some() {
                    Some("used")
                } else if expires <= now {
                    Some("expired")
                } else if members as u32 >= max_devices {
                    Some("full")
                } else {
                    None
                };
                out.push(Candidate {
                    code_hash,
                    pool_id: pool_id.clone(),
                    pool_name: pool_name.clone(),
                    refused,
                });
            }
            Ok(out)
        })
    }

    /// The owner's check of a join request: the code hash must be one of this
    /// pool's, unused and unexpired, and the pool not full. Marks it used and adds
    /// the device, in one transaction.
    pub fn redeem(
        &self,
        hash: &str,
        node_id: &str,
        device_name: Option<&str>,
        invitation_id: &str,
    ) -> Result<Invitation, PoolError> {
        let now = self.now();
        let invitation_id = invitation_id.to_string();
        self.transact(|tx| {
            let (pool_id, pool_name, _, _, _, max_devices) = Self::owned_pool(tx)?;
            let code: Option<(i64, Option<i64>)> = tx
                .query_row(
                    "SELECT expires_at, used_at FROM pool_codes WHERE code_hash = ?1 AND pool_id = ?2",
                    params![hash, pool_id],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()?;
            match code {
                None => return Err(PoolError::UnknownCode),
                Some((_, Some(_))) => return Err(PoolError::CodeUsed),
                Some((expires, None)) if expires <= now => return Err(PoolError::CodeExpired),
                Some(_) => {}
            }
            let members: i64 = tx.query_row(
                "SELECT COUNT(*) FROM pool_members WHERE pool_id = ?1",
                [&pool_id],
                |r| r.get(0),
            )?;
            if members as u32 >= max_devices {
                return Err(PoolError::Full(max_devices));
            }
            tx.execute(
                "UPDATE pool_codes SET used_at = ?1, used_by = ?2 WHERE code_hash = ?3",
                params![now, node_id, hash],
            )?;
            tx.execute(
                "INSERT OR REPLACE INTO pool_members
                 (pool_id, node_id, device_name, role, joined_at, invitation_id)
                 VALUES (?1, ?2, ?3, 'member', ?4, ?5)",
                params![pool_id, node_id, device_name, now, invitation_id],
            )?;
                        Ok(Invitation {
                pool_id,
                pool_name,
                invitation_id,
            })
        })
    }

    /// Invites a device by node id (owner only): the device is listed, not yet
    /// accepted, until it signs the invitation.
    pub fn invite(&self, node_id: &str) -> Result<Invitation, PoolError> {
        if crate::identity::x25519_public(node_id).is_none() {
            return Err(PoolError::Invalid(format!("'{node_id}' is not a node id")));
        }
        let now = self.now();
        let invitation_id = uuid::Uuid::new_v4().to_string();
        self.transact(|tx| {
            let (pool_id, pool_name, _, _, _, max_devices) = Self::owned_pool(tx)?;
            if node_id == self.node_id {
                return Err(PoolError::Invalid(
                    "the owner is already in the pool".into(),
                ));
            }
            let members: i64 = tx.query_row(
                "SELECT COUNT(*) FROM pool_members WHERE pool_id = ?1 AND node_id != ?2",
                params![pool_id, node_id],
                |r| r.get(0),
            )?;
            if members as u32 >= max_devices {
                return Err(PoolError::Full(max_devices));
            }
            self.take_op(tx)?;
            tx.execute(
                "INSERT OR REPLACE INTO pool_members
                     (pool_id, node_id, role, joined_at, invitation_id)
                     VALUES (?1, ?2, 'member', ?3, ?4)",
                params![pool_id, node_id, now, invitation_id],
            )?;
            Ok(Invitation {
                pool_id,
                pool_name,
                invitation_id,
            })
        })
    }

    /// Refuses a join while this node is in a pool; counts the attempt against the
    /// hourly limit (so guessing codes costs the guesser).
    fn check_can_join(&self) -> Result<(), PoolError> {
        self.transact(|tx| {
            if let Some((_, name, ..)) = Self::current(tx)? {
                return Err(PoolError::AlreadyInPool(name));
            }
            self.take_op(tx)?;
            Ok(())
        })
    }

    /// The owner records a device's signed acceptance of its invitation; whether
    /// it was new.
    fn record_acceptance(
        &self,
        pool_id: &str,
        node_id: &str,
        invitation_id: &str,
        signature: &str,
    ) -> Result<bool, PoolError> {
        Ok(self.store.with_conn(|conn| {
            conn.execute(
                "UPDATE pool_members SET acceptance_sig = ?1
                 WHERE pool_id = ?2 AND node_id = ?3 AND invitation_id = ?4 AND acceptance_sig IS NULL",
                params![signature, pool_id, node_id, invitation_id],
            )
        })? == 1)
    }

    /// Signed acceptances by node: (invitation id, signature).
    fn acceptances(&self) -> Result<HashMap<String, (String, String)>, PoolError> {
        Ok(self.store.with_conn(|conn| {
            let mut stmt = conn.prepare(
                "SELECT node_id, invitation_id, acceptance_sig FROM pool_members
                 WHERE acceptance_sig IS NOT NULL AND invitation_id IS NOT NULL",
            )?;
            stmt.query_map([], |r| Ok((r.get(0)?, (r.get(1)?, r.get(2)?))))?
                .collect::<rusqlite::Result<HashMap<_, _>>>()
        })?)
    }

    /// A device that accepted an invitation records its pool.
    fn enter_as_member(
        &self,
        pool_id: &str,
        name: &str,
        owner: &str,
        device_name: Option<&str>,
    ) -> Result<PoolState, PoolError> {
        let now = self.now();
        self.transact(|tx| {
                if let Some((_, existing, ..)) = Self::current(tx)? {
                    return Err(PoolError::AlreadyInPool(existing));
                }
                tx.execute(
                    "INSERT INTO pools (id, name, owner_node_id, role, max_devices, created_at)
                     VALUES (?1, ?2, ?3, 'member', ?4, ?5)",
                    params![pool_id, name, owner, self.max_devices, now],
                )?;
                tx.execute(
                    "INSERT INTO pool_members (pool_id, node_id, role, joined_at) VALUES (?1, ?2, 'owner', ?3)",
                    params![pool_id, owner, now],
                )?;
                tx.execute(
                    "INSERT INTO pool_members (pool_id, node_id, device_name, role, joined_at)
                     VALUES (?1, ?2, ?3, 'member', ?4)",
                    params![pool_id, self.node_id, device_name, now],
                )?;
                                Ok(())
            })?;
        self.state()
    }

    /// The owner removes a device: deletes it from the member list and returns the
    /// pool id (the caller publishes the signed notice).
    pub fn remove_member(&self, node_id: &str) -> Result<String, PoolError> {
        self.transact(|tx| {
            let (pool_id, ..) = Self::owned_pool(tx)?;
            if node_id == self.node_id {
                return Err(PoolError::Invalid(
                    "the owner cannot remove itself; leave to dissolve the pool".into(),
                ));
            }
            self.take_op(tx)?;
            let n = tx.execute(
                "DELETE FROM pool_members WHERE pool_id = ?1 AND node_id = ?2",
                params![pool_id, node_id],
            )?;
            if n == 0 {
                return Err(PoolError::Invalid(format!(
                    "{node_id} is not a member of this pool"
                )));
            }
            Ok(pool_id)
        })
    }

    /// Applies an owner's (signature-checked) removal notice: refused when stale
    /// (more than 5 minutes off) or already seen (a replay); otherwise the device
    /// leaves the member list, and a removed device leaves the pool. Returns
    /// whether it was applied.
    pub fn apply_removal(
        &self,
        pool_id: &str,
        owner: &str,
        removed: &str,
        nonce: &str,
        issued_at: i64,
    ) -> Result<bool, PoolError> {
        let now = self.now();
        if (now - issued_at).abs() > 300 || nonce.len() < 16 {
            return Ok(false);
        }
        self.transact(|tx| {
            tx.execute(
                "DELETE FROM pool_seen_notices WHERE seen_at < ?1",
                [now - 3600],
            )?;
            let fresh = tx.execute(
                "INSERT OR IGNORE INTO pool_seen_notices (nonce, seen_at) VALUES (?1, ?2)",
                params![nonce, now],
            )? == 1;
            if !fresh {
                return Ok(false);
            }
            // The nonce is remembered whatever the notice turns out to concern.
            let Some((id, _, my_owner, ..)) = Self::current(tx)? else {
                return Ok(false);
            };
            if id != pool_id || my_owner != owner {
                return Ok(false);
            }
            if removed == self.node_id {
                drop_pool(tx, pool_id)?;
            } else {
                tx.execute(
                    "DELETE FROM pool_members WHERE pool_id = ?1 AND node_id = ?2",
                    params![pool_id, removed],
                )?;
            }
            Ok(true)
        })
    }

    /// Sets the share of earnings members keep, 0–50 % (owner only).
    pub fn set_credit_split(&self, pct: u32) -> Result<PoolState, PoolError> {
        if pct > 50 {
            return Err(PoolError::Invalid("pct must be between 0 and 50".into()));
        }
        self.owner_update(|tx, pool_id| {
            tx.execute(
                "UPDATE pools SET credit_split_pct = ?1 WHERE id = ?2",
                params![pct, pool_id],
            )
            .map(|_| true)
        })
    }

    /// The current pool's id and its rate overrides, if any.
    pub fn rates(&self) -> Result<(Option<String>, Option<crate::credits::Rates>), PoolError> {
        Ok(self.store.with_conn(|conn| {
            conn.query_row("SELECT id, rates FROM pools LIMIT 1", [], |r| {
                let rates: Option<String> = r.get(1)?;
                Ok((
                    Some(r.get(0)?),
                    rates.and_then(|t| serde_json::from_str(&t).ok()),
                ))
            })
            .optional()
            .map(Option::unwrap_or_default)
        })?)
    }

    /// Sets (or with `None` clears) the rate overrides of pool `pool_id`
    /// (owner only); they apply to work between the pool's devices.
    pub fn set_rates(
        &self,
        pool_id: &str,
        rates: Option<crate::credits::Rates>,
    ) -> Result<PoolState, PoolError> {
        let pool_id = pool_id.to_string();
        let text = rates.map(|r| serde_json::to_string(&r).unwrap_or_default());
        self.transact(|tx| {
            let Some((id, _, owner, ..)) = Self::current(tx)? else {
                return Err(PoolError::NotInPool);
            };
            if id != pool_id {
                return Err(PoolError::UnknownPool(pool_id.clone()));
            }
            if owner != self.node_id {
                return Err(PoolError::NotOwner);
            }
            self.take_op(tx)?;
            tx.execute(
                "UPDATE pools SET rates = ?1 WHERE id = ?2",
                params![text, pool_id],
            )?;
            Ok(())
        })?;
        self.state()
    }

    /// This node's contribution level (0–100) as its pool's owner set it;
    /// 100 when none is set or the node is in no pool.
    pub fn own_contribution(&self) -> u32 {
        self.state()
            .ok()
            .and_then(|s| {
                s.members
                    .iter()
                    .find(|m| m.node_id == self.node_id)
                    .and_then(|m| m.contribution)
            })
            .unwrap_or(100)
            .min(100)
    }

    /// Sets a member's contribution level, 0–100 (owner only).
    pub fn set_contribution(&self, node_id: &str, level: u32) -> Result<PoolState, PoolError> {
        if level > 100 {
            return Err(PoolError::Invalid("level must be between 0 and 100".into()));
        }
        let node = node_id.to_string();
        self.owner_update(move |tx, pool_id| {
            Ok(tx.execute(
                "UPDATE pool_members SET contribution = ?1 WHERE pool_id = ?2 AND node_id = ?3",
                params![level, pool_id, node],
            )? == 1)
        })
        .and_then(|s| {
            if s.members.iter().any(|m| m.node_id == node_id) {
                Ok(s)
            } else {
                Err(PoolError::Invalid(format!(
                    "{node_id} is not a member of this pool"
                )))
            }
        })
    }

    /// Sets this device's name in its own pool record (the owner's signed state
    /// carries it to the others: see [`Pools::rename_device`]).
    pub fn set_device_name(&self, name: &str) -> Result<PoolState, PoolError> {
        let name = device_name(name)?;
        let me = self.node_id.clone();
        self.transact(|tx| {
            let Some((pool_id, ..)) = Self::current(tx)? else {
                return Err(PoolError::NotInPool);
            };
            tx.execute(
                "UPDATE pool_members SET device_name = ?1 WHERE pool_id = ?2 AND node_id = ?3",
                params![name, pool_id, me],
            )?;
            Ok(())
        })?;
        self.state()
    }

    /// The owner's side of a member's signed rename (its name already checked):
    /// whether `node_id`, a member of the pool this node owns, now has that name.
    fn apply_rename(&self, pool_id: &str, node_id: &str, name: &str) -> Result<bool, PoolError> {
        self.transact(|tx| {
            let Ok((owned, ..)) = Self::owned_pool(tx) else {
                return Ok(false);
            };
            if owned != pool_id {
                return Ok(false);
            }
            let changed = tx.execute(
                "UPDATE pool_members SET device_name = ?1
                  WHERE pool_id = ?2 AND node_id = ?3 AND role != 'owner'",
                params![name, pool_id, node_id],
            )?;
            Ok(changed > 0)
        })
    }

    /// Runs an owner-only change in a transaction that also counts as a pool
    /// operation.
    fn owner_update(
        &self,
        f: impl FnOnce(&rusqlite::Transaction<'_>, &str) -> rusqlite::Result<bool>,
    ) -> Result<PoolState, PoolError> {
        self.transact(|tx| {
            let (pool_id, ..) = Self::owned_pool(tx)?;
            self.take_op(tx)?;
            f(tx, &pool_id)?;
            Ok(())
        })?;
        self.state()
    }

    /// The pool's pins.
    pub fn pins(&self) -> Result<Vec<Pin>, PoolError> {
        Ok(self.store.with_conn(|conn| {
            let mut stmt = conn.prepare(
                "SELECT model_id, target_node_id, shard_indices FROM pool_pins
                 WHERE pool_id = (SELECT id FROM pools LIMIT 1) ORDER BY model_id, target_node_id",
            )?;
            stmt.query_map([], |r| {
                let indices: String = r.get(2)?;
                Ok(Pin {
                    model_id: r.get(0)?,
                    target_node_id: r.get(1)?,
                    shard_indices: serde_json::from_str(&indices).unwrap_or_default(),
                })
            })?
            .collect::<rusqlite::Result<Vec<_>>>()
        })?)
    }

    /// Shards of `model_id` pinned to this device (`Some(empty)` = all of them).
    pub fn pinned_here(&self, model_id: &str) -> Result<Option<Vec<u32>>, PoolError> {
        let mut out: Option<Vec<u32>> = None;
        for pin in self.pins()? {
            if pin.model_id == model_id && pin.target_node_id == self.node_id {
                if pin.shard_indices.is_empty() {
                    return Ok(Some(Vec::new()));
                }
                out.get_or_insert_with(Vec::new).extend(pin.shard_indices);
            }
        }
        Ok(out)
    }

    /// Adds (`pin = true`) or removes a pin (owner only); the target must be a
    /// device of the pool. Returns the pool id and the new pin list.
    fn change_pin(&self, pin: &Pin, add: bool) -> Result<(String, Vec<Pin>), PoolError> {
        let now = self.now();
        let indices = serde_json::to_string(&pin.shard_indices).unwrap_or_else(|_| "[]".into());
        let pool_id = self.transact(|tx| {
                let (pool_id, ..) = Self::owned_pool(tx)?;
                let member: i64 = tx.query_row(
                    "SELECT COUNT(*) FROM pool_members WHERE pool_id = ?1 AND node_id = ?2",
                    params![pool_id, pin.target_node_id],
                    |r| r.get(0),
                )?;
                if member == 0 {
                    return Err(PoolError::Invalid(format!(
                        "{} is not a device of this pool",
                        pin.target_node_id
                    )));
                }
                self.take_op(tx)?;
                if add {
                    tx.execute(
                        "INSERT OR REPLACE INTO pool_pins
                         (pool_id, model_id, target_node_id, shard_indices, created_at)
                         VALUES (?1, ?2, ?3, ?4, ?5)",
                        params![pool_id, pin.model_id, pin.target_node_id, indices, now],
                    )?;
                } else {
                    let n = tx.execute(
                        "DELETE FROM pool_pins WHERE pool_id = ?1 AND model_id = ?2 AND target_node_id = ?3",
                        params![pool_id, pin.model_id, pin.target_node_id],
                    )?;
                    if n == 0 {
                        return Err(PoolError::Invalid("no such pin".into()));
                    }
                }
                                Ok(pool_id)
            })?;
        Ok((pool_id, self.pins()?))
    }

    /// A member takes the owner's (verified) pin list.
    fn apply_pins(&self, pool_id: &str, owner: &str, pins: &[Pin]) -> Result<bool, PoolError> {
        let now = self.now();
        self.transact(|tx| {
            let Some((id, _, my_owner, role, ..)) = Self::current(tx)? else {
                return Ok(false);
            };
            if id != pool_id || my_owner != owner || role != "member" {
                return Ok(false);
            }
            tx.execute("DELETE FROM pool_pins WHERE pool_id = ?1", [pool_id])?;
            for p in pins {
                tx.execute(
                    "INSERT OR REPLACE INTO pool_pins
                     (pool_id, model_id, target_node_id, shard_indices, created_at)
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                    params![
                        pool_id,
                        p.model_id,
                        p.target_node_id,
                        serde_json::to_string(&p.shard_indices).unwrap_or_else(|_| "[]".into()),
                        now
                    ],
                )?;
            }
            Ok(true)
        })
    }

    /// Where pins that target this device are reported (the node fetches the
    /// shards); set once by the node.
    pub fn on_pinned(&self, tx: tokio::sync::mpsc::UnboundedSender<Pin>) {
        let _ = self.pinned.set(tx);
    }

    fn notify_pins(&self, pins: &[Pin]) {
        if let Some(tx) = self.pinned.get() {
            for p in pins.iter().filter(|p| p.target_node_id == self.node_id) {
                let _ = tx.send(p.clone());
            }
        }
    }

    /// A member takes the owner's (verified) member list.
    fn apply_state(
        &self,
        pool_id: &str,
        owner: &str,
        members: &[Member],
        settings: Option<(u32, Option<crate::credits::Rates>)>,
    ) -> Result<(), PoolError> {
        self.transact(|tx| {
            let Some((id, _, my_owner, role, ..)) = Self::current(tx)? else {
                return Ok(());
            };
            if id != pool_id || my_owner != owner || role != "member" {
                return Ok(());
            }
            if let Some((split, rates)) = settings {
                tx.execute(
                    "UPDATE pools SET credit_split_pct = ?1, rates = ?2 WHERE id = ?3",
                    params![
                        split.min(50),
                        rates.map(|r| serde_json::to_string(&r).unwrap_or_default()),
                        pool_id
                    ],
                )?;
            }
            tx.execute("DELETE FROM pool_members WHERE pool_id = ?1", [pool_id])?;
            for m in members {
                tx.execute(
                    "INSERT INTO pool_members (pool_id, node_id, device_name, role, joined_at, contribution)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                    params![pool_id, m.node_id, m.device_name, m.role, m.joined_at, m.contribution],
                )?;
            }
            Ok(())
        })
    }

    /// Leaves the pool; the owner leaving dissolves it.
    pub fn leave(&self) -> Result<(), PoolError> {
        self.transact(|tx| {
            let Some((pool_id, ..)) = Self::current(tx)? else {
                return Err(PoolError::NotInPool);
            };
            self.take_op(tx)?;
            drop_pool(tx, &pool_id)
        })
    }

    /// Node ids of the devices that accepted their invitation (the owner
    /// included): the devices private mode may route through.
    pub fn accepted_members(&self) -> Result<std::collections::HashSet<String>, PoolError> {
        Ok(self
            .state()?
            .members
            .into_iter()
            .filter(|m| m.accepted)
            .map(|m| m.node_id)
            .collect())
    }

    /// This node's pool state.
    pub fn state(&self) -> Result<PoolState, PoolError> {
        let now = self.now();
        Ok(self.store.with_conn(|conn| {
            let Some((pool_id, name, owner, role, split, max)) = Self::current(conn)? else {
                return Ok(PoolState {
                    in_pool: false,
                    pool_id: None,
                    name: None,
                    owner_node_id: None,
                    role: None,
                    credit_split_pct: None,
                    max_devices: None,
                    members: Vec::new(),
                    active_codes: 0,
                });
            };
            let mut stmt = conn.prepare(
                "SELECT node_id, device_name, role, joined_at,
                        role = 'owner' OR acceptance_sig IS NOT NULL OR invitation_id IS NULL,
                        contribution
                 FROM pool_members WHERE pool_id = ?1 ORDER BY role DESC, joined_at",
            )?;
            let members = stmt
                .query_map([&pool_id], |r| {
                    Ok(Member {
                        node_id: r.get(0)?,
                        device_name: r.get(1)?,
                        role: r.get(2)?,
                        joined_at: r.get(3)?,
                        accepted: r.get(4)?,
                        contribution: r.get(5)?,
                    })
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            let active: i64 = conn.query_row(
                "SELECT COUNT(*) FROM pool_codes WHERE pool_id = ?1 AND used_at IS NULL AND expires_at > ?2",
                params![pool_id, now],
                |r| r.get(0),
            )?;
            Ok(PoolState {
                in_pool: true,
                pool_id: Some(pool_id),
                name: Some(name),
                owner_node_id: Some(owner),
                role: Some(role),
                credit_split_pct: Some(split),
                max_devices: Some(max),
                members,
                active_codes: active as usize,
            })
        })?)
    }
}

/// Deletes every record of pool `pool_id` (leaving, dissolving, being removed).
fn drop_pool(tx: &rusqlite::Transaction<'_>, pool_id: &str) -> Result<(), PoolError> {
    for table in ["pool_codes", "pool_members", "pool_pins"] {
        tx.execute(
            &format!("DELETE FROM {table} WHERE pool_id = ?1"),
            [pool_id],
        )?;
    }
    tx.execute("DELETE FROM pools WHERE id = ?1", [pool_id])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicI64, Ordering};

    fn pools(max_devices: u32) -> (Pools, Arc<AtomicI64>, tempfile::TempDir) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&dir.path().join("node.db")).expect("store");
        let t = Arc::new(AtomicI64::new(1_800_000_000));
        let clock = Arc::clone(&t);
        let p = Pools::with_clock(
            store,
            "owner".into(),
            max_devices,
            Arc::new(move || clock.load(Ordering::Relaxed)),
        );
        (p, t, dir)
    }

    #[test]
    fn codes_use_the_alphabet_work_once_and_expire() {
        let (p, t, _d) = pools(10);
        assert!(matches!(p.generate_code(), Err(PoolError::NotInPool)));
        let state = p.create("My Devices", Some("laptop")).expect("create");
        assert_eq!(state.role.as_deref(), Some("owner"));
        assert!(matches!(
            p.create("again", None),
            Err(PoolError::AlreadyInPool(_))
        ));
        let (code, expires) = p.generate_code().expect("code");
        assert_eq!(code.len(), 8);
        assert!(code.bytes().all(|b| CODE_ALPHABET.contains(&b)));
        assert!(!code.contains(['0', 'O', '1', 'I']));
        assert_eq!(expires - t.load(Ordering::Relaxed), CODE_TTL_SECS);
        assert_eq!(parse_code(&code.to_lowercase()).expect("parses"), code);
        assert!(parse_code("ABCD0123").is_err());

        p.redeem(&code_hash(&code), "desktop", Some("desktop"), "inv")
            .expect("first use");
        assert!(matches!(
            p.redeem(&code_hash(&code), "other", None, "inv"),
            Err(PoolError::CodeUsed)
        ));
        assert!(matches!(
            p.redeem(&code_hash("ZZZZZZZZ"), "x", None, "inv"),
            Err(PoolError::UnknownCode)
        ));
        let (late, _) = p.generate_code().expect("code");
        t.fetch_add(CODE_TTL_SECS, Ordering::Relaxed);
        assert!(matches!(
            p.redeem(&code_hash(&late), "x", None, "inv"),
            Err(PoolError::CodeExpired)
        ));
        assert_eq!(p.state().expect("state").members.len(), 2);
    }

    #[test]
    fn removal_notices_apply_once_and_only_fresh() {
        let (p, t, _d) = pools(10);
        let state = p.create("pool", None).expect("create");
        let pool_id = state.pool_id.expect("id");
        // The owner's own records: a member to remove.
        let (code, _) = p.generate_code().expect("code");
        p.redeem(&code_hash(&code), "m", None, "inv")
            .expect("joins");
        let now = t.load(Ordering::Relaxed);
        assert!(
            p.apply_removal(&pool_id, "owner", "m", "00112233445566778899", now)
                .expect("applies")
        );
        assert_eq!(p.state().expect("state").members.len(), 1);
        // The same notice again is a replay.
        assert!(
            !p.apply_removal(&pool_id, "owner", "m", "00112233445566778899", now)
                .expect("ok")
        );
        // A stale one, or one for another pool or owner, does nothing.
        assert!(
            !p.apply_removal(&pool_id, "owner", "m", "aaaaaaaaaaaaaaaaaaaa", now - 1000)
                .expect("ok")
        );
        assert!(
            !p.apply_removal("other", "owner", "m", "bbbbbbbbbbbbbbbbbbbb", now)
                .expect("ok")
        );
        // A notice naming this node takes it out of the pool.
        assert!(
            p.apply_removal(&pool_id, "owner", "owner", "cccccccccccccccccccc", now)
                .expect("ok")
        );
        assert!(!p.state().expect("state").in_pool);
    }

    #[test]
    fn the_eleventh_device_is_refused_by_default() {
        let (p, t, _d) = pools(DEFAULT_MAX_DEVICES);
        p.create("pool", None).expect("create");
        // The owner plus nine devices; codes a few at a time (5 active, 10 ops an hour).
        let mut joined = 0;
        while joined < 9 {
            t.fetch_add(3600, Ordering::Relaxed);
            let code = p.generate_code().expect("code").0;
            p.redeem(&code_hash(&code), &format!("dev{joined}"), None, "inv")
                .expect("joins");
            joined += 1;
        }
        assert_eq!(p.state().expect("state").members.len(), 10);
        let code = p.generate_code().expect("code").0;
        assert!(matches!(
            p.redeem(&code_hash(&code), "eleventh", None, "inv"),
            Err(PoolError::Full(10))
        ));
    }

    #[test]
    fn five_active_codes_ten_devices_and_ten_operations_an_hour() {
        let (p, t, _d) = pools(3);
        p.create("pool", None).expect("create");
        let codes: Vec<String> = (0..5).map(|_| p.generate_code().expect("code").0).collect();
        assert!(matches!(p.generate_code(), Err(PoolError::TooManyCodes)));
        p.redeem(&code_hash(&codes[0]), "a", None, "inv")
            .expect("a joins");
        p.redeem(&code_hash(&codes[1]), "b", None, "inv")
            .expect("b joins");
        assert!(matches!(
            p.redeem(&code_hash(&codes[2]), "c", None, "inv"),
            Err(PoolError::Full(3))
        ));
        // 1 create + 5 codes so far; 4 more operations fit in the hour.
        for _ in 0..2 {
            p.generate_code().expect("code");
        }
        t.fetch_add(10, Ordering::Relaxed);
        assert!(matches!(p.generate_code(), Err(PoolError::TooManyCodes)));
        p.leave().expect("leave");
        p.create("again", None).expect("create");
        match p.generate_code() {
            Err(PoolError::RateLimited { retry_after }) => {
                assert!(retry_after > 0 && retry_after <= 3600)
            }
            other => panic!("{other:?}"),
        }
        t.fetch_add(3600, Ordering::Relaxed);
        p.generate_code().expect("allowed again an hour later");
    }
}
