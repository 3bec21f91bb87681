//! Request and token counters: Prometheus text at `/metrics` and the JSON
//! `inference` block of `/api/v1/metrics`.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use serde::Serialize;

use crate::store::RequestTotals;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    endpoint: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelLabels {
    model: String,
}

/// Latencies kept for averages and percentiles.
const WINDOW: usize = 1000;

/// All counters of a node.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    completion_tokens: Counter,
    prompt_tokens: Counter,
    latency: Histogram,
    model_loaded: Family<ModelLabels, Gauge>,
    queue_depth: Gauge,
    queue_time: Histogram,
    cached_prompt_tokens: Counter,
    active_sequences: Gauge,
    batches: Gauge,
    mean_batch_tokens: Gauge<f64, std::sync::atomic::AtomicU64>,
    peak_batch_sequences: Gauge,
    // Lifetime totals, seeded from the database so they survive restarts.
    requests_total: AtomicU64,
    tokens_total: AtomicU64,
    recent: Mutex<VecDeque<(Instant, f64)>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

/// The `inference` block of `GET /api/v1/metrics`.
#[derive(Debug, Clone, Serialize)]
pub struct InferenceSummary {
    /// Requests served since the data dir was created.
    pub requests_total: u64,
    /// Requests finished in the last minute.
    pub requests_per_minute: f64,
    /// Mean latency over the last 1000 requests.
    pub avg_latency_ms: f64,
    /// 99th percentile latency over the last 1000 requests.
    pub p99_latency_ms: f64,
    /// Tokens generated since the data dir was created.
    pub tokens_generated: u64,
}

impl Metrics {
    /// Creates the counters, seeding lifetime totals from `totals`.
    pub fn new(totals: RequestTotals) -> Self {
        let mut registry = Registry::default();
        let requests = register(
            &mut registry,
            "swarmllm_requests",
            "Inference requests by endpoint and outcome",
            Family::<RequestLabels, Counter>::default(),
        );
        let completion_tokens = register(
            &mut registry,
            "swarmllm_completion_tokens",
            "Tokens generated",
            Counter::default(),
        );
        let prompt_tokens = register(
            &mut registry,
            "swarmllm_prompt_tokens",
            "Prompt tokens processed",
            Counter::default(),
        );
        let latency = register(
            &mut registry,
            "swarmllm_request_duration_seconds",
            "Wall time of inference requests",
            Histogram::new(exponential_buckets(0.005, 2.0, 14)),
        );
        let model_loaded = register(
            &mut registry,
            "swarmllm_model_loaded",
            "1 for each model loaded on this node",
            Family::<ModelLabels, Gauge>::default(),
        );
        let queue_depth = register(
            &mut registry,
            "swarmllm_queue_depth",
            "Inference jobs waiting for the engine",
            Gauge::default(),
        );
        let queue_time = register(
            &mut registry,
            "swarmllm_queue_seconds",
            "Time requests waited for a sequence of the engine",
            Histogram::new(exponential_buckets(0.001, 2.0, 16)),
        );
        let cached_prompt_tokens = register(
            &mut registry,
            "swarmllm_cached_prompt_tokens",
            "Prompt tokens reused from the prompt cache",
            Counter::default(),
        );
        let active_sequences = register(
            &mut registry,
            "swarmllm_engine_active_sequences",
            "Requests the engine is decoding together now",
            Gauge::default(),
        );
        let batches = register(
            &mut registry,
            "swarmllm_engine_batches",
            "Batches the engine has decoded since start",
            Gauge::default(),
        );
        let mean_batch_tokens = register(
            &mut registry,
            "swarmllm_engine_mean_batch_tokens",
            "Mean tokens per decoded batch since start",
            Gauge::<f64, std::sync::atomic::AtomicU64>::default(),
        );
        let peak_batch_sequences = register(
            &mut registry,
            "swarmllm_engine_peak_batch_sequences",
            "Most sequences in one batch since start",
            Gauge::default(),
        );
        Self {
            registry,
            requests,
            completion_tokens,
            prompt_tokens,
            latency,
            model_loaded,
            queue_depth,
            queue_time,
            cached_prompt_tokens,
            active_sequences,
            batches,
            mean_batch_tokens,
            peak_batch_sequences,
            requests_total: AtomicU64::new(totals.requests),
            tokens_total: AtomicU64::new(totals.completion_tokens),
            recent: Mutex::new(VecDeque::with_capacity(WINDOW)),
        }
    }

    /// Marks `model` as loaded.
    pub fn set_model_loaded(&self, model: &str) {
        self.model_loaded
            .get_or_create(&ModelLabels {
                model: model.to_string(),
            })
            .set(1);
    }

    /// Sets the queue depth gauge.
    pub fn set_queue_depth(&self, depth: usize) {
        self.queue_depth.set(depth as i64);
    }

    /// Sets the engine's batching gauges (read when scraped).
    pub fn set_engine(&self, stats: &crate::infer::EngineStats) {
        self.queue_depth.set(stats.queue_depth as i64);
        self.active_sequences.set(stats.active_sequences as i64);
        self.batches.set(stats.batches as i64);
        self.mean_batch_tokens.set(stats.mean_batch_tokens);
        self.peak_batch_sequences
            .set(stats.peak_batch_sequences as i64);
    }

    /// Counts a request's wait for the engine and its prompt tokens found in
    /// the cache.
    pub fn record_queue(&self, queue: Duration, cached_prompt_tokens: u32) {
        self.queue_time.observe(queue.as_secs_f64());
        self.cached_prompt_tokens
            .inc_by(u64::from(cached_prompt_tokens));
    }

    /// Counts a finished request (any outcome).
    pub fn record(
        &self,
        endpoint: &str,
        outcome: &str,
        elapsed: Duration,
        prompt_tokens: u32,
        completion_tokens: u32,
    ) {
        self.requests
            .get_or_create(&RequestLabels {
                endpoint: endpoint.to_string(),
                outcome: outcome.to_string(),
            })
            .inc();
        self.completion_tokens.inc_by(completion_tokens as u64);
        self.prompt_tokens.inc_by(prompt_tokens as u64);
        self.latency.observe(elapsed.as_secs_f64());
        self.requests_total.fetch_add(1, Ordering::Relaxed);
        self.tokens_total
            .fetch_add(completion_tokens as u64, Ordering::Relaxed);
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        if recent.len() == WINDOW {
            recent.pop_front();
        }
        recent.push_back((Instant::now(), elapsed.as_secs_f64() * 1000.0));
    }

    /// The JSON summary.
    pub fn summary(&self) -> InferenceSummary {
        let recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        let minute_ago = Instant::now().checked_sub(Duration::from_secs(60));
        let per_minute = recent
            .iter()
            .filter(|(t, _)| minute_ago.is_none_or(|m| *t >= m))
            .count();
        let mut lat: Vec<f64> = recent.iter().map(|(_, l)| *l).collect();
        drop(recent);
        lat.sort_by(f64::total_cmp);
        let avg = if lat.is_empty() {
            0.0
        } else {
            lat.iter().sum::<f64>() / lat.len() as f64
        };
        let p99 = if lat.is_empty() {
            0.0
        } else {
            lat[((lat.len() as f64 * 0.99).ceil() as usize).clamp(1, lat.len()) - 1]
        };
        InferenceSummary {
            requests_total: self.requests_total.load(Ordering::Relaxed),
            requests_per_minute: per_minute as f64,
            avg_latency_ms: (avg * 10.0).round() / 10.0,
            p99_latency_ms: (p99 * 10.0).round() / 10.0,
            tokens_generated: self.tokens_total.load(Ordering::Relaxed),
        }
    }

    /// Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Registers `metric` under `name` and gives back the handle that updates it.
fn register<M: prometheus_client::registry::Metric + Clone>(
    registry: &mut Registry,
    name: &str,
    help: &str,
    metric: M,
) -> M {
    registry.register(name, help, metric.clone());
    metric
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_and_exposition() {
        let m = Metrics::new(RequestTotals {
            requests: 10,
            completion_tokens: 100,
            prompt_tokens: 50,
        });
        m.set_model_loaded("tiny");
        m.record("/v1/completions", "ok", Duration::from_millis(20), 3, 4);
        m.record("/v1/completions", "ok", Duration::from_millis(40), 3, 4);
        let s = m.summary();
        assert_eq!(s.requests_total, 12);
        assert_eq!(s.tokens_generated, 108);
        assert_eq!(s.requests_per_minute, 2.0);
        assert_eq!(s.avg_latency_ms, 30.0);
        assert_eq!(s.p99_latency_ms, 40.0);
        let text = m.encode();
        assert!(
            text.contains("swarmllm_requests_total{endpoint=\"/v1/completions\",outcome=\"ok\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("swarmllm_model_loaded{model=\"tiny\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("swarmllm_request_duration_seconds_bucket"),
            "{text}"
        );
    }
}
