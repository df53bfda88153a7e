//! The flags of `lopper prune` and the plan they build.
//!
//! Step flags (`--heads`, `--method`, `--whiten`, …) are not declared here: they come from the
//! library's one table of step options ([`lopper::structured::options::STEP_OPTIONS`]), which
//! also defines the plan-file keys. The flags given are turned into the step tables a plan file
//! would hold, in the documented order (layers → heads → neurons → slice → low rank → sparse),
//! and validated by the plan parser. Every other flag is checked against the plan: a flag that
//! would take no effect is refused with the fix.

use anyhow::{bail, Result};
use clap::builder::{PossibleValue, PossibleValuesParser};
use clap::parser::ValueSource;
use clap::{Arg, ArgAction, ArgMatches, Args, FromArgMatches};
use lopper::structured::options::{self as opts, Role, StepOption, ValueKind, STEP_OPTIONS};
use lopper::structured::plan::{self, KeyNames, Plan, Step};
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct PruneArgs {
    /// GGUF file or HF directory (default: SmolLM2-135M-Instruct, fetched).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// A multidimensional plan (TOML, one [[step]] per step; see docs/structured.md). Excludes
    /// the step flags: each has a plan key.
    #[arg(long)]
    pub plan: Option<PathBuf>,
    /// Remove this fraction of all parameters with the best mix of whole blocks and FFN
    /// neurons, scored by perplexity on calibration windows. Excludes --plan and the step flags.
    #[arg(long, allow_negative_numbers = true)]
    pub target_params: Option<f64>,
    /// Mixtures of experts: first remove this fraction of the experts of every block, those with
    /// the lowest REAP score on the calibration windows (docs/families.md); 0 removes none.
    /// Sparse-only runs.
    #[arg(long)]
    pub experts: Option<f64>,
    /// Calibration windows each --target-params candidate is scored on [default: 16].
    #[arg(long)]
    pub score_windows: Option<usize>,
    /// Calibration text (default: exllamav2's c4.utf8, fetched): one document per line.
    #[arg(long, conflicts_with = "calib_ids")]
    pub calib: Option<PathBuf>,
    /// Exact calibration ids: a safetensors file with `input_ids` [n, len] (all rows, or the
    /// first --samples).
    #[arg(long)]
    pub calib_ids: Option<PathBuf>,
    /// Calibration windows [default: 128 from text; every row of --calib-ids].
    #[arg(long)]
    pub samples: Option<usize>,
    /// Tokens per calibration window drawn from text [default: 512].
    #[arg(long)]
    pub calib_len: Option<usize>,
    /// Seed for the calibration window offsets in the text [default: 0].
    #[arg(long)]
    pub seed: Option<u64>,
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
    /// Windows for --eval [default: 16].
    #[arg(long)]
    pub eval_windows: Option<usize>,
    /// Tokens per window for --eval [default: 2048].
    #[arg(long)]
    pub eval_seq_len: Option<usize>,
    /// Print the report as JSON on stdout.
    #[arg(long)]
    pub json: bool,
    /// Sparse-only runs: keep every weight in memory (and evaluate window by window). By
    /// default only the block being pruned is held in memory: f32 safetensors stay mapped,
    /// f16/bf16 and GGUF tensors are converted block by block, pruned blocks go to an unlinked
    /// scratch file beside --out, and --eval runs block by block (same results). Structured
    /// steps always work in memory, so the flag is refused with them.
    #[arg(long)]
    pub in_memory: bool,
    /// Refuse (and write nothing) when the result is not loadable by transformers: layers of
    /// different shapes, query heads not a multiple of KV heads, biases HF cannot express.
    #[arg(long)]
    pub hf_strict: bool,
    /// Also calibrate contextual activation-sparsity thresholds (TEAL) for this fraction of
    /// every linear input, on the calibration set and the pruned model, and store them with the
    /// output (lopper_act_sparsity.json; `run` / `eval` / `bench` apply them). In [0, 1).
    #[arg(long, allow_negative_numbers = true)]
    pub act_sparsity: Option<f64>,
    /// Activation score for --act-sparsity: magnitude or wina [default: magnitude].
    #[arg(long)]
    pub act_score: Option<String>,
    /// Allocation for --act-sparsity: uniform or greedy (TEAL's block-wise search)
    /// [default: uniform].
    #[arg(long)]
    pub act_alloc: Option<String>,
    #[command(flatten)]
    pub steps: StepFlags,
}

/// The step flags given on the command line, with their raw values, in table order.
#[derive(Debug, Default, Clone)]
pub struct StepFlags {
    pub given: Vec<(&'static StepOption, Vec<String>)>,
}

impl FromArgMatches for StepFlags {
    fn from_arg_matches(m: &ArgMatches) -> std::result::Result<Self, clap::Error> {
        let mut given = Vec::new();
        for o in STEP_OPTIONS {
            if m.value_source(o.flag) != Some(ValueSource::CommandLine) {
                continue;
            }
            let values = match o.value {
                ValueKind::Switch => vec!["true".to_string()],
                _ => m
                    .get_many::<String>(o.flag)
                    .map(|v| v.cloned().collect())
                    .unwrap_or_default(),
            };
            given.push((o, values));
        }
        Ok(StepFlags { given })
    }

    fn update_from_arg_matches(&mut self, m: &ArgMatches) -> std::result::Result<(), clap::Error> {
        *self = StepFlags::from_arg_matches(m)?;
        Ok(())
    }
}

impl Args for StepFlags {
    fn augment_args(cmd: clap::Command) -> clap::Command {
        cmd.args(STEP_OPTIONS.iter().map(|o| {
            let a = Arg::new(o.flag)
                .long(o.flag)
                .value_name(o.key.to_uppercase())
                .help(o.help)
                .help_heading("Step options (each is also a plan key)");
            match o.value {
                ValueKind::Switch => a.action(ArgAction::SetTrue),
                ValueKind::IntegerList => a.value_delimiter(',').action(ArgAction::Set),
                ValueKind::Choice(names) => a.value_parser(PossibleValuesParser::new(
                    names
                        .iter()
                        .map(|n| PossibleValue::new(n.replace('_', "-")).alias(*n)),
                )),
                ValueKind::Number | ValueKind::Integer => a.allow_negative_numbers(true),
                ValueKind::Text => a,
            }
        }))
    }

    fn augment_args_for_update(cmd: clap::Command) -> clap::Command {
        StepFlags::augment_args(cmd)
    }
}

impl StepFlags {
    fn given(&self, flag: &str) -> bool {
        self.given.iter().any(|(o, _)| o.flag == flag)
    }
}

/// A flag's raw value as the TOML value the plan parser expects.
fn toml_value(o: &StepOption, raw: &[String]) -> Result<toml::Value> {
    let one = raw.first().map(String::as_str).unwrap_or("");
    let bad = |what: &str, v: &str| anyhow::anyhow!("--{}: `{v}` is not {what}", o.flag);
    Ok(match o.value {
        ValueKind::Switch => toml::Value::Boolean(true),
        ValueKind::Number => {
            toml::Value::Float(one.trim().parse().map_err(|_| bad("a number", one))?)
        }
        ValueKind::Integer => {
            toml::Value::Integer(one.trim().parse().map_err(|_| bad("an integer", one))?)
        }
        ValueKind::IntegerList => toml::Value::Array(
            raw.iter()
                .map(|v| {
                    v.trim()
                        .parse::<u32>()
                        .map(|x| toml::Value::Integer(x.into()))
                        .map_err(|_| bad("a non-negative integer", v))
                })
                .collect::<Result<_>>()?,
        ),
        ValueKind::Choice(_) => toml::Value::String(one.replace('-', "_")),
        ValueKind::Text => toml::Value::String(one.to_string()),
    })
}

/// The steps the flags ask for, as plan step tables in run order. Steps whose primary flag was
/// given are present; the sparse step is also present when no other step is (the default job,
/// Wanda 50%). A modifier whose step is absent is refused.
pub fn step_tables(flags: &StepFlags) -> Result<Vec<toml::Table>> {
    let structural = opts::STEP_ORDER.iter().filter(|k| **k != "sparse");
    let primary_given =
        |kind: &str| opts::options_of(kind).any(|o| o.role == Role::Primary && flags.given(o.flag));
    let mut present: Vec<&str> = structural.copied().filter(|k| primary_given(k)).collect();
    if present.is_empty() || primary_given("sparse") {
        present.push("sparse");
    }
    let mut tables: Vec<toml::Table> = present
        .iter()
        .map(|k| {
            let mut t = toml::Table::new();
            t.insert("kind".into(), toml::Value::String(k.to_string()));
            t
        })
        .collect();
    for (o, raw) in &flags.given {
        let mut used = false;
        for (kind, t) in present.iter().zip(tables.iter_mut()) {
            if !o.steps.contains(kind) {
                continue;
            }
            used = true;
            if t.contains_key(o.key) {
                bail!(lopper::Error::Invalid(format!(
                    "{} exclude each other",
                    opts::flag_for(kind, o.key).replace(" / ", " and ")
                )));
            }
            t.insert(o.key.to_string(), toml_value(o, raw)?);
        }
        if !used {
            let parents: Vec<String> = o
                .steps
                .iter()
                .map(|k| match *k {
                    "sparse" => "a sparse step (--method, --sparsity or --pattern)".to_string(),
                    k => opts::primary_flags(k).join(" or "),
                })
                .collect();
            let parents = parents.join(" or ");
            bail!(lopper::Error::Invalid(format!(
                "--{} needs {parents}",
                o.flag
            )));
        }
    }
    // The CLI's sparse step defaults to 50% when no sparsity is implied.
    if let Some(t) = tables
        .last_mut()
        .filter(|t| t["kind"].as_str() == Some("sparse"))
    {
        let implied = match t.get("pattern").and_then(|p| p.as_str()) {
            Some(p) => p
                .parse::<lopper::prune::Pattern>()
                .map(|p| p.implied_sparsity().is_some())
                .unwrap_or(false),
            None => false,
        };
        if !t.contains_key("sparsity") && !implied {
            t.insert("sparsity".into(), toml::Value::Float(0.5));
        }
    }
    Ok(tables)
}

/// Turn the flags into a validated plan (empty with --target-params: the search chooses).
pub fn plan_from_args(a: &PruneArgs) -> Result<Plan> {
    if a.plan.is_some() || a.target_params.is_some() {
        if a.plan.is_some() && a.target_params.is_some() {
            bail!(lopper::Error::Invalid(
                "--target-params chooses the steps itself: it excludes --plan".into()
            ));
        }
        if let Some((o, _)) = a.steps.given.first() {
            let kinds = o.steps.join(" / ");
            bail!(lopper::Error::Invalid(match a.plan {
                Some(_) => format!(
                    "--{} cannot be combined with --plan: set `{}` in the plan's {kinds} step",
                    o.flag, o.key
                ),
                None => format!(
                    "--{} cannot be combined with --target-params, which chooses the removed layers and neurons itself",
                    o.flag
                ),
            }));
        }
        return match &a.plan {
            Some(p) => Ok(plan::load_plan(p)?),
            None => Ok(Plan::default()),
        };
    }
    let mut out = Plan::default();
    if a.act_sparsity.is_some() && a.steps.given.is_empty() {
        // Activation thresholds alone: no static step (without --act-sparsity, no step flags
        // mean the default sparse step).
        return Ok(out);
    }
    for t in step_tables(&a.steps)? {
        let step =
            plan::parse_step_table(&t, "", KeyNames::Flags).map_err(lopper::Error::Invalid)?;
        out.steps.push(step);
    }
    Ok(out)
}

/// Whether the plan is one sparse step: it then runs through the block-at-a-time driver.
pub fn sparse_only(plan: &Plan) -> Option<&lopper::prune::PrunePlan> {
    match plan.steps.as_slice() {
        [Step::Sparse(p)] => Some(p),
        _ => None,
    }
}

/// Refuse the flags that would take no effect with this plan, naming the fix.
pub fn check_flags(a: &PruneArgs, plan: &Plan) -> Result<()> {
    let refuse = |m: String| -> Result<()> { bail!(lopper::Error::Invalid(m)) };
    let searching = a.target_params.is_some();
    if a.score_windows.is_some() && !searching {
        return refuse("--score-windows needs --target-params".into());
    }
    if a.experts.is_some() && (searching || sparse_only(plan).is_none()) {
        return refuse(
            "--experts applies to sparse-only runs (not --plan or --target-params)".into(),
        );
    }
    if a.eval.is_none() {
        for (flag, given) in [
            ("--eval-windows", a.eval_windows.is_some()),
            ("--eval-seq-len", a.eval_seq_len.is_some()),
        ] {
            if given {
                return refuse(format!("{flag} needs --eval"));
            }
        }
    }
    if a.in_memory && (searching || sparse_only(plan).is_none()) {
        return refuse(
            "--in-memory applies to sparse-only runs; structured steps always work in memory"
                .into(),
        );
    }
    if a.calib_ids.is_some() {
        for (flag, given) in [
            ("--calib-len", a.calib_len.is_some()),
            ("--seed", a.seed.is_some()),
        ] {
            if given {
                return refuse(format!(
                    "{flag} does not apply to --calib-ids: the windows are the file's rows (use --samples to take the first N)"
                ));
            }
        }
    }
    if a.act_sparsity.is_none() {
        for (flag, given) in [
            ("--act-score", a.act_score.is_some()),
            ("--act-alloc", a.act_alloc.is_some()),
        ] {
            if given {
                return refuse(format!("{flag} needs --act-sparsity"));
            }
        }
    }
    super::act::parse_alloc(a.act_alloc.as_deref())?;
    if let Some(s) = a.act_sparsity {
        lopper::calibrate::act::check_target(s, "--act-sparsity")?;
        if let Some(sc) = &a.act_score {
            sc.parse::<lopper::model::act::Score>()?;
        }
    }
    if !searching && !plan.needs_calibration() && a.act_sparsity.is_none() {
        for (flag, given) in [
            ("--calib", a.calib.is_some()),
            ("--calib-ids", a.calib_ids.is_some()),
            ("--samples", a.samples.is_some()),
            ("--calib-len", a.calib_len.is_some()),
            ("--seed", a.seed.is_some()),
        ] {
            if given {
                return refuse(format!(
                    "{flag} takes no effect: no step of this run reads calibration data (magnitude pruning with uniform allocation and --drop-layers need none)"
                ));
            }
        }
    }
    Ok(())
}
