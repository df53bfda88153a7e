//! lopper: prune real pretrained LLMs, measure what pruning cost, and make it pay off in speed.
//!
//! The crate is laid out along the pipeline:
//! `io` (GGUF / HF safetensors load and save, tokenizer) → `model` (plain-data weights and a
//! hookable forward pass) → `kernels` (numeric kernels that know nothing about models) →
//! `eval` (perplexity) — with `assets` fetching the default model and texts.

pub mod assets;
pub mod calibrate;
pub mod error;
pub mod eval;
pub mod formats;
pub mod inspect;
pub mod io;
pub mod isa;
pub mod kernels;
pub mod model;
pub mod prune;
pub mod recover;
pub mod runtime;
pub mod structured;
pub mod text;
pub mod tokenizer;
pub mod train;
pub mod util;

pub use error::{Error, Result};
pub use model::config::{Arch, Config, RopeScaling};
pub use model::weights::{LayerWeights, Linear, LinearKind, LinearRepr, Tensor, Weights};
pub use model::Model;

/// The README's library quick start, compiled and run by `cargo test --release --doc`.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
