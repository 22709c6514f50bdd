//! The coordinator's scheduler: which sequences run in the next step, with how many tokens, in
//! which KV-cache blocks. It does no I/O, so every decision is unit-tested directly.
//!
//! - Continuous batching: sequences join and leave the batch at every step.
//! - Chunked prefill: a step carries at most `max_step_tokens` tokens; running sequences' decode
//!   tokens are scheduled first, long prompts fill the rest in chunks.
//! - Paged KV cache: blocks are allocated as a sequence grows, never reserved up front.
//! - Preemption by recompute: when a running sequence needs a block and none is free, the
//!   least urgent running sequence (batch before interactive, newest first) gives its blocks back
//!   and waits at the head of the queue; when it runs again its prompt and generated tokens are
//!   prefilled again. Sampling draws depend only on (seed, token index), so the result is the same.
//! - Admission: at most `max_running` sequences run; at most `max_waiting` wait, beyond that
//!   [`Scheduler::add`] refuses (the API answers RESOURCE_EXHAUSTED / HTTP 429).

use std::collections::{HashMap, VecDeque};

use serde::{Deserialize, Serialize};
use tessera_worker::executor::{SeqStep, StepResult};
use tessera_worker::kv_cache::BlockAllocator;
use tessera_worker::sampling::SamplingParams;

/// Limits of the scheduler. Defaults are documented on each field.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SchedulerConfig {
    /// Positions per KV-cache block. Default 16.
    pub block_size: usize,
    /// Blocks in the pool (the smallest capacity any worker reported). Default 1024.
    pub num_blocks: usize,
    /// Most sequences in one step. Default 64.
    pub max_running: usize,
    /// Most sequences waiting to start; more are refused. Default 256.
    pub max_waiting: usize,
    /// Most tokens (prefill chunks plus decode tokens) in one step. Default 512.
    pub max_step_tokens: usize,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            block_size: 16,
            num_blocks: 1024,
            max_running: tessera_worker::profile::DEFAULT_MAX_SEQS,
            max_waiting: 256,
            max_step_tokens: tessera_worker::profile::DEFAULT_MAX_STEP_TOKENS,
        }
    }
}

impl SchedulerConfig {
    /// Checks that every limit allows some work; the message names the field.
    pub fn validate(&self) -> Result<(), String> {
        for (name, v) in [
            ("block_size", self.block_size),
            ("num_blocks", self.num_blocks),
            ("max_running", self.max_running),
            ("max_step_tokens", self.max_step_tokens),
        ] {
            if v == 0 {
                return Err(format!("scheduler.{name} must be at least 1"));
            }
        }
        Ok(())
    }
}

/// Interactive requests always go before batch-job requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Priority {
    Interactive = 0,
    Batch = 1,
}

/// A validated request, as the scheduler needs it.
#[derive(Clone, Debug, PartialEq)]
pub struct SeqRequest {
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub top_logprobs: usize,
    pub prompt_logprobs: bool,
    pub stop_token_ids: Vec<u32>,
    pub priority: Priority,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AdmitError {
    #[error("the waiting queue is full ({limit} requests); retry later")]
    QueueFull { limit: usize },
    #[error(
        "prompt + max_tokens needs {needed} KV-cache blocks but the whole cache has {capacity}"
    )]
    TooLarge { needed: usize, capacity: usize },
    #[error("sequence id {0} is already in use")]
    DuplicateId(u64),
}

/// Why a sequence ended on its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finish {
    /// A stop token was generated.
    Stop,
    /// `max_tokens` were generated.
    Length,
}

/// What one step produced for one sequence.
#[derive(Clone, Debug, PartialEq)]
pub struct SeqOutput {
    pub id: u64,
    pub token: u32,
    pub logprob: f32,
    pub top_logprobs: Vec<(u32, f32)>,
    /// The prompt's log-probabilities, once, with the first token (when asked for).
    pub prompt_logprobs: Option<Vec<Option<f32>>>,
    pub finish: Option<Finish>,
}

struct Seq {
    req: SeqRequest,
    generated: Vec<u32>,
    /// Positions whose keys and values are in the cache.
    computed: usize,
    blocks: Vec<u32>,
    arrival: u64,
    /// Prompt log-probabilities gathered so far (while the first prefill runs).
    prompt_logprobs: Vec<Option<f32>>,
    prompt_logprobs_done: bool,
}

impl Seq {
    fn len(&self) -> usize {
        self.req.prompt.len() + self.generated.len()
    }

    fn token(&self, pos: usize) -> u32 {
        let p = self.req.prompt.len();
        if pos < p {
            self.req.prompt[pos]
        } else {
            self.generated[pos - p]
        }
    }
}

/// What the scheduler decided for the next step.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Plan {
    pub steps: Vec<SeqStep>,
    /// Sequences that lost their blocks in this decision; workers should forget their state.
    pub preempted: Vec<u64>,
}

/// Counters for health and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SchedulerStats {
    pub running: usize,
    pub waiting: usize,
    pub used_blocks: usize,
    pub num_blocks: usize,
    pub preemptions: u64,
}

pub struct Scheduler {
    cfg: SchedulerConfig,
    blocks: BlockAllocator,
    /// One queue per priority, most urgent first.
    waiting: [VecDeque<u64>; 2],
    running: Vec<u64>,
    seqs: HashMap<u64, Seq>,
    next_arrival: u64,
    preemptions: u64,
    /// Context length each sequence of the last plan reaches when its step completes.
    in_flight: Vec<(u64, usize)>,
}

impl Scheduler {
    pub fn new(cfg: SchedulerConfig) -> Self {
        Scheduler {
            blocks: BlockAllocator::new(cfg.num_blocks, cfg.block_size),
            cfg,
            waiting: [VecDeque::new(), VecDeque::new()],
            running: Vec::new(),
            seqs: HashMap::new(),
            next_arrival: 0,
            preemptions: 0,
            in_flight: Vec::new(),
        }
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.cfg
    }

    pub fn stats(&self) -> SchedulerStats {
        SchedulerStats {
            running: self.running.len(),
            waiting: self.waiting.iter().map(VecDeque::len).sum(),
            used_blocks: self.cfg.num_blocks - self.blocks.num_free(),
            num_blocks: self.cfg.num_blocks,
            preemptions: self.preemptions,
        }
    }

    /// Whether anything is running or waiting.
    pub fn has_work(&self) -> bool {
        !self.seqs.is_empty()
    }

    /// Every sequence the scheduler holds (running or waiting).
    pub fn ids(&self) -> Vec<u64> {
        self.seqs.keys().copied().collect()
    }

    /// Queues a request under `id`, or refuses it without changing anything.
    pub fn add(&mut self, id: u64, req: SeqRequest) -> Result<(), AdmitError> {
        if self.seqs.contains_key(&id) {
            return Err(AdmitError::DuplicateId(id));
        }
        let needed = self
            .blocks
            .blocks_for(req.prompt.len() + req.max_tokens.saturating_sub(1));
        if needed > self.cfg.num_blocks {
            return Err(AdmitError::TooLarge {
                needed,
                capacity: self.cfg.num_blocks,
            });
        }
        if self.stats().waiting >= self.cfg.max_waiting {
            return Err(AdmitError::QueueFull {
                limit: self.cfg.max_waiting,
            });
        }
        self.waiting[req.priority as usize].push_back(id);
        self.seqs.insert(
            id,
            Seq {
                req,
                generated: Vec::new(),
                computed: 0,
                blocks: Vec::new(),
                arrival: self.next_arrival,
                prompt_logprobs: Vec::new(),
                prompt_logprobs_done: false,
            },
        );
        self.next_arrival += 1;
        Ok(())
    }

    /// Drops a sequence wherever it is and frees its blocks; false if it was unknown.
    pub fn remove(&mut self, id: u64) -> bool {
        let Some(seq) = self.seqs.remove(&id) else {
            return false;
        };
        self.blocks.release(seq.blocks);
        self.running.retain(|r| *r != id);
        for q in &mut self.waiting {
            q.retain(|w| *w != id);
        }
        self.in_flight.retain(|(f, _)| *f != id);
        true
    }

    /// Drops everything (after the worker group failed) and returns the ids that were held.
    pub fn clear(&mut self) -> Vec<u64> {
        let ids = self.ids();
        *self = Scheduler::new(self.cfg.clone());
        ids
    }

    /// Preempts every running sequence (they wait, to be recomputed) and returns their ids; then
    /// no block is in use and the pool may be resized.
    pub fn preempt_all(&mut self) -> Vec<u64> {
        let mut ids = Vec::new();
        while let Some(id) = self.running.pop() {
            self.preempt(id);
            ids.push(id);
        }
        self.in_flight.clear();
        ids
    }

    /// Sets the pool size; only valid when no block is in use (after [`Self::preempt_all`]).
    pub fn resize(&mut self, num_blocks: usize) {
        if self.blocks.num_free() == self.cfg.num_blocks {
            self.cfg.num_blocks = num_blocks;
            self.blocks = BlockAllocator::new(num_blocks, self.cfg.block_size);
        }
    }

    /// Decides the next step.
    pub fn schedule(&mut self) -> Plan {
        let mut plan = Plan::default();
        let mut budget = self.cfg.max_step_tokens;
        self.in_flight.clear();
        // Most urgent first, so that preemption victims come from the tail.
        let seqs = &self.seqs;
        self.running
            .sort_by_key(|id| (seqs[id].req.priority, seqs[id].arrival));
        let mut idx = 0;
        while idx < self.running.len() && budget > 0 {
            let id = self.running[idx];
            let n = (self.seqs[&id].len() - self.seqs[&id].computed).min(budget);
            if !self.grow(id, n, &mut plan.preempted) {
                // It preempted itself: everything after it is gone too.
                break;
            }
            plan.steps.push(self.step_for(id, n));
            budget -= n;
            idx += 1;
        }
        while budget > 0 && self.running.len() < self.cfg.max_running {
            let Some(id) = self.waiting.iter().find_map(|q| q.front().copied()) else {
                break;
            };
            let seq = &self.seqs[&id];
            let n = (seq.len() - seq.computed).min(budget);
            let needed = self.blocks.blocks_for(seq.computed + n) - seq.blocks.len();
            if needed > self.blocks.num_free() {
                break;
            }
            let prio = seq.req.priority as usize;
            self.waiting[prio].pop_front();
            self.running.push(id);
            self.grow(id, n, &mut plan.preempted);
            plan.steps.push(self.step_for(id, n));
            budget -= n;
        }
        plan
    }

    /// Gives `id` blocks for `n` more positions, preempting less urgent sequences (from the
    /// tail of `running`) if needed. False when `id` itself had to be preempted.
    fn grow(&mut self, id: u64, n: usize, preempted: &mut Vec<u64>) -> bool {
        let seq = &self.seqs[&id];
        let needed = self.blocks.blocks_for(seq.computed + n) - seq.blocks.len();
        while self.blocks.num_free() < needed {
            let Some(victim) = self.running.pop() else {
                return false;
            };
            self.preempt(victim);
            preempted.push(victim);
            if victim == id {
                return false;
            }
        }
        if let Ok(mut new) = self.blocks.allocate(needed)
            && let Some(seq) = self.seqs.get_mut(&id)
        {
            seq.blocks.append(&mut new);
        }
        true
    }

    fn preempt(&mut self, id: u64) {
        self.preemptions += 1;
        let Some(seq) = self.seqs.get_mut(&id) else {
            return;
        };
        self.blocks.release(std::mem::take(&mut seq.blocks));
        seq.computed = 0;
        if !seq.prompt_logprobs_done {
            seq.prompt_logprobs.clear();
        }
        self.waiting[seq.req.priority as usize].push_front(id);
    }

    fn step_for(&mut self, id: u64, n: usize) -> SeqStep {
        let seq = &self.seqs[&id];
        let end = seq.computed + n;
        self.in_flight.push((id, end));
        SeqStep {
            seq_id: id,
            tokens: (seq.computed..end).map(|p| seq.token(p)).collect(),
            context_len: end,
            block_table: seq.blocks.clone(),
            sampling: seq.req.sampling.clone(),
            top_logprobs: seq.req.top_logprobs,
            prompt_logprobs: seq.req.prompt_logprobs && !seq.prompt_logprobs_done,
            sample: end == seq.len(),
            prompt_len: seq.req.prompt.len(),
        }
    }

    /// Takes a step's results: advances each sequence, and ends (and frees) those that are done.
    /// Results for sequences removed meanwhile are ignored.
    pub fn complete(&mut self, result: &StepResult) -> Vec<SeqOutput> {
        let reached: HashMap<u64, usize> = self.in_flight.drain(..).collect();
        let mut outputs = Vec::new();
        for r in &result.results {
            let (Some(&end), Some(seq)) = (reached.get(&r.seq_id), self.seqs.get_mut(&r.seq_id))
            else {
                continue;
            };
            seq.computed = end;
            if !seq.prompt_logprobs_done {
                seq.prompt_logprobs
                    .extend(r.prompt_logprobs.iter().copied());
            }
            let Some(token) = r.token else { continue };
            let prompt_logprobs = (seq.req.prompt_logprobs && !seq.prompt_logprobs_done)
                .then(|| std::mem::take(&mut seq.prompt_logprobs));
            seq.prompt_logprobs_done = true;
            seq.generated.push(token);
            let finish = if seq.req.stop_token_ids.contains(&token) {
                Some(Finish::Stop)
            } else if seq.generated.len() >= seq.req.max_tokens {
                Some(Finish::Length)
            } else {
                None
            };
            outputs.push(SeqOutput {
                id: r.seq_id,
                token,
                logprob: r.logprob,
                top_logprobs: r.top_logprobs.clone(),
                prompt_logprobs,
                finish,
            });
            if finish.is_some() {
                self.remove(r.seq_id);
            }
        }
        outputs
    }
}

#[cfg(test)]
#[path = "scheduler_tests.rs"]
mod tests;
