//! Compressed sparse rows with u16 column indices (for `cols ≤ 65536`), for low densities.

use super::*;
#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// CSR matrix: `row_ptr[rows + 1]`, per nonzero a u16 column and an f32 value.
#[derive(Clone, Debug, PartialEq)]
pub struct Csr {
    rows: usize,
    cols: usize,
    row_ptr: Vec<usize>,
    col_idx: Vec<u16>,
    values: Vec<f32>,
}

impl Csr {
    /// Errors when `cols > 65536` (indices would not fit in u16).
    pub fn from_dense(w: &[f32], rows: usize, cols: usize) -> Result<Self> {
        check_dense("csr", w, rows, cols)?;
        if cols > 1 << 16 {
            return Err(Error::Invalid(format!(
                "csr: {cols} columns do not fit u16 indices (max 65536)"
            )));
        }
        let mut row_ptr = vec![0];
        let (mut col_idx, mut values) = (Vec::new(), Vec::new());
        for r in 0..rows {
            for k in 0..cols {
                let v = w[r * cols + k];
                if v != 0.0 {
                    col_idx.push(k as u16);
                    values.push(v);
                }
            }
            row_ptr.push(values.len());
        }
        Ok(Csr {
            rows,
            cols,
            row_ptr,
            col_idx,
            values,
        })
    }
    pub fn nnz(&self) -> usize {
        self.values.len()
    }
    pub fn from_tensors(name: &str, tensors: &[RawTensor]) -> Result<Self> {
        const K: &str = "csr";
        let s = read_shape(tensors, name, 2, K)?;
        let (rows, cols) = (s[0], s[1]);
        if cols > 1 << 16 {
            return Err(ferr(
                format!("{name}.shape"),
                K,
                format!("{cols} columns exceed u16 indices"),
            ));
        }
        let pt = find(tensors, name, "row_ptr", Dtype::U64, K)?;
        expect_len(pt, rows.checked_add(1), K)?;
        let ct = find(tensors, name, "col_idx", Dtype::U16, K)?;
        let vt = find(tensors, name, "values", Dtype::F32, K)?;
        let nnz = vt.data.len() / 4;
        expect_len(ct, Some(nnz), K)?;
        let ptr64 = read_u64(pt);
        if ptr64[0] != 0 || ptr64[rows] != nnz as u64 {
            return Err(ferr(
                pt.name.clone(),
                K,
                format!("must start at 0 and end at nnz = {nnz}"),
            ));
        }
        if let Some(r) = ptr64.windows(2).position(|w| w[1] < w[0]) {
            return Err(ferr(pt.name.clone(), K, format!("decreases at row {r}")));
        }
        let row_ptr: Vec<usize> = ptr64.into_iter().map(|p| p as usize).collect();
        let col_idx = read_u16(ct);
        for r in 0..rows {
            let c = &col_idx[row_ptr[r]..row_ptr[r + 1]];
            if let Some(&bad) = c.iter().find(|&&k| k as usize >= cols) {
                return Err(ferr(
                    ct.name.clone(),
                    K,
                    format!("row {r} has column {bad} ≥ {cols}"),
                ));
            }
            if c.windows(2).any(|w| w[1] <= w[0]) {
                return Err(ferr(
                    ct.name.clone(),
                    K,
                    format!("row {r} columns are not strictly increasing"),
                ));
            }
        }
        Ok(Csr {
            rows,
            cols,
            row_ptr,
            col_idx,
            values: read_f32(vt),
        })
    }
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512vl,avx512bw,fma")]
    unsafe fn block_avx512(&self, r0: usize, r1: usize, x: &[f32], m: usize, out: Out) {
        for r in r0..r1 {
            let (s, e) = (self.row_ptr[r], self.row_ptr[r + 1]);
            for i in 0..m {
                let xp = x.as_ptr().add(i * self.cols);
                let mut a0 = _mm512_setzero_ps();
                let mut a1 = _mm512_setzero_ps();
                let mut j = s;
                while j + 32 <= e {
                    let i0 = _mm512_cvtepu16_epi32(_mm256_loadu_si256(
                        self.col_idx.as_ptr().add(j) as *const __m256i,
                    ));
                    let i1 = _mm512_cvtepu16_epi32(_mm256_loadu_si256(
                        self.col_idx.as_ptr().add(j + 16) as *const __m256i,
                    ));
                    let g0 = _mm512_i32gather_ps::<4>(i0, xp);
                    let g1 = _mm512_i32gather_ps::<4>(i1, xp);
                    a0 = _mm512_fmadd_ps(_mm512_loadu_ps(self.values.as_ptr().add(j)), g0, a0);
                    a1 = _mm512_fmadd_ps(_mm512_loadu_ps(self.values.as_ptr().add(j + 16)), g1, a1);
                    j += 32;
                }
                while j < e {
                    let mk: __mmask16 = if e - j >= 16 {
                        0xffff
                    } else {
                        (1u16 << (e - j)) - 1
                    };
                    let idx = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(
                        mk,
                        self.col_idx.as_ptr().add(j) as *const i16,
                    ));
                    let g = _mm512_mask_i32gather_ps::<4>(_mm512_setzero_ps(), mk, idx, xp);
                    a0 = _mm512_fmadd_ps(
                        _mm512_maskz_loadu_ps(mk, self.values.as_ptr().add(j)),
                        g,
                        a0,
                    );
                    j += 16;
                }
                out.put(i, r, _mm512_reduce_add_ps(_mm512_add_ps(a0, a1)));
            }
        }
    }
}

impl WeightFormat for Csr {
    fn kind(&self) -> &'static str {
        "csr"
    }
    fn rows(&self) -> usize {
        self.rows
    }
    fn cols(&self) -> usize {
        self.cols
    }
    fn nbytes(&self) -> usize {
        self.values.len() * 6 + self.row_ptr.len() * 8
    }
    fn stored(&self) -> usize {
        self.values.len()
    }
    fn to_dense(&self) -> Vec<f32> {
        let mut d = vec![0f32; self.rows * self.cols];
        for r in 0..self.rows {
            for j in self.row_ptr[r]..self.row_ptr[r + 1] {
                d[r * self.cols + self.col_idx[j] as usize] = self.values[j];
            }
        }
        d
    }
    fn matmul(&self, x: &[f32], m: usize, y: &mut [f32]) {
        check_sizes("csr", self.rows, self.cols, x, m, y);
        #[cfg(target_arch = "x86_64")]
        if has_avx512() {
            // SAFETY: AVX-512 checked; sizes checked; indices validated < cols; disjoint rows.
            drive(self.rows, m, self.nbytes(), 1, y, |r0, r1, out| unsafe {
                self.block_avx512(r0, r1, x, m, out)
            });
            return;
        }
        drive(self.rows, m, self.nbytes(), 1, y, |r0, r1, out| {
            for r in r0..r1 {
                let rg = self.row_ptr[r]..self.row_ptr[r + 1];
                for i in 0..m {
                    let xi = &x[i * self.cols..];
                    let s: f32 = self.col_idx[rg.clone()]
                        .iter()
                        .zip(&self.values[rg.clone()])
                        .map(|(&k, v)| v * xi[k as usize])
                        .sum();
                    // SAFETY: r in this block's range, i < m.
                    unsafe { out.put(i, r, s) };
                }
            }
        });
    }
    fn matmul_naive(&self, x: &[f32], m: usize, y: &mut [f32]) {
        check_sizes("csr", self.rows, self.cols, x, m, y);
        for i in 0..m {
            for r in 0..self.rows {
                let mut s = 0f64;
                for j in self.row_ptr[r]..self.row_ptr[r + 1] {
                    s += self.values[j] as f64 * x[i * self.cols + self.col_idx[j] as usize] as f64;
                }
                y[i * self.rows + r] = s as f32;
            }
        }
    }
    fn to_tensors(&self, name: &str) -> Vec<RawTensor> {
        let ptr: Vec<u64> = self.row_ptr.iter().map(|&p| p as u64).collect();
        vec![
            shape_tensor(name, &[self.rows, self.cols]),
            RawTensor::u64(format!("{name}.row_ptr"), &ptr),
            RawTensor::u16(format!("{name}.col_idx"), Dtype::U16, &self.col_idx),
            RawTensor::f32(format!("{name}.values"), &self.values),
        ]
    }
}
