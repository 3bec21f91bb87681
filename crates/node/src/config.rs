//! Node configuration: one TOML file, every field defaulted.
//!
//! Precedence, lowest first: built-in defaults, the TOML file, `SWARMLLM_<FIELD>`
//! environment variables, then explicit overrides (CLI flags). The file lives in the
//! platform config dir (`~/.config/swarmllm/config.toml` on Linux) unless a data dir
//! is given explicitly, in which case it is `<data_dir>/config.toml`, so several nodes
//! on one machine never share a file. `--config PATH` / `SWARMLLM_CONFIG` override both.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Every setting of a node. Field names are the TOML keys, the JSON keys of
/// `GET/PUT /api/admin/config`, and (upper-cased) the `SWARMLLM_<FIELD>` variables.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address the HTTP API binds. Default `127.0.0.1` (loopback only).
    pub api_host: String,
    /// HTTP API port. Default 8800.
    pub api_port: u16,
    /// Peer-to-peer port, TCP and UDP/QUIC (0 picks one). Default 8801.
    pub p2p_port: u16,
    /// Address the P2P layer listens on. Default `0.0.0.0` (all interfaces).
    pub p2p_host: String,
    /// Whether the node joins the P2P network at all. Default true.
    pub p2p_enabled: bool,
    /// Local-network discovery with mDNS. Default true.
    pub mdns: bool,
    /// Invite codes (`swarm://…`) or multiaddrs dialled at start. Default none.
    pub bootstrap: Vec<String>,
    /// Network name; invite codes only open within the same network. Default `swarmllm`.
    pub network_name: String,
    /// Region code announced to peers (`EU`, `NA`, …); empty guesses from the time zone.
    pub region: String,
    /// Seconds between signed announcements. Default 10.
    pub announce_interval_secs: u32,
    /// Data directory; empty means the platform data dir. Default empty.
    pub data_dir: String,
    /// Path of the GGUF model to serve; empty means no model. Default empty.
    pub model: String,
    /// Id the model is served under; empty means the file name without `.gguf`.
    pub model_id: String,
    /// Inference threads; 0 means one per available core. Default 0.
    pub threads: u32,
    /// Layers offloaded to a GPU backend: `"auto"` (the default: as many as fit
    /// in the GPUs' free memory after the context; none without a GPU), or a
    /// count (0 = CPU only).
    pub gpu_layers: GpuLayers,
    /// Folder with ggml backend modules (`gpu` builds); empty means beside the binary.
    pub backends_dir: String,
    /// Context window in tokens. Default 4096.
    pub context_size: u32,
    /// Prompt-processing batch size in tokens. Default 512.
    pub batch_size: u32,
    /// Requests that may wait for the engine before new ones get 503. Default 64.
    pub max_queue: u32,
    /// Requests the local engine decodes together (continuous batching), each
    /// with its own `context_size` of KV cache; 0 picks 16,384 ÷ `context_size`
    /// (1–4; 4 at the default context). At most 64. Default 0.
    pub max_parallel: u32,
    /// `max_tokens` when a request names none. Default 256.
    pub default_max_tokens: u32,
    /// Largest request body in bytes; larger ones get 413. Default 1 MiB.
    pub max_body_bytes: u64,
    /// Authenticated requests per minute per API key; 0 disables. Default 600.
    pub rate_limit_per_minute: u32,
    /// Requests per minute per client address on the public (read) routes; 0
    /// disables. Default 3000.
    pub public_rate_limit_per_minute: u32,
    /// Extra browser origins allowed by CORS besides the app's own. Default none.
    pub cors_origins: Vec<String>,
    /// Host names the API answers besides IP addresses and `localhost` (a guard
    /// against DNS rebinding: a page on a hostile name that resolves to this
    /// machine gets 421). Default none.
    pub allowed_hosts: Vec<String>,
    /// A peer whose trust score (0–100; −10 per malformed message) falls below
    /// this is disconnected and refused for `peer_cool_off_secs`; 0 never bans.
    /// Default 10.
    pub peer_ban_trust: u32,
    /// Seconds a banned peer is refused. Default 600.
    pub peer_cool_off_secs: u32,
    /// `human` or `json`. Default `human`.
    pub log_format: String,
    /// A tracing filter such as `info` or `swarmllm_node=debug`. Default `info`.
    pub log_level: String,
    /// Where secrets live: `auto` (keychain, else encrypted file), `keychain`, `file`.
    pub secret_store: String,
    /// Load every contiguous run of held shards at start and serve it to the
    /// network. Default true.
    pub serve_shards: bool,
    /// Let hidden states travel narrower than f32 on slow links, so a split
    /// model's answers may drift from the whole model's. Default false: every
    /// link carries f32 and a split model answers exactly as the whole model.
    pub approximate_answers: bool,
    /// The format hidden states take on a slow link once `approximate_answers`
    /// is on: `f16` (default, half the bytes), `q8` (8-bit blocks, about a
    /// quarter) or `f32` (never narrower).
    pub activation_dtype: String,
    /// A link measured below this many megabits per second is slow (default 100:
    /// home uplinks are slow, a LAN is not).
    pub slow_link_mbps: f64,
    /// Draft tokens a split model's greedy generation sends through its chain
    /// in one step (prompt lookup: what followed the last words where they
    /// appeared before), verified by the last hop; the text does not change,
    /// and a chain of slow links pays its round trips once per accepted run
    /// rather than once per token. 0 turns it off; at most 16. Default 8.
    /// A request's `speculative.n_max` (llama-server's field) overrides it.
    pub speculative_tokens: u32,
    /// Where the desktop app asks for updates: a Tauri update endpoint, with
    /// `{{target}}`, `{{arch}}` and `{{current_version}}` filled in. Empty:
    /// the endpoint the app was built with, if any. Updates are installed only
    /// when signed by the key the app was built to trust.
    pub update_endpoint: String,
    /// Hours between the app's update checks (0: only when asked). Default 24.
    pub update_check_interval_hours: u32,
    /// Pipeline sessions (KV caches) a node keeps at once. Default 16.
    pub pipeline_max_sessions: u32,
    /// Seconds an idle pipeline session lives. Default 300.
    pub pipeline_session_ttl_secs: u32,
    /// KV cache memory all pipeline sessions may take together (MiB). Default 4096.
    pub pipeline_max_session_mb: u32,
    /// After each pipeline step, milliseconds the range host keeps polling for the
    /// session's next step instead of sleeping (a sleeping core wakes slowly and
    /// runs the next step slower; polling costs one core while tokens flow).
    /// 0 turns polling off. Default 50 (0–1000).
    pub pipeline_poll_ms: u32,
    /// Encrypted pipeline for every model without its own setting: this node
    /// embeds and samples itself, so prompts and outputs never leave it (needs its
    /// first and last shard). Default false.
    pub encrypted_pipeline: bool,
    /// Devices a pool this node owns may have. Default 10.
    pub pool_max_devices: u32,
    /// Disk space models may take (MiB); 0 means no limit. Default 0.
    /// Auto-manage never acquires past it and prunes back under it.
    pub disk_budget_mb: u64,
    /// Auto-manage for every model without its own setting: fetch the shards the
    /// swarm lacks most of demanded (or pinned) models, within the disk budget.
    /// Default false (a node only stores what its user asks for).
    pub auto_manage: bool,
    /// Auto-manage may also delete shards it no longer needs (over the budget,
    /// or once a model's demand has gone), for models without their own
    /// setting. Default true.
    pub auto_prune: bool,
    /// Seconds between auto-manage rounds. Default 10.
    pub auto_manage_interval_secs: u32,
    /// Demand is counted over this many seconds. Default 3600.
    pub demand_window_secs: u32,
    /// Holders every shard of a demanded model should have at least (more with
    /// demand). Default 2, so one may leave without a gap.
    pub replication_min: u32,
    /// Distinct requesters that make a model `DemandVerified` (at least 2, so
    /// one node alone never promotes a model). Default 2.
    pub demand_min_requesters: u32,
    /// The Hugging Face Hub (or a mirror) models are searched and fetched from.
    /// Empty (the default): `HF_ENDPOINT`, else `https://huggingface.co`.
    pub hf_endpoint: String,
    /// The base URL (`…/v1`) of an OpenAI-compatible server to use as the
    /// `custom` cloud provider (a local vLLM, a gateway). Empty (the default):
    /// none.
    pub provider_custom_url: String,
    /// The base URL (`…/v1`) of Anthropic's Messages API. Empty (the
    /// default): `https://api.anthropic.com/v1`.
    pub provider_anthropic_url: String,
    /// Credits earned per layer × token this node runs for another node (and
    /// paid per layer × token another node runs for it). Default 0.0001.
    pub credit_rate_layer_token: f64,
    /// Credits earned per token this node samples for another node. Default 0.01.
    pub credit_rate_token: f64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            api_host: "127.0.0.1".into(),
            api_port: 8800,
            p2p_port: 8801,
            p2p_host: "0.0.0.0".into(),
            p2p_enabled: true,
            mdns: true,
            bootstrap: Vec::new(),
            network_name: "swarmllm".into(),
            region: String::new(),
            announce_interval_secs: 10,
            data_dir: String::new(),
            model: String::new(),
            model_id: String::new(),
            threads: 0,
            gpu_layers: GpuLayers::Auto,
            backends_dir: String::new(),
            context_size: 4096,
            batch_size: 512,
            max_queue: 64,
            max_parallel: 0,
            default_max_tokens: 256,
            max_body_bytes: 1024 * 1024,
            rate_limit_per_minute: 600,
            public_rate_limit_per_minute: 3000,
            cors_origins: Vec::new(),
            allowed_hosts: Vec::new(),
            peer_ban_trust: 10,
            peer_cool_off_secs: 600,
            log_format: "human".into(),
            log_level: "info".into(),
            secret_store: "auto".into(),
            serve_shards: true,
            approximate_answers: false,
            activation_dtype: "f16".into(),
            speculative_tokens: 8,
            slow_link_mbps: 100.0,
            update_endpoint: String::new(),
            update_check_interval_hours: 24,
            pipeline_max_sessions: 16,
            pipeline_session_ttl_secs: 300,
            pipeline_max_session_mb: 4096,
            pipeline_poll_ms: 50,
            encrypted_pipeline: false,
            pool_max_devices: 10,
            disk_budget_mb: 0,
            auto_manage: false,
            auto_prune: true,
            auto_manage_interval_secs: 10,
            demand_window_secs: 3600,
            demand_min_requesters: 2,
            replication_min: 2,
            hf_endpoint: String::new(),
            provider_custom_url: String::new(),
            provider_anthropic_url: String::new(),
            credit_rate_layer_token: 0.0001,
            credit_rate_token: 0.01,
        }
    }
}

/// Fields that only take effect when the node restarts.
const RESTART_FIELDS: &[&str] = &[
    "api_host",
    "api_port",
    "p2p_port",
    "p2p_host",
    "p2p_enabled",
    "mdns",
    "bootstrap",
    "network_name",
    "region",
    "announce_interval_secs",
    "data_dir",
    "model",
    "model_id",
    "threads",
    "gpu_layers",
    "backends_dir",
    "context_size",
    "batch_size",
    "max_queue",
    "max_parallel",
    "log_format",
    "log_level",
    "secret_store",
    "serve_shards",
    "pipeline_max_sessions",
    "pipeline_max_session_mb",
    "pipeline_poll_ms",
    "pool_max_devices",
];

/// How many layers go to the GPU (`gpu_layers`): `"auto"` or a count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GpuLayers {
    /// As many as fit in free GPU memory after the context.
    #[default]
    Auto,
    /// This many (llama.cpp takes more than the model has as all of them).
    Count(u32),
}

impl Serialize for GpuLayers {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            GpuLayers::Auto => s.serialize_str("auto"),
            GpuLayers::Count(n) => s.serialize_u32(*n),
        }
    }
}

impl<'de> Deserialize<'de> for GpuLayers {
    /// `"auto"`, a whole number, or a whole number as text (an environment
    /// variable's value).
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        const WANTED: &str = "\"auto\" or a number of layers";
        match Value::deserialize(d)? {
            Value::String(s) if s.trim().eq_ignore_ascii_case("auto") => Ok(GpuLayers::Auto),
            Value::String(s) => s
                .trim()
                .parse()
                .map(GpuLayers::Count)
                .map_err(|_| serde::de::Error::custom(format!("must be {WANTED}"))),
            Value::Number(n) => n
                .as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .map(GpuLayers::Count)
                .ok_or_else(|| serde::de::Error::custom(format!("must be {WANTED}"))),
            _ => Err(serde::de::Error::custom(format!("must be {WANTED}"))),
        }
    }
}

/// A configuration value that is malformed or out of range.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{field}: {message}")]
#[non_exhaustive]
pub struct ConfigError {
    /// The offending key (dotted path for nested values), or `<root>`.
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

impl ConfigError {
    fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// Failure to load or save the config file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigFileError {
    /// The file could not be read or written.
    #[error("config file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid TOML or names an unknown key.
    #[error("config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message, naming the key.
        message: String,
    },
    /// A value (from the file, the environment or a flag) is invalid.
    #[error("invalid config value {0}")]
    Invalid(#[from] ConfigError),
}

impl Config {
    /// Checks semantic constraints that the types alone do not express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.api_host.parse::<std::net::IpAddr>().is_err() && self.api_host != "localhost" {
            return Err(ConfigError::new("api_host", "must be an IP address"));
        }
        if self.p2p_host.parse::<std::net::IpAddr>().is_err() {
            return Err(ConfigError::new("p2p_host", "must be an IP address"));
        }
        if self.announce_interval_secs == 0 {
            return Err(ConfigError::new(
                "announce_interval_secs",
                "must be at least 1",
            ));
        }
        if self.network_name.is_empty() {
            return Err(ConfigError::new("network_name", "must not be empty"));
        }
        if self.context_size < 64 {
            return Err(ConfigError::new("context_size", "must be at least 64"));
        }
        if self.batch_size == 0 {
            return Err(ConfigError::new("batch_size", "must be at least 1"));
        }
        if self.max_queue == 0 {
            return Err(ConfigError::new("max_queue", "must be at least 1"));
        }
        if self.max_parallel as usize > crate::infer::MAX_PARALLEL {
            return Err(ConfigError::new(
                "max_parallel",
                format!("must be at most {}", crate::infer::MAX_PARALLEL),
            ));
        }
        if self.default_max_tokens == 0 {
            return Err(ConfigError::new("default_max_tokens", "must be at least 1"));
        }
        if self.max_body_bytes < 1024 {
            return Err(ConfigError::new("max_body_bytes", "must be at least 1024"));
        }
        if !matches!(self.log_format.as_str(), "human" | "json") {
            return Err(ConfigError::new(
                "log_format",
                "must be \"human\" or \"json\"",
            ));
        }
        if !matches!(self.secret_store.as_str(), "auto" | "keychain" | "file") {
            return Err(ConfigError::new(
                "secret_store",
                "must be \"auto\", \"keychain\" or \"file\"",
            ));
        }
        let url_ok = |u: &str| u.starts_with("https://") || u.starts_with("http://");
        if !(self.hf_endpoint.is_empty() || url_ok(&self.hf_endpoint)) {
            return Err(ConfigError::new(
                "hf_endpoint",
                "must be empty or an http(s) URL",
            ));
        }
        for (field, url) in [
            ("provider_custom_url", &self.provider_custom_url),
            ("provider_anthropic_url", &self.provider_anthropic_url),
        ] {
            if !(url.is_empty() || url_ok(url)) {
                return Err(ConfigError::new(field, "must be empty or an http(s) URL"));
            }
        }
        if self.speculative_tokens > crate::pipeline::MAX_DRAFT {
            return Err(ConfigError::new(
                "speculative_tokens",
                format!("must be between 0 and {}", crate::pipeline::MAX_DRAFT),
            ));
        }
        if !matches!(self.activation_dtype.as_str(), "f16" | "f32" | "q8") {
            return Err(ConfigError::new(
                "activation_dtype",
                "must be \"f16\", \"f32\" or \"q8\"",
            ));
        }
        if !(self.update_endpoint.is_empty() || url_ok(&self.update_endpoint)) {
            return Err(ConfigError::new(
                "update_endpoint",
                "must be empty or an http(s) URL",
            ));
        }
        if !(self.slow_link_mbps.is_finite() && self.slow_link_mbps >= 0.0) {
            return Err(ConfigError::new(
                "slow_link_mbps",
                "must be a number of megabits per second, 0 or more",
            ));
        }
        for (field, rate) in [
            ("credit_rate_layer_token", self.credit_rate_layer_token),
            ("credit_rate_token", self.credit_rate_token),
        ] {
            if !(rate.is_finite() && (0.0..=1000.0).contains(&rate)) {
                return Err(ConfigError::new(field, "must be between 0 and 1000"));
            }
        }
        if self.auto_manage_interval_secs == 0 {
            return Err(ConfigError::new(
                "auto_manage_interval_secs",
                "must be at least 1",
            ));
        }
        if self.demand_window_secs < 10 {
            return Err(ConfigError::new(
                "demand_window_secs",
                "must be at least 10",
            ));
        }
        if !(1..=64).contains(&self.replication_min) {
            return Err(ConfigError::new(
                "replication_min",
                "must be between 1 and 64",
            ));
        }
        if self.demand_min_requesters < 2 {
            return Err(ConfigError::new(
                "demand_min_requesters",
                "must be at least 2 (one requester alone never verifies demand)",
            ));
        }
        if self.pipeline_max_sessions == 0 {
            return Err(ConfigError::new(
                "pipeline_max_sessions",
                "must be at least 1",
            ));
        }
        if self.pipeline_poll_ms > 1000 {
            return Err(ConfigError::new(
                "pipeline_poll_ms",
                "must be between 0 and 1000",
            ));
        }
        if self.pipeline_session_ttl_secs == 0 {
            return Err(ConfigError::new(
                "pipeline_session_ttl_secs",
                "must be at least 1",
            ));
        }
        if tracing_subscriber_filter_is_valid(&self.log_level).is_err() {
            return Err(ConfigError::new(
                "log_level",
                "is not a valid tracing filter",
            ));
        }
        Ok(())
    }

    /// The data dir: `data_dir` when set, else the platform data dir.
    pub fn data_dir_path(&self) -> PathBuf {
        if self.data_dir.is_empty() {
            crate::paths::default_data_dir()
        } else {
            PathBuf::from(&self.data_dir)
        }
    }

    /// The config as a JSON object (the shape of `GET /api/admin/config`).
    pub fn to_json(&self) -> Map<String, Value> {
        match serde_json::to_value(self) {
            Ok(Value::Object(map)) => map,
            // A struct of plain fields always serializes to an object.
            _ => Map::new(),
        }
    }

    /// Applies a partial JSON object of changes, returning the new config.
    ///
    /// Unknown keys, wrong types and out-of-range values are errors naming the field;
    /// `self` is never modified.
    pub fn patched(&self, changes: &Map<String, Value>) -> Result<Config, ConfigError> {
        let mut merged = self.to_json();
        for (key, value) in changes {
            if !merged.contains_key(key) {
                return Err(ConfigError::new(key.clone(), "unknown configuration key"));
            }
            merged.insert(key.clone(), value.clone());
        }
        let config: Config = serde_path_to_error::deserialize(Value::Object(merged))
            .map_err(|e| ConfigError::new(e.path().to_string(), e.inner().to_string()))?;
        config.validate()?;
        Ok(config)
    }

    /// Turns a raw string (an env var, a CLI argument) into a JSON value of the type
    /// the field `key` has, so `SWARMLLM_API_PORT=9000` is a number and
    /// `SWARMLLM_MODEL_ID=123` stays a string.
    pub fn coerce(&self, key: &str, raw: &str) -> Result<Value, ConfigError> {
        let current = self
            .to_json()
            .remove(key)
            .ok_or_else(|| ConfigError::new(key, "unknown configuration key"))?;
        match current {
            Value::String(_) => Ok(Value::String(raw.to_string())),
            Value::Array(_) if !raw.trim_start().starts_with('[') => Ok(Value::Array(
                raw.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(|s| Value::String(s.to_string()))
                    .collect(),
            )),
            _ => serde_json::from_str(raw)
                .map_err(|_| ConfigError::new(key, format!("cannot parse {raw:?}"))),
        }
    }

    /// Names of the fields that differ between `self` and `other`.
    pub fn changed_fields(&self, other: &Config) -> Vec<String> {
        let a = self.to_json();
        let b = other.to_json();
        a.iter()
            .filter(|(k, v)| b.get(*k) != Some(*v))
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// The fields that take effect only after a restart.
    pub fn restart_fields() -> &'static [&'static str] {
        RESTART_FIELDS
    }

    /// Of `fields`, those that need a restart to take effect.
    pub fn restart_required(fields: &[String]) -> Vec<String> {
        fields
            .iter()
            .filter(|f| RESTART_FIELDS.contains(&f.as_str()))
            .cloned()
            .collect()
    }
}

fn tracing_subscriber_filter_is_valid(filter: &str) -> Result<(), ()> {
    // Accept the directive syntax of tracing-subscriber's EnvFilter without depending on
    // it here: comma-separated `target=level` or `level` items.
    let levels = ["trace", "debug", "info", "warn", "error", "off"];
    for item in filter.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let level = item.rsplit('=').next().unwrap_or(item);
        if !levels.contains(&level.to_ascii_lowercase().as_str()) {
            return Err(());
        }
    }
    Ok(())
}

/// Where the config came from and how to rebuild it on reload.
#[derive(Debug, Clone)]
pub struct ConfigSource {
    /// The TOML file (may not exist yet).
    pub path: PathBuf,
    /// Explicit overrides (CLI flags), applied last: key → JSON value.
    pub overrides: Map<String, Value>,
    /// Whether `SWARMLLM_*` environment variables are read.
    pub read_env: bool,
}

impl ConfigSource {
    /// The source a program's command line describes (the CLI and the desktop app
    /// take the same flags): `--config` or `<data_dir>/config.toml` or the platform
    /// file, the environment, then `overrides` plus the data dir.
    pub fn from_flags(
        config: Option<PathBuf>,
        data_dir: Option<&PathBuf>,
        mut overrides: Map<String, Value>,
    ) -> Self {
        if let Some(dir) = data_dir {
            overrides.insert(
                "data_dir".into(),
                Value::String(dir.to_string_lossy().into()),
            );
        }
        ConfigSource {
            path: crate::paths::config_file(config, data_dir),
            overrides,
            read_env: true,
        }
    }

    /// Builds the config: defaults, then file, then environment, then overrides.
    pub fn load(&self) -> Result<Config, ConfigFileError> {
        let base = read_file(&self.path)?;
        let mut changes = Map::new();
        if self.read_env {
            for key in base.to_json().keys() {
                let var = format!("SWARMLLM_{}", key.to_ascii_uppercase());
                if let Ok(raw) = std::env::var(&var) {
                    changes.insert(key.clone(), base.coerce(key, &raw)?);
                }
            }
        }
        changes.extend(self.overrides.clone());
        Ok(base.patched(&changes)?)
    }

    /// Writes `changes` into the TOML file (keeping keys already there), atomically.
    pub fn persist(&self, changes: &Map<String, Value>) -> Result<(), ConfigFileError> {
        let io = |source| ConfigFileError::Io {
            path: self.path.clone(),
            source,
        };
        let mut table: toml::Table = match std::fs::read_to_string(&self.path) {
            Ok(text) => text
                .parse()
                .map_err(|e: toml::de::Error| ConfigFileError::Parse {
                    path: self.path.clone(),
                    message: e.message().to_string(),
                })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => toml::Table::new(),
            Err(e) => return Err(io(e)),
        };
        for (key, value) in changes {
            let value =
                toml::Value::try_from(value).map_err(|e| ConfigError::new(key, e.to_string()))?;
            table.insert(key.clone(), value);
        }
        let text = toml::to_string_pretty(&table)
            .map_err(|e| ConfigError::new("<root>", e.to_string()))?;
        crate::fsutil::write_atomic(&self.path, text.as_bytes()).map_err(io)
    }
}

fn read_file(path: &Path) -> Result<Config, ConfigFileError> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Config::default()),
        Err(source) => {
            return Err(ConfigFileError::Io {
                path: path.to_path_buf(),
                source,
            });
        }
    };
    toml::from_str(&text).map_err(|e| ConfigFileError::Parse {
        path: path.to_path_buf(),
        message: e.message().to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => panic!("not an object"),
        }
    }

    #[test]
    fn patch_rejects_unknown_key_naming_it() {
        let err = Config::default()
            .patched(&obj(json!({"no_such_key": 1})))
            .unwrap_err();
        assert_eq!(err.field, "no_such_key");
    }

    #[test]
    fn patch_rejects_wrong_type_naming_field() {
        let err = Config::default()
            .patched(&obj(json!({"api_port": "eighty"})))
            .unwrap_err();
        assert_eq!(err.field, "api_port");
        let err = Config::default()
            .patched(&obj(json!({"api_port": 70000})))
            .unwrap_err();
        assert_eq!(err.field, "api_port");
    }

    #[test]
    fn patch_rejects_semantic_errors() {
        let err = Config::default()
            .patched(&obj(json!({"log_format": "xml"})))
            .unwrap_err();
        assert_eq!(err.field, "log_format");
        let err = Config::default()
            .patched(&obj(json!({"pipeline_poll_ms": 5000})))
            .unwrap_err();
        assert_eq!(err.field, "pipeline_poll_ms");
        let ok = Config::default()
            .patched(&obj(json!({"pipeline_poll_ms": 0})))
            .unwrap();
        assert_eq!(ok.pipeline_poll_ms, 0);
    }

    #[test]
    fn gpu_layers_are_auto_or_a_count() {
        let c = Config::default();
        assert_eq!(c.gpu_layers, GpuLayers::Auto);
        assert_eq!(c.to_json()["gpu_layers"], json!("auto"));
        let twelve = c.patched(&obj(json!({"gpu_layers": 12}))).unwrap();
        assert_eq!(twelve.gpu_layers, GpuLayers::Count(12));
        assert_eq!(twelve.to_json()["gpu_layers"], json!(12));
        // An environment variable's text, whatever the field holds now.
        let raw = c.coerce("gpu_layers", "7").unwrap();
        assert_eq!(
            c.patched(&obj(json!({ "gpu_layers": raw })))
                .unwrap()
                .gpu_layers,
            GpuLayers::Count(7)
        );
        let auto = twelve.patched(&obj(json!({"gpu_layers": "AUTO"}))).unwrap();
        assert_eq!(auto.gpu_layers, GpuLayers::Auto);
        for bad in [json!("most"), json!(-1), json!(1.5)] {
            let err = c.patched(&obj(json!({ "gpu_layers": bad }))).unwrap_err();
            assert_eq!(err.field, "gpu_layers", "{bad}");
        }
    }

    #[test]
    fn coerce_follows_field_type() {
        let c = Config::default();
        assert_eq!(c.coerce("api_port", "9000").unwrap(), json!(9000));
        assert_eq!(c.coerce("model_id", "123").unwrap(), json!("123"));
        assert_eq!(
            c.coerce("cors_origins", "http://a, http://b").unwrap(),
            json!(["http://a", "http://b"])
        );
        assert!(c.coerce("nope", "1").is_err());
    }

    #[test]
    fn persist_then_load_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let src = ConfigSource {
            path: dir.path().join("config.toml"),
            overrides: Map::new(),
            read_env: false,
        };
        src.persist(&obj(
            json!({"rate_limit_per_minute": 7, "log_level": "debug"}),
        ))
        .unwrap();
        let loaded = src.load().unwrap();
        assert_eq!(loaded.rate_limit_per_minute, 7);
        assert_eq!(loaded.log_level, "debug");
        assert_eq!(loaded.api_port, 8800);
    }

    #[test]
    fn overrides_beat_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(&path, "api_port = 9001\n").unwrap();
        let src = ConfigSource {
            path,
            overrides: obj(json!({"api_port": 9002})),
            read_env: false,
        };
        assert_eq!(src.load().unwrap().api_port, 9002);
    }

    #[test]
    fn bad_file_names_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(&path, "api_prot = 1\n").unwrap();
        let src = ConfigSource {
            path,
            overrides: Map::new(),
            read_env: false,
        };
        let err = src.load().unwrap_err().to_string();
        assert!(err.contains("api_prot"), "{err}");
    }
}
