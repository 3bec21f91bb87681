//! Signed node announcements, gossiped on [`TOPIC`].
//!
//! The body is JSON carried as a string, and the Ed25519 signature covers exactly
//! those bytes (prefixed with a domain tag), so a receiver verifies what was signed
//! rather than a re-serialisation. An announcement is accepted only when its
//! `node_id` is the gossipsub source's key, the signature verifies, and its
//! timestamp is fresh.

use serde::{Deserialize, Serialize};

use crate::identity::{self, Identity};

/// The gossipsub topic.
pub const TOPIC: &str = "swarmllm/announce/1";
const SIGNING_TAG: &[u8] = b"swarmllm announce v1\n";
/// Announcements from further in the future than this are refused (clock skew).
const MAX_SKEW_SECS: i64 = 120;

/// A model (or layer range of one) a node hosts.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct HostedModel {
    /// Model id.
    pub id: String,
    /// First layer held.
    pub layer_start: u32,
    /// One past the last layer held.
    pub layer_end: u32,
    /// Layers in the whole model.
    pub n_layers: u32,
    /// Measured decode compute per layer and token (ms), once known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ms_per_layer: Option<f64>,
    /// BLAKE3 of the manifest the ranges come from (absent for a model served
    /// whole from its GGUF), so holders of different manifests are told apart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifest_hash: Option<String>,
}

/// A short hardware summary.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct HardwareSummary {
    /// CPU model.
    pub cpu: String,
    /// Logical cores.
    pub cores: u32,
    /// RAM in GiB.
    pub ram_gb: f64,
    /// GPU descriptions.
    pub gpus: Vec<String>,
    /// Total GPU memory in GiB.
    pub vram_gb: f64,
}

/// Current load.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Load {
    /// Inference jobs waiting.
    pub queue_depth: u32,
    /// Requests served in the last minute.
    pub requests_per_minute: f64,
    /// Pipeline steps run for others and itself since start ("forwards served").
    #[serde(default)]
    pub steps_served: u64,
    /// Seconds since the node started.
    #[serde(default)]
    pub uptime_secs: u64,
    /// The node's credit totals (signed with the announcement): tiers and the
    /// network leaderboard are computed from these.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credits: Option<CreditSummary>,
    /// Per-model demand this node counted (see `swarm::demand`); checked at
    /// [`verify`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub demand: Vec<crate::swarm::demand::ModelDemand>,
    /// Disk (MiB) auto-manage may still fill here; absent when auto-manage
    /// acquires nothing on this node. Nodes use it to agree who fetches what.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_free_mb: Option<u64>,
    /// `Some(false)` outside the node's contribution hours: it serves only
    /// itself and its pool then, so others' routes leave it out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub contributing: Option<bool>,
}

/// A node's credit totals in micro-credits.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct CreditSummary {
    /// `earned − spent`.
    pub balance: i64,
    /// Received.
    pub earned: i64,
    /// Paid.
    pub spent: i64,
    /// Ledger entries.
    pub entries: i64,
}

/// What a node says about itself.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Announcement {
    /// Hex Ed25519 public key.
    pub node_id: String,
    /// Nickname, if set.
    pub nickname: Option<String>,
    /// Software version.
    pub version: String,
    /// What it can do (`inference`, `relay`, …).
    pub capabilities: Vec<String>,
    /// Hardware summary.
    pub hardware: HardwareSummary,
    /// Region code (`EU`, `NA`, …).
    pub region: String,
    /// Hosted models and layer ranges.
    pub models: Vec<HostedModel>,
    /// Current load.
    pub load: Load,
    /// Multiaddrs it listens on.
    pub addrs: Vec<String>,
    /// Unix seconds when made.
    pub timestamp: i64,
    /// Increases with every announcement of a node's lifetime.
    pub seq: u64,
}

/// The wire form.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SignedAnnouncement {
    /// The announcement as JSON text.
    pub body: String,
    /// Hex Ed25519 signature over `SIGNING_TAG || body`.
    pub signature: String,
}

/// Why an announcement was refused.
#[derive(Debug, thiserror::Error, PartialEq)]
#[non_exhaustive]
pub enum AnnounceError {
    /// Not the wire format.
    #[error("malformed announcement: {0}")]
    Malformed(String),
    /// The signature does not verify for the claimed node.
    #[error("bad signature")]
    BadSignature,
    /// The claimed node is not the peer that published it.
    #[error("announcement for {claimed} published by another peer")]
    WrongSource {
        /// The node id inside.
        claimed: String,
    },
    /// Too old or from the future.
    #[error("stale announcement ({age_secs} s old)")]
    Stale {
        /// Age in seconds (negative: from the future).
        age_secs: i64,
    },
}

impl Announcement {
    /// Signs and encodes for gossip.
    pub fn sign(&self, identity: &Identity) -> Vec<u8> {
        let body = serde_json::to_string(self).unwrap_or_default();
        let mut msg = SIGNING_TAG.to_vec();
        msg.extend_from_slice(body.as_bytes());
        let signature = hex::encode(identity.sign(&msg).to_bytes());
        serde_json::to_vec(&SignedAnnouncement { body, signature }).unwrap_or_default()
    }
}

/// Decodes and verifies a gossiped announcement from the peer whose node id is
/// `source_node_id`, accepting it only if it is at most `ttl_secs` old.
pub fn verify(
    bytes: &[u8],
    source_node_id: &str,
    now: i64,
    ttl_secs: i64,
) -> Result<Announcement, AnnounceError> {
    let signed: SignedAnnouncement =
        serde_json::from_slice(bytes).map_err(|e| AnnounceError::Malformed(e.to_string()))?;
    let ann: Announcement =
        serde_json::from_str(&signed.body).map_err(|e| AnnounceError::Malformed(e.to_string()))?;
    if ann.node_id != source_node_id {
        return Err(AnnounceError::WrongSource {
            claimed: ann.node_id,
        });
    }
    let mut sig = [0u8; 64];
    hex::decode_to_slice(&signed.signature, &mut sig).map_err(|_| AnnounceError::BadSignature)?;
    let mut msg = SIGNING_TAG.to_vec();
    msg.extend_from_slice(signed.body.as_bytes());
    if !identity::verify(
        &ann.node_id,
        &msg,
        &ed25519_dalek::Signature::from_bytes(&sig),
    ) {
        return Err(AnnounceError::BadSignature);
    }
    let age = now - ann.timestamp;
    if age > ttl_secs || age < -MAX_SKEW_SECS {
        return Err(AnnounceError::Stale { age_secs: age });
    }
    if ann.load.demand.len() > crate::swarm::demand::MAX_DEMAND_ENTRIES {
        return Err(AnnounceError::Malformed(format!(
            "{} demand entries (at most {})",
            ann.load.demand.len(),
            crate::swarm::demand::MAX_DEMAND_ENTRIES
        )));
    }
    for d in &ann.load.demand {
        d.validate().map_err(AnnounceError::Malformed)?;
    }
    Ok(ann)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(id: &Identity, ts: i64) -> Announcement {
        Announcement {
            node_id: id.node_id(),
            nickname: Some("n".into()),
            version: "0".into(),
            capabilities: vec!["inference".into()],
            hardware: HardwareSummary::default(),
            region: "EU".into(),
            models: vec![],
            load: Load::default(),
            addrs: vec![],
            timestamp: ts,
            seq: 1,
        }
    }

    #[test]
    fn signed_announcement_verifies() {
        let id = Identity::generate();
        let bytes = sample(&id, 1000).sign(&id);
        let ann = verify(&bytes, &id.node_id(), 1005, 60).expect("valid");
        assert_eq!(ann.nickname.as_deref(), Some("n"));
    }

    #[test]
    fn forged_tampered_misattributed_and_stale_are_refused() {
        let id = Identity::generate();
        let other = Identity::generate();
        // Signed by someone else while claiming `id`.
        let forged = sample(&id, 1000).sign(&other);
        assert_eq!(
            verify(&forged, &id.node_id(), 1000, 60),
            Err(AnnounceError::BadSignature)
        );
        // Body edited after signing.
        let mut signed: SignedAnnouncement =
            serde_json::from_slice(&sample(&id, 1000).sign(&id)).expect("json");
        signed.body = signed.body.replace("\"n\"", "\"evil\"");
        let tampered = serde_json::to_vec(&signed).expect("json");
        assert_eq!(
            verify(&tampered, &id.node_id(), 1000, 60),
            Err(AnnounceError::BadSignature)
        );
        // Valid, but relayed as if another peer published it.
        let good = sample(&id, 1000).sign(&id);
        assert!(matches!(
            verify(&good, &other.node_id(), 1000, 60),
            Err(AnnounceError::WrongSource { .. })
        ));
        // Too old.
        assert!(matches!(
            verify(&good, &id.node_id(), 2000, 60),
            Err(AnnounceError::Stale { .. })
        ));
        assert!(matches!(
            verify(b"garbage", &id.node_id(), 1000, 60),
            Err(AnnounceError::Malformed(_))
        ));
    }
}
