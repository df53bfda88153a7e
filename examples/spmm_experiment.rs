//! Experiment (2026-11-29, not used by lopper): a sparse × dense product for the pruning
//! driver's second pass (the pruned block re-run over the calibration set), bit for bit the
//! dense GEMM, timed against it on the pass's shapes. Result on this CPU (quiet machine; busier
//! runs in brackets): the FMA loop alone is 1.32–1.44× (1.1–1.5×) faster than the `gemm` crate at
//! 50% unstructured sparsity, but transposing tiles of activations in and out of the layout it
//! needs eats the gain: 0.96–1.14× (0.84–1.13×) end to end; q/k/v and gate/up sharing one
//! transposed input: 0.97× and 1.03× (0.88–1.08×). So the second pass stays dense. Kept as the
//! starting point for a layout that keeps activations transposed between layers.
//! `cargo run --release --example spmm_experiment [density]`
//!
//! What the kernel does:
//!
//! Sparse-weight × dense-activation products for many rows (calibration passes, prefill):
//! `out[m, n] (+)= x[m, k] · Wᵀ` where `W` `[n, k]` is mostly zeros, computed from its nonzeros
//! only, **with exactly the bits of the dense GEMM** (`lopper::kernels::matmul_t`).
//!
//! Why bit-exact: the pruning driver re-runs each pruned block to get the next block's inputs.
//! SparseGPT's later decisions depend chaotically on rounding (a different summation order
//! re-draws its perplexity by ±1%), so a faster pass is only acceptable if it changes nothing.
//! The `gemm` crate computes each output as a chain of fused multiply-adds over the inner
//! dimension in order, restarted at zero for every depth block of `kc` columns and added to the
//! destination after each block (`kc` from `gemm_common::cache::kernel_params`, a function of
//! `k` and the cache sizes only). A product with a zero weight is an exact no-op in such a
//! chain (`fma(0, x, a) = a` for finite `x`, up to the sign of a zero), so skipping the zeros
//! and keeping the chains and the block boundaries gives the same bits. [`SparseRows::matches_gemm`]
//! says for which shapes that holds (the crate's generic path); the bench below checks the bits.
//!
//! Layout (AVX-512): `x` is taken [`TM`] tokens at a time and transposed to `[k, TM]`, so one
//! weight `w[j, c]` multiplies a contiguous run of `TM` activations — 8 vector FMAs on 8
//! registers of accumulators per nonzero (the sparse-times-dense scheme of e.g. Gale et al.,
//! "Sparse GPU Kernels for Deep Learning", SC'20, §4, laid out for a CPU's vector registers).
//! The inner dimension is cut into panels of at most [`KB`] columns, so the panel of the
//! transposed tile that a row's nonzeros index (`KB·TM` floats, 32 KB) stays in L1; partial
//! chains cross panels in a buffer. Nonzeros are stored per (panel, row) as the byte offset of
//! their column inside the transposed panel (u16) and their value.
//!
//! Other CPUs take a portable loop with `f32::mul_add` in the same order (same bits, slow).

mod spmm {
    use rayon::prelude::*;
    use std::sync::atomic::{AtomicBool, Ordering::Relaxed};

    /// Measurement switch: skip the transposes in and out of the tile layout (wrong results; times
    /// the FMA loop alone, as if activations were kept in the tile layout between layers).
    pub static KERNEL_ONLY: AtomicBool = AtomicBool::new(false);

    /// A raw pointer that may cross threads; tiles write disjoint rows.
    #[derive(Clone, Copy)]
    struct SendPtr(*mut f32);
    unsafe impl Send for SendPtr {}
    unsafe impl Sync for SendPtr {}

    /// Tokens per tile: 8 AVX-512 registers of f32.
    pub const TM: usize = 128;
    /// Columns per panel: a `KB × TM` f32 panel is 32 KB (L1 holds 48 KB on this CPU).
    pub const KB: usize = 64;

    /// One panel: columns `c0..c1`, and where it sits in a `gemm` depth block.
    #[derive(Clone, Copy, Debug)]
    struct Panel {
        c0: usize,
        c1: usize,
        /// First panel of a depth block: the chain starts at zero.
        chain_start: bool,
        /// Last panel of a depth block: the chain is added to the destination.
        chain_end: bool,
        /// In the first depth block: without `accumulate`, the chain *is* the destination.
        first_block: bool,
    }

    /// A `[n, k]` weight's nonzeros by (panel, row), for [`SparseRows::matmul_t`].
    #[derive(Clone, Debug)]
    pub struct SparseRows {
        n: usize,
        k: usize,
        panels: Vec<Panel>,
        /// Nonzeros of row `j` in panel `s`: `ptr[s·n + j] .. ptr[s·n + j + 1]`.
        ptr: Vec<u32>,
        /// Byte offset of the nonzero's column in a transposed panel: `(c − c0) · TM · 4`.
        off: Vec<u16>,
        val: Vec<f32>,
    }

    /// The depth block size the `gemm` crate uses for an inner dimension `k` (f32, its AVX-512
    /// micro-kernel: 64 × 6). Computed by the crate's own function, so it follows the cache sizes.
    pub fn gemm_depth_block(k: usize) -> usize {
        // m and n only matter for the other block sizes; any large values do.
        gemm_common::cache::kernel_params(4096, 4096, k, 64, 6, 4)
            .kc
            .max(1)
    }

    impl SparseRows {
        /// Index the nonzeros of the row-major `[n, k]` matrix `w`.
        pub fn new(w: &[f32], n: usize, k: usize) -> SparseRows {
            assert!(w.len() >= n * k, "SparseRows: bad sizes");
            let kc = gemm_depth_block(k);
            let mut panels = Vec::new();
            let mut b0 = 0;
            while b0 < k {
                let b1 = (b0 + kc).min(k);
                let mut c0 = b0;
                while c0 < b1 {
                    let c1 = (c0 + KB).min(b1);
                    panels.push(Panel {
                        c0,
                        c1,
                        chain_start: c0 == b0,
                        chain_end: c1 == b1,
                        first_block: b0 == 0,
                    });
                    c0 = c1;
                }
                b0 = b1;
            }
            let nnz = w[..n * k].iter().filter(|v| **v != 0.0).count();
            let mut ptr = Vec::with_capacity(panels.len() * n + 1);
            let mut off = Vec::with_capacity(nnz);
            let mut val = Vec::with_capacity(nnz);
            ptr.push(0u32);
            for p in &panels {
                for j in 0..n {
                    for (c, &v) in w[j * k + p.c0..j * k + p.c1].iter().enumerate() {
                        if v != 0.0 {
                            off.push((c * TM * 4) as u16);
                            val.push(v);
                        }
                    }
                    ptr.push(off.len() as u32);
                }
            }
            SparseRows {
                n,
                k,
                panels,
                ptr,
                off,
                val,
            }
        }

        /// True when the dense [`lopper::kernels::matmul_t`] of an `m`-row input takes the `gemm` crate's
        /// generic path, whose bits [`Self::matmul_t`] reproduces: not its small-product
        /// (`m·n ≤ 256`), matrix–vector (`m` or `n` = 1), tiny-depth (`k ≤ 2`) or small-tile
        /// (`m, n ≤ 64`: another depth block) paths.
        pub fn matches_gemm(&self, m: usize) -> bool {
            let n = self.n;
            m > 1 && n > 1 && self.k > 2 && m * n > 256 && (m > 64 || n > 64)
        }

        /// `out[m, n] = x[m, k] · Wᵀ` (`+= …` when `accumulate`), from the nonzeros only. With
        /// several rayon threads the token tiles run in parallel. See [`matmul_t_many`].
        pub fn matmul_t(&self, x: &[f32], m: usize, out: &mut [f32], accumulate: bool) {
            matmul_t_many(x, m, &mut [Product::new(self, out, accumulate)]);
        }

        /// One tile: `b.xt` holds the transposed input; `out` is the tile's `[rows, n]` output.
        fn tile(
            &self,
            rows: usize,
            out: &mut [f32],
            accumulate: bool,
            b: &mut TileBuf,
            pf: Prefetch,
        ) {
            let n = self.n;
            let transposes = !KERNEL_ONLY.load(Relaxed);
            if accumulate && transposes {
                transpose_into(out, rows, n, &mut b.dst);
            }
            #[cfg(target_arch = "x86_64")]
            if lopper::kernels::has_avx512() {
                // SAFETY: AVX-512F checked; offsets index panels of `b.xt` (built with TM, KB).
                unsafe { self.panels_avx512(b, accumulate, pf) };
            } else {
                self.panels_portable(b, accumulate);
            }
            #[cfg(not(target_arch = "x86_64"))]
            {
                let _ = pf;
                self.panels_portable(b, accumulate);
            }
            if transposes {
                transpose_back(&b.dst, rows, n, out);
            }
        }

        /// Reference order of [`Self::panels_avx512`], lane by lane with fused multiply-adds.
        fn panels_portable(&self, b: &mut TileBuf, accumulate: bool) {
            let n = self.n;
            for (s, p) in self.panels.iter().enumerate() {
                let panel = &b.xt[p.c0 * TM..p.c1 * TM];
                for j in 0..n {
                    let acc = &mut b.part[j * TM..(j + 1) * TM];
                    if p.chain_start {
                        acc.fill(0.0);
                    }
                    let (a, e) = (
                        self.ptr[s * n + j] as usize,
                        self.ptr[s * n + j + 1] as usize,
                    );
                    for q in a..e {
                        let (c, w) = (self.off[q] as usize / (TM * 4), self.val[q]);
                        for (l, xv) in acc.iter_mut().zip(&panel[c * TM..(c + 1) * TM]) {
                            *l = w.mul_add(*xv, *l);
                        }
                    }
                    if p.chain_end {
                        let d = &mut b.dst[j * TM..(j + 1) * TM];
                        if p.first_block && !accumulate {
                            d.copy_from_slice(acc);
                        } else {
                            d.iter_mut().zip(acc.iter()).for_each(|(d, a)| *d += *a);
                        }
                    }
                }
            }
        }

        /// Rows go two at a time, their nonzeros interleaved: 16 independent chains of FMAs hide
        /// the FMA latency (8 would just cover it).
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx512f")]
        unsafe fn panels_avx512(&self, b: &mut TileBuf, accumulate: bool, pf: Prefetch) {
            use std::arch::x86_64::*;
            type Acc = [__m512; 8];
            #[inline(always)]
            unsafe fn fma8(acc: &mut Acc, w: f32, xp: *const f32) {
                let w = _mm512_set1_ps(w);
                for (r, a) in acc.iter_mut().enumerate() {
                    *a = _mm512_fmadd_ps(w, _mm512_loadu_ps(xp.add(16 * r)), *a);
                }
            }
            let n = self.n;
            let (off, val, ptr) = (self.off.as_ptr(), self.val.as_ptr(), &self.ptr);
            let at = |q: usize, base: *const u8| base.add(*off.add(q) as usize) as *const f32;
            // Spread the next tile's prefetches over the row pairs.
            let steps = self.panels.len() * n.div_ceil(2);
            let per = pf.lines.div_ceil(steps.max(1));
            let mut line = 0;
            for (s, p) in self.panels.iter().enumerate() {
                let base = b.xt.as_ptr().add(p.c0 * TM) as *const u8;
                let mut j = 0;
                while j < n {
                    for _ in 0..per {
                        if line < pf.lines {
                            _mm_prefetch::<_MM_HINT_T1>(pf.at.add(64 * line) as *const i8);
                            line += 1;
                        }
                    }
                    let two = j + 1 < n;
                    let mut acc: [Acc; 2] = [[_mm512_setzero_ps(); 8]; 2];
                    let rows = if two { 2 } else { 1 };
                    for (i, acc) in acc.iter_mut().enumerate().take(rows) {
                        if !p.chain_start {
                            let part = b.part.as_ptr().add((j + i) * TM);
                            for (r, a) in acc.iter_mut().enumerate() {
                                *a = _mm512_loadu_ps(part.add(16 * r));
                            }
                        }
                    }
                    let (a0, e0) = (ptr[s * n + j] as usize, ptr[s * n + j + 1] as usize);
                    if two {
                        let e1 = ptr[s * n + j + 2] as usize;
                        let both = (e0 - a0).min(e1 - e0);
                        for i in 0..both {
                            let (q0, q1) = (a0 + i, e0 + i);
                            let [x, y] = &mut acc;
                            fma8(x, *val.add(q0), at(q0, base));
                            fma8(y, *val.add(q1), at(q1, base));
                        }
                        for q in a0 + both..e0 {
                            fma8(&mut acc[0], *val.add(q), at(q, base));
                        }
                        for q in e0 + both..e1 {
                            fma8(&mut acc[1], *val.add(q), at(q, base));
                        }
                    } else {
                        for q in a0..e0 {
                            fma8(&mut acc[0], *val.add(q), at(q, base));
                        }
                    }
                    for (i, acc) in acc.iter().enumerate().take(rows) {
                        if p.chain_end {
                            let d = b.dst.as_mut_ptr().add((j + i) * TM);
                            for (r, a) in acc.iter().enumerate() {
                                let v = if p.first_block && !accumulate {
                                    *a
                                } else {
                                    _mm512_add_ps(_mm512_loadu_ps(d.add(16 * r)), *a)
                                };
                                _mm512_storeu_ps(d.add(16 * r), v);
                            }
                        } else {
                            let part = b.part.as_mut_ptr().add((j + i) * TM);
                            for (r, a) in acc.iter().enumerate() {
                                _mm512_storeu_ps(part.add(16 * r), *a);
                            }
                        }
                    }
                    j += rows;
                }
            }
        }
    }

    /// Cache lines to prefetch while a tile computes: the next tile's input.
    #[derive(Clone, Copy)]
    struct Prefetch {
        at: *const u8,
        lines: usize,
    }

    impl Prefetch {
        const NONE: Prefetch = Prefetch {
            at: std::ptr::null(),
            lines: 0,
        };
    }

    /// One product of [`matmul_t_many`]: `out (+)= x · Wᵀ`.
    pub struct Product<'a> {
        w: &'a SparseRows,
        out: &'a mut [f32],
        accumulate: bool,
    }

    impl<'a> Product<'a> {
        pub fn new(w: &'a SparseRows, out: &'a mut [f32], accumulate: bool) -> Product<'a> {
            Product { w, out, accumulate }
        }
    }

    /// Several products of the same input `x` `[m, k]` (a block's q, k and v projections): each
    /// tile of `x` is transposed once for all of them. Bit for bit the dense [`lopper::kernels::matmul_t`]
    /// of each (see the module docs and [`SparseRows::matches_gemm`]).
    pub fn matmul_t_many(x: &[f32], m: usize, products: &mut [Product<'_>]) {
        let Some(k) = products.first().map(|p| p.w.k) else {
            return;
        };
        let n_max = products.iter().map(|p| p.w.n).max().unwrap_or(0);
        for p in products.iter() {
            assert!(
                p.w.k == k && x.len() >= m * k && p.out.len() >= m * p.w.n,
                "matmul_t_many: bad sizes"
            );
        }
        if m == 0 || n_max == 0 {
            return;
        }
        let outs: Vec<(SendPtr, usize, bool)> = products
            .iter_mut()
            .map(|p| (SendPtr(p.out.as_mut_ptr()), p.w.n, p.accumulate))
            .collect();
        let tiles = m.div_ceil(TM);
        let job = |b: &mut TileBuf, t: usize, next: Option<usize>| {
            let (r0, rows) = (t * TM, TM.min(m - t * TM));
            if !KERNEL_ONLY.load(Relaxed) {
                transpose_into(&x[r0 * k..(r0 + rows) * k], rows, k, &mut b.xt);
            }
            for (i, (p, &(out, n, acc))) in products.iter().zip(&outs).enumerate() {
                let pf = match next {
                    Some(u) if i == 0 => {
                        let rows = TM.min(m - u * TM);
                        Prefetch {
                            at: x[u * TM * k..].as_ptr() as *const u8,
                            lines: rows * k * 4 / 64,
                        }
                    }
                    _ => Prefetch::NONE,
                };
                // SAFETY: tiles are disjoint row ranges of each output (sizes asserted above).
                let o = unsafe { std::slice::from_raw_parts_mut(out.0.add(r0 * n), rows * n) };
                p.w.tile(rows, o, acc, b, pf);
            }
        };
        if lopper::kernels::threads() > 1 && tiles > 1 {
            (0..tiles)
                .into_par_iter()
                .for_each_init(|| TileBuf::new(n_max, k), |b, t| job(b, t, None));
        } else {
            let mut b = TileBuf::new(n_max, k);
            for t in 0..tiles {
                let next = (t + 1 < tiles).then_some(t + 1);
                job(&mut b, t, next);
            }
        }
    }

    /// Per-thread buffers of one tile: the transposed input `[k, TM]`, destination `[n, TM]` and
    /// partial chains `[n, TM]`, each starting on a cache line (vector loads then never split
    /// lines).
    struct TileBuf {
        xt: Aligned,
        dst: Aligned,
        part: Aligned,
    }

    impl TileBuf {
        fn new(n: usize, k: usize) -> TileBuf {
            // (`n` is the widest output the buffers serve.)
            TileBuf {
                xt: Aligned::new(k * TM),
                dst: Aligned::new(n * TM),
                part: Aligned::new(n * TM),
            }
        }
    }

    /// `len` zeroed f32 starting on a 64-byte boundary.
    struct Aligned {
        buf: Vec<f32>,
        at: usize,
        len: usize,
    }

    impl Aligned {
        fn new(len: usize) -> Aligned {
            let buf = vec![0f32; len + 16];
            let at = buf.as_ptr().align_offset(64).min(16);
            Aligned { buf, at, len }
        }
    }

    impl std::ops::Deref for Aligned {
        type Target = [f32];
        fn deref(&self) -> &[f32] {
            &self.buf[self.at..self.at + self.len]
        }
    }

    impl std::ops::DerefMut for Aligned {
        fn deref_mut(&mut self) -> &mut [f32] {
            &mut self.buf[self.at..self.at + self.len]
        }
    }

    /// `t[c, r] = a[r, c]` for `a` `[rows ≤ TM, cols]` into `t` `[cols, TM]` (lanes `rows..TM`
    /// zero).
    fn transpose_into(a: &[f32], rows: usize, cols: usize, t: &mut [f32]) {
        if rows < TM {
            t[..cols * TM].fill(0.0);
        }
        transpose(a, cols, t, TM, rows, cols);
    }

    /// `a[r, c] = t[c, r]` for the first `rows` lanes of `t` `[cols, TM]`.
    fn transpose_back(t: &[f32], rows: usize, cols: usize, a: &mut [f32]) {
        transpose(t, TM, a, cols, cols, rows);
    }

    /// `dst[c · dst_stride + r] = src[r · src_stride + c]` for `r < rows`, `c < cols`: 16 × 16
    /// blocks in registers with AVX-512, the edges element by element.
    fn transpose(
        src: &[f32],
        src_stride: usize,
        dst: &mut [f32],
        dst_stride: usize,
        rows: usize,
        cols: usize,
    ) {
        assert!(
            rows == 0
                || cols == 0
                || (src.len() >= (rows - 1) * src_stride + cols
                    && dst.len() >= (cols - 1) * dst_stride + rows)
        );
        let (r16, c16) = if lopper::kernels::has_avx512() {
            (rows / 16 * 16, cols / 16 * 16)
        } else {
            (0, 0)
        };
        #[cfg(target_arch = "x86_64")]
        for r0 in (0..r16).step_by(16) {
            for c0 in (0..c16).step_by(16) {
                // SAFETY: AVX-512F checked; the 16 × 16 block lies inside both (asserted above).
                unsafe {
                    transpose16(
                        src.as_ptr().add(r0 * src_stride + c0),
                        src_stride,
                        dst.as_mut_ptr().add(c0 * dst_stride + r0),
                        dst_stride,
                    )
                };
            }
        }
        for r in 0..rows {
            let c_from = if r < r16 { c16 } else { 0 };
            for c in c_from..cols {
                dst[c * dst_stride + r] = src[r * src_stride + c];
            }
        }
    }

    /// One 16 × 16 block: unpack pairs of rows, then 128-bit lane shuffles (4 stages, 64 shuffles).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn transpose16(src: *const f32, ss: usize, dst: *mut f32, ds: usize) {
        use std::arch::x86_64::*;
        let mut r = [_mm512_setzero_ps(); 16];
        for (i, v) in r.iter_mut().enumerate() {
            *v = _mm512_loadu_ps(src.add(i * ss));
        }
        let mut t = [_mm512_setzero_ps(); 16];
        for i in 0..8 {
            t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
            t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
        }
        for i in 0..4 {
            let (a, b) = (4 * i, 4 * i + 2);
            r[4 * i] = _mm512_shuffle_ps::<0x44>(t[a], t[b]);
            r[4 * i + 1] = _mm512_shuffle_ps::<0xEE>(t[a], t[b]);
            r[4 * i + 2] = _mm512_shuffle_ps::<0x44>(t[a + 1], t[b + 1]);
            r[4 * i + 3] = _mm512_shuffle_ps::<0xEE>(t[a + 1], t[b + 1]);
        }
        for h in 0..2 {
            let o = 8 * h;
            for i in 0..4 {
                t[o + i] = _mm512_shuffle_f32x4::<0x88>(r[o + i], r[o + 4 + i]);
                t[o + 4 + i] = _mm512_shuffle_f32x4::<0xDD>(r[o + i], r[o + 4 + i]);
            }
        }
        for i in 0..8 {
            r[i] = _mm512_shuffle_f32x4::<0x88>(t[i], t[8 + i]);
            r[8 + i] = _mm512_shuffle_f32x4::<0xDD>(t[i], t[8 + i]);
        }
        for (i, v) in r.iter().enumerate() {
            _mm512_storeu_ps(dst.add(i * ds), *v);
        }
    }
}

use lopper::kernels::matmul_t;
use spmm::{matmul_t_many, Product, SparseRows, KERNEL_ONLY};
use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;

fn main() {
    let density: f64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0.5);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    let mut seed = 0x9e3779b97f4a7c15u64;
    let mut rnd = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed >> 11) as f64 / (1u64 << 53) as f64
    };
    let m = 4096;
    for &(n, k) in &[(576, 576), (192, 576), (1536, 576), (576, 1536)] {
        let x: Vec<f32> = (0..m * k).map(|_| (rnd() * 2.0 - 1.0) as f32).collect();
        let w: Vec<f32> = (0..n * k)
            .map(|_| {
                if rnd() < density {
                    (rnd() * 2.0 - 1.0) as f32
                } else {
                    0.0
                }
            })
            .collect();
        let sp = SparseRows::new(&w, n, k);
        assert!(sp.matches_gemm(m), "not the gemm crate's generic path");
        let mut a = vec![0f32; m * n];
        let mut b = vec![0f32; m * n];
        let (mut td, mut ts, mut tk) = (f64::MAX, f64::MAX, f64::MAX);
        let mut scratch = vec![0f32; m * n];
        pool.install(|| {
            for _ in 0..5 {
                let t = Instant::now();
                matmul_t(&x, &w, &mut a, m, k, n, false);
                td = td.min(t.elapsed().as_secs_f64());
                let t = Instant::now();
                sp.matmul_t(&x, m, &mut b, false);
                ts = ts.min(t.elapsed().as_secs_f64());
                KERNEL_ONLY.store(true, Relaxed);
                let t = Instant::now();
                sp.matmul_t(&x, m, &mut scratch, false);
                tk = tk.min(t.elapsed().as_secs_f64());
                KERNEL_ONLY.store(false, Relaxed);
            }
        });
        let same = a
            .iter()
            .zip(&b)
            .filter(|(p, q)| p.to_bits() == q.to_bits())
            .count();
        let gf = 2.0 * (m * n * k) as f64 / 1e9;
        println!(
            "n={n:5} k={k:5}: dense {:.2} ms ({:.0} GFLOP/s), sparse {:.2} ms ({:.2}x; FMA loop alone {:.2}x), bit-identical {}/{}",
            td * 1e3,
            gf / td,
            ts * 1e3,
            td / ts,
            td / tk,
            same,
            a.len()
        );
    }
    // Shared inputs: q/k/v (576, 192, 192 from 576) and gate/up (1536, 1536 from 576).
    for ns in [vec![576usize, 192, 192], vec![1536, 1536]] {
        let k = 576;
        let x: Vec<f32> = (0..m * k).map(|_| (rnd() * 2.0 - 1.0) as f32).collect();
        let ws: Vec<Vec<f32>> = ns
            .iter()
            .map(|&n| {
                (0..n * k)
                    .map(|_| {
                        if rnd() < density {
                            (rnd() * 2.0 - 1.0) as f32
                        } else {
                            0.0
                        }
                    })
                    .collect()
            })
            .collect();
        let sps: Vec<SparseRows> = ws
            .iter()
            .zip(&ns)
            .map(|(w, &n)| SparseRows::new(w, n, k))
            .collect();
        let mut a: Vec<Vec<f32>> = ns.iter().map(|&n| vec![0f32; m * n]).collect();
        let mut b = a.clone();
        let (mut td, mut ts) = (f64::MAX, f64::MAX);
        pool.install(|| {
            for _ in 0..5 {
                let t = Instant::now();
                for ((w, o), &n) in ws.iter().zip(a.iter_mut()).zip(&ns) {
                    matmul_t(&x, w, o, m, k, n, false);
                }
                td = td.min(t.elapsed().as_secs_f64());
                let t = Instant::now();
                let mut ps: Vec<Product> = sps
                    .iter()
                    .zip(b.iter_mut())
                    .map(|(s, o)| Product::new(s, o, false))
                    .collect();
                matmul_t_many(&x, m, &mut ps);
                ts = ts.min(t.elapsed().as_secs_f64());
            }
        });
        let same = a
            .iter()
            .zip(&b)
            .all(|(p, q)| p.iter().zip(q).all(|(u, v)| u.to_bits() == v.to_bits()));
        println!(
            "shared x, n={ns:?}: dense {:.2} ms, sparse {:.2} ms ({:.2}x), bit-identical {same}",
            td * 1e3,
            ts * 1e3,
            td / ts
        );
    }
}
