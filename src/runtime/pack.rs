//! Packing a model's weights into compressed formats for the runtime.
//!
//! [`pack`] gives every block linear (and the LM head) a [`Packed`] copy in the chosen
//! [`FormatChoice`]; [`crate::model::forward::linear`] then uses it for decode-sized products and,
//! where the format's own product measured no slower than dense GEMM, for prefill too (a format
//! that loses on prefill falls back to the dense weight for prefill only). The dense f32 weights
//! stay in the model (memory-mapped when loaded from f32 safetensors), so pruning, saving and
//! evaluation keep working on them; [`unpack`] drops the packed copies.
//!
//! `auto` picks per tensor among the candidate formats that can represent it (dense, bitmask,
//! CSR, N:M when the tensor is N:M) the one with the lowest estimated decode time, a roofline:
//! `max(bytes / measured DRAM bandwidth, measured in-cache matvec time)` (see
//! [`super::autopick`]). A forced format that cannot represent a tensor (N:M on a tensor that is
//! not N:M, CSR with more than 65536 columns) is an error naming the tensor.

pub use super::autopick::PREFILL_PROBE_ROWS;
use super::autopick::{self, build, Probes, TensorStats};
pub use super::choice::{FormatChoice, Layout, ValueType};
use crate::formats::screen::{ArgmaxScreen, Exact};
use crate::formats::{self, WeightFormat};
use crate::model::weights::Packed;
use crate::{LinearKind, Model, Result};
use rayon::prelude::*;
use serde::Serialize;
use std::sync::Arc;
use std::time::Instant;

/// What [`pack`] does.
#[derive(Debug, Clone)]
pub struct PackOpts {
    /// Format of the block linears.
    pub choice: FormatChoice,
    /// Format of the LM head; `None`: dense of the body's value type.
    pub head: Option<FormatChoice>,
    /// DRAM read bandwidth for `auto`'s estimates (GB/s); `None`: measured.
    pub bandwidth_gbps: Option<f64>,
    /// Measure whether each lossless packed format is at least as fast as dense GEMM on
    /// prefill-sized products (else prefill uses the dense weight). Off: lossless formats serve
    /// decode only.
    pub probe_prefill: bool,
    /// Give the LM head an int8 argmax screen ([`attach_head_screen`]) when its format allows:
    /// greedy and top-k steps then read about a quarter of the head, with the same tokens.
    pub head_screen: bool,
}

impl PackOpts {
    /// Pack everything as `choice`, head by default, measured probes.
    pub fn new(choice: FormatChoice) -> PackOpts {
        PackOpts {
            choice,
            head: None,
            bandwidth_gbps: None,
            probe_prefill: true,
            head_screen: true,
        }
    }
}

/// One packed tensor.
#[derive(Debug, Clone, Serialize)]
pub struct PackedTensor {
    pub name: String,
    /// Format kind (`dense-f32` when left unpacked).
    pub kind: String,
    /// Bytes a product reads.
    pub bytes: usize,
    /// Bytes the dense f32 weight reads.
    pub dense_bytes: usize,
    /// True when prefill also uses the packed format.
    pub prefill: bool,
}

/// What [`pack`] did.
#[derive(Debug, Clone, Serialize)]
pub struct PackReport {
    pub choice: FormatChoice,
    pub head: FormatChoice,
    pub tensors: Vec<PackedTensor>,
    /// Bandwidth used by `auto`'s estimates, when it ran.
    pub bandwidth_gbps: Option<f64>,
    pub seconds: f64,
}

impl PackReport {
    /// Weight bytes one decode step reads through the block linears and the head.
    pub fn bytes(&self) -> usize {
        self.tensors.iter().map(|t| t.bytes).sum()
    }
}

/// HF name of the LM head tensor a [`PackReport`] lists (the embedding when tied).
pub const HEAD_NAME: &str = "lm_head.weight";

/// Packs `model`'s block linears as `opts.choice` and its LM head as `opts.head` (replacing any
/// earlier packing). See the module docs.
pub fn pack(model: &mut Model, opts: &PackOpts) -> Result<PackReport> {
    let t0 = Instant::now();
    unpack(model);
    let head_choice = opts.head.unwrap_or(opts.choice.dense_of_same_values());
    // Every tensor: name, weight, choice.
    let mut jobs: Vec<(String, &[f32], usize, usize, FormatChoice)> = Vec::new();
    for (i, l) in model.weights.layers.iter().enumerate() {
        for kind in LinearKind::ALL {
            let w = &l.linear(kind).weight;
            jobs.push((
                crate::model::names::tensor_name(i, kind),
                w.data(),
                w.rows(),
                w.cols(),
                opts.choice,
            ));
        }
    }
    let head = model.weights.lm_head();
    jobs.push((
        HEAD_NAME.into(),
        head.data(),
        head.rows(),
        head.cols(),
        head_choice,
    ));
    let auto = jobs.iter().any(|j| j.4.is_auto());
    let stats: Vec<TensorStats> = jobs
        .par_iter()
        .map(|(_, w, r, c, _)| TensorStats::of(w, *r, *c))
        .collect();
    let mut probes = Probes::default();
    let bw = if auto {
        Some(
            opts.bandwidth_gbps
                .unwrap_or_else(autopick::measure_bandwidth),
        )
    } else {
        None
    };
    // Resolve auto choices (sequential: they time kernels).
    let mut resolved = Vec::with_capacity(jobs.len());
    for ((name, w, _, _, choice), st) in jobs.iter().zip(&stats) {
        resolved.push(match choice {
            c if c.is_auto() => autopick::pick(
                name,
                w,
                st,
                choice.value_type(),
                bw.unwrap_or(10.0),
                &mut probes,
            )?,
            other => *other,
        });
    }
    // Build (parallel).
    let built: Vec<Option<Arc<dyn WeightFormat>>> = jobs
        .par_iter()
        .zip(&resolved)
        .zip(&stats)
        .map(|(((name, w, r, c, _), choice), st)| build(name, w, *r, *c, *choice, st))
        .collect::<Vec<_>>()
        // The first failing tensor in model order, not whichever thread failed first.
        .into_iter()
        .collect::<Result<_>>()?;
    // Prefill policy (sequential: timed).
    let mut tensors = Vec::with_capacity(jobs.len());
    let mut packed: Vec<Option<Packed>> = Vec::with_capacity(jobs.len());
    for (((name, w, r, c, _), f), choice) in jobs.iter().zip(built).zip(&resolved) {
        let dense_bytes = r * c * 4;
        let Some(f) = f else {
            tensors.push(PackedTensor {
                name: name.clone(),
                kind: "dense-f32".into(),
                bytes: dense_bytes,
                dense_bytes,
                prefill: false,
            });
            packed.push(None);
            continue;
        };
        // A lossy format (bf16, int8) is used for every product, so that prefill and decode
        // compute with the same values; a lossless one may fall back to the (identical) dense
        // weight where that is faster.
        let lossy = choice.value_type() != ValueType::F32;
        let prefill = lossy || (opts.probe_prefill && probes.prefill_ok(f.as_ref(), w));
        tensors.push(PackedTensor {
            name: name.clone(),
            kind: f.kind().into(),
            bytes: f.nbytes(),
            dense_bytes,
            prefill,
        });
        packed.push(Some(Packed {
            format: f,
            max_rows: if prefill {
                usize::MAX
            } else {
                formats::SMALL_M
            },
        }));
    }
    let mut it = packed.into_iter();
    for l in model.weights.layers.iter_mut() {
        for kind in LinearKind::ALL {
            l.linear_mut(kind).packed = it.next().flatten();
        }
    }
    model.weights.lm_head_packed = it.next().flatten();
    if opts.head_screen {
        attach_head_screen(model)?;
    }
    Ok(PackReport {
        choice: opts.choice,
        head: head_choice,
        tensors,
        bandwidth_gbps: bw,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// The LM head as the exact matrix of an argmax screen: its packed copy, else its f32 weight.
pub fn exact_head(w: &crate::Weights) -> Exact<'_> {
    match &w.lm_head_packed {
        Some(p) => Exact::Format(p.format.as_ref()),
        None => {
            let h = w.lm_head();
            Exact::F32 {
                w: h.data(),
                rows: h.rows(),
                cols: h.cols(),
            }
        }
    }
}

/// Gives the LM head (as packed now, or its f32 weight) an int8 argmax screen, so greedy and
/// top-k steps ([`crate::runtime::kv::forward_step_top_k`]) read about a quarter of it and pick
/// the same tokens. `false` when the head's format cannot compute single rows (only dense ones can) or is
/// already int8; then every step computes the full head.
pub fn attach_head_screen(model: &mut Model) -> Result<bool> {
    model.weights.lm_head_screen = None;
    let exact = exact_head(&model.weights);
    let int8 = matches!(exact, Exact::Format(f) if f.kind() == "dense-i8");
    if int8 || !exact.supports_rows() {
        return Ok(false);
    }
    let screen = ArgmaxScreen::build(exact, HEAD_NAME)?;
    model.weights.lm_head_screen = Some(Arc::new(screen));
    Ok(true)
}

/// Weight bytes one decode step reads: every block linear and the LM head, through its packed
/// format when it has one (else its dense f32 weight). With a head screen: the screen plus the
/// mean number of candidate rows its products computed so far (none before the first).
pub fn decode_bytes(w: &crate::Weights) -> usize {
    let one = |t: &crate::Tensor, p: Option<&Packed>| p.map_or(t.len() * 4, |p| p.format.nbytes());
    let body: usize = w
        .layers
        .iter()
        .flat_map(|l| LinearKind::ALL.map(|k| l.linear(k)))
        .map(|l| one(&l.weight, l.packed.as_ref()))
        .sum();
    let head = match &w.lm_head_screen {
        Some(s) => {
            let (calls, rows) = s.counts();
            let mean = rows as f64 / calls.max(1) as f64;
            s.nbytes() + (mean * exact_head(w).row_bytes()).round() as usize
        }
        None => one(w.lm_head(), w.lm_head_packed.as_ref()),
    };
    body + head
}

/// Drops every packed copy (the dense weights remain). Call after changing weights in place.
pub fn unpack(model: &mut Model) {
    for l in model.weights.layers.iter_mut() {
        for kind in LinearKind::ALL {
            l.linear_mut(kind).packed = None;
        }
    }
    model.weights.lm_head_packed = None;
    model.weights.lm_head_screen = None;
}
