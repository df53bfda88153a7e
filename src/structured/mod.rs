//! Structured pruning: remove whole structures so the model gets smaller and faster with plain
//! dense code, and chain such steps into multidimensional plans.
//!
//! - [`depth`]: whole blocks (ShortGPT's Block Influence, or angular distance over a run of
//!   consecutive blocks), or a given list.
//! - [`heads`]: attention heads, respecting grouped-query attention (whole KV groups, or the
//!   same number of query heads per group); activation-weighted norm, Wanda-sp or FLAP's
//!   fluctuation metric; optional FLAP bias compensation.
//! - [`neurons`]: FFN intermediate channels (Wanda-sp or FLAP's fluctuation metric, optional
//!   FLAP bias compensation).
//! - [`slicegpt`]: the embedding dimension (SliceGPT: fold norms, PCA-rotate, slice).
//! - [`lowrank`]: a linear replaced by two (plain or activation-aware truncated SVD).
//! - [`plan`]: a sequence of steps (these plus unstructured pruning) on one calibration set.
//! - [`search`]: `--target-params`, the best depth/width mix for a parameter budget.
//!
//! Shared pieces: [`collect`] (one calibration pass with an observer), [`stats`] (per-column
//! activation moments), [`alloc`] (uniform / adaptive allocation of removals over layers),
//! [`surgery`] (cutting rows and columns out of linears), [`hf_compat`] (whether transformers
//! could load the result).
//!
//! Every step validates its request against the model before changing anything, so a bad
//! request leaves the model untouched; steps return a JSON object of what they did for
//! `report.json`. Width steps collect their statistics in one pass of the model as it is; to
//! score heads and neurons on the same (unpruned) activations, as FLAP does, collect
//! [`stats::WidthStats`] once and call `heads::prune_heads_with_stats` /
//! `neurons::prune_neurons_with_stats` (statistics that no longer fit a layer are refused).

pub mod alloc;
pub mod collect;
pub mod depth;
pub mod families;
pub mod heads;
pub mod hf_compat;
pub mod lowrank;
pub mod neurons;
pub mod options;
pub mod plan;
pub mod search;
pub mod slicegpt;
pub mod stats;
pub mod surgery;

pub use hf_compat::hf_compatible;

/// What one step did (layers removed, per-layer counts, scores …), for `report.json`.
pub type StepDetails = serde_json::Value;

/// Progress callback: `(stage, done, total)`.
pub type Progress<'a> = &'a mut dyn FnMut(&str, usize, usize);

/// How a width step spreads its removal over layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WidthAllocation {
    /// The same fraction in every layer.
    Uniform,
    /// Scores compared across layers (FLAP's adaptive structure search): layers differ.
    Adaptive,
}

/// Bring `model.config` in line with the weights after a structural step: the layer count
/// always; the head counts when every layer has the same ones, the FFN width when every layer
/// has the same one (so the in-memory config equals what saving and reloading would give).
/// A quantity that differs between layers keeps its nominal (unpruned) value, which bounds
/// every layer's.
pub fn sync_config(model: &mut crate::Model) {
    let c = &mut model.config;
    let layers = &model.weights.layers;
    c.num_hidden_layers = layers.len();
    let hd = c.head_dim.max(1);
    let Some(first) = layers.first() else {
        return;
    };
    let heads = |l: &crate::LayerWeights| (l.n_heads(hd), l.n_kv_heads(hd));
    let (h, kv) = heads(first);
    if layers.iter().all(|l| heads(l) == (h, kv)) && h > 0 && kv > 0 && h % kv == 0 {
        c.num_attention_heads = h;
        c.num_key_value_heads = kv;
    }
    let f = first.intermediate();
    if f > 0 && layers.iter().all(|l| l.intermediate() == f) {
        c.intermediate_size = f;
    }
}

/// Declare the bias a re-fit gave `kind` (o_proj or down_proj) of some blocks: every block gets
/// one (zeros where it had none) and the config says so, as bias compensation does (for llama
/// also zero q/k/v or gate/up biases, since one HF flag covers each group).
pub(crate) fn declare_bias(model: &mut crate::Model, kind: crate::LinearKind) {
    use crate::LinearKind as K;
    let llama = model.config.arch == crate::Arch::Llama;
    for lw in &mut model.weights.layers {
        surgery::ensure_bias(lw.linear_mut(kind));
        let group = match kind {
            K::O => [&mut lw.q, &mut lw.k, &mut lw.v]
                .into_iter()
                .collect::<Vec<_>>(),
            _ => [&mut lw.gate, &mut lw.up].into_iter().collect(),
        };
        if llama {
            group.into_iter().for_each(surgery::ensure_bias);
        }
    }
    match kind {
        K::O => {
            model.config.o_bias = true;
            model.config.qkv_bias |= llama;
        }
        _ => model.config.mlp_bias = true,
    }
}

/// After a heads (`kind` = o_proj) or neurons (`kind` = down_proj) step on `model`: re-fit that
/// linear of every block on its kept channels, with a bias, towards `dense` (the model before
/// the step; [`crate::recover::width`]), and add what the fits did to the step's `details`.
/// The re-fitted linears get biases, declared in the config as bias compensation does (for
/// llama with zero q/k/v or gate/up biases, since one HF flag covers each group).
pub fn reconstruct_width(
    dense: &crate::Model,
    model: &mut crate::Model,
    calib: &crate::calibrate::CalibSet,
    kind: crate::LinearKind,
    opts: crate::recover::ReconOptions,
    mut details: StepDetails,
    progress: Progress<'_>,
) -> crate::Result<StepDetails> {
    let t = std::time::Instant::now();
    let sub = calib.first(opts.samples_of(calib.n));
    let fits = crate::recover::width::refit_consumers(
        dense,
        model,
        &sub,
        kind,
        opts.damp,
        &mut |d, n| progress("reconstruction", d, n),
    )?;
    declare_bias(model, kind);
    let n = fits.len().max(1) as f64;
    let mean = |f: fn(&crate::recover::FitOutcome) -> f64| fits.iter().map(f).sum::<f64>() / n;
    details["reconstruction"] = serde_json::json!({
        "linear": format!("{kind:?}"),
        "damping": opts.damp,
        "samples": sub.n,
        "seconds": t.elapsed().as_secs_f64(),
        "mean_rel_error_before": mean(|f| f.rel_error_before),
        "mean_rel_error_after": mean(|f| f.rel_error_after),
        "layers": fits,
    });
    Ok(details)
}
