//! Compressed weight formats and their matrix–vector / matrix–matrix kernels.
//!
//! A weight is a row-major `[rows = out, cols = in]` f32 matrix `W`; every format computes
//! `y[m, rows] = x[m, cols] · Wᵀ` (`m = 1` for decode). Like [`crate::kernels`], nothing here
//! knows about models.
//!
//! Dense, bitmask, CSR and N:M are generic over the stored value type ([`Elem`]: f32, bf16, or
//! int8 with a per-row f32 scale), so each has one kernel for all three; products accumulate
//! in f32. Kinds are `<format>` for f32 values and `<format>-bf16` / `<format>-i8` otherwise
//! (dense f32 is `dense-f32`).
//!
//! | format | storage | fast path (`m ≤` [`SMALL_M`]) |
//! |---|---|---|
//! | [`DenseOf`] | values | row dots, 4 accumulators (f32 ≥ 5 rows: GEMM directly) |
//! | [`BitmaskOf`] | per-row u64 bitmask + packed nonzeros | expand-load (`vexpandps`) per 16 columns |
//! | [`CsrOf`] | row pointers + u16 column indices + values | 16-wide gathers of `x` |
//! | [`NMOf`] | N kept values per group of M + packed in-group indices (2 bits for M=4, 3 for M=8) | `_mm512_permutex2var_ps` over a 32-column window of `x` (when M = 2N, N | 16) |
//! | [`Bsr`] | R×C f32 tiles + block-column indices | FMAs along tile rows |
//!
//! Every format has a single-threaded scalar `matmul_naive` (f64 accumulation) read straight
//! from its own storage. The fast path ([`WeightFormat::matmul_add`]) runs the best kernel set
//! the CPU has ([`isa`]): AVX-512 (the table above), AVX2 (8 lanes: dense, bitmask through a
//! permute table per mask byte, N:M for M = 2N with N | 8 through two permutes and a blend, CSR
//! through `vgatherdps`, BSR by FMAs along tile rows; see `avx2.rs`), NEON on aarch64, else portable scalar code (compiled
//! for AVX2 where present), and rayon over row ranges once the weights exceed [`PAR_BYTES`];
//! for more than [`SMALL_M`] rows of `x` it decodes row tiles to f32 and multiplies them with
//! GEMM, so prefill through any format costs about what dense GEMM costs. [`limit_isa`] caps
//! the kernel set, to test and time the lower ones on the same machine.
//!
//! [`screen::ArgmaxScreen`] answers `argmax(W · x)` exactly while reading mostly an int8 copy of
//! `W` (greedy decoding's LM head): only the rows whose error bound lets them still win are
//! computed, by the dense format's own row kernel ([`WeightFormat::matvec_rows`]).
//!
//! Serialization: [`WeightFormat::to_tensors`] gives named raw little-endian arrays
//! (`<name>.shape` as u64 plus the format's arrays); each format's `from_tensors(name, &[...])`
//! validates every count, index and shape and returns [`crate::Error::Format`] naming the
//! offending tensor — it never panics or reads out of bounds on corrupt input.

/// The `kind`, `rows` and `cols` methods of a [`WeightFormat`] whose type has a `KIND` const
/// and `rows` / `cols` fields.
macro_rules! dims {
    () => {
        fn kind(&self) -> &'static str {
            Self::KIND
        }
        fn rows(&self) -> usize {
            self.rows
        }
        fn cols(&self) -> usize {
            self.cols
        }
    };
}

#[cfg(target_arch = "x86_64")]
mod avx2;
mod bitmask;
mod bsr;
mod colbitmask;
mod colmajor;
mod csr;
mod dense;
pub mod elem;
mod nm;
pub mod registry;
pub mod screen;
mod sparse;

pub use bitmask::{Bitmask, BitmaskBf16, BitmaskI8, BitmaskOf};
pub use bsr::Bsr;
pub use colbitmask::{ColBitmask, ColBitmaskBf16, ColBitmaskF16, ColBitmaskI8, ColBitmaskOf};
pub use colmajor::{ColMajor, ColMajorBf16, ColMajorF16, ColMajorI8, ColMajorOf};
pub use csr::{Csr, CsrBf16, CsrI8, CsrOf};
pub use dense::{dense_f32_matmul, dense_f32_rows, Dense, DenseBf16, DenseF16, DenseI8, DenseOf};
pub use elem::Elem;
pub use nm::{NMBf16, NMOf, NM, NMI8};

use crate::{Error, Result};
use rayon::prelude::*;

/// Weights (bytes) above which the fast paths split rows over rayon threads.
pub const PAR_BYTES: usize = 256 * 1024;

/// Element type of a [`RawTensor`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dtype {
    F32,
    F16,
    Bf16,
    I8,
    U8,
    U16,
    U32,
    U64,
}

impl Dtype {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::F16 | Dtype::Bf16 | Dtype::U16 => 2,
            Dtype::I8 | Dtype::U8 => 1,
            Dtype::U32 => 4,
            Dtype::U64 => 8,
        }
    }
}

/// A named raw array: little-endian bytes, element type and shape.
#[derive(Clone, Debug, PartialEq)]
pub struct RawTensor {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

impl RawTensor {
    pub(crate) fn f32(name: String, v: &[f32]) -> RawTensor {
        RawTensor {
            name,
            dtype: Dtype::F32,
            shape: vec![v.len()],
            data: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        }
    }
    pub(crate) fn u16(name: String, dtype: Dtype, v: &[u16]) -> RawTensor {
        RawTensor {
            name,
            dtype,
            shape: vec![v.len()],
            data: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        }
    }
    pub(crate) fn u64(name: String, v: &[u64]) -> RawTensor {
        RawTensor {
            name,
            dtype: Dtype::U64,
            shape: vec![v.len()],
            data: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        }
    }
    pub(crate) fn bytes(name: String, dtype: Dtype, v: Vec<u8>) -> RawTensor {
        RawTensor {
            name,
            dtype,
            shape: vec![v.len()],
            data: v,
        }
    }
}

/// A compressed (or dense) weight matrix with matrix–vector and matrix–matrix products.
pub trait WeightFormat: Send + Sync {
    /// Short format name (`"bitmask"`, `"csr-bf16"`, ...), as [`from_tensors`] takes it.
    fn kind(&self) -> &'static str;
    /// Output features.
    fn rows(&self) -> usize;
    /// Input features.
    fn cols(&self) -> usize;
    /// Bytes a product reads from the weight storage (values, indices, masks, scales).
    fn nbytes(&self) -> usize;
    /// Number of stored (possibly zero) values.
    fn stored(&self) -> usize;
    /// Rows `r0..r1` of the dense matrix this format represents, row-major into
    /// `out[(r1 − r0)·cols]`.
    fn decode_rows(&self, r0: usize, r1: usize, out: &mut [f32]);
    /// `y[m, rows] = x[m, cols] · Wᵀ`, or `y += …` when `accumulate`; fast path (SIMD,
    /// threads; GEMM on decoded tiles for `m >` [`SMALL_M`]).
    fn matmul_add(&self, x: &[f32], m: usize, y: &mut [f32], accumulate: bool);
    /// Scalar single-threaded reference for [`WeightFormat::matmul`] (f64 accumulation).
    fn matmul_naive(&self, x: &[f32], m: usize, y: &mut [f32]);
    /// `y[i] = (W · x)[rows[i]]` for one row of `x`, with exactly the bits [`WeightFormat::matvec`]
    /// gives those rows; `false` (and `y` untouched) when the format cannot compute single rows.
    fn matvec_rows(&self, _rows: &[u32], _x: &[f32], _y: &mut [f32]) -> bool {
        false
    }
    /// Named raw arrays, `<name>.shape` first.
    fn to_tensors(&self, name: &str) -> Vec<RawTensor>;
    /// `y[m, rows] = x[m, cols] · Wᵀ`.
    fn matmul(&self, x: &[f32], m: usize, y: &mut [f32]) {
        self.matmul_add(x, m, y, false)
    }
    /// `y[rows] = W · x`.
    fn matvec(&self, x: &[f32], y: &mut [f32]) {
        self.matmul(x, 1, y)
    }
    /// Reference for [`WeightFormat::matvec`].
    fn matvec_naive(&self, x: &[f32], y: &mut [f32]) {
        self.matmul_naive(x, 1, y)
    }
    /// The dense row-major `[rows, cols]` matrix this format represents.
    fn to_dense(&self) -> Vec<f32> {
        let mut d = vec![0f32; self.rows() * self.cols()];
        self.decode_rows(0, self.rows(), &mut d);
        d
    }
}

impl std::fmt::Debug for dyn WeightFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}[{}×{}, {} bytes]",
            self.kind(),
            self.rows(),
            self.cols(),
            self.nbytes()
        )
    }
}

/// Distance of the software prefetches in the row kernels, bytes. A decode step streams every
/// weight once; one core keeps more DRAM reads in flight with these than with the hardware
/// prefetcher alone (measured: bf16 decode 23 → 33 tokens/s on one core).
#[cfg(target_arch = "x86_64")]
pub(crate) const PREFETCH: usize = 4096;

/// Prefetches `lines` cache lines starting [`PREFETCH`] bytes after `p` (a hint: never faults,
/// also past the end of an allocation).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) fn prefetch_ahead<T>(p: *const T, lines: usize) {
    let p = (p as *const i8).wrapping_add(PREFETCH);
    for l in 0..lines {
        // SAFETY: prefetch is a hint and never faults; SSE is baseline on x86-64.
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                p.wrapping_add(64 * l),
            )
        };
    }
}

/// Products with at most this many rows of `x` use the formats' row kernels (each weight read
/// once per product, threads over rows); larger ones decode row tiles to f32 and use GEMM.
pub const SMALL_M: usize = 4;

/// The instruction set the format kernels are written for. [`isa`] says which one runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    /// No hand-written SIMD: scalar code (compiled a second time for AVX2 + FMA where the CPU
    /// has them, so LLVM may vectorise it).
    Portable,
    /// x86-64 AVX2 + FMA (+ POPCNT, BMI1/2): 8-lane kernels for dense, bitmask, N:M, CSR and
    /// BSR.
    Avx2,
    /// x86-64 AVX-512 F/VL/BW (+ POPCNT, BMI1/2): 16-lane kernels for every format.
    Avx512,
    /// aarch64 NEON (base architecture): dense, bitmask and 2:4 kernels.
    Neon,
}

impl Isa {
    /// Lower-case name, as reports print it.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Portable => "portable",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
            Isa::Neon => "neon",
        }
    }
}

/// The cap set by [`limit_isa`]: 0 none, 1 portable, 2 AVX2.
static CAP: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// Caps the kernels the formats use: `Some(Isa::Portable)` takes the portable paths even where
/// SIMD kernels exist, `Some(Isa::Avx2)` the AVX2 kernels on AVX-512 machines; `None` lifts the
/// cap. A cap above what the CPU has changes nothing. For testing those paths and comparing
/// speeds; it switches every kernel in the process.
pub fn limit_isa(max: Option<Isa>) {
    let v = match max {
        None | Some(Isa::Avx512) | Some(Isa::Neon) => 0,
        Some(Isa::Portable) => 1,
        Some(Isa::Avx2) => 2,
    };
    CAP.store(v, std::sync::atomic::Ordering::Relaxed);
}

/// Keeps a [`limit_isa`] cap until dropped (also when unwinding), then lifts it.
pub struct IsaCap(());

impl Drop for IsaCap {
    fn drop(&mut self) {
        limit_isa(None);
    }
}

/// [`limit_isa`]`(max)` until the returned guard is dropped.
pub fn cap_isa(max: Option<Isa>) -> IsaCap {
    limit_isa(max);
    IsaCap(())
}

/// The current kernel set when it is an x86 SIMD one (AVX-512 or AVX2): what a format with a
/// kernel for each dispatches on.
#[cfg(target_arch = "x86_64")]
pub(crate) fn x86_simd() -> Option<Isa> {
    let isa = isa();
    matches!(isa, Isa::Avx512 | Isa::Avx2).then_some(isa)
}

/// The best kernel set this CPU runs (checked once).
fn detected_isa() -> Isa {
    static D: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
    *D.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            let base = crate::isa::bit_manipulation();
            if base && crate::isa::avx512_bw() {
                Isa::Avx512
            } else if base && crate::isa::avx2_fma_f16c() {
                Isa::Avx2
            } else {
                Isa::Portable
            }
        }
        #[cfg(target_arch = "aarch64")]
        {
            Isa::Neon
        }
        #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
        {
            Isa::Portable
        }
    })
}

/// The kernel set the formats use now: the best the CPU runs, capped by [`limit_isa`].
#[inline]
pub fn isa() -> Isa {
    let d = detected_isa();
    match (CAP.load(std::sync::atomic::Ordering::Relaxed), d) {
        (1, _) => Isa::Portable,
        (2, Isa::Avx512) => Isa::Avx2,
        _ => d,
    }
}

/// True when the AVX-512 format kernels run now ([`isa`] is [`Isa::Avx512`]; the CPU's own
/// features are [`crate::isa`]'s).
#[inline]
pub fn avx512_active() -> bool {
    isa() == Isa::Avx512
}

pub(crate) fn check_sizes(kind: &str, rows: usize, cols: usize, x: &[f32], m: usize, y: &[f32]) {
    assert!(
        x.len() >= m * cols && y.len() >= m * rows,
        "{kind} matmul: x has {} values (need {}), y has {} (need {})",
        x.len(),
        m * cols,
        y.len(),
        m * rows
    );
}

/// Disjoint-write output pointer for `y[m, rows]`, storing or accumulating.
#[derive(Clone, Copy)]
pub(crate) struct Out {
    ptr: *mut f32,
    rows: usize,
    acc: bool,
}
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

impl Out {
    /// # Safety
    /// `i < m`, `r < rows`, and no other thread writes the same element.
    #[inline(always)]
    pub(crate) unsafe fn put(&self, i: usize, r: usize, v: f32) {
        let p = self.ptr.add(i * self.rows + r);
        *p = if self.acc { *p + v } else { v };
    }
}

/// Runs `block(r0, r1, out)` over row ranges covering `0..rows` (in parallel when `bytes` is
/// large); ranges start at multiples of `align`. `block` must write exactly `y[i, r0..r1]`
/// (through `out`, which stores or, with `acc`, adds).
pub(crate) fn drive(
    rows: usize,
    m: usize,
    bytes: usize,
    align: usize,
    y: &mut [f32],
    acc: bool,
    block: impl Fn(usize, usize, Out) + Sync,
) {
    assert!(y.len() >= m * rows);
    if rows == 0 || m == 0 {
        return;
    }
    let out = Out {
        ptr: y.as_mut_ptr(),
        rows,
        acc,
    };
    let threads = rayon::current_num_threads();
    if bytes < PAR_BYTES || threads < 2 || rows <= align {
        block(0, rows, out);
        return;
    }
    // A few chunks per thread balance uneven rows (sparse) without much scheduling overhead.
    let chunks = (threads * CHUNKS_PER_THREAD)
        .min(bytes / (PAR_BYTES / 4))
        .clamp(2, rows.div_ceil(align));
    let chunk = rows.div_ceil(chunks).div_ceil(align) * align;
    (0..rows.div_ceil(chunk)).into_par_iter().for_each(|c| {
        let r0 = c * chunk;
        block(r0, (r0 + chunk).min(rows), out);
    });
}

/// Row chunks per thread in [`drive`].
const CHUNKS_PER_THREAD: usize = 4;

/// `y (+)= x · Wᵀ` for many rows of `x`: decodes row tiles of `f` to f32 (each tile about
/// 256 KiB, one per task, threads over tiles) and multiplies each with a single-threaded GEMM
/// into its columns of `y`. Decoding costs O(rows·cols) against the product's O(m·rows·cols).
pub(crate) fn matmul_tiled<F: WeightFormat + ?Sized>(
    f: &F,
    x: &[f32],
    m: usize,
    y: &mut [f32],
    acc: bool,
) {
    let (rows, cols) = (f.rows(), f.cols());
    check_sizes(f.kind(), rows, cols, x, m, y);
    if rows == 0 || m == 0 {
        return;
    }
    if cols == 0 {
        if !acc {
            y[..m * rows].fill(0.0);
        }
        return;
    }
    let tile = ((64 * 1024) / cols).clamp(8, 256).min(rows);
    let tiles = rows.div_ceil(tile);
    let dst = crate::kernels::SendPtr(y.as_mut_ptr());
    thread_local! {
        static TILE: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    (0..tiles).into_par_iter().for_each(|t| {
        // Rebound so the closure captures the Send wrapper whole, not its raw pointer field.
        #[allow(clippy::redundant_locals)]
        let dst = dst;
        let (r0, r1) = (t * tile, ((t + 1) * tile).min(rows));
        TILE.with(|buf| {
            let mut buf = buf.borrow_mut();
            buf.resize(tile * cols, 0.0);
            f.decode_rows(r0, r1, &mut buf[..(r1 - r0) * cols]);
            // SAFETY: x is [m, cols]; the tile is [(r1 − r0), cols] read transposed; each task
            // writes only columns r0..r1 of y ([m, rows], sizes checked above).
            unsafe {
                crate::kernels::gemm_strided(
                    m,
                    r1 - r0,
                    cols,
                    dst.0.add(r0),
                    rows as isize,
                    1,
                    acc,
                    x.as_ptr(),
                    cols as isize,
                    1,
                    buf.as_ptr(),
                    1,
                    cols as isize,
                    1.0,
                    false,
                );
            }
        });
    });
}

/// The scalar reference product shared by every format: `y[i, r] = Σ v · x[i, k]` in f64 over
/// the stored entries `(k, v)` that `entries(r, emit)` emits for row `r` (values scaled).
pub(crate) fn naive_product(
    rows: usize,
    cols: usize,
    x: &[f32],
    m: usize,
    y: &mut [f32],
    entries: impl Fn(usize, &mut dyn FnMut(usize, f64)),
) {
    for i in 0..m {
        let xi = &x[i * cols..(i + 1) * cols];
        for r in 0..rows {
            let mut s = 0f64;
            entries(r, &mut |k, v| s += v * xi[k] as f64);
            y[i * rows + r] = s as f32;
        }
    }
}

// ---- validation helpers -------------------------------------------------------------------

pub(crate) fn ferr(tensor: impl Into<String>, kind: &'static str, msg: impl Into<String>) -> Error {
    Error::Format {
        path: tensor.into().into(),
        format: kind,
        msg: msg.into(),
    }
}

/// Finds `<name>.<suffix>` and checks its dtype and that its bytes match its shape.
pub(crate) fn find<'a>(
    tensors: &'a [RawTensor],
    name: &str,
    suffix: &str,
    dtype: Dtype,
    kind: &'static str,
) -> Result<&'a RawTensor> {
    let full = format!("{name}.{suffix}");
    let t = tensors
        .iter()
        .find(|t| t.name == full)
        .ok_or_else(|| ferr(full.clone(), kind, "tensor missing"))?;
    if t.dtype != dtype {
        return Err(ferr(
            full,
            kind,
            format!("dtype {:?}, expected {:?}", t.dtype, dtype),
        ));
    }
    let n = t.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
    match n.and_then(|n| n.checked_mul(dtype.size())) {
        Some(b) if b == t.data.len() => Ok(t),
        _ => Err(ferr(
            full,
            kind,
            format!(
                "shape {:?} does not match {} data bytes",
                t.shape,
                t.data.len()
            ),
        )),
    }
}

pub(crate) fn expect_len(t: &RawTensor, len: Option<usize>, kind: &'static str) -> Result<()> {
    let have = t.data.len() / t.dtype.size();
    match len {
        Some(l) if l == have => Ok(()),
        Some(l) => Err(ferr(
            t.name.clone(),
            kind,
            format!("has {have} elements, expected {l}"),
        )),
        None => Err(ferr(t.name.clone(), kind, "expected size overflows")),
    }
}

pub(crate) fn read_f32(t: &RawTensor) -> Vec<f32> {
    t.data
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}
pub(crate) fn read_u16(t: &RawTensor) -> Vec<u16> {
    t.data
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .collect()
}
pub(crate) fn read_u32(t: &RawTensor) -> Vec<u32> {
    t.data
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}
pub(crate) fn read_u64(t: &RawTensor) -> Vec<u64> {
    t.data
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

/// Reads `<name>.shape` (u64) with exactly `n` entries, each ≤ 2⁴⁰.
pub(crate) fn read_shape(
    tensors: &[RawTensor],
    name: &str,
    n: usize,
    kind: &'static str,
) -> Result<Vec<usize>> {
    let t = find(tensors, name, "shape", Dtype::U64, kind)?;
    expect_len(t, Some(n), kind)?;
    let v = read_u64(t);
    if v.iter().any(|&d| d > 1 << 40) {
        return Err(ferr(
            t.name.clone(),
            kind,
            format!("implausible dimensions {v:?}"),
        ));
    }
    // An empty matrix has no buffers to check `rows` against: bound it so row-indexed
    // bookkeeping stays small.
    if v.len() >= 2 && (v[0] == 0 || v[1] == 0) && (v[0] > 1 << 20 || v[1] > 1 << 20) {
        return Err(ferr(
            t.name.clone(),
            kind,
            format!("implausible empty matrix {v:?}"),
        ));
    }
    Ok(v.into_iter().map(|d| d as usize).collect())
}

/// `<name>.shape` of a plain `[rows, cols]` format.
pub(crate) fn read_dims(
    tensors: &[RawTensor],
    name: &str,
    kind: &'static str,
) -> Result<(usize, usize)> {
    let s = read_shape(tensors, name, 2, kind)?;
    Ok((s[0], s[1]))
}

/// Rebuilds a format from [`WeightFormat::to_tensors`] output given its [`WeightFormat::kind`]
/// (one of [`registry::FORMATS`]).
pub fn from_tensors(
    kind: &str,
    name: &str,
    tensors: &[RawTensor],
) -> Result<Box<dyn WeightFormat>> {
    match registry::by_kind(kind) {
        Some(spec) => (spec.load)(name, tensors),
        None => Err(Error::Invalid(format!(
            "unknown weight format `{kind}` (known: {})",
            registry::kinds().collect::<Vec<_>>().join(", ")
        ))),
    }
}

pub(crate) fn shape_tensor(name: &str, dims: &[usize]) -> RawTensor {
    RawTensor::u64(
        format!("{name}.shape"),
        &dims.iter().map(|&d| d as u64).collect::<Vec<_>>(),
    )
}

/// Checks a dense input's length.
pub(crate) fn check_dense(kind: &'static str, w: &[f32], rows: usize, cols: usize) -> Result<()> {
    match rows.checked_mul(cols) {
        Some(n) if n == w.len() => Ok(()),
        _ => Err(Error::Invalid(format!(
            "{kind}: dense matrix has {} values, expected {rows}×{cols}",
            w.len()
        ))),
    }
}

/// Symmetric per-row int8 quantization: returns (i8 values, scale) with `w ≈ q · scale`.
pub(crate) fn quantize_row(w: &[f32]) -> (Vec<i8>, f32) {
    let amax = w.iter().fold(0f32, |a, &v| a.max(v.abs()));
    if amax == 0.0 || !amax.is_finite() {
        return (vec![0; w.len()], if amax.is_finite() { 0.0 } else { 1.0 });
    }
    let scale = amax / 127.0;
    let inv = 1.0 / scale;
    (
        w.iter()
            .map(|&v| (v * inv).round().clamp(-127.0, 127.0) as i8)
            .collect(),
        scale,
    )
}
