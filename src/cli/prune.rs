//! `lopper prune`: calibrated pruning of a whole model, written as an HF directory with a
//! `report.json` of what was actually done. A plan that is one sparse step runs here, block by
//! block; plans with structured steps run through [`super::plan`].

use super::pipeline::{check_output, scratch_dir, write_output, Calibration, Evaluator};
use super::prune_args::{check_flags, plan_from_args, sparse_only, PruneArgs};
use anyhow::{bail, Result};
use serde_json::json;
use std::time::Instant;

pub fn run(a: PruneArgs) -> Result<()> {
    let plan = plan_from_args(&a)?;
    check_flags(&a, &plan)?;
    let sparse = match sparse_only(&plan) {
        Some(p) if a.target_params.is_none() => p.clone(),
        _ => return super::plan::run(a, plan),
    };
    run_sparse(a, sparse)
}

/// One sparse step, block by block.
fn run_sparse(a: PruneArgs, plan: lopper::prune::PrunePlan) -> Result<()> {
    let t_all = Instant::now();
    let dtype = check_output(&a)?;
    let model_path = super::model_path(&a.model)?;
    // Unless --in-memory, weights stay in their files (mapped, or converted when first read) and
    // pruned blocks go to an unlinked scratch file beside the output; only the block being
    // pruned is held in memory.
    let spill = if a.in_memory {
        None
    } else {
        Some(lopper::model::spill::Spill::create_in(&scratch_dir(
            &a.out,
        ))?)
    };
    let mut model = super::load_model_with(&model_path, a.json, spill.is_some())?;
    // Stored activation thresholds belong to the unpruned weights: prune on dense activations
    // (--act-sparsity calibrates new ones for the output).
    lopper::model::act::uninstall(&mut model);
    plan.validate(&model)?;

    // Calibration data (magnitude with uniform allocation needs none).
    let needs_calib = lopper::structured::plan::Step::Sparse(plan.clone()).needs_calibration()
        || a.experts.is_some();
    if plan.method == lopper::prune::Method::Magnitude
        && plan.recovery.needs_calibration()
        && !a.json
    {
        eprintln!("note: magnitude pruning needs no calibration, but --reconstruct / --refine do: calibration data is used");
    }
    let calib = Calibration::build(&a, &model, needs_calib)?.set;
    let evaluator = Evaluator::new(&a, &model)?;
    // Block by block (unless --in-memory): with weights mapped or converted on first read,
    // evaluation then holds one block in memory, like pruning (the same figure, 0–8% slower).
    let in_memory = a.in_memory;
    let evaluate = |m: &mut lopper::Model, label: &str| match in_memory {
        true => evaluator.eval(m, label),
        false => evaluator.eval_by_block(m, label),
    };
    let before = evaluate(&mut model, "eval dense")?;
    let experts_removed = match a.experts {
        Some(f) => Some(lopper::prune::reap::remove_experts(&mut model, &calib, f)?),
        None => None,
    };

    let pb = super::bar(a.json, model.weights.layers.len() as u64, "pruning");
    let mut on_block = |stage: &str, d: usize, _: usize| {
        pb.set_message(stage.to_string());
        pb.set_position(d as u64);
    };
    let outcome = match &spill {
        None => lopper::prune::prune_model(&mut model, &calib, &plan, &mut on_block)?,
        Some(s) => lopper::prune::prune_model_spilled(&mut model, &calib, &plan, s, &mut on_block)?,
    };
    pb.finish_and_clear();
    let peak_rss_prune = lopper::util::peak_rss_bytes();
    let after = evaluate(&mut model, "eval pruned")?;

    // The work is essentially two forward passes of the calibration set through every block:
    // report the time next to that compute bound at the GEMM rate measured now.
    let (gemm_gflops, compute_bound_s) = if calib.n > 0 {
        let rate = lopper::kernels::probe::gemm_gflops(
            4096,
            model.config.hidden_size,
            model.config.intermediate_size,
            3,
        );
        let per_window = lopper::model::flops::prefill_flops(
            &model.weights,
            model.config.head_dim,
            calib.len,
            false,
        );
        (
            Some(rate),
            Some(2.0 * calib.n as f64 * per_window / (rate * 1e9)),
        )
    } else {
        (None, None)
    };
    let summary = lopper::inspect::summarize(&model);
    let report = json!({
        "command": std::env::args().collect::<Vec<_>>().join(" "),
        "model": model_path.display().to_string(),
        "method": plan.method,
        "pattern": plan.pattern.to_string(),
        "sparsity_requested": plan.sparsity,
        "sparsity_measured": outcome.sparsity_measured,
        "plan": plan,
        "calibration": { "source": calib.source, "samples": calib.n, "len": calib.len },
        "pruned_linear_params": outcome.pruned_params,
        "zeros": outcome.zeros,
        "total_params": summary.total_params,
        "nonzero_params": summary.total_params - summary.tensors.iter().map(|t| t.zeros).sum::<usize>(),
        "layer_sparsity": outcome.layer_sparsity,
        "owl_lod": outcome.owl_lod,
        "tensors": outcome.tensors,
        "prune_seconds": outcome.seconds_total,
        "recovery": outcome.recovery,
        "experts": outcome.experts,
        "experts_removed": experts_removed,
        "prune_seconds_detail": { "statistics": outcome.seconds_stats, "prune": outcome.seconds_prune, "forward": outcome.seconds_forward },
        "gemm_gflops": gemm_gflops,
        "passes": outcome.passes,
        "threads": rayon::current_num_threads(),
        // The calibration passes run f32 GEMMs on every CPU (no bf16 path is built yet; see
        // docs/benchmarks.md, issue #27); what the CPU could offer is recorded beside it.
        "calibration_precision": "f32",
        "cpu": { "model": lopper::isa::cpu_name(), "features": lopper::isa::features().names() },
        "compute_bound_seconds": compute_bound_s,
        "peak_rss_bytes": peak_rss_prune,
        "weights_in_scratch_file": spill.is_some(),
        "scratch_file_bytes": spill.as_ref().map(|s| s.bytes()),
        "perplexity_before": before.as_ref().map(|r| r.perplexity),
        "perplexity_after": after.as_ref().map(|r| r.perplexity),
        "eval": { "before": before, "after": after },
        "output": a.out.display().to_string(),
        "output_dtype": dtype.to_string(),
        "total_seconds": t_all.elapsed().as_secs_f64(),
    });
    let text = serde_json::to_string_pretty(&report)?;
    if a.hf_strict {
        if let Err(why) = lopper::structured::hf_compatible(&model) {
            bail!(lopper::Error::Invalid(format!(
                "--hf-strict: the result is not loadable by transformers: {why} (nothing was written)"
            )));
        }
    }
    let text = write_output(&a, &mut model, dtype, &text)?;
    if a.json {
        println!("{text}");
    } else {
        println!(
            "method        {:?} {} (requested {:.4}, measured {:.5} over {} linear weights)",
            plan.method,
            plan.pattern,
            plan.sparsity,
            outcome.sparsity_measured,
            outcome.pruned_params
        );
        println!("calibration   {}", calib.source);
        if let Some(r) = &experts_removed {
            let gone: usize = r.iter().map(|l| l.removed.len()).sum();
            println!("experts       removed {gone} (REAP, {} blocks)", r.len());
        }
        if let Some(x) = outcome.experts.as_ref().filter(|x| !x.unreached.is_empty()) {
            println!(
                "experts       {} (layer, expert) reached by no calibration token, pruned by \
                 magnitude: {:?}",
                x.unreached.len(),
                x.unreached
            );
        }
        println!(
            "prune time    {:.1} s (statistics {:.1} s, pruning {:.1} s, forward {:.1} s)",
            outcome.seconds_total,
            outcome.seconds_stats,
            outcome.seconds_prune,
            outcome.seconds_forward
        );
        if let Some(r) = &outcome.recovery {
            println!(
                "recovery      {} (permute {:.1} s, swaps {:.1} s, reconstruct {:.1} s)",
                r.steps.join(" + "),
                r.seconds_permute,
                r.seconds_swaps,
                r.seconds_reconstruct
            );
            if let (Some(b), Some(a2)) = (r.mean_rel_error_before, r.mean_rel_error_after) {
                println!(
                    "reconstruct   {} samples: paired passes {:.1} s, solves {:.1} s",
                    r.recon_samples, r.seconds_recon_collect, r.seconds_recon_solve
                );
                println!("reconstruct   mean relative output error {b:.4} -> {a2:.4}");
            }
            if !r.swaps.is_empty() {
                let (b, a2): (f64, f64) = r.swaps.iter().fold((0.0, 0.0), |s, x| {
                    (s.0 + x.rel_error_before, s.1 + x.rel_error_after)
                });
                let n = r.swaps.len() as f64;
                let k: usize = r.swaps.iter().map(|x| x.swaps).sum();
                println!(
                    "swaps         {k} swaps, mean relative layer error {:.4} -> {:.4}",
                    b / n,
                    a2 / n
                );
            }
        }
        for p in &outcome.passes {
            println!(
                "pass          {:<10} {:>2} blocks, {:.0} GFLOP in {:.1} s: {:.0} GFLOP/s{}",
                p.name,
                p.blocks,
                p.gflop,
                p.seconds,
                p.gflop_per_s,
                match p.gram_gflop > 0.0 {
                    true => format!(" (of which Gram {:.0} GFLOP)", p.gram_gflop),
                    false => String::new(),
                }
            );
        }
        if let (Some(b), Some(r)) = (compute_bound_s, gemm_gflops) {
            println!("compute bound {:.1} s (2 calibration passes at the measured GEMM rate {:.0} GFLOP/s): {:.2}x of it", b, r, outcome.seconds_total / b);
        }
        if let (Some(b), Some(a2)) = (&before, &after) {
            println!(
                "perplexity    dense {:.3} -> pruned {:.3} ({} x {} tokens)",
                b.perplexity, a2.perplexity, a2.windows, a2.seq_len
            );
        }
        if let Some(r) = peak_rss_prune {
            println!("peak RSS      {:.2} GB", r as f64 / 1e9);
        }
        println!("wrote         {} (report.json inside)", a.out.display());
    }
    Ok(())
}
