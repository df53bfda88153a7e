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
//! Loading ([`load_note`], [`load_weight`], called by [`crate::io::hf`]) validates every array
//! through the format's `from_tensors` and the shape against the config; a corrupt tensor is an
//! [`Error::Format`] naming the file and the tensor. The dense weight is rebuilt from the format
//! (so pruning, saving and prefill GEMM keep working); the packed copy serves decode-sized
//! products (`max_rows` = [`crate::formats::SMALL_M`]; re-[`crate::runtime::pack`] to re-probe
//! prefill).

use crate::formats::{self, Dtype, RawTensor, WeightFormat};
use crate::io::hf::SafetensorsFile;
use crate::io::save::{self, Custom, SaveDtype};
use crate::model::weights::{Packed, Tensor};
use crate::{Error, LinearKind, Model, Result};
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

/// The `config.json` key listing packed tensors and their format kinds.
pub const FORMATS_KEY: &str = "lopper_formats";
/// Name under which a packed LM head is stored.
pub const HEAD: &str = "lm_head.weight";

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

/// The `lopper_formats` note of a `config.json`: tensor name → format kind (empty when absent).
pub fn load_note(json: &Value, path: &Path) -> Result<BTreeMap<String, String>> {
    let bad = |m: String| Error::config(path, m);
    let obj = match json.get(FORMATS_KEY) {
        None | Some(Value::Null) => return Ok(BTreeMap::new()),
        Some(Value::Object(o)) => o,
        Some(_) => return Err(bad(format!("`{FORMATS_KEY}` must be an object"))),
    };
    let mut out = BTreeMap::new();
    for (name, kind) in obj {
        let kind = kind
            .as_str()
            .ok_or_else(|| bad(format!("`{FORMATS_KEY}.{name}` must be a format name")))?;
        if !formats::KINDS.contains(&kind) {
            return Err(bad(format!(
                "`{FORMATS_KEY}.{name}`: unknown format `{kind}` (known: {})",
                formats::KINDS.join(", ")
            )));
        }
        let linear = name.starts_with(crate::model::names::LAYERS_PREFIX)
            && LinearKind::ALL
                .iter()
                .any(|k| name.ends_with(&format!(".{}.weight", k.hf_name())));
        if !linear && name != HEAD {
            return Err(bad(format!(
                "`{FORMATS_KEY}` lists `{name}`, which is neither a block linear nor {HEAD}"
            )));
        }
        out.insert(name.clone(), kind.to_string());
    }
    Ok(out)
}

/// The safetensors dtype of a raw array.
fn dtype_of(s: &str) -> Option<Dtype> {
    Some(match s {
        "F32" => Dtype::F32,
        "F16" => Dtype::F16,
        "BF16" => Dtype::Bf16,
        "I8" => Dtype::I8,
        "U8" => Dtype::U8,
        "U16" => Dtype::U16,
        "U32" => Dtype::U32,
        "U64" => Dtype::U64,
        _ => return None,
    })
}

/// Loads the packed tensor `name` of format `kind` from `file` (which holds its arrays),
/// checked to be `expected` = `[rows, cols]`; returns the rebuilt dense weight and the packed
/// copy.
pub fn load_weight(
    file: &SafetensorsFile,
    name: &str,
    kind: &str,
    expected: &[usize],
) -> Result<(Tensor, Packed)> {
    let corrupt = |msg: String| Error::format(file.path(), "packed weight", msg);
    let prefix = format!("{name}.");
    let mut raws = Vec::new();
    for n in file.names() {
        if !n.starts_with(&prefix) {
            continue;
        }
        let (Some((dt, shape)), Some(bytes)) = (file.info(n), file.raw(n)) else {
            continue;
        };
        let dtype =
            dtype_of(dt).ok_or_else(|| corrupt(format!("`{n}` has unsupported dtype {dt}")))?;
        let data = bytes.to_vec();
        raws.push(RawTensor {
            name: n.to_string(),
            dtype,
            shape: shape.to_vec(),
            data,
        });
    }
    let f: Arc<dyn WeightFormat> = Arc::from(
        formats::from_tensors(kind, name, &raws)
            .map_err(|e| corrupt(format!("{name} ({kind}): {e}")))?,
    );
    let shape = [f.rows(), f.cols()];
    if shape != expected {
        return Err(Error::shape(file.path(), name, &shape, expected));
    }
    let dense = Tensor::new(shape.to_vec(), f.to_dense());
    Ok((
        dense,
        Packed {
            format: f,
            max_rows: formats::SMALL_M,
        },
    ))
}
