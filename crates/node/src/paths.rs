//! Where a node keeps its files.

use std::path::PathBuf;

fn project_dirs() -> Option<directories::ProjectDirs> {
    directories::ProjectDirs::from("ai", "SwarmLLM", "swarmllm")
}

/// The platform data dir (`~/.local/share/swarmllm` on Linux), or `./swarmllm-data`
/// when the platform has none (no home directory).
pub fn default_data_dir() -> PathBuf {
    project_dirs()
        .map(|d| d.data_dir().to_path_buf())
        .unwrap_or_else(|| PathBuf::from("swarmllm-data"))
}

/// The platform config file (`~/.config/swarmllm/config.toml` on Linux).
pub fn default_config_file() -> PathBuf {
    project_dirs()
        .map(|d| d.config_dir().join("config.toml"))
        .unwrap_or_else(|| PathBuf::from("swarmllm-config.toml"))
}

/// The config file for a node: `explicit` if given, `<data_dir>/config.toml` when
/// the data dir was chosen explicitly, else the platform config file.
pub fn config_file(explicit: Option<PathBuf>, explicit_data_dir: Option<&PathBuf>) -> PathBuf {
    explicit
        .or_else(|| explicit_data_dir.map(|d| d.join("config.toml")))
        .unwrap_or_else(default_config_file)
}

/// Where `scripts/fetch-test-model` and `scripts/fetch-gemma3` cache models:
/// `$SWARMLLM_CACHE_DIR/models`, default `~/.cache/swarmllm/models`.
pub fn model_cache_dir() -> PathBuf {
    std::env::var_os("SWARMLLM_CACHE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            std::env::var_os("HOME")
                .map(PathBuf::from)
                .unwrap_or_default()
                .join(".cache/swarmllm")
        })
        .join("models")
}

/// A test model: the file named by the environment variable `env` when set, else
/// `file` in [`model_cache_dir`]. `None` when it is not there.
#[doc(hidden)]
pub fn test_model(env: &str, file: &str) -> Option<PathBuf> {
    let path = std::env::var_os(env)
        .map(PathBuf::from)
        .unwrap_or_else(|| model_cache_dir().join(file));
    path.is_file().then_some(path)
}
