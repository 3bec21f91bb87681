//! The engine thread: owns the llama.cpp context and serves jobs in batches
//! (see `slots`).

use std::num::NonZeroU32;
use std::path::Path;
use std::sync::{Arc, OnceLock};

use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::sampling::LlamaSampler;
use serde::Serialize;
use tokio::sync::mpsc;

use super::slots::{self, EngineLoad};
use super::{Engine, EngineConfig, GenerateError, Job, LoadModelError, ModelInfo, SamplingParams};

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

/// Layers to offload for the engine's model: its whole context (every
/// parallel sequence's) counts against the GPUs' memory.
pub(super) fn offload(config: &EngineConfig) -> u32 {
    // The header is read only when there is a GPU to fill.
    let n_layers = || {
        crate::shard::gguf::Gguf::read_header(&config.model_path)
            .ok()
            .and_then(|g| g.block_count())
            .unwrap_or(0)
    };
    let tokens = u64::from(config.context_size) * config.parallel() as u64;
    super::gpu::layers_to_offload(config.gpu_layers, &config.model_path, n_layers, tokens)
}

pub(super) fn start(
    config: EngineConfig,
    mut progress: impl FnMut(f32) + Send + 'static,
) -> Result<Engine, LoadModelError> {
    if !config.model_path.is_file() {
        return Err(LoadModelError::NotFound(config.model_path.clone()));
    }
    let backend = backend(config.backends_dir.as_deref())?;
    let gpu_layers = offload(&config);
    let params = LlamaModelParams::default()
        .with_n_gpu_layers(gpu_layers)
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
    // The engine thread owns the model (it loads adapters into it); the
    // handle renders chat templates with a vocabulary-only copy.
    let vocab = LlamaModel::load_from_file(
        backend,
        &config.model_path,
        &LlamaModelParams::default().with_vocab_only(true),
    )
    .map_err(|e| LoadModelError::Load {
        path: config.model_path.clone(),
        message: e.to_string(),
    })?;
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
        gpu_layers: gpu_layers.min(model.n_layer().saturating_add(1)),
        has_chat_template: model.chat_template(None).is_ok(),
        loaded_at: chrono::Utc::now().timestamp(),
    });

    let (jobs_tx, jobs_rx) = mpsc::channel(config.max_queue.max(1));
    let load = Arc::new(EngineLoad::default());
    let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
    let thread_load = Arc::clone(&load);
    let thread_config = config.clone();
    std::thread::Builder::new()
        .name("swarmllm-engine".into())
        .spawn(move || run(model, thread_config, jobs_rx, thread_load, ready_tx))
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
        gpu_layers = info.gpu_layers,
        parallel = config.parallel(),
        "model loaded"
    );
    Ok(Engine {
        jobs: jobs_tx,
        model: Arc::new(vocab),
        info,
        load,
        max_queue: config.max_queue.max(1),
        context_size: config.context_size,
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
    mut model: LlamaModel,
    config: EngineConfig,
    mut jobs: mpsc::Receiver<Job>,
    load: Arc<EngineLoad>,
    ready: std::sync::mpsc::SyncSender<Result<(), LoadModelError>>,
) {
    let backend = match backend(None) {
        Ok(b) => b,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let parallel = config.parallel();
    let params = || {
        context_params(&config)
            .with_n_ctx(NonZeroU32::new(
                config.context_size.saturating_mul(parallel as u32),
            ))
            .with_n_seq_max(parallel as u32)
            .with_kv_unified(false)
    };
    let mut ready = Some(ready);
    let mut lanes = slots::Lanes::default();
    // One context at a time; a new one after each adapter load (see `lora`).
    loop {
        let mut ctx = match model.new_context(backend, params()) {
            Ok(ctx) => ctx,
            Err(e) => {
                let e = LoadModelError::Context(e.to_string());
                match ready.take() {
                    Some(ready) => {
                        let _ = ready.send(Err(e));
                    }
                    None => tracing::error!(error = %e, "the engine could not make a new context"),
                }
                return;
            }
        };
        if let Some(ready) = ready.take() {
            let _ = ready.send(Ok(()));
        }
        let exit = slots::run(
            &model,
            &mut ctx,
            config.context_size,
            parallel,
            &mut jobs,
            &load,
            &mut lanes,
        );
        drop(ctx);
        match exit {
            slots::Exit::Closed => break,
            slots::Exit::LoadAdapter(job) => {
                let loaded = match &job.request.adapter {
                    Some(choice) => lanes.loras.load(&mut model, choice),
                    None => Ok(()),
                };
                match loaded {
                    Ok(()) => lanes.pending = Some(*job),
                    Err(e) => {
                        let _ = job.events.try_send(super::Event::Failed(e));
                    }
                }
            }
        }
    }
    tracing::debug!("engine thread stopped");
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
/// The grammar sampler for `p.json_schema`, if it has one: llama.cpp converts
/// the schema to a grammar and parses it against `model`'s vocabulary.
fn grammar_sampler(
    model: &LlamaModel,
    p: &SamplingParams,
) -> Result<Option<LlamaSampler>, GenerateError> {
    let Some(schema) = p.json_schema.as_deref() else {
        return Ok(None);
    };
    let grammar = schema_grammar(schema)?;
    LlamaSampler::grammar(model, &grammar, "root")
        .map(Some)
        .map_err(|e| GenerateError::Grammar(e.to_string()))
}

/// llama.cpp's grammar for a JSON schema.
pub fn schema_grammar(schema: &str) -> Result<String, GenerateError> {
    llama_cpp_2::json_schema_to_grammar(schema).map_err(|e| {
        GenerateError::Grammar(format!("the schema cannot be turned into a grammar: {e}"))
    })
}

/// The sampler for a sequence that already produced `prime` (a split
/// model's last hop taking over a generation): every sampler sees those
/// tokens, and the grammar first checks each one is allowed, because
/// llama.cpp aborts the process when a grammar accepts a token it forbids
/// (and `prime` comes from the requester).
pub(crate) fn primed_sampler(
    vocab: Option<&LlamaModel>,
    n_vocab: i32,
    p: &SamplingParams,
    prime: &[i32],
) -> Result<LlamaSampler, GenerateError> {
    use llama_cpp_2::token::LlamaToken;
    use llama_cpp_2::token::data::LlamaTokenData;
    use llama_cpp_2::token::data_array::LlamaTokenDataArray;
    let mut grammar = match (vocab, &p.json_schema) {
        (Some(model), Some(_)) => grammar_sampler(model, p)?,
        (None, Some(_)) => {
            return Err(GenerateError::Grammar(
                "no vocabulary to build the grammar with".into(),
            ));
        }
        (_, None) => None,
    };
    let mut rest = build_sampler(n_vocab, p, None);
    for &t in prime {
        let token = LlamaToken(t);
        if let Some(g) = grammar.as_mut() {
            let mut one =
                LlamaTokenDataArray::new(vec![LlamaTokenData::new(token, 0.0, 0.0)], false);
            one.apply_sampler(g);
            if !one.data.first().is_some_and(|d| d.logit().is_finite()) {
                return Err(GenerateError::Grammar(format!(
                    "primed token {t} is not allowed by the grammar"
                )));
            }
            g.accept(token);
        }
        rest.accept(token);
    }
    Ok(match grammar {
        Some(g) => LlamaSampler::chain_simple([g, rest]),
        None => rest,
    })
}

/// The sampler chain for `p`: the grammar first (it masks the tokens the
/// grammar forbids), then penalties, then greedy or top-k/top-p/min-p,
/// temperature and a seeded draw.
fn build_sampler(n_vocab: i32, p: &SamplingParams, grammar: Option<LlamaSampler>) -> LlamaSampler {
    let mut chain = Vec::with_capacity(7);
    chain.extend(grammar);
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
