//! Column-major (input-major) dense weights whose decode product reads only the columns `j`
//! with `x[j] ≠ 0`: the kernel behind contextual activation sparsity (TEAL, Liu et al. 2024,
//! arXiv:2408.14690; official code github.com/FasterDecoding/TEAL, whose GPU kernel reads the
//! weight column-major for the same reason).
//!
//! A row-major mat-vec reads every weight whatever `x` is: each row's dot product touches all
//! columns. Stored input-major, the product is a sum of columns, `y = Σⱼ x[j]·W[:, j]`, and a
//! zero `x[j]` skips column `j`'s bytes entirely, so a decode step whose inputs are 50% zero
//! reads half the weight.
//!
//! **Layout.** Column `j` is stored contiguously, `v[j·rows_pad + r]`, with `rows_pad` the
//! row count rounded up to [`PAD`] (padding rows are zero). An active column is one sequential
//! run of `rows·size` bytes (3 KB for a 1536-row bf16 column), long enough that skipping the
//! inactive ones costs the hardware prefetchers little; shorter runs (64-row tiles, 128 bytes
//! bf16) measured about 40% below the dense streaming rate at 50% sparsity on Zen 3.
//!
//! **Kernel.** The active columns (`x[j] ≠ 0`, listed once per product) are split into
//! [`PARTS`] contiguous ranges when the bytes to read exceed [`super::PAR_BYTES`] (one range
//! otherwise); each range accumulates its own partial `y` in f32, four columns per pass over
//! the rows (one load and store of the partial sums per four FMAs), prefetching the column
//! [`PF_AHEAD`] active columns ahead; the partial sums are added in range order, so the bits do
//! not depend on the thread count. int8 stores one f32 scale per row (`W[r, j] = q·scale[r]`),
//! applied once per output row at the end. Products with more than [`super::SMALL_M`] rows of
//! `x` (prefill) decode row tiles and use GEMM, like every format; the runtime normally keeps
//! the row-major weight for those (see `docs/activation_sparsity.md`).
//!
//! Kernels: AVX2 + FMA (+F16C for f16) on x86-64 (also used on AVX-512 machines: no AVX-512
//! variant is written, as none could be tested here), and a portable scalar loop compiled for
//! AVX2 where present. [`WeightFormat::matmul_naive`] is the f64 reference over every column.
//! This format is built by the runtime from the model's weights; it is not one of the packed
//! formats written to disk (`registry::FORMATS`), though it has `to_tensors` / `from_tensors`.

use super::elem::Elem;
use super::{
    check_dense, check_sizes, ferr, find, isa, matmul_tiled, naive_product, read_dims, read_f32,
    shape_tensor, Dtype, Isa, RawTensor, WeightFormat, PAR_BYTES, SMALL_M,
};
use crate::Result;
use rayon::prelude::*;
#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// Rows are padded to a multiple of this.
pub const PAD: usize = 8;

/// Ranges the active columns are split into for threads (fixed, so results do not depend on
/// the thread count).
pub const PARTS: usize = 4;

/// How many active columns ahead the AVX2 kernel prefetches.
const PF_AHEAD: usize = 8;

/// Column-major dense weights with value type `E`.
#[derive(Clone, Debug, PartialEq)]
pub struct ColMajorOf<E: Elem> {
    rows: usize,
    cols: usize,
    /// `[cols][rows_pad]` values (padding rows zero).
    v: Vec<E>,
    /// One per row when `E::SCALED`, else empty.
    scales: Vec<f32>,
}

pub type ColMajor = ColMajorOf<f32>;
pub type ColMajorBf16 = ColMajorOf<half::bf16>;
pub type ColMajorF16 = ColMajorOf<half::f16>;
pub type ColMajorI8 = ColMajorOf<i8>;

impl<E: Elem> ColMajorOf<E> {
    const KIND: &'static str = match E::DTYPE {
        Dtype::F32 => "colmajor-f32",
        Dtype::F16 => "colmajor-f16",
        Dtype::Bf16 => "colmajor-bf16",
        _ => "colmajor-i8",
    };

    /// Encodes a row-major `[rows, cols]` matrix (int8: symmetric per-row scale, as
    /// [`super::DenseI8`]; bf16 / f16 round to nearest even).
    pub fn from_dense(w: &[f32], rows: usize, cols: usize) -> Result<Self> {
        check_dense(Self::KIND, w, rows, cols)?;
        let rp = rows.next_multiple_of(PAD);
        let zero = E::encode(&[0.0]).0[0];
        let mut v = alloc_huge(rp * cols, zero);
        let mut scales = Vec::new();
        for r in 0..rows {
            let (q, s) = E::encode(&w[r * cols..(r + 1) * cols]);
            if E::SCALED {
                scales.push(s);
            }
            for (j, q) in q.into_iter().enumerate() {
                v[j * rp + r] = q;
            }
        }
        Ok(ColMajorOf {
            rows,
            cols,
            v,
            scales,
        })
    }

    pub fn from_tensors(name: &str, tensors: &[RawTensor]) -> Result<Self> {
        let kind = Self::KIND;
        let (rows, cols) = read_dims(tensors, name, kind)?;
        let rp = rows.next_multiple_of(PAD);
        let vt = find(tensors, name, "values", E::DTYPE, kind)?;
        let want = rp.checked_mul(cols);
        if want != Some(vt.data.len() / E::DTYPE.size()) {
            return Err(ferr(
                vt.name.clone(),
                kind,
                format!(
                    "has {} values, expected {} ({cols} columns of {rp} rows)",
                    vt.data.len() / E::DTYPE.size(),
                    want.map_or("an overflowing count".into(), |n| n.to_string()),
                ),
            ));
        }
        let scales = if E::SCALED {
            let st = find(tensors, name, "scales", Dtype::F32, kind)?;
            let s = read_f32(st);
            if s.len() != rows {
                return Err(ferr(
                    st.name.clone(),
                    kind,
                    format!("has {} scales, expected {rows}", s.len()),
                ));
            }
            if let Some(r) = s.iter().position(|v| !v.is_finite()) {
                return Err(ferr(
                    st.name.clone(),
                    kind,
                    format!("row {r} has a non-finite scale"),
                ));
            }
            s
        } else {
            Vec::new()
        };
        Ok(ColMajorOf {
            rows,
            cols,
            v: E::read(vt),
            scales,
        })
    }

    /// Stored value of `W[r, j]` as f32, scale applied.
    #[inline(always)]
    fn get(&self, r: usize, j: usize) -> f32 {
        let q = self.v[j * self.rows.next_multiple_of(PAD) + r].to_f32();
        if E::SCALED {
            q * self.scales[r]
        } else {
            q
        }
    }

    /// Bytes one product reads when `active` of the columns are nonzero in `x`.
    pub fn bytes_for_active(&self, active: usize) -> usize {
        self.rows.next_multiple_of(PAD) * active * E::DTYPE.size()
            + self.rows * self.scales_per_row()
    }

    fn scales_per_row(&self) -> usize {
        if E::SCALED {
            4
        } else {
            0
        }
    }

    /// `y (+)= W · x` for one row of `x`, reading only the columns with `x[j] ≠ 0`.
    pub fn matvec_skip(&self, x: &[f32], y: &mut [f32], acc: bool) {
        check_sizes(Self::KIND, self.rows, self.cols, x, 1, y);
        let rp = self.rows.next_multiple_of(PAD);
        skip_product(
            (self.rows, self.cols, rp),
            x,
            y,
            acc,
            &self.scales,
            |idx| self.bytes_for_active(idx.len()),
            |idx, xs, part| columns(&self.v, rp, idx, xs, part),
        );
    }
}

/// The column-skipping product shared by the column-major formats: `y (+)= W · x` for one row
/// of `x` (`dims` = rows, cols, padded rows). The active columns (`x[j] ≠ 0`) are listed once
/// and split into [`PARTS`] ranges when `bytes(active)` reaches [`PAR_BYTES`]; `columns(idx, xs,
/// part)` sums a range into its own partial `y` (padded rows long), the partial sums are added
/// in range order (so the bits do not depend on the thread count) and multiplied by the per-row
/// `scales` when there are any.
pub(super) fn skip_product(
    dims: (usize, usize, usize),
    x: &[f32],
    y: &mut [f32],
    acc: bool,
    scales: &[f32],
    bytes: impl Fn(&[u32]) -> usize,
    columns: impl Fn(&[u32], &[f32], &mut [f32]) + Sync,
) {
    let (rows, cols, rp) = dims;
    let mut idx = Vec::with_capacity(cols);
    let mut xs = Vec::with_capacity(cols);
    for (j, &xj) in x[..cols].iter().enumerate() {
        if xj != 0.0 {
            idx.push(j as u32);
            xs.push(xj);
        }
    }
    let n = idx.len();
    let parts = if bytes(&idx) >= PAR_BYTES && n >= 4 * PARTS {
        PARTS
    } else {
        1
    };
    let per = n.div_ceil(parts).max(1);
    let run = |p: usize| {
        let (a, b) = ((p * per).min(n), ((p + 1) * per).min(n));
        let mut part = vec![0f32; rp];
        columns(&idx[a..b], &xs[a..b], &mut part);
        part
    };
    let sums: Vec<Vec<f32>> = if parts == 1 {
        vec![run(0)]
    } else {
        (0..parts).into_par_iter().map(run).collect()
    };
    for (r, y) in y[..rows].iter_mut().enumerate() {
        let mut s = 0f32;
        for p in &sums {
            s += p[r];
        }
        if !scales.is_empty() {
            s *= scales[r];
        }
        *y = if acc { *y + s } else { s };
    }
}

/// `y[m, rows] (+)= x[m, cols] · Wᵀ` one row of `x` at a time through `matvec_skip(x_i, y_i,
/// acc)`: the decode path of the column-major formats (up to [`SMALL_M`] rows).
pub(super) fn rows_skip(
    dims: (usize, usize),
    x: &[f32],
    m: usize,
    y: &mut [f32],
    acc: bool,
    matvec_skip: impl Fn(&[f32], &mut [f32], bool),
) {
    let (r, c) = dims;
    for i in 0..m {
        matvec_skip(&x[i * c..(i + 1) * c], &mut y[i * r..(i + 1) * r], acc);
    }
}

/// `n` copies of `zero` in memory advised for transparent huge pages (Linux): a decode step
/// jumps from column to column, and with 4 KiB pages each active column of a few KiB costs a
/// TLB walk of its own (a measured 5–15% of the skipping kernel's time).
fn alloc_huge<E: Copy>(n: usize, zero: E) -> Vec<E> {
    let mut v: Vec<E> = Vec::with_capacity(n);
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let p = v.as_mut_ptr() as usize;
        let (a, b) = (
            p.next_multiple_of(HUGE),
            (p + n * std::mem::size_of::<E>()) / HUGE * HUGE,
        );
        if b > a {
            // SAFETY: a hint on pages of this (untouched) allocation; failure changes nothing.
            unsafe { libc::madvise(a as *mut libc::c_void, b - a, libc::MADV_HUGEPAGE) };
        }
    }
    v.resize(n, zero);
    v
}

/// `acc[0..rp] += Σ_k xs[k] · v[idx[k]·rp ..][..rp]`: the AVX2 kernel where the kernel set
/// allows, else the portable loop.
fn columns<E: Elem>(v: &[E], rp: usize, idx: &[u32], xs: &[f32], acc: &mut [f32]) {
    debug_assert!(acc.len() == rp && rp.is_multiple_of(PAD));
    #[cfg(target_arch = "x86_64")]
    if matches!(isa(), Isa::Avx2 | Isa::Avx512) && crate::isa::avx2_fma_f16c() {
        // SAFETY: AVX2 + FMA + F16C checked; every index < cols, so each column lies in `v`;
        // `acc` holds `rp` values, a multiple of 8.
        return unsafe { columns_avx2(v, rp, idx, xs, acc) };
    }
    columns_portable(v, rp, idx, xs, acc)
}

#[inline(always)]
fn columns_portable_body<E: Elem>(v: &[E], rp: usize, idx: &[u32], xs: &[f32], acc: &mut [f32]) {
    for (&j, &xj) in idx.iter().zip(xs) {
        let c = &v[j as usize * rp..(j as usize + 1) * rp];
        for (a, w) in acc.iter_mut().zip(c) {
            *a += w.to_f32() * xj;
        }
    }
}

/// [`columns_portable_body`], compiled for AVX2 + FMA when the CPU has them.
fn columns_portable<E: Elem>(v: &[E], rp: usize, idx: &[u32], xs: &[f32], acc: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn avx2<E: Elem>(v: &[E], rp: usize, idx: &[u32], xs: &[f32], acc: &mut [f32]) {
            columns_portable_body(v, rp, idx, xs, acc)
        }
        if crate::isa::avx2_fma_f16c() {
            // SAFETY: AVX2, FMA and F16C checked at run time.
            return unsafe { avx2(v, rp, idx, xs, acc) };
        }
    }
    columns_portable_body(v, rp, idx, xs, acc)
}

/// AVX2: four active columns per pass over the rows (8 rows per step: one load and store of
/// the partial sums, four widening loads and FMAs), prefetching the same rows of the column
/// [`PF_AHEAD`] active columns ahead once per cache line.
///
/// # Safety
/// AVX2 + FMA + F16C available; every `idx[k]·rp + rp ≤ v.len()`; `acc.len() == rp`, a
/// multiple of 8.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn columns_avx2<E: Elem>(v: &[E], rp: usize, idx: &[u32], xs: &[f32], acc: &mut [f32]) {
    let n = idx.len();
    let w = v.as_ptr();
    let a = acc.as_mut_ptr();
    let size = E::DTYPE.size();
    let step = 64 / size; // values per cache line
    let col = |k: usize| w.add(*idx.get_unchecked(k) as usize * rp);
    let ahead = |k: usize| col((k + PF_AHEAD).min(n - 1)) as *const i8;
    let mut k = 0;
    while k + 4 <= n {
        let p = [col(k), col(k + 1), col(k + 2), col(k + 3)];
        let q = [ahead(k), ahead(k + 1), ahead(k + 2), ahead(k + 3)];
        let xb: [__m256; 4] = std::array::from_fn(|c| _mm256_set1_ps(*xs.get_unchecked(k + c)));
        let mut i = 0;
        while i < rp {
            if i % step == 0 {
                for qc in q {
                    _mm_prefetch::<_MM_HINT_T0>(qc.wrapping_add(i * size));
                }
            }
            let mut s = _mm256_loadu_ps(a.add(i));
            for c in 0..4 {
                s = _mm256_fmadd_ps(E::load8(p[c].add(i)), xb[c], s);
            }
            _mm256_storeu_ps(a.add(i), s);
            i += 8;
        }
        k += 4;
    }
    while k < n {
        let p = col(k);
        let xb = _mm256_set1_ps(*xs.get_unchecked(k));
        let mut i = 0;
        while i < rp {
            let s = _mm256_loadu_ps(a.add(i));
            _mm256_storeu_ps(a.add(i), _mm256_fmadd_ps(E::load8(p.add(i)), xb, s));
            i += 8;
        }
        k += 1;
    }
}

impl<E: Elem> WeightFormat for ColMajorOf<E> {
    dims!();
    /// Bytes a dense input reads (every column); see [`ColMajorOf::bytes_for_active`].
    fn nbytes(&self) -> usize {
        self.bytes_for_active(self.cols)
    }
    fn stored(&self) -> usize {
        self.v.len()
    }
    fn decode_rows(&self, r0: usize, r1: usize, out: &mut [f32]) {
        let c = self.cols;
        for r in r0..r1 {
            for j in 0..c {
                out[(r - r0) * c + j] = self.get(r, j);
            }
        }
    }
    fn matmul_add(&self, x: &[f32], m: usize, y: &mut [f32], accumulate: bool) {
        check_sizes(Self::KIND, self.rows, self.cols, x, m, y);
        if m <= SMALL_M {
            let dims = (self.rows, self.cols);
            rows_skip(dims, x, m, y, accumulate, |x, y, a| {
                self.matvec_skip(x, y, a)
            });
        } else {
            matmul_tiled(self, x, m, y, accumulate);
        }
    }
    fn matmul_naive(&self, x: &[f32], m: usize, y: &mut [f32]) {
        check_sizes(Self::KIND, self.rows, self.cols, x, m, y);
        naive_product(self.rows, self.cols, x, m, y, |r, emit| {
            for j in 0..self.cols {
                emit(j, self.get(r, j) as f64);
            }
        });
    }
    fn to_tensors(&self, name: &str) -> Vec<RawTensor> {
        let mut t = vec![
            shape_tensor(name, &[self.rows, self.cols]),
            RawTensor {
                name: format!("{name}.values"),
                dtype: E::DTYPE,
                shape: vec![self.v.len()],
                data: E::bytes(&self.v),
            },
        ];
        if E::SCALED {
            t.push(RawTensor::f32(format!("{name}.scales"), &self.scales));
        }
        t
    }
}
