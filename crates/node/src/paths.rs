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
