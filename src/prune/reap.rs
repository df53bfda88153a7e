//! Expert removal for mixtures of experts by a router-weighted activation score (REAP:
//! Lasby et al., "REAP the Experts: Why Pruning Prevails for One-Shot MoE Compression", 2025).
//!
//! For expert `j` of a block, over the calibration tokens routed to it (`X_j`, the tokens that
//! chose it among their top-k): `S_j = (1/|X_j|) Σ_{x ∈ X_j} g_j(x) · ‖f_j(x)‖₂`, with `g_j(x)`
//! the routing weight the block applies (after top-k renormalisation when the family does it)
//! and `f_j(x)` the expert's output. An expert no token reached scores 0. In every block the
//! `round(F · experts)` lowest-scoring experts are removed (ties: the higher index first) and
//! the router loses their rows, so the remaining experts are routed among themselves, as
//! transformers routes a checkpoint with that many experts. `F = 0` removes nothing and leaves
//! the model bit-identical.
//!
//! Blocks are scored one after another on the dense model's activations (calibration passes
//! through each block unchanged before the next is scored), so block `i`'s scores do not depend
//! on what was removed before it.

use crate::calibrate::runner::{BlockRunner, Pass};
use crate::calibrate::CalibSet;
use crate::model::forward::embed;
use crate::model::moe;
use crate::model::observer::{ChunkObserver, Observer, Site};
use crate::model::rope::Rope;
use crate::model::weights::Moe;
use crate::{Error, Model, Result};
use serde::Serialize;

/// What [`remove_experts`] did in one block.
#[derive(Debug, Clone, Serialize)]
pub struct ReapLayer {
    /// REAP score of every expert (original indices).
    pub scores: Vec<f64>,
    /// Removed experts (original indices, ascending).
    pub removed: Vec<usize>,
}

/// The normed MLP inputs of one block, in row order.
struct MlpInputs {
    layer: usize,
    rows: Vec<f32>,
}

impl Observer for MlpInputs {
    fn wants_linear_inputs(&self, layer: usize) -> bool {
        layer == self.layer
    }
    fn linear_input(&mut self, layer: usize, site: Site, x: &[f32], _: usize, _: usize) {
        if layer == self.layer && site == Site::MlpIn {
            self.rows.extend_from_slice(x);
        }
    }
}

impl ChunkObserver for MlpInputs {
    type Part = MlpInputs;
    fn part(&mut self) -> MlpInputs {
        MlpInputs {
            layer: self.layer,
            rows: Vec::new(),
        }
    }
    fn merge(&mut self, part: MlpInputs) {
        self.rows.extend(part.rows);
    }
}

/// REAP scores of the experts of `m` for normed tokens `x` `[rows, hidden]`.
pub fn scores(m: &Moe, mc: &crate::model::config::MoeConfig, x: &[f32], rows: usize) -> Vec<f64> {
    let d = m.router.cols();
    let routes = moe::routes(m, mc, x, rows);
    let mut sum = vec![0f64; m.experts.len()];
    let mut count = vec![0usize; m.experts.len()];
    for (r, rt) in routes.iter().enumerate() {
        let xr = &x[r * d..(r + 1) * d];
        for (&e, &g) in rt.experts.iter().zip(&rt.weights) {
            let mut y = vec![0f32; d];
            moe::expert_forward(&m.experts[e], xr, 1, &mut y);
            let norm = y.iter().map(|v| (*v as f64).powi(2)).sum::<f64>().sqrt();
            sum[e] += g as f64 * norm;
            count[e] += 1;
        }
    }
    sum.iter()
        .zip(&count)
        .map(|(s, &c)| if c == 0 { 0.0 } else { s / c as f64 })
        .collect()
}

/// Remove the fraction `fraction` of experts with the lowest REAP scores from every mixture
/// block of `model`, scored on `calib` (see the module docs).
pub fn remove_experts(
    model: &mut Model,
    calib: &CalibSet,
    fraction: f64,
) -> Result<Vec<ReapLayer>> {
    let Some(mc) = model.config.family.moe.clone() else {
        return Err(Error::Invalid(format!(
            "--experts: {} is not a mixture of experts",
            model.config.arch.model_type()
        )));
    };
    if !(0.0..1.0).contains(&fraction) {
        return Err(Error::Invalid(format!(
            "--experts must be in [0, 1), got {fraction}"
        )));
    }
    let n_experts = mc.num_experts;
    let k = (fraction * n_experts as f64).round() as usize;
    if n_experts - k < mc.top_k {
        return Err(Error::Invalid(format!(
            "--experts {fraction}: {} of {n_experts} experts would remain, fewer than the {} each \
             token uses",
            n_experts - k,
            mc.top_k
        )));
    }
    let (n, len) = (calib.n, calib.len);
    let rope = Rope::new(&model.config, len);
    let mut h = embed(&model.weights, &calib.ids)?;
    let mut runner = BlockRunner::new();
    let mut out = Vec::new();
    for i in 0..model.weights.layers.len() {
        let lw = &model.weights.layers[i];
        let mut obs = MlpInputs {
            layer: i,
            rows: Vec::new(),
        };
        runner.run(
            &model.config,
            i,
            lw,
            &rope,
            &mut h,
            n,
            len,
            Pass::Propagate,
            &mut obs,
        )?;
        let Some(m) = &lw.extra.moe else { continue };
        let s = scores(m, &mc, &obs.rows, n * len);
        let mut order: Vec<usize> = (0..s.len()).collect();
        order.sort_by(|&a, &b| s[a].total_cmp(&s[b]).then(b.cmp(&a)));
        let mut removed = order[..k.min(s.len())].to_vec();
        removed.sort_unstable();
        out.push(ReapLayer { scores: s, removed });
    }
    // Apply after scoring every block on the dense model.
    let mut r = out.iter();
    for lw in &mut model.weights.layers {
        let Some(m) = &mut lw.extra.moe else { continue };
        let gone = &r.next().expect("one report per mixture block").removed;
        let keep: Vec<usize> = (0..m.experts.len()).filter(|e| !gone.contains(e)).collect();
        let d = m.router.cols();
        let router = m.router.values();
        let rows: Vec<f32> = keep
            .iter()
            .flat_map(|&e| router[e * d..(e + 1) * d].to_vec())
            .collect();
        m.router = crate::Tensor::new(vec![keep.len(), d], rows);
        let old = std::mem::take(&mut m.experts);
        m.experts = old
            .into_iter()
            .enumerate()
            .filter(|(e, _)| !gone.contains(e))
            .map(|(_, x)| x)
            .collect();
    }
    if let Some(m) = &mut model.config.family.moe {
        m.num_experts = n_experts - k;
    }
    Ok(out)
}
