//! Running one layer range of a model: tokens or hidden states in, hidden states or
//! logits out. The only module with `unsafe`; everything else uses its safe API.
//!
//! `llama-cpp-2` has no way to feed hidden states or read a layer's output, so this
//! talks to `llama-cpp-sys-2` directly:
//! - hidden states go in through the batch's `embd` slot (`llama_batch_init` with
//!   `embd = n_embd`), instead of token ids;
//! - the output of the range's last layer (`l_out-<n-1>`) is copied out in the eval
//!   callback, before the final norm;
//! - on a range that does not end the model every row is marked as output, or
//!   llama.cpp would drop all but the last row before the last layer and the next
//!   range could not build its KV cache.

use std::ffi::{CStr, CString, c_void};
use std::path::Path;
use std::ptr::NonNull;
use std::sync::Arc;

use llama_cpp_sys_2 as sys;

/// Running a layer range failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LayerError {
    /// The GGUF could not be loaded.
    #[error("llama.cpp could not load {0}")]
    Load(String),
    /// The context could not be created.
    #[error("could not create a context")]
    Context,
    /// Input of the wrong size or an empty batch.
    #[error("bad input: {0}")]
    Input(String),
    /// `llama_decode` failed.
    #[error("decode failed with status {0}")]
    Decode(i32),
    /// The layer output was not captured (an unsupported graph).
    #[error("the range's output tensor {0} was not produced")]
    NoCapture(String),
}

/// A model file for one layer range, loaded.
pub struct RangeModel {
    raw: NonNull<sys::llama_model>,
    n_embd: usize,
    n_layer: u32,
    n_vocab: usize,
    kv_bytes_per_token: u64,
}

// SAFETY: a loaded llama_model is immutable and llama.cpp allows using it from any
// thread (llama-cpp-2 marks its LlamaModel Send + Sync for the same reason).
unsafe impl Send for RangeModel {}
// SAFETY: as above; contexts created from it synchronise their own state.
unsafe impl Sync for RangeModel {}

impl Drop for RangeModel {
    fn drop(&mut self) {
        // SAFETY: `raw` came from llama_model_load_from_file and is freed once; every
        // RangeSession borrows the model, so none outlives it.
        unsafe { sys::llama_model_free(self.raw.as_ptr()) }
    }
}

impl std::fmt::Debug for RangeModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RangeModel")
            .field("n_layer", &self.n_layer)
            .field("n_embd", &self.n_embd)
            .finish()
    }
}

impl RangeModel {
    /// Loads a range GGUF (see `shard::assemble`).
    pub fn load(path: &Path, gpu_layers: u32) -> Result<Self, LayerError> {
        super::engine::backend(None).map_err(|e| LayerError::Load(e.to_string()))?;
        let cpath = path
            .to_str()
            .and_then(|p| CString::new(p).ok())
            .ok_or_else(|| LayerError::Load(format!("{} is not a usable path", path.display())))?;
        // SAFETY: plain struct of defaults returned by value.
        let mut params = unsafe { sys::llama_model_default_params() };
        params.n_gpu_layers = gpu_layers.min(i32::MAX as u32) as i32;
        // SAFETY: `cpath` is a valid NUL-terminated string for the call's duration;
        // the backend is initialised above.
        let raw = unsafe { sys::llama_model_load_from_file(cpath.as_ptr(), params) };
        let raw = NonNull::new(raw).ok_or_else(|| LayerError::Load(path.display().to_string()))?;
        // SAFETY: `raw` is a valid model for these read-only queries.
        let (n_embd, n_layer, n_vocab) = unsafe {
            let vocab = sys::llama_model_get_vocab(raw.as_ptr());
            (
                sys::llama_model_n_embd(raw.as_ptr()),
                sys::llama_model_n_layer(raw.as_ptr()),
                sys::llama_vocab_n_tokens(vocab),
            )
        };
        // SAFETY: as above.
        let (n_head, n_head_kv) = unsafe {
            (
                sys::llama_model_n_head(raw.as_ptr()).max(1) as u64,
                sys::llama_model_n_head_kv(raw.as_ptr()).max(1) as u64,
            )
        };
        let head_dim =
            meta_u64(raw, "attention.key_length").unwrap_or(n_embd.max(0) as u64 / n_head);
        Ok(Self {
            raw,
            n_embd: n_embd.max(0) as usize,
            n_layer: n_layer.max(0) as u32,
            n_vocab: n_vocab.max(0) as usize,
            // K and V, f16, every layer.
            kv_bytes_per_token: 2 * 2 * u64::from(n_layer.max(0) as u32) * n_head_kv * head_dim,
        })
    }

    /// Tokenizes `text` with this model's vocabulary (the first range has the real
    /// one), adding BOS when the model wants it and parsing special tokens.
    pub fn tokenize(&self, text: &str) -> Result<Vec<i32>, LayerError> {
        let len =
            i32::try_from(text.len()).map_err(|_| LayerError::Input("text too long".into()))?;
        let mut out = vec![0i32; text.len() + 8];
        // SAFETY: `text` is valid for `len` bytes; `out` has room for `out.len()`
        // tokens; a negative result reports the size needed and writes nothing.
        let n = unsafe {
            let vocab = sys::llama_model_get_vocab(self.raw.as_ptr());
            sys::llama_tokenize(
                vocab,
                text.as_ptr().cast(),
                len,
                out.as_mut_ptr(),
                out.len() as i32,
                true,
                true,
            )
        };
        if n < 0 {
            return Err(LayerError::Input(format!(
                "tokenization needs {} tokens",
                -n
            )));
        }
        out.truncate(n as usize);
        Ok(out)
    }

    /// Hidden size.
    pub fn n_embd(&self) -> usize {
        self.n_embd
    }

    /// Layers in this range.
    pub fn n_layer(&self) -> u32 {
        self.n_layer
    }

    /// KV cache bytes one token of one session takes (f16 K and V, every layer).
    pub fn kv_bytes_per_token(&self) -> u64 {
        self.kv_bytes_per_token
    }

    /// Vocabulary size (1 for a range that never sees tokens).
    pub fn n_vocab(&self) -> usize {
        self.n_vocab
    }

    /// Starts a session (its own KV cache). `emit_hidden` selects the output: the
    /// range's last hidden states (for ranges that do not end the model) or the
    /// logits of the last row. `batch` is the most rows one [`RangeSession::forward`]
    /// takes (≤ 512); keep it equal to the whole-model engine's batch size, since
    /// llama.cpp's results depend on how rows are batched.
    pub fn session(
        self: &Arc<Self>,
        n_ctx: u32,
        batch: u32,
        threads: u32,
        emit_hidden: bool,
    ) -> Result<RangeSession, LayerError> {
        self.streams(n_ctx, batch, threads, emit_hidden, 1)
    }

    /// A context with `streams` sequences (ids `0..streams`), each with its own
    /// KV stream of `n_ctx` cells, so steps of several sessions can be decoded in
    /// one batch ([`RangeSession::forward_many`]) while each attends only to its
    /// own cells, exactly as in a context of its own.
    pub fn streams(
        self: &Arc<Self>,
        n_ctx: u32,
        batch: u32,
        threads: u32,
        emit_hidden: bool,
        streams: u32,
    ) -> Result<RangeSession, LayerError> {
        let streams = streams.max(1);
        let batch = batch.clamp(1, 512);
        let mut capture = Box::new(Capture {
            name: CString::new(format!("l_out-{}", self.n_layer.saturating_sub(1)))
                .map_err(|_| LayerError::Context)?,
            data: Vec::new(),
            wrong_type: false,
        });
        // SAFETY: plain struct of defaults returned by value.
        let mut params = unsafe { sys::llama_context_default_params() };
        params.n_ctx = n_ctx.saturating_mul(streams);
        params.n_seq_max = streams;
        params.kv_unified = false;
        params.n_batch = batch;
        params.n_ubatch = batch;
        params.n_threads = threads.max(1) as i32;
        params.n_threads_batch = threads.max(1) as i32;
        if emit_hidden {
            params.cb_eval = Some(eval_callback);
            params.cb_eval_user_data = (&mut *capture as *mut Capture).cast::<c_void>();
        }
        // SAFETY: the session holds an Arc of the model, so the model outlives the
        // context; the callback's user data is the boxed Capture, which the session
        // owns and drops only after freeing the context.
        let ctx = unsafe { sys::llama_init_from_model(self.raw.as_ptr(), params) };
        let ctx = NonNull::new(ctx).ok_or(LayerError::Context)?;
        Ok(RangeSession {
            model: Arc::clone(self),
            batch: batch as usize,
            ctx,
            capture,
            emit_hidden,
            streams,
        })
    }
}

/// `<arch>.<key>` from the model's metadata as a number.
fn meta_u64(model: NonNull<sys::llama_model>, key: &str) -> Option<u64> {
    let mut buf = [0u8; 128];
    let arch_key = CString::new("general.architecture").ok()?;
    // SAFETY: the key is NUL-terminated; the buffer's length is passed, and
    // llama.cpp NUL-terminates what it writes (a negative result means absent).
    let n = unsafe {
        sys::llama_model_meta_val_str(
            model.as_ptr(),
            arch_key.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    if n < 0 {
        return None;
    }
    let arch = CStr::from_bytes_until_nul(&buf)
        .ok()?
        .to_str()
        .ok()?
        .to_string();
    let full = CString::new(format!("{arch}.{key}")).ok()?;
    let mut out = [0u8; 64];
    // SAFETY: as above.
    let n = unsafe {
        sys::llama_model_meta_val_str(
            model.as_ptr(),
            full.as_ptr(),
            out.as_mut_ptr().cast(),
            out.len(),
        )
    };
    if n < 0 {
        return None;
    }
    CStr::from_bytes_until_nul(&out)
        .ok()?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// What the eval callback collects.
struct Capture {
    name: CString,
    data: Vec<f32>,
    wrong_type: bool,
}

/// ggml's eval callback: asked first whether we want a tensor (`ask`), then called
/// with its data once computed.
unsafe extern "C" fn eval_callback(t: *mut sys::ggml_tensor, ask: bool, user: *mut c_void) -> bool {
    // SAFETY: `user` is the session's boxed Capture (set in `session`), alive while
    // the context is; ggml calls back on the thread running llama_decode, which holds
    // the session's &mut, so there is no other access.
    let capture = unsafe { &mut *user.cast::<Capture>() };
    // SAFETY: ggml passes a valid tensor whose name is a NUL-terminated buffer.
    let name = unsafe { CStr::from_ptr(sys::ggml_get_name(t)) };
    if name != capture.name.as_c_str() {
        return !ask; // not interested; keep computing
    }
    if ask {
        return true;
    }
    // SAFETY: `t` is valid for reading during the callback.
    let (ty, nbytes) = unsafe { ((*t).type_, sys::ggml_nbytes(t)) };
    if ty != sys::GGML_TYPE_F32 {
        capture.wrong_type = true;
        return true;
    }
    let start = capture.data.len();
    capture.data.resize(start + nbytes / 4, 0.0);
    // SAFETY: the destination has exactly `nbytes` bytes of space from `start`; the
    // tensor's data is computed when ask == false.
    unsafe {
        sys::ggml_backend_tensor_get(
            t,
            capture.data[start..].as_mut_ptr().cast::<c_void>(),
            0,
            nbytes,
        );
    }
    // Stop the graph here: what follows (final norm, output head) is for the logits,
    // which a range that emits hidden states never reads. On a first range the head
    // is the full-vocabulary (often tied) embedding matrix, the costliest matmul of
    // the whole range. ggml skips the rest of the graph when the callback says no.
    false
}

/// Input to a range.
#[derive(Debug, Clone, Copy)]
pub enum RangeInput<'a> {
    /// Token ids (the first range).
    Tokens(&'a [i32]),
    /// Hidden states, `n_tokens × n_embd` row-major (later ranges).
    Hidden(&'a [f32]),
}

/// Output of a range.
#[derive(Debug, Clone, PartialEq)]
pub enum RangeOutput {
    /// Hidden states of every input row, `n_tokens × n_embd`.
    Hidden(Vec<f32>),
    /// Logits of the last row (of the last few rows, row after row, when
    /// asked with [`RangeSession::forward_many_rows`]).
    Logits(Vec<f32>),
}

/// One sequence's KV cache on a range.
pub struct RangeSession {
    model: Arc<RangeModel>,
    batch: usize,
    ctx: NonNull<sys::llama_context>,
    capture: Box<Capture>,
    emit_hidden: bool,
    /// Sequences (KV streams) in the context.
    streams: u32,
}

impl std::fmt::Debug for RangeSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RangeSession")
            .field("emit_hidden", &self.emit_hidden)
            .finish()
    }
}

impl Drop for RangeSession {
    fn drop(&mut self) {
        // SAFETY: `ctx` came from llama_init_from_model and is freed once, before the
        // boxed Capture its callback points to (fields drop after this body).
        unsafe { sys::llama_free(self.ctx.as_ptr()) }
    }
}

impl RangeSession {
    /// Runs `input` at positions `pos0..` of sequence 0, extending the KV cache.
    pub fn forward(&mut self, input: RangeInput<'_>, pos0: i32) -> Result<RangeOutput, LayerError> {
        let mut out = self.forward_many(&[(0, input, pos0)])?;
        out.pop()
            .ok_or_else(|| LayerError::Input("no output".into()))
    }

    /// Runs several sequences' inputs in one decode: `(sequence, input,
    /// first position)` each, all token ids or all hidden states, all with the
    /// same number of rows, in ascending sequence order. llama.cpp splits a batch
    /// over separate KV streams into micro-batches that take the same number of
    /// rows from each sequence, in sequence order; only then do the captured
    /// hidden states come out row for row in batch order (unequal inputs would
    /// come out interleaved). Returns each input's output in turn.
    pub fn forward_many(
        &mut self,
        items: &[(i32, RangeInput<'_>, i32)],
    ) -> Result<Vec<RangeOutput>, LayerError> {
        self.forward_many_rows(items, 1)
    }

    /// [`Self::forward_many`], with the logits of each input's last
    /// `logit_rows` rows (1 to its rows) where the range has the head: a
    /// speculative step's verification needs the model's choice after every
    /// draft token.
    pub fn forward_many_rows(
        &mut self,
        items: &[(i32, RangeInput<'_>, i32)],
        logit_rows: usize,
    ) -> Result<Vec<RangeOutput>, LayerError> {
        let n_embd = self.model.n_embd;
        let mut rows = Vec::with_capacity(items.len());
        for (i, (seq, input, _)) in items.iter().enumerate() {
            if *seq < 0 || *seq as u32 >= self.streams {
                return Err(LayerError::Input(format!(
                    "sequence {seq} of {}",
                    self.streams
                )));
            }
            if i > 0 && items[i - 1].0 >= *seq {
                return Err(LayerError::Input("sequences out of order".into()));
            }
            if std::mem::discriminant(input) != std::mem::discriminant(&items[0].1) {
                return Err(LayerError::Input("tokens and hidden states mixed".into()));
            }
            let n = match input {
                RangeInput::Tokens(t) => t.len(),
                RangeInput::Hidden(h) if h.len() % n_embd == 0 => h.len() / n_embd,
                RangeInput::Hidden(h) => {
                    return Err(LayerError::Input(format!(
                        "{} floats is not a multiple of n_embd {n_embd}",
                        h.len()
                    )));
                }
            };
            if n == 0 {
                return Err(LayerError::Input("an empty input".into()));
            }
            if let RangeInput::Tokens(t) = input
                && let Some(bad) = t
                    .iter()
                    .find(|&&t| t < 0 || t as usize >= self.model.n_vocab)
            {
                // llama.cpp aborts the process on an out-of-range token id.
                return Err(LayerError::Input(format!(
                    "token id {bad} is outside the vocabulary"
                )));
            }
            if logit_rows == 0 || logit_rows > n {
                return Err(LayerError::Input(format!(
                    "logits of {logit_rows} rows of an input of {n}"
                )));
            }
            if rows.first().is_some_and(|first| *first != n) {
                return Err(LayerError::Input(
                    "inputs of different lengths in one batch".into(),
                ));
            }
            rows.push(n);
        }
        let total: usize = rows.iter().sum();
        if items.is_empty() || total > self.batch {
            return Err(LayerError::Input(format!(
                "{total} rows (1..={} per call)",
                self.batch
            )));
        }
        let hidden_in = matches!(items[0].1, RangeInput::Hidden(_));
        self.capture.data.clear();
        self.capture.wrong_type = false;
        // Each input's first row with logits (the last `logit_rows`).
        let mut last_rows = Vec::with_capacity(items.len());
        // SAFETY: llama_batch_init allocates `total` rows (with an embd buffer of
        // total × n_embd floats when hidden_in); every write below stays within
        // them (`at` counts rows up to `total`), and the batch is freed on every
        // path after decode.
        let status = unsafe {
            let batch =
                sys::llama_batch_init(total as i32, if hidden_in { n_embd as i32 } else { 0 }, 1);
            let mut at = 0usize;
            for ((seq, input, pos0), n) in items.iter().zip(&rows) {
                match input {
                    RangeInput::Tokens(t) => {
                        std::ptr::copy_nonoverlapping(t.as_ptr(), batch.token.add(at), *n)
                    }
                    RangeInput::Hidden(h) => std::ptr::copy_nonoverlapping(
                        h.as_ptr(),
                        batch.embd.add(at * n_embd),
                        n * n_embd,
                    ),
                }
                for i in 0..*n {
                    *batch.pos.add(at + i) = pos0 + i as i32;
                    *batch.n_seq_id.add(at + i) = 1;
                    *(*batch.seq_id.add(at + i)) = *seq;
                    *batch.logits.add(at + i) = i8::from(self.emit_hidden || i + logit_rows >= *n);
                }
                at += n;
                last_rows.push(at - logit_rows);
            }
            let mut batch = batch;
            batch.n_tokens = total as i32;
            let status = sys::llama_decode(self.ctx.as_ptr(), batch);
            sys::llama_batch_free(batch);
            status
        };
        if status != 0 {
            return Err(LayerError::Decode(status));
        }
        if self.emit_hidden {
            let data = std::mem::take(&mut self.capture.data);
            if self.capture.wrong_type || data.len() != total * n_embd {
                return Err(LayerError::NoCapture(
                    self.capture.name.to_string_lossy().into_owned(),
                ));
            }
            let mut out = Vec::with_capacity(items.len());
            let mut from = 0;
            for n in rows {
                out.push(RangeOutput::Hidden(data[from..from + n * n_embd].to_vec()));
                from += n * n_embd;
            }
            return Ok(out);
        }
        let n_vocab = self.model.n_vocab;
        last_rows
            .into_iter()
            .map(|first| {
                let mut logits = Vec::with_capacity(logit_rows * n_vocab);
                for row in first..first + logit_rows {
                    // SAFETY: each input's last `logit_rows` rows were marked
                    // as outputs, so each one's logits row of n_vocab floats is
                    // valid until the next decode; it is copied out at once.
                    unsafe {
                        let p = sys::llama_get_logits_ith(self.ctx.as_ptr(), row as i32);
                        if p.is_null() {
                            return Err(LayerError::Decode(-1));
                        }
                        logits.extend_from_slice(std::slice::from_raw_parts(p, n_vocab));
                    }
                }
                Ok(RangeOutput::Logits(logits))
            })
            .collect()
    }

    /// Sequences (KV streams) this context holds.
    pub fn streams(&self) -> u32 {
        self.streams
    }

    /// The model this session runs.
    pub fn model(&self) -> &Arc<RangeModel> {
        &self.model
    }

    /// Empties the KV cache so the context can serve a new session: cells are
    /// allocated from the first again, exactly as in a fresh context.
    pub fn reset(&mut self) {
        // SAFETY: the context is valid; clearing its memory's metadata is always
        // allowed (the data buffers are overwritten before they are read again).
        unsafe {
            let mem = sys::llama_get_memory(self.ctx.as_ptr());
            sys::llama_memory_clear(mem, false);
        }
        self.capture.data.clear();
    }

    /// Forgets everything from position `pos` on (rollback; 0 clears the session).
    pub fn truncate(&mut self, pos: i32) {
        self.truncate_seq(0, pos);
    }

    /// Forgets sequence `seq`'s cells from position `pos` on (0: all of them).
    pub fn truncate_seq(&mut self, seq: i32, pos: i32) {
        if seq < 0 || seq as u32 >= self.streams {
            return;
        }
        // SAFETY: the context is valid and `seq` is one of its sequences;
        // removing a position range of a sequence is always allowed.
        unsafe {
            let mem = sys::llama_get_memory(self.ctx.as_ptr());
            sys::llama_memory_seq_rm(mem, seq, pos, -1);
        }
    }
}
