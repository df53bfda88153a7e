//! Throughput of block reconstruction's per-row solves (`recover::reconstruct::refit`) on a
//! down_proj-shaped problem (576 × 1536, 50% unstructured and 2:4), random statistics.
//! Prints wall seconds and the Cholesky GFLOP/s; run with `/usr/bin/time` for CPU seconds.
//! `cargo run --release --example recon_solve_bench [rows cols]`
use lopper::calibrate::SplitMix64;
use lopper::recover::reconstruct::{refit, ReconStats};
use std::time::Instant;

fn main() {
    let a: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|s| s.parse().ok())
        .collect();
    let (rows, cols) = (
        a.first().copied().unwrap_or(576),
        a.get(1).copied().unwrap_or(1536),
    );
    let tokens = 2 * cols;
    let mut rng = SplitMix64(7);
    let mut r = || (rng.below(2001) as f32 - 1000.0) / 500.0;
    let xd: Vec<f32> = (0..tokens * cols).map(|_| r()).collect();
    let xp: Vec<f32> = xd.iter().map(|v| v + 0.1 * r()).collect();
    let w0: Vec<f32> = (0..rows * cols).map(|_| r()).collect();
    let gram = |a: &[f32], b: &[f32]| {
        let mut out = vec![0f32; cols * cols];
        lopper::kernels::cross_t(a, b, tokens, cols, cols, &mut out);
        out.iter().map(|&v| v as f64).collect::<Vec<f64>>()
    };
    let st = ReconStats::from_parts(cols, gram(&xp, &xp), gram(&xp, &xd), gram(&xd, &xd));
    for (label, keep) in [("50% unstructured", 0usize), ("2:4", 1)] {
        let mut w = w0.clone();
        for (i, v) in w.iter_mut().enumerate() {
            let drop = match keep {
                0 => (i * 2654435761usize) % 7 < 3 || (i % cols) % 2 == 0 && i % 5 == 0,
                _ => (i % cols) % 4 >= 2,
            };
            if drop {
                *v = 0.0;
            }
        }
        let k = w.iter().filter(|v| **v != 0.0).count() as f64 / rows as f64;
        let t = Instant::now();
        let f = refit(&mut w, &w0, rows, cols, &st, 0.01, "bench").unwrap();
        let s = t.elapsed().as_secs_f64();
        let gflop = rows as f64 * k.powi(3) / 3.0 / 1e9;
        println!(
            "{label}: {rows}x{cols}, mean kept {k:.0}: {s:.3} s, Cholesky {gflop:.1} GFLOP ({:.1} GFLOP/s), error {:.4} -> {:.4}",
            gflop / s,
            f.rel_error_before,
            f.rel_error_after
        );
    }
}
