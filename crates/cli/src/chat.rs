//! `swarmllm chat`: an interactive chat that streams from a running node.

use std::io::{BufRead, IsTerminal, Write};

use anyhow::Context;
use clap::Args;
use serde_json::{Value, json};

use crate::client::{Client, read_sse};

#[derive(Debug, Args)]
pub(crate) struct ChatArgs {
    /// Model id (default: the node's model).
    #[arg(long)]
    model: Option<String>,
    /// A system prompt.
    #[arg(long)]
    system: Option<String>,
    /// Sampling temperature (0 = greedy).
    #[arg(long, default_value_t = 0.7)]
    temperature: f32,
    /// Tokens per answer at most.
    #[arg(long, default_value_t = 512)]
    max_tokens: u32,
    /// Ask one question, print the answer and exit (no interactive loop).
    #[arg(long, short)]
    prompt: Option<String>,
}

/// Runs the chat loop: each line of input is a user turn; the conversation so far
/// is sent each time. End with Ctrl-D (or `/exit`).
pub(crate) async fn run(client: &Client, args: &ChatArgs) -> anyhow::Result<()> {
    let mut history: Vec<Value> = Vec::new();
    if let Some(system) = &args.system {
        history.push(json!({ "role": "system", "content": system }));
    }
    if let Some(prompt) = &args.prompt {
        history.push(json!({ "role": "user", "content": prompt }));
        turn(client, args, &history).await?;
        return Ok(());
    }
    let interactive = std::io::stdin().is_terminal();
    if interactive {
        eprintln!("chatting with {} — Ctrl-D or /exit to quit", client.base);
    }
    let stdin = std::io::stdin();
    loop {
        if interactive {
            eprint!("> ");
            std::io::stderr().flush().ok();
        }
        let mut line = String::new();
        if stdin.lock().read_line(&mut line).context("reading stdin")? == 0 {
            break;
        }
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        if line == "/exit" || line == "/quit" {
            break;
        }
        history.push(json!({ "role": "user", "content": line }));
        let answer = turn(client, args, &history).await?;
        history.push(json!({ "role": "assistant", "content": answer }));
    }
    Ok(())
}

async fn turn(client: &Client, args: &ChatArgs, history: &[Value]) -> anyhow::Result<String> {
    let mut body = json!({
        "messages": history,
        "stream": true,
        "temperature": args.temperature,
        "max_tokens": args.max_tokens,
    });
    if let Some(model) = &args.model {
        body["model"] = json!(model);
    }
    let resp = client
        .send(reqwest::Method::POST, "/v1/chat/completions", Some(&body))
        .await?;
    let mut answer = String::new();
    let mut out = std::io::stdout();
    read_sse(resp, |data| {
        let chunk: Value = serde_json::from_str(data).context("malformed stream chunk")?;
        if let Some(err) = chunk.get("error") {
            anyhow::bail!("{}", err["message"].as_str().unwrap_or("generation failed"));
        }
        if let Some(text) = chunk["choices"][0]["delta"]["content"].as_str() {
            answer.push_str(text);
            out.write_all(text.as_bytes())?;
            out.flush()?;
        }
        Ok(())
    })
    .await?;
    println!();
    Ok(answer)
}
