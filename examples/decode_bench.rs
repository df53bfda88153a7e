//! Prefill decode cost (packed rows → dense f32 tiles, what prefill does before its GEMM) of
//! every N:M pattern and value type and of the unstructured formats at 50%, on a 1536×576
//! matrix (the default model's up_proj shape), next to the GEMM that follows it at 32 and 256
//! prompt tokens (so the decode's share of a prefill can be read off), in one run: best of 9 rounds of 20 full decodes, each in tiles of 64 Ki values into one
//! buffer that stays in cache (as the prefill path decodes), single thread, µs per decode.
//!
//! `cargo run --release --example decode_bench`; `LOPPER_ISA=portable` or `avx2` caps the
//! kernel set.

use half::f16;
use lopper::formats::*;
use std::time::Instant;

fn nm_matrix(rows: usize, cols: usize, n: usize, m: usize) -> Vec<f32> {
    // Deterministic values; in each group of m keep the n positions with the largest hash.
    let mut w = vec![0f32; rows * cols];
    let mut s = 0x9e37_79b9_7f4a_7c15u64;
    for g in w.chunks_mut(m) {
        let mut v: Vec<(u64, usize)> = (0..m)
            .map(|k| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s, k)
            })
            .collect();
        v.sort();
        for &(h, k) in &v[m - n..] {
            g[k] = (h >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
        }
    }
    w
}

fn time(f: &dyn WeightFormat, out: &mut [f32]) -> f64 {
    let (rows, cols) = (f.rows(), f.cols());
    let mut best = f64::MAX;
    for _ in 0..9 {
        let t = Instant::now();
        for _ in 0..20 {
            // One thread; in tiles of 64 Ki values, as the prefill path decodes (the tile stays in cache).
            let tile = (64 * 1024 / cols).min(rows);
            for r0 in (0..rows).step_by(tile) {
                let r1 = (r0 + tile).min(rows);
                f.decode_rows(r0, r1, &mut out[..(r1 - r0) * cols]);
            }
        }
        best = best.min(t.elapsed().as_secs_f64() / 20.0);
    }
    best * 1e6
}

fn main() {
    let (rows, cols) = (1536, 576);
    let mut out = vec![0f32; rows * cols];
    println!("kernels: {}", isa().name());
    println!(
        "{:<8} {:>10} {:>10} {:>10} {:>10}",
        "pattern", "f32 µs", "bf16 µs", "i8 µs", "f16 µs"
    );
    for (n, m) in [(2, 4), (1, 2), (4, 8), (8, 16), (1, 4)] {
        let w = nm_matrix(rows, cols, n, m);
        let a = time(&NM::from_dense(&w, rows, cols, n, m).unwrap(), &mut out);
        let b = time(&NMBf16::from_dense(&w, rows, cols, n, m).unwrap(), &mut out);
        let c = time(&NMI8::from_dense(&w, rows, cols, n, m).unwrap(), &mut out);
        let d = time(
            &NMOf::<f16>::from_dense(&w, rows, cols, n, m).unwrap(),
            &mut out,
        );
        println!(
            "{:<8} {a:>10.1} {b:>10.1} {c:>10.1} {d:>10.1}",
            format!("{n}:{m}")
        );
    }
    // 50% unstructured: a 2:4 matrix is also a valid input for the general formats, but its
    // zeros are too regular; 4:8 spreads them like a random mask within each 8 columns.
    let w = nm_matrix(rows, cols, 4, 8);
    println!("50% unstructured (f32 / bf16 / i8 / f16 values)");
    let a = time(&Bitmask::from_dense(&w, rows, cols).unwrap(), &mut out);
    let b = time(&BitmaskBf16::from_dense(&w, rows, cols).unwrap(), &mut out);
    let c = time(&BitmaskI8::from_dense(&w, rows, cols).unwrap(), &mut out);
    let d = time(
        &BitmaskOf::<f16>::from_dense(&w, rows, cols).unwrap(),
        &mut out,
    );
    println!("{:<8} {a:>10.1} {b:>10.1} {c:>10.1} {d:>10.1}", "bitmask");
    let a = time(&Csr::from_dense(&w, rows, cols).unwrap(), &mut out);
    let b = time(&CsrBf16::from_dense(&w, rows, cols).unwrap(), &mut out);
    let c = time(&CsrI8::from_dense(&w, rows, cols).unwrap(), &mut out);
    let d = time(&CsrOf::<f16>::from_dense(&w, rows, cols).unwrap(), &mut out);
    println!("{:<8} {a:>10.1} {b:>10.1} {c:>10.1} {d:>10.1}", "csr");
    let a = time(&Dense::from_dense(&w, rows, cols).unwrap(), &mut out);
    let b = time(&DenseBf16::from_dense(&w, rows, cols).unwrap(), &mut out);
    let c = time(&DenseI8::from_dense(&w, rows, cols).unwrap(), &mut out);
    let d = time(&DenseF16::from_dense(&w, rows, cols).unwrap(), &mut out);
    println!("{:<8} {a:>10.1} {b:>10.1} {c:>10.1} {d:>10.1}", "dense");
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .expect("pool");
    for m in [32, 256] {
        let x: Vec<f32> = (0..m * cols).map(|i| (i % 7) as f32 - 3.0).collect();
        let mut y = vec![0f32; m * rows];
        let mut best = f64::MAX;
        pool.install(|| {
            for _ in 0..9 {
                let t = Instant::now();
                dense_f32_matmul(&w, rows, cols, &x, m, &mut y, false);
                best = best.min(t.elapsed().as_secs_f64());
            }
        });
        println!("GEMM after it, {m} tokens: {:.1} µs", best * 1e6);
    }
}
