//! Reading and writing model files: GGUF, HF safetensors directories (optionally with packed
//! weights, [`packed`]).

pub mod gguf;
pub mod gguf_write;
pub mod hf;
pub mod packed;
pub mod save;

use crate::model::spill::Spill;
use crate::{Error, Model, Result};
use std::path::Path;

/// Load a model from a GGUF file or an HF directory (chosen by what `path` is).
pub fn load_model(path: &Path) -> Result<Model> {
    load_model_with(path, None)
}

/// [`load_model`] for block-at-a-time work: with `spill`, loading never holds the whole f32 model
/// in memory. f32 safetensors are mapped in place (as always), f16 / bf16 safetensors are
/// converted only when first read ([`crate::model::weights::Storage::Lazy`]), GGUF tensors are
/// dequantized into `spill` one at a time and mapped from there ([`crate::model::spill`]).
pub fn load_model_with(path: &Path, spill: Option<&Spill>) -> Result<Model> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if meta.is_dir() {
        hf::load_dir_with(path, spill.is_some())
    } else if path.extension().and_then(|e| e.to_str()) == Some("safetensors") {
        match path.parent() {
            Some(dir) => hf::load_dir_with(dir, spill.is_some()),
            None => Err(Error::config(path, "cannot find the model directory")),
        }
    } else {
        gguf::load_with(path, spill)
    }
}
