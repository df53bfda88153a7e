//! Push the whole calibration set through the model, block by block, with an observer.
//!
//! Memory: one `[samples·len, hidden]` residual buffer; blocks run in chunks of whole samples
//! (see [`crate::calibrate::runner::run_block`]).

use super::Progress;
use crate::calibrate::runner::{run_block, Pass};
use crate::calibrate::CalibSet;
use crate::model::forward::{embed, Scratch};
use crate::model::observer::Observer;
use crate::model::rope::Rope;
use crate::{Model, Result};

/// Run every block over the calibration set with `obs` watching; returns the final residual
/// stream `[n·len, hidden]` (before the final norm).
pub fn observe_all(
    model: &Model,
    calib: &CalibSet,
    obs: &mut dyn Observer,
    progress: Progress<'_>,
) -> Result<Vec<f32>> {
    let rope = Rope::new(&model.config, calib.len);
    let mut scratch = Scratch::default();
    let mut h = embed(&model.weights, &calib.ids)?;
    let n_layers = model.weights.layers.len();
    for i in 0..n_layers {
        progress("calibration pass", i, n_layers);
        run_block(
            model,
            i,
            &rope,
            &mut h,
            calib.n,
            calib.len,
            Pass::Propagate,
            obs,
            &mut scratch,
        )?;
    }
    progress("calibration pass", n_layers, n_layers);
    Ok(h)
}
