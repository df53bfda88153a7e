//! `--target-params`: pick the mix of depth and width that meets a parameter budget best.
//!
//! Users usually know how small the model must be, not which dimension to cut. Single-dimension
//! tables (README) show that the best dimension changes with the budget, so lopper tries a small
//! grid of mixes and keeps the one with the lowest perplexity on calibration text:
//!
//! * the budget `B = target × params` is split between **depth** (whole blocks, ShortGPT Block
//!   Influence) and **FFN width** (neurons, FLAP fluctuation + bias compensation — the best width
//!   metric in lopper's measurements), with a depth share `s` from a grid (default
//!   0, ¼, ½, ¾, 1);
//! * depth takes `⌊s·B / block params⌋` blocks; neurons take the rest of the budget (a uniform
//!   fraction of the remaining blocks' FFN channels), so every candidate lands on the target to
//!   within about one FFN channel per layer (bias compensation adds one bias vector per block);
//!   shares that give the same block count are run once;
//! * each candidate is run by the plan runner on a copy of the model with the same calibration
//!   set and scored by its perplexity on the first `score_windows` calibration windows (the
//!   search never looks at the evaluation text); the best copy is kept.
//!
//! The grid is deliberately small: Block Influence is measured once, but every candidate costs a
//! calibration pass for its neuron scores plus its scoring. Candidates
//! that would need to remove 90% or more of the FFN channels are skipped; a budget no candidate
//! can meet is an error.

use super::alloc::ascending;
use super::collect::observe_all;
use super::depth::{BlockInfluenceObserver, DepthMetric, DepthSpec, LayerSelection};
use super::neurons::{NeuronMetric, NeuronSpec};
use super::plan::{run_plan, ModelSize, Plan, Step, StepRecord};
use super::{Progress, WidthAllocation};
use crate::calibrate::CalibSet;
use crate::{Error, Model, Result};
use serde::Serialize;
use std::time::Instant;

/// The request.
#[derive(Debug, Clone, Serialize)]
pub struct TargetSpec {
    /// Fraction of all parameters to remove, in (0, 0.9).
    pub target: f64,
    /// Shares of the budget given to depth; the rest goes to FFN neurons.
    pub depth_shares: Vec<f64>,
    /// Calibration windows each candidate is scored on.
    pub score_windows: usize,
}

impl TargetSpec {
    /// The default grid for `target`.
    pub fn new(target: f64) -> TargetSpec {
        TargetSpec {
            target,
            depth_shares: vec![0.0, 0.25, 0.5, 0.75, 1.0],
            score_windows: 16,
        }
    }
}

/// One candidate mix.
#[derive(Debug, Clone, Serialize)]
pub struct Candidate {
    /// Share of the budget asked of depth.
    pub depth_share: f64,
    /// Blocks removed.
    pub layers: usize,
    /// Fraction of the remaining FFN channels removed.
    pub neuron_fraction: f64,
    /// The plan's steps, as in `report.json`.
    pub steps: Vec<serde_json::Value>,
    /// Measured after running it (None when it was skipped).
    pub params_removed_fraction: Option<f64>,
    pub calib_perplexity: Option<f64>,
    pub seconds: Option<f64>,
    /// Why it was not run.
    pub skipped: Option<String>,
}

/// What the search did, and the chosen model.
pub struct SearchOutcome {
    pub model: Model,
    pub candidates: Vec<Candidate>,
    /// Index into `candidates`.
    pub chosen: usize,
    /// The chosen candidate's step records.
    pub records: Vec<StepRecord>,
}

/// Parameters of all blocks together (linears, biases, norms, shortcuts).
fn all_block_params(model: &Model) -> usize {
    model
        .weights
        .named_tensors()
        .iter()
        .filter(|(n, _)| n.starts_with(crate::model::names::LAYERS_PREFIX))
        .map(|(_, t)| t.len())
        .sum()
}

/// Perplexity of `model` on the first `windows` windows of `calib`.
pub fn calib_perplexity(model: &Model, calib: &CalibSet, windows: usize) -> Result<f64> {
    let n = windows.min(calib.n);
    if n == 0 || calib.len < 2 {
        return Err(Error::Invalid(
            "scoring needs at least one calibration window of 2 or more tokens".into(),
        ));
    }
    let (mut nll, mut count) = (0f64, 0usize);
    for i in 0..n {
        let (s, c) = crate::eval::window_nll(model, calib.window(i))?;
        nll += s;
        count += c;
    }
    Ok((nll / count as f64).exp())
}

/// The candidate plans for `spec` on `model` (no model is changed).
pub fn candidates(model: &Model, spec: &TargetSpec) -> Result<Vec<(Candidate, Option<Plan>)>> {
    if !(spec.target > 0.0 && spec.target < 0.9) {
        return Err(Error::Invalid(format!(
            "--target-params must be in (0, 0.9), got {}",
            spec.target
        )));
    }
    if spec.score_windows == 0 {
        return Err(Error::Invalid("--score-windows must be at least 1".into()));
    }
    if let Some(s) = spec.depth_shares.iter().find(|s| !(0.0..=1.0).contains(*s)) {
        return Err(Error::Invalid(format!(
            "depth shares must be in [0, 1], got {s}"
        )));
    }
    let layers = model.weights.layers.len();
    if layers < 2 {
        return Err(Error::Invalid(format!(
            "the model has {layers} block(s); the search needs at least 2"
        )));
    }
    let total = model.weights.num_params() as f64;
    let budget = spec.target * total;
    let avg_block = all_block_params(model) as f64 / layers as f64;
    let d = model.config.hidden_size as f64;
    let mut out = Vec::new();
    for &share in &spec.depth_shares {
        let n = ((share * budget / avg_block).floor() as usize).min(layers - 1);
        let rest = budget - n as f64 * avg_block;
        // FFN parameters of the blocks that stay (gate + up rows, down columns), on average.
        let ffn: f64 = model
            .weights
            .layers
            .iter()
            .map(|l| 3.0 * d * l.intermediate() as f64)
            .sum::<f64>()
            * (layers - n) as f64
            / layers as f64;
        let f = if rest > 0.0 { rest / ffn } else { 0.0 };
        let mut steps = Vec::new();
        if n > 0 {
            steps.push(Step::Layers(DepthSpec {
                select: LayerSelection::Count(n),
                metric: DepthMetric::BlockInfluence,
                reconstruct: None,
            }));
        }
        if f > 0.0 {
            steps.push(Step::Neurons(NeuronSpec {
                fraction: f.min(0.99),
                metric: NeuronMetric::Fluctuation,
                bias_compensation: true,
                allocation: WidthAllocation::Uniform,
                reconstruct: None,
            }));
        }
        let plan = Plan { steps };
        let same = out
            .iter()
            .find(|(c, _): &&(Candidate, Option<Plan>)| c.layers == n)
            .map(|(c, _)| c.depth_share);
        let skipped = if let Some(other) = same {
            Some(format!("same mix as depth share {other}"))
        } else if f >= 0.9 {
            Some(format!(
                "would remove {:.0}% of the FFN channels (limit 90%)",
                100.0 * f
            ))
        } else if plan.steps.is_empty() {
            Some("removes nothing".into())
        } else {
            None
        };
        let cand = Candidate {
            depth_share: share,
            layers: n,
            neuron_fraction: f,
            steps: plan.steps.iter().map(Step::spec_json).collect(),
            params_removed_fraction: None,
            calib_perplexity: None,
            seconds: None,
            skipped: skipped.clone(),
        };
        out.push((cand, skipped.is_none().then_some(plan)));
    }
    if out.iter().all(|(_, p)| p.is_none()) {
        return Err(Error::Invalid(format!(
            "no mix of depth and FFN width removes {:.1}% of the parameters (FFN channels would run out)",
            100.0 * spec.target
        )));
    }
    Ok(out)
}

/// Run every candidate on a copy of `model` and keep the best (lowest calibration perplexity).
/// `model` itself is not changed. Block Influence depends only on the dense model, so it is
/// measured once and each candidate removes its `n` lowest-scoring blocks by list (the blocks a
/// `Count(n)` step would pick), instead of one scoring pass per candidate.
pub fn search(
    model: &Model,
    calib: &CalibSet,
    spec: &TargetSpec,
    progress: Progress<'_>,
) -> Result<SearchOutcome> {
    let mut plans = candidates(model, spec)?;
    if plans.iter().any(|(c, p)| p.is_some() && c.layers > 0) {
        let mut obs = BlockInfluenceObserver::default();
        observe_all(model, calib, &mut obs, &mut |s, d, k| {
            progress(&format!("block influence: {s}"), d, k)
        })?;
        let order = ascending(&obs.scores());
        for step in plans
            .iter_mut()
            .filter_map(|(_, p)| p.as_mut())
            .flat_map(|p| &mut p.steps)
        {
            if let Step::Layers(DepthSpec { select, .. }) = step {
                if let LayerSelection::Count(n) = *select {
                    let mut list = order[..n].to_vec();
                    list.sort_unstable();
                    *select = LayerSelection::List(list);
                }
            }
        }
    }
    let start = ModelSize::of(model);
    let n = plans.len();
    let mut best: Option<(f64, usize, Model, Vec<StepRecord>)> = None;
    let mut cands = Vec::with_capacity(n);
    for (i, (mut cand, plan)) in plans.into_iter().enumerate() {
        let Some(plan) = plan else {
            cands.push(cand);
            continue;
        };
        let t = Instant::now();
        let mut m = model.clone();
        let label = format!("candidate {}/{n}", i + 1);
        let records = run_plan(
            &mut m,
            calib,
            &plan,
            &mut |_, _| Ok(None),
            &mut |s, d, k| progress(&format!("{label}: {s}"), d, k),
        )?;
        progress(&format!("{label}: scoring"), 0, 1);
        let ppl = calib_perplexity(&m, calib, spec.score_windows)?;
        let size = ModelSize::of(&m);
        cand.params_removed_fraction = Some(1.0 - size.params as f64 / start.params as f64);
        cand.calib_perplexity = Some(ppl);
        cand.seconds = Some(t.elapsed().as_secs_f64());
        cands.push(cand);
        // A NaN or infinite perplexity never wins.
        let score = if ppl.is_finite() { ppl } else { f64::INFINITY };
        if best.as_ref().is_none_or(|b| score < b.0) {
            best = Some((score, i, m, records));
        }
    }
    let (score, chosen, model, records) =
        best.ok_or_else(|| Error::Invalid("no candidate could be run".into()))?;
    if !score.is_finite() {
        return Err(Error::Numeric(
            "every candidate's calibration perplexity was NaN or infinite".into(),
        ));
    }
    Ok(SearchOutcome {
        model,
        candidates: cands,
        chosen,
        records,
    })
}
