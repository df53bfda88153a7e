//! Dense weights: f32, bf16 and int8 with per-row scales.

use super::*;
#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// Dense f32 weights, row-major `[rows, cols]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Dense {
    rows: usize,
    cols: usize,
    data: Vec<f32>,
}

impl Dense {
    pub fn from_dense(w: &[f32], rows: usize, cols: usize) -> Result<Self> {
        check_dense("dense", w, rows, cols)?;
        Ok(Dense {
            rows,
            cols,
            data: w.to_vec(),
        })
    }
    /// The raw row-major values.
    pub fn data(&self) -> &[f32] {
        &self.data
    }
    /// The product through [`crate::kernels::matmul_t`] (the `gemm` crate) for any `m`.
    pub fn matmul_gemm(&self, x: &[f32], m: usize, y: &mut [f32]) {
        check_sizes("dense", self.rows, self.cols, x, m, y);
        crate::kernels::matmul_t(x, &self.data, y, m, self.cols, self.rows, false);
    }
    pub fn from_tensors(name: &str, tensors: &[RawTensor]) -> Result<Self> {
        const K: &str = "dense";
        let s = read_shape(tensors, name, 2, K)?;
        let (rows, cols) = (s[0], s[1]);
        let v = find(tensors, name, "values", Dtype::F32, K)?;
        expect_len(v, rows.checked_mul(cols), K)?;
        Ok(Dense {
            rows,
            cols,
            data: read_f32(v),
        })
    }
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512vl,avx512bw,fma")]
    unsafe fn block_avx512(&self, r0: usize, r1: usize, x: &[f32], m: usize, out: Out) {
        let c = self.cols;
        for r in r0..r1 {
            let w = self.data.as_ptr().add(r * c);
            for i in 0..m {
                out.put(i, r, dot_f32(w, x.as_ptr().add(i * c), c));
            }
        }
    }
}

/// Sum of `w[k]·x[k]` over `n` lanes, 4 accumulators.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f,avx512vl,avx512bw,fma")]
unsafe fn dot_f32(w: *const f32, x: *const f32, n: usize) -> f32 {
    let mut a = [_mm512_setzero_ps(); 4];
    let mut k = 0;
    while k + 64 <= n {
        for j in 0..4 {
            a[j] = _mm512_fmadd_ps(
                _mm512_loadu_ps(w.add(k + 16 * j)),
                _mm512_loadu_ps(x.add(k + 16 * j)),
                a[j],
            );
        }
        k += 64;
    }
    while k < n {
        let mk: __mmask16 = if n - k >= 16 {
            0xffff
        } else {
            (1u16 << (n - k)) - 1
        };
        a[0] = _mm512_fmadd_ps(
            _mm512_maskz_loadu_ps(mk, w.add(k)),
            _mm512_maskz_loadu_ps(mk, x.add(k)),
            a[0],
        );
        k += 16;
    }
    _mm512_reduce_add_ps(_mm512_add_ps(
        _mm512_add_ps(a[0], a[1]),
        _mm512_add_ps(a[2], a[3]),
    ))
}

fn naive_rows(
    rows: usize,
    cols: usize,
    x: &[f32],
    m: usize,
    y: &mut [f32],
    w: impl Fn(usize, usize) -> f64,
) {
    for i in 0..m {
        for r in 0..rows {
            let mut s = 0f64;
            for k in 0..cols {
                s += w(r, k) * x[i * cols + k] as f64;
            }
            y[i * rows + r] = s as f32;
        }
    }
}

impl WeightFormat for Dense {
    fn kind(&self) -> &'static str {
        "dense-f32"
    }
    fn rows(&self) -> usize {
        self.rows
    }
    fn cols(&self) -> usize {
        self.cols
    }
    fn nbytes(&self) -> usize {
        self.data.len() * 4
    }
    fn stored(&self) -> usize {
        self.data.len()
    }
    fn to_dense(&self) -> Vec<f32> {
        self.data.clone()
    }
    fn matmul(&self, x: &[f32], m: usize, y: &mut [f32]) {
        check_sizes("dense", self.rows, self.cols, x, m, y);
        #[cfg(target_arch = "x86_64")]
        if m <= 4 && has_avx512() {
            // SAFETY: AVX-512 checked; sizes checked; rows written disjointly.
            drive(self.rows, m, self.nbytes(), 1, y, |r0, r1, out| unsafe {
                self.block_avx512(r0, r1, x, m, out)
            });
            return;
        }
        self.matmul_gemm(x, m, y)
    }
    fn matmul_naive(&self, x: &[f32], m: usize, y: &mut [f32]) {
        check_sizes("dense", self.rows, self.cols, x, m, y);
        naive_rows(self.rows, self.cols, x, m, y, |r, k| {
            self.data[r * self.cols + k] as f64
        });
    }
    fn to_tensors(&self, name: &str) -> Vec<RawTensor> {
        vec![
            shape_tensor(name, &[self.rows, self.cols]),
            RawTensor::f32(format!("{name}.values"), &self.data),
        ]
    }
}

/// Dense bf16 weights (round-to-nearest-even from f32); products accumulate in f32.
#[derive(Clone, Debug, PartialEq)]
pub struct DenseBf16 {
    rows: usize,
    cols: usize,
    data: Vec<half::bf16>,
}

impl DenseBf16 {
    pub fn from_dense(w: &[f32], rows: usize, cols: usize) -> Result<Self> {
        check_dense("dense-bf16", w, rows, cols)?;
        Ok(DenseBf16 {
            rows,
            cols,
            data: w.iter().map(|&v| half::bf16::from_f32(v)).collect(),
        })
    }
    pub fn from_tensors(name: &str, tensors: &[RawTensor]) -> Result<Self> {
        const K: &str = "dense-bf16";
        let s = read_shape(tensors, name, 2, K)?;
        let (rows, cols) = (s[0], s[1]);
        let v = find(tensors, name, "values", Dtype::Bf16, K)?;
        expect_len(v, rows.checked_mul(cols), K)?;
        Ok(DenseBf16 {
            rows,
            cols,
            data: read_u16(v).into_iter().map(half::bf16::from_bits).collect(),
        })
    }
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512vl,avx512bw,fma")]
    unsafe fn block_avx512(&self, r0: usize, r1: usize, x: &[f32], m: usize, out: Out) {
        #[inline(always)]
        unsafe fn widen(v: __m256i) -> __m512 {
            _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16))
        }
        let n = self.cols;
        for r in r0..r1 {
            let w = self.data.as_ptr().add(r * n) as *const u16;
            for i in 0..m {
                let x = x.as_ptr().add(i * n);
                let mut a = [_mm512_setzero_ps(); 4];
                let mut k = 0;
                while k + 64 <= n {
                    for j in 0..4 {
                        let wv = widen(_mm256_loadu_si256(w.add(k + 16 * j) as *const __m256i));
                        a[j] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x.add(k + 16 * j)), a[j]);
                    }
                    k += 64;
                }
                while k < n {
                    let mk: __mmask16 = if n - k >= 16 {
                        0xffff
                    } else {
                        (1u16 << (n - k)) - 1
                    };
                    let wv = widen(_mm256_maskz_loadu_epi16(mk, w.add(k) as *const i16));
                    a[0] = _mm512_fmadd_ps(wv, _mm512_maskz_loadu_ps(mk, x.add(k)), a[0]);
                    k += 16;
                }
                let s = _mm512_add_ps(_mm512_add_ps(a[0], a[1]), _mm512_add_ps(a[2], a[3]));
                out.put(i, r, _mm512_reduce_add_ps(s));
            }
        }
    }
}

impl WeightFormat for DenseBf16 {
    fn kind(&self) -> &'static str {
        "dense-bf16"
    }
    fn rows(&self) -> usize {
        self.rows
    }
    fn cols(&self) -> usize {
        self.cols
    }
    fn nbytes(&self) -> usize {
        self.data.len() * 2
    }
    fn stored(&self) -> usize {
        self.data.len()
    }
    fn to_dense(&self) -> Vec<f32> {
        self.data.iter().map(|v| v.to_f32()).collect()
    }
    fn matmul(&self, x: &[f32], m: usize, y: &mut [f32]) {
        check_sizes("dense-bf16", self.rows, self.cols, x, m, y);
        #[cfg(target_arch = "x86_64")]
        if has_avx512() {
            // SAFETY: AVX-512 checked; sizes checked; rows written disjointly.
            drive(self.rows, m, self.nbytes(), 1, y, |r0, r1, out| unsafe {
                self.block_avx512(r0, r1, x, m, out)
            });
            return;
        }
        let c = self.cols;
        drive(self.rows, m, self.nbytes(), 1, y, |r0, r1, out| {
            for r in r0..r1 {
                let w = &self.data[r * c..(r + 1) * c];
                for i in 0..m {
                    let s: f32 = w
                        .iter()
                        .zip(&x[i * c..(i + 1) * c])
                        .map(|(a, b)| a.to_f32() * b)
                        .sum();
                    // SAFETY: r in this block's range, i < m.
                    unsafe { out.put(i, r, s) };
                }
            }
        });
    }
    fn matmul_naive(&self, x: &[f32], m: usize, y: &mut [f32]) {
        check_sizes("dense-bf16", self.rows, self.cols, x, m, y);
        naive_rows(self.rows, self.cols, x, m, y, |r, k| {
            self.data[r * self.cols + k].to_f64()
        });
    }
    fn to_tensors(&self, name: &str) -> Vec<RawTensor> {
        let bits: Vec<u16> = self.data.iter().map(|v| v.to_bits()).collect();
        vec![
            shape_tensor(name, &[self.rows, self.cols]),
            RawTensor::u16(format!("{name}.values"), Dtype::Bf16, &bits),
        ]
    }
}

/// Dense int8 weights with a per-row f32 scale: `W[r, k] = q[r, k] · scale[r]`.
#[derive(Clone, Debug, PartialEq)]
pub struct DenseI8 {
    rows: usize,
    cols: usize,
    q: Vec<i8>,
    scales: Vec<f32>,
}

impl DenseI8 {
    /// Symmetric per-row quantization (scale = max|w| / 127).
    pub fn from_dense(w: &[f32], rows: usize, cols: usize) -> Result<Self> {
        check_dense("dense-i8", w, rows, cols)?;
        let mut q = Vec::with_capacity(w.len());
        let mut scales = Vec::with_capacity(rows);
        for r in 0..rows {
            let (qr, s) = quantize_row(&w[r * cols..(r + 1) * cols]);
            q.extend(qr);
            scales.push(s);
        }
        Ok(DenseI8 {
            rows,
            cols,
            q,
            scales,
        })
    }
    pub fn from_tensors(name: &str, tensors: &[RawTensor]) -> Result<Self> {
        const K: &str = "dense-i8";
        let s = read_shape(tensors, name, 2, K)?;
        let (rows, cols) = (s[0], s[1]);
        let v = find(tensors, name, "values", Dtype::I8, K)?;
        expect_len(v, rows.checked_mul(cols), K)?;
        let sc = find(tensors, name, "scales", Dtype::F32, K)?;
        expect_len(sc, Some(rows), K)?;
        Ok(DenseI8 {
            rows,
            cols,
            q: v.data.iter().map(|&b| b as i8).collect(),
            scales: read_f32(sc),
        })
    }
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512vl,avx512bw,fma")]
    unsafe fn block_avx512(&self, r0: usize, r1: usize, x: &[f32], m: usize, out: Out) {
        #[inline(always)]
        unsafe fn widen(v: __m128i) -> __m512 {
            _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(v))
        }
        let n = self.cols;
        for r in r0..r1 {
            let w = self.q.as_ptr().add(r * n);
            for i in 0..m {
                let x = x.as_ptr().add(i * n);
                let mut a = [_mm512_setzero_ps(); 4];
                let mut k = 0;
                while k + 64 <= n {
                    for j in 0..4 {
                        let wv = widen(_mm_loadu_si128(w.add(k + 16 * j) as *const __m128i));
                        a[j] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x.add(k + 16 * j)), a[j]);
                    }
                    k += 64;
                }
                while k < n {
                    let mk: __mmask16 = if n - k >= 16 {
                        0xffff
                    } else {
                        (1u16 << (n - k)) - 1
                    };
                    let wv = widen(_mm_maskz_loadu_epi8(mk, w.add(k)));
                    a[0] = _mm512_fmadd_ps(wv, _mm512_maskz_loadu_ps(mk, x.add(k)), a[0]);
                    k += 16;
                }
                let s = _mm512_add_ps(_mm512_add_ps(a[0], a[1]), _mm512_add_ps(a[2], a[3]));
                out.put(i, r, _mm512_reduce_add_ps(s) * self.scales[r]);
            }
        }
    }
}

impl WeightFormat for DenseI8 {
    fn kind(&self) -> &'static str {
        "dense-i8"
    }
    fn rows(&self) -> usize {
        self.rows
    }
    fn cols(&self) -> usize {
        self.cols
    }
    fn nbytes(&self) -> usize {
        self.q.len() + self.scales.len() * 4
    }
    fn stored(&self) -> usize {
        self.q.len()
    }
    fn to_dense(&self) -> Vec<f32> {
        let c = self.cols;
        self.q
            .iter()
            .enumerate()
            .map(|(k, &q)| q as f32 * self.scales[k / c])
            .collect()
    }
    fn matmul(&self, x: &[f32], m: usize, y: &mut [f32]) {
        check_sizes("dense-i8", self.rows, self.cols, x, m, y);
        #[cfg(target_arch = "x86_64")]
        if has_avx512() {
            // SAFETY: AVX-512 checked; sizes checked; rows written disjointly.
            drive(self.rows, m, self.nbytes(), 1, y, |r0, r1, out| unsafe {
                self.block_avx512(r0, r1, x, m, out)
            });
            return;
        }
        let c = self.cols;
        drive(self.rows, m, self.nbytes(), 1, y, |r0, r1, out| {
            for r in r0..r1 {
                let w = &self.q[r * c..(r + 1) * c];
                for i in 0..m {
                    let s: f32 = w
                        .iter()
                        .zip(&x[i * c..(i + 1) * c])
                        .map(|(&a, b)| a as f32 * b)
                        .sum();
                    // SAFETY: r in this block's range, i < m.
                    unsafe { out.put(i, r, s * self.scales[r]) };
                }
            }
        });
    }
    fn matmul_naive(&self, x: &[f32], m: usize, y: &mut [f32]) {
        check_sizes("dense-i8", self.rows, self.cols, x, m, y);
        naive_rows(self.rows, self.cols, x, m, y, |r, k| {
            self.q[r * self.cols + k] as f64 * self.scales[r] as f64
        });
    }
    fn to_tensors(&self, name: &str) -> Vec<RawTensor> {
        vec![
            shape_tensor(name, &[self.rows, self.cols]),
            RawTensor::bytes(
                format!("{name}.values"),
                Dtype::I8,
                self.q.iter().map(|&v| v as u8).collect(),
            ),
            RawTensor::f32(format!("{name}.scales"), &self.scales),
        ]
    }
}
