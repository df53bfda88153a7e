//! The runtime side of activation sparsity: column-major copies of the block linears, so a
//! decode step reads only the weight columns whose inputs survived the thresholds
//! ([`crate::model::act`]).
//!
//! [`pack_columns`] gives every block linear a [`ColMajorOf`] copy in the chosen value type (or,
//! for a weight-sparse model, a [`ColBitmaskOf`] copy that stores only the nonzero weights, so
//! that static and dynamic zeros both save bytes) as its packed format, used for products of up to [`SMALL_M`] rows (decode). Prefill and
//! evaluation (more rows) keep using the row-major f32 weight, which stays in the model (mapped
//! from the file when the model is f32 safetensors), so the model holds both layouts: the
//! column-major copy costs `rows·cols` values of the chosen type per linear (plus up to 63
//! padding rows per matrix), e.g. 212 MB in bf16 for SmolLM2-135M's blocks.
//! [`decode_bytes`] estimates the weight bytes one decode step reads from the sparsity each site
//! reached.

use crate::formats::{ColBitmaskOf, ColMajorOf, WeightFormat, SMALL_M};
use crate::model::names;
use crate::model::observer::Site;
use crate::model::weights::Packed;
use crate::runtime::choice::ValueType;
use crate::{Error, LinearKind, Model, Result};
use rayon::prelude::*;
use std::sync::Arc;

/// The largest magnitude f16 holds.
const F16_MAX: f32 = 65504.0;

/// How the column-major copies store a weight's zeros.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Columns {
    /// Every value ([`ColMajorOf`]).
    Dense,
    /// Only the nonzeros, with a bitmask per column ([`ColBitmaskOf`]).
    Bitmask,
}

/// Builds column-major copies of every block linear (the matrix `x` meets first: `W`, or a
/// low-rank layer's `V`) with values `vt`, replacing their packed formats. Returns the bytes
/// of the copies.
pub fn pack_columns(model: &mut Model, vt: ValueType, layout: Columns) -> Result<usize> {
    let jobs: Vec<(usize, LinearKind)> = (0..model.weights.layers.len())
        .flat_map(|i| LinearKind::ALL.map(|k| (i, k)))
        .collect();
    let layers = &model.weights.layers;
    let built: Vec<Arc<dyn WeightFormat>> = jobs
        .par_iter()
        .map(|&(i, k)| {
            let w = &layers[i].linear(k).weight;
            let (d, rows, cols) = (w.data(), w.rows(), w.cols());
            let bm = layout == Columns::Bitmask;
            let f: Arc<dyn WeightFormat> = match vt {
                ValueType::F32 if bm => Arc::new(ColBitmaskOf::<f32>::from_dense(d, rows, cols)?),
                ValueType::F32 => Arc::new(ColMajorOf::<f32>::from_dense(d, rows, cols)?),
                ValueType::Bf16 if bm => {
                    Arc::new(ColBitmaskOf::<half::bf16>::from_dense(d, rows, cols)?)
                }
                ValueType::Bf16 => Arc::new(ColMajorOf::<half::bf16>::from_dense(d, rows, cols)?),
                ValueType::I8 if bm => Arc::new(ColBitmaskOf::<i8>::from_dense(d, rows, cols)?),
                ValueType::I8 => Arc::new(ColMajorOf::<i8>::from_dense(d, rows, cols)?),
                ValueType::F16 => {
                    if let Some(p) = d.iter().position(|v| v.abs() > F16_MAX) {
                        return Err(Error::Invalid(format!(
                            "`{}` value {} at [{}, {}] is beyond f16's range (±65504)",
                            names::tensor_name(i, k),
                            d[p],
                            p / cols,
                            p % cols
                        )));
                    }
                    match bm {
                        true => Arc::new(ColBitmaskOf::<half::f16>::from_dense(d, rows, cols)?),
                        false => Arc::new(ColMajorOf::<half::f16>::from_dense(d, rows, cols)?),
                    }
                }
            };
            Ok(f)
        })
        .collect::<Result<_>>()?;
    let mut bytes = 0;
    for ((i, k), f) in jobs.into_iter().zip(built) {
        bytes += f.nbytes();
        model.weights.layers[i].linear_mut(k).packed = Some(Packed {
            format: f,
            max_rows: SMALL_M,
        });
    }
    Ok(bytes)
}

/// Weight bytes one decode step reads ([`crate::runtime::pack::decode_bytes`]) less what the
/// column-major copies skipped at the sparsity each block's sites reached so far (`sparsity ×`
/// each such linear's bytes). The LM head is not sparsified.
pub fn decode_bytes(model: &Model) -> usize {
    let full = crate::runtime::pack::decode_bytes(&model.weights) as f64;
    let mut skipped = 0.0;
    for lw in &model.weights.layers {
        for k in LinearKind::ALL {
            if let Some(p) = &lw.linear(k).packed {
                let kind = p.format.kind();
                if kind.starts_with("colmajor") || kind.starts_with("colbitmask") {
                    let s = lw
                        .act
                        .as_ref()
                        .and_then(|a| a.achieved(crate::model::act::site_index(Site::of(k))));
                    skipped += p.format.nbytes() as f64 * s.unwrap_or(0.0);
                }
            }
        }
    }
    (full - skipped).round() as usize
}
