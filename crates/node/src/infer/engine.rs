//! The engine thread: owns the llama.cpp context and runs jobs one after another.

use std::num::NonZeroU32;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::sampling::LlamaSampler;
use serde::Serialize;
use tokio::sync::mpsc;

use super::stop::{Pushed, TextOut, prompt_tokens};
use super::{
    Engine, EngineConfig, Event, FinishReason, GenerateError, Job, LoadModelError, ModelInfo,
    SamplingParams, Timing, Usage,
};

/// llama.cpp's global backend: initialised once per process.
static BACKEND: OnceLock<Result<LlamaBackend, String>> = OnceLock::new();

/// Initialises llama.cpp once (loading dynamic backend modules first in `gpu`
/// builds) and routes its logs into `tracing`.
pub(crate) fn backend(
    backends_dir: Option<&Path>,
) -> Result<&'static LlamaBackend, LoadModelError> {
    BACKEND
        .get_or_init(|| {
            llama_cpp_2::send_logs_to_tracing(llama_cpp_2::LogOptions::default());
            #[cfg(feature = "gpu")]
            load_backend_modules(backends_dir);
            #[cfg(not(feature = "gpu"))]
            let _ = backends_dir;
            LlamaBackend::init().map_err(|e| e.to_string())
        })
        .as_ref()
        .map_err(|e| LoadModelError::Backend(e.clone()))
}

/// Loads ggml backend modules (CPU variants, CUDA, Vulkan, …) from `dir`, else from
/// `backends/` beside the executable, else from the executable's own folder.
#[cfg(feature = "gpu")]
fn load_backend_modules(dir: Option<&Path>) {
    let exe_dir = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf));
    let candidates = dir
        .map(Path::to_path_buf)
        .into_iter()
        .chain(exe_dir.iter().map(|d| d.join("backends")))
        .chain(exe_dir.iter().cloned());
    for candidate in candidates {
        if candidate.is_dir() && candidate.to_str().is_some() {
            tracing::info!(dir = %candidate.display(), "loading ggml backend modules");
            llama_cpp_2::llama_backend::load_backends_from_path(&candidate);
            return;
        }
    }
    tracing::warn!("no ggml backend folder found; only built-in backends are available");
}

/// A compute device llama.cpp can use.
#[derive(Debug, Clone, Serialize)]
pub struct DeviceInfo {
    /// Device name (`CPU`, `CUDA0`, …).
    pub name: String,
    /// Human description (the GPU model for GPUs).
    pub description: String,
    /// Backend (`CPU`, `CUDA`, `Vulkan`, `Metal`).
    pub backend: String,
    /// `cpu`, `gpu`, `igpu`, `accelerator` or `unknown`.
    pub kind: &'static str,
    /// Total memory in bytes.
    pub memory_total: u64,
    /// Free memory in bytes.
    pub memory_free: u64,
}

/// The devices llama.cpp sees (after loading backend modules in `gpu` builds).
pub fn backend_devices() -> Vec<DeviceInfo> {
    use llama_cpp_2::LlamaBackendDeviceType as T;
    if backend(None).is_err() {
        return Vec::new();
    }
    llama_cpp_2::list_llama_ggml_backend_devices()
        .into_iter()
        .map(|d| DeviceInfo {
            name: d.name,
            description: d.description,
            backend: d.backend,
            kind: match d.device_type {
                T::Cpu => "cpu",
                T::Gpu => "gpu",
                T::IntegratedGpu => "igpu",
                T::Accelerator => "accelerator",
                T::Unknown => "unknown",
            },
            memory_total: d.memory_total as u64,
            memory_free: d.memory_free as u64,
        })
        .collect()
}

pub(super) fn start(
    config: EngineConfig,
    mut progress: impl FnMut(f32) + Send + 'static,
) -> Result<Engine, LoadModelError> {
    if !config.model_path.is_file() {
        return Err(LoadModelError::NotFound(config.model_path.clone()));
    }
    let backend = backend(config.backends_dir.as_deref())?;
    let params = LlamaModelParams::default()
        .with_n_gpu_layers(config.gpu_layers)
        .with_progress_callback(move |p| {
            progress(p);
            true
        });
    let model = LlamaModel::load_from_file(backend, &config.model_path, &params).map_err(|e| {
        LoadModelError::Load {
            path: config.model_path.clone(),
            message: e.to_string(),
        }
    })?;
    let model = Arc::new(model);
    let info = Arc::new(ModelInfo {
        id: config.model_id.clone(),
        path: config.model_path.clone(),
        architecture: model
            .meta_val_str("general.architecture")
            .unwrap_or_else(|_| "unknown".into()),
        n_params: model.n_params(),
        size_bytes: model.size(),
        n_layers: model.n_layer(),
        n_embd: model.n_embd(),
        n_vocab: model.n_vocab(),
        n_ctx_train: model.n_ctx_train(),
        context_size: config.context_size,
        has_chat_template: model.chat_template(None).is_ok(),
        loaded_at: chrono::Utc::now().timestamp(),
    });

    let (jobs_tx, jobs_rx) = mpsc::channel(config.max_queue.max(1));
    let waiting = Arc::new(AtomicUsize::new(0));
    let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
    let thread_model = Arc::clone(&model);
    let thread_waiting = Arc::clone(&waiting);
    let thread_config = config.clone();
    std::thread::Builder::new()
        .name("swarmllm-engine".into())
        .spawn(move || {
            run(
                thread_model,
                thread_config,
                jobs_rx,
                thread_waiting,
                ready_tx,
            )
        })
        .map_err(|e| LoadModelError::Thread(e.to_string()))?;
    ready_rx
        .recv()
        .map_err(|_| LoadModelError::Thread("engine thread exited during start-up".into()))??;

    tracing::info!(
        model = %info.id,
        arch = %info.architecture,
        layers = info.n_layers,
        params = info.n_params,
        threads = config.threads,
        gpu_layers = config.gpu_layers,
        "model loaded"
    );
    Ok(Engine {
        jobs: jobs_tx,
        model,
        info,
        waiting,
        max_queue: config.max_queue.max(1),
    })
}

pub(crate) fn context_params(config: &EngineConfig) -> LlamaContextParams {
    let threads = config.threads.max(1) as i32;
    LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(config.context_size))
        .with_n_batch(config.batch_size)
        .with_n_ubatch(config.batch_size.min(512))
        .with_n_threads(threads)
        .with_n_threads_batch(threads)
}

fn run(
    model: Arc<LlamaModel>,
    config: EngineConfig,
    mut jobs: mpsc::Receiver<Job>,
    waiting: Arc<AtomicUsize>,
    ready: std::sync::mpsc::SyncSender<Result<(), LoadModelError>>,
) {
    let backend = match backend(None) {
        Ok(b) => b,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let mut ctx = match model.new_context(backend, context_params(&config)) {
        Ok(ctx) => ctx,
        Err(e) => {
            let _ = ready.send(Err(LoadModelError::Context(e.to_string())));
            return;
        }
    };
    let _ = ready.send(Ok(()));
    let mut batch = LlamaBatch::new(config.batch_size as usize, 1);

    // The loop ends when every Engine handle (and so every sender) is dropped.
    while let Some(job) = jobs.blocking_recv() {
        waiting.fetch_sub(1, Ordering::AcqRel);
        if job.events.is_closed() {
            continue; // the client left while the job was queued
        }
        let events = job.events.clone();
        // llama-cpp-2 panics on a few "impossible" FFI results; one bad request must
        // not take the engine (and every later request) down with it.
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            run_job(&model, &mut ctx, &mut batch, job)
        }));
        if outcome.is_err() {
            tracing::error!("inference job panicked; the engine continues");
            ctx.clear_kv_cache();
            let _ = events.blocking_send(Event::Failed(GenerateError::Decode(
                "internal error in the inference engine".into(),
            )));
        }
    }
    tracing::debug!("engine thread stopped");
}

/// Runs one job to completion, cancellation or failure.
fn run_job(model: &LlamaModel, ctx: &mut LlamaContext<'_>, batch: &mut LlamaBatch<'_>, job: Job) {
    let Job {
        request,
        events,
        enqueued,
    } = job;
    let started = Instant::now();
    let queue_ms = started.duration_since(enqueued).as_millis() as u64;
    let fail = |e: GenerateError| {
        let _ = events.blocking_send(Event::Failed(e));
    };

    let n_ctx = ctx.n_ctx();
    let tokens = match prompt_tokens(model, &request.prompt, n_ctx) {
        Ok(t) => t,
        Err(e) => return fail(e),
    };
    let prompt_tokens = tokens.len() as u32;
    if events
        .blocking_send(Event::Started {
            prompt_tokens,
            queue_ms,
        })
        .is_err()
    {
        return;
    }

    ctx.clear_kv_cache();
    if let Err(e) = decode_prompt(ctx, batch, &tokens) {
        ctx.clear_kv_cache();
        return fail(e);
    }
    let prompt_ms = started.elapsed().as_millis() as u64;

    let params = &request.params;
    let mut sampler = build_sampler(model.n_vocab(), params);
    let mut out = TextOut::new(params.stop.clone());
    let mut n_cur = tokens.len() as i32;
    let mut generated: u32 = 0;
    let mut logits_index = batch.n_tokens() - 1;

    let finish_reason = loop {
        if generated >= params.max_tokens {
            break FinishReason::Length;
        }
        if events.is_closed() {
            return; // client disconnected: cancel
        }
        let token = sampler.sample(ctx, logits_index);
        if !params.ignore_eos && model.vocab().is_eog(token) {
            break FinishReason::Stop;
        }
        generated += 1;

        match out.push(model, token) {
            Pushed::Emit(text) => {
                if !text.is_empty() && events.blocking_send(Event::Token(text)).is_err() {
                    return;
                }
            }
            Pushed::Stop(text) => {
                if !text.is_empty() && events.blocking_send(Event::Token(text)).is_err() {
                    return;
                }
                break FinishReason::Stop;
            }
        }

        if n_cur as u32 >= n_ctx {
            break FinishReason::Length;
        }
        batch.clear();
        if let Err(e) = batch.add(token, n_cur, &[0], true) {
            return fail(GenerateError::Decode(e.to_string()));
        }
        if let Err(e) = ctx.decode(batch) {
            return fail(GenerateError::Decode(e.to_string()));
        }
        n_cur += 1;
        logits_index = 0;
    };

    let rest = out.finish();
    if !rest.is_empty() && events.blocking_send(Event::Token(rest)).is_err() {
        return;
    }
    let _ = events.blocking_send(Event::Done {
        finish_reason,
        usage: Usage {
            prompt_tokens,
            completion_tokens: generated,
            total_tokens: prompt_tokens + generated,
        },
        timing: Timing {
            queue_ms,
            inference_ms: started.elapsed().as_millis() as u64,
            prompt_ms,
        },
    });
}

/// Feeds the prompt through the model in `batch`-sized chunks; only the last
/// token's logits are computed.
pub(crate) fn decode_prompt(
    ctx: &mut LlamaContext<'_>,
    batch: &mut LlamaBatch<'_>,
    tokens: &[llama_cpp_2::token::LlamaToken],
) -> Result<(), GenerateError> {
    let chunk_size = ctx.n_batch() as usize;
    let last = tokens.len() - 1;
    for (chunk_index, chunk) in tokens.chunks(chunk_size).enumerate() {
        batch.clear();
        for (j, &token) in chunk.iter().enumerate() {
            let pos = chunk_index * chunk_size + j;
            batch
                .add(token, pos as i32, &[0], pos == last)
                .map_err(|e| GenerateError::Decode(e.to_string()))?;
        }
        ctx.decode(batch)
            .map_err(|e| GenerateError::Decode(e.to_string()))?;
    }
    Ok(())
}

/// llama.cpp's sampler chain for `p` (also used by the last hop of a pipeline, so
/// split and local generation sample alike).
pub(crate) fn build_sampler(n_vocab: i32, p: &SamplingParams) -> LlamaSampler {
    let mut chain = Vec::with_capacity(6);
    if p.repeat_penalty != 1.0 {
        chain.push(LlamaSampler::penalties(
            n_vocab,
            p.repeat_last_n,
            p.repeat_penalty,
            0.0,
            0.0,
        ));
    }
    if p.temperature <= 0.0 {
        chain.push(LlamaSampler::greedy());
    } else {
        if p.top_k > 0 {
            chain.push(LlamaSampler::top_k(p.top_k));
        }
        if p.top_p < 1.0 {
            chain.push(LlamaSampler::top_p(p.top_p, 1));
        }
        if p.min_p > 0.0 {
            chain.push(LlamaSampler::min_p(p.min_p, 1));
        }
        chain.push(LlamaSampler::temp(p.temperature));
        chain.push(LlamaSampler::dist(p.seed.unwrap_or_else(rand::random)));
    }
    LlamaSampler::chain_simple(chain)
}
