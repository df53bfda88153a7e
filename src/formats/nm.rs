//! N:M semi-structured sparsity (2:4, 4:8, ...): in every group of M consecutive columns at
//! most N weights are nonzero. Stored as the N kept values per group plus their in-group
//! indices, packed LSB-first at `ceil(log2 M)` bits each (2 bits for M = 4, 3 for M = 8) in a
//! per-row bit stream of `ceil(values_per_row · bits / 8)` bytes.

use super::*;
#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// Padding after the index stream so the kernels may read whole u64 / u16 words.
const PAD: usize = 8;

/// N:M packed matrix.
#[derive(Clone, Debug, PartialEq)]
pub struct NM {
    rows: usize,
    cols: usize,
    n: usize,
    m: usize,
    bits: usize,
    /// Kept values per row: `cols / m · n`.
    vpr: usize,
    /// Index bytes per row.
    row_bytes: usize,
    values: Vec<f32>,
    /// `rows · row_bytes` bytes plus `PAD` zero bytes.
    idx: Vec<u8>,
}

fn bits_for(m: usize) -> usize {
    (usize::BITS - (m - 1).leading_zeros()) as usize
}

impl NM {
    /// Packs `w`, which must be N:M sparse along rows (`cols % m == 0`, `1 ≤ n < m ≤ 16`).
    /// A group with more than `n` nonzeros is an error naming its row and group; groups with
    /// fewer store explicit zeros.
    pub fn from_dense(w: &[f32], rows: usize, cols: usize, n: usize, m: usize) -> Result<Self> {
        check_dense("nm", w, rows, cols)?;
        if !(1..m).contains(&n) || m > 16 {
            return Err(Error::Invalid(format!(
                "nm: need 1 ≤ N < M ≤ 16, got {n}:{m}"
            )));
        }
        if cols % m != 0 {
            return Err(Error::Invalid(format!(
                "nm {n}:{m}: {cols} columns is not a multiple of {m}"
            )));
        }
        let mut s = Self::empty(rows, cols, n, m);
        let groups = cols / m;
        for r in 0..rows {
            for g in 0..groups {
                let grp = &w[r * cols + g * m..r * cols + (g + 1) * m];
                let mut keep: Vec<usize> = (0..m).filter(|&k| grp[k] != 0.0).collect();
                if keep.len() > n {
                    return Err(Error::Invalid(format!(
                        "nm {n}:{m}: row {r} group {g} (columns {}..{}) has {} nonzeros",
                        g * m,
                        (g + 1) * m,
                        keep.len()
                    )));
                }
                let mut z = 0;
                while keep.len() < n {
                    if !keep.contains(&z) {
                        keep.push(z);
                    }
                    z += 1;
                }
                keep.sort_unstable();
                for (j, &k) in keep.iter().enumerate() {
                    let v = g * n + j;
                    s.values[r * s.vpr + v] = grp[k];
                    s.set_idx(r, v, k);
                }
            }
        }
        Ok(s)
    }

    fn empty(rows: usize, cols: usize, n: usize, m: usize) -> Self {
        let bits = bits_for(m);
        let vpr = cols / m * n;
        let row_bytes = (vpr * bits).div_ceil(8);
        NM {
            rows,
            cols,
            n,
            m,
            bits,
            vpr,
            row_bytes,
            values: vec![0.0; rows * vpr],
            idx: vec![0; rows * row_bytes + PAD],
        }
    }

    fn set_idx(&mut self, r: usize, v: usize, k: usize) {
        let bit = v * self.bits;
        let byte = r * self.row_bytes + bit / 8;
        let w = (k as u16) << (bit % 8);
        self.idx[byte] |= w as u8;
        self.idx[byte + 1] |= (w >> 8) as u8;
    }

    /// In-group index of kept value `v` of row `r`.
    #[inline(always)]
    fn idx_at(&self, r: usize, v: usize) -> usize {
        let bit = v * self.bits;
        let byte = r * self.row_bytes + bit / 8;
        let w = u16::from_le_bytes([self.idx[byte], self.idx[byte + 1]]);
        ((w >> (bit % 8)) as usize) & ((1 << self.bits) - 1)
    }

    /// (N, M).
    pub fn pattern(&self) -> (usize, usize) {
        (self.n, self.m)
    }

    pub fn from_tensors(name: &str, tensors: &[RawTensor]) -> Result<Self> {
        const K: &str = "nm";
        let s = read_shape(tensors, name, 4, K)?;
        let (rows, cols, n, m) = (s[0], s[1], s[2], s[3]);
        if !(1..m).contains(&n) || m > 16 || cols % m != 0 {
            return Err(ferr(
                format!("{name}.shape"),
                K,
                format!("bad N:M {n}:{m} for {cols} columns"),
            ));
        }
        let bits = bits_for(m);
        let vpr = cols / m * n;
        let row_bytes = (vpr * bits).div_ceil(8);
        let vt = find(tensors, name, "values", Dtype::F32, K)?;
        expect_len(vt, rows.checked_mul(vpr), K)?;
        let it = find(tensors, name, "indices", Dtype::U8, K)?;
        expect_len(it, rows.checked_mul(row_bytes), K)?;
        // Sizes now match real buffers, so allocating is safe.
        let mut out = Self::empty(rows, cols, n, m);
        out.values = read_f32(vt);
        out.idx[..rows * out.row_bytes].copy_from_slice(&it.data);
        for r in 0..rows {
            for g in 0..cols / m {
                let mut prev = None;
                for j in 0..n {
                    let k = out.idx_at(r, g * n + j);
                    if k >= m || prev.is_some_and(|p| k <= p) {
                        return Err(ferr(
                            it.name.clone(),
                            K,
                            format!(
                                "row {r} group {g}: in-group indices must be increasing and < {m}"
                            ),
                        ));
                    }
                    prev = Some(k);
                }
            }
        }
        Ok(out)
    }

    /// True when the permute kernel applies: M = 2N and N divides 16 (1:2, 2:4, 4:8, 8:16).
    fn fast_pattern(&self) -> bool {
        self.m == 2 * self.n && 16 % self.n == 0
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512vl,avx512bw,fma")]
    unsafe fn block_avx512(&self, r0: usize, r1: usize, x: &[f32], mm: usize, out: Out) {
        // 16 kept values span 16/N groups = 32 columns of x; decode their 16 indices from one
        // u64 (16·bits ≤ 64 bits) with two 64-bit variable shifts.
        let b = self.bits as i64;
        let even: [i64; 8] = std::array::from_fn(|q| 2 * q as i64 * b);
        let odd: [i64; 8] = std::array::from_fn(|q| (2 * q as i64 + 1) * b);
        let base: [i32; 16] = std::array::from_fn(|j| ((j / self.n) * self.m) as i32);
        let sh_even = _mm512_loadu_si512(even.as_ptr().cast());
        let sh_odd = _mm512_loadu_si512(odd.as_ptr().cast());
        let basev = _mm512_loadu_si512(base.as_ptr().cast());
        let lo32 = _mm512_set1_epi64(0xffff_ffff);
        let kmask = _mm512_set1_epi32((1 << self.bits) - 1);
        let step = 2 * self.bits; // index bytes per 16 values
        let (nb, rem) = (self.vpr / 16, self.vpr % 16);
        let decode = |ip: *const u8| {
            let bc = _mm512_set1_epi64(std::ptr::read_unaligned(ip as *const u64) as i64);
            let a = _mm512_and_si512(_mm512_srlv_epi64(bc, sh_even), lo32);
            let o = _mm512_slli_epi64::<32>(_mm512_srlv_epi64(bc, sh_odd));
            _mm512_add_epi32(_mm512_and_si512(_mm512_or_si512(a, o), kmask), basev)
        };
        for r in r0..r1 {
            let vp = self.values.as_ptr().add(r * self.vpr);
            let ip = self.idx.as_ptr().add(r * self.row_bytes);
            for i in 0..mm {
                let xp = x.as_ptr().add(i * self.cols);
                let mut a0 = _mm512_setzero_ps();
                let mut a1 = _mm512_setzero_ps();
                let mut blk = 0;
                while blk + 2 <= nb {
                    let i0 = decode(ip.add(blk * step));
                    let i1 = decode(ip.add((blk + 1) * step));
                    let x0 = _mm512_permutex2var_ps(
                        _mm512_loadu_ps(xp.add(32 * blk)),
                        i0,
                        _mm512_loadu_ps(xp.add(32 * blk + 16)),
                    );
                    let x1 = _mm512_permutex2var_ps(
                        _mm512_loadu_ps(xp.add(32 * blk + 32)),
                        i1,
                        _mm512_loadu_ps(xp.add(32 * blk + 48)),
                    );
                    a0 = _mm512_fmadd_ps(_mm512_loadu_ps(vp.add(16 * blk)), x0, a0);
                    a1 = _mm512_fmadd_ps(_mm512_loadu_ps(vp.add(16 * blk + 16)), x1, a1);
                    blk += 2;
                }
                if blk < nb {
                    let i0 = decode(ip.add(blk * step));
                    let x0 = _mm512_permutex2var_ps(
                        _mm512_loadu_ps(xp.add(32 * blk)),
                        i0,
                        _mm512_loadu_ps(xp.add(32 * blk + 16)),
                    );
                    a0 = _mm512_fmadd_ps(_mm512_loadu_ps(vp.add(16 * blk)), x0, a0);
                }
                if rem > 0 {
                    // `rem` values cover 2·rem < 32 columns; the index read stays inside the padding.
                    let ncols = 2 * rem;
                    let mlo: __mmask16 = if ncols >= 16 {
                        0xffff
                    } else {
                        (1u16 << ncols) - 1
                    };
                    let mhi: __mmask16 = if ncols > 16 {
                        (1u16 << (ncols - 16)) - 1
                    } else {
                        0
                    };
                    let lm: __mmask16 = (1u16 << rem) - 1;
                    let xb = xp.add(32 * nb);
                    let iv = decode(ip.add(nb * step));
                    let xg = _mm512_permutex2var_ps(
                        _mm512_maskz_loadu_ps(mlo, xb),
                        iv,
                        _mm512_maskz_loadu_ps(mhi, xb.wrapping_add(16)),
                    );
                    a0 = _mm512_mask3_fmadd_ps(
                        _mm512_maskz_loadu_ps(lm, vp.add(16 * nb)),
                        xg,
                        a0,
                        lm,
                    );
                }
                out.put(i, r, _mm512_reduce_add_ps(_mm512_add_ps(a0, a1)));
            }
        }
    }

    fn row_dot_scalar(&self, r: usize, x: &[f32]) -> f32 {
        let mut s = 0f32;
        for v in 0..self.vpr {
            let k = (v / self.n) * self.m + self.idx_at(r, v);
            s += self.values[r * self.vpr + v] * x[k];
        }
        s
    }
}

impl WeightFormat for NM {
    fn kind(&self) -> &'static str {
        "nm"
    }
    fn rows(&self) -> usize {
        self.rows
    }
    fn cols(&self) -> usize {
        self.cols
    }
    fn nbytes(&self) -> usize {
        self.values.len() * 4 + self.rows * self.row_bytes
    }
    fn stored(&self) -> usize {
        self.values.len()
    }
    fn to_dense(&self) -> Vec<f32> {
        let mut d = vec![0f32; self.rows * self.cols];
        for r in 0..self.rows {
            for v in 0..self.vpr {
                let k = (v / self.n) * self.m + self.idx_at(r, v);
                d[r * self.cols + k] = self.values[r * self.vpr + v];
            }
        }
        d
    }
    fn matmul(&self, x: &[f32], m: usize, y: &mut [f32]) {
        check_sizes("nm", self.rows, self.cols, x, m, y);
        #[cfg(target_arch = "x86_64")]
        if self.fast_pattern() && has_avx512() {
            // SAFETY: AVX-512 checked; sizes checked; indices validated (< M, so every
            // permuted lane is inside the 32-column window); disjoint rows.
            drive(self.rows, m, self.nbytes(), 1, y, |r0, r1, out| unsafe {
                self.block_avx512(r0, r1, x, m, out)
            });
            return;
        }
        drive(self.rows, m, self.nbytes(), 1, y, |r0, r1, out| {
            for r in r0..r1 {
                for i in 0..m {
                    // SAFETY: r in this block's range, i < m.
                    unsafe { out.put(i, r, self.row_dot_scalar(r, &x[i * self.cols..])) };
                }
            }
        });
    }
    fn matmul_naive(&self, x: &[f32], m: usize, y: &mut [f32]) {
        check_sizes("nm", self.rows, self.cols, x, m, y);
        for i in 0..m {
            for r in 0..self.rows {
                let mut s = 0f64;
                for v in 0..self.vpr {
                    let k = (v / self.n) * self.m + self.idx_at(r, v);
                    s += self.values[r * self.vpr + v] as f64 * x[i * self.cols + k] as f64;
                }
                y[i * self.rows + r] = s as f32;
            }
        }
    }
    fn to_tensors(&self, name: &str) -> Vec<RawTensor> {
        vec![
            shape_tensor(name, &[self.rows, self.cols, self.n, self.m]),
            RawTensor::f32(format!("{name}.values"), &self.values),
            RawTensor::bytes(
                format!("{name}.indices"),
                Dtype::U8,
                self.idx[..self.rows * self.row_bytes].to_vec(),
            ),
        ]
    }
}
