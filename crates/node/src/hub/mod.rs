//! The Hugging Face Hub (or a mirror that speaks its protocol).
//!
//! `hf-hub` gives the endpoint, the token, repository info and the local cache
//! layout shared with the Python client; the rest is plain HTTP as the Hub speaks
//! it: a file is resolved with a ranged `GET /{repo}/resolve/{rev}/{file}` that the
//! Hub answers with a redirect to a CDN carrying the file's commit, SHA-256 and
//! size (`X-Repo-Commit`, `X-Linked-Etag`, `X-Linked-Size`), and its bytes are read
//! from the CDN with `Range` requests. A token goes to the Hub only, never to the
//! CDN a redirect names.
//!
//! - [`search`]: the catalog, variants grouped per repository, what fits here;
//! - [`probe`]: a remote GGUF's header and the shard layout, from range reads.

pub mod probe;
pub mod search;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use reqwest::header::{AUTHORIZATION, CONTENT_RANGE, HeaderMap, HeaderValue, LOCATION, RANGE};
use serde::Deserialize;

/// The Hub used when neither the config nor `HF_ENDPOINT` names one.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";
/// How long a search answer is reused.
const SEARCH_TTL: Duration = Duration::from_secs(60);
/// Search answers kept.
const MAX_CACHED: usize = 64;
/// Longest repository id (`owner/name`) accepted.
const MAX_REPO_ID: usize = 96;

/// A Hub request failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HubError {
    /// The request itself is malformed (a bad repository id or file name).
    #[error("{0}")]
    Invalid(String),
    /// No such repository or file (`X-Error-Code` from the Hub).
    #[error("{0}")]
    NotFound(String),
    /// The file is gated or private and no token (or a token without access)
    /// was given.
    #[error("{0}")]
    Gated(String),
    /// The Hub asked to slow down.
    #[error("the Hub is rate limiting requests (retry after {retry_after:?} s)")]
    RateLimited {
        /// Seconds, from `Retry-After`.
        retry_after: Option<u64>,
    },
    /// The file is not what was expected (not a GGUF, a bad header, wrong bytes).
    #[error("{0}")]
    BadFile(String),
    /// The Hub or the network failed.
    #[error("{0}")]
    Upstream(String),
}

impl From<reqwest::Error> for HubError {
    fn from(e: reqwest::Error) -> Self {
        HubError::Upstream(format!("the Hub could not be reached: {e}"))
    }
}

/// Where the Hub is and how to authenticate.
#[derive(Debug, Clone, Default)]
pub struct HubSettings {
    /// Base URL (no trailing slash).
    pub endpoint: String,
    /// Token for gated and private repositories.
    pub token: Option<String>,
}

impl HubSettings {
    /// The endpoint from the config value, else `HF_ENDPOINT`, else the Hub.
    pub fn endpoint_from(configured: &str) -> String {
        let chosen = if configured.trim().is_empty() {
            std::env::var("HF_ENDPOINT").unwrap_or_else(|_| DEFAULT_ENDPOINT.to_string())
        } else {
            configured.trim().to_string()
        };
        chosen.trim_end_matches('/').to_string()
    }
}

/// A file resolved on the Hub: where its bytes are and what they are.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// URL to read byte ranges from (the CDN's, after the Hub's redirect).
    pub url: String,
    /// Whether `url` is on the Hub itself (then the token goes with it).
    pub on_hub: bool,
    /// File size.
    pub size: u64,
    /// SHA-256 of the file (hex), when the Hub names it (LFS files).
    pub sha256: Option<String>,
    /// The commit it was resolved at.
    pub commit: Option<String>,
}

/// A file in a repository listing.
#[derive(Debug, Clone, PartialEq)]
pub struct RepoFile {
    /// Path in the repository.
    pub path: String,
    /// Size, when listed.
    pub size: Option<u64>,
    /// SHA-256 of an LFS file.
    pub sha256: Option<String>,
}

/// A repository's files and state.
#[derive(Debug, Clone)]
pub struct RepoListing {
    /// Repository id.
    pub repo_id: String,
    /// Commit.
    pub sha: Option<String>,
    /// Whether access must be granted (`"auto"`/`"manual"`), else `None`.
    pub gated: Option<String>,
    /// Files.
    pub files: Vec<RepoFile>,
}

/// A client of one Hub. Clones share their caches.
#[derive(Clone)]
pub struct Hub {
    settings: HubSettings,
    api: hf_hub::api::tokio::Api,
    /// Follows no redirect, so the Hub's redirect headers can be read; carries
    /// the token.
    meta: reqwest::Client,
    /// For CDN reads: no token.
    data: reqwest::Client,
    cache: Arc<Caches>,
}

#[derive(Default)]
struct Caches {
    search: Mutex<HashMap<String, (Instant, serde_json::Value)>>,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("endpoint", &self.settings.endpoint)
            .field("token", &self.settings.token.as_ref().map(|_| "<set>"))
            .finish_non_exhaustive()
    }
}

/// Whether `id` is a repository id: `owner/name` of letters, digits, `-`, `_`, `.`.
pub fn is_repo_id(id: &str) -> bool {
    let ok = |p: &str| {
        !p.is_empty()
            && !p.starts_with('.')
            && p.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    };
    id.len() <= MAX_REPO_ID && id.split_once('/').is_some_and(|(a, b)| ok(a) && ok(b))
}

/// Whether `path` is a usable file path in a repository (folders allowed, no
/// `..`, no absolute path, no backslash).
pub fn is_repo_path(path: &str) -> bool {
    !path.is_empty()
        && path.len() <= 512
        && !path.starts_with('/')
        && path
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != ".." && !c.contains('\\'))
        && !path.chars().any(char::is_control)
}

fn error_code(headers: &HeaderMap) -> String {
    headers
        .get("x-error-code")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string()
}

/// Maps a Hub error status to a [`HubError`].
fn status_error(status: StatusCode, headers: &HeaderMap, what: &str) -> HubError {
    let code = error_code(headers);
    match status {
        StatusCode::NOT_FOUND => HubError::NotFound(match code.as_str() {
            "RepoNotFound" => format!("{what}: no such repository on the Hub"),
            "EntryNotFound" => format!("{what}: no such file in the repository"),
            _ => format!("{what}: not found on the Hub"),
        }),
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => HubError::Gated(format!(
            "{what} is gated or private: set a Hugging Face token with access \
             (PUT /api/admin/hf/token or HF_TOKEN){}",
            if code.is_empty() {
                String::new()
            } else {
                format!(" ({code})")
            }
        )),
        StatusCode::TOO_MANY_REQUESTS => HubError::RateLimited {
            retry_after: headers
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse().ok()),
        },
        other => HubError::Upstream(format!("{what}: the Hub answered {other}")),
    }
}

fn header_str(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(|s| s.trim().trim_matches('"').to_string())
}

/// The total of a `Content-Range: bytes a-b/TOTAL` header.
fn content_range_total(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(CONTENT_RANGE)?
        .to_str()
        .ok()?
        .rsplit('/')
        .next()?
        .parse()
        .ok()
}

#[derive(Deserialize)]
struct InfoJson {
    sha: Option<String>,
    #[serde(default)]
    gated: serde_json::Value,
    #[serde(default)]
    siblings: Vec<SiblingJson>,
}

#[derive(Deserialize)]
struct SiblingJson {
    rfilename: String,
    size: Option<u64>,
    lfs: Option<LfsJson>,
}

#[derive(Deserialize)]
struct LfsJson {
    sha256: Option<String>,
    size: Option<u64>,
}

impl Hub {
    /// A client for the Hub in `settings`.
    pub fn new(settings: HubSettings) -> Result<Hub, HubError> {
        let mut builder = hf_hub::api::tokio::ApiBuilder::from_env()
            .with_endpoint(settings.endpoint.clone())
            .with_progress(false);
        if settings.token.is_some() {
            builder = builder.with_token(settings.token.clone());
        }
        let api = builder
            .build()
            .map_err(|e| HubError::Upstream(e.to_string()))?;
        let mut auth = HeaderMap::new();
        if let Some(t) = &settings.token {
            let mut v = HeaderValue::from_str(&format!("Bearer {t}"))
                .map_err(|_| HubError::Invalid("the Hugging Face token is not a header".into()))?;
            v.set_sensitive(true);
            auth.insert(AUTHORIZATION, v);
        }
        let agent = concat!("swarmllm/", env!("CARGO_PKG_VERSION"));
        let meta = reqwest::Client::builder()
            .user_agent(agent)
            .default_headers(auth)
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(60))
            .build()?;
        let data = reqwest::Client::builder()
            .user_agent(agent)
            .connect_timeout(Duration::from_secs(10))
            .read_timeout(Duration::from_secs(60))
            .build()?;
        Ok(Hub {
            settings,
            api,
            meta,
            data,
            cache: Arc::default(),
        })
    }

    /// The endpoint.
    pub fn endpoint(&self) -> &str {
        &self.settings.endpoint
    }

    /// A repository's files with sizes and LFS hashes (`/api/models/{repo}`
    /// with `blobs=true`, through `hf-hub`).
    pub async fn listing(&self, repo_id: &str) -> Result<RepoListing, HubError> {
        if !is_repo_id(repo_id) {
            return Err(HubError::Invalid(format!(
                "{repo_id:?} is not a repository id (owner/name)"
            )));
        }
        let response = self
            .api
            .model(repo_id.to_string())
            .info_request()
            .query(&[("blobs", "true")])
            .send()
            .await?;
        if !response.status().is_success() {
            return Err(status_error(response.status(), response.headers(), repo_id));
        }
        let info: InfoJson = json_body(response, repo_id).await?;
        let gated = match info.gated {
            serde_json::Value::String(s) => Some(s),
            serde_json::Value::Bool(true) => Some("true".into()),
            _ => None,
        };
        Ok(RepoListing {
            repo_id: repo_id.to_string(),
            sha: info.sha,
            gated,
            files: info
                .siblings
                .into_iter()
                .map(|s| RepoFile {
                    size: s.lfs.as_ref().and_then(|l| l.size).or(s.size),
                    sha256: s.lfs.and_then(|l| l.sha256),
                    path: s.rfilename,
                })
                .collect(),
        })
    }

    /// Resolves `path` in `repo_id` at `revision` ("main" when `None`): follows
    /// the Hub's redirect by hand so its headers (commit, SHA-256, size) are read
    /// and the token is not sent to the CDN.
    pub async fn resolve(
        &self,
        repo_id: &str,
        path: &str,
        revision: Option<&str>,
    ) -> Result<Resolved, HubError> {
        if !is_repo_id(repo_id) {
            return Err(HubError::Invalid(format!(
                "{repo_id:?} is not a repository id (owner/name)"
            )));
        }
        if !is_repo_path(path) {
            return Err(HubError::Invalid(format!(
                "{path:?} is not a file path in a repository"
            )));
        }
        let revision = revision.unwrap_or("main");
        let repo = hf_hub::Repo::with_revision(
            repo_id.to_string(),
            hf_hub::RepoType::Model,
            revision.to_string(),
        );
        let url = self.api.repo(repo).url(path);
        let what = format!("{repo_id}/{path}");
        let mut url = url;
        // The Hub may redirect within itself (a renamed repository) before the CDN.
        for _ in 0..5 {
            let response = self
                .meta
                .get(&url)
                .header(RANGE, "bytes=0-0")
                .send()
                .await?;
            let status = response.status();
            let headers = response.headers().clone();
            if status.is_redirection() {
                let location = header_str(&headers, LOCATION.as_str()).ok_or_else(|| {
                    HubError::Upstream(format!("{what}: a redirect without a Location"))
                })?;
                let next = reqwest::Url::parse(&url)
                    .and_then(|base| base.join(&location))
                    .map_err(|e| HubError::Upstream(format!("{what}: bad redirect: {e}")))?;
                let same_origin = reqwest::Url::parse(&self.settings.endpoint)
                    .is_ok_and(|hub| hub.origin() == next.origin());
                if same_origin {
                    url = next.to_string();
                    continue;
                }
                // To the CDN: what the file is comes with the redirect.
                let size = header_str(&headers, "x-linked-size").and_then(|s| s.parse().ok());
                let size = match size {
                    Some(s) => s,
                    None => self.size_at(next.as_str(), false, &what).await?,
                };
                return Ok(Resolved {
                    url: next.to_string(),
                    on_hub: false,
                    size,
                    sha256: header_str(&headers, "x-linked-etag").filter(|e| is_sha256(e)),
                    commit: header_str(&headers, "x-repo-commit"),
                });
            }
            if !status.is_success() {
                return Err(status_error(status, &headers, &what));
            }
            let size = content_range_total(&headers)
                .or_else(|| header_str(&headers, "content-length").and_then(|s| s.parse().ok()))
                .ok_or_else(|| HubError::Upstream(format!("{what}: no file size in the answer")))?;
            return Ok(Resolved {
                url,
                on_hub: true,
                size,
                sha256: header_str(&headers, "x-linked-etag")
                    .or_else(|| header_str(&headers, "etag"))
                    .filter(|e| is_sha256(e)),
                commit: header_str(&headers, "x-repo-commit"),
            });
        }
        Err(HubError::Upstream(format!("{what}: too many redirects")))
    }

    async fn size_at(&self, url: &str, on_hub: bool, what: &str) -> Result<u64, HubError> {
        let client = if on_hub { &self.meta } else { &self.data };
        let r = client.get(url).header(RANGE, "bytes=0-0").send().await?;
        if !r.status().is_success() {
            return Err(status_error(r.status(), r.headers(), what));
        }
        content_range_total(r.headers())
            .ok_or_else(|| HubError::Upstream(format!("{what}: no Content-Range in the answer")))
    }

    /// Starts reading bytes `start..end` of a resolved file: the answer must be
    /// `206` for exactly that range. Returns the response to stream the body of.
    pub async fn read_range(
        &self,
        file: &Resolved,
        start: u64,
        end: u64,
    ) -> Result<reqwest::Response, HubError> {
        if start >= end || end > file.size {
            return Err(HubError::Invalid(format!(
                "range {start}..{end} of a {}-byte file",
                file.size
            )));
        }
        let client = if file.on_hub { &self.meta } else { &self.data };
        let r = client
            .get(&file.url)
            .header(RANGE, format!("bytes={start}-{}", end - 1))
            .send()
            .await?;
        let status = r.status();
        if status != StatusCode::PARTIAL_CONTENT {
            if status.is_success() {
                return Err(HubError::BadFile(format!(
                    "the server answered {status} instead of the range asked for"
                )));
            }
            return Err(status_error(status, r.headers(), "a range read"));
        }
        let expected = format!("bytes {start}-{}/", end - 1);
        let got = header_str(r.headers(), CONTENT_RANGE.as_str()).unwrap_or_default();
        if !got.starts_with(&expected) {
            return Err(HubError::BadFile(format!(
                "the server sent range {got:?}, not {expected}…"
            )));
        }
        Ok(r)
    }

    /// Reads bytes `start..end` into memory (headers: at most a few MiB).
    pub async fn read_bytes(
        &self,
        file: &Resolved,
        start: u64,
        end: u64,
    ) -> Result<Vec<u8>, HubError> {
        let mut r = self.read_range(file, start, end).await?;
        let want = end - start;
        let mut bytes = Vec::with_capacity(want.min(MAX_JSON_BYTES as u64) as usize);
        // Never more than the range asked for is kept, whatever the server sends.
        while let Some(chunk) = r.chunk().await? {
            if (bytes.len() + chunk.len()) as u64 > want {
                return Err(HubError::BadFile(format!(
                    "the server sent more than the {want} bytes asked for"
                )));
            }
            bytes.extend_from_slice(&chunk);
        }
        if bytes.len() as u64 != want {
            return Err(HubError::BadFile(format!(
                "the server sent {} bytes for a {want}-byte range",
                bytes.len()
            )));
        }
        Ok(bytes)
    }

    /// A path to `path` of `repo_id` in the local Hugging Face cache (shared with
    /// the Python client), if it was downloaded there before.
    pub fn cached_file(&self, repo_id: &str, path: &str) -> Option<std::path::PathBuf> {
        hf_hub::Cache::from_env()
            .model(repo_id.to_string())
            .get(path)
    }

    /// The cached answer for `key`, if fresh.
    fn cached_search(&self, key: &str) -> Option<serde_json::Value> {
        let cache = self.cache.search.lock().unwrap_or_else(|p| p.into_inner());
        cache
            .get(key)
            .filter(|(at, _)| at.elapsed() < SEARCH_TTL)
            .map(|(_, v)| v.clone())
    }

    fn store_search(&self, key: &str, value: serde_json::Value) {
        let mut cache = self.cache.search.lock().unwrap_or_else(|p| p.into_inner());
        cache.retain(|_, (at, _)| at.elapsed() < SEARCH_TTL);
        if cache.len() >= MAX_CACHED {
            cache.clear();
        }
        cache.insert(key.to_string(), (Instant::now(), value));
    }
}

/// Largest JSON answer read from the Hub (a repository of thousands of files
/// lists in well under this).
const MAX_JSON_BYTES: usize = 16 << 20;

/// Reads a JSON answer of at most [`MAX_JSON_BYTES`]: what a server sends is not
/// held in memory beyond that, whatever it claims.
pub(crate) async fn json_body<T: serde::de::DeserializeOwned>(
    mut response: reqwest::Response,
    what: &str,
) -> Result<T, HubError> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        if body.len() + chunk.len() > MAX_JSON_BYTES {
            return Err(HubError::Upstream(format!(
                "{what}: the answer is larger than {MAX_JSON_BYTES} bytes"
            )));
        }
        body.extend_from_slice(&chunk);
    }
    serde_json::from_slice(&body)
        .map_err(|e| HubError::Upstream(format!("{what}: an unreadable answer: {e}")))
}

/// Whether `s` is a SHA-256 in hex (the Hub's LFS ETag).
pub fn is_sha256(s: &str) -> bool {
    crate::shard::manifest::is_digest_hex(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repository_ids_and_paths_are_checked() {
        assert!(is_repo_id("TheBloke/TinyLlama-1.1B-Chat-v1.0-GGUF"));
        assert!(!is_repo_id("noslash"));
        assert!(!is_repo_id("a/b/c"));
        assert!(!is_repo_id("../x"));
        assert!(!is_repo_id("a/.."));
        assert!(is_repo_path("Q4_K_M/model-00001-of-00002.gguf"));
        assert!(!is_repo_path("../etc/passwd"));
        assert!(!is_repo_path("/abs.gguf"));
        assert!(!is_repo_path("a//b.gguf"));
        assert!(!is_repo_path("a\\b.gguf"));
    }
}
