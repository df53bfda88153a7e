//! Wanda: prune by |W_ij|·‖X_j‖₂, compared within each output row, no weight update
//! (Sun, Liu, Bair, Kolter 2023, "A Simple and Effective Pruning Approach for LLMs", §3, Eq. 1).
//!
//! ‖X_j‖₂ is the norm of input feature j over all calibration tokens; the official code keeps
//! `scaler_row = Σ x_j² / n_samples` and scores `|W| · sqrt(scaler_row)` (the constant factor
//! does not change the ranking). N:M groups, vectors and blocks use the same score.

use super::{mask, Needs, Pruner, SiteStats, Target};
use crate::{Error, Result};
use rayon::prelude::*;

/// The Wanda score matrix `|W| · sqrt(scaler_row)`.
pub fn scores(w: &[f32], cols: usize, stats: &SiteStats) -> Option<Vec<f32>> {
    let norm: Vec<f32> = stats.scaler_row()?.iter().map(|s| s.sqrt()).collect();
    let mut out = vec![0f32; w.len()];
    out.par_chunks_mut(cols)
        .zip(w.par_chunks(cols))
        .for_each(|(o, row)| {
            for ((o, &v), &n) in o.iter_mut().zip(row).zip(&norm) {
                *o = v.abs() * n;
            }
        });
    Some(out)
}

/// Wanda pruner.
#[derive(Debug, Clone, Copy, Default)]
pub struct Wanda;

impl Pruner for Wanda {
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
        let s = scores(w, cols, stats).ok_or_else(|| {
            Error::Invalid(format!(
                "{name}: Wanda needs input norms, none were collected"
            ))
        })?;
        mask::prune_by_row_scores(w, &s, rows, cols, target, name)
    }
}
