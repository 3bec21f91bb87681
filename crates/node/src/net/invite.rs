//! Network invite codes: `swarm://` + base64url(nonce ‖ ChaCha20-Poly1305(addresses)).
//!
//! The code carries a node's peer id and reachable multiaddrs, sealed under a key
//! derived from the network name (BLAKE3 `derive_key`), so no address is readable in
//! the code and any edit to it fails authentication. Every node of the same network
//! derives the same key: the seal hides addresses from people who see the code, it is
//! not an access control.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chacha20poly1305::aead::{Aead, AeadCore, KeyInit, OsRng};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use serde::{Deserialize, Serialize};

const PREFIX: &str = "swarm://";
const KEY_CONTEXT: &str = "swarmllm 2026 network invite code v1";

/// What a code says.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Invite {
    /// The inviting node's libp2p peer id.
    #[serde(rename = "p")]
    pub peer_id: String,
    /// Its reachable multiaddrs.
    #[serde(rename = "a")]
    pub addrs: Vec<String>,
}

/// A code that cannot be used.
#[derive(Debug, thiserror::Error, PartialEq)]
#[non_exhaustive]
pub enum InviteError {
    /// Not `swarm://…` or not base64url.
    #[error("not a network code (expected swarm://…)")]
    Malformed,
    /// Authentication failed: edited, truncated, or from another network.
    #[error("the network code is damaged or belongs to another network")]
    Tampered,
}

fn key(network: &str) -> Key {
    Key::from(blake3::derive_key(KEY_CONTEXT, network.as_bytes()))
}

/// Seals an invite for `network`.
pub fn encode(invite: &Invite, network: &str) -> String {
    let cipher = ChaCha20Poly1305::new(&key(network));
    let nonce = ChaCha20Poly1305::generate_nonce(&mut OsRng);
    let plain = serde_json::to_vec(invite).unwrap_or_default();
    let sealed = cipher.encrypt(&nonce, plain.as_slice()).unwrap_or_default();
    let mut raw = nonce.to_vec();
    raw.extend_from_slice(&sealed);
    format!("{PREFIX}{}", URL_SAFE_NO_PAD.encode(raw))
}

/// Opens a code for `network`.
pub fn decode(code: &str, network: &str) -> Result<Invite, InviteError> {
    let body = code
        .trim()
        .strip_prefix(PREFIX)
        .ok_or(InviteError::Malformed)?;
    let raw = URL_SAFE_NO_PAD
        .decode(body)
        .map_err(|_| InviteError::Malformed)?;
    if raw.len() < 12 + 16 {
        return Err(InviteError::Malformed);
    }
    let (nonce, sealed) = raw.split_at(12);
    let plain = ChaCha20Poly1305::new(&key(network))
        .decrypt(Nonce::from_slice(nonce), sealed)
        .map_err(|_| InviteError::Tampered)?;
    serde_json::from_slice(&plain).map_err(|_| InviteError::Tampered)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn invite() -> Invite {
        Invite {
            peer_id: "12D3KooWabc".into(),
            addrs: vec!["/ip4/127.0.0.1/tcp/4001".into()],
        }
    }

    #[test]
    fn round_trips_and_hides_addresses() {
        let code = encode(&invite(), "swarmllm");
        assert!(code.starts_with("swarm://"));
        assert!(!code.contains("127.0.0.1") && !code.contains("4001"));
        assert_eq!(decode(&code, "swarmllm"), Ok(invite()));
    }

    #[test]
    fn tampered_malformed_and_foreign_codes_fail() {
        let code = encode(&invite(), "swarmllm");
        let mut chars: Vec<char> = code.chars().collect();
        let i = chars.len() - 5;
        chars[i] = if chars[i] == 'A' { 'B' } else { 'A' };
        let tampered: String = chars.into_iter().collect();
        assert_eq!(decode(&tampered, "swarmllm"), Err(InviteError::Tampered));
        assert_eq!(decode(&code, "other-network"), Err(InviteError::Tampered));
        assert_eq!(decode("http://x", "swarmllm"), Err(InviteError::Malformed));
        assert_eq!(
            decode("swarm://!!!", "swarmllm"),
            Err(InviteError::Malformed)
        );
        assert_eq!(
            decode("swarm://AAAA", "swarmllm"),
            Err(InviteError::Malformed)
        );
    }
}
