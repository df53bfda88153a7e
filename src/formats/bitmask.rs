//! Sparse-bitmask format (compressed-tensors' `sparse-bitmask`): per row a bitmask of nonzeros
//! in u64 words (bit `k % 64` of word `k / 64` is column `k`), plus the nonzeros packed in row
//! order. [`BitmaskI8`] stores the nonzeros as int8 with a per-row f32 scale.

use super::*;
#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// Mask words and row offsets (prefix popcounts) of a dense matrix.
fn build_mask(w: &[f32], rows: usize, cols: usize) -> (Vec<u64>, Vec<usize>) {
    let wpr = cols.div_ceil(64);
    let mut mask = vec![0u64; rows * wpr];
    let mut off = Vec::with_capacity(rows + 1);
    off.push(0);
    let mut n = 0;
    for r in 0..rows {
        for k in 0..cols {
            if w[r * cols + k] != 0.0 {
                mask[r * wpr + k / 64] |= 1 << (k % 64);
                n += 1;
            }
        }
        off.push(n);
    }
    (mask, off)
}

/// Validates a mask tensor for `rows × cols` and returns its row offsets.
fn check_mask(
    t: &RawTensor,
    rows: usize,
    cols: usize,
    kind: &'static str,
) -> Result<(Vec<u64>, Vec<usize>)> {
    let wpr = cols.div_ceil(64);
    expect_len(t, rows.checked_mul(wpr), kind)?;
    let mask = read_u64(t);
    let tail: u64 = if cols % 64 == 0 {
        0
    } else {
        !0u64 << (cols % 64)
    };
    let mut off = Vec::with_capacity(rows + 1);
    off.push(0usize);
    let mut n = 0usize;
    for r in 0..rows {
        let words = &mask[r * wpr..(r + 1) * wpr];
        if let Some(&last) = words.last() {
            if last & tail != 0 {
                return Err(ferr(
                    t.name.clone(),
                    kind,
                    format!("row {r} has bits set past column {cols}"),
                ));
            }
        }
        n += words.iter().map(|w| w.count_ones() as usize).sum::<usize>();
        off.push(n);
    }
    Ok((mask, off))
}

/// Sparse bitmask matrix with f32 nonzeros.
#[derive(Clone, Debug, PartialEq)]
pub struct Bitmask {
    rows: usize,
    cols: usize,
    mask: Vec<u64>,
    off: Vec<usize>,
    values: Vec<f32>,
}

impl Bitmask {
    pub fn from_dense(w: &[f32], rows: usize, cols: usize) -> Result<Self> {
        check_dense("bitmask", w, rows, cols)?;
        let (mask, off) = build_mask(w, rows, cols);
        let values = w.iter().copied().filter(|&v| v != 0.0).collect();
        Ok(Bitmask {
            rows,
            cols,
            mask,
            off,
            values,
        })
    }
    /// Number of nonzeros.
    pub fn nnz(&self) -> usize {
        self.values.len()
    }
    pub fn from_tensors(name: &str, tensors: &[RawTensor]) -> Result<Self> {
        const K: &str = "bitmask";
        let s = read_shape(tensors, name, 2, K)?;
        let (rows, cols) = (s[0], s[1]);
        let mt = find(tensors, name, "bitmask", Dtype::U64, K)?;
        let (mask, off) = check_mask(mt, rows, cols, K)?;
        let v = find(tensors, name, "values", Dtype::F32, K)?;
        expect_len(v, Some(off[rows]), K).map_err(|_| {
            ferr(
                v.name.clone(),
                K,
                format!(
                    "has {} values but the bitmask popcount is {}",
                    v.data.len() / 4,
                    off[rows]
                ),
            )
        })?;
        Ok(Bitmask {
            rows,
            cols,
            mask,
            off,
            values: read_f32(v),
        })
    }
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512vl,avx512bw,fma")]
    unsafe fn block_avx512(&self, r0: usize, r1: usize, x: &[f32], m: usize, out: Out) {
        let wpr = self.cols.div_ceil(64);
        for r in r0..r1 {
            let words = self.mask.as_ptr().add(r * wpr);
            for i in 0..m {
                let xp = x.as_ptr().add(i * self.cols);
                let mut vp = self.values.as_ptr().add(self.off[r]);
                let (mut a0, mut a1, mut a2, mut a3) = (
                    _mm512_setzero_ps(),
                    _mm512_setzero_ps(),
                    _mm512_setzero_ps(),
                    _mm512_setzero_ps(),
                );
                for w in 0..wpr {
                    let word = *words.add(w);
                    let base = xp.wrapping_add(w * 64);
                    // Lanes outside a mask are neither read nor faulted; masks have no bits past `cols`.
                    let (k0, k1, k2, k3) = (
                        word as __mmask16,
                        (word >> 16) as __mmask16,
                        (word >> 32) as __mmask16,
                        (word >> 48) as __mmask16,
                    );
                    let p1 = vp.wrapping_add(k0.count_ones() as usize);
                    let p2 = p1.wrapping_add(k1.count_ones() as usize);
                    let p3 = p2.wrapping_add(k2.count_ones() as usize);
                    a0 = _mm512_fmadd_ps(
                        _mm512_maskz_expandloadu_ps(k0, vp),
                        _mm512_maskz_loadu_ps(k0, base),
                        a0,
                    );
                    a1 = _mm512_fmadd_ps(
                        _mm512_maskz_expandloadu_ps(k1, p1),
                        _mm512_maskz_loadu_ps(k1, base.wrapping_add(16)),
                        a1,
                    );
                    a2 = _mm512_fmadd_ps(
                        _mm512_maskz_expandloadu_ps(k2, p2),
                        _mm512_maskz_loadu_ps(k2, base.wrapping_add(32)),
                        a2,
                    );
                    a3 = _mm512_fmadd_ps(
                        _mm512_maskz_expandloadu_ps(k3, p3),
                        _mm512_maskz_loadu_ps(k3, base.wrapping_add(48)),
                        a3,
                    );
                    vp = vp.wrapping_add(word.count_ones() as usize);
                }
                let s = _mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3));
                out.put(i, r, _mm512_reduce_add_ps(s));
            }
        }
    }
    fn row_iter(&self, r: usize) -> impl Iterator<Item = (usize, usize)> + '_ {
        iter_bits(&self.mask, self.cols, r).zip(self.off[r]..self.off[r + 1])
    }
}

/// Set columns of row `r`, ascending.
fn iter_bits(mask: &[u64], cols: usize, r: usize) -> impl Iterator<Item = usize> + '_ {
    let wpr = cols.div_ceil(64);
    mask[r * wpr..(r + 1) * wpr]
        .iter()
        .enumerate()
        .flat_map(|(w, &word)| {
            let mut b = word;
            std::iter::from_fn(move || {
                if b == 0 {
                    return None;
                }
                let t = b.trailing_zeros() as usize;
                b &= b - 1;
                Some(w * 64 + t)
            })
        })
}

impl WeightFormat for Bitmask {
    fn kind(&self) -> &'static str {
        "bitmask"
    }
    fn rows(&self) -> usize {
        self.rows
    }
    fn cols(&self) -> usize {
        self.cols
    }
    fn nbytes(&self) -> usize {
        self.values.len() * 4 + self.mask.len() * 8
    }
    fn stored(&self) -> usize {
        self.values.len()
    }
    fn to_dense(&self) -> Vec<f32> {
        let mut d = vec![0f32; self.rows * self.cols];
        for r in 0..self.rows {
            for (k, j) in self.row_iter(r) {
                d[r * self.cols + k] = self.values[j];
            }
        }
        d
    }
    fn matmul(&self, x: &[f32], m: usize, y: &mut [f32]) {
        check_sizes("bitmask", self.rows, self.cols, x, m, y);
        #[cfg(target_arch = "x86_64")]
        if has_avx512() {
            // SAFETY: AVX-512 checked; sizes checked; masks validated; rows written disjointly.
            drive(self.rows, m, self.nbytes(), 1, y, |r0, r1, out| unsafe {
                self.block_avx512(r0, r1, x, m, out)
            });
            return;
        }
        drive(self.rows, m, self.nbytes(), 1, y, |r0, r1, out| {
            for r in r0..r1 {
                for i in 0..m {
                    let xi = &x[i * self.cols..];
                    let s: f32 = self.row_iter(r).map(|(k, j)| self.values[j] * xi[k]).sum();
                    // SAFETY: r in this block's range, i < m.
                    unsafe { out.put(i, r, s) };
                }
            }
        });
    }
    fn matmul_naive(&self, x: &[f32], m: usize, y: &mut [f32]) {
        check_sizes("bitmask", self.rows, self.cols, x, m, y);
        for i in 0..m {
            for r in 0..self.rows {
                let s: f64 = self
                    .row_iter(r)
                    .map(|(k, j)| self.values[j] as f64 * x[i * self.cols + k] as f64)
                    .sum();
                y[i * self.rows + r] = s as f32;
            }
        }
    }
    fn to_tensors(&self, name: &str) -> Vec<RawTensor> {
        vec![
            shape_tensor(name, &[self.rows, self.cols]),
            RawTensor::u64(format!("{name}.bitmask"), &self.mask),
            RawTensor::f32(format!("{name}.values"), &self.values),
        ]
    }
}

/// Sparse bitmask matrix with int8 nonzeros and a per-row f32 scale (pruning + quantization):
/// `W[r, k] = q · scale[r]` for each set bit.
#[derive(Clone, Debug, PartialEq)]
pub struct BitmaskI8 {
    rows: usize,
    cols: usize,
    mask: Vec<u64>,
    off: Vec<usize>,
    q: Vec<i8>,
    scales: Vec<f32>,
}

impl BitmaskI8 {
    /// Keeps the nonzero pattern of `w` and quantizes each row's nonzeros symmetrically
    /// (scale = max|w| / 127). A nonzero that rounds to 0 stays in the mask with value 0.
    pub fn from_dense(w: &[f32], rows: usize, cols: usize) -> Result<Self> {
        check_dense("bitmask-i8", w, rows, cols)?;
        let (mask, off) = build_mask(w, rows, cols);
        let mut q = Vec::with_capacity(off[rows]);
        let mut scales = Vec::with_capacity(rows);
        for r in 0..rows {
            let nz: Vec<f32> = w[r * cols..(r + 1) * cols]
                .iter()
                .copied()
                .filter(|&v| v != 0.0)
                .collect();
            let (qr, s) = quantize_row(&nz);
            q.extend(qr);
            scales.push(s);
        }
        Ok(BitmaskI8 {
            rows,
            cols,
            mask,
            off,
            q,
            scales,
        })
    }
    pub fn nnz(&self) -> usize {
        self.q.len()
    }
    pub fn from_tensors(name: &str, tensors: &[RawTensor]) -> Result<Self> {
        const K: &str = "bitmask-i8";
        let s = read_shape(tensors, name, 2, K)?;
        let (rows, cols) = (s[0], s[1]);
        let mt = find(tensors, name, "bitmask", Dtype::U64, K)?;
        let (mask, off) = check_mask(mt, rows, cols, K)?;
        let v = find(tensors, name, "values", Dtype::I8, K)?;
        expect_len(v, Some(off[rows]), K).map_err(|_| {
            ferr(
                v.name.clone(),
                K,
                format!(
                    "has {} values but the bitmask popcount is {}",
                    v.data.len(),
                    off[rows]
                ),
            )
        })?;
        let sc = find(tensors, name, "scales", Dtype::F32, K)?;
        expect_len(sc, Some(rows), K)?;
        Ok(BitmaskI8 {
            rows,
            cols,
            mask,
            off,
            q: v.data.iter().map(|&b| b as i8).collect(),
            scales: read_f32(sc),
        })
    }
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512vl,avx512bw,fma")]
    unsafe fn block_avx512(&self, r0: usize, r1: usize, x: &[f32], m: usize, out: Out) {
        let wpr = self.cols.div_ceil(64);
        for r in r0..r1 {
            let words = self.mask.as_ptr().add(r * wpr);
            for i in 0..m {
                let xp = x.as_ptr().add(i * self.cols);
                let mut vp = self.q.as_ptr().add(self.off[r]);
                let mut a = [_mm512_setzero_ps(); 4];
                for w in 0..wpr {
                    let word = *words.add(w);
                    let base = xp.wrapping_add(w * 64);
                    for q in 0..4 {
                        let k = (word >> (16 * q)) as __mmask16;
                        let cnt = k.count_ones();
                        // Reads exactly `cnt` bytes (the masked load suppresses the rest).
                        let lm: __mmask16 = ((1u32 << cnt) - 1) as __mmask16;
                        let packed =
                            _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(lm, vp)));
                        let wv = _mm512_maskz_expand_ps(k, packed);
                        let xv = _mm512_maskz_loadu_ps(k, base.wrapping_add(16 * q));
                        a[q] = _mm512_fmadd_ps(wv, xv, a[q]);
                        vp = vp.wrapping_add(cnt as usize);
                    }
                }
                let s = _mm512_add_ps(_mm512_add_ps(a[0], a[1]), _mm512_add_ps(a[2], a[3]));
                out.put(i, r, _mm512_reduce_add_ps(s) * self.scales[r]);
            }
        }
    }
    fn row_iter(&self, r: usize) -> impl Iterator<Item = (usize, usize)> + '_ {
        iter_bits(&self.mask, self.cols, r).zip(self.off[r]..self.off[r + 1])
    }
}

impl WeightFormat for BitmaskI8 {
    fn kind(&self) -> &'static str {
        "bitmask-i8"
    }
    fn rows(&self) -> usize {
        self.rows
    }
    fn cols(&self) -> usize {
        self.cols
    }
    fn nbytes(&self) -> usize {
        self.q.len() + self.mask.len() * 8 + self.scales.len() * 4
    }
    fn stored(&self) -> usize {
        self.q.len()
    }
    fn to_dense(&self) -> Vec<f32> {
        let mut d = vec![0f32; self.rows * self.cols];
        for r in 0..self.rows {
            for (k, j) in self.row_iter(r) {
                d[r * self.cols + k] = self.q[j] as f32 * self.scales[r];
            }
        }
        d
    }
    fn matmul(&self, x: &[f32], m: usize, y: &mut [f32]) {
        check_sizes("bitmask-i8", self.rows, self.cols, x, m, y);
        #[cfg(target_arch = "x86_64")]
        if has_avx512() {
            // SAFETY: AVX-512 checked; sizes checked; masks validated; rows written disjointly.
            drive(self.rows, m, self.nbytes(), 1, y, |r0, r1, out| unsafe {
                self.block_avx512(r0, r1, x, m, out)
            });
            return;
        }
        drive(self.rows, m, self.nbytes(), 1, y, |r0, r1, out| {
            for r in r0..r1 {
                for i in 0..m {
                    let xi = &x[i * self.cols..];
                    let s: f32 = self
                        .row_iter(r)
                        .map(|(k, j)| self.q[j] as f32 * xi[k])
                        .sum();
                    // SAFETY: r in this block's range, i < m.
                    unsafe { out.put(i, r, s * self.scales[r]) };
                }
            }
        });
    }
    fn matmul_naive(&self, x: &[f32], m: usize, y: &mut [f32]) {
        check_sizes("bitmask-i8", self.rows, self.cols, x, m, y);
        for i in 0..m {
            for r in 0..self.rows {
                let s: f64 = self
                    .row_iter(r)
                    .map(|(k, j)| self.q[j] as f64 * x[i * self.cols + k] as f64)
                    .sum();
                y[i * self.rows + r] = (s * self.scales[r] as f64) as f32;
            }
        }
    }
    fn to_tensors(&self, name: &str) -> Vec<RawTensor> {
        vec![
            shape_tensor(name, &[self.rows, self.cols]),
            RawTensor::u64(format!("{name}.bitmask"), &self.mask),
            RawTensor::bytes(
                format!("{name}.values"),
                Dtype::I8,
                self.q.iter().map(|&v| v as u8).collect(),
            ),
            RawTensor::f32(format!("{name}.scales"), &self.scales),
        ]
    }
}
