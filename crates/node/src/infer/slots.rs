//! Continuous batching: the engine thread serves up to `max_parallel` requests
//! at once, each in its own sequence of one llama.cpp context.
//!
//! Every step builds one batch: the last sampled token of each generating
//! sequence (so a running stream gets a token every step), then as much of the
//! waiting prompts as fits in `batch_size`, and decodes it once. A new request
//! joins at the next step instead of waiting for the running ones to finish.
//! Each sequence keeps its own sampler, stop sequences, cancellation and usage.
//!
//! The context has one KV stream per sequence (`kv_unified` off) of
//! `context_size` cells each, so a sequence attends only to its own cache — the
//! same cells, in the same order, as when it runs alone — and every request
//! keeps the whole context window (memory grows with `max_parallel`, as with
//! Ollama's `OLLAMA_NUM_PARALLEL`).
//!
//! Prompt cache: a finished sequence's KV stays in its stream with the tokens
//! it holds ([`PromptCache`]). A new request takes the free sequence whose
//! tokens share the longest prefix with its prompt and computes only the rest —
//! a chat's next turn recomputes only the new messages. Usage reports the
//! reused tokens as `prompt_tokens_details.cached_tokens`.
//!
//! Speculative decoding (when a request asks, `speculative.n_max`): a greedy
//! sequence adds, after its token, up to that many drafts found by prompt
//! lookup (see `speculation`), each with its logits; sampling then walks the
//! rows, keeps the drafts the model chose itself and the model's token after
//! them, and removes the rejected drafts' cells. A run of accepted drafts
//! costs one decode.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::LlamaToken;
use tokio::sync::mpsc;

use super::engine::primed_sampler;
use super::stop::{Pushed, TextOut, prompt_tokens};
use super::{
    Event, FinishReason, GenerateError, Job, PromptTokensDetails, SamplingParams, Timing, Usage,
};

/// Counters the engine shares with its handle (for metrics and the API).
#[derive(Debug, Default)]
pub(crate) struct EngineLoad {
    /// Jobs waiting for a sequence.
    pub waiting: AtomicUsize,
    /// Sequences generating now.
    pub active: AtomicUsize,
    /// Batches decoded since start.
    pub batches: AtomicUsize,
    /// Tokens decoded in those batches (prompt and generated).
    pub batched_tokens: AtomicUsize,
    /// Most sequences seen in one batch.
    pub peak_sequences: AtomicUsize,
    /// Waiting jobs per client.
    pub shares: super::fair::Shares,
    /// Draft tokens decoded and accepted.
    pub speculation: super::speculation::SpeculationStats,
}

/// The tokens whose KV each free sequence still holds, for prompts that
/// start with them.
struct PromptCache {
    /// Per sequence: the tokens at positions `0..len` of its stream.
    tokens: Vec<Vec<LlamaToken>>,
    /// Per sequence: when it was last used (a counter), to pick a stream to
    /// overwrite when no cache matches.
    used: Vec<u64>,
    clock: u64,
}

impl PromptCache {
    fn new(sequences: usize) -> Self {
        Self {
            tokens: vec![Vec::new(); sequences],
            used: vec![0; sequences],
            clock: 0,
        }
    }

    /// The free sequence for `prompt` (one not in `busy`) and how many of its
    /// tokens can be kept: the longest shared prefix, else the least recently
    /// used stream.
    fn pick(&self, prompt: &[LlamaToken], busy: &[i32]) -> Option<(i32, usize)> {
        let free = (0..self.tokens.len()).filter(|s| !busy.contains(&(*s as i32)));
        free.map(|s| {
            let shared = self.tokens[s]
                .iter()
                .zip(prompt)
                .take_while(|(a, b)| a == b)
                .count();
            (s, shared)
        })
        .max_by(|a, b| {
            a.1.cmp(&b.1)
                .then_with(|| self.used[b.0].cmp(&self.used[a.0]))
        })
        .map(|(s, shared)| (s as i32, shared))
    }

    fn take(&mut self, seq: i32) {
        self.clock += 1;
        if let Some(u) = self.used.get_mut(seq as usize) {
            *u = self.clock;
        }
        if let Some(t) = self.tokens.get_mut(seq as usize) {
            t.clear();
        }
    }

    fn keep(&mut self, seq: i32, tokens: Vec<LlamaToken>) {
        if let Some(t) = self.tokens.get_mut(seq as usize) {
            *t = tokens;
        }
    }
}

/// One request in flight.
struct Slot {
    seq: i32,
    events: mpsc::Sender<Event>,
    params: SamplingParams,
    sampler: LlamaSampler,
    out: TextOut,
    /// The prompt, and how much of it is in the KV cache.
    prompt: Vec<LlamaToken>,
    fed: usize,
    /// The token to feed next once the prompt is in (the last one sampled).
    next: Option<LlamaToken>,
    /// Position of the next token fed.
    pos: i32,
    /// The generated tokens fed so far (the KV holds `prompt` then these).
    fed_generated: Vec<LlamaToken>,
    /// Prompt tokens reused from the cache.
    cached: u32,
    generated: u32,
    /// Index of this sequence's logits in the batch just decoded (the row of
    /// `next`; the drafts' rows follow it).
    logits_at: Option<i32>,
    /// Most draft tokens per step (0: this sequence does not speculate).
    draft_max: usize,
    /// The drafts decoded after `next` in the step just taken, at the
    /// positions after it; not yet in `fed_generated` or `pos`.
    drafts: Vec<LlamaToken>,
    started: Instant,
    queue_ms: u64,
    prompt_ms: u64,
}

impl Slot {
    fn send(&self, event: Event) -> bool {
        // The channel holds a whole context's worth of tokens (see
        // `Engine::submit`), so it is never full while the client is there:
        // the engine never blocks on one slow client.
        self.events.try_send(event).is_ok()
    }

    fn fail(&self, e: GenerateError) {
        let _ = self.send(Event::Failed(e));
    }
}

/// What outlives one context: the waiting jobs, the loaded adapters, and a
/// job that waits for its adapter to be loaded.
#[derive(Default)]
pub(super) struct Lanes {
    /// Waiting jobs, per client.
    pub queue: super::fair::FairQueue,
    /// The LoRA adapters.
    pub loras: super::lora::Loras,
    /// Taken from the queue, to be admitted first once its adapter is loaded.
    pub pending: Option<Job>,
}

/// Why [`run`] returned.
pub(super) enum Exit {
    /// Every `Engine` handle is gone.
    Closed,
    /// This job's adapter must be loaded, which needs the model without a
    /// context (no sequence runs).
    LoadAdapter(Box<Job>),
}

/// The engine loop over one context: ends when every `Engine` handle is
/// dropped, or to have an adapter loaded.
pub(super) fn run(
    model: &LlamaModel,
    ctx: &mut LlamaContext<'_>,
    context_size: u32,
    max_parallel: usize,
    jobs: &mut mpsc::Receiver<Job>,
    load: &Arc<EngineLoad>,
    lanes: &mut Lanes,
) -> Exit {
    let n_batch = (ctx.n_batch() as usize).max(1);
    let mut batch = LlamaBatch::new(n_batch.max(max_parallel), 1);
    let mut slots: Vec<Slot> = Vec::with_capacity(max_parallel);
    let mut cache = PromptCache::new(max_parallel);
    let Lanes {
        queue,
        loras,
        pending,
    } = lanes;
    loras.new_context();
    loop {
        // Everything submitted joins its client's line (the channel is only the
        // way in); wait for a job only when nothing runs or waits.
        if slots.is_empty() && queue.is_empty() && pending.is_none() {
            match jobs.blocking_recv() {
                Some(job) => queue.push(job),
                None => return Exit::Closed,
            }
        }
        while let Ok(job) = jobs.try_recv() {
            queue.push(job);
        }
        // Admit new requests, clients in turn, while sequences are free.
        // A job for another adapter than the running ones waits until they
        // end (see `lora`).
        while slots.len() < max_parallel {
            let job = match pending.take() {
                Some(job) => job,
                None => {
                    let running = !slots.is_empty();
                    let Some(job) =
                        queue.pop_if(|j| !running || loras.is_active(j.request.adapter.as_ref()))
                    else {
                        break;
                    };
                    load.waiting.fetch_sub(1, Ordering::AcqRel);
                    load.shares.remove(&job.request.client);
                    job
                }
            };
            if !loras.is_active(job.request.adapter.as_ref()) {
                match loras.activate(ctx, job.request.adapter.as_ref()) {
                    Ok(()) => cache = PromptCache::new(max_parallel),
                    // Only switched to with nothing running (see above).
                    Err(super::lora::Switch::NotLoaded) => {
                        return Exit::LoadAdapter(Box::new(job));
                    }
                    Err(super::lora::Switch::Failed(e)) => {
                        let _ = job.events.try_send(Event::Failed(e));
                        continue;
                    }
                }
            }
            let admitted = admit(model, ctx, context_size, &slots, &mut cache, job);
            if let Some(slot) = admitted {
                slots.push(slot);
            }
        }
        load.active.store(slots.len(), Ordering::Relaxed);
        if slots.is_empty() {
            continue;
        }
        // llama-cpp-2 panics on a few "impossible" FFI results; one bad step must
        // not take the engine (and every later request) down with it.
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            step(
                model,
                ctx,
                &mut batch,
                &mut slots,
                &mut cache,
                context_size,
                load,
            )
        }));
        if outcome.is_err() {
            tracing::error!("inference step panicked; the engine continues");
            load.active.store(0, Ordering::Relaxed);
            for slot in slots.drain(..) {
                slot.fail(GenerateError::Decode(
                    "internal error in the inference engine".into(),
                ));
            }
            ctx.clear_kv_cache();
            cache = PromptCache::new(max_parallel);
        }
        load.active.store(slots.len(), Ordering::Relaxed);
    }
}

/// Tokenizes a job's prompt and gives it a free sequence (`None` when the
/// client left or the prompt is refused: it has been told).
fn admit(
    model: &LlamaModel,
    ctx: &mut LlamaContext<'_>,
    context_size: u32,
    slots: &[Slot],
    cache: &mut PromptCache,
    job: Job,
) -> Option<Slot> {
    let Job {
        request,
        events,
        enqueued,
    } = job;
    if events.is_closed() {
        return None; // the client left while the job was queued
    }
    let started = Instant::now();
    let queue_ms = started.duration_since(enqueued).as_millis() as u64;
    let prompt = match prompt_tokens(model, &request.prompt, context_size) {
        Ok(t) => t,
        Err(e) => {
            let _ = events.try_send(Event::Failed(e));
            return None;
        }
    };
    let sampler = match primed_sampler(Some(model), model.n_vocab(), &request.params, &[]) {
        Ok(s) => s,
        Err(e) => {
            let _ = events.try_send(Event::Failed(e));
            return None;
        }
    };
    let busy: Vec<i32> = slots.iter().map(|s| s.seq).collect();
    let (seq, shared) = cache.pick(&prompt, &busy)?;
    let shared = if request.params.cache_prompt {
        shared
    } else {
        0
    };
    cache.take(seq);
    // Keep the shared prefix (at least the last prompt token is decoded again:
    // its logits give the first token). A stream that has dropped early cells
    // (sliding-window layers keep only the window) or cannot cut its suffix
    // (recurrent layers) starts over.
    let mut reuse = shared.min(prompt.len() - 1);
    if reuse > 0
        && (ctx.kv_cache_seq_pos_min(seq) > 0
            || ctx.kv_cache_seq_rm(seq, Some(reuse as u32), None).is_err())
    {
        reuse = 0;
    }
    if reuse == 0 {
        let _ = ctx.clear_kv_cache_seq(Some(seq as u32), None, None);
    }
    // Only where a draft cannot change the text, and where rejected drafts'
    // cells can be removed (recurrent state cannot be cut back).
    let draft_max =
        if request.params.speculation_safe() && !model.is_recurrent() && !model.is_hybrid() {
            request
                .params
                .speculative
                .unwrap_or(0)
                .min(crate::pipeline::MAX_DRAFT) as usize
        } else {
            0
        };
    let slot = Slot {
        seq,
        sampler,
        out: TextOut::new(request.params.stop.clone()),
        params: request.params,
        events,
        prompt,
        fed: reuse,
        next: None,
        pos: reuse as i32,
        fed_generated: Vec::new(),
        cached: reuse as u32,
        generated: 0,
        logits_at: None,
        draft_max,
        drafts: Vec::new(),
        started,
        queue_ms,
        prompt_ms: 0,
    };
    slot.send(Event::Started {
        prompt_tokens: slot.prompt.len() as u32,
        queue_ms,
    })
    .then_some(slot)
}

/// One decode over every slot, then sampling for those whose logits came out.
fn step(
    model: &LlamaModel,
    ctx: &mut LlamaContext<'_>,
    batch: &mut LlamaBatch<'_>,
    slots: &mut Vec<Slot>,
    cache: &mut PromptCache,
    context_size: u32,
    load: &EngineLoad,
) {
    // Clients gone: free their sequences now.
    slots.retain(|s| {
        let gone = s.events.is_closed();
        if gone {
            let _ = ctx.clear_kv_cache_seq(Some(s.seq as u32), None, None);
        }
        !gone
    });
    if slots.is_empty() {
        return;
    }
    let n_batch = ctx.n_batch() as usize;
    // In sequence order: with one KV stream per sequence, llama.cpp puts
    // sequences into one micro-batch only when they come in order; out of
    // order, each would get a micro-batch of its own and nothing is batched.
    slots.sort_unstable_by_key(|s| s.seq);
    batch.clear();
    let mut sequences = 0;
    let mut failed: Vec<(i32, GenerateError)> = Vec::new();
    // Generating sequences first: each adds its one token, and its drafts
    // where the batch keeps a row for every other generating sequence.
    let mut generating = slots.iter().filter(|s| s.next.is_some()).count();
    for slot in slots.iter_mut() {
        slot.logits_at = None;
        slot.drafts.clear();
        if let Some(token) = slot.next.take() {
            generating -= 1;
            let room = n_batch.saturating_sub(batch.n_tokens() as usize + 1 + generating);
            let drafts = draft(slot, token, context_size, room);
            let added = batch
                .add(token, slot.pos, &[slot.seq], true)
                .and_then(|()| {
                    for (i, &d) in drafts.iter().enumerate() {
                        batch.add(d, slot.pos + 1 + i as i32, &[slot.seq], true)?;
                    }
                    Ok(())
                });
            match added {
                Ok(()) => {
                    slot.pos += 1;
                    slot.fed_generated.push(token);
                    slot.logits_at = Some(batch.n_tokens() - 1 - drafts.len() as i32);
                    slot.drafts = drafts;
                    sequences += 1;
                }
                Err(e) => failed.push((slot.seq, GenerateError::Decode(e.to_string()))),
            }
        }
    }
    // Then prompts, in arrival order, as far as the batch has room.
    for slot in slots.iter_mut() {
        let room = n_batch.saturating_sub(batch.n_tokens() as usize);
        if slot.fed >= slot.prompt.len() || room == 0 {
            continue;
        }
        let end = (slot.fed + room).min(slot.prompt.len());
        let last = slot.prompt.len() - 1;
        for i in slot.fed..end {
            if let Err(e) = batch.add(slot.prompt[i], i as i32, &[slot.seq], i == last) {
                failed.push((slot.seq, GenerateError::Decode(e.to_string())));
                break;
            }
        }
        slot.fed = end;
        slot.pos = end as i32;
        if end == slot.prompt.len() {
            slot.logits_at = Some(batch.n_tokens() - 1);
        }
        sequences += 1;
    }
    if batch.n_tokens() > 0 {
        load.batches.fetch_add(1, Ordering::Relaxed);
        load.batched_tokens
            .fetch_add(batch.n_tokens() as usize, Ordering::Relaxed);
        load.peak_sequences.fetch_max(sequences, Ordering::Relaxed);
        if let Err(e) = ctx.decode(batch) {
            // Nothing of this step can be trusted: every sequence in it fails.
            let message = e.to_string();
            load.active.store(0, Ordering::Relaxed);
            for slot in slots.drain(..) {
                let _ = ctx.clear_kv_cache_seq(Some(slot.seq as u32), None, None);
                slot.fail(GenerateError::Decode(message.clone()));
            }
            return;
        }
    }
    for (seq, e) in failed {
        if let Some(i) = slots.iter().position(|s| s.seq == seq) {
            let slot = slots.swap_remove(i);
            let _ = ctx.clear_kv_cache_seq(Some(seq as u32), None, None);
            load.active.store(slots.len(), Ordering::Relaxed);
            slot.fail(e);
        }
    }
    // Sample where logits came out; finished sequences leave.
    let mut i = 0;
    while i < slots.len() {
        let sampled = match slots[i].logits_at {
            Some(at) => sample_rows(model, ctx, &mut slots[i], at, context_size, load),
            None => Sampled::Next,
        };
        if let Sampled::Next = sampled {
            i += 1;
            continue;
        }
        // Its KV stays for a later prompt that starts with the same tokens.
        let mut slot = slots.swap_remove(i);
        let mut tokens = std::mem::take(&mut slot.prompt);
        tokens.append(&mut slot.fed_generated);
        tokens.truncate(slot.pos.max(0) as usize);
        cache.keep(slot.seq, tokens);
        // The gauge drops before the client hears "done": whoever reads the
        // stats after an answer sees it gone.
        load.active.store(slots.len(), Ordering::Relaxed);
        if let Sampled::Done(done) = sampled {
            let _ = slot.send(done);
        }
    }
}

/// Prompt-lookup drafts to decode after `token` (see `speculation`): within
/// the context, `max_tokens` (a step yields one token more than it drafts)
/// and `room` rows of the batch.
fn draft(slot: &Slot, token: LlamaToken, context_size: u32, room: usize) -> Vec<LlamaToken> {
    if slot.draft_max == 0 {
        return Vec::new();
    }
    // `token` goes to `pos`; drafts after it must stay inside the context.
    let in_context = (context_size as usize).saturating_sub(slot.pos as usize + 2);
    let wanted = (slot.params.max_tokens as usize).saturating_sub(slot.generated as usize + 1);
    let max = slot.draft_max.min(in_context).min(wanted).min(room);
    if max == 0 {
        return Vec::new();
    }
    let sequence: Vec<i32> = slot
        .prompt
        .iter()
        .chain(&slot.fed_generated)
        .chain(std::iter::once(&token))
        .map(|t| t.0)
        .collect();
    super::speculation::lookup_draft(&sequence, max)
        .into_iter()
        .map(LlamaToken)
        .collect()
}

/// Samples the rows of `slot`'s step from batch index `at`: `next`'s row,
/// then one per draft while the model chose the draft before it. Accepted
/// drafts join the sequence (their cells are already there); the cells of
/// the rest are removed.
fn sample_rows(
    model: &LlamaModel,
    ctx: &mut LlamaContext<'_>,
    slot: &mut Slot,
    at: i32,
    context_size: u32,
    load: &EngineLoad,
) -> Sampled {
    let drafts = std::mem::take(&mut slot.drafts);
    let mut accepted = 0;
    let sampled = loop {
        let sampled = sample(model, ctx, slot, at + accepted as i32, context_size);
        match (&sampled, slot.next, drafts.get(accepted)) {
            (Sampled::Next, Some(token), Some(&d)) if token == d => {
                // The model's own choice: decoded already, at `pos`.
                slot.next = None;
                slot.fed_generated.push(d);
                slot.pos += 1;
                accepted += 1;
            }
            _ => break sampled,
        }
    };
    if !drafts.is_empty() {
        load.speculation
            .record(drafts.len() as u64, accepted as u64);
        if accepted < drafts.len()
            && ctx
                .kv_cache_seq_rm(slot.seq, Some(slot.pos as u32), None)
                .is_err()
        {
            return Sampled::Done(Event::Failed(GenerateError::Decode(
                "could not roll back rejected draft tokens".into(),
            )));
        }
    }
    sampled
}

/// What sampling one token did to its sequence.
enum Sampled {
    /// It goes on: the token is fed in the next step.
    Next,
    /// Its client left.
    Left,
    /// It finished; this is the last event for its client.
    Done(Event),
}

/// Samples one token for `slot` from the logits at batch index `at` and emits
/// its text; a finished sequence's last event is returned for the caller to
/// send once the sequence has left the engine.
fn sample(
    model: &LlamaModel,
    ctx: &LlamaContext<'_>,
    slot: &mut Slot,
    at: i32,
    context_size: u32,
) -> Sampled {
    if slot.generated == 0 && slot.prompt_ms == 0 {
        slot.prompt_ms = slot.started.elapsed().as_millis() as u64;
    }
    let finish = 'finish: {
        if slot.generated >= slot.params.max_tokens {
            break 'finish FinishReason::Length;
        }
        let token = slot.sampler.sample(ctx, at);
        if !slot.params.ignore_eos && model.vocab().is_eog(token) {
            break 'finish FinishReason::Stop;
        }
        if let Some(k) = slot.params.logprobs {
            let logits = ctx.get_logits_ith(at);
            if let Some(lp) = super::logprobs::entry(model, logits, token, usize::from(k))
                && !slot.send(Event::Logprob(lp))
            {
                return Sampled::Left;
            }
        }
        slot.generated += 1;
        match slot.out.push(model, token) {
            Pushed::Emit(text) => {
                if !text.is_empty() && !slot.send(Event::Token(text)) {
                    return Sampled::Left;
                }
            }
            Pushed::Stop(text) => {
                if !text.is_empty() && !slot.send(Event::Token(text)) {
                    return Sampled::Left;
                }
                break 'finish FinishReason::Stop;
            }
        }
        if slot.pos as u32 >= context_size {
            break 'finish FinishReason::Length;
        }
        if slot.generated >= slot.params.max_tokens {
            break 'finish FinishReason::Length;
        }
        slot.next = Some(token);
        return Sampled::Next;
    };
    let rest = slot.out.finish();
    if !rest.is_empty() && !slot.send(Event::Token(rest)) {
        return Sampled::Left;
    }
    let prompt_tokens = slot.prompt.len() as u32;
    Sampled::Done(Event::Done {
        finish_reason: finish,
        usage: Usage {
            prompt_tokens,
            completion_tokens: slot.generated,
            total_tokens: prompt_tokens + slot.generated,
            prompt_tokens_details: PromptTokensDetails {
                cached_tokens: slot.cached,
            },
        },
        timing: Timing {
            queue_ms: slot.queue_ms,
            inference_ms: slot.started.elapsed().as_millis() as u64,
            prompt_ms: slot.prompt_ms,
            route: None,
        },
        cost: 0,
    })
}
