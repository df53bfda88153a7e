//! What the sparse formats (bitmask, CSR, N:M, BSR) share: a view of their stored entries row
//! by row ([`Entries`]), and on top of it the dense decoding, the naive reference, the portable
//! row kernel and the dispatch of a product (tiled GEMM for many rows; the format's SIMD
//! kernel or the portable one over threads for few). Each format only provides its storage
//! walk and its SIMD kernel.

use super::elem::{Elem, Values};
use super::*;

/// A sparse format's stored entries.
pub(crate) trait Entries: WeightFormat {
    type E: Elem;
    /// The stored values (and row scales).
    fn vals(&self) -> &Values<Self::E>;
    /// Calls `f(column, value index)` for every stored value of row `r`.
    fn each(&self, r: usize, f: impl FnMut(usize, usize));
    /// Stored value `j` as f32, before the row scale.
    #[inline(always)]
    fn value(&self, j: usize) -> f32 {
        self.vals().v[j].to_f32()
    }
    /// Scale of row `r` (1 for unscaled value types).
    #[inline(always)]
    fn scale(&self, r: usize) -> f32 {
        self.vals().scale(r)
    }
}

/// [`WeightFormat::decode_rows`] of a sparse format: rows `r0..r1` into the first
/// `(r1 − r0) · cols` values of `out`, through the format's SIMD decoder `fast` when given (it
/// gets exactly that slice), else from the entries.
///
/// A format passes `fast` only when the current [`isa`] runs it.
pub(crate) fn decode_rows<F: Entries>(
    f: &F,
    r0: usize,
    r1: usize,
    out: &mut [f32],
    fast: Option<impl FnOnce(&mut [f32])>,
) {
    let c = f.cols();
    assert!(
        r0 <= r1 && r1 <= f.rows() && out.len() >= (r1 - r0) * c,
        "{}: decode_rows({r0}, {r1}) into {} values of a {}×{c} matrix",
        f.kind(),
        out.len(),
        f.rows()
    );
    let out = &mut out[..(r1 - r0) * c];
    if let Some(kernel) = fast {
        return kernel(out);
    }
    for r in r0..r1 {
        decode_row(f, r, &mut out[(r - r0) * c..(r - r0 + 1) * c]);
    }
}

/// Row `r` decoded from the entries into `row` (`cols` values, scale applied): the scalar
/// decoder, also the fallback of SIMD decoders for rows they cannot take.
#[inline(always)]
pub(crate) fn decode_row<F: Entries>(f: &F, r: usize, row: &mut [f32]) {
    row.fill(0.0);
    let s = f.scale(r);
    f.each(r, |k, j| row[k] = f.value(j) * s);
}

/// `Σ w[r, k]·x[k]` over row `r`'s entries, before the row scale: the scalar row kernel, also
/// the fallback of SIMD kernels for rows they cannot take.
#[inline(always)]
pub(crate) fn row_dot<F: Entries>(f: &F, r: usize, x: &[f32]) -> f32 {
    let mut s = 0f32;
    f.each(r, |k, j| s += f.value(j) * x[k]);
    s
}

/// [`WeightFormat::matmul_naive`] from the entries (f64 accumulation).
pub(crate) fn naive<F: Entries>(f: &F, x: &[f32], m: usize, y: &mut [f32]) {
    check_sizes(f.kind(), f.rows(), f.cols(), x, m, y);
    naive_product(f.rows(), f.cols(), x, m, y, |r, emit| {
        let s = f.scale(r) as f64;
        f.each(r, |k, j| emit(k, f.value(j) as f64 * s));
    });
}

/// Rows `r0..r1` of the product, scalar (the kernel where no SIMD kernel runs; compiled
/// once more for AVX2 + FMA + BMI, see [`portable`]).
#[inline(always)]
fn portable_block<F: Entries>(f: &F, r0: usize, r1: usize, x: &[f32], m: usize, out: Out) {
    let c = f.cols();
    for r in r0..r1 {
        for i in 0..m {
            let s = row_dot(f, r, &x[i * c..(i + 1) * c]);
            // SAFETY: r in this block's range, i < m.
            unsafe { out.put(i, r, s * f.scale(r)) };
        }
    }
}

/// [`portable_block`], through its AVX2 build when the CPU has AVX2.
fn portable<F: Entries>(f: &F, r0: usize, r1: usize, x: &[f32], m: usize, out: Out) {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2,fma,f16c,popcnt,bmi1,bmi2")]
        unsafe fn avx2<F: Entries>(f: &F, r0: usize, r1: usize, x: &[f32], m: usize, out: Out) {
            portable_block(f, r0, r1, x, m, out)
        }
        if crate::isa::avx2_fma_f16c() && crate::isa::bmi2() {
            // SAFETY: the features are checked at run time.
            return unsafe { avx2(f, r0, r1, x, m, out) };
        }
    }
    portable_block(f, r0, r1, x, m, out)
}

/// A format's SIMD row kernel: rows `r0..r1` of the product with `x[m, cols]` into `out`.
#[cfg(target_arch = "x86_64")]
pub(crate) type RowKernel<F> = unsafe fn(&F, usize, usize, &[f32], usize, Out);

/// The `fast` argument of [`product`] on x86: `avx2` or `avx512` as `isa` says, None without one.
///
/// # Safety
/// `isa` is None or the current x86 kernel set ([`x86_simd`], possibly narrowed by the format),
/// and under it that kernel may run on `f`, `x`, `m` and disjoint row ranges: what it relies on
/// was validated when `f` was built.
#[cfg(target_arch = "x86_64")]
pub(crate) unsafe fn x86_kernel<'a, F: Sync>(
    f: &'a F,
    isa: Option<Isa>,
    x: &'a [f32],
    m: usize,
    avx2: RowKernel<F>,
    avx512: RowKernel<F>,
) -> Option<impl Fn(usize, usize, Out) + Sync + 'a> {
    isa.map(move |isa| {
        let kernel = if isa == Isa::Avx2 { avx2 } else { avx512 };
        // SAFETY: the caller's contract.
        move |r0, r1, out| unsafe { kernel(f, r0, r1, x, m, out) }
    })
}

/// [`WeightFormat::matmul_add`] of a sparse format: sizes checked; more than [`SMALL_M`] rows
/// through [`matmul_tiled`]; else row ranges (aligned to `align`) over threads through `fast`
/// when given, through the portable kernel otherwise.
///
/// A format passes `fast` only when the current [`isa`] runs it.
pub(crate) fn product<F: Entries>(
    f: &F,
    x: &[f32],
    m: usize,
    y: &mut [f32],
    acc: bool,
    align: usize,
    fast: Option<impl Fn(usize, usize, Out) + Sync>,
) {
    check_sizes(f.kind(), f.rows(), f.cols(), x, m, y);
    if m > SMALL_M {
        return matmul_tiled(f, x, m, y, acc);
    }
    let bytes = f.nbytes();
    match fast {
        Some(kernel) => drive(f.rows(), m, bytes, align, y, acc, kernel),
        _ => drive(f.rows(), m, bytes, align, y, acc, |r0, r1, out| {
            portable(f, r0, r1, x, m, out)
        }),
    }
}
