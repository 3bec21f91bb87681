//! An in-process node (as the desktop app hosts one) that is stopped ends every
//! background task and lets go of its database and its P2P port, so the same data
//! dir and port serve the next node started in the same process.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::json;
use swarmllm_node::config::ConfigSource;
use swarmllm_node::{Node, NodeOptions};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

async fn start(dir: &Path, p2p_port: u16) -> Node {
    let mut overrides = serde_json::Map::new();
    overrides.insert("data_dir".into(), json!(dir.to_string_lossy()));
    overrides.insert("api_port".into(), json!(0));
    overrides.insert("p2p_host".into(), json!("127.0.0.1"));
    overrides.insert("p2p_port".into(), json!(p2p_port));
    overrides.insert("mdns".into(), json!(false));
    overrides.insert("secret_store".into(), json!("file"));
    Node::start(NodeOptions {
        config: ConfigSource {
            path: dir.join("config.toml"),
            overrides,
            read_env: false,
        },
        load_progress: None,
    })
    .await
    .expect("node starts")
}

/// Files under `dir` this process has open (Linux: /proc/self/fd).
fn open_files_under(dir: &Path) -> Vec<std::path::PathBuf> {
    std::fs::read_dir("/proc/self/fd")
        .map(|fds| {
            fds.flatten()
                .filter_map(|fd| std::fs::read_link(fd.path()).ok())
                .filter(|target| target.starts_with(dir))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_node_ends_its_tasks_and_releases_its_database_and_port() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().canonicalize().expect("canonical");
    let port = free_port();
    for round in 0..2 {
        let node = start(&data, port).await;
        assert!(
            node.running_tasks() > 0,
            "round {round}: no background task"
        );
        assert!(
            !open_files_under(&data).is_empty(),
            "round {round}: the database is not open while running"
        );
        assert!(
            node.stop(Duration::from_secs(10)).await,
            "round {round}: tasks still running after 10 s"
        );
        assert_eq!(node.running_tasks(), 0);
        drop(node);
        // Blocking-pool work that held a handle finishes on its own: poll for it.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let open = open_files_under(&data);
            let port_free = std::net::TcpListener::bind(("127.0.0.1", port)).is_ok();
            if open.is_empty() && port_free {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "round {round}: still open after stop: {open:?}, port free: {port_free}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
