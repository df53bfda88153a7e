//! Calibrated unstructured and semi-structured pruning.
//!
//! One layer-sequential driver ([`driver`]) serves every method: it runs the calibration
//! activations through block *i*, collects each linear layer's input statistics with an
//! observer ([`stats`]), lets the method prune the block's linears, re-runs the pruned block to
//! get block *i+1*'s inputs, and moves on. Each method is one file behind the [`Pruner`] trait;
//! the sparsity patterns ([`Pattern`]) and the mask selection live in [`mask`]; per-layer
//! sparsity allocation (uniform, OWL) in [`owl`].

pub mod driver;
pub mod experts;
pub mod magnitude;
pub mod mask;
pub mod owl;
pub mod reap;
pub mod ria;
pub mod sparsegpt;
pub mod wanda;

use crate::{Error, LinearKind, Result};
use serde::Serialize;
use std::str::FromStr;

pub use crate::calibrate::{runner, stats};
pub use driver::{prune_model, prune_model_spilled, PruneOutcome, PrunePlan};
pub use stats::{Needs, SiteStats};

/// Which weights may be zeroed together.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Pattern {
    /// Any single weight.
    Unstructured,
    /// At most `n` nonzero weights in every group of `m` consecutive inputs of a row
    /// (NVIDIA's convention: 2:4 and 4:8 are 50%, 1:4 is 75%).
    NM { n: usize, m: usize },
    /// Whole `r × c` tiles (rows × inputs).
    Block { r: usize, c: usize },
    /// Runs of `v` consecutive inputs in a row.
    Vector { v: usize },
}

impl Pattern {
    /// The sparsity the pattern itself fixes (N:M), if any.
    pub fn implied_sparsity(&self) -> Option<f64> {
        match *self {
            Pattern::NM { n, m } => Some((m - n) as f64 / m as f64),
            _ => None,
        }
    }
}

impl std::fmt::Display for Pattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Pattern::Unstructured => write!(f, "unstructured"),
            Pattern::NM { n, m } => write!(f, "{n}:{m}"),
            Pattern::Block { r, c } => write!(f, "block:{r}x{c}"),
            Pattern::Vector { v } => write!(f, "vector:{v}"),
        }
    }
}

impl FromStr for Pattern {
    type Err = Error;
    fn from_str(s: &str) -> Result<Pattern> {
        let bad = |m: String| Error::Invalid(format!("pattern `{s}`: {m}"));
        let num = |t: &str| {
            t.trim()
                .parse::<usize>()
                .map_err(|_| bad(format!("`{t}` is not a whole number")))
        };
        if s == "unstructured" {
            return Ok(Pattern::Unstructured);
        }
        if let Some(rest) = s.strip_prefix("block:") {
            let (r, c) = rest
                .split_once('x')
                .ok_or_else(|| bad("expected block:RxC, e.g. block:4x4".into()))?;
            let (r, c) = (num(r)?, num(c)?);
            if r == 0 || c == 0 {
                return Err(bad("block sides must be positive".into()));
            }
            return Ok(Pattern::Block { r, c });
        }
        if let Some(rest) = s.strip_prefix("vector:") {
            let v = num(rest)?;
            if v == 0 {
                return Err(bad("vector length must be positive".into()));
            }
            return Ok(Pattern::Vector { v });
        }
        if let Some((n, m)) = s.split_once(':') {
            let (n, m) = (num(n)?, num(m)?);
            if n == 0 || n >= m {
                return Err(bad(format!(
                    "N:M needs 1 <= N < M (at most N nonzero of every M), got {n}:{m}"
                )));
            }
            return Ok(Pattern::NM { n, m });
        }
        Err(bad(
            "expected unstructured, N:M (e.g. 2:4), block:RxC or vector:V".into(),
        ))
    }
}

/// The pruning methods.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// |W| (no calibration needed).
    Magnitude,
    /// |W|·‖X_j‖₂ per output row (Sun et al. 2023).
    Wanda,
    /// OBS reconstruction with the inverse Hessian (Frantar & Alistarh 2023).
    Sparsegpt,
    /// Relative importance × ‖X_j‖₂^a per output row (Zhang et al. 2024).
    Ria,
}

impl FromStr for Method {
    type Err = Error;
    /// The names of [`crate::structured::options::METHODS`].
    fn from_str(s: &str) -> Result<Method> {
        match s {
            "magnitude" => Ok(Method::Magnitude),
            "wanda" => Ok(Method::Wanda),
            "sparsegpt" => Ok(Method::Sparsegpt),
            "ria" => Ok(Method::Ria),
            _ => Err(Error::Invalid(format!(
                "unknown method `{s}`; expected one of {}",
                crate::structured::options::METHODS.join(", ")
            ))),
        }
    }
}

/// How magnitude scores are compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// Within each output row.
    Row,
    /// Within the whole matrix (the official magnitude baseline).
    #[default]
    Matrix,
}

/// What to prune one matrix to.
#[derive(Debug, Clone, Copy)]
pub struct Target {
    pub sparsity: f64,
    pub pattern: Pattern,
}

/// A pruning method: statistics it needs, then the pruning of one weight matrix.
pub trait Pruner: Sync {
    fn needs(&self) -> Needs;
    /// Prune `w` (`[rows, cols]`, row-major, in place) given its input statistics.
    /// `name` identifies the tensor in errors.
    fn prune(
        &self,
        w: &mut [f32],
        rows: usize,
        cols: usize,
        stats: &SiteStats,
        target: Target,
        name: &str,
    ) -> Result<()>;

    /// Work on one input's statistics that every linear reading it shares (SparseGPT's
    /// inverse-Hessian factor), cached in `stats`. The driver may run it ahead, concurrently
    /// with pruning other linears; `prune` must not rely on it having run. `name` is a tensor
    /// reading this input, for errors.
    fn prepare(&self, _stats: &SiteStats, _name: &str) -> Result<()> {
        Ok(())
    }
}

/// Build the pruner for `method`.
pub fn pruner(method: Method, scope: Scope) -> Box<dyn Pruner> {
    match method {
        Method::Magnitude => Box::new(magnitude::Magnitude { scope }),
        Method::Wanda => Box::new(wanda::Wanda),
        Method::Sparsegpt => Box::new(sparsegpt::SparseGpt::default()),
        Method::Ria => Box::new(ria::Ria::default()),
    }
}

/// Parse a list of linear kinds like `q,k,v` or `attn` / `mlp`.
pub fn parse_kinds(s: &str) -> Result<Vec<LinearKind>> {
    let mut out = Vec::new();
    for t in s.split(',').map(str::trim).filter(|t| !t.is_empty()) {
        match t {
            "attn" | "attention" => {
                out.extend([LinearKind::Q, LinearKind::K, LinearKind::V, LinearKind::O])
            }
            "mlp" | "ffn" => out.extend([LinearKind::Gate, LinearKind::Up, LinearKind::Down]),
            "q" => out.push(LinearKind::Q),
            "k" => out.push(LinearKind::K),
            "v" => out.push(LinearKind::V),
            "o" => out.push(LinearKind::O),
            "gate" => out.push(LinearKind::Gate),
            "up" => out.push(LinearKind::Up),
            "down" => out.push(LinearKind::Down),
            _ => {
                return Err(Error::Invalid(format!(
                    "unknown module `{t}` (use q,k,v,o,gate,up,down, attn or mlp)"
                )))
            }
        }
    }
    Ok(out)
}
