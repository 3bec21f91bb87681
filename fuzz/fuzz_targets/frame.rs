#![no_main]
//! `swarmllm_node::fuzzing::frame`. With `SWARMLLM_FUZZ_SEEDS=DIR` set, the seed
//! corpus (real messages) is written into DIR before fuzzing starts.

libfuzzer_sys::fuzz_target!(
    init: swarmllm_node::fuzzing::write_seeds_from_env("frame"),
    |data: &[u8]| swarmllm_node::fuzzing::frame(data)
);
