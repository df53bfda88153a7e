//! Numeric kernels. They work on plain `f32` slices and know nothing about models.
//!
//! Every kernel with a fast path (GEMM via the `gemm` crate, SIMD-vectorised loops, threads) has
//! a `*_naive` reference next to it; `tests/kernels.rs` checks one against the other.
//!
//! SIMD: element-wise loops are written once as `#[inline(always)]` scalar code and compiled a
//! second time inside a `#[target_feature(enable = "avx512f,...")]` wrapper, picked at run time
//! ([`crate::isa::avx512_fvl`]); LLVM vectorises the loop body in that copy. The code stays portable.
//! Where LLVM vectorised badly (the decode-attention kernels [`dot_rows`], [`weighted_rows`]),
//! an AVX2 path with intrinsics follows the portable code's lane order and gives its bits.

pub mod attention;
pub mod ops;
pub mod probe;

pub use attention::{
    causal_attention, causal_attention_naive, causal_attention_windowed,
    causal_attention_windowed_naive,
};
pub use ops::*;

/// Number of threads the kernels may use (rayon's pool size).
pub fn threads() -> usize {
    rayon::current_num_threads()
}

/// The CPU feature predicates under their old names (the registry is [`crate::isa`]):
/// `has_avx512` is [`crate::isa::avx512_fvl`], `has_avx2` is [`crate::isa::avx2_fma_f16c`].
pub use crate::isa::{avx2_fma_f16c as has_avx2, avx512_fvl as has_avx512};

/// `out[m, n] = x[m, k] · w[n, k]ᵀ` (+ `out` when `accumulate`), row-major, via the `gemm` crate.
///
/// This is a linear layer's product: `w` is the PyTorch `[out_features, in_features]` weight.
/// Uses all rayon threads when the problem is large enough.
pub fn matmul_t(
    x: &[f32],
    w: &[f32],
    out: &mut [f32],
    m: usize,
    k: usize,
    n: usize,
    accumulate: bool,
) {
    assert!(
        x.len() >= m * k && w.len() >= n * k && out.len() >= m * n,
        "matmul_t: bad sizes"
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            out[..m * n].fill(0.0);
        }
        return;
    }
    let flops = 2 * m * n * k;
    let par = if flops >= 1 << 22 && threads() > 1 {
        gemm::Parallelism::Rayon(threads())
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: sizes checked above; strides describe row-major x, transposed w, row-major out.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            x.as_ptr(),
            1,
            k as isize,
            w.as_ptr(),
            k as isize,
            1,
            1.0f32,
            1.0f32,
            false,
            false,
            false,
            par,
        )
    }
}

/// Reference for [`matmul_t`]: triple loop with f64 accumulation.
pub fn matmul_t_naive(
    x: &[f32],
    w: &[f32],
    out: &mut [f32],
    m: usize,
    k: usize,
    n: usize,
    accumulate: bool,
) {
    for i in 0..m {
        for j in 0..n {
            let mut s = 0f64;
            for p in 0..k {
                s += x[i * k + p] as f64 * w[j * k + p] as f64;
            }
            let prev = if accumulate { out[i * n + j] } else { 0.0 };
            out[i * n + j] = prev + s as f32;
        }
    }
}

/// A general strided GEMM (multi-threaded when `parallel`): `dst = (accumulate ? dst : 0) + alpha · lhs · rhs`.
///
/// Matrices are given as (pointer, row stride, column stride) in elements.
/// # Safety
/// All pointers must be valid for the strided extents `m×k`, `k×n`, `m×n`, and `dst` must not
/// alias `lhs` or `rhs`.
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm_strided(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: isize,
    dst_cs: isize,
    accumulate: bool,
    lhs: *const f32,
    lhs_rs: isize,
    lhs_cs: isize,
    rhs: *const f32,
    rhs_rs: isize,
    rhs_cs: isize,
    alpha: f32,
    parallel: bool,
) {
    let par = if parallel && threads() > 1 {
        gemm::Parallelism::Rayon(threads())
    } else {
        gemm::Parallelism::None
    };
    gemm::gemm(
        m, n, k, dst, dst_cs, dst_rs, accumulate, lhs, lhs_cs, lhs_rs, rhs, rhs_cs, rhs_rs, 1.0f32,
        alpha, false, false, false, par,
    )
}

/// A raw pointer that may cross threads; users guarantee disjoint writes.
#[derive(Clone, Copy)]
pub(crate) struct SendPtr(pub *mut f32);
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

/// Gram matrix `out[cols, cols] = xᵀ·x` of row-major `x[rows, cols]`.
///
/// Symmetric, so only blocks on and above the diagonal are computed (one GEMM per row block,
/// in parallel), then mirrored: about 55% of the full product's work.
pub fn gram(x: &[f32], rows: usize, cols: usize, out: &mut [f32]) {
    gram_upper(x, rows, cols, out);
    for i in 0..cols {
        for j in 0..i {
            out[i * cols + j] = out[j * cols + i];
        }
    }
}

/// The upper triangle (`j >= i`, plus some entries below it inside diagonal blocks) of
/// `xᵀ·x`; entries strictly below the diagonal blocks are left untouched. See [`gram`].
///
/// GEMMs on blocks of the result on and above the diagonal. The `gemm` crate splits the inner
/// dimension by `k` alone, so every blocking gives the same bits, and the blocking is what
/// measured fastest (4096 rows): on one thread, one GEMM per block of `T` rows from the
/// diagonal to the last column (576 wide: T = 128, 13.0 ms; 1536: T = 192, 87 ms; against 14.4
/// and 102 ms with 192×192 tiles); with more threads, 192×192 tiles, which balance better.
pub fn gram_upper(x: &[f32], rows: usize, cols: usize, out: &mut [f32]) {
    use rayon::prelude::*;
    assert!(
        x.len() >= rows * cols && out.len() >= cols * cols,
        "gram: bad sizes"
    );
    if cols == 0 {
        return;
    }
    if rows == 0 {
        out[..cols * cols].fill(0.0);
        return;
    }
    // (first row, rows, first column, columns) of each block.
    let blocks: Vec<(usize, usize, usize, usize)> = if threads() == 1 {
        let t = if cols <= 768 { 128 } else { 192 };
        (0..cols)
            .step_by(t)
            .map(|i0| (i0, t.min(cols - i0), i0, cols - i0))
            .collect()
    } else {
        const T: usize = 192;
        (0..cols)
            .step_by(T)
            .flat_map(|i0| {
                (i0..cols)
                    .step_by(T)
                    .map(move |j0| (i0, T.min(cols - i0), j0, T.min(cols - j0)))
            })
            .collect()
    };
    let dst = SendPtr(out.as_mut_ptr());
    blocks.par_iter().for_each(|&(i0, mi, j0, nj)| {
        // Rebound so the closure captures the Send wrapper whole, not its raw pointer field.
        #[allow(clippy::redundant_locals)]
        let dst = dst;
        // SAFETY: lhs = x[:, i0..i0+mi]ᵀ, rhs = x[:, j0..j0+nj]; blocks are disjoint.
        unsafe {
            gemm_strided(
                mi,
                nj,
                rows,
                dst.0.add(i0 * cols + j0),
                cols as isize,
                1,
                false,
                x.as_ptr().add(i0),
                1,
                cols as isize,
                x.as_ptr().add(j0),
                cols as isize,
                1,
                1.0,
                false,
            );
        }
    });
}

/// Reference for [`gram`] with f64 accumulation.
pub fn gram_naive(x: &[f32], rows: usize, cols: usize, out: &mut [f32]) {
    for i in 0..cols {
        for j in 0..cols {
            let s: f64 = (0..rows)
                .map(|r| x[r * cols + i] as f64 * x[r * cols + j] as f64)
                .sum();
            out[i * cols + j] = s as f32;
        }
    }
}

/// `out[cols_p, cols_d] = xpᵀ · xd` for row-major `xp[rows, cols_p]`, `xd[rows, cols_d]`
/// (f32, one GEMM with the `gemm` crate).
pub fn cross_t(xp: &[f32], xd: &[f32], rows: usize, cp: usize, cd: usize, out: &mut [f32]) {
    assert!(
        xp.len() >= rows * cp && xd.len() >= rows * cd && out.len() >= cp * cd,
        "cross_t: bad sizes"
    );
    if cp == 0 || cd == 0 {
        return;
    }
    if rows == 0 {
        out[..cp * cd].fill(0.0);
        return;
    }
    let par = if threads() > 1 && 2 * rows * cp * cd >= 1 << 22 {
        gemm::Parallelism::Rayon(threads())
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: sizes checked above. dst [cp, cd] row-major; lhs = xpᵀ: element (i, t) at
    // xp[t·cp + i]; rhs = xd: element (t, j) at xd[t·cd + j].
    unsafe {
        gemm::gemm(
            cp,
            cd,
            rows,
            out.as_mut_ptr(),
            1,
            cd as isize,
            false,
            xp.as_ptr(),
            cp as isize,
            1,
            xd.as_ptr(),
            1,
            cd as isize,
            1.0f32,
            1.0f32,
            false,
            false,
            false,
            par,
        )
    }
}

/// Reference for [`cross_t`]: triple loop with f64 accumulation.
pub fn cross_t_naive(xp: &[f32], xd: &[f32], rows: usize, cp: usize, cd: usize, out: &mut [f32]) {
    for i in 0..cp {
        for j in 0..cd {
            let s: f64 = (0..rows)
                .map(|t| xp[t * cp + i] as f64 * xd[t * cd + j] as f64)
                .sum();
            out[i * cd + j] = s as f32;
        }
    }
}
