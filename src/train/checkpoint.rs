//! Training checkpoints: one safetensors file holding every trainable variable, AdamW's moments
//! and, in its metadata, the loop state and a fingerprint of the model and settings.
//!
//! Written to a temporary file in the same directory, synced, then renamed over the previous
//! checkpoint: a failed write (a full disk) leaves the previous checkpoint intact and reports the
//! path. Loading refuses a checkpoint whose fingerprint differs (another model, teacher, text or
//! setting), naming both.

use super::adamw::AdamW;
use super::params::{terr, TrainModel};
use crate::{Error, Result};
use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

/// File name of the checkpoint inside the checkpoint directory.
pub const FILE: &str = "heal-checkpoint.safetensors";

/// The loop state saved beside the tensors.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct LoopState {
    /// Steps done (the next step to run).
    pub step: usize,
    /// Training tokens seen.
    pub tokens: usize,
    /// `(step, loss)` of every step that ran.
    pub losses: Vec<(usize, f64)>,
    /// Steps skipped for a NaN/Inf loss or gradient.
    pub skipped: usize,
    /// Wall seconds spent so far (over all runs).
    pub seconds: f64,
}

#[derive(Serialize, Deserialize)]
struct Meta {
    fingerprint: String,
    state: LoopState,
    adam_t: u64,
}

fn out_err(path: &Path, msg: String) -> Error {
    Error::Output {
        path: path.to_path_buf(),
        msg,
    }
}

fn bytes_of(t: &Tensor) -> Result<Vec<u8>> {
    let v: Vec<f32> = t.flatten_all().and_then(|f| f.to_vec1()).map_err(terr)?;
    Ok(bytemuck::cast_slice(&v).to_vec())
}

/// Write the checkpoint into `dir` atomically.
pub fn save(
    dir: &Path,
    fingerprint: &str,
    tm: &TrainModel,
    opt: &AdamW,
    st: &LoopState,
) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let path = dir.join(FILE);
    let mut blobs: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for (j, nv) in tm.vars.iter().enumerate() {
        let dims = nv.var.as_tensor().dims().to_vec();
        blobs.push((
            format!("var.{}", nv.name),
            dims.clone(),
            bytes_of(nv.var.as_tensor())?,
        ));
        blobs.push((format!("m.{}", nv.name), dims.clone(), bytes_of(&opt.m[j])?));
        blobs.push((format!("v.{}", nv.name), dims, bytes_of(&opt.v[j])?));
    }
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = blobs
        .iter()
        .map(|(n, s, b)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| out_err(&path, e.to_string()))
        })
        .collect::<Result<_>>()?;
    let meta = Meta {
        fingerprint: fingerprint.to_string(),
        state: st.clone(),
        adam_t: opt.t,
    };
    let meta = serde_json::to_string(&meta).map_err(|e| out_err(&path, e.to_string()))?;
    let md = HashMap::from([("lopper_heal".to_string(), meta)]);
    let bytes =
        safetensors::serialize(views, Some(md)).map_err(|e| out_err(&path, e.to_string()))?;
    let tmp = dir.join(format!(".{FILE}.{}.tmp", std::process::id()));
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        out_err(
            &path,
            format!(
                "cannot write the checkpoint ({e}); the previous checkpoint, if any, is intact"
            ),
        )
    })?;
    Ok(path)
}

/// Restore `tm` and `opt` from the checkpoint in `dir`; refuses another fingerprint.
pub fn load(dir: &Path, fingerprint: &str, tm: &TrainModel, opt: &mut AdamW) -> Result<LoopState> {
    let path = dir.join(FILE);
    let bad = |msg: String| Error::Invalid(format!("--resume {}: {msg}", path.display()));
    let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| Error::format(&path, "safetensors", e.to_string()))?;
    let meta = header
        .metadata()
        .as_ref()
        .and_then(|m| m.get("lopper_heal"))
        .ok_or_else(|| bad("not a lopper heal checkpoint".into()))?;
    let meta: Meta = serde_json::from_str(meta).map_err(|e| bad(format!("bad metadata: {e}")))?;
    if meta.fingerprint != fingerprint {
        return Err(bad(format!(
            "the checkpoint is of another model or other settings (fingerprint {} here, {} in the checkpoint); use the same --model, --teacher, texts and training flags, or start without --resume",
            fingerprint, meta.fingerprint
        )));
    }
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| Error::format(&path, "safetensors", e.to_string()))?;
    let get = |name: String, like: &Tensor| -> Result<Tensor> {
        let v = st
            .tensor(&name)
            .map_err(|_| bad(format!("tensor {name} is missing")))?;
        if v.shape() != like.dims() {
            return Err(bad(format!(
                "tensor {name} has shape {:?}, expected {:?}",
                v.shape(),
                like.dims()
            )));
        }
        let f: Vec<f32> = v
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        Tensor::from_vec(f, like.dims(), like.device())
            .and_then(|t| t.to_dtype(DType::F32))
            .map_err(terr)
    };
    for (j, nv) in tm.vars.iter().enumerate() {
        let w = nv.var.as_tensor();
        nv.var
            .set(&get(format!("var.{}", nv.name), w)?)
            .map_err(terr)?;
        opt.m[j] = get(format!("m.{}", nv.name), w)?;
        opt.v[j] = get(format!("v.{}", nv.name), w)?;
    }
    opt.t = meta.adam_t;
    Ok(meta.state)
}
