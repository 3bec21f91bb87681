//! Model files between peers.
//!
//! Serving: a peer asks for a byte range of `manifest.json`, `gguf_header.bin` or a
//! shard file this node holds intact ([`Request::Fetch`], at most 4 MiB a time).
//!
//! Downloading: a model's manifest and header come first (from any holder; with
//! them a node knows every shard's size and exact header), then each wanted shard
//! from the best holder (same LAN first, then round trip, then trust). Bytes go to
//! `<shard>.part`, so an interrupted download resumes where it stopped; the
//! finished file must fit the plan the header implies and match the BLAKE3 this
//! node recorded for the shard before, or else the one its holder attests in its
//! `shard_hashes.json`; otherwise it is thrown away and fetched from the next
//! holder. A verified shard is renamed into place and loaded, and the node
//! re-announces.

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::{Pipeline, is_model_id, short};
use crate::net::frame::{FetchRequest, MAX_CHUNK, Request, Response};
use crate::shard::gguf::Gguf;
use crate::shard::hashes::MAX_HASHES_BYTES;
use crate::shard::manifest::{HASHES_FILE, HEADER_FILE, MANIFEST_FILE, MAX_MANIFEST_BYTES};
use crate::shard::{self, Manifest, ModelDir, ShardEntry, ShardHashes};

/// How long a download waits for a holder to appear before failing.
const HOLDER_WAIT: Duration = Duration::from_secs(60);
/// Download records kept (finished ones are dropped, oldest first, beyond it).
const MAX_DOWNLOAD_RECORDS: usize = 256;
/// Attempts per chunk before moving to the next holder.
const CHUNK_RETRIES: usize = 3;

/// A download's state, as `GET /api/admin/downloads` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct DownloadStatus {
    /// Download id.
    pub id: String,
    /// Model id.
    pub model_id: String,
    /// Shard index.
    pub shard_index: u32,
    /// File name.
    pub file: String,
    /// `queued`, `downloading`, `verifying` (a whole Hub file being checked
    /// and split), `done`, `failed` or `cancelled`.
    pub status: &'static str,
    /// Where from (`p2p`).
    pub source: &'static str,
    /// The holder it is coming from.
    pub peer: Option<String>,
    /// File size.
    pub bytes_total: u64,
    /// Bytes on disk so far.
    pub bytes_done: u64,
    /// Bytes that were already there from an interrupted download.
    pub resumed_from: u64,
    /// Average speed since it started (bytes/s).
    pub speed_bps: f64,
    /// Why it failed.
    pub error: Option<String>,
    /// Files that failed BLAKE3 verification and were discarded.
    pub rejected: u32,
}

impl DownloadStatus {
    /// Whether it is still running.
    pub fn active(&self) -> bool {
        matches!(self.status, "queued" | "downloading" | "verifying")
    }

    /// Progress 0–100.
    pub fn progress_pct(&self) -> f64 {
        (self.bytes_done as f64 * 1000.0 / self.bytes_total.max(1) as f64).round() / 10.0
    }
}

/// The download registry.
#[derive(Debug, Default)]
pub(super) struct Downloads {
    entries: Mutex<HashMap<String, (DownloadStatus, CancellationToken)>>,
}

impl Downloads {
    /// The running download of shard `index` of `model_id`, if any.
    fn running(&self, model_id: &str, index: u32) -> Option<DownloadStatus> {
        self.entries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .find(|(s, _)| s.active() && s.model_id == model_id && s.shard_index == index)
            .map(|(s, _)| s.clone())
    }

    /// Adds a download unless one of the same shard is running; drops the oldest
    /// finished records beyond the cap (finished downloads are history).
    pub(super) fn register(&self, status: DownloadStatus, cancel: CancellationToken) -> bool {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if entries.values().any(|(s, _)| {
            s.active() && s.model_id == status.model_id && s.shard_index == status.shard_index
        }) {
            return false;
        }
        if entries.len() >= MAX_DOWNLOAD_RECORDS {
            let mut finished: Vec<String> = entries
                .values()
                .filter(|(s, _)| !s.active())
                .map(|(s, _)| s.id.clone())
                .collect();
            finished.sort();
            for id in finished
                .iter()
                .take(entries.len() + 1 - MAX_DOWNLOAD_RECORDS)
            {
                entries.remove(id);
            }
        }
        entries.insert(status.id.clone(), (status, cancel));
        true
    }

    pub(super) fn update(&self, id: &str, f: impl FnOnce(&mut DownloadStatus)) {
        if let Some((s, _)) = self
            .entries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(id)
        {
            f(s);
        }
    }
}

/// A transfer request failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransferError {
    /// Not a model id or shard of the model.
    #[error("{0}")]
    Invalid(String),
    /// No connected peer holds what is needed.
    #[error("{0}")]
    NoHolder(String),
    /// The node has no P2P network.
    #[error("this node has no P2P network")]
    NoNetwork,
    /// A peer or the disk failed.
    #[error("{0}")]
    Failed(String),
    /// Every holder served a manifest that breaks a rule (the last one's).
    #[error("{0}")]
    BadManifest(#[from] shard::ManifestError),
    /// The holders serve another manifest than the one this node accepted.
    #[error("{0}")]
    Conflict(String),
}

impl Pipeline {
    /// Every download this node has run (most recent first).
    pub fn downloads(&self) -> Vec<DownloadStatus> {
        let mut list: Vec<DownloadStatus> = self
            .inner
            .downloads
            .entries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(|(s, _)| s.clone())
            .collect();
        list.sort_by(|a, b| b.id.cmp(&a.id));
        list
    }

    /// Cancels the running downloads of `id_or_model` (a download id or a model
    /// id); returns how many.
    pub fn cancel_downloads(&self, id_or_model: &str) -> usize {
        let entries = self
            .inner
            .downloads
            .entries
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let mut n = 0;
        for (s, cancel) in entries.values() {
            if s.active() && (s.id == id_or_model || s.model_id == id_or_model) {
                cancel.cancel();
                n += 1;
            }
        }
        n
    }

    /// Answers a peer's fetch of a file this node holds intact.
    pub(super) async fn serve_fetch(&self, from: &str, f: FetchRequest) -> Response {
        let not_found = |message: String| Response::Error { code: 404, message };
        if !self.serves(from, false).await {
            return Response::Error {
                code: 503,
                message: "this node is outside its contribution hours".into(),
            };
        }
        if !is_model_id(&f.model_id) || !shard::manifest::is_plain_file_name(&f.file) {
            return not_found("no such model file".into());
        }
        let Some(local) = self
            .local_models()
            .into_iter()
            .find(|m| m.manifest.model_id == f.model_id)
        else {
            return not_found(format!("model {} is not held here", f.model_id));
        };
        if f.file == HASHES_FILE {
            // The record of the shards held now, not whatever the file says.
            let bytes = serde_json::to_vec(&local.hashes).unwrap_or_default();
            let start = (f.offset.min(bytes.len() as u64)) as usize;
            let end = start
                .saturating_add(f.len.min(MAX_CHUNK) as usize)
                .min(bytes.len());
            return Response::Chunk(bytes.get(start..end).unwrap_or_default().to_vec());
        }
        let servable = f.file == MANIFEST_FILE
            || f.file == HEADER_FILE
            || local
                .manifest
                .shards
                .iter()
                .any(|s| s.file == f.file && local.held.contains(&s.index));
        let path = match local.dir.file(&f.file) {
            Ok(path) if servable => path,
            _ => return not_found(format!("{} of {} is not held here", f.file, f.model_id)),
        };
        tracing::debug!(peer = %short(from), file = %f.file, offset = f.offset, "serving a model file chunk");
        let read = tokio::task::spawn_blocking(move || -> std::io::Result<Vec<u8>> {
            let mut file = std::fs::File::open(&path)?;
            file.seek(SeekFrom::Start(f.offset))?;
            let mut buf = Vec::with_capacity(f.len.min(MAX_CHUNK) as usize);
            file.take(f.len.min(MAX_CHUNK) as u64)
                .read_to_end(&mut buf)?;
            Ok(buf)
        })
        .await;
        match read {
            Ok(Ok(bytes)) => Response::Chunk(bytes),
            _ => Response::Error {
                code: 500,
                message: "could not read the file".into(),
            },
        }
    }

    /// Fetches a whole small file (manifest, header) of at most `max` bytes from
    /// `peer`.
    async fn fetch_whole(
        &self,
        peer: &str,
        model_id: &str,
        file: &str,
        max: u64,
    ) -> Result<Vec<u8>, TransferError> {
        let network = self.inner.network.get().ok_or(TransferError::NoNetwork)?;
        let mut out = Vec::new();
        loop {
            let request = Request::Fetch(FetchRequest {
                model_id: model_id.into(),
                file: file.into(),
                offset: out.len() as u64,
                len: MAX_CHUNK,
            });
            match network.request(peer, request).await {
                Ok(Response::Chunk(bytes)) => {
                    let done = bytes.len() < MAX_CHUNK as usize;
                    if (out.len() + bytes.len()) as u64 > max {
                        return Err(TransferError::Failed(format!(
                            "{file} is larger than {max} bytes"
                        )));
                    }
                    out.extend_from_slice(&bytes);
                    if done {
                        return Ok(out);
                    }
                }
                Ok(Response::Error { message, .. }) => return Err(TransferError::Failed(message)),
                Ok(other) => return Err(TransferError::Failed(format!("unexpected {other:?}"))),
                Err(e) => return Err(TransferError::Failed(e.to_string())),
            }
        }
    }

    /// Whether a connected peer announces the layers of shard `index` of
    /// `model_id` (with the manifest this node accepted).
    pub async fn has_holder(&self, model_id: &str, index: u32) -> bool {
        let dir = ModelDir::new(&self.inner.config.models_dir, model_id);
        let range = dir
            .ok()
            .and_then(|d| shard::read_manifest(d.path()).ok())
            .and_then(|m| m.shard(index).map(|s| (s.layer_start, s.layer_end)));
        match range {
            Some((a, b)) => !self.holders_ranked(model_id, a, b).await.is_empty(),
            // No manifest here yet: any holder of the model can give it.
            None => !self.holders_ranked(model_id, 0, 0).await.is_empty(),
        }
    }

    /// The BLAKE3 that holders of shard `index` in the swarm attest (the first of
    /// up to three that answer), if any.
    pub(super) async fn attested_hash(&self, manifest: &Manifest, index: u32) -> Option<String> {
        let s = manifest.shard(index)?;
        let holders = self
            .holders_ranked(&manifest.model_id, s.layer_start, s.layer_end)
            .await;
        for peer in holders.into_iter().take(3) {
            let Ok(bytes) = self
                .fetch_whole(&peer, &manifest.model_id, HASHES_FILE, MAX_HASHES_BYTES)
                .await
            else {
                continue;
            };
            if let Some(h) = ShardHashes::from_json(&bytes, manifest.shard_count())
                .and_then(|h| h.get(index).map(str::to_string))
            {
                return Some(h);
            }
        }
        None
    }

    /// Nodes that announce a range covering layers `a..b` of `model_id`, best first:
    /// same LAN (private or loopback address), then round trip, then trust.
    async fn holders_ranked(&self, model_id: &str, a: u32, b: u32) -> Vec<String> {
        let peers = self.peers().await;
        let mut ranked: Vec<(f64, String)> = self
            .holders_in(model_id, &peers)
            .into_iter()
            .filter(|h| !h.local && h.layer_start <= a && h.layer_end >= b)
            .filter_map(|h| {
                let peer = peers.iter().find(|p| p.node_id == h.node_id)?;
                let lan = if is_lan(&peer.address) { 0.0 } else { 1000.0 };
                let score = lan + h.rtt_ms.unwrap_or(50.0) - peer.trust as f64 / 10.0;
                Some((score, h.node_id))
            })
            .collect();
        ranked.sort_by(|x, y| x.0.total_cmp(&y.0));
        ranked.dedup_by(|x, y| x.1 == y.1);
        ranked.into_iter().map(|(_, id)| id).collect()
    }

    /// Makes sure the model's manifest and header are here, fetching them from a
    /// holder if not. Returns the manifest. What a peer sends passes
    /// [`Manifest::validate`] and [`check_header`] before anything is written.
    pub async fn ensure_manifest(&self, model_id: &str) -> Result<Manifest, TransferError> {
        let dir = ModelDir::new(&self.inner.config.models_dir, model_id)?;
        if dir.header().is_file()
            && let Ok(m) = shard::read_manifest(dir.path())
        {
            return Ok(m);
        }
        let holders = self.holders_ranked(model_id, 0, 0).await;
        if holders.is_empty() {
            return Err(TransferError::NoHolder(format!(
                "no connected peer holds model '{model_id}'"
            )));
        }
        let mut last = TransferError::Failed("no holder answered".into());
        for peer in holders {
            let fetched = async {
                let manifest_bytes = self
                    .fetch_whole(&peer, model_id, MANIFEST_FILE, MAX_MANIFEST_BYTES)
                    .await?;
                let manifest = Manifest::from_json(&manifest_bytes)?;
                if manifest.model_id != model_id {
                    return Err(bad_manifest(
                        "model_id",
                        "the manifest is for another model",
                    ));
                }
                let hash = manifest.hash();
                if let Some(pinned) = self.inner.pins.get(model_id)
                    && pinned != hash
                {
                    return Err(TransferError::Conflict(format!(
                        "the holder serves manifest {hash} for '{model_id}', but this node \
                         accepted {pinned}"
                    )));
                }
                let header = self
                    .fetch_whole(&peer, model_id, HEADER_FILE, manifest.header.bytes)
                    .await?;
                check_header(&manifest, &header).map_err(|e| bad_manifest("header", e))?;
                Ok((manifest, hash, manifest_bytes, header))
            };
            match fetched.await {
                Ok((manifest, hash, manifest_bytes, header)) => {
                    // The first manifest accepted for an id stays its manifest.
                    let pins_of = self.clone();
                    let (id, first) = (model_id.to_string(), hash.clone());
                    let pinned = tokio::task::spawn_blocking(move || {
                        pins_of.inner.pins.pin_first(&id, &first)
                    })
                    .await
                    .map_err(|e| TransferError::Failed(e.to_string()))?
                    .map_err(|e| TransferError::Failed(e.to_string()))?;
                    if pinned != hash {
                        return Err(TransferError::Conflict(format!(
                            "another manifest ({pinned}) was accepted for '{model_id}' meanwhile"
                        )));
                    }
                    let dir2 = dir.clone();
                    tokio::task::spawn_blocking(move || -> std::io::Result<()> {
                        std::fs::create_dir_all(dir2.path())?;
                        crate::fsutil::write_atomic(&dir2.header(), &header)?;
                        // The manifest last: its presence marks the directory usable.
                        crate::fsutil::write_atomic(&dir2.manifest(), &manifest_bytes)
                    })
                    .await
                    .map_err(|e| TransferError::Failed(e.to_string()))?
                    .map_err(|e| TransferError::Failed(e.to_string()))?;
                    tracing::info!(model = model_id, peer = %short(&peer), "model manifest fetched");
                    self.load_held().await;
                    return Ok(manifest);
                }
                Err(e) => {
                    tracing::warn!(model = model_id, peer = %short(&peer), error = %e,
                        "could not take a holder's manifest");
                    // A manifest that breaks a rule is never honest; an unreachable
                    // holder or another manifest version is only not used.
                    if matches!(e, TransferError::BadManifest(_))
                        && let Some(n) = self.inner.network.get()
                    {
                        n.report_bad_frame(&peer);
                    }
                    last = e;
                }
            }
        }
        Err(match last {
            e @ (TransferError::BadManifest(_) | TransferError::Conflict(_)) => e,
            other => TransferError::Failed(format!("could not fetch the manifest: {other}")),
        })
    }

    /// Starts downloading shard `index` of `model_id` (the manifest must be here).
    /// Returns the download's status; `already_local` when the shard is held.
    pub async fn download_shard(
        &self,
        model_id: &str,
        index: u32,
    ) -> Result<DownloadStatus, TransferError> {
        let manifest = self.ensure_manifest(model_id).await?;
        let entry = manifest
            .shards
            .iter()
            .find(|s| s.index == index)
            .cloned()
            .ok_or_else(|| {
                TransferError::Invalid(format!(
                    "model '{model_id}' has shards 0..{}",
                    manifest.shards.len()
                ))
            })?;
        // Checked on disk, not in the last scan: a repair may be asked for while a
        // scan is still running.
        let held = intact_on_disk(
            ModelDir::new(&self.inner.config.models_dir, model_id)?,
            manifest.clone(),
            index,
        )
        .await;
        let mut status = DownloadStatus {
            id: format!(
                "{}-{model_id}-{index}",
                chrono::Utc::now().format("%Y%m%d%H%M%S%3f")
            ),
            model_id: model_id.to_string(),
            shard_index: index,
            file: entry.file.clone(),
            status: "queued",
            source: "p2p",
            peer: None,
            bytes_total: entry.bytes,
            bytes_done: 0,
            resumed_from: 0,
            speed_bps: 0.0,
            error: None,
            rejected: 0,
        };
        if held {
            status.status = "done";
            status.bytes_done = entry.bytes;
            return Ok(status);
        }
        if let Some(running) = self.inner.downloads.running(model_id, index) {
            return Ok(running);
        }
        let holders = self
            .holders_ranked(model_id, entry.layer_start, entry.layer_end)
            .await;
        status.peer = holders.first().cloned();
        let cancel = CancellationToken::new();
        if !self
            .inner
            .downloads
            .register(status.clone(), cancel.clone())
        {
            // Another request started it meanwhile.
            if let Some(running) = self.inner.downloads.running(model_id, index) {
                return Ok(running);
            }
        }
        let this = self.clone();
        let id = status.id.clone();
        let model = model_id.to_string();
        self.spawn(async move {
            let outcome = this
                .run_download(&id, &model, &manifest, &entry, &cancel)
                .await;
            this.inner.downloads.update(&id, |s| match &outcome {
                Ok(()) => s.status = "done",
                Err(_) if cancel.is_cancelled() => s.status = "cancelled",
                Err(e) => {
                    s.status = "failed";
                    s.error = Some(e.to_string());
                }
            });
            match outcome {
                Ok(()) => {
                    this.load_held().await;
                    if let Some(n) = this.inner.network.get() {
                        n.announce_now().await;
                    }
                }
                Err(e) => {
                    tracing::warn!(model = %model, shard = entry.index, error = %e, "shard download failed")
                }
            }
        });
        Ok(status)
    }

    async fn run_download(
        &self,
        id: &str,
        model_id: &str,
        manifest: &Manifest,
        entry: &ShardEntry,
        cancel: &CancellationToken,
    ) -> Result<(), TransferError> {
        let network = self
            .inner
            .network
            .get()
            .ok_or(TransferError::NoNetwork)?
            .clone();
        let dir = ModelDir::new(&self.inner.config.models_dir, model_id)?;
        let final_path = dir.shard(entry);
        let part = dir.part(entry);
        let started = Instant::now();
        let deadline = started + HOLDER_WAIT;
        let mut tried: Vec<String> = Vec::new();
        loop {
            if cancel.is_cancelled() {
                return Err(TransferError::Failed("cancelled".into()));
            }
            let holders = self
                .holders_ranked(model_id, entry.layer_start, entry.layer_end)
                .await;
            let Some(peer) = holders.into_iter().find(|h| !tried.contains(h)) else {
                if Instant::now() > deadline {
                    return Err(TransferError::NoHolder(format!(
                        "no connected peer holds shard {} of {model_id}",
                        entry.index
                    )));
                }
                tokio::select! {
                    () = cancel.cancelled() => {}
                    () = tokio::time::sleep(Duration::from_millis(500)) => {}
                }
                if tried.len() > 8 {
                    tried.clear();
                }
                continue;
            };
            tried.push(peer.clone());
            // The hash to check against: this node's own record of the shard, or
            // else the one the holder attests (which must agree with ours).
            let ours = ShardHashes::load(&dir, manifest.shard_count())
                .get(entry.index)
                .map(str::to_string);
            let theirs = self
                .fetch_whole(&peer, model_id, HASHES_FILE, MAX_HASHES_BYTES)
                .await
                .ok()
                .and_then(|b| ShardHashes::from_json(&b, manifest.shard_count()))
                .and_then(|h| h.get(entry.index).map(str::to_string));
            let expected = match (ours, theirs) {
                (Some(ours), Some(theirs)) if ours != theirs => {
                    tracing::warn!(peer = %short(&peer), shard = entry.index,
                        "the holder attests another BLAKE3 for this shard than this node recorded");
                    continue;
                }
                (Some(hash), _) | (None, Some(hash)) => hash,
                (None, None) => {
                    tracing::warn!(peer = %short(&peer), shard = entry.index,
                        "the holder attests no BLAKE3 for this shard");
                    continue;
                }
            };
            self.inner.downloads.update(id, |s| {
                s.status = "downloading";
                s.peer = Some(peer.clone());
            });
            match self
                .fetch_to_part(id, &network, &peer, model_id, entry, &part, cancel, started)
                .await
            {
                Ok(()) => {}
                Err(e) => {
                    tracing::warn!(peer = %short(&peer), error = %e, "shard fetch failed; trying another holder");
                    continue;
                }
            }
            // Verify the whole file before it becomes a shard: its size and header
            // against the plan, its bytes against the expected BLAKE3.
            let (plan_dir, plan_manifest, plan_part, index) =
                (dir.clone(), manifest.clone(), part.clone(), entry.index);
            let checked = tokio::task::spawn_blocking(move || {
                let (_, plan) =
                    shard::read_plan(&plan_dir, &plan_manifest).map_err(|e| e.to_string())?;
                let p = plan.shard(index).ok_or("no such shard")?;
                shard::check_shard_file(&plan_part, p)
            })
            .await
            .map_err(|e| TransferError::Failed(e.to_string()))?;
            let ok = checked.as_deref() == Ok(expected.as_str());
            if !ok {
                tracing::warn!(peer = %short(&peer), file = %entry.file, problem = ?checked.err(),
                    "downloaded shard does not match its BLAKE3; discarding it");
                if let Some(n) = self.inner.network.get() {
                    n.report_bad_frame(&peer);
                }
                let _ = std::fs::remove_file(&part);
                self.inner.downloads.update(id, |s| {
                    s.rejected += 1;
                    s.bytes_done = 0;
                });
                continue;
            }
            ShardHashes::record(&dir, manifest.shard_count(), entry.index, Some(&expected))
                .map_err(|e| TransferError::Failed(e.to_string()))?;
            std::fs::rename(&part, &final_path)
                .map_err(|e| TransferError::Failed(e.to_string()))?;
            tracing::info!(model = model_id, shard = entry.index, peer = %short(&peer),
                secs = started.elapsed().as_secs_f64(), "shard downloaded and verified");
            return Ok(());
        }
    }

    /// Appends the rest of the shard from `peer` to `part`.
    #[allow(clippy::too_many_arguments)]
    async fn fetch_to_part(
        &self,
        id: &str,
        network: &crate::net::Network,
        peer: &str,
        model_id: &str,
        entry: &ShardEntry,
        part: &Path,
        cancel: &CancellationToken,
        started: Instant,
    ) -> Result<(), TransferError> {
        let io = |e: std::io::Error| TransferError::Failed(e.to_string());
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(part)
            .map_err(io)?;
        let mut offset = file.metadata().map_err(io)?.len();
        if offset > entry.bytes {
            file.set_len(0).map_err(io)?;
            offset = 0;
        }
        let resumed = offset;
        self.inner.downloads.update(id, |s| {
            s.resumed_from = s.resumed_from.max(resumed);
            s.bytes_done = offset;
        });
        while offset < entry.bytes {
            if cancel.is_cancelled() {
                return Err(TransferError::Failed("cancelled".into()));
            }
            let len = (entry.bytes - offset).min(MAX_CHUNK as u64) as u32;
            let mut attempt = 0;
            let bytes = loop {
                let request = Request::Fetch(FetchRequest {
                    model_id: model_id.into(),
                    file: entry.file.clone(),
                    offset,
                    len,
                });
                let r = tokio::select! {
                    () = cancel.cancelled() => return Err(TransferError::Failed("cancelled".into())),
                    r = network.request(peer, request) => r,
                };
                match r {
                    Ok(Response::Chunk(b)) if !b.is_empty() && b.len() <= len as usize => break b,
                    Ok(Response::Error { message, .. }) => {
                        return Err(TransferError::Failed(message));
                    }
                    other if attempt + 1 >= CHUNK_RETRIES => {
                        return Err(TransferError::Failed(format!(
                            "chunk at {offset}: {other:?}"
                        )));
                    }
                    _ => attempt += 1,
                }
            };
            file.write_all(&bytes).map_err(io)?;
            offset += bytes.len() as u64;
            let secs = started.elapsed().as_secs_f64().max(1e-3);
            self.inner.downloads.update(id, |s| {
                s.bytes_done = offset;
                s.speed_bps = (offset - s.resumed_from) as f64 / secs;
            });
        }
        file.sync_all().map_err(io)?;
        Ok(())
    }
}

fn bad_manifest(rule: &'static str, message: impl Into<String>) -> TransferError {
    TransferError::BadManifest(shard::ManifestError {
        rule,
        message: message.into(),
    })
}

/// Checks a header fetched from a peer against its (validated) manifest: the
/// size and BLAKE3 the manifest names, a GGUF header that parses within bounds,
/// the same architecture and layer count, and shards exactly as the header's
/// split plan has them.
pub(crate) fn check_header(manifest: &Manifest, header: &[u8]) -> Result<(), String> {
    if header.len() as u64 != manifest.header.bytes
        || blake3::hash(header).to_hex().as_str() != manifest.header.blake3
    {
        return Err("the header does not match the manifest".into());
    }
    let g = Gguf::header_from_bytes(header).map_err(|e| format!("the header: {e}"))?;
    if g.architecture() != Some(manifest.architecture.as_str())
        || g.block_count() != Some(manifest.n_layers)
    {
        return Err("the header's architecture or layer count differs from the manifest's".into());
    }
    let embd = g
        .get(&format!("{}.embedding_length", manifest.architecture))
        .and_then(crate::shard::gguf::Value::as_u64);
    if !embd.is_some_and(|n| (1..=crate::shard::manifest::MAX_EMBEDDING).contains(&n)) {
        return Err(format!(
            "the header's embedding length {embd:?} is not within 1..={}",
            crate::shard::manifest::MAX_EMBEDDING
        ));
    }
    // The manifest must be the split its header implies: every shard's range,
    // size and roles are what this node will check the files against.
    let plan = crate::shard::plan::plan_of(header, manifest)
        .map_err(|e| format!("the header cannot be split as the manifest says: {e}"))?;
    if !plan.matches(manifest) {
        return Err("the manifest's shards differ from the split its header implies".into());
    }
    Ok(())
}

/// Whether a multiaddr is on this machine or a private network.
pub(crate) fn is_lan(addr: &str) -> bool {
    let ip = addr
        .split('/')
        .nth(2)
        .and_then(|s| s.parse::<std::net::IpAddr>().ok());
    match ip {
        Some(std::net::IpAddr::V4(v4)) => v4.is_loopback() || v4.is_private() || v4.is_link_local(),
        Some(std::net::IpAddr::V6(v6)) => v6.is_loopback() || (v6.segments()[0] & 0xfe00) == 0xfc00,
        None => false,
    }
}

/// Whether shard `index` is on disk and intact (checked off the async runtime).
async fn intact_on_disk(dir: ModelDir, manifest: Manifest, index: u32) -> bool {
    tokio::task::spawn_blocking(move || shard::verify_shard(&dir, &manifest, index).is_ok())
        .await
        .unwrap_or(false)
}
