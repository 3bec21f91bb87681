//! The models a node keeps on disk: `<data>/models/<id>/` directories (see the
//! parent module), which shards of each are present and intact, and the runnable
//! range files assembled from them under `<data>/ranges/`.

use std::path::{Path, PathBuf};

use super::gguf::Gguf;
use super::{
    Manifest, ModelDir, ShardCheck, ShardError, ShardHashes, assemble, check_shard, read_manifest,
    read_plan,
};

/// A model directory and what it holds.
#[derive(Debug, Clone)]
pub struct LocalModel {
    /// The directory.
    pub dir: ModelDir,
    /// Its manifest.
    pub manifest: Manifest,
    /// [`Manifest::hash`].
    pub manifest_hash: String,
    /// Shards present with the right size and hash.
    pub held: Vec<u32>,
    /// Shards present but damaged (wrong size or hash).
    pub corrupt: Vec<u32>,
    /// The BLAKE3 recorded for each held shard's file.
    pub hashes: ShardHashes,
}

impl LocalModel {
    /// Bytes of the shards held here.
    pub fn held_bytes(&self) -> u64 {
        self.manifest
            .shards
            .iter()
            .filter(|s| self.held.contains(&s.index))
            .map(|s| s.bytes)
            .sum()
    }

    /// Bytes the model takes on disk here: its held shards and its header.
    pub fn disk_bytes(&self) -> u64 {
        self.held_bytes() + self.manifest.header.bytes
    }

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

/// A model directory that could not be used: its manifest is missing a rule
/// (see `Manifest::validate`) or unreadable. Reported, never loaded.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RejectedModel {
    /// The directory's name.
    pub dir: String,
    /// The rule it broke (`file_name`, `layer_ranges`, …), when one did.
    pub rule: Option<&'static str>,
    /// What is wrong.
    pub error: String,
}

/// What a scan of the models directory found.
#[derive(Debug, Clone, Default)]
pub struct Scan {
    /// Usable models, by id.
    pub models: Vec<LocalModel>,
    /// Directories that were skipped, with why.
    pub rejected: Vec<RejectedModel>,
}

/// Reads every model directory under `models_dir`, hashing each present shard.
/// A directory whose manifest is bad is reported in [`Scan::rejected`] and skipped.
pub fn scan(models_dir: &Path) -> Scan {
    let Ok(entries) = std::fs::read_dir(models_dir) else {
        return Scan::default();
    };
    let mut out = Scan::default();
    for entry in entries.flatten() {
        let dir = entry.path();
        if !dir.join(super::manifest::MANIFEST_FILE).is_file() {
            continue;
        }
        match inspect(&dir) {
            Ok(m) => out.models.push(m),
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "skipping model directory");
                out.rejected.push(RejectedModel {
                    dir: entry.file_name().to_string_lossy().into_owned(),
                    rule: match &e {
                        ShardError::BadManifest(m) => Some(m.rule),
                        _ => None,
                    },
                    error: e.to_string(),
                });
            }
        }
    }
    out.models
        .sort_by(|a, b| a.manifest.model_id.cmp(&b.manifest.model_id));
    out.rejected.sort_by(|a, b| a.dir.cmp(&b.dir));
    out
}

/// Reads one model directory, checking each present shard against the plan its
/// header implies and the hash recorded for it. A shard file with no record (put
/// there by hand, then rescanned) whose structure fits is recorded as it is.
pub fn inspect(dir: &Path) -> Result<LocalModel, ShardError> {
    let manifest = read_manifest(dir)?;
    let dir = ModelDir::existing(dir.to_path_buf());
    let mut held = Vec::new();
    let mut corrupt = Vec::new();
    let present: Vec<&super::ShardEntry> = manifest
        .shards
        .iter()
        .filter(|s| dir.shard(s).is_file())
        .collect();
    if !present.is_empty() {
        // A header that does not fit the manifest makes every shard unusable.
        let plan = read_plan(&dir, &manifest).map(|(_, p)| p);
        let recorded = ShardHashes::load(&dir, manifest.shard_count());
        for s in present {
            let path = dir.shard(s);
            let checked = match &plan {
                Ok(plan) => check_shard(&dir, plan, &recorded, s),
                Err(e) => ShardCheck::Damaged(e.to_string()),
            };
            match checked {
                ShardCheck::Intact(_) => held.push(s.index),
                ShardCheck::Unrecorded(hash) => {
                    if let Err(e) =
                        ShardHashes::record(&dir, manifest.shard_count(), s.index, Some(&hash))
                    {
                        tracing::warn!(file = %path.display(), error = %e, "could not record a shard's hash");
                    }
                    held.push(s.index);
                }
                ShardCheck::Damaged(why) => {
                    tracing::warn!(file = %path.display(), problem = %why,
                        "shard file does not fit its manifest or does not match its BLAKE3");
                    corrupt.push(s.index);
                }
            }
        }
    }
    let mut hashes = ShardHashes::load(&dir, manifest.shard_count());
    hashes.shards.retain(|i, _| held.contains(i));
    Ok(LocalModel {
        hashes,
        dir,
        manifest_hash: manifest.hash(),
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
    assemble(model.dir.path(), &model.manifest, first, last, &out)?;
    Ok(out)
}

/// Writes `<ranges_dir>/<id>-vocab.gguf`: the model's metadata (tokenizer, chat
/// template) with no tensors, which llama.cpp loads vocabulary-only. A requester
/// tokenizes, applies the chat template and detokenizes with it without holding
/// any layer.
pub fn vocab_file(
    model_dir: &ModelDir,
    model_id: &str,
    ranges_dir: &Path,
) -> Result<PathBuf, ShardError> {
    std::fs::create_dir_all(ranges_dir).map_err(|source| ShardError::Io {
        path: ranges_dir.to_path_buf(),
        source,
    })?;
    let header = Gguf::read_header(&model_dir.header())?;
    let mut kv = header.kv.clone();
    kv.retain(|(k, _)| !k.starts_with("swarmllm.shard."));
    let out = ranges_dir.join(format!("{model_id}-vocab.gguf"));
    // Written beside and renamed into place: a reader never sees half a file.
    let tmp = ranges_dir.join(format!(".{model_id}-vocab.gguf.{}", std::process::id()));
    super::gguf::write(&tmp, &kv, header.alignment, &[])?;
    std::fs::rename(&tmp, &out).map_err(|source| ShardError::Io {
        path: out.clone(),
        source,
    })?;
    Ok(out)
}
