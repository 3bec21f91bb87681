//! What the links of a chain cost, measured on every step this node sends:
//! the wait for the next node's answer minus the time that node says it spent
//! (its compute and the rest of the chain behind it). What is left is one round
//! trip's network, framing, sealing and hand-offs between threads: the per-hop
//! overhead of split inference.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use serde::Serialize;

/// Samples kept (the most recent steps).
const KEEP: usize = 4096;

/// Recent per-step link overheads.
#[derive(Debug, Default)]
pub struct LinkLatency {
    /// Microseconds, oldest first.
    samples: Mutex<VecDeque<u32>>,
}

/// Percentiles of the recent link overheads.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct LatencySummary {
    /// Steps measured (at most the last 4096).
    pub samples: usize,
    /// Median, in milliseconds.
    pub p50_ms: f64,
    /// 99th percentile, in milliseconds.
    pub p99_ms: f64,
}

impl LinkLatency {
    /// Records one step: `waited` for the answer, of which the answering node
    /// `spent` this long itself.
    pub fn record(&self, waited: Duration, spent: Duration) {
        let overhead = waited.saturating_sub(spent);
        let micros = u32::try_from(overhead.as_micros()).unwrap_or(u32::MAX);
        let mut samples = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        if samples.len() == KEEP {
            samples.pop_front();
        }
        samples.push_back(micros);
    }

    /// The recent overheads' median and 99th percentile.
    pub fn summary(&self) -> LatencySummary {
        let mut sorted: Vec<u32> = self
            .samples
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .copied()
            .collect();
        sorted.sort_unstable();
        let at = |p: f64| -> f64 {
            if sorted.is_empty() {
                return 0.0;
            }
            let i = ((sorted.len() - 1) as f64 * p).round() as usize;
            f64::from(sorted[i]) / 1000.0
        };
        LatencySummary {
            samples: sorted.len(),
            p50_ms: at(0.5),
            p99_ms: at(0.99),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overhead_is_the_wait_minus_the_time_spent() {
        let l = LinkLatency::default();
        assert_eq!(l.summary().samples, 0);
        for i in 0..100u64 {
            l.record(
                Duration::from_micros(10_000 + 300 + i),
                Duration::from_micros(10_000),
            );
        }
        // A peer claiming more than the whole wait counts as zero, not negative.
        l.record(Duration::from_millis(1), Duration::from_millis(5));
        let s = l.summary();
        assert_eq!(s.samples, 101);
        assert!((s.p50_ms - 0.349).abs() < 0.002, "{s:?}");
        assert!((s.p99_ms - 0.398).abs() < 0.002, "{s:?}");
        for _ in 0..KEEP {
            l.record(Duration::from_millis(2), Duration::from_millis(1));
        }
        let s = l.summary();
        assert_eq!(s.samples, KEEP);
        assert_eq!(s.p50_ms, 1.0);
    }
}
