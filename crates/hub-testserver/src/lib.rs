//! A local stand-in for the Hugging Face Hub, faithful where clients trip:
//!
//! - `GET /api/models?search=…&filter=gguf&limit=N`: search hits with downloads,
//!   likes, tags and `gguf.architecture`;
//! - `GET /api/models/{owner}/{name}[/revision/{rev}]?blobs=true`: repository info
//!   with `sha`, `gated` and siblings with sizes and LFS SHA-256s;
//! - `GET|HEAD /{owner}/{name}/resolve/{rev}/{path}`: `.gguf` files are LFS: a
//!   **302 to another origin** (the "CDN" port) carrying `X-Repo-Commit`,
//!   `X-Linked-Etag` (the SHA-256, quoted), `X-Linked-Size` and `ETag`; other files
//!   answer 200 with `ETag` and `X-Repo-Commit`;
//! - the CDN honours `Range: bytes=a-b` with 206 and `Content-Range`;
//! - errors as the Hub sends them: 404 with `X-Error-Code: RepoNotFound` or
//!   `EntryNotFound`, 401 with `X-Error-Code: GatedRepo` for a gated file without
//!   the right `Authorization: Bearer` token.
//!
//! It counts the bytes its CDN sends, notes whether a token ever reached the CDN,
//! and can be told to corrupt bytes or to throttle, so tests can prove a download
//! read only its ranges, resumed without re-reading, and caught wrong bytes.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Body;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::{Value, json};
use sha2::Digest;

/// A file served by a repository.
#[derive(Debug, Clone)]
pub struct ServedFile {
    /// Path in the repository.
    pub path: String,
    /// Where its bytes are.
    pub disk: PathBuf,
    /// Its SHA-256 (hex).
    pub sha256: String,
    /// Its size.
    pub size: u64,
}

impl ServedFile {
    /// A file from disk (hashed now).
    pub fn new(path: &str, disk: &Path) -> std::io::Result<ServedFile> {
        let mut f = std::fs::File::open(disk)?;
        let mut h = sha2::Sha256::new();
        let size = std::io::copy(&mut f, &mut h)?;
        Ok(ServedFile {
            path: path.to_string(),
            disk: disk.to_path_buf(),
            sha256: hex::encode(h.finalize()),
            size,
        })
    }
}

/// A repository.
#[derive(Debug, Clone)]
pub struct Repo {
    /// `owner/name`.
    pub id: String,
    /// Commit sha (40 hex).
    pub sha: String,
    /// Files.
    pub files: Vec<ServedFile>,
    /// Token that unlocks it; `None` for a public repository.
    pub gated_token: Option<String>,
    /// Download count.
    pub downloads: u64,
    /// Likes.
    pub likes: u64,
    /// Architecture (`gguf.architecture` and a tag).
    pub architecture: Option<String>,
}

impl Repo {
    /// A public repository with a commit derived from its id.
    pub fn new(id: &str, files: Vec<ServedFile>) -> Repo {
        let sha = hex::encode(&sha2::Sha256::digest(id.as_bytes())[..20]);
        Repo {
            id: id.to_string(),
            sha,
            files,
            gated_token: None,
            downloads: 1000,
            likes: 10,
            architecture: None,
        }
    }
}

/// What the server saw and how it misbehaves.
#[derive(Debug)]
pub struct Stats {
    /// Body bytes the CDN sent.
    pub cdn_bytes: AtomicU64,
    /// Range requests the CDN answered.
    pub cdn_requests: AtomicU64,
    /// Hub (non-CDN) requests.
    pub hub_requests: AtomicU64,
    /// Whether an `Authorization` header ever reached the CDN.
    pub cdn_saw_token: AtomicBool,
    /// Flip the byte at this file offset whenever the CDN sends it (`u64::MAX`, the
    /// default: never), so a test can spoil the weights but not the header.
    pub corrupt_at: AtomicU64,
    /// Pause (µs) after each 64 KiB the CDN sends (0: full speed).
    pub throttle_us_per_64k: AtomicU64,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            cdn_bytes: AtomicU64::new(0),
            cdn_requests: AtomicU64::new(0),
            hub_requests: AtomicU64::new(0),
            cdn_saw_token: AtomicBool::new(false),
            corrupt_at: AtomicU64::new(u64::MAX),
            throttle_us_per_64k: AtomicU64::new(0),
        }
    }
}

struct Shared {
    repos: Mutex<Vec<Repo>>,
    cdn_base: String,
    stats: Arc<Stats>,
}

/// A running server (stops when dropped with its runtime).
pub struct HubServer {
    /// `http://127.0.0.1:PORT` of the Hub.
    pub endpoint: String,
    /// `http://127.0.0.1:PORT` of its CDN.
    pub cdn: String,
    /// Counters and knobs.
    pub stats: Arc<Stats>,
    shared: Arc<Shared>,
    _runtime: Option<tokio::runtime::Runtime>,
}

impl HubServer {
    /// Starts a server on two free loopback ports on its own runtime thread.
    pub fn start(repos: Vec<Repo>) -> std::io::Result<HubServer> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let mut server = runtime.block_on(Self::start_on(repos, 0, 0))?;
        server._runtime = Some(runtime);
        Ok(server)
    }

    /// Starts on the current runtime (ports 0: any free port).
    pub async fn start_on(
        repos: Vec<Repo>,
        hub_port: u16,
        cdn_port: u16,
    ) -> std::io::Result<HubServer> {
        let hub = tokio::net::TcpListener::bind(("127.0.0.1", hub_port)).await?;
        let cdn = tokio::net::TcpListener::bind(("127.0.0.1", cdn_port)).await?;
        let hub_addr: SocketAddr = hub.local_addr()?;
        let cdn_addr: SocketAddr = cdn.local_addr()?;
        let stats = Arc::new(Stats::default());
        let shared = Arc::new(Shared {
            repos: Mutex::new(repos),
            cdn_base: format!("http://{cdn_addr}"),
            stats: stats.clone(),
        });
        let hub_app = Router::new()
            .route("/api/models", get(search))
            .route("/api/models/{owner}/{name}", get(info))
            .route("/api/models/{owner}/{name}/revision/{rev}", get(info_rev))
            .route(
                "/{owner}/{name}/resolve/{rev}/{*path}",
                get(resolve).head(resolve),
            )
            .with_state(shared.clone());
        let cdn_app = Router::new()
            .route("/blob/{sha}", get(blob).head(blob))
            .with_state(shared.clone());
        tokio::spawn(async move {
            let _ = axum::serve(hub, hub_app).await;
        });
        tokio::spawn(async move {
            let _ = axum::serve(cdn, cdn_app).await;
        });
        Ok(HubServer {
            endpoint: format!("http://{hub_addr}"),
            cdn: format!("http://{cdn_addr}"),
            stats,
            shared,
            _runtime: None,
        })
    }

    /// Adds a repository.
    pub fn add_repo(&self, repo: Repo) {
        self.shared
            .repos
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(repo);
    }

    /// Body bytes the CDN has sent so far.
    pub fn cdn_bytes(&self) -> u64 {
        self.stats.cdn_bytes.load(Ordering::SeqCst)
    }
}

fn error(status: StatusCode, code: &str, message: &str) -> Response {
    let mut r = (status, axum::Json(json!({ "error": message }))).into_response();
    if let Ok(v) = HeaderValue::from_str(code) {
        r.headers_mut().insert("x-error-code", v);
    }
    r
}

fn find_repo(shared: &Shared, id: &str) -> Option<Repo> {
    shared
        .repos
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .find(|r| r.id == id)
        .cloned()
}

async fn search(
    State(s): State<Arc<Shared>>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    s.stats.hub_requests.fetch_add(1, Ordering::SeqCst);
    let needle = q.get("search").cloned().unwrap_or_default().to_lowercase();
    let words: Vec<&str> = needle.split_whitespace().collect();
    let limit: usize = q.get("limit").and_then(|l| l.parse().ok()).unwrap_or(20);
    let gguf_only = q.get("filter").map(String::as_str) == Some("gguf");
    let mut hits: Vec<Repo> = s
        .repos
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .filter(|r| words.iter().all(|w| r.id.to_lowercase().contains(w)))
        .filter(|r| !gguf_only || r.files.iter().any(|f| f.path.ends_with(".gguf")))
        .cloned()
        .collect();
    hits.sort_by_key(|r| std::cmp::Reverse(r.downloads));
    let out: Vec<Value> = hits
        .iter()
        .take(limit)
        .map(|r| {
            let mut tags = vec![json!("gguf")];
            if let Some(a) = &r.architecture {
                tags.push(json!(a));
            }
            json!({
                "_id": r.sha, "id": r.id, "modelId": r.id,
                "downloads": r.downloads, "likes": r.likes, "tags": tags,
                "library_name": "gguf", "private": false,
                "lastModified": "2026-11-01T00:00:00.000Z",
                "gguf": r.architecture.as_ref().map(|a| json!({ "architecture": a })),
            })
        })
        .collect();
    axum::Json(out).into_response()
}

async fn info(
    State(s): State<Arc<Shared>>,
    UrlPath((owner, name)): UrlPath<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    info_of(&s, &format!("{owner}/{name}"), &q)
}

async fn info_rev(
    State(s): State<Arc<Shared>>,
    UrlPath((owner, name, _rev)): UrlPath<(String, String, String)>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    info_of(&s, &format!("{owner}/{name}"), &q)
}

fn info_of(s: &Shared, id: &str, q: &HashMap<String, String>) -> Response {
    s.stats.hub_requests.fetch_add(1, Ordering::SeqCst);
    let Some(repo) = find_repo(s, id) else {
        return error(
            StatusCode::NOT_FOUND,
            "RepoNotFound",
            "Repository not found",
        );
    };
    let blobs = q.get("blobs").map(String::as_str) == Some("true");
    let siblings: Vec<Value> = repo
        .files
        .iter()
        .map(|f| {
            if blobs {
                let lfs = f.path.ends_with(".gguf");
                json!({
                    "rfilename": f.path,
                    "size": f.size,
                    "blobId": &f.sha256[..40],
                    "lfs": if lfs { json!({ "sha256": f.sha256, "size": f.size, "pointerSize": 135 }) } else { Value::Null },
                })
            } else {
                json!({ "rfilename": f.path })
            }
        })
        .collect();
    axum::Json(json!({
        "_id": repo.sha, "id": repo.id, "modelId": repo.id, "sha": repo.sha,
        "private": false,
        "gated": if repo.gated_token.is_some() { json!("manual") } else { json!(false) },
        "downloads": repo.downloads, "likes": repo.likes,
        "tags": ["gguf"], "siblings": siblings,
    }))
    .into_response()
}

fn authorized(repo: &Repo, headers: &HeaderMap) -> bool {
    match &repo.gated_token {
        None => true,
        Some(token) => headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v == format!("Bearer {token}")),
    }
}

async fn resolve(
    State(s): State<Arc<Shared>>,
    UrlPath((owner, name, _rev, path)): UrlPath<(String, String, String, String)>,
    method: Method,
    headers: HeaderMap,
) -> Response {
    s.stats.hub_requests.fetch_add(1, Ordering::SeqCst);
    let Some(repo) = find_repo(&s, &format!("{owner}/{name}")) else {
        return error(
            StatusCode::NOT_FOUND,
            "RepoNotFound",
            "Repository not found",
        );
    };
    let Some(file) = repo.files.iter().find(|f| f.path == path) else {
        return error(StatusCode::NOT_FOUND, "EntryNotFound", "Entry not found");
    };
    if !authorized(&repo, &headers) {
        return error(
            StatusCode::UNAUTHORIZED,
            "GatedRepo",
            "Access to this model is restricted: you must be authenticated",
        );
    }
    let quoted = |v: &str| HeaderValue::from_str(&format!("\"{v}\"")).ok();
    if file.path.ends_with(".gguf") {
        // LFS: redirect to the CDN, on another origin, with what the file is.
        let location = format!("{}/blob/{}?expires=3600", s.cdn_base, file.sha256);
        let mut r = StatusCode::FOUND.into_response();
        let h = r.headers_mut();
        if let Ok(v) = HeaderValue::from_str(&location) {
            h.insert(header::LOCATION, v);
        }
        if let Ok(v) = HeaderValue::from_str(&repo.sha) {
            h.insert("x-repo-commit", v);
        }
        if let Some(v) = quoted(&file.sha256) {
            h.insert("x-linked-etag", v.clone());
            h.insert(header::ETAG, v);
        }
        h.insert("x-linked-size", HeaderValue::from(file.size));
        return r;
    }
    let mut r = serve_range(&s, file, &method, &headers, false).await;
    if let Ok(v) = HeaderValue::from_str(&repo.sha) {
        r.headers_mut().insert("x-repo-commit", v);
    }
    if let Some(v) = quoted(&file.sha256) {
        r.headers_mut().insert(header::ETAG, v);
    }
    r
}

async fn blob(
    State(s): State<Arc<Shared>>,
    UrlPath(sha): UrlPath<String>,
    method: Method,
    headers: HeaderMap,
) -> Response {
    if headers.contains_key(header::AUTHORIZATION) {
        s.stats.cdn_saw_token.store(true, Ordering::SeqCst);
    }
    let file = s
        .repos
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .flat_map(|r| r.files.iter())
        .find(|f| f.sha256 == sha)
        .cloned();
    let Some(file) = file else {
        return error(StatusCode::NOT_FOUND, "EntryNotFound", "no such blob");
    };
    serve_range(&s, &file, &method, &headers, true).await
}

/// `bytes=a-b` (or `a-`) within `size`.
fn parse_range(headers: &HeaderMap, size: u64) -> Option<Result<(u64, u64), ()>> {
    let v = headers.get(header::RANGE)?.to_str().ok()?;
    let spec = v.strip_prefix("bytes=")?;
    let (a, b) = spec.split_once('-')?;
    let start: u64 = a.parse().ok()?;
    let end: u64 = if b.is_empty() {
        size.saturating_sub(1)
    } else {
        b.parse().ok()?
    };
    Some(if start > end || start >= size {
        Err(())
    } else {
        Ok((start, end.min(size - 1)))
    })
}

async fn serve_range(
    s: &Shared,
    file: &ServedFile,
    method: &Method,
    headers: &HeaderMap,
    cdn: bool,
) -> Response {
    let (status, start, end) = match parse_range(headers, file.size) {
        None => (StatusCode::OK, 0, file.size.saturating_sub(1)),
        Some(Ok((a, b))) => (StatusCode::PARTIAL_CONTENT, a, b),
        Some(Err(())) => {
            let mut r = StatusCode::RANGE_NOT_SATISFIABLE.into_response();
            if let Ok(v) = HeaderValue::from_str(&format!("bytes */{}", file.size)) {
                r.headers_mut().insert(header::CONTENT_RANGE, v);
            }
            return r;
        }
    };
    let len = if file.size == 0 { 0 } else { end - start + 1 };
    let mut builder = Response::builder()
        .status(status)
        .header(header::ACCEPT_RANGES, "bytes")
        .header(header::CONTENT_LENGTH, len);
    if status == StatusCode::PARTIAL_CONTENT {
        builder = builder.header(
            header::CONTENT_RANGE,
            format!("bytes {start}-{end}/{}", file.size),
        );
    }
    if method == Method::HEAD {
        return builder.body(Body::empty()).unwrap_or_default();
    }
    if cdn {
        s.stats.cdn_requests.fetch_add(1, Ordering::SeqCst);
    }
    let stats = s.stats.clone();
    let disk = file.disk.clone();
    let corrupt_at = if cdn {
        stats.corrupt_at.load(Ordering::SeqCst)
    } else {
        u64::MAX
    };
    let throttle = stats.throttle_us_per_64k.load(Ordering::SeqCst);
    // Stream 64 KiB pieces straight from the file, counting what is sent.
    let stream = futures::stream::unfold(start, move |at| {
        let disk = disk.clone();
        let stats = stats.clone();
        async move {
            if at > end || len == 0 {
                return None;
            }
            let n = (end + 1 - at).min(64 << 10);
            let mut buf = tokio::task::spawn_blocking(move || -> std::io::Result<Vec<u8>> {
                use std::io::{Read, Seek, SeekFrom};
                let mut f = std::fs::File::open(disk)?;
                f.seek(SeekFrom::Start(at))?;
                let mut b = vec![0u8; n as usize];
                f.read_exact(&mut b)?;
                Ok(b)
            })
            .await
            .ok()?
            .ok()?;
            if (at..at + n).contains(&corrupt_at)
                && let Some(b) = buf.get_mut((corrupt_at - at) as usize)
            {
                *b ^= 0xff;
            }
            if throttle > 0 {
                tokio::time::sleep(std::time::Duration::from_micros(throttle)).await;
            }
            if cdn {
                stats.cdn_bytes.fetch_add(n, Ordering::SeqCst);
            }
            Some((Ok::<_, std::io::Error>(buf), at + n))
        }
    });
    builder.body(Body::from_stream(stream)).unwrap_or_default()
}
