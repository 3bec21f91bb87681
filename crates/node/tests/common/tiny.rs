//! Tiny random-weight GGUFs of llama.cpp architectures, written at test time.
//!
//! The registries hold no small model of most architectures, so each is built
//! here: the tensors llama.cpp's loader asks for (from its `load_arch_tensors`),
//! at toy size (64-wide, 6 layers), with SmolLM2's tokenizer and fixed
//! pseudo-random weights, plus what makes each architecture itself — q/k norms,
//! post-norms, fused QKV and up/gate, MoE experts with and without biases,
//! attention sinks, sliding windows short enough for a prompt to cross them,
//! embedding, residual and logit scales.

use std::path::Path;

use swarmllm_node::shard::gguf::{self, Gguf, TensorSource, Value};

const EMBD: u64 = 64;
const HEADS: u64 = 4;
const HEADS_KV: u64 = 2;
const HEAD_DIM: u64 = EMBD / HEADS;
const FF: u64 = 128;
const EXPERTS: u64 = 4;
const FF_EXP: u64 = 32;
pub const LAYERS: u32 = 6;

/// The parts of one layer an architecture has.
#[derive(Clone, Copy, PartialEq)]
enum Part {
    AttnNorm,
    Qkv,
    QkvBias,
    QkvFused,
    Out,
    OutBias,
    QkNormPerHead,
    QkNormFull,
    AttnPostNorm,
    Sinks,
    FfnNorm,
    Ffn,
    FfnFusedUp,
    Moe,
    MoeBias,
    FfnPostNorm,
}

struct Spec {
    parts: &'static [Part],
    tied: bool,
    extra: Vec<(&'static str, Value)>,
}

fn spec(arch: &str) -> Spec {
    use Part::*;
    let window = ("attention.sliding_window", Value::U32(8));
    match arch {
        "qwen2" => Spec {
            parts: &[AttnNorm, Qkv, QkvBias, Out, FfnNorm, Ffn],
            tied: true,
            extra: vec![],
        },
        "qwen3" => Spec {
            parts: &[AttnNorm, Qkv, Out, QkNormPerHead, FfnNorm, Ffn],
            tied: true,
            extra: vec![],
        },
        "qwen3moe" => Spec {
            parts: &[AttnNorm, Qkv, Out, QkNormPerHead, FfnNorm, Moe],
            tied: true,
            extra: vec![
                ("expert_count", Value::U32(EXPERTS as u32)),
                ("expert_used_count", Value::U32(2)),
                ("expert_feed_forward_length", Value::U32(FF_EXP as u32)),
            ],
        },
        "gemma2" => Spec {
            parts: &[AttnNorm, Qkv, Out, AttnPostNorm, FfnNorm, Ffn, FfnPostNorm],
            tied: true,
            extra: vec![
                window,
                ("attn_logit_softcapping", Value::F32(50.0)),
                ("final_logit_softcapping", Value::F32(30.0)),
            ],
        },
        "gemma3" => Spec {
            parts: &[
                AttnNorm,
                Qkv,
                Out,
                AttnPostNorm,
                QkNormPerHead,
                FfnNorm,
                Ffn,
                FfnPostNorm,
            ],
            tied: true,
            // Every third layer global, so a 6-layer model has two periods.
            extra: vec![window, ("attention.sliding_window_pattern", Value::U32(3))],
        },
        "phi3" => Spec {
            parts: &[AttnNorm, QkvFused, Out, FfnNorm, FfnFusedUp],
            tied: false,
            extra: vec![],
        },
        "mistral3" => Spec {
            parts: &[AttnNorm, Qkv, Out, FfnNorm, Ffn],
            tied: false,
            extra: vec![],
        },
        "olmo2" => Spec {
            parts: &[Qkv, Out, QkNormFull, AttnPostNorm, Ffn, FfnPostNorm],
            tied: false,
            // A window makes olmo2 alternate 3 windowed layers and 1 global one.
            extra: vec![window],
        },
        "granite" => Spec {
            parts: &[AttnNorm, Qkv, Out, FfnNorm, Ffn],
            tied: true,
            extra: vec![
                ("logit_scale", Value::F32(8.0)),
                ("residual_scale", Value::F32(0.22)),
                ("embedding_scale", Value::F32(12.0)),
                ("attention.scale", Value::F32(0.0078125)),
            ],
        },
        "gpt-oss" => Spec {
            parts: &[
                AttnNorm,
                AttnPostNorm,
                Qkv,
                Out,
                OutBias,
                Sinks,
                Moe,
                MoeBias,
            ],
            tied: false,
            extra: vec![
                window,
                ("expert_count", Value::U32(EXPERTS as u32)),
                ("expert_used_count", Value::U32(2)),
                ("expert_feed_forward_length", Value::U32(FF_EXP as u32)),
            ],
        },
        other => panic!("no tiny spec for {other}"),
    }
}

/// Writes a tiny `arch` model to `path`.
pub fn write(arch: &str, path: &Path) {
    let spec = spec(arch);
    let src = Gguf::read_header(&super::model_path()).expect("tokenizer source");
    let n_vocab = match src.get("tokenizer.ggml.tokens") {
        Some(Value::Array(_, items)) => items.len() as u64,
        _ => panic!("no vocabulary in the tokenizer source"),
    };
    let k = |name: &str| format!("{arch}.{name}");
    let mut kv: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::Str(arch.into())),
        // Not named after the architecture: llama.cpp's vocabulary loader treats a
        // model named "phi3" specially (it looks for phi3's own special tokens).
        ("general.name".into(), Value::Str("tiny test model".into())),
        (k("context_length"), Value::U32(2048)),
        (k("embedding_length"), Value::U32(EMBD as u32)),
        (k("block_count"), Value::U32(LAYERS)),
        (k("feed_forward_length"), Value::U32(FF as u32)),
        (k("attention.head_count"), Value::U32(HEADS as u32)),
        (k("attention.head_count_kv"), Value::U32(HEADS_KV as u32)),
        (k("rope.freq_base"), Value::F32(10_000.0)),
        (k("attention.layer_norm_rms_epsilon"), Value::F32(1e-6)),
    ];
    kv.extend(spec.extra.iter().map(|(name, v)| (k(name), v.clone())));
    kv.extend(
        src.kv
            .iter()
            .filter(|(key, _)| key.starts_with("tokenizer."))
            .cloned(),
    );
    // A fixed LCG: the same weights on every run, no extra dependency.
    let mut state = 0x2545_f491_4f6c_dd1du64 ^ arch.len() as u64;
    let mut random = |n: u64| -> Vec<f32> {
        (0..n)
            .map(|_| {
                state = state
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.1
            })
            .collect()
    };
    let mut tensors = vec![TensorSource::f32(
        "token_embd.weight",
        vec![EMBD, n_vocab],
        &random(EMBD * n_vocab),
    )];
    let q_dim = HEADS * HEAD_DIM;
    let kv_dim = HEADS_KV * HEAD_DIM;
    for l in 0..LAYERS {
        let mut add = |name: &str, dims: Vec<u64>, ones: bool| {
            let n: u64 = dims.iter().product();
            let values = if ones {
                vec![1.0f32; n as usize]
            } else {
                random(n)
            };
            tensors.push(TensorSource::f32(&format!("blk.{l}.{name}"), dims, &values));
        };
        for part in spec.parts {
            match part {
                Part::AttnNorm => add("attn_norm.weight", vec![EMBD], true),
                Part::Qkv => {
                    add("attn_q.weight", vec![EMBD, q_dim], false);
                    add("attn_k.weight", vec![EMBD, kv_dim], false);
                    add("attn_v.weight", vec![EMBD, kv_dim], false);
                }
                Part::QkvBias => {
                    add("attn_q.bias", vec![q_dim], false);
                    add("attn_k.bias", vec![kv_dim], false);
                    add("attn_v.bias", vec![kv_dim], false);
                }
                Part::QkvFused => add("attn_qkv.weight", vec![EMBD, q_dim + 2 * kv_dim], false),
                Part::Out => add("attn_output.weight", vec![q_dim, EMBD], false),
                Part::OutBias => add("attn_output.bias", vec![EMBD], false),
                Part::QkNormPerHead => {
                    add("attn_q_norm.weight", vec![HEAD_DIM], true);
                    add("attn_k_norm.weight", vec![HEAD_DIM], true);
                }
                Part::QkNormFull => {
                    add("attn_q_norm.weight", vec![q_dim], true);
                    add("attn_k_norm.weight", vec![kv_dim], true);
                }
                Part::AttnPostNorm => add("post_attention_norm.weight", vec![EMBD], true),
                Part::Sinks => add("attn_sinks.weight", vec![HEADS], false),
                Part::FfnNorm => add("ffn_norm.weight", vec![EMBD], true),
                Part::Ffn => {
                    add("ffn_gate.weight", vec![EMBD, FF], false);
                    add("ffn_up.weight", vec![EMBD, FF], false);
                    add("ffn_down.weight", vec![FF, EMBD], false);
                }
                Part::FfnFusedUp => {
                    add("ffn_up.weight", vec![EMBD, 2 * FF], false);
                    add("ffn_down.weight", vec![FF, EMBD], false);
                }
                Part::Moe => {
                    add("ffn_gate_inp.weight", vec![EMBD, EXPERTS], false);
                    add("ffn_gate_exps.weight", vec![EMBD, FF_EXP, EXPERTS], false);
                    add("ffn_down_exps.weight", vec![FF_EXP, EMBD, EXPERTS], false);
                    add("ffn_up_exps.weight", vec![EMBD, FF_EXP, EXPERTS], false);
                }
                Part::MoeBias => {
                    add("ffn_gate_inp.bias", vec![EXPERTS], false);
                    add("ffn_gate_exps.bias", vec![FF_EXP, EXPERTS], false);
                    add("ffn_down_exps.bias", vec![EMBD, EXPERTS], false);
                    add("ffn_up_exps.bias", vec![FF_EXP, EXPERTS], false);
                }
                Part::FfnPostNorm => add("post_ffw_norm.weight", vec![EMBD], true),
            }
        }
    }
    tensors.push(TensorSource::f32(
        "output_norm.weight",
        vec![EMBD],
        &vec![1.0; EMBD as usize],
    ));
    if !spec.tied {
        tensors.push(TensorSource::f32(
            "output.weight",
            vec![EMBD, n_vocab],
            &random(EMBD * n_vocab),
        ));
    }
    gguf::write(path, &kv, 32, &tensors).expect("write a tiny model");
}
