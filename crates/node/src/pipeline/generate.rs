//! The requester's side of split inference: one generation through a chain.
//!
//! It behaves like the local engine (same tokenizer, same sampler chain at the last
//! hop, same prompt batching, same stop handling), emitting the same [`Event`]s, so
//! the HTTP layer cannot tell the two apart. Every step it has run is remembered;
//! when a hop fails, its node is left out, a new chain is planned (a span's standby
//! usually takes over), and the remembered steps are replayed there in the same
//! batches — which rebuilds every KV cache bit for bit — before the failed step is
//! retried. The client sees no gap, repeat or change.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Instant;

use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::token::LlamaToken;
use tokio::sync::mpsc;

use super::Pipeline;
use super::host::StepInput;
use super::wire::{Envelope, Hop, InputKind, SampleSpec, StepFailure};
use crate::infer::{
    Event, FinishReason, GenerateError, GenerateRequest, SamplingParams, Timing, Usage,
};
use crate::net::link::Link;

/// Re-routes one generation may make before giving up.
const MAX_REROUTES: usize = 4;
/// How often a generation compares its steps' time with the route's
/// prediction (see [`Pipeline::replan_if_degraded`]).
const REPLAN_EVERY: std::time::Duration = std::time::Duration::from_secs(2);
/// Moves a generation to another chain at most this often.
const MAX_REPLANS: usize = 4;
/// Decode steps whose time sets the next one's deadline (see
/// [`Run::step_deadline`]).
const STEP_WINDOW: usize = 16;
/// Finished generations kept for a later prompt that starts with their tokens.
const KEPT_RUNS: usize = 4;
/// How long a kept generation is offered (well inside the hops' session TTL).
const KEPT_FOR: std::time::Duration = std::time::Duration::from_secs(120);

/// A finished generation whose sessions the hops still hold: a conversation's
/// next turn continues it instead of recomputing its history.
pub(super) struct Kept {
    run: Run,
    at: Instant,
}

impl Kept {
    /// The tokens in its caches.
    fn tokens(&self) -> impl Iterator<Item = &i32> {
        self.run.history.iter().flat_map(|(t, _)| t.iter())
    }
}

/// The chain a generation runs on and what it has sent through it.
struct Run {
    model_id: String,
    hops: Vec<Hop>,
    session: [u8; 16],
    seq: u64,
    /// Every step so far: (tokens, first position).
    history: Vec<(Vec<i32>, u32)>,
    /// Nodes that failed during this generation.
    excluded: HashSet<String>,
    reroutes: usize,
    /// Work sent through each other node, per session: what receipts may claim.
    /// (node, work) — a handful of entries, looked up without allocating per step.
    work: Vec<(String, crate::credits::Work)>,
    /// The link to the chain's next node, kept from step to step.
    link: Option<Link>,
    /// The kept session this run's first step takes over on every hop.
    continues: Option<[u8; 16]>,
    /// The chain as planned, for the answer's timing.
    report: super::route::RouteReport,
    /// Times the generation moved to a cheaper chain (a link degraded).
    replans: usize,
    /// The next step must first replay the history on a new chain.
    replay: bool,
    /// The last [`STEP_WINDOW`] decode steps' times (ms).
    step_ms: std::collections::VecDeque<f64>,
    /// A step timed out where no other chain exists: wait as long as a link
    /// allows from then on.
    patient: bool,
}

impl Run {
    /// A fresh session on chain `hops`.
    fn new(model_id: String, hops: Vec<Hop>, link: Option<Link>) -> Self {
        Run {
            model_id,
            hops,
            session: rand::random(),
            seq: 0,
            history: Vec::new(),
            excluded: HashSet::new(),
            reroutes: 0,
            work: Vec::new(),
            link,
            continues: None,
            report: Default::default(),
            replans: 0,
            replay: false,
            step_ms: std::collections::VecDeque::new(),
            patient: false,
        }
    }

    /// A run that continues `kept` on its chain, keeping the first `reuse`
    /// tokens of its caches: a new session that takes the kept one over.
    fn continuing(kept: Kept, reuse: usize) -> Self {
        let mut run = kept.run;
        let mut history = Vec::new();
        for (tokens, pos) in std::mem::take(&mut run.history) {
            let start = pos as usize;
            if start >= reuse {
                break;
            }
            let keep = (reuse - start).min(tokens.len());
            history.push((tokens[..keep].to_vec(), pos));
        }
        Run {
            session: rand::random(),
            seq: 0,
            history,
            continues: Some(run.session),
            ..Run::new(run.model_id, run.hops, run.link)
        }
    }

    /// How long a decode step may take before its first remote hop counts
    /// as gone and the generation fails over: 8 times the median of the last
    /// decode steps or twice the slowest (a prompt's batch is no measure of
    /// them), between 1 and 30 s (a link that stops answering is left within
    /// about a second instead of after the links' 30 s). `None` (the links'
    /// own limit) until a few steps were measured, and once patient.
    fn step_deadline(&self) -> Option<std::time::Duration> {
        if self.patient || self.step_ms.len() < 4 {
            return None;
        }
        let mut sorted: Vec<f64> = self.step_ms.iter().copied().collect();
        sorted.sort_by(f64::total_cmp);
        let (median, slowest) = (sorted[sorted.len() / 2], sorted[sorted.len() - 1]);
        Some(std::time::Duration::from_secs_f64(
            ((median * 8.0).max(slowest * 2.0) / 1000.0).clamp(1.0, 30.0),
        ))
    }

    /// Counts a step about to be sent against every hop of its route.
    fn tally(&mut self, env: &Envelope) {
        let last = env.route.len().saturating_sub(1);
        for (i, hop) in env.route.iter().enumerate() {
            let at = self
                .work
                .iter()
                .position(|(node, w)| *node == hop.node_id && w.session == env.session)
                .unwrap_or_else(|| {
                    self.work.push((
                        hop.node_id.clone(),
                        crate::credits::Work {
                            model_id: hop.model_id.clone(),
                            session: env.session.clone(),
                            layer_tokens: 0,
                            tokens_generated: 0,
                        },
                    ));
                    self.work.len() - 1
                });
            let w = &mut self.work[at].1;
            let layers = u64::from(hop.layer_end.saturating_sub(hop.layer_start));
            w.layer_tokens += layers * u64::from(env.n_tokens);
            w.tokens_generated += u64::from(i == last && env.sample.is_some());
        }
    }

    fn envelope(&mut self, pipeline: &Pipeline, pos: u32, rows: usize) -> Envelope {
        self.seq += 1;
        Envelope {
            session: hex::encode(self.session),
            seq: self.seq,
            requester: pipeline.inner.node_id.clone(),
            route: self.hops.clone(),
            pos,
            n_tokens: rows as u32,
            input: InputKind::Tokens,
            // The requester's permission, signed with the step: the narrowest
            // format any hop may send onwards on a slow link.
            dtype: super::wire::dtype_name(if pipeline.inner.config.approximate {
                pipeline.inner.config.dtype
            } else {
                super::activation::Dtype::F32
            })
            .into(),
            sample: None,
            prime: Vec::new(),
            close: false,
            draft: 0,
            continues: self.continues.take().map(hex::encode),
            // Signed when sent (`request_step`), once every field is final.
            requester_sig: String::new(),
        }
    }
}

impl Pipeline {
    /// The price of the work other nodes did in a generation, at the rates
    /// this node pays each of them.
    fn cost_of(&self, work: &[(String, crate::credits::Work)]) -> i64 {
        let Some(accounting) = self.accounting() else {
            return 0;
        };
        work.iter()
            .filter(|(node, _)| *node != self.inner.node_id)
            .map(|(node, w)| accounting.price(node, w))
            .fold(0i64, i64::saturating_add)
    }

    /// Starts a generation of `model_id` through the network. Events arrive as from
    /// the local engine; dropping the receiver cancels it.
    pub fn submit(&self, model_id: &str, request: GenerateRequest) -> mpsc::Receiver<Event> {
        let (tx, rx) = mpsc::channel(256);
        let this = self.clone();
        let model_id = model_id.to_string();
        self.spawn(async move {
            if let Err(e) = this.generate(&model_id, request, &tx).await {
                let _ = tx.send(Event::Failed(e)).await;
            }
        });
        rx
    }

    async fn generate(
        &self,
        model_id: &str,
        request: GenerateRequest,
        events: &mpsc::Sender<Event>,
    ) -> Result<(), GenerateError> {
        let started = Instant::now();
        let vocab = self
            .vocab(model_id)
            .await
            .map_err(GenerateError::Pipeline)?;
        // Exactly as the local engine tokenizes.
        let tokens: Vec<i32> =
            crate::infer::prompt_tokens(&vocab, &request.prompt, self.inner.config.context_size)?
                .into_iter()
                .map(|t| t.0)
                .collect();
        // The chain's nodes count this generation as in flight until it ends.
        let (plan, _in_flight) =
            self.plan_reserved(model_id)
                .await
                .map_err(|e| GenerateError::NoRoute {
                    message: e.to_string(),
                    missing: e.missing.clone(),
                })?;
        tracing::info!(
            model = model_id,
            route = %plan.spans.iter().map(|s| format!("{}[{}..{}]", super::short(&s.primary.node_id), s.primary.layer_start, s.primary.layer_end)).collect::<Vec<_>>().join(" → "),
            cost_ms = plan.cost_ms,
            "pipeline route"
        );
        let prompt_tokens = tokens.len() as u32;
        if events
            .send(Event::Started {
                prompt_tokens,
                queue_ms: 0,
            })
            .await
            .is_err()
        {
            return Ok(());
        }
        // A kept generation whose tokens start this prompt: its chain keeps
        // them (all but the prompt's last token, whose logits start this one).
        let mut reuse = 0;
        // Only on the chain just planned: the planner applies private mode, the
        // encrypted pipeline and load, and a kept chain must pass them again.
        let planned = plan.hops(model_id);
        let mut run = match self.take_kept(model_id, &planned, &tokens, request.params.cache_prompt)
        {
            Some((kept, shared)) => {
                reuse = shared;
                Run::continuing(kept, shared)
            }
            None => Run::new(model_id.to_string(), planned, None),
        };
        run.report = plan.report(model_id);
        let outcome = self
            .decode_loop(
                &mut run,
                &vocab,
                &tokens,
                reuse,
                &request.params,
                events,
                started,
            )
            .await;
        if let Some(accounting) = self.accounting() {
            let me = &self.inner.node_id;
            accounting.requested(
                std::mem::take(&mut run.work)
                    .into_iter()
                    .filter(|(node, _)| node != me)
                    .collect(),
            );
        }
        if outcome.is_ok() && !run.history.is_empty() {
            // The hops keep the sessions for a next turn; the oldest kept one
            // (or one past its time) ends instead.
            let kept = Kept {
                run,
                at: Instant::now(),
            };
            let ended = {
                let mut all = self.inner.kept.lock().unwrap_or_else(|p| p.into_inner());
                let mut ended: Vec<Kept> = Vec::new();
                while let Some(old) = all.front() {
                    if all.len() < KEPT_RUNS && old.at.elapsed() < KEPT_FOR {
                        break;
                    }
                    ended.extend(all.pop_front());
                }
                all.push_back(kept);
                ended
            };
            for old in ended {
                self.close_sessions(old.run);
            }
        } else {
            self.close_sessions(run);
        }
        outcome
    }

    /// Ends a run's session along its chain, in the background.
    fn close_sessions(&self, mut run: Run) {
        let mut close = run.envelope(self, 0, 0);
        close.close = true;
        let mut link = run.link.take();
        let this = self.clone();
        self.spawn(async move {
            let _ = this
                .request_step(close, StepInput::Tokens(Vec::new()), &mut link)
                .await;
        });
    }

    /// The kept generation of `model_id` on chain `hops` sharing the longest
    /// prefix with `tokens`, taken out of the cache, and how many of its tokens to keep
    /// (never the prompt's last: its logits start the answer).
    fn take_kept(
        &self,
        model_id: &str,
        hops: &[Hop],
        tokens: &[i32],
        allowed: bool,
    ) -> Option<(Kept, usize)> {
        if !allowed {
            return None;
        }
        let mut all = self.inner.kept.lock().unwrap_or_else(|p| p.into_inner());
        let (i, shared) = all
            .iter()
            .enumerate()
            .filter(|(_, k)| {
                k.run.model_id == model_id && k.run.hops == hops && k.at.elapsed() < KEPT_FOR
            })
            .map(|(i, k)| {
                let shared = k.tokens().zip(tokens).take_while(|(a, b)| a == b).count();
                (i, shared.min(tokens.len().saturating_sub(1)))
            })
            .max_by_key(|(_, shared)| *shared)?;
        if shared == 0 {
            return None;
        }
        all.remove(i).map(|k| (k, shared))
    }

    #[allow(clippy::too_many_arguments)]
    async fn decode_loop(
        &self,
        run: &mut Run,
        vocab: &Arc<LlamaModel>,
        tokens: &[i32],
        reuse: usize,
        params: &SamplingParams,
        events: &mpsc::Sender<Event>,
        started: Instant,
    ) -> Result<(), GenerateError> {
        let spec = SampleSpec::from_params(params);
        let batch = self.inner.config.batch_size.clamp(1, 512) as usize;
        let n_ctx = self.inner.config.context_size;
        let mut generated: Vec<i32> = Vec::new();
        // Speculation only where it cannot change the text (see
        // `SamplingParams::speculation_safe`).
        let draft_max = if params.speculation_safe() {
            params
                .speculative
                .unwrap_or(self.inner.config.speculative_tokens)
                .min(super::wire::MAX_DRAFT) as usize
        } else {
            0
        };
        // The whole sequence, where drafts are looked up.
        let mut context: Vec<i32> = tokens.to_vec();
        let (mut drafted, mut accepted) = (0u64, 0u64);

        // The prompt past what the chain already holds, in batch-sized steps.
        let chunks: Vec<&[i32]> = tokens[reuse..].chunks(batch).collect();
        let mut next = None;
        for (i, chunk) in chunks.iter().enumerate() {
            let last = i + 1 == chunks.len();
            next = self
                .step(
                    run,
                    chunk.to_vec(),
                    (reuse + i * batch) as u32,
                    last.then(|| spec.clone()),
                    &generated,
                    0,
                )
                .await?;
        }
        let prompt_ms = started.elapsed().as_millis() as u64;
        let decode_started = Instant::now();
        let mut decode_steps = 0u64;
        // Steps since the route was last weighed against its prediction.
        let mut window = (Instant::now(), 0u32);

        let mut out = crate::infer::TextOut::new(params.stop.clone());
        let mut n_cur = tokens.len() as u32;
        // Tokens the model chose and the chain already holds in its caches
        // but not yet given out (a verified run of drafts), then the one
        // after them, which the next step feeds in.
        let mut pending: std::collections::VecDeque<super::wire::Sampled> =
            std::collections::VecDeque::new();
        let finish_reason = loop {
            if generated.len() as u32 >= params.max_tokens {
                break FinishReason::Length;
            }
            if events.is_closed() {
                return Ok(()); // the client went away
            }
            let sampled = match pending.pop_front().or_else(|| next.take()) {
                Some(s) => s,
                None => {
                    return Err(GenerateError::Pipeline(
                        "the last hop returned no token".into(),
                    ));
                }
            };
            // The last hop's word: an id outside the vocabulary would make
            // llama.cpp throw (and abort) when it is detokenized.
            let token = known_token(vocab, sampled.token)?.0;
            if !params.ignore_eos && vocab.vocab().is_eog(LlamaToken(token)) {
                break FinishReason::Stop;
            }
            if let Some(lp) = logprob_entry(vocab, &sampled)?
                && events.send(Event::Logprob(lp)).await.is_err()
            {
                return Ok(());
            }
            generated.push(token);
            match out.push(vocab, LlamaToken(token)) {
                crate::infer::Pushed::Emit(text) => {
                    if !text.is_empty() && events.send(Event::Token(text)).await.is_err() {
                        return Ok(());
                    }
                }
                crate::infer::Pushed::Stop(text) => {
                    if !text.is_empty() && events.send(Event::Token(text)).await.is_err() {
                        return Ok(());
                    }
                    break FinishReason::Stop;
                }
            }
            context.push(token);
            if n_cur >= n_ctx {
                break FinishReason::Length;
            }
            if !pending.is_empty() {
                // A verified draft: already in the chain's caches.
                n_cur += 1;
                continue;
            }
            // Drafts, as many as can still count: within the context and
            // `max_tokens` (the step yields one token more than it drafts).
            let room = (n_ctx - n_cur - 1) as usize;
            let wanted = (params.max_tokens as usize).saturating_sub(generated.len() + 1);
            let drafts = crate::infer::speculation::lookup_draft(
                &context,
                draft_max.min(room).min(wanted).min(batch - 1),
            );
            let mut rows = Vec::with_capacity(1 + drafts.len());
            rows.push(token);
            rows.extend(&drafts);
            let verified = self
                .step(
                    run,
                    rows,
                    n_cur,
                    Some(spec.clone()),
                    &generated,
                    drafts.len(),
                )
                .await?;
            decode_steps += 1;
            window.1 += 1;
            if window.0.elapsed() >= REPLAN_EVERY {
                let step_ms = window.0.elapsed().as_secs_f64() * 1000.0 / f64::from(window.1);
                window = (Instant::now(), 0);
                self.replan_if_degraded(run, step_ms).await;
            }
            n_cur += 1;
            match verified {
                Some(v) if !drafts.is_empty() => {
                    // The model's token after `token`, then after each draft:
                    // every draft it chose itself stands, and so does its
                    // choice after the last of those.
                    let chosen: Vec<i32> = std::iter::once(v.token)
                        .chain(v.after_drafts.iter().copied())
                        .collect();
                    let m = drafts
                        .iter()
                        .zip(&chosen)
                        .take_while(|(d, c)| d == c)
                        .count();
                    drafted += drafts.len() as u64;
                    accepted += m as u64;
                    pending.extend(chosen[..=m].iter().map(|&t| super::wire::Sampled::token(t)));
                    // The chain's caches hold `token` and the accepted drafts;
                    // the next step's position rolls every hop back to there.
                    if let Some((rows, _)) = run.history.last_mut() {
                        rows.truncate(1 + m);
                    }
                }
                other => next = other,
            }
        };
        if drafted > 0 {
            self.inner.speculation.record(drafted, accepted);
            tracing::debug!(drafted, accepted, "speculative decoding");
        }
        let rest = out.finish();
        if !rest.is_empty() && events.send(Event::Token(rest)).await.is_err() {
            return Ok(());
        }
        let route = self.measured_route(run, decode_started, decode_steps, generated.len());
        let completion = generated.len() as u32;
        let prompt_tokens = tokens.len() as u32;
        let _ = events
            .send(Event::Done {
                finish_reason,
                usage: Usage {
                    prompt_tokens,
                    completion_tokens: completion,
                    total_tokens: prompt_tokens + completion,
                    prompt_tokens_details: crate::infer::PromptTokensDetails {
                        cached_tokens: reuse as u32,
                    },
                },
                timing: Timing {
                    queue_ms: 0,
                    inference_ms: started.elapsed().as_millis() as u64,
                    prompt_ms,
                    route: Some(route),
                },
                cost: self.cost_of(&run.work),
            })
            .await;
        Ok(())
    }

    /// The run's route with what its decode steps measured (`tokens` given
    /// out in all, the first of them by the prompt's step), kept as the
    /// model's latest for `GET /api/v1/layers`.
    fn measured_route(
        &self,
        run: &mut Run,
        decode_started: Instant,
        steps: u64,
        tokens: usize,
    ) -> Box<super::route::RouteReport> {
        let decode_ms = decode_started.elapsed().as_secs_f64() * 1000.0;
        let mut report = std::mem::take(&mut run.report);
        report.reroutes = run.reroutes;
        report.replans = run.replans;
        report.measured_ms_per_step =
            (steps > 0).then(|| super::route::round2(decode_ms / steps as f64));
        report.measured_ms_per_token =
            (tokens > 1).then(|| super::route::round2(decode_ms / (tokens - 1) as f64));
        self.inner.routes.remember(report.clone());
        Box::new(report)
    }

    /// Runs one step, re-routing and replaying as often as needed; its last
    /// `drafts` rows are draft tokens to verify.
    async fn step(
        &self,
        run: &mut Run,
        tokens: Vec<i32>,
        pos: u32,
        sample: Option<SampleSpec>,
        generated: &[i32],
        drafts: usize,
    ) -> Result<Option<super::wire::Sampled>, GenerateError> {
        let mut replay_needed = false;
        loop {
            // This step takes over a kept session (see `Run::continuing`).
            let continuing = run.continues.is_some();
            replay_needed |= std::mem::take(&mut run.replay);
            // A decode step (one new token and its drafts: not a prompt's
            // batch, not a replay) gets a deadline from the decode steps
            // before it; past it the first remote hop is to blame.
            let decoding = sample.is_some() && !replay_needed && tokens.len() == drafts + 1;
            let remote = run
                .hops
                .iter()
                .find(|h| h.node_id != self.inner.node_id)
                .map(|h| h.node_id.clone());
            let deadline = (decoding && remote.is_some())
                .then(|| run.step_deadline())
                .flatten();
            let attempt_started = Instant::now();
            let attempt = async {
                if replay_needed {
                    // In their original batches: a batch of other rows can
                    // round a row's numbers differently (llama.cpp's kernels
                    // are not batch-invariant), and a replay must rebuild
                    // every cache bit for bit. Sent back to back, so the
                    // chain's round trip is paid about once.
                    let mut steps = Vec::with_capacity(run.history.len());
                    for (t, p) in run.history.clone() {
                        let env = run.envelope(self, p, t.len());
                        run.tally(&env);
                        steps.push((env, StepInput::Tokens(t)));
                    }
                    let (n, started) = (steps.len(), Instant::now());
                    self.replay(steps, &mut run.link).await?;
                    tracing::info!(
                        steps = n,
                        ms = started.elapsed().as_millis() as u64,
                        "replayed the generation's steps on the new chain"
                    );
                }
                let mut env = run.envelope(self, pos, tokens.len());
                env.sample = sample.clone();
                env.draft = drafts as u32;
                if replay_needed && sample.is_some() {
                    env.prime = generated.to_vec();
                }
                run.tally(&env);
                self.request_step(env, StepInput::Tokens(tokens.clone()), &mut run.link)
                    .await
            };
            let outcome = match deadline {
                Some(limit) => tokio::time::timeout(limit, attempt)
                    .await
                    .unwrap_or_else(|_| {
                        Err(StepFailure {
                            failed_hop: remote,
                            message: format!("no answer within {} ms", limit.as_millis()),
                        })
                    }),
                None => attempt.await,
            };
            let timed_out = deadline.is_some_and(|d| attempt_started.elapsed() >= d);
            match outcome {
                Ok(token) => {
                    if decoding {
                        if run.step_ms.len() == STEP_WINDOW {
                            run.step_ms.pop_front();
                        }
                        run.step_ms
                            .push_back(attempt_started.elapsed().as_secs_f64() * 1000.0);
                    }
                    run.history.push((tokens, pos));
                    return Ok(token);
                }
                Err(failure) if continuing => {
                    // The hops no longer hold the kept session (expired, or a
                    // node restarted): rebuild the caches from the kept steps
                    // on a new session, on the same chain.
                    tracing::debug!(reason = %failure.message, "a kept session is gone; replaying");
                    run.continues = None;
                    run.session = rand::random();
                    run.seq = 0;
                    run.reroutes += 1;
                    replay_needed = true;
                }
                Err(failure) => {
                    self.reroute(run, failure, timed_out).await?;
                    replay_needed = true;
                }
            }
        }
    }

    /// When the steps of the last [`REPLAN_EVERY`] took `step_ms` each, well
    /// over what the route predicted (a link degraded), plans again with the
    /// latest measurements and moves the generation to a chain predicted much
    /// cheaper than that: the old chain's sessions end, and the next step
    /// replays the steps so far on the new one (which rebuilds its caches bit
    /// for bit, as after a failure).
    async fn replan_if_degraded(&self, run: &mut Run, step_ms: f64) {
        /// Slower than predicted by this factor counts as degraded, and a new
        /// chain must be predicted this much faster than what was measured.
        const FACTOR: f64 = 1.5;
        /// And by at least this many ms (noise on fast links is no reason).
        const MARGIN_MS: f64 = 10.0;
        let predicted = run.report.predicted_ms_per_token;
        if run.replans >= MAX_REPLANS || step_ms < predicted * FACTOR + MARGIN_MS {
            return;
        }
        let Ok(plan) = self.plan(&run.model_id, &run.excluded).await else {
            return;
        };
        let hops = plan.hops(&run.model_id);
        let report = plan.report(&run.model_id);
        if hops == run.hops || report.predicted_ms_per_token * FACTOR + MARGIN_MS > step_ms {
            return;
        }
        tracing::info!(
            model = %run.model_id,
            measured_ms = step_ms,
            predicted_ms = report.predicted_ms_per_token,
            "the route degraded; moving the generation to a cheaper chain"
        );
        let mut old = Run::new(
            run.model_id.clone(),
            std::mem::replace(&mut run.hops, hops),
            None,
        );
        old.session = run.session;
        old.seq = run.seq;
        self.close_sessions(old);
        run.report = report;
        run.replans += 1;
        run.session = rand::random();
        run.seq = 0;
        run.replay = true;
    }

    /// Leaves the failed node out and plans a new chain with a fresh session.
    /// A node that only `timed_out` stays in when no chain is left without
    /// it: the generation waits for it patiently instead of failing.
    async fn reroute(
        &self,
        run: &mut Run,
        failure: StepFailure,
        timed_out: bool,
    ) -> Result<(), GenerateError> {
        let Some(bad) = failure.failed_hop.clone() else {
            return Err(GenerateError::Pipeline(failure.message));
        };
        run.reroutes += 1;
        if run.reroutes > MAX_REROUTES {
            return Err(GenerateError::Pipeline(format!(
                "gave up after {MAX_REROUTES} re-routes: {}",
                failure.message
            )));
        }
        tracing::warn!(hop = %super::short(&bad), reason = %failure.message,
            "pipeline hop failed; re-routing");
        run.excluded.insert(bad.clone());
        let mut planned = self.plan(&run.model_id, &run.excluded).await;
        if planned.is_err() && timed_out {
            run.excluded.remove(&bad);
            run.patient = true;
            planned = self.plan(&run.model_id, &run.excluded).await;
        }
        let plan = planned.map_err(|e| GenerateError::NoRoute {
            message: format!("{e} (after {}: {})", "a hop failed", failure.message),
            missing: e.missing.clone(),
        })?;
        run.hops = plan.hops(&run.model_id);
        run.report = plan.report(&run.model_id);
        run.session = rand::random();
        run.seq = 0;
        Ok(())
    }
}

/// The last hop's log-probabilities of `sampled` as the API gives them, with
/// each id (the last hop's word) checked against this node's vocabulary first.
fn logprob_entry(
    vocab: &LlamaModel,
    sampled: &super::wire::Sampled,
) -> Result<Option<crate::infer::logprobs::TokenLogprob>, GenerateError> {
    let Some((logprob, top)) = &sampled.logprobs else {
        return Ok(None);
    };
    let token = known_token(vocab, sampled.token)?;
    let top = top
        .iter()
        .map(|&(id, l)| Ok((known_token(vocab, id)?, l)))
        .collect::<Result<Vec<_>, GenerateError>>()?;
    Ok(Some(crate::infer::logprobs::render(
        vocab, token, *logprob, &top,
    )))
}

/// `id` as a token of `vocab`, or the error that a peer named one outside it.
fn known_token(vocab: &LlamaModel, id: i32) -> Result<LlamaToken, GenerateError> {
    if (0..vocab.n_vocab()).contains(&id) {
        Ok(LlamaToken(id))
    } else {
        Err(GenerateError::Pipeline(format!(
            "the last hop named token {id}, outside the vocabulary"
        )))
    }
}
