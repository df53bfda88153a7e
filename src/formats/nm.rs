//! N:M semi-structured sparsity (2:4, 4:8, ...): in every group of M consecutive columns at
//! most N weights are nonzero. Stored as the N kept values per group plus their in-group
//! indices, packed LSB-first at `ceil(log2 M)` bits each (2 bits for M = 4, 3 for M = 8) in a
//! per-row bit stream of `ceil(values_per_row · bits / 8)` bytes. Values are f32, bf16 or int8
//! with a per-row scale ([`NMOf`]); 2:4 with f32 values reads 2.125 bytes per weight.
//! AVX-512 kernels gather `x` with `vpermt2ps` for every M = 2N pattern with N | 16; the AVX2
//! kernels pick from two `vpermps` with a blend for M = 2N with N | 8; the NEON kernel does 2:4
//! with one `tbl` per index byte (other patterns take the portable kernel).

use super::elem::{Elem, Values};
use super::sparse::{self, Entries};
use super::*;
#[cfg(target_arch = "x86_64")]
use super::{avx2, elem};
#[cfg(target_arch = "aarch64")]
use std::arch::aarch64::*;
#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// NEON 2:4 gathers: for each index byte (4 kept values of two 4-column groups, 2 bits each,
/// LSB first), the `tbl` byte indices that pick their 4 inputs out of the 8 f32 `x` values of
/// the two groups (a 32-byte table).
#[cfg(target_arch = "aarch64")]
static GATHER_2_4: [[u8; 16]; 256] = {
    let mut t = [[0u8; 16]; 256];
    let mut byte = 0;
    while byte < 256 {
        let mut lane = 0;
        while lane < 4 {
            let col = 4 * (lane / 2) + ((byte >> (2 * lane)) & 3);
            let mut b = 0;
            while b < 4 {
                t[byte][4 * lane + b] = (4 * col + b) as u8;
                b += 1;
            }
            lane += 1;
        }
        byte += 1;
    }
    t
};

/// Padding after the index stream so the kernels may read whole u64 / u16 words.
const PAD: usize = 8;

/// N:M packed matrix with values stored as `E`.
#[derive(Clone, Debug, PartialEq)]
pub struct NMOf<E: Elem> {
    rows: usize,
    cols: usize,
    n: usize,
    m: usize,
    bits: usize,
    /// Kept values per row: `cols / m · n`.
    vpr: usize,
    /// Index bytes per row.
    row_bytes: usize,
    vals: Values<E>,
    /// `rows · row_bytes` bytes plus `PAD` zero bytes.
    idx: Vec<u8>,
}

/// N:M with f32 values.
pub type NM = NMOf<f32>;
/// N:M with bf16 values.
pub type NMBf16 = NMOf<half::bf16>;
/// N:M with int8 values and a per-row f32 scale.
pub type NMI8 = NMOf<i8>;

fn bits_for(m: usize) -> usize {
    (usize::BITS - (m - 1).leading_zeros()) as usize
}

impl<E: Elem> NMOf<E> {
    const KIND: &'static str = match E::DTYPE {
        Dtype::F32 => "nm",
        Dtype::F16 => "nm-f16",
        Dtype::Bf16 => "nm-bf16",
        _ => "nm-i8",
    };
    /// Packs `w`, which must be N:M sparse along rows (`cols % m == 0`, `1 ≤ n < m ≤ 16`).
    /// A group with more than `n` nonzeros is an error naming its row and group; groups with
    /// fewer store explicit zeros.
    pub fn from_dense(w: &[f32], rows: usize, cols: usize, n: usize, m: usize) -> Result<Self> {
        check_dense(Self::KIND, w, rows, cols)?;
        if !(1..m).contains(&n) || m > 16 {
            return Err(Error::Invalid(format!(
                "nm: need 1 ≤ N < M ≤ 16, got {n}:{m}"
            )));
        }
        if !cols.is_multiple_of(m) {
            return Err(Error::Invalid(format!(
                "nm {n}:{m}: {cols} columns is not a multiple of {m}"
            )));
        }
        let mut s = Self::empty(rows, cols, n, m);
        let groups = cols / m;
        let mut kept = vec![0f32; rows * s.vpr];
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
                    kept[r * s.vpr + v] = grp[k];
                    s.set_idx(r, v, k);
                }
            }
        }
        let vpr = s.vpr;
        s.vals = Values::encode((0..rows).map(|r| &kept[r * vpr..(r + 1) * vpr]));
        Ok(s)
    }

    fn empty(rows: usize, cols: usize, n: usize, m: usize) -> Self {
        let bits = bits_for(m);
        let vpr = cols / m * n;
        let row_bytes = (vpr * bits).div_ceil(8);
        NMOf {
            rows,
            cols,
            n,
            m,
            bits,
            vpr,
            row_bytes,
            vals: Values {
                v: Vec::new(),
                scales: Vec::new(),
            },
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

    /// Column of row `r`'s kept value `v`: its group's first column plus its in-group index.
    #[inline(always)]
    fn col_of(&self, r: usize, v: usize) -> usize {
        (v / self.n) * self.m + self.idx_at(r, v)
    }

    /// Row `r`'s first kept value and first index byte (the SIMD kernels' starting points;
    /// in bounds for `r < rows`).
    #[inline(always)]
    fn row_ptrs(&self, r: usize) -> (*const E, *const u8) {
        (
            self.vals.v.as_ptr().wrapping_add(r * self.vpr),
            self.idx.as_ptr().wrapping_add(r * self.row_bytes),
        )
    }

    /// (N, M).
    pub fn pattern(&self) -> (usize, usize) {
        (self.n, self.m)
    }

    pub fn from_tensors(name: &str, tensors: &[RawTensor]) -> Result<Self> {
        let s = read_shape(tensors, name, 4, Self::KIND)?;
        let (rows, cols, n, m) = (s[0], s[1], s[2], s[3]);
        if !(1..m).contains(&n) || m > 16 || cols % m != 0 {
            return Err(ferr(
                format!("{name}.shape"),
                Self::KIND,
                format!("bad N:M {n}:{m} for {cols} columns"),
            ));
        }
        let bits = bits_for(m);
        let vpr = cols / m * n;
        let row_bytes = (vpr * bits).div_ceil(8);
        let it = find(tensors, name, "indices", Dtype::U8, Self::KIND)?;
        expect_len(it, rows.checked_mul(row_bytes), Self::KIND)?;
        let vals = Values::from_tensors(
            tensors,
            name,
            rows,
            rows.checked_mul(vpr),
            Self::KIND,
            "the shape",
        )?;
        // Sizes now match real buffers, so allocating is safe.
        let mut out = Self::empty(rows, cols, n, m);
        out.vals = vals;
        out.idx[..rows * out.row_bytes].copy_from_slice(&it.data);
        for r in 0..rows {
            for g in 0..cols / m {
                let mut prev = None;
                for j in 0..n {
                    let k = out.idx_at(r, g * n + j);
                    if k >= m || prev.is_some_and(|p| k <= p) {
                        return Err(ferr(
                            it.name.clone(),
                            Self::KIND,
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

    /// The x86 kernel set that runs this pattern now ([`isa`], if it has a kernel for it).
    #[cfg(target_arch = "x86_64")]
    fn x86_kernels(&self) -> Option<Isa> {
        x86_simd().filter(|&isa| match isa {
            Isa::Avx2 => self.avx2_pattern(),
            _ => self.fast_pattern(),
        })
    }

    /// True when the permute kernel applies: M = 2N and N divides 16 (1:2, 2:4, 4:8, 8:16).
    #[cfg(target_arch = "x86_64")]
    fn fast_pattern(&self) -> bool {
        self.m == 2 * self.n && 16 % self.n == 0
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512vl,avx512bw,fma,popcnt,bmi1,bmi2")]
    unsafe fn block_avx512(&self, r0: usize, r1: usize, x: &[f32], mm: usize, out: Out) {
        let dec = IdxDecoder::new(self.n, self.m, self.bits);
        let step = 2 * self.bits; // index bytes per 16 values
        let (nb, rem) = (self.vpr / 16, self.vpr % 16);
        for r in r0..r1 {
            let (vp, ip) = self.row_ptrs(r);
            for i in 0..mm {
                let xp = x.as_ptr().add(i * self.cols);
                let mut a0 = _mm512_setzero_ps();
                let mut a1 = _mm512_setzero_ps();
                let mut blk = 0;
                prefetch_ahead(ip, 1);
                while blk + 2 <= nb {
                    // 32 values (2 lines of f32) per iteration.
                    prefetch_ahead(vp.add(16 * blk), 2);
                    let i0 = dec.decode(ip.add(blk * step));
                    let i1 = dec.decode(ip.add((blk + 1) * step));
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
                    a0 = _mm512_fmadd_ps(E::load16(vp.add(16 * blk)), x0, a0);
                    a1 = _mm512_fmadd_ps(E::load16(vp.add(16 * blk + 16)), x1, a1);
                    blk += 2;
                }
                if blk < nb {
                    let i0 = dec.decode(ip.add(blk * step));
                    let x0 = _mm512_permutex2var_ps(
                        _mm512_loadu_ps(xp.add(32 * blk)),
                        i0,
                        _mm512_loadu_ps(xp.add(32 * blk + 16)),
                    );
                    a0 = _mm512_fmadd_ps(E::load16(vp.add(16 * blk)), x0, a0);
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
                    let iv = dec.decode(ip.add(nb * step));
                    let xg = _mm512_permutex2var_ps(
                        _mm512_maskz_loadu_ps(mlo, xb),
                        iv,
                        _mm512_maskz_loadu_ps(mhi, xb.wrapping_add(16)),
                    );
                    a0 = _mm512_mask3_fmadd_ps(E::load_first(rem, vp.add(16 * nb)), xg, a0, lm);
                }
                let sum = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
                out.put(i, r, sum * self.vals.scale(r));
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
impl<E: Elem> NMOf<E> {
    /// True when the AVX2 kernel applies: M = 2N and N divides 8 (1:2, 2:4, 4:8, 8:16), so 8
    /// kept values span a 16-column window and their indices fit one u32.
    fn avx2_pattern(&self) -> bool {
        self.m == 2 * self.n && 8 % self.n == 0
    }

    /// Rows `r0..r1` of the product for the AVX2 patterns: per 8 kept values, their column
    /// offsets in the 16-column window are decoded from one u32 of the index stream (variable
    /// shifts), the 8 inputs picked from the window's two halves ([`avx2::gather16`]), one FMA.
    /// The last `vpr % 8` values are done scalar.
    ///
    /// # Safety
    /// AVX2 + FMA available; AVX2 pattern; indices validated (< M); `out` owns these rows.
    #[target_feature(enable = "avx2,fma,f16c,popcnt,bmi1,bmi2")]
    unsafe fn block_avx2(&self, r0: usize, r1: usize, x: &[f32], mm: usize, out: Out) {
        let dec = Avx2Offsets::new(self.n, self.m, self.bits);
        let nb = self.vpr / 8;
        for r in r0..r1 {
            let (vp, ip) = self.row_ptrs(r);
            for i in 0..mm {
                let xi = &x[i * self.cols..(i + 1) * self.cols];
                let xp = xi.as_ptr();
                // 8 kept values (block `blk`) times their gathered inputs.
                let term = |blk: usize| {
                    let off = dec.offsets(ip.add(blk * self.bits));
                    let g = avx2::gather16(
                        _mm256_loadu_ps(xp.add(16 * blk)),
                        _mm256_loadu_ps(xp.add(16 * blk + 8)),
                        off,
                    );
                    (E::load8(vp.add(8 * blk)), g)
                };
                // Two accumulators in separate variables, so they stay in registers.
                let (mut a0, mut a1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
                prefetch_ahead(ip, 1);
                let mut blk = 0;
                while blk + 2 <= nb {
                    prefetch_ahead(vp.add(8 * blk), 1);
                    let (w0, g0) = term(blk);
                    let (w1, g1) = term(blk + 1);
                    a0 = _mm256_fmadd_ps(w0, g0, a0);
                    a1 = _mm256_fmadd_ps(w1, g1, a1);
                    blk += 2;
                }
                if blk < nb {
                    let (w0, g0) = term(blk);
                    a0 = _mm256_fmadd_ps(w0, g0, a0);
                }
                let mut s = avx2::hsum(_mm256_add_ps(a0, a1));
                for v in 8 * nb..self.vpr {
                    s += (*vp.add(v)).to_f32() * xi[self.col_of(r, v)];
                }
                out.put(i, r, s * self.vals.scale(r));
            }
        }
    }

    /// Rows `r0..r1` decoded to dense f32 (the prefill path), AVX2 patterns, without scalar
    /// stores: the 8 kept values of each 16-column window, loaded once, are permuted into both
    /// 8-column halves ([`avx2::expand8_reg`]; the upper half starts at value `popcount(low
    /// mask)`, which 8:16 needs) by the window's 16-bit column mask. 2:4 reads the mask of each
    /// index byte (4 values, 8 columns) from a table ([`avx2::MASK_2OF4`]); the other patterns
    /// build it from the decoded offsets (`1 << offset`, OR-ed across lanes). Offsets are
    /// distinct and, with in-group indices validated increasing, in column order.
    ///
    /// # Safety
    /// As [`Self::block_avx2`]; `out` holds `(r1 − r0) · cols` values.
    #[target_feature(enable = "avx2,fma,f16c,popcnt,bmi1,bmi2")]
    unsafe fn decode_avx2(&self, r0: usize, r1: usize, out: &mut [f32]) {
        if (self.n, self.m) == (2, 4) {
            self.decode_avx2_by(r0, r1, out, |ip, blk| {
                let b = ip.add(2 * blk);
                let lo = avx2::MASK_2OF4[*b as usize];
                (lo, avx2::MASK_2OF4[*b.add(1) as usize], 4)
            })
        } else {
            let dec = Avx2Offsets::new(self.n, self.m, self.bits);
            let one = _mm256_set1_epi32(1);
            self.decode_avx2_by(r0, r1, out, |ip, blk| {
                let off = dec.offsets(ip.add(blk * self.bits));
                let mask = avx2::or_lanes(_mm256_sllv_epi32(one, off));
                let lo = mask as u8;
                (lo, (mask >> 8) as u8, lo.count_ones() as i32)
            })
        }
    }

    /// [`Self::decode_avx2`] with `masks(index stream, window)` giving a window's low and high
    /// 8-column masks and the value the high half starts at.
    ///
    /// # Safety
    /// As [`Self::decode_avx2`]; `masks` reads only the row's index stream.
    #[target_feature(enable = "avx2,fma,f16c,popcnt,bmi1,bmi2")]
    unsafe fn decode_avx2_by(
        &self,
        r0: usize,
        r1: usize,
        out: &mut [f32],
        masks: impl Fn(*const u8, usize) -> (u8, u8, i32),
    ) {
        let (c, nb) = (self.cols, self.vpr / 8);
        for r in r0..r1 {
            let (vp, ip) = self.row_ptrs(r);
            let row = &mut out[(r - r0) * c..(r - r0 + 1) * c];
            let s = self.vals.scale(r);
            let scale = _mm256_set1_ps(s);
            let dst = row.as_mut_ptr();
            for blk in 0..nb {
                let mut v = E::load8(vp.add(8 * blk));
                if E::SCALED {
                    v = _mm256_mul_ps(v, scale);
                }
                let (lo, hi, first) = masks(ip, blk);
                _mm256_storeu_ps(dst.add(16 * blk), avx2::expand8_reg(lo, v, 0));
                _mm256_storeu_ps(dst.add(16 * blk + 8), avx2::expand8_reg(hi, v, first));
            }
            row[16 * nb..].fill(0.0);
            for v in 8 * nb..self.vpr {
                row[self.col_of(r, v)] = (*vp.add(v)).to_f32() * s;
            }
        }
    }
}

/// Column offsets (0..16) of 8 consecutive kept values inside their 16-column window (AVX2
/// patterns: M = 2N, N divides 8): lane `j` is `(j / N)·M` plus bits `j·b .. (j+1)·b` of the
/// u32 at the values' first index byte (`b` = index bits; 8 values take `b` bytes).
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
struct Avx2Offsets {
    shifts: __m256i,
    base: __m256i,
    kmask: __m256i,
}

#[cfg(target_arch = "x86_64")]
impl Avx2Offsets {
    #[inline(always)]
    unsafe fn new(n: usize, m: usize, bits: usize) -> Avx2Offsets {
        let shifts: [i32; 8] = std::array::from_fn(|j| (j * bits) as i32);
        let base: [i32; 8] = std::array::from_fn(|j| ((j / n) * m) as i32);
        Avx2Offsets {
            shifts: _mm256_loadu_si256(shifts.as_ptr().cast()),
            base: _mm256_loadu_si256(base.as_ptr().cast()),
            kmask: _mm256_set1_epi32((1 << bits) - 1),
        }
    }
    /// # Safety
    /// AVX2; `ip` valid for 4 reads (the index stream is padded).
    #[inline(always)]
    unsafe fn offsets(&self, ip: *const u8) -> __m256i {
        let word = _mm256_set1_epi32(std::ptr::read_unaligned(ip as *const u32) as i32);
        _mm256_add_epi32(
            _mm256_and_si256(_mm256_srlv_epi32(word, self.shifts), self.kmask),
            self.base,
        )
    }
}

/// Column offsets (0..32) of 16 consecutive kept values inside their 32-column window, from the
/// packed index stream (fast patterns: M = 2N, N divides 16). 16·bits ≤ 64, so one u64 read and
/// two 64-bit variable shifts decode them.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
struct IdxDecoder {
    sh_even: __m512i,
    sh_odd: __m512i,
    base: __m512i,
    lo32: __m512i,
    kmask: __m512i,
}

#[cfg(target_arch = "x86_64")]
impl IdxDecoder {
    #[inline(always)]
    unsafe fn new(n: usize, m: usize, bits: usize) -> IdxDecoder {
        let b = bits as i64;
        let even: [i64; 8] = std::array::from_fn(|q| 2 * q as i64 * b);
        let odd: [i64; 8] = std::array::from_fn(|q| (2 * q as i64 + 1) * b);
        let base: [i32; 16] = std::array::from_fn(|j| ((j / n) * m) as i32);
        IdxDecoder {
            sh_even: _mm512_loadu_si512(even.as_ptr().cast()),
            sh_odd: _mm512_loadu_si512(odd.as_ptr().cast()),
            base: _mm512_loadu_si512(base.as_ptr().cast()),
            lo32: _mm512_set1_epi64(0xffff_ffff),
            kmask: _mm512_set1_epi32((1 << bits) - 1),
        }
    }
    /// # Safety
    /// AVX-512F; `ip` valid for 8 reads (the index stream is padded).
    #[inline(always)]
    unsafe fn decode(&self, ip: *const u8) -> __m512i {
        let bc = _mm512_set1_epi64(std::ptr::read_unaligned(ip as *const u64) as i64);
        let a = _mm512_and_si512(_mm512_srlv_epi64(bc, self.sh_even), self.lo32);
        let o = _mm512_slli_epi64::<32>(_mm512_srlv_epi64(bc, self.sh_odd));
        _mm512_add_epi32(
            _mm512_and_si512(_mm512_or_si512(a, o), self.kmask),
            self.base,
        )
    }
}

impl<E: Elem> NMOf<E> {
    /// Rows `r0..r1` decoded to dense f32 (the prefill path): each 16 kept values are
    /// scattered into their 32-column window of a zeroed row.
    ///
    /// # Safety
    /// AVX-512 (see [`avx512_active`]); fast pattern; indices validated; `out` holds
    /// `(r1 − r0) · cols` values.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512vl,avx512bw,fma,popcnt,bmi1,bmi2")]
    unsafe fn decode_avx512(&self, r0: usize, r1: usize, out: &mut [f32]) {
        let dec = IdxDecoder::new(self.n, self.m, self.bits);
        let step = 2 * self.bits;
        let (nb, rem) = (self.vpr / 16, self.vpr % 16);
        let c = self.cols;
        out[..(r1 - r0) * c].fill(0.0);
        for r in r0..r1 {
            let (vp, ip) = self.row_ptrs(r);
            let dst = out.as_mut_ptr().add((r - r0) * c);
            let scale = _mm512_set1_ps(self.vals.scale(r));
            for blk in 0..=nb {
                let lanes = if blk < nb { 16 } else { rem };
                if lanes == 0 {
                    break;
                }
                let idx = dec.decode(ip.add(blk * step));
                let mut v = E::load_first(lanes, vp.add(16 * blk));
                if E::SCALED {
                    v = _mm512_mul_ps(v, scale);
                }
                // Window `blk` covers columns 32·blk .. 32·blk + 32 (fewer in the tail, where
                // only the `lanes` valid values are written, all inside the row).
                _mm512_mask_i32scatter_ps::<4>(
                    dst.add(32 * blk).cast(),
                    elem::first_lanes(lanes),
                    idx,
                    v,
                );
            }
        }
    }
}

impl<E: Elem> Entries for NMOf<E> {
    type E = E;
    fn vals(&self) -> &Values<E> {
        &self.vals
    }
    fn each(&self, r: usize, mut f: impl FnMut(usize, usize)) {
        for v in 0..self.vpr {
            f(self.col_of(r, v), r * self.vpr + v);
        }
    }
}

#[cfg(target_arch = "aarch64")]
impl<E: Elem> NMOf<E> {
    /// True when the NEON kernel applies (2:4).
    fn neon_pattern(&self) -> bool {
        self.n == 2 && self.m == 4
    }

    /// Rows `r0..r1` of the product for 2:4, NEON: per index byte, 8 inputs loaded as a 32-byte
    /// table, the 4 kept ones gathered by one `tbl`, one multiply-add with the 4 values.
    ///
    /// # Safety
    /// 2:4; indices validated; `out` owns these rows.
    unsafe fn block_neon(&self, r0: usize, r1: usize, x: &[f32], mm: usize, out: Out) {
        let full = self.vpr / 4; // whole index bytes per row
        for r in r0..r1 {
            let (vp, ip) = self.row_ptrs(r);
            for i in 0..mm {
                let xi = &x[i * self.cols..(i + 1) * self.cols];
                let xp = xi.as_ptr();
                let mut a = [vdupq_n_f32(0.0); 2];
                for b in 0..full {
                    let table = uint8x16x2_t(
                        vld1q_u8(xp.add(8 * b) as *const u8),
                        vld1q_u8(xp.add(8 * b + 4) as *const u8),
                    );
                    let g = vld1q_u8(GATHER_2_4.get_unchecked(*ip.add(b) as usize).as_ptr());
                    let xv = vreinterpretq_f32_u8(vqtbl2q_u8(table, g));
                    a[b % 2] = vfmaq_f32(a[b % 2], E::load4_neon(vp.add(4 * b)), xv);
                }
                let mut s = vaddvq_f32(vaddq_f32(a[0], a[1]));
                for v in 4 * full..self.vpr {
                    s += (*vp.add(v)).to_f32() * xi[self.col_of(r, v)];
                }
                out.put(i, r, s * self.vals.scale(r));
            }
        }
    }
}

impl<E: Elem> WeightFormat for NMOf<E> {
    dims!();
    fn nbytes(&self) -> usize {
        self.vals.nbytes() + self.rows * self.row_bytes
    }
    fn stored(&self) -> usize {
        self.vals.v.len()
    }
    fn decode_rows(&self, r0: usize, r1: usize, out: &mut [f32]) {
        // SAFETY (decoder): the ISA and the pattern checked; gets `(r1 − r0) · cols` values;
        // indices validated on construction.
        #[cfg(target_arch = "x86_64")]
        let fast = self.x86_kernels().map(|isa| {
            move |out: &mut [f32]| unsafe {
                if isa == Isa::Avx2 {
                    self.decode_avx2(r0, r1, out)
                } else {
                    self.decode_avx512(r0, r1, out)
                }
            }
        });
        #[cfg(not(target_arch = "x86_64"))]
        let fast: Option<fn(&mut [f32])> = None;
        sparse::decode_rows(self, r0, r1, out, fast)
    }
    fn matmul_add(&self, x: &[f32], m: usize, y: &mut [f32], acc: bool) {
        // SAFETY (kernel): the ISA and the pattern checked; indices validated (< M, so every
        // permuted lane is inside the 32- or 16-column window); disjoint rows.
        #[cfg(target_arch = "x86_64")]
        let fast = unsafe {
            sparse::x86_kernel(
                self,
                self.x86_kernels(),
                x,
                m,
                Self::block_avx2,
                Self::block_avx512,
            )
        };
        // SAFETY (kernel): NEON and 2:4 checked; indices validated; disjoint rows.
        #[cfg(target_arch = "aarch64")]
        let fast = (isa() == Isa::Neon && self.neon_pattern())
            .then_some(|r0, r1, out| unsafe { self.block_neon(r0, r1, x, m, out) });
        #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
        let fast: Option<fn(usize, usize, Out)> = None;
        sparse::product(self, x, m, y, acc, 1, fast)
    }
    fn matmul_naive(&self, x: &[f32], m: usize, y: &mut [f32]) {
        sparse::naive(self, x, m, y)
    }
    fn to_tensors(&self, name: &str) -> Vec<RawTensor> {
        let mut t = vec![shape_tensor(name, &[self.rows, self.cols, self.n, self.m])];
        t.extend(self.vals.tensors(name));
        t.push(RawTensor::bytes(
            format!("{name}.indices"),
            Dtype::U8,
            self.idx[..self.rows * self.row_bytes].to_vec(),
        ));
        t
    }
}
