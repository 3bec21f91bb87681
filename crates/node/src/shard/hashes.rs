//! `shard_hashes.json`: the BLAKE3 of each shard file this node holds.
//!
//! The manifest names every shard's size and header but not a hash of its tensor
//! bytes (a node that fetched one shard's ranges from the Hub cannot know the
//! others'). Each holder records the hash of the files it wrote from the source
//! or received and checked, serves that record to peers, and checks its own files
//! against it on every scan, so a damaged file is found and fetched again.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use super::manifest::{ModelDir, is_digest_hex};

/// Largest record accepted (from disk or a peer).
pub const MAX_HASHES_BYTES: u64 = 256 << 10;

/// The record: shard index to the BLAKE3 (hex) of its file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ShardHashes {
    /// By shard index.
    pub shards: BTreeMap<u32, String>,
}

/// Serialises read-modify-write of the records (parallel downloads of one model
/// each add their shard).
static WRITES: Mutex<()> = Mutex::new(());

impl ShardHashes {
    /// Parses a record (from disk or a peer), keeping only well-formed entries of
    /// shards below `shard_count`.
    pub fn from_json(bytes: &[u8], shard_count: u32) -> Option<ShardHashes> {
        if bytes.len() as u64 > MAX_HASHES_BYTES {
            return None;
        }
        let mut h: ShardHashes = serde_json::from_slice(bytes).ok()?;
        h.shards
            .retain(|&i, hash| i < shard_count && is_digest_hex(hash));
        Some(h)
    }

    /// The record in `dir` (empty when there is none or it is unreadable).
    pub fn load(dir: &ModelDir, shard_count: u32) -> ShardHashes {
        let path = dir.hashes();
        match std::fs::metadata(&path) {
            Ok(m) if m.len() <= MAX_HASHES_BYTES => std::fs::read(&path)
                .ok()
                .and_then(|b| Self::from_json(&b, shard_count))
                .unwrap_or_default(),
            _ => ShardHashes::default(),
        }
    }

    /// The hash recorded for shard `index`.
    pub fn get(&self, index: u32) -> Option<&str> {
        self.shards.get(&index).map(String::as_str)
    }

    /// Records (or, with `None`, forgets) the hash of shard `index` in `dir`.
    pub fn record(
        dir: &ModelDir,
        shard_count: u32,
        index: u32,
        hash: Option<&str>,
    ) -> std::io::Result<()> {
        let _guard = WRITES.lock().unwrap_or_else(|p| p.into_inner());
        let mut h = Self::load(dir, shard_count);
        match hash {
            Some(hash) => h.shards.insert(index, hash.to_string()),
            None => h.shards.remove(&index),
        };
        let text = serde_json::to_vec_pretty(&h).map_err(std::io::Error::other)?;
        crate::fsutil::write_atomic(&dir.hashes(), &text)
    }
}

/// Files whose hash is remembered (the cache starts over beyond it).
const MAX_CACHED: usize = 4096;

/// BLAKE3 (hex) of the file at `path`, reusing the last result while the file's
/// size and modification time are unchanged: a rescan then reads only files
/// that are new or changed, not every shard of every model.
pub fn blake3_cached(path: &Path) -> std::io::Result<String> {
    type Seen = HashMap<std::path::PathBuf, (u64, std::time::SystemTime, String)>;
    static CACHE: Mutex<Option<Seen>> = Mutex::new(None);
    let meta = std::fs::metadata(path)?;
    let key = (meta.len(), meta.modified()?);
    if let Some((len, modified, hash)) = CACHE
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .as_ref()
        .and_then(|c| c.get(path))
        && (*len, *modified) == key
    {
        return Ok(hash.clone());
    }
    let (hash, _) = blake3_of(path)?;
    let mut cache = CACHE.lock().unwrap_or_else(|p| p.into_inner());
    let cache = cache.get_or_insert_with(HashMap::new);
    if cache.len() >= MAX_CACHED {
        cache.clear();
    }
    cache.insert(path.to_path_buf(), (key.0, key.1, hash.clone()));
    Ok(hash)
}

/// BLAKE3 (hex) and length of the file at `path`.
pub fn blake3_of(path: &Path) -> std::io::Result<(String, u64)> {
    let mut hasher = blake3::Hasher::new();
    let file = std::fs::File::open(path)?;
    let n = hasher.update_reader(file)?.count();
    Ok((hasher.finalize().to_hex().to_string(), n))
}
