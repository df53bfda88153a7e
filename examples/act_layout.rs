//! Layout experiment for the column-skipping kernel: full column-major (each column contiguous),
//! active columns split over threads (partial sums added at the end), 4 columns per pass,
//! software prefetch `pf` columns ahead; bf16; effective bandwidth at several input sparsities.
#[cfg(target_arch = "x86_64")]
mod imp {
    use rayon::prelude::*;
    use std::arch::x86_64::*;
    use std::time::Instant;

    #[inline(always)]
    unsafe fn ld(p: *const u16) -> __m256 {
        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(
            _mm_loadu_si128(p as *const __m128i),
        )))
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn cols4(
        pf: usize,
        w: *const u16,
        rows: usize,
        idx: &[u32],
        xs: &[f32],
        acc: &mut [f32],
    ) {
        let n = idx.len();
        let mut k = 0;
        while k + 4 <= n {
            let p: [*const u16; 4] = std::array::from_fn(|c| w.add(idx[k + c] as usize * rows));
            let xb: [__m256; 4] = std::array::from_fn(|c| _mm256_set1_ps(xs[k + c]));
            let q: [*const i8; 4] = std::array::from_fn(|c| {
                let kk = (k + c + pf).min(n - 1);
                w.add(idx[kk] as usize * rows) as *const i8
            });
            let mut i = 0;
            while i < rows {
                if pf > 0 && i % 32 == 0 {
                    for qc in q {
                        _mm_prefetch::<_MM_HINT_T0>(qc.wrapping_add(2 * i));
                    }
                }
                let mut a = _mm256_loadu_ps(acc.as_ptr().add(i));
                for c in 0..4 {
                    a = _mm256_fmadd_ps(ld(p[c].add(i)), xb[c], a);
                }
                _mm256_storeu_ps(acc.as_mut_ptr().add(i), a);
                i += 8;
            }
            k += 4;
        }
        while k < n {
            let p = w.add(idx[k] as usize * rows);
            let xb = _mm256_set1_ps(xs[k]);
            let mut i = 0;
            while i < rows {
                let a = _mm256_loadu_ps(acc.as_ptr().add(i));
                _mm256_storeu_ps(
                    acc.as_mut_ptr().add(i),
                    _mm256_fmadd_ps(ld(p.add(i)), xb, a),
                );
                i += 8;
            }
            k += 1;
        }
    }

    fn alloc(n: usize, huge: bool) -> memmap2::MmapMut {
        let m = memmap2::MmapMut::map_anon(n * 2 + (2 << 20)).unwrap();
        if huge {
            m.advise(memmap2::Advice::HugePage).unwrap();
        }
        m
    }

    pub fn main() {
        let pf = 8;
        for (rows, cols) in [(1536usize, 576usize), (576, 1536)] {
            let n = 40;
            let per = rows * cols;
            let mut bufs: Vec<memmap2::MmapMut> =
                [false, true].iter().map(|&h| alloc(n * per, h)).collect();
            for b in bufs.iter_mut() {
                let off = (2usize << 20) - (b.as_ptr() as usize % (2 << 20));
                let v: &mut [u16] = bytemuck::cast_slice_mut(&mut b[off..off + n * per * 2]);
                for (i, x) in v.iter_mut().enumerate() {
                    *x = ((i * 7 % 255) as u16) | 0x3c00;
                }
            }
            for sp in [0.0, 0.5, 0.75] {
                for rep in 0..2 {
                    for (hi, b) in bufs.iter().enumerate() {
                        let off = (2usize << 20) - (b.as_ptr() as usize % (2 << 20));
                        let base = unsafe { b.as_ptr().add(off) as *const u16 };
                        let base = base as usize;
                        let x: Vec<f32> = (0..cols)
                            .map(|j| {
                                if ((j * 2654435761) % 1000) < (sp * 1000.0) as usize {
                                    0.0
                                } else {
                                    1.0
                                }
                            })
                            .collect();
                        let idx: Vec<u32> =
                            (0..cols as u32).filter(|&j| x[j as usize] != 0.0).collect();
                        let xs: Vec<f32> = idx.iter().map(|&j| x[j as usize]).collect();
                        let mut best = f64::MAX;
                        for _ in 0..5 {
                            let t0 = Instant::now();
                            for _ in 0..10 {
                                for m in 0..n {
                                    let half = idx.len().div_ceil(2);
                                    let parts: Vec<Vec<f32>> = (0..2)
                                        .into_par_iter()
                                        .map(|h| {
                                            let (a, b) =
                                                (h * half, ((h + 1) * half).min(idx.len()));
                                            let mut acc = vec![0f32; rows];
                                            unsafe {
                                                cols4(
                                                    pf,
                                                    (base as *const u16).add(m * per),
                                                    rows,
                                                    &idx[a..b],
                                                    &xs[a..b],
                                                    &mut acc,
                                                )
                                            };
                                            acc
                                        })
                                        .collect();
                                    std::hint::black_box(&parts);
                                }
                            }
                            best = best.min(t0.elapsed().as_secs_f64() / (10 * n) as f64);
                        }
                        let bytes = (rows * idx.len() * 2) as f64;
                        println!("{rows}x{cols} huge={hi} rep={rep} s={sp:.2}: {:.1} us, {:.1} GB/s effective", best * 1e6, bytes / best / 1e9);
                    }
                }
            }
        }
    }
}

fn main() {
    #[cfg(target_arch = "x86_64")]
    imp::main();
    #[cfg(not(target_arch = "x86_64"))]
    eprintln!("act_layout: an x86-64 (AVX2) experiment");
}
