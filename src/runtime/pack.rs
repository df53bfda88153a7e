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

use super::autopick::{self, Probes, TensorStats};
use crate::formats::screen::{ArgmaxScreen, Exact};
use crate::formats::{self, WeightFormat};
use crate::model::weights::Packed;
use crate::{Error, LinearKind, Model, Result};
use half::{bf16, f16};
use rayon::prelude::*;
use serde::Serialize;
use std::sync::Arc;
use std::time::Instant;

/// Stored value type of a format choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ValueType {
    F32,
    F16,
    Bf16,
    I8,
}

/// Which format to pack weights into.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FormatChoice {
    /// Per tensor, the fastest estimated lossless (f32-valued) format.
    Auto,
    /// Per tensor, the fastest estimated bf16-valued format.
    AutoBf16,
    /// Per tensor, the fastest estimated IEEE-f16-valued format.
    AutoF16,
    /// Dense f32 (no packed copy: the model's own weights).
    Dense,
    Bf16,
    /// Dense IEEE f16 (values beyond ±65504 are refused).
    F16,
    Int8,
    Bitmask,
    BitmaskBf16,
    BitmaskF16,
    BitmaskI8,
    Csr,
    CsrBf16,
    CsrF16,
    CsrI8,
    /// N:M (the tensor's own pattern among 1:2, 2:4, 4:8, 8:16).
    Nm,
    NmBf16,
    NmF16,
    NmI8,
    /// Block-sparse rows with the tile shape (among 8×8, 4×16, 4×4, 1×16, 2×2, 1×4) that stores
    /// the fewest values.
    Bsr,
}

/// How a format choice stores a matrix, whatever its value type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// Resolved per tensor by [`autopick::pick`].
    Auto,
    Dense,
    Bitmask,
    Csr,
    Nm,
    Bsr,
}

impl FormatChoice {
    /// Every choice with its CLI name.
    pub const ALL: [(FormatChoice, &'static str); 20] = [
        (FormatChoice::Auto, "auto"),
        (FormatChoice::AutoBf16, "auto-bf16"),
        (FormatChoice::AutoF16, "auto-f16"),
        (FormatChoice::Dense, "dense"),
        (FormatChoice::Bf16, "bf16"),
        (FormatChoice::F16, "f16"),
        (FormatChoice::Int8, "int8"),
        (FormatChoice::Bitmask, "bitmask"),
        (FormatChoice::BitmaskBf16, "bitmask-bf16"),
        (FormatChoice::BitmaskF16, "bitmask-f16"),
        (FormatChoice::BitmaskI8, "bitmask-i8"),
        (FormatChoice::Csr, "csr"),
        (FormatChoice::CsrBf16, "csr-bf16"),
        (FormatChoice::CsrF16, "csr-f16"),
        (FormatChoice::CsrI8, "csr-i8"),
        (FormatChoice::Nm, "nm"),
        (FormatChoice::NmBf16, "nm-bf16"),
        (FormatChoice::NmF16, "nm-f16"),
        (FormatChoice::NmI8, "nm-i8"),
        (FormatChoice::Bsr, "bsr"),
    ];

    /// The CLI name.
    pub fn name(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(c, _)| *c == self)
            .map_or("?", |(_, n)| n)
    }

    /// Value type of the stored weights.
    pub fn value_type(self) -> ValueType {
        use FormatChoice::*;
        match self {
            AutoBf16 | Bf16 | BitmaskBf16 | CsrBf16 | NmBf16 => ValueType::Bf16,
            AutoF16 | F16 | BitmaskF16 | CsrF16 | NmF16 => ValueType::F16,
            Int8 | BitmaskI8 | CsrI8 | NmI8 => ValueType::I8,
            _ => ValueType::F32,
        }
    }

    /// How the weights are stored.
    pub fn layout(self) -> Layout {
        use FormatChoice::*;
        match self {
            Auto | AutoBf16 | AutoF16 => Layout::Auto,
            Dense | Bf16 | F16 | Int8 => Layout::Dense,
            Bitmask | BitmaskBf16 | BitmaskF16 | BitmaskI8 => Layout::Bitmask,
            Csr | CsrBf16 | CsrF16 | CsrI8 => Layout::Csr,
            Nm | NmBf16 | NmF16 | NmI8 => Layout::Nm,
            Bsr => Layout::Bsr,
        }
    }

    /// The choice with this layout and value type, if there is one (BSR is f32 only).
    pub fn of(layout: Layout, vt: ValueType) -> Option<FormatChoice> {
        Self::ALL
            .iter()
            .map(|&(c, _)| c)
            .find(|c| c.layout() == layout && c.value_type() == vt)
    }

    /// True for `auto`, `auto-bf16` and `auto-f16` (resolved per tensor by [`autopick::pick`]).
    pub fn is_auto(self) -> bool {
        self.layout() == Layout::Auto
    }

    /// The dense choice of the same value type (what the LM head gets by default).
    pub fn dense_of_same_values(self) -> FormatChoice {
        Self::of(Layout::Dense, self.value_type()).unwrap_or(FormatChoice::Dense)
    }
}

impl std::str::FromStr for FormatChoice {
    type Err = Error;
    fn from_str(s: &str) -> Result<FormatChoice> {
        let s = s.trim().to_ascii_lowercase();
        let alias = match s.as_str() {
            "f32" | "dense-f32" => "dense",
            "i8" | "dense-i8" => "int8",
            "dense-bf16" => "bf16",
            "dense-f16" => "f16",
            other => other,
        };
        Self::ALL
            .iter()
            .find(|(_, n)| *n == alias)
            .map(|(c, _)| *c)
            .ok_or_else(|| {
                let names: Vec<&str> = Self::ALL.iter().map(|(_, n)| *n).collect();
                Error::Invalid(format!(
                    "unknown format `{s}` (use one of: {})",
                    names.join(", ")
                ))
            })
    }
}

impl std::fmt::Display for FormatChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

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

/// Prefill probe size: rows of `x` at which a format's product is compared with dense GEMM.
pub const PREFILL_PROBE_ROWS: usize = 64;

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

/// Builds `choice` (not auto) for one tensor; `None` for dense f32. Errors name the tensor.
pub(crate) fn build(
    name: &str,
    w: &[f32],
    rows: usize,
    cols: usize,
    choice: FormatChoice,
    st: &TensorStats,
) -> Result<Option<Arc<dyn WeightFormat>>> {
    use formats::*;
    use FormatChoice as C;
    let nm = || {
        st.nm.ok_or_else(|| {
            Error::Invalid(format!(
                "cannot pack {name} [{rows}×{cols}] as {choice}: it is not N:M sparse \
                 (checked 1:2, 2:4, 4:8 and 8:16 along rows; {:.1}% zeros)",
                100.0 * (1.0 - st.density)
            ))
        })
    };
    let wrap = |e: Error| Error::Invalid(format!("cannot pack {name} as {choice}: {e}"));
    if choice.value_type() == ValueType::F16 {
        // f16 rounds a weight past ±65504 to infinity: refuse instead of corrupting it.
        let limit = f16::MAX.to_f32();
        if let Some(i) = w.iter().position(|v| v.abs() > limit) {
            return Err(Error::Invalid(format!(
                "cannot pack {name} as {choice}: weight [{}, {}] = {} is outside the f16 \
                 range (±{limit}); use bf16 or f32",
                i / cols.max(1),
                i % cols.max(1),
                w[i]
            )));
        }
    }
    let layout = choice.layout();
    let f = match layout {
        Layout::Auto => {
            return Err(Error::Invalid(format!(
                "{name}: `{choice}` must be resolved before building"
            )))
        }
        Layout::Dense if choice == C::Dense => return Ok(None),
        Layout::Bsr => {
            let (br, bc) = autopick::bsr_tile(w, rows, cols);
            Arc::new(Bsr::from_dense(w, rows, cols, br, bc).map_err(wrap)?)
        }
        _ => {
            let nm = if layout == Layout::Nm { nm()? } else { (0, 0) };
            match choice.value_type() {
                ValueType::F32 => build_as::<f32>(layout, w, rows, cols, nm),
                ValueType::Bf16 => build_as::<bf16>(layout, w, rows, cols, nm),
                ValueType::F16 => build_as::<f16>(layout, w, rows, cols, nm),
                ValueType::I8 => build_as::<i8>(layout, w, rows, cols, nm),
            }
            .map_err(wrap)?
        }
    };
    Ok(Some(f))
}

/// `w` packed as the dense, bitmask, CSR or N:M (pattern `nm`) format with values `E`.
fn build_as<E: formats::Elem>(
    layout: Layout,
    w: &[f32],
    rows: usize,
    cols: usize,
    (n, m): (usize, usize),
) -> Result<Arc<dyn WeightFormat>> {
    use formats::*;
    Ok(match layout {
        Layout::Dense => Arc::new(DenseOf::<E>::from_dense(w, rows, cols)?),
        Layout::Bitmask => Arc::new(BitmaskOf::<E>::from_dense(w, rows, cols)?),
        Layout::Csr => Arc::new(CsrOf::<E>::from_dense(w, rows, cols)?),
        Layout::Nm => Arc::new(NMOf::<E>::from_dense(w, rows, cols, n, m)?),
        Layout::Auto | Layout::Bsr => unreachable!("{layout:?} is built by `build`"),
    })
}
