//! Width pruning of FFN neurons. (Placeholder: implemented by the depth/width work.)

use super::{Progress, StepDetails, WidthAllocation};
use crate::calibrate::CalibSet;
use crate::{Error, Model, Result};

/// How intermediate channels are scored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NeuronMetric {
    /// Wanda-sp: |W|·‖X‖ summed over the channel (gate/up rows and the down column).
    WandaSp,
    /// FLAP: variance of the channel's down_proj input × squared down_proj column norm.
    Fluctuation,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct NeuronSpec {
    /// Fraction of intermediate channels removed (model-wide).
    pub fraction: f64,
    pub metric: NeuronMetric,
    /// FLAP bias compensation: add the removed channels' mean contribution as a down_proj bias.
    pub bias_compensation: bool,
    pub allocation: WidthAllocation,
}

/// Remove FFN neurons from `model` as `spec` asks.
pub fn prune_neurons(
    _model: &mut Model,
    _calib: &CalibSet,
    _spec: &NeuronSpec,
    _progress: Progress<'_>,
) -> Result<StepDetails> {
    Err(Error::Invalid("neuron pruning is not implemented yet".into()))
}
