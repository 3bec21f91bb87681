//! The catalog: GGUF repositories on the Hub, each with its quantization variants,
//! the variant to recommend and whether it fits this machine.
//!
//! Fit: the file plus the KV cache of the node's context must fit the memory the
//! model would run in: the largest GPU's VRAM when there is a GPU, else RAM (less
//! a quarter kept for the system). Before a file's header is read the KV cache is
//! estimated from the file size (a straight line through SmolLM2-135M, 23 KiB per
//! token, and Llama-3-8B Q4_K_M, 128 KiB: it over-estimates the biggest models,
//! which is the safe side); the probe gives the exact figure.

use serde::Serialize;
use serde_json::{Value, json};

use super::{Hub, HubError, RepoListing, status_error};
use crate::shard::SPLIT_ARCHITECTURES;

/// Results asked of the Hub per search (each costs one repository listing).
pub const MAX_RESULTS: usize = 20;
/// Longest query accepted.
pub const MAX_QUERY: usize = 200;

/// Quantizations in the order a variant is recommended: the first that fits.
/// Q4_K_M is what LM Studio and Ollama default to; bigger ones only when it does
/// not exist, smaller ones when nothing bigger fits.
const PREFERENCE: &[&str] = &[
    "Q4_K_M", "Q4_K_S", "Q5_K_M", "Q4_0", "Q4_1", "Q5_K_S", "IQ4_XS", "IQ4_NL", "Q6_K", "Q8_0",
    "Q5_0", "Q5_1", "Q3_K_L", "Q3_K_M", "Q3_K_S", "IQ3_M", "IQ3_S", "IQ3_XS", "IQ3_XXS", "Q2_K",
    "Q2_K_S", "IQ2_M", "IQ2_S", "IQ2_XS", "IQ2_XXS", "IQ1_M", "IQ1_S", "BF16", "F16", "F32",
];

/// The memory a model would run in and the context it would run with.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Fit {
    /// Bytes available for weights and KV cache.
    pub memory_bytes: u64,
    /// Whether that is a GPU's VRAM (else RAM).
    pub vram: bool,
    /// The node's context size in tokens.
    pub context: u32,
}

impl Fit {
    /// This machine, for a context of `context` tokens.
    pub fn here(context: u32) -> Fit {
        let gpus = crate::infer::backend_devices();
        match gpus
            .iter()
            .filter(|d| d.kind != "cpu")
            .map(|d| d.memory_total)
            .max()
        {
            Some(vram) if vram > 0 => Fit {
                memory_bytes: vram,
                vram: true,
                context,
            },
            _ => {
                let mut sys = sysinfo::System::new();
                sys.refresh_memory();
                Fit {
                    memory_bytes: sys.total_memory() / 4 * 3,
                    vram: false,
                    context,
                }
            }
        }
    }

    /// KV cache bytes per token estimated from a file's size (see the module doc).
    pub fn kv_per_token_estimate(file_bytes: u64) -> u64 {
        let gb = file_bytes as f64 / 1e9;
        ((20.5 + 26.0 * gb) * 1024.0) as u64
    }

    /// Whether a file of `bytes` with `kv_per_token` bytes of KV cache per token
    /// fits (weights, the context's KV cache and 5 % for compute buffers).
    pub fn fits(&self, bytes: u64, kv_per_token: u64) -> bool {
        let need = bytes as f64 * 1.05 + kv_per_token as f64 * f64::from(self.context);
        need <= self.memory_bytes as f64
    }
}

/// The quantization named in a GGUF file name (`…Q4_K_M.gguf` → `Q4_K_M`).
pub fn quant_of(file: &str) -> Option<&'static str> {
    let upper = file.rsplit('/').next().unwrap_or(file).to_ascii_uppercase();
    // Longest names first, so Q4_K_M is not read as Q4_K_S's prefix or Q4_K.
    let mut names: Vec<&'static str> = PREFERENCE.to_vec();
    names.sort_by_key(|n| std::cmp::Reverse(n.len()));
    names.into_iter().find(|n| {
        upper.match_indices(n).any(|(i, _)| {
            let before = upper[..i].chars().next_back();
            let after = upper[i + n.len()..].chars().next();
            let sep = |c: Option<char>| c.is_none_or(|c| !c.is_ascii_alphanumeric() && c != '_');
            sep(before) && sep(after)
        })
    })
}

/// `name-00001-of-00003.gguf` → `Some(("name", 1, 3))`.
pub fn split_part(file: &str) -> Option<(&str, u32, u32)> {
    let stem = file.strip_suffix(".gguf")?;
    let (rest, count) = stem.rsplit_once("-of-")?;
    let (base, no) = rest.rsplit_once('-')?;
    if no.len() != 5 || count.len() != 5 {
        return None;
    }
    Some((base, no.parse().ok()?, count.parse().ok()?))
}

/// One variant of a repository.
#[derive(Debug, Clone, Serialize)]
pub struct Variant {
    /// The file (the first part of a multi-part GGUF).
    pub filename: String,
    /// Bytes (all parts).
    pub size_bytes: u64,
    /// Quantization, when the name says.
    pub quant: Option<&'static str>,
    /// Files it is published as.
    pub parts: u32,
    /// Whether it fits this machine.
    pub fits_vram: bool,
}

/// The GGUF variants in a repository listing (vision projectors left out;
/// multi-part files grouped under their first part).
pub fn variants(listing: &RepoListing, fit: &Fit) -> Vec<Variant> {
    let mut out: Vec<Variant> = Vec::new();
    for f in &listing.files {
        let name = f.path.rsplit('/').next().unwrap_or(&f.path);
        if !name.ends_with(".gguf") || name.to_ascii_lowercase().contains("mmproj") {
            continue;
        }
        let size = f.size.unwrap_or(0);
        match split_part(&f.path) {
            Some((base, no, count)) => {
                let first = format!("{base}-00001-of-{count:05}.gguf");
                match out.iter_mut().find(|v| v.filename == first) {
                    Some(v) => {
                        v.size_bytes += size;
                        v.parts += 1;
                    }
                    None => out.push(Variant {
                        filename: first,
                        size_bytes: size,
                        quant: quant_of(&f.path),
                        parts: 1,
                        fits_vram: false,
                    }),
                }
                let _ = no;
            }
            None => out.push(Variant {
                filename: f.path.clone(),
                size_bytes: size,
                quant: quant_of(&f.path),
                parts: 1,
                fits_vram: false,
            }),
        }
    }
    for v in &mut out {
        v.fits_vram = fit.fits(v.size_bytes, Fit::kv_per_token_estimate(v.size_bytes));
    }
    out.sort_by_key(|v| v.size_bytes);
    out
}

/// The variant to recommend: the most preferred quantization that fits, else the
/// smallest file.
pub fn recommended(variants: &[Variant]) -> Option<&Variant> {
    PREFERENCE
        .iter()
        .find_map(|q| variants.iter().find(|v| v.fits_vram && v.quant == Some(*q)))
        .or_else(|| variants.iter().find(|v| v.fits_vram))
        .or_else(|| variants.iter().min_by_key(|v| v.size_bytes))
}

#[derive(serde::Deserialize)]
struct SearchHit {
    id: String,
    #[serde(default)]
    downloads: u64,
    #[serde(default)]
    likes: u64,
    #[serde(default)]
    tags: Vec<String>,
    #[serde(default)]
    gguf: Option<GgufInfo>,
}

#[derive(serde::Deserialize)]
struct GgufInfo {
    architecture: Option<String>,
}

impl Hub {
    /// Searches GGUF repositories: `GET /api/models?search=…&filter=gguf`, then
    /// each hit's file listing for its variants. Answers are cached for a minute.
    pub async fn search(&self, query: &str, limit: usize, fit: &Fit) -> Result<Value, HubError> {
        let query = query.trim();
        if query.len() > MAX_QUERY {
            return Err(HubError::Invalid(format!(
                "the query is longer than {MAX_QUERY} characters"
            )));
        }
        let limit = limit.clamp(1, MAX_RESULTS);
        let key = format!("{query}\u{0}{limit}\u{0}{}", fit.memory_bytes);
        if let Some(hit) = self.cached_search(&key) {
            return Ok(hit);
        }
        let url = format!("{}/api/models", self.settings.endpoint);
        let r = self
            .meta
            .get(&url)
            .query(&[
                ("search", query),
                ("filter", "gguf"),
                ("sort", "downloads"),
                ("direction", "-1"),
                ("limit", &limit.to_string()),
            ])
            .send()
            .await?;
        if !r.status().is_success() {
            return Err(status_error(r.status(), r.headers(), "search"));
        }
        let hits: Vec<SearchHit> = super::json_body(r, "search").await?;
        let listings =
            futures::future::join_all(hits.iter().take(limit).map(|h| self.listing(&h.id))).await;
        let mut out = Vec::new();
        for (hit, listing) in hits.iter().zip(listings) {
            let Ok(listing) = listing else { continue };
            let vs = variants(&listing, fit);
            if vs.is_empty() {
                continue;
            }
            let architecture = hit
                .gguf
                .as_ref()
                .and_then(|g| g.architecture.clone())
                .or_else(|| {
                    hit.tags
                        .iter()
                        .find(|t| SPLIT_ARCHITECTURES.contains(&t.as_str()))
                        .cloned()
                });
            let rec = recommended(&vs);
            out.push(json!({
                "repo_id": hit.id,
                "downloads": hit.downloads,
                "likes": hit.likes,
                "architecture": architecture,
                "split_supported": architecture
                    .as_deref()
                    .is_some_and(|a| SPLIT_ARCHITECTURES.contains(&a)),
                "gated": listing.gated.is_some(),
                "recommended_variant": rec.and_then(|v| v.quant),
                "recommended_file": rec.map(|v| v.filename.clone()),
                "fits_vram": rec.is_some_and(|v| v.fits_vram),
                "variants": vs,
            }));
        }
        let value = Value::Array(out);
        self.store_search(&key, value.clone());
        Ok(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantizations_are_read_from_file_names() {
        assert_eq!(quant_of("tinyllama.Q4_K_M.gguf"), Some("Q4_K_M"));
        assert_eq!(quant_of("x-q4_k_s.gguf"), Some("Q4_K_S"));
        assert_eq!(quant_of("Q8_0/x-Q8_0-00001-of-00002.gguf"), Some("Q8_0"));
        assert_eq!(quant_of("model-IQ4_XS.gguf"), Some("IQ4_XS"));
        assert_eq!(quant_of("model-f16.gguf"), Some("F16"));
        assert_eq!(quant_of("SmolLM2-135M-Instruct.Q4_1.gguf"), Some("Q4_1"));
        assert_eq!(quant_of("model.gguf"), None);
    }

    #[test]
    fn multi_part_names_are_recognised() {
        assert_eq!(
            split_part("big-Q4_K_M-00002-of-00005.gguf"),
            Some(("big-Q4_K_M", 2, 5))
        );
        assert_eq!(split_part("big.gguf"), None);
    }

    #[test]
    fn the_preferred_quant_that_fits_is_recommended() {
        let fit = Fit {
            memory_bytes: 6_000_000_000,
            vram: false,
            context: 4096,
        };
        let listing = RepoListing {
            repo_id: "a/b".into(),
            sha: None,
            gated: None,
            files: [
                ("m.Q8_0.gguf", 8_000_000_000u64),
                ("m.Q4_K_M.gguf", 4_100_000_000),
                ("m.Q2_K.gguf", 2_500_000_000),
                ("mmproj-f16.gguf", 600_000_000),
                ("README.md", 10),
            ]
            .iter()
            .map(|(p, s)| super::super::RepoFile {
                path: (*p).into(),
                size: Some(*s),
                sha256: None,
            })
            .collect(),
        };
        let vs = variants(&listing, &fit);
        assert_eq!(vs.len(), 3);
        assert_eq!(recommended(&vs).and_then(|v| v.quant), Some("Q4_K_M"));
        let small = Fit {
            memory_bytes: 3_500_000_000,
            ..fit
        };
        let vs = variants(&listing, &small);
        assert_eq!(recommended(&vs).and_then(|v| v.quant), Some("Q2_K"));
        assert!(!vs.iter().any(|v| v.quant == Some("Q8_0") && v.fits_vram));
    }
}
