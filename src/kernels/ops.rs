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
                if super::has_avx512() {
                    // SAFETY: the CPU supports the enabled features (checked at run time).
                    return unsafe { avx512($($arg),*) };
                }
                if super::has_avx2() {
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

/// Reference SwiGLU in f64.
pub fn silu_mul_naive(gate: &mut [f32], up: &[f32]) {
    for (g, &u) in gate.iter_mut().zip(up) {
        let x = *g as f64;
        *g = (x / (1.0 + (-x).exp()) * u as f64) as f32;
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
