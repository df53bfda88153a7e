//! `lopper prune` with structured steps: `--plan plan.toml`, or single-step flags
//! (`--remove-layers`, `--heads`, `--neurons`, `--slice`, `--low-rank`) that build the same
//! plan. The flags turn into a validated [`Plan`] before the model is touched; every step's
//! size (and perplexity with `--eval`) goes into `report.json`.

use super::prune::{Calibration, Evaluator, PruneArgs};
use anyhow::{bail, Result};
use clap::{Args, ValueEnum};
use lopper::structured::depth::{DepthMetric, DepthSpec, LayerSelection};
use lopper::structured::heads::{GqaMode, HeadMetric, HeadSpec};
use lopper::structured::lowrank::{LowRankSpec, RankRule};
use lopper::structured::neurons::{NeuronMetric, NeuronSpec};
use lopper::structured::plan::{self, ModelSize, Plan, Step};
use lopper::structured::search::{self, TargetSpec};
use lopper::structured::slicegpt::SliceSpec;
use lopper::structured::WidthAllocation;
use serde_json::json;
use std::path::PathBuf;
use std::time::Instant;

/// Structured-pruning flags of `lopper prune`.
#[derive(Args, Debug, Default)]
pub struct StructuredArgs {
    /// A multidimensional plan (TOML, one [[step]] per step; see the README). Excludes the
    /// single-step flags below and --sparsity/--pattern (put a `sparse` step in the plan).
    #[arg(long)]
    pub plan: Option<PathBuf>,
    /// Remove this many blocks, chosen by --layer-metric.
    #[arg(long, conflicts_with = "drop_layers")]
    pub remove_layers: Option<usize>,
    /// Remove exactly these blocks, e.g. `20,21,22`.
    #[arg(long, value_delimiter = ',')]
    pub drop_layers: Vec<usize>,
    /// Block score for --remove-layers: ShortGPT's Block Influence, or the angular distance
    /// over a contiguous run (the best run of N consecutive blocks goes).
    #[arg(long, value_enum, default_value_t = LayerMetricArg::BlockInfluence)]
    pub layer_metric: LayerMetricArg,
    /// Remove this fraction of the attention heads.
    #[arg(long, allow_negative_numbers = true)]
    pub heads: Option<f64>,
    /// Head score.
    #[arg(long, value_enum, default_value_t = HeadMetricArg::Norm)]
    pub head_metric: HeadMetricArg,
    /// Grouped-query attention: remove whole KV groups, or the same number of query heads in
    /// every group.
    #[arg(long, value_enum, default_value_t = GqaArg::KvGroups)]
    pub gqa: GqaArg,
    /// Remove this fraction of the FFN neurons (intermediate channels).
    #[arg(long, allow_negative_numbers = true)]
    pub neurons: Option<f64>,
    /// Neuron score.
    #[arg(long, value_enum, default_value_t = NeuronMetricArg::WandaSp)]
    pub neuron_metric: NeuronMetricArg,
    /// FLAP bias compensation (--heads and --neurons): the removed channels' mean contribution
    /// becomes an o_proj / down_proj bias.
    #[arg(long)]
    pub bias_compensation: bool,
    /// Width allocation over layers for --heads/--neurons.
    #[arg(long, value_enum, default_value_t = AllocationArg::Uniform)]
    pub width_allocation: AllocationArg,
    /// SliceGPT: remove this fraction of the hidden (embedding) dimension.
    #[arg(long, allow_negative_numbers = true)]
    pub slice: Option<f64>,
    /// Factorise linears (truncated SVD), removing this fraction of each one's parameters.
    #[arg(
        long,
        allow_negative_numbers = true,
        conflicts_with = "low_rank_energy"
    )]
    pub low_rank: Option<f64>,
    /// Factorise linears keeping this fraction of the singular-value energy.
    #[arg(long, allow_negative_numbers = true)]
    pub low_rank_energy: Option<f64>,
    /// Activation-aware low rank: whiten by the calibration input covariance first (SVD-LLM).
    #[arg(long)]
    pub whiten: bool,
    /// Linears to factorise: q,k,v,o,gate,up,down, attn or mlp (default all).
    #[arg(long)]
    pub low_rank_modules: Option<String>,
    /// Remove this fraction of all parameters with the best mix of whole blocks and FFN
    /// neurons: a small grid of mixes is run and scored by perplexity on calibration windows
    /// (see the README). Excludes --plan and the other structured flags.
    #[arg(long, allow_negative_numbers = true)]
    pub target_params: Option<f64>,
    /// Calibration windows each --target-params candidate is scored on.
    #[arg(long, default_value_t = 16)]
    pub score_windows: usize,
}

impl StructuredArgs {
    /// Whether any single-step structured flag was given.
    pub fn any_step(&self) -> bool {
        self.remove_layers.is_some()
            || !self.drop_layers.is_empty()
            || self.heads.is_some()
            || self.neurons.is_some()
            || self.slice.is_some()
            || self.low_rank.is_some()
            || self.low_rank_energy.is_some()
    }

    /// Whether this run goes through the plan runner.
    pub fn active(&self) -> bool {
        self.plan.is_some() || self.any_step() || self.target_params.is_some()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum LayerMetricArg {
    #[default]
    BlockInfluence,
    /// Last token of each window (the paper's choice).
    Angular,
    /// Averaged over all tokens.
    AngularAllTokens,
}
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum HeadMetricArg {
    #[default]
    Norm,
    WandaSp,
    Fluctuation,
}
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum GqaArg {
    #[default]
    KvGroups,
    PerGroup,
}
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum NeuronMetricArg {
    #[default]
    WandaSp,
    /// FLAP's Wanda-sp baseline: down_proj only.
    WandaSpDown,
    Fluctuation,
}
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum AllocationArg {
    #[default]
    Uniform,
    Adaptive,
}

fn fraction(flag: &str, x: f64) -> Result<f64> {
    if !(0.0..1.0).contains(&x) {
        bail!(lopper::Error::Invalid(format!(
            "{flag} must be in [0, 1), got {x}"
        )));
    }
    Ok(x)
}

/// Turn the flags into a plan: structural steps in the order depth → heads → neurons → slice →
/// low rank, then unstructured pruning when --sparsity or an N:M pattern was asked for.
pub fn plan_from_args(a: &PruneArgs) -> Result<Plan> {
    let s = &a.structured;
    let sparse_asked = a.sparsity.is_some() || a.pattern != "unstructured";
    if s.target_params.is_some() {
        if s.plan.is_some() || s.any_step() || sparse_asked {
            bail!(lopper::Error::Invalid(
                "--target-params chooses the structured steps itself: it excludes --plan, the single-step flags and --sparsity/--pattern".into()
            ));
        }
        // The steps are chosen by the search; validated there before the model is touched.
        return Ok(Plan::default());
    }
    if let Some(p) = &s.plan {
        if s.any_step() || sparse_asked {
            bail!(lopper::Error::Invalid(
                "--plan excludes the single-step flags (--remove-layers, --heads, --neurons, --slice, --low-rank, --sparsity, --pattern): put the steps in the plan file".into()
            ));
        }
        return Ok(plan::load_plan(p)?);
    }
    let alloc = match s.width_allocation {
        AllocationArg::Uniform => WidthAllocation::Uniform,
        AllocationArg::Adaptive => WidthAllocation::Adaptive,
    };
    let mut steps = Vec::new();
    let metric = match s.layer_metric {
        LayerMetricArg::BlockInfluence => DepthMetric::BlockInfluence,
        LayerMetricArg::Angular => DepthMetric::Angular,
        LayerMetricArg::AngularAllTokens => DepthMetric::AngularAllTokens,
    };
    if let Some(n) = s.remove_layers {
        if n == 0 {
            bail!(lopper::Error::Invalid(
                "--remove-layers must be at least 1".into()
            ));
        }
        steps.push(Step::Layers(DepthSpec {
            select: LayerSelection::Count(n),
            metric,
        }));
    } else if !s.drop_layers.is_empty() {
        steps.push(Step::Layers(DepthSpec {
            select: LayerSelection::List(s.drop_layers.clone()),
            metric,
        }));
    }
    if let Some(f) = s.heads {
        steps.push(Step::Heads(HeadSpec {
            fraction: fraction("--heads", f)?,
            metric: match s.head_metric {
                HeadMetricArg::Norm => HeadMetric::Norm,
                HeadMetricArg::WandaSp => HeadMetric::WandaSp,
                HeadMetricArg::Fluctuation => HeadMetric::Fluctuation,
            },
            gqa: match s.gqa {
                GqaArg::KvGroups => GqaMode::KvGroups,
                GqaArg::PerGroup => GqaMode::PerGroup,
            },
            allocation: alloc,
            bias_compensation: s.bias_compensation,
        }));
    }
    if let Some(f) = s.neurons {
        steps.push(Step::Neurons(NeuronSpec {
            fraction: fraction("--neurons", f)?,
            metric: match s.neuron_metric {
                NeuronMetricArg::WandaSp => NeuronMetric::WandaSp,
                NeuronMetricArg::WandaSpDown => NeuronMetric::WandaSpDown,
                NeuronMetricArg::Fluctuation => NeuronMetric::Fluctuation,
            },
            bias_compensation: s.bias_compensation,
            allocation: alloc,
        }));
    }
    if let Some(f) = s.slice {
        steps.push(Step::Slice(SliceSpec::new(fraction("--slice", f)?)));
    }
    let rule = match (s.low_rank, s.low_rank_energy) {
        (Some(f), _) => Some(RankRule::ParamFraction(fraction("--low-rank", f)?)),
        (None, Some(e)) if e > 0.0 && e <= 1.0 => Some(RankRule::Energy(e)),
        (None, Some(e)) => bail!(lopper::Error::Invalid(format!(
            "--low-rank-energy must be in (0, 1], got {e}"
        ))),
        (None, None) => None,
    };
    if let Some(rule) = rule {
        let modules = match &s.low_rank_modules {
            Some(m) => lopper::prune::parse_kinds(m)?,
            None => Vec::new(),
        };
        steps.push(Step::LowRank(LowRankSpec::new(rule, s.whiten, modules)));
    }
    if sparse_asked {
        steps.push(Step::Sparse(super::prune::plan_from_args(a)?));
    }
    Ok(Plan { steps })
}

/// `lopper prune` through the plan runner.
pub fn run(a: PruneArgs) -> Result<()> {
    let t_all = Instant::now();
    let plan = plan_from_args(&a)?;
    let target = a
        .structured
        .target_params
        .map(TargetSpec::new)
        .map(|mut t| {
            t.score_windows = a.structured.score_windows;
            t
        });
    let dtype = super::prune::check_output(&a)?;
    let model_path = super::model_path(&a.model)?;
    let mut model = super::load_model(&model_path, a.json)?;
    if let Some(t) = &target {
        // Validate the request before any calibration work.
        search::candidates(&model, t)?;
    }
    let calib = Calibration::build(&a, &model, plan.needs_calibration() || target.is_some())?;
    let evaluator = Evaluator::new(&a, &model)?;
    let size_before = ModelSize::of(&model);
    let before = evaluator.eval(&model, "eval dense")?;

    let pb = super::bar(a.json, 100, "plan");
    let mut eval_step = |m: &lopper::Model, label: &str| -> lopper::Result<Option<f64>> {
        evaluator
            .eval(m, &format!("eval after {label}"))
            .map(|r| r.map(|r| r.perplexity))
            .map_err(|e| lopper::Error::Invalid(format!("{e:#}")))
    };
    let mut on_progress = |stage: &str, d: usize, n: usize| {
        pb.set_message(stage.to_string());
        pb.set_length(n.max(1) as u64);
        pb.set_position(d as u64);
    };
    let mut searched: Option<(&TargetSpec, Vec<search::Candidate>, usize)> = None;
    let records = match &target {
        None => plan::run_plan(
            &mut model,
            &calib.set,
            &plan,
            &mut eval_step,
            &mut on_progress,
        )?,
        Some(t) => {
            let out = search::search(&model, &calib.set, t, &mut on_progress)?;
            model = out.model;
            let mut records = out.records;
            if let Some(last) = records.last_mut() {
                last.perplexity = eval_step(&model, "the chosen mix")?;
            }
            searched = Some((t, out.candidates, out.chosen));
            records
        }
    };
    let score = format!(
        "perplexity on the first {} calibration windows",
        target
            .as_ref()
            .map_or(0, |t| t.score_windows.min(calib.set.n))
    );
    let search_json = match &searched {
        Some((t, candidates, chosen)) => json!({
            "target_params_removed": t.target,
            "depth_shares": t.depth_shares,
            "score": score,
            "candidates": candidates,
            "chosen": chosen,
        }),
        None => serde_json::Value::Null,
    };
    pb.finish_and_clear();
    let peak_rss = lopper::util::peak_rss_bytes();
    if a.hf_strict {
        if let Err(why) = lopper::structured::hf_compatible(&model) {
            bail!(lopper::Error::Invalid(format!(
                "--hf-strict: the result is not loadable by transformers: {why} (nothing was written)"
            )));
        }
    }
    let size_after = ModelSize::of(&model);
    let report = json!({
        "command": std::env::args().collect::<Vec<_>>().join(" "),
        "model": model_path.display().to_string(),
        "calibration": calib.json(),
        "size_before": size_before,
        "size_after": size_after,
        "params_removed_fraction": 1.0 - size_after.params as f64 / size_before.params as f64,
        "perplexity_before": before.as_ref().map(|r| r.perplexity),
        "perplexity_after": records.last().and_then(|r| r.perplexity),
        "eval": evaluator.protocol(),
        "steps": records,
        "search": search_json,
        "peak_rss_bytes": peak_rss,
        "output": a.out.display().to_string(),
        "output_dtype": dtype.to_string(),
        "total_seconds": t_all.elapsed().as_secs_f64(),
    });
    let text = serde_json::to_string_pretty(&report)?;
    super::prune::write_output(&a, &model, dtype, &text)?;
    if a.json {
        println!("{text}");
        return Ok(());
    }
    println!("calibration   {}", calib.set.source);
    if let Some((t, cands, chosen)) = &searched {
        println!(
            "search        {:.1}% of the parameters; candidates scored by {score}:",
            100.0 * t.target
        );
        for (i, c) in cands.iter().enumerate() {
            let mark = if i == *chosen { "*" } else { " " };
            let what = format!(
                "{} blocks + {:.1}% neurons",
                c.layers,
                100.0 * c.neuron_fraction
            );
            match (c.calib_perplexity, c.params_removed_fraction) {
                (Some(p), Some(r)) => println!(
                    "  {mark} depth share {:.2}: {what:<28} removed {:>5.1}%  calibration perplexity {p:.3}",
                    c.depth_share,
                    100.0 * r
                ),
                _ => println!(
                    "    depth share {:.2}: skipped ({})",
                    c.depth_share,
                    c.skipped.as_deref().unwrap_or("")
                ),
            }
        }
    }
    let ppl = |p: Option<f64>| p.map_or("-".to_string(), |p| format!("{p:.3}"));
    println!(
        "{:<4} {:<10} {:>12} {:>9} {:>11} {:>8}",
        "step", "kind", "params", "removed", "perplexity", "seconds"
    );
    println!(
        "{:<4} {:<10} {:>12} {:>9} {:>11} {:>8}",
        "-",
        "dense",
        size_before.params,
        "0.0%",
        ppl(before.map(|r| r.perplexity)),
        "-"
    );
    for r in &records {
        println!(
            "{:<4} {:<10} {:>12} {:>8.1}% {:>11} {:>8.1}",
            r.index + 1,
            r.kind,
            r.size.params,
            100.0 * r.params_removed_fraction,
            ppl(r.perplexity),
            r.seconds
        );
    }
    if let Some(r) = peak_rss {
        println!("peak RSS      {:.2} GB", r as f64 / 1e9);
    }
    println!("wrote         {} (report.json inside)", a.out.display());
    Ok(())
}
