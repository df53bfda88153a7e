//! How `--format auto` chooses a format per tensor, and the timing probes behind [`super::pack`].
//!
//! A decode-step product streams each weight once, so its time is about
//! `max(bytes / DRAM bandwidth, compute time)`: the roofline. For every candidate format that
//! can represent the tensor, [`pick`] takes the bytes from the tensor's statistics (exact
//! formulas, no build needed) and the compute time from a matvec timed with the weights in
//! cache (built once per format, shape and density step, then cached), and picks the smallest
//! estimate; ties go to fewer bytes. The bandwidth comes from
//! [`crate::kernels::probe::stream_gbps`] on a buffer larger than the last-level cache.
//!
//! [`Probes::prefill_ok`] decides the prefill policy: a packed format's product on
//! [`PREFILL_PROBE_ROWS`] rows against dense GEMM on the same rows.

use super::choice::{FormatChoice, Layout, ValueType};
use crate::formats::{self, dense_f32_matmul, WeightFormat};
use crate::{Error, Result};
use half::{bf16, f16};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

/// Prefill probe size: rows of `x` at which a format's product is compared with dense GEMM.
pub const PREFILL_PROBE_ROWS: usize = 64;

/// What the format choice needs to know about a tensor.
#[derive(Debug, Clone, Copy)]
pub struct TensorStats {
    pub rows: usize,
    pub cols: usize,
    /// Nonzero values.
    pub nnz: usize,
    /// `nnz / (rows·cols)` (1 for an empty matrix).
    pub density: f64,
    /// The cheapest N:M pattern (1:2, 2:4, 4:8, 8:16) the rows satisfy, if any.
    pub nm: Option<(usize, usize)>,
}

impl TensorStats {
    pub fn of(w: &[f32], rows: usize, cols: usize) -> TensorStats {
        let nnz = w.iter().filter(|&&v| v != 0.0).count();
        let total = rows * cols;
        let nm = [(1, 2), (2, 4), (4, 8), (8, 16)]
            .into_iter()
            .find(|&(n, m)| {
                total > 0
                    && cols.is_multiple_of(m)
                    && w.chunks_exact(m)
                        .all(|g| g.iter().filter(|&&v| v != 0.0).count() <= n)
            });
        TensorStats {
            rows,
            cols,
            nnz,
            density: if total == 0 {
                1.0
            } else {
                nnz as f64 / total as f64
            },
            nm,
        }
    }

    /// Bytes a product through `choice` reads (the formats' `nbytes`, from the statistics).
    pub fn bytes(&self, choice: FormatChoice) -> usize {
        let (r, c, nnz) = (self.rows, self.cols, self.nnz);
        let (val, scales) = match choice.value_type() {
            ValueType::F32 => (4, 0),
            ValueType::Bf16 | ValueType::F16 => (2, 0),
            ValueType::I8 => (1, 4 * r),
        };
        match choice.layout() {
            Layout::Dense => r * c * val + scales,
            Layout::Bitmask => nnz * val + r * c.div_ceil(64) * 8 + scales,
            Layout::Csr => nnz * (val + 2) + (r + 1) * 8 + scales,
            Layout::Nm => match self.nm {
                Some((n, m)) => {
                    let vpr = c / m * n;
                    let bits = (usize::BITS - (m - 1).leading_zeros()) as usize;
                    r * vpr * val + r * (vpr * bits).div_ceil(8) + scales
                }
                None => usize::MAX,
            },
            Layout::Bsr | Layout::Auto => r * c * 4,
        }
    }
}

/// The formats `auto` considers for values of type `vt`.
fn candidates(vt: ValueType, st: &TensorStats) -> Vec<FormatChoice> {
    [Layout::Dense, Layout::Bitmask, Layout::Csr, Layout::Nm]
        .into_iter()
        .filter(|&l| match l {
            Layout::Csr => st.cols <= 1 << 16,
            Layout::Nm => st.nm.is_some(),
            _ => true,
        })
        .filter_map(|l| FormatChoice::of(l, vt))
        .collect()
}

/// Cached timings.
#[derive(Default)]
pub struct Probes {
    /// (format, rows, cols, density step) → seconds per in-cache matvec.
    hot: HashMap<(FormatChoice, usize, usize, usize), f64>,
    /// (kind, rows, cols) → prefill through the format is no slower than dense.
    prefill: HashMap<(&'static str, usize, usize), bool>,
}

/// Best time of `f` over a few runs after a warm-up (at least 3 runs and ~2 ms).
fn best_time(mut f: impl FnMut()) -> f64 {
    f();
    let mut best = f64::MAX;
    let start = Instant::now();
    let mut n = 0;
    while n < 3 || (start.elapsed().as_secs_f64() < 2e-3 && n < 50) {
        let t = Instant::now();
        f();
        best = best.min(t.elapsed().as_secs_f64());
        n += 1;
    }
    best
}

/// A deterministic input `[m, cols]`.
fn probe_input(m: usize, cols: usize) -> Vec<f32> {
    (0..m * cols)
        .map(|i| ((i * 7919 % 1000) as f32 - 500.0) * 1e-3)
        .collect()
}

impl Probes {
    /// Seconds per matvec through `choice` with the weights in cache.
    fn hot_time(
        &mut self,
        name: &str,
        w: &[f32],
        st: &TensorStats,
        choice: FormatChoice,
    ) -> Result<f64> {
        let key = (
            choice,
            st.rows,
            st.cols,
            (st.density * 20.0).round() as usize,
        );
        if let Some(&t) = self.hot.get(&key) {
            return Ok(t);
        }
        let (rows, cols) = (st.rows, st.cols);
        let x = probe_input(1, cols);
        let mut y = vec![0f32; rows];
        let t = match build(name, w, rows, cols, choice, st)? {
            None => best_time(|| dense_f32_matmul(w, rows, cols, &x, 1, &mut y, false)),
            Some(f) => best_time(|| f.matvec(&x, &mut y)),
        };
        self.hot.insert(key, t);
        Ok(t)
    }

    /// True when `f`'s product on prefill-sized inputs is no slower (within 5%) than dense GEMM
    /// on the f32 weight `w` (cached per kind and shape).
    pub fn prefill_ok(&mut self, f: &dyn WeightFormat, w: &[f32]) -> bool {
        let (rows, cols) = (f.rows(), f.cols());
        let key = (f.kind(), rows, cols);
        if let Some(&ok) = self.prefill.get(&key) {
            return ok;
        }
        let m = PREFILL_PROBE_ROWS;
        let x = probe_input(m, cols);
        let mut y = vec![0f32; m * rows];
        // Interleave the two so machine noise hits both alike.
        let (mut tf, mut td) = (f64::MAX, f64::MAX);
        for _ in 0..3 {
            tf = tf.min(best_time(|| f.matmul(&x, m, &mut y)));
            td = td.min(best_time(|| {
                dense_f32_matmul(w, rows, cols, &x, m, &mut y, false)
            }));
        }
        let ok = tf <= 1.05 * td;
        self.prefill.insert(key, ok);
        ok
    }
}

/// DRAM read bandwidth for the roofline, GB/s (all threads, 512 MiB buffer).
pub fn measure_bandwidth() -> f64 {
    crate::kernels::probe::stream_gbps(rayon::current_num_threads(), 512 << 20, 3)
}

/// The format `auto` picks for one tensor (see the module docs).
pub fn pick(
    name: &str,
    w: &[f32],
    st: &TensorStats,
    vt: ValueType,
    bandwidth_gbps: f64,
    probes: &mut Probes,
) -> Result<FormatChoice> {
    let mut best: Option<(f64, usize, FormatChoice)> = None;
    for c in candidates(vt, st) {
        let bytes = st.bytes(c);
        let mem = bytes as f64 / (bandwidth_gbps.max(0.1) * 1e9);
        let t = mem.max(probes.hot_time(name, w, st, c)?);
        let better = match best {
            None => true,
            Some((bt, bb, _)) => t < bt || (t == bt && bytes < bb),
        };
        if better {
            best = Some((t, bytes, c));
        }
    }
    Ok(best.map_or(FormatChoice::Dense, |b| b.2))
}

/// BSR tile shape that stores the fewest values (ties: the earlier, larger tile).
pub fn bsr_tile(w: &[f32], rows: usize, cols: usize) -> (usize, usize) {
    let mut best = ((8, 8), usize::MAX);
    for (br, bc) in [(8, 8), (4, 16), (4, 4), (1, 16), (2, 2), (1, 4)] {
        let mut tiles = 0;
        for b in 0..rows.div_ceil(br) {
            for c in 0..cols.div_ceil(bc) {
                let nz = (b * br..((b + 1) * br).min(rows)).any(|r| {
                    w[r * cols + c * bc..r * cols + ((c + 1) * bc).min(cols)]
                        .iter()
                        .any(|&v| v != 0.0)
                });
                tiles += nz as usize;
            }
        }
        if tiles * br * bc < best.1 {
            best = ((br, bc), tiles * br * bc);
        }
    }
    best.0
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
            let (br, bc) = bsr_tile(w, rows, cols);
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
