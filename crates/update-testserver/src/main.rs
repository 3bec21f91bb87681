//! `swarmllm-update-testserver --version V --payload FILE [--port N]`: a local
//! update server that speaks the Tauri updater's protocol, for tests of the
//! desktop app's updates (the real server is outside our control).
//!
//! - `GET /{target}/{arch}/{current_version}` answers the release manifest
//!   (`version`, `notes`, `pub_date`, `platforms["{target}-{arch}"]` with `url`
//!   and `signature`) when version `V` is newer than `current_version`, else
//!   204 No Content, as a dynamic Tauri update server does.
//! - `GET /download/{file}` serves the artifact (`FILE`).
//! - The artifact is signed with a minisign key made at start, the way `tauri
//!   signer sign` does: the `signature` is the base64 of the minisign signature
//!   file, whose trusted comment carries `version:V`.
//! - `POST /_control {"mode": M}` switches what it serves, so one server covers
//!   every case: `good`, `none` (always 204), `tampered` (a byte of the artifact
//!   flipped after signing), `unsigned` (an empty signature), `wrong-key` (signed
//!   by another key), `downgrade` (a genuine signature of an older version
//!   offered as `V`). `GET /_control` reports the mode and what was served.
//!
//! At start it prints one JSON line: `endpoint` (with the updater's
//! `{{target}}`, `{{arch}}` and `{{current_version}}` placeholders), `pubkey`
//! (base64 of the minisign public key, the updater's `pubkey`) and `control`.

use std::sync::{Arc, Mutex};

use anyhow::{Context, anyhow};
use axum::Json;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use base64::Engine;
use serde_json::{Value, json};

const ARTIFACT: &str = "SwarmLLM.AppImage";

struct Served {
    mode: String,
    manifests: u64,
    downloads: u64,
}

struct Server {
    version: String,
    base: String,
    payload: Vec<u8>,
    /// `signature` for the genuine artifact at `version`.
    signature: String,
    /// The same artifact signed by a key the app does not trust.
    foreign_signature: String,
    /// The artifact signed as an older version.
    old_signature: String,
    served: Mutex<Served>,
}

/// The updater's `signature`: base64 of the minisign signature file.
fn sign(kp: &minisign::KeyPair, data: &[u8], version: &str) -> anyhow::Result<String> {
    let trusted = format!("timestamp:0\tfile:{ARTIFACT}\tversion:{version}");
    let sig = minisign::sign(
        Some(&kp.pk),
        &kp.sk,
        std::io::Cursor::new(data),
        Some(&trusted),
        Some("signature from the SwarmLLM update test server"),
    )
    .map_err(|e| anyhow!("signing: {e}"))?;
    Ok(base64::engine::general_purpose::STANDARD.encode(sig.into_string()))
}

/// Whether dotted version `a` is newer than `b` (numeric parts; anything else
/// compares as text).
fn newer(a: &str, b: &str) -> bool {
    let parts = |v: &str| -> Vec<u64> {
        v.trim_start_matches('v')
            .split(['.', '-', '+'])
            .map_while(|p| p.parse().ok())
            .collect()
    };
    parts(a) > parts(b)
}

async fn manifest(
    State(s): State<Arc<Server>>,
    Path((target, arch, current)): Path<(String, String, String)>,
) -> Response {
    let mode = {
        let mut served = s.served.lock().unwrap_or_else(|p| p.into_inner());
        served.manifests += 1;
        served.mode.clone()
    };
    if mode == "none" || !newer(&s.version, &current) {
        return StatusCode::NO_CONTENT.into_response();
    }
    let signature = match mode.as_str() {
        "unsigned" => String::new(),
        "wrong-key" => s.foreign_signature.clone(),
        "downgrade" => s.old_signature.clone(),
        _ => s.signature.clone(),
    };
    Json(json!({
        "version": s.version,
        "notes": format!("SwarmLLM {}: faster pipelines and a calmer tray.", s.version),
        "pub_date": "2026-12-01T00:00:00Z",
        "platforms": {
            format!("{target}-{arch}"): {
                "url": format!("{}/download/{ARTIFACT}", s.base),
                "signature": signature,
            }
        }
    }))
    .into_response()
}

async fn download(State(s): State<Arc<Server>>, Path(file): Path<String>) -> Response {
    if file != ARTIFACT {
        return StatusCode::NOT_FOUND.into_response();
    }
    let mode = {
        let mut served = s.served.lock().unwrap_or_else(|p| p.into_inner());
        served.downloads += 1;
        served.mode.clone()
    };
    let mut body = s.payload.clone();
    if mode == "tampered"
        && let Some(b) = body.last_mut()
    {
        *b ^= 0x01;
    }
    ([(header::CONTENT_TYPE, "application/octet-stream")], body).into_response()
}

async fn control_get(State(s): State<Arc<Server>>) -> Json<Value> {
    let served = s.served.lock().unwrap_or_else(|p| p.into_inner());
    Json(json!({
        "mode": served.mode,
        "manifests_served": served.manifests,
        "downloads": served.downloads,
        "version": s.version,
    }))
}

async fn control_set(State(s): State<Arc<Server>>, Json(body): Json<Value>) -> Response {
    const MODES: [&str; 6] = [
        "good",
        "none",
        "tampered",
        "unsigned",
        "wrong-key",
        "downgrade",
    ];
    match body["mode"].as_str() {
        Some(m) if MODES.contains(&m) => {
            s.served.lock().unwrap_or_else(|p| p.into_inner()).mode = m.to_string();
            Json(json!({ "mode": m })).into_response()
        }
        _ => (
            StatusCode::BAD_REQUEST,
            Json(json!({ "error": format!("mode must be one of {MODES:?}") })),
        )
            .into_response(),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let (mut port, mut version, mut payload) = (0u16, None, None);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--port" => port = args.next().context("--port N")?.parse()?,
            "--version" => version = Some(args.next().context("--version V")?),
            "--payload" => payload = Some(args.next().context("--payload FILE")?),
            other => return Err(anyhow!("unknown argument {other}")),
        }
    }
    let (Some(version), Some(payload)) = (version, payload) else {
        return Err(anyhow!(
            "usage: swarmllm-update-testserver --version V --payload FILE [--port N]"
        ));
    };
    let payload = std::fs::read(&payload).with_context(|| payload.clone())?;
    let key = minisign::KeyPair::generate_unencrypted_keypair().map_err(|e| anyhow!("{e}"))?;
    let foreign = minisign::KeyPair::generate_unencrypted_keypair().map_err(|e| anyhow!("{e}"))?;
    let pubkey = key.pk.to_box().map_err(|e| anyhow!("{e}"))?.into_string();
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    let base = format!("http://{}", listener.local_addr()?);
    let server = Arc::new(Server {
        signature: sign(&key, &payload, &version)?,
        foreign_signature: sign(&foreign, &payload, &version)?,
        old_signature: sign(&key, &payload, "0.0.1")?,
        version,
        base: base.clone(),
        payload,
        served: Mutex::new(Served {
            mode: "good".into(),
            manifests: 0,
            downloads: 0,
        }),
    });
    let app = axum::Router::new()
        .route("/_control", get(control_get).post(control_set))
        .route("/download/{file}", get(download))
        .route("/{target}/{arch}/{current}", get(manifest))
        .with_state(server);
    println!(
        "{}",
        json!({
            "endpoint": format!("{base}/{{{{target}}}}/{{{{arch}}}}/{{{{current_version}}}}"),
            "pubkey": base64::engine::general_purpose::STANDARD.encode(pubkey),
            "control": format!("{base}/_control"),
        })
    );
    axum::serve(listener, app).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_compare_by_number() {
        assert!(newer("0.2.0", "0.1.9"));
        assert!(newer("0.10.0", "0.9.0"));
        assert!(!newer("0.1.0", "0.1.0"));
        assert!(!newer("0.1.0", "0.2.0"));
    }
}
