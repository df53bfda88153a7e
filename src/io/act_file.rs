//! Activation-sparsity thresholds stored beside an HF model: `lopper_act_sparsity.json`.
//!
//! A documented lopper extra (transformers ignores unknown files in a model directory):
//!
//! ```json
//! { "format": "lopper-act-sparsity/1", "model_type": "llama", "hidden_size": 576,
//!   "num_layers": 30, "score": "magnitude", "target": 0.4, "allocation": "uniform",
//!   "calibration": "c4.utf8 (16 x 512 tokens, seed 0)",
//!   "layers": [ [ {"cols": 576, "threshold": 0.21, "calib_sparsity": 0.4}, …4 sites… ], … ] }
//! ```
//!
//! Sites per block are in the order attn_in (q/k/v input), attn_out (o_proj), mlp_in (gate/up),
//! mlp_down (down_proj); `null` leaves a site dense. [`load_into`] (called by the HF loader)
//! refuses a file written for another architecture, hidden size or block count, and
//! [`crate::model::act::install`] refuses a site whose input width differs, naming the tensor.
//! [`crate::io::save`] writes the installed thresholds back with the model, so `convert` and
//! `prune` keep them.

use crate::model::act::{self, ActSparsity};
use crate::{Error, Model, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// The file's name in a model directory.
pub const FILE: &str = "lopper_act_sparsity.json";
const FORMAT: &str = "lopper-act-sparsity/1";

#[derive(Serialize, Deserialize)]
struct FileV1 {
    format: String,
    model_type: String,
    hidden_size: usize,
    num_layers: usize,
    #[serde(flatten)]
    act: ActSparsity,
}

/// The file's bytes for thresholds `a` calibrated on `model`.
pub fn to_json(model: &Model, a: &ActSparsity) -> Result<Vec<u8>> {
    let f = FileV1 {
        format: FORMAT.into(),
        model_type: model.config.arch.model_type().into(),
        hidden_size: model.config.hidden_size,
        num_layers: model.weights.layers.len(),
        act: a.clone(),
    };
    serde_json::to_vec_pretty(&f).map_err(|e| Error::Invalid(format!("serializing {FILE}: {e}")))
}

/// Reads `path` and checks it belongs to `model`'s architecture and size.
pub fn read(path: &Path, model: &Model) -> Result<ActSparsity> {
    let bad = |msg: String| Error::Format {
        path: path.to_path_buf(),
        format: "lopper activation-sparsity",
        msg,
    };
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let f: FileV1 = serde_json::from_slice(&bytes).map_err(|e| bad(format!("{e}")))?;
    if f.format != FORMAT {
        return Err(bad(format!("format `{}`, expected `{FORMAT}`", f.format)));
    }
    let arch = model.config.arch.model_type();
    if f.model_type != arch {
        return Err(bad(format!(
            "thresholds are for a `{}` model, this one is `{arch}`",
            f.model_type
        )));
    }
    if f.hidden_size != model.config.hidden_size {
        return Err(bad(format!(
            "thresholds are for hidden size {}, but `{}` has width {}",
            f.hidden_size,
            crate::model::names::EMBED,
            model.config.hidden_size
        )));
    }
    let n = model.weights.layers.len();
    if f.num_layers != n || f.act.layers.len() != n {
        return Err(bad(format!(
            "thresholds are for {} blocks ({} listed), the model has {n}",
            f.num_layers,
            f.act.layers.len()
        )));
    }
    if !(0.0..1.0).contains(&f.act.target) {
        return Err(bad(format!("target {} is outside [0, 1)", f.act.target)));
    }
    Ok(f.act)
}

/// Installs the thresholds stored in `dir` into `model`, when the file exists.
pub fn load_into(model: &mut Model, dir: &Path) -> Result<bool> {
    let path = dir.join(FILE);
    if !path.is_file() {
        return Ok(false);
    }
    let a = read(&path, model)?;
    act::install(model, &a).map_err(|e| match e {
        Error::Invalid(msg) => Error::Format {
            path: path.clone(),
            format: "lopper activation-sparsity",
            msg,
        },
        e => e,
    })?;
    Ok(true)
}
