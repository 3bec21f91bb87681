//! What the shard tests share: the test model, and the exactness check of a split
//! (every range chained gives the whole model's logits bit for bit).
#![allow(dead_code, unreachable_pub)]

pub mod requant;
pub mod tiny;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use swarmllm_node::shard;

pub fn model_path() -> PathBuf {
    swarmllm_node::paths::test_model("SWARMLLM_TEST_MODEL", "SmolLM2-135M-Instruct.Q4_1.gguf")
        .expect("test model missing: run scripts/fetch-test-model (or set SWARMLLM_TEST_MODEL)")
}

pub fn argmax(v: &[f32]) -> i32 {
    v.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map(|(i, _)| i as i32)
        .expect("non-empty")
}

/// Splits `source` into `shards`, runs the prompt and 16 greedy steps through the
/// whole model and through the chain of ranges, and asserts the logits are equal
/// at every step (then that a rolled-back chain replays the same logits).
pub fn assert_split_is_exact(source: &Path, shards: u32, prompt: &str) {
    assert_split_is_exact_on(source, shards, &[prompt]);
}

/// [`assert_split_is_exact`] for several prompts in turn: each runs on a fresh
/// whole-model session, while the chain's contexts are emptied and reused (as a
/// range host reuses them), so a reused context must be as exact as a new one.
pub fn assert_split_is_exact_on(source: &Path, shards: u32, prompts: &[&str]) {
    use swarmllm_node::infer::layers::{RangeModel, RangeSession};
    // llama.cpp's own messages (why a range would not load) show with a failure.
    let _ = tracing_subscriber::fmt()
        .with_env_filter("warn")
        .with_test_writer()
        .try_init();
    let models = tempfile::tempdir().expect("tempdir");
    let manifest = shard::import(source, models.path(), "m", shards, |_, _| {}).expect("import");
    let dir = models.path().join("m");
    let range_file = |first: u32, last: u32| {
        let out = models.path().join(format!("range-{first}-{last}.gguf"));
        shard::assemble(&dir, &manifest, first, last, &out).expect("assemble");
        out
    };
    let whole = Arc::new(RangeModel::load(&range_file(0, shards - 1), 0).expect("whole"));
    let parts: Vec<Arc<RangeModel>> = (0..shards)
        .map(|i| Arc::new(RangeModel::load(&range_file(i, i), 0).expect("part")))
        .collect();
    let layers: Vec<u32> = manifest
        .shards
        .iter()
        .map(|s| s.layer_end - s.layer_start)
        .collect();
    assert_eq!(
        parts.iter().map(|p| p.n_layer()).collect::<Vec<_>>(),
        layers
    );

    let mut chain: Vec<RangeSession> = parts
        .iter()
        .enumerate()
        .map(|(i, m)| {
            m.session(2048, 512, 1, i + 1 < parts.len())
                .expect("session")
        })
        .collect();
    for (n, prompt) in prompts.iter().enumerate() {
        if n > 0 {
            chain.iter_mut().for_each(RangeSession::reset);
        }
        let mut whole_s = whole.session(2048, 512, 1, false).expect("session");
        prompt_is_exact(&parts, &mut whole_s, &mut chain, prompt);
    }
}

fn prompt_is_exact(
    parts: &[Arc<swarmllm_node::infer::layers::RangeModel>],
    whole_s: &mut swarmllm_node::infer::layers::RangeSession,
    chain: &mut [swarmllm_node::infer::layers::RangeSession],
    prompt: &str,
) {
    use swarmllm_node::infer::layers::{RangeInput, RangeOutput};
    let tokens = parts[0].tokenize(prompt).expect("tokenize");
    assert!(tokens.len() > 10);
    // The prompt goes in 256-token chunks (a long prompt crosses gemma3's 512-token
    // window, so global and windowed layers really differ).
    let mut expected = Vec::new();
    let mut got = Vec::new();
    for (i, chunk) in tokens.chunks(256).enumerate() {
        let pos = (i * 256) as i32;
        let RangeOutput::Logits(e) = whole_s
            .forward(RangeInput::Tokens(chunk), pos)
            .expect("whole")
        else {
            panic!("expected logits")
        };
        expected = e;
        got = run_chain(chain, chunk, pos);
    }
    let prompt_len = tokens.len() as i32;
    let first_next = argmax(&expected);
    let mut first_after = Vec::new();
    for step in 0..16 {
        let pos = prompt_len + step;
        let max_diff = expected
            .iter()
            .zip(&got)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert_eq!(max_diff, 0.0, "logits differ at step {step}");
        let next = argmax(&expected);
        assert_eq!(argmax(&got), next, "token differs at step {step}");
        let RangeOutput::Logits(e) = whole_s
            .forward(RangeInput::Tokens(&[next]), pos)
            .expect("whole")
        else {
            panic!("expected logits")
        };
        expected = e;
        got = run_chain(chain, &[next], pos);
        if step == 0 {
            first_after = got.clone();
        }
    }

    // Rollback: forget everything after the prompt and replay the first generated
    // token; the chain must give the same logits as the first time.
    for s in chain.iter_mut() {
        s.truncate(tokens.len() as i32);
    }
    let again = run_chain(chain, &[first_next], tokens.len() as i32);
    assert_eq!(again, first_after);
}

/// Runs `tokens` at `pos` through the chain of ranges: the last one's logits.
fn run_chain(
    chain: &mut [swarmllm_node::infer::layers::RangeSession],
    tokens: &[i32],
    pos: i32,
) -> Vec<f32> {
    use swarmllm_node::infer::layers::{RangeInput, RangeOutput};
    let mut out = chain[0]
        .forward(RangeInput::Tokens(tokens), pos)
        .expect("first");
    for s in chain.iter_mut().skip(1) {
        let RangeOutput::Hidden(h) = out else {
            panic!("expected hidden states")
        };
        out = s.forward(RangeInput::Hidden(&h), pos).expect("next");
    }
    match out {
        RangeOutput::Logits(l) => l,
        RangeOutput::Hidden(_) => panic!("expected logits"),
    }
}
