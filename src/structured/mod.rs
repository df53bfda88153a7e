//! Structured pruning: remove whole structures so the model gets smaller and faster with plain
//! dense code, and chain such steps into multidimensional plans.
//!
//! - [`depth`]: whole blocks (ShortGPT's Block Influence, or angular distance over a run of
//!   consecutive blocks), or a given list.
//! - [`heads`]: attention heads, respecting grouped-query attention.
//! - [`neurons`]: FFN intermediate channels (Wanda-sp or FLAP's fluctuation metric, optional
//!   FLAP bias compensation).
//! - [`slicegpt`]: the embedding dimension (SliceGPT: fold norms, PCA-rotate, slice).
//! - [`lowrank`]: a linear replaced by two (plain or activation-aware truncated SVD).
//! - [`plan`]: a sequence of steps (these plus unstructured pruning) on one calibration set.
//!
//! Every step validates its request against the model before changing anything, so a bad
//! request leaves the model untouched; steps return a JSON object of what they did for
//! `report.json`.

pub mod collect;
mod compat;
pub mod depth;
pub mod heads;
pub mod lowrank;
pub mod neurons;
pub mod plan;
pub mod slicegpt;

pub use compat::hf_compatible;

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
