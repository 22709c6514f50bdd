//! Token selection and log-probabilities.
//!
//! Log-probabilities are always the natural-log softmax of the raw logits (before penalties and
//! temperature), as OpenAI's and vLLM's APIs report them. Sampling applies logit bias and
//! penalties, then top-k, temperature, min-p and top-p, and draws from a ChaCha stream keyed by
//! (seed, index of the generated token): a seed reproduces a generation even when the sequence is
//! preempted and recomputed, and every rank of a cluster draws the same token.

use std::collections::HashMap;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// How to choose each next token.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// Keep the smallest set of tokens whose probability reaches `top_p` (1 = off).
    pub top_p: f32,
    /// Keep the `top_k` most likely tokens (0 = off).
    pub top_k: usize,
    /// Drop tokens less likely than `min_p` times the most likely one (0 = off).
    pub min_p: f32,
    /// Subtracted once from the logit of every token generated so far (OpenAI's semantics).
    pub presence_penalty: f32,
    /// Subtracted from a token's logit once per time it was generated.
    pub frequency_penalty: f32,
    /// Divides positive and multiplies negative logits of tokens seen in prompt or output (1 = off).
    pub repetition_penalty: f32,
    /// Added to the logits of these tokens before anything else.
    pub logit_bias: Vec<(u32, f32)>,
    /// Seed of the random stream; `None` draws one from the OS.
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            repetition_penalty: 1.0,
            logit_bias: Vec::new(),
            seed: None,
        }
    }
}

impl SamplingParams {
    pub fn greedy() -> Self {
        SamplingParams {
            temperature: 0.0,
            ..Self::default()
        }
    }

    /// Checks ranges; the message names the field and the value.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(format!(
                "temperature must be a finite number >= 0, got {}",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(format!("min_p must be in [0, 1], got {}", self.min_p));
        }
        for (name, v) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if !(-2.0..=2.0).contains(&v) {
                return Err(format!("{name} must be in [-2, 2], got {v}"));
            }
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return Err(format!(
                "repetition_penalty must be a finite number > 0, got {}",
                self.repetition_penalty
            ));
        }
        if let Some((id, b)) = self
            .logit_bias
            .iter()
            .find(|(_, b)| !(-100.0..=100.0).contains(b))
        {
            return Err(format!(
                "logit_bias for token {id} must be in [-100, 100], got {b}"
            ));
        }
        Ok(())
    }

    /// Whether the choice is the most likely raw token (greedy, nothing adjusting the logits):
    /// then the row's argmax is all the sampler needs, which a device computes without copying
    /// the row (`Backend::row_summaries`).
    pub fn is_plain_greedy(&self) -> bool {
        (self.temperature == 0.0 || self.top_k == 1) && !self.adjusts_logits()
    }

    /// Whether anything but temperature / top-k / top-p / min-p changes the logits.
    fn adjusts_logits(&self) -> bool {
        self.presence_penalty != 0.0
            || self.frequency_penalty != 0.0
            || self.repetition_penalty != 1.0
            || !self.logit_bias.is_empty()
    }
}

/// Natural-log softmax.
pub fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let lse = log_sum_exp(logits);
    logits.iter().map(|v| v - lse).collect()
}

/// `ln Σ e^logit`: `log_softmax(logits)[i] == logits[i] - log_sum_exp(logits)`, without
/// materialising the vocabulary-sized vector. Exponentials are vectorised where the CPU allows
/// (a 150k-token vocabulary is otherwise a visible share of a decode step).
pub fn log_sum_exp(logits: &[f32]) -> f32 {
    tessera_kernels::cpu::log_sum_exp(logits)
}

/// The `k` most likely `(token, logprob)` pairs, best first (ties: lower id first).
pub fn top_logprobs(logprobs: &[f32], k: usize) -> Vec<(u32, f32)> {
    let mut idx: Vec<usize> = (0..logprobs.len()).collect();
    let k = k.min(idx.len());
    if k == 0 {
        return Vec::new();
    }
    let order = |a: &usize, b: &usize| logprobs[*b].total_cmp(&logprobs[*a]).then(a.cmp(b));
    idx.select_nth_unstable_by(k - 1, order);
    idx.truncate(k);
    idx.sort_by(order);
    idx.into_iter().map(|i| (i as u32, logprobs[i])).collect()
}

/// The tokens a sequence has seen: `tokens[..prompt_len]` is prompt, the rest were generated.
#[derive(Clone, Copy, Debug)]
pub struct History<'a> {
    pub tokens: &'a [u32],
    pub prompt_len: usize,
}

impl History<'_> {
    pub fn empty() -> Self {
        History {
            tokens: &[],
            prompt_len: 0,
        }
    }

    fn generated(&self) -> &[u32] {
        &self.tokens[self.prompt_len.min(self.tokens.len())..]
    }
}

/// Per-request sampler: its parameters and the seed every draw derives from.
pub struct Sampler {
    params: SamplingParams,
    seed: u64,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let seed = params.seed.unwrap_or_else(|| rand::rng().random());
        Sampler { params, seed }
    }

    /// Applies logit bias and the penalties for `history` to a copy of `logits`.
    fn adjusted(&self, logits: &[f32], history: History) -> Vec<f32> {
        let p = &self.params;
        let mut out = logits.to_vec();
        for &(id, bias) in &p.logit_bias {
            if let Some(v) = out.get_mut(id as usize) {
                *v += bias;
            }
        }
        if p.repetition_penalty != 1.0 {
            let mut seen: Vec<u32> = history.tokens.to_vec();
            seen.sort_unstable();
            seen.dedup();
            for id in seen {
                if let Some(v) = out.get_mut(id as usize) {
                    *v = if *v > 0.0 {
                        *v / p.repetition_penalty
                    } else {
                        *v * p.repetition_penalty
                    };
                }
            }
        }
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            let mut counts: HashMap<u32, u32> = HashMap::new();
            for &t in history.generated() {
                *counts.entry(t).or_default() += 1;
            }
            for (id, n) in counts {
                if let Some(v) = out.get_mut(id as usize) {
                    *v -= p.presence_penalty + p.frequency_penalty * n as f32;
                }
            }
        }
        out
    }

    /// Picks the next token from raw logits, given what the sequence has seen so far.
    pub fn sample(&self, raw: &[f32], history: History) -> u32 {
        let p = &self.params;
        let adjusted;
        let logits = if p.adjusts_logits() {
            adjusted = self.adjusted(raw, history);
            &adjusted[..]
        } else {
            raw
        };
        if p.temperature == 0.0 || p.top_k == 1 {
            return top_logprobs(logits, 1).first().map_or(0, |t| t.0);
        }
        let keep = if p.top_k > 0 {
            p.top_k.min(logits.len())
        } else {
            logits.len()
        };
        let candidates = top_logprobs(logits, keep);
        let max = candidates[0].1;
        let mut probs: Vec<(u32, f32)> = candidates
            .iter()
            .map(|&(id, l)| (id, ((l - max) / p.temperature).exp()))
            .collect();
        let total: f32 = probs.iter().map(|x| x.1).sum();
        probs.iter_mut().for_each(|x| x.1 /= total);
        if p.min_p > 0.0 {
            // `probs` is sorted, so the most likely token is first and always survives.
            let floor = probs[0].1 * p.min_p;
            probs.retain(|x| x.1 >= floor);
        }
        if p.top_p < 1.0 {
            let mut acc = 0.0;
            let cut = probs
                .iter()
                .position(|x| {
                    acc += x.1;
                    acc >= p.top_p
                })
                .map_or(probs.len(), |i| i + 1);
            probs.truncate(cut);
        }
        let total: f32 = probs.iter().map(|x| x.1).sum();
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
        rng.set_stream(history.generated().len() as u64);
        let mut r = rng.random::<f32>() * total;
        for &(id, pr) in &probs {
            if r < pr {
                return id;
            }
            r -= pr;
        }
        probs.last().map_or(0, |x| x.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_softmax_normalises() {
        let lp = log_softmax(&[1.0, 2.0, 3.0]);
        let total: f32 = lp.iter().map(|v| v.exp()).sum();
        assert!((total - 1.0).abs() < 1e-6);
        assert!((lp[2] - lp[1] - 1.0).abs() < 1e-6);
    }

    #[test]
    fn greedy_takes_the_first_maximum() {
        let s = Sampler::new(SamplingParams::greedy());
        assert_eq!(s.sample(&[0.0, 5.0, 5.0, 1.0], History::empty()), 1);
    }

    #[test]
    fn top_k_and_top_p_restrict_the_support() {
        let logits = [0.0, 3.0, 2.9, -1.0, 2.8];
        let mut seen = Vec::new();
        for seed in 0..200 {
            let s = Sampler::new(SamplingParams {
                temperature: 1.0,
                top_k: 2,
                seed: Some(seed),
                ..Default::default()
            });
            let t = s.sample(&logits, History::empty());
            assert!([1, 2].contains(&t));
            seen.push(t);
        }
        assert!(seen.contains(&1) && seen.contains(&2));
        let peaked = [0.0, 10.0, 0.0, 0.0];
        for seed in 0..100 {
            let s = Sampler::new(SamplingParams {
                temperature: 1.0,
                top_p: 0.5,
                seed: Some(seed),
                ..Default::default()
            });
            assert_eq!(s.sample(&peaked, History::empty()), 1);
        }
    }

    #[test]
    fn a_seed_reproduces_the_draws() {
        let logits: Vec<f32> = (0..50).map(|i| (i % 7) as f32 * 0.3).collect();
        let params = SamplingParams {
            temperature: 0.8,
            seed: Some(42),
            ..Default::default()
        };
        let run = |s: &Sampler| {
            let mut tokens = vec![1u32];
            for _ in 0..20 {
                let t = s.sample(
                    &logits,
                    History {
                        tokens: &tokens,
                        prompt_len: 1,
                    },
                );
                tokens.push(t);
            }
            tokens
        };
        let (a, b) = (Sampler::new(params.clone()), Sampler::new(params));
        let da = run(&a);
        assert_eq!(da, run(&b));
        assert!(
            da[1..].iter().any(|t| *t != da[1]),
            "temperature 0.8 should vary"
        );
    }

    #[test]
    fn penalties_follow_openai_and_hf_semantics() {
        // Token 0 is the favourite; it was generated twice, token 1 once (token 2 is prompt).
        let logits = [3.0, 2.0, 1.0, -1.0];
        let tokens = [2, 0, 0, 1];
        let history = History {
            tokens: &tokens,
            prompt_len: 1,
        };
        let greedy = |p: SamplingParams| Sampler::new(p).sample(&logits, history);
        assert_eq!(greedy(SamplingParams::greedy()), 0);
        // presence 1.5: 3.0-1.5=1.5, 2.0-1.5=0.5, 1.0 → token 0 still wins.
        let presence = SamplingParams {
            presence_penalty: 1.5,
            ..SamplingParams::greedy()
        };
        assert_eq!(greedy(presence), 0);
        // frequency 1.0: 3.0-2=1.0, 2.0-1=1.0, 1.0 → ties resolve to the lowest id.
        // frequency 1.2: 0.6, 0.8, 1.0 → the prompt-only token 2 wins.
        let frequency = SamplingParams {
            frequency_penalty: 1.2,
            ..SamplingParams::greedy()
        };
        assert_eq!(greedy(frequency), 2);
        // With negative logits the penalty multiplies: seen tokens 0, 1, 2 fall to -2, -2.4 and
        // -12, so the unseen token 3 (-0.7) wins.
        let rep = SamplingParams {
            repetition_penalty: 4.0,
            ..SamplingParams::greedy()
        };
        let negatives = [-0.5, -0.6, -3.0, -0.7];
        assert_eq!(Sampler::new(rep.clone()).sample(&negatives, history), 3);
        // Positive logits are divided: 0.75, 0.5, 0.25 (a prompt token too), -1 → token 0 still.
        assert_eq!(Sampler::new(rep).sample(&logits, history), 0);
        let bias = SamplingParams {
            logit_bias: vec![(3, 10.0)],
            ..SamplingParams::greedy()
        };
        assert_eq!(greedy(bias), 3);
    }

    #[test]
    fn min_p_drops_unlikely_tokens() {
        // p ∝ e^[5, 4, 0]: token 2 has ~0.0067 of the top probability.
        let logits = [5.0, 4.0, 0.0];
        let s = Sampler::new(SamplingParams {
            min_p: 0.1,
            seed: Some(3),
            ..Default::default()
        });
        let mut tokens = vec![0u32];
        for _ in 0..300 {
            let t = s.sample(
                &logits,
                History {
                    tokens: &tokens,
                    prompt_len: 1,
                },
            );
            assert_ne!(t, 2, "min_p 0.1 must never pick token 2");
            tokens.push(t);
        }
        assert!(tokens[1..].contains(&1), "token 1 (p ≈ 0.27) is sampled");
    }

    #[test]
    fn bad_params_are_named() {
        let e = SamplingParams {
            temperature: -1.0,
            ..Default::default()
        }
        .validate()
        .unwrap_err();
        assert!(e.contains("temperature"));
        let e = SamplingParams {
            top_p: 0.0,
            ..Default::default()
        }
        .validate()
        .unwrap_err();
        assert!(e.contains("top_p"));
        for (p, field) in [
            (
                SamplingParams {
                    min_p: 1.5,
                    ..Default::default()
                },
                "min_p",
            ),
            (
                SamplingParams {
                    frequency_penalty: 3.0,
                    ..Default::default()
                },
                "frequency_penalty",
            ),
            (
                SamplingParams {
                    repetition_penalty: 0.0,
                    ..Default::default()
                },
                "repetition_penalty",
            ),
        ] {
            assert!(p.validate().unwrap_err().contains(field), "{field}");
        }
    }
}
