//! What the AVX2 kernels of the formats share (x86-64 without AVX-512, e.g. AMD Zen 2/3 or
//! Intel client cores): 8-lane dot products, the horizontal sum, and the two tricks that stand
//! in for AVX-512's expand-load and two-source permute, which AVX2 lacks.
//!
//! - **Expand** (bitmask): for each 8-bit slice of the mask a table gives the `vpermps`
//!   indices that move the packed f32 values into the set lanes, with the sign bit set on
//!   exactly those lanes, so one `vblendvps` against zero clears the others ([`expand8_f32`]).
//!   bf16 and int8 values (8 of them fit 16 bytes) are loaded into both 128-bit halves and a
//!   byte table puts each value's bytes at the top of its lane with one `vpshufb`, which zeroes
//!   every other byte: expansion and widening at once ([`expand8_bf16`], [`expand8_i8`]).
//!   f16 values are shuffled into 16-bit slots of one 128-bit register, then `vcvtph2ps` (F16C)
//!   widens them ([`expand8_f16`]).
//! - **Two-source permute** (N:M): 8 kept values span a 16-column window of `x`; both halves are
//!   permuted with the same indices and `vblendvps` picks by bit 3 of the index, moved to the
//!   sign bit by a shift ([`gather16`]).
//!
//! All functions here are `#[inline(always)]` and must be called from a function compiled with
//! `#[target_feature(enable = "avx2,fma,f16c")]` (callers check [`super::isa`]).

use std::arch::x86_64::*;

/// One row of a 256-entry table: 32 bytes, aligned for a single aligned load.
#[repr(C, align(32))]
pub(crate) struct Row([u8; 32]);

/// For every 8-bit mask `b`: lane `l` (4 bytes) of row `b` holds `rank | i32::MIN` when bit `l`
/// is set (`rank` = set bits below `l`, the packed value that belongs there), else 0.
static EXPAND_F32: [Row; 256] = {
    let mut t = [const { Row([0; 32]) }; 256];
    let mut b = 0;
    while b < 256 {
        let mut rank = 0u32;
        let mut l = 0;
        while l < 8 {
            if b & (1 << l) != 0 {
                let v = (rank | 1 << 31).to_le_bytes();
                let mut k = 0;
                while k < 4 {
                    t[b].0[4 * l + k] = v[k];
                    k += 1;
                }
                rank += 1;
            }
            l += 1;
        }
        b += 1;
    }
    t
};

/// `vpshufb` tables for values of `size` bytes in lanes of `lane` bytes (bf16: 2 in 4, int8: 1
/// in 4, f16: 2 in 2): lane `l` of row `b` takes the bytes of packed value `rank` into its top
/// `size` bytes when bit `l` is set; every other byte index is 0x80, which `vpshufb` turns into
/// 0. Indices are within a 128-bit half: with 4-byte lanes both halves hold the packed values;
/// with 2-byte lanes the 8 lanes fill the low half, which is all that is loaded.
const fn shuffle_table(lane: usize, size: usize) -> [Row; 256] {
    let mut t = [const { Row([0x80; 32]) }; 256];
    let mut b = 0;
    while b < 256 {
        let mut rank = 0;
        let mut l = 0;
        while l < 8 {
            if b & (1 << l) != 0 {
                let mut k = 0;
                while k < size {
                    t[b].0[lane * l + lane - size + k] = (rank * size + k) as u8;
                    k += 1;
                }
                rank += 1;
            }
            l += 1;
        }
        b += 1;
    }
    t
}

static EXPAND_BF16: [Row; 256] = shuffle_table(4, 2);
static EXPAND_I8: [Row; 256] = shuffle_table(4, 1);
/// Eight f16 values in their 16-bit slots, zeros elsewhere, for one `vcvtph2ps`.
static EXPAND_F16: [Row; 256] = shuffle_table(2, 2);

/// Row `b` of `table` as a vector.
#[inline(always)]
unsafe fn row(table: &[Row; 256], b: u8) -> __m256i {
    _mm256_load_si256(table.get_unchecked(b as usize).0.as_ptr() as *const __m256i)
}

/// The `popcount(b)` packed f32 values at `p` spread to the lanes set in `b`, zeros elsewhere.
///
/// # Safety
/// AVX2 + FMA; `p` valid for 8 reads (8 values are loaded whatever `b` is).
#[inline(always)]
pub(crate) unsafe fn expand8_f32(b: u8, p: *const f32) -> __m256 {
    let ctl = row(&EXPAND_F32, b);
    let v = _mm256_permutevar8x32_ps(_mm256_loadu_ps(p), ctl);
    _mm256_blendv_ps(_mm256_setzero_ps(), v, _mm256_castsi256_ps(ctl))
}

/// Lanes `first..first + popcount(b)` of `v` spread, in order, to the lanes set in `b`; zeros
/// elsewhere (`first + popcount(b) ≤ 8`). [`expand8_f32`] from a register, so that 8 values
/// loaded once can fill two 8-column windows.
///
/// # Safety
/// AVX2 + FMA.
#[inline(always)]
pub(crate) unsafe fn expand8_reg(b: u8, v: __m256, first: i32) -> __m256 {
    // The table's set lanes hold `rank | sign`; adding `first` keeps the sign bit.
    let ctl = _mm256_add_epi32(row(&EXPAND_F32, b), _mm256_set1_epi32(first));
    let p = _mm256_permutevar8x32_ps(v, ctl);
    _mm256_blendv_ps(_mm256_setzero_ps(), p, _mm256_castsi256_ps(ctl))
}

/// For a 2:4 index byte (four 2-bit in-group indices: two groups of 4 columns, increasing
/// within each): the 8-bit mask of the columns its 4 values sit in.
pub(crate) static MASK_2OF4: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut b = 0;
    while b < 256 {
        let lo = (1u8 << (b & 3)) | (1u8 << ((b >> 2) & 3));
        let hi = (1u8 << ((b >> 4) & 3)) | (1u8 << ((b >> 6) & 3));
        t[b] = lo | (hi << 4);
        b += 1;
    }
    t
};

/// [`expand8_f32`] for bf16 values: each lands in the high half of its f32 lane (an exact
/// bf16 → f32 conversion).
///
/// # Safety
/// AVX2 + FMA; `p` valid for 8 reads.
#[inline(always)]
pub(crate) unsafe fn expand8_bf16(b: u8, p: *const half::bf16) -> __m256 {
    let v = _mm256_broadcastsi128_si256(_mm_loadu_si128(p as *const __m128i));
    _mm256_castsi256_ps(_mm256_shuffle_epi8(v, row(&EXPAND_BF16, b)))
}

/// [`expand8_f32`] for IEEE f16 values: one byte shuffle puts the packed values into their
/// 16-bit slots (zeros elsewhere), then `vcvtph2ps` widens all 8 exactly.
///
/// # Safety
/// AVX2 + FMA + F16C; `p` valid for 8 reads.
#[inline(always)]
pub(crate) unsafe fn expand8_f16(b: u8, p: *const half::f16) -> __m256 {
    // The table's 2-byte lanes fill the low half of a row.
    let ctl = _mm256_castsi256_si128(row(&EXPAND_F16, b));
    _mm256_cvtph_ps(_mm_shuffle_epi8(_mm_loadu_si128(p as *const __m128i), ctl))
}

/// [`expand8_f32`] for int8 values: each lands in the top byte of its lane, an arithmetic
/// shift sign-extends it, then it is converted to f32 (before the row scale).
///
/// # Safety
/// AVX2 + FMA; `p` valid for 8 reads.
#[inline(always)]
pub(crate) unsafe fn expand8_i8(b: u8, p: *const i8) -> __m256 {
    let v = _mm256_set1_epi64x(std::ptr::read_unaligned(p as *const i64));
    let placed = _mm256_shuffle_epi8(v, row(&EXPAND_I8, b));
    _mm256_cvtepi32_ps(_mm256_srai_epi32::<24>(placed))
}

/// Lane `j` = `x[off[j]]` for 8 offsets in `0..16`: `lo` holds `x[0..8]`, `hi` `x[8..16]`.
///
/// # Safety
/// AVX2; every offset in `0..16`.
#[inline(always)]
pub(crate) unsafe fn gather16(lo: __m256, hi: __m256, off: __m256i) -> __m256 {
    let from_hi = _mm256_castsi256_ps(_mm256_slli_epi32::<28>(off));
    _mm256_blendv_ps(
        _mm256_permutevar8x32_ps(lo, off),
        _mm256_permutevar8x32_ps(hi, off),
        from_hi,
    )
}

/// Bitwise OR of the 8 lanes.
///
/// # Safety
/// AVX2.
#[inline(always)]
pub(crate) unsafe fn or_lanes(v: __m256i) -> u32 {
    let s = _mm_or_si128(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
    let s = _mm_or_si128(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
    let s = _mm_or_si128(s, _mm_shuffle_epi32::<0b10_11_00_01>(s));
    _mm_cvtsi128_si32(s) as u32
}

/// Sum of the 8 lanes (shared with the attention kernels).
pub(crate) use crate::kernels::ops::hsum8 as hsum;
