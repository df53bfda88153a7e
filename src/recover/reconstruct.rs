//! Block reconstruction: after a block is pruned, re-fit the surviving weights of each pruned
//! linear by least squares on the *pruned* model's own inputs, towards either the *dense*
//! model's output of that linear on the dense inputs (two activation streams, the issue's
//! design, [`ReconTarget::Dense`]) or the unpruned weights' output on the pruned inputs (one
//! stream, [`ReconTarget::Pruned`], the default since it is the one that helps on SmolLM2).
//! Attention and MLP linears each see the inputs their own pruned sublayer produces. With the
//! one-stream target `C` below is `G` and `X_dᵀX_d` is `G`.
//!
//! For a linear with dense weights `W`, pruned `Ŵ`, dense-stream input `X_d` and
//! pruned-stream input `X_p`, each row `r` solves, on its kept inputs `k` only (so every
//! sparsity pattern is kept exactly),
//!
//! `min ‖X_p,k ŵ_k − X_d w‖² + λ‖ŵ_k − w_k‖²`  ⇔  `(G_kk + λI) ŵ_k = (C w)_k + λ w_k`,
//!
//! with `G = X_pᵀX_p` and `C = X_pᵀX_d` summed over the (weighted) calibration tokens in f64,
//! `w_k` the row's current kept weights, and `λ = damp · mean diag(G)` (raised tenfold while
//! the Cholesky factorisation fails; the report says how far). The error
//! `ŵᵀGŵ − 2ŵᵀCw + wᵀ(X_dᵀX_d)w` is reported before and after relative to `wᵀ(X_dᵀX_d)w`; a row whose undamped error the solve would raise keeps its
//! weights. A NaN/Inf solution is an error naming the linear.
//!
//! **Token weighting and damping.** This model (like most LLMs) has massive activations: a few
//! tokens (the first of a window, some delimiters) carry inputs hundreds of times larger than
//! the rest in a few channels. Plain sums let those tokens own the fit, and the re-fit then
//! buys their error with everyone else's (measured: Wanda 50% went from perplexity 34 to 8,376
//! on a 16-sample check). So each token is weighted by `1/rms(x_d,t)²`, making every token's
//! *relative* error count the same, and the damping pulls towards the current weights
//! (`(G_kk + λI) ŵ_k = (C w)_k + λ w_k`), never towards zero (ridge towards zero shrank whole
//! rows: perplexity 25,000). Reported errors use the same weighting. Even so, the two-stream
//! target made the model worse on SmolLM2 (Wanda 50%, 16-sample check: 34.2 → 325), while the
//! one-stream target `X_p w` ([`ReconTarget::Pruned`], the default) improved it (→ 30.7).
//!
//! The statistics come from one paired pass per round ([`collect`]): for each chunk of
//! calibration samples the dense block runs on the dense stream while its linear inputs are
//! captured, then the pruned block runs on the pruned stream and every site's `G`, `C` and
//! `X_dᵀX_d` are accumulated. The last round's dense run also advances the dense stream.

use crate::calibrate::runner::{run_layer, Pass, CHUNK_ROWS};
use crate::model::forward::Scratch;
use crate::model::names::tensor_name;
use crate::model::observer::{Observer, Site};
use crate::model::rope::Rope;
use crate::{Config, Error, LayerWeights, LinearKind, Result, Tensor};
use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, Par, Side};
use rayon::prelude::*;
use serde::Serialize;
use std::collections::HashMap;

pub use crate::kernels::{cross_t, cross_t_naive};

/// Reconstruction statistics of one linear input, summed over calibration tokens in f64.
#[derive(Debug, Clone)]
pub struct ReconStats {
    pub cols: usize,
    pub tokens: usize,
    /// `X_pᵀX_p`, `[cols, cols]`, full (symmetric) after [`ReconStats::finish`].
    pub gp: Vec<f64>,
    /// `X_pᵀX_d`, `[cols, cols]`.
    pub cross: Vec<f64>,
    /// `X_dᵀX_d`, full after [`ReconStats::finish`].
    pub gd: Vec<f64>,
}

impl ReconStats {
    fn new(cols: usize) -> ReconStats {
        ReconStats {
            cols,
            tokens: 0,
            gp: vec![0.0; cols * cols],
            cross: vec![0.0; cols * cols],
            gd: vec![0.0; cols * cols],
        }
    }

    /// Statistics from full matrices computed elsewhere (tests, tools).
    pub fn from_parts(cols: usize, gp: Vec<f64>, cross: Vec<f64>, gd: Vec<f64>) -> ReconStats {
        ReconStats {
            cols,
            tokens: 0,
            gp,
            cross,
            gd,
        }
    }

    /// Add one chunk: `xp`, `xd` are `[rows, cols]`; `buf` is scratch. Each token is weighted
    /// by `1 / rms(x_d,t)²` (see the module docs): both rows are scaled by `1 / rms(x_d,t)`.
    fn add(&mut self, xp: &[f32], xd: &[f32], rows: usize, buf: &mut Vec<f32>) {
        let c = self.cols;
        let (mut sp, mut sd) = (xp[..rows * c].to_vec(), xd[..rows * c].to_vec());
        for (rp, rd) in sp.chunks_mut(c).zip(sd.chunks_mut(c)) {
            let ms = rd.iter().map(|v| v * v).sum::<f32>() / c as f32;
            let s = if ms > 0.0 { 1.0 / ms.sqrt() } else { 0.0 };
            rp.iter_mut().for_each(|v| *v *= s);
            rd.iter_mut().for_each(|v| *v *= s);
        }
        let (xp, xd) = (&sp[..], &sd[..]);
        buf.clear();
        buf.resize(c * c, 0.0);
        crate::kernels::gram_upper(xp, rows, c, buf);
        add_upper(&mut self.gp, buf, c);
        crate::kernels::gram_upper(xd, rows, c, buf);
        add_upper(&mut self.gd, buf, c);
        cross_t(xp, xd, rows, c, c, buf);
        for (a, &b) in self.cross.iter_mut().zip(buf.iter()) {
            *a += b as f64;
        }
        self.tokens += rows;
    }

    /// One stream: the target becomes `X_p w` (`C = X_dᵀX_d = X_pᵀX_p`).
    pub fn use_pruned_target(&mut self) {
        self.cross = self.gp.clone();
        self.gd = self.gp.clone();
    }

    /// Mirror the upper triangles of the Gram matrices.
    fn finish(&mut self) {
        let c = self.cols;
        for m in [&mut self.gp, &mut self.gd] {
            for i in 0..c {
                for j in 0..i {
                    m[i * c + j] = m[j * c + i];
                }
            }
        }
    }
}

fn add_upper(acc: &mut [f64], g: &[f32], c: usize) {
    acc.par_chunks_mut(c)
        .zip(g.par_chunks(c))
        .enumerate()
        .for_each(|(i, (a, gr))| {
            for j in i..c {
                a[j] += gr[j] as f64;
            }
        });
}

/// Captures one chunk's linear inputs of block `layer` (the dense run).
struct Capture {
    layer: usize,
    full: bool,
    x: HashMap<Site, (Vec<f32>, usize)>,
}

impl Observer for Capture {
    fn wants_linear_inputs(&self, layer: usize) -> bool {
        layer == self.layer
    }
    fn wants_block_output(&self, _layer: usize) -> bool {
        self.full
    }
    fn linear_input(&mut self, layer: usize, site: Site, x: &[f32], rows: usize, cols: usize) {
        if layer == self.layer {
            let e = self.x.entry(site).or_default();
            e.0.clear();
            e.0.extend_from_slice(&x[..rows * cols]);
            e.1 = rows;
        }
    }
}

/// Accumulates [`ReconStats`] from the pruned run against the captured dense inputs.
struct Pair<'a> {
    layer: usize,
    dense: &'a HashMap<Site, (Vec<f32>, usize)>,
    acc: &'a mut HashMap<Site, ReconStats>,
    buf: Vec<f32>,
}

impl Observer for Pair<'_> {
    fn wants_linear_inputs(&self, layer: usize) -> bool {
        layer == self.layer
    }
    fn wants_block_output(&self, _layer: usize) -> bool {
        false
    }
    fn linear_input(&mut self, layer: usize, site: Site, x: &[f32], rows: usize, cols: usize) {
        if layer != self.layer {
            return;
        }
        let Some((xd, dr)) = self.dense.get(&site) else {
            return;
        };
        debug_assert_eq!(*dr, rows, "dense and pruned chunks differ");
        self.acc
            .entry(site)
            .or_insert_with(|| ReconStats::new(cols))
            .add(x, xd, rows, &mut self.buf);
    }
}

/// One paired pass over block `layer`: the dense block `dense` on `h_d` (advanced in place
/// when `advance`), the pruned block `pruned` on `h_p` (left unchanged). `n` samples of `len`.
#[allow(clippy::too_many_arguments)]
pub fn collect(
    cfg: &Config,
    layer: usize,
    dense: &LayerWeights,
    pruned: &LayerWeights,
    rope: &Rope,
    h_d: &mut [f32],
    h_p: &mut [f32],
    n: usize,
    len: usize,
    advance: bool,
) -> Result<HashMap<Site, ReconStats>> {
    let width = len * cfg.hidden_size;
    let per = (CHUNK_ROWS / len.max(1)).max(1);
    let mut scratch = Scratch::default();
    let mut cap = Capture {
        layer,
        full: advance,
        x: HashMap::new(),
    };
    let mut acc = HashMap::new();
    let mut buf = Vec::new();
    for s0 in (0..n).step_by(per) {
        let b = per.min(n - s0);
        let range = s0 * width..(s0 + b) * width;
        run_layer(
            cfg,
            layer,
            dense,
            rope,
            &mut h_d[range.clone()],
            b,
            len,
            if advance {
                Pass::Propagate
            } else {
                Pass::Statistics
            },
            &mut cap,
            &mut scratch,
        )?;
        let mut pair = Pair {
            layer,
            dense: &cap.x,
            acc: &mut acc,
            buf: std::mem::take(&mut buf),
        };
        run_layer(
            cfg,
            layer,
            pruned,
            rope,
            &mut h_p[range],
            b,
            len,
            Pass::Statistics,
            &mut pair,
            &mut scratch,
        )?;
        buf = pair.buf;
    }
    for s in acc.values_mut() {
        s.finish();
    }
    Ok(acc)
}

/// What re-fitting one linear did.
#[derive(Debug, Clone, Serialize)]
pub struct FitOutcome {
    pub name: String,
    /// Output error relative to the dense output's energy, before and after the re-fit.
    pub rel_error_before: f64,
    pub rel_error_after: f64,
    /// Largest damping used, relative to the mean of diag(G) (the option's value unless a
    /// badly conditioned row needed more).
    pub damping: f64,
    /// Rows that needed more damping than asked for.
    pub rows_damped_more: usize,
    /// Rows whose re-fit would have raised the (undamped) error, left as they were.
    pub rows_kept: usize,
}

/// Re-fit the kept (nonzero) weights of `w` (`[rows, cols]`) towards dense weights `w0` with
/// statistics `st`, damping `damp`. `name` labels errors and the outcome.
pub fn refit(
    w: &mut [f32],
    w0: &[f32],
    rows: usize,
    cols: usize,
    st: &ReconStats,
    damp: f64,
    name: &str,
) -> Result<FitOutcome> {
    let c = cols;
    let mean_diag = (0..c).map(|j| st.gp[j * c + j]).sum::<f64>() / c.max(1) as f64;
    let w0m = Mat::<f64>::from_fn(rows, c, |r, j| w0[r * c + j] as f64);
    // b = W0·Cᵀ (row r: C·w0_r), e = W0·G_d (row r dotted with w0_r: the dense energy).
    let ct = Mat::<f64>::from_fn(c, c, |i, j| st.cross[j * c + i]);
    let gd = Mat::<f64>::from_fn(c, c, |i, j| st.gd[i * c + j]);
    let mut b = Mat::<f64>::zeros(rows, c);
    let mut e = Mat::<f64>::zeros(rows, c);
    matmul(
        b.as_mut(),
        Accum::Replace,
        w0m.as_ref(),
        ct.as_ref(),
        1.0,
        Par::rayon(0),
    );
    matmul(
        e.as_mut(),
        Accum::Replace,
        w0m.as_ref(),
        gd.as_ref(),
        1.0,
        Par::rayon(0),
    );
    drop((ct, gd));
    let g = &st.gp;
    let results: Vec<Result<RowFit>> = w
        .par_chunks_mut(c)
        .zip(w0.par_chunks(c))
        .enumerate()
        .map(|(r, (wr, w0r))| {
            let energy: f64 = (0..c).map(|j| e[(r, j)] * w0r[j] as f64).sum();
            let br: Vec<f64> = (0..c).map(|j| b[(r, j)]).collect();
            fit_row(wr, g, &br, energy, c, damp * mean_diag, mean_diag, name, r)
        })
        .collect();
    let mut out = FitOutcome {
        name: name.to_string(),
        rel_error_before: 0.0,
        rel_error_after: 0.0,
        damping: damp,
        rows_damped_more: 0,
        rows_kept: 0,
    };
    let (mut eb, mut ea, mut en) = (0.0, 0.0, 0.0);
    for r in results {
        let r = r?;
        eb += r.before;
        ea += r.after;
        en += r.energy;
        if r.lambda_rel > damp * (1.0 + 1e-9) {
            out.rows_damped_more += 1;
            out.damping = out.damping.max(r.lambda_rel);
        }
        out.rows_kept += r.kept as usize;
    }
    out.rel_error_before = eb / en.max(f64::MIN_POSITIVE);
    out.rel_error_after = ea / en.max(f64::MIN_POSITIVE);
    Ok(out)
}

struct RowFit {
    before: f64,
    after: f64,
    energy: f64,
    lambda_rel: f64,
    kept: bool,
}

/// Solve one row on its kept inputs (see the module docs).
#[allow(clippy::too_many_arguments)]
fn fit_row(
    wr: &mut [f32],
    g: &[f64],
    b: &[f64],
    energy: f64,
    c: usize,
    lambda0: f64,
    mean_diag: f64,
    name: &str,
    r: usize,
) -> Result<RowFit> {
    let k: Vec<usize> = (0..c).filter(|&j| wr[j] != 0.0).collect();
    let old: Vec<f64> = k.iter().map(|&j| wr[j] as f64).collect();
    let err = |x: &[f64]| -> f64 {
        let mut q = 0.0;
        for (a, &i) in k.iter().enumerate() {
            let gi = &g[i * c..(i + 1) * c];
            let s: f64 = k.iter().zip(x).map(|(&j, &xj)| gi[j] * xj).sum();
            q += x[a] * (s - 2.0 * b[i]);
        }
        q + energy
    };
    let before = err(&old);
    let mut fit = RowFit {
        before,
        after: before,
        energy,
        lambda_rel: lambda0 / mean_diag.max(f64::MIN_POSITIVE),
        kept: true,
    };
    if k.is_empty() || mean_diag <= 0.0 {
        return Ok(fit);
    }
    // Damping rel·mean(diag G) on every kept channel plus a tiny floor; when the factorisation
    // fails, rel grows tenfold and the floor becomes rel·mean(diag G).
    let mut rel = lambda0 / mean_diag;
    let mut floor = mean_diag * 1e-10;
    let mut solved = None;
    for _ in 0..8 {
        let d = vec![rel * mean_diag + floor; k.len()];
        let a = Mat::<f64>::from_fn(k.len(), k.len(), |p, q| {
            g[k[p] * c + k[q]] + if p == q { d[p] } else { 0.0 }
        });
        if let Ok(llt) = a.llt(Side::Lower) {
            // Damping pulls towards the current weights, not towards zero.
            let rhs: Vec<f64> = (0..k.len()).map(|p| b[k[p]] + d[p] * old[p]).collect();
            let x = chol_solve(llt.L(), &rhs);
            if x.iter().all(|v| v.is_finite()) {
                solved = Some(x);
                break;
            }
        }
        rel = (rel * 10.0).max(1e-6);
        floor = rel * mean_diag;
    }
    let Some(x) = solved else {
        return Err(Error::Numeric(format!(
            "{name}: reconstruction of row {r} failed (no finite solution even with damping {:.3e} x mean diag)",
            rel
        )));
    };
    fit.lambda_rel = rel;
    let after = err(&x);
    if !after.is_finite() {
        return Err(Error::Numeric(format!(
            "{name}: NaN/Inf in the reconstruction of row {r}"
        )));
    }
    if after <= before {
        for (&j, &v) in k.iter().zip(&x) {
            wr[j] = v as f32;
        }
        if k.iter().any(|&j| !wr[j].is_finite()) {
            return Err(Error::Numeric(format!(
                "{name}: row {r} does not fit in f32 after reconstruction"
            )));
        }
        fit.after = after;
        fit.kept = false;
    }
    Ok(fit)
}

/// Solve `L Lᵀ x = b` by substitution.
fn chol_solve(l: faer::MatRef<'_, f64>, b: &[f64]) -> Vec<f64> {
    let n = b.len();
    let mut y = b.to_vec();
    for i in 0..n {
        let mut s = y[i];
        for j in 0..i {
            s -= l[(i, j)] * y[j];
        }
        y[i] = s / l[(i, i)];
    }
    for i in (0..n).rev() {
        let mut s = y[i];
        for j in i + 1..n {
            s -= l[(j, i)] * y[j];
        }
        y[i] = s / l[(i, i)];
    }
    y
}

/// Reference for [`refit`]'s solution of one row: the damped normal equations on the kept
/// inputs solved by Gaussian elimination with partial pivoting.
pub fn refit_row_naive(wr: &[f32], w0r: &[f32], st: &ReconStats, damp: f64) -> Vec<f32> {
    let c = st.cols;
    let mean_diag = (0..c).map(|j| st.gp[j * c + j]).sum::<f64>() / c as f64;
    let k: Vec<usize> = (0..c).filter(|&j| wr[j] != 0.0).collect();
    let n = k.len();
    let mut a: Vec<Vec<f64>> = (0..n)
        .map(|p| {
            let mut row: Vec<f64> = (0..n).map(|q| st.gp[k[p] * c + k[q]]).collect();
            let d = damp * mean_diag + mean_diag * 1e-10;
            row[p] += d;
            let rhs: f64 = (0..c)
                .map(|j| st.cross[k[p] * c + j] * w0r[j] as f64)
                .sum::<f64>()
                + d * wr[k[p]] as f64;
            row.push(rhs);
            row
        })
        .collect();
    for col in 0..n {
        let piv = (col..n)
            .max_by(|&x, &y| a[x][col].abs().total_cmp(&a[y][col].abs()))
            .unwrap_or(col);
        a.swap(col, piv);
        for r in 0..n {
            if r != col {
                let f = a[r][col] / a[col][col];
                let pivot = a[col].clone();
                for (x, p) in a[r][col..].iter_mut().zip(&pivot[col..]) {
                    *x -= f * p;
                }
            }
        }
    }
    let mut out = vec![0f32; c];
    for (p, &j) in k.iter().enumerate() {
        out[j] = (a[p][n] / a[p][p]) as f32;
    }
    out
}

/// An owned copy of `lw`'s linear weights (the dense reference while the block is pruned).
pub fn dense_copy(lw: &LayerWeights) -> LayerWeights {
    let mut d = lw.clone();
    for k in LinearKind::ALL {
        let lin = d.linear_mut(k);
        lin.weight = Tensor::new(lin.weight.shape.clone(), lin.weight.data().to_vec());
    }
    d
}

/// What a re-fitted linear reproduces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReconTarget {
    /// The dense model's output on the dense inputs, `X_d w` (two streams). On SmolLM2 this
    /// made Wanda 50% far worse (see docs/recovery.md), so it is not the default.
    Dense,
    /// The unpruned weights' output on the pruned model's own inputs, `X_p w` (one stream, the
    /// objective SparseGPT approximates, here solved exactly per row): the default.
    #[default]
    Pruned,
}

/// Options of reconstruction (block, width and low-rank).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, serde::Deserialize)]
pub struct ReconOptions {
    /// Damping relative to the mean of diag(XᵀX).
    pub damp: f64,
    /// Paired passes and re-fits per block (later rounds see the earlier re-fits' outputs).
    pub rounds: usize,
    /// Calibration samples the re-fit uses (the first ones; 0 = all). The dense stream holds
    /// only these, and the paired passes, statistics and their cost scale with them.
    pub samples: usize,
    /// The target of sparse and low-rank re-fits (width and layer re-fits always use the dense
    /// model's outputs).
    #[serde(default)]
    pub target: ReconTarget,
}

impl ReconOptions {
    /// Samples used out of `n` calibration samples.
    pub fn samples_of(&self, n: usize) -> usize {
        if self.samples == 0 {
            n
        } else {
            self.samples.min(n)
        }
    }
}

impl Default for ReconOptions {
    fn default() -> Self {
        ReconOptions {
            damp: 0.01,
            rounds: 1,
            samples: 32,
            target: ReconTarget::Pruned,
        }
    }
}

/// What [`reconstruct_block`] did: one outcome per linear, and where the time went.
#[derive(Debug, Clone, Default)]
pub struct BlockFit {
    pub fits: Vec<FitOutcome>,
    /// Paired passes and statistics.
    pub seconds_collect: f64,
    /// Solves.
    pub seconds_solve: f64,
}

/// Reconstruct block `layer`: `pruned`'s linears in `kinds` are re-fitted towards `dense`.
/// Advances the dense stream `h_d` through the dense block; `h_p` is left unchanged.
#[allow(clippy::too_many_arguments)]
pub fn reconstruct_block(
    cfg: &Config,
    layer: usize,
    dense: &LayerWeights,
    pruned: &mut LayerWeights,
    kinds: &[LinearKind],
    rope: &Rope,
    h_d: &mut [f32],
    h_p: &mut [f32],
    n: usize,
    len: usize,
    opts: ReconOptions,
) -> Result<BlockFit> {
    let rounds = opts.rounds.max(1);
    let mut bf = BlockFit::default();
    let out = &mut bf.fits;
    for round in 0..rounds {
        let last = round + 1 == rounds;
        let t = std::time::Instant::now();
        let mut stats = collect(cfg, layer, dense, pruned, rope, h_d, h_p, n, len, last)?;
        if opts.target == ReconTarget::Pruned {
            stats.values_mut().for_each(ReconStats::use_pruned_target);
        }
        bf.seconds_collect += t.elapsed().as_secs_f64();
        let t = std::time::Instant::now();
        for &kind in kinds {
            let Some(st) = stats.get(&Site::of(kind)) else {
                continue;
            };
            let name = tensor_name(layer, kind);
            let w0 = dense.linear(kind).weight.data();
            let lin = pruned.linear_mut(kind);
            let (rows, cols) = (lin.out_features(), lin.in_features());
            let fit = refit(lin.weight.data_mut(), w0, rows, cols, st, opts.damp, &name)?;
            match out.iter_mut().find(|f| f.name == fit.name) {
                // Later rounds: keep the first "before", report the last "after".
                Some(f) => {
                    f.rel_error_after = fit.rel_error_after;
                    f.damping = f.damping.max(fit.damping);
                    f.rows_damped_more = f.rows_damped_more.max(fit.rows_damped_more);
                    f.rows_kept = fit.rows_kept;
                }
                None => out.push(fit),
            }
        }
        bf.seconds_solve += t.elapsed().as_secs_f64();
    }
    Ok(bf)
}
