//! Low-rank factorisation of linears: `W [out, in] ≈ U [out, r] · V [r, in]`, stored in
//! [`Linear::factor`] (`U`) and [`Linear::weight`] (`V`), so the layer costs `r·(out + in)`
//! instead of `out·in` parameters and multiply-adds.
//!
//! Two ways to choose the factors:
//! - **plain** truncated SVD of `W` (Eckart–Young: the best rank-r approximation in Frobenius
//!   norm of the *weights*); needs no calibration.
//! - **activation-aware** (`whiten`), SVD-LLM's truncation-aware data whitening (Wang et al.
//!   2024, "SVD-LLM: Truncation-aware Data Whitening and Parameter Update for Large Language
//!   Model Compression", §3.1, Alg. 1 and the official `SVDLLM.py` `whitening`): with the input
//!   Gram matrix `XᵀX = S Sᵀ` (Cholesky, `S` lower), take the SVD of `W·S`, truncate to rank r
//!   and map back: `W' = U_r Σ_r (V_rᵀ S⁻¹)`. Since `‖(W − W')X‖_F = ‖(W − W')S‖_F`, this is the
//!   best rank-r approximation of the layer's *outputs* on the calibration data, and each
//!   discarded singular value σ_i is exactly the output error it causes.
//!   Like the official code the factors are `U_r √Σ_r` and `√Σ_r V_rᵀ S⁻¹`; when the Cholesky
//!   fails the official fix is applied (shift the Gram matrix by `(−λ_min + 1e-6)·I`).
//!   [`LowRankSpec::damping`] adds `damping·mean(diag XᵀX)·I` first (0 = the official method).
//!
//! Calibration is layer-sequential like the pruning driver (SparseGPT §3): block *i*'s input
//! Grams come from the calibration data run through the already-factorised blocks `0..i`, and
//! the factorised block then produces block *i+1*'s inputs. (The official SVD-LLM `whitening`
//! profiles every layer on the *uncompressed* model; its `whitening_local_update` variant
//! propagates through the compressed layers as here.)
//!
//! Rank rules ([`RankRule`]): `ParamFraction(f)` removes fraction f of each factorised linear's
//! parameters, `r = ⌊(1 − f)·out·in/(out + in)⌋` (SVD-LLM's `num_s_after_trunc`);
//! `Energy(e)` keeps the smallest r whose σ² (of `W`, or of `W·S` when whitening) hold fraction
//! e of Σσ²; a layer the energy rule would not make smaller is left dense.
//!
//! The linear algebra is f64 (`faer`); the model stays f32.
//!
//! Measured on SmolLM2-135M (all seven linears of every block, calibration c4 32×256 tokens,
//! wiki perplexity on the first 8 windows of 512 tokens, dense 19.69; `examples/lowrank_slice_figures.rs`):
//!
//! | removed from each linear | model params removed | plain SVD | SVD-LLM |
//! |---|---|---|---|
//! | 12.5% | 9.9% | 2.5e6 | 74.5 |
//! | 25% | 19.8% | 4.4e7 | 135.8 |
//! | 37.5% | 29.7% | 6.9e7 | 269.2 |

use super::{Progress, StepDetails};
use crate::calibrate::runner::{BlockRunner, Pass};
use crate::calibrate::stats::{Needs, StatsObserver};
use crate::calibrate::CalibSet;
use crate::model::forward::embed;
use crate::model::observer::{NoObserver, Site};
use crate::model::rope::Rope;
use crate::model::weights::LinearRepr;
use crate::{Error, Linear, LinearKind, Model, Result, Tensor};
use faer::{Mat, Par, Side};
use serde_json::json;

/// How each factorised linear's rank is chosen.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RankRule {
    /// Remove this fraction of the linear's parameters: r = (1−f)·out·in/(out+in).
    ParamFraction(f64),
    /// Keep the smallest rank whose singular values hold this fraction of Σσ².
    Energy(f64),
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LowRankSpec {
    pub rule: RankRule,
    /// Activation-aware: whiten by the calibration input covariance before the SVD (SVD-LLM).
    pub whiten: bool,
    /// Linear kinds factorised (all seven when empty).
    pub modules: Vec<LinearKind>,
    /// Whitening only: add `damping · mean(diag XᵀX)` to the Gram diagonal before the Cholesky
    /// (0 = the official SVD-LLM, which shifts only when the Cholesky fails).
    #[serde(default)]
    pub damping: f64,
    /// Re-fit each factorised block's factors towards the dense outputs on the compressed
    /// model's own inputs ([`crate::recover::lowrank_fit`]).
    #[serde(default)]
    pub reconstruct: Option<crate::recover::ReconOptions>,
}

impl LowRankSpec {
    /// A spec with no damping.
    pub fn new(rule: RankRule, whiten: bool, modules: Vec<LinearKind>) -> LowRankSpec {
        LowRankSpec {
            rule,
            whiten,
            modules,
            damping: 0.0,
            reconstruct: None,
        }
    }

    /// The kinds factorised.
    pub fn kinds(&self) -> Vec<LinearKind> {
        if self.modules.is_empty() {
            LinearKind::ALL.to_vec()
        } else {
            LinearKind::ALL
                .into_iter()
                .filter(|k| self.modules.contains(k))
                .collect()
        }
    }

    /// Check the values (not the model).
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Invalid(m));
        match self.rule {
            RankRule::ParamFraction(f) if !(0.0..1.0).contains(&f) => {
                return bad(format!(
                    "low rank: the parameter fraction to remove must be in [0, 1), got {f}"
                ))
            }
            RankRule::Energy(e) if !(e > 0.0 && e <= 1.0) => {
                return bad(format!(
                    "low rank: the energy to keep must be in (0, 1], got {e}"
                ))
            }
            _ => {}
        }
        if !(self.damping >= 0.0 && self.damping.is_finite()) {
            return bad(format!(
                "low rank: damping must be finite and >= 0, got {}",
                self.damping
            ));
        }
        Ok(())
    }
}

/// `⌊(1 − f)·out·in/(out + in)⌋`, the rank that removes fraction `f` of the parameters.
pub fn rank_for_fraction(out: usize, inp: usize, f: f64) -> usize {
    ((1.0 - f) * (out * inp) as f64 / (out + inp) as f64).floor() as usize
}

/// The smallest rank whose leading `sigma` (non-increasing) hold fraction `e` of Σσ².
pub fn rank_for_energy(sigma: &[f64], e: f64) -> usize {
    let total: f64 = sigma.iter().map(|s| s * s).sum();
    if total <= 0.0 {
        return 1;
    }
    let mut acc = 0.0;
    for (i, s) in sigma.iter().enumerate() {
        acc += s * s;
        // Relative slack so that e = 1 is reached despite rounding in the sum.
        if acc >= e * total * (1.0 - 1e-12) {
            return i + 1;
        }
    }
    sigma.len()
}

/// The factors of one matrix.
#[derive(Debug, Clone)]
pub struct Factors {
    /// `[out, rank]`, row-major.
    pub u: Vec<f32>,
    /// `[rank, in]`, row-major.
    pub v: Vec<f32>,
    pub rank: usize,
    /// Singular values (all of them) of `W`, or of `W·S` when whitened.
    pub sigma: Vec<f64>,
    /// Whitening: the Gram shift the Cholesky needed beyond `damping` (0 when none).
    pub shift: f64,
}

/// Factorise `w` (`[out, inp]`, row-major) by `rule`; with `gram` (`XᵀX`, `[inp, inp]` full
/// symmetric) the SVD-LLM whitened SVD, else the plain SVD. Returns `None` when the rank the
/// rule picks would not save parameters (only possible for [`RankRule::Energy`]).
pub fn factor_matrix(
    w: &[f32],
    out: usize,
    inp: usize,
    gram: Option<&[f64]>,
    rule: RankRule,
    damping: f64,
    name: &str,
) -> Result<Option<Factors>> {
    let numeric = |m: String| Error::Numeric(format!("{name}: {m}"));
    let wm = Mat::<f64>::from_fn(out, inp, |i, j| w[i * inp + j] as f64);
    // `target` is W or W·S; `chol` the Cholesky factor S when whitening.
    let (target, chol, shift) = match gram {
        None => (wm, None, 0.0),
        Some(g) => {
            let (s, shift) = whitening_factor(g, inp, damping).map_err(numeric)?;
            (&wm * &s, Some(s), shift)
        }
    };
    let svd = target
        .thin_svd()
        .map_err(|e| numeric(format!("SVD did not converge: {e:?}")))?;
    let sv = svd.S().column_vector();
    let sigma: Vec<f64> = (0..sv.nrows()).map(|i| sv[i]).collect();
    let r = match rule {
        RankRule::ParamFraction(f) => rank_for_fraction(out, inp, f),
        RankRule::Energy(e) => rank_for_energy(&sigma, e),
    }
    .min(sigma.len());
    if r == 0 {
        return Err(Error::Invalid(format!(
            "{name}: the rank rule gives rank 0"
        )));
    }
    if matches!(rule, RankRule::Energy(_)) && r * (out + inp) >= out * inp {
        return Ok(None);
    }
    let (uu, vv) = (svd.U(), svd.V());
    // V_r [inp, r]; whitened: S⁻ᵀ V_r, so that the right factor is V_rᵀ S⁻¹.
    let mut vr = Mat::<f64>::from_fn(inp, r, |i, j| vv[(i, j)]);
    if let Some(s) = &chol {
        faer::linalg::triangular_solve::solve_upper_triangular_in_place(
            s.transpose(),
            vr.as_mut(),
            Par::rayon(0),
        );
    }
    let root: Vec<f64> = sigma[..r].iter().map(|s| s.sqrt()).collect();
    let u: Vec<f32> = (0..out * r)
        .map(|k| (uu[(k / r, k % r)] * root[k % r]) as f32)
        .collect();
    let v: Vec<f32> = (0..r * inp)
        .map(|k| (vr[(k % inp, k / inp)] * root[k / inp]) as f32)
        .collect();
    if u.iter().chain(&v).any(|x| !x.is_finite()) {
        return Err(numeric("the factors contain NaN/Inf".into()));
    }
    Ok(Some(Factors {
        u,
        v,
        rank: r,
        sigma,
        shift,
    }))
}

/// Lower Cholesky factor `S` of `gram + damping·mean(diag)·I` (`n × n`), with SVD-LLM's fallback
/// shift `(−λ_min + 1e-6)·I` when that is not positive definite; also returns the fallback shift.
fn whitening_factor(
    gram: &[f64],
    n: usize,
    damping: f64,
) -> std::result::Result<(Mat<f64>, f64), String> {
    if gram.len() != n * n || gram.iter().any(|v| !v.is_finite()) {
        return Err("the input Gram matrix is missing or not finite".into());
    }
    let mean_diag = (0..n).map(|i| gram[i * n + i]).sum::<f64>() / n.max(1) as f64;
    let damp = damping * mean_diag;
    let mut g = Mat::<f64>::from_fn(n, n, |i, j| {
        gram[i * n + j] + if i == j { damp } else { 0.0 }
    });
    if let Ok(llt) = g.llt(Side::Lower) {
        return Ok((llt.L().to_owned(), 0.0));
    }
    let lmin = g
        .self_adjoint_eigenvalues(Side::Lower)
        .map_err(|e| format!("eigenvalues of the input Gram matrix: {e:?}"))?
        .first()
        .copied()
        .unwrap_or(0.0);
    let shift = -lmin + 1e-6;
    for i in 0..n {
        g[(i, i)] += shift;
    }
    let llt = g
        .llt(Side::Lower)
        .map_err(|_| "the input Gram matrix is not positive definite even after a shift")?;
    Ok((llt.L().to_owned(), shift))
}

/// `‖(W − U·V) X‖²_F / ‖W X‖²_F` from `gram = XᵀX`, or the plain `‖W − U·V‖²_F / ‖W‖²_F`
/// without one.
pub fn relative_error(w: &[f32], f: &Factors, out: usize, inp: usize, gram: Option<&[f64]>) -> f64 {
    let r = f.rank;
    let wm = Mat::<f64>::from_fn(out, inp, |i, j| w[i * inp + j] as f64);
    let um = Mat::<f64>::from_fn(out, r, |i, k| f.u[i * r + k] as f64);
    let vm = Mat::<f64>::from_fn(r, inp, |k, j| f.v[k * inp + j] as f64);
    let dm = &wm - &um * &vm;
    let quad = |a: &Mat<f64>| -> f64 {
        match gram {
            None => (0..out)
                .map(|i| (0..inp).map(|j| a[(i, j)] * a[(i, j)]).sum::<f64>())
                .sum(),
            Some(g) => {
                let gm = Mat::<f64>::from_fn(inp, inp, |i, j| g[i * inp + j]);
                let ag = a * &gm;
                (0..out)
                    .map(|i| (0..inp).map(|j| a[(i, j)] * ag[(i, j)]).sum::<f64>())
                    .sum()
            }
        }
    };
    quad(&dm) / quad(&wm).max(f64::MIN_POSITIVE)
}

/// Replace `lin` by its factors (the bias is kept).
fn apply(lin: &mut Linear, f: Factors, out: usize, inp: usize) {
    lin.repr = LinearRepr::LowRank {
        u: Tensor::new(vec![out, f.rank], f.u),
    };
    lin.weight = Tensor::new(vec![f.rank, inp], f.v);
}

/// Factorise linears of `model` as `spec` asks.
///
/// Bad requests (values out of range, a rank of 0, a linear that is already factorised) are
/// refused before anything changes; a numeric failure part-way restores the layers already
/// factorised, so on `Err` the model is as it was.
pub fn factorize(
    model: &mut Model,
    calib: &CalibSet,
    spec: &LowRankSpec,
    progress: Progress<'_>,
) -> Result<StepDetails> {
    spec.validate()?;
    let kinds = spec.kinds();
    let n_layers = model.weights.layers.len();
    for (i, l) in model.weights.layers.iter().enumerate() {
        for &k in &kinds {
            let lin = l.linear(k);
            let name = crate::model::names::tensor_name(i, k);
            if lin.is_factored() {
                return Err(Error::Invalid(format!(
                    "low rank: {name} is already factorised"
                )));
            }
            if let RankRule::ParamFraction(f) = spec.rule {
                if rank_for_fraction(lin.out_features(), lin.in_features(), f) == 0 {
                    return Err(Error::Invalid(format!(
                        "low rank: removing {f} of the parameters of {name} ({}x{}) leaves rank 0",
                        lin.out_features(),
                        lin.in_features()
                    )));
                }
            }
        }
    }
    let params_before = model.weights.num_params();
    let mut originals: Vec<(usize, LinearKind, Linear)> = Vec::new();
    let result = factorize_layers(model, calib, spec, &kinds, progress, &mut originals);
    match result {
        Ok(mut details) => {
            let after = model.weights.num_params();
            details["model_params_before"] = json!(params_before);
            details["model_params_after"] = json!(after);
            details["model_params_removed_fraction"] =
                json!(1.0 - after as f64 / params_before as f64);
            details["layers"] = json!(n_layers);
            Ok(details)
        }
        Err(e) => {
            for (i, k, lin) in originals {
                *model.weights.layers[i].linear_mut(k) = lin;
            }
            Err(e)
        }
    }
}

/// The work of [`factorize`]; every replaced linear's original goes to `originals` first.
fn factorize_layers(
    model: &mut Model,
    calib: &CalibSet,
    spec: &LowRankSpec,
    kinds: &[LinearKind],
    progress: Progress<'_>,
    originals: &mut Vec<(usize, LinearKind, Linear)>,
) -> Result<StepDetails> {
    let n_layers = model.weights.layers.len();
    let (n, len) = (calib.n, calib.len);
    let rope = Rope::new(&model.config, len);
    let mut runner = BlockRunner::new();
    let calibrated = spec.whiten || spec.reconstruct.is_some();
    let mut h = if calibrated {
        embed(&model.weights, &calib.ids)?
    } else {
        Vec::new()
    };
    // Reconstruction's dense stream: the first `ns` samples (the compressed stream is `h`).
    let width = len * model.config.hidden_size;
    let ns = spec.reconstruct.map_or(0, |o| o.samples_of(n));
    let mut h_d = h[..ns * width].to_vec();
    let mut fits = Vec::new();
    let mut recon_seconds = 0.0;
    let (mut before, mut after) = (0usize, 0usize);
    let mut tensors = Vec::new();
    for i in 0..n_layers {
        progress("low-rank factorisation", i, n_layers);
        let dense = spec
            .reconstruct
            .map(|_| crate::recover::reconstruct::dense_copy(&model.weights.layers[i]));
        let sites = if spec.whiten {
            let needs = Needs {
                col_sq: false,
                hessian: true,
            };
            let mut obs = StatsObserver::new(i, needs, len);
            runner.run(
                &model.config,
                i,
                &model.weights.layers[i],
                &rope,
                &mut h,
                n,
                len,
                Pass::Statistics,
                &mut obs,
            )?;
            obs.sites
        } else {
            Default::default()
        };
        for &kind in kinds {
            let name = crate::model::names::tensor_name(i, kind);
            let lin = model.weights.layers[i].linear(kind);
            let (out, inp) = (lin.out_features(), lin.in_features());
            let w = lin.weight.data();
            if w.iter().any(|v| !v.is_finite()) {
                return Err(Error::Numeric(format!("{name} contains NaN/Inf weights")));
            }
            let gram = match spec.whiten {
                true => Some(
                    sites
                        .get(&Site::of(kind))
                        .and_then(|s| s.hessian())
                        .ok_or_else(|| {
                            Error::Numeric(format!("{name}: no input statistics were collected"))
                        })?,
                ),
                false => None,
            };
            let f = factor_matrix(w, out, inp, gram.as_deref(), spec.rule, spec.damping, &name)?;
            before += out * inp;
            let Some(f) = f else {
                after += out * inp;
                tensors.push(json!({"name": name, "shape": [out, inp], "rank": null,
                    "kept_dense": true}));
                continue;
            };
            let weight_err = relative_error(w, &f, out, inp, None);
            let output_err = gram
                .as_deref()
                .map(|g| relative_error(w, &f, out, inp, Some(g)));
            after += f.rank * (out + inp);
            tensors.push(json!({
                "name": name,
                "shape": [out, inp],
                "rank": f.rank,
                "params_before": out * inp,
                "params_after": f.rank * (out + inp),
                "weight_relative_error": weight_err,
                "output_relative_error": output_err,
                "cholesky_shift": f.shift,
            }));
            let lin = model.weights.layers[i].linear_mut(kind);
            originals.push((i, kind, lin.clone()));
            apply(lin, f, out, inp);
        }
        if let (Some(opts), Some(d)) = (spec.reconstruct, &dense) {
            let t = std::time::Instant::now();
            fits.extend(crate::recover::lowrank_fit::refit_block(
                &model.config,
                i,
                d,
                &mut model.weights.layers[i],
                kinds,
                &rope,
                &mut h_d,
                &mut h[..ns * width],
                ns,
                len,
                opts,
            )?);
            recon_seconds += t.elapsed().as_secs_f64();
        }
        if calibrated && i + 1 < n_layers {
            runner.run(
                &model.config,
                i,
                &model.weights.layers[i],
                &rope,
                &mut h,
                n,
                len,
                Pass::Propagate,
                &mut NoObserver,
            )?;
        }
    }
    progress("low-rank factorisation", n_layers, n_layers);
    Ok(json!({
        "step": "low_rank",
        "method": if spec.whiten { "svd-llm whitened svd" } else { "truncated svd" },
        "rule": spec.rule,
        "damping": spec.damping,
        "modules": kinds,
        "calibration": if spec.whiten { calib.source.clone() } else { "none".into() },
        "factorised_params_before": before,
        "factorised_params_after": after,
        "factorised_params_removed_fraction": 1.0 - after as f64 / before.max(1) as f64,
        "tensors": tensors,
        "reconstruction": spec.reconstruct.map(|o| {
            let k = fits.len().max(1) as f64;
            json!({
                "damping": o.damp,
                "samples": ns,
                "seconds": recon_seconds,
                "mean_rel_error_before": fits.iter().map(|f| f.rel_error_before).sum::<f64>() / k,
                "mean_rel_error_after": fits.iter().map(|f| f.rel_error_after).sum::<f64>() / k,
                "layers": fits,
            })
        }),
    }))
}
