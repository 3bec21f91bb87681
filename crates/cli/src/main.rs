//! `swarmllm`: the command-line client and headless daemon of a SwarmLLM node.
//!
//! This binary only parses arguments and calls the node library (`serve`, `bench`) or
//! a running node's HTTP API (everything else). Every failure ends as one
//! `error: ...` line on stderr and exit status 1.

mod bench;
mod bench_pipeline;
mod bench_wan;
mod chat;
mod client;
mod commands;
mod hub;
mod swarm;

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use serde_json::{Map, Value, json};
use swarmllm_node::config::{Config, ConfigSource};

#[derive(Debug, Parser)]
#[command(
    name = "swarmllm",
    version,
    about = "Peer-to-peer LLM node: serve, chat, inspect"
)]
struct Cli {
    /// Data directory (default: the platform data dir, e.g. ~/.local/share/swarmllm).
    #[arg(long, global = true, env = "SWARMLLM_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// HTTP API port (default 8800).
    #[arg(long, global = true)]
    api_port: Option<u16>,
    /// Config file (default: <data-dir>/config.toml with --data-dir, else the platform
    /// config dir, e.g. ~/.config/swarmllm/config.toml).
    #[arg(long, global = true, env = "SWARMLLM_CONFIG")]
    config: Option<PathBuf>,
    /// Log format.
    #[arg(long, global = true, value_parser = ["human", "json"])]
    log_format: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a node: load the model and serve the HTTP API until stopped.
    Serve(commands::ServeArgs),
    /// Chat with the model of a running node (interactive; streams tokens).
    Chat(chat::ChatArgs),
    /// Show a running node's status.
    Status {
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
    },
    /// Models.
    Models {
        #[command(subcommand)]
        command: ModelsCommand,
    },
    /// The self-organising swarm: network map, auto-manage, locks, prune
    /// history, contribution schedule.
    Swarm {
        #[command(subcommand)]
        command: swarm::SwarmCommand,
    },
    /// Device pools: link your own devices under one owner.
    Pool {
        #[command(subcommand)]
        command: PoolCommand,
    },
    /// Credits: balance and tier, transfers, history, the network leaderboard.
    Credits {
        #[command(subcommand)]
        command: CreditsCommand,
    },
    /// Read or change the configuration (of the running node, else the config file).
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Measure prompt and decode speed: a bare llama.cpp loop vs the HTTP API.
    Bench(bench::BenchArgs),
    /// Measure the whole model vs a chain of its layer ranges in one process.
    BenchSplit(bench::BenchSplitArgs),
    /// Measure P2P request-response round trips to another node (16 KiB, 1 MiB).
    BenchNet(bench::BenchNetArgs),
    /// Measure the whole model on one node vs split over 2 and 3 node processes.
    BenchPipeline(bench_pipeline::BenchPipelineArgs),
    /// Split inference over the WAN rig's simulated links (scripts/wan-rig) at
    /// several round trips, against the round-trip bound.
    BenchWan(bench_wan::BenchWanArgs),
    /// Print this machine's node API key (for `Authorization: Bearer ...`).
    ApiKey,
    /// Print the web UI's address, with the API key for the browser.
    Ui,
    /// List the peers a running node knows (latency, trust, models).
    Peers {
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
    },
    /// Network invite codes.
    Network {
        #[command(subcommand)]
        command: NetworkCommand,
    },
    /// Updates of the running node's program (the desktop app updates itself;
    /// `swarmllm` alone is updated by its package manager).
    Update {
        #[command(subcommand)]
        command: UpdateCommand,
    },
    /// Client keys: bearer keys for apps and people that may run inference and
    /// nothing else, each with its own share of the queue.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// LoRA adapters: register a GGUF or PEFT adapter from the node's
    /// `adapters/` folder, then ask for the model `MODEL+ID` (or `+ID`).
    Adapters {
        #[command(subcommand)]
        command: AdaptersCommand,
    },
}

#[derive(Debug, Subcommand)]
enum AdaptersCommand {
    /// List the registered adapters.
    List,
    /// Register an adapter file (relative to `<data_dir>/adapters/`): a GGUF
    /// LoRA, or a PEFT `adapter_model.safetensors` (converted for the model
    /// the node serves).
    Add {
        /// The file, relative to the adapters folder.
        path: String,
        /// Its id (default: a new UUID).
        #[arg(long)]
        id: Option<String>,
        /// A display name.
        #[arg(long)]
        name: Option<String>,
        /// The model it is for.
        #[arg(long)]
        base_model: Option<String>,
        /// LoRA alpha (default: the file's, or the PEFT config's).
        #[arg(long)]
        alpha: Option<f32>,
    },
    /// Unregister an adapter (its file stays).
    Rm {
        /// The adapter's id.
        id: String,
    },
}

#[derive(Debug, Subcommand)]
enum KeysCommand {
    /// List the client keys (never the keys themselves).
    List,
    /// Make a client key and print it (shown this once).
    Create {
        /// What it is for (1–64 characters).
        name: String,
    },
    /// Revoke a client key: requests with it are refused from now on.
    Revoke {
        /// The key's id (from `swarmllm keys list`).
        id: String,
    },
}

#[derive(Debug, Subcommand)]
enum UpdateCommand {
    /// Ask the update server for a newer version.
    Check,
    /// Download the newer version, check its signature and install it.
    Apply,
}

#[derive(Debug, Subcommand)]
enum NetworkCommand {
    /// Print an invite code (`swarm://…`) others can join with.
    Code,
    /// Join a network through an invite code or a multiaddr.
    Join {
        /// `swarm://…` code or `/ip4/…/tcp/…/p2p/…` address.
        code: String,
    },
}

#[derive(Debug, Subcommand)]
enum ModelsCommand {
    /// List the models a running node serves and the sharded models in the data dir.
    List,
    /// Split a GGUF into layer shards in the data dir (`<data-dir>/models/<id>/`).
    Import {
        /// The GGUF file.
        path: PathBuf,
        /// Number of layer shards.
        #[arg(long, default_value_t = 1)]
        shards: u32,
        /// Model id (default: the file name without `.gguf`, lower-cased).
        #[arg(long)]
        id: Option<String>,
    },
    /// Acquire a model from the network: its manifest, then its shards (P2P from
    /// the best holder, BLAKE3-verified, resumable), with progress bars.
    Add {
        /// Model id as peers announce it.
        id: String,
        /// Only these shard indices (comma-separated; default all).
        #[arg(long, value_delimiter = ',')]
        shards: Option<Vec<u32>>,
        /// Return at once instead of waiting for the downloads.
        #[arg(long)]
        no_wait: bool,
    },
    /// Search the Hugging Face Hub for GGUF models: variants, sizes and what fits
    /// this machine.
    Search {
        /// Words to search for.
        query: String,
        /// Most repositories to show.
        #[arg(long, default_value_t = 10)]
        limit: u32,
    },
    /// Read a Hub GGUF's header (range requests only) and show the shard layout.
    Probe {
        /// Repository (`owner/name`).
        repo: String,
        /// File in it.
        file: String,
        /// Shard count (default: the node's choice).
        #[arg(long)]
        shards: Option<u32>,
    },
    /// Download a model from the Hub: every shard, some (`--shards 1,2`) or this
    /// node's fair share, fetching only their bytes, with progress bars.
    Pull {
        /// Repository (`owner/name`).
        repo: String,
        /// File in it (default: the variant recommended for this machine).
        #[arg(long)]
        file: Option<String>,
        /// Only these shard indices (comma-separated).
        #[arg(long, value_delimiter = ',', conflicts_with = "fair_share")]
        shards: Option<Vec<u32>>,
        /// This node's fair share of the shards.
        #[arg(long)]
        fair_share: bool,
        /// Shard count of the split (default: the node's choice).
        #[arg(long)]
        split: Option<u32>,
        /// Model id (default: the file name without `.gguf`, lower-cased).
        #[arg(long)]
        id: Option<String>,
        /// Return at once instead of waiting for the downloads.
        #[arg(long)]
        no_wait: bool,
    },
    /// Remove a model from the running node (or one shard of it).
    Rm {
        /// Model id.
        id: String,
        /// Only this shard.
        #[arg(long)]
        shard: Option<u32>,
    },
}

#[derive(Debug, Subcommand)]
enum PoolCommand {
    /// Create a pool owned by this device.
    Create {
        /// Pool name.
        #[arg(long)]
        name: String,
        /// This device's name in the pool (default: the node's nickname).
        #[arg(long)]
        device_name: Option<String>,
    },
    /// Print a one-time 8-character invite code (24 h, owner only).
    InviteCode,
    /// Join a pool with an invite code from its owner.
    Join {
        /// The 8-character code.
        code: String,
        /// This device's name in the pool.
        #[arg(long)]
        device_name: Option<String>,
    },
    /// Show the pool and its devices.
    Status {
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
    },
    /// Leave the pool (the owner leaving dissolves it).
    Leave,
    /// Remove a device from the pool (owner only).
    Remove {
        /// The device's node id.
        node_id: String,
    },
}

#[derive(Debug, Subcommand)]
enum CreditsCommand {
    /// Show the balance and tier.
    Balance {
        /// Re-check every entry's signatures and the cached totals.
        #[arg(long)]
        verify: bool,
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
    },
    /// Send credits to another node (it countersigns the transfer).
    Send {
        /// The recipient's node id.
        to: String,
        /// Credits to send.
        amount: f64,
        /// A note for the recipient.
        #[arg(long)]
        memo: Option<String>,
    },
    /// List ledger entries, newest first.
    History {
        /// How many.
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
    /// The network-wide leaderboard (from signed balance announcements).
    Leaderboard,
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Print the whole config, or one key.
    Get {
        /// A config key such as `api_port`.
        key: Option<String>,
    },
    /// Set one key (persisted to the config file).
    Set {
        /// A config key such as `rate_limit_per_minute`.
        key: String,
        /// The new value.
        value: String,
    },
}

impl Cli {
    /// The config source every subcommand shares: file, env, then these flags.
    fn config_source(&self, extra: Map<String, Value>) -> ConfigSource {
        let mut overrides = extra;
        if let Some(port) = self.api_port {
            overrides.insert("api_port".into(), json!(port));
        }
        if let Some(format) = &self.log_format {
            overrides.insert("log_format".into(), json!(format));
        }
        ConfigSource::from_flags(self.config.clone(), self.data_dir.as_ref(), overrides)
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match &cli.command {
        Command::Serve(args) => commands::serve(cli.config_source(args.overrides()), args).await,
        Command::Bench(args) => bench::run(cli.config_source(Map::new()), args).await,
        Command::BenchNet(args) => bench::run_net(args).await,
        Command::BenchSplit(args) => bench::run_split(args).await,
        Command::BenchPipeline(args) => bench_pipeline::run(args).await,
        Command::BenchWan(args) => bench_wan::run(args).await,
        Command::Chat(args) => {
            chat::run(
                &client::Client::connect(&cli.config_source(Map::new()))?,
                args,
            )
            .await
        }
        Command::Status { json } => {
            commands::status(
                &client::Client::connect(&cli.config_source(Map::new()))?,
                *json,
            )
            .await
        }
        Command::Models {
            command: ModelsCommand::List,
        } => {
            let source = cli.config_source(Map::new());
            commands::models_list(&client::Client::connect(&source)?, &load_config(&source)?).await
        }
        Command::Models {
            command: ModelsCommand::Import { path, shards, id },
        } => {
            let source = cli.config_source(Map::new());
            commands::models_import(&load_config(&source)?, path, *shards, id.as_deref())?;
            // A node running on this data dir picks the new shards up at once.
            let client = client::Client::connect(&source)?;
            if client.is_running().await {
                client
                    .post("/api/admin/rescan-shards", &serde_json::json!({}))
                    .await?;
                println!("the running node rescanned its shards");
            }
            Ok(())
        }
        Command::Models {
            command:
                ModelsCommand::Add {
                    id,
                    shards,
                    no_wait,
                },
        } => {
            let client = client::Client::connect(&cli.config_source(Map::new()))?;
            commands::models_add(&client, id, shards.as_deref(), !*no_wait).await
        }
        Command::Models {
            command: ModelsCommand::Search { query, limit },
        } => {
            let client = client::Client::connect(&cli.config_source(Map::new()))?;
            hub::search(&client, query, *limit).await
        }
        Command::Models {
            command: ModelsCommand::Probe { repo, file, shards },
        } => {
            let client = client::Client::connect(&cli.config_source(Map::new()))?;
            hub::probe(&client, repo, file, *shards).await
        }
        Command::Models {
            command:
                ModelsCommand::Pull {
                    repo,
                    file,
                    shards,
                    fair_share,
                    split,
                    id,
                    no_wait,
                },
        } => {
            let client = client::Client::connect(&cli.config_source(Map::new()))?;
            hub::pull(
                &client,
                hub::Pull {
                    repo,
                    file: file.as_deref(),
                    shards: shards.as_deref(),
                    fair_share: *fair_share,
                    split: *split,
                    id: id.as_deref(),
                    wait: !*no_wait,
                },
            )
            .await
        }
        Command::Models {
            command: ModelsCommand::Rm { id, shard },
        } => {
            let client = client::Client::connect(&cli.config_source(Map::new()))?;
            commands::models_rm(&client, id, *shard).await
        }
        Command::Swarm { command } => {
            let client = client::Client::connect(&cli.config_source(Map::new()))?;
            swarm::run(&client, command).await
        }
        Command::Pool { command } => {
            let client = client::Client::connect(&cli.config_source(Map::new()))?;
            match command {
                PoolCommand::Create { name, device_name } => {
                    let mut body = json!({ "name": name });
                    if let Some(d) = device_name {
                        body["device_name"] = json!(d);
                    }
                    let v = client.post("/api/pool/create", &body).await?;
                    println!(
                        "created pool {} ({})",
                        v["name"].as_str().unwrap_or("?"),
                        v["pool_id"].as_str().unwrap_or("?")
                    );
                    Ok(())
                }
                PoolCommand::InviteCode => {
                    let v = client.post("/api/pool/generate-code", &json!({})).await?;
                    println!("{}", v["code"].as_str().unwrap_or("?"));
                    Ok(())
                }
                PoolCommand::Join { code, device_name } => {
                    let mut body = json!({ "code": code });
                    if let Some(d) = device_name {
                        body["device_name"] = json!(d);
                    }
                    let v = client.post("/api/pool/join", &body).await?;
                    println!(
                        "joined pool {} (owner {:.16}…)",
                        v["name"].as_str().unwrap_or("?"),
                        v["owner_node_id"].as_str().unwrap_or("?")
                    );
                    Ok(())
                }
                PoolCommand::Status { json } => commands::pool_status(&client, *json).await,
                PoolCommand::Remove { node_id } => {
                    client
                        .post("/api/pool/remove", &json!({ "node_id": node_id }))
                        .await?;
                    println!("removed {node_id:.16}… from the pool");
                    Ok(())
                }
                PoolCommand::Leave => {
                    client.post("/api/pool/leave", &json!({})).await?;
                    println!("left the pool");
                    Ok(())
                }
            }
        }
        Command::Credits { command } => {
            let client = client::Client::connect(&cli.config_source(Map::new()))?;
            match command {
                CreditsCommand::Balance { verify, json } => {
                    commands::credits_balance(&client, *verify, *json).await
                }
                CreditsCommand::Send { to, amount, memo } => {
                    let v = client
                        .post(
                            "/api/v1/wallet/send",
                            &json!({ "to": to, "amount": amount, "memo": memo }),
                        )
                        .await?;
                    println!(
                        "sent {} credits to {:.16}… ({}, {})",
                        v["amount"],
                        to,
                        v["transaction_id"].as_str().unwrap_or("?"),
                        v["status"].as_str().unwrap_or("?")
                    );
                    Ok(())
                }
                CreditsCommand::History { limit } => {
                    commands::credits_history(&client, *limit).await
                }
                CreditsCommand::Leaderboard => commands::credits_leaderboard(&client).await,
            }
        }
        Command::ApiKey => commands::api_key(&cli.config_source(Map::new())),
        Command::Ui => commands::ui_url(&cli.config_source(Map::new())),
        Command::Peers { json } => {
            commands::peers(
                &client::Client::connect(&cli.config_source(Map::new()))?,
                *json,
            )
            .await
        }
        Command::Update { command } => {
            let client = client::Client::connect(&cli.config_source(Map::new()))?;
            match command {
                UpdateCommand::Check => commands::update_check(&client).await,
                UpdateCommand::Apply => commands::update_apply(&client).await,
            }
        }
        Command::Adapters { command } => {
            let client = client::Client::connect(&cli.config_source(Map::new()))?;
            match command {
                AdaptersCommand::List => commands::adapters_list(&client).await,
                AdaptersCommand::Add {
                    path,
                    id,
                    name,
                    base_model,
                    alpha,
                } => {
                    let body = json!({ "path": path, "id": id, "name": name,
                                       "base_model": base_model, "alpha": alpha });
                    commands::adapters_add(&client, body).await
                }
                AdaptersCommand::Rm { id } => commands::adapters_rm(&client, id).await,
            }
        }
        Command::Keys { command } => {
            let client = client::Client::connect(&cli.config_source(Map::new()))?;
            match command {
                KeysCommand::List => commands::keys_list(&client).await,
                KeysCommand::Create { name } => commands::keys_create(&client, name).await,
                KeysCommand::Revoke { id } => commands::keys_revoke(&client, id).await,
            }
        }
        Command::Network { command } => {
            let client = client::Client::connect(&cli.config_source(Map::new()))?;
            match command {
                NetworkCommand::Code => commands::network_code(&client).await,
                NetworkCommand::Join { code } => commands::network_join(&client, code).await,
            }
        }
        Command::Config { command } => {
            let source = cli.config_source(Map::new());
            match command {
                ConfigCommand::Get { key } => commands::config_get(&source, key.as_deref()).await,
                ConfigCommand::Set { key, value } => {
                    commands::config_set(&source, key, value).await
                }
            }
        }
    }
}

/// Loads the config a subcommand acts on.
fn load_config(source: &ConfigSource) -> anyhow::Result<Config> {
    Ok(source.load()?)
}
