//! Width pruning of FFN neurons (intermediate channels).
//!
//! Channel `c` of a SwiGLU MLP is row `c` of gate_proj and up_proj and column `c` of down_proj;
//! removing it removes all three. Scores (higher = more important), with `X_in` the MLP input
//! ([`Site::MlpIn`]) and `X_c` channel `c` of down_proj's input ([`Site::MlpDown`]), over all
//! calibration tokens of the unpruned model:
//!
//! - [`NeuronMetric::WandaSp`]: the Wanda score `|W_ij|·‖X_j‖₂` summed over every weight the
//!   channel owns: `Σ_k |W_gate[c,k]|·‖X_in,k‖ + Σ_k |W_up[c,k]|·‖X_in,k‖ + Σ_i |W_down[i,c]|·‖X_c‖`.
//!   This is LLM-Pruner's coupled-group importance (Ma et al. 2023, §3.2; `group_reduction="sum"`
//!   over the dependent layers in `hf_llama_pruner.py`) with Wanda's element score.
//! - [`NeuronMetric::WandaSpDown`]: FLAP's own Wanda-sp baseline (`prune_wanda_sp` in
//!   `CASIA-IVA-Lab/FLAP/lib/prune.py`), which looks at down_proj only: `mean_i |W_down[i,c]|·‖X_c‖`.
//! - [`NeuronMetric::Fluctuation`]: FLAP's WIFV (An et al. 2024, §3.2, eq. 6):
//!   `var(X_c) · ‖W_down[:,c]‖₂²`, unbiased variance over tokens (not squared, unlike heads: the
//!   official code squares only the attention metric).
//!
//! Allocation ([`super::alloc`]): uniform removes `round(fraction · width)` per layer; adaptive
//! standardises scores within each layer and removes the globally lowest (FLAP `AL-MM`), every
//! layer keeping at least one channel.
//!
//! FLAP bias compensation (§3.4): down_proj's bias gains `W_down[:,removed] · mean(X[:,removed])`.
//! For llama, `mlp_bias` covers gate/up/down together, so gate and up get zero biases (in every
//! layer) and the result stays loadable by transformers.

use super::alloc::{self, ascending, standardize};
use super::stats::{collect_width_stats, ColumnMoments, WidthStats};
use super::{surgery, sync_config, Progress, StepDetails, WidthAllocation};
use crate::calibrate::CalibSet;
use crate::model::config::Arch;
use crate::model::observer::Site;
use crate::model::weights::{LayerWeights, Tensor};
use crate::LinearKind;
use crate::{Error, Model, Result};
use rayon::prelude::*;
use serde_json::json;

/// How intermediate channels are scored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NeuronMetric {
    /// Wanda-sp: |W|·‖X‖ summed over the channel (gate/up rows and the down column).
    WandaSp,
    /// FLAP: variance of the channel's down_proj input × squared down_proj column norm.
    Fluctuation,
    /// FLAP's Wanda-sp baseline: mean over down_proj rows of |W_down[i,c]|·‖X_c‖.
    WandaSpDown,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct NeuronSpec {
    /// Fraction of intermediate channels removed (model-wide).
    pub fraction: f64,
    pub metric: NeuronMetric,
    /// FLAP bias compensation: add the removed channels' mean contribution as a down_proj bias.
    pub bias_compensation: bool,
    pub allocation: WidthAllocation,
    /// Re-fit down_proj on the kept neurons (and a bias) towards the dense model's outputs
    /// ([`crate::recover::width`]).
    #[serde(default)]
    pub reconstruct: Option<crate::recover::ReconOptions>,
}

/// `Σ_k |W[c,k]| · v_k` for every row `c` of `w`.
fn abs_rows_dot(w: &Tensor, v: &[f64]) -> Vec<f64> {
    let cols = w.cols();
    w.data()
        .par_chunks(cols)
        .map(|row| row.iter().zip(v).map(|(a, b)| a.abs() as f64 * b).sum())
        .collect()
}

/// Per column `c` of `w`: `(Σ_i |W_ic|, Σ_i W_ic²)`.
fn col_norms(w: &Tensor) -> (Vec<f64>, Vec<f64>) {
    let cols = w.cols();
    let (mut abs, mut sq) = (vec![0f64; cols], vec![0f64; cols]);
    for row in w.data().chunks(cols) {
        for (j, &x) in row.iter().enumerate() {
            let x = x as f64;
            abs[j] += x.abs();
            sq[j] += x * x;
        }
    }
    (abs, sq)
}

/// Channel scores of one layer. `mlp_in` (the MLP input moments) is needed only by `WandaSp`.
pub fn channel_scores(
    layer: &LayerWeights,
    mlp_in: Option<&ColumnMoments>,
    down_in: &ColumnMoments,
    metric: NeuronMetric,
) -> Result<Vec<f64>> {
    let (abs, sq) = col_norms(&layer.down.weight);
    let hidden = layer.down.out_features() as f64;
    Ok(match metric {
        NeuronMetric::Fluctuation => sq.iter().zip(down_in.var()).map(|(w, v)| w * v).collect(),
        NeuronMetric::WandaSpDown => abs
            .iter()
            .zip(down_in.sum_sq())
            .map(|(w, x)| w / hidden * x.sqrt())
            .collect(),
        NeuronMetric::WandaSp => {
            let xin = mlp_in
                .ok_or_else(|| Error::Invalid("Wanda-sp needs the MLP input statistics".into()))?;
            let xn: Vec<f64> = xin.sum_sq().iter().map(|s| s.sqrt()).collect();
            let g = abs_rows_dot(&layer.gate.weight, &xn);
            let u = abs_rows_dot(&layer.up.weight, &xn);
            let d: Vec<f64> = abs
                .iter()
                .zip(down_in.sum_sq())
                .map(|(w, x)| w * x.sqrt())
                .collect();
            (0..d.len()).map(|c| g[c] + u[c] + d[c]).collect()
        }
    })
}

/// Remove FFN neurons from `model` as `spec` asks.
pub fn prune_neurons(
    model: &mut Model,
    calib: &CalibSet,
    spec: &NeuronSpec,
    progress: Progress<'_>,
) -> Result<StepDetails> {
    let req = validate(model, spec)?;
    if req.nothing() {
        return Ok(req.unchanged(model, spec));
    }
    let stats = collect_width_stats(model, calib, sites(spec.metric), progress)?;
    let Some(opts) = spec.reconstruct else {
        return apply(model, &stats, spec, req);
    };
    let dense = model.clone();
    let details = apply(model, &stats, spec, req)?;
    super::reconstruct_width(
        &dense,
        model,
        calib,
        LinearKind::Down,
        opts,
        details,
        progress,
    )
}

/// The sites whose statistics `metric` needs.
pub fn sites(metric: NeuronMetric) -> &'static [Site] {
    match metric {
        NeuronMetric::WandaSp => &[Site::MlpIn, Site::MlpDown],
        _ => &[Site::MlpDown],
    }
}

/// [`prune_neurons`] with statistics collected beforehand on this very model
/// ([`collect_width_stats`] watching [`sites`]), e.g. in one pass shared with head pruning as
/// FLAP does.
pub fn prune_neurons_with_stats(
    model: &mut Model,
    stats: &WidthStats,
    spec: &NeuronSpec,
) -> Result<StepDetails> {
    let req = validate(model, spec)?;
    if req.nothing() {
        return Ok(req.unchanged(model, spec));
    }
    apply(model, stats, spec, req)
}

/// A checked request.
struct Request {
    widths: Vec<usize>,
    caps: Vec<usize>,
    total: usize,
    target: usize,
    uniform: Option<Vec<usize>>,
    params_before: usize,
}

impl Request {
    fn nothing(&self) -> bool {
        match &self.uniform {
            Some(c) => c.iter().all(|&k| k == 0),
            None => self.target == 0,
        }
    }

    fn unchanged(&self, model: &Model, spec: &NeuronSpec) -> StepDetails {
        let none = vec![Vec::new(); self.widths.len()];
        details(model, spec, &none, &[], self.params_before, self.total)
    }
}

/// Check `spec` against `model` (everything that needs no statistics).
fn validate(model: &Model, spec: &NeuronSpec) -> Result<Request> {
    alloc::check_fraction(spec.fraction, "neuron pruning")?;
    let widths: Vec<usize> = model
        .weights
        .layers
        .iter()
        .map(|l| l.intermediate())
        .collect();
    if let Some(l) = widths.iter().position(|&w| w == 0) {
        return Err(Error::Invalid(format!(
            "neuron pruning: layer {l} has no FFN channels"
        )));
    }
    let caps: Vec<usize> = widths.iter().map(|w| w - 1).collect();
    let total: usize = widths.iter().sum();
    let target = (spec.fraction * total as f64).round() as usize;
    let uniform = match spec.allocation {
        WidthAllocation::Uniform => Some(alloc::uniform_counts(
            spec.fraction,
            &widths,
            &caps,
            "neuron pruning",
        )?),
        WidthAllocation::Adaptive => {
            let cap: usize = caps.iter().sum();
            if target > cap {
                return Err(Error::Invalid(format!(
                    "neuron pruning: {target} of {total} channels requested, but at most {cap} can go while every layer keeps one"
                )));
            }
            None
        }
    };
    Ok(Request {
        widths,
        caps,
        total,
        target,
        uniform,
        params_before: model.weights.num_params(),
    })
}

/// Score, choose and cut (the model changes only after every check has passed).
fn apply(
    model: &mut Model,
    stats: &WidthStats,
    spec: &NeuronSpec,
    req: Request,
) -> Result<StepDetails> {
    let Request {
        widths,
        caps,
        total,
        target,
        uniform,
        params_before,
    } = req;
    let n_layers = widths.len();
    for l in 0..n_layers {
        for &site in sites(spec.metric) {
            let x = stats.require(l, site)?;
            let lw = &model.weights.layers[l];
            let want = if site == Site::MlpDown {
                lw.intermediate()
            } else {
                lw.gate.in_features()
            };
            if x.cols() != want {
                return Err(Error::Invalid(format!(
                    "neuron pruning: statistics of {site:?} in layer {l} have {} columns, the layer needs {want} (statistics from another model?)",
                    x.cols()
                )));
            }
        }
    }
    let mut scores = Vec::with_capacity(n_layers);
    for l in 0..n_layers {
        let down = stats.require(l, Site::MlpDown)?;
        let mut s = channel_scores(
            &model.weights.layers[l],
            stats.get(l, Site::MlpIn),
            down,
            spec.metric,
        )?;
        alloc::check_finite(&s, &format!("neuron pruning, layer {l}"))?;
        if spec.allocation == WidthAllocation::Adaptive {
            standardize(&mut s);
        }
        scores.push(s);
    }
    let orders: Vec<Vec<usize>> = scores.iter().map(|s| ascending(s)).collect();
    let counts = match uniform {
        Some(c) => c,
        None => {
            let sorted: Vec<Vec<f64>> = orders
                .iter()
                .zip(&scores)
                .map(|(o, s)| o.iter().map(|&i| s[i]).collect())
                .collect();
            alloc::adaptive_counts(&sorted, &vec![1; n_layers], &caps, target, "neuron pruning")?
        }
    };
    let removed: Vec<Vec<usize>> = orders
        .iter()
        .zip(&counts)
        .map(|(o, &k)| {
            let mut r = o[..k].to_vec();
            r.sort_unstable();
            r
        })
        .collect();

    let llama = model.config.arch == Arch::Llama;
    for (l, gone) in removed.iter().enumerate() {
        let lw = &mut model.weights.layers[l];
        let delta = spec.bias_compensation.then(|| {
            let mean = stats
                .get(l, Site::MlpDown)
                .map(ColumnMoments::mean)
                .unwrap_or_default();
            surgery::removed_mean_contribution(&lw.down.weight, gone, &mean)
        });
        let keep = surgery::complement(widths[l], gone);
        surgery::keep_channels(lw, &keep);
        if let Some(delta) = delta {
            surgery::add_to_bias(&mut lw.down, &delta);
            if llama {
                surgery::ensure_bias(&mut lw.gate);
                surgery::ensure_bias(&mut lw.up);
            }
        }
    }
    if spec.bias_compensation {
        model.config.mlp_bias = true;
    }
    sync_config(model);
    Ok(details(
        model,
        spec,
        &removed,
        &scores,
        params_before,
        total,
    ))
}

fn details(
    model: &Model,
    spec: &NeuronSpec,
    removed: &[Vec<usize>],
    scores: &[Vec<f64>],
    params_before: usize,
    total: usize,
) -> StepDetails {
    let n: usize = removed.iter().map(Vec::len).sum();
    json!({
        "step": "neurons",
        "metric": spec.metric,
        "allocation": spec.allocation,
        "bias_compensation": spec.bias_compensation,
        "requested_fraction": spec.fraction,
        "realised_fraction": n as f64 / total.max(1) as f64,
        "channels_removed": n,
        "channels_before": total,
        "removed_per_layer": removed.iter().map(Vec::len).collect::<Vec<_>>(),
        "removed_channels": removed,
        "width_per_layer": model.weights.layers.iter().map(|l| l.intermediate()).collect::<Vec<_>>(),
        // Per-layer score summaries (full score lists would be large): min / median / max.
        "score_summary": scores.iter().map(|s| {
            let mut v = s.clone();
            v.sort_by(f64::total_cmp);
            json!([v.first(), v.get(v.len() / 2), v.last()])
        }).collect::<Vec<_>>(),
        "params_before": params_before,
        "params_after": model.weights.num_params(),
    })
}
