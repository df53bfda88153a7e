//! Reading and writing model files: GGUF, HF safetensors directories (optionally with packed
//! weights, [`packed`]).

pub mod act_file;
pub mod gguf;
pub mod gguf_write;
pub mod hf;
pub mod packed;
pub mod packed_load;
pub mod save;
pub mod save_family;

use crate::{Error, Model, Result};
use std::path::Path;

/// Load a model from a GGUF file or an HF directory (chosen by what `path` is).
pub fn load_model(path: &Path) -> Result<Model> {
    load_model_with(path, false)
}

/// [`load_model`] for block-at-a-time work: with `lazy`, loading holds none of the f32 model in
/// memory. f32 safetensors are mapped in place (as always); f16 / bf16 safetensors and GGUF
/// tensors are converted or dequantized only when first read, from their mapped file
/// ([`crate::model::weights::Storage::Lazy`]), and [`crate::Tensor::release`] drops them again.
pub fn load_model_with(path: &Path, lazy: bool) -> Result<Model> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if meta.is_dir() {
        hf::load_dir_with(path, lazy)
    } else if path.extension().and_then(|e| e.to_str()) == Some("safetensors") {
        match path.parent() {
            Some(dir) => hf::load_dir_with(dir, lazy),
            None => Err(Error::config(path, "cannot find the model directory")),
        }
    } else {
        gguf::load_with(path, lazy)
    }
}
