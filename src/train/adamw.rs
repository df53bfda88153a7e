//! AdamW (Loshchilov & Hutter 2019, as `torch.optim.AdamW` computes it) with masked updates.
//!
//! candle-nn has an AdamW, but its moments are private, so a checkpoint could not hold them and
//! `--resume` could not continue to the same result; this one keeps them as plain fields
//! (`m`, `v`, `t`). A variable with a mask has its gradient multiplied by the mask first: the
//! moments stay exactly zero there, the update is `0 / (0 + ε) = 0`, and weight decay of a
//! zero is zero, so a pruned weight stays exactly zero. The weight is multiplied by the mask
//! after the update as well, which changes nothing in exact arithmetic and guards the pattern.
//! [`adamw_naive`] is the scalar reference the tensor version is tested against.

use super::params::{terr, NamedVar};
use crate::Result;
use candle_core::{DType, Tensor};

/// Hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdamCfg {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamCfg {
    fn default() -> Self {
        AdamCfg {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// Optimizer state: one `m`, `v` per variable, and the step count.
#[derive(Debug, Clone)]
pub struct AdamW {
    pub cfg: AdamCfg,
    pub t: u64,
    pub m: Vec<Tensor>,
    pub v: Vec<Tensor>,
}

impl AdamW {
    /// Zero state for `vars`.
    pub fn new(vars: &[NamedVar], cfg: AdamCfg) -> Result<AdamW> {
        let z = |nv: &NamedVar| nv.var.as_tensor().zeros_like().map_err(terr);
        Ok(AdamW {
            cfg,
            t: 0,
            m: vars.iter().map(z).collect::<Result<_>>()?,
            v: vars.iter().map(z).collect::<Result<_>>()?,
        })
    }

    /// One update with learning rate `lr`; a variable without a gradient is left alone (its
    /// moments too).
    pub fn step(&mut self, vars: &[NamedVar], grads: &[Option<Tensor>], lr: f64) -> Result<()> {
        self.t += 1;
        let c = self.cfg;
        let bc1 = 1.0 - c.beta1.powi(self.t as i32);
        let bc2 = 1.0 - c.beta2.powi(self.t as i32);
        for (j, (nv, g)) in vars.iter().zip(grads).enumerate() {
            let Some(g) = g else { continue };
            let mut run = || -> candle_core::Result<()> {
                let mask = match &nv.mask {
                    Some(m) => Some(m.to_dtype(DType::F32)?),
                    None => None,
                };
                let g = match &mask {
                    Some(m) => (g * m)?,
                    None => g.clone(),
                }
                .detach();
                let m = ((&self.m[j] * c.beta1)? + (&g * (1.0 - c.beta1))?)?;
                let v = ((&self.v[j] * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
                let upd = ((&m / bc1)? / ((&v / bc2)?.sqrt()? + c.eps)?)?;
                let w = nv.var.as_tensor();
                let mut w2 = ((w * (1.0 - lr * c.weight_decay))? - (upd * lr)?)?;
                if let Some(mk) = &mask {
                    w2 = (w2 * mk)?;
                }
                nv.var.set(&w2.detach())?;
                // Detached: state must not chain one step's graph to the next.
                self.m[j] = m.detach();
                self.v[j] = v.detach();
                Ok(())
            };
            run().map_err(terr)?;
        }
        Ok(())
    }
}

/// Scalar reference of one [`AdamW::step`] on one variable (`t` is the step after increment).
#[allow(clippy::too_many_arguments)]
pub fn adamw_naive(
    w: &mut [f32],
    g: &[f32],
    mask: Option<&[u8]>,
    m: &mut [f32],
    v: &mut [f32],
    t: u64,
    lr: f64,
    c: AdamCfg,
) {
    let bc1 = 1.0 - c.beta1.powi(t as i32);
    let bc2 = 1.0 - c.beta2.powi(t as i32);
    for i in 0..w.len() {
        let keep = mask.is_none_or(|mk| mk[i] != 0);
        let gi = if keep { g[i] as f64 } else { 0.0 };
        let mi = c.beta1 * m[i] as f64 + (1.0 - c.beta1) * gi;
        let vi = c.beta2 * v[i] as f64 + (1.0 - c.beta2) * gi * gi;
        let upd = (mi / bc1) / ((vi / bc2).sqrt() + c.eps);
        let wi = w[i] as f64 * (1.0 - lr * c.weight_decay) - lr * upd;
        w[i] = if keep { wi as f32 } else { 0.0 };
        m[i] = mi as f32;
        v[i] = vi as f32;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn matches_the_scalar_reference_and_keeps_zeros() {
        let dev = Device::Cpu;
        let n = 64;
        let w0: Vec<f32> = (0..n)
            .map(|i| {
                if i % 4 < 2 {
                    0.0
                } else {
                    (i as f32 * 0.37).sin()
                }
            })
            .collect();
        let mask: Vec<u8> = w0.iter().map(|&x| (x != 0.0) as u8).collect();
        let var = Var::from_vec(w0.clone(), n, &dev).unwrap();
        let nv = NamedVar {
            name: "w".into(),
            var: var.clone(),
            mask: Some(Tensor::from_vec(mask.clone(), n, &dev).unwrap()),
        };
        let cfg = AdamCfg {
            weight_decay: 0.1,
            ..Default::default()
        };
        let mut opt = AdamW::new(std::slice::from_ref(&nv), cfg).unwrap();
        let (mut w, mut m, mut v) = (w0.clone(), vec![0f32; n], vec![0f32; n]);
        for t in 1..=5u64 {
            let g: Vec<f32> = (0..n)
                .map(|i| ((i as f32 + t as f32) * 1.3).cos())
                .collect();
            let gt = Tensor::from_vec(g.clone(), n, &dev).unwrap();
            opt.step(std::slice::from_ref(&nv), &[Some(gt)], 0.01)
                .unwrap();
            adamw_naive(&mut w, &g, Some(&mask), &mut m, &mut v, t, 0.01, cfg);
        }
        let got: Vec<f32> = var.as_tensor().to_vec1().unwrap();
        for i in 0..n {
            assert!((got[i] - w[i]).abs() < 1e-6, "{i}: {} vs {}", got[i], w[i]);
            if mask[i] == 0 {
                assert_eq!(got[i], 0.0, "a masked weight moved");
            }
        }
        assert!(
            got.iter().zip(&w0).any(|(a, b)| a != b),
            "the update did something"
        );
    }
}
