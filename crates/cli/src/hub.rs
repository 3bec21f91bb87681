//! `swarmllm models search|probe|pull`: the Hugging Face catalog through the
//! running node (which holds the endpoint, the token and the downloads).

use anyhow::anyhow;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use serde_json::json;

use crate::client::Client;

/// `path?k=v&…` with the values URL-encoded.
fn with_query(path: &str, pairs: &[(&str, &str)]) -> String {
    let mut url = match reqwest::Url::parse(&format!("http://node{path}")) {
        Ok(u) => u,
        Err(_) => return path.to_string(),
    };
    url.query_pairs_mut().extend_pairs(pairs);
    format!("{}?{}", url.path(), url.query().unwrap_or_default())
}

fn mb(bytes: u64) -> String {
    if bytes >= 1 << 30 {
        format!("{:.1} GB", bytes as f64 / 1e9)
    } else {
        format!("{:.1} MB", bytes as f64 / 1e6)
    }
}

/// `swarmllm models search QUERY`
pub(crate) async fn search(client: &Client, query: &str, limit: u32) -> anyhow::Result<()> {
    let v = client
        .get(&with_query(
            "/api/admin/hf/search",
            &[("query", query), ("limit", &limit.to_string())],
        ))
        .await?;
    let results = v.as_array().cloned().unwrap_or_default();
    if results.is_empty() {
        println!("no GGUF repositories found for {query:?}");
        return Ok(());
    }
    for r in &results {
        println!(
            "{}  ({} downloads, {} likes{}{})",
            r["repo_id"].as_str().unwrap_or("?"),
            r["downloads"],
            r["likes"],
            r["architecture"]
                .as_str()
                .map(|a| format!(", {a}"))
                .unwrap_or_default(),
            if r["split_supported"] == true {
                ", splits across peers"
            } else {
                ""
            }
        );
        let recommended = r["recommended_file"].as_str().unwrap_or("");
        for variant in r["variants"].as_array().into_iter().flatten() {
            let file = variant["filename"].as_str().unwrap_or("?");
            println!(
                "  {} {:<9} {:>9}  {}{}",
                if file == recommended { "*" } else { " " },
                variant["quant"].as_str().unwrap_or("-"),
                mb(variant["size_bytes"].as_u64().unwrap_or(0)),
                file,
                if variant["fits_vram"] == true {
                    ""
                } else {
                    "  (too big for this machine)"
                }
            );
        }
    }
    println!("* recommended for this machine; `swarmllm models pull REPO --file FILE`");
    Ok(())
}

/// `swarmllm models probe REPO FILE`
pub(crate) async fn probe(
    client: &Client,
    repo: &str,
    file: &str,
    shards: Option<u32>,
) -> anyhow::Result<()> {
    let count = shards.map(|s| s.to_string());
    let mut q = vec![("repo_id", repo), ("filename", file)];
    if let Some(c) = &count {
        q.push(("shards", c));
    }
    let v = client.get(&with_query("/api/admin/hf/probe", &q)).await?;
    println!(
        "{repo}/{file}\n  {} · {} layers · context {} · {} · {} tensors · {} (header {} bytes)",
        v["architecture"].as_str().unwrap_or("?"),
        v["n_layers"],
        v["context_length"],
        v["quantization"].as_str().unwrap_or("?"),
        v["tensor_count"],
        mb(v["size_bytes"].as_u64().unwrap_or(0)),
        v["header_bytes"],
    );
    if v["architecture_supported"] != true {
        println!("  this architecture is served whole (it cannot be split yet)");
    }
    println!(
        "  fits this machine: {}",
        if v["fits_vram"] == true { "yes" } else { "no" }
    );
    println!(
        "  model id {} in {} shard(s):",
        v["model_id"], v["shard_count"]
    );
    for s in v["shards"].as_array().into_iter().flatten() {
        println!(
            "    shard {}: layers {:>3}..{:<3} {:>9}",
            s["index"],
            s["layer_start"],
            s["layer_end"],
            mb(s["bytes"].as_u64().unwrap_or(0))
        );
    }
    Ok(())
}

/// What to pull.
pub(crate) struct Pull<'a> {
    pub(crate) repo: &'a str,
    pub(crate) file: Option<&'a str>,
    pub(crate) shards: Option<&'a [u32]>,
    pub(crate) fair_share: bool,
    pub(crate) split: Option<u32>,
    pub(crate) id: Option<&'a str>,
    pub(crate) wait: bool,
}

/// `swarmllm models pull REPO [--file F] [--shards 1,2 | --fair-share]`
pub(crate) async fn pull(client: &Client, p: Pull<'_>) -> anyhow::Result<()> {
    let file = match p.file {
        Some(f) => f.to_string(),
        None => recommended_file(client, p.repo).await?,
    };
    let mut body = json!({ "repo_id": p.repo, "filename": file });
    if let Some(s) = p.shards {
        body["shard_indices"] = json!(s);
    }
    if p.fair_share {
        body["peer_fair_share"] = json!(true);
    }
    if let Some(n) = p.split {
        body["shards"] = json!(n);
    }
    if let Some(id) = p.id {
        body["model_id"] = json!(id);
    }
    let v = client.post("/api/admin/hf/download-shards", &body).await?;
    let model = v["model_id"].as_str().unwrap_or("?").to_string();
    let ids: Vec<String> = v["download_ids"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|i| i.as_str().map(str::to_string))
        .collect();
    println!(
        "{model}: shards {} of {} from {}/{file} ({} to fetch of a {} file{})",
        v["shard_indices"],
        v["shard_count"],
        p.repo,
        mb(v["bytes_to_fetch"].as_u64().unwrap_or(0)),
        mb(v["file_bytes"].as_u64().unwrap_or(0)),
        match v["already_local"].as_array() {
            Some(a) if !a.is_empty() => format!("; {} already here", a.len()),
            _ => String::new(),
        }
    );
    if !p.wait || ids.is_empty() {
        return Ok(());
    }
    watch(client, &ids).await?;
    println!("{model}: downloaded and verified");
    Ok(())
}

/// The recommended variant of `repo` (from the catalog).
async fn recommended_file(client: &Client, repo: &str) -> anyhow::Result<String> {
    let v = client
        .get(&with_query(
            "/api/admin/hf/search",
            &[
                ("query", repo.rsplit('/').next().unwrap_or(repo)),
                ("limit", "20"),
            ],
        ))
        .await?;
    v.as_array()
        .into_iter()
        .flatten()
        .find(|r| r["repo_id"].as_str() == Some(repo))
        .and_then(|r| r["recommended_file"].as_str().map(str::to_string))
        .ok_or_else(|| anyhow!("no GGUF variant found in {repo}; name one with --file"))
}

/// Shows a progress bar per download until all have ended.
pub(crate) async fn watch(client: &Client, ids: &[String]) -> anyhow::Result<()> {
    let bars = MultiProgress::new();
    let style = ProgressStyle::with_template(
        "shard {prefix:>3} {bar:30.cyan/blue} {bytes:>9}/{total_bytes:9} {bytes_per_sec:>11} {msg}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar());
    let mut shown: std::collections::HashMap<String, ProgressBar> = Default::default();
    let mut failed: Vec<String> = Vec::new();
    loop {
        let list = client.get("/api/admin/downloads").await?;
        let mut running = 0;
        for d in list["downloads"].as_array().into_iter().flatten() {
            let Some(did) = d["id"].as_str() else {
                continue;
            };
            if !ids.iter().any(|i| i == did) {
                continue;
            }
            let bar = shown.entry(did.to_string()).or_insert_with(|| {
                let b = bars.add(ProgressBar::new(d["bytes_total"].as_u64().unwrap_or(0)));
                b.set_style(style.clone());
                b.set_prefix(d["shard_index"].to_string());
                b
            });
            bar.set_position(d["bytes_done"].as_u64().unwrap_or(0));
            match d["status"].as_str() {
                Some("done") => bar.finish_with_message("verified"),
                Some("failed" | "cancelled") => {
                    let why = d["error"].as_str().unwrap_or("cancelled").to_string();
                    bar.abandon_with_message(why.clone());
                    if !failed.contains(&why) {
                        failed.push(why);
                    }
                }
                Some("verifying") => {
                    bar.set_message("verifying");
                    running += 1;
                }
                _ => running += 1,
            }
        }
        if running == 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(anyhow!("download failed: {}", failed.join("; ")))
    }
}
