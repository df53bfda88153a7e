//! Width pruning of attention heads. (Placeholder: implemented by the depth/width work.)

use super::{Progress, StepDetails, WidthAllocation};
use crate::calibrate::CalibSet;
use crate::{Error, Model, Result};

/// How heads are scored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HeadMetric {
    /// Activation-weighted norm of the head's o_proj input columns (Wanda-sp style).
    Norm,
    /// FLAP fluctuation: per-channel activation variance × squared o_proj column norm.
    Fluctuation,
}

/// How removal respects grouped-query attention.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GqaMode {
    /// Remove whole KV groups (a KV head with all its query heads).
    KvGroups,
    /// Remove the same number of query heads from every group (KV heads stay).
    PerGroup,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct HeadSpec {
    /// Fraction of query heads removed (model-wide).
    pub fraction: f64,
    pub metric: HeadMetric,
    pub gqa: GqaMode,
    pub allocation: WidthAllocation,
}

/// Remove attention heads from `model` as `spec` asks.
pub fn prune_heads(
    _model: &mut Model,
    _calib: &CalibSet,
    _spec: &HeadSpec,
    _progress: Progress<'_>,
) -> Result<StepDetails> {
    Err(Error::Invalid("head pruning is not implemented yet".into()))
}
