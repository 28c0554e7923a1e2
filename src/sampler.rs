//! Choosing the next token from logits: greedy, temperature, top-k, top-p and repetition penalty,
//! with a seeded generator so runs repeat. Flag names follow llama.cpp (`--temp 0` is greedy).

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
            seed: 0,
        }
    }
}

/// A sampler with its random state.
pub struct Sampler {
    pub config: SamplerConfig,
    rng: rand::rngs::StdRng,
}

impl Sampler {
    pub fn new(config: SamplerConfig) -> Self {
        let rng = rand::rngs::StdRng::seed_from_u64(config.seed);
        Sampler { config, rng }
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
}
