//! This node's models on disk, as the pipeline sees them: scanning the models
//! folder and loading every run of intact shards as a layer range, unloading and
//! removing, the manifest hashes accepted, and each model's vocabulary.

use std::sync::Arc;

use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::model::params::LlamaModelParams;

use super::Pipeline;
use super::host::RangeInfo;
use crate::shard::ModelDir;
use crate::shard::library::{self, LocalModel};

impl Pipeline {
    /// Rescans the models directory and loads every contiguous run of intact
    /// shards as one layer range (replacing what was loaded). Damaged shards are
    /// reported and left out.
    pub async fn load_held(&self) -> Vec<LocalModel> {
        let cfg = self.inner.config.clone();
        // One reload at a time (downloads finishing together would interleave).
        let _one_at_a_time = self.inner.reload.lock().await;
        let this = self.clone();
        let scan = tokio::task::spawn_blocking(move || {
            let scan = library::scan(&cfg.models_dir);
            // The manifests on disk are the user's choice: they pin their ids.
            if let Err(e) = this.inner.pins.load_once() {
                tracing::warn!(error = %e, "could not read the manifest pins");
            }
            for m in &scan.models {
                if let Err(e) = this.inner.pins.set(&m.manifest.model_id, &m.manifest_hash) {
                    tracing::warn!(model = %m.manifest.model_id, error = %e, "could not pin a manifest");
                }
            }
            scan
        })
        .await
        .unwrap_or_default();
        let models = scan.models;
        *self
            .inner
            .rejected
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = scan.rejected;
        let mut wanted: Vec<(&LocalModel, u32, u32)> = Vec::new();
        for model in &models {
            for &bad in &model.corrupt {
                tracing::warn!(model = %model.manifest.model_id, shard = bad,
                    "shard file does not match its BLAKE3 hash; discarding it and fetching it again");
                if let Some(s) = model.manifest.shard(bad) {
                    let _ = std::fs::remove_file(model.dir.shard(s));
                }
                let _ = self
                    .inner
                    .repairs
                    .send((model.manifest.model_id.clone(), bad));
            }
            let skip = self
                .inner
                .unloaded
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&model.manifest.model_id)
                .cloned()
                .unwrap_or_default();
            for (first, last) in model.runs_without(&skip) {
                wanted.push((model, first, last));
            }
        }
        // Only what changed is unloaded or loaded, so sessions on unchanged ranges
        // live on.
        let loaded = self.inner.host.ranges();
        for r in &loaded {
            if !wanted.iter().any(|(m, a, b)| {
                m.manifest.model_id == r.model_id && *a == r.first_shard && *b == r.last_shard
            }) {
                self.inner
                    .host
                    .unload(&r.model_id, r.layer_start, r.layer_end)
                    .await;
            }
        }
        for (model, first, last) in wanted {
            let present = loaded.iter().any(|r| {
                r.model_id == model.manifest.model_id
                    && r.first_shard == first
                    && r.last_shard == last
            });
            if present {
                continue;
            }
            let key = format!(
                "{}|{}|{first}|{last}|{:?}",
                model.manifest.model_id,
                model.manifest_hash,
                (first..=last)
                    .map(|i| model.hashes.get(i).unwrap_or(""))
                    .collect::<Vec<_>>()
            );
            let failed_before = self
                .inner
                .failed_runs
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains(&key);
            if failed_before {
                tracing::debug!(model = %model.manifest.model_id, first, last,
                    "not retrying a shard run that failed to load");
                continue;
            }
            if let Err(e) = self.load_run(model, first, last).await {
                tracing::warn!(model = %model.manifest.model_id, first, last, error = %e,
                    "could not load a shard run");
                let mut failed = self
                    .inner
                    .failed_runs
                    .lock()
                    .unwrap_or_else(|p| p.into_inner());
                if failed.len() >= 1024 {
                    failed.clear();
                }
                failed.insert(key);
            }
        }
        *self.inner.local.lock().unwrap_or_else(|p| p.into_inner()) = models.clone();
        models
    }

    pub(super) async fn load_run(
        &self,
        model: &LocalModel,
        first: u32,
        last: u32,
    ) -> Result<(), String> {
        let m = &model.manifest;
        let (Some(a), Some(b)) = (m.shard(first), m.shard(last)) else {
            return Err(format!("shards {first}..={last} are not in the manifest"));
        };
        let ranges_dir = self.inner.config.ranges_dir.clone();
        let model_clone = model.clone();
        let path = tokio::task::spawn_blocking(move || {
            library::range_file(&model_clone, &ranges_dir, first, last)
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
        let info = RangeInfo {
            model_id: m.model_id.clone(),
            first_shard: first,
            last_shard: last,
            layer_start: a.layer_start,
            layer_end: b.layer_end,
            n_layers: m.n_layers,
            has_embedding: first == 0,
            has_head: last + 1 == m.shard_count(),
            path,
            ms_per_layer: None,
            gpu_layers: 0,
        };
        self.inner
            .host
            .load(info)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    /// Keeps shards `indices` of `model_id` out of memory (`load = false`) or lets
    /// them back in, then reloads the ranges. Returns the shards loaded afterwards.
    pub async fn set_loaded(&self, model_id: &str, indices: &[u32], load: bool) -> Vec<u32> {
        {
            let mut unloaded = self
                .inner
                .unloaded
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let set = unloaded.entry(model_id.to_string()).or_default();
            for i in indices {
                if load {
                    set.remove(i);
                } else {
                    set.insert(*i);
                }
            }
        }
        self.load_held().await;
        self.loaded_shards(model_id)
    }

    /// Shards of `model_id` currently loaded.
    pub fn loaded_shards(&self, model_id: &str) -> Vec<u32> {
        let mut out: Vec<u32> = self
            .inner
            .host
            .ranges()
            .into_iter()
            .filter(|r| r.model_id == model_id)
            .flat_map(|r| r.first_shard..=r.last_shard)
            .collect();
        out.sort_unstable();
        out
    }

    /// Removes `model_id` from this node: unloads it, cancels its downloads and
    /// deletes its directory. Whether it was there.
    pub async fn remove_model(&self, model_id: &str) -> std::io::Result<bool> {
        let Ok(dir) = ModelDir::new(&self.inner.config.models_dir, model_id) else {
            return Ok(false);
        };
        let dir = dir.path().to_path_buf();
        if !dir.is_dir() {
            return Ok(false);
        }
        self.cancel_downloads(model_id);
        for r in self
            .inner
            .host
            .ranges()
            .into_iter()
            .filter(|r| r.model_id == model_id)
        {
            self.inner
                .host
                .unload(model_id, r.layer_start, r.layer_end)
                .await;
        }
        tokio::task::spawn_blocking(move || std::fs::remove_dir_all(dir))
            .await
            .map_err(std::io::Error::other)??;
        self.inner
            .vocabs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(model_id);
        self.load_held().await;
        Ok(true)
    }

    /// Deletes one shard file of `model_id`. Whether it was there.
    pub async fn remove_shard(&self, model_id: &str, index: u32) -> std::io::Result<bool> {
        let Some(model) = self
            .local_models()
            .into_iter()
            .find(|m| m.manifest.model_id == model_id)
        else {
            return Ok(false);
        };
        let Some(entry) = model.manifest.shard(index) else {
            return Ok(false);
        };
        let path = model.dir.shard(entry);
        if !path.is_file() {
            return Ok(false);
        }
        std::fs::remove_file(&path)?;
        self.load_held().await;
        Ok(true)
    }

    /// The manifest hash this node accepted for `model_id`, if any.
    pub fn manifest_hash(&self, model_id: &str) -> Option<String> {
        self.inner.pins.get(model_id)
    }

    /// Model directories the last scan skipped because their manifest is bad.
    pub fn rejected_models(&self) -> Vec<library::RejectedModel> {
        self.inner
            .rejected
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The models in this node's models directory, as last scanned.
    pub fn local_models(&self) -> Vec<LocalModel> {
        self.inner
            .local
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Whether this node holds (on disk, intact) the first and the last shard of
    /// `model_id`, as the encrypted pipeline needs; and the shard count.
    pub fn holds_ends(&self, model_id: &str) -> (bool, bool, usize) {
        self.local_models()
            .into_iter()
            .find(|m| m.manifest.model_id == model_id)
            .map(|m| {
                let n = m.manifest.shard_count();
                (
                    m.held.contains(&0),
                    n > 0 && m.held.contains(&(n - 1)),
                    n as usize,
                )
            })
            .unwrap_or((false, false, 0))
    }

    pub(super) fn model_dir(&self, model_id: &str) -> Option<ModelDir> {
        ModelDir::new(&self.inner.config.models_dir, model_id)
            .ok()
            .filter(|dir| dir.header().is_file())
    }

    /// The model's vocabulary (tokenizer and chat template), loaded once, by
    /// whoever asks first: concurrent first requests wait for that load instead
    /// of each writing and loading the vocabulary file at the same time.
    pub async fn vocab(&self, model_id: &str) -> Result<Arc<LlamaModel>, String> {
        let cached = |this: &Self| {
            this.inner
                .vocabs
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(model_id)
                .cloned()
        };
        if let Some(v) = cached(self) {
            return Ok(v);
        }
        let _loading = self.inner.vocab_load.lock().await;
        if let Some(v) = cached(self) {
            return Ok(v);
        }
        // A requester needs only the header (for the tokenizer): fetched from a
        // holder, checked like any manifest, when this node has none.
        if self.model_dir(model_id).is_none() {
            self.ensure_manifest(model_id).await.map_err(|e| {
                format!("this node has no copy of model '{model_id}''s header and could not fetch one: {e}")
            })?;
        }
        let dir = self.model_dir(model_id).ok_or_else(|| {
            format!(
                "this node has no copy of model '{model_id}''s header (import or add the model)"
            )
        })?;
        let ranges = self.inner.config.ranges_dir.clone();
        let id = model_id.to_string();
        let backends = self.inner.config.backends_dir.clone();
        let model = tokio::task::spawn_blocking(move || -> Result<LlamaModel, String> {
            let path = library::vocab_file(&dir, &id, &ranges).map_err(|e| e.to_string())?;
            let backend = crate::infer::backend(backends.as_deref()).map_err(|e| e.to_string())?;
            LlamaModel::load_from_file(
                backend,
                &path,
                &LlamaModelParams::default().with_vocab_only(true),
            )
            .map_err(|e| format!("loading the vocabulary of {id}: {e}"))
        })
        .await
        .map_err(|e| e.to_string())??;
        let model = Arc::new(model);
        self.inner
            .vocabs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(model_id.to_string(), Arc::clone(&model));
        Ok(model)
    }
}
