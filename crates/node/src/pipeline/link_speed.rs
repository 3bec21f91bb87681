//! How fast each link this node sends steps on is, and so which format its
//! hidden states take.
//!
//! Hidden states travel as `f32` (exact) unless two things hold: the step's
//! requester allowed approximate answers (the envelope's signed `dtype` is then
//! narrower), and this link is measured slower than `slow_link_mbps`. The
//! measurement comes from the steps themselves: each send's overhead (the wait
//! minus what the next node says it spent, see [`super::latency`]) is a fixed
//! part (round trip, framing) plus the bytes over the bandwidth. Small frames (a
//! decode step's single row) give the fixed part; large ones (prompt chunks),
//! less that fixed part, give the bandwidth. A link not yet measured counts as
//! fast: answers stay exact until a measurement says otherwise.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use serde::Serialize;

use super::activation::Dtype;
use super::wire::dtype_name;

/// Frames up to this size measure the fixed part of a link's overhead.
const SMALL_FRAME: u64 = 16 << 10;
/// Frames from this size measure its bandwidth (smaller ones are dominated by
/// the fixed part and would give wild estimates).
const LARGE_FRAME: u64 = 32 << 10;
/// Weight of a new sample in the moving averages.
const ALPHA: f64 = 0.2;
/// The transfer part of a large frame's overhead is never taken as shorter
/// than this (a clock's resolution and scheduling noise).
const MIN_TRANSFER_MS: f64 = 0.05;
/// Links remembered; past this the least recently used goes (a peer cannot grow
/// this map: only nodes this node chose to send to are in it).
const MAX_PEERS: usize = 1024;

/// One link's estimates.
#[derive(Debug, Clone, Copy, Default)]
struct Estimate {
    /// Overhead of a small frame (ms): round trip, framing, sealing.
    fixed_ms: Option<f64>,
    /// Bytes per millisecond.
    bytes_per_ms: Option<f64>,
    /// When it was last updated (for eviction), as a counter.
    touched: u64,
    /// Hidden-state frames sent, by format.
    frames: Frames,
}

/// Hidden-state frames sent on a link, by format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Frames {
    /// Exact.
    pub f32: u64,
    /// Half precision.
    pub f16: u64,
    /// 8-bit blocks.
    pub q8: u64,
}

/// Per-link speed estimates of the links this node sends on.
#[derive(Debug, Default)]
pub struct LinkSpeeds {
    links: Mutex<(HashMap<String, Estimate>, u64)>,
}

/// One link as `GET /api/v1/layers` shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LinkView {
    /// The node at the other end.
    pub node_id: String,
    /// Measured bandwidth (megabits per second), once a large frame was sent.
    pub bandwidth_mbps: Option<f64>,
    /// Overhead of a small frame (ms).
    pub fixed_ms: Option<f64>,
    /// Slower than the configured `slow_link_mbps`.
    pub slow: bool,
    /// The format hidden states take on it when the requester allows
    /// approximate answers (`f32` otherwise, always).
    pub dtype_when_allowed: &'static str,
    /// Hidden-state frames sent on it so far, by format.
    pub frames: Frames,
}

impl LinkSpeeds {
    /// Runs `f` on `peer`'s estimate, making room for it if it is new.
    fn with(&self, peer: &str, f: impl FnOnce(&mut Estimate)) {
        let mut guard = self.links.lock().unwrap_or_else(|p| p.into_inner());
        let (links, clock) = &mut *guard;
        *clock += 1;
        if !links.contains_key(peer) && links.len() >= MAX_PEERS {
            let oldest = links
                .iter()
                .min_by_key(|(_, e)| e.touched)
                .map(|(k, _)| k.clone());
            if let Some(k) = oldest {
                links.remove(&k);
            }
        }
        let e = links.entry(peer.to_string()).or_default();
        e.touched = *clock;
        f(e);
    }

    /// Counts a hidden-state frame sent to `peer` as `dtype`.
    pub fn sent(&self, peer: &str, dtype: Dtype) {
        self.with(peer, |e| match dtype {
            Dtype::F32 => e.frames.f32 += 1,
            Dtype::F16 => e.frames.f16 += 1,
            Dtype::Q8 => e.frames.q8 += 1,
        });
    }

    /// Records one send of `bytes` to `peer` whose overhead was `overhead`.
    pub fn record(&self, peer: &str, bytes: u64, overhead: Duration) {
        let ms = overhead.as_secs_f64() * 1000.0;
        self.with(peer, |e| Self::update(e, bytes, ms));
    }

    fn update(e: &mut Estimate, bytes: u64, ms: f64) {
        let ewma = |old: Option<f64>, new: f64| Some(old.map_or(new, |o| o + ALPHA * (new - o)));
        if bytes <= SMALL_FRAME {
            e.fixed_ms = ewma(e.fixed_ms, ms);
        } else if bytes >= LARGE_FRAME
            && let Some(fixed) = e.fixed_ms
        {
            let transfer = (ms - fixed).max(MIN_TRANSFER_MS);
            e.bytes_per_ms = ewma(e.bytes_per_ms, bytes as f64 / transfer);
        }
    }

    /// The format for hidden states sent to `peer`: `allowed` (the requester's
    /// signed choice) when it is narrower than f32 and the link is measured
    /// slower than `slow_mbps`, else f32.
    pub fn choose(&self, peer: &str, allowed: Dtype, slow_mbps: f64) -> Dtype {
        if allowed == Dtype::F32 {
            return Dtype::F32;
        }
        let links = self.links.lock().unwrap_or_else(|p| p.into_inner());
        match links.0.get(peer) {
            Some(e) if is_slow(e, slow_mbps) => allowed,
            _ => Dtype::F32,
        }
    }

    /// Every link measured, slowest first.
    pub fn view(&self, slow_mbps: f64, narrow: Dtype) -> Vec<LinkView> {
        let links = self.links.lock().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<LinkView> = links
            .0
            .iter()
            .map(|(id, e)| {
                let slow = is_slow(e, slow_mbps);
                LinkView {
                    node_id: id.clone(),
                    bandwidth_mbps: e.bytes_per_ms.map(|b| round1(mbps(b))),
                    fixed_ms: e.fixed_ms.map(|f| (f * 1000.0).round() / 1000.0),
                    slow,
                    dtype_when_allowed: dtype_name(if slow { narrow } else { Dtype::F32 }),
                    frames: e.frames,
                }
            })
            .collect();
        out.sort_by(|a, b| {
            let key = |v: &LinkView| v.bandwidth_mbps.unwrap_or(f64::INFINITY);
            key(a)
                .total_cmp(&key(b))
                .then_with(|| a.node_id.cmp(&b.node_id))
        });
        out
    }
}

/// Bytes per millisecond in megabits per second.
fn mbps(bytes_per_ms: f64) -> f64 {
    bytes_per_ms * 8.0 / 1000.0
}

fn round1(v: f64) -> f64 {
    (v * 10.0).round() / 10.0
}

fn is_slow(e: &Estimate, slow_mbps: f64) -> bool {
    e.bytes_per_ms.is_some_and(|b| mbps(b) < slow_mbps)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: fn(f64) -> Duration = |ms| Duration::from_secs_f64(ms / 1000.0);

    #[test]
    fn a_link_is_exact_until_measured_slow_and_only_when_allowed() {
        let l = LinkSpeeds::default();
        // Not measured: f32 whatever was allowed.
        assert_eq!(l.choose("b", Dtype::F16, 100.0), Dtype::F32);
        // A large frame before any small one: no fixed part yet, no estimate.
        l.record("b", 1 << 20, MS(100.0));
        assert_eq!(l.choose("b", Dtype::F16, 100.0), Dtype::F32);
        // 50 ms round trips, then 1 MiB in 50 ms more: about 168 Mbit/s.
        for _ in 0..20 {
            l.record("b", 2304, MS(50.0));
        }
        l.record("b", 1 << 20, MS(100.0));
        let v = l.view(100.0, Dtype::F16);
        assert_eq!(v.len(), 1);
        let bw = v[0].bandwidth_mbps.expect("measured");
        assert!((bw - 167.8).abs() < 0.5, "{v:?}");
        assert_eq!(v[0].fixed_ms, Some(50.0));
        // Faster than 100 Mbit/s: exact; slower than 200: the allowed format.
        assert_eq!(l.choose("b", Dtype::F16, 100.0), Dtype::F32);
        assert_eq!(l.choose("b", Dtype::Q8, 200.0), Dtype::Q8);
        assert_eq!(l.view(200.0, Dtype::Q8)[0].dtype_when_allowed, "q8");
        // The requester did not allow it: f32 however slow.
        assert_eq!(l.choose("b", Dtype::F32, 1e9), Dtype::F32);
    }

    #[test]
    fn the_estimate_follows_the_link_and_the_map_stays_bounded() {
        let l = LinkSpeeds::default();
        l.record("b", 100, MS(1.0));
        // A link that slows from ~1 Gbit/s to ~8 Mbit/s is soon seen as slow.
        for _ in 0..5 {
            l.record("b", 1 << 20, MS(1.0 + 8.4));
        }
        assert_eq!(l.choose("b", Dtype::F16, 100.0), Dtype::F32);
        for _ in 0..30 {
            l.record("b", 1 << 20, MS(1.0 + 1000.0));
        }
        assert_eq!(l.choose("b", Dtype::F16, 100.0), Dtype::F16);
        for i in 0..(MAX_PEERS + 10) {
            l.record(&format!("p{i}"), 100, MS(1.0));
        }
        let n = l.links.lock().expect("lock").0.len();
        assert_eq!(n, MAX_PEERS);
        // The oldest went first.
        assert!(!l.links.lock().expect("lock").0.contains_key("b"));
    }
}
