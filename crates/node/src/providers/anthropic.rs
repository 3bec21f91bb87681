//! Anthropic's Messages API spoken as OpenAI's chat completions: a chat
//! request becomes a `/messages` request ([`request`]), its answer becomes a
//! `chat.completion` ([`answer`]), and its event stream becomes
//! `chat.completion.chunk`s ([`StreamTranslator`]), so a client of the node
//! sees one protocol whichever provider answers.
//!
//! What maps: system and developer messages (Anthropic's `system`), text and
//! image parts, `max_tokens` (required there: 4096 when absent), temperature
//! (Anthropic's range is 0–1), `top_p`, `stop`, tools and tool choice, tool
//! calls and tool results, and usage. What Anthropic has no counterpart for
//! (`n`, logprobs, `response_format`, penalties) is refused before sending,
//! rather than silently dropped.

use serde_json::{Map, Value, json};

/// The `anthropic-version` header every call sends.
pub const VERSION: &str = "2023-06-01";

/// `max_tokens` when a request names none (Anthropic requires one).
const DEFAULT_MAX_TOKENS: u64 = 4096;

/// Anthropic's models, as the spec's "static list" (id, display name). Any
/// other `claude-*` id is still sent there.
pub const MODELS: &[(&str, &str)] = &[
    ("claude-opus-4-5", "Claude Opus 4.5"),
    ("claude-sonnet-4-6", "Claude Sonnet 4.6"),
    ("claude-sonnet-4-5", "Claude Sonnet 4.5"),
    ("claude-haiku-4-5", "Claude Haiku 4.5"),
];

/// Longest line of an event stream kept while waiting for its end (a server
/// that never ends a line cannot fill memory).
const MAX_LINE: usize = 1 << 20;

/// A chat request this translation cannot carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsupported {
    /// The OpenAI field.
    pub field: &'static str,
    /// Why.
    pub message: String,
}

fn unsupported(field: &'static str, message: impl Into<String>) -> Unsupported {
    Unsupported {
        field,
        message: message.into(),
    }
}

/// The text of an OpenAI `content` (a string or text parts).
fn text_of(content: &Value) -> String {
    match content {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| p["text"].as_str())
            .collect::<Vec<_>>()
            .join(""),
        _ => String::new(),
    }
}

/// An OpenAI `content` as Anthropic content blocks.
fn blocks(content: &Value) -> Result<Vec<Value>, Unsupported> {
    let parts = match content {
        Value::Null => return Ok(Vec::new()),
        Value::String(s) if s.is_empty() => return Ok(Vec::new()),
        Value::String(s) => return Ok(vec![json!({ "type": "text", "text": s })]),
        Value::Array(parts) => parts,
        _ => return Err(unsupported("messages", "a content must be text or parts")),
    };
    parts
        .iter()
        .map(|part| match part["type"].as_str() {
            Some("text") => {
                Ok(json!({ "type": "text", "text": part["text"].as_str().unwrap_or("") }))
            }
            Some("image_url") => {
                let url = part["image_url"]["url"]
                    .as_str()
                    .or_else(|| part["image_url"].as_str())
                    .unwrap_or("");
                Ok(image(url))
            }
            other => Err(unsupported(
                "messages",
                format!("a content part of type {other:?} cannot go to Anthropic"),
            )),
        })
        .collect()
}

/// An image block from a URL or a `data:` URL.
fn image(url: &str) -> Value {
    if let Some(rest) = url.strip_prefix("data:")
        && let Some((media, data)) = rest.split_once(";base64,")
    {
        return json!({ "type": "image",
            "source": { "type": "base64", "media_type": media, "data": data } });
    }
    json!({ "type": "image", "source": { "type": "url", "url": url } })
}

/// OpenAI's `tool_choice` in Anthropic's words.
fn tool_choice(choice: &Value) -> Result<Value, Unsupported> {
    Ok(match choice {
        Value::String(s) if s == "auto" => json!({ "type": "auto" }),
        Value::String(s) if s == "none" => json!({ "type": "none" }),
        Value::String(s) if s == "required" => json!({ "type": "any" }),
        Value::Object(o) if o.get("type") == Some(&json!("function")) => {
            let name = o
                .get("function")
                .and_then(|f| f["name"].as_str())
                .ok_or_else(|| unsupported("tool_choice", "a function choice needs a name"))?;
            json!({ "type": "tool", "name": name })
        }
        _ => return Err(unsupported("tool_choice", "is not a tool choice")),
    })
}

/// The `/messages` body for an OpenAI chat `body`, sent as `model`.
pub fn request(body: &Value, model: &str) -> Result<Value, Unsupported> {
    for (field, what) in [
        ("logprobs", "log probabilities"),
        ("response_format", "a response format"),
        ("frequency_penalty", "penalties"),
        ("presence_penalty", "penalties"),
        ("logit_bias", "logit biases"),
    ] {
        if !body[field].is_null() && body[field] != json!(false) {
            return Err(unsupported(field, format!("Anthropic has no {what}")));
        }
    }
    if body["n"].as_u64().is_some_and(|n| n > 1) {
        return Err(unsupported("n", "Anthropic answers one choice"));
    }
    let mut system = Vec::new();
    let mut messages = Vec::new();
    for m in body["messages"].as_array().into_iter().flatten() {
        match m["role"].as_str() {
            Some("system" | "developer") => system.push(text_of(&m["content"])),
            Some("user") => {
                messages.push(json!({ "role": "user", "content": blocks(&m["content"])? }))
            }
            Some("assistant") => {
                let mut content = blocks(&m["content"])?;
                for call in m["tool_calls"].as_array().into_iter().flatten() {
                    let args = call["function"]["arguments"].as_str().unwrap_or("{}");
                    let input: Value = serde_json::from_str(args).unwrap_or_else(|_| json!({}));
                    content.push(json!({ "type": "tool_use", "id": call["id"],
                        "name": call["function"]["name"], "input": input }));
                }
                messages.push(json!({ "role": "assistant", "content": content }));
            }
            Some("tool") => messages.push(json!({ "role": "user", "content": [{
                "type": "tool_result", "tool_use_id": m["tool_call_id"],
                "content": text_of(&m["content"]) }] })),
            _ => return Err(unsupported("messages", "a message has an unknown role")),
        }
    }
    let max_tokens = body["max_completion_tokens"]
        .as_u64()
        .or_else(|| body["max_tokens"].as_u64())
        .unwrap_or(DEFAULT_MAX_TOKENS);
    let mut out = Map::new();
    out.insert("model".into(), json!(model));
    out.insert("max_tokens".into(), json!(max_tokens));
    out.insert("messages".into(), Value::Array(messages));
    if !system.is_empty() {
        out.insert("system".into(), json!(system.join("\n\n")));
    }
    if let Some(t) = body["temperature"].as_f64() {
        out.insert("temperature".into(), json!(t.clamp(0.0, 1.0)));
    }
    if let Some(p) = body["top_p"].as_f64() {
        out.insert("top_p".into(), json!(p));
    }
    match &body["stop"] {
        Value::String(s) => {
            out.insert("stop_sequences".into(), json!([s]));
        }
        Value::Array(a) => {
            out.insert("stop_sequences".into(), Value::Array(a.clone()));
        }
        _ => {}
    }
    if body["stream"] == true {
        out.insert("stream".into(), json!(true));
    }
    if let Some(tools) = body["tools"].as_array().filter(|t| !t.is_empty()) {
        let tools: Vec<Value> = tools
            .iter()
            .map(|t| {
                let f = &t["function"];
                let mut tool = json!({ "name": f["name"],
                    "input_schema": if f["parameters"].is_object() { f["parameters"].clone() }
                                    else { json!({ "type": "object" }) } });
                if let Some(d) = f["description"].as_str() {
                    tool["description"] = json!(d);
                }
                tool
            })
            .collect();
        out.insert("tools".into(), Value::Array(tools));
        if !body["tool_choice"].is_null() {
            out.insert("tool_choice".into(), tool_choice(&body["tool_choice"])?);
        }
    }
    if let Some(user) = body["user"].as_str() {
        out.insert("metadata".into(), json!({ "user_id": user }));
    }
    Ok(Value::Object(out))
}

/// Anthropic's `stop_reason` as OpenAI's `finish_reason`.
fn finish_reason(stop: &Value) -> Value {
    match stop.as_str() {
        Some("max_tokens") => json!("length"),
        Some("tool_use") => json!("tool_calls"),
        Some("refusal") => json!("content_filter"),
        Some(_) => json!("stop"),
        None => Value::Null,
    }
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A `/messages` answer as a `chat.completion`; `None` when it is not one.
pub fn answer(message: &Value) -> Option<Value> {
    let content = message["content"].as_array()?;
    let text: String = content
        .iter()
        .filter(|b| b["type"] == "text")
        .filter_map(|b| b["text"].as_str())
        .collect();
    let calls: Vec<Value> = content
        .iter()
        .filter(|b| b["type"] == "tool_use")
        .map(|b| {
            json!({ "id": b["id"], "type": "function", "function": {
                "name": b["name"], "arguments": b["input"].to_string() } })
        })
        .collect();
    let mut msg = json!({ "role": "assistant",
        "content": if text.is_empty() && !calls.is_empty() { Value::Null } else { json!(text) } });
    if !calls.is_empty() {
        msg["tool_calls"] = Value::Array(calls);
    }
    let usage = &message["usage"];
    let (prompt, completion) = (
        usage["input_tokens"].as_u64().unwrap_or(0),
        usage["output_tokens"].as_u64().unwrap_or(0),
    );
    Some(json!({
        "id": message["id"],
        "object": "chat.completion",
        "created": now(),
        "model": message["model"],
        "choices": [{ "index": 0, "message": msg,
                      "finish_reason": finish_reason(&message["stop_reason"]) }],
        "usage": { "prompt_tokens": prompt, "completion_tokens": completion,
                   "total_tokens": prompt + completion },
    }))
}

/// Turns Anthropic's server-sent events into OpenAI's: feed it the bytes as
/// they come ([`StreamTranslator::push`]); each call returns the `data:`
/// frames to send on, ending with `data: [DONE]` once the message stops (or
/// an error event, or [`StreamTranslator::finish`] on a stream cut short).
#[derive(Debug, Default)]
pub struct StreamTranslator {
    line: Vec<u8>,
    data: String,
    id: String,
    model: String,
    created: u64,
    include_usage: bool,
    prompt_tokens: u64,
    completion_tokens: u64,
    /// Content block index → tool call index, for the tool-use blocks seen.
    tools: Vec<(u64, usize)>,
    done: bool,
}

impl StreamTranslator {
    /// A translator; `include_usage` as the request's `stream_options` said.
    pub fn new(include_usage: bool) -> Self {
        Self {
            include_usage,
            created: now(),
            ..Self::default()
        }
    }

    /// Whether the stream has ended (nothing more will be sent).
    pub fn done(&self) -> bool {
        self.done
    }

    /// Reads `bytes`; returns the frames they complete.
    pub fn push(&mut self, bytes: &[u8]) -> String {
        let mut out = String::new();
        for &b in bytes {
            if self.done {
                break;
            }
            if b != b'\n' {
                if self.line.len() >= MAX_LINE {
                    self.fail(&mut out, "an event line too long");
                    break;
                }
                self.line.push(b);
                continue;
            }
            let line = std::mem::take(&mut self.line);
            let line = String::from_utf8_lossy(&line);
            let line = line.trim_end_matches('\r');
            if line.is_empty() {
                let data = std::mem::take(&mut self.data);
                if !data.is_empty() {
                    self.event(&data, &mut out);
                }
            } else if let Some(d) = line.strip_prefix("data:") {
                if self.data.len() + d.len() > MAX_LINE {
                    self.fail(&mut out, "an event too long");
                    break;
                }
                if !self.data.is_empty() {
                    self.data.push('\n');
                }
                self.data.push_str(d.strip_prefix(' ').unwrap_or(d));
            }
            // `event:` lines repeat the data's `type`; comments and ids are
            // not needed.
        }
        out
    }

    /// The stream ended; returns the last frames (an error if the message
    /// never stopped).
    pub fn finish(&mut self) -> String {
        let mut out = String::new();
        if !self.done {
            self.fail(&mut out, "a stream that ended before the message did");
        }
        out
    }

    fn frame(out: &mut String, v: &Value) {
        out.push_str("data: ");
        out.push_str(&v.to_string());
        out.push_str("\n\n");
    }

    fn chunk(&self, delta: Value, finish: Value) -> Value {
        json!({ "id": self.id, "object": "chat.completion.chunk", "created": self.created,
                "model": self.model,
                "choices": [{ "index": 0, "delta": delta, "finish_reason": finish }] })
    }

    fn fail(&mut self, out: &mut String, what: &str) {
        Self::frame(
            out,
            &json!({ "error": { "code": "PROVIDER_ERROR",
                                "message": format!("Anthropic sent {what}") } }),
        );
        out.push_str("data: [DONE]\n\n");
        self.done = true;
    }

    fn event(&mut self, data: &str, out: &mut String) {
        let Ok(e) = serde_json::from_str::<Value>(data) else {
            self.fail(out, "an event that is not JSON");
            return;
        };
        match e["type"].as_str() {
            Some("message_start") => {
                let m = &e["message"];
                self.id = m["id"].as_str().unwrap_or("").chars().take(128).collect();
                self.model = m["model"]
                    .as_str()
                    .unwrap_or("")
                    .chars()
                    .take(256)
                    .collect();
                self.prompt_tokens = m["usage"]["input_tokens"].as_u64().unwrap_or(0);
                let c = self.chunk(json!({ "role": "assistant", "content": "" }), Value::Null);
                Self::frame(out, &c);
            }
            Some("content_block_start") if e["content_block"]["type"] == "tool_use" => {
                let block = e["index"].as_u64().unwrap_or(0);
                let index = self.tools.len();
                // Bounded by what a sane message holds; a stream that opens
                // more tool blocks than that is cut off.
                if index >= 128 {
                    self.fail(out, "too many tool calls");
                    return;
                }
                self.tools.push((block, index));
                let b = &e["content_block"];
                let c = self.chunk(
                    json!({ "tool_calls": [{ "index": index, "id": b["id"], "type": "function",
                        "function": { "name": b["name"], "arguments": "" } }] }),
                    Value::Null,
                );
                Self::frame(out, &c);
            }
            Some("content_block_delta") => {
                let d = &e["delta"];
                let delta = match d["type"].as_str() {
                    Some("text_delta") => json!({ "content": d["text"] }),
                    Some("input_json_delta") => {
                        let block = e["index"].as_u64().unwrap_or(0);
                        let Some(&(_, index)) = self.tools.iter().find(|(b, _)| *b == block) else {
                            return;
                        };
                        json!({ "tool_calls": [{ "index": index,
                            "function": { "arguments": d["partial_json"] } }] })
                    }
                    // Thinking and signatures have no OpenAI counterpart.
                    _ => return,
                };
                let c = self.chunk(delta, Value::Null);
                Self::frame(out, &c);
            }
            Some("message_delta") => {
                if let Some(n) = e["usage"]["output_tokens"].as_u64() {
                    self.completion_tokens = n;
                }
                let reason = finish_reason(&e["delta"]["stop_reason"]);
                if !reason.is_null() {
                    let c = self.chunk(json!({}), reason);
                    Self::frame(out, &c);
                }
            }
            Some("message_stop") => {
                if self.include_usage {
                    let (p, c) = (self.prompt_tokens, self.completion_tokens);
                    let mut u = self.chunk(json!({}), Value::Null);
                    u["choices"] = json!([]);
                    u["usage"] = json!({ "prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c });
                    Self::frame(out, &u);
                }
                out.push_str("data: [DONE]\n\n");
                self.done = true;
            }
            Some("error") => {
                let kind = e["error"]["type"].as_str().unwrap_or("error");
                let kind: String = kind.chars().take(64).collect();
                self.fail(out, &format!("an error ({kind})"));
            }
            // ping, content_block_stop, text block starts.
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chat_request_becomes_a_messages_request() {
        let body = json!({
            "model": "claude-x", "max_tokens": 7, "temperature": 1.6, "stop": "END",
            "messages": [
                { "role": "system", "content": "Be brief." },
                { "role": "user", "content": [{ "type": "text", "text": "Hi" },
                    { "type": "image_url", "image_url": { "url": "data:image/png;base64,AAA" } }] },
                { "role": "assistant", "content": null, "tool_calls": [{ "id": "t1",
                    "type": "function", "function": { "name": "f", "arguments": "{\"a\":1}" } }] },
                { "role": "tool", "tool_call_id": "t1", "content": "42" },
            ],
            "tools": [{ "type": "function", "function": { "name": "f", "parameters":
                { "type": "object", "properties": { "a": { "type": "integer" } } } } }],
            "tool_choice": "required",
        });
        let r = request(&body, "claude-x").expect("translates");
        assert_eq!(r["system"], "Be brief.");
        assert_eq!(r["max_tokens"], 7);
        assert_eq!(r["temperature"], 1.0, "clamped to Anthropic's range");
        assert_eq!(r["stop_sequences"], json!(["END"]));
        assert_eq!(
            r["messages"][0]["content"][1]["source"]["media_type"],
            "image/png"
        );
        assert_eq!(r["messages"][1]["content"][0]["input"], json!({ "a": 1 }));
        assert_eq!(r["messages"][2]["content"][0]["tool_use_id"], "t1");
        assert_eq!(r["tools"][0]["input_schema"]["type"], "object");
        assert_eq!(r["tool_choice"], json!({ "type": "any" }));
        assert_eq!(
            request(&json!({ "messages": [], "logprobs": true }), "m")
                .expect_err("refused")
                .field,
            "logprobs"
        );
        assert_eq!(
            request(&json!({ "messages": [] }), "m").expect("ok")["max_tokens"],
            4096
        );
    }

    #[test]
    fn a_message_becomes_a_chat_completion() {
        let m = json!({ "id": "msg_1", "type": "message", "model": "claude-x",
            "content": [{ "type": "text", "text": "Hello" },
                        { "type": "tool_use", "id": "t", "name": "f", "input": { "a": 1 } }],
            "stop_reason": "tool_use", "usage": { "input_tokens": 3, "output_tokens": 4 } });
        let a = answer(&m).expect("a message");
        assert_eq!(a["choices"][0]["message"]["content"], "Hello");
        assert_eq!(
            a["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"],
            "{\"a\":1}"
        );
        assert_eq!(a["choices"][0]["finish_reason"], "tool_calls");
        assert_eq!(a["usage"]["total_tokens"], 7);
        assert!(answer(&json!({ "oops": 1 })).is_none());
    }

    fn frames(s: &str) -> Vec<Value> {
        s.split("\n\n")
            .filter_map(|f| f.strip_prefix("data: "))
            .map(|d| {
                if d == "[DONE]" {
                    json!("[DONE]")
                } else {
                    serde_json::from_str(d).expect("json")
                }
            })
            .collect()
    }

    #[test]
    fn events_become_chunks_whatever_the_byte_boundaries() {
        let events = concat!(
            "event: message_start\r\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",",
            "\"model\":\"claude-x\",\"usage\":{\"input_tokens\":5,\"output_tokens\":1}}}\r\n\r\n",
            "event: ping\ndata: {\"type\": \"ping\"}\n\n",
            "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,",
            "\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n",
            "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,",
            "\"delta\":{\"type\":\"text_delta\",\"text\":\"Hel\"}}\n\n",
            "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,",
            "\"delta\":{\"type\":\"text_delta\",\"text\":\"lo\"}}\n\n",
            "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":1,",
            "\"content_block\":{\"type\":\"tool_use\",\"id\":\"t\",\"name\":\"f\",\"input\":{}}}\n\n",
            "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":1,",
            "\"delta\":{\"type\":\"input_json_delta\",\"partial_json\":\"{\\\"a\\\":1}\"}}\n\n",
            "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":",
            "\"tool_use\"},\"usage\":{\"output_tokens\":9}}\n\n",
            "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
        );
        for step in [1, 7, events.len()] {
            let mut t = StreamTranslator::new(true);
            let mut out = String::new();
            for piece in events.as_bytes().chunks(step) {
                out.push_str(&t.push(piece));
            }
            assert!(t.done());
            let f = frames(&out);
            let text: String = f
                .iter()
                .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
                .collect();
            assert_eq!(text, "Hello", "step {step}");
            assert_eq!(f[0]["id"], "msg_1");
            assert_eq!(
                f[3]["choices"][0]["delta"]["tool_calls"][0]["function"]["name"],
                "f"
            );
            assert_eq!(
                f[4]["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"],
                "{\"a\":1}"
            );
            assert_eq!(f[5]["choices"][0]["finish_reason"], "tool_calls");
            assert_eq!(f[6]["usage"]["total_tokens"], 14);
            assert_eq!(f[7], "[DONE]");
            assert_eq!(t.finish(), "", "nothing after the end");
        }
    }

    #[test]
    fn a_broken_stream_ends_with_an_error_frame() {
        let mut t = StreamTranslator::new(false);
        let out =
            t.push(b"data: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\"}}\n\n");
        let f = frames(&out);
        assert_eq!(f[0]["error"]["code"], "PROVIDER_ERROR");
        assert_eq!(f[1], "[DONE]");
        let mut t = StreamTranslator::new(false);
        assert_eq!(t.push(b"data: not json\n\n").matches("[DONE]").count(), 1);
        let mut t = StreamTranslator::new(false);
        assert_eq!(t.push(b"data: {\"type\":\"ping\"}\n\n"), "");
        assert!(t.finish().contains("ended before"));
        let mut t = StreamTranslator::new(false);
        let out = t.push(&vec![b'x'; MAX_LINE + 10]);
        assert!(out.contains("too long") && t.done());
    }
}
