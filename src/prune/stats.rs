//! Input statistics of linear layers, collected by an [`Observer`] during the calibration pass.
//!
//! Per site (one per distinct linear input: q/k/v share one, gate/up share one) we keep sums
//! over all calibration tokens in f64: `Σ x_j²` per input column (Wanda's `scaler_row` is this
//! divided by the number of samples) and `Σ x xᵀ` (SparseGPT's `H` is 2/n_samples times this).

use crate::kernels;
use crate::model::observer::{Observer, Site};
use crate::prune::Needs;
use rayon::prelude::*;
use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

/// Statistics of one linear input.
#[derive(Debug, Clone)]
pub struct SiteStats {
    pub cols: usize,
    /// Calibration sequences seen.
    pub samples: usize,
    /// Tokens (rows) seen.
    pub tokens: usize,
    /// `Σ x_j²` per column, when collected.
    pub col_sq: Option<Vec<f64>>,
    /// `Σ x xᵀ`, `[cols, cols]` row-major, upper triangle (`j >= i`) valid, when collected.
    pub xtx: Option<Vec<f64>>,
    /// SparseGPT's inverse-Hessian factor, computed once and shared by the linears that read
    /// this input (q/k/v, gate/up). Filled by the first linear pruned.
    pub(crate) factor: OnceLock<Arc<super::sparsegpt::HessianFactor>>,
}

impl SiteStats {
    pub fn new(cols: usize, needs: Needs) -> SiteStats {
        // Zeros written (not `vec![0.0; n]`, which maps copy-on-write zero pages: the first
        // `+=` then faults twice per page and flushes every core's TLB, measured at 10% of a
        // SparseGPT run).
        let zeros = |n: usize| {
            let mut v = Vec::with_capacity(n);
            v.resize(n, 0f64);
            v
        };
        SiteStats::from_sums(
            cols,
            0,
            0,
            needs.col_sq.then(|| zeros(cols)),
            needs.hessian.then(|| zeros(cols * cols)),
        )
    }

    /// Statistics from sums computed elsewhere (`xtx`: upper triangle valid, `[cols, cols]`).
    pub fn from_sums(
        cols: usize,
        samples: usize,
        tokens: usize,
        col_sq: Option<Vec<f64>>,
        xtx: Option<Vec<f64>>,
    ) -> SiteStats {
        SiteStats {
            cols,
            samples,
            tokens,
            col_sq,
            xtx,
            factor: OnceLock::new(),
        }
    }

    /// Wanda's `scaler_row`: `Σ x_j² / n_samples` as f32.
    pub fn scaler_row(&self) -> Option<Vec<f32>> {
        let n = self.samples.max(1) as f64;
        self.col_sq
            .as_ref()
            .map(|v| v.iter().map(|s| (s / n) as f32).collect())
    }

    /// SparseGPT's Hessian `H = 2/n_samples · Σ x xᵀ` in f64 (full symmetric matrix).
    pub fn hessian(&self) -> Option<Vec<f64>> {
        let n = self.samples.max(1) as f64;
        let c = self.cols;
        self.xtx.as_ref().map(|v| {
            let mut h = vec![0f64; c * c];
            for i in 0..c {
                for j in i..c {
                    let x = 2.0 * v[i * c + j] / n;
                    h[i * c + j] = x;
                    h[j * c + i] = x;
                }
            }
            h
        })
    }

    /// Add `rows` rows of `x` (`[rows, cols]`), which hold `samples` sequences.
    pub fn add(&mut self, x: &[f32], rows: usize, samples: usize) {
        self.add_buffered(x, rows, samples, &mut Vec::new());
    }

    /// [`SiteStats::add`] with a caller-owned scratch buffer for the Gram matrix (avoids a
    /// large allocation per call).
    pub fn add_buffered(&mut self, x: &[f32], rows: usize, samples: usize, buf: &mut Vec<f32>) {
        let cols = self.cols;
        self.samples += samples;
        self.tokens += rows;
        self.factor = OnceLock::new();
        if let Some(acc) = &mut self.col_sq {
            // Column chunks in parallel; each sums its columns over all rows.
            const CH: usize = 64;
            acc.par_chunks_mut(CH).enumerate().for_each(|(ci, a)| {
                let c0 = ci * CH;
                for r in 0..rows {
                    let row = &x[r * cols + c0..r * cols + c0 + a.len()];
                    for (s, &v) in a.iter_mut().zip(row) {
                        *s += (v as f64) * (v as f64);
                    }
                }
            });
        }
        if let Some(acc) = &mut self.xtx {
            // XᵀX with the f32 GEMM (as the reference implementation does in float32), upper
            // triangle only, accumulated in f64 across chunks; mirrored once in `hessian()`.
            if buf.len() < cols * cols {
                buf.resize(cols * cols, 0.0);
            }
            let g = &mut buf[..cols * cols];
            kernels::gram_upper(x, rows, cols, g);
            acc.par_chunks_mut(cols)
                .zip(g.par_chunks(cols))
                .enumerate()
                .for_each(|(i, (a, gr))| {
                    for j in i..cols {
                        a[j] += gr[j] as f64;
                    }
                });
        }
    }
}

/// An observer that accumulates [`SiteStats`] for every site of one layer.
pub struct StatsObserver {
    pub layer: usize,
    pub needs: Needs,
    /// Tokens per calibration sequence (to count samples).
    pub seq_len: usize,
    pub sites: HashMap<Site, SiteStats>,
    /// When set, blocks stop after their last linear input (no block output is produced).
    pub statistics_only: bool,
    gram_buf: Vec<f32>,
}

impl StatsObserver {
    pub fn new(layer: usize, needs: Needs, seq_len: usize) -> StatsObserver {
        StatsObserver {
            layer,
            needs,
            seq_len,
            sites: HashMap::new(),
            statistics_only: false,
            gram_buf: Vec::new(),
        }
    }
}

impl Observer for StatsObserver {
    fn wants_linear_inputs(&self, layer: usize) -> bool {
        layer == self.layer
    }
    fn wants_block_output(&self, _layer: usize) -> bool {
        !self.statistics_only
    }
    fn linear_input(&mut self, layer: usize, site: Site, x: &[f32], rows: usize, cols: usize) {
        if layer != self.layer {
            return;
        }
        let needs = self.needs;
        let samples = rows / self.seq_len.max(1);
        self.sites
            .entry(site)
            .or_insert_with(|| SiteStats::new(cols, needs))
            .add_buffered(&x[..rows * cols], rows, samples, &mut self.gram_buf);
    }
}
