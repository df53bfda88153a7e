//! Channel permutation for N:M patterns (RIA §4, after Pool & Yu's channel permutations):
//! reorder a linear's input channels before the groups of M are formed, so that important
//! channels do not crowd into the same groups and lose to each other.
//!
//! A permutation of a linear's inputs only keeps the model's function when the weights that
//! produce those inputs are permuted the same way. In a llama block that is possible for
//! down_proj alone: its input is `silu(gate(x)) * up(x)`, so permuting gate_proj's and
//! up_proj's rows (and biases) permutes down_proj's input channels exactly. q/k/v and gate/up
//! read the residual stream, which every block shares; o_proj's input channels follow v_proj's
//! heads, shared by a GQA group of query heads: those sites are left unpermuted and reported.
//!
//! The permutation is chosen on the pruning scores: channels sorted by their total score are
//! dealt round-robin to the groups (RIA's heuristic), then pairs of channels in different
//! groups are swapped while that raises the score the N:M mask keeps (a bounded, seeded local
//! search). The identity is kept when nothing beats it.

use crate::calibrate::stats::SiteStats;
use crate::calibrate::SplitMix64;
use crate::LayerWeights;
use serde::Serialize;

/// Sites that are not permuted, with the reason (for the report).
pub const UNPERMUTED: &[(&str, &str)] = &[
    (
        "q_proj, k_proj, v_proj, gate_proj, up_proj",
        "their input is the residual stream, which every block shares",
    ),
    (
        "o_proj",
        "its input channels follow v_proj's heads, shared by a GQA group of query heads",
    ),
];

/// What permuting one block's down_proj did.
#[derive(Debug, Clone, Serialize)]
pub struct PermuteOutcome {
    pub layer: usize,
    /// Score kept by the N:M mask without / with the permutation (sums over the matrix).
    pub kept_score_identity: f64,
    pub kept_score_permuted: f64,
    /// Whether a permutation other than the identity was applied.
    pub applied: bool,
}

/// Score kept by an N:M mask on `scores` (`[rows, cols]`) with columns in order `perm`.
pub fn kept_score(scores: &[f32], cols: usize, n: usize, m: usize, perm: &[usize]) -> f64 {
    (0..cols / m)
        .map(|g| group_kept(scores, cols, n, &perm[g * m..(g + 1) * m]))
        .sum()
}

/// Score kept in one group (channels `chans`) over all rows: the `n` largest per row.
fn group_kept(scores: &[f32], cols: usize, n: usize, chans: &[usize]) -> f64 {
    let mut buf = vec![0f32; chans.len()];
    let mut total = 0f64;
    for row in scores.chunks(cols) {
        for (b, &c) in buf.iter_mut().zip(chans) {
            *b = row[c];
        }
        buf.sort_unstable_by(|a, b| b.total_cmp(a));
        total += buf[..n].iter().map(|&v| v as f64).sum::<f64>();
    }
    total
}

/// A column order for N:M groups of `m` (keeping `n`) that keeps at least as much score as the
/// identity: `perm[c]` is the original column placed at position `c`.
pub fn choose(scores: &[f32], cols: usize, n: usize, m: usize, trials: usize) -> Vec<usize> {
    let groups = cols / m;
    let identity: Vec<usize> = (0..cols).collect();
    if groups < 2 {
        return identity;
    }
    let mut total = vec![0f64; cols];
    for row in scores.chunks(cols) {
        for (t, &v) in total.iter_mut().zip(row) {
            *t += v as f64;
        }
    }
    let mut order: Vec<usize> = (0..cols).collect();
    order.sort_by(|&a, &b| total[b].total_cmp(&total[a]).then(a.cmp(&b)));
    // Round-robin: the k-th most important channel goes to group k mod groups.
    let mut perm = vec![0usize; cols];
    for (k, &c) in order.iter().enumerate() {
        perm[(k % groups) * m + k / groups] = c;
    }
    // Local search: swap channels between two groups when the two groups keep more.
    let mut rng = SplitMix64(0x5eed_0fc4);
    let mut kept: Vec<f64> = (0..groups)
        .map(|g| group_kept(scores, cols, n, &perm[g * m..(g + 1) * m]))
        .collect();
    for _ in 0..trials {
        let (ga, gb) = (
            rng.below(groups as u64) as usize,
            rng.below(groups as u64) as usize,
        );
        if ga == gb {
            continue;
        }
        let (ia, ib) = (
            ga * m + rng.below(m as u64) as usize,
            gb * m + rng.below(m as u64) as usize,
        );
        perm.swap(ia, ib);
        let ka = group_kept(scores, cols, n, &perm[ga * m..(ga + 1) * m]);
        let kb = group_kept(scores, cols, n, &perm[gb * m..(gb + 1) * m]);
        if ka + kb > kept[ga] + kept[gb] {
            kept[ga] = ka;
            kept[gb] = kb;
        } else {
            perm.swap(ia, ib);
        }
    }
    let permuted: f64 = kept.iter().sum();
    if permuted > kept_score(scores, cols, n, m, &identity) {
        perm
    } else {
        identity
    }
}

/// Reorder the columns of `w` (`[rows, cols]`): new column `c` is old column `perm[c]`.
pub fn permute_cols(w: &mut [f32], cols: usize, perm: &[usize]) {
    let mut buf = vec![0f32; cols];
    for row in w.chunks_mut(cols) {
        for (b, &p) in buf.iter_mut().zip(perm) {
            *b = row[p];
        }
        row.copy_from_slice(&buf);
    }
}

/// Reorder the rows of `w` (`[rows, cols]`): new row `r` is old row `perm[r]`.
pub fn permute_rows(w: &mut [f32], cols: usize, perm: &[usize]) {
    let old = w.to_vec();
    for (r, &p) in perm.iter().enumerate() {
        w[r * cols..(r + 1) * cols].copy_from_slice(&old[p * cols..(p + 1) * cols]);
    }
}

/// Apply `perm` to down_proj's input channels and to the gate/up rows that produce them, so
/// the block computes the same function.
pub fn apply_to_mlp(layer: &mut LayerWeights, perm: &[usize]) {
    let inter = layer.down.in_features();
    assert_eq!(
        perm.len(),
        inter,
        "permutation length differs from the FFN width"
    );
    permute_cols(layer.down.weight.data_mut(), inter, perm);
    for lin in [&mut layer.gate, &mut layer.up] {
        let cols = lin.in_features();
        permute_rows(lin.weight.data_mut(), cols, perm);
        if let Some(b) = lin.bias.as_mut() {
            permute_rows(b.data_mut(), 1, perm);
        }
    }
}

/// `stats` of an input whose channels are reordered by `perm` (Σx² and XᵀX follow).
pub fn permute_stats(stats: &SiteStats, perm: &[usize]) -> SiteStats {
    let c = stats.cols;
    let col_sq = stats
        .col_sq
        .as_ref()
        .map(|v| perm.iter().map(|&p| v[p]).collect());
    let xtx = stats.xtx.as_ref().map(|v| {
        // Upper triangle valid in the source; write the full matrix (upper part read later).
        let at = |i: usize, j: usize| if i <= j { v[i * c + j] } else { v[j * c + i] };
        let mut out = vec![0f64; c * c];
        for a in 0..c {
            for b in 0..c {
                out[a * c + b] = at(perm[a], perm[b]);
            }
        }
        out
    });
    SiteStats::from_sums(c, stats.samples, stats.tokens, col_sq, xtx)
}
