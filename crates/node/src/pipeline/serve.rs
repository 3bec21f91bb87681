//! Serving and sending steps: a hop runs its layers for the authenticated peer
//! that sent the step, forwards the output along the route over a kept link, and
//! answers with the sealed result; the requester's side sends each step and opens
//! the answer.

use super::activation::{self, Direction, Dtype};
use super::host::{self, Step, StepInput, StepOutput};
use super::links::{result_aad, step_aad};
use super::wire::{self, Envelope, InputKind, StepFailure};
use super::{Pipeline, short};
use crate::net::frame::{Request, Response};
use crate::net::link::{InboundAnswers, InboundLink, Link};

impl Pipeline {
    pub(super) fn own_failure(&self, message: impl Into<String>) -> StepFailure {
        StepFailure {
            failed_hop: Some(self.inner.node_id.clone()),
            message: message.into(),
        }
    }

    /// Runs this node's hop of `env` (it must be `route[0]`) on `input` for
    /// `from` (the authenticated sender: the session's owner here): its layers
    /// (or the end of its session), and what goes onwards — the sealed result
    /// for the requester at the route's end, else the step for the next hop.
    pub(super) async fn run_hop(
        &self,
        from: &str,
        env: Envelope,
        input: StepInput,
    ) -> Result<Onward, StepFailure> {
        let me = &env.route[0];
        if me.node_id != self.inner.node_id {
            return Err(StepFailure {
                failed_hop: None,
                message: "step addressed to another node".into(),
            });
        }
        let session = env
            .session_bytes()
            .map_err(|e| self.own_failure(e.to_string()))?;
        let continues = env
            .continues_bytes()
            .map_err(|e| self.own_failure(e.to_string()))?;
        if env.close {
            self.inner.host.close(session, from);
        } else {
            let out = self
                .inner
                .host
                .step(Step {
                    peer: from.to_string(),
                    session,
                    seq: env.seq,
                    model_id: me.model_id.clone(),
                    layer_start: me.layer_start,
                    layer_end: me.layer_end,
                    pos: env.pos,
                    input,
                    sample: env.sample.clone(),
                    prime: env.prime.clone(),
                    draft: env.draft,
                    continues,
                })
                .await
                .map_err(|e| {
                    // A step no honest peer sends counts against its sender.
                    if matches!(e, host::HostError::Forbidden(_))
                        && from != self.inner.node_id
                        && let Some(network) = self.inner.network.get()
                    {
                        tracing::warn!(peer = %short(from), error = %e, "refused a hostile pipeline step");
                        network.report_bad_frame(from);
                    }
                    self.own_failure(e.to_string())
                })?;
            if let Some(accounting) = self.accounting() {
                let layers = u64::from(me.layer_end.saturating_sub(me.layer_start));
                accounting.served(
                    &env.requester,
                    &env.session,
                    &me.model_id,
                    layers * u64::from(env.n_tokens),
                    env.sample.is_some() && env.route.len() == 1,
                );
            }
            match out {
                StepOutput::Hidden(h) => {
                    if env.route.len() < 2 {
                        return Err(self.own_failure("the route ends before the model's head"));
                    }
                    let mut next = env;
                    next.route.remove(0);
                    next.input = InputKind::Hidden;
                    let to = next.route[0].node_id.clone();
                    let frame = self.seal_hidden(&next, session, &to, &h)?;
                    let bytes = wire::encode_request(&next, &frame);
                    return Ok(Onward::Next { to, bytes });
                }
                StepOutput::Token(t) if env.route.len() == 1 => {
                    return Ok(Onward::Done(self.seal_result(&env, session, t.as_ref())?));
                }
                StepOutput::Token(_) => {
                    return Err(self.own_failure("a range with the head is not the last hop"));
                }
            }
        }
        // A close travels down the whole chain.
        if env.route.len() > 1 {
            let mut close = env;
            close.route.remove(0);
            let to = close.route[0].node_id.clone();
            let bytes = wire::encode_request(&close, &[]);
            return Ok(Onward::Next { to, bytes });
        }
        Ok(Onward::Done(self.seal_result(&env, session, None)?))
    }

    /// Sends a step to `to` over `link` (opened, or replaced when it leads
    /// elsewhere) and waits for the answer; a transport failure blames `to` and
    /// drops the link.
    pub(super) async fn send(
        &self,
        to: &str,
        bytes: Vec<u8>,
        link: &mut Option<Link>,
    ) -> Result<Vec<u8>, StepFailure> {
        let size = bytes.len() as u64;
        let posted = self.open_and_post(to, bytes, link).await?;
        let (result, spent) = self.receive(to, link).await?;
        self.record_link(to, size, posted.elapsed(), spent);
        Ok(result)
    }

    /// Writes a step to `to` over `link` (opened, or replaced when it leads
    /// elsewhere) without waiting for its answer (see [`Pipeline::receive`]);
    /// returns when its first byte went out (a large step's write waits for
    /// the link's flow control, which is part of the link's speed).
    pub(super) async fn open_and_post(
        &self,
        to: &str,
        bytes: Vec<u8>,
        link: &mut Option<Link>,
    ) -> Result<std::time::Instant, StepFailure> {
        self.open_to(to, link).await?;
        let posted = std::time::Instant::now();
        let size = bytes.len() as u64;
        let mut open = link
            .take()
            .ok_or_else(|| unreachable(to, &"the link closed"))?;
        open.post(Request::Activation(bytes))
            .await
            .map_err(|e| unreachable(to, &e))?;
        *link = Some(open);
        self.inner
            .wire_bytes
            .fetch_add(size, std::sync::atomic::Ordering::Relaxed);
        Ok(posted)
    }

    /// What a step of `size` bytes to `to` took (`waited`, of which the hops
    /// `spent` computing): the link's latency and speed, for the planner and
    /// the choice of activation format.
    fn record_link(
        &self,
        to: &str,
        size: u64,
        waited: std::time::Duration,
        spent: std::time::Duration,
    ) {
        self.inner.link_latency.record(waited, spent);
        self.inner
            .link_speeds
            .record(to, size, waited.saturating_sub(spent));
    }

    /// Makes `link` lead to `to`: kept when it does, else opened (replacing
    /// one to another node).
    async fn open_to(&self, to: &str, link: &mut Option<Link>) -> Result<(), StepFailure> {
        if link.as_ref().is_some_and(|l| l.node_id() == to) {
            return Ok(());
        }
        *link = None;
        let network = self.inner.network.get().ok_or_else(|| StepFailure {
            failed_hop: Some(to.to_string()),
            message: "this node has no P2P network".into(),
        })?;
        *link = Some(
            network
                .open_link(to)
                .await
                .map_err(|e| unreachable(to, &e))?,
        );
        Ok(())
    }

    /// The answer to the oldest step posted to `to` over `link`: the sealed
    /// result and the time the hops spent on it. A transport failure drops the
    /// link; a hop's error answer keeps it (the stream is still in step).
    pub(super) async fn receive(
        &self,
        to: &str,
        link: &mut Option<Link>,
    ) -> Result<(Vec<u8>, std::time::Duration), StepFailure> {
        let blame = |message: String| StepFailure {
            failed_hop: Some(to.to_string()),
            message,
        };
        let mut open = match link.take() {
            Some(l) if l.node_id() == to => l,
            _ => return Err(blame("no step is waiting for an answer".into())),
        };
        let answer = open.answer().await.map_err(|e| unreachable(to, &e))?;
        match answer {
            Response::Activation(answer) => {
                self.inner
                    .wire_bytes
                    .fetch_add(answer.len() as u64, std::sync::atomic::Ordering::Relaxed);
                let (spent, result) =
                    wire::decode_answer(&answer).map_err(|e| blame(e.to_string()))?;
                let result = result.to_vec();
                *link = Some(open);
                Ok((result, spent))
            }
            Response::Error { message, .. } => {
                *link = Some(open);
                Err(serde_json::from_str(&message).unwrap_or(StepFailure {
                    failed_hop: Some(to.to_string()),
                    message,
                }))
            }
            other => Err(blame(format!("unexpected answer {other:?}"))),
        }
    }

    /// Answers the steps that arrive on `link` until it closes or idles out; the
    /// link onward to the next hop lives as long. Steps that arrive back to
    /// back (a replay) are forwarded back to back too: while a forwarded step
    /// waits for its answer, a step already read is run and forwarded behind
    /// it, so a chain pays its round trips about once per replay rather than
    /// once per step. The answers go back in the steps' order.
    pub(super) async fn serve_link(&self, link: InboundLink) {
        let from = link.from.clone();
        let (mut reader, mut answers) = link.split();
        let idle = self.inner.config.link_idle;
        let (tx, mut requests) = tokio::sync::mpsc::channel(READ_AHEAD);
        // Ends with this task, however it ends.
        let _read_ahead = tokio_util::task::AbortOnDropHandle::new(tokio::spawn(async move {
            while let Some(request) = reader.next(idle).await {
                if tx.send(request).await.is_err() {
                    break;
                }
            }
        }));
        let mut next: Option<Link> = None;
        let mut forwarded = std::collections::VecDeque::new();
        loop {
            // A step already here is run at once; with none, the oldest
            // forwarded step's answer goes back first.
            let request = match requests.try_recv() {
                Ok(request) => request,
                Err(_) if !forwarded.is_empty() => {
                    if !self
                        .answer_first(&mut forwarded, &mut next, &mut answers)
                        .await
                    {
                        return;
                    }
                    continue;
                }
                Err(_) => match requests.recv().await {
                    Some(request) => request,
                    None => return,
                },
            };
            let response = match self.begin_step(&from, request).await {
                Begun::Answer(response) => response,
                Begun::Forward(step) => {
                    // A link leads to one node: what went elsewhere, or on
                    // a link that broke, is answered before another link is
                    // opened; and the window is bounded.
                    while forwarded.len() >= REPLAY_IN_FLIGHT
                        || forwarded.iter().any(|f: &Forwarded| {
                            f.to != step.to || (next.is_none() && f.posted.is_ok())
                        })
                    {
                        if !self
                            .answer_first(&mut forwarded, &mut next, &mut answers)
                            .await
                        {
                            return;
                        }
                    }
                    let alone = forwarded.is_empty();
                    let size = step.bytes.len() as u64;
                    // A step that could not be sent is answered with its
                    // failure in its turn, after those forwarded before it.
                    let posted = self.open_and_post(&step.to, step.bytes, &mut next).await;
                    forwarded.push_back(Forwarded {
                        to: step.to,
                        started: step.started,
                        size,
                        alone,
                        posted,
                    });
                    continue;
                }
            };
            while !forwarded.is_empty() {
                if !self
                    .answer_first(&mut forwarded, &mut next, &mut answers)
                    .await
                {
                    return;
                }
            }
            if answers.respond(response).await.is_err() {
                return;
            }
        }
    }

    /// Answers the oldest step in `forwarded` with its answer from `next`;
    /// `false` when the link back is gone.
    async fn answer_first(
        &self,
        forwarded: &mut std::collections::VecDeque<Forwarded>,
        next: &mut Option<Link>,
        answers: &mut InboundAnswers,
    ) -> bool {
        let Some(step) = forwarded.pop_front() else {
            return true;
        };
        let outcome = match step.posted {
            Ok(posted) => self
                .receive(&step.to, next)
                .await
                .map(|(result, spent)| (result, spent, posted)),
            Err(failure) => Err(failure),
        };
        let response = match outcome {
            Ok((result, spent, posted)) => {
                // Timed only when nothing else shared the link meanwhile.
                if step.alone && forwarded.is_empty() {
                    self.record_link(&step.to, step.size, posted.elapsed(), spent);
                }
                Response::Activation(wire::encode_answer(step.started.elapsed(), &result))
            }
            Err(failure) => Response::Error {
                code: 502,
                message: failure_json(&failure),
            },
        };
        answers.respond(response).await.is_ok()
    }

    /// The answer to a malformed step, counted against its sender.
    pub(super) fn bad_step(&self, from: &str, reason: String) -> Response {
        if crate::net::malformed_log_allowed() {
            tracing::warn!(peer = %short(from), %reason, "malformed pipeline step");
        } else {
            tracing::debug!(peer = %short(from), %reason, "malformed pipeline step");
        }
        if let Some(network) = self.inner.network.get() {
            network.report_bad_frame(from);
        }
        Response::Error {
            code: 400,
            message: failure_json(&StepFailure {
                failed_hop: None,
                message: reason,
            }),
        }
    }

    /// Runs this node's part of a step from `from`: the answer to send back,
    /// or what to forward to the next hop.
    async fn begin_step(&self, from: &str, request: Request) -> Begun {
        let started = std::time::Instant::now();
        let bytes = match request {
            Request::Activation(bytes) => bytes,
            Request::Invalid(reason) => return Begun::Answer(self.bad_step(from, reason)),
            _ => {
                let reason = "a link carries pipeline steps only".into();
                return Begun::Answer(self.bad_step(from, reason));
            }
        };
        let failed = |failure: StepFailure| Response::Error {
            code: 502,
            message: failure_json(&failure),
        };
        Begun::Answer(match self.open_inbound(from, &bytes) {
            Err(reason) => self.bad_step(from, reason),
            // Outside its contribution hours (or past its contribution level's
            // share of sessions) a node serves only its own and its pool's
            // sessions; the requester routes around it.
            Ok((env, _)) if !env.close && !self.serves(&env.requester, env.pos == 0).await => {
                Response::Error {
                    code: 503,
                    message: failure_json(&self.own_failure(
                        "this node is outside its contribution hours or at its contribution limit",
                    )),
                }
            }
            Ok((env, input)) => match self.run_hop(from, env, input).await {
                Ok(Onward::Done(result)) => {
                    Response::Activation(wire::encode_answer(started.elapsed(), &result))
                }
                Ok(Onward::Next { to, bytes }) => {
                    return Begun::Forward(Forward { to, bytes, started });
                }
                Err(failure) => failed(failure),
            },
        })
    }

    /// Decodes a step from `from` and opens its body.
    pub(super) fn open_inbound(
        &self,
        from: &str,
        bytes: &[u8],
    ) -> Result<(Envelope, StepInput), String> {
        let (env, body) = wire::decode_request(bytes).map_err(|e| e.to_string())?;
        // The requester this hop serves (and bills) is proven, not claimed.
        if !env.requester_signed() {
            return Err("the step is not signed by its requester".into());
        }
        let session = env.session_bytes().map_err(|e| e.to_string())?;
        let key = self.link_key(from, &session).map_err(|e| e.message)?;
        if env.close {
            return Ok((env, StepInput::Tokens(Vec::new())));
        }
        let input = match env.input {
            // Token ids go to the first hop, and only the requester sends them: a
            // peer cannot run a session in another node's name.
            InputKind::Tokens if env.requester != from => {
                return Err("token input from a peer that is not the session's requester".into());
            }
            InputKind::Tokens => {
                let plain = activation::open_message(
                    &key,
                    env.seq,
                    Direction::Forward,
                    &step_aad(&env),
                    body,
                )
                .map_err(|e| e.to_string())?;
                let tokens = wire::bytes_to_tokens(&plain).map_err(|e| e.to_string())?;
                if tokens.len() != env.n_tokens as usize {
                    return Err(format!(
                        "{} token ids for {} rows",
                        tokens.len(),
                        env.n_tokens
                    ));
                }
                StepInput::Tokens(tokens)
            }
            InputKind::Hidden => {
                let (header, values) =
                    activation::open(&key, body, Direction::Forward).map_err(|e| e.to_string())?;
                if header.session != session
                    || header.seq != env.seq
                    || header.start_pos != env.pos
                    || header.n_tokens != env.n_tokens
                {
                    return Err("the activation header does not match the envelope".into());
                }
                // A hop sends f32 or the narrower format the requester signed
                // for, nothing else.
                let allowed = env.dtype().map_err(|e| e.to_string())?;
                if header.dtype != Dtype::F32 && header.dtype != allowed {
                    return Err(format!(
                        "hidden states as {} where the requester allowed {}",
                        super::wire::dtype_name(header.dtype),
                        super::wire::dtype_name(allowed)
                    ));
                }
                StepInput::Hidden(values)
            }
        };
        Ok((env, input))
    }

    /// Runs one step of a route as the requester and opens the result.
    pub(super) async fn request_step(
        &self,
        mut env: Envelope,
        input: StepInput,
        link: &mut Option<Link>,
    ) -> Result<Option<wire::Sampled>, StepFailure> {
        env.sign(&self.inner.identity);
        let result = match self.first_leg(&env, input).await? {
            Onward::Done(result) => result,
            Onward::Next { to, bytes } => self.send(&to, bytes, link).await?,
        };
        self.open_result(&env, &result)
    }

    /// Replays `steps` (signed here) on a chain, in order, without waiting
    /// for each answer before sending the next: the chain's round trip is paid
    /// about once rather than once per step, while every step keeps its own
    /// batch (which a bit-exact replay needs). At most [`REPLAY_IN_FLIGHT`]
    /// answers are outstanding, so neither side's stream buffer fills. Any
    /// failure drops `link`: answers still on their way would be out of step.
    pub(super) async fn replay(
        &self,
        steps: Vec<(Envelope, StepInput)>,
        link: &mut Option<Link>,
    ) -> Result<(), StepFailure> {
        let outcome = self.replay_on(steps, link).await;
        if outcome.is_err() {
            *link = None;
        }
        outcome
    }

    async fn replay_on(
        &self,
        steps: Vec<(Envelope, StepInput)>,
        link: &mut Option<Link>,
    ) -> Result<(), StepFailure> {
        // Steps posted and not yet answered, and the node they went to.
        let mut waiting: std::collections::VecDeque<(Envelope, String)> = Default::default();
        for (mut env, input) in steps {
            env.sign(&self.inner.identity);
            match self.first_leg(&env, input).await? {
                Onward::Done(result) => {
                    self.open_result(&env, &result)?;
                }
                Onward::Next { to, bytes } => {
                    // A link leads to one node: answer what went elsewhere
                    // before it is replaced, and keep the window bounded.
                    while waiting.len() >= REPLAY_IN_FLIGHT
                        || waiting.front().is_some_and(|(_, t)| *t != to)
                    {
                        self.answer_oldest(&mut waiting, link).await?;
                    }
                    self.open_and_post(&to, bytes, link).await?;
                    waiting.push_back((env, to));
                }
            }
        }
        while !waiting.is_empty() {
            self.answer_oldest(&mut waiting, link).await?;
        }
        Ok(())
    }

    async fn answer_oldest(
        &self,
        waiting: &mut std::collections::VecDeque<(Envelope, String)>,
        link: &mut Option<Link>,
    ) -> Result<(), StepFailure> {
        if let Some((env, to)) = waiting.pop_front() {
            let (result, _) = self.receive(&to, link).await?;
            self.open_result(&env, &result)?;
        }
        Ok(())
    }

    /// A signed step's first leg: run here when this node is its first hop,
    /// else its token ids sealed for the first hop.
    async fn first_leg(&self, env: &Envelope, input: StepInput) -> Result<Onward, StepFailure> {
        let first = &env.route[0].node_id;
        if *first == self.inner.node_id {
            let me = self.inner.node_id.clone();
            return self.run_hop(&me, env.clone(), input).await;
        }
        let session = env
            .session_bytes()
            .map_err(|e| self.own_failure(e.to_string()))?;
        let key = self.link_key(first, &session)?;
        let body = match &input {
            StepInput::Tokens(t) => activation::seal_message(
                &key,
                env.seq,
                Direction::Forward,
                &step_aad(env),
                &wire::tokens_to_bytes(t),
            ),
            StepInput::Hidden(h) => self.seal_hidden(env, session, first, h)?,
        };
        Ok(Onward::Next {
            to: first.clone(),
            bytes: wire::encode_request(env, &body),
        })
    }

    /// Opens a step's sealed result from its last hop.
    fn open_result(
        &self,
        env: &Envelope,
        result: &[u8],
    ) -> Result<Option<wire::Sampled>, StepFailure> {
        let session = env
            .session_bytes()
            .map_err(|e| self.own_failure(e.to_string()))?;
        let last = env.route[env.route.len() - 1].node_id.clone();
        let key = self.link_key(&last, &session)?;
        let wanted = env.sample.as_ref().and_then(|s| s.logprobs);
        let plain =
            activation::open_message(&key, env.seq, Direction::Backward, &result_aad(env), result)
                .map_err(|_| StepFailure {
                    failed_hop: Some(last.clone()),
                    message: "the step result failed authentication".into(),
                })?;
        wire::decode_result(&plain, wanted, env.draft).map_err(|e| StepFailure {
            failed_hop: Some(last),
            message: e.to_string(),
        })
    }
}

/// Replayed steps sent ahead of their answers (each answer is a few dozen
/// bytes, so this stays far inside a stream's receive window).
const REPLAY_IN_FLIGHT: usize = 64;

/// What a hop's step leads to.
pub(super) enum Onward {
    /// The route ends here: the sealed result for the requester.
    Done(Vec<u8>),
    /// The step to send to the next hop, encoded.
    Next { to: String, bytes: Vec<u8> },
}

/// Steps a hop reads ahead of the one it runs: enough to keep a replay's
/// steps flowing, few enough that a link holds at most this many frames
/// (each up to [`crate::net::frame::MAX_FRAME`]) more than it used to.
const READ_AHEAD: usize = 2;

/// What a hop does with a step it was sent.
enum Begun {
    /// Answer it (the route ended here, or the step failed).
    Answer(Response),
    /// Send it on.
    Forward(Forward),
}

/// A step to send on to the next hop.
struct Forward {
    to: String,
    bytes: Vec<u8>,
    /// When this hop began it.
    started: std::time::Instant,
}

/// A step sent on whose answer is still to come.
struct Forwarded {
    to: String,
    started: std::time::Instant,
    size: u64,
    /// Nothing else was waiting on the link when it was sent.
    alone: bool,
    /// When it went out, or why it could not (its answer then).
    posted: Result<std::time::Instant, StepFailure>,
}

/// A transport failure on the way to `to`: blames it.
fn unreachable(to: &str, e: &dyn std::fmt::Display) -> StepFailure {
    StepFailure {
        failed_hop: Some(to.to_string()),
        message: format!("hop {} unreachable: {e}", short(to)),
    }
}

fn failure_json(f: &StepFailure) -> String {
    serde_json::to_string(f).unwrap_or_else(|_| f.message.clone())
}
