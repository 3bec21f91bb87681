//! `swarmllm bench`: prompt and decode tokens/s of a bare llama-cpp-2 loop vs the
//! same greedy generation through the node's HTTP API, and the ratio API/bare.
//!
//! Both paths load the same GGUF with the same threads, context and batch size, use
//! the same chat-templated prompt and generate exactly `--tokens` tokens
//! (end-of-generation ignored). Runs alternate between the two paths so drift on a
//! busy machine hits both alike; the median of `--runs` is reported.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, anyhow};
use clap::Args;
use serde_json::{Map, Value, json};
use swarmllm_node::config::ConfigSource;
use swarmllm_node::infer::ChatTurn;
use swarmllm_node::infer::bench::BareBench;
use swarmllm_node::{Node, NodeOptions};

use crate::client::read_sse;

#[derive(Debug, Args)]
pub(crate) struct BenchArgs {
    /// GGUF model (default: the configured model).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Tokens to generate per run.
    #[arg(long, default_value_t = 128)]
    tokens: u32,
    /// Measured runs per path (after one warm-up each).
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Inference threads (default: the configured value, else all cores).
    #[arg(long)]
    threads: Option<u32>,
    /// Layers to offload to the GPU.
    #[arg(long)]
    gpu_layers: Option<u32>,
    /// Concurrent streams to measure instead, e.g. `1,4,8`: aggregate tok/s and
    /// time to first token of that many simultaneous requests against the bare
    /// loop decoding as many sequences in one batch.
    #[arg(long, value_delimiter = ',')]
    concurrency: Vec<usize>,
}

const PROMPT: &str = "You are reviewing a design for a peer-to-peer system that runs large \
language models across many home computers. Each computer holds a contiguous range of the \
model's layers and passes hidden states to the next one. Explain, step by step, what can go \
wrong when one of the computers disappears in the middle of a long answer, how the system can \
detect it quickly, and how it can continue the answer without repeating or losing any words.";

#[derive(Debug, Clone, Copy)]
struct Sample {
    prompt_tps: f64,
    decode_tps: f64,
}

pub(crate) async fn run(mut source: ConfigSource, args: &BenchArgs) -> anyhow::Result<()> {
    let base = crate::load_config(&source)?;
    swarmllm_node::logging::init("human", "warn");
    let model = args
        .model
        .clone()
        .or_else(|| (!base.model.is_empty()).then(|| PathBuf::from(&base.model)))
        .ok_or_else(|| anyhow!("no model: pass --model PATH (see scripts/fetch-test-model)"))?;
    if args.tokens < 2 || args.runs == 0 {
        return Err(anyhow!("--tokens must be at least 2 and --runs at least 1"));
    }
    if args.concurrency.iter().any(|c| *c == 0 || *c > 64) {
        return Err(anyhow!("--concurrency takes counts from 1 to 64"));
    }

    // A throwaway node: its own data dir, an ephemeral port, no rate limit.
    let dir = tempfile::tempdir().context("creating a temporary data dir")?;
    let mut overrides = Map::new();
    overrides.insert("data_dir".into(), json!(dir.path().to_string_lossy()));
    overrides.insert(
        "model".into(),
        json!(std::path::absolute(&model)?.to_string_lossy()),
    );
    overrides.insert("secret_store".into(), json!("file"));
    overrides.insert("rate_limit_per_minute".into(), json!(0));
    overrides.insert("api_port".into(), json!(0));
    overrides.insert("p2p_enabled".into(), json!(false));
    if let Some(t) = args.threads {
        overrides.insert("threads".into(), json!(t));
    }
    if let Some(g) = args.gpu_layers {
        overrides.insert("gpu_layers".into(), json!(g));
    }
    if let Some(most) = args.concurrency.iter().max() {
        overrides.insert("max_parallel".into(), json!(most));
    }
    source.overrides.extend(overrides);
    source.path = dir.path().join("config.toml");
    source.read_env = false;

    eprintln!("loading {} ...", model.display());
    let node = Node::start(NodeOptions {
        config: source,
        load_progress: None,
    })
    .await
    .context("starting the benchmark node")?;
    let engine = node
        .engine()
        .ok_or_else(|| anyhow!("the node loaded no model"))?
        .clone();
    let prompt = engine.render_chat(&[ChatTurn {
        role: "user".into(),
        content: PROMPT.into(),
    }])?;
    let engine_config = swarmllm_node::node::engine_config(&node.config());
    let threads = engine_config.threads;
    let bare = tokio::task::spawn_blocking(move || BareBench::load(engine_config))
        .await?
        .context("loading the model for the bare loop")?;
    let prompt_tokens = bare.prompt_tokens(&prompt);

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/v1/completions", listener.local_addr()?);
    let api_key = node.api_key().to_string();
    tokio::spawn(swarmllm_node::api::serve(node.clone(), listener));
    let http = reqwest::Client::new();

    println!(
        "model {} | {prompt_tokens}-token prompt | {} tokens | {threads} thread(s) | {} run(s) per path",
        engine.info().id,
        args.tokens,
        args.runs
    );
    let bare = std::sync::Arc::new(bare);
    if !args.concurrency.is_empty() {
        let stats = concurrent(&bare, &http, &url, &api_key, &prompt, args).await;
        node.request_shutdown();
        return stats;
    }
    let mut bare_samples = Vec::new();
    let mut api_samples = Vec::new();
    for i in 0..=args.runs {
        let b = {
            let bare = bare.clone();
            let prompt = prompt.clone();
            let n = args.tokens;
            tokio::task::spawn_blocking(move || bare.run(&prompt, n)).await??
        };
        let a = api_run(&http, &url, &api_key, &prompt, args.tokens, prompt_tokens).await?;
        let b = Sample {
            prompt_tps: b.prompt_tokens as f64 / b.prompt_secs,
            decode_tps: b.decode_tokens as f64 / b.decode_secs,
        };
        if i == 0 {
            continue; // warm-up
        }
        eprintln!(
            "run {i}: bare {:.1}/{:.1} tok/s, api {:.1}/{:.1} tok/s (prompt/decode)",
            b.prompt_tps, b.decode_tps, a.prompt_tps, a.decode_tps
        );
        bare_samples.push(b);
        api_samples.push(a);
    }
    let med = |v: &[Sample], f: fn(&Sample) -> f64| {
        let mut x: Vec<f64> = v.iter().map(f).collect();
        x.sort_by(f64::total_cmp);
        x[x.len() / 2]
    };
    let (bp, bd) = (
        med(&bare_samples, |s| s.prompt_tps),
        med(&bare_samples, |s| s.decode_tps),
    );
    let (ap, ad) = (
        med(&api_samples, |s| s.prompt_tps),
        med(&api_samples, |s| s.decode_tps),
    );
    println!(
        "{:<28} {:>14} {:>14}",
        "path (median)", "prompt tok/s", "decode tok/s"
    );
    println!("{:<28} {:>14.1} {:>14.1}", "bare llama-cpp-2 loop", bp, bd);
    println!(
        "{:<28} {:>14.1} {:>14.1}",
        "HTTP API (/v1/completions)", ap, ad
    );
    println!(
        "{:<28} {:>14.3} {:>14.3}",
        "ratio API/bare",
        ap / bp,
        ad / bd
    );
    node.request_shutdown();
    Ok(())
}

/// Aggregate throughput at each `--concurrency`: the node's API serving that
/// many simultaneous streams against the bare loop decoding as many sequences
/// in one batch: tok/s of every generated token over the whole run (`all`,
/// prompts included), of the tokens after each stream's first (`decode`), and
/// the mean time to first token (ms). `api/bare` and `vs first` (the gain over
/// the first `--concurrency` count, normally 1) compare decode tok/s.
async fn concurrent(
    bare: &std::sync::Arc<BareBench>,
    http: &reqwest::Client,
    url: &str,
    api_key: &str,
    prompt: &str,
    args: &BenchArgs,
) -> anyhow::Result<()> {
    let med = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    println!(
        "{:>7} {:>9} {:>10} {:>9} {:>9} {:>11} {:>9} {:>9} {:>9}",
        "streams",
        "api all",
        "api decode",
        "api ttft",
        "bare all",
        "bare decode",
        "bare ttft",
        "api/bare",
        "vs first"
    );
    let mut single = None;
    for &c in &args.concurrency {
        let (mut api_tps, mut api_decode, mut api_ttft) = (Vec::new(), Vec::new(), Vec::new());
        let (mut bare_tps, mut bare_decode, mut bare_ttft) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..=args.runs {
            let b = {
                let (bare, prompt, n) = (bare.clone(), prompt.to_string(), args.tokens);
                tokio::task::spawn_blocking(move || bare.run_batched(&prompt, n, c)).await??
            };
            let body = json!({
                "prompt": prompt,
                "max_tokens": args.tokens,
                "temperature": 0,
                "ignore_eos": true,
                "cache_prompt": false,
                "stream": true,
                "stream_options": { "include_usage": true },
            });
            let start = Instant::now();
            let runs =
                futures::future::join_all((0..c).map(|_| timed_stream(http, url, api_key, &body)))
                    .await
                    .into_iter()
                    .collect::<anyhow::Result<Vec<_>>>()?;
            let end = runs
                .iter()
                .filter_map(|r| r.arrivals.last().copied())
                .max()
                .unwrap_or(start);
            let tokens: u64 = runs
                .iter()
                .map(|r| r.usage["completion_tokens"].as_u64().unwrap_or(0))
                .sum();
            if tokens != u64::from(args.tokens) * c as u64 {
                return Err(anyhow!(
                    "the API generated {tokens} tokens, expected {}",
                    u64::from(args.tokens) * c as u64
                ));
            }
            let ttft: f64 = runs
                .iter()
                .filter_map(|r| {
                    r.arrivals
                        .first()
                        .map(|f| f.duration_since(r.sent).as_secs_f64())
                })
                .sum::<f64>()
                / c as f64;
            if i == 0 {
                continue; // warm-up
            }
            api_tps.push(tokens as f64 / end.duration_since(start).as_secs_f64());
            api_ttft.push(ttft * 1000.0);
            // Decode: every token after each stream's first, over the span from
            // the first first-token to the last token.
            let first = runs
                .iter()
                .filter_map(|r| r.arrivals.first().copied())
                .min()
                .unwrap_or(start);
            let decoded = tokens.saturating_sub(c as u64);
            api_decode.push(decoded as f64 / end.duration_since(first).as_secs_f64());
            let bare_all = b.decode_tokens + c as u64;
            bare_tps.push(bare_all as f64 / (b.first_token_secs + b.decode_secs));
            bare_decode.push(b.decode_tokens as f64 / b.decode_secs);
            bare_ttft.push(b.first_token_secs * 1000.0);
        }
        let (a, ad, at) = (med(api_tps), med(api_decode), med(api_ttft));
        let (b, bd, bt) = (med(bare_tps), med(bare_decode), med(bare_ttft));
        let base = *single.get_or_insert(ad);
        println!(
            "{c:>7} {a:>9.1} {ad:>10.1} {at:>9.0} {b:>9.1} {bd:>11.1} {bt:>9.0} {:>9.3} {:>9.2}",
            ad / bd,
            ad / base
        );
    }
    Ok(())
}

/// A streamed generation as the client saw it.
pub(crate) struct TimedStream {
    /// When the request was sent.
    pub(crate) sent: Instant,
    /// When each chunk carrying text arrived.
    pub(crate) arrivals: Vec<Instant>,
    /// The final `usage` object.
    pub(crate) usage: Value,
    /// The text, all chunks together.
    pub(crate) text: String,
}

/// POSTs a streaming request (`/v1/completions` or `/v1/chat/completions`) and
/// times every chunk that carries text.
pub(crate) async fn timed_stream(
    http: &reqwest::Client,
    url: &str,
    api_key: &str,
    body: &Value,
) -> anyhow::Result<TimedStream> {
    let sent = Instant::now();
    let resp = http
        .post(url)
        .bearer_auth(api_key)
        .json(body)
        .send()
        .await?
        .error_for_status()?;
    let mut arrivals = Vec::new();
    let mut usage = Value::Null;
    let mut all = String::new();
    read_sse(resp, |data| {
        let v: Value = serde_json::from_str(data)?;
        if !v["usage"].is_null() {
            usage = v["usage"].clone();
        }
        let choice = &v["choices"][0];
        let text = choice["text"]
            .as_str()
            .or(choice["delta"]["content"].as_str());
        if let Some(t) = text.filter(|t| !t.is_empty()) {
            arrivals.push(Instant::now());
            all.push_str(t);
        }
        Ok(())
    })
    .await?;
    Ok(TimedStream {
        sent,
        arrivals,
        usage,
        text: all,
    })
}

/// One streamed greedy generation through the API, timed on the client: prompt
/// speed from time-to-first-token, decode speed from first to last token.
async fn api_run(
    http: &reqwest::Client,
    url: &str,
    api_key: &str,
    prompt: &str,
    tokens: u32,
    prompt_tokens: usize,
) -> anyhow::Result<Sample> {
    let body = json!({
        "prompt": prompt,
        "max_tokens": tokens,
        "temperature": 0,
        "ignore_eos": true,
        "cache_prompt": false,
        "stream": true,
        "stream_options": { "include_usage": true },
    });
    let run = timed_stream(http, url, api_key, &body).await?;
    let (Some(&first), Some(&last)) = (run.arrivals.first(), run.arrivals.last()) else {
        return Err(anyhow!("the API streamed no text"));
    };
    let generated = run.usage["completion_tokens"].as_u64().unwrap_or(0);
    if generated != tokens as u64 {
        return Err(anyhow!(
            "the API generated {generated} tokens, expected {tokens}"
        ));
    }
    Ok(Sample {
        prompt_tps: prompt_tokens as f64 / first.duration_since(run.sent).as_secs_f64(),
        decode_tps: (tokens - 1) as f64 / last.duration_since(first).as_secs_f64(),
    })
}

#[derive(Debug, Args)]
pub(crate) struct BenchNetArgs {
    /// The node to measure against: a network code (`swarm://…`) or multiaddr.
    #[arg(long)]
    peer: String,
    /// Round trips per payload size.
    #[arg(long, default_value_t = 200)]
    iterations: usize,
}

/// `swarmllm bench-net`: request-response round trips to another node process
/// (echo frames of 16 KiB and 1 MiB), p50 and p99.
pub(crate) async fn run_net(args: &BenchNetArgs) -> anyhow::Result<()> {
    use swarmllm_node::net::frame::{Request, Response};
    use swarmllm_node::net::{LocalInfo, NetConfig, Network};

    swarmllm_node::logging::init("human", "warn");
    let dir = tempfile::tempdir()?;
    let store = swarmllm_node::store::Store::open(&dir.path().join("bench.db"))?;
    let identity = swarmllm_node::identity::Identity::generate();
    let net = Network::start(
        &identity,
        store,
        NetConfig {
            offline: false,
            listen_host: "127.0.0.1".into(),
            port: 0,
            mdns: false,
            bootstrap: vec![],
            network_name: "swarmllm".into(),
            announce_interval: std::time::Duration::from_secs(3600),
            region: String::new(),
            ban_below_trust: 0,
            cool_off: std::time::Duration::from_secs(600),
        },
        std::sync::Arc::new(LocalInfo::default),
        swarmllm_node::tasks::Tasks::default(),
    )
    .await?;
    let target = net.add_seed_and_dial(&args.peer, "bench").await?;
    println!("peer {target} | {} round trips per size", args.iterations);
    println!(
        "{:>10} {:>10} {:>10} {:>10} {:>12}",
        "payload", "p50 ms", "p99 ms", "mean ms", "MB/s (p50)"
    );
    for size in [16 * 1024usize, 1024 * 1024] {
        let payload = vec![0xa5u8; size];
        for _ in 0..5 {
            net.request(&target, Request::Echo(payload.clone())).await?;
        }
        let mut rtts = Vec::with_capacity(args.iterations);
        for _ in 0..args.iterations {
            let t = Instant::now();
            match net.request(&target, Request::Echo(payload.clone())).await? {
                Response::Echo(back) if back.len() == size => {}
                other => {
                    return Err(anyhow!(
                        "unexpected answer: {:?}",
                        std::mem::discriminant(&other)
                    ));
                }
            }
            rtts.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        rtts.sort_by(f64::total_cmp);
        let pct = |p: f64| rtts[((rtts.len() as f64 * p).ceil() as usize).clamp(1, rtts.len()) - 1];
        let mean = rtts.iter().sum::<f64>() / rtts.len() as f64;
        let label = if size >= 1024 * 1024 {
            "1 MiB".to_string()
        } else {
            format!("{} KiB", size / 1024)
        };
        println!(
            "{label:>10} {:>10.3} {:>10.3} {:>10.3} {:>12.1}",
            pct(0.5),
            pct(0.99),
            mean,
            2.0 * size as f64 / (pct(0.5) / 1000.0) / 1e6
        );
    }
    Ok(())
}

#[derive(Debug, Args)]
pub(crate) struct BenchSplitArgs {
    /// GGUF model to split.
    #[arg(long)]
    model: PathBuf,
    /// Number of layer ranges in the chain.
    #[arg(long, default_value_t = 3)]
    shards: u32,
    /// Tokens to generate.
    #[arg(long, default_value_t = 64)]
    tokens: u32,
    /// Threads per range.
    #[arg(long, default_value_t = 1)]
    threads: u32,
}

/// `swarmllm bench-split`: the whole model vs the same model as a chain of layer
/// ranges in one process (no network), greedy; prompt and decode tokens/s and the
/// activation bytes a token would put on the wire between two hops.
pub(crate) async fn run_split(args: &BenchSplitArgs) -> anyhow::Result<()> {
    use swarmllm_node::infer::layers::{RangeInput, RangeModel, RangeOutput, RangeSession};
    use swarmllm_node::pipeline::activation::Dtype;
    swarmllm_node::logging::init("human", "warn");
    let dir = tempfile::tempdir()?;
    let manifest =
        swarmllm_node::shard::import(&args.model, dir.path(), "m", args.shards, |_, _| {})?;
    let mdir = dir.path().join("m");
    let file = |a: u32, b: u32| -> anyhow::Result<PathBuf> {
        let out = dir.path().join(format!("r{a}-{b}.gguf"));
        swarmllm_node::shard::assemble(&mdir, &manifest, a, b, &out)?;
        Ok(out)
    };
    let whole = std::sync::Arc::new(RangeModel::load(&file(0, args.shards - 1)?, 0)?);
    let parts = (0..args.shards)
        .map(|i| Ok(std::sync::Arc::new(RangeModel::load(&file(i, i)?, 0)?)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let prompt = format!("<|im_start|>user\n{PROMPT}<|im_end|>\n<|im_start|>assistant\n");
    let tokens = parts[0].tokenize(&prompt)?;
    let argmax = |v: &[f32]| {
        v.iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(i, _)| i as i32)
            .unwrap_or(0)
    };
    let step =
        |chain: &mut Vec<RangeSession>, input: &[i32], pos: i32| -> anyhow::Result<Vec<f32>> {
            let mut out = chain[0].forward(RangeInput::Tokens(input), pos)?;
            for s in chain.iter_mut().skip(1) {
                let RangeOutput::Hidden(h) = out else {
                    return Err(anyhow!("expected hidden states"));
                };
                out = s.forward(RangeInput::Hidden(&h), pos)?;
            }
            match out {
                RangeOutput::Logits(l) => Ok(l),
                RangeOutput::Hidden(_) => Err(anyhow!("expected logits")),
            }
        };
    let mut results = Vec::new();
    for (label, models) in [
        ("whole model", vec![&whole]),
        ("chain of ranges", parts.iter().collect()),
    ] {
        let n = models.len();
        let mut chain = models
            .iter()
            .enumerate()
            .map(|(i, m)| Ok(m.session(2048, 512, args.threads, i + 1 < n)?))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let t0 = Instant::now();
        let mut logits = step(&mut chain, &tokens, 0)?;
        let prompt_secs = t0.elapsed().as_secs_f64();
        let t1 = Instant::now();
        let mut generated = Vec::new();
        let first_pos = tokens.len() as i32;
        for pos in first_pos..first_pos + args.tokens as i32 {
            let next = argmax(&logits);
            generated.push(next);
            logits = step(&mut chain, &[next], pos)?;
        }
        let decode_secs = t1.elapsed().as_secs_f64();
        results.push((
            label,
            tokens.len() as f64 / prompt_secs,
            args.tokens as f64 / decode_secs,
            generated,
        ));
    }
    println!(
        "{} | {}-token prompt | {} tokens | {} range(s) | {} thread(s)",
        args.model.display(),
        tokens.len(),
        args.tokens,
        args.shards,
        args.threads
    );
    println!(
        "{:<18} {:>14} {:>14}",
        "path", "prompt tok/s", "decode tok/s"
    );
    for (label, p, d, _) in &results {
        println!("{label:<18} {p:>14.1} {d:>14.1}");
    }
    println!(
        "ratio chain/whole {:>11.3} {:>14.3}   same tokens: {}",
        results[1].1 / results[0].1,
        results[1].2 / results[0].2,
        results[0].3 == results[1].3
    );
    let n_embd = whole.n_embd();
    println!(
        "activation payload per token per hop: f32 {} B, f16 {} B, 8-bit {} B (+56 B header and tag per frame)",
        Dtype::F32.payload_len(n_embd),
        Dtype::F16.payload_len(n_embd),
        Dtype::Q8.payload_len(n_embd)
    );
    Ok(())
}
