//! Machine probes for reading benchmark figures against physical limits: peak FMA rate,
//! attainable GEMM rate and streaming read bandwidth (what bounds a
//! decode step). They measure; they do not assume a clock frequency.

use std::time::Instant;

/// FLOPs of one call of the FMA loop per iteration: 12 accumulators × lanes × 2.
const ACC: usize = 12;

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn fma_loop_avx512(iters: usize) -> (f32, usize) {
    use std::arch::x86_64::*;
    let mut acc = [_mm512_set1_ps(0.0); ACC];
    let a = _mm512_set1_ps(0.999_999);
    let b = _mm512_set1_ps(1e-7);
    for _ in 0..iters {
        for r in acc.iter_mut() {
            *r = _mm512_fmadd_ps(*r, a, b);
        }
    }
    let mut s = 0.0;
    for r in acc {
        s += _mm512_reduce_add_ps(r);
    }
    (s, iters * ACC * 16 * 2)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn fma_loop_avx2(iters: usize) -> (f32, usize) {
    use std::arch::x86_64::*;
    let mut acc = [_mm256_set1_ps(0.0); ACC];
    let a = _mm256_set1_ps(0.999_999);
    let b = _mm256_set1_ps(1e-7);
    for _ in 0..iters {
        for r in acc.iter_mut() {
            *r = _mm256_fmadd_ps(*r, a, b);
        }
    }
    let mut lanes = [0f32; 8];
    let mut s = 0.0;
    for r in acc {
        _mm256_storeu_ps(lanes.as_mut_ptr(), r);
        s += lanes.iter().sum::<f32>();
    }
    (s, iters * ACC * 8 * 2)
}

fn fma_loop_scalar(iters: usize) -> (f32, usize) {
    let mut acc = [0f32; ACC * 8];
    for _ in 0..iters {
        for r in acc.iter_mut() {
            *r = r.mul_add(0.999_999, 1e-7);
        }
    }
    (acc.iter().sum(), iters * ACC * 8 * 2)
}

fn fma_loop(iters: usize) -> (f32, usize) {
    #[cfg(target_arch = "x86_64")]
    if crate::isa::features().avx512f {
        // SAFETY: feature checked at run time.
        return unsafe { fma_loop_avx512(iters) };
    }
    #[cfg(target_arch = "x86_64")]
    if crate::isa::avx2_fma_f16c() {
        // SAFETY: features checked at run time.
        return unsafe { fma_loop_avx2(iters) };
    }
    fma_loop_scalar(iters)
}

/// Peak f32 FMA throughput in GFLOP/s with `threads` threads all running (rayon pool).
pub fn peak_fma_gflops(threads: usize) -> f64 {
    use rayon::prelude::*;
    let iters = 20_000_000;
    let _ = fma_loop(iters / 20); // warm up clocks
    let t0 = Instant::now();
    let flops: usize = (0..threads)
        .into_par_iter()
        .map(|_| {
            let (s, f) = fma_loop(iters);
            std::hint::black_box(s);
            f
        })
        .sum();
    flops as f64 / t0.elapsed().as_secs_f64() / 1e9
}

/// Attained GFLOP/s of [`super::matmul_t`] on an `m×k · (n×k)ᵀ` product (best of `reps`).
pub fn gemm_gflops(m: usize, k: usize, n: usize, reps: usize) -> f64 {
    let x: Vec<f32> = (0..m * k)
        .map(|i| ((i % 97) as f32 - 48.0) * 0.01)
        .collect();
    let w: Vec<f32> = (0..n * k)
        .map(|i| ((i % 89) as f32 - 44.0) * 0.01)
        .collect();
    let mut out = vec![0f32; m * n];
    super::matmul_t(&x, &w, &mut out, m, k, n, false);
    let mut best = f64::MAX;
    for _ in 0..reps.max(1) {
        let t0 = Instant::now();
        super::matmul_t(&x, &w, &mut out, m, k, n, false);
        best = best.min(t0.elapsed().as_secs_f64());
    }
    std::hint::black_box(&out);
    2.0 * (m * n * k) as f64 / best / 1e9
}

/// The body of [`sum_f32`], compiled for AVX-512, AVX2 or plain x86-64/other targets.
#[inline(always)]
fn sum_body(x: &[f32]) -> f64 {
    let mut acc = [0f32; 64];
    let chunks = x.chunks_exact(64);
    let tail = chunks.remainder();
    for c in chunks {
        for l in 0..64 {
            acc[l] += c[l];
        }
    }
    let mut s = 0f64;
    for &v in tail {
        s += v as f64;
    }
    acc.iter().map(|&a| a as f64).sum::<f64>() + s
}

fn sum_dispatch(x: &[f32]) -> f64 {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
        unsafe fn avx512(x: &[f32]) -> f64 {
            sum_body(x)
        }
        #[target_feature(enable = "avx2,fma")]
        unsafe fn avx2(x: &[f32]) -> f64 {
            sum_body(x)
        }
        if crate::isa::avx512_fvl() {
            // SAFETY: features checked at run time.
            return unsafe { avx512(x) };
        }
        if crate::isa::avx2_fma_f16c() {
            // SAFETY: as above.
            return unsafe { avx2(x) };
        }
    }
    sum_body(x)
}

/// Sum of a slice: 64 f32 partial sums (so it vectorises and keeps 4 loads in flight), added
/// up in f64; the streaming read kernel of [`stream_gbps`].
pub fn sum_f32(x: &[f32]) -> f64 {
    sum_dispatch(x)
}

/// Reference for [`sum_f32`] in f64.
pub fn sum_f32_naive(x: &[f32]) -> f64 {
    x.iter().map(|&v| v as f64).sum()
}

/// Read bandwidth in GB/s (10⁹ bytes/s), STREAM-like: `threads` threads each sum their own part
/// of a `bytes`-byte f32 buffer (allocated and touched first, so the pages are resident); best of
/// `reps` passes. Use a buffer several times the last-level cache to measure DRAM. This is the
/// limit a weight-streaming matvec cannot beat; each pass's sum is checked against the known
/// contents, so a miscompiled or skipped read cannot produce a figure.
pub fn stream_gbps(threads: usize, bytes: usize, reps: usize) -> f64 {
    use rayon::prelude::*;
    let threads = threads.max(1);
    let n = (bytes / 4).max(threads * 64);
    // Values 1.0: each of the 64 f32 partial sums stays an exact integer below 2^24 for n < 2^30.
    let buf = vec![1f32; n];
    let per = n.div_ceil(threads);
    let pass = || -> f64 {
        if threads == 1 {
            sum_f32(&buf)
        } else {
            buf.par_chunks(per).with_max_len(1).map(sum_f32).sum()
        }
    };
    let _ = pass(); // warm up (page tables, clocks)
    let mut best = f64::MAX;
    for _ in 0..reps.max(1) {
        let t0 = Instant::now();
        let s = pass();
        best = best.min(t0.elapsed().as_secs_f64());
        assert_eq!(s, n as f64, "stream probe: wrong sum");
    }
    (n * 4) as f64 / best / 1e9
}
