//! Token selection and log-probabilities.
//!
//! Log-probabilities are always the natural-log softmax of the raw logits (before temperature),
//! as OpenAI's and vLLM's APIs report them. Sampling applies top-k, then temperature, then top-p
//! (nucleus) and draws from a per-request ChaCha stream, so a seed reproduces a generation.

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
    /// Seed of the random stream; `None` draws one from the OS.
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
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
        Ok(())
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

/// Per-request sampler state.
pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = match params.seed {
            Some(s) => ChaCha8Rng::seed_from_u64(s),
            None => ChaCha8Rng::from_os_rng(),
        };
        Sampler { params, rng }
    }

    /// Picks the next token from raw logits.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let p = &self.params;
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
        let mut r = self.rng.random::<f32>() * total;
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
        let mut s = Sampler::new(SamplingParams::greedy());
        assert_eq!(s.sample(&[0.0, 5.0, 5.0, 1.0]), 1);
    }

    #[test]
    fn top_k_and_top_p_restrict_the_support() {
        let logits = [0.0, 3.0, 2.9, -1.0, 2.8];
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.0,
            top_k: 2,
            seed: Some(7),
            ..Default::default()
        });
        for _ in 0..200 {
            assert!([1, 2].contains(&s.sample(&logits)));
        }
        let peaked = [0.0, 10.0, 0.0, 0.0];
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.0,
            top_p: 0.5,
            seed: Some(1),
            ..Default::default()
        });
        for _ in 0..100 {
            assert_eq!(s.sample(&peaked), 1);
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
        let (mut a, mut b) = (Sampler::new(params.clone()), Sampler::new(params));
        let da: Vec<u32> = (0..20).map(|_| a.sample(&logits)).collect();
        let db: Vec<u32> = (0..20).map(|_| b.sample(&logits)).collect();
        assert_eq!(da, db);
        assert!(
            da.iter().any(|t| *t != da[0]),
            "temperature 0.8 should vary"
        );
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
    }
}
