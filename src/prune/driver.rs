//! The layer-sequential calibration driver shared by every pruning method
//! (the scheme of SparseGPT §3 and Wanda's `prune_wanda`):
//!
//! for each block *i*: (1) run the calibration activations through the *unpruned* block with a
//! [`StatsObserver`] to collect every linear input's statistics; (2) prune the block's linears;
//! (3) re-run the *pruned* block to produce block *i+1*'s inputs.
//!
//! Memory: the model plus one `[samples·len, hidden]` activation buffer; samples go through a
//! block in chunks of about [`CHUNK_ROWS`] tokens, one chunk per thread at a time
//! ([`BlockRunner`]), so the block's scratch stays small. With [`prune_model_spilled`] the
//! model is not resident either: its weights live in a memory-mapped scratch file
//! ([`Spill`]), each block is read when its turn comes and written back when finished.
//! OWL allocation adds one dense pass (statistics only) before the pruning pass.

use super::owl::{self, Allocation};
use super::stats::StatsObserver;
use super::{mask, pruner, wanda, Method, Needs, Pattern, Scope, Target};
use crate::calibrate::CalibSet;
use crate::model::flops;
use crate::model::forward::embed;
use crate::model::observer::{NoObserver, Site};
use crate::model::rope::Rope;
use crate::model::spill::Spill;
use crate::{Error, LinearKind, Model, Result};
use serde::Serialize;
use std::time::Instant;

/// The block runner lives in [`crate::calibrate`]; re-exported for existing callers.
pub use crate::calibrate::runner::{
    layer_stats, run_block, run_layer, BlockRunner, Pass, CHUNK_ROWS,
};
/// Re-exported from [`crate::model::names`], where tensor names live.
pub use crate::model::names::tensor_name;

/// A validated pruning request.
#[derive(Debug, Clone, Serialize)]
pub struct PrunePlan {
    pub method: Method,
    /// Comparison group for magnitude scores.
    pub scope: Scope,
    pub pattern: Pattern,
    /// Target sparsity of the pruned linears.
    pub sparsity: f64,
    pub allocation: Allocation,
    /// Overrides of the target for attention (q,k,v,o) / MLP (gate,up,down) linears.
    pub attn_sparsity: Option<f64>,
    pub mlp_sparsity: Option<f64>,
    /// Blocks left dense.
    pub skip_layers: Vec<usize>,
    /// Linear kinds left dense.
    pub skip_modules: Vec<LinearKind>,
    /// SparseGPT: arithmetic of the inverse-Hessian factorisation.
    pub hessian_precision: super::sparsegpt::Precision,
    /// RIA: exponent of the activation norm.
    pub ria_alpha: f64,
    /// Permutation, swap refinement and block reconstruction ([`crate::recover`]).
    pub recovery: crate::recover::Recovery,
}

impl PrunePlan {
    /// A plan with defaults: uniform allocation, nothing skipped.
    pub fn new(method: Method, pattern: Pattern, sparsity: f64) -> PrunePlan {
        PrunePlan {
            method,
            scope: Scope::Matrix,
            pattern,
            sparsity,
            allocation: Allocation::Uniform,
            attn_sparsity: None,
            mlp_sparsity: None,
            skip_layers: Vec::new(),
            skip_modules: Vec::new(),
            hessian_precision: Default::default(),
            ria_alpha: super::ria::DEFAULT_ALPHA,
            recovery: Default::default(),
        }
    }

    /// Check values against each other and against the model's shapes.
    pub fn validate(&self, model: &Model) -> Result<()> {
        let bad = |m: String| Err(Error::Invalid(m));
        for (what, s) in [
            ("--sparsity", Some(self.sparsity)),
            ("--attn-sparsity", self.attn_sparsity),
            ("--mlp-sparsity", self.mlp_sparsity),
        ] {
            if let Some(s) = s {
                if !(0.0..1.0).contains(&s) {
                    return bad(format!("{what} must be in [0, 1), got {s}"));
                }
            }
        }
        if let Some(implied) = self.pattern.implied_sparsity() {
            if (implied - self.sparsity).abs() > 1e-9
                || self.attn_sparsity.is_some()
                || self.mlp_sparsity.is_some()
            {
                return bad(format!(
                    "pattern {} fixes the sparsity at {implied} (at most N nonzero of every M); do not ask for {} as well",
                    self.pattern, self.sparsity
                ));
            }
            if matches!(self.allocation, Allocation::Owl { .. }) {
                return bad("OWL allocation needs a pattern whose sparsity can vary per layer (unstructured, block or vector), not N:M".into());
            }
        }
        if let Allocation::Owl { m, lambda } = self.allocation {
            // Negated so that NaN fails too.
            #[allow(clippy::neg_cmp_op_on_partial_ord)]
            if !(m > 0.0) || !(0.0..0.5).contains(&lambda) {
                return bad(format!(
                    "OWL needs M > 0 and 0 <= lambda < 0.5, got M={m} lambda={lambda}"
                ));
            }
        }
        self.recovery.validate(self.pattern)?;
        if self.method == Method::Ria && !(self.ria_alpha.is_finite() && self.ria_alpha >= 0.0) {
            return bad(format!(
                "--ria-alpha must be a finite number >= 0, got {}",
                self.ria_alpha
            ));
        }
        let n = model.weights.layers.len();
        if let Some(&l) = self.skip_layers.iter().find(|&&l| l >= n) {
            return bad(format!(
                "--skip-layers: layer {l} does not exist (the model has {n} layers, 0..={})",
                n - 1
            ));
        }
        let r = &self.recovery;
        super::experts::validate(
            model,
            self.pattern,
            matches!(self.allocation, Allocation::Owl { .. }),
            r.permute || r.refine.is_some() || r.reconstruct.is_some(),
        )?;
        for (i, l) in model.weights.layers.iter().enumerate() {
            for kind in LinearKind::ALL {
                let lin = l.linear(kind);
                if lin.weight.is_empty() {
                    continue; // a mixture's dense MLP (its experts are checked above)
                }
                if lin.is_factored() {
                    return bad(format!(
                        "{} is low-rank factorised (rank {}); unstructured pruning, its \
                         statistics and OWL work on dense weights only: prune before factorising",
                        tensor_name(i, kind),
                        lin.rank().unwrap_or(0)
                    ));
                }
                mask::check_shape(
                    self.pattern,
                    lin.out_features(),
                    lin.in_features(),
                    &tensor_name(i, kind),
                )?;
            }
        }
        Ok(())
    }

    /// Base target for `kind` before per-layer allocation.
    fn base(&self, kind: LinearKind) -> f64 {
        if kind.is_attention() {
            self.attn_sparsity
        } else {
            self.mlp_sparsity
        }
        .unwrap_or(self.sparsity)
    }

    fn prunes(&self, layer: usize, kind: LinearKind) -> bool {
        !self.skip_layers.contains(&layer) && !self.skip_modules.contains(&kind)
    }
}

/// What happened to one tensor.
#[derive(Debug, Clone, Serialize)]
pub struct TensorOutcome {
    pub name: String,
    pub shape: [usize; 2],
    pub sparsity_target: f64,
    pub zeros: usize,
    pub sparsity: f64,
}

/// One kind of calibration pass the driver ran, with its arithmetic and its rate.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PassReport {
    /// `owl_scan` (full blocks, statistics on the way), `statistics` (dense blocks up to
    /// down_proj's input, plus the Gram matrices when the method needs them) or `propagate`
    /// (the pruned blocks, producing the next block's input).
    pub name: &'static str,
    /// Blocks the pass went through.
    pub blocks: usize,
    /// Analytic work: linears and attention ([`crate::model::flops::block_flops`]) over every
    /// calibration window, plus the Gram matrices (`rows·cols·(cols+1)` per distinct input).
    pub gflop: f64,
    /// Of `gflop`, the Gram matrices (SparseGPT's XᵀX; swap refinement's).
    pub gram_gflop: f64,
    pub seconds: f64,
    /// `gflop / seconds`: compare with the machine's GEMM rate (`gemm_gflops` in report.json).
    pub gflop_per_s: f64,
}

impl PassReport {
    fn new(name: &'static str) -> PassReport {
        PassReport {
            name,
            blocks: 0,
            gflop: 0.0,
            gram_gflop: 0.0,
            seconds: 0.0,
            gflop_per_s: 0.0,
        }
    }

    fn add(&mut self, flop: f64, gram_flop: f64, seconds: f64) {
        self.blocks += 1;
        self.gflop += (flop + gram_flop) / 1e9;
        self.gram_gflop += gram_flop / 1e9;
        self.seconds += seconds;
        self.gflop_per_s = if self.seconds > 0.0 {
            self.gflop / self.seconds
        } else {
            0.0
        };
    }
}

/// What the driver did.
#[derive(Debug, Clone, Serialize)]
pub struct PruneOutcome {
    pub tensors: Vec<TensorOutcome>,
    /// Target sparsity per block (after allocation).
    pub layer_sparsity: Vec<f64>,
    /// OWL's layerwise outlier distribution (%), when used.
    pub owl_lod: Option<Vec<f64>>,
    /// Zeros / parameters over all block linears (pruned or not).
    pub sparsity_measured: f64,
    pub pruned_params: usize,
    pub zeros: usize,
    pub seconds_forward: f64,
    pub seconds_stats: f64,
    pub seconds_prune: f64,
    pub seconds_total: f64,
    /// The calibration passes that ran (none for magnitude with uniform allocation).
    pub passes: Vec<PassReport>,
    /// What permutation, swap refinement and reconstruction did, when any ran.
    pub recovery: Option<crate::recover::RecoveryReport>,
    /// Tokens routed to each expert and the experts no calibration token reached (mixtures).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub experts: Option<super::experts::ExpertReport>,
}

/// Prune `model` in place with `plan`, calibrating on `calib` (unused for magnitude with
/// uniform allocation). `progress(stage, done, total)` reports blocks.
pub fn prune_model(
    model: &mut Model,
    calib: &CalibSet,
    plan: &PrunePlan,
    progress: &mut dyn FnMut(&str, usize, usize),
) -> Result<PruneOutcome> {
    let method = method_of(plan);
    prune_model_with(model, calib, plan, method.as_ref(), progress)
}

/// [`prune_model`] with the weights moved to `spill` first: only the block being pruned (and
/// the calibration activations) stay in memory; every block goes back to the file when done
/// (see [`crate::model::spill`]). The weights afterwards are the same as [`prune_model`]'s.
pub fn prune_model_spilled(
    model: &mut Model,
    calib: &CalibSet,
    plan: &PrunePlan,
    spill: &Spill,
    progress: &mut dyn FnMut(&str, usize, usize),
) -> Result<PruneOutcome> {
    let method = method_of(plan);
    run(model, calib, plan, method.as_ref(), Some(spill), progress)
}

/// The pruner `plan.method` names.
fn method_of(plan: &PrunePlan) -> Box<dyn super::Pruner> {
    match plan.method {
        Method::Sparsegpt => Box::new(super::sparsegpt::SparseGpt {
            precision: plan.hessian_precision,
            ..Default::default()
        }),
        Method::Ria => Box::new(super::ria::Ria {
            alpha: plan.ria_alpha,
        }),
        m => pruner(m, plan.scope),
    }
}

/// [`prune_model`] with a caller's [`Pruner`](super::Pruner) instead of the one `plan.method`
/// names (a new method, or an instrumented one); `plan` still gives the pattern, targets,
/// allocation and skips.
pub fn prune_model_with(
    model: &mut Model,
    calib: &CalibSet,
    plan: &PrunePlan,
    method: &dyn super::Pruner,
    progress: &mut dyn FnMut(&str, usize, usize),
) -> Result<PruneOutcome> {
    run(model, calib, plan, method, None, progress)
}

fn run(
    model: &mut Model,
    calib: &CalibSet,
    plan: &PrunePlan,
    method: &dyn super::Pruner,
    spill: Option<&Spill>,
    progress: &mut dyn FnMut(&str, usize, usize),
) -> Result<PruneOutcome> {
    plan.validate(model)?;
    // Packed copies (a model loaded packed) would go stale as the dense weights change.
    crate::runtime::unpack(model);
    if let Some(s) = spill {
        s.spill_weights(&mut model.weights)?;
        crate::util::trace_rss("weights spilled");
    }
    let t_all = Instant::now();
    let mut needs = method.needs();
    // Swap refinement scores swaps with XᵀX, whatever the method.
    needs.hessian |= plan.recovery.refine.is_some();
    let owl = matches!(plan.allocation, Allocation::Owl { .. });
    let calibrated = needs != Needs::default() || owl || plan.recovery.needs_calibration();
    let mut recovery = crate::recover::RecoveryReport::new(&plan.recovery);
    let n_layers = model.weights.layers.len();
    let (n, len) = (calib.n, calib.len);
    let rope = Rope::new(&model.config, len);
    let mut runner = BlockRunner::new();
    let (mut t_fwd, mut t_stats, mut t_prune) = (0f64, 0f64, 0f64);
    let hd = model.config.head_dim;
    let (mut p_owl, mut p_stats, mut p_fwd) = (
        PassReport::new("owl_scan"),
        PassReport::new("statistics"),
        PassReport::new("propagate"),
    );

    // Per-layer targets.
    let mut owl_lod = None;
    let layer_sparsity = match plan.allocation {
        Allocation::Uniform => vec![plan.sparsity; n_layers],
        Allocation::Owl { m, lambda } => {
            let mut h = embed(&model.weights, &calib.ids)?;
            model.weights.embed.release();
            let mut lods = Vec::with_capacity(n_layers);
            for i in 0..n_layers {
                progress("OWL scan", i, n_layers);
                let t = Instant::now();
                let mut obs = StatsObserver::new(
                    i,
                    Needs {
                        col_sq: true,
                        hessian: false,
                    },
                    len,
                );
                runner.run(
                    &model.config,
                    i,
                    &model.weights.layers[i],
                    &rope,
                    &mut h,
                    n,
                    len,
                    Pass::Propagate,
                    &mut obs,
                )?;
                let dt = t.elapsed().as_secs_f64();
                t_stats += dt;
                let lw = &model.weights.layers[i];
                p_owl.add(n as f64 * flops::block_flops(lw, hd, len, false), 0.0, dt);
                let scores: Vec<Vec<f32>> = LinearKind::ALL
                    .iter()
                    .filter_map(|&k| {
                        let lin = lw.linear(k);
                        wanda::scores(
                            lin.weight.data(),
                            lin.in_features(),
                            &obs.sites[&Site::of(k)],
                        )
                    })
                    .collect();
                lods.push(owl::outlier_ratio(&scores, m));
                model.weights.layers[i].release();
            }
            progress("OWL scan", n_layers, n_layers);
            let alloc = owl::allocate(&lods, plan.sparsity, lambda);
            owl_lod = Some(lods);
            alloc
        }
    };

    crate::util::trace_rss("prune start");
    let mut h = if calibrated {
        embed(&model.weights, &calib.ids)?
    } else {
        Vec::new()
    };
    // Mapped weights (spilled or from an f32 file) leave memory once used; see `release`.
    model.weights.embed.release();
    crate::util::trace_rss("calibration embedded");
    // Block reconstruction's dense stream (the pruned stream is `h`).
    // It holds only the samples reconstruction uses (the first `ns`).
    let width = len * model.config.hidden_size;
    let ns = plan.recovery.reconstruct.map_or(0, |o| o.samples_of(n));
    recovery.recon_samples = ns;
    let mut h_dense = plan.recovery.reconstruct.map(|_| h[..ns * width].to_vec());
    let mut tensors = Vec::new();
    let mut expert_report = None;
    let (mut params, mut zeros) = (0usize, 0usize);
    for (i, &target) in layer_sparsity.iter().enumerate() {
        progress("pruning", i, n_layers);
        let to_prune: Vec<LinearKind> = LinearKind::ALL
            .into_iter()
            .filter(|&k| plan.prunes(i, k) && !model.weights.layers[i].linear(k).weight.is_empty())
            .collect();
        let mut obs = StatsObserver::new(i, needs, len);
        if needs != Needs::default() && !to_prune.is_empty() {
            let t = Instant::now();
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
            let dt = t.elapsed().as_secs_f64();
            t_stats += dt;
            let gram: f64 = match needs.hessian {
                true => obs
                    .sites
                    .values()
                    .map(|s| (s.tokens * s.cols * (s.cols + 1)) as f64)
                    .sum(),
                false => 0.0,
            };
            let lw = &model.weights.layers[i];
            p_stats.add(n as f64 * flops::block_flops(lw, hd, len, true), gram, dt);
            crate::util::trace_rss(&format!("block {i} statistics"));
        }
        // A mixture's experts: statistics of the tokens routed to each, on the unpruned block.
        let t = Instant::now();
        let layer_in = &model.weights.layers[i];
        let expert_stats =
            super::experts::collect(&model.config, i, layer_in, &rope, &mut h, (n, len), needs)?;
        t_stats += t.elapsed().as_secs_f64();
        let t = Instant::now();
        if let (true, Pattern::NM { n: kn, m }) = (plan.recovery.permute, plan.pattern) {
            if to_prune.contains(&LinearKind::Down) {
                let tp = Instant::now();
                let layer = &mut model.weights.layers[i];
                let p = crate::recover::permute_block(
                    i,
                    layer,
                    &mut obs.sites,
                    plan.method,
                    plan.ria_alpha,
                    (kn, m),
                );
                recovery.permuted.push(p);
                recovery.seconds_permute += tp.elapsed().as_secs_f64();
            }
        }
        // The dense block, for swap refinement and reconstruction.
        let dense = (plan.recovery.refine.is_some() || plan.recovery.reconstruct.is_some())
            .then(|| crate::recover::reconstruct::dense_copy(&model.weights.layers[i]));
        let offset = target - plan.sparsity;
        let sites = &obs.sites;
        let layer = &mut model.weights.layers[i];
        // Per-input preparation (SparseGPT's inverse-Hessian factors) runs ahead on its own
        // thread, on the sites in reverse order of use (down_proj's, the largest, first), while
        // the linears are pruned in order; a linear whose factor is not ready yet waits for it
        // (or computes it, if preparation has not reached it). Both sides are plain threads, not
        // rayon workers, so neither can end up running the other's code while holding a lock.
        let prepare = || {
            Site::ALL.iter().rev().try_for_each(|site| {
                match (
                    sites.get(site),
                    site.linears().iter().find(|k| to_prune.contains(k)),
                ) {
                    (Some(stats), Some(&kind)) => method.prepare(stats, &tensor_name(i, kind)),
                    _ => Ok(()),
                }
            })
        };
        let (prepared, pruned) = std::thread::scope(|sc| {
            let ahead = sc.spawn(prepare);
            let pruned =
                (|| -> Result<(Vec<TensorOutcome>, Vec<crate::recover::SwapOutcome>, f64)> {
                    let mut out = Vec::new();
                    let (mut swapped, mut t_swaps) = (Vec::new(), 0f64);
                    for &kind in &to_prune {
                        let name = tensor_name(i, kind);
                        let target = Target {
                            sparsity: (plan.base(kind) + offset).clamp(0.0, 0.99),
                            pattern: plan.pattern,
                        };
                        let empty = super::SiteStats::new(0, Needs::default());
                        let stats = sites.get(&Site::of(kind)).unwrap_or(&empty);
                        let lin = layer.linear_mut(kind);
                        let (rows, cols) = (lin.out_features(), lin.in_features());
                        // A NaN/Inf weight would otherwise pass silently (magnitude and the last
                        // block run no forward pass that could catch it).
                        if lin.weight.data().iter().any(|v| !v.is_finite()) {
                            return Err(Error::Numeric(format!(
                                "block {i}: {name} contains NaN/Inf weights"
                            )));
                        }
                        method.prune(lin.weight.data_mut(), rows, cols, stats, target, &name)?;
                        if let (Some(_), Some(d)) = (plan.recovery.refine, &dense) {
                            let ts = Instant::now();
                            swapped.push(crate::recover::refine_linear(
                                lin.weight.data_mut(),
                                d.linear(kind).weight.data(),
                                rows,
                                cols,
                                stats,
                                plan.pattern,
                                plan.recovery.refine_iters,
                                &name,
                            )?);
                            t_swaps += ts.elapsed().as_secs_f64();
                        }
                        let zeros = lin.weight.count_zeros();
                        out.push(TensorOutcome {
                            name,
                            shape: [rows, cols],
                            sparsity_target: target.sparsity,
                            zeros,
                            sparsity: zeros as f64 / (rows * cols) as f64,
                        });
                    }
                    Ok((out, swapped, t_swaps))
                })();
            let prepared = ahead
                .join()
                .unwrap_or_else(|e| std::panic::resume_unwind(e));
            (prepared, pruned)
        });
        // The pruning loop's error names the linear it was pruning; report it first.
        let (pruned, swapped, t_swaps) = pruned?;
        tensors.extend(pruned);
        recovery.swaps.extend(swapped);
        recovery.seconds_swaps += t_swaps;
        prepared?;
        t_prune += t.elapsed().as_secs_f64();
        if let (Some(opts), Some(h_d), Some(d)) = (plan.recovery.reconstruct, &mut h_dense, &dense)
        {
            progress("reconstructing", i, n_layers);
            let tr = Instant::now();
            let bf = crate::recover::reconstruct::reconstruct_block(
                &model.config,
                i,
                d,
                &mut model.weights.layers[i],
                &to_prune,
                &rope,
                h_d,
                &mut h[..ns * width],
                ns,
                len,
                opts,
            )?;
            recovery.reconstruction.extend(bf.fits);
            recovery.seconds_recon_collect += bf.seconds_collect;
            recovery.seconds_recon_solve += bf.seconds_solve;
            recovery.seconds_reconstruct += tr.elapsed().as_secs_f64();
        }
        drop(dense);
        if model.weights.layers[i].extra.moe.is_some() {
            let t = Instant::now();
            let kinds: Vec<LinearKind> = [LinearKind::Gate, LinearKind::Up, LinearKind::Down]
                .into_iter()
                .filter(|&k| plan.prunes(i, k))
                .collect();
            let report = expert_report.get_or_insert_with(Default::default);
            let pruned = super::experts::prune_block_experts(
                model.config.arch,
                i,
                &mut model.weights.layers[i],
                expert_stats.as_ref(),
                method,
                &kinds,
                |k| Target {
                    sparsity: (plan.base(k) + offset).clamp(0.0, 0.99),
                    pattern: plan.pattern,
                },
                report,
            )?;
            tensors.extend(
                pruned
                    .into_iter()
                    .map(|(name, shape, target, z)| TensorOutcome {
                        name,
                        shape,
                        sparsity_target: target,
                        zeros: z,
                        sparsity: z as f64 / (shape[0] * shape[1]).max(1) as f64,
                    }),
            );
            t_prune += t.elapsed().as_secs_f64();
        }
        crate::util::trace_rss(&format!("block {i} pruned"));
        if calibrated && i + 1 < n_layers {
            let t = Instant::now();
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
            let dt = t.elapsed().as_secs_f64();
            t_fwd += dt;
            let lw = &model.weights.layers[i];
            p_fwd.add(n as f64 * flops::block_flops(lw, hd, len, false), 0.0, dt);
        }
        // The block is final: count its zeros, then give it back to the file.
        let layer = &mut model.weights.layers[i];
        for k in LinearKind::ALL {
            let w = &layer.linear(k).weight;
            params += w.len();
            zeros += w.count_zeros();
        }
        for e in layer.extra.moe.iter().flat_map(|m| &m.experts) {
            for (_, lin) in e.linears() {
                params += lin.weight.len();
                zeros += lin.weight.count_zeros();
            }
        }
        match spill {
            Some(s) => s.spill_layer(layer)?,
            None => layer.release(),
        }
    }
    progress("pruning", n_layers, n_layers);
    Ok(PruneOutcome {
        tensors,
        layer_sparsity,
        owl_lod,
        sparsity_measured: zeros as f64 / params.max(1) as f64,
        pruned_params: params,
        zeros,
        seconds_forward: t_fwd,
        seconds_stats: t_stats,
        passes: [p_owl, p_stats, p_fwd]
            .into_iter()
            .filter(|p| p.blocks > 0)
            .collect(),
        seconds_prune: t_prune,
        seconds_total: t_all.elapsed().as_secs_f64(),
        recovery: (!recovery.steps.is_empty()).then(|| {
            recovery.finish();
            recovery
        }),
        experts: expert_report,
    })
}
