//! What every inference endpoint shares: validating sampling parameters, submitting
//! to the engine, turning engine events into a stream, and accounting (metrics and
//! the request log) however the request ends.

use std::time::Instant;

use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::json;
use tokio::sync::mpsc;

use super::error::ApiError;
use crate::Node;
use crate::infer::logprobs::TokenLogprob;
use crate::infer::{
    ChatTurn, Event, FinishReason, GenerateError, GenerateRequest, SamplingParams, SubmitError,
    Timing, Usage,
};
use crate::store::RequestRecord;

/// `stop` may be one string or a list (OpenAI accepts both).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub(crate) enum StopField {
    One(String),
    Many(Vec<String>),
}

impl StopField {
    fn into_vec(self) -> Vec<String> {
        match self {
            StopField::One(s) => vec![s],
            StopField::Many(v) => v,
        }
    }
}

/// Sampling fields common to every inference body. Numbers are parsed wide so that
/// out-of-range values are 422 (semantically invalid), not 400.
#[derive(Debug, Clone, Default, Deserialize)]
pub(crate) struct SamplingFields {
    pub(crate) max_tokens: Option<i64>,
    /// OpenAI's newer name for `max_tokens`.
    pub(crate) max_completion_tokens: Option<i64>,
    pub(crate) temperature: Option<f64>,
    pub(crate) top_p: Option<f64>,
    pub(crate) top_k: Option<i64>,
    pub(crate) min_p: Option<f64>,
    pub(crate) repeat_penalty: Option<f64>,
    pub(crate) seed: Option<i64>,
    pub(crate) stop: Option<StopField>,
    pub(crate) ignore_eos: Option<bool>,
    /// llama-server's switch for the prompt cache (default on).
    pub(crate) cache_prompt: Option<bool>,
    /// llama-server's most draft tokens per speculative step (0 off), a
    /// dotted key as llama-server spells it.
    #[serde(rename = "speculative.n_max")]
    pub(crate) speculative_n_max: Option<i64>,
    /// OpenAI's `{"type": "text" | "json_object" | "json_schema", ...}`.
    pub(crate) response_format: Option<serde_json::Value>,
}

/// Defaults that differ between API surfaces.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SamplingDefaults {
    pub(crate) max_tokens: u32,
    pub(crate) temperature: f32,
    pub(crate) top_p: f32,
    pub(crate) top_k: i32,
}

const MAX_STOP_SEQUENCES: usize = 16;

impl SamplingFields {
    /// Checks ranges (422 naming the field) and fills defaults.
    pub(crate) fn into_params(self, d: SamplingDefaults) -> Result<SamplingParams, ApiError> {
        let max_tokens = match self.max_tokens.or(self.max_completion_tokens) {
            None => d.max_tokens,
            Some(n) if n <= 0 => {
                return Err(ApiError::invalid_parameter(
                    "max_tokens",
                    "must be at least 1",
                ));
            }
            Some(n) => n.min(u32::MAX as i64) as u32,
        };
        // Wide numbers are narrowed by clamping (an out-of-range value stays out of
        // range), then checked by the same validation a pipeline step gets.
        let narrow = |v: Option<f64>, default: f32| v.map_or(default, |x| x as f32);
        let temperature = narrow(self.temperature, d.temperature);
        let top_p = narrow(self.top_p, d.top_p);
        let top_k = self.top_k.map_or(d.top_k, |k| {
            k.clamp(i32::MIN as i64, i32::MAX as i64) as i32
        });
        let min_p = narrow(self.min_p, 0.05);
        let repeat_penalty = narrow(self.repeat_penalty, 1.0);
        let seed = match self.seed {
            Some(s) if !(0..=u32::MAX as i64).contains(&s) => {
                return Err(ApiError::invalid_parameter(
                    "seed",
                    "must be between 0 and 4294967295",
                ));
            }
            Some(s) => Some(s as u32),
            None => None,
        };
        let stop = self.stop.map(StopField::into_vec).unwrap_or_default();
        if stop.len() > MAX_STOP_SEQUENCES {
            return Err(ApiError::invalid_parameter(
                "stop",
                format!("at most {MAX_STOP_SEQUENCES} stop sequences"),
            ));
        }
        let params = SamplingParams {
            temperature,
            top_p,
            top_k,
            min_p,
            repeat_penalty,
            repeat_last_n: 64,
            seed,
            max_tokens,
            stop,
            ignore_eos: self.ignore_eos.unwrap_or(false),
            cache_prompt: self.cache_prompt.unwrap_or(true),
            json_schema: match &self.response_format {
                Some(f) => response_format_schema(f)?,
                None => None,
            },
            // Each surface reads its own spelling (see `openai::top_logprobs`).
            logprobs: None,
            speculative: match self.speculative_n_max {
                None => None,
                Some(n) if (0..=i64::from(crate::pipeline::MAX_DRAFT)).contains(&n) => {
                    Some(n as u32)
                }
                Some(_) => {
                    return Err(ApiError::invalid_parameter(
                        "speculative.n_max",
                        format!("must be between 0 and {}", crate::pipeline::MAX_DRAFT),
                    ));
                }
            },
        };
        params
            .validate(crate::infer::SamplingLimits::default())
            .map_err(|e| ApiError::invalid_parameter(e.field, e.message))?;
        Ok(params)
    }
}

/// The JSON schema OpenAI's `response_format` asks for: none for `text`; for
/// `json_object` any JSON object; for `json_schema` its `schema` (its `strict`
/// is always honoured: the grammar made from it admits nothing else). Checked
/// here by converting it once, so a bad schema is a 422 before anything runs.
fn response_format_schema(f: &serde_json::Value) -> Result<Option<String>, ApiError> {
    let bad = |m: &str| ApiError::invalid_parameter("response_format", m.to_string());
    let schema = match f["type"].as_str() {
        Some("text") => return Ok(None),
        Some("json_object") => json!({ "type": "object" }),
        Some("json_schema") => {
            let s = &f["json_schema"]["schema"];
            if !s.is_object() {
                return Err(bad("json_schema.schema must be a JSON schema object"));
            }
            s.clone()
        }
        _ => {
            return Err(bad(
                "type must be \"text\", \"json_object\" or \"json_schema\"",
            ));
        }
    };
    let schema = schema.to_string();
    crate::infer::schema_grammar(&schema).map_err(|e| bad(&e.to_string()))?;
    Ok(Some(schema))
}

/// Where a request runs.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    /// The model id.
    pub(crate) id: String,
    /// On this node's engine (else through the pipeline).
    pub(crate) local: bool,
    /// The LoRA adapter it runs with (local models only).
    pub(crate) adapter: Option<crate::infer::LoraChoice>,
}

/// The model a request body asks for: its `model`, with `+<adapter>` added
/// when it names an `adapter` field (so both spellings resolve alike).
pub(crate) fn requested_model(
    model: Option<&str>,
    body: &serde_json::Value,
) -> Result<Option<String>, ApiError> {
    use serde_json::Value;
    match body.get("adapter") {
        None | Some(Value::Null) => Ok(model.map(str::to_string)),
        Some(Value::String(a)) if !a.is_empty() => Ok(Some(format!("{}+{a}", model.unwrap_or("")))),
        Some(_) => Err(ApiError::invalid_parameter(
            "adapter",
            "must be a registered adapter's id",
        )),
    }
}

/// Resolves the requested model as [`resolve_base`] does; `base+adapter`
/// (the last `+` followed by a registered adapter's id) runs the base model
/// with that LoRA adapter.
pub(crate) async fn resolve_model(
    node: &Node,
    requested: Option<&str>,
) -> Result<Target, ApiError> {
    let Some((base, adapter_id)) = requested.and_then(|r| r.rsplit_once('+')) else {
        return resolve_base(node, requested).await;
    };
    let Some(adapter) = node.adapters().get(adapter_id) else {
        // A model whose own id has a '+' still resolves.
        return match resolve_base(node, requested).await {
            Err(e) if e.status == StatusCode::NOT_FOUND => {
                let known: Vec<String> = node.adapters().list().into_iter().map(|a| a.id).collect();
                Err(ApiError::new(
                    StatusCode::NOT_FOUND,
                    "ADAPTER_NOT_FOUND",
                    format!("no adapter '{adapter_id}' is registered on this node"),
                )
                .with_details(json!({ "adapter": adapter_id, "available": known })))
            }
            other => other,
        };
    };
    let mut target = resolve_base(node, Some(base).filter(|b| !b.is_empty())).await?;
    if !target.local {
        return Err(ApiError::invalid_parameter(
            "adapter",
            format!(
                "adapters apply to the model this node serves whole; '{}' is split across peers",
                target.id
            ),
        ));
    }
    if !adapter.base_model.is_empty() && !adapter.base_model.eq_ignore_ascii_case(&target.id) {
        return Err(ApiError::invalid_parameter(
            "adapter",
            format!(
                "adapter '{}' is for '{}', not '{}'",
                adapter.id, adapter.base_model, target.id
            ),
        ));
    }
    target.adapter = Some(crate::infer::LoraChoice {
        file: adapter.file,
        digest: adapter.digest,
        scale: 1.0,
    });
    Ok(target)
}

/// Resolves the requested model: the locally loaded model, else a sharded model a
/// chain of nodes can serve. An empty id means the local model, else the first
/// servable one. 404 for a model nobody holds, 503 naming the missing layers for one
/// the reachable nodes cannot cover, 503 when there is nothing at all.
async fn resolve_base(node: &Node, requested: Option<&str>) -> Result<Target, ApiError> {
    let local = node.engine().map(|e| e.info().id.clone());
    let pipeline = node.pipeline();
    let requested = requested.filter(|r| !r.is_empty());
    if let Some(id) = &local
        && requested.is_none_or(|r| r == id || r.eq_ignore_ascii_case(id))
    {
        return Ok(Target {
            id: id.clone(),
            local: true,
            adapter: None,
        });
    }
    let known = pipeline.network_models().await;
    if local.is_none() && known.is_empty() {
        return Err(ApiError::no_model());
    }
    let Some(r) = requested else {
        for m in &known {
            if pipeline.can_serve(&m.id).await {
                return Ok(Target {
                    id: m.id.clone(),
                    local: false,
                    adapter: None,
                });
            }
        }
        return Err(ApiError::no_model());
    };
    if !crate::pipeline::is_model_id(r) || !known.iter().any(|m| m.id == r) {
        let available: Vec<String> = local
            .into_iter()
            .chain(known.into_iter().map(|m| m.id))
            .collect();
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "MODEL_NOT_FOUND",
            format!(
                "model '{r}' is not served by this node or its peers (available: {})",
                if available.is_empty() {
                    "none".to_string()
                } else {
                    available.join(", ")
                }
            ),
        )
        .with_details(json!({ "model": r, "available": available })));
    }
    match pipeline.plan(r, &Default::default()).await {
        Ok(_) => Ok(Target {
            id: r.to_string(),
            local: false,
            adapter: None,
        }),
        Err(e) => Err(no_route(&e.to_string(), &e.missing)),
    }
}

fn no_route(message: &str, missing: &[(u32, u32)]) -> ApiError {
    ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "NO_ROUTE", message.to_string()).with_details(
        json!({
            "missing_layers": missing.iter().map(|(a, b)| json!({"start": a, "end": b})).collect::<Vec<_>>(),
        }),
    )
}

/// Renders chat turns with the target model's template.
pub(crate) async fn render_chat(
    node: &Node,
    target: &Target,
    turns: &[ChatTurn],
) -> Result<String, ApiError> {
    let rendered = if target.local {
        let engine = node.engine().ok_or_else(ApiError::no_model)?;
        engine.render_chat(turns)
    } else {
        let vocab = node
            .pipeline()
            .vocab(&target.id)
            .await
            .map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "NO_TOKENIZER", e))?;
        crate::infer::render_chat(&vocab, turns)
    };
    rendered.map_err(|e| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "INVALID_PARAMETER",
            e.to_string(),
        )
    })
}

/// A piece of a running generation.
#[derive(Debug)]
pub(crate) enum Piece {
    /// Text, and the log-probabilities of the tokens it came from (when asked).
    Text(String, Option<Vec<TokenLogprob>>),
    Done {
        finish_reason: FinishReason,
        usage: Usage,
        timing: Timing,
        total_ms: u64,
        /// Micro-credits (see [`Event::Done`]).
        cost: i64,
    },
    Failed(ApiError),
}

/// A generation the engine has started. Dropping it before the end cancels it.
#[derive(Debug)]
pub(crate) struct Generation {
    pub(crate) id: String,
    pub(crate) model: String,
    pub(crate) created: i64,
    pub(crate) prompt_tokens: u32,
    events: mpsc::Receiver<Event>,
    node: Node,
    endpoint: &'static str,
    started: Instant,
    finished: bool,
    /// Log-probabilities received whose text has not come yet (`None`: not asked).
    logprobs: Option<Vec<TokenLogprob>>,
}

/// Submits a generation and waits until the engine has picked it up, so queueing
/// and prompt errors still become proper HTTP statuses.
pub(crate) async fn start(
    node: &Node,
    endpoint: &'static str,
    client: &str,
    id: String,
    target: Target,
    prompt: String,
    params: SamplingParams,
) -> Result<Generation, ApiError> {
    let started = Instant::now();
    let model = target.id.clone();
    // Demand counts every request this node takes for a model, served here or
    // through the network.
    node.swarm().demand().record_own(&model);
    let wants_logprobs = params.logprobs.is_some();
    let request = GenerateRequest {
        prompt,
        params,
        client: client.to_string(),
        adapter: target.adapter.clone(),
    };
    let mut events = if target.local {
        let engine = node.engine().ok_or_else(ApiError::no_model)?;
        let events = engine.submit(request).map_err(|e| match e {
            SubmitError::QueueFull(n) => ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "OVERLOADED",
                format!("the inference queue is full ({n} waiting); try again shortly"),
            )
            .with_details(json!({ "retry_after": 1 })),
            SubmitError::ShareFull { held } => ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "OVERLOADED",
                format!(
                    "this API key already has {held} requests waiting, its share of the \
                     inference queue; try again when one has started"
                ),
            )
            .with_details(json!({ "retry_after": 1, "waiting_for_this_key": held })),
            other => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "ENGINE_STOPPED",
                other.to_string(),
            ),
        })?;
        node.metrics().set_queue_depth(engine.queue_depth());
        events
    } else {
        node.pipeline().submit(&target.id, request)
    };
    match events.recv().await {
        Some(Event::Started { prompt_tokens, .. }) => Ok(Generation {
            logprobs: wants_logprobs.then(Vec::new),
            id,
            model,
            created: chrono::Utc::now().timestamp(),
            prompt_tokens,
            events,
            node: node.clone(),
            endpoint,
            started,
            finished: false,
        }),
        Some(Event::Failed(e)) => {
            node.metrics()
                .record(endpoint, "error", started.elapsed(), 0, 0);
            Err(generate_error(e))
        }
        _ => Err(ApiError::internal(
            "engine",
            "the engine dropped the request",
        )),
    }
}

fn generate_error(e: GenerateError) -> ApiError {
    match e {
        GenerateError::ContextExceeded {
            prompt_tokens,
            context_size,
        } => ApiError::new(
            StatusCode::BAD_REQUEST,
            "CONTEXT_LENGTH_EXCEEDED",
            e.to_string(),
        )
        .with_details(json!({ "prompt_tokens": prompt_tokens, "context_size": context_size })),
        GenerateError::EmptyPrompt => ApiError::invalid_parameter("prompt", "is empty"),
        GenerateError::Grammar(message) => ApiError::invalid_parameter("response_format", message),
        GenerateError::Adapter(message) => {
            ApiError::new(StatusCode::CONFLICT, "ADAPTER_UNAVAILABLE", message)
        }
        GenerateError::NoRoute { message, missing } => no_route(&message, &missing),
        GenerateError::Pipeline(message) => {
            ApiError::new(StatusCode::BAD_GATEWAY, "PIPELINE_FAILED", message)
        }
        other => ApiError::internal("inference", other),
    }
}

impl Generation {
    /// The next piece; `None` after `Done` or `Failed`.
    pub(crate) async fn next(&mut self) -> Option<Piece> {
        if self.finished {
            return None;
        }
        // Log-probabilities wait for the text of their tokens.
        let piece = loop {
            match self.events.recv().await {
                Some(Event::Logprob(lp)) => {
                    if let Some(pending) = self.logprobs.as_mut() {
                        pending.push(lp);
                    }
                }
                Some(Event::Token(text)) => {
                    let logprobs = self.logprobs.as_mut().map(std::mem::take);
                    return Some(Piece::Text(text, logprobs));
                }
                Some(Event::Started { .. }) => return Some(Piece::Text(String::new(), None)),
                Some(Event::Done {
                    finish_reason,
                    usage,
                    timing,
                    cost,
                }) => {
                    let total_ms = self.started.elapsed().as_millis() as u64;
                    self.account("ok", finish_reason.as_str(), usage, &timing, total_ms);
                    break Piece::Done {
                        finish_reason,
                        usage,
                        timing,
                        total_ms,
                        cost,
                    };
                }
                Some(Event::Failed(e)) => {
                    self.account("error", "error", Usage::default(), &Timing::default(), 0);
                    break Piece::Failed(generate_error(e));
                }
                None => {
                    self.account("error", "error", Usage::default(), &Timing::default(), 0);
                    break Piece::Failed(ApiError::internal(
                        "engine",
                        "the engine stopped mid-generation",
                    ));
                }
            }
        };
        self.finished = true;
        Some(piece)
    }

    /// Runs to the end, concatenating the text.
    pub(crate) async fn collect(mut self) -> Result<Collected, ApiError> {
        let mut text = String::new();
        let mut logprobs = self.logprobs.as_ref().map(|_| Vec::new());
        while let Some(piece) = self.next().await {
            match piece {
                Piece::Text(t, lp) => {
                    text.push_str(&t);
                    if let (Some(all), Some(lp)) = (logprobs.as_mut(), lp) {
                        all.extend(lp);
                    }
                }
                Piece::Done {
                    finish_reason,
                    usage,
                    timing,
                    total_ms,
                    cost,
                } => {
                    return Ok(Collected {
                        text,
                        logprobs,
                        finish_reason,
                        usage,
                        timing,
                        total_ms,
                        cost,
                    });
                }
                // The client gets the tokens produced before the failure.
                Piece::Failed(e) => {
                    return Err(e.with_details_merged(json!({ "partial_text": text })));
                }
            }
        }
        Err(ApiError::internal(
            "engine",
            "generation ended without a result",
        ))
    }

    fn account(
        &mut self,
        outcome: &str,
        finish: &str,
        usage: Usage,
        timing: &Timing,
        total_ms: u64,
    ) {
        self.finished = true;
        self.node.metrics().record_queue(
            std::time::Duration::from_millis(timing.queue_ms),
            usage.prompt_tokens_details.cached_tokens,
        );
        self.node.metrics().record(
            self.endpoint,
            outcome,
            self.started.elapsed(),
            self.prompt_tokens,
            usage.completion_tokens,
        );
        let record = RequestRecord {
            id: self.id.clone(),
            endpoint: self.endpoint.to_string(),
            model: self.model.clone(),
            prompt_tokens: self.prompt_tokens,
            completion_tokens: usage.completion_tokens,
            finish_reason: finish.to_string(),
            queue_ms: timing.queue_ms,
            inference_ms: timing.inference_ms,
            total_ms,
        };
        let store = self.node.store().clone();
        // The log write happens after the response is complete, off the hot path.
        tokio::task::spawn_blocking(move || {
            if let Err(e) = store.record_requests(&[record]) {
                tracing::warn!(error = %e, "could not write the request log");
            }
        });
    }
}

impl Drop for Generation {
    fn drop(&mut self) {
        if !self.finished {
            // The client went away; dropping `events` tells the engine to stop.
            tracing::debug!(id = %self.id, "generation cancelled by the client");
            self.account(
                "cancelled",
                "cancelled",
                Usage::default(),
                &Timing::default(),
                0,
            );
        }
    }
}

/// A finished generation.
#[derive(Debug)]
pub(crate) struct Collected {
    pub(crate) text: String,
    /// Per generated token with text (when asked).
    pub(crate) logprobs: Option<Vec<TokenLogprob>>,
    pub(crate) finish_reason: FinishReason,
    pub(crate) usage: Usage,
    pub(crate) timing: Timing,
    pub(crate) total_ms: u64,
    /// Micro-credits (see [`Event::Done`]).
    pub(crate) cost: i64,
}
