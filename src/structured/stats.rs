//! Per-column activation moments for width pruning, collected in one calibration pass.
//!
//! FLAP (An et al., AAAI 2024, §3.2 and `lib/layerwrapper.py::BiasGPT`) needs, per input
//! channel of o_proj and down_proj, the mean (for bias compensation) and the variance over all
//! calibration tokens (the fluctuation metric); Wanda-sp needs the input-column norm ‖X_j‖₂.
//! [`WidthStats`] is an [`Observer`] that keeps, for chosen [`Site`]s of every layer, per column
//! `n`, a shift `k_j`, `Σ(x−k_j)` and `Σ(x−k_j)²` in f64.
//!
//! Why shifted sums: the textbook `Σx²/n − mean²` loses every significant digit when a channel's
//! mean is large next to its spread (f32 activations with |mean| ≫ std are common in LLMs).
//! Shifting by one observed value of the same column (the first token seen) keeps the sums of
//! the order of the spread, so `(S₂ − S₁²/n)/(n−1)` is accurate; no per-chunk merge is needed.
//!
//! Like FLAP, the statistics come from a single pass of the *unpruned* model
//! ([`super::collect::observe_all`]): every layer sees the dense model's activations.

use super::collect::observe_all;
use super::Progress;
use crate::calibrate::CalibSet;
use crate::model::observer::{Observer, Site};
use crate::{Model, Result};
use rayon::prelude::*;

/// Moments of one activation's columns over the calibration tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct ColumnMoments {
    /// Tokens (rows) seen.
    pub n: u64,
    /// Per-column shift `k_j` (the first row seen).
    pub shift: Vec<f64>,
    /// `Σ (x_j − k_j)`.
    pub s1: Vec<f64>,
    /// `Σ (x_j − k_j)²`.
    pub s2: Vec<f64>,
}

impl ColumnMoments {
    /// Empty moments for `cols` columns.
    pub fn new(cols: usize) -> ColumnMoments {
        ColumnMoments {
            n: 0,
            shift: vec![0.0; cols],
            s1: vec![0.0; cols],
            s2: vec![0.0; cols],
        }
    }

    /// Number of columns.
    pub fn cols(&self) -> usize {
        self.s1.len()
    }

    /// Add `rows` rows of `x` (`[rows, cols]` row-major).
    pub fn add(&mut self, x: &[f32], rows: usize) {
        let cols = self.cols();
        if rows == 0 || cols == 0 {
            return;
        }
        debug_assert!(x.len() >= rows * cols);
        if self.n == 0 {
            for (k, &v) in self.shift.iter_mut().zip(&x[..cols]) {
                *k = v as f64;
            }
        }
        // Column chunks in parallel; each walks all rows (rows are contiguous per token).
        const CH: usize = 64;
        self.s1
            .par_chunks_mut(CH)
            .zip(self.s2.par_chunks_mut(CH))
            .zip(self.shift.par_chunks(CH))
            .enumerate()
            .for_each(|(ci, ((a1, a2), k))| {
                let c0 = ci * CH;
                for r in 0..rows {
                    let row = &x[r * cols + c0..r * cols + c0 + a1.len()];
                    for j in 0..row.len() {
                        let d = row[j] as f64 - k[j];
                        a1[j] += d;
                        a2[j] += d * d;
                    }
                }
            });
        self.n += rows as u64;
    }

    /// Per-column mean.
    pub fn mean(&self) -> Vec<f64> {
        let n = self.n.max(1) as f64;
        self.shift
            .iter()
            .zip(&self.s1)
            .map(|(k, s)| k + s / n)
            .collect()
    }

    /// Per-column unbiased variance (divides by `n − 1`, like `torch.var`); 0 for `n < 2`.
    pub fn var(&self) -> Vec<f64> {
        if self.n < 2 {
            return vec![0.0; self.cols()];
        }
        let n = self.n as f64;
        self.s1
            .iter()
            .zip(&self.s2)
            .map(|(s1, s2)| ((s2 - s1 * s1 / n) / (n - 1.0)).max(0.0))
            .collect()
    }

    /// Per-column `Σ x_j²` (the squared input-column norm ‖X_j‖₂² that Wanda uses).
    pub fn sum_sq(&self) -> Vec<f64> {
        let n = self.n as f64;
        self.shift
            .iter()
            .zip(self.s1.iter().zip(&self.s2))
            .map(|(k, (s1, s2))| (s2 + 2.0 * k * s1 + n * k * k).max(0.0))
            .collect()
    }
}

/// Column moments at some sites of every layer (an [`Observer`]).
#[derive(Debug, Clone)]
pub struct WidthStats {
    /// The sites watched.
    pub sites: Vec<Site>,
    /// `layers[l][i]`: moments of `sites[i]` in layer `l` (`None` until seen).
    pub layers: Vec<Vec<Option<ColumnMoments>>>,
}

impl WidthStats {
    /// Watch `sites` in `n_layers` layers.
    pub fn new(n_layers: usize, sites: &[Site]) -> WidthStats {
        WidthStats {
            sites: sites.to_vec(),
            layers: vec![vec![None; sites.len()]; n_layers],
        }
    }

    /// Moments of `site` in `layer`, when watched and seen.
    pub fn get(&self, layer: usize, site: Site) -> Option<&ColumnMoments> {
        let i = self.sites.iter().position(|s| *s == site)?;
        self.layers.get(layer)?.get(i)?.as_ref()
    }

    /// Moments of `site` in `layer`, or an error saying the statistics are missing.
    pub fn require(&self, layer: usize, site: Site) -> Result<&ColumnMoments> {
        self.get(layer, site).ok_or_else(|| {
            crate::Error::Invalid(format!(
                "no calibration statistics for {site:?} of layer {layer}"
            ))
        })
    }
}

impl Observer for WidthStats {
    fn wants_linear_inputs(&self, layer: usize) -> bool {
        layer < self.layers.len()
    }
    fn wants_block_output(&self, _layer: usize) -> bool {
        true
    }
    fn linear_input(&mut self, layer: usize, site: Site, x: &[f32], rows: usize, cols: usize) {
        let Some(i) = self.sites.iter().position(|s| *s == site) else {
            return;
        };
        let Some(slot) = self.layers.get_mut(layer) else {
            return;
        };
        slot[i]
            .get_or_insert_with(|| ColumnMoments::new(cols))
            .add(&x[..rows * cols], rows);
    }
}

/// One pass of the (unpruned) model over `calib`, collecting moments at `sites` of every layer.
pub fn collect_width_stats(
    model: &Model,
    calib: &CalibSet,
    sites: &[Site],
    progress: Progress<'_>,
) -> Result<WidthStats> {
    let mut stats = WidthStats::new(model.weights.layers.len(), sites);
    observe_all(model, calib, &mut stats, progress)?;
    Ok(stats)
}
