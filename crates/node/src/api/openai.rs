//! The OpenAI-compatible surface: `/v1/models`, `/v1/chat/completions`,
//! `/v1/completions` (stream and non-stream).

use std::convert::Infallible;

use axum::Json;
use axum::extract::{Extension, State};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::AppState;
use super::error::ApiError;
use super::extract::{ApiJson, Client, from_value};
use super::generate::{self, Generation, Piece, SamplingDefaults, SamplingFields};
use super::tools::{self, ToolCall, Tools};
use crate::infer::ChatTurn;
use crate::infer::logprobs::TokenLogprob;

const DEFAULT_TEMPERATURE: f32 = 1.0;

fn defaults(state: &AppState) -> SamplingDefaults {
    SamplingDefaults {
        max_tokens: state.node.config().default_max_tokens,
        temperature: DEFAULT_TEMPERATURE,
        top_p: 1.0,
        top_k: 0,
    }
}

/// `GET /v1/models`
pub(crate) async fn list_models(State(state): State<AppState>) -> Json<Value> {
    let data: Vec<Value> = state
        .node
        .engine()
        .map(|e| {
            let info = e.info();
            json!({
                "id": info.id,
                "object": "model",
                "created": info.loaded_at,
                "owned_by": "swarmllm",
                "meta": {
                    "architecture": info.architecture,
                    "n_params": info.n_params,
                    "n_layers": info.n_layers,
                    "context_size": info.context_size,
                    "size_bytes": info.size_bytes,
                }
            })
        })
        .into_iter()
        .collect();
    // Sharded models a chain of nodes (this one included) can serve right now.
    let mut data = data;
    let pipeline = state.node.pipeline();
    for m in pipeline.network_models().await {
        if data.iter().any(|d| d["id"] == m.id.as_str()) || !pipeline.can_serve(&m.id).await {
            continue;
        }
        let holders: std::collections::BTreeSet<&str> =
            m.holders.iter().map(|h| h.node_id.as_str()).collect();
        data.push(json!({
            "id": m.id,
            "object": "model",
            "created": state.node.started_at().timestamp(),
            "owned_by": "swarmllm-network",
            "meta": {
                "n_layers": m.n_layers,
                "split": true,
                "holders": holders.len(),
            }
        }));
    }
    Json(json!({ "object": "list", "data": data }))
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Role {
    System,
    Developer,
    User,
    Assistant,
    Tool,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Deserialize)]
struct ContentPart {
    #[serde(rename = "type")]
    kind: String,
    text: Option<String>,
}

#[derive(Debug, Deserialize)]
struct ChatMessage {
    role: Role,
    content: Option<Content>,
    /// An assistant turn's calls (its content is then often null).
    tool_calls: Option<Vec<Value>>,
}

#[derive(Debug, Deserialize)]
struct StreamOptions {
    include_usage: Option<bool>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct ChatRequest {
    model: Option<String>,
    messages: Vec<ChatMessage>,
    #[serde(default)]
    stream: bool,
    stream_options: Option<StreamOptions>,
    n: Option<i64>,
    #[serde(default)]
    logprobs: bool,
    top_logprobs: Option<i64>,
}

fn turns(messages: Vec<ChatMessage>) -> Result<Vec<ChatTurn>, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::invalid_parameter(
            "messages",
            "must contain at least one message",
        ));
    }
    messages
        .into_iter()
        .enumerate()
        .map(|(i, m)| {
            let role = match m.role {
                Role::System | Role::Developer => "system",
                Role::User => "user",
                Role::Assistant => "assistant",
                Role::Tool => "tool",
            };
            let content = match m.content {
                None => String::new(),
                Some(Content::Text(t)) => t,
                Some(Content::Parts(parts)) => {
                    let mut text = String::new();
                    for p in parts {
                        if p.kind != "text" {
                            return Err(ApiError::invalid_parameter(
                                &format!("messages[{i}].content"),
                                format!("content parts of type '{}' are not supported", p.kind),
                            ));
                        }
                        text.push_str(p.text.as_deref().unwrap_or(""));
                    }
                    text
                }
            };
            let content = match (&m.role, m.tool_calls) {
                (Role::Assistant, Some(calls)) if !calls.is_empty() => {
                    let calls = tools::render_calls(&calls);
                    if content.is_empty() {
                        calls
                    } else {
                        format!("{content}\n{calls}")
                    }
                }
                (Role::Tool, _) => tools::render_result(&content),
                _ => content,
            };
            Ok(ChatTurn {
                role: role.to_string(),
                content,
            })
        })
        .collect()
}

/// Most choices one request may ask for.
const MAX_CHOICES: i64 = 8;

/// How many choices (`n`): 1 to [`MAX_CHOICES`]; several only without `stream`.
fn choices(n: Option<i64>) -> Result<usize, ApiError> {
    match n.unwrap_or(1) {
        n if !(1..=MAX_CHOICES).contains(&n) => Err(ApiError::invalid_parameter(
            "n",
            format!("must be between 1 and {MAX_CHOICES}"),
        )),
        n => Ok(n as usize),
    }
}

/// Starts `n` generations of one prompt, each with its own seed (the request's
/// seed plus the choice's index, so a seeded request stays reproducible); the
/// engine decodes them together.
#[allow(clippy::too_many_arguments)]
async fn start_choices(
    node: &crate::Node,
    endpoint: &'static str,
    client: &Client,
    id: &str,
    target: generate::Target,
    prompt: String,
    params: crate::infer::SamplingParams,
    n: usize,
) -> Result<Vec<Generation>, ApiError> {
    let base = params.seed.unwrap_or_else(rand::random);
    let starts = (0..n).map(|i| {
        let mut p = params.clone();
        if n > 1 {
            p.seed = Some(base.wrapping_add(i as u32));
        }
        generate::start(
            node,
            endpoint,
            &client.0,
            id.to_string(),
            target.clone(),
            prompt.clone(),
            p,
        )
    });
    futures::future::try_join_all(starts).await
}

/// `POST /v1/chat/completions`
pub(crate) async fn chat_completions(
    State(state): State<AppState>,
    Extension(client): Extension<Client>,
    ApiJson(body): ApiJson<Value>,
) -> Result<Response, ApiError> {
    let req: ChatRequest = from_value(&body)?;
    let sampling: SamplingFields = from_value(&body)?;
    let node = &state.node;
    let asked = generate::requested_model(req.model.as_deref(), &body)?;
    let model = match generate::resolve_model(node, asked.as_deref()).await {
        Ok(m) => m,
        // A model the swarm does not have (or a node with none at all) may be
        // a cloud provider's.
        Err(e)
            if req.model.is_some()
                && (e.status == axum::http::StatusCode::NOT_FOUND
                    || e.code == "NO_MODEL_LOADED") =>
        {
            let asked = req.model.as_deref().unwrap_or_default();
            match super::providers::proxy_chat(node, asked, &body).await? {
                Some(answer) => return Ok(answer),
                None => return Err(e),
            }
        }
        Err(e) => return Err(e),
    };
    let n = choices(req.n)?;
    let mut params = sampling.into_params(defaults(&state))?;
    params.logprobs = top_logprobs("top_logprobs", req.logprobs, req.top_logprobs)?;
    let mut turns = turns(req.messages)?;
    let tools = tools::parse(&body)?.filter(Tools::active);
    if let Some(tools) = &tools {
        tools.describe(&mut turns);
        if let Some(schema) = tools.schema() {
            if params.json_schema.is_some() {
                return Err(ApiError::invalid_parameter(
                    "tool_choice",
                    "a call that must be made cannot also follow response_format",
                ));
            }
            if schema.len() > crate::infer::MAX_SCHEMA_BYTES {
                return Err(ApiError::invalid_parameter(
                    "tools",
                    "the tools' parameters are too large to constrain a call (16 KiB)",
                ));
            }
            crate::infer::schema_grammar(&schema)
                .map_err(|e| ApiError::invalid_parameter("tools", e.to_string()))?;
            params.json_schema = Some(schema);
        }
    }
    let prompt = generate::render_chat(node, &model, &turns).await?;
    let id = format!("chatcmpl-{}", uuid::Uuid::new_v4().simple());
    let generations = start_choices(
        node,
        "/v1/chat/completions",
        &client,
        &id,
        model,
        prompt,
        params,
        n,
    )
    .await?;

    let include_usage = req
        .stream_options
        .and_then(|o| o.include_usage)
        .unwrap_or(false);
    if let Some(tools) = &tools {
        return answer_with_tools(generations, req.stream.then_some(include_usage), tools).await;
    }
    answer(
        generations,
        req.stream.then_some(include_usage),
        chat_chunk,
        "chat.completion",
        |index, done| {
            json!({
                "index": index,
                "message": { "role": "assistant", "content": done.text },
                "logprobs": chat_logprobs(done.logprobs.as_deref()),
                "finish_reason": done.finish_reason.as_str(),
            })
        },
    )
    .await
}

/// Streams the generations (the choices) as SSE chunks (`Some(include_usage)`)
/// or waits for every one and answers one JSON body of type `object` whose
/// choices `choice(index, collected)` builds; usage counts the prompt once and
/// every choice's tokens.
async fn answer(
    generations: Vec<Generation>,
    stream: Option<bool>,
    chunk: fn(&GenInfo, usize, StreamPiece, bool) -> Vec<Value>,
    object: &'static str,
    choice: fn(usize, &generate::Collected) -> Value,
) -> Result<Response, ApiError> {
    if let Some(include_usage) = stream {
        return Ok(sse(
            generations,
            move |g, index, piece| chunk(g, index, piece, include_usage),
            true,
        ));
    }
    let (info, done) = collect_all(generations).await?;
    let choices: Vec<Value> = done.iter().enumerate().map(|(i, d)| choice(i, d)).collect();
    Ok(Json(whole_body(&info, object, &done, choices)).into_response())
}

/// Waits for every choice.
async fn collect_all(
    generations: Vec<Generation>,
) -> Result<(GenInfo, Vec<generate::Collected>), ApiError> {
    let Some(first) = generations.first() else {
        return Err(ApiError::internal("answer", "no generation"));
    };
    let info = GenInfo {
        id: first.id.clone(),
        model: first.model.clone(),
        created: first.created,
    };
    let done =
        futures::future::try_join_all(generations.into_iter().map(Generation::collect)).await?;
    Ok((info, done))
}

/// Usage over every choice: the prompt once, every choice's tokens.
fn total_usage(done: &[generate::Collected]) -> crate::infer::Usage {
    let mut usage = done.first().map(|d| d.usage).unwrap_or_default();
    usage.completion_tokens = done.iter().map(|d| d.usage.completion_tokens).sum();
    usage.total_tokens = usage.prompt_tokens + usage.completion_tokens;
    usage
}

/// A non-streamed answer's body.
fn whole_body(
    info: &GenInfo,
    object: &str,
    done: &[generate::Collected],
    choices: Vec<Value>,
) -> Value {
    json!({
        "id": info.id,
        "object": object,
        "created": info.created,
        "model": info.model,
        "system_fingerprint": fingerprint(),
        "choices": choices,
        "usage": total_usage(done),
        "timing": {
            "queue_ms": done.iter().map(|d| d.timing.queue_ms).max(),
            "inference_ms": done.iter().map(|d| d.timing.inference_ms).max(),
            "total_ms": done.iter().map(|d| d.total_ms).max(),
            "route": done.iter().find_map(|d| d.timing.route.clone()),
        },
    })
}

/// A chat answer with tools: every choice is read whole, its calls taken out
/// of its text (`finish_reason` `tool_calls` when it made any), and answered
/// as one body or, streamed, as the chunks a stream of it would have been
/// (the role, the content, each call as a `tool_calls` delta, the finish,
/// the usage), since a call is only known once its block has closed.
async fn answer_with_tools(
    generations: Vec<Generation>,
    stream: Option<bool>,
    tools: &Tools,
) -> Result<Response, ApiError> {
    let (info, done) = collect_all(generations).await?;
    let read: Vec<(Option<String>, Vec<ToolCall>)> =
        done.iter().map(|d| tools.extract(&d.text)).collect();
    let finish = |d: &generate::Collected, calls: &[ToolCall]| {
        if calls.is_empty() {
            d.finish_reason.as_str()
        } else {
            "tool_calls"
        }
    };
    let Some(include_usage) = stream else {
        let choices = done
            .iter()
            .zip(&read)
            .enumerate()
            .map(|(i, (d, (content, calls)))| {
                let mut message = json!({ "role": "assistant", "content": content });
                if !calls.is_empty() {
                    message["tool_calls"] = calls
                        .iter()
                        .map(|c| c.to_json(None))
                        .collect::<Vec<_>>()
                        .into();
                }
                json!({
                    "index": i,
                    "message": message,
                    "logprobs": chat_logprobs(d.logprobs.as_deref()),
                    "finish_reason": finish(d, calls),
                })
            })
            .collect();
        return Ok(Json(whole_body(&info, "chat.completion", &done, choices)).into_response());
    };
    let chunk = |index, delta, finish| chat_chunk_json(&info, index, delta, Value::Null, finish);
    let mut chunks = Vec::new();
    for (i, (d, (content, calls))) in done.iter().zip(&read).enumerate() {
        chunks.push(chunk(
            i,
            json!({ "role": "assistant", "content": "" }),
            Value::Null,
        ));
        if let Some(text) = content.as_ref().filter(|t| !t.is_empty()) {
            chunks.push(chunk(i, json!({ "content": text }), Value::Null));
        }
        for (j, call) in calls.iter().enumerate() {
            chunks.push(chunk(
                i,
                json!({ "tool_calls": [call.to_json(Some(j))] }),
                Value::Null,
            ));
        }
        chunks.push(chunk(i, json!({}), json!(finish(d, calls))));
    }
    if include_usage {
        chunks.push(usage_chunk_json(&info, total_usage(&done)));
    }
    let events = chunks
        .into_iter()
        .map(|c| c.to_string())
        .chain(std::iter::once("[DONE]".to_string()))
        .map(|data| Ok::<_, Infallible>(SseEvent::default().data(data)));
    Ok(Sse::new(futures::stream::iter(events)).into_response())
}

/// The chunks one piece of a chat stream turns into.
fn chat_chunk(g: &GenInfo, index: usize, piece: StreamPiece, include_usage: bool) -> Vec<Value> {
    let chunk = |delta, logprobs, finish| chat_chunk_json(g, index, delta, logprobs, finish);
    match piece {
        StreamPiece::Begin => vec![chunk(
            json!({ "role": "assistant", "content": "" }),
            Value::Null,
            Value::Null,
        )],
        StreamPiece::Text { text, logprobs, .. } => vec![chunk(
            json!({ "content": text }),
            chat_logprobs(logprobs.as_deref()),
            Value::Null,
        )],
        StreamPiece::End {
            finish_reason,
            usage,
            ..
        } => {
            let mut out = vec![chunk(json!({}), Value::Null, json!(finish_reason))];
            if include_usage && let Some(usage) = usage {
                out.push(usage_chunk_json(g, usage));
            }
            out
        }
    }
}

/// One chat stream chunk of choice `index`.
fn chat_chunk_json(
    g: &GenInfo,
    index: usize,
    delta: Value,
    logprobs: Value,
    finish: Value,
) -> Value {
    json!({
        "id": g.id,
        "object": "chat.completion.chunk",
        "created": g.created,
        "model": g.model,
        "system_fingerprint": fingerprint(),
        "choices": [{ "index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish }],
    })
}

/// A chat stream's usage chunk (no choices).
fn usage_chunk_json(g: &GenInfo, usage: crate::infer::Usage) -> Value {
    json!({
        "id": g.id,
        "object": "chat.completion.chunk",
        "created": g.created,
        "model": g.model,
        "system_fingerprint": fingerprint(),
        "choices": [],
        "usage": usage,
    })
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum PromptField {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
pub(crate) struct CompletionRequest {
    model: Option<String>,
    prompt: PromptField,
    #[serde(default)]
    stream: bool,
    stream_options: Option<StreamOptions>,
    n: Option<i64>,
    /// Legacy completions: the number of alternatives per token.
    logprobs: Option<i64>,
}

/// The alternatives per token a request asks for, checked (`None`: no
/// log-probabilities).
fn top_logprobs(field: &str, wanted: bool, top: Option<i64>) -> Result<Option<u8>, ApiError> {
    let max = crate::infer::logprobs::MAX_TOP_LOGPROBS;
    match (wanted, top) {
        (false, None) => Ok(None),
        (false, Some(_)) => Err(ApiError::invalid_parameter(
            "top_logprobs",
            "needs \"logprobs\": true",
        )),
        (true, None) => Ok(Some(0)),
        (true, Some(k)) => u8::try_from(k)
            .ok()
            .filter(|k| *k <= max)
            .map(Some)
            .ok_or_else(|| {
                ApiError::invalid_parameter(field, format!("must be between 0 and {max}"))
            }),
    }
}

/// Chat's `logprobs` of a choice: `{"content": [...], "refusal": null}`.
fn chat_logprobs(lp: Option<&[TokenLogprob]>) -> Value {
    lp.map_or(Value::Null, |c| json!({ "content": c, "refusal": null }))
}

/// Legacy completions' `logprobs`: parallel arrays, each token's alternatives
/// as a map, and where each token starts in the text (in characters).
fn completion_logprobs(lp: Option<&[TokenLogprob]>, offset: usize) -> Value {
    let Some(lp) = lp else { return Value::Null };
    let mut at = offset;
    let mut text_offset = Vec::with_capacity(lp.len());
    for t in lp {
        text_offset.push(at);
        at += t.token.chars().count();
    }
    json!({
        "tokens": lp.iter().map(|t| &t.token).collect::<Vec<_>>(),
        "token_logprobs": lp.iter().map(|t| t.logprob).collect::<Vec<_>>(),
        "top_logprobs": lp.iter().map(|t| {
            t.top_logprobs.iter().map(|a| (a.token.clone(), json!(a.logprob))).collect::<serde_json::Map<_, _>>()
        }).collect::<Vec<_>>(),
        "text_offset": text_offset,
    })
}

/// `POST /v1/completions`
pub(crate) async fn completions(
    State(state): State<AppState>,
    Extension(client): Extension<Client>,
    ApiJson(body): ApiJson<Value>,
) -> Result<Response, ApiError> {
    let req: CompletionRequest = from_value(&body)?;
    let sampling: SamplingFields = from_value(&body)?;
    let node = &state.node;
    let asked = generate::requested_model(req.model.as_deref(), &body)?;
    let model = generate::resolve_model(node, asked.as_deref()).await?;
    let n = choices(req.n)?;
    let prompt = match req.prompt {
        PromptField::One(p) => p,
        PromptField::Many(mut v) if v.len() == 1 => v.remove(0),
        PromptField::Many(_) => {
            return Err(ApiError::invalid_parameter(
                "prompt",
                "exactly one prompt per request is supported",
            ));
        }
    };
    if prompt.is_empty() {
        return Err(ApiError::invalid_parameter("prompt", "must not be empty"));
    }
    let mut params = sampling.into_params(defaults(&state))?;
    params.logprobs = top_logprobs("logprobs", req.logprobs.is_some(), req.logprobs)?;
    let id = format!("cmpl-{}", uuid::Uuid::new_v4().simple());
    let generations = start_choices(
        node,
        "/v1/completions",
        &client,
        &id,
        model,
        prompt,
        params,
        n,
    )
    .await?;

    let include_usage = req
        .stream_options
        .and_then(|o| o.include_usage)
        .unwrap_or(false);
    answer(
        generations,
        req.stream.then_some(include_usage),
        completion_chunk,
        "text_completion",
        |index, done| {
            json!({
                "index": index,
                "text": done.text,
                "logprobs": completion_logprobs(done.logprobs.as_deref(), 0),
                "finish_reason": done.finish_reason.as_str(),
            })
        },
    )
    .await
}

fn completion_chunk(
    g: &GenInfo,
    index: usize,
    piece: StreamPiece,
    include_usage: bool,
) -> Vec<Value> {
    let chunk = |text: &str, logprobs: Value, finish: Value| {
        json!({
            "id": g.id,
            "object": "text_completion",
            "created": g.created,
            "model": g.model,
            "system_fingerprint": fingerprint(),
            "choices": [{ "index": index, "text": text, "logprobs": logprobs, "finish_reason": finish }],
        })
    };
    match piece {
        StreamPiece::Begin => vec![],
        StreamPiece::Text {
            text,
            logprobs,
            offset,
        } => vec![chunk(
            &text,
            completion_logprobs(logprobs.as_deref(), offset),
            Value::Null,
        )],
        StreamPiece::End {
            finish_reason,
            usage,
            ..
        } => {
            let mut last = chunk("", Value::Null, json!(finish_reason));
            if include_usage && let Some(usage) = usage {
                last["usage"] = json!(usage);
            }
            vec![last]
        }
    }
}

fn fingerprint() -> String {
    format!("swarmllm-{}", crate::VERSION)
}

/// Identifies a stream's chunks.
pub(crate) struct GenInfo {
    pub(crate) id: String,
    pub(crate) model: String,
    pub(crate) created: i64,
}

/// The stream-level view of a generation that chunk builders format.
pub(crate) enum StreamPiece {
    Begin,
    Text {
        text: String,
        /// Its tokens' log-probabilities, when asked for.
        logprobs: Option<Vec<TokenLogprob>>,
        /// Characters of text streamed before this piece.
        offset: usize,
    },
    End {
        finish_reason: &'static str,
        /// Every choice's usage, on the last choice to end only.
        usage: Option<crate::infer::Usage>,
        timing: crate::infer::Timing,
        total_ms: u64,
        /// Micro-credits (see [`crate::infer::Event::Done`]).
        cost: i64,
    },
}

/// Streams generations (a request's choices) as server-sent events, each piece
/// formatted by `format` with its choice's index, ending with `data: [DONE]`
/// when `done_marker`. Pieces go out in the order they are produced; only the
/// last choice to end carries the usage, summed over every choice. A pump task
/// per choice owns its generation; when the client disconnects the channel
/// closes, the pumps drop their generations, and the engine stops them.
pub(crate) fn sse(
    generations: Vec<Generation>,
    mut format: impl FnMut(&GenInfo, usize, StreamPiece) -> Vec<Value> + Send + 'static,
    done_marker: bool,
) -> Response {
    let (tx, rx) = mpsc::channel::<Result<SseEvent, Infallible>>(64);
    let Some(first) = generations.first() else {
        return ApiError::internal("stream", "no generation").into_response();
    };
    let info = GenInfo {
        id: first.id.clone(),
        model: first.model.clone(),
        created: first.created,
    };
    let choices = generations.len();
    let (pieces_tx, mut pieces) = mpsc::channel::<(usize, Piece)>(64);
    for (index, mut generation) in generations.into_iter().enumerate() {
        let pieces_tx = pieces_tx.clone();
        tokio::spawn(async move {
            while let Some(piece) = generation.next().await {
                if pieces_tx.send((index, piece)).await.is_err() {
                    return; // the client left: dropping `generation` stops it
                }
            }
        });
    }
    drop(pieces_tx);
    tokio::spawn(async move {
        let send_all = |values: Vec<Value>| {
            let tx = tx.clone();
            async move {
                for v in values {
                    if tx
                        .send(Ok(SseEvent::default().data(v.to_string())))
                        .await
                        .is_err()
                    {
                        return false;
                    }
                }
                true
            }
        };
        for index in 0..choices {
            if !send_all(format(&info, index, StreamPiece::Begin)).await {
                return;
            }
        }
        let mut offsets = vec![0usize; choices];
        let mut ended = 0;
        let mut total: Option<crate::infer::Usage> = None;
        while let Some((index, piece)) = pieces.recv().await {
            let values = match piece {
                Piece::Text(t, _) if t.is_empty() => continue,
                Piece::Text(text, logprobs) => {
                    let chars = text.chars().count();
                    let offset = offsets.get(index).copied().unwrap_or(0);
                    if let Some(o) = offsets.get_mut(index) {
                        *o += chars;
                    }
                    let piece = StreamPiece::Text {
                        text,
                        logprobs,
                        offset,
                    };
                    format(&info, index, piece)
                }
                Piece::Done {
                    finish_reason,
                    usage,
                    timing,
                    total_ms,
                    cost,
                } => {
                    ended += 1;
                    // The prompt counts once; every choice's tokens count.
                    let sum = total.get_or_insert(crate::infer::Usage {
                        completion_tokens: 0,
                        total_tokens: usage.prompt_tokens,
                        ..usage
                    });
                    sum.completion_tokens += usage.completion_tokens;
                    sum.total_tokens += usage.completion_tokens;
                    format(
                        &info,
                        index,
                        StreamPiece::End {
                            finish_reason: finish_reason.as_str(),
                            usage: (ended == choices).then_some(*sum),
                            timing,
                            total_ms,
                            cost,
                        },
                    )
                }
                Piece::Failed(e) => {
                    vec![json!({ "error": { "code": e.code, "message": e.message } })]
                }
            };
            if !send_all(values).await {
                return;
            }
        }
        if done_marker {
            let _ = tx.send(Ok(SseEvent::default().data("[DONE]"))).await;
        }
    });
    Sse::new(ReceiverStream::new(rx))
        .keep_alive(KeepAlive::default())
        .into_response()
}

/// The OpenAI-compatible API. Each route is declared read (public) or write (needs the key) here.
pub(super) fn routes() -> super::routes::Routes {
    use axum::http::Method;
    super::routes::Routes::default()
        .read(Method::GET, "/v1/models", list_models)
        .infer(Method::POST, "/v1/chat/completions", chat_completions)
        .infer(Method::POST, "/v1/completions", completions)
}
