//! Low-rank factorisation of linears. (Placeholder: implemented by the low-rank/SliceGPT work.)

use super::{Progress, StepDetails};
use crate::calibrate::CalibSet;
use crate::{Error, LinearKind, Model, Result};

/// How each factorised linear's rank is chosen.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RankRule {
    /// Remove this fraction of the linear's parameters: r = (1−f)·out·in/(out+in).
    ParamFraction(f64),
    /// Keep the smallest rank whose singular values hold this fraction of Σσ².
    Energy(f64),
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LowRankSpec {
    pub rule: RankRule,
    /// Activation-aware: whiten by the calibration input covariance before the SVD (SVD-LLM).
    pub whiten: bool,
    /// Linear kinds factorised (all seven when empty).
    pub modules: Vec<LinearKind>,
}

/// Factorise linears of `model` as `spec` asks.
pub fn factorize(
    _model: &mut Model,
    _calib: &CalibSet,
    _spec: &LowRankSpec,
    _progress: Progress<'_>,
) -> Result<StepDetails> {
    Err(Error::Invalid(
        "low-rank factorisation is not implemented yet".into(),
    ))
}
