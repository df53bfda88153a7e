//! Swap refinement of a pruning mask (DSnoT, Zhang et al. ICLR 2024; SparseSwaps 2025):
//! within each row (or each N:M group), swap a pruned weight with a kept one whenever that
//! lowers the row's output error `‖(w − ŵ)X‖² = δᵀGδ` with `G = XᵀX` and `δ = w − ŵ`.
//!
//! Restoring pruned input `i` (to its dense value `w_i`) changes `δ` by `−w_i·e_i`, pruning
//! kept input `j` (current value `ŵ_j`, which SparseGPT may have updated) by `+ŵ_j·e_j`. With
//! `g = Gδ` kept up to date, the error change of a pair is O(1):
//! `Δ = (−2w_i g_i + w_i² G_ii) + (2ŵ_j g_j + ŵ_j² G_jj) − 2 w_i ŵ_j G_ij`,
//! and applying a swap updates `g` with two columns of `G` (O(cols)). Unstructured rows pick
//! the best of the pairs among the [`CANDIDATES`] best restores × best prunes (exact `Δ` for
//! each, cross term included); N:M rows try every pair inside every group. A row stops when no
//! pair lowers its error or after `iters` swaps. Row counts and N:M groups are kept exactly.

use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, Par};
use rayon::prelude::*;
use serde::Serialize;

/// Restore and prune candidates per side considered in an unstructured row.
pub const CANDIDATES: usize = 8;

/// What swap refinement did to one linear.
#[derive(Debug, Clone, Serialize)]
pub struct SwapOutcome {
    pub name: String,
    /// `Σ δᵀGδ / Σ wᵀGw` over the rows, before and after.
    pub rel_error_before: f64,
    pub rel_error_after: f64,
    pub swaps: usize,
}

/// Refine the pruned `w` (`[rows, cols]`, zeros = pruned) against the dense `w0` with the full
/// symmetric Gram matrix `g` (`[cols, cols]`). `group`: `Some(m)` keeps swaps inside groups of
/// `m` consecutive inputs (N:M). Returns (error before, error after, dense energy, swaps),
/// errors and energy summed over rows.
pub fn refine(
    w: &mut [f32],
    w0: &[f32],
    rows: usize,
    cols: usize,
    g: &[f64],
    group: Option<usize>,
    iters: usize,
) -> (f64, f64, f64, usize) {
    let gm = Mat::<f64>::from_fn(cols, cols, |i, j| g[i * cols + j]);
    let d = Mat::<f64>::from_fn(rows, cols, |r, j| {
        (w0[r * cols + j] - w[r * cols + j]) as f64
    });
    let w0m = Mat::<f64>::from_fn(rows, cols, |r, j| w0[r * cols + j] as f64);
    let mut dg = Mat::<f64>::zeros(rows, cols);
    let mut w0g = Mat::<f64>::zeros(rows, cols);
    matmul(
        dg.as_mut(),
        Accum::Replace,
        d.as_ref(),
        gm.as_ref(),
        1.0,
        Par::rayon(0),
    );
    matmul(
        w0g.as_mut(),
        Accum::Replace,
        w0m.as_ref(),
        gm.as_ref(),
        1.0,
        Par::rayon(0),
    );
    drop(d);
    let res: Vec<(f64, f64, f64, usize)> = w
        .par_chunks_mut(cols)
        .zip(w0.par_chunks(cols))
        .enumerate()
        .map(|(r, (wr, w0r))| {
            let mut gv: Vec<f64> = (0..cols).map(|j| dg[(r, j)]).collect();
            let energy: f64 = (0..cols).map(|j| w0g[(r, j)] * w0r[j] as f64).sum();
            let delta = |j: usize, wr: &[f32]| (w0r[j] - wr[j]) as f64;
            let before: f64 = (0..cols).map(|j| delta(j, wr) * gv[j]).sum();
            let swaps = refine_row(wr, w0r, g, &mut gv, cols, group, iters);
            let after: f64 = (0..cols).map(|j| delta(j, wr) * gv[j]).sum();
            (before, after, energy, swaps)
        })
        .collect();
    res.iter().fold((0.0, 0.0, 0.0, 0), |a, r| {
        (a.0 + r.0, a.1 + r.1, a.2 + r.2, a.3 + r.3)
    })
}

/// Error change of restoring pruned `i` (dense value `wi`) and pruning kept `j` (value `vj`).
#[inline]
fn pair_delta(g: &[f64], cols: usize, gv: &[f64], i: usize, wi: f64, j: usize, vj: f64) -> f64 {
    restore_gain(g, cols, gv, i, wi) + prune_cost(g, cols, gv, j, vj)
        - 2.0 * wi * vj * g[i * cols + j]
}

#[inline]
fn restore_gain(g: &[f64], cols: usize, gv: &[f64], i: usize, wi: f64) -> f64 {
    -2.0 * wi * gv[i] + wi * wi * g[i * cols + i]
}

#[inline]
fn prune_cost(g: &[f64], cols: usize, gv: &[f64], j: usize, vj: f64) -> f64 {
    2.0 * vj * gv[j] + vj * vj * g[j * cols + j]
}

/// Greedy swaps on one row; `gv = G(w0 − ŵ)` is kept current. Returns the swaps made.
fn refine_row(
    wr: &mut [f32],
    w0r: &[f32],
    g: &[f64],
    gv: &mut [f64],
    cols: usize,
    group: Option<usize>,
    iters: usize,
) -> usize {
    let mut swaps = 0;
    let err0: f64 = (0..cols).map(|j| (w0r[j] - wr[j]) as f64 * gv[j]).sum();
    let tol = 1e-12 * err0.abs().max(f64::MIN_POSITIVE);
    while swaps < iters {
        let best = match group {
            Some(m) => best_in_groups(wr, w0r, g, gv, cols, m),
            None => best_unstructured(wr, w0r, g, gv, cols),
        };
        let Some((d, i, j)) = best else { break };
        if d >= -tol {
            break;
        }
        let (wi, vj) = (w0r[i] as f64, wr[j] as f64);
        // δ_i: wi → 0 (restored), δ_j: w0_j − vj → w0_j (pruned): g += −wi·G_i + vj·G_j.
        let (gi, gj) = (&g[i * cols..(i + 1) * cols], &g[j * cols..(j + 1) * cols]);
        for ((x, &a), &b) in gv.iter_mut().zip(gi).zip(gj) {
            *x += -wi * a + vj * b;
        }
        wr[i] = w0r[i];
        wr[j] = 0.0;
        swaps += 1;
    }
    swaps
}

/// The best swap pair in an unstructured row: exact deltas over the best candidates.
fn best_unstructured(
    wr: &[f32],
    w0r: &[f32],
    g: &[f64],
    gv: &[f64],
    cols: usize,
) -> Option<(f64, usize, usize)> {
    let mut restore: Vec<(f64, usize)> = Vec::new();
    let mut prune: Vec<(f64, usize)> = Vec::new();
    for j in 0..cols {
        if wr[j] == 0.0 {
            if w0r[j] != 0.0 {
                restore.push((restore_gain(g, cols, gv, j, w0r[j] as f64), j));
            }
        } else {
            prune.push((prune_cost(g, cols, gv, j, wr[j] as f64), j));
        }
    }
    let top = |v: &mut Vec<(f64, usize)>| {
        let k = CANDIDATES.min(v.len());
        if k > 0 && k < v.len() {
            v.select_nth_unstable_by(k - 1, |a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        }
        v.truncate(k);
    };
    top(&mut restore);
    top(&mut prune);
    let mut best: Option<(f64, usize, usize)> = None;
    for &(_, i) in &restore {
        for &(_, j) in &prune {
            let d = pair_delta(g, cols, gv, i, w0r[i] as f64, j, wr[j] as f64);
            if best.is_none_or(|b| d < b.0) {
                best = Some((d, i, j));
            }
        }
    }
    best
}

/// The best swap pair inside any group of `m` consecutive inputs.
fn best_in_groups(
    wr: &[f32],
    w0r: &[f32],
    g: &[f64],
    gv: &[f64],
    cols: usize,
    m: usize,
) -> Option<(f64, usize, usize)> {
    let mut best: Option<(f64, usize, usize)> = None;
    for g0 in (0..cols).step_by(m) {
        for i in g0..g0 + m {
            if wr[i] != 0.0 || w0r[i] == 0.0 {
                continue;
            }
            for (j, &vj) in wr.iter().enumerate().skip(g0).take(m) {
                if vj == 0.0 {
                    continue;
                }
                let d = pair_delta(g, cols, gv, i, w0r[i] as f64, j, wr[j] as f64);
                if best.is_none_or(|b| d < b.0) {
                    best = Some((d, i, j));
                }
            }
        }
    }
    best
}

/// Reference: the error `Σ_rows (w0 − ŵ)ᵀ G (w0 − ŵ)` computed directly.
pub fn error_naive(w: &[f32], w0: &[f32], cols: usize, g: &[f64]) -> f64 {
    let mut e = 0.0;
    for (wr, w0r) in w.chunks(cols).zip(w0.chunks(cols)) {
        let d: Vec<f64> = wr.iter().zip(w0r).map(|(&a, &b)| (b - a) as f64).collect();
        for i in 0..cols {
            for j in 0..cols {
                e += d[i] * g[i * cols + j] * d[j];
            }
        }
    }
    e
}

/// Reference for one row: the best swap found by trying every (pruned, kept) pair with the
/// error recomputed from scratch, within groups of `m` when given; `None` if none lowers it.
pub fn best_swap_naive(
    wr: &[f32],
    w0r: &[f32],
    g: &[f64],
    group: Option<usize>,
) -> Option<(f64, usize, usize)> {
    let cols = wr.len();
    let base = error_naive(wr, w0r, cols, g);
    let mut best: Option<(f64, usize, usize)> = None;
    for i in 0..cols {
        for j in 0..cols {
            let same = group.is_none_or(|m| i / m == j / m);
            if !same || wr[i] != 0.0 || w0r[i] == 0.0 || wr[j] == 0.0 {
                continue;
            }
            let mut t = wr.to_vec();
            t[i] = w0r[i];
            t[j] = 0.0;
            let d = error_naive(&t, w0r, cols, g) - base;
            if d < 0.0 && best.is_none_or(|b| d < b.0) {
                best = Some((d, i, j));
            }
        }
    }
    best
}
