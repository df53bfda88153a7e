//! Width pruning of attention heads.
//!
//! A query head `h` owns columns `h·hd..(h+1)·hd` of o_proj's input (the attention output,
//! [`Site::AttnOut`]), so heads are scored through o_proj, as FLAP and its Wanda-sp baseline do
//! (An et al., "Fluctuation-based Adaptive Structured Pruning for LLMs", AAAI 2024; official code
//! `CASIA-IVA-Lab/FLAP`, `lib/prune.py`). Per input channel `j` of o_proj, with `X_j` the channel's
//! calibration activations (all tokens of the unpruned model) and `W_{:,j}` the o_proj column:
//!
//! - [`HeadMetric::Norm`]: `‖W_{:,j}‖₂² · ‖X_j‖₂²`, the energy the channel feeds into the output
//!   when cross terms are ignored (activation-weighted norm).
//! - [`HeadMetric::WandaSp`]: FLAP's Wanda-sp baseline (`prune_wanda_sp`): the Wanda score
//!   `|W_ij|·‖X_j‖₂` averaged over o_proj's rows, `mean_i |W_ij| · ‖X_j‖₂`.
//! - [`HeadMetric::Fluctuation`]: FLAP's WIFV metric, `var(X_j) · ‖W_{:,j}‖₂²` (§3.2, eq. 6),
//!   **squared** for attention as the official code does (`metrics[...](...) ** 2` for
//!   `self_attn.o_proj`); the square changes which heads win when a head's channels differ.
//!   `var` is the unbiased variance over calibration tokens (FLAP's running estimate differs from
//!   it by a constant factor, which changes no ranking).
//!
//! A head's score is the sum of its channels' scores (uniform allocation, FLAP `UL-UM`). With
//! adaptive allocation the channel scores are first standardised within the layer and a head's
//! score is their mean (FLAP `AL-MM`: `standarlization`, then `reshape(-1, head_dim).mean`), so
//! heads of different layers compare (see [`super::alloc`]).
//!
//! Grouped-query attention ([`GqaMode`]): `KvGroups` removes whole KV groups (the KV head, its
//! query heads; group score = mean of its heads' scores, which ranks like the sum since a
//! layer's groups are equal); `PerGroup`
//! removes the same number of query heads from every group, each group its own lowest, and keeps
//! all KV heads. Either way every layer keeps `n_heads % n_kv_heads == 0` and the query-to-KV
//! mapping of HF's `repeat_kv`.
//!
//! Uniform fractions are rounded per layer to whole units (a KV group, or one head per group):
//! with SmolLM2's 9 heads in 3 groups, KvGroups can only remove 0, 1/3 or 2/3 of the heads, and
//! 0.2 becomes 1/3. The realised fraction is in the step details; this step never refuses a
//! fraction for not being exact. A count that would leave a layer (or a group) empty is refused.
//!
//! Optional FLAP bias compensation adds the removed channels' mean contribution to o_proj's bias
//! ([`super::surgery::removed_mean_contribution`]). For llama the HF flag `attention_bias` covers
//! q/k/v/o together, so q/k/v get zero biases too (and every layer gets them), keeping the model
//! loadable by transformers.

use super::alloc::{self, ascending, standardize};
use super::stats::{collect_width_stats, ColumnMoments, WidthStats};
use super::{surgery, sync_config, Progress, StepDetails, WidthAllocation};
use crate::calibrate::CalibSet;
use crate::model::config::Arch;
use crate::model::observer::Site;
use crate::model::weights::Tensor;
use crate::LinearKind;
use crate::{Error, Model, Result};
use serde_json::json;

/// How heads are scored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HeadMetric {
    /// Activation-weighted norm of the head's o_proj input columns: Σ_j ‖W_o[:,j]‖²·‖X_j‖².
    Norm,
    /// FLAP fluctuation: (per-channel activation variance × squared o_proj column norm)², as in
    /// the official code.
    Fluctuation,
    /// FLAP's Wanda-sp baseline: Σ_j mean_i |W_o[i,j]| · ‖X_j‖.
    WandaSp,
}

/// How removal respects grouped-query attention.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GqaMode {
    /// Remove whole KV groups (a KV head with all its query heads).
    KvGroups,
    /// Remove the same number of query heads from every group (KV heads stay).
    PerGroup,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct HeadSpec {
    /// Fraction of query heads removed (model-wide).
    pub fraction: f64,
    pub metric: HeadMetric,
    pub gqa: GqaMode,
    pub allocation: WidthAllocation,
    /// FLAP bias compensation on o_proj (adds zero q/k/v biases for llama).
    #[serde(default)]
    pub bias_compensation: bool,
    /// Re-fit o_proj on the kept heads (and a bias) towards the dense model's outputs
    /// ([`crate::recover::width`]).
    #[serde(default)]
    pub reconstruct: Option<crate::recover::ReconOptions>,
}

/// Per input channel of o_proj: the channel scores of `metric` (higher = more important).
/// `o` is o_proj's weight `[hidden, n_heads·hd]`, `x` the moments of its input.
pub fn channel_scores(o: &Tensor, x: &ColumnMoments, metric: HeadMetric) -> Vec<f64> {
    let (rows, cols) = (o.rows(), o.cols());
    let d = o.data();
    let (mut sq, mut abs) = (vec![0f64; cols], vec![0f64; cols]);
    for r in 0..rows {
        for (j, &w) in d[r * cols..(r + 1) * cols].iter().enumerate() {
            let w = w as f64;
            sq[j] += w * w;
            abs[j] += w.abs();
        }
    }
    match metric {
        HeadMetric::Norm => sq.iter().zip(x.sum_sq()).map(|(w, x)| w * x).collect(),
        HeadMetric::WandaSp => abs
            .iter()
            .zip(x.sum_sq())
            .map(|(w, x)| w / rows as f64 * x.sqrt())
            .collect(),
        HeadMetric::Fluctuation => sq
            .iter()
            .zip(x.var())
            .map(|(w, v)| (w * v) * (w * v))
            .collect(),
    }
}

/// Sum of `channel` over each head's `head_dim` channels.
pub fn head_sums(channel: &[f64], head_dim: usize) -> Vec<f64> {
    channel.chunks(head_dim).map(|c| c.iter().sum()).collect()
}

/// Head scores of one layer as the allocation compares them: raw sums (uniform) or means of
/// the layer-standardised channel scores (adaptive).
pub fn head_scores(channel: &[f64], head_dim: usize, allocation: WidthAllocation) -> Vec<f64> {
    match allocation {
        WidthAllocation::Uniform => head_sums(channel, head_dim),
        WidthAllocation::Adaptive => {
            let mut c = channel.to_vec();
            standardize(&mut c);
            head_sums(&c, head_dim)
                .into_iter()
                .map(|s| s / head_dim as f64)
                .collect()
        }
    }
}

/// What goes in one layer.
#[derive(Debug, Clone, Default, PartialEq)]
struct LayerCut {
    q_removed: Vec<usize>,
    kv_removed: Vec<usize>,
}

/// Shapes of a layer: `(n_heads, n_kv_heads, group size)`, checked.
fn layer_heads(model: &Model, l: usize) -> Result<(usize, usize, usize)> {
    let hd = model.config.head_dim;
    let lw = &model.weights.layers[l];
    let (nh, nk) = (lw.n_heads(hd), lw.n_kv_heads(hd));
    if hd == 0 || nh == 0 || nk == 0 || nh % nk != 0 || lw.q.out_features() != nh * hd {
        return Err(Error::Invalid(format!(
            "head pruning: layer {l} has {nh} query heads and {nk} KV heads (head_dim {hd}); they must be positive with n_heads a multiple of n_kv_heads"
        )));
    }
    Ok((nh, nk, nh / nk))
}

/// Per layer: removable units, their size in heads, how many may go (each layer keeps one unit).
fn units(gqa: GqaMode, nk: usize, g: usize) -> (usize, usize, usize) {
    match gqa {
        GqaMode::KvGroups => (nk, g, nk - 1),
        GqaMode::PerGroup => (g, nk, g - 1),
    }
}

/// Remove attention heads from `model` as `spec` asks.
pub fn prune_heads(
    model: &mut Model,
    calib: &CalibSet,
    spec: &HeadSpec,
    progress: Progress<'_>,
) -> Result<StepDetails> {
    let req = validate(model, spec)?;
    if req.nothing() {
        return Ok(req.unchanged(model, spec));
    }
    let stats = collect_width_stats(model, calib, &[Site::AttnOut], progress)?;
    let Some(opts) = spec.reconstruct else {
        return apply(model, &stats, spec, req);
    };
    let dense = model.clone();
    let details = apply(model, &stats, spec, req)?;
    super::reconstruct_width(&dense, model, calib, LinearKind::O, opts, details, progress)
}

/// [`prune_heads`] with statistics collected beforehand on this very model
/// ([`collect_width_stats`] watching [`Site::AttnOut`]), e.g. in one pass shared with neuron
/// pruning as FLAP does.
pub fn prune_heads_with_stats(
    model: &mut Model,
    stats: &WidthStats,
    spec: &HeadSpec,
) -> Result<StepDetails> {
    let req = validate(model, spec)?;
    if req.nothing() {
        return Ok(req.unchanged(model, spec));
    }
    apply(model, stats, spec, req)
}

/// A checked request: per-layer shapes and unit counts.
struct Request {
    /// `(n_heads, n_kv_heads, group size)` per layer.
    shapes: Vec<(usize, usize, usize)>,
    total_heads: usize,
    /// Heads per unit and units that may go, per layer.
    sizes: Vec<usize>,
    caps: Vec<usize>,
    /// Heads to remove (adaptive).
    target: usize,
    /// Units per layer (uniform).
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

    fn unchanged(&self, model: &Model, spec: &HeadSpec) -> StepDetails {
        let cuts = vec![LayerCut::default(); self.shapes.len()];
        details(
            model,
            spec,
            &cuts,
            &[],
            self.params_before,
            self.total_heads,
        )
    }
}

/// Check `spec` against `model` (everything that needs no statistics).
fn validate(model: &Model, spec: &HeadSpec) -> Result<Request> {
    alloc::check_fraction(spec.fraction, "head pruning")?;
    let n_layers = model.weights.layers.len();
    let shapes = (0..n_layers)
        .map(|l| layer_heads(model, l))
        .collect::<Result<Vec<_>>>()?;
    let total_heads: usize = shapes.iter().map(|s| s.0).sum();
    let unit_info: Vec<(usize, usize, usize)> = shapes
        .iter()
        .map(|&(_, nk, g)| units(spec.gqa, nk, g))
        .collect();
    let n_units: Vec<usize> = unit_info.iter().map(|u| u.0).collect();
    let sizes: Vec<usize> = unit_info.iter().map(|u| u.1).collect();
    let caps: Vec<usize> = unit_info.iter().map(|u| u.2).collect();
    let target = (spec.fraction * total_heads as f64).round() as usize;
    let uniform = match spec.allocation {
        WidthAllocation::Uniform => Some(alloc::uniform_counts(
            spec.fraction,
            &n_units,
            &caps,
            "head pruning",
        )?),
        WidthAllocation::Adaptive => {
            let cap: usize = caps.iter().zip(&sizes).map(|(c, s)| c * s).sum();
            if target > cap {
                return Err(Error::Invalid(format!(
                    "head pruning: {target} of {total_heads} heads requested, but at most {cap} can go while every layer keeps one {}",
                    match spec.gqa { GqaMode::KvGroups => "KV group", GqaMode::PerGroup => "head per group" }
                )));
            }
            None
        }
    };
    Ok(Request {
        shapes,
        total_heads,
        sizes,
        caps,
        target,
        uniform,
        params_before: model.weights.num_params(),
    })
}

/// Score, choose and cut (the model changes only after every check has passed).
fn apply(
    model: &mut Model,
    stats: &WidthStats,
    spec: &HeadSpec,
    req: Request,
) -> Result<StepDetails> {
    let Request {
        shapes,
        total_heads,
        sizes,
        caps,
        target,
        uniform,
        params_before,
    } = req;
    let n_layers = shapes.len();
    let hd = model.config.head_dim;
    // Scores per layer (as compared by the allocation), per query head.
    let mut scores = Vec::with_capacity(n_layers);
    for l in 0..n_layers {
        let x = stats.require(l, Site::AttnOut)?;
        let o = &model.weights.layers[l].o;
        if x.cols() != o.in_features() {
            return Err(Error::Invalid(format!(
                "head pruning: statistics of layer {l} have {} columns, but its o_proj has {} inputs (statistics from another model?)",
                x.cols(),
                o.in_features()
            )));
        }
        let ch = channel_scores(&model.weights.layers[l].o.weight, x, spec.metric);
        alloc::check_finite(&ch, &format!("head pruning, layer {l}"))?;
        scores.push(head_scores(&ch, hd, spec.allocation));
    }
    // Unit scores per layer, ascending, with the heads each unit removes.
    let mut sorted_scores = Vec::with_capacity(n_layers);
    let mut sorted_units: Vec<Vec<Vec<usize>>> = Vec::with_capacity(n_layers);
    for (l, s) in scores.iter().enumerate() {
        let (_, nk, g) = shapes[l];
        let (us, heads): (Vec<f64>, Vec<Vec<usize>>) = match spec.gqa {
            GqaMode::KvGroups => {
                let gs: Vec<f64> = (0..nk)
                    .map(|k| s[k * g..(k + 1) * g].iter().sum::<f64>() / g as f64)
                    .collect();
                ascending(&gs)
                    .into_iter()
                    .map(|k| (gs[k], (k * g..(k + 1) * g).collect()))
                    .unzip()
            }
            GqaMode::PerGroup => {
                // Unit r: the r-th lowest head of every group; score = mean over groups.
                let order: Vec<Vec<usize>> = (0..nk)
                    .map(|k| {
                        ascending(&s[k * g..(k + 1) * g])
                            .into_iter()
                            .map(|i| k * g + i)
                            .collect()
                    })
                    .collect();
                (0..g)
                    .map(|r| {
                        let hs: Vec<usize> = order.iter().map(|o| o[r]).collect();
                        (hs.iter().map(|&h| s[h]).sum::<f64>() / nk as f64, hs)
                    })
                    .unzip()
            }
        };
        sorted_scores.push(us);
        sorted_units.push(heads);
    }
    let counts = match uniform {
        Some(c) => c,
        None => alloc::adaptive_counts(&sorted_scores, &sizes, &caps, target, "head pruning")?,
    };
    let cuts: Vec<LayerCut> = (0..n_layers)
        .map(|l| {
            let mut q: Vec<usize> = sorted_units[l][..counts[l]].concat();
            q.sort_unstable();
            let kv = match spec.gqa {
                GqaMode::KvGroups => {
                    let g = shapes[l].2;
                    q.iter().step_by(g).map(|h| h / g).collect()
                }
                GqaMode::PerGroup => Vec::new(),
            };
            LayerCut {
                q_removed: q,
                kv_removed: kv,
            }
        })
        .collect();

    // Apply (nothing above touched the model).
    let llama = model.config.arch == Arch::Llama;
    for (l, cut) in cuts.iter().enumerate() {
        let (nh, nk, _) = shapes[l];
        let lw = &mut model.weights.layers[l];
        let removed_cols = surgery::head_rows(&cut.q_removed, hd);
        let delta = spec.bias_compensation.then(|| {
            let x = stats
                .get(l, Site::AttnOut)
                .map(ColumnMoments::mean)
                .unwrap_or_default();
            surgery::removed_mean_contribution(&lw.o.weight, &removed_cols, &x)
        });
        let keep_q = surgery::complement(nh, &cut.q_removed);
        let keep_kv = surgery::complement(nk, &cut.kv_removed);
        surgery::keep_heads(lw, hd, &keep_q, &keep_kv);
        if let Some(delta) = delta {
            surgery::add_to_bias(&mut lw.o, &delta);
            if llama {
                for lin in [&mut lw.q, &mut lw.k, &mut lw.v] {
                    surgery::ensure_bias(lin);
                }
            }
        }
    }
    if spec.bias_compensation {
        model.config.o_bias = true;
        if llama {
            model.config.qkv_bias = true;
        }
    }
    sync_config(model);
    Ok(details(
        model,
        spec,
        &cuts,
        &scores,
        params_before,
        total_heads,
    ))
}

fn details(
    model: &Model,
    spec: &HeadSpec,
    cuts: &[LayerCut],
    scores: &[Vec<f64>],
    params_before: usize,
    total_heads: usize,
) -> StepDetails {
    let hd = model.config.head_dim;
    let removed: usize = cuts.iter().map(|c| c.q_removed.len()).sum();
    json!({
        "step": "heads",
        "metric": spec.metric,
        "gqa": spec.gqa,
        "allocation": spec.allocation,
        "bias_compensation": spec.bias_compensation,
        "requested_fraction": spec.fraction,
        "realised_fraction": removed as f64 / total_heads.max(1) as f64,
        "heads_removed": removed,
        "heads_before": total_heads,
        "removed_query_heads": cuts.iter().map(|c| c.q_removed.clone()).collect::<Vec<_>>(),
        "removed_kv_heads": cuts.iter().map(|c| c.kv_removed.clone()).collect::<Vec<_>>(),
        "heads_per_layer": model.weights.layers.iter().map(|l| l.n_heads(hd)).collect::<Vec<_>>(),
        "kv_heads_per_layer": model.weights.layers.iter().map(|l| l.n_kv_heads(hd)).collect::<Vec<_>>(),
        "head_scores": scores,
        "params_before": params_before,
        "params_after": model.weights.num_params(),
    })
}
