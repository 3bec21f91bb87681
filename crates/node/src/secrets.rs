//! Secret storage: the OS keychain, or an encrypted file when there is none.
//!
//! Secrets (the identity key, the API key) are kept in the platform keychain through
//! the `keyring` crate: the Secret Service on Linux, Keychain on macOS, Credential
//! Manager on Windows. Entries are named per data dir, so two nodes on one machine never
//! share an identity. Where no keychain service runs (headless servers, CI) the secrets
//! go to `<data_dir>/secrets.enc`, sealed with ChaCha20-Poly1305 under a key derived
//! (BLAKE3 `derive_key`) from `SWARMLLM_SECRETS_PASSPHRASE` when set, else from the
//! machine id, else from a random `secrets.key` file beside it. Without a passphrase
//! this keeps secrets out of backups and copies to other machines, not away from a
//! local user who can already read the data dir; the fallback is logged once.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use chacha20poly1305::aead::{Aead, AeadCore, KeyInit, OsRng};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use zeroize::Zeroizing;

const KEYRING_SERVICE: &str = "swarmllm";
const FILE_NAME: &str = "secrets.enc";
const FILE_MAGIC: &[u8; 8] = b"SWLSEC01";
/// Records which backend holds this data dir's secrets.
const BACKEND_MARKER: &str = "secrets.backend";

/// Which backend holds the secrets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SecretBackend {
    /// The OS keychain.
    Keychain,
    /// The encrypted file in the data dir.
    EncryptedFile,
}

/// A secret could not be read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SecretError {
    /// The keychain was required (`secret_store = "keychain"`) but is unavailable.
    #[error("the OS keychain is unavailable: {0}")]
    KeychainUnavailable(String),
    /// The keychain failed on an operation.
    #[error("keychain error: {0}")]
    Keychain(String),
    /// The encrypted file could not be read or written.
    #[error("secret file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The encrypted file does not decrypt: wrong passphrase, other machine, or damage.
    #[error(
        "secret file {0} cannot be decrypted (wrong SWARMLLM_SECRETS_PASSPHRASE, another machine's file, or a damaged file)"
    )]
    Undecryptable(PathBuf),
}

/// Stores named secrets for one data dir.
pub struct SecretStore {
    inner: Backend,
}

impl std::fmt::Debug for SecretStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print secrets; only the backend.
        f.debug_struct("SecretStore")
            .field("backend", &self.backend())
            .finish()
    }
}

enum Backend {
    Keychain { scope: String },
    File(EncryptedFile),
}

impl SecretStore {
    /// Opens the store for `data_dir`. `mode` is the config's `secret_store`:
    /// `auto`, `keychain` or `file`.
    ///
    /// In `auto` mode the first start picks the keychain when one works, else the
    /// file, and records the choice in `<data_dir>/secrets.backend`; later starts stay
    /// with it. A node whose secrets are in the keychain refuses to start while the
    /// keychain is unreachable rather than quietly making a new identity in the file.
    pub fn open(data_dir: &Path, mode: &str) -> Result<Self, SecretError> {
        let scope = scope_for(data_dir);
        let marker = data_dir.join(BACKEND_MARKER);
        let recorded = std::fs::read_to_string(&marker).ok();
        let want = match (mode, recorded.as_deref().map(str::trim)) {
            ("file", _) | ("auto", Some("file")) => "file",
            ("keychain", _) | ("auto", Some("keychain")) => "keychain",
            _ => "auto",
        };
        let backend = if want == "file" {
            Backend::File(EncryptedFile::open(data_dir)?)
        } else {
            match keychain_probe_with_retries(&scope) {
                Ok(()) => Backend::Keychain { scope },
                Err(reason) if want == "keychain" => {
                    return Err(SecretError::KeychainUnavailable(reason));
                }
                Err(reason) => {
                    static LOGGED: std::sync::Once = std::sync::Once::new();
                    LOGGED.call_once(|| {
                        tracing::warn!(
                            %reason,
                            "no OS keychain available; secrets are kept in an encrypted file in the data dir"
                        );
                    });
                    Backend::File(EncryptedFile::open(data_dir)?)
                }
            }
        };
        let chosen = match backend {
            Backend::Keychain { .. } => "keychain",
            Backend::File(_) => "file",
        };
        if recorded.as_deref().map(str::trim) != Some(chosen) {
            std::fs::create_dir_all(data_dir)
                .and_then(|()| crate::fsutil::write_atomic(&marker, chosen.as_bytes()))
                .map_err(|source| SecretError::Io {
                    path: marker.clone(),
                    source,
                })?;
        }
        Ok(Self { inner: backend })
    }

    /// Whether a store was ever opened for `data_dir` (a node started there).
    pub fn initialised(data_dir: &Path) -> bool {
        data_dir.join(BACKEND_MARKER).is_file()
    }

    /// The backend in use.
    pub fn backend(&self) -> SecretBackend {
        match self.inner {
            Backend::Keychain { .. } => SecretBackend::Keychain,
            Backend::File(_) => SecretBackend::EncryptedFile,
        }
    }

    /// Reads a secret.
    pub fn get(&self, name: &str) -> Result<Option<Zeroizing<String>>, SecretError> {
        match &self.inner {
            Backend::Keychain { scope } => match entry(scope, name)?.get_password() {
                Ok(v) => Ok(Some(Zeroizing::new(v))),
                Err(keyring::Error::NoEntry) => Ok(None),
                Err(e) => Err(SecretError::Keychain(e.to_string())),
            },
            Backend::File(f) => f.get(name),
        }
    }

    /// Writes a secret.
    pub fn set(&self, name: &str, value: &str) -> Result<(), SecretError> {
        match &self.inner {
            Backend::Keychain { scope } => entry(scope, name)?
                .set_password(value)
                .map_err(|e| SecretError::Keychain(e.to_string())),
            Backend::File(f) => f.set(name, value),
        }
    }

    /// Reads a secret, creating it with `make` on first use.
    pub fn get_or_create(
        &self,
        name: &str,
        make: impl FnOnce() -> Zeroizing<String>,
    ) -> Result<Zeroizing<String>, SecretError> {
        if let Some(v) = self.get(name)? {
            return Ok(v);
        }
        let v = make();
        self.set(name, &v)?;
        Ok(v)
    }
}

/// Keychain entries are scoped by a hash of the canonical data dir path.
fn scope_for(data_dir: &Path) -> String {
    let canonical = data_dir
        .canonicalize()
        .unwrap_or_else(|_| data_dir.to_path_buf());
    let hash = blake3::hash(canonical.to_string_lossy().as_bytes());
    hex::encode(&hash.as_bytes()[..8])
}

fn entry(scope: &str, name: &str) -> Result<keyring::Entry, SecretError> {
    keyring::Entry::new(KEYRING_SERVICE, &format!("{scope}:{name}"))
        .map_err(|e| SecretError::Keychain(e.to_string()))
}

/// [`keychain_probe`], retried briefly: a Secret Service started on demand by D-Bus
/// can refuse the first calls.
fn keychain_probe_with_retries(scope: &str) -> Result<(), String> {
    let mut last = String::new();
    for attempt in 0..4 {
        match keychain_probe(scope) {
            Ok(()) => return Ok(()),
            // No keychain service at all: retrying will not help.
            Err(e) if keyring::Entry::store_status().is_err() => return Err(e),
            Err(e) => last = e,
        }
        std::thread::sleep(std::time::Duration::from_millis(100 << attempt));
    }
    Err(last)
}

/// Checks that a keychain service answers and accepts writes (a locked keyring
/// with no way to prompt for its password answers reads but refuses writes), by
/// writing and removing a probe entry.
fn keychain_probe(scope: &str) -> Result<(), String> {
    if let Err(e) = keyring::Entry::store_status() {
        return Err(e.to_string());
    }
    let probe = keyring::Entry::new(KEYRING_SERVICE, &format!("{scope}:probe"))
        .map_err(|e| e.to_string())?;
    probe.set_password("probe").map_err(|e| e.to_string())?;
    match probe.delete_credential() {
        Ok(()) | Err(keyring::Error::NoEntry) => Ok(()),
        Err(e) => Err(e.to_string()),
    }
}

/// The file fallback: a JSON map of name → value, sealed as one blob.
struct EncryptedFile {
    path: PathBuf,
    key: Zeroizing<[u8; 32]>,
    // Serialises read-modify-write cycles within the process.
    lock: Mutex<()>,
}

impl EncryptedFile {
    fn open(data_dir: &Path) -> Result<Self, SecretError> {
        std::fs::create_dir_all(data_dir).map_err(|source| SecretError::Io {
            path: data_dir.to_path_buf(),
            source,
        })?;
        let key = file_key(data_dir)?;
        Ok(Self {
            path: data_dir.join(FILE_NAME),
            key,
            lock: Mutex::new(()),
        })
    }

    fn read_all(&self) -> Result<BTreeMap<String, String>, SecretError> {
        let bytes = match std::fs::read(&self.path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
            Err(source) => {
                return Err(SecretError::Io {
                    path: self.path.clone(),
                    source,
                });
            }
        };
        let bad = || SecretError::Undecryptable(self.path.clone());
        if bytes.len() < FILE_MAGIC.len() + 12 || &bytes[..FILE_MAGIC.len()] != FILE_MAGIC {
            return Err(bad());
        }
        let (nonce, sealed) = bytes[FILE_MAGIC.len()..].split_at(12);
        let cipher = ChaCha20Poly1305::new(Key::from_slice(self.key.as_ref()));
        let plain = Zeroizing::new(
            cipher
                .decrypt(Nonce::from_slice(nonce), sealed)
                .map_err(|_| bad())?,
        );
        serde_json::from_slice(&plain).map_err(|_| bad())
    }

    fn write_all(&self, map: &BTreeMap<String, String>) -> Result<(), SecretError> {
        let plain = Zeroizing::new(serde_json::to_vec(map).map_err(|e| SecretError::Io {
            path: self.path.clone(),
            source: std::io::Error::other(e),
        })?);
        let cipher = ChaCha20Poly1305::new(Key::from_slice(self.key.as_ref()));
        let nonce = ChaCha20Poly1305::generate_nonce(&mut OsRng);
        let sealed = cipher
            .encrypt(&nonce, plain.as_slice())
            .map_err(|_| SecretError::Undecryptable(self.path.clone()))?;
        let mut out = Vec::with_capacity(FILE_MAGIC.len() + nonce.len() + sealed.len());
        out.extend_from_slice(FILE_MAGIC);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        crate::fsutil::write_private_atomic(&self.path, &out).map_err(|source| SecretError::Io {
            path: self.path.clone(),
            source,
        })
    }

    fn get(&self, name: &str) -> Result<Option<Zeroizing<String>>, SecretError> {
        let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        Ok(self.read_all()?.remove(name).map(Zeroizing::new))
    }

    fn set(&self, name: &str, value: &str) -> Result<(), SecretError> {
        let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let mut map = self.read_all()?;
        map.insert(name.to_string(), value.to_string());
        let result = self.write_all(&map);
        // Wipe the decrypted copies before the map is dropped.
        for v in map.values_mut() {
            zeroize::Zeroize::zeroize(v);
        }
        result
    }
}

fn file_key(data_dir: &Path) -> Result<Zeroizing<[u8; 32]>, SecretError> {
    const CONTEXT: &str = "swarmllm 2026 secret file key v1";
    if let Ok(pass) = std::env::var("SWARMLLM_SECRETS_PASSPHRASE")
        && !pass.is_empty()
    {
        return Ok(Zeroizing::new(blake3::derive_key(CONTEXT, pass.as_bytes())));
    }
    for id_file in ["/etc/machine-id", "/var/lib/dbus/machine-id"] {
        if let Ok(id) = std::fs::read_to_string(id_file) {
            let id = id.trim();
            if !id.is_empty() {
                return Ok(Zeroizing::new(blake3::derive_key(CONTEXT, id.as_bytes())));
            }
        }
    }
    // No machine id (some containers, Windows/macOS without a keychain): a random key
    // kept beside the secrets, readable by the owner only.
    let key_path = data_dir.join("secrets.key");
    let io = |source| SecretError::Io {
        path: key_path.clone(),
        source,
    };
    match std::fs::read(&key_path) {
        Ok(bytes) if bytes.len() == 32 => {
            let mut k = Zeroizing::new([0u8; 32]);
            k.copy_from_slice(&bytes);
            Ok(k)
        }
        Ok(_) => Err(SecretError::Undecryptable(key_path)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut k = Zeroizing::new([0u8; 32]);
            rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, k.as_mut());
            crate::fsutil::write_private_atomic(&key_path, k.as_ref()).map_err(io)?;
            Ok(k)
        }
        Err(e) => Err(io(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_store_round_trips_and_hides_plaintext() -> Result<(), SecretError> {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SecretStore::open(dir.path(), "file")?;
        assert_eq!(store.backend(), SecretBackend::EncryptedFile);
        assert!(store.get("api_key")?.is_none());
        store.set("api_key", "very-secret-value")?;
        store.set("other", "x")?;
        assert_eq!(
            store.get("api_key")?.as_deref().map(String::as_str),
            Some("very-secret-value")
        );
        let raw = std::fs::read(dir.path().join(FILE_NAME)).expect("read");
        assert!(!raw.windows(17).any(|w| w == b"very-secret-value"));
        // A second handle (a restart) reads the same values.
        let again = SecretStore::open(dir.path(), "file")?;
        assert_eq!(
            again.get("other")?.as_deref().map(String::as_str),
            Some("x")
        );
        Ok(())
    }

    #[test]
    fn the_first_choice_of_backend_sticks() -> Result<(), SecretError> {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join(BACKEND_MARKER), "keychain").expect("marker");
        // No keychain on this machine (tests run without one): a data dir whose
        // secrets live in the keychain must not silently get new ones in a file.
        if keyring::Entry::store_status().is_err() {
            assert!(matches!(
                SecretStore::open(dir.path(), "auto"),
                Err(SecretError::KeychainUnavailable(_))
            ));
        }
        let other = tempfile::tempdir().expect("tempdir");
        let store = SecretStore::open(other.path(), "file")?;
        assert_eq!(store.backend(), SecretBackend::EncryptedFile);
        let marker = std::fs::read_to_string(other.path().join(BACKEND_MARKER)).expect("marker");
        assert_eq!(marker, "file");
        assert_eq!(
            SecretStore::open(other.path(), "auto")?.backend(),
            SecretBackend::EncryptedFile
        );
        Ok(())
    }

    #[test]
    fn tampered_file_is_rejected() -> Result<(), SecretError> {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SecretStore::open(dir.path(), "file")?;
        store.set("k", "v")?;
        let path = dir.path().join(FILE_NAME);
        let mut raw = std::fs::read(&path).expect("read");
        let last = raw.len() - 1;
        raw[last] ^= 1;
        std::fs::write(&path, raw).expect("write");
        assert!(matches!(store.get("k"), Err(SecretError::Undecryptable(_))));
        Ok(())
    }
}
