//! A remote GGUF's header, read with range requests (never the weights), and the
//! shard layout a node would split it into.

use serde_json::{Value, json};

use super::search::Fit;
use super::{Hub, HubError, Resolved};
use crate::shard::gguf::{Gguf, GgufError};
use crate::shard::manifest::MAX_HEADER_BYTES;
use crate::shard::{self, ModelPlan, SPLIT_ARCHITECTURES};

/// First read of a header; doubled until the header parses (a big vocabulary
/// makes it several MiB).
const FIRST_READ: u64 = 1 << 20;
/// Fewest shards a splittable model is cut into by default.
pub const DEFAULT_MIN_SHARDS: u32 = 3;
/// A shard of about this size when the model is large.
pub const TARGET_SHARD_BYTES: u64 = 2 << 30;

/// A probed remote GGUF.
#[derive(Debug, Clone)]
pub struct Probed {
    /// Repository.
    pub repo_id: String,
    /// Path in it.
    pub filename: String,
    /// Where and what the file is.
    pub file: Resolved,
    /// Its header: exactly the bytes before the tensor data.
    pub header: Vec<u8>,
    /// The header parsed, with tensor spans from the file size.
    pub gguf: Gguf,
}

impl Hub {
    /// Resolves `filename` in `repo_id` and reads its GGUF header.
    pub async fn probe(
        &self,
        repo_id: &str,
        filename: &str,
        revision: Option<&str>,
    ) -> Result<Probed, HubError> {
        if !filename.ends_with(".gguf") {
            return Err(HubError::Invalid(format!("{filename} is not a .gguf file")));
        }
        let file = self.resolve(repo_id, filename, revision).await?;
        let mut want = FIRST_READ.min(file.size);
        let mut bytes: Vec<u8> = Vec::new();
        loop {
            let more = self.read_bytes(&file, bytes.len() as u64, want).await?;
            bytes.extend_from_slice(&more);
            match Gguf::header_of_file(&bytes, file.size) {
                Ok(g) => {
                    // One part of a multi-part GGUF holds only some tensors: splitting
                    // it alone would make a model with layers missing.
                    if g.get("split.count")
                        .and_then(|v| v.as_u64())
                        .is_some_and(|n| n > 1)
                    {
                        return Err(HubError::Invalid(format!(
                            "{filename} is one part of a multi-part GGUF; multi-part models \
                             cannot be fetched yet"
                        )));
                    }
                    let mut header = bytes;
                    let end = usize::try_from(g.data_offset)
                        .ok()
                        .filter(|&e| e <= header.len())
                        .ok_or_else(|| {
                            HubError::BadFile("the header runs past what was read".into())
                        })?;
                    header.truncate(end);
                    if g.data_offset > MAX_HEADER_BYTES {
                        return Err(HubError::BadFile(format!(
                            "a GGUF header of {} bytes",
                            g.data_offset
                        )));
                    }
                    return Ok(Probed {
                        repo_id: repo_id.to_string(),
                        filename: filename.to_string(),
                        file,
                        header,
                        gguf: g,
                    });
                }
                Err(GgufError::Io(e))
                    if e.kind() == std::io::ErrorKind::UnexpectedEof
                        && want < file.size.min(MAX_HEADER_BYTES + 4096) =>
                {
                    want = (want * 2).min(file.size).min(MAX_HEADER_BYTES + 4096);
                }
                Err(e) => {
                    return Err(HubError::BadFile(format!(
                        "{repo_id}/{filename} has no usable GGUF header: {e}"
                    )));
                }
            }
        }
    }
}

impl Probed {
    /// The model id a node gives it (the file name without `.gguf`, lower case,
    /// as `models import` does).
    pub fn model_id(&self) -> String {
        let name = self.filename.rsplit('/').next().unwrap_or(&self.filename);
        crate::node::model_id_from_path(std::path::Path::new(name))
    }

    /// The shard count a node uses when none is asked for: at least
    /// [`DEFAULT_MIN_SHARDS`] for a splittable model, more for big ones (about
    /// [`TARGET_SHARD_BYTES`] each), never more than its layers; 1 for an
    /// architecture that cannot be split.
    pub fn default_shards(&self) -> u32 {
        let arch = self.gguf.architecture().unwrap_or_default();
        let layers = self.gguf.block_count().unwrap_or(1).max(1);
        if !SPLIT_ARCHITECTURES.contains(&arch) {
            return 1;
        }
        let by_size = self.file.size.div_ceil(TARGET_SHARD_BYTES) as u32;
        by_size.max(DEFAULT_MIN_SHARDS).min(layers)
    }

    /// The split into `shards`.
    pub fn plan(&self, shards: u32) -> Result<ModelPlan, HubError> {
        shard::plan(&self.gguf, shards).map_err(|e| HubError::Invalid(e.to_string()))
    }

    /// Exact KV cache bytes per token (f16 keys and values in every layer).
    pub fn kv_per_token(&self) -> Option<u64> {
        let g = &self.gguf;
        let arch = g.architecture()?;
        let num = |k: &str| g.get(&format!("{arch}.{k}")).and_then(max_u64);
        let layers = num("block_count")?;
        let embd = num("embedding_length")?;
        let heads = num("attention.head_count").filter(|&h| h > 0)?;
        let kv_heads = num("attention.head_count_kv").unwrap_or(heads);
        let k_len = num("attention.key_length").unwrap_or(embd / heads);
        let v_len = num("attention.value_length").unwrap_or(embd / heads);
        Some(layers * kv_heads * (k_len + v_len) * 2)
    }

    /// `GET /api/admin/hf/probe`'s answer.
    pub fn to_json(&self, shards: Option<u32>, fit: &Fit) -> Result<Value, HubError> {
        let g = &self.gguf;
        let arch = g.architecture().unwrap_or("unknown").to_string();
        let num = |k: &str| g.get(k).and_then(max_u64);
        let file_type = num("general.file_type");
        let shards = shards.unwrap_or_else(|| self.default_shards());
        let plan = self.plan(shards)?;
        let kv = self.kv_per_token();
        let layout: Vec<Value> = plan
            .shards
            .iter()
            .map(|s| {
                json!({
                    "index": s.index,
                    "layer_start": s.layer_start,
                    "layer_end": s.layer_end,
                    "bytes": s.bytes,
                    "source_bytes": s.source_bytes(),
                    "has_embedding": s.has_embedding,
                    "has_head": s.has_head,
                })
            })
            .collect();
        Ok(json!({
            "repo_id": self.repo_id,
            "filename": self.filename,
            "model_id": self.model_id(),
            "commit": self.file.commit,
            "sha256": self.file.sha256,
            "size_bytes": self.file.size,
            "header_bytes": self.header.len(),
            "architecture": arch,
            "architecture_supported": SPLIT_ARCHITECTURES.contains(&arch.as_str()),
            "n_layers": plan.n_layers,
            "context_length": num(&format!("{arch}.context_length")),
            "embedding_length": num(&format!("{arch}.embedding_length")),
            "file_type": file_type,
            "quantization": file_type.and_then(shard::quantization_name),
            "tensor_count": g.tensors.len(),
            "kv_cache_bytes_per_token": kv,
            "context": fit.context,
            "fits_vram": fit.fits(self.file.size, kv.unwrap_or_else(|| Fit::kv_per_token_estimate(self.file.size))),
            "shard_count": shards,
            "shards": layout,
        }))
    }
}

/// A number, or the largest of an array of numbers (per-layer metadata).
fn max_u64(v: &crate::shard::gguf::Value) -> Option<u64> {
    match v {
        crate::shard::gguf::Value::Array(_, items) => items.iter().filter_map(|i| i.as_u64()).max(),
        other => other.as_u64(),
    }
}
