//! Which form MLA attends in, sequence by sequence ([`MlaPolicy`]).
//!
//! The absorbed form scores every query head against each latent row (`2·latent + rope`
//! multiply-adds per head and attended position), after projecting the queries into the latent
//! space and the outputs back (`latent·(nope + v)` per head and token). The expanded form
//! attends `nope + rope + v` per head and position, but first expands every context row
//! (`latent·(nope + v)` per head and context row). Decode (one token per sequence over its whole
//! context) is cheapest absorbed; a fresh prompt is cheapest expanded: for DeepSeek-V3's shape
//! 1.9× less arithmetic at 512 tokens, 3× at 4096. vLLM makes the same split, and so does
//! [`MlaPolicy::plan`] within a step: a step mixing decodes with prompt chunks attends each
//! sequence in its cheaper form ([`MlaPlan::Split`]).
//!
//! The expanded form holds the context rows' keys and values at once, for the heads it expands
//! together. The worker sets [`MlaPolicy::max_context_rows`] to the step-token budget its
//! activation profile ran with, and the profile runs its largest step in this form with all
//! heads in one pass, so that much memory is measured before the KV cache is sized. A step with
//! more context rows (a later chunk of a long prompt) stays within the same memory
//! ([`Expansion`]): it expands fewer heads per pass ([`pass_floats_per_row`]), and when not even
//! one head's pass over the whole context fits, it cuts the contexts into chunks of positions
//! that fit with every head, attends each chunk alone and merges their softmax parts, as vLLM's
//! MLA prefill does. The arithmetic is the same either way, in more launches.

use tessera_common::MlaSpec;
use tessera_kernels::StepMeta;

/// How an MLA layer attends in one step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MlaForm {
    /// Queries absorbed into the latent space; attention over the latent cache itself.
    Absorbed,
    /// The context rows expanded into per-head keys and values.
    Expanded(Expansion),
}

/// How the expanded form cuts its work to hold no more than the profiled step's memory: whole,
/// unless the step's contexts are longer than the profiled step's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Expansion {
    /// Heads expanded and attended together.
    pub heads_per_pass: usize,
    /// Positions of every context gathered, expanded and attended at once, the chunks' parts
    /// then merged (`None`: each context whole). A multiple of the block size.
    pub chunk: Option<usize>,
}

impl Expansion {
    /// Every one of `heads` in one pass over whole contexts.
    pub const fn whole(heads: usize) -> Expansion {
        Expansion {
            heads_per_pass: heads,
            chunk: None,
        }
    }
}

/// Which form steps take.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MlaPrefill {
    /// The cheaper form by arithmetic, the expanded one cut to the profiled memory (the default).
    #[default]
    Auto,
    /// Always absorbed.
    Absorbed,
    /// Always expanded, whatever the step, in passes of one head over chunks of one block if
    /// memory asks for that (for tests and the memory profile).
    Expanded,
}

/// When MLA layers expand the latent cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MlaPolicy {
    pub prefill: MlaPrefill,
    /// Most context rows (the sum of the step's context lengths) expanded with every head in one
    /// pass; more rows take fewer heads per pass or chunks, in the same memory. Default: the
    /// scheduler's default step-token budget.
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

/// Multiply-adds per head of one sequence's `new` tokens over `ctx` positions in each form:
/// `(absorbed, expanded)`.
fn seq_macs(s: &MlaSpec, new: usize, ctx: usize) -> (u128, u128) {
    let (latent, nope, rope, v) = (
        s.kv_lora_rank as u128,
        s.qk_nope_head_dim as u128,
        s.qk_rope_head_dim as u128,
        s.v_head_dim as u128,
    );
    let (new, ctx) = (new as u128, ctx as u128);
    // Causal: the new tokens attend about half their own rows beyond the cached prefix.
    let attended = new * (ctx - new) + new * (new + 1) / 2;
    (
        attended * (2 * latent + rope) + new * latent * (nope + v),
        attended * (nope + rope + v) + ctx * latent * (nope + v),
    )
}

/// Multiply-adds per head of a step in each form: `(absorbed, expanded)`.
pub fn step_macs(s: &MlaSpec, meta: &StepMeta) -> (u128, u128) {
    meta.seqs.iter().fold((0, 0), |(a, e), q| {
        let (qa, qe) = seq_macs(s, q.num_tokens, q.context_len);
        (a + qa, e + qe)
    })
}

/// How the MLA layers of one eager step attend ([`MlaPolicy::plan`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MlaPlan {
    /// Every sequence in one form.
    Whole(MlaForm),
    /// Decodes beside prompt chunks: the sequences `absorbed` (indices into the step's, in
    /// order) attend absorbed, the others expanded as `expansion` says. vLLM's MLA backends
    /// split a batch the same way; taken whole, such a step would either expand every decode's
    /// context (one decode over 4000 positions costs what a 4000-token prompt's expansion does)
    /// or run its prompts absorbed.
    Split {
        absorbed: Vec<usize>,
        expansion: Expansion,
    },
}

/// Floats the expanded form holds per context row with `heads` heads in a pass: the gathered
/// `[latent | rope]` row and its two parts, then per head the up-projected `[nope | v]`, the
/// same split apart, and the keys with the rotary part appended (a GPU also copies keys and
/// values into a bf16 scratch cache: half as many floats again). An estimate: only the ratio of
/// two steps' totals is used.
pub fn pass_floats_per_row(s: &MlaSpec, heads: usize) -> u128 {
    let (latent, nope, rope, v) = (
        s.kv_lora_rank as u128,
        s.qk_nope_head_dim as u128,
        s.qk_rope_head_dim as u128,
        s.v_head_dim as u128,
    );
    let per_head = 2 * (nope + v) + (nope + rope) + (nope + rope + v) / 2;
    2 * (latent + rope) + heads as u128 * per_head
}

impl MlaPolicy {
    /// The form for a step over `meta` taken whole, for a model whose MLA layers are shaped
    /// `spec`, with `heads` query heads on this rank.
    pub fn form(&self, spec: &MlaSpec, heads: usize, meta: &StepMeta) -> MlaForm {
        let heads = heads.max(1);
        let contexts = Contexts {
            rows: meta.context_rows(),
            seqs: meta.seqs.len(),
            block_size: meta.block_size,
        };
        let expansion = self.expansion(spec, heads, contexts);
        match self.prefill {
            MlaPrefill::Absorbed => MlaForm::Absorbed,
            MlaPrefill::Expanded => MlaForm::Expanded(expansion.unwrap_or(Expansion {
                heads_per_pass: 1,
                chunk: Some(meta.block_size.max(1)),
            })),
            MlaPrefill::Auto => {
                let (absorbed, expanded) = step_macs(spec, meta);
                match expansion {
                    Some(e) if expanded < absorbed => MlaForm::Expanded(e),
                    _ => MlaForm::Absorbed,
                }
            }
        }
    }

    /// How a step over `meta` attends: under [`MlaPrefill::Auto`], each sequence in the form
    /// that costs it less arithmetic (a [`MlaPlan::Split`] when the step has both kinds, and
    /// the expanded ones fit); otherwise [`MlaPolicy::form`] for the whole step.
    pub fn plan(&self, spec: &MlaSpec, heads: usize, meta: &StepMeta) -> MlaPlan {
        let whole = || MlaPlan::Whole(self.form(spec, heads, meta));
        if self.prefill != MlaPrefill::Auto {
            return whole();
        }
        let mut absorbed = Vec::new();
        let mut expanded = Contexts {
            rows: 0,
            seqs: 0,
            block_size: meta.block_size,
        };
        for (i, q) in meta.seqs.iter().enumerate() {
            let (a, e) = seq_macs(spec, q.num_tokens, q.context_len);
            if e < a {
                expanded.rows += q.context_len;
                expanded.seqs += 1;
            } else {
                absorbed.push(i);
            }
        }
        if absorbed.is_empty() || absorbed.len() == meta.seqs.len() {
            return whole();
        }
        match self.expansion(spec, heads.max(1), expanded) {
            None => MlaPlan::Whole(MlaForm::Absorbed),
            Some(expansion) => MlaPlan::Split {
                absorbed,
                expansion,
            },
        }
    }

    /// How `heads` heads expand over `contexts` within the memory of all of them over
    /// [`MlaPolicy::max_context_rows`] rows: whole; else in passes of fewer heads; else, when
    /// not even one head's pass over the whole contexts fits, in chunks of positions that fit
    /// every head at once (`None`: not even a chunk of one block fits one head).
    fn expansion(&self, spec: &MlaSpec, heads: usize, contexts: Contexts) -> Option<Expansion> {
        match self.heads_per_pass(spec, heads, contexts.rows) {
            0 => {}
            heads_per_pass => {
                return Some(Expansion {
                    heads_per_pass,
                    chunk: None,
                });
            }
        }
        // Each chunk holds at most `chunk` positions of every sequence.
        let bs = contexts.block_size.max(1);
        let chunk = (self.max_context_rows / contexts.seqs.max(1) / bs).max(1) * bs;
        match self.heads_per_pass(spec, heads, chunk * contexts.seqs) {
            0 => None,
            heads_per_pass => Some(Expansion {
                heads_per_pass,
                chunk: Some(chunk),
            }),
        }
    }

    /// The most of `heads` heads whose expansion over `rows` context rows fits the memory of
    /// all of them over [`MlaPolicy::max_context_rows`] rows (0: not even one).
    fn heads_per_pass(&self, spec: &MlaSpec, heads: usize, rows: usize) -> usize {
        let rows = rows as u128;
        if rows <= self.max_context_rows as u128 {
            return heads;
        }
        let budget = self.max_context_rows as u128 * pass_floats_per_row(spec, heads);
        let (base, per_head) = (
            pass_floats_per_row(spec, 0),
            pass_floats_per_row(spec, 1) - pass_floats_per_row(spec, 0),
        );
        let fit = budget.saturating_sub(rows * base) / (rows * per_head);
        fit.min(heads as u128) as usize
    }
}

/// The contexts a step expands: their rows, how many sequences hold them, and the block size
/// chunks are cut in.
#[derive(Clone, Copy, Debug)]
struct Contexts {
    rows: usize,
    seqs: usize,
    block_size: usize,
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

    /// The expanded form with all of V3's 128 heads in one pass.
    const ALL: MlaForm = MlaForm::Expanded(Expansion::whole(128));

    #[test]
    fn decode_stays_absorbed_and_long_prompts_expand() {
        let p = MlaPolicy::default();
        let s = v3();
        let form = |seqs: &[(usize, usize)]| p.form(&s, 128, &step(seqs));
        assert_eq!(form(&[(1, 4000); 8]), MlaForm::Absorbed);
        assert_eq!(form(&[(1, 2)]), MlaForm::Absorbed);
        // A fresh prompt, however short, expands: the absorbed form's projection of its queries
        // costs what expanding its rows does.
        assert_eq!(form(&[(16, 16)]), ALL);
        assert_eq!(form(&[(512, 512)]), ALL);
        let (absorbed, expanded) = step_macs(&s, &step(&[(512, 512)]));
        assert!(10 * absorbed > 18 * expanded, "{absorbed} vs {expanded}");
        let (absorbed, expanded) = step_macs(&s, &step(&[(4096, 4096)]));
        assert!(absorbed > 3 * expanded, "{absorbed} vs {expanded}");
        // A prompt chunk with a few decodes beside it still expands; many long decodes do not.
        assert_eq!(form(&[(448, 448), (1, 60)]), ALL);
        assert_eq!(form(&[(256, 256), (1, 4000)]), MlaForm::Absorbed);
    }

    #[test]
    fn longer_contexts_expand_fewer_heads_per_pass_in_the_same_memory() {
        let s = v3();
        let auto = MlaPolicy {
            max_context_rows: 2048,
            ..MlaPolicy::default()
        };
        let passes = |policy: &MlaPolicy, heads, seqs: &[(usize, usize)]| match policy.form(
            &s,
            heads,
            &step(seqs),
        ) {
            MlaForm::Expanded(e) => e.heads_per_pass,
            MlaForm::Absorbed => 0,
        };
        // The second chunk of a long prompt: 2560 context rows, more than the profiled 2048,
        // expand in passes of fewer heads; the memory each pass holds stays within the budget.
        let chunk = step(&[(512, 2560)]);
        assert!(step_macs(&s, &chunk).1 < step_macs(&s, &chunk).0);
        let budget = 2048 * pass_floats_per_row(&s, 128);
        for (heads, rows) in [(128, 2560), (128, 16384), (16, 4096), (128, 100_000)] {
            let g = passes(&auto, heads, &[(512, rows)]);
            assert!(g >= 1 && g < heads, "{g} heads of {heads} over {rows} rows");
            let budget = 2048 * pass_floats_per_row(&s, heads);
            assert!(rows as u128 * pass_floats_per_row(&s, g) <= budget);
            // One head more would not fit.
            assert!(rows as u128 * pass_floats_per_row(&s, g + 1) > budget);
        }
        assert!(2560 * pass_floats_per_row(&s, 102) <= budget);
        assert_eq!(passes(&auto, 128, &[(512, 2560)]), 102);
        // Within the profiled rows every head expands at once.
        assert_eq!(passes(&auto, 128, &[(512, 2048)]), 128);
        assert_eq!(passes(&auto, 8, &[(1000, 1000), (1000, 1000)]), 8);
        // Past what one head's pass fits, the context is cut into chunks of the profiled rows,
        // each expanded with every head.
        let huge = step(&[(512, 10_000_000)]);
        let chunked = MlaForm::Expanded(Expansion {
            heads_per_pass: 128,
            chunk: Some(2048),
        });
        assert_eq!(auto.form(&s, 128, &huge), chunked);
        let forced = MlaPolicy {
            prefill: MlaPrefill::Expanded,
            ..auto
        };
        assert_eq!(forced.form(&s, 128, &huge), chunked);
        assert_eq!(passes(&forced, 128, &[(1, 9000)]), 28);
        // Forced expansion where not even a chunk of one block fits one head (one head on this
        // rank, profiled over one row): both at their least.
        let tiny = MlaPolicy {
            max_context_rows: 1,
            ..forced
        };
        assert_eq!(
            tiny.form(&s, 1, &step(&[(4, 40)])),
            MlaForm::Expanded(Expansion {
                heads_per_pass: 1,
                chunk: Some(16)
            })
        );
        let never = MlaPolicy {
            prefill: MlaPrefill::Absorbed,
            ..auto
        };
        assert_eq!(never.form(&s, 128, &chunk), MlaForm::Absorbed);
    }

    #[test]
    fn chunks_hold_every_sequence_within_the_budget() {
        let s = v3();
        let budget = |rows: usize, heads| rows as u128 * pass_floats_per_row(&s, heads);
        for (max_rows, heads, seqs) in [
            (512, 128, vec![(512, 300_000)]),
            (512, 16, vec![(256, 50_000), (256, 40_000), (100, 30_000)]),
            (2048, 16, vec![(700, 9000); 3]),
            (64, 128, vec![(512, 100_000); 8]),
        ] {
            let policy = MlaPolicy {
                prefill: MlaPrefill::Auto,
                max_context_rows: max_rows,
            };
            let meta = step(&seqs);
            let MlaForm::Expanded(e) = policy.form(&s, heads, &meta) else {
                panic!("{seqs:?} with {heads} heads stayed absorbed");
            };
            let chunk = e.chunk.expect("chunked");
            assert!(chunk.is_multiple_of(16) && chunk >= 16, "{e:?}");
            // The rows of a chunk: every sequence's positions in it, at most `chunk` each.
            let rows = seqs.len() * chunk;
            assert!(
                budget(rows, e.heads_per_pass) <= budget(max_rows, heads),
                "{e:?} over {rows} rows, {seqs:?}"
            );
            // Chunks are as large as the budget allows: one block more would not fit every head.
            assert!(budget(rows + 16 * seqs.len(), heads) > budget(max_rows, heads));
        }
    }

    #[test]
    fn mixed_steps_split_decodes_from_prompt_chunks() {
        let s = v3();
        let auto = MlaPolicy::default();
        // Long decodes beside a fresh prompt: taken whole the step would stay absorbed; split,
        // the decodes stay absorbed and the prompt expands.
        let mixed = step(&[(1, 4000), (256, 256), (1, 3000)]);
        assert_eq!(auto.form(&s, 128, &mixed), MlaForm::Absorbed);
        assert_eq!(
            auto.plan(&s, 128, &mixed),
            MlaPlan::Split {
                absorbed: vec![0, 2],
                expansion: Expansion::whole(128)
            }
        );
        // Only the expanded sequences' context rows count against the memory bound.
        let chunk = step(&[(1, 4000), (512, 2560)]);
        assert_eq!(
            auto.plan(&s, 128, &chunk),
            MlaPlan::Split {
                absorbed: vec![0],
                expansion: Expansion {
                    heads_per_pass: 24,
                    chunk: None
                }
            }
        );
        // One kind alone: the whole-step form.
        let prompts = step(&[(256, 256), (128, 128)]);
        assert_eq!(
            auto.plan(&s, 128, &prompts),
            MlaPlan::Whole(auto.form(&s, 128, &prompts))
        );
        let decodes = step(&[(1, 4000); 4]);
        assert_eq!(
            auto.plan(&s, 128, &decodes),
            MlaPlan::Whole(MlaForm::Absorbed)
        );
        // Expanded rows beyond one head's pass: in chunks of the profiled rows.
        let huge = step(&[(1, 10), (4096, 10_000_000)]);
        assert_eq!(
            auto.plan(&s, 128, &huge),
            MlaPlan::Split {
                absorbed: vec![0],
                expansion: Expansion {
                    heads_per_pass: 128,
                    chunk: Some(512)
                }
            }
        );
        // A forced form is never split.
        for prefill in [MlaPrefill::Absorbed, MlaPrefill::Expanded] {
            let forced = MlaPolicy { prefill, ..auto };
            assert_eq!(
                forced.plan(&s, 128, &mixed),
                MlaPlan::Whole(forced.form(&s, 128, &mixed))
            );
        }
    }
}
