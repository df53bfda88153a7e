//! Reading and writing model files: GGUF, HF safetensors directories (optionally with packed
//! weights, [`packed`]).

pub mod gguf;
pub mod gguf_write;
pub mod hf;
pub mod packed;
pub mod save;

use crate::{Error, Model, Result};
use std::path::Path;

/// Load a model from a GGUF file or an HF directory (chosen by what `path` is).
pub fn load_model(path: &Path) -> Result<Model> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if meta.is_dir() {
        hf::load_dir(path)
    } else if path.extension().and_then(|e| e.to_str()) == Some("safetensors") {
        match path.parent() {
            Some(dir) => hf::load_dir(dir),
            None => Err(Error::config(path, "cannot find the model directory")),
        }
    } else {
        gguf::load(path)
    }
}
