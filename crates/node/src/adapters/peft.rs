//! PEFT LoRA adapters (`adapter_model.safetensors`) converted to llama.cpp's
//! GGUF adapter format, as llama.cpp's `convert_lora_to_gguf.py` does for the
//! module names and architectures below.
//!
//! A PEFT file holds, per adapted linear layer, `…layers.N.<module>.lora_A.weight`
//! (`[rank, in]`) and `…lora_B.weight` (`[out, rank]`). llama.cpp wants the same
//! matrices under the base model's tensor names with `.lora_a` / `.lora_b`
//! (ggml's dimension order is reversed, so the bytes are the same). One
//! subtlety: for `llama` models the converter permutes the rows of the query and
//! key projections (its rotary layout differs from Hugging Face's); the delta
//! `B·A` must be permuted alike, which is a permutation of `B`'s rows.

use std::path::Path;

use safetensors::{Dtype, SafeTensors};

use super::AdapterError;
use crate::shard::gguf::{self, Gguf, TensorSource, Value};

/// Hugging Face module → GGUF tensor (in `blk.N.`).
const MODULES: &[(&str, &str)] = &[
    ("self_attn.q_proj", "attn_q"),
    ("self_attn.k_proj", "attn_k"),
    ("self_attn.v_proj", "attn_v"),
    ("self_attn.o_proj", "attn_output"),
    ("mlp.gate_proj", "ffn_gate"),
    ("mlp.up_proj", "ffn_up"),
    ("mlp.down_proj", "ffn_down"),
];

/// Architectures whose Hugging Face layers map one to one onto llama.cpp's
/// with the names above, and whether q/k rows are permuted.
const ARCHITECTURES: &[(&str, bool)] = &[
    ("llama", true),
    ("qwen2", false),
    ("qwen3", false),
    ("mistral", false),
    ("gemma", false),
    ("gemma2", false),
    ("gemma3", false),
];

fn bad(msg: impl Into<String>) -> AdapterError {
    AdapterError::BadFile(msg.into())
}

/// `lora_alpha` from the `adapter_config.json` beside `file`, if there is one.
pub fn config_alpha(file: &Path) -> Option<f32> {
    let config = file.parent()?.join("adapter_config.json");
    let text = std::fs::read_to_string(config).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v["lora_alpha"]
        .as_f64()
        .map(|a| a as f32)
        .filter(|a| a.is_finite() && *a > 0.0)
}

/// `(layer, gguf tensor, is_a)` for a PEFT tensor name.
fn parse_name(name: &str) -> Result<(u32, &'static str, bool), AdapterError> {
    let (stem, is_a) = if let Some(s) = name.strip_suffix(".lora_A.weight") {
        (s, true)
    } else if let Some(s) = name.strip_suffix(".lora_B.weight") {
        (s, false)
    } else {
        return Err(bad(format!(
            "tensor '{name}' is not a lora_A or lora_B weight"
        )));
    };
    let (_, after) = stem
        .split_once("layers.")
        .ok_or_else(|| bad(format!("tensor '{name}' is not in a layer")))?;
    let (layer, module) = after
        .split_once('.')
        .ok_or_else(|| bad(format!("tensor '{name}' names no module")))?;
    let layer: u32 = layer
        .parse()
        .map_err(|_| bad(format!("tensor '{name}' has no layer number")))?;
    let gguf = MODULES
        .iter()
        .find(|(hf, _)| *hf == module)
        .map(|(_, g)| *g)
        .ok_or_else(|| {
            bad(format!(
                "module '{module}' cannot be converted (supported: {})",
                MODULES
                    .iter()
                    .map(|(m, _)| *m)
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })?;
    Ok((layer, gguf, is_a))
}

/// A tensor's values as f32 (F32, F16 and BF16 files).
fn to_f32(dtype: Dtype, data: &[u8]) -> Result<Vec<f32>, AdapterError> {
    Ok(match dtype {
        Dtype::F32 => data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::F16 => data
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::BF16 => data
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        other => {
            return Err(bad(format!(
                "tensor type {other:?} (expected F32, F16 or BF16)"
            )));
        }
    })
}

/// llama.cpp's row order for a `[heads · head_dim, cols]` matrix of a llama
/// q or k projection: within each head, the two rotary halves interleaved.
pub fn permute_rows(values: &[f32], rows: usize, cols: usize, heads: usize) -> Vec<f32> {
    let head_dim = rows / heads;
    let half = head_dim / 2;
    let mut out = vec![0.0; values.len()];
    for h in 0..heads {
        for i in 0..half {
            for j in 0..2 {
                let to = h * head_dim + i * 2 + j;
                let from = h * head_dim + j * half + i;
                out[to * cols..(to + 1) * cols]
                    .copy_from_slice(&values[from * cols..(from + 1) * cols]);
            }
        }
    }
    out
}

/// Converts the PEFT file `src` for the model whose header is `base` into a
/// GGUF adapter at `out`; returns `(rank, alpha)`. `alpha` defaults to the
/// rank (a scale of 1).
pub fn convert(
    src: &Path,
    base: &Gguf,
    alpha: Option<f32>,
    out: &Path,
) -> Result<(u32, f32), AdapterError> {
    let arch = base
        .architecture()
        .ok_or_else(|| bad("the base model names no architecture"))?
        .to_string();
    let permutes = ARCHITECTURES
        .iter()
        .find(|(a, _)| *a == arch)
        .map(|(_, p)| *p)
        .ok_or_else(|| {
            bad(format!(
                "PEFT adapters for {arch} models cannot be converted here; convert it with \
                 llama.cpp's convert_lora_to_gguf.py and register the GGUF"
            ))
        })?;
    let head_count = |key: &str| {
        base.get(&format!("{arch}.{key}"))
            .and_then(Value::as_u64)
            .filter(|n| *n > 0)
            .map(|n| n as usize)
    };
    let bytes = std::fs::read(src)?;
    let file = SafeTensors::deserialize(&bytes)
        .map_err(|e| bad(format!("not a safetensors file: {e}")))?;
    let mut rank: Option<usize> = None;
    let mut tensors = Vec::new();
    let mut names: Vec<&str> = file.names();
    names.sort_unstable();
    for name in names {
        let view = file
            .tensor(name)
            .map_err(|e| bad(format!("tensor '{name}': {e}")))?;
        let (layer, target, is_a) = parse_name(name)?;
        let &[rows, cols] = view.shape() else {
            return Err(bad(format!("tensor '{name}' is not a matrix")));
        };
        let r = if is_a { rows } else { cols };
        match rank {
            None => rank = Some(r),
            Some(k) if k != r => {
                return Err(bad(format!("tensor '{name}' has rank {r}, others {k}")));
            }
            Some(_) => {}
        }
        let full = format!("blk.{layer}.{target}.weight");
        let model_tensor = base
            .tensors
            .iter()
            .find(|t| t.name == full)
            .ok_or_else(|| bad(format!("the base model has no tensor {full}")))?;
        let (model_in, model_out) = (
            model_tensor.dims.first().copied().unwrap_or(0) as usize,
            model_tensor.dims.get(1).copied().unwrap_or(0) as usize,
        );
        let fits = if is_a {
            cols == model_in
        } else {
            rows == model_out
        };
        if !fits {
            return Err(bad(format!(
                "tensor '{name}' ({rows}×{cols}) does not fit the base model's {full} \
                 ({model_out}×{model_in}): is this adapter for another model?"
            )));
        }
        let mut values = to_f32(view.dtype(), view.data())?;
        if !is_a && permutes && matches!(target, "attn_q" | "attn_k") {
            let heads = if target == "attn_q" {
                head_count("attention.head_count")
            } else {
                head_count("attention.head_count_kv").or(head_count("attention.head_count"))
            }
            .ok_or_else(|| bad("the base model names no head count"))?;
            if rows % (heads * 2) != 0 {
                return Err(bad(format!(
                    "tensor '{name}' does not split into {heads} heads"
                )));
            }
            values = permute_rows(&values, rows, cols, heads);
        }
        let suffix = if is_a { "lora_a" } else { "lora_b" };
        // ggml's order: [cols, rows].
        tensors.push(TensorSource::f32(
            &format!("{full}.{suffix}"),
            vec![cols as u64, rows as u64],
            &values,
        ));
    }
    let rank = rank.ok_or_else(|| bad("the file holds no LoRA tensors"))?;
    let rank = u32::try_from(rank).map_err(|_| bad("rank too large"))?;
    let alpha = alpha.unwrap_or(rank as f32);
    let kv = vec![
        ("general.architecture".to_string(), Value::Str(arch)),
        ("general.type".to_string(), Value::Str("adapter".into())),
        ("adapter.type".to_string(), Value::Str("lora".into())),
        ("adapter.lora.alpha".to_string(), Value::F32(alpha)),
    ];
    let tmp = out.with_extension("gguf.part");
    gguf::write(&tmp, &kv, 32, &tensors)?;
    std::fs::rename(&tmp, out)?;
    Ok((rank, alpha))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_llama_cpp_tensors() {
        assert_eq!(
            parse_name("base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight")
                .expect("ok"),
            (3, "attn_q", true)
        );
        assert_eq!(
            parse_name("base_model.model.model.layers.12.mlp.down_proj.lora_B.weight").expect("ok"),
            (12, "ffn_down", false)
        );
        for bad in [
            "base_model.model.lm_head.lora_A.weight",
            "base_model.model.model.layers.x.mlp.up_proj.lora_A.weight",
            "base_model.model.model.layers.1.self_attn.rotary.lora_A.weight",
            "base_model.model.model.layers.1.mlp.up_proj.weight",
        ] {
            assert!(parse_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_permutation_interleaves_rotary_halves() {
        // One head of dim 4, one column: rows [0 1 2 3] → [0 2 1 3].
        assert_eq!(
            permute_rows(&[0.0, 1.0, 2.0, 3.0], 4, 1, 1),
            vec![0.0, 2.0, 1.0, 3.0]
        );
        // Two heads, two columns.
        let v: Vec<f32> = (0..16).map(|x| x as f32).collect();
        let p = permute_rows(&v, 8, 2, 2);
        assert_eq!(&p[..8], &[0.0, 1.0, 4.0, 5.0, 2.0, 3.0, 6.0, 7.0]);
        assert_eq!(&p[8..], &[8.0, 9.0, 12.0, 13.0, 10.0, 11.0, 14.0, 15.0]);
    }
}
