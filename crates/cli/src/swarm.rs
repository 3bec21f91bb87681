//! `swarmllm swarm …`: the self-organising swarm of a running node — the network
//! map, per-model auto-manage, shard locks, the prune history and the
//! contribution schedule.

use anyhow::{Context, bail};
use clap::Subcommand;
use serde_json::{Map, Value, json};

use crate::client::Client;

#[derive(Debug, Subcommand)]
pub(crate) enum SwarmCommand {
    /// Peers, holders, demand, gaps and replication targets per region.
    Map,
    /// Show or set a model's auto-manage policy.
    AutoManage {
        /// Model id.
        model: String,
        /// Acquire its shards: on, off, or default (follow the config).
        #[arg(long, value_parser = ["on", "off", "default"])]
        acquire: Option<String>,
        /// Prune its shards: on, off, or default.
        #[arg(long, value_parser = ["on", "off", "default"])]
        prune: Option<String>,
    },
    /// Lock a shard against pruning (or unlock it).
    Lock {
        /// Model id.
        model: String,
        /// Shard index.
        index: u32,
        /// Unlock instead.
        #[arg(long)]
        unlock: bool,
    },
    /// What auto-manage pruned, and why.
    PruneHistory {
        /// Most events to show.
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
    /// Show or set the hours this node contributes (local time).
    Schedule {
        /// Hours, e.g. `mon-fri=9-17,sat=10-14` (end exclusive; `all=0-24`).
        #[arg(long, conflicts_with = "off")]
        hours: Option<String>,
        /// Contribute at every hour again.
        #[arg(long)]
        off: bool,
    },
}

pub(crate) async fn run(client: &Client, command: &SwarmCommand) -> anyhow::Result<()> {
    match command {
        SwarmCommand::Map => {
            let v = client.get("/api/admin/network-map").await?;
            print_map(&v);
        }
        SwarmCommand::AutoManage {
            model,
            acquire,
            prune,
        } => {
            let path = format!("/api/admin/models/{model}/auto-manage");
            let v = if acquire.is_none() && prune.is_none() {
                client.get(&path).await?
            } else {
                let mut body = Map::new();
                if let Some(a) = acquire {
                    body.insert("enabled".into(), tri(a));
                }
                if let Some(p) = prune {
                    body.insert("prune".into(), tri(p));
                }
                client.put(&path, &Value::Object(body)).await?
            };
            println!(
                "{model}: auto-manage {} ({}), prune {} ({}); trust {}, replication target {}",
                on_off(&v["enabled"]),
                v["source"]["enabled"].as_str().unwrap_or("?"),
                on_off(&v["prune"]),
                v["source"]["prune"].as_str().unwrap_or("?"),
                v["trust_level"].as_str().unwrap_or("?"),
                v["replication_target"]
            );
        }
        SwarmCommand::Lock {
            model,
            index,
            unlock,
        } => {
            let v = client
                .put(
                    &format!("/api/admin/models/{model}/shards/{index}/lock"),
                    &json!({ "locked": !unlock }),
                )
                .await?;
            println!(
                "shard {index} of {model} {}; locked shards: {}",
                if *unlock { "unlocked" } else { "locked" },
                v["locked_shards"]
            );
        }
        SwarmCommand::PruneHistory { limit } => {
            let v = client
                .get(&format!("/api/admin/prune-history?limit={limit}"))
                .await?;
            let events = v["events"].as_array().cloned().unwrap_or_default();
            if events.is_empty() {
                println!("nothing pruned");
            }
            for e in events {
                let at = chrono::DateTime::from_timestamp(e["at"].as_i64().unwrap_or(0), 0)
                    .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
                    .unwrap_or_default();
                println!(
                    "{at}  {} shard {}  {:.1} MB  {}",
                    e["model_id"].as_str().unwrap_or("?"),
                    e["shard_index"],
                    e["bytes"].as_f64().unwrap_or(0.0) / 1_048_576.0,
                    e["reason"].as_str().unwrap_or("")
                );
            }
        }
        SwarmCommand::Schedule { hours, off } => {
            let v = match (hours, off) {
                (Some(h), _) => {
                    let body = json!({ "enabled": true, "weekdays": parse_hours(h)? });
                    client.put("/api/admin/schedule", &body).await?
                }
                (None, true) => {
                    client
                        .put("/api/admin/schedule", &json!({ "enabled": false }))
                        .await?
                }
                (None, false) => client.get("/api/admin/schedule").await?,
            };
            print_schedule(&v);
        }
    }
    Ok(())
}

fn tri(word: &str) -> Value {
    match word {
        "on" => json!(true),
        "off" => json!(false),
        _ => Value::Null,
    }
}

fn on_off(v: &Value) -> &'static str {
    if v.as_bool() == Some(true) {
        "on"
    } else {
        "off"
    }
}

fn print_map(v: &Value) {
    let local = v["local_region"].as_str().unwrap_or("");
    for (region, r) in v["regions"].as_object().into_iter().flatten() {
        println!(
            "{region}{}: {} node(s)",
            if region == local { " (this node)" } else { "" },
            r["total"]
        );
        for (model, target) in r["replication_target"].as_object().into_iter().flatten() {
            println!(
                "  {model}: {} holder(s), target {target}, demand {} req/min{}",
                r["models"][model].as_u64().unwrap_or(0),
                r["demand"][model].as_f64().unwrap_or(0.0),
                if r["coverage_gaps"]
                    .as_array()
                    .is_some_and(|g| g.iter().any(|m| m == model))
                {
                    "  (gap)"
                } else {
                    ""
                }
            );
        }
    }
}

fn print_schedule(v: &Value) {
    if v["enabled"] != true {
        println!("contributes at every hour");
    } else {
        for day in swarmllm_node::swarm::schedule::WEEKDAYS {
            let ranges: Vec<String> = v["weekdays"][day]
                .as_array()
                .into_iter()
                .flatten()
                .map(|r| format!("{}-{}", r["start"], r["end"]))
                .collect();
            println!(
                "{day}: {}",
                if ranges.is_empty() {
                    "-".to_string()
                } else {
                    ranges.join(", ")
                }
            );
        }
    }
    println!(
        "now ({}): {}",
        v["local_time"].as_str().unwrap_or("?"),
        if v["contributing_now"] == true {
            "contributing"
        } else {
            "not contributing"
        }
    );
}

/// Parses `mon-fri=9-17,sat=10-14` (also `all=…`) into the API's weekdays map.
fn parse_hours(text: &str) -> anyhow::Result<Value> {
    const DAYS: [&str; 7] = swarmllm_node::swarm::schedule::WEEKDAYS;
    let day_index = |d: &str| {
        DAYS.iter()
            .position(|x| *x == d)
            .with_context(|| format!("unknown day '{d}' (use {})", DAYS.join(", ")))
    };
    let mut out: Map<String, Value> = Map::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (days, hours) = part
            .split_once('=')
            .with_context(|| format!("'{part}': expected DAYS=START-END"))?;
        let (start, end) = hours
            .split_once('-')
            .with_context(|| format!("'{hours}': expected START-END hours"))?;
        let (start, end): (u8, u8) = (
            start.trim().parse().context("start hour")?,
            end.trim().parse().context("end hour")?,
        );
        if start >= end || end > 24 {
            bail!("'{hours}': hours must satisfy 0 <= start < end <= 24");
        }
        let days = days.trim().to_ascii_lowercase();
        let range = if days == "all" {
            0..=6
        } else if let Some((a, b)) = days.split_once('-') {
            let (a, b) = (day_index(a.trim())?, day_index(b.trim())?);
            if a > b {
                bail!("'{days}': the first day must come before the last");
            }
            a..=b
        } else {
            let d = day_index(&days)?;
            d..=d
        };
        for d in range {
            if let Some(list) = out
                .entry(DAYS[d].to_string())
                .or_insert_with(|| json!([]))
                .as_array_mut()
            {
                list.push(json!({ "start": start, "end": end }));
            }
        }
    }
    Ok(Value::Object(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hours_parse_into_weekdays() -> anyhow::Result<()> {
        let v = parse_hours("mon-fri=9-17, sat=10-14")?;
        assert_eq!(v["wed"], json!([{ "start": 9, "end": 17 }]));
        assert_eq!(v["sat"], json!([{ "start": 10, "end": 14 }]));
        assert!(v.get("sun").is_none());
        assert_eq!(parse_hours("all=0-24")?.as_object().map(Map::len), Some(7));
        for bad in ["mon=17-9", "funday=1-2", "mon", "fri-mon=1-2", "mon=1-25"] {
            assert!(parse_hours(bad).is_err(), "{bad}");
        }
        Ok(())
    }
}
