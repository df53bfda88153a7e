//! Reconstruction after layer removal: the block right after each removed span absorbs it.
//!
//! Removing blocks `a..b` drops their contribution `Δ` to the residual stream, and every later
//! block sees the difference. The "neighbouring block re-fit": block `b` (the first
//! kept block after the span) re-fits its two residual writers, o_proj and down_proj, each with
//! a bias, by least squares so that on the pruned model's own stream the residual after each
//! half of block `b` matches the dense model's (the two-stream idea of [`super::reconstruct`]):
//!
//! - o_proj: `[X_o 1]·[W_o | b_o]ᵀ ≈ h_d,mid − h_p,in` (the dense stream after block `b`'s
//!   attention, minus the pruned stream entering block `b`);
//! - down_proj, after the new o_proj: `[X_down 1]·[W_down | b_down]ᵀ ≈ h_d,out − h_p,mid`.
//!
//! With no span removed this reduces to reproducing the block's own outputs. The fits use
//! [`super::width`]'s shared-Gram solver (all rows share `G`; the fit is kept only when it lowers
//! the error). Cost: the dense model up to the last re-fitted block runs once over the
//! reconstruction samples, the pruned one once plus two statistics passes per re-fitted block.
//! A span at the end of the model has no block after it and is left as it is (reported).
//!
//! This keeps the model a plain HF model (a bias on o_proj and down_proj); a separate linear
//! replacement map would need a new block type that transformers and llama.cpp cannot load.

use super::reconstruct::FitOutcome;
use super::width::{solve, Sums};
use crate::calibrate::runner::{run_layer, Pass, CHUNK_ROWS};
use crate::calibrate::CalibSet;
use crate::model::forward::{embed, Scratch};
use crate::model::names::tensor_name;
use crate::model::observer::{NoObserver, Observer, Site};
use crate::model::rope::Rope;
use crate::{Error, LinearKind, Model, Result};

/// Captures one chunk's input of one site and the residual after attention.
struct Grab {
    layer: usize,
    site: Option<Site>,
    x: Vec<f32>,
    mid: Vec<f32>,
}

impl Grab {
    fn new(layer: usize, site: Option<Site>) -> Grab {
        Grab {
            layer,
            site,
            x: Vec::new(),
            mid: Vec::new(),
        }
    }
}

impl Observer for Grab {
    fn wants_linear_inputs(&self, layer: usize) -> bool {
        layer == self.layer && self.site.is_some()
    }
    fn wants_block_output(&self, _layer: usize) -> bool {
        false
    }
    fn linear_input(&mut self, layer: usize, site: Site, x: &[f32], rows: usize, cols: usize) {
        if layer == self.layer && Some(site) == self.site {
            self.x.clear();
            self.x.extend_from_slice(&x[..rows * cols]);
        }
    }
    fn attn_residual(&mut self, layer: usize, h: &[f32], rows: usize, cols: usize) {
        if layer == self.layer {
            self.mid.clear();
            self.mid.extend_from_slice(&h[..rows * cols]);
        }
    }
}

/// What [`refit_after_removal`] did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct DepthFit {
    /// One outcome per re-fitted linear (named by its index in the pruned model).
    pub fits: Vec<FitOutcome>,
    /// Removed spans `[start, end)` (original indices) with no block after them.
    pub spans_at_end: Vec<(usize, usize)>,
}

/// Re-fit, in `model` (= `dense` with the blocks `removed` taken out, ascending original
/// indices), the block after each removed span; `calib` are the reconstruction samples.
pub fn refit_after_removal(
    dense: &Model,
    model: &mut Model,
    removed: &[usize],
    calib: &CalibSet,
    damp: f64,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<DepthFit> {
    let n_orig = dense.weights.layers.len();
    if model.weights.layers.len() + removed.len() != n_orig {
        return Err(Error::Invalid(
            "layer-removal reconstruction needs the model before the step".into(),
        ));
    }
    let gone = |i: usize| removed.binary_search(&i).is_ok();
    let mut out = DepthFit::default();
    // Re-fitted blocks: the first kept block after each span.
    let mut targets = Vec::new();
    let mut i = 0;
    while i < n_orig {
        if gone(i) {
            let start = i;
            while i < n_orig && gone(i) {
                i += 1;
            }
            if i == n_orig {
                out.spans_at_end.push((start, i));
            } else {
                targets.push(i);
            }
        } else {
            i += 1;
        }
    }
    let Some(&last) = targets.last() else {
        return Ok(out);
    };
    let (n, len) = (calib.n, calib.len);
    let mut h_d = embed(&dense.weights, &calib.ids)?;
    let mut h_p = h_d.clone();
    let rope = Rope::new(&dense.config, len);
    let width = len * dense.config.hidden_size;
    let per = (CHUNK_ROWS / len.max(1)).max(1);
    let mut scratch = Scratch::default();
    let mut k = 0; // index in the pruned model
    for i in 0..=last {
        progress(i, last + 1);
        let dl = &dense.weights.layers[i];
        if targets.contains(&i) {
            out.fits.extend(refit_block(
                dense,
                model,
                i,
                k,
                &rope,
                (&mut h_d, &mut h_p),
                (n, len, per, width),
                damp,
                &mut scratch,
            )?);
        } else {
            // Removed blocks and plain kept blocks: the dense stream just moves on.
            let o = &mut NoObserver;
            run_layer(
                &dense.config,
                i,
                dl,
                &rope,
                &mut h_d,
                n,
                len,
                Pass::Propagate,
                o,
                &mut scratch,
            )?;
        }
        if gone(i) {
            continue;
        }
        let pl = &model.weights.layers[k];
        run_layer(
            &model.config,
            k,
            pl,
            &rope,
            &mut h_p,
            n,
            len,
            Pass::Propagate,
            &mut NoObserver,
            &mut scratch,
        )?;
        k += 1;
    }
    progress(last + 1, last + 1);
    Ok(out)
}

/// Re-fit o_proj then down_proj of pruned block `k` (dense block `i`); advances `h_d` through
/// dense block `i` and leaves `h_p` at block `k`'s input.
#[allow(clippy::too_many_arguments)]
fn refit_block(
    dense: &Model,
    model: &mut Model,
    i: usize,
    k: usize,
    rope: &Rope,
    (h_d, h_p): (&mut [f32], &mut [f32]),
    (n, len, per, width): (usize, usize, usize, usize),
    damp: f64,
    scratch: &mut Scratch,
) -> Result<Vec<FitOutcome>> {
    let d = dense.config.hidden_size;
    let dl = &dense.weights.layers[i];
    let mut fits = Vec::new();
    for (kind, site) in [
        (LinearKind::O, Site::AttnOut),
        (LinearKind::Down, Site::MlpDown),
    ] {
        let cp = model.weights.layers[k].linear(kind).in_features();
        let mut sums = Sums::new(cp, d);
        let mut y = Vec::new();
        for s0 in (0..n).step_by(per) {
            let b = per.min(n - s0);
            let range = s0 * width..(s0 + b) * width;
            let mut gd = Grab::new(i, None);
            let pass = match kind {
                // o_proj's target needs the dense residual after attention only.
                LinearKind::O => Pass::Statistics,
                // down_proj's target is the dense block output: advance the dense stream.
                _ => Pass::Propagate,
            };
            let hd = &mut h_d[range.clone()];
            run_layer(
                &dense.config,
                i,
                dl,
                rope,
                hd,
                b,
                len,
                pass,
                &mut gd,
                scratch,
            )?;
            let mut gp = Grab::new(k, Some(site));
            let pl = &model.weights.layers[k];
            let hp = &mut h_p[range.clone()];
            run_layer(
                &model.config,
                k,
                pl,
                rope,
                hp,
                b,
                len,
                Pass::Statistics,
                &mut gp,
                scratch,
            )?;
            let rows = b * len;
            if gp.x.len() != rows * cp || gp.mid.len() != rows * d {
                return Err(Error::Invalid(format!(
                    "block {k}: layer-removal reconstruction captured an unexpected shape"
                )));
            }
            // Target: what this half must add to the pruned residual to reach the dense one.
            y.clear();
            match kind {
                LinearKind::O => y.extend(gd.mid.iter().zip(&h_p[range]).map(|(a, b)| a - b)),
                _ => y.extend(h_d[range].iter().zip(&gp.mid).map(|(a, b)| a - b)),
            }
            sums.add(&gp.x, &y, rows);
        }
        let name = tensor_name(k, kind);
        let lin = model.weights.layers[k].linear_mut(kind);
        fits.push(solve(&sums, lin, damp, &name)?);
    }
    Ok(fits)
}
