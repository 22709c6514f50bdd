//! The worker's step executor: one forward step over a batch of sequences (any mix of prefill
//! chunks and decode tokens), then sampling for the sequences that need a token.
//!
//! It holds the KV storage and the per-sequence state that must survive between steps (sampler,
//! the tokens seen so far for penalties, the last row's log-probabilities for a prefill continued
//! in the next chunk). Deciding
//! which sequences run and which blocks they use belongs to the scheduler that calls it: the
//! single-process [`Engine`](crate::engine::Engine) today, the coordinator in a cluster.

use std::collections::HashMap;

use tessera_common::{ModelSpec, PlacementMap};
use tessera_kernels::{Backend, SeqMeta, StepMeta};

use crate::WorkerError;
use crate::graphs::{DecodeGraphs, GraphStats};
use crate::kv_cache::KvCache;
use crate::model::{LogitRows, Model};
use crate::sampling::{History, Sampler, SamplingParams, log_softmax, log_sum_exp, top_logprobs};

/// One sequence's part of a step.
#[derive(Clone, Debug, PartialEq)]
pub struct SeqStep {
    pub seq_id: u64,
    /// New tokens: a prefill chunk, or the last sampled token when decoding.
    pub tokens: Vec<u32>,
    /// Context length after this step, new tokens included.
    pub context_len: usize,
    pub block_table: Vec<u32>,
    /// Used when the sequence is first seen; its sampler stream persists until released.
    pub sampling: SamplingParams,
    pub top_logprobs: usize,
    /// Report `log p(token | everything before it)` for each new token.
    pub prompt_logprobs: bool,
    /// Sample a token after this step (false for a prefill chunk that is not the last).
    pub sample: bool,
    /// How many of the sequence's tokens are prompt (the rest were generated; a sequence
    /// recomputed after preemption feeds both again).
    pub prompt_len: usize,
}

/// What a step yields for one sequence.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SeqResult {
    pub seq_id: u64,
    pub token: Option<u32>,
    pub logprob: f32,
    pub top_logprobs: Vec<(u32, f32)>,
    /// One per new token when asked for; `None` for the sequence's very first token.
    pub prompt_logprobs: Vec<Option<f32>>,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct StepResult {
    pub results: Vec<SeqResult>,
    /// Tokens routed to each expert, per MoE layer.
    pub expert_counts: Vec<(usize, Vec<u32>)>,
}

/// Something that runs steps: an [`Executor`] in this process, or a cluster of workers.
pub trait StepRunner {
    fn spec(&self) -> &ModelSpec;
    fn step(&mut self, seqs: &[SeqStep]) -> Result<StepResult, WorkerError>;
    /// Forgets finished, aborted or preempted sequences' state.
    fn release(&mut self, seq_ids: &[u64]);
    /// KV-cache blocks available to the scheduler (the smallest any rank reported).
    fn num_blocks(&self) -> usize;
    /// Positions per KV-cache block.
    fn block_size(&self) -> usize;
    /// The compute backend, for logs and model info (e.g. "cpu (2 threads)").
    fn backend(&self) -> String;
    /// Moves experts between ranks. Callers first release every sequence: the KV cache does not
    /// survive (sequences are recomputed).
    fn set_placement(&mut self, placement: &PlacementMap) -> Result<(), WorkerError>;
    /// Ranks in the group (1 for an in-process executor).
    fn world_size(&self) -> usize {
        1
    }
    /// Where each rank serves its Prometheus metrics (`host:port`), for scrape discovery; empty
    /// when the ranks serve none (an in-process executor's metrics are the coordinator's).
    fn metrics_addresses(&self) -> Vec<String> {
        Vec::new()
    }
    /// Checks, between steps, that every part of the runner is still there (a worker process
    /// alive, answering and holding its shard); an error means the group is lost. Must be quick:
    /// a step waits for it. In one process there is nothing to lose.
    fn check_health(&mut self) -> Result<(), WorkerError> {
        Ok(())
    }
    /// Replays decode batches up to `max_batch` from graphs (0: every step eager), where the
    /// runner has graphs; for benchmarks that compare the two. Others ignore it.
    fn set_graph_max_batch(&mut self, _max_batch: usize) {}
    /// How many steps ran from graphs.
    fn graph_stats(&self) -> GraphStats {
        GraphStats::default()
    }
}

impl<R: StepRunner + ?Sized> StepRunner for Box<R> {
    fn spec(&self) -> &ModelSpec {
        (**self).spec()
    }
    fn step(&mut self, seqs: &[SeqStep]) -> Result<StepResult, WorkerError> {
        (**self).step(seqs)
    }
    fn release(&mut self, seq_ids: &[u64]) {
        (**self).release(seq_ids)
    }
    fn num_blocks(&self) -> usize {
        (**self).num_blocks()
    }
    fn block_size(&self) -> usize {
        (**self).block_size()
    }
    fn backend(&self) -> String {
        (**self).backend()
    }
    fn set_placement(&mut self, placement: &PlacementMap) -> Result<(), WorkerError> {
        (**self).set_placement(placement)
    }
    fn world_size(&self) -> usize {
        (**self).world_size()
    }
    fn metrics_addresses(&self) -> Vec<String> {
        (**self).metrics_addresses()
    }
    fn check_health(&mut self) -> Result<(), WorkerError> {
        (**self).check_health()
    }
    fn set_graph_max_batch(&mut self, max_batch: usize) {
        (**self).set_graph_max_batch(max_batch)
    }
    fn graph_stats(&self) -> GraphStats {
        (**self).graph_stats()
    }
}

impl<B: Backend> StepRunner for Executor<B> {
    fn spec(&self) -> &ModelSpec {
        Executor::spec(self)
    }
    fn step(&mut self, seqs: &[SeqStep]) -> Result<StepResult, WorkerError> {
        Executor::step(self, seqs)
    }
    fn release(&mut self, seq_ids: &[u64]) {
        seq_ids.iter().for_each(|id| Executor::release(self, *id))
    }
    fn num_blocks(&self) -> usize {
        Executor::num_blocks(self)
    }
    fn block_size(&self) -> usize {
        Executor::block_size(self)
    }
    fn backend(&self) -> String {
        self.model.backend().name()
    }
    fn set_placement(&mut self, placement: &PlacementMap) -> Result<(), WorkerError> {
        // One process holds every expert: the only valid map is the single-rank one.
        placement.validate(self.spec())?;
        if placement.world_size != 1 {
            return Err(WorkerError::Plan(format!(
                "placement is for {} ranks; this server runs one",
                placement.world_size
            )));
        }
        Ok(())
    }
    fn set_graph_max_batch(&mut self, max_batch: usize) {
        self.enable_graphs(max_batch)
    }
    fn graph_stats(&self) -> GraphStats {
        Executor::graph_stats(self)
    }
}

/// What the executor remembers of a sequence between its steps.
struct SeqState {
    sampler: Sampler,
    /// Every token fed so far, by position.
    tokens: Vec<u32>,
}

pub struct Executor<B: Backend> {
    model: Model<B>,
    cache: KvCache<B>,
    /// Decode steps replayed from graphs, once enabled ([`Executor::enable_graphs`]).
    graphs: Option<DecodeGraphs<B>>,
    seqs: HashMap<u64, SeqState>,
    /// Log-probabilities after the last token of an unfinished prefill, for the next chunk.
    carry: HashMap<u64, Vec<f32>>,
}

impl<B: Backend> Executor<B> {
    /// An executor whose KV pool takes at most `bytes` (at least one block).
    pub fn with_kv_budget(
        model: Model<B>,
        bytes: u64,
        block_size: usize,
    ) -> Result<Self, WorkerError> {
        let element = model.backend().kv_element_bytes();
        let per_block = model
            .kv_specs(1, block_size)
            .iter()
            .try_fold(0u64, |sum, s| sum.checked_add(s.bytes(element)?))
            .ok_or_else(|| {
                WorkerError::KvCacheTooLarge(format!(
                    "one block of {block_size} positions overflows 64 bits"
                ))
            })?;
        let blocks = (bytes / per_block.max(1)).max(1);
        Self::new(
            model,
            usize::try_from(blocks).unwrap_or(usize::MAX),
            block_size,
        )
    }

    /// An executor with a KV pool of `num_blocks` blocks of `block_size` positions; fails (rather
    /// than aborting on allocation) when the pool overflows or exceeds the memory available.
    pub fn new(model: Model<B>, num_blocks: usize, block_size: usize) -> Result<Self, WorkerError> {
        let specs = model.kv_specs(num_blocks, block_size);
        let b = model.backend();
        crate::kv_cache::check_size(&specs, b.kv_element_bytes(), b.kv_memory_available())?;
        let cache = KvCache::new(model.backend(), specs)?;
        Ok(Executor {
            model,
            cache,
            graphs: None,
            seqs: HashMap::new(),
            carry: HashMap::new(),
        })
    }

    pub fn spec(&self) -> &ModelSpec {
        self.model.spec()
    }

    pub fn block_size(&self) -> usize {
        self.cache.block_size()
    }

    pub fn num_blocks(&self) -> usize {
        self.cache.num_blocks()
    }

    /// Replays decode steps of up to `max_batch` sequences from captured graphs (see
    /// [`crate::graphs`]); 0 turns graphs off. Only a backend with graphs (CUDA) gains from it:
    /// elsewhere every capture is refused and steps run eagerly.
    pub fn enable_graphs(&mut self, max_batch: usize) {
        self.graphs = (max_batch > 0).then(|| DecodeGraphs::new(max_batch));
    }

    /// How many steps ran from graphs (all zero while graphs are off).
    pub fn graph_stats(&self) -> GraphStats {
        self.graphs.as_ref().map(|g| g.stats()).unwrap_or_default()
    }

    /// Forgets a finished or aborted sequence's state.
    pub fn release(&mut self, seq_id: u64) {
        self.seqs.remove(&seq_id);
        self.carry.remove(&seq_id);
    }

    /// Runs one step over `seqs`.
    pub fn step(&mut self, seqs: &[SeqStep]) -> Result<StepResult, WorkerError> {
        let vocab = self.model.spec().vocab_size;
        let mut meta = StepMeta {
            seqs: Vec::with_capacity(seqs.len()),
            block_size: self.cache.block_size(),
            tokens: Vec::new(),
        };
        let (mut rows, mut full) = (Vec::new(), Vec::new());
        let tokens = &mut meta.tokens;
        // For each sequence: where its rows start in the logits, and how many it has.
        let mut row_spans = Vec::with_capacity(seqs.len());
        for s in seqs {
            if s.tokens.is_empty() || s.context_len < s.tokens.len() {
                return Err(WorkerError::Request(format!(
                    "sequence {}: {} new tokens with context length {}",
                    s.seq_id,
                    s.tokens.len(),
                    s.context_len
                )));
            }
            let start = tokens.len();
            meta.seqs.push(SeqMeta {
                token_start: start,
                num_tokens: s.tokens.len(),
                context_len: s.context_len,
                block_table: s.block_table.clone(),
            });
            tokens.extend_from_slice(&s.tokens);
            let wanted: Vec<usize> = if s.prompt_logprobs {
                (start..tokens.len()).collect()
            } else if s.sample {
                vec![tokens.len() - 1]
            } else {
                Vec::new()
            };
            // A plain greedy choice with only its own logprob needs the row's summary alone.
            let summary_only =
                !s.prompt_logprobs && s.top_logprobs == 0 && s.sampling.is_plain_greedy();
            full.extend(std::iter::repeat_n(!summary_only, wanted.len()));
            row_spans.push((rows.len(), wanted.len()));
            rows.extend(wanted);
        }
        let logit_rows = LogitRows {
            rows: &rows,
            full: &full,
        };
        let replayed = match &mut self.graphs {
            Some(g) => g.forward(&self.model, &meta, &mut self.cache, logit_rows)?,
            None => None,
        };
        let out = match replayed {
            Some(out) => out,
            None => self.model.forward(&meta, &mut self.cache, logit_rows)?,
        };
        // Where each requested row's logits are in `out.logits` (full rows only).
        let full_at: Vec<Option<usize>> = full
            .iter()
            .scan(0, |k, &f| {
                Some(f.then(|| {
                    *k += 1;
                    *k - 1
                }))
            })
            .collect();
        let row = |i: usize| -> Result<&[f32], WorkerError> {
            let k = full_at[i].ok_or_else(|| {
                WorkerError::Request(format!("logits row {i} was not copied to the host"))
            })?;
            Ok(&out.logits[k * vocab..(k + 1) * vocab])
        };
        let mut results = Vec::with_capacity(seqs.len());
        for (s, &(first, count)) in seqs.iter().zip(&row_spans) {
            let mut r = SeqResult {
                seq_id: s.seq_id,
                ..Default::default()
            };
            let mut last_lp = None;
            if s.prompt_logprobs {
                let fresh = s.context_len == s.tokens.len();
                let mut prev = self.carry.remove(&s.seq_id);
                for (j, &t) in s.tokens.iter().enumerate() {
                    let value = prev.as_ref().map(|lp: &Vec<f32>| lp[t as usize]);
                    r.prompt_logprobs
                        .push(if j == 0 && fresh { None } else { value });
                    prev = Some(log_softmax(row(first + j)?));
                }
                last_lp = prev;
            }
            let state = self.seqs.entry(s.seq_id).or_insert_with(|| SeqState {
                sampler: Sampler::new(s.sampling.clone()),
                tokens: Vec::new(),
            });
            // Positions before this step's tokens are already known; a recomputed sequence
            // starts again from position 0.
            state.tokens.truncate(s.context_len - s.tokens.len());
            state.tokens.extend_from_slice(&s.tokens);
            if s.sample && !full[first + count - 1] {
                let summary = out.summaries.get(first + count - 1).ok_or_else(|| {
                    WorkerError::Request("the step returned no summary for a greedy row".into())
                })?;
                r.token = Some(summary.argmax);
                r.logprob = summary.logprob();
            } else if s.sample {
                let logits = row(first + count - 1)?;
                let history = History {
                    tokens: &state.tokens,
                    prompt_len: s.prompt_len,
                };
                let token = state.sampler.sample(logits, history);
                r.token = Some(token);
                // The whole log-softmax only when more than the chosen token's value is needed.
                let lp = match last_lp.take() {
                    Some(lp) => Some(lp),
                    None if s.top_logprobs > 0 => Some(log_softmax(logits)),
                    None => None,
                };
                r.logprob = match &lp {
                    Some(lp) => lp[token as usize],
                    None => logits[token as usize] - log_sum_exp(logits),
                };
                if let Some(lp) = lp.filter(|_| s.top_logprobs > 0) {
                    r.top_logprobs = top_logprobs(&lp, s.top_logprobs);
                }
            } else if let Some(lp) = last_lp {
                self.carry.insert(s.seq_id, lp);
            }
            results.push(r);
        }
        Ok(StepResult {
            results,
            expert_counts: out.expert_counts,
        })
    }
}
