//! Reconstruction after width pruning: re-fit the consumers of removed channels.
//!
//! Removing attention heads removes columns of o_proj; removing FFN neurons removes columns of
//! down_proj. FLAP's bias compensation puts the removed channels' mean contribution into a bias.
//! This generalises it: for every block, o_proj (or down_proj) is re-fitted by least squares on
//! its kept input channels plus a bias, so that on the pruned model's own inputs `X_p` it
//! reproduces the dense model's output `X_d W₀ᵀ + b₀` on the dense inputs (the same two-stream
//! idea as [`super::reconstruct`], so errors do not compound down the stack):
//!
//! `[W | b] = argmin ‖[X_p 1]·[W | b]ᵀ − X_d W₀ᵀ‖² + λ‖W − W_cur‖²` (damping towards the
//! current kept weights, not towards zero; see [`super::reconstruct`]), solved once per block from
//! `G = [X_p 1]ᵀ[X_p 1]` and `R = [X_p 1]ᵀ Y` with the target outputs `Y = X_d W₀ᵀ + b₀` (f64,
//! Cholesky; every row shares `G`, as a dense re-fit has no per-row mask). λ = damp × mean
//! diag(XᵀX), raised tenfold while the factorisation fails. Per block this costs three block
//! passes over the reconstruction samples (dense, pruned statistics, pruned propagation with
//! the re-fitted weights). [`Sums`] and [`solve`] take any target `Y`; layer removal
//! ([`super::depth_fit`]) passes residual targets.

use super::reconstruct::FitOutcome;
use crate::calibrate::runner::{run_layer, Pass, CHUNK_ROWS};
use crate::calibrate::CalibSet;
use crate::model::forward::{embed, Scratch};
use crate::model::names::tensor_name;
use crate::model::observer::{NoObserver, Observer, Site};
use crate::model::rope::Rope;
use crate::{Error, LinearKind, Model, Result, Tensor};
use faer::linalg::solvers::Solve;
use faer::{Mat, Side};

/// Captures the input of one site of one block for one chunk.
struct Grab {
    layer: usize,
    site: Site,
    propagate: bool,
    x: Vec<f32>,
    rows: usize,
}

impl Observer for Grab {
    fn wants_linear_inputs(&self, layer: usize) -> bool {
        layer == self.layer
    }
    fn wants_block_output(&self, _layer: usize) -> bool {
        self.propagate
    }
    fn linear_input(&mut self, layer: usize, site: Site, x: &[f32], rows: usize, cols: usize) {
        if layer == self.layer && site == self.site {
            self.x.clear();
            self.x.extend_from_slice(&x[..rows * cols]);
            self.rows = rows;
        }
    }
}

/// Sums of one block: `G = [X_p 1]ᵀ[X_p 1]` `[(cp+1)²]` (upper triangle until mirrored),
/// `R = [X_p 1]ᵀ Y` `[(cp+1), out]` for the target outputs `Y`, and the target energy `Σ‖Y‖²`
/// (for relative errors).
pub(crate) struct Sums {
    cp: usize,
    out: usize,
    g: Vec<f64>,
    r: Vec<f64>,
    energy: f64,
}

impl Sums {
    pub(crate) fn new(cp: usize, out: usize) -> Sums {
        Sums {
            cp,
            out,
            g: vec![0.0; (cp + 1) * (cp + 1)],
            r: vec![0.0; (cp + 1) * out],
            energy: 0.0,
        }
    }

    /// Add one chunk: inputs `xp` `[rows, cp]` and target outputs `y` `[rows, out]`.
    pub(crate) fn add(&mut self, xp: &[f32], y: &[f32], rows: usize) {
        let (cp, out) = (self.cp, self.out);
        let n = cp + 1;
        let mut buf = vec![0f32; cp * cp.max(out)];
        crate::kernels::gram_upper(xp, rows, cp, &mut buf);
        for i in 0..cp {
            for j in i..cp {
                self.g[i * n + j] += buf[i * cp + j] as f64;
            }
        }
        crate::kernels::cross_t(xp, y, rows, cp, out, &mut buf);
        for i in 0..cp {
            for j in 0..out {
                self.r[i * out + j] += buf[i * out + j] as f64;
            }
        }
        for t in 0..rows {
            for (j, &v) in xp[t * cp..(t + 1) * cp].iter().enumerate() {
                self.g[j * n + cp] += v as f64;
            }
            for (j, &v) in y[t * out..(t + 1) * out].iter().enumerate() {
                self.r[cp * out + j] += v as f64;
            }
        }
        self.g[cp * n + cp] += rows as f64;
        self.energy += y.iter().map(|&v| v as f64 * v as f64).sum::<f64>();
    }
}

/// Re-fit `kind` (o_proj or down_proj) of every block of `model` towards `dense`, which must
/// have the same layers, hidden size and embedding (a model before a heads or neurons step).
/// Returns each block's fit; the re-fitted linears get a bias.
pub fn refit_consumers(
    dense: &Model,
    model: &mut Model,
    calib: &CalibSet,
    kind: LinearKind,
    damp: f64,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Vec<FitOutcome>> {
    let site = match kind {
        LinearKind::O => Site::AttnOut,
        LinearKind::Down => Site::MlpDown,
        k => {
            return Err(Error::Invalid(format!(
                "width reconstruction re-fits o_proj or down_proj, not {k:?}"
            )))
        }
    };
    let n_layers = model.weights.layers.len();
    if dense.weights.layers.len() != n_layers
        || dense.config.hidden_size != model.config.hidden_size
    {
        return Err(Error::Invalid(
            "width reconstruction needs the model before the step (same layers and hidden size)"
                .into(),
        ));
    }
    let (n, len) = (calib.n, calib.len);
    let mut h_d = embed(&dense.weights, &calib.ids)?;
    let mut h_p = h_d.clone();
    let (rope_d, rope_p) = (Rope::new(&dense.config, len), Rope::new(&model.config, len));
    let width = len * model.config.hidden_size;
    let per = (CHUNK_ROWS / len.max(1)).max(1);
    let mut scratch = Scratch::default();
    let mut out = Vec::with_capacity(n_layers);
    for l in 0..n_layers {
        progress(l, n_layers);
        let w0 = dense.weights.layers[l].linear(kind);
        let (rows_out, cd) = (w0.out_features(), w0.in_features());
        let cp = model.weights.layers[l].linear(kind).in_features();
        let mut sums = Sums::new(cp, rows_out);
        let mut y0 = Vec::new();
        for s0 in (0..n).step_by(per) {
            let b = per.min(n - s0);
            let range = s0 * width..(s0 + b) * width;
            let mut gd = Grab {
                layer: l,
                site,
                propagate: true,
                x: Vec::new(),
                rows: 0,
            };
            let lw = &dense.weights.layers[l];
            run_layer(
                &dense.config,
                l,
                lw,
                &rope_d,
                &mut h_d[range.clone()],
                b,
                len,
                Pass::Propagate,
                &mut gd,
                &mut scratch,
            )?;
            let mut gp = Grab {
                layer: l,
                site,
                propagate: false,
                x: Vec::new(),
                rows: 0,
            };
            let lw = &model.weights.layers[l];
            run_layer(
                &model.config,
                l,
                lw,
                &rope_p,
                &mut h_p[range],
                b,
                len,
                Pass::Statistics,
                &mut gp,
                &mut scratch,
            )?;
            if gd.rows != gp.rows || gd.rows == 0 {
                return Err(Error::Invalid(format!(
                    "block {l}: width reconstruction saw {} dense and {} pruned rows",
                    gd.rows, gp.rows
                )));
            }
            y0.resize(gd.rows * rows_out, 0.0);
            crate::kernels::matmul_t(
                &gd.x,
                w0.weight.data(),
                &mut y0,
                gd.rows,
                cd,
                rows_out,
                false,
            );
            if let Some(b0) = &w0.bias {
                for r in y0.chunks_mut(rows_out) {
                    r.iter_mut().zip(b0.data()).for_each(|(v, &b)| *v += b);
                }
            }
            sums.add(&gp.x, &y0, gd.rows);
        }
        let name = tensor_name(l, kind);
        let lin = model.weights.layers[l].linear_mut(kind);
        out.push(solve(&sums, lin, damp, &name)?);
        let lw = &model.weights.layers[l];
        for s0 in (0..n).step_by(per) {
            let b = per.min(n - s0);
            let range = s0 * width..(s0 + b) * width;
            run_layer(
                &model.config,
                l,
                lw,
                &rope_p,
                &mut h_p[range],
                b,
                len,
                Pass::Propagate,
                &mut NoObserver,
                &mut scratch,
            )?;
        }
    }
    progress(n_layers, n_layers);
    Ok(out)
}

/// Solve for `[W | b]` and write them into `lin` (kept when the fit would raise the error).
pub(crate) fn solve(
    s: &Sums,
    lin: &mut crate::Linear,
    damp: f64,
    name: &str,
) -> Result<FitOutcome> {
    let (cp, rows, n) = (s.cp, s.out, s.cp + 1);
    let g = Mat::<f64>::from_fn(n, n, |i, j| s.g[i.min(j) * n + i.max(j)]);
    let mean_diag = (0..cp).map(|j| g[(j, j)]).sum::<f64>() / cp.max(1) as f64;
    // The right-hand side of the normal equations, [n, rows].
    let rhs = Mat::<f64>::from_fn(n, rows, |i, r| s.r[i * rows + r]);
    // Current weights as [n, rows] (bias last), for the error before.
    let cur = Mat::<f64>::from_fn(n, rows, |i, r| match i < cp {
        true => lin.weight.data()[r * cp + i] as f64,
        false => lin.bias.as_ref().map_or(0.0, |b| b.data()[r] as f64),
    });
    // ‖[X_p 1]·x − y‖² − ‖y‖² = xᵀGx − 2xᵀrhs, summed over rows.
    let q = |x: &Mat<f64>| -> f64 {
        let gx = &g * x;
        (0..rows)
            .map(|r| {
                (0..n)
                    .map(|i| x[(i, r)] * (gx[(i, r)] - 2.0 * rhs[(i, r)]))
                    .sum::<f64>()
            })
            .sum()
    };
    let before = q(&cur) + s.energy;
    let mut lambda = (damp * mean_diag).max(mean_diag * 1e-10);
    let mut fit = None;
    for _ in 0..8 {
        let mut a = g.clone();
        for j in 0..cp {
            a[(j, j)] += lambda;
        }
        if let Ok(llt) = a.llt(Side::Lower) {
            // Damping pulls the weights towards the current ones (not the bias, not to zero).
            let mut r = rhs.clone();
            for i in 0..cp {
                for c in 0..rows {
                    r[(i, c)] += lambda * cur[(i, c)];
                }
            }
            let x = llt.solve(&r);
            if (0..rows).all(|r| (0..n).all(|i| x[(i, r)].is_finite())) {
                fit = Some(x);
                break;
            }
        }
        lambda *= 10.0;
    }
    let Some(x) = fit else {
        return Err(Error::Numeric(format!(
            "{name}: width reconstruction failed (no finite solution even with damping {:.3e} x mean diag)",
            lambda / mean_diag.max(f64::MIN_POSITIVE)
        )));
    };
    let after = q(&x) + s.energy;
    if !after.is_finite() {
        return Err(Error::Numeric(format!(
            "{name}: NaN/Inf in the width reconstruction"
        )));
    }
    let energy = s.energy.max(f64::MIN_POSITIVE);
    let mut out = FitOutcome {
        name: name.to_string(),
        rel_error_before: before / energy,
        rel_error_after: before / energy,
        damping: lambda / mean_diag.max(f64::MIN_POSITIVE),
        rows_damped_more: usize::from(lambda > damp * mean_diag * (1.0 + 1e-9)) * rows,
        rows_kept: rows,
    };
    if after <= before {
        let w = lin.weight.data_mut();
        for r in 0..rows {
            for i in 0..cp {
                w[r * cp + i] = x[(i, r)] as f32;
            }
        }
        lin.bias = Some(Tensor::new(
            vec![rows],
            (0..rows).map(|r| x[(cp, r)] as f32).collect(),
        ));
        out.rel_error_after = after / energy;
        out.rows_kept = 0;
    }
    Ok(out)
}
