//! Cloud providers: APIs a node can hand a chat to when the swarm cannot
//! serve the model asked for (the answer then says which provider gave it).
//! Most speak OpenAI's chat completions; Anthropic speaks its Messages API,
//! which [`anthropic`] translates to and from.
//!
//! Each provider has a fixed base URL, except `custom`, which is any
//! OpenAI-compatible server the user names (`provider_custom_url`: a local
//! vLLM or LM Studio, a company gateway), and Anthropic's, which
//! `provider_anthropic_url` may point elsewhere (a gateway, a test server). Keys live with the other secrets
//! (`provider:<name>`), are never returned, and a provider without one is
//! never called. The model list is cached for [`MODELS_TTL`]; a stale list is
//! served at once while a refresh runs.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::Value;

use zeroize::Zeroizing;

use crate::secrets::{SecretError, SecretStore};

pub mod anthropic;

/// How long a model list stays fresh.
pub const MODELS_TTL: Duration = Duration::from_secs(60);
/// Connect timeout of every provider call.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Whole-call timeout of a probe and of a model list.
const PROBE_TIMEOUT: Duration = Duration::from_secs(15);
/// Whole-call timeout of a chat (a long answer takes a while).
pub const CHAT_TIMEOUT: Duration = Duration::from_secs(300);
/// Most models one provider's list may bring (a hostile or broken endpoint
/// cannot fill memory).
const MAX_MODELS: usize = 2_000;
/// Largest model list read, in bytes.
const MAX_LIST_BYTES: usize = 4 << 20;

/// The protocol a provider speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// OpenAI's `/chat/completions` and `/models`, bearer key.
    OpenAi,
    /// Anthropic's `/messages`, `x-api-key`; a fixed model list (the spec's
    /// "static list").
    Anthropic,
}

/// One provider.
#[derive(Debug, Clone, Copy)]
pub struct Provider {
    /// Its name in the API (`openai`, `groq`, …).
    pub name: &'static str,
    /// What people call it.
    pub label: &'static str,
    /// Its OpenAI-compatible base URL (`…/v1`); empty for `custom`.
    pub base_url: &'static str,
    /// A cheap model to probe health with (`custom`: its first listed model).
    pub probe_model: &'static str,
    /// What it speaks.
    pub protocol: Protocol,
}

/// Every provider a node knows.
pub const PROVIDERS: &[Provider] = &[
    Provider {
        name: "openai",
        label: "OpenAI",
        base_url: "https://api.openai.com/v1",
        probe_model: "gpt-4o-mini",
        protocol: Protocol::OpenAi,
    },
    Provider {
        name: "anthropic",
        label: "Anthropic",
        base_url: "https://api.anthropic.com/v1",
        probe_model: "claude-haiku-4-5",
        protocol: Protocol::Anthropic,
    },
    Provider {
        name: "deepseek",
        label: "DeepSeek",
        base_url: "https://api.deepseek.com/v1",
        probe_model: "deepseek-chat",
        protocol: Protocol::OpenAi,
    },
    Provider {
        name: "mistral",
        label: "Mistral",
        base_url: "https://api.mistral.ai/v1",
        probe_model: "mistral-small-latest",
        protocol: Protocol::OpenAi,
    },
    Provider {
        name: "groq",
        label: "Groq",
        base_url: "https://api.groq.com/openai/v1",
        probe_model: "llama-3.1-8b-instant",
        protocol: Protocol::OpenAi,
    },
    Provider {
        name: "nvidia",
        label: "NVIDIA NIM",
        base_url: "https://integrate.api.nvidia.com/v1",
        probe_model: "meta/llama-3.1-8b-instruct",
        protocol: Protocol::OpenAi,
    },
    Provider {
        name: "cerebras",
        label: "Cerebras",
        base_url: "https://api.cerebras.ai/v1",
        probe_model: "llama3.1-8b",
        protocol: Protocol::OpenAi,
    },
    Provider {
        name: "sambanova",
        label: "SambaNova",
        base_url: "https://api.sambanova.ai/v1",
        probe_model: "Meta-Llama-3.1-8B-Instruct",
        protocol: Protocol::OpenAi,
    },
    Provider {
        name: "fireworks",
        label: "Fireworks",
        base_url: "https://api.fireworks.ai/inference/v1",
        probe_model: "accounts/fireworks/models/llama-v3p1-8b-instruct",
        protocol: Protocol::OpenAi,
    },
    Provider {
        name: "together",
        label: "Together AI",
        base_url: "https://api.together.xyz/v1",
        probe_model: "meta-llama/Llama-3.2-3B-Instruct-Turbo",
        protocol: Protocol::OpenAi,
    },
    Provider {
        name: "deepinfra",
        label: "DeepInfra",
        base_url: "https://api.deepinfra.com/v1/openai",
        probe_model: "meta-llama/Meta-Llama-3.1-8B-Instruct",
        protocol: Protocol::OpenAi,
    },
    Provider {
        name: "moonshot",
        label: "Moonshot / Kimi",
        base_url: "https://api.moonshot.ai/v1",
        probe_model: "moonshot-v1-8k",
        protocol: Protocol::OpenAi,
    },
    Provider {
        name: "custom",
        label: "Custom OpenAI-compatible server",
        base_url: "",
        probe_model: "",
        protocol: Protocol::OpenAi,
    },
];

/// The provider called `name`.
pub fn provider(name: &str) -> Option<&'static Provider> {
    PROVIDERS.iter().find(|p| p.name == name)
}

/// Where the providers whose address a user may change live (from the
/// config: `provider_custom_url`, `provider_anthropic_url`).
#[derive(Debug, Clone, Copy, Default)]
pub struct Endpoints<'a> {
    /// The `custom` provider's base URL (empty: none).
    pub custom: &'a str,
    /// Anthropic's base URL (empty: the official one).
    pub anthropic: &'a str,
}

impl<'a> Endpoints<'a> {
    /// The endpoints a node's config names.
    pub fn of(config: &'a crate::config::Config) -> Self {
        Self {
            custom: &config.provider_custom_url,
            anthropic: &config.provider_anthropic_url,
        }
    }
}

/// A provider's model.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ProviderModel {
    /// The id the provider knows it by.
    pub id: String,
    /// A display name.
    pub name: String,
    /// The provider.
    pub provider: &'static str,
}

/// How a probe went, in the spec's words.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Probe {
    /// `up`, `rate_limited`, `overloaded`, `not_found`, `timeout`,
    /// `unreachable`, or `error_<code>`.
    pub status: String,
    /// Round trip, when it answered.
    pub latency_ms: Option<u64>,
    /// What went wrong, briefly.
    pub detail: String,
}

/// The node's providers.
#[derive(Debug)]
pub struct Providers {
    http: reqwest::Client,
    /// The keys, once read (see [`Providers::keys`]).
    keys: Mutex<BTreeMap<&'static str, Zeroizing<String>>>,
    keys_loaded: std::sync::atomic::AtomicBool,
    /// The cached model list: when it was fetched, and the models.
    models: Mutex<Option<(Instant, Arc<Vec<ProviderModel>>)>>,
    refreshing: std::sync::atomic::AtomicBool,
}

fn secret_name(provider: &str) -> String {
    format!("provider:{provider}")
}

impl Default for Providers {
    fn default() -> Self {
        Self::new()
    }
}

impl Providers {
    /// No model list yet.
    pub fn new() -> Self {
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .build()
            .unwrap_or_default();
        Self {
            http,
            keys: Mutex::default(),
            keys_loaded: false.into(),
            models: Mutex::default(),
            refreshing: false.into(),
        }
    }

    /// The HTTP client provider calls go through.
    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    /// Every provider's key, read from the secret store once (a keychain
    /// call, or a decryption of the secrets file, per provider) and kept with
    /// the node's other in-memory secrets; [`Providers::set_key`] updates it.
    fn keys(
        &self,
        secrets: &SecretStore,
    ) -> Result<std::sync::MutexGuard<'_, BTreeMap<&'static str, Zeroizing<String>>>, SecretError>
    {
        let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        if !self.keys_loaded.load(std::sync::atomic::Ordering::Acquire) {
            keys.clear();
            for p in PROVIDERS {
                if let Some(k) = secrets.get(&secret_name(p.name))?.filter(|k| !k.is_empty()) {
                    keys.insert(p.name, k);
                }
            }
            self.keys_loaded
                .store(true, std::sync::atomic::Ordering::Release);
        }
        Ok(keys)
    }

    /// Sets (or with `None` removes) `provider`'s key (blocking), and drops
    /// the cached model list.
    pub fn set_key(
        &self,
        secrets: &SecretStore,
        provider: &str,
        key: Option<&str>,
    ) -> Result<(), SecretError> {
        let mut keys = self.keys(secrets)?;
        secrets.set(&secret_name(provider), key.unwrap_or(""))?;
        if let Some(p) = self::provider(provider) {
            match key.filter(|k| !k.is_empty()) {
                Some(k) => keys.insert(p.name, Zeroizing::new(k.to_string())),
                None => keys.remove(p.name),
            };
        }
        drop(keys);
        *self.models.lock().unwrap_or_else(|p| p.into_inner()) = None;
        Ok(())
    }

    /// The base URL of `p` with this node's settings; `None` when it has
    /// none (`custom` without a URL).
    pub fn base_url(p: &Provider, endpoints: Endpoints<'_>) -> Option<String> {
        let url = match p.name {
            "custom" => endpoints.custom,
            "anthropic" if !endpoints.anthropic.is_empty() => endpoints.anthropic,
            _ => p.base_url,
        };
        (!url.is_empty()).then(|| url.trim_end_matches('/').to_string())
    }

    /// Every provider with a key and a base URL, with the key (blocking).
    pub fn configured(
        &self,
        secrets: &SecretStore,
        endpoints: Endpoints<'_>,
    ) -> Vec<(&'static Provider, String, String)> {
        let Ok(keys) = self.keys(secrets) else {
            return Vec::new();
        };
        PROVIDERS
            .iter()
            .filter_map(|p| {
                let base = Self::base_url(p, endpoints)?;
                let key = keys.get(p.name)?;
                Some((p, base, key.to_string()))
            })
            .collect()
    }

    /// The cached list and whether it is stale (`None`: never fetched).
    pub fn cached_models(&self) -> Option<(Arc<Vec<ProviderModel>>, bool)> {
        let cache = self.models.lock().unwrap_or_else(|p| p.into_inner());
        cache
            .as_ref()
            .map(|(at, m)| (Arc::clone(m), at.elapsed() > MODELS_TTL))
    }

    /// Claims the one refresh that may run; `false` when one already does.
    pub fn begin_refresh(&self) -> bool {
        !self
            .refreshing
            .swap(true, std::sync::atomic::Ordering::AcqRel)
    }

    /// Stores a fetched list and ends the refresh.
    pub fn store_models(&self, models: Vec<ProviderModel>) -> Arc<Vec<ProviderModel>> {
        let models = Arc::new(models);
        *self.models.lock().unwrap_or_else(|p| p.into_inner()) =
            Some((Instant::now(), Arc::clone(&models)));
        self.refreshing
            .store(false, std::sync::atomic::Ordering::Release);
        models
    }

    /// Ends a refresh that stored nothing.
    pub fn end_refresh(&self) {
        self.refreshing
            .store(false, std::sync::atomic::Ordering::Release);
    }

    /// `GET {base}/models` of one provider (bounded in size and count);
    /// Anthropic's fixed list.
    pub async fn list(&self, p: &'static Provider, base: &str, key: &str) -> Vec<ProviderModel> {
        if p.protocol == Protocol::Anthropic {
            return anthropic::MODELS
                .iter()
                .map(|(id, name)| ProviderModel {
                    id: id.to_string(),
                    name: name.to_string(),
                    provider: p.name,
                })
                .collect();
        }
        let r = self
            .http
            .get(format!("{base}/models"))
            .bearer_auth(key)
            .timeout(PROBE_TIMEOUT)
            .send()
            .await;
        let Ok(r) = r.and_then(reqwest::Response::error_for_status) else {
            return Vec::new();
        };
        if r.content_length()
            .is_some_and(|n| n > MAX_LIST_BYTES as u64)
        {
            return Vec::new();
        }
        let Ok(bytes) = r.bytes().await else {
            return Vec::new();
        };
        if bytes.len() > MAX_LIST_BYTES {
            return Vec::new();
        }
        let v: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        v["data"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|m| m["id"].as_str())
            .filter(|id| !id.is_empty() && id.len() <= 256)
            .take(MAX_MODELS)
            .map(|id| ProviderModel {
                id: id.to_string(),
                name: id.to_string(),
                provider: p.name,
            })
            .collect()
    }

    /// A chat request to `p` (its path, its way of sending the key).
    pub fn chat_request(
        &self,
        p: &Provider,
        base: &str,
        key: &str,
        body: &Value,
    ) -> reqwest::RequestBuilder {
        match p.protocol {
            Protocol::OpenAi => self
                .http
                .post(format!("{base}/chat/completions"))
                .bearer_auth(key),
            Protocol::Anthropic => self
                .http
                .post(format!("{base}/messages"))
                .header("x-api-key", key)
                .header("anthropic-version", anthropic::VERSION),
        }
        .json(body)
    }

    /// Sends a one-token chat to `model` and reads how it went.
    pub async fn probe(&self, p: &Provider, base: &str, key: &str, model: &str) -> Probe {
        let started = Instant::now();
        let body = serde_json::json!({
            "model": model,
            "messages": [{ "role": "user", "content": "hi" }],
            "max_tokens": 1,
        });
        let r = self
            .chat_request(p, base, key, &body)
            .timeout(PROBE_TIMEOUT)
            .send()
            .await;
        let latency_ms = Some(started.elapsed().as_millis() as u64);
        match r {
            Ok(r) => {
                let code = r.status().as_u16();
                let status = match code {
                    200..=299 => "up".to_string(),
                    429 => "rate_limited".to_string(),
                    404 => "not_found".to_string(),
                    // 529: Anthropic's "overloaded".
                    503 | 529 => "overloaded".to_string(),
                    c => format!("error_{c}"),
                };
                let detail = if code < 300 {
                    String::new()
                } else {
                    let body = r.text().await.unwrap_or_default();
                    body.chars().take(200).collect()
                };
                Probe {
                    status,
                    latency_ms,
                    detail,
                }
            }
            Err(e) if e.is_timeout() => Probe {
                status: "timeout".into(),
                latency_ms: None,
                detail: String::new(),
            },
            Err(e) => Probe {
                status: "unreachable".into(),
                latency_ms: None,
                detail: e.to_string().chars().take(200).collect(),
            },
        }
    }
}

/// Which provider serves `model`: an explicit `provider:model`, else the first
/// provider whose cached list has it, else Anthropic for any `claude-*` id
/// (its list is fixed; newer models exist). Returns the provider and the id
/// to send.
pub fn route(
    model: &str,
    cached: &[ProviderModel],
    configured: &BTreeMap<&'static str, (String, String)>,
) -> Option<(&'static Provider, String)> {
    if let Some((name, id)) = model.split_once(':')
        && let Some(p) = provider(name)
        && configured.contains_key(p.name)
        && !id.is_empty()
    {
        return Some((p, id.to_string()));
    }
    if let Some(m) = cached
        .iter()
        .find(|m| m.id == model && configured.contains_key(m.provider))
    {
        return Some((provider(m.provider)?, m.id.clone()));
    }
    (model.starts_with("claude-") && configured.contains_key("anthropic"))
        .then(|| Some((provider("anthropic")?, model.to_string())))
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_model_routes_to_a_configured_provider_only() {
        let cached = vec![
            ProviderModel {
                id: "gpt-4o".into(),
                name: "gpt-4o".into(),
                provider: "openai",
            },
            ProviderModel {
                id: "llama".into(),
                name: "llama".into(),
                provider: "groq",
            },
        ];
        let mut configured = BTreeMap::new();
        configured.insert("openai", ("https://x".to_string(), "k".to_string()));
        let (p, id) = route("gpt-4o", &cached, &configured).expect("listed");
        assert_eq!((p.name, id.as_str()), ("openai", "gpt-4o"));
        assert!(
            route("llama", &cached, &configured).is_none(),
            "groq has no key"
        );
        let (p, id) = route("openai:o3", &cached, &configured).expect("explicit");
        assert_eq!((p.name, id.as_str()), ("openai", "o3"));
        assert!(route("groq:llama", &cached, &configured).is_none());
        assert!(route("nobody:x", &cached, &configured).is_none());
        assert!(route("unknown-model", &cached, &configured).is_none());
        assert!(route("claude-x", &cached, &configured).is_none());
        configured.insert("anthropic", ("https://y".to_string(), "k".to_string()));
        let (p, id) = route("claude-x", &cached, &configured).expect("claude");
        assert_eq!((p.name, id.as_str()), ("anthropic", "claude-x"));
        let custom = provider("custom").expect("custom");
        let anthropic = provider("anthropic").expect("anthropic");
        assert_eq!(Providers::base_url(custom, Endpoints::default()), None);
        let endpoints = Endpoints {
            custom: "http://127.0.0.1:9/v1/",
            anthropic: "",
        };
        assert_eq!(
            Providers::base_url(custom, endpoints),
            Some("http://127.0.0.1:9/v1".into())
        );
        assert_eq!(
            Providers::base_url(anthropic, endpoints),
            Some("https://api.anthropic.com/v1".into())
        );
    }
}
