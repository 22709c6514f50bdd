//! Measuring the largest step before the KV cache takes the rest of the GPU (vLLM's profile run).
//!
//! With `--gpu-memory-utilization` the KV cache gets what the weights and the activations leave
//! of the process's share, so the activations must be known before the cache is allocated: a
//! guess too small fails the first long prompt with an out-of-memory error, one too large wastes
//! cache. So after loading, a worker runs the largest step the scheduler may send it
//! ([`StepLimits`]: `--max-step-tokens` tokens over `--max-running` fresh sequences, with every
//! row's logits, as prompt logprobs ask; for latent attention in both of MLA's forms, see
//! [`crate::layers::MlaPolicy`]) on a small throwaway cache, then a decode step of the
//! largest batch that replays from a CUDA graph (captured, as the executor will), and reads how
//! far the device's allocators grew ([`Backend::memory_use`]). What it measured, plus
//! [`PROFILE_MARGIN_BYTES`], is kept out of the cache ([`ActivationProfile::reserve_bytes`]).
//!
//! A tensor-parallel rank profiles alone, its collectives rehearsed ([`Rehearsal`]: results of
//! the group's shapes, nobody waited for), so the first rank to finish loading does not wait for
//! the slowest with the step timeout; its decode steps run eagerly, so it has no graph to
//! measure. A device that cannot report its allocators' use (the CPU) is not profiled, and keeps
//! the flat [`crate::device::ACTIVATION_RESERVE_BYTES`].

use std::sync::Arc;

use serde::Serialize;
use tessera_kernels::{Backend, SeqMeta, StepMeta};

use crate::WorkerError;
use crate::collective::Rehearsal;
use crate::graphs::{DecodeGraphs, largest_bucket};
use crate::kv_cache::KvCache;
use crate::layers::{MlaPolicy, MlaPrefill};
use crate::model::{LogitRows, Model};

/// Most tokens in one step by default (the scheduler's `max_step_tokens`).
pub const DEFAULT_MAX_STEP_TOKENS: usize = 512;

/// Most sequences in one step by default (the scheduler's `max_running`).
pub const DEFAULT_MAX_SEQS: usize = 64;

/// Kept from the KV cache besides what the profile measured: allocations outside the pools it
/// reads (library workspaces, the driver's own) and fragmentation of the pool once the cache
/// sits in it.
pub const PROFILE_MARGIN_BYTES: u64 = 256 << 20;

/// The largest step a worker will be sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StepLimits {
    /// Most tokens in one step: prefill chunks plus decode tokens. Default
    /// [`DEFAULT_MAX_STEP_TOKENS`].
    pub max_step_tokens: usize,
    /// Most sequences in one step. Default [`DEFAULT_MAX_SEQS`].
    pub max_seqs: usize,
}

impl Default for StepLimits {
    fn default() -> Self {
        StepLimits {
            max_step_tokens: DEFAULT_MAX_STEP_TOKENS,
            max_seqs: DEFAULT_MAX_SEQS,
        }
    }
}

impl StepLimits {
    /// Both limits must allow some work; the message names the flag.
    pub fn validate(&self) -> Result<(), WorkerError> {
        for (flag, v) in [
            ("--max-step-tokens", self.max_step_tokens),
            ("--max-running", self.max_seqs),
        ] {
            if v == 0 {
                return Err(WorkerError::Plan(format!("{flag} 0: must be at least 1")));
            }
        }
        Ok(())
    }
}

/// What the profile measured.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ActivationProfile {
    /// Tokens and sequences of the largest step run.
    pub tokens: usize,
    pub seqs: usize,
    /// Bytes the memory pool grew by over the profile: activations of the largest step, the
    /// graphs' shared outputs, one-time tables.
    pub pool_bytes: u64,
    /// Bytes of graph memory the largest decode batch's graph took (0 without one).
    pub graph_bytes: u64,
    /// That batch (0 when graphs are off, or its capture was refused).
    pub graph_batch: usize,
}

impl ActivationProfile {
    /// What the KV cache must leave free: the measurements and [`PROFILE_MARGIN_BYTES`].
    pub fn reserve_bytes(&self) -> u64 {
        self.pool_bytes + self.graph_bytes + PROFILE_MARGIN_BYTES
    }
}

/// A step to profile with, and the cache blocks it needs (numbered from 0).
#[derive(Clone, Debug, PartialEq)]
pub struct ProfileStep {
    pub meta: StepMeta,
    pub blocks: usize,
}

/// The largest step `limits` allow: as many fresh sequences as there may be, sharing the token
/// budget as evenly as it divides, none longer than `max_positions`. Token ids cycle through the
/// vocabulary.
pub fn largest_step(
    limits: StepLimits,
    max_positions: usize,
    vocab: usize,
    block_size: usize,
) -> ProfileStep {
    let seqs = limits.max_seqs.min(limits.max_step_tokens).max(1);
    let tokens = limits
        .max_step_tokens
        .min(seqs.saturating_mul(max_positions.max(1)));
    let lengths: Vec<usize> = (0..seqs)
        .map(|i| tokens / seqs + usize::from(i < tokens % seqs))
        .filter(|&n| n > 0)
        .collect();
    let ids = (0..tokens)
        .map(|i| ((i * 31 + 7) % vocab.max(1)) as u32)
        .collect();
    fresh_sequences(&lengths, ids, block_size)
}

/// `n` sequences of one token each at position 0: a decode step of batch `n` (the shape of a
/// graph), the cheapest to run.
pub fn decode_step(n: usize, block_size: usize) -> ProfileStep {
    fresh_sequences(&vec![1; n], vec![0; n], block_size)
}

fn fresh_sequences(lengths: &[usize], tokens: Vec<u32>, block_size: usize) -> ProfileStep {
    let bs = block_size.max(1);
    let (mut seqs, mut start, mut blocks) = (Vec::with_capacity(lengths.len()), 0, 0);
    for &n in lengths {
        let used = n.div_ceil(bs);
        seqs.push(SeqMeta {
            token_start: start,
            num_tokens: n,
            context_len: n,
            block_table: (blocks as u32..(blocks + used) as u32).collect(),
        });
        start += n;
        blocks += used;
    }
    ProfileStep {
        meta: StepMeta {
            seqs,
            block_size: bs,
            tokens,
        },
        blocks,
    }
}

/// Runs the largest step and (with `graph_max_batch` > 0) the largest graphed decode step on a
/// throwaway cache, and returns how much device memory they took; `None` where it cannot be
/// measured (see the module docs). Unused memory goes back to the device before and after, so
/// what it reports free afterwards is free.
pub fn profile_activations<B: Backend>(
    model: &mut Model<B>,
    limits: StepLimits,
    block_size: usize,
    graph_max_batch: usize,
) -> Result<Option<ActivationProfile>, WorkerError> {
    if model.backend().memory_use()?.is_none() {
        return Ok(None);
    }
    if model.world() == 1 {
        return profile(model, limits, block_size, graph_max_batch);
    }
    let alone = Rehearsal {
        rank: model.rank(),
        world: model.world(),
    };
    let group = model.replace_comm(Arc::new(alone));
    let profiled = profile(model, limits, block_size, 0);
    model.replace_comm(group);
    profiled
}

fn profile<B: Backend>(
    model: &mut Model<B>,
    limits: StepLimits,
    block_size: usize,
    graph_max_batch: usize,
) -> Result<Option<ActivationProfile>, WorkerError> {
    let b = model.backend();
    let spec = model.spec();
    let largest = largest_step(
        limits,
        spec.max_position_embeddings,
        spec.vocab_size,
        block_size,
    );
    let graph_batch = largest_bucket(graph_max_batch.min(limits.max_seqs));
    let decode = (graph_max_batch > 0).then(|| decode_step(graph_batch, block_size));
    let blocks = largest.blocks.max(decode.as_ref().map_or(0, |d| d.blocks));
    let mut cache = KvCache::new(b, model.kv_specs(blocks, block_size))?;
    let (tokens, seqs) = (largest.meta.num_tokens(), largest.meta.seqs.len());
    // Each names the step that failed and the flags that shrink it.
    let failed = |e: WorkerError| {
        WorkerError::Device(format!(
            "the largest step a worker may be sent ({tokens} tokens over {seqs} sequences) \
             failed before the KV cache was allocated: {e}; lower --max-step-tokens or \
             --max-running, or spread the model over more GPUs"
        ))
    };
    let decode_failed = |e: WorkerError| {
        WorkerError::Device(format!(
            "the largest decode step replayed from a CUDA graph ({graph_batch} sequences) \
             failed before the KV cache was allocated: {e}; lower --cuda-graph-max-batch (0 \
             or --enforce-eager for none) or --max-running"
        ))
    };
    b.trim_memory()?;
    let before = b.memory_use()?.unwrap_or_default();
    let rows: Vec<usize> = (0..tokens).collect();
    let full = vec![true; tokens];
    let every_row = LogitRows {
        rows: &rows,
        full: &full,
    };
    // An MLA model's largest step in both forms: the expanded one holds every context row's
    // keys and values, the absorbed one every query head's latent projection.
    let policy = model.mla_policy();
    let forms = if model.has_mla() {
        vec![MlaPrefill::Expanded, MlaPrefill::Absorbed]
    } else {
        vec![policy.prefill]
    };
    for prefill in forms {
        model.set_mla_policy(MlaPolicy { prefill, ..policy });
        let ran = model.forward(&largest.meta, &mut cache, every_row);
        model.set_mla_policy(policy);
        ran.map_err(failed)?;
    }
    let b = model.backend();
    let mut captured = 0;
    if let Some(d) = decode {
        let n = d.meta.num_tokens();
        let rows: Vec<usize> = (0..n).collect();
        let greedy = vec![false; n];
        let logits = LogitRows {
            rows: &rows,
            full: &greedy,
        };
        let mut graphs = DecodeGraphs::new(graph_max_batch);
        // The first step of a shape runs eagerly; the second captures its graph and replays it.
        for _ in 0..2 {
            let replayed = graphs
                .forward(model, &d.meta, &mut cache, logits)
                .map_err(decode_failed)?;
            if replayed.is_none() {
                model
                    .forward(&d.meta, &mut cache, logits)
                    .map_err(decode_failed)?;
            }
        }
        captured = graphs.stats().captures;
    }
    let after = b.memory_use()?.unwrap_or_default();
    drop(cache);
    b.trim_memory()?;
    let profile = ActivationProfile {
        tokens,
        seqs,
        pool_bytes: after.pool_peak.saturating_sub(before.pool),
        graph_bytes: after.graphs_peak.saturating_sub(before.graphs),
        graph_batch: if captured > 0 { graph_batch } else { 0 },
    };
    let mib = |b: u64| b >> 20;
    tracing::info!(
        tokens,
        seqs,
        activations_mib = mib(profile.pool_bytes),
        graph_mib = mib(profile.graph_bytes),
        graph_batch = profile.graph_batch,
        "profiled the largest step"
    );
    Ok(Some(profile))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lengths(p: &ProfileStep) -> Vec<usize> {
        p.meta.seqs.iter().map(|s| s.num_tokens).collect()
    }

    #[test]
    fn the_largest_step_shares_the_token_budget_among_fresh_sequences() {
        let limits = |t, s| StepLimits {
            max_step_tokens: t,
            max_seqs: s,
        };
        let p = largest_step(limits(10, 4), 128, 256, 4);
        assert_eq!(lengths(&p), [3, 3, 2, 2]);
        assert_eq!(p.meta.tokens.len(), 10);
        // Fresh sequences: their context is their tokens, their blocks are their own.
        assert_eq!(p.blocks, 4);
        assert!(p.meta.seqs.iter().all(|s| s.context_len == s.num_tokens));
        assert_eq!(p.meta.seqs[1].block_table, [1]);
        p.meta.validate("test").unwrap();
        // More sequences than tokens: one token each.
        assert_eq!(
            lengths(&largest_step(limits(3, 64), 128, 256, 16)),
            [1, 1, 1]
        );
        // No sequence past the model's positions: the budget shrinks to what fits.
        let p = largest_step(limits(512, 2), 128, 256, 16);
        assert_eq!(lengths(&p), [128, 128]);
        assert_eq!(p.blocks, 16);
        // Ids stay inside the vocabulary.
        assert!(p.meta.tokens.iter().all(|&t| t < 256));
    }

    #[test]
    fn a_decode_step_is_one_token_per_sequence() {
        let d = decode_step(8, 16);
        assert_eq!(lengths(&d), [1; 8]);
        assert_eq!(d.blocks, 8);
        d.meta.validate("test").unwrap();
    }

    #[test]
    fn zero_limits_are_refused_by_flag() {
        let err = StepLimits {
            max_step_tokens: 0,
            max_seqs: 4,
        }
        .validate()
        .unwrap_err();
        assert!(err.to_string().contains("--max-step-tokens 0"), "{err}");
    }
}
