//! Choosing the next token from logits: greedy, or temperature / top-k / top-p sampling.
//!
//! The filters apply in transformers' order: logits are divided by the temperature, cut to the
//! `top_k` largest (0 = no cut), then to the smallest set of most likely tokens whose probability
//! reaches `top_p` (nucleus; 1 = no cut), renormalised, and one token is drawn with a seeded
//! [`SplitMix64`]. Temperature 0 means greedy (argmax; ties go to the lowest id). Same seed, same
//! logits → same tokens.

use crate::calibrate::SplitMix64;
use crate::{Error, Result};

/// Sampling settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SampleOpts {
    /// 0 = greedy; otherwise logits are divided by it (must be finite and ≥ 0).
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens (0 = all).
    pub top_k: usize,
    /// Keep the smallest most-likely set with total probability ≥ `top_p`, in (0, 1].
    pub top_p: f32,
    /// RNG seed.
    pub seed: u64,
}

impl Default for SampleOpts {
    fn default() -> Self {
        SampleOpts {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
        }
    }
}

impl SampleOpts {
    /// Greedy decoding.
    pub fn greedy() -> Self {
        Self::default()
    }

    /// Check the ranges; the error names the offending flag.
    pub fn validate(&self) -> Result<()> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(Error::Invalid(format!(
                "--temperature must be a finite number >= 0 (0 = greedy), got {}",
                self.temperature
            )));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::Invalid(format!(
                "--top-p must be in (0, 1], got {}",
                self.top_p
            )));
        }
        Ok(())
    }

    /// True when sampling reduces to argmax.
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0 || self.top_k == 1
    }
}

/// Index of the largest logit (lowest index on ties; NaNs are never chosen over numbers).
pub fn argmax(logits: &[f32]) -> u32 {
    crate::formats::screen::first_max(logits)
}

/// The distribution sampling draws from: `(token, probability)` pairs, most likely first,
/// probabilities summing to 1, after temperature, top-k and top-p. For temperature 0 (or
/// top-k 1) it is the argmax with probability 1.
pub fn distribution(logits: &[f32], o: &SampleOpts) -> Vec<(u32, f64)> {
    if logits.is_empty() {
        return vec![];
    }
    if o.is_greedy() {
        return vec![(argmax(logits), 1.0)];
    }
    let t = o.temperature as f64;
    let mut idx: Vec<u32> = (0..logits.len() as u32)
        .filter(|&i| !logits[i as usize].is_nan())
        .collect();
    if idx.is_empty() {
        return vec![(0, 1.0)];
    }
    let by_logit = |a: &u32, b: &u32| {
        logits[*b as usize]
            .total_cmp(&logits[*a as usize])
            .then(a.cmp(b))
    };
    if o.top_k > 0 && o.top_k < idx.len() {
        idx.select_nth_unstable_by(o.top_k - 1, by_logit);
        idx.truncate(o.top_k);
    }
    idx.sort_unstable_by(by_logit);
    let m = logits[idx[0] as usize] as f64 / t;
    let mut p: Vec<(u32, f64)> = idx
        .iter()
        .map(|&i| (i, (logits[i as usize] as f64 / t - m).exp()))
        .collect();
    let z: f64 = p.iter().map(|x| x.1).sum();
    for x in &mut p {
        x.1 /= z;
    }
    if o.top_p < 1.0 {
        let mut cum = 0.0;
        let mut keep = p.len();
        for (j, x) in p.iter().enumerate() {
            cum += x.1;
            if cum >= o.top_p as f64 {
                keep = j + 1;
                break;
            }
        }
        p.truncate(keep);
        let z: f64 = p.iter().map(|x| x.1).sum();
        for x in &mut p {
            x.1 /= z;
        }
    }
    p
}

/// A seeded sampler.
#[derive(Debug, Clone)]
pub struct Sampler {
    pub opts: SampleOpts,
    rng: SplitMix64,
}

impl Sampler {
    /// A sampler; errors on out-of-range settings.
    pub fn new(opts: SampleOpts) -> Result<Sampler> {
        opts.validate()?;
        Ok(Sampler {
            opts,
            rng: SplitMix64(opts.seed),
        })
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// The next token for `logits` `[vocab]`.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.opts.is_greedy() {
            return argmax(logits);
        }
        let dist = distribution(logits, &self.opts);
        let u = self.uniform();
        let mut cum = 0.0;
        for &(t, p) in &dist {
            cum += p;
            if u < cum {
                return t;
            }
        }
        dist.last().map_or(0, |x| x.0)
    }
}
