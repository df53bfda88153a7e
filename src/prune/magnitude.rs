//! Magnitude pruning: score = |W| (Han et al. 2015; the baseline of Wanda/SparseGPT).
//!
//! The official baseline (Wanda's `prune_magnitude`) compares within the whole matrix and prunes
//! every |W| `<=` the ⌊n·s⌋-th smallest (so ties at the threshold go too: 0.50009 on SmolLM2);
//! `Scope::Row` compares within each output row instead. No calibration data is used.

use super::{mask, Needs, Pattern, Pruner, Scope, SiteStats, Target};
use crate::Result;

/// Magnitude pruner.
#[derive(Debug, Clone, Copy, Default)]
pub struct Magnitude {
    pub scope: Scope,
}

impl Pruner for Magnitude {
    fn needs(&self) -> Needs {
        Needs::default()
    }

    fn prune(
        &self,
        w: &mut [f32],
        rows: usize,
        cols: usize,
        _stats: &SiteStats,
        target: Target,
        name: &str,
    ) -> Result<()> {
        let scores: Vec<f32> = w.iter().map(|v| v.abs()).collect();
        let m = if target.pattern == Pattern::Unstructured && self.scope == Scope::Matrix {
            // Official `prune_magnitude`: |W| <= the k-th smallest in the whole matrix.
            mask::threshold_mask(&scores, target.sparsity)
        } else {
            mask::select(
                &scores,
                rows,
                cols,
                target.pattern,
                target.sparsity,
                self.scope,
                name,
            )?
        };
        mask::apply(w, &m);
        Ok(())
    }
}
