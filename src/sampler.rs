//! Choosing the next token from logits: greedy, temperature, top-k, top-p, repetition penalty and
//! OpenAI's presence and frequency penalties, with a seeded generator so runs repeat. Flag names
//! follow llama.cpp (`--temp 0` is greedy). Also the log-probabilities the server reports.

use rand::{Rng, SeedableRng};

/// Sampling settings.
#[derive(Debug, Clone)]
pub struct SamplerConfig {
    /// 0 means greedy (argmax).
    pub temperature: f32,
    /// 0 disables top-k.
    pub top_k: usize,
    /// 1.0 disables top-p.
    pub top_p: f32,
    /// 1.0 disables the penalty; >1 discourages tokens seen in the last `repeat_last_n` tokens.
    pub repeat_penalty: f32,
    pub repeat_last_n: usize,
    /// OpenAI's `presence_penalty` (0 disables): subtracted once from the logit of every token
    /// already generated ([`Sampler::with_prompt_len`] says where generation began).
    pub presence_penalty: f32,
    /// OpenAI's `frequency_penalty` (0 disables): subtracted from a token's logit once per time
    /// it was generated.
    pub frequency_penalty: f32,
    pub seed: u64,
}

impl Default for SamplerConfig {
    fn default() -> Self {
        // llama.cpp's defaults.
        SamplerConfig {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: 0,
        }
    }
}

/// A sampler with its random state.
pub struct Sampler {
    pub config: SamplerConfig,
    rng: rand::rngs::StdRng,
    /// Tokens of the history before generation began (the prompt); the presence and frequency
    /// penalties count only what follows, as OpenAI defines them.
    prompt_len: usize,
}

impl Sampler {
    pub fn new(config: SamplerConfig) -> Self {
        let rng = rand::rngs::StdRng::seed_from_u64(config.seed);
        Sampler {
            config,
            rng,
            prompt_len: 0,
        }
    }

    /// The first `prompt_len` tokens of every history are the prompt.
    pub fn with_prompt_len(mut self, prompt_len: usize) -> Self {
        self.prompt_len = prompt_len;
        self
    }

    /// Picks the next token given the logits and the tokens so far.
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        let c = &self.config;
        let mut l = logits.to_vec();
        if c.repeat_penalty != 1.0 {
            let start = history.len().saturating_sub(c.repeat_last_n);
            let mut seen = std::collections::HashSet::new();
            for &t in &history[start..] {
                if let Some(v) = l.get_mut(t as usize) {
                    if seen.insert(t) {
                        // As llama.cpp/CTRL: shrink positive logits, grow negative ones.
                        *v = if *v > 0.0 {
                            *v / c.repeat_penalty
                        } else {
                            *v * c.repeat_penalty
                        };
                    }
                }
            }
        }
        if c.presence_penalty != 0.0 || c.frequency_penalty != 0.0 {
            // OpenAI: mu[j] -= c[j] * frequency_penalty + (c[j] > 0) * presence_penalty.
            let mut counts = std::collections::HashMap::<u32, u32>::new();
            for &t in history.get(self.prompt_len..).unwrap_or(&[]) {
                *counts.entry(t).or_default() += 1;
            }
            for (t, n) in counts {
                if let Some(v) = l.get_mut(t as usize) {
                    *v -= n as f32 * c.frequency_penalty + c.presence_penalty;
                }
            }
        }
        if c.temperature <= 0.0 {
            return argmax(&l);
        }
        let mut idx: Vec<usize> = (0..l.len()).filter(|&i| l[i].is_finite()).collect();
        if idx.is_empty() {
            return argmax(logits);
        }
        idx.sort_unstable_by(|&a, &b| l[b].total_cmp(&l[a]).then(a.cmp(&b)));
        if c.top_k > 0 && c.top_k < idx.len() {
            idx.truncate(c.top_k);
        }
        let max = l[idx[0]];
        let mut p: Vec<f64> = idx
            .iter()
            .map(|&i| (((l[i] - max) / c.temperature) as f64).exp())
            .collect();
        let sum: f64 = p.iter().sum();
        p.iter_mut().for_each(|x| *x /= sum);
        if c.top_p < 1.0 {
            let mut acc = 0.0;
            let mut keep = p.len();
            for (i, x) in p.iter().enumerate() {
                acc += x;
                if acc >= c.top_p as f64 {
                    keep = i + 1;
                    break;
                }
            }
            p.truncate(keep);
            idx.truncate(keep);
            let s: f64 = p.iter().sum();
            p.iter_mut().for_each(|x| *x /= s);
        }
        let r: f64 = self.rng.gen();
        let mut acc = 0.0;
        for (i, x) in p.iter().enumerate() {
            acc += x;
            if r < acc {
                return idx[i] as u32;
            }
        }
        idx[p.len() - 1] as u32
    }
}

/// Index of the largest value (the first on ties); NaN never wins.
pub fn argmax(l: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in l.iter().enumerate() {
        if *v > l[best] || l[best].is_nan() {
            best = i;
        }
    }
    best as u32
}

/// The log-probability of `token` under `logits` (their log-softmax, the model's own distribution
/// before any sampling setting), and the `top` most likely tokens with theirs, most likely first.
pub fn logprobs(logits: &[f32], token: u32, top: usize) -> (f32, Vec<(u32, f32)>) {
    let norm = crate::model::generate::log_sum_exp(logits);
    let lp = |i: usize| (logits[i] as f64 - norm) as f32;
    let chosen = if (token as usize) < logits.len() {
        lp(token as usize)
    } else {
        f32::NEG_INFINITY
    };
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    let top = top.min(idx.len());
    if top > 0 {
        let by_logit = |a: &usize, b: &usize| logits[*b].total_cmp(&logits[*a]).then(a.cmp(b));
        idx.select_nth_unstable_by(top - 1, by_logit);
        idx.truncate(top);
        idx.sort_unstable_by(by_logit);
    } else {
        idx.clear();
    }
    (chosen, idx.into_iter().map(|i| (i as u32, lp(i))).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_is_argmax() {
        let mut s = Sampler::new(SamplerConfig {
            temperature: 0.0,
            ..Default::default()
        });
        assert_eq!(s.sample(&[0.1, 3.0, -1.0, 3.0], &[]), 1);
    }

    #[test]
    fn top_k_one_is_greedy_and_seed_repeats() {
        let l: Vec<f32> = (0..100).map(|i| ((i * 37) % 17) as f32 * 0.3).collect();
        let mut s = Sampler::new(SamplerConfig {
            top_k: 1,
            ..Default::default()
        });
        assert_eq!(s.sample(&l, &[]), argmax(&l));
        let cfg = SamplerConfig {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            seed: 7,
            ..Default::default()
        };
        let a: Vec<u32> = (0..20)
            .scan(Sampler::new(cfg.clone()), |s, _| Some(s.sample(&l, &[])))
            .collect();
        let b: Vec<u32> = (0..20)
            .scan(Sampler::new(cfg), |s, _| Some(s.sample(&l, &[])))
            .collect();
        assert_eq!(a, b);
    }

    #[test]
    fn top_p_keeps_only_the_nucleus() {
        // One token holds ~0.99 of the mass: top-p 0.5 must always pick it.
        let l = [10.0, 0.0, 0.0, 0.0, 0.0];
        let mut s = Sampler::new(SamplerConfig {
            temperature: 1.0,
            top_k: 0,
            top_p: 0.5,
            ..Default::default()
        });
        for _ in 0..50 {
            assert_eq!(s.sample(&l, &[]), 0);
        }
    }

    #[test]
    fn repetition_penalty_changes_the_greedy_choice() {
        let mut s = Sampler::new(SamplerConfig {
            temperature: 0.0,
            repeat_penalty: 2.0,
            ..Default::default()
        });
        assert_eq!(s.sample(&[2.0, 1.5], &[0]), 1);
        assert_eq!(s.sample(&[2.0, 1.5], &[]), 0);
    }

    #[test]
    fn presence_and_frequency_penalties_count_only_generated_tokens() {
        let cfg = SamplerConfig {
            temperature: 0.0,
            presence_penalty: 0.5,
            frequency_penalty: 0.4,
            ..Default::default()
        };
        // Token 0 is ahead by 1.0; generated twice it loses 0.5 + 2 * 0.4 = 1.3.
        let mut s = Sampler::new(cfg.clone()).with_prompt_len(1);
        assert_eq!(s.sample(&[2.0, 1.0], &[1, 0, 0]), 1);
        // Generated once it loses 0.9 and stays ahead.
        assert_eq!(s.sample(&[2.0, 1.0], &[1, 0]), 0);
        // In the prompt only, it is not penalised.
        let mut s = Sampler::new(cfg).with_prompt_len(3);
        assert_eq!(s.sample(&[2.0, 1.0], &[0, 0, 0]), 0);
    }

    #[test]
    fn logprobs_are_the_log_softmax() {
        let l = [1.0f32, 3.0, 2.0];
        let z: f64 = l.iter().map(|&v| (v as f64).exp()).sum();
        let (lp, top) = logprobs(&l, 2, 2);
        assert!((lp as f64 - (2.0 - z.ln())).abs() < 1e-6);
        assert_eq!(top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![1, 2]);
        assert!((top[0].1 as f64 - (3.0 - z.ln())).abs() < 1e-6);
        assert!(logprobs(&l, 0, 0).1.is_empty());
    }
}
