//! The exact argmax of `W · x` for a tall matrix read mostly as int8: greedy decoding's LM head.
//!
//! Greedy decoding needs only the index of the largest logit, yet a full LM-head product reads
//! the whole `[vocab, hidden]` matrix every step (113 MB of the default model's 538 MB per token
//! in f32). [`ArgmaxScreen`] keeps an int8 copy `s_r·q_r` of each row `v_r` of the matrix and a
//! per-row coefficient `c_r` such that for every `x`
//!
//! `|exact_r(x) − approx_r(x)| ≤ c_r·‖x‖₁`,
//!
//! where `exact_r` is the f32 value the matrix's own kernel computes for row `r` and `approx_r`
//! the f32 value the int8 kernel computes. With `b_r = c_r·‖x‖₁` and `L = max_r(approx_r − b_r)`,
//! the row holding the largest exact value has `approx_r + b_r ≥ exact_r ≥ L`; so only the rows
//! with `approx_r + b_r ≥ L` (the candidates) are computed exactly, by the matrix's own row kernel
//! ([`WeightFormat::matvec_rows`]: the same bits as its full product), and the argmax among them
//! (ties to the lowest index) is the argmax of the full product. A step reads the int8 copy plus
//! the candidate rows: about a quarter of an f32 head.
//!
//! The bound: `T_r = Σ v_j x_j` (real arithmetic), `A_r = s_r Σ q_j x_j`.
//! - `|T_r − A_r| ≤ E_r ‖x‖₁` with `E_r = max_j |v_j − s_r q_j|` (computed exactly in f64);
//! - an f32 dot product of `n` terms (any summation order, FMA or not, times a row scale) is
//!   within `γ_{n+2}·Σ|terms|` of its real value (Higham, *Accuracy and Stability of Numerical
//!   Algorithms*, 2nd ed., §3.1), `γ_k = k·u/(1 − k·u)`, `u = 2⁻²⁴`; `Σ|v_j x_j| ≤ M_r ‖x‖₁`
//!   with `M_r = max_j |v_j|`, and `Σ|s_r q_j x_j| ≤ s_r Q_r ‖x‖₁` with `Q_r = max_j |q_j|`.
//!
//! The same test serves top-`k` sampling ([`ArgmaxScreen::top_k`]): with `L` the `k`-th largest
//! `approx_r − b_r`, at least `k` rows have an exact value `≥ L`, so every row of the `k` largest
//! has `approx_r + b_r ≥ L`; the rest are strictly smaller and cannot enter the top `k`.
//!
//! So `c_r = E_r + γ·(M_r + s_r Q_r)`, with `γ = 2(n+2)u ≥ γ_{n+2}` for margin, stored rounded
//! up; `‖x‖₁` is summed in f64 and enlarged by 10⁻⁹ relative. Non-finite inputs or results fall
//! back to the full product (the caller's job: [`ArgmaxScreen::argmax`] returns `None`).

use super::{quantize_row, DenseI8, WeightFormat};
use crate::{Error, Result};
use std::sync::atomic::{AtomicU64, Ordering};

/// The matrix a screen stands in front of: its rows and its exact row products.
#[derive(Clone, Copy)]
pub enum Exact<'a> {
    /// A borrowed dense row-major f32 `[rows, cols]` matrix (products by
    /// [`super::dense_f32_matmul`]).
    F32 {
        w: &'a [f32],
        rows: usize,
        cols: usize,
    },
    /// A packed format.
    Format(&'a dyn WeightFormat),
}

impl Exact<'_> {
    pub fn rows(&self) -> usize {
        match self {
            Exact::F32 { rows, .. } => *rows,
            Exact::Format(f) => f.rows(),
        }
    }
    pub fn cols(&self) -> usize {
        match self {
            Exact::F32 { cols, .. } => *cols,
            Exact::Format(f) => f.cols(),
        }
    }
    /// Bytes of one row's storage (the read per candidate row).
    pub fn row_bytes(&self) -> f64 {
        match self {
            Exact::F32 { cols, .. } => (cols * 4) as f64,
            Exact::Format(f) => f.nbytes() as f64 / f.rows().max(1) as f64,
        }
    }
    fn decode_rows(&self, r0: usize, r1: usize, out: &mut [f32]) {
        match self {
            Exact::F32 { w, cols, .. } => out.copy_from_slice(&w[r0 * cols..r1 * cols]),
            Exact::Format(f) => f.decode_rows(r0, r1, out),
        }
    }
    /// The full product `y = W · x`.
    pub fn matvec(&self, x: &[f32], y: &mut [f32]) {
        match self {
            Exact::F32 { w, rows, cols } => {
                super::dense_f32_matmul(w, *rows, *cols, x, 1, y, false)
            }
            Exact::Format(f) => f.matvec(x, y),
        }
    }
    fn matvec_rows(&self, rows: &[u32], x: &[f32], y: &mut [f32]) -> bool {
        match self {
            Exact::F32 { w, cols, .. } => {
                super::dense_f32_rows(w, *cols, rows, x, y);
                true
            }
            Exact::Format(f) => f.matvec_rows(rows, x, y),
        }
    }
    /// Whether single rows can be computed exactly (what a screen needs).
    pub fn supports_rows(&self) -> bool {
        match self {
            Exact::F32 { .. } => true,
            Exact::Format(f) => f.matvec_rows(&[], &[0.0; 0], &mut []),
        }
    }
}

/// An int8 screen for the exact argmax of one matrix; see the module docs.
pub struct ArgmaxScreen {
    approx: DenseI8,
    /// Per row: `c_r` of the module docs, rounded up.
    coef: Vec<f32>,
    /// Products answered by the screen, and the candidate rows they computed exactly.
    calls: AtomicU64,
    candidates: AtomicU64,
}

impl std::fmt::Debug for ArgmaxScreen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ArgmaxScreen[{}×{}, {} bytes]",
            self.approx.rows(),
            self.approx.cols(),
            self.nbytes()
        )
    }
}

/// Rows decoded at a time while building.
const BUILD_ROWS: usize = 1024;

impl ArgmaxScreen {
    /// The screen for `exact` (`name` for errors). Refuses a matrix with non-finite values or one
    /// whose format cannot compute single rows.
    pub fn build(exact: Exact, name: &str) -> Result<ArgmaxScreen> {
        let (rows, cols) = (exact.rows(), exact.cols());
        if !exact.supports_rows() {
            return Err(Error::Invalid(format!(
                "{name}: an argmax screen needs a format that computes single rows (dense)"
            )));
        }
        let gamma = 2.0 * (cols as f64 + 2.0) * f64::powi(2.0, -24);
        let (mut q, mut scales, mut coef) = (
            Vec::with_capacity(rows * cols),
            Vec::with_capacity(rows),
            Vec::with_capacity(rows),
        );
        let mut buf = vec![0f32; BUILD_ROWS * cols];
        for r0 in (0..rows).step_by(BUILD_ROWS) {
            let r1 = (r0 + BUILD_ROWS).min(rows);
            let block = &mut buf[..(r1 - r0) * cols];
            exact.decode_rows(r0, r1, block);
            for (i, v) in block.chunks(cols.max(1)).take(r1 - r0).enumerate() {
                if let Some(j) = v.iter().position(|a| !a.is_finite()) {
                    return Err(Error::Numeric(format!(
                        "{name}: row {} has a non-finite value at column {j}",
                        r0 + i
                    )));
                }
                let (qr, s) = quantize_row(v);
                let (mut e, mut m, mut qmax) = (0f64, 0f64, 0f64);
                for (&a, &b) in v.iter().zip(&qr) {
                    e = e.max((a as f64 - s as f64 * b as f64).abs());
                    m = m.max((a as f64).abs());
                    qmax = qmax.max((b as f64).abs());
                }
                let c = e + gamma * (m + s as f64 * qmax);
                let cf = c as f32;
                coef.push(if (cf as f64) < c { cf.next_up() } else { cf });
                q.extend(qr);
                scales.push(s);
            }
        }
        Ok(ArgmaxScreen {
            approx: DenseI8::from_parts(rows, cols, q, scales),
            coef,
            calls: AtomicU64::new(0),
            candidates: AtomicU64::new(0),
        })
    }

    /// Bytes one product reads from the screen (int8 values, scales, coefficients), without the
    /// candidate rows.
    pub fn nbytes(&self) -> usize {
        self.approx.nbytes() + self.coef.len() * 4
    }

    /// The int8 approximation of every value, `y ≈ exact · x` (within `c_r·‖x‖₁` per row):
    /// a cheap whole-vocabulary estimate (early exit's confidence, `runtime::early_exit`).
    pub fn approx_matvec(&self, x: &[f32], y: &mut [f32]) {
        self.approx.matvec(x, y);
    }

    /// `(products answered, candidate rows computed exactly)` so far.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.calls.load(Ordering::Relaxed),
            self.candidates.load(Ordering::Relaxed),
        )
    }

    /// Index of the largest value of `exact · x` (ties to the lowest index), the value
    /// [`argmax_naive`] gives; `None` when `x` or a value involved is not finite (then compute the
    /// full product). `exact` must be the matrix the screen was built from.
    pub fn argmax(&self, exact: Exact, x: &[f32]) -> Option<u32> {
        let mut y = vec![0f32; self.approx.rows()];
        if !self.top_k(exact, x, 1, &mut y) {
            return None;
        }
        Some(first_max(&y))
    }

    /// `y = exact · x` on every row that can be among the `k` largest values (`k ≥ 1`), `−∞` on
    /// the rest: every row outside the candidates is strictly below the `k`-th largest value, so
    /// the `k` largest entries of `y` (and their order, ties included) are those of the full
    /// product. Candidates: `approx_r + b_r ≥` the `k`-th largest `approx_s − b_s` (at least `k`
    /// rows have an exact value that large). `false` (and `y` unspecified) when `x` or a value
    /// involved is not finite. `exact` must be the matrix the screen was built from.
    pub fn top_k(&self, exact: Exact, x: &[f32], k: usize, y: &mut [f32]) -> bool {
        let (rows, cols) = (self.approx.rows(), self.approx.cols());
        assert!(
            exact.rows() == rows && exact.cols() == cols && x.len() == cols && y.len() == rows,
            "argmax screen: shapes differ"
        );
        assert!(k >= 1, "argmax screen: k must be at least 1");
        let l1 = x.iter().map(|v| v.abs() as f64).sum::<f64>() * (1.0 + 1e-9);
        if !l1.is_finite() || rows == 0 {
            return false;
        }
        self.approx.matvec(x, y);
        if y.iter().any(|v| !v.is_finite()) {
            return false;
        }
        let bound = |r: usize| self.coef[r] as f64 * l1;
        let floor = if k == 1 {
            (0..rows)
                .map(|r| y[r] as f64 - bound(r))
                .fold(f64::NEG_INFINITY, f64::max)
        } else if k >= rows {
            f64::NEG_INFINITY
        } else {
            let mut lo: Vec<f64> = (0..rows).map(|r| y[r] as f64 - bound(r)).collect();
            *lo.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a)).1
        };
        let cands: Vec<u32> = (0..rows as u32)
            .filter(|&r| y[r as usize] as f64 + bound(r as usize) >= floor)
            .collect();
        let mut vals = vec![0f32; cands.len()];
        if !exact.matvec_rows(&cands, x, &mut vals) || vals.iter().any(|v| !v.is_finite()) {
            return false;
        }
        y.fill(f32::NEG_INFINITY);
        for (&r, &v) in cands.iter().zip(&vals) {
            y[r as usize] = v;
        }
        self.calls.fetch_add(1, Ordering::Relaxed);
        self.candidates
            .fetch_add(cands.len() as u64, Ordering::Relaxed);
        true
    }
}

/// Reference for [`ArgmaxScreen::argmax`]: the full product, then [`first_max`].
pub fn argmax_naive(exact: Exact, x: &[f32]) -> u32 {
    let mut y = vec![0f32; exact.rows()];
    exact.matvec(x, &mut y);
    first_max(&y)
}

/// Index of the largest value (lowest index on ties; a NaN is never chosen over a number): the
/// greedy token rule, shared with [`crate::runtime::sample::argmax`].
pub fn first_max(y: &[f32]) -> u32 {
    let mut best = 0usize;
    for (i, &v) in y.iter().enumerate() {
        if v > y[best] || y[best].is_nan() && !v.is_nan() {
            best = i;
        }
    }
    best as u32
}
