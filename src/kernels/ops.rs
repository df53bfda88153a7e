//! Element-wise and row-wise kernels: RMSNorm, SwiGLU, softmax, log-sum-exp, a fast `exp`.
//!
//! `exp` uses Cephes-style range reduction (x = n·ln2 + r, |r| ≤ ln2/2) and a degree-6
//! polynomial; its relative error is below 2e-7 on the range the kernels use, like the SIMD
//! `exp` PyTorch uses. The `*_naive` functions use `f64` and `std` maths as references.

use rayon::prelude::*;

/// exp(x) in f32 with ≤ ~2 ulp error on [-87.3, 88.3]; inputs are clamped to that range
/// (so it returns ~1.2e-38 for very negative x and ~2.2e38 for large x, never inf/NaN for
/// finite input). Branch-free so the loops around it vectorise.
#[inline(always)]
pub fn exp_fast(x: f32) -> f32 {
    // Round to nearest with the 1.5·2²³ trick: `xm` holds n in its low mantissa bits, so n is
    // read back with integer ops (Rust's saturating `as i32` and `f32::round` don't vectorise).
    const MAGIC: f32 = 12_582_912.0;
    let x = x.clamp(-87.3, 88.3);
    let xm = x * std::f32::consts::LOG2_E + MAGIC;
    let n = xm - MAGIC;
    let ni = (xm.to_bits() as i32).wrapping_sub(MAGIC.to_bits() as i32);
    // r = x - n·ln2 in two steps (Cody–Waite) to keep precision.
    let r = x - n * 0.693_145_75 - n * 1.428_606_8e-6;
    // Plain multiply-adds: `mul_add` is a libm call where FMA is not enabled.
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let e = p * r * r + r + 1.0;
    e * f32::from_bits((ni.wrapping_add(127) as u32) << 23)
}

macro_rules! simd_dispatch {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),*) $(-> $ret:ty)? $body:block) => {
        $(#[$m])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn imp($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
                unsafe fn avx512($($arg: $ty),*) $(-> $ret)? { imp($($arg),*) }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) $(-> $ret)? { imp($($arg),*) }
                if crate::isa::avx512_fvl() {
                    // SAFETY: the CPU supports the enabled features (checked at run time).
                    return unsafe { avx512($($arg),*) };
                }
                if crate::isa::avx2_fma_f16c() {
                    // SAFETY: as above.
                    return unsafe { avx2($($arg),*) };
                }
            }
            imp($($arg),*)
        }
    };
}

simd_dispatch! {
    /// `y[i] = exp(x[i])` for a slice, vectorised.
    pub fn exp_slice(x: &mut [f32]) {
        for v in x.iter_mut() {
            *v = exp_fast(*v);
        }
    }
}

simd_dispatch! {
    /// `y[i] -= a · x[i]` over the shorter of the two slices (one multiply, one subtract: no
    /// fused multiply-add, so the result is bit-identical to [`sub_scaled_naive`]). The inner
    /// step of SparseGPT's column-by-column OBS update.
    pub fn sub_scaled(y: &mut [f32], a: f32, x: &[f32]) {
        for (v, &h) in y.iter_mut().zip(x) {
            *v -= a * h;
        }
    }
}

/// Reference for [`sub_scaled`]: plain scalar loop.
pub fn sub_scaled_naive(y: &mut [f32], a: f32, x: &[f32]) {
    for i in 0..y.len().min(x.len()) {
        y[i] -= a * x[i];
    }
}

/// RMSNorm of one row: `out = x / sqrt(mean(x²) + eps) · weight` (HF order of operations).
pub fn rmsnorm_row(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    rmsnorm_row_dim(x, weight, eps, x.len() as f32, out)
}

simd_dispatch! {
    /// RMSNorm of one row with divisor `dim`: `out = x / sqrt(Σx²/dim + eps) · weight`
    /// (`dim = x.len()` is the ordinary RMSNorm; SliceGPT's sliced models divide by the original
    /// width, like its `RMSN(mean_dim)` module).
    pub fn rmsnorm_row_dim(x: &[f32], weight: &[f32], eps: f32, dim: f32, out: &mut [f32]) {
        let n = x.len();
        let mut ss = 0f32;
        // 16 partial sums so the reduction vectorises.
        let mut acc = [0f32; 16];
        let chunks = n / 16;
        for c in 0..chunks {
            for l in 0..16 {
                let v = x[c * 16 + l];
                acc[l] = v.mul_add(v, acc[l]);
            }
        }
        for a in acc {
            ss += a;
        }
        for &v in &x[chunks * 16..] {
            ss += v * v;
        }
        let inv = 1.0 / (ss / dim + eps).sqrt();
        for i in 0..n {
            out[i] = weight[i] * (x[i] * inv);
        }
    }
}

/// RMSNorm over `rows` rows of width `weight.len()`, multithreaded.
pub fn rmsnorm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    rmsnorm_dim(x, weight, eps, weight.len(), out)
}

/// [`rmsnorm`] with the mean of squares taken as `Σx²/dim` (see [`rmsnorm_row_dim`]).
pub fn rmsnorm_dim(x: &[f32], weight: &[f32], eps: f32, dim: usize, out: &mut [f32]) {
    let d = weight.len();
    let dim = dim as f32;
    out.par_chunks_mut(d)
        .zip(x.par_chunks(d))
        .with_min_len(64)
        .for_each(|(o, xi)| rmsnorm_row_dim(xi, weight, eps, dim, o));
}

/// Reference RMSNorm in f64.
pub fn rmsnorm_naive(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    rmsnorm_dim_naive(x, weight, eps, weight.len(), out)
}

/// Reference [`rmsnorm_dim`] in f64.
pub fn rmsnorm_dim_naive(x: &[f32], weight: &[f32], eps: f32, dim: usize, out: &mut [f32]) {
    let d = weight.len();
    for (o, xi) in out.chunks_mut(d).zip(x.chunks(d)) {
        let ms = xi.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / dim as f64;
        let inv = 1.0 / (ms + eps as f64).sqrt();
        for i in 0..d {
            o[i] = (weight[i] as f64 * (xi[i] as f64 * inv)) as f32;
        }
    }
}

simd_dispatch! {
    /// SwiGLU in place: `gate[i] = silu(gate[i]) · up[i]`, silu(x) = x·σ(x).
    fn silu_mul_chunk(gate: &mut [f32], up: &[f32]) {
        for (g, &u) in gate.iter_mut().zip(up) {
            let x = *g;
            *g = x / (1.0 + exp_fast(-x)) * u;
        }
    }
}

/// SwiGLU in place over a whole activation buffer, multithreaded.
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    gate.par_chunks_mut(4096)
        .zip(up.par_chunks(4096))
        .for_each(|(g, u)| silu_mul_chunk(g, u));
}

/// GeGLU with PyTorch's tanh approximation, in place: `gate[i] = gelu_tanh(gate[i]) · up[i]`,
/// `gelu_tanh(x) = ½x(1 + tanh(√(2/π)(x + 0.044715x³)))` (transformers' `gelu_pytorch_tanh`,
/// Gemma's MLP activation), in f32 as PyTorch computes it; multithreaded.
pub fn gelu_tanh_mul(gate: &mut [f32], up: &[f32]) {
    const C: f32 = 0.797_884_6; // √(2/π)
    gate.par_chunks_mut(4096)
        .zip(up.par_chunks(4096))
        .for_each(|(g, u)| {
            for (g, &u) in g.iter_mut().zip(u) {
                let x = *g;
                let inner = C * (x + 0.044715 * x * x * x);
                *g = 0.5 * x * (1.0 + inner.tanh()) * u;
            }
        });
}

/// Reference [`gelu_tanh_mul`] in f64.
pub fn gelu_tanh_mul_naive(gate: &mut [f32], up: &[f32]) {
    let c = (2.0 / std::f64::consts::PI).sqrt();
    for (g, &u) in gate.iter_mut().zip(up) {
        let x = *g as f64;
        *g = (0.5 * x * (1.0 + (c * (x + 0.044715 * x.powi(3))).tanh()) * u as f64) as f32;
    }
}

/// Reference SwiGLU in f64.
pub fn silu_mul_naive(gate: &mut [f32], up: &[f32]) {
    for (g, &u) in gate.iter_mut().zip(up) {
        let x = *g as f64;
        *g = (x / (1.0 + (-x).exp()) * u as f64) as f32;
    }
}

/// `out[j] = scale · (q · k[j·stride .. j·stride + q.len()])` for every `j < out.len()`: one
/// query row against key rows `stride` apart (decode attention scores). Each dot product sums
/// 16 lanes (multiply, then add), folds them pairwise (8, 4, 2, 1), then adds the tail in order:
/// the AVX2 path and the portable one give the same bits.
///
/// # Panics
/// When `k` is too short for `out.len()` rows.
pub fn dot_rows(q: &[f32], k: &[f32], stride: usize, scale: f32, out: &mut [f32]) {
    let (hd, n) = (q.len(), out.len());
    assert!(
        n == 0 || k.len() >= (n - 1) * stride + hd,
        "dot_rows: k too short"
    );
    #[cfg(target_arch = "x86_64")]
    if crate::isa::avx2_fma_f16c() {
        // SAFETY: AVX2 checked; every row read is inside `k` (asserted above).
        unsafe { dot_rows_avx2(q, k, stride, scale, out) };
        return;
    }
    dot_rows_portable(q, k, stride, scale, out);
}

/// [`dot_rows`] in portable code (the lane order the AVX2 path follows).
fn dot_rows_portable(q: &[f32], k: &[f32], stride: usize, scale: f32, out: &mut [f32]) {
    let hd = q.len();
    let body = hd - hd % 16;
    for (j, o) in out.iter_mut().enumerate() {
        let kj = &k[j * stride..j * stride + hd];
        let mut acc = [0f32; 16];
        for (a, b) in q[..body].chunks_exact(16).zip(kj[..body].chunks_exact(16)) {
            for l in 0..16 {
                acc[l] += a[l] * b[l];
            }
        }
        for w in [8, 4, 2, 1] {
            for l in 0..w {
                acc[l] += acc[l + w];
            }
        }
        let mut s = acc[0];
        for (a, b) in q[body..].iter().zip(&kj[body..]) {
            s += a * b;
        }
        *o = s * scale;
    }
}

/// [`dot_rows`] with AVX2: lanes 0–7 and 8–15 in two registers.
///
/// # Safety
/// AVX2 available; `k` holds `(out.len() − 1)·stride + q.len()` values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn dot_rows_avx2(q: &[f32], k: &[f32], stride: usize, scale: f32, out: &mut [f32]) {
    use std::arch::x86_64::*;
    let hd = q.len();
    let body = hd - hd % 16;
    let qp = q.as_ptr();
    for (j, o) in out.iter_mut().enumerate() {
        let kp = k.as_ptr().add(j * stride);
        let (mut lo, mut hi) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let mut c = 0;
        while c < body {
            let a = _mm256_mul_ps(_mm256_loadu_ps(qp.add(c)), _mm256_loadu_ps(kp.add(c)));
            let b = _mm256_mul_ps(
                _mm256_loadu_ps(qp.add(c + 8)),
                _mm256_loadu_ps(kp.add(c + 8)),
            );
            lo = _mm256_add_ps(lo, a);
            hi = _mm256_add_ps(hi, b);
            c += 16;
        }
        let mut s = hsum8(_mm256_add_ps(lo, hi));
        for c in body..hd {
            s += *qp.add(c) * *kp.add(c);
        }
        *o = s * scale;
    }
}

/// Sum of the 8 lanes: (0..4 + 4..8), then (0..2 + 2..4), then lane 0 + lane 1.
///
/// # Safety
/// AVX2.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) unsafe fn hsum8(v: std::arch::x86_64::__m256) -> f32 {
    use std::arch::x86_64::*;
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
}

/// Reference for [`dot_rows`] with f64 accumulation.
pub fn dot_rows_naive(q: &[f32], k: &[f32], stride: usize, scale: f32, out: &mut [f32]) {
    for (j, o) in out.iter_mut().enumerate() {
        let s: f64 = (0..q.len())
            .map(|c| q[c] as f64 * k[j * stride + c] as f64)
            .sum();
        *o = (s * scale as f64) as f32;
    }
}

/// `out[c] = Σ_j p[j] · v[j·stride + c]` over `j < p.len()`, `c < out.len()`, summed in `j`
/// order, one multiply and one add per term (decode attention: the softmax weights times the
/// value rows). The AVX2 path gives the same bits as the portable one.
///
/// # Panics
/// When `v` is too short for `p.len()` rows.
pub fn weighted_rows(p: &[f32], v: &[f32], stride: usize, out: &mut [f32]) {
    let (hd, n) = (out.len(), p.len());
    assert!(
        n == 0 || v.len() >= (n - 1) * stride + hd,
        "weighted_rows: v too short"
    );
    #[cfg(target_arch = "x86_64")]
    if crate::isa::avx2_fma_f16c() {
        // SAFETY: AVX2 checked; every row read is inside `v` (asserted above).
        unsafe { weighted_rows_avx2(p, v, stride, out) };
        return;
    }
    weighted_rows_portable(p, v, stride, out);
}

/// [`weighted_rows`] in portable code.
fn weighted_rows_portable(p: &[f32], v: &[f32], stride: usize, out: &mut [f32]) {
    let hd = out.len();
    out.fill(0.0);
    for (j, &pj) in p.iter().enumerate() {
        let vj = &v[j * stride..j * stride + hd];
        for (o, &x) in out.iter_mut().zip(vj) {
            *o += pj * x;
        }
    }
}

/// [`weighted_rows`] with AVX2: 32 outputs per pass over the rows, held in 4 registers.
///
/// # Safety
/// AVX2 available; `v` holds `(p.len() − 1)·stride + out.len()` values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn weighted_rows_avx2(p: &[f32], v: &[f32], stride: usize, out: &mut [f32]) {
    use std::arch::x86_64::*;
    let hd = out.len();
    let body = hd - hd % 32;
    let vp = v.as_ptr();
    let op = out.as_mut_ptr();
    let mut c = 0;
    while c < body {
        let mut acc = [_mm256_setzero_ps(); 4];
        for (j, &pj) in p.iter().enumerate() {
            let w = _mm256_set1_ps(pj);
            let r = vp.add(j * stride + c);
            for (u, a) in acc.iter_mut().enumerate() {
                *a = _mm256_add_ps(*a, _mm256_mul_ps(w, _mm256_loadu_ps(r.add(8 * u))));
            }
        }
        for (u, a) in acc.iter().enumerate() {
            _mm256_storeu_ps(op.add(c + 8 * u), *a);
        }
        c += 32;
    }
    for c in body..hd {
        let mut s = 0f32;
        for (j, &pj) in p.iter().enumerate() {
            s += pj * *vp.add(j * stride + c);
        }
        *op.add(c) = s;
    }
}

/// Reference for [`weighted_rows`] with f64 accumulation.
pub fn weighted_rows_naive(p: &[f32], v: &[f32], stride: usize, out: &mut [f32]) {
    for (c, o) in out.iter_mut().enumerate() {
        let s: f64 = (0..p.len())
            .map(|j| p[j] as f64 * v[j * stride + c] as f64)
            .sum();
        *o = s as f32;
    }
}

/// Maximum of a slice (−inf when empty), vectorisable.
#[inline(always)]
fn max_of(x: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 16];
    let chunks = x.chunks_exact(16);
    let tail = chunks.remainder();
    for c in chunks {
        for l in 0..16 {
            lanes[l] = if c[l] > lanes[l] { c[l] } else { lanes[l] };
        }
    }
    let m = tail
        .iter()
        .fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a });
    lanes.iter().fold(m, |a, &b| if b > a { b } else { a })
}

simd_dispatch! {
    /// Softmax of one row in place over its first `n` entries (the rest are set to 0).
    pub fn softmax_prefix(row: &mut [f32], n: usize) {
        let (live, dead) = row.split_at_mut(n);
        let m = max_of(live);
        let mut acc = [0f32; 16];
        let mut chunks = live.chunks_exact_mut(16);
        for c in &mut chunks {
            for l in 0..16 {
                let e = exp_fast(c[l] - m);
                c[l] = e;
                acc[l] += e;
            }
        }
        let mut s: f32 = acc.iter().sum();
        // The tail's exponentials are computed 16 lanes wide in a padded copy (the scalar
        // `exp_fast` costs about as much as a whole vector), then summed in order.
        let tail = chunks.into_remainder();
        let mut pad = [0f32; 16];
        pad[..tail.len()].copy_from_slice(tail);
        for p in pad.iter_mut() {
            *p = exp_fast(*p - m);
        }
        for (v, &e) in tail.iter_mut().zip(&pad) {
            *v = e;
            s += e;
        }
        let inv = 1.0 / s;
        for v in live.iter_mut() {
            *v *= inv;
        }
        dead.fill(0.0);
    }
}

/// Reference softmax of one row's first `n` entries in f64.
pub fn softmax_prefix_naive(row: &mut [f32], n: usize) {
    let m = row[..n]
        .iter()
        .fold(f64::NEG_INFINITY, |a, &b| a.max(b as f64));
    let s: f64 = row[..n].iter().map(|&v| (v as f64 - m).exp()).sum();
    for v in row[..n].iter_mut() {
        *v = ((*v as f64 - m).exp() / s) as f32;
    }
    row[n..].fill(0.0);
}

simd_dispatch! {
    /// `log Σ exp(row)`: max in f32, exponentials in f32, sum in f64 (the eval protocol's
    /// float64 log-softmax to ~1e-7 relative). Empty rows give -inf.
    pub fn logsumexp(row: &[f32]) -> f64 {
        let m = max_of(row);
        if m == f32::NEG_INFINITY {
            return f64::NEG_INFINITY;
        }
        let mut total = 0f64;
        for block in row.chunks(1024) {
            let mut acc = [0f32; 16];
            let chunks = block.chunks_exact(16);
            let tail = chunks.remainder();
            for c in chunks {
                for l in 0..16 {
                    acc[l] += exp_fast(c[l] - m);
                }
            }
            total += acc.iter().map(|&a| a as f64).sum::<f64>();
            total += tail.iter().map(|&v| exp_fast(v - m) as f64).sum::<f64>();
        }
        m as f64 + total.ln()
    }
}

/// Reference log-sum-exp in f64.
pub fn logsumexp_naive(row: &[f32]) -> f64 {
    let m = row.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b as f64));
    m + row.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln()
}

/// `x[r, :] += bias` for every row.
pub fn add_bias(x: &mut [f32], bias: &[f32]) {
    let d = bias.len();
    for row in x.chunks_mut(d) {
        for (v, b) in row.iter_mut().zip(bias) {
            *v += b;
        }
    }
}

/// `a += b`, element-wise.
pub fn add_assign(a: &mut [f32], b: &[f32]) {
    for (x, y) in a.iter_mut().zip(b) {
        *x += y;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The decode-attention kernels' SIMD paths give the portable paths' bits.
    #[test]
    fn row_kernels_simd_equal_portable_bits() {
        let mut seed = 5u32;
        let mut rnd = move || {
            seed = seed.wrapping_mul(1664525).wrapping_add(1013904223);
            (seed >> 8) as f32 / (1u32 << 24) as f32 * 2.0 - 1.0
        };
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
        for &(n, hd, stride) in &[
            (0, 64, 64),
            (1, 1, 1),
            (13, 17, 20),
            (40, 64, 192),
            (9, 100, 100),
        ] {
            let q: Vec<f32> = (0..hd).map(|_| rnd()).collect();
            let k: Vec<f32> = (0..n * stride + hd).map(|_| rnd()).collect();
            let (mut a, mut b) = (vec![0f32; n], vec![1f32; n]);
            dot_rows(&q, &k, stride, 0.7, &mut a);
            dot_rows_portable(&q, &k, stride, 0.7, &mut b);
            assert_eq!(bits(&a), bits(&b), "dot_rows n={n} hd={hd}");
            let p: Vec<f32> = (0..n).map(|_| rnd()).collect();
            let (mut a, mut b) = (vec![0f32; hd], vec![1f32; hd]);
            weighted_rows(&p, &k, stride, &mut a);
            weighted_rows_portable(&p, &k, stride, &mut b);
            assert_eq!(bits(&a), bits(&b), "weighted_rows n={n} hd={hd}");
        }
    }

    /// GELU-tanh GLU against its f64 reference, including large |x| where tanh saturates.
    #[test]
    fn gelu_tanh_mul_matches_naive() {
        let g: Vec<f32> = (0..9000).map(|i| (i as f32 - 4500.0) * 0.003).collect();
        let u: Vec<f32> = (0..9000).map(|i| 1.0 + (i % 7) as f32 * 0.25).collect();
        let (mut a, mut b) = (g.clone(), g.clone());
        gelu_tanh_mul(&mut a, &u);
        gelu_tanh_mul_naive(&mut b, &u);
        let worst = a
            .iter()
            .zip(&b)
            .fold(0f32, |m, (x, y)| m.max((x - y).abs() / y.abs().max(1.0)));
        // Absolute near 0 (1 + tanh cancels in f32 for negative x, as in PyTorch).
        assert!(worst < 2e-6, "difference {worst}");
        // gelu(-13.5) is 0 and gelu(13.5) is 13.5: the function, not a copy of its input.
        assert!(b[0].abs() < 1e-6 && (b[8999] - 13.497 * u[8999]).abs() < 1e-2);
    }
}
