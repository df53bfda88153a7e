//! Multidimensional plans: a sequence of pruning steps run on one calibration set, with the
//! model's size (and optionally its perplexity) recorded after every step.
//!
//! A plan file is TOML with one `[[step]]` table per step, run in order:
//!
//! ```toml
//! [[step]]
//! kind = "layers"            # depth: remove = N (chosen by metric) or a list [i, j, …]
//! remove = 3
//! metric = "angular"         # last token; or "angular_all_tokens", "block_influence" (default)
//!
//! [[step]]
//! kind = "neurons"           # FFN channels
//! fraction = 0.2
//! metric = "fluctuation"     # FLAP; or "wanda_sp" (default: gate+up+down), "wanda_sp_down" (FLAP's)
//! bias_compensation = true   # FLAP (default false)
//! allocation = "uniform"     # or "adaptive"
//!
//! [[step]]
//! kind = "heads"             # attention heads
//! fraction = 0.33
//! metric = "fluctuation"     # or "norm" (default), "wanda_sp"
//! gqa = "kv_groups"          # or "per_group"
//! bias_compensation = true   # FLAP: strongly advised for heads (default false)
//!
//! [[step]]
//! kind = "slice"             # SliceGPT: remove this fraction of the hidden dimension
//! fraction = 0.1
//!
//! [[step]]
//! kind = "low_rank"          # param_fraction = f (remove f of each linear's params) or energy = e
//! param_fraction = 0.2
//! whiten = true              # activation-aware (default false = plain SVD)
//! modules = ["gate", "up", "down"]
//!
//! [[step]]
//! kind = "sparse"            # unstructured / semi-structured pruning of what is left
//! method = "wanda"           # magnitude | wanda | sparsegpt
//! sparsity = 0.5
//! pattern = "unstructured"   # N:M, block:RxC, vector:V
//! attn_sparsity = 0.4         # optional overrides for attention / MLP linears
//! mlp_sparsity = 0.6
//! allocation = "owl"         # or "uniform" (default); owl_m = 5, owl_lambda = 0.08
//! skip_layers = [0, 1]       # blocks left dense; skip_modules = "q,k" (or "attn", "mlp")
//! scope = "row"              # magnitude only: "matrix" (default) or "row"
//! hessian_precision = "f32"  # sparsegpt only: "f64" (default) or "f32"
//! ```
//!
//! Every key is checked: an unknown step kind or key, a value of the wrong type or out of range
//! is an error naming the file, the step and the key, before anything runs. Each key is also a
//! `lopper prune` flag ([`super::options::STEP_OPTIONS`] is the one table of both); the CLI
//! builds step tables from its flags and validates them here too.

use super::depth::{DepthMetric, DepthSpec, LayerSelection};
use super::heads::{GqaMode, HeadMetric, HeadSpec};
use super::lowrank::{LowRankSpec, RankRule};
use super::neurons::{NeuronMetric, NeuronSpec};
use super::options as opts;
use super::slicegpt::SliceSpec;
use super::{Progress, StepDetails, WidthAllocation};
use crate::calibrate::CalibSet;
use crate::prune::owl::Allocation;
use crate::prune::sparsegpt::Precision;
use crate::prune::{Method, Pattern, PrunePlan, Scope};
use crate::{Error, Model, Result};
use serde::Serialize;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

/// One step of a plan.
#[derive(Debug, Clone)]
pub enum Step {
    Layers(DepthSpec),
    Heads(HeadSpec),
    Neurons(NeuronSpec),
    Slice(SliceSpec),
    LowRank(LowRankSpec),
    Sparse(PrunePlan),
}

impl Step {
    /// The step's `kind` in plan files and reports.
    pub fn kind(&self) -> &'static str {
        match self {
            Step::Layers(_) => "layers",
            Step::Heads(_) => "heads",
            Step::Neurons(_) => "neurons",
            Step::Slice(_) => "slice",
            Step::LowRank(_) => "low_rank",
            Step::Sparse(_) => "sparse",
        }
    }

    /// The request, for reports.
    pub fn spec_json(&self) -> Value {
        let v = match self {
            Step::Layers(s) => serde_json::to_value(s),
            Step::Heads(s) => serde_json::to_value(s),
            Step::Neurons(s) => serde_json::to_value(s),
            Step::Slice(s) => serde_json::to_value(s),
            Step::LowRank(s) => serde_json::to_value(s),
            Step::Sparse(s) => serde_json::to_value(s),
        };
        v.unwrap_or(Value::Null)
    }

    /// Whether the step reads calibration activations.
    pub fn needs_calibration(&self) -> bool {
        match self {
            Step::Layers(s) => {
                !matches!(s.select, LayerSelection::List(_)) || s.reconstruct.is_some()
            }
            Step::LowRank(s) => s.whiten || s.reconstruct.is_some(),
            Step::Sparse(p) => {
                p.method != Method::Magnitude
                    || p.allocation != Allocation::Uniform
                    || p.recovery.needs_calibration()
            }
            _ => true,
        }
    }

    /// The step as [`super::families::check_step`] sees it.
    fn family_spec(&self) -> super::families::Step<'_> {
        use super::families::Step as F;
        match self {
            Step::Layers(s) => F::Layers(s),
            Step::Heads(s) => F::Heads(s),
            Step::Neurons(s) => F::Neurons(s),
            Step::Slice(_) => F::Slice,
            Step::LowRank(s) => F::LowRank(s),
            Step::Sparse(_) => F::Sparse,
        }
    }

    /// Run the step on `model`.
    pub fn apply(
        &self,
        model: &mut Model,
        calib: &CalibSet,
        progress: Progress<'_>,
    ) -> Result<StepDetails> {
        super::families::check_step(self.family_spec(), model)?;
        match self {
            Step::Layers(s) => super::depth::remove_layers(model, calib, s, progress),
            Step::Heads(s) => super::heads::prune_heads(model, calib, s, progress),
            Step::Neurons(s) => super::neurons::prune_neurons(model, calib, s, progress),
            Step::Slice(s) => super::slicegpt::slice(model, calib, s, progress),
            Step::LowRank(s) => super::lowrank::factorize(model, calib, s, progress),
            Step::Sparse(p) => {
                let o = crate::prune::prune_model(model, calib, p, progress)?;
                Ok(json!({
                    "sparsity_measured": o.sparsity_measured,
                    "pruned_linear_params": o.pruned_params,
                    "zeros": o.zeros,
                    "layer_sparsity": o.layer_sparsity,
                    "owl_lod": o.owl_lod,
                    "recovery": o.recovery,
                }))
            }
        }
    }
}

/// A validated sequence of steps.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    pub steps: Vec<Step>,
}

impl Plan {
    pub fn needs_calibration(&self) -> bool {
        self.steps.iter().any(Step::needs_calibration)
    }
}

/// Size of a model at one point of a plan.
#[derive(Debug, Clone, Serialize)]
pub struct ModelSize {
    /// All parameters (a tied head counted once).
    pub params: usize,
    /// Parameters that are not exactly zero.
    pub nonzero_params: usize,
    /// Bytes of the weights as f32 (the safetensors payload at `--dtype f32`).
    pub weight_bytes_f32: usize,
    /// Blocks, and the hidden size.
    pub layers: usize,
    pub hidden_size: usize,
}

impl ModelSize {
    pub fn of(model: &Model) -> ModelSize {
        let tensors = model.weights.named_tensors();
        let params: usize = tensors.iter().map(|(_, t)| t.len()).sum();
        let zeros: usize = tensors.iter().map(|(_, t)| t.count_zeros()).sum();
        ModelSize {
            params,
            nonzero_params: params - zeros,
            weight_bytes_f32: params * 4,
            layers: model.weights.layers.len(),
            hidden_size: model.config.hidden_size,
        }
    }
}

/// What one step did.
#[derive(Debug, Clone, Serialize)]
pub struct StepRecord {
    pub index: usize,
    pub kind: &'static str,
    pub spec: Value,
    pub details: StepDetails,
    pub size: ModelSize,
    /// Parameters removed so far, as a fraction of the starting model's.
    pub params_removed_fraction: f64,
    /// Non-zero parameters removed so far, as a fraction of the starting model's.
    pub nonzero_removed_fraction: f64,
    pub seconds: f64,
    /// Perplexity after the step, when an evaluator was given.
    pub perplexity: Option<f64>,
}

/// Run every step of `plan` in order. After each step `eval` (when given) measures the model.
/// On error the model may be partly changed; callers write nothing in that case.
pub fn run_plan(
    model: &mut Model,
    calib: &CalibSet,
    plan: &Plan,
    eval: &mut dyn FnMut(&Model, &str) -> Result<Option<f64>>,
    progress: Progress<'_>,
) -> Result<Vec<StepRecord>> {
    // Every step's family support is checked before the first one runs.
    for (i, step) in plan.steps.iter().enumerate() {
        super::families::check_step(step.family_spec(), model).map_err(|e| match e {
            Error::Invalid(m) => Error::Invalid(format!("step {} ({}): {m}", i + 1, step.kind())),
            e => e,
        })?;
    }
    let start = ModelSize::of(model);
    let mut out = Vec::with_capacity(plan.steps.len());
    for (i, step) in plan.steps.iter().enumerate() {
        let t = Instant::now();
        let label = format!("step {} ({})", i + 1, step.kind());
        let details = step
            .apply(model, calib, &mut |stage, d, n| {
                progress(&format!("{label}: {stage}"), d, n)
            })
            .map_err(|e| match e {
                Error::Invalid(m) => Error::Invalid(format!("{label}: {m}")),
                e => e,
            })?;
        let seconds = t.elapsed().as_secs_f64();
        let size = ModelSize::of(model);
        let perplexity = eval(model, &label)?;
        out.push(StepRecord {
            index: i,
            kind: step.kind(),
            spec: step.spec_json(),
            details,
            params_removed_fraction: 1.0 - size.params as f64 / start.params as f64,
            nonzero_removed_fraction: 1.0
                - size.nonzero_params as f64 / start.nonzero_params as f64,
            size,
            seconds,
            perplexity,
        });
    }
    Ok(out)
}

/// Read and validate a plan file.
pub fn load_plan(path: &Path) -> Result<Plan> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    parse_plan(&text, path)
}

/// Parse and validate plan TOML (`path` only names the file in errors).
pub fn parse_plan(text: &str, path: &Path) -> Result<Plan> {
    let bad = |m: String| Error::Config {
        path: path.to_path_buf(),
        msg: m,
    };
    let doc: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| bad(format!("not valid TOML: {e}")))?;
    for key in doc.keys() {
        if key != "step" {
            return Err(bad(format!(
                "unknown top-level key `{key}` (a plan is a list of [[step]] tables)"
            )));
        }
    }
    let steps = match doc.get("step") {
        Some(toml::Value::Array(a)) if !a.is_empty() => a,
        _ => return Err(bad("no steps: add at least one [[step]] table".into())),
    };
    let mut plan = Plan::default();
    for (i, s) in steps.iter().enumerate() {
        let toml::Value::Table(t) = s else {
            return Err(bad(format!("step {} is not a table", i + 1)));
        };
        let step =
            parse_step_table(t, &format!("step {}: ", i + 1), KeyNames::Plan).map_err(&bad)?;
        plan.steps.push(step);
    }
    Ok(plan)
}

/// Validate one step table (a plan file's `[[step]]`, or the table the CLI builds from its
/// flags): every key is checked, unknown keys are refused. `place` prefixes messages.
pub fn parse_step_table(
    t: &toml::Table,
    place: &str,
    names: KeyNames,
) -> std::result::Result<Step, String> {
    let mut f = Fields::new(t, place.to_string(), names);
    let step = parse_step(&mut f)?;
    f.finish()?;
    Ok(step)
}

/// How a step table's keys are named in messages: plan keys (`` `fraction` ``) in a plan file,
/// the flags that set them (`--heads`) on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyNames {
    Plan,
    Flags,
}

/// The keys of one step table; remembers which were read so unknown keys can be reported.
struct Fields<'a> {
    t: &'a toml::Table,
    /// `step N: ` in a plan file, empty on the command line.
    place: String,
    names: KeyNames,
    kind: &'a str,
    used: BTreeMap<&'static str, ()>,
}

impl<'a> Fields<'a> {
    fn new(t: &'a toml::Table, place: String, names: KeyNames) -> Fields<'a> {
        let kind = match t.get("kind") {
            Some(toml::Value::String(k)) => k.as_str(),
            _ => "",
        };
        Fields {
            t,
            place,
            names,
            kind,
            used: BTreeMap::new(),
        }
    }

    /// `key` as the user wrote it.
    fn name(&self, key: &str) -> String {
        match self.names {
            KeyNames::Plan => format!("`{key}`"),
            KeyNames::Flags => super::options::flag_for(self.kind, key),
        }
    }

    fn err(&self, key: &str, m: impl std::fmt::Display) -> String {
        format!("{}{} {m}", self.place, self.name(key))
    }

    /// A message about the step as a whole.
    fn step_err(&self, m: impl std::fmt::Display) -> String {
        format!("{}{m}", self.place)
    }

    fn get(&mut self, key: &'static str) -> Option<&'a toml::Value> {
        self.used.insert(key, ());
        self.t.get(key)
    }

    fn str(&mut self, key: &'static str) -> std::result::Result<Option<&'a str>, String> {
        match self.get(key) {
            None => Ok(None),
            Some(toml::Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(self.err(key, format!("must be a string, got {v}"))),
        }
    }

    fn float(&mut self, key: &'static str) -> std::result::Result<Option<f64>, String> {
        match self.get(key) {
            None => Ok(None),
            Some(toml::Value::Float(x)) => Ok(Some(*x)),
            Some(toml::Value::Integer(x)) => Ok(Some(*x as f64)),
            Some(v) => Err(self.err(key, format!("must be a number, got {v}"))),
        }
    }

    fn count(&mut self, key: &'static str) -> std::result::Result<Option<usize>, String> {
        match self.get(key) {
            None => Ok(None),
            Some(toml::Value::Integer(x)) if *x >= 0 => Ok(Some(*x as usize)),
            Some(v) => Err(self.err(key, format!("must be a non-negative integer, got {v}"))),
        }
    }

    fn bool(&mut self, key: &'static str) -> std::result::Result<Option<bool>, String> {
        match self.get(key) {
            None => Ok(None),
            Some(toml::Value::Boolean(b)) => Ok(Some(*b)),
            Some(v) => Err(self.err(key, format!("must be true or false, got {v}"))),
        }
    }

    fn usize_list(&mut self, key: &'static str) -> std::result::Result<Option<Vec<usize>>, String> {
        match self.get(key) {
            None => Ok(None),
            Some(toml::Value::Array(a)) => a
                .iter()
                .map(|v| match v {
                    toml::Value::Integer(x) if *x >= 0 => Ok(*x as usize),
                    v => Err(self.err(key, format!("must hold non-negative integers, got {v}"))),
                })
                .collect::<std::result::Result<Vec<_>, _>>()
                .map(Some),
            Some(v) => Err(self.err(key, format!("must be a list of integers, got {v}"))),
        }
    }

    /// A fraction in `[0, 1)`.
    fn fraction(&mut self, key: &'static str) -> std::result::Result<Option<f64>, String> {
        match self.float(key)? {
            Some(x) if !(0.0..1.0).contains(&x) => {
                Err(self.err(key, format!("must be in [0, 1), got {x}")))
            }
            x => Ok(x),
        }
    }

    fn req_fraction(&mut self, key: &'static str) -> std::result::Result<f64, String> {
        self.fraction(key)?
            .ok_or_else(|| self.err(key, "is required"))
    }

    /// An enum value chosen by name among `names` (the shared lists of
    /// [`super::options`]); `value` maps each name to its value.
    fn choice<T: Copy>(
        &mut self,
        key: &'static str,
        names: &[&str],
        default: T,
        value: impl Fn(&str) -> Option<T>,
    ) -> std::result::Result<T, String> {
        match self.str(key)? {
            None => Ok(default),
            Some(s) => names
                .iter()
                .find(|n| **n == s)
                .and_then(|n| value(n))
                .ok_or_else(|| {
                    self.err(
                        key,
                        format!("is `{s}`; expected one of {}", names.join(", ")),
                    )
                }),
        }
    }

    fn finish(self) -> std::result::Result<(), String> {
        for k in self.t.keys() {
            if !self.used.contains_key(k.as_str()) {
                let what = match self.names {
                    KeyNames::Plan => format!("unknown key `{k}`"),
                    KeyNames::Flags => format!("{} does not apply here", self.name(k)),
                };
                return Err(self.step_err(what));
            }
        }
        Ok(())
    }
}

fn width_allocation(f: &mut Fields) -> std::result::Result<WidthAllocation, String> {
    f.choice(
        "allocation",
        opts::WIDTH_ALLOCATIONS,
        WidthAllocation::Uniform,
        |s| match s {
            "uniform" => Some(WidthAllocation::Uniform),
            "adaptive" => Some(WidthAllocation::Adaptive),
            _ => None,
        },
    )
}

fn parse_step(f: &mut Fields) -> std::result::Result<Step, String> {
    let kind = f.str("kind")?.ok_or_else(|| f.err("kind", "is required"))?;
    Ok(match kind {
        "layers" => {
            let select = match f.get("remove") {
                Some(toml::Value::Integer(n)) if *n > 0 => LayerSelection::Count(*n as usize),
                Some(toml::Value::Array(_)) => {
                    LayerSelection::List(f.usize_list("remove")?.unwrap_or_default())
                }
                Some(v) => {
                    return Err(f.err(
                        "remove",
                        format!("must be a positive count or a list of layer indices, got {v}"),
                    ))
                }
                None => return Err(f.err("remove", "is required")),
            };
            let metric = f.choice(
                "metric",
                opts::LAYER_METRICS,
                DepthMetric::BlockInfluence,
                |s| match s {
                    "block_influence" => Some(DepthMetric::BlockInfluence),
                    "angular" => Some(DepthMetric::Angular),
                    "angular_all_tokens" => Some(DepthMetric::AngularAllTokens),
                    _ => None,
                },
            )?;
            let reconstruct = parse_recon(f)?;
            Step::Layers(DepthSpec {
                select,
                metric,
                reconstruct,
            })
        }
        "heads" => Step::Heads(HeadSpec {
            fraction: f.req_fraction("fraction")?,
            metric: f.choice(
                "metric",
                opts::HEAD_METRICS,
                HeadMetric::Norm,
                |s| match s {
                    "norm" => Some(HeadMetric::Norm),
                    "wanda_sp" => Some(HeadMetric::WandaSp),
                    "fluctuation" => Some(HeadMetric::Fluctuation),
                    _ => None,
                },
            )?,
            gqa: f.choice("gqa", opts::GQA_MODES, GqaMode::KvGroups, |s| match s {
                "kv_groups" => Some(GqaMode::KvGroups),
                "per_group" => Some(GqaMode::PerGroup),
                _ => None,
            })?,
            allocation: width_allocation(f)?,
            bias_compensation: f.bool("bias_compensation")?.unwrap_or(false),
            reconstruct: parse_recon(f)?,
        }),
        "neurons" => Step::Neurons(NeuronSpec {
            fraction: f.req_fraction("fraction")?,
            metric: f.choice(
                "metric",
                opts::NEURON_METRICS,
                NeuronMetric::WandaSp,
                |s| match s {
                    "wanda_sp" => Some(NeuronMetric::WandaSp),
                    "wanda_sp_down" => Some(NeuronMetric::WandaSpDown),
                    "fluctuation" => Some(NeuronMetric::Fluctuation),
                    _ => None,
                },
            )?,
            bias_compensation: f.bool("bias_compensation")?.unwrap_or(false),
            allocation: width_allocation(f)?,
            reconstruct: parse_recon(f)?,
        }),
        "slice" => {
            let mut spec = SliceSpec::new(f.req_fraction("fraction")?);
            match f.get("round_to") {
                None => {}
                Some(toml::Value::Integer(r)) if *r >= 1 => spec.round_to = *r as usize,
                Some(v) => {
                    return Err(f.err("round_to", format!("must be a positive integer, got {v}")))
                }
            }
            Step::Slice(spec)
        }
        "low_rank" => {
            let rule = match (f.fraction("param_fraction")?, f.float("energy")?) {
                (Some(p), None) => RankRule::ParamFraction(p),
                (None, Some(e)) if e > 0.0 && e <= 1.0 => RankRule::Energy(e),
                (None, Some(e)) => {
                    return Err(f.err("energy", format!("must be in (0, 1], got {e}")))
                }
                _ => {
                    let (p, e) = (f.name("param_fraction"), f.name("energy"));
                    return Err(f.step_err(format!("low_rank needs exactly one of {p} or {e}")));
                }
            };
            let modules = match f.get("modules") {
                None => Vec::new(),
                Some(toml::Value::Array(a)) => {
                    let mut names = Vec::new();
                    for v in a {
                        match v {
                            toml::Value::String(s) => names.push(s.as_str()),
                            v => return Err(f.err("modules", format!("must hold names, got {v}"))),
                        }
                    }
                    crate::prune::parse_kinds(&names.join(",")).map_err(|e| f.err("modules", e))?
                }
                Some(toml::Value::String(s)) => {
                    crate::prune::parse_kinds(s).map_err(|e| f.err("modules", e))?
                }
                Some(v) => {
                    return Err(f.err("modules", format!("must be a list of names, got {v}")))
                }
            };
            let mut spec = LowRankSpec::new(rule, f.bool("whiten")?.unwrap_or(false), modules);
            spec.reconstruct = parse_recon(f)?;
            if let Some(d) = f.float("damping")? {
                if !(0.0..1.0).contains(&d) {
                    return Err(f.err("damping", format!("must be in [0, 1), got {d}")));
                }
                spec.damping = d;
            }
            Step::LowRank(spec)
        }
        "sparse" => Step::Sparse(parse_sparse(f)?),
        other => {
            return Err(f.err(
                "kind",
                format!(
                    "is `{other}`; expected one of layers, heads, neurons, slice, low_rank, sparse"
                ),
            ))
        }
    })
}

fn parse_sparse(f: &mut Fields) -> std::result::Result<PrunePlan, String> {
    let method = f.choice("method", opts::METHODS, Method::Wanda, |s| s.parse().ok())?;
    let pattern: Pattern = match f.str("pattern")? {
        None => Pattern::Unstructured,
        Some(s) => s.parse().map_err(|e| f.err("pattern", e))?,
    };
    let sparsity = match (f.fraction("sparsity")?, pattern.implied_sparsity()) {
        (Some(s), _) => s,
        (None, Some(s)) => s,
        (None, None) => return Err(f.err("sparsity", "is required for this pattern")),
    };
    let mut p = PrunePlan::new(method, pattern, sparsity);
    p.attn_sparsity = f.fraction("attn_sparsity")?;
    p.mlp_sparsity = f.fraction("mlp_sparsity")?;
    let owl = f.choice("allocation", opts::SPARSE_ALLOCATIONS, false, |s| match s {
        "uniform" => Some(false),
        "owl" => Some(true),
        _ => None,
    })?;
    let (m, lambda) = (f.float("owl_m")?, f.float("owl_lambda")?);
    if owl {
        p.allocation = Allocation::Owl {
            m: m.unwrap_or(5.0),
            lambda: lambda.unwrap_or(0.08),
        };
    } else if m.is_some() || lambda.is_some() {
        let key = if m.is_some() { "owl_m" } else { "owl_lambda" };
        let alloc = f.name("allocation");
        return Err(f.err(key, format!("needs {alloc} owl")));
    }
    if let Some(scope) = f.choice("scope", opts::SCOPES, None, |s| match s {
        "matrix" => Some(Some(Scope::Matrix)),
        "row" => Some(Some(Scope::Row)),
        _ => None,
    })? {
        if method != Method::Magnitude {
            return Err(f.err("scope", "applies to method magnitude only"));
        }
        p.scope = scope;
    }
    if let Some(prec) = f.choice("hessian_precision", opts::PRECISIONS, None, |s| match s {
        "f64" => Some(Some(Precision::F64)),
        "f32" => Some(Some(Precision::F32)),
        _ => None,
    })? {
        if method != Method::Sparsegpt {
            return Err(f.err("hessian_precision", "applies to method sparsegpt only"));
        }
        p.hessian_precision = prec;
    }
    parse_recovery(f, &mut p)?;
    p.skip_layers = f.usize_list("skip_layers")?.unwrap_or_default();
    if let Some(s) = f.str("skip_modules")? {
        p.skip_modules = crate::prune::parse_kinds(s).map_err(|e| f.err("skip_modules", e))?;
    }
    Ok(p)
}

/// RIA's exponent and the recovery options of a sparse step ([`crate::recover`]); a modifier
/// without the option it modifies is refused.
fn parse_recovery(f: &mut Fields, p: &mut PrunePlan) -> std::result::Result<(), String> {
    if let Some(a) = f.float("ria_alpha")? {
        if p.method != Method::Ria {
            return Err(f.err("ria_alpha", "applies to method ria only"));
        }
        p.ria_alpha = a;
    }
    p.recovery.permute = f.bool("permute")?.unwrap_or(false);
    p.recovery.refine = f.choice("refine", opts::REFINES, None, |s| match s {
        "swaps" => Some(Some(crate::recover::Refine::Swaps)),
        _ => None,
    })?;
    let iters = f.count("refine_iters")?;
    if iters.is_some() && p.recovery.refine.is_none() {
        let refine = f.name("refine");
        return Err(f.err("refine_iters", format!("needs {refine}")));
    }
    p.recovery.refine_iters = iters.unwrap_or(50);
    p.recovery.reconstruct = parse_recon(f)?;
    Ok(())
}

/// `reconstruct` and its modifiers (`recon_damp`, `recon_samples`, and `recon_rounds` on a
/// sparse step); a modifier without `reconstruct` is refused.
fn parse_recon(
    f: &mut Fields,
) -> std::result::Result<Option<crate::recover::ReconOptions>, String> {
    let reconstruct = f.bool("reconstruct")?.unwrap_or(false);
    let damp = f.float("recon_damp")?;
    let samples = f.count("recon_samples")?;
    let rounds = match f.kind {
        "sparse" => f.count("recon_rounds")?,
        _ => None,
    };
    let target = match f.kind {
        "sparse" | "low_rank" => {
            f.choice("recon_target", opts::RECON_TARGETS, None, |s| match s {
                "dense" => Some(Some(crate::recover::ReconTarget::Dense)),
                "pruned" => Some(Some(crate::recover::ReconTarget::Pruned)),
                _ => None,
            })?
        }
        _ => None,
    };
    if let Some(d) = damp {
        if !(d >= 0.0 && d.is_finite()) {
            return Err(f.err(
                "recon_damp",
                format!("must be a finite number >= 0, got {d}"),
            ));
        }
    }
    if rounds == Some(0) {
        return Err(f.err("recon_rounds", "must be at least 1"));
    }
    if !reconstruct {
        let given = [
            ("recon_damp", damp.is_some()),
            ("recon_samples", samples.is_some()),
            ("recon_rounds", rounds.is_some()),
            ("recon_target", target.is_some()),
        ];
        if let Some((key, _)) = given.iter().find(|g| g.1) {
            let r = f.name("reconstruct");
            return Err(f.err(key, format!("needs {r}")));
        }
        return Ok(None);
    }
    let d = crate::recover::ReconOptions::default();
    Ok(Some(crate::recover::ReconOptions {
        damp: damp.unwrap_or(d.damp),
        rounds: rounds.unwrap_or(d.rounds),
        samples: samples.unwrap_or(d.samples),
        target: target.unwrap_or(d.target),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Plan> {
        parse_plan(s, Path::new("plan.toml"))
    }

    #[test]
    fn parses_every_step_kind() {
        let p = parse(
            r#"
            [[step]]
            kind = "layers"
            remove = 3
            metric = "angular"
            [[step]]
            kind = "layers"
            remove = [4, 7]
            [[step]]
            kind = "heads"
            fraction = 0.33
            gqa = "per_group"
            allocation = "adaptive"
            [[step]]
            kind = "neurons"
            fraction = 0.2
            metric = "fluctuation"
            bias_compensation = true
            [[step]]
            kind = "slice"
            fraction = 0.1
            [[step]]
            kind = "low_rank"
            energy = 0.9
            whiten = true
            modules = ["gate", "up"]
            [[step]]
            kind = "sparse"
            method = "sparsegpt"
            pattern = "2:4"
            "#,
        )
        .unwrap();
        let kinds: Vec<_> = p.steps.iter().map(Step::kind).collect();
        assert_eq!(
            kinds,
            ["layers", "layers", "heads", "neurons", "slice", "low_rank", "sparse"]
        );
        match &p.steps[1] {
            Step::Layers(s) => assert_eq!(s.select, LayerSelection::List(vec![4, 7])),
            _ => panic!(),
        }
        match &p.steps[6] {
            Step::Sparse(s) => assert_eq!(s.sparsity, 0.5),
            _ => panic!(),
        }
        assert!(!p.steps[1].needs_calibration());
        assert!(p.steps[0].needs_calibration());
    }

    /// The one table of step options and the parser agree: every key of the table is read by
    /// the parser for its step kinds, and every key the parser reads is in the table.
    #[test]
    fn option_table_matches_the_parser() {
        use super::opts::{options_of, ValueKind, STEP_ORDER};
        let minimal = |kind: &str| -> toml::Table {
            let mut t: toml::Table = toml::from_str(match kind {
                "layers" => "remove = 1",
                "low_rank" => "param_fraction = 0.1",
                "sparse" => "sparsity = 0.5",
                _ => "fraction = 0.1",
            })
            .unwrap();
            t.insert("kind".into(), toml::Value::String(kind.into()));
            t
        };
        for kind in STEP_ORDER {
            let t = minimal(kind);
            let mut f = Fields::new(&t, String::new(), KeyNames::Plan);
            parse_step(&mut f).unwrap_or_else(|e| panic!("{kind}: {e}"));
            let read: std::collections::BTreeSet<&str> =
                f.used.keys().copied().filter(|k| *k != "kind").collect();
            let table: std::collections::BTreeSet<&str> = options_of(kind).map(|o| o.key).collect();
            assert_eq!(read, table, "step kind {kind}: parser keys vs option table");
            // Every value name of the table's choices is accepted by the parser.
            for o in options_of(kind) {
                if let ValueKind::Choice(names) = o.value {
                    for n in names {
                        let mut t = minimal(kind);
                        t.insert(o.key.into(), toml::Value::String(n.to_string()));
                        if let Err(e) = parse_step_table(&t, "", KeyNames::Plan) {
                            assert!(
                                !e.contains("expected one of"),
                                "{kind}.{} = {n}: {e}",
                                o.key
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn rejects_bad_plans_with_the_step_and_key() {
        for (text, needle) in [
            ("[[step]]\nkind = \"wings\"", "`kind` is `wings`"),
            (
                "[[step]]\nkind = \"neurons\"\nfraction = 1.2",
                "step 1: `fraction` must be in [0, 1)",
            ),
            (
                "[[step]]\nkind = \"neurons\"\nfracton = 0.2",
                "`fraction` is required",
            ),
            (
                "[[step]]\nkind = \"neurons\"\nfraction = 0.2\nfracton = 0.2",
                "unknown key `fracton`",
            ),
            (
                "[[step]]\nkind = \"layers\"\nremove = -1",
                "`remove` must be a positive count",
            ),
            ("[[step]]\nkind = \"low_rank\"", "exactly one of"),
            ("[[step]]\nkind = \"low_rank\"\nenergy = 1.5", "(0, 1]"),
            (
                "[[step]]\nkind = \"sparse\"\npattern = \"4:2\"",
                "`pattern`",
            ),
            (
                "[[step]]\nkind = \"heads\"\nfraction = 0.2\ngqa = \"x\"",
                "expected one of kv_groups, per_group",
            ),
            ("steps = 1", "unknown top-level key"),
            ("", "no steps"),
            ("[[step]\n", "not valid TOML"),
        ] {
            let e = parse(text).unwrap_err().to_string();
            assert!(e.contains(needle), "{text:?}: {e}");
            assert!(e.contains("plan.toml"), "{e}");
        }
    }
}
