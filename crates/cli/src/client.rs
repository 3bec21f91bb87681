//! A small HTTP client for a running node's API.

use anyhow::{Context, anyhow};
use serde_json::Value;
use swarmllm_node::config::ConfigSource;

/// Talks to the node at `base` with the local API key.
#[derive(Debug, Clone)]
pub(crate) struct Client {
    pub(crate) base: String,
    http: reqwest::Client,
    api_key: Option<String>,
}

impl Client {
    /// The node this config describes (same host, port and data dir).
    pub(crate) fn connect(source: &ConfigSource) -> anyhow::Result<Self> {
        let config = crate::load_config(source)?;
        let host = match config.api_host.as_str() {
            "0.0.0.0" | "::" => "127.0.0.1".to_string(),
            h if h.contains(':') => format!("[{h}]"),
            h => h.to_string(),
        };
        let data_dir = config.data_dir_path();
        // A missing or unreadable key only matters for authenticated calls, which
        // then fail with the node's own 401 message.
        let api_key = swarmllm_node::identity::read_api_key(&data_dir, &config.secret_store)
            .ok()
            .flatten()
            .map(|k| k.to_string());
        Ok(Self {
            base: format!("http://{host}:{}", config.api_port),
            http: reqwest::Client::builder()
                .build()
                .context("building the HTTP client")?,
            api_key,
        })
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let req = self.http.request(method, format!("{}{path}", self.base));
        match &self.api_key {
            Some(key) => req.bearer_auth(key),
            None => req,
        }
    }

    /// Sends a request and returns the response if it is a success.
    pub(crate) async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> anyhow::Result<reqwest::Response> {
        let mut req = self.request(method, path);
        if let Some(body) = body {
            req = req.json(body);
        }
        let resp = req.send().await.map_err(|e| {
            if e.is_connect() {
                anyhow!(
                    "no node is running at {} (start one with `swarmllm serve`)",
                    self.base
                )
            } else {
                anyhow!("request to {} failed: {e}", self.base)
            }
        })?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        let message = serde_json::from_str::<Value>(&text)
            .ok()
            .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
            .unwrap_or(text);
        Err(anyhow!("the node answered {}: {message}", status.as_u16()))
    }

    /// GET → JSON.
    pub(crate) async fn get(&self, path: &str) -> anyhow::Result<Value> {
        Ok(self
            .send(reqwest::Method::GET, path, None)
            .await?
            .json()
            .await?)
    }

    /// PUT JSON → JSON.
    pub(crate) async fn put(&self, path: &str, body: &Value) -> anyhow::Result<Value> {
        Ok(self
            .send(reqwest::Method::PUT, path, Some(body))
            .await?
            .json()
            .await?)
    }

    /// POST JSON → JSON.
    pub(crate) async fn post(&self, path: &str, body: &Value) -> anyhow::Result<Value> {
        Ok(self
            .send(reqwest::Method::POST, path, Some(body))
            .await?
            .json()
            .await?)
    }

    /// DELETE → JSON.
    pub(crate) async fn delete(&self, path: &str) -> anyhow::Result<Value> {
        Ok(self
            .send(reqwest::Method::DELETE, path, None)
            .await?
            .json()
            .await?)
    }

    /// Whether anything answers at the node's address.
    pub(crate) async fn is_running(&self) -> bool {
        self.http
            .get(format!("{}/health/live", self.base))
            .send()
            .await
            .is_ok()
    }
}

/// Reads server-sent events from a response, calling `on_data` with each `data:`
/// payload until `[DONE]` or the end of the stream.
pub(crate) async fn read_sse(
    resp: reqwest::Response,
    mut on_data: impl FnMut(&str) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    use futures::StreamExt;
    let mut stream = resp.bytes_stream();
    let mut buf: Vec<u8> = Vec::new();
    while let Some(chunk) = stream.next().await {
        buf.extend_from_slice(&chunk.context("reading the stream")?);
        while let Some(end) = find_event_end(&buf) {
            let event: Vec<u8> = buf.drain(..end.1).collect();
            let text = String::from_utf8_lossy(&event[..end.0]);
            for line in text.lines() {
                if let Some(data) = line.strip_prefix("data:") {
                    let data = data.trim_start();
                    if data == "[DONE]" {
                        return Ok(());
                    }
                    on_data(data)?;
                }
            }
        }
    }
    Ok(())
}

/// Finds the blank line ending an event: (end of event, end of separator).
fn find_event_end(buf: &[u8]) -> Option<(usize, usize)> {
    buf.windows(2)
        .position(|w| w == b"\n\n")
        .map(|i| (i, i + 2))
}
