//! Multi-part GGUFs, as big models are published: `name-00001-of-00003.gguf` …,
//! each a GGUF with `split.no`, `split.count` and `split.tensors.count`, the
//! model's metadata in the first part and its tensors spread over all of them.
//!
//! A split model is planned as one **virtual file**: the header a merged file
//! would have (the first part's metadata without `split.*`, every part's tensor
//! infos in order, offsets laid out back to back) followed by the tensors' bytes.
//! That header is what a node keeps as `gguf_header.bin` and plans from, so the
//! shards of a split model are the same whoever makes them; a [`SourceMap`]
//! turns a byte range of the virtual file into ranges of the parts (and the zero
//! padding between tensors), which is what an import reads from disk and a
//! download reads from the Hub.

use super::ShardError;
use super::gguf::{Gguf, TensorInfo, Value, encode_header};

/// The metadata key that carries the virtual file's data length (a merged header
/// cannot say where its last tensor ends otherwise).
pub const DATA_BYTES_KEY: &str = "swarmllm.source.data_bytes";
/// Most parts a model may be published in.
pub const MAX_PARTS: u32 = 256;

/// `name-00001-of-00003.gguf` → the names of all its parts, in order.
pub fn part_names(first: &str) -> Option<Vec<String>> {
    let stem = first.strip_suffix(".gguf")?;
    let (rest, count) = stem.rsplit_once("-of-")?;
    let (base, no) = rest.rsplit_once('-')?;
    if no != "00001" || count.len() != 5 {
        return None;
    }
    let n: u32 = count.parse().ok()?;
    if !(2..=MAX_PARTS).contains(&n) {
        return None;
    }
    Some(
        (1..=n)
            .map(|i| format!("{base}-{i:05}-of-{n:05}.gguf"))
            .collect(),
    )
}

/// How many parts a GGUF header says its model has (1 for a whole file).
pub fn split_count(g: &Gguf) -> u64 {
    g.get("split.count").and_then(Value::as_u64).unwrap_or(1)
}

/// One piece of a virtual range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Piece {
    /// `len` bytes of part `part` from byte `offset`.
    Part {
        /// Index of the part.
        part: usize,
        /// Offset in that part.
        offset: u64,
        /// Byte count.
        len: u64,
    },
    /// `len` zero bytes (padding the parts do not have).
    Zeros(u64),
}

/// Where each stretch of the virtual file lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceMap {
    /// `(virtual offset, virtual length, part, part offset, bytes in the part)`,
    /// sorted by virtual offset; the bytes past those in the part are zeros.
    entries: Vec<(u64, u64, usize, u64, u64)>,
}

impl SourceMap {
    /// A single file: the virtual file is the file.
    pub fn whole(len: u64) -> SourceMap {
        SourceMap {
            entries: vec![(0, len, 0, 0, len)],
        }
    }

    /// The pieces of virtual bytes `offset..offset + len`.
    pub fn pieces(&self, offset: u64, len: u64) -> Result<Vec<Piece>, ShardError> {
        let end = offset
            .checked_add(len)
            .ok_or_else(|| ShardError::Invalid("a range overflows".into()))?;
        let mut out = Vec::new();
        let mut at = offset;
        let first = self
            .entries
            .partition_point(|&(v, vlen, ..)| v + vlen <= offset);
        for &(v, vlen, part, poff, plen) in self.entries.iter().skip(first) {
            if at >= end {
                break;
            }
            if v > at {
                return Err(ShardError::Invalid(format!(
                    "virtual bytes {at}..{v} belong to no part"
                )));
            }
            let stop = end.min(v + vlen);
            let inner = at - v;
            let in_part = plen.saturating_sub(inner).min(stop - at);
            if in_part > 0 {
                match out.last_mut() {
                    Some(Piece::Part {
                        part: p,
                        offset: o,
                        len: l,
                    }) if *p == part && *o + *l == poff + inner => *l += in_part,
                    _ => out.push(Piece::Part {
                        part,
                        offset: poff + inner,
                        len: in_part,
                    }),
                }
            }
            let zeros = stop - at - in_part;
            if zeros > 0 {
                out.push(Piece::Zeros(zeros));
            }
            at = stop;
        }
        if at < end {
            return Err(ShardError::Invalid(format!(
                "virtual bytes {at}..{end} lie past the parts"
            )));
        }
        Ok(out)
    }
}

/// The merged (virtual) header of a split model from its parts' headers (each
/// parsed with its spans, see [`Gguf::header_of_file`]), the header parsed, and
/// the map from the virtual file to the parts.
pub fn merge(parts: &[Gguf]) -> Result<(Vec<u8>, Gguf, SourceMap), ShardError> {
    let first = parts
        .first()
        .ok_or_else(|| ShardError::Invalid("no parts".into()))?;
    let count = split_count(first);
    if count != parts.len() as u64 {
        return Err(ShardError::Invalid(format!(
            "the first part says {count} parts, {} were given",
            parts.len()
        )));
    }
    for (i, p) in parts.iter().enumerate() {
        if p.get("split.no").and_then(Value::as_u64) != Some(i as u64) {
            return Err(ShardError::Invalid(format!(
                "part {} does not say split.no = {i}",
                i + 1
            )));
        }
        if p.alignment != first.alignment {
            return Err(ShardError::Invalid("the parts differ in alignment".into()));
        }
    }
    let declared = first.get("split.tensors.count").and_then(Value::as_u64);
    let total: usize = parts.iter().map(|p| p.tensors.len()).sum();
    if declared.is_some_and(|d| d != total as u64) {
        return Err(ShardError::Invalid(format!(
            "the parts hold {total} tensors, the first says {declared:?}"
        )));
    }
    let align = first.alignment;
    let mut tensors: Vec<TensorInfo> = Vec::with_capacity(total);
    let mut located: Vec<(u64, usize, u64, u64)> = Vec::with_capacity(total);
    let mut offset = 0u64;
    let mut names = std::collections::HashSet::with_capacity(total);
    for (i, p) in parts.iter().enumerate() {
        for t in &p.tensors {
            if !names.insert(t.name.as_str()) {
                return Err(ShardError::Invalid(format!(
                    "tensor {} is in two parts",
                    t.name
                )));
            }
            let vspan = t.span.next_multiple_of(align);
            tensors.push(TensorInfo {
                offset,
                span: vspan,
                ..t.clone()
            });
            located.push((offset, i, p.data_offset + t.offset, t.span));
            offset = offset
                .checked_add(vspan)
                .ok_or_else(|| ShardError::Invalid("the parts' sizes overflow".into()))?;
        }
    }
    let mut kv: Vec<(String, Value)> = first
        .kv
        .iter()
        .filter(|(k, _)| !k.starts_with("split."))
        .cloned()
        .collect();
    kv.retain(|(k, _)| k != DATA_BYTES_KEY);
    kv.push((DATA_BYTES_KEY.into(), Value::U64(offset)));
    let (header, len) = encode_header(&kv, align, tensors.iter().map(|t| (t.name.as_str(), t)))?;
    let merged = Gguf::header_of_file(&header, len)?;
    let data_offset = header.len() as u64;
    let mut entries: Vec<(u64, u64, usize, u64, u64)> = located
        .into_iter()
        .zip(&tensors)
        .map(|((voff, part, poff, plen), t)| (data_offset + voff, t.span, part, poff, plen))
        .collect();
    entries.sort_by_key(|e| e.0);
    Ok((header, merged, SourceMap { entries }))
}

/// Writes the GGUF at `source` as `parts` files in `out_dir`, the way
/// `llama-gguf-split` publishes big models: `<stem>-0000i-of-0000n.gguf`, the
/// metadata and `split.*` keys in the first, only the `split.*` keys in the others,
/// the tensors in order spread evenly. Returns the paths, first part first.
pub fn write_split(
    source: &std::path::Path,
    out_dir: &std::path::Path,
    parts: u32,
) -> Result<Vec<std::path::PathBuf>, ShardError> {
    use super::gguf::TensorSource;
    if !(2..=MAX_PARTS).contains(&parts) {
        return Err(ShardError::Invalid(format!("2 to {MAX_PARTS} parts")));
    }
    let g = Gguf::read(source)?;
    let stem = source
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("model");
    let per = g.tensors.len().div_ceil(parts as usize).max(1);
    let split_keys = |i: u32| {
        vec![
            ("split.no".to_string(), Value::U16(i as u16)),
            ("split.count".to_string(), Value::U16(parts as u16)),
            (
                "split.tensors.count".to_string(),
                Value::I32(g.tensors.len() as i32),
            ),
        ]
    };
    let mut out = Vec::new();
    for i in 0..parts {
        let mut kv = split_keys(i);
        if i == 0 {
            kv.extend(
                g.kv.iter()
                    .filter(|(k, _)| !k.starts_with("split."))
                    .cloned(),
            );
        }
        let tensors: Vec<TensorSource<'_>> = g
            .tensors
            .iter()
            .skip(i as usize * per)
            .take(per)
            .map(|t| TensorSource::from_file(t.name.clone(), t, source, g.data_offset))
            .collect();
        let path = out_dir.join(format!("{stem}-{:05}-of-{parts:05}.gguf", i + 1));
        super::gguf::write(&path, &kv, g.alignment, &tensors)?;
        out.push(path);
    }
    Ok(out)
}

/// The virtual file's length a merged header declares (`None` for the header of
/// a whole file).
pub fn declared_len(g: &Gguf) -> Option<u64> {
    g.get(DATA_BYTES_KEY)
        .and_then(Value::as_u64)
        .and_then(|d| g.data_offset.checked_add(d))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn part_names_follow_the_first() {
        assert_eq!(
            part_names("m-Q4_K_M-00001-of-00003.gguf"),
            Some(vec![
                "m-Q4_K_M-00001-of-00003.gguf".to_string(),
                "m-Q4_K_M-00002-of-00003.gguf".to_string(),
                "m-Q4_K_M-00003-of-00003.gguf".to_string(),
            ])
        );
        assert_eq!(part_names("m-00002-of-00003.gguf"), None);
        assert_eq!(part_names("m.gguf"), None);
    }

    #[test]
    fn virtual_ranges_map_to_parts_and_padding() {
        let map = SourceMap {
            entries: vec![(100, 64, 0, 500, 60), (164, 32, 1, 40, 32)],
        };
        assert_eq!(
            map.pieces(100, 96).expect("pieces"),
            vec![
                Piece::Part {
                    part: 0,
                    offset: 500,
                    len: 60
                },
                Piece::Zeros(4),
                Piece::Part {
                    part: 1,
                    offset: 40,
                    len: 32
                },
            ]
        );
        assert_eq!(
            map.pieces(110, 10).expect("inside"),
            vec![Piece::Part {
                part: 0,
                offset: 510,
                len: 10
            }]
        );
        assert!(map.pieces(150, 100).is_err());
        assert_eq!(
            SourceMap::whole(1000).pieces(10, 20).expect("whole"),
            vec![Piece::Part {
                part: 0,
                offset: 10,
                len: 20
            }]
        );
    }
}
