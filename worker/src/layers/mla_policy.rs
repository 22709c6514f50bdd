//! Which form MLA attends in, step by step ([`MlaPolicy`]).
//!
//! The absorbed form scores every query head against each latent row (`2·latent + rope`
//! multiply-adds per head and attended position), after projecting the queries into the latent
//! space and the outputs back (`latent·(nope + v)` per head and token). The expanded form
//! attends `nope + rope + v` per head and position, but first expands every context row
//! (`latent·(nope + v)` per head and context row). Decode (one token per sequence over its whole
//! context) is cheapest absorbed; a fresh prompt is cheapest expanded: for DeepSeek-V3's shape
//! 1.9× less arithmetic at 512 tokens, 3× at 4096. vLLM makes the same split.
//!
//! The expanded form also holds every context row's keys and values at once, so it is used
//! only for steps whose contexts fit [`MlaPolicy::max_context_rows`]: the worker sets it to the
//! step-token budget its activation profile ran with, and the profile runs its largest step in
//! this form, so the memory this takes is measured before the KV cache is sized.

use tessera_common::MlaSpec;
use tessera_kernels::StepMeta;

/// How an MLA layer attends in one step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MlaForm {
    /// Queries absorbed into the latent space; attention over the latent cache itself.
    Absorbed,
    /// The context rows expanded into per-head keys and values.
    Expanded,
}

/// Which form steps take.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MlaPrefill {
    /// The cheaper form by arithmetic, expanded only within the row bound (the default).
    #[default]
    Auto,
    /// Always absorbed.
    Absorbed,
    /// Always expanded, whatever the step (for tests and the memory profile).
    Expanded,
}

/// When MLA layers expand the latent cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MlaPolicy {
    pub prefill: MlaPrefill,
    /// Most context rows (the sum of the step's context lengths) [`MlaPrefill::Auto`] expands.
    /// Default: the scheduler's default step-token budget.
    pub max_context_rows: usize,
}

impl Default for MlaPolicy {
    fn default() -> Self {
        MlaPolicy {
            prefill: MlaPrefill::Auto,
            max_context_rows: crate::profile::DEFAULT_MAX_STEP_TOKENS,
        }
    }
}

/// Multiply-adds per head of a step in each form: `(absorbed, expanded)`.
pub fn step_macs(s: &MlaSpec, meta: &StepMeta) -> (u128, u128) {
    let (latent, nope, rope, v) = (
        s.kv_lora_rank as u128,
        s.qk_nope_head_dim as u128,
        s.qk_rope_head_dim as u128,
        s.v_head_dim as u128,
    );
    let (mut absorbed, mut expanded) = (0u128, 0u128);
    for q in &meta.seqs {
        let (new, ctx) = (q.num_tokens as u128, q.context_len as u128);
        // Causal: the new tokens attend about half their own rows beyond the cached prefix.
        let attended = new * (ctx - new) + new * (new + 1) / 2;
        absorbed += attended * (2 * latent + rope) + new * latent * (nope + v);
        expanded += attended * (nope + rope + v) + ctx * latent * (nope + v);
    }
    (absorbed, expanded)
}

impl MlaPolicy {
    /// The form for a step over `meta` of a model whose MLA layers are shaped `spec`.
    pub fn form(&self, spec: &MlaSpec, meta: &StepMeta) -> MlaForm {
        match self.prefill {
            MlaPrefill::Absorbed => MlaForm::Absorbed,
            MlaPrefill::Expanded => MlaForm::Expanded,
            MlaPrefill::Auto => {
                let (absorbed, expanded) = step_macs(spec, meta);
                if meta.context_rows() <= self.max_context_rows && expanded < absorbed {
                    MlaForm::Expanded
                } else {
                    MlaForm::Absorbed
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_kernels::SeqMeta;

    /// DeepSeek-V3's attention shape.
    fn v3() -> MlaSpec {
        MlaSpec {
            prefix: "model.layers.0.self_attn".into(),
            num_heads: 128,
            q_lora_rank: Some(1536),
            kv_lora_rank: 512,
            qk_nope_head_dim: 128,
            qk_rope_head_dim: 64,
            v_head_dim: 128,
            softmax_scale: 0.1,
            attention_bias: false,
        }
    }

    /// Sequences of `(new tokens, context)`.
    fn step(seqs: &[(usize, usize)]) -> StepMeta {
        let mut start = 0;
        let seqs = seqs
            .iter()
            .map(|&(n, ctx)| {
                let s = SeqMeta {
                    token_start: start,
                    num_tokens: n,
                    context_len: ctx,
                    block_table: (0..ctx.div_ceil(16) as u32).collect(),
                };
                start += n;
                s
            })
            .collect();
        StepMeta::without_ids(seqs, 16)
    }

    #[test]
    fn decode_stays_absorbed_and_long_prompts_expand() {
        let p = MlaPolicy::default();
        let s = v3();
        assert_eq!(p.form(&s, &step(&[(1, 4000); 8])), MlaForm::Absorbed);
        assert_eq!(p.form(&s, &step(&[(1, 2)])), MlaForm::Absorbed);
        // A fresh prompt, however short, expands: the absorbed form's projection of its queries
        // costs what expanding its rows does.
        assert_eq!(p.form(&s, &step(&[(16, 16)])), MlaForm::Expanded);
        assert_eq!(p.form(&s, &step(&[(512, 512)])), MlaForm::Expanded);
        let (absorbed, expanded) = step_macs(&s, &step(&[(512, 512)]));
        assert!(10 * absorbed > 18 * expanded, "{absorbed} vs {expanded}");
        let (absorbed, expanded) = step_macs(&s, &step(&[(4096, 4096)]));
        assert!(absorbed > 3 * expanded, "{absorbed} vs {expanded}");
        // A prompt chunk with a few decodes beside it still expands; many long decodes do not.
        assert_eq!(p.form(&s, &step(&[(448, 448), (1, 60)])), MlaForm::Expanded);
        assert_eq!(
            p.form(&s, &step(&[(256, 256), (1, 4000)])),
            MlaForm::Absorbed
        );
    }

    #[test]
    fn contexts_beyond_the_row_bound_stay_absorbed_unless_forced() {
        let s = v3();
        // The second chunk of a long prompt: cheaper expanded, but 2048 context rows.
        let chunk = step(&[(512, 2048)]);
        let auto = MlaPolicy::default();
        assert!(step_macs(&s, &chunk).1 < step_macs(&s, &chunk).0);
        assert_eq!(auto.form(&s, &chunk), MlaForm::Absorbed);
        let roomy = MlaPolicy {
            max_context_rows: 2048,
            ..auto
        };
        assert_eq!(roomy.form(&s, &chunk), MlaForm::Expanded);
        let forced = MlaPolicy {
            prefill: MlaPrefill::Expanded,
            ..auto
        };
        assert_eq!(forced.form(&s, &step(&[(1, 9000)])), MlaForm::Expanded);
        let never = MlaPolicy {
            prefill: MlaPrefill::Absorbed,
            ..roomy
        };
        assert_eq!(never.form(&s, &chunk), MlaForm::Absorbed);
    }
}
