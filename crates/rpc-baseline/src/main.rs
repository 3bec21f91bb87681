//! `swarmllm-rpc-baseline`: what llama.cpp's own RPC backend makes of the 2-way
//! split that `swarmllm bench-pipeline` measures, as a yardstick.
//!
//! The same GGUF, one thread per process, greedy decoding with a bare llama-cpp-2
//! loop (no HTTP): first the whole model in this process, then the same model
//! with its last `--remote-layers` layers and the output head on an RPC server
//! (this binary with `--serve`, a second process on loopback). llama.cpp then
//! runs the first layers here, ships the hidden state to the server for the
//! rest, and reads the logits back: one round trip per token, like a 2-node
//! chain.
//!
//! llama-cpp-2 has no switch for the RPC backend, but llama-cpp-sys-2 hands every
//! `GGML_*` environment variable to CMake, so `GGML_RPC=ON` plus this crate's
//! `rpc` feature (which declares the two entry points) builds it:
//! `scripts/bench-llama-rpc`.

use std::num::NonZeroU32;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};
use clap::Parser;
use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::sampling::LlamaSampler;

#[derive(Debug, Parser)]
#[command(about = "llama.cpp's RPC backend on the 2-way split bench-pipeline measures")]
struct Args {
    /// The GGUF model.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Tokens to generate per run.
    #[arg(long, default_value_t = 128)]
    tokens: u32,
    /// Measured runs per configuration (after one warm-up).
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Layers (the last ones) the RPC server runs, with the output head (as the
    /// second node of a 2-node chain does: 15 of SmolLM2's 30).
    #[arg(long, default_value_t = 15)]
    remote_layers: u32,
    /// Run as the RPC server on this address (the benchmark starts it itself).
    #[arg(long)]
    serve: Option<String>,
    /// Keep llama.cpp's log (it says which device got which layers).
    #[arg(long)]
    verbose: bool,
}

const PROMPT: &str = "Explain, step by step, how a chain of computers can run one language \
model together when each holds only some of its layers, and what happens when one of them \
disappears in the middle of an answer.";

#[cfg(feature = "rpc")]
mod rpc {
    pub(crate) use std::ffi::CString;
    use std::ffi::c_char;

    use llama_cpp_sys_2::{ggml_backend_dev_t, ggml_backend_reg_t};

    // ggml-rpc.h (not in llama-cpp-sys-2's bindings).
    unsafe extern "C" {
        pub(crate) fn ggml_backend_rpc_start_server(
            endpoint: *const c_char,
            cache_dir: *const c_char,
            n_threads: usize,
            n_devices: usize,
            devices: *mut ggml_backend_dev_t,
        );
        pub(crate) fn ggml_backend_rpc_add_server(endpoint: *const c_char) -> ggml_backend_reg_t;
    }
}

/// Serves this machine's CPU over llama.cpp's RPC protocol until killed.
#[cfg(feature = "rpc")]
fn serve(endpoint: &str) -> anyhow::Result<()> {
    let _backend = LlamaBackend::init()?;
    let endpoint = rpc::CString::new(endpoint)?;
    // SAFETY: the backend registry is initialised (LlamaBackend::init); the CPU
    // device pointer comes from it and lives for the process; `endpoint` outlives
    // the call, which blocks serving connections.
    unsafe {
        let mut cpu = llama_cpp_sys_2::ggml_backend_dev_by_type(
            llama_cpp_sys_2::GGML_BACKEND_DEVICE_TYPE_CPU,
        );
        if cpu.is_null() {
            return Err(anyhow!("no CPU device"));
        }
        rpc::ggml_backend_rpc_start_server(endpoint.as_ptr(), std::ptr::null(), 1, 1, &mut cpu);
    }
    Ok(())
}

/// Makes the RPC server at `endpoint` a device that models can offload layers to.
#[cfg(feature = "rpc")]
fn add_server(endpoint: &str) -> anyhow::Result<()> {
    let endpoint = rpc::CString::new(endpoint)?;
    // SAFETY: `endpoint` is a valid C string for the call; the returned registry
    // entry is owned by ggml for the life of the process.
    unsafe {
        let reg = rpc::ggml_backend_rpc_add_server(endpoint.as_ptr());
        if reg.is_null() {
            return Err(anyhow!("the RPC server did not register"));
        }
        llama_cpp_sys_2::ggml_backend_register(reg);
    }
    Ok(())
}

#[cfg(not(feature = "rpc"))]
fn serve(_: &str) -> anyhow::Result<()> {
    Err(anyhow!(
        "built without llama.cpp's RPC backend: run scripts/bench-llama-rpc"
    ))
}

#[cfg(not(feature = "rpc"))]
fn add_server(_: &str) -> anyhow::Result<()> {
    serve("")
}

struct Run {
    prompt_tps: f64,
    decode_tps: f64,
}

/// One greedy generation of `n` tokens (end-of-generation ignored).
fn generate(backend: &LlamaBackend, model: &LlamaModel, n: u32) -> anyhow::Result<Run> {
    let params = LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(1024))
        .with_n_batch(512)
        .with_n_threads(1)
        .with_n_threads_batch(1);
    let mut ctx = model.new_context(backend, params)?;
    let tokens = model.vocab().tokenize(PROMPT.as_bytes(), true, true);
    let mut batch = LlamaBatch::new(512, 1);
    let last = tokens.len() - 1;
    for (i, t) in tokens.iter().enumerate() {
        batch.add(*t, i as i32, &[0], i == last)?;
    }
    let mut sampler = LlamaSampler::greedy();
    let t0 = Instant::now();
    ctx.decode(&mut batch)?;
    let mut token = sampler.sample(&ctx, batch.n_tokens() - 1);
    let prompt_secs = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    for pos in tokens.len() as i32..tokens.len() as i32 + n as i32 - 1 {
        batch.clear();
        batch.add(token, pos, &[0], true)?;
        ctx.decode(&mut batch)?;
        token = sampler.sample(&ctx, 0);
    }
    Ok(Run {
        prompt_tps: tokens.len() as f64 / prompt_secs,
        decode_tps: f64::from(n - 1) / t1.elapsed().as_secs_f64(),
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

fn measure(
    backend: &LlamaBackend,
    path: &PathBuf,
    gpu_layers: u32,
    args: &Args,
) -> anyhow::Result<(f64, f64)> {
    let params = LlamaModelParams::default().with_n_gpu_layers(gpu_layers);
    let model = LlamaModel::load_from_file(backend, path, &params)?;
    generate(backend, &model, args.tokens)?; // warm-up
    let mut runs = Vec::new();
    for _ in 0..args.runs {
        runs.push(generate(backend, &model, args.tokens)?);
    }
    Ok((
        median(runs.iter().map(|r| r.prompt_tps).collect()),
        median(runs.iter().map(|r| r.decode_tps).collect()),
    ))
}

struct Server(std::process::Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(endpoint) = &args.serve {
        return serve(endpoint);
    }
    let path = args
        .model
        .clone()
        .ok_or_else(|| anyhow!("--model is required"))?;
    if !path.is_file() {
        return Err(anyhow!("{} is not a file", path.display()));
    }
    let mut backend = LlamaBackend::init()?;
    if !args.verbose {
        backend.void_logs();
    }
    let local = measure(&backend, &path, 0, &args)?;

    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let endpoint = format!("127.0.0.1:{port}");
    let _server = Server(
        std::process::Command::new(std::env::current_exe()?)
            .args(["--serve", &endpoint])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .context("starting the RPC server")?,
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(&endpoint).is_err() {
        if Instant::now() > deadline {
            return Err(anyhow!("the RPC server did not start"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    add_server(&endpoint)?;
    // llama.cpp counts the output head as one more offloadable layer.
    let split = measure(&backend, &path, args.remote_layers + 1, &args)?;

    println!(
        "{} | {} tokens | {} run(s) | 1 thread per process | llama.cpp RPC, last {} layers remote",
        path.display(),
        args.tokens,
        args.runs,
        args.remote_layers
    );
    println!(
        "{:<28} {:>12} {:>12} {:>8}",
        "configuration", "prompt tok/s", "decode tok/s", "ratio"
    );
    for (label, (prompt, decode)) in [
        ("local (whole model)", local),
        ("llama.cpp RPC 2-way", split),
    ] {
        println!(
            "{label:<28} {prompt:>12.1} {decode:>12.1} {:>8.3}",
            decode / local.1
        );
    }
    Ok(())
}
