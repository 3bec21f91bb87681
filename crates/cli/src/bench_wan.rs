//! `swarmllm bench-wan`: split inference over simulated WAN links, against the
//! round-trip bound.
//!
//! It needs the rig up (`scripts/wan-rig up 3`, see `scripts/wan-bench`):
//! node *i* runs in namespace `<rig>-n<i>` at `10.77.<i>.2`, and every packet
//! between nodes passes the rig's emulator, which holds it for half the link's
//! round trip. For each chain length and each round trip the chain's nodes are
//! real `swarmllm serve` processes with one shard each; the requester is node
//! 0. A token crosses every link twice (activations out, the token back), so
//! no chain of `n` nodes can beat `1 / ((n - 1) · RTT + compute)`, where
//! compute is the whole model's time per token on one node (measured here
//! first, in namespace 0). The table gives decode tok/s and its ratio to that
//! bound: for an open-ended answer without speculation, and for an editing
//! task (the answer repeats most of its prompt) without and with speculative
//! decoding (prompt-lookup drafts verified by the chain in one step, which
//! beats the bound when the drafts are accepted).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};
use clap::Args;

use serde_json::json;

use crate::bench_pipeline::{NodeProc, Spawn, get, give_shard, median, one_run, percentile};

/// The editing task: most of the answer is a copy of the prompt's text.
const EDIT_PROMPT: &str = "Rewrite the following paragraph with every \"harbour\" spelled \
\"harbor\", changing nothing else:\n\nThe old lighthouse stood on the rocks above the harbour. \
Every night the keeper climbed the hundred steps, lit the great lamp and watched the fishing \
boats come home through the fog. When a storm came in from the sea, the keeper stayed awake \
until the last boat was safe inside the harbour, and in the morning he wrote the names of the \
boats in a book that he kept on the table by the window.";

#[derive(Debug, Args)]
pub(crate) struct BenchWanArgs {
    /// The GGUF model.
    #[arg(long)]
    model: PathBuf,
    /// Tokens to generate per run.
    #[arg(long, default_value_t = 48)]
    tokens: u32,
    /// Most tokens of the editing task's answer.
    #[arg(long, default_value_t = 96)]
    edit_tokens: u32,
    /// Measured runs per configuration (after one warm-up).
    #[arg(long, default_value_t = 2)]
    runs: usize,
    /// Link round trips to measure, in ms (every link alike).
    #[arg(long, value_delimiter = ',', default_value = "0,20,50,100")]
    rtts: Vec<f64>,
    /// Chain lengths (nodes, one shard each).
    #[arg(long, value_delimiter = ',', default_value = "2,3")]
    nodes: Vec<u32>,
    /// Inference threads per node.
    #[arg(long, default_value_t = 1)]
    threads: u32,
    /// The rig's name (`SWL_RIG` of scripts/wan-rig).
    #[arg(long, default_value = "swl")]
    rig: String,
}

/// The rig's emulator: its config file and process.
struct Rig {
    state: PathBuf,
    pid: String,
    name: String,
}

impl Rig {
    fn find(name: &str) -> anyhow::Result<Self> {
        let state = PathBuf::from(format!("/run/swarmllm-wan-{name}"));
        let pid = std::fs::read_to_string(state.join("wanem.pid"))
            .map_err(|_| anyhow!("the WAN rig '{name}' is not up: run scripts/wan-rig up 3"))?
            .trim()
            .to_string();
        Ok(Self {
            state,
            pid,
            name: name.to_string(),
        })
    }

    fn netns(&self, i: u32) -> String {
        format!("{}-n{i}", self.name)
    }

    /// Sets every link's round trip and has the emulator reload.
    async fn set_rtt(&self, rtt_ms: f64) -> anyhow::Result<()> {
        let tmp = self.state.join("links.json.new");
        std::fs::write(
            &tmp,
            serde_json::json!({ "default": { "rtt_ms": rtt_ms } }).to_string(),
        )?;
        std::fs::rename(&tmp, self.state.join("links.json"))?;
        let ok = std::process::Command::new("kill")
            .args(["-HUP", &self.pid])
            .status()
            .context("signalling the emulator")?
            .success();
        if !ok {
            return Err(anyhow!("the rig's emulator (pid {}) is gone", self.pid));
        }
        // The emulator reloads between two packets; give it a moment.
        tokio::time::sleep(Duration::from_millis(200)).await;
        Ok(())
    }
}

fn host(i: u32) -> String {
    format!("10.77.{i}.2")
}

/// Decode tok/s (median) and the gap between tokens (p50, ms) of `runs` runs.
async fn measure(
    http: &reqwest::Client,
    node: &NodeProc,
    model: &str,
    args: &BenchWanArgs,
) -> anyhow::Result<(f64, f64)> {
    one_run(http, node, model, args.tokens).await?; // warm-up
    let mut runs = Vec::new();
    for _ in 0..args.runs {
        runs.push(one_run(http, node, model, args.tokens).await?);
    }
    let gaps: Vec<f64> = runs.iter().flat_map(|r| r.gaps_ms.clone()).collect();
    Ok((
        median(runs.iter().map(|r| r.decode_tps).collect()),
        percentile(gaps, 0.5),
    ))
}

/// One greedy answer to the editing task with at most `n_max` drafts per
/// step: decode tok/s (tokens after the first over the time after it) and
/// the answer.
async fn edit_run(
    http: &reqwest::Client,
    node: &NodeProc,
    model: &str,
    tokens: u32,
    n_max: u32,
) -> anyhow::Result<(f64, String)> {
    let body = json!({
        "model": model,
        "messages": [{ "role": "user", "content": EDIT_PROMPT }],
        "max_tokens": tokens,
        "temperature": 0,
        "cache_prompt": false,
        "speculative.n_max": n_max,
        "stream": true,
        "stream_options": { "include_usage": true },
    });
    let url = format!("{}/v1/chat/completions", node.api);
    let run = crate::bench::timed_stream(http, &url, &node.key, &body).await?;
    let generated = run.usage["completion_tokens"].as_u64().unwrap_or(0);
    let (Some(first), Some(last)) = (run.arrivals.first(), run.arrivals.last()) else {
        return Err(anyhow!("the stream carried no tokens"));
    };
    let secs = last.duration_since(*first).as_secs_f64();
    if generated < 2 || secs <= 0.0 {
        return Err(anyhow!("too short an answer to time ({generated} tokens)"));
    }
    Ok(((generated - 1) as f64 / secs, run.text))
}

/// The editing task's decode tok/s (median of `runs`) without and with
/// speculation, the share of drafts accepted, and whether both gave the same
/// text.
async fn measure_edit(
    http: &reqwest::Client,
    node: &NodeProc,
    model: &str,
    args: &BenchWanArgs,
) -> anyhow::Result<(f64, f64, f64, bool)> {
    let drafts = |v: &serde_json::Value| {
        (
            v["speculation"]["drafted"].as_f64().unwrap_or(0.0),
            v["speculation"]["accepted"].as_f64().unwrap_or(0.0),
        )
    };
    let layers = format!("{}/api/v1/layers", node.api);
    let (mut off, mut on) = (Vec::new(), Vec::new());
    let mut same = true;
    let before = drafts(&get(http, &layers).await?);
    for _ in 0..args.runs {
        let (tps, plain_text) = edit_run(http, node, model, args.edit_tokens, 0).await?;
        off.push(tps);
        let (tps, fast_text) = edit_run(http, node, model, args.edit_tokens, 8).await?;
        on.push(tps);
        same &= plain_text == fast_text;
    }
    let after = drafts(&get(http, &layers).await?);
    let accepted = (after.1 - before.1) / (after.0 - before.0).max(1.0);
    Ok((median(off), median(on), accepted, same))
}

/// One line of the table.
struct Row {
    n: u32,
    rtt: f64,
    tps: f64,
    gap: f64,
    bound: f64,
    edit_off: f64,
    edit_on: f64,
    accepted: f64,
    same: bool,
}

pub(crate) async fn run(args: &BenchWanArgs) -> anyhow::Result<()> {
    if !args.model.is_file() {
        return Err(anyhow!("{} is not a file", args.model.display()));
    }
    if args.nodes.iter().any(|n| !(2..=8).contains(n)) {
        return Err(anyhow!("--nodes: chains of 2 to 8 nodes"));
    }
    let rig = Rig::find(&args.rig)?;
    let model = std::path::absolute(&args.model)?;
    let tmp = tempfile::tempdir()?;
    let http = reqwest::Client::new();
    let names: Vec<String> = (0..8).map(|i| rig.netns(i)).collect();
    let hosts: Vec<String> = (0..8).map(host).collect();
    let spawn = |i: u32| Spawn {
        threads: args.threads,
        pin: None,
        dtype: "f32",
        netns: Some(&names[i as usize]),
        host: &hosts[i as usize],
    };

    // The whole model on one node: compute per token.
    rig.set_rtt(0.0).await?;
    eprintln!("local (whole model): starting ...");
    let local =
        crate::bench_pipeline::spawn_node(&tmp.path().join("local"), &spawn(0), Some(&model), None)
            .await?;
    let local_id = swarmllm_node::node::model_id_from_path(&model);
    let (local_tps, compute_ms) = measure(&http, &local, &local_id, args).await?;
    drop(local);

    let mut rows = Vec::new();
    for &n in &args.nodes {
        eprintln!("{n} nodes: starting ...");
        rig.set_rtt(0.0).await?;
        let lib = tmp.path().join(format!("lib{n}"));
        std::fs::create_dir_all(&lib)?;
        swarmllm_node::shard::import(&model, &lib, "bench", n, |_, _| {})?;
        let mut nodes = Vec::new();
        let mut code: Option<String> = None;
        for i in 0..n {
            let dir = tmp.path().join(format!("n{n}-{i}"));
            give_shard(&lib.join("bench"), &dir.join("models/bench"), i)?;
            let node =
                crate::bench_pipeline::spawn_node(&dir, &spawn(i), None, code.as_deref()).await?;
            if i == 0 {
                let v = get(&http, &format!("{}/api/admin/network-code", node.api)).await?;
                code = v["code"].as_str().map(str::to_string);
            }
            nodes.push(node);
        }
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let v = get(&http, &format!("{}/v1/models", nodes[0].api)).await?;
            let ready = v["data"].as_array().is_some_and(|d| {
                d.iter()
                    .any(|m| m["id"] == "bench" && m["meta"]["holders"].as_u64() == Some(n.into()))
            });
            if ready {
                break;
            }
            if Instant::now() > deadline {
                return Err(anyhow!("{n} nodes: the chain never became servable"));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        for &rtt in &args.rtts {
            rig.set_rtt(rtt).await?;
            let (tps, gap) = measure(&http, &nodes[0], "bench", args).await?;
            let (edit_off, edit_on, accepted, same) =
                measure_edit(&http, &nodes[0], "bench", args).await?;
            let bound = 1000.0 / (f64::from(n - 1) * rtt + compute_ms);
            eprintln!(
                "{n} nodes, RTT {rtt} ms: {tps:.2} tok/s, editing {edit_off:.2} -> {edit_on:.2} \
                 tok/s with speculation (bound {bound:.2})"
            );
            rows.push(Row {
                n,
                rtt,
                tps,
                gap,
                bound,
                edit_off,
                edit_on,
                accepted,
                same,
            });
        }
    }
    rig.set_rtt(0.0).await?;

    println!(
        "{} | {} tokens | {} run(s) | {} thread(s) per node | activations f32 | rig '{}' (user-space \
         emulator)",
        args.model.display(),
        args.tokens,
        args.runs,
        args.threads,
        args.rig
    );
    println!(
        "local (whole model, one node): {local_tps:.2} tok/s, {compute_ms:.2} ms per token \
         (the compute term of the bound)"
    );
    println!(
        "{:<6} {:>7} {:>12} {:>8} {:>8} {:>7} | {:>9} {:>9} {:>7} {:>7} {:>9} {:>5}",
        "nodes",
        "RTT ms",
        "bound tok/s",
        "tok/s",
        "gap p50",
        "ratio",
        "edit tok/s",
        "spec tok/s",
        "ratio",
        "ratio",
        "accepted",
        "same"
    );
    println!(
        "{:<6} {:>7} {:>12} {:>8} {:>8} {:>7} | {:>9} {:>9} {:>7} {:>7} {:>9} {:>5}",
        "",
        "",
        "",
        "(open)",
        "ms",
        "",
        "(no spec)",
        "(n_max 8)",
        "no spec",
        "spec",
        "drafts",
        "text"
    );
    for r in rows {
        println!(
            "{:<6} {:>7.0} {:>12.2} {:>8.2} {:>8.2} {:>7.3} | {:>9.2} {:>9.2} {:>7.3} {:>7.3} {:>8.0}% {:>5}",
            r.n,
            r.rtt,
            r.bound,
            r.tps,
            r.gap,
            r.tps / r.bound,
            r.edit_off,
            r.edit_on,
            r.edit_off / r.bound,
            r.edit_on / r.bound,
            r.accepted * 100.0,
            if r.same { "yes" } else { "NO" }
        );
    }
    println!(
        "bound = 1 / ((nodes - 1) x RTT + compute): a token crosses each link out and back; \
         ratio = tok/s / bound; open: {} tokens of an open-ended answer (ignore_eos); edit: \
         at most {} tokens of a paragraph rewritten with one spelling changed; same text: \
         the answer with speculation equals the one without",
        args.tokens, args.edit_tokens
    );
    Ok(())
}
