//! Choosing which weights to prune from a score matrix, for every [`Pattern`].
//!
//! Scores are `[rows, cols]` row-major (rows = outputs, cols = inputs), higher = more
//! important. The result is a prune mask (`true` = set to zero). Ties are broken by position
//! (lower index pruned first), which is what a stable ascending sort — as in the official
//! Wanda code — does. Counts are `floor(group size × sparsity)`, like `int(n · ratio)` there.

use super::{Pattern, Scope};
use crate::{Error, Result};
use rayon::prelude::*;

/// Indices of the `k` smallest `scores` (ties: lower index first).
pub fn smallest_k(scores: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    if k == 0 {
        return Vec::new();
    }
    if k < idx.len() {
        idx.select_nth_unstable_by(k - 1, |&a, &b| {
            scores[a].total_cmp(&scores[b]).then(a.cmp(&b))
        });
        idx.truncate(k);
    }
    idx
}

/// The official codes' whole-group selection: prune every score `<=` the `⌊n·sparsity⌋`-th
/// smallest (0-based), i.e. `⌊n·sparsity⌋ + 1` weights plus ties. Wanda's `prune_magnitude` and
/// SparseGPT's adaptive mask both do this; matching it reproduces their results exactly.
pub fn threshold_mask(scores: &[f32], sparsity: f64) -> Vec<bool> {
    let k = (scores.len() as f64 * sparsity) as usize;
    if sparsity <= 0.0 || k >= scores.len() {
        return vec![sparsity > 0.0 && !scores.is_empty(); scores.len()];
    }
    let mut sorted = scores.to_vec();
    let (_, thr, _) = sorted.select_nth_unstable_by(k, |a, b| a.total_cmp(b));
    let thr = *thr;
    scores.iter().map(|&v| v <= thr).collect()
}

/// Check that `pattern` tiles a `[rows, cols]` matrix named `name`.
pub fn check_shape(pattern: Pattern, rows: usize, cols: usize, name: &str) -> Result<()> {
    let bad = |m: String| Err(Error::Invalid(format!("{name} [{rows}x{cols}]: {m}")));
    match pattern {
        Pattern::NM { m, .. } if !cols.is_multiple_of(m) => bad(format!("{cols} inputs are not a multiple of M={m} for pattern {pattern}")),
        Pattern::Vector { v } if !cols.is_multiple_of(v) => bad(format!("{cols} inputs are not a multiple of the vector length {v}")),
        Pattern::Block { r, c } if !rows.is_multiple_of(r) || !cols.is_multiple_of(c) => bad(format!(
            "block {r}x{c} does not divide the matrix (lopper refuses rather than padding; choose a block shape that divides every pruned matrix)"
        )),
        _ => Ok(()),
    }
}

/// Aggregate `scores` over tiles of `r × c`: `[rows/r, cols/c]` sums.
fn tile_sums(scores: &[f32], rows: usize, cols: usize, r: usize, c: usize) -> Vec<f32> {
    let (tr, tc) = (rows / r, cols / c);
    let mut out = vec![0f32; tr * tc];
    out.par_chunks_mut(tc).enumerate().for_each(|(bi, orow)| {
        for i in bi * r..(bi + 1) * r {
            let row = &scores[i * cols..(i + 1) * cols];
            for (bj, o) in orow.iter_mut().enumerate() {
                *o += row[bj * c..(bj + 1) * c].iter().sum::<f32>();
            }
        }
    });
    out
}

/// Expand a tile mask `[rows/r, cols/c]` to elements.
fn expand(tmask: &[bool], rows: usize, cols: usize, r: usize, c: usize) -> Vec<bool> {
    let tc = cols / c;
    let mut m = vec![false; rows * cols];
    m.par_chunks_mut(cols).enumerate().for_each(|(i, row)| {
        for (j, v) in row.iter_mut().enumerate() {
            *v = tmask[(i / r) * tc + j / c];
        }
    });
    m
}

/// Unstructured selection over groups: per row (`Scope::Row`) or the whole matrix.
fn select_groups(
    scores: &[f32],
    rows: usize,
    cols: usize,
    sparsity: f64,
    scope: Scope,
) -> Vec<bool> {
    let mut mask = vec![false; rows * cols];
    match scope {
        Scope::Row => {
            let k = (cols as f64 * sparsity) as usize;
            mask.par_chunks_mut(cols)
                .zip(scores.par_chunks(cols))
                .for_each(|(m, s)| {
                    for i in smallest_k(s, k) {
                        m[i] = true;
                    }
                });
        }
        Scope::Matrix => {
            let k = ((rows * cols) as f64 * sparsity) as usize;
            for i in smallest_k(scores, k) {
                mask[i] = true;
            }
        }
    }
    mask
}

/// The prune mask for `scores` under `pattern` at `sparsity`, comparing within `scope`
/// (for blocks, `Scope::Row` compares within each band of `r` rows).
pub fn select(
    scores: &[f32],
    rows: usize,
    cols: usize,
    pattern: Pattern,
    sparsity: f64,
    scope: Scope,
    name: &str,
) -> Result<Vec<bool>> {
    check_shape(pattern, rows, cols, name)?;
    Ok(match pattern {
        Pattern::Unstructured => select_groups(scores, rows, cols, sparsity, scope),
        Pattern::NM { n, m } => {
            let mut mask = vec![false; rows * cols];
            mask.par_chunks_mut(cols)
                .zip(scores.par_chunks(cols))
                .for_each(|(mrow, srow)| {
                    for g in 0..cols / m {
                        for i in smallest_k(&srow[g * m..(g + 1) * m], m - n) {
                            mrow[g * m + i] = true;
                        }
                    }
                });
            mask
        }
        Pattern::Vector { v } => {
            let t = tile_sums(scores, rows, cols, 1, v);
            let tm = select_groups(&t, rows, cols / v, sparsity, scope);
            expand(&tm, rows, cols, 1, v)
        }
        Pattern::Block { r, c } => {
            let t = tile_sums(scores, rows, cols, r, c);
            // Row scope: one group per band of r rows, i.e. one row of the tile grid.
            let tm = select_groups(&t, rows / r, cols / c, sparsity, scope);
            expand(&tm, rows, cols, r, c)
        }
    })
}

/// Prune `w` (`[rows, cols]`) by `scores` compared within each output row, as Wanda and RIA
/// do: the lowest-scoring weights of every row (or N:M group, vector, block) go.
pub fn prune_by_row_scores(
    w: &mut [f32],
    scores: &[f32],
    rows: usize,
    cols: usize,
    target: super::Target,
    name: &str,
) -> Result<()> {
    let m = select(
        scores,
        rows,
        cols,
        target.pattern,
        target.sparsity,
        Scope::Row,
        name,
    )?;
    apply(w, &m);
    Ok(())
}

/// Zero `w` where `mask` is set.
pub fn apply(w: &mut [f32], mask: &[bool]) {
    w.par_iter_mut().zip(mask.par_iter()).for_each(|(v, &m)| {
        if m {
            *v = 0.0;
        }
    });
}
