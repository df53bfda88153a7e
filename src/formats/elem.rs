//! Stored value types of the weight formats: f32, bf16, IEEE f16 and int8 with a per-row f32
//! scale.
//!
//! Every format (dense, bitmask, CSR, N:M) is generic over [`Elem`], so the f32, bf16, f16 and int8
//! variants share one kernel each and differ only in how 16 stored values become 16 f32 lanes
//! (`load16` / `load_first` / `expand_load`; `load8` for AVX2, `load4_neon` / `expand4_neon`
//! for NEON) and whether each row carries a scale. Products
//! always accumulate in f32; an int8 row's sum is multiplied by its scale at the end.

use super::{Dtype, RawTensor};
#[cfg(target_arch = "aarch64")]
use std::arch::aarch64::*;
#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// NEON expand shuffles: for each 4-bit mask, the `tbl` byte indices that move the packed
/// values (`size` bytes each) into the set lanes of a 4 × 32-bit vector. A value lands in the
/// top `size` bytes of its lane (so bf16 becomes f32 and an int8 becomes `b << 24`, which an
/// arithmetic shift sign-extends); every other byte is 0xFF, which `tbl` turns into 0.
#[cfg(target_arch = "aarch64")]
const fn expand_lut(size: usize) -> [[u8; 16]; 16] {
    let mut t = [[0xFFu8; 16]; 16];
    let mut nib = 0;
    while nib < 16 {
        let mut rank = 0;
        let mut lane = 0;
        while lane < 4 {
            if nib & (1 << lane) != 0 {
                let mut b = 0;
                while b < size {
                    t[nib][4 * lane + 4 - size + b] = (rank * size + b) as u8;
                    b += 1;
                }
                rank += 1;
            }
            lane += 1;
        }
        nib += 1;
    }
    t
}

#[cfg(target_arch = "aarch64")]
static EXPAND_F32: [[u8; 16]; 16] = expand_lut(4);
#[cfg(target_arch = "aarch64")]
static EXPAND_BF16: [[u8; 16]; 16] = expand_lut(2);
#[cfg(target_arch = "aarch64")]
static EXPAND_I8: [[u8; 16]; 16] = expand_lut(1);

/// `tbl` of a 16-byte table with the shuffle of `nib`.
#[cfg(target_arch = "aarch64")]
#[inline(always)]
unsafe fn shuffle(table: uint8x16_t, lut: &[[u8; 16]; 16], nib: usize) -> uint8x16_t {
    vqtbl1q_u8(table, vld1q_u8(lut.get_unchecked(nib).as_ptr()))
}

/// 4 bytes at `p` in the low bytes of a 16-byte vector (an unaligned 4-byte read).
#[cfg(target_arch = "aarch64")]
#[inline(always)]
unsafe fn load4_bytes(p: *const u8) -> uint8x16_t {
    vreinterpretq_u8_u32(vsetq_lane_u32::<0>(
        (p as *const u32).read_unaligned(),
        vdupq_n_u32(0),
    ))
}

/// A stored weight value type.
pub trait Elem: Copy + Send + Sync + PartialEq + std::fmt::Debug + 'static {
    /// Element type of the stored values in [`RawTensor`]s.
    const DTYPE: Dtype;
    /// True when each row stores an f32 scale (`w = q · scale`).
    const SCALED: bool;
    /// Short name used in format kinds (`"f32"`, `"bf16"`, `"i8"`).
    const NAME: &'static str;
    /// Encodes one row's values; returns them and the row scale (1 for unscaled types).
    /// bf16 rounds to nearest even; int8 is symmetric (scale = max|w| / 127).
    fn encode(row: &[f32]) -> (Vec<Self>, f32);
    /// The stored value as f32 (before the row scale).
    fn to_f32(self) -> f32;
    /// Values from a tensor of dtype [`Elem::DTYPE`] (length already checked).
    fn read(t: &RawTensor) -> Vec<Self>;
    /// Little-endian bytes of `v`.
    fn bytes(v: &[Self]) -> Vec<u8>;
    /// The values as f32 when they are f32 (lets dense f32 go straight to GEMM).
    fn as_f32(_v: &[Self]) -> Option<&[f32]> {
        None
    }
    /// 16 values at `p` as f32 lanes.
    /// # Safety
    /// AVX-512F/BW/VL (and the features of [`crate::isa::avx512_bw`]) available; `p` valid for 16 reads.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16(p: *const Self) -> __m512;
    /// The first `n ≤ 16` values at `p` in lanes `0..n`, zeros above; reads only `n` values.
    /// # Safety
    /// AVX-512F/BW/VL (and the features of [`crate::isa::avx512_bw`]) available; `p` valid for `n` reads.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load_first(n: usize, p: *const Self) -> __m512;
    /// `popcount(k)` packed values at `p` spread to the lanes set in `k` (zeros elsewhere).
    /// # Safety
    /// As [`Elem::load_first`] with `n = popcount(k)`.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn expand_load(k: __mmask16, p: *const Self) -> __m512 {
        _mm512_maskz_expand_ps(k, Self::load_first(k.count_ones() as usize, p))
    }
    /// AVX2: 8 values at `p` as f32 lanes.
    /// # Safety
    /// AVX2 and FMA available; `p` valid for 8 reads.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const Self) -> __m256;
    /// AVX2: the `popcount(b)` values at `p` spread to the lanes set in `b` as f32, zeros
    /// elsewhere (see [`super::avx2`]). f32 permutes with `vpermps`; bf16 and int8 place their
    /// bytes with one `vpshufb`, which also zeroes the other lanes.
    /// # Safety
    /// AVX2 + FMA available; `p` valid for 8 reads (8 values are loaded whatever `b` is).
    #[cfg(target_arch = "x86_64")]
    unsafe fn expand8(b: u8, p: *const Self) -> __m256;
    /// NEON: 4 stored values at `p` as f32 lanes (before the row scale).
    /// # Safety
    /// `p` valid for 4 reads.
    #[cfg(target_arch = "aarch64")]
    unsafe fn load4_neon(p: *const Self) -> float32x4_t;
    /// NEON: the first `popcount(nib)` values at `p` spread to the lanes set in the 4-bit `nib`
    /// (zeros elsewhere), by one table lookup (`tbl`) with a per-nibble byte shuffle.
    /// # Safety
    /// `nib < 16`; `p` valid for 4 reads (the load reads 4 values whatever `nib` is).
    #[cfg(target_arch = "aarch64")]
    unsafe fn expand4_neon(nib: usize, p: *const Self) -> float32x4_t;
    /// True when [`Elem::expand_load_vbmi2`] is faster than [`Elem::expand_load`].
    const VBMI2_EXPAND: bool = false;
    /// [`Elem::expand_load`] where AVX-512 VBMI2 is available too.
    /// # Safety
    /// As [`Elem::expand_load`], and AVX-512 VBMI2 available.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn expand_load_vbmi2(k: __mmask16, p: *const Self) -> __m512 {
        Self::expand_load(k, p)
    }
}

/// Mask of the first `n ≤ 16` lanes.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) fn first_lanes(n: usize) -> __mmask16 {
    if n >= 16 {
        0xffff
    } else {
        (1u16 << n) - 1
    }
}

impl Elem for f32 {
    const DTYPE: Dtype = Dtype::F32;
    const SCALED: bool = false;
    const NAME: &'static str = "f32";
    fn encode(row: &[f32]) -> (Vec<f32>, f32) {
        (row.to_vec(), 1.0)
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    fn read(t: &RawTensor) -> Vec<f32> {
        super::read_f32(t)
    }
    fn bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }
    fn as_f32(v: &[f32]) -> Option<&[f32]> {
        Some(v)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const f32) -> __m512 {
        _mm512_loadu_ps(p)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load_first(n: usize, p: *const f32) -> __m512 {
        _mm512_maskz_loadu_ps(first_lanes(n), p)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn expand_load(k: __mmask16, p: *const f32) -> __m512 {
        _mm512_maskz_expandloadu_ps(k, p)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const f32) -> __m256 {
        _mm256_loadu_ps(p)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn expand8(b: u8, p: *const f32) -> __m256 {
        super::avx2::expand8_f32(b, p)
    }
    #[cfg(target_arch = "aarch64")]
    #[inline(always)]
    unsafe fn load4_neon(p: *const f32) -> float32x4_t {
        vld1q_f32(p)
    }
    #[cfg(target_arch = "aarch64")]
    #[inline(always)]
    unsafe fn expand4_neon(nib: usize, p: *const f32) -> float32x4_t {
        vreinterpretq_f32_u8(shuffle(vld1q_u8(p as *const u8), &EXPAND_F32, nib))
    }
}

/// bf16 bits → f32 lanes (a 16-bit shift).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn widen_bf16(v: __m256i) -> __m512 {
    _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16))
}

impl Elem for half::bf16 {
    const DTYPE: Dtype = Dtype::Bf16;
    const SCALED: bool = false;
    const NAME: &'static str = "bf16";
    fn encode(row: &[f32]) -> (Vec<half::bf16>, f32) {
        (row.iter().map(|&v| half::bf16::from_f32(v)).collect(), 1.0)
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f32::from_bits((self.to_bits() as u32) << 16)
    }
    fn read(t: &RawTensor) -> Vec<half::bf16> {
        super::read_u16(t)
            .into_iter()
            .map(half::bf16::from_bits)
            .collect()
    }
    fn bytes(v: &[half::bf16]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_bits().to_le_bytes()).collect()
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const half::bf16) -> __m512 {
        widen_bf16(_mm256_loadu_si256(p as *const __m256i))
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load_first(n: usize, p: *const half::bf16) -> __m512 {
        widen_bf16(_mm256_maskz_loadu_epi16(first_lanes(n), p as *const i16))
    }
    const VBMI2_EXPAND: bool = true;
    /// One `vpexpandw`: each mask bit is spread to the high 16-bit half of its 32-bit lane
    /// (`pdep` with 0xAAAAAAAA), so the packed bf16 values land exactly where an f32 keeps its
    /// top 16 bits, with zeros below — the expansion and the bf16 → f32 conversion in one
    /// instruction.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn expand_load_vbmi2(k: __mmask16, p: *const half::bf16) -> __m512 {
        let k32: __mmask32 = _pdep_u32(k as u32, 0xAAAA_AAAA);
        _mm512_castsi512_ps(_mm512_maskz_expandloadu_epi16(k32, p as *const i16))
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const half::bf16) -> __m256 {
        let v = _mm256_cvtepu16_epi32(_mm_loadu_si128(p as *const __m128i));
        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(v))
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn expand8(b: u8, p: *const half::bf16) -> __m256 {
        super::avx2::expand8_bf16(b, p)
    }
    #[cfg(target_arch = "aarch64")]
    #[inline(always)]
    unsafe fn load4_neon(p: *const half::bf16) -> float32x4_t {
        vreinterpretq_f32_u32(vshll_n_u16::<16>(vld1_u16(p as *const u16)))
    }
    #[cfg(target_arch = "aarch64")]
    #[inline(always)]
    unsafe fn expand4_neon(nib: usize, p: *const half::bf16) -> float32x4_t {
        let raw = vcombine_u8(vld1_u8(p as *const u8), vdup_n_u8(0));
        vreinterpretq_f32_u8(shuffle(raw, &EXPAND_BF16, nib))
    }
}

/// IEEE f16 values in the top 16 bits of each 32-bit lane → f32 lanes, exactly, without the
/// FP16 extension (Rust's NEON f16 types are not stable). The magnitude bits shifted into
/// an f32's exponent/mantissa position give `value · 2⁻¹¹²`, which one multiply by 2¹¹²
/// corrects — subnormal f16 values included; an all-ones exponent (Inf/NaN) is restored to
/// the f32 one; the sign is ORed back.
#[cfg(target_arch = "aarch64")]
#[inline(always)]
unsafe fn widen_f16_top(v: uint32x4_t) -> float32x4_t {
    let sign = vandq_u32(v, vdupq_n_u32(0x8000_0000));
    let mag = vshrq_n_u32::<3>(vandq_u32(v, vdupq_n_u32(0x7fff_0000)));
    let f = vmulq_f32(
        vreinterpretq_f32_u32(mag),
        vdupq_n_f32(f32::from_bits(0x7780_0000)),
    );
    let inf_nan = vandq_u32(
        vcgeq_u32(mag, vdupq_n_u32(0x0f80_0000)),
        vdupq_n_u32(0x7f80_0000),
    );
    vreinterpretq_f32_u32(vorrq_u32(
        vorrq_u32(vreinterpretq_u32_f32(f), inf_nan),
        sign,
    ))
}

/// IEEE f16 bits → f32, exactly, in plain integer and float operations that inline and
/// vectorise (the `half` crate's conversion checks the CPU at every call): normal values move
/// their exponent and mantissa into f32 position and rebias; subnormals are `mantissa · 2⁻²⁴`,
/// computed from an exact integer-to-float conversion, so no subnormal f32 is ever an operand.
#[inline(always)]
fn f16_bits_to_f32(h: u16) -> f32 {
    let h = h as u32;
    let em = h & 0x7fff;
    let bits = if em >= 0x7c00 {
        0x7f80_0000 | (em & 0x3ff) << 13 // Inf / NaN
    } else if em >= 0x0400 {
        (em << 13) + (112 << 23) // normal: rebias 15 → 127
    } else {
        (em as f32 * f32::from_bits(0x3380_0000)).to_bits() // subnormal or zero: m · 2⁻²⁴
    };
    f32::from_bits(bits | (h & 0x8000) << 16)
}

impl Elem for half::f16 {
    const DTYPE: Dtype = Dtype::F16;
    const SCALED: bool = false;
    const NAME: &'static str = "f16";
    fn encode(row: &[f32]) -> (Vec<half::f16>, f32) {
        (row.iter().map(|&v| half::f16::from_f32(v)).collect(), 1.0)
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16_bits_to_f32(self.to_bits())
    }
    fn read(t: &RawTensor) -> Vec<half::f16> {
        super::read_u16(t)
            .into_iter()
            .map(half::f16::from_bits)
            .collect()
    }
    fn bytes(v: &[half::f16]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_bits().to_le_bytes()).collect()
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const half::f16) -> __m512 {
        _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i))
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load_first(n: usize, p: *const half::f16) -> __m512 {
        _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(first_lanes(n), p as *const i16))
    }
    const VBMI2_EXPAND: bool = true;
    /// `vpexpandw` puts the packed 16-bit values into their slots before the widening.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn expand_load_vbmi2(k: __mmask16, p: *const half::f16) -> __m512 {
        _mm512_cvtph_ps(_mm256_maskz_expandloadu_epi16(k, p as *const i16))
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const half::f16) -> __m256 {
        _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn expand8(b: u8, p: *const half::f16) -> __m256 {
        super::avx2::expand8_f16(b, p)
    }
    #[cfg(target_arch = "aarch64")]
    #[inline(always)]
    unsafe fn load4_neon(p: *const half::f16) -> float32x4_t {
        widen_f16_top(vshll_n_u16::<16>(vld1_u16(p as *const u16)))
    }
    #[cfg(target_arch = "aarch64")]
    #[inline(always)]
    unsafe fn expand4_neon(nib: usize, p: *const half::f16) -> float32x4_t {
        // The bf16 shuffle puts each 16-bit value in the top half of its lane.
        let raw = vcombine_u8(vld1_u8(p as *const u8), vdup_n_u8(0));
        widen_f16_top(vreinterpretq_u32_u8(shuffle(raw, &EXPAND_BF16, nib)))
    }
}

impl Elem for i8 {
    const DTYPE: Dtype = Dtype::I8;
    const SCALED: bool = true;
    const NAME: &'static str = "i8";
    fn encode(row: &[f32]) -> (Vec<i8>, f32) {
        super::quantize_row(row)
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self as f32
    }
    fn read(t: &RawTensor) -> Vec<i8> {
        t.data.iter().map(|&b| b as i8).collect()
    }
    fn bytes(v: &[i8]) -> Vec<u8> {
        v.iter().map(|&b| b as u8).collect()
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const i8) -> __m512 {
        _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(p as *const __m128i)))
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load_first(n: usize, p: *const i8) -> __m512 {
        _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(
            first_lanes(n),
            p,
        )))
    }
    const VBMI2_EXPAND: bool = true;
    /// `vpexpandb` puts the packed bytes in place before the widening, so no f32 expand.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn expand_load_vbmi2(k: __mmask16, p: *const i8) -> __m512 {
        _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_expandloadu_epi8(k, p)))
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const i8) -> __m256 {
        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(p as *const __m128i)))
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn expand8(b: u8, p: *const i8) -> __m256 {
        super::avx2::expand8_i8(b, p)
    }
    #[cfg(target_arch = "aarch64")]
    #[inline(always)]
    unsafe fn load4_neon(p: *const i8) -> float32x4_t {
        Self::expand4_neon(15, p)
    }
    #[cfg(target_arch = "aarch64")]
    #[inline(always)]
    unsafe fn expand4_neon(nib: usize, p: *const i8) -> float32x4_t {
        // Each byte lands in the top byte of its lane; the arithmetic shift sign-extends it.
        let b = shuffle(load4_bytes(p as *const u8), &EXPAND_I8, nib);
        vcvtq_f32_s32(vshrq_n_s32::<24>(vreinterpretq_s32_u8(b)))
    }
}

/// Values and per-row scales of a format with element type `E`: the shared storage of the
/// value half of every format.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Values<E: Elem> {
    pub v: Vec<E>,
    /// One per row when `E::SCALED`, else empty.
    pub scales: Vec<f32>,
}

impl<E: Elem> Values<E> {
    /// Encodes `rows` (each a list of the values to keep) row by row.
    pub fn encode<'a>(rows: impl Iterator<Item = &'a [f32]>) -> Self {
        let mut out = Values {
            v: Vec::new(),
            scales: Vec::new(),
        };
        for r in rows {
            let (q, s) = E::encode(r);
            out.v.extend(q);
            if E::SCALED {
                out.scales.push(s);
            }
        }
        out
    }
    /// Encodes a row-major matrix, keeping only values where `keep(v)` (all of them for dense).
    pub fn encode_matrix(w: &[f32], rows: usize, cols: usize, keep: impl Fn(f32) -> bool) -> Self {
        let kept: Vec<Vec<f32>> = (0..rows)
            .map(|r| {
                w[r * cols..(r + 1) * cols]
                    .iter()
                    .copied()
                    .filter(|&x| keep(x))
                    .collect()
            })
            .collect();
        Self::encode(kept.iter().map(|r| r.as_slice()))
    }
    /// Scale of row `r` (1 when unscaled).
    #[inline(always)]
    pub fn scale(&self, r: usize) -> f32 {
        if E::SCALED {
            self.scales[r]
        } else {
            1.0
        }
    }
    /// Stored value `j` of row `r` in f64, scale applied (naive references).
    #[inline(always)]
    pub fn get64(&self, r: usize, j: usize) -> f64 {
        self.v[j].to_f32() as f64 * self.scale(r) as f64
    }
    /// Bytes a product reads.
    pub fn nbytes(&self) -> usize {
        self.v.len() * E::DTYPE.size() + self.scales.len() * 4
    }
    /// `<name>.values` (and `<name>.scales`).
    pub fn tensors(&self, name: &str) -> Vec<RawTensor> {
        let mut t = vec![RawTensor {
            name: format!("{name}.values"),
            dtype: E::DTYPE,
            shape: vec![self.v.len()],
            data: E::bytes(&self.v),
        }];
        if E::SCALED {
            t.push(RawTensor::f32(format!("{name}.scales"), &self.scales));
        }
        t
    }
    /// Reads and checks `<name>.values` (`count` values) and, when scaled, `<name>.scales`.
    pub fn from_tensors(
        tensors: &[RawTensor],
        name: &str,
        rows: usize,
        count: Option<usize>,
        kind: &'static str,
        what: &str,
    ) -> crate::Result<Self> {
        let vt = super::find(tensors, name, "values", E::DTYPE, kind)?;
        let have = vt.data.len() / E::DTYPE.size();
        if count != Some(have) {
            return Err(super::ferr(
                vt.name.clone(),
                kind,
                format!(
                    "has {have} values but {what} gives {}",
                    count.map_or("an overflowing count".into(), |c| c.to_string())
                ),
            ));
        }
        let scales = if E::SCALED {
            let st = super::find(tensors, name, "scales", Dtype::F32, kind)?;
            super::expect_len(st, Some(rows), kind)?;
            let s = super::read_f32(st);
            if let Some(r) = s.iter().position(|v| !v.is_finite()) {
                return Err(super::ferr(
                    st.name.clone(),
                    kind,
                    format!("row {r} has a non-finite scale"),
                ));
            }
            s
        } else {
            Vec::new()
        };
        Ok(Values {
            v: E::read(vt),
            scales,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every f16 bit pattern (subnormals, ±0, ±Inf and NaN included) widens exactly as the
    /// `half` crate's conversion does, through each SIMD load this CPU runs.
    #[test]
    fn f16_widening_is_exact_for_every_value() {
        let all: Vec<half::f16> = (0..=u16::MAX).map(half::f16::from_bits).collect();
        let same = |got: f32, h: half::f16| {
            let want = half::f16::to_f32(h);
            assert!(
                got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()),
                "f16 {:#06x}: got {got} want {want}",
                h.to_bits()
            );
        };
        for &h in &all {
            same(Elem::to_f32(h), h);
        }
        #[cfg(target_arch = "aarch64")]
        for c in all.chunks_exact(4) {
            let mut out = [0f32; 4];
            // SAFETY: 4 values readable; NEON is baseline on aarch64.
            unsafe { vst1q_f32(out.as_mut_ptr(), half::f16::load4_neon(c.as_ptr())) };
            out.iter().zip(c).for_each(|(&g, &h)| same(g, h));
            // Expanding the first two values into lanes 1 and 3.
            unsafe {
                vst1q_f32(
                    out.as_mut_ptr(),
                    half::f16::expand4_neon(0b1010, c.as_ptr()),
                )
            };
            assert_eq!(out[0].to_bits(), 0);
            assert_eq!(out[2].to_bits(), 0);
            same(out[1], c[0]);
            same(out[3], c[1]);
        }
        #[cfg(target_arch = "x86_64")]
        if crate::isa::avx2_fma_f16c() {
            #[target_feature(enable = "avx2,fma,f16c")]
            unsafe fn avx2(all: &[half::f16], same: impl Fn(f32, half::f16)) {
                for c in all.chunks_exact(8) {
                    let mut out = [0f32; 8];
                    _mm256_storeu_ps(out.as_mut_ptr(), half::f16::load8(c.as_ptr()));
                    out.iter().zip(c).for_each(|(&g, &h)| same(g, h));
                    // The first three values into lanes 0, 4 and 7.
                    let e = half::f16::expand8(0b1001_0001, c.as_ptr());
                    _mm256_storeu_ps(out.as_mut_ptr(), e);
                    for (l, &g) in out.iter().enumerate() {
                        match l {
                            0 => same(g, c[0]),
                            4 => same(g, c[1]),
                            7 => same(g, c[2]),
                            _ => assert_eq!(g.to_bits(), 0, "lane {l}"),
                        }
                    }
                }
            }
            // SAFETY: AVX2, FMA and F16C checked.
            unsafe { avx2(&all, same) };
        }
        #[cfg(target_arch = "x86_64")]
        if crate::isa::avx512_bw() {
            #[target_feature(enable = "avx512f,avx512vl,avx512bw")]
            unsafe fn avx512(all: &[half::f16], same: impl Fn(f32, half::f16)) {
                for c in all.chunks_exact(16) {
                    let mut out = [0f32; 16];
                    _mm512_storeu_ps(out.as_mut_ptr(), half::f16::load16(c.as_ptr()));
                    out.iter().zip(c).for_each(|(&g, &h)| same(g, h));
                    _mm512_storeu_ps(out.as_mut_ptr(), half::f16::load_first(5, c.as_ptr()));
                    out[..5].iter().zip(c).for_each(|(&g, &h)| same(g, h));
                    assert!(out[5..].iter().all(|v| v.to_bits() == 0));
                }
            }
            // SAFETY: AVX-512 F/VL/BW checked.
            unsafe { avx512(&all, same) };
        }
    }
}
