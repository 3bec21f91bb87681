//! `GET /api/openapi.json`: an OpenAPI 3.1 document of the whole HTTP API,
//! generated from the route table every domain declares (so a route cannot be
//! served and missing from it), with the request bodies of the inference and
//! key routes spelled out and every error in the one shape the API uses.

use axum::Json;
use axum::http::Method;
use serde_json::{Map, Value, json};

use super::routes::{Access, Routes};

/// The schema of a request body, where the route has one worth stating;
/// every other body is "a JSON object".
fn body_schema(method: &Method, path: &str) -> Value {
    let messages = json!({
        "type": "array", "minItems": 1,
        "items": {
            "type": "object", "required": ["role"],
            "properties": {
                "role": { "enum": ["system", "developer", "user", "assistant", "tool"] },
                "content": { "type": ["string", "null"] },
            },
        },
    });
    let sampling = json!({
        "model": { "type": "string" },
        "max_tokens": { "type": "integer" },
        "temperature": { "type": "number" },
        "top_p": { "type": "number" },
        "top_k": { "type": "integer" },
        "seed": { "type": "integer" },
        "stream": { "type": "boolean" },
        "n": { "type": "integer" },
        "stop": { "type": ["string", "array"] },
    });
    let object = |required: &[&str], mut properties: Value, extra: Value| {
        if let (Some(p), Some(e)) = (properties.as_object_mut(), extra.as_object()) {
            p.extend(e.clone());
        }
        json!({ "type": "object", "required": required, "properties": properties })
    };
    match (method.as_str(), path) {
        ("POST", "/v1/chat/completions") => object(
            &["messages"],
            json!({ "messages": messages, "logprobs": { "type": "boolean" },
                    "top_logprobs": { "type": "integer" }, "tools": { "type": "array" },
                    "response_format": { "type": "object" } }),
            sampling,
        ),
        ("POST", "/v1/completions") => object(
            &["prompt"],
            json!({ "prompt": { "type": ["string", "array"] }, "logprobs": { "type": "integer" } }),
            sampling,
        ),
        ("POST", "/api/v1/inference") => object(
            &["prompt"],
            json!({ "prompt": { "type": "string" }, "raw": { "type": "boolean" } }),
            sampling,
        ),
        ("POST", "/v1/responses") => object(
            &["input"],
            json!({ "input": { "type": ["string", "array"] }, "instructions": { "type": "string" },
                    "max_output_tokens": { "type": "integer" }, "temperature": { "type": "number" },
                    "top_p": { "type": "number" }, "previous_response_id": { "type": "string" },
                    "store": { "type": "boolean" }, "background": { "type": "boolean" },
                    "stream": { "type": "boolean" }, "model": { "type": "string" } }),
            json!({}),
        ),
        ("POST", "/api/admin/api-keys") => object(
            &["name"],
            json!({ "name": { "type": "string" } }),
            json!({}),
        ),
        _ => json!({ "type": "object" }),
    }
}

/// A path parameter's schema.
fn parameter(name: &str) -> Value {
    let schema = match name {
        "index" => json!({ "type": "integer", "minimum": 0 }),
        _ => json!({ "type": "string" }),
    };
    json!({ "name": name, "in": "path", "required": true, "schema": schema })
}

/// The document for `routes`.
pub(crate) fn document(routes: &Routes) -> Value {
    let error = json!({ "$ref": "#/components/schemas/Error" });
    let error_response = |what: &str| json!({ "description": what, "content": { "application/json": { "schema": error } } });
    let mut paths = Map::new();
    for route in &routes.table {
        let params: Vec<Value> = route
            .path
            .split('/')
            .filter_map(|seg| seg.strip_prefix('{')?.strip_suffix('}'))
            .map(parameter)
            .collect();
        // Every answer that is not a success is an error in the one shape.
        let responses = json!({
            "200": { "description": "success" },
            "201": { "description": "created" },
            "204": { "description": "no content" },
            "default": error_response("an error: 4xx for the caller's mistakes, 501/502/503 for what cannot be done now"),
        });
        let mut op = json!({
            "operationId": format!("{} {}", route.method, route.path),
            "parameters": params,
        });
        if route.access != Access::Read {
            op["security"] = json!([{ "bearer": [] }]);
        }
        if matches!(route.method, Method::POST | Method::PUT) {
            op["requestBody"] = json!({
                "required": false,
                "content": { "application/json": { "schema": body_schema(&route.method, route.path) } },
            });
        }
        op["responses"] = responses;
        let entry = paths
            .entry(route.path.to_string())
            .or_insert_with(|| json!({}));
        entry[route.method.as_str().to_ascii_lowercase()] = op;
    }
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "SwarmLLM node API",
            "version": crate::VERSION,
            "description": "OpenAI-compatible inference plus the admin, pool, identity and swarm APIs of a SwarmLLM node.",
        },
        "paths": paths,
        "components": {
            "securitySchemes": { "bearer": { "type": "http", "scheme": "bearer" } },
            "schemas": {
                "Error": {
                    "type": "object",
                    "required": ["error"],
                    "properties": {
                        "error": {
                            "type": "object",
                            "required": ["code", "message"],
                            "properties": {
                                "code": { "type": "string" },
                                "message": { "type": "string" },
                                "details": {},
                            },
                        },
                    },
                },
            },
        },
    })
}

/// `GET /api/openapi.json`
async fn openapi() -> Json<Value> {
    static DOC: std::sync::OnceLock<Value> = std::sync::OnceLock::new();
    Json(DOC.get_or_init(|| document(&super::all_routes())).clone())
}

/// The document's own route.
pub(crate) fn routes() -> Routes {
    Routes::default().read(Method::GET, "/api/openapi.json", openapi)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_route_is_in_the_document_with_its_access() {
        let all = super::super::all_routes();
        let doc = document(&all);
        assert_eq!(doc["openapi"], "3.1.0");
        for r in &all.table {
            let op = &doc["paths"][r.path][r.method.as_str().to_ascii_lowercase()];
            assert!(op.is_object(), "{} {} missing", r.method, r.path);
            assert_eq!(
                op["security"].is_array(),
                r.access != Access::Read,
                "{} {}",
                r.method,
                r.path
            );
        }
        let chat = &doc["paths"]["/v1/chat/completions"]["post"];
        assert_eq!(
            chat["requestBody"]["content"]["application/json"]["schema"]["required"],
            json!(["messages"])
        );
        let shard = &doc["paths"]["/api/admin/models/{id}/shards/{index}/lock"]["put"];
        assert_eq!(shard["parameters"][1]["schema"]["type"], "integer");
        assert!(doc["paths"]["/api/openapi.json"]["get"].is_object());
    }
}
