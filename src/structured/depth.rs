//! Depth pruning: remove whole blocks.
//!
//! - [`DepthMetric::BlockInfluence`] (Men et al., "ShortGPT: Layers in Large Language Models are
//!   More Redundant Than You Expect", 2024, §3.1, eq. 1): `BI_i = 1 − E_{X,t}[cos(x_{i,t},
//!   x_{i+1,t})]`, the mean over **all** calibration tokens of one minus the cosine between a
//!   block's input and output hidden states. The `n` blocks with the lowest BI go (scored once,
//!   on the unpruned model, as ShortGPT does).
//! - [`DepthMetric::Angular`] (Gromov et al., "The Unreasonable Ineffectiveness of the Deeper
//!   Layers", 2024, §3.2): for a run of `n` consecutive blocks starting at `ℓ`,
//!   `d(x^ℓ, x^{ℓ+n}) = arccos(cos(x^ℓ_T, x^{ℓ+n}_T)) / π` with `x^ℓ` the input of block `ℓ` and
//!   `T` the **last token** of each calibration window (the paper's choice), averaged over
//!   windows; the run with the smallest distance, blocks `ℓ*..ℓ*+n−1`, goes.
//! - [`DepthMetric::AngularAllTokens`]: the same distance averaged over every token of every
//!   window (steadier with few windows). It keeps the hidden states of `n + 1` consecutive
//!   block inputs, `(n+1)·samples·len·hidden` f32.
//!
//! An explicit [`LayerSelection::List`] needs no calibration. Errors (model untouched): removing
//! every block (or more), an index out of range, a repeated index.

use super::collect::observe_all;
use super::{sync_config, Progress, StepDetails};
use crate::calibrate::CalibSet;
use crate::model::observer::Observer;
use crate::{Error, Model, Result};
use rayon::prelude::*;
use serde_json::json;

/// How blocks are scored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DepthMetric {
    /// ShortGPT Block Influence: 1 − cos(input, output) of each block, lowest removed.
    BlockInfluence,
    /// Angular distance between the input of block l and the output of block l+n−1
    /// (Gromov et al., "The Unreasonable Ineffectiveness of the Deeper Layers"): the best
    /// contiguous run of n blocks is removed. Last token of each window, as in the paper.
    Angular,
    /// [`DepthMetric::Angular`] averaged over all tokens instead of the last one.
    AngularAllTokens,
}

/// Which blocks go.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LayerSelection {
    /// This many blocks, chosen by the metric.
    Count(usize),
    /// Exactly these block indices.
    List(Vec<usize>),
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DepthSpec {
    pub select: LayerSelection,
    pub metric: DepthMetric,
    /// Re-fit o_proj and down_proj (with biases) of the block after each removed span so that it
    /// absorbs the span ([`crate::recover::depth_fit`]).
    #[serde(default)]
    pub reconstruct: Option<crate::recover::ReconOptions>,
}

/// Cosine of two vectors in f64 (1 when both are zero, 0 when one is).
pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let (mut ab, mut aa, mut bb) = (0f64, 0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        let (x, y) = (x as f64, y as f64);
        ab += x * y;
        aa += x * x;
        bb += y * y;
    }
    if aa == 0.0 && bb == 0.0 {
        1.0
    } else if aa == 0.0 || bb == 0.0 {
        0.0
    } else {
        ab / (aa.sqrt() * bb.sqrt())
    }
}

/// Angular distance `arccos(cos)/π` in `[0, 1]`.
pub fn angular(a: &[f32], b: &[f32]) -> f64 {
    cosine(a, b).clamp(-1.0, 1.0).acos() / std::f64::consts::PI
}

/// Sum over rows of `f(row of a, row of b)`, rows in parallel.
fn row_sum(a: &[f32], b: &[f32], d: usize, f: fn(&[f32], &[f32]) -> f64) -> f64 {
    a.par_chunks(d)
        .zip(b.par_chunks(d))
        .map(|(x, y)| f(x, y))
        .sum()
}

/// Observer for Block Influence: per block, Σ over tokens of cos(input, output).
#[derive(Debug, Default)]
pub struct BlockInfluenceObserver {
    input: Vec<f32>,
    /// `(Σ cos, tokens)` per block.
    pub sums: Vec<(f64, usize)>,
}

impl BlockInfluenceObserver {
    /// BI per block: `1 − mean cos`.
    pub fn scores(&self) -> Vec<f64> {
        self.sums
            .iter()
            .map(|&(s, n)| 1.0 - s / n.max(1) as f64)
            .collect()
    }
}

impl Observer for BlockInfluenceObserver {
    fn block_input(&mut self, _layer: usize, h: &[f32], rows: usize, cols: usize) {
        self.input.clear();
        self.input.extend_from_slice(&h[..rows * cols]);
    }
    fn block_output(&mut self, layer: usize, h: &[f32], rows: usize, cols: usize) {
        if self.sums.len() <= layer {
            self.sums.resize(layer + 1, (0.0, 0));
        }
        let s = row_sum(&self.input, &h[..rows * cols], cols, cosine);
        self.sums[layer].0 += s;
        self.sums[layer].1 += rows;
    }
}

/// Observer keeping the last-token hidden state of each window at every block boundary:
/// `states[l]` is the input of block `l` (`l = n_layers`: the last block's output),
/// `[windows, hidden]`.
#[derive(Debug)]
pub struct LastTokenObserver {
    pub seq_len: usize,
    pub n_layers: usize,
    pub states: Vec<Vec<f32>>,
}

impl LastTokenObserver {
    pub fn new(seq_len: usize, n_layers: usize) -> LastTokenObserver {
        LastTokenObserver {
            seq_len,
            n_layers,
            states: vec![Vec::new(); n_layers + 1],
        }
    }

    fn keep(&mut self, l: usize, h: &[f32], rows: usize, cols: usize) {
        let len = self.seq_len.max(1);
        for r in (len - 1..rows).step_by(len) {
            self.states[l].extend_from_slice(&h[r * cols..(r + 1) * cols]);
        }
    }

    /// `d(x^ℓ, x^{ℓ+n})` averaged over windows, for every start `ℓ` in `0..=L−n`.
    pub fn distances(&self, n: usize, hidden: usize) -> Vec<f64> {
        (0..=self.n_layers.saturating_sub(n))
            .map(|l| {
                let (a, b) = (&self.states[l], &self.states[l + n]);
                row_sum(a, b, hidden, angular) / (a.len() / hidden).max(1) as f64
            })
            .collect()
    }
}

impl Observer for LastTokenObserver {
    fn block_input(&mut self, layer: usize, h: &[f32], rows: usize, cols: usize) {
        if layer < self.n_layers {
            self.keep(layer, h, rows, cols);
        }
    }
    fn block_output(&mut self, layer: usize, h: &[f32], rows: usize, cols: usize) {
        // Only the last block's output is a new boundary; the others are the next block's input.
        if layer + 1 == self.n_layers {
            self.keep(layer + 1, h, rows, cols);
        }
    }
}

/// Observer for the all-token angular distance of runs of `n` blocks: a ring of the `n + 1`
/// most recent block inputs (every token), compared as soon as the partner arrives.
#[derive(Debug)]
pub struct RunAngleObserver {
    pub n: usize,
    pub n_layers: usize,
    ring: Vec<Vec<f32>>,
    /// Boundary whose rows are arriving, and how many rows of it arrived.
    current: usize,
    cursor: usize,
    /// `(Σ distance, tokens)` per start `ℓ` in `0..=L−n`.
    pub sums: Vec<(f64, usize)>,
}

impl RunAngleObserver {
    pub fn new(n: usize, n_layers: usize) -> RunAngleObserver {
        RunAngleObserver {
            n,
            n_layers,
            ring: vec![Vec::new(); n + 1],
            current: usize::MAX,
            cursor: 0,
            sums: vec![(0.0, 0); n_layers + 1 - n.min(n_layers)],
        }
    }

    /// Mean distance per start `ℓ`.
    pub fn distances(&self) -> Vec<f64> {
        self.sums
            .iter()
            .map(|&(s, c)| s / c.max(1) as f64)
            .collect()
    }

    /// Rows of boundary `b` (input of block `b`) arriving.
    fn boundary(&mut self, b: usize, h: &[f32], rows: usize, cols: usize) {
        let k = self.n + 1;
        if self.current != b {
            self.current = b;
            self.cursor = 0;
            self.ring[b % k].clear();
        }
        let x = &h[..rows * cols];
        if b >= self.n {
            let start = b - self.n;
            let past = &self.ring[start % k][self.cursor * cols..(self.cursor + rows) * cols];
            self.sums[start].0 += row_sum(past, x, cols, angular);
            self.sums[start].1 += rows;
        }
        self.ring[b % k].extend_from_slice(x);
        self.cursor += rows;
    }
}

impl Observer for RunAngleObserver {
    fn block_input(&mut self, layer: usize, h: &[f32], rows: usize, cols: usize) {
        self.boundary(layer, h, rows, cols);
    }
    fn block_output(&mut self, layer: usize, h: &[f32], rows: usize, cols: usize) {
        if layer + 1 == self.n_layers {
            self.boundary(layer + 1, h, rows, cols);
        }
    }
}

/// Check an explicit list against `n_layers`.
fn check_list(list: &[usize], n_layers: usize) -> Result<()> {
    let mut seen = vec![false; n_layers];
    for &i in list {
        if i >= n_layers {
            return Err(Error::Invalid(format!(
                "depth pruning: block {i} does not exist (the model has {n_layers}, 0..={})",
                n_layers.saturating_sub(1)
            )));
        }
        if std::mem::replace(&mut seen[i], true) {
            return Err(Error::Invalid(format!(
                "depth pruning: block {i} is listed twice"
            )));
        }
    }
    if list.len() >= n_layers {
        return Err(Error::Invalid(format!(
            "depth pruning: removing {} of {n_layers} blocks would leave none",
            list.len()
        )));
    }
    Ok(())
}

/// ShortGPT Block Influence of every block of `model` on `calib` (lower: less needed); also
/// what a self-speculative draft skips first (`runtime::draft_search`).
pub fn block_influence(
    model: &Model,
    calib: &CalibSet,
    progress: Progress<'_>,
) -> Result<Vec<f64>> {
    let mut obs = BlockInfluenceObserver::default();
    observe_all(model, calib, &mut obs, progress)?;
    Ok(obs.scores())
}

/// Remove blocks from `model` as `spec` asks.
pub fn remove_layers(
    model: &mut Model,
    calib: &CalibSet,
    spec: &DepthSpec,
    progress: Progress<'_>,
) -> Result<StepDetails> {
    let n_layers = model.weights.layers.len();
    let d = model.config.hidden_size;
    let mut scores: Option<Vec<f64>> = None;
    let removed: Vec<usize> = match &spec.select {
        LayerSelection::List(list) => {
            check_list(list, n_layers)?;
            let mut l = list.clone();
            l.sort_unstable();
            l
        }
        LayerSelection::Count(n) => {
            let n = *n;
            if n >= n_layers {
                return Err(Error::Invalid(format!(
                    "depth pruning: removing {n} of {n_layers} blocks would leave none"
                )));
            }
            if n == 0 {
                Vec::new()
            } else {
                match spec.metric {
                    DepthMetric::BlockInfluence => {
                        let bi = block_influence(model, calib, progress)?;
                        let mut r: Vec<usize> = super::alloc::ascending(&bi)[..n].to_vec();
                        r.sort_unstable();
                        scores = Some(bi);
                        r
                    }
                    DepthMetric::Angular | DepthMetric::AngularAllTokens => {
                        let dist = if spec.metric == DepthMetric::Angular {
                            let mut obs = LastTokenObserver::new(calib.len, n_layers);
                            observe_all(model, calib, &mut obs, progress)?;
                            obs.distances(n, d)
                        } else {
                            let mut obs = RunAngleObserver::new(n, n_layers);
                            observe_all(model, calib, &mut obs, progress)?;
                            obs.distances()
                        };
                        super::alloc::check_finite(&dist, "depth pruning")?;
                        let start = super::alloc::ascending(&dist)[0];
                        scores = Some(dist);
                        (start..start + n).collect()
                    }
                }
            }
        }
    };
    let params_before = model.weights.num_params();
    let keep = super::surgery::complement(n_layers, &removed);
    let dense = spec.reconstruct.map(|_| model.clone());
    let old = std::mem::take(&mut model.weights.layers);
    model.weights.layers = old
        .into_iter()
        .enumerate()
        .filter(|(i, _)| removed.binary_search(i).is_err())
        .map(|(_, l)| l)
        .collect();
    // Gemma 3's sliding / global pattern follows the kept blocks.
    let pattern = std::mem::take(&mut model.config.family.sliding_layers);
    model.config.family.sliding_layers = pattern
        .into_iter()
        .enumerate()
        .filter(|(i, _)| removed.binary_search(i).is_err())
        .map(|(_, s)| s)
        .collect();
    sync_config(model);
    let reconstruction = match (spec.reconstruct, &dense) {
        (Some(opts), Some(dense)) => {
            match reconstruct(dense, model, &removed, calib, opts, progress) {
                Ok(r) => Some(r),
                Err(e) => {
                    // Errors leave the model untouched.
                    *model = dense.clone();
                    return Err(e);
                }
            }
        }
        _ => None,
    };
    Ok(json!({
        "step": "depth",
        "reconstruction": reconstruction,
        "metric": spec.metric,
        "select": spec.select,
        // BI per block, or the angular distance per run start.
        "scores": scores,
        "removed_layers": removed,
        "kept_layers": keep,
        "layers_before": n_layers,
        "layers_after": model.weights.layers.len(),
        "params_before": params_before,
        "params_after": model.weights.num_params(),
    }))
}

/// Let the block after each removed span absorb it ([`crate::recover::depth_fit`]).
fn reconstruct(
    dense: &Model,
    model: &mut Model,
    removed: &[usize],
    calib: &CalibSet,
    opts: crate::recover::ReconOptions,
    progress: Progress<'_>,
) -> Result<serde_json::Value> {
    let t = std::time::Instant::now();
    let sub = calib.first(opts.samples_of(calib.n));
    let fit = crate::recover::depth_fit::refit_after_removal(
        dense,
        model,
        removed,
        &sub,
        opts.damp,
        &mut |d, n| progress("reconstruction", d, n),
    )?;
    if !fit.fits.is_empty() {
        super::declare_bias(model, crate::LinearKind::O);
        super::declare_bias(model, crate::LinearKind::Down);
    }
    let n = fit.fits.len().max(1) as f64;
    let mean = |f: fn(&crate::recover::FitOutcome) -> f64| fit.fits.iter().map(f).sum::<f64>() / n;
    Ok(json!({
        "damping": opts.damp,
        "samples": sub.n,
        "seconds": t.elapsed().as_secs_f64(),
        "mean_rel_error_before": mean(|f| f.rel_error_before),
        "mean_rel_error_after": mean(|f| f.rel_error_after),
        "spans_at_end": fit.spans_at_end,
        "layers": fit.fits,
    }))
}
