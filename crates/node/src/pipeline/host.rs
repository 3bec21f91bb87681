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
    /// Layers offloaded to a GPU backend (`auto`: what fits, per range).
    pub gpu_layers: crate::config::GpuLayers,
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
    /// Layers of the run offloaded to a GPU (set when it is loaded).
    pub gpu_layers: u32,
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

impl StepInput {
    /// Rows of input for a range of hidden size `n_embd` (`None` when hidden
    /// states do not come in whole rows).
    fn rows(&self, n_embd: usize) -> Option<usize> {
        match self {
            StepInput::Tokens(t) => Some(t.len()),
            StepInput::Hidden(h) if n_embd > 0 && h.len() % n_embd == 0 => Some(h.len() / n_embd),
            StepInput::Hidden(_) => None,
        }
    }

    fn as_range_input(&self) -> RangeInput<'_> {
        match self {
            StepInput::Tokens(t) => RangeInput::Tokens(t),
            StepInput::Hidden(h) => RangeInput::Hidden(h),
        }
    }
}

/// What a step produced.
#[derive(Debug, Clone, PartialEq)]
pub enum StepOutput {
    /// Hidden states for the next hop.
    Hidden(Vec<f32>),
    /// The sampled token (a range with the head), or `None` when no sampling was
    /// asked for.
    Token(Option<super::wire::Sampled>),
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
    /// The last rows that are draft tokens (speculative decoding): the range
    /// with the head samples after each of the last `draft + 1` rows.
    pub draft: u32,
    /// On a new session's first step: the session of the same peer whose KV
    /// cache it takes over (kept up to `pos`).
    pub continues: Option<[u8; 16]>,
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
    batching: Arc<BatchCounters>,
    active: Arc<std::sync::atomic::AtomicUsize>,
}

/// A session that ran a step this recently counts as working (see
/// [`RangeHost::active_count`]); one kept for a conversation's next turn does
/// not weigh its host down.
const ACTIVE_WINDOW: Duration = Duration::from_secs(2);

/// Batches of several sessions' steps decoded since start.
#[derive(Debug, Default)]
struct BatchCounters {
    batches: std::sync::atomic::AtomicU64,
    steps: std::sync::atomic::AtomicU64,
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
        let batching = Arc::new(BatchCounters::default());
        let active = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (thread_ranges, thread_sessions, thread_steps, thread_batching, thread_active) = (
            Arc::clone(&ranges),
            Arc::clone(&sessions),
            Arc::clone(&steps_served),
            Arc::clone(&batching),
            Arc::clone(&active),
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
                    batching: thread_batching,
                    active: thread_active,
                }
                .run(rx)
            })?;
        Ok(Self {
            jobs: tx,
            ranges,
            sessions,
            steps_served,
            batching,
            active,
        })
    }

    /// Sessions that ran a step in the last 2 s: the work in progress here
    /// (announced as queued work; the contribution level's session limit).
    pub fn active_count(&self) -> usize {
        self.active.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Decodes that batched several sessions' steps, and the steps they held.
    pub fn batching(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (
            self.batching.batches.load(Relaxed),
            self.batching.steps.load(Relaxed),
        )
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
    /// The range file's vocabulary, loaded on its own the first time a
    /// session's answer must follow a JSON schema (a grammar needs it).
    vocab: Option<Arc<llama_cpp_2::model::LlamaModel>>,
    /// The context the range's sessions share while it has free streams.
    shared: Option<Shared>,
}

/// A range's shared context: one KV stream per session, so the sessions'
/// single-token steps that arrive together decode in one batch.
struct Shared {
    kv: RangeSession,
    /// Streams no session holds.
    free: Vec<i32>,
}

/// Sessions of a range that share its context (more get contexts of their
/// own). Each stream is a whole session's KV cache, allocated with the context.
const SHARED_STREAMS: u32 = 4;
/// Steps taken off the queue together at most.
const MAX_BATCH_STEPS: usize = 64;

type Reply = oneshot::Sender<Result<StepOutput, HostError>>;
type StepJob = (Box<Step>, Reply);

/// Where a session's KV cache lives.
enum Kv {
    /// A context of its own.
    Own(RangeSession),
    /// A stream of its range's shared context.
    Stream(i32),
}

/// A step that passed its checks: what its compute and finish need.
struct Prepared {
    skey: SessionKey,
    key: (String, u32, u32),
    model: Arc<RangeModel>,
    n_layers: u32,
    rows: usize,
    created: bool,
    /// The range ends the model (it samples).
    has_head: bool,
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
    kv: Kv,
    sampler: Option<LlamaSampler>,
    next_pos: u32,
    last_seq: u64,
    last_used: Instant,
}

/// A loaded range's model id, first layer and one past its last.
type RangeKey = (String, u32, u32);

fn loaded<'a>(models: &'a [Loaded], key: &RangeKey) -> Option<&'a Loaded> {
    models.iter().find(|m| m.info.is(&key.0, key.1, key.2))
}

/// A range's shared context (see [`Shared`]); its streams' memory is within
/// the sessions' budget as they take them. `None` (logged) where it cannot be
/// made: sessions then get contexts of their own.
fn shared_streams(config: &HostConfig, model: &Arc<RangeModel>, has_head: bool) -> Option<Shared> {
    match model.streams(
        config.context_size,
        config.batch_size,
        config.threads,
        !has_head,
        SHARED_STREAMS,
    ) {
        Ok(kv) => Some(Shared {
            kv,
            free: (0..SHARED_STREAMS as i32).rev().collect(),
        }),
        Err(e) => {
            tracing::warn!(error = %e, "no shared context for the range");
            None
        }
    }
}

fn loaded_mut<'a>(models: &'a mut [Loaded], key: &RangeKey) -> Option<&'a mut Loaded> {
    models.iter_mut().find(|m| m.info.is(&key.0, key.1, key.2))
}

/// The vocabulary of a loaded range (loaded once, vocabulary only, from the
/// range's own file).
fn range_vocab(
    models: &mut [Loaded],
    key: &RangeKey,
) -> Result<Arc<llama_cpp_2::model::LlamaModel>, HostError> {
    let m = loaded_mut(models, key).ok_or_else(|| HostError::Compute("range unloaded".into()))?;
    if let Some(v) = &m.vocab {
        return Ok(Arc::clone(v));
    }
    let backend = crate::infer::backend(None).map_err(|e| HostError::Compute(e.to_string()))?;
    let vocab = llama_cpp_2::model::LlamaModel::load_from_file(
        backend,
        &m.info.path,
        &llama_cpp_2::model::params::LlamaModelParams::default().with_vocab_only(true),
    )
    .map(Arc::new)
    .map_err(|e| HostError::Compute(format!("loading the range's vocabulary: {e}")))?;
    m.vocab = Some(Arc::clone(&vocab));
    Ok(vocab)
}

/// The shared context of a loaded range, once its first session made it.
fn shared_mut<'a>(models: &'a mut [Loaded], key: &RangeKey) -> Option<&'a mut Shared> {
    loaded_mut(models, key).and_then(|m| m.shared.as_mut())
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
    batching: Arc<BatchCounters>,
    active: Arc<std::sync::atomic::AtomicUsize>,
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
                Ok(Job::Step(step, reply)) => {
                    // Steps that arrived meanwhile (other sessions') run with it:
                    // single-token steps of one range decode in one batch.
                    let mut steps = vec![(step, reply)];
                    let mut other = None;
                    while steps.len() < MAX_BATCH_STEPS {
                        match jobs.try_recv() {
                            Ok(Job::Step(step, reply)) => steps.push((step, reply)),
                            Ok(job) => {
                                other = Some(job);
                                break;
                            }
                            Err(_) => break,
                        }
                    }
                    self.steps(steps);
                    if let Some(job) = other {
                        self.handle(job);
                    }
                }
                Ok(job) => self.handle(job),
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
            }
            self.expire();
        }
    }

    /// Any job but a step.
    fn handle(&mut self, job: Job) {
        match job {
            Job::Load(info, reply) => {
                let _ = reply.send(self.load(info));
            }
            Job::Unload(model, a, b, reply) => {
                let _ = reply.send(self.unload(&model, a, b));
            }
            Job::Step(step, reply) => self.steps(vec![(step, reply)]),
            Job::Close(id, peer) => {
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
        }
    }

    /// Runs steps that arrived together: the single-token steps of sessions
    /// that share a range's context are decoded in one batch per range; every
    /// other step runs on its own.
    fn steps(&mut self, steps: Vec<StepJob>) {
        let mut groups: HashMap<(String, u32, u32), Vec<StepJob>> = HashMap::new();
        let mut seen = std::collections::HashSet::new();
        let mut alone = Vec::new();
        for (step, reply) in steps {
            let skey: SessionKey = (step.session, step.layer_start, step.layer_end);
            let batchable = step.input.rows(self.n_embd(&step)) == Some(1)
                && self
                    .sessions
                    .get(&skey)
                    .is_some_and(|s| matches!(s.kv, Kv::Stream(_)) && s.owner == step.peer)
                // A session twice in one batch runs its later steps alone, after.
                && seen.insert(skey);
            if batchable {
                let key = (step.model_id.clone(), step.layer_start, step.layer_end);
                groups.entry(key).or_default().push((step, reply));
            } else {
                alone.push((step, reply));
            }
        }
        for (key, group) in groups {
            if group.len() == 1 {
                alone.extend(group);
            } else {
                self.batch(&key, group);
            }
        }
        for (step, reply) in alone {
            // A panic in llama-cpp-2 must not take every session down.
            let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.step(*step)))
                .unwrap_or_else(|_| Err(HostError::Compute("internal error".into())));
            let _ = reply.send(out);
        }
    }

    /// The hidden size of the range a step names (0 when it is not loaded).
    fn n_embd(&self, step: &Step) -> usize {
        self.models
            .iter()
            .find(|m| m.info.is(&step.model_id, step.layer_start, step.layer_end))
            .map_or(0, |m| m.model.n_embd())
    }

    /// Decodes one single-token step of each of several sessions of range
    /// `key` in one batch of the range's shared context.
    fn batch(&mut self, key: &(String, u32, u32), group: Vec<StepJob>) {
        let mut ready: Vec<(i32, Prepared, Box<Step>, Reply)> = Vec::new();
        for (step, reply) in group {
            match self.prepare(&step) {
                Ok(p) => match self.sessions.get(&p.skey).map(|s| &s.kv) {
                    Some(Kv::Stream(seq)) => ready.push((*seq, p, step, reply)),
                    _ => {
                        let out = self.step(*step);
                        let _ = reply.send(out);
                    }
                },
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
            }
        }
        ready.sort_by_key(|r| r.0);
        let started = Instant::now();
        let outputs = {
            let Some(shared) = shared_mut(&mut self.models, key) else {
                for (_, _, _, reply) in ready {
                    let _ = reply.send(Err(HostError::Compute("the range was unloaded".into())));
                }
                return;
            };
            let items: Vec<(i32, RangeInput<'_>, i32)> = ready
                .iter()
                .map(|(seq, _, step, _)| (*seq, step.input.as_range_input(), step.pos as i32))
                .collect();
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                shared.kv.forward_many(&items)
            }))
            .unwrap_or_else(|_| {
                Err(crate::infer::layers::LayerError::Input(
                    "internal error".into(),
                ))
            })
        };
        let elapsed = started.elapsed();
        match outputs {
            Ok(outputs) => {
                let n = ready.len().max(1) as u32;
                if n > 1 {
                    use std::sync::atomic::Ordering::Relaxed;
                    self.batching.batches.fetch_add(1, Relaxed);
                    self.batching.steps.fetch_add(u64::from(n), Relaxed);
                }
                for ((_, p, step, reply), out) in ready.into_iter().zip(outputs) {
                    // Each step's share of the batch's time, for routing.
                    let _ = reply.send(self.finish(*step, &p, out, elapsed / n));
                }
            }
            Err(e) => {
                for (_, _, _, reply) in ready {
                    let _ = reply.send(Err(HostError::Compute(e.to_string())));
                }
            }
        }
    }

    fn publish(&self) {
        *self.ranges.write().unwrap_or_else(|p| p.into_inner()) =
            self.models.iter().map(|m| m.info.clone()).collect();
        self.session_count
            .store(self.sessions.len(), std::sync::atomic::Ordering::Relaxed);
    }

    fn expire(&mut self) {
        let active = self
            .sessions
            .values()
            .filter(|s| s.last_used.elapsed() < ACTIVE_WINDOW)
            .count();
        self.active
            .store(active, std::sync::atomic::Ordering::Relaxed);
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

    /// Ends the least recently used idle session (of `owner`, when given);
    /// whether there was one.
    fn evict_idle(&mut self, owner: Option<&str>) -> bool {
        let Some(key) = self
            .sessions
            .iter()
            .filter(|(_, s)| {
                s.last_used.elapsed() >= ACTIVE_WINDOW && owner.is_none_or(|o| s.owner == o)
            })
            .min_by_key(|(_, s)| s.last_used)
            .map(|(k, _)| *k)
        else {
            return false;
        };
        if let Some(s) = self.sessions.remove(&key) {
            self.retire(s);
        }
        self.publish();
        true
    }

    /// Keeps an ended session's context, emptied, for the next session of its
    /// range (while the range is loaded and its spares are not full).
    fn retire(&mut self, session: Session) {
        let key = (session.model_id, session.layer_start, session.layer_end);
        let Some(loaded) = loaded_mut(&mut self.models, &key) else {
            return;
        };
        match session.kv {
            Kv::Stream(seq) => {
                // The stream is emptied (its cells allocated from the first
                // again) and free for the next session.
                if let Some(shared) = loaded.shared.as_mut() {
                    shared.kv.truncate_seq(seq, 0);
                    shared.free.push(seq);
                }
            }
            Kv::Own(mut kv) => {
                let spare = self.spare.entry(key).or_default();
                if spare.len() < SPARE_CONTEXTS_PER_RANGE {
                    kv.reset();
                    spare.push(kv);
                }
            }
        }
    }

    fn load(&mut self, mut info: RangeInfo) -> Result<usize, HostError> {
        // Its shared context's streams and a session of its own count against
        // the GPUs' memory.
        let layers = info.layer_end - info.layer_start;
        let tokens = u64::from(self.config.context_size) * u64::from(SHARED_STREAMS + 1);
        let offload = crate::infer::gpu::layers_to_offload(
            self.config.gpu_layers,
            &info.path,
            || layers,
            tokens,
        );
        let model =
            RangeModel::load(&info.path, offload).map_err(|e| HostError::Compute(e.to_string()))?;
        info.gpu_layers = offload.min(layers.saturating_add(1));
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
        // Created now rather than with the first session: that session may be
        // a generation failing over to this node, and waits for no context.
        let model = Arc::new(model);
        let shared = shared_streams(&self.config, &model, info.has_head);
        self.models.push(Loaded {
            info,
            model,
            vocab: None,
            shared,
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

    /// Runs one step on its own.
    fn step(&mut self, step: Step) -> Result<StepOutput, HostError> {
        let p = self.prepare(&step)?;
        let started = Instant::now();
        let input = step.input.as_range_input();
        // Only the head's logits are rows of output; hidden states are all rows.
        let logit_rows = if p.has_head {
            step.draft as usize + 1
        } else {
            1
        };
        let out = match self.sessions.get_mut(&p.skey).map(|s| &mut s.kv) {
            Some(Kv::Own(kv)) => kv.forward_many_rows(&[(0, input, step.pos as i32)], logit_rows),
            Some(Kv::Stream(seq)) => {
                let seq = *seq;
                match shared_mut(&mut self.models, &p.key) {
                    Some(shared) => shared
                        .kv
                        .forward_many_rows(&[(seq, input, step.pos as i32)], logit_rows),
                    None => return Err(HostError::Compute("the range was unloaded".into())),
                }
            }
            None => return Err(HostError::Compute("session vanished".into())),
        }
        .and_then(|mut o| {
            o.pop()
                .ok_or_else(|| crate::infer::layers::LayerError::Input("no output".into()))
        });
        let out = match out {
            Ok(out) => out,
            Err(e) => {
                if p.created {
                    // A session whose first step failed holds nothing worth keeping.
                    if let Some(s) = self.sessions.remove(&p.skey) {
                        self.retire(s);
                    }
                    self.publish();
                }
                return Err(match e {
                    crate::infer::layers::LayerError::Input(m) => HostError::BadStep(m),
                    other => HostError::Compute(other.to_string()),
                });
            }
        };
        self.finish(step, &p, out, started.elapsed())
    }

    /// Everything before a step's compute: the range and the input's kind, the
    /// session (opened on its first step, on a stream of the range's shared
    /// context while one is free), its owner, order and window; a step before
    /// the session's end rolls its cache back first.
    fn prepare(&mut self, step: &Step) -> Result<Prepared, HostError> {
        let key = (step.model_id.clone(), step.layer_start, step.layer_end);
        let loaded = loaded(&self.models, &key).ok_or_else(|| HostError::NotHeld {
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
            check_sampling(step, model.n_vocab(), self.config.context_size)?;
        }
        // The input is checked here, per step, so that one peer's bad step in
        // a batch never fails the others'.
        let rows = match &step.input {
            StepInput::Tokens(t) => {
                if let Some(bad) = t.iter().find(|&&t| t < 0 || t as usize >= model.n_vocab()) {
                    return Err(HostError::BadStep(format!(
                        "token id {bad} is outside the vocabulary"
                    )));
                }
                t.len()
            }
            StepInput::Hidden(h) => {
                if h.len() % model.n_embd().max(1) != 0 {
                    return Err(HostError::BadStep(format!(
                        "{} floats is not a multiple of n_embd {}",
                        h.len(),
                        model.n_embd()
                    )));
                }
                h.len() / model.n_embd().max(1)
            }
        };
        if rows == 0 || rows > self.config.batch_size.clamp(1, 512) as usize {
            return Err(HostError::BadStep(format!(
                "{rows} rows (1..={} per step)",
                self.config.batch_size.clamp(1, 512)
            )));
        }
        let skey: SessionKey = (step.session, step.layer_start, step.layer_end);
        let mut created = !self.sessions.contains_key(&skey);
        if created && let Some(old) = step.continues {
            // A conversation's next turn: the new session takes the old one's
            // cache (its owner's only), with a fresh sampler and step count.
            let okey: SessionKey = (old, step.layer_start, step.layer_end);
            match self.sessions.get(&okey) {
                Some(s) if s.owner != step.peer => {
                    return Err(HostError::Forbidden(
                        "the session to continue belongs to another peer".into(),
                    ));
                }
                Some(_) => {
                    if let Some(mut s) = self.sessions.remove(&okey) {
                        s.sampler = None;
                        s.last_seq = 0;
                        s.last_used = Instant::now();
                        self.sessions.insert(skey, s);
                        created = false;
                    }
                }
                None => {}
            }
        }
        if created {
            self.open(step, skey, &key, &model, has_head)?;
        }
        let Some(session) = self.sessions.get_mut(&skey) else {
            return Err(HostError::Compute("session vanished".into()));
        };
        let refused = if session.owner != step.peer {
            Some(HostError::Forbidden(
                "the session belongs to another peer".into(),
            ))
        } else if session.model_id != key.0 {
            Some(HostError::BadStep(
                "the session belongs to another model".into(),
            ))
        } else if step.seq <= session.last_seq {
            Some(HostError::BadStep(format!(
                "step {} repeats or precedes step {}",
                step.seq, session.last_seq
            )))
        } else if step.pos > session.next_pos {
            Some(HostError::BadStep(format!(
                "step at position {} skips past the session's end {}",
                step.pos, session.next_pos
            )))
        } else if step.pos as usize + rows > self.config.context_size as usize {
            Some(HostError::BadStep(format!(
                "position {} is past the {}-token session window",
                step.pos as usize + rows,
                self.config.context_size
            )))
        } else {
            None
        };
        if let Some(e) = refused {
            if created {
                if let Some(s) = self.sessions.remove(&skey) {
                    self.retire(s);
                }
                self.publish();
            }
            return Err(e);
        }
        if step.pos < session.next_pos {
            match &mut session.kv {
                Kv::Own(kv) => kv.truncate(step.pos as i32),
                Kv::Stream(seq) => {
                    let seq = *seq;
                    if let Some(shared) = shared_mut(&mut self.models, &key) {
                        shared.kv.truncate_seq(seq, step.pos as i32);
                    }
                }
            }
            if let Some(session) = self.sessions.get_mut(&skey) {
                session.next_pos = step.pos;
            }
        }
        Ok(Prepared {
            skey,
            key,
            model,
            n_layers,
            rows,
            created,
            has_head,
        })
    }

    /// Opens a session on its first step: a stream of the range's shared
    /// context when one is free, else a context of its own (a spare one when
    /// there is one).
    fn open(
        &mut self,
        step: &Step,
        skey: SessionKey,
        key: &(String, u32, u32),
        model: &Arc<RangeModel>,
        has_head: bool,
    ) -> Result<(), HostError> {
        if step.pos != 0 {
            return Err(HostError::BadStep(format!(
                "unknown session starting at position {} (expired?)",
                step.pos
            )));
        }
        // One peer may hold at most half the slots (at least two), so no
        // single requester can lock everyone else out.
        let per_peer = (self.config.max_sessions / 2).max(2);
        let need = model.kv_bytes_per_token() * u64::from(self.config.context_size);
        // Idle sessions (kept by their requesters for a next turn) make room,
        // the least recently used first: they are caches, and their owner
        // replays its steps when it finds one gone.
        let owned = |t: &Self| t.sessions.values().filter(|s| s.owner == step.peer).count();
        let used = |t: &Self| t.sessions.values().map(|s| s.kv_bytes).sum::<u64>();
        while owned(self) >= per_peer && self.evict_idle(Some(&step.peer)) {}
        while (self.sessions.len() >= self.config.max_sessions
            || used(self) + need > self.config.max_session_bytes)
            && self.evict_idle(None)
        {}
        if self.sessions.len() >= self.config.max_sessions {
            return Err(HostError::Busy(self.config.max_sessions));
        }
        if owned(self) >= per_peer || used(self) + need > self.config.max_session_bytes {
            return Err(HostError::Busy(self.sessions.len()));
        }
        let loaded = loaded_mut(&mut self.models, key)
            .ok_or_else(|| HostError::Compute("the range was unloaded".into()))?;
        if loaded.shared.is_none() {
            // Its creation failed at load; tried again.
            loaded.shared = shared_streams(&self.config, model, has_head);
        }
        let kv = match loaded.shared.as_mut().and_then(|s| s.free.pop()) {
            Some(seq) => Kv::Stream(seq),
            None => match self.spare.get_mut(key).and_then(Vec::pop) {
                Some(kv) => Kv::Own(kv),
                None => Kv::Own(
                    model
                        .session(
                            self.config.context_size,
                            self.config.batch_size,
                            self.config.threads,
                            !has_head,
                        )
                        .map_err(|e| HostError::Compute(e.to_string()))?,
                ),
            },
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
        Ok(())
    }

    /// Everything after a step's compute: the session moves on, and the range
    /// with the head samples.
    fn finish(
        &mut self,
        step: Step,
        p: &Prepared,
        out: RangeOutput,
        elapsed: Duration,
    ) -> Result<StepOutput, HostError> {
        let Some(session) = self.sessions.get_mut(&p.skey) else {
            return Err(HostError::Compute("session vanished".into()));
        };
        session.last_seq = step.seq;
        session.next_pos = step.pos + p.rows as u32;
        session.last_used = Instant::now();
        self.steps_served
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let output = match out {
            RangeOutput::Hidden(h) => StepOutput::Hidden(h),
            RangeOutput::Logits(logits) => match &step.sample {
                None => StepOutput::Token(None),
                Some(spec) => {
                    let sampler = match session.sampler.as_mut() {
                        Some(s) => s,
                        None => {
                            let params = spec.to_params();
                            let vocab = match params.json_schema {
                                Some(_) => Some(range_vocab(&mut self.models, &p.key)?),
                                None => None,
                            };
                            let s = crate::infer::primed_sampler(
                                vocab.as_deref(),
                                p.model.n_vocab() as i32,
                                &params,
                                &step.prime,
                            )
                            .map_err(|e| HostError::Forbidden(format!("sample: {e}")))?;
                            session.sampler.insert(s)
                        }
                    };
                    // One row of logits per verified row (see `Step::draft`);
                    // the sampler is stateless there, so each row's choice is
                    // the one it would make had that row come alone.
                    let n_vocab = p.model.n_vocab();
                    let mut rows = logits.chunks_exact(n_vocab.max(1));
                    let first = rows.next().unwrap_or_default();
                    let token = sample(sampler, first);
                    let after_drafts = rows.map(|row| sample(sampler, row)).collect();
                    // The model's distribution, as the local engine reports it.
                    let logprobs = spec
                        .logprobs
                        .and_then(|k| crate::infer::logprobs::pick(first, token, usize::from(k)));
                    StepOutput::Token(Some(super::wire::Sampled {
                        token,
                        logprobs,
                        after_drafts,
                    }))
                }
            },
        };
        if p.rows == 1 {
            self.record_speed(&p.key, elapsed, p.n_layers);
        }
        Ok(output)
    }

    /// Keeps an exponential average of decode time per layer, which routing reads.
    fn record_speed(&mut self, key: &(String, u32, u32), elapsed: Duration, layers: u32) {
        let ms = elapsed.as_secs_f64() * 1000.0 / layers.max(1) as f64;
        if let Some(m) = loaded_mut(&mut self.models, key) {
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
    if step.draft > 0 {
        let stateless = step
            .sample
            .as_ref()
            .is_some_and(|spec| spec.to_params().speculation_safe());
        if !stateless {
            return Err(HostError::Forbidden(
                "draft tokens for a sampler that is not greedy and stateless".into(),
            ));
        }
        if step.draft > super::wire::MAX_DRAFT {
            return Err(HostError::Forbidden(format!(
                "{} draft tokens (at most {})",
                step.draft,
                super::wire::MAX_DRAFT
            )));
        }
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
