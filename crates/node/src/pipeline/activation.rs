//! Activation frames: hidden states between pipeline hops, sealed per session.
//!
//! ```text
//! header (40 bytes, sent in clear, authenticated as associated data)
//!   version u8 | dtype u8 | reserved u16 | session id [16] | start_pos u32
//!   | n_tokens u32 | n_embd u32 | seq u64            (little endian)
//! body: ChaCha20-Poly1305(payload), nonce = seq ‖ direction
//! payload: n_tokens × n_embd values as f32, f16 (default) or 8-bit blocks
//!   (per 32 values: f16 scale + 32 × i8, like ggml's Q8_0)
//! ```
//!
//! The key of a hop-to-hop link comes from X25519 between the two nodes' identity
//! keys (Ed25519 in Montgomery form, so a node id is all a peer needs), run through
//! BLAKE3 `derive_key` with the session id: each session and each link has its own
//! key, and a frame cannot be replayed into another session. (The transport below
//! is noise-encrypted with ephemeral keys as well.) Small messages (token ids, a
//! step's result) are sealed the same way by [`seal_message`].

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use half::f16;
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::Zeroizing;

/// Format version in every header.
pub const VERSION: u8 = 1;
/// Header length in bytes.
pub const HEADER_LEN: usize = 40;
const Q8_BLOCK: usize = 32;
const KEY_CONTEXT: &str = "swarmllm 2026 activation session key v1";

/// How values travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Dtype {
    /// 4 bytes a value (exact).
    F32 = 0,
    /// 2 bytes a value (the default).
    F16 = 1,
    /// ~1.06 bytes a value: blocks of 32 with an f16 scale.
    Q8 = 2,
}

impl Dtype {
    fn from_u8(v: u8) -> Option<Self> {
        match v {
            0 => Some(Dtype::F32),
            1 => Some(Dtype::F16),
            2 => Some(Dtype::Q8),
            _ => None,
        }
    }

    /// Payload bytes for `n` values.
    pub fn payload_len(self, n: usize) -> usize {
        match self {
            Dtype::F32 => n * 4,
            Dtype::F16 => n * 2,
            Dtype::Q8 => n.div_ceil(Q8_BLOCK) * (2 + Q8_BLOCK),
        }
    }
}

/// The clear part of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Value encoding.
    pub dtype: Dtype,
    /// The pipeline session.
    pub session: [u8; 16],
    /// Position of the first token.
    pub start_pos: u32,
    /// Rows.
    pub n_tokens: u32,
    /// Columns (hidden size).
    pub n_embd: u32,
    /// Message counter within the session and direction (the nonce).
    pub seq: u64,
}

/// A frame could not be opened.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum FrameError {
    /// Too short, unknown version or dtype, or sizes that do not add up.
    #[error("malformed activation frame: {0}")]
    Malformed(String),
    /// Authentication failed: wrong key, edited header or body.
    #[error("activation frame failed authentication")]
    Forged,
}

impl Header {
    fn to_bytes(self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0] = VERSION;
        b[1] = self.dtype as u8;
        b[4..20].copy_from_slice(&self.session);
        b[20..24].copy_from_slice(&self.start_pos.to_le_bytes());
        b[24..28].copy_from_slice(&self.n_tokens.to_le_bytes());
        b[28..32].copy_from_slice(&self.n_embd.to_le_bytes());
        b[32..40].copy_from_slice(&self.seq.to_le_bytes());
        b
    }

    fn from_bytes(b: &[u8]) -> Result<Self, FrameError> {
        if b.len() < HEADER_LEN {
            return Err(FrameError::Malformed(format!(
                "{} bytes is shorter than the header",
                b.len()
            )));
        }
        if b[0] != VERSION {
            return Err(FrameError::Malformed(format!("version {}", b[0])));
        }
        let dtype =
            Dtype::from_u8(b[1]).ok_or_else(|| FrameError::Malformed(format!("dtype {}", b[1])))?;
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let mut session = [0u8; 16];
        session.copy_from_slice(&b[4..20]);
        let mut seq = [0u8; 8];
        seq.copy_from_slice(&b[32..40]);
        Ok(Header {
            dtype,
            session,
            start_pos: u32_at(20),
            n_tokens: u32_at(24),
            n_embd: u32_at(28),
            seq: u64::from_le_bytes(seq),
        })
    }
}

/// Which way a frame travels (part of the nonce, so the two directions of a session
/// never share one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Towards the last hop.
    Forward = 0,
    /// Back towards the requester.
    Backward = 1,
}

/// The key of one session on one hop.
pub struct SessionKey(Zeroizing<[u8; 32]>);

impl std::fmt::Debug for SessionKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SessionKey(..)")
    }
}

/// The X25519 secret two nodes share (static keys on both sides), from which each
/// session's key is derived. Kept per peer so a step costs a BLAKE3 derivation,
/// not a Diffie-Hellman.
#[derive(Clone)]
pub struct LinkSecret(Zeroizing<[u8; 32]>);

impl std::fmt::Debug for LinkSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LinkSecret(..)")
    }
}

impl LinkSecret {
    /// Our X25519 secret with their public key.
    pub fn agree(ours: &StaticSecret, theirs: &PublicKey) -> Self {
        LinkSecret(Zeroizing::new(*ours.diffie_hellman(theirs).as_bytes()))
    }
}

impl SessionKey {
    /// Agrees a key: our X25519 secret, their public key, the session id.
    pub fn agree(ours: &StaticSecret, theirs: &PublicKey, session: &[u8; 16]) -> Self {
        Self::derive(&LinkSecret::agree(ours, theirs), session)
    }

    /// The key of `session` on the link `secret`.
    pub fn derive(secret: &LinkSecret, session: &[u8; 16]) -> Self {
        let mut material = Zeroizing::new([0u8; 48]);
        material[..32].copy_from_slice(secret.0.as_ref());
        material[32..].copy_from_slice(session);
        SessionKey(Zeroizing::new(blake3::derive_key(
            KEY_CONTEXT,
            material.as_ref(),
        )))
    }

    fn cipher(&self) -> ChaCha20Poly1305 {
        ChaCha20Poly1305::new(Key::from_slice(self.0.as_ref()))
    }
}

fn nonce(seq: u64, dir: Direction) -> [u8; 12] {
    let mut n = [0u8; 12];
    n[..8].copy_from_slice(&seq.to_le_bytes());
    n[8] = dir as u8;
    n
}

/// Encodes `values` (row-major `n_tokens × n_embd`) as `dtype`.
pub fn encode(values: &[f32], dtype: Dtype) -> Vec<u8> {
    match dtype {
        Dtype::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        Dtype::F16 => values
            .iter()
            .flat_map(|v| f16::from_f32(*v).to_le_bytes())
            .collect(),
        Dtype::Q8 => {
            let mut out = Vec::with_capacity(dtype.payload_len(values.len()));
            for block in values.chunks(Q8_BLOCK) {
                let amax = block.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                let scale = amax / 127.0;
                let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
                out.extend_from_slice(&f16::from_f32(scale).to_le_bytes());
                for i in 0..Q8_BLOCK {
                    let q = block
                        .get(i)
                        .map(|v| (v * inv).round().clamp(-127.0, 127.0) as i8)
                        .unwrap_or(0);
                    out.push(q as u8);
                }
            }
            out
        }
    }
}

/// Decodes `n` values of `dtype`.
pub fn decode(bytes: &[u8], dtype: Dtype, n: usize) -> Result<Vec<f32>, FrameError> {
    if bytes.len() != dtype.payload_len(n) {
        return Err(FrameError::Malformed(format!(
            "{} payload bytes for {n} values of {dtype:?}",
            bytes.len()
        )));
    }
    Ok(match dtype {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::Q8 => {
            let mut out = Vec::with_capacity(n);
            for block in bytes.chunks_exact(2 + Q8_BLOCK) {
                let scale = f16::from_le_bytes([block[0], block[1]]).to_f32();
                out.extend(block[2..].iter().map(|q| (*q as i8) as f32 * scale));
            }
            out.truncate(n);
            out
        }
    })
}

/// Seals hidden states into a frame.
pub fn seal(
    key: &SessionKey,
    header: Header,
    dir: Direction,
    values: &[f32],
) -> Result<Vec<u8>, FrameError> {
    let n = header.n_tokens as usize * header.n_embd as usize;
    if values.len() != n {
        return Err(FrameError::Malformed(format!(
            "{} values for a {n}-value header",
            values.len()
        )));
    }
    let head = header.to_bytes();
    let payload = encode(values, header.dtype);
    let body = key
        .cipher()
        .encrypt(
            Nonce::from_slice(&nonce(header.seq, dir)),
            Payload {
                msg: &payload,
                aad: &head,
            },
        )
        .map_err(|_| FrameError::Malformed("encryption failed".into()))?;
    let mut frame = head.to_vec();
    frame.extend_from_slice(&body);
    Ok(frame)
}

/// Seals a small message (token ids, a step result) under `key`; `aad` is
/// authenticated but not encrypted.
pub fn seal_message(
    key: &SessionKey,
    seq: u64,
    dir: Direction,
    aad: &[u8],
    plain: &[u8],
) -> Vec<u8> {
    key.cipher()
        .encrypt(
            Nonce::from_slice(&nonce(seq, dir)),
            Payload { msg: plain, aad },
        )
        // ChaCha20-Poly1305 only fails for messages over 256 GiB.
        .unwrap_or_default()
}

/// Opens a message sealed by [`seal_message`].
pub fn open_message(
    key: &SessionKey,
    seq: u64,
    dir: Direction,
    aad: &[u8],
    sealed: &[u8],
) -> Result<Vec<u8>, FrameError> {
    key.cipher()
        .decrypt(
            Nonce::from_slice(&nonce(seq, dir)),
            Payload { msg: sealed, aad },
        )
        .map_err(|_| FrameError::Forged)
}

/// Opens a frame: checks the header, authenticates, decodes.
pub fn open(
    key: &SessionKey,
    frame: &[u8],
    dir: Direction,
) -> Result<(Header, Vec<f32>), FrameError> {
    let header = Header::from_bytes(frame)?;
    let n = (header.n_tokens as usize)
        .checked_mul(header.n_embd as usize)
        .filter(|n| *n <= 64 << 20)
        .ok_or_else(|| FrameError::Malformed("too many values".into()))?;
    let expected = header.dtype.payload_len(n) + 16;
    if frame.len() - HEADER_LEN != expected {
        return Err(FrameError::Malformed(format!(
            "body of {} bytes, header implies {expected}",
            frame.len() - HEADER_LEN
        )));
    }
    let payload = key
        .cipher()
        .decrypt(
            Nonce::from_slice(&nonce(header.seq, dir)),
            Payload {
                msg: &frame[HEADER_LEN..],
                aad: &frame[..HEADER_LEN],
            },
        )
        .map_err(|_| FrameError::Forged)?;
    Ok((header, decode(&payload, header.dtype, n)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> (SessionKey, SessionKey) {
        let a = StaticSecret::random_from_rng(rand::rngs::OsRng);
        let b = StaticSecret::random_from_rng(rand::rngs::OsRng);
        let session = [7u8; 16];
        (
            SessionKey::agree(&a, &PublicKey::from(&b), &session),
            SessionKey::agree(&b, &PublicKey::from(&a), &session),
        )
    }

    fn header(dtype: Dtype) -> Header {
        Header {
            dtype,
            session: [7; 16],
            start_pos: 5,
            n_tokens: 3,
            n_embd: 40,
            seq: 9,
        }
    }

    fn values() -> Vec<f32> {
        (0..120).map(|i| ((i as f32) * 0.37).sin() * 3.0).collect()
    }

    #[test]
    fn both_sides_agree_and_every_dtype_round_trips() {
        let (k1, k2) = keys();
        for (dtype, tol) in [(Dtype::F32, 0.0), (Dtype::F16, 0.002), (Dtype::Q8, 0.03)] {
            let frame = seal(&k1, header(dtype), Direction::Forward, &values()).expect("seal");
            assert_eq!(frame.len(), HEADER_LEN + dtype.payload_len(120) + 16);
            let (h, got) = open(&k2, &frame, Direction::Forward).expect("open");
            assert_eq!(h, header(dtype));
            let err = values()
                .iter()
                .zip(&got)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            assert!(err <= tol * 3.0, "{dtype:?} error {err}");
        }
        // f16 halves and 8-bit roughly quarters the bytes of f32.
        assert_eq!(Dtype::F16.payload_len(576), 1152);
        assert_eq!(Dtype::Q8.payload_len(576), 612);
    }

    #[test]
    fn edited_misdirected_foreign_or_malformed_frames_are_refused() {
        let (k1, k2) = keys();
        let frame = seal(&k1, header(Dtype::F16), Direction::Forward, &values()).expect("seal");
        // An edited header (associated data) or body fails authentication.
        let mut edited = frame.clone();
        edited[21] ^= 1; // start_pos
        assert_eq!(
            open(&k2, &edited, Direction::Forward),
            Err(FrameError::Forged)
        );
        let mut edited = frame.clone();
        let last = edited.len() - 1;
        edited[last] ^= 1;
        assert_eq!(
            open(&k2, &edited, Direction::Forward),
            Err(FrameError::Forged)
        );
        // The other direction's nonce, or another session's key, does not open it.
        assert_eq!(
            open(&k2, &frame, Direction::Backward),
            Err(FrameError::Forged)
        );
        let (other, _) = keys();
        assert_eq!(
            open(&other, &frame, Direction::Forward),
            Err(FrameError::Forged)
        );
        // Malformed: short, bad version, bad dtype, sizes that do not add up.
        assert!(matches!(
            open(&k2, &frame[..10], Direction::Forward),
            Err(FrameError::Malformed(_))
        ));
        let mut bad = frame.clone();
        bad[0] = 9;
        assert!(matches!(
            open(&k2, &bad, Direction::Forward),
            Err(FrameError::Malformed(_))
        ));
        let mut bad = frame.clone();
        bad[1] = 9;
        assert!(matches!(
            open(&k2, &bad, Direction::Forward),
            Err(FrameError::Malformed(_))
        ));
        assert!(matches!(
            open(&k2, &frame[..frame.len() - 4], Direction::Forward),
            Err(FrameError::Malformed(_))
        ));
        let mut huge = frame.clone();
        huge[24..28].copy_from_slice(&u32::MAX.to_le_bytes());
        huge[28..32].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            open(&k2, &huge, Direction::Forward),
            Err(FrameError::Malformed(_))
        ));
        assert!(seal(&k1, header(Dtype::F16), Direction::Forward, &[1.0]).is_err());
    }
}
