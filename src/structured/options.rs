//! One definition of every plan-step option, shared by plan files and the command line.
//!
//! A step option has a plan key (inside a `[[step]]` table of that `kind`) and a command-line
//! flag of `lopper prune`. The CLI builds its clap arguments from [`STEP_OPTIONS`] and turns the
//! flags it was given into the same step tables a plan file holds, which then go through the one
//! validator, [`super::plan::parse_step_table`]. So a key, a value name, a range or a default
//! cannot differ between the two, and a flag that needs another is caught in one place.
//!
//! A unit test checks that every key here is one the plan parser reads, and that every key the
//! parser reads has an entry here.

/// What a step option's value is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueKind {
    /// A number (range checked by the parser).
    Number,
    /// A non-negative integer.
    Integer,
    /// A list of non-negative integers, comma-separated on the command line.
    IntegerList,
    /// One name out of a fixed list (plan spelling; the CLI also takes `-` for `_`).
    Choice(&'static [&'static str]),
    /// Free text (a pattern, a module list).
    Text,
    /// A switch: present means `true`.
    Switch,
}

/// Whether an option creates its step or modifies one that another flag created.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Giving the flag adds the step (e.g. `--heads`).
    Primary,
    /// Only meaningful when the step is there (e.g. `--head-metric`).
    Modifier,
}

/// One option: the step kinds it belongs to, its plan key and its flag.
#[derive(Debug, Clone, Copy)]
pub struct StepOption {
    /// The long flag without dashes, e.g. `head-metric`.
    pub flag: &'static str,
    /// Step kinds (plan `kind`) the option applies to; a modifier shared by two kinds (e.g.
    /// `--bias-compensation`) applies to each of them that is present.
    pub steps: &'static [&'static str],
    /// The key in the step table.
    pub key: &'static str,
    pub value: ValueKind,
    pub role: Role,
    /// One line of help (defaults included).
    pub help: &'static str,
}

/// Step kinds in the order single-step flags run them.
pub const STEP_ORDER: [&str; 6] = ["layers", "heads", "neurons", "slice", "low_rank", "sparse"];

/// Value names, shared by the plan parser and the CLI.
pub const LAYER_METRICS: &[&str] = &["block_influence", "angular", "angular_all_tokens"];
pub const HEAD_METRICS: &[&str] = &["norm", "wanda_sp", "fluctuation"];
pub const GQA_MODES: &[&str] = &["kv_groups", "per_group"];
pub const NEURON_METRICS: &[&str] = &["wanda_sp", "wanda_sp_down", "fluctuation"];
pub const WIDTH_ALLOCATIONS: &[&str] = &["uniform", "adaptive"];
pub const METHODS: &[&str] = &["magnitude", "wanda", "sparsegpt", "ria"];
pub const REFINES: &[&str] = &["swaps"];
/// What sparse and low-rank re-fits reproduce.
pub const RECON_TARGETS: &[&str] = &["dense", "pruned"];
pub const SPARSE_ALLOCATIONS: &[&str] = &["uniform", "owl"];
pub const SCOPES: &[&str] = &["matrix", "row"];
pub const PRECISIONS: &[&str] = &["f64", "f32"];

use Role::{Modifier, Primary};
use ValueKind::{Choice, Integer, IntegerList, Number, Switch, Text};

const fn opt(
    flag: &'static str,
    steps: &'static [&'static str],
    key: &'static str,
    value: ValueKind,
    role: Role,
    help: &'static str,
) -> StepOption {
    StepOption {
        flag,
        steps,
        key,
        value,
        role,
        help,
    }
}

/// Every step option. `remove-layers` and `drop-layers` share the key `remove` (a count or a
/// list); `low-rank` and `low-rank-energy` are the two exclusive rank rules.
pub const STEP_OPTIONS: &[StepOption] = &[
    opt("remove-layers", &["layers"], "remove", Integer, Primary,
        "Remove this many blocks, chosen by --layer-metric"),
    opt("drop-layers", &["layers"], "remove", IntegerList, Primary,
        "Remove exactly these blocks, e.g. `20,21,22`"),
    opt("layer-metric", &["layers"], "metric", Choice(LAYER_METRICS), Modifier,
        "Block score for --remove-layers (default block-influence: ShortGPT; angular: best contiguous run, last token)"),
    opt("heads", &["heads"], "fraction", Number, Primary,
        "Remove this fraction of the attention heads"),
    opt("head-metric", &["heads"], "metric", Choice(HEAD_METRICS), Modifier,
        "Head score (default norm)"),
    opt("gqa", &["heads"], "gqa", Choice(GQA_MODES), Modifier,
        "Grouped-query attention: remove whole KV groups (default) or the same number of query heads per group"),
    opt("neurons", &["neurons"], "fraction", Number, Primary,
        "Remove this fraction of the FFN neurons (intermediate channels)"),
    opt("neuron-metric", &["neurons"], "metric", Choice(NEURON_METRICS), Modifier,
        "Neuron score (default wanda-sp over gate, up and down)"),
    opt("bias-compensation", &["heads", "neurons"], "bias_compensation", Switch, Modifier,
        "FLAP bias compensation for --heads / --neurons: removed channels' mean output becomes a bias"),
    opt("width-allocation", &["heads", "neurons"], "allocation", Choice(WIDTH_ALLOCATIONS), Modifier,
        "Width allocation over layers for --heads / --neurons (default uniform)"),
    opt("slice", &["slice"], "fraction", Number, Primary,
        "SliceGPT: remove this fraction of the hidden (embedding) dimension"),
    opt("slice-round-to", &["slice"], "round_to", Integer, Modifier,
        "Round the sliced hidden size to a multiple of this (default 8)"),
    opt("low-rank", &["low_rank"], "param_fraction", Number, Primary,
        "Factorise linears (truncated SVD), removing this fraction of each one's parameters"),
    opt("low-rank-energy", &["low_rank"], "energy", Number, Primary,
        "Factorise linears keeping this fraction of the singular-value energy"),
    opt("whiten", &["low_rank"], "whiten", Switch, Modifier,
        "Activation-aware low rank: whiten by the calibration input covariance first (SVD-LLM)"),
    opt("low-rank-modules", &["low_rank"], "modules", Text, Modifier,
        "Linears to factorise: q,k,v,o,gate,up,down, attn or mlp (default all)"),
    opt("low-rank-damping", &["low_rank"], "damping", Number, Modifier,
        "Relative damping of the whitening covariance, in [0, 1)"),
    opt("method", &["sparse"], "method", Choice(METHODS), Primary,
        "Unstructured/semi-structured pruning method (default wanda)"),
    opt("sparsity", &["sparse"], "sparsity", Number, Primary,
        "Target sparsity of the block linears, in [0, 1) (default 0.5; implied by N:M patterns)"),
    opt("pattern", &["sparse"], "pattern", Text, Primary,
        "unstructured | N:M (at most N nonzero in every M consecutive inputs of a row: 2:4 is 50%) | block:RxC | vector:V"),
    opt("attn-sparsity", &["sparse"], "attn_sparsity", Number, Primary,
        "Sparsity of attention linears (q,k,v,o) instead of --sparsity"),
    opt("mlp-sparsity", &["sparse"], "mlp_sparsity", Number, Primary,
        "Sparsity of MLP linears (gate,up,down) instead of --sparsity"),
    opt("allocation", &["sparse"], "allocation", Choice(SPARSE_ALLOCATIONS), Primary,
        "Per-layer sparsity allocation (default uniform; owl: Outlier-Weighed Layerwise)"),
    opt("owl-m", &["sparse"], "owl_m", Number, Modifier,
        "OWL outlier threshold M (default 5): needs --allocation owl"),
    opt("owl-lambda", &["sparse"], "owl_lambda", Number, Modifier,
        "OWL spread λ (default 0.08): layer sparsities span 2λ around the target; needs --allocation owl"),
    opt("skip-layers", &["sparse"], "skip_layers", IntegerList, Primary,
        "Blocks to leave dense, e.g. `0,1,29`"),
    opt("skip-modules", &["sparse"], "skip_modules", Text, Primary,
        "Linear layers to leave dense: q,k,v,o,gate,up,down, attn or mlp"),
    opt("magnitude-scope", &["sparse"], "scope", Choice(SCOPES), Modifier,
        "Magnitude only: compare |W| within the whole matrix (default, official) or within each row"),
    opt("hessian-precision", &["sparse"], "hessian_precision", Choice(PRECISIONS), Modifier,
        "SparseGPT only: arithmetic of the inverse-Hessian factorisation (default f64; the official code uses f32)"),
    opt("ria-alpha", &["sparse"], "ria_alpha", Number, Modifier,
        "RIA only: exponent a of the activation norm in relative importance × ‖X_j‖₂^a (default 0.5)"),
    opt("permute", &["sparse"], "permute", Switch, Modifier,
        "N:M only: permute down_proj's input channels (gate/up rows follow, same function) before choosing groups (RIA)"),
    opt("refine", &["sparse"], "refine", Choice(REFINES), Modifier,
        "Refine the mask: swap pruned and kept weights of a row (or N:M group) while the layer's output error falls (DSnoT / SparseSwaps)"),
    opt("refine-iters", &["sparse"], "refine_iters", Integer, Modifier,
        "At most this many swaps per row (default 50); needs --refine"),
    opt("reconstruct", &["layers", "heads", "neurons", "low_rank", "sparse"], "reconstruct", Switch, Modifier,
        "Re-fit surviving weights by least squares towards the dense outputs on the pruned model's own inputs: each pruned linear (sparse step), o_proj (heads), down_proj (neurons), the factors (low rank), o_proj + down_proj of the block after each removed span (layers)"),
    opt("recon-damp", &["layers", "heads", "neurons", "low_rank", "sparse"], "recon_damp", Number, Modifier,
        "Reconstruction damping relative to mean diag(XᵀX) (default 0.01); needs --reconstruct"),
    opt("recon-rounds", &["sparse"], "recon_rounds", Integer, Modifier,
        "Paired passes and re-fits per block (default 1); needs --reconstruct"),
    opt("recon-target", &["low_rank", "sparse"], "recon_target", Choice(RECON_TARGETS), Modifier,
        "What a re-fit reproduces: pruned (default: the unpruned weights on the pruned inputs, one stream) or dense (the dense model's outputs on its own inputs, two streams; worse on SmolLM2); needs --reconstruct"),
    opt("recon-samples", &["layers", "heads", "neurons", "low_rank", "sparse"], "recon_samples", Integer, Modifier,
        "Reconstruct from the first N calibration samples only (default 32; 0 = all): the cost of reconstruction scales with N; needs --reconstruct"),
];

/// The options that belong to step `kind`.
pub fn options_of(kind: &str) -> impl Iterator<Item = &'static StepOption> + '_ {
    STEP_OPTIONS.iter().filter(move |o| o.steps.contains(&kind))
}

/// The flag(s) that set `key` of step `kind`, as `--a` or `--a / --b` (for messages).
pub fn flag_for(kind: &str, key: &str) -> String {
    let flags: Vec<String> = options_of(kind)
        .filter(|o| o.key == key)
        .map(|o| format!("--{}", o.flag))
        .collect();
    if flags.is_empty() {
        format!("`{key}`")
    } else {
        flags.join(" / ")
    }
}

/// The primary flags of step `kind` (for "needs" messages).
pub fn primary_flags(kind: &str) -> Vec<String> {
    options_of(kind)
        .filter(|o| o.role == Role::Primary)
        .map(|o| format!("--{}", o.flag))
        .collect()
}
