#![no_main]
//! `swarmllm_node::fuzzing::step_result`. With `SWARMLLM_FUZZ_SEEDS=DIR` set, the seed
//! corpus (real messages) is written into DIR before fuzzing starts.

libfuzzer_sys::fuzz_target!(
    init: swarmllm_node::fuzzing::write_seeds_from_env("step_result"),
    |data: &[u8]| swarmllm_node::fuzzing::step_result(data)
);
