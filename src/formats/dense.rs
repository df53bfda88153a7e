//! Dense weights with f32, bf16 or int8 (+ per-row scale) values: [`DenseOf`].
//!
//! Small products (`m ≤` [`SMALL_M`], i.e. decode) run row dot products that stream each weight
//! row once (AVX-512, AVX2 or NEON with 4 accumulators, rows split over threads); larger ones
//! go to GEMM — directly for f32, through decoded f32 row tiles for bf16 / int8
//! ([`super::matmul_tiled`]).
//! [`dense_f32_matmul`] runs the same kernels on a borrowed f32 matrix (an unpacked model's
//! weight), so dense f32 needs no copy.

#[cfg(target_arch = "x86_64")]
use super::elem::first_lanes;
use super::elem::{Elem, Values};
use super::*;
#[cfg(target_arch = "aarch64")]
use std::arch::aarch64::*;
#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// Dense row-major `[rows, cols]` weights stored as `E`.
#[derive(Clone, Debug, PartialEq)]
pub struct DenseOf<E: Elem> {
    rows: usize,
    cols: usize,
    vals: Values<E>,
}

/// Dense f32.
pub type Dense = DenseOf<f32>;
/// Dense bf16 (round-to-nearest-even from f32); products accumulate in f32.
pub type DenseBf16 = DenseOf<half::bf16>;
/// Dense IEEE f16 (round-to-nearest-even from f32; `runtime::pack` refuses weights beyond
/// ±65504, which f16 would turn into infinities); products accumulate in f32.
pub type DenseF16 = DenseOf<half::f16>;
/// Dense int8 with a per-row f32 scale: `W[r, k] = q[r, k] · scale[r]`.
pub type DenseI8 = DenseOf<i8>;

impl<E: Elem> DenseOf<E> {
    /// Encodes `w` (int8: symmetric per-row quantization, scale = max|w| / 127).
    pub fn from_dense(w: &[f32], rows: usize, cols: usize) -> Result<Self> {
        check_dense(Self::KIND, w, rows, cols)?;
        Ok(DenseOf {
            rows,
            cols,
            vals: Values::encode_matrix(w, rows, cols, |_| true),
        })
    }
    const KIND: &'static str = match E::DTYPE {
        Dtype::F32 => "dense-f32",
        Dtype::F16 => "dense-f16",
        Dtype::Bf16 => "dense-bf16",
        _ => "dense-i8",
    };
    /// Dense weights from already encoded row-major values (and, for int8, one scale per row).
    pub(crate) fn from_parts(rows: usize, cols: usize, v: Vec<E>, scales: Vec<f32>) -> Self {
        assert_eq!(v.len(), rows * cols, "dense: value count");
        assert_eq!(
            scales.len(),
            if E::SCALED { rows } else { 0 },
            "dense: scales"
        );
        DenseOf {
            rows,
            cols,
            vals: Values { v, scales },
        }
    }
    /// The raw row-major stored values.
    pub fn data(&self) -> &[E] {
        &self.vals.v
    }
    pub fn from_tensors(name: &str, tensors: &[RawTensor]) -> Result<Self> {
        let (rows, cols) = read_dims(tensors, name, Self::KIND)?;
        let vals = Values::from_tensors(
            tensors,
            name,
            rows,
            rows.checked_mul(cols),
            Self::KIND,
            "the shape",
        )?;
        Ok(DenseOf { rows, cols, vals })
    }
}

impl Dense {
    /// The product through [`crate::kernels::matmul_t`] (the `gemm` crate) for any `m`.
    pub fn matmul_gemm(&self, x: &[f32], m: usize, y: &mut [f32]) {
        check_sizes("dense", self.rows, self.cols, x, m, y);
        crate::kernels::matmul_t(x, &self.vals.v, y, m, self.cols, self.rows, false);
    }
}

/// Scale of row `r`: `scales[r]`, or 1 when there are no scales.
#[inline(always)]
fn row_scale(scales: &[f32], r: usize) -> f32 {
    if scales.is_empty() {
        1.0
    } else {
        scales[r]
    }
}

/// Sum of `w[k]·x[k]` over `n` values, 4 accumulators.
///
/// # Safety
/// AVX-512F/BW/VL and FMA available; `w` and `x` valid for `n` reads.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) unsafe fn dot_avx512<E: Elem>(w: *const E, x: *const f32, n: usize) -> __m512 {
    #[inline(always)]
    unsafe fn fma16<E: Elem>(w: *const E, x: *const f32, acc: __m512) -> __m512 {
        _mm512_fmadd_ps(E::load16(w), _mm512_loadu_ps(x), acc)
    }
    // Four accumulators as separate variables, so they stay in registers.
    let (mut a0, mut a1, mut a2, mut a3) = (
        _mm512_setzero_ps(),
        _mm512_setzero_ps(),
        _mm512_setzero_ps(),
        _mm512_setzero_ps(),
    );
    let mut k = 0;
    let size = std::mem::size_of::<E>();
    while k + 64 <= n {
        // Software prefetch PREFETCH bytes ahead (past the row end into the next rows, which
        // are contiguous): more misses in flight than the hardware prefetcher keeps alone.
        prefetch_ahead(w.add(k), size);
        a0 = fma16(w.add(k), x.add(k), a0);
        a1 = fma16(w.add(k + 16), x.add(k + 16), a1);
        a2 = fma16(w.add(k + 32), x.add(k + 32), a2);
        a3 = fma16(w.add(k + 48), x.add(k + 48), a3);
        k += 64;
    }
    while k < n {
        let mk = first_lanes(n - k);
        a0 = _mm512_fmadd_ps(
            E::load_first(n - k, w.add(k)),
            _mm512_maskz_loadu_ps(mk, x.add(k)),
            a0,
        );
        k += 16;
    }
    _mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3))
}

/// Sum of `w[k]·x[k]` over `n` values, NEON with 4 accumulators.
///
/// # Safety
/// `w` and `x` valid for `n` reads.
#[cfg(target_arch = "aarch64")]
#[inline(always)]
pub(crate) unsafe fn dot_neon<E: Elem>(w: *const E, x: *const f32, n: usize) -> f32 {
    let mut a = [vdupq_n_f32(0.0); 4];
    let mut k = 0;
    while k + 16 <= n {
        for (j, acc) in a.iter_mut().enumerate() {
            let o = k + 4 * j;
            *acc = vfmaq_f32(*acc, E::load4_neon(w.add(o)), vld1q_f32(x.add(o)));
        }
        k += 16;
    }
    while k + 4 <= n {
        a[0] = vfmaq_f32(a[0], E::load4_neon(w.add(k)), vld1q_f32(x.add(k)));
        k += 4;
    }
    let mut s = vaddvq_f32(vaddq_f32(vaddq_f32(a[0], a[1]), vaddq_f32(a[2], a[3])));
    while k < n {
        s += (*w.add(k)).to_f32() * *x.add(k);
        k += 1;
    }
    s
}

/// A small product over a dense `[rows, n]` matrix `w` of `E` with row scales `scales`
/// (empty: none) and input `x` (`m` rows of `n`).
#[derive(Clone, Copy)]
struct Rows<'a, E: Elem> {
    w: &'a [E],
    scales: &'a [f32],
    n: usize,
    x: &'a [f32],
    m: usize,
}

impl<E: Elem> Rows<'_, E> {
    /// Rows `r0..r1` of the product, AVX-512.
    ///
    /// # Safety
    /// AVX-512 available; `w` holds rows `r0..r1`; `out` owns these rows.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512vl,avx512bw,fma,popcnt,bmi1,bmi2")]
    unsafe fn avx512(self, r0: usize, r1: usize, out: Out) {
        let n = self.n;
        for r in r0..r1 {
            let wr = self.w.as_ptr().add(r * n);
            for i in 0..self.m {
                let s = _mm512_reduce_add_ps(dot_avx512(wr, self.x.as_ptr().add(i * n), n));
                out.put(i, r, s * row_scale(self.scales, r));
            }
        }
    }

    /// Rows `r0..r1` of the product, AVX2.
    ///
    /// # Safety
    /// AVX2 + FMA available; `w` holds rows `r0..r1`; `out` owns these rows.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn avx2(self, r0: usize, r1: usize, out: Out) {
        let n = self.n;
        for r in r0..r1 {
            let wr = self.w.as_ptr().add(r * n);
            for i in 0..self.m {
                let s = avx2_dot(wr, self.x.as_ptr().add(i * n), n);
                out.put(i, r, s * row_scale(self.scales, r));
            }
        }
    }

    /// Rows `r0..r1` of the product, NEON.
    ///
    /// # Safety
    /// `w` holds rows `r0..r1`; `out` owns these rows.
    #[cfg(target_arch = "aarch64")]
    unsafe fn neon(self, r0: usize, r1: usize, out: Out) {
        let n = self.n;
        for r in r0..r1 {
            let wr = self.w.as_ptr().add(r * n);
            for i in 0..self.m {
                let s = dot_neon(wr, self.x.as_ptr().add(i * n), n);
                out.put(i, r, s * row_scale(self.scales, r));
            }
        }
    }

    /// Rows `r0..r1`, portable: 16 partial sums, so the loop vectorises (see [`Rows::portable`]).
    #[inline(always)]
    fn portable_body(self, r0: usize, r1: usize, out: Out) {
        let n = self.n;
        for r in r0..r1 {
            let wr = &self.w[r * n..(r + 1) * n];
            for i in 0..self.m {
                let xi = &self.x[i * n..(i + 1) * n];
                let mut acc = [0f32; 16];
                let (wc, xc) = (wr.chunks_exact(16), xi.chunks_exact(16));
                let (wt, xt) = (wc.remainder(), xc.remainder());
                for (a, b) in wc.zip(xc) {
                    for l in 0..16 {
                        acc[l] += a[l].to_f32() * b[l];
                    }
                }
                let mut s: f32 = acc.iter().sum();
                for (a, b) in wt.iter().zip(xt) {
                    s += a.to_f32() * b;
                }
                // SAFETY: r in this block's range, i < m.
                unsafe { out.put(i, r, s * row_scale(self.scales, r)) };
            }
        }
    }

    /// [`Rows::portable_body`], compiled for AVX2 + FMA when the CPU has them.
    fn portable(self, r0: usize, r1: usize, out: Out) {
        #[cfg(target_arch = "x86_64")]
        {
            #[target_feature(enable = "avx2,fma,f16c")]
            unsafe fn avx2<E: Elem>(rows: Rows<'_, E>, r0: usize, r1: usize, out: Out) {
                rows.portable_body(r0, r1, out)
            }
            if crate::isa::avx2_fma_f16c() {
                // SAFETY: AVX2 and FMA checked at run time.
                return unsafe { avx2(self, r0, r1, out) };
            }
        }
        self.portable_body(r0, r1, out)
    }

    /// `y[m, rows] (+)=` the product, rows split over threads when the matrix is large.
    fn run(self, rows: usize, y: &mut [f32], acc: bool) {
        let bytes = rows * self.n * E::DTYPE.size();
        #[cfg(target_arch = "x86_64")]
        if avx512_active() {
            // SAFETY: AVX-512 checked; sizes checked by the callers; rows written disjointly.
            drive(rows, self.m, bytes, 1, y, acc, |r0, r1, out| unsafe {
                self.avx512(r0, r1, out)
            });
            return;
        }
        #[cfg(target_arch = "x86_64")]
        if isa() == Isa::Avx2 {
            // SAFETY: AVX2 + FMA checked; sizes checked by the callers; rows written disjointly.
            drive(rows, self.m, bytes, 1, y, acc, |r0, r1, out| unsafe {
                self.avx2(r0, r1, out)
            });
            return;
        }
        #[cfg(target_arch = "aarch64")]
        if isa() == Isa::Neon {
            // SAFETY: sizes checked by the callers; rows written disjointly.
            drive(rows, self.m, bytes, 1, y, acc, |r0, r1, out| unsafe {
                self.neon(r0, r1, out)
            });
            return;
        }
        drive(rows, self.m, bytes, 1, y, acc, |r0, r1, out| {
            self.portable(r0, r1, out)
        });
    }
}

/// `y[m, rows] (+)= x[m, cols] · Wᵀ` for a borrowed dense f32 matrix `w` (`[rows, cols]`):
/// row dot products for `m ≤` [`SMALL_M`], GEMM ([`crate::kernels::matmul_t`]) above.
pub fn dense_f32_matmul(
    w: &[f32],
    rows: usize,
    cols: usize,
    x: &[f32],
    m: usize,
    y: &mut [f32],
    accumulate: bool,
) {
    assert!(w.len() >= rows * cols, "dense matmul: weight too small");
    check_sizes("dense", rows, cols, x, m, y);
    if m <= SMALL_M && cols > 0 {
        let job = Rows {
            w,
            scales: &[],
            n: cols,
            x,
            m,
        };
        job.run(rows, y, accumulate);
    } else {
        crate::kernels::matmul_t(x, w, y, m, cols, rows, accumulate);
    }
}

/// `y[i] = W[rows[i]] · x` for dense stored values `w` (`[·, n]`, row scales `scales`, empty:
/// none): each row through the same row kernel as the full product, so each value has the
/// bits the full product gives that row.
fn rows_product<E: Elem>(
    w: &[E],
    scales: &[f32],
    n: usize,
    rows: &[u32],
    x: &[f32],
    y: &mut [f32],
) {
    if rows.is_empty() {
        return;
    }
    assert!(
        x.len() >= n && y.len() >= rows.len(),
        "row product: bad sizes"
    );
    for (o, &r) in y.iter_mut().zip(rows) {
        let r = r as usize;
        let job = Rows {
            w: &w[r * n..(r + 1) * n],
            scales: if scales.is_empty() {
                &[]
            } else {
                &scales[r..r + 1]
            },
            n,
            x,
            m: 1,
        };
        job.run(1, std::slice::from_mut(o), false);
    }
}

/// [`WeightFormat::matvec_rows`] for a borrowed dense f32 matrix `w` (`[·, cols]`): the values
/// [`dense_f32_matmul`] gives these rows for one row of `x`.
pub fn dense_f32_rows(w: &[f32], cols: usize, rows: &[u32], x: &[f32], y: &mut [f32]) {
    if cols == 0 {
        return y[..rows.len()].fill(0.0);
    }
    rows_product(w, &[], cols, rows, x, y)
}

/// Rows `r0..` of stored values `w` (`cols` each) as f32, each times its row scale: the tiles
/// the prefill GEMM multiplies ([`super::matmul_tiled`]). Reference for the SIMD versions.
fn widen_naive<E: Elem>(w: &[E], scales: &[f32], r0: usize, cols: usize, out: &mut [f32]) {
    for (i, (row, o)) in w.chunks(cols).zip(out.chunks_mut(cols)).enumerate() {
        let s = row_scale(scales, r0 + i);
        for (d, &v) in o.iter_mut().zip(row) {
            *d = v.to_f32() * s;
        }
    }
}

/// [`widen_naive`] with `step(values, out, scale)` widening `L` values at a time, the rest of
/// each row scalar: the same products, so the same bits. Inlined into each SIMD version.
///
/// # Safety
/// `step` may read `L` values and write `L` outputs; `out.len() == w.len()`, a multiple of
/// `cols`.
#[inline(always)]
unsafe fn widen_by<E: Elem, const L: usize>(
    w: &[E],
    scales: &[f32],
    r0: usize,
    cols: usize,
    out: &mut [f32],
    step: impl Fn(*const E, *mut f32, f32),
) {
    for (i, (row, o)) in w.chunks(cols).zip(out.chunks_mut(cols)).enumerate() {
        let s = row_scale(scales, r0 + i);
        let mut k = 0;
        while k + L <= cols {
            step(row.as_ptr().add(k), o.as_mut_ptr().add(k), s);
            k += L;
        }
        for (d, &v) in o[k..].iter_mut().zip(&row[k..]) {
            *d = v.to_f32() * s;
        }
    }
}

/// [`widen_naive`], 16 values per step.
///
/// # Safety
/// AVX-512 (see [`avx512_active`]) available; `out.len() == w.len()`, a multiple of `cols`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,avx512bw,fma")]
unsafe fn widen_avx512<E: Elem>(w: &[E], scales: &[f32], r0: usize, cols: usize, out: &mut [f32]) {
    widen_by::<E, 16>(w, scales, r0, cols, out, |p, o, s| {
        _mm512_storeu_ps(o, _mm512_mul_ps(E::load16(p), _mm512_set1_ps(s)))
    })
}

/// [`widen_naive`], 8 values per step.
///
/// # Safety
/// AVX2, FMA and F16C available; `out.len() == w.len()`, a multiple of `cols`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn widen_avx2<E: Elem>(w: &[E], scales: &[f32], r0: usize, cols: usize, out: &mut [f32]) {
    widen_by::<E, 8>(w, scales, r0, cols, out, |p, o, s| {
        _mm256_storeu_ps(o, _mm256_mul_ps(E::load8(p), _mm256_set1_ps(s)))
    })
}

/// [`widen_naive`], 4 values per step.
///
/// # Safety
/// `out.len() == w.len()`, a multiple of `cols`.
#[cfg(target_arch = "aarch64")]
unsafe fn widen_neon<E: Elem>(w: &[E], scales: &[f32], r0: usize, cols: usize, out: &mut [f32]) {
    widen_by::<E, 4>(w, scales, r0, cols, out, |p, o, s| {
        vst1q_f32(o, vmulq_n_f32(E::load4_neon(p), s))
    })
}

impl<E: Elem> WeightFormat for DenseOf<E> {
    dims!();
    fn nbytes(&self) -> usize {
        self.vals.nbytes()
    }
    fn stored(&self) -> usize {
        self.vals.v.len()
    }
    fn decode_rows(&self, r0: usize, r1: usize, out: &mut [f32]) {
        let c = self.cols;
        if c == 0 {
            return;
        }
        let (w, scales) = (&self.vals.v[r0 * c..r1 * c], &self.vals.scales);
        let out = &mut out[..(r1 - r0) * c];
        #[cfg(target_arch = "x86_64")]
        match isa() {
            // SAFETY: the ISA checked; `w` and `out` hold the same number of values.
            Isa::Avx512 => return unsafe { widen_avx512(w, scales, r0, c, out) },
            Isa::Avx2 => return unsafe { widen_avx2(w, scales, r0, c, out) },
            _ => {}
        }
        #[cfg(target_arch = "aarch64")]
        if isa() == Isa::Neon {
            // SAFETY: `w` and `out` hold the same number of values.
            return unsafe { widen_neon(w, scales, r0, c, out) };
        }
        widen_naive(w, scales, r0, c, out)
    }
    fn matmul_add(&self, x: &[f32], m: usize, y: &mut [f32], accumulate: bool) {
        check_sizes(Self::KIND, self.rows, self.cols, x, m, y);
        if let Some(w) = E::as_f32(&self.vals.v) {
            return dense_f32_matmul(w, self.rows, self.cols, x, m, y, accumulate);
        }
        if m <= SMALL_M && self.cols > 0 {
            let job = Rows {
                w: &self.vals.v,
                scales: &self.vals.scales,
                n: self.cols,
                x,
                m,
            };
            job.run(self.rows, y, accumulate);
        } else {
            matmul_tiled(self, x, m, y, accumulate);
        }
    }
    fn matvec_rows(&self, rows: &[u32], x: &[f32], y: &mut [f32]) -> bool {
        if self.cols == 0 {
            y[..rows.len()].fill(0.0);
        } else {
            rows_product(&self.vals.v, &self.vals.scales, self.cols, rows, x, y);
        }
        true
    }
    fn matmul_naive(&self, x: &[f32], m: usize, y: &mut [f32]) {
        check_sizes(Self::KIND, self.rows, self.cols, x, m, y);
        let c = self.cols;
        naive_product(self.rows, c, x, m, y, |r, emit| {
            for k in 0..c {
                emit(k, self.vals.get64(r, r * c + k));
            }
        });
    }
    fn to_tensors(&self, name: &str) -> Vec<RawTensor> {
        let mut t = vec![shape_tensor(name, &[self.rows, self.cols])];
        t.extend(self.vals.tensors(name));
        t
    }
}

/// Sum of `w[k]·x[k]` over `n` values: 4 accumulators of 8 lanes, software prefetch ahead of
/// the weight stream (as the AVX-512 kernel), the last `n % 8` values scalar.
///
/// # Safety
/// AVX2 + FMA; `w` and `x` valid for `n` reads.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn avx2_dot<E: Elem>(w: *const E, x: *const f32, n: usize) -> f32 {
    let mut a = [_mm256_setzero_ps(); 4];
    let mut k = 0;
    let size = std::mem::size_of::<E>();
    while k + 32 <= n {
        // 32 values are 64 bytes of bf16, 32 of int8. f32 rows stream without software
        // prefetch: on Zen 3 it was 5–20% slower with it (`format_bench`, dense f32, A/B runs).
        if size < 4 {
            super::prefetch_ahead(w.add(k), 1);
        }
        for (j, acc) in a.iter_mut().enumerate() {
            let o = k + 8 * j;
            *acc = _mm256_fmadd_ps(E::load8(w.add(o)), _mm256_loadu_ps(x.add(o)), *acc);
        }
        k += 32;
    }
    while k + 8 <= n {
        a[0] = _mm256_fmadd_ps(E::load8(w.add(k)), _mm256_loadu_ps(x.add(k)), a[0]);
        k += 8;
    }
    let mut s = super::avx2::hsum(_mm256_add_ps(
        _mm256_add_ps(a[0], a[1]),
        _mm256_add_ps(a[2], a[3]),
    ));
    while k < n {
        s += (*w.add(k)).to_f32() * *x.add(k);
        k += 1;
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The SIMD row widening gives exactly [`widen_naive`]'s bits for every value type, on
    /// widths with and without a SIMD tail.
    fn widen_matches_naive<E: Elem>() {
        for (rows, cols) in [(1, 1), (3, 7), (2, 8), (5, 23), (4, 64), (3, 129)] {
            let w: Vec<f32> = (0..rows * cols)
                .map(|i| ((i * 7919 % 1000) as f32 - 500.0) * 1.37e-3)
                .collect();
            let d = DenseOf::<E>::from_dense(&w, rows, cols).unwrap();
            let (v, s) = (&d.vals.v[cols..], &d.vals.scales);
            let mut want = vec![f32::NAN; v.len()];
            widen_naive(v, s, 1, cols, &mut want);
            let check = |what: &str, f: &dyn Fn(&mut [f32])| {
                let mut got = vec![f32::NAN; v.len()];
                f(&mut got);
                let same = got
                    .iter()
                    .zip(&want)
                    .all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "{} {rows}×{cols} {what}", E::NAME);
            };
            check("decode_rows", &|o| d.decode_rows(1, rows, o));
            #[cfg(target_arch = "x86_64")]
            if crate::isa::avx2_fma_f16c() {
                // SAFETY: AVX2, FMA and F16C checked; equal lengths.
                check("avx2", &|o| unsafe { widen_avx2(v, s, 1, cols, o) });
            }
            #[cfg(target_arch = "x86_64")]
            if crate::isa::avx512_bw() {
                // SAFETY: AVX-512 F/VL/BW and FMA checked; equal lengths.
                check("avx512", &|o| unsafe { widen_avx512(v, s, 1, cols, o) });
            }
            #[cfg(target_arch = "aarch64")]
            // SAFETY: equal lengths.
            check("neon", &|o| unsafe { widen_neon(v, s, 1, cols, o) });
        }
    }

    #[test]
    fn simd_widening_matches_naive() {
        widen_matches_naive::<f32>();
        widen_matches_naive::<half::bf16>();
        widen_matches_naive::<half::f16>();
        widen_matches_naive::<i8>();
    }
}
