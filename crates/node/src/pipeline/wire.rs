//! The bytes of one pipeline step, carried on a link (`/swarmllm/step/1`, see
//! `net::link`) in the frames of `net::frame` (request kind 0x10, answer 0x90).
//!
//! ```text
//! request  = u32 BE envelope length | envelope (JSON) | body
//!   body   = activation frame (hidden states, see `activation`)      input "hidden"
//!          | sealed message of the token ids as i32 LE               input "tokens"
//! answer   = u32 LE µs the answering node spent | result
//!   result = sealed message: empty (no sampling), or the sampled token:
//!            i32 LE token [| f32 LE logprob | u8 k | k × (i32 LE id, f32 LE logprob)]
//!            (the bracketed part only when the requester signed `logprobs` into
//!            the step, with k at most what it asked for),
//!            or for a step with `draft` = d > 0: (d + 1) × i32 LE token, the
//!            token sampled after each of the step's last d + 1 rows
//! error    = error frame whose message is a JSON [`StepFailure`]
//! ```
//!
//! The envelope carries the route still ahead (the recipient first), so each hop
//! forwards its output straight to the next one; the result travels back along the
//! chain of open links, sealed end to end between the last hop and the requester.
//! Each answer also says how long the answering node took (its compute and the rest
//! of the chain behind it), so the sender can tell the link's own cost from the
//! wait (unauthenticated, used for statistics only).
//! Every body is sealed for its link (sender → recipient) with the step's `seq` as
//! nonce; hops refuse a `seq` they have already seen in a session.

use serde::{Deserialize, Serialize};

use super::activation::Dtype;

/// Largest envelope accepted.
const MAX_ENVELOPE: usize = 64 * 1024;
/// Most hops a route may have.
pub const MAX_HOPS: usize = 32;
/// Most draft tokens one step may carry for verification.
pub const MAX_DRAFT: u32 = 16;

/// One hop of a route: who runs which layers of which model.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Hash)]
pub struct Hop {
    /// The node's id.
    pub node_id: String,
    /// The model.
    pub model_id: String,
    /// First layer the hop runs.
    pub layer_start: u32,
    /// One past its last layer.
    pub layer_end: u32,
}

/// Sampling the last hop applies (llama.cpp's sampler chain, as the local engine).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SampleSpec {
    /// 0 selects greedy decoding.
    pub temperature: f32,
    /// Nucleus threshold.
    pub top_p: f32,
    /// Top-k (0 = off).
    pub top_k: i32,
    /// Min-p (0 = off).
    pub min_p: f32,
    /// Repeat penalty (1 = off).
    pub repeat_penalty: f32,
    /// Tokens the penalty looks back over.
    pub repeat_last_n: i32,
    /// RNG seed (the requester always picks one, so a re-routed session continues
    /// with a known seed).
    pub seed: u32,
    /// The JSON schema the answer follows (`response_format`); the sampling hop
    /// turns it into a grammar with llama.cpp's converter. Absent when the
    /// request has none, so other steps sign and travel as before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub json_schema: Option<String>,
    /// Return the sampled token's log-probability with this many alternatives
    /// (0–20). Absent when not asked for, as `json_schema`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<u8>,
}

impl SampleSpec {
    /// The sampling part of a generation's parameters, with a fixed seed (a random
    /// one when the request named none).
    pub fn from_params(p: &crate::infer::SamplingParams) -> Self {
        SampleSpec {
            temperature: p.temperature,
            top_p: p.top_p,
            top_k: p.top_k,
            min_p: p.min_p,
            repeat_penalty: p.repeat_penalty,
            repeat_last_n: p.repeat_last_n,
            seed: p.seed.unwrap_or_else(rand::random),
            json_schema: p.json_schema.clone(),
            logprobs: p.logprobs,
        }
    }

    /// Back to parameters for llama.cpp's sampler chain (at the last hop).
    pub fn to_params(&self) -> crate::infer::SamplingParams {
        crate::infer::SamplingParams {
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            min_p: self.min_p,
            repeat_penalty: self.repeat_penalty,
            repeat_last_n: self.repeat_last_n,
            seed: Some(self.seed),
            json_schema: self.json_schema.clone(),
            logprobs: self.logprobs,
            ..crate::infer::SamplingParams::default()
        }
    }
}

/// What the body holds.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum InputKind {
    /// Token ids (to the first hop).
    Tokens,
    /// Hidden states (to every later hop).
    Hidden,
}

/// The clear part of a step request.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Envelope {
    /// Session id, 32 hex characters.
    pub session: String,
    /// Step counter within the session (strictly increasing; the nonce).
    pub seq: u64,
    /// The node that started the session and receives the result.
    pub requester: String,
    /// The hops still ahead, the recipient first.
    pub route: Vec<Hop>,
    /// Position of the first row.
    pub pos: u32,
    /// Rows in this step.
    pub n_tokens: u32,
    /// What the body holds.
    pub input: InputKind,
    /// How hidden states travel onwards (`f16`, `f32`, `q8`).
    pub dtype: String,
    /// Sample a token at the last hop (absent while replaying or on prompt
    /// chunks before the last).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sample: Option<SampleSpec>,
    /// Tokens the last hop's sampler accepts before sampling (a re-routed session's
    /// earlier output, for repeat penalties).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub prime: Vec<i32>,
    /// End the session on every hop (no rows, empty body).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub close: bool,
    /// The step's last `draft` rows are draft tokens (speculative decoding):
    /// the last hop samples after each of the last `draft + 1` rows, not only
    /// the last, so the requester sees how many drafts the model agrees with.
    /// Only for samplers whose choice depends on each row's logits alone
    /// (greedy, no penalties, grammar or log-probabilities).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub draft: u32,
    /// A session of the same requester whose KV cache this new session takes
    /// over on every hop (a conversation's next turn reuses its history; the
    /// step's position says how much of it is kept).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub continues: Option<String>,
    /// Hex Ed25519 signature by `requester` over [`Envelope::signed_part`]: every
    /// hop, not only the first, knows the requester it serves (and names in its
    /// receipt) really sent this step.
    #[serde(default)]
    pub requester_sig: String,
}

/// Why a step failed, as sent back along the chain.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct StepFailure {
    /// The hop that failed or could not be reached, if one is to blame.
    #[serde(default)]
    pub failed_hop: Option<String>,
    /// What went wrong.
    pub message: String,
}

/// A step request could not be decoded.
#[derive(Debug, thiserror::Error, PartialEq)]
#[non_exhaustive]
pub enum WireError {
    /// Too short, too long or not the format.
    #[error("malformed step request: {0}")]
    Malformed(String),
}

const STEP_SIGNATURE_TAG: &str = "swarmllm step v1";

impl Envelope {
    /// What the requester signs: everything but the route and the input kind
    /// (which each hop changes as it forwards the step).
    fn signed_part(&self) -> Vec<u8> {
        let sample = serde_json::to_string(&self.sample).unwrap_or_default();
        let prime: Vec<u8> = self.prime.iter().flat_map(|t| t.to_le_bytes()).collect();
        let mut signed = format!(
            "{STEP_SIGNATURE_TAG}\n{}\n{}\n{}\n{}\n{}\n{}\n{}\n{}\n{}",
            self.requester,
            self.session,
            self.seq,
            self.pos,
            self.n_tokens,
            self.close,
            self.dtype,
            sample,
            blake3::hash(&prime).to_hex(),
        );
        // Only when present, so steps without them sign as before.
        if let Some(c) = &self.continues {
            signed.push_str("\ncontinues ");
            signed.push_str(c);
        }
        if self.draft > 0 {
            signed.push_str(&format!("\ndraft {}", self.draft));
        }
        signed.into_bytes()
    }

    /// Signs the step as its requester.
    pub fn sign(&mut self, requester: &crate::identity::Identity) {
        self.requester_sig = hex::encode(requester.sign(&self.signed_part()).to_bytes());
    }

    /// Whether the step carries its requester's valid signature.
    pub fn requester_signed(&self) -> bool {
        let mut sig = [0u8; 64];
        hex::decode_to_slice(&self.requester_sig, &mut sig).is_ok()
            && crate::identity::verify(
                &self.requester,
                &self.signed_part(),
                &ed25519_dalek::Signature::from_bytes(&sig),
            )
    }

    /// The session id as bytes.
    pub fn session_bytes(&self) -> Result<[u8; 16], WireError> {
        session_id("session", &self.session)
    }

    /// The dtype for onward hidden states.
    pub fn dtype(&self) -> Result<Dtype, WireError> {
        parse_dtype(&self.dtype)
            .ok_or_else(|| WireError::Malformed(format!("unknown dtype {:?}", self.dtype)))
    }

    fn check(&self) -> Result<(), WireError> {
        if self.route.is_empty() || self.route.len() > MAX_HOPS {
            return Err(WireError::Malformed(format!(
                "a route of {} hops",
                self.route.len()
            )));
        }
        if (self.n_tokens == 0 && !self.close) || self.n_tokens > 512 {
            return Err(WireError::Malformed(format!(
                "{} rows (1..=512)",
                self.n_tokens
            )));
        }
        if self.route.iter().any(|h| h.layer_start >= h.layer_end) {
            return Err(WireError::Malformed("a hop with no layers".into()));
        }
        if self.prime.len() > 1 << 16 {
            return Err(WireError::Malformed("prime is too long".into()));
        }
        if self.draft > MAX_DRAFT || (self.draft > 0 && self.draft >= self.n_tokens) {
            return Err(WireError::Malformed(format!(
                "{} draft tokens in a step of {} rows (at most {MAX_DRAFT}, fewer than the rows)",
                self.draft, self.n_tokens
            )));
        }
        if self.draft > 0 && self.sample.is_none() {
            return Err(WireError::Malformed("draft tokens without sampling".into()));
        }
        self.session_bytes()?;
        self.continues_bytes()?;
        self.dtype()?;
        Ok(())
    }

    /// The session whose cache this one takes over, as bytes.
    pub fn continues_bytes(&self) -> Result<Option<[u8; 16]>, WireError> {
        self.continues
            .as_deref()
            .map(|c| session_id("continues", c))
            .transpose()
    }
}

/// A session id field: 32 hex characters, as 16 bytes.
fn session_id(field: &str, text: &str) -> Result<[u8; 16], WireError> {
    let mut out = [0u8; 16];
    hex::decode_to_slice(text, &mut out)
        .map_err(|_| WireError::Malformed(format!("{field} is not 32 hex characters")))?;
    Ok(out)
}

/// `f16` → [`Dtype::F16`], etc.
pub fn parse_dtype(s: &str) -> Option<Dtype> {
    match s {
        "f16" => Some(Dtype::F16),
        "f32" => Some(Dtype::F32),
        "q8" => Some(Dtype::Q8),
        _ => None,
    }
}

/// [`Dtype::F16`] → `f16`, etc. (the inverse of [`parse_dtype`]).
pub fn dtype_name(d: Dtype) -> &'static str {
    match d {
        Dtype::F32 => "f32",
        Dtype::F16 => "f16",
        Dtype::Q8 => "q8",
    }
}

/// Encodes a step request.
pub fn encode_request(envelope: &Envelope, body: &[u8]) -> Vec<u8> {
    let head = serde_json::to_vec(envelope).unwrap_or_default();
    let mut out = Vec::with_capacity(4 + head.len() + body.len());
    out.extend_from_slice(&(head.len() as u32).to_be_bytes());
    out.extend_from_slice(&head);
    out.extend_from_slice(body);
    out
}

/// Decodes and checks a step request; the body is returned unopened.
pub fn decode_request(bytes: &[u8]) -> Result<(Envelope, &[u8]), WireError> {
    if bytes.len() < 4 {
        return Err(WireError::Malformed(format!("{} bytes", bytes.len())));
    }
    let len = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) as usize;
    if len > MAX_ENVELOPE || len > bytes.len() - 4 {
        return Err(WireError::Malformed(format!(
            "an envelope of {len} bytes in a {}-byte request",
            bytes.len()
        )));
    }
    let envelope: Envelope = serde_json::from_slice(&bytes[4..4 + len])
        .map_err(|e| WireError::Malformed(format!("envelope: {e}")))?;
    envelope.check()?;
    Ok((envelope, &bytes[4 + len..]))
}

/// Encodes a step's answer: the time the answering node spent, then the result.
pub fn encode_answer(spent: std::time::Duration, result: &[u8]) -> Vec<u8> {
    let micros = u32::try_from(spent.as_micros()).unwrap_or(u32::MAX);
    let mut out = Vec::with_capacity(4 + result.len());
    out.extend_from_slice(&micros.to_le_bytes());
    out.extend_from_slice(result);
    out
}

/// Splits a step's answer into the time the answering node spent and the result.
pub fn decode_answer(bytes: &[u8]) -> Result<(std::time::Duration, &[u8]), WireError> {
    let Some((micros, result)) = bytes.split_first_chunk::<4>() else {
        return Err(WireError::Malformed(format!(
            "a {}-byte step answer",
            bytes.len()
        )));
    };
    Ok((
        std::time::Duration::from_micros(u64::from(u32::from_le_bytes(*micros))),
        result,
    ))
}

/// A token the last hop sampled, with its log-probability and the best
/// alternatives' when the requester asked (ids as the last hop sent them: the
/// requester checks them against its vocabulary before using them).
#[derive(Debug, Clone, PartialEq)]
pub struct Sampled {
    /// The token (after the step's last row, or its first verified row for a
    /// step with drafts).
    pub token: i32,
    /// Its log-probability and the alternatives (id, log-probability).
    pub logprobs: Option<(f32, Vec<(i32, f32)>)>,
    /// For a step with drafts: the token sampled after each draft row in turn.
    pub after_drafts: Vec<i32>,
}

impl Sampled {
    /// A token with nothing else.
    pub fn token(token: i32) -> Self {
        Sampled {
            token,
            logprobs: None,
            after_drafts: Vec::new(),
        }
    }
}

/// A step's result (see the module's grammar).
pub fn encode_result(sampled: Option<&Sampled>) -> Vec<u8> {
    let Some(s) = sampled else { return Vec::new() };
    let mut out = s.token.to_le_bytes().to_vec();
    if !s.after_drafts.is_empty() {
        out.extend(tokens_to_bytes(&s.after_drafts));
        return out;
    }
    if let Some((lp, top)) = &s.logprobs {
        let k = top.len().min(usize::from(u8::MAX));
        out.extend(lp.to_le_bytes());
        out.push(k as u8);
        for (id, lp) in &top[..k] {
            out.extend(id.to_le_bytes());
            out.extend(lp.to_le_bytes());
        }
    }
    out
}

/// Reads a step's result, refusing anything but the shapes the requester can
/// have asked for: log-probabilities only when `wanted` is `Some(k)`, with at
/// most `k` alternatives, each a finite log-probability (≤ 0, with rounding
/// slack) and a non-negative id; for a step with `draft` tokens, exactly
/// `draft + 1` tokens.
pub fn decode_result(
    plain: &[u8],
    wanted: Option<u8>,
    draft: u32,
) -> Result<Option<Sampled>, WireError> {
    let bad = |what: String| Err(WireError::Malformed(what));
    if plain.is_empty() {
        return Ok(None);
    }
    if draft > 0 {
        // One token per row, checked before anything is allocated.
        if plain.len() != (draft as usize + 1) * 4 {
            return bad(format!(
                "{} bytes for a step with {draft} drafts",
                plain.len()
            ));
        }
        let mut tokens = bytes_to_tokens(plain)?;
        let token = tokens.remove(0);
        return Ok(Some(Sampled {
            token,
            logprobs: None,
            after_drafts: tokens,
        }));
    }
    let i32_at =
        |i: usize| i32::from_le_bytes([plain[i], plain[i + 1], plain[i + 2], plain[i + 3]]);
    let f32_at =
        |i: usize| f32::from_le_bytes([plain[i], plain[i + 1], plain[i + 2], plain[i + 3]]);
    let sane = |lp: f32| lp.is_finite() && lp <= 1e-3;
    if plain.len() == 4 {
        return match wanted {
            None => Ok(Some(Sampled::token(i32_at(0)))),
            Some(_) => bad("a sampled token without the log-probabilities asked for".into()),
        };
    }
    let Some(k_max) = wanted else {
        return bad(format!("a {}-byte step result", plain.len()));
    };
    if plain.len() < 9 {
        return bad(format!("a {}-byte step result", plain.len()));
    }
    let k = plain[8];
    if k > k_max || plain.len() != 9 + 8 * usize::from(k) {
        return bad(format!(
            "a {}-byte step result with {k} alternatives (asked for {k_max})",
            plain.len()
        ));
    }
    let lp = f32_at(4);
    let mut top = Vec::with_capacity(usize::from(k));
    for j in 0..usize::from(k) {
        let (id, alt) = (i32_at(9 + 8 * j), f32_at(13 + 8 * j));
        if id < 0 || !sane(alt) {
            return bad(
                "an alternative with a negative id or a log-probability out of range".into(),
            );
        }
        top.push((id, alt));
    }
    if !sane(lp) {
        return bad("a log-probability out of range".into());
    }
    Ok(Some(Sampled {
        token: i32_at(0),
        logprobs: Some((lp, top)),
        after_drafts: Vec::new(),
    }))
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// Token ids as bytes.
pub fn tokens_to_bytes(tokens: &[i32]) -> Vec<u8> {
    tokens.iter().flat_map(|t| t.to_le_bytes()).collect()
}

/// Bytes as token ids.
pub fn bytes_to_tokens(bytes: &[u8]) -> Result<Vec<i32>, WireError> {
    if !bytes.len().is_multiple_of(4) {
        return Err(WireError::Malformed(format!(
            "{} bytes of token ids",
            bytes.len()
        )));
    }
    Ok(bytes
        .chunks_exact(4)
        .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_round_trip_and_only_asked_shapes_are_accepted() {
        let plain = Sampled::token(7);
        let with = Sampled {
            token: 7,
            logprobs: Some((-0.5, vec![(7, -0.5), (3, -1.25)])),
            after_drafts: Vec::new(),
        };
        assert_eq!(
            decode_result(&encode_result(None), None, 0).ok(),
            Some(None)
        );
        assert_eq!(
            decode_result(&encode_result(Some(&plain)), None, 0).ok(),
            Some(Some(plain.clone()))
        );
        let bytes = encode_result(Some(&with));
        assert_eq!(
            decode_result(&bytes, Some(2), 0).ok(),
            Some(Some(with.clone()))
        );
        // Not asked for, more alternatives than asked, missing, cut, garbage.
        assert!(decode_result(&bytes, None, 0).is_err());
        assert!(decode_result(&bytes, Some(1), 0).is_err());
        assert!(decode_result(&encode_result(Some(&plain)), Some(2), 0).is_err());
        assert!(decode_result(&bytes[..bytes.len() - 1], Some(2), 0).is_err());
        for bad_lp in [f32::NAN, f32::INFINITY, 0.5] {
            let mut b = encode_result(Some(&with));
            b[4..8].copy_from_slice(&bad_lp.to_le_bytes());
            assert!(decode_result(&b, Some(2), 0).is_err(), "{bad_lp}");
            let mut b = encode_result(Some(&with));
            b[13..17].copy_from_slice(&bad_lp.to_le_bytes());
            assert!(decode_result(&b, Some(2), 0).is_err(), "{bad_lp}");
        }
        let mut b = encode_result(Some(&with));
        b[9..13].copy_from_slice(&(-1i32).to_le_bytes());
        assert!(decode_result(&b, Some(2), 0).is_err());
        // A verification step's tokens: exactly one per draft and one more.
        let verified = Sampled {
            after_drafts: vec![4, 5],
            ..Sampled::token(7)
        };
        let bytes = encode_result(Some(&verified));
        assert_eq!(decode_result(&bytes, None, 2).ok(), Some(Some(verified)));
        assert!(decode_result(&bytes, None, 3).is_err());
        assert!(decode_result(&bytes, None, 1).is_err());
        assert!(decode_result(&bytes[..5], None, 2).is_err());
    }

    fn envelope() -> Envelope {
        Envelope {
            session: "00112233445566778899aabbccddeeff".into(),
            seq: 3,
            requester: "r".into(),
            route: vec![Hop {
                node_id: "a".into(),
                model_id: "m".into(),
                layer_start: 0,
                layer_end: 10,
            }],
            pos: 0,
            n_tokens: 2,
            input: InputKind::Tokens,
            dtype: "f16".into(),
            sample: None,
            prime: vec![],
            continues: None,
            close: false,
            draft: 0,
            requester_sig: String::new(),
        }
    }

    #[test]
    fn requests_round_trip() {
        let env = envelope();
        let bytes = encode_request(&env, &[1, 2, 3]);
        let (got, body) = decode_request(&bytes).expect("decodes");
        assert_eq!(got, env);
        assert_eq!(body, &[1, 2, 3]);
        assert_eq!(
            bytes_to_tokens(&tokens_to_bytes(&[5, -1])).expect("ok"),
            vec![5, -1]
        );
    }

    #[test]
    fn steps_are_signed_by_their_requester() {
        let requester = crate::identity::Identity::generate();
        let mut env = envelope();
        env.requester = requester.node_id();
        env.sign(&requester);
        assert!(env.requester_signed());
        // Forwarding changes the route and the input kind: still valid.
        let mut forwarded = env.clone();
        forwarded.route.clear();
        forwarded.input = InputKind::Hidden;
        assert!(forwarded.requester_signed());
        // Another requester, position, sampler or signer: not valid.
        let mut other = env.clone();
        other.requester = crate::identity::Identity::generate().node_id();
        assert!(!other.requester_signed());
        let mut moved = env.clone();
        moved.pos = 7;
        assert!(!moved.requester_signed());
        let mut sampled = env.clone();
        sampled.sample = Some(SampleSpec::from_params(
            &crate::infer::SamplingParams::default(),
        ));
        assert!(!sampled.requester_signed());
        let mut drafted = env.clone();
        drafted.draft = 1;
        assert!(!drafted.requester_signed());
        let mut forged = env.clone();
        forged.sign(&crate::identity::Identity::generate());
        assert!(!forged.requester_signed());
        assert!(!envelope().requester_signed());
    }

    #[test]
    fn answers_carry_the_time_spent() {
        let spent = std::time::Duration::from_micros(7_250);
        let bytes = encode_answer(spent, &[9, 8, 7, 6]);
        let (got, result) = decode_answer(&bytes).expect("decodes");
        assert_eq!(got, spent);
        assert_eq!(result, &[9, 8, 7, 6]);
        assert!(decode_answer(&[1, 2, 3]).is_err());
        let bytes = encode_answer(spent, &[]);
        let (_, empty) = decode_answer(&bytes).expect("decodes");
        assert!(empty.is_empty());
    }

    #[test]
    fn malformed_requests_are_errors() {
        let good = encode_request(&envelope(), &[]);
        let mut huge = good.clone();
        huge[..4].copy_from_slice(&u32::MAX.to_be_bytes());
        let mut no_route = envelope();
        no_route.route.clear();
        let mut bad_session = envelope();
        bad_session.session = "xyz".into();
        let mut zero_rows = envelope();
        zero_rows.n_tokens = 0;
        let mut bad_dtype = envelope();
        bad_dtype.dtype = "f8".into();
        let mut unsampled_draft = envelope();
        unsampled_draft.draft = 1;
        let mut sampled = envelope();
        sampled.sample = Some(SampleSpec::from_params(
            &crate::infer::SamplingParams::default(),
        ));
        let mut all_draft = sampled.clone();
        all_draft.draft = 2;
        let mut long_draft = sampled.clone();
        long_draft.n_tokens = 40;
        long_draft.draft = MAX_DRAFT + 1;
        let mut fine_draft = sampled.clone();
        fine_draft.draft = 1;
        assert!(decode_request(&encode_request(&fine_draft, &[])).is_ok());
        for bytes in [
            vec![],
            vec![0, 0],
            huge,
            b"\0\0\0\x02{}".to_vec(),
            encode_request(&no_route, &[]),
            encode_request(&bad_session, &[]),
            encode_request(&zero_rows, &[]),
            encode_request(&bad_dtype, &[]),
            encode_request(&unsampled_draft, &[]),
            encode_request(&all_draft, &[]),
            encode_request(&long_draft, &[]),
        ] {
            assert!(decode_request(&bytes).is_err(), "{bytes:?}");
        }
        assert!(bytes_to_tokens(&[1, 2, 3]).is_err());
    }
}
