//! The node's identity (an Ed25519 key pair) and its API key.
//!
//! The node id is the 64 hex characters of the Ed25519 public key. Both secrets live
//! in the [`SecretStore`]; neither is ever logged.

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use rand::RngCore;
use zeroize::Zeroizing;

use crate::secrets::{SecretError, SecretStore};

const IDENTITY_SECRET: &str = "identity";
const API_KEY_SECRET: &str = "api_key";

/// Loading or creating the identity failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// The secret store failed.
    #[error(transparent)]
    Secret(#[from] SecretError),
    /// The stored key is not 32 hex-encoded bytes.
    #[error("the stored identity key is malformed")]
    Malformed,
}

/// The node's signing identity.
#[derive(Clone)]
pub struct Identity {
    key: SigningKey,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("node_id", &self.node_id())
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// Loads the identity from the store, generating and saving one on first start.
    pub fn load_or_create(store: &SecretStore) -> Result<Self, IdentityError> {
        let hex_key = store.get_or_create(IDENTITY_SECRET, || {
            let key = SigningKey::generate(&mut rand::rngs::OsRng);
            Zeroizing::new(hex::encode(key.to_bytes()))
        })?;
        let mut bytes = Zeroizing::new([0u8; 32]);
        hex::decode_to_slice(hex_key.as_bytes(), bytes.as_mut())
            .map_err(|_| IdentityError::Malformed)?;
        Ok(Self {
            key: SigningKey::from_bytes(&bytes),
        })
    }

    /// The identity with this Ed25519 secret (fixed identities for fuzzing and
    /// reproducible tests).
    pub fn from_secret_bytes(secret: &[u8; 32]) -> Self {
        Self {
            key: SigningKey::from_bytes(secret),
        }
    }

    /// A fresh random identity (tests, ephemeral nodes).
    pub fn generate() -> Self {
        Self {
            key: SigningKey::generate(&mut rand::rngs::OsRng),
        }
    }

    /// 64 hex characters of the public key.
    pub fn node_id(&self) -> String {
        hex::encode(self.key.verifying_key().as_bytes())
    }

    /// The public key.
    pub fn public_key(&self) -> VerifyingKey {
        self.key.verifying_key()
    }

    /// Signs `message`.
    pub fn sign(&self, message: &[u8]) -> Signature {
        self.key.sign(message)
    }

    /// The secret key bytes, for deriving transport keys (the P2P layer's PeerId).
    pub fn secret_bytes(&self) -> Zeroizing<[u8; 32]> {
        Zeroizing::new(self.key.to_bytes())
    }

    /// The identity key in X25519 form (RFC 7748 birational map), so any node can
    /// agree a key with any other knowing only its node id.
    pub fn x25519_secret(&self) -> x25519_dalek::StaticSecret {
        x25519_dalek::StaticSecret::from(self.key.to_scalar_bytes())
    }
}

/// The X25519 public key of node `node_id`, if it is a valid Ed25519 key.
pub fn x25519_public(node_id: &str) -> Option<x25519_dalek::PublicKey> {
    let mut bytes = [0u8; 32];
    hex::decode_to_slice(node_id, &mut bytes).ok()?;
    let key = VerifyingKey::from_bytes(&bytes).ok()?;
    Some(x25519_dalek::PublicKey::from(
        key.to_montgomery().to_bytes(),
    ))
}

/// Verifies `signature` over `message` by the node `node_id` (64 hex chars).
pub fn verify(node_id: &str, message: &[u8], signature: &Signature) -> bool {
    let mut bytes = [0u8; 32];
    if hex::decode_to_slice(node_id, &mut bytes).is_err() {
        return false;
    }
    VerifyingKey::from_bytes(&bytes)
        .map(|k| k.verify(message, signature).is_ok())
        .unwrap_or(false)
}

/// The bearer API key: `SWARMLLM_API_KEY` when set, else the stored one, generated on
/// first start.
pub fn load_or_create_api_key(store: &SecretStore) -> Result<Zeroizing<String>, SecretError> {
    if let Some(key) = api_key_from_env() {
        return Ok(key);
    }
    store.get_or_create(API_KEY_SECRET, || {
        let mut raw = [0u8; 24];
        rand::rngs::OsRng.fill_bytes(&mut raw);
        Zeroizing::new(format!("swl-{}", hex::encode(raw)))
    })
}

/// `SWARMLLM_API_KEY`, when set and not empty.
fn api_key_from_env() -> Option<Zeroizing<String>> {
    std::env::var("SWARMLLM_API_KEY")
        .ok()
        .filter(|k| !k.is_empty())
        .map(Zeroizing::new)
}

/// Reads the API key a node with this data dir uses, without creating one (for CLI
/// clients on the same machine): `SWARMLLM_API_KEY` when set, else the stored key.
pub fn read_api_key(
    data_dir: &std::path::Path,
    secret_store: &str,
) -> Result<Option<Zeroizing<String>>, SecretError> {
    if let Some(key) = api_key_from_env() {
        return Ok(Some(key));
    }
    if !SecretStore::initialised(data_dir) {
        return Ok(None); // no node has started with this data dir yet
    }
    SecretStore::open(data_dir, secret_store)?.get(API_KEY_SECRET)
}

#[cfg(test)]
mod tests {
    #[test]
    fn x25519_forms_agree_both_ways() {
        let (a, b) = (Identity::generate(), Identity::generate());
        let ab = a
            .x25519_secret()
            .diffie_hellman(&x25519_public(&b.node_id()).expect("valid"));
        let ba = b
            .x25519_secret()
            .diffie_hellman(&x25519_public(&a.node_id()).expect("valid"));
        assert_eq!(ab.as_bytes(), ba.as_bytes());
        assert!(x25519_public("zz").is_none());
    }

    use super::*;

    #[test]
    fn identity_persists_and_signs() -> Result<(), IdentityError> {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SecretStore::open(dir.path(), "file")?;
        let a = Identity::load_or_create(&store)?;
        let b = Identity::load_or_create(&store)?;
        assert_eq!(a.node_id(), b.node_id());
        assert_eq!(a.node_id().len(), 64);
        let sig = a.sign(b"hello");
        assert!(verify(&a.node_id(), b"hello", &sig));
        assert!(!verify(&a.node_id(), b"hellO", &sig));
        assert!(!verify(&Identity::generate().node_id(), b"hello", &sig));
        Ok(())
    }
}
