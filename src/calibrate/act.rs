//! Calibrating activation-sparsity thresholds ([`crate::model::act`]) on the calibration set.
//!
//! The dense model runs over the calibration windows block by block ([`super::runner`], each
//! block's output propagated), and an observer histograms the score of every entry of every
//! linear input (`|x|`, or WINA's `|x|·‖W[:, j]‖₂`) per block and site. The histogram's bins are
//! the top 17 bits of the score's f32 bit pattern (sign clear: 8 exponent bits, 8 mantissa
//! bits), so a bin spans a relative width of 2⁻⁸ and the counts cover every finite score
//! without a range to choose; a quantile is read off by linear interpolation inside its bin.
//! One collection serves every target ([`ActHistograms::uniform`], [`ActHistograms::allocate`]).
//!
//! TEAL (arXiv:2408.14690, github.com/FasterDecoding/TEAL) calibrates its thresholds the same
//! way, as quantiles of the magnitudes of each site's inputs on the dense model, and so does
//! WINA (github.com/microsoft/wina) for its scores.

use super::runner::{run_block, Pass};
use super::CalibSet;
use crate::model::act::{column_norms, site_cols, site_index, ActSparsity, Score, SiteThreshold};
use crate::model::forward::{embed, Scratch};
use crate::model::observer::{Observer, Site};
use crate::model::rope::Rope;
use crate::{Error, Model, Result};

/// Bits dropped from a score's f32 pattern to make its bin.
const SHIFT: u32 = 15;
/// Bins (positive scores: the sign bit is clear).
const BINS: usize = 1 << (31 - SHIFT);

/// Score histograms of every block's sites on a calibration set.
#[derive(Debug, Clone)]
pub struct ActHistograms {
    pub score: Score,
    /// Per block, per site ([`Site::ALL`] order): counts per bin, and the input width.
    pub hist: Vec<[(Vec<u64>, usize); 4]>,
    /// Where the activations came from.
    pub source: String,
}

/// The bin of a score (NaN and +∞ land in the last bins).
#[inline(always)]
fn bin(s: f32) -> usize {
    ((s.abs().to_bits() >> SHIFT) as usize).min(BINS - 1)
}

/// Lower edge of bin `b`.
fn bin_lo(b: usize) -> f32 {
    f32::from_bits((b as u32) << SHIFT)
}

struct HistObserver<'a> {
    hist: &'a mut Vec<[(Vec<u64>, usize); 4]>,
    /// WINA's column norms per block and site (empty for magnitude).
    norms: &'a [[Vec<f32>; 4]],
}

impl Observer for HistObserver<'_> {
    fn wants_linear_inputs(&self, _layer: usize) -> bool {
        true
    }
    fn linear_input(&mut self, layer: usize, site: Site, x: &[f32], _rows: usize, cols: usize) {
        let i = site_index(site);
        let (h, w) = &mut self.hist[layer][i];
        *w = cols;
        if h.is_empty() {
            h.resize(BINS, 0);
        }
        match self.norms.get(layer).map(|n| &n[i]) {
            Some(c) if !c.is_empty() => {
                for row in x.chunks_exact(cols) {
                    for (&v, &c) in row.iter().zip(c) {
                        h[bin(v.abs() * c)] += 1;
                    }
                }
            }
            _ => {
                for &v in x {
                    h[bin(v)] += 1;
                }
            }
        }
    }
}

/// Runs `model` (which must carry no thresholds: calibration sees dense activations) over
/// `calib` and histograms every site's scores.
pub fn collect(model: &Model, calib: &CalibSet, score: Score) -> Result<ActHistograms> {
    if model.weights.layers.iter().any(|l| l.act.is_some()) {
        return Err(Error::Invalid(
            "activation thresholds are calibrated on the dense model; remove the installed ones first"
                .into(),
        ));
    }
    let layers = &model.weights.layers;
    let norms: Vec<[Vec<f32>; 4]> = match score {
        Score::Magnitude => Vec::new(),
        Score::Wina => layers
            .iter()
            .map(|lw| Site::ALL.map(|s| column_norms(lw, s)))
            .collect(),
    };
    let mut hist: Vec<[(Vec<u64>, usize); 4]> =
        (0..layers.len()).map(|_| Default::default()).collect();
    let rope = Rope::new(&model.config, calib.len);
    let mut scratch = Scratch::default();
    let mut h = embed(&model.weights, &calib.ids)?;
    let mut obs = HistObserver {
        hist: &mut hist,
        norms: &norms,
    };
    for i in 0..layers.len() {
        run_block(
            model,
            i,
            &rope,
            &mut h,
            calib.n,
            calib.len,
            Pass::Propagate,
            &mut obs,
            &mut scratch,
        )?;
    }
    Ok(ActHistograms {
        score,
        hist,
        source: calib.source.clone(),
    })
}

/// The score below which a fraction `s` of the histogram's entries lie, and the fraction of
/// entries strictly below the bin's interpolated threshold (what calibration reaches).
pub fn quantile(h: &[u64], s: f64) -> (f32, f64) {
    let n: u64 = h.iter().sum();
    if n == 0 || s <= 0.0 {
        return (0.0, 0.0);
    }
    let k = s * n as f64;
    let mut cum = 0u64;
    for (b, &c) in h.iter().enumerate() {
        if c > 0 && (cum + c) as f64 >= k {
            let f = ((k - cum as f64) / c as f64).clamp(0.0, 1.0);
            let (lo, hi) = (bin_lo(b) as f64, bin_lo(b + 1) as f64);
            let t = (lo + f * (hi - lo)) as f32;
            return (t, (cum as f64 + f * c as f64) / n as f64);
        }
        cum += c;
    }
    (f32::MAX, 1.0)
}

impl ActHistograms {
    /// Thresholds giving every site of every block the sparsity `targets[layer][site]`
    /// (`0`: the site stays dense).
    pub fn thresholds(&self, targets: &[[f64; 4]], allocation: &str, mean: f64) -> ActSparsity {
        let layers = self
            .hist
            .iter()
            .zip(targets)
            .map(|(sites, t)| {
                let mut out = [None; 4];
                for (i, ((h, cols), &s)) in sites.iter().zip(t).enumerate() {
                    if s > 0.0 && !h.is_empty() {
                        let (threshold, calib_sparsity) = quantile(h, s);
                        out[i] = Some(SiteThreshold {
                            cols: *cols,
                            threshold,
                            calib_sparsity,
                        });
                    }
                }
                out
            })
            .collect();
        ActSparsity {
            score: self.score,
            target: mean,
            allocation: allocation.into(),
            calibration: self.source.clone(),
            layers,
        }
    }

    /// Every site of every block at sparsity `s` (TEAL's uniform setting).
    pub fn uniform(&self, s: f64) -> ActSparsity {
        let t = vec![[s; 4]; self.hist.len()];
        self.thresholds(&t, "uniform", s)
    }
}

/// Checks a requested activation sparsity: in `[0, 1)`.
pub fn check_target(s: f64, flag: &str) -> Result<()> {
    if !(0.0..1.0).contains(&s) {
        return Err(Error::Invalid(format!(
            "{flag} {s}: activation sparsity must be in [0, 1)"
        )));
    }
    Ok(())
}

/// Input width of every block's sites (for callers building targets).
pub fn widths(model: &Model) -> Vec<[usize; 4]> {
    model
        .weights
        .layers
        .iter()
        .enumerate()
        .map(|(i, lw)| Site::ALL.map(|s| site_cols(lw, i, s).0))
        .collect()
}
