//! Reconstruction of low-rank factors: after a linear is factorised (`W₀ ≈ U·V`), re-fit the
//! factors so that on the pruned model's own inputs `X_p` the layer reproduces the dense model's
//! output on the dense inputs `X_d` (the two-stream idea of [`super::reconstruct`]).
//!
//! The problem `min_{rank M ≤ r} ‖X_p Mᵀ − X_d W₀ᵀ‖²_F` is reduced-rank regression, and it has a
//! closed form, so no alternating least squares is needed. With `G = X_pᵀX_p + λI = S Sᵀ`
//! (Cholesky) and `B = W₀ Cᵀ`, `C = X_pᵀX_d`, the (undamped) objective is `‖(M − B G⁻¹) S‖²_F` plus a
//! constant, so the best rank-r `M` is the truncated SVD of `T = B G⁻¹ S = B S⁻ᵀ` mapped back:
//! `M = U_r Σ_r V_rᵀ S⁻¹`, stored as `U_r √Σ_r` and `√Σ_r V_rᵀ S⁻¹` like SVD-LLM's factors.
//! Damping `λ = damp · mean diag G` pulls towards `W₀` rather than zero (`B` becomes `B + λW₀`,
//! see [`super::reconstruct`] for why). When the two streams coincide (`C = G`),
//! `B + λW₀ = W₀(G + λI)`, so `T = W₀ S` and this is exactly SVD-LLM's (damped) whitened
//! truncation (Wang et al. 2024, §3.1); with the pruned stream it also corrects the drift that
//! earlier compressed blocks put into this block's inputs.
//!
//! The rank is kept; the re-fit is kept only when it lowers the (undamped) output error, which
//! is reported before and after relative to the dense output energy.

use super::reconstruct::{FitOutcome, ReconStats};
use crate::{Error, Result};
use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, Par, Side};

/// Output error `‖X_p Mᵀ − X_d W₀ᵀ‖²` of `M = U·V` from the statistics: `tr(M G Mᵀ) −
/// 2 tr(M Bᵀ) + E` with the undamped `G`. `m` is `[out, in]`, `b` is `B`.
fn output_error(m: &Mat<f64>, g: &Mat<f64>, b: &Mat<f64>, energy: f64) -> f64 {
    let mg = m * g;
    let (out, inp) = (m.nrows(), m.ncols());
    let mut q = 0.0;
    for i in 0..out {
        for j in 0..inp {
            q += m[(i, j)] * (mg[(i, j)] - 2.0 * b[(i, j)]);
        }
    }
    q + energy
}

/// Re-fit the factors `u` (`[out, r]`) and `v` (`[r, inp]`) of a low-rank linear whose dense
/// weights were `w0` (`[out, inp]`), from the two-stream statistics `st`, damping `damp`
/// (relative to mean diag `X_pᵀX_p`). The factors change only when the error falls.
#[allow(clippy::too_many_arguments)]
pub fn refit_factors(
    u: &mut [f32],
    v: &mut [f32],
    w0: &[f32],
    out: usize,
    inp: usize,
    st: &ReconStats,
    damp: f64,
    name: &str,
) -> Result<FitOutcome> {
    let numeric = |m: String| Error::Numeric(format!("{name}: {m}"));
    let r = u.len() / out.max(1);
    if st.cols != inp || u.len() != out * r || v.len() != r * inp || w0.len() != out * inp {
        return Err(Error::Invalid(format!(
            "{name}: low-rank reconstruction got mismatched shapes"
        )));
    }
    let c = inp;
    let g = Mat::<f64>::from_fn(c, c, |i, j| st.gp[i * c + j]);
    let w0m = Mat::<f64>::from_fn(out, c, |i, j| w0[i * c + j] as f64);
    // B = W₀·Cᵀ, Cᵀ[i][j] = cross[j][i].
    let ct = Mat::<f64>::from_fn(c, c, |i, j| st.cross[j * c + i]);
    let mut b = Mat::<f64>::zeros(out, c);
    matmul(
        b.as_mut(),
        Accum::Replace,
        w0m.as_ref(),
        ct.as_ref(),
        1.0,
        Par::rayon(0),
    );
    drop(ct);
    let gd = Mat::<f64>::from_fn(c, c, |i, j| st.gd[i * c + j]);
    let energy = {
        let e = &w0m * &gd;
        (0..out)
            .map(|i| (0..c).map(|j| e[(i, j)] * w0m[(i, j)]).sum::<f64>())
            .sum::<f64>()
    };
    drop(gd);
    let um = Mat::<f64>::from_fn(out, r, |i, k| u[i * r + k] as f64);
    let vm = Mat::<f64>::from_fn(r, c, |k, j| v[k * c + j] as f64);
    let m0 = &um * &vm;
    let before = output_error(&m0, &g, &b, energy);
    let mean_diag = (0..c).map(|j| g[(j, j)]).sum::<f64>() / c.max(1) as f64;
    let mut fit = FitOutcome {
        name: name.to_string(),
        rel_error_before: before / energy.max(f64::MIN_POSITIVE),
        rel_error_after: before / energy.max(f64::MIN_POSITIVE),
        damping: damp,
        rows_damped_more: 0,
        rows_kept: 0,
    };
    if mean_diag <= 0.0 {
        fit.rows_kept = out;
        return Ok(fit);
    }
    // S: Cholesky of the damped G, damping raised tenfold while it fails.
    let mut lambda = (damp * mean_diag).max(mean_diag * 1e-10);
    let s = loop {
        let mut gl = g.clone();
        for j in 0..c {
            gl[(j, j)] += lambda;
        }
        if let Ok(llt) = gl.llt(Side::Lower) {
            break llt.L().to_owned();
        }
        lambda *= 10.0;
        if lambda > mean_diag * 1e6 {
            return Err(numeric("the input Gram matrix cannot be factorised".into()));
        }
    };
    fit.damping = lambda / mean_diag;
    // Damping pulls towards W₀ (not zero): the unconstrained fit is (B + λW₀)(G + λI)⁻¹, and
    // its best rank-r version in the (G + λI) metric is the truncated SVD of
    // T = (B + λW₀) S⁻ᵀ: solve S Tᵀ = (B + λW₀)ᵀ.
    let mut tt = (&b + &w0m * faer::Scale(lambda)).transpose().to_owned();
    faer::linalg::triangular_solve::solve_lower_triangular_in_place(
        s.as_ref(),
        tt.as_mut(),
        Par::rayon(0),
    );
    let svd = tt
        .transpose()
        .to_owned()
        .thin_svd()
        .map_err(|e| numeric(format!("SVD did not converge: {e:?}")))?;
    let (uu, sv, vv) = (svd.U(), svd.S().column_vector(), svd.V());
    let r = r.min(sv.nrows());
    // Right factor: √Σ_r V_rᵀ S⁻¹, i.e. (S⁻ᵀ V_r)ᵀ scaled.
    let mut vr = Mat::<f64>::from_fn(c, r, |i, k| vv[(i, k)]);
    faer::linalg::triangular_solve::solve_upper_triangular_in_place(
        s.transpose(),
        vr.as_mut(),
        Par::rayon(0),
    );
    let root: Vec<f64> = (0..r).map(|k| sv[k].max(0.0).sqrt()).collect();
    let un = Mat::<f64>::from_fn(out, r, |i, k| uu[(i, k)] * root[k]);
    let vn = Mat::<f64>::from_fn(r, c, |k, j| vr[(j, k)] * root[k]);
    let after = output_error(&(&un * &vn), &g, &b, energy);
    if !after.is_finite() {
        return Err(numeric("NaN/Inf in the low-rank reconstruction".into()));
    }
    if after < before {
        let r0 = u.len() / out.max(1);
        // A rank the SVD cannot reach (more than min(out, inp)) keeps zero columns.
        u.iter_mut().for_each(|x| *x = 0.0);
        v.iter_mut().for_each(|x| *x = 0.0);
        for i in 0..out {
            for k in 0..r {
                u[i * r0 + k] = un[(i, k)] as f32;
            }
        }
        for k in 0..r {
            for j in 0..c {
                v[k * c + j] = vn[(k, j)] as f32;
            }
        }
        if u.iter().chain(v.iter()).any(|x| !x.is_finite()) {
            return Err(numeric("the re-fitted factors do not fit in f32".into()));
        }
        fit.rel_error_after = after / energy.max(f64::MIN_POSITIVE);
    } else {
        fit.rows_kept = out;
    }
    Ok(fit)
}

/// Reconstruct block `layer` after factorisation: one paired pass (dense block `dense` on the
/// dense stream `h_d`, which it advances; the factorised block `lw` on `h_p`, left unchanged),
/// then [`refit_factors`] for each factorised linear in `kinds`.
#[allow(clippy::too_many_arguments)]
pub fn refit_block(
    cfg: &crate::Config,
    layer: usize,
    dense: &crate::LayerWeights,
    lw: &mut crate::LayerWeights,
    kinds: &[crate::LinearKind],
    rope: &crate::model::rope::Rope,
    h_d: &mut [f32],
    h_p: &mut [f32],
    n: usize,
    len: usize,
    opts: super::ReconOptions,
) -> Result<Vec<FitOutcome>> {
    use crate::model::observer::Site;
    let damp = opts.damp;
    use crate::model::weights::LinearRepr;
    let mut stats =
        super::reconstruct::collect(cfg, layer, dense, lw, rope, h_d, h_p, n, len, true)?;
    if opts.target == super::reconstruct::ReconTarget::Pruned {
        stats.values_mut().for_each(ReconStats::use_pruned_target);
    }
    let mut out = Vec::new();
    for &kind in kinds {
        let Some(st) = stats.get(&Site::of(kind)) else {
            continue;
        };
        let name = crate::model::names::tensor_name(layer, kind);
        let w0 = dense.linear(kind).weight.data();
        let lin = lw.linear_mut(kind);
        let (out_f, in_f) = (lin.out_features(), lin.in_features());
        let LinearRepr::LowRank { u } = &mut lin.repr else {
            continue;
        };
        let (u, v) = (u.data_mut(), lin.weight.data_mut());
        out.push(refit_factors(u, v, w0, out_f, in_f, st, damp, &name)?);
    }
    Ok(out)
}
