//! Decode steps replayed from graphs (CUDA graphs): one launch per step instead of hundreds.
//!
//! At small batches a decode step's time goes to launching its kernels, not to running them. A
//! graph captured over one step replays the whole forward pass with one launch, provided that
//! nothing in it changes from step to step but the contents of device buffers. So decode steps
//! are padded to a [`StepShape`]: the batch rounded up to a bucket (1, 2, 4, 8, then multiples of
//! 8), block tables to the width of the longest context rounded up to a power of two (at least
//! [`MIN_SPAN`] positions). Each shape gets a graph and a step whose metadata is rewritten in
//! place before each replay ([`Backend::update_step`]). Every graph copies its results into the
//! same output tensors (logits for the largest bucket, expert counts), since only one runs at a
//! time: one `[largest bucket, vocab]` buffer rather than one per bucket.
//!
//! A shape is captured the second time it is seen, so the first step of a shape runs eagerly and
//! makes the one-time uploads (expert tables) that a capture refuses. Anything else a capture
//! refuses (a host copy in some path, an allocation the device will not give) makes that shape
//! eager for good, with a warning: a refusal costs speed, never a wrong token. Prefill and mixed
//! steps, tensor-parallel ranks (whose collectives are not captured) and batches past the
//! largest bucket always run eagerly.

use std::collections::{HashMap, HashSet};

use tessera_kernels::{Backend, BackendError, StepMeta, StepShape};

use crate::WorkerError;
use crate::kv_cache::KvCache;
use crate::layers::{MlaAttend, MlaForm};
use crate::model::{LogitRows, Model, StepOutput};
use crate::results::StepResults;

/// Shortest context span a shape is sized for: shorter contexts share one graph.
pub const MIN_SPAN: usize = 256;

/// Default largest batch replayed from a graph.
pub const DEFAULT_MAX_BATCH: usize = 128;

/// How many decode steps ran from graphs, for logs, benchmarks and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GraphStats {
    pub captures: u64,
    pub replays: u64,
    /// Shapes whose capture failed (they run eagerly from then on).
    pub refused: u64,
}

/// One captured shape.
struct Captured<B: Backend> {
    graph: B::Graph,
    step: B::Step,
}

/// Tensors every graph copies its results into.
struct Outputs<B: Backend> {
    /// `[largest bucket, vocab]`: a graph fills its bucket's first rows.
    logits: B::Tensor,
    /// The summaries of the largest bucket's rows (a graph fills its bucket's) and the counts.
    results: StepResults<B>,
}

impl<B: Backend> Outputs<B> {
    fn new(model: &Model<B>, rows: usize) -> Result<Self, WorkerError> {
        let b = model.backend();
        let vocab = model.spec().vocab_size;
        Ok(Outputs {
            logits: b.zeros(rows, vocab)?,
            results: StepResults::new(b, &model.moe_layers(), rows)?,
        })
    }
}

/// The decode graphs of one executor.
pub struct DecodeGraphs<B: Backend> {
    max_batch: usize,
    graphs: HashMap<StepShape, Captured<B>>,
    /// Made with the first capture.
    outputs: Option<Outputs<B>>,
    /// Shapes run once eagerly (the next step of the shape is captured).
    seen: HashSet<StepShape>,
    refused: HashSet<StepShape>,
    stats: GraphStats,
}

/// The batch bucket of `n` sequences: 1, 2, 4, 8, then the next multiple of 8.
pub fn bucket(n: usize) -> usize {
    match n {
        0..=2 => n.max(1),
        3..=4 => 4,
        _ => n.next_multiple_of(8),
    }
}

/// The largest bucket of at most `max_batch` sequences (at least 1).
pub fn largest_bucket(max_batch: usize) -> usize {
    (1..=max_batch).rev().find(|&n| bucket(n) == n).unwrap_or(1)
}

/// The shape a decode step of `meta` replays in, or `None` if it is not a decode step (a
/// sequence with more than one new token) or its batch is past `max_batch`.
pub fn decode_shape(meta: &StepMeta, max_batch: usize) -> Option<StepShape> {
    let n = meta.num_tokens();
    if n == 0 || meta.seqs.iter().any(|s| s.num_tokens != 1) || bucket(n) > max_batch {
        return None;
    }
    let span = meta.max_span(None).next_power_of_two().max(MIN_SPAN);
    Some(StepShape {
        rows: bucket(n),
        table_width: span.div_ceil(meta.block_size.max(1)),
        max_span: span,
    })
}

impl<B: Backend> DecodeGraphs<B> {
    /// Graphs for decode batches up to `max_batch` sequences (rounded down to a bucket).
    pub fn new(max_batch: usize) -> Self {
        DecodeGraphs {
            max_batch,
            graphs: HashMap::new(),
            outputs: None,
            seen: HashSet::new(),
            refused: HashSet::new(),
            stats: GraphStats::default(),
        }
    }

    pub fn stats(&self) -> GraphStats {
        self.stats
    }

    /// Runs the step from a graph when it is a decode step of a shape that has one (capturing
    /// it on the shape's second step); `None` when the caller must run it eagerly.
    pub fn forward(
        &mut self,
        model: &Model<B>,
        meta: &StepMeta,
        cache: &mut KvCache<B>,
        logits: LogitRows<'_>,
    ) -> Result<Option<StepOutput>, WorkerError> {
        if model.world() > 1 {
            return Ok(None);
        }
        let Some(shape) = decode_shape(meta, self.max_batch) else {
            return Ok(None);
        };
        if self.refused.contains(&shape) {
            return Ok(None);
        }
        model.check_step(meta, cache, logits)?;
        let b = model.backend();
        match self.graphs.get_mut(&shape) {
            Some(c) => b.update_step(&mut c.step, meta, model.rope())?,
            None if self.seen.insert(shape) => return Ok(None),
            None => match self.capture(model, meta, cache, shape) {
                Ok(c) => {
                    self.stats.captures += 1;
                    tracing::debug!(?shape, "captured a decode graph");
                    self.graphs.insert(shape, c);
                }
                Err(e) => {
                    self.stats.refused += 1;
                    tracing::warn!(?shape, error = %e, "decode graph not captured: this shape runs eagerly");
                    self.refused.insert(shape);
                    return Ok(None);
                }
            },
        }
        let graph = &self.graphs[&shape].graph;
        b.replay(graph)?;
        self.stats.replays += 1;
        let out = self.outputs.as_ref().ok_or_else(|| {
            WorkerError::Backend(BackendError::Device {
                op: "decode graph",
                detail: "a graph without outputs".into(),
            })
        })?;
        // One copy for a greedy step: the summaries and counts the graph packed.
        let back = out
            .results
            .to_host(b, logits.summarised().iter().copied())?;
        let n = meta.num_tokens();
        let host_logits = if !logits.full.iter().any(|&f| f) {
            Vec::new()
        } else if logits.is_every_row(n) {
            model.full_rows_to_host(&out.logits, logits)?
        } else {
            model.full_rows_to_host(&b.gather_rows(&out.logits, logits.rows)?, logits)?
        };
        Ok(Some(StepOutput {
            logits: host_logits,
            summaries: back.summaries,
            expert_counts: back.expert_counts,
        }))
    }

    /// Captures the forward pass of `meta` padded to `shape` (nothing runs yet).
    fn capture(
        &mut self,
        model: &Model<B>,
        meta: &StepMeta,
        cache: &mut KvCache<B>,
        shape: StepShape,
    ) -> Result<Captured<B>, WorkerError> {
        let b = model.backend();
        let step = b.prepare_step_shaped(meta, model.rope(), shape)?;
        let out = match &mut self.outputs {
            Some(out) => out,
            None => self
                .outputs
                .insert(Outputs::new(model, largest_bucket(self.max_batch))?),
        };
        // The model's own errors cannot travel through the backend's capture: kept aside.
        let mut failure = None;
        let graph = b.capture(|| {
            let mut run = || -> Result<(), WorkerError> {
                // Decode: the absorbed form (the expanded one reads every context row).
                let ran = model.run(&step, cache, None, &MlaAttend::Whole(MlaForm::Absorbed))?;
                b.copy_into(&mut out.logits, &ran.logits)?;
                out.results.fill(b, &ran, shape.rows, &step)?;
                Ok(())
            };
            run().map_err(|e| match e {
                WorkerError::Backend(e) => e,
                other => {
                    let detail = other.to_string();
                    failure = Some(other);
                    BackendError::Invalid {
                        op: "decode graph",
                        detail,
                    }
                }
            })
        });
        match (graph, failure) {
            (Ok(graph), _) => Ok(Captured { graph, step }),
            (Err(_), Some(e)) => Err(e),
            (Err(e), None) => Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use tessera_kernels::SeqMeta;

    use super::*;

    fn decode(contexts: &[usize], block_size: usize) -> StepMeta {
        let seqs = contexts
            .iter()
            .enumerate()
            .map(|(i, &c)| SeqMeta {
                token_start: i,
                num_tokens: 1,
                context_len: c,
                block_table: (0..c.div_ceil(block_size) as u32).collect(),
            })
            .collect();
        StepMeta::without_ids(seqs, block_size)
    }

    #[test]
    fn batches_round_up_to_buckets() {
        let got: Vec<usize> = [0, 1, 2, 3, 4, 5, 8, 9, 17, 64, 65].map(bucket).to_vec();
        assert_eq!(got, [1, 1, 2, 4, 4, 8, 8, 16, 24, 64, 72]);
        let largest: Vec<usize> = [0, 1, 3, 7, 8, 10, 128].map(largest_bucket).to_vec();
        assert_eq!(largest, [1, 1, 2, 4, 8, 8, 128]);
    }

    #[test]
    fn a_decode_step_gets_the_shape_of_its_bucket_and_longest_context() {
        let shape = decode_shape(&decode(&[10, 300, 40], 16), 128).unwrap();
        assert_eq!(
            shape,
            StepShape {
                rows: 4,
                table_width: 32,
                max_span: 512
            }
        );
        // Short contexts share the smallest span.
        let short = decode_shape(&decode(&[1], 16), 128).unwrap();
        assert_eq!(
            (short.rows, short.max_span, short.table_width),
            (1, MIN_SPAN, 16)
        );
        // Past the largest bucket, or a prefill chunk among the sequences: no graph.
        assert_eq!(decode_shape(&decode(&[5; 9], 16), 8), None);
        let mut mixed = decode(&[5, 5], 16);
        mixed.seqs[1].num_tokens = 2;
        assert_eq!(decode_shape(&mixed, 128), None);
        assert_eq!(decode_shape(&decode(&[], 16), 128), None);
        // Every step a shape is given for fits it.
        for contexts in [&[1][..], &[255, 256, 257], &[4096; 5]] {
            let meta = decode(contexts, 16);
            let shape = decode_shape(&meta, 128).unwrap();
            shape.check("test", &meta).unwrap();
        }
    }
}
