//! `swarmllm bench-pipeline`: the whole model on one node vs the same model split
//! over 2 and 3 node processes on loopback, measured through the HTTP API as a
//! client sees it.
//!
//! Every node is a real `swarmllm serve` process (this binary) with one inference
//! thread, its own data dir and ports; the split nodes hold only their shards and
//! find each other by invite code. Each configuration gets a warm-up, then runs
//! take turns between configurations (drift hits all alike): `--runs` streamed
//! greedy generations of `--tokens` tokens (end-of-generation ignored):
//! prompt speed from time to first token, decode speed from first to last token,
//! the gaps between tokens (p50/p99), and the pipeline bytes every node sent.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};
use clap::Args;
use serde_json::{Value, json};

#[derive(Debug, Args)]
pub(crate) struct BenchPipelineArgs {
    /// The GGUF model.
    #[arg(long)]
    model: PathBuf,
    /// Tokens to generate per run.
    #[arg(long, default_value_t = 128)]
    tokens: u32,
    /// Measured runs per configuration (after one warm-up).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Activation encoding between hops (`f32`, exact, the node's default; `f16`
    /// or `q8` turn approximate answers on and count every measured link as
    /// slow, so they take effect on loopback).
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Inference threads per node.
    #[arg(long, default_value_t = 1)]
    threads: u32,
    /// Pin every node process to these CPUs (`taskset -c`, e.g. `0`). On a small
    /// VM, nodes that take turns on different vCPUs run each range ~20 % slower
    /// than one process does (idle vCPUs go cold); pinning shows the pipeline's own
    /// cost, as separate machines would.
    #[arg(long)]
    pin: Option<String>,
    /// Also send this many streams at once to each configuration and report
    /// their aggregate tok/s against one stream's (range hosts batch the
    /// single-token steps of sessions that arrive together).
    #[arg(long, default_value_t = 1)]
    concurrency: usize,
}

const PROMPT: &str = "Explain, step by step, how a chain of computers can run one language \
model together when each holds only some of its layers, and what happens when one of them \
disappears in the middle of an answer.";

pub(crate) struct NodeProc {
    child: Child,
    pub(crate) api: String,
    pub(crate) key: String,
}

/// How and where a benchmark node runs.
pub(crate) struct Spawn<'a> {
    /// Inference threads.
    pub(crate) threads: u32,
    /// CPUs to pin it to (`taskset -c`).
    pub(crate) pin: Option<&'a str>,
    /// Activation encoding between hops.
    pub(crate) dtype: &'a str,
    /// The network namespace to run it in (`ip netns exec`), if any.
    pub(crate) netns: Option<&'a str>,
    /// The address its API and P2P listen on.
    pub(crate) host: &'a str,
}

impl<'a> Spawn<'a> {
    fn loopback(args: &'a BenchPipelineArgs) -> Self {
        Self {
            threads: args.threads,
            pin: args.pin.as_deref(),
            dtype: &args.dtype,
            netns: None,
            host: "127.0.0.1",
        }
    }
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

pub(crate) async fn spawn_node(
    dir: &Path,
    spawn: &Spawn<'_>,
    model: Option<&Path>,
    bootstrap: Option<&str>,
) -> anyhow::Result<NodeProc> {
    // Free on loopback here; a namespace has its own ports, all free.
    let (api_port, p2p_port) = (free_port()?, free_port()?);
    std::fs::create_dir_all(dir)?;
    let log = std::fs::File::create(dir.join("node.log"))?;
    let exe = std::env::current_exe()?;
    let mut line: Vec<std::ffi::OsString> = Vec::new();
    if let Some(ns) = spawn.netns {
        line.extend(["ip", "netns", "exec", ns].map(Into::into));
    }
    if let Some(cpus) = spawn.pin {
        line.extend(["taskset", "-c", cpus].map(Into::into));
    }
    line.push(exe.into_os_string());
    let mut cmd = Command::new(&line[0]);
    cmd.args(&line[1..]);
    cmd.arg("--data-dir")
        .arg(dir)
        .arg("--api-port")
        .arg(api_port.to_string())
        .arg("serve")
        .arg("--threads")
        .arg(spawn.threads.to_string())
        .arg("--p2p-port")
        .arg(p2p_port.to_string())
        .env("SWARMLLM_P2P_HOST", spawn.host)
        .env("SWARMLLM_API_HOST", spawn.host)
        .env("SWARMLLM_MDNS", "false")
        .env("SWARMLLM_SECRET_STORE", "file")
        .env("SWARMLLM_ANNOUNCE_INTERVAL_SECS", "1")
        .env("SWARMLLM_RATE_LIMIT_PER_MINUTE", "0")
        .env("SWARMLLM_ACTIVATION_DTYPE", spawn.dtype)
        .env(
            "SWARMLLM_APPROXIMATE_ANSWERS",
            (spawn.dtype != "f32").to_string(),
        )
        .env("SWARMLLM_SLOW_LINK_MBPS", "1e12")
        .env("SWARMLLM_LOG_LEVEL", "warn")
        .env_remove("SWARMLLM_API_KEY")
        .stdout(Stdio::null())
        .stderr(log);
    if let Some(m) = model {
        cmd.arg("--model").arg(m);
    }
    if let Some(code) = bootstrap {
        cmd.arg("--bootstrap").arg(code);
    }
    let child = cmd.spawn().context("starting a node")?;
    let api = format!("http://{}:{api_port}", spawn.host);
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while http.get(format!("{api}/health/live")).send().await.is_err() {
        if Instant::now() > deadline {
            return Err(anyhow!("a node did not start; see {}", dir.display()));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let key = swarmllm_node::identity::read_api_key(dir, "file")?
        .ok_or_else(|| anyhow!("no API key in {}", dir.display()))?
        .to_string();
    Ok(NodeProc { child, api, key })
}

pub(crate) async fn get(http: &reqwest::Client, url: &str) -> anyhow::Result<Value> {
    Ok(http.get(url).send().await?.json().await?)
}

pub(crate) struct Run {
    pub(crate) prompt_tps: f64,
    pub(crate) decode_tps: f64,
    pub(crate) gaps_ms: Vec<f64>,
}

pub(crate) async fn one_run(
    http: &reqwest::Client,
    node: &NodeProc,
    model: &str,
    tokens: u32,
) -> anyhow::Result<Run> {
    let body = json!({
        "model": model,
        "messages": [{ "role": "user", "content": PROMPT }],
        "max_tokens": tokens,
        "temperature": 0,
        "ignore_eos": true,
        "cache_prompt": false,
        "stream": true,
        "stream_options": { "include_usage": true },
    });
    let run = crate::bench::timed_stream(
        http,
        &format!("{}/v1/chat/completions", node.api),
        &node.key,
        &body,
    )
    .await?;
    let (t0, times, usage) = (run.sent, run.arrivals, run.usage);
    let (first, last) = match (times.first(), times.last()) {
        (Some(f), Some(l)) if times.len() > 1 => (*f, *l),
        _ => return Err(anyhow!("the stream carried too few tokens")),
    };
    let generated = usage["completion_tokens"].as_u64().unwrap_or(0);
    let prompt_tokens = usage["prompt_tokens"].as_u64().unwrap_or(0);
    if generated != u64::from(tokens) {
        return Err(anyhow!("generated {generated} tokens, expected {tokens}"));
    }
    Ok(Run {
        prompt_tps: prompt_tokens as f64 / first.duration_since(t0).as_secs_f64(),
        decode_tps: (times.len() - 1) as f64 / last.duration_since(first).as_secs_f64(),
        gaps_ms: times
            .windows(2)
            .map(|w| w[1].duration_since(w[0]).as_secs_f64() * 1000.0)
            .collect(),
    })
}

pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

pub(crate) fn percentile(mut v: Vec<f64>, p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return 0.0;
    }
    let i = ((v.len() - 1) as f64 * p).round() as usize;
    v[i]
}

struct Row {
    label: String,
    hops: usize,
    prompt_tps: f64,
    decode_tps: f64,
    gap_p50: f64,
    gap_p99: f64,
    bytes_per_token: f64,
}

pub(crate) async fn run(args: &BenchPipelineArgs) -> anyhow::Result<()> {
    if !args.model.is_file() {
        return Err(anyhow!("{} is not a file", args.model.display()));
    }
    if swarmllm_node::pipeline::wire::parse_dtype(&args.dtype).is_none() {
        return Err(anyhow!("--dtype must be f16, f32 or q8"));
    }
    let model = std::path::absolute(&args.model)?;
    let tmp = tempfile::tempdir()?;
    let http = reqwest::Client::new();

    // Start every configuration first; then runs take turns between them, so a
    // busy spell on this machine hits all of them alike.
    let mut configs = Vec::new();
    for n in [1u32, 2, 3] {
        let label = if n == 1 {
            "local (whole model)".to_string()
        } else {
            format!("{n} nodes ({n} shards)")
        };
        eprintln!("{label}: starting ...");
        let lib = tmp.path().join(format!("lib{n}"));
        let model_id = if n == 1 {
            swarmllm_node::node::model_id_from_path(&model)
        } else {
            std::fs::create_dir_all(&lib)?;
            swarmllm_node::shard::import(&model, &lib, "bench", n, |_, _| {})?;
            "bench".to_string()
        };
        let mut nodes = Vec::new();
        let mut code = None;
        for i in 0..n {
            let dir = tmp.path().join(format!("n{n}-{i}"));
            if n > 1 {
                give_shard(&lib.join("bench"), &dir.join("models/bench"), i)?;
            }
            let whole = (n == 1).then_some(model.as_path());
            let node = spawn_node(&dir, &Spawn::loopback(args), whole, code.as_deref()).await?;
            if i == 0 && n > 1 {
                let v = get(&http, &format!("{}/api/admin/network-code", node.api)).await?;
                code = v["code"].as_str().map(str::to_string);
            }
            nodes.push(node);
        }
        // Wait until the first node can route over every holder.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let v = get(&http, &format!("{}/v1/models", nodes[0].api)).await?;
            let ready = v["data"].as_array().is_some_and(|d| {
                d.iter().any(|m| {
                    m["id"] == model_id.as_str()
                        && (n == 1 || m["meta"]["holders"].as_u64() == Some(u64::from(n)))
                })
            });
            if ready {
                break;
            }
            if Instant::now() > deadline {
                return Err(anyhow!("{label}: the chain never became servable"));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        one_run(&http, &nodes[0], &model_id, args.tokens).await?; // warm-up
        configs.push((label, n, model_id, nodes));
    }
    let mut runs: Vec<Vec<Run>> = configs.iter().map(|_| Vec::new()).collect();
    let mut bytes = vec![0u64; configs.len()];
    for _ in 0..args.runs {
        for (i, (_, _, model_id, nodes)) in configs.iter().enumerate() {
            let before = wire_bytes(&http, nodes).await;
            runs[i].push(one_run(&http, &nodes[0], model_id, args.tokens).await?);
            bytes[i] += wire_bytes(&http, nodes).await - before;
        }
    }
    // Concurrent sessions: aggregate tok/s (every generated token over the
    // whole run, prompts included) of one stream and of N at once.
    let mut concurrent = Vec::new();
    if args.concurrency > 1 {
        for (label, _, model_id, nodes) in &configs {
            let wall = |n: usize| {
                let http = &http;
                async move {
                    let t0 = Instant::now();
                    futures::future::try_join_all(
                        (0..n).map(|_| one_run(http, &nodes[0], model_id, args.tokens)),
                    )
                    .await?;
                    anyhow::Ok(t0.elapsed().as_secs_f64())
                }
            };
            let (mut one, mut many) = (Vec::new(), Vec::new());
            for _ in 0..args.runs {
                one.push(f64::from(args.tokens) / wall(1).await?);
                many.push(
                    args.concurrency as f64 * f64::from(args.tokens)
                        / wall(args.concurrency).await?,
                );
            }
            concurrent.push((label.clone(), median(one), median(many)));
        }
    }
    // Each sending node's own measure of its link: wait minus the answering
    // node's time (warm-up included).
    let mut links: Vec<Vec<(f64, f64)>> = Vec::new();
    for (_, _, _, nodes) in &configs {
        let mut per_node = Vec::new();
        for node in nodes {
            let v = get(&http, &format!("{}/api/v1/layers", node.api)).await?;
            let l = &v["link_overhead"];
            if l["samples"].as_u64().unwrap_or(0) > 0 {
                per_node.push((
                    l["p50_ms"].as_f64().unwrap_or(0.0),
                    l["p99_ms"].as_f64().unwrap_or(0.0),
                ));
            }
        }
        links.push(per_node);
    }
    let mut rows = Vec::new();
    for (i, (label, n, _, _)) in configs.iter().enumerate() {
        let r = &runs[i];
        let gaps: Vec<f64> = r.iter().flat_map(|r| r.gaps_ms.clone()).collect();
        rows.push(Row {
            label: label.clone(),
            hops: *n as usize - 1,
            prompt_tps: median(r.iter().map(|r| r.prompt_tps).collect()),
            decode_tps: median(r.iter().map(|r| r.decode_tps).collect()),
            gap_p50: percentile(gaps.clone(), 0.5),
            gap_p99: percentile(gaps, 0.99),
            bytes_per_token: bytes[i] as f64 / (args.runs as f64 * f64::from(args.tokens)),
        });
    }
    drop(configs);

    println!(
        "{} | {} tokens | {} run(s) | {} thread(s) per node | activations {} | {}",
        args.model.display(),
        args.tokens,
        args.runs,
        args.threads,
        args.dtype,
        match &args.pin {
            Some(c) => format!("all nodes pinned to CPU {c}"),
            None => "not pinned".into(),
        }
    );
    println!(
        "{:<22} {:>12} {:>12} {:>8} {:>8} {:>9} {:>9} {:>13} {:>12}",
        "configuration",
        "prompt tok/s",
        "decode tok/s",
        "ratio",
        "gap p50",
        "gap p99",
        "ms/hop",
        "ms/hop p99",
        "wire B/token"
    );
    let local = (rows[0].decode_tps, rows[0].gap_p50, rows[0].gap_p99);
    for r in &rows {
        let per_hop = |v: f64, base: f64| {
            if r.hops == 0 {
                "-".to_string()
            } else {
                format!("{:.3}", (v - base) / r.hops as f64)
            }
        };
        println!(
            "{:<22} {:>12.1} {:>12.1} {:>8.3} {:>8.2} {:>9.2} {:>9} {:>13} {:>12.0}",
            r.label,
            r.prompt_tps,
            r.decode_tps,
            r.decode_tps / local.0,
            r.gap_p50,
            r.gap_p99,
            per_hop(r.gap_p50, local.1),
            per_hop(r.gap_p99, local.2),
            r.bytes_per_token
        );
    }
    println!(
        "gap = time between streamed tokens; ms/hop = (gap - local gap) / network hops per token \
         (each hop's compute is part of local too, so this is the pipeline's own cost)"
    );
    for (row, per_node) in rows.iter().zip(&links).skip(1) {
        let each: Vec<String> = per_node
            .iter()
            .enumerate()
            .map(|(i, (p50, p99))| format!("node {i}→{}: p50 {p50:.3} p99 {p99:.3}", i + 1))
            .collect();
        println!("{}: link overhead ms {}", row.label, each.join(", "));
    }
    println!(
        "link overhead = a node's wait for the next node's answer minus the time that node spent \
         (network, framing, sealing and thread hand-offs of one round trip), measured per step"
    );
    if !concurrent.is_empty() {
        println!(
            "{:<22} {:>14} {:>16} {:>8}",
            "configuration",
            "1 stream tok/s",
            format!("{} streams tok/s", args.concurrency),
            "gain"
        );
        for (label, one, many) in concurrent {
            println!("{label:<22} {one:>14.1} {many:>16.1} {:>8.2}", many / one);
        }
        println!(
            "tok/s = every generated token over the whole run (prompts included), medians of {}",
            args.runs
        );
    }
    Ok(())
}

async fn wire_bytes(http: &reqwest::Client, nodes: &[NodeProc]) -> u64 {
    let mut total = 0;
    for n in nodes {
        if let Ok(v) = get(http, &format!("{}/api/v1/layers", n.api)).await {
            total += v["wire_bytes_sent"].as_u64().unwrap_or(0);
        }
    }
    total
}

pub(crate) fn give_shard(from: &Path, to: &Path, index: u32) -> anyhow::Result<()> {
    std::fs::create_dir_all(to)?;
    for f in ["manifest.json", "gguf_header.bin"] {
        std::fs::copy(from.join(f), to.join(f))?;
    }
    let f = format!("shard-{index:03}.gguf");
    std::fs::copy(from.join(&f), to.join(&f))?;
    Ok(())
}
