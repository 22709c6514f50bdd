//! A worker's Prometheus metrics (names from [`tessera_common::metrics`]): step time, time inside
//! each collective, KV capacity and steps run, labelled by the rank the worker currently holds
//! (a worker can be given another rank when the group is rebuilt). `tessera worker
//! --metrics-listen` serves them; Prometheus adds the `instance` label.
//!
//! Collectives are timed by [`TimedCollective`], a wrapper around whichever implementation the
//! shard uses, so every implementation (TCP, in-process, NCCL) is measured the same way.

use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder,
};
use tessera_common::metrics as m;
use tessera_kernels::Backend;

use crate::collective::{Collective, CollectiveError};

pub struct WorkerMetrics {
    registry: Registry,
    step_duration: HistogramVec,
    collective_duration: HistogramVec,
    kv_blocks: IntGaugeVec,
    steps: IntCounterVec,
}

impl WorkerMetrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let step_duration = HistogramVec::new(
            HistogramOpts::new(
                m::WORKER_STEP_DURATION,
                "Seconds this worker spent executing one step.",
            )
            .buckets(m::STEP_BUCKETS.to_vec()),
            &[m::LABEL_RANK],
        )?;
        let collective_duration = HistogramVec::new(
            HistogramOpts::new(
                m::WORKER_COLLECTIVE_DURATION,
                "Seconds inside one collective operation (waiting for peers included).",
            )
            .buckets(m::STEP_BUCKETS.to_vec()),
            &[m::LABEL_RANK, m::LABEL_OP],
        )?;
        let kv_blocks = IntGaugeVec::new(
            Opts::new(
                m::WORKER_KV_BLOCKS,
                "KV-cache blocks this worker has room for.",
            ),
            &[m::LABEL_RANK],
        )?;
        let steps = IntCounterVec::new(
            Opts::new(m::WORKER_STEPS, "Steps this worker executed."),
            &[m::LABEL_RANK],
        )?;
        registry.register(Box::new(step_duration.clone()))?;
        registry.register(Box::new(collective_duration.clone()))?;
        registry.register(Box::new(kv_blocks.clone()))?;
        registry.register(Box::new(steps.clone()))?;
        Ok(WorkerMetrics {
            registry,
            step_duration,
            collective_duration,
            kv_blocks,
            steps,
        })
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        render(&self.registry)
    }

    /// A shard was loaded as `rank` with room for `kv_blocks` blocks. Series of a rank this
    /// worker no longer holds are dropped, so a rebuilt group does not leave stale ones behind.
    pub fn loaded(&self, rank: usize, kv_blocks: usize) {
        self.kv_blocks.reset();
        self.kv_blocks
            .with_label_values(&[rank.to_string().as_str()])
            .set(kv_blocks as i64);
    }

    pub fn step(&self, rank: usize, duration: Duration) {
        let rank = rank.to_string();
        self.step_duration
            .with_label_values(&[rank.as_str()])
            .observe(duration.as_secs_f64());
        self.steps.with_label_values(&[rank.as_str()]).inc();
    }
}

/// A registry in Prometheus' text exposition format (shared with the coordinator's metrics).
pub fn render(registry: &Registry) -> String {
    let mut out = Vec::new();
    // Encoding into a Vec fails only for malformed metrics; then the body is partial.
    if let Err(e) = TextEncoder::new().encode(&registry.gather(), &mut out) {
        tracing::warn!(error = %e, "encoding metrics failed");
    }
    String::from_utf8(out).unwrap_or_default()
}

/// Times every operation of the collective it wraps.
pub struct TimedCollective<B: Backend> {
    inner: Arc<dyn Collective<B>>,
    all_reduce: prometheus::Histogram,
    all_gather: prometheus::Histogram,
    all_to_all: prometheus::Histogram,
    broadcast: prometheus::Histogram,
}

impl<B: Backend> TimedCollective<B> {
    pub fn new(inner: Arc<dyn Collective<B>>, metrics: &WorkerMetrics) -> Self {
        let rank = inner.rank().to_string();
        let histogram = |op: &str| {
            metrics
                .collective_duration
                .with_label_values(&[rank.as_str(), op])
        };
        TimedCollective {
            all_reduce: histogram("all_reduce"),
            all_gather: histogram("all_gather"),
            all_to_all: histogram("all_to_all"),
            broadcast: histogram("broadcast"),
            inner,
        }
    }
}

fn timed<T>(h: &prometheus::Histogram, f: impl FnOnce() -> T) -> T {
    let started = Instant::now();
    let out = f();
    h.observe(started.elapsed().as_secs_f64());
    out
}

impl<B: Backend> Collective<B> for TimedCollective<B> {
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn world_size(&self) -> usize {
        self.inner.world_size()
    }
    fn all_reduce_sum(&self, b: &B, t: &mut B::Tensor) -> Result<(), CollectiveError> {
        timed(&self.all_reduce, || self.inner.all_reduce_sum(b, t))
    }
    fn all_gather_cols(&self, b: &B, t: B::Tensor) -> Result<B::Tensor, CollectiveError> {
        timed(&self.all_gather, || self.inner.all_gather_cols(b, t))
    }
    fn all_to_all(&self, b: &B, chunks: Vec<B::Tensor>) -> Result<Vec<B::Tensor>, CollectiveError> {
        timed(&self.all_to_all, || self.inner.all_to_all(b, chunks))
    }
    fn broadcast(&self, b: &B, t: &mut B::Tensor, root: usize) -> Result<(), CollectiveError> {
        timed(&self.broadcast, || self.inner.broadcast(b, t, root))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collective::InProcessGroup;
    use tessera_kernels::cpu::{CpuBackend, CpuTensor};

    #[test]
    fn collectives_and_steps_are_counted_per_rank_and_op() {
        let metrics = WorkerMetrics::new().unwrap();
        let group = InProcessGroup::new(2, Duration::from_secs(5));
        let mut handles = Vec::new();
        for i in 0..2 {
            let inner: Arc<dyn Collective<CpuBackend>> = Arc::new(group.member(i));
            let timed = TimedCollective::new(inner, &metrics);
            handles.push(std::thread::spawn(move || {
                let mut t = CpuTensor {
                    data: vec![i as f32; 4],
                    rows: 1,
                    cols: 4,
                };
                for _ in 0..3 {
                    timed.all_reduce_sum(&CpuBackend, &mut t).unwrap();
                }
                timed.all_gather_cols(&CpuBackend, t).unwrap()
            }));
        }
        for h in handles {
            assert_eq!(h.join().unwrap().cols, 8);
        }
        metrics.step(1, Duration::from_millis(3));
        metrics.loaded(1, 40);
        let text = metrics.render();
        let value = |series: &str| -> f64 {
            text.lines()
                .find(|l| l.starts_with(series))
                .and_then(|l| l.rsplit(' ').next()?.parse().ok())
                .unwrap_or_else(|| panic!("no {series} in\n{text}"))
        };
        let coll = m::WORKER_COLLECTIVE_DURATION;
        for rank in ["0", "1"] {
            let count = |op: &str| value(&format!("{coll}_count{{op=\"{op}\",rank=\"{rank}\"}}"));
            assert_eq!(count("all_reduce"), 3.0);
            assert_eq!(count("all_gather"), 1.0);
        }
        let step = m::WORKER_STEP_DURATION;
        assert_eq!(
            value(&format!("{step}_bucket{{rank=\"1\",le=\"0.002\"}}")),
            0.0
        );
        assert_eq!(
            value(&format!("{step}_bucket{{rank=\"1\",le=\"0.005\"}}")),
            1.0
        );
        assert_eq!(value(&format!("{}{{rank=\"1\"}}", m::WORKER_STEPS)), 1.0);
        assert_eq!(
            value(&format!("{}{{rank=\"1\"}}", m::WORKER_KV_BLOCKS)),
            40.0
        );
    }
}
