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
use crate::net::link::{InboundLink, Link};

impl Pipeline {
    pub(super) fn own_failure(&self, message: impl Into<String>) -> StepFailure {
        StepFailure {
            failed_hop: Some(self.inner.node_id.clone()),
            message: message.into(),
        }
    }

    /// Runs this node's hop of `env` (it must be `route[0]`) on `input` for `from`
    /// (the authenticated sender: the session's owner here), forwards the output
    /// to the next hop over `next` (opened or replaced as needed), and returns the
    /// sealed result for the requester.
    pub(super) async fn execute(
        &self,
        from: &str,
        env: Envelope,
        input: StepInput,
        next: &mut Option<Link>,
    ) -> Result<Vec<u8>, StepFailure> {
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
                StepOutput::Hidden(h) => return self.forward(env, session, h, next).await,
                StepOutput::Token(t) if env.route.len() == 1 => {
                    return self.seal_result(&env, session, t.as_ref());
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
            return self
                .send(&to, wire::encode_request(&close, &[]), next)
                .await;
        }
        self.seal_result(&env, session, None)
    }

    pub(super) async fn forward(
        &self,
        env: Envelope,
        session: [u8; 16],
        hidden: Vec<f32>,
        link: &mut Option<Link>,
    ) -> Result<Vec<u8>, StepFailure> {
        if env.route.len() < 2 {
            return Err(self.own_failure("the route ends before the model's head"));
        }
        let mut next = env;
        next.route.remove(0);
        next.input = InputKind::Hidden;
        let to = next.route[0].node_id.clone();
        let frame = self.seal_hidden(&next, session, &to, &hidden)?;
        self.send(&to, wire::encode_request(&next, &frame), link)
            .await
    }

    /// Sends a step to `to` over `link` (opened, or replaced when it leads
    /// elsewhere); a transport failure blames `to` and drops the link.
    pub(super) async fn send(
        &self,
        to: &str,
        bytes: Vec<u8>,
        link: &mut Option<Link>,
    ) -> Result<Vec<u8>, StepFailure> {
        let network = self.inner.network.get().ok_or_else(|| StepFailure {
            failed_hop: Some(to.to_string()),
            message: "this node has no P2P network".into(),
        })?;
        let sent = bytes.len() as u64;
        let open = match link.take() {
            Some(l) if l.node_id() == to => Ok(l),
            _ => network.open_link(to).await,
        };
        let started = std::time::Instant::now();
        let answer = match open {
            Ok(mut l) => {
                let answer = l.call(Request::Activation(bytes)).await;
                if answer.is_ok() {
                    *link = Some(l);
                }
                answer
            }
            Err(e) => Err(e),
        };
        let received = match &answer {
            Ok(Response::Activation(r)) => r.len() as u64,
            _ => 0,
        };
        self.inner
            .wire_bytes
            .fetch_add(sent + received, std::sync::atomic::Ordering::Relaxed);
        match answer {
            Ok(Response::Activation(answer)) => {
                let waited = started.elapsed();
                let (spent, result) = wire::decode_answer(&answer).map_err(|e| StepFailure {
                    failed_hop: Some(to.to_string()),
                    message: e.to_string(),
                })?;
                self.inner.link_latency.record(waited, spent);
                self.inner
                    .link_speeds
                    .record(to, sent, waited.saturating_sub(spent));
                Ok(result.to_vec())
            }
            Ok(Response::Error { message, .. }) => {
                Err(serde_json::from_str(&message).unwrap_or(StepFailure {
                    failed_hop: Some(to.to_string()),
                    message,
                }))
            }
            Ok(other) => Err(StepFailure {
                failed_hop: Some(to.to_string()),
                message: format!("unexpected answer {other:?}"),
            }),
            Err(e) => Err(StepFailure {
                failed_hop: Some(to.to_string()),
                message: format!("hop {} unreachable: {e}", short(to)),
            }),
        }
    }

    /// Answers the steps that arrive on `link` until it closes or idles out; the
    /// link onward to the next hop lives as long.
    pub(super) async fn serve_link(&self, mut link: InboundLink) {
        let mut next: Option<Link> = None;
        while let Some(request) = link.next(self.inner.config.link_idle).await {
            let response = match request {
                Request::Activation(bytes) => self.answer_step(&link.from, &bytes, &mut next).await,
                Request::Invalid(reason) => self.bad_step(&link.from, reason),
                _ => self.bad_step(&link.from, "a link carries pipeline steps only".into()),
            };
            if link.respond(response).await.is_err() {
                break;
            }
        }
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

    /// Runs a step from `from` and returns the answer to send back.
    pub(super) async fn answer_step(
        &self,
        from: &str,
        bytes: &[u8],
        next: &mut Option<Link>,
    ) -> Response {
        let started = std::time::Instant::now();
        match self.open_inbound(from, bytes) {
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
            Ok((env, input)) => match self.execute(from, env, input, next).await {
                Ok(result) => Response::Activation(wire::encode_answer(started.elapsed(), &result)),
                Err(failure) => Response::Error {
                    code: 502,
                    message: failure_json(&failure),
                },
            },
        }
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
        let wanted = env.sample.as_ref().and_then(|s| s.logprobs);
        let draft = env.draft;
        let session = env
            .session_bytes()
            .map_err(|e| self.own_failure(e.to_string()))?;
        let first = env.route[0].node_id.clone();
        let last = env.route[env.route.len() - 1].node_id.clone();
        let result = if first == self.inner.node_id {
            let me = self.inner.node_id.clone();
            self.execute(&me, env.clone(), input, link).await?
        } else {
            let key = self.link_key(&first, &session)?;
            let body = match &input {
                StepInput::Tokens(t) => activation::seal_message(
                    &key,
                    env.seq,
                    Direction::Forward,
                    &step_aad(&env),
                    &wire::tokens_to_bytes(t),
                ),
                StepInput::Hidden(h) => self.seal_hidden(&env, session, &first, h)?,
            };
            self.send(&first, wire::encode_request(&env, &body), link)
                .await?
        };
        let key = self.link_key(&last, &session)?;
        let plain = activation::open_message(
            &key,
            env.seq,
            Direction::Backward,
            &result_aad(&env),
            &result,
        )
        .map_err(|_| StepFailure {
            failed_hop: Some(last.clone()),
            message: "the step result failed authentication".into(),
        })?;
        wire::decode_result(&plain, wanted, draft).map_err(|e| StepFailure {
            failed_hop: Some(last),
            message: e.to_string(),
        })
    }
}

fn failure_json(f: &StepFailure) -> String {
    serde_json::to_string(f).unwrap_or_else(|_| f.message.clone())
}
