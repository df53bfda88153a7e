//! Unstructured / N:M pruning of the experts of a mixture-of-experts block, called by the
//! layer-sequential driver ([`super::driver`]) after the block's attention linears.
//!
//! Each expert's linears are pruned with the driver's method and target, from statistics of
//! **only the calibration tokens routed to that expert** (gate/up: the normed hidden rows the
//! router sent it; down: its own SwiGLU output on those rows), as Wanda's and SparseGPT's
//! per-linear statistics are meant for a linear that sees only those inputs. The counts are the
//! routed tokens (Wanda's per-column scale and SparseGPT's relative damping do not depend on
//! the normalisation). An expert that no calibration token reached has no statistics: it is
//! pruned by weight magnitude instead, and reported ([`ExpertReport::unreached`]).

use super::stats::SiteStats;
use super::{Needs, Pruner, Scope, Target};
use crate::calibrate::runner::{BlockRunner, Pass};
use crate::model::config::{Arch, Config};
use crate::model::observer::{ChunkObserver, Observer, Site};
use crate::model::rope::Rope;
use crate::model::weights::LayerWeights;
use crate::{Error, LinearKind, Result};
use serde::Serialize;
use std::collections::HashMap;

/// Statistics of every expert input of one block: `(expert, site)` → sums over routed tokens.
pub struct ExpertStats {
    pub layer: usize,
    pub needs: Needs,
    pub sites: HashMap<(usize, Site), SiteStats>,
}

impl ExpertStats {
    pub fn new(layer: usize, needs: Needs) -> ExpertStats {
        ExpertStats {
            layer,
            needs,
            sites: HashMap::new(),
        }
    }
}

impl Observer for ExpertStats {
    fn wants_linear_inputs(&self, layer: usize) -> bool {
        layer == self.layer
    }
    fn wants_block_output(&self, _layer: usize) -> bool {
        false
    }
    fn expert_input(
        &mut self,
        layer: usize,
        e: usize,
        site: Site,
        x: &[f32],
        rows: usize,
        cols: usize,
    ) {
        if layer != self.layer {
            return;
        }
        let needs = self.needs;
        self.sites
            .entry((e, site))
            .or_insert_with(|| SiteStats::new(cols, needs))
            .add(x, rows, rows);
    }
}

impl ChunkObserver for ExpertStats {
    type Part = ExpertStats;
    fn part(&mut self) -> ExpertStats {
        ExpertStats::new(self.layer, self.needs)
    }
    /// Parts come back in chunk order, so the sums do not depend on the thread count.
    fn merge(&mut self, part: ExpertStats) {
        for (key, s) in part.sites {
            match self.sites.get_mut(&key) {
                None => {
                    self.sites.insert(key, s);
                }
                Some(acc) => add_sums(acc, &s),
            }
        }
    }
}

fn add_sums(acc: &mut SiteStats, s: &SiteStats) {
    acc.samples += s.samples;
    acc.tokens += s.tokens;
    for (a, b) in [(&mut acc.col_sq, &s.col_sq), (&mut acc.xtx, &s.xtx)] {
        if let (Some(a), Some(b)) = (a, b) {
            a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
        }
    }
}

/// What the driver cannot do on a mixture of experts, refused before any work: OWL allocation
/// and recovery (their statistics are per dense MLP); and the experts' shapes for the pattern.
/// `owl`: OWL allocation asked; `recovery`: permutation, swaps or reconstruction asked.
pub fn validate(
    model: &crate::Model,
    pattern: super::Pattern,
    owl: bool,
    recovery: bool,
) -> Result<()> {
    let layers = &model.weights.layers;
    if !layers.iter().any(|l| l.extra.moe.is_some()) {
        return Ok(());
    }
    let arch = model.config.arch.model_type();
    if owl {
        return Err(Error::Invalid(format!(
            "OWL allocation is not implemented for mixtures of experts ({arch}); use uniform"
        )));
    }
    if recovery {
        return Err(Error::Invalid(format!(
            "permutation, swap refinement and reconstruction are not implemented for mixtures \
             of experts ({arch})"
        )));
    }
    for (i, l) in layers.iter().enumerate() {
        for (e, ex) in l
            .extra
            .moe
            .iter()
            .flat_map(|m| m.experts.iter().enumerate())
        {
            for (kind, lin) in [
                (LinearKind::Gate, &ex.gate),
                (LinearKind::Up, &ex.up),
                (LinearKind::Down, &ex.down),
            ] {
                let name = expert_tensor_name(model.config.arch, i, e, kind);
                if lin.is_factored() {
                    return Err(Error::Invalid(format!("{name} is low-rank factorised")));
                }
                super::mask::check_shape(pattern, lin.out_features(), lin.in_features(), &name)?;
            }
        }
    }
    Ok(())
}

/// What happened to the experts of the pruned blocks.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ExpertReport {
    /// `(layer, expert)` that no calibration token was routed to (pruned by magnitude).
    pub unreached: Vec<(usize, usize)>,
    /// Calibration tokens routed to each expert, per layer.
    pub tokens: Vec<Vec<usize>>,
}

/// One pruned expert linear: (name, shape, target, zeros).
pub type ExpertTensor = (String, [usize; 2], f64, usize);

/// HF name of expert `e`'s linear `kind` in block `layer` (Mixtral's
/// `block_sparse_moe.experts.{e}.w1/w3/w2`, else Qwen3-MoE's `mlp.experts.{e}.*_proj`).
pub fn expert_tensor_name(arch: Arch, layer: usize, e: usize, kind: LinearKind) -> String {
    let i = match kind {
        LinearKind::Gate => 0,
        LinearKind::Up => 1,
        _ => 2,
    };
    let (prefix, n) = match arch {
        Arch::Mixtral => ("block_sparse_moe", ["w1", "w3", "w2"][i]),
        _ => ("mlp", ["gate_proj", "up_proj", "down_proj"][i]),
    };
    crate::model::names::layer_tensor(layer, &format!("{prefix}.experts.{e}.{n}.weight"))
}

/// Collect the expert statistics of block `layer` on the unpruned block (activations `h`
/// unchanged); `None` for a block without experts or a method without statistics.
pub fn collect(
    cfg: &Config,
    layer: usize,
    lw: &LayerWeights,
    rope: &Rope,
    h: &mut [f32],
    (n, len): (usize, usize),
    needs: Needs,
) -> Result<Option<ExpertStats>> {
    if lw.extra.moe.is_none() || needs == Needs::default() {
        return Ok(None);
    }
    let mut stats = ExpertStats::new(layer, needs);
    BlockRunner::new().run(
        cfg,
        layer,
        lw,
        rope,
        h,
        n,
        len,
        Pass::Statistics,
        &mut stats,
    )?;
    Ok(Some(stats))
}

/// Prune the experts' linears `kinds` (of gate/up/down) of block `layer` to `target` with
/// `method`, from `stats` ([`collect`]).
#[allow(clippy::too_many_arguments)]
pub fn prune_block_experts(
    arch: Arch,
    layer: usize,
    lw: &mut LayerWeights,
    stats: Option<&ExpertStats>,
    method: &dyn Pruner,
    kinds: &[LinearKind],
    target: impl Fn(LinearKind) -> Target,
    report: &mut ExpertReport,
) -> Result<Vec<ExpertTensor>> {
    let Some(moe) = lw.extra.moe.as_mut() else {
        return Ok(Vec::new());
    };
    let needs = method.needs();
    let n_experts = moe.experts.len();
    let magnitude = super::pruner(super::Method::Magnitude, Scope::Matrix);
    let none = ExpertStats::new(layer, needs);
    let stats = stats.unwrap_or(&none);
    let mut tokens = vec![0; n_experts];
    let mut out = Vec::new();
    for (e, ex) in moe.experts.iter_mut().enumerate() {
        let reached = stats.sites.get(&(e, Site::MlpIn)).map_or(0, |s| s.tokens);
        tokens[e] = reached;
        let calibrated = needs == Needs::default() || reached > 0;
        if !calibrated {
            report.unreached.push((layer, e));
        }
        for (kind, lin) in [
            (LinearKind::Gate, &mut ex.gate),
            (LinearKind::Up, &mut ex.up),
            (LinearKind::Down, &mut ex.down),
        ] {
            if !kinds.contains(&kind) {
                continue;
            }
            let name = expert_tensor_name(arch, layer, e, kind);
            let (rows, cols) = (lin.out_features(), lin.in_features());
            if lin.weight.data().iter().any(|v| !v.is_finite()) {
                return Err(Error::Numeric(format!(
                    "block {layer}: {name} contains NaN/Inf weights"
                )));
            }
            let t = target(kind);
            let site = if kind == LinearKind::Down {
                Site::MlpDown
            } else {
                Site::MlpIn
            };
            let empty = SiteStats::new(0, Needs::default());
            let st = stats.sites.get(&(e, site)).unwrap_or(&empty);
            let m: &dyn Pruner = if calibrated {
                method
            } else {
                magnitude.as_ref()
            };
            m.prune(lin.weight.data_mut(), rows, cols, st, t, &name)?;
            out.push((name, [rows, cols], t.sparsity, lin.weight.count_zeros()));
        }
    }
    report.tokens.push(tokens);
    Ok(out)
}
