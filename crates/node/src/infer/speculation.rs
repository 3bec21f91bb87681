//! Speculative decoding, on the local engine and through a chain: draft tokens
//! by prompt lookup, decode them with the token in hand in one step, sample
//! after every row, and keep the drafts the model chose itself plus the
//! model's own next token; the cache is rolled back past the rejected ones.
//!
//! On the engine (`slots`) a verified run costs one decode instead of one per
//! token. Through a chain the requester sends the drafts in one step and the
//! last hop samples every row; each hop's next step starts at the first
//! position not kept, which rolls its cache back (the range host truncates a
//! session whose step starts before its end), so slow links are paid once per
//! accepted run instead of once per token. The text cannot change, because
//! only samplers whose choice depends on each row's logits alone speculate
//! ([`super::SamplingParams::speculation_safe`]).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use serde::Serialize;

/// Shortest and longest run of a sequence's last tokens looked up earlier in
/// it for a draft (prompt lookup): a single token matches too often by chance.
const DRAFT_NGRAM: std::ops::RangeInclusive<usize> = 2..=4;

/// Prompt-lookup drafting, which needs no second model: where the sequence's
/// last few tokens (the longest run in [`DRAFT_NGRAM`] that occurred before)
/// last appeared earlier, the tokens that followed them there, at most `max`.
/// Text that quotes, edits or summarises its prompt repeats it in runs.
pub(crate) fn lookup_draft(sequence: &[i32], max: usize) -> Vec<i32> {
    if max == 0 {
        return Vec::new();
    }
    for n in DRAFT_NGRAM.rev() {
        let Some(start) = sequence.len().checked_sub(n) else {
            continue;
        };
        let tail = &sequence[start..];
        if let Some(at) = (0..start).rev().find(|&i| &sequence[i..i + n] == tail) {
            let from = at + n;
            return sequence[from..(from + max).min(sequence.len())].to_vec();
        }
    }
    Vec::new()
}

/// Draft tokens sent and accepted by this node's generations.
#[derive(Debug, Default)]
pub struct SpeculationStats {
    drafted: AtomicU64,
    accepted: AtomicU64,
}

/// [`SpeculationStats`] as `GET /api/v1/layers` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct SpeculationSummary {
    /// Draft tokens sent for verification.
    pub drafted: u64,
    /// Of those, the ones the model chose itself.
    pub accepted: u64,
}

impl SpeculationStats {
    /// Counts one generation's drafts.
    pub fn record(&self, drafted: u64, accepted: u64) {
        self.drafted.fetch_add(drafted, Relaxed);
        self.accepted.fetch_add(accepted, Relaxed);
    }

    /// The totals so far.
    pub fn summary(&self) -> SpeculationSummary {
        SpeculationSummary {
            drafted: self.drafted.load(Relaxed),
            accepted: self.accepted.load(Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drafts_follow_the_latest_earlier_run_of_the_last_tokens() {
        // "1 2 3 4 5 ... 1 2 3" drafts "4 5 ..." (the longest match first).
        let seq = [1, 2, 3, 4, 5, 6, 9, 9, 1, 2, 3];
        assert_eq!(lookup_draft(&seq, 3), vec![4, 5, 6]);
        assert_eq!(lookup_draft(&seq, 1), vec![4]);
        assert_eq!(lookup_draft(&seq, 0), Vec::<i32>::new());
        // The most recent earlier occurrence wins.
        let seq = [7, 8, 1, 7, 8, 2, 7, 8];
        assert_eq!(lookup_draft(&seq, 2), vec![2, 7]);
        // A single token's match is not enough; nothing repeats, nothing drafts.
        assert!(lookup_draft(&[5, 6, 7, 5], 4).is_empty());
        assert!(lookup_draft(&[1, 2, 3, 4], 4).is_empty());
        assert!(lookup_draft(&[], 4).is_empty());
        // The draft stops where the sequence does.
        let seq = [3, 4, 3, 4];
        assert_eq!(lookup_draft(&seq, 8), vec![3, 4]);
    }

    #[test]
    fn stats_add_up() {
        let s = SpeculationStats::default();
        s.record(8, 5);
        s.record(4, 0);
        assert_eq!(
            s.summary(),
            SpeculationSummary {
                drafted: 12,
                accepted: 5
            }
        );
    }
}
