//! The range host's session rules on the real test model: limits on sessions and
//! on their memory, rollback, refused gaps and replays, idle expiry.

use std::time::{Duration, Instant};

use swarmllm_node::pipeline::host::{
    HostConfig, HostError, RangeHost, RangeInfo, Step, StepInput, StepOutput,
};
use swarmllm_node::pipeline::wire::SampleSpec;
use swarmllm_node::shard::{self, library};

fn host(
    max_sessions: usize,
    max_session_bytes: u64,
    ttl: Duration,
) -> (RangeHost, tempfile::TempDir) {
    let model =
        swarmllm_node::paths::test_model("SWARMLLM_TEST_MODEL", "SmolLM2-135M-Instruct.Q4_1.gguf")
            .expect("test model missing: run scripts/fetch-test-model");
    let dir = tempfile::tempdir().expect("tempdir");
    shard::import(&model, dir.path(), "m", 1, |_, _| {}).expect("import");
    let local = library::inspect(&dir.path().join("m")).expect("inspect");
    let path = library::range_file(&local, &dir.path().join("ranges"), 0, 0).expect("range");
    let host = RangeHost::start(HostConfig {
        threads: 1,
        context_size: 512,
        batch_size: 512,
        max_sessions,
        max_session_bytes,
        session_ttl: ttl,
        gpu_layers: 0,
        poll: Duration::from_millis(50),
    })
    .expect("host");
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("rt");
    rt.block_on(host.load(RangeInfo {
        model_id: "m".into(),
        first_shard: 0,
        last_shard: 0,
        layer_start: 0,
        layer_end: 30,
        n_layers: 30,
        has_embedding: true,
        has_head: true,
        path,
        ms_per_layer: None,
    }))
    .expect("load");
    (host, dir)
}

fn step(session: u8, seq: u64, pos: u32, tokens: &[i32]) -> Step {
    Step {
        session: [session; 16],
        seq,
        model_id: "m".into(),
        layer_start: 0,
        layer_end: 30,
        pos,
        input: StepInput::Tokens(tokens.to_vec()),
        sample: Some(SampleSpec {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            seed: 1,
        }),
        prime: vec![],
    }
}

#[test]
fn sessions_are_limited_rolled_back_and_expired() {
    let (host, _dir) = host(2, u64::MAX, Duration::from_secs(2));
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("rt");
    let prompt = [1, 504, 3158, 282, 4649, 314];
    let run = |s: Step| rt.block_on(host.step(s));

    let first = run(step(1, 1, 0, &prompt)).expect("prompt");
    let StepOutput::Token(Some(t1)) = first else {
        panic!("{first:?}")
    };
    let second = run(step(1, 2, 6, &[t1])).expect("decode");
    // Rollback: the same position again gives the same token.
    assert_eq!(run(step(1, 3, 6, &[t1])).expect("replay"), second);
    // A gap, a repeated step number and an unknown range are refused.
    assert!(matches!(
        run(step(1, 4, 99, &[t1])),
        Err(HostError::BadStep(_))
    ));
    assert!(matches!(
        run(step(1, 3, 7, &[t1])),
        Err(HostError::BadStep(_))
    ));
    let mut other = step(1, 9, 7, &[t1]);
    other.layer_end = 10;
    assert!(matches!(run(other), Err(HostError::NotHeld { .. })));
    // A token outside the vocabulary is an error, not a crash.
    assert!(matches!(
        run(step(3, 1, 0, &[i32::MAX])),
        Err(HostError::BadStep(_))
    ));

    // Two sessions at most.
    run(step(2, 1, 0, &prompt)).expect("second session");
    assert_eq!(host.session_count(), 2);
    assert!(matches!(
        run(step(4, 1, 0, &prompt)),
        Err(HostError::Busy(_))
    ));
    // Idle sessions expire.
    let deadline = Instant::now() + Duration::from_secs(30);
    while host.session_count() > 0 {
        assert!(Instant::now() < deadline, "sessions never expired");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(matches!(
        run(step(1, 10, 7, &[t1])),
        Err(HostError::BadStep(_))
    ));
    run(step(4, 1, 0, &prompt)).expect("room again");
}

#[test]
fn session_memory_has_a_budget() {
    // SmolLM2 keeps 30 layers × 3 KV heads × 64 dims × (K, V) × 2 bytes = 23 040
    // bytes a token; a 512-token session needs 11.25 MiB. 16 MiB holds one.
    let (host, _dir) = host(16, 16 << 20, Duration::from_secs(300));
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("rt");
    let prompt = [1, 504, 3158];
    rt.block_on(host.step(step(1, 1, 0, &prompt)))
        .expect("first");
    assert!(matches!(
        rt.block_on(host.step(step(2, 1, 0, &prompt))),
        Err(HostError::Busy(1))
    ));
    host.close([1; 16]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while host.session_count() > 0 {
        assert!(Instant::now() < deadline, "close did not free the session");
        std::thread::sleep(Duration::from_millis(20));
    }
    rt.block_on(host.step(step(2, 1, 0, &prompt)))
        .expect("room after close");
}
