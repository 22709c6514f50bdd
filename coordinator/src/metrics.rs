//! The coordinator's Prometheus metrics: one [`ServingMetrics`] per served model, registered in
//! its own registry (names, labels and buckets from [`tessera_common::metrics`]) and rendered in
//! the text exposition format by `GET /metrics`.
//!
//! The serving loop records what it sees (token timings, step times, the per-(layer, expert)
//! token counts every step returns); the front ends record what they refuse. Every series carries
//! the `model` label as a constant; other labels have values bounded by the model's shape or a
//! fixed vocabulary, so cardinality never grows with traffic.

use std::sync::Mutex;
use std::time::Duration;

use prometheus::{
    Gauge, GaugeVec, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry,
};
use tessera_common::metrics as m;

use crate::scheduler::SchedulerStats;

/// Weight of the past in the expert-load imbalance gauge: each step's counts are added to the
/// decayed sum of earlier steps, so the gauge follows the last few dozen steps instead of one
/// (a single decode step of a small batch touches few experts and would always look skewed).
const IMBALANCE_DECAY: f64 = 0.95;

/// Errors refused or failed requests are counted under (the `kind` label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// Malformed or out-of-range input (HTTP 400, gRPC INVALID_ARGUMENT).
    InvalidRequest,
    /// The waiting queue was full (HTTP 429, gRPC RESOURCE_EXHAUSTED).
    QueueFull,
    /// The worker group was not whole, or failed while the request ran (HTTP 503, UNAVAILABLE).
    Unavailable,
    /// Anything else (HTTP 500).
    Internal,
}

impl ErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::InvalidRequest => "invalid_request",
            ErrorKind::QueueFull => "queue_full",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::Internal => "internal",
        }
    }
}

/// Per-layer decayed expert loads, and the counters of each (layer, expert) created on first use.
#[derive(Default)]
struct ExpertLoad {
    /// Indexed by layer; each holds (counter per expert, decayed load per expert).
    layers: Vec<Option<(Vec<IntCounter>, Vec<f64>)>>,
}

pub struct ServingMetrics {
    registry: Registry,
    running: IntGauge,
    waiting: IntGauge,
    ttft: Histogram,
    itl: Histogram,
    e2e: Histogram,
    prompt_tokens: IntCounter,
    generation_tokens: IntCounter,
    finished: IntCounterVec,
    errors: IntCounterVec,
    kv_usage: Gauge,
    step_duration: Histogram,
    step_tokens: Histogram,
    expert_tokens: IntCounterVec,
    imbalance: GaugeVec,
    expert_load: Mutex<ExpertLoad>,
    workers_up: IntGauge,
    workers_expected: IntGauge,
    jobs: IntGaugeVec,
    job_requests_done: IntCounter,
}

/// Builds and registers metrics that all carry the `model` label.
struct Builder<'a> {
    registry: &'a Registry,
    model: &'a str,
}

impl Builder<'_> {
    fn opts(&self, name: &str, help: &str) -> Opts {
        Opts::new(name, help).const_label(m::LABEL_MODEL, self.model)
    }

    fn register<T: prometheus::core::Collector + Clone + 'static>(
        &self,
        metric: T,
    ) -> Result<T, prometheus::Error> {
        self.registry.register(Box::new(metric.clone()))?;
        Ok(metric)
    }

    fn int_gauge(&self, name: &str, help: &str) -> Result<IntGauge, prometheus::Error> {
        self.register(IntGauge::with_opts(self.opts(name, help))?)
    }

    fn int_counter(&self, name: &str, help: &str) -> Result<IntCounter, prometheus::Error> {
        self.register(IntCounter::with_opts(self.opts(name, help))?)
    }

    fn histogram(
        &self,
        name: &str,
        help: &str,
        buckets: &[f64],
    ) -> Result<Histogram, prometheus::Error> {
        let opts = HistogramOpts::from(self.opts(name, help)).buckets(buckets.to_vec());
        self.register(Histogram::with_opts(opts)?)
    }
}

impl ServingMetrics {
    /// Metrics of the model served as `model`.
    pub fn new(model: &str) -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let b = Builder {
            registry: &registry,
            model,
        };
        let metrics = ServingMetrics {
            running: b.int_gauge(m::REQUESTS_RUNNING, "Requests running (holding KV blocks).")?,
            waiting: b.int_gauge(m::REQUESTS_WAITING, "Requests waiting for admission.")?,
            ttft: b.histogram(
                m::TIME_TO_FIRST_TOKEN,
                "Seconds from arrival to the first generated token.",
                m::TTFT_BUCKETS,
            )?,
            itl: b.histogram(
                m::INTER_TOKEN_LATENCY,
                "Seconds between consecutive generated tokens of a request.",
                m::ITL_BUCKETS,
            )?,
            e2e: b.histogram(
                m::E2E_REQUEST_LATENCY,
                "Seconds from arrival to the last event of a request.",
                m::E2E_BUCKETS,
            )?,
            prompt_tokens: b.int_counter(m::PROMPT_TOKENS, "Prompt tokens prefilled.")?,
            generation_tokens: b.int_counter(m::GENERATION_TOKENS, "Tokens generated.")?,
            finished: b.register(IntCounterVec::new(
                b.opts(m::REQUESTS_FINISHED, "Requests finished, by finish reason."),
                &[m::LABEL_FINISH_REASON],
            )?)?,
            errors: b.register(IntCounterVec::new(
                b.opts(m::REQUEST_ERRORS, "Requests refused or failed, by kind."),
                &[m::LABEL_KIND],
            )?)?,
            kv_usage: b.register(Gauge::with_opts(b.opts(
                m::KV_CACHE_USAGE,
                "Fraction of KV-cache blocks in use (0-1).",
            ))?)?,
            step_duration: b.histogram(
                m::STEP_DURATION,
                "Seconds of one engine step across all ranks.",
                m::STEP_BUCKETS,
            )?,
            step_tokens: b.histogram(
                m::STEP_TOKENS,
                "Tokens (prefill and decode) in one engine step.",
                m::STEP_TOKEN_BUCKETS,
            )?,
            expert_tokens: b.register(IntCounterVec::new(
                b.opts(m::EXPERT_TOKENS, "Tokens routed to each (layer, expert)."),
                &[m::LABEL_LAYER, m::LABEL_EXPERT],
            )?)?,
            imbalance: b.register(GaugeVec::new(
                b.opts(
                    m::EXPERT_LOAD_IMBALANCE,
                    "Per layer, max over mean of recent tokens per expert (1 = balanced).",
                ),
                &[m::LABEL_LAYER],
            )?)?,
            expert_load: Mutex::new(ExpertLoad::default()),
            workers_up: b.int_gauge(m::WORKERS_UP, "Workers in the serving group.")?,
            workers_expected: b.int_gauge(m::WORKERS_EXPECTED, "Workers the group needs.")?,
            jobs: b.register(IntGaugeVec::new(
                b.opts(m::JOBS, "Batch jobs by status."),
                &[m::LABEL_STATUS],
            )?)?,
            job_requests_done: b.int_counter(
                m::JOB_REQUESTS_DONE,
                "Requests of batch jobs that reached a terminal state.",
            )?,
            registry,
        };
        // Series that exist from the start, so dashboards show zeros rather than "no data".
        for status in ["queued", "running", "completed", "failed", "cancelled"] {
            metrics.jobs.with_label_values(&[status]).set(0);
        }
        Ok(metrics)
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        tessera_worker::metrics::render(&self.registry)
    }

    pub fn set_scheduler(&self, s: &SchedulerStats) {
        self.running.set(s.running as i64);
        self.waiting.set(s.waiting as i64);
        self.kv_usage
            .set(s.used_blocks as f64 / s.num_blocks.max(1) as f64);
    }

    /// The first token of a request arrived `ttft` after the request; its prompt is prefilled.
    pub fn first_token(&self, ttft: Duration, prompt_tokens: usize) {
        self.ttft.observe(ttft.as_secs_f64());
        self.prompt_tokens.inc_by(prompt_tokens as u64);
        self.generation_tokens.inc();
    }

    /// A later token arrived `gap` after the previous one.
    pub fn next_token(&self, gap: Duration) {
        self.itl.observe(gap.as_secs_f64());
        self.generation_tokens.inc();
    }

    /// A request ended normally (`stop`, `length`, `abort`) after `e2e`.
    pub fn finished(&self, reason: &str, e2e: Duration) {
        self.finished.with_label_values(&[reason]).inc();
        self.e2e.observe(e2e.as_secs_f64());
    }

    /// A request failed while running, `e2e` after it arrived.
    pub fn failed(&self, kind: ErrorKind, e2e: Duration) {
        self.error(kind);
        self.e2e.observe(e2e.as_secs_f64());
    }

    /// A request was refused (or failed) before it ran.
    pub fn error(&self, kind: ErrorKind) {
        self.errors.with_label_values(&[kind.as_str()]).inc();
    }

    /// One engine step: its wall time, its tokens and the tokens routed to each expert.
    pub fn step(&self, duration: Duration, tokens: usize, expert_counts: &[(usize, Vec<u32>)]) {
        self.step_duration.observe(duration.as_secs_f64());
        self.step_tokens.observe(tokens as f64);
        let mut load = self.expert_load.lock().unwrap_or_else(|e| e.into_inner());
        for (layer, counts) in expert_counts {
            if load.layers.len() <= *layer {
                load.layers.resize_with(layer + 1, || None);
            }
            let (counters, decayed) = load.layers[*layer].get_or_insert_with(|| {
                let name = layer.to_string();
                let counters = (0..counts.len())
                    .map(|e| {
                        self.expert_tokens
                            .with_label_values(&[name.as_str(), e.to_string().as_str()])
                    })
                    .collect();
                (counters, vec![0.0; counts.len()])
            });
            for ((counter, d), &c) in counters.iter().zip(decayed.iter_mut()).zip(counts) {
                counter.inc_by(u64::from(c));
                *d = *d * IMBALANCE_DECAY + f64::from(c);
            }
            if let Some(ratio) = imbalance(decayed) {
                self.imbalance
                    .with_label_values(&[layer.to_string().as_str()])
                    .set(ratio);
            }
        }
    }

    pub fn set_workers(&self, up: usize, expected: usize) {
        self.workers_up.set(up as i64);
        self.workers_expected.set(expected as i64);
    }

    /// A job moved from `from` (None when new) to `to` (status names as the API spells them).
    pub fn job_status(&self, from: Option<&str>, to: &str) {
        if let Some(from) = from {
            self.jobs.with_label_values(&[from]).dec();
        }
        self.jobs.with_label_values(&[to]).inc();
    }

    pub fn job_request_done(&self) {
        self.job_requests_done.inc();
    }
}

/// Max over mean of a layer's loads; `None` before any token was routed.
fn imbalance(loads: &[f64]) -> Option<f64> {
    let total: f64 = loads.iter().sum();
    if loads.is_empty() || total <= 0.0 {
        return None;
    }
    let mean = total / loads.len() as f64;
    Some(loads.iter().copied().fold(0.0, f64::max) / mean)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(text: &str, series: &str) -> f64 {
        text.lines()
            .find(|l| l.starts_with(series))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {series} in\n{text}"))
    }

    #[test]
    fn histograms_put_observations_in_the_right_buckets() {
        let metrics = ServingMetrics::new("demo").unwrap();
        metrics.first_token(Duration::from_millis(30), 7);
        metrics.next_token(Duration::from_millis(3));
        metrics.next_token(Duration::from_millis(60));
        metrics.finished("length", Duration::from_millis(400));
        let text = metrics.render();
        let ttft = m::TIME_TO_FIRST_TOKEN;
        assert_eq!(
            sample(
                &text,
                &format!("{ttft}_bucket{{model=\"demo\",le=\"0.02\"}}")
            ),
            0.0
        );
        assert_eq!(
            sample(
                &text,
                &format!("{ttft}_bucket{{model=\"demo\",le=\"0.04\"}}")
            ),
            1.0
        );
        let itl = m::INTER_TOKEN_LATENCY;
        assert_eq!(
            sample(
                &text,
                &format!("{itl}_bucket{{model=\"demo\",le=\"0.005\"}}")
            ),
            1.0
        );
        assert_eq!(
            sample(
                &text,
                &format!("{itl}_bucket{{model=\"demo\",le=\"0.075\"}}")
            ),
            2.0
        );
        assert_eq!(sample(&text, &format!("{itl}_count")), 2.0);
        assert!((sample(&text, &format!("{itl}_sum")) - 0.063).abs() < 1e-9);
        assert_eq!(sample(&text, m::PROMPT_TOKENS), 7.0);
        assert_eq!(sample(&text, m::GENERATION_TOKENS), 3.0);
        assert_eq!(
            sample(
                &text,
                &format!(
                    "{}{{finish_reason=\"length\",model=\"demo\"}}",
                    m::REQUESTS_FINISHED
                )
            ),
            1.0
        );
        let e2e = m::E2E_REQUEST_LATENCY;
        assert_eq!(
            sample(&text, &format!("{e2e}_bucket{{model=\"demo\",le=\"0.3\"}}")),
            0.0
        );
        assert_eq!(
            sample(&text, &format!("{e2e}_bucket{{model=\"demo\",le=\"0.5\"}}")),
            1.0
        );
    }

    #[test]
    fn expert_counts_accumulate_per_layer_and_expert_and_imbalance_is_max_over_mean() {
        let metrics = ServingMetrics::new("demo").unwrap();
        // 3 tokens, top-2, 4 experts: each layer's counts add up to 6.
        metrics.step(
            Duration::from_millis(5),
            3,
            &[(0, vec![3, 1, 1, 1]), (2, vec![2, 2, 1, 1])],
        );
        metrics.step(Duration::from_millis(5), 3, &[(0, vec![3, 1, 1, 1])]);
        let text = metrics.render();
        let series = |layer: usize, e: usize| {
            format!("{}{{expert=\"{e}\",layer=\"{layer}\"", m::EXPERT_TOKENS)
        };
        assert_eq!(sample(&text, &series(0, 0)), 6.0);
        assert_eq!(sample(&text, &series(0, 3)), 2.0);
        let layer0: f64 = (0..4).map(|e| sample(&text, &series(0, e))).sum();
        assert_eq!(layer0, 12.0, "2 steps × 3 tokens × top-2");
        let layer2: f64 = (0..4).map(|e| sample(&text, &series(2, e))).sum();
        assert_eq!(layer2, 6.0);
        // Layer 0 is skewed the same way both steps: max/mean = 3 / 1.5 = 2.
        let imb = |layer: usize| {
            sample(
                &text,
                &format!("{}{{layer=\"{layer}\"", m::EXPERT_LOAD_IMBALANCE),
            )
        };
        assert!((imb(0) - 2.0).abs() < 1e-9, "{}", imb(0));
        assert!((imb(2) - 2.0 / 1.5).abs() < 1e-9, "{}", imb(2));
        assert_eq!(imbalance(&[0.0, 0.0]), None);
    }

    #[test]
    fn errors_jobs_and_gauges() {
        let metrics = ServingMetrics::new("demo").unwrap();
        metrics.error(ErrorKind::InvalidRequest);
        metrics.failed(ErrorKind::Unavailable, Duration::from_secs(1));
        metrics.job_status(None, "queued");
        metrics.job_status(Some("queued"), "running");
        metrics.set_scheduler(&SchedulerStats {
            running: 3,
            waiting: 2,
            used_blocks: 5,
            num_blocks: 20,
            preemptions: 0,
        });
        metrics.set_workers(1, 2);
        let text = metrics.render();
        let errors = |kind: &str| sample(&text, &format!("{}{{kind=\"{kind}\"", m::REQUEST_ERRORS));
        assert_eq!(errors("invalid_request"), 1.0);
        assert_eq!(errors("unavailable"), 1.0);
        let jobs = |s: &str| {
            sample(
                &text,
                &format!("{}{{model=\"demo\",status=\"{s}\"}}", m::JOBS),
            )
        };
        assert_eq!(
            (jobs("queued"), jobs("running"), jobs("completed")),
            (0.0, 1.0, 0.0)
        );
        assert_eq!(sample(&text, m::REQUESTS_RUNNING), 3.0);
        assert_eq!(sample(&text, m::REQUESTS_WAITING), 2.0);
        assert_eq!(sample(&text, m::KV_CACHE_USAGE), 0.25);
        assert_eq!(sample(&text, m::WORKERS_UP), 1.0);
        assert_eq!(sample(&text, m::WORKERS_EXPECTED), 2.0);
    }
}
