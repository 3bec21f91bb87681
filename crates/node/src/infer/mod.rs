//! Local inference on llama.cpp (through `llama-cpp-2`).
//!
//! ```text
//!  HTTP handlers ──submit(GenerateRequest)──▶ bounded job queue ──▶ engine thread
//!        ▲                                                           │ (owns the
//!        └──────────── Event stream (bounded mpsc per request) ◀─────┘  llama context)
//! ```
//!
//! A llama.cpp context is not `Send`, so one OS thread owns it. It serves up to
//! `max_parallel` jobs at once, each in its own sequence, decoded together in one
//! batch per step (continuous batching, see `slots`); more wait, taken in turn
//! across clients and in arrival order within one (see `fair`: a burst from one
//! client neither crashes the node nor starves another; past `max_queue`
//! waiting jobs, or past half of them from one client, new ones are refused). Each job streams [`Event`]s back
//! over its own channel; when the receiver is dropped (the client went away) the
//! engine notices at the next step and frees that sequence.

mod engine;
mod fair;
pub mod gpu;
pub mod logprobs;
mod lora;
mod slots;
pub mod speculation;
mod stop;

pub mod layers;

pub mod bench;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use llama_cpp_2::model::{LlamaChatMessage, LlamaModel};
use serde::Serialize;
use tokio::sync::mpsc;

pub use engine::schema_grammar;
pub use engine::{DeviceInfo, backend_devices};
pub(crate) use engine::{backend, primed_sampler};
pub(crate) use stop::{Pushed, TextOut, prompt_tokens};

/// How to load a model.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// The GGUF file.
    pub model_path: PathBuf,
    /// Id the model is served under.
    pub model_id: String,
    /// Inference threads (≥ 1).
    pub threads: u32,
    /// Layers to offload to a GPU backend (`auto`: what fits, see [`gpu`]).
    pub gpu_layers: crate::config::GpuLayers,
    /// Context window in tokens.
    pub context_size: u32,
    /// Prompt-processing batch size.
    pub batch_size: u32,
    /// Jobs allowed to wait; more are refused.
    pub max_queue: usize,
    /// Requests decoded together (each with its own `context_size` of KV
    /// cache); 0 picks one from the context size (see [`EngineConfig::parallel`]).
    pub max_parallel: usize,
    /// Folder of ggml backend modules (`gpu` feature), if any.
    pub backends_dir: Option<PathBuf>,
}

impl EngineConfig {
    /// Sequences decoded together: `max_parallel`, or when 0, as many as fit
    /// 16,384 tokens of KV cache in all (4 at the default 4,096-token context),
    /// between 1 and 4; never more than the batch holds.
    pub fn parallel(&self) -> usize {
        let n = if self.max_parallel > 0 {
            self.max_parallel
        } else {
            (16_384 / self.context_size.max(1) as usize).clamp(1, 4)
        };
        n.clamp(1, (self.batch_size.max(1) as usize).min(MAX_PARALLEL))
    }
}

/// The most sequences one engine decodes together.
pub const MAX_PARALLEL: usize = 64;

/// Loading a model failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoadModelError {
    /// The file does not exist or cannot be read.
    #[error("model file {0} not found")]
    NotFound(PathBuf),
    /// llama.cpp could not initialise.
    #[error("llama.cpp backend failed to initialise: {0}")]
    Backend(String),
    /// llama.cpp rejected the file.
    #[error("llama.cpp could not load {path}: {message}")]
    Load {
        /// The file.
        path: PathBuf,
        /// What llama.cpp said.
        message: String,
    },
    /// The context could not be created (usually out of memory).
    #[error("could not create an inference context: {0}")]
    Context(String),
    /// The engine thread could not be started.
    #[error("could not start the engine thread: {0}")]
    Thread(String),
}

/// Facts about the loaded model.
#[derive(Debug, Clone, Serialize)]
pub struct ModelInfo {
    /// Id the model is served under.
    pub id: String,
    /// The GGUF file.
    pub path: PathBuf,
    /// `general.architecture`.
    pub architecture: String,
    /// Parameter count.
    pub n_params: u64,
    /// Size of the weights in bytes.
    pub size_bytes: u64,
    /// Transformer layers.
    pub n_layers: u32,
    /// Hidden size.
    pub n_embd: i32,
    /// Vocabulary size.
    pub n_vocab: i32,
    /// Context the model was trained with.
    pub n_ctx_train: u32,
    /// Context window the node serves.
    pub context_size: u32,
    /// Layers offloaded to a GPU (the output layer counts as one more).
    pub gpu_layers: u32,
    /// Whether the GGUF carries a chat template.
    pub has_chat_template: bool,
    /// Unix time the model was loaded.
    pub loaded_at: i64,
}

/// Sampling and stopping parameters of one generation.
#[derive(Debug, Clone)]
pub struct SamplingParams {
    /// 0 selects greedy decoding.
    pub temperature: f32,
    /// Nucleus threshold (1.0 = off).
    pub top_p: f32,
    /// Top-k (0 = off).
    pub top_k: i32,
    /// Min-p (0.0 = off).
    pub min_p: f32,
    /// Repeat penalty (1.0 = off).
    pub repeat_penalty: f32,
    /// Tokens the repeat penalty looks back over.
    pub repeat_last_n: i32,
    /// RNG seed; `None` picks a random one.
    pub seed: Option<u32>,
    /// Tokens to generate at most.
    pub max_tokens: u32,
    /// Generation stops before any of these strings.
    pub stop: Vec<String>,
    /// Keep generating past end-of-generation tokens (benchmarks).
    pub ignore_eos: bool,
    /// Reuse a cached prompt prefix (llama-server's `cache_prompt`; off only
    /// to measure cold prompts).
    pub cache_prompt: bool,
    /// A JSON schema (its text) every answer must follow (`response_format`):
    /// where the sampling happens, llama.cpp turns it into a grammar. A schema,
    /// not a grammar, travels to a split model's last hop, so a hop only ever
    /// runs grammars llama.cpp's own converter wrote.
    pub json_schema: Option<String>,
    /// Report each sampled token's log-probability with this many
    /// alternatives (0–[`logprobs::MAX_TOP_LOGPROBS`]); `None`: none.
    pub logprobs: Option<u8>,
    /// Draft tokens per step of speculative decoding (llama-server's
    /// `speculative.n_max`; 0 off). `None`: through a split model the node's
    /// `speculative_tokens`, on the engine none (on a CPU a step of drafts
    /// costs several single-token steps, which only a high acceptance repays;
    /// across links every step pays a round trip, which one accepted draft
    /// repays).
    pub speculative: Option<u32>,
}

/// The longest `json_schema` accepted (a response format's schema is rarely
/// over a KiB; it travels with every sampled step of a split model).
pub const MAX_SCHEMA_BYTES: usize = 16 << 10;

/// A sampling parameter out of its range: which one and why.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct InvalidSampling {
    /// The parameter's name in the API (`temperature`, `top_k`, …).
    pub field: &'static str,
    /// What is wrong.
    pub message: String,
}

/// Where a generation runs, for the checks that depend on it.
#[derive(Debug, Clone, Copy, Default)]
pub struct SamplingLimits {
    /// The model's vocabulary size, when known (bounds `top_k`).
    pub n_vocab: Option<u32>,
    /// The context window, when known (bounds `repeat_last_n`).
    pub n_ctx: Option<u32>,
}

impl SamplingParams {
    /// Whether each token depends on its row's logits alone (greedy, no
    /// penalties, grammar or log-probabilities): then a row verified in a
    /// batch of draft tokens picks what it would have picked alone, and
    /// speculative decoding cannot change the text.
    pub fn speculation_safe(&self) -> bool {
        self.temperature <= 0.0
            && self.repeat_penalty == 1.0
            && self.json_schema.is_none()
            && self.logprobs.is_none()
    }

    /// The one range check of sampling parameters: the HTTP API runs it on every
    /// request and a range host on every step a peer sends. Floats must be finite
    /// and in range; `top_k` 0 or positive (and within the vocabulary when known);
    /// `repeat_last_n` -1 (the whole context) to the context size.
    pub fn validate(&self, limits: SamplingLimits) -> Result<(), InvalidSampling> {
        let bad = |field: &'static str, message: String| InvalidSampling { field, message };
        let within = |field: &'static str, v: f32, lo: f32, hi: f32| {
            if v.is_finite() && (lo..=hi).contains(&v) {
                Ok(())
            } else {
                Err(bad(field, format!("must be between {lo} and {hi}")))
            }
        };
        within("temperature", self.temperature, 0.0, 2.0)?;
        within("top_p", self.top_p, 0.0, 1.0)?;
        if self.top_p <= 0.0 {
            return Err(bad("top_p", "must be greater than 0".into()));
        }
        within("min_p", self.min_p, 0.0, 1.0)?;
        within("repeat_penalty", self.repeat_penalty, 0.0, 10.0)?;
        if self.repeat_penalty <= 0.0 {
            return Err(bad("repeat_penalty", "must be greater than 0".into()));
        }
        if self.top_k < 0 {
            return Err(bad("top_k", "must be 0 (off) or positive".into()));
        }
        if let Some(n_vocab) = limits.n_vocab
            && self.top_k as u32 > n_vocab
        {
            return Err(bad(
                "top_k",
                format!("must be at most the vocabulary's {n_vocab} tokens"),
            ));
        }
        if self
            .json_schema
            .as_ref()
            .is_some_and(|s| s.len() > MAX_SCHEMA_BYTES)
        {
            return Err(bad(
                "response_format",
                format!("the schema is over {MAX_SCHEMA_BYTES} bytes"),
            ));
        }
        if self
            .logprobs
            .is_some_and(|k| k > logprobs::MAX_TOP_LOGPROBS)
        {
            return Err(bad(
                "top_logprobs",
                format!("must be between 0 and {}", logprobs::MAX_TOP_LOGPROBS),
            ));
        }
        let max_last_n = limits.n_ctx.map_or(1 << 20, |n| n as i32);
        if self.repeat_last_n < -1 || self.repeat_last_n > max_last_n {
            return Err(bad(
                "repeat_last_n",
                format!("must be between -1 and {max_last_n}"),
            ));
        }
        Ok(())
    }
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.8,
            top_p: 0.95,
            top_k: 40,
            min_p: 0.05,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            seed: None,
            max_tokens: 256,
            stop: Vec::new(),
            ignore_eos: false,
            cache_prompt: true,
            json_schema: None,
            logprobs: None,
            speculative: None,
        }
    }
}

/// One chat turn.
#[derive(Debug, Clone)]
pub struct ChatTurn {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text.
    pub content: String,
}

/// A generation job.
#[derive(Debug)]
pub struct GenerateRequest {
    /// The full prompt text (chat prompts are already templated).
    pub prompt: String,
    /// Sampling and stopping.
    pub params: SamplingParams,
    /// Who asked: the client key's id, or [`NODE_CLIENT`] for the node's own
    /// key. The engine shares its queue fairly among clients.
    pub client: String,
    /// The LoRA adapter to run with, if any.
    pub adapter: Option<LoraChoice>,
}

/// A LoRA adapter a request runs with (see [`crate::adapters`]).
#[derive(Debug, Clone, PartialEq)]
pub struct LoraChoice {
    /// The GGUF adapter llama.cpp loads.
    pub file: std::path::PathBuf,
    /// Its BLAKE3: the engine keys loaded adapters by it.
    pub digest: String,
    /// Its strength; llama.cpp multiplies it by alpha / rank.
    pub scale: f32,
}

/// The client name of requests made with the node's own API key.
pub const NODE_CLIENT: &str = "node";

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// End-of-generation token or a stop sequence.
    Stop,
    /// `max_tokens` or the context window was reached.
    Length,
}

impl FinishReason {
    /// The OpenAI spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// Token counts of a generation.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Usage {
    /// Prompt tokens.
    pub prompt_tokens: u32,
    /// Generated tokens.
    pub completion_tokens: u32,
    /// Sum of both.
    pub total_tokens: u32,
    /// Of the prompt tokens, those reused from the KV cache (OpenAI's shape).
    pub prompt_tokens_details: PromptTokensDetails,
}

/// Where the prompt tokens came from.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct PromptTokensDetails {
    /// Prompt tokens found in a sequence's KV cache (a conversation's earlier
    /// turns, a shared system prompt) and not computed again.
    pub cached_tokens: u32,
}

/// Where the time went.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Timing {
    /// Waiting for the engine.
    pub queue_ms: u64,
    /// Prompt processing plus generation.
    pub inference_ms: u64,
    /// Prompt processing alone.
    pub prompt_ms: u64,
    /// A split generation's route, predicted and measured.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub route: Option<Box<crate::pipeline::route::RouteReport>>,
}

/// What the engine reports about one job, in order: `Started`, `Token`*, then
/// `Done` or `Failed`.
#[derive(Debug, Clone)]
pub enum Event {
    /// The engine picked the job up and tokenized its prompt.
    Started {
        /// Prompt length in tokens.
        prompt_tokens: u32,
        /// Milliseconds the job waited in the queue.
        queue_ms: u64,
    },
    /// Generated text (one or more tokens' worth; never part of a stop sequence).
    Token(String),
    /// A sampled token's log-probability (when asked for), sent before the
    /// `Token` that carries its text (which a stop sequence may hold back, or
    /// cut: a stop sequence's tokens have no text).
    Logprob(logprobs::TokenLogprob),
    /// Generation finished.
    Done {
        /// Why.
        finish_reason: FinishReason,
        /// Token counts.
        usage: Usage,
        /// Timings.
        timing: Timing,
        /// What the answer costs this node, in micro-credits: the price of the
        /// work other nodes did for it at their rates (0 when served here).
        cost: i64,
    },
    /// Generation failed.
    Failed(GenerateError),
}

/// A generation failed.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum GenerateError {
    /// The prompt does not fit in the context window.
    #[error("the prompt is {prompt_tokens} tokens; the context window is {context_size}")]
    ContextExceeded {
        /// Prompt length.
        prompt_tokens: u32,
        /// Window size.
        context_size: u32,
    },
    /// The prompt has no tokens.
    #[error("the prompt is empty")]
    EmptyPrompt,
    /// llama.cpp failed while decoding.
    #[error("inference failed: {0}")]
    Decode(String),
    /// No chain of reachable nodes covers the model's layers.
    #[error("{message}")]
    NoRoute {
        /// What is missing, in words.
        message: String,
        /// Layer ranges `[start, end)` nobody reachable holds.
        missing: Vec<(u32, u32)>,
    },
    /// The pipeline failed and could not be re-routed.
    #[error("split inference failed: {0}")]
    Pipeline(String),
    /// llama.cpp refused the grammar (`response_format`).
    #[error("the grammar could not be used: {0}")]
    Grammar(String),
    /// The LoRA adapter could not be applied.
    #[error("the adapter could not be used: {0}")]
    Adapter(String),
}

/// Submitting a job failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SubmitError {
    /// Too many jobs are waiting.
    #[error("the inference queue is full ({0} waiting)")]
    QueueFull(usize),
    /// This client already holds its share of the waiting places.
    #[error("this API key already has {held} requests waiting, its share of the queue")]
    ShareFull {
        /// Its jobs waiting.
        held: usize,
    },
    /// The engine thread has stopped.
    #[error("the inference engine has stopped")]
    Stopped,
}

/// Applying the chat template failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ChatTemplateError {
    /// A message contains a NUL byte.
    #[error("message {0} contains a NUL character")]
    Nul(usize),
    /// llama.cpp could not apply the template.
    #[error("the model's chat template could not be applied: {0}")]
    Apply(String),
}

pub(crate) struct Job {
    request: GenerateRequest,
    events: mpsc::Sender<Event>,
    enqueued: Instant,
}

/// Renders chat turns into a prompt with `model`'s own chat template (ChatML when
/// the GGUF has none).
pub fn render_chat(model: &LlamaModel, turns: &[ChatTurn]) -> Result<String, ChatTemplateError> {
    let messages = turns
        .iter()
        .enumerate()
        .map(|(i, t)| {
            LlamaChatMessage::new(t.role.clone(), t.content.clone())
                .map_err(|_| ChatTemplateError::Nul(i))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let template = match model.chat_template(None) {
        Ok(t) => t,
        Err(_) => llama_cpp_2::model::LlamaChatTemplate::new("chatml")
            .map_err(|e| ChatTemplateError::Apply(e.to_string()))?,
    };
    model
        .apply_chat_template(&template, &messages, true)
        .map_err(|e| ChatTemplateError::Apply(e.to_string()))
}

/// Cloneable handle to the engine thread that owns the loaded model.
#[derive(Clone)]
pub struct Engine {
    jobs: mpsc::Sender<Job>,
    model: Arc<LlamaModel>,
    info: Arc<ModelInfo>,
    load: Arc<slots::EngineLoad>,
    max_queue: usize,
    context_size: u32,
}

/// What the engine is doing, for metrics.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct EngineStats {
    /// Requests waiting for a sequence.
    pub queue_depth: usize,
    /// Sequences generating now.
    pub active_sequences: usize,
    /// Batches decoded since start.
    pub batches: usize,
    /// Mean tokens per batch.
    pub mean_batch_tokens: f64,
    /// Most sequences in one batch since start.
    pub peak_batch_sequences: usize,
    /// Speculative decoding's draft tokens decoded and accepted.
    pub speculation: speculation::SpeculationSummary,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("model", &self.info.id)
            .finish()
    }
}

impl Engine {
    /// Loads the model and starts the engine thread. Blocking: call it from a
    /// blocking context. `progress` receives load progress in `0.0..=1.0`.
    pub fn load(
        config: EngineConfig,
        progress: impl FnMut(f32) + Send + 'static,
    ) -> Result<Self, LoadModelError> {
        engine::start(config, progress)
    }

    /// Facts about the loaded model.
    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// Jobs waiting for the engine (not counting the running ones).
    pub fn queue_depth(&self) -> usize {
        self.load.waiting.load(Ordering::Relaxed)
    }

    /// Jobs `client` has waiting (see [`GenerateRequest::client`]).
    pub fn waiting_for(&self, client: &str) -> usize {
        self.load.shares.waiting(client)
    }

    /// Waiting places one client may hold.
    pub fn queue_share(&self) -> usize {
        fair::Shares::share(self.max_queue)
    }

    /// Batching counters.
    pub fn stats(&self) -> EngineStats {
        let batches = self.load.batches.load(Ordering::Relaxed);
        let tokens = self.load.batched_tokens.load(Ordering::Relaxed);
        EngineStats {
            queue_depth: self.queue_depth(),
            active_sequences: self.load.active.load(Ordering::Relaxed),
            batches,
            mean_batch_tokens: if batches == 0 {
                0.0
            } else {
                (tokens as f64 / batches as f64 * 100.0).round() / 100.0
            },
            peak_batch_sequences: self.load.peak_sequences.load(Ordering::Relaxed),
            speculation: self.load.speculation.summary(),
        }
    }

    /// Renders chat turns into a prompt with the model's own chat template
    /// (ChatML when the GGUF has none).
    pub fn render_chat(&self, turns: &[ChatTurn]) -> Result<String, ChatTemplateError> {
        render_chat(&self.model, turns)
    }

    /// Queues a generation. Events arrive on the returned receiver; dropping it
    /// cancels the generation.
    pub fn submit(&self, request: GenerateRequest) -> Result<mpsc::Receiver<Event>, SubmitError> {
        // Reserve the client's place, then a queue slot, so both limits hold
        // under concurrent submits.
        let client = request.client.clone();
        let shares = &self.load.shares;
        shares
            .try_add(&client, fair::Shares::share(self.max_queue))
            .map_err(|held| SubmitError::ShareFull { held })?;
        let waiting = &self.load.waiting;
        let before = waiting.fetch_add(1, Ordering::AcqRel);
        if before >= self.max_queue {
            waiting.fetch_sub(1, Ordering::AcqRel);
            shares.remove(&client);
            return Err(SubmitError::QueueFull(before));
        }
        // Room for every event a generation can send (one token per context
        // position, plus start and end): the engine thread, serving many
        // requests, never waits on one slow client. tokio allocates the
        // channel's blocks as they fill, so the bound costs nothing up front.
        let per_token = if request.params.logprobs.is_some() {
            2
        } else {
            1
        };
        let (events, rx) = mpsc::channel(self.context_size as usize * per_token + 8);
        let job = Job {
            request,
            events,
            enqueued: Instant::now(),
        };
        match self.jobs.try_send(job) {
            Ok(()) => Ok(rx),
            Err(mpsc::error::TrySendError::Full(_)) => {
                waiting.fetch_sub(1, Ordering::AcqRel);
                shares.remove(&client);
                Err(SubmitError::QueueFull(before))
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                waiting.fetch_sub(1, Ordering::AcqRel);
                shares.remove(&client);
                Err(SubmitError::Stopped)
            }
        }
    }
}
