//! Compressed sparse rows with u16 column indices (for `cols ≤ 65536`), for low densities:
//! 6 bytes per nonzero with f32 values (4 with bf16, 3 with int8), so it beats the bitmask only
//! below about 6% density for f32, but needs no work per zero.

#[cfg(target_arch = "x86_64")]
use super::avx2;
#[cfg(target_arch = "x86_64")]
use super::elem::first_lanes;
use super::elem::{Elem, Values};
use super::sparse::{self, Entries};
use super::*;
#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// CSR matrix: `row_ptr[rows + 1]`, per nonzero a u16 column and a value of type `E`.
#[derive(Clone, Debug, PartialEq)]
pub struct CsrOf<E: Elem> {
    rows: usize,
    cols: usize,
    row_ptr: Vec<usize>,
    col_idx: Vec<u16>,
    vals: Values<E>,
}

/// CSR with f32 values.
pub type Csr = CsrOf<f32>;
/// CSR with bf16 values.
pub type CsrBf16 = CsrOf<half::bf16>;
/// CSR with int8 values and a per-row f32 scale.
pub type CsrI8 = CsrOf<i8>;

impl<E: Elem> CsrOf<E> {
    const KIND: &'static str = match E::DTYPE {
        Dtype::F32 => "csr",
        Dtype::F16 => "csr-f16",
        Dtype::Bf16 => "csr-bf16",
        _ => "csr-i8",
    };
    /// Errors when `cols > 65536` (indices would not fit in u16).
    pub fn from_dense(w: &[f32], rows: usize, cols: usize) -> Result<Self> {
        check_dense(Self::KIND, w, rows, cols)?;
        if cols > 1 << 16 {
            return Err(Error::Invalid(format!(
                "csr: {cols} columns do not fit u16 indices (max 65536)"
            )));
        }
        let mut row_ptr = vec![0];
        let mut col_idx = Vec::new();
        for r in 0..rows {
            for k in 0..cols {
                if w[r * cols + k] != 0.0 {
                    col_idx.push(k as u16);
                }
            }
            row_ptr.push(col_idx.len());
        }
        Ok(CsrOf {
            rows,
            cols,
            row_ptr,
            col_idx,
            vals: Values::encode_matrix(w, rows, cols, |v| v != 0.0),
        })
    }
    pub fn nnz(&self) -> usize {
        self.col_idx.len()
    }
    pub fn from_tensors(name: &str, tensors: &[RawTensor]) -> Result<Self> {
        let (rows, cols) = read_dims(tensors, name, Self::KIND)?;
        if cols > 1 << 16 {
            return Err(ferr(
                format!("{name}.shape"),
                Self::KIND,
                format!("{cols} columns exceed u16 indices"),
            ));
        }
        let pt = find(tensors, name, "row_ptr", Dtype::U64, Self::KIND)?;
        expect_len(pt, rows.checked_add(1), Self::KIND)?;
        let ct = find(tensors, name, "col_idx", Dtype::U16, Self::KIND)?;
        let nnz = ct.data.len() / 2;
        let vals = Values::from_tensors(tensors, name, rows, Some(nnz), Self::KIND, "col_idx")?;
        let ptr64 = read_u64(pt);
        if ptr64[0] != 0 || ptr64[rows] != nnz as u64 {
            return Err(ferr(
                pt.name.clone(),
                Self::KIND,
                format!("must start at 0 and end at nnz = {nnz}"),
            ));
        }
        if let Some(r) = ptr64.windows(2).position(|w| w[1] < w[0]) {
            return Err(ferr(
                pt.name.clone(),
                Self::KIND,
                format!("decreases at row {r}"),
            ));
        }
        let row_ptr: Vec<usize> = ptr64.into_iter().map(|p| p as usize).collect();
        let col_idx = read_u16(ct);
        for r in 0..rows {
            let c = &col_idx[row_ptr[r]..row_ptr[r + 1]];
            if let Some(&bad) = c.iter().find(|&&k| k as usize >= cols) {
                return Err(ferr(
                    ct.name.clone(),
                    Self::KIND,
                    format!("row {r} has column {bad} ≥ {cols}"),
                ));
            }
            if c.windows(2).any(|w| w[1] <= w[0]) {
                return Err(ferr(
                    ct.name.clone(),
                    Self::KIND,
                    format!("row {r} columns are not strictly increasing"),
                ));
            }
        }
        Ok(CsrOf {
            rows,
            cols,
            row_ptr,
            col_idx,
            vals,
        })
    }
    /// # Safety
    /// AVX-512 available; row pointers and column indices validated.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512vl,avx512bw,fma,popcnt,bmi1,bmi2")]
    unsafe fn block_avx512(&self, r0: usize, r1: usize, x: &[f32], m: usize, out: Out) {
        let (ci, vp) = (self.col_idx.as_ptr(), self.vals.v.as_ptr());
        for r in r0..r1 {
            let (s, e) = (self.row_ptr[r], self.row_ptr[r + 1]);
            for i in 0..m {
                let xp = x.as_ptr().add(i * self.cols);
                let mut a0 = _mm512_setzero_ps();
                let mut a1 = _mm512_setzero_ps();
                let mut j = s;
                while j + 32 <= e {
                    prefetch_ahead(vp.add(j), 2);
                    prefetch_ahead(ci.add(j), 1);
                    let i0 = _mm512_cvtepu16_epi32(_mm256_loadu_si256(ci.add(j) as *const __m256i));
                    let i1 =
                        _mm512_cvtepu16_epi32(_mm256_loadu_si256(ci.add(j + 16) as *const __m256i));
                    let g0 = _mm512_i32gather_ps::<4>(i0, xp);
                    let g1 = _mm512_i32gather_ps::<4>(i1, xp);
                    a0 = _mm512_fmadd_ps(E::load16(vp.add(j)), g0, a0);
                    a1 = _mm512_fmadd_ps(E::load16(vp.add(j + 16)), g1, a1);
                    j += 32;
                }
                while j < e {
                    let mk = first_lanes(e - j);
                    let idx = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(
                        mk,
                        ci.add(j) as *const i16,
                    ));
                    let g = _mm512_mask_i32gather_ps::<4>(_mm512_setzero_ps(), mk, idx, xp);
                    a0 = _mm512_fmadd_ps(E::load_first(e - j, vp.add(j)), g, a0);
                    j += 16;
                }
                let sum = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
                out.put(i, r, sum * self.vals.scale(r));
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
impl<E: Elem> CsrOf<E> {
    /// Rows `r0..r1` of the product, AVX2: 8 inputs gathered at a time (`vgatherdps`), two
    /// accumulators; the last `nnz % 8` of a row scalar.
    ///
    /// # Safety
    /// AVX2 + FMA available; row pointers and column indices validated; `out` owns these rows.
    #[target_feature(enable = "avx2,fma,f16c,popcnt,bmi1,bmi2")]
    unsafe fn block_avx2(&self, r0: usize, r1: usize, x: &[f32], m: usize, out: Out) {
        let (ci, vp) = (self.col_idx.as_ptr(), self.vals.v.as_ptr());
        for r in r0..r1 {
            let (s, e) = (self.row_ptr[r], self.row_ptr[r + 1]);
            for i in 0..m {
                let xp = x.as_ptr().add(i * self.cols);
                let mut a = [_mm256_setzero_ps(); 2];
                let mut j = s;
                while j + 16 <= e {
                    prefetch_ahead(vp.add(j), 1);
                    prefetch_ahead(ci.add(j), 1);
                    for (h, acc) in a.iter_mut().enumerate() {
                        let o = j + 8 * h;
                        let idx =
                            _mm256_cvtepu16_epi32(_mm_loadu_si128(ci.add(o) as *const __m128i));
                        let g = _mm256_i32gather_ps::<4>(xp, idx);
                        *acc = _mm256_fmadd_ps(E::load8(vp.add(o)), g, *acc);
                    }
                    j += 16;
                }
                let mut sum = avx2::hsum(_mm256_add_ps(a[0], a[1]));
                while j < e {
                    sum += (*vp.add(j)).to_f32() * *xp.add(*ci.add(j) as usize);
                    j += 1;
                }
                out.put(i, r, sum * self.vals.scale(r));
            }
        }
    }
}

impl<E: Elem> CsrOf<E> {
    /// Rows `r0..r1` decoded to dense f32 (the prefill path): 16 values at a time scattered
    /// to their columns of a zeroed row.
    ///
    /// # Safety
    /// AVX-512 (see [`avx512_active`]); indices validated; `out` holds `(r1 − r0) · cols` values.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512vl,avx512bw,fma,popcnt,bmi1,bmi2")]
    unsafe fn decode_avx512(&self, r0: usize, r1: usize, out: &mut [f32]) {
        let c = self.cols;
        out[..(r1 - r0) * c].fill(0.0);
        for r in r0..r1 {
            let (a, b) = (self.row_ptr[r], self.row_ptr[r + 1]);
            let dst = out.as_mut_ptr().add((r - r0) * c);
            let scale = _mm512_set1_ps(self.vals.scale(r));
            let mut j = a;
            while j < b {
                let n = (b - j).min(16);
                let k = first_lanes(n);
                let idx = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(
                    k,
                    self.col_idx.as_ptr().add(j) as *const i16,
                ));
                let mut v = E::load_first(n, self.vals.v.as_ptr().add(j));
                if E::SCALED {
                    v = _mm512_mul_ps(v, scale);
                }
                _mm512_mask_i32scatter_ps::<4>(dst.cast(), k, idx, v);
                j += n;
            }
        }
    }
}

impl<E: Elem> Entries for CsrOf<E> {
    type E = E;
    fn vals(&self) -> &Values<E> {
        &self.vals
    }
    fn each(&self, r: usize, mut f: impl FnMut(usize, usize)) {
        for j in self.row_ptr[r]..self.row_ptr[r + 1] {
            f(self.col_idx[j] as usize, j);
        }
    }
}

impl<E: Elem> WeightFormat for CsrOf<E> {
    dims!();
    fn nbytes(&self) -> usize {
        self.vals.nbytes() + self.col_idx.len() * 2 + self.row_ptr.len() * 8
    }
    fn stored(&self) -> usize {
        self.col_idx.len()
    }
    fn decode_rows(&self, r0: usize, r1: usize, out: &mut [f32]) {
        // SAFETY (decoder): AVX-512 checked; gets `(r1 − r0) · cols` values; indices validated
        // (< cols) on construction.
        #[cfg(target_arch = "x86_64")]
        let fast =
            avx512_active().then_some(|out: &mut [f32]| unsafe { self.decode_avx512(r0, r1, out) });
        #[cfg(not(target_arch = "x86_64"))]
        let fast: Option<fn(&mut [f32])> = None;
        sparse::decode_rows(self, r0, r1, out, fast)
    }
    fn matmul_add(&self, x: &[f32], m: usize, y: &mut [f32], acc: bool) {
        // SAFETY (kernel): the ISA checked; row pointers and indices validated (< cols); rows
        // written disjointly.
        #[cfg(target_arch = "x86_64")]
        let fast = unsafe {
            sparse::x86_kernel(self, x86_simd(), x, m, Self::block_avx2, Self::block_avx512)
        };
        #[cfg(not(target_arch = "x86_64"))]
        let fast: Option<fn(usize, usize, Out)> = None;
        sparse::product(self, x, m, y, acc, 1, fast)
    }
    fn matmul_naive(&self, x: &[f32], m: usize, y: &mut [f32]) {
        sparse::naive(self, x, m, y)
    }
    fn to_tensors(&self, name: &str) -> Vec<RawTensor> {
        let ptr: Vec<u64> = self.row_ptr.iter().map(|&p| p as u64).collect();
        let mut t = vec![
            shape_tensor(name, &[self.rows, self.cols]),
            RawTensor::u64(format!("{name}.row_ptr"), &ptr),
            RawTensor::u16(format!("{name}.col_idx"), Dtype::U16, &self.col_idx),
        ];
        t.extend(self.vals.tensors(name));
        t
    }
}
