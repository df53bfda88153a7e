//! Saving and loading packed (compressed) weights in an HF directory.
//!
//! [`save_packed`] writes the model like [`crate::io::save::save_hf`] (f32, atomically), except
//! that every block linear with a packed format is stored as that format's arrays
//! (`<name>.shape`, `<name>.bitmask`, `<name>.values`, ... — see
//! [`crate::formats::WeightFormat::to_tensors`]) instead of its dense `<name>`, and `config.json`
//! notes which: `"lopper_formats": {"model.layers.0.mlp.up_proj.weight": "bitmask", ...}`. A
//! packed LM head is stored the same way under `lm_head.weight` (tied: the embedding is still
//! written densely, it is needed for the lookup). Such a directory loads in lopper without
//! re-compression; transformers cannot load it (the noted weights are not dense tensors).
//!
//! Loading ([`load_note`], [`load_weight`] in [`crate::io::packed_load`], called by
//! [`crate::io::hf`]) validates every array
//! through the format's `from_tensors` and the shape against the config; a corrupt tensor is an
//! [`crate::Error::Format`] naming the file and the tensor. The dense weight is rebuilt from the format
//! (so pruning, saving and prefill GEMM keep working); the packed copy serves decode-sized
//! products (`max_rows` = [`crate::formats::SMALL_M`]; re-[`crate::runtime::pack`] to re-probe
//! prefill).

use crate::formats::WeightFormat;
use crate::io::save::{self, Custom, SaveDtype};
use crate::{LinearKind, Model, Result};
use serde_json::{Map, Value};
use std::path::Path;

pub use super::packed_load::{load_note, load_weight, FORMATS_KEY, HEAD};

/// Saves `model` with its packed weights stored packed (see the module docs).
pub fn save_packed(model: &Model, out: &Path, force: bool) -> Result<()> {
    save_packed_with_extras(model, out, force, &[])
}

/// [`save_packed`] plus extra files written into the directory before it is renamed into place.
pub fn save_packed_with_extras(
    model: &Model,
    out: &Path,
    force: bool,
    extras: &[(&str, &[u8])],
) -> Result<()> {
    let w = &model.weights;
    let mut custom = Custom::default();
    let mut note = Map::new();
    let mut add = |name: String, f: &dyn WeightFormat, skip: bool| {
        note.insert(name.clone(), Value::String(f.kind().into()));
        custom.raw.extend(f.to_tensors(&name));
        if skip {
            custom.skip.insert(name);
        }
    };
    for (i, l) in w.layers.iter().enumerate() {
        for kind in LinearKind::ALL {
            if let Some(p) = &l.linear(kind).packed {
                add(
                    crate::model::names::tensor_name(i, kind),
                    p.format.as_ref(),
                    true,
                );
            }
        }
    }
    if let Some(p) = &w.lm_head_packed {
        add(HEAD.into(), p.format.as_ref(), w.lm_head.is_some());
    }
    if !note.is_empty() {
        custom
            .config
            .insert(FORMATS_KEY.into(), Value::Object(note));
    }
    save::save_hf_custom(model, out, SaveDtype::F32, force, extras, &custom)
}
