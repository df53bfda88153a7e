//! HF model directories: `config.json`, safetensors (single or sharded), `tokenizer.json`.
use crate::{Model, Result};
use std::path::Path;

/// Load an HF model directory.
pub fn load_dir(dir: &Path) -> Result<Model> {
    let _ = dir;
    todo!("hf loader")
}
