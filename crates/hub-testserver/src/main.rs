//! `swarmllm-hub-testserver [--hub-port N] [--cdn-port N] [--architecture A] OWNER/NAME=FILE.gguf …`:
//! serves local GGUF files the way the Hugging Face Hub serves them, for trying
//! `swarmllm models search|probe|pull` and the app's catalog without the Hub.
//! Point a node at it with `HF_ENDPOINT=<the printed endpoint>`.

use anyhow::{Context, anyhow};
use swarmllm_hub_testserver::{HubServer, Repo, ServedFile};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let (mut hub_port, mut cdn_port) = (0u16, 0u16);
    let mut repos: Vec<Repo> = Vec::new();
    let mut architecture: Option<String> = None;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--hub-port" => hub_port = args.next().context("--hub-port N")?.parse()?,
            "--cdn-port" => cdn_port = args.next().context("--cdn-port N")?.parse()?,
            // What search results say the repositories hold (`gguf.architecture`).
            "--architecture" => architecture = Some(args.next().context("--architecture A")?),
            spec => {
                let (repo, file) = spec
                    .split_once('=')
                    .ok_or_else(|| anyhow!("expected OWNER/NAME=FILE, got {spec}"))?;
                let path = std::path::Path::new(file);
                let name = path
                    .file_name()
                    .and_then(|n| n.to_str())
                    .ok_or_else(|| anyhow!("{file} has no file name"))?;
                let served = ServedFile::new(name, path).with_context(|| file.to_string())?;
                match repos.iter_mut().find(|r| r.id == repo) {
                    Some(r) => r.files.push(served),
                    None => repos.push(Repo::new(repo, vec![served])),
                }
            }
        }
    }
    for r in &mut repos {
        r.architecture = architecture.clone();
    }
    if repos.is_empty() {
        return Err(anyhow!(
            "usage: swarmllm-hub-testserver [--hub-port N] [--cdn-port N] [--architecture A] \
             OWNER/NAME=FILE.gguf …"
        ));
    }
    let server = HubServer::start_on(repos, hub_port, cdn_port).await?;
    println!("HF_ENDPOINT={}", server.endpoint);
    println!("cdn {}", server.cdn);
    tokio::signal::ctrl_c().await?;
    Ok(())
}
