//! `manifest.json` and the model directory it describes: the one validation every
//! manifest passes before any use (from a peer, from disk, from an import), and the
//! one place paths inside a model directory are made ([`ModelDir`]).
//!
//! A manifest names files that a node will create, hash, serve and delete, so a
//! peer that could choose a file name could make a node overwrite or delete any
//! file it can reach. Hence: shard files have one fixed name per index
//! (`shard-NNN.gguf`), the header one fixed name, and every path is built by
//! [`ModelDir::file`] from a plain file name.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Manifest format tag.
///
/// Version 2: the manifest follows from the source's header and the shard count
/// alone (no hash of a shard's tensor bytes), so a node that fetched only some
/// shards' byte ranges writes the same manifest as one that split the whole file;
/// the source is named by its SHA-256, the id the Hugging Face Hub gives it.
pub const FORMAT: &str = "swarmllm-shards/2";
/// The manifest's file name.
pub const MANIFEST_FILE: &str = "manifest.json";
/// The header file's name.
pub const HEADER_FILE: &str = "gguf_header.bin";
/// The file recording the BLAKE3 of each shard file this node holds.
pub const HASHES_FILE: &str = "shard_hashes.json";

/// Most transformer layers a model may declare (the largest published models
/// have under 200).
pub const MAX_LAYERS: u32 = 1024;
/// Most tensors one shard may hold.
pub const MAX_TENSORS: usize = 1 << 16;
/// Largest shard or source file (1 TiB).
pub const MAX_FILE_BYTES: u64 = 1 << 40;
/// Largest header file (the tokenizer of a big vocabulary is a few MiB; the peer
/// transfer reads at most this much).
pub const MAX_HEADER_BYTES: u64 = 256 << 20;
/// Largest manifest file.
pub const MAX_MANIFEST_BYTES: u64 = 4 << 20;
/// Largest embedding length a header may declare (published models use up to
/// 16 Ki); placeholder tensors are allocated from it.
pub const MAX_EMBEDDING: u64 = 1 << 17;
/// Longest file name a manifest may carry.
const MAX_NAME: usize = 255;

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

/// The GGUF a model was split from.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SourceFile {
    /// Its file name (on the Hub, its path in the repository).
    pub file: String,
    /// Size in bytes.
    pub bytes: u64,
    /// SHA-256 of the whole file, hex (the Hub's LFS object id).
    pub sha256: String,
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
    /// File name (`shard-NNN.gguf`).
    pub file: String,
    /// File size.
    pub bytes: u64,
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
    /// The GGUF it was made from (the first part of a multi-part GGUF).
    pub source: SourceFile,
    /// Every part of a multi-part GGUF, in order (empty for a whole file).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub source_parts: Vec<SourceFile>,
    /// The header file.
    pub header: FileEntry,
    /// The shards, in layer order.
    pub shards: Vec<ShardEntry>,
}

/// A manifest broke a rule: which one ([`ManifestError::rule`], a stable code the
/// API returns) and what exactly.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid manifest ({rule}): {message}")]
pub struct ManifestError {
    /// `format`, `model_id`, `architecture`, `file_name`, `hash`, `size`,
    /// `layers`, `shard_index`, `layer_ranges`, `shard_roles`, `json`, and for a
    /// peer's header that does not fit its manifest, `header`.
    pub rule: &'static str,
    /// What is wrong.
    pub message: String,
}

fn broke(rule: &'static str, message: impl Into<String>) -> ManifestError {
    ManifestError {
        rule,
        message: message.into(),
    }
}

/// The file name of shard `index` (the only name a shard file may have).
pub fn shard_file_name(index: u32) -> String {
    format!("shard-{index:03}.gguf")
}

/// Model ids are directory names: 1–128 characters, no path separators, no
/// leading dot (so never `.` or `..`), no control characters and none of the
/// characters Windows forbids in file names.
pub fn is_model_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && !id.starts_with('.')
        && !id.chars().any(|c| {
            c.is_control() || matches!(c, '/' | '\\' | ':' | '*' | '?' | '"' | '<' | '>' | '|')
        })
}

/// Whether `name` is one plain file name: not empty, not `.`/`..`, no separator
/// of any platform, no drive prefix (`C:`), no control characters.
pub fn is_plain_file_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME
        && name != "."
        && name != ".."
        && !name
            .chars()
            .any(|c| c.is_control() || matches!(c, '/' | '\\' | ':'))
}

/// 64 lowercase hex characters (a BLAKE3 or SHA-256 digest).
pub fn is_digest_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

impl SourceFile {
    fn check(&self) -> Result<(), ManifestError> {
        // The source keeps its Hub path's last part only: it names, never opens.
        if !is_plain_file_name(&self.file) {
            return Err(broke(
                "file_name",
                format!("source file {:?} is not a plain file name", self.file),
            ));
        }
        if !is_digest_hex(&self.sha256) {
            return Err(broke(
                "hash",
                "source SHA-256 is not 64 lowercase hex characters",
            ));
        }
        if self.bytes == 0 || self.bytes > MAX_FILE_BYTES {
            return Err(broke(
                "size",
                format!(
                    "source size {} is not within 1..={MAX_FILE_BYTES}",
                    self.bytes
                ),
            ));
        }
        Ok(())
    }
}

impl FileEntry {
    fn check(&self, what: &str, max_bytes: u64) -> Result<(), ManifestError> {
        if !is_plain_file_name(&self.file) {
            return Err(broke(
                "file_name",
                format!("{what} file {:?} is not a plain file name", self.file),
            ));
        }
        if !is_digest_hex(&self.blake3) {
            return Err(broke(
                "hash",
                format!("{what} BLAKE3 is not 64 lowercase hex characters"),
            ));
        }
        if self.bytes == 0 || self.bytes > max_bytes {
            return Err(broke(
                "size",
                format!("{what} size {} is not within 1..={max_bytes}", self.bytes),
            ));
        }
        Ok(())
    }
}

impl Manifest {
    /// Parses and validates manifest bytes (from a peer or a file).
    pub fn from_json(bytes: &[u8]) -> Result<Manifest, ManifestError> {
        if bytes.len() as u64 > MAX_MANIFEST_BYTES {
            return Err(broke(
                "size",
                format!("a manifest of {} bytes", bytes.len()),
            ));
        }
        let m: Manifest =
            serde_json::from_slice(bytes).map_err(|e| broke("json", e.to_string()))?;
        m.validate()?;
        Ok(m)
    }

    /// Checks every rule a usable manifest keeps: the format tag; a usable model
    /// id and architecture name; fixed file names (`gguf_header.bin`,
    /// `shard-NNN.gguf`); hashes and sizes within bounds; 1..=[`MAX_LAYERS`]
    /// layers; each shard's `index` equal to its position; layer ranges that are
    /// non-empty, contiguous and cover `0..n_layers`; the embedding in the first
    /// shard and the head in the last.
    pub fn validate(&self) -> Result<(), ManifestError> {
        if self.format != FORMAT {
            return Err(broke(
                "format",
                format!("format {:?}, expected {FORMAT:?}", self.format),
            ));
        }
        if !is_model_id(&self.model_id) {
            return Err(broke(
                "model_id",
                format!("{:?} is not a usable model id", self.model_id),
            ));
        }
        if self.architecture.is_empty()
            || self.architecture.len() > 64
            || !self
                .architecture
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
        {
            return Err(broke(
                "architecture",
                format!("{:?} is not an architecture name", self.architecture),
            ));
        }
        if self.n_layers == 0 || self.n_layers > MAX_LAYERS {
            return Err(broke(
                "layers",
                format!("n_layers {} is not within 1..={MAX_LAYERS}", self.n_layers),
            ));
        }
        self.source.check()?;
        if !self.source_parts.is_empty() {
            let max = super::parts::MAX_PARTS as usize;
            if !(2..=max).contains(&self.source_parts.len()) {
                return Err(broke(
                    "size",
                    format!("{} source parts (2 to {max})", self.source_parts.len()),
                ));
            }
            for p in &self.source_parts {
                p.check()?;
            }
            if self.source_parts.first() != Some(&self.source) {
                return Err(broke(
                    "file_name",
                    "the source must be the first of its parts",
                ));
            }
        }
        self.header.check("header", MAX_HEADER_BYTES)?;
        if self.header.file != HEADER_FILE {
            return Err(broke(
                "file_name",
                format!("the header file must be named {HEADER_FILE}"),
            ));
        }
        if self.shards.is_empty() || self.shards.len() > self.n_layers as usize {
            return Err(broke(
                "shard_index",
                format!(
                    "{} shards for {} layers (1 to one per layer)",
                    self.shards.len(),
                    self.n_layers
                ),
            ));
        }
        let last = self.shards.len() - 1;
        let mut next_layer = 0u32;
        for (position, s) in self.shards.iter().enumerate() {
            if s.index as usize != position {
                return Err(broke(
                    "shard_index",
                    format!("shard at position {position} says index {}", s.index),
                ));
            }
            if s.file != shard_file_name(s.index) {
                return Err(broke(
                    "file_name",
                    format!(
                        "shard {position} file {:?} must be named {}",
                        s.file,
                        shard_file_name(s.index)
                    ),
                ));
            }
            if s.bytes == 0 || s.bytes > MAX_FILE_BYTES {
                return Err(broke(
                    "size",
                    format!(
                        "shard {position} size {} is not within 1..={MAX_FILE_BYTES}",
                        s.bytes
                    ),
                ));
            }
            if s.layer_start != next_layer || s.layer_end <= s.layer_start {
                return Err(broke(
                    "layer_ranges",
                    format!(
                        "shard {position} covers {}..{}; expected a non-empty range from {next_layer}",
                        s.layer_start, s.layer_end
                    ),
                ));
            }
            next_layer = s.layer_end;
            if s.tensors == 0 || s.tensors > MAX_TENSORS {
                return Err(broke(
                    "size",
                    format!("shard {position} has {} tensors", s.tensors),
                ));
            }
            if (position == 0 && !s.has_embedding) || s.has_head != (position == last) {
                return Err(broke(
                    "shard_roles",
                    format!(
                        "shard {position}: the first shard holds the embedding and only the last the head"
                    ),
                ));
            }
        }
        if next_layer != self.n_layers {
            return Err(broke(
                "layer_ranges",
                format!(
                    "the shards cover layers 0..{next_layer} of {}",
                    self.n_layers
                ),
            ));
        }
        Ok(())
    }

    /// The shard with `index`, if the model has one (found by its index, never by
    /// using a number as a position).
    pub fn shard(&self, index: u32) -> Option<&ShardEntry> {
        self.shards.iter().find(|s| s.index == index)
    }

    /// The shard count as a `u32` (validated manifests have at most
    /// [`MAX_LAYERS`] shards).
    pub fn shard_count(&self) -> u32 {
        u32::try_from(self.shards.len()).unwrap_or(u32::MAX)
    }

    /// BLAKE3 of the manifest's canonical JSON: what a node pins for a model id
    /// and announces, so holders that serve different manifests under one id are
    /// told apart.
    pub fn hash(&self) -> String {
        let bytes = serde_json::to_vec(self).unwrap_or_default();
        blake3::hash(&bytes).to_hex().to_string()
    }
}

/// A model's directory under the models folder. Every path inside it is made by
/// [`ModelDir::file`], which takes only a plain file name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelDir {
    dir: PathBuf,
}

impl ModelDir {
    /// `<models_dir>/<model_id>`, if `model_id` is a usable id.
    pub fn new(models_dir: &Path, model_id: &str) -> Result<ModelDir, ManifestError> {
        if !is_model_id(model_id) {
            return Err(broke(
                "model_id",
                format!("{model_id:?} is not a usable model id"),
            ));
        }
        Ok(ModelDir {
            dir: models_dir.join(model_id),
        })
    }

    /// A directory found on disk (its own name is the model id).
    pub(crate) fn existing(dir: PathBuf) -> ModelDir {
        ModelDir { dir }
    }

    /// The directory itself.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// The one way to a file inside the directory: `name` must be a plain file
    /// name (see [`is_plain_file_name`]).
    pub fn file(&self, name: &str) -> Result<PathBuf, ManifestError> {
        if !is_plain_file_name(name) {
            return Err(broke(
                "file_name",
                format!("{name:?} is not a plain file name"),
            ));
        }
        Ok(self.dir.join(name))
    }

    /// `manifest.json`.
    pub fn manifest(&self) -> PathBuf {
        self.dir.join(MANIFEST_FILE)
    }

    /// `gguf_header.bin`.
    pub fn header(&self) -> PathBuf {
        self.dir.join(HEADER_FILE)
    }

    /// The file of shard `s` (`shard-NNN.gguf`, from its index alone).
    pub fn shard(&self, s: &ShardEntry) -> PathBuf {
        self.dir.join(shard_file_name(s.index))
    }

    /// `shard_hashes.json`.
    pub fn hashes(&self) -> PathBuf {
        self.dir.join(HASHES_FILE)
    }

    /// Where shard `s` is downloaded to before it is verified.
    pub fn part(&self, s: &ShardEntry) -> PathBuf {
        self.dir.join(format!("{}.part", shard_file_name(s.index)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(file: &str) -> FileEntry {
        FileEntry {
            file: file.into(),
            bytes: 10,
            blake3: "ab".repeat(32),
        }
    }

    fn good() -> Manifest {
        let shards = [(0, 10), (10, 20), (20, 30)]
            .iter()
            .enumerate()
            .map(|(i, &(a, b))| ShardEntry {
                index: i as u32,
                layer_start: a,
                layer_end: b,
                file: shard_file_name(i as u32),
                bytes: 10,
                tensors: 5,
                has_embedding: i == 0,
                has_head: i == 2,
            })
            .collect();
        Manifest {
            format: FORMAT.into(),
            model_id: "m".into(),
            architecture: "llama".into(),
            n_layers: 30,
            tied_embeddings: true,
            source: SourceFile {
                file: "model.gguf".into(),
                bytes: 100,
                sha256: "cd".repeat(32),
            },
            source_parts: Vec::new(),
            header: entry(HEADER_FILE),
            shards,
        }
    }

    fn rule_of(m: &Manifest) -> &'static str {
        m.validate().expect_err("should be refused").rule
    }

    #[test]
    fn a_well_formed_manifest_passes_and_round_trips() {
        let m = good();
        m.validate().expect("valid");
        let bytes = serde_json::to_vec(&m).expect("json");
        assert_eq!(Manifest::from_json(&bytes).expect("parses"), m);
    }

    #[test]
    fn traversal_and_absolute_file_names_are_refused() {
        for name in [
            "../../victim.txt",
            "/etc/passwd",
            "C:\\Windows\\win.ini",
            "C:victim",
            "..",
            "sub/shard-001.gguf",
            "",
        ] {
            let mut m = good();
            m.shards[1].file = name.into();
            assert_eq!(rule_of(&m), "file_name", "{name}");
            let mut m = good();
            m.source.file = name.into();
            assert_eq!(rule_of(&m), "file_name", "source {name}");
        }
        // A plain name that is not the shard's own is refused too.
        let mut m = good();
        m.shards[1].file = "node.db".into();
        assert_eq!(rule_of(&m), "file_name");
        let mut m = good();
        m.header.file = "manifest.json".into();
        assert_eq!(rule_of(&m), "file_name");
    }

    #[test]
    fn indices_ranges_and_bounds_are_checked() {
        let mut m = good();
        m.shards[2].index = 7;
        assert_eq!(rule_of(&m), "shard_index");
        let mut m = good();
        m.shards[1].layer_start = 11;
        assert_eq!(rule_of(&m), "layer_ranges");
        let mut m = good();
        m.shards[2].layer_end = 29;
        assert_eq!(rule_of(&m), "layer_ranges");
        let mut m = good();
        m.n_layers = u32::MAX;
        assert_eq!(rule_of(&m), "layers");
        let mut m = good();
        m.shards[0].bytes = u64::MAX;
        assert_eq!(rule_of(&m), "size");
        let mut m = good();
        m.header.blake3 = "zz".into();
        assert_eq!(rule_of(&m), "hash");
        let mut m = good();
        m.source.sha256 = "AB".repeat(32);
        assert_eq!(rule_of(&m), "hash");
        let mut m = good();
        m.model_id = "../x".into();
        assert_eq!(rule_of(&m), "model_id");
        let mut m = good();
        m.shards[1].has_head = true;
        assert_eq!(rule_of(&m), "shard_roles");
        let mut m = good();
        m.shards.clear();
        assert_eq!(rule_of(&m), "shard_index");
        assert_eq!(
            Manifest::from_json(b"{").expect_err("not json").rule,
            "json"
        );
    }

    #[test]
    fn paths_stay_inside_the_model_directory() {
        let dir = ModelDir::new(Path::new("/data/models"), "m").expect("id");
        assert_eq!(
            dir.file("shard-000.gguf").expect("plain"),
            Path::new("/data/models/m/shard-000.gguf")
        );
        assert!(dir.file("../x").is_err());
        assert!(dir.file("/x").is_err());
        assert!(ModelDir::new(Path::new("/data/models"), "..").is_err());
        assert!(ModelDir::new(Path::new("/data/models"), "a/b").is_err());
        let m = good();
        assert_eq!(
            dir.shard(&m.shards[1]),
            Path::new("/data/models/m/shard-001.gguf")
        );
    }
}
