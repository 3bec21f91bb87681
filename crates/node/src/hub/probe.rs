//! A remote GGUF's header, read with range requests (never the weights), and the
//! shard layout a node would split it into.

use serde_json::{Value, json};

use super::search::Fit;
use super::{Hub, HubError, Resolved};
use crate::shard::gguf::{Gguf, GgufError};
use crate::shard::manifest::MAX_HEADER_BYTES;
use crate::shard::parts::{self, SourceMap};
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
    /// Where and what the file (the first part) is.
    pub file: Resolved,
    /// Every file with its path in the repository (one, or each part in order).
    pub parts: Vec<(String, Resolved)>,
    /// Its header: exactly the bytes before the tensor data (for a multi-part
    /// GGUF, the merged header of the virtual file, see [`crate::shard::parts`]).
    pub header: Vec<u8>,
    /// The header parsed, with tensor spans.
    pub gguf: Gguf,
    /// Where the virtual file's bytes are in the parts.
    pub map: SourceMap,
}

impl Hub {
    /// Resolves `filename` in `repo_id` and reads its GGUF header; for the first
    /// part of a multi-part GGUF, every part's header, merged.
    pub async fn probe(
        &self,
        repo_id: &str,
        filename: &str,
        revision: Option<&str>,
    ) -> Result<Probed, HubError> {
        if !filename.ends_with(".gguf") {
            return Err(HubError::Invalid(format!("{filename} is not a .gguf file")));
        }
        let (folder, name) = match filename.rsplit_once('/') {
            Some((f, n)) => (format!("{f}/"), n),
            None => (String::new(), filename),
        };
        let names: Vec<String> = match parts::part_names(name) {
            Some(all) => all.into_iter().map(|n| format!("{folder}{n}")).collect(),
            None => vec![filename.to_string()],
        };
        let mut files = Vec::new();
        let mut heads = Vec::new();
        let mut first_header = Vec::new();
        for n in &names {
            let file = self.resolve(repo_id, n, revision).await?;
            let (header, g) = self.read_header(&file, repo_id, n).await?;
            if first_header.is_empty() {
                first_header = header;
            }
            files.push((n.clone(), file));
            heads.push(g);
        }
        let (header, gguf, map) = match heads.as_slice() {
            [one] => {
                if parts::split_count(one) > 1 {
                    return Err(HubError::Invalid(format!(
                        "{filename} is one part of a multi-part GGUF: give its first part \
                         (…-00001-of-…)"
                    )));
                }
                let size = files.first().map_or(0, |(_, f)| f.size);
                (first_header, one.clone(), SourceMap::whole(size))
            }
            many => parts::merge(many)
                .map_err(|e| HubError::BadFile(format!("{repo_id}/{filename}: {e}")))?,
        };
        let Some((_, file)) = files.first().cloned() else {
            return Err(HubError::Invalid("no file".into()));
        };
        Ok(Probed {
            repo_id: repo_id.to_string(),
            filename: filename.to_string(),
            file,
            parts: files,
            header,
            gguf,
            map,
        })
    }

    /// Reads the GGUF header of one resolved file (1 MiB first, doubled until it
    /// parses); returns exactly its bytes before the tensor data, parsed.
    async fn read_header(
        &self,
        file: &Resolved,
        repo_id: &str,
        name: &str,
    ) -> Result<(Vec<u8>, Gguf), HubError> {
        let mut want = FIRST_READ.min(file.size);
        let mut bytes: Vec<u8> = Vec::new();
        loop {
            let more = self.read_bytes(file, bytes.len() as u64, want).await?;
            bytes.extend_from_slice(&more);
            match Gguf::header_of_file(&bytes, file.size) {
                Ok(g) => {
                    if g.data_offset > MAX_HEADER_BYTES {
                        return Err(HubError::BadFile(format!(
                            "a GGUF header of {} bytes",
                            g.data_offset
                        )));
                    }
                    let end = usize::try_from(g.data_offset)
                        .ok()
                        .filter(|&e| e <= bytes.len())
                        .ok_or_else(|| {
                            HubError::BadFile("the header runs past what was read".into())
                        })?;
                    bytes.truncate(end);
                    return Ok((bytes, g));
                }
                Err(GgufError::Io(e))
                    if e.kind() == std::io::ErrorKind::UnexpectedEof
                        && want < file.size.min(MAX_HEADER_BYTES + 4096) =>
                {
                    want = (want * 2).min(file.size).min(MAX_HEADER_BYTES + 4096);
                }
                Err(e) => {
                    return Err(HubError::BadFile(format!(
                        "{repo_id}/{name} has no usable GGUF header: {e}"
                    )));
                }
            }
        }
    }
}

impl Probed {
    /// Bytes of all its files.
    pub fn total_size(&self) -> u64 {
        self.parts.iter().map(|(_, f)| f.size).sum()
    }

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
        let by_size = self.total_size().div_ceil(TARGET_SHARD_BYTES) as u32;
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
            "size_bytes": self.total_size(),
            "parts": self.parts.iter().map(|(name, f)| json!({
                "filename": name, "size_bytes": f.size, "sha256": f.sha256,
            })).collect::<Vec<_>>(),
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
            "fits_vram": fit.fits(
                self.total_size(),
                kv.unwrap_or_else(|| Fit::kv_per_token_estimate(self.total_size())),
            ),
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
