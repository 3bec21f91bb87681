//! The web UI (`ui/` at the repository root), compiled into the binary and served
//! at `http://127.0.0.1:8800/` — the same files the desktop app shows.

use super::extract::Path;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::error::ApiError;

/// (path, content type, bytes) of every UI file.
const FILES: &[(&str, &str, &[u8])] = &[
    (
        "index.html",
        "text/html; charset=utf-8",
        include_bytes!("../../../../ui/index.html"),
    ),
    (
        "style.css",
        "text/css; charset=utf-8",
        include_bytes!("../../../../ui/style.css"),
    ),
    (
        "client.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../../../ui/client.js"),
    ),
    (
        "app.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../../../ui/app.js"),
    ),
    (
        "icon.svg",
        "image/svg+xml",
        include_bytes!("../../../../ui/icon.svg"),
    ),
];

/// Pages may load only their own files and talk only to this node.
const CSP: &str = "default-src 'self'; connect-src 'self' ws://127.0.0.1:* ws://localhost:*; \
    img-src 'self' data: blob:; media-src 'self' blob: mediastream:; style-src 'self'; \
    script-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'";

fn file(name: &str) -> Result<Response, ApiError> {
    let (_, mime, bytes) = FILES
        .iter()
        .find(|(n, ..)| *n == name)
        .ok_or_else(|| ApiError::not_found(format!("no UI file {name}")))?;
    let mut response = (StatusCode::OK, *bytes).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(mime));
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    Ok(response)
}

/// `GET /`.
pub(crate) async fn index() -> Result<Response, ApiError> {
    file("index.html")
}

/// `GET /{file}` for the UI's scripts, styles and icon.
pub(crate) async fn asset(Path(name): Path<String>) -> Result<Response, ApiError> {
    file(&name)
}

/// The web UI the node serves. Each route is declared read (public) or write (needs the key) here.
pub(super) fn routes() -> super::routes::Routes {
    use axum::http::Method;
    super::routes::Routes::default()
        .read(Method::GET, "/", index)
        .read(Method::GET, "/{file}", asset)
}
