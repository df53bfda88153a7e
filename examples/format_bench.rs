//! Matvec benchmark of the compressed weight formats, streaming from DRAM.
//!
//! For a 1536×576 and a 4096×4096 matrix at 50% and 70% unstructured sparsity (plus 2:4 and
//! 4:8 at 50%), it builds enough copies of each format that the working set far exceeds the
//! caches, cycles matvecs over the copies, and prints µs per matvec, effective GB/s of weight
//! bytes read, and speedup vs the fastest dense f32 path in the same run.
//!
//! `cargo run --release --example format_bench [-- <dense MiB working set, default 512>]`

use lopper::formats::*;
use std::time::Instant;

struct Rng(u64);
impl Rng {
    fn unif(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 40) as f32 / (1u64 << 24) as f32
    }
}

/// Seconds per matvec, cycling over `copies` until at least 0.4 s have passed (after one warm pass).
fn time_matvec(
    copies: &[Box<dyn WeightFormat>],
    x: &[f32],
    y: &mut [f32],
    f: &dyn Fn(&dyn WeightFormat, &[f32], &mut [f32]),
) -> f64 {
    for c in copies {
        f(c.as_ref(), x, y);
    }
    let t = Instant::now();
    let mut n = 0usize;
    while t.elapsed().as_secs_f64() < 0.4 || n < copies.len() {
        for c in copies {
            f(c.as_ref(), x, y);
        }
        n += copies.len();
    }
    t.elapsed().as_secs_f64() / n as f64
}

fn main() {
    let ws_mib: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(512);
    println!(
        "threads: {}, avx512: {}, dense f32 working set ≈ {ws_mib} MiB per format (copies cycled)",
        rayon::current_num_threads(),
        has_avx512()
    );
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    for (rows, cols) in [(1536usize, 576usize), (4096, 4096)] {
        let copies = (ws_mib << 20).div_ceil(rows * cols * 4).max(2);
        let dense: Vec<f32> = (0..rows * cols).map(|_| rng.unif() * 2.0 - 1.0).collect();
        let x: Vec<f32> = (0..cols).map(|_| rng.unif() - 0.5).collect();
        let mut y = vec![0f32; rows];
        println!("\n== {rows}×{cols}, {copies} copies ==");
        println!(
            "{:<24} {:>10} {:>10} {:>9} {:>9}",
            "format", "MiB/copy", "µs/matvec", "GB/s", "speedup"
        );
        let build = |mk: &dyn Fn() -> Box<dyn WeightFormat>| -> Vec<Box<dyn WeightFormat>> {
            (0..copies).map(|_| mk()).collect()
        };
        let mv = |f: &dyn WeightFormat, x: &[f32], y: &mut [f32]| f.matvec(x, y);
        let row = |name: &str, c: &[Box<dyn WeightFormat>], s: f64, base: f64| {
            let b = c[0].nbytes();
            println!(
                "{:<24} {:>10.2} {:>10.1} {:>9.1} {:>8.2}x",
                name,
                b as f64 / (1 << 20) as f64,
                s * 1e6,
                b as f64 / s / 1e9,
                base / s
            );
        };
        // Dense baselines.
        let d: Vec<Box<dyn WeightFormat>> =
            build(&|| Box::new(Dense::from_dense(&dense, rows, cols).unwrap()));
        let t_own = time_matvec(&d, &x, &mut y, &mv);
        let dg: Vec<Dense> = (0..copies)
            .map(|_| Dense::from_dense(&dense, rows, cols).unwrap())
            .collect();
        drop(d);
        let t = Instant::now();
        let mut n = 0;
        while t.elapsed().as_secs_f64() < 0.4 || n < copies {
            for c in &dg {
                c.matmul_gemm(&x, 1, &mut y);
            }
            n += copies;
        }
        let t_gemm = t.elapsed().as_secs_f64() / n as f64;
        drop(dg);
        let base = t_own.min(t_gemm);
        let dref: Vec<Box<dyn WeightFormat>> =
            build(&|| Box::new(Dense::from_dense(&dense, rows, cols).unwrap()));
        row("dense f32 (avx512 rows)", &dref, t_own, base);
        row("dense f32 (matmul_t)", &dref, t_gemm, base);
        drop(dref);
        let c = build(&|| Box::new(DenseBf16::from_dense(&dense, rows, cols).unwrap()));
        row("dense bf16", &c, time_matvec(&c, &x, &mut y, &mv), base);
        drop(c);
        let c = build(&|| Box::new(DenseI8::from_dense(&dense, rows, cols).unwrap()));
        row("dense int8", &c, time_matvec(&c, &x, &mut y, &mv), base);
        drop(c);
        for sp in [0.5f32, 0.7] {
            let w: Vec<f32> = dense
                .iter()
                .map(|&v| if rng.unif() < sp { 0.0 } else { v })
                .collect();
            println!("-- {:.0}% unstructured sparsity --", sp * 100.0);
            let c = build(&|| Box::new(Bitmask::from_dense(&w, rows, cols).unwrap()));
            row("bitmask f32", &c, time_matvec(&c, &x, &mut y, &mv), base);
            drop(c);
            let c = build(&|| Box::new(BitmaskI8::from_dense(&w, rows, cols).unwrap()));
            row("bitmask int8", &c, time_matvec(&c, &x, &mut y, &mv), base);
            drop(c);
            let c = build(&|| Box::new(Csr::from_dense(&w, rows, cols).unwrap()));
            row("csr u16", &c, time_matvec(&c, &x, &mut y, &mv), base);
            drop(c);
            if sp == 0.5 {
                for (n, m) in [(2usize, 4usize), (4, 8)] {
                    // Magnitude N:M pruning of the dense matrix.
                    let mut s = dense.clone();
                    for g in s.chunks_mut(m) {
                        let mut idx: Vec<usize> = (0..m).collect();
                        idx.sort_by(|&a, &b| g[b].abs().total_cmp(&g[a].abs()));
                        for &k in &idx[n..] {
                            g[k] = 0.0;
                        }
                    }
                    let c = build(&|| Box::new(NM::from_dense(&s, rows, cols, n, m).unwrap()));
                    row(
                        &format!("{n}:{m} packed"),
                        &c,
                        time_matvec(&c, &x, &mut y, &mv),
                        base,
                    );
                }
            }
        }
    }
}
