//! The peer directory in SQLite: who we know, how to reach them, how they behave.
//!
//! Trust starts at 50 and moves within 0–100: +1 per valid announcement, −2 per
//! failed dial, −10 per malformed frame or forged announcement. A peer with no live
//! connection is inactive; it is redialled with exponential backoff (1 s … 5 min).

use rusqlite::{OptionalExtension, params};
use serde::Serialize;
use serde_json::Value;

use super::announce::Announcement;
use crate::store::{Store, StoreError, now_unix};

/// Longest wait between redials.
const MAX_BACKOFF_SECS: i64 = 300;

/// One row of `swarm_nodes`.
#[derive(Debug, Clone, Serialize)]
pub struct PeerRecord {
    /// Hex node id.
    pub node_id: String,
    /// libp2p peer id.
    pub peer_id: String,
    /// Known multiaddrs.
    pub addresses: Vec<String>,
    /// Nickname from its announcements.
    pub nickname: Option<String>,
    /// Region code.
    pub region: Option<String>,
    /// Software version.
    pub software_version: Option<String>,
    /// Capabilities.
    pub capabilities: Value,
    /// Hardware summary.
    pub hardware: Value,
    /// Hosted models and layer ranges.
    pub models: Value,
    /// Load.
    pub load: Value,
    /// Last ping round trip.
    pub latency_ms: Option<f64>,
    /// 0–100.
    pub trust_score: i64,
    /// Failed dials since the last success.
    pub consecutive_failures: i64,
    /// Malformed frames or forged announcements received from it.
    pub bad_frames: i64,
    /// How we learnt of it (`invite`, `mdns`, `gossip`, `peer-exchange`, `inbound`…).
    pub discovered_via: String,
    /// Unix seconds.
    pub discovered_at: i64,
    /// Unix seconds of the last contact.
    pub last_seen_at: Option<i64>,
    /// Unix seconds of the last accepted announcement.
    pub last_sync_at: Option<i64>,
    /// Currently reachable.
    pub is_active: bool,
    /// Unix seconds until which the peer is refused (its trust fell too low).
    pub banned_until: Option<i64>,
}

/// One row of `swarm_seeds`.
#[derive(Debug, Clone, Serialize)]
pub struct SeedRecord {
    /// Multiaddr (with `/p2p/…`).
    pub address: String,
    /// Lower dials first.
    pub priority: i64,
    /// Whether it is used.
    pub is_enabled: bool,
    /// Unix seconds of the last successful dial.
    pub last_contact_at: Option<i64>,
    /// Failed dials since the last success.
    pub consecutive_failures: i64,
}

/// The directory, over the node's store.
#[derive(Debug, Clone)]
pub struct Directory {
    store: Store,
}

fn json_list(addrs: &[String]) -> String {
    serde_json::to_string(addrs).unwrap_or_else(|_| "[]".into())
}

/// The peer's known addresses plus `addrs` (at most 16, oldest first), as JSON, and
/// whether the peer is new to the directory.
/// Known addresses kept per peer.
const MAX_ADDRESSES: usize = 16;
/// Peers kept in the directory; the least recently seen go first beyond it.
pub const MAX_PEERS: i64 = 10_000;
/// Peers not seen for this long are forgotten.
pub const FORGET_AFTER_SECS: i64 = 30 * 24 * 3600;
/// Peer-exchange log rows kept.
const MAX_SYNC_LOG: i64 = 10_000;

/// Merges `addrs` into `node_id`'s known addresses. Addresses seen on a verified
/// contact (`verified`: a live connection) go first; merely reported ones (peer
/// exchange, gossip) only fill what is left, so reports can never push out the
/// addresses a node was really reached at.
fn merge_addresses(
    tx: &rusqlite::Transaction<'_>,
    node_id: &str,
    addrs: &[String],
    verified: bool,
) -> rusqlite::Result<(bool, String)> {
    let existing: Option<String> = tx
        .query_row(
            "SELECT addresses FROM swarm_nodes WHERE node_id = ?1",
            [node_id],
            |r| r.get(0),
        )
        .optional()?;
    let is_new = existing.is_none();
    let known: Vec<String> = existing
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default();
    let (first, then) = if verified {
        (addrs, known.as_slice())
    } else {
        (known.as_slice(), addrs)
    };
    let mut merged: Vec<String> = Vec::new();
    for a in first.iter().chain(then) {
        if merged.len() < MAX_ADDRESSES && a.len() <= 256 && !merged.contains(a) {
            merged.push(a.clone());
        }
    }
    Ok((is_new, json_list(&merged)))
}

fn to_json<T: Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_else(|_| "null".into())
}

fn parse_json(text: String) -> Value {
    serde_json::from_str(&text).unwrap_or(Value::Null)
}

impl Directory {
    /// A directory over `store`.
    pub fn new(store: Store) -> Self {
        Self { store }
    }

    /// Records a live connection: creates the row if new, merges `addrs`, marks it
    /// active and clears failures.
    pub fn connected(
        &self,
        node_id: &str,
        peer_id: &str,
        addrs: &[String],
        via: &str,
    ) -> Result<(), StoreError> {
        let now = now_unix();
        self.store.with_conn(|c| {
            let tx = c.transaction()?;
            let (_, merged) = merge_addresses(&tx, node_id, addrs, true)?;
            tx.execute(
                "INSERT INTO swarm_nodes (id, node_id, peer_id, addresses, discovered_via, discovered_at,
                     last_seen_at, is_active, consecutive_failures, next_retry_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6, 1, 0, 0)
                 ON CONFLICT(node_id) DO UPDATE SET addresses = excluded.addresses,
                     last_seen_at = excluded.last_seen_at, is_active = 1,
                     consecutive_failures = 0, next_retry_at = 0",
                params![uuid::Uuid::new_v4().to_string(), node_id, peer_id, merged, via, now],
            )?;
            tx.commit()
        })
    }

    /// Learns of a peer without contact (peer exchange, gossip, invite): only adds
    /// addresses; never marks it active.
    pub fn learned(
        &self,
        node_id: &str,
        peer_id: &str,
        addrs: &[String],
        via: &str,
    ) -> Result<bool, StoreError> {
        let now = now_unix();
        self.store.with_conn(|c| {
            let tx = c.transaction()?;
            let (is_new, merged) = merge_addresses(&tx, node_id, addrs, false)?;
            tx.execute(
                "INSERT INTO swarm_nodes (id, node_id, peer_id, addresses, discovered_via, discovered_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT(node_id) DO UPDATE SET addresses = excluded.addresses",
                params![uuid::Uuid::new_v4().to_string(), node_id, peer_id, merged, via, now],
            )?;
            tx.commit()?;
            Ok(is_new)
        })
    }

    /// Applies a verified announcement (ignored if not newer than the last one).
    pub fn announced(&self, ann: &Announcement, peer_id: &str) -> Result<(), StoreError> {
        let now = now_unix();
        self.store.with_conn(|c| {
            let tx = c.transaction()?;
            tx.execute(
                "INSERT INTO swarm_nodes (id, node_id, peer_id, discovered_via, discovered_at)
                 VALUES (?1, ?2, ?3, 'gossip', ?4) ON CONFLICT(node_id) DO NOTHING",
                params![uuid::Uuid::new_v4().to_string(), ann.node_id, peer_id, now],
            )?;
            tx.execute(
                "UPDATE swarm_nodes SET nickname = ?2, region = ?3, software_version = ?4,
                     capabilities = ?5, hardware = ?6, models = ?7, load = ?8,
                     addresses = CASE WHEN ?9 = '[]' THEN addresses ELSE ?9 END,
                     last_sync_at = ?10, last_seen_at = ?10, announce_seq = ?11,
                     trust_score = MIN(100, trust_score + 1)
                 WHERE node_id = ?1 AND (announce_seq < ?11 OR last_sync_at IS NULL
                     OR last_sync_at < ?10 - 3600)",
                params![
                    ann.node_id,
                    ann.nickname,
                    ann.region,
                    ann.version,
                    to_json(&ann.capabilities),
                    to_json(&ann.hardware),
                    to_json(&ann.models),
                    to_json(&ann.load),
                    json_list(&ann.addrs),
                    now,
                    ann.seq as i64,
                ],
            )?;
            tx.commit()
        })
    }

    /// The last connection to `node_id` closed.
    pub fn disconnected(&self, node_id: &str) -> Result<(), StoreError> {
        self.store.with_conn(|c| {
            c.execute(
                "UPDATE swarm_nodes SET is_active = 0, next_retry_at = ?2 WHERE node_id = ?1",
                params![node_id, now_unix() + 1],
            )
            .map(|_| ())
        })
    }

    /// A dial failed: count it, lower trust a little, back off.
    pub fn dial_failed(&self, node_id: &str) -> Result<(), StoreError> {
        let now = now_unix();
        self.store.with_conn(|c| {
            let tx = c.transaction()?;
            let failures: Option<i64> = tx
                .query_row(
                    "SELECT consecutive_failures FROM swarm_nodes WHERE node_id = ?1",
                    [node_id],
                    |r| r.get(0),
                )
                .optional()?;
            if let Some(f) = failures {
                let f = f + 1;
                let backoff = (1i64 << f.min(9)).min(MAX_BACKOFF_SECS);
                tx.execute(
                    "UPDATE swarm_nodes SET consecutive_failures = ?2, is_active = 0,
                         next_retry_at = ?3, trust_score = MAX(0, trust_score - 2)
                     WHERE node_id = ?1",
                    params![node_id, f, now + backoff],
                )?;
            }
            tx.commit()
        })
    }

    /// Forgets peers not seen for [`FORGET_AFTER_SECS`], then the least recently
    /// seen beyond [`MAX_PEERS`], and trims the peer-exchange log; connected
    /// peers are kept. Returns how many peers were forgotten.
    pub fn prune(&self, connected: &[String]) -> Result<usize, StoreError> {
        let cutoff = now_unix() - FORGET_AFTER_SECS;
        let keep = serde_json::to_string(connected).unwrap_or_else(|_| "[]".into());
        self.store.with_conn(|c| {
            let tx = c.transaction()?;
            let mut gone = tx.execute(
                "DELETE FROM swarm_nodes
                 WHERE COALESCE(last_seen_at, discovered_at) < ?1
                   AND node_id NOT IN (SELECT value FROM json_each(?2))",
                params![cutoff, keep],
            )?;
            gone += tx.execute(
                "DELETE FROM swarm_nodes WHERE node_id IN (
                     SELECT node_id FROM swarm_nodes
                     WHERE node_id NOT IN (SELECT value FROM json_each(?2))
                     ORDER BY COALESCE(last_seen_at, discovered_at) DESC
                     LIMIT -1 OFFSET ?1)",
                params![MAX_PEERS, keep],
            )?;
            tx.execute(
                "DELETE FROM swarm_sync_log WHERE id IN (
                     SELECT id FROM swarm_sync_log ORDER BY created_at DESC LIMIT -1 OFFSET ?1)",
                [MAX_SYNC_LOG],
            )?;
            tx.commit()?;
            Ok(gone)
        })
    }

    /// A malformed frame or forged announcement came from `node_id`: its trust
    /// drops by 10. Returns the new trust (`None` for an unknown peer).
    pub fn misbehaved(&self, node_id: &str) -> Result<Option<i64>, StoreError> {
        self.store.with_conn(|c| {
            c.query_row(
                "UPDATE swarm_nodes SET bad_frames = bad_frames + 1,
                     trust_score = MAX(0, trust_score - 10) WHERE node_id = ?1
                 RETURNING trust_score",
                [node_id],
                |r| r.get(0),
            )
            .optional()
        })
    }

    /// `node_id` is refused until `until` (Unix seconds).
    pub fn banned(&self, node_id: &str, until: i64) -> Result<(), StoreError> {
        self.store.with_conn(|c| {
            c.execute(
                "UPDATE swarm_nodes SET banned_until = ?2, is_active = 0 WHERE node_id = ?1",
                params![node_id, until],
            )
            .map(|_| ())
        })
    }

    /// Records a ping round trip.
    pub fn latency(&self, node_id: &str, ms: f64) -> Result<(), StoreError> {
        self.store.with_conn(|c| {
            c.execute(
                "UPDATE swarm_nodes SET latency_ms = ?2, last_seen_at = ?3 WHERE node_id = ?1",
                params![node_id, ms, now_unix()],
            )
            .map(|_| ())
        })
    }

    /// Marks as inactive every peer not in `connected` whose last contact is older
    /// than `stale_secs` (their announcements expired).
    pub fn expire(&self, connected: &[String], stale_secs: i64) -> Result<usize, StoreError> {
        let cutoff = now_unix() - stale_secs;
        let keep = serde_json::to_string(connected).unwrap_or_else(|_| "[]".into());
        self.store.with_conn(|c| {
            c.execute(
                "UPDATE swarm_nodes SET is_active = 0
                 WHERE is_active = 1 AND COALESCE(last_seen_at, 0) < ?1
                   AND node_id NOT IN (SELECT value FROM json_each(?2))",
                params![cutoff, keep],
            )
        })
    }

    /// Inactive peers whose backoff has passed: (node_id, peer_id, addresses).
    pub fn due_for_redial(
        &self,
        limit: usize,
    ) -> Result<Vec<(String, String, Vec<String>)>, StoreError> {
        let now = now_unix();
        self.store.with_conn(|c| {
            let mut stmt = c.prepare_cached(
                "SELECT node_id, peer_id, addresses FROM swarm_nodes
                 WHERE is_active = 0 AND next_retry_at <= ?1 AND addresses != '[]'
                 ORDER BY trust_score DESC, next_retry_at LIMIT ?2",
            )?;
            let rows = stmt.query_map(params![now, limit as i64], |r| {
                let addrs: String = r.get(2)?;
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    serde_json::from_str(&addrs).unwrap_or_default(),
                ))
            })?;
            rows.collect()
        })
    }

    /// Pushes the next redial of `node_id` back (a dial is in flight).
    pub fn redial_started(&self, node_id: &str) -> Result<(), StoreError> {
        self.store.with_conn(|c| {
            c.execute(
                "UPDATE swarm_nodes SET next_retry_at = ?2 WHERE node_id = ?1",
                params![node_id, now_unix() + 10],
            )
            .map(|_| ())
        })
    }

    /// All known peers, most recently seen first.
    pub fn list(&self, limit: usize) -> Result<Vec<PeerRecord>, StoreError> {
        self.store.with_conn(|c| {
            let mut stmt = c.prepare_cached(
                "SELECT node_id, peer_id, addresses, nickname, region, software_version, capabilities,
                        hardware, models, load, latency_ms, trust_score, consecutive_failures,
                        bad_frames, discovered_via, discovered_at, last_seen_at, last_sync_at, is_active,
                        banned_until
                 FROM swarm_nodes ORDER BY is_active DESC, COALESCE(last_seen_at, 0) DESC LIMIT ?1",
            )?;
            let rows = stmt.query_map([limit as i64], |r| {
                Ok(PeerRecord {
                    node_id: r.get(0)?,
                    peer_id: r.get(1)?,
                    addresses: serde_json::from_str(&r.get::<_, String>(2)?).unwrap_or_default(),
                    nickname: r.get(3)?,
                    region: r.get(4)?,
                    software_version: r.get(5)?,
                    capabilities: parse_json(r.get(6)?),
                    hardware: parse_json(r.get(7)?),
                    models: parse_json(r.get(8)?),
                    load: parse_json(r.get(9)?),
                    latency_ms: r.get(10)?,
                    trust_score: r.get(11)?,
                    consecutive_failures: r.get(12)?,
                    bad_frames: r.get(13)?,
                    discovered_via: r.get(14)?,
                    discovered_at: r.get(15)?,
                    last_seen_at: r.get(16)?,
                    last_sync_at: r.get(17)?,
                    is_active: r.get::<_, i64>(18)? != 0,
                    banned_until: r.get(19)?,
                })
            })?;
            rows.collect()
        })
    }

    /// Adds (or re-enables) a seed address.
    pub fn add_seed(&self, address: &str, priority: i64) -> Result<(), StoreError> {
        self.store.with_conn(|c| {
            c.execute(
                "INSERT INTO swarm_seeds (id, address, priority) VALUES (?1, ?2, ?3)
                 ON CONFLICT(address) DO UPDATE SET is_enabled = 1, priority = MIN(priority, excluded.priority)",
                params![uuid::Uuid::new_v4().to_string(), address, priority],
            )
            .map(|_| ())
        })
    }

    /// Enabled seeds, by priority.
    pub fn seeds(&self) -> Result<Vec<SeedRecord>, StoreError> {
        self.store.with_conn(|c| {
            let mut stmt = c.prepare_cached(
                "SELECT address, priority, is_enabled, last_contact_at, consecutive_failures
                 FROM swarm_seeds ORDER BY priority, address",
            )?;
            let rows = stmt.query_map([], |r| {
                Ok(SeedRecord {
                    address: r.get(0)?,
                    priority: r.get(1)?,
                    is_enabled: r.get::<_, i64>(2)? != 0,
                    last_contact_at: r.get(3)?,
                    consecutive_failures: r.get(4)?,
                })
            })?;
            rows.collect()
        })
    }

    /// Records the outcome of dialling a seed.
    pub fn seed_result(&self, address: &str, ok: bool) -> Result<(), StoreError> {
        self.store.with_conn(|c| {
            if ok {
                c.execute(
                    "UPDATE swarm_seeds SET last_contact_at = ?2, consecutive_failures = 0 WHERE address = ?1",
                    params![address, now_unix()],
                )
            } else {
                c.execute(
                    "UPDATE swarm_seeds SET consecutive_failures = consecutive_failures + 1 WHERE address = ?1",
                    [address],
                )
            }
            .map(|_| ())
        })
    }

    /// Appends to `swarm_sync_log`.
    #[allow(clippy::too_many_arguments)]
    pub fn log_sync(
        &self,
        remote: &str,
        direction: &str,
        received: usize,
        sent: usize,
        success: bool,
        error: Option<&str>,
        duration_ms: u64,
    ) -> Result<(), StoreError> {
        self.store.with_conn(|c| {
            c.execute(
                "INSERT INTO swarm_sync_log (id, remote_node, direction, nodes_received, nodes_sent,
                     success, error_message, duration_ms, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                params![
                    uuid::Uuid::new_v4().to_string(),
                    remote,
                    direction,
                    received as i64,
                    sent as i64,
                    success,
                    error,
                    duration_ms as i64,
                    now_unix()
                ],
            )
            .map(|_| ())
        })
    }

    /// Recent sync log entries as JSON rows.
    pub fn sync_log(&self, limit: usize) -> Result<Vec<Value>, StoreError> {
        self.store.with_conn(|c| {
            let mut stmt = c.prepare_cached(
                "SELECT remote_node, direction, nodes_received, nodes_sent, success, error_message,
                        duration_ms, created_at FROM swarm_sync_log ORDER BY created_at DESC LIMIT ?1",
            )?;
            let rows = stmt.query_map([limit as i64], |r| {
                Ok(serde_json::json!({
                    "remote_node": r.get::<_, String>(0)?,
                    "direction": r.get::<_, String>(1)?,
                    "nodes_received": r.get::<_, i64>(2)?,
                    "nodes_sent": r.get::<_, i64>(3)?,
                    "success": r.get::<_, bool>(4)?,
                    "error_message": r.get::<_, Option<String>>(5)?,
                    "duration_ms": r.get::<_, i64>(6)?,
                    "created_at": r.get::<_, i64>(7)?,
                }))
            })?;
            rows.collect()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reported_addresses_never_push_out_verified_ones() -> Result<(), StoreError> {
        let dir = Directory::new(Store::open_in_memory()?);
        let real = "/ip4/127.0.0.1/tcp/1".to_string();
        dir.connected("aa", "p1", std::slice::from_ref(&real), "invite")?;
        // A flood of reported addresses fills only the free slots, after the real one.
        let junk: Vec<String> = (0..100).map(|i| format!("/ip4/10.0.0.{i}/tcp/1")).collect();
        dir.learned("aa", "p1", &junk, "peer-exchange")?;
        let addrs = dir.list(1)?[0].addresses.clone();
        assert_eq!(addrs.len(), MAX_ADDRESSES);
        assert_eq!(addrs[0], real);
        // A verified contact at a new address puts it first.
        let moved = "/ip4/127.0.0.1/tcp/2".to_string();
        dir.connected("aa", "p1", std::slice::from_ref(&moved), "inbound")?;
        let addrs = dir.list(1)?[0].addresses.clone();
        assert_eq!((&addrs[0], &addrs[1]), (&moved, &real));
        Ok(())
    }

    #[test]
    fn long_gone_peers_are_forgotten_and_the_directory_has_a_cap() -> Result<(), StoreError> {
        let store = Store::open_in_memory()?;
        let dir = Directory::new(store.clone());
        for i in 0..5 {
            dir.learned(&format!("n{i}"), "p", &[], "peer-exchange")?;
        }
        dir.connected("live", "p", &[], "inbound")?;
        // Three of them were last heard of long ago.
        store.with_conn(|c| {
            c.execute(
                "UPDATE swarm_nodes SET discovered_at = ?1 WHERE node_id IN ('n0', 'n1', 'n2', 'live')",
                [now_unix() - FORGET_AFTER_SECS - 10],
            )
        })?;
        store.with_conn(|c| {
            c.execute(
                "UPDATE swarm_nodes SET last_seen_at = NULL WHERE node_id = 'live'",
                [],
            )
        })?;
        // The connected one stays however old its row looks.
        assert_eq!(dir.prune(&["live".to_string()])?, 3);
        let mut left: Vec<String> = dir.list(100)?.into_iter().map(|r| r.node_id).collect();
        left.sort();
        assert_eq!(left, vec!["live", "n3", "n4"]);
        Ok(())
    }

    #[test]
    fn lifecycle_connect_fail_backoff_and_misbehave() -> Result<(), StoreError> {
        let dir = Directory::new(Store::open_in_memory()?);
        dir.connected("aa", "p1", &["/ip4/127.0.0.1/tcp/1".into()], "invite")?;
        let rows = dir.list(10)?;
        assert_eq!(rows.len(), 1);
        assert!(rows[0].is_active);
        assert_eq!(rows[0].trust_score, 50);
        dir.disconnected("aa")?;
        dir.dial_failed("aa")?;
        dir.dial_failed("aa")?;
        let r = &dir.list(10)?[0];
        assert!(!r.is_active);
        assert_eq!(r.consecutive_failures, 2);
        assert_eq!(r.trust_score, 46);
        // Backed off: not due right now.
        assert!(dir.due_for_redial(10)?.is_empty());
        assert_eq!(dir.misbehaved("aa")?, Some(36));
        assert_eq!(dir.misbehaved("nobody")?, None);
        assert_eq!(dir.list(10)?[0].bad_frames, 1);
        assert_eq!(dir.list(10)?[0].trust_score, 36);
        dir.connected("aa", "p1", &[], "inbound")?;
        let r = &dir.list(10)?[0];
        assert!(r.is_active && r.consecutive_failures == 0);
        assert_eq!(r.addresses, vec!["/ip4/127.0.0.1/tcp/1".to_string()]);
        Ok(())
    }

    #[test]
    fn seeds_and_sync_log() -> Result<(), StoreError> {
        let dir = Directory::new(Store::open_in_memory()?);
        dir.add_seed("/ip4/127.0.0.1/tcp/5/p2p/x", 10)?;
        dir.add_seed("/ip4/127.0.0.1/tcp/5/p2p/x", 20)?;
        dir.seed_result("/ip4/127.0.0.1/tcp/5/p2p/x", false)?;
        let seeds = dir.seeds()?;
        assert_eq!(seeds.len(), 1);
        assert_eq!((seeds[0].priority, seeds[0].consecutive_failures), (10, 1));
        dir.log_sync("bb", "pull", 1, 0, true, None, 3)?;
        dir.log_sync("bb", "push", 0, 2, false, Some("no peers"), 1)?;
        assert_eq!(dir.sync_log(10)?.len(), 2);
        Ok(())
    }
}
