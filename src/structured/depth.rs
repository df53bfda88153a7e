//! Depth pruning: remove whole blocks. (Placeholder: implemented by the depth/width work.)

use super::{Progress, StepDetails};
use crate::calibrate::CalibSet;
use crate::{Error, Model, Result};

/// How blocks are scored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DepthMetric {
    /// ShortGPT Block Influence: 1 − cos(input, output) of each block, lowest removed.
    BlockInfluence,
    /// Angular distance between the input of block l and the output of block l+n−1
    /// (Gromov et al., "The Unreasonable Ineffectiveness of the Deeper Layers"): the best
    /// contiguous run of n blocks is removed.
    Angular,
}

/// Which blocks go.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LayerSelection {
    /// This many blocks, chosen by the metric.
    Count(usize),
    /// Exactly these block indices.
    List(Vec<usize>),
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DepthSpec {
    pub select: LayerSelection,
    pub metric: DepthMetric,
}

/// Remove blocks from `model` as `spec` asks.
pub fn remove_layers(
    _model: &mut Model,
    _calib: &CalibSet,
    _spec: &DepthSpec,
    _progress: Progress<'_>,
) -> Result<StepDetails> {
    Err(Error::Invalid("depth pruning is not implemented yet".into()))
}
