//! Test harness: real `swarmllm serve` processes on loopback, each with its own
//! temporary data dir and port, driven over real HTTP.
#![allow(dead_code, unreachable_pub)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use std::sync::Arc;

use serde_json::Value;
use swarmllm_node::identity::Identity;
use swarmllm_node::net::{LocalInfo, NetConfig, Network};

/// The swarmllm binary under test.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_swarmllm")
}

/// The SmolLM2 test model (fetched by scripts/fetch-test-model).
pub fn model_path() -> PathBuf {
    swarmllm_node::paths::test_model("SWARMLLM_TEST_MODEL", "SmolLM2-135M-Instruct.Q4_1.gguf")
        .expect("test model missing: run scripts/fetch-test-model (or set SWARMLLM_TEST_MODEL)")
}

/// A free loopback port (bound, then released for the node to take).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free port")
}

/// Polls `f` until it returns `Some` or `deadline` passes.
pub fn wait_for<T>(what: &str, deadline: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let end = Instant::now() + deadline;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs the CLI with `args` against `dir` and returns (status ok, stdout, stderr).
pub fn cli(dir: &Path, port: u16, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(bin())
        .arg("--data-dir")
        .arg(dir)
        .arg("--api-port")
        .arg(port.to_string())
        .args(args)
        .env("SWARMLLM_SECRET_STORE", "file")
        .env_remove("SWARMLLM_API_KEY")
        .output()
        .expect("run swarmllm");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// One running node process.
pub struct TestNode {
    child: Option<Child>,
    dir: tempfile::TempDir,
    pub port: u16,
    pub p2p_port: u16,
    extra_args: Vec<String>,
    extra_env: Vec<(String, String)>,
    pub base: String,
    pub key: String,
    with_model: bool,
    http: reqwest::blocking::Client,
    /// The network namespace it runs in and its address there (see
    /// [`TestNode::start_in_netns`]); loopback otherwise.
    netns: Option<String>,
    host: String,
}

impl TestNode {
    /// Starts a node serving the test model with one inference thread.
    pub fn start() -> Self {
        Self::start_with(true)
    }

    /// Starts a node with no model.
    pub fn start_without_model() -> Self {
        Self::start_with(false)
    }

    fn start_with(with_model: bool) -> Self {
        Self::start_full(with_model, &[])
    }

    /// Starts a node with extra `serve` arguments (e.g. `--bootstrap CODE`).
    pub fn start_full(with_model: bool, extra: &[&str]) -> Self {
        Self::start_custom(with_model, extra, &[], |_| {})
    }

    /// Starts a node with extra `serve` arguments and environment variables, after
    /// `prepare` has filled its (still empty) data dir.
    pub fn start_custom(
        with_model: bool,
        extra: &[&str],
        env: &[(&str, &str)],
        prepare: impl FnOnce(&Path),
    ) -> Self {
        Self::start_at(None, "127.0.0.1", with_model, extra, env, prepare)
    }

    /// [`Self::start_custom`], in network namespace `netns` (`ip netns exec`,
    /// so root) with its API and P2P listening on `host`, its address there.
    pub fn start_in_netns(
        netns: &str,
        host: &str,
        extra: &[&str],
        env: &[(&str, &str)],
        prepare: impl FnOnce(&Path),
    ) -> Self {
        Self::start_at(Some(netns), host, false, extra, env, prepare)
    }

    fn start_at(
        netns: Option<&str>,
        host: &str,
        with_model: bool,
        extra: &[&str],
        env: &[(&str, &str)],
        prepare: impl FnOnce(&Path),
    ) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        prepare(dir.path());
        let port = free_port();
        let mut node = TestNode {
            child: None,
            dir,
            port,
            p2p_port: free_port(),
            extra_args: extra.iter().map(|s| s.to_string()).collect(),
            extra_env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            base: format!("http://{host}:{port}"),
            key: String::new(),
            with_model,
            http: reqwest::blocking::Client::builder()
                .timeout(Duration::from_secs(120))
                .build()
                .expect("http client"),
            netns: netns.map(str::to_string),
            host: host.to_string(),
        };
        node.spawn_on_free_ports();
        node
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Starts the node on its ports; on a fresh P2P port if another test took
    /// the old one while the node was down (the API port stays: the test knows it).
    fn spawn(&mut self) {
        for attempt in 0.. {
            match self.try_spawn() {
                Ok(()) => return,
                Err(log) if attempt < 3 && log.contains("cannot listen on") => {
                    self.p2p_port = free_port();
                }
                Err(log) => panic!("node exited early: {log}"),
            }
        }
    }

    /// Starts the node on fresh ports, again if another test took a port between
    /// `free_port` releasing it and the node binding it.
    fn spawn_on_free_ports(&mut self) {
        for attempt in 0.. {
            match self.try_spawn() {
                Ok(()) => return,
                Err(log) if attempt < 3 && log.contains("in use") => {
                    self.port = free_port();
                    self.p2p_port = free_port();
                    self.base = format!("http://{}:{}", self.host, self.port);
                }
                Err(log) => panic!("node exited early: {log}"),
            }
        }
    }

    /// Starts the node and waits until it answers; its log if it exits first.
    fn try_spawn(&mut self) -> Result<(), String> {
        let log = std::fs::File::create(self.dir.path().join("node.log")).expect("log file");
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, bin()]);
                c
            }
            None => Command::new(bin()),
        };
        cmd.arg("--data-dir")
            .arg(self.dir.path())
            .arg("--api-port")
            .arg(self.port.to_string())
            .arg("serve")
            .arg("--threads")
            .arg("1")
            .arg("--p2p-port")
            .arg(self.p2p_port.to_string())
            .args(&self.extra_args)
            // Tests stay on loopback (or their namespace's address): no mDNS,
            // no listening on other interfaces.
            .env("SWARMLLM_P2P_HOST", &self.host)
            .env("SWARMLLM_API_HOST", &self.host)
            .env("SWARMLLM_MDNS", "false")
            .env("SWARMLLM_ANNOUNCE_INTERVAL_SECS", "2")
            .env("SWARMLLM_SECRET_STORE", "file")
            .env_remove("SWARMLLM_API_KEY")
            .envs(self.extra_env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(Stdio::null())
            .stderr(log);
        if self.with_model {
            cmd.arg("--model").arg(model_path());
        }
        self.child = Some(cmd.spawn().expect("spawn swarmllm serve"));
        let url = format!("{}/health/live", self.base);
        wait_for("the node to answer", Duration::from_secs(90), || {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                return Some(Err(format!("({status}) {}", self.log())));
            }
            self.http
                .get(&url)
                .send()
                .ok()
                .filter(|r| r.status().is_success())
                .map(|_| Ok(()))
        })?;
        let (ok, out, err) = cli(self.dir.path(), self.port, &["api-key"]);
        assert!(ok, "api-key failed: {err}");
        self.key = out.trim().to_string();
        assert!(self.key.starts_with("swl-"), "unexpected key {}", self.key);
        Ok(())
    }

    /// Like [`wait_for`], but `f` says what it saw last (`Err`), and a timeout
    /// shows that and the end of this node's log.
    pub fn wait_logged<T>(
        &self,
        what: &str,
        deadline: Duration,
        mut f: impl FnMut() -> Result<T, String>,
    ) -> T {
        let end = Instant::now() + deadline;
        loop {
            let seen = match f() {
                Ok(v) => return v,
                Err(seen) => seen,
            };
            if Instant::now() >= end {
                let log = self.log();
                let tail: Vec<&str> = log.lines().rev().take(40).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                panic!(
                    "timed out waiting for {what}; last saw {seen}; the node's log ends:\n{}",
                    tail.join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The node's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("node.log")).unwrap_or_default()
    }

    /// Kills the process (SIGKILL) and waits for it.
    /// The node process's resident memory in KiB (Linux: /proc/PID/status).
    pub fn rss_kib(&self) -> u64 {
        let pid = self.child.as_ref().map(Child::id).expect("running");
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("VmRSS:"))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|v| v.parse().ok())
            })
            .expect("VmRSS")
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops and starts the node again on the same data dir and port.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// Starts the node again after [`kill`](Self::kill), without the extra
    /// arguments it first had (so a restart relies on what the node saved).
    pub fn restart_plain(&mut self) {
        self.kill();
        self.extra_args.clear();
        self.spawn();
    }

    /// Waits for the process to exit on its own and returns whether it succeeded.
    pub fn wait_exit(&mut self, deadline: Duration) -> bool {
        let child = self.child.as_mut().expect("node not running");
        let status = wait_for("the node to exit", deadline, || {
            child.try_wait().ok().flatten()
        });
        self.child = None;
        status.success()
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn http(&self) -> &reqwest::blocking::Client {
        &self.http
    }

    /// GET without auth → (status, JSON body).
    pub fn get(&self, path: &str) -> (u16, Value) {
        let r = self.http.get(self.url(path)).send().expect("GET");
        let status = r.status().as_u16();
        (status, r.json().unwrap_or(Value::Null))
    }

    /// GET with the API key → (status, JSON body).
    pub fn get_auth(&self, path: &str) -> (u16, Value) {
        let r = self
            .http
            .get(self.url(path))
            .bearer_auth(&self.key)
            .send()
            .expect("GET");
        let status = r.status().as_u16();
        (status, r.json().unwrap_or(Value::Null))
    }

    /// Drops the extra environment variables it was started with (from the
    /// next start).
    pub fn clear_env(&mut self) {
        self.extra_env.clear();
    }

    /// A request with the API key and a JSON body → (status, JSON body).
    pub fn call(&self, method: reqwest::Method, path: &str, body: &Value) -> (u16, Value) {
        let r = self
            .http
            .request(method, self.url(path))
            .bearer_auth(&self.key)
            .json(body)
            .send()
            .expect("request");
        let status = r.status().as_u16();
        (status, r.json().unwrap_or(Value::Null))
    }

    pub fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        self.call(reqwest::Method::POST, path, body)
    }

    /// POSTs with `"stream": true` and returns the `data:` payloads in order.
    pub fn post_stream(&self, path: &str, body: &Value) -> Vec<String> {
        let r = self.send_stream(path, body);
        let ct = r
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        assert!(ct.starts_with("text/event-stream"), "content-type {ct}");
        let text = r.text().expect("stream body");
        text.split("\n\n")
            .filter_map(|ev| {
                ev.lines()
                    .find_map(|l| l.strip_prefix("data:").map(|d| d.trim_start().to_string()))
            })
            .collect()
    }

    /// Sends a POST whose answer streams; asserts it is a 200.
    fn send_stream(&self, path: &str, body: &Value) -> reqwest::blocking::Response {
        let r = self
            .http
            .post(self.url(path))
            .bearer_auth(&self.key)
            .json(body)
            .send()
            .expect("stream request");
        assert_eq!(r.status().as_u16(), 200, "stream status");
        r
    }

    /// A streamed POST's `data:` payloads, each with when it arrived.
    pub fn post_stream_timed(&self, path: &str, body: &Value) -> Vec<(std::time::Instant, String)> {
        use std::io::BufRead;
        std::io::BufReader::new(self.send_stream(path, body))
            .lines()
            .map_while(Result::ok)
            .filter_map(|l| {
                l.strip_prefix("data:")
                    .map(|d| (std::time::Instant::now(), d.trim_start().to_string()))
            })
            .collect()
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The node's invite code (`swarm://…`).
pub fn network_code(node: &TestNode) -> String {
    let code = if node.netns.is_some() {
        // The CLI talks to 127.0.0.1, outside the node's namespace.
        let (status, v) = node.get("/api/admin/network-code");
        assert_eq!(status, 200, "{v}");
        v["code"].as_str().unwrap_or_default().to_string()
    } else {
        let (ok, out, err) = cli(node.dir(), node.port, &["network", "code"]);
        assert!(ok, "network code: {err}");
        out.trim().to_string()
    };
    assert!(code.starts_with("swarm://"), "{code}");
    code
}

/// The entry for `node_id` in a peers listing.
pub fn peer<'a>(peers: &'a Value, node_id: &str) -> Option<&'a Value> {
    peers["peers"]
        .as_array()?
        .iter()
        .find(|p| p["node_id"] == node_id)
}

/// The node's id.
pub fn node_id(node: &TestNode) -> String {
    node.get("/api/identity/nickname").1["node_id"]
        .as_str()
        .expect("node id")
        .to_string()
}

/// An in-process peer built from the library, used to send what a well-behaved
/// node never would.
pub fn rogue_peer(rt: &tokio::runtime::Runtime, dir: &std::path::Path) -> (Network, Identity) {
    rogue_peer_announcing(rt, dir, Arc::new(LocalInfo::default))
}

/// A rogue peer whose announcements say what `info` returns (models it claims).
pub fn rogue_peer_announcing(
    rt: &tokio::runtime::Runtime,
    dir: &std::path::Path,
    info: swarmllm_node::net::LocalInfoFn,
) -> (Network, Identity) {
    let identity = Identity::generate();
    let store = swarmllm_node::store::Store::open(&dir.join("rogue.db")).expect("store");
    let config = NetConfig {
        offline: false,
        listen_host: "127.0.0.1".into(),
        port: 0,
        mdns: false,
        bootstrap: vec![],
        network_name: "swarmllm".into(),
        announce_interval: Duration::from_secs(3600),
        region: "EU".into(),
        ban_below_trust: 0,
        cool_off: Duration::from_secs(600),
    };
    let net = rt
        .block_on(Network::start(
            &identity,
            store,
            config,
            info,
            swarmllm_node::tasks::Tasks::default(),
        ))
        .expect("rogue network");
    (net, identity)
}

/// Imports the test model as `shards` shards with id `smol` into a scratch data
/// dir; returns the dir.
pub fn import_shards(shards: u32) -> tempfile::TempDir {
    let lib = tempfile::tempdir().expect("tempdir");
    let model = model_path();
    let (ok, out, err) = cli(
        lib.path(),
        1,
        &[
            "models",
            "import",
            model.to_str().expect("utf-8 path"),
            "--shards",
            &shards.to_string(),
            "--id",
            "smol",
        ],
    );
    assert!(ok, "import failed: {out}{err}");
    lib
}

/// Gives `data_dir` the model's manifest and header and the shards `held`.
pub fn give_shards(lib: &Path, data_dir: &Path, held: &[u32]) {
    let from = lib.join("models/smol");
    let to = data_dir.join("models/smol");
    std::fs::create_dir_all(&to).expect("mkdir");
    for f in ["manifest.json", "gguf_header.bin"] {
        std::fs::copy(from.join(f), to.join(f)).expect("copy");
    }
    for i in held {
        let f = format!("shard-{i:03}.gguf");
        std::fs::copy(from.join(&f), to.join(&f)).expect("copy shard");
    }
}
