//! Sparse-bitmask format (compressed-tensors' `sparse-bitmask`): per row a bitmask of nonzeros
//! in u64 words (bit `k % 64` of word `k / 64` is column `k`), plus the nonzeros packed in row
//! order as f32, bf16 or int8 with a per-row scale ([`BitmaskOf`]).
//!
//! At 50% density f32 values read 2.125 bytes per weight (dense f32: 4), at 30% 1.325, so a
//! bandwidth-bound matvec can gain up to 1.9× / 3×. The kernel expands each 16-column slice of
//! a row's packed values into place (`vexpandps`) and multiplies it with the matching slice of
//! `x`. With AVX-512 VBMI2, bf16 values are expanded straight into the high halves of the f32
//! lanes (one `vpexpandw` with the mask spread by `pdep`: expansion and conversion in one
//! instruction) and int8 values with `vpexpandb`. The prefill path decodes row tiles with the
//! same expand-loads and multiplies them with GEMM. NEON has no expand-load: there each 4-column
//! nibble of the mask selects a byte shuffle for one `tbl` over 4 loaded values
//! ([`Elem::expand4_neon`]).

use super::elem::{Elem, Values};
use super::sparse::{self, Entries};
use super::*;
#[cfg(target_arch = "x86_64")]
use super::{avx2, elem};
#[cfg(target_arch = "aarch64")]
use std::arch::aarch64::*;
#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// Set bits of each 4-bit value.
#[cfg(target_arch = "aarch64")]
const POP4: [u8; 16] = [0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4];

/// Sparse bitmask matrix with nonzeros stored as `E`.
#[derive(Clone, Debug, PartialEq)]
pub struct BitmaskOf<E: Elem> {
    rows: usize,
    cols: usize,
    mask: Vec<u64>,
    /// Row offsets into the values (prefix popcounts), `rows + 1` entries.
    off: Vec<usize>,
    vals: Values<E>,
}

/// Bitmask with f32 nonzeros.
pub type Bitmask = BitmaskOf<f32>;
/// Bitmask with bf16 nonzeros.
pub type BitmaskBf16 = BitmaskOf<half::bf16>;
/// Bitmask with int8 nonzeros and a per-row f32 scale (pruning + quantization):
/// `W[r, k] = q · scale[r]` for each set bit. A nonzero that rounds to 0 stays in the mask.
pub type BitmaskI8 = BitmaskOf<i8>;

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

/// Validates a mask tensor for `rows × cols` and returns its words and row offsets.
fn check_mask(
    t: &RawTensor,
    rows: usize,
    cols: usize,
    kind: &'static str,
) -> Result<(Vec<u64>, Vec<usize>)> {
    let wpr = cols.div_ceil(64);
    expect_len(t, rows.checked_mul(wpr), kind)?;
    let mask = read_u64(t);
    let tail: u64 = if cols.is_multiple_of(64) {
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

/// `acc += expand(values at *vp, k) · x[base..base + 16]`; advances `vp` past the
/// `popcount(k)` values used. `FULL`: all 16 lanes of `x` are in bounds, so `x` is loaded
/// unmasked (lanes outside `k` meet zero weights); else only the lanes in `k` are read.
/// `VBMI2`: expand through [`Elem::expand_load_vbmi2`].
///
/// # Safety
/// AVX-512 (see [`avx512_active`]), and VBMI2 when `VBMI2`; `*vp` valid for `popcount(k)` reads;
/// `base` valid for 16 reads when `FULL`, else where `k` is set.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn slice16<E: Elem, const VBMI2: bool, const FULL: bool>(
    k: u16,
    vp: &mut *const E,
    base: *const f32,
    acc: &mut __m512,
) {
    let wv = if VBMI2 {
        E::expand_load_vbmi2(k, *vp)
    } else {
        E::expand_load(k, *vp)
    };
    let xv = if FULL {
        _mm512_loadu_ps(base)
    } else {
        _mm512_maskz_loadu_ps(k, base)
    };
    *acc = _mm512_fmadd_ps(wv, xv, *acc);
    *vp = vp.wrapping_add(k.count_ones() as usize);
}

/// One 64-column mask word: four 16-column slices, unrolled so the accumulators stay in
/// registers.
///
/// # Safety
/// As [`slice16`] for each slice.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn word64<E: Elem, const VBMI2: bool, const FULL: bool>(
    word: u64,
    vp: &mut *const E,
    base: *const f32,
    a: &mut [__m512; 4],
) {
    slice16::<E, VBMI2, FULL>(word as u16, vp, base, &mut a[0]);
    slice16::<E, VBMI2, FULL>((word >> 16) as u16, vp, base.wrapping_add(16), &mut a[1]);
    slice16::<E, VBMI2, FULL>((word >> 32) as u16, vp, base.wrapping_add(32), &mut a[2]);
    slice16::<E, VBMI2, FULL>((word >> 48) as u16, vp, base.wrapping_add(48), &mut a[3]);
}

/// Whether `E`'s values expand faster with VBMI2 and the CPU has it.
#[cfg(target_arch = "x86_64")]
fn use_vbmi2<E: Elem>() -> bool {
    E::VBMI2_EXPAND && crate::isa::features().avx512vbmi2
}

impl<E: Elem> BitmaskOf<E> {
    const KIND: &'static str = match E::DTYPE {
        Dtype::F32 => "bitmask",
        Dtype::F16 => "bitmask-f16",
        Dtype::Bf16 => "bitmask-bf16",
        _ => "bitmask-i8",
    };
    /// Keeps the nonzeros of `w` (int8: each row's nonzeros quantized symmetrically).
    pub fn from_dense(w: &[f32], rows: usize, cols: usize) -> Result<Self> {
        check_dense(Self::KIND, w, rows, cols)?;
        let (mask, off) = build_mask(w, rows, cols);
        Ok(BitmaskOf {
            rows,
            cols,
            mask,
            off,
            vals: Values::encode_matrix(w, rows, cols, |v| v != 0.0),
        })
    }
    /// Number of nonzeros.
    pub fn nnz(&self) -> usize {
        self.vals.v.len()
    }
    pub fn from_tensors(name: &str, tensors: &[RawTensor]) -> Result<Self> {
        let (rows, cols) = read_dims(tensors, name, Self::KIND)?;
        let mt = find(tensors, name, "bitmask", Dtype::U64, Self::KIND)?;
        let (mask, off) = check_mask(mt, rows, cols, Self::KIND)?;
        let vals = Values::from_tensors(
            tensors,
            name,
            rows,
            Some(off[rows]),
            Self::KIND,
            "the bitmask popcount",
        )?;
        Ok(BitmaskOf {
            rows,
            cols,
            mask,
            off,
            vals,
        })
    }
    /// Rows `r0..r1` of the product (the body of the AVX-512 kernels below).
    ///
    /// # Safety
    /// AVX-512 available (and VBMI2 when `VBMI2`); masks validated (no bits past `cols`,
    /// popcounts = value counts).
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn rows_avx512<const VBMI2: bool>(
        &self,
        r0: usize,
        r1: usize,
        x: &[f32],
        m: usize,
        out: Out,
    ) {
        let wpr = self.cols.div_ceil(64);
        // Words whose 64 columns are all inside the row: x is read unmasked there.
        let full = self.cols / 64;
        for r in r0..r1 {
            let words = self.mask.as_ptr().add(r * wpr);
            prefetch_ahead(words, 2);
            for i in 0..m {
                let xp = x.as_ptr().add(i * self.cols);
                let mut vp = self.vals.v.as_ptr().add(self.off[r]);
                let mut a = [_mm512_setzero_ps(); 4];
                for w in 0..full {
                    // Up to 2 lines of values per 64 columns (f32 at ≤ 50% density).
                    prefetch_ahead(vp, 2);
                    word64::<E, VBMI2, true>(*words.add(w), &mut vp, xp.add(w * 64), &mut a);
                }
                if full < wpr {
                    // The last, partial word: lanes outside the mask are neither read nor
                    // faulted; masks have no bits past `cols`.
                    let base = xp.wrapping_add(full * 64);
                    word64::<E, VBMI2, false>(*words.add(full), &mut vp, base, &mut a);
                }
                let s = _mm512_add_ps(_mm512_add_ps(a[0], a[1]), _mm512_add_ps(a[2], a[3]));
                out.put(i, r, _mm512_reduce_add_ps(s) * self.vals.scale(r));
            }
        }
    }

    /// Rows `r0..r1` decoded to dense f32 (the prefill path decodes tiles, then runs GEMM):
    /// each 16-column slice is one expand-load and one store.
    ///
    /// # Safety
    /// As [`Self::rows_avx512`]; `out` holds `(r1 − r0) · cols` values.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn decode_avx512<const VBMI2: bool>(&self, r0: usize, r1: usize, out: &mut [f32]) {
        let (cols, wpr) = (self.cols, self.cols.div_ceil(64));
        for r in r0..r1 {
            let words = self.mask.as_ptr().add(r * wpr);
            let mut vp = self.vals.v.as_ptr().add(self.off[r]);
            let dst = out.as_mut_ptr().add((r - r0) * cols);
            let scale = _mm512_set1_ps(self.vals.scale(r));
            for w in 0..wpr {
                let word = *words.add(w);
                for q in 0..4 {
                    let c0 = w * 64 + q * 16;
                    if c0 >= cols {
                        break;
                    }
                    let k = (word >> (16 * q)) as u16;
                    let mut v = if VBMI2 {
                        E::expand_load_vbmi2(k, vp)
                    } else {
                        E::expand_load(k, vp)
                    };
                    if E::SCALED {
                        v = _mm512_mul_ps(v, scale);
                    }
                    vp = vp.add(k.count_ones() as usize);
                    _mm512_mask_storeu_ps(dst.add(c0), elem::first_lanes(cols - c0), v);
                }
            }
        }
    }

    /// # Safety
    /// As [`Self::decode_avx512`].
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512vl,avx512bw,fma,popcnt,bmi1,bmi2")]
    unsafe fn decode_plain(&self, r0: usize, r1: usize, out: &mut [f32]) {
        self.decode_avx512::<false>(r0, r1, out)
    }

    /// # Safety
    /// As [`Self::decode_avx512`], and AVX-512 VBMI2 available.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512vbmi2,fma,popcnt,bmi1,bmi2")]
    unsafe fn decode_vbmi2(&self, r0: usize, r1: usize, out: &mut [f32]) {
        self.decode_avx512::<true>(r0, r1, out)
    }

    /// # Safety
    /// As [`Self::rows_avx512`].
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512vl,avx512bw,fma,popcnt,bmi1,bmi2")]
    unsafe fn block_avx512(&self, r0: usize, r1: usize, x: &[f32], m: usize, out: Out) {
        self.rows_avx512::<false>(r0, r1, x, m, out)
    }

    /// # Safety
    /// As [`Self::rows_avx512`], and AVX-512 VBMI2 available.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512vbmi2,fma,popcnt,bmi1,bmi2")]
    unsafe fn block_avx512_vbmi2(&self, r0: usize, r1: usize, x: &[f32], m: usize, out: Out) {
        self.rows_avx512::<true>(r0, r1, x, m, out)
    }
}

#[cfg(target_arch = "x86_64")]
impl<E: Elem> BitmaskOf<E> {
    /// True when every 8-value load of row `r`'s values stays inside the value array (the
    /// AVX2 expand loads 8 values per mask byte, whatever its popcount); the few last rows
    /// where it would not take the scalar path.
    #[inline(always)]
    fn avx2_safe(&self, r: usize) -> bool {
        self.off[r + 1] + 8 <= self.vals.v.len()
    }

    /// Rows `r0..r1` of the product, AVX2: every mask byte expands 8 packed values into place
    /// ([`Elem::expand8`]) for one FMA with 8 columns of `x`; 4 accumulators. Columns past the
    /// last multiple of 8 are done scalar.
    ///
    /// # Safety
    /// AVX2 + FMA available; masks validated (no bits past `cols`, popcounts = value counts);
    /// `out` owns these rows.
    #[target_feature(enable = "avx2,fma,f16c,popcnt,bmi1,bmi2")]
    unsafe fn rows_avx2(&self, r0: usize, r1: usize, x: &[f32], m: usize, out: Out) {
        let (cols, wpr) = (self.cols, self.cols.div_ceil(64));
        let bytes = cols / 8; // mask bytes whose 8 columns are all inside the row
        for r in r0..r1 {
            let mask = self.mask.as_ptr().add(r * wpr) as *const u8;
            prefetch_ahead(mask, 2);
            for i in 0..m {
                let xi = &x[i * cols..(i + 1) * cols];
                if !self.avx2_safe(r) {
                    out.put(i, r, sparse::row_dot(self, r, xi) * self.vals.scale(r));
                    continue;
                }
                let xp = xi.as_ptr();
                let mut vp = self.vals.v.as_ptr().add(self.off[r]);
                let mut a = [_mm256_setzero_ps(); 4];
                let mut t = 0;
                while t + 8 <= bytes {
                    // One mask word: 64 columns, up to 2 lines of f32 values at ≤ 50% density.
                    prefetch_ahead(vp, 2);
                    for q in 0..8 {
                        let b = *mask.add(t + q);
                        let w = E::expand8(b, vp);
                        a[q % 4] =
                            _mm256_fmadd_ps(w, _mm256_loadu_ps(xp.add(8 * (t + q))), a[q % 4]);
                        vp = vp.add(b.count_ones() as usize);
                    }
                    t += 8;
                }
                while t < bytes {
                    // (a[0] only: a variable index would keep `a` in memory.)
                    let b = *mask.add(t);
                    let w = E::expand8(b, vp);
                    a[0] = _mm256_fmadd_ps(w, _mm256_loadu_ps(xp.add(8 * t)), a[0]);
                    vp = vp.add(b.count_ones() as usize);
                    t += 1;
                }
                let mut s = avx2::hsum(_mm256_add_ps(
                    _mm256_add_ps(a[0], a[1]),
                    _mm256_add_ps(a[2], a[3]),
                ));
                if 8 * bytes < cols {
                    // The last partial byte, scalar.
                    let mut b = *mask.add(bytes);
                    while b != 0 {
                        s += (*vp).to_f32() * xi[8 * bytes + b.trailing_zeros() as usize];
                        vp = vp.add(1);
                        b &= b - 1;
                    }
                }
                out.put(i, r, s * self.vals.scale(r));
            }
        }
    }

    /// Rows `r0..r1` decoded to dense f32, AVX2: one expand and one store per mask byte.
    ///
    /// # Safety
    /// As [`Self::rows_avx2`]; `out` holds `(r1 − r0) · cols` values.
    #[target_feature(enable = "avx2,fma,f16c,popcnt,bmi1,bmi2")]
    unsafe fn decode_avx2(&self, r0: usize, r1: usize, out: &mut [f32]) {
        let (cols, wpr) = (self.cols, self.cols.div_ceil(64));
        for r in r0..r1 {
            let row = &mut out[(r - r0) * cols..(r - r0 + 1) * cols];
            if !self.avx2_safe(r) {
                sparse::decode_row(self, r, row);
                continue;
            }
            let mask = self.mask.as_ptr().add(r * wpr) as *const u8;
            let s = self.vals.scale(r);
            let scale = _mm256_set1_ps(s);
            let mut vp = self.vals.v.as_ptr().add(self.off[r]);
            let dst = row.as_mut_ptr();
            let bytes = cols / 8;
            for t in 0..bytes {
                let b = *mask.add(t);
                let mut v = E::expand8(b, vp);
                if E::SCALED {
                    v = _mm256_mul_ps(v, scale);
                }
                _mm256_storeu_ps(dst.add(8 * t), v);
                vp = vp.add(b.count_ones() as usize);
            }
            if 8 * bytes < cols {
                // The last partial byte, scalar.
                row[8 * bytes..].fill(0.0);
                let mut b = *mask.add(bytes);
                while b != 0 {
                    row[8 * bytes + b.trailing_zeros() as usize] = (*vp).to_f32() * s;
                    vp = vp.add(1);
                    b &= b - 1;
                }
            }
        }
    }
}

#[cfg(target_arch = "aarch64")]
impl<E: Elem> BitmaskOf<E> {
    /// True when every 4-value load of row `r`'s values stays inside the value array (the
    /// NEON expand reads 4 values per nibble, whatever its popcount); the few last rows where
    /// it would not take the scalar path.
    #[inline(always)]
    fn neon_safe(&self, r: usize) -> bool {
        self.off[r + 1] + 4 <= self.vals.v.len()
    }

    /// Rows `r0..r1` of the product, NEON: 16 nibbles per mask word, 4 accumulators.
    ///
    /// # Safety
    /// Masks validated (no bits past `cols`, popcounts = value counts); `out` owns these rows.
    unsafe fn rows_neon(&self, r0: usize, r1: usize, x: &[f32], m: usize, out: Out) {
        let (cols, wpr) = (self.cols, self.cols.div_ceil(64));
        let full = cols / 64;
        for r in r0..r1 {
            let words = &self.mask[r * wpr..(r + 1) * wpr];
            let safe = self.neon_safe(r);
            for i in 0..m {
                let xi = &x[i * cols..(i + 1) * cols];
                let s = if safe {
                    let mut vp = self.vals.v.as_ptr().add(self.off[r]);
                    let mut a = [vdupq_n_f32(0.0); 4];
                    for (w, &word) in words[..full].iter().enumerate() {
                        let xp = xi.as_ptr().add(w * 64);
                        for q in 0..16 {
                            let nib = ((word >> (4 * q)) & 15) as usize;
                            let wv = E::expand4_neon(nib, vp);
                            a[q % 4] = vfmaq_f32(a[q % 4], wv, vld1q_f32(xp.add(4 * q)));
                            vp = vp.add(POP4[nib] as usize);
                        }
                    }
                    let mut s = vaddvq_f32(vaddq_f32(vaddq_f32(a[0], a[1]), vaddq_f32(a[2], a[3])));
                    // The partial last word, scalar.
                    if full < wpr {
                        let mut b = words[full];
                        while b != 0 {
                            let k = full * 64 + b.trailing_zeros() as usize;
                            s += (*vp).to_f32() * xi[k];
                            vp = vp.add(1);
                            b &= b - 1;
                        }
                    }
                    s
                } else {
                    sparse::row_dot(self, r, xi)
                };
                out.put(i, r, s * self.vals.scale(r));
            }
        }
    }

    /// Rows `r0..r1` decoded to dense f32, NEON: one expand and one store per nibble.
    ///
    /// # Safety
    /// As [`Self::rows_neon`]; `out` holds `(r1 − r0) · cols` values.
    unsafe fn decode_neon(&self, r0: usize, r1: usize, out: &mut [f32]) {
        let (cols, wpr) = (self.cols, self.cols.div_ceil(64));
        let full = cols / 64;
        for r in r0..r1 {
            let row = &mut out[(r - r0) * cols..(r - r0 + 1) * cols];
            if !self.neon_safe(r) || full < wpr {
                sparse::decode_row(self, r, row);
                continue;
            }
            let scale = self.vals.scale(r);
            let mut vp = self.vals.v.as_ptr().add(self.off[r]);
            let dst = row.as_mut_ptr();
            for w in 0..full {
                let word = self.mask[r * wpr + w];
                for q in 0..16 {
                    let nib = ((word >> (4 * q)) & 15) as usize;
                    let v = vmulq_n_f32(E::expand4_neon(nib, vp), scale);
                    vst1q_f32(dst.add(w * 64 + 4 * q), v);
                    vp = vp.add(POP4[nib] as usize);
                }
            }
        }
    }
}

impl<E: Elem> Entries for BitmaskOf<E> {
    type E = E;
    fn vals(&self) -> &Values<E> {
        &self.vals
    }
    fn each(&self, r: usize, mut f: impl FnMut(usize, usize)) {
        for (j, k) in (self.off[r]..).zip(iter_bits(&self.mask, self.cols, r)) {
            f(k, j);
        }
    }
}

impl<E: Elem> WeightFormat for BitmaskOf<E> {
    dims!();
    fn nbytes(&self) -> usize {
        self.vals.nbytes() + self.mask.len() * 8
    }
    fn stored(&self) -> usize {
        self.vals.v.len()
    }
    fn decode_rows(&self, r0: usize, r1: usize, out: &mut [f32]) {
        // SAFETY (decoder): the ISA checked; gets `(r1 − r0) · cols` values; masks validated.
        #[cfg(target_arch = "x86_64")]
        let isa = isa();
        #[cfg(target_arch = "x86_64")]
        let fast = matches!(isa, Isa::Avx512 | Isa::Avx2).then_some(|out: &mut [f32]| unsafe {
            match isa {
                Isa::Avx2 => self.decode_avx2(r0, r1, out),
                _ if use_vbmi2::<E>() => self.decode_vbmi2(r0, r1, out),
                _ => self.decode_plain(r0, r1, out),
            }
        });
        // SAFETY (decoder): masks validated; gets `(r1 − r0) · cols` values.
        #[cfg(target_arch = "aarch64")]
        let fast = (isa() == Isa::Neon)
            .then_some(|out: &mut [f32]| unsafe { self.decode_neon(r0, r1, out) });
        #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
        let fast: Option<fn(&mut [f32])> = None;
        sparse::decode_rows(self, r0, r1, out, fast)
    }
    fn matmul_add(&self, x: &[f32], m: usize, y: &mut [f32], acc: bool) {
        // SAFETY (kernel): the ISA checked; masks validated; rows written disjointly.
        #[cfg(target_arch = "x86_64")]
        let (isa, vbmi2) = (isa(), use_vbmi2::<E>());
        #[cfg(target_arch = "x86_64")]
        let fast = matches!(isa, Isa::Avx512 | Isa::Avx2).then_some(|r0, r1, out| unsafe {
            match isa {
                Isa::Avx2 => self.rows_avx2(r0, r1, x, m, out),
                _ if vbmi2 => self.block_avx512_vbmi2(r0, r1, x, m, out),
                _ => self.block_avx512(r0, r1, x, m, out),
            }
        });
        // SAFETY (kernel): masks validated; rows written disjointly.
        #[cfg(target_arch = "aarch64")]
        let fast = (isa() == Isa::Neon)
            .then_some(|r0, r1, out| unsafe { self.rows_neon(r0, r1, x, m, out) });
        #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
        let fast: Option<fn(usize, usize, Out)> = None;
        sparse::product(self, x, m, y, acc, 1, fast)
    }
    fn matmul_naive(&self, x: &[f32], m: usize, y: &mut [f32]) {
        sparse::naive(self, x, m, y)
    }
    fn to_tensors(&self, name: &str) -> Vec<RawTensor> {
        let mut t = vec![
            shape_tensor(name, &[self.rows, self.cols]),
            RawTensor::u64(format!("{name}.bitmask"), &self.mask),
        ];
        t.extend(self.vals.tensors(name));
        t
    }
}
