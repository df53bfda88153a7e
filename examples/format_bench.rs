//! Decode-step (matvec) cost of every weight format on the default model's shapes, in one run.
//!
//! Weights come from the real model (layer 0's q/k/up/down and the LM head), magnitude-pruned
//! in place to 50% unstructured, 70% unstructured and 2:4. Two figures per format:
//!
//! * `cpu GB/s`: weight bytes / thread CPU time of one single-threaded matvec with the weights
//!   in cache — the rate the kernel can consume bytes at when memory is not the limit. CPU time
//!   (not wall time) keeps the figure meaningful on a shared machine. A kernel whose `cpu GB/s`
//!   is well above the DRAM bandwidth per core is bandwidth-bound in decode.
//! * `stream µs`, `speedup`: wall time per matvec with all threads while cycling over enough
//!   copies that the working set exceeds the last-level cache (`LOPPER_BENCH_MIB`, default
//!   768), and its speedup vs dense of the same value type (f32 / bf16 / int8) in the same run.
//!
//! `cargo run --release --example format_bench [-- SHAPE...]` (q_proj, up_proj, down_proj,
//! lm_head; default all). `LOPPER_ISA=portable` or `avx2` caps the kernel set.

use lopper::formats::*;
use std::sync::Arc;
use std::time::Instant;

fn thread_cpu() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

/// Best single-thread CPU seconds of one matvec, weights in cache.
fn cpu_time(f: &dyn WeightFormat, x: &[f32], y: &mut [f32]) -> f64 {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .expect("pool");
    pool.install(|| {
        f.matvec(x, y);
        let mut best = f64::MAX;
        for _ in 0..7 {
            let t = thread_cpu();
            for _ in 0..5 {
                f.matvec(x, y);
            }
            best = best.min((thread_cpu() - t) / 5.0);
        }
        best
    })
}

/// Wall seconds per matvec cycling over `copies` (all threads).
fn stream_time(copies: &[Arc<dyn WeightFormat>], x: &[f32], y: &mut [f32]) -> f64 {
    for c in copies {
        c.matvec(x, y);
    }
    let mut best = f64::MAX;
    for _ in 0..3 {
        let t = Instant::now();
        for c in copies {
            c.matvec(x, y);
        }
        best = best.min(t.elapsed().as_secs_f64() / copies.len() as f64);
    }
    best
}

fn magnitude(w: &[f32], cols: usize, keep: f64, nm: Option<(usize, usize)>) -> Vec<f32> {
    let mut w = w.to_vec();
    match nm {
        Some((n, m)) => {
            for g in w.chunks_mut(m) {
                let mut idx: Vec<usize> = (0..m).collect();
                idx.sort_by(|&a, &b| g[b].abs().total_cmp(&g[a].abs()));
                for &k in &idx[n..] {
                    g[k] = 0.0;
                }
            }
        }
        None => {
            for row in w.chunks_mut(cols) {
                let mut a: Vec<f32> = row.iter().map(|v| v.abs()).collect();
                a.sort_by(f32::total_cmp);
                let t = a[((1.0 - keep) * a.len() as f64) as usize];
                row.iter_mut()
                    .filter(|v| v.abs() < t)
                    .for_each(|v| *v = 0.0);
            }
        }
    }
    w
}

type Build = fn(&[f32], usize, usize, Option<(usize, usize)>) -> Arc<dyn WeightFormat>;

fn main() {
    let mib: usize = std::env::var("LOPPER_BENCH_MIB")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(768);
    // `LOPPER_ISA=portable|avx2` caps the kernels (to compare them with the best set).
    match std::env::var("LOPPER_ISA").as_deref() {
        Ok("portable") => limit_isa(Some(Isa::Portable)),
        Ok("avx2") => limit_isa(Some(Isa::Avx2)),
        _ => {}
    }
    let model = lopper::io::load_model(&lopper::assets::default_model().expect("model"))
        .expect("load model");
    let l0 = &model.weights.layers[0];
    let threads = rayon::current_num_threads();
    let bw1 = lopper::kernels::probe::stream_gbps(1, 1 << 30, 3);
    let bwn = lopper::kernels::probe::stream_gbps(threads, 1 << 30, 3);
    println!(
        "STREAM read 1 GiB: {bw1:.1} GB/s (1 thread), {bwn:.1} GB/s ({threads} threads); kernels {}",
        isa().name()
    );
    let formats: Vec<(&str, &str, Build)> = vec![
        ("dense", "f32", |w, r, c, _| {
            Arc::new(Dense::from_dense(w, r, c).unwrap())
        }),
        ("bitmask", "f32", |w, r, c, _| {
            Arc::new(Bitmask::from_dense(w, r, c).unwrap())
        }),
        ("csr", "f32", |w, r, c, _| {
            Arc::new(Csr::from_dense(w, r, c).unwrap())
        }),
        ("nm", "f32", |w, r, c, nm| {
            let (n, m) = nm.unwrap();
            Arc::new(NM::from_dense(w, r, c, n, m).unwrap())
        }),
        ("dense", "bf16", |w, r, c, _| {
            Arc::new(DenseBf16::from_dense(w, r, c).unwrap())
        }),
        ("bitmask", "bf16", |w, r, c, _| {
            Arc::new(BitmaskBf16::from_dense(w, r, c).unwrap())
        }),
        ("nm", "bf16", |w, r, c, nm| {
            let (n, m) = nm.unwrap();
            Arc::new(NMBf16::from_dense(w, r, c, n, m).unwrap())
        }),
        ("dense", "i8", |w, r, c, _| {
            Arc::new(DenseI8::from_dense(w, r, c).unwrap())
        }),
        ("bitmask", "i8", |w, r, c, _| {
            Arc::new(BitmaskI8::from_dense(w, r, c).unwrap())
        }),
    ];
    let shapes = [
        ("q_proj", &l0.q.weight),
        ("up_proj", &l0.up.weight),
        ("down_proj", &l0.down.weight),
        ("lm_head", model.weights.lm_head()),
    ];
    let only: Vec<String> = std::env::args().skip(1).collect();
    for (sname, t) in shapes {
        if !only.is_empty() && !only.iter().any(|o| o == sname) {
            continue;
        }
        let (rows, cols) = (t.rows(), t.cols());
        let x: Vec<f32> = (0..cols)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.01)
            .collect();
        let mut y = vec![0f32; rows];
        for (pname, keep, nm) in [
            ("dense", 1.0, None),
            ("50%", 0.5, None),
            ("2:4", 0.5, Some((2, 4))),
            ("70%", 0.3, None),
        ] {
            if sname == "lm_head" && pname != "dense" {
                continue;
            }
            let w = if keep < 1.0 {
                magnitude(t.data(), cols, keep, nm)
            } else {
                t.data().to_vec()
            };
            println!("\n== {sname} {rows}×{cols}, {pname} ==");
            println!(
                "{:<14} {:>9} {:>10} {:>10} {:>10} {:>8}",
                "format", "MB", "cpu µs", "cpu GB/s", "stream µs", "speedup"
            );
            let mut base: Vec<(&str, f64)> = Vec::new();
            for (fname, vt, build) in &formats {
                if (*fname == "nm") != nm.is_some() && *fname != "dense" {
                    continue;
                }
                if *fname == "csr" && keep > 0.5 {
                    continue;
                }
                if pname == "dense" && *fname != "dense" {
                    continue;
                }
                let f = build(&w, rows, cols, nm);
                let bytes = f.nbytes();
                let cpu = cpu_time(f.as_ref(), &x, &mut y);
                let copies: Vec<Arc<dyn WeightFormat>> = (0..(mib << 20).div_ceil(bytes).max(2))
                    .map(|_| build(&w, rows, cols, nm))
                    .collect();
                let st = stream_time(&copies, &x, &mut y);
                drop(copies);
                if *fname == "dense" {
                    base.push((vt, st));
                }
                let b = base.iter().find(|(v, _)| v == vt).map_or(st, |b| b.1);
                println!(
                    "{:<14} {:>9.2} {:>10.1} {:>10.1} {:>10.1} {:>7.2}x",
                    format!("{fname}-{vt}"),
                    bytes as f64 / 1e6,
                    cpu * 1e6,
                    bytes as f64 / cpu / 1e9,
                    st * 1e6,
                    b / st
                );
            }
        }
    }
}
