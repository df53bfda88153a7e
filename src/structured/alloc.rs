//! How many removable units (heads, KV groups, neurons) each layer gives up.
//!
//! Units are scored per layer; a higher score means more important. Two allocations
//! ([`super::WidthAllocation`]):
//!
//! - **Uniform**: every layer removes `round(fraction · units)` of its own lowest-scoring units
//!   (rounded to the nearest whole unit; FLAP's `UL-UM` uses `int(·)`, i.e. floors). A count that
//!   would leave a layer without a unit is an error.
//! - **Adaptive** (FLAP §3.3, "adaptive structure search", `AL-MM` in `lib/prune.py`): scores are
//!   first standardised within each layer (`(s − mean)/std`, [`standardize`]) so layers become
//!   comparable, then the globally lowest units go until the requested total is reached. Every
//!   layer keeps at least one unit.
//!
//! The functions here work on plain score lists; the callers (heads, neurons) decide what a unit
//! is and what its score means.

use crate::{Error, Result};

/// Standardise `x` in place: `(x − mean) / std`, with the unbiased std (`torch.std`), as FLAP's
/// `standarlization` does per layer. A constant list becomes all zeros.
pub fn standardize(x: &mut [f64]) {
    let n = x.len();
    if n == 0 {
        return;
    }
    let mean = x.iter().sum::<f64>() / n as f64;
    let var = if n > 1 {
        x.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / (n - 1) as f64
    } else {
        0.0
    };
    let std = var.sqrt();
    for v in x.iter_mut() {
        *v = if std > 0.0 { (*v - mean) / std } else { 0.0 };
    }
}

/// Indices of `scores` in ascending score order (ties by index), i.e. least important first.
pub fn ascending(scores: &[f64]) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]).then(a.cmp(&b)));
    idx
}

/// Check that every score is finite (a NaN would make the ranking meaningless).
pub fn check_finite(scores: &[f64], what: &str) -> Result<()> {
    match scores.iter().position(|s| !s.is_finite()) {
        None => Ok(()),
        Some(i) => Err(Error::Numeric(format!(
            "{what}: score of unit {i} is {}",
            scores[i]
        ))),
    }
}

/// Check a removal fraction: finite, in `[0, 1)`.
pub fn check_fraction(fraction: f64, what: &str) -> Result<()> {
    if !fraction.is_finite() || !(0.0..1.0).contains(&fraction) {
        return Err(Error::Invalid(format!(
            "{what}: the fraction removed must be in [0, 1), got {fraction}"
        )));
    }
    Ok(())
}

/// Uniform allocation: units removed in each layer, `round(fraction · units[l])`; a layer whose
/// count exceeds `max_remove[l]` is an error naming it. (Tested in `tests/structured.rs`.)
pub fn uniform_counts(
    fraction: f64,
    units: &[usize],
    max_remove: &[usize],
    what: &str,
) -> Result<Vec<usize>> {
    let mut out = Vec::with_capacity(units.len());
    for (l, (&u, &cap)) in units.iter().zip(max_remove).enumerate() {
        let k = (fraction * u as f64).round() as usize;
        if k > cap {
            return Err(Error::Invalid(format!(
                "{what}: removing {fraction} of layer {l}'s {u} units rounds to {k}, but at most {cap} can go (every layer keeps at least one)"
            )));
        }
        out.push(k);
    }
    Ok(out)
}

/// Adaptive allocation: `sorted[l]` are layer `l`'s unit scores in ascending order (already
/// standardised), each unit worth `size[l]` items; at most `max_remove[l]` units of layer `l` go.
/// Takes the globally lowest units until `target_items` items are removed: it stops at the first
/// unit that does not fit, taking it only when that lands closer to the target.
/// Returns the units removed per layer (always a prefix of each `sorted[l]`).
pub fn adaptive_counts(
    sorted: &[Vec<f64>],
    size: &[usize],
    max_remove: &[usize],
    target_items: usize,
    what: &str,
) -> Result<Vec<usize>> {
    let capacity: usize = max_remove.iter().zip(size).map(|(m, s)| m * s).sum();
    if target_items > capacity {
        return Err(Error::Invalid(format!(
            "{what}: {target_items} items requested, but at most {capacity} can go while every layer keeps one unit"
        )));
    }
    let mut all: Vec<(f64, usize, usize)> = Vec::new();
    for (l, s) in sorted.iter().enumerate() {
        debug_assert!(s.windows(2).all(|w| w[0] <= w[1]), "scores must be sorted");
        for (r, &v) in s.iter().enumerate().take(max_remove[l]) {
            all.push((v, l, r));
        }
    }
    // Ties: lower layer, then lower rank first (keeps each layer's choice a prefix).
    all.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
    let mut counts = vec![0usize; sorted.len()];
    let mut removed = 0usize;
    for &(_, l, _) in &all {
        if removed >= target_items {
            break;
        }
        let next = removed + size[l];
        if next > target_items {
            if next - target_items < target_items - removed {
                counts[l] += 1;
            }
            break;
        }
        counts[l] += 1;
        removed = next;
    }
    Ok(counts)
}
