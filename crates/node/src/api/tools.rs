//! OpenAI function calling on `/v1/chat/completions`: `tools`, `tool_choice`,
//! assistant `tool_calls` and `tool` results in the history, and calls parsed
//! out of the answer.
//!
//! The tools are described to the model in a system message in the Hermes
//! format (the one Qwen 2.5, Hermes and many fine-tunes learnt), and a call is
//! read back from `<tool_call>{"name": …, "arguments": {…}}</tool_call>` blocks.
//! `tool_choice: "required"` or a named function goes further: a JSON-schema
//! grammar makes the answer *be* a call to one of the tools with arguments that
//! fit its parameters, so any model calls correctly when it must (on split
//! models too: the schema travels to the last hop as `response_format`'s does).

use serde_json::{Value, json};

use super::error::ApiError;
use crate::infer::ChatTurn;

/// Most tools one request may offer.
pub(crate) const MAX_TOOLS: usize = 64;
/// Longest function name (OpenAI's limit).
const MAX_NAME: usize = 64;

const OPEN: &str = "<tool_call>";
const CLOSE: &str = "</tool_call>";

/// One function the model may call.
#[derive(Debug, Clone)]
struct Function {
    name: String,
    description: Option<String>,
    /// Its JSON schema (an object schema).
    parameters: Value,
}

/// What `tool_choice` allows.
#[derive(Debug, Clone, PartialEq)]
enum Choice {
    /// Answer in text; the tools are not shown.
    None,
    /// Call a tool or answer in text, as the model decides.
    Auto,
    /// Call one of the tools.
    Required,
    /// Call this one.
    Named(String),
}

/// A request's tools and what it allows.
#[derive(Debug, Clone)]
pub(crate) struct Tools {
    functions: Vec<Function>,
    choice: Choice,
}

/// A call read from an answer.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ToolCall {
    pub(crate) id: String,
    pub(crate) name: String,
    /// The arguments as a JSON text (OpenAI's shape).
    pub(crate) arguments: String,
}

impl ToolCall {
    /// OpenAI's `tool_calls` entry (`index` for stream deltas).
    pub(crate) fn to_json(&self, index: Option<usize>) -> Value {
        let mut v = json!({
            "id": self.id,
            "type": "function",
            "function": { "name": self.name, "arguments": self.arguments },
        });
        if let Some(i) = index {
            v["index"] = json!(i);
        }
        v
    }
}

fn bad(field: &str, message: impl Into<String>) -> ApiError {
    ApiError::invalid_parameter(field, message)
}

/// Reads `tools` and `tool_choice` from a chat body: `None` when no tools are
/// offered. Names are checked as OpenAI checks them, parameters must be object
/// schemas, `tool_choice` must name an offered function.
pub(crate) fn parse(body: &Value) -> Result<Option<Tools>, ApiError> {
    let offered = match &body["tools"] {
        Value::Null => return check_choice_without_tools(&body["tool_choice"]),
        Value::Array(a) if a.is_empty() => return check_choice_without_tools(&body["tool_choice"]),
        Value::Array(a) => a,
        _ => return Err(bad("tools", "must be a list of tools")),
    };
    if offered.len() > MAX_TOOLS {
        return Err(bad("tools", format!("at most {MAX_TOOLS} tools")));
    }
    let mut functions = Vec::with_capacity(offered.len());
    for (i, t) in offered.iter().enumerate() {
        let field = format!("tools[{i}]");
        if t["type"] != "function" {
            return Err(bad(&field, "type must be \"function\""));
        }
        let f = &t["function"];
        let name = f["name"].as_str().unwrap_or_default();
        if name.is_empty()
            || name.len() > MAX_NAME
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            return Err(bad(
                &format!("{field}.function.name"),
                "must be 1-64 characters of a-z, A-Z, 0-9, _ and -",
            ));
        }
        if functions.iter().any(|g: &Function| g.name == name) {
            return Err(bad(&field, format!("'{name}' is offered twice")));
        }
        let parameters = match &f["parameters"] {
            Value::Null => json!({ "type": "object", "properties": {} }),
            p if p.is_object() => p.clone(),
            _ => {
                return Err(bad(
                    &format!("{field}.function.parameters"),
                    "must be a JSON schema object",
                ));
            }
        };
        functions.push(Function {
            name: name.to_string(),
            description: f["description"].as_str().map(str::to_string),
            parameters,
        });
    }
    let choice = match &body["tool_choice"] {
        Value::Null => Choice::Auto,
        Value::String(s) if s == "auto" => Choice::Auto,
        Value::String(s) if s == "none" => Choice::None,
        Value::String(s) if s == "required" => Choice::Required,
        v if v["type"] == "function" => {
            let name = v["function"]["name"].as_str().unwrap_or_default();
            if !functions.iter().any(|f| f.name == name) {
                return Err(bad(
                    "tool_choice",
                    format!("names '{name}', which is not among the tools"),
                ));
            }
            Choice::Named(name.to_string())
        }
        _ => {
            return Err(bad(
                "tool_choice",
                "must be \"none\", \"auto\", \"required\" or {\"type\": \"function\", \"function\": {\"name\"}}",
            ));
        }
    };
    Ok(Some(Tools { functions, choice }))
}

fn check_choice_without_tools(choice: &Value) -> Result<Option<Tools>, ApiError> {
    match choice {
        Value::Null => Ok(None),
        Value::String(s) if s == "none" || s == "auto" => Ok(None),
        _ => Err(bad("tool_choice", "needs tools to choose from")),
    }
}

impl Tools {
    /// Whether the model sees the tools at all.
    pub(crate) fn active(&self) -> bool {
        self.choice != Choice::None
    }

    /// Whether the answer must be a call (a grammar makes it one).
    fn forced(&self) -> bool {
        matches!(self.choice, Choice::Required | Choice::Named(_))
    }

    /// The functions the model may call now.
    fn callable(&self) -> impl Iterator<Item = &Function> {
        self.functions.iter().filter(move |f| match &self.choice {
            Choice::Named(n) => &f.name == n,
            _ => true,
        })
    }

    /// Adds the tools' description to the conversation's system message (or
    /// as one, first).
    pub(crate) fn describe(&self, turns: &mut Vec<ChatTurn>) {
        if !self.active() {
            return;
        }
        let list: Vec<String> = self
            .callable()
            .map(|f| {
                json!({
                    "type": "function",
                    "function": {
                        "name": f.name,
                        "description": f.description,
                        "parameters": f.parameters,
                    }
                })
                .to_string()
            })
            .collect();
        let text = format!(
            "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n\
             You are provided with function signatures within <tools></tools> XML tags:\n\
             <tools>\n{}\n</tools>\n\n\
             For each function call, return a json object with function name and arguments \
             within <tool_call></tool_call> XML tags:\n\
             <tool_call>\n{{\"name\": <function-name>, \"arguments\": <args-json-object>}}\n</tool_call>",
            list.join("\n")
        );
        match turns.first_mut() {
            Some(t) if t.role == "system" => {
                t.content = format!("{}\n\n{text}", t.content);
            }
            _ => turns.insert(
                0,
                ChatTurn {
                    role: "system".into(),
                    content: text,
                },
            ),
        }
    }

    /// The JSON schema a forced answer follows: `{"name", "arguments"}` of one
    /// callable function, its arguments fitting its parameters.
    pub(crate) fn schema(&self) -> Option<String> {
        if !self.forced() {
            return None;
        }
        let options: Vec<Value> = self
            .callable()
            .map(|f| {
                json!({
                    "type": "object",
                    "properties": {
                        "name": { "const": f.name },
                        "arguments": f.parameters,
                    },
                    "required": ["name", "arguments"],
                    "additionalProperties": false,
                })
            })
            .collect();
        let schema = match options.len() {
            1 => options.into_iter().next().unwrap_or_default(),
            _ => json!({ "anyOf": options }),
        };
        Some(schema.to_string())
    }

    /// Splits an answer into its text and its calls: a forced answer is one
    /// call as a whole; otherwise each `<tool_call>` block naming an offered
    /// function with object arguments is a call, and the text around the
    /// blocks is the content (`None` when only calls remain). A block that is
    /// not a valid call stays in the text.
    pub(crate) fn extract(&self, text: &str) -> (Option<String>, Vec<ToolCall>) {
        if !self.active() {
            return (Some(text.to_string()), Vec::new());
        }
        if self.forced() {
            if let Some(call) = self.call_from(text.trim()) {
                return (None, vec![call]);
            }
            return (Some(text.to_string()), Vec::new());
        }
        let mut calls = Vec::new();
        let mut content = String::new();
        let mut rest = text;
        while let Some(start) = rest.find(OPEN) {
            let after = &rest[start + OPEN.len()..];
            let Some(end) = after.find(CLOSE) else { break };
            match self.call_from(after[..end].trim()) {
                Some(call) => {
                    content.push_str(&rest[..start]);
                    calls.push(call);
                }
                None => content.push_str(&rest[..start + OPEN.len() + end + CLOSE.len()]),
            }
            rest = &after[end + CLOSE.len()..];
        }
        content.push_str(rest);
        let content = content.trim();
        let content = (!content.is_empty() || calls.is_empty()).then(|| content.to_string());
        (content, calls)
    }

    fn call_from(&self, json_text: &str) -> Option<ToolCall> {
        let v: Value = serde_json::from_str(json_text).ok()?;
        let name = v["name"].as_str()?;
        self.callable().find(|f| f.name == name)?;
        // Some models say "parameters" for the arguments.
        let args = match (&v["arguments"], &v["parameters"]) {
            (a, _) if a.is_object() => a,
            (_, p) if p.is_object() => p,
            _ => return None,
        };
        Some(ToolCall {
            id: format!("call_{}", &uuid::Uuid::new_v4().simple().to_string()[..24]),
            name: name.to_string(),
            arguments: args.to_string(),
        })
    }
}

/// An assistant turn's `tool_calls` as the model would have written them, so a
/// conversation carrying earlier calls reads as the model's own answers.
pub(crate) fn render_calls(calls: &[Value]) -> String {
    calls
        .iter()
        .map(|c| {
            let f = &c["function"];
            // Arguments arrive as a JSON text; an unparsable one goes as text.
            let args = f["arguments"]
                .as_str()
                .and_then(|a| serde_json::from_str::<Value>(a).ok())
                .unwrap_or_else(|| f["arguments"].clone());
            format!(
                "{OPEN}\n{}\n{CLOSE}",
                json!({ "name": f["name"], "arguments": args })
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// A `tool` turn's content as the Hermes format wraps results.
pub(crate) fn render_result(content: &str) -> String {
    format!("<tool_response>\n{content}\n</tool_response>")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weather(choice: Value) -> Result<Option<Tools>, ApiError> {
        parse(&json!({
            "tools": [
                { "type": "function", "function": { "name": "get_weather", "description": "Weather in a city",
                  "parameters": { "type": "object", "properties": { "city": { "type": "string" } }, "required": ["city"] } } },
                { "type": "function", "function": { "name": "get_time" } },
            ],
            "tool_choice": choice,
        }))
    }

    #[test]
    fn calls_are_read_from_hermes_blocks_and_text_around_them_kept() {
        let tools = weather(Value::Null).expect("valid").expect("tools");
        let (content, calls) = tools.extract(
            "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>",
        );
        assert_eq!(content.as_deref(), Some("Let me check."));
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0].name, "get_weather");
        assert_eq!(calls[0].arguments, r#"{"city":"Paris"}"#);
        assert!(calls[0].id.starts_with("call_"));
        // Only calls: no content. Two calls. An unknown tool stays text.
        let (content, calls) = tools.extract(
            "<tool_call>{\"name\": \"get_time\", \"arguments\": {}}</tool_call><tool_call>{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Oslo\"}}</tool_call>",
        );
        assert_eq!((content, calls.len()), (None, 2));
        let text = "<tool_call>{\"name\": \"rm_rf\", \"arguments\": {}}</tool_call>";
        assert_eq!(tools.extract(text), (Some(text.to_string()), vec![]));
        assert_eq!(tools.extract("Hello"), (Some("Hello".into()), vec![]));
        assert!(tools.extract("<tool_call>{oops").1.is_empty());
    }

    #[test]
    fn a_forced_choice_has_a_schema_and_reads_the_whole_answer() {
        let tools = weather(json!("required")).expect("valid").expect("tools");
        let schema: Value = serde_json::from_str(&tools.schema().expect("schema")).expect("json");
        assert_eq!(schema["anyOf"].as_array().map(Vec::len), Some(2));
        let (content, calls) = tools.extract(r#" {"name": "get_time", "arguments": {}} "#);
        assert_eq!((content, calls.len()), (None, 1));
        let named = weather(json!({ "type": "function", "function": { "name": "get_weather" } }))
            .expect("valid")
            .expect("tools");
        let schema: Value = serde_json::from_str(&named.schema().expect("schema")).expect("json");
        assert_eq!(schema["properties"]["name"]["const"], "get_weather");
        // The named one only.
        assert!(
            named
                .extract(r#"{"name": "get_time", "arguments": {}}"#)
                .1
                .is_empty()
        );
        let auto = weather(json!("auto")).expect("valid").expect("tools");
        assert!(auto.schema().is_none());
        let none = weather(json!("none")).expect("valid").expect("tools");
        assert!(!none.active());
    }

    #[test]
    fn bad_tools_and_choices_are_refused() {
        let bad_name =
            json!({ "tools": [{ "type": "function", "function": { "name": "no spaces" } }] });
        assert!(parse(&bad_name).is_err());
        let twice = json!({ "tools": [
            { "type": "function", "function": { "name": "a" } },
            { "type": "function", "function": { "name": "a" } }] });
        assert!(parse(&twice).is_err());
        let not_fn = json!({ "tools": [{ "type": "retrieval" }] });
        assert!(parse(&not_fn).is_err());
        let params = json!({ "tools": [{ "type": "function", "function": { "name": "a", "parameters": 3 } }] });
        assert!(parse(&params).is_err());
        let many: Vec<Value> = (0..=MAX_TOOLS)
            .map(|i| json!({ "type": "function", "function": { "name": format!("f{i}") } }))
            .collect();
        assert!(parse(&json!({ "tools": many })).is_err());
        assert!(weather(json!({ "type": "function", "function": { "name": "nope" } })).is_err());
        assert!(weather(json!("sometimes")).is_err());
        assert!(parse(&json!({ "tool_choice": "required" })).is_err());
        assert!(
            parse(&json!({ "tool_choice": "auto" }))
                .expect("fine")
                .is_none()
        );
    }

    #[test]
    fn the_tools_join_the_system_message() {
        let tools = weather(Value::Null).expect("valid").expect("tools");
        let mut turns = vec![ChatTurn {
            role: "user".into(),
            content: "hi".into(),
        }];
        tools.describe(&mut turns);
        assert_eq!(turns[0].role, "system");
        assert!(
            turns[0].content.contains("\"get_weather\"") && turns[0].content.contains("<tools>")
        );
        let mut turns = vec![
            ChatTurn {
                role: "system".into(),
                content: "Be brief.".into(),
            },
            ChatTurn {
                role: "user".into(),
                content: "hi".into(),
            },
        ];
        tools.describe(&mut turns);
        assert_eq!(turns.len(), 2);
        assert!(turns[0].content.starts_with("Be brief.") && turns[0].content.contains("get_time"));
        let call = json!([{ "id": "c1", "type": "function", "function": { "name": "get_time", "arguments": "{}" } }]);
        assert_eq!(
            render_calls(call.as_array().expect("list")),
            "<tool_call>\n{\"arguments\":{},\"name\":\"get_time\"}\n</tool_call>"
        );
    }
}
