//! OpenAI's Responses API: `POST /v1/responses`, `GET` and `DELETE
//! /v1/responses/{id}`, `POST /v1/responses/{id}/cancel`, and the admin
//! listing `GET /api/admin/responses`.
//!
//! A response runs as a task that turns the generation's pieces into the typed,
//! numbered events the official SDK parses (`response.created` …
//! `response.output_text.delta` … `response.completed`). A foreground request
//! waits for the end (or streams the events, and cancels the run if its reader
//! leaves); `background: true` answers at once with the `queued` response, to
//! be polled, streamed with `GET …?stream=true&starting_after=N`, or
//! cancelled. `store` (default true) keeps the record in SQLite; a response
//! continues another's conversation with `previous_response_id`. A client key
//! sees only its own responses.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;

use axum::Json;
use axum::extract::{Extension, Query, State};
use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use super::AppState;
use super::error::ApiError;
use super::extract::{ApiJson, Client, Path, from_value};
use super::generate::{self, Generation, Piece, SamplingDefaults, SamplingFields};
use super::routes::Routes;
use crate::Node;
use crate::infer::{ChatTurn, FinishReason, NODE_CLIENT};
use crate::responses::{Record, Run};

#[derive(Debug, Deserialize)]
struct CreateBody {
    model: Option<String>,
    input: Value,
    instructions: Option<String>,
    max_output_tokens: Option<i64>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    previous_response_id: Option<String>,
    store: Option<bool>,
    #[serde(default)]
    background: bool,
    #[serde(default)]
    stream: bool,
    metadata: Option<Value>,
}

fn bad(field: &str, message: impl Into<String>) -> ApiError {
    ApiError::invalid_parameter(field, message)
}

fn not_found(id: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "RESPONSE_NOT_FOUND",
        format!("no response '{id}'"),
    )
}

/// A text of a message's content: a string, or its text parts.
fn content_text(content: &Value, field: &str) -> Result<String, ApiError> {
    match content {
        Value::String(s) => Ok(s.clone()),
        Value::Array(parts) => {
            let mut text = String::new();
            for (i, p) in parts.iter().enumerate() {
                match p["type"].as_str() {
                    Some("input_text" | "output_text" | "text") => {
                        text.push_str(p["text"].as_str().unwrap_or_default());
                    }
                    other => {
                        return Err(bad(
                            &format!("{field}[{i}].type"),
                            format!("content of type {other:?} is not supported"),
                        ));
                    }
                }
            }
            Ok(text)
        }
        _ => Err(bad(field, "must be a string or a list of content parts")),
    }
}

/// `input` as conversation turns: a string is one user message; a list holds
/// messages (`{"role", "content"}`, with or without `"type": "message"`).
fn input_turns(input: &Value) -> Result<Vec<ChatTurn>, ApiError> {
    let items = match input {
        Value::String(s) => {
            return Ok(vec![ChatTurn {
                role: "user".into(),
                content: s.clone(),
            }]);
        }
        Value::Array(items) if !items.is_empty() => items,
        _ => {
            return Err(bad(
                "input",
                "must be a string or a non-empty list of messages",
            ));
        }
    };
    items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            if !matches!(item["type"].as_str(), None | Some("message")) {
                return Err(bad(
                    &format!("input[{i}].type"),
                    "only messages are supported",
                ));
            }
            let role = match item["role"].as_str() {
                Some("user") => "user",
                Some("assistant") => "assistant",
                Some("system" | "developer") => "system",
                _ => {
                    return Err(bad(
                        &format!("input[{i}].role"),
                        "must be user, assistant, system or developer",
                    ));
                }
            };
            Ok(ChatTurn {
                role: role.into(),
                content: content_text(&item["content"], &format!("input[{i}].content"))?,
            })
        })
        .collect()
}

fn turns_json(turns: &[ChatTurn]) -> Value {
    turns
        .iter()
        .map(|t| json!({ "role": t.role, "content": t.content }))
        .collect()
}

fn turns_from_json(v: &Value) -> Vec<ChatTurn> {
    v.as_array()
        .into_iter()
        .flatten()
        .map(|t| ChatTurn {
            role: t["role"].as_str().unwrap_or("user").to_string(),
            content: t["content"].as_str().unwrap_or_default().to_string(),
        })
        .collect()
}

/// The status of a response's message once the response ended as `status`.
fn item_status(status: &str) -> &'static str {
    if status == "completed" {
        "completed"
    } else {
        "incomplete"
    }
}

/// The assistant message of a response.
fn message(item_id: &str, status: &str, text: Option<&str>) -> Value {
    let content = match text {
        Some(t) => json!([{ "type": "output_text", "text": t, "annotations": [], "logprobs": [] }]),
        None => json!([]),
    };
    json!({ "id": item_id, "type": "message", "status": status, "role": "assistant", "content": content })
}

/// The events of a response's text, in order: everything between
/// `response.in_progress` and the final event.
struct Events<'a> {
    run: &'a Run,
    item_id: &'a str,
}

impl Events<'_> {
    fn emit(&self, kind: &str, mut payload: Value) {
        payload["type"] = json!(kind);
        self.run.emit(payload);
    }

    fn start(&self, object: &Value) {
        self.emit("response.created", json!({ "response": object }));
        let mut running = object.clone();
        running["status"] = json!("in_progress");
        self.emit("response.in_progress", json!({ "response": running }));
    }

    fn open_message(&self) {
        self.emit(
            "response.output_item.added",
            json!({ "output_index": 0, "item": message(self.item_id, "in_progress", None) }),
        );
        self.emit(
            "response.content_part.added",
            json!({ "item_id": self.item_id, "output_index": 0, "content_index": 0,
                    "part": { "type": "output_text", "text": "", "annotations": [], "logprobs": [] } }),
        );
    }

    fn delta(&self, text: &str) {
        self.emit(
            "response.output_text.delta",
            json!({ "item_id": self.item_id, "output_index": 0, "content_index": 0,
                    "delta": text, "logprobs": [] }),
        );
    }

    fn close_message(&self, text: &str, status: &str) {
        self.emit(
            "response.output_text.done",
            json!({ "item_id": self.item_id, "output_index": 0, "content_index": 0,
                    "text": text, "logprobs": [] }),
        );
        self.emit(
            "response.content_part.done",
            json!({ "item_id": self.item_id, "output_index": 0, "content_index": 0,
                    "part": { "type": "output_text", "text": text, "annotations": [], "logprobs": [] } }),
        );
        self.emit(
            "response.output_item.done",
            json!({ "output_index": 0, "item": message(self.item_id, status, Some(text)) }),
        );
    }

    /// The last event for `object`'s final status (a cancelled run ends with
    /// no event of its own: OpenAI has none).
    fn finish(&self, object: &Value) {
        let kind = match object["status"].as_str() {
            Some("completed") => "response.completed",
            Some("incomplete") => "response.incomplete",
            Some("failed") => "response.failed",
            _ => return,
        };
        self.emit(kind, json!({ "response": object }));
    }
}

/// What a response run needs besides its generation.
struct Job {
    node: Node,
    run: Arc<Run>,
    object: Value,
    conversation: Vec<ChatTurn>,
    store: bool,
}

impl Job {
    fn item_id(&self) -> String {
        format!("msg_{}", &self.run.id["resp_".len()..])
    }

    async fn save(&self, object: &Value, answer: Option<&str>, deltas: &[String]) {
        if !self.store {
            return;
        }
        let mut conversation = turns_json(&self.conversation);
        if let (Some(a), Some(list)) = (answer, conversation.as_array_mut()) {
            list.push(json!({ "role": "assistant", "content": a }));
        }
        let record = Record {
            id: self.run.id.clone(),
            client: self.run.client.clone(),
            object: object.clone(),
            conversation,
            deltas: deltas.to_vec(),
        };
        let node = self.node.clone();
        let saved = super::blocking("responses", move || node.responses().save(&record)).await;
        if let Err(e) = saved {
            tracing::warn!(id = %self.run.id, error = %e.message, "could not store a response");
        }
    }

    /// Runs `generation` (or the error that kept it from starting) to the end,
    /// emitting events and storing the record; then the run ends.
    async fn pump(self, generation: Result<Generation, ApiError>) {
        let item_id = self.item_id();
        let events = Events {
            run: &self.run,
            item_id: &item_id,
        };
        let mut object = self.object.clone();
        events.start(&object);
        object["status"] = json!("in_progress");
        let mut text = String::new();
        let mut deltas: Vec<String> = Vec::new();
        let outcome = match generation {
            Err(e) => Err(e),
            Ok(mut generation) => {
                self.save(&object, None, &deltas).await;
                events.open_message();
                loop {
                    let piece = tokio::select! {
                        () = self.run.cancel.cancelled() => break Ok(None),
                        p = generation.next() => p,
                    };
                    match piece {
                        Some(Piece::Text(t, _)) if t.is_empty() => {}
                        Some(Piece::Text(t, _)) => {
                            events.delta(&t);
                            text.push_str(&t);
                            deltas.push(t);
                        }
                        Some(Piece::Done {
                            finish_reason,
                            usage,
                            ..
                        }) => break Ok(Some((finish_reason, usage))),
                        Some(Piece::Failed(e)) => break Err(e),
                        None => break Err(ApiError::internal("response", "the generation ended")),
                    }
                }
            }
        };
        let status = match &outcome {
            Ok(Some((FinishReason::Length, _))) => "incomplete",
            Ok(Some(_)) => "completed",
            Ok(None) => "cancelled",
            Err(_) => "failed",
        };
        object["status"] = json!(status);
        if status != "failed" {
            events.close_message(&text, item_status(status));
            object["output"] = json!([message(&item_id, item_status(status), Some(&text))]);
        }
        match &outcome {
            Ok(Some((finish, usage))) => {
                if *finish == FinishReason::Length {
                    object["incomplete_details"] = json!({ "reason": "max_output_tokens" });
                }
                object["usage"] = json!({
                    "input_tokens": usage.prompt_tokens,
                    "input_tokens_details": { "cached_tokens": usage.prompt_tokens_details.cached_tokens },
                    "output_tokens": usage.completion_tokens,
                    "output_tokens_details": { "reasoning_tokens": 0 },
                    "total_tokens": usage.total_tokens,
                });
            }
            Ok(None) => {}
            Err(e) => object["error"] = json!({ "code": e.code, "message": e.message }),
        }
        events.finish(&object);
        self.save(
            &object,
            (status != "failed").then_some(text.as_str()),
            &deltas,
        )
        .await;
        self.run.end();
        self.node.responses().finish(&self.run.id);
    }
}

/// The events a finished, stored response streamed, rebuilt from its record.
fn replay(record: &Record) -> Vec<Value> {
    let run = Run::detached(&record.id, &record.client);
    let item_id = record.object["output"][0]["id"].as_str().map_or_else(
        || format!("msg_{}", &record.id["resp_".len().min(record.id.len())..]),
        str::to_string,
    );
    let events = Events {
        run: &run,
        item_id: &item_id,
    };
    let mut start = record.object.clone();
    start["status"] = json!(if start["background"] == true {
        "queued"
    } else {
        "in_progress"
    });
    start["output"] = json!([]);
    start["usage"] = Value::Null;
    events.start(&start);
    let status = record.object["status"].as_str().unwrap_or_default();
    if status != "failed" {
        events.open_message();
        for d in &record.deltas {
            events.delta(d);
        }
        if status != "in_progress" && status != "queued" {
            let text: String = record.deltas.concat();
            events.close_message(&text, item_status(status));
        }
    }
    events.finish(&record.object);
    run.events_after(None).0
}

/// Server-sent events: the run's (or a replay's) events after `after`, then
/// following the run until it ends. A foreground run is cancelled when its
/// reader leaves.
fn stream_events(
    run: Option<Arc<Run>>,
    replayed: Vec<Value>,
    after: Option<usize>,
    cancel_on_leave: bool,
) -> Response {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<SseEvent, Infallible>>(64);
    tokio::spawn(async move {
        let send = |e: &Value| {
            let event = SseEvent::default()
                .event(e["type"].as_str().unwrap_or("message"))
                .data(e.to_string());
            tx.send(Ok(event))
        };
        let Some(run) = run else {
            let from = after.map_or(0, |a| a.saturating_add(1));
            for e in replayed.iter().skip(from) {
                if send(e).await.is_err() {
                    return;
                }
            }
            return;
        };
        let mut watch = run.watch();
        let mut last = after;
        loop {
            let (events, ended) = run.events_after(last);
            for e in &events {
                if send(e).await.is_err() {
                    if cancel_on_leave {
                        run.cancel.cancel();
                    }
                    return;
                }
                last = e["sequence_number"].as_u64().map(|n| n as usize);
            }
            if ended && run.events_after(last).0.is_empty() {
                return;
            }
            if watch.changed().await.is_err() {
                return;
            }
        }
    });
    Sse::new(tokio_stream::wrappers::ReceiverStream::new(rx))
        .keep_alive(KeepAlive::default())
        .into_response()
}

/// Whether `client` may see a response made by `owner` (the node's own key
/// sees every response).
fn may_see(client: &Client, owner: &str) -> bool {
    client.0 == NODE_CLIENT || client.0 == owner
}

async fn load(node: &Node, id: &str) -> Result<Option<Record>, ApiError> {
    let (node, id) = (node.clone(), id.to_string());
    super::blocking("responses", move || node.responses().load(&id)).await
}

/// Cancels a run when dropped, unless disarmed.
struct CancelOnDrop(Option<Arc<Run>>);

impl CancelOnDrop {
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if let Some(run) = &self.0 {
            run.cancel.cancel();
        }
    }
}

/// `POST /v1/responses`
async fn create(
    State(state): State<AppState>,
    Extension(client): Extension<Client>,
    ApiJson(body): ApiJson<Value>,
) -> Result<Response, ApiError> {
    let req: CreateBody = from_value(&body)?;
    let node = state.node.clone();
    let store = req.store.unwrap_or(true);
    if req.background && !store {
        return Err(bad(
            "background",
            "a background response must be stored (store: true)",
        ));
    }
    let sampling = SamplingFields {
        max_tokens: req.max_output_tokens,
        temperature: req.temperature,
        top_p: req.top_p,
        ..SamplingFields::default()
    };
    let params = sampling
        .into_params(SamplingDefaults {
            max_tokens: node.config().default_max_tokens,
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
        })
        .map_err(|mut e| {
            // This surface's name for the field.
            if e.details
                .as_ref()
                .is_some_and(|d| d["field"] == "max_tokens")
            {
                e.details = Some(json!({ "field": "max_output_tokens" }));
                e.message = e.message.replace("max_tokens", "max_output_tokens");
            }
            e
        })?;
    // The conversation: instructions, what the previous response saw and said,
    // then this input.
    let mut conversation = Vec::new();
    if let Some(prev) = &req.previous_response_id {
        let record = load(&node, prev)
            .await?
            .filter(|r| may_see(&client, &r.client))
            .ok_or_else(|| {
                ApiError::new(
                    StatusCode::NOT_FOUND,
                    "RESPONSE_NOT_FOUND",
                    format!("previous_response_id: no stored response '{prev}'"),
                )
                .with_details(json!({ "field": "previous_response_id" }))
            })?;
        conversation = turns_from_json(&record.conversation)
            .into_iter()
            .filter(|t| t.role != "system")
            .collect();
    }
    conversation.extend(input_turns(&req.input)?);
    let mut turns = conversation.clone();
    if let Some(i) = &req.instructions {
        turns.insert(
            0,
            ChatTurn {
                role: "system".into(),
                content: i.clone(),
            },
        );
    }
    let model = generate::resolve_model(&node, req.model.as_deref()).await?;
    let prompt = generate::render_chat(&node, &model, &turns).await?;

    let id = format!("resp_{}", uuid::Uuid::new_v4().simple());
    let object = json!({
        "id": id,
        "object": "response",
        "created_at": chrono::Utc::now().timestamp(),
        "status": if req.background { "queued" } else { "in_progress" },
        "model": model.id,
        "output": [],
        "instructions": req.instructions,
        "max_output_tokens": req.max_output_tokens,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "previous_response_id": req.previous_response_id,
        "store": store,
        "background": req.background,
        "parallel_tool_calls": false,
        "tool_choice": "auto",
        "tools": [],
        "text": { "format": { "type": "text" } },
        "metadata": req.metadata.unwrap_or_else(|| json!({})),
        "error": null,
        "incomplete_details": null,
        "usage": null,
    });
    let run = node.responses().start(&id, &client.0).map_err(|e| {
        ApiError::new(StatusCode::TOO_MANY_REQUESTS, "OVERLOADED", e.to_string())
            .with_details(json!({ "retry_after": 1 }))
    })?;
    let job = Job {
        node: node.clone(),
        run: Arc::clone(&run),
        object: object.clone(),
        conversation,
        store,
    };
    let start = {
        let (node, client, id) = (node.clone(), client.0.clone(), id.clone());
        async move { generate::start(&node, "/v1/responses", &client, id, model, prompt, params).await }
    };
    if req.background {
        if store {
            job.save(&object, None, &[]).await;
        }
        tokio::spawn(async move {
            let generation = start.await;
            job.pump(generation).await;
        });
        return Ok(Json(object).into_response());
    }
    // In the foreground a request that cannot start is this request's error.
    let generation = match start.await {
        Ok(g) => g,
        Err(e) => {
            node.responses().finish(&id);
            return Err(e);
        }
    };
    tokio::spawn(job.pump(Ok(generation)));
    if req.stream {
        return Ok(stream_events(Some(run), Vec::new(), None, true));
    }
    // A client that stops waiting cancels the run (the guard fires when this
    // handler is dropped before the end).
    let guard = CancelOnDrop(Some(Arc::clone(&run)));
    let mut watch = run.watch();
    while !watch.borrow().1 {
        if watch.changed().await.is_err() {
            break;
        }
    }
    guard.disarm();
    let (events, _) = run.events_after(None);
    let last = events
        .iter()
        .rev()
        .find_map(|e| e.get("response").cloned())
        .unwrap_or(object);
    Ok(Json(last).into_response())
}

#[derive(Debug, Deserialize)]
struct RetrieveQuery {
    #[serde(default)]
    stream: bool,
    starting_after: Option<usize>,
}

/// `GET /v1/responses/{id}` (`?stream=true&starting_after=N` streams its events)
async fn retrieve(
    State(state): State<AppState>,
    Extension(client): Extension<Client>,
    Path(id): Path<String>,
    Query(q): Query<RetrieveQuery>,
) -> Result<Response, ApiError> {
    let node = &state.node;
    let record = load(node, &id).await?;
    let run = node.responses().run(&id);
    let owner = record
        .as_ref()
        .map(|r| r.client.clone())
        .or_else(|| run.as_ref().map(|r| r.client.clone()));
    if !owner.is_some_and(|o| may_see(&client, &o)) {
        return Err(not_found(&id));
    }
    if q.stream {
        let replayed = match (&run, &record) {
            (None, Some(r)) => replay(r),
            _ => Vec::new(),
        };
        return Ok(stream_events(run, replayed, q.starting_after, false));
    }
    match record {
        Some(r) => Ok(Json(r.object).into_response()),
        // A response made with `store: false` is only seen while it streams.
        None => Err(not_found(&id)),
    }
}

/// `DELETE /v1/responses/{id}`
async fn delete(
    State(state): State<AppState>,
    Extension(client): Extension<Client>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let node = &state.node;
    let record = load(node, &id).await?;
    if !record.is_some_and(|r| may_see(&client, &r.client)) {
        return Err(not_found(&id));
    }
    if let Some(run) = node.responses().run(&id) {
        run.cancel.cancel();
    }
    let (n, i) = (node.clone(), id.clone());
    super::blocking("responses", move || n.responses().delete(&i)).await?;
    Ok(Json(
        json!({ "id": id, "object": "response", "deleted": true }),
    ))
}

/// `POST /v1/responses/{id}/cancel`: only a background response; answers it
/// as it ended.
async fn cancel(
    State(state): State<AppState>,
    Extension(client): Extension<Client>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let node = &state.node;
    let record = load(node, &id)
        .await?
        .filter(|r| may_see(&client, &r.client))
        .ok_or_else(|| not_found(&id))?;
    if record.object["background"] != true {
        return Err(bad(
            "background",
            "only a background response can be cancelled",
        ));
    }
    if let Some(run) = node.responses().run(&id) {
        run.cancel.cancel();
        let mut watch = run.watch();
        while !watch.borrow().1 {
            if watch.changed().await.is_err() {
                break;
            }
        }
    }
    let record = load(node, &id).await?.ok_or_else(|| not_found(&id))?;
    Ok(Json(record.object))
}

/// Most records `GET /api/admin/responses` lists.
const MAX_LIST: usize = 500;

/// `GET /api/admin/responses?limit=N&status=S`
async fn admin_list(
    State(state): State<AppState>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let limit = match q.get("limit") {
        None => 100,
        Some(v) => v
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=MAX_LIST).contains(n))
            .ok_or_else(|| bad("limit", format!("must be an integer from 1 to {MAX_LIST}")))?,
    };
    let status = match q.get("status").map(String::as_str) {
        None => None,
        Some(
            s @ ("completed" | "in_progress" | "cancelled" | "failed" | "queued" | "incomplete"),
        ) => Some(s.to_string()),
        Some(_) => {
            return Err(bad(
                "status",
                "must be completed, in_progress, cancelled, failed, queued or incomplete",
            ));
        }
    };
    let node = state.node.clone();
    let list = super::blocking("responses", move || {
        node.responses().list(limit, status.as_deref())
    })
    .await?;
    Ok(Json(json!({ "responses": list, "count": list.len() })))
}

/// The Responses API routes.
pub(crate) fn routes() -> Routes {
    use axum::http::Method;
    Routes::default()
        .infer(Method::POST, "/v1/responses", create)
        .infer(Method::GET, "/v1/responses/{id}", retrieve)
        .infer(Method::DELETE, "/v1/responses/{id}", delete)
        .infer(Method::POST, "/v1/responses/{id}/cancel", cancel)
        .write(Method::GET, "/api/admin/responses", admin_list)
}
