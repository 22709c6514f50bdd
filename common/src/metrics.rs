//! Names, labels and buckets of every Prometheus metric Tessera exports.
//!
//! The coordinator and the workers register their metrics from these constants, and the Grafana
//! dashboard (`deploy/grafana/tessera.json`) is checked against them by a test, so a rename here
//! that the dashboard does not follow fails CI instead of silently emptying a panel. Names follow
//! Prometheus conventions (`_total` for counters, base units in the name) and the histograms use
//! vLLM's bucket boundaries, extended below 10 ms because CPU decode of small models is that fast,
//! so dashboards written for vLLM translate one to one.
//!
//! Label cardinality is bounded by the model's shape, never by traffic: `model`, `rank`, `layer`,
//! `expert`, `finish_reason`, `kind`, `op`, `status`; never a request id.

/// Label: served model name.
pub const LABEL_MODEL: &str = "model";
/// Label: a worker's rank in the group.
pub const LABEL_RANK: &str = "rank";
/// Label: decoder layer index.
pub const LABEL_LAYER: &str = "layer";
/// Label: routed expert index within a layer.
pub const LABEL_EXPERT: &str = "expert";
/// Label: why a request finished (`stop`, `length`, `abort`).
pub const LABEL_FINISH_REASON: &str = "finish_reason";
/// Label: what kind of error ended or refused a request.
pub const LABEL_KIND: &str = "kind";
/// Label: which collective operation.
pub const LABEL_OP: &str = "op";
/// Label: a job's status.
pub const LABEL_STATUS: &str = "status";

// ---- coordinator ------------------------------------------------------------------------------

/// Gauge: sequences the scheduler is running (they hold KV blocks).
pub const REQUESTS_RUNNING: &str = "tessera_requests_running";
/// Gauge: sequences waiting for admission.
pub const REQUESTS_WAITING: &str = "tessera_requests_waiting";
/// Histogram: seconds from arrival to the first generated token.
pub const TIME_TO_FIRST_TOKEN: &str = "tessera_time_to_first_token_seconds";
/// Histogram: seconds between consecutive generated tokens of a request.
pub const INTER_TOKEN_LATENCY: &str = "tessera_inter_token_latency_seconds";
/// Histogram: seconds from arrival to the terminal event.
pub const E2E_REQUEST_LATENCY: &str = "tessera_e2e_request_latency_seconds";
/// Counter: prompt tokens of admitted requests (prefilled, recomputation after preemption excluded).
pub const PROMPT_TOKENS: &str = "tessera_prompt_tokens_total";
/// Counter: generated tokens.
pub const GENERATION_TOKENS: &str = "tessera_generation_tokens_total";
/// Counter: requests that finished normally, by finish reason.
pub const REQUESTS_FINISHED: &str = "tessera_requests_finished_total";
/// Counter: requests refused or failed, by error kind.
pub const REQUEST_ERRORS: &str = "tessera_request_errors_total";
/// Gauge: fraction of KV-cache blocks in use, 0–1.
pub const KV_CACHE_USAGE: &str = "tessera_kv_cache_usage_ratio";
/// Histogram: seconds of one engine step as the coordinator sees it (all ranks, round trip).
pub const STEP_DURATION: &str = "tessera_step_duration_seconds";
/// Histogram: tokens (prefill and decode) in one engine step.
pub const STEP_TOKENS: &str = "tessera_step_tokens";
/// Counter: tokens routed to each (layer, expert).
pub const EXPERT_TOKENS: &str = "tessera_expert_tokens_total";
/// Gauge: per layer, max over experts ÷ mean over experts of the tokens routed in recent steps
/// (1 = perfectly balanced).
pub const EXPERT_LOAD_IMBALANCE: &str = "tessera_expert_load_imbalance";
/// Gauge: workers currently in the group.
pub const WORKERS_UP: &str = "tessera_workers_up";
/// Gauge: workers the group needs (`--tp`).
pub const WORKERS_EXPECTED: &str = "tessera_workers_expected";
/// Gauge: batch jobs by status.
pub const JOBS: &str = "tessera_jobs";
/// Counter: requests of batch jobs that reached a terminal state.
pub const JOB_REQUESTS_DONE: &str = "tessera_job_requests_done_total";

// ---- worker -----------------------------------------------------------------------------------

/// Histogram: seconds a worker spends executing one step (forward pass and sampling).
pub const WORKER_STEP_DURATION: &str = "tessera_worker_step_duration_seconds";
/// Histogram: seconds a worker spends inside collectives, per operation and step.
pub const WORKER_COLLECTIVE_DURATION: &str = "tessera_worker_collective_duration_seconds";
/// Gauge: KV-cache blocks this worker holds room for.
pub const WORKER_KV_BLOCKS: &str = "tessera_worker_kv_blocks";
/// Counter: steps this worker executed.
pub const WORKER_STEPS: &str = "tessera_worker_steps_total";

/// Every metric name above, for tests that check the dashboard and the exporters agree.
pub const ALL: &[&str] = &[
    REQUESTS_RUNNING,
    REQUESTS_WAITING,
    TIME_TO_FIRST_TOKEN,
    INTER_TOKEN_LATENCY,
    E2E_REQUEST_LATENCY,
    PROMPT_TOKENS,
    GENERATION_TOKENS,
    REQUESTS_FINISHED,
    REQUEST_ERRORS,
    KV_CACHE_USAGE,
    STEP_DURATION,
    STEP_TOKENS,
    EXPERT_TOKENS,
    EXPERT_LOAD_IMBALANCE,
    WORKERS_UP,
    WORKERS_EXPECTED,
    JOBS,
    JOB_REQUESTS_DONE,
    WORKER_STEP_DURATION,
    WORKER_COLLECTIVE_DURATION,
    WORKER_KV_BLOCKS,
    WORKER_STEPS,
];

/// Buckets of [`TIME_TO_FIRST_TOKEN`]: vLLM's, plus finer ones under 1 ms.
pub const TTFT_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
    5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
];
/// Buckets of [`INTER_TOKEN_LATENCY`]: vLLM's, plus finer ones under 10 ms.
pub const ITL_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
];
/// Buckets of [`E2E_REQUEST_LATENCY`]: vLLM's, plus finer ones under 300 ms.
pub const E2E_BUCKETS: &[f64] = &[
    0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
    60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0,
];
/// Buckets of step and collective durations: 100 µs to ~10 s, doubling.
pub const STEP_BUCKETS: &[f64] = &[
    0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0,
    10.0,
];
/// Buckets of [`STEP_TOKENS`].
pub const STEP_TOKEN_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0,
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_prefixed_and_buckets_increase() {
        let mut seen = std::collections::HashSet::new();
        for name in ALL {
            assert!(name.starts_with("tessera_"), "{name}");
            assert!(seen.insert(name), "{name} listed twice");
        }
        for buckets in [
            TTFT_BUCKETS,
            ITL_BUCKETS,
            E2E_BUCKETS,
            STEP_BUCKETS,
            STEP_TOKEN_BUCKETS,
        ] {
            assert!(buckets.windows(2).all(|w| w[0] < w[1]), "{buckets:?}");
        }
    }
}
