//! Layer shards: a GGUF split into a model directory of layer-aligned files.
//!
//! ```text
//! <models>/<model id>/
//!   manifest.json       model id, architecture, n_layers, per-shard layer range,
//!                       size and BLAKE3 of every file
//!   gguf_header.bin     the source GGUF's header and metadata (no tensor data)
//!   shard-000.gguf      blk.0 … blk.k-1, plus the token embedding
//!   shard-001.gguf      the next layers
//!   …                   the last one also holds the output norm and head
//! ```
//!
//! Each shard is itself a GGUF with the full metadata and its tensors under their
//! original names. [`assemble`] joins a contiguous run of shards into one runnable
//! GGUF, renumbering its layers from 0; the run of all shards reproduces the source
//! model exactly (same tensor bytes). Tensors outside the layers that every layer
//! uses (e.g. `rope_freqs`) travel with every shard.

pub mod gguf;
pub mod library;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use self::gguf::{Gguf, GgufError, TensorSource, Value};

/// Manifest format tag.
pub const FORMAT: &str = "swarmllm-shards/1";

/// A file in a model directory.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FileEntry {
    /// File name inside the model directory.
    pub file: String,
    /// Size in bytes.
    pub bytes: u64,
    /// BLAKE3 of the whole file, hex.
    pub blake3: String,
}

impl FileEntry {
    /// Whether the file at `path` has exactly this size and BLAKE3 (whatever its
    /// name: a download's `.part` file is checked before it is renamed).
    pub fn matches_file(&self, path: &Path) -> bool {
        hash_file(path).is_ok_and(|h| h.blake3 == self.blake3 && h.bytes == self.bytes)
    }
}

/// One shard.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ShardEntry {
    /// Position in the chain, from 0.
    pub index: u32,
    /// First layer.
    pub layer_start: u32,
    /// One past the last layer.
    pub layer_end: u32,
    /// The file.
    #[serde(flatten)]
    pub file: FileEntry,
    /// Tensors in it.
    pub tensors: usize,
    /// Holds the token embedding.
    pub has_embedding: bool,
    /// Holds the output norm and head.
    pub has_head: bool,
}

/// `manifest.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    /// [`FORMAT`].
    pub format: String,
    /// Model id.
    pub model_id: String,
    /// `general.architecture`.
    pub architecture: String,
    /// Transformer layers.
    pub n_layers: u32,
    /// The head reuses the token embedding (no `output.weight`).
    pub tied_embeddings: bool,
    /// The GGUF it was made from.
    pub source: FileEntry,
    /// The header file.
    pub header: FileEntry,
    /// The shards, in layer order.
    pub shards: Vec<ShardEntry>,
}

/// Importing, verifying or assembling shards failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ShardError {
    /// The GGUF could not be read or written.
    #[error(transparent)]
    Gguf(#[from] GgufError),
    /// A file operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The request does not fit the model.
    #[error("{0}")]
    Invalid(String),
    /// The model directory already exists.
    #[error("model {0} is already imported")]
    Exists(String),
    /// The manifest is missing or unreadable.
    #[error("manifest {path}: {message}")]
    Manifest {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> ShardError + '_ {
    move |source| ShardError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Hashes a file with BLAKE3.
pub fn hash_file(path: &Path) -> Result<FileEntry, ShardError> {
    let mut hasher = blake3::Hasher::new();
    let file = std::fs::File::open(path).map_err(io(path))?;
    hasher.update_reader(file).map_err(io(path))?;
    Ok(FileEntry {
        file: path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        bytes: std::fs::metadata(path).map_err(io(path))?.len(),
        blake3: hasher.finalize().to_hex().to_string(),
    })
}

/// Splits `n_layers` into `shards` contiguous ranges, earlier ones one longer when
/// it does not divide evenly.
pub fn layer_ranges(n_layers: u32, shards: u32) -> Vec<(u32, u32)> {
    let base = n_layers / shards;
    let extra = n_layers % shards;
    let mut start = 0;
    (0..shards)
        .map(|i| {
            let len = base + u32::from(i < extra);
            let r = (start, start + len);
            start += len;
            r
        })
        .collect()
}

fn is_embedding(name: &str) -> bool {
    name.starts_with("token_embd.")
}

fn is_head(name: &str) -> bool {
    name.starts_with("output_norm.") || name.starts_with("output.")
}

/// Splits the GGUF at `source` into `shards` layer shards under
/// `<models_dir>/<model_id>/`. `progress(done, total)` is called per file written.
pub fn import(
    source: &Path,
    models_dir: &Path,
    model_id: &str,
    shards: u32,
    mut progress: impl FnMut(u32, u32),
) -> Result<Manifest, ShardError> {
    let g = Gguf::read(source)?;
    let arch = g
        .architecture()
        .ok_or_else(|| ShardError::Invalid("the GGUF has no general.architecture".into()))?
        .to_string();
    let n_layers = g
        .block_count()
        .ok_or_else(|| ShardError::Invalid(format!("the GGUF has no {arch}.block_count")))?;
    if shards == 0 || shards > n_layers {
        return Err(ShardError::Invalid(format!(
            "--shards must be between 1 and the model's {n_layers} layers"
        )));
    }
    if shards > 1 && !SPLIT_ARCHITECTURES.contains(&arch.as_str()) {
        return Err(ShardError::Invalid(format!(
            "architecture '{arch}' cannot be split yet (supported: {}); import it with --shards 1 \
             to serve it whole",
            SPLIT_ARCHITECTURES.join(", ")
        )));
    }
    if model_id.is_empty() || model_id.contains(['/', '\\']) || model_id.starts_with('.') {
        return Err(ShardError::Invalid(format!(
            "'{model_id}' is not a usable model id"
        )));
    }
    let final_dir = models_dir.join(model_id);
    if final_dir.exists() {
        return Err(ShardError::Exists(model_id.to_string()));
    }
    // Build in a sibling temp dir and rename at the end: a crash or error never
    // leaves a half-imported model that looks complete.
    let work = models_dir.join(format!(".{model_id}.importing-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).map_err(io(&work))?;
    let result = write_shards(
        &g,
        source,
        &work,
        model_id,
        &arch,
        n_layers,
        shards,
        &mut progress,
    );
    match result {
        Ok(manifest) => {
            std::fs::rename(&work, &final_dir).map_err(io(&final_dir))?;
            Ok(manifest)
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&work);
            Err(e)
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn write_shards(
    g: &Gguf,
    source: &Path,
    dir: &Path,
    model_id: &str,
    arch: &str,
    n_layers: u32,
    shards: u32,
    progress: &mut impl FnMut(u32, u32),
) -> Result<Manifest, ShardError> {
    let total = shards + 1;
    let tied = !g
        .tensors
        .iter()
        .any(|t| t.name.starts_with("output.weight"));

    // The header: every byte before the tensor data.
    let header_path = dir.join("gguf_header.bin");
    {
        use std::io::Read;
        let mut head = vec![0u8; g.data_offset as usize];
        std::fs::File::open(source)
            .and_then(|mut f| f.read_exact(&mut head))
            .map_err(io(source))?;
        std::fs::write(&header_path, head).map_err(io(&header_path))?;
    }
    progress(1, total);

    let mut entries = Vec::new();
    for (index, (start, end)) in layer_ranges(n_layers, shards).into_iter().enumerate() {
        let index = index as u32;
        let first = index == 0;
        let last = index == shards - 1;
        let tensors: Vec<TensorSource<'_>> = g
            .tensors
            .iter()
            .filter(|t| match t.layer() {
                Some(l) => (start..end).contains(&l),
                None if is_embedding(&t.name) => first || (last && tied),
                None if is_head(&t.name) => last,
                None => true,
            })
            .map(|t| TensorSource::from_file(t.name.clone(), t, source, g.data_offset))
            .collect();
        let mut kv = g.kv.clone();
        let mut set = |k: &str, v: u32| match kv.iter_mut().find(|(key, _)| key == k) {
            Some((_, val)) => *val = Value::U32(v),
            None => kv.push((k.to_string(), Value::U32(v))),
        };
        set("swarmllm.shard.index", index);
        set("swarmllm.shard.layer_start", start);
        set("swarmllm.shard.layer_end", end);
        let path = dir.join(format!("shard-{index:03}.gguf"));
        gguf::write(&path, &kv, g.alignment, &tensors)?;
        entries.push(ShardEntry {
            index,
            layer_start: start,
            layer_end: end,
            file: hash_file(&path)?,
            tensors: tensors.len(),
            has_embedding: tensors.iter().any(|t| is_embedding(&t.name)),
            has_head: last,
        });
        progress(index + 2, total);
    }
    let manifest = Manifest {
        format: FORMAT.into(),
        model_id: model_id.into(),
        architecture: arch.into(),
        n_layers,
        tied_embeddings: tied,
        source: hash_file(source)?,
        header: hash_file(&header_path)?,
        shards: entries,
    };
    let text =
        serde_json::to_vec_pretty(&manifest).map_err(|e| ShardError::Invalid(e.to_string()))?;
    let path = dir.join("manifest.json");
    crate::fsutil::write_atomic(&path, &text).map_err(io(&path))?;
    Ok(manifest)
}

/// Reads `<dir>/manifest.json`.
pub fn read_manifest(dir: &Path) -> Result<Manifest, ShardError> {
    let path = dir.join("manifest.json");
    let text = std::fs::read(&path).map_err(|e| ShardError::Manifest {
        path: path.clone(),
        message: e.to_string(),
    })?;
    let m: Manifest = serde_json::from_slice(&text).map_err(|e| ShardError::Manifest {
        path: path.clone(),
        message: e.to_string(),
    })?;
    if m.format != FORMAT {
        return Err(ShardError::Manifest {
            path,
            message: format!("unknown format {}", m.format),
        });
    }
    Ok(m)
}

/// Indices of shards whose file is missing or does not match its BLAKE3.
pub fn verify(dir: &Path, manifest: &Manifest) -> Vec<u32> {
    manifest
        .shards
        .iter()
        .filter(|s| {
            hash_file(&dir.join(&s.file.file))
                .map(|h| h.blake3 != s.file.blake3 || h.bytes != s.file.bytes)
                .unwrap_or(true)
        })
        .map(|s| s.index)
        .collect()
}

/// Joins shards `first..=last` of the model in `dir` into one runnable GGUF at
/// `out`, with layers renumbered from 0.
///
/// llama.cpp only loads a model that has a token embedding and an output norm. A run
/// without the first shard gets a 1-row placeholder embedding and a one-token
/// vocabulary (it is fed hidden states, never tokens) unless it ends with a tied head,
/// which is the embedding itself; a run without the last shard gets a placeholder
/// output norm (its head output is never read). The run of all shards is exactly the
/// source model.
pub fn assemble(
    dir: &Path,
    manifest: &Manifest,
    first: u32,
    last: u32,
    out: &Path,
) -> Result<(), ShardError> {
    if first > last || last as usize >= manifest.shards.len() {
        return Err(ShardError::Invalid(format!(
            "shards {first}..={last} are not a run of this {}-shard model",
            manifest.shards.len()
        )));
    }
    let run: Vec<&ShardEntry> = manifest.shards[first as usize..=last as usize]
        .iter()
        .collect();
    let paths: Vec<PathBuf> = run.iter().map(|s| dir.join(&s.file.file)).collect();
    let ggufs = paths
        .iter()
        .map(|p| Gguf::read(p))
        .collect::<Result<Vec<_>, _>>()?;
    let layer_start = run[0].layer_start;
    let layers = run[run.len() - 1].layer_end - layer_start;
    let with_head = last as usize == manifest.shards.len() - 1;
    // A tied head *is* the token embedding, so the last shard keeps it.
    let with_embedding = first == 0 || (with_head && manifest.tied_embeddings);

    let mut tensors = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (g, path) in ggufs.iter().zip(&paths) {
        for t in &g.tensors {
            let name = match t.layer() {
                Some(l) => {
                    let rest = &t.name[format!("blk.{l}.").len()..];
                    format!("blk.{}.{rest}", l - layer_start)
                }
                None if is_embedding(&t.name) && !with_embedding => continue,
                None => t.name.clone(),
            };
            // Shared tensors appear in every shard: keep one copy.
            if seen.insert(name.clone()) {
                tensors.push(TensorSource::from_file(name, t, path, g.data_offset));
            }
        }
    }
    let mut kv = ggufs[0].kv.clone();
    kv.retain(|(k, _)| !k.starts_with("swarmllm.shard."));
    let arch = &manifest.architecture;
    let n_embd = kv
        .iter()
        .find(|(k, _)| *k == format!("{arch}.embedding_length"))
        .and_then(|(_, v)| v.as_u64())
        .ok_or_else(|| ShardError::Invalid(format!("no {arch}.embedding_length")))?;
    if !with_embedding {
        tensors.push(TensorSource::f32(
            "token_embd.weight",
            vec![n_embd, 1],
            &vec![0.0; n_embd as usize],
        ));
        kv.retain(|(k, _)| !k.starts_with("tokenizer."));
        kv.push(("tokenizer.ggml.model".into(), Value::Str("none".into())));
        set_u32(&mut kv, &format!("{arch}.vocab_size"), 1);
    }
    if !with_head && !seen.contains("output_norm.weight") {
        tensors.push(TensorSource::f32(
            "output_norm.weight",
            vec![n_embd],
            &vec![1.0; n_embd as usize],
        ));
    }
    set_u32(&mut kv, &format!("{arch}.block_count"), layers);
    keep_swa_pattern(&mut kv, arch, manifest.n_layers, layer_start, layers);
    gguf::write(out, &kv, ggufs[0].alignment, &tensors)?;
    Ok(())
}

/// Sliding-window architectures decide per layer *index* whether a layer uses the
/// window (gemma3: every 6th layer is global). Renumbering a range from 0 would
/// shift that pattern, so the range gets the explicit per-layer list of the layers
/// it really holds (`<arch>.attention.sliding_window_pattern` as a bool array, which
/// llama.cpp reads before any period).
fn keep_swa_pattern(
    kv: &mut Vec<(String, Value)>,
    arch: &str,
    n_layers: u32,
    start: u32,
    len: u32,
) {
    // (period, dense first) as llama.cpp's loaders default them.
    let default = match arch {
        "gemma3" => (6, false),
        "gemma2" => (2, false),
        "cohere2" => (4, false),
        _ => return,
    };
    let key = format!("{arch}.attention.sliding_window_pattern");
    let pattern: Vec<bool> = match kv.iter().find(|(k, _)| *k == key).map(|(_, v)| v.clone()) {
        Some(Value::Array(_, items)) => items
            .iter()
            .map(|v| matches!(v, Value::Bool(true)))
            .collect(),
        other => {
            let period = other.and_then(|v| v.as_u64()).unwrap_or(default.0) as u32;
            (0..n_layers)
                .map(|il| {
                    period == 0
                        || if default.1 {
                            il % period != 0
                        } else {
                            il % period < period - 1
                        }
                })
                .collect()
        }
    };
    let slice: Vec<Value> = (start..start + len)
        .map(|il| Value::Bool(pattern.get(il as usize).copied().unwrap_or(false)))
        .collect();
    kv.retain(|(k, _)| *k != key);
    kv.push((key, Value::Array(7, slice)));
}

fn set_u32(kv: &mut Vec<(String, Value)>, key: &str, v: u32) {
    match kv.iter_mut().find(|(k, _)| k == key) {
        Some((_, val)) => *val = Value::U32(v),
        None => kv.push((key.to_string(), Value::U32(v))),
    }
}

/// Architectures the layer-split pipeline is built and tested for.
pub const SPLIT_ARCHITECTURES: &[&str] = &["llama", "qwen2", "gemma3"];

/// llama.cpp's `general.file_type` codes.
pub fn quantization_name(file_type: u64) -> Option<&'static str> {
    Some(match file_type {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        7 => "Q8_0",
        8 => "Q5_0",
        9 => "Q5_1",
        10 => "Q2_K",
        11 => "Q3_K_S",
        12 => "Q3_K_M",
        13 => "Q3_K_L",
        14 => "Q4_K_S",
        15 => "Q4_K_M",
        16 => "Q5_K_S",
        17 => "Q5_K_M",
        18 => "Q6_K",
        19 => "IQ2_XXS",
        20 => "IQ2_XS",
        21 => "Q2_K_S",
        22 => "IQ3_XS",
        23 => "IQ3_XXS",
        24 => "IQ1_S",
        25 => "IQ4_NL",
        26 => "IQ3_S",
        27 => "IQ3_M",
        28 => "IQ2_S",
        29 => "IQ2_M",
        30 => "IQ4_XS",
        31 => "IQ1_M",
        32 => "BF16",
        36 => "TQ1_0",
        37 => "TQ2_0",
        _ => return None,
    })
}

/// The parsed metadata of a model's `gguf_header.bin`, in the shape of
/// `GET /api/admin/models/{id}/metadata` (tokenizer vocabulary arrays left out).
pub fn metadata_json(model_id: &str, header: &Gguf) -> serde_json::Value {
    use serde_json::json;
    let arch = header.architecture().unwrap_or("unknown").to_string();
    let num = |k: &str| header.get(k).and_then(Value::as_u64);
    let float = |k: &str| header.get(k).and_then(Value::as_f64);
    let text = |k: &str| header.get(k).and_then(Value::as_str).map(str::to_string);
    let a = |k: &str| format!("{arch}.{k}");
    let file_type = num("general.file_type");
    let vocab_size = num(&a("vocab_size")).or_else(|| match header.get("tokenizer.ggml.tokens") {
        Some(Value::Array(_, items)) => Some(items.len() as u64),
        _ => None,
    });
    let raw: Vec<serde_json::Value> = header
        .kv
        .iter()
        .filter(|(k, v)| !(k.starts_with("tokenizer.ggml.") && matches!(v, Value::Array(..))))
        .map(|(k, v)| json!({ "key": k, "value": v.to_json(64) }))
        .collect();
    json!({
        "model_id": model_id,
        "general": {
            "name": text("general.name"),
            "architecture": arch,
            "architecture_supported": SPLIT_ARCHITECTURES.contains(&arch.as_str()),
            "file_type": file_type,
            "quantization": file_type.and_then(quantization_name),
        },
        "model": {
            "context_length": num(&a("context_length")),
            "block_count": num(&a("block_count")),
            "embedding_length": num(&a("embedding_length")),
            "head_count": num(&a("attention.head_count")),
            "head_count_kv": num(&a("attention.head_count_kv")),
            "rope_dimension_count": num(&a("rope.dimension_count")),
            "rope_freq_base": float(&a("rope.freq_base")),
            "layer_norm_rms_epsilon": float(&a("attention.layer_norm_rms_epsilon")),
            "vocab_size": vocab_size,
        },
        "tokenizer": {
            "model": text("tokenizer.ggml.model"),
            "pre": text("tokenizer.ggml.pre"),
            "eos_token_id": num("tokenizer.ggml.eos_token_id"),
            "bos_token_id": num("tokenizer.ggml.bos_token_id"),
            "padding_token_id": num("tokenizer.ggml.padding_token_id"),
        },
        "tensors": { "count": header.tensors.len(), "data_offset": header.data_offset },
        "raw": raw,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_ranges_cover_every_layer_once() {
        assert_eq!(layer_ranges(30, 3), vec![(0, 10), (10, 20), (20, 30)]);
        assert_eq!(
            layer_ranges(30, 4),
            vec![(0, 8), (8, 16), (16, 23), (23, 30)]
        );
        assert_eq!(layer_ranges(5, 5).len(), 5);
        assert_eq!(layer_ranges(7, 1), vec![(0, 7)]);
    }
}
