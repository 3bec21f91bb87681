//! Log-probabilities of sampled tokens (OpenAI's `logprobs` / `top_logprobs`).
//!
//! They are the model's own distribution at each step — the log-softmax of the
//! raw logits — as OpenAI reports them, not the distribution after temperature,
//! top-k/p or a grammar shaped it (the sampled token may be one the model found
//! unlikely when a grammar forced it).

use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::token::LlamaToken;
use serde::Serialize;

/// Most alternatives per token (OpenAI's limit for chat).
pub const MAX_TOP_LOGPROBS: u8 = 20;

/// One alternative at a step.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TopLogprob {
    /// The token's text (lossy where it is part of a UTF-8 sequence).
    pub token: String,
    /// Natural log of its probability.
    pub logprob: f32,
    /// Its exact bytes.
    pub bytes: Vec<u8>,
}

/// One sampled token.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TokenLogprob {
    /// The token's text (lossy where it is part of a UTF-8 sequence).
    pub token: String,
    /// Natural log of its probability.
    pub logprob: f32,
    /// Its exact bytes.
    pub bytes: Vec<u8>,
    /// The most likely tokens at this step, most likely first.
    pub top_logprobs: Vec<TopLogprob>,
}

/// The log-probability of token id `token` under `logits`, and the `k` most
/// likely token ids with theirs (most likely first, ties by id). `None` when
/// `token` is outside the logits.
pub fn pick(logits: &[f32], token: i32, k: usize) -> Option<(f32, Vec<(i32, f32)>)> {
    let chosen = *logits.get(usize::try_from(token).ok()?)?;
    // log-sum-exp around the maximum, in f64 so 150k terms lose nothing.
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits
        .iter()
        .map(|&l| f64::from(l - max).exp())
        .sum::<f64>();
    let lse = f64::from(max) + sum.ln();
    let lp = |l: f32| (f64::from(l) - lse) as f32;
    let mut top: Vec<(usize, f32)> = Vec::with_capacity(k + 1);
    if k > 0 {
        for (i, &l) in logits.iter().enumerate() {
            // Keep the k best seen so far, sorted: most tokens fall below the
            // last at once, so this is one pass over the vocabulary.
            if top.len() == k && top.last().is_some_and(|&(_, w)| l <= w) {
                continue;
            }
            let at = top.partition_point(|&(j, w)| w > l || (w == l && j < i));
            top.insert(at, (i, l));
            top.truncate(k);
        }
    }
    Some((
        lp(chosen),
        top.into_iter()
            .filter_map(|(i, l)| Some((i32::try_from(i).ok()?, lp(l))))
            .collect(),
    ))
}

/// The text and bytes of `token`.
fn piece(model: &LlamaModel, token: LlamaToken) -> (String, Vec<u8>) {
    let mut bytes = Vec::with_capacity(16);
    model
        .vocab()
        .token_to_piece_into(token, &mut bytes, false, None);
    (String::from_utf8_lossy(&bytes).into_owned(), bytes)
}

/// `token`'s entry from the logits it was sampled from, with `k` alternatives.
pub(crate) fn entry(
    model: &LlamaModel,
    logits: &[f32],
    token: LlamaToken,
    k: usize,
) -> Option<TokenLogprob> {
    let (logprob, top) = pick(logits, token.0, k)?;
    let top: Vec<(LlamaToken, f32)> = top.into_iter().map(|(id, l)| (LlamaToken(id), l)).collect();
    Some(render(model, token, logprob, &top))
}

/// The API's entry for `token` with its log-probability and alternatives
/// (every id must be in `model`'s vocabulary: llama.cpp aborts on one that
/// is not, so ids a peer sent are checked before they come here).
pub(crate) fn render(
    model: &LlamaModel,
    token: LlamaToken,
    logprob: f32,
    top: &[(LlamaToken, f32)],
) -> TokenLogprob {
    let (text, bytes) = piece(model, token);
    let top_logprobs = top
        .iter()
        .map(|&(id, logprob)| {
            let (token, bytes) = piece(model, id);
            TopLogprob {
                token,
                logprob,
                bytes,
            }
        })
        .collect();
    TokenLogprob {
        token: text,
        logprob,
        bytes,
        top_logprobs,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_softmax_and_the_best_k() {
        let logits = [1.0f32, 3.0, 2.0, 3.0, -1.0];
        let (lp, top) = pick(&logits, 2, 3).expect("in range");
        let z: f64 = logits.iter().map(|&l| f64::from(l).exp()).sum();
        assert!((f64::from(lp) - (2.0 - z.ln())).abs() < 1e-5, "{lp}");
        // Most likely first, ties by id.
        assert_eq!(top.iter().map(|t| t.0).collect::<Vec<_>>(), [1, 3, 2]);
        assert!(top[0].1 <= 0.0 && (top[0].1 - top[1].1).abs() < 1e-6);
        let total: f64 = logits
            .iter()
            .enumerate()
            .map(|(i, _)| f64::from(pick(&logits, i as i32, 0).expect("in range").0).exp())
            .sum();
        assert!(
            (total - 1.0).abs() < 1e-5,
            "probabilities sum to 1: {total}"
        );
        assert_eq!(pick(&logits, 5, 1), None);
        assert!(pick(&logits, 0, 0).expect("in range").1.is_empty());
        assert_eq!(pick(&logits, 0, 9).expect("in range").1.len(), 5);
    }
}
