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

pub mod arch;
pub mod gguf;
pub mod hashes;
pub mod library;
pub mod manifest;
pub mod parts;
pub mod plan;

use std::path::{Path, PathBuf};

pub use self::arch::{SPLIT_ARCHITECTURES, splittable};
use self::gguf::{Gguf, GgufError, TensorSource, Value};
pub use self::hashes::ShardHashes;
pub use self::manifest::{
    FORMAT, FileEntry, Manifest, ManifestError, ModelDir, ShardEntry, SourceFile, is_model_id,
    shard_file_name,
};
pub use self::plan::{ModelPlan, ShardPlan, layer_ranges, plan};

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
    /// The manifest breaks a rule (see [`Manifest::validate`]).
    #[error(transparent)]
    BadManifest(#[from] ManifestError),
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> ShardError + '_ {
    move |source| ShardError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Hashes a file with BLAKE3.
pub fn hash_file(path: &Path) -> Result<FileEntry, ShardError> {
    let (blake3, bytes) = hashes::blake3_of(path).map_err(io(path))?;
    Ok(FileEntry {
        file: path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        bytes,
        blake3,
    })
}

/// Names a local GGUF as a manifest source: its file name, size and SHA-256.
pub fn source_of(path: &Path) -> Result<SourceFile, ShardError> {
    use sha2::Digest;
    let mut file = std::fs::File::open(path).map_err(io(path))?;
    let mut hasher = sha2::Sha256::new();
    let bytes = std::io::copy(&mut file, &mut hasher).map_err(io(path))?;
    Ok(SourceFile {
        file: path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        bytes,
        sha256: hex::encode(hasher.finalize()),
    })
}

/// A GGUF on disk to split: one file, or every part of a multi-part GGUF (named
/// by its first part, the others found beside it), as one virtual file.
pub struct LocalSource {
    /// The files, in order.
    pub paths: Vec<PathBuf>,
    /// The (merged) header's bytes.
    pub header: Vec<u8>,
    /// The header parsed, with spans.
    pub gguf: Gguf,
    /// Where the virtual file's bytes are.
    pub map: parts::SourceMap,
}

impl LocalSource {
    /// Opens `path`; a first part brings its siblings.
    pub fn open(path: &Path) -> Result<LocalSource, ShardError> {
        let g = Gguf::read(path)?;
        if parts::split_count(&g) <= 1 {
            let len = std::fs::metadata(path).map_err(io(path))?.len();
            return Ok(LocalSource {
                paths: vec![path.to_path_buf()],
                header: read_prefix(path, g.data_offset)?,
                map: parts::SourceMap::whole(len),
                gguf: g,
            });
        }
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        let names = parts::part_names(name).ok_or_else(|| {
            ShardError::Invalid(format!(
                "{name} is one part of a multi-part GGUF: import its first part \
                 (…-00001-of-…)"
            ))
        })?;
        let dir = path.parent().unwrap_or(Path::new("."));
        let paths: Vec<PathBuf> = names.iter().map(|n| dir.join(n)).collect();
        let heads = paths
            .iter()
            .map(|p| Gguf::read(p))
            .collect::<Result<Vec<_>, _>>()?;
        let (header, gguf, map) = parts::merge(&heads)?;
        Ok(LocalSource {
            paths,
            header,
            gguf,
            map,
        })
    }

    /// Each file named by its name, size and SHA-256 (read in full).
    pub fn identify(&self) -> Result<Vec<SourceFile>, ShardError> {
        self.paths.iter().map(|p| source_of(p)).collect()
    }
}

/// Splits the GGUF at `source` (a whole file, or the first part of a multi-part
/// GGUF) into `shards` layer shards under `<models_dir>/<model_id>/`.
/// `progress(done, total)` is called per file written.
pub fn import(
    source: &Path,
    models_dir: &Path,
    model_id: &str,
    shards: u32,
    mut progress: impl FnMut(u32, u32),
) -> Result<Manifest, ShardError> {
    let source = LocalSource::open(source)?;
    let plan = plan::plan(&source.gguf, shards)?;
    let final_dir = ModelDir::new(models_dir, model_id)?;
    let final_dir = final_dir.path();
    if final_dir.exists() {
        return Err(ShardError::Exists(model_id.to_string()));
    }
    // Build in a sibling temp dir and rename at the end: a crash or error never
    // leaves a half-imported model that looks complete.
    let work = models_dir.join(format!(".{model_id}.importing-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).map_err(io(&work))?;
    let result = write_shards(&plan, &source, &work, model_id, &mut progress);
    match result {
        Ok(manifest) => {
            std::fs::rename(&work, final_dir).map_err(io(final_dir))?;
            Ok(manifest)
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&work);
            Err(e)
        }
    }
}

/// Reads the first `len` bytes of a file (a GGUF's header).
pub fn read_prefix(path: &Path, len: u64) -> Result<Vec<u8>, ShardError> {
    use std::io::Read;
    if len > manifest::MAX_HEADER_BYTES {
        return Err(ShardError::Invalid(format!("a GGUF header of {len} bytes")));
    }
    let mut head = vec![0u8; len as usize];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut head))
        .map_err(io(path))?;
    Ok(head)
}

fn write_shards(
    plan: &ModelPlan,
    source: &LocalSource,
    dir: &Path,
    model_id: &str,
    progress: &mut impl FnMut(u32, u32),
) -> Result<Manifest, ShardError> {
    let total = plan.shards.len() as u32 + 1;
    let dir = ModelDir::existing(dir.to_path_buf());
    // The header: every byte before the tensor data (of the merged file for a
    // multi-part source).
    let header_path = dir.header();
    std::fs::write(&header_path, &source.header).map_err(io(&header_path))?;
    progress(1, total);
    let manifest = plan.manifest(model_id, source.identify()?, &source.header)?;
    for s in &plan.shards {
        let path = dir.path().join(shard_file_name(s.index));
        s.write_from(&source.paths, &source.map, &path)?;
        let (hash, bytes) = hashes::blake3_of(&path).map_err(io(&path))?;
        if bytes != s.bytes {
            return Err(ShardError::Invalid(format!(
                "shard {} is {bytes} bytes, planned {}",
                s.index, s.bytes
            )));
        }
        ShardHashes::record(&dir, plan.shards.len() as u32, s.index, Some(&hash))
            .map_err(io(&path))?;
        progress(s.index + 2, total);
    }
    let text =
        serde_json::to_vec_pretty(&manifest).map_err(|e| ShardError::Invalid(e.to_string()))?;
    let path = dir.manifest();
    crate::fsutil::write_atomic(&path, &text).map_err(io(&path))?;
    Ok(manifest)
}

/// Reads and validates `<dir>/manifest.json`; the manifest's model id must be the
/// directory's name.
pub fn read_manifest(dir: &Path) -> Result<Manifest, ShardError> {
    let path = ModelDir::existing(dir.to_path_buf()).manifest();
    let unreadable = |message: String| ShardError::Manifest {
        path: path.clone(),
        message,
    };
    let len = std::fs::metadata(&path)
        .map_err(|e| unreadable(e.to_string()))?
        .len();
    if len > manifest::MAX_MANIFEST_BYTES {
        return Err(unreadable(format!("{len} bytes is too large")));
    }
    let text = std::fs::read(&path).map_err(|e| unreadable(e.to_string()))?;
    let m = Manifest::from_json(&text)?;
    if dir.file_name().and_then(|n| n.to_str()) != Some(m.model_id.as_str()) {
        return Err(unreadable(format!(
            "it is for model {:?}, not for the directory it is in",
            m.model_id
        )));
    }
    Ok(m)
}

/// Reads a model's `gguf_header.bin` and checks it against the manifest's size and
/// BLAKE3; returns it with the split plan it implies.
pub fn read_plan(dir: &ModelDir, manifest: &Manifest) -> Result<(Vec<u8>, ModelPlan), ShardError> {
    let path = dir.header();
    let header = read_prefix(&path, manifest.header.bytes)?;
    if std::fs::metadata(&path).map_err(io(&path))?.len() != manifest.header.bytes
        || blake3::hash(&header).to_hex().as_str() != manifest.header.blake3
    {
        return Err(ShardError::Invalid(format!(
            "{} does not match the manifest",
            path.display()
        )));
    }
    let plan = plan::plan_of(&header, manifest)?;
    Ok((header, plan))
}

/// Checks a shard file against its plan: its size, and its header byte for byte
/// (tensor names, shapes, types and offsets). Returns its BLAKE3.
pub fn check_shard_file(path: &Path, plan: &ShardPlan) -> Result<String, String> {
    let len = std::fs::metadata(path).map_err(|e| e.to_string())?.len();
    if len != plan.bytes {
        return Err(format!("it is {len} bytes, not {}", plan.bytes));
    }
    let head = read_prefix(path, plan.header.len() as u64).map_err(|e| e.to_string())?;
    if head != plan.header {
        return Err("its header differs from the one the manifest implies".into());
    }
    hashes::blake3_cached(path).map_err(|e| e.to_string())
}

/// One shard file against its plan and the BLAKE3 recorded for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShardCheck {
    /// It fits its plan and matches its recorded BLAKE3 (given).
    Intact(String),
    /// It fits its plan; no BLAKE3 was recorded for it (its own is given).
    Unrecorded(String),
    /// Missing, the wrong size or header, or another BLAKE3 than recorded.
    Damaged(String),
}

impl ShardCheck {
    /// Its BLAKE3 when the file fits.
    pub fn hash(&self) -> Result<&str, &str> {
        match self {
            ShardCheck::Intact(h) | ShardCheck::Unrecorded(h) => Ok(h),
            ShardCheck::Damaged(why) => Err(why),
        }
    }
}

/// Checks the file of shard `s` against `plan` (size, header byte for byte) and
/// the hash `recorded` for it. Callers that check several shards read the plan
/// and the record once.
pub fn check_shard(
    dir: &ModelDir,
    plan: &ModelPlan,
    recorded: &ShardHashes,
    s: &ShardEntry,
) -> ShardCheck {
    let Some(p) = plan.shard(s.index) else {
        return ShardCheck::Damaged(format!("the plan has no shard {}", s.index));
    };
    match (check_shard_file(&dir.shard(s), p), recorded.get(s.index)) {
        (Err(why), _) => ShardCheck::Damaged(why),
        (Ok(hash), None) => ShardCheck::Unrecorded(hash),
        (Ok(hash), Some(r)) if r == hash => ShardCheck::Intact(hash),
        (Ok(_), Some(_)) => ShardCheck::Damaged("it does not match its recorded BLAKE3".into()),
    }
}

/// Checks the file of shard `index` against the plan and the recorded hash.
/// Returns its BLAKE3.
pub fn verify_shard(dir: &ModelDir, manifest: &Manifest, index: u32) -> Result<String, String> {
    let (_, plan) = read_plan(dir, manifest).map_err(|e| e.to_string())?;
    let s = manifest
        .shard(index)
        .ok_or_else(|| format!("the model has no shard {index}"))?;
    let recorded = ShardHashes::load(dir, manifest.shard_count());
    check_shard(dir, &plan, &recorded, s)
        .hash()
        .map(str::to_string)
        .map_err(str::to_string)
}

/// Indices of shards whose file is missing, does not fit the plan, or does not
/// match its recorded BLAKE3.
pub fn verify(dir: &Path, manifest: &Manifest) -> Vec<u32> {
    let dir = ModelDir::existing(dir.to_path_buf());
    let Ok((_, plan)) = read_plan(&dir, manifest) else {
        return manifest.shards.iter().map(|s| s.index).collect();
    };
    let recorded = ShardHashes::load(&dir, manifest.shard_count());
    manifest
        .shards
        .iter()
        .filter(|s| check_shard(&dir, &plan, &recorded, s).hash().is_err())
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
    manifest.validate()?;
    let run: Vec<&ShardEntry> = manifest
        .shards
        .iter()
        .filter(|s| (first..=last).contains(&s.index))
        .collect();
    if first > last || run.len() != (last - first + 1) as usize {
        return Err(ShardError::Invalid(format!(
            "shards {first}..={last} are not a run of this {}-shard model",
            manifest.shards.len()
        )));
    }
    let dir = ModelDir::existing(dir.to_path_buf());
    let paths: Vec<PathBuf> = run.iter().map(|s| dir.shard(s)).collect();
    let ggufs = paths
        .iter()
        .map(|p| Gguf::read(p))
        .collect::<Result<Vec<_>, _>>()?;
    let (Some(head_shard), Some(tail_shard)) = (run.first(), run.last()) else {
        return Err(ShardError::Invalid("an empty run of shards".into()));
    };
    let layer_start = head_shard.layer_start;
    let layer_end = tail_shard.layer_end;
    let layers = layer_end - layer_start;
    let with_head = last + 1 == manifest.shard_count();
    // A tied head *is* the token embedding, so the last shard keeps it.
    let with_embedding = first == 0 || (with_head && manifest.tied_embeddings);

    let mut tensors = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for ((g, path), s) in ggufs.iter().zip(&paths).zip(&run) {
        for t in &g.tensors {
            let name = match t.layer_and_rest() {
                // A shard holds only its own layers: a file that says otherwise
                // (from a peer whose manifest hashes it) is refused, not renumbered
                // into another range.
                Some((l, _)) if !(s.layer_start..s.layer_end).contains(&l) => {
                    return Err(ShardError::Invalid(format!(
                        "shard {} holds tensor {} outside its layers {}..{}",
                        s.index, t.name, s.layer_start, s.layer_end
                    )));
                }
                Some((l, rest)) => format!("blk.{}.{rest}", l - layer_start),
                None if plan::is_embedding(&t.name) && !with_embedding => continue,
                None => t.name.clone(),
            };
            // Shared tensors appear in every shard: keep one copy.
            if seen.insert(name.clone()) {
                tensors.push(TensorSource::from_file(name, t, path, g.data_offset));
            }
        }
    }
    let Some(first_gguf) = ggufs.first() else {
        return Err(ShardError::Invalid("an empty run of shards".into()));
    };
    let mut kv = first_gguf.kv.clone();
    kv.retain(|(k, _)| !k.starts_with("swarmllm.shard."));
    let arch = &manifest.architecture;
    let n_embd = kv
        .iter()
        .find(|(k, _)| *k == format!("{arch}.embedding_length"))
        .and_then(|(_, v)| v.as_u64())
        .filter(|&n| (1..=manifest::MAX_EMBEDDING).contains(&n))
        .ok_or_else(|| {
            ShardError::Invalid(format!(
                "no {arch}.embedding_length within 1..={}",
                manifest::MAX_EMBEDDING
            ))
        })?;
    let info_of = |tensors: &[TensorSource<'_>], name: &str| {
        tensors
            .iter()
            .find(|t| t.name == name)
            .map(|t| t.info.as_ref().clone())
    };
    if !with_embedding {
        match info_of(&tensors, "output.weight") {
            // An untied head ends this run: the vocabulary stays whole, and the
            // embedding llama.cpp insists on (never read: the run is fed hidden
            // states) is zeros of the head's shape, a hole in the file.
            Some(head) => tensors.push(TensorSource::zeros("token_embd.weight", head)),
            // Fed hidden states, never tokens: a 1-row placeholder and a one-token
            // vocabulary.
            None => {
                tensors.push(TensorSource::f32(
                    "token_embd.weight",
                    vec![n_embd, 1],
                    &vec![0.0; n_embd as usize],
                ));
                kv.retain(|(k, _)| !k.starts_with("tokenizer."));
                kv.push(("tokenizer.ggml.model".into(), Value::Str("none".into())));
                arch::set_u32(&mut kv, &format!("{arch}.vocab_size"), 1);
            }
        }
    }
    if !with_head {
        if !seen.contains("output_norm.weight") {
            tensors.push(TensorSource::f32(
                "output_norm.weight",
                vec![n_embd],
                &vec![1.0; n_embd as usize],
            ));
        }
        // Architectures that require an untied head (olmo2, gpt-oss) get one whose
        // result is never read: zeros of the embedding's shape, a hole in the file.
        if !manifest.tied_embeddings
            && let Some(embd) = info_of(&tensors, "token_embd.weight")
        {
            tensors.push(TensorSource::zeros("output.weight", embd));
        }
    }
    arch::range_kv(
        &mut kv,
        arch,
        manifest.n_layers,
        layer_start,
        layers,
        first == 0,
    );
    gguf::write(out, &kv, first_gguf.alignment, &tensors)?;
    Ok(())
}

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
