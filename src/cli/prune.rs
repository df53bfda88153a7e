//! `lopper prune`: calibrated pruning of a whole model, written as an HF directory with a
//! `report.json` of what was actually done.

use anyhow::{bail, Context, Result};
use clap::Args;
use lopper::prune::owl::Allocation;
use lopper::prune::{Method, Pattern, PrunePlan, Scope};
use serde_json::json;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Args, Debug)]
pub struct PruneArgs {
    /// GGUF file or HF directory (default: SmolLM2-135M-Instruct, fetched).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Pruning method.
    #[arg(long, value_enum, default_value_t = Method::Wanda)]
    pub method: Method,
    /// Target sparsity of the block linear layers, in [0, 1). Implied by N:M patterns.
    #[arg(long, allow_negative_numbers = true)]
    pub sparsity: Option<f64>,
    /// unstructured | N:M (at most N nonzero in every M consecutive inputs of a row, NVIDIA's
    /// convention: 2:4 and 4:8 are 50%, 1:4 is 75%) | block:RxC (whole R×C tiles) |
    /// vector:V (runs of V consecutive inputs in a row).
    #[arg(long, default_value = "unstructured")]
    pub pattern: String,
    /// Per-layer sparsity allocation.
    #[arg(long, value_enum, default_value_t = AllocArg::Uniform)]
    pub allocation: AllocArg,
    /// OWL outlier threshold M (scores above M × mean count as outliers).
    #[arg(long, default_value_t = 5.0, allow_negative_numbers = true)]
    pub owl_m: f64,
    /// OWL spread λ: layer sparsities span a range of width 2λ whose mean is the target.
    #[arg(long, default_value_t = 0.08, allow_negative_numbers = true)]
    pub owl_lambda: f64,
    /// Sparsity of attention linears (q,k,v,o) instead of --sparsity.
    #[arg(long, allow_negative_numbers = true)]
    pub attn_sparsity: Option<f64>,
    /// Sparsity of MLP linears (gate,up,down) instead of --sparsity.
    #[arg(long, allow_negative_numbers = true)]
    pub mlp_sparsity: Option<f64>,
    /// Blocks to leave dense, e.g. `0,1,29`.
    #[arg(long, value_delimiter = ',')]
    pub skip_layers: Vec<usize>,
    /// Linear layers to leave dense: q,k,v,o,gate,up,down, attn or mlp.
    #[arg(long)]
    pub skip_modules: Option<String>,
    /// Magnitude only: compare |W| within the whole matrix (official) or within each row.
    #[arg(long, value_enum, default_value_t = Scope::Matrix)]
    pub magnitude_scope: Scope,
    /// SparseGPT: arithmetic of the inverse-Hessian factorisation (the official code uses f32;
    /// the Hessian itself is always summed in f64).
    #[arg(long, value_enum, default_value_t = lopper::prune::sparsegpt::Precision::F64)]
    pub hessian_precision: lopper::prune::sparsegpt::Precision,
    /// Calibration text (default: exllamav2's c4.utf8, fetched): one document per line.
    #[arg(long, conflicts_with = "calib_ids")]
    pub calib: Option<PathBuf>,
    /// Exact calibration ids: a safetensors file with `input_ids` [n, len].
    #[arg(long)]
    pub calib_ids: Option<PathBuf>,
    /// Calibration windows drawn from the text.
    #[arg(long, default_value_t = 128)]
    pub samples: usize,
    /// Tokens per calibration window.
    #[arg(long, default_value_t = 512)]
    pub calib_len: usize,
    /// Seed for the calibration window offsets.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Output HF directory (written atomically; must not exist unless --force).
    #[arg(long)]
    pub out: PathBuf,
    /// Replace an existing output directory.
    #[arg(long)]
    pub force: bool,
    /// Weight dtype of the output: f32, f16 or bf16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Measure perplexity before and after (wiki-16x2048 on wiki.utf8 unless a text is given).
    #[arg(long, num_args = 0..=1, default_missing_value = "")]
    pub eval: Option<String>,
    /// Windows for --eval.
    #[arg(long, default_value_t = 16)]
    pub eval_windows: usize,
    /// Tokens per window for --eval.
    #[arg(long, default_value_t = 2048)]
    pub eval_seq_len: usize,
    /// Print the report as JSON on stdout.
    #[arg(long)]
    pub json: bool,
    /// Keep every weight in memory while pruning (and evaluate window by window). By default
    /// only the block being pruned is held in memory: f32 safetensors stay mapped, f16/bf16
    /// and GGUF tensors are converted block by block, pruned blocks go to an unlinked scratch
    /// file beside --out, and --eval runs block by block (same results; structured plans always
    /// work in memory).
    #[arg(long)]
    pub in_memory: bool,
    /// Refuse (and write nothing) when the result is not loadable by transformers: layers of
    /// different shapes, query heads not a multiple of KV heads, biases HF cannot express.
    #[arg(long)]
    pub hf_strict: bool,
    #[command(flatten)]
    pub structured: super::plan::StructuredArgs,
    #[command(flatten)]
    pub recovery: RecoveryArgs,
}

/// Recovery options: RIA's exponent, N:M permutation, swap refinement, block reconstruction.
#[derive(Args, Debug, Default)]
pub struct RecoveryArgs {
    /// RIA: exponent a of the activation norm in |W|-relative-importance × ‖X_j‖₂^a [default: 0.5].
    #[arg(long, allow_negative_numbers = true)]
    pub ria_alpha: Option<f64>,
    /// N:M only: permute down_proj's input channels (and gate/up rows, so the model computes
    /// the same function) before choosing the groups (RIA's channel permutation).
    #[arg(long)]
    pub permute: bool,
    /// After each block is pruned, re-fit its surviving weights by least squares so each
    /// linear reproduces the dense model's output on the pruned model's own inputs.
    #[arg(long)]
    pub reconstruct: bool,
    /// --reconstruct: damping relative to the mean of diag(XᵀX) [default: 0.01].
    #[arg(long, allow_negative_numbers = true)]
    pub recon_damp: Option<f64>,
    /// --reconstruct: paired passes and re-fits per block [default: 1].
    #[arg(long)]
    pub recon_rounds: Option<usize>,
    /// Refine the mask after pruning: `swaps` exchanges pruned and kept weights in a row (or
    /// N:M group) while the layer's output error falls (DSnoT / SparseSwaps).
    #[arg(long, value_enum)]
    pub refine: Option<RefineArg>,
    /// --refine: at most this many swaps per row [default: 50].
    #[arg(long)]
    pub refine_iters: Option<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RefineArg {
    Swaps,
}

impl RecoveryArgs {
    /// Whether any recovery flag was given (structured runs refuse them).
    pub fn any(&self) -> bool {
        self.ria_alpha.is_some()
            || self.permute
            || self.reconstruct
            || self.recon_damp.is_some()
            || self.recon_rounds.is_some()
            || self.refine.is_some()
            || self.refine_iters.is_some()
    }

    /// The library's options; a modifier without its flag is refused.
    pub fn to_recovery(&self, method: Method) -> Result<lopper::recover::Recovery> {
        if !self.reconstruct {
            if self.recon_damp.is_some() {
                bail!("--recon-damp needs --reconstruct");
            }
            if self.recon_rounds.is_some() {
                bail!("--recon-rounds needs --reconstruct");
            }
        }
        if self.refine.is_none() && self.refine_iters.is_some() {
            bail!("--refine-iters needs --refine swaps");
        }
        if self.ria_alpha.is_some() && method != Method::Ria {
            bail!("--ria-alpha needs --method ria");
        }
        let defaults = lopper::recover::ReconOptions::default();
        Ok(lopper::recover::Recovery {
            permute: self.permute,
            reconstruct: self.reconstruct.then(|| lopper::recover::ReconOptions {
                damp: self.recon_damp.unwrap_or(defaults.damp),
                rounds: self.recon_rounds.unwrap_or(defaults.rounds),
            }),
            refine: self
                .refine
                .map(|RefineArg::Swaps| lopper::recover::Refine::Swaps),
            refine_iters: self.refine_iters.unwrap_or(50),
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AllocArg {
    Uniform,
    Owl,
}

/// Turn raw flags into a validated plan.
pub fn plan_from_args(a: &PruneArgs) -> Result<PrunePlan> {
    let pattern: Pattern = a.pattern.parse()?;
    let sparsity = match (a.sparsity, pattern.implied_sparsity()) {
        (Some(s), _) => s,
        (None, Some(s)) => s,
        (None, None) => 0.5,
    };
    let mut plan = PrunePlan::new(a.method, pattern, sparsity);
    plan.scope = a.magnitude_scope;
    plan.allocation = match a.allocation {
        AllocArg::Uniform => Allocation::Uniform,
        AllocArg::Owl => Allocation::Owl {
            m: a.owl_m,
            lambda: a.owl_lambda,
        },
    };
    plan.attn_sparsity = a.attn_sparsity;
    plan.mlp_sparsity = a.mlp_sparsity;
    plan.hessian_precision = a.hessian_precision;
    plan.recovery = a.recovery.to_recovery(a.method)?;
    if let Some(x) = a.recovery.ria_alpha {
        plan.ria_alpha = x;
    }
    plan.skip_layers = a.skip_layers.clone();
    if let Some(s) = &a.skip_modules {
        plan.skip_modules = lopper::prune::parse_kinds(s)?;
    }
    Ok(plan)
}

/// Check `--dtype` and that the output may be written; returns the dtype.
pub fn check_output(a: &PruneArgs) -> Result<lopper::io::save::SaveDtype> {
    let dtype: lopper::io::save::SaveDtype = a
        .dtype
        .parse()
        .map_err(|e| anyhow::anyhow!("--dtype: {e}"))?;
    if a.out.symlink_metadata().is_ok() && !a.force {
        bail!(lopper::Error::Output {
            path: a.out.clone(),
            msg: "exists; pass --force to replace it".into()
        });
    }
    Ok(dtype)
}

/// Where the weights' scratch file goes: the output's directory, or its nearest existing
/// ancestor (the output's parents are only created when it is written).
fn scratch_dir(out: &std::path::Path) -> PathBuf {
    out.ancestors()
        .skip(1)
        .find(|p| !p.as_os_str().is_empty() && p.is_dir())
        .map_or_else(|| PathBuf::from("."), |p| p.to_path_buf())
}

/// Write the model and its report atomically.
pub fn write_output(
    a: &PruneArgs,
    model: &lopper::Model,
    dtype: lopper::io::save::SaveDtype,
    report: &str,
) -> Result<()> {
    let sp = super::spinner(a.json, format!("writing {}", a.out.display()));
    lopper::io::save::save_hf_with_extras(
        model,
        &a.out,
        dtype,
        a.force,
        &[("report.json", report.as_bytes())],
    )
    .with_context(|| format!("writing {}", a.out.display()))?;
    sp.finish_and_clear();
    Ok(())
}

/// The calibration set of a run (empty when no step needs one).
pub struct Calibration {
    pub set: lopper::calibrate::CalibSet,
}

impl Calibration {
    pub fn build(a: &PruneArgs, model: &lopper::Model, needed: bool) -> Result<Calibration> {
        let set = if let Some(p) = &a.calib_ids {
            lopper::calibrate::from_ids_file(p, model.config.vocab_size)?
        } else if needed {
            let p = match &a.calib {
                Some(p) => p.clone(),
                None => lopper::assets::c4_text().context("fetching c4.utf8")?,
            };
            lopper::calibrate::from_text(model.tokenizer()?, &p, a.samples, a.calib_len, a.seed)?
        } else {
            lopper::calibrate::CalibSet {
                ids: vec![],
                n: 0,
                len: 1,
                source: "none (not needed)".into(),
            }
        };
        Ok(Calibration { set })
    }

    pub fn json(&self) -> serde_json::Value {
        json!({ "source": self.set.source, "samples": self.set.n, "len": self.set.len })
    }
}

/// `--eval`: the evaluation text, tokenized once.
pub struct Evaluator {
    text: Option<PathBuf>,
    ids: Option<Vec<u32>>,
    windows: usize,
    seq_len: usize,
    quiet: bool,
}

impl Evaluator {
    pub fn new(a: &PruneArgs, model: &lopper::Model) -> Result<Evaluator> {
        let text = match &a.eval {
            None => None,
            Some(s) if s.is_empty() => {
                Some(lopper::assets::wiki_text().context("fetching wiki.utf8")?)
            }
            Some(s) => Some(PathBuf::from(s)),
        };
        let ids = match &text {
            Some(p) => Some(super::eval::tokenize_text(model, p)?),
            None => None,
        };
        Ok(Evaluator {
            text,
            ids,
            windows: a.eval_windows,
            seq_len: a.eval_seq_len,
            quiet: a.json,
        })
    }

    /// Perplexity of `model`, or `None` without `--eval`.
    pub fn eval(
        &self,
        model: &lopper::Model,
        label: &str,
    ) -> Result<Option<lopper::eval::EvalResult>> {
        self.measure(label, |ids, p, progress| {
            lopper::eval::perplexity(model, ids, self.seq_len, self.windows, p, progress)
        })
    }

    /// [`Evaluator::eval`] block by block, releasing each block's weights after use
    /// ([`lopper::eval::perplexity_by_block`]: the same figure, one block of weights in memory).
    pub fn eval_by_block(
        &self,
        model: &mut lopper::Model,
        label: &str,
    ) -> Result<Option<lopper::eval::EvalResult>> {
        self.measure(label, |ids, p, progress| {
            lopper::eval::perplexity_by_block(model, ids, self.seq_len, self.windows, p, progress)
        })
    }

    /// Run `f` on the text's ids with a progress bar.
    fn measure(
        &self,
        label: &str,
        f: impl FnOnce(
            &[u32],
            &std::path::Path,
            &mut dyn FnMut(usize, usize),
        ) -> lopper::Result<lopper::eval::EvalResult>,
    ) -> Result<Option<lopper::eval::EvalResult>> {
        let (Some(ids), Some(p)) = (&self.ids, &self.text) else {
            return Ok(None);
        };
        let pb = super::bar(self.quiet, 1, label);
        let r = f(ids, p, &mut |d, n| {
            pb.set_length(n as u64);
            pb.set_position(d as u64)
        })?;
        pb.finish_and_clear();
        Ok(Some(r))
    }

    /// The protocol, for reports.
    pub fn protocol(&self) -> serde_json::Value {
        match &self.text {
            None => serde_json::Value::Null,
            Some(p) => {
                json!({ "text": p.display().to_string(), "windows": self.windows, "seq_len": self.seq_len })
            }
        }
    }
}

pub fn run(a: PruneArgs) -> Result<()> {
    if a.structured.active() {
        if a.recovery.any() {
            bail!("--ria-alpha, --permute, --reconstruct and --refine apply to sparse pruning runs, not to structured steps or plans (yet)");
        }
        return super::plan::run(a);
    }
    let t_all = Instant::now();
    let plan = plan_from_args(&a)?;
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
    plan.validate(&model)?;

    // Calibration data (magnitude with uniform allocation needs none).
    let needs_calib = a.method != Method::Magnitude
        || plan.allocation != Allocation::Uniform
        || plan.recovery.needs_calibration();
    if a.method == Method::Magnitude && plan.recovery.needs_calibration() && !a.json {
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
        "prune_seconds_detail": { "statistics": outcome.seconds_stats, "prune": outcome.seconds_prune, "forward": outcome.seconds_forward },
        "gemm_gflops": gemm_gflops,
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
    write_output(&a, &model, dtype, &text)?;
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
