//! Models from the Hugging Face Hub, against a local server that speaks the Hub's
//! protocol (search and repo-info JSON, `resolve` with a redirect to a CDN on
//! another port, ETag and commit headers, ranges, 404 and 401 for gated files):
//! the catalog and probes, a shard fetched by its byte ranges alone that equals a
//! local import's, three nodes that each pull their fair share and answer through
//! the pipeline, a download killed with SIGKILL that resumes without re-reading,
//! and bytes the server corrupts caught by the hash.

mod common;

use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::{TestNode, cli, model_path, network_code, wait_for};
use serde_json::{Value, json};
use swarmllm_hub_testserver::{HubServer, Repo, ServedFile};

const DEADLINE: Duration = Duration::from_secs(120);
const REPO: &str = "HuggingFaceTB/SmolLM2-135M-Instruct-GGUF";
const TOKEN: &str = "hf_test_token_123";

fn smol_file() -> ServedFile {
    let path = model_path();
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .expect("file name")
        .to_string();
    ServedFile::new(&name, &path).expect("hash the test model")
}

/// The test model as the Hub would publish it, plus a repository without GGUF
/// files, a gated one and one whose GGUF is garbage.
fn hub(scratch: &Path) -> (HubServer, ServedFile) {
    let smol = smol_file();
    let mut public = Repo::new(REPO, vec![smol.clone()]);
    public.architecture = Some("llama".into());
    public.downloads = 5000;
    let readme = scratch.join("README.md");
    std::fs::write(&readme, "# no weights here\n").expect("write");
    let mut gated = Repo::new("acme/Gated-SmolLM2-GGUF", vec![smol.clone()]);
    gated.gated_token = Some(TOKEN.into());
    let broken = scratch.join("broken.Q4_0.gguf");
    let mut junk = b"GGUF\x03\x00\x00\x00".to_vec();
    junk.extend((0..4096u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8));
    std::fs::write(&broken, junk).expect("write");
    let server = HubServer::start(vec![
        public,
        Repo::new(
            "acme/readme-only",
            vec![ServedFile::new("README.md", &readme).expect("readme")],
        ),
        gated,
        Repo::new(
            "acme/broken-GGUF",
            vec![ServedFile::new("broken.Q4_0.gguf", &broken).expect("broken")],
        ),
    ])
    .expect("hub server");
    (server, smol)
}

fn hub_env(server: &HubServer, hf_home: &Path) -> Vec<(String, String)> {
    vec![
        ("HF_ENDPOINT".into(), server.endpoint.clone()),
        ("HF_HOME".into(), hf_home.display().to_string()),
        ("HF_TOKEN".into(), String::new()),
        ("SWARMLLM_ACTIVATION_DTYPE".into(), "f32".into()),
    ]
}

fn start_node(server: &HubServer, hf_home: &Path, extra: &[&str]) -> TestNode {
    let env = hub_env(server, hf_home);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    TestNode::start_custom(false, extra, &env, |_| {})
}

fn query(path: &str, pairs: &[(&str, &str)]) -> String {
    let mut url = reqwest::Url::parse(&format!("http://x{path}")).expect("url");
    url.query_pairs_mut().extend_pairs(pairs);
    format!("{}?{}", url.path(), url.query().unwrap_or_default())
}

fn held(node: &TestNode, id: &str) -> Vec<u64> {
    let (_, v) = node.get(&format!("/api/admin/models/{id}/status"));
    v["held_shards"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_u64).collect())
        .unwrap_or_default()
}

fn blake3_of(path: &Path) -> String {
    swarmllm_node::shard::hash_file(path).expect("hash").blake3
}

#[test]
fn the_catalog_probes_and_clear_errors() {
    let scratch = tempfile::tempdir().expect("tempdir");
    let (server, smol) = hub(scratch.path());
    let node = start_node(&server, scratch.path(), &[]);

    // Search: the repository with its variant, size, quant, fit and split flag.
    let (status, v) = node.get(&query("/api/admin/hf/search", &[("query", "smollm2")]));
    assert_eq!(status, 200, "{v}");
    let hits = v.as_array().expect("list");
    let hit = hits
        .iter()
        .find(|h| h["repo_id"] == REPO)
        .unwrap_or_else(|| panic!("{REPO} in {v}"));
    assert_eq!(hit["downloads"], 5000);
    assert_eq!(hit["split_supported"], true);
    assert_eq!(hit["recommended_variant"], "Q4_1");
    assert_eq!(hit["fits_vram"], true);
    assert_eq!(hit["variants"][0]["size_bytes"], smol.size);
    assert_eq!(hit["variants"][0]["quant"], "Q4_1");
    // A repository without GGUF files is not a result.
    assert!(!hits.iter().any(|h| h["repo_id"] == "acme/readme-only"));
    // The answer is cached: asking again costs the Hub nothing.
    let before = server.stats.hub_requests.load(Ordering::SeqCst);
    assert_eq!(
        node.get(&query("/api/admin/hf/search", &[("query", "smollm2")]))
            .1,
        v
    );
    assert_eq!(server.stats.hub_requests.load(Ordering::SeqCst), before);

    // Probe: the header only, through the CDN redirect.
    let cdn_before = server.cdn_bytes();
    let probe = |repo: &str, file: &str| {
        node.get(&query(
            "/api/admin/hf/probe",
            &[("repo_id", repo), ("filename", file)],
        ))
    };
    let (status, p) = probe(REPO, &smol.path);
    assert_eq!(status, 200, "{p}");
    let read = server.cdn_bytes() - cdn_before;
    assert!(read < 8 << 20, "the probe read {read} bytes");
    assert!(
        read < smol.size / 10,
        "the probe read {read} of {} bytes",
        smol.size
    );
    assert_eq!(p["architecture"], "llama");
    assert_eq!(p["architecture_supported"], true);
    assert_eq!(p["n_layers"], 30);
    assert_eq!(p["quantization"], "Q4_1");
    assert_eq!(p["sha256"], smol.sha256);
    assert_eq!(p["size_bytes"], smol.size);
    assert!(p["tensor_count"].as_u64() > Some(200), "{p}");
    assert!(p["context_length"].as_u64() > Some(0), "{p}");
    let shards = p["shards"].as_array().expect("layout");
    assert_eq!(shards.len(), 3);
    assert_eq!(shards[1]["layer_start"], 10);
    assert_eq!(shards[1]["layer_end"], 20);

    // Clear 4xx answers.
    let (status, e) = probe("acme/nope", "x.gguf");
    assert_eq!(
        (status, &e["error"]["code"]),
        (404, &json!("HF_NOT_FOUND")),
        "{e}"
    );
    let (status, e) = probe("acme/readme-only", "model.gguf");
    assert_eq!(status, 404, "{e}");
    assert!(
        e["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("no such file")),
        "{e}"
    );
    let (status, e) = probe("acme/readme-only", "README.md");
    assert_eq!(status, 400, "{e}");
    let (status, e) = probe("acme/broken-GGUF", "broken.Q4_0.gguf");
    assert_eq!(
        (status, &e["error"]["code"]),
        (422, &json!("HF_BAD_FILE")),
        "{e}"
    );
    let (status, e) = probe("acme/Gated-SmolLM2-GGUF", &smol.path);
    assert_eq!(
        (status, &e["error"]["code"]),
        (401, &json!("HF_GATED")),
        "{e}"
    );
    let (status, e) = node.post(
        "/api/admin/hf/download-shards",
        &json!({ "repo_id": "../../etc", "filename": "x.gguf" }),
    );
    assert_eq!(status, 400, "{e}");
    let (status, e) = node.post(
        "/api/admin/hf/download-shards",
        &json!({ "repo_id": REPO, "filename": smol.path, "shard_indices": [7], "shards": 3 }),
    );
    assert_eq!(status, 400, "{e}");

    // With the token (kept with the secrets, never shown), the gated file opens;
    // the token goes to the Hub only, never to the CDN.
    let (status, v) = node.call(
        reqwest::Method::PUT,
        "/api/admin/hf/token",
        &json!({ "token": TOKEN }),
    );
    assert_eq!(status, 200, "{v}");
    let (status, p) = probe("acme/Gated-SmolLM2-GGUF", &smol.path);
    assert_eq!(status, 200, "{p}");
    assert!(!server.stats.cdn_saw_token.load(Ordering::SeqCst));
    let (_, hf) = node.get("/api/admin/hf/status");
    assert_eq!(hf["token_set"], true);
    assert!(!hf.to_string().contains(TOKEN));
    assert!(!node.log().contains(TOKEN));

    // The CLI: search and probe.
    let (ok, out, err) = cli(node.dir(), node.port, &["models", "search", "smollm2"]);
    assert!(ok, "{out}{err}");
    assert!(out.contains(REPO) && out.contains("Q4_1"), "{out}");
    let (ok, out, err) = cli(
        node.dir(),
        node.port,
        &["models", "probe", REPO, &smol.path],
    );
    assert!(ok, "{out}{err}");
    assert!(
        out.contains("30 layers") && out.contains("shard 2"),
        "{out}"
    );
    let (ok, out, err) = cli(
        node.dir(),
        node.port,
        &["models", "probe", "acme/nope", "x.gguf"],
    );
    assert!(!ok, "{out}");
    assert!(err.contains("no such repository"), "{err}");
}

#[test]
fn one_shard_from_the_hub_reads_under_half_the_file_and_equals_a_local_import() {
    let scratch = tempfile::tempdir().expect("tempdir");
    let (server, smol) = hub(scratch.path());
    let lib = common::import_shards(3);
    let node = start_node(&server, scratch.path(), &[]);

    let before = server.cdn_bytes();
    let (ok, out, err) = cli(
        node.dir(),
        node.port,
        &[
            "models", "pull", REPO, "--file", &smol.path, "--shards", "1", "--split", "3", "--id",
            "smol",
        ],
    );
    assert!(ok, "{out}{err}");
    assert!(out.contains("downloaded and verified"), "{out}");
    let read = server.cdn_bytes() - before;
    assert!(
        read < smol.size / 2,
        "one shard of three read {read} of {} bytes",
        smol.size
    );

    // Byte for byte what `models import --shards 3` made from the whole file.
    let mine = node.dir().join("models/smol");
    let theirs = lib.path().join("models/smol");
    for f in ["manifest.json", "gguf_header.bin", "shard-001.gguf"] {
        assert_eq!(blake3_of(&mine.join(f)), blake3_of(&theirs.join(f)), "{f}");
    }
    assert!(!mine.join("shard-000.gguf").exists());
    assert_eq!(held(&node, "smol"), vec![1]);

    let (_, d) = node.get("/api/admin/downloads");
    let d = d["downloads"]
        .as_array()
        .and_then(|l| l.iter().find(|d| d["source"] == "huggingface"))
        .cloned()
        .expect("a Hub download");
    assert_eq!(d["status"], "done", "{d}");
    assert_eq!(d["shard_index"], 1);
    assert_eq!(d["progress_pct"], 100.0);
    assert!(d["speed_bps"].as_f64() > Some(0.0), "{d}");

    // The Hub source is recorded; with no peer holding shard 0, a shard download
    // points at the Hub, or with `fallback=start` fetches from it.
    let (status, s) = node.get("/api/admin/hf/source/smol");
    assert_eq!(status, 200, "{s}");
    assert_eq!(
        (&s["repo_id"], &s["filename"]),
        (&json!(REPO), &json!(smol.path))
    );
    let (status, v) = node.post("/api/admin/models/smol/shards/0/download", &json!({}));
    assert_eq!((status, &v["status"]), (200, &json!("use_hf")), "{v}");
    let (status, v) = node.post(
        "/api/admin/models/smol/shards/0/download?fallback=start",
        &json!({}),
    );
    assert_eq!((status, &v["source"]), (200, &json!("huggingface")), "{v}");
    wait_for("shard 0 from the Hub", DEADLINE, || {
        (held(&node, "smol") == vec![0, 1]).then_some(())
    });
    assert_eq!(
        blake3_of(&mine.join("shard-000.gguf")),
        blake3_of(&theirs.join("shard-000.gguf"))
    );
}

#[test]
fn three_nodes_pull_their_fair_shares_and_answer_as_the_whole_model() {
    let scratch = tempfile::tempdir().expect("tempdir");
    let (server, smol) = hub(scratch.path());
    let prompt = "Explain in a few sentences why the sky is blue.";
    let chat = |node: &TestNode, model: Option<&str>| {
        let mut body = json!({
            "messages": [{ "role": "user", "content": prompt }],
            "max_tokens": 32,
            "temperature": 0,
        });
        if let Some(m) = model {
            body["model"] = json!(m);
        }
        let (status, v) = node.post("/v1/chat/completions", &body);
        assert_eq!(status, 200, "{v}");
        v["choices"][0]["message"]["content"]
            .as_str()
            .expect("content")
            .to_string()
    };
    let reference = {
        let whole = TestNode::start();
        chat(&whole, None)
    };

    let a = start_node(&server, scratch.path(), &[]);
    let code = network_code(&a);
    let b = start_node(&server, scratch.path(), &["--bootstrap", &code]);
    let c = start_node(&server, scratch.path(), &["--bootstrap", &code]);
    let nodes = [&a, &b, &c];
    for n in nodes {
        wait_for("every node to see the other two", DEADLINE, || {
            let (_, p) = n.get("/api/admin/peers");
            (p["connected"].as_u64() >= Some(2)).then_some(())
        });
    }
    let before = server.cdn_bytes();
    for n in nodes {
        let (status, v) = n.post(
            "/api/admin/hf/download-shards",
            &json!({ "repo_id": REPO, "filename": smol.path, "peer_fair_share": true,
                     "model_id": "smol" }),
        );
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["mode"], "ranges", "{v}");
    }
    let mut union = std::collections::BTreeSet::new();
    for n in nodes {
        let share = wait_for("each node's share", DEADLINE, || {
            let (_, d) = n.get("/api/admin/downloads");
            let list = d["downloads"].as_array()?.clone();
            (!list.is_empty() && list.iter().all(|d| d["status"] == "done")).then_some(list)
        });
        union.extend(share.iter().filter_map(|d| d["shard_index"].as_u64()));
    }
    assert_eq!(union.into_iter().collect::<Vec<_>>(), vec![0, 1, 2]);
    // Together they read about one file, not three.
    let read = server.cdn_bytes() - before;
    assert!(
        read < smol.size * 2,
        "three shares read {read} of {} bytes",
        smol.size
    );

    // One model: a request on any node runs through the three and says what the
    // whole model says.
    wait_for("smol servable through the swarm", DEADLINE, || {
        let (_, m) = a.get("/v1/models");
        m["data"]
            .as_array()?
            .iter()
            .find(|m| m["id"] == "smol" && m["meta"]["holders"].as_u64() == Some(3))
            .map(|_| ())
    });
    assert_eq!(chat(&a, Some("smol")), reference);
}

#[test]
fn a_killed_download_resumes_without_rereading_and_wrong_bytes_are_caught() {
    let scratch = tempfile::tempdir().expect("tempdir");
    let (server, smol) = hub(scratch.path());
    let lib = common::import_shards(3);
    let mut node = start_node(&server, scratch.path(), &[]);

    // Every shard: the whole file, SHA-256 checked. Slowed so it can be killed
    // half way.
    server
        .stats
        .throttle_us_per_64k
        .store(4000, Ordering::SeqCst);
    let body = json!({ "repo_id": REPO, "filename": smol.path, "shards": 3, "model_id": "smol" });
    let (status, v) = node.post("/api/admin/hf/download-shards", &body);
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["mode"], "whole");
    let part = node.dir().join("models/smol/source.gguf.part");
    wait_for("a third of the file", DEADLINE, || {
        (std::fs::metadata(&part).map(|m| m.len()).unwrap_or(0) > smol.size / 3).then_some(())
    });
    node.kill();
    let kept = std::fs::metadata(&part)
        .expect("the part file survives")
        .len();
    let before = server.cdn_bytes();
    server.stats.throttle_us_per_64k.store(0, Ordering::SeqCst);

    // On restart the node carries on by itself from where the file ends.
    node.restart();
    wait_for("the resumed download", DEADLINE, || {
        (held(&node, "smol") == vec![0, 1, 2]).then_some(())
    });
    let reread = server.cdn_bytes() - before;
    let rest = smol.size - kept;
    assert!(
        reread <= rest + (4 << 20),
        "after the restart {reread} bytes were read for the {rest} missing"
    );
    for f in [
        "manifest.json",
        "shard-000.gguf",
        "shard-001.gguf",
        "shard-002.gguf",
    ] {
        assert_eq!(
            blake3_of(&node.dir().join("models/smol").join(f)),
            blake3_of(&lib.path().join("models/smol").join(f)),
            "{f}"
        );
    }
    assert!(!part.exists(), "the whole file is dropped once split");

    // A server that sends wrong bytes: the SHA-256 catches it and nothing is kept.
    server
        .stats
        .corrupt_at
        .store(smol.size / 2, Ordering::SeqCst);
    let (status, v) = node.post(
        "/api/admin/hf/download-shards",
        &json!({ "repo_id": REPO, "filename": smol.path, "shards": 3, "model_id": "other" }),
    );
    assert_eq!(status, 200, "{v}");
    let failed = wait_for("the corrupt download to fail", DEADLINE, || {
        let (_, d) = node.get("/api/admin/downloads");
        d["downloads"]
            .as_array()?
            .iter()
            .find(|d| d["model_id"] == "other" && d["status"] == "failed")
            .cloned()
    });
    assert!(
        failed["error"]
            .as_str()
            .is_some_and(|e| e.contains("SHA-256")),
        "{failed}"
    );
    assert!(held(&node, "other").is_empty());
    assert!(!node.dir().join("models/other/shard-000.gguf").exists());
    // Nor are the shards split while it was checked.
    for i in 0..3 {
        let part = node
            .dir()
            .join(format!("models/other/shard-{i:03}.gguf.part"));
        assert!(!part.exists(), "{}", part.display());
    }
    assert_eq!(failed["rejected"], 1, "{failed}");

    // Cancelled: it stops, says so, and is not resumed by a restart.
    server.stats.corrupt_at.store(u64::MAX, Ordering::SeqCst);
    server
        .stats
        .throttle_us_per_64k
        .store(4000, Ordering::SeqCst);
    let (status, v) = node.post(
        "/api/admin/hf/download-shards",
        &json!({ "repo_id": REPO, "filename": smol.path, "shards": 3, "model_id": "third",
                 "shard_indices": [2] }),
    );
    assert_eq!(status, 200, "{v}");
    let (status, v) = node.post("/api/admin/downloads/third/cancel", &json!({}));
    assert_eq!((status, &v["cancelled"]), (200, &json!(1)), "{v}");
    wait_for("the cancelled download", DEADLINE, || {
        let (_, d) = node.get("/api/admin/downloads");
        d["downloads"]
            .as_array()?
            .iter()
            .any(|d| d["model_id"] == "third" && d["status"] == "cancelled")
            .then_some(())
    });
    node.restart();
    let (_, d) = node.get("/api/admin/downloads");
    assert!(
        !d["downloads"]
            .as_array()
            .is_some_and(|l| l.iter().any(|d| d["model_id"] == "third")),
        "{d}"
    );
}

#[test]
fn a_file_already_in_the_hugging_face_cache_is_split_without_downloading() {
    let scratch = tempfile::tempdir().expect("tempdir");
    let (server, smol) = hub(scratch.path());
    // The layout the Python client and hf-hub share: refs/main names the commit,
    // snapshots/<commit>/<file> is the file.
    let repo_dir = scratch
        .path()
        .join("hub")
        .join(format!("models--{}", REPO.replace('/', "--")));
    let commit = Repo::new(REPO, Vec::new()).sha;
    std::fs::create_dir_all(repo_dir.join("refs")).expect("mkdir");
    std::fs::write(repo_dir.join("refs/main"), &commit).expect("ref");
    let snapshot = repo_dir.join("snapshots").join(&commit);
    std::fs::create_dir_all(&snapshot).expect("mkdir");
    let cached = snapshot.join(&smol.path);
    if std::fs::hard_link(model_path(), &cached).is_err() {
        std::fs::copy(model_path(), &cached).expect("copy");
    }
    let node = start_node(&server, scratch.path(), &[]);
    let before = server.cdn_bytes();
    let (status, v) = node.post(
        "/api/admin/hf/download-shards",
        &json!({ "repo_id": REPO, "filename": smol.path, "shard_indices": [2], "shards": 3,
                 "model_id": "smol" }),
    );
    assert_eq!(status, 200, "{v}");
    wait_for("shard 2 from the cache", DEADLINE, || {
        (held(&node, "smol") == vec![2]).then_some(())
    });
    // Only the header crossed the network (for the manifest).
    let read = server.cdn_bytes() - before;
    assert!(read < 8 << 20, "{read} bytes read from the CDN");
    assert!(node.log().contains("Hugging Face cache"));
}

#[test]
fn a_multi_part_model_on_the_hub_is_fetched_by_ranges_or_whole_like_a_local_import() {
    let scratch = tempfile::tempdir().expect("tempdir");
    let parts = swarmllm_node::shard::parts::write_split(&model_path(), scratch.path(), 2)
        .expect("split the test model in two parts");
    let served: Vec<ServedFile> = parts
        .iter()
        .map(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).expect("name");
            ServedFile::new(name, p).expect("serve")
        })
        .collect();
    let total: u64 = served.iter().map(|f| f.size).sum();
    let first = served[0].path.clone();
    let mut repo = Repo::new("acme/SmolLM2-split-GGUF", served);
    repo.architecture = Some("llama".into());
    let server = HubServer::start(vec![repo]).expect("hub server");

    // What `models import` makes of the parts on disk.
    let lib = tempfile::tempdir().expect("tempdir");
    let (ok, out, err) = cli(
        lib.path(),
        1,
        &[
            "models",
            "import",
            parts[0].to_str().expect("utf-8"),
            "--shards",
            "3",
            "--id",
            "smol",
        ],
    );
    assert!(ok, "{out}{err}");
    let theirs = lib.path().join("models/smol");

    let node = start_node(&server, scratch.path(), &[]);
    let (status, p) = node.get(&query(
        "/api/admin/hf/probe",
        &[("repo_id", "acme/SmolLM2-split-GGUF"), ("filename", &first)],
    ));
    assert_eq!(status, 200, "{p}");
    assert_eq!(p["parts"].as_array().map(Vec::len), Some(2), "{p}");
    assert_eq!(p["size_bytes"], total);
    assert_eq!(p["model_id"], "smollm2-135m-instruct.q4_1");

    let before = server.cdn_bytes();
    let (ok, out, err) = cli(
        node.dir(),
        node.port,
        &[
            "models",
            "pull",
            "acme/SmolLM2-split-GGUF",
            "--file",
            &first,
            "--shards",
            "1",
            "--split",
            "3",
            "--id",
            "smol",
        ],
    );
    assert!(ok, "{out}{err}");
    let read = server.cdn_bytes() - before;
    assert!(
        read < total / 2,
        "one shard of three read {read} of {total} bytes"
    );
    let mine = node.dir().join("models/smol");
    for f in ["manifest.json", "gguf_header.bin", "shard-001.gguf"] {
        assert_eq!(blake3_of(&mine.join(f)), blake3_of(&theirs.join(f)), "{f}");
    }

    // Every shard: both parts whole, each against its SHA-256.
    let (status, v) = node.post(
        "/api/admin/hf/download-shards",
        &json!({ "repo_id": "acme/SmolLM2-split-GGUF", "filename": first, "shards": 3,
                 "model_id": "whole" }),
    );
    assert_eq!((status, &v["mode"]), (200, &json!("whole")), "{v}");
    wait_for("the whole split model", DEADLINE, || {
        (held(&node, "whole") == vec![0, 1, 2]).then_some(())
    });
    for f in ["shard-000.gguf", "shard-001.gguf", "shard-002.gguf"] {
        assert_eq!(
            blake3_of(&node.dir().join("models/whole").join(f)),
            blake3_of(&theirs.join(f)),
            "{f}"
        );
    }
}

#[test]
fn auto_manage_fetches_a_shard_nobody_holds_from_the_hub() {
    let scratch = tempfile::tempdir().expect("tempdir");
    let (server, smol) = hub(scratch.path());
    let mut env = hub_env(&server, scratch.path());
    env.push(("SWARMLLM_AUTO_MANAGE_INTERVAL_SECS".into(), "1".into()));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let node = TestNode::start_custom(false, &[], &env, |_| {});

    // The user takes shard 0 of 3; auto-manage is off, so nothing else comes.
    let (ok, out, err) = cli(
        node.dir(),
        node.port,
        &[
            "models", "pull", REPO, "--file", &smol.path, "--shards", "0", "--split", "3", "--id",
            "smol",
        ],
    );
    assert!(ok, "{out}{err}");
    assert_eq!(held(&node, "smol"), vec![0]);

    // With auto-manage on for the model, the shard no peer holds comes from the
    // Hub (its byte ranges); shard 1 never, being next to shard 0.
    let before = server.cdn_bytes();
    let (s, v) = node.call(
        reqwest::Method::PUT,
        "/api/admin/models/smol/auto-manage",
        &json!({ "enabled": true }),
    );
    assert_eq!(
        (s, &v["enabled"], &v["trust_level"]),
        (200, &json!(true), &json!("Pinned")),
        "{v}"
    );
    node.wait_logged(
        "shard 2 fetched from the Hub",
        Duration::from_secs(120),
        || {
            let h = held(&node, "smol");
            if h == [0, 2] {
                Ok(())
            } else {
                Err(format!("{h:?}"))
            }
        },
    );
    let (_, d) = node.get("/api/admin/downloads");
    assert!(
        d["downloads"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|x| x["shard_index"] == 2
                && x["source"] == "huggingface"
                && x["status"] == "done"),
        "{d}"
    );
    // Only that shard's byte ranges crossed the network (and a header probe).
    let shard_bytes = node.get("/api/admin/models/smol/status").1["shards"][2]["bytes"]
        .as_u64()
        .expect("shard size");
    let read = server.cdn_bytes() - before;
    assert!(
        read >= shard_bytes && read < shard_bytes + 4 * 1_048_576 && read < smol.size,
        "read {read} bytes for a shard of {shard_bytes}"
    );
    // The loop notes the fetch it started as done on its next round.
    node.wait_logged("the acquisition counted", Duration::from_secs(60), || {
        let (_, st) = node.get("/api/admin/stats");
        if st["auto_manage"]["acquisitions"].as_u64().unwrap_or(0) >= 1 {
            Ok(())
        } else {
            Err(st["auto_manage"].to_string())
        }
    });
}
