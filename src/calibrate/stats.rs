//! Input statistics of linear layers, collected by an [`Observer`] during the calibration pass.
//!
//! Per site (one per distinct linear input: q/k/v share one, gate/up share one) we keep sums
//! over all calibration tokens in f64: `Σ x_j²` per input column (Wanda's `scaler_row` is this
//! divided by the number of samples) and `Σ x xᵀ` (SparseGPT's `H` is 2/n_samples times this).

use crate::kernels;
use crate::model::observer::{ChunkObserver, Observer, Site};
use rayon::prelude::*;
use std::any::Any;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// What a method needs collected for each linear input.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Needs {
    /// Σ x_j² per input column (Wanda).
    pub col_sq: bool,
    /// Σ x xᵀ (SparseGPT).
    pub hessian: bool,
}

/// Something a method derives from a site's statistics once and shares between the linears
/// that read the site (SparseGPT's inverse-Hessian factor); the method downcasts it.
pub type Derived = Arc<dyn Any + Send + Sync>;

/// Statistics of one linear input.
#[derive(Debug)]
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
    /// A method's [`Derived`] value (SparseGPT's inverse-Hessian factor), computed once and
    /// shared by the linears that read this input (q/k/v, gate/up). Locked while it is being
    /// computed, so a second user waits instead of repeating the work.
    pub(crate) factor: Mutex<Option<Derived>>,
}

impl Clone for SiteStats {
    fn clone(&self) -> Self {
        SiteStats {
            cols: self.cols,
            samples: self.samples,
            tokens: self.tokens,
            col_sq: self.col_sq.clone(),
            xtx: self.xtx.clone(),
            factor: Mutex::new(self.cached_factor()),
        }
    }
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
            factor: Mutex::new(None),
        }
    }

    /// The cached [`Derived`] value, if any.
    pub(crate) fn cached_factor(&self) -> Option<Derived> {
        self.factor
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
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
        let mut c = ChunkSums::default();
        c.compute(x, rows, self.cols, samples, self.needs());
        self.fold(&c);
    }

    fn needs(&self) -> Needs {
        Needs {
            col_sq: self.col_sq.is_some(),
            hessian: self.xtx.is_some(),
        }
    }

    /// Fold one chunk's sums in (chunks must be folded in calibration order for results that
    /// do not depend on the number of threads).
    pub fn fold(&mut self, c: &ChunkSums) {
        assert_eq!(c.cols, self.cols, "statistics: chunk width differs");
        self.samples += c.samples;
        self.tokens += c.rows;
        self.factor = Mutex::new(None);
        if let (Some(acc), Some(part)) = (&mut self.col_sq, &c.col_sq) {
            for (a, p) in acc.iter_mut().zip(part) {
                *a += p;
            }
        }
        if let (Some(acc), Some(g)) = (&mut self.xtx, &c.gram) {
            // The chunk's f32 Gram accumulated in f64, upper triangle; mirrored in `hessian()`.
            let cols = self.cols;
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

/// One chunk's contribution to a site's statistics: `Σ x_j²` over its rows in f64, and `XᵀX`
/// in f32 (upper triangle) computed with one GEMM, as the reference implementation does in
/// float32. Buffers are reused across chunks.
#[derive(Debug, Default)]
pub struct ChunkSums {
    cols: usize,
    rows: usize,
    samples: usize,
    col_sq: Option<Vec<f64>>,
    gram: Option<Vec<f32>>,
}

impl ChunkSums {
    /// Overwrite with the sums of `x` (`[rows, cols]`, holding `samples` sequences).
    pub fn compute(&mut self, x: &[f32], rows: usize, cols: usize, samples: usize, needs: Needs) {
        self.cols = cols;
        self.rows = rows;
        self.samples = samples;
        let x = &x[..rows * cols];
        if needs.col_sq {
            let acc = self.col_sq.get_or_insert_with(Vec::new);
            acc.clear();
            acc.resize(cols, 0.0);
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
        } else {
            self.col_sq = None;
        }
        if needs.hessian {
            // Filled by writing (a fresh `vec![0.0; n]` maps copy-on-write zero pages that
            // fault on first write); gram_upper overwrites every tile it computes.
            let g = self.gram.get_or_insert_with(Vec::new);
            if g.len() != cols * cols {
                g.clear();
                g.resize(cols * cols, 0.0);
            }
            kernels::gram_upper(x, rows, cols, g);
        } else {
            self.gram = None;
        }
    }
}

/// An observer that accumulates [`SiteStats`] for every site of one layer.
///
/// Each linear input is summed per chunk ([`ChunkSums`]) and folded into the site's totals; in
/// a chunk-parallel pass the chunks' sums are computed by [`StatsPart`]s and folded in chunk
/// order, so the statistics are bit-for-bit those of a sequential pass.
pub struct StatsObserver {
    pub layer: usize,
    pub needs: Needs,
    /// Tokens per calibration sequence (to count samples).
    pub seq_len: usize,
    pub sites: HashMap<Site, SiteStats>,
    /// Parts back from merges, reused (with their buffers) by later chunks.
    spare: Vec<StatsPart>,
}

/// What a [`StatsObserver`] hands to one chunk of a parallel pass.
pub struct StatsPart {
    layer: usize,
    needs: Needs,
    seq_len: usize,
    sums: HashMap<Site, ChunkSums>,
    /// Sites seen since the last fold, in order.
    seen: Vec<Site>,
}

impl StatsPart {
    fn new(layer: usize, needs: Needs, seq_len: usize) -> StatsPart {
        StatsPart {
            layer,
            needs,
            seq_len,
            sums: HashMap::new(),
            seen: Vec::new(),
        }
    }
}

impl Observer for StatsPart {
    fn wants_linear_inputs(&self, layer: usize) -> bool {
        layer == self.layer
    }
    fn linear_input(&mut self, layer: usize, site: Site, x: &[f32], rows: usize, cols: usize) {
        if layer != self.layer {
            return;
        }
        let samples = rows / self.seq_len.max(1);
        self.sums
            .entry(site)
            .or_default()
            .compute(x, rows, cols, samples, self.needs);
        self.seen.push(site);
    }
}

impl StatsObserver {
    pub fn new(layer: usize, needs: Needs, seq_len: usize) -> StatsObserver {
        StatsObserver {
            layer,
            needs,
            seq_len,
            sites: HashMap::new(),
            spare: Vec::new(),
        }
    }

    /// Fold the sites `part` saw into the totals.
    fn fold(&mut self, part: &mut StatsPart) {
        let needs = self.needs;
        for site in part.seen.drain(..) {
            let c = &part.sums[&site];
            self.sites
                .entry(site)
                .or_insert_with(|| SiteStats::new(c.cols, needs))
                .fold(c);
        }
    }
}

impl Observer for StatsObserver {
    fn wants_linear_inputs(&self, layer: usize) -> bool {
        layer == self.layer
    }
    /// A sequential pass: each input goes through a part that is merged right away.
    fn linear_input(&mut self, layer: usize, site: Site, x: &[f32], rows: usize, cols: usize) {
        let mut part = self.part();
        part.linear_input(layer, site, x, rows, cols);
        self.merge(part);
    }
}

impl ChunkObserver for StatsObserver {
    type Part = StatsPart;
    fn part(&mut self) -> StatsPart {
        let mut p = self
            .spare
            .pop()
            .unwrap_or_else(|| StatsPart::new(self.layer, self.needs, self.seq_len));
        (p.layer, p.needs, p.seq_len) = (self.layer, self.needs, self.seq_len);
        p
    }
    fn merge(&mut self, mut part: StatsPart) {
        self.fold(&mut part);
        self.spare.push(part);
    }
}
