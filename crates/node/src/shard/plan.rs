//! What goes into each shard, decided from a GGUF's header and a shard count
//! alone.
//!
//! An import from a file on disk and a download of byte ranges from the Hub both
//! follow the same [`ModelPlan`], so both write the same bytes: the shard's header
//! (metadata plus tensor infos) is encoded here, and its data is a list of
//! [`Segment`]s, each either a byte range of the source file or alignment padding.
//! Because the plan needs no tensor bytes, a node knows every shard's size, header
//! and the ranges it must fetch before it reads a single weight.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

use super::gguf::{Gguf, TensorInfo, Value, encode_header};
use super::manifest::{self, FORMAT, FileEntry, HEADER_FILE, Manifest, ShardEntry, SourceFile};
use super::parts::{Piece, SourceMap};
use super::{SPLIT_ARCHITECTURES, ShardError, shard_file_name};

/// One piece of a shard file's data section.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Segment {
    /// `len` bytes of the source file from byte `offset`.
    Source {
        /// Absolute offset in the source file.
        offset: u64,
        /// Byte count.
        len: u64,
    },
    /// `len` zero bytes (padding to the alignment).
    Zeros(u64),
}

impl Segment {
    /// Its length in bytes.
    pub fn len(&self) -> u64 {
        match *self {
            Segment::Source { len, .. } | Segment::Zeros(len) => len,
        }
    }

    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One shard of the plan.
#[derive(Debug, Clone)]
pub struct ShardPlan {
    /// Position in the chain.
    pub index: u32,
    /// First layer.
    pub layer_start: u32,
    /// One past the last layer.
    pub layer_end: u32,
    /// Tensors in the shard.
    pub tensors: usize,
    /// Holds the token embedding.
    pub has_embedding: bool,
    /// Holds the output norm and head.
    pub has_head: bool,
    /// The shard file's bytes before its tensor data.
    pub header: Vec<u8>,
    /// The shard file's data: source ranges and padding, in file order.
    pub segments: Vec<Segment>,
    /// The shard file's length.
    pub bytes: u64,
}

impl ShardPlan {
    /// The source byte ranges this shard needs, adjacent ones merged (a shard's
    /// tensors usually lie back to back, so a download is a few long reads).
    pub fn source_ranges(&self) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for s in &self.segments {
            if let Segment::Source { offset, len } = *s {
                match out.last_mut() {
                    Some((start, l)) if *start + *l == offset => *l += len,
                    _ => out.push((offset, len)),
                }
            }
        }
        out
    }

    /// Source bytes this shard needs.
    pub fn source_bytes(&self) -> u64 {
        self.source_ranges().iter().map(|(_, l)| l).sum()
    }

    /// The shard file's data as pieces of the source's files, in file order,
    /// adjacent ones merged (a shard's tensors usually lie back to back in the
    /// source, so a download is a few long reads, not one per tensor).
    pub fn pieces(&self, map: &SourceMap) -> Result<Vec<Piece>, ShardError> {
        let mut out: Vec<Piece> = Vec::new();
        for segment in &self.segments {
            let next = match *segment {
                Segment::Zeros(n) => vec![Piece::Zeros(n)],
                Segment::Source { offset, len } => map.pieces(offset, len)?,
            };
            for piece in next {
                match (out.last_mut(), piece) {
                    (
                        Some(Piece::Part { part, offset, len }),
                        Piece::Part {
                            part: p,
                            offset: o,
                            len: l,
                        },
                    ) if *part == p && *offset + *len == o => *len += l,
                    (Some(Piece::Zeros(n)), Piece::Zeros(m)) => *n += m,
                    (_, piece) => out.push(piece),
                }
            }
        }
        Ok(out)
    }

    /// Writes the whole shard file to `out`, reading the source's bytes from
    /// `parts` (one path for a whole file) through `map`.
    pub fn write_from(
        &self,
        parts: &[std::path::PathBuf],
        map: &SourceMap,
        out: &Path,
    ) -> Result<(), ShardError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| ShardError::Io { path, source }
        };
        let mut files = Vec::new();
        for p in parts {
            files.push(std::fs::File::open(p).map_err(io(p))?);
        }
        let mut w = std::io::BufWriter::new(std::fs::File::create(out).map_err(io(out))?);
        w.write_all(&self.header).map_err(io(out))?;
        let mut buf = vec![0u8; 1 << 20];
        for piece in self.pieces(map)? {
            match piece {
                Piece::Zeros(n) => {
                    std::io::copy(&mut std::io::repeat(0).take(n), &mut w).map_err(io(out))?;
                }
                Piece::Part { part, offset, len } => {
                    let (Some(src), Some(path)) = (files.get_mut(part), parts.get(part)) else {
                        return Err(ShardError::Invalid(format!("no source part {part}")));
                    };
                    src.seek(SeekFrom::Start(offset)).map_err(io(path))?;
                    let mut left = len;
                    while left > 0 {
                        let n = left.min(buf.len() as u64) as usize;
                        src.read_exact(&mut buf[..n]).map_err(io(path))?;
                        w.write_all(&buf[..n]).map_err(io(out))?;
                        left -= n as u64;
                    }
                }
            }
        }
        w.flush().map_err(io(out))?;
        w.get_ref().sync_all().map_err(io(out))?;
        Ok(())
    }
}

/// How a GGUF is split.
#[derive(Debug, Clone)]
pub struct ModelPlan {
    /// `general.architecture`.
    pub architecture: String,
    /// Transformer layers.
    pub n_layers: u32,
    /// The head reuses the token embedding.
    pub tied_embeddings: bool,
    /// The shards, in layer order.
    pub shards: Vec<ShardPlan>,
}

pub(super) fn is_embedding(name: &str) -> bool {
    name.starts_with("token_embd.")
}

fn is_head(name: &str) -> bool {
    name.starts_with("output_norm.") || name.starts_with("output.")
}

/// Splits `n_layers` into `shards` contiguous ranges, earlier ones one longer when
/// it does not divide evenly.
pub fn layer_ranges(n_layers: u32, shards: u32) -> Vec<(u32, u32)> {
    let base = n_layers / shards.max(1);
    let extra = n_layers % shards.max(1);
    let mut start = 0;
    (0..shards)
        .map(|i| {
            let len = base + u32::from(i < extra);
            let r = (start, start + len);
            start += len;
            r
        })
        .collect()
}

/// The architecture and layer count of a GGUF, checked against the limits.
pub fn model_shape(g: &Gguf) -> Result<(String, u32), ShardError> {
    let arch = g
        .architecture()
        .ok_or_else(|| ShardError::Invalid("the GGUF has no general.architecture".into()))?
        .to_string();
    let n_layers = g
        .block_count()
        .ok_or_else(|| ShardError::Invalid(format!("the GGUF has no {arch}.block_count")))?;
    if n_layers == 0 || n_layers > manifest::MAX_LAYERS {
        return Err(ShardError::Invalid(format!(
            "the GGUF declares {n_layers} layers (1 to {})",
            manifest::MAX_LAYERS
        )));
    }
    Ok((arch, n_layers))
}

/// Plans the split of a GGUF whose header is `g` (parsed with its tensor spans,
/// see [`Gguf::header_of_file`]) into `shards` shards.
pub fn plan(g: &Gguf, shards: u32) -> Result<ModelPlan, ShardError> {
    let (arch, n_layers) = model_shape(g)?;
    if shards == 0 || shards > n_layers {
        return Err(ShardError::Invalid(format!(
            "the shard count must be between 1 and the model's {n_layers} layers"
        )));
    }
    if shards > 1 && !SPLIT_ARCHITECTURES.contains(&arch.as_str()) {
        return Err(ShardError::Invalid(format!(
            "architecture '{arch}' cannot be split yet (supported: {}); use one shard to \
             serve it whole",
            SPLIT_ARCHITECTURES.join(", ")
        )));
    }
    let tied = !g
        .tensors
        .iter()
        .any(|t| t.name.starts_with("output.weight"));
    let mut out = Vec::new();
    for (index, (start, end)) in layer_ranges(n_layers, shards).into_iter().enumerate() {
        let index = index as u32;
        let first = index == 0;
        let last = index == shards - 1;
        let tensors: Vec<&TensorInfo> = g
            .tensors
            .iter()
            .filter(|t| match t.layer() {
                Some(l) => (start..end).contains(&l),
                None if is_embedding(&t.name) => first || (last && tied),
                None if is_head(&t.name) => last,
                None => true,
            })
            .collect();
        let mut kv = g.kv.clone();
        for (key, value) in [
            ("swarmllm.shard.index", index),
            ("swarmllm.shard.layer_start", start),
            ("swarmllm.shard.layer_end", end),
        ] {
            match kv.iter_mut().find(|(k, _)| k == key) {
                Some((_, v)) => *v = Value::U32(value),
                None => kv.push((key.to_string(), Value::U32(value))),
            }
        }
        let (header, bytes) = encode_header(
            &kv,
            g.alignment,
            tensors.iter().map(|t| (t.name.as_str(), *t)),
        )?;
        let mut segments = Vec::new();
        let mut written = 0u64;
        for t in &tensors {
            let offset = g
                .data_offset
                .checked_add(t.offset)
                .ok_or_else(|| ShardError::Invalid("a tensor offset overflows".into()))?;
            segments.push(Segment::Source {
                offset,
                len: t.span,
            });
            written += t.span;
            let pad = written.next_multiple_of(g.alignment) - written;
            if pad > 0 {
                segments.push(Segment::Zeros(pad));
                written += pad;
            }
        }
        out.push(ShardPlan {
            index,
            layer_start: start,
            layer_end: end,
            tensors: tensors.len(),
            has_embedding: tensors.iter().any(|t| is_embedding(&t.name)),
            has_head: last,
            header,
            segments,
            bytes,
        });
    }
    Ok(ModelPlan {
        architecture: arch,
        n_layers,
        tied_embeddings: tied,
        shards: out,
    })
}

impl ModelPlan {
    /// The shard with `index`.
    pub fn shard(&self, index: u32) -> Option<&ShardPlan> {
        self.shards.iter().find(|s| s.index == index)
    }

    /// The manifest's shard entries for this split.
    pub fn shard_entries(&self) -> Vec<ShardEntry> {
        self.shards
            .iter()
            .map(|s| ShardEntry {
                index: s.index,
                layer_start: s.layer_start,
                layer_end: s.layer_end,
                file: shard_file_name(s.index),
                bytes: s.bytes,
                tensors: s.tensors,
                has_embedding: s.has_embedding,
                has_head: s.has_head,
            })
            .collect()
    }

    /// Whether `manifest` describes this split (architecture, layers, tied head
    /// and every shard's range, size, tensor count and roles): a manifest from a
    /// peer must be the one its header implies.
    pub fn matches(&self, manifest: &Manifest) -> bool {
        manifest.architecture == self.architecture
            && manifest.n_layers == self.n_layers
            && manifest.tied_embeddings == self.tied_embeddings
            && manifest.shards == self.shard_entries()
    }

    /// The manifest of this split: it needs only the plan, the source files'
    /// identity (one, or every part of a multi-part GGUF) and the header's bytes,
    /// so every node that splits the same file the same way writes the same
    /// manifest, whichever bytes it read.
    pub fn manifest(
        &self,
        model_id: &str,
        sources: Vec<SourceFile>,
        header: &[u8],
    ) -> Result<Manifest, ShardError> {
        let source = sources
            .first()
            .cloned()
            .ok_or_else(|| ShardError::Invalid("no source file".into()))?;
        let m = Manifest {
            format: FORMAT.into(),
            model_id: model_id.into(),
            architecture: self.architecture.clone(),
            n_layers: self.n_layers,
            tied_embeddings: self.tied_embeddings,
            source,
            source_parts: if sources.len() > 1 {
                sources
            } else {
                Vec::new()
            },
            header: FileEntry {
                file: HEADER_FILE.into(),
                bytes: header.len() as u64,
                blake3: blake3::hash(header).to_hex().to_string(),
            },
            shards: self.shard_entries(),
        };
        m.validate()?;
        Ok(m)
    }
}

/// The plan of a model already on disk: from its `gguf_header.bin` and the source
/// size its manifest names (or, for a multi-part source, the virtual file's size
/// its merged header declares). A shard file's expected header and size come
/// from it.
pub fn plan_of(header: &[u8], manifest: &Manifest) -> Result<ModelPlan, ShardError> {
    let len = if manifest.source_parts.is_empty() {
        manifest.source.bytes
    } else {
        super::parts::declared_len(&Gguf::header_from_bytes(header)?)
            .ok_or_else(|| ShardError::Invalid("a merged header without its data size".into()))?
    };
    let g = Gguf::header_of_file(header, len)?;
    plan(&g, manifest.shard_count())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_ranges_cover_every_layer_once() {
        assert_eq!(layer_ranges(30, 3), vec![(0, 10), (10, 20), (20, 30)]);
        assert_eq!(
            layer_ranges(30, 4),
            vec![(0, 8), (8, 16), (16, 23), (23, 30)]
        );
        assert_eq!(layer_ranges(5, 5).len(), 5);
        assert_eq!(layer_ranges(7, 1), vec![(0, 7)]);
    }

    #[test]
    fn adjacent_source_ranges_are_merged() {
        let p = ShardPlan {
            index: 0,
            layer_start: 0,
            layer_end: 1,
            tensors: 3,
            has_embedding: true,
            has_head: true,
            header: vec![],
            segments: vec![
                Segment::Source {
                    offset: 100,
                    len: 32,
                },
                Segment::Source {
                    offset: 132,
                    len: 32,
                },
                Segment::Zeros(8),
                Segment::Source {
                    offset: 400,
                    len: 16,
                },
            ],
            bytes: 0,
        };
        assert_eq!(p.source_ranges(), vec![(100, 64), (400, 16)]);
        assert_eq!(p.source_bytes(), 80);
    }
}
