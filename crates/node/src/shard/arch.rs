//! What splitting needs to know about llama.cpp's architectures.
//!
//! A decoder-only model whose blocks form one stack splits the same way whatever
//! its architecture: `blk.N.*` tensors by layer (attention, norms, MoE experts,
//! attention sinks and biases alike), the embedding first, the head last, every
//! other tensor (`rope_freqs`, …) in every shard. What differs is metadata that
//! depends on a layer's *index*, because a range is renumbered from 0:
//!
//! - per-layer arrays (`feed_forward_length`, `attention.head_count_kv`, …, read
//!   with llama.cpp's `get_key_or_arr`) are cut to the range's layers;
//! - sliding-window patterns (every Nth layer global) are written out as the
//!   explicit per-layer list, which llama.cpp reads before any period;
//! - an embedding scale (granite) applies to what enters the first layer: a range
//!   fed hidden states drops it.
//!
//! [`SPLIT_ARCHITECTURES`] lists the architectures proven exact by the test suite
//! (a tiny random-weight model of each, split 2 and 3 ways, gives the whole
//! model's logits bit for bit); any other is served whole.

use super::gguf::Value;

/// Architectures the layer split is built and tested for.
pub const SPLIT_ARCHITECTURES: &[&str] = &[
    "llama", "qwen2", "qwen3", "qwen3moe", "gemma3", "phi3", "mistral3", "olmo2", "granite",
    "gpt-oss",
];

/// Whether models of `arch` can be split into layer shards.
pub fn splittable(arch: &str) -> bool {
    SPLIT_ARCHITECTURES.contains(&arch)
}

/// Metadata keys (after `<arch>.`) that llama.cpp reads as one value or one per
/// layer.
const PER_LAYER_KEYS: &[&str] = &[
    "feed_forward_length",
    "expert_feed_forward_length",
    "expert_used_count",
    "attention.head_count",
    "attention.head_count_kv",
    "swiglu_clamp_exp",
    "swiglu_clamp_shexp",
];

/// The sliding-window pattern llama.cpp's loader assumes for `arch` when the file
/// has no explicit one: `(period, dense_first)` as passed to `load_swa_pattern`.
fn swa_default(arch: &str) -> Option<(u32, bool)> {
    Some(match arch {
        "gemma2" => (2, false),
        "gemma3" | "gemma-embedding" => (6, false),
        "gemma3n" => (5, false),
        "cohere2" | "olmo2" | "llama4" | "exaone4" | "exaone-moe" | "afmoe" | "mellum" => {
            (4, false)
        }
        "cohere2moe" | "smallthinker" => (4, true),
        "gpt-oss" => (2, false),
        "plamo3" => (8, false),
        _ => return None,
    })
}

/// Whether layer `il` uses the sliding window under `(period, dense_first)`, as
/// llama.cpp's `set_swa_pattern` decides it.
fn is_swa(il: u32, period: u32, dense_first: bool) -> bool {
    if period == 0 {
        return true;
    }
    if dense_first {
        !il.is_multiple_of(period)
    } else {
        il % period < period - 1
    }
}

/// Rewrites the metadata of a range of layers `start..start + len` of an
/// `n_layers`-layer model for loading on its own, renumbered from 0; `takes_tokens`
/// when the range begins the model (later ranges are fed hidden states).
pub fn range_kv(
    kv: &mut Vec<(String, Value)>,
    arch: &str,
    n_layers: u32,
    start: u32,
    len: u32,
    takes_tokens: bool,
) {
    let key = |k: &str| format!("{arch}.{k}");
    let slice = |items: &[Value]| -> Vec<Value> {
        (start..start + len)
            .filter_map(|il| items.get(il as usize).cloned())
            .collect()
    };
    for k in PER_LAYER_KEYS {
        let name = key(k);
        if let Some((_, Value::Array(_, items))) = kv.iter_mut().find(|(kk, _)| *kk == name)
            && items.len() == n_layers as usize
        {
            *items = slice(items);
        }
    }
    if let Some((period, dense_first)) = swa_default(arch) {
        let name = key("attention.sliding_window_pattern");
        let pattern: Vec<Value> = match kv.iter().find(|(k, _)| *k == name).map(|(_, v)| v.clone())
        {
            Some(Value::Array(_, items)) if items.len() == n_layers as usize => slice(&items),
            other => {
                let period = other.and_then(|v| v.as_u64()).map_or(period, |p| p as u32);
                (start..start + len)
                    .map(|il| Value::Bool(is_swa(il, period, dense_first)))
                    .collect()
            }
        };
        kv.retain(|(k, _)| *k != name);
        // GGUF type 7: bool.
        kv.push((name, Value::Array(7, pattern)));
    }
    if !takes_tokens {
        // The scale applies to what enters the first layer: the model's own first
        // range scales the embeddings, a range fed hidden states must not again.
        let name = key("embedding_scale");
        kv.retain(|(k, _)| *k != name);
    }
    set_u32(kv, &key("block_count"), len);
}

pub(super) fn set_u32(kv: &mut Vec<(String, Value)>, key: &str, v: u32) {
    match kv.iter_mut().find(|(k, _)| k == key) {
        Some((_, val)) => *val = Value::U32(v),
        None => kv.push((key.to_string(), Value::U32(v))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_layer_arrays_and_window_patterns_follow_the_range() {
        let mut kv = vec![
            (
                "gpt-oss.feed_forward_length".to_string(),
                Value::Array(4, (0..6).map(Value::U32).collect()),
            ),
            ("gpt-oss.block_count".to_string(), Value::U32(6)),
            ("gpt-oss.embedding_scale".to_string(), Value::F32(12.0)),
        ];
        range_kv(&mut kv, "gpt-oss", 6, 3, 2, false);
        let get = |k: &str| kv.iter().find(|(kk, _)| kk == k).map(|(_, v)| v.clone());
        assert_eq!(
            get("gpt-oss.feed_forward_length"),
            Some(Value::Array(4, vec![Value::U32(3), Value::U32(4)]))
        );
        assert_eq!(get("gpt-oss.block_count"), Some(Value::U32(2)));
        // Period 2, dense last: layer 3 is global, layer 4 windowed.
        assert_eq!(
            get("gpt-oss.attention.sliding_window_pattern"),
            Some(Value::Array(7, vec![Value::Bool(false), Value::Bool(true)]))
        );
        assert_eq!(get("gpt-oss.embedding_scale"), None);
    }
}
