//! Conversions between the executor's step types and the worker control plane's messages,
//! written once for both ends of the wire (the coordinator's cluster and the worker's service).

use tessera_proto::worker::v1 as pb;

use crate::executor::{SeqResult, SeqStep, StepResult};
use crate::sampling::SamplingParams;

impl From<&SamplingParams> for pb::SamplingParams {
    fn from(p: &SamplingParams) -> Self {
        pb::SamplingParams {
            temperature: p.temperature,
            top_p: Some(p.top_p),
            top_k: p.top_k as u32,
            seed: p.seed,
            min_p: p.min_p,
            presence_penalty: p.presence_penalty,
            frequency_penalty: p.frequency_penalty,
            repetition_penalty: Some(p.repetition_penalty),
            logit_bias: p.logit_bias.iter().copied().collect(),
        }
    }
}

impl From<pb::SamplingParams> for SamplingParams {
    fn from(p: pb::SamplingParams) -> Self {
        let mut logit_bias: Vec<(u32, f32)> = p.logit_bias.into_iter().collect();
        logit_bias.sort_by_key(|b| b.0);
        SamplingParams {
            temperature: p.temperature,
            top_p: p.top_p.unwrap_or(1.0),
            top_k: p.top_k as usize,
            min_p: p.min_p,
            presence_penalty: p.presence_penalty,
            frequency_penalty: p.frequency_penalty,
            repetition_penalty: p.repetition_penalty.unwrap_or(1.0),
            logit_bias,
            seed: p.seed,
        }
    }
}

impl From<&SeqStep> for pb::SequenceStep {
    fn from(s: &SeqStep) -> Self {
        pb::SequenceStep {
            seq_id: s.seq_id,
            token_ids: s.tokens.clone(),
            context_len: s.context_len as u32,
            block_table: s.block_table.clone(),
            sampling: Some((&s.sampling).into()),
            top_logprobs: s.top_logprobs as u32,
            prompt_logprobs: s.prompt_logprobs,
            sample: s.sample,
            prompt_len: s.prompt_len as u32,
        }
    }
}

impl From<pb::SequenceStep> for SeqStep {
    fn from(s: pb::SequenceStep) -> Self {
        SeqStep {
            seq_id: s.seq_id,
            tokens: s.token_ids,
            context_len: s.context_len as usize,
            block_table: s.block_table,
            sampling: s.sampling.unwrap_or_default().into(),
            top_logprobs: s.top_logprobs as usize,
            prompt_logprobs: s.prompt_logprobs,
            sample: s.sample,
            prompt_len: s.prompt_len as usize,
        }
    }
}

/// A step's results as rank 0 sends them.
pub fn step_response(step_id: u64, r: StepResult) -> pb::StepResponse {
    pb::StepResponse {
        step_id,
        results: r
            .results
            .into_iter()
            .map(|s| pb::SequenceResult {
                seq_id: s.seq_id,
                token_id: s.token,
                logprob: s.logprob,
                top: s
                    .top_logprobs
                    .into_iter()
                    .map(|(token_id, logprob)| pb::TokenLogprob { token_id, logprob })
                    .collect(),
                // NaN marks the sequence's very first token, which has no log-probability.
                prompt_logprobs: s
                    .prompt_logprobs
                    .into_iter()
                    .map(|v| v.unwrap_or(f32::NAN))
                    .collect(),
            })
            .collect(),
        expert_counts: r
            .expert_counts
            .into_iter()
            .map(|(layer, counts)| pb::ExpertCounts {
                layer: layer as u32,
                counts,
            })
            .collect(),
    }
}

impl From<pb::StepResponse> for StepResult {
    fn from(r: pb::StepResponse) -> Self {
        StepResult {
            results: r
                .results
                .into_iter()
                .map(|s| SeqResult {
                    seq_id: s.seq_id,
                    token: s.token_id,
                    logprob: s.logprob,
                    top_logprobs: s.top.into_iter().map(|t| (t.token_id, t.logprob)).collect(),
                    prompt_logprobs: s
                        .prompt_logprobs
                        .into_iter()
                        .map(|v| (!v.is_nan()).then_some(v))
                        .collect(),
                })
                .collect(),
            expert_counts: r
                .expert_counts
                .into_iter()
                .map(|c| (c.layer as usize, c.counts))
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_survive_the_wire() {
        let step = SeqStep {
            seq_id: 9,
            tokens: vec![1, 2, 3],
            context_len: 7,
            block_table: vec![4, 5],
            sampling: SamplingParams {
                temperature: 0.7,
                top_p: 0.9,
                top_k: 5,
                min_p: 0.05,
                presence_penalty: 0.5,
                frequency_penalty: -0.25,
                repetition_penalty: 1.1,
                logit_bias: vec![(2, -1.0), (7, 3.0)],
                seed: Some(0),
            },
            top_logprobs: 3,
            prompt_logprobs: true,
            sample: false,
            prompt_len: 5,
        };
        assert_eq!(SeqStep::from(pb::SequenceStep::from(&step)), step);
    }
}
