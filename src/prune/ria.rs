//! RIA, Relative Importance and Activations (Zhang et al., ICLR 2024, "Plug-and-Play: An
//! Efficient Post-training Pruning Method for Large Language Models", Eq. 3):
//!
//! `score_ij = (|W_ij| / Σ_i |W_ij| + |W_ij| / Σ_j |W_ij|) · (‖X_j‖₂)^a`
//!
//! The first term is the weight's share of its input channel (column sum over all outputs),
//! the second its share of its output row; `a` (0.5 in the paper) tempers the activation
//! norm. Like the official code, ‖X_j‖₂ is taken from Wanda's `scaler_row` (Σ x_j² / samples,
//! square-rooted; the constant factor does not change any ranking), and scores are compared
//! within each output row, for every pattern. Channel permutation for N:M lives in
//! [`crate::recover::permute`].

use super::{mask, Needs, Pruner, SiteStats, Target};
use crate::{Error, Result};
use rayon::prelude::*;

/// The paper's default activation exponent.
pub const DEFAULT_ALPHA: f64 = 0.5;

/// The RIA score matrix of `w` (`[rows, cols]`) with input norms `norm` (‖X_j‖₂ up to a
/// constant) and exponent `alpha`. A zero row or column sum contributes 0 (its weights are 0).
pub fn scores_with_norm(w: &[f32], cols: usize, norm: &[f32], alpha: f64) -> Vec<f32> {
    let rows = w.len() / cols.max(1);
    let mut col_sum = vec![0f64; cols];
    for row in w.chunks(cols) {
        for (s, &v) in col_sum.iter_mut().zip(row) {
            *s += v.abs() as f64;
        }
    }
    let act: Vec<f64> = norm.iter().map(|&n| (n as f64).powf(alpha)).collect();
    let mut out = vec![0f32; rows * cols];
    out.par_chunks_mut(cols)
        .zip(w.par_chunks(cols))
        .for_each(|(o, row)| {
            let row_sum: f64 = row.iter().map(|v| v.abs() as f64).sum();
            for j in 0..cols {
                let a = row[j].abs() as f64;
                let rel = share(a, col_sum[j]) + share(a, row_sum);
                o[j] = (rel * act[j]) as f32;
            }
        });
    out
}

fn share(a: f64, total: f64) -> f64 {
    if total > 0.0 {
        a / total
    } else {
        0.0
    }
}

/// Reference for [`scores_with_norm`]: the formula element by element.
pub fn scores_naive(w: &[f32], rows: usize, cols: usize, norm: &[f32], alpha: f64) -> Vec<f32> {
    let mut out = vec![0f32; rows * cols];
    for i in 0..rows {
        for j in 0..cols {
            let a = w[i * cols + j].abs() as f64;
            let cs: f64 = (0..rows).map(|r| w[r * cols + j].abs() as f64).sum();
            let rs: f64 = (0..cols).map(|c| w[i * cols + c].abs() as f64).sum();
            let rel = if cs > 0.0 { a / cs } else { 0.0 } + if rs > 0.0 { a / rs } else { 0.0 };
            out[i * cols + j] = (rel * (norm[j] as f64).powf(alpha)) as f32;
        }
    }
    out
}

/// The RIA scores of `w` from collected input statistics (`None` without input norms).
pub fn scores(w: &[f32], cols: usize, stats: &SiteStats, alpha: f64) -> Option<Vec<f32>> {
    let norm: Vec<f32> = stats.scaler_row()?.iter().map(|s| s.sqrt()).collect();
    Some(scores_with_norm(w, cols, &norm, alpha))
}

/// RIA pruner.
#[derive(Debug, Clone, Copy)]
pub struct Ria {
    /// Exponent `a` of the activation norm.
    pub alpha: f64,
}

impl Default for Ria {
    fn default() -> Self {
        Ria {
            alpha: DEFAULT_ALPHA,
        }
    }
}

impl Pruner for Ria {
    fn needs(&self) -> Needs {
        Needs {
            col_sq: true,
            hessian: false,
        }
    }

    fn prune(
        &self,
        w: &mut [f32],
        rows: usize,
        cols: usize,
        stats: &SiteStats,
        target: Target,
        name: &str,
    ) -> Result<()> {
        let s = scores(w, cols, stats, self.alpha).ok_or_else(|| {
            Error::Invalid(format!(
                "{name}: RIA needs input norms, none were collected"
            ))
        })?;
        mask::prune_by_row_scores(w, &s, rows, cols, target, name)
    }
}
