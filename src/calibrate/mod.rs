//! Calibration, the stage every calibrated method starts from, unstructured or structured.
//!
//! - [`set`]: the calibration set ([`CalibSet`]): `n` windows of `len` token ids, from text or
//!   from an ids file.
//! - [`runner`]: block passes over the calibration activations ([`runner::BlockRunner`],
//!   chunk-parallel with results independent of the thread count), each with an explicit
//!   [`runner::Pass`]: collect statistics and leave the activations alone, or propagate them
//!   through the block.
//! - [`stats`]: the statistics observer ([`stats::StatsObserver`]): per-input `Σ x_j²` and
//!   `Σ x xᵀ` sums ([`stats::SiteStats`]) for the methods that ask for them ([`stats::Needs`]).
//! - [`act`]: activation-sparsity thresholds from per-site score histograms.
//!
//! The pruning driver ([`crate::prune::driver`]) and the structured steps
//! ([`crate::structured`]) both build on these; nothing here knows about a pruning method.

pub mod act;
pub mod act_greedy;
pub mod runner;
pub mod set;
pub mod stats;

pub use set::*;
