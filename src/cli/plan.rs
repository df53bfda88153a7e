//! `lopper prune` with structured steps: `--plan plan.toml`, the step flags (`--remove-layers`,
//! `--heads`, `--neurons`, `--slice`, `--low-rank`, then the sparse flags) that build the same
//! plan, or `--target-params`. The plan is validated before the model is touched (see
//! [`super::prune_args`]); every step's size (and perplexity with `--eval`) goes into
//! `report.json`.

use super::pipeline::{check_output, write_output, Calibration, Evaluator};
use super::prune_args::PruneArgs;
use anyhow::{bail, Result};
use lopper::structured::plan::{self, ModelSize, Plan};
use lopper::structured::search::{self, TargetSpec};
use serde_json::json;
use std::time::Instant;

/// `lopper prune` through the plan runner.
pub fn run(a: PruneArgs, plan: Plan) -> Result<()> {
    let t_all = Instant::now();
    let target = a.target_params.map(TargetSpec::new).map(|mut t| {
        if let Some(w) = a.score_windows {
            t.score_windows = w;
        }
        t
    });
    let dtype = check_output(&a)?;
    let model_path = super::model_path(&a.model)?;
    let mut model = super::load_model(&model_path, a.json)?;
    // Stored activation thresholds belong to the unpruned weights (see prune.rs).
    lopper::model::act::uninstall(&mut model);
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
    let text = write_output(&a, &mut model, dtype, &text)?;
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
