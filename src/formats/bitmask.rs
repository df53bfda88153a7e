//! Sparse-bitmask format (compressed-tensors' `sparse-bitmask`): per row a bitmask of nonzeros
//! in u64 words (bit `k % 64` of word `k / 64` is column `k`), plus the nonzeros packed in row
//! order as f32, bf16 or int8 with a per-row scale ([`BitmaskOf`]).
//!
//! At 50% density f32 values read 2.125 bytes per weight (dense f32: 4), at 30% 1.325, so a
//! bandwidth-bound matvec can gain up to 1.9× / 3×. The kernel expands each 16-column slice of
//! a row's packed values into place (`vexpandps`) and multiplies it with the matching
//! (masked) slice of `x`.

use super::elem::{Elem, Values};
use super::sparse::{self, Entries};
use super::*;
#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

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

/// `acc += expand(values at *vp, k) · x[base..base + 16] (masked by k)`; advances `vp` past
/// the `popcount(k)` values used.
///
/// # Safety
/// AVX-512 (see [`has_avx512`]); `*vp` valid for `popcount(k)` reads; `base` valid where `k`
/// is set.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn slice16<E: Elem>(k: u16, vp: &mut *const E, base: *const f32, acc: &mut __m512) {
    let wv = E::expand_load(k, *vp);
    let xv = _mm512_maskz_loadu_ps(k, base);
    *acc = _mm512_fmadd_ps(wv, xv, *acc);
    *vp = vp.wrapping_add(k.count_ones() as usize);
}

impl<E: Elem> BitmaskOf<E> {
    const KIND: &'static str = match E::DTYPE {
        Dtype::F32 => "bitmask",
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
    /// # Safety
    /// AVX-512 available; masks validated (no bits past `cols`, popcounts = value counts).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512vl,avx512bw,fma,popcnt,bmi1,bmi2")]
    unsafe fn block_avx512(&self, r0: usize, r1: usize, x: &[f32], m: usize, out: Out) {
        let wpr = self.cols.div_ceil(64);
        for r in r0..r1 {
            let words = self.mask.as_ptr().add(r * wpr);
            for i in 0..m {
                let xp = x.as_ptr().add(i * self.cols);
                let mut vp = self.vals.v.as_ptr().add(self.off[r]);
                let (mut a0, mut a1, mut a2, mut a3) = (
                    _mm512_setzero_ps(),
                    _mm512_setzero_ps(),
                    _mm512_setzero_ps(),
                    _mm512_setzero_ps(),
                );
                prefetch_ahead(words.add(wpr), 1);
                for w in 0..wpr {
                    let word = *words.add(w);
                    // Up to 2 lines of values per 64 columns (f32 at ≤ 50% density).
                    prefetch_ahead(vp, 2);
                    let base = xp.wrapping_add(w * 64);
                    // Four 16-column slices, unrolled so the accumulators stay in registers.
                    // Lanes outside a mask are neither read nor faulted; masks have no bits
                    // past `cols`.
                    slice16(word as u16, &mut vp, base, &mut a0);
                    slice16((word >> 16) as u16, &mut vp, base.wrapping_add(16), &mut a1);
                    slice16((word >> 32) as u16, &mut vp, base.wrapping_add(32), &mut a2);
                    slice16((word >> 48) as u16, &mut vp, base.wrapping_add(48), &mut a3);
                }
                let a = [a0, a1, a2, a3];
                let s = _mm512_add_ps(_mm512_add_ps(a[0], a[1]), _mm512_add_ps(a[2], a[3]));
                out.put(i, r, _mm512_reduce_add_ps(s) * self.vals.scale(r));
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
        sparse::decode_rows(self, r0, r1, out)
    }
    fn matmul_add(&self, x: &[f32], m: usize, y: &mut [f32], acc: bool) {
        // SAFETY (kernel): `product` calls it only after `has_avx512()`; masks validated;
        // rows written disjointly.
        #[cfg(target_arch = "x86_64")]
        let fast = Some(|r0, r1, out| unsafe { self.block_avx512(r0, r1, x, m, out) });
        #[cfg(not(target_arch = "x86_64"))]
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
