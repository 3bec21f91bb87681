//! Shards straight from the Hugging Face Hub.
//!
//! The file's header is read with range requests and split by the same plan a
//! local import follows ([`crate::shard::plan`]), so the manifest, the header and
//! every shard file are byte for byte what `models import` makes from the whole
//! file. Then:
//!
//! - **some shards** (`shard_indices`, or this node's fair share): each shard file
//!   is written as `shard-NNN.gguf.part` from its header (known from the plan) and
//!   the byte ranges of its tensors, read from the Hub's CDN. Only those ranges
//!   cross the network. The finished file must fit the plan (size, header) and,
//!   where holders in the swarm attest a BLAKE3 for the shard, match it.
//! - **every shard**: the whole file is read in order into `source.gguf.part`,
//!   then split locally while its SHA-256 is computed beside the split; the
//!   shards are installed only when it matches the one the Hub names, so wrong
//!   bytes from the server are caught by the hash.
//!
//! Either way a download resumes from its `.part` file (after a crash or kill -9
//! the node restarts the downloads `hf_source.json` still lists as pending) and
//! never reads finished bytes again.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde::{Deserialize, Serialize};
use sha2::Digest;
use tokio_util::sync::CancellationToken;

use super::Pipeline;
use super::transfer::{DownloadStatus, TransferError};
use crate::hub::probe::Probed;
use crate::hub::{Hub, HubError};
use crate::shard::parts::Piece;
use crate::shard::{self, Manifest, ModelDir, ModelPlan, ShardHashes, ShardPlan, SourceFile};

/// Where a model came from on the Hub, and which shards this node still wants
/// from it (`hf_source.json` in the model directory).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HubSource {
    /// Repository.
    pub repo_id: String,
    /// Path in the repository.
    pub filename: String,
    /// Commit it was resolved at.
    pub commit: Option<String>,
    /// Shards still to download.
    #[serde(default)]
    pub pending: Vec<u32>,
}

/// The source file of `hf_source.json`.
pub const SOURCE_FILE: &str = "hf_source.json";
/// The whole file while it downloads (the every-shard path).
const WHOLE_PART: &str = "source.gguf.part";
/// Attempts per range before a shard fails (each re-resolves the file: a CDN's
/// signed URL expires).
const RANGE_RETRIES: u32 = 4;

/// What to fetch.
#[derive(Debug, Clone, Default)]
pub struct HubFetch {
    /// Repository.
    pub repo_id: String,
    /// Path in it.
    pub filename: String,
    /// Revision (default `main`).
    pub revision: Option<String>,
    /// Shard count (default: [`Probed::default_shards`]).
    pub shards: Option<u32>,
    /// Which shards; `None` with `fair_share` false means all.
    pub shard_indices: Option<Vec<u32>>,
    /// This node's fair share instead of a list.
    pub fair_share: bool,
    /// Model id (default: from the file name).
    pub model_id: Option<String>,
}

/// A started Hub download.
#[derive(Debug, Clone, Serialize)]
pub struct HubStarted {
    /// Model id.
    pub model_id: String,
    /// Shards being fetched (already-held ones are left out).
    pub shard_indices: Vec<u32>,
    /// Shards already here.
    pub already_local: Vec<u32>,
    /// Shard count of the split.
    pub shard_count: u32,
    /// `ranges` (only the wanted shards' bytes) or `whole` (every byte, SHA-256
    /// checked).
    pub mode: &'static str,
    /// Bytes that will cross the network.
    pub bytes_to_fetch: u64,
    /// The downloads' ids in `GET /api/admin/downloads`.
    pub download_ids: Vec<String>,
    /// The file's size.
    pub file_bytes: u64,
}

/// A node's fair share of a model's shards: rendezvous hashing over the swarm's
/// members, balanced. Each member scores each shard with
/// BLAKE3(BLAKE3(node_id ‖ model_id) ‖ index); shard by shard, it goes to the best
/// scorer that does not hold its quota (the shard count over the members, rounded
/// up) yet. Members that see the same swarm agree on who takes what without
/// talking, together hold every shard, and none takes more than its quota. A
/// member that gets nothing (more members than shards) takes its best-scoring
/// shard.
pub fn fair_share(node_id: &str, members: &[String], model_id: &str, shards: u32) -> Vec<u32> {
    let score = |node: &str, index: u32| {
        let seed = blake3::hash(format!("{node}{model_id}").as_bytes());
        let mut h = blake3::Hasher::new();
        h.update(seed.as_bytes());
        h.update(&index.to_le_bytes());
        *h.finalize().as_bytes()
    };
    let mut all: Vec<&str> = members.iter().map(String::as_str).collect();
    all.push(node_id);
    all.sort_unstable();
    all.dedup();
    let quota = (shards as usize).div_ceil(all.len()).max(1);
    let mut taken: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    let mut mine = Vec::new();
    for i in 0..shards {
        let mut ranked = all.clone();
        ranked.sort_by_key(|n| std::cmp::Reverse(score(n, i)));
        let Some(winner) = ranked
            .into_iter()
            .find(|n| taken.get(n).copied().unwrap_or(0) < quota)
        else {
            continue;
        };
        *taken.entry(winner).or_insert(0) += 1;
        if winner == node_id {
            mine.push(i);
        }
    }
    if mine.is_empty() {
        (0..shards)
            .max_by_key(|&i| score(node_id, i))
            .into_iter()
            .collect()
    } else {
        mine
    }
}

fn failed(e: impl std::fmt::Display) -> TransferError {
    TransferError::Failed(e.to_string())
}

impl Pipeline {
    /// Starts downloading shards of a Hub GGUF. Returns once the header is read,
    /// the manifest written and the downloads registered.
    pub async fn download_from_hub(
        &self,
        hub: &Hub,
        req: HubFetch,
    ) -> Result<HubStarted, HubFetchError> {
        let probed = hub
            .probe(&req.repo_id, &req.filename, req.revision.as_deref())
            .await?;
        let shards = req.shards.unwrap_or_else(|| probed.default_shards());
        let plan = probed.plan(shards)?;
        let model_id = req.model_id.clone().unwrap_or_else(|| probed.model_id());
        // Each file named as the Hub names it: its path's last part, size and
        // SHA-256 (the LFS object id).
        let sources = probed
            .parts
            .iter()
            .map(|(path, f)| {
                let sha256 = f.sha256.clone().ok_or_else(|| {
                    HubError::BadFile(format!(
                        "the Hub names no SHA-256 for {path} (not an LFS file)"
                    ))
                })?;
                Ok(SourceFile {
                    file: path.rsplit('/').next().unwrap_or(path).to_string(),
                    bytes: f.size,
                    sha256,
                })
            })
            .collect::<Result<Vec<_>, HubError>>()?;
        let manifest = plan
            .manifest(&model_id, sources, &probed.header)
            .map_err(|e| HubError::BadFile(e.to_string()))?;
        let count = manifest.shard_count();
        let wanted: Vec<u32> = match (&req.shard_indices, req.fair_share) {
            (Some(list), _) => {
                if let Some(bad) = list.iter().find(|&&i| i >= count) {
                    return Err(HubError::Invalid(format!(
                        "shard {bad} does not exist: the split has shards 0..{count}"
                    ))
                    .into());
                }
                let mut l = list.clone();
                l.sort_unstable();
                l.dedup();
                l
            }
            (None, true) => {
                // The swarm as this node sees it now: its connected peers.
                let members: Vec<String> = self
                    .inner
                    .network
                    .get()
                    .map(|n| n.connected().into_iter().map(|p| p.node_id).collect())
                    .unwrap_or_default();
                fair_share(&self.inner.node_id, &members, &model_id, count)
            }
            (None, false) => (0..count).collect(),
        };
        if wanted.is_empty() {
            return Err(HubError::Invalid("no shard asked for".into()).into());
        }
        let dir = ModelDir::new(&self.inner.config.models_dir, &model_id)
            .map_err(|e| HubError::Invalid(e.to_string()))?;
        self.adopt_manifest(&dir, &manifest, &probed.header).await?;

        // Shards already intact are not fetched again (checked against the plan
        // in hand: the header is not read back from disk).
        let (check_dir, check_manifest, check_plan, check_wanted) =
            (dir.clone(), manifest.clone(), plan.clone(), wanted.clone());
        let held: Vec<u32> = tokio::task::spawn_blocking(move || {
            let recorded = ShardHashes::load(&check_dir, check_manifest.shard_count());
            check_wanted
                .into_iter()
                .filter(|&i| {
                    check_manifest.shard(i).is_some_and(|s| {
                        shard::check_shard(&check_dir, &check_plan, &recorded, s)
                            .hash()
                            .is_ok()
                    })
                })
                .collect()
        })
        .await
        .map_err(failed)?;
        let todo: Vec<u32> = wanted
            .iter()
            .copied()
            .filter(|i| !held.contains(i))
            .collect();
        let whole = todo.len() == count as usize;
        let bytes_to_fetch = if whole {
            probed.total_size()
        } else {
            todo.iter()
                .filter_map(|&i| plan.shard(i))
                .map(ShardPlan::source_bytes)
                .sum()
        };
        let started = HubStarted {
            model_id: model_id.clone(),
            shard_indices: todo.clone(),
            already_local: held,
            shard_count: count,
            mode: if whole { "whole" } else { "ranges" },
            bytes_to_fetch,
            file_bytes: probed.total_size(),
            download_ids: Vec::new(),
        };
        if todo.is_empty() {
            return Ok(started);
        }
        let source = HubSource {
            repo_id: req.repo_id.clone(),
            filename: req.filename.clone(),
            commit: probed.file.commit.clone(),
            pending: todo.clone(),
        };
        write_source(&dir, &source).map_err(failed)?;
        let download_ids = self
            .start_hub_job(hub.clone(), probed, plan, manifest, dir, todo)
            .map_err(HubFetchError::Transfer)?;
        Ok(HubStarted {
            download_ids,
            ..started
        })
    }

    /// Writes the header and manifest of a model fetched from the Hub, or checks
    /// that the ones already here are the same.
    async fn adopt_manifest(
        &self,
        dir: &ModelDir,
        manifest: &Manifest,
        header: &[u8],
    ) -> Result<(), HubFetchError> {
        let hash = manifest.hash();
        if let Ok(existing) = shard::read_manifest(dir.path()) {
            if existing.hash() != hash {
                return Err(TransferError::Conflict(format!(
                    "model '{}' is already here from another file or split ({} shards); \
                     remove it or choose another model_id",
                    manifest.model_id,
                    existing.shards.len()
                ))
                .into());
            }
            return Ok(());
        }
        if let Some(pinned) = self.inner.pins.get(&manifest.model_id)
            && pinned != hash
        {
            return Err(TransferError::Conflict(format!(
                "the swarm knows model '{}' as another manifest ({pinned}); choose another model_id",
                manifest.model_id
            ))
            .into());
        }
        let (dir, header, text) = (
            dir.clone(),
            header.to_vec(),
            serde_json::to_vec_pretty(manifest).map_err(failed)?,
        );
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            std::fs::create_dir_all(dir.path())?;
            crate::fsutil::write_atomic(&dir.header(), &header)?;
            crate::fsutil::write_atomic(&dir.manifest(), &text)
        })
        .await
        .map_err(failed)?
        .map_err(failed)?;
        self.load_held().await;
        Ok(())
    }

    /// Registers one download per shard and runs them in one task.
    fn start_hub_job(
        &self,
        hub: Hub,
        probed: Probed,
        plan: ModelPlan,
        manifest: Manifest,
        dir: ModelDir,
        todo: Vec<u32>,
    ) -> Result<Vec<String>, TransferError> {
        let cancel = CancellationToken::new();
        let mut ids = Vec::new();
        for &i in &todo {
            let Some(p) = plan.shard(i) else { continue };
            let status = DownloadStatus {
                id: format!(
                    "{}-{}-{i}-hf",
                    chrono::Utc::now().format("%Y%m%d%H%M%S%3f"),
                    manifest.model_id
                ),
                model_id: manifest.model_id.clone(),
                shard_index: i,
                file: shard::shard_file_name(i),
                status: "queued",
                source: "huggingface",
                peer: None,
                bytes_total: p.bytes,
                bytes_done: 0,
                resumed_from: 0,
                speed_bps: 0.0,
                error: None,
                rejected: 0,
            };
            ids.push((i, status.id.clone()));
            if !self.inner.downloads.register(status, cancel.clone()) {
                // Those registered already are withdrawn.
                cancel.cancel();
                for (_, id) in &ids {
                    self.inner.downloads.update(id, |s| {
                        if s.active() {
                            s.status = "cancelled";
                        }
                    });
                }
                return Err(TransferError::Conflict(format!(
                    "shard {i} of '{}' is already downloading",
                    manifest.model_id
                )));
            }
        }
        let out = ids.iter().map(|(_, id)| id.clone()).collect();
        let this = self.clone();
        self.spawn(async move {
            let job = HubJob {
                pipeline: this.clone(),
                hub,
                probed,
                plan,
                manifest,
                dir,
                cancel: cancel.clone(),
            };
            let outcome = job.run(&ids).await;
            if let Err(e) = &outcome {
                tracing::warn!(model = %job.manifest.model_id, error = %e, "Hub download ended");
            }
            // A cancelled download is not resumed on restart (its `.part` files
            // stay, so asking again carries on from them).
            if cancel.is_cancelled()
                && let Some(mut s) = read_source(&job.dir)
            {
                s.pending.clear();
                if let Err(e) = write_source(&job.dir, &s) {
                    tracing::warn!(error = %e, "could not record a cancelled download");
                }
            }
            // The shards are loaded before the downloads say done, so whoever
            // waits for "done" finds them served.
            this.load_held().await;
            for (_, id) in &ids {
                this.inner.downloads.update(id, |s| {
                    if s.active() {
                        match &outcome {
                            Ok(()) => s.status = "done",
                            Err(_) if cancel.is_cancelled() => s.status = "cancelled",
                            Err(e) => {
                                s.status = "failed";
                                s.error = Some(e.to_string());
                            }
                        }
                    }
                });
            }
            if let Some(n) = this.inner.network.get() {
                n.announce_now().await;
            }
        });
        Ok(out)
    }

    /// Restarts the Hub downloads that `hf_source.json` files list as pending
    /// (after a crash or a restart).
    pub async fn resume_hub_downloads(&self, hub: &Hub) {
        for m in self.local_models() {
            let Some(source) = read_source(&m.dir) else {
                continue;
            };
            let pending: Vec<u32> = source
                .pending
                .iter()
                .copied()
                .filter(|i| !m.held.contains(i) && *i < m.manifest.shard_count())
                .collect();
            if pending.is_empty() {
                continue;
            }
            let req = HubFetch {
                repo_id: source.repo_id.clone(),
                filename: source.filename.clone(),
                revision: source.commit.clone(),
                shards: Some(m.manifest.shard_count()),
                shard_indices: Some(pending),
                fair_share: false,
                model_id: Some(m.manifest.model_id.clone()),
            };
            match self.download_from_hub(hub, req).await {
                Ok(s) => tracing::info!(model = %s.model_id, shards = ?s.shard_indices,
                    "resuming a Hub download"),
                Err(e) => tracing::warn!(model = %m.manifest.model_id, error = %e,
                    "could not resume a Hub download"),
            }
        }
    }

    /// The Hub source recorded for a local model.
    pub fn hub_source(&self, model_id: &str) -> Option<HubSource> {
        let dir = ModelDir::new(&self.inner.config.models_dir, model_id).ok()?;
        read_source(&dir)
    }

    /// Records the Hub source of a local model (found by a search).
    pub fn set_hub_source(&self, model_id: &str, source: &HubSource) -> std::io::Result<()> {
        let dir = ModelDir::new(&self.inner.config.models_dir, model_id)
            .map_err(std::io::Error::other)?;
        write_source(&dir, source)
    }
}

fn read_source(dir: &ModelDir) -> Option<HubSource> {
    let path = dir.file(SOURCE_FILE).ok()?;
    if std::fs::metadata(&path).ok()?.len() > 64 << 10 {
        return None;
    }
    let s: HubSource = serde_json::from_slice(&std::fs::read(path).ok()?).ok()?;
    (crate::hub::is_repo_id(&s.repo_id) && crate::hub::is_repo_path(&s.filename)).then_some(s)
}

fn write_source(dir: &ModelDir, source: &HubSource) -> std::io::Result<()> {
    let path = dir.file(SOURCE_FILE).map_err(std::io::Error::other)?;
    let text = serde_json::to_vec_pretty(source).map_err(std::io::Error::other)?;
    crate::fsutil::write_atomic(&path, &text)
}

/// Starting a Hub download failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HubFetchError {
    /// The Hub, the file or the request.
    #[error(transparent)]
    Hub(#[from] HubError),
    /// The model directory or the download registry.
    #[error(transparent)]
    Transfer(#[from] TransferError),
}

/// One running Hub download of a model's shards.
struct HubJob {
    pipeline: Pipeline,
    hub: Hub,
    probed: Probed,
    plan: ModelPlan,
    manifest: Manifest,
    dir: ModelDir,
    cancel: CancellationToken,
}

/// Progress of one shard's download, reported to the registry.
struct Progress<'a> {
    pipeline: &'a Pipeline,
    id: &'a str,
    started: Instant,
    resumed: u64,
    last: Instant,
}

impl Progress<'_> {
    fn report(&mut self, done: u64, force: bool) {
        if !force && self.last.elapsed() < Duration::from_millis(200) {
            return;
        }
        self.last = Instant::now();
        let secs = self.started.elapsed().as_secs_f64().max(1e-3);
        let resumed = self.resumed;
        self.pipeline.inner.downloads.update(self.id, |s| {
            s.status = "downloading";
            s.bytes_done = done;
            s.resumed_from = resumed;
            s.speed_bps = (done.saturating_sub(resumed)) as f64 / secs;
        });
    }
}

impl HubJob {
    async fn run(&self, ids: &[(u32, String)]) -> Result<(), TransferError> {
        // A file other tools already downloaded into the Hugging Face cache is
        // split from there, without the network.
        if let Some(cached) = self.cached_source().await {
            tracing::info!(file = %cached.display(), "using the file in the Hugging Face cache");
            for (index, part, p) in self.split_from(&[cached], ids).await? {
                self.install(index, &part, &p).await?;
            }
            return Ok(());
        }
        if ids.len() == self.plan.shards.len() {
            return self.run_whole(ids).await;
        }
        for (index, id) in ids {
            self.run_shard(*index, id).await?;
        }
        Ok(())
    }

    /// One shard from its byte ranges.
    async fn run_shard(&self, index: u32, id: &str) -> Result<(), TransferError> {
        let p = self
            .plan
            .shard(index)
            .ok_or_else(|| failed(format!("no shard {index}")))?
            .clone();
        let entry = self
            .manifest
            .shard(index)
            .ok_or_else(|| failed(format!("no shard {index}")))?
            .clone();
        let part = self.dir.part(&entry);
        let file = open_part(&part, &p.header, p.bytes)?;
        // `have`: the bytes in the file, counting those still in the buffer.
        let mut have = file.metadata().map_err(failed)?.len();
        let mut file = std::io::BufWriter::with_capacity(1 << 20, file);
        let mut progress = Progress {
            pipeline: &self.pipeline,
            id,
            started: Instant::now(),
            resumed: have,
            last: Instant::now(),
        };
        progress.report(have, true);
        // Walk the shard's data, piece by piece of the source's files, from where
        // the file ends.
        let pieces = p.pieces(&self.probed.map).map_err(failed)?;
        let mut at = p.header.len() as u64;
        let mut resolved: Vec<crate::hub::Resolved> =
            self.probed.parts.iter().map(|(_, f)| f.clone()).collect();
        for piece in pieces {
            let len = match piece {
                Piece::Zeros(n) | Piece::Part { len: n, .. } => n,
            };
            let end = at + len;
            if have >= end {
                at = end;
                continue;
            }
            match piece {
                Piece::Zeros(n) => {
                    let zeros = n - (have - at);
                    std::io::copy(&mut std::io::repeat(0).take(zeros), &mut file)
                        .map_err(failed)?;
                    have += zeros;
                }
                Piece::Part { part, offset, .. } => {
                    let mut tries = 0;
                    while have < end {
                        let source = resolved
                            .get(part)
                            .ok_or_else(|| failed(format!("no source part {part}")))?;
                        let from = offset + (have - at);
                        let r = self
                            .copy_range(
                                source,
                                from,
                                offset + len,
                                &mut file,
                                &mut have,
                                &mut progress,
                            )
                            .await;
                        if let Err(e) = r {
                            let again = self.after_failure(e, &mut tries, part).await?;
                            if let Some(slot) = resolved.get_mut(part) {
                                *slot = again;
                            }
                        }
                    }
                }
            }
            at = end;
            progress.report(at, false);
        }
        // The speed is the network's: reported before the file is synced.
        progress.report(at, true);
        let file = file.into_inner().map_err(|e| failed(e.error()))?;
        file.sync_all().map_err(failed)?;
        drop(file);
        self.install(index, &part, &p).await
    }

    /// After a failed read of part `part`: gives up when cancelled or out of
    /// tries, else resolves the part again (a CDN's signed URL expires) for the
    /// next try.
    async fn after_failure(
        &self,
        e: TransferError,
        tries: &mut u32,
        part: usize,
    ) -> Result<crate::hub::Resolved, TransferError> {
        if self.cancel.is_cancelled() || *tries + 1 >= RANGE_RETRIES {
            return Err(e);
        }
        *tries += 1;
        tracing::warn!(error = %e, "a read from the Hub failed; resolving the file again");
        self.resolve_part(part).await
    }

    /// Resolves part `part` again; it must not have changed size.
    async fn resolve_part(&self, part: usize) -> Result<crate::hub::Resolved, TransferError> {
        let (name, old) = self
            .probed
            .parts
            .get(part)
            .ok_or_else(|| failed(format!("no source part {part}")))?;
        let again = self
            .hub
            .resolve(&self.probed.repo_id, name, old.commit.as_deref())
            .await
            .map_err(failed)?;
        if again.size != old.size {
            return Err(failed("the file changed on the Hub"));
        }
        Ok(again)
    }

    /// Checks a finished `.part` file and moves it into place.
    async fn install(&self, index: u32, part: &Path, p: &ShardPlan) -> Result<(), TransferError> {
        let (part_c, p_c) = (part.to_path_buf(), p.clone());
        let hash = tokio::task::spawn_blocking(move || shard::check_shard_file(&part_c, &p_c))
            .await
            .map_err(failed)?;
        let hash = match hash {
            Ok(h) => h,
            Err(e) => {
                let _ = std::fs::remove_file(part);
                return Err(failed(format!("shard {index} does not fit its plan: {e}")));
            }
        };
        // Holders in the swarm that attest a hash for this shard must agree.
        if let Some(attested) = self.pipeline.attested_hash(&self.manifest, index).await
            && attested != hash
        {
            let _ = std::fs::remove_file(part);
            return Err(failed(format!(
                "shard {index} from the Hub hashes to {hash}, but holders in the swarm attest {attested}"
            )));
        }
        ShardHashes::record(&self.dir, self.manifest.shard_count(), index, Some(&hash))
            .map_err(failed)?;
        let entry = self
            .manifest
            .shard(index)
            .ok_or_else(|| failed("no such shard"))?;
        std::fs::rename(part, self.dir.shard(entry)).map_err(failed)?;
        let mut source = read_source(&self.dir);
        if let Some(s) = source.as_mut() {
            s.pending.retain(|&i| i != index);
            write_source(&self.dir, s).map_err(failed)?;
        }
        tracing::info!(model = %self.manifest.model_id, shard = index, "shard downloaded from the Hub");
        Ok(())
    }

    /// Streams bytes `from..to` of the file onto the end of `out`.
    /// Streams bytes `from..to` of the file onto `out`, counting them in `have`
    /// as they are written (so a retry after a failure starts where this ended).
    async fn copy_range(
        &self,
        file: &crate::hub::Resolved,
        from: u64,
        to: u64,
        out: &mut impl Write,
        have: &mut u64,
        progress: &mut Progress<'_>,
    ) -> Result<(), TransferError> {
        if from >= to {
            return Ok(());
        }
        let response = tokio::select! {
            () = self.cancel.cancelled() => return Err(failed("cancelled")),
            r = self.hub.read_range(file, from, to) => r.map_err(failed)?,
        };
        let mut stream = response.bytes_stream();
        let mut got = 0u64;
        loop {
            let chunk = tokio::select! {
                () = self.cancel.cancelled() => return Err(failed("cancelled")),
                c = stream.next() => c,
            };
            let Some(chunk) = chunk else { break };
            let chunk = chunk.map_err(failed)?;
            if got + chunk.len() as u64 > to - from {
                return Err(failed("the server sent more bytes than the range"));
            }
            out.write_all(&chunk).map_err(failed)?;
            got += chunk.len() as u64;
            *have += chunk.len() as u64;
            progress.report(*have, false);
        }
        if got != to - from {
            return Err(failed(format!(
                "the server sent {got} of {} bytes",
                to - from
            )));
        }
        Ok(())
    }

    /// Every shard: the whole file in order, its SHA-256 checked, then split here.
    async fn run_whole(&self, ids: &[(u32, String)]) -> Result<(), TransferError> {
        let total = self.probed.total_size();
        let sources: Vec<SourceFile> = if self.manifest.source_parts.is_empty() {
            vec![self.manifest.source.clone()]
        } else {
            self.manifest.source_parts.clone()
        };
        let single = sources.len() == 1;
        let mut paths = Vec::new();
        let started = Instant::now();
        let mut before = 0u64;
        let mut resumed = 0u64;
        for (i, expected) in sources.iter().enumerate() {
            let name = if single {
                WHOLE_PART.to_string()
            } else {
                format!("source-{:05}.gguf.part", i + 1)
            };
            let path = self.dir.file(&name).map_err(failed)?;
            let have = self
                .fetch_whole_part(
                    i,
                    &path,
                    expected,
                    ids,
                    before,
                    total,
                    started,
                    &mut resumed,
                )
                .await?;
            before += have;
            paths.push(path);
        }
        // Verifying reads the file from the page cache on one thread while the
        // split writes shard files on another: on two cores, hashing inline
        // while receiving slowed the download (the Hub's server shares the CPU),
        // and after the split it would add its time to the whole.
        for (_, id) in ids {
            self.pipeline
                .inner
                .downloads
                .update(id, |s| s.status = "verifying");
        }
        let to_hash: Vec<(PathBuf, SourceFile)> =
            paths.iter().cloned().zip(sources.iter().cloned()).collect();
        let hashing = tokio::task::spawn_blocking(move || {
            to_hash
                .into_iter()
                .map(|(path, expected)| {
                    let (hasher, n) = prefix_sha256(&path, expected.bytes)?;
                    Ok((hex::encode(hasher.finalize()), n, expected))
                })
                .collect::<std::io::Result<Vec<_>>>()
        });
        let split = self.split_from(&paths, ids).await;
        let hashes = hashing.await.map_err(failed)?.map_err(failed)?;
        let wrong = hashes
            .iter()
            .find(|(sha, n, e)| *n != e.bytes || *sha != e.sha256);
        if let Some((sha, _, expected)) = wrong {
            for p in &paths {
                let _ = std::fs::remove_file(p);
            }
            for (index, id) in ids {
                if let Some(entry) = self.manifest.shard(*index) {
                    let _ = std::fs::remove_file(self.dir.part(entry));
                }
                self.pipeline
                    .inner
                    .downloads
                    .update(id, |s| s.rejected += 1);
            }
            return Err(failed(format!(
                "the downloaded {}'s SHA-256 is {sha}, but the Hub names {}; discarded",
                expected.file, expected.sha256
            )));
        }
        let written = split?;
        for p in &paths {
            let _ = std::fs::remove_file(p);
        }
        for (index, part, p) in written {
            self.install(index, &part, &p).await?;
        }
        Ok(())
    }

    /// Part `i` of the source, whole and in order, into `path` (resuming from
    /// what is there). Returns its size; the caller checks its SHA-256.
    #[allow(clippy::too_many_arguments)]
    async fn fetch_whole_part(
        &self,
        i: usize,
        path: &Path,
        expected: &SourceFile,
        ids: &[(u32, String)],
        before: u64,
        total: u64,
        started: Instant,
        resumed: &mut u64,
    ) -> Result<u64, TransferError> {
        let size = expected.bytes;
        // A part file longer than the file is not this file's: start over.
        if std::fs::metadata(path).is_ok_and(|m| m.len() > size) {
            std::fs::remove_file(path).map_err(failed)?;
        }
        let have = std::fs::metadata(path).map_or(0, |m| m.len());
        *resumed += have;
        let resumed = *resumed;
        // Chunks go straight to the file: they arrive tens of KiB at a time, and
        // a buffer in between would copy every byte once more.
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(failed)?;
        // Each shard shows the share of the whole source done, and the speed.
        let report_all = |done: u64| {
            let frac = (before + done) as f64 / total.max(1) as f64;
            let speed = (before + done).saturating_sub(resumed) as f64
                / started.elapsed().as_secs_f64().max(1e-3);
            for (i, id) in ids {
                if let Some(p) = self.plan.shard(*i) {
                    self.pipeline.inner.downloads.update(id, |s| {
                        s.status = "downloading";
                        s.bytes_done = (p.bytes as f64 * frac) as u64;
                        s.resumed_from =
                            (p.bytes as f64 * resumed as f64 / total.max(1) as f64) as u64;
                        s.speed_bps = speed;
                    });
                }
            }
        };
        let mut last_report = Instant::now();
        report_all(have);
        let mut resolved = self
            .probed
            .parts
            .get(i)
            .map(|(_, f)| f.clone())
            .ok_or_else(|| failed(format!("no source part {i}")))?;
        let mut tries = 0;
        let mut at = have;
        while at < size {
            let r = async {
                let response = tokio::select! {
                    () = self.cancel.cancelled() => return Err(failed("cancelled")),
                    r = self.hub.read_range(&resolved, at, size) => r.map_err(failed)?,
                };
                let mut stream = response.bytes_stream();
                loop {
                    let chunk = tokio::select! {
                        () = self.cancel.cancelled() => return Err(failed("cancelled")),
                        c = stream.next() => c,
                    };
                    let Some(chunk) = chunk else { break };
                    let chunk = chunk.map_err(failed)?;
                    if at + chunk.len() as u64 > size {
                        return Err(failed("the server sent more bytes than the file has"));
                    }
                    file.write_all(&chunk).map_err(failed)?;
                    at += chunk.len() as u64;
                    if last_report.elapsed() > Duration::from_millis(200) {
                        report_all(at);
                        last_report = Instant::now();
                    }
                }
                Ok(())
            }
            .await;
            if let Err(e) = r {
                resolved = self.after_failure(e, &mut tries, i).await?;
            }
        }
        // The speed is the network's: reported before the file is synced.
        report_all(size);
        file.sync_all().map_err(failed)?;
        Ok(size)
    }

    /// The file in the local Hugging Face cache, when it is there whole with the
    /// SHA-256 the Hub names.
    async fn cached_source(&self) -> Option<PathBuf> {
        if self.probed.parts.len() != 1 {
            return None;
        }
        let path = self
            .hub
            .cached_file(&self.probed.repo_id, &self.probed.filename)?;
        if std::fs::metadata(&path).ok()?.len() != self.probed.file.size {
            return None;
        }
        let (p, size, want) = (
            path.clone(),
            self.probed.file.size,
            self.manifest.source.sha256.clone(),
        );
        let sha = tokio::task::spawn_blocking(move || prefix_sha256(&p, size))
            .await
            .ok()?
            .ok()?;
        (hex::encode(sha.0.finalize()) == want).then_some(path)
    }

    /// Writes the shards `ids` from a whole local copy of the file, exactly as an
    /// import does, into their `.part` files: (index, part file, plan) each, for
    /// the caller to install.
    async fn split_from(
        &self,
        sources: &[PathBuf],
        ids: &[(u32, String)],
    ) -> Result<Vec<(u32, PathBuf, ShardPlan)>, TransferError> {
        let mut written = Vec::new();
        for (index, _) in ids {
            let p = self
                .plan
                .shard(*index)
                .ok_or_else(|| failed("no such shard"))?
                .clone();
            let entry = self
                .manifest
                .shard(*index)
                .ok_or_else(|| failed("no such shard"))?
                .clone();
            let shard_part = self.dir.part(&entry);
            let (src, out, p2, map) = (
                sources.to_vec(),
                shard_part.clone(),
                p.clone(),
                self.probed.map.clone(),
            );
            tokio::task::spawn_blocking(move || p2.write_from(&src, &map, &out))
                .await
                .map_err(failed)?
                .map_err(failed)?;
            written.push((*index, shard_part, p));
        }
        Ok(written)
    }
}

/// Opens (or starts) a shard's `.part` file for appending: a file that does not
/// begin with the planned header, or is longer than the shard, starts over.
fn open_part(part: &Path, header: &[u8], bytes: u64) -> Result<std::fs::File, TransferError> {
    let mut keep = false;
    if let Ok(mut f) = std::fs::File::open(part) {
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        if len >= header.len() as u64 && len <= bytes {
            let mut head = vec![0u8; header.len()];
            keep = f.read_exact(&mut head).is_ok() && head == header;
        }
    }
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(part)
        .map_err(failed)?;
    if !keep {
        file.set_len(0).map_err(failed)?;
        file.write_all(header).map_err(failed)?;
    }
    Ok(file)
}

/// SHA-256 state over the first `limit` bytes of `path` (none when it is
/// missing), and how many bytes that was.
fn prefix_sha256(path: &Path, limit: u64) -> std::io::Result<(sha2::Sha256, u64)> {
    let mut hasher = sha2::Sha256::new();
    let Ok(f) = std::fs::File::open(path) else {
        return Ok((hasher, 0));
    };
    let n = std::io::copy(&mut f.take(limit), &mut hasher)?;
    Ok((hasher, n))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fair_shares_cover_every_shard_agree_and_are_balanced() {
        for swarm in 0..50 {
            let nodes: Vec<String> = (0..3).map(|i| format!("node-{swarm}-{i}")).collect();
            let mut covered = Vec::new();
            for n in &nodes {
                let share = fair_share(n, &nodes, "smollm2", 3);
                assert_eq!(share.len(), 1, "{n}: {share:?}");
                covered.extend(share);
            }
            covered.sort_unstable();
            assert_eq!(covered, vec![0, 1, 2]);
        }
        // Uneven: 7 shards over 3 nodes, at most 3 each, all covered once.
        let nodes: Vec<String> = (0..3).map(|i| format!("n{i}")).collect();
        let shares: Vec<Vec<u32>> = nodes
            .iter()
            .map(|n| fair_share(n, &nodes, "m", 7))
            .collect();
        assert!(shares.iter().all(|s| s.len() <= 3));
        assert_eq!(shares.iter().map(Vec::len).sum::<usize>(), 7);
        // Deterministic.
        assert_eq!(
            fair_share("node-0", &nodes, "m", 7),
            fair_share("node-0", &nodes, "m", 7)
        );
        // Alone, a node takes everything.
        assert_eq!(fair_share("solo", &[], "m", 4), vec![0, 1, 2, 3]);
    }
}
