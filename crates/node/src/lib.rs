//! The SwarmLLM node as a library.
//!
//! A [`Node`] owns everything a running node has: its configuration, SQLite store,
//! Ed25519 identity, API key, the llama.cpp inference engine and its metrics. The
//! `swarmllm` CLI, the desktop app and the tests all start the same [`Node`] and serve
//! its HTTP API with [`api::serve`].
//!
//! Modules by domain: [`config`], [`store`], [`secrets`], [`identity`], [`infer`]
//! (local llama.cpp), [`net`] (libp2p), [`shard`] (layer shards on disk),
//! [`pipeline`] (split inference across peers), [`hub`] (the Hugging Face Hub), [`pool`] (device pools),
//! [`credits`] (the signed credit ledger), [`api`],
//! [`metrics`], [`hardware`].
#![deny(missing_docs)]

pub mod adapters;
pub mod api;
pub mod config;
pub mod credits;
mod fsutil;
pub mod fuzzing;
pub mod hardware;
pub mod hub;
pub mod identity;
pub mod infer;
pub mod keys;
pub mod logging;
pub mod metrics;
pub mod net;
pub mod node;
pub mod paths;
pub mod pipeline;
pub mod pool;
pub mod providers;
pub mod qr;
pub mod responses;
pub mod secrets;
pub mod shard;
pub mod store;
pub mod swarm;
pub mod tasks;
pub mod update;

pub use node::{Node, NodeOptions, StartError};

/// The version of this build (`CARGO_PKG_VERSION`).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
