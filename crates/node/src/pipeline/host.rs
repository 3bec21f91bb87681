//! The range host: one OS thread that owns the loaded layer ranges and every
//! pipeline session's KV cache on this node.
//!
//! ```text
//!  Pipeline (async) ──HostJob──▶ host thread ──owns──▶ RangeModel per loaded range
//!        ▲                          │                  RangeSession per session id
//!        └────── oneshot reply ◀────┘                  (TTL, limit, rollback)
//! ```
//!
//! llama.cpp contexts are not `Send`, so sessions live and die on this thread. A
//! step at a position before the session's end rolls the cache back first (replay
//! after a re-route, or a client resuming); a step past the end is refused.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::LlamaToken;
use llama_cpp_2::token::data::LlamaTokenData;
use llama_cpp_2::token::data_array::LlamaTokenDataArray;
use serde::Serialize;
use tokio::sync::oneshot;

use super::wire::SampleSpec;
use crate::infer::layers::{RangeInput, RangeModel, RangeOutput, RangeSession};

/// Settings of the host.
#[derive(Debug, Clone)]
pub struct HostConfig {
    /// Threads per step.
    pub threads: u32,
    /// KV cache size of a session, in tokens.
    pub context_size: u32,
    /// Most rows per step (the engine's batch size, for identical results).
    pub batch_size: u32,
    /// Sessions kept at once.
    pub max_sessions: usize,
    /// KV cache memory all sessions may take together, in bytes.
    pub max_session_bytes: u64,
    /// Idle time after which a session is dropped.
    pub session_ttl: Duration,
    /// Layers offloaded to a GPU backend.
    pub gpu_layers: u32,
    /// After a step, how long the thread keeps polling for the next one before
    /// it sleeps (zero: sleep at once). Between two tokens a hop waits only for
    /// the rest of the chain, and a core that went to sleep meanwhile wakes up
    /// slowly and runs the next step slower (worst on virtual machines), which
    /// costs more than the polling.
    pub poll: Duration,
}

/// A layer range this node can run.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct RangeInfo {
    /// Model id.
    pub model_id: String,
    /// First shard of the run.
    pub first_shard: u32,
    /// Last shard of the run.
    pub last_shard: u32,
    /// First layer.
    pub layer_start: u32,
    /// One past the last layer.
    pub layer_end: u32,
    /// Layers in the whole model.
    pub n_layers: u32,
    /// The run starts the model (token input).
    pub has_embedding: bool,
    /// The run ends the model (logits out).
    pub has_head: bool,
    /// The assembled range GGUF.
    pub path: PathBuf,
    /// Measured compute per layer and token while decoding, in milliseconds.
    pub ms_per_layer: Option<f64>,
}

impl RangeInfo {
    /// Whether this is layers `a..b` of `model_id`.
    fn is(&self, model_id: &str, a: u32, b: u32) -> bool {
        self.model_id == model_id && self.layer_start == a && self.layer_end == b
    }
}

/// What a step feeds in.
#[derive(Debug, Clone)]
pub enum StepInput {
    /// Token ids (first range).
    Tokens(Vec<i32>),
    /// Hidden states, `rows × n_embd`.
    Hidden(Vec<f32>),
}

/// What a step produced.
#[derive(Debug, Clone, PartialEq)]
pub enum StepOutput {
    /// Hidden states for the next hop.
    Hidden(Vec<f32>),
    /// The sampled token (a range with the head), or `None` when no sampling was
    /// asked for.
    Token(Option<i32>),
}

/// One step of one session on one range.
#[derive(Debug, Clone)]
pub struct Step {
    /// The authenticated peer that sent the step (this node's own id for its own
    /// steps). A session belongs to the peer that opened it.
    pub peer: String,
    /// Session id.
    pub session: [u8; 16],
    /// Step counter (must grow within a session).
    pub seq: u64,
    /// Model id.
    pub model_id: String,
    /// First layer of the range.
    pub layer_start: u32,
    /// One past its last layer.
    pub layer_end: u32,
    /// Position of the first row.
    pub pos: u32,
    /// The rows.
    pub input: StepInput,
    /// Sample with this, if the range has the head.
    pub sample: Option<SampleSpec>,
    /// Tokens the sampler accepts first.
    pub prime: Vec<i32>,
}

/// A step or a load failed.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
#[non_exhaustive]
pub enum HostError {
    /// The range is not loaded here.
    #[error("layers {layer_start}..{layer_end} of {model_id} are not loaded on this node")]
    NotHeld {
        /// Model.
        model_id: String,
        /// First layer.
        layer_start: u32,
        /// One past the last.
        layer_end: u32,
    },
    /// All session slots or the session memory budget are in use.
    #[error(
        "no room for another pipeline session ({0} live; see pipeline_max_sessions and pipeline_max_session_mb)"
    )]
    Busy(usize),
    /// A step that skips positions, repeats a `seq`, or has the wrong size.
    #[error("{0}")]
    BadStep(String),
    /// The step breaks a rule no honest peer breaks (numbers out of range,
    /// another peer's session): refused, and held against the sender.
    #[error("{0}")]
    Forbidden(String),
    /// llama.cpp failed.
    #[error("{0}")]
    Compute(String),
    /// The host thread has stopped.
    #[error("the range host has stopped")]
    Stopped,
}

enum Job {
    Load(RangeInfo, oneshot::Sender<Result<usize, HostError>>),
    Unload(String, u32, u32, oneshot::Sender<bool>),
    Step(Box<Step>, oneshot::Sender<Result<StepOutput, HostError>>),
    Close([u8; 16], String),
}

/// Cloneable handle to the host thread.
#[derive(Clone)]
pub struct RangeHost {
    jobs: std::sync::mpsc::Sender<Job>,
    ranges: Arc<RwLock<Vec<RangeInfo>>>,
    sessions: Arc<std::sync::atomic::AtomicUsize>,
    steps_served: Arc<std::sync::atomic::AtomicU64>,
}

impl std::fmt::Debug for RangeHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RangeHost")
            .field("ranges", &self.ranges().len())
            .finish()
    }
}

impl RangeHost {
    /// Starts the host thread.
    pub fn start(config: HostConfig) -> std::io::Result<Self> {
        let (tx, rx) = std::sync::mpsc::channel();
        let ranges = Arc::new(RwLock::new(Vec::new()));
        let sessions = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let steps_served = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (thread_ranges, thread_sessions, thread_steps) = (
            Arc::clone(&ranges),
            Arc::clone(&sessions),
            Arc::clone(&steps_served),
        );
        std::thread::Builder::new()
            .name("swarmllm-ranges".into())
            .spawn(move || {
                // Built on the thread: sessions (llama.cpp contexts) never leave it.
                Thread {
                    config,
                    models: Vec::new(),
                    sessions: HashMap::new(),
                    spare: HashMap::new(),
                    ranges: thread_ranges,
                    session_count: thread_sessions,
                    steps_served: thread_steps,
                }
                .run(rx)
            })?;
        Ok(Self {
            jobs: tx,
            ranges,
            sessions,
            steps_served,
        })
    }

    /// The loaded ranges.
    pub fn ranges(&self) -> Vec<RangeInfo> {
        self.ranges
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Steps run since start (every session, every range).
    pub fn steps_served(&self) -> u64 {
        self.steps_served.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Live sessions.
    pub fn session_count(&self) -> usize {
        self.sessions.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Loads a range GGUF; returns its hidden size.
    pub async fn load(&self, info: RangeInfo) -> Result<usize, HostError> {
        let (tx, rx) = oneshot::channel();
        self.jobs
            .send(Job::Load(info, tx))
            .map_err(|_| HostError::Stopped)?;
        rx.await.map_err(|_| HostError::Stopped)?
    }

    /// Unloads a range (its sessions end); whether it was loaded.
    pub async fn unload(&self, model_id: &str, layer_start: u32, layer_end: u32) -> bool {
        let (tx, rx) = oneshot::channel();
        if self
            .jobs
            .send(Job::Unload(model_id.into(), layer_start, layer_end, tx))
            .is_err()
        {
            return false;
        }
        rx.await.unwrap_or(false)
    }

    /// Runs one step.
    pub async fn step(&self, step: Step) -> Result<StepOutput, HostError> {
        let (tx, rx) = oneshot::channel();
        self.jobs
            .send(Job::Step(Box::new(step), tx))
            .map_err(|_| HostError::Stopped)?;
        rx.await.map_err(|_| HostError::Stopped)?
    }

    /// Ends a session now, if `peer` opened it (closing another peer's session
    /// does nothing).
    pub fn close(&self, session: [u8; 16], peer: &str) {
        let _ = self.jobs.send(Job::Close(session, peer.to_string()));
    }
}

/// Spin-loop hints between two looks at the job queue while polling.
const SPINS_PER_CHECK: u32 = 200;

/// The next job: polled for without sleeping until `poll_until` (yielding the
/// core to any other thread that wants it), then waited for up to a second.
fn next_job(
    jobs: &std::sync::mpsc::Receiver<Job>,
    poll_until: Option<Instant>,
) -> Result<Job, std::sync::mpsc::RecvTimeoutError> {
    use std::sync::mpsc::{RecvTimeoutError, TryRecvError};
    if let Some(until) = poll_until {
        while Instant::now() < until {
            match jobs.try_recv() {
                Ok(job) => return Ok(job),
                Err(TryRecvError::Disconnected) => return Err(RecvTimeoutError::Disconnected),
                Err(TryRecvError::Empty) => {
                    // A few microseconds of PAUSE between checks: far fewer
                    // syscalls than yielding alone, and a core sharing its
                    // execution units (SMT, or a hypervisor's) gets them back.
                    for _ in 0..SPINS_PER_CHECK {
                        std::hint::spin_loop();
                    }
                    std::thread::yield_now();
                }
            }
        }
    }
    jobs.recv_timeout(Duration::from_secs(1))
}

struct Loaded {
    info: RangeInfo,
    model: Arc<RangeModel>,
}

type SessionKey = ([u8; 16], u32, u32);

struct Session {
    /// The peer that opened it: the only one that may step or close it.
    owner: String,
    /// KV cache memory reserved for it.
    kv_bytes: u64,
    model_id: String,
    layer_start: u32,
    layer_end: u32,
    kv: RangeSession,
    sampler: Option<LlamaSampler>,
    next_pos: u32,
    last_seq: u64,
    last_used: Instant,
}

/// Prepared contexts kept per loaded range for the next sessions: creating a
/// llama context (allocating and clearing its KV buffer, building the graph
/// scheduler) costs more than a short prompt's compute.
const SPARE_CONTEXTS_PER_RANGE: usize = 2;

struct Thread {
    config: HostConfig,
    models: Vec<Loaded>,
    /// Contexts of ended sessions, emptied, per range (see
    /// [`SPARE_CONTEXTS_PER_RANGE`]); dropped with their range.
    spare: HashMap<(String, u32, u32), Vec<RangeSession>>,
    /// Keyed by session id and range: a route may pass one node twice (the
    /// encrypted pipeline runs the first and last span on the requester).
    sessions: HashMap<SessionKey, Session>,
    ranges: Arc<RwLock<Vec<RangeInfo>>>,
    session_count: Arc<std::sync::atomic::AtomicUsize>,
    steps_served: Arc<std::sync::atomic::AtomicU64>,
}

impl Thread {
    fn run(mut self, jobs: std::sync::mpsc::Receiver<Job>) {
        // Poll (rather than sleep) until then: a step has just run.
        let mut poll_until: Option<Instant> = None;
        loop {
            let job = next_job(&jobs, poll_until);
            if matches!(job, Ok(Job::Step(..))) && !self.config.poll.is_zero() {
                poll_until = Some(Instant::now() + self.config.poll);
            }
            match job {
                Ok(Job::Load(info, reply)) => {
                    let _ = reply.send(self.load(info));
                }
                Ok(Job::Unload(model, a, b, reply)) => {
                    let _ = reply.send(self.unload(&model, a, b));
                }
                Ok(Job::Step(step, reply)) => {
                    // A panic in llama-cpp-2 must not take every session down.
                    let out =
                        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.step(*step)))
                            .unwrap_or_else(|_| Err(HostError::Compute("internal error".into())));
                    let _ = reply.send(out);
                }
                Ok(Job::Close(id, peer)) => {
                    let ended: Vec<SessionKey> = self
                        .sessions
                        .iter()
                        .filter(|(k, s)| k.0 == id && s.owner == peer)
                        .map(|(k, _)| *k)
                        .collect();
                    for key in ended {
                        if let Some(s) = self.sessions.remove(&key) {
                            self.retire(s);
                        }
                    }
                    self.publish();
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
            }
            self.expire();
        }
    }

    fn publish(&self) {
        *self.ranges.write().unwrap_or_else(|p| p.into_inner()) =
            self.models.iter().map(|m| m.info.clone()).collect();
        self.session_count
            .store(self.sessions.len(), std::sync::atomic::Ordering::Relaxed);
    }

    fn expire(&mut self) {
        let ttl = self.config.session_ttl;
        let expired: Vec<SessionKey> = self
            .sessions
            .iter()
            .filter(|(_, s)| s.last_used.elapsed() >= ttl)
            .map(|(k, _)| *k)
            .collect();
        if expired.is_empty() {
            return;
        }
        tracing::debug!(expired = expired.len(), "pipeline sessions expired");
        for key in expired {
            if let Some(s) = self.sessions.remove(&key) {
                self.retire(s);
            }
        }
        self.publish();
    }

    /// Keeps an ended session's context, emptied, for the next session of its
    /// range (while the range is loaded and its spares are not full).
    fn retire(&mut self, session: Session) {
        let key = (session.model_id, session.layer_start, session.layer_end);
        if !self.models.iter().any(|m| m.info.is(&key.0, key.1, key.2)) {
            return;
        }
        let spare = self.spare.entry(key).or_default();
        if spare.len() < SPARE_CONTEXTS_PER_RANGE {
            let mut kv = session.kv;
            kv.reset();
            spare.push(kv);
        }
    }

    fn load(&mut self, info: RangeInfo) -> Result<usize, HostError> {
        let model = RangeModel::load(&info.path, self.config.gpu_layers)
            .map_err(|e| HostError::Compute(e.to_string()))?;
        if model.n_layer() != info.layer_end - info.layer_start {
            return Err(HostError::Compute(format!(
                "{} has {} layers, expected {}",
                info.path.display(),
                model.n_layer(),
                info.layer_end - info.layer_start
            )));
        }
        let n_embd = model.n_embd();
        self.unload(&info.model_id, info.layer_start, info.layer_end);
        tracing::info!(
            model = %info.model_id,
            layers = %format!("{}..{}", info.layer_start, info.layer_end),
            shards = %format!("{}..={}", info.first_shard, info.last_shard),
            "layer range loaded"
        );
        self.models.push(Loaded {
            info,
            model: Arc::new(model),
        });
        self.publish();
        Ok(n_embd)
    }

    fn unload(&mut self, model_id: &str, a: u32, b: u32) -> bool {
        self.sessions
            .retain(|_, s| !(s.model_id == model_id && s.layer_start == a && s.layer_end == b));
        self.spare.remove(&(model_id.to_string(), a, b));
        let before = self.models.len();
        self.models.retain(|m| !m.info.is(model_id, a, b));
        let removed = self.models.len() != before;
        self.publish();
        removed
    }

    fn step(&mut self, step: Step) -> Result<StepOutput, HostError> {
        let key = (step.model_id.clone(), step.layer_start, step.layer_end);
        let loaded = self
            .models
            .iter()
            .find(|m| m.info.is(&key.0, key.1, key.2))
            .ok_or_else(|| HostError::NotHeld {
                model_id: key.0.clone(),
                layer_start: key.1,
                layer_end: key.2,
            })?;
        let (model, has_head, has_embedding, n_layers) = (
            Arc::clone(&loaded.model),
            loaded.info.has_head,
            loaded.info.has_embedding,
            loaded.info.layer_end - loaded.info.layer_start,
        );
        match (&step.input, has_embedding) {
            (StepInput::Tokens(_), false) => {
                return Err(HostError::BadStep(
                    "token input to a range without the embedding".into(),
                ));
            }
            (StepInput::Hidden(_), true) => {
                return Err(HostError::BadStep(
                    "hidden-state input to the first range".into(),
                ));
            }
            _ => {}
        }

        // Only the range with the head samples (others hold a placeholder
        // vocabulary); it checks what the sampler will be given.
        if has_head {
            check_sampling(&step, model.n_vocab(), self.config.context_size)?;
        }
        let skey: SessionKey = (step.session, step.layer_start, step.layer_end);
        let created = !self.sessions.contains_key(&skey);
        let out = self.run_step(step, skey, &key, model, has_head, n_layers);
        if created && out.is_err() {
            // A session whose first step failed holds nothing worth keeping.
            self.sessions.remove(&skey);
            self.publish();
        }
        out
    }

    fn run_step(
        &mut self,
        step: Step,
        skey: SessionKey,
        key: &(String, u32, u32),
        model: Arc<RangeModel>,
        has_head: bool,
        n_layers: u32,
    ) -> Result<StepOutput, HostError> {
        if !self.sessions.contains_key(&skey) {
            if self.sessions.len() >= self.config.max_sessions {
                return Err(HostError::Busy(self.config.max_sessions));
            }
            // One peer may hold at most half the slots (at least two), so no
            // single requester can lock everyone else out.
            let per_peer = (self.config.max_sessions / 2).max(2);
            if self
                .sessions
                .values()
                .filter(|s| s.owner == step.peer)
                .count()
                >= per_peer
            {
                return Err(HostError::Busy(self.sessions.len()));
            }
            let need = model.kv_bytes_per_token() * u64::from(self.config.context_size);
            let used: u64 = self.sessions.values().map(|s| s.kv_bytes).sum();
            if used + need > self.config.max_session_bytes {
                return Err(HostError::Busy(self.sessions.len()));
            }
            if step.pos != 0 {
                return Err(HostError::BadStep(format!(
                    "unknown session starting at position {} (expired?)",
                    step.pos
                )));
            }
            let spare = self.spare.get_mut(key).and_then(Vec::pop);
            let kv = match spare {
                Some(kv) => kv,
                None => model
                    .session(
                        self.config.context_size,
                        self.config.batch_size,
                        self.config.threads,
                        !has_head,
                    )
                    .map_err(|e| HostError::Compute(e.to_string()))?,
            };
            self.sessions.insert(
                skey,
                Session {
                    owner: step.peer.clone(),
                    model_id: key.0.clone(),
                    layer_start: key.1,
                    layer_end: key.2,
                    kv_bytes: need,
                    kv,
                    sampler: None,
                    next_pos: 0,
                    last_seq: 0,
                    last_used: Instant::now(),
                },
            );
            self.publish();
        }
        let Some(session) = self.sessions.get_mut(&skey) else {
            return Err(HostError::Compute("session vanished".into()));
        };
        if session.owner != step.peer {
            return Err(HostError::Forbidden(
                "the session belongs to another peer".into(),
            ));
        }
        if session.model_id != key.0 {
            return Err(HostError::BadStep(
                "the session belongs to another model".into(),
            ));
        }
        if step.seq <= session.last_seq {
            return Err(HostError::BadStep(format!(
                "step {} repeats or precedes step {}",
                step.seq, session.last_seq
            )));
        }
        if step.pos > session.next_pos {
            return Err(HostError::BadStep(format!(
                "step at position {} skips past the session's end {}",
                step.pos, session.next_pos
            )));
        }
        if step.pos < session.next_pos {
            session.kv.truncate(step.pos as i32);
            session.next_pos = step.pos;
        }
        let rows = match &step.input {
            StepInput::Tokens(t) => t.len(),
            StepInput::Hidden(h) => h.len() / model.n_embd().max(1),
        };
        if step.pos as usize + rows > self.config.context_size as usize {
            return Err(HostError::BadStep(format!(
                "position {} is past the {}-token session window",
                step.pos as usize + rows,
                self.config.context_size
            )));
        }
        let started = Instant::now();
        let input = match &step.input {
            StepInput::Tokens(t) => RangeInput::Tokens(t),
            StepInput::Hidden(h) => RangeInput::Hidden(h),
        };
        let out = session
            .kv
            .forward(input, step.pos as i32)
            .map_err(|e| match e {
                crate::infer::layers::LayerError::Input(m) => HostError::BadStep(m),
                other => HostError::Compute(other.to_string()),
            })?;
        session.last_seq = step.seq;
        self.steps_served
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        session.next_pos = step.pos + rows as u32;
        session.last_used = Instant::now();
        let elapsed = started.elapsed();
        let output = match out {
            RangeOutput::Hidden(h) => StepOutput::Hidden(h),
            RangeOutput::Logits(logits) => match &step.sample {
                None => StepOutput::Token(None),
                Some(spec) => {
                    let sampler = session.sampler.get_or_insert_with(|| {
                        let mut s =
                            crate::infer::build_sampler(model.n_vocab() as i32, &spec.to_params());
                        for &t in &step.prime {
                            s.accept(LlamaToken(t));
                        }
                        s
                    });
                    StepOutput::Token(Some(sample(sampler, &logits)))
                }
            },
        };
        if rows == 1 {
            self.record_speed(key, elapsed, n_layers);
        }
        Ok(output)
    }

    /// Keeps an exponential average of decode time per layer, which routing reads.
    fn record_speed(&mut self, key: &(String, u32, u32), elapsed: Duration, layers: u32) {
        let ms = elapsed.as_secs_f64() * 1000.0 / layers.max(1) as f64;
        if let Some(m) = self
            .models
            .iter_mut()
            .find(|m| m.info.is(&key.0, key.1, key.2))
        {
            m.info.ms_per_layer = Some(match m.info.ms_per_layer {
                Some(prev) => prev * 0.9 + ms * 0.1,
                None => ms,
            });
        }
        // Publishing on every token would churn the lock; every 32nd is plenty.
        if self.steps_served.load(std::sync::atomic::Ordering::Relaxed) % 32 == 1 {
            self.publish();
        }
    }
}

/// A peer's sampling spec and primed tokens pass the HTTP API's validation, with
/// the vocabulary and context of the range that samples.
fn check_sampling(step: &Step, n_vocab: usize, context: u32) -> Result<(), HostError> {
    let n_vocab = u32::try_from(n_vocab).unwrap_or(u32::MAX);
    if let Some(spec) = &step.sample {
        spec.to_params()
            .validate(crate::infer::SamplingLimits {
                n_vocab: Some(n_vocab),
                n_ctx: Some(context),
            })
            .map_err(|e| HostError::Forbidden(format!("sample.{e}")))?;
    }
    if step.prime.len() > context as usize {
        return Err(HostError::Forbidden(format!(
            "{} primed tokens for a {context}-token context",
            step.prime.len()
        )));
    }
    if let Some(bad) = step.prime.iter().find(|&&t| t < 0 || t as u32 >= n_vocab) {
        return Err(HostError::Forbidden(format!(
            "primed token id {bad} is outside the vocabulary"
        )));
    }
    Ok(())
}

/// Samples one token from `logits` and lets the sampler accept it (what
/// `llama_sampler_sample` does for a context's logits).
fn sample(sampler: &mut LlamaSampler, logits: &[f32]) -> i32 {
    let mut data = LlamaTokenDataArray::from_iter(
        logits
            .iter()
            .enumerate()
            .map(|(i, &l)| LlamaTokenData::new(LlamaToken(i as i32), l, 0.0)),
        false,
    );
    data.apply_sampler(sampler);
    let token = data.selected_token().unwrap_or(LlamaToken(0));
    sampler.accept(token);
    token.0
}
