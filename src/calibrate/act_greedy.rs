//! TEAL's block-wise greedy allocation of activation sparsity (arXiv:2408.14690 §4.2; official
//! code `teal/greedyopt.py` in github.com/FasterDecoding/TEAL).
//!
//! Every block gets the same mean sparsity, weighted by the parameters each site's linears
//! hold (q/k/v, o, gate/up, down), but its four sites share it unevenly: starting from all
//! sites dense, each round tries raising each site's sparsity by one step, runs the block on
//! its dense input activations with those thresholds, and keeps the raise that moves the
//! block's output least (L2 distance to the dense output over the last quarter of each
//! window's positions, as TEAL measures it). Steps are sized so that every raise adds the same
//! amount to the weighted mean, so the requested means are reached exactly; one pass records
//! the allocation of every target at once. Thresholds come from the score histograms of
//! [`super::act`], so the greedy search and the final thresholds agree.
//!
//! Differences from TEAL: sites, not single projections (q/k/v share one threshold, as do
//! gate/up, because they read one vector the decode kernels sparsify once); a few short
//! calibration windows (TEAL: the full calibration set on a GPU).

use super::act::{quantile, ActHistograms};
use super::CalibSet;
use crate::model::act::{column_norms, site_index, ActSparsity, LayerAct, Score};
use crate::model::forward::{block_forward, embed, Scratch};
use crate::model::observer::{NoObserver, Site};
use crate::model::rope::Rope;
use crate::{Error, Model, Result};
use std::sync::Arc;

/// Options of [`greedy`].
#[derive(Debug, Clone, Copy)]
pub struct GreedyOpts {
    /// What one raise adds to a block's weighted mean sparsity.
    pub step: f64,
    /// Fraction of each window's last positions the output error is measured on.
    pub last_fraction: f64,
}

impl Default for GreedyOpts {
    fn default() -> Self {
        GreedyOpts {
            step: 0.025,
            last_fraction: 0.25,
        }
    }
}

/// Parameters of the linears reading each site of block `lw`.
fn site_params(lw: &crate::LayerWeights) -> [f64; 4] {
    Site::ALL.map(|s| {
        s.linears()
            .iter()
            .map(|&k| {
                let l = lw.linear(k);
                (l.out_features() * l.in_features()) as f64
            })
            .sum()
    })
}

/// Per-site sparsities of every block for each of `targets` (ascending, each in `[0, 1)`),
/// by TEAL's greedy search on the windows of `calib`; then thresholds from `hist`.
pub fn greedy(
    model: &Model,
    calib: &CalibSet,
    hist: &ActHistograms,
    targets: &[f64],
    opts: GreedyOpts,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Vec<ActSparsity>> {
    if model.weights.layers.iter().any(|l| l.act.is_some()) {
        return Err(Error::Invalid(
            "the greedy allocation runs on the dense model; remove the installed thresholds first"
                .into(),
        ));
    }
    if targets.windows(2).any(|w| w[0] > w[1]) || targets.iter().any(|t| !(0.0..1.0).contains(t)) {
        return Err(Error::Invalid(format!(
            "greedy targets must be ascending in [0, 1): {targets:?}"
        )));
    }
    let cfg = &model.config;
    let layers = &model.weights.layers;
    let (n, len, d) = (calib.n, calib.len, cfg.hidden_size);
    let rope = Rope::new(cfg, len);
    let mut scratch = Scratch::default();
    let mut h = embed(&model.weights, &calib.ids)?;
    let from = ((1.0 - opts.last_fraction) * len as f64).floor() as usize;
    let max = targets.last().copied().unwrap_or(0.0);
    let mut alloc: Vec<Vec<[f64; 4]>> = vec![Vec::with_capacity(layers.len()); targets.len()];
    let dummy = Arc::new(hist.uniform(0.0));
    for (i, lw) in layers.iter().enumerate() {
        progress(i, layers.len());
        let mut block = lw.clone();
        let dense_out = {
            let mut y = h.clone();
            block_forward(
                cfg,
                i,
                &block,
                &rope,
                &mut y,
                n,
                len,
                &mut scratch,
                &mut NoObserver,
            );
            y
        };
        let norms: [Option<Vec<f32>>; 4] = match hist.score {
            Score::Magnitude => Default::default(),
            Score::Wina => Site::ALL.map(|s| Some(column_norms(lw, s))),
        };
        let w = site_params(lw);
        let total: f64 = w.iter().sum();
        let mut sp = [0f64; 4];
        let mut mean = 0.0;
        let mut next = 0; // next target to record
        let mut error_of = |sp: &[f64; 4], block: &mut crate::LayerWeights| {
            let sites = Site::ALL.map(|s| {
                let k = site_index(s);
                let (hg, _) = &hist.hist[i][k];
                (sp[k] > 0.0 && !hg.is_empty()).then(|| (quantile(hg, sp[k]).0, norms[k].clone()))
            });
            block.act = Some(Arc::new(LayerAct::new(sites, dummy.clone())));
            let mut y = h.clone();
            block_forward(
                cfg,
                i,
                block,
                &rope,
                &mut y,
                n,
                len,
                &mut scratch,
                &mut NoObserver,
            );
            let mut e = 0f64;
            for s in 0..n {
                let r = (s * len + from) * d..(s + 1) * len * d;
                for (a, b) in y[r.clone()].iter().zip(&dense_out[r]) {
                    e += ((a - b) as f64).powi(2);
                }
            }
            e.sqrt()
        };
        loop {
            while next < targets.len() && mean >= targets[next] - 1e-9 {
                alloc[next].push(sp);
                next += 1;
            }
            if next == targets.len() || mean >= max {
                break;
            }
            let mut best: Option<(f64, usize)> = None;
            for k in 0..4 {
                let raise = opts.step * total / w[k];
                if sp[k] + raise >= 1.0 {
                    continue;
                }
                let mut trial = sp;
                trial[k] += raise;
                let e = error_of(&trial, &mut block);
                if best.is_none_or(|(b, _)| e < b) {
                    best = Some((e, k));
                }
            }
            let Some((_, k)) = best else {
                return Err(Error::Invalid(format!(
                    "greedy allocation: block {i} cannot reach mean sparsity {max} (every site near 1)"
                )));
            };
            sp[k] += opts.step * total / w[k];
            mean = (0..4).map(|j| sp[j] * w[j]).sum::<f64>() / total;
        }
        h = dense_out;
    }
    progress(layers.len(), layers.len());
    Ok(targets
        .iter()
        .zip(alloc)
        .map(|(&t, a)| {
            let mut out = hist.thresholds(&a, "greedy", t);
            out.calibration = format!(
                "{}; greedy allocation on {} x {} tokens",
                out.calibration, calib.n, calib.len
            );
            out
        })
        .collect())
}
