//! `serve`, `status`, `models list`, `config get|set`.

use std::path::PathBuf;

use anyhow::{Context, anyhow};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{Map, Value, json};
use swarmllm_node::config::ConfigSource;
use swarmllm_node::{Node, NodeOptions};

use crate::client::Client;

#[derive(Debug, Args)]
pub(crate) struct ServeArgs {
    /// GGUF model to serve.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Id to serve the model under (default: the file name without `.gguf`).
    #[arg(long)]
    model_id: Option<String>,
    /// Peer-to-peer port (default 8801).
    #[arg(long)]
    p2p_port: Option<u16>,
    /// Address for the HTTP API (default 127.0.0.1).
    #[arg(long)]
    api_host: Option<String>,
    /// Inference threads (default: all cores).
    #[arg(long)]
    threads: Option<u32>,
    /// Layers to offload to the GPU: `auto` (the default: as many as fit in
    /// free GPU memory, none without a GPU) or a count (0 = CPU only).
    #[arg(long)]
    gpu_layers: Option<String>,
    /// Context window in tokens (default 4096).
    #[arg(long)]
    context_size: Option<u32>,
    /// Address the P2P layer listens on (default 0.0.0.0).
    #[arg(long)]
    p2p_host: Option<String>,
    /// A network code (`swarm://…`) or multiaddr to join at start; repeatable.
    #[arg(long)]
    bootstrap: Vec<String>,
    /// Turn off local-network discovery (mDNS).
    #[arg(long)]
    no_mdns: bool,
    /// Run without the P2P layer (a local-only node).
    #[arg(long)]
    no_p2p: bool,
}

impl ServeArgs {
    pub(crate) fn overrides(&self) -> Map<String, Value> {
        let mut m = Map::new();
        if let Some(p) = &self.model {
            // Store absolute paths so a later `cd` does not lose the model.
            let abs = std::path::absolute(p).unwrap_or_else(|_| p.clone());
            m.insert("model".into(), json!(abs.to_string_lossy()));
        }
        if let Some(v) = &self.model_id {
            m.insert("model_id".into(), json!(v));
        }
        if let Some(v) = self.p2p_port {
            m.insert("p2p_port".into(), json!(v));
        }
        if let Some(v) = &self.api_host {
            m.insert("api_host".into(), json!(v));
        }
        if let Some(v) = self.threads {
            m.insert("threads".into(), json!(v));
        }
        if let Some(v) = &self.gpu_layers {
            m.insert("gpu_layers".into(), json!(v));
        }
        if let Some(v) = self.context_size {
            m.insert("context_size".into(), json!(v));
        }
        if let Some(v) = &self.p2p_host {
            m.insert("p2p_host".into(), json!(v));
        }
        if !self.bootstrap.is_empty() {
            m.insert("bootstrap".into(), json!(self.bootstrap));
        }
        if self.no_mdns {
            m.insert("mdns".into(), json!(false));
        }
        if self.no_p2p {
            m.insert("p2p_enabled".into(), json!(false));
        }
        m
    }
}

/// `swarmllm serve`
pub(crate) async fn serve(source: ConfigSource, _args: &ServeArgs) -> anyhow::Result<()> {
    let config = crate::load_config(&source)?;
    swarmllm_node::logging::init(&config.log_format, &config.log_level);

    let bar = ProgressBar::new(100);
    bar.set_style(
        ProgressStyle::with_template("loading model {bar:40.cyan/blue} {pos:>3}%")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    if config.model.is_empty() {
        bar.finish_and_clear();
    }
    let progress_bar = bar.clone();
    let node = Node::start(NodeOptions {
        config: source,
        load_progress: Some(Box::new(move |p| {
            progress_bar.set_position((p * 100.0) as u64)
        })),
    })
    .await
    .context("starting the node")?;
    bar.finish_and_clear();

    let config = node.config();
    let addr = format!("{}:{}", config.api_host, config.api_port);
    let listener = tokio::net::TcpListener::bind(&addr).await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::AddrInUse {
            anyhow!("cannot listen on {addr}: the port is in use (another node running? pick one with --api-port)")
        } else {
            anyhow!("cannot listen on {addr}: {e}")
        }
    })?;
    let bound = listener.local_addr()?;
    tracing::info!(
        node_id = %node.node_id(),
        model = node.engine().map(|e| e.info().id.as_str()).unwrap_or("none"),
        "API listening on http://{bound}"
    );

    let ctrl_c_node = node.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            ctrl_c_node.request_shutdown();
        }
    });
    #[cfg(unix)]
    {
        let term_node = node.clone();
        if let Ok(mut term) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            tokio::spawn(async move {
                term.recv().await;
                term_node.request_shutdown();
            });
        }
    }
    swarmllm_node::api::serve(node.clone(), listener)
        .await
        .context("serving the API")?;
    if !node.stop(std::time::Duration::from_secs(10)).await {
        tracing::warn!("some background tasks did not end within 10 s");
    }
    tracing::info!("node stopped");
    Ok(())
}

/// `swarmllm status`
pub(crate) async fn status(client: &Client, raw: bool) -> anyhow::Result<()> {
    let s = client.get("/api/admin/stats").await?;
    if raw {
        println!("{}", serde_json::to_string_pretty(&s)?);
        return Ok(());
    }
    let gib = |b: &Value| b.as_u64().unwrap_or(0) as f64 / (1u64 << 30) as f64;
    println!("node       {}", s["node_id"].as_str().unwrap_or("?"));
    if let Some(n) = s["nickname"].as_str() {
        println!("nickname   {n}");
    }
    println!("api        {}", client.base);
    println!("version    {}", s["version"].as_str().unwrap_or("?"));
    println!("uptime     {}s", s["uptime_seconds"]);
    match s["model"].as_object() {
        Some(m) => println!(
            "model      {} ({}, {} layers, {} params)",
            m["id"].as_str().unwrap_or("?"),
            m["architecture"].as_str().unwrap_or("?"),
            m["n_layers"],
            m["n_params"]
        ),
        None => println!("model      none loaded"),
    }
    let hw = &s["hardware"];
    println!(
        "hardware   {} ({} threads), {:.1}/{:.1} GiB RAM, {}",
        hw["cpu_model"].as_str().unwrap_or("?"),
        hw["cpu_threads"],
        gib(&hw["ram_used"]),
        gib(&hw["ram_total"]),
        hw["os"].as_str().unwrap_or("?")
    );
    if let Some(gpus) = hw["gpus"].as_array().filter(|g| !g.is_empty()) {
        for g in gpus {
            println!(
                "gpu        {} ({:.1} GiB)",
                g["description"].as_str().unwrap_or("?"),
                gib(&g["memory_total"])
            );
        }
    }
    let inf = &s["inference"];
    println!(
        "requests   {} total, {} tokens generated, queue {}",
        inf["requests_total"], inf["tokens_generated"], s["queue_depth"]
    );
    Ok(())
}

/// `swarmllm models list`: what the running node serves, then the sharded models
/// in the data dir (listed even when no node runs).
pub(crate) async fn models_list(
    client: &Client,
    config: &swarmllm_node::config::Config,
) -> anyhow::Result<()> {
    let imported = imported_models(config);
    let models = match client.get("/v1/models").await {
        Ok(m) => m,
        Err(e) if imported.is_empty() => return Err(e),
        Err(_) => {
            eprintln!(
                "(no node running at {}; showing imported models only)",
                client.base
            );
            serde_json::json!({ "data": [] })
        }
    };
    if !imported.is_empty() {
        println!(
            "{:<40} {:<10} {:>7} {:>7}  DIR",
            "IMPORTED", "ARCH", "LAYERS", "SHARDS"
        );
        for (dir, m) in &imported {
            println!(
                "{:<40} {:<10} {:>7} {:>7}  {}",
                m.model_id,
                m.architecture,
                m.n_layers,
                m.shards.len(),
                dir.display()
            );
        }
    }
    let data = models["data"].as_array().cloned().unwrap_or_default();
    if data.is_empty() {
        if imported.is_empty() {
            println!("no models loaded (start the node with --model PATH)");
        }
        return Ok(());
    }
    println!(
        "{:<40} {:<10} {:>12} {:>8}",
        "ID", "ARCH", "PARAMS", "CONTEXT"
    );
    for m in data {
        println!(
            "{:<40} {:<10} {:>12} {:>8}",
            m["id"].as_str().unwrap_or("?"),
            m["meta"]["architecture"].as_str().unwrap_or("?"),
            m["meta"]["n_params"],
            m["meta"]["context_size"]
        );
    }
    Ok(())
}

fn print_config(config: &Map<String, Value>, key: Option<&str>) -> anyhow::Result<()> {
    match key {
        Some(k) => {
            let v = config
                .get(k)
                .ok_or_else(|| anyhow!("unknown configuration key '{k}'"))?;
            match v {
                Value::String(s) => println!("{s}"),
                other => println!("{other}"),
            }
        }
        None => {
            for (k, v) in config {
                println!("{k} = {v}");
            }
        }
    }
    Ok(())
}

/// `swarmllm config get [KEY]`: from the running node, else from the file.
pub(crate) async fn config_get(source: &ConfigSource, key: Option<&str>) -> anyhow::Result<()> {
    let client = Client::connect(source)?;
    if client.is_running().await {
        let Value::Object(config) = client.get("/api/admin/config").await? else {
            return Err(anyhow!(
                "the node answered with something other than a config object"
            ));
        };
        return print_config(&config, key);
    }
    print_config(&crate::load_config(source)?.to_json(), key)
}

/// `swarmllm config set KEY VALUE`: through the running node (applied live where
/// possible), else straight into the config file.
pub(crate) async fn config_set(source: &ConfigSource, key: &str, raw: &str) -> anyhow::Result<()> {
    let current = crate::load_config(source)?;
    let value = current.coerce(key, raw)?;
    let mut change = Map::new();
    change.insert(key.to_string(), value);
    let client = Client::connect(source)?;
    if client.is_running().await {
        let resp = client
            .put("/api/admin/config", &Value::Object(change))
            .await?;
        let restart = resp["restart_required"]
            .as_array()
            .is_some_and(|a| !a.is_empty());
        println!(
            "{key} updated on the running node{}",
            if restart {
                " (takes effect after a restart)"
            } else {
                ""
            }
        );
        return Ok(());
    }
    current.patched(&change)?;
    source.persist(&change)?;
    println!("{key} written to {}", source.path.display());
    Ok(())
}

/// `swarmllm api-key`: read from the node's secret store on this machine.
pub(crate) fn api_key(source: &ConfigSource) -> anyhow::Result<()> {
    let config = crate::load_config(source)?;
    let data_dir = config.data_dir_path();
    let key = swarmllm_node::identity::read_api_key(&data_dir, &config.secret_store)?.ok_or_else(
        || {
            anyhow!(
                "no API key yet in {}: start the node once with `swarmllm serve`",
                data_dir.display()
            )
        },
    )?;
    println!("{}", key.as_str());
    Ok(())
}

/// `swarmllm ui`: the web UI's address with the API key in the fragment (which a
/// browser never sends to the server; the page keeps it in its local storage).
pub(crate) fn ui_url(source: &ConfigSource) -> anyhow::Result<()> {
    let config = crate::load_config(source)?;
    let data_dir = config.data_dir_path();
    let key = swarmllm_node::identity::read_api_key(&data_dir, &config.secret_store)?
        .ok_or_else(|| anyhow!("no API key yet: start the node once with `swarmllm serve`"))?;
    let host = if config.api_host == "0.0.0.0" {
        "127.0.0.1"
    } else {
        config.api_host.as_str()
    };
    println!("http://{host}:{}/#key={}", config.api_port, key.as_str());
    Ok(())
}

/// `swarmllm peers`
pub(crate) async fn peers(client: &Client, raw: bool) -> anyhow::Result<()> {
    let v = client.get("/api/admin/peers").await?;
    if raw {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let peers = v["peers"].as_array().cloned().unwrap_or_default();
    if peers.is_empty() {
        println!("no peers known yet (join one with `swarmllm network join CODE`)");
        return Ok(());
    }
    println!(
        "{:<18} {:<16} {:<8} {:>9} {:>6}  {:<8} MODELS",
        "NODE", "NICKNAME", "REGION", "LATENCY", "TRUST", "STATE"
    );
    for p in peers {
        let id = p["node_id"].as_str().unwrap_or("?");
        let models: Vec<&str> = p["models"]
            .as_array()
            .map(|m| m.iter().filter_map(|m| m["id"].as_str()).collect())
            .unwrap_or_default();
        println!(
            "{:<18} {:<16} {:<8} {:>9} {:>6}  {:<8} {}",
            &id[..id.len().min(16)],
            p["nickname"].as_str().unwrap_or("-"),
            p["region"].as_str().unwrap_or("-"),
            p["latency_ms"]
                .as_f64()
                .map(|l| format!("{l:.1} ms"))
                .unwrap_or_else(|| "-".into()),
            p["trust_score"],
            if p["connected"].as_bool() == Some(true) {
                "online"
            } else {
                "offline"
            },
            models.join(",")
        );
    }
    Ok(())
}

/// `swarmllm network code`
pub(crate) async fn network_code(client: &Client) -> anyhow::Result<()> {
    let v = client.get("/api/admin/network-code").await?;
    println!("{}", v["code"].as_str().unwrap_or_default());
    eprintln!("phase: {}", v["phase"].as_str().unwrap_or("?"));
    Ok(())
}

/// `swarmllm network join CODE`
pub(crate) async fn network_join(client: &Client, code: &str) -> anyhow::Result<()> {
    let body = if code.trim().starts_with("swarm://") {
        json!({ "code": code })
    } else {
        json!({ "address": code })
    };
    let v = client.post("/api/admin/join-network", &body).await?;
    println!("connected to {}", v["node_id"].as_str().unwrap_or("?"));
    Ok(())
}

/// `swarmllm update check`
pub(crate) async fn update_check(client: &Client) -> anyhow::Result<()> {
    let v = client.post("/api/admin/update/check", &json!({})).await?;
    let current = v["current_version"].as_str().unwrap_or("?");
    if v["update_available"] == true {
        println!(
            "SwarmLLM {} is available (running {current})",
            v["version"].as_str().unwrap_or("?")
        );
        if let Some(notes) = v["changelog"].as_str() {
            println!("{notes}");
        }
        println!("install it with: swarmllm update apply");
    } else {
        println!("up to date: {current} is the newest");
    }
    Ok(())
}

/// `swarmllm keys list`
pub(crate) async fn keys_list(client: &Client) -> anyhow::Result<()> {
    let v = client.get("/api/admin/api-keys").await?;
    let keys = v["keys"].as_array().cloned().unwrap_or_default();
    if keys.is_empty() {
        println!("no client keys (make one with: swarmllm keys create NAME)");
        return Ok(());
    }
    println!("{:<10} {:<8} {:<20} NAME", "ID", "WAITING", "CREATED");
    for k in keys {
        let created = k["created_at"]
            .as_i64()
            .and_then(|t| chrono::DateTime::from_timestamp(t, 0))
            .map(|t| t.format("%Y-%m-%d %H:%M").to_string())
            .unwrap_or_default();
        println!(
            "{:<10} {:<8} {:<20} {}",
            k["id"].as_str().unwrap_or("?"),
            k["waiting"].as_u64().unwrap_or(0),
            created,
            k["name"].as_str().unwrap_or("")
        );
    }
    Ok(())
}

/// `swarmllm keys create NAME`
pub(crate) async fn keys_create(client: &Client, name: &str) -> anyhow::Result<()> {
    let v = client
        .post("/api/admin/api-keys", &json!({ "name": name }))
        .await?;
    eprintln!(
        "client key '{}' (id {}): it runs inference only; it is shown this once",
        v["name"].as_str().unwrap_or(name),
        v["id"].as_str().unwrap_or("?")
    );
    println!("{}", v["key"].as_str().unwrap_or(""));
    Ok(())
}

/// `swarmllm keys revoke ID`
pub(crate) async fn keys_revoke(client: &Client, id: &str) -> anyhow::Result<()> {
    anyhow::ensure!(
        !id.is_empty() && id.chars().all(|c| c.is_ascii_alphanumeric()),
        "'{id}' is not a key id (see `swarmllm keys list`)"
    );
    client.delete(&format!("/api/admin/api-keys/{id}")).await?;
    println!("revoked client key {id}");
    Ok(())
}

/// `swarmllm adapters list`
pub(crate) async fn adapters_list(client: &Client) -> anyhow::Result<()> {
    let v = client.get("/api/admin/adapters").await?;
    let adapters = v["adapters"].as_array().cloned().unwrap_or_default();
    if adapters.is_empty() {
        println!(
            "no adapters (put one under the node's adapters/ folder, then: swarmllm adapters \
             add FILE)"
        );
        return Ok(());
    }
    println!(
        "{:<38} {:<5} {:>5} {:>7}  PATH",
        "ID", "FORMAT", "RANK", "ALPHA"
    );
    for a in adapters {
        println!(
            "{:<38} {:<5} {:>5} {:>7}  {}",
            a["id"].as_str().unwrap_or("?"),
            a["format"].as_str().unwrap_or("?"),
            a["rank"].as_u64().unwrap_or(0),
            a["alpha"].as_f64().unwrap_or(0.0),
            a["path"].as_str().unwrap_or("")
        );
    }
    Ok(())
}

/// `swarmllm adapters add PATH`
pub(crate) async fn adapters_add(client: &Client, mut body: Value) -> anyhow::Result<()> {
    if let Some(o) = body.as_object_mut() {
        o.retain(|_, v| !v.is_null());
    }
    let v = client.post("/api/admin/adapters", &body).await?;
    let a = &v["adapter"];
    println!(
        "registered adapter {} ({}, rank {}, alpha {}); use it as MODEL+{}",
        a["id"].as_str().unwrap_or("?"),
        a["format"].as_str().unwrap_or("?"),
        a["rank"].as_u64().unwrap_or(0),
        a["alpha"].as_f64().unwrap_or(0.0),
        a["id"].as_str().unwrap_or("?")
    );
    Ok(())
}

/// `swarmllm adapters rm ID`
pub(crate) async fn adapters_rm(client: &Client, id: &str) -> anyhow::Result<()> {
    anyhow::ensure!(
        !id.is_empty()
            && id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')),
        "'{id}' is not an adapter id (see `swarmllm adapters list`)"
    );
    let v = client.delete(&format!("/api/admin/adapters/{id}")).await?;
    println!("{}", v["message"].as_str().unwrap_or("removed"));
    Ok(())
}

/// `swarmllm update apply`
pub(crate) async fn update_apply(client: &Client) -> anyhow::Result<()> {
    let v = client.post("/api/admin/update/apply", &json!({})).await?;
    println!(
        "installed SwarmLLM {}; restart it to run the new version",
        v["version"].as_str().unwrap_or("?")
    );
    Ok(())
}

fn imported_models(
    config: &swarmllm_node::config::Config,
) -> Vec<(PathBuf, swarmllm_node::shard::Manifest)> {
    let dir = config.data_dir_path().join("models");
    let mut out: Vec<_> = std::fs::read_dir(&dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let p = e.path();
            swarmllm_node::shard::read_manifest(&p).ok().map(|m| (p, m))
        })
        .collect();
    out.sort_by(|a, b| a.1.model_id.cmp(&b.1.model_id));
    out
}

/// `swarmllm models import PATH --shards N`
pub(crate) fn models_import(
    config: &swarmllm_node::config::Config,
    path: &std::path::Path,
    shards: u32,
    id: Option<&str>,
) -> anyhow::Result<()> {
    if !path.is_file() {
        return Err(anyhow!("{} is not a file", path.display()));
    }
    let id = id
        .map(str::to_string)
        .unwrap_or_else(|| swarmllm_node::node::model_id_from_path(path));
    let models_dir = config.data_dir_path().join("models");
    std::fs::create_dir_all(&models_dir)
        .with_context(|| format!("creating {}", models_dir.display()))?;
    let bar = ProgressBar::new(u64::from(shards) + 1);
    bar.set_style(
        ProgressStyle::with_template("importing {bar:40.cyan/blue} {pos}/{len} files")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let manifest = swarmllm_node::shard::import(path, &models_dir, &id, shards, |done, _| {
        bar.set_position(u64::from(done))
    })?;
    bar.finish_and_clear();
    println!(
        "imported {} ({}, {} layers) as {} shard(s) into {}",
        manifest.model_id,
        manifest.architecture,
        manifest.n_layers,
        manifest.shards.len(),
        models_dir.join(&manifest.model_id).display()
    );
    let hashes = swarmllm_node::shard::ModelDir::new(&models_dir, &manifest.model_id)
        .map(|d| swarmllm_node::shard::ShardHashes::load(&d, manifest.shard_count()))
        .unwrap_or_default();
    for s in &manifest.shards {
        println!(
            "  shard {}: layers {:>2}..{:<2}  {:>6.1} MB  blake3 {}",
            s.index,
            s.layer_start,
            s.layer_end,
            s.bytes as f64 / 1e6,
            hashes.get(s.index).map_or("-", |h| &h[..16])
        );
    }
    Ok(())
}

/// `swarmllm models add ID [--shards 0,1]`: asks the node to acquire the model,
/// then shows one progress bar per shard until every download has ended.
pub(crate) async fn models_add(
    client: &crate::client::Client,
    id: &str,
    shards: Option<&[u32]>,
    wait: bool,
) -> anyhow::Result<()> {
    let body = match shards {
        Some(s) => json!({ "shards": s }),
        None => json!({}),
    };
    let v = client
        .post(&format!("/api/admin/models/{id}/add"), &body)
        .await?;
    let downloads = v["downloads"].as_array().cloned().unwrap_or_default();
    let ids: Vec<String> = downloads
        .iter()
        .filter(|d| {
            matches!(
                d["status"].as_str(),
                Some("queued" | "downloading" | "verifying")
            )
        })
        .filter_map(|d| d["id"].as_str().map(str::to_string))
        .collect();
    println!(
        "{id}: {} shard(s) requested, {} to download",
        downloads.len(),
        ids.len()
    );
    if !wait || ids.is_empty() {
        return Ok(());
    }
    crate::hub::watch(client, &ids).await?;
    println!("{id}: all requested shards downloaded and verified");
    Ok(())
}

/// `swarmllm models rm ID [--shard N]`
pub(crate) async fn models_rm(
    client: &crate::client::Client,
    id: &str,
    shard: Option<u32>,
) -> anyhow::Result<()> {
    match shard {
        Some(i) => {
            client
                .delete(&format!("/api/admin/models/{id}/shards/{i}"))
                .await?;
            println!("removed shard {i} of {id}");
        }
        None => {
            client.delete(&format!("/api/admin/models/{id}")).await?;
            println!("removed {id}");
        }
    }
    Ok(())
}

/// `swarmllm pool status [--json]`
pub(crate) async fn pool_status(client: &Client, raw: bool) -> anyhow::Result<()> {
    let v = client.get("/api/pool/state").await?;
    if raw {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    if v["in_pool"] != true {
        println!("not in a pool (create one with `swarmllm pool create --name NAME`)");
        return Ok(());
    }
    println!(
        "pool {} ({}), this device is the {}; {} active invite code(s); members keep {}%",
        v["name"].as_str().unwrap_or("?"),
        v["pool_id"].as_str().unwrap_or("?"),
        v["role"].as_str().unwrap_or("?"),
        v["active_codes"],
        v["credit_split_pct"]
    );
    for m in v["members"].as_array().into_iter().flatten() {
        println!(
            "  {:<8} {:.16}…  {}",
            m["role"].as_str().unwrap_or("?"),
            m["node_id"].as_str().unwrap_or("?"),
            m["device_name"].as_str().unwrap_or("")
        );
    }
    Ok(())
}

/// `swarmllm credits balance`.
pub(crate) async fn credits_balance(
    client: &Client,
    verify: bool,
    raw: bool,
) -> anyhow::Result<()> {
    let path = if verify {
        "/api/admin/credits?verify=true"
    } else {
        "/api/admin/credits"
    };
    let v = client.get(path).await?;
    if raw {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!(
        "balance {} credits (earned {}, spent {}; {} entries), tier {}",
        v["balance"],
        v["earned"],
        v["spent"],
        v["entries"],
        v["tier"].as_str().unwrap_or("?")
    );
    if v["pending_pool_forwards"].as_f64().unwrap_or(0.0) > 0.0 {
        println!(
            "{} credits waiting to be forwarded to the pool owner",
            v["pending_pool_forwards"]
        );
    }
    if let Some(check) = v.get("verification") {
        if check["signatures_valid"] == true && check["totals_match"] == true {
            println!(
                "ledger verified: {} entries, every signature valid, totals match",
                check["entries"]
            );
        } else {
            anyhow::bail!("the ledger does not verify: {check}");
        }
    }
    Ok(())
}

/// `swarmllm credits history`.
pub(crate) async fn credits_history(client: &Client, limit: usize) -> anyhow::Result<()> {
    let v = client
        .get(&format!("/api/v1/wallet/transactions?limit={limit}"))
        .await?;
    for t in v["transactions"].as_array().into_iter().flatten() {
        let other = t["to"].as_str().or(t["from"].as_str()).unwrap_or("?");
        println!(
            "{}  {:<12} {:>14}  {:.16}…",
            t["timestamp"].as_str().unwrap_or("?"),
            t["type"].as_str().unwrap_or("?"),
            t["amount"],
            other
        );
    }
    println!("{} entries in all", v["total"]);
    Ok(())
}

/// `swarmllm credits leaderboard`.
pub(crate) async fn credits_leaderboard(client: &Client) -> anyhow::Result<()> {
    let v = client.get("/api/identity/leaderboard").await?;
    for r in v["leaderboard"].as_array().into_iter().flatten() {
        println!(
            "{:>3}. {:.16}… {:<16} {:>14} {}{}",
            r["rank"],
            r["node_id"].as_str().unwrap_or("?"),
            r["nickname"].as_str().unwrap_or(""),
            r["balance"],
            r["tier"].as_str().unwrap_or("?"),
            if r["is_self"] == true {
                "  (this node)"
            } else {
                ""
            }
        );
    }
    Ok(())
}
