//! The models a node keeps on disk: `<data>/models/<id>/` directories (see the
//! parent module), which shards of each are present and intact, and the runnable
//! range files assembled from them under `<data>/ranges/`.

use std::path::{Path, PathBuf};

use super::gguf::Gguf;
use super::{Manifest, ShardError, assemble, read_manifest};

/// A model directory and what it holds.
#[derive(Debug, Clone)]
pub struct LocalModel {
    /// The directory.
    pub dir: PathBuf,
    /// Its manifest.
    pub manifest: Manifest,
    /// Shards present with the right size and hash.
    pub held: Vec<u32>,
    /// Shards present but damaged (wrong size or hash).
    pub corrupt: Vec<u32>,
}

impl LocalModel {
    /// Maximal runs of consecutive held shards, as `(first, last)`.
    pub fn runs(&self) -> Vec<(u32, u32)> {
        self.runs_without(&Default::default())
    }

    /// Maximal runs of consecutive held shards not in `skip`.
    pub fn runs_without(&self, skip: &std::collections::HashSet<u32>) -> Vec<(u32, u32)> {
        let mut out: Vec<(u32, u32)> = Vec::new();
        for &i in self.held.iter().filter(|i| !skip.contains(i)) {
            match out.last_mut() {
                Some((_, last)) if *last + 1 == i => *last = i,
                _ => out.push((i, i)),
            }
        }
        out
    }
}

/// Reads every model directory under `models_dir`, hashing each present shard.
/// Unreadable directories are skipped with a warning.
pub fn scan(models_dir: &Path) -> Vec<LocalModel> {
    let Ok(entries) = std::fs::read_dir(models_dir) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for entry in entries.flatten() {
        let dir = entry.path();
        if !dir.join("manifest.json").is_file() {
            continue;
        }
        match inspect(&dir) {
            Ok(m) => out.push(m),
            Err(e) => tracing::warn!(dir = %dir.display(), error = %e, "skipping model directory"),
        }
    }
    out.sort_by(|a, b| a.manifest.model_id.cmp(&b.manifest.model_id));
    out
}

/// Reads one model directory, hashing each present shard.
pub fn inspect(dir: &Path) -> Result<LocalModel, ShardError> {
    let manifest = read_manifest(dir)?;
    let mut held = Vec::new();
    let mut corrupt = Vec::new();
    for s in &manifest.shards {
        let path = dir.join(&s.file.file);
        if !path.is_file() {
            continue;
        }
        if s.file.matches_file(&path) {
            held.push(s.index);
        } else {
            corrupt.push(s.index);
        }
    }
    Ok(LocalModel {
        dir: dir.to_path_buf(),
        manifest,
        held,
        corrupt,
    })
}

/// Assembles shards `first..=last` into `<ranges_dir>/<id>-<first>-<last>.gguf`
/// (rebuilt every time: the shards may have changed since).
pub fn range_file(
    model: &LocalModel,
    ranges_dir: &Path,
    first: u32,
    last: u32,
) -> Result<PathBuf, ShardError> {
    std::fs::create_dir_all(ranges_dir).map_err(|source| ShardError::Io {
        path: ranges_dir.to_path_buf(),
        source,
    })?;
    let out = ranges_dir.join(format!("{}-{first}-{last}.gguf", model.manifest.model_id));
    assemble(&model.dir, &model.manifest, first, last, &out)?;
    Ok(out)
}

/// Writes `<ranges_dir>/<id>-vocab.gguf`: the model's metadata (tokenizer, chat
/// template) with no tensors, which llama.cpp loads vocabulary-only. A requester
/// tokenizes, applies the chat template and detokenizes with it without holding
/// any layer.
pub fn vocab_file(
    model_dir: &Path,
    model_id: &str,
    ranges_dir: &Path,
) -> Result<PathBuf, ShardError> {
    std::fs::create_dir_all(ranges_dir).map_err(|source| ShardError::Io {
        path: ranges_dir.to_path_buf(),
        source,
    })?;
    let header = Gguf::read_header(&model_dir.join("gguf_header.bin"))?;
    let mut kv = header.kv.clone();
    kv.retain(|(k, _)| !k.starts_with("swarmllm.shard."));
    let out = ranges_dir.join(format!("{model_id}-vocab.gguf"));
    super::gguf::write(&out, &kv, header.alignment, &[])?;
    Ok(out)
}
