//! A model re-encoded in another quantization, as a user would make one with
//! `llama-quantize --allow-requantize`: the registries hold SmolLM2 only as Q4_1.

use std::borrow::Cow;
use std::path::Path;

use half::f16;
use swarmllm_node::shard::gguf::{self, Gguf, TensorData, TensorInfo, TensorSource, Value};

const Q4_1: u32 = 3;
const Q8_0: u32 = 8;
/// `general.file_type` of a mostly-Q8_0 model (llama.cpp's `LLAMA_FTYPE_MOSTLY_Q8_0`).
const FTYPE_MOSTLY_Q8_0: u32 = 7;

/// Writes `src` with every Q4_1 tensor dequantized and quantized again as
/// Q8_0 (ggml's reference rounding: `d = max|x| / 127`, `q = round(x / d)`).
pub fn q4_1_to_q8_0(src: &Path, dst: &Path) {
    let g = Gguf::read(src).expect("header");
    let data = std::fs::read(src).expect("read model");
    let tensors: Vec<TensorSource<'_>> = g
        .tensors
        .iter()
        .map(|t| {
            if t.ggml_type != Q4_1 {
                return TensorSource::from_file(t.name.clone(), t, src, g.data_offset);
            }
            let n: u64 = t.dims.iter().product();
            let start = (g.data_offset + t.offset) as usize;
            let raw = &data[start..start + (n / 32 * 20) as usize];
            let mut out = Vec::with_capacity((n / 32 * 34) as usize);
            for block in raw.chunks_exact(20) {
                let d = f16::from_le_bytes([block[0], block[1]]).to_f32();
                let m = f16::from_le_bytes([block[2], block[3]]).to_f32();
                let mut x = [0f32; 32];
                for (j, q) in block[4..].iter().enumerate() {
                    x[j] = f32::from(q & 0x0f) * d + m;
                    x[j + 16] = f32::from(q >> 4) * d + m;
                }
                let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
                let d8 = amax / 127.0;
                let id = if d8 != 0.0 { 1.0 / d8 } else { 0.0 };
                out.extend_from_slice(&f16::from_f32(d8).to_le_bytes());
                out.extend(x.iter().map(|v| (v * id).round() as i8 as u8));
            }
            TensorSource {
                name: t.name.clone(),
                info: Cow::Owned(TensorInfo {
                    name: t.name.clone(),
                    dims: t.dims.clone(),
                    ggml_type: Q8_0,
                    offset: 0,
                    span: out.len() as u64,
                }),
                data: TensorData::Inline(out),
            }
        })
        .collect();
    let kv: Vec<(String, Value)> =
        g.kv.iter()
            .map(|(k, v)| match k.as_str() {
                "general.file_type" => (k.clone(), Value::U32(FTYPE_MOSTLY_Q8_0)),
                _ => (k.clone(), v.clone()),
            })
            .collect();
    gguf::write(dst, &kv, g.alignment, &tensors).expect("write the Q8_0 model");
}
