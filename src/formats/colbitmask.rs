//! Column-major (input-major) *sparse* weights whose decode product reads only the columns `j`
//! with `x[j] ≠ 0`, and of those only the nonzero weights: static (weight) and dynamic
//! (activation) zeros both save bytes. This is what activation sparsity on a pruned model needs
//! (TEAL, Liu et al. 2024, arXiv:2408.14690, on top of Wanda, Sun et al. 2023): the dense
//! column-major format ([`super::ColMajorOf`]) would read the pruned zeros of every active
//! column, the row-major bitmask ([`super::BitmaskOf`]) every column whatever `x` is.
//!
//! **Layout.** Column `j` has a bitmask over its rows (`rows_pad / 8` bytes, bit `b` of byte
//! `i` for row `8i + b`; rows padded to [`PAD`]) and its nonzero values packed in row order;
//! `offsets[j]` is where column `j`'s values start (`offsets[cols]` is the total). The values
//! array carries [`TAIL`] zero values after the last, so a kernel may read 8 values from any
//! column's current position. At 50% weight sparsity a bf16 weight costs 2 bytes × 0.5 + 1 bit
//! = 1.125 bytes against 2 (dense column-major bf16) and 4 (dense f32). int8 keeps one f32 scale
//! per row (`W[r, j] = q·scale[r]`, the row-major formats' symmetric per-row scale, encoded
//! before the zeros are dropped), applied once per output row at the end.
//!
//! **Kernel.** As the dense column-major kernel: the active columns (listed once per product)
//! are split into [`super::colmajor::PARTS`] ranges when the bytes exceed
//! [`super::PAR_BYTES`], each range sums its own partial `y` in f32 and the partial sums are
//! added in range order (bits independent of the thread count). AVX2: four active columns per
//! pass over the rows; per 8 rows and column, one mask byte expands the column's next packed
//! values into place ([`Elem::expand8`], the row-major bitmask's AVX2 expand) for one FMA, and
//! the column's value pointer advances by the byte's popcount. Portable: a loop over each
//! active column's set bits. [`WeightFormat::matmul_naive`] is the f64 reference over every
//! column. Products with more than [`super::SMALL_M`] rows of `x` decode row tiles and use
//! GEMM; the runtime keeps the row-major weight for those (prefill).

use super::colmajor::{rows_skip, skip_product};
use super::elem::Elem;
use super::{
    check_dense, check_sizes, ferr, find, isa, matmul_tiled, naive_product, read_dims, read_f32,
    shape_tensor, Dtype, Isa, RawTensor, WeightFormat, SMALL_M,
};
use crate::Result;
#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// Rows are padded to a multiple of this (one mask byte).
pub const PAD: usize = 8;

/// Zero values stored after the last column's, so an 8-value read never leaves the array.
pub const TAIL: usize = 8;

/// Column-major bitmask weights with value type `E`.
#[derive(Clone, Debug, PartialEq)]
pub struct ColBitmaskOf<E: Elem> {
    rows: usize,
    cols: usize,
    /// `[cols][rows_pad / 8]` mask bytes.
    masks: Vec<u8>,
    /// `[cols + 1]`: start of each column's values in `v`.
    offsets: Vec<u32>,
    /// Nonzero values, column by column in row order, then [`TAIL`] zeros.
    v: Vec<E>,
    /// One per row when `E::SCALED`, else empty.
    scales: Vec<f32>,
}

pub type ColBitmask = ColBitmaskOf<f32>;
pub type ColBitmaskBf16 = ColBitmaskOf<half::bf16>;
pub type ColBitmaskF16 = ColBitmaskOf<half::f16>;
pub type ColBitmaskI8 = ColBitmaskOf<i8>;

impl<E: Elem> ColBitmaskOf<E> {
    const KIND: &'static str = match E::DTYPE {
        Dtype::F32 => "colbitmask-f32",
        Dtype::F16 => "colbitmask-f16",
        Dtype::Bf16 => "colbitmask-bf16",
        _ => "colbitmask-i8",
    };

    fn mask_bytes(&self) -> usize {
        self.rows.next_multiple_of(PAD) / 8
    }

    /// Encodes a row-major `[rows, cols]` matrix: its zeros are dropped, every other value kept
    /// (bf16 / f16 round to nearest even; a value that rounds to zero stays stored). int8: the
    /// per-row symmetric scale of [`super::DenseI8`].
    pub fn from_dense(w: &[f32], rows: usize, cols: usize) -> Result<Self> {
        check_dense(Self::KIND, w, rows, cols)?;
        let mb = rows.next_multiple_of(PAD) / 8;
        let mut scales = Vec::new();
        let mut enc = Vec::with_capacity(rows * cols);
        for r in 0..rows {
            let (q, s) = E::encode(&w[r * cols..(r + 1) * cols]);
            if E::SCALED {
                scales.push(s);
            }
            enc.extend(q);
        }
        let nnz = w.iter().filter(|&&x| x != 0.0).count();
        if nnz > u32::MAX as usize - TAIL {
            return Err(ferr(
                String::new(),
                Self::KIND,
                format!("{nnz} nonzeros do not fit 32-bit offsets"),
            ));
        }
        let zero = E::encode(&[0.0]).0[0];
        let mut masks = vec![0u8; mb * cols];
        let mut offsets = Vec::with_capacity(cols + 1);
        let mut v = Vec::with_capacity(nnz + TAIL);
        for j in 0..cols {
            offsets.push(v.len() as u32);
            for r in 0..rows {
                if w[r * cols + j] != 0.0 {
                    masks[j * mb + r / 8] |= 1 << (r % 8);
                    v.push(enc[r * cols + j]);
                }
            }
        }
        offsets.push(v.len() as u32);
        v.resize(v.len() + TAIL, zero);
        Ok(ColBitmaskOf {
            rows,
            cols,
            masks,
            offsets,
            v,
            scales,
        })
    }

    pub fn from_tensors(name: &str, tensors: &[RawTensor]) -> Result<Self> {
        let kind = Self::KIND;
        let (rows, cols) = read_dims(tensors, name, kind)?;
        let mb = rows.next_multiple_of(PAD) / 8;
        let mt = find(tensors, name, "masks", Dtype::U8, kind)?;
        if mt.data.len() != mb * cols {
            return Err(ferr(
                mt.name.clone(),
                kind,
                format!("has {} bytes, expected {}", mt.data.len(), mb * cols),
            ));
        }
        let masks = mt.data.clone();
        if masks.iter().enumerate().any(|(i, &b)| {
            let first_row = (i % mb) * 8;
            (0..8).any(|bit| b & (1 << bit) != 0 && first_row + bit >= rows)
        }) {
            return Err(ferr(mt.name.clone(), kind, "sets a bit of a padding row"));
        }
        // The offsets follow from the masks; every count is checked against the values.
        let mut offsets = Vec::with_capacity(cols + 1);
        let mut at = 0u64;
        for j in 0..cols {
            offsets.push(at as u32);
            at += masks[j * mb..(j + 1) * mb]
                .iter()
                .map(|b| b.count_ones() as u64)
                .sum::<u64>();
            if at > (u32::MAX as usize - TAIL) as u64 {
                return Err(ferr(mt.name.clone(), kind, "too many nonzeros"));
            }
        }
        offsets.push(at as u32);
        let vt = find(tensors, name, "values", E::DTYPE, kind)?;
        if vt.data.len() / E::DTYPE.size() != at as usize + TAIL {
            return Err(ferr(
                vt.name.clone(),
                kind,
                format!(
                    "has {} values, the masks set {at} bits (+{TAIL} padding)",
                    vt.data.len() / E::DTYPE.size()
                ),
            ));
        }
        let scales = if E::SCALED {
            let st = find(tensors, name, "scales", Dtype::F32, kind)?;
            let s = read_f32(st);
            if s.len() != rows || s.iter().any(|v| !v.is_finite()) {
                return Err(ferr(
                    st.name.clone(),
                    kind,
                    format!("needs {rows} finite scales, has {}", s.len()),
                ));
            }
            s
        } else {
            Vec::new()
        };
        Ok(ColBitmaskOf {
            rows,
            cols,
            masks,
            offsets,
            v: E::read(vt),
            scales,
        })
    }

    /// Column `j` as (row, stored value as f32 before the row scale) pairs.
    fn column(&self, j: usize) -> impl Iterator<Item = (usize, f32)> + '_ {
        let mb = self.mask_bytes();
        let mut at = self.offsets[j] as usize;
        self.masks[j * mb..(j + 1) * mb]
            .iter()
            .enumerate()
            .flat_map(|(i, &b)| {
                (0..8)
                    .filter(move |bit| b & (1 << bit) != 0)
                    .map(move |bit| i * 8 + bit)
            })
            .map(move |r| {
                let v = self.v[at].to_f32();
                at += 1;
                (r, v)
            })
    }

    /// Bytes one product reads when the columns `active` (indices) are nonzero in `x`.
    pub fn bytes_for_columns(&self, active: &[u32]) -> usize {
        let mb = self.mask_bytes();
        active
            .iter()
            .map(|&j| {
                let j = j as usize;
                mb + (self.offsets[j + 1] - self.offsets[j]) as usize * E::DTYPE.size()
            })
            .sum::<usize>()
            + self.rows * if E::SCALED { 4 } else { 0 }
    }

    /// `y (+)= W · x` for one row of `x`, reading only the columns with `x[j] ≠ 0`.
    pub fn matvec_skip(&self, x: &[f32], y: &mut [f32], acc: bool) {
        check_sizes(Self::KIND, self.rows, self.cols, x, 1, y);
        let rp = self.rows.next_multiple_of(PAD);
        skip_product(
            (self.rows, self.cols, rp),
            x,
            y,
            acc,
            &self.scales,
            |idx| self.bytes_for_columns(idx),
            |idx, xs, part| self.columns(idx, xs, part),
        );
    }

    /// `acc[0..rp] += Σ_k xs[k] · W[:, idx[k]]` (before row scales): AVX2 where the kernel set
    /// allows, else the portable loop.
    fn columns(&self, idx: &[u32], xs: &[f32], acc: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if matches!(isa(), Isa::Avx2 | Isa::Avx512)
            && crate::isa::avx2_fma_f16c()
            && crate::isa::bit_manipulation()
        {
            // SAFETY: AVX2 + FMA + F16C + POPCNT checked; indices < cols; the values array
            // ends with TAIL values, so 8 reads from any column's position stay inside; `acc`
            // holds rows_pad values, a multiple of 8, one per mask bit.
            return unsafe { self.columns_avx2(idx, xs, acc) };
        }
        self.columns_portable(idx, xs, acc)
    }

    fn columns_portable(&self, idx: &[u32], xs: &[f32], acc: &mut [f32]) {
        for (&j, &xj) in idx.iter().zip(xs) {
            for (r, v) in self.column(j as usize) {
                acc[r] += v * xj;
            }
        }
    }

    /// AVX2: four active columns per pass over the rows; per 8 rows and column one mask byte,
    /// one expand of the column's next packed values, one FMA, and the column's pointer moves
    /// by the byte's popcount.
    ///
    /// # Safety
    /// AVX2 + FMA + F16C + POPCNT; every `idx[k] < cols`; `acc.len()` = rows_pad.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c,popcnt")]
    unsafe fn columns_avx2(&self, idx: &[u32], xs: &[f32], acc: &mut [f32]) {
        let mb = self.mask_bytes();
        let n = idx.len();
        let a = acc.as_mut_ptr();
        let m = self.masks.as_ptr();
        let v = self.v.as_ptr();
        let col = |k: usize| *idx.get_unchecked(k) as usize;
        let size = std::mem::size_of::<E>();
        // Cache lines of column j's masks and values, from their starts.
        let lines = |j: usize| -> (*const i8, usize, *const i8, usize) {
            let (o0, o1) = (
                *self.offsets.get_unchecked(j) as usize,
                *self.offsets.get_unchecked(j + 1) as usize,
            );
            (
                m.add(j * mb) as *const i8,
                mb.div_ceil(64),
                v.add(o0) as *const i8,
                ((o1 - o0) * size).div_ceil(64) + 1,
            )
        };
        let mut k = 0;
        while k + 4 <= n {
            let j = [col(k), col(k + 1), col(k + 2), col(k + 3)];
            let mk: [*const u8; 4] = std::array::from_fn(|c| m.add(j[c] * mb));
            let mut vp: [*const E; 4] =
                std::array::from_fn(|c| v.add(*self.offsets.get_unchecked(j[c]) as usize));
            let xb: [__m256; 4] = std::array::from_fn(|c| _mm256_set1_ps(*xs.get_unchecked(k + c)));
            // The next group's columns are fetched while this one runs: a column is a short
            // stream (1.5 KB of bf16 values at 1536 rows and 50%) that the hardware
            // prefetchers would only pick up part way through.
            let ahead: [(*const i8, usize, *const i8, usize); 4] =
                std::array::from_fn(|c| lines(col((k + 4 + c).min(n - 1))));
            let most = ahead.iter().map(|a| a.1.max(a.3)).max().unwrap_or(0);
            for i in 0..mb {
                if i < most {
                    for &(pm, lm, pv, lv) in &ahead {
                        if i < lm {
                            _mm_prefetch::<_MM_HINT_T0>(pm.wrapping_add(64 * i));
                        }
                        if i < lv {
                            _mm_prefetch::<_MM_HINT_T0>(pv.wrapping_add(64 * i));
                        }
                    }
                }
                let mut s = _mm256_loadu_ps(a.add(8 * i));
                for c in 0..4 {
                    let b = *mk[c].add(i);
                    s = _mm256_fmadd_ps(E::expand8(b, vp[c]), xb[c], s);
                    vp[c] = vp[c].add(b.count_ones() as usize);
                }
                _mm256_storeu_ps(a.add(8 * i), s);
            }
            k += 4;
        }
        while k < n {
            let j = col(k);
            let mk = m.add(j * mb);
            let mut vp = v.add(*self.offsets.get_unchecked(j) as usize);
            let xb = _mm256_set1_ps(*xs.get_unchecked(k));
            for i in 0..mb {
                let b = *mk.add(i);
                if b != 0 {
                    let s = _mm256_loadu_ps(a.add(8 * i));
                    _mm256_storeu_ps(a.add(8 * i), _mm256_fmadd_ps(E::expand8(b, vp), xb, s));
                    vp = vp.add(b.count_ones() as usize);
                }
            }
            k += 1;
        }
    }

    /// The dense row-major matrix's rows `r0..r1` (scales applied), column by column.
    fn decode_into(&self, r0: usize, r1: usize, out: &mut [f32]) {
        let c = self.cols;
        out[..(r1 - r0) * c].fill(0.0);
        for j in 0..c {
            for (r, v) in self.column(j) {
                if (r0..r1).contains(&r) {
                    out[(r - r0) * c + j] = if E::SCALED { v * self.scales[r] } else { v };
                }
            }
        }
    }
}

impl<E: Elem> WeightFormat for ColBitmaskOf<E> {
    dims!();
    /// Bytes a dense input reads (every column's mask and values, scales).
    fn nbytes(&self) -> usize {
        self.masks.len()
            + (self.v.len() - TAIL) * E::DTYPE.size()
            + self.rows * if E::SCALED { 4 } else { 0 }
    }
    fn stored(&self) -> usize {
        self.v.len() - TAIL
    }
    fn decode_rows(&self, r0: usize, r1: usize, out: &mut [f32]) {
        self.decode_into(r0, r1, out)
    }
    fn matmul_add(&self, x: &[f32], m: usize, y: &mut [f32], accumulate: bool) {
        check_sizes(Self::KIND, self.rows, self.cols, x, m, y);
        if m <= SMALL_M {
            let dims = (self.rows, self.cols);
            rows_skip(dims, x, m, y, accumulate, |x, y, a| {
                self.matvec_skip(x, y, a)
            });
        } else {
            matmul_tiled(self, x, m, y, accumulate);
        }
    }
    fn matmul_naive(&self, x: &[f32], m: usize, y: &mut [f32]) {
        check_sizes(Self::KIND, self.rows, self.cols, x, m, y);
        let dense = self.to_dense_naive();
        naive_product(self.rows, self.cols, x, m, y, |r, emit| {
            for j in 0..self.cols {
                emit(j, dense[r * self.cols + j] as f64);
            }
        });
    }
    fn to_tensors(&self, name: &str) -> Vec<RawTensor> {
        let mut t = vec![
            shape_tensor(name, &[self.rows, self.cols]),
            RawTensor {
                name: format!("{name}.masks"),
                dtype: Dtype::U8,
                shape: vec![self.masks.len()],
                data: self.masks.clone(),
            },
            RawTensor {
                name: format!("{name}.values"),
                dtype: E::DTYPE,
                shape: vec![self.v.len()],
                data: E::bytes(&self.v),
            },
        ];
        if E::SCALED {
            t.push(RawTensor::f32(format!("{name}.scales"), &self.scales));
        }
        t
    }
}

impl<E: Elem> ColBitmaskOf<E> {
    /// The dense matrix by a plain scan of masks and values (the reference's own decode).
    fn to_dense_naive(&self) -> Vec<f32> {
        let (rows, cols) = (self.rows, self.cols);
        let mb = self.mask_bytes();
        let mut d = vec![0f32; rows * cols];
        let mut at = 0;
        for j in 0..cols {
            for r in 0..mb * 8 {
                if self.masks[j * mb + r / 8] & (1 << (r % 8)) != 0 {
                    let s = if E::SCALED { self.scales[r] } else { 1.0 };
                    d[r * cols + j] = self.v[at].to_f32() * s;
                    at += 1;
                }
            }
        }
        d
    }
}
