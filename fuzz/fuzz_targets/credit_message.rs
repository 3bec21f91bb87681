#![no_main]
//! `swarmllm_node::fuzzing::credit_message`. With `SWARMLLM_FUZZ_SEEDS=DIR` set, the seed
//! corpus (real messages) is written into DIR before fuzzing starts.

libfuzzer_sys::fuzz_target!(
    init: swarmllm_node::fuzzing::write_seeds_from_env("credit_message"),
    |data: &[u8]| swarmllm_node::fuzzing::credit_message(data)
);
