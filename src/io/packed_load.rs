//! Reading packed weights back (see [`crate::io::packed`] for the layout): the
//! `lopper_formats` note of a `config.json` and the arrays of one packed tensor. Kept apart from
//! the writer, which goes through [`crate::io::save`], so that the HF loader can use it without
//! an import cycle (hf → packed → save → hf).

use crate::formats::{self, Dtype, RawTensor, WeightFormat};
use crate::io::hf::safetensors_file::SafetensorsFile;
use crate::model::weights::{Packed, Tensor};
use crate::{Error, LinearKind, Result};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

/// The `config.json` key listing packed tensors and their format kinds.
pub const FORMATS_KEY: &str = "lopper_formats";
/// Name under which a packed LM head is stored.
pub const HEAD: &str = crate::model::names::LM_HEAD;

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
        if formats::registry::by_kind(kind).is_none() {
            return Err(bad(format!(
                "`{FORMATS_KEY}.{name}`: unknown format `{kind}` (known: {})",
                formats::registry::kinds().collect::<Vec<_>>().join(", ")
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
