//! A small GGUF reader and writer (format v2/v3), enough to split a model into
//! layer shards and to put shards back together. Pure Rust: tensor data is copied
//! byte for byte, never interpreted.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::Path;

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;

/// A GGUF file could not be read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GgufError {
    /// I/O failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// Not a GGUF file, or an unsupported version or value type.
    #[error("not a usable GGUF file: {0}")]
    Format(String),
}

fn bad(msg: impl Into<String>) -> GgufError {
    GgufError::Format(msg.into())
}

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// u8
    U8(u8),
    /// i8
    I8(i8),
    /// u16
    U16(u16),
    /// i16
    I16(i16),
    /// u32
    U32(u32),
    /// i32
    I32(i32),
    /// f32
    F32(f32),
    /// bool
    Bool(bool),
    /// string
    Str(String),
    /// array of one element type (the type code is kept for empty arrays)
    Array(u32, Vec<Value>),
    /// u64
    U64(u64),
    /// i64
    I64(i64),
    /// f64
    F64(f64),
}

impl Value {
    fn type_code(&self) -> u32 {
        match self {
            Value::U8(_) => 0,
            Value::I8(_) => 1,
            Value::U16(_) => 2,
            Value::I16(_) => 3,
            Value::U32(_) => 4,
            Value::I32(_) => 5,
            Value::F32(_) => 6,
            Value::Bool(_) => 7,
            Value::Str(_) => 8,
            Value::Array(..) => 9,
            Value::U64(_) => 10,
            Value::I64(_) => 11,
            Value::F64(_) => 12,
        }
    }

    /// As an unsigned integer, if it is one.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v as u64),
            Value::U16(v) => Some(v as u64),
            Value::U32(v) => Some(v as u64),
            Value::U64(v) => Some(v),
            Value::I8(v) if v >= 0 => Some(v as u64),
            Value::I16(v) if v >= 0 => Some(v as u64),
            Value::I32(v) if v >= 0 => Some(v as u64),
            Value::I64(v) if v >= 0 => Some(v as u64),
            _ => None,
        }
    }

    /// As a float, if it is a number.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v as f64),
            Value::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    /// As a string, if it is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    /// As JSON (arrays longer than `max_array` are summarised).
    pub fn to_json(&self, max_array: usize) -> serde_json::Value {
        use serde_json::json;
        match self {
            Value::U8(v) => json!(v),
            Value::I8(v) => json!(v),
            Value::U16(v) => json!(v),
            Value::I16(v) => json!(v),
            Value::U32(v) => json!(v),
            Value::I32(v) => json!(v),
            Value::F32(v) => json!(v),
            Value::Bool(v) => json!(v),
            Value::Str(v) => json!(v),
            Value::U64(v) => json!(v),
            Value::I64(v) => json!(v),
            Value::F64(v) => json!(v),
            Value::Array(_, items) if items.len() > max_array => {
                json!({ "array_len": items.len() })
            }
            Value::Array(_, items) => {
                serde_json::Value::Array(items.iter().map(|v| v.to_json(max_array)).collect())
            }
        }
    }
}

/// A tensor's description and where its bytes are.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    /// Name, e.g. `blk.3.attn_q.weight`.
    pub name: String,
    /// Dimensions.
    pub dims: Vec<u64>,
    /// ggml type code.
    pub ggml_type: u32,
    /// Offset of the data from the start of the data section.
    pub offset: u64,
    /// Bytes from this tensor's start to the next tensor's (data plus padding).
    pub span: u64,
}

impl TensorInfo {
    /// The layer a `blk.N.*` tensor belongs to.
    pub fn layer(&self) -> Option<u32> {
        self.layer_and_rest().map(|(l, _)| l)
    }

    /// `blk.N.rest` as `(N, "rest")`.
    pub fn layer_and_rest(&self) -> Option<(u32, &str)> {
        let (n, rest) = self.name.strip_prefix("blk.")?.split_once('.')?;
        Some((n.parse().ok()?, rest))
    }
}

/// The parsed header of a GGUF file.
#[derive(Debug, Clone)]
pub struct Gguf {
    /// Format version.
    pub version: u32,
    /// Metadata in file order.
    pub kv: Vec<(String, Value)>,
    /// Tensors in file order.
    pub tensors: Vec<TensorInfo>,
    /// Alignment of the data section.
    pub alignment: u64,
    /// Where the data section starts.
    pub data_offset: u64,
}

/// Reads little-endian values, knowing how many bytes are left: no length read
/// from the file is trusted further than the bytes that could back it.
struct Reader<R> {
    r: R,
    pos: u64,
    len: u64,
}

/// Bytes a metadata entry takes at least (key length, type, one byte of value).
const MIN_KV_BYTES: u64 = 8 + 4 + 1;
/// Bytes a tensor info takes at least (name length, dims, type, offset).
const MIN_TENSOR_BYTES: u64 = 8 + 4 + 4 + 8;
/// Largest alignment accepted (llama.cpp writes 32).
const MAX_ALIGNMENT: u64 = 1 << 16;

impl<R: Read> Reader<R> {
    fn left(&self) -> u64 {
        self.len.saturating_sub(self.pos)
    }
    fn bytes<const N: usize>(&mut self) -> Result<[u8; N], GgufError> {
        let mut b = [0u8; N];
        self.r.read_exact(&mut b)?;
        self.pos += N as u64;
        Ok(b)
    }
    fn u32(&mut self) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.bytes()?))
    }
    fn u64(&mut self) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.bytes()?))
    }
    /// A count of items of at least `min_bytes` each, checked against the bytes left.
    fn count(&mut self, what: &str, min_bytes: u64) -> Result<u64, GgufError> {
        let n = self.u64()?;
        if n > self.left() / min_bytes {
            return Err(bad(format!(
                "{n} {what} in {} bytes left of the file",
                self.left()
            )));
        }
        Ok(n)
    }
    fn string(&mut self) -> Result<String, GgufError> {
        let len = self.count("string bytes", 1)?;
        if len > 1 << 24 {
            return Err(bad(format!("string of {len} bytes")));
        }
        let mut b = vec![0u8; len as usize];
        self.r.read_exact(&mut b)?;
        self.pos += len;
        String::from_utf8(b).map_err(|_| bad("string is not UTF-8"))
    }
    fn value(&mut self, ty: u32, depth: u32) -> Result<Value, GgufError> {
        Ok(match ty {
            0 => Value::U8(u8::from_le_bytes(self.bytes()?)),
            1 => Value::I8(i8::from_le_bytes(self.bytes()?)),
            2 => Value::U16(u16::from_le_bytes(self.bytes()?)),
            3 => Value::I16(i16::from_le_bytes(self.bytes()?)),
            4 => Value::U32(self.u32()?),
            5 => Value::I32(i32::from_le_bytes(self.bytes()?)),
            6 => Value::F32(f32::from_le_bytes(self.bytes()?)),
            7 => Value::Bool(self.bytes::<1>()?[0] != 0),
            8 => Value::Str(self.string()?),
            9 if depth == 0 => {
                let item_ty = self.u32()?;
                let n = self.count("array items", 1)?;
                if n > 1 << 26 {
                    return Err(bad(format!("array of {n} items")));
                }
                let mut items = Vec::with_capacity(n.min(1 << 20) as usize);
                for _ in 0..n {
                    items.push(self.value(item_ty, depth + 1)?);
                }
                Value::Array(item_ty, items)
            }
            10 => Value::U64(self.u64()?),
            11 => Value::I64(i64::from_le_bytes(self.bytes()?)),
            12 => Value::F64(f64::from_le_bytes(self.bytes()?)),
            other => return Err(bad(format!("value type {other}"))),
        })
    }
}

/// `x` rounded up to a multiple of `a` (a power of two), or `None` on overflow.
fn align(x: u64, a: u64) -> Option<u64> {
    x.checked_next_multiple_of(a)
}

fn aligned(x: u64, a: u64) -> Result<u64, GgufError> {
    align(x, a).ok_or_else(|| bad("offset overflows"))
}

impl Gguf {
    /// Reads the header (metadata and tensor infos) of a GGUF file.
    pub fn read(path: &Path) -> Result<Gguf, GgufError> {
        let file = File::open(path)?;
        let len = file.metadata()?.len();
        Self::parse(BufReader::new(file), len, true)
    }

    /// Reads a header-only file (such as `gguf_header.bin`): tensor spans are 0.
    pub fn read_header(path: &Path) -> Result<Gguf, GgufError> {
        let file = File::open(path)?;
        let len = file.metadata()?.len();
        Self::parse(BufReader::new(file), len, false)
    }

    /// Parses a header held in memory (as fetched from a peer): tensor spans are 0.
    pub fn header_from_bytes(bytes: &[u8]) -> Result<Gguf, GgufError> {
        Self::parse(bytes, bytes.len() as u64, false)
    }

    /// Parses the header of a GGUF file of `file_len` bytes from its first bytes
    /// (as read with HTTP range requests): tensor spans come from `file_len`. Too
    /// few bytes for the whole header is an [`GgufError::Io`] of kind
    /// `UnexpectedEof`, so a caller can fetch more and try again.
    pub fn header_of_file(bytes: &[u8], file_len: u64) -> Result<Gguf, GgufError> {
        Self::parse(bytes, file_len, true)
    }

    /// Parses a whole GGUF held in memory (tensor spans from its length).
    pub fn from_bytes(bytes: &[u8]) -> Result<Gguf, GgufError> {
        Self::parse(bytes, bytes.len() as u64, true)
    }

    /// Parses `len` bytes from `r`. Every count and length is checked against
    /// the bytes left before anything is allocated from it, and every offset with
    /// checked arithmetic.
    fn parse<R: Read>(r: R, len: u64, with_data: bool) -> Result<Gguf, GgufError> {
        let mut r = Reader { r, pos: 0, len };
        if &r.bytes::<4>()? != MAGIC {
            return Err(bad("missing GGUF magic"));
        }
        let version = r.u32()?;
        if !(2..=3).contains(&version) {
            return Err(bad(format!("GGUF version {version}")));
        }
        let n_tensors = r.u64()?;
        let n_kv = r.u64()?;
        if n_tensors > 1 << 20 || n_kv > 1 << 20 {
            return Err(bad("implausible tensor or key count"));
        }
        if n_kv > r.left() / MIN_KV_BYTES || n_tensors > r.left() / MIN_TENSOR_BYTES {
            return Err(bad("more keys or tensors than the file has room for"));
        }
        let mut kv = Vec::with_capacity(n_kv as usize);
        for _ in 0..n_kv {
            let key = r.string()?;
            let ty = r.u32()?;
            kv.push((key, r.value(ty, 0)?));
        }
        if n_tensors > r.left() / MIN_TENSOR_BYTES {
            return Err(bad("more tensors than the file has room for"));
        }
        let mut tensors = Vec::with_capacity(n_tensors as usize);
        for _ in 0..n_tensors {
            let name = r.string()?;
            let n_dims = r.u32()?;
            if n_dims > 8 {
                return Err(bad(format!("tensor {name} has {n_dims} dimensions")));
            }
            let dims = (0..n_dims)
                .map(|_| r.u64())
                .collect::<Result<Vec<_>, _>>()?;
            if dims
                .iter()
                .try_fold(1u64, |acc, &d| acc.checked_mul(d))
                .is_none()
            {
                return Err(bad(format!(
                    "tensor {name} has more elements than fit 64 bits"
                )));
            }
            let ggml_type = r.u32()?;
            let offset = r.u64()?;
            tensors.push(TensorInfo {
                name,
                dims,
                ggml_type,
                offset,
                span: 0,
            });
        }
        let alignment = match kv.iter().find(|(k, _)| k == "general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some((_, v)) => v
                .as_u64()
                .filter(|a| a.is_power_of_two() && *a <= MAX_ALIGNMENT)
                .ok_or_else(|| {
                    bad(format!(
                        "general.alignment must be a power of two up to {MAX_ALIGNMENT}"
                    ))
                })?,
        };
        let data_offset = aligned(r.pos, alignment)?;
        if tensors.iter().any(|t| t.offset % alignment != 0) {
            return Err(bad("a tensor offset is not aligned"));
        }
        if !with_data {
            return Ok(Gguf {
                version,
                kv,
                tensors,
                alignment,
                data_offset,
            });
        }
        // Spans from the sorted offsets; the last runs to the end of the file.
        let data_len = len
            .checked_sub(data_offset)
            .ok_or_else(|| bad("file ends before its data section"))?;
        let mut order: Vec<usize> = (0..tensors.len()).collect();
        order.sort_by_key(|&i| tensors.get(i).map_or(0, |t| t.offset));
        let offsets: Vec<u64> = order
            .iter()
            .filter_map(|&i| tensors.get(i).map(|t| t.offset))
            .collect();
        for (k, &i) in order.iter().enumerate() {
            let end = offsets.get(k + 1).copied().unwrap_or(data_len);
            let start = offsets.get(k).copied().unwrap_or(0);
            let span = end
                .checked_sub(start)
                .ok_or_else(|| bad("a tensor lies past the end of the file"))?;
            if let Some(t) = tensors.get_mut(i) {
                t.span = span;
            }
        }
        Ok(Gguf {
            version,
            kv,
            tensors,
            alignment,
            data_offset,
        })
    }

    /// A metadata value.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.kv.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// Sets (or adds) a metadata value.
    pub fn set(&mut self, key: &str, value: Value) {
        match self.kv.iter_mut().find(|(k, _)| k == key) {
            Some((_, v)) => *v = value,
            None => self.kv.push((key.to_string(), value)),
        }
    }

    /// `general.architecture`.
    pub fn architecture(&self) -> Option<&str> {
        self.get("general.architecture")?.as_str()
    }

    /// `<arch>.block_count`.
    pub fn block_count(&self) -> Option<u32> {
        let arch = self.architecture()?;
        self.get(&format!("{arch}.block_count"))?
            .as_u64()
            .and_then(|v| u32::try_from(v).ok())
    }
}

fn write_string<W: Write>(w: &mut W, s: &str) -> std::io::Result<()> {
    w.write_all(&(s.len() as u64).to_le_bytes())?;
    w.write_all(s.as_bytes())
}

fn write_value<W: Write>(w: &mut W, v: &Value) -> std::io::Result<()> {
    match v {
        Value::U8(x) => w.write_all(&x.to_le_bytes()),
        Value::I8(x) => w.write_all(&x.to_le_bytes()),
        Value::U16(x) => w.write_all(&x.to_le_bytes()),
        Value::I16(x) => w.write_all(&x.to_le_bytes()),
        Value::U32(x) => w.write_all(&x.to_le_bytes()),
        Value::I32(x) => w.write_all(&x.to_le_bytes()),
        Value::F32(x) => w.write_all(&x.to_le_bytes()),
        Value::Bool(x) => w.write_all(&[u8::from(*x)]),
        Value::Str(s) => write_string(w, s),
        Value::Array(ty, items) => {
            w.write_all(&ty.to_le_bytes())?;
            w.write_all(&(items.len() as u64).to_le_bytes())?;
            items.iter().try_for_each(|i| write_value(w, i))
        }
        Value::U64(x) => w.write_all(&x.to_le_bytes()),
        Value::I64(x) => w.write_all(&x.to_le_bytes()),
        Value::F64(x) => w.write_all(&x.to_le_bytes()),
    }
}

/// A tensor to write: its (possibly new) name and where its bytes come from.
#[derive(Debug, Clone)]
pub struct TensorSource<'a> {
    /// Name in the new file.
    pub name: String,
    /// Shape, type and (for file data) location.
    pub info: std::borrow::Cow<'a, TensorInfo>,
    /// The bytes.
    pub data: TensorData<'a>,
}

/// Where a tensor's bytes come from.
#[derive(Debug, Clone)]
pub enum TensorData<'a> {
    /// `info.span` bytes at `data_offset + info.offset` of `file`.
    File {
        /// The source file.
        file: &'a Path,
        /// The source file's data offset.
        data_offset: u64,
    },
    /// These bytes (placeholders made on the fly).
    Inline(Vec<u8>),
    /// `info.span` zero bytes left as a hole in the file (sparse where the file
    /// system allows): a placeholder whose values are never read.
    Zeros,
}

impl<'a> TensorSource<'a> {
    /// A tensor copied from a file, under `name`.
    pub fn from_file(name: String, info: &'a TensorInfo, file: &'a Path, data_offset: u64) -> Self {
        Self {
            name,
            info: std::borrow::Cow::Borrowed(info),
            data: TensorData::File { file, data_offset },
        }
    }

    /// A tensor named `name` with `info`'s shape, type and size, all zeros (a hole
    /// in the file).
    pub fn zeros(name: &str, info: TensorInfo) -> TensorSource<'static> {
        TensorSource {
            name: name.to_string(),
            info: std::borrow::Cow::Owned(TensorInfo {
                name: name.to_string(),
                ..info
            }),
            data: TensorData::Zeros,
        }
    }

    /// An f32 tensor of the given shape and values.
    pub fn f32(name: &str, dims: Vec<u64>, values: &[f32]) -> TensorSource<'static> {
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        TensorSource {
            name: name.to_string(),
            info: std::borrow::Cow::Owned(TensorInfo {
                name: name.to_string(),
                dims,
                ggml_type: 0, // GGML_TYPE_F32
                offset: 0,
                span: bytes.len() as u64,
            }),
            data: TensorData::Inline(bytes),
        }
    }
}

/// The bytes of a GGUF file before its tensor data (magic, metadata, tensor
/// infos, padding) for `kv` and `tensors`, and the file's total length: both
/// follow from the tensors' shapes and spans alone, so a shard's size and header
/// are known before any of its tensor bytes are.
pub fn encode_header<'t>(
    kv: &[(String, Value)],
    alignment: u64,
    tensors: impl IntoIterator<Item = (&'t str, &'t TensorInfo)>,
) -> Result<(Vec<u8>, u64), GgufError> {
    let tensors: Vec<(&str, &TensorInfo)> = tensors.into_iter().collect();
    let mut head = Vec::new();
    head.extend_from_slice(MAGIC);
    head.extend_from_slice(&3u32.to_le_bytes());
    head.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    head.extend_from_slice(&(kv.len() as u64).to_le_bytes());
    for (k, v) in kv {
        write_string(&mut head, k)?;
        head.extend_from_slice(&v.type_code().to_le_bytes());
        write_value(&mut head, v)?;
    }
    if !alignment.is_power_of_two() || alignment > MAX_ALIGNMENT {
        return Err(bad(format!("alignment {alignment}")));
    }
    let mut offset = 0u64;
    for (name, info) in tensors {
        write_string(&mut head, name)?;
        head.extend_from_slice(&(info.dims.len() as u32).to_le_bytes());
        for d in &info.dims {
            head.extend_from_slice(&d.to_le_bytes());
        }
        head.extend_from_slice(&info.ggml_type.to_le_bytes());
        head.extend_from_slice(&offset.to_le_bytes());
        offset = aligned(
            offset
                .checked_add(info.span)
                .ok_or_else(|| bad("offset overflows"))?,
            alignment,
        )?;
    }
    let head_len = head.len() as u64;
    head.resize(aligned(head_len, alignment)? as usize, 0);
    let total = (head.len() as u64)
        .checked_add(offset)
        .ok_or_else(|| bad("offset overflows"))?;
    Ok((head, total))
}

/// Writes a GGUF with `kv` and the given tensors, copying their bytes.
pub fn write(
    path: &Path,
    kv: &[(String, Value)],
    alignment: u64,
    tensors: &[TensorSource<'_>],
) -> Result<(), GgufError> {
    let mut w = BufWriter::new(File::create(path)?);
    let (head, total) = encode_header(
        kv,
        alignment,
        tensors.iter().map(|t| (t.name.as_str(), t.info.as_ref())),
    )?;
    w.write_all(&head)?;
    let mut written = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    for t in tensors {
        match &t.data {
            TensorData::Zeros => {
                w.flush()?;
                let span = i64::try_from(t.info.span).map_err(|_| bad("tensor too large"))?;
                w.get_mut().seek(SeekFrom::Current(span))?;
            }
            TensorData::Inline(bytes) => w.write_all(bytes)?,
            TensorData::File { file, data_offset } => {
                let mut src = File::open(file)?;
                let at = data_offset
                    .checked_add(t.info.offset)
                    .ok_or_else(|| bad("offset overflows"))?;
                src.seek(SeekFrom::Start(at))?;
                let mut left = t.info.span;
                while left > 0 {
                    let n = left.min(buf.len() as u64) as usize;
                    src.read_exact(&mut buf[..n])?;
                    w.write_all(&buf[..n])?;
                    left -= n as u64;
                }
            }
        }
        written += t.info.span;
        let pad = aligned(written, alignment)? - written;
        w.write_all(&vec![0u8; pad as usize])?;
        written += pad;
    }
    w.flush()?;
    // A hole at the end is not in the file until its length says so.
    w.get_ref().set_len(total)?;
    w.get_ref().sync_all()?;
    Ok(())
}
