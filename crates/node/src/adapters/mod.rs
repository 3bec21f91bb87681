//! LoRA adapters: small weight deltas a request can put on the model this node
//! serves (`"model": "base+adapter"` or an `adapter` field), applied by
//! llama.cpp at inference time.
//!
//! An adapter is registered from a file under `<data_dir>/adapters/` (paths
//! are relative to it; an absolute path must still lie inside it, so a request
//! can never make the node read a file elsewhere). Two formats are taken:
//! llama.cpp's GGUF adapters (checked, used as they are) and PEFT
//! safetensors, converted to GGUF on registration ([`peft`]) next to the
//! other converted files in `<data_dir>/adapters/.converted/`. The registry
//! lives in SQLite (`adapters`); deleting an entry leaves the user's file.

use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};
use std::sync::RwLock;

use rusqlite::params;
use serde::{Deserialize, Serialize};

use crate::shard::gguf::{Gguf, GgufError};
use crate::store::{Store, StoreError, now_unix};

pub mod peft;

/// Adapters a node keeps registered.
pub const MAX_ADAPTERS: usize = 256;
/// Longest id and name, in characters.
pub const MAX_ID_CHARS: usize = 64;
/// Largest adapter file accepted (adapters are deltas: megabytes, not
/// gigabytes).
pub const MAX_FILE_BYTES: u64 = 4 << 30;
/// The folder, under the adapters folder, that holds converted files.
const CONVERTED: &str = ".converted";

/// A registered adapter.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Adapter {
    /// What requests name it by.
    pub id: String,
    /// What the user called it.
    pub name: String,
    /// The model it was trained for (as the user said; empty: unstated).
    pub base_model: String,
    /// LoRA rank (from the file).
    pub rank: u32,
    /// LoRA alpha: the delta is scaled by alpha / rank.
    pub alpha: f32,
    /// The registered file, relative to the adapters folder.
    pub path: String,
    /// `gguf` or `peft`.
    pub format: String,
    /// The GGUF llama.cpp loads (the registered file, or its conversion).
    #[serde(skip)]
    pub file: PathBuf,
    /// BLAKE3 of that GGUF: the engine keys loaded adapters by it, so a file
    /// replaced under the same name is loaded afresh.
    #[serde(skip)]
    pub digest: String,
    /// Unix seconds.
    pub created_at: i64,
}

/// What `POST /api/admin/adapters` asks for.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Registration {
    /// Id (default: a new UUID).
    pub id: Option<String>,
    /// Display name (default: the id).
    pub name: Option<String>,
    /// The model it is for.
    pub base_model: Option<String>,
    /// LoRA rank; checked against the file when given.
    pub rank: Option<u32>,
    /// LoRA alpha; a PEFT file's own (`adapter_config.json`) or the rank
    /// when not given; a GGUF file's own when not given.
    pub alpha: Option<f32>,
    /// The file: relative to `<data_dir>/adapters/` (or absolute inside it).
    pub path: String,
}

/// The base model a PEFT adapter is converted for: its GGUF header.
#[derive(Debug, Clone)]
pub struct BaseModel {
    /// Its id.
    pub id: String,
    /// Its header.
    pub header: Gguf,
}

/// Registering or removing an adapter failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AdapterError {
    /// The id or name is empty, too long or has odd characters.
    #[error("{0}")]
    BadField(&'static str, String),
    /// The path leaves the adapters folder, or names no file.
    #[error("path: {0}")]
    BadPath(String),
    /// The file is not an adapter this node can use.
    #[error("{0}")]
    BadFile(String),
    /// A PEFT adapter needs its base model loaded to be converted.
    #[error("{0}")]
    NeedsBase(String),
    /// The id is taken.
    #[error("an adapter with id '{0}' already exists")]
    Exists(String),
    /// [`MAX_ADAPTERS`] are registered.
    #[error("this node already has {MAX_ADAPTERS} adapters; remove one first")]
    TooMany,
    /// No adapter has that id.
    #[error("Adapter '{0}' not found")]
    NotFound(String),
    /// Reading or writing a file failed.
    #[error("adapter file: {0}")]
    Io(#[from] std::io::Error),
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<GgufError> for AdapterError {
    fn from(e: GgufError) -> Self {
        AdapterError::BadFile(e.to_string())
    }
}

/// Whether `s` is a usable id: letters, digits, `-`, `_`, `.`, not starting
/// with a dot (it names a converted file and appears after `+` in a model).
fn valid_id(s: &str) -> bool {
    !s.is_empty()
        && s.chars().count() <= MAX_ID_CHARS
        && !s.starts_with('.')
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// Resolves `path` inside `root` (the adapters folder): relative paths are
/// taken from `root` (an `adapters/` prefix, as the spec's example has, is
/// allowed); no `..`; and the real file, symlinks followed, must lie inside
/// `root`.
pub fn resolve(root: &Path, path: &str) -> Result<PathBuf, AdapterError> {
    if path.is_empty() || path.len() > 1024 || path.contains('\0') {
        return Err(AdapterError::BadPath("must be a file name".into()));
    }
    let given = Path::new(path);
    if given.components().any(|c| c == Component::ParentDir) {
        return Err(AdapterError::BadPath(
            "must not contain '..' (paths stay inside the adapters folder)".into(),
        ));
    }
    let candidate = if given.is_absolute() {
        given.to_path_buf()
    } else {
        let rel = given.strip_prefix("adapters").unwrap_or(given);
        root.join(rel)
    };
    let root = root.canonicalize()?;
    let real = candidate
        .canonicalize()
        .map_err(|_| AdapterError::BadPath(format!("no file '{path}' in {}", root.display())))?;
    if !real.starts_with(&root) || real.starts_with(root.join(CONVERTED)) {
        return Err(AdapterError::BadPath(format!(
            "must be inside {}",
            root.display()
        )));
    }
    let meta = real.metadata()?;
    if !meta.is_file() {
        return Err(AdapterError::BadPath(format!("'{path}' is not a file")));
    }
    if meta.len() > MAX_FILE_BYTES {
        return Err(AdapterError::BadFile(format!(
            "'{path}' is larger than {} GiB",
            MAX_FILE_BYTES >> 30
        )));
    }
    Ok(real)
}

/// What a GGUF adapter's header says: architecture, rank, alpha.
pub fn inspect_gguf(header: &Gguf) -> Result<(String, u32, f32), AdapterError> {
    let str_of = |k: &str| header.get(k).and_then(|v| v.as_str()).unwrap_or("");
    if str_of("general.type") != "adapter" || str_of("adapter.type") != "lora" {
        return Err(AdapterError::BadFile(
            "a GGUF adapter must say general.type = adapter and adapter.type = lora".into(),
        ));
    }
    let arch = str_of("general.architecture").to_string();
    let alpha = header
        .get("adapter.lora.alpha")
        .and_then(|v| v.as_f64())
        .unwrap_or(0.0) as f32;
    // lora_a is [in, rank] in ggml's order.
    let rank = header
        .tensors
        .iter()
        .find(|t| t.name.ends_with(".lora_a"))
        .and_then(|t| t.dims.get(1).copied())
        .ok_or_else(|| AdapterError::BadFile("a GGUF adapter without lora_a tensors".into()))?;
    let rank = u32::try_from(rank)
        .ok()
        .filter(|r| (1..=65_536).contains(r))
        .ok_or_else(|| AdapterError::BadFile(format!("rank {rank}")))?;
    Ok((arch, rank, alpha))
}

/// The node's adapters.
#[derive(Debug)]
pub struct Adapters {
    store: Store,
    root: PathBuf,
    by_id: RwLock<HashMap<String, Adapter>>,
}

impl Adapters {
    /// Loads the registry (blocking); adapter files live under `root`.
    pub fn open(store: Store, root: PathBuf) -> Result<Self, StoreError> {
        // Made up front so a user finds where adapter files go; a failure
        // shows later, as a clear error on registration.
        let _ = std::fs::create_dir_all(&root);
        let rows = store.with_conn(|c| {
            let mut q = c.prepare(
                "SELECT id, name, base_model, rank, alpha, path, format, file, digest, created_at
                 FROM adapters",
            )?;
            let rows = q.query_map([], |r| {
                Ok(Adapter {
                    id: r.get(0)?,
                    name: r.get(1)?,
                    base_model: r.get(2)?,
                    rank: r.get(3)?,
                    alpha: r.get::<_, f64>(4)? as f32,
                    path: r.get(5)?,
                    format: r.get(6)?,
                    file: PathBuf::from(r.get::<_, String>(7)?),
                    digest: r.get(8)?,
                    created_at: r.get(9)?,
                })
            })?;
            rows.collect::<rusqlite::Result<Vec<_>>>()
        })?;
        Ok(Self {
            store,
            root,
            by_id: RwLock::new(rows.into_iter().map(|a| (a.id.clone(), a)).collect()),
        })
    }

    /// The adapters folder.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Every adapter, oldest first.
    pub fn list(&self) -> Vec<Adapter> {
        let map = self.by_id.read().unwrap_or_else(|p| p.into_inner());
        let mut all: Vec<Adapter> = map.values().cloned().collect();
        all.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        all
    }

    /// Adapter `id`.
    pub fn get(&self, id: &str) -> Option<Adapter> {
        let map = self.by_id.read().unwrap_or_else(|p| p.into_inner());
        map.get(id).cloned()
    }

    /// Registers an adapter (blocking: reads, maybe converts, and hashes the
    /// file). `base` is the model this node serves, needed to convert a PEFT
    /// file.
    pub fn register(
        &self,
        req: Registration,
        base: Option<&BaseModel>,
    ) -> Result<Adapter, AdapterError> {
        let id = match req.id {
            Some(id) => id,
            None => uuid::Uuid::new_v4().to_string(),
        };
        if !valid_id(&id) {
            return Err(AdapterError::BadField(
                "id",
                format!(
                    "id: 1–{MAX_ID_CHARS} letters, digits, '-', '_' or '.', not starting with '.'"
                ),
            ));
        }
        let name = req.name.unwrap_or_else(|| id.clone()).trim().to_string();
        let base_model = req.base_model.unwrap_or_default().trim().to_string();
        for (field, v) in [("name", &name), ("base_model", &base_model)] {
            if v.chars().count() > 256 || v.chars().any(char::is_control) {
                return Err(AdapterError::BadField(
                    field,
                    format!("{field}: at most 256 characters, no control characters"),
                ));
            }
        }
        if let Some(a) = req.alpha
            && !(a.is_finite() && a > 0.0 && a <= 1e6)
        {
            return Err(AdapterError::BadField(
                "alpha",
                "alpha: a positive number".into(),
            ));
        }
        if self.get(&id).is_some() {
            return Err(AdapterError::Exists(id));
        }
        if self.by_id.read().unwrap_or_else(|p| p.into_inner()).len() >= MAX_ADAPTERS {
            return Err(AdapterError::TooMany);
        }
        let real = resolve(&self.root, &req.path)?;
        let root = self.root.canonicalize()?;
        let rel = real
            .strip_prefix(&root)
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_else(|_| req.path.clone());
        let mut magic = [0u8; 4];
        {
            use std::io::Read;
            let mut f = std::fs::File::open(&real)?;
            let _ = f.read(&mut magic)?;
        }
        let (format, file, rank, alpha) = if &magic == b"GGUF" {
            let header = Gguf::read(&real)?;
            let (arch, rank, alpha) = inspect_gguf(&header)?;
            if let Some(b) = base
                && b.header.architecture().is_some_and(|a| a != arch)
            {
                return Err(AdapterError::BadFile(format!(
                    "the adapter is for {arch}; the model this node serves is {}",
                    b.header.architecture().unwrap_or("?")
                )));
            }
            if req
                .alpha
                .is_some_and(|a| (a - alpha).abs() > 1e-6 * alpha.max(1.0))
            {
                return Err(AdapterError::BadField(
                    "alpha",
                    format!("alpha: the file says {alpha}"),
                ));
            }
            ("gguf", real.clone(), rank, alpha)
        } else {
            let base = base.ok_or_else(|| {
                AdapterError::NeedsBase(
                    "a PEFT adapter is converted for the model this node serves: load its base \
                     model first"
                        .into(),
                )
            })?;
            let converted_dir = self.root.join(CONVERTED);
            std::fs::create_dir_all(&converted_dir)?;
            let out = converted_dir.join(format!("{id}.gguf"));
            let config_alpha = peft::config_alpha(&real);
            let alpha = req.alpha.or(config_alpha);
            let (rank, alpha) = peft::convert(&real, &base.header, alpha, &out)?;
            ("peft", out, rank, alpha)
        };
        if let Some(r) = req.rank
            && r != rank
        {
            return Err(AdapterError::BadField(
                "rank",
                format!("rank: the file's rank is {rank}"),
            ));
        }
        let digest = {
            let mut h = blake3::Hasher::new();
            h.update_reader(std::fs::File::open(&file)?)?;
            h.finalize().to_hex().to_string()
        };
        let adapter = Adapter {
            id: id.clone(),
            name: if name.is_empty() { id.clone() } else { name },
            base_model,
            rank,
            alpha,
            path: rel,
            format: format.to_string(),
            file,
            digest,
            created_at: now_unix(),
        };
        let mut map = self.by_id.write().unwrap_or_else(|p| p.into_inner());
        if map.contains_key(&id) {
            return Err(AdapterError::Exists(id));
        }
        self.store.with_conn(|c| {
            c.execute(
                "INSERT INTO adapters (id, name, base_model, rank, alpha, path, format, file,
                                       digest, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
                params![
                    adapter.id,
                    adapter.name,
                    adapter.base_model,
                    adapter.rank,
                    f64::from(adapter.alpha),
                    adapter.path,
                    adapter.format,
                    adapter.file.to_string_lossy(),
                    adapter.digest,
                    adapter.created_at
                ],
            )
        })?;
        map.insert(id, adapter.clone());
        Ok(adapter)
    }

    /// Unregisters `id` (blocking). The user's file stays; a conversion this
    /// node made is removed.
    pub fn remove(&self, id: &str) -> Result<Adapter, AdapterError> {
        let mut map = self.by_id.write().unwrap_or_else(|p| p.into_inner());
        let adapter = map
            .get(id)
            .cloned()
            .ok_or_else(|| AdapterError::NotFound(id.to_string()))?;
        self.store
            .with_conn(|c| c.execute("DELETE FROM adapters WHERE id = ?1", params![id]))?;
        map.remove(id);
        if adapter.format == "peft" {
            let _ = std::fs::remove_file(&adapter.file);
        }
        Ok(adapter)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_stay_inside_the_adapters_folder() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("adapters");
        std::fs::create_dir_all(root.join("sub")).expect("mkdir");
        std::fs::write(root.join("sub/a.gguf"), b"GGUF").expect("write");
        std::fs::write(dir.path().join("secret"), b"x").expect("write");
        let ok = resolve(&root, "sub/a.gguf").expect("inside");
        assert!(ok.ends_with("sub/a.gguf"));
        assert_eq!(resolve(&root, "adapters/sub/a.gguf").expect("prefix"), ok);
        let abs = root.join("sub/a.gguf");
        assert_eq!(
            resolve(&root, abs.to_str().expect("utf8")).expect("abs"),
            ok
        );
        for bad in [
            "../secret",
            "sub/../../secret",
            dir.path().join("secret").to_str().expect("utf8"),
            "/etc/passwd",
            "",
            "missing.gguf",
            "sub",
        ] {
            assert!(
                matches!(resolve(&root, bad), Err(AdapterError::BadPath(_))),
                "{bad:?} must be refused"
            );
        }
        #[cfg(unix)]
        {
            std::os::unix::fs::symlink(dir.path().join("secret"), root.join("link"))
                .expect("symlink");
            assert!(matches!(
                resolve(&root, "link"),
                Err(AdapterError::BadPath(_))
            ));
        }
        assert!(valid_id("my-adapter_1.2"));
        for bad in ["", ".hidden", "a/b", "a+b", "a b", &"x".repeat(65)] {
            assert!(!valid_id(bad), "{bad:?}");
        }
    }
}
