//! Winning back quality without training, on top of any pruning mask:
//!
//! - [`permute`]: N:M channel permutation (RIA), carried into the producing weights so the
//!   model computes the same function;
//! - [`swaps`]: swap refinement of a mask against the layer's output error from XᵀX (DSnoT,
//!   SparseSwaps);
//! - [`reconstruct`]: block reconstruction, least-squares re-fits of the surviving weights
//!   towards the dense model's outputs on the pruned model's own inputs.
//!
//! The pruning driver ([`crate::prune::driver`]) calls these per block; what they did comes
//! back as a [`RecoveryReport`] in the prune outcome (and report.json).

pub mod depth_fit;
pub mod lowrank_fit;
pub mod permute;
pub mod reconstruct;
pub mod swaps;
pub mod width;

use crate::calibrate::stats::SiteStats;
use crate::model::observer::Site;
use crate::prune::{Method, Pattern};
use crate::{Error, LayerWeights, Result};
use serde::Serialize;
use std::collections::HashMap;

pub use reconstruct::{FitOutcome, ReconOptions, ReconTarget};
pub use swaps::SwapOutcome;

/// Mask refinements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Refine {
    /// Swap pruned and kept weights while the layer's output error falls.
    Swaps,
}

/// Which recovery steps a pruning run does.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Recovery {
    /// N:M channel permutation of down_proj's inputs (gate/up rows follow).
    pub permute: bool,
    /// Block reconstruction after each block is pruned.
    pub reconstruct: Option<ReconOptions>,
    /// Mask refinement right after each linear is pruned.
    pub refine: Option<Refine>,
    /// Swap budget per row for `refine`.
    pub refine_iters: usize,
}

impl Recovery {
    /// Whether a step needs calibration activations whatever the pruning method.
    pub fn needs_calibration(&self) -> bool {
        self.reconstruct.is_some() || self.refine.is_some()
    }

    /// Check the options against the pattern.
    pub fn validate(&self, pattern: Pattern) -> Result<()> {
        let bad = |m: String| Err(Error::Invalid(m));
        if self.permute && !matches!(pattern, Pattern::NM { .. }) {
            return bad(format!(
                "--permute reorders input channels to form better N:M groups; it needs an N:M pattern (e.g. --pattern 2:4), not {pattern}"
            ));
        }
        if self.refine.is_some()
            && matches!(pattern, Pattern::Block { .. } | Pattern::Vector { .. })
        {
            return bad(format!(
                "--refine swaps exchanges single weights within a row or N:M group; it works with unstructured and N:M patterns, not {pattern}"
            ));
        }
        if self.refine.is_some() && self.refine_iters == 0 {
            return bad("--refine-iters must be at least 1".into());
        }
        if let Some(r) = self.reconstruct {
            #[allow(clippy::neg_cmp_op_on_partial_ord)]
            if !(r.damp >= 0.0) || !r.damp.is_finite() {
                return bad(format!(
                    "--recon-damp must be a finite number >= 0, got {}",
                    r.damp
                ));
            }
            if r.rounds == 0 {
                return bad("--recon-rounds must be at least 1".into());
            }
        }
        Ok(())
    }
}

/// What the recovery steps did, for report.json.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RecoveryReport {
    /// Steps that ran, in order.
    pub steps: Vec<String>,
    pub permuted: Vec<permute::PermuteOutcome>,
    /// Sites left unpermuted with `--permute`, and why.
    pub unpermuted: Vec<(String, String)>,
    pub swaps: Vec<SwapOutcome>,
    pub reconstruction: Vec<FitOutcome>,
    pub seconds_permute: f64,
    pub seconds_swaps: f64,
    pub seconds_reconstruct: f64,
    /// Of `seconds_reconstruct`: the paired passes with their statistics, and the solves.
    pub seconds_recon_collect: f64,
    pub seconds_recon_solve: f64,
    /// Calibration samples the reconstruction used.
    pub recon_samples: usize,
    /// Reconstruction error relative to the dense output energy, averaged over the linears.
    pub mean_rel_error_before: Option<f64>,
    pub mean_rel_error_after: Option<f64>,
}

impl RecoveryReport {
    /// An empty report listing the steps `r` will run.
    pub fn new(r: &Recovery) -> RecoveryReport {
        let mut rep = RecoveryReport::default();
        if r.permute {
            rep.steps.push("permute".into());
            rep.unpermuted = permute::UNPERMUTED
                .iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect();
        }
        if r.refine.is_some() {
            rep.steps.push("swaps".into());
        }
        if r.reconstruct.is_some() {
            rep.steps.push("reconstruct".into());
        }
        rep
    }

    /// Fill in the summary means.
    pub fn finish(&mut self) {
        let n = self.reconstruction.len();
        if n > 0 {
            let b: f64 = self.reconstruction.iter().map(|f| f.rel_error_before).sum();
            let a: f64 = self.reconstruction.iter().map(|f| f.rel_error_after).sum();
            self.mean_rel_error_before = Some(b / n as f64);
            self.mean_rel_error_after = Some(a / n as f64);
        }
    }
}

/// Scores used to choose a permutation: the method's own (RIA), else |W|·‖X_j‖ (Wanda's;
/// also for SparseGPT, whose ‖X_j‖² is XᵀX's diagonal), or |W| without statistics.
pub fn permutation_scores(
    method: Method,
    ria_alpha: f64,
    w: &[f32],
    cols: usize,
    stats: Option<&SiteStats>,
) -> Vec<f32> {
    let norm: Vec<f32> = match stats {
        Some(s) => match (&s.col_sq, &s.xtx) {
            (Some(v), _) => v.iter().map(|x| x.sqrt() as f32).collect(),
            (None, Some(x)) => (0..cols).map(|j| x[j * cols + j].sqrt() as f32).collect(),
            _ => vec![1.0; cols],
        },
        None => vec![1.0; cols],
    };
    match method {
        Method::Ria => crate::prune::ria::scores_with_norm(w, cols, &norm, ria_alpha),
        Method::Magnitude => w.iter().map(|v| v.abs()).collect(),
        _ => w
            .chunks(cols)
            .flat_map(|row| row.iter().zip(&norm).map(|(v, n)| v.abs() * n))
            .collect(),
    }
}

/// Permute block `layer`'s down_proj inputs for N:M (`n` of `m`), with gate/up rows and the
/// down_proj site statistics following. Returns what was done.
pub fn permute_block(
    layer: usize,
    lw: &mut LayerWeights,
    sites: &mut HashMap<Site, SiteStats>,
    method: Method,
    ria_alpha: f64,
    (n, m): (usize, usize),
) -> permute::PermuteOutcome {
    let cols = lw.down.in_features();
    let scores = permutation_scores(
        method,
        ria_alpha,
        lw.down.weight.data(),
        cols,
        sites.get(&Site::MlpDown),
    );
    let perm = permute::choose(&scores, cols, n, m, 20 * cols);
    let identity: Vec<usize> = (0..cols).collect();
    let out = permute::PermuteOutcome {
        layer,
        kept_score_identity: permute::kept_score(&scores, cols, n, m, &identity),
        kept_score_permuted: permute::kept_score(&scores, cols, n, m, &perm),
        applied: perm != identity,
    };
    if out.applied {
        permute::apply_to_mlp(lw, &perm);
        if let Some(s) = sites.get(&Site::MlpDown) {
            let p = permute::permute_stats(s, &perm);
            sites.insert(Site::MlpDown, p);
        }
    }
    out
}

/// Swap-refine one pruned linear `w` against its dense weights `w0` with the input statistics
/// `stats` (XᵀX needed).
#[allow(clippy::too_many_arguments)]
pub fn refine_linear(
    w: &mut [f32],
    w0: &[f32],
    rows: usize,
    cols: usize,
    stats: &SiteStats,
    pattern: Pattern,
    iters: usize,
    name: &str,
) -> Result<SwapOutcome> {
    let g = stats.hessian().ok_or_else(|| {
        Error::Invalid(format!(
            "{name}: swap refinement needs XᵀX, none was collected"
        ))
    })?;
    let group = match pattern {
        Pattern::NM { m, .. } => Some(m),
        _ => None,
    };
    let (before, after, energy, swaps) = swaps::refine(w, w0, rows, cols, &g, group, iters);
    if !after.is_finite() {
        return Err(Error::Numeric(format!(
            "{name}: NaN/Inf in swap refinement"
        )));
    }
    let e = energy.max(f64::MIN_POSITIVE);
    Ok(SwapOutcome {
        name: name.to_string(),
        rel_error_before: before / e,
        rel_error_after: after / e,
        swaps,
    })
}
