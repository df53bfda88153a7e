//! SliceGPT. (Placeholder: implemented by the low-rank/SliceGPT work.)

use super::{Progress, StepDetails};
use crate::calibrate::CalibSet;
use crate::{Error, Model, Result};

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SliceSpec {
    /// Fraction of the hidden dimension removed.
    pub fraction: f64,
}

/// Rotate and slice the embedding dimension of `model` as `spec` asks.
pub fn slice(
    _model: &mut Model,
    _calib: &CalibSet,
    _spec: &SliceSpec,
    _progress: Progress<'_>,
) -> Result<StepDetails> {
    Err(Error::Invalid("SliceGPT is not implemented yet".into()))
}
