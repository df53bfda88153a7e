//! Column-major (input-major) dense weights whose decode product reads only the columns `j`
//! with `x[j] ≠ 0`: the kernel behind contextual activation sparsity (TEAL, Liu et al. 2024,
//! arXiv:2408.14690; official code github.com/FasterDecoding/TEAL, whose GPU kernel reads the
//! weight column-major for the same reason).
//!
//! A row-major mat-vec reads every weight whatever `x` is: each row's dot product touches all
//! columns. Stored input-major, the product is a sum of columns, `y = Σⱼ x[j]·W[:, j]`, and a
//! zero `x[j]` skips column `j`'s bytes entirely, so a decode step whose inputs are 50% zero
//! reads half the weight.
//!
//! **Layout.** Rows are grouped in tiles of [`TILE`] = 64 output rows; tile `t` stores, for each
//! column `j` in order, its 64 values `W[64t .. 64t + 64, j]` contiguously:
//! `v[(t·cols + j)·64 + (r mod 64)]`. The last tile is padded with zero rows (at most 63 rows ×
//! cols extra values). A tile's 64 accumulators fit eight AVX2 registers; for each active
//! column the kernel broadcasts `x[j]` and does eight FMAs on 64 contiguous values (256 bytes
//! f32, 128 bf16/f16, 64 int8), prefetching the column a few active columns ahead (the list of
//! active columns is known, so the prefetch address is exact). int8 stores one f32 scale per
//! row (`W[r, j] = q·scale[r]`), applied once per output row at the end.
//!
//! Threads split the tiles ([`super::drive`] with tile alignment) once the bytes actually read
//! exceed [`super::PAR_BYTES`]. Products with more than [`super::SMALL_M`] rows of `x` (prefill)
//! decode row tiles and use GEMM, like every format; the runtime normally keeps the row-major
//! weight for those (see `docs/activation_sparsity.md`).
//!
//! Kernels: AVX2 + FMA (+F16C for f16) on x86-64 (also used on AVX-512 machines: no AVX-512
//! variant is written, as none could be tested here), and a portable scalar loop compiled for
//! AVX2 where present. [`WeightFormat::matmul_naive`] is the f64 reference over every column.
//! This format is built by the runtime from the model's weights; it is not one of the packed
//! formats written to disk (`registry::FORMATS`), though it has `to_tensors` / `from_tensors`.

use super::elem::Elem;
use super::{
    check_dense, check_sizes, drive, ferr, find, isa, matmul_tiled, naive_product, read_dims,
    read_f32, shape_tensor, Dtype, Isa, Out, RawTensor, WeightFormat, SMALL_M,
};
use crate::Result;
#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// Output rows per tile.
pub const TILE: usize = 64;

/// How many active columns ahead the AVX2 kernel prefetches.
const PF_AHEAD: usize = 6;

/// Column-major tiled dense weights with value type `E`.
#[derive(Clone, Debug, PartialEq)]
pub struct ColMajorOf<E: Elem> {
    rows: usize,
    cols: usize,
    /// `[tiles][cols][TILE]` values (last tile zero-padded).
    v: Vec<E>,
    /// One per row (padded to whole tiles, padding 0) when `E::SCALED`, else empty.
    scales: Vec<f32>,
}

pub type ColMajor = ColMajorOf<f32>;
pub type ColMajorBf16 = ColMajorOf<half::bf16>;
pub type ColMajorF16 = ColMajorOf<half::f16>;
pub type ColMajorI8 = ColMajorOf<i8>;

impl<E: Elem> ColMajorOf<E> {
    const KIND: &'static str = match E::DTYPE {
        Dtype::F32 => "colmajor-f32",
        Dtype::F16 => "colmajor-f16",
        Dtype::Bf16 => "colmajor-bf16",
        _ => "colmajor-i8",
    };

    /// Encodes a row-major `[rows, cols]` matrix (int8: symmetric per-row scale, as
    /// [`super::DenseI8`]; bf16 / f16 round to nearest even).
    pub fn from_dense(w: &[f32], rows: usize, cols: usize) -> Result<Self> {
        check_dense(Self::KIND, w, rows, cols)?;
        let tiles = rows.div_ceil(TILE);
        let zero = E::encode(&[0.0]).0[0];
        let mut v = vec![zero; tiles * cols * TILE];
        let mut scales = if E::SCALED {
            vec![0f32; tiles * TILE]
        } else {
            Vec::new()
        };
        for r in 0..rows {
            let (q, s) = E::encode(&w[r * cols..(r + 1) * cols]);
            if E::SCALED {
                scales[r] = s;
            }
            let base = (r / TILE) * cols * TILE + r % TILE;
            for (j, q) in q.into_iter().enumerate() {
                v[base + j * TILE] = q;
            }
        }
        Ok(ColMajorOf {
            rows,
            cols,
            v,
            scales,
        })
    }

    pub fn from_tensors(name: &str, tensors: &[RawTensor]) -> Result<Self> {
        let kind = Self::KIND;
        let (rows, cols) = read_dims(tensors, name, kind)?;
        let tiles = rows.div_ceil(TILE);
        let vt = find(tensors, name, "values", E::DTYPE, kind)?;
        let want = tiles.checked_mul(cols).and_then(|n| n.checked_mul(TILE));
        if want != Some(vt.data.len() / E::DTYPE.size()) {
            return Err(ferr(
                vt.name.clone(),
                kind,
                format!(
                    "has {} values, expected {} ({} tiles of {TILE} rows × {cols} columns)",
                    vt.data.len() / E::DTYPE.size(),
                    want.map_or("an overflowing count".into(), |n| n.to_string()),
                    tiles
                ),
            ));
        }
        let scales = if E::SCALED {
            let st = find(tensors, name, "scales", Dtype::F32, kind)?;
            let s = read_f32(st);
            if s.len() != tiles * TILE {
                return Err(ferr(
                    st.name.clone(),
                    kind,
                    format!("has {} scales, expected {}", s.len(), tiles * TILE),
                ));
            }
            if let Some(r) = s.iter().position(|v| !v.is_finite()) {
                return Err(ferr(st.name.clone(), kind, format!("row {r} has a non-finite scale")));
            }
            s
        } else {
            Vec::new()
        };
        Ok(ColMajorOf {
            rows,
            cols,
            v: E::read(vt),
            scales,
        })
    }

    /// Stored value of `W[r, j]` as f32, scale applied.
    #[inline(always)]
    fn get(&self, r: usize, j: usize) -> f32 {
        let q = self.v[((r / TILE) * self.cols + j) * TILE + r % TILE].to_f32();
        if E::SCALED {
            q * self.scales[r]
        } else {
            q
        }
    }

    /// Bytes one product reads when `active` of the columns are nonzero in `x`.
    pub fn bytes_for_active(&self, active: usize) -> usize {
        self.rows.div_ceil(TILE) * TILE * (active * E::DTYPE.size() + self.scales_per_row())
    }

    fn scales_per_row(&self) -> usize {
        if E::SCALED {
            4
        } else {
            0
        }
    }

    /// `y (+)= W · x` for one row of `x`, reading only the columns with `x[j] ≠ 0`.
    pub fn matvec_skip(&self, x: &[f32], y: &mut [f32], acc: bool) {
        check_sizes(Self::KIND, self.rows, self.cols, x, 1, y);
        let mut idx = Vec::with_capacity(self.cols);
        let mut xs = Vec::with_capacity(self.cols);
        for (j, &xj) in x[..self.cols].iter().enumerate() {
            if xj != 0.0 {
                idx.push(j as u32);
                xs.push(xj);
            }
        }
        let job = Job {
            f: self,
            idx: &idx,
            xs: &xs,
        };
        let bytes = self.bytes_for_active(idx.len());
        #[cfg(target_arch = "x86_64")]
        if matches!(isa(), Isa::Avx2 | Isa::Avx512) && crate::isa::avx2_fma_f16c() {
            // SAFETY: AVX2 + FMA + F16C checked; `y` holds `rows` values (checked above);
            // tiles are written disjointly.
            drive(self.rows, 1, bytes, TILE, y, acc, |r0, r1, out| unsafe {
                job.avx2(r0, r1, out)
            });
            return;
        }
        drive(self.rows, 1, bytes, TILE, y, acc, |r0, r1, out| {
            job.portable(r0, r1, out)
        });
    }
}

/// One product's active columns (`idx`, ascending) and their `x` values.
#[derive(Clone, Copy)]
struct Job<'a, E: Elem> {
    f: &'a ColMajorOf<E>,
    idx: &'a [u32],
    xs: &'a [f32],
}

impl<E: Elem> Job<'_, E> {
    /// Writes rows `r0..r1` (`r0` a multiple of [`TILE`]) from per-tile sums.
    #[inline(always)]
    fn store(&self, t: usize, r1: usize, sums: &[f32; TILE], out: Out) {
        let lo = t * TILE;
        for (l, &s) in sums.iter().enumerate().take(r1.min(lo + TILE) - lo) {
            let r = lo + l;
            let s = if E::SCALED { s * self.f.scales[r] } else { s };
            // SAFETY: r in this block's rows; the caller's drive gave them to this block.
            unsafe { out.put(0, r, s) };
        }
    }

    #[inline(always)]
    fn portable_body(self, r0: usize, r1: usize, out: Out) {
        let cols = self.f.cols;
        for t in r0 / TILE..r1.div_ceil(TILE) {
            let tile = &self.f.v[t * cols * TILE..(t + 1) * cols * TILE];
            let mut sums = [0f32; TILE];
            for (&j, &xj) in self.idx.iter().zip(self.xs) {
                let c = &tile[j as usize * TILE..(j as usize + 1) * TILE];
                for l in 0..TILE {
                    sums[l] += c[l].to_f32() * xj;
                }
            }
            self.store(t, r1, &sums, out);
        }
    }

    /// [`Job::portable_body`], compiled for AVX2 + FMA when the CPU has them.
    fn portable(self, r0: usize, r1: usize, out: Out) {
        #[cfg(target_arch = "x86_64")]
        {
            #[target_feature(enable = "avx2,fma,f16c")]
            unsafe fn avx2<E: Elem>(job: Job<'_, E>, r0: usize, r1: usize, out: Out) {
                job.portable_body(r0, r1, out)
            }
            if crate::isa::avx2_fma_f16c() {
                // SAFETY: AVX2, FMA and F16C checked at run time.
                return unsafe { avx2(self, r0, r1, out) };
            }
        }
        self.portable_body(r0, r1, out)
    }

    /// Rows `r0..r1`, AVX2: eight 8-lane accumulators per tile, one broadcast and eight FMAs
    /// per active column, the column `PF_AHEAD` active columns ahead prefetched.
    ///
    /// # Safety
    /// AVX2 + FMA + F16C available; `out` owns rows `r0..r1`.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn avx2(self, r0: usize, r1: usize, out: Out) {
        let cols = self.f.cols;
        let n = self.idx.len();
        let lines = (TILE * E::DTYPE.size()).div_ceil(64);
        for t in r0 / TILE..r1.div_ceil(TILE) {
            let base = self.f.v.as_ptr().add(t * cols * TILE);
            let mut a = [_mm256_setzero_ps(); 8];
            for k in 0..n {
                if k + PF_AHEAD < n {
                    let p = base.add(*self.idx.get_unchecked(k + PF_AHEAD) as usize * TILE);
                    for l in 0..lines {
                        _mm_prefetch::<_MM_HINT_T0>((p as *const i8).wrapping_add(64 * l));
                    }
                }
                let p = base.add(*self.idx.get_unchecked(k) as usize * TILE);
                let xb = _mm256_set1_ps(*self.xs.get_unchecked(k));
                for (g, acc) in a.iter_mut().enumerate() {
                    *acc = _mm256_fmadd_ps(E::load8(p.add(8 * g)), xb, *acc);
                }
            }
            let mut sums = [0f32; TILE];
            for (g, acc) in a.iter().enumerate() {
                _mm256_storeu_ps(sums.as_mut_ptr().add(8 * g), *acc);
            }
            self.store(t, r1, &sums, out);
        }
    }
}

impl<E: Elem> WeightFormat for ColMajorOf<E> {
    dims!();
    /// Bytes a dense input reads (every column); see [`ColMajorOf::bytes_for_active`].
    fn nbytes(&self) -> usize {
        self.bytes_for_active(self.cols)
    }
    fn stored(&self) -> usize {
        self.v.len()
    }
    fn decode_rows(&self, r0: usize, r1: usize, out: &mut [f32]) {
        let c = self.cols;
        for r in r0..r1 {
            for j in 0..c {
                out[(r - r0) * c + j] = self.get(r, j);
            }
        }
    }
    fn matmul_add(&self, x: &[f32], m: usize, y: &mut [f32], accumulate: bool) {
        check_sizes(Self::KIND, self.rows, self.cols, x, m, y);
        if m <= SMALL_M {
            let (c, r) = (self.cols, self.rows);
            for i in 0..m {
                self.matvec_skip(&x[i * c..(i + 1) * c], &mut y[i * r..(i + 1) * r], accumulate);
            }
        } else {
            matmul_tiled(self, x, m, y, accumulate);
        }
    }
    fn matmul_naive(&self, x: &[f32], m: usize, y: &mut [f32]) {
        check_sizes(Self::KIND, self.rows, self.cols, x, m, y);
        naive_product(self.rows, self.cols, x, m, y, |r, emit| {
            for j in 0..self.cols {
                emit(j, self.get(r, j) as f64);
            }
        });
    }
    fn to_tensors(&self, name: &str) -> Vec<RawTensor> {
        let mut t = vec![
            shape_tensor(name, &[self.rows, self.cols]),
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
