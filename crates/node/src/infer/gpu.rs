//! How many layers go to the GPU when `gpu_layers` is `"auto"`: as many as fit
//! in the GPUs' free memory once the context's KV cache and a margin for
//! compute buffers are set aside; none on a machine without a GPU backend.

use std::path::Path;

use crate::config::GpuLayers;

/// Left free on the GPUs for compute buffers and other programs.
const MARGIN_BYTES: u64 = 512 << 20;

/// Layers to offload for the model at `path` (`n_layers()` repeating layers,
/// asked only when a GPU is there; `context_tokens` of KV cache in all).
pub fn layers_to_offload(
    setting: GpuLayers,
    path: &Path,
    n_layers: impl FnOnce() -> u32,
    context_tokens: u64,
) -> u32 {
    match setting {
        GpuLayers::Count(n) => n,
        GpuLayers::Auto => {
            let free: u64 = super::backend_devices()
                .iter()
                .filter(|d| d.kind == "gpu" || d.kind == "igpu")
                .map(|d| d.memory_free)
                .sum();
            if free == 0 {
                return 0;
            }
            let bytes = std::fs::metadata(path).map_or(u64::MAX, |m| m.len());
            let kv = crate::hub::search::Fit::kv_per_token_estimate(bytes)
                .saturating_mul(context_tokens);
            fit_layers(free, bytes, n_layers(), kv)
        }
    }
}

/// Of a model of `model_bytes` with `n_layers` repeating layers (plus the
/// output layer, which llama.cpp offloads last), how many fit in `free` bytes
/// after `kv_bytes` of KV cache and the margin.
pub fn fit_layers(free: u64, model_bytes: u64, n_layers: u32, kv_bytes: u64) -> u32 {
    let all = n_layers.saturating_add(1);
    let room = free.saturating_sub(kv_bytes.saturating_add(MARGIN_BYTES));
    let per_layer = model_bytes / u64::from(all.max(1));
    if per_layer == 0 {
        return all;
    }
    u32::try_from(room / per_layer).unwrap_or(u32::MAX).min(all)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    #[test]
    fn what_fits_after_the_context_and_the_margin() {
        // 31 slots (30 layers + output) of 100 MiB: 3.1 GiB in all.
        let model = 31 * (100 << 20);
        assert_eq!(
            fit_layers(8 * GIB, model, 30, GIB),
            31,
            "room for everything"
        );
        // 2 GiB free, 1 GiB of KV, 0.5 GiB margin: 512 MiB for 5 layers.
        assert_eq!(fit_layers(2 * GIB, model, 30, GIB), 5);
        assert_eq!(
            fit_layers(GIB, model, 30, GIB),
            0,
            "the context alone fills it"
        );
        assert_eq!(fit_layers(0, model, 30, 0), 0, "no GPU memory, no layers");
    }
}
