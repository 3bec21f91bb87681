//! The range host's session rules on the real test model: limits on sessions and
//! on their memory, rollback, refused gaps and replays, idle expiry.

use std::time::{Duration, Instant};

use swarmllm_node::pipeline::host::{
    HostConfig, HostError, RangeHost, RangeInfo, Step, StepInput, StepOutput,
};
use swarmllm_node::pipeline::wire::{SampleSpec, Sampled};
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
        gpu_layers: swarmllm_node::config::GpuLayers::Count(0),
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
        gpu_layers: 0,
    }))
    .expect("load");
    (host, dir)
}

fn step(session: u8, seq: u64, pos: u32, tokens: &[i32]) -> Step {
    Step {
        peer: "requester".into(),
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
            json_schema: None,
            logprobs: None,
        }),
        prime: vec![],
        draft: 0,
        continues: None,
    }
}

#[test]
fn the_last_hop_returns_log_probabilities_only_within_bounds() {
    let (host, _dir) = host(4, u64::MAX, Duration::from_secs(60));
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("rt");
    let prompt = [1, 504, 3158, 282, 4649, 314];
    let run = |s: Step| rt.block_on(host.step(s));
    let StepOutput::Token(Some(Sampled { token: t1, .. })) =
        run(step(3, 1, 0, &prompt)).expect("plain prompt")
    else {
        panic!("no token")
    };
    // Asked for, the last hop returns the token's log-probability and the
    // alternatives; greedy sampled the most likely one.
    let mut asked = step(1, 1, 0, &prompt);
    if let Some(spec) = asked.sample.as_mut() {
        spec.logprobs = Some(2);
    }
    let out = run(asked).expect("prompt with logprobs");
    let StepOutput::Token(Some(Sampled {
        token,
        logprobs: Some((lp, top)),
        ..
    })) = &out
    else {
        panic!("{out:?}")
    };
    assert_eq!((*token, top.len(), top[0].0), (t1, 2, t1), "{out:?}");
    assert!(
        *lp <= 0.0 && (lp - top[0].1).abs() < 1e-6 && top[0].1 >= top[1].1,
        "{out:?}"
    );
    // More alternatives than the API allows are refused.
    let mut greedy = step(2, 1, 0, &prompt);
    if let Some(spec) = greedy.sample.as_mut() {
        spec.logprobs = Some(21);
    }
    let r = run(greedy);
    assert!(
        matches!(&r, Err(HostError::Forbidden(m)) if m.contains("top_logprobs")),
        "{r:?}"
    );
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
    let StepOutput::Token(Some(Sampled { token: t1, .. })) = first else {
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
    host.close([1; 16], "requester");
    let deadline = Instant::now() + Duration::from_secs(10);
    while host.session_count() > 0 {
        assert!(Instant::now() < deadline, "close did not free the session");
        std::thread::sleep(Duration::from_millis(20));
    }
    rt.block_on(host.step(step(2, 1, 0, &prompt)))
        .expect("room after close");
}

#[test]
fn a_peer_cannot_use_another_peers_session_or_send_out_of_range_numbers() {
    let (host, _dir) = host(8, u64::MAX, Duration::from_secs(300));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("rt");
    let run = |s: Step| rt.block_on(host.step(s));
    let prompt = [1, 504, 3158];
    let StepOutput::Token(Some(Sampled { token: t, .. })) =
        run(step(1, 1, 0, &prompt)).expect("owner's prompt")
    else {
        panic!("no token")
    };

    // Another peer can neither step nor close the session.
    let mut stranger = step(1, 2, 3, &[t]);
    stranger.peer = "stranger".into();
    match run(stranger) {
        Err(HostError::Forbidden(m)) => assert!(m.contains("another peer"), "{m}"),
        other => panic!("a stranger stepped the session: {other:?}"),
    }
    host.close([1; 16], "stranger");
    // The owner's next step still finds its session (a close by a stranger would
    // have dropped it, and position 3 of an unknown session is refused).
    run(step(1, 3, 3, &[t])).expect("the owner's session survived");
    // Nor can a stranger's new session take the owner's cache over.
    let mut takeover = step(2, 1, 3, &[t]);
    takeover.peer = "stranger".into();
    takeover.continues = Some([1; 16]);
    match run(takeover) {
        Err(HostError::Forbidden(m)) => assert!(m.contains("another peer"), "{m}"),
        other => panic!("a stranger took the session over: {other:?}"),
    }
    // The owner's new session can (a conversation's next turn): it keeps the
    // first 3 positions and goes on from there.
    let mut next_turn = step(3, 1, 3, &[t]);
    next_turn.continues = Some([1; 16]);
    run(next_turn).expect("the owner's next turn continues its session");
    // The old session is gone: taken over, not copied.
    assert!(run(step(1, 4, 4, &[t])).is_err());

    // Sampling numbers a peer sends pass the HTTP API's validation.
    type Spoil = fn(&mut SampleSpec);
    let bad_specs: [(&str, Spoil); 5] = [
        ("repeat_last_n", |s| s.repeat_last_n = i32::MAX),
        ("top_k", |s| s.top_k = i32::MAX),
        ("temperature", |s| s.temperature = f32::NAN),
        ("top_p", |s| s.top_p = f32::INFINITY),
        ("repeat_penalty", |s| s.repeat_penalty = -1.0),
    ];
    for (i, (field, spoil)) in bad_specs.into_iter().enumerate() {
        let mut s = step(10 + i as u8, 1, 0, &prompt);
        if let Some(spec) = s.sample.as_mut() {
            spoil(spec);
        }
        match run(s) {
            Err(HostError::Forbidden(m)) => assert!(m.contains(field), "{field}: {m}"),
            other => panic!("{field} accepted: {other:?}"),
        }
    }
    // Primed tokens: within the vocabulary and the context.
    let mut s = step(20, 1, 0, &prompt);
    s.prime = vec![-5];
    assert!(matches!(run(s), Err(HostError::Forbidden(_))));
    let mut s = step(21, 1, 0, &prompt);
    s.prime = vec![1; 513];
    assert!(matches!(run(s), Err(HostError::Forbidden(_))));
    // None of the refused steps left a session behind: only the owner's.
    assert_eq!(host.session_count(), 1);
}

#[test]
fn a_schema_constrains_sampling_and_primed_tokens_it_forbids_are_refused() {
    let (host, _dir) = host(8, u64::MAX, Duration::from_secs(60));
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("rt");
    let run = |s: Step| rt.block_on(host.step(s));
    let schema = r#"{"type":"object","properties":{"answer":{"type":"string","enum":["yes","no"]}},"required":["answer"],"additionalProperties":false}"#;
    let constrained = |session: u8, prime: Vec<i32>| {
        let mut s = step(session, 1, 0, &[1, 504, 3158, 282, 4649, 314]);
        if let Some(spec) = s.sample.as_mut() {
            spec.json_schema = Some(schema.into());
        }
        s.prime = prime;
        // A requester each: a peer may hold only a few sessions.
        s.peer = format!("requester-{session}");
        s
    };
    // A session under the schema samples; a taken-over one primed with the
    // tokens the grammar allowed so far goes on.
    let StepOutput::Token(Some(Sampled { token: first, .. })) =
        run(constrained(1, vec![])).expect("sample")
    else {
        panic!("no token")
    };
    run(constrained(2, vec![first])).expect("allowed primes");
    // Primed tokens the grammar forbids (a special token, end-of-turn before the
    // object closed) are refused, never accepted: llama.cpp would abort.
    for bad in [vec![1], vec![first, 2]] {
        let r = run(constrained(3 + bad.len() as u8, bad.clone()));
        assert!(
            matches!(&r, Err(HostError::Forbidden(m)) if m.contains("not allowed by the grammar")),
            "{bad:?}: {r:?}"
        );
    }
    // A schema llama.cpp cannot convert is refused too, and the host serves on.
    let mut broken = constrained(9, vec![]);
    if let Some(spec) = broken.sample.as_mut() {
        spec.json_schema = Some("{\"type\": \"no-such-type\"}".into());
    }
    let r = run(broken);
    assert!(matches!(r, Err(HostError::Forbidden(_))), "{r:?}");
    run(step(10, 1, 0, &[1, 504, 3158])).expect("still serving");
}
