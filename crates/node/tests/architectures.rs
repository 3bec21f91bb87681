//! Every architecture the splitter claims (`shard::SPLIT_ARCHITECTURES`) is proven
//! exact: a tiny random-weight model of it, written here, split 2 and 3 ways,
//! gives the whole model's logits bit for bit through the chain of ranges, with a
//! prompt longer than its sliding window where it has one.

mod common;

use common::{assert_split_is_exact, tiny};

const PROMPT: &str = "<|im_start|>user\nName three rivers and the seas they flow into, please.<|im_end|>\n<|im_start|>assistant\n";

fn split_is_exact(arch: &str) {
    assert!(
        swarmllm_node::shard::splittable(arch),
        "{arch} is tested but not listed as splittable"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join(format!("tiny-{arch}.gguf"));
    tiny::write(arch, &path);
    for shards in [2, 3] {
        assert_split_is_exact(&path, shards, PROMPT);
    }
}

#[test]
fn qwen3() {
    split_is_exact("qwen3");
}

#[test]
fn qwen3moe() {
    split_is_exact("qwen3moe");
}

#[test]
fn gemma3() {
    split_is_exact("gemma3");
}

#[test]
fn phi3() {
    split_is_exact("phi3");
}

#[test]
fn mistral3() {
    split_is_exact("mistral3");
}

#[test]
fn olmo2() {
    split_is_exact("olmo2");
}

#[test]
fn granite() {
    split_is_exact("granite");
}

#[test]
fn gpt_oss() {
    split_is_exact("gpt-oss");
}

#[test]
fn every_listed_architecture_is_tested() {
    // llama (SmolLM2) and qwen2 are proven in tests/shards.rs.
    let tested = [
        "llama", "qwen2", "qwen3", "qwen3moe", "gemma3", "phi3", "mistral3", "olmo2", "granite",
        "gpt-oss",
    ];
    for arch in swarmllm_node::shard::SPLIT_ARCHITECTURES {
        assert!(
            tested.contains(arch),
            "{arch} is splittable but has no exactness test"
        );
    }
}
