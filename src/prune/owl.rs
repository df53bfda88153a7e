//! Per-layer sparsity allocation: uniform, or OWL (Yin et al. 2024, "Outlier Weighed Layerwise
//! Sparsity (OWL)", §3.2).
//!
//! OWL measures each block's *layerwise outlier distribution* (LOD): the share (in %) of Wanda
//! scores `|W|·‖X‖` over all the block's linears that exceed `M ×` their mean. Blocks with more
//! outliers keep more weights: the LODs are mapped linearly onto a range of width `2λ` and
//! shifted so the mean density is `1 − S`; block sparsity is `1 − density`. As in the official
//! code the range is not centred on `S` (its mean is): sparsities lie within `S ± 2λ(n−1)/n`.
//! Defaults as published: `M = 5`, `λ = 0.08`.

use serde::Serialize;

/// How sparsity is spread over blocks.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Default)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Allocation {
    /// Every block gets the target sparsity.
    #[default]
    Uniform,
    /// Outlier-weighted layerwise sparsity.
    Owl { m: f64, lambda: f64 },
}

/// LOD of one block: % of `scores` (all its linears' Wanda scores) above `m ×` their mean.
pub fn outlier_ratio(scores: &[Vec<f32>], m: f64) -> f64 {
    let n: usize = scores.iter().map(|s| s.len()).sum();
    if n == 0 {
        return 0.0;
    }
    let mean = scores
        .iter()
        .flat_map(|s| s.iter())
        .map(|&v| v as f64)
        .sum::<f64>()
        / n as f64;
    let thr = mean * m;
    let count = scores
        .iter()
        .flat_map(|s| s.iter())
        .filter(|&&v| v as f64 > thr)
        .count();
    100.0 * count as f64 / n as f64
}

/// Block sparsities from LODs for target sparsity `s` and spread `lambda`.
/// Equal LODs (no spread to map) give the uniform allocation.
pub fn allocate(lods: &[f64], s: f64, lambda: f64) -> Vec<f64> {
    let (lo, hi) = lods
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), &v| (a.min(v), b.max(v)));
    // Negated so that NaN takes this branch too.
    #[allow(clippy::neg_cmp_op_on_partial_ord)]
    if lods.is_empty() || !(hi > lo) {
        return vec![s; lods.len()];
    }
    let scaled: Vec<f64> = lods
        .iter()
        .map(|&v| (v - lo) / (hi - lo) * lambda * 2.0)
        .collect();
    let mean = scaled.iter().sum::<f64>() / scaled.len() as f64;
    scaled
        .iter()
        .map(|&d| (1.0 - (d - mean + (1.0 - s))).clamp(0.0, 0.99))
        .collect()
}
